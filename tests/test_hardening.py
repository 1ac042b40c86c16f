"""Hardening (review of issues 10, 16, 17, 18): each test is a class of break the
adversarial review confirmed in an already-resolved issue, checked on several instances.

- A: an exit before every check has run is a failure, never a pass (the `test` step's
  harness and the batch/bench `code` scorer report a pass positively, after the checks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import compile_to, load_runtime, run_package

from mas2c.batch import CODE_SCORER_MAIN, parse_exact, score_text
from mas2c.lang.validate import validate_text

# -- A. exits are failures ---------------------------------------------------------------------

EXITS = [
    "import sys; sys.exit()",
    "import sys; sys.exit(0)",
    "exit()",
    "quit()",
    "raise SystemExit",
    "import os; os._exit(0)",
]

TEST_STEP = """
spec_version: "1"
name: exits
inputs:
  code: {type: string}
  tl: {type: array, items: {type: string}}
outputs: {listed: listed}
models: {m: {model: test-model}}
agents: {a: {role: r, instructions: i, model: m}}
workflow:
  - {id: t, kind: test, code: code, tests: "{{ tl }}", out: listed}
"""


def test_test_step_counts_every_exit_as_a_failure(tmp_path: Path) -> None:
    report = validate_text(TEST_STEP)
    assert report.ok and report.spec is not None, report.format()
    compile_to(report.spec, tmp_path / "build")
    code = "def f(x):\n    return x + 1\n"
    checks = [f"{exit_}\nassert f(1) == 3" for exit_ in EXITS] + ["assert f(1) == 2"]
    rc, out, _, stderr = run_package(tmp_path / "build", {"code": code, "tl": checks}, None)
    assert rc == 0, stderr
    results = out["outputs"]["listed"]["results"]
    assert [r["passed"] for r in results[:-2]] == [False] * (len(EXITS) - 1)
    assert all("exit" in r["error"].lower() for r in results[:-2])
    # os._exit ends the harness: that snippet and every later one report nothing: failed
    assert results[-2]["passed"] is False and results[-1]["passed"] is False
    assert out["outputs"]["listed"]["passed"] is False
    # the code under test exiting at import fails every test
    for exit_ in EXITS:
        rc, out, _, _ = run_package(
            tmp_path / "build", {"code": f"{exit_}\n{code}", "tl": ["assert f(1) == 2"]}, None
        )
        listed = out["outputs"]["listed"]
        assert listed["passed"] is False and listed["results"][0]["passed"] is False, exit_
    # and a real pass still passes
    rc, out, _, _ = run_package(
        tmp_path / "build", {"code": code, "tl": ["assert f(1) == 2"]}, None
    )
    assert out["outputs"]["listed"]["passed"] is True


def score_code(tmp_path: Path, code: str, test: str, entry_point: str) -> dict[str, Any]:
    """The batch/bench `code` scorer's program, run as the sandbox runs it."""
    package = tmp_path / "scorer"
    package.mkdir(exist_ok=True)
    (package / "main.py").write_text(CODE_SCORER_MAIN, encoding="utf-8")
    req = {"code": code, "test": test, "entry_point": entry_point, "timeout_s": 10}
    (package / "in.json").write_text(json.dumps(req), encoding="utf-8")
    args = ["--input", "in.json", "--output", "out.json", "--trace", "trace.jsonl"]
    subprocess.run([sys.executable, "main.py", *args], cwd=package, check=True, timeout=60)
    out = json.loads((package / "out.json").read_text(encoding="utf-8"))
    assert out["status"] == "ok"
    return dict(out["outputs"])


CHECK = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 5\n"


@pytest.mark.parametrize("exit_", EXITS)
@pytest.mark.parametrize("where", ["function", "module", "test"])
def test_code_scorer_counts_every_exit_as_a_failure(tmp_path: Path, exit_: str, where: str) -> None:
    code = "def add(a, b):\n    return a + b\n"
    test = CHECK
    if where == "function":
        code = f"def add(a, b):\n    {exit_}\n"
    elif where == "module":
        code = f"{code}{exit_}\n"
    else:
        test = f"def check(candidate):\n    {exit_}\n    assert candidate(2, 2) == 5\n"
    outputs = score_code(tmp_path, code, test, "add")
    assert outputs["passed"] is False, outputs
    assert "no pass reported" in outputs["output"]


