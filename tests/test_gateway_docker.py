"""Hostile programs in real Docker against the gateway (issue 18 classes 2, 3 and 6).

The program is benchmarks/bench_gateway_flood.py's: stdlib only, in the sandbox
image, reaching the gateway through the socket mount as the sandbox's uid (so these
tests also prove the 0600 socket, chowned to that uid, is reachable from inside).
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.bench_gateway_flood import run_flood
from mas2c.gateway import Budget, GatewayLimits, prompt_token_bound
from mas2c.testserver import ChatRequest, Reply

pytestmark = pytest.mark.docker

_MIB = 1024 * 1024


@pytest.mark.usefixtures("docker_ready")
def test_flood_keeps_host_threads_and_memory_bounded() -> None:
    limits = GatewayLimits(max_connections=64, max_concurrency=8)
    figures = run_flood(half_open=1800, big=8, dense=8, valid=24, hold_s=2.0, limits=limits)
    program = figures["program"]
    assert figures["exit_code"] == 0, figures["stderr_tail"]
    assert program["half_open_connected"] >= 1000  # they all connect; few get a slot
    assert figures["peak_open_connections"] <= 64
    assert figures["rejected_connections"] >= 1000
    assert figures["peak_gateway_threads"] <= 1 + 8  # the event loop and the workers
    bound_mb = (limits.max_pending_bytes + limits.max_parse_weight) / _MIB
    assert figures["peak_rss_mb"] - figures["baseline_rss_mb"] < bound_mb + 64
    statuses = program["statuses"]
    assert set(statuses["valid_during_half_open"]) <= {"200", "503", "0"}
    assert statuses["big"] == {"402": 8}  # read, parsed, refused by the token budget
    assert statuses["dense"] == {"413": 8}  # refused before parsing
    assert statuses["valid"] == {"200": 24}
    assert set(statuses["over"]) <= {"413", "0"}  # refused from the header, body unread
    assert program["after"] == 200  # and it still serves


def worst_case(req: ChatRequest) -> Reply:
    """An upstream that uses every token it is allowed."""
    return Reply(
        content="x",
        prompt_tokens=prompt_token_bound(req.body),
        completion_tokens=int(req.body["max_tokens"]),
    )


@pytest.mark.usefixtures("docker_ready")
def test_budget_burst_from_the_sandbox_cannot_overspend() -> None:
    # 2 x 40 concurrent calls of max_tokens=50 against room for a few of them
    # (the exact cost boundary: test_gateway_hostile.test_cost_exact_boundary)
    budget = Budget(max_total_tokens=1000)
    figures = run_flood(half_open=0, big=0, dense=0, valid=40, budget=budget, responder=worst_case)
    program, usage = figures["program"], figures["usage"]
    assert figures["exit_code"] == 0, figures["stderr_tail"]
    ok = sum(s.get("200", 0) for s in program["statuses"].values())
    refused = sum(s.get("402", 0) for s in program["statuses"].values())
    assert ok + refused == 80 and ok >= 1
    assert usage["calls"] == ok and usage["refused"] == refused + (program["after"] == 402)
    assert usage["total_tokens"] <= 1000


# A program in the sandbox that tries every request the gateway must not forward as sent:
# a model outside the pool, more than one choice, a completion cap over the spec's, the
# parameters no budget bounds, streaming, other endpoints, its own credentials. It sends
# each case (name -> [method, path, headers, body]) and reports status and error code.
PARAMS_MAIN = r"""
import json, os, socket, sys

SOCK = os.environ["MAS2C_LLM_SOCKET"]


def exchange(method, path, headers, body):
    payload = b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", "Host: mas2c-gateway", "Connection: close",
            f"Content-Length: {len(payload)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        head.append("Content-Type: application/json")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(120)
    s.connect(SOCK)
    s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        answer = json.loads(rest)
    except ValueError:
        answer = {}
    error = answer.get("error") if isinstance(answer, dict) else None
    return {"status": status, "code": (error or {}).get("code"),
            "models": [m.get("id") for m in answer.get("data", [])] if status == 200 and method == "GET" else None,
            "text": rest.decode("utf-8", "replace")[:2000]}


