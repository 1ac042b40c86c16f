"""The run folder: the typed contract between a sandboxed run and everything that reads it.

A run folder (``mas2c run --run-dir D``) holds:

| file | written by | model |
| --- | --- | --- |
| ``result.json`` | the program (its ``out.json``), or the host when the program wrote none | `Result` |
| ``usage.json`` | the host's gateway | `Usage` |
| ``sandbox.json`` | the host's sandbox | `SandboxReport` |
| ``trace.jsonl`` | the program, one JSON event a line | `TraceEvent` (one model per ``event`` kind) |
| ``checkpoints.jsonl`` | the program: each top-level step's writes (run content), one a line | `StoredCheckpoint` |
| ``spec.json``, ``input.json`` | the host (what ran) | the spec / a JSON object |
| ``run.json`` | the host: the run header (command, versions, spec hash, endpoint host, times, trace id) | `RunHeader` |
| ``stdout.txt``, ``stderr.txt`` | the program (capped) | text |

**Everything in it is hostile input.** The program inside the sandbox wrote (or
decided) most of it, and a run folder may come from another machine. So every
reader (rectify, solve, bench, run, the CLI) goes through this module, which

- caps each file's size in bytes (`LIMITS`) before reading it,
- parses JSON with a nesting-depth limit that is checked without recursion
  (a 100 000-deep array is a clear error, never a RecursionError),
- rejects what no mas2c program writes: lone surrogates, NaN/Infinity, integers
  past 10**15, keys or identifiers with control characters,
- validates the shape against the pydantic models below (literal statuses,
  event kinds and error codes; checkpoint keys are 64 lowercase hex digits,
  pointers are JSON pointers, ids are spec ids),

and raises `RunFolderError` naming the file (and the trace line) and the
problem. Unknown *fields* are ignored (newer writers may add some); unknown
*event kinds* in the trace are skipped and counted; a torn last trace line (a
program killed mid-write) is skipped and noted.

``Result.error.code`` is the stable, machine-readable error code (`ErrorCode`):
the rectifier dispatches on it, never on message text. Folders written before
codes existed get one from the error's exact ``type`` name (`code_of`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

# -- limits ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Bounds on what a reader accepts from a run folder."""

    result_bytes: int = 16 * 1024 * 1024
    usage_bytes: int = 4 * 1024 * 1024
    sandbox_bytes: int = 1024 * 1024
    spec_bytes: int = 8 * 1024 * 1024
    trace_bytes: int = 64 * 1024 * 1024
    trace_line_bytes: int = 4 * 1024 * 1024
    trace_events: int = 200_000
    depth: int = 64  # JSON nesting: objects and arrays inside each other


LIMITS = Limits()

MAX_INT = 10**15


class RunFolderError(Exception):
    """A run-folder file breaks the contract: the message names the file, where, and what."""


# -- constrained types ---------------------------------------------------------------------------

