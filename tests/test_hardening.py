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
from conftest import compile_to, run_package

from mas2c.batch import CODE_SCORER_MAIN
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
