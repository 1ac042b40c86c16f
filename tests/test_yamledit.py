"""The user's spec survives edits (issue 13, item 2): `rectify --write`, `configure -o` and every
round of `rectify` edit the user's own text as a round trip (`mas2c.yamledit`).

Comments (the `# yaml-language-server: $schema=` line too), key order, quoting, block and flow
styles are kept; only the lines of changed nodes change; and each round's `patch.diff`
applies to the user's file with `git apply` and with `patch -p0`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, cli_env, mas2c
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mas2c.lang.spec import Spec, spec_hash
from mas2c.lang.validate import load_spec, validate_text
from mas2c.rectify import rectify
from mas2c.run import LLMConfig, run_system
from mas2c.testserver import LLMTestServer
from mas2c.yamledit import edit_spec_text, file_patch

FAULTS = Path(__file__).resolve().parent / "faults"

COMMENTED = """\
# yaml-language-server: $schema=./mas2c.schema.json
# A word counter with a summary: the tool forgot its import (a seeded fault).
spec_version: "1"
name: fault-missing-import-re
description: >-
  Counts the words of a text with a regex tool,
  then summarizes it.

# --- what goes in and what comes out ---
inputs:
  text: {type: string}   # the text to count
outputs:
  words: stats.words     # from the tool
  summary: summary       # from the writer

# --- the model pool ---
models:
  m:
    model: test-model    # the test server answers any name
    temperature: 0.0

# --- who does what ---
agents:
  writer:
    role: 'Writer'
    instructions: "Summarize the text in one line."
    model: m

# --- tools run inside the sandbox ---
tools:
  word_stats:
    # counts words with a regular expression
    code: |
      def word_stats(text: str) -> dict:
          # letters and apostrophes make a word
          words = re.findall(r"[A-Za-z']+", text)
          return {"words": len(words)}
    timeout_s: 10

# --- the steps, in order ---
workflow:
  # first the count
  - id: count
    kind: tool
    tool: word_stats
    args:
      text: "{{ text }}"
    out: stats

  # then the summary
  - id: summarize
    kind: call
    agent: writer
    prompt: "{{ text }} ({{ stats.words }} words)"
    out: summary

budgets:
  max_llm_calls: 10   # plenty for two steps
  timeout_s: 120
