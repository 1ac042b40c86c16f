"""`mas2c report RUN_DIR`: one self-contained HTML page about a run, a rectify or a solve.

The page needs nothing at view time: no script, no stylesheet or font from elsewhere,
every picture an inline SVG drawn here in Python. It carries a Content-Security-Policy
that forbids scripts and every network fetch, as a second wall behind escaping.

What it shows (each section only when the folder has what it needs):

* the run header (command, versions, spec hash, endpoint host, start time, trace id)
  and the totals;
* the workflow diagram, each step coloured by what happened to it (ok, error,
  cancelled, resumed, not run);
* a timeline (Gantt) of steps, LLM calls, tool calls and code runs, with a strip of
  the LLM calls in flight, so that concurrency shows;
* tokens and cost per agent and per model;
* errors with their spec pointer (and the spec element there), failed spans;
* the prompts and completions, when the run traced them (``--trace-content``);

Run content (the outputs, prompts and completions, tool values, error messages and
tracebacks, which may quote an answer or a value, a solve's task) is shown only for a
run that traced its content (``--trace-content``: `RunTrace.content`); otherwise the
page says where it is (result.json) and shows codes, types, pointers, counts and times.
* for a rectify folder, the rounds with their failure, fix and patch;
* for a solve folder, the phases, then its run (and rectify rounds).

Everything read from the folder is hostile input (`mas2c.tracing` reads it with size
limits and type checks); every string that reaches the page goes through
`html.escape`, in text and in attributes alike.
"""

from __future__ import annotations

import contextvars
import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mas2c.errors import UsageError, write_error
from mas2c.files import write_text_atomic
from mas2c.tracing import (
    RunTrace,
    Span,
    iso,
    read_json_file,
    read_run_trace,
    read_text_file,
    real_dir,
    regular_file,
)

REPORT_FILE = "report.html"
MAX_TIMELINE_ROWS = 1500
MAX_TEXT = 20_000  # characters of one message, traceback or patch shown
MAX_CONTENT_CALLS = 300  # LLM calls whose prompts and completions are shown

STATUS_COLORS = {
    "ok": ("#d7f0df", "#2e7d4f"),
    "error": ("#fbdada", "#c62828"),
    "timeout": ("#fbdada", "#c62828"),
    "cancelled": ("#fdebc8", "#b26a00"),
    "unfinished": ("#fdebc8", "#b26a00"),
    "resumed": ("#dbe8fb", "#1f5fbf"),
    "recovered": ("#fff4c2", "#8a6d00"),
    "passed": ("#d7f0df", "#2e7d4f"),
    "wrong": ("#fff4c2", "#8a6d00"),
    "not run": ("#eeeeee", "#8a8a8a"),
    "fixed": ("#d7f0df", "#2e7d4f"),
    "nothing_to_do": ("#d7f0df", "#2e7d4f"),
    "not_fixed": ("#fbdada", "#c62828"),
    "none": ("#f5f5f5", "#9e9e9e"),
}
KIND_COLORS = {
    "run": "#546e7a",
    "step": "#5c7cfa",
    "fallback": "#c2185b",
    "llm": "#8e44ad",
    "tool": "#e67e22",
    "exec": "#16a085",
    "host": "#37474f",
}


class ReportError(UsageError):
    """The folder is not something a report can be made of: a user-facing message."""

    code = "not_reportable"


def esc(value: Any) -> str:
    """Text for HTML or SVG, in element content or a quoted attribute."""
    return html.escape(str(value), quote=True)


def _cap(text: str, limit: int = MAX_TEXT) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... [{len(text) - limit} characters not shown]"


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0


def _int(value: Any) -> int:
    return int(_num(value))


def _money(value: float) -> str:
    return f"${value:.6f}" if 0 < value < 0.01 else f"${value:.4f}"


def _secs(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


MAX_NAME = 2000  # characters of a name, pointer, code or note read from the folder


def _text(value: Any, default: str = "") -> str:
    """A string field of the (hostile) folder, capped; ``default`` when it is no string."""
    if not isinstance(value, str):
        return default
    return value if len(value) <= MAX_NAME else value[: MAX_NAME - 1] + "…"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# -- folders ---------------------------------------------------------------------------------


def folder_kind(folder: Path) -> str:
    """solve, batch, run (possibly with rectify rounds) — or a ReportError."""
    if not folder.is_dir():
        why = "not a folder" if folder.exists() else "no such folder"
        raise ReportError(f"{folder}: {why}")
    summary = read_json_file(folder / "summary.json")
    if regular_file(folder / "task.txt") and isinstance(summary, dict) and "phases" in summary:
        return "solve"
    if regular_file(folder / "results.jsonl") and regular_file(folder / "config.json"):
        return "batch"
    if regular_file(folder / "trace.jsonl") or regular_file(folder / "result.json"):
        return "run"
    if any(_ROUND.match(p.name) and real_dir(p) for p in folder.iterdir()):
        return "rectify"
    raise ReportError(
        f"{folder}: not a run folder (no trace.jsonl or result.json), a rectify folder "
        "(no round-K/), a solve folder (no task.txt and summary.json) nor a batch folder "
        "(no config.json and results.jsonl)"
    )


#: Where the page's "What could not be read" entries also go (`write_report`'s `problems`).
_PROBLEMS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "mas2c_report_problems", default=None
)


def _tell(folder: Path, problems: list[str]) -> None:
    seen = _PROBLEMS.get()
    if seen is not None:
        seen.extend(f"{folder}: {p}" for p in problems)


def write_report(
    folder: Path, output: Path | None = None, problems: list[str] | None = None
) -> Path:
    """Write the report of a run, rectify or solve folder; returns its path. `problems`
    (optional) receives what of the folder could not be read (as the page lists it)."""
    token = _PROBLEMS.set(problems)
    try:
        page = render_report(folder)
    finally:
        _PROBLEMS.reset(token)
    out = output or folder / REPORT_FILE
    try:
        write_text_atomic(out, page, user_file=output is not None)
    except OSError as exc:
        raise write_error(out, exc) from None
    return out


def render_report(folder: Path) -> str:
    kind = folder_kind(folder)
    if kind == "solve":
        title, body = _solve_page(folder)
    elif kind == "batch":
        title, body = _batch_page(folder)
    elif kind == "rectify":
        # RUN_DIR/rectify: the run it repaired (when beside it), then the rounds.
        run_dir = folder.parent
        title = f"mas2c rectify: {run_dir.name}"
        body = ""
        content = False
        if regular_file(run_dir / "trace.jsonl") or regular_file(run_dir / "result.json"):
            repaired = read_run_trace(run_dir)
            content = repaired.content
            body = _h(2, "The run that was repaired", "run")
            body += _run_sections(run_dir, repaired, level=3)
        body += _rectify_section(folder, content)
    else:
        trace = read_run_trace(folder)
        title = f"mas2c run: {_spec_name(trace)}"
        body = _run_sections(folder, trace, level=2)
        body += _rectify_section(folder / "rectify", trace.content)
    return _page(title, body)


def _spec_name(trace: RunTrace) -> str:
    run = next((s for s in trace.spans if s.kind == "run"), None)
    return _text(trace.header.get("spec")) or (run.name if run else trace.folder.name)


