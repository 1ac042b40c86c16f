"""The LLM gateway: the host side of every sandboxed run.

An OpenAI-compatible HTTP server listening on a UNIX socket that is mounted into
the sandbox; it is the program's only way out. Compiled programs talk to it with
the real ``openai`` client through ``httpx.AsyncHTTPTransport(uds=path)`` and
``base_url="http://mas2c-gateway/v1"``, with a dummy key. The gateway

* forwards ``POST /v1/chat/completions`` to an :class:`Upstream` (any
  OpenAI-compatible endpoint through :class:`HttpUpstream`, or the embedded local
  engine), attaching the host's own key: the program's ``Authorization`` header
  and every other header it sends are dropped, so no credential enters the sandbox;
* counts calls, tokens and cost per agent (``X-Mas2c-Agent``) and per model;
* enforces the run's :class:`Budget` whatever the program does (HTTP 402);
* records every exchange to a JSON-lines cassette and replays one with no
  upstream at all, and caches identical requests when asked;
* turns upstream faults, after :class:`HttpUpstream`'s retries, into clean
  OpenAI-style errors (HTTP 502, or the upstream's own non-retryable 4xx).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import os
import random
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

import httpx

from mas2c.errors import RunFailure

__all__ = [
    "Budget",
    "Gateway",
    "GatewayError",
    "HttpUpstream",
    "Price",
    "Upstream",
    "UpstreamError",
    "request_key",
]

log = logging.getLogger("mas2c.gateway")

AGENT_HEADER = "X-Mas2c-Agent"
STEP_HEADER = "X-Mas2c-Step"
UNKNOWN_AGENT = "unknown"
MAX_BODY_BYTES = 32 * 1024 * 1024
# AF_UNIX paths are limited to sizeof(sun_path) - 1 bytes on Linux.
MAX_SOCKET_PATH_BYTES = 107


class GatewayError(RunFailure):
    """The gateway cannot be set up or started (bad socket path, bad cassette...)."""

    code = "gateway"


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


@dataclass(frozen=True)
class Budget:
    """Limits of one run; ``None`` means unlimited."""

    max_llm_calls: int | None = None
    max_total_tokens: int | None = None
    max_cost_usd: float | None = None


class UpstreamError(Exception):
    """An upstream failure. ``body`` is an OpenAI-style ``{"error": {...}}`` dict."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        body: dict[str, Any] | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = (
            body
            if body is not None
            else _error_body("upstream_error", "mas2c_upstream_error", message)
        )
        self.retryable = retryable


class Upstream(Protocol):
    """Something that answers chat completion requests (remote endpoint or local engine)."""

    name: str

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Return a ``chat.completion`` JSON object; raise :class:`UpstreamError` on failure."""
        ...


def request_key(body: Any) -> str:
    """The cassette/cache key: sha256 of the canonical JSON of a request body."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _error_body(type_: str, code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# --------------------------------------------------------------------------- upstream


_RETRYABLE_STATUS = frozenset({408, 409, 429})


