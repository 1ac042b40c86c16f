"""The LLM gateway against the loopback test server, through the real openai client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mas2c.gateway import (
    Budget,
    Gateway,
    GatewayError,
    GatewayLimits,
    HttpUpstream,
    Price,
    UpstreamError,
    request_key,
)
from mas2c.testserver import ChatRequest, LLMTestServer, Reply, Script

KEY = "sk-host-secret-123"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte AF_UNIX limit; use a short dir.
    d = Path(tempfile.mkdtemp(prefix="gw", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def srv() -> Iterator[LLMTestServer]:
    with LLMTestServer() as s:
        yield s


def upstream(srv: LLMTestServer, **kw: Any) -> HttpUpstream:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 5.0)
    return HttpUpstream(srv.base_url, KEY, **kw)


def client(sock: Path, agent: str | None = None) -> openai.OpenAI:
    headers = {"X-Mas2c-Agent": agent, "X-Mas2c-Step": "/steps/0"} if agent else None
    return openai.OpenAI(
        base_url="http://mas2c-gateway/v1",
        api_key="sandbox",
        # openai>=3 is typed for httpx2 clients but accepts legacy httpx ones at runtime.
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))),  # type: ignore[arg-type]
        max_retries=0,
        default_headers=headers,
    )


def ask(c: openai.OpenAI, text: str, model: str = "m1", **kw: Any) -> str:
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)
    return r.choices[0].message.content or ""


def raw_post(sock: Path, path: str, content: bytes) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as h:
        return h.post(f"http://mas2c-gateway{path}", content=content)


# ----------------------------------------------------------------- forwarding


def test_forwarding_and_key_injection(srv: LLMTestServer, sockdir: Path) -> None:
    srv.responder = Script([(r"capital", "Paris")], default="dunno")
    sock = sockdir / "gw.sock"
    with Gateway(sock, upstream(srv)):
        c = client(sock, agent="planner")
        assert ask(c, "the capital of France?") == "Paris"
        assert ask(c, "what else?") == "dunno"
        models = c.models.list()
        assert [m.id for m in models.data] == ["m1"]
        # also served without the /v1 prefix
        body = {"model": "m1", "messages": [{"role": "user", "content": "capital"}]}
        r = raw_post(sock, "/chat/completions", json.dumps(body).encode())
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "Paris"
    assert len(srv.requests) == 3
    for req in srv.requests:
        assert req.headers["authorization"] == f"Bearer {KEY}"
        assert "sandbox" not in json.dumps(req.headers)
        # program headers (agent, step, anything else) are not forwarded
        assert "x-mas2c-agent" not in req.headers
        assert "x-mas2c-step" not in req.headers
    assert srv.requests[0].body["messages"][0]["content"] == "the capital of France?"


def test_bad_requests(srv: LLMTestServer, sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    with Gateway(sock, upstream(srv)) as gw:
        r = raw_post(sock, "/v1/chat/completions", b"{not json")
        assert r.status_code == 400
        assert "not valid JSON" in r.json()["error"]["message"]
        r = raw_post(sock, "/v1/chat/completions", b'{"messages": []}')
        assert r.status_code == 400
        r = raw_post(sock, "/v1/embeddings", b"{}")
        assert r.status_code == 404
        c = client(sock)
        with pytest.raises(openai.BadRequestError, match="streaming"):
            c.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        assert gw.usage()["errors"] == 3
        assert gw.usage()["calls"] == 0
    assert srv.requests == []


# ----------------------------------------------------------------- accounting


def test_usage_per_agent_and_model_and_cost(srv: LLMTestServer, sockdir: Path) -> None:
    srv.responder = lambda req: Reply(content="ok", prompt_tokens=100, completion_tokens=50)
    events: list[dict[str, Any]] = []
    sock = sockdir / "gw.sock"
    prices = {"m1": Price(input_per_mtok=1.0, output_per_mtok=2.0)}
    with Gateway(sock, upstream(srv), prices=prices, on_event=events.append) as gw:
        ask(client(sock, "a"), "x")
        ask(client(sock, "a"), "y", model="m2")
        ask(client(sock, "b"), "z")
        ask(client(sock), "w")  # no agent header
        u = gw.usage()
    assert (u["calls"], u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (
        4,
        400,
        200,
        600,
    )
    assert u["cost_usd"] == pytest.approx(3 * (100 * 1.0 + 50 * 2.0) / 1e6)
    assert set(u["by_agent"]) == {"a", "b", "unknown"}
    assert u["by_agent"]["a"]["calls"] == 2
    assert u["by_agent"]["a"]["total_tokens"] == 300
    assert u["by_agent"]["a"]["cost_usd"] == pytest.approx(200 / 1e6)
    assert u["by_model"]["m2"] == {
        "calls": 1,
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "total_tokens": 150,
        "cost_usd": 0.0,
    }
    assert u["by_model"]["m1"]["calls"] == 3
    assert u["budget_exceeded"] is False and u["errors"] == 0
    assert [(e["agent"], e["model"], e["status"], e["total_tokens"]) for e in events] == [
        ("a", "m1", 200, 150),
        ("a", "m2", 200, 150),
        ("b", "m1", 200, 150),
        ("unknown", "m1", 200, 150),
    ]
    assert events[0]["step"] == "/steps/0" and events[0]["latency_s"] >= 0


class NoUsageUpstream:
    """An in-process upstream (like the embedded engine) that reports no usage."""

    name = "no-usage"

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "a" * 40},
                }
            ],
        }


class BrokenUpstream:
    name = "broken"

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("engine exploded")


def test_usage_estimated_when_upstream_reports_none(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    with Gateway(sock, NoUsageUpstream()) as gw:
        r = client(sock).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "b" * 76}]
        )
        u = gw.usage()
    assert r.usage is not None and r.usage.completion_tokens == 10
    assert u["completion_tokens"] == 10 and u["prompt_tokens"] == 20  # (76 + 4) / 4


def test_non_http_upstream_failure_is_502(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    with Gateway(sock, BrokenUpstream()) as gw:
        with pytest.raises(openai.InternalServerError, match="engine exploded") as ei:
            ask(client(sock), "hi")
        assert ei.value.status_code == 502
        assert gw.usage()["errors"] == 1


# ----------------------------------------------------------------- budget


def refused(c: openai.OpenAI, text: str = "again") -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as ei:
        ask(c, text)
    err = ei.value
    assert err.status_code == 402
    assert err.code == "mas2c_budget_exceeded"
    assert err.type == "budget_exceeded"
    return err


def test_budget_calls(srv: LLMTestServer, sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    with Gateway(sock, upstream(srv), budget=Budget(max_llm_calls=2)) as gw:
        c = client(sock)
        ask(c, "1")
        ask(c, "2")
        assert gw.usage()["budget_exceeded"] is False
        err = refused(c)
        assert "max_llm_calls" in err.message and "max 2" in err.message
        assert err.param == "max_llm_calls"  # the limit, for the program's spec pointer
        u = gw.usage()
    assert u["budget_exceeded"] is True and u["calls"] == 2 and u["refused"] == 1
    assert len(srv.requests) == 2


def test_budget_tokens(srv: LLMTestServer, sockdir: Path) -> None:
    srv.responder = lambda req: Reply(content="ok", prompt_tokens=100, completion_tokens=50)
    sock = sockdir / "gw.sock"
    with Gateway(sock, upstream(srv), budget=Budget(max_total_tokens=350)) as gw:
        c = client(sock)
        ask(c, "1")  # 150 used
        ask(c, "2")  # 300 used: 50 left, less than this prompt's bound (+1)
        err = refused(c)
        assert "max_total_tokens" in err.message and "300 tokens used" in err.message
        assert err.param == "max_total_tokens"
        assert gw.usage()["budget_exceeded"] is True
    assert len(srv.requests) == 2


def test_budget_cost(srv: LLMTestServer, sockdir: Path) -> None:
    srv.responder = lambda req: Reply(content="ok", prompt_tokens=1000, completion_tokens=1000)
    sock = sockdir / "gw.sock"
    prices = {"m1": Price(input_per_mtok=3.0, output_per_mtok=7.0)}  # $0.01 per call
    with Gateway(sock, upstream(srv), prices=prices, budget=Budget(max_cost_usd=0.0201)) as gw:
        c = client(sock)
        ask(c, "1")
        ask(c, "2")
        err = refused(c)
        assert "max_cost_usd" in err.message and "$0.020000 used" in err.message
        assert err.param == "max_cost_usd"
        assert gw.usage()["cost_usd"] == pytest.approx(0.02)
    assert len(srv.requests) == 2


def test_budget_calls_hold_under_fan_out(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    with (
        LLMTestServer(latency_s=0.1) as srv,
        Gateway(sock, upstream(srv), budget=Budget(max_llm_calls=5)) as gw,
    ):
        statuses = asyncio.run(fan_out(sock, 20))
        assert sorted(statuses) == [200] * 5 + [402] * 15
        assert gw.usage()["calls"] == 5
    assert len(srv.requests) == 5


# ----------------------------------------------------------------- faults and retries


def test_retries_then_success(srv: LLMTestServer, sockdir: Path) -> None:
    srv.responder = lambda req: "finally"
    srv.inject("status", status=429, retry_after=0.05)
    srv.inject("status", status=500)
    srv.inject("malformed")
    srv.inject("drop")
    srv.inject("hang", seconds=1.0)
    sock = sockdir / "gw.sock"
    with Gateway(sock, upstream(srv, max_attempts=6, timeout_s=0.3)) as gw:
        t0 = time.monotonic()
        assert ask(client(sock), "hi") == "finally"
        assert time.monotonic() - t0 >= 0.05  # Retry-After honoured
        u = gw.usage()
    assert len(srv.requests) == 6
    assert u["calls"] == 1 and u["errors"] == 0 and u["upstream_calls"] == 1


def test_gives_up_with_502_and_clear_message(srv: LLMTestServer, sockdir: Path) -> None:
    srv.inject("status", count=10, status=503)
    sock = sockdir / "gw.sock"
    with Gateway(sock, upstream(srv, max_attempts=3)) as gw:
        with pytest.raises(openai.InternalServerError) as ei:
            ask(client(sock), "hi")
        assert ei.value.status_code == 502
        assert "failed after 3 attempts" in ei.value.message
        assert "HTTP 503" in ei.value.message
        assert srv.base_url in ei.value.message
        assert gw.usage()["errors"] == 1 and gw.usage()["calls"] == 0
    assert len(srv.requests) == 3


def test_closing_the_upstream_ends_a_request_still_being_retried(
    srv: LLMTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that ended (its program failed fast) closes the upstream while another of its
    requests is between retries: that request ends at once with a clear UpstreamError,
    never httpx's RuntimeError and a logged traceback."""
    from concurrent.futures import ThreadPoolExecutor

    srv.inject("status", count=50, status=503)
    up = upstream(srv, max_attempts=8, backoff_s=30.0, max_backoff_s=30.0)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(up.complete, body)
        deadline = time.monotonic() + 60
        while not srv.requests and not pending.done():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        up.close()
        with pytest.raises(UpstreamError, match="abandoned, its run has ended") as ei:
            pending.result(timeout=10)
    assert time.monotonic() - t0 < 15.0  # the 30 s backoff was cut short
    assert ei.value.retryable is False and ei.value.status == 502
    assert len(srv.requests) == 1  # no attempt after the close
    assert not [r for r in caplog.records if r.exc_info]