# -- the page --------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 -apple-system,'DejaVu Sans',Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f6f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;border:1px solid}
pre{background:#f7f7f9;border:1px solid #e1e1e8;padding:8px;overflow:auto;max-height:420px;white-space:pre-wrap;word-break:break-word}
.diff .add{color:#1b5e20;background:#e8f5e9}.diff .del{color:#b71c1c;background:#ffebee}.diff .hunk{color:#6a1b9a}
.muted{color:#777}.legend span{margin-right:14px;white-space:nowrap}
.sw{display:inline-block;width:12px;height:12px;border:1px solid;vertical-align:-2px;margin-right:4px}
svg text{font-family:'DejaVu Sans',Helvetica,Arial,sans-serif}
details{margin:4px 0}summary{cursor:pointer}
.scroll{overflow-x:auto;border:1px solid #eee;padding:4px}
.nw,table.summary th{white-space:nowrap}
"""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{body}\n"
        '<p class="muted">Made by mas2c report; self-contained, no network needed.</p>\n'
        "</body></html>\n"
    )


def _badge(status: str) -> str:
    fill, stroke = STATUS_COLORS.get(status, STATUS_COLORS["error"])
    return (
        f'<span class="badge" data-status="{esc(status)}" '
        f'style="background:{fill};border-color:{stroke};color:{stroke}">{esc(status)}</span>'
    )


def _table(
    head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: frozenset[int] = frozenset()
) -> str:
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            css = ' class="n"' if i in numeric else ""
            cells.append(f"<td{css}>{cell}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _h(level: int, text: str, anchor: str = "") -> str:
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<h{level}{ident}>{esc(text)}</h{level}>"


# -- one run ---------------------------------------------------------------------------------


def _run_sections(folder: Path, trace: RunTrace, level: int) -> str:
    result = read_json_file(folder / "result.json")
    result = result if isinstance(result, dict) else {}
    usage = read_json_file(folder / "usage.json")
    usage = usage if isinstance(usage, dict) else {}
    spec = _load_spec(folder)
    parts = [
        _summary(trace, result, usage),
        _h(level, "Workflow", "workflow"),
        _workflow(spec, trace),
        _h(level, "Timeline", "timeline"),
        _timeline(trace),
        _steps_table(trace),
        _h(level, "Tokens and cost", "cost"),
        _costs(trace, usage, result),
        _errors(trace, result, spec, level),
        _warnings(result, level),
        _contents(trace, level),
    ]
    if trace.problems:
        _tell(folder, trace.problems)
        items = "".join(f"<li>{esc(p)}</li>" for p in trace.problems[:50])
        parts.append(_h(level, "What could not be read", "problems") + f"<ul>{items}</ul>")
    return "\n".join(p for p in parts if p)


def _summary(trace: RunTrace, result: dict[str, Any], usage: dict[str, Any]) -> str:
    header = trace.header
    status = _text(result.get("status")) or _text(header.get("status")) or "unknown"
    run = next((s for s in trace.spans if s.kind == "run"), None)
    llm = trace.by_kind("llm")
    totals = _totals(llm, usage, result)
    rows: list[tuple[str, str]] = [("status", _badge(status))]
    command = header.get("command")
    if isinstance(command, list):
        line = " ".join(str(c)[:MAX_NAME] for c in command[:200])
        rows.append(("command", f"<code>{esc(_cap(line, MAX_NAME * 4))}</code>"))
    for key, label in (
        ("spec", "spec"),
        ("spec_sha256", "spec sha256"),
        ("mas2c_version", "mas2c"),
        ("python", "python (host)"),
        ("endpoint", "LLM endpoint"),
        ("backend", "sandbox"),
        ("started_at", "started"),
    ):
        if header.get(key) is not None:
            rows.append((label, esc(_text(str(header[key])))))
    if not header and run is not None:
        rows.append(("spec", esc(run.name)))
        rows.append(("started", esc(iso(run.start))))
    if run is not None:
        for key, label in (("python", "python (sandbox)"), ("openai", "openai")):
            if isinstance(run.attrs.get(key), str):
                rows.append((label, esc(run.attrs[key])))
    if trace.spans:
        rows.append(("duration", esc(_secs(trace.end - trace.start))))
    rows.append(("trace id", f"<code>{esc(trace.trace_id)}</code>"))
    rows.append(
        (
            "LLM calls",
            esc(
                f"{totals['calls']} ({totals['errors']} failed attempts, {totals['retries']} retries)"
            ),
        )
    )
    rows.append(("tokens", esc(f"{totals['prompt']} prompt + {totals['completion']} completion")))
    rows.append(("cost", esc(_money(totals["cost"]))))
    steps = trace.by_kind("step")
    rows.append(("steps run", esc(str(len(steps)))))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    outputs = result.get("outputs")
    answer = ""
    if outputs is not None and trace.content:
        text = _cap(json.dumps(outputs, indent=2, ensure_ascii=False, default=str))
        answer = f"<h3>Outputs</h3><pre>{esc(text)}</pre>"
    elif outputs is not None:
        fields = len(outputs) if isinstance(outputs, dict) else 1
        answer = f'<h3>Outputs</h3><p class="muted">{esc(fields)} field(s) {_WITHHELD}.</p>'
    return f'<table class="summary">{body}</table>{answer}'


#: What the page says where it leaves run content out.
_WITHHELD = (
    "not shown: the run was traced without --trace-content (run content is opt-in); see result.json"
)


def _span_error(span: Span, content: bool) -> str:
    """A failed span's traced error: as traced with content, else its type and code only
    (a message may quote an answer or a value; the runtime traces none without content)."""
    error = span.attrs.get("error")
    if error is None or content:
        return str(error or "")[:500]
    kind = re.split(r"[:\s(]", str(error), maxsplit=1)[0][:200]
    code = span.attrs.get("code")
    return kind + (f" ({str(code)[:100]})" if isinstance(code, str) else "")


def _totals(llm: list[Span], usage: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    ok = [s for s in llm if s.status == "ok"]
    totals = {
        "calls": len(ok),
        "errors": len(llm) - len(ok),
        "retries": sum(1 for s in llm if _int(s.attrs.get("retries")) > 0),
        "prompt": sum(_int(s.attrs.get("prompt_tokens")) for s in ok),
        "completion": sum(_int(s.attrs.get("completion_tokens")) for s in ok),
        "cost": sum(_num(s.attrs.get("cost_usd")) for s in ok),
    }
    fallback = result.get("usage") if isinstance(result.get("usage"), dict) else usage
    if not llm and isinstance(fallback, dict):
        totals["calls"] = _int(fallback.get("calls"))
        totals["prompt"] = _int(fallback.get("prompt_tokens"))
        totals["completion"] = _int(fallback.get("completion_tokens"))
        totals["cost"] = _num(fallback.get("cost_usd"))
    return totals


def _load_spec(folder: Path) -> Any:
    """The run's spec (spec.json, else build/MANIFEST.json), or None."""
    from pydantic import ValidationError

    from mas2c.lang.spec import Spec

    data = read_json_file(folder / "spec.json")
    if not isinstance(data, dict):
        manifest = read_json_file(folder / "build" / "MANIFEST.json", limit=32 * 1024 * 1024)
        data = manifest.get("spec") if isinstance(manifest, dict) else None
    if not isinstance(data, dict):
        return None
    try:
        return Spec.model_validate(data)
    except (ValidationError, ValueError, TypeError, RecursionError):
        return None


# -- the workflow diagram --------------------------------------------------------------------


def step_statuses(trace: RunTrace) -> dict[str, str]:
    """What happened to each step id: error beats cancelled beats ok; resumed if skipped;
    recovered when every failed run of it was followed by a retry or a fallback that
    succeeded (its ``retry``/``fallback`` did their job)."""
    rank = {"error": 4, "timeout": 4, "cancelled": 3, "unfinished": 3, "ok": 1}
    found: dict[str, str] = {}
    errors: dict[str, int] = {}
    for span in trace.by_kind("step"):
        status = span.status if span.status in rank else "error"
        if rank[status] >= rank.get(found.get(span.name, ""), 0):
            found[span.name] = status
        if status != "ok":
            errors[span.name] = errors.get(span.name, 0) + 1
    handled: dict[str, int] = {}
    for event in trace.events:
        if event.get("event") == "step_resumed" and isinstance(event.get("step"), str):
            found.setdefault(event["step"], "resumed")
        if event.get("event") == "step_failed" and isinstance(event.get("step"), str):
            then = event.get("then")
            name = event["step"]
            handled[name] = handled.get(name, 0) + (
                1 if then in ("retry", "fallback") else -(10**9)
            )
    fallbacks_failed = {
        s.name.removeprefix("fallback of ") for s in trace.by_kind("fallback") if s.status != "ok"
    }
    for name, count in errors.items():
        recovered = handled.get(name, 0) == count and name not in fallbacks_failed
        if found.get(name) == "error" and recovered:
            found[name] = "recovered"
    return found


@dataclass
class _Node:
    node_id: str
    label: list[str]
    shape: str
    step: str | None
    width: float = 0.0
    height: float = 0.0
    x: float = 0.0  # centre
    y: float = 0.0  # top
    layer: int = 0


@dataclass
class _Layout:
    nodes: dict[str, _Node]
    edges: list[tuple[str, str, str, bool]]  # source, target, label, back edge
    clusters: list[tuple[str, list[str]]]
    width: float = 0.0
    height: float = 0.0
    notes: list[str] = field(default_factory=list)


def _layout(spec: Any) -> _Layout:
    from mas2c import graph
    from mas2c.lang.spec import iter_spec_steps

    built = graph.build(spec)
    step_of = {"s_" + step.id.replace("-", "_"): step.id for _, step in iter_spec_steps(spec)}
    nodes: dict[str, _Node] = {}
    for node_id, label, shape in built.nodes:
        lines = [line[:48] + ("…" if len(line) > 48 else "") for line in label.split("\n")][:4]
        node = _Node(node_id, lines, shape, step_of.get(node_id))
        node.width = max(90.0, 7.2 * max(len(line) for line in lines) + 24)
        node.height = 18.0 * len(lines) + 12
        nodes[node_id] = node
    edges = [(a, b, label) for a, b, label in built.edges if a in nodes and b in nodes]
    # Back edges (a loop's "no" edge) by DFS from the start; the rest is a DAG.
    succ: dict[str, list[str]] = {}
    for a, b, _ in edges:
        succ.setdefault(a, []).append(b)
    back: set[tuple[str, str]] = set()
    state: dict[str, int] = {}
    order = list(nodes)
    for root in order:
        if root in state:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        state[root] = 1
        while stack:
            node_id, index = stack.pop()
            children = succ.get(node_id, [])
            if index < len(children):
                stack.append((node_id, index + 1))
                child = children[index]
                if state.get(child) == 1:
                    back.add((node_id, child))
                elif child not in state:
                    state[child] = 1
                    stack.append((child, 0))
            else:
                state[node_id] = 2
    forward = [(a, b) for a, b, _ in edges if (a, b) not in back]
    preds: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in forward:
        preds[b].append(a)
    # Longest-path layers, in topological order (Kahn).
    indegree = {n: len(p) for n, p in preds.items()}
    ready = [n for n in order if indegree[n] == 0]
    topo: list[str] = []
    fwd_succ: dict[str, list[str]] = {}
    for a, b in forward:
        fwd_succ.setdefault(a, []).append(b)
    while ready:
        node_id = ready.pop(0)
        topo.append(node_id)
        for child in fwd_succ.get(node_id, []):
            nodes[child].layer = max(nodes[child].layer, nodes[node_id].layer + 1)
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    layers: dict[int, list[_Node]] = {}
    for node_id in topo:
        layers.setdefault(nodes[node_id].layer, []).append(nodes[node_id])
    gap_x, gap_y, margin = 28.0, 46.0, 20.0
    y = margin
    widths = []
    for number in sorted(layers):
        row = layers[number]
        if number > 0:  # barycentre of the predecessors keeps branches under their fork
            row.sort(
                key=lambda n: (
                    sum(nodes[p].x for p in preds[n.node_id]) / max(1, len(preds[n.node_id]))
                )
            )
        widths.append(sum(n.width for n in row) + gap_x * (len(row) - 1))
        x = margin
        for node in row:
            node.x = x + node.width / 2
            node.y = y
            x += node.width + gap_x
        y += max(n.height for n in row) + gap_y
    total = max(widths, default=0.0) + 2 * margin
    for number in sorted(layers):  # centre each row
        row = layers[number]
        row_width = sum(n.width for n in row) + gap_x * (len(row) - 1)
        shift = (total - 2 * margin - row_width) / 2
        for node in row:
            node.x += shift
    clusters = [(label, [m for m in members if m in nodes]) for _, label, members in built.clusters]
    has_back = bool(back)
    return _Layout(
        nodes,
        [(a, b, label, (a, b) in back) for a, b, label in edges],
        clusters,
        total + (60 if has_back else 0),
        y - gap_y + margin + 10,
    )


def _node_shape(node: _Node, fill: str, stroke: str) -> str:
    left, top, w, h = node.x - node.width / 2, node.y, node.width, node.height
    style = f'fill="{fill}" stroke="{stroke}" stroke-width="1.6"'
    if node.shape == "round":
        return f'<rect x="{left:.1f}" y="{top:.1f}" width="{w:.1f}" height="{h:.1f}" rx="{h / 2:.1f}" {style}/>'
    if node.shape == "decision":
        cx, cy, d = node.x, top + h / 2, 14
        points = f"{left:.1f},{cy:.1f} {left + d:.1f},{top:.1f} {left + w - d:.1f},{top:.1f} {left + w:.1f},{cy:.1f} {left + w - d:.1f},{top + h:.1f} {left + d:.1f},{top + h:.1f}"
        del cx
        return f'<polygon points="{points}" {style}/>'
    if node.shape == "fork":
        d = 10
        points = f"{left + d:.1f},{top:.1f} {left + w:.1f},{top:.1f} {left + w - d:.1f},{top + h:.1f} {left:.1f},{top + h:.1f}"
        return f'<polygon points="{points}" {style}/>'
    inner = ""
    if node.shape == "loop":
        inner = f'<rect x="{left + 3:.1f}" y="{top + 3:.1f}" width="{w - 6:.1f}" height="{h - 6:.1f}" rx="3" fill="none" stroke="{stroke}" stroke-width="0.8"/>'
    return f'<rect x="{left:.1f}" y="{top:.1f}" width="{w:.1f}" height="{h:.1f}" rx="5" {style}/>{inner}'


def _workflow(spec: Any, trace: RunTrace) -> str:
    if spec is None:
        return '<p class="muted">No readable spec in the folder (spec.json or build/MANIFEST.json): no diagram.</p>'
    layout = _layout(spec)
    statuses = step_statuses(trace)
    counts: dict[str, int] = {}
    for span in trace.by_kind("step"):
        counts[span.name] = counts.get(span.name, 0) + 1
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="workflow" width="{layout.width:.0f}" '
        f'height="{layout.height:.0f}" viewBox="0 0 {layout.width:.0f} {layout.height:.0f}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>',
    ]
    for label, members in layout.clusters:
        if not members:
            continue
        boxes = [layout.nodes[m] for m in members]
        left = min(n.x - n.width / 2 for n in boxes) - 10
        right = max(n.x + n.width / 2 for n in boxes) + 10
        top = min(n.y for n in boxes) - 18
        bottom = max(n.y + n.height for n in boxes) + 8
        out.append(
            f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" height="{bottom - top:.1f}" '
            'fill="none" stroke="#9aa5b1" stroke-dasharray="5,4" rx="6"/>'
            f'<text x="{left + 6:.1f}" y="{top + 12:.1f}" font-size="11" fill="#66707a">{esc(label)}</text>'
        )
    for source, target, label, is_back in layout.edges:
        a, b = layout.nodes[source], layout.nodes[target]
        if is_back:
            x1, y1 = a.x + a.width / 2, a.y + a.height / 2
            x2, y2 = b.x + b.width / 2, b.y + b.height / 2
            bend = max(x1, x2) + 40
            path = (
                f"M{x1:.1f},{y1:.1f} C{bend:.1f},{y1:.1f} {bend:.1f},{y2:.1f} {x2 + 2:.1f},{y2:.1f}"
            )
            lx, ly, anchor = bend + 4, (y1 + y2) / 2, "start"
        else:
            x1, y1 = a.x, a.y + a.height
            x2, y2 = b.x, b.y - 2
            mid = (y1 + y2) / 2
            path = f"M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}"
            # A label reads away from its siblings: edges to the left end left of the curve.
            lx, ly = (x1 + x2) / 2, mid + 4
            anchor = "end" if x2 < x1 - 1 else "start"
            lx += -6 if anchor == "end" else 6
        short = label if len(label) <= 40 else label[:39] + "…"
        if anchor == "end":  # never past the drawing's left edge
            lx = max(lx, 6.5 * len(short) + 4)
        out.append(
            f'<path d="{path}" fill="none" stroke="#777" stroke-width="1.2" marker-end="url(#arrow)"'
            f' data-from="{esc(source)}" data-to="{esc(target)}"/>'
        )
        if label:
            out.append(
                f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="11" fill="#555" text-anchor="{anchor}" '
                'stroke="#fff" stroke-width="3" paint-order="stroke" class="edge-label">'
                f"<title>{esc(label)}</title>{esc(short)}</text>"
            )
    for node in layout.nodes.values():
        status = "none"
        if node.step is not None:
            status = statuses.get(node.step, "not run")
        fill, stroke = STATUS_COLORS[status]
        times = counts.get(node.step or "", 0)
        tip = f"{node.step or node.node_id}: {status}" + (f" ({times} run(s))" if times else "")
        step_attr = f' data-step="{esc(node.step)}"' if node.step is not None else ""
        out.append(
            f'<g class="node"{step_attr} data-status="{esc(status)}"><title>{esc(tip)}</title>'
        )
        out.append(_node_shape(node, fill, stroke))
        for i, line in enumerate(node.label):
            weight = ' font-weight="600"' if i == 0 else ""
            out.append(
                f'<text x="{node.x:.1f}" y="{node.y + 20 + 18 * i:.1f}" font-size="12" '
                f'text-anchor="middle" fill="#222"{weight}>{esc(line)}</text>'
            )
        if times > 1:
            out.append(
                f'<text x="{node.x + node.width / 2 - 4:.1f}" y="{node.y + 12:.1f}" font-size="10" '
                f'text-anchor="end" fill="{stroke}">×{times}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    legend = "".join(
        f'<span><i class="sw" style="background:{f};border-color:{s}"></i>{esc(name)}</span>'
        for name, (f, s) in STATUS_COLORS.items()
        if name in ("ok", "recovered", "error", "cancelled", "resumed", "not run")
    )
    return f'<div class="legend">{legend}</div><div class="scroll">{"".join(out)}</div>'


# -- the timeline ----------------------------------------------------------------------------


def _depths(spans: list[Span]) -> dict[str, int]:
    by_id = {s.span_id: s for s in spans}
    depths: dict[str, int] = {}
    for span in spans:
        depth, parent, seen = 0, span.parent_id, {span.span_id}
        while parent in by_id and parent not in seen:
            seen.add(parent)
            depth += 1
            parent = by_id[parent].parent_id
        depths[span.span_id] = depth
    return depths


def _path(value: Any) -> str:
    """A map item / loop iteration path as text (``2`` or ``1.3``), "" if not one."""
    if not isinstance(value, list) or not value:
        return ""
    return ".".join(str(_int(v)) for v in value[:8])


def _repeat_bits(a: dict[str, Any]) -> list[str]:
    """What tells one run of a step (or call) from its repeats: item, iteration, sample,
    round, attempt."""
    bits = []
    if _path(a.get("item")):
        bits.append(f"item {_path(a.get('item'))}")
    if _path(a.get("iteration")):
        bits.append(f"iter {_path(a.get('iteration'))}")
    if a.get("round") is not None:
        bits.append(f"r{_int(a.get('round'))}")
    if a.get("sample") is not None:
        bits.append(f"#{_int(a.get('sample'))}")
    if a.get("attempts") is not None and _int(a.get("attempts")) > 1:
        bits.append(f"attempt {_int(a.get('attempt'))}/{_int(a.get('attempts'))}")
    return bits


def _span_label(span: Span) -> str:
    a = span.attrs
    if span.kind == "llm":
        bits = [_text(a.get("agent"), "?"), *_repeat_bits(a)]
        if _text(a.get("role")) and a.get("role") != a.get("agent"):
            bits.append(_text(a.get("role")))
        if _int(a.get("format_repair")):
            bits.append(f"fix {_int(a.get('format_repair'))}")
        if _int(a.get("retries")):
            bits.append(f"retry {_int(a.get('retries'))}")
        return f"LLM {' '.join(bits)}"
    if span.kind == "step":
        return " ".join([span.name, *_repeat_bits(a)])
    if span.kind == "run":
        return f"run {span.name}"
    if span.kind == "tool" and _text(a.get("worker")):
        return " ".join([f"worker {_text(a.get('worker'))}", *_repeat_bits(a)])
    if span.kind in ("tool", "exec"):
        return " ".join([span.name, *_repeat_bits(a)])
    return span.name


def _span_tip(span: Span, content: bool) -> str:
    a = span.attrs
    lines = [f"{_span_label(span)} [{span.kind}] {span.status}", f"{_secs(span.duration)}"]
    if span.kind == "llm":
        lines.append(f"model {_text(a.get('model'), '?')} ({_text(a.get('model_id'), '')})")
        lines.append(
            f"tokens {_int(a.get('prompt_tokens'))} + {_int(a.get('completion_tokens'))}, "
            f"cost {_money(_num(a.get('cost_usd')))}"
        )
    if _text(a.get("pointer")):
        lines.append(f"at {_text(a.get('pointer'))}")
    if a.get("error") is not None:
        lines.append(f"error: {_span_error(span, content)[:300]}")
    if _text(a.get("code")):
        lines.append(f"code: {_text(a.get('code'))}")
    return "\n".join(lines)


def _ticks(total: float) -> list[float]:
    if total <= 0:
        return [0.0]
    raw = total / 8
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(total / step) + 1)]


def _timeline(trace: RunTrace) -> str:
    spans = [s for s in trace.spans if s.kind != "host"]
    if not spans:
        return '<p class="muted">The trace has no spans.</p>'
    t0 = min(s.start for s in spans)
    t1 = max(s.end for s in spans)
    total = max(t1 - t0, 1e-3)
    depths = _depths(spans)
    shown = spans[:MAX_TIMELINE_ROWS]
    label_w, chart_w, row_h, top = 300.0, 860.0, 18.0, 92.0
    height = top + row_h * len(shown) + 12

    def x(ts: float) -> float:
        return label_w + (ts - t0) / total * chart_w

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{label_w + chart_w + 20:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {label_w + chart_w + 20:.0f} {height:.0f}">'
    ]
    # The LLM calls in flight over time: concurrency at a glance.
    llm = [s for s in spans if s.kind == "llm"]
    points = sorted(
        [(s.start, 1) for s in llm] + [(s.end, -1) for s in llm], key=lambda p: (p[0], p[1])
    )
    peak, level, path = 0, 0, [f"M{x(t0):.1f},60"]
    strip_h = 40.0
    levels: list[tuple[float, int]] = []
    for ts, delta in points:
        level += delta
        peak = max(peak, level)
        levels.append((ts, level))
    scale = strip_h / max(1, peak)
    current = 0
    for ts, value in levels:
        path.append(
            f"L{x(ts):.1f},{60 - current * scale:.1f} L{x(ts):.1f},{60 - value * scale:.1f}"
        )
        current = value
    path.append(f"L{x(t1):.1f},{60 - current * scale:.1f} L{x(t1):.1f},60 Z")
    out.append(
        f'<text x="4" y="38" font-size="12" fill="#333">LLM calls in flight</text>'
        f'<text x="4" y="54" font-size="11" fill="#777" class="peak" data-peak="{peak}">peak {peak}</text>'
        f'<rect x="{label_w:.1f}" y="{60 - strip_h:.1f}" width="{chart_w:.1f}" height="{strip_h:.1f}" fill="#faf7fc" stroke="#eee"/>'
        f'<path d="{" ".join(path)}" fill="#c9a7dd" stroke="#8e44ad" stroke-width="1"/>'
    )
    for tick in _ticks(total):
        tx = x(t0 + tick)
        out.append(
            # the time axis sits between the in-flight strip (ends at y=60) and the rows
            f'<line x1="{tx:.1f}" y1="{top - 6:.1f}" x2="{tx:.1f}" y2="{height - 8:.1f}" stroke="#eee"/>'
            f'<text x="{tx:.1f}" y="{top - 10:.1f}" font-size="10" fill="#777" text-anchor="middle">{esc(_secs(tick))}</text>'
        )
    for row, span in enumerate(shown):
        y = top + row * row_h
        color = KIND_COLORS.get(span.kind, "#999")
        failed = span.status not in ("ok",)
        stroke = ' stroke="#c62828" stroke-width="2"' if failed else ""
        fill = "#e57373" if failed and span.kind != "run" else color
        bx, bw = x(span.start), max(1.5, x(span.end) - x(span.start))
        indent = 6 + 12 * min(depths.get(span.span_id, 0), 12)
        label = _span_label(span)
        room = max(8, int((label_w - indent - 8) / 6.6))  # characters of 11 px text that fit
        label = label if len(label) <= room else label[: room - 1] + "…"
        if row % 2:
            out.append(
                f'<rect x="0" y="{y:.1f}" width="{label_w + chart_w + 20:.0f}" height="{row_h:.1f}" fill="#fafafa"/>'
            )
        out.append(
            f'<g class="span" data-kind="{esc(span.kind)}" data-status="{esc(span.status)}" '
            f'data-span="{esc(span.span_id)}" data-parent="{esc(span.parent_id or "")}">'
            f"<title>{esc(_span_tip(span, trace.content))}</title>"
            f'<text x="{indent}" y="{y + 13:.1f}" font-size="11" fill="{color}">{esc(label)}</text>'
            f'<rect x="{bx:.1f}" y="{y + 3:.1f}" width="{bw:.1f}" height="{row_h - 6:.1f}" rx="2" fill="{fill}"{stroke}/>'
            "</g>"
        )
    out.append("</svg>")
    more = ""
    if len(spans) > len(shown):
        more = f'<p class="muted">{len(spans) - len(shown)} more spans not drawn.</p>'
    legend = "".join(
        f'<span><i class="sw" style="background:{c};border-color:{c}"></i>{esc(k)}</span>'
        for k, c in KIND_COLORS.items()
        if k != "host"
    )
    legend += (
        '<span><i class="sw" style="background:#e57373;border-color:#c62828"></i>failed</span>'
    )
    return f'<div class="legend">{legend}</div><div class="scroll">{"".join(out)}</div>{more}'


# -- per step ---------------------------------------------------------------------------------


def _steps_table(trace: RunTrace) -> str:
    """Each step id: runs, status, time, and the LLM calls, tokens and cost made inside it."""
    steps = trace.by_kind("step")
    if not steps:
        return ""
    by_id = {s.span_id: s for s in trace.spans}
    rows: dict[str, dict[str, Any]] = {}
    for span in steps:
        row = rows.setdefault(
            span.name,
            {"pointer": _text(span.attrs.get("pointer")), "runs": 0, "seconds": 0.0, "calls": 0}
            | {"tokens": 0, "cost": 0.0, "failed": 0},
        )
        row["runs"] += 1
        row["seconds"] += span.duration
        row["failed"] += span.status != "ok"
    for call in trace.by_kind("llm"):
        seen: set[str] = set()
        parent = call.parent_id
        while parent in by_id and parent not in seen:  # every enclosing step counts it
            seen.add(parent)
            enclosing = by_id[parent]
            if enclosing.kind == "step" and call.status == "ok":
                row = rows[enclosing.name]
                row["calls"] += 1
                row["tokens"] += _int(call.attrs.get("prompt_tokens")) + _int(
                    call.attrs.get("completion_tokens")
                )
                row["cost"] += _num(call.attrs.get("cost_usd"))
            parent = enclosing.parent_id
    body = [
        [
            esc(name),
            f"<code>{esc(r['pointer'])}</code>",
            esc(r["runs"]),
            esc(r["failed"]),
            esc(_secs(r["seconds"])),
            esc(r["calls"]),
            esc(r["tokens"]),
            esc(_money(r["cost"])),
        ]
        for name, r in sorted(rows.items(), key=lambda kv: kv[1]["pointer"])
    ]
    head = ["step", "pointer", "runs", "failed", "time", "LLM calls", "tokens", "cost"]
    return "<h3>Per step (with the steps inside it)</h3>" + _table(
        head, body, frozenset({2, 3, 4, 5, 6, 7})
    )


# -- tokens and cost -------------------------------------------------------------------------


def _aggregate(llm: list[Span], key: str) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for span in llm:
        name = _text(span.attrs.get(key), "?")
        row = table.setdefault(
            name,
            {"calls": 0, "failed": 0, "prompt": 0, "completion": 0, "cost": 0.0, "seconds": 0.0},
        )
        row["seconds"] += span.duration
        if span.status != "ok":
            row["failed"] += 1
            continue
        row["calls"] += 1
        row["prompt"] += _int(span.attrs.get("prompt_tokens"))
        row["completion"] += _int(span.attrs.get("completion_tokens"))
        row["cost"] += _num(span.attrs.get("cost_usd"))
    return table


def _bars(table: dict[str, dict[str, float]], what: str, css: str) -> str:
    if not table:
        return ""
    metric = "cost" if any(r["cost"] > 0 for r in table.values()) else "tokens"
    values = {
        k: (r["cost"] if metric == "cost" else r["prompt"] + r["completion"])
        for k, r in table.items()
    }
    peak = max(values.values()) or 1.0
    row_h, label_w, bar_w = 22, 180, 420
    height = row_h * len(values) + 8
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{esc(css)}" width="{label_w + bar_w + 140}" '
        f'height="{height}" viewBox="0 0 {label_w + bar_w + 140} {height}">'
    ]
    for i, (name, value) in enumerate(sorted(values.items(), key=lambda kv: -kv[1])):
        y = 4 + i * row_h
        width = max(1.0, value / peak * bar_w)
        shown = _money(value) if metric == "cost" else f"{int(value)} tokens"
        label = name if len(name) <= 26 else name[:25] + "…"
        out.append(
            f'<g class="bar" data-name="{esc(name)}" data-value="{value:.8f}">'
            f'<text x="{label_w - 6}" y="{y + 15}" font-size="12" text-anchor="end">{esc(label)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row_h - 6}" fill="#8e44ad" opacity="0.75"/>'
            f'<text x="{label_w + width + 6:.1f}" y="{y + 15}" font-size="11" fill="#444">{esc(shown)}</text></g>'
        )
    out.append("</svg>")
    return f'<p class="muted">{esc(metric)} by {esc(what)}</p>' + "".join(out)


