"""`mas2c diff`: specs compared semantically, builds file by file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from mas2c.compile import compile_spec
from mas2c.diff import (
    Change,
    changes_json,
    diff_builds,
    diff_paths,
    diff_specs,
    format_changes,
    line_diff,
    word_diff,
)
from mas2c.lang.spec import Spec
from mas2c.lang.validate import validate_text

BASE = """\
spec_version: "1"
name: mini
description: A solver drafts, a critic checks, the solver revises until accepted.
inputs:
  question: {type: string}
outputs:
  answer: final
models:
  cheap: {model: gpt-4o-mini, temperature: 0.2}
agents:
  solver:
    role: Mathematician
    instructions: Solve the problem step by step and end with the answer.
    model: cheap
    tools: [normalize]
  critic:
    role: Critic
    instructions: Say ACCEPT when the answer is right.
    model: cheap
tools:
  normalize:
    description: Strip spaces and a trailing period.
    code: |
      def normalize(text: str) -> str:
          cleaned = text.strip()
          return cleaned.rstrip(".")
workflow:
  - {id: draft, kind: call, agent: solver, prompt: "Solve: {{ question }}", out: final}
  - id: refine
    kind: loop
    max_iterations: 3
    until: "'ACCEPT' in review"
    steps:
      - {id: review, kind: call, agent: critic, prompt: "Check: {{ final }}", out: review}
      - {id: revise, kind: call, agent: solver, prompt: "Revise: {{ final }} given {{ review }}", out: final}
  - {id: tidy, kind: tool, tool: normalize, args: {text: "{{ final }}"}, out: final}