_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
#: A JSON pointer into the spec ("" or "/a/b~1c"), at most 1 KiB, no control characters.
Pointer = Annotated[str, StringConstraints(max_length=1024, pattern=r"^(/[^\x00-\x1f\x7f/]*)*$")]
#: A spec id (step, agent, tool): what the spec's own id pattern allows.
Ident = Annotated[str, StringConstraints(max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]
#: A state variable name.
Var = Annotated[str, StringConstraints(max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
#: A model's or a pool id's name (providers use "/", ":", "." in them); no control characters.
Name = Annotated[str, StringConstraints(max_length=300, pattern=_NO_CONTROL)]
#: sha256 hex of a checkpoint's inputs: used as a file name, so nothing else is accepted.
CheckpointKey = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Seconds = Annotated[float, Field(ge=0, le=10**9, allow_inf_nan=False)]
Dollars = Annotated[float, Field(ge=0, le=10**9, allow_inf_nan=False)]
Text = Annotated[str, StringConstraints(max_length=1024 * 1024)]
ShortText = Annotated[str, StringConstraints(max_length=4096)]
#: Wall clock, Unix seconds (``ts``, ``start_ts``): until the year 2242.
Timestamp = Annotated[float, Field(ge=0, le=2**33, allow_inf_nan=False)]
#: OpenTelemetry-compatible ids: 32 / 16 lowercase hex digits.
TraceId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
SpanId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
#: A debate round, an ensemble sample, a programmer attempt.
Index = Annotated[int, Field(ge=0, le=10**6)]

Status = Literal["ok", "error", "bad_input", "budget_exceeded", "timeout", "interrupted"]

#: The runtime's error codes (``out.json``'s ``error.code``).
RuntimeCode = Literal[
    "empty_vote",
    "step_timeout",
    "tool_timeout",
    "tool_error",
    "structured_output",
    "budget_calls",
    "budget_tokens",
    "budget_cost",
    "run_timeout",
    "bad_input",
    "no_credentials",
    "llm_error",
    "flow_input",
    "agent_choice",
    "chat_history",
    "internal",
    "interrupted",
    "map_not_list",
    "map_overflow",
    "state_type",
    "condition",
]
#: Codes of results the host writes when the program left none (or a broken one).
HostCode = Literal["sandbox_timeout", "oom_killed", "sandbox_error", "no_result", "bad_result"]
ErrorCode = RuntimeCode | HostCode

#: Folders written before error codes existed: the exact ``type`` name -> code.
#: (An exact name only: message text is never read.)
CODE_OF_TYPE: dict[str, ErrorCode] = {
    "StepTimeout": "step_timeout",
    "ToolError": "tool_error",
    "StructuredOutputError": "structured_output",
    "InputError": "bad_input",
    "LLMError": "llm_error",
    "Timeout": "sandbox_timeout",
    "OOMKilled": "oom_killed",
    "SandboxError": "sandbox_error",
    "Interrupted": "interrupted",
    "KeyboardInterrupt": "interrupted",
    "MissingResult": "no_result",
    "BadResult": "bad_result",
}
_BUDGET_CODES: dict[str, ErrorCode] = {
    "/budgets/max_llm_calls": "budget_calls",
    "/budgets/max_total_tokens": "budget_tokens",
    "/budgets/max_cost_usd": "budget_cost",
}


class _Model(BaseModel):
    """Run-folder records: unknown fields are ignored (newer writers add some), known ones typed."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


# -- result.json / out.json ---------------------------------------------------------------------


class ErrorInfo(_Model):
    """``result.json``'s ``error``: what failed, where in the spec, and its stable code."""

    type: Name = "Error"
    code: ErrorCode | None = None
    message: Text = ""
    spec_pointer: Pointer | None = None
    spec_line: Annotated[int, Field(ge=1, le=10**7)] | None = None
    step: Ident | None = None
    agent: Ident | None = None
    traceback: Text | None = None


class Tally(_Model):
    calls: Count = 0
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count = 0
    cost_usd: Dollars = 0.0


class Usage(Tally):
    """Tokens and cost: ``usage.json`` (the gateway's count) and ``result.json``'s ``usage``."""

    by_agent: dict[Name, Tally] = Field(default_factory=dict, max_length=10_000)
    by_model: dict[Name, Tally] = Field(default_factory=dict, max_length=10_000)


class RunWarning(_Model):
    """An entry of ``result.json``'s ``warnings``: what a run still has to say when it
    ended ``ok`` (a loop that reached ``max_iterations`` without its ``until``, a map cut
    at ``max_items``)."""

    type: Name
    message: Text = ""
    step: Ident | None = None
    pointer: Pointer | None = None
    max_iterations: Count | None = None
    items: Count | None = None
    max_items: Count | None = None


MAX_WARNINGS = 1000  # a result keeps the first ones (a map of many items may warn per item)


class Result(_Model):
    """``result.json`` (the program's ``out.json``): ok with outputs, or a status with an error."""

    status: Status
    outputs: dict[Name, Any] | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    warnings: list[RunWarning] = Field(default_factory=list)

    @field_validator("warnings", mode="before")
    @classmethod
    def _first_warnings(cls, value: Any) -> Any:
        return value[:MAX_WARNINGS] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _error_iff_failed(self) -> Result:
        if self.status == "ok" and self.error is not None:
            raise ValueError("an ok result carries no error")
        if self.status != "ok" and self.error is None:
            raise ValueError(f"a {self.status!r} result must carry an error")
        return self

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def code(self) -> ErrorCode | None:
        """The error's code: written by the runtime, else derived from its exact type name."""
        return None if self.error is None else code_of(self.error)


def code_of(error: ErrorInfo) -> ErrorCode:
    """The error's stable code; for folders without one, from the exact type name (and the
    budget pointer a ``BudgetExceeded`` names). Unknown types are ``internal``."""
    if error.code is not None:
        return error.code
    if error.type == "BudgetExceeded":
        return _BUDGET_CODES.get(error.spec_pointer or "", "budget_calls")
    if error.type == "StepTimeout" and error.spec_pointer == "/budgets/timeout_s":
        return "run_timeout"
    return CODE_OF_TYPE.get(error.type, "internal")


# -- sandbox.json ---------------------------------------------------------------------------------


class SandboxReport(_Model):
    """``sandbox.json``: how the sandbox ran the program."""

    backend: Literal["docker", "unisolated"]
    image: Name | None = None
    limits: dict[Name, int | float | str | bool | None] = Field(
        default_factory=dict, max_length=100
    )
    loosened: list[Name] = Field(default_factory=list, max_length=100)
    exit_code: Annotated[int, Field(ge=-(2**31), le=2**31)] | None = None
    timed_out: bool = False
    oom_killed: bool = False
    duration_s: Seconds = 0.0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    interrupted: bool = False
    isolation: Literal["container", "none"] = "container"
    run_id: Name = ""
    notes: list[Text] = Field(default_factory=list, max_length=1000)
    error: Text | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_backend_name(cls, data: Any) -> Any:
        """Folders written before the rename say ``local`` for the unisolated backend."""
        if isinstance(data, dict) and data.get("backend") == "local":
            return {**data, "backend": "unisolated"}
        return data


# -- trace.jsonl ------------------------------------------------------------------------------------


class _Event(_Model):
    t: Seconds = 0.0
    ts: Timestamp | None = None  # wall clock (absent in folders written before issue 16)


class _Span(_Event):
    """Events that are spans (issue 16): their id, their parent's, and (at the end) the start."""

    span_id: SpanId | None = None
    parent_id: SpanId | None = None


class _Where(_Span):
    """Events inside a step carry the step's id and pointer (absent outside any step)."""

    step: Ident | None = None
    pointer: Pointer | None = None
    start_ts: Timestamp | None = None
    round: Index | None = None  # debate round (1-based), a programmer's attempt
    sample: Index | None = None  # ensemble sample / debater (0-based)
    role: Ident | None = None  # "judge"


class RunStart(_Span):
    """``span_id`` is the package's run span; ``parent_id`` the host's (`RunHeader.span_id`)."""

    event: Literal["run_start"]
    spec: Name = ""
    sha256: Name = ""
    trace_id: TraceId | None = None
    started_at: ShortText | None = None
    python: Name | None = None
    openai: Name | None = None
    trace_content: bool = False


class RunEnd(_Event):
    event: Literal["run_end"]
    status: Status
    exit_code: Annotated[int, Field(ge=-(2**31), le=2**31)] | None = None
    usage: Usage | None = None
    span_id: SpanId | None = None


#: A map item's index path / a loop's iteration path, outermost first.
Path64 = Annotated[list[Index], Field(max_length=64)]
Attempt = Annotated[int, Field(ge=1, le=1000)]


class _StepLabels(_Span):
    """What places one run of a step among its repeats (issue 16)."""

    step: Ident
    pointer: Pointer
    item: Path64 | None = None  # inside map items: their indexes (0-based)
    iteration: Path64 | None = None  # inside loops: their iterations (1-based)
    sample: Index | None = None  # inside an ensemble over a flow: the sample (0-based)
    attempt: Attempt | None = None  # a step with retry/fallback: this attempt (1-based) ...
    attempts: Attempt | None = None  # ... of this many


class StepStart(_StepLabels):
    event: Literal["step_start"]


class StepEnd(_StepLabels):
    event: Literal["step_end"]
    status: Literal["ok", "error"]
    duration_s: Seconds = 0.0
    error: ShortText | None = None  # the exception's type name, or "cancelled"
    code: ErrorCode | Literal["cancelled"] | None = None
    start_ts: Timestamp | None = None


class StepFailed(_Event):
    """A failed attempt of a step with ``retry``/``fallback``, and what happens next."""

    event: Literal["step_failed"]
    step: Ident
    pointer: Pointer
    attempt: Attempt
    attempts: Attempt
    code: ErrorCode
    message: ShortText = ""
    then: Literal["retry", "fallback", "fail"]


class _Fallback(_Span):
    step: Ident
    pointer: Pointer  # <step>/fallback
    code: ErrorCode | None = None  # the failure it stands in for


class FallbackStart(_Fallback):
    """A step's ``fallback`` begins (a span: its steps are its children)."""

    event: Literal["fallback_start"]


class FallbackEnd(_Fallback):
    event: Literal["fallback_end"]
    status: Literal["ok", "error", "cancelled"] = "ok"
    duration_s: Seconds = 0.0
    start_ts: Timestamp | None = None


class MapStart(_Event):
    event: Literal["map_start"]
    step: Ident
    pointer: Pointer
    items: Count
    max_concurrency: Count


class MapTooLong(_Event):
    """More items than ``max_items``: cut (``map_truncated``) or the step fails."""

    event: Literal["map_truncated", "map_overflow"]
    step: Ident
    pointer: Pointer
    items: Count
    max_items: Count


class LoopExhausted(_Event):
    event: Literal["loop_exhausted"]
    step: Ident
    pointer: Pointer
    max_iterations: Count
    failed: bool = False


class VoteTied(_Event):
    """A majority vote without a majority: ``tied`` answers had ``votes`` votes each (the
    earliest won)."""

    event: Literal["vote_tied"]
    step: Ident | None = None
    pointer: Pointer | None = None
    answers: Count
    votes: Count
    tied: Count


class StepResumed(_Event):
    event: Literal["step_resumed"]
    step: Ident
    pointer: Pointer
    key: CheckpointKey


TopPointer = Annotated[str, StringConstraints(pattern=r"^/workflow/[0-9]{1,6}$")]


class Checkpoint(_Event):
    """A top-level step left a checkpoint, keyed by sha256 of its inputs (the resume cache):
    the variables it wrote (`vars`); their values (`writes`) only in a trace with content
    (and in traces written before the checkpoint store, where every event carried them)."""

    event: Literal["checkpoint"]
    step: Ident
    pointer: TopPointer
    key: CheckpointKey
    vars: list[Var] | None = Field(default=None, max_length=10_000)
    writes: dict[Var, Any] | None = Field(default=None, max_length=10_000)


class StoredCheckpoint(_Model):
    """One line of ``checkpoints.jsonl`` (the run's checkpoint store): a top-level step's
    writes, the values a resumed run restores. Run content, unlike the trace."""

    step: Ident
    pointer: TopPointer
    key: CheckpointKey
    writes: dict[Var, Any] = Field(max_length=10_000)


class LLMCall(_Where):
    event: Literal["llm_call"]
    agent: Ident
    model: Name
    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None
    latency_s: Seconds = 0.0
    attempt: Annotated[int, Field(ge=0, le=1000)] = 0
    status: Literal["ok", "error"] = "ok"
    error: ShortText | None = None
    # issue 16: the call as a span with its request, outcome and cost
    model_id: Name | None = None
    temperature: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = None
    max_tokens: Count | None = None
    retries: Annotated[int, Field(ge=0, le=1000)] = 0
    cost_usd: Dollars | None = None
    finish_reason: Name | None = None
    response_model: Name | None = None
    format_repair: Attempt | None = None  # asked again: the answer before broke the schema
    messages: list[Any] | None = None  # only with --trace-content
    completion: dict[str, Any] | None = None  # only with --trace-content


class ToolCall(_Where):
    event: Literal["tool_call"]
    tool: Ident
    agent: Ident | None = None
    worker: Ident | None = None  # an agent called as a tool (delegation)
    status: Literal["ok", "error"] = "ok"
    duration_s: Seconds = 0.0
    error: ShortText | None = None
    arguments: Any = None  # only with --trace-content
    result: Any = None  # only with --trace-content


class Exec(_Where):
    event: Literal["exec"]
    exit_code: Annotated[int, Field(ge=-(2**31), le=2**31)] | None = None
    timed_out: bool = False
    duration_s: Seconds = 0.0


TraceEvent = Annotated[
    RunStart
    | RunEnd
    | StepStart
    | StepEnd
    | StepResumed
    | Checkpoint
    | LLMCall
    | ToolCall
    | Exec
    | StepFailed
    | FallbackStart
    | FallbackEnd
    | MapStart
    | MapTooLong
    | LoopExhausted
    | VoteTied,
    Field(discriminator="event"),
]
EVENT_KINDS = frozenset(
    {
        "run_start",
        "run_end",
        "step_start",
        "step_end",
        "step_resumed",
        "checkpoint",
        "llm_call",
        "tool_call",
        "exec",
        "step_failed",
        "fallback_start",
        "fallback_end",
        "map_start",
        "map_truncated",
        "map_overflow",
        "loop_exhausted",
        "vote_tied",
    }
)
_EVENT: TypeAdapter[TraceEvent] = TypeAdapter(TraceEvent)


# -- parsing with limits -------------------------------------------------------------------------

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, where: str, *, depth: int = LIMITS.depth) -> Any:
    """JSON from untrusted bytes: UTF-8, no NaN/Infinity, nesting at most `depth`, no lone
    surrogates, integers within ±10**15 (RunFolderError naming `where` otherwise)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunFolderError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{where}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise RunFolderError(f"{where}: JSON nested deeper than {depth} levels") from None
    except ValueError as exc:  # NaN, or an integer with more digits than Python converts
        raise RunFolderError(f"{where}: invalid JSON: {exc}") from None
    check_value(value, where, depth=depth)
    return value


def check_value(value: Any, where: str, *, depth: int = LIMITS.depth) -> None:
    """Walk a parsed JSON value without recursion: depth, surrogates, integer range."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        node, level, pointer = stack.pop()
        if isinstance(node, dict | list):
            if level >= depth:
                raise RunFolderError(
                    f"{where}: JSON nested deeper than {depth} levels (at {pointer or '/'})"
                )
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                here = f"{pointer}/{_escape(str(key))}"
                if isinstance(key, str) and _SURROGATE.search(key):
                    raise RunFolderError(
                        f"{where}: a lone surrogate in a key (at {pointer or '/'})"
                    )
                stack.append((child, level + 1, here))
        elif isinstance(node, str):
            if _SURROGATE.search(node):
                raise RunFolderError(f"{where}: a lone surrogate in a string (at {pointer or '/'})")
        elif isinstance(node, bool):
            continue
        elif isinstance(node, int):
            if abs(node) > MAX_INT:
                raise RunFolderError(f"{where}: integer out of range (at {pointer or '/'})")
        elif isinstance(node, float) and not math.isfinite(node):
            raise RunFolderError(f"{where}: a non-finite number (at {pointer or '/'})")


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def read_bytes(path: Path, limit: int, where: str | None = None) -> bytes:
    """A regular file's bytes, refusing anything over `limit` bytes (checked before reading)."""
    where = where or str(path)
    try:
        if path.is_symlink() or not path.is_file():
            raise RunFolderError(f"{where}: not a regular file")
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise RunFolderError(f"{where}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise RunFolderError(f"{where}: larger than the {limit}-byte limit")
    return data


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], value: Any, where: str) -> M:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise RunFolderError(f"{where}: {_problems(exc)}") from None


def _problems(exc: ValidationError, shown: int = 3, skip: int = 0) -> str:
    parts = []
    for error in exc.errors()[:shown]:
        pointer = "".join(f"/{_escape(str(p))}" for p in error["loc"][skip:])
        parts.append(f"at {pointer or '/'}: {error['msg']}")
    more = exc.error_count() - shown
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def load_json_file(path: Path, limit: int, where: str | None = None) -> Any:
    """A JSON file of a run folder, with the size and depth limits."""
    where = where or str(path)
    return parse_json(read_bytes(path, limit, where), where)


def read_result(path: Path) -> Result:
    """``result.json`` (or an ``out.json``) as a `Result`."""
    return _validate(Result, load_json_file(path, LIMITS.result_bytes), str(path))


def read_usage(path: Path) -> Usage:
    """``usage.json``; an absent file is no usage (a run that never reached the gateway)."""
    if not path.exists() and not path.is_symlink():
        return Usage()
    return _validate(Usage, load_json_file(path, LIMITS.usage_bytes), str(path))


def read_sandbox(path: Path) -> SandboxReport | None:
    if not path.exists() and not path.is_symlink():
        return None
    return _validate(SandboxReport, load_json_file(path, LIMITS.sandbox_bytes), str(path))


class RunHeader(_Model):
    """``run.json``: what ran, how and when (written on the host by `mas2c.run`; issue 16)."""

    format: Literal["mas2c-run-header/1"]
    command: list[Text] = Field(default_factory=list, max_length=10_000)
    mas2c_version: Name = ""
    python: Name = ""
    platform: Name = ""
    spec: Name = ""
    spec_sha256: Name = ""
    endpoint: Name = ""  # host:port, "embedded" or "replay": never a key, a path or a query
    backend: Name = ""
    trace_id: TraceId
    span_id: SpanId  # the host's span: the parent of the package's run span
    trace_content: bool = False
    started_at: ShortText | None = None
    started_ts: Timestamp | None = None
    finished_at: ShortText | None = None
    finished_ts: Timestamp | None = None
    status: Name = "running"


def read_header(path: Path) -> RunHeader | None:
    """``run.json``, or None for folders written before it existed."""
    if not path.exists() and not path.is_symlink():
        return None
    return _validate(RunHeader, load_json_file(path, LIMITS.sandbox_bytes), str(path))


@dataclass
class Trace:
    events: list[TraceEvent] = field(default_factory=list)
    skipped: int = 0  # events of kinds this version does not know
    torn: bool = False  # the last line was cut off (the program was killed mid-write)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


E = TypeVar("E", bound=_Event)


def _json_lines(path: Path, limits: Limits, what: str) -> Iterator[tuple[str, Any]]:
    """(where, value) of each line of a JSONL file of the folder, with the trace's limits;
    a torn last line (no newline after it: the program was killed mid-write) yields
    ``(where, _TORN)``."""
    raw = read_bytes(path, limits.trace_bytes)
    lines = raw.split(b"\n")
    last = len(lines) - 1
    count = 0
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        if count >= limits.trace_events:
            raise RunFolderError(f"{where}: more than {limits.trace_events} {what}")
        count += 1
        if len(line) > limits.trace_line_bytes:
            raise RunFolderError(f"{where}: a line over the {limits.trace_line_bytes}-byte limit")
        try:
            value = parse_json(line, where, depth=limits.depth)
        except RunFolderError:
            if number - 1 == last:
                yield where, _TORN
                continue
            raise
        yield where, value


_TORN = object()


def read_trace(path: Path, limits: Limits = LIMITS) -> Trace:
    """``trace.jsonl``: each line one event, validated by its kind; an absent file is empty."""
    trace = Trace()
    if not path.exists() and not path.is_symlink():
        return trace
    for where, value in _json_lines(path, limits, "trace events"):
        if value is _TORN:
            trace.torn = True
            continue
        if not isinstance(value, dict):
            raise RunFolderError(f"{where}: an event must be a JSON object")
        kind = value.get("event")
        if not isinstance(kind, str):
            raise RunFolderError(f"{where}: an event needs a string `event`")
        if kind not in EVENT_KINDS:
            trace.skipped += 1
            continue
        try:
            trace.events.append(_EVENT.validate_python(value))
        except ValidationError as exc:
            # the first location is the union's tag (the event kind): named already
            raise RunFolderError(f"{where}: {kind} event: {_problems(exc, skip=1)}") from None
    return trace


CHECKPOINTS_FILE = "checkpoints.jsonl"


def read_checkpoints(path: Path, limits: Limits = LIMITS) -> list[StoredCheckpoint]:
    """``checkpoints.jsonl`` (the checkpoint store): each line a `StoredCheckpoint`; an
    absent file (a folder written before the store) is empty, a torn last line skipped."""
    if not path.exists() and not path.is_symlink():
        return []
    found = []
    for where, value in _json_lines(path, limits, "checkpoints"):
        if value is _TORN:
            continue
        found.append(_validate(StoredCheckpoint, value, f"{where}: checkpoint"))
    return found


# -- the whole folder -------------------------------------------------------------------------------


@dataclass
class RunFolder:
    """A run folder read through the contract."""

    path: Path
    result: Result
    usage: Usage
    sandbox: SandboxReport | None
    trace: Trace
    stored: list[StoredCheckpoint] = field(default_factory=list)

    @property
    def status(self) -> Status:
        return self.result.status

    def events(self, kind: type[E]) -> list[E]:
        return self.trace.of(kind)

    def checkpoints(self) -> list[StoredCheckpoint]:
        return saved_checkpoints(self.trace, self.stored)


def saved_checkpoints(trace: Trace, stored: list[StoredCheckpoint]) -> list[StoredCheckpoint]:
    """The checkpoints a run left with their values, in order: those of a trace written with
    content (or before the store existed), then the store's (`checkpoints.jsonl`)."""
    traced = [
        StoredCheckpoint(step=e.step, pointer=e.pointer, key=e.key, writes=e.writes)
        for e in trace.of(Checkpoint)
        if e.writes is not None
    ]
    return [*traced, *stored]


def read_run_folder(folder: Path) -> RunFolder:
    """Every typed file of a run folder (RunFolderError for the first that breaks the contract)."""
    if not (folder / "result.json").exists():
        raise RunFolderError(f"{folder}: not a run folder (no result.json)")
    return RunFolder(
        path=folder,
        result=read_result(folder / "result.json"),
        usage=read_usage(folder / "usage.json"),
        sandbox=read_sandbox(folder / "sandbox.json"),
        trace=read_trace(folder / "trace.jsonl"),
        stored=read_checkpoints(folder / CHECKPOINTS_FILE),
    )


def result_or_error(path: Path) -> Result:
    """A result for callers that must always have one (``mas2c run``): a missing or broken
    ``result.json`` becomes a host error result that says why (codes ``no_result``/``bad_result``)."""
    if not path.exists() and not path.is_symlink():
        return Result(
            status="error",
            error=ErrorInfo(
                type="MissingResult", code="no_result", message=f"{path.name} is missing"
            ),
        )
    try:
        return read_result(path)
    except RunFolderError as exc:
        return Result(
            status="error",
            error=ErrorInfo(
                type="BadResult",
                code="bad_result",
                message=f"the program's result breaks the run-folder contract: {exc}"[:4096],
            ),
        )


def result_data(result: Result) -> dict[str, Any]:
    """A validated result as plain JSON data: the fields it has (an error with all its keys)."""
    data: dict[str, Any] = {"status": result.status}
    if result.outputs is not None:
        data["outputs"] = result.outputs
    if result.usage is not None:
        data["usage"] = result.usage.model_dump(mode="json")
    if result.error is not None:
        data["error"] = {**result.error.model_dump(mode="json"), "code": code_of(result.error)}
    if result.warnings:
        data["warnings"] = [w.model_dump(mode="json", exclude_none=True) for w in result.warnings]
    return data


def checkpoint_path(folder: Path, key: str) -> Path:
    """``folder/<key>.json`` for a validated checkpoint key, guaranteed inside `folder`."""
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        raise RunFolderError(f"checkpoint key {key[:80]!r} is not 64 lowercase hex digits")
    path = folder / f"{key}.json"
    if path.parent != folder:
        raise RunFolderError(f"checkpoint key {key!r} leaves {folder}")
    return path