def _costs(trace: RunTrace, usage: dict[str, Any], result: dict[str, Any]) -> str:
    llm = trace.by_kind("llm")
    if not llm:
        source = result.get("usage") if isinstance(result.get("usage"), dict) else usage
        if not isinstance(source, dict) or not source:
            return '<p class="muted">No LLM calls traced.</p>'
        rows = []
        for scope in ("by_agent", "by_model"):
            for name, tally in sorted((source.get(scope) or {}).items()):
                if isinstance(tally, dict):
                    rows.append(
                        [
                            esc(scope[3:]),
                            esc(name),
                            esc(_int(tally.get("calls"))),
                            esc(_int(tally.get("total_tokens"))),
                            esc(_money(_num(tally.get("cost_usd")))),
                        ]
                    )
        if not rows:
            return '<p class="muted">No LLM calls.</p>'
        return _table(["per", "name", "calls", "tokens", "cost"], rows, frozenset({2, 3, 4}))
    parts = []
    for key, what in (("agent", "agent"), ("model", "model")):
        table = _aggregate(llm, key)
        rows = [
            [
                esc(name),
                esc(int(r["calls"])),
                esc(int(r["failed"])),
                esc(int(r["prompt"])),
                esc(int(r["completion"])),
                esc(_money(r["cost"])),
                esc(_secs(r["seconds"])),
            ]
            for name, r in sorted(table.items())
        ]
        parts.append(f"<h3>Per {esc(what)}</h3>")
        parts.append(
            _table(
                [
                    what,
                    "calls",
                    "failed attempts",
                    "prompt tokens",
                    "completion tokens",
                    "cost",
                    "LLM time",
                ],
                rows,
                frozenset({1, 2, 3, 4, 5, 6}),
            )
        )
        parts.append(_bars(table, what, f"bars-{key}"))
    return "".join(parts)


