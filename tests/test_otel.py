"""`mas2c export otel`: a real run's spans into a real OTLP receiver, queried back.

The receiver is Arize Phoenix (PyPI `arize-phoenix`, installed by
scripts/setup-observe.sh into `.venv-phoenix`), started on loopback ports for this
module and stopped after it. The run is a real one (the hierarchical example in the
unisolated sandbox, against the loopback LLM server, traced with
content). The test reads the spans back from Phoenix's REST API and compares them
with the run folder: same trace id, same span ids, same parents, and the GenAI
attributes the trace recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mas2c.cli import main as cli_main
from mas2c.otel import span_attributes, traces_url
from mas2c.run import LLMConfig, run_system
from mas2c.testserver import LLMTestServer
from mas2c.tracing import Span, read_run_trace

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "mas2c-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _phoenix_command() -> list[str]:
    python = Path(
        os.environ.get("MAS2C_PHOENIX_PYTHON") or ROOT / ".venv-phoenix" / "bin" / "python"
    )
    if not python.exists():
        message = "Arize Phoenix is not installed: bash scripts/setup-observe.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return [str(python), "-m", "phoenix.server.main", "serve"]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
        return json.loads(response.read())


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Phoenix server on loopback; yields its base URL."""
    command = _phoenix_command()
    work = tmp_path_factory.mktemp("phoenix")
    port = _free_port()
    env = {
        **os.environ,
        "PHOENIX_WORKING_DIR": str(work),
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(_free_port()),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    log = (work / "phoenix.log").open("wb")
    proc = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{base}/healthz", timeout=2).close()
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (work / "phoenix.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"Phoenix did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("otel-run")
    inputs = {"decision": "Open a second office?", "context": "Team of 12."}
    (root / "in.json").write_text(json.dumps(inputs))
    with LLMTestServer(latency_s=0.02) as srv:
        outcome = run_system(
            ROOT / "specs" / "hierarchical.yaml",
            root / "in.json",
            root / "run",
            backend="unisolated",
            llm=LLMConfig(url=srv.base_url, api_key="sk-never-exported-12345"),
            on_warning=lambda _m: None,
            trace_content=True,
        )
    assert outcome.ok, outcome.result
    return root / "run"


def _attrs(span: dict[str, Any]) -> dict[str, Any]:
    def value(v: dict[str, Any]) -> Any:
        if v.get("array_value") is not None:
            return [value(x) for x in v["array_value"]["values"]]
        return next((x for x in v.values() if x is not None), None)

    return {a["key"]: value(a["value"]) for a in span.get("attributes") or []}


def _spans_in_phoenix(base: str, expected: int, project: str = PROJECT) -> list[dict[str, Any]]:
    """Phoenix ingests asynchronously: poll until every span is there (30 s at most)."""
    deadline = time.monotonic() + 30
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            spans = _get(f"{base}/v1/projects/{project}/spans/otlpv1?limit=1000")["data"]
            if len(spans) >= expected:
                return spans
        time.sleep(0.5)
    return spans


def test_spans_arrive_in_phoenix_with_parents_and_attributes(
    phoenix: str, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(
        ["export", "otel", str(run_dir), "--endpoint", phoenix, "--service", PROJECT, "--json"]
    )
    sent = json.loads(capsys.readouterr().out)
    assert code == 0 and sent["endpoint"] == f"{phoenix}/v1/traces"
    ours = read_run_trace(run_dir)
    header = json.loads((run_dir / "run.json").read_text())
    assert sent["trace_id"] == header["trace_id"] == ours.trace_id
    assert sent["spans"] == len(ours.spans)
    theirs = _spans_in_phoenix(phoenix, len(ours.spans))
    assert len(theirs) == len(ours.spans)
    assert {s["trace_id"] for s in theirs} == {ours.trace_id}
    parents = {s["span_id"]: s.get("parent_span_id") for s in theirs}
    assert parents == {s.span_id: s.parent_id for s in ours.spans}
    by_id = {s["span_id"]: s for s in theirs}
    # The tree: host span (root) > the package's run > steps > LLM calls.
    (host,) = [s for s in theirs if not s.get("parent_span_id")]
    assert host["span_id"] == header["span_id"] and host["name"] == "mas2c run"
    host_attrs = _attrs(host)
    assert host_attrs["mas2c.spec_sha256"] == header["spec_sha256"]
    assert host_attrs["mas2c.endpoint"].startswith("127.0.0.1:")
    assert "sk-never-exported-12345" not in json.dumps(theirs)
    steps = {s["name"]: s for s in theirs if s["name"].startswith("step ")}
    fork = steps["step investigate"]["span_id"]
    assert steps["step market_research"]["parent_span_id"] == fork
    run_span = by_id[steps["step plan"]["parent_span_id"]]
    assert run_span["name"] == "run hierarchical" and run_span["parent_span_id"] == host["span_id"]
    chats = [s for s in theirs if s["name"].startswith("chat ")]
    assert len(chats) == 5
    ours_by_id = {s.span_id: s for s in ours.spans}
    for chat in chats:
        attrs, span = _attrs(chat), ours_by_id[chat["span_id"]]
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.request.model"] == span.attrs["model"]
        assert attrs["gen_ai.agent.name"] == span.attrs["agent"]
        assert by_id[chat["parent_span_id"]]["name"] == f"step {span.attrs['step']}"
        assert chat["start_time_unix_nano"] <= chat["end_time_unix_nano"]
        if span.status == "ok":
            assert chat["status"]["code"] == 1
            assert attrs["gen_ai.usage.input_tokens"] == span.attrs["prompt_tokens"] > 0
            assert attrs["gen_ai.usage.output_tokens"] == span.attrs["completion_tokens"]
            assert attrs["mas2c.cost_usd"] == pytest.approx(span.attrs["cost_usd"])
            assert json.loads(attrs["gen_ai.input.messages"]) == span.attrs["messages"]
            assert json.loads(attrs["gen_ai.output.messages"]) == [span.attrs["completion"]]
        else:
            assert chat["status"]["code"] == 2 and attrs["error.type"] == "InternalServerError"
    plan = next(c for c in chats if _attrs(c)["gen_ai.agent.name"] == "manager")
    assert "Open a second office?" in _attrs(plan)["gen_ai.input.messages"]
    assert all(_attrs(c)["mas2c.retries"] == 0 for c in chats)


def test_every_repeat_and_the_fallback_arrive_in_phoenix(
    phoenix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run of every construct that repeats (map, loop, ensemble over a flow, retry,
    fallback, format repair, a worker agent): the spans arrive with their parents and the
    attributes that tell the repeats apart."""
    from mas2c.testserver import ChatRequest, Reply, ReplyLike, ToolCall
    from tests.test_trace import EVERY_KIND

    def respond(req: ChatRequest) -> ReplyLike:
        system = str(req.messages[0].get("content"))
        if "Boss who delegates" in system:
            if any(m.get("role") == "tool" for m in req.messages):
                return "delegated"
            return Reply(tool_calls=[ToolCall("helper", {"task": "Help"})])
        return "not json" if "Strict formatter" in system else "fine"

    (tmp_path / "spec.yaml").write_text(EVERY_KIND)
    (tmp_path / "in.json").write_text(json.dumps({"question": "q?", "docs": ["a", "b"]}))
    with LLMTestServer(respond) as srv:
        outcome = run_system(
            tmp_path / "spec.yaml",
            tmp_path / "in.json",
            tmp_path / "run",
            backend="unisolated",
            llm=LLMConfig(url=srv.base_url, api_key="sk-test"),
            on_warning=lambda _m: None,
        )
    assert outcome.ok, outcome.result
    project = "mas2c-kinds"
    argv = ["export", "otel", str(tmp_path / "run"), "--endpoint", phoenix, "--service", project]
    assert cli_main([*argv, "--json"]) == 0
    sent = json.loads(capsys.readouterr().out)
    ours = read_run_trace(tmp_path / "run")
    theirs = _spans_in_phoenix(phoenix, sent["spans"], project)
    assert len(theirs) == len(ours.spans) == sent["spans"]
    assert {s["span_id"]: s.get("parent_span_id") for s in theirs} == {
        s.span_id: s.parent_id for s in ours.spans
    }
    by_id = {s["span_id"]: s for s in theirs}
    (fallback,) = [s for s in theirs if s["name"] == "fallback of risky"]
    assert _attrs(fallback)["mas2c.error.code"] == "structured_output"
    (stand_in,) = [s for s in theirs if s["name"] == "step stand_in"]
    assert stand_in["parent_span_id"] == fallback["span_id"]
    attempts = sorted(
        (_attrs(s)["mas2c.step.attempt"], _attrs(s)["mas2c.step.attempts"], s["status"]["code"])
        for s in theirs
        if s["name"] == "step risky"
    )
    assert attempts == [(1, 2, 2), (2, 2, 2)]  # both failed (status code 2: error)
    items = sorted(_attrs(s)["mas2c.item"] for s in theirs if s["name"] == "step read")
    assert items == [[0], [1]]
    loops = sorted(_attrs(s)["mas2c.iteration"] for s in theirs if s["name"] == "step think")
    assert loops == [[1], [2]]
    samples = sorted(_attrs(s)["mas2c.sample"] for s in theirs if s["name"] == "step guess_once")
    assert samples == [0, 1]
    repairs = [_attrs(s).get("mas2c.format_repair") for s in theirs if s["name"].startswith("chat")]
    assert repairs.count(1) == repairs.count(2) == 2
    (worker,) = [s for s in theirs if _attrs(s).get("mas2c.worker") == "helper"]
    assert _attrs(worker)["gen_ai.operation.name"] == "execute_tool"
    (helper,) = [s for s in theirs if s["parent_span_id"] == worker["span_id"]]
    assert _attrs(helper)["gen_ai.agent.name"] == "helper"
    assert by_id[worker["parent_span_id"]]["name"] == "step delegate"


def test_run_exports_the_gateway_calls_live_then_the_trace(
    phoenix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mas2c run --otel URL`: each LLM call reaches Phoenix while the run goes (the last
    call is answered only once an earlier call's gateway span is in Phoenix), nested under
    the package's own chat span; then the whole trace follows."""
    from mas2c.testserver import ChatRequest, ReplyLike, default_responder

    project = "mas2c-live"
    seen_live: list[bool] = []

    def gateway_spans() -> list[dict[str, Any]]:
        with contextlib.suppress(OSError):
            found = _get(f"{phoenix}/v1/projects/{project}/spans/otlpv1?limit=1000")["data"]
            return [s for s in found if s["name"].startswith("gateway ")]
        return []

    def respond(req: ChatRequest) -> ReplyLike:
        schema = json.dumps(req.response_schema or {})
        if "recommendation" in schema:  # the last call (merge): wait for the live spans
            deadline = time.monotonic() + 30
            while not gateway_spans() and time.monotonic() < deadline:
                time.sleep(0.3)
            seen_live.append(bool(gateway_spans()))
        return default_responder(req)

    (tmp_path / "in.json").write_text(json.dumps({"decision": "Go?", "context": "Small."}))
    with LLMTestServer(respond) as srv:
        code = cli_main(
            [
                *("run", str(ROOT / "specs" / "hierarchical.yaml")),
                *("--input", str(tmp_path / "in.json"), "--run-dir", str(tmp_path / "run")),
                *("--sandbox", "unisolated", "--llm", srv.base_url),
                *("--otel", phoenix, "--otel-service", project),
            ]
        )
    err = capsys.readouterr().err
    assert code == 0, err
    assert seen_live == [True]  # a span was in Phoenix before the run ended
    assert "otel: 5 gateway span(s) live, then" in err
    ours = read_run_trace(tmp_path / "run")
    theirs = _spans_in_phoenix(phoenix, len(ours.spans) + 5, project)
    assert len(theirs) == len(ours.spans) + 5
    by_id = {s["span_id"]: s for s in theirs}
    gateway = [s for s in theirs if s["name"].startswith("gateway ")]
    assert len(gateway) == 5
    for span in gateway:
        parent = by_id[span["parent_span_id"]]
        assert parent["name"].startswith("chat ") and parent["trace_id"] == span["trace_id"]
        attrs, call = _attrs(span), _attrs(parent)
        assert attrs["gen_ai.agent.name"] == call["gen_ai.agent.name"]
        assert attrs["gen_ai.usage.input_tokens"] == call["gen_ai.usage.input_tokens"]
        assert attrs["mas2c.source"] == "upstream" and attrs["http.response.status_code"] == 200
    assert {s["trace_id"] for s in theirs} == {ours.trace_id}


def test_export_failures_are_one_line_errors(
    tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    assert cli_main(["export", "otel", str(run_dir), "--endpoint", closed, "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "did not accept the spans" in err and "Traceback" not in err
    secret_url = "ftp://user:hunter2@example.invalid/x"
    assert cli_main(["export", "otel", str(run_dir), "--endpoint", secret_url]) == 1
    err = capsys.readouterr().err
    assert "must be an http(s) URL" in err and "hunter2" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["export", "otel", str(empty), "--endpoint", closed]) == 1
    assert "no spans to export" in capsys.readouterr().err


def test_times_no_clock_has_are_clamped() -> None:
    from mas2c.otel import _ns

    assert _ns(float("nan")) == 0 and _ns(-5.0) == 0 and _ns(float("-inf")) == 0
    assert _ns(1e299) == _ns(float("inf")) == int(1.8e19) <= 2**64 - 1
    assert _ns(1.5) == 1_500_000_000


def test_urls_and_hostile_attribute_values() -> None:
    assert traces_url("http://h:4318") == "http://h:4318/v1/traces"
    assert traces_url("http://h:4318/") == "http://h:4318/v1/traces"
    assert traces_url("https://h/otlp/v1/traces") == "https://h/otlp/v1/traces"
    span = Span(
        "a" * 16,
        None,
        "llm",
        "x",
        0.0,
        1.0,
        "error",
        {
            "model": {"nested": ["<b>"]},
            "prompt_tokens": 2**70,
            "cost_usd": float("nan"),
            "error": "RateLimitError: slow down",
            "agent": "x" * 100_000,
            "finish_reason": None,
        },
    )
    attrs = span_attributes(span)
    assert attrs["gen_ai.request.model"] == '{"nested": ["<b>"]}'
    assert attrs["gen_ai.usage.input_tokens"] == str(2**70)
    assert attrs["mas2c.cost_usd"] == "nan"
    assert len(attrs["gen_ai.agent.name"]) == 32_000
    assert attrs["error.type"] == "RateLimitError"
    assert "gen_ai.response.finish_reasons" not in attrs
    assert all(isinstance(v, str | int | float | bool | list) for v in attrs.values())
