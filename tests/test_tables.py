"""The compiler hands the runtime its facts as data (`_tables.py`), and the runtime uses them.

- Checkpoint keys hash what a step reads (from the registry's facts), not the whole state:
  changing an input that one step does not read leaves that step resumable.
- Tool-code line offsets come from TOOL_CODE, not from re-reading tools.py.
- The runtime has no code that parses its package (`# spec:` comments, ast, its own hash).
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT, example_spec, run_package

from mas2c.compile import compile_spec, step_reads
from mas2c.lang.spec import Spec
from mas2c.testserver import LLMTestServer

TWO_READERS = {
    "spec_version": "1",
    "name": "two-readers",
    "inputs": {"a": {"type": "string"}, "b": {"type": "string"}},
    "outputs": {"x": "x", "y": "y"},
    "models": {"m": {"model": "test-model"}},
    "agents": {"w": {"role": "Worker", "model": "m"}},
    "workflow": [
        {"id": "first", "kind": "call", "agent": "w", "prompt": "A: {{ a }}", "out": "x"},
        {"id": "second", "kind": "call", "agent": "w", "prompt": "B: {{ b }}", "out": "y"},
    ],
}


def test_reads_come_from_the_registry() -> None:
    spec = example_spec("tool-pipeline")
    assert [sorted(step_reads(step)) for step in spec.workflow] == [
        ["text"],
        ["audience", "before", "target_grade", "text"],
        ["rewrite"],
    ]
    branch = example_spec("reflexion").workflow[2]  # a branch holding a loop
    assert "review" in step_reads(branch)  # the nested loop's `until: review.passed`


def test_checkpoint_key_hashes_only_what_a_step_reads(tmp_path: Path) -> None:
    build = tmp_path / "build"
    compile_spec(Spec.model_validate(TWO_READERS)).write(build)
    tables = (build / "mas2c_two_readers" / "_tables.py").read_text()
    assert 'reads=["a"]' in tables and 'reads=["b"]' in tables
    env: dict[str, str | None] = {"MAS2C_CHECKPOINT_DIR": str(tmp_path / "cp")}
    with LLMTestServer() as server:
        code, _out, _trace, err = run_package(build, {"a": "1", "b": "2"}, server, env=env)
        assert code == 0, err
        assert len(server.requests) == 2
        # `b` changes: `first` does not read it and is resumed; `second` runs again
        code, _out, trace, err = run_package(build, {"a": "1", "b": "3"}, server, env=env)
        assert code == 0, err
        assert len(server.requests) == 3
        assert [e["step"] for e in trace if e["event"] == "step_resumed"] == ["first"]
        assert [e["step"] for e in trace if e["event"] == "step_start"] == ["second"]


def test_tool_code_table_points_at_the_verbatim_code() -> None:
    build = compile_spec(example_spec("tool-pipeline"))
    tables = build.files["mas2c_tool_pipeline/_tables.py"].decode()
    match = re.search(r'"text_stats": ToolCode\(pointer="(.*?)", start=(\d+), end=(\d+)\)', tables)
    assert match is not None
    pointer, start, end = match.group(1), int(match.group(2)), int(match.group(3))
    tools = build.files["mas2c_tool_pipeline/tool_text_stats.py"].decode().splitlines()
    code = example_spec("tool-pipeline").tools["text_stats"].code or ""
    assert pointer == "/tools/text_stats/code"
    assert tools[start - 1 : end] == code.rstrip("\n").splitlines()


def test_the_runtime_does_not_parse_its_own_package() -> None:
    runtime = "\n".join(p.read_text() for p in (ROOT / "templates").glob("_*.py"))
    for needle in ("import ast", "import inspect", "# spec: ", "__file__).read_text", "getsource"):
        assert needle not in runtime, needle