# -- errors ----------------------------------------------------------------------------------


def _resolve(data: Any, pointer: str) -> Any:
    """The element at a JSON pointer, or None (the pointer is hostile input too)."""
    if not pointer.startswith("/"):
        return None
    node = data
    for token in pointer.split("/")[1:][:64]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def _errors(trace: RunTrace, result: dict[str, Any], spec: Any, level: int) -> str:
    error = result.get("error")
    failed = [
        s
        for s in trace.spans
        if s.kind in ("step", "fallback", "llm", "tool", "exec") and s.status != "ok"
    ]
    recovered = [e for e in trace.events if e.get("event") == "step_failed"]
    if not isinstance(error, dict) and not failed and not recovered:
        return ""
    parts = [_h(level, "Errors", "errors")]
    if isinstance(error, dict):
        pointer = _text(error.get("spec_pointer"))
        rows = [
            ("type", esc(_text(error.get("type"), "?"))),
            (
                "message",
                f"<pre>{esc(_cap(str(error.get('message', ''))))}</pre>"
                if trace.content
                else f'<span class="muted">{esc(_WITHHELD)}</span>',
            ),
            ("code", esc(_text(error.get("code"), "—"))),
            ("spec pointer", f'<code class="pointer">{esc(pointer)}</code>' if pointer else "—"),
        ]
        if error.get("spec_line") is not None:
            rows.append(("line in the element", esc(_int(error.get("spec_line")))))
        for key in ("step", "agent"):
            if isinstance(error.get(key), str):
                rows.append((key, esc(error[key])))
        parts.append(
            '<table class="error">'
            + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
            + "</table>"
        )
        if pointer and spec is not None:
            element = _resolve(spec.to_data(), pointer)
            if element is not None:
                text = (
                    element
                    if isinstance(element, str)
                    else json.dumps(element, indent=2, ensure_ascii=False)
                )
                parts.append(f"<h3>The spec at {esc(pointer)}</h3><pre>{esc(_cap(text))}</pre>")
        if isinstance(error.get("traceback"), str) and error["traceback"] and trace.content:
            parts.append(
                f"<details><summary>traceback</summary><pre>{esc(_cap(error['traceback']))}</pre></details>"
            )
    if failed:
        failed_rows = [
            [
                esc(s.kind),
                esc(_span_label(s)),
                esc(s.status),
                f"<code>{esc(_text(s.attrs.get('pointer')))}</code>",
                esc(_span_error(s, trace.content)),
            ]
            for s in failed[:200]
        ]
        parts.append(
            "<h3>Failed spans</h3>"
            + _table(["kind", "what", "status", "spec pointer", "error"], failed_rows)
        )
    if recovered:
        attempt_rows = [
            [
                esc(_text(e.get("step"), "?")),
                f"<code>{esc(_text(e.get('pointer')))}</code>",
                esc(f"{_int(e.get('attempt'))}/{_int(e.get('attempts'))}"),
                esc(_text(e.get("code"), "?")),
                esc(_text(e.get("then"), "?")),
                esc(_text(e.get("message"))[:500] if trace.content else ""),
            ]
            for e in recovered[:200]
        ]
        parts.append(
            "<h3>Failed attempts (retry, fallback)</h3>"
            + _table(
                ["step", "spec pointer", "attempt", "code", "then", "message"],
                attempt_rows,
            ).replace("<table>", '<table class="attempts">', 1)
        )
    return "".join(parts)


