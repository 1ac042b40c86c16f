"""A run's trace as spans: the run header (``run.json``) and ``trace.jsonl`` read back.

Contract (the run-folder part of issue 16):

* ``run.json``, written on the host by `mas2c.run.run_system`: ``format``
  (``mas2c-run-header/1``), ``command`` (argv, URLs without credentials, query or
  fragment), ``mas2c_version``, ``python``, ``platform``, ``spec``, ``spec_sha256``,
  ``endpoint`` (``host:port`` of the LLM endpoint, ``embedded`` or ``replay``; never a
  key or a path), ``backend``, ``trace_id`` (32 hex), ``span_id`` (16 hex, the
  host's span: the parent of the package's run span), ``trace_content``,
  ``started_at``/``finished_at`` (ISO 8601 UTC), ``started_ts``/``finished_ts``
  (Unix seconds), ``status``.
* ``trace.jsonl``, written by the compiled package's runtime: every record has ``t``
  (seconds since the run started) and ``ts`` (Unix seconds); ``run_start`` carries
  ``trace_id``, ``span_id`` and ``parent_id``; ``step_start``/``step_end``,
  ``llm_call``, ``tool_call`` and ``exec`` carry ``span_id``, ``parent_id`` and
  (at the end) ``start_ts``.

Both files come out of a sandbox or a folder anyone may have edited, so they are
hostile input: lines and files are size-capped, every field is type-checked, ids
that are not hex of the right length are replaced by derived ones, and a trace
written before this contract (no ``ts``, no ids) is still read (ids derived,
times from ``t``). Nothing here raises on bad content; what was skipped is listed
in ``RunTrace.problems``.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import re
import stat
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mas2c import __version__

HEADER_FILE = "run.json"
HEADER_FORMAT = "mas2c-run-header/1"
TRACEPARENT_ENV = "MAS2C_TRACEPARENT"  # read by the compiled package's runtime
TRACE_CONTENT_ENV = "MAS2C_TRACE_CONTENT"  # "1": trace prompts and completions too

MAX_TRACE_BYTES = 64 * 1024 * 1024
MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_EVENTS = 200_000
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
SPAN_EVENTS = ("step_end", "fallback_end", "llm_call", "tool_call", "exec")
# Events that open and close a span: start -> (end, span kind).
_PAIRS = {"step_start": ("step_end", "step"), "fallback_start": ("fallback_end", "fallback")}
_ENDS = {end: start for start, (end, _) in _PAIRS.items()}


def new_trace_id() -> str:
    return os.urandom(16).hex()


def new_span_id() -> str:
    return os.urandom(8).hex()


def iso(ts: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds ("?" for a time no calendar has)."""
    try:
        whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return "?"
    return f"{whole}.{int(ts % 1 * 1000):03d}Z"


# -- the run header --------------------------------------------------------------------------


