"""`mas2c export otel RUN_DIR --endpoint URL`: a run's trace to any OpenTelemetry backend.

The run folder's spans (`mas2c.tracing`) become OpenTelemetry spans with the ids,
parents and times the run recorded, and are sent with the OpenTelemetry SDK's own
OTLP/HTTP exporter (the ``otel`` extra: ``pip install 'mas2c[otel]'``). Attributes:

* every span: ``mas2c.kind`` (host, run, step, fallback, llm, tool, exec),
  ``mas2c.status``, ``mas2c.step``, ``mas2c.spec_pointer`` where known, and what tells
  a repeat apart: ``mas2c.item`` (map items' index path), ``mas2c.iteration`` (loop
  iterations, 1-based), ``mas2c.sample`` (an ensemble's sample, over a flow too),
  ``mas2c.error.code``; steps with ``retry``/``fallback`` ``mas2c.step.attempt`` of
  ``mas2c.step.attempts``;
* LLM calls follow the OpenTelemetry GenAI semantic conventions: span name
  ``chat <model>``, kind CLIENT, ``gen_ai.operation.name`` (chat),
  ``gen_ai.provider.name``/``gen_ai.system`` (openai: the wire protocol),
  ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.request.temperature``,
  ``gen_ai.request.max_tokens``, ``gen_ai.usage.input_tokens``,
  ``gen_ai.usage.output_tokens``, ``gen_ai.response.finish_reasons``,
  ``gen_ai.agent.name``, ``error.type``; with traced content
  ``gen_ai.input.messages``/``gen_ai.output.messages`` (JSON); and mas2c's own
  ``mas2c.cost_usd``, ``mas2c.attempt``, ``mas2c.retries``, ``mas2c.round``,
  ``mas2c.role``, ``mas2c.model_id``, ``mas2c.format_repair`` (asked again after an
  answer that broke the output schema);
* tool calls: ``execute_tool <tool>``, ``gen_ai.operation.name`` (execute_tool),
  ``gen_ai.tool.name``; a worker agent called as a tool (delegation) ``mas2c.worker``;
* OpenInference attributes beside them (``openinference.span.kind``,
  ``llm.model_name``, ``llm.token_count.*``, ``input.value``/``output.value``), so
  that Arize Phoenix shows LLM and tool spans as such;
* the resource: ``service.name`` (default mas2c), ``service.version``, and
  ``openinference.project.name`` (the same name: Phoenix files the trace there).

The run folder is hostile input; `mas2c.tracing` has already checked its ids and
times, and every attribute value here is reduced to a string, number or boolean
(strings capped). Nothing is sent until every span is built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from mas2c import __version__
from mas2c.errors import RunFailure
from mas2c.tracing import RunTrace, Span, read_run_trace, redact_argv, redact_url, redact_urls_in

MAX_ATTRIBUTE_CHARS = 32_000
TRACES_PATH = "/v1/traces"
#: Span attributes that are run content (traced only with ``--trace-content``).
_CONTENT = frozenset({"messages", "completion", "arguments", "result", "writes", "message"})

_OPENINFERENCE_KIND = {
    "host": "CHAIN",
    "run": "AGENT",
    "step": "CHAIN",
    "fallback": "CHAIN",
    "llm": "LLM",
    "tool": "TOOL",
    "exec": "TOOL",
}


class ExportError(RunFailure):
    """The export could not be done (no SDK, bad endpoint, receiver refused): a message."""

    code = "export_failed"


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: as given when it names a path, else ``<base>/v1/traces``."""
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        raise ExportError(f"not a URL: {redact_url(endpoint)!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ExportError(
            f"the endpoint must be an http(s) URL, got {redact_url(endpoint)!r} "
            "(e.g. http://127.0.0.1:4318/v1/traces)"
        )
    if parts.path.rstrip("/") in ("", "/"):
        return endpoint.rstrip("/") + TRACES_PATH
    return endpoint