class HttpUpstream:
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server...).

    Retries 408/409/429, every 5xx, timeouts, connection errors and malformed
    bodies (not JSON, or no ``choices``) with exponential backoff and jitter,
    honouring ``Retry-After``/``retry-after-ms`` (capped at ``max_backoff_s``).
    Other 4xx are raised at once with the upstream's status and error body.
    Thread-safe: one pooled ``httpx.Client`` serves every gateway thread.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float = 120.0,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_connections: int = 512,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.name = f"http:{self.base_url}"
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 15.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=min(64, max_connections)
            ),
        )

    @classmethod
    def from_env(cls, **kwargs: Any) -> HttpUpstream:
        """``OPENAI_BASE_URL`` (default api.openai.com) and ``OPENAI_API_KEY``."""
        base = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        return cls(base, os.environ.get("OPENAI_API_KEY") or None, **kwargs)

    def __repr__(self) -> str:  # never show the key
        return f"HttpUpstream({self.base_url!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff_s)
        base: float = self.backoff_s * 2.0 ** (attempt - 1)
        return min(base * (1.0 + 0.25 * random.random()), self.max_backoff_s)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/chat/completions"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        payload = json.dumps(body).encode("utf-8")
        last = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            try:
                resp = self._client.post(url, content=payload, headers=headers)
            except httpx.TimeoutException as exc:
                last = f"timed out after {self.timeout_s:g}s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                last = f"connection error: {type(exc).__name__}: {exc}"
            else:
                status = resp.status_code
                if 200 <= status < 300:
                    try:
                        data = resp.json()
                    except ValueError:
                        last = f"malformed response: not JSON ({_snippet(resp.text)})"
                    else:
                        if (
                            isinstance(data, dict)
                            and isinstance(data.get("choices"), list)
                            and data["choices"]
                        ):
                            return data
                        last = f"malformed response: no choices ({_snippet(resp.text)})"
                elif status in _RETRYABLE_STATUS or status >= 500:
                    retry_after = _retry_after(resp.headers)
                    last = f"HTTP {status}: {_upstream_message(resp)}"
                else:
                    message = (
                        f"upstream {self.base_url} rejected the request with HTTP {status}: "
                        f"{_upstream_message(resp)}"
                    )
                    raise UpstreamError(
                        message,
                        status=status,
                        body=_upstream_error_body(resp, message),
                        retryable=False,
                    )
            if attempt < self.max_attempts:
                delay = self._delay(attempt, retry_after)
                log.warning(
                    "upstream %s attempt %d/%d failed (%s); retrying in %.2fs",
                    self.base_url,
                    attempt,
                    self.max_attempts,
                    last,
                    delay,
                )
                time.sleep(delay)
        message = (
            f"upstream {self.base_url} failed after {self.max_attempts} attempt"
            f"{'s' if self.max_attempts != 1 else ''}; last error: {last}"
        )
        raise UpstreamError(message, status=502, retryable=True)


def _snippet(text: str, n: int = 200) -> str:
    text = text.strip().replace("\n", " ")
    if not text:
        return "empty body"
    return repr(text[:n] + ("..." if len(text) > n else ""))


def _retry_after(headers: httpx.Headers) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _upstream_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return _snippet(resp.text)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return _snippet(resp.text)


def _upstream_error_body(resp: httpx.Response, message: str) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data
    return _error_body("upstream_error", "mas2c_upstream_error", message)


# --------------------------------------------------------------------------- accounting


def _text_of(content: Any) -> str:
    """Text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return ""


def _estimate_tokens(text_len: int) -> int:
    return max(1, (text_len + 3) // 4) if text_len else 0


def _prompt_chars(body: Mapping[str, Any]) -> int:
    n = 0
    for msg in body.get("messages") or []:
        if isinstance(msg, dict):
            n += len(_text_of(msg.get("content"))) + 4
            if msg.get("tool_calls"):
                n += len(json.dumps(msg["tool_calls"]))
    return n


def _completion_chars(resp: Mapping[str, Any]) -> int:
    n = 0
    for choice in resp.get("choices") or []:
        msg = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(msg, dict):
            n += len(_text_of(msg.get("content")))
            if msg.get("tool_calls"):
                n += len(json.dumps(msg["tool_calls"]))
    return n


def _usage_of(body: Mapping[str, Any], resp: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens from the response's ``usage``, else estimated (chars/4).

    An estimate is written back into the response so the program sees the same numbers.
    """
    usage = resp.get("usage")
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(p, int) and isinstance(c, int):
            return p, c
        t = usage.get("total_tokens")
        if isinstance(p, int) and isinstance(t, int):
            return p, max(0, t - p)
    p = _estimate_tokens(_prompt_chars(body))
    c = _estimate_tokens(_completion_chars(resp))
    resp["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    return p, c


@dataclass
class _Tally:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, p: int, c: int, cost: float) -> None:
        self.calls += 1
        self.prompt_tokens += p
        self.completion_tokens += c
        self.cost_usd += cost

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cost_usd": round(self.cost_usd, 10),
        }


