"""The `serve` extra of compiled packages: a real server process, a real HTTP client.

Each test compiles a small two-call system, starts `python -m mas2c_echo_service serve`
as a subprocess (uvicorn on a loopback port it picks and prints) against a loopback
LLMTestServer, and talks to it with httpx. The package runs with a decoy `mas2c` on its
path (compiled code never imports mas2c).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from mas2c.compile import compile_spec
from mas2c.lang.validate import load_spec
from mas2c.testserver import ChatRequest, LLMTestServer
from tests.conftest import _decoy_path, load_runtime

KEY = "sk-serve-SECRET-0123456789abcdef"
SPEC = """\
spec_version: "1"
name: echo-service
description: One agent echoes the text, then echoes its own echo.
inputs:
  text: {type: string, minLength: 1}
  n: {type: integer, minimum: 0, default: 0}
outputs:
  first: first
  second: second
models:
  m: {model: test-model, price: {input_per_mtok: 1, output_per_mtok: 1}}
agents:
  echo: {role: Echo, instructions: Repeat the text., model: m}
workflow:
  - {id: one, kind: call, agent: echo, prompt: "one: {{ text }}", out: first}
  - {id: two, kind: call, agent: echo, prompt: "two: {{ first }}", out: second}
budgets: {max_llm_calls: 10, max_total_tokens: 100000, max_cost_usd: 1, timeout_s: 60}
"""


def echo(req: ChatRequest) -> str:
    """The last user message back; `leak-the-key` answers with the caller's key."""
    if "leak-the-key" in req.last_user:
        return "the key is " + req.headers.get("authorization", "")
    return req.last_user


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "build"
    spec_file = folder.parent / "spec.yaml"
    spec_file.write_text(SPEC)
    compile_spec(load_spec(spec_file)).write(folder)
    return folder


@contextmanager
def serving(
    build_dir: Path, llm: LLMTestServer, *flags: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The package's server as a subprocess; yields (base URL, process); stopped after."""
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(build_dir.parent),
        "PYTHONPATH": f"{build_dir}{os.pathsep}{_decoy_path()}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": llm.base_url,
        "MAS2C_RETRY_BASE_S": "0.01",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "mas2c_echo_service", "serve", "--port", "0", *flags]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=build_dir.parent,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the server printed no URL within 60 s"
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), (url, proc.stderr and proc.stderr.read())
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


async def _post_all(
    url: str, bodies: list[dict[str, Any]], path: str = "/runs/wait"
) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return list(await asyncio.gather(*(client.post(path, json=b) for b in bodies)))


# -- in-process: the key scrubber ---------------------------------------------------------------


def test_scrubber_removes_the_key_its_pieces_and_credentials() -> None:
    serve = load_runtime("_serve")
    scrub = serve.Scrubber(KEY)
    text = f"bad key {KEY}; masked sk-ser...cdef; header Bearer abc.def; Basic dXNlcjpw"
    out = scrub.text(text)
    assert KEY not in out and "cdef" not in out and "sk-s" not in out
    assert "abc.def" not in out and "dXNlcjpw" not in out
    assert out.startswith("bad key <redacted>; masked <redacted>...<redacted>;")
    assert serve.Scrubber(None).text("plain text") == "plain text"
    assert scrub.value({"a": [KEY, {"b": "x"}]}) == {"a": ["<redacted>", {"b": "x"}]}


def test_answers_are_valid_json_whatever_a_run_produced() -> None:
    serve = load_runtime("_serve")
    deep: list[Any] = []
    for _ in range(2000):
        deep = [deep]
    doc = json.loads(serve.dumps({"nan": float("nan"), "inf": [float("-inf")], "s": "a\ud800b"}))
    assert doc == {"nan": None, "inf": [None], "s": "a\ufffdb"}
    assert json.loads(serve.dumps({"deep": deep}))["deep"] is not None  # cut, not a crash
    assert json.loads(serve.dumps({"ok": "é"})) == {"ok": "é"}


# -- a real server -------------------------------------------------------------------------------