def _value(value: Any) -> str | bool | int | float | None:
    """An attribute value: a primitive, else JSON text; strings capped; None dropped."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text[:MAX_ATTRIBUTE_CHARS]


def span_attributes(span: Span, *, content: bool = True) -> dict[str, Any]:
    """The OpenTelemetry attributes of one span (see the module docstring); prompts,
    completions and tool values only with `content` (the run traced them)."""
    a = span.attrs if content else {k: v for k, v in span.attrs.items() if k not in _CONTENT}
    out: dict[str, Any] = {
        "mas2c.kind": span.kind,
        "mas2c.status": span.status,
        "mas2c.step": a.get("step") if span.kind != "step" else span.name,
        "mas2c.spec_pointer": a.get("pointer"),
        "openinference.span.kind": _OPENINFERENCE_KIND.get(span.kind, "CHAIN"),
        # Which repeat this is: map item / loop iteration paths, the sample of an
        # ensemble (over a flow too), a retried step's attempt, the error code.
        "mas2c.item": _int_path(a.get("item")),
        "mas2c.iteration": _int_path(a.get("iteration")),
        "mas2c.sample": a.get("sample"),
        "mas2c.error.code": a.get("code"),
    }
    if span.kind == "step":
        out["mas2c.step.attempt"] = a.get("attempt")
        out["mas2c.step.attempts"] = a.get("attempts")
    if span.kind == "llm":
        finish = a.get("finish_reason")
        out.update(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.system": "openai",
                "gen_ai.request.model": a.get("model"),
                "gen_ai.response.model": a.get("response_model"),
                "gen_ai.request.temperature": a.get("temperature"),
                "gen_ai.request.max_tokens": a.get("max_tokens"),
                "gen_ai.usage.input_tokens": a.get("prompt_tokens"),
                "gen_ai.usage.output_tokens": a.get("completion_tokens"),
                "gen_ai.response.finish_reasons": [str(finish)] if finish else None,
                "gen_ai.agent.name": a.get("agent"),
                "mas2c.agent": a.get("agent"),
                "mas2c.model_id": a.get("model_id"),
                "mas2c.cost_usd": a.get("cost_usd"),
                "mas2c.attempt": a.get("attempt"),
                "mas2c.retries": a.get("retries"),
                "mas2c.round": a.get("round"),
                "mas2c.role": a.get("role"),
                "mas2c.format_repair": a.get("format_repair"),
                "llm.model_name": a.get("model"),
                "llm.token_count.prompt": a.get("prompt_tokens"),
                "llm.token_count.completion": a.get("completion_tokens"),
            }
        )
        if isinstance(a.get("prompt_tokens"), int) and isinstance(a.get("completion_tokens"), int):
            out["llm.token_count.total"] = a["prompt_tokens"] + a["completion_tokens"]
        if "messages" in a:
            out["gen_ai.input.messages"] = a["messages"]
            out["input.value"] = a["messages"]
        if "completion" in a:
            out["gen_ai.output.messages"] = [a["completion"]]
            completion = a["completion"]
            text = completion.get("content") if isinstance(completion, dict) else completion
            out["output.value"] = text
    elif span.kind == "tool":
        out.update(
            {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": a.get("tool"),
                "tool.name": a.get("tool"),
                "mas2c.agent": a.get("agent"),
                "mas2c.worker": a.get("worker"),  # an agent called as a tool
                "mas2c.duration_s": a.get("duration_s"),
            }
        )
        if "arguments" in a:
            out["input.value"] = a["arguments"]
        if "result" in a:
            out["output.value"] = a["result"]
    elif span.kind == "exec":
        out.update({"mas2c.exit_code": a.get("exit_code"), "mas2c.timed_out": a.get("timed_out")})
    elif span.kind == "run":
        raw_usage = a.get("usage")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        out.update(
            {
                "mas2c.spec": span.name,
                "mas2c.spec_sha256": a.get("sha256"),
                "mas2c.exit_code": a.get("exit_code"),
                "mas2c.python": a.get("python"),
                "mas2c.openai_version": a.get("openai"),
                "mas2c.llm_calls": usage.get("calls"),
                "mas2c.total_tokens": usage.get("total_tokens"),
                "mas2c.cost_usd": usage.get("cost_usd"),
            }
        )
    elif span.kind == "host":
        command = a.get("command")
        if isinstance(command, list):  # a run.json written before URLs were redacted anywhere
            command = redact_argv([str(c) for c in command])
        out.update(
            {
                "mas2c.command": [str(c) for c in command] if isinstance(command, list) else None,
                "mas2c.version": a.get("mas2c_version"),
                "mas2c.spec": a.get("spec"),
                "mas2c.spec_sha256": a.get("spec_sha256"),
                "mas2c.endpoint": a.get("endpoint"),
                "mas2c.backend": a.get("backend"),
                "mas2c.started_at": a.get("started_at"),
            }
        )
    if span.status not in ("ok", "unknown") and a.get("error") is not None:
        out["error.type"] = _error_type(a.get("error"))
    cleaned: dict[str, Any] = {}
    for key, value in out.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            cleaned[key] = [v[:MAX_ATTRIBUTE_CHARS] for v in value]
            continue
        if isinstance(value, list) and value and all(type(v) is int for v in value):
            cleaned[key] = value  # an index path (already bounded by _int_path)
            continue
        primitive = _value(value)
        if primitive is not None:
            cleaned[key] = primitive
    return cleaned


def _int_path(value: Any) -> list[int] | None:
    """An item/iteration path as OpenTelemetry's int array (64 entries at most), or None."""
    if not isinstance(value, list) or not value or len(value) > 64:
        return None
    if not all(type(v) is int and 0 <= v < 2**31 for v in value):
        return None
    return list(value)