def redact_url(text: str) -> str:
    """A URL without user, password, query and fragment; other text unchanged."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<url>"
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# A URL anywhere in a text: a scheme, `://`, then up to whitespace or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]*")
# userinfo without a scheme (`user:pw@host`), as `--llm=user:pw@host/v1` could carry it
_USERINFO = re.compile(r"(?<![\w.\-])[^\s/@:=]+:[^\s/@]*@(?=[\w\[])")


def redact_urls_in(text: str) -> str:
    """``text`` with every URL inside it redacted (:func:`redact_url`: no user, password,
    query or fragment), wherever it starts (``--llm=http://user:pw@host/v1``), and any
    other ``user:password@`` removed."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _USERINFO.sub("", text)


#: Arguments of this process's command line that are run content (`solve`'s task), by
#: value: recorded as their label unless content is traced (see `withhold_argument`).
_WITHHELD: dict[str, str] = {}


@contextlib.contextmanager
def withheld_argument(value: str, label: str) -> Iterator[None]:
    """Within the block, record the argument `value` (e.g. a task, which is a prompt) as
    `label` in every run header's command line (content is opt-in: ``--trace-content``)."""
    if not value or value == "-" or value in _WITHHELD:
        yield
        return
    _WITHHELD[value] = label
    try:
        yield
    finally:
        _WITHHELD.pop(value, None)


def redact_argv(argv: Sequence[str], secrets: Sequence[str] = ()) -> list[str]:
    """The command line as recorded: every URL in every argument redacted, any known
    secret replaced, withheld arguments (content) replaced by their label."""
    out = []
    for arg in argv:
        if str(arg) in _WITHHELD:
            out.append(_WITHHELD[str(arg)])
            continue
        text = redact_urls_in(str(arg))
        for secret in secrets:
            if secret and len(secret) >= 8:  # a short word would blank out half the line
                text = text.replace(secret, "***")
        out.append(text)
    return out


def endpoint_label(url: str | None, *, replay: bool = False) -> str:
    """``host:port`` of an endpoint URL, ``embedded`` without one, ``replay`` for a cassette."""
    if replay:
        return "replay"
    if not url:
        return "embedded"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "<invalid url>"
    port = port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{host}:{port}" if port else host


@dataclass
class RunHeader:
    """What ran, how and when: ``run.json`` of a run folder."""

    command: list[str]
    spec: str
    spec_sha256: str
    endpoint: str
    backend: str
    trace_content: bool
    trace_id: str = field(default_factory=new_trace_id)
    span_id: str = field(default_factory=new_span_id)
    started_ts: float = field(default_factory=time.time)
    finished_ts: float | None = None
    status: str = "running"
    mas2c_version: str = __version__
    python: str = field(default_factory=lambda: sys.version.split()[0])
    platform: str = field(default_factory=platform.platform)

    def traceparent(self) -> str:
        """The W3C traceparent the package's run span hangs under."""
        return f"00-{self.trace_id}-{self.span_id}-01"

    def sandbox_env(self) -> dict[str, str]:
        env = {TRACEPARENT_ENV: self.traceparent()}
        if self.trace_content:
            env[TRACE_CONTENT_ENV] = "1"
        return env

    def to_json(self) -> dict[str, Any]:
        return {
            "format": HEADER_FORMAT,
            "command": self.command,
            "mas2c_version": self.mas2c_version,
            "python": self.python,
            "platform": self.platform,
            "spec": self.spec,
            "spec_sha256": self.spec_sha256,
            "endpoint": self.endpoint,
            "backend": self.backend,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "trace_content": self.trace_content,
            "started_at": iso(self.started_ts),
            "started_ts": round(self.started_ts, 6),
            "finished_at": iso(self.finished_ts) if self.finished_ts is not None else None,
            "finished_ts": round(self.finished_ts, 6) if self.finished_ts is not None else None,
            "status": self.status,
        }


def trace_content_default() -> bool:
    """Whether prompts and completions are traced when nobody said: ``MAS2C_TRACE_CONTENT=1``."""
    return os.environ.get(TRACE_CONTENT_ENV) == "1"


# -- reading a run folder back ---------------------------------------------------------------


@dataclass
class Span:
    """One timed unit of a run: the host's run, the package's run, a step, a call, a tool."""

    span_id: str
    parent_id: str | None
    kind: str  # host | run | step | fallback | llm | tool | exec
    name: str
    start: float  # Unix seconds
    end: float
    status: str  # ok | error | cancelled | unfinished ...
    attrs: dict[str, Any] = field(default_factory=dict)  # the event's own fields

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)


@dataclass
class RunTrace:
    """A run folder's header, events and spans (parents before children)."""

    folder: Path
    header: dict[str, Any]
    events: list[dict[str, Any]]
    spans: list[Span]
    trace_id: str
    problems: list[str] = field(default_factory=list)

    def by_kind(self, kind: str) -> list[Span]:
        return [s for s in self.spans if s.kind == kind]

    @functools.cached_property
    def content(self) -> bool:
        """Whether the run traced its content (``--trace-content``): the host's ``run.json``
        says so, else (a folder without one) the program's ``run_start``. Readers show or
        send prompts, completions, tool values, outputs and error messages only then."""
        if "trace_content" in self.header:
            return self.header.get("trace_content") is True
        start = next((e for e in self.events if e.get("event") == "run_start"), None)
        return start is not None and start.get("trace_content") is True

    @property
    def start(self) -> float:
        return min((s.start for s in self.spans), default=0.0)

    @property
    def end(self) -> float:
        return max((s.end for s in self.spans), default=0.0)