# end of spec
"""


def comments(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


def keys_in_order(text: str) -> list[str]:
    """Every `key:` in the file, in order, with its indentation: the shape a reader sees."""
    found = []
    for line in text.splitlines():
        stripped = line.lstrip(" -")
        if ":" in stripped and not stripped.startswith("#"):
            key = stripped.split(":", 1)[0]
            if key.replace("_", "").isalnum():
                found.append(f"{len(line) - len(stripped)}:{key}")
    return found


def changed_lines(before: str, after: str) -> list[str]:
    patch = file_patch(before, after, "x.yaml").splitlines()[2:]
    return [line for line in patch if line[:1] in "+-"]


def apply_with(tool: list[str], folder: Path, patch: Path) -> None:
    proc = subprocess.run(
        [*tool, str(patch)] if tool[0] == "git" else [*tool, "-i", str(patch)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_commented_spec_is_sixty_lines_and_valid() -> None:
    assert len(COMMENTED.splitlines()) >= 60
    report = validate_text(COMMENTED, "system.yaml")
    assert report.ok, report.errors


def test_rectify_write_keeps_every_comment_and_key_and_its_patch_applies(tmp_path: Path) -> None:
    spec_path = tmp_path / "system.yaml"
    spec_path.write_text(COMMENTED)
    (tmp_path / "in.json").write_text(json.dumps({"text": "One two three."}))
    with LLMTestServer() as server:
        llm = LLMConfig(url=server.base_url, api_key="test")
        run_system(spec_path, tmp_path / "in.json", tmp_path / "run", backend="unisolated", llm=llm)
        outcome = rectify(
            tmp_path / "run", spec_path=spec_path, write=True, llm=llm, backend="unisolated"
        )
    assert outcome.status == "fixed" and outcome.written == tmp_path / "system.rectified.yaml"
    assert spec_path.read_text() == COMMENTED  # the input spec is never modified
    fixed = outcome.written.read_text()
    assert comments(fixed) == comments(COMMENTED)
    assert keys_in_order(fixed) == keys_in_order(COMMENTED)
    assert "role: 'Writer'" in fixed and 'instructions: "Summarize' in fixed  # quoting kept
    assert "  text: {type: string}   # the text to count" in fixed  # flow style and comment
    assert "description: >-" in fixed
    # only the changed node changed: an import (and libcst's blank line) added to the tool's block
    changed = changed_lines(COMMENTED, fixed)
    assert [line for line in changed if line.strip("+ ")] == ["+      import re"]
    assert all(line.startswith("+") for line in changed)
    assert "import re" in (load_spec(outcome.written).tools["word_stats"].code or "")
    # the round's patch applies to the user's file, with git apply and with patch -p0
    patch = outcome.rounds[0].folder / "patch.diff"
    for tool in (["git", "apply"], ["patch", "-p0"]):
        work = tmp_path / tool[0]
        work.mkdir()
        shutil.copy(spec_path, work / "system.yaml")
        apply_with(tool, work, patch)
        assert (work / "system.yaml").read_text() == fixed


def test_configure_o_binds_models_and_keeps_the_rest(tmp_path: Path) -> None:
    unbound = COMMENTED.replace("    model: m\n", "    # model: chosen by configure\n")
    spec_path = tmp_path / "system.yaml"
    spec_path.write_text(unbound)
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        "models:\n  cheap: {model: small, price: {input_per_mtok: 0.1, output_per_mtok: 0.2}}\n"
    )
    out = tmp_path / "configured.yaml"
    proc = mas2c("configure", spec_path, "--pool", pool, "--rule", "-o", out, cwd=tmp_path,
                 env=cli_env(), inprocess=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert comments(text) == comments(unbound)
    assert load_spec(out).agents["writer"].model is not None
    added = changed_lines(unbound, text)
    assert all(line.startswith("+") for line in added), added  # nothing of the user's removed
    assert any("model:" in line for line in added)


def test_a_crlf_spec_keeps_its_line_ends_and_its_patch_applies(tmp_path: Path) -> None:
    """A spec saved with CRLF line ends (Windows editors): the edit keeps CRLF on every
    line, so only the changed lines differ and the patch applies to the user's file."""
    crlf = COMMENTED.replace("\n", "\r\n")
    before = load_spec_text(COMMENTED)
    data = before.to_data()
    data["agents"]["writer"]["instructions"] = "Summarize in five words."
    after = Spec.model_validate(data)
    edited = edit_spec_text(crlf, before, after)
    assert edited.count("\r\n") == edited.count("\n")  # every line still ends in CRLF
    assert spec_hash(load_spec_text(edited)) == spec_hash(after)
    changed = changed_lines(crlf, edited)
    assert len(changed) == 2, changed  # one line out, one in
    patch = tmp_path / "p.diff"
    patch.write_bytes(file_patch(crlf, edited, "system.yaml").encode())
    for tool in (["git", "apply"], ["patch", "-p0"]):
        (tmp_path / tool[0]).mkdir()
        (tmp_path / tool[0] / "system.yaml").write_bytes(crlf.encode())
        apply_with(tool, tmp_path / tool[0], patch)
        assert (tmp_path / tool[0] / "system.yaml").read_bytes() == edited.encode()