def _name(span: Span) -> str:
    if span.kind == "llm":
        return f"chat {span.attrs.get('model') or '?'}"
    if span.kind == "tool":
        return f"execute_tool {span.attrs.get('tool') or '?'}"
    if span.kind == "step":
        return f"step {span.name}"
    if span.kind == "run":
        return f"run {span.name}"
    return span.name


def build_spans(trace: RunTrace, service: str = "mas2c") -> list[Any]:
    """The run's spans as OpenTelemetry SDK ``ReadableSpan``s (needs the otel extra)."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
    except ImportError:
        raise ExportError(
            "the OpenTelemetry SDK is not installed: pip install 'mas2c[otel]'"
        ) from None
    resource = Resource.create(
        {
            "service.name": service,
            "service.version": __version__,
            "openinference.project.name": service,
            "mas2c.spec": str(trace.header.get("spec") or ""),
        }
    )
    scope = InstrumentationScope("mas2c", __version__)
    trace_id = int(trace.trace_id, 16)
    flags = TraceFlags(TraceFlags.SAMPLED)
    known = {s.span_id for s in trace.spans}
    spans = []
    for span in trace.spans:
        context = SpanContext(trace_id, int(span.span_id, 16), is_remote=False, trace_flags=flags)
        parent = None
        if span.parent_id is not None and span.parent_id in known:
            parent = SpanContext(
                trace_id, int(span.parent_id, 16), is_remote=False, trace_flags=flags
            )
        if span.status == "ok":
            status = Status(StatusCode.OK)
        elif span.status in ("unknown", "running"):
            status = Status(StatusCode.UNSET)
        else:
            status = Status(StatusCode.ERROR, _status_text(span, trace.content))
        start = _ns(span.start)
        spans.append(
            ReadableSpan(
                name=_name(span)[:200],
                context=context,
                parent=parent,
                resource=resource,
                attributes=span_attributes(span, content=trace.content),
                kind=SpanKind.CLIENT if span.kind == "llm" else SpanKind.INTERNAL,
                status=status,
                start_time=start,
                end_time=max(start, _ns(span.end)),
                instrumentation_scope=scope,
            )
        )
    return spans


def _error_type(error: Any) -> str:
    """The exception type of a traced ``error`` (``Type: message`` or ``Type (code)``)."""
    return re.split(r"[:\s(]", str(error), maxsplit=1)[0][:200]


def _status_text(span: Span, content: bool) -> str:
    """A failed span's status description: the traced error with content; without, its
    type and code only (an error message may quote an answer or a value)."""
    error = span.attrs.get("error")
    if not error:
        return span.status
    if content:
        return str(error)[:500]
    code = span.attrs.get("code")
    return _error_type(error) + (f" ({str(code)[:100]})" if isinstance(code, str) else "")


def _ns(seconds: float) -> int:
    """Unix seconds as nanoseconds, clamped to what OTLP's fixed64 holds (NaN: 0)."""
    if not seconds > 0:  # also NaN
        return 0
    return min(int(min(seconds, 1.8e10) * 1e9), 2**64 - 1)


