"""Delegation (agents as tools, an agent chosen by a state value) and prompt controls
(few-shot examples, per-step settings, chat-history inputs), end to end.

Runs compile `specs/manager-workers.yaml` (or a variant) and run it against the loopback
test server with the real `openai` client; what reaches the server (tools offered,
messages, request settings) and the trace (worker spans under the delegation span) are
asserted. The validator's rules are checked on small variants.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from conftest import compile_to, events, example_path, run_package
from test_e2e_examples import INPUTS, SCRIPTS

from mas2c import graph
from mas2c.configure import agent_uses
from mas2c.lang.spec import Spec
from mas2c.lang.validate import validate_text
from mas2c.testserver import LLMTestServer

NAME = "manager-workers"


def _data() -> dict[str, Any]:
    data = yaml.safe_load(example_path(NAME).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _codes(data: dict[str, Any]) -> list[tuple[str, str]]:
    report = validate_text(yaml.safe_dump(data, sort_keys=False), "v.yaml")
    return [(p.code, p.pointer) for p in report.errors]


def _run(data: dict[str, Any], tmp_path: Path, inputs: dict[str, Any] | None = None) -> Any:
    compile_to(Spec.model_validate(data), tmp_path / "build")
    with LLMTestServer(SCRIPTS[NAME]()) as server:
        result = run_package(tmp_path / "build", inputs or INPUTS[NAME], server)
        return (*result, list(server.requests))


def test_manager_calls_workers_as_tools_with_real_messages(tmp_path: Path) -> None:
    code, out, trace, stderr, requests = _run(_data(), tmp_path)
    assert code == 0, stderr
    manager = [r for r in requests if r.agent == "manager"]
    first = manager[0]
    # the workers are function tools named like the agents, described by their roles
    offered = {t["function"]["name"]: t["function"]["description"] for t in first.tools}
    assert set(offered) == {"researcher", "writer", "reviewer"}
    assert offered["researcher"].startswith("Ask the Researcher who finds and checks facts")
    # the chat history is real messages between the system prompt and the request
    roles = [m["role"] for m in first.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert first.messages[1]["content"] == "We publish notes for curious kids."
    # each worker got the manager's task; its answer went back as the tool message
    (research,) = [r for r in requests if r.agent == "researcher"]
    assert research.last_user == "Why is the sky blue?"
    tool_messages = [m for m in manager[1].messages if m.get("role") == "tool"]
    assert [m["content"] for m in tool_messages] == [
        "FACTS: Rayleigh scattering.",
        "DRAFT sky note",
    ]
    # trace: a tool_call span per worker call; the worker's llm_call is its child
    delegations = [e for e in events(trace, "tool_call") if e.get("worker")]
    assert [(e["worker"], e["agent"], e["status"]) for e in delegations] == [
        ("researcher", "manager", "ok"),
        ("writer", "manager", "ok"),
        ("reviewer", "manager", "ok"),
    ]
    calls = events(trace, "llm_call")
    for span in delegations:
        (child,) = [c for c in calls if c["parent_id"] == span["span_id"]]
        assert child["agent"] == span["worker"]
    assert out["usage"]["calls"] == 8  # the workers' calls count against the same budget


def test_few_shot_examples_and_step_settings_reach_the_model(tmp_path: Path) -> None:
    code, _out, _trace, stderr, requests = _run(_data(), tmp_path)
    assert code == 0, stderr
    (dispatch,) = [r for r in requests if r.agent == "dispatcher"]
    roles = [m["role"] for m in dispatch.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert dispatch.messages[1]["content"] == "Follow-up: Which studies support the claim?"
    assert (
        dispatch.messages[2]["content"] == '{"owner":"researcher","reason":"It asks for sources."}'
    )
    assert dispatch.body["temperature"] == 0 and dispatch.body["seed"] == 7
    # settings apply only inside their step
    (manager, *_rest) = [r for r in requests if r.agent == "manager"]
    assert "seed" not in manager.body and manager.body["temperature"] == 0.2


def test_a_step_may_override_the_model_and_sampling(tmp_path: Path) -> None:
    data = _data()
    data["workflow"][2]["settings"] = {
        "model": "strong",
        "max_tokens": 50,
        "stop": ["END"],
        "top_p": 0.5,
    }
    code, _out, trace, stderr, requests = _run(data, tmp_path)
    assert code == 0, stderr
    last = requests[-1]
    assert last.agent == "writer" and last.model == "gpt-4o"
    assert (last.body["max_tokens"], last.body["stop"], last.body["top_p"]) == (50, ["END"], 0.5)
    (call,) = [c for c in events(trace, "llm_call") if c["pointer"] == "/workflow/2"]
    assert call["model_id"] == "strong"  # priced and traced as the overriding model


def test_an_agent_outside_the_declared_set_is_a_coded_error(tmp_path: Path) -> None:
    data = _data()
    del data["agents"]["dispatcher"]["output"]["properties"]["owner"]["enum"]
    data["agents"]["dispatcher"]["examples"] = None
    del data["agents"]["dispatcher"]["examples"]
    assert _codes(data) == []  # a string: allowed statically, checked at run time
    compile_to(Spec.model_validate(data), tmp_path / "build")
    script = SCRIPTS[NAME]()
    script.answers["dispatcher"] = [{"owner": "reviewer", "reason": "?"}]
    with LLMTestServer(script) as server:
        code, out, _trace, _stderr = run_package(tmp_path / "build", INPUTS[NAME], server)
    assert code == 1
    assert out["error"]["code"] == "agent_choice"
    assert out["error"]["spec_pointer"] == "/workflow/2/agent"
    assert "'reviewer'" in out["error"]["message"]


def test_a_history_that_is_not_messages_is_a_coded_error(tmp_path: Path) -> None:
    data = _data()
    data["inputs"]["history"] = {"type": "array"}
    compile_to(Spec.model_validate(data), tmp_path / "build")
    with LLMTestServer(SCRIPTS[NAME]()) as server:
        inputs = {**INPUTS[NAME], "history": [{"role": "system", "content": "obey"}]}
        code, out, _trace, _stderr = run_package(tmp_path / "build", inputs, server)
    assert code == 1
    assert (out["error"]["code"], out["error"]["spec_pointer"]) == (
        "chat_history",
        "/workflow/0/history",
    )


def test_a_chat_input_is_checked_as_messages(tmp_path: Path) -> None:
    compile_to(Spec.model_validate(_data()), tmp_path / "build")
    with LLMTestServer(SCRIPTS[NAME]()) as server:
        inputs = {**INPUTS[NAME], "history": [{"role": "tool", "content": "x"}]}
        code, out, _trace, _stderr = run_package(tmp_path / "build", inputs, server)
    assert code == 2 and out["error"]["code"] == "bad_input"


def test_validator_rules_for_delegation_and_prompt_controls() -> None:
    base = _data()
    data = copy.deepcopy(base)
    data["agents"]["dispatcher"]["output"]["properties"]["owner"]["enum"] = [
        "researcher",
        "writer",
        "critic",
    ]
    assert _codes(data) == [("MAS210", "/workflow/2/agent")]
    data = copy.deepcopy(base)
    data["workflow"][2]["agent"] = "writer"
    assert _codes(data) == [("MAS210", "/workflow/2/agent")]
    data = copy.deepcopy(base)
    del data["workflow"][2]["agents"]
    assert _codes(data) == [("MAS210", "/workflow/2/agent")]
    data = copy.deepcopy(base)
    data["agents"]["writer"]["delegates"] = ["manager"]
    assert ("MAS211", "/agents/writer/delegates/0") in _codes(data)
    data = copy.deepcopy(base)
    data["agents"]["manager"]["delegates"].append("manager")
    assert _codes(data) == [("MAS211", "/agents/manager/delegates/3")]
    data = copy.deepcopy(base)
    data["agents"]["manager"]["delegates"].append("editor")
    assert _codes(data) == [("MAS201", "/agents/manager/delegates/3")]
    data = copy.deepcopy(base)
    data["workflow"][0]["history"] = "earlier: {{ history }}"
    assert _codes(data) == [("MAS212", "/workflow/0/history")]
    data = copy.deepcopy(base)
    data["workflow"][0]["history"] = "{{ request }}"
    assert _codes(data) == [("MAS212", "/workflow/0/history")]
    data = copy.deepcopy(base)
    data["agents"]["dispatcher"]["examples"][0]["assistant"] = {"owner": "nobody"}
    assert _codes(data) == [("MAS213", "/agents/dispatcher/examples/0/assistant")]
    data = copy.deepcopy(base)
    data["workflow"][1]["settings"]["model"] = "huge"
    assert _codes(data) == [("MAS203", "/workflow/1/settings/model")]


def test_graph_and_configure_know_the_workers() -> None:
    spec = Spec.model_validate(_data())
    mermaid = graph.mermaid(spec)
    assert 's_manage -->|"delegates"| a_researcher' in mermaid
    assert 's_answer_follow_up -->|"chooses"| a_writer' in mermaid
    uses = agent_uses(spec)
    assert any("worker of `manager`" in note for note in uses["reviewer"].notes)
