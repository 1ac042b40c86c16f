"""The LLM gateway: the host side of every sandboxed run.

An OpenAI-compatible HTTP server listening on a UNIX socket that is mounted into
the sandbox; it is the program's only way out. Compiled programs talk to it with
the real ``openai`` client through ``httpx.AsyncHTTPTransport(uds=path)`` and
``base_url="http://mas2c-gateway/v1"``, with a dummy key. The gateway

* forwards ``POST /v1/chat/completions`` to an :class:`Upstream` (any
  OpenAI-compatible endpoint through :class:`HttpUpstream`, or the embedded local
  engine), attaching the host's own key: the program's ``Authorization`` header
  and every other header it sends are dropped, so no credential enters the sandbox;
* treats every request as hostile input: bodies are size-capped, parsed with a
  bound on their JSON values, and served by a fixed number of threads; at most
  :attr:`GatewayLimits.max_connections` connections are open at once and a request
  must arrive whole within :attr:`GatewayLimits.request_timeout_s` (see
  :class:`GatewayLimits` for every bound and the memory it implies);
* accepts only the spec's models (``models``), rejects ``n > 1`` and streaming,
  and clamps ``max_tokens`` to the spec's cap;
* enforces the run's :class:`Budget` whatever the program does: each request
  *reserves* its worst case (calls + 1; tokens ``prompt_token_bound + max_tokens``;
  the cost of those tokens) before it is forwarded, waits while other reservations
  are settling, has its ``max_tokens`` lowered to what is left, and is refused
  (HTTP 402) when even that is not possible; the reservation is settled with the
  real usage when the answer arrives;
* counts calls, tokens and cost per agent (``X-Mas2c-Agent``) and per model;
* records every exchange to a JSON-lines cassette and replays one: strictly
  (a miss is an HTTP 400 ``mas2c_cassette_miss`` and counted in ``cassette_misses``)
  or, with ``replay_misses="forward"``, like vcrpy's ``new_episodes`` (what the
  cassette lacks is fetched and recorded); caches identical requests when asked;
* is the only retry layer: :class:`HttpUpstream` retries upstream faults
  (honouring ``Retry-After``/``retry-after-ms`` and ``x-should-retry``) and every
  error the gateway answers carries ``x-should-retry: false``;
* never lets a credential out: endpoint URLs are shown without userinfo and with
  query values redacted (:func:`redact_url`), upstream error texts are scrubbed of
  the key (also of fragments and masked forms of it) before they reach the program;
* listens on a socket of mode 0600 owned by ``socket_uid`` (the sandbox's uid)
  when mas2c runs as root; otherwise the socket lives in a 0700 folder that no
  other host user can enter (the container reaches it through its bind mount).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from mas2c import accounting
from mas2c.errors import RunFailure

if TYPE_CHECKING:  # httpx (~0.1-0.3 s to import) is imported when an upstream is made
    import httpx

__all__ = [
    "Budget",
    "EgressPolicy",
    "EgressRule",
    "Gateway",
    "GatewayError",
    "GatewayLimits",
    "HttpUpstream",
    "Price",
    "Scrubber",
    "Upstream",
    "UpstreamError",
    "prompt_token_bound",
    "redact_url",
    "request_key",
]

log = logging.getLogger("mas2c.gateway")

AGENT_HEADER = "X-Mas2c-Agent"
STEP_HEADER = "X-Mas2c-Step"
# W3C trace context of the package's llm_call span (its runtime sends it with each request):
# the gateway's events carry it, so a live export nests the gateway's span under that call.
TRACEPARENT_HEADER = "traceparent"
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def trace_context(value: str) -> dict[str, str]:
    """``trace_id`` and ``parent_span_id`` of a W3C traceparent header; {} if malformed."""
    match = _TRACEPARENT.match(value[:100].strip().lower())
    if match is None or not match.group(1).strip("0") or not match.group(2).strip("0"):
        return {}
    return {"trace_id": match.group(1), "parent_span_id": match.group(2)}


UNKNOWN_AGENT = "unknown"
#: Distinct agent names the usage counts keep; calls under further names count as
#: UNKNOWN_AGENT (the name is the program's header: it must not grow usage.json unbounded).
MAX_AGENT_NAMES = 1000
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def header_label(value: str, limit: int) -> str:
    """A program-sent id (the agent or step header) as the host keeps it: percent-decoded,
    cut at ``limit`` characters, and empty when it holds a control character (which the
    run folder's contract refuses: one would make the host's own usage.json unreadable)."""
    text = unquote(value)[:limit]
    return "" if _CONTROL_CHARS.search(text) else text


# AF_UNIX paths are limited to sizeof(sun_path) - 1 bytes on Linux.
MAX_SOCKET_PATH_BYTES = 107
# The completion cap the gateway sets when a token or cost budget is set and neither
# the request, the spec's model nor the upstream names one (reservations need a bound).
DEFAULT_MAX_TOKENS = 4096
_MIB = 1024 * 1024


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


@dataclass(frozen=True)
class GatewayLimits:
    """Host resources one gateway (one run) may use, whatever the program sends.

    Threads: one event-loop thread plus at most ``max_concurrency`` worker threads.
    Memory held for requests: at most ``max_pending_bytes`` of raw bodies being read
    or waiting, plus at most ``max_parse_weight`` for bodies being parsed or served
    (a body weighs ``12 * bytes + 80 * JSON values``, a generous estimate of what
    CPython holds while decoding, parsing and measuring it), plus at most 64 KiB of
    request head per open connection.
    """

    max_body_bytes: int = 4 * _MIB
    max_json_values: int = 200_000
    max_connections: int = 128
    max_concurrency: int = 32
    max_pending_bytes: int = 64 * _MIB
    max_parse_weight: int = 256 * _MIB
    max_head_bytes: int = 64 * 1024
    request_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0
    # What one image may cost in prompt tokens, reserved on top of its bytes (see
    # IMAGE_TOKEN_BOUND); and whether `image_url` parts may name http(s) URLs that a
    # vision upstream would fetch (off: only `data:` URLs, the image travels inline).
    image_token_bound: int = 1_500
    allow_image_urls: bool = False


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
    """Something that answers chat completion requests (remote endpoint or local engine).

    An upstream may also have ``max_tokens`` (the completion cap it applies when a
    request names none); the gateway uses it for budget reservations.
    """

    name: str

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Return a ``chat.completion`` JSON object; raise :class:`UpstreamError` on failure."""
        ...


def request_key(body: Any) -> str:
    """The cassette/cache key: sha256 of the canonical JSON of a request body."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _error_body(type_: str, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --------------------------------------------------------------------------- secrets


def torn_tail(data: bytes) -> int | None:
    """Where a cassette's torn last line starts, or None when its last line is whole.

    A torn line is what a crash, a kill or a full disk leaves of the exchange being
    appended: no final newline, and not JSON. It is no recorded exchange: a replay
    skips it, and a recording cuts it off before it appends (else the next line would be
    glued to it and the whole cassette refused)."""
    if not data or data.endswith(b"\n"):
        return None
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except (ValueError, RecursionError):
        return start
    return None


def record_target_problem(path: Path) -> str | None:
    """Why `--record PATH` must not be written, or None: it is appended to, so it must be
    a new file in an existing folder (no folder is created), a cassette (JSON lines of
    exchanges, each an object with a `response`), or a device such as /dev/null — never
    another file of the user's (a spec named by mistake would be corrupted)."""
    if path.is_dir():
        return "is a folder"
    if not path.parent.is_dir():
        return f"the folder {path.parent} does not exist (mas2c creates no folders for it)"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISREG(mode):
        return None  # /dev/null, a FIFO: written in place
    try:
        data = path.read_bytes()
        whole = data[: torn_tail(data)]  # a torn last line is cut off by the recording
        for number, line in enumerate(whole.splitlines(), 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("response"), dict):
                raise ValueError(f"line {number} is no recorded exchange")
    except OSError as exc:
        return exc.strerror or str(exc)
    except (ValueError, RecursionError) as exc:
        return (
            f"exists and is not a cassette ({str(exc)[:120]}); mas2c appends only to a "
            "cassette: name a new file"
        )
    return None


