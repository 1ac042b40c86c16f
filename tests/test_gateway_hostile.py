"""The gateway against hostile programs (issue 18 classes 2, 3, 5, 6), in-process.

Every test talks to the gateway's real unix socket (raw sockets or the real openai
client) and to the loopback test server as the upstream. The Docker versions of the
flood and the budget burst are in test_gateway_docker.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
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
    Scrubber,
    prompt_token_bound,
    redact_url,
)
from mas2c.testserver import ChatRequest, LLMTestServer, Reply

KEY = "sk-proj-Zq8xP3vR7mWn2Kt9LbY4"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="gwh", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def upstream(url: str, **kw: Any) -> HttpUpstream:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 5.0)
    return HttpUpstream(url, KEY, **kw)


def client(sock: Path, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://mas2c-gateway/v1",
        api_key="sandbox",
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))),  # type: ignore[arg-type]
        max_retries=retries,
    )


def body(text: str = "hi", model: str = "m1", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


def post(sock: Path, payload: dict[str, Any]) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=30) as h:
        return h.post("http://mas2c-gateway/v1/chat/completions", json=payload)


def raw_exchange(sock: Path, data: bytes, timeout: float = 10.0) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock))
    try:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        return out
    finally:
        s.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def thread_count() -> int:
    """Threads of the gateway: its event loop and its workers."""
    return sum(t.name.startswith(("mas2c-gw", "mas2c-gateway")) for t in threading.enumerate())


# ------------------------------------------------------------- class 2: host resources


def test_oversized_and_chunked_and_dense_bodies_are_refused(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    limits = GatewayLimits(max_body_bytes=64 * 1024, max_json_values=1000)
    with LLMTestServer() as srv, Gateway(sock, upstream(srv.base_url), limits=limits) as gw:
        big = b"x" * (64 * 1024 + 1)
        head = f"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {len(big)}\r\n\r\n"
        out = raw_exchange(sock, head.encode())  # refused from the header, body never read
        assert status_of(out) == 413 and b"64 KiB" not in out and b"65536 bytes" in out
        chunked = b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert status_of(raw_exchange(sock, chunked)) == 411
        dense = json.dumps(body(tools=[[]] * 2000)).encode()  # few bytes, many values
        assert len(dense) < 64 * 1024
        r = post(sock, json.loads(dense))
        assert r.status_code == 413 and "JSON values" in r.json()["error"]["message"]
        deep = b'{"model": "m1", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
        limits_deep = raw_exchange(
            sock,
            f"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {len(deep)}\r\n\r\n".encode()
            + deep,
        )
        assert status_of(limits_deep) == 413  # over the body limit before any parsing
        huge_head = b"GET /v1/models HTTP/1.1\r\nX-Junk: " + b"a" * 70_000 + b"\r\n\r\n"
        assert status_of(raw_exchange(sock, huge_head)) == 431
        assert ask_ok(sock)
        assert gw.usage()["calls"] == 1
    assert len(srv.requests) == 1


def test_deep_nesting_is_a_400_not_a_crash(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    limits = GatewayLimits(max_json_values=1_000_000)
    with LLMTestServer() as srv, Gateway(sock, upstream(srv.base_url), limits=limits):
        deep = b'{"model": "m1", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        r = raw_exchange(
            sock,
            f"POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\n"
            f"Content-Length: {len(deep)}\r\n\r\n".encode()
            + deep,
        )
        assert status_of(r) == 400 and b"nested too deeply" in r
        assert ask_ok(sock)


def ask_ok(sock: Path) -> bool:
    r = post(sock, body("still alive?"))
    return r.status_code == 200


def test_half_open_connections_hold_no_threads_and_are_capped(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    limits = GatewayLimits(max_connections=50, request_timeout_s=8.0)
    with LLMTestServer() as srv, Gateway(sock, upstream(srv.base_url), limits=limits) as gw:
        before = thread_count()
        conns = []
        for i in range(400):  # a flood of connections that never send a full request
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock))
            if i % 2:
                # A connection past the cap may be turned away (closed) before this write
                # lands: the client sees a broken pipe, the gateway counts it as rejected.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Le")
            conns.append(s)
        deadline = time.monotonic() + 6  # the event loop accepts (or turns away) them all
        while sum(gw.server_stats()[k] for k in ("peak_open", "rejected")) < 400:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        stats = gw.server_stats()
        assert stats["peak_open"] <= 50
        assert stats["rejected"] >= 200  # most of the 400 (slots free up as they time out)
        assert thread_count() == before == 1  # the event loop only: no thread per connection
        # the half-open ones are dropped after request_timeout_s, and the gateway serves again
        deadline = time.monotonic() + 15
        while gw.server_stats()["open"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gw.server_stats()["open"] == 0
        for s in conns:
            s.close()
        assert ask_ok(sock)


def test_slow_body_times_out(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    limits = GatewayLimits(request_timeout_s=0.5)
    with LLMTestServer() as srv, Gateway(sock, upstream(srv.base_url), limits=limits):
        t0 = time.monotonic()
        out = raw_exchange(
            sock, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{", timeout=5
        )
        assert status_of(out) == 408
        assert time.monotonic() - t0 < 4  # the 0.5 s timeout, not the 5 s client's


def test_worker_threads_are_bounded_under_a_burst(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    limits = GatewayLimits(max_concurrency=4)
    with LLMTestServer(latency_s=0.3) as srv, Gateway(sock, upstream(srv.base_url), limits=limits):
        before = thread_count()
        peak = [0]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], thread_count())
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            statuses = asyncio.run(burst(sock, 40))
        finally:
            done.set()
            watcher.join()
        assert statuses == [200] * 40
        assert srv.max_in_flight == 4
        assert before == 1  # the event loop
        assert peak[0] == 1 + 4  # and 4 workers at most


async def burst(sock: Path, n: int, **kw: Any) -> list[int]:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, timeout=60) as http:

        async def one(i: int) -> int:
            r = await http.post(
                "http://mas2c-gateway/v1/chat/completions", json=body(f"q{i}", **kw)
            )
            return r.status_code

        return list(await asyncio.gather(*(one(i) for i in range(n))))


# ------------------------------------------------------------- class 3: budgets


def test_unknown_model_and_n_are_refused(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    models = {"m1": 100, "m2": None}
    with LLMTestServer() as srv, Gateway(sock, upstream(srv.base_url), models=models) as gw:
        r = post(sock, body(model="gpt-expensive"))
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "mas2c_unknown_model"
        assert "'m1', 'm2'" in r.json()["error"]["message"]
        for n in (2, 0, "1", True):
            r = post(sock, body(n=n))
            assert r.status_code == 400, n
        assert post(sock, body(n=1)).status_code == 200
        assert post(sock, body(max_tokens=5000)).status_code == 200  # clamped to the spec's 100
        assert post(sock, body(model="m2", max_tokens=5000)).status_code == 200  # no cap
        assert post(sock, body(max_tokens=-1)).status_code == 400
        both = body(max_tokens=5, max_completion_tokens=100_000)  # a clamp-dodging pair
        assert post(sock, both).status_code == 400
        assert post(sock, body(max_completion_tokens=5000)).status_code == 200  # clamped too
        assert [m.id for m in client(sock).models.list().data] == ["m1", "m2"]
        assert gw.usage()["calls"] == 4
    # the spec's cap also applies when the program names none
    caps = [r.body.get("max_tokens") or r.body.get("max_completion_tokens") for r in srv.requests]
    assert caps == [100, 100, 5000, 100]


@pytest.mark.parametrize(
    "extra",
    [
        {"prediction": {"type": "content", "content": "x" * 100_000}},  # billed, not in the bound
        {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]},
        {"service_tier": "priority"},
        {"web_search_options": {}},  # the provider would fetch pages: egress
        {"store": True, "metadata": {"k": "v"}},
        {"stream_options": {"include_usage": True}},
        {"extra_body": {"x": 1}},
        {"\u202emodel": "m1"},
    ],
    ids=[
        "prediction",
        "audio",
        "service_tier",
        "web_search",
        "store",
        "stream_options",
        "extra_body",
        "rtl",
    ],
)
def test_parameters_the_budget_cannot_bound_are_refused(
    sockdir: Path, extra: dict[str, Any]
) -> None:
    """Only parameters counted in the reservation or neutral to cost and data are forwarded:
    any other (a dearer tier, audio, predicted output, web search, storage, whatever comes
    next) is a 400 naming it, and nothing reaches the upstream or the budget."""
    sock = sockdir / "gw.sock"
    with (
        LLMTestServer() as srv,
        Gateway(sock, upstream(srv.base_url), budget=Budget(max_total_tokens=10_000)) as gw,
    ):
        r = post(sock, body(**extra))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "mas2c_unsupported_parameter"
        assert all(repr(name[:40]) in error["message"] for name in extra)
        # what the compiled runtime and the openai client send still goes
        ok = body(temperature=0.2, top_p=0.9, stop=["x"], seed=1, max_tokens=5, user="u",
                  response_format={"type": "json_object"}, logprobs=True, top_logprobs=2,
                  tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                  tool_choice="none", parallel_tool_calls=False, stream=False)  # fmt: skip
        assert post(sock, ok).status_code == 200
        assert len(srv.requests) == 1 and gw.usage()["calls"] == 1


def worst_case_responder(req: ChatRequest) -> Reply:
    """An upstream that uses every token it is allowed: the prompt bound and max_tokens."""
    return Reply(
        content="x",
        prompt_tokens=prompt_token_bound(req.body),
        completion_tokens=int(req.body["max_tokens"]),
    )


def test_tokens_exact_boundary(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    req = body("boundary", max_tokens=10)
    p = prompt_token_bound(req)
    # room for exactly two calls of (p + 10): the third is refused, nothing is clamped
    with (
        LLMTestServer(worst_case_responder) as srv,
        Gateway(sock, upstream(srv.base_url), budget=Budget(max_total_tokens=2 * (p + 10))) as gw,
    ):
        assert post(sock, req).status_code == 200
        assert post(sock, req).status_code == 200
        u = gw.usage()
        assert u["total_tokens"] == 2 * (p + 10) and u["budget_exceeded"] is False
        r = post(sock, req)
        assert r.status_code == 402 and r.headers["x-should-retry"] == "false"
        assert gw.usage()["total_tokens"] == 2 * (p + 10)
    assert [r.body["max_tokens"] for r in srv.requests] == [10, 10]
    # one token less: the second call is clamped to 9 completion tokens
    with (
        LLMTestServer(worst_case_responder) as srv,
        Gateway(sock, upstream(srv.base_url), budget=Budget(max_total_tokens=2 * (p + 10) - 1)),
    ):
        assert post(sock, req).status_code == 200
        assert post(sock, req).status_code == 200
    assert [r.body["max_tokens"] for r in srv.requests] == [10, 9]
    # exactly the prompt bound + 1 left: a call with max_tokens=1 goes; one less: refused
    for limit, expected in ((p + 1, 200), (p, 402)):
        with (
            LLMTestServer(worst_case_responder) as srv,
            Gateway(sock, upstream(srv.base_url), budget=Budget(max_total_tokens=limit)) as gw,
        ):
            assert post(sock, req).status_code == expected, limit
            if expected == 200:
                assert srv.requests[0].body["max_tokens"] == 1
                assert gw.usage()["total_tokens"] == limit
                assert gw.usage()["budget_exceeded"] is False


def test_calls_exact_boundary(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    for limit in (1, 3):
        with (
            LLMTestServer() as srv,
            Gateway(sock, upstream(srv.base_url), budget=Budget(max_llm_calls=limit)) as gw,
        ):
            statuses = [post(sock, body(f"{i}")).status_code for i in range(limit + 1)]
            assert statuses == [200] * limit + [402]
            assert gw.usage()["calls"] == limit and gw.usage()["budget_exceeded"] is True


def test_cost_exact_boundary(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    req = body("cost", max_tokens=3)
    p = prompt_token_bound(req)
    prices = {"m1": Price(input_per_mtok=1_000_000, output_per_mtok=2_000_000)}  # $1 and $2 a token
    exact = p + 2 * 3  # the worst case of one call, in dollars
    cases = [
        (exact, [200, 402], [3]),  # exactly one call's worst case, not a cent more
        (exact - 1, [200], [2]),  # a dollar short of 3 completion tokens: clamped to 2
        (p + 2, [200], [1]),  # room for one completion token
        (p + 1, [402], []),  # not even one
    ]
    for limit, statuses, caps in cases:
        with (
            LLMTestServer(worst_case_responder) as srv,
            Gateway(
                sock, upstream(srv.base_url), prices=prices, budget=Budget(max_cost_usd=limit)
            ) as gw,
        ):
            got = [post(sock, req).status_code for _ in statuses]
            assert got == statuses, limit
            assert [r.body["max_tokens"] for r in srv.requests] == caps
            u = gw.usage()
            assert u["cost_usd"] <= limit
            assert u["budget_exceeded"] is (402 in statuses)


def test_cost_exact_boundary_with_free_completions(sockdir: Path) -> None:
    """A model whose completions cost nothing: a prompt whose worst case costs exactly
    what is left still goes (its cost ends at the limit, not past it); a dollar more does not."""
    sock = sockdir / "gw.sock"
    req = body("free", max_tokens=3)
    p = prompt_token_bound(req)
    prices = {"m1": Price(input_per_mtok=1_000_000, output_per_mtok=0)}  # $1 a prompt token
    for limit, expected in ((p, 200), (p - 1, 402)):
        with (
            LLMTestServer(worst_case_responder) as srv,
            Gateway(
                sock, upstream(srv.base_url), prices=prices, budget=Budget(max_cost_usd=limit)
            ) as gw,
        ):
            assert post(sock, req).status_code == expected, limit
            u = gw.usage()
            assert u["cost_usd"] == (limit if expected == 200 else 0)
            assert u["budget_exceeded"] is (expected != 200)
            assert [r.body["max_tokens"] for r in srv.requests] == ([3] if expected == 200 else [])


def test_parallel_burst_cannot_exceed_tokens_or_cost(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    prices = {"m1": Price(input_per_mtok=10.0, output_per_mtok=30.0)}
    budget = Budget(max_total_tokens=2000, max_cost_usd=0.05)
    with (
        LLMTestServer(worst_case_responder, latency_s=0.05) as srv,
        Gateway(sock, upstream(srv.base_url), prices=prices, budget=budget) as gw,
    ):
        statuses = asyncio.run(burst(sock, 40, max_tokens=50))
        u = gw.usage()
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 402}
    assert u["total_tokens"] <= 2000 and u["cost_usd"] <= 0.05
    assert u["calls"] == statuses.count(200) and u["refused"] == statuses.count(402)


def test_overshooting_upstream_is_flagged_and_stops_the_run(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    liar = Reply(content="x", prompt_tokens=10, completion_tokens=500)  # ignores max_tokens
    with (
        LLMTestServer(lambda req: liar) as srv,
        Gateway(sock, upstream(srv.base_url), budget=Budget(max_total_tokens=300)) as gw,
    ):
        assert post(sock, body(max_tokens=5)).status_code == 200
        assert gw.usage()["budget_exceeded"] is True
        assert post(sock, body()).status_code == 402


# ------------------------------------------------------------- class 5: secrets in errors


def test_redact_url_and_query_string_base(sockdir: Path) -> None:
    assert redact_url("https://u:p@h.example:8443/v1/?api-key=SECRET&x=1") == (
        "https://h.example:8443/v1/?api-key=<redacted>&x=<redacted>"
    )
    sock = sockdir / "gw.sock"
    with LLMTestServer() as srv:
        base = srv.base_url.replace("http://", "http://alice:pw-Hunter22@") + "?api-key=QSECRET9x"
        with Gateway(sock, upstream(base)):
            assert post(sock, body()).status_code == 200
        seen = srv.requests[0]
        assert seen.path == "/v1/chat/completions?api-key=QSECRET9x"  # the query is kept
        assert seen.headers["authorization"].startswith("Basic ")  # the URL's userinfo


def test_dead_endpoint_with_credentials_in_url(sockdir: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there
    base = f"http://bob:pw-Sw0rdfish@127.0.0.1:{port}/v1?api-key=QSECRET9x&api-version=2024"
    sock = sockdir / "gw.sock"
    with Gateway(sock, upstream(base, backoff_s=0.05)) as gw:
        t0 = time.monotonic()
        r1 = post(sock, body())
        first = time.monotonic() - t0
        t0 = time.monotonic()
        r2 = post(sock, body())
        second = time.monotonic() - t0
        assert gw.usage()["errors"] == 2
    for r in (r1, r2):
        assert r.status_code == 502 and r.headers["x-should-retry"] == "false"
        text = r.text
        for secret in ("pw-Sw0rdfish", "Sw0rd", "bob", "QSECRET9x", "SECRET9", KEY, KEY[-4:]):
            assert secret not in text, secret
        assert f"http://127.0.0.1:{port}/v1?api-key=<redacted>" in text
    assert "failed after 4 attempts" in r1.json()["error"]["message"]
    assert first < 2.0  # 4 refused attempts, 0.05 + 0.1 + 0.2 s of backoff
    assert "unreachable moments ago" in r2.json()["error"]["message"] and second < 0.5


def echo_auth(req: ChatRequest) -> str:
    auth = req.headers.get("authorization", "")
    key = auth.removeprefix("Bearer ")
    return (
        f"Incorrect API key provided: {key[:8]}{'*' * 20}{key[-4:]}. "
        f"You sent: Authorization: {auth}; raw={json.dumps(dict(req.headers))}; tail {key[-6:]}"
    )


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_upstream_error_bodies_are_scrubbed(sockdir: Path, status: int) -> None:
    sock = sockdir / "gw.sock"
    with LLMTestServer() as srv, Gateway(sock, upstream(srv.base_url)) as gw:
        base = srv.base_url
        srv.inject("status", status=status, message=echo_auth)
        r = post(sock, body())
        assert gw.usage()["errors"] == 1
    assert r.status_code == status and r.headers["x-should-retry"] == "false"
    text = r.text
    grams = {KEY[i : i + 4] for i in range(len(KEY) - 3)}
    assert not any(g in text for g in grams), text  # not the key, nor any 4 characters of it
    err = r.json()["error"]
    assert err["message"].startswith(f"upstream {base} rejected the request with HTTP")
    assert "<redacted>" in err["message"]


def test_scrubber_removes_fragments_and_masked_forms() -> None:
    scrub = Scrubber([KEY, "hunter2-pa55"])
    text = (
        f"key {KEY} masked sk-proj-****{KEY[-4:]} tail ...{KEY[-6:]} "
        "Bearer abc.def Basic dXNlcjpwYXNz sk-other-1234 hunter2-pa55 ok words stay"
    )
    out = scrub(text)
    assert "ok words stay" in out
    for bad in (KEY, KEY[-4:], KEY[-6:], "abc.def", "dXNlcjpwYXNz", "sk-other", "hunter2"):
        assert bad not in out, bad


def test_retry_honours_x_should_retry(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    with LLMTestServer() as srv, Gateway(sock, upstream(srv.base_url, max_attempts=4)):
        srv.inject("status", status=503, headers={"x-should-retry": "false"})
        assert post(sock, body()).status_code == 502
        assert len(srv.requests) == 1  # the upstream said not to retry
        srv.reset_counters()
        srv.inject("status", status=409, headers={"x-should-retry": "true"})
        assert post(sock, body()).status_code == 200
        assert len(srv.requests) == 2
        srv.reset_counters()
        srv.inject("status", status=429, retry_after=0.3)
        t0 = time.monotonic()
        assert post(sock, body()).status_code == 200
        assert time.monotonic() - t0 >= 0.3


def test_program_client_with_retries_makes_no_extra_attempts(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    with LLMTestServer() as srv, Gateway(sock, upstream(srv.base_url, max_attempts=2)):
        srv.inject("status", count=20, status=500)
        with pytest.raises(openai.InternalServerError):
            client(sock, retries=5).chat.completions.create(**body())
    assert len(srv.requests) == 2


# ------------------------------------------------------------- class 6: the socket


def test_socket_is_0600_in_a_0700_folder(sockdir: Path) -> None:
    sock = sockdir / "gw.sock"
    with LLMTestServer() as srv, Gateway(sock, upstream(srv.base_url)):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert os.stat(sock).st_uid == os.geteuid()
        assert stat.S_IMODE(os.stat(sockdir).st_mode) == 0o700


def _connect_as(uid: int, path: Path) -> str:
    """Try to connect to ``path`` from a child process running as ``uid``: 'ok' or the errno name."""
    import errno

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            os.write(w, b"ok")
        except OSError as exc:
            os.write(w, errno.errorcode.get(exc.errno or 0, "error").encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root to switch uids"
)
def test_only_the_sandbox_uid_can_connect() -> None:
    from mas2c.run import socket_dir
    from mas2c.sandbox import SANDBOX_UID

    assert os.geteuid() == 0, "CI runs as root: this test must run"
    with (
        LLMTestServer() as srv,
        socket_dir(SANDBOX_UID) as folder,
        Gateway(folder / "llm.sock", upstream(srv.base_url), socket_uid=SANDBOX_UID) as gw,
    ):
        st = os.stat(gw.socket_path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, SANDBOX_UID)
        fst = os.stat(folder)
        assert (stat.S_IMODE(fst.st_mode), fst.st_uid) == (0o700, SANDBOX_UID)
        assert _connect_as(SANDBOX_UID, gw.socket_path) == "ok"
        for other in (SANDBOX_UID + 1, 65534):
            assert _connect_as(other, gw.socket_path) == "EACCES", other


def _start_as(uid: int, folder: Path, mode: int) -> str:
    """Start a gateway for another uid from a child process running as ``uid`` (not root)."""
    os.chown(folder, uid, uid)
    os.chmod(folder, mode)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        answer = "?"
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            gw = Gateway(
                folder / "gw.sock", HttpUpstream("http://127.0.0.1:9", None), socket_uid=uid + 1
            )
            try:
                gw.start()
                answer = oct(stat.S_IMODE(os.stat(folder / "gw.sock").st_mode))
            finally:
                gw.stop()
        except GatewayError as exc:
            answer = f"GatewayError: {exc}"
        except BaseException as exc:
            answer = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(w, answer.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root to switch uids"
)
def test_non_root_gateway_for_another_uid_needs_a_private_folder(sockdir: Path) -> None:
    """Without root the socket cannot be chowned: it may only be 0666 inside a 0700 folder."""
    assert os.geteuid() == 0, "CI runs as root: this test must run"
    assert "must be a folder of mode 0700" in _start_as(65534, sockdir, 0o755)
    assert _start_as(65534, sockdir, 0o700) == "0o666"


def test_meta_client_keeps_the_query_and_scrubs_its_errors() -> None:
    """The meta-agents' LLMClient (direct to the endpoint) follows the same rules."""
    from mas2c.llm import LLMClient, LLMError

    with LLMTestServer() as srv:
        base = srv.base_url.replace("http://", "http://carol:pw-Tr0ub4dor@") + "?api-key=QSECRET9x"
        llm = LLMClient(base, KEY, model="m1", max_retries=0)
        assert llm.chat([{"role": "user", "content": "hi"}]) == "ANSWER: 42"
        assert srv.requests[0].path == "/v1/chat/completions?api-key=QSECRET9x"
        srv.inject("status", status=401, message=echo_auth)
        with pytest.raises(LLMError) as ei:
            llm.chat([{"role": "user", "content": "hi"}])
    text = str(ei.value) + repr(llm)
    grams = {KEY[i : i + 4] for i in range(len(KEY) - 3)}
    assert not any(g in text for g in grams), text
    for secret in ("Tr0ub4dor", "carol", "QSECRET9x"):
        assert secret not in text
    assert "?api-key=<redacted>" in text


