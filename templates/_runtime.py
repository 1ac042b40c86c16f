"""The runtime of a package compiled by mas2c: state, steps, LLM calls, budgets, trace.

This file is copied verbatim into every compiled package, beside the optional modules a
spec needs (``_tools.py``: tool execution and programs; ``_voting.py``; ``_flows.py``),
which the step methods here import when they run. It depends only on
the standard library, ``openai`` and ``httpx``, never on mas2c, so a compiled
system runs anywhere those are installed. ``workflow.py`` drives it::

    async with self.run.step("first", "/workflow/0"):
        self.state["draft"] = await self.run.call("solver", "Solve: {{ question }}")

Every failure is an exception that carries the spec element it came from
(``spec_pointer``), so that ``out.json`` tells the rectifier what to repair.

Checkpoints (resume instead of restart): after each top-level step the state
variables it wrote are saved as a checkpoint, keyed by the sha256 of
(step id, the values of the state variables it reads, and its code hash: the step's
compiled source and the agent, model and tool definitions it names). The compiler
hands these facts over in ``_tables.py`` (``TOP_STEPS``); the runtime never parses
its own package. A run given checkpoints (``--checkpoint-dir``,
``MAS2C_CHECKPOINT_DIR``, ``arun(checkpoint_dir=...)``, or the ``checkpoints/`` folder
of the build folder the package runs from; never inside site-packages) skips
every top-level step whose key matches one of them, restoring its writes instead
(traced as ``step_resumed``). A changed step, or a step whose inputs changed, has
a new key and runs again. Each checkpoint is one JSON file
``{step, pointer, key, writes}``; the runtime also writes new ones into an
explicitly given folder when it can, and appends each as one JSON line to a
checkpoint log (``--checkpoint-log``, ``MAS2C_CHECKPOINT_LOG``; where ``mas2c run``
collects them). The values a step wrote are run content: the trace's ``checkpoint``
event names only the variables (``vars``), and carries their values (``writes``)
only when content is traced (``--trace-content``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import dataclasses
import hashlib
import json
import os
import re
import ssl
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any, NoReturn, TextIO, cast
from urllib.parse import quote

import httpx
import openai

from ._accounting import (
    COST_DIGITS,
    Usage,
    backoff_s,
    call_cost,
    retry_after_s,
    retryable_status,
    should_retry,
)
from ._values import (
    TemplateError,
    as_text,
    input_problems,
    json_type,
    resolve_tree,
)
from ._values import render as _render_with
from ._values import validate as validate_value

__all__ = [
    "AgentDef",
    "BudgetExceeded",
    "Budgets",
    "CheckpointLog",
    "InputError",
    "LLMError",
    "LoopExhausted",
    "ModelDef",
    "NoCredentials",
    "Run",
    "SpecInfo",
    "State",
    "StateVar",
    "StepTimeout",
    "StructuredOutputError",
    "ToolCode",
    "ToolDef",
    "ToolError",
    "TopStep",
    "WorkflowError",
    "field",
    "item",
    "load_checkpoints",
    "lookup",
    "main",
    "recoverable",
    "render",
    "resolve_value",
    "state_scope",
    "truth",
]

GATEWAY_URL = "http://mas2c-gateway/v1"  # the host name is ignored on a unix socket
OUTPUT_CAP = 20_000  # characters of subprocess output kept (head and tail)
JSON_FIXES = 2  # follow-up turns asking for valid JSON before giving up
MAX_RETRY_AFTER_S = 30.0

# --------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class ModelDef:
    """A model of the pool; prices are USD per million tokens (None = unknown, 0)."""

    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    input_per_mtok: float | None = None
    output_per_mtok: float | None = None


@dataclass(frozen=True)
class AgentDef:
    """An agent: a role and instructions (the system prompt) on a model."""

    id: str
    role: str
    instructions: str
    model: str
    temperature: float | None = None
    output: Mapping[str, Any] | None = None  # a JSON Schema, or None for text
    tools: Sequence[str] = ()
    max_tool_rounds: int = 5
    delegates: Sequence[
        str
    ] = ()  # workers offered as function tools (see _delegation.py)
    examples: Sequence[tuple[str, str]] = ()  # few-shot (user, assistant) messages


@dataclass(frozen=True)
class ToolDef:
    """A tool: Python code from the spec (``function``) or a builtin."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    timeout_s: float | None = 10.0
    function: Callable[..., Any] | None = None
    builtin: str | None = None  # "python_exec"


@dataclass(frozen=True)
class Budgets:
    """Limits of one run; None means unlimited."""

    max_llm_calls: int | None = None
    max_total_tokens: int | None = None
    max_cost_usd: float | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class TopStep:
    """A top-level step of the compiled workflow, as the compiler describes it."""

    method: str
    step_id: str
    pointer: str
    code_sha: str  # its compiled methods and the definitions it names, hashed
    reads: Sequence[str] = ()  # the state variables it reads


@dataclass(frozen=True)
class ToolCode:
    """Where a code tool's spec code sits in its module: lines start..end, verbatim."""

    pointer: str
    start: int
    end: int


@dataclass(frozen=True)
class SpecInfo:
    """What the package knows about its spec: inputs, outputs and budgets."""

    name: str
    sha256: str
    inputs: Mapping[str, Mapping[str, Any]]
    outputs: Mapping[str, str]  # output name -> dotted state path
    budgets: Budgets = Budgets()
    # From the compiler (_tables.py): without them a run is never checkpointed.
    top_steps: Sequence[TopStep] = ()
    tool_code: Mapping[str, ToolCode] = dataclass_field(default_factory=dict)
    # Every fixed instruction the runtime sends (_tables.PROMPTS): it holds none itself.
    prompts: Mapping[str, str] = dataclass_field(default_factory=dict)


# ---------------------------------------------------------------------- exceptions