def redact_url(url: str) -> str:
    """``url`` without userinfo, with every query value replaced by ``<redacted>``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    shown = f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else parts.path
    if parts.query:
        keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
        shown += "?" + "&".join(f"{k}=<redacted>" for k in keys)
    return shown.rstrip("/")


_WORD = re.compile(r"[A-Za-z0-9_\-.*+/=~]{4,}")
_KEYLIKE = re.compile(
    r"(?i)(\b(?:sk|pk|rk)-[A-Za-z0-9_\-.*]{3,}"
    r"|\bbearer\s+\S+|\bbasic\s+\S+|\S*\*{3,}\S*)"
)
_REDACTED = "<redacted>"
# Characters a squashed view of a text drops: an upstream that spaces, quotes, dashes or
# chunks a secret ("sk- pro j-Z q8x") still shows it in the squashed view.
_SQUASHED_OUT = frozenset(" \t\r\n\f\v'\"`,;:|-_.+/=~()[]{}<>")
_MIN_SQUASHED = 6  # shorter forms are matched as written (case-insensitive) only


def _b64_forms(raw: bytes) -> list[str]:
    """Base64 (standard and URL-safe) of ``raw`` as it shows inside any longer encoded
    text: at each of the 3 alignments, the characters that do not depend on neighbours."""
    forms = []
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + raw).decode("ascii").rstrip("=")
            start = 4 if shift else 0  # the first group mixes in the padding bytes
            stable = len(text) - (len(text) % 4 or 4) if shift else len(text)
            if shift == 0:
                forms.append(text)
            elif stable > start:
                forms.append(text[start:stable])
    return forms


def secret_forms(secret: str) -> set[str]:
    """Every form of ``secret`` an upstream may echo: as written, reversed, hex, base64
    (also base64 of base64, as in a ``Basic`` token of a token); matched case-insensitively."""
    raw = secret.encode("utf-8")
    encodings = _b64_forms(raw)
    forms = {secret, raw.hex(), *encodings}
    for whole in encodings[:2]:  # the whole encodings (standard, URL-safe): their forms too
        forms.add(whole.encode("ascii").hex())
        forms.update(_b64_forms(whole.encode("ascii"))[:2])
    return forms | {form[::-1] for form in forms}


def _squash(text: str) -> tuple[str, list[tuple[int, int]]]:
    """``text`` lower-cased, percent-escapes decoded and separators dropped, with the span
    of the original text each remaining character came from."""
    chars: list[str] = []
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        char, end = text[i], i + 1
        if char == "%" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 1 : i + 3]):
            char, end = chr(int(text[i + 1 : i + 3], 16)), i + 3
        if char not in _SQUASHED_OUT:
            chars.append(char.lower())
            spans.append((i, end))
        i = end
    return "".join(chars), spans


class Scrubber:
    """Removes credentials from text that leaves the host side.

    Every form of every secret (the API key, the URL's user and password and their
    ``user:password`` pair — whose base64 is the ``Basic`` token —, the URL's query
    values, egress secrets) is removed: as written, reversed, hex and base64 (see
    :func:`secret_forms`), in any case, and also when the text spaces, quotes,
    percent-escapes or chunks it (a squashed view of the text is searched). Then any
    word sharing four characters (any case) with a secret of eight or more characters
    (so a masked ``sk-...wxyz`` or the key's last characters), any ``Bearer``/``Basic``
    credential, any ``sk-``-like token and any masked token (``***``) becomes
    ``<redacted>``.
    """

    def __init__(self, secrets: list[str], keep: tuple[str, ...] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.keep = tuple(k for k in keep if k)  # shown as is (the redacted endpoint URL)
        self._grams = {
            s[i : i + 4].lower() for s in self.secrets if len(s) >= 8 for i in range(len(s) - 3)
        }
        short: set[str] = set()
        squashed: set[str] = set()
        for secret in self.secrets:
            for form in secret_forms(secret):
                flat = _squash(form)[0]
                if len(flat) >= _MIN_SQUASHED:
                    squashed.add(flat)
                elif len(form) >= 3:
                    short.add(form)
        self._squashed = sorted(squashed, key=len, reverse=True)
        self._short = (
            re.compile("|".join(map(re.escape, sorted(short, key=len, reverse=True))), re.I)
            if short
            else None
        )

    @classmethod
    def for_endpoint(cls, url: str, api_key: str | None) -> Scrubber:
        secrets = [api_key or ""]
        with contextlib.suppress(ValueError):
            parts = urlsplit(url)
            user, password = parts.username or "", parts.password or ""
            secrets += [user, password, unquote(password), unquote(user)]
            if user or password:  # the Basic token is base64 of user:password
                secrets += [f"{user}:{password}", f"{unquote(user)}:{unquote(password)}"]
            secrets += [v for _, v in parse_qsl(parts.query, keep_blank_values=True)]
            secrets += [v.partition("=")[2] for v in parts.query.split("&")]
        return cls([s for s in secrets if len(s) >= 3], keep=(redact_url(url),))

    def __call__(self, text: str) -> str:
        for i, kept in enumerate(self.keep):
            text = text.replace(kept, f"\x00{i}\x00")
        text = self._remove_forms(text)
        text = _KEYLIKE.sub(_REDACTED, text)
        if self._grams:
            text = _WORD.sub(self._word, text)
        for i, kept in enumerate(self.keep):
            text = text.replace(f"\x00{i}\x00", kept)
        return text

    def _remove_forms(self, text: str) -> str:
        if self._short is not None:
            text = self._short.sub(_REDACTED, text)
        if not self._squashed:
            return text
        flat, spans = _squash(text)
        hits: list[tuple[int, int]] = []
        for form in self._squashed:
            start = flat.find(form)
            while start >= 0:
                hits.append((spans[start][0], spans[start + len(form) - 1][1]))
                start = flat.find(form, start + 1)
        if not hits:
            return text
        out, at = [], 0
        for start, end in sorted(hits):
            if end <= at:
                continue
            if start >= at:
                out.append(text[at:start])
                out.append(_REDACTED)
            at = max(at, end)
        out.append(text[at:])
        return "".join(out)

    def _word(self, match: re.Match[str]) -> str:
        word = match.group(0)
        if word == _REDACTED.strip("<>"):
            return word
        lower = word.lower()
        for i in range(len(lower) - 3):
            if lower[i : i + 4] in self._grams:
                return _REDACTED
        return word


_SAFE_FIELD = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _safe_field(value: Any) -> str | None:
    return value if isinstance(value, str) and _SAFE_FIELD.fullmatch(value) else None


# --------------------------------------------------------------------------- upstream


_RETRYABLE_STATUS = accounting.RETRYABLE_STATUS


class HttpUpstream:
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server...).

    Retries 408/409/429, every 5xx, timeouts, connection errors and malformed
    bodies (not JSON, or no ``choices``) with exponential backoff and jitter,
    honouring ``Retry-After``/``retry-after-ms`` (capped at ``max_backoff_s``) and
    the upstream's ``x-should-retry`` (``false`` stops, ``true`` retries any status).
    Other 4xx are raised at once with the upstream's status and a scrubbed error.

    **A dead endpoint** (every attempt failed to connect) fails after at most
    ``max_attempts`` attempts, and no new attempt starts once ``connect_deadline_s``
    have passed since the first: refused connections fail in about
    ``backoff_s * (2**(max_attempts-1) - 1)`` s (3.5 s by default), black-holed ones
    within ``connect_deadline_s + connect_timeout_s`` (15 s). Later requests fail at
    once, without an attempt, for ``dead_cooldown_s`` (one clear message each).

    ``base_url`` may carry a query string (``?api-version=...``), kept on every
    request; ``base_url`` as an attribute is the redacted form (no userinfo, no
    query values); messages never show the key or the URL's credentials.
    Thread-safe: one pooled ``httpx.Client`` serves every gateway thread. It is made
    (httpx imported) on a thread of its own from the constructor on, so that a CLI run
    pays for the import while its sandbox starts, not before.
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
        connect_timeout_s: float = 5.0,
        connect_deadline_s: float = 10.0,
        dead_cooldown_s: float = 30.0,
        max_connections: int = 512,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self._url = base_url.rstrip("/") if "?" not in base_url else base_url
        self._scrub = Scrubber.for_endpoint(base_url, api_key)
        self.base_url = redact_url(base_url)
        self.name = f"http:{self.base_url}"
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.connect_deadline_s = connect_deadline_s
        self.dead_cooldown_s = dead_cooldown_s
        self.max_tokens: int | None = None
        self._dead: tuple[float, str] | None = None
        self._dead_lock = threading.Lock()
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._made: list[httpx.Client] = []  # the client, once made
        self._make_error: BaseException | None = None
        self._closed = False
        self._closing = threading.Event()  # set by close(): retries and backoffs end
        self._make_lock = threading.Lock()
        self._maker = threading.Thread(target=self._make_client, name="mas2c-httpx", daemon=True)
        self._maker.start()

    def _make_client(self) -> None:
        try:
            import httpx

            timeout = httpx.Timeout(
                self.timeout_s, connect=min(self.timeout_s, self._connect_timeout_s)
            )
            limits = httpx.Limits(
                max_connections=self._max_connections,
                max_keepalive_connections=min(64, self._max_connections),
            )
            client = httpx.Client(timeout=timeout, limits=limits)
        except BaseException as exc:  # re-raised where the client is needed
            self._make_error = exc
            return
        with self._make_lock:
            if self._closed:
                client.close()
            else:
                self._made.append(client)

    @property
    def _client(self) -> httpx.Client:
        self._maker.join()
        if not self._made:
            if self._make_error is not None:
                raise UpstreamError(
                    f"cannot make an HTTP client: {type(self._make_error).__name__}: "
                    f"{self.scrub(str(self._make_error))}",
                    status=502,
                    retryable=False,
                )
            raise self._closed_error()
        return self._made[0]

    def _closed_error(self) -> UpstreamError:
        return UpstreamError(
            f"upstream {self.base_url}: the request was abandoned, its run has ended",
            status=502,
            retryable=False,
        )

    @classmethod
    def from_env(cls, **kwargs: Any) -> HttpUpstream:
        """``OPENAI_BASE_URL`` (default api.openai.com) and ``OPENAI_API_KEY``."""
        base = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        return cls(base, os.environ.get("OPENAI_API_KEY") or None, **kwargs)

    def __repr__(self) -> str:  # never show the key
        return f"HttpUpstream({self.base_url!r})"

    def close(self) -> None:
        """Close the client. A request still being tried (its run has ended) stops at its
        next attempt or backoff with `UpstreamError` "closed", never a traceback."""
        self._closing.set()
        with self._make_lock:
            self._closed = True
            made, self._made = self._made, []
        for client in made:
            client.close()

    def __enter__(self) -> HttpUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def endpoint(self, path: str) -> httpx.URL:
        """The URL of ``path`` under the base URL, keeping its query string."""
        import httpx

        url = httpx.URL(self._url)
        return url.copy_with(path=url.path.rstrip("/") + "/" + path.lstrip("/"))

    def scrub(self, text: str) -> str:
        """``text`` without this endpoint's credentials."""
        return self._scrub(text)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        return accounting.backoff_s(attempt, self.backoff_s, self.max_backoff_s, retry_after)

    def _check_alive(self) -> None:
        with self._dead_lock:
            dead = self._dead
        if dead is not None and time.monotonic() < dead[0]:
            raise UpstreamError(
                f"{dead[1]} (not retried: the endpoint was unreachable moments ago)",
                status=502,
                retryable=True,
            )

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        self._check_alive()
        client = self._client
        connect_errors = (httpx.ConnectError, httpx.ConnectTimeout)
        url = self.endpoint("chat/completions")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        payload = json.dumps(body).encode("utf-8")
        last = "no attempt made"
        only_connect_errors = True
        t0 = time.monotonic()
        attempts = 0
        for attempt in range(1, self.max_attempts + 1):
            attempts = attempt
            retry_after: float | None = None
            should_retry: bool | None = None
            connect_error = False
            if self._closing.is_set():
                raise self._closed_error()
            try:
                resp = client.post(url, content=payload, headers=headers)
            except RuntimeError:
                if self._closing.is_set():  # httpx: "the client has been closed"
                    raise self._closed_error() from None
                raise
            except httpx.UnsupportedProtocol as exc:
                connect_error, should_retry = True, False
                last = f"unusable URL ({exc})"
            except connect_errors as exc:
                connect_error = True
                last = f"cannot connect ({type(exc).__name__}: {exc})"
            except httpx.TimeoutException as exc:
                last = f"timed out after {self.timeout_s:g}s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                last = f"connection error: {type(exc).__name__}: {exc}"
            else:
                status = resp.status_code
                should_retry = _should_retry(resp.headers)
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
                    should_retry = True if should_retry is None else should_retry
                elif should_retry is True or (
                    should_retry is None and (status in _RETRYABLE_STATUS or status >= 500)
                ):
                    retry_after = _retry_after(resp.headers)
                    last = f"HTTP {status}: {_upstream_message(resp)}"
                    should_retry = True
                elif status >= 500 or status in _RETRYABLE_STATUS:
                    last = f"HTTP {status}: {_upstream_message(resp)} (x-should-retry: false)"
                else:
                    raise self._rejected(resp)
            only_connect_errors = only_connect_errors and connect_error
            if should_retry is False or attempt >= self.max_attempts:
                break
            delay = self._delay(attempt, retry_after)
            if connect_error and time.monotonic() - t0 + delay > self.connect_deadline_s:
                break
            log.debug(
                "upstream %s attempt %d/%d failed (%s); retrying in %.2fs",
                self.base_url,
                attempt,
                self.max_attempts,
                self.scrub(last),
                delay,
            )
            if self._closing.wait(delay):
                raise self._closed_error()
        elapsed = time.monotonic() - t0
        message = self.scrub(
            f"upstream {self.base_url} failed after {attempts} attempt"
            f"{'s' if attempts != 1 else ''} in {elapsed:.1f}s; last error: {last}"
        )
        if only_connect_errors:
            with self._dead_lock:
                self._dead = (time.monotonic() + self.dead_cooldown_s, message)
        else:
            with self._dead_lock:
                self._dead = None
        raise UpstreamError(message, status=502, retryable=True)

    def _rejected(self, resp: httpx.Response) -> UpstreamError:
        """A non-retryable 4xx: a gateway-made, scrubbed error (never the upstream's body)."""
        status = resp.status_code
        message = self.scrub(
            f"upstream {self.base_url} rejected the request with HTTP {status}: "
            f"{_upstream_message(resp)}"
        )
        inner: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            data = resp.json()
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                inner = data["error"]
        body = {
            "error": {
                "message": message,
                "type": _safe_field(inner.get("type")) or "upstream_error",
                "param": _safe_field(inner.get("param")),
                "code": _safe_field(inner.get("code")) or f"upstream_http_{status}",
            }
        }
        return UpstreamError(message, status=status, body=body, retryable=False)


def _snippet(text: str, n: int = 200) -> str:
    text = text.strip().replace("\n", " ")
    if not text:
        return "empty body"
    return repr(text[:n] + ("..." if len(text) > n else ""))


# The retry policy (x-should-retry, Retry-After, backoff) is shared with the runtime.
_should_retry = accounting.should_retry
_retry_after = accounting.retry_after_s


def _upstream_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return _snippet(resp.text)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return _snippet(str(err["message"]), 500).strip("'\"")
        if isinstance(err, str):
            return _snippet(err, 500).strip("'\"")
    return _snippet(resp.text)


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


_PROMPT_FIELDS = ("messages", "tools", "functions", "response_format", "tool_choice")
PROMPT_OVERHEAD_TOKENS = 16
MESSAGE_OVERHEAD_TOKENS = 8


# Prompt tokens one image may cost, on top of its bytes. OpenAI's high-detail rule
# (https://platform.openai.com/docs/guides/images-vision#calculating-costs): the image
# is fitted into 2048 x 2048, its shortest side scaled to 768, then 85 tokens + 170 per
# 512-px tile; the most tiles is 8 (2048 x 768), so 85 + 170 x 8 = 1,445 tokens; `low`
# detail is 85. Rounded up to 1,500. Models that count images higher (gpt-4o-mini's
# 2,833 + 5,667 per tile, the patch-based gpt-4.1-mini/nano and o-series: up to 1,536
# patches times 1.62-2.46) need GatewayLimits.image_token_bound raised.
IMAGE_TOKEN_BOUND = 1_500
# Content part types a request may carry; any other (`input_audio`, `file`, ...) is
# refused: its token cost has no bound the gateway can compute before forwarding.
CONTENT_PART_TYPES = frozenset({"text", "refusal", "image_url"})


def content_parts_problem(
    body: Mapping[str, Any], *, allow_image_urls: bool
) -> tuple[str, str] | None:
    """``(code, message)`` when a message's content parts cannot be forwarded: a part type
    whose token cost has no bound (``mas2c_unsupported_content``), or an ``image_url``
    that is not a ``data:`` URL (``mas2c_image_url_refused``: a vision upstream would
    fetch any URL the program chose), unless ``allow_image_urls``."""
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in CONTENT_PART_TYPES:
                return (
                    "mas2c_unsupported_content",
                    f"{where}: content part type {str(kind)[:40]!r} is not forwarded by the "
                    f"mas2c gateway (its token cost has no bound); allowed: "
                    f"{', '.join(sorted(CONTENT_PART_TYPES))}",
                )
            if kind != "image_url":
                continue
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            if not isinstance(url, str):
                return ("mas2c_bad_request", f"{where}: image_url needs a 'url' string")
            if not allow_image_urls and url[:5].lower() != "data:":
                return (
                    "mas2c_image_url_refused",
                    f"{where}: image URLs other than data: URLs are refused (the upstream "
                    "would fetch them); send the image inline as a data: URL, or run with "
                    "--allow-image-urls",
                )
    return None


def image_count(body: Mapping[str, Any]) -> int:
    """How many ``image_url`` content parts the request's messages carry."""
    messages = body.get("messages")
    count = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            count += sum(
                1
                for part in content
                if isinstance(part, Mapping) and part.get("type") == "image_url"
            )
    return count


def prompt_token_bound(body: Mapping[str, Any], image_tokens: int = IMAGE_TOKEN_BOUND) -> int:
    """An upper bound of the prompt tokens of a request, used for budget reservations.

    The UTF-8 size of the prompt-bearing fields (messages, tools, functions,
    response_format, tool_choice) as compact JSON, plus 8 tokens per message and
    16 per request for the chat template, plus ``image_tokens`` per image (see
    IMAGE_TOKEN_BOUND). It holds for byte-level BPE tokenizers (OpenAI's, Llama 3's,
    SmolLM2's...), where a token is at least one byte, and for images counted at most
    ``image_tokens`` each; other content part types are refused before this.
    """
    size = 0
    for name in _PROMPT_FIELDS:
        if body.get(name) is not None:
            size += len(
                json.dumps(body[name], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            )
    messages = body.get("messages")
    count = len(messages) if isinstance(messages, list) else 0
    images = image_tokens * image_count(body)
    return size + MESSAGE_OVERHEAD_TOKENS * count + PROMPT_OVERHEAD_TOKENS + images


def _usage_of(body: Mapping[str, Any], resp: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens from the response's ``usage``, else estimated (chars/4).

    An estimate is written back into the response so the program sees the same numbers.
    """
    usage = resp.get("usage")
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        t = usage.get("total_tokens")
        if isinstance(p, int) and _count(p):
            if isinstance(c, int) and _count(c):
                return p, c
            if isinstance(t, int) and _count(t):
                return p, max(0, t - p)
    p = _estimate_tokens(_prompt_chars(body))
    c = _estimate_tokens(_completion_chars(resp))
    resp["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    return p, c


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class _Usage(accounting.Usage):
    """The shared usage counts (mas2c.accounting), plus what only the gateway sees."""

    upstream_calls: int = 0
    cache_hits: int = 0
    replayed: int = 0
    recorded_misses: int = 0
    cassette_misses: int = 0
    refused: int = 0
    errors: int = 0
    budget_exceeded: bool = False
    clamped: int = 0


class _HttpFailure(Exception):
    """An exchange ends with an error response to the program."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("error", {}).get("message", "")))
        self.status = status
        self.body = body


# The chat-completions parameters the gateway forwards. Each either is counted in the
# reservation (the prompt-bearing fields, the completion cap) or cannot change what a call
# costs or where data goes. Anything else is refused (400 mas2c_unsupported_parameter):
# `prediction` (rejected predicted tokens are billed, its text is not in the prompt bound),
# `audio`/`modalities` (audio tokens cost more than the spec's text price), `service_tier`
# (a dearer tier), `web_search_options` (the provider fetches pages: egress and a fee),
# `store`/`metadata` (the provider keeps the conversation), and whatever a provider adds next.
REQUEST_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stream",  # false only (see _parse_request)
        "temperature",
        "top_p",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "reasoning_effort",  # reasoning tokens are completion tokens, within the cap
    }
)


def unsupported_parameters(body: Mapping[str, Any]) -> list[str]:
    """The request's parameters the gateway does not forward (sorted)."""
    return sorted(str(name) for name in body if name not in REQUEST_FIELDS)


def _bad_request(message: str, code: str = "mas2c_bad_request") -> _HttpFailure:
    return _HttpFailure(400, _error_body("invalid_request_error", code, message))


BudgetLimit = Literal["max_llm_calls", "max_total_tokens", "max_cost_usd"]


def _budget_failure(message: str, limit: BudgetLimit | None) -> _HttpFailure:
    """A 402 whose ``param`` names the spec's budget limit (`/budgets/<param>`), when one
    limit is the cause, so the program's error can point at it."""
    body = _error_body("budget_exceeded", "mas2c_budget_exceeded", message, limit)
    return _HttpFailure(402, body)


@dataclass
class _Reservation:
    tokens: int = 0
    cost: Fraction = Fraction(0)
    max_tokens: int | None = None  # the completion cap to forward (None: no cap)


_NO_CAP = -1


class _Ledger:
    """The budget: used amounts plus reservations of requests in flight (exact arithmetic).

    ``reserve`` blocks while a request does not fit beside other reservations that may
    still settle below their worst case; it raises 402 when the request cannot fit
    even with every other reservation gone.
    """

    def __init__(self, budget: Budget, lock: threading.Lock) -> None:
        self.budget = budget
        self.cond = threading.Condition(lock)
        self.calls = 0
        self.tokens = 0
        self.cost = Fraction(0)
        self.res_calls = 0
        self.res_tokens = 0
        self.res_cost = Fraction(0)
        self.limit_cost = Fraction(budget.max_cost_usd) if budget.max_cost_usd is not None else None
        self.closed = False

    @property
    def tight(self) -> bool:
        """Whether tokens or cost are limited (so every request needs a completion cap)."""
        return self.budget.max_total_tokens is not None or self.limit_cost is not None

    def reserve(
        self,
        prompt: int,
        cap: int | None,
        price: tuple[Fraction, Fraction],
        timeout_s: float,
    ) -> _Reservation:
        """Called with the lock held. ``cap`` is the completion cap asked for (None = none)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.closed:
                raise _HttpFailure(
                    503, _error_body("server_error", "mas2c_gateway_stopping", "the run has ended")
                )
            b = self.budget
            if b.max_llm_calls is not None and self.calls + self.res_calls >= b.max_llm_calls:
                raise _budget_failure(
                    f"budget exceeded: max_llm_calls reached ({self.calls + self.res_calls} "
                    f"calls used or in flight, max {b.max_llm_calls})",
                    "max_llm_calls",
                )
            fits = self._fit(prompt, cap, price, with_reserved=True)
            if fits is not None:
                break
            if self._fit(prompt, cap, price, with_reserved=False) is None:
                raise _budget_failure(*self._refusal(prompt, price))
            if time.monotonic() >= deadline:
                raise _budget_failure(
                    f"budget exceeded: no room for this request's worst case beside the "
                    f"{self.res_calls} calls in flight after waiting {timeout_s:g}s",
                    None,  # in-flight calls, not one limit, left no room
                )
            self.cond.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.res_calls += 1
        res = _Reservation(max_tokens=fits if fits != _NO_CAP else None)
        completion = fits if fits != _NO_CAP else 0
        res.tokens = prompt + completion
        res.cost = prompt * price[0] + completion * price[1]
        self.res_tokens += res.tokens
        self.res_cost += res.cost
        return res

    def _fit(
        self, prompt: int, cap: int | None, price: tuple[Fraction, Fraction], *, with_reserved: bool
    ) -> int | None:
        """The completion cap that fits (>= 1), or None when the request does not fit.

        When neither tokens nor cost are limited this is ``cap`` (``_NO_CAP`` for none).
        With reservations in flight, a request whose cap would have to be lowered does
        not fit yet: it waits for them to settle rather than be clamped.
        """
        room: int | None = cap
        if self.budget.max_total_tokens is not None:
            left = self.budget.max_total_tokens - self.tokens
            if with_reserved:
                left -= self.res_tokens
            if left - prompt < 1:
                return None
            room = left - prompt if room is None else min(room, left - prompt)
        if self.limit_cost is not None:
            left_cost = self.limit_cost - self.cost
            if with_reserved:
                left_cost -= self.res_cost
            after_prompt = left_cost - prompt * price[0]
            if after_prompt < 0:
                return None
            if price[1] > 0:
                most = int(after_prompt // price[1])
                if most < 1:
                    return None
                room = most if room is None else min(room, most)
        if room is None:
            return _NO_CAP
        if room < 1:
            return None
        if with_reserved and cap is not None and room < cap and self.res_calls:
            return None  # wait for the others to settle rather than clamp this one
        return room

    def _refusal(self, prompt: int, price: tuple[Fraction, Fraction]) -> tuple[str, BudgetLimit]:
        """Why a request cannot fit even with nothing in flight, and the limit it hits."""
        b = self.budget
        if b.max_total_tokens is not None and b.max_total_tokens - self.tokens - prompt < 1:
            return (
                f"budget exceeded: max_total_tokens reached ({self.tokens} tokens used, "
                f"max {b.max_total_tokens}; this request's prompt may take up to {prompt})",
                "max_total_tokens",
            )
        return (
            f"budget exceeded: max_cost_usd reached (${float(self.cost):.6f} used, max "
            f"${b.max_cost_usd:.6f}; this request's prompt may cost up to "
            f"${float(prompt * price[0]):.6f} plus at least one completion token)",
            "max_cost_usd",
        )

    def settle(self, res: _Reservation, used: int | None, cost: Fraction | None) -> None:
        """Called with the lock held: release ``res``; add the real usage when the call succeeded."""
        self.res_calls -= 1
        self.res_tokens -= res.tokens
        self.res_cost -= res.cost
        if used is not None and cost is not None:
            self.calls += 1
            self.tokens += used
            self.cost += cost
        self.cond.notify_all()

    def exceeded(self) -> bool:
        b = self.budget
        return (b.max_total_tokens is not None and self.tokens > b.max_total_tokens) or (
            self.limit_cost is not None and self.cost > self.limit_cost
        )


# --------------------------------------------------------------------------- http server


_REASONS = {
    200: "OK",
    400: "Bad Request",
    402: "Payment Required",
    404: "Not Found",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class _DaemonPool:
    """At most ``max_workers`` daemon threads, started on demand, serving a queue.

    Daemon threads (unlike ``ThreadPoolExecutor``'s) never hold up the exit of mas2c
    when a request is still waiting on the upstream at the end of a run.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        self.max_workers = max_workers
        self.name = name
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0 and self._threads < self.max_workers
            if start:
                self._threads += 1
                number = self._threads
            else:
                self._idle -= 1  # an idle worker takes it: do not count it twice
        self._queue.put(fn)
        if start:
            threading.Thread(target=self._work, name=f"{self.name}-{number}", daemon=True).start()

    def _work(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except BaseException:  # fn reports its own errors; never lose a worker
                log.exception("gateway: worker failed")
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        """Idle workers exit; busy ones exit after their current request."""
        with self._lock:
            n = self._threads
        for _ in range(n):
            self._queue.put(None)


class _ByteBudget:
    """An asyncio counting budget of bytes (a request larger than the whole takes all of it)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> int:
        n = min(n, self.capacity)
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.capacity)
            self.used += n
        return n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class _WeightBudget:
    """A thread-side counting budget (parse weight of bodies being parsed or served)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout_s: float) -> int | None:
        n = min(n, self.capacity)
        with self._cond:
            ok = self._cond.wait_for(lambda: self.used + n <= self.capacity, timeout=timeout_s)
            if not ok:
                return None
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_value_count(raw: bytes) -> int:
    """An upper bound of the number of JSON values in ``raw`` (without parsing it)."""
    stripped = _JSON_STRING.sub(b'""', raw)
    return (
        stripped.count(b",")
        + stripped.count(b":")
        + stripped.count(b"[")
        + stripped.count(b"{")
        + 1
    )


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "target")

    def __init__(self, method: str, target: str, headers: dict[str, str], keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = b""
        self.keep_alive = keep_alive


class _Reply(Exception):
    """An HTTP answer decided while reading a request (then the connection closes)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = _error_body("invalid_request_error", code, message)


def _route(target: str) -> str:
    path = target.split("?", 1)[0].rstrip("/")
    if path.startswith("http://") or path.startswith("https://"):  # absolute-form target
        path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
    if path.startswith("/v1/"):
        path = path[3:]
    return path


class _AsyncHttp:
    """A small HTTP/1.1 server on asyncio: bounded connections, head and body sizes, time."""

    def __init__(self, gateway: Gateway, sock: socket.socket) -> None:
        self.gateway = gateway
        self.limits = gateway.limits
        self.sock = sock
        self.loop = asyncio.new_event_loop()
        self.pool = _DaemonPool(self.limits.max_concurrency, "mas2c-gw")
        self.open = 0
        self.peak_open = 0
        self.rejected_connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: Any = None
        self._pending: _ByteBudget | None = None
        self.thread = threading.Thread(
            target=self._run,
            name=f"mas2c-gateway:{Path(str(sock.getsockname())).name}",
            daemon=True,
        )
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self.thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise GatewayError(f"cannot serve the gateway socket: {self._error}")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._pending = _ByteBudget(self.limits.max_pending_bytes)
            self._server = self.loop.run_until_complete(
                asyncio.start_unix_server(
                    self._serve, sock=self.sock, limit=self.limits.max_head_bytes
                )
            )
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(timeout=5)
        # Requests still waiting on the upstream are abandoned: nobody waits for them.
        self.pool.shutdown()

    # ---------------------------------------------------------------- connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= self.limits.max_connections:
            self.rejected_connections += 1
            message = (
                f"too many connections to the mas2c gateway (max {self.limits.max_connections}); "
                "close idle ones"
            )
            with contextlib.suppress(Exception):
                writer.write(
                    self._response(
                        503,
                        _error_body("server_error", "mas2c_too_many_connections", message),
                        None,
                        False,
                    )
                )
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.transport.abort()
            return
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        self._writers.add(writer)
        try:
            first = True
            while True:
                timeout = self.limits.request_timeout_s if first else self.limits.idle_timeout_s
                first = False
                try:
                    keep = await self._one(reader, writer, timeout)
                except _Reply as reply:
                    writer.write(self._response(reply.status, reply.body, None, False))
                    await asyncio.wait_for(writer.drain(), self.limits.request_timeout_s)
                    break
                if not keep:
                    break
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # the gateway is stopping
        except Exception:
            log.exception("gateway: unhandled error while serving a connection")
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.transport.abort()

    async def _one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wait_s: float
    ) -> bool:
        """Serve one request; whether the connection stays open."""
        # The first byte may take up to wait_s (keep-alive idle); the rest of the
        # request must then arrive within request_timeout_s.
        first = await asyncio.wait_for(reader.read(1), wait_s)
        if not first:
            return False
        deadline = self.loop.time() + self.limits.request_timeout_s
        try:
            rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._left(deadline))
        except asyncio.LimitOverrunError:
            raise _Reply(431, "request_header_too_large", "request head too large") from None
        except TimeoutError:
            raise _Reply(408, "request_timeout", "request head not received in time") from None
        request = self._parse_head(first + rest)
        length = self._content_length(request)
        assert self._pending is not None
        held = await asyncio.wait_for(self._pending.acquire(length), self._left(deadline))
        try:
            if length:
                try:
                    request.body = await asyncio.wait_for(
                        reader.readexactly(length), self._left(deadline)
                    )
                except TimeoutError:
                    raise _Reply(
                        408, "request_timeout", "request body not received in time"
                    ) from None
            status, obj, extra = await self._dispatch(request)
        finally:
            await self._pending.release(held)
        writer.write(self._response(status, obj, extra, request.keep_alive))
        await asyncio.wait_for(writer.drain(), self.limits.request_timeout_s)
        return request.keep_alive

    def _left(self, deadline: float) -> float:
        left = deadline - self.loop.time()
        if left <= 0:
            raise TimeoutError
        return left

    def _parse_head(self, head: bytes) -> _Request:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Reply(400, "bad_request", "malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _Reply(400, "bad_request", "malformed header line")
            headers[name.lower()] = value.strip()
        if len(headers) > 100:
            raise _Reply(431, "request_header_too_large", "too many headers")
        conn = headers.get("connection", "").lower()
        keep = version == "HTTP/1.1" and "close" not in conn
        return _Request(method, target, headers, keep)

    def _content_length(self, request: _Request) -> int:
        if "transfer-encoding" in request.headers:
            raise _Reply(
                411,
                "length_required",
                "chunked request bodies are not accepted: send Content-Length",
            )
        value = request.headers.get("content-length", "0")
        if not value.isdigit() or len(value) > 12:
            raise _Reply(400, "bad_request", "invalid Content-Length")
        length = int(value)
        if length > self.limits.max_body_bytes:
            raise _Reply(
                413,
                "request_too_large",
                f"request body of {length} bytes is larger than the gateway's limit of "
                f"{self.limits.max_body_bytes} bytes",
            )
        return length

    def _response(
        self, status: int, obj: Any, extra: Mapping[str, str] | None, keep_alive: bool
    ) -> bytes:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "Server: mas2c-gateway/2",
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
        ]
        for k, v in (extra or {}).items():
            head.append(f"{k}: {v}")
        if status >= 400:
            # The gateway already retried the upstream; an openai client must not
            # multiply the attempts (nor retry a budget refusal or a cassette miss).
            head.append("x-should-retry: false")
        if not keep_alive:
            head.append("Connection: close")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data

    async def _dispatch(self, request: _Request) -> tuple[int, Any, dict[str, str] | None]:
        route = _route(request.target)
        gw = self.gateway
        if request.method == "GET" and route == "/models":
            return 200, gw._models(), None
        if request.method == "GET" and route in ("/health", "/healthz"):
            return 200, {"status": "ok"}, None
        if request.method == "POST" and route == "/chat/completions":
            # The runtime percent-encodes ids (header values must be Latin-1).
            agent = header_label(request.headers.get(AGENT_HEADER.lower(), ""), 200)
            step = header_label(request.headers.get(STEP_HEADER.lower(), ""), 500)
            agent = agent or UNKNOWN_AGENT
            context = trace_context(request.headers.get(TRACEPARENT_HEADER, ""))
            status, obj, source = await self._in_worker(
                gw._exchange, request.body, agent, step, context
            )
            return status, obj, ({"X-Mas2c-Source": source} if source else None)
        if request.method == "POST" and route == EGRESS_ROUTE:
            status, obj = await self._in_worker(gw._egress_exchange, request.body)
            return status, obj, None
        return (
            404,
            _error_body(
                "invalid_request_error",
                "not_found",
                f"{request.method} {request.target[:200]} is not served by the mas2c gateway "
                "(POST /v1/chat/completions, GET /v1/models)",
            ),
            None,
        )

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = self.loop
        future: asyncio.Future[Any] = loop.create_future()

        def deliver(result: Any) -> None:
            if not future.done():
                future.set_result(result)

        def work() -> None:
            try:
                result = fn(*args)
            except BaseException:  # _exchange answers every error itself; this is a bug
                log.exception("gateway: worker failed")
                result = (
                    500,
                    _error_body("server_error", "mas2c_gateway_error", "internal error"),
                    "",
                )
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(deliver, result)

        self.pool.submit(work)
        return await future


# --------------------------------------------------------------------------- egress


EGRESS_ROUTE = "/mas2c/egress"
_EGRESS_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"})
_HOP_HEADERS = frozenset(
    {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "upgrade"}
)


@dataclass(frozen=True)
class EgressRule:
    """What one tool may reach: ``host`` (ports 80/443) or ``host:port``, and its secret names."""

    hosts: frozenset[str]
    secrets: tuple[str, ...] = ()

    def allows(self, scheme: str, host: str, port: int | None) -> bool:
        default = {"http": 80, "https": 443}[scheme]
        port = port or default
        return f"{host}:{port}" in self.hosts or (port == default and host in self.hosts)


def read_secrets_file(path: Path) -> dict[str, str]:
    """A secrets file: a JSON object of strings, or ``NAME=value`` lines (# comments)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GatewayError(f"cannot read the secrets file {path}: {exc.strerror or exc}") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise GatewayError(f"{path}: not a JSON object of strings ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise GatewayError(f"{path}: not a JSON object of strings")
        return {str(k): v for k, v in data.items()}
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not name.strip():
            raise GatewayError(f"{path}:{lineno}: expected NAME=value")
        out[name.strip()] = value.strip().strip("'\"")
    return out


class EgressPolicy:
    """Per-tool egress rules and the secrets' values, which stay on the host.

    ``secrets`` are looked up by name in ``MAS2C_SECRETS_FILE`` (when set), then in
    the environment, once, when the policy is made (:meth:`from_host`).
    """

    def __init__(
        self,
        rules: Mapping[str, EgressRule],
        secrets: Mapping[str, str],
        *,
        max_response_bytes: int = 4 * _MIB,
        max_timeout_s: float = 60.0,
        max_requests: int = 1000,
    ) -> None:
        self.rules = dict(rules)
        self.max_requests = max_requests
        self.secrets = {k: v for k, v in secrets.items() if v}
        self.max_response_bytes = max_response_bytes
        self.max_timeout_s = max_timeout_s
        self.scrub = Scrubber(list(self.secrets.values()))

    @classmethod
    def from_host(cls, rules: Mapping[str, EgressRule], **kwargs: Any) -> EgressPolicy:
        names = {name for rule in rules.values() for name in rule.secrets}
        found: dict[str, str] = {}
        file = os.environ.get("MAS2C_SECRETS_FILE")
        if file:
            found.update({k: v for k, v in read_secrets_file(Path(file)).items() if k in names})
        for name in names - set(found):
            if os.environ.get(name):
                found[name] = os.environ[name]
        return cls(rules, found, **kwargs)


def _denied(message: str, status: int = 403) -> _HttpFailure:
    return _HttpFailure(status, _error_body("egress_denied", "mas2c_egress_denied", message))


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


ReplayMisses = Literal["fail", "forward"]


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
    * Budgets: see the module docstring. ``max_llm_calls`` holds exactly.
      ``max_total_tokens`` and ``max_cost_usd`` hold exactly when the upstream reports
      at most ``prompt_token_bound(request)`` prompt tokens and honours ``max_tokens``;
      an upstream that does not can overshoot by that call's excess, after which every
      request is refused and ``budget_exceeded`` is true.

    ``models`` maps each allowed model name to its ``max_tokens`` cap (None: no cap);
    None allows any model (the meta-agents' private gateway). ``socket_uid`` is the uid
    that must reach the socket (the sandbox's); None means this process's own.
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
        replay_misses: ReplayMisses = "fail",
        cache: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        models: Mapping[str, int | None] | None = None,
        limits: GatewayLimits = GatewayLimits(),
        socket_uid: int | None = None,
        egress: EgressPolicy | None = None,
    ) -> None:
        if upstream is None and replay is None:
            raise GatewayError("the gateway needs an upstream or a replay cassette")
        if replay_misses == "forward" and upstream is None:
            raise GatewayError("recording what a cassette lacks needs an upstream (an endpoint)")
        self.socket_path = Path(socket_path)
        self.upstream = upstream
        self.prices: dict[str, Price] = dict(prices or {})
        self.budget = budget
        self.record_path = Path(record) if record is not None else None
        self.replay_path = Path(replay) if replay is not None else None
        self.replay_misses: ReplayMisses = replay_misses
        self.cache_enabled = cache
        self.on_event = on_event
        self.models = dict(models) if models is not None else None
        self.limits = limits
        self.socket_uid = socket_uid
        self.egress = egress
        self._egress_client: httpx.Client | None = None
        self._egress_counts = {"requests": 0, "refused": 0, "failed": 0}
        self._lock = threading.Lock()
        self._ledger = _Ledger(budget, self._lock)
        self._weights = _WeightBudget(limits.max_parse_weight)
        self._usage = _Usage()
        self._cache: dict[str, dict[str, Any]] = {}
        self._cassette: dict[str, list[dict[str, Any]]] = {}
        self._cassette_pos: dict[str, int] = {}
        self._record_file: Any = None
        self._record_lock = threading.Lock()
        self._models_seen: set[str] = set()
        self._http: _AsyncHttp | None = None
        if self.replay_path is not None:
            self._load_cassette(self.replay_path)

    # ---------------------------------------------------------------- lifecycle

    def _load_cassette(self, path: Path) -> None:
        try:
            data = path.read_bytes()
            text = data[: torn_tail(data)].decode("utf-8")  # a torn last line: no exchange
        except UnicodeDecodeError as exc:
            raise GatewayError(f"cannot read replay cassette {path}: not UTF-8 ({exc})") from None
        except FileNotFoundError:
            if self.replay_misses == "forward":
                return  # recording a new cassette
            raise GatewayError(f"cannot read replay cassette {path}: no such file") from None
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
        if self._http is not None:
            raise GatewayError("gateway already started")
        path = self.socket_path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
            raise GatewayError(
                f"socket path too long for a unix socket ({len(os.fsencode(path))} > "
                f"{MAX_SOCKET_PATH_BYTES} bytes): {path}"
            )
        self._clear_stale_socket(path)
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, mode=0o700)
        sock = self._listen(path)
        if self.record_path is not None:  # (the CLI refuses a --record in a missing folder)
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            self._cut_torn_tail(self.record_path)
            self._record_file = self.record_path.open("a", encoding="utf-8")
        self._http = _AsyncHttp(self, sock)
        try:
            self._http.start()
        except GatewayError:
            self._http = None
            sock.close()
            self._close_record()
            raise
        log.info("gateway listening on %s", path)
        return self

    def _listen(self, path: Path) -> socket.socket:
        """Bind the socket: 0600 for ``socket_uid``; see the module docstring."""
        uid = os.geteuid() if self.socket_uid is None else self.socket_uid
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # The folder (0700) keeps everybody else out while the mode is being set.
            os.chmod(path, 0o600)
            if uid != os.geteuid():
                if os.geteuid() == 0:
                    os.chown(path, uid, uid)
                else:
                    self._require_private_folder(path.parent)
                    # The container (another uid) reaches the socket through its bind
                    # mount only: no other host user can enter the 0700 folder.
                    os.chmod(path, 0o666)
            sock.listen(256)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise GatewayError(f"cannot listen on {path}: {exc}") from exc
        return sock

    @staticmethod
    def _require_private_folder(folder: Path) -> None:
        st = folder.stat()
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise GatewayError(
                f"{folder} must be a folder of mode 0700 owned by this user to hold a "
                "gateway socket another uid connects to"
            )

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
        with self._lock:
            self._ledger.closed = True  # requests waiting for budget room give up
            self._ledger.cond.notify_all()
        http = self._http
        self._http = None
        if http is not None:
            http.stop()
            with contextlib.suppress(OSError):
                http.sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self._egress_client is not None:
            self._egress_client.close()
            self._egress_client = None
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
                **accounting.Usage.as_dict(u),
                "upstream_calls": u.upstream_calls,
                "cache_hits": u.cache_hits,
                "replayed": u.replayed,
                "refused": u.refused,
                "budget_exceeded": u.budget_exceeded,
                "errors": u.errors,
                "max_tokens_clamped": u.clamped,
                "cassette_misses": u.cassette_misses,
                "recorded_misses": u.recorded_misses,
                **({"egress": dict(self._egress_counts)} if self.egress is not None else {}),
            }

    def server_stats(self) -> dict[str, int]:
        """Connections open now, the most open at once, and connections turned away."""
        http = self._http
        if http is None:
            return {"open": 0, "peak_open": 0, "rejected": 0}
        return {
            "open": http.open,
            "peak_open": http.peak_open,
            "rejected": http.rejected_connections,
        }

    def _models(self) -> dict[str, Any]:
        with self._lock:
            names = (
                sorted(self.models)
                if self.models is not None
                else sorted(set(self.prices) | self._models_seen)
            )
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

    def _price(self, model: str) -> tuple[Fraction, Fraction]:
        price = self.prices.get(model)
        if price is None:
            return Fraction(0), Fraction(0)
        return (
            accounting.per_token(price.input_per_mtok),
            accounting.per_token(price.output_per_mtok),
        )

    def _exchange(
        self, raw: bytes, agent: str, step: str, context: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], str]:
        """Serve one chat completion (in a worker thread). Returns (status, JSON body, source).
        ``context``: the caller's trace context (`trace_context`), passed on in the event."""
        t0 = time.monotonic()
        event: dict[str, Any] = {"agent": agent, "step": step, "model": None, **(context or {})}
        event["start_ts"] = time.time()
        res: _Reservation | None = None
        weight: int | None = None
        try:
            values = json_value_count(raw)
            if values > self.limits.max_json_values:
                raise _HttpFailure(
                    413,
                    _error_body(
                        "invalid_request_error",
                        "request_too_large",
                        f"request body has more than {self.limits.max_json_values} JSON values",
                    ),
                )
            weight = self._weights.acquire(
                12 * len(raw) + 80 * values, self.limits.request_timeout_s
            )
            if weight is None:
                raise _HttpFailure(
                    503,
                    _error_body("server_error", "mas2c_busy", "the gateway is busy; try later"),
                )
            original = self._parse_request(raw)
            del raw
            model = str(original["model"])
            event["model"] = model
            body, cap = self._checked(original, model)
            prompt = prompt_token_bound(body, self.limits.image_token_bound)
            price = self._price(model)
            with self._lock:
                try:
                    res = self._ledger.reserve(
                        prompt, cap, price, self.limits.request_timeout_s * 4
                    )
                except _HttpFailure:
                    self._usage.refused += 1
                    self._usage.budget_exceeded = True
                    raise
                if res.max_tokens is not None and res.max_tokens != cap:
                    self._usage.clamped += 1
            if res.max_tokens is not None and res.max_tokens != cap:
                body = {**body, self._cap_field(body): res.max_tokens}
            key = request_key(original)
            resp, source = self._answer(key, body)
            p, c = _usage_of(body, resp)
            cost_exact = p * price[0] + c * price[1]
            cost = float(cost_exact)
            with self._lock:
                self._ledger.settle(res, p + c, cost_exact)
                res = None
                u = self._usage
                if agent not in u.by_agent and len(u.by_agent) >= MAX_AGENT_NAMES:
                    agent = UNKNOWN_AGENT
                u.add(agent, model, p, c, cost_exact)
                self._models_seen.add(model)
                if source == "upstream":
                    u.upstream_calls += 1
                elif source == "cache":
                    u.cache_hits += 1
                elif source == "replay":
                    u.replayed += 1
                elif source == "recorded":
                    u.upstream_calls += 1
                    u.recorded_misses += 1
                if self._ledger.exceeded():
                    u.budget_exceeded = True
            if source == "recorded" or self.record_path != self.replay_path:
                self._record(key, original, resp, agent, step)
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
                        f"mas2c gateway internal error: {type(exc).__name__}",
                    ),
                )
            with self._lock:
                if res is not None:
                    self._ledger.settle(res, None, None)
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
        finally:
            if weight is not None:
                self._weights.release(weight)

    def _egress_exchange(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        """Serve one egress request of a code tool (in a worker thread)."""
        policy = self.egress
        try:
            if policy is None:
                raise _denied("no tool of this system declares egress")
            if json_value_count(raw) > self.limits.max_json_values:
                raise _denied("egress request too large", 413)
            try:
                req = json.loads(raw)
            except (ValueError, RecursionError):
                raise _bad_request("egress request is not JSON") from None
            if not isinstance(req, dict):
                raise _bad_request("egress request must be a JSON object")
            answer = self._egress_send(policy, req)
            with self._lock:
                self._egress_counts["requests"] += 1
            return 200, answer
        except _HttpFailure as fail:
            with self._lock:
                key = "refused" if fail.status in (400, 403, 413, 429) else "failed"
                self._egress_counts[key] += 1
            message = fail.body.get("error", {}).get("message", "")
            scrub = policy.scrub if policy is not None else (lambda t: t)
            fail.body["error"]["message"] = scrub(str(message))
            return fail.status, fail.body

    def _egress_send(self, policy: EgressPolicy, req: dict[str, Any]) -> dict[str, Any]:
        import base64
        from urllib.parse import urlsplit

        tool, method, url = req.get("tool"), req.get("method"), req.get("url")
        with self._lock:
            if self._egress_counts["requests"] >= policy.max_requests:
                raise _denied(
                    f"egress budget exceeded: {policy.max_requests} requests per run", 429
                )
        if not isinstance(tool, str) or tool not in policy.rules:
            raise _denied(f"tool {str(tool)[:100]!r} declares no egress in the spec")
        rule = policy.rules[tool]
        if not isinstance(method, str) or method not in _EGRESS_METHODS:
            raise _bad_request(f"egress method must be one of {sorted(_EGRESS_METHODS)}")
        if not isinstance(url, str) or len(url) > 8192:
            raise _bad_request("egress url must be a string of at most 8192 characters")
        headers_in = req.get("headers") or {}
        if not isinstance(headers_in, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers_in.items()
        ):
            raise _bad_request("egress headers must be an object of strings")
        try:
            body = base64.b64decode(str(req.get("body") or ""), validate=True)
        except ValueError:
            raise _bad_request("egress body must be base64") from None

        def where(u: str) -> tuple[str, str, int | None]:
            try:
                parts = urlsplit(u)
                port = parts.port
            except ValueError:
                raise _bad_request("egress url is not a URL") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _denied("egress url must be http:// or https:// with a host")
            if parts.username is not None or parts.password is not None:
                raise _denied("egress url must not carry credentials (use a declared secret)")
            return parts.scheme, parts.hostname.lower(), port

        def check(u: str) -> None:
            scheme, host, port = where(u)
            if not rule.allows(scheme, host, port):
                shown = f"{host}:{port}" if port else host
                raise _denied(
                    f"tool {tool!r} may not reach {shown}: its egress hosts are "
                    f"{sorted(rule.hosts)}"
                )

        check(url)  # before the secrets are inserted: a refusal never names them

        def insert(text: str) -> str:
            for name in rule.secrets:
                token = "${" + name + "}"
                if token in text:
                    if name not in policy.secrets:
                        raise _bad_request(
                            f"secret {name} is not set on the host (an environment variable "
                            "or MAS2C_SECRETS_FILE)"
                        )
                    text = text.replace(token, policy.secrets[name])
            return text

        url = insert(url)
        check(url)
        headers = {k: insert(v) for k, v in headers_in.items() if k.lower() not in _HOP_HEADERS}
        with contextlib.suppress(UnicodeDecodeError):  # binary bodies are sent as they are
            body = insert(body.decode("utf-8")).encode("utf-8")
        timeout = req.get("timeout_s")
        timeout_s = min(float(timeout), policy.max_timeout_s) if _number(timeout) else 30.0  # type: ignore[arg-type]
        import httpx

        with self._lock:
            if self._egress_client is None:
                self._egress_client = httpx.Client(follow_redirects=False)
            client = self._egress_client
        try:
            with client.stream(
                method, url, headers=headers, content=body or None, timeout=timeout_s
            ) as resp:
                content = bytearray()
                for chunk in resp.iter_bytes():
                    content += chunk
                    if len(content) > policy.max_response_bytes:
                        raise _denied(
                            f"the answer is larger than {policy.max_response_bytes} bytes", 502
                        )
                status, resp_headers = resp.status_code, dict(resp.headers)
        except httpx.HTTPError as exc:
            raise _denied(f"egress request failed: {type(exc).__name__}: {exc}", 502) from None
        data = bytes(content)
        for value in policy.secrets.values():
            data = data.replace(value.encode("utf-8"), _REDACTED.encode())
        return {
            "status": status,
            "headers": {k: policy.scrub(v) for k, v in resp_headers.items()},
            "body": base64.b64encode(data).decode("ascii"),
        }

    @staticmethod
    def _cap_field(body: Mapping[str, Any]) -> str:
        if body.get("max_completion_tokens") is not None:
            return "max_completion_tokens"
        return "max_tokens"

    def _checked(self, body: dict[str, Any], model: str) -> tuple[dict[str, Any], int | None]:
        """The request to forward (model pool, ``n``, the spec's ``max_tokens`` cap) and its cap."""
        if self.models is not None and model not in self.models:
            pool = ", ".join(repr(m) for m in sorted(self.models)) or "none"
            raise _bad_request(
                f"model {model[:100]!r} is not in the spec's model pool ({pool})",
                "mas2c_unknown_model",
            )
        unknown = unsupported_parameters(body)
        if unknown:
            shown = ", ".join(repr(name[:40]) for name in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise _bad_request(
                f"the mas2c gateway does not forward {shown}{more}: a parameter whose cost or "
                "data use the run's budget cannot bound (supported: see REQUEST_FIELDS in "
                "mas2c/gateway.py, README 'The LLM gateway')",
                "mas2c_unsupported_parameter",
            )
        problem = content_parts_problem(body, allow_image_urls=self.limits.allow_image_urls)
        if problem is not None:
            raise _bad_request(problem[1], problem[0])
        n = body.get("n")
        if n is not None and (not _count(n) or n != 1):
            raise _bad_request(
                "n must be 1 (or omitted): the mas2c gateway serves one choice per call; "
                "make separate calls",
                "mas2c_bad_request",
            )
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise _bad_request("send max_tokens or max_completion_tokens, not both")
        cap_field = self._cap_field(body)
        requested = body.get(cap_field)
        if requested is not None and (not _count(requested) or requested < 1):
            raise _bad_request(f"{cap_field} must be a positive integer")
        spec_cap = self.models.get(model) if self.models is not None else None
        cap: int | None = requested
        if spec_cap is not None and (cap is None or cap > spec_cap):
            cap = spec_cap
        if cap is None and self._ledger.tight:
            upstream_cap = getattr(self.upstream, "max_tokens", None)
            cap = upstream_cap if _count(upstream_cap) and upstream_cap else DEFAULT_MAX_TOKENS
        if cap is not None and cap != requested:
            body = {**body, cap_field: cap}
        return body, cap

    @staticmethod
    def _parse_request(raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _bad_request(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise _bad_request("request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise _bad_request("request body must be a JSON object")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _bad_request("request body needs a 'model' string")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise _bad_request("request body needs a non-empty 'messages' list")
        if body.get("stream"):
            raise _bad_request(
                "streaming (stream=true) is not supported by the mas2c gateway; "
                "call chat.completions.create without stream"
            )
        return body

    def _answer(self, key: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        if self.replay_path is not None:
            hit = self._replay(key)
            if hit is not None:
                return hit, "replay"
            if self.replay_misses == "fail":
                with self._lock:
                    self._usage.cassette_misses += 1
                raise self._miss(body)
        elif self.cache_enabled:
            with self._lock:
                cached = self._cache.get(key)
            if cached is not None:
                return _copy(cached), "cache"
        resp = self._forward(body)
        if self.cache_enabled:
            with self._lock:
                self._cache.setdefault(key, _copy(resp))
        return resp, ("recorded" if self.replay_path is not None else "upstream")

    def _forward(self, body: dict[str, Any]) -> dict[str, Any]:
        upstream = self.upstream
        assert upstream is not None
        name = getattr(upstream, "name", "?")
        scrub: Callable[[str], str] = getattr(upstream, "scrub", None) or (lambda s: s)
        try:
            resp = upstream.complete(body)
        except UpstreamError as exc:
            status = exc.status if 400 <= exc.status < 600 else 502
            if exc.retryable or status < 400:
                status = 502
            inner = exc.body.get("error") if isinstance(exc.body, dict) else None
            err = _error_body("upstream_error", "mas2c_upstream_error", scrub(str(exc)))
            if isinstance(inner, dict):
                err["error"]["message"] = scrub(str(inner.get("message") or exc))
                err["error"]["type"] = _safe_field(inner.get("type")) or "upstream_error"
                err["error"]["code"] = _safe_field(inner.get("code")) or "mas2c_upstream_error"
                err["error"]["param"] = _safe_field(inner.get("param"))
            raise _HttpFailure(status, err) from None
        except Exception as exc:  # a broken upstream must never kill the handler
            log.exception("gateway: upstream %s raised", name)
            raise _HttpFailure(
                502,
                _error_body(
                    "upstream_error",
                    "mas2c_upstream_error",
                    scrub(f"upstream {name} failed: {type(exc).__name__}: {exc}"),
                ),
            ) from None
        if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list):
            raise _HttpFailure(
                502,
                _error_body(
                    "upstream_error",
                    "mas2c_upstream_error",
                    f"upstream {name} returned a malformed completion (no choices)",
                ),
            )
        return resp

    def _replay(self, key: str) -> dict[str, Any] | None:
        """The next recorded answer for ``key``; strict replay repeats the last one."""
        with self._lock:
            answers = self._cassette.get(key)
            if not answers:
                return None
            pos = self._cassette_pos.get(key, 0)
            if pos >= len(answers) and self.replay_misses == "forward":
                return None  # a new episode: fetch it and record it
            self._cassette_pos[key] = pos + 1
            return _copy(answers[min(pos, len(answers) - 1)])

    def _miss(self, body: dict[str, Any]) -> _HttpFailure:
        user = _last_user_text(body)
        snippet = user[:200] + ("..." if len(user) > 200 else "")
        with self._lock:
            seen = sorted(self._models_seen)
        held = ""
        if seen and body.get("model") not in seen:  # e.g. recorded on the embedded engine
            held = (
                f"; it holds model(s) {', '.join(repr(m) for m in seen[:5])} (a run recorded "
                "on the embedded engine replays with --llm embedded)"
            )
        return _HttpFailure(
            400,
            _error_body(
                "invalid_request_error",
                "mas2c_cassette_miss",
                f"cassette miss: {self.replay_path} has no recorded answer for this request "
                f"(model {body.get('model')!r}, last user message {snippet!r}){held}; record "
                "what is missing with --record and --replay on the same file",
            ),
        )

    @staticmethod
    def _cut_torn_tail(path: Path) -> None:
        """Before appending to a cassette: cut off a torn last line (see `torn_tail`), so
        the first new exchange starts a line of its own. A device is left alone."""
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return
        except FileNotFoundError:
            return
        cut = torn_tail(path.read_bytes())
        if cut is not None:
            os.truncate(path, cut)

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