def test_a_run_ending_mid_retry_logs_no_traceback(
    srv: LLMTestServer, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same through a gateway: it stops, then its upstream closes, while a handler thread
    is still retrying for a client that has gone."""
    srv.inject("status", count=50, status=503)
    up = upstream(srv, max_attempts=8, backoff_s=0.5, max_backoff_s=0.5)
    sock = sockdir / "gw.sock"
    with Gateway(sock, up) as gw:
        c = client(sock).with_options(timeout=0.3, max_retries=0)
        with pytest.raises(openai.APITimeoutError):
            ask(c, "hi")
    up.close()
    deadline = time.monotonic() + 60
    while gw.usage()["errors"] == 0:  # the handler thread has ended the request
        assert time.monotonic() < deadline, "the handler never ended the request"
        time.sleep(0.05)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert len(srv.requests) < 8  # not every attempt: the close ended the retries


def test_program_client_does_not_multiply_retries(srv: LLMTestServer, sockdir: Path) -> None:
    srv.inject("status", count=10, status=500)
    sock = sockdir / "gw.sock"
    with Gateway(sock, upstream(srv, max_attempts=2)):
        c = client(sock).with_options(max_retries=3)
        with pytest.raises(openai.InternalServerError):
            ask(c, "hi")
    assert len(srv.requests) == 2  # x-should-retry: false


def test_no_retry_on_400(srv: LLMTestServer, sockdir: Path) -> None:
    srv.inject("status", count=5, status=400)
    sock = sockdir / "gw.sock"
    with (
        Gateway(sock, upstream(srv)),
        pytest.raises(openai.BadRequestError, match="injected fault: HTTP 400"),
    ):
        ask(client(sock), "hi")
    assert len(srv.requests) == 1


def test_http_upstream_direct(srv: LLMTestServer) -> None:
    srv.inject("status", count=5, status=401)
    with upstream(srv) as up:
        with pytest.raises(UpstreamError) as ei:
            up.complete({"model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert ei.value.status == 401 and not ei.value.retryable
        assert KEY not in repr(up)


# ----------------------------------------------------------------- cassette and cache


def session(c: openai.OpenAI) -> list[str]:
    return [ask(c, "first"), ask(c, "same"), ask(c, "same"), ask(c, "same", model="m2")]


def test_record_then_replay_without_upstream(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    cassette = sockdir / "run" / "cassette.jsonl"
    script = Script([(r"first", "one"), (r"same", ["A", "B", "C"])])
    with LLMTestServer(script) as srv, Gateway(sock, upstream(srv), record=cassette) as gw:
        recorded = session(client(sock, "a"))
        rec_usage = gw.usage()
    assert recorded == ["one", "A", "B", "C"]
    lines = [json.loads(x) for x in cassette.read_text().splitlines()]
    assert len(lines) == 4
    assert lines[1]["key"] == request_key(lines[1]["request"])
    assert lines[1]["response"]["choices"][0]["message"]["content"] == "A"

    # the upstream is gone: replay alone answers, in recorded order
    with Gateway(sock, None, replay=cassette) as gw:
        c = client(sock, "a")
        assert session(c) == recorded
        assert ask(c, "same") == "B"  # the last recorded answer for that request repeats
        u = gw.usage()
    assert u["replayed"] == 5 and u["upstream_calls"] == 0
    # a fresh replay of the same session gives exactly the recorded usage
    with Gateway(sock, None, replay=cassette) as gw:
        session(client(sock, "a"))
        assert {k: v for k, v in gw.usage().items() if k not in ("replayed", "upstream_calls")} == {
            k: v for k, v in rec_usage.items() if k not in ("replayed", "upstream_calls")
        }


def test_cassette_miss(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    cassette = sockdir / "c.jsonl"
    with LLMTestServer() as srv, Gateway(sock, upstream(srv), record=cassette):
        ask(client(sock), "known")
    with Gateway(sock, None, replay=cassette) as gw:
        question = "never asked " + "z" * 300
        with pytest.raises(openai.BadRequestError) as ei:
            ask(client(sock), question, model="gpt-x")
        err = ei.value
        assert err.code == "mas2c_cassette_miss"
        assert "'gpt-x'" in err.message
        assert question[:200] in err.message and question[:201] not in err.message
        assert gw.usage()["errors"] == 1


def test_bad_cassette_and_no_upstream(sockdir: Path) -> None:
    bad = sockdir / "bad.jsonl"
    bad.write_text('{"key": "k", "response": {}}\nnot json\n')
    with pytest.raises(GatewayError, match=r"bad.jsonl:2"):
        Gateway(sockdir / "gw.sock", None, replay=bad)
    with pytest.raises(GatewayError, match="upstream or a replay"):
        Gateway(sockdir / "gw.sock", None)


def test_cache(srv: LLMTestServer, sockdir: Path) -> None:
    srv.responder = Script([(r".", ["one", "two", "three"])])
    sock = sockdir / "gw.sock"
    with Gateway(sock, upstream(srv), cache=True) as gw:
        c = client(sock)
        assert ask(c, "q") == "one"
        assert ask(c, "q") == "one"  # cached, the upstream would have said "two"
        assert ask(c, "q", temperature=0.5) == "two"  # a different body
        u = gw.usage()
    assert len(srv.requests) == 2
    assert u["cache_hits"] == 1 and u["upstream_calls"] == 2
    assert u["calls"] == 3  # cache hits count as usage (see Gateway docstring)


# ----------------------------------------------------------------- concurrency


async def fan_out(sock: Path, n: int) -> list[int]:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport) as http:
        c = openai.AsyncOpenAI(
            base_url="http://mas2c-gateway/v1",
            api_key="sandbox",
            http_client=http,  # type: ignore[arg-type]
            max_retries=0,
        )

        async def one(i: int) -> int:
            try:
                await c.chat.completions.create(
                    model="m1",
                    messages=[{"role": "user", "content": f"q{i}"}],
                    extra_headers={"X-Mas2c-Agent": f"worker{i % 5}"},
                )
            except openai.APIStatusError as exc:
                return exc.status_code
            return 200

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_fan_out_is_concurrent(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    with LLMTestServer(latency_s=1.0) as srv, Gateway(sock, upstream(srv)) as gw:
        statuses = asyncio.run(fan_out(sock, 50))
        u = gw.usage()
    assert statuses == [200] * 50
    # served concurrently, but never by more worker threads than the limit
    assert srv.max_in_flight == GatewayLimits().max_concurrency
    assert u["calls"] == 50 and len(u["by_agent"]) == 5


# ----------------------------------------------------------------- socket


def test_socket_permissions_and_removal(srv: LLMTestServer, sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    gw = Gateway(sock, upstream(srv)).start()
    try:
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        with pytest.raises(GatewayError, match="in use"):
            Gateway(sock, upstream(srv)).start()
        c = client(sock)
        ask(c, "keep-alive connection open")
    finally:
        gw.stop()
    assert not sock.exists()
    with pytest.raises(openai.APIConnectionError):
        ask(c, "after stop")


def test_stale_socket_is_replaced_other_files_are_not(srv: LLMTestServer, sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # a socket file nobody listens on
    with Gateway(sock, upstream(srv)):
        assert ask(client(sock), "hi")
    plain = sockdir / "file"
    plain.write_text("x")
    with pytest.raises(GatewayError, match="not a socket"):
        Gateway(plain, upstream(srv)).start()
    with pytest.raises(GatewayError, match="too long"):
        Gateway(sockdir / ("x" * 120), upstream(srv)).start()


def test_request_key_is_canonical() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    b = {"temperature": 0, "messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert request_key(a) == request_key(b)
    assert request_key(a) != request_key({**a, "temperature": 1})


def test_chat_request_type_is_what_responders_get(srv: LLMTestServer, sockdir: Path) -> None:
    seen: list[ChatRequest] = []

    def responder(req: ChatRequest) -> str:
        seen.append(req)
        return "ok"

    srv.responder = responder
    sock = sockdir / "gw.sock"
    with Gateway(sock, upstream(srv)):
        ask(client(sock, "agent-7"), "hello", response_format={"type": "json_object"})
    assert seen[0].json_mode and seen[0].last_user == "hello"


def test_agent_ids_beyond_latin1_are_accounted(sockdir: Path) -> None:
    """The runtime percent-encodes agent ids (header values must be Latin-1); the gateway decodes."""
    from urllib.parse import quote

    sock = sockdir / "gw.sock"
    with LLMTestServer() as srv, Gateway(sock, upstream(srv)) as gw:
        client = openai.OpenAI(
            base_url="http://mas2c-gateway/v1",
            api_key="sandbox",
            http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))),  # type: ignore[arg-type]
            max_retries=0,
        )
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Mas2c-Agent": quote("解答者 1", safe="")},
        )
        usage = gw.usage()
    assert list(usage["by_agent"]) == ["解答者 1"]


# ----------------------------------------------------------------- cassette modes


def test_new_episodes_replays_what_it_has_and_records_what_it_lacks(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    cassette = sockdir / "c.jsonl"
    script = Script([(r"old", "old answer"), (r"new", "new answer"), (r"twice", ["t1", "t2"])])
    with LLMTestServer(script) as srv:
        with Gateway(sock, upstream(srv), record=cassette):
            assert ask(client(sock), "old") == "old answer"
            assert ask(client(sock), "twice") == "t1"
        assert len(srv.requests) == 2
        srv.reset_counters()
        # record + replay on the same file: hits replayed, misses fetched and appended
        with Gateway(
            sock, upstream(srv), record=cassette, replay=cassette, replay_misses="forward"
        ) as gw:
            c = client(sock)
            assert ask(c, "old") == "old answer"
            assert ask(c, "new") == "new answer"
            assert ask(c, "twice") == "t1"  # recorded
            assert ask(c, "twice") == "t2"  # a second episode of the same request: fetched
            u = gw.usage()
        assert [r.last_user for r in srv.requests] == ["new", "twice"]
        assert (u["replayed"], u["recorded_misses"], u["cassette_misses"]) == (2, 2, 0)
    lines = [json.loads(x) for x in cassette.read_text().splitlines()]
    assert len(lines) == 4  # the two first, then only the two new episodes (no duplicates)
    # strict replay of the grown cassette: everything answered without any upstream
    with Gateway(sock, None, replay=cassette) as gw:
        c = client(sock)
        assert [ask(c, t) for t in ("old", "new", "twice", "twice")] == [
            "old answer",
            "new answer",
            "t1",
            "t2",
        ]
        with pytest.raises(openai.BadRequestError, match="cassette miss") as ei:
            ask(c, "never seen")
        assert ei.value.code == "mas2c_cassette_miss"
        assert gw.usage()["cassette_misses"] == 1


def test_new_episodes_needs_an_upstream_and_may_start_empty(sockdir: Path) -> None:
    cassette = sockdir / "new.jsonl"
    with pytest.raises(GatewayError, match="needs an upstream"):
        Gateway(sockdir / "gw.sock", None, replay=cassette, replay_misses="forward")
    with pytest.raises(GatewayError, match="no such file"):
        Gateway(sockdir / "gw.sock", None, replay=cassette)
    sock = sockdir / "gw.sock"
    with (
        LLMTestServer() as srv,
        Gateway(sock, upstream(srv), record=cassette, replay=cassette, replay_misses="forward"),
    ):
        ask(client(sock), "first")
    assert len(cassette.read_text().splitlines()) == 1


def test_llm_config_record_and_replay_together_means_new_episodes(tmp_path: Path) -> None:
    from mas2c.run import LLMConfig

    c = tmp_path / "c.jsonl"
    assert LLMConfig(replay=c).replay_misses == "fail"
    assert not LLMConfig(replay=c).needs_upstream
    assert LLMConfig(replay=c, record=c).replay_misses == "forward"
    assert LLMConfig(replay=c, record=c).needs_upstream
    assert LLMConfig(record=c).needs_upstream