_QUERY_VALUE = re.compile(r"([?&][^=&\s'\"()]+=)[^&\s'\"()]*")


def _endpoint_secrets(url: str) -> list[str]:
    """The endpoint's user, password and query values, as written and decoded."""
    try:
        parts = urlsplit(url)
        found = [parts.username or "", parts.password or ""]
    except ValueError:
        return []
    found += [v for _, v in parse_qsl(parts.query, keep_blank_values=True)]
    found += [v.partition("=")[2] for v in parts.query.split("&")]
    found += [unquote(v) for v in found]
    return sorted({v for v in found if len(v) >= 3}, key=len, reverse=True)


def redact_log_text(text: str, url: str) -> str:
    """A log line of the exporter (or of urllib3 under it) without the endpoint's
    credentials: URLs redacted, every query value and every secret of ``url`` removed."""
    text = _QUERY_VALUE.sub(r"\1<redacted>", redact_urls_in(text))
    for secret in _endpoint_secrets(url):
        text = text.replace(secret, "<redacted>")
    return text


class _RedactingHandler(logging.Handler):
    """Writes log records to stderr as the default handler would, redacted."""

    def __init__(self, url: str) -> None:
        super().__init__(logging.WARNING)
        self.url = url

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(redact_log_text(self.format(record), self.url) + "\n")
        except Exception:  # a log line is never worth a failed export
            self.handleError(record)


@contextlib.contextmanager
def _redacted_logs(url: str) -> Iterator[None]:
    """While exporting, every log record (the exporter logs the URL with its query) goes
    through :class:`_RedactingHandler` instead of Python's default stderr handler."""
    root = logging.getLogger()
    handler = _RedactingHandler(url)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def export_otel(
    folder: Path, endpoint: str, *, service: str = "mas2c", timeout_s: float = 30.0
) -> dict[str, Any]:
    """Send the run folder's trace over OTLP/HTTP; returns what was sent."""
    url = traces_url(endpoint)
    trace = read_run_trace(folder)
    if not trace.spans:
        raise ExportError(f"{folder}: no spans to export (is it a run folder with trace.jsonl?)")
    spans = build_spans(trace, service)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    exporter = OTLPSpanExporter(endpoint=url, timeout=timeout_s)
    with _redacted_logs(url):
        try:
            result = exporter.export(spans)
        finally:
            exporter.shutdown()  # type: ignore[no-untyped-call]
    if result is not SpanExportResult.SUCCESS:
        raise ExportError(
            f"the OTLP receiver at {redact_url(url)} did not accept the spans "
            "(unreachable, or it answered with an error; see the log above)"
        )
    return {
        "endpoint": redact_url(url),
        "trace_id": trace.trace_id,
        "spans": len(spans),
        "problems": trace.problems,
    }


# -- live export from the gateway ------------------------------------------------------------

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


def gateway_span_attributes(event: dict[str, Any]) -> dict[str, Any]:
    """The attributes of the gateway's span of one LLM request (GenAI conventions)."""
    out: dict[str, Any] = {
        "mas2c.kind": "gateway",
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": event.get("model"),
        "gen_ai.agent.name": event.get("agent"),
        "gen_ai.usage.input_tokens": event.get("prompt_tokens"),
        "gen_ai.usage.output_tokens": event.get("completion_tokens"),
        "mas2c.cost_usd": event.get("cost_usd"),
        "mas2c.source": event.get("source") or None,  # upstream, cache, replay, recorded
        "mas2c.spec_pointer": event.get("step") or None,
        "http.response.status_code": event.get("status"),
        # A CHAIN for Phoenix: the package's own `chat` span above it is the LLM span,
        # so tokens are not counted twice.
        "openinference.span.kind": "CHAIN",
    }
    if event.get("status") != 200 and event.get("error"):
        out["error.type"] = str(event.get("status"))
    return {k: v for k, v in ((k, _value(v)) for k, v in out.items()) if v is not None}


