"""Built-in prompts: visible literals in the package (`_tables.PROMPTS`), overridable from the
spec's `prompts:`, checked by the validator, published in the JSON Schema, and the only prompt
text the runtime sends (it holds none of its own)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from conftest import compile_to, run_package

from mas2c.compile import runtime_files, templates_dir
from mas2c.lang.prompts import BUILTIN_PROMPTS, Prompts
from mas2c.lang.spec import Spec, json_schema
from mas2c.lang.validate import validate_text
from mas2c.testserver import ChatRequest, LLMTestServer

SPEC: dict[str, Any] = {
    "spec_version": "1",
    "name": "judged",
    "inputs": {"question": {"type": "string"}},
    "outputs": {"answer": "verdict"},
    "models": {"m": {"model": "test-model"}},
    "agents": {
        "solver": {"role": "Solver", "instructions": "Answer.", "model": "m"},
        "judge": {"role": "Judge", "instructions": "Decide.", "model": "m"},
    },
    "workflow": [
        {
            "id": "pick",
            "kind": "ensemble",
            "agent": "solver",
            "n": 2,
            "prompt": "Q: {{ question }}",
            "judge": "judge",
            "out": "verdict",
        }
    ],
}


def _problems(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    report = validate_text(yaml.safe_dump(spec))
    return [(p.code, p.pointer, p.severity) for p in report.problems]


def test_every_builtin_prompt_is_a_spec_field() -> None:
    assert set(Prompts.model_fields) == set(BUILTIN_PROMPTS)
    schema = json_schema()
    properties = schema["$defs"]["Prompts"]["properties"]
    assert set(properties) == set(BUILTIN_PROMPTS)
    assert "{{ candidates }}" in properties["judge"]["description"]
    assert schema["properties"]["prompts"]
    committed = json.loads(Path("specs/mas2c.schema.json").read_text("utf-8"))
    assert committed == schema


def test_valid_overrides_pass() -> None:
    spec = {**SPEC, "prompts": {"judge": "Pick one for {{ task }}:\n{{ candidates | text }}"}}
    assert _problems(spec) == []


def test_a_placeholder_that_is_no_slot_is_an_error() -> None:
    spec = {**SPEC, "prompts": {"judge": "{{ question }}: {{ candidates }}"}}
    assert ("MAS311", "/prompts/judge", "error") in _problems(spec)
    report = validate_text(yaml.safe_dump(spec))
    problem = next(p for p in report.problems if p.code == "MAS311")
    assert problem.line is not None and "{{ candidates }}" in problem.message


def test_a_dotted_slot_and_a_malformed_one_are_errors() -> None:
    spec = {**SPEC, "prompts": {"judge": "{{ candidates.x }}", "final_answer": "{{ a b }}"}}
    codes = _problems(spec)
    assert ("MAS311", "/prompts/judge", "error") in codes
    assert ("MAS302", "/prompts/final_answer", "error") in codes


def test_dropping_the_data_slot_warns() -> None:
    spec = {**SPEC, "prompts": {"judge": "Decide for {{ task }}."}}
    assert _problems(spec) == [("MAS907", "/prompts/judge", "warning")]


def test_an_unknown_prompt_name_is_an_error() -> None:
    spec = {**SPEC, "prompts": {"jduge": "x"}}
    assert ("MAS102", "/prompts/jduge", "error") in _problems(spec)


def test_no_prompts_key_changes_nothing() -> None:
    # Specs without `prompts:` hash and dump as before (no `prompts` key appears).
    assert "prompts" not in Spec.model_validate(SPEC).to_data()


def test_the_runtime_holds_no_prompt_text() -> None:
    shipped = "\n".join(runtime_files().values())
    shipped += (templates_dir() / "_voting.py").read_text("utf-8")
    for prompt in BUILTIN_PROMPTS.values():
        for line in prompt.text.splitlines():
            fixed = line.split("{{")[0].strip()
            if len(fixed) > 12:
                assert fixed not in shipped, f"{fixed!r} is written in the runtime"


def test_the_package_shows_and_sends_its_prompts(tmp_path: Path, llm_server: LLMTestServer) -> None:
    override = "Choose among:\n{{ candidates }}\n(for: {{ task }})"
    spec = Spec.model_validate(
        {**SPEC, "prompts": {"judge": override, "candidate_label": "#{{ number }}"}}
    )
    build = compile_to(spec, tmp_path / "build")
    tables = build.files[f"{build.package}/_tables.py"].decode()
    assert "# spec: /prompts/judge" in tables
    assert "# built-in (the spec may override it as /prompts/debate_revision)" in tables
    assert any(e["pointer"] == "/prompts/judge" for e in build.manifest["source_map"])

    seen: list[str] = []

    def responder(req: ChatRequest) -> str:
        seen.append(req.last_user)
        return "yes" if req.system.startswith("Judge") else "42"

    llm_server.responder = responder
    code, out, _trace, stderr = run_package(tmp_path / "build", {"question": "6*7?"}, llm_server)
    assert code == 0, stderr
    assert out["outputs"]["answer"] == "yes"
    judge_prompt = seen[-1]
    assert judge_prompt == "Choose among:\n[1] #1\n42\n\n[2] #2\n42\n(for: Q: 6*7?)"


def test_checkpoint_hashes_follow_the_prompts() -> None:
    plain = Spec.model_validate(SPEC)
    changed = Spec.model_validate({**SPEC, "prompts": {"judge": "{{ candidates }}"}})
    from mas2c.compile import compile_spec

    def code_sha(spec: Spec) -> str:
        build = compile_spec(spec)
        tables = build.files[f"{build.package}/_tables.py"].decode()
        return tables.split("code_sha=")[1].split(",")[0]

    assert code_sha(plain) != code_sha(changed)