# ------------------------------------------------------------- dead endpoints (issue 13 item 3)


def test_dead_endpoint_bound_with_the_default_settings(sockdir: Path) -> None:
    """Refused connections: 4 attempts, about 3.5 s of backoff, one 502 naming the endpoint."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sock = sockdir / "gw.sock"
    with HttpUpstream(f"http://127.0.0.1:{port}/v1", KEY) as up, Gateway(sock, up):
        t0 = time.monotonic()
        r = post(sock, body())
        elapsed = time.monotonic() - t0
    message = r.json()["error"]["message"]
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false"
    assert message.startswith(f"upstream http://127.0.0.1:{port}/v1 failed after 4 attempts")
    assert "cannot connect" in message
    # 0.5 + 1 + 2 s of backoff (+ up to 25 % jitter); the slack is for a busy CI machine
    assert 3.0 <= elapsed < 10.0


def test_black_holed_endpoint_stops_at_the_connect_deadline(sockdir: Path) -> None:
    """Connections that hang: no attempt starts after connect_deadline_s."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = socket.create_connection(hole.getsockname())  # fills the accept queue
    port = hole.getsockname()[1]
    sock = sockdir / "gw.sock"
    try:
        with (
            HttpUpstream(
                f"http://127.0.0.1:{port}/v1",
                KEY,
                connect_timeout_s=0.4,
                connect_deadline_s=1.0,
                backoff_s=0.05,
                max_attempts=10,
            ) as up,
            Gateway(sock, up),
        ):
            t0 = time.monotonic()
            r = post(sock, body())
            elapsed = time.monotonic() - t0
    finally:
        filler.close()
        hole.close()
    assert r.status_code == 502
    attempts = int(r.json()["error"]["message"].split("failed after ")[1].split(" ")[0])
    # 0.4 s each + backoff: none starts after the 1 s deadline (a busy machine makes fewer)
    assert 1 <= attempts <= 3
    assert elapsed < 1.0 + 0.4 + 2.0  # deadline + one connect timeout + slack, not 10 x 0.4 s