@dataclass
class _Usage:
    total: _Tally = field(default_factory=_Tally)
    by_agent: dict[str, _Tally] = field(default_factory=dict)
    by_model: dict[str, _Tally] = field(default_factory=dict)
    in_flight: int = 0
    upstream_calls: int = 0
    cache_hits: int = 0
    replayed: int = 0
    refused: int = 0
    errors: int = 0
    budget_exceeded: bool = False


class _HttpFailure(Exception):
    """An exchange ends with an error response to the program."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("error", {}).get("message", "")))
        self.status = status
        self.body = body


# --------------------------------------------------------------------------- http server


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = (
        False  # stop() closes the connections itself; idle keep-alives must not block it
    )
    request_queue_size = 256
    allow_reuse_address = False

    def __init__(self, path: str, gateway: Gateway) -> None:
        self.gateway = gateway
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(path, _Handler)

    def get_request(self) -> tuple[Any, Any]:
        conn, _addr = super().get_request()
        with self._conns_lock:
            self._conns.add(conn)
        # BaseHTTPRequestHandler expects an (host, port) client address; unix peers have ''.
        return conn, ("unix", 0)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    stopping = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.stopping:
            # A request still in flight when the run ended (e.g. a step timed out and the
            # program was killed): its upstream is gone, and nobody waits for the answer.
            log.debug("gateway: request abandoned at shutdown", exc_info=True)
            return
        log.exception("gateway: unhandled error while serving a connection")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mas2c-gateway/1"
    timeout = 600  # idle keep-alive connections are dropped after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("gateway: " + format, *args)

    def _send_json(self, status: int, obj: Any, extra: Mapping[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            if status >= 400:
                # The gateway already retried the upstream; an openai client must not
                # multiply the attempts (nor retry a budget refusal or a cassette miss).
                self.send_header("x-should-retry", "false")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the program hung up, or the gateway is stopping
            self.close_connection = True

    def _route(self) -> str:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.startswith("http://") or path.startswith("https://"):  # absolute-form target
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        if path.startswith("/v1/"):
            path = path[3:]
        return path

    def do_GET(self) -> None:
        route = self._route()
        if route == "/models":
            self._send_json(200, self.server.gateway._models())
        elif route in ("/health", "/healthz"):
            self._send_json(200, {"status": "ok"})
        else:
            self._not_found()

    def do_POST(self) -> None:
        route = self._route()
        raw = self._read_body()
        if raw is None:
            return
        if route != "/chat/completions":
            self._not_found()
            return
        gw = self.server.gateway
        # The runtime percent-encodes ids (header values must be Latin-1).
        agent = unquote(self.headers.get(AGENT_HEADER) or "") or UNKNOWN_AGENT
        step = unquote(self.headers.get(STEP_HEADER) or "")
        status, obj, source = gw._exchange(raw, agent, step)
        self._send_json(status, obj, {"X-Mas2c-Source": source} if source else None)

    def _not_found(self) -> None:
        self._send_json(
            404,
            _error_body(
                "invalid_request_error",
                "not_found",
                f"{self.command} {self.path} is not served by the mas2c gateway "
                "(POST /v1/chat/completions, GET /v1/models)",
            ),
        )

    def _read_body(self) -> bytes | None:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        try:
            if "chunked" in te:
                return self._read_chunked()
            length_s = self.headers.get("Content-Length")
            length = int(length_s) if length_s is not None else 0
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._send_json(
                400, _error_body("invalid_request_error", "bad_request", "invalid Content-Length")
            )
            return None
        except _TooLarge:
            self.close_connection = True
            self._too_large()
            return None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._too_large()
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(1024)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            if len(out) + size > MAX_BODY_BYTES:
                raise _TooLarge
            out += self.rfile.read(size)
            self.rfile.readline(1024)

    def _too_large(self) -> None:
        self._send_json(
            413,
            _error_body(
                "invalid_request_error",
                "request_too_large",
                f"request body larger than {MAX_BODY_BYTES} bytes",
            ),
        )


class _TooLarge(Exception):
    pass


# --------------------------------------------------------------------------- gateway


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a JSON object (answers are mutated when usage is estimated)."""
    out: dict[str, Any] = json.loads(json.dumps(obj))
    return out


