"""An OpenAI-compatible chat-completions server for tests and benchmarks.

Standard library only. It answers ``POST /v1/chat/completions`` (also without the
``/v1`` prefix) and ``GET /v1/models`` on loopback, with scripted answers, a
settable latency and injectable faults, so that the real ``openai`` client can be
exercised without a network::

    with LLMTestServer(Script([(r"capital", "Paris")])) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test")
        ...

Latency is slept in the handler thread, so concurrent requests overlap;
``max_in_flight`` shows how many were served at once.

From a shell, ``python -m mas2c.testserver --script FILE [--port N]`` serves the
rules of a YAML/JSON script file (see :func:`load_script`), prints its base URL
(``http://127.0.0.1:PORT/v1``) as the first line on stdout and serves until
SIGINT/SIGTERM, so a compiled system can be run offline against it
(``OPENAI_BASE_URL=<that URL> mas2c run ...``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, cast
from urllib.parse import unquote

__all__ = [
    "FAULTS",
    "ChatRequest",
    "LLMTestServer",
    "Reply",
    "ReplyLike",
    "Responder",
    "Script",
    "ToolCall",
    "default_responder",
    "load_script",
    "main",
    "schema_instance",
]

TEST_MODEL = "test-model"
FAULTS = frozenset({"status", "malformed", "hang", "invalid_json", "drop"})
_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODEL_PATHS = frozenset({"/v1/models", "/models"})
_SYSTEM_ROLES = frozenset({"system", "developer"})
_INVALID_JSON_CONTENT = 'Sure! Here is the JSON you asked for: {"answer": 42,'
_MALFORMED_BODY = b"<html>this is not JSON"
_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


# --------------------------------------------------------------------------- data


@dataclass
class ToolCall:
    """A scripted function call the "model" makes."""

    name: str
    arguments: dict[str, Any]


@dataclass
class Reply:
    """A scripted assistant answer; ``None`` fields are estimated or defaulted."""

    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None


def _text_of(content: Any) -> str:
    """The text of a message ``content``: a string, or a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") if isinstance(p, dict) else str(p) for p in content]
        return "".join(str(p) for p in parts)
    return str(content)