def test_stale_socket_folders_are_reaped_live_ones_kept(tmp_path: Path) -> None:
    from mas2c.run import SOCKET_DIR_PREFIX, reap_socket_dirs

    def folder(name: str) -> Path:
        d = tmp_path / f"{SOCKET_DIR_PREFIX}{name}"
        d.mkdir(mode=0o700)
        return d

    dead, live, other, young = folder("dead"), folder("live"), folder("other"), folder("young")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead / "llm.sock"))
    s.close()  # nobody listens any more (a kill -9'd mas2c)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(live / "llm.sock"))
    listener.listen(1)
    (other / "notes.txt").write_text("not a socket")
    old = time.time() - 3600
    for d in (dead, live, other):
        os.utime(d, (old, old))
    try:
        removed = reap_socket_dirs(root=tmp_path)
    finally:
        listener.close()
    assert removed == [dead]
    assert live.exists() and other.exists() and young.exists() and not dead.exists()


def test_mas2c_exits_while_a_request_still_waits_on_the_upstream(tmp_path: Path) -> None:
    """Workers are daemon threads: a hung upstream call never holds up the end of a run."""
    import subprocess
    import sys

    script = f"""
import threading, time, httpx
from pathlib import Path
from mas2c.gateway import Gateway, HttpUpstream, Budget
from mas2c.testserver import LLMTestServer
srv = LLMTestServer().start()
srv.inject("hang", seconds=60)
sock = Path({str(tmp_path / "gw.sock")!r})
gw = Gateway(sock, HttpUpstream(srv.base_url, None, timeout_s=120), budget=Budget(max_total_tokens=10**6)).start()
def ask():
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=120) as h:
            h.post("http://gw/v1/chat/completions", json={{"model": "m", "messages": [{{"role": "user", "content": "x"}}]}})
    except Exception:
        pass
threading.Thread(target=ask, daemon=True).start()
time.sleep(1.0)
gw.stop()
print("stopped", flush=True)
"""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 0 and "stopped" in proc.stdout, proc.stderr
    assert time.monotonic() - t0 < 20  # not the 60 s the upstream hangs