def _warnings(result: dict[str, Any], level: int) -> str:
    """``result.json``'s ``warnings``: what an ``ok`` run still has to say (a loop that
    reached max_iterations without its ``until``, a map cut at max_items)."""
    warnings = result.get("warnings")
    if not isinstance(warnings, list) or not warnings:
        return ""
    rows = [
        [
            esc(_text(w.get("type"), "?")),
            esc(_text(w.get("step"))),
            f"<code>{esc(_text(w.get('pointer')))}</code>",
            esc(_cap(str(w.get("message", "")), 1000)),
        ]
        for w in warnings[:200]
        if isinstance(w, dict)
    ]
    table = _table(["warning", "step", "spec pointer", "message"], rows)
    return _h(level, "Warnings", "warnings") + table.replace(
        "<table>", '<table class="warnings">', 1
    )


# -- prompts and completions -----------------------------------------------------------------


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return str(message)
    role = _text(message.get("role"), "?")
    content = message.get("content")
    text = (
        content
        if isinstance(content, str)
        else json.dumps(content, ensure_ascii=False, default=str)
    )
    calls = message.get("tool_calls")
    if calls:
        text += "\n[tool calls] " + json.dumps(calls, ensure_ascii=False, default=str)
    return f"── {role}\n{text}"


def _contents(trace: RunTrace, level: int) -> str:
    calls = [s for s in trace.by_kind("llm") if "messages" in s.attrs or "completion" in s.attrs]
    if not calls or not trace.content:
        return ""
    parts = [_h(level, "Prompts and completions", "content")]
    for span in calls[:MAX_CONTENT_CALLS]:
        messages = span.attrs.get("messages")
        lines = [_message_text(m) for m in messages] if isinstance(messages, list) else []
        if "completion" in span.attrs:
            lines.append(_message_text(span.attrs["completion"]))
        text = _cap("\n\n".join(lines))
        summary = f"{_span_label(span)} at {_text(span.attrs.get('step'), '?')} ({span.status})"
        parts.append(
            f'<details class="call"><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>'
        )
    if len(calls) > MAX_CONTENT_CALLS:
        parts.append(f'<p class="muted">{len(calls) - MAX_CONTENT_CALLS} more calls not shown.</p>')
    return "".join(parts)


