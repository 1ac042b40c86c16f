"""The rectifier (`mas2c rectify`), on the seeded-fault corpus in tests/faults/.

Every fault is run as a real system in the sandbox (local; a few also in Docker)
against the loopback test LLM server, fails (or overspends), and is handed to
`rectify`, whose LLM is the same scripted server. The tests check which faults are
fixed, in how many rounds and with how many rectifier LLM calls (none for the
deterministic classes), and the loop's guarantees: the input spec is untouched,
rounds are bounded, a repeated fix stops the loop, a fix that breaks parsing is
reverted, and a re-run resumes after the unchanged steps (counted in LLM calls).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mas2c import sandbox
from mas2c.compile import compile_spec
from mas2c.lang.validate import load_spec
from mas2c.rectify import (
    Failure,
    FixRejected,
    add_imports,
    apply_json_patch,
    classify,
    diagnose,
    locate,
    read_run,
    rectify,
    replace_functions,
)
from mas2c.run import LLMConfig, run_system
from mas2c.testserver import ChatRequest, LLMTestServer, ReplyLike, default_responder

ROOT = Path(__file__).resolve().parent.parent
FAULTS_DIR = Path(__file__).resolve().parent / "faults"


def _load_corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mas2c_fault_corpus", FAULTS_DIR / "corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus()
FAULTS = {fault.name: fault for fault in corpus.load_faults()}


def _docker_ready() -> None:
    st = sandbox.status()
    problem = None
    if not st["daemon"]["reachable"]:
        problem = st["daemon"]["error"]
    elif not st["image"]["present"]:
        problem = f"the sandbox image {sandbox.DEFAULT_IMAGE} is missing"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Docker is required under CI: {problem}")
        pytest.skip(f"Docker not available: {problem}")


def _cases() -> list[Any]:
    cases = []
    for name, fault in FAULTS.items():
        for backend in fault.backends:
            marks = [pytest.mark.docker] if backend == "docker" else []
            cases.append(pytest.param(name, backend, id=f"{name}-{backend}", marks=marks))
    return cases


@pytest.fixture
def server() -> Iterator[LLMTestServer]:
    with LLMTestServer() as srv:
        yield srv


def read_json(path: Path) -> Any:
    return json.loads(path.read_text("utf-8"))


# -- the corpus --------------------------------------------------------------------------------------


def test_the_corpus_covers_the_classes() -> None:
    assert len(FAULTS) >= 12
    classes = {fault.data["class"].split(" (")[0] for fault in FAULTS.values()}
    for wanted in (
        "missing import",
        "structured-output parse failure",
        "ensemble vote with no answer",
        "step timeout",
        "budget overrun",
        "logic bug in tool code",
        "wrong reference",
    ):
        assert wanted in classes, wanted
    for fault in FAULTS.values():  # every seeded spec is valid: the faults show at run time
        load_spec(fault.spec)


@pytest.mark.parametrize(("name", "backend"), _cases())
def test_fault_is_rectified_as_expected(
    name: str, backend: str, server: LLMTestServer, tmp_path: Path
) -> None:
    if backend == "docker":
        _docker_ready()
    fault = FAULTS[name]
    expect = fault.expect
    result = corpus.run_fault(fault, tmp_path, server, backend)
    outcome = result.outcome
    if expect.get("original_status"):
        assert result.original_status == expect["original_status"]
    else:
        assert result.original_status != "ok", "the seeded fault did not show"
    assert result.fixed == expect["fixed"], outcome.stop_reason
    assert outcome.rounds_run == expect["rounds"]
    assert outcome.rounds_run <= 3
    assert outcome.llm_calls == expect["rectifier_llm_calls"] == result.rectifier_requests
    assert result.fixes == expect["fixes"]
    if expect["rectifier_llm_calls"] == 0:  # deterministic classes: no LLM call for the fix
        assert all(r.fix is not None and r.fix.deterministic for r in outcome.rounds)
    if "outputs" in expect:
        assert outcome.final_run is not None
        assert outcome.final_run.result["outputs"] == expect["outputs"]
    if "resumed" in expect:
        assert outcome.rounds[-1].resumed_steps == expect["resumed"]
    if "system_calls_last_round" in expect:
        assert result.system_calls[-1] == expect["system_calls_last_round"]
    if "reverted" in expect:
        assert result.reverted == expect["reverted"]
    if "stop" in expect:
        assert expect["stop"] in outcome.stop_reason
    # every round that ran is kept whole
    rectify_dir = tmp_path / "run" / "rectify"
    assert read_json(rectify_dir / "summary.json")["status"] == outcome.status
    for round_ in outcome.rounds:
        notes = read_json(round_.folder / "notes.json")
        assert notes["round"] == round_.number and notes["outcome"] == round_.outcome
        if round_.ran:
            for part in ("spec.yaml", "patch.diff", "build/MANIFEST.json", "run/result.json"):
                assert (round_.folder / part).exists(), part
            assert (round_.folder / "patch.diff").read_text().startswith("--- ")
            load_spec(round_.folder / "spec.yaml")


# -- the loop's guarantees -------------------------------------------------------------------------


def test_input_spec_untouched_and_write_beside_it(server: LLMTestServer, tmp_path: Path) -> None:
    fault = FAULTS["missing-import-re"]
    spec_path = tmp_path / "system.yaml"
    spec_path.write_bytes(fault.spec.read_bytes())
    before = (spec_path.read_bytes(), spec_path.stat().st_mtime_ns)
    server.responder = default_responder
    llm = LLMConfig(url=server.base_url, api_key="test")
    run_dir = tmp_path / "run"
    run_system(
        spec_path, fault.input, run_dir, backend="unisolated", llm=llm, on_warning=lambda _m: None
    )
    outcome = rectify(run_dir, spec_path=spec_path, write=True, llm=llm, backend="unisolated")
    assert outcome.status == "fixed"
    assert (spec_path.read_bytes(), spec_path.stat().st_mtime_ns) == before
    written = tmp_path / "system.rectified.yaml"
    assert outcome.written == written
    assert load_spec(written) == outcome.final_spec
    assert "import re" in (load_spec(written).tools["word_stats"].code or "")
    assert written.read_text() == (outcome.rounds[-1].folder / "spec.yaml").read_text()


def test_write_never_overwrites_a_file_and_a_second_rectify_keeps_the_first(
    server: LLMTestServer, tmp_path: Path
) -> None:
    """Issue 13: `--write` refuses an existing <stem>.rectified.yaml (before any round, so
    nothing is spent) unless forced; a second rectify of a run folder moves the first one's
    rounds to rectify.1/ instead of deleting them."""
    from mas2c.cli import main

    fault = FAULTS["missing-import-re"]
    spec_path = tmp_path / "system.yaml"
    spec_path.write_bytes(fault.spec.read_bytes())
    mine = tmp_path / "system.rectified.yaml"
    mine.write_text("# my own edits\n")
    server.responder = default_responder
    llm = LLMConfig(url=server.base_url, api_key="test")
    run_dir = tmp_path / "run"
    run_system(
        spec_path, fault.input, run_dir, backend="unisolated", llm=llm, on_warning=lambda _m: None
    )
    argv = ["rectify", str(run_dir), "--spec", str(spec_path), "--write", "--no-llm"]
    argv += ["--sandbox", "unisolated", "--llm", server.base_url, "--json"]
    assert main(argv) == 2  # output_refused
    assert mine.read_text() == "# my own edits\n" and not (run_dir / "rectify").exists()
    assert main([*argv, "--force"]) == 0
    assert "import re" in mine.read_text()
    first = sorted(p.name for p in (run_dir / "rectify").iterdir())
    assert main([*argv, "--force"]) == 0
    assert sorted(p.name for p in (run_dir / "rectify.1").iterdir()) == first
    assert (run_dir / "rectify" / "summary.json").is_file()
    # the run folder, with both attempts and no --spec rectified file, is still reusable
    again = run_system(
        spec_path, fault.input, run_dir, backend="unisolated", llm=llm, on_warning=lambda _m: None
    )
    assert (run_dir / "rectify.1").is_dir() and again.run_dir == run_dir


def test_without_write_nothing_is_written_beside_the_spec(
    server: LLMTestServer, tmp_path: Path
) -> None:
    fault = FAULTS["missing-import-from-math"]
    spec_path = tmp_path / "system.yaml"
    spec_path.write_bytes(fault.spec.read_bytes())
    llm = LLMConfig(url=server.base_url, api_key="test")
    run_system(spec_path, fault.input, tmp_path / "run", backend="unisolated", llm=llm)
    outcome = rectify(tmp_path / "run", spec_path=spec_path, llm=llm, backend="unisolated")
    assert outcome.status == "fixed" and outcome.written is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "system.yaml"]


def test_rounds_are_bounded(server: LLMTestServer, tmp_path: Path) -> None:
    # This fault needs two rounds (format reminder, then text output); one is allowed.
    result = corpus.run_fault(FAULTS["structured-output-relax"], tmp_path, server, max_rounds=1)
    outcome = result.outcome
    assert outcome.status == "not_fixed" and outcome.rounds_run == 1
    assert outcome.stop_reason == "not fixed within 1 round(s)"
    assert sorted(p.name for p in (tmp_path / "run" / "rectify").iterdir()) == [
        "round-1",
        "summary.json",
    ]


def test_the_same_error_twice_stops_the_loop(server: LLMTestServer, tmp_path: Path) -> None:
    # Two different wrong fixes in a row, both leaving the same error: stop after two rounds.
    fault = FAULTS["tool-logic-bug-llm"]
    wrong = [
        "```python\ndef average(numbers: str) -> float:\n"
        f"    values = [float(x) for x in numbers.split(',')]{suffix}\n"
        "    return sum(values) / len(values)\n```"
        for suffix in ("  # one", "  # two", "  # three")
    ]
    fault = corpus.Fault(
        fault.name, fault.folder, {**fault.data, "llm": [{"rectifier": True, "answers": wrong}]}
    )
    result = corpus.run_fault(fault, tmp_path, server, max_rounds=5)
    outcome = result.outcome
    assert outcome.status == "not_fixed"
    assert outcome.rounds_run == 2 and outcome.llm_calls == 2
    assert outcome.stop_reason.startswith("no progress")
    history = read_json(tmp_path / "run" / "rectify" / "summary.json")["history"]
    assert [h["run"]["error"]["type"] for h in history] == ["ToolError", "ToolError"]


def test_a_repeated_patch_stops_the_loop(server: LLMTestServer, tmp_path: Path) -> None:
    result = corpus.run_fault(FAULTS["repeated-patch-stops"], tmp_path, server)
    outcome = result.outcome
    assert [r.outcome for r in outcome.rounds] == ["failed", "repeated"]
    assert outcome.rounds[1].run is None  # the repeat was not run again
    assert not (outcome.rounds[1].folder / "run").exists()
    attempts = outcome.rounds[1].llm_attempts
    assert len(attempts) == 2 and all("repeats" in a["outcome"] for a in attempts)
    # the second request told the LLM about the first attempt and why it was rejected
    last = [r for r in server.requests if corpus.RECTIFIER_MARK in r.system][-1]
    assert "Earlier attempts" in last.last_user and "round 1: llm_code" in last.last_user
    assert "Your previous answer was rejected" in last.last_user


def test_a_fix_that_breaks_parsing_is_reverted(server: LLMTestServer, tmp_path: Path) -> None:
    result = corpus.run_fault(FAULTS["broken-python-reverted"], tmp_path, server)
    round_ = result.outcome.rounds[0]
    first, second = round_.llm_attempts
    assert first["outcome"].startswith("reverted: the python block does not parse")
    assert second["outcome"] == "applied"
    # the broken code never reached a spec: every spec written parses and validates
    code = load_spec(round_.folder / "spec.yaml").tools["average"].code or ""
    assert "if x.strip()" in code and "x.strip(]" not in code
    requests = [r for r in server.requests if corpus.RECTIFIER_MARK in r.system]
    assert "does not parse" in requests[1].last_user


def test_a_patch_that_adds_validation_errors_is_rejected() -> None:
    spec = load_spec(FAULTS["wrong-reference-json-patch"].spec)
    with pytest.raises(FixRejected, match="MAS201"):
        apply_json_patch(spec, [{"op": "replace", "path": "/workflow/0/agent", "value": "nobody"}])
    with pytest.raises(FixRejected, match="does not apply"):
        apply_json_patch(spec, [{"op": "remove", "path": "/agents/ghost"}])
    with pytest.raises(FixRejected, match="budgets"):
        apply_json_patch(spec, [{"op": "add", "path": "/budgets/max_llm_calls", "value": 99}])
    fixed = apply_json_patch(spec, [{"op": "replace", "path": "/outputs/answer", "value": "draft"}])
    assert fixed.outputs == {"answer": "draft"}
    assert spec.outputs == {"answer": "drafts.2"}  # the original is never changed


PRICED = """\
spec_version: "1"
name: priced
inputs: {q: {type: string}}
outputs: {a: a}
models:
  m: {model: m-1, price: {input_per_mtok: 1.0, output_per_mtok: 2.0}}
  free: {model: m-2}