class WorkflowError(Exception):
    """A run failed. ``spec_pointer`` names the spec element at fault (JSON pointer);
    ``code`` is the stable, machine-readable kind of failure (``out.json``'s
    ``error.code``; the rectifier dispatches on it, never on the message): one of
    empty_vote, step_timeout, tool_timeout, tool_error, structured_output, budget_calls,
    budget_tokens, budget_cost, run_timeout, bad_input, llm_error, map_not_list,
    map_overflow, state_type, flow_input, agent_choice, chat_history, internal (and
    interrupted, for a run stopped by a signal).
    """

    code = "internal"

    def __init__(
        self,
        message: str,
        *,
        spec_pointer: str | None = None,
        spec_line: int | None = None,
        step: str | None = None,
        agent: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code or type(self).code
        self.spec_pointer = spec_pointer
        self.spec_line = spec_line  # a line inside tool code, 1-based
        self.step = step
        self.agent = agent


class BudgetExceeded(WorkflowError):
    """A budget of the spec (or the host gateway's) would be overspent: exit 3."""

    code = "budget_calls"  # or budget_tokens, budget_cost: see BUDGET_CODES


# The budget limit -> the error code of overspending it.
BUDGET_CODES = {
    "max_llm_calls": "budget_calls",
    "max_total_tokens": "budget_tokens",
    "max_cost_usd": "budget_cost",
}


class StepTimeout(WorkflowError):
    """A step (code step_timeout), or the whole run (run_timeout), ran out of time: exit 4."""

    code = "step_timeout"


class InputError(WorkflowError):
    """The run's input does not match the spec's inputs: exit 2."""

    code = "bad_input"


class NoCredentials(InputError):
    """No API key and no gateway socket: no request may be sent (exit 2)."""

    code = "no_credentials"


NO_CREDENTIALS = (
    "no LLM credentials: set OPENAI_API_KEY (and OPENAI_BASE_URL for an endpoint other "
    "than OpenAI's), or MAS2C_LLM_SOCKET to a mas2c gateway's socket; library callers "
    "may pass api_key= or llm_socket="
)


class LLMError(WorkflowError):
    """The LLM endpoint failed, after retries where retrying makes sense."""

    code = "llm_error"

    def __init__(self, message: str, *, status: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.status = status


class StructuredOutputError(LLMError):
    """An agent with an output schema kept answering something that is not that JSON."""

    code = "structured_output"


class ToolError(WorkflowError):
    """A tool failed when a ``tool`` step called it (tool_error), or ran out of time
    (tool_timeout)."""

    code = "tool_error"


class EmptyVote(WorkflowError):
    """A majority vote had no answer to count: every answer was empty."""

    code = "empty_vote"


class ConditionError(WorkflowError):
    """A condition (a loop's ``until``, a case's ``when``) could not be evaluated on the
    run's values (a field missing, ``len()`` of a number, an ordering across types)."""

    code = "condition"


class LoopExhausted(WorkflowError):
    """A loop with ``on_exhausted: fail`` reached ``max_iterations`` without its ``until``."""


# -------------------------------------------------------------------------- state

_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)


def _preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field(value: Any, name: str) -> Any:
    """``value.name`` for a dict key or an attribute, with an error that says why not."""
    if isinstance(value, Mapping):
        if name in value:
            return value[name]
        keys = ", ".join(repr(k) for k in list(value)[:20]) or "none"
        raise WorkflowError(f"no field {name!r} in the object (its keys: {keys})")
    if isinstance(value, str | int | float | bool | list | tuple) or value is None:
        kind = "null" if value is None else type(value).__name__
        raise WorkflowError(
            f"cannot read field {name!r} of a {kind} value {_preview(value)}: "
            "only JSON objects have fields (does the agent need an output schema?)"
        )
    try:
        return getattr(value, name)
    except AttributeError:
        raise WorkflowError(
            f"{type(value).__name__} value has no field {name!r}"
        ) from None


def item(value: Any, key: Any) -> Any:
    """``value[key]`` with an error that names the key and the value."""
    try:
        return value[key]
    except (KeyError, IndexError):
        raise WorkflowError(f"no item {key!r} in {_preview(value)}") from None
    except TypeError:
        kind = type(value).__name__
        raise WorkflowError(f"cannot index a {kind} value with {key!r}") from None


def truth(value: Any, path: str) -> bool:
    """A state value a condition uses as true or false (``until: review.passed``): only a
    boolean is one; the string "false" or a number would silently count as true."""
    if isinstance(value, bool):
        return value
    raise WorkflowError(
        f"`{path}` is {json_type(value)} {_preview(value)}, not true or false: a condition "
        "uses only booleans as they are (compare the value instead, e.g. "
        f'`{path} == "yes"`, `len({path}) > 0`, `{path} != null`)'
    )


def lookup(state: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted state path: ``verdict.answer``, ``drafts.0``."""
    name, *rest = path.strip().split(".")
    if name not in state:
        known = ", ".join(sorted(state)) or "none"
        raise WorkflowError(f"unknown state variable {name!r} (set so far: {known})")
    value = state[name]
    for part in rest:
        is_index = part.isdigit() and isinstance(value, list | tuple)
        value = item(value, int(part)) if is_index else field(value, part)
    return value


def _lookup_in(state: Mapping[str, Any]) -> Callable[[str], Any]:
    return lambda path: lookup(state, path)


def render(template: str, state: Mapping[str, Any]) -> str:
    """Fill each ``{{ path }}`` with its text rendering (``_values.render``); everything
    else (single braces too) stays as written, and ``{{ "{{" }}`` is a literal ``{{``.
    """
    try:
        return _render_with(template, _lookup_in(state))
    except TemplateError as exc:
        raise WorkflowError(str(exc)) from None


def resolve_value(value: Any, state: Mapping[str, Any]) -> Any:
    """A value with placeholders filled: a whole placeholder keeps its value's type
    (a list stays a list), a placeholder inside a larger string renders as text."""
    try:
        return resolve_tree(value, _lookup_in(state))
    except TemplateError as exc:
        raise WorkflowError(str(exc)) from None


# ------------------------------------------------------------ state: scopes, reducers

REDUCERS = ("replace", "append", "merge", "add")


@dataclass(frozen=True)
class StateVar:
    """A declared state variable (the spec's ``state``): how writes combine
    (``reducer``), its value before any write and its JSON Schema."""

    reducer: str = "replace"
    initial: Any = None
    schema: Mapping[str, Any] | None = None
    bound: bool = True  # whether it has a value before its first write


def reduce_value(name: str, reducer: str, current: Any, value: Any) -> Any:
    """``current`` combined with a written ``value``: replace, append (the value becomes
    the list's last item), merge (the object's keys overwrite), add (numbers)."""
    if reducer == "append" and isinstance(current, list):
        return [*current, value]
    if reducer == "merge" and isinstance(current, dict) and isinstance(value, dict):
        return {**current, **value}
    if (
        reducer == "add"
        and json_type(current) in ("integer", "number")
        and json_type(value) in ("integer", "number")
    ):
        return current + value
    if reducer == "replace":
        return value
    raise WorkflowError(
        f"state variable {name!r} (reducer {reducer}) cannot combine "
        f"{json_type(current)} {_preview(current)} with {json_type(value)} {_preview(value)}",
        code="state_type",
    )


class _Scope:
    """One level of the state: its own variables over its parent's (a map item, a
    parallel branch, a step attempt). Writes to declared variables are also logged, to
    be replayed through their reducers on the parent when the scope is absorbed."""

    def __init__(
        self, parent: _Scope | None, values: dict[str, Any], owner: object
    ) -> None:
        self.parent = parent
        self.values = values
        self.owner = owner
        self.log: list[tuple[str, Any]] = []

    def find(self, name: str) -> _Scope | None:
        scope: _Scope | None = self
        while scope is not None and name not in scope.values:
            scope = scope.parent
        return scope


# The innermost scope each task runs in: concurrent map items and branches see their own.
_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "mas2c_scope", default=None
)


class State(MutableMapping[str, Any]):
    """The run's state: inputs, declared variables and each step's ``out``.

    ``state[name] = value`` writes a declared variable through its reducer (and checks
    the result against its schema); any other variable is replaced. Inside a map item,
    a parallel branch or a step attempt (``scope()``) reads see the enclosing state and
    writes stay in the scope until ``absorb()`` replays them on the parent, in order:
    so concurrent writes combine deterministically (input order, branch order).
    """

    def __init__(
        self, values: Mapping[str, Any] | None = None, *, share: bool = False
    ) -> None:
        # share: the state writes into ``values`` itself (a flow's dict), not into a copy.
        own = values if share and isinstance(values, dict) else dict(values or {})
        self._root = _Scope(None, own, self)
        self.declared: dict[str, StateVar] = {}

    def declare(self, variables: Mapping[str, StateVar]) -> None:
        """Declare variables; those with an initial value get it now."""
        for name, var in variables.items():
            self.declared[name] = var
            if var.bound:
                self._root.values[name] = copy.deepcopy(var.initial)

    def _current(self) -> _Scope:
        scope = _SCOPE.get()
        return scope if scope is not None and scope.owner is self else self._root

    def __getitem__(self, name: str) -> Any:
        found = self._current().find(name)
        if found is None:
            raise KeyError(name)
        return found.values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        scope = self._current()
        var = self.declared.get(name)
        if var is None:
            scope.values[name] = value
            return
        found = scope.find(name)
        if found is not None and var.reducer != "replace":
            value_now = reduce_value(name, var.reducer, found.values[name], value)
        else:
            value_now = value
        if var.schema is not None:
            problems = validate_value(value_now, var.schema)
            if problems:
                raise WorkflowError(
                    f"state variable {name!r}: {problems[0]}", code="state_type"
                )
        scope.values[name] = value_now
        if scope.parent is not None:
            scope.log.append((name, value))

    def __delitem__(self, name: str) -> None:
        del self._current().values[name]

    def __iter__(self) -> Iterator[str]:
        names: dict[str, None] = {}
        scope: _Scope | None = self._current()
        while scope is not None:
            names.update(dict.fromkeys(scope.values))
            scope = scope.parent
        return iter(names)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def restore(self, values: Mapping[str, Any]) -> None:
        """Set values as they are, bypassing reducers (a checkpoint's final values)."""
        self._current().values.update(values)

    @contextlib.contextmanager
    def scope(self, values: Mapping[str, Any] | None = None) -> Iterator[_Scope]:
        """A scope over the current one for the code inside (in this task only)."""
        child = _Scope(self._current(), dict(values or {}), self)
        token = _SCOPE.set(child)
        try:
            yield child
        finally:
            _SCOPE.reset(token)

    def absorb(self, child: _Scope, *, keep: bool, drop: Sequence[str] = ()) -> None:
        """Apply a finished scope to its parent: its writes to declared variables, replayed
        through their reducers in order; with ``keep``, its other variables too."""
        token = _SCOPE.set(child.parent)
        try:
            if keep:
                for name, value in child.values.items():
                    if name not in self.declared and name not in drop:
                        self[name] = value
            for name, value in child.log:
                self[name] = value
        finally:
            _SCOPE.reset(token)


# ---------------------------------------------------------------------- accounting
# Usage/cost accounting and the retry policy are _accounting.py: the same code the host's
# LLM gateway counts with (mas2c.accounting), so result.json and usage.json agree.


# -------------------------------------------------------------------------- trace


class Trace:
    """A JSONL event log; one ``write`` per line under a lock, so lines never interleave.

    Every record has ``t`` (seconds since the run started) and ``ts`` (wall clock,
    Unix seconds). The run is one OpenTelemetry-compatible trace: ``trace_id`` (32
    hex digits) and the run's own span (16 hex), whose parent is the host's span when
    ``MAS2C_TRACEPARENT`` (W3C ``traceparent`` format) is set. Prompts and completions
    are traced only when ``content`` is on (``--trace-content`` or
    ``MAS2C_TRACE_CONTENT=1``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        content: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._file: TextIO | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # Kept open for the whole run, closed by close().
            self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115
        # Called with each record as written (a copy of the JSON line's data).
        self.on_event = on_event
        self.callback_error: str | None = None  # why on_event was turned off
        self._t0 = time.monotonic()
        self._lock = threading.RLock()  # reentrant: on_event may emit
        self.content = content
        parent = _traceparent(os.environ.get(TRACEPARENT_ENV, ""))
        self.trace_id = parent[0] if parent else new_trace_id()
        self.parent_span = parent[1] if parent else None
        self.root_span = new_span_id()

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def emit(self, event: str, **fields: Any) -> None:
        if self._file is None and self.on_event is None:
            return
        record = {
            "t": round(self.elapsed(), 3),
            "ts": round(time.time(), 6),
            "event": event,
            **fields,
        }
        line = json.dumps(record, ensure_ascii=False, default=str)
        # Readers that split on every Unicode line break (str.splitlines) must see one
        # record per line, so escape the breaks JSON itself leaves raw.
        line = (
            line.replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
            .replace("\x85", "\\u0085")
        )
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
            if self.on_event is not None:
                self._notify(self.on_event, line)

    def _notify(self, callback: Callable[[dict[str, Any]], None], line: str) -> None:
        """Hand a record to ``on_event``; one that raises is turned off (the run goes on)."""
        try:
            callback(json.loads(line))
        except Exception as exc:
            self.on_event = None
            self.callback_error = f"{type(exc).__name__}: {exc}"[:500]

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                with contextlib.suppress(OSError):  # e.g. a pipe or /dev/stdout
                    os.fsync(self._file.fileno())
                self._file.close()
                self._file = None


# ----------------------------------------------------------------------- spans

TRACEPARENT_ENV = "MAS2C_TRACEPARENT"
TRACE_CONTENT_ENV = "MAS2C_TRACE_CONTENT"
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")

# The span each task is in, and its round/sample labels: ContextVars, so that
# concurrent branches, samples and debaters each see their own.
_SPAN: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mas2c_span", default=None
)
_LABELS: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "mas2c_labels", default=None
)


def new_trace_id() -> str:
    return os.urandom(16).hex()


def new_span_id() -> str:
    return os.urandom(8).hex()


def _traceparent(value: str) -> tuple[str, str] | None:
    """(trace id, parent span id) of a W3C traceparent; None if malformed or all-zero."""
    match = _TRACEPARENT.match(value.strip().lower())
    if not match or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return match.group(1), match.group(2)


@dataclass
class _Span:
    """A span being timed: ids, wall-clock start, monotonic start."""

    span_id: str
    parent_id: str
    start_ts: float
    started: float

    def fields(self) -> dict[str, Any]:
        return {
            "span_id": self.span_id,
            "parent_id": self.parent_id,
            "start_ts": round(self.start_ts, 6),
        }

    def duration(self) -> float:
        return round(time.monotonic() - self.started, 3)


def _open_span(trace: Trace) -> _Span:
    """A new child of the current span (a step), else of the run's span."""
    parent = _SPAN.get() or trace.root_span
    return _Span(new_span_id(), parent, time.time(), time.monotonic())


async def _labelled(aw: Awaitable[Any], **labels: Any) -> Any:
    """Await with round/sample labels on every LLM call made inside."""
    token = _LABELS.set({**(_LABELS.get() or {}), **labels})
    try:
        return await aw
    finally:
        _LABELS.reset(token)


CONTENT_CAP = 1_000_000  # characters of one event's traced content, in JSON
_TOO_LARGE = "[too large to trace]"


def _shrunk(value: Any, text_cap: int, depth: int = 0) -> Any:
    """Strings capped, lists and objects cut to 100 items, nesting to 8 levels."""
    if isinstance(value, str):
        return _cap(value, text_cap)
    if depth >= 8:
        return _cap(repr(value), text_cap)
    if isinstance(value, Mapping):
        items = list(value.items())[:100]
        return {str(k)[:200]: _shrunk(v, text_cap, depth + 1) for k, v in items}
    if isinstance(value, list | tuple):
        kept = list(value) if len(value) <= 100 else [value[0], *value[-99:]]
        return [_shrunk(v, text_cap, depth + 1) for v in kept]
    return value


def _content(value: Any) -> Any:
    """A prompt, completion or tool value as traced (opt-in): at most CONTENT_CAP in JSON.

    Smaller caps per string are tried until it fits, and the shape is kept (a list
    stays a list), so a reader's schema of the trace holds whatever the model said.
    """
    for text_cap in (OUTPUT_CAP, 2_000, 200):
        traced = _shrunk(value, text_cap)
        size = len(json.dumps(traced, ensure_ascii=False, default=str))
        if size <= CONTENT_CAP:
            return traced
    if isinstance(value, list | tuple):
        return [{"role": "mas2c", "content": _TOO_LARGE}]
    if isinstance(value, Mapping):
        return {"content": _TOO_LARGE}
    return _TOO_LARGE


def _traced_error(exc: BaseException, content: bool) -> str:
    """An error as the trace shows it. Its message may quote run content (an answer, a
    tool's arguments, a state value), so only with content traced; else its type, the
    runtime's code and an HTTP status (what the full message is in out.json)."""
    if content:
        return f"{type(exc).__name__}: {exc}"[:500]
    parts = [type(exc).__name__]
    code = getattr(exc, "code", None)
    if isinstance(exc, WorkflowError) and isinstance(code, str):
        parts.append(f"({code})")
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool):
        parts.append(f"(HTTP {status})")
    return " ".join(parts)


# The step each task is in: a ContextVar, so concurrent branches see their own.
_STEP: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "mas2c_step", default=None
)

# The LLM request overrides of the steps each task is in (a step's `settings`).
_SETTINGS: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "mas2c_settings", default=None
)
_REQUEST_SETTINGS = ("max_tokens", "stop", "top_p", "seed")


def _with_settings(agent: AgentDef) -> AgentDef:
    """The agent as the current step's ``settings`` override it (model, temperature)."""
    settings = _SETTINGS.get()
    if not settings:
        return agent
    changes = {k: settings[k] for k in ("model", "temperature") if k in settings}
    return dataclasses.replace(agent, **changes) if changes else agent


def _chat_history(value: Any, pointer: str | None) -> list[dict[str, str]]:
    """A chat history as messages; anything else is a located ``chat_history`` error."""
    if not isinstance(value, list):
        raise WorkflowError(
            f"a chat history is a list of {{role, content}} messages, got {json_type(value)}",
            spec_pointer=pointer,
            code="chat_history",
        )
    messages = []
    for index, item in enumerate(value):
        ok = isinstance(item, Mapping) and item.get("role") in ("user", "assistant")
        if not ok or not isinstance(item.get("content"), str):
            raise WorkflowError(
                f"message {index} of the chat history is not "
                '{"role": "user"|"assistant", "content": "<text>"}',
                spec_pointer=pointer,
                code="chat_history",
            )
        messages.append({"role": str(item["role"]), "content": str(item["content"])})
    return messages


# The state of the flow (named sub-workflow) each task runs in; None: the workflow's.
_FLOW_STATE: contextvars.ContextVar[State | None] = contextvars.ContextVar(
    "mas2c_flow_state", default=None
)


@contextlib.contextmanager
def state_scope(state: dict[str, Any]) -> Iterator[None]:
    """Steps run inside see ``state`` as ``Run.state`` (a flow's own state; its writes
    land in ``state`` itself)."""
    token = _FLOW_STATE.set(State(state, share=True))
    try:
        yield
    finally:
        _FLOW_STATE.reset(token)


# The map items each task is in (outermost first): traced with every step inside them.
_ITEM: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar(
    "mas2c_item", default=()
)
# The loop iterations each task is in (1-based, outermost first): traced likewise.
_ITERATION: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar(
    "mas2c_iteration", default=()
)
# The attempt of a step with ``retry``/``fallback`` being made: (pointer, number, of).
_ATTEMPT: contextvars.ContextVar[tuple[str, int, int] | None] = contextvars.ContextVar(
    "mas2c_attempt", default=None
)


def _step_labels(pointer: str) -> dict[str, Any]:
    """What places a step's span among its repeats: the map ``item`` and loop
    ``iteration`` paths it runs in, the ``sample`` of an ensemble over a flow, and
    its ``attempt`` (of ``attempts``) when the step has ``retry``/``fallback``."""
    labels: dict[str, Any] = {}
    if _ITEM.get():
        labels["item"] = list(_ITEM.get())
    if _ITERATION.get():
        labels["iteration"] = list(_ITERATION.get())
    sample = (_LABELS.get() or {}).get("sample")
    if sample is not None:
        labels["sample"] = sample
    attempt = _ATTEMPT.get()
    if attempt is not None and attempt[0] == pointer:
        labels["attempt"], labels["attempts"] = attempt[1], attempt[2]
    return labels


def _where() -> dict[str, str | None]:
    current = _STEP.get()
    return {"step": current[0], "pointer": current[1]} if current else {}


def _tag(exc: BaseException, pointer: str | None, step: str | None) -> None:
    """Record where an exception came from; the innermost step (first to tag) wins."""
    for name, value in (("spec_pointer", pointer), ("step", step)):
        if getattr(exc, name, None) is None and value is not None:
            # Any exception can be tagged, not only ours (a few builtins refuse).
            with contextlib.suppress(AttributeError):
                setattr(exc, name, value)


# -------------------------------------------------------------------- LLM helpers


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


@dataclass(frozen=True)
class ClientSettings:
    """How one run reaches its LLM: through a gateway's unix socket (``socket``: the host
    holds the key), or directly (``base_url``, ``api_key``). Resolved once per run by
    ``client_settings()``; nothing reads the environment after that."""

    base_url: str | None = None
    api_key: str | None = None
    socket: str | None = None
    timeout_s: float = 120.0  # per request
    max_attempts: int = 4  # per request; behind a socket the gateway retries instead
    retry_base_s: float = 0.5  # first backoff; doubles per attempt

    @property
    def has_credentials(self) -> bool:
        """A socket, or a key: without either no request may be sent."""
        return bool(self.socket) or bool(self.api_key)


def client_settings(
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    socket: str | None = None,
) -> ClientSettings:
    """The settings of a run: arguments first, then the environment (``OPENAI_BASE_URL``,
    ``OPENAI_API_KEY``, ``MAS2C_LLM_SOCKET``, ``MAS2C_LLM_TIMEOUT_S``, ``MAS2C_MAX_ATTEMPTS``,
    ``MAS2C_RETRY_BASE_S``). A ``base_url`` argument means a direct connection, so an
    environment socket is then not used."""
    env = os.environ
    if socket is None and base_url is None:
        socket = env.get("MAS2C_LLM_SOCKET") or None
    return ClientSettings(
        base_url=base_url or env.get("OPENAI_BASE_URL") or None,
        api_key=api_key or env.get("OPENAI_API_KEY") or None,
        socket=socket or None,
        timeout_s=_env_number("MAS2C_LLM_TIMEOUT_S", 120.0),
        max_attempts=max(1, int(_env_number("MAS2C_MAX_ATTEMPTS", 4))),
        retry_base_s=_env_number("MAS2C_RETRY_BASE_S", 0.5),
    )


def _make_client(settings: ClientSettings) -> openai.AsyncOpenAI:
    """The OpenAI client: direct, or through the host gateway's unix socket."""
    timeout = settings.timeout_s
    socket_path = settings.socket
    if socket_path:
        # Inside the sandbox the socket is the only way out; the host holds the key.
        # Plain HTTP on a unix socket: a context with no trust store (any TLS would fail)
        # spares loading the CA bundle, ~30 ms per run.
        no_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        transport = httpx.AsyncHTTPTransport(uds=socket_path, verify=no_tls)
        http = httpx.AsyncClient(transport=transport, timeout=timeout)
        return openai.AsyncOpenAI(
            base_url=GATEWAY_URL,
            api_key="sandbox",
            max_retries=0,
            timeout=timeout,
            # Recent openai releases type this as httpx2 but accept an httpx client.
            http_client=cast(Any, http),
        )
    if not settings.api_key:  # checked before the run starts; never a placeholder key
        raise NoCredentials(NO_CREDENTIALS)
    # Each run has its own client and connections; the TLS context (the CA bundle, which
    # takes ~45 ms to load) is made once per process and shared, read-only.
    http_client = openai.DefaultAsyncHttpxClient(verify=_tls_context(), timeout=timeout)
    return openai.AsyncOpenAI(
        base_url=settings.base_url,
        api_key=settings.api_key,
        max_retries=0,  # we retry ourselves, with tracing and budget checks
        timeout=timeout,
        http_client=http_client,
    )


@cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (its CA bundle; SSL_CERT_FILE/SSL_CERT_DIR honoured)."""
    make = getattr(httpx, "create_ssl_context", None)  # public since httpx 0.28
    if make is None:
        return ssl.create_default_context()
    context: ssl.SSLContext = make()
    return context


class _Malformed(Exception):
    """A 200 response without a usable completion: retried like a server error."""


def _is_retryable(exc: Exception, behind_gateway: bool) -> bool:
    """Whether to try again: the server's ``x-should-retry`` verdict first. Behind the
    gateway's socket only that verdict counts (the gateway is the one layer that retries
    a failing upstream, and says ``false`` on every error it answers)."""
    response = getattr(exc, "response", None)
    verdict = should_retry(response.headers) if response is not None else None
    if verdict is not None:
        return verdict
    if behind_gateway:
        return False
    if isinstance(exc, openai.APIStatusError):
        return retryable_status(exc.status_code)
    # APITimeoutError is an APIConnectionError; a body that is not JSON is a ValueError.
    retryable = (openai.APIConnectionError, openai.APIResponseValidationError)
    return isinstance(exc, (*retryable, httpx.TransportError, ValueError, _Malformed))


def _backoff(attempt: int, exc: Exception, base: float) -> float:
    response = getattr(exc, "response", None)
    hinted = retry_after_s(response.headers) if response is not None else None
    return backoff_s(attempt, base, MAX_RETRY_AFTER_S, hinted)


def _error_code(exc: openai.APIStatusError) -> str | None:
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        code = inner.get("code") if isinstance(inner, Mapping) else None
        return str(code) if code is not None else None
    return None


def _error_param(exc: openai.APIStatusError) -> str | None:
    """The ``param`` of an OpenAI-style error body (the gateway names a budget limit)."""
    body = exc.body
    inner = body.get("error", body) if isinstance(body, Mapping) else None
    param = inner.get("param") if isinstance(inner, Mapping) else None
    return param if isinstance(param, str) else None


def _schema_name(agent_id: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]", "_", agent_id)[:64] or "output"


def _escape_token(name: str) -> str:
    """A JSON pointer token (RFC 6901)."""
    return name.replace("~", "~0").replace("/", "~1")


def _system_prompt(agent: AgentDef) -> str:
    return "\n\n".join(part for part in (agent.role, agent.instructions) if part)


def _with_schema_in_system(
    messages: list[dict[str, Any]], note: str
) -> list[dict[str, Any]]:
    """JSON-object mode cannot carry a schema: tell the model in the system prompt."""
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


# ----------------------------------------------------------------- structured output

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n(.*?)```", re.DOTALL)


def _extract_json(text: str) -> Any:
    """The JSON in an answer: fenced, bare, or the first ``{...}`` inside prose."""
    fenced = _FENCE.search(text)
    candidate = fenced.group(1) if fenced else text
    try:
        return json.loads(candidate)
    except ValueError as exc:
        first_error = exc
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        with contextlib.suppress(ValueError):
            value, _ = decoder.raw_decode(text, match.start())
            if isinstance(value, dict):
                return value
    raise ValueError(f"not JSON ({first_error})")


def parse_structured(text: str, schema: Mapping[str, Any]) -> Any:
    """Parse an answer and validate it against the agent's whole output schema
    (types, enums, ``required`` at every depth, ``additionalProperties``)."""
    value = _extract_json(text)
    problems = validate_value(value, schema)
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"the JSON does not match the output schema: {shown}{more}")
    return value


# -------------------------------------------------------------------------- voting
# Majority and first-answer voting are _voting.py, shipped only with ensembles and debates.


def _numbered(answers: Sequence[Any], labels: Sequence[str]) -> str:
    return "\n\n".join(
        f"[{i}] {label}\n{as_text(a)}"
        for i, (label, a) in enumerate(zip(labels, answers, strict=True), 1)
    )


# --------------------------------------------------------------------- subprocesses


def _cap(text: str, limit: int = OUTPUT_CAP) -> str:
    """Keep the head and the tail: tracebacks end at the bottom."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return (
        f"{text[:half]}\n... [{len(text) - limit} characters cut] ...\n{text[-half:]}"
    )