def test_twenty_concurrent_requests_all_answered_each_with_its_own_state(build_dir: Path) -> None:
    with (
        LLMTestServer(echo, latency_s=0.05) as llm,
        serving(build_dir, llm, "--max-concurrency", "4", "--max-queue", "32") as (url, _proc),
    ):
        texts = [f"request-{i}-{'x' * i}" for i in range(20)]
        answers = asyncio.run(_post_all(url, [{"input": {"text": t}} for t in texts]))
        assert [a.status_code for a in answers] == [200] * 20
        for text, answer in zip(texts, answers, strict=True):
            doc = answer.json()
            assert doc["status"] == "ok", doc
            assert doc["outputs"] == {"first": f"one: {text}", "second": f"two: one: {text}"}
            assert doc["usage"]["calls"] == 2  # its own usage, not the server's total
            assert doc["run"]["status"] == "success" and doc["run"]["agent_id"] == "echo-service"
        assert len({a.json()["run"]["run_id"] for a in answers}) == 20
        assert len(llm.requests) == 40
        assert llm.max_in_flight <= 4  # --max-concurrency held; the rest queued
        health = httpx.get(url + "/health").json()
        assert health == {
            "status": "ok", "running": 0, "queued": 0, "max_concurrency": 4, "max_queue": 32
        }  # fmt: skip


def test_budgets_per_request_tighten_and_never_loosen(build_dir: Path) -> None:
    with (
        LLMTestServer(echo, latency_s=0.05) as llm,
        serving(build_dir, llm, "--max-llm-calls", "5") as (url, _proc),
    ):
        bodies = [
            {"input": {"text": f"t{i}"}, **({"budgets": {"max_llm_calls": 1}} if i % 2 else {})}
            for i in range(8)
        ]
        answers = [a.json() for a in asyncio.run(_post_all(url, bodies))]
        for i, doc in enumerate(answers):
            if i % 2:
                assert doc["status"] == "budget_exceeded", doc
                assert doc["error"]["code"] == "budget_calls"
                assert doc["usage"]["calls"] == 1
                assert "traceback" not in doc["error"]
            else:
                assert doc["status"] == "ok" and doc["usage"]["calls"] == 2, doc
        # Looser than the server (5, from --max-llm-calls) or the spec: refused, located.
        for budgets, pointer in [
            ({"max_llm_calls": 6}, "/budgets/max_llm_calls"),
            ({"max_cost_usd": 2}, "/budgets/max_cost_usd"),
            ({"timeout_s": 0}, "/budgets/timeout_s"),
            ({"max_total_tokens": "many"}, "/budgets/max_total_tokens"),
            ({"max_tokens": 3}, "/budgets/max_tokens"),
        ]:
            r = httpx.post(url + "/runs/wait", json={"input": {"text": "x"}, "budgets": budgets})
            assert r.status_code == 422, (budgets, r.text)
            assert r.json()["error"]["problems"][0]["pointer"] == pointer
        info = httpx.get(url + "/info").json()
        assert info["budgets"]["max_llm_calls"] == 5 and info["budgets"]["timeout_s"] == 60
        assert info["input_schema"]["required"] == ["text"]