# -- rectify ---------------------------------------------------------------------------------

_ROUND = re.compile(r"^round-([0-9]{1,4})$")


def _diff_html(text: str) -> str:
    lines = []
    for line in _cap(text).splitlines():
        css = ""
        if line.startswith("+") and not line.startswith("+++"):
            css = "add"
        elif line.startswith("-") and not line.startswith("---"):
            css = "del"
        elif line.startswith("@@"):
            css = "hunk"
        lines.append(f'<span class="{css}">{esc(line)}</span>' if css else esc(line))
    return '<pre class="diff">' + "\n".join(lines) + "</pre>"


def _rectify_section(folder: Path, content: bool) -> str:
    """The rounds of a rectify folder; a failure's message (it may quote an answer or a
    value) only when the repaired run traced its content."""
    if not real_dir(folder):
        return ""
    summary = read_json_file(folder / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    rounds = sorted(
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if real_dir(p) and (m := _ROUND.match(p.name))
    )
    parts = [_h(2, "Rectify rounds", "rectify")]
    if summary:
        parts.append(
            "<p>"
            + _badge(_text(summary.get("status"), "unknown"))
            + esc(
                f" after {_int(summary.get('rounds'))} round(s), "
                f"{_int(summary.get('rectifier_llm_calls'))} rectifier LLM call(s): "
                f"{_text(summary.get('stop_reason'))}"
            )
            + "</p>"
        )
    rows = []
    details = []
    for number, path in rounds:
        notes = _dict(read_json_file(path / "notes.json"))
        failure, fix, run = (_dict(notes.get(k)) for k in ("failure", "fix", "run"))
        run_status = _text(run.get("status"))
        if not run_status and regular_file(path / "run" / "result.json"):
            result = read_json_file(path / "run" / "result.json")
            run_status = _text(result.get("status")) if isinstance(result, dict) else ""
        rows.append(
            [
                esc(number),
                esc(
                    f"{_text(failure.get('type'))}: {str(failure.get('message', ''))[:200]}"
                    if content
                    else f"{_text(failure.get('type'))} ({_text(failure.get('code'), '?')})"
                ),
                f"<code>{esc(_text(failure.get('pointer')))}</code>",
                esc(_text(fix.get("class"), "—"))
                + (esc(" (deterministic)") if fix.get("deterministic") is True else ""),
                _badge(run_status) if run_status else "—",
                esc(_text(notes.get("outcome"), "?")),
            ]
        )
        block = [f'<div class="round" data-round="{number}">', f"<h3>Round {number}</h3>"]
        if fix:
            if content or fix.get("deterministic") is True:
                block.append(f"<p>{esc(_text(fix.get('why')))}</p>")
            else:  # the rectifier LLM's explanation may quote the failure's message
                block.append(
                    f'<p class="muted">{esc(_WITHHELD.replace("result.json", "notes.json"))}</p>'
                )
            changes = fix.get("changes")
            if isinstance(changes, list) and changes:
                block.append("<ul>" + "".join(f"<li>{esc(c)}</li>" for c in changes[:50]) + "</ul>")
        patch = read_text_file(path / "patch.diff", MAX_TEXT * 2) or ""
        if patch.strip():
            block.append(_diff_html(patch))
        block.append("</div>")
        details.append("".join(block))
    if rows:
        parts.append(_table(["round", "failure", "at", "fix", "run", "outcome"], rows))
        parts.extend(details)
        final = rounds[-1][1] / "run"
        if real_dir(final) and regular_file(final / "trace.jsonl"):
            parts.append(_h(3, f"Timeline of round {rounds[-1][0]}'s run"))
            parts.append(_timeline(read_run_trace(final)))
    elif not summary:
        return ""
    return "\n".join(parts)


# -- solve -----------------------------------------------------------------------------------


def _solve_page(folder: Path) -> tuple[str, str]:
    summary = read_json_file(folder / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    task = read_text_file(folder / "task.txt", MAX_TEXT) or ""
    # The task is a prompt: shown when the solve's run traced its content.
    first = folder / "run-1"
    content = real_dir(first) and regular_file(first / "run.json") and read_run_trace(first).content
    if not content:
        task = ""
    parts = [
        f"<p><b>Task:</b> {esc(task.strip())}</p>"
        if content
        else f'<p><b>Task:</b> <span class="muted">{esc(_WITHHELD.replace("result.json", "task.txt"))}</span></p>',
        "<p>"
        + _badge(_text(summary.get("status"), "unknown"))
        + esc(f" spec: {_text(summary.get('spec_source'), '?')}")
        + "</p>",
        _h(2, "Phases", "phases"),
    ]
    phases = [p for p in summary.get("phases") or [] if isinstance(p, dict)]
    total = sum(_num(p.get("seconds")) for p in phases) or 1.0
    width, row_h = 700.0, 24
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="phases" width="{width + 220:.0f}" '
        f'height="{row_h * len(phases) + 8}" viewBox="0 0 {width + 220:.0f} {row_h * len(phases) + 8}">'
    ]
    offset = 0.0
    for i, phase in enumerate(phases):
        seconds = _num(phase.get("seconds"))
        x = 120 + offset / total * width
        w = max(1.5, seconds / total * width)
        name = _text(phase.get("name"), "?")
        svg.append(
            f'<g class="phase" data-phase="{esc(name)}"><title>{esc(name)}: {esc(_secs(seconds))}</title>'
            f'<text x="114" y="{4 + i * row_h + 16}" font-size="12" text-anchor="end">{esc(name[:18])}</text>'
            f'<rect x="{x:.1f}" y="{4 + i * row_h + 3}" width="{w:.1f}" height="{row_h - 6}" fill="#5c7cfa"/>'
            f'<text x="{x + w + 6:.1f}" y="{4 + i * row_h + 16}" font-size="11" fill="#444">{esc(_secs(seconds))}</text></g>'
        )
        offset += seconds
    svg.append("</svg>")
    parts.append("".join(svg))
    parts.append(
        _table(
            ["phase", "seconds", "LLM calls", "tokens", "note"],
            [
                [
                    esc(_text(p.get("name"))),
                    esc(f"{_num(p.get('seconds')):.1f}"),
                    esc(_int(p.get("calls"))),
                    esc(_int(p.get("tokens"))),
                    esc(_text(p.get("note"))),
                ]
                for p in phases
            ],
            frozenset({1, 2, 3}),
        )
    )
    run_dir = folder / "run-1"
    if not real_dir(run_dir):
        run_dir = folder / "run-1-not-a-folder"  # a symlink is not followed
    if regular_file(run_dir / "trace.jsonl") or regular_file(run_dir / "result.json"):
        trace = read_run_trace(run_dir)
        parts.append(_h(2, "The run (run-1)", "run"))
        parts.append(_run_sections(run_dir, trace, level=3))
        parts.append(_rectify_section(run_dir / "rectify", trace.content))
    else:
        parts.append(
            '<p class="muted">No run folder (run-1/): the solve stopped before running.</p>'
        )
    title = f"mas2c solve: {task.strip().splitlines()[0][:80] if task.strip() else folder.name}"
    return title, "\n".join(parts)


__all__ = ["ReportError", "folder_kind", "render_report", "step_statuses", "write_report"]


# -- batch -----------------------------------------------------------------------------------

MAX_BATCH_ROWS = 2000  # rows listed in the table (the row map shows every row read)
_ROW_COLORS = {"passed": "#2e7d4f", "wrong": "#e0b000", "error": "#c62828"}


def _read_results(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """results.jsonl: the JSON-object lines with a string ``key``, capped like a trace."""
    from mas2c.tracing import MAX_LINE_BYTES, MAX_TRACE_BYTES, read_bytes_capped

    data = read_bytes_capped(path, MAX_TRACE_BYTES) or b""
    if len(data) > MAX_TRACE_BYTES:
        problems.append(f"{path.name}: larger than {MAX_TRACE_BYTES} bytes; the rest is ignored")
        data = data[:MAX_TRACE_BYTES]
    rows: dict[str, dict[str, Any]] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = (
                json.loads(raw.decode("utf-8", errors="replace"))
                if len(raw) <= MAX_LINE_BYTES
                else None
            )
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            problems.append(f"{path.name}:{number}: not a result line, skipped")
            continue
        rows[row["key"]] = row  # a redone row: its last line counts (as the batch reads it)
    return sorted(rows.values(), key=lambda r: (_int(r.get("index")), _text(r.get("key"))))


def _row_state(row: dict[str, Any]) -> str:
    if row.get("status") not in (None, "ok"):
        return "error"
    return "passed" if row.get("passed") is True else "wrong"


def _row_link(folder: Path, key: str) -> str:
    """A link to the row's run report (``mas2c report rows/<id>/mas`` made it), if there is one."""
    from urllib.parse import quote

    from mas2c.batch import slug

    name = slug(key)
    for sub in ("rows", "problems"):
        for relative in (f"{sub}/{name}/mas/{REPORT_FILE}", f"{sub}/{name}/{REPORT_FILE}"):
            if real_dir(folder / sub) and regular_file(folder / relative):
                return f'<a href="{esc(quote(relative))}">report</a>'
    return ""


def _row_map(rows: list[dict[str, Any]]) -> str:
    """Every row as a small square coloured by its outcome, in dataset order."""
    if not rows:
        return ""
    size, per_line = 12, 80
    lines = (len(rows) + per_line - 1) // per_line
    width, height = per_line * (size + 2) + 4, lines * (size + 2) + 4
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="rowmap" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">'
    ]
    for i, row in enumerate(rows):
        state = _row_state(row)
        x, y = 2 + (i % per_line) * (size + 2), 2 + (i // per_line) * (size + 2)
        tip = f"{_text(row.get('key'))}: {state}"
        if _text(row.get("error_code")):
            tip += f" ({_text(row.get('error_code'))})"
        out.append(
            f'<rect class="row" data-row="{esc(_text(row.get("key"))[:200])}" data-state="{state}" '
            f'x="{x}" y="{y}" width="{size}" height="{size}" rx="2" fill="{_ROW_COLORS[state]}">'
            f"<title>{esc(tip[:300])}</title></rect>"
        )
    out.append("</svg>")
    legend = "".join(
        f'<span><i class="sw" style="background:{c};border-color:{c}"></i>{esc(k)}</span>'
        for k, c in _ROW_COLORS.items()
    )
    return f'<div class="legend">{legend}</div><div class="scroll">{"".join(out)}</div>'


def _scalar_rows(data: dict[str, Any], keys: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    rows = []
    for key, label in keys:
        value = data.get(key)
        if isinstance(value, bool) or value is None:
            if isinstance(value, bool):
                rows.append((label, esc("yes" if value else "no")))
            continue
        if isinstance(value, int | float | str):
            rows.append((label, esc(str(value)[:500])))
    return rows


def _batch_page(folder: Path) -> tuple[str, str]:
    problems: list[str] = []
    summary = _dict(read_json_file(folder / "summary.json"))
    config = _dict(read_json_file(folder / "config.json"))
    results = _read_results(folder / "results.jsonl", problems)
    info = {**config, **summary}
    dataset = _text(info.get("dataset"))
    title = f"mas2c batch: {Path(dataset).name if dataset else folder.name}"
    passed = sum(1 for r in results if _row_state(r) == "passed")
    rows: list[tuple[str, str]] = _scalar_rows(
        info,
        (
            ("benchmark", "benchmark"),
            ("spec", "spec"),
            ("solve_task", "solve task"),
            ("dataset", "dataset"),
            ("dataset_sha256", "dataset sha256"),
            ("scorer", "scorer"),
            ("engine", "engine"),
        ),
    )
    accuracy = info.get("accuracy")
    ci = info.get("ci95")
    if isinstance(accuracy, int | float) and not isinstance(accuracy, bool):
        shown = f"{100 * _num(accuracy):.1f}%"
        if isinstance(ci, list) and len(ci) == 2:
            shown += f" [{100 * _num(ci[0]):.1f}%, {100 * _num(ci[1]):.1f}%] 95% ({_text(info.get('ci_method'))})"
        rows.append(("accuracy", esc(shown)))
    rows.append(("rows", esc(f"{len(results)} finished, {passed} passed")))
    rows += _scalar_rows(
        info,
        (
            ("selected", "rows selected"),
            ("complete", "complete"),
            ("stopped", "stopped"),
            ("system_errors", "system errors"),
            ("llm_calls", "LLM calls"),
            ("tokens", "tokens"),
        ),
    )
    for key, label in (("cost_usd", "cost"), ("cost_per_row_mean", "cost per row (mean)")):
        if isinstance(info.get(key), int | float) and not isinstance(info.get(key), bool):
            rows.append((label, esc(_money(_num(info[key])))))
    rows += _scalar_rows(
        info,
        (
            ("seconds_per_row_mean", "seconds per row (mean)"),
            ("seconds_per_row_median", "seconds per row (median)"),
        ),
    )
    parts = [
        '<table class="summary">'
        + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
        + "</table>"
    ]
    baseline = _dict(info.get("baseline"))
    if baseline:
        parts.append(_h(2, "Baseline", "baseline"))
        flat = [
            (esc(k), esc(json.dumps(v, ensure_ascii=False, default=str)[:500]))
            for k, v in list(baseline.items())[:40]
        ]
        parts.append(
            '<table class="baseline">'
            + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in flat)
            + "</table>"
        )
    parts.append(_h(2, "Rows", "rows"))
    parts.append(_row_map(results))
    counts: dict[str, int] = {}
    for row in results:
        if _row_state(row) == "error":
            code = _text(row.get("error_code")) or _text(row.get("status"), "?")
            counts[code] = counts.get(code, 0) + 1
        if _text(row.get("scorer_error")):
            code = f"scorer:{_text(row.get('scorer_error'))}"
            counts[code] = counts.get(code, 0) + 1
    if counts:
        parts.append(_h(3, "Failures by code"))
        parts.append(
            _table(
                ["code", "rows"],
                [[f"<code>{esc(k)}</code>", esc(v)] for k, v in sorted(counts.items())],
                frozenset({1}),
            ).replace("<table>", '<table class="failures">', 1)
        )
    table = []
    for row in results[:MAX_BATCH_ROWS]:
        key = _text(row.get("key"))
        state = _row_state(row)
        table.append(
            [
                esc(_int(row.get("index"))),
                f'<span class="nw">{esc(key[:200])}</span>',
                _badge(state),
                esc(_text(row.get("error_code"))),
                esc(f"{_num(row.get('score')):.2f}"),
                esc(_cap(json.dumps(row.get("prediction"), ensure_ascii=False, default=str), 300)),
                esc(_cap(json.dumps(row.get("expected"), ensure_ascii=False, default=str), 300)),
                esc(_int(row.get("tokens"))),
                esc(_money(_num(row.get("cost_usd")))),
                esc(f"{_num(row.get('total_seconds')):.1f}"),
                _row_link(folder, key),
            ]
        )
    if table:
        head = ["#", "id", "result", "error", "score", "prediction", "expected"]
        head += ["tokens", "cost", "seconds", "run"]
        parts.append(
            _table(head, table, frozenset({0, 4, 7, 8, 9})).replace(
                "<table>", '<table class="rows">', 1
            )
        )
        if len(results) > MAX_BATCH_ROWS:
            parts.append(
                f'<p class="muted">{len(results) - MAX_BATCH_ROWS} more rows not listed.</p>'
            )
        parts.append(
            '<p class="muted">A row\'s run report: <code>mas2c report ROW/mas</code> '
            "(linked here once it exists).</p>"
        )
    if problems:
        _tell(folder, problems)
        items = "".join(f"<li>{esc(p)}</li>" for p in problems[:50])
        parts.append(_h(2, "What could not be read", "problems") + f"<ul>{items}</ul>")
    return title, "\n".join(parts)