# -------------------------------------------------------------------------- tools


def _tool_schema(tool: ToolDef) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": dict(tool.parameters),
        },
    }


def _assistant_message(message: Any) -> dict[str, Any]:
    """The assistant's tool-calling turn, as it must be replayed to the model."""
    calls = []
    for call in message.tool_calls or []:
        function = getattr(call, "function", None)
        if function is not None:
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": function.name,
                        "arguments": function.arguments,
                    },
                }
            )
    return {"role": "assistant", "content": message.content, "tool_calls": calls}


# --------------------------------------------------------------------- checkpoints

CHECKPOINT_ENV = "MAS2C_CHECKPOINT_DIR"
CHECKPOINT_LOG_ENV = "MAS2C_CHECKPOINT_LOG"
_ABSENT = "<absent>"  # how a read variable that is not set enters a checkpoint key


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr
    )


def checkpoint_key(top: TopStep, state: Mapping[str, Any]) -> str:
    """The key of a top-level step's checkpoint: its id, its code hash and the values of
    the state variables it reads (nothing else of the state)."""
    reads = {name: state.get(name, _ABSENT) for name in top.reads}
    return _sha256(
        _canonical({"step": top.step_id, "reads": reads, "code": top.code_sha})
    )


def load_checkpoints(folder: Path | None) -> dict[str, dict[str, Any]]:
    """Checkpoints in a folder (``*.json``, each ``{step, pointer, key, writes}``) by key."""
    found: dict[str, dict[str, Any]] = {}
    if folder is None or not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("key"), str)
            and isinstance(record.get("writes"), dict)
        ):
            found[record["key"]] = record
    return found


