"""The generator and the shared LLM client, against the loopback test LLM server.

The real `openai` client talks HTTP to `LLMTestServer`; nothing is mocked.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mas2c.generate import (
    COMPACT_MAX_TOKENS,
    GenerateError,
    compact_messages,
    compact_schema,
    generate_spec,
    load_examples,
    pick_examples,
    spec_to_yaml,
    system_prompt,
    write_spec_yaml,
)
from mas2c.lang.spec import json_schema, spec_hash
from mas2c.lang.validate import validate_file, validate_text
from mas2c.llm import JSONNotFound, LLMClient, LLMError, extract_json
from mas2c.testserver import ChatRequest, LLMTestServer, Reply, Script

SPECS = Path(__file__).resolve().parent.parent / "specs"

VALID: dict[str, Any] = {
    "spec_version": "1",
    "name": "qa-judge",
    "description": "Three samples of a solver answer a question; a judge picks the best.",
    "inputs": {"question": {"type": "string"}},
    "outputs": {"answer": "verdict.answer"},
    "agents": {
        "solver": {
            "role": "Careful solver",
            "instructions": "Solve the problem step by step.\nEnd with the answer.",
        },
        "judge": {
            "role": "Impartial judge",
            "instructions": "Pick the best-supported answer.",
            "output": {
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer"],
            },
        },
    },
    "workflow": [
        {
            "id": "sample",
            "kind": "ensemble",
            "agent": "solver",
            "n": 3,
            "prompt": "Solve: {{ question }}",
            "judge": "judge",
            "out": "verdict",
        }
    ],
    "budgets": {"max_llm_calls": 10},
}


def invalid_spec() -> dict[str, Any]:
    """VALID with a misspelt agent reference (MAS201 at /workflow/0/agent)."""
    data = copy.deepcopy(VALID)
    data["workflow"][0]["agent"] = "solvr"
    return data


@pytest.fixture
def srv() -> Iterator[LLMTestServer]:
    with LLMTestServer() as server:
        yield server


def client_for(server: LLMTestServer, **kwargs: Any) -> LLMClient:
    kwargs.setdefault("max_retries", 0)
    return LLMClient(server.base_url, "test", model="test-model", **kwargs)


# -- extract_json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("  [1, 2] \n", [1, 2]),
        ('Here you go:\n```json\n{"a": {"b": [1, 2]}}\n```\nDone.', {"a": {"b": [1, 2]}}),
        ('```\n{"a": 2}\n```', {"a": 2}),
        ('```python\nx = {1}\n```\n```json\n{"a": 3}\n```', {"a": 3}),
        ('Sure! {"a": "}"} and then {"b": 2}', {"a": "}"}),
        ('noise { not json } then {"ok": true}', {"ok": True}),
    ],
)
def test_extract_json(text: str, expected: Any) -> None:
    assert extract_json(text) == expected


@pytest.mark.parametrize("text", ["", "no json here", "```json\n{broken\n```", '{"a": 1,'])
def test_extract_json_none(text: str) -> None:
    with pytest.raises(JSONNotFound):
        extract_json(text)


# -- the LLM client --------------------------------------------------------------------------


def test_client_structured_output_and_usage(srv: LLMTestServer) -> None:
    srv.responder = lambda req: Reply(content='{"x": 1}', prompt_tokens=11, completion_tokens=3)
    client = client_for(srv)
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert client.chat([{"role": "user", "content": "hi"}], schema=schema, schema_name="a b") == (
        '{"x": 1}'
    )
    request = srv.requests[0]
    assert request.response_schema == schema
    assert request.response_format["json_schema"]["name"] == "a_b"
    assert request.response_format["json_schema"]["strict"] is False
    assert request.body["temperature"] == 0.0
    client.chat([{"role": "user", "content": "plain"}])
    assert "response_format" not in srv.requests[1].body
    assert client.usage.calls == 2
    assert client.usage.prompt_tokens == 22
    assert client.usage.total_tokens == 28


def test_client_falls_back_to_json_mode_then_text(srv: LLMTestServer) -> None:
    srv.responder = Script([], default=lambda req: '```json\n{"x": 1}\n```')
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    client = client_for(srv)
    srv.inject("status", 2, status=400)  # json_schema and json_object rejected
    text = client.chat([{"role": "user", "content": "hi"}], schema=schema)
    assert extract_json(text) == {"x": 1}
    kinds = [r.response_format.get("type") for r in srv.requests]
    assert kinds == ["json_schema", "json_object", None]
    assert client.mode == "text"
    # The fallback request spells the instruction (and the schema) out in the prompt.
    assert "```json" in srv.requests[2].last_user
    assert '"x"' in srv.requests[2].last_user
    # Later calls go straight to the mode that worked.
    client.chat([{"role": "user", "content": "again"}], schema=schema)
    assert srv.requests[3].response_format == {}
    assert client.usage.calls == 2  # rejected requests are not answers


def test_client_gives_up_with_a_clear_error(srv: LLMTestServer) -> None:
    client = client_for(srv)
    srv.inject("status", 3, status=400)
    with pytest.raises(LLMError, match=r"HTTP 400: injected fault"):
        client.chat([{"role": "user", "content": "hi"}], schema={"type": "object"})
    assert client.mode == "json_schema"  # nothing worked: nothing remembered
    srv.inject("status", status=401)
    with pytest.raises(LLMError, match="authentication failed"):
        client.chat([{"role": "user", "content": "hi"}])


def test_client_retries_server_errors(srv: LLMTestServer) -> None:
    client = client_for(srv, max_retries=3)
    srv.inject("status", 2, status=503, retry_after=0.01)
    srv.inject("status", 1, status=429, retry_after=0.01)
    assert client.chat([{"role": "user", "content": "hi"}]) == "ANSWER: 42"
    assert len(srv.requests) == 4
    assert client.usage.calls == 1


def test_client_unreachable_endpoint() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = LLMClient(f"http://127.0.0.1:{port}/v1", "k", max_retries=0, timeout_s=5)
    with pytest.raises(LLMError, match="cannot connect"):
        client.chat([{"role": "user", "content": "hi"}])


def test_client_from_env(monkeypatch: pytest.MonkeyPatch, srv: LLMTestServer) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    monkeypatch.setenv("MAS2C_MODEL", "env-model")
    client = LLMClient.from_env(max_retries=0)
    assert client.model == "env-model"
    client.chat([{"role": "user", "content": "hi"}])
    assert srv.requests[0].model == "env-model"
    assert srv.requests[0].headers["authorization"] == "Bearer secret"


# -- examples and prompt ----------------------------------------------------------------------


def test_examples_are_picked_for_the_task() -> None:
    examples = load_examples(SPECS)
    assert {e.name for e in examples} >= {"debate", "code-generation", "router"}
    debate = pick_examples("Several debaters argue a question; a judge decides.", examples, 2)
    assert debate[0].name == "debate"
    code = pick_examples("Write a Python function from its docstring and test it", examples, 3)
    assert code[0].name == "code-generation"
    assert len(code) == 3


def test_system_prompt_holds_language_schema_and_examples() -> None:
    examples = pick_examples("debate", load_examples(SPECS), 2)
    text = system_prompt(examples)
    for kind in ("call", "ensemble", "parallel", "loop", "branch", "debate", "programmer"):
        assert f"- {kind}:" in text
    assert "{{ name.field }}" in text
    assert json.dumps(json_schema(), separators=(",", ":")) in text
    assert f"Example 1: {examples[0].name}" in text
    # Examples are shown as JSON, as their authors wrote them (no `$schema` editor hint).
    assert '"spec_version": "1"' in text
    assert "$schema=" not in text


# -- generate ----------------------------------------------------------------------------------


def test_valid_first_answer(srv: LLMTestServer, tmp_path: Path) -> None:
    srv.responder = lambda req: VALID
    client = client_for(srv)
    progress: list[str] = []
    result = generate_spec(
        "Answer a question: sample a solver three times and let a judge decide.",
        client,
        examples_dir=SPECS,
        on_progress=progress.append,
    )
    assert result.attempts == 1
    assert result.history == []
    assert result.spec.name == "qa-judge"
    assert result.usage.calls == 1
    assert len(result.examples) == 2
    assert progress and "valid" in progress[-1]
    request = srv.requests[0]
    assert request.response_schema == json_schema()
    assert "Example 1:" in request.system
    assert "sample a solver three times" in request.last_user
    # The YAML text loads back to the same spec.
    out = tmp_path / "spec.yaml"
    out.write_text(result.text)
    report = validate_file(out)
    assert report.ok, report.format()
    assert report.spec is not None
    assert spec_hash(report.spec) == spec_hash(result.spec)
    assert result.text.startswith("# Generated by mas2c generate for the task:\n# Answer a")
    assert result.to_json()["attempts"] == 1


def test_invalid_answer_is_repaired_from_validator_feedback(srv: LLMTestServer) -> None:
    srv.responder = Script([], default=[invalid_spec(), VALID])
    result = generate_spec("qa with a judge", client_for(srv), examples_dir=SPECS)
    assert result.attempts == 2
    assert [p.code for p in result.history[0] if p.severity == "error"] == ["MAS201"]
    assert len(srv.requests) == 2
    second = srv.requests[1]
    assert "MAS201 /workflow/0/agent: unknown agent `solvr`" in second.last_user
    assert "did you mean `solver`?" in second.last_user
    assert "MAS901 /agents/solver" in second.last_user  # warnings come along as clues
    # The rejected answer is in the conversation, as the assistant's turn.
    assistant = [m for m in second.messages if m["role"] == "assistant"]
    assert len(assistant) == 1
    assert json.loads(assistant[0]["content"])["workflow"][0]["agent"] == "solvr"
    # Same system prompt and task as the first request.
    assert second.system == srv.requests[0].system
    assert second.response_schema == json_schema()


def test_reply_that_is_not_json_then_a_valid_one(srv: LLMTestServer) -> None:
    srv.responder = Script([], default=["Sure! Let me think about the agents first.", VALID])
    result = generate_spec("qa with a judge", client_for(srv), examples_dir=SPECS)
    assert result.attempts == 2
    assert result.history[0][0].code == "MAS001"
    assert "could not be read" in srv.requests[1].last_user


def test_gives_up_after_max_repairs(srv: LLMTestServer) -> None:
    srv.responder = lambda req: invalid_spec()
    with pytest.raises(GenerateError) as info:
        generate_spec("qa", client_for(srv), examples_dir=SPECS, max_repairs=2)
    error = info.value
    assert len(srv.requests) == 3
    assert error.attempts == 3
    assert len(error.history) == 3
    assert [p.code for p in error.problems] == ["MAS201"]
    assert "MAS201 /workflow/0/agent" in str(error)
    assert "no valid spec after 3 answer(s)" in str(error)
    assert error.usage.calls == 3


def test_warnings_are_accepted(srv: LLMTestServer) -> None:
    data = copy.deepcopy(VALID)
    data["agents"]["idle"] = {"role": "Nobody uses me"}
    srv.responder = lambda req: data
    result = generate_spec("qa", client_for(srv), examples_dir=SPECS)
    assert result.attempts == 1
    assert [p.code for p in result.warnings] == ["MAS901"]


def test_endpoint_without_structured_output(srv: LLMTestServer) -> None:
    """json_schema is refused with HTTP 400; JSON mode works and is kept for the repair."""

    def answer(req: ChatRequest) -> Any:
        assert req.response_format.get("type") == "json_object"
        return invalid_spec() if len(srv.requests) <= 2 else VALID

    srv.responder = answer
    srv.inject("status", status=400)
    client = client_for(srv)
    result = generate_spec("qa with a judge", client, examples_dir=SPECS)
    assert result.spec.name == "qa-judge"
    assert result.attempts == 2
    kinds = [r.response_format.get("type") for r in srv.requests]
    assert kinds == ["json_schema", "json_object", "json_object"]
    assert client.mode == "json_object"
    assert "JSON" in srv.requests[1].last_user  # JSON mode needs the word in the prompt


def test_endpoint_with_neither_structured_output_nor_json_mode(srv: LLMTestServer) -> None:
    srv.responder = lambda req: "Here is the spec:\n```json\n" + json.dumps(VALID) + "\n```"
    srv.inject("status", 2, status=400)
    client = client_for(srv)
    result = generate_spec("qa with a judge", client, examples_dir=SPECS)
    assert result.spec.name == "qa-judge"
    assert client.mode == "text"
    assert "```json" in srv.requests[-1].last_user


def test_no_examples_dir(srv: LLMTestServer, tmp_path: Path) -> None:
    srv.responder = lambda req: VALID
    result = generate_spec("qa", client_for(srv), examples_dir=tmp_path)
    assert result.examples == []
    assert "Example 1" not in srv.requests[0].system


def test_empty_task_is_refused(srv: LLMTestServer) -> None:
    with pytest.raises(ValueError, match="empty"):
        generate_spec("  ", client_for(srv))


# -- YAML ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.stem)
def test_written_yaml_round_trips(path: Path, tmp_path: Path) -> None:
    report = validate_file(path)
    assert report.spec is not None
    out = tmp_path / "out" / "spec.yaml"
    text = write_spec_yaml(report.spec, out, header="a header\nsecond line")
    assert out.read_text() == text
    again = validate_file(out)
    assert again.ok, again.format()
    assert again.spec is not None
    assert spec_hash(again.spec) == spec_hash(report.spec)
    assert again.problems == report.problems or [p.code for p in again.problems] == [
        p.code for p in report.problems
    ]
    assert text.startswith("# a header\n# second line\nspec_version:")
    assert not list(out.parent.glob(".*tmp"))  # atomic write left nothing behind


def test_yaml_layout() -> None:
    report = validate_text(json.dumps(VALID))
    assert report.spec is not None
    text = spec_to_yaml(report.spec)
    data = yaml.safe_load(text)
    assert list(data) == [
        "spec_version",
        "name",
        "description",
        "inputs",
        "outputs",
        "agents",
        "workflow",
        "budgets",
    ]
    assert list(data["workflow"][0]) == ["id", "kind", "agent", "n", "prompt", "judge", "out"]
    # Multi-line strings are block scalars; defaults nobody wrote are not spelt out.
    assert "instructions: |-\n      Solve the problem step by step.\n      End" in text
    assert "max_tool_rounds" not in text
    assert text.startswith('spec_version: "1"\n')


def test_yaml_keeps_tricky_strings() -> None:
    data = copy.deepcopy(VALID)
    data["agents"]["solver"]["instructions"] = (
        'Line with "quotes" and: colons.\n  indented line\n\ttab line  \nend # not a comment'
    )
    data["workflow"][0]["prompt"] = 'JSON example: {"a": 1}\n{{ question }}\n'
    report = validate_text(json.dumps(data))
    assert report.spec is not None
    again = validate_text(spec_to_yaml(report.spec))
    assert again.spec is not None
    assert spec_hash(again.spec) == spec_hash(report.spec)


# -- the compact prompt and schema (the embedded model's) --------------------------------------

COMPACT_EXAMPLES = int(os.environ.get("MAS2C_HYPOTHESIS_EXAMPLES", "15"))


def _instances(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Instances of the JSON Schema subset the compact schema uses (what the grammar allows)."""
    if "anyOf" in schema:
        return st.one_of([_instances(option) for option in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        # what a JSON grammar lets a model write in a string: no control characters
        return st.text(
            st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Cn")),
            min_size=schema.get("minLength", 0),
            max_size=schema.get("maxLength", 50),
        )
    if kind == "integer":
        return st.integers(schema["minimum"], schema["maximum"])
    if kind == "array":
        return st.tuples(*[_instances(item) for item in schema["prefixItems"]]).map(list)
    assert kind == "object", schema
    required = set(schema["required"])
    fields = {k: _instances(v) for k, v in schema["properties"].items() if k in required}
    optional = {k: _instances(v) for k, v in schema["properties"].items() if k not in required}
    return st.fixed_dictionaries(fields, optional=optional)


@settings(
    deadline=None,
    max_examples=COMPACT_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_what_the_compact_schema_admits_is_a_spec_but_for_two_references(data: Any) -> None:
    """Any instance of the reduced schema (as a grammar lets the model write it) is a spec
    the validator accepts, except what no schema can say: a step naming `reviewer` when
    `agents` has none (MAS201), `answer: final` with one step (MAS205)."""
    inputs = data.draw(
        st.dictionaries(
            st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True),
            st.sampled_from(["string", "integer", "array"]),
            min_size=1,
            max_size=2,
        )
    )
    instance = data.draw(_instances(compact_schema(inputs)))
    report = validate_text(json.dumps(instance, ensure_ascii=False), "<compact>")
    codes = {p.code for p in report.errors}
    assert codes <= {"MAS201", "MAS205"}, report.format()
    steps = instance["workflow"]
    expected = set()
    if any(step["agent"] == "reviewer" for step in steps) and "reviewer" not in instance["agents"]:
        expected.add("MAS201")
    if instance["outputs"]["answer"] == "final" and len(steps) == 1:
        expected.add("MAS205")
    assert codes == expected, report.format()


def test_compact_prompt_is_small_and_its_example_valid() -> None:
    for inputs in (None, {"question": "string"}, {"text": "string", "n": "integer"}):
        messages = compact_messages("Answer a question.", inputs)
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
        assert messages[0]["content"].startswith("You design multi-agent systems")
        example = json.loads(messages[2]["content"])
        report = validate_text(json.dumps(example), "<example>")
        assert report.ok and not report.problems, report.format()
        assert set(example["inputs"]) <= set(inputs or {"question": "string"})
        # far inside the embedded model's 8192-token context with the answer's budget
        # (tests/test_local_model.py counts the real tokens)
        assert sum(len(m["content"]) for m in messages) < 4 * 3000
        assert "Top-level keys of a spec" not in messages[0]["content"]  # not the full text


def test_generate_compact_sends_the_reduced_schema_and_repairs(srv: LLMTestServer) -> None:
    good = {
        "spec_version": "1",
        "name": "sum-up",
        "description": "Adds the numbers.",
        "inputs": {"question": {"type": "string"}},
        "agents": {"solver": {"role": "Adder", "instructions": "Add them."}},
        "workflow": [
            {"id": "first", "kind": "call", "agent": "solver", "prompt": "Add: {{ question }}"}
            | {"out": "draft"}
        ],
        "outputs": {"answer": "draft"},
    }
    bad = copy.deepcopy(good)
    bad["workflow"][0]["agent"] = "reviewer"
    srv.responder = Script([(r".", [json.dumps(bad), json.dumps(good)])], field="system")
    said: list[str] = []
    result = generate_spec(
        "Add numbers.",
        LLMClient(srv.base_url, "k", model="tiny-model"),
        compact=True,
        inputs={"question": "string"},
        on_progress=said.append,
        model_label="Tiny (embedded: 1M parameters)",
    )
    assert result.prompt == "compact" and result.attempts == 2
    assert [p.code for p in result.history[0] if p.severity == "error"] == ["MAS201"]
    first, repair = srv.requests
    assert first.response_schema == compact_schema({"question": "string"})
    assert first.body["max_tokens"] == COMPACT_MAX_TOKENS
    assert "MAS201" in repair.last_user
    assert said[0] == "asking Tiny (embedded: 1M parameters) for a spec (compact prompt and schema)"
    assert result.to_json()["prompt"] == "compact"


def test_generate_compact_names_a_cut_off_reply(srv: LLMTestServer) -> None:
    """A grammar-constrained reply that is not whole JSON was cut off: the repair says so
    instead of listing the problems of some inner object."""
    cut = '{"spec_version": "1", "name": "x", "inputs": {"question": {"type": "string"}}, "ag'
    srv.responder = Script([(r".", cut)], field="system")
    with pytest.raises(GenerateError) as info:
        generate_spec("Add numbers.", LLMClient(srv.base_url, "k"), compact=True, max_repairs=1)
    assert [(p.code, p.pointer) for p in info.value.problems] == [("MAS001", "")]
    assert "cut off at the token limit" in info.value.problems[0].message
    assert "cut off at the token limit" in srv.requests[1].last_user