def test_bad_input_is_422_located_and_reaches_no_llm(build_dir: Path) -> None:
    with LLMTestServer(echo) as llm, serving(build_dir, llm) as (url, _proc):
        cases = [
            ({"input": {}}, "/input/text", "/inputs/text"),
            ({"input": {"text": "a", "n": "x"}}, "/input/n", "/inputs/n"),
            ({"input": {"text": ""}}, "/input/text", "/inputs/text"),
            ({"input": {"text": "a", "extra": 1}}, "/input", "/inputs"),
            ({"input": [1]}, "/input", "/inputs"),
        ]
        for body, pointer, spec_pointer in cases:
            r = httpx.post(url + "/runs/wait", json=body)
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["code"] == "bad_input"
            assert error["problems"][0]["pointer"] == pointer
            assert error["problems"][0]["spec_pointer"] == spec_pointer
        r = httpx.post(url + "/runs/wait", json={"input": {"text": "a"}, "inptu": 1})
        assert r.status_code == 422 and r.json()["error"]["problems"][0]["pointer"] == "/inptu"
        r = httpx.post(
            url + "/runs/stream", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"
        for raw in (
            b"[" * 100_000,
            b'{"input": {"text": NaN}}',
            b'{"input": {"text": "\\ud800"}}',
            b"\xff",
        ):
            r = httpx.post(url + "/runs/wait", content=raw)
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json", raw
        r = httpx.post(url + "/runs", content=b"x" * (1024 * 1024 + 1))
        assert r.status_code == 413
        r = httpx.post(url + "/runs/wait", json={"input": {"text": "a"}, "agent_id": "other"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_agent"
        assert llm.requests == []


def _sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            name = next(line[7:] for line in lines if line.startswith("event: "))
            data = next(line[6:] for line in lines if line.startswith("data: "))
            events.append((name, json.loads(data)))
    return events


def test_stream_is_server_sent_events_from_the_trace(build_dir: Path) -> None:
    body = {"input": {"text": "hello"}, "metadata": {"k": 1}}
    with (
        LLMTestServer(echo, latency_s=0.05) as llm,
        serving(build_dir, llm) as (url, _proc),
        httpx.stream("POST", url + "/runs/stream", json=body) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.read().decode())
    names = [name for name, _ in events]
    assert names[0] == "metadata" and names[-2:] == ["result", "end"]
    assert set(names[1:-2]) == {"trace"}
    trace = [data for name, data in events if name == "trace"]
    kinds = [e["event"] for e in trace]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert kinds.count("llm_call") == 2 and kinds.count("step_end") == 2
    result = events[-2][1]
    assert result["status"] == "ok" and result["outputs"]["second"] == "two: one: hello"
    assert result["run"]["run_id"] == events[0][1]["run_id"]
    assert result["run"]["metadata"] == {"k": 1}
    assert KEY not in json.dumps(events)


def test_a_stream_closed_by_its_client_cancels_its_run(build_dir: Path) -> None:
    with (
        LLMTestServer(echo, latency_s=3.0) as llm,
        serving(build_dir, llm) as (url, _proc),
    ):
        with httpx.stream("POST", url + "/runs/stream", json={"input": {"text": "gone"}}) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: metadata"
            deadline = time.monotonic() + 20
            while not llm.in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
            assert llm.in_flight == 1
        # The client is gone before the first LLM answer: the second call never starts.
        deadline = time.monotonic() + 20
        while httpx.get(url + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(url + "/health").json()["running"] == 0
        time.sleep(3.5)
        assert len(llm.requests) == 1


def test_a_waiting_client_that_leaves_cancels_its_run(build_dir: Path) -> None:
    with (
        LLMTestServer(echo, latency_s=3.0) as llm,
        serving(build_dir, llm) as (url, _proc),
    ):

        async def leave(body: dict[str, Any], seen: int) -> None:
            """Wait on the run until its LLM call is in flight, then hang up."""
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                task = asyncio.create_task(client.post("/runs/wait", json=body))
                deadline = time.monotonic() + 30
                while len(llm.requests) <= seen and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        asyncio.run(leave({"input": {"text": "gone"}}, 0))
        deadline = time.monotonic() + 20
        while httpx.get(url + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(url + "/health").json()["running"] == 0
        time.sleep(3.5)
        assert len(llm.requests) == 1  # the second step never started
        # "continue" keeps the run going without its client.
        asyncio.run(leave({"input": {"text": "stay"}, "on_disconnect": "continue"}, 1))
        deadline = time.monotonic() + 30
        while len(llm.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(llm.requests) == 3


def test_background_run_get_wait_delete(build_dir: Path) -> None:
    with LLMTestServer(echo, latency_s=0.2) as llm, serving(build_dir, llm) as (url, _proc):
        run = httpx.post(url + "/runs", json={"input": {"text": "bg"}}).json()
        assert run["status"] in ("pending", "running") and run["run_id"]
        done = httpx.get(f"{url}/runs/{run['run_id']}/wait", timeout=60).json()
        assert done["status"] == "ok" and done["run"]["status"] == "success"
        assert httpx.get(f"{url}/runs/{run['run_id']}").json()["outputs"]["first"] == "one: bg"
        assert httpx.delete(f"{url}/runs/{run['run_id']}").status_code == 204
        assert httpx.get(f"{url}/runs/{run['run_id']}").status_code == 404
        # Cancelled while the LLM is answering: the run says so.
        llm.latency_s = 5
        run = httpx.post(url + "/runs", json={"input": {"text": "slow"}}).json()
        time.sleep(0.5)
        cancelled = httpx.post(f"{url}/runs/{run['run_id']}/cancel", timeout=30).json()
        assert cancelled["run"]["status"] == "interrupted"


def test_over_the_queue_is_429_with_retry_after(build_dir: Path) -> None:
    with (
        LLMTestServer(echo, latency_s=0.3) as llm,
        serving(build_dir, llm, "--max-concurrency", "1", "--max-queue", "1") as (url, _proc),
    ):
        answers = asyncio.run(_post_all(url, [{"input": {"text": f"q{i}"}} for i in range(3)]))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 200, 429]
        busy = next(a for a in answers if a.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "busy"


def test_the_key_never_reaches_a_client(build_dir: Path) -> None:
    with LLMTestServer(echo) as llm, serving(build_dir, llm, "--max-llm-calls", "2") as (url, _):
        llm.inject(
            "status",
            status=401,
            message=f"Incorrect API key provided: {KEY[:6]}...{KEY[-4:]} ({KEY})",
        )
        r = httpx.post(url + "/runs/wait", json={"input": {"text": "a"}})
        doc = r.json()
        assert doc["status"] == "error" and doc["error"]["code"] == "llm_error", doc
        r2 = httpx.post(url + "/runs/wait", json={"input": {"text": "leak-the-key"}})
        assert r2.json()["status"] == "ok"
    for text in (r.text, r2.text):
        assert KEY not in text and KEY[-4:] not in text and "Bearer sk" not in text


def test_sigterm_drains_in_flight_runs_then_exits(build_dir: Path) -> None:
    with (
        LLMTestServer(echo, latency_s=1.0) as llm,
        serving(build_dir, llm, "--grace-s", "20") as (url, proc),
    ):

        async def scenario() -> tuple[list[httpx.Response], Any]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                waits = [
                    asyncio.create_task(
                        client.post("/runs/wait", json={"input": {"text": f"s{i}"}})
                    )
                    for i in range(3)
                ]
                background = (await client.post("/runs", json={"input": {"text": "bg"}})).json()
                while llm.in_flight < 4:
                    await asyncio.sleep(0.05)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                # Draining: a new run is refused (the listener is closed, or 503 draining).
                async with httpx.AsyncClient(base_url=url, timeout=10) as fresh:
                    try:
                        late = await fresh.post("/runs/wait", json={"input": {"text": "new"}})
                    except httpx.TransportError:
                        pass
                    else:
                        assert late.status_code == 503, late.text
                answers = await asyncio.gather(*waits)
                assert time.monotonic() - t0 < 15
                return answers, background

        answers, background = asyncio.run(scenario())
        assert [a.json()["status"] for a in answers] == ["ok"] * 3
        # uvicorn ends by the signal it drained for (143 in a shell), so supervisors see why.
        assert proc.wait(30) == -signal.SIGTERM
        with pytest.raises(httpx.TransportError):
            httpx.post(url + "/runs/wait", json={"input": {"text": "late"}}, timeout=5)
        # The background run finished too: its two LLM calls reached the server.
        assert (
            sum("one: bg" in r.last_user or "two: one: bg" in r.last_user for r in llm.requests)
            == 2
        )
        assert background["status"] in ("pending", "running")


def test_sigterm_past_the_grace_cancels_and_exits(build_dir: Path) -> None:
    with (
        LLMTestServer(echo, latency_s=30) as llm,
        serving(build_dir, llm, "--grace-s", "1") as (
            url,
            proc,
        ),
    ):
        run = httpx.post(url + "/runs", json={"input": {"text": "long"}}).json()
        assert run["run_id"]
        deadline = time.monotonic() + 10
        while llm.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == -signal.SIGTERM
        assert time.monotonic() - t0 < 10  # the grace (1 s) and a margin, not the LLM's 30 s


def test_serve_without_the_extra_is_a_clear_exit_2(build_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    for name in ("starlette", "uvicorn"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": f"{blocker}{os.pathsep}{build_dir}{os.pathsep}{_decoy_path()}",
        "OPENAI_API_KEY": KEY,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c_echo_service", "serve", "--port", "0"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "pip install 'mas2c-echo-service[serve]'" in proc.stderr
    assert "Traceback" not in proc.stderr and KEY not in proc.stderr


@pytest.mark.parametrize("flag", ["--grace-s", "--max-cost-usd", "--timeout-s"])
def test_serve_refuses_nan_in_its_numeric_flags(build_dir: Path, flag: str) -> None:
    """`--grace-s nan` passed `grace_s < 0` and served with a drain that never ends."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": f"{build_dir}{os.pathsep}{_decoy_path()}",
        "OPENAI_API_KEY": KEY,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c_echo_service", "serve", "--port", "0", flag, "nan"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert flag in proc.stderr and "Traceback" not in proc.stderr