def _last_user_text(body: Mapping[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _text_of(msg.get("content"))
    return ""


class Gateway:
    """The OpenAI-compatible gateway on a unix socket. Use as a context manager or start/stop.

    Accounting choices:

    * ``calls`` and the per-agent/per-model tallies count exchanges answered
      successfully, whatever their source (upstream, cache or cassette). Cache hits
      and replayed answers count their tokens and cost as if they had been fetched:
      a run's usage (and so its budget) is a property of the program, identical on a
      recorded, a replayed and a cached run; ``cache_hits``/``replayed`` say how many
      answers did not reach the upstream and ``upstream_calls`` how many did.
    * Refused requests (402) count in ``refused``, not in ``calls``; failures (bad
      requests, cassette misses, upstream errors) count in ``errors``.
    * The call limit reserves a slot for each request in flight, so a fan-out cannot
      overshoot ``max_llm_calls``; token and cost limits can only be checked against
      what has been used so far, so concurrent requests can overshoot them (after
      which every request is refused).
    """

    def __init__(
        self,
        socket_path: Path,
        upstream: Upstream | None,
        *,
        prices: Mapping[str, Price] | None = None,
        budget: Budget = Budget(),  # frozen dataclass: an immutable default
        record: Path | None = None,
        replay: Path | None = None,
        cache: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if upstream is None and replay is None:
            raise GatewayError("the gateway needs an upstream or a replay cassette")
        self.socket_path = Path(socket_path)
        self.upstream = upstream
        self.prices: dict[str, Price] = dict(prices or {})
        self.budget = budget
        self.record_path = Path(record) if record is not None else None
        self.replay_path = Path(replay) if replay is not None else None
        self.cache_enabled = cache
        self.on_event = on_event
        self._lock = threading.Lock()
        self._usage = _Usage()
        self._cache: dict[str, dict[str, Any]] = {}
        self._cassette: dict[str, list[dict[str, Any]]] = {}
        self._cassette_pos: dict[str, int] = {}
        self._record_file: Any = None
        self._record_lock = threading.Lock()
        self._models_seen: set[str] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        if self.replay_path is not None:
            self._load_cassette(self.replay_path)

    # ---------------------------------------------------------------- lifecycle

    def _load_cassette(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise GatewayError(f"cannot read replay cassette {path}: {exc}") from exc
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GatewayError(f"{path}:{lineno}: not a JSON line: {exc}") from exc
            if not isinstance(entry, dict) or not isinstance(entry.get("response"), dict):
                raise GatewayError(f"{path}:{lineno}: a cassette line needs a 'response' object")
            if "request" in entry:
                key = request_key(entry["request"])
                model = (
                    entry["request"].get("model") if isinstance(entry["request"], dict) else None
                )
                if isinstance(model, str):
                    self._models_seen.add(model)
            elif isinstance(entry.get("key"), str):
                key = entry["key"]
            else:
                raise GatewayError(f"{path}:{lineno}: a cassette line needs 'request' or 'key'")
            self._cassette.setdefault(key, []).append(entry["response"])

    def start(self) -> Gateway:
        if self._server is not None:
            raise GatewayError("gateway already started")
        path = self.socket_path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
            raise GatewayError(
                f"socket path too long for a unix socket ({len(os.fsencode(path))} > "
                f"{MAX_SOCKET_PATH_BYTES} bytes): {path}"
            )
        self._clear_stale_socket(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            self._record_file = self.record_path.open("a", encoding="utf-8")
        try:
            server = _Server(str(path), self)
        except OSError as exc:
            self._close_record()
            raise GatewayError(f"cannot listen on {path}: {exc}") from exc
        # The container runs as another uid; it must be able to connect.
        os.chmod(path, 0o666)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"mas2c-gateway:{path.name}",
            daemon=True,
        )
        self._thread.start()
        log.info("gateway listening on %s", path)
        return self

    @staticmethod
    def _clear_stale_socket(path: Path) -> None:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise GatewayError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale socket left by a dead process
            return
        finally:
            probe.close()
        raise GatewayError(f"{path} is in use by another live server")

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.stopping = True
            server.shutdown()
            server.close_connections()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._close_record()

    def _close_record(self) -> None:
        with self._record_lock:
            if self._record_file is not None:
                self._record_file.close()
                self._record_file = None

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- reporting

    def usage(self) -> dict[str, Any]:
        with self._lock:
            u = self._usage
            return {
                **u.total.as_dict(),
                "by_agent": {k: v.as_dict() for k, v in sorted(u.by_agent.items())},
                "by_model": {k: v.as_dict() for k, v in sorted(u.by_model.items())},
                "upstream_calls": u.upstream_calls,
                "cache_hits": u.cache_hits,
                "replayed": u.replayed,
                "refused": u.refused,
                "budget_exceeded": u.budget_exceeded,
                "errors": u.errors,
            }

    def _models(self) -> dict[str, Any]:
        with self._lock:
            names = sorted(set(self.prices) | self._models_seen)
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "mas2c-gateway"}
                for n in names
            ],
        }

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("gateway: on_event callback failed")

    # ---------------------------------------------------------------- exchanges

    def _budget_refusal(self) -> str | None:
        """Called with the lock held. The reason for refusing, or None."""
        b, u = self.budget, self._usage
        calls = u.total.calls + u.in_flight
        if b.max_llm_calls is not None and calls >= b.max_llm_calls:
            return (
                f"budget exceeded: max_llm_calls reached ({calls} calls used or in flight, "
                f"max {b.max_llm_calls})"
            )
        tokens = u.total.prompt_tokens + u.total.completion_tokens
        if b.max_total_tokens is not None and tokens >= b.max_total_tokens:
            return (
                f"budget exceeded: max_total_tokens reached ({tokens} tokens used, "
                f"max {b.max_total_tokens})"
            )
        if b.max_cost_usd is not None and u.total.cost_usd >= b.max_cost_usd:
            return (
                f"budget exceeded: max_cost_usd reached (${u.total.cost_usd:.6f} used, "
                f"max ${b.max_cost_usd:.6f})"
            )
        return None

    def _cost(self, model: str, p: int, c: int) -> float:
        price = self.prices.get(model)
        if price is None:
            return 0.0
        return (p * price.input_per_mtok + c * price.output_per_mtok) / 1_000_000

    def _exchange(self, raw: bytes, agent: str, step: str) -> tuple[int, dict[str, Any], str]:
        """Serve one chat completion. Returns (status, JSON body, source)."""
        t0 = time.monotonic()
        event: dict[str, Any] = {"agent": agent, "step": step, "model": None}
        reserved = False
        try:
            body = self._parse_request(raw)
            model = str(body["model"])
            event["model"] = model
            with self._lock:
                reason = self._budget_refusal()
                if reason is not None:
                    self._usage.refused += 1
                    self._usage.budget_exceeded = True
                else:
                    self._usage.in_flight += 1
                    reserved = True
            if reason is not None:
                raise _HttpFailure(
                    402, _error_body("budget_exceeded", "mas2c_budget_exceeded", reason)
                )
            key = request_key(body)
            resp, source = self._answer(key, body)
            p, c = _usage_of(body, resp)
            cost = self._cost(model, p, c)
            with self._lock:
                u = self._usage
                u.in_flight -= 1
                reserved = False
                u.total.add(p, c, cost)
                u.by_agent.setdefault(agent, _Tally()).add(p, c, cost)
                u.by_model.setdefault(model, _Tally()).add(p, c, cost)
                self._models_seen.add(model)
                if source == "upstream":
                    u.upstream_calls += 1
                elif source == "cache":
                    u.cache_hits += 1
                elif source == "replay":
                    u.replayed += 1
                b = self.budget
                if (
                    b.max_total_tokens is not None
                    and u.total.prompt_tokens + u.total.completion_tokens > b.max_total_tokens
                ) or (b.max_cost_usd is not None and u.total.cost_usd > b.max_cost_usd):
                    u.budget_exceeded = True
            self._record(key, body, resp, agent, step)
            event.update(
                prompt_tokens=p,
                completion_tokens=c,
                total_tokens=p + c,
                cost_usd=cost,
                latency_s=time.monotonic() - t0,
                status=200,
                source=source,
            )
            self._emit(event)
            return 200, resp, source
        except Exception as exc:
            if isinstance(exc, _HttpFailure):
                fail = exc
            else:  # a gateway bug must still answer the program and release the call slot
                log.exception("gateway: internal error while serving a request")
                fail = _HttpFailure(
                    500,
                    _error_body(
                        "server_error",
                        "mas2c_gateway_error",
                        f"mas2c gateway internal error: {type(exc).__name__}: {exc}",
                    ),
                )
            with self._lock:
                if reserved:
                    self._usage.in_flight -= 1
                if fail.status != 402:
                    self._usage.errors += 1
            event.update(
                prompt_tokens=0,
                completion_tokens=0,
                total_tokens=0,
                cost_usd=0.0,
                latency_s=time.monotonic() - t0,
                status=fail.status,
                source="",
                error=str(fail),
            )
            self._emit(event)
            return fail.status, fail.body, ""

    @staticmethod
    def _parse_request(raw: bytes) -> dict[str, Any]:
        def bad(msg: str) -> _HttpFailure:
            return _HttpFailure(400, _error_body("invalid_request_error", "mas2c_bad_request", msg))

        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad("request body must be a JSON object")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise bad("request body needs a 'model' string")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise bad("request body needs a non-empty 'messages' list")
        if body.get("stream"):
            raise bad(
                "streaming (stream=true) is not supported by the mas2c gateway; "
                "call chat.completions.create without stream"
            )
        return body

    def _answer(self, key: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        if self.replay_path is not None:
            return self._replay(key, body), "replay"
        if self.cache_enabled:
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None:
                return _copy(hit), "cache"
        assert self.upstream is not None
        try:
            resp = self.upstream.complete(body)
        except UpstreamError as exc:
            status = exc.status if 400 <= exc.status < 600 else 502
            if exc.retryable or status < 400:
                status = 502
            err = (
                exc.body
                if isinstance(exc.body.get("error"), dict)
                else _error_body("upstream_error", "mas2c_upstream_error", str(exc))
            )
            raise _HttpFailure(status, err) from None
        except Exception as exc:  # a broken upstream must never kill the handler
            log.exception("gateway: upstream %s raised", getattr(self.upstream, "name", "?"))
            raise _HttpFailure(
                502,
                _error_body(
                    "upstream_error",
                    "mas2c_upstream_error",
                    f"upstream {getattr(self.upstream, 'name', '?')} failed: "
                    f"{type(exc).__name__}: {exc}",
                ),
            ) from None
        if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list):
            raise _HttpFailure(
                502,
                _error_body(
                    "upstream_error",
                    "mas2c_upstream_error",
                    f"upstream {self.upstream.name} returned a malformed completion (no choices)",
                ),
            )
        if self.cache_enabled:
            with self._lock:
                self._cache.setdefault(key, _copy(resp))
        return resp, "upstream"

    def _replay(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            answers = self._cassette.get(key)
            if answers:
                pos = self._cassette_pos.get(key, 0)
                self._cassette_pos[key] = pos + 1
                return _copy(answers[min(pos, len(answers) - 1)])
        user = _last_user_text(body)
        snippet = user[:200] + ("..." if len(user) > 200 else "")
        raise _HttpFailure(
            400,
            _error_body(
                "invalid_request_error",
                "mas2c_cassette_miss",
                f"cassette miss: {self.replay_path} has no recorded answer for this request "
                f"(model {body.get('model')!r}, last user message {snippet!r})",
            ),
        )

    def _record(
        self, key: str, body: dict[str, Any], resp: dict[str, Any], agent: str, step: str
    ) -> None:
        if self.record_path is None:
            return
        line = json.dumps(
            {"key": key, "request": body, "response": resp, "agent": agent, "step": step},
            ensure_ascii=False,
        )
        with self._record_lock:
            if self._record_file is not None:
                self._record_file.write(line + "\n")
                self._record_file.flush()
