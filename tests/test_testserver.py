"""Tests for mas2c.testserver, driven through the real openai client."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from mas2c.testserver import (
    ChatRequest,
    LLMTestServer,
    Reply,
    Script,
    ToolCall,
    default_responder,
    schema_instance,
)


@pytest.fixture
def srv() -> Iterator[LLMTestServer]:
    with LLMTestServer() as server:
        yield server


def client_for(server: LLMTestServer, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, **kw)


def ask(client: openai.OpenAI, text: str, **kw: Any) -> Any:
    return client.chat.completions.create(
        model=kw.pop("model", "test-model"),
        messages=kw.pop("messages", [{"role": "user", "content": text}]),
        **kw,
    )


# ----------------------------------------------------------------- basic replies


def test_default_reply(srv: LLMTestServer) -> None:
    resp = ask(client_for(srv), "what is six times seven?", model="my-model")
    assert resp.object == "chat.completion"
    assert resp.model == "my-model"
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "ANSWER: 42"
    assert not choice.message.tool_calls


def test_usage_estimated_and_explicit(srv: LLMTestServer) -> None:
    client = client_for(srv)
    resp = ask(
        client,
        "",
        messages=[
            {"role": "system", "content": "you are terse"},
            {"role": "user", "content": "one two three"},
        ],
    )
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 6
    assert resp.usage.completion_tokens == 2  # "ANSWER: 42"
    assert resp.usage.total_tokens == 8

    srv.responder = lambda req: Reply(content="hi", prompt_tokens=100, completion_tokens=7)
    resp = ask(client, "x")
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (100, 7)
    assert resp.usage.total_tokens == 107


def test_script_rules_fields_and_cycling(srv: LLMTestServer) -> None:
    srv.responder = Script(
        [
            (r"capital.*France", "Paris"),
            (r"count", ["one", "two", "three"]),
            (r"json", {"a": 1}),
            (r"array", [[1, 2]]),
            (r"echo", lambda req: f"echo:{req.last_user}"),
            (r"reply", Reply(content="via Reply")),
        ],
        default="no rule",
    )
    client = client_for(srv)

    def text(q: str) -> str | None:
        return str(ask(client, q).choices[0].message.content)

    assert text("What is the capital\nof France?") == "Paris"  # DOTALL
    assert [text("count!") for _ in range(4)] == ["one", "two", "three", "three"]
    assert json.loads(text("json please") or "") == {"a": 1}
    assert json.loads(text("array please") or "") == [1, 2]
    assert text("echo me") == "echo:echo me"
    assert text("reply") == "via Reply"
    assert text("nothing matches") == "no rule"


def test_script_system_field_and_default_responder() -> None:
    script = Script([(r"^You are the critic", "critique")], field="system")
    critic = ChatRequest(
        body={"messages": [{"role": "system", "content": "You are the critic."}]}, headers={}
    )
    other = ChatRequest(body={"messages": [{"role": "user", "content": "hi"}]}, headers={})
    assert script(critic) == "critique"
    assert script(other) == "ANSWER: 42"
    with pytest.raises(ValueError):
        Script([], field="nope")


def test_chat_request_properties() -> None:
    req = ChatRequest(
        body={
            "model": "m",
            "messages": [
                {"role": "system", "content": "S1"},
                {"role": "user", "content": [{"type": "text", "text": "U1"}]},
                {"role": "assistant", "content": None},
                {"role": "system", "content": "S2"},
                {"role": "user", "content": "U2"},
            ],
            "response_format": {"type": "json_object"},
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        headers={"x-mas2c-agent": "planner"},
    )
    assert req.model == "m"
    assert req.system == "S1\nS2"
    assert req.last_user == "U2"
    assert req.all_text == "S1\nU1\n\nS2\nU2"
    assert req.json_mode and req.response_schema is None
    assert req.tools[0]["function"]["name"] == "f"
    assert req.agent == "planner"
    assert default_responder(req) == {}
    empty = ChatRequest(body={}, headers={})
    assert (empty.system, empty.last_user, empty.agent, empty.json_mode) == ("", "", None, False)


# ------------------------------------------------------------- structured output

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 18},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "role": {"type": "string", "enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "address": {"$ref": "#/$defs/Address"},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "optional": {"type": "string"},
    },
    "required": ["name", "age", "score", "active", "role", "tags", "address", "nickname"],
    "$defs": {
        "Address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"const": "00000"}},
        }
    },
}


def test_json_schema_reply_matches_schema(srv: LLMTestServer) -> None:
    resp = ask(
        client_for(srv),
        "give me a person",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Person", "schema": PERSON_SCHEMA, "strict": True},
        },
    )
    data = json.loads(resp.choices[0].message.content or "")
    assert data == {
        "name": "x",
        "age": 18,
        "score": 0.0,
        "active": True,
        "role": "admin",
        "tags": ["x", "x"],
        "address": {"city": "x", "zip": "00000"},
        "nickname": "x",
    }
    assert srv.requests[-1].response_schema == PERSON_SCHEMA


def test_json_object_mode(srv: LLMTestServer) -> None:
    resp = ask(client_for(srv), "json", response_format={"type": "json_object"})
    assert json.loads(resp.choices[0].message.content or "") == {}


def test_schema_instance_edge_cases() -> None:
    assert schema_instance({}) == "x"
    assert schema_instance({"type": "null"}) is None
    assert schema_instance({"type": "integer", "minimum": -5}) == 0
    assert schema_instance({"type": "integer", "exclusiveMinimum": 3}) == 4
    assert schema_instance({"type": "number", "minimum": 1.5}) == 1.5
    assert schema_instance({"type": "string", "minLength": 3}) == "xxx"
    assert schema_instance({"type": ["integer", "null"]}) == 0
    assert schema_instance({"oneOf": [{"type": "boolean"}, {"type": "string"}]}) is True
    assert schema_instance({"properties": {"a": {"type": "integer"}}}) == {"a": 0}
    recursive = {
        "$ref": "#/definitions/Node",
        "definitions": {
            "Node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/definitions/Node"}},
                },
                "required": ["v", "kids"],
            }
        },
    }
    assert schema_instance(recursive) == {"v": 0, "kids": []}


# -------------------------------------------------------------------- tool calls


def test_tool_calls_round_trip(srv: LLMTestServer) -> None:
    srv.responder = Script(
        [
            (r"RESULT", "the sum is 5"),
            (r"add", Reply(tool_calls=[ToolCall("add", {"a": 2, "b": 3})])),
        ],
        field="all_text",
    )
    client = client_for(srv)
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "parameters": {"type": "object", "properties": {"a": {}, "b": {}}},
            },
        }
    ]
    messages: list[Any] = [{"role": "user", "content": "please add 2 and 3"}]
    resp = ask(client, "", messages=messages, tools=tools)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id == "call_0" and call.type == "function"
    assert call.function.name == "add"
    args = json.loads(call.function.arguments)
    assert args == {"a": 2, "b": 3}

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": f"RESULT {args['a'] + args['b']}"},
    ]
    resp = ask(client, "", messages=messages, tools=tools)
    assert resp.choices[0].message.content == "the sum is 5"
    assert srv.requests[0].tools[0]["function"]["name"] == "add"
    assert srv.requests[1].messages[1]["tool_calls"][0]["function"]["name"] == "add"


# ------------------------------------------------------------------------ faults


def test_fault_status_429_with_retry_after(srv: LLMTestServer) -> None:
    client = client_for(srv)
    srv.inject("status", 2, status=429, retry_after=2)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as info:
            ask(client, "hi")
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "2"
        body = info.value.response.json()
        assert set(body["error"]) == {"message", "type", "code"}
        assert body["error"]["code"] == "rate_limit_exceeded"
    assert ask(client, "hi").choices[0].message.content == "ANSWER: 42"


def test_fault_status_500(srv: LLMTestServer) -> None:
    srv.inject("status")
    with pytest.raises(openai.InternalServerError) as info:
        ask(client_for(srv), "hi")
    assert info.value.status_code == 500
    assert "retry-after" not in info.value.response.headers


def test_fault_malformed(srv: LLMTestServer) -> None:
    srv.inject("malformed")
    with pytest.raises(ValueError):  # json.JSONDecodeError while parsing the body
        ask(client_for(srv), "hi")
    assert ask(client_for(srv), "hi").choices[0].message.content == "ANSWER: 42"


def test_fault_hang_triggers_client_timeout(srv: LLMTestServer) -> None:
    srv.inject("hang", seconds=1.0)
    client = client_for(srv, timeout=0.2)
    with pytest.raises(openai.APITimeoutError):
        ask(client, "hi")
    assert ask(client, "hi").choices[0].message.content == "ANSWER: 42"


def test_fault_hang_then_answers(srv: LLMTestServer) -> None:
    srv.inject("hang", seconds=0.1)
    assert ask(client_for(srv), "hi").choices[0].message.content == "ANSWER: 42"


def test_fault_invalid_json(srv: LLMTestServer) -> None:
    srv.inject("invalid_json")
    resp = ask(client_for(srv), "json", response_format={"type": "json_object"})
    assert resp.choices[0].finish_reason == "stop"
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.choices[0].message.content or "")
    resp = ask(client_for(srv), "json", response_format={"type": "json_object"})
    assert json.loads(resp.choices[0].message.content or "") == {}


def test_fault_drop(srv: LLMTestServer) -> None:
    srv.inject("drop")
    client = client_for(srv)
    with pytest.raises(openai.APIConnectionError):
        ask(client, "hi")
    assert ask(client, "hi").choices[0].message.content == "ANSWER: 42"
    assert len(srv.requests) == 2


def test_inject_rejects_unknown_fault(srv: LLMTestServer) -> None:
    with pytest.raises(ValueError):
        srv.inject("explode")


def test_responder_exception_is_500_and_server_survives(srv: LLMTestServer) -> None:
    def boom(req: ChatRequest) -> str:
        raise RuntimeError("kaboom")

    srv.responder = boom
    client = client_for(srv)
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, "hi")
    assert "kaboom" in info.value.response.json()["error"]["message"]
    srv.responder = default_responder
    assert ask(client, "hi").choices[0].message.content == "ANSWER: 42"


def test_stream_is_rejected(srv: LLMTestServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client_for(srv), "hi", stream=True)
    assert "stream" in info.value.response.json()["error"]["message"]


# ------------------------------------------------------------ endpoints, records


def test_models_and_404_and_path_without_v1(srv: LLMTestServer) -> None:
    assert [m.id for m in client_for(srv).models.list()] == ["test-model"]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{srv.url}/v1/nothing", timeout=5)
    assert info.value.code == 404
    assert "error" in json.loads(info.value.read())
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(
        f"{srv.url}/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert json.loads(resp.read())["choices"][0]["message"]["content"] == "ANSWER: 42"


def test_requests_recorded_with_headers(srv: LLMTestServer) -> None:
    client = client_for(srv)
    ask(client, "first", extra_headers={"X-Mas2c-Agent": "solver"})
    ask(client, "second")
    assert [r.last_user for r in srv.requests] == ["first", "second"]
    assert srv.requests[0].agent == "solver"
    assert srv.requests[0].headers["authorization"] == "Bearer test"
    assert srv.requests[1].agent is None
    srv.reset_counters()
    assert srv.requests == [] and srv.max_in_flight == 0


def _held_server(release: threading.Event) -> LLMTestServer:
    """A server whose every answer waits until the test releases it (at most 60 s)."""

    def held(req: ChatRequest) -> str:
        release.wait(60)
        return "ANSWER: 42"

    return LLMTestServer(held)


def _wait_until_in_flight(server: LLMTestServer) -> None:
    deadline = time.monotonic() + 60
    while server.in_flight == 0:
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.01)


def test_reset_counters_waits_for_requests_still_being_handled() -> None:
    """A request whose handler has not finished yet must not leak into the next count.

    (In CI a client held its answer while the server thread was still closing the request
    out, so max_in_flight read 1 right after a reset.)
    """
    release = threading.Event()
    with _held_server(release) as server, ThreadPoolExecutor(max_workers=2) as pool:
        pending = pool.submit(ask, client_for(server), "slow")
        _wait_until_in_flight(server)
        pool.submit(lambda: (time.sleep(0.2), release.set()))
        server.reset_counters(settle=60)  # waits for the held request to end
        assert server.in_flight == 0 and server.max_in_flight == 0 and server.requests == []
        assert pending.result(timeout=60).choices[0].message.content == "ANSWER: 42"


def test_reset_counters_keeps_counting_a_request_that_outlives_settle() -> None:
    release = threading.Event()
    with _held_server(release) as server, ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(ask, client_for(server), "slow")
        _wait_until_in_flight(server)
        server.reset_counters(settle=0.05)
        assert server.in_flight == 1 and server.max_in_flight == 1
        release.set()
        pending.result(timeout=60)
        server.reset_counters(settle=60)
        assert server.in_flight == 0


def test_concurrent_requests_overlap() -> None:
    with LLMTestServer(latency_s=1.0) as server:
        client = client_for(server)
        with ThreadPoolExecutor(max_workers=50) as pool:
            replies = list(pool.map(lambda i: ask(client, f"q{i}"), range(50)))
        assert all(r.choices[0].message.content == "ANSWER: 42" for r in replies)
        assert len(server.requests) == 50
        assert server.max_in_flight >= 40
        assert server.in_flight == 0


def test_reply_latency_overrides_default(srv: LLMTestServer) -> None:
    srv.latency_s = 30.0
    srv.responder = lambda req: Reply(content="fast", latency_s=0.0)
    assert ask(client_for(srv, timeout=5), "hi").choices[0].message.content == "fast"


def test_base_url_requires_start() -> None:
    server = LLMTestServer()
    with pytest.raises(RuntimeError):
        _ = server.base_url
    server.start()
    try:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.base_url.endswith("/v1")
    finally:
        server.stop()


# ----------------------------------------------------------------- the shell command


def test_cli_serves_a_script_file(tmp_path: Path) -> None:
    """`python -m mas2c.testserver --script FILE` prints its URL and answers by the script."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "script.yaml"
    script.write_text(
        "# answers for an offline run\n"
        "rules:\n"
        "  - match: capital\n"
        "    reply: Paris\n"
        "  - match: count\n"
        "    replies: [one, two]\n"
        "  - match: plan\n"
        "    json: {steps: [a, b]}\n"
        "  - match: tool\n"
        "    reply: {tool_calls: [{name: add, arguments: {a: 1}}], completion_tokens: 7}\n"
        "default: no idea\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mas2c.testserver", "--script", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)

        def ask(text: str) -> Any:
            return client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": text}]
            ).choices[0]

        assert ask("the capital of France?").message.content == "Paris"
        assert [ask("count").message.content for _ in range(3)] == ["one", "two", "two"]
        assert json.loads(ask("plan it").message.content or "") == {"steps": ["a", "b"]}
        call = ask("use a tool").message.tool_calls
        assert call is not None and call[0].function.name == "add"  # type: ignore[union-attr]
        assert ask("something else").message.content == "no idea"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
    assert rc == 0


def test_cli_bad_script_is_one_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - match: '('\n    reply: x\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c.testserver", "--script", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.startswith(f"error: {bad}: rules[0]: bad regex")
        and "Traceback" not in proc.stderr
    )
