"""The HTTP service of a package compiled by mas2c: ``python -m mas2c_<name> serve``.

Needs the ``serve`` extra (``pip install 'mas2c-<name>[serve]'``: starlette + uvicorn);
without it ``serve`` exits 2 with that line. The endpoints follow the Agent Protocol's
stateless runs (as LangGraph's server speaks them) where they fit:

- ``POST /runs/wait``: run once, answer when done: the run's result (``out.json``'s
  shape: ``status``, ``outputs``, ``usage``, ``error``, ``warnings``) plus ``run`` (the
  Agent Protocol run object: ``run_id``, ``agent_id``, ``status``, times, ``metadata``).
- ``POST /runs/stream``: the same run as server-sent events: ``metadata`` (the run id),
  one ``trace`` event per trace event as the run writes it, ``result``, then ``end``.
- ``POST /runs`` (a background run: the run object at once), ``GET /runs/{run_id}``,
  ``GET /runs/{run_id}/wait``, ``POST /runs/{run_id}/cancel``, ``DELETE /runs/{run_id}``.
- ``GET /ok``, ``GET /health`` (503 while draining), ``GET /info`` and
  ``GET /agents/{agent_id}/schemas`` (the input schema, outputs, budgets, limits).

A request body is ``{"input": {...}, "budgets": {...}, "metadata": {...},
"agent_id": "<spec name>"}`` (``assistant_id`` is accepted for ``agent_id``;
``on_disconnect``: ``cancel`` (default) or ``continue``: what happens to a run whose
client of ``/runs/wait`` or ``/runs/stream`` goes away). Contract:

- **Input** is checked against the spec's input schemas before the run is queued:
  422 ``bad_input`` with every problem located (``pointer`` in the request, e.g.
  ``/input/question``, and ``spec_pointer``, e.g. ``/inputs/question``). A body that
  is not JSON is 400, over ``--max-body-bytes`` 413; an unknown field is 422.
- **Budgets** per request may tighten the server's (the spec's, tightened by the
  ``--max-*`` flags), never loosen them: a larger value is 422 at ``/budgets/<name>``.
- **Concurrency**: at most ``--max-concurrency`` runs execute at once; up to
  ``--max-queue`` more wait in order; beyond that a request is refused at once with 429
  ``busy`` and ``Retry-After: 1``.
- **Isolation**: every run is its own ``arun`` call (own client, state, budgets, usage,
  trace); no request sees another's.
- **Graceful shutdown** (SIGTERM or SIGINT): the listener closes, new requests on open
  connections get 503 ``draining``, running and queued runs (background ones too) get
  ``--grace-s`` seconds to finish, then are cancelled (status ``interrupted``).
- **Keys stay in the server's environment** (``OPENAI_API_KEY``, read by each run);
  no response, error or event carries the key: errors are scrubbed of it (and of any
  4 characters in a row of it, and of ``Bearer``/``Basic`` credentials) and tracebacks
  are left out of HTTP answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import socket
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from ._runtime import Budgets, SpecInfo
from ._values import input_problems

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["Limits", "Service", "build_app", "main"]

BUDGET_NAMES = ("max_llm_calls", "max_total_tokens", "max_cost_usd", "timeout_s")
_REQUEST_FIELDS = frozenset(
    {"input", "budgets", "metadata", "agent_id", "assistant_id", "on_disconnect"}
)
#: mas2c run status -> Agent Protocol run status.
_PROTOCOL_STATUS = {
    "ok": "success",
    "error": "error",
    "bad_input": "error",
    "budget_exceeded": "error",
    "timeout": "timeout",
    "interrupted": "interrupted",
}
_PING_S = 10.0
_DISCONNECT_POLL_S = 0.5  # how often /runs/wait checks that its client is still there
_EVENT_CAP = 100_000  # trace events buffered for one stream; later ones are dropped
_CREDENTIAL_RE = re.compile(r"\b(Bearer|Basic)\s+[^\s\"',;]+", re.IGNORECASE)


class RunResultLike(Protocol):
    """What ``arun`` returns (the package's ``RunResult``)."""

    @property
    def status(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


class Served(Protocol):
    """The compiled system (the package's ``SYSTEM``)."""

    @property
    def spec(self) -> SpecInfo: ...

    @property
    def package(self) -> str: ...

    @property
    def version(self) -> str: ...

    def arun(
        self,
        inputs: Mapping[str, Any],
        *,
        max_llm_calls: int | None = None,
        max_total_tokens: int | None = None,
        max_cost_usd: float | None = None,
        timeout_s: float | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> Awaitable[RunResultLike]: ...


@dataclass(frozen=True)
class Limits:
    """The server's limits (from the ``serve`` flags)."""

    budgets: Budgets
    max_concurrency: int = 4
    max_queue: int = 64
    grace_s: float = 30.0
    max_body_bytes: int = 1024 * 1024
    keep_runs: int = 1000


class HttpError(Exception):
    """An answer other than 200: status, stable code, message, located problems."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        problems: Sequence[Mapping[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.problems = list(problems)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.problems:
            error["problems"] = self.problems
        return {"error": error}


# --------------------------------------------------------------------------- secrets


class Scrubber:
    """Removes an API key from text: the key, any 4 of its characters in a row, and
    ``Bearer``/``Basic`` credentials."""

    def __init__(self, key: str | None) -> None:
        self.key = key or ""
        size = 4
        self.grams = (
            {self.key[i : i + size] for i in range(len(self.key) - size + 1)}
            if len(self.key) >= size
            else set()
        )

    def text(self, text: str) -> str:
        text = _CREDENTIAL_RE.sub(lambda m: f"{m.group(1)} <redacted>", text)
        if not self.key:
            return text
        text = text.replace(self.key, "<redacted>")
        if not self.grams:
            return text
        hidden = bytearray(len(text))
        for i in range(len(text) - 3):
            if text[i : i + 4] in self.grams:
                hidden[i : i + 4] = b"\x01\x01\x01\x01"
        if not any(hidden):
            return text
        out: list[str] = []
        for i, char in enumerate(text):
            if not hidden[i]:
                out.append(char)
            elif i == 0 or not hidden[i - 1]:
                out.append("<redacted>")
        return "".join(out)

    def value(self, value: Any, depth: int = 0) -> Any:
        """Every string inside a JSON value scrubbed (keys too)."""
        if isinstance(value, str):
            return self.text(value)
        if depth > 64:
            return None
        if isinstance(value, dict):
            return {
                self.text(str(k)): self.value(v, depth + 1) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v, depth + 1) for v in value]
        return value

    def exact(self, value: Any) -> Any:
        """The key itself removed wherever it occurs (outputs, trace content)."""
        if not self.key:
            return value
        if self.key not in json.dumps(value, ensure_ascii=False, default=str):
            return value
        return _map_strings(value, lambda s: s.replace(self.key, "<redacted>"))


def _map_strings(value: Any, fn: Callable[[str], str], depth: int = 0) -> Any:
    if isinstance(value, str):
        return fn(value)
    if depth > 64:
        return None
    if isinstance(value, dict):
        return {fn(str(k)): _map_strings(v, fn, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_strings(v, fn, depth + 1) for v in value]
    return value


# --------------------------------------------------------------------------- runs


def _iso(ts: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
        + f".{int(ts % 1 * 1000):03d}Z"
    )


@dataclass
class RunRecord:
    """One run the server knows: its Agent Protocol object and, when done, its result."""

    run_id: str
    agent_id: str
    metadata: dict[str, Any]
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    status: str = "pending"
    result: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def run_object(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "agent_id": self.agent_id,
            "thread_id": None,
            "status": self.status,
            "created_at": _iso(self.created),
            "updated_at": _iso(self.updated),
            "metadata": self.metadata,
        }

    def answer(self) -> dict[str, Any]:
        """The result document (``out.json``'s shape) plus ``run``."""
        return {**(self.result or {}), "run": self.run_object()}


@dataclass(frozen=True)
class RunRequest:
    """A checked request body."""

    inputs: dict[str, Any]
    budgets: dict[str, Any]
    metadata: dict[str, Any]
    on_disconnect: str


class Service:
    """The server's state: admission (concurrency + queue), runs, draining."""

    def __init__(self, system: Served, limits: Limits) -> None:
        self.system = system
        self.limits = limits
        self.scrub = Scrubber(os.environ.get("OPENAI_API_KEY"))
        self.admitted = 0  # running + queued
        self.running = 0
        self.draining = False
        self.drain_deadline: float | None = None
        self.runs: OrderedDict[str, RunRecord] = OrderedDict()
        self._slots: asyncio.Semaphore | None = None

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:  # made inside the server's event loop
            self._slots = asyncio.Semaphore(self.limits.max_concurrency)
        return self._slots

    # ----------------------------------------------------------------- requests

    def check_request(self, body: Any) -> RunRequest:
        """The request body checked: 422 with every located problem, or the request."""
        if not isinstance(body, dict):
            raise _unprocessable("bad_request", "the body must be a JSON object", "")
        problems: list[dict[str, Any]] = []
        for name in sorted(set(body) - _REQUEST_FIELDS):
            problems.append(
                _problem(f"/{name}", f"unknown field {name!r}", sorted(_REQUEST_FIELDS))
            )
        agent = body.get("agent_id", body.get("assistant_id"))
        if agent is not None and agent != self.system.spec.name:
            raise HttpError(
                404,
                "unknown_agent",
                f"no agent {str(agent)[:100]!r}; this server runs {self.system.spec.name!r}",
            )
        metadata = body.get("metadata", {})
        if not isinstance(metadata, dict):
            problems.append(_problem("/metadata", "metadata must be a JSON object"))
        on_disconnect = body.get("on_disconnect", "cancel")
        if on_disconnect not in ("cancel", "continue"):
            problems.append(
                _problem(
                    "/on_disconnect", "on_disconnect must be 'cancel' or 'continue'"
                )
            )
        budgets = self._check_budgets(body.get("budgets", {}), problems)
        inputs = body.get("input", {})
        for spec_pointer, message in input_problems(inputs, self.system.spec.inputs):
            pointer = "/input" + spec_pointer[len("/inputs") :]
            if spec_pointer == "/inputs" and isinstance(inputs, dict):
                pointer = "/input"
            problems.append(
                {**_problem(pointer, message), "spec_pointer": spec_pointer}
            )
        if problems:
            bad_input = any("spec_pointer" in p for p in problems)
            code = "bad_input" if bad_input else "bad_request"
            raise HttpError(
                422, code, "; ".join(p["message"] for p in problems), problems
            )
        return RunRequest(dict(inputs), budgets, dict(metadata), str(on_disconnect))

    def _check_budgets(
        self, given: Any, problems: list[dict[str, Any]]
    ) -> dict[str, Any]:
        if not isinstance(given, dict):
            problems.append(_problem("/budgets", "budgets must be a JSON object"))
            return {}
        server = self.limits.budgets
        budgets: dict[str, Any] = {}
        for name in BUDGET_NAMES:
            limit = getattr(server, name)
            value = given.get(name)
            if value is None:
                budgets[name] = limit
                continue
            whole = name in ("max_llm_calls", "max_total_tokens")
            if (
                isinstance(value, bool)
                or not isinstance(value, int if whole else int | float)
                or not math.isfinite(value)
                or value < 0
                or (name == "timeout_s" and value == 0)
            ):
                kind = "a whole number >= 0" if whole else "a number > 0"
                problems.append(_problem(f"/budgets/{name}", f"{name} must be {kind}"))
            elif limit is not None and value > limit:
                problems.append(
                    _problem(
                        f"/budgets/{name}",
                        f"{name} {value} exceeds the server's limit {limit} "
                        "(a request may only tighten budgets)",
                    )
                )
            else:
                budgets[name] = value
        for name in sorted(set(given) - set(BUDGET_NAMES)):
            problems.append(
                _problem(f"/budgets/{name}", f"unknown budget {name!r}", BUDGET_NAMES)
            )
        return budgets

    # ----------------------------------------------------------------- admission

    def admit(self) -> None:
        """Take a place (running or queued), or refuse: 503 draining, 429 busy."""
        if self.draining:
            raise HttpError(
                503,
                "draining",
                "the server is shutting down",
                headers={"Connection": "close"},
            )
        if self.admitted >= self.limits.max_concurrency + self.limits.max_queue:
            raise HttpError(
                429,
                "busy",
                f"{self.running} runs running and {self.admitted - self.running} queued "
                f"(--max-concurrency {self.limits.max_concurrency}, "
                f"--max-queue {self.limits.max_queue}): retry later",
                headers={"Retry-After": "1"},
            )
        self.admitted += 1

    def new_record(self, request: RunRequest) -> RunRecord:
        record = RunRecord(str(uuid.uuid4()), self.system.spec.name, request.metadata)
        self.runs[record.run_id] = record
        self._forget_old()
        return record

    def _forget_old(self) -> None:
        finished = [r for r in self.runs.values() if r.done.is_set()]
        for record in finished[: max(0, len(self.runs) - self.limits.keep_runs)]:
            del self.runs[record.run_id]

    def start(
        self,
        record: RunRecord,
        request: RunRequest,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> asyncio.Task[None]:
        """Run in a task of its own (a place was admitted for it)."""
        record.task = asyncio.create_task(self._execute(record, request, on_event))
        return record.task

    async def _execute(
        self,
        record: RunRecord,
        request: RunRequest,
        on_event: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        try:
            async with self.slots:
                self.running += 1
                try:
                    record.status, record.updated = "running", time.time()
                    result = await self.system.arun(
                        request.inputs, on_event=on_event, **request.budgets
                    )
                    self._finish(record, result.to_json())
                finally:
                    self.running -= 1
        except asyncio.CancelledError:
            self._finish(record, _interrupted("the run was cancelled"))
            raise
        except Exception as exc:  # arun returns failures; this is a bug in the server
            self._finish(record, _internal(exc))
        finally:
            self.admitted -= 1
            record.done.set()

    def _finish(self, record: RunRecord, result: dict[str, Any]) -> None:
        result = self.scrub.exact(result)
        if isinstance(result.get("error"), dict):
            error = dict(result["error"])
            error.pop("traceback", None)
            result["error"] = self.scrub.value(error)
        record.result = result
        record.status = _PROTOCOL_STATUS.get(str(result.get("status")), "error")
        record.updated = time.time()

    def event(self, event: dict[str, Any]) -> dict[str, Any]:
        """A trace event as a client may see it (errors scrubbed)."""
        event = self.scrub.exact(event)
        if "error" in event:
            event = {**event, "error": self.scrub.value(event["error"])}
        return event

    async def drain(self) -> None:
        """Wait for every run until the grace deadline, then cancel what is left."""
        self.draining = True
        deadline = self.drain_deadline or time.monotonic() + self.limits.grace_s
        tasks = [
            r.task
            for r in self.runs.values()
            if r.task is not None and not r.task.done()
        ]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        left = [t for t in tasks if not t.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)

    def info(self) -> dict[str, Any]:
        spec = self.system.spec
        declared = dict(spec.inputs)
        return {
            "agent_id": spec.name,
            "name": spec.name,
            "package": self.system.package,
            "version": self.system.version,
            "spec_sha256": spec.sha256,
            "input_schema": {
                "type": "object",
                "properties": declared,
                "required": [n for n, s in declared.items() if "default" not in s],
                "additionalProperties": False,
            },
            "outputs": list(spec.outputs),
            "budgets": {n: getattr(self.limits.budgets, n) for n in BUDGET_NAMES},
            "limits": {
                "max_concurrency": self.limits.max_concurrency,
                "max_queue": self.limits.max_queue,
                "grace_s": self.limits.grace_s,
                "max_body_bytes": self.limits.max_body_bytes,
            },
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.draining else "ok",
            "running": self.running,
            "queued": self.admitted - self.running,
            "max_concurrency": self.limits.max_concurrency,
            "max_queue": self.limits.max_queue,
        }


def _problem(
    pointer: str, message: str, allowed: Sequence[str] | None = None
) -> dict[str, Any]:
    problem: dict[str, Any] = {"pointer": pointer, "message": message}
    if allowed is not None:
        problem["allowed"] = list(allowed)
    return problem


def _unprocessable(code: str, message: str, pointer: str) -> HttpError:
    return HttpError(422, code, message, [_problem(pointer, message)])


def _interrupted(message: str) -> dict[str, Any]:
    error = {"type": "Interrupted", "code": "interrupted", "message": message}
    return {"status": "interrupted", "error": error, "usage": {}}


def _internal(exc: Exception) -> dict[str, Any]:
    error = {"type": type(exc).__name__, "code": "internal", "message": str(exc)}
    return {"status": "error", "error": error, "usage": {}}


# --------------------------------------------------------------------------- HTTP


def dumps(data: Any) -> bytes:
    """JSON bytes of an answer, always valid: values a run produced that JSON cannot hold
    (NaN, infinities, lone surrogates, nesting past 64 levels) become null or U+FFFD."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
        return text.encode("utf-8")
    except (ValueError, UnicodeEncodeError, RecursionError):
        text = json.dumps(
            _clean(data), ensure_ascii=False, allow_nan=False, default=str
        )
        return text.encode("utf-8")


def _clean(value: Any, depth: int = 0) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        # lone surrogates -> U+FFFD
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if depth >= 64:
        return None
    if isinstance(value, dict):
        return {_clean(str(k), depth): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, depth + 1) for v in value]
    return value


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, "too_large", f"the body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HttpError(413, "too_large", f"the body is over {limit} bytes")
    try:
        data = json.loads(
            bytes(body).decode("utf-8") or "{}", parse_constant=_no_constant
        )
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # no lone surrogates
        return data
    except (ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
        raise HttpError(400, "bad_json", f"the body is not JSON: {exc}"[:300]) from None


def build_app(system: Served, limits: Limits) -> tuple[Starlette, Service]:
    """The ASGI app and its service state."""
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    class JSONResponse(Response):
        media_type = "application/json"

        def render(self, content: Any) -> bytes:
            return dumps(content)

    service = Service(system, limits)

    def error_response(exc: HttpError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def handled(
        endpoint: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapper(request: Request) -> Response:
            try:
                return await endpoint(request)
            except HttpError as exc:
                return error_response(exc)

        return wrapper

    def record_of(request: Request) -> RunRecord:
        record = service.runs.get(str(request.path_params["run_id"]))
        if record is None:
            raise HttpError(
                404, "unknown_run", "no such run (finished runs are kept a while)"
            )
        return record

    async def admitted_request(request: Request) -> RunRequest:
        if service.draining:
            service.admit()  # raises 503
        checked = service.check_request(
            await _read_json(request, limits.max_body_bytes)
        )
        service.admit()
        return checked

    async def runs_wait(request: Request) -> Response:
        checked = await admitted_request(request)
        record = service.new_record(checked)
        task = service.start(record, checked)
        while not task.done():  # a cancelled handler leaves the run to the drain
            await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if (
                not task.done()
                and checked.on_disconnect == "cancel"
                and await request.is_disconnected()
            ):
                task.cancel()  # nobody waits for this answer any more
                await asyncio.wait({task})
        return JSONResponse(record.answer())

    async def runs_stream(request: Request) -> Response:
        checked = await admitted_request(request)
        record = service.new_record(checked)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        dropped = [0]

        def put(event: dict[str, Any] | None) -> None:
            if event is not None and queue.qsize() >= _EVENT_CAP:
                dropped[0] += 1
                return
            queue.put_nowait(event)

        def on_event(event: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(put, service.event(dict(event)))

        task = service.start(record, checked, on_event)
        task.add_done_callback(lambda _t: loop.call_soon_threadsafe(put, None))

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _sse(
                    "metadata", {"run_id": record.run_id, "agent_id": record.agent_id}
                )
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), _PING_S)
                    except TimeoutError:
                        yield b": ping\n\n"
                        continue
                    if item is None:
                        break
                    yield _sse("trace", item)
                answer = record.answer()
                if dropped[0]:
                    answer["dropped_events"] = dropped[0]
                yield _sse("result", answer)
                yield _sse("end", None)
            finally:
                if checked.on_disconnect == "cancel" and not task.done():
                    task.cancel()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            events(), media_type="text/event-stream", headers=headers
        )

    async def runs_create(request: Request) -> Response:
        checked = await admitted_request(request)
        record = service.new_record(checked)
        service.start(record, checked)
        return JSONResponse(record.run_object())

    async def run_get(request: Request) -> Response:
        record = record_of(request)
        return JSONResponse(
            record.answer() if record.done.is_set() else record.run_object()
        )

    async def run_join(request: Request) -> Response:
        record = record_of(request)
        await record.done.wait()
        return JSONResponse(record.answer())

    async def run_cancel(request: Request) -> Response:
        record = record_of(request)
        if record.task is not None and not record.task.done():
            record.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(record.done.wait())
        return JSONResponse(record.answer())

    async def run_delete(request: Request) -> Response:
        record = record_of(request)
        if not record.done.is_set():
            raise HttpError(409, "running", "the run is not finished: cancel it first")
        service.runs.pop(record.run_id, None)
        return Response(status_code=204)

    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def health(request: Request) -> Response:
        return JSONResponse(
            service.health(), status_code=503 if service.draining else 200
        )

    async def info(request: Request) -> Response:
        return JSONResponse(service.info())

    async def schemas(request: Request) -> Response:
        if request.path_params["agent_id"] != system.spec.name:
            raise HttpError(404, "unknown_agent", "no such agent")
        about = service.info()
        return JSONResponse(
            {
                "agent_id": about["agent_id"],
                "input_schema": about["input_schema"],
                "output_schema": {
                    "type": "object",
                    "properties": {name: {} for name in about["outputs"]},
                },
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await service.drain()

    routes = [
        Route("/runs/wait", handled(runs_wait), methods=["POST"]),
        Route("/runs/stream", handled(runs_stream), methods=["POST"]),
        Route("/runs", handled(runs_create), methods=["POST"]),
        Route("/runs/{run_id}", handled(run_get), methods=["GET"]),
        Route("/runs/{run_id}", handled(run_delete), methods=["DELETE"]),
        Route("/runs/{run_id}/wait", handled(run_join), methods=["GET"]),
        Route("/runs/{run_id}/cancel", handled(run_cancel), methods=["POST"]),
        Route("/ok", ok, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/agents/{agent_id}/schemas", handled(schemas), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan), service


# --------------------------------------------------------------------------- CLI


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the system over HTTP (Agent Protocol runs: /runs/wait, "
        "/runs/stream, /runs, /health). The API key stays in this process's "
        "environment (OPENAI_API_KEY, OPENAI_BASE_URL or MAS2C_LLM_SOCKET).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port (8000; 0: any free)"
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=4, help="runs executing at once (4)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="runs waiting beyond those; more are refused with 429 (64)",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds for in-flight runs to finish (30)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=1024 * 1024,
        help="request body cap (1 MiB)",
    )
    for name in BUDGET_NAMES:
        kind = int if name in ("max_llm_calls", "max_total_tokens") else float
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            help=f"tighten the spec's {name} for every request",
        )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (info)")
    return parser


def _limits(spec: SpecInfo, args: argparse.Namespace) -> Limits:
    def tighter(name: str) -> Any:
        spec_value, flag = getattr(spec.budgets, name), getattr(args, name)
        if flag is None:
            return spec_value
        return flag if spec_value is None else min(spec_value, flag)

    budgets = Budgets(**{name: tighter(name) for name in BUDGET_NAMES})
    return Limits(
        budgets=budgets,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        grace_s=args.grace_s,
        max_body_bytes=args.max_body_bytes,
    )


def _check_flags(args: argparse.Namespace) -> str | None:
    if args.max_concurrency < 1:
        return "--max-concurrency must be >= 1"
    grace_ok = math.isfinite(args.grace_s) and args.grace_s >= 0  # nan, inf
    if args.max_queue < 0 or args.max_body_bytes < 1 or not grace_ok:
        return "--max-queue, --grace-s must be >= 0 and --max-body-bytes >= 1"
    if not 0 <= args.port <= 65535:
        return "--port must be 0..65535"
    for name in BUDGET_NAMES:
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            return f"--{name.replace('_', '-')} must be >= 0"
    return None


def main(system: Served, argv: Sequence[str], prog: str) -> int:
    """``serve``: run the HTTP service until SIGTERM/SIGINT; 0 after a graceful stop,
    2 for bad flags, a missing extra or an address in use."""
    args = _parser(prog).parse_args(argv)
    problem = _check_flags(args)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        extra = system.package.replace("_", "-")
        print(
            f"{prog}: the service needs the serve extra: pip install '{extra}[serve]' "
            "(starlette and uvicorn)",
            file=sys.stderr,
        )
        return 2
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn is up
    except OSError as exc:
        sock.close()
        print(
            f"{prog}: cannot listen on {args.host}:{args.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    limits = _limits(system.spec, args)
    app, service = build_app(system, limits)
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(1, math.ceil(limits.grace_s)),
        lifespan="on",
    )
    server = _make_server(config, service)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"http://{shown}:{port}", flush=True)
    asyncio.run(server.serve(sockets=[sock]))
    return 0


def _make_server(config: uvicorn.Config, service: Service) -> uvicorn.Server:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, marking the service as draining on the first signal."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not service.draining:
                service.draining = True
                service.drain_deadline = time.monotonic() + service.limits.grace_s
            super().handle_exit(sig, frame)

    return Server(config)