def regular_file(path: Path) -> bool:
    """A regular file itself: not a symlink (it could point anywhere), FIFO or device."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def real_dir(path: Path) -> bool:
    """A folder itself, not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def read_bytes_capped(path: Path, limit: int) -> bytes | None:
    """At most ``limit + 1`` bytes of a regular file (never through a symlink), or None."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        return handle.read(limit + 1)


def read_text_file(path: Path, limit: int) -> str | None:
    """A text file's first ``limit`` bytes, decoded leniently; None if not a regular file."""
    data = read_bytes_capped(path, limit)
    return None if data is None else data[:limit].decode("utf-8", errors="replace")


def read_json_file(path: Path, limit: int = MAX_LINE_BYTES) -> Any:
    """A small JSON file, or None when it is missing, not a regular file, too large or not JSON."""
    data = read_bytes_capped(path, limit)
    if data is None or len(data) > limit:
        return None
    try:
        return json.loads(data.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return None


def read_events(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The JSON-object lines of a trace file, capped; bad lines are skipped and noted."""
    events: list[dict[str, Any]] = []
    try:
        read = read_bytes_capped(path, MAX_TRACE_BYTES)
    except OSError as exc:
        problems.append(f"{path.name}: unreadable ({exc.strerror or exc})")
        return events
    if read is None:
        problems.append(f"{path.name}: not a regular file (a symlink?), not read")
        return events
    data = read
    if len(data) > MAX_TRACE_BYTES:
        problems.append(f"{path.name}: larger than {MAX_TRACE_BYTES} bytes; the rest is ignored")
        data = data[:MAX_TRACE_BYTES]
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(events) >= MAX_EVENTS:
            problems.append(f"{path.name}: more than {MAX_EVENTS} events; the rest is ignored")
            break
        if len(raw) > MAX_LINE_BYTES:
            problems.append(f"{path.name}:{number}: line too long, skipped")
            continue
        try:
            record = json.loads(raw.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            problems.append(f"{path.name}:{number}: not JSON, skipped")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("event"), str):
            problems.append(f"{path.name}:{number}: not a trace event, skipped")
            continue
        events.append(record)
    return events


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _derived_id(*parts: Any, length: int = 16) -> str:
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:length]
    return digest if digest.strip("0") else "1".rjust(length, "0")


def _hex(value: Any, pattern: re.Pattern[str]) -> str | None:
    """An id of the right length in lowercase hex, and not all zeros (OpenTelemetry's "invalid")."""
    if isinstance(value, str) and pattern.match(value) and value.strip("0"):
        return value
    return None


def _text(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


MAX_SPAN_NAME = 300  # characters of a span's name (a step id, a spec name) as read


def _name(value: Any, default: str) -> str:
    """A span name from the (hostile) trace: a string, capped."""
    text = _text(value, default)
    return text if len(text) <= MAX_SPAN_NAME else text[: MAX_SPAN_NAME - 1] + "…"


class _Builder:
    """Turns events into spans; one instance per folder."""

    def __init__(self, header: dict[str, Any], events: list[dict[str, Any]]) -> None:
        self.header = header
        self.events = events
        self.spans: list[Span] = []
        self._step_index = _SpanIndex(())
        self.seen: set[str] = set()
        first = events[0] if events else {}
        self.base = self._base(first)
        start_event = next((e for e in events if e.get("event") == "run_start"), {})
        # The host's run.json first: the sandboxed program could name any trace (another
        # run's, to put its spans there); its own id counts only without a header.
        self.trace_id = (
            _hex(header.get("trace_id"), _HEX32)
            or _hex(start_event.get("trace_id"), _HEX32)
            or _derived_id("trace", str(header), length=32)
        )
        self.host_id = _hex(header.get("span_id"), _HEX16)
        self.run_id = _hex(start_event.get("span_id"), _HEX16) or _derived_id("run")
        if self.run_id in {self.host_id}:
            self.run_id = _derived_id("run", self.run_id)

    def _base(self, first: dict[str, Any]) -> float:
        """Unix seconds at ``t == 0``: from the first event with both, else the header."""
        for e in self.events:
            ts, t = _num(e.get("ts")), _num(e.get("t"))
            if ts is not None and t is not None:
                return ts - t
        started = _num(self.header.get("started_ts"))
        return started if started is not None else 0.0

    def ts(self, e: Mapping[str, Any]) -> float:
        ts = _num(e.get("ts"))
        if ts is not None:
            return ts
        t = _num(e.get("t"))
        return self.base + (t if t is not None else 0.0)

    def unique(self, candidate: str | None, *salt: Any) -> str:
        span_id = candidate if candidate and candidate not in self.seen else _derived_id(*salt)
        while span_id in self.seen:
            span_id = _derived_id(span_id, *salt)
        self.seen.add(span_id)
        return span_id

    def build(self) -> list[Span]:
        events = self.events
        run_start = next((e for e in events if e.get("event") == "run_start"), None)
        run_end = next((e for e in reversed(events) if e.get("event") == "run_end"), None)
        last = max((self.ts(e) for e in events), default=self.base)
        run_span: Span | None = None
        if events:
            start = self.ts(run_start) if run_start else min(self.ts(e) for e in events)
            status = _name(run_end.get("status"), "unknown") if run_end else "unfinished"
            attrs = {k: v for k, v in (run_start or {}).items() if k not in ("event",)}
            if run_end is not None:
                attrs["exit_code"] = run_end.get("exit_code")
                attrs["usage"] = run_end.get("usage")
            name = _name(attrs.get("spec"), "run")
            run_span = Span(
                self.unique(self.run_id, "run"),
                self.host_id,
                "run",
                name,
                start,
                self.ts(run_end) if run_end else last,
                status,
                attrs,
            )
        host = self._host_span(run_span, last)
        if host is not None:
            self.spans.append(host)
        if run_span is not None:
            self.spans.append(run_span)
        root = run_span.span_id if run_span else (host.span_id if host else None)
        self._steps(root, last)
        self._step_index = _SpanIndex(s for s in self.spans if s.kind == "step")
        for index, e in enumerate(events):
            kind = {"llm_call": "llm", "tool_call": "tool", "exec": "exec"}.get(e["event"])
            if kind is not None:
                self.spans.append(self._leaf(kind, e, index, root))
        known = {s.span_id for s in self.spans}
        for span in self.spans:
            if span is host or span is run_span:
                continue
            if span.parent_id is None or span.parent_id not in known:
                # A parent that never reported (or a forged id): hang it under the run.
                span.parent_id = root
        return _parents_first(self.spans)

    def _host_span(self, run_span: Span | None, last: float) -> Span | None:
        if self.host_id is None:
            return None
        started = _num(self.header.get("started_ts"))
        finished = _num(self.header.get("finished_ts"))
        start = started if started is not None else (run_span.start if run_span else last)
        end = finished if finished is not None else (run_span.end if run_span else last)
        status = _name(self.header.get("status"), "unknown")
        attrs = {k: v for k, v in self.header.items() if k not in ("format",)}
        return Span(
            self.unique(self.host_id, "host"),
            None,
            "host",
            "mas2c run",
            start,
            max(start, end),
            status,
            attrs,
        )

    def _steps(self, root: str | None, last: float) -> None:
        """step_start/step_end (and fallback_start/fallback_end) pairs: by span id, else
        (older traces) by step and pointer."""
        open_by_id: dict[str, tuple[int, dict[str, Any]]] = {}
        open_by_key: dict[tuple[str, str, str], list[tuple[int, dict[str, Any]]]] = {}
        pairs: list[tuple[int, dict[str, Any] | None, dict[str, Any]]] = []
        for index, e in enumerate(self.events):
            name = e["event"]
            opening = name if name in _PAIRS else _ENDS.get(name)
            if opening is None:
                continue
            key = (opening, _text(e.get("step")), _text(e.get("pointer")))
            span_id = _hex(e.get("span_id"), _HEX16)
            if name in _PAIRS:
                if span_id:
                    open_by_id[span_id] = (index, e)
                open_by_key.setdefault(key, []).append((index, e))
            else:
                started = open_by_id.pop(span_id, None) if span_id else None
                stack = open_by_key.get(key) or []
                if started is None and stack:
                    started = stack.pop()
                elif started is not None and started in stack:
                    stack.remove(started)
                pairs.append((started[0] if started else index, started[1] if started else None, e))
        leftovers = {id(e): (i, e) for stack in open_by_key.values() for i, e in stack}
        for index, opened in sorted(leftovers.values(), key=lambda p: p[0]):
            pairs.append((index, opened, {"status": "unfinished", "event": "step_open"}))
        # Older traces have no parent ids: nest by time (the innermost open step).
        for index, start_event, end_event in sorted(pairs, key=lambda p: p[0]):
            first = start_event if start_event is not None else end_event
            kind = _PAIRS.get(_text(first.get("event")), ("", "step"))[1]
            if start_event is None:
                kind = _PAIRS[_ENDS[end_event["event"]]][1]
            start_ts = _num(end_event.get("start_ts"))
            start = start_ts if start_ts is not None else self.ts(first)
            end = self.ts(end_event) if end_event.get("event") in _ENDS else last
            if start_event is None and _num(end_event.get("duration_s")) is not None:
                start = end - float(end_event["duration_s"])
            span_id = self.unique(
                _hex(end_event.get("span_id") or first.get("span_id"), _HEX16), kind, index
            )
            parent = _hex(end_event.get("parent_id") or first.get("parent_id"), _HEX16)
            attrs = {k: v for k, v in {**first, **end_event}.items() if k != "event"}
            name = _name(first.get("step"), "?")
            self.spans.append(
                Span(
                    span_id,
                    parent or None,
                    kind,
                    name if kind == "step" else f"fallback of {name}",
                    start,
                    max(start, end),
                    _name(end_event.get("status"), "unknown"),
                    attrs,
                )
            )
        self._nest_orphans(root)

    def _nest_orphans(self, root: str | None) -> None:
        """Steps (and fallbacks) without a parent id: the innermost earlier one whose
        pointer encloses theirs."""
        steps = [s for s in self.spans if s.kind in ("step", "fallback")]
        index = _SpanIndex(steps)
        for span in steps:
            if span.parent_id is not None:
                continue
            # the enclosing pointers, innermost first ("/a/b/c": "/a/b", then "/a")
            parts = _text(span.attrs.get("pointer")).split("/")
            best = None
            for end in range(len(parts) - 1, 1, -1):
                best = index.around("/".join(parts[:end]), span.start, skip=span)
                if best is not None:
                    break
            span.parent_id = best.span_id if best else root

    def _leaf(self, kind: str, e: dict[str, Any], index: int, root: str | None) -> Span:
        end = self.ts(e)
        start = _num(e.get("start_ts"))
        if start is None:
            took = _num(e.get("latency_s") if kind == "llm" else e.get("duration_s"))
            start = end - took if took is not None else end
        parent = _hex(e.get("parent_id"), _HEX16)
        if parent is None:
            parent = self._step_at(_text(e.get("pointer")), end) or root
        if kind == "llm":
            name = f"chat {_name(e.get('model'), '?')}"
            status = _name(e.get("status"), "unknown")
        elif kind == "tool":
            name = f"tool {_name(e.get('tool'), '?')}"
            status = _name(e.get("status"), "unknown")
        else:
            name = "exec"
            status = (
                "ok" if e.get("exit_code") == 0 else ("timeout" if e.get("timed_out") else "error")
            )
        attrs = {k: v for k, v in e.items() if k != "event"}
        span_id = self.unique(_hex(e.get("span_id"), _HEX16), kind, index)
        return Span(span_id, parent, kind, name, min(start, end), end, status, attrs)

    def _step_at(self, pointer: str, at: float) -> str | None:
        found = self._step_index.around(pointer, at, slack=0.005)
        return found.span_id if found else None


class _SpanIndex:
    """Step spans by pointer, sorted by start: which one of a pointer was running at a
    time, in O(log n) (older traces nest by pointer and time; a trace may hold 200 000
    events, so never a scan of every span per span)."""

    SCAN = 64  # spans of one pointer looked at, latest start first, for one that encloses

    def __init__(self, spans: Iterable[Span]) -> None:
        self._spans: dict[str, list[Span]] = {}
        for span in spans:
            pointer = _text(span.attrs.get("pointer"))
            if pointer:
                self._spans.setdefault(pointer, []).append(span)
        self._starts: dict[str, list[float]] = {}
        for pointer, found in self._spans.items():
            found.sort(key=lambda s: s.start)
            self._starts[pointer] = [s.start for s in found]

    def around(
        self, pointer: str, at: float, *, slack: float = 0.0, skip: Span | None = None
    ) -> Span | None:
        """The latest-starting span at `pointer` with start <= at <= end (± slack)."""
        spans = self._spans.get(pointer)
        if not spans:
            return None
        stop = bisect.bisect_right(self._starts[pointer], at + slack)
        for span in reversed(spans[max(0, stop - self.SCAN) : stop]):
            if span is not skip and span.end + slack >= at:
                return span
        return None


def _parents_first(spans: list[Span]) -> list[Span]:
    """Spans ordered so that a parent precedes its children (then by start time)."""
    by_parent: dict[str | None, list[Span]] = {}
    ids = {s.span_id for s in spans}
    for span in spans:
        parent = span.parent_id if span.parent_id in ids else None
        by_parent.setdefault(parent, []).append(span)
    ordered: list[Span] = []
    stack = sorted(by_parent.get(None, []), key=lambda s: s.start, reverse=True)
    visited: set[str] = set()
    while stack:
        span = stack.pop()
        if span.span_id in visited:
            continue
        visited.add(span.span_id)
        ordered.append(span)
        children = sorted(by_parent.get(span.span_id, []), key=lambda s: s.start, reverse=True)
        stack.extend(children)
    # A cycle of forged parent ids leaves spans unvisited: keep them, as roots.
    for span in spans:
        if span.span_id not in visited:
            span.parent_id = None
            ordered.append(span)
    return ordered


def read_run_trace(folder: Path) -> RunTrace:
    """The header and spans of a run folder (one with ``trace.jsonl``)."""
    problems: list[str] = []
    header = read_json_file(folder / HEADER_FILE)
    if header is not None and not isinstance(header, dict):
        problems.append(f"{HEADER_FILE}: not a JSON object, ignored")
    header = header if isinstance(header, dict) else {}
    events = (
        read_events(folder / "trace.jsonl", problems)
        if os.path.lexists(folder / "trace.jsonl")
        else []
    )
    if not events:
        problems.append("trace.jsonl: missing or empty")
    problems += _contract_problems(folder)
    builder = _Builder(header, events)
    spans = builder.build()
    return RunTrace(folder, header, events, spans, builder.trace_id, problems)


def _contract_problems(folder: Path) -> list[str]:
    """What in run.json and trace.jsonl breaks the typed run-folder contract (`mas2c.runfolder`).

    The report still shows what it can read; this says where the folder is not what a
    mas2c run writes (a forged or damaged folder, or one from another version).
    """
    from mas2c.runfolder import RunFolderError, read_header, read_trace

    problems = []
    for name, read in ((HEADER_FILE, read_header), ("trace.jsonl", read_trace)):
        path = folder / name
        if not regular_file(path):
            continue
        try:
            read(path)
        except RunFolderError as exc:
            problems.append(f"breaks the run-folder contract: {str(exc)[:500]}")
    return problems