def test_code_scorer_passes_only_after_every_check(tmp_path: Path) -> None:
    good = "def add(a, b):\n    print('@@mas2c-scored-forged@@')\n    return a + b\n"
    right = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
    assert score_code(tmp_path, good, right, "add")["passed"] is True
    assert score_code(tmp_path, good, CHECK, "add")["passed"] is False


# -- E. only a real null or an empty string is an empty answer ---------------------------------


def test_votes_count_the_text_null_as_an_answer() -> None:
    voting = load_runtime("_voting")
    assert voting.majority(["null", "NULL", "x"]) == "null"
    assert voting.majority(["ANSWER: null", "x", "ANSWER: Null"]) == "ANSWER: null"
    assert voting.majority([{"answer": "null"}, {"answer": "NULL"}, {"answer": "b"}]) == {
        "answer": "null"
    }
    assert voting.majority([{"v": "None"}, {"v": "b"}, {"v": "none"}], key="v") == {"v": "None"}
    assert voting.first_answer(["null", "x"]) == "null"
    assert voting.first_answer([{"answer": None}, {"answer": "null"}]) == {"answer": "null"}
    # what is empty: a JSON null, a missing field, an empty or blank string
    assert voting.majority([None, None, "x"]) == "x"
    assert voting.majority([{"answer": None}, {"answer": None}, {"answer": "b"}]) == {"answer": "b"}
    assert voting.majority([{"other": 1}, {"other": 1}, {"answer": 0}]) == {"answer": 0}
    assert voting.majority(["", "  ", "ANSWER:  ", "y"]) == "y"
    runtime = load_runtime()
    with pytest.raises(runtime.EmptyVote):
        voting.majority([None, "", " ", {"answer": None}, {"x": 1}, "ANSWER: "])


# -- F. scorers: exact numbers, valid groupings, the ANSWER: line -------------------------------


@pytest.mark.parametrize(
    ("prediction", "expected", "score"),
    [
        ("1,2", "12", 0.0),
        ("1,2", "2", 1.0),  # two numbers, the last one counts
        ("1,2345", "12345", 0.0),
        ("12,34,567", "1234567", 0.0),
        ("1,000,0", "10000", 0.0),
        ("1,234,567", "1234567", 1.0),
        ("$3,600.", "3600", 1.0),
        ("9999999999999999", "10000000000000000", 0.0),
        ("12345678901234567890", "12345678901234567891", 0.0),
        (12345678901234567890, "12345678901234567890", 1.0),
        ("100000000000000000001", 100000000000000000000, 0.0),
        ("0.30000000000000004", "0.3", 1.0),
        ("0.3000001", "0.3", 0.0),
        ("ANSWER: 42\n(confidence 90%)", "42", 1.0),
        ({"answer": 7}, "7", 1.0),
    ],
)
def test_numeric_scorer_is_exact(prediction: Any, expected: Any, score: float) -> None:
    assert score_text("numeric", prediction, expected) == score


def test_text_scorers_read_the_answer_line() -> None:
    assert score_text("exact", "Let me think.\nANSWER: Paris", "paris") == 1.0
    assert score_text("exact", "ANSWER: Rome\nANSWER: Paris.", "Paris") == 1.0
    assert score_text("exact", "ANSWER: Rome", "Paris") == 0.0
    assert score_text("exact", "answer : paris", "Paris") == 1.0
    assert (
        score_text("f1", "Step 1 ... ANSWER is below\nANSWER: Eiffel Tower", "Eiffel Tower") == 1.0
    )
    assert score_text("math", "so\nANSWER: \\boxed{\\frac{3}{4}}", "\\frac{3}{4}") == 1.0
    assert parse_exact("12%") == 12 and parse_exact("3/4") == parse_exact("0.75")