agents:
  solver: {role: r, instructions: "{{ q }}", model: m}
workflow:
  - {kind: call, id: s, agent: solver, prompt: "{{ q }}", out: a}
budgets: {max_cost_usd: 1.0}
"""


@pytest.mark.parametrize(
    ("patch", "what"),
    [
        ([{"op": "remove", "path": "/models/m/price"}], "removes the price of model `m`"),
        (
            [{"op": "replace", "path": "/models/m/price/output_per_mtok", "value": 0}],
            "lowers the price of model `m`",
        ),
        ([{"op": "replace", "path": "/models/m/price", "value": {}}], "lowers the price"),
        ([{"op": "replace", "path": "/agents/solver/model", "value": "free"}], "no price"),
        (
            [{"op": "move", "from": "/models/free", "path": "/models/m"}],
            "removes the price of model `m`",
        ),
    ],
)
def test_a_fix_may_not_weaken_what_the_cost_budget_counts(
    patch: list[dict[str, Any]], what: str, tmp_path: Path
) -> None:
    """Budgets unchanged is not enough: a model without a price costs $0 against
    max_cost_usd, so dropping or lowering prices is a budget raise too."""
    path = tmp_path / "priced.yaml"
    path.write_text(PRICED)
    spec = load_spec(path)
    with pytest.raises(FixRejected, match=re.escape(what)):
        apply_json_patch(spec, patch)
    raised = apply_json_patch(spec, patch, allow_budgets=True)
    assert raised is not None
    # a higher price, or a move to another priced model, is no weakening
    apply_json_patch(
        spec, [{"op": "replace", "path": "/models/m/price/input_per_mtok", "value": 3}]
    )


def test_resume_skips_unchanged_steps(server: LLMTestServer, tmp_path: Path) -> None:
    fault = FAULTS["missing-import-json-resume"]
    result = corpus.run_fault(fault, tmp_path / "resumed", server)
    assert result.fixed and result.system_calls == [1, 0]  # the answer step is not re-run
    round_ = result.outcome.rounds[0]
    assert round_.resumed_steps == ["solve"] and round_.checkpoints_offered == 1
    assert len(list((round_.folder / "build" / "checkpoints").glob("*.json"))) == 1
    trace = [json.loads(line) for line in (round_.folder / "run" / "trace.jsonl").open()]
    assert [e["step"] for e in trace if e["event"] == "step_resumed"] == ["solve"]
    assert [e["step"] for e in trace if e["event"] == "step_start"] == ["pack_it"]
    assert not [e for e in trace if e["event"] == "llm_call"]
    # the same repair without resume asks the LLM again
    again = corpus.run_fault(fault, tmp_path / "fresh", server, resume=False)
    assert again.fixed and again.system_calls == [1, 1]
    assert again.outcome.rounds[0].resumed_steps == []
    assert again.outcome.final_run.result["outputs"] == result.outcome.final_run.result["outputs"]


def test_a_changed_agent_is_not_resumed(server: LLMTestServer, tmp_path: Path) -> None:
    # The fix changes the first step's agent: its checkpoint no longer matches.
    result = corpus.run_fault(FAULTS["prompt-fix-json-patch"], tmp_path, server)
    assert result.fixed and result.system_calls == [1, 1]
    assert result.outcome.rounds[0].resumed_steps == []


def test_a_successful_run_needs_nothing(server: LLMTestServer, tmp_path: Path) -> None:
    llm = LLMConfig(url=server.base_url, api_key="test")
    run_system(
        ROOT / "specs" / "chain-of-thought.yaml",
        _input(tmp_path),
        tmp_path / "run",
        backend="unisolated",
        llm=llm,
    )
    outcome = rectify(tmp_path / "run", llm=llm, backend="unisolated")
    assert outcome.status == "nothing_to_do" and outcome.ok and outcome.rounds == []
    assert read_json(tmp_path / "run" / "rectify" / "summary.json")["status"] == "nothing_to_do"


def _input(folder: Path) -> Path:
    path = folder / "in.json"
    path.write_text(json.dumps({"question": "What is 6 x 7?"}))
    return path


# -- the command line ------------------------------------------------------------------------------


def test_cli_rectify(server: LLMTestServer, tmp_path: Path) -> None:
    fault = FAULTS["missing-import-re"]
    llm = LLMConfig(url=server.base_url, api_key="test")
    run_dir = tmp_path / "run"
    run_system(fault.spec, fault.input, run_dir, backend="unisolated", llm=llm)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c.cli", "rectify", str(run_dir), "--sandbox", "unisolated",
         "--llm", server.base_url, "--no-llm", "--json", "--write"],
        capture_output=True, text=True, env={**env, "OPENAI_API_KEY": "test"}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "fixed" and data["rounds"] == 1 and data["rectifier_llm_calls"] == 0
    assert data["answer"]["words"] == 9
    assert data["written"] == str(run_dir / "fault-missing-import-re.rectified.yaml")
    assert "Traceback" not in proc.stderr

    usage = subprocess.run(
        [sys.executable, "-m", "mas2c.cli", "rectify", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert usage.returncode == 2 and "no such file" in usage.stderr
    not_a_run = subprocess.run(
        [sys.executable, "-m", "mas2c.cli", "rectify", str(tmp_path), "--sandbox", "unisolated"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert not_a_run.returncode == 1 and "not a run folder" in not_a_run.stderr
    assert "Traceback" not in not_a_run.stderr


# -- solve: a failing first system ends rectified ------------------------------------------------


def test_solve_rectifies_a_failing_first_run(server: LLMTestServer, tmp_path: Path) -> None:
    from mas2c.lang.validate import load_spec as load
    from mas2c.solve import solve

    generated = load(FAULTS["missing-import-re"].spec).to_data()

    def respond(req: ChatRequest) -> ReplyLike:
        schema_name = req.response_format.get("json_schema", {}).get("name")
        if schema_name == "mas2c_spec":
            return generated
        return default_responder(req)

    server.responder = respond
    input_path = tmp_path / "in.json"
    input_path.write_text(json.dumps({"text": "One two three."}))
    outcome = solve(
        "Count the words of a text and summarize it.",
        input_path,
        tmp_path / "solve",
        llm=LLMConfig(url=server.base_url, api_key="test"),
        backend="unisolated",
    )
    assert outcome.status == "ok" and outcome.answer is not None
    assert outcome.answer["words"] == 3
    summary = read_json(tmp_path / "solve" / "summary.json")
    assert summary["rectify"]["status"] == "fixed" and summary["rectify"]["rounds"] == 1
    assert [p["name"] for p in summary["phases"]] == [
        "generate",
        "configure",
        "compile+run",
        "rectify",
    ]
    assert (tmp_path / "solve" / "run-1" / "rectify" / "round-1" / "run" / "result.json").is_file()
    assert "import re" in (
        load(tmp_path / "solve" / "spec.rectified.yaml").tools["word_stats"].code or ""
    )
    assert "Rectify: **fixed**" in (tmp_path / "solve" / "report.md").read_text()


# -- units: libcst edits, classification, locating -------------------------------------------------


def test_add_imports_and_replace_functions() -> None:
    code = 'def f(text: str) -> list:\n    """Words."""\n    return re.findall(r"\\w+", text)\n'
    assert add_imports(code, [("re", None)]).startswith("import re\n")
    assert "from math import sqrt" in add_imports(
        "def g(x):\n    return sqrt(x)\n", [("math", "sqrt")]
    )
    new, names = replace_functions(
        "import os\n\n\ndef helper(x):\n    return x\n\n\ndef f(x):\n    return helper(x) + 1\n",
        "import json\n\ndef f(x):\n    return json.dumps(helper(x))\n\ndef extra():\n    return 0\n",
    )
    assert names == ["f", "extra"]
    assert new.startswith("import os\nimport json\n") or new.startswith("import json\nimport os\n")
    assert "def helper(x):\n    return x" in new and "json.dumps(helper(x))" in new
    assert "return helper(x) + 1" not in new and new.rstrip().endswith("return 0")
    with pytest.raises(FixRejected, match="does not parse"):
        replace_functions("def f():\n    pass\n", "def f(:\n")
    with pytest.raises(FixRejected, match="no function"):
        replace_functions("def f():\n    pass\n", "x = 1\n")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("tool_error", "tool_error"),
        ("structured_output", "structured_output"),
        ("empty_vote", "empty_vote"),
        ("step_timeout", "timeout"),
        ("run_timeout", "timeout"),
        ("tool_timeout", "tool_timeout"),
        ("budget_calls", "budget"),
        ("budget_cost", "budget"),
        ("sandbox_timeout", "sandbox_timeout"),
        ("bad_input", "bad_input"),
        ("llm_error", "llm_endpoint"),
        ("internal", "logic"),
    ],
)
def test_classify_dispatches_on_the_code_alone(code: str, kind: str) -> None:
    # The message and type say something else entirely: only the code counts.
    for message in ("every sample was empty", "timed out after 3 s", "NameError: name 're'"):
        assert classify(Failure("error", "WorkflowError", message, code=code)) == kind


@pytest.mark.parametrize(
    ("error", "code", "limit"),
    [
        # folders written before codes: the exact type name (and a budget's pointer) decide
        ({"type": "StepTimeout", "spec_pointer": "/workflow/0"}, "step_timeout", None),
        ({"type": "StepTimeout", "spec_pointer": "/budgets/timeout_s"}, "run_timeout", None),
        (
            {"type": "BudgetExceeded", "spec_pointer": "/budgets/max_cost_usd"},
            "budget_cost",
            "max_cost_usd",
        ),
        ({"type": "ToolError", "message": "tool 'x' timed out after 0.5 s"}, "tool_error", None),
        (
            {"type": "WorkflowError", "message": "ensemble: every sample was empty"},
            "internal",
            None,
        ),
        ({"type": "Timeout"}, "sandbox_timeout", None),
        # a code always wins over the type
        ({"type": "WorkflowError", "code": "empty_vote"}, "empty_vote", None),
        ({"type": "ToolError", "code": "tool_timeout"}, "tool_timeout", None),
        ({"type": "BudgetExceeded", "code": "budget_tokens"}, "budget_tokens", "max_total_tokens"),
    ],
)
def test_codes_of_old_and_new_folders(
    tmp_path: Path, error: dict[str, Any], code: str, limit: str | None
) -> None:
    (tmp_path / "result.json").write_text(json.dumps({"status": "error", "error": error}))
    failure = diagnose(read_run(tmp_path))
    assert failure is not None and failure.code == code and failure.limit == limit


def test_locate_a_tool_line_from_the_traceback_and_source_map(tmp_path: Path) -> None:
    spec = load_spec(FAULTS["tool-logic-bug-llm"].spec)
    build = compile_spec(spec)
    entry = next(e for e in build.manifest["source_map"] if e["pointer"] == "/tools/average/code")
    traceback = (
        "Traceback (most recent call last):\n"
        f'  File "/work/pkg/{entry["file"]}", line {entry["start"] + 1}, in average\n'
        "ValueError: could not convert string to float: ''\n"
    )
    failure = Failure(
        "error",
        "ToolError",
        "tool 'average' raised ValueError",
        traceback=traceback,
        code="tool_error",
    )
    locus = locate(failure, spec, build)
    assert locus.pointer == "/tools/average/code" and locus.element == "tool_code"
    assert locus.tool == "average" and locus.tool_line == 2
    assert any("float(x)" in g["code"] for g in locus.generated)
    # with the runtime's own pointer, the step is found by its id
    failure = Failure(
        "error",
        "ToolError",
        "boom",
        pointer="/tools/average/code",
        line=2,
        step="compute",
        code="tool_error",
    )
    locus = locate(failure, spec, build)
    assert locus.step_pointer == "/workflow/1" and locus.step_id == "compute"


def test_diagnose_thresholds(tmp_path: Path) -> None:
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok", "outputs": {}}))
    (tmp_path / "usage.json").write_text(json.dumps({"calls": 7, "cost_usd": 0.5}))
    record = read_run(tmp_path)
    assert diagnose(record) is None
    assert diagnose(record, max_calls=7) is None
    over = diagnose(record, max_calls=6)
    assert over is not None and over.kind == "overspend" and "max_llm_calls" in over.message
    over = diagnose(record, max_cost=0.1)
    assert over is not None and "max_cost_usd" in over.message


# -- the runtime's side: vote: first, checkpoints ----------------------------------------------------


def test_runtime_vote_first() -> None:
    from conftest import load_runtime

    runtime = load_runtime("_voting")
    first = runtime.first_answer
    assert first(["thinking...\nANSWER:", "so\nANSWER: 4", "ANSWER: 5"]) == "so\nANSWER: 4"
    assert first(["no final line\nANSWER:", "  "]) == "no final line\nANSWER:"
    assert first(["", None]) == ""
    assert first([{"answer": ""}, {"answer": "b"}]) == {"answer": "b"}
    with pytest.raises(load_runtime().WorkflowError, match="every sample was empty"):
        runtime.majority(["ANSWER:", ""], "ensemble")


def test_runtime_checkpoint_dir(server: LLMTestServer, tmp_path: Path) -> None:
    from conftest import run_package  # the suite's way to run a compiled package directly

    spec = load_spec(FAULTS["tool-logic-bug-llm"].spec)
    build = tmp_path / "build"
    compile_spec(spec).write(build)
    folder = tmp_path / "checkpoints"
    env: dict[str, str | None] = {"MAS2C_CHECKPOINT_DIR": str(folder)}
    code, out, trace, _err = run_package(build, {"numbers": "1, 2"}, server, env=env)
    assert code == 0 and len(server.requests) == 1
    saved = sorted(folder.glob("*.json"))
    assert len(saved) == 2  # both top-level steps completed
    assert {read_json(p)["step"] for p in saved} == {"explain_task", "compute"}
    code, again, trace, _err = run_package(build, {"numbers": "1, 2"}, server, env=env)
    assert code == 0 and len(server.requests) == 1  # nothing asked again
    assert again["outputs"] == out["outputs"]
    assert [e["step"] for e in trace if e["event"] == "step_resumed"] == ["explain_task", "compute"]
    # another input: the first step's state differs, so nothing matches
    code, _out, trace, _err = run_package(build, {"numbers": "3, 4"}, server, env=env)
    assert code == 0 and len(server.requests) == 2
    assert not [e for e in trace if e["event"] == "step_resumed"]


def test_enclosing_step_asks_the_registry_where_steps_nest() -> None:
    """Pointers inside map steps, fallbacks, branches and flows find their innermost step
    through the step kinds' child lists (no child-list key is spelled in rectify)."""
    from conftest import example_spec

    from mas2c.lang.spec import iter_spec_steps
    from mas2c.rectify import _enclosing_step

    for name in (
        "map-reduce",
        "multi-hop-qa",
        "router-fallback",
        "router",
        "math-program-ensemble",
    ):
        spec = example_spec(name)
        pointers = [pointer for pointer, _step in iter_spec_steps(spec)]
        for pointer in pointers:
            assert _enclosing_step(spec, pointer) == pointer
            assert _enclosing_step(spec, pointer + "/prompt") == pointer
        nested = [p for p in pointers if p.count("/") > 2]
        assert nested, name  # each of these examples nests steps
    assert _enclosing_step(example_spec("router"), "/agents/x") is None