# ------------------------------------------------------------- class 1: names from the sandbox


def test_agent_and_step_headers_cannot_break_the_hosts_usage_file(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent and step headers are the program's words. A control character in one
    (percent-encoded, as the runtime sends ids) made the host write a usage.json its own
    run-folder reader refuses (rectify, report and solve then failed on that run), and
    every new name grew usage.json: such names count as `unknown`, and at most
    MAX_AGENT_NAMES distinct names are kept."""
    import json

    from mas2c import gateway as gw_module
    from mas2c.runfolder import read_usage

    monkeypatch.setattr(gw_module, "MAX_AGENT_NAMES", 4)
    sock = sockdir / "gw.sock"
    events: list[dict[str, Any]] = []
    agents = ["%0Aforged", "%00", "%7F", "tab%09", "x" * 300, "%E2%80%AEbidi", "planner"]
    agents += [f"extra-{i}" for i in range(6)]
    with LLMTestServer() as srv, Gateway(sock, upstream(srv.base_url), on_event=events.append) as gw:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=30) as h:
            for agent in agents:
                r = h.post(
                    "http://mas2c-gateway/v1/chat/completions",
                    json=body(),
                    headers={"X-Mas2c-Agent": agent, "X-Mas2c-Step": f"s%0A{agent}"},
                )
                assert r.status_code == 200, r.text
        usage = gw.usage()
    names = list(usage["by_agent"])
    assert len(names) <= 4 and "unknown" in names and "\n" not in "".join(names), names
    assert sum(t["calls"] for t in usage["by_agent"].values()) == len(agents)
    assert usage["by_agent"]["unknown"]["calls"] >= 4  # the four control-character names
    (sockdir / "usage.json").write_text(json.dumps(usage))
    assert read_usage(sockdir / "usage.json").calls == len(agents)  # the host reads it back
    assert all(e["step"] == "" for e in events if "step" in e)  # "s\n...": dropped
    assert {e["agent"] for e in events} >= {"unknown", "planner", "x" * 200}