def checkpoint_dir(given: str | os.PathLike[str] | None) -> tuple[Path | None, bool]:
    """(folder, explicit): ``--checkpoint-dir``, else $MAS2C_CHECKPOINT_DIR, else (read
    only) the ``checkpoints/`` folder of the build folder the package runs from: the folder
    ``mas2c compile`` wrote, holding ``MANIFEST.json`` beside the package (where ``mas2c
    rectify`` offers them). An installed package (site-packages) has none."""
    chosen = given or os.environ.get(CHECKPOINT_ENV)
    if chosen:
        return Path(chosen), True
    build = Path(__file__).resolve().parent.parent
    beside = build / "checkpoints"
    is_build = (build / "MANIFEST.json").is_file()
    return (beside, False) if is_build and beside.is_dir() else (None, False)


class CheckpointLog:
    """A JSONL file of the run's checkpoints (``{step, pointer, key, writes}`` a line),
    created empty when the run starts; each line is flushed as it is written. It holds
    the values the steps wrote (run content), unlike the trace without content."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Kept open for the whole run, closed by close().
        self._file: TextIO | None = open(path, "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps(record, ensure_ascii=False)
        line = (  # one record per line, also for readers that split on U+2028
            line.replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
            .replace("\x85", "\\u0085")
        )
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _json_clean(value: Any) -> bool:
    """Whether a value survives a JSON round trip unchanged (only then is it checkpointed)."""
    try:
        return bool(json.loads(json.dumps(value, ensure_ascii=False)) == value)
    except (TypeError, ValueError, RecursionError):
        return False


# ---------------------------------------------------------------------------- run


class Run:
    """One execution of a workflow: state, LLM client, accounting, trace."""

    def __init__(
        self,
        spec: SpecInfo,
        agents: Mapping[str, AgentDef],
        models: Mapping[str, ModelDef],
        tools: Mapping[str, ToolDef],
        *,
        inputs: Mapping[str, Any] | None = None,
        trace: Trace | None = None,
        checkpoints: Mapping[str, Mapping[str, Any]] | None = None,
        checkpoint_out: Path | None = None,
        checkpoint_log: CheckpointLog | None = None,
        budgets: Budgets | None = None,
        client: ClientSettings | None = None,
    ) -> None:
        self.spec = spec
        self.agents = agents
        self.models = models
        self.tools = tools
        self.budgets = budgets or spec.budgets  # the caller's, tightened (see _api.py)
        self.client_settings = client or client_settings()
        self._state = State(inputs)
        self.trace = trace or Trace(None)
        self._usage = Usage()
        self._in_flight = 0  # requests sent, not yet answered: they hold a call slot
        self._client: openai.AsyncOpenAI | None = None
        self._json_object_only: set[str] = set()  # models that refused json_schema
        # The innermost step running when the run was cancelled (global timeout).
        self.interrupted_step: tuple[str, str] | None = None
        # Saved top-level step results by key, and where to save new ones (optional).
        self.checkpoints: dict[str, Mapping[str, Any]] = dict(checkpoints or {})
        self.checkpoint_out = checkpoint_out
        self.checkpoint_log = checkpoint_log
        # What a run that succeeded should still say (e.g. a loop that ran out).
        self.warnings: list[dict[str, Any]] = []

    @property
    def state(self) -> State:
        """The state steps read and write: the workflow's, or inside a flow the flow's."""
        scoped = _FLOW_STATE.get()
        return self._state if scoped is None else scoped

    # ------------------------------------------------------------------ lifecycle

    async def execute(self, workflow_cls: Callable[[Run], Any]) -> None:
        """Run the workflow under the global time budget; always close the client."""
        limit = self.budgets.timeout_s
        try:
            async with asyncio.timeout(limit) as scope:
                self.state.declare(getattr(workflow_cls, "STATE", {}))
                workflow = workflow_cls(self)
                for top in self.spec.top_steps:
                    method = getattr(workflow, top.method, None)
                    if method is not None:
                        setattr(workflow, top.method, self._checkpointed(top, method))
                await workflow.run_workflow()
        except TimeoutError as exc:
            if not scope.expired():
                raise
            step = self.interrupted_step
            raise StepTimeout(
                f"the run exceeded its time budget of {limit} s",
                spec_pointer="/budgets/timeout_s",
                step=step[0] if step else None,
                code="run_timeout",
            ) from exc
        finally:
            await self.aclose()

    def _checkpointed(
        self, top: TopStep, method: Callable[[], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        """A top-level step method that resumes from a checkpoint or leaves one."""

        async def step() -> None:
            key = checkpoint_key(top, self.state)
            saved = self.checkpoints.get(key)
            if saved is not None:
                writes = copy.deepcopy(dict(saved["writes"]))
                self.state.restore(writes)
                self.trace.emit(
                    "step_resumed", step=top.step_id, pointer=top.pointer, key=key
                )
                self._checkpoint(top, key, writes)
                return
            before = copy.deepcopy(dict(self.state))
            await method()
            # Compared as JSON, not with ==: 1 == 1.0 == True, and a write that changes
            # only the type (1 -> true) must be saved, or a resumed run holds the old one.
            writes = {
                k: v
                for k, v in self.state.items()
                if k not in before or _canonical(before[k]) != _canonical(v)
            }
            self._checkpoint(top, key, writes)

        return step

    def _checkpoint(self, top: TopStep, key: str, writes: dict[str, Any]) -> None:
        if not _json_clean(writes):
            return
        record = {"step": top.step_id, "pointer": top.pointer, "key": key}
        # The values are run content: in the trace only when content is traced.
        content = {"writes": writes} if self.trace.content else {}
        self.trace.emit("checkpoint", **record, vars=sorted(writes), **content)
        if self.checkpoint_log is not None:
            with contextlib.suppress(OSError, ValueError):
                self.checkpoint_log.write({**record, "writes": writes})
        if self.checkpoint_out is not None:
            with contextlib.suppress(OSError):
                _write_json_atomic(
                    self.checkpoint_out / f"{key}.json", {**record, "writes": writes}
                )

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def usage(self) -> dict[str, Any]:
        return self._usage.as_dict()

    # ---------------------------------------------------------------------- steps

    @contextlib.asynccontextmanager
    async def step(
        self,
        step_id: str,
        pointer: str,
        timeout_s: float | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[None]:
        """Trace a step, enforce its timeout, and tag escaping errors with its pointer.
        ``settings`` override the LLM requests made inside (an inner step's win)."""
        outer = _SETTINGS.get()
        settings_token = (
            _SETTINGS.set({**(outer or {}), **settings}) if settings else None
        )
        token = _STEP.set((step_id, pointer))
        span = _open_span(self.trace)
        span_token = _SPAN.set(span.span_id)
        ids = {"span_id": span.span_id, "parent_id": span.parent_id}
        labels = _step_labels(pointer)  # item, iteration, sample, attempt
        self.trace.emit("step_start", step=step_id, pointer=pointer, **ids, **labels)
        status, error, code = "error", None, None
        try:
            async with asyncio.timeout(timeout_s) as scope:
                yield
            status = "ok"
        except TimeoutError as exc:
            error = type(exc).__name__
            if not scope.expired():
                code = error_code(exc)
                _tag(exc, pointer, step_id)
                raise
            code = "step_timeout"
            raise StepTimeout(
                f"step {step_id!r} timed out after {timeout_s} s",
                spec_pointer=pointer,
                step=step_id,
            ) from exc
        except asyncio.CancelledError:
            error = "cancelled"
            code = "cancelled"
            self.interrupted_step = self.interrupted_step or (step_id, pointer)
            raise
        except Exception as exc:
            error, code = type(exc).__name__, error_code(exc)
            _tag(exc, pointer, step_id)
            raise
        finally:
            _STEP.reset(token)
            _SPAN.reset(span_token)
            if settings_token is not None:
                _SETTINGS.reset(settings_token)
            self.trace.emit(
                "step_end",
                step=step_id,
                pointer=pointer,
                status=status,
                duration_s=span.duration(),
                **span.fields(),
                **labels,
                **({"error": error, "code": code} if error else {}),
            )

    @contextlib.contextmanager
    def iteration(self, number: int) -> Iterator[None]:
        """A ``loop`` iteration (1-based): traced with every step run inside it."""
        token = _ITERATION.set((*_ITERATION.get(), number))
        try:
            yield
        finally:
            _ITERATION.reset(token)

    def holds(self, check: Callable[[], object], pointer: str, step_id: str) -> bool:
        """Whether a condition holds; one that cannot be evaluated is a ``ConditionError``
        at the condition (``pointer``), never an ``internal`` error."""
        try:
            return bool(check())
        except WorkflowError as exc:
            if type(exc) is not WorkflowError:
                raise
            message = str(exc)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            message = f"{type(exc).__name__}: {exc}"
        raise ConditionError(
            f"the condition at {pointer} cannot be evaluated: {message}",
            spec_pointer=pointer,
            step=step_id,
        ) from None

    def loop_exhausted(
        self, step_id: str, pointer: str, max_iterations: int, *, fail: bool = False
    ) -> None:
        """A loop ran ``max_iterations`` times and its ``until`` never held: traced as
        ``loop_exhausted``, listed under ``warnings`` in out.json, or (``fail``) an error.
        """
        message = (
            f"loop {step_id!r} reached max_iterations ({max_iterations}) "
            "without its `until` holding"
        )
        self.trace.emit(
            "loop_exhausted",
            step=step_id,
            pointer=pointer,
            max_iterations=max_iterations,
            failed=fail,
        )
        if fail:
            raise LoopExhausted(message, spec_pointer=f"{pointer}/until", step=step_id)
        self.warnings.append(
            {
                "type": "loop_exhausted",
                "step": step_id,
                "pointer": pointer,
                "max_iterations": max_iterations,
                "message": message,
            }
        )

    async def gather(self, *aws: Awaitable[Any]) -> list[Any]:
        """Run concurrently; on the first failure cancel the rest and raise it."""
        tasks = [asyncio.ensure_future(aw) for aw in aws]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def branches(self, *aws: Awaitable[Any]) -> list[Any]:
        """``parallel`` branches: concurrently, each in a scope of its own, whose writes
        reach the state afterwards in branch order (declared variables through their
        reducers), so concurrent appends combine deterministically."""

        async def scoped(aw: Awaitable[Any]) -> tuple[Any, _Scope]:
            with self.state.scope() as scope:
                return await aw, scope

        done = await self.gather(*(scoped(aw) for aw in aws))
        for _result, scope in done:
            self.state.absorb(scope, keep=True)
        return [result for result, _scope in done]

    async def map(
        self,
        step_id: str,
        pointer: str,
        items: Any,
        body: Callable[[], Awaitable[Any]],
        *,
        item: str,
        index: str,
        max_concurrency: int,
        max_items: int,
        truncate: bool = False,
    ) -> list[Any]:
        """``map`` step: ``body`` once per item, at most ``max_concurrency`` at once, each
        in a scope holding ``item`` and ``index``; the results in input order. What the
        body writes stays in its item, except declared variables with a combining
        reducer, which reach the state afterwards in input order."""
        if not isinstance(items, list):
            raise WorkflowError(
                f"map {step_id!r}: `over` is {json_type(items)} {_preview(items)}, not a list",
                spec_pointer=f"{pointer}/over",
                code="map_not_list",
            )
        if len(items) > max_items:
            self._map_overflow(step_id, pointer, len(items), max_items, truncate)
            items = items[:max_items]
        self.trace.emit(
            "map_start",
            step=step_id,
            pointer=pointer,
            items=len(items),
            max_concurrency=max_concurrency,
        )
        slots = asyncio.Semaphore(max_concurrency)

        async def one(position: int, value: Any) -> tuple[Any, _Scope]:
            async with slots:
                with self.state.scope({item: value, index: position}) as scope:
                    token = _ITEM.set((*_ITEM.get(), position))
                    try:
                        return await body(), scope
                    finally:
                        _ITEM.reset(token)

        done = await self.gather(*(one(i, value) for i, value in enumerate(items)))
        for _result, scope in done:
            self.state.absorb(scope, keep=False)
        return [result for result, _scope in done]

    def _map_overflow(
        self, step_id: str, pointer: str, count: int, max_items: int, truncate: bool
    ) -> None:
        """A list longer than ``max_items``: an error, or (``truncate``) a visible cut."""
        message = (
            f"map {step_id!r} got {count} items, more than max_items ({max_items})"
        )
        self.trace.emit(
            "map_truncated" if truncate else "map_overflow",
            step=step_id,
            pointer=pointer,
            items=count,
            max_items=max_items,
        )
        if not truncate:
            raise WorkflowError(
                message, spec_pointer=f"{pointer}/max_items", code="map_overflow"
            )
        self.warnings.append(
            {
                "type": "map_truncated",
                "step": step_id,
                "pointer": pointer,
                "items": count,
                "max_items": max_items,
                "message": message + f": only the first {max_items} were mapped",
            }
        )

    async def guarded(
        self,
        step_id: str,
        pointer: str,
        attempt: Callable[[], Awaitable[None]],
        *,
        retry: int = 0,
        fallback: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """A step with ``retry`` and/or ``fallback``: each attempt runs in a scope of its
        own (a failed attempt's writes are discarded); after ``retry`` failed retries,
        ``fallback`` runs with the error as ``error``. Only recoverable failures are
        retried (see ``recoverable``); the trace shows each failure and the fallback."""
        for number in range(1, retry + 2):
            token = _ATTEMPT.set((pointer, number, retry + 1))
            try:
                with self.state.scope() as scope:
                    await attempt()
            except Exception as exc:
                if not recoverable(exc):
                    raise
                last = number > retry
                self.trace.emit(
                    "step_failed",
                    step=step_id,
                    pointer=pointer,
                    attempt=number,
                    attempts=retry + 1,
                    code=error_code(exc),
                    # the message may quote run content: only when content is traced
                    **({"message": str(exc)[:500]} if self.trace.content else {}),
                    then=(
                        "fallback" if last and fallback else "fail" if last else "retry"
                    ),
                )
                if not last:
                    continue
                if fallback is None:
                    raise
                await self._fallback(step_id, pointer, exc, fallback)
                return
            finally:
                _ATTEMPT.reset(token)
            self.state.absorb(scope, keep=True)
            return

    async def _fallback(
        self,
        step_id: str,
        pointer: str,
        exc: Exception,
        fallback: Callable[[], Awaitable[None]],
    ) -> None:
        error = {
            "type": type(exc).__name__,
            "code": error_code(exc),
            "message": str(exc),
            "step": getattr(exc, "step", None) or step_id,
            "pointer": getattr(exc, "spec_pointer", None) or pointer,
        }
        # The fallback is a span of its own: its steps are its children.
        span = _open_span(self.trace)
        span_token = _SPAN.set(span.span_id)
        where = {"step": step_id, "pointer": f"{pointer}/fallback"}
        ids = {"span_id": span.span_id, "parent_id": span.parent_id}
        self.trace.emit("fallback_start", **where, **ids, code=error["code"])
        status = "error"
        try:
            with self.state.scope({"error": error}) as scope:
                await fallback()
            status = "ok"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            _SPAN.reset(span_token)
            self.trace.emit(
                "fallback_end",
                **where,
                status=status,
                duration_s=span.duration(),
                **span.fields(),
                code=error["code"],
            )
        self.state.absorb(scope, keep=True, drop=("error",))

    async def call(self, agent: str, prompt: str, *, history: str | None = None) -> Any:
        """``call`` step: one agent turn on the rendered prompt (after the chat
        ``history``, a whole placeholder, when the step has one)."""
        earlier = None
        if history is not None:
            where = _STEP.get()
            pointer = f"{where[1]}/history" if where else None
            earlier = _chat_history(resolve_value(history, self.state), pointer)
        return await self.turn(agent, render(prompt, self.state), history=earlier)

    async def tool(self, name: str, args: Mapping[str, Any]) -> Any:
        """``tool`` step: call a tool directly with rendered arguments (_tools.py)."""
        from ._tools import tool_step  # shipped with tools, programmer and test steps

        return await tool_step(self, name, args)

    async def ensemble(
        self,
        agents: Sequence[str],
        prompt: str,
        *,
        vote: str | None = None,
        judge: str | None = None,
        vote_on: str | None = "answer",
    ) -> Any:
        """``ensemble`` step: every sample concurrently, then a judge or a vote."""
        task = render(prompt, self.state)
        answers = await self.gather(
            *(_labelled(self.turn(a, task), sample=i) for i, a in enumerate(agents))
        )
        labels = [
            self.prompt("candidate_label", number=i) for i in range(1, len(answers) + 1)
        ]
        return await self._decide(
            "ensemble", task, answers, labels, vote=vote, judge=judge, vote_on=vote_on
        )

    async def debate(
        self,
        agents: Sequence[str],
        topic: str,
        *,
        rounds: int = 2,
        judge: str | None = None,
        vote: str | None = None,
        vote_on: str | None = "answer",
    ) -> Any:
        """``debate`` step: answer, read the others' answers, revise; then decide."""
        task = render(topic, self.state)
        labels = [
            self.prompt("debater_label", number=i, agent=a)
            for i, a in enumerate(agents, 1)
        ]
        answers = await self.gather(
            *(
                _labelled(self.turn(a, task), round=1, sample=i)
                for i, a in enumerate(agents)
            )
        )
        for number in range(2, rounds + 1):
            prompts = [
                self._revision_prompt(task, answers, labels, i)
                for i in range(len(agents))
            ]
            answers = await self.gather(
                *(
                    _labelled(self.turn(a, p), round=number, sample=i)
                    for i, (a, p) in enumerate(zip(agents, prompts, strict=True))
                )
            )
        return await self._decide(
            "debate", task, answers, labels, vote=vote, judge=judge, vote_on=vote_on
        )

    async def programmer(
        self,
        agent: str,
        prompt: str,
        *,
        max_attempts: int = 3,
        timeout_s: float = 10.0,
        expect_output: bool = False,
    ) -> dict[str, Any]:
        """``programmer`` step: write code, run it, feed errors back (_tools.py)."""
        from ._tools import programmer_step

        return await programmer_step(
            self,
            agent,
            prompt,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            expect_output=expect_output,
        )

    async def test(
        self, code_path: str, tests: str | Sequence[str], *, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """``test`` step: run test snippets against code in state (_tools.py)."""
        from ._tools import test_step

        return await test_step(self, code_path, tests, timeout_s=timeout_s)

    # --------------------------------------------------------------- agent turns

    async def turn(
        self,
        agent_id: str,
        prompt: str,
        *,
        history: Sequence[Mapping[str, str]] | None = None,
    ) -> Any:
        """One agent turn on an already rendered prompt: text, or parsed JSON.
        Messages: system, the agent's few-shot examples, the chat history, the prompt.
        """
        agent = _with_settings(self._agent(agent_id))
        messages: list[dict[str, Any]] = []
        system = render(_system_prompt(agent), self.state)
        if system:
            messages.append({"role": "system", "content": system})
        for user, assistant in agent.examples:
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        messages += [dict(m) for m in history or ()]
        messages.append({"role": "user", "content": prompt})
        text = await self._answer(agent, messages)
        if agent.output is None:
            return text
        for fix in range(JSON_FIXES + 1):
            try:
                return parse_structured(text, agent.output)
            except ValueError as exc:
                if fix == JSON_FIXES:
                    raise StructuredOutputError(
                        f"agent {agent.id!r} gave no valid JSON for its output schema "
                        f"after {JSON_FIXES + 1} tries: {exc}; last answer: {_preview(text, 300)}",
                        agent=agent.id,
                        spec_pointer=f"/agents/{_escape_token(agent.id)}/output",
                    ) from None
                messages.append({"role": "assistant", "content": text})
                messages.append(
                    {
                        "role": "user",
                        "content": self.prompt("format_repair", error=str(exc)),
                    }
                )
                # Traced as the call's `format_repair` (1-based): the answer before it
                # was refused.
                text = await _labelled(
                    self._answer(agent, messages, final=True), format_repair=fix + 1
                )
        raise AssertionError("unreachable")

    async def _answer(
        self, agent: AgentDef, messages: list[dict[str, Any]], final: bool = False
    ) -> str:
        """Chat until the model stops calling tools (at most max_tool_rounds rounds).

        ``final``: no tool calls allowed. The tools stay declared (with tool_choice
        "none") because the history may hold tool messages that refer to them.
        """
        tools = [_tool_schema(self._tool(t)) for t in agent.tools]
        if agent.delegates:
            from ._delegation import worker_tools  # shipped with delegating agents

            tools += worker_tools(self, agent)
        rounds = 0
        while True:
            last_round = final or rounds >= agent.max_tool_rounds
            if tools and rounds and last_round:
                messages.append(
                    {
                        "role": "user",
                        "content": self.prompt("final_answer"),
                    }
                )
            response = await self._chat(agent, messages, tools, last_round)
            message = response.choices[0].message
            if not tools or last_round or not message.tool_calls:
                return message.content or ""
            messages.append(_assistant_message(message))
            for call in message.tool_calls:
                messages.append(await self._tool_message(agent, call))
            rounds += 1

    async def _tool_message(self, agent: AgentDef, call: Any) -> dict[str, Any]:
        """Run one tool call of the model; errors go back as text so it can recover."""
        function = getattr(call, "function", None)
        name = function.name if function is not None else "?"
        if function is not None and name in agent.delegates:
            from ._delegation import delegate  # shipped with delegating agents

            content = await delegate(self, agent, name, function.arguments)
            return {"role": "tool", "tool_call_id": call.id, "content": _cap(content)}
        try:
            if function is None or name not in agent.tools:
                raise ToolError(
                    f"unknown tool {name!r}; available: {', '.join(agent.tools)}"
                )
            args = json.loads(function.arguments or "{}")
            if not isinstance(args, dict):
                raise ToolError("tool arguments must be a JSON object")
            content = as_text(await self._invoke_tool(self._tool(name), args, agent.id))
        except Exception as exc:  # reported to the model, which may recover
            content = f"error: {type(exc).__name__}: {exc}"
        return {"role": "tool", "tool_call_id": call.id, "content": _cap(content)}

    async def _invoke_tool(
        self, tool: ToolDef, args: Mapping[str, Any], agent: str | None = None
    ) -> Any:
        """Run a tool (a code tool or python_exec) with checked arguments (_tools.py)."""
        from ._tools import invoke_tool

        return await invoke_tool(self, tool, args, agent)

    async def _decide(
        self,
        kind: str,
        task: str,
        answers: Sequence[Any],
        labels: Sequence[str],
        *,
        vote: str | None,
        judge: str | None,
        vote_on: str | None = "answer",
    ) -> Any:
        """Close an ensemble or a debate: a judge's turn, a vote, or all answers."""
        if judge is not None:
            prompt = self.prompt(
                "judge", task=task, candidates=_numbered(answers, labels)
            )
            return await _labelled(self.turn(judge, prompt), role="judge")
        from ._voting import first_answer, tally  # shipped with ensembles and debates

        if vote == "majority":
            winner, votes, tied = tally(answers, kind, vote_on)
            if tied > 1:
                self._vote_tied(kind, len(answers), votes, tied)
            return winner
        if vote == "first":
            return first_answer(answers, vote_on)
        return list(answers)

    def _vote_tied(self, kind: str, answers: int, votes: int, tied: int) -> None:
        """A majority vote without a majority: traced as ``vote_tied`` and listed under
        ``warnings`` (the earliest of the tied answers won, as documented)."""
        step = _STEP.get()
        message = (
            f"{kind} {step[0] if step else ''!r}: no majority among {answers} answers: "
            f"{tied} different answers had {votes} vote(s) each; the earliest of them won"
        )
        where = {"step": step[0], "pointer": step[1]} if step else {}
        self.trace.emit("vote_tied", answers=answers, votes=votes, tied=tied, **where)
        self.warnings.append({"type": "vote_tied", **where, "message": message})

    def _revision_prompt(
        self, task: str, answers: Sequence[Any], labels: Sequence[str], me: int
    ) -> str:
        others = [i for i in range(len(answers)) if i != me]
        return self.prompt(
            "debate_revision",
            task=task,
            previous=as_text(answers[me]),
            others=_numbered([answers[i] for i in others], [labels[i] for i in others]),
        )

    def prompt(self, name: str, **slots: Any) -> str:
        """A built-in prompt (``_tables.PROMPTS``, where the spec may override it) with
        its ``{{ slot }}``s filled; inserted text is never rendered again."""
        template = self.spec.prompts.get(name)
        if template is None:
            raise WorkflowError(
                f"the package has no built-in prompt {name!r} (see PROMPTS in _tables.py)"
            )
        return render(template, slots)

    # ------------------------------------------------------------------ LLM calls

    def _agent(self, agent_id: str) -> AgentDef:
        if agent_id not in self.agents:
            raise WorkflowError(f"unknown agent {agent_id!r}")
        return self.agents[agent_id]

    def _tool(self, name: str) -> ToolDef:
        if name not in self.tools:
            raise WorkflowError(f"unknown tool {name!r}")
        return self.tools[name]

    def _check_budget(self) -> None:
        """Refuse a request that would overspend; requests in flight hold a call."""
        b, u = self.budgets, self._usage
        calls = u.total.calls + self._in_flight
        tokens = u.total.prompt_tokens + u.total.completion_tokens
        for limit, used, maximum in (
            ("max_llm_calls", calls, b.max_llm_calls),
            ("max_total_tokens", tokens, b.max_total_tokens),
            ("max_cost_usd", u.total.cost_usd, b.max_cost_usd),
        ):
            if maximum is not None and used >= maximum:
                raise BudgetExceeded(
                    f"budget exceeded: {limit} ({used:g} used, max {maximum:g})",
                    spec_pointer=f"/budgets/{limit}",
                    code=BUDGET_CODES[limit],
                )

    def _request(
        self,
        agent: AgentDef,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        no_more_tools: bool,
    ) -> dict[str, Any]:
        """The chat-completions arguments for one request of an agent."""
        model = self.models[agent.model]
        request: dict[str, Any] = {"model": model.model, "messages": messages}
        temperature = (
            agent.temperature if agent.temperature is not None else model.temperature
        )
        if temperature is not None:
            request["temperature"] = temperature
        if model.max_tokens is not None:
            request["max_tokens"] = model.max_tokens
        settings = _SETTINGS.get() or {}
        request.update({k: settings[k] for k in _REQUEST_SETTINGS if k in settings})
        if tools:
            request["tools"] = tools
            if no_more_tools:
                request["tool_choice"] = "none"
        if agent.output is not None:
            if model.model in self._json_object_only:
                schema = json.dumps(agent.output, ensure_ascii=False, indent=2)
                note = self.prompt("format_reminder", schema=schema)
                request["messages"] = _with_schema_in_system(messages, note)
                request["response_format"] = {"type": "json_object"}
            else:
                request["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": _schema_name(agent.id),
                        "schema": dict(agent.output),
                        "strict": False,
                    },
                }
        where = _STEP.get()
        request["extra_headers"] = {
            # Percent-encoded: header values must be Latin-1, spec ids need not be.
            "X-Mas2c-Agent": quote(agent.id, safe=""),
            "X-Mas2c-Step": quote(where[1] if where else "", safe="/"),
        }
        return request

    async def _chat(
        self,
        agent: AgentDef,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        no_more_tools: bool = False,
    ) -> Any:
        """One completion; falls back to JSON-object mode where json_schema is refused."""
        try:
            request = self._request(agent, messages, tools, no_more_tools)
            return await self._complete(agent, request)
        except LLMError as exc:
            model = self.models[agent.model].model
            about_format = "response_format" in str(exc) or "json_schema" in str(exc)
            refused = exc.status == 400 and about_format
            if agent.output is None or not refused or model in self._json_object_only:
                raise
            self._json_object_only.add(model)
            request = self._request(agent, messages, tools, no_more_tools)
            return await self._complete(agent, request)

    async def _complete(self, agent: AgentDef, request: dict[str, Any]) -> Any:
        """Send with retries on 429/5xx/timeouts/malformed answers; account and trace."""
        model = self.models[agent.model]
        attempts = self.client_settings.max_attempts
        if self._client is None:  # here, so that missing credentials are not retried
            self._client = _make_client(self.client_settings)
        for attempt in range(1, attempts + 1):
            self._check_budget()
            span = _open_span(self.trace)
            # W3C trace context: the gateway's span of this request nests under this call.
            parent = f"00-{self.trace.trace_id}-{span.span_id}-01"
            headers = {**request.get("extra_headers", {}), "traceparent": parent}
            try:
                response = await self._send({**request, "extra_headers": headers})
            except Exception as exc:
                self._trace_call(agent, model, request, None, span, attempt, exc)
                self._raise_unless_retryable(exc, agent, attempt, attempts)
                base = self.client_settings.retry_base_s
                await asyncio.sleep(_backoff(attempt, exc, base))
                continue
            self._account(agent, model, response)
            self._trace_call(agent, model, request, response, span, attempt, None)
            return response
        raise AssertionError("unreachable")

    async def _send(self, request: dict[str, Any]) -> Any:
        """One HTTP request; it holds a call slot of the budget while in flight."""
        if self._client is None:  # created lazily: a run without LLM calls needs none
            self._client = _make_client(self.client_settings)
        self._in_flight += 1
        try:
            response = await self._client.chat.completions.create(**request)
        finally:
            self._in_flight -= 1
        if not getattr(response, "choices", None):
            raise _Malformed("the response has no choices")
        return response

    def _raise_unless_retryable(
        self, exc: Exception, agent: AgentDef, attempt: int, attempts: int
    ) -> None:
        status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
        if isinstance(exc, openai.APIStatusError):
            if status == 402 and _error_code(exc) == "mas2c_budget_exceeded":
                limit = _error_param(exc)  # the gateway names the limit, when it does
                raise BudgetExceeded(
                    f"the LLM gateway refused: {exc.message}",
                    spec_pointer=f"/budgets/{limit}" if limit in BUDGET_CODES else None,
                    code=BUDGET_CODES.get(limit or ""),
                ) from exc
            message = f"HTTP {status} for agent {agent.id!r}: {exc.message}"
        else:
            message = f"{type(exc).__name__} for agent {agent.id!r}: {exc}"
        if not _is_retryable(exc, bool(self.client_settings.socket)):
            raise LLMError(message, status=status, agent=agent.id) from exc
        if attempt >= attempts:
            raise LLMError(
                f"{message} (gave up after {attempts} attempts)",
                status=status,
                agent=agent.id,
            ) from exc

    def _account(self, agent: AgentDef, model: ModelDef, response: Any) -> None:
        prompt, completion, cost = _call_tokens_and_cost(model, response)
        # by_model is keyed by the model name sent (as the gateway's usage.json is)
        self._usage.add(agent.id, model.model, prompt, completion, cost)

    def _trace_call(
        self,
        agent: AgentDef,
        model: ModelDef,
        request: Mapping[str, Any],
        response: Any,
        span: _Span,
        attempt: int,
        error: Exception | None,
    ) -> None:
        """One ``llm_call`` span per attempt: who, which model, tokens, cost, outcome."""
        usage = getattr(response, "usage", None)
        extra: dict[str, Any] = {}
        if response is not None:
            _, _, cost = _call_tokens_and_cost(model, response)
            choice = response.choices[0]
            extra["cost_usd"] = round(float(cost), COST_DIGITS)
            extra["response_model"] = getattr(response, "model", None)
            extra["finish_reason"] = getattr(choice, "finish_reason", None)
        if error is not None:
            extra["error"] = _traced_error(error, self.trace.content)
        if self.trace.content:
            extra["messages"] = _content(request.get("messages", []))
            if response is not None:
                extra["completion"] = _content(_message_record(response))
        self.trace.emit(
            "llm_call",
            agent=agent.id,
            model=model.model,
            model_id=agent.model,
            temperature=request.get("temperature"),
            max_tokens=request.get("max_tokens"),
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            latency_s=span.duration(),
            attempt=attempt,
            retries=attempt - 1,
            status="ok" if error is None else "error",
            **span.fields(),
            **(_LABELS.get() or {}),
            **extra,
            **_where(),
        )


def _call_tokens_and_cost(model: ModelDef, response: Any) -> tuple[int, int, Fraction]:
    """(prompt tokens, completion tokens, exact USD) of one response at the model's prices."""
    usage = getattr(response, "usage", None)
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion = int(getattr(usage, "completion_tokens", 0) or 0)
    cost = call_cost(prompt, completion, model.input_per_mtok, model.output_per_mtok)
    return prompt, completion, cost


def _message_record(response: Any) -> dict[str, Any]:
    """The completion as traced: its text and the tool calls it asked for."""
    message = response.choices[0].message
    record: dict[str, Any] = {"role": "assistant", "content": message.content}
    calls = _assistant_message(message)["tool_calls"] if message.tool_calls else []
    if calls:
        record["tool_calls"] = calls
    return record


# ---------------------------------------------------------------------------- main


def check_inputs(
    given: Any, declared: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The run's initial state: given inputs, checked, with schema defaults filled in."""
    problems = input_problems(given, declared)
    if problems:
        raise InputError("; ".join(p for _, p in problems), spec_pointer=problems[0][0])
    return {
        name: given[name] if name in given else copy.deepcopy(schema["default"])
        for name, schema in declared.items()
    }


# exception class -> (status, exit code); the first match wins.
_OUTCOMES: tuple[tuple[type[BaseException], str, int], ...] = (
    (InputError, "bad_input", 2),
    (BudgetExceeded, "budget_exceeded", 3),
    (StepTimeout, "timeout", 4),
    (Exception, "error", 1),
    (BaseException, "interrupted", 130),
)


def recoverable(exc: BaseException) -> bool:
    """Whether a step's ``retry`` and ``fallback`` apply to a failure: every workflow
    error except an exhausted budget, bad input and the run's own timeout (and never an
    internal error or an interruption)."""
    if not isinstance(exc, WorkflowError):
        return False
    return (
        not isinstance(exc, BudgetExceeded | InputError) and exc.code != "run_timeout"
    )


def error_code(exc: BaseException) -> str:
    """The stable code of a failure (see WorkflowError)."""
    if isinstance(exc, WorkflowError):
        return exc.code
    return "internal" if isinstance(exc, Exception) else "interrupted"


def error_report(exc: BaseException) -> dict[str, Any]:
    """The ``error`` object of out.json."""
    return {
        "type": type(exc).__name__,
        "code": error_code(exc),
        "message": str(exc),
        "spec_pointer": getattr(exc, "spec_pointer", None),
        "spec_line": getattr(exc, "spec_line", None),
        "step": getattr(exc, "step", None),
        "agent": getattr(exc, "agent", None),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def exit_now(code: int) -> NoReturn:
    """Exit as soon as the outputs are durably written (main() flushed, fsynced and
    closed out.json and the trace): flush the standard streams, then skip the
    interpreter's finalisation (module teardown, garbage collection, atexit)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _is_special(path: Path) -> bool:
    """An existing device, FIFO or socket (say /dev/null): written in place, never
    replaced by a rename (which would turn /dev/null into a regular file)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _write_json_atomic(path: Path, obj: Any, *, parents: bool = True) -> None:
    """Write via a temp file in the same folder, then rename: never half a file.
    ``parents=False`` (the ``--output`` the user named): no folder is created."""
    if _is_special(path):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, ensure_ascii=False, indent=2, default=str)
            handle.write("\n")
        return
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, ensure_ascii=False, indent=2, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())  # durable before the fast exit (exit_now)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _iso_now() -> str:
    """The wall clock as ISO 8601 UTC with milliseconds."""
    now = time.time()
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        + f".{int(now % 1 * 1000):03d}Z"
    )


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def main(
    workflow_cls: Callable[[Run], Any],
    spec: SpecInfo,
    agents: Mapping[str, AgentDef],
    models: Mapping[str, ModelDef],
    tools: Mapping[str, ToolDef],
    argv: Sequence[str] | None = None,
) -> int:
    """Command-line entry point (kept for callers of the runtime): ``_api.System.main``."""
    from ._api import System

    return System(workflow_cls, spec, agents, models, tools).main(argv)