def main():
    args = sys.argv[1:]
    cases = json.load(open(args[args.index("--input") + 1]))
    out = {name: exchange(*case) for name, case in cases.items()}
    json.dump(out, open(args[args.index("--output") + 1], "w"))


main()
"""

_PARAM_CASES: dict[str, tuple[str, str, dict[str, str], dict[str, Any] | None]] = {}


def _chat(marker: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": marker}], **extra}


def _case(name: str, body: dict[str, Any] | None, path: str = "/v1/chat/completions",
          method: str = "POST", headers: dict[str, str] | None = None) -> None:  # fmt: skip
    _PARAM_CASES[name] = (method, path, headers or {}, body)


# forwarded, as the gateway rewrites them (the upstream sees the marker text)
_case("plain", _chat("ok-plain"))
_case("cap-over", _chat("ok-cap-over", max_tokens=100_000))
_case("completion-cap-over", _chat("ok-completion-cap-over", max_completion_tokens=100_000))
_case("tools", _chat("ok-tools", tools=[{"type": "function", "function": {
    "name": "f", "parameters": {"type": "object", "properties": {}}}}]))  # fmt: skip
_case("own-credentials", _chat("ok-own-credentials"), headers={
    "Authorization": "Bearer sk-program-own", "OpenAI-Organization": "org-program",
    "X-Api-Key": "program", "OpenAI-Project": "proj-program"})  # fmt: skip
_case("absolute-target", _chat("ok-absolute-target"),
      path="http://evil.example/v1/chat/completions")  # fmt: skip
# refused, each with its code; nothing of them reaches the upstream
_REFUSED = {
    "model-outside-pool": (_chat("no-model", model="gpt-4o"), "mas2c_unknown_model"),
    "model-not-text": (_chat("no-model-type", model=["m1"]), "mas2c_bad_request"),
    "n-5": (_chat("no-n5", n=5), "mas2c_bad_request"),
    "n-true": (_chat("no-ntrue", n=True), "mas2c_bad_request"),
    "cap-float": (_chat("no-cap-float", max_tokens=1.5), "mas2c_bad_request"),
    "cap-text": (_chat("no-cap-text", max_tokens="100"), "mas2c_bad_request"),
    "cap-zero": (_chat("no-cap-zero", max_tokens=0), "mas2c_bad_request"),
    "two-caps": (
        _chat("no-two-caps", max_tokens=5, max_completion_tokens=100_000),
        "mas2c_bad_request",
    ),
    "stream": (_chat("no-stream", stream=True), "mas2c_bad_request"),
    "prediction": (
        _chat("no-prediction", prediction={"type": "content", "content": "x"}),
        "mas2c_unsupported_parameter",
    ),
    "audio": (
        _chat("no-audio", audio={"voice": "alloy", "format": "wav"}, modalities=["text", "audio"]),
        "mas2c_unsupported_parameter",
    ),
    "service-tier": (_chat("no-tier", service_tier="priority"), "mas2c_unsupported_parameter"),
    "web-search": (_chat("no-web", web_search_options={}), "mas2c_unsupported_parameter"),
    "store": (_chat("no-store", store=True, metadata={"k": "v"}), "mas2c_unsupported_parameter"),
    "stream-options": (
        _chat("no-stream-options", stream_options={"include_usage": True}),
        "mas2c_unsupported_parameter",
    ),
    "unknown": (_chat("no-unknown", future_param=1), "mas2c_unsupported_parameter"),
    "lookalike": (
        _chat("no-lookalike", **{"max_tokens\u200b": 10**6}),
        "mas2c_unsupported_parameter",
    ),
}
for _name, (_body, _code) in _REFUSED.items():
    _case(_name, _body)
_case("embeddings", {"model": "m1", "input": "no-embeddings"}, path="/v1/embeddings")
_case("completions", {"model": "m1", "prompt": "no-completions"}, path="/v1/completions")
_case("files", None, path="/v1/files", method="GET")
_case("models", None, path="/v1/models", method="GET")


def _marker(body: dict[str, Any] | None) -> str:
    messages = (body or {}).get("messages") or [{}]
    return str(messages[0].get("content", ""))


@pytest.mark.usefixtures("docker_ready")
def test_forbidden_request_parameters_from_the_sandbox_never_reach_the_upstream() -> None:
    """One container run: a program in the real sandbox sends, through the gateway socket,
    every kind of request the gateway must refuse or rewrite. The scripted upstream sees
    only the allowed calls, each with the pool's model, the spec's cap, one choice, only
    known parameters and the host's key; the program gets a coded 400 (or 404) for the
    rest. In-process variants: tests/test_gateway_hostile.py."""
    import json
    import tempfile
    from pathlib import Path

    from mas2c.gateway import REQUEST_FIELDS, Gateway, HttpUpstream
    from mas2c.run import socket_dir
    from mas2c.sandbox import SANDBOX_UID, Limits, run_package
    from mas2c.testserver import LLMTestServer

    key = "sk-host-key-for-params"
    with tempfile.TemporaryDirectory(prefix="mas2c-params-") as tmp:
        root = Path(tmp)
        pkg = root / "pkg" / "hostile_params"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "__main__.py").write_text(PARAMS_MAIN)
        (root / "input.json").write_text(json.dumps(_PARAM_CASES))
        with (
            LLMTestServer() as srv,
            HttpUpstream(srv.base_url, key, timeout_s=60) as upstream,
            socket_dir(SANDBOX_UID) as folder,
            Gateway(
                folder / "llm.sock",
                upstream,
                budget=Budget(max_total_tokens=100_000),
                models={"m1": 64},
                socket_uid=SANDBOX_UID,
            ) as gw,
        ):
            report = run_package(
                root / "pkg",
                "hostile_params",
                root / "input.json",
                root / "run",
                backend="docker",
                limits=Limits(timeout_s=300, memory_mb=512, pids=64),
                llm_socket=gw.socket_path,
                on_warning=lambda msg: None,
            )
            usage = gw.usage()
        stderr = (root / "run" / "stderr.txt").read_text(errors="replace")[-2000:]
        assert report.exit_code == 0, stderr
        got = json.loads((root / "run" / "result.json").read_text())
    forwarded = [name for name, case in _PARAM_CASES.items() if _marker(case[3]).startswith("ok-")]
    assert {name: got[name]["status"] for name in forwarded} == dict.fromkeys(forwarded, 200)
    assert {name: (got[name]["status"], got[name]["code"]) for name in _REFUSED} == {
        name: (400, code) for name, (_body, code) in _REFUSED.items()
    }
    for name in ("embeddings", "completions", "files"):
        assert (got[name]["status"], got[name]["code"]) == (404, "not_found"), got[name]
    assert got["models"]["models"] == ["m1"]
    assert all(key not in case["text"] for case in got.values())
    # what reached the upstream: the allowed calls only, each as the gateway rewrote it
    seen = {r.last_user: r for r in srv.requests}
    assert sorted(seen) == sorted(f"ok-{name}" for name in forwarded), sorted(seen)
    assert len(srv.requests) == len(forwarded)
    for marker, req in seen.items():
        assert set(req.body) <= REQUEST_FIELDS, (marker, set(req.body) - REQUEST_FIELDS)
        assert req.body["model"] == "m1" and req.body.get("n", 1) == 1
        cap = req.body.get("max_tokens", req.body.get("max_completion_tokens"))
        assert cap == 64, (marker, req.body)
        assert req.headers.get("authorization") == f"Bearer {key}"
        assert not {"openai-organization", "x-api-key", "openai-project"} & set(req.headers)
    assert "tools" in seen["ok-tools"].body
    assert usage["calls"] == len(forwarded)
