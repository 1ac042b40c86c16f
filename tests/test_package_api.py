"""The library API of a compiled package (`arun`, `run_sync`, `RunResult`), in-process.

Each test imports a package compiled into a temporary folder (by `sys.path`), and runs it
against the loopback `LLMTestServer` with the real openai client: results for every
status, budgets tightened per call, client settings over the environment, `on_event`,
checkpoints per call, and many concurrent calls in one process that share no state.
The command line over the same API is tests/test_package_cli.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import compile_to, example_spec

from mas2c.lang.spec import Spec
from mas2c.testserver import ChatRequest, LLMTestServer

ECHO = {
    "spec_version": "1",
    "name": "api-echo",
    "description": "Echoes the question through one LLM call, then a code tool.",
    "inputs": {"question": {"type": "string"}, "n": {"type": "integer", "default": 1}},
    "outputs": {"answer": "answer", "shout": "shout"},
    "models": {"m": {"model": "test-model", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
    "agents": {"echo": {"role": "Echo", "instructions": "Repeat the question.", "model": "m"}},
    "tools": {
        "upper": {
            "code": "def upper(text: str) -> str:\n    return text.upper()\n",
        }
    },
    "workflow": [
        {"id": "ask", "kind": "call", "agent": "echo", "prompt": "Q: {{ question }}", "out": "answer"},
        {"id": "loud", "kind": "tool", "tool": "upper", "args": {"text": "{{ answer }}"}, "out": "shout"},
    ],
    "budgets": {"max_llm_calls": 5, "timeout_s": 60},
}


def echo_responder(req: ChatRequest) -> str:
    return f"echo {req.last_user}"


def _import(folder: Path, package: str) -> ModuleType:
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(package)
    finally:
        sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def echo_pkg(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    folder = tmp_path_factory.mktemp("echo")
    build = compile_to(Spec.model_validate(ECHO), folder)
    return _import(folder, build.package)


@pytest.fixture(scope="module")
def cot_pkg(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    folder = tmp_path_factory.mktemp("cot")
    build = compile_to(example_spec("chain-of-thought"), folder)
    return _import(folder, build.package)


@pytest.fixture
def server(llm_server: LLMTestServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[LLMTestServer]:
    """The test server; the environment holds no LLM settings (each test passes its own)."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MAS2C_LLM_SOCKET", "MAS2C_CHECKPOINT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MAS2C_RETRY_BASE_S", "0.01")
    yield llm_server


def client(server: LLMTestServer) -> dict[str, Any]:
    return {"base_url": server.base_url, "api_key": "sk-test"}