@dataclass
class ChatRequest:
    """One chat-completions request as the server received it."""

    body: dict[str, Any]
    headers: dict[str, str]
    path: str = "/v1/chat/completions"

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The request's messages (dicts only)."""
        msgs = self.body.get("messages")
        if not isinstance(msgs, list):
            return []
        return [m for m in msgs if isinstance(m, dict)]

    @property
    def model(self) -> str:
        """The requested model name."""
        return str(self.body.get("model", TEST_MODEL))

    @property
    def system(self) -> str:
        """The system (and developer) messages' text, joined with newlines."""
        texts = [
            _text_of(m.get("content")) for m in self.messages if m.get("role") in _SYSTEM_ROLES
        ]
        return "\n".join(texts)

    @property
    def last_user(self) -> str:
        """The text of the last user message ("" if none)."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                return _text_of(m.get("content"))
        return ""

    @property
    def all_text(self) -> str:
        """All message contents joined with newlines."""
        return "\n".join(_text_of(m.get("content")) for m in self.messages)

    @property
    def response_format(self) -> dict[str, Any]:
        """The ``response_format`` object ({} if none)."""
        rf = self.body.get("response_format")
        return rf if isinstance(rf, dict) else {}

    @property
    def response_schema(self) -> dict[str, Any] | None:
        """The JSON Schema asked for with ``response_format`` type ``json_schema``."""
        rf = self.response_format
        if rf.get("type") != "json_schema":
            return None
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else None

    @property
    def json_mode(self) -> bool:
        """Whether JSON output was asked for (``json_object`` or ``json_schema``)."""
        return self.response_format.get("type") in ("json_object", "json_schema")

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The tool definitions offered to the model."""
        tools = self.body.get("tools")
        return [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []

    @property
    def agent(self) -> str | None:
        """The ``X-Mas2c-Agent`` header, naming the calling agent (percent-decoded)."""
        value = self.headers.get("x-mas2c-agent")
        return unquote(value) if value is not None else None


ReplyLike = Reply | str | dict[str, Any] | list[Any]
Responder = Callable[[ChatRequest], ReplyLike]
Answer = ReplyLike | Callable[[ChatRequest], ReplyLike]


def to_reply(value: ReplyLike) -> Reply:
    """Normalise a responder's result: str -> content, dict/list -> JSON content."""
    if isinstance(value, Reply):
        return value
    if isinstance(value, str):
        return Reply(content=value)
    if isinstance(value, dict | list):
        return Reply(content=json.dumps(value))
    raise TypeError(f"responder returned {type(value).__name__}, expected Reply|str|dict|list")


# ------------------------------------------------------------------ JSON Schema


def _resolve_ref(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    """Resolve a local ``#/...`` JSON pointer against the root schema."""
    if not ref.startswith("#"):
        raise ValueError(f"only local $ref is supported: {ref!r}")
    node: Any = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if part:
            node = node[part.replace("~1", "/").replace("~0", "~")]
    if not isinstance(node, dict):
        raise ValueError(f"$ref {ref!r} does not point to a schema")
    return node


def _number_instance(schema: dict[str, Any], integer: bool) -> int | float:
    """0, moved into ``[minimum, maximum]`` (and above ``exclusiveMinimum``)."""
    value: float = max(0, schema.get("minimum", 0))
    low = schema.get("exclusiveMinimum")
    if isinstance(low, int | float) and not isinstance(low, bool) and value <= low:
        value = math.floor(low) + 1 if integer else low + 0.5
    high = schema.get("maximum")
    if isinstance(high, int | float) and value > high:
        value = high
    return math.ceil(value) if integer else float(value)


def _object_instance(schema: dict[str, Any], root: dict[str, Any], depth: int) -> dict[str, Any]:
    """Required properties (all of them when there is no ``required`` list)."""
    props = schema.get("properties") or {}
    names = schema["required"] if "required" in schema else list(props)
    return {n: _instance(props.get(n, {}), root, depth + 1) for n in names}


def _array_instance(schema: dict[str, Any], root: dict[str, Any], depth: int) -> list[Any]:
    """``prefixItems`` instances, padded to ``minItems`` with ``items`` instances."""
    out = [_instance(s, root, depth + 1) for s in schema.get("prefixItems", [])]
    items = schema.get("items")
    item_schema = items if isinstance(items, dict) else {}
    while len(out) < int(schema.get("minItems", 0)):
        out.append(_instance(item_schema, root, depth + 1))
    return out


def _scalar_instance(kind: str, schema: dict[str, Any]) -> Any:
    """An instance of a non-container JSON type."""
    if kind == "integer":
        return _number_instance(schema, integer=True)
    if kind == "number":
        return _number_instance(schema, integer=False)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "x" * max(1, int(schema.get("minLength", 1)))


def _instance(schema: Any, root: dict[str, Any], depth: int) -> Any:
    """The recursive worker of :func:`schema_instance`."""
    if not isinstance(schema, dict) or depth > 64:
        return "x" if schema is not False else None
    if "$ref" in schema:
        return _instance(_resolve_ref(schema["$ref"], root), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _instance(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0] if kind else None
    if kind is None and "properties" in schema:
        kind = "object"
    if kind == "object":
        return _object_instance(schema, root, depth)
    if kind == "array":
        return _array_instance(schema, root, depth)
    return _scalar_instance(str(kind), schema)


def schema_instance(schema: dict[str, Any]) -> Any:
    """A minimal valid instance of a JSON Schema.

    object -> the ``required`` properties (all properties if there is no
    ``required`` list), filled recursively; string -> "x" (``minLength`` long);
    integer -> 0 (respecting minimum); number -> 0.0; boolean -> True; array ->
    [] or ``minItems`` copies; null -> None; ``enum`` -> first value; ``const``
    -> itself; anyOf/oneOf/allOf -> first; local ``$ref`` (``$defs`` or
    ``definitions``) resolved; no type -> "x" (an object if it has properties).
    """
    return _instance(schema, schema, 0)


def default_responder(req: ChatRequest) -> ReplyLike:
    """A schema instance for json_schema requests, {} in json_object mode, else 'ANSWER: 42'."""
    schema = req.response_schema
    if schema is not None:
        instance = schema_instance(schema)
        return json.dumps(instance) if not isinstance(instance, dict | list) else instance
    if req.json_mode:
        return {}
    return "ANSWER: 42"


# ------------------------------------------------------------------------ Script


class _Turns:
    """Answers returned in turn, the last one repeating (thread-safe)."""

    def __init__(self, answers: Sequence[Answer]) -> None:
        if not answers:
            raise ValueError("a rule needs at least one answer")
        self._answers = list(answers)
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> Answer:
        """The next answer in turn."""
        with self._lock:
            answer = self._answers[min(self._next, len(self._answers) - 1)]
            self._next += 1
            return answer


def _as_turns(answer: Answer | Sequence[Answer]) -> _Turns:
    """A top-level list is a sequence of answers; anything else a single answer."""
    return _Turns(answer if isinstance(answer, list) else [cast(Answer, answer)])


class Script:
    """Ordered rules: the first rule whose regex matches the chosen field wins.

    ``Script([(r"pattern", answer), ...], field="last_user", default=None)``.
    Patterns are applied with ``re.search`` and ``re.DOTALL`` to ``req.<field>``,
    one of "last_user", "system" or "all_text". An answer is a str, dict, Reply
    or a callable ``(ChatRequest) -> Reply|str|dict|list``. A rule given as a
    list of answers returns them in turn, the last one repeating; to answer a
    JSON array, wrap it (``[[1, 2]]``) or return it from a callable. With no
    match, ``default`` answers (:func:`default_responder` when None).
    """

    FIELDS = ("last_user", "system", "all_text")

    def __init__(
        self,
        rules: Sequence[tuple[str | re.Pattern[str], Answer | Sequence[Answer]]],
        field: str = "last_user",
        default: Answer | Sequence[Answer] | None = None,
    ) -> None:
        if field not in self.FIELDS:
            raise ValueError(f"field must be one of {self.FIELDS}, not {field!r}")
        self.field = field
        self._rules = [(re.compile(p, re.DOTALL), _as_turns(a)) for p, a in rules]
        self._default = _as_turns(default_responder if default is None else default)

    def __call__(self, req: ChatRequest) -> ReplyLike:
        text = str(getattr(req, self.field))
        turns = next((t for p, t in self._rules if p.search(text)), self._default)
        answer = turns.take()
        return answer(req) if callable(answer) else answer


# ------------------------------------------------------------------------ server


@dataclass
class _Fault:
    kind: str
    status: int
    seconds: float
    retry_after: float | None
    message: str | Callable[[ChatRequest], str] | None = None
    headers: dict[str, str] | None = None


def _words(text: str) -> int:
    return len(text.split())


def _completion(req: ChatRequest, reply: Reply, completion_id: str) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object for ``reply``."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": tc.name, "arguments": json.dumps(tc.arguments)},
            }
            for i, tc in enumerate(reply.tool_calls)
        ]
    prompt = reply.prompt_tokens
    if prompt is None:
        prompt = max(1, _words(req.all_text))
    completion = reply.completion_tokens
    if completion is None:
        args = " ".join(json.dumps(tc.arguments) for tc in reply.tool_calls)
        completion = max(1, _words(f"{reply.content or ''} {args}"))
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": 0,
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _error_body(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-style error object."""
    kind, code = _ERROR_KINDS.get(status, ("server_error", "server_error"))
    if status < 500 and status not in _ERROR_KINDS:
        kind, code = "invalid_request_error", f"http_{status}"
    return {"error": {"message": message, "type": kind, "code": code}}


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True

    def __init__(self, owner: LLMTestServer, address: tuple[str, int]) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: clients time out and hang up on purpose in tests."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mas2c-testserver/1"
    disable_nagle_algorithm = True  # headers and body go out in two writes

    @property
    def owner(self) -> LLMTestServer:
        return cast(_HTTPServer, self.server).owner

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging."""

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _send_error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(status, _error_body(status, message), headers)

    def do_GET(self) -> None:
        if self._path() in _MODEL_PATHS:
            model = {"id": TEST_MODEL, "object": "model", "created": 0, "owned_by": "mas2c"}
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._send_error(404, f"not found: GET {self.path}")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self._path() not in _CHAT_PATHS:
            self._send_error(404, f"not found: POST {self.path}")
            return
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            self._send_error(400, f"request body is not JSON: {exc}")
            return
        if not isinstance(body, dict):
            self._send_error(400, "request body must be a JSON object")
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.owner._serve_chat(self, ChatRequest(body=body, headers=headers, path=self.path))


class LLMTestServer:
    """An OpenAI-compatible chat server on loopback, for tests and benchmarks."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        latency_s: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.responder: Responder = responder or default_responder
        self.latency_s = latency_s
        self.requests: list[ChatRequest] = []
        self._host = host
        self._port = port
        self._lock = threading.Condition()
        self._faults: deque[_Fault] = deque()
        self._ids = itertools.count(1)
        self._in_flight = 0
        self._max_in_flight = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> LLMTestServer:
        """Bind and serve in a daemon thread; returns self."""
        if self._httpd is None:
            self._httpd = _HTTPServer(self, (self._host, self._port))
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="mas2c-testserver",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (requests still sleeping are abandoned)."""
        httpd, thread = self._httpd, self._thread
        self._httpd, self._thread = None, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> LLMTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (the server must be started)."""
        if self._httpd is None:
            raise RuntimeError("LLMTestServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        """The ``base_url`` for an OpenAI client: ``http://HOST:PORT/v1``."""
        return f"{self.url}/v1"

    # ----------------------------------------------------------------- counters

    @property
    def in_flight(self) -> int:
        """Chat requests being handled right now."""
        return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The highest ``in_flight`` seen since start or the last reset."""
        return self._max_in_flight

    def reset_counters(self, settle: float = 2.0) -> None:
        """Forget recorded requests and the ``max_in_flight`` high-water mark.

        A client can hold its answer before the server's thread has finished
        with the request, so this first waits up to ``settle`` seconds for the
        requests in flight to end; any still running after that (a "hang"
        fault) keep counting in ``max_in_flight``.
        """
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=settle)
            self.requests.clear()
            self._max_in_flight = self._in_flight

    # ------------------------------------------------------------------- faults

    def inject(
        self,
        fault: str,
        count: int = 1,
        *,
        status: int = 500,
        seconds: float = 0.0,
        retry_after: float | None = None,
        message: str | Callable[[ChatRequest], str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Queue ``fault`` for the next ``count`` chat requests.

        "status": HTTP ``status`` with an OpenAI error body (and ``Retry-After``),
        whose message is ``message`` (or made from the request by it), with ``headers``;
        "malformed": 200 with a non-JSON body; "hang": sleep ``seconds`` first;
        "invalid_json": 200 with content that is not JSON; "drop": close the
        connection without answering.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        with self._lock:
            self._faults.extend(
                _Fault(fault, status, seconds, retry_after, message, headers) for _ in range(count)
            )

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    # ----------------------------------------------------------------- handling

    def _enter(self, req: ChatRequest) -> None:
        with self._lock:
            self.requests.append(req)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def _serve_chat(self, handler: _Handler, req: ChatRequest) -> None:
        self._enter(req)
        try:
            self._answer(handler, req, self._take_fault())
        finally:
            self._leave()

    def _answer(self, handler: _Handler, req: ChatRequest, fault: _Fault | None) -> None:
        """Answer one chat request, applying ``fault`` if any."""
        if fault is not None and fault.kind == "drop":
            handler.close_connection = True
            return
        if fault is not None and fault.kind == "status":
            headers = {} if fault.retry_after is None else {"Retry-After": _fmt(fault.retry_after)}
            headers.update(fault.headers or {})
            text = fault.message(req) if callable(fault.message) else fault.message
            handler._send_error(
                fault.status, text or f"injected fault: HTTP {fault.status}", headers
            )
            return
        if fault is not None and fault.kind == "malformed":
            handler._send(200, _MALFORMED_BODY)
            return
        if fault is not None and fault.kind == "hang":
            time.sleep(fault.seconds)
        if req.body.get("stream"):
            handler._send_error(400, "streaming is not supported by the mas2c test server")
            return
        if fault is not None and fault.kind == "invalid_json":
            reply = Reply(content=_INVALID_JSON_CONTENT)
        else:
            try:
                reply = to_reply(self.responder(req))
            except Exception as exc:
                handler._send_error(500, f"responder failed: {type(exc).__name__}: {exc}")
                return
        time.sleep(self.latency_s if reply.latency_s is None else reply.latency_s)
        handler._send_json(200, _completion(req, reply, f"chatcmpl-{next(self._ids)}"))


def _fmt(seconds: float) -> str:
    """A Retry-After value: an integer when whole, else a decimal."""
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)


# ------------------------------------------------------------------------ script files


class ScriptError(ValueError):
    """A script file that cannot be used; the message names the file and the rule."""


def _file_reply(value: Any, where: str) -> ReplyLike:
    """One answer of a script file: a string, ``{json: VALUE}`` or a Reply's fields."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"json"}:
        return json.dumps(value["json"])
    if isinstance(value, dict):
        known = {"content", "tool_calls", "prompt_tokens", "completion_tokens", "latency_s"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ScriptError(
                f"{where}: unknown reply key(s) {unknown}; use {sorted(known)} or json"
            )
        calls = []
        for i, call in enumerate(value.get("tool_calls") or []):
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ScriptError(f"{where}: tool_calls[{i}] needs a 'name' and 'arguments'")
            calls.append(ToolCall(call["name"], dict(call.get("arguments") or {})))
        return Reply(
            content=value.get("content"),
            tool_calls=calls,
            prompt_tokens=value.get("prompt_tokens"),
            completion_tokens=value.get("completion_tokens"),
            latency_s=value.get("latency_s"),
        )
    raise ScriptError(f"{where}: a reply is a string, {{json: VALUE}} or an object with 'content'")


def _file_answers(rule: dict[str, Any], where: str) -> list[Answer]:
    if "replies" in rule:
        replies = rule["replies"]
        if not isinstance(replies, list) or not replies:
            raise ScriptError(f"{where}: 'replies' must be a non-empty list")
        return [_file_reply(r, f"{where}.replies[{i}]") for i, r in enumerate(replies)]
    if "reply" in rule:
        return [_file_reply(rule["reply"], f"{where}.reply")]
    if "json" in rule:
        return [json.dumps(rule["json"])]
    raise ScriptError(f"{where}: a rule needs 'reply', 'replies' or 'json'")


def load_script(path: Path) -> tuple[Script, dict[str, Any]]:
    """A :class:`Script` from a YAML or JSON file, and the file's server options.

    The file is a mapping: ``rules`` (a list of ``{match: REGEX, reply: ANSWER}``,
    ``{match, replies: [ANSWER, ...]}`` answered in turn with the last repeating, or
    ``{match, json: VALUE}``), optional ``field`` (last_user, system or all_text),
    ``default`` (an ANSWER when no rule matches; else a schema instance or
    "ANSWER: 42") and ``latency_s``. An ANSWER is a string, ``{json: VALUE}``, or
    ``{content, tool_calls: [{name, arguments}], prompt_tokens, completion_tokens,
    latency_s}``.
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScriptError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ScriptError(f"{path}: not YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ScriptError(f"{path}: the script must be a mapping with 'rules'")
    unknown = sorted(set(data) - {"rules", "field", "default", "latency_s"})
    if unknown:
        raise ScriptError(f"{path}: unknown key(s) {unknown}")
    rules_in = data.get("rules") or []
    if not isinstance(rules_in, list):
        raise ScriptError(f"{path}: 'rules' must be a list")
    rules: list[tuple[str, Answer | Sequence[Answer]]] = []
    for i, rule in enumerate(rules_in):
        where = f"{path}: rules[{i}]"
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str):
            raise ScriptError(f"{where}: a rule needs a 'match' regex string")
        try:
            re.compile(rule["match"])
        except re.error as exc:
            raise ScriptError(f"{where}: bad regex {rule['match']!r}: {exc}") from None
        rules.append((rule["match"], _file_answers(rule, where)))
    default = None
    if data.get("default") is not None:
        default = _file_reply(data["default"], f"{path}: default")
    try:
        script = Script(rules, field=str(data.get("field", "last_user")), default=default)
    except ValueError as exc:
        raise ScriptError(f"{path}: {exc}") from None
    latency = data.get("latency_s", 0.0)
    if not isinstance(latency, int | float) or latency < 0:
        raise ScriptError(f"{path}: latency_s must be a number >= 0")
    return script, {"latency_s": float(latency)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mas2c.testserver [--script FILE] [--host H] [--port N] [--latency S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m mas2c.testserver",
        description="An OpenAI-compatible chat server with scripted answers, for offline tests. "
        "Prints its base URL on the first line of stdout, then serves until Ctrl-C/SIGTERM.",
    )
    parser.add_argument("--script", type=Path, help="YAML/JSON file of rules (see load_script)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default) picks a free port")
    parser.add_argument("--latency", type=float, default=None, help="seconds per answer")
    args = parser.parse_args(argv)
    responder: Responder | None = None
    latency = 0.0
    if args.script is not None:
        try:
            script, options = load_script(args.script)
        except ScriptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        responder, latency = script, options["latency_s"]
    if args.latency is not None:
        latency = args.latency
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = LLMTestServer(responder, latency_s=latency, host=args.host, port=args.port)
        server.start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        print(server.base_url, flush=True)
        print(f"serving {args.script or 'the default responder'}; Ctrl-C stops", file=sys.stderr)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