def test_configure_into_a_json_file_writes_json(tmp_path: Path) -> None:
    unbound = COMMENTED.replace("    model: m\n", "    # model: chosen by configure\n")
    spec_path = tmp_path / "system.yaml"
    spec_path.write_text(unbound)
    pool = tmp_path / "pool.yaml"
    pool.write_text("models:\n  cheap: {model: small}\n")
    out = tmp_path / "configured.json"
    proc = mas2c("configure", spec_path, "--pool", pool, "--rule", "-o", out, cwd=tmp_path,
                 env=cli_env(), inprocess=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["agents"]["writer"]["model"] == "cheap"
    assert load_spec(out).agents["writer"].model == "cheap"


def test_configure_from_stdin_keeps_the_comments(tmp_path: Path) -> None:
    unbound = COMMENTED.replace("    model: m\n", "    # model: chosen by configure\n")
    pool = tmp_path / "pool.yaml"
    pool.write_text("models:\n  cheap: {model: small}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c.cli", "configure", "-", "--pool", str(pool), "--rule"],
        input=unbound, capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert comments(proc.stdout) == comments(unbound)
    assert all(line.startswith("+") for line in changed_lines(unbound, proc.stdout))


def test_a_json_spec_stays_json_with_a_minimal_diff(tmp_path: Path) -> None:
    data = load_spec(FAULTS / "missing-import-re" / "spec.yaml").to_data()
    text = json.dumps(data, indent=4) + "\n"
    before = Spec.model_validate(data)
    data["agents"]["writer"]["instructions"] = "Summarize in five words."
    data["workflow"].insert(1, {"id": "again", "kind": "tool", "tool": "word_stats",
                                "args": {"text": "{{ text }}"}, "out": "again"})  # fmt: skip
    after = Spec.model_validate(data)
    edited = edit_spec_text(text, before, after, json_text=True)
    assert json.loads(edited) == after.to_data()
    removed = [line for line in changed_lines(text, edited) if line.startswith("-")]
    assert removed == ['-            "instructions": "Summarize the text in one line.",']


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_edits_of_every_example_touch_only_their_lines(path: Path) -> None:
    text = path.read_text()
    before = load_spec(path)
    data = before.to_data()
    first_agent = next(iter(data["agents"]))
    data["agents"][first_agent]["instructions"] += "\nBe brief."
    data["workflow"][-1]["timeout_s"] = 30
    data["budgets"] = {**data.get("budgets", {}), "max_llm_calls": 77}
    after = Spec.model_validate(data)
    edited = edit_spec_text(text, before, after)
    assert spec_hash(load_spec_text(edited)) == spec_hash(after)
    assert comments(edited) == comments(text)
    remaining = iter(keys_in_order(edited))
    assert all(key in remaining for key in keys_in_order(text))  # the old keys, in order
    assert len(changed_lines(text, edited)) <= 8, file_patch(text, edited, path.name)


def load_spec_text(text: str) -> Spec:
    report = validate_text(text, "edited.yaml")
    assert report.spec is not None and report.ok, report.errors
    return report.spec


def test_an_aliased_value_changes_only_where_it_was_changed() -> None:
    text = (
        'spec_version: "1"\nname: shared\n'
        "models: {m: {model: x}}\n"
        "agents:\n"
        "  a: {role: &r Analyst, model: m}\n"
        "  b: {role: *r, model: m}\n"
        "workflow:\n"
        "  - {id: s, kind: call, agent: a, prompt: hi, out: o}\n"
        "  - {id: t, kind: call, agent: b, prompt: hi, out: p}\n"
        "outputs: {o: o, p: p}\n"
    )
    before = load_spec_text(text)
    data = before.to_data()
    data["agents"]["b"]["role"] = "Critic"
    after = Spec.model_validate(data)
    edited = load_spec_text(edit_spec_text(text, before, after))
    assert edited.agents["a"].role == "Analyst" and edited.agents["b"].role == "Critic"


# -- property: any edit of a string of any example round-trips, touching only its lines -----------

PROPERTY = settings(
    deadline=None,
    max_examples=int(os.environ.get("MAS2C_HYPOTHESIS_EXAMPLES", "40")),
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow],
)
TEXTS = st.lists(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\r"),
        max_size=8,
    )
    | st.sampled_from(["\n", ": ", " #", "'", '"', "{{ x }}", "- ", "\t", "  ", "&a", "*a"]),
    max_size=10,
).map("".join)


def string_leaves(data: Any, pointer: str = "") -> list[str]:
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in string_leaves(v, f"{pointer}/{k}")]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in string_leaves(v, f"{pointer}/{i}")]
    return (
        [pointer]
        if (isinstance(data, str) and "/description" in pointer)
        or (isinstance(data, str) and pointer.endswith(("/instructions", "/role", "/prompt")))
        else []
    )


@PROPERTY
@given(example=st.sampled_from(EXAMPLES), pick=st.integers(min_value=0), value=TEXTS)
def test_any_text_edit_round_trips_and_keeps_the_rest(example: Path, pick: int, value: str) -> None:
    text = example.read_text()
    before = load_spec(example)
    data = before.to_data()
    leaves = string_leaves(data)
    pointer = leaves[pick % len(leaves)]
    *parents, last = pointer.split("/")[1:]
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value if value.strip() else "x" + value  # roles must not be empty
    report = validate_text(json.dumps(data), "after.json")
    assume(report.ok and report.spec is not None)
    after = report.spec
    edited = edit_spec_text(text, before, after)
    assert spec_hash(load_spec_text(edited)) == spec_hash(after)
    assert comments(edited) == comments(text) or "#" in value
    old_lines = len(str(resolve_text(before, pointer)).splitlines()) + 2
    assert len(changed_lines(text, edited)) <= old_lines + value.count("\n") + 4


def resolve_text(spec: Spec, pointer: str) -> Any:
    node: Any = spec.to_data()
    for part in pointer.split("/")[1:]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node
