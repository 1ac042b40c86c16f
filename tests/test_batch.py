"""Tests of `mas2c batch` on the threads engine: datasets, scorers, statistics, resume, cost cap,
the user scorer in the sandbox, the converters and the matched-cost CoT-SC baseline.

Systems run for real (compiled specs in the unisolated sandbox, or Docker where the test is about
isolation) against the loopback LLM test server, scripted per question.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
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
            BatchError, match=r"line 1 \(id 1\): no field 'question' for input 'question'"
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
    from mas2c.batch_ray import _safe_name, _write_files

    for bad in ("../x", "/etc/passwd", "a/../../x", "", ".", "a\\b", "a\0b", 7, None):
        assert _safe_name(bad) is None, bad
    assert _safe_name("mas/result.json") == "mas/result.json"
    folder = tmp_path / "rows" / "r"
    _write_files(
        folder,
        [("mas/result.json", b"{}"), ("../../escape.txt", b"x"), ("/tmp/abs", b"x"), ("ok", "str")],
    )
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