def read_trace(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


# -- the contract ------------------------------------------------------------------------------


def test_an_example_runs_through_run_sync(cot_pkg: ModuleType, server: LLMTestServer) -> None:
    from mas2c.runfolder import Result

    result = cot_pkg.run_sync({"question": "What is 6 * 7?"}, **client(server))
    assert isinstance(result, cot_pkg.RunResult)
    assert result.status == "ok" and result.exit_code == 0 and result.error is None
    assert set(result.outputs) == {"answer", "reasoning"}
    assert result.usage["calls"] == 1 and result.usage["by_agent"]["reasoner"]["calls"] == 1
    data = result.to_json()
    assert list(data) == ["status", "outputs", "usage"]
    Result.model_validate(data)  # the typed run-folder contract of out.json
    with pytest.raises(AttributeError, match="cannot assign"):
        result.status = "error"
    assert cot_pkg.__version__ == "1.0.0" and cot_pkg.SPEC.name == "chain-of-thought"
    assert {"arun", "run_sync", "RunResult", "RunError", "SPEC", "__version__"} <= set(
        cot_pkg.__all__
    )


def test_failures_are_results_with_codes_and_pointers(
    echo_pkg: ModuleType, server: LLMTestServer
) -> None:
    from mas2c.runfolder import Result

    bad = echo_pkg.run_sync({"question": 3}, **client(server))
    assert (bad.status, bad.exit_code, bad.error.code) == ("bad_input", 2, "bad_input")
    assert bad.error.pointer == "/inputs/question" and bad.outputs is None
    unknown = echo_pkg.run_sync({"question": "q", "extra": 1}, **client(server))
    assert unknown.status == "bad_input" and "extra" in unknown.error.message

    server.inject("status", status=400, message="no such thing")
    failed = echo_pkg.run_sync({"question": "q"}, **client(server))
    assert (failed.status, failed.exit_code, failed.error.code) == ("error", 1, "llm_error")
    assert failed.error.step == "ask" and failed.error.agent == "echo"
    assert failed.error.pointer == "/workflow/0"
    for result in (bad, unknown, failed):
        data = result.to_json()
        assert list(data) == ["status", "error", "usage"]
        assert list(data["error"]) == [
            "type", "code", "message", "spec_pointer", "spec_line", "step", "agent", "traceback"
        ]  # fmt: skip
        Result.model_validate(data)
    assert len(server.requests) == 1  # bad input never reached the LLM


def test_no_credentials_fails_before_any_request(
    echo_pkg: ModuleType, server: LLMTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    result = echo_pkg.run_sync({"question": "q"})
    assert (result.status, result.exit_code) == ("bad_input", 2)
    assert result.error.code == "no_credentials"
    assert "OPENAI_API_KEY" in result.error.message and "MAS2C_LLM_SOCKET" in result.error.message
    assert server.requests == []
    # the key from the environment is enough
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert echo_pkg.run_sync({"question": "q"}).status == "ok"
    assert server.requests[-1].headers.get("authorization") == "Bearer sk-env"


def test_credentials_are_needed_only_to_call_an_llm(
    echo_pkg: ModuleType, server: LLMTestServer, tmp_path: Path
) -> None:
    """A workflow without agent steps runs with no key (its unused agent aside); one whose
    LLM use the compiler could not see still fails before its first request."""
    tool_only = {**ECHO, "name": "api-tools-only", "outputs": {"shout": "shout"}}
    tool_only["workflow"] = [
        {"id": "loud", "kind": "tool", "tool": "upper", "args": {"text": "{{ question }}"}, "out": "shout"}
    ]
    build = compile_to(Spec.model_validate(tool_only), tmp_path / "tools-only")
    package = _import(tmp_path / "tools-only", build.package)
    assert package.SYSTEM.uses_llm is False and echo_pkg.SYSTEM.uses_llm is True
    assert package.run_sync({"question": "q"}).outputs == {"shout": "Q"}
    unseen = dataclasses.replace(echo_pkg.SYSTEM, uses_llm=False)
    result = unseen.run_sync({"question": "q"}, base_url=server.base_url)
    assert (result.status, result.exit_code) == ("bad_input", 2)
    assert result.error.code == "no_credentials" and result.error.step == "ask"
    assert server.requests == []


def test_arguments_override_the_environment(
    echo_pkg: ModuleType, server: LLMTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("MAS2C_LLM_SOCKET", "/nonexistent/llm.sock")
    server.responder = echo_responder
    result = echo_pkg.run_sync({"question": "q"}, base_url=server.base_url, api_key="sk-arg")
    assert result.status == "ok", result.error
    assert result.outputs == {"answer": "echo Q: q", "shout": "ECHO Q: Q"}
    assert server.requests[-1].headers.get("authorization") == "Bearer sk-arg"


def test_budgets_tighten_the_spec(echo_pkg: ModuleType, server: LLMTestServer) -> None:
    none = echo_pkg.run_sync({"question": "q"}, max_llm_calls=0, **client(server))
    assert (none.status, none.exit_code) == ("budget_exceeded", 3)
    assert none.error.code == "budget_calls" and none.error.pointer == "/budgets/max_llm_calls"
    assert server.requests == []
    # a looser limit than the spec's does not loosen it: the spec's 5 calls still hold
    assert echo_pkg.SPEC.budgets.max_llm_calls == 5
    looser = echo_pkg.run_sync({"question": "q"}, max_llm_calls=100, **client(server))
    assert looser.status == "ok"
    tokens = echo_pkg.run_sync({"question": "q"}, max_total_tokens=0, **client(server))
    assert tokens.error.code == "budget_tokens"
    cost = echo_pkg.run_sync({"question": "q"}, max_cost_usd=0.0, **client(server))
    assert cost.error.code == "budget_cost"
    server.latency_s = 2.0
    slow = echo_pkg.run_sync({"question": "q"}, timeout_s=0.3, **client(server))
    assert (slow.status, slow.exit_code, slow.error.code) == ("timeout", 4, "run_timeout")
    assert slow.error.pointer == "/budgets/timeout_s"


def test_programming_errors_raise(echo_pkg: ModuleType, server: LLMTestServer) -> None:
    for inputs in (["q"], "q", None):
        with pytest.raises(TypeError, match="inputs must be a mapping"):
            echo_pkg.run_sync(inputs)
    for kwargs, error in (
        ({"max_llm_calls": "3"}, TypeError),
        ({"max_llm_calls": True}, TypeError),
        ({"max_llm_calls": -1}, ValueError),
        ({"max_cost_usd": float("nan")}, ValueError),
        ({"timeout_s": 0}, ValueError),
        ({"base_url": 1}, TypeError),
        ({"on_event": "print"}, TypeError),
        ({"trace": 3}, TypeError),
    ):
        with pytest.raises(error):
            echo_pkg.run_sync({"question": "q"}, **kwargs)

    async def inside_a_loop() -> None:
        with pytest.raises(RuntimeError, match="await arun"):
            echo_pkg.run_sync({"question": "q"}, **client(server))

    asyncio.run(inside_a_loop())
    assert server.requests == []


def test_on_event_sees_every_trace_event_in_order(
    echo_pkg: ModuleType, server: LLMTestServer, tmp_path: Path
) -> None:
    seen: list[dict[str, Any]] = []
    trace = tmp_path / "t" / "trace.jsonl"
    result = echo_pkg.run_sync({"question": "q"}, trace=trace, on_event=seen.append, **client(server))
    assert result.status == "ok"
    assert seen == read_trace(trace)
    kinds = [event["event"] for event in seen]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and "llm_call" in kinds
    assert seen[-1]["status"] == "ok" and seen[-1]["exit_code"] == 0

    def broken(event: dict[str, Any]) -> None:
        raise ValueError("listener failed")

    again = echo_pkg.run_sync({"question": "q"}, on_event=broken, **client(server))
    assert again.status == "ok"
    assert again.warnings[0]["type"] == "on_event_error"
    assert "listener failed" in again.warnings[0]["message"]
    assert again.to_json()["warnings"] == list(again.warnings)


def test_checkpoints_are_per_call(echo_pkg: ModuleType, server: LLMTestServer, tmp_path: Path) -> None:
    first = echo_pkg.run_sync({"question": "q"}, checkpoint_dir=tmp_path / "a", **client(server))
    assert first.status == "ok" and len(list((tmp_path / "a").glob("*.json"))) == 2
    events: list[dict[str, Any]] = []
    resumed = echo_pkg.run_sync(
        {"question": "q"}, checkpoint_dir=tmp_path / "a", on_event=events.append, **client(server)
    )
    assert resumed.outputs == first.outputs and resumed.usage["calls"] == 0
    assert [e["step"] for e in events if e["event"] == "step_resumed"] == ["ask", "loud"]
    other = echo_pkg.run_sync({"question": "q"}, checkpoint_dir=tmp_path / "b", **client(server))
    assert other.usage["calls"] == 1  # another folder: nothing to resume from
    plain = echo_pkg.run_sync({"question": "q"}, **client(server))
    assert plain.usage["calls"] == 1  # no folder given: no checkpoints at all
    assert len(server.requests) == 3


def test_cancelling_arun_cancels_the_run(
    echo_pkg: ModuleType, server: LLMTestServer, tmp_path: Path
) -> None:
    server.latency_s = 5.0
    trace = tmp_path / "trace.jsonl"

    async def cancel() -> None:
        task = asyncio.ensure_future(echo_pkg.arun({"question": "q"}, trace=trace, **client(server)))
        while not server.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel())
    end = read_trace(trace)[-1]
    assert end["event"] == "run_end" and end["status"] == "interrupted"


# -- isolation ---------------------------------------------------------------------------------


def test_concurrent_calls_share_no_state(
    echo_pkg: ModuleType, server: LLMTestServer, tmp_path: Path
) -> None:
    """20 calls at once in one process: each has its own inputs, outputs, budget, usage,
    trace (file and events) and checkpoints; they overlap in time."""
    server.responder = echo_responder
    server.latency_s = 0.2
    count = 20

    async def one(i: int, events: list[dict[str, Any]]) -> Any:
        return await echo_pkg.arun(
            {"question": f"q{i}", "n": i},
            max_llm_calls=0 if i % 4 == 3 else None,  # every fourth call may not call the LLM
            trace=tmp_path / f"trace-{i}.jsonl",
            on_event=events.append,
            checkpoint_dir=tmp_path / f"ckpt-{i}",
            **client(server),
        )

    async def all_of_them() -> list[Any]:
        return list(await asyncio.gather(*(one(i, streams[i]) for i in range(count))))

    streams: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    results = asyncio.run(all_of_them())
    assert server.max_in_flight > 1  # the calls really overlapped
    trace_ids = set()
    for i, result in enumerate(results):
        trace = read_trace(tmp_path / f"trace-{i}.jsonl")
        assert streams[i] == trace
        ids = {event.get("trace_id") for event in trace if "trace_id" in event}
        assert len(ids) == 1
        trace_ids |= ids
        if i % 4 == 3:
            assert result.status == "budget_exceeded" and result.usage["calls"] == 0
            assert not [e for e in trace if e["event"] == "llm_call"]
            continue
        assert result.status == "ok", result.error
        assert result.outputs == {"answer": f"echo Q: q{i}", "shout": f"ECHO Q: Q{i}"}
        assert result.usage["calls"] == 1
        calls = [e for e in trace if e["event"] == "llm_call"]
        assert len(calls) == 1
        saved = [json.loads(p.read_text()) for p in (tmp_path / f"ckpt-{i}").glob("*.json")]
        assert {json.dumps(s["writes"]) for s in saved} >= {json.dumps({"answer": f"echo Q: q{i}"})}
    assert len(trace_ids) == count
    assert len(server.requests) == count - count // 4