class LiveExport:
    """The gateway's LLM calls sent as spans while a run goes (`mas2c run --otel URL`).

    Each gateway event becomes a span ``gateway <model>`` (kind SERVER) whose parent is the
    package's ``chat`` span of that request: the runtime sends its span as a W3C
    ``traceparent`` header with every request, and the gateway passes it on in the event.
    A background thread sends what arrived every half second; `close` sends the rest.
    Events without a trace context (a package of an older mas2c) are counted, not sent.
    Delivery failures are counted and reported by `close` (the run itself never fails on
    them); the exporter's log lines are redacted like `export_otel`'s.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        service: str = "mas2c",
        timeout_s: float = 10.0,
        content: bool | None = None,
    ):
        import queue
        import threading

        from mas2c.tracing import trace_content_default

        self.url = traces_url(endpoint)
        # An upstream's error text may echo a prompt: in a span only with traced content.
        self.content = trace_content_default() if content is None else content
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        except ImportError:
            raise ExportError(
                "the OpenTelemetry SDK is not installed: pip install 'mas2c[otel]'"
            ) from None
        self._exporter = OTLPSpanExporter(endpoint=self.url, timeout=timeout_s)
        self._resource = Resource.create(
            {
                "service.name": service,
                "service.version": __version__,
                "openinference.project.name": service,
            }
        )
        self._scope = InstrumentationScope("mas2c.gateway", __version__)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=100_000)
        self.sent = self.failed = self.skipped = 0
        self._logs = _redacted_logs(self.url)
        self._logs.__enter__()
        self._thread = threading.Thread(target=self._work, name="mas2c-otel-live", daemon=True)
        self._thread.start()

    def on_event(self, event: dict[str, Any]) -> None:
        """A gateway event (called from the gateway's worker threads)."""
        span = self._span(event)
        if span is None:
            self.skipped += 1
            return
        try:
            self._queue.put_nowait(span)
        except Exception:  # full: a receiver that cannot keep up loses spans, not the run
            self.failed += 1

    def _span(self, event: dict[str, Any]) -> Any:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        trace_id, parent_id = event.get("trace_id"), event.get("parent_span_id")
        if not (isinstance(trace_id, str) and _HEX32.match(trace_id)):
            return None
        if not (isinstance(parent_id, str) and _HEX16.match(parent_id)):
            return None
        import os

        flags = TraceFlags(TraceFlags.SAMPLED)
        start = event.get("start_ts")
        latency = event.get("latency_s")
        start_s = float(start) if isinstance(start, int | float) else 0.0
        took = float(latency) if isinstance(latency, int | float) else 0.0
        ok = event.get("status") == 200
        return ReadableSpan(
            name=f"gateway {str(event.get('model') or '?')[:150]}",
            context=SpanContext(
                int(trace_id, 16), int.from_bytes(os.urandom(8), "big") or 1, False, flags
            ),
            parent=SpanContext(int(trace_id, 16), int(parent_id, 16), True, flags),
            resource=self._resource,
            attributes=gateway_span_attributes(event),
            kind=SpanKind.SERVER,
            status=Status(StatusCode.OK)
            if ok
            else Status(
                StatusCode.ERROR,
                str(event.get("error"))[:500]
                if self.content
                else f"HTTP {str(event.get('status'))[:10]}",
            ),
            start_time=_ns(start_s),
            end_time=max(_ns(start_s), _ns(start_s + max(0.0, took))),
            instrumentation_scope=self._scope,
        )

    def _work(self) -> None:
        import queue

        from opentelemetry.sdk.trace.export import SpanExportResult

        stop = False
        while not stop:
            batch: list[Any] = []
            try:
                item = self._queue.get(timeout=0.5)
                batch.append(item)
                while len(batch) < 512:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if None in batch:
                stop = True
                batch = [s for s in batch if s is not None]
            if batch:
                try:
                    result = self._exporter.export(batch)
                except Exception:
                    result = SpanExportResult.FAILURE
                if result is SpanExportResult.SUCCESS:
                    self.sent += len(batch)
                else:
                    self.failed += len(batch)

    def close(self, timeout_s: float = 15.0) -> dict[str, Any]:
        """Send what is left; returns counts (``sent``, ``failed``, ``skipped``)."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        with contextlib.suppress(Exception):
            self._exporter.shutdown()  # type: ignore[no-untyped-call]
        self._logs.__exit__(None, None, None)
        return {
            "endpoint": redact_url(self.url),
            "sent": self.sent,
            "failed": self.failed,
            "skipped": self.skipped,
        }