budgets: {max_llm_calls: 10}
"""


def _data() -> dict[str, Any]:
    data = yaml.safe_load(BASE)
    assert isinstance(data, dict)
    return data


def _spec(text: str) -> Spec:
    report = validate_text(text)
    assert report.ok and report.spec is not None, report.format()
    return report.spec


def _dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _by_pointer(changes: list[Change]) -> dict[str, Change]:
    return {change.pointer: change for change in changes}


def _step(data: dict[str, Any], step_id: str) -> dict[str, Any]:
    stack = list(data["workflow"])
    while stack:
        step = stack.pop()
        if step["id"] == step_id:
            assert isinstance(step, dict)
            return step
        stack.extend(step.get("steps", []))
    raise KeyError(step_id)


# -- specs ----------------------------------------------------------------------------------


def test_same_spec_written_differently_has_no_changes(tmp_path: Path) -> None:
    data = _data()
    reordered = dict(reversed(list(data.items())))
    reordered["agents"] = dict(reversed(list(data["agents"].items())))
    reordered["budgets"] = {"max_llm_calls": 10, "timeout_s": None}  # None = omitted
    _step(reordered, "refine")["max_iterations"] = 3
    variants = [
        BASE,
        json.dumps(data, indent=1),  # JSON
        yaml.safe_dump(reordered, default_flow_style=True, sort_keys=True),  # flow YAML
        yaml.safe_dump(data, default_flow_style=False, sort_keys=True),  # block YAML
    ]
    base = _spec(BASE)
    for text in variants:
        assert diff_specs(base, _spec(text)) == []
    a = _write(tmp_path / "a.yaml", BASE)
    b = _write(tmp_path / "b.json", json.dumps(data))
    text, different, changes = diff_paths(a, b)
    assert (text, different, changes) == ("no differences", False, [])


def test_explicit_defaults_equal_omitted_ones() -> None:
    data = _data()
    data["agents"]["critic"]["output"] = "text"
    data["agents"]["critic"]["tools"] = []
    data["agents"]["critic"]["max_tool_rounds"] = 5
    data["tools"]["normalize"]["timeout_s"] = 10
    assert diff_specs(_spec(BASE), _spec(_dump(data))) == []


def test_agent_added_and_removed() -> None:
    data = _data()
    data["agents"]["checker"] = data["agents"].pop("critic")
    _step(data, "review")["agent"] = "checker"
    changes = diff_specs(_spec(BASE), _spec(_dump(data)))
    by = _by_pointer(changes)
    assert by["/agents/critic"].kind == "removed"
    assert by["/agents/critic"].before["role"] == "Critic"
    assert by["/agents/checker"].kind == "added"
    assert by["/agents/checker"].after["instructions"] == "Say ACCEPT when the answer is right."
    step = by["/workflow/review/agent"]
    assert (step.kind, step.before, step.after) == ("changed", "critic", "checker")
    assert step.detail == "[-critic-] {+checker+}"
    text = format_changes(changes)
    assert "agents:\n  + /agents/checker" in text or "  + /agents/checker:" in text
    assert "  - /agents/critic:" in text
    assert text.index("agents:") < text.index("workflow:")


def test_instruction_word_change_shows_the_word() -> None:
    data = _data()
    data["agents"]["solver"]["instructions"] = (
        "Solve the task step by step and end with the answer."
    )
    changes = diff_specs(_spec(BASE), _spec(_dump(data)))
    assert len(changes) == 1
    change = changes[0]
    assert change.pointer == "/agents/solver/instructions"
    assert change.kind == "changed"
    assert change.detail == "Solve the [-problem-] {+task+} step by step and end with the answer."
    assert "~ /agents/solver/instructions: Solve the [-problem-] {+task+}" in format_changes(
        changes
    )


def test_prompt_and_role_changes_word_by_word() -> None:
    data = _data()
    _step(data, "draft")["prompt"] = "Solve carefully: {{ question }}"
    data["agents"]["critic"]["role"] = "Strict critic"
    by = _by_pointer(diff_specs(_spec(BASE), _spec(_dump(data))))
    assert by["/workflow/draft/prompt"].detail == "[-Solve:-] {+Solve carefully:+} {{ question }}"
    assert by["/agents/critic/role"].detail == "[-Critic-] {+Strict critic+}"


def test_word_diff_elides_long_unchanged_runs() -> None:
    words = [f"w{i}" for i in range(40)]
    changed = [*words[:20], "NEW", *words[21:]]
    detail = word_diff(" ".join(words), " ".join(changed))
    assert detail == "… w14 w15 w16 w17 w18 w19 [-w20-] {+NEW+} w21 w22 w23 w24 w25 w26 …"
    assert word_diff("a  b\nc", "a b c") == "(whitespace only)"


def test_top_level_step_reordered_is_one_move() -> None:
    data = _data()
    # `refine` must not read `draft`'s output, so that either order is valid
    _step(data, "review")["prompt"] = "Check: {{ question }}"
    _step(data, "revise")["prompt"] = "Revise: {{ question }} given {{ review }}"
    spec_a = _spec(_dump(data))
    data["workflow"] = [data["workflow"][1], data["workflow"][0], data["workflow"][2]]
    changes = diff_specs(spec_a, _spec(_dump(data)))
    assert len(changes) == 1
    move = changes[0]
    assert move.kind == "changed"
    # the longest common order is kept; one of the two swapped steps is the mover
    assert (move.pointer, move.detail) in {
        ("/workflow/draft", "moved from /workflow/0 to /workflow/1"),
        ("/workflow/refine", "moved from /workflow/1 to /workflow/0"),
    }


def test_step_moved_to_the_end_and_into_a_loop() -> None:
    data = _data()
    tidy = data["workflow"].pop()
    _step(data, "refine")["steps"].append(tidy)
    changes = diff_specs(_spec(BASE), _spec(_dump(data)))
    assert changes == [
        Change(
            "changed",
            "/workflow/tidy",
            "/workflow/2",
            "/workflow/1/steps/2",
            "moved from /workflow/2 to /workflow/1/steps/2",
        )
    ]
    assert "moved from /workflow/2 to /workflow/1/steps/2" in format_changes(changes)


def test_inserting_a_step_does_not_move_the_others() -> None:
    data = _data()
    data["workflow"].insert(
        1, {"id": "extra", "kind": "call", "agent": "critic", "prompt": "Hm: {{ final }}"}
    )
    changes = diff_specs(_spec(BASE), _spec(_dump(data)))
    assert [(c.kind, c.pointer, c.detail) for c in changes] == [
        ("added", "/workflow/extra", "at /workflow/1")
    ]
    assert changes[0].after["agent"] == "critic"


def test_step_removed_and_nested_step_ids_in_pointers() -> None:
    data = _data()
    loop = _step(data, "refine")
    loop["steps"] = [loop["steps"][0]]
    loop["until"] = "'OK' in review"
    by = _by_pointer(diff_specs(_spec(BASE), _spec(_dump(data))))
    assert by["/workflow/revise"].kind == "removed"
    assert by["/workflow/revise"].detail == "was at /workflow/1/steps/1"
    assert by["/workflow/refine/until"].detail == "[-'ACCEPT'-] {+'OK'+} in review"
    assert set(by) == {"/workflow/revise", "/workflow/refine/until"}


def test_step_field_changed() -> None:
    data = _data()
    _step(data, "refine")["max_iterations"] = 5
    _step(data, "tidy")["args"] = {"text": "{{ review }}"}
    _step(data, "tidy")["timeout_s"] = 30
    changes = diff_specs(_spec(BASE), _spec(_dump(data)))
    by = _by_pointer(changes)
    assert (
        by["/workflow/refine/max_iterations"].before,
        by["/workflow/refine/max_iterations"].after,
    ) == (3, 5)
    assert by["/workflow/tidy/args/text"].detail == "{{ [-final-] {+review+} }}"
    assert by["/workflow/tidy/timeout_s"].kind == "added"
    assert "~ /workflow/refine/max_iterations: 3 → 5" in format_changes(changes)


def test_tool_code_line_change() -> None:
    data = _data()
    data["tools"]["normalize"]["code"] = data["tools"]["normalize"]["code"].replace(
        'cleaned.rstrip(".")', 'cleaned.rstrip(".!")'
    )
    changes = diff_specs(_spec(BASE), _spec(_dump(data)))
    assert len(changes) == 1
    change = changes[0]
    assert change.pointer == "/tools/normalize/code"
    assert change.detail is not None
    lines = change.detail.splitlines()
    assert '-    return cleaned.rstrip(".")' in lines
    assert '+    return cleaned.rstrip(".!")' in lines
    assert "     cleaned = text.strip()" in lines  # one line of context
    assert not any(line.startswith(("---", "+++")) for line in lines)
    text = format_changes(changes)
    assert "tools:\n  ~ /tools/normalize/code:\n      @@" in text


def test_models_lists_inputs_outputs_budgets_and_name() -> None:
    data = _data()
    data["name"] = "mini2"
    data["models"]["cheap"]["temperature"] = 0.5
    data["models"]["strong"] = {"model": "gpt-4o"}
    data["agents"]["critic"]["model"] = "strong"
    data["agents"]["solver"]["tools"] = []
    data["inputs"]["hint"] = {"type": "string"}
    data["outputs"]["review"] = "review"
    data["budgets"] = {"max_llm_calls": 12, "max_cost_usd": 0.5}
    changes = diff_specs(_spec(BASE), _spec(_dump(data)))
    by = _by_pointer(changes)
    assert by["/name"].detail == "[-mini-] {+mini2+}"
    assert (by["/models/cheap/temperature"].before, by["/models/cheap/temperature"].after) == (
        0.2,
        0.5,
    )
    assert by["/models/strong"].kind == "added"
    assert by["/agents/solver/tools"].detail == "[-normalize-]"
    assert by["/inputs/hint"].kind == "added"
    assert by["/outputs/review"].kind == "added"
    assert by["/budgets/max_cost_usd"].kind == "added"
    assert by["/budgets/max_llm_calls"].after == 12
    sections = [c.section for c in changes]
    order = ["agents", "models", "workflow", "inputs/outputs", "budgets", "other"]
    assert sections == sorted(sections, key=order.index)
    text = format_changes(changes)
    headings = [line for line in text.splitlines() if not line.startswith(" ")]
    assert headings[:-1] == ["agents:", "models:", "inputs/outputs:", "budgets:", "other:"]
    assert headings[-1].startswith(f"{len(changes)} change(s)")


def test_agent_output_schema_changed_field_by_field() -> None:
    data = _data()
    data["agents"]["critic"]["output"] = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
    }
    spec_a = _spec(_dump(data))
    data["agents"]["critic"]["output"]["properties"]["ok"]["description"] = "Accepted?"
    by = _by_pointer(diff_specs(spec_a, _spec(_dump(data))))
    assert by["/agents/critic/output/properties/ok/description"].kind == "added"
    assert diff_specs(spec_a, _spec(BASE))[0].pointer == "/agents/critic/output"


def test_changes_json_round_trips_through_json() -> None:
    data = _data()
    data["agents"]["solver"]["instructions"] = "Solve it."
    changes = diff_specs(_spec(BASE), _spec(_dump(data)))
    payload = json.loads(json.dumps(changes_json(changes)))
    assert payload == [
        {
            "kind": "changed",
            "pointer": "/agents/solver/instructions",
            "section": "agents",
            "before": "Solve the problem step by step and end with the answer.",
            "after": "Solve it.",
            "detail": "Solve [-the problem step by step and end with the answer.-] {+it.+}",
        }
    ]


def test_diff_paths_on_specs_reports_json(tmp_path: Path) -> None:
    data = _data()
    data["agents"]["critic"]["role"] = "Reviewer"
    a = _write(tmp_path / "a.yaml", BASE)
    b = _write(tmp_path / "b.yaml", _dump(data))
    text, different, payload = diff_paths(a, b)
    assert different
    assert "~ /agents/critic/role: [-Critic-] {+Reviewer+}" in text
    assert payload is not None and payload[0]["pointer"] == "/agents/critic/role"


def test_line_diff_whitespace_only() -> None:
    assert line_diff("x = 1\n", "x = 1") == "(line endings or trailing newline only)"


# -- builds ---------------------------------------------------------------------------------


def _build(spec_text: str, out: Path) -> Path:
    compile_spec(_spec(spec_text)).write(out)
    return out


def _files_in(lines: list[str]) -> list[str]:
    return [line[len("--- a/") :] for line in lines if line.startswith("--- a/")]


def _added_lines(lines: list[str], path: str) -> list[str]:
    """The `+` lines of one file's unified diff."""
    start = lines.index(f"+++ b/{path}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("--- a/")), len(lines))
    return [line for line in lines[start:end] if line.startswith("+")]


def test_build_diff_of_two_compiled_specs(tmp_path: Path) -> None:
    data = _data()
    data["agents"]["critic"]["instructions"] = "Say ACCEPT only when the answer is right."
    a = _build(BASE, tmp_path / "a")
    b = _build(_dump(data), tmp_path / "b")
    lines = diff_builds(a, b)
    files = _files_in(lines)
    assert files == sorted(files)  # deterministic order
    assert "mas2c_mini/agents.py" in files
    for path in files:  # every file named really differs ...
        assert (a / path).read_bytes() != (b / path).read_bytes()
    for path in {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()} - set(files):
        assert (a / path).read_bytes() == (b / path).read_bytes()  # ... and no other does
    assert '+        instructions="Say ACCEPT only when the answer is right.",' in _added_lines(
        lines, "mas2c_mini/agents.py"
    )
    # tools.py differs only in its header (the spec hash), not in any code
    tools = _added_lines(lines, "mas2c_mini/tools.py")
    assert len(tools) == 1 and tools[0].startswith("+# Code generated by mas2c")
    assert not any(line.startswith("only in") for line in lines)
    assert diff_builds(a, b) == lines
    text, different, payload = diff_paths(a, b)
    assert different and payload is None and text == "\n".join(lines)


def test_build_diff_names_only_the_changed_file(tmp_path: Path) -> None:
    a = _build(BASE, tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    tools = b / "mas2c_mini" / "tool_normalize.py"  # each code tool has its own module
    tools.write_text(tools.read_text().replace('rstrip(".")', 'rstrip(".!")'))
    lines = diff_builds(a, b)
    assert _files_in(lines) == ["mas2c_mini/tool_normalize.py"]
    assert lines[:2] == ["--- a/mas2c_mini/tool_normalize.py", "+++ b/mas2c_mini/tool_normalize.py"]
    assert [line for line in lines[2:] if line[:1] in "+-"] == [
        '-    return cleaned.rstrip(".")',
        '+    return cleaned.rstrip(".!")',
    ]


def test_same_build_twice_has_no_diff(tmp_path: Path) -> None:
    a = _build(BASE, tmp_path / "a")
    b = _build(BASE, tmp_path / "b")
    (b / "mas2c_mini" / "__pycache__").mkdir()
    (b / "mas2c_mini" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert diff_builds(a, b) == []
    assert diff_paths(a, b) == ("no differences", False, None)


def test_build_diff_reports_files_only_on_one_side(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    for root in (a, b):
        (root / "pkg").mkdir(parents=True)
        (root / "MANIFEST.json").write_text("{}\n")
        (root / "pkg" / "same.py").write_text("x = 1\n")
    (a / "pkg" / "old.py").write_text("old\n")
    (b / "pkg" / "new.py").write_text("new\n")
    (a / "data.bin").write_bytes(b"\xff\x00")
    (b / "data.bin").write_bytes(b"\xfe\x00")
    (a / "pkg" / "mod.py").write_text("a = 1\nb = 2\n")
    (b / "pkg" / "mod.py").write_text("a = 1\nb = 3\n")
    assert diff_builds(a, b) == [
        "binary files a/data.bin and b/data.bin differ",
        "--- a/pkg/mod.py",
        "+++ b/pkg/mod.py",
        "@@ -1,2 +1,2 @@",
        " a = 1",
        "-b = 2",
        "+b = 3",
        "only in b: pkg/new.py",
        "only in a: pkg/old.py",
    ]


# -- arguments ------------------------------------------------------------------------------


def test_mixed_arguments_are_a_value_error(tmp_path: Path) -> None:
    spec = _write(tmp_path / "a.yaml", BASE)
    build = tmp_path / "build"
    build.mkdir()
    (build / "MANIFEST.json").write_text("{}\n")
    with pytest.raises(ValueError, match=r"cannot compare a spec .* with a build"):
        diff_paths(spec, build)
    with pytest.raises(ValueError, match=r"cannot compare a build .* with a spec"):
        diff_paths(build, spec)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match=r"without MANIFEST\.json"):
        diff_paths(plain, build)
    with pytest.raises(ValueError, match="no such file"):
        diff_paths(spec, tmp_path / "missing.yaml")


BRANCHY = """\
spec_version: "1"
name: branchy
inputs: {x: {type: string}}
outputs: {y: y}
models: {m: {model: gpt-4o-mini}}
agents:
  a: {role: A, model: m}
workflow:
  - id: pick
    kind: branch
    cases:
      - when: x == "one"
        steps: [{id: one, kind: call, agent: a, prompt: "1 {{ x }}", out: y}]
      - when: x == "two"
        steps: [{id: two, kind: call, agent: a, prompt: "2 {{ x }}", out: y}]
    else: [{id: other, kind: call, agent: a, prompt: "? {{ x }}", out: y}]
"""


def test_branch_case_condition_changed_and_step_moved_between_arms() -> None:
    data = yaml.safe_load(BRANCHY)
    pick = data["workflow"][0]
    pick["cases"][0]["steps"].append(pick["else"].pop())
    pick["else"] = [
        {"id": "fallback", "kind": "call", "agent": "a", "prompt": "{{ x }}", "out": "y"}
    ]
    pick["cases"][1]["when"] = 'x == "2"'
    changes = diff_specs(_spec(BRANCHY), _spec(_dump(data)))
    assert [(c.kind, c.pointer, c.detail) for c in changes] == [
        ("changed", "/workflow/pick/cases/1/when", 'x == [-"two"-] {+"2"+}'),
        (
            "changed",
            "/workflow/other",
            "moved from /workflow/0/else/0 to /workflow/0/cases/0/steps/1",
        ),
        ("added", "/workflow/fallback", "at /workflow/0/else/0"),
    ]
