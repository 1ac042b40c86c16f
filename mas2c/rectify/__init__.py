"""`mas2c rectify`: repair a system from a failed (or overspent) run, and lift the fix into the spec.

The third MAS² meta-agent. From a run folder, read through its typed contract
(`mas2c.runfolder`: ``result.json`` with the error's stable ``code``, ``spec_pointer``,
``spec_line`` and traceback; ``usage.json``; ``trace.jsonl``; a file that breaks the
contract is a `RectifyError` naming it), it maps the failure to the spec element at
fault and to the code generated for it (the build's source map), and fixes the *spec*.
Everything the run wrote is untrusted: a pointer, step id or agent id is used only as
far as it names an element of this spec, and a checkpoint key only as a 64-hex file
name inside the round's checkpoint folder.

1. **Deterministic fixes first** (no LLM call), chosen by the error **code** alone
   (`KIND_OF_CODE`; never message text or class names): a standard-library name the
   tool's code reads but never binds (libcst scope analysis; an ``AddImportsVisitor``
   edit of the generated tool code, lifted back into ``/tools/<id>/code``); a
   structured-output parse failure (a format reminder in the agent's instructions, then
   ``output: text`` where nothing reads its fields); a vote with no answer
   (``vote: first``); a step, tool or run timeout (a longer step timeout within the
   run's budget, else less fan-out); a budget overrun (the pool's cheapest model for
   samplers, then less fan-out, then a higher budget only when allowed).
2. **LLM fixes** otherwise: the rectifier LLM gets the failing element, its
   generated code, the error and traceback and the earlier attempts, and answers
   with a corrected function in a ```python block (a libcst edit of the tool's code)
   or an RFC 6902 JSON Patch in a ```json block (prompts, references, steps). An
   answer that does not parse, or that adds validation errors, is reverted and the
   LLM is told why (once more per round).

Every fix passes `guard_fix` on the *resulting* spec: budgets unchanged unless
allowed (whatever patch operation tried), and no tool's code taking over a name of
another tool.

Each round recompiles and re-runs the system in the sandbox, resuming from the
checkpoints of earlier runs (steps before the fault whose inputs did not change are
not run again), and keeps everything in ``RUN_DIR/rectify/round-K/``: ``spec.yaml``
(the user's spec text edited as a round trip, `mas2c.yamledit`), ``patch.diff``
(against the previous round's text; applies to the user's file with ``patch -p0`` or
``git apply``),
``build/``, ``run/`` and ``notes.json``. The loop stops when a run succeeds, after
``max_rounds``, when a fix repeats an earlier spec (hash), or when two rounds in a row
leave the same error (code, type and pointer). The input spec is never modified;
``write=True`` writes the fixed spec beside it as ``<stem>.rectified.yaml`` (an existing
file of that name is refused before any round, `OutputRefused`, unless ``overwrite``).
A second rectify of the same run folder keeps the first one's rounds: the earlier
``rectify/`` moves to the first free ``rectify.N/``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import libcst as cst
from libcst.codemod import CodemodContext
from libcst.codemod.visitors import AddImportsVisitor

from mas2c.compile import Build, compile_spec
from mas2c.errors import InvalidInput
from mas2c.files import write_text_atomic
from mas2c.lang.spec import (
    Budgets,
    ModelSpec,
    Spec,
    Step,
    called_flows,
    canonical_json,
    flow_pointer,
    iter_spec_steps,
    iter_step_tree,
    iter_steps,
    spec_hash,
    static_calls,
)
from mas2c.llm import LLMError
from mas2c.run import LLMConfig, RunOutcome, make_upstream, run_system, spec_on_engine
from mas2c.runfolder import (
    LIMITS,
    E,
    ErrorInfo,
    LLMCall,
    Result,
    RunFolderError,
    StepEnd,
    StepResumed,
    StepStart,
    StoredCheckpoint,
    Trace,
    Usage,
    check_value,
    checkpoint_path,
    code_of,
    load_json_file,
    read_run_folder,
)
from mas2c.yamledit import edit_spec_text, file_patch

Progress = Callable[[str], None]

DEFAULT_MAX_ROUNDS = 3
LLM_TRIES = 2  # LLM answers per round (the second one hears why the first was reverted)
REMINDER_MARK = "Output format (added by mas2c rectify):"
TRACEBACK_LINES = 30

# A traceback frame in a generated file of the package (workflow.py, tools.py, ...).
_TOOLS_FRAME = re.compile(
    r'File "[^"\n]{0,4096}/(mas2c_[A-Za-z0-9_]{1,200}/[A-Za-z0-9_]{1,200}\.py)", line (\d{1,7})'
)
#: Only the end of a (hostile, possibly huge) traceback is searched for frames.
TRACEBACK_TAIL = 64 * 1024
_BUDGET_LIMITS = ("max_llm_calls", "max_total_tokens", "max_cost_usd")

FixClass = Literal[
    "missing_import",
    "structured_output",
    "empty_vote",
    "timeout",
    "budget",
    "fallback",
    "llm_code",
    "llm_patch",
]


class RectifyError(InvalidInput):
    """The run folder cannot be rectified as given (no result, no spec, no input)."""

    code = "not_rectifiable"


class FixRejected(Exception):
    """A candidate fix does not parse, does not apply or adds validation errors: reverted."""


# -- what went wrong --------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What a run folder says, read through the typed contract (`mas2c.runfolder`)."""

    folder: Path
    result: Result
    usage: Usage
    trace: Trace
    #: The checkpoints the run left with their values (`checkpoints.jsonl`, or a trace
    #: with content / of an earlier version).
    checkpoints: list[StoredCheckpoint] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.result.status

    def events(self, kind: type[E]) -> list[E]:
        return self.trace.of(kind)


@dataclass
class Failure:
    """The error of a run, classified (`kind`) for choosing a fix."""

    status: str
    type: str
    message: str
    pointer: str | None = None
    line: int | None = None
    step: str | None = None
    agent: str | None = None
    traceback: str = ""
    code: str | None = None  # the stable error code (`mas2c.runfolder.ErrorCode`), or overspend
    limit: str | None = None  # the budget limit at stake (max_llm_calls, ...), for budget codes
    kind: str = "logic"

    @property
    def signature(self) -> tuple[str, str, str]:
        """What "the same error again" means: code, type and pointer."""
        return (self.code or "", self.type, self.pointer or "")

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "code": self.code,
            "type": self.type,
            "message": self.message,
            "pointer": self.pointer,
            "line": self.line,
            "step": self.step,
            "agent": self.agent,
            "kind": self.kind,
        }

    def short(self) -> str:
        where = f" at {self.pointer}" if self.pointer else ""
        line = f" line {self.line}" if self.line else ""
        return f"{self.status}: {self.type}{where}{line}: {self.message}"


@dataclass
class Locus:
    """The spec element at fault and the code generated for it."""

    pointer: str | None
    element: str  # tool_code, tool, step, agent, budget, output, input, unknown
    tool: str | None = None
    tool_line: int | None = None
    step_pointer: str | None = None
    step_id: str | None = None
    agent: str | None = None
    generated: list[dict[str, Any]] = field(default_factory=list)  # {file, start, end, code}

    def to_json(self) -> dict[str, Any]:
        return {
            "pointer": self.pointer,
            "element": self.element,
            "tool": self.tool,
            "tool_line": self.tool_line,
            "step_pointer": self.step_pointer,
            "step_id": self.step_id,
            "agent": self.agent,
            "generated": [
                {k: g[k] for k in ("file", "start", "end", "pointer")} for g in self.generated
            ],
        }


@dataclass
class Fix:
    """A changed spec and why."""

    spec: Spec
    fix_class: str
    deterministic: bool
    why: str
    changes: list[str]
    resume: bool = True  # whether the next run may resume from checkpoints

    def to_json(self) -> dict[str, Any]:
        return {
            "class": self.fix_class,
            "deterministic": self.deterministic,
            "why": self.why,
            "changes": self.changes,
        }


@dataclass
class Round:
    number: int
    folder: Path
    failure: Failure
    locus: Locus
    fix: Fix | None = None
    llm_calls: int = 0
    llm_attempts: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = "failed"  # fixed, failed, repeated, no_fix
    run: RunOutcome | None = None
    run_failure: Failure | None = None
    resumed_steps: list[str] = field(default_factory=list)
    checkpoints_offered: int = 0

    @property
    def ran(self) -> bool:
        return self.run is not None

    def to_json(self) -> dict[str, Any]:
        run: dict[str, Any] | None = None
        if self.run is not None:
            usage = self.run.usage
            run = {
                "folder": str(self.run.run_dir),
                "status": self.run.status,
                "error": self.run_failure.to_json() if self.run_failure else None,
                "llm_calls": usage.get("calls", 0),
                "total_tokens": usage.get("total_tokens", 0),
                "cost_usd": usage.get("cost_usd", 0.0),
                "resumed_steps": self.resumed_steps,
                "checkpoints_offered": self.checkpoints_offered,
            }
        return {
            "round": self.number,
            "failure": self.failure.to_json(),
            "locus": self.locus.to_json(),
            "fix": self.fix.to_json() if self.fix else None,
            "llm_calls": self.llm_calls,
            "llm_attempts": self.llm_attempts,
            "run": run,
            "outcome": self.outcome,
        }


@dataclass(frozen=True)
class SpecText:
    """The text every round edits: the user's file (or a dump), its name for patch headers."""

    text: str
    name: str
    json_text: bool


@dataclass
class RectifyOutcome:
    run_dir: Path
    status: str  # fixed, not_fixed, nothing_to_do
    trigger: Failure | None
    rounds: list[Round] = field(default_factory=list)
    stop_reason: str = ""
    final_spec: Spec | None = None
    final_run: RunOutcome | None = None
    final_text: str | None = None  # the fixed spec as the user's text, edited
    written: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("fixed", "nothing_to_do")

    @property
    def rounds_run(self) -> int:
        return sum(1 for r in self.rounds if r.ran)

    @property
    def llm_calls(self) -> int:
        return sum(r.llm_calls for r in self.rounds)

    def to_json(self) -> dict[str, Any]:
        final = self.final_run
        return {
            "status": self.status,
            "run_dir": str(self.run_dir),
            "trigger": self.trigger.to_json() if self.trigger else None,
            "rounds": self.rounds_run,
            "rectifier_llm_calls": self.llm_calls,
            "stop_reason": self.stop_reason,
            "final_run": str(final.run_dir) if final else None,
            "answer": final.result.get("outputs") if final and final.ok else None,
            "written": str(self.written) if self.written else None,
            "history": [r.to_json() for r in self.rounds],
        }


# -- reading a run folder ------------------------------------------------------------------------


def read_run(folder: Path) -> RunRecord:
    """A run folder through the contract; RectifyError naming the file and problem otherwise."""
    try:
        folder_ = read_run_folder(folder)
    except RunFolderError as exc:
        raise RectifyError(str(exc)) from None
    return RunRecord(folder, folder_.result, folder_.usage, folder_.trace, folder_.checkpoints())


def _round_record(folder: Path) -> RunRecord:
    """A re-run's folder; one that breaks the contract is a failed run (code ``bad_result``)."""
    try:
        return read_run(folder)
    except RectifyError as exc:
        error = ErrorInfo(type="BadResult", code="bad_result", message=str(exc)[:4096])
        return RunRecord(folder, Result(status="error", error=error), Usage(), Trace())


def find_spec(run_dir: Path, spec_path: Path | None = None) -> tuple[Spec, Path | None]:
    """The spec the run ran: `--spec`, else the run folder's spec.json or build/MANIFEST.json."""
    from mas2c.lang.validate import SpecInvalid, load_spec, validate_text

    if spec_path is not None:
        try:
            return load_spec(spec_path), spec_path
        except SpecInvalid as exc:
            raise RectifyError(f"{spec_path} is not a valid spec:\n{exc}") from None
    problems = []
    for path, key in ((run_dir / "spec.json", None), (run_dir / "build" / "MANIFEST.json", "spec")):
        if not path.exists():
            continue
        try:
            data = load_json_file(path, LIMITS.spec_bytes)
        except RunFolderError as exc:
            problems.append(str(exc))
            continue
        if key is not None:
            data = data.get(key) if isinstance(data, dict) else None
        report = validate_text(json.dumps(data, ensure_ascii=False), str(path))
        if report.spec is not None and report.ok:
            return report.spec, None
        problems.append(f"{path}: not a valid spec")
    why = f" ({'; '.join(problems)})" if problems else ""
    raise RectifyError(
        f"{run_dir}: the run folder holds no usable spec (spec.json or build/){why}; "
        "pass --spec SPEC"
    )


def find_input(run_dir: Path, input_path: Path | None = None) -> Path:
    path = input_path or run_dir / "input.json"
    if not path.is_file():
        raise RectifyError(f"{run_dir}: the run folder holds no input.json; pass --input FILE")
    try:  # bounded like every run-folder file: size, depth, a JSON object
        data = load_json_file(path, LIMITS.result_bytes)
    except RunFolderError as exc:
        raise RectifyError(str(exc)) from None
    if not isinstance(data, dict):
        raise RectifyError(f"{path}: the input must be a JSON object of named inputs")
    return path


# -- diagnosis -------------------------------------------------------------------------------------

#: Budget error codes -> the limit of `budgets` they name.
BUDGET_LIMIT: dict[str, str] = {
    "budget_calls": "max_llm_calls",
    "budget_tokens": "max_total_tokens",
    "budget_cost": "max_cost_usd",
}


def diagnose(
    record: RunRecord, *, max_cost: float | None = None, max_calls: int | None = None
) -> Failure | None:
    """The run's failure, or its overspending of a threshold, or None when it is fine."""
    result = record.result
    if result.error is None:
        spent = record.usage if record.usage.calls or result.usage is None else result.usage
        if max_cost is not None and spent.cost_usd > max_cost:
            return Failure(
                "overspent",
                "OverBudget",
                f"the run cost ${spent.cost_usd:.6f}, over --max-cost ${max_cost:g} (max_cost_usd)",
                code="overspend",
                limit="max_cost_usd",
                kind="overspend",
            )
        if max_calls is not None and spent.calls > max_calls:
            return Failure(
                "overspent",
                "OverBudget",
                f"the run made {spent.calls} LLM calls, over --max-calls {max_calls} (max_llm_calls)",
                code="overspend",
                limit="max_llm_calls",
                kind="overspend",
            )
        return None
    error = result.error
    code = code_of(error)
    failure = Failure(
        status=result.status,
        type=error.type,
        message=error.message,
        pointer=error.spec_pointer or None,
        line=error.spec_line,
        step=error.step,
        agent=error.agent,
        traceback=error.traceback or "",
        code=code,
        limit=BUDGET_LIMIT.get(code),
    )
    if failure.pointer is None:
        failure.pointer = _pointer_from_trace(record)
    failure.kind = classify(failure)
    return failure


def traceback_frames(traceback: str) -> list[tuple[str, int]]:
    """(generated file, line) of each frame of the package in the traceback's last 64 KiB."""
    frames = []
    for line in traceback[-TRACEBACK_TAIL:].splitlines():
        if len(line) <= 8192:
            match = _TOOLS_FRAME.search(line)
            if match:
                frames.append((match.group(1), int(match.group(2))))
    return frames


def _pointer_from_trace(record: RunRecord) -> str | None:
    """The step that was running when the run died (started, never ended)."""
    open_steps: list[str] = []
    for event in record.trace.events:
        if isinstance(event, StepStart):
            open_steps.append(event.pointer)
        elif isinstance(event, StepEnd) and event.pointer in open_steps:
            open_steps.remove(event.pointer)
    return open_steps[-1] if open_steps else None


#: Error code -> the kind of failure a fixer handles. Dispatch is on codes only: never on
#: message text or exception class names (see `mas2c.runfolder.code_of` for old folders).
KIND_OF_CODE: dict[str, str] = {
    "overspend": "overspend",
    "empty_vote": "empty_vote",
    "step_timeout": "timeout",
    "run_timeout": "timeout",
    "tool_timeout": "tool_timeout",
    "tool_error": "tool_error",
    "structured_output": "structured_output",
    "budget_calls": "budget",
    "budget_tokens": "budget",
    "budget_cost": "budget",
    "bad_input": "bad_input",
    "no_credentials": "llm_endpoint",
    "llm_error": "llm_endpoint",
    "flow_input": "logic",
    "agent_choice": "logic",
    "chat_history": "bad_input",
    "internal": "logic",
    "map_not_list": "logic",
    "map_overflow": "logic",
    "state_type": "logic",
    "interrupted": "sandbox",
    "sandbox_timeout": "sandbox_timeout",
    "oom_killed": "sandbox",
    "sandbox_error": "sandbox",
    "no_result": "sandbox",
    "bad_result": "bad_result",
}


def classify(failure: Failure) -> str:
    """The failure's kind, from its code alone."""
    return KIND_OF_CODE.get(failure.code or "internal", "logic")


#: Kinds no spec change can fix: the run's input, the sandbox or the endpoint is at fault.
UNFIXABLE = {
    "bad_input": "the input does not match the spec's inputs: fix the input file",
    "sandbox_timeout": "the sandbox killed the program at its wall-clock limit: raise --timeout",
    "sandbox": "the sandbox failed (see sandbox.json and stderr.txt), not the system",
    "llm_endpoint": "the LLM endpoint failed (see the error); check --llm and the key",
    "bad_result": "the program's result or trace breaks the run-folder contract (see the error)",
}


# -- locating --------------------------------------------------------------------------------------


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def resolve(data: Any, pointer: str) -> Any:
    """The value at a JSON pointer (KeyError/IndexError when absent)."""
    node = data
    for raw in pointer.split("/")[1:]:
        token = _unescape(raw)
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


def known_pointer(data: Any, pointer: str | None) -> str | None:
    """The longest prefix of `pointer` that names a value of `data` (None for none but the root).

    Pointers read from a run folder are untrusted: this is the only way they reach a lookup.
    """
    if not pointer or not pointer.startswith("/"):
        return None
    node, found = data, ""
    for raw in pointer.split("/")[1:]:
        token = _unescape(raw)
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and re.fullmatch(r"0|[1-9][0-9]{0,5}", token):
            if int(token) >= len(node):
                break
            node = node[int(token)]
        else:
            break
        found = f"{found}/{raw}"
    return found or None


def step_pointers(spec: Spec) -> dict[str, str]:
    """Step id -> pointer."""
    return {step.id: pointer for pointer, step in iter_spec_steps(spec)}


def step_at(spec: Spec, pointer: str) -> Step | None:
    for here, step in iter_spec_steps(spec):
        if here == pointer:
            return step
    return None


def _enclosing_step(spec: Spec, pointer: str) -> str | None:
    """The innermost step whose pointer is `pointer` or a prefix of it. Where steps nest
    (branches, cases, a loop's or a map's steps, a fallback, a flow's steps) is each step
    kind's `child_lists()`, walked by `iter_spec_steps`: no child-list key is spelled here."""
    best: str | None = None
    for here, _step in iter_spec_steps(spec):
        inside = pointer == here or pointer.startswith(here + "/")
        if inside and (best is None or len(here) > len(best)):
            best = here
    return best


def locate(failure: Failure, spec: Spec, build: Build) -> Locus:
    """The spec element at fault and its generated code, from pointer, traceback and source map."""
    from mas2c.compile import pointer_at

    # The pointer, step and agent come from the run folder (hostile input): only what names
    # an element of this spec is used (a pointer is cut back to its longest part that does).
    data = spec.to_data()
    pointer = known_pointer(data, failure.pointer)
    line = failure.line if pointer == failure.pointer else None
    if failure.step is not None and failure.step not in step_pointers(spec):
        failure.step = None
    if failure.agent is not None and failure.agent not in spec.agents:
        failure.agent = None
    if pointer is None or (pointer.startswith("/workflow") and failure.code == "tool_error"):
        # A traceback frame inside a tool's verbatim code is more precise than the step;
        # without a pointer, the innermost generated frame the source map knows.
        for file, number in reversed(traceback_frames(failure.traceback)):
            found = pointer_at(build.manifest, file, int(number))
            if found and found.startswith("/tools/"):
                entry = _entry(build, found, file)
                pointer = found
                if entry is not None and entry.get("verbatim"):
                    line = int(number) - int(entry["start"]) + 1
                break
            if found and pointer is None and found.startswith("/workflow/"):
                pointer = found
                break
    if pointer is None and failure.step:
        pointer = step_pointers(spec).get(failure.step)
    locus = Locus(pointer=pointer, element="unknown", agent=failure.agent)
    if pointer is None:
        return locus
    parts = [_unescape(p) for p in pointer.split("/")[1:]]
    if parts[:1] == ["tools"] and len(parts) >= 2:
        locus.tool = parts[1]
        locus.element = "tool_code" if parts[2:3] == ["code"] else "tool"
        locus.tool_line = line if locus.element == "tool_code" else None
    elif (enclosing := _enclosing_step(spec, pointer)) is not None or parts[:1] == ["workflow"]:
        locus.element = "step"
        locus.step_pointer = enclosing
    elif parts[:1] == ["agents"] and len(parts) >= 2:
        locus.element = "agent"
        locus.agent = parts[1]
    elif parts[:1] == ["budgets"]:
        locus.element = "budget"
    elif parts[:1] == ["outputs"]:
        locus.element = "output"
    elif parts[:1] == ["inputs"]:
        locus.element = "input"
    if locus.step_pointer is None and failure.step:
        locus.step_pointer = step_pointers(spec).get(failure.step)
    if locus.step_pointer is not None:
        step = step_at(spec, locus.step_pointer)
        locus.step_id = step.id if step is not None else None
    wanted = [p for p in (pointer, locus.step_pointer) if p]
    if locus.agent:
        wanted.append(f"/agents/{locus.agent}")
    for want in dict.fromkeys(wanted):
        locus.generated.extend(generated_code(build, want))
    return locus


def _entry(build: Build, pointer: str, file: str | None = None) -> dict[str, Any] | None:
    for entry in build.manifest.get("source_map", []):
        if entry["pointer"] == pointer and (file is None or entry["file"] == file):
            return dict(entry)
    return None


def generated_code(build: Build, pointer: str) -> list[dict[str, Any]]:
    """The generated lines the source map attributes to exactly this pointer."""
    found = []
    for entry in build.manifest.get("source_map", []):
        if entry["pointer"] != pointer:
            continue
        text = build.files.get(entry["file"], b"").decode("utf-8").splitlines()
        code = "\n".join(text[entry["start"] - 1 : entry["end"]])
        found.append({**entry, "code": code})
    return found


# -- spec editing helpers ------------------------------------------------------------------------


def checked_spec(data: dict[str, Any], before: Spec | None = None) -> Spec:
    """A spec from data that must validate (FixRejected with the problems otherwise)."""
    from mas2c.lang.validate import validate_text

    report = validate_text(json.dumps(data, ensure_ascii=False), "<fix>")
    if report.spec is None or not report.ok:
        problems = "; ".join(f"{p.code} {p.pointer}: {p.message}" for p in report.errors[:5])
        raise FixRejected(f"the fixed spec does not validate: {problems}")
    return report.spec


def spec_yaml(spec: Spec) -> str:
    from mas2c.generate import spec_to_yaml

    return spec_to_yaml(spec)


def unified_diff(before: str, after: str, a: str, b: str) -> str:
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True), a, b
        )
    )


def _set(data: dict[str, Any], pointer: str, value: Any) -> None:
    parts = [_unescape(p) for p in pointer.split("/")[1:]]
    node: Any = data
    for token in parts[:-1]:
        node = node[int(token)] if isinstance(node, list) else node[token]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


# -- libcst edits of tool code -------------------------------------------------------------------


def add_imports(code: str, imports: list[tuple[str, str | None]]) -> str:
    """`code` with `import module` / `from module import name` added (libcst AddImportsVisitor)."""
    module = cst.parse_module(code)
    context = CodemodContext()
    for mod, obj in imports:
        AddImportsVisitor.add_needed_import(context, mod, obj)
    return AddImportsVisitor(context).transform_module(module).code


def replace_functions(code: str, answer: str) -> tuple[str, list[str]]:
    """Replace the top-level functions of `code` by those defined in `answer` (libcst).

    New functions are appended; imports in the answer are added with AddImportsVisitor.
    Returns the new code and the names of the functions replaced or added.
    """
    try:
        new = cst.parse_module(answer)
    except cst.ParserSyntaxError as exc:
        raise FixRejected(f"the python block does not parse: {_first_line(str(exc))}") from None
    functions = {s.name.value: s for s in new.body if isinstance(s, cst.FunctionDef)}
    if not functions:
        raise FixRejected("the python block defines no function")
    old = cst.parse_module(code)
    body: list[Any] = []
    done: list[str] = []
    for statement in old.body:
        if isinstance(statement, cst.FunctionDef) and statement.name.value in functions:
            body.append(functions[statement.name.value])
            done.append(statement.name.value)
        else:
            body.append(statement)
    for name, function in functions.items():
        if name not in done:
            body.append(function)
            done.append(name)
    result = old.with_changes(body=body)
    context = CodemodContext()
    for statement in new.body:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for small in statement.body:
            if isinstance(small, cst.Import):
                for alias in small.names:
                    AddImportsVisitor.add_needed_import(
                        context, _dotted(alias.name), asname=_asname(alias)
                    )
            elif isinstance(small, cst.ImportFrom) and small.module and not small.relative:
                if isinstance(small.names, cst.ImportStar):
                    continue
                for alias in small.names:
                    AddImportsVisitor.add_needed_import(
                        context, _dotted(small.module), _dotted(alias.name), _asname(alias)
                    )
    text = AddImportsVisitor(context).transform_module(result).code
    cst.parse_module(text)  # the result must parse (it always should)
    return text, done


def _dotted(node: cst.BaseExpression) -> str:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return f"{_dotted(node.value)}.{node.attr.value}"
    raise FixRejected("unsupported import in the python block")


def _asname(alias: cst.ImportAlias) -> str | None:
    if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
        return alias.asname.name.value
    return None


def edit_tool_code(spec: Spec, build: Build, tool_id: str, transform: Callable[[str], str]) -> Spec:
    """Apply `transform` to the tool's code as generated (the verbatim block of tools.py),
    and lift the edited block back into `/tools/<id>/code`.

    The recompiled spec must reproduce the edited block byte for byte (the lift is checked).
    """
    pointer = f"/tools/{tool_id}/code"
    tool = spec.tools.get(tool_id)
    if tool is None or tool.code is None:
        raise FixRejected(f"tool {tool_id!r} has no code")
    entry = _entry(build, pointer)
    if entry is not None:
        lines = build.files[entry["file"]].decode("utf-8").splitlines(keepends=True)
        block = "".join(lines[entry["start"] - 1 : entry["end"]])
    else:
        block = tool.code if tool.code.endswith("\n") else tool.code + "\n"
    edited = transform(block)
    data = spec.to_data()
    data["tools"][tool_id]["code"] = edited
    fixed = checked_spec(data)
    rebuilt = compile_spec(fixed)
    check = _entry(rebuilt, pointer)
    if check is not None:
        lines = rebuilt.files[check["file"]].decode("utf-8").splitlines(keepends=True)
        if "".join(lines[check["start"] - 1 : check["end"]]) != edited:
            raise FixRejected("the edited tool code does not survive a recompile")
    return fixed


# -- deterministic fixes ---------------------------------------------------------------------------


@dataclass
class Context:
    """What the fixers may use besides the failure and the spec."""

    build: Build
    record: RunRecord
    pool: dict[str, ModelSpec]
    allow_budget_raise: bool = False


def _parse_import(fix: str) -> tuple[str, str | None] | None:
    """`import m` -> (m, None); `from m import n` -> (m, n) (as `mas2c.toolcode` spells them)."""
    words = fix.split()
    if len(words) == 2 and words[0] == "import":
        return (words[1], None)
    if len(words) == 4 and words[0] == "from" and words[2] == "import":
        return (words[1], words[3])
    return None


def fix_missing_import(failure: Failure, locus: Locus, spec: Spec, ctx: Context) -> Fix | None:
    """A tool error in code that reads a standard-library name it never imports: the import.

    The names come from the code itself (`mas2c.toolcode.undefined_names`, the validator's
    own analysis; the error message is never read). With the failing line known, one of them
    must be read on that line; every undefined standard-library name is imported in one edit.
    """
    from mas2c import toolcode

    if locus.tool is None or locus.element != "tool_code":
        return None
    code = spec.tools[locus.tool].code or ""
    missing = [u for u in toolcode.undefined_names(code) if u.fix]
    if locus.tool_line is not None:
        lines = code.splitlines()
        failing = lines[locus.tool_line - 1] if 0 < locus.tool_line <= len(lines) else ""
        if not any(re.search(rf"(?<![\w.]){re.escape(u.name)}\b", failing) for u in missing):
            return None  # the failing line reads no undefined name: not a missing import
    wanted: dict[tuple[str, str | None], str] = {}
    for undefined in missing:
        parsed = _parse_import(undefined.fix or "")
        if parsed is not None:
            wanted.setdefault(parsed, undefined.name)
    if not wanted:
        return None
    try:
        fixed = edit_tool_code(spec, ctx.build, locus.tool, lambda c: add_imports(c, list(wanted)))
    except (FixRejected, cst.ParserSyntaxError):
        return None
    names = ", ".join(f"`{n}`" for n in wanted.values())
    what = ", ".join(
        f"`from {mod} import {obj}`" if obj else f"`import {mod}`" for mod, obj in wanted
    )
    return Fix(
        fixed,
        "missing_import",
        True,
        f"tool `{locus.tool}` failed (line {locus.tool_line}) and its code reads {names}, "
        "defined nowhere in it but in the standard library: the import was missing",
        [f"{locus.pointer}: added {what} (libcst AddImportsVisitor on the generated tool code)"],
    )


def _agents_outputs(spec: Spec, agent_id: str) -> set[str]:
    """State variables that hold an answer of this agent (as text or parsed JSON)."""
    outs = set()
    for _pointer, step in iter_spec_steps(spec):
        out = getattr(step, "out", None)
        if not out:
            continue
        if agent_id in step.answer_agents():
            outs.add(out)
    return outs


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def fields_read(spec: Spec, variables: set[str]) -> bool:
    """Whether any prompt, condition, tool argument, test or output reads a field of these."""
    data = spec.to_data()
    texts = _strings(data["workflow"]) + list(spec.outputs.values())
    for var in variables:
        pattern = re.compile(rf"(?<![\w.]){re.escape(var)}\s*[.\[]")
        if any(pattern.search(text) for text in texts):
            return True
    return False


def fix_structured_output(failure: Failure, locus: Locus, spec: Spec, ctx: Context) -> Fix | None:
    agent_id = failure.agent or locus.agent
    if agent_id not in spec.agents:
        return None
    agent = spec.agents[agent_id]
    if not isinstance(agent.output, dict):
        return None
    data = spec.to_data()
    if REMINDER_MARK not in agent.instructions:
        reminder = (
            f"{REMINDER_MARK} reply with one JSON object and nothing else (no prose, no code "
            f"fences), matching this JSON Schema: {canonical_json(agent.output)}"
        )
        instructions = agent.instructions.rstrip()
        data["agents"][agent_id]["instructions"] = (
            f"{instructions}\n\n{reminder}" if instructions else reminder
        )
        return Fix(
            checked_spec(data),
            "structured_output",
            True,
            f"agent `{agent_id}` answered something that is not JSON for its output schema",
            [f"/agents/{agent_id}/instructions: added a JSON format reminder with the schema"],
        )
    variables = _agents_outputs(spec, agent_id)
    if fields_read(spec, variables):
        return None
    data["agents"][agent_id]["output"] = "text"
    try:
        fixed = checked_spec(data)
    except FixRejected:
        return None
    return Fix(
        fixed,
        "structured_output",
        True,
        f"agent `{agent_id}` still gave no valid JSON after a format reminder, and nothing reads "
        f"fields of its answer ({', '.join(sorted(variables)) or 'unused'}): it may answer in text",
        [f"/agents/{agent_id}/output: relaxed to text"],
    )


def fix_empty_vote(failure: Failure, locus: Locus, spec: Spec, ctx: Context) -> Fix | None:
    pointer = locus.step_pointer
    step = step_at(spec, pointer) if pointer else None
    if pointer is None or step is None or getattr(step, "vote", None) != "majority":
        return None
    data = spec.to_data()
    _set(data, f"{pointer}/vote", "first")
    return Fix(
        checked_spec(data),
        "empty_vote",
        True,
        f"the majority vote of `{step.id}` had no answer to count (every final answer empty)",
        [f"{pointer}/vote: majority -> first (the first answer that has one, never fails)"],
    )


def _fanout_reduction(data: dict[str, Any], pointer: str) -> str | None:
    """Halve the biggest fan-out at or inside the step at `pointer`; a description, or None.

    Each kind's fan-out (field, value with its default, size) comes from the registry."""
    try:
        spec = Spec.model_validate(data)
    except ValueError:  # pydantic's ValidationError: not a spec, nothing to reduce
        return None
    root = step_at(spec, pointer)
    if root is None:
        return None
    candidates: list[tuple[int, str, str, int, tuple[tuple[str, Any], ...]]] = []
    # The step, its nested steps, and the steps of every flow it runs (an ensemble over a
    # flow, or a flow's own fan-out).
    trees = [iter_step_tree(root, pointer)]
    trees += [
        iter_steps(spec.flows[name].steps, f"{flow_pointer(name)}/steps")
        for name in called_flows(spec, [root])
    ]
    for here, step in (found for tree in trees for found in tree):
        fan = step.fan_out()
        if fan is not None and fan.value > 1:
            candidates.append((fan.size, here, fan.field, fan.reduced, fan.also))
    if not candidates:
        return None
    _size, where, key, new, also = max(candidates, key=lambda c: c[0])
    old = resolve(data, where).get(key)
    _set_key(data, where, key, new)
    for other, value in also:  # e.g. a map's on_overflow: truncate (a visible cut)
        _set_key(data, where, other, value)
    shown = old if old is not None else "default"
    extra = "".join(f", {where}/{other}: {value}" for other, value in also)
    return f"{where}/{key}: {shown} -> {new}{extra}"


def _set_key(data: dict[str, Any], pointer: str, key: str, value: Any) -> None:
    node = resolve(data, pointer)
    node[key] = value


def fix_timeout(failure: Failure, locus: Locus, spec: Spec, ctx: Context) -> Fix | None:
    data = spec.to_data()
    cap = spec.budgets.timeout_s
    if failure.kind == "tool_timeout" and locus.tool in spec.tools:
        tool = spec.tools[locus.tool]
        new = min(tool.timeout_s * 2, 3600.0, cap or 3600.0)
        if new <= tool.timeout_s:
            return None
        data["tools"][locus.tool]["timeout_s"] = new
        return Fix(
            checked_spec(data),
            "timeout",
            True,
            f"tool `{locus.tool}` timed out after {tool.timeout_s:g} s",
            [f"/tools/{locus.tool}/timeout_s: {tool.timeout_s:g} -> {new:g}"],
        )
    if failure.kind != "timeout":
        return None
    global_budget = failure.code == "run_timeout"
    step_pointer = (
        step_pointers(spec).get(failure.step or "") if global_budget else locus.step_pointer
    )
    step = step_at(spec, step_pointer) if step_pointer else None
    if not global_budget and step is not None and step.timeout_s is not None:
        limit = cap if cap is not None else float("inf")
        if step.timeout_s < limit:
            new = round(min(step.timeout_s * 2, limit), 3)
            _set(data, f"{step_pointer}/timeout_s", new)
            return Fix(
                checked_spec(data),
                "timeout",
                True,
                f"step `{step.id}` timed out after {step.timeout_s:g} s; the run's budget "
                f"({'none' if cap is None else f'{cap:g} s'}) leaves room",
                [f"{step_pointer}/timeout_s: {step.timeout_s:g} -> {new:g}"],
            )
    if step_pointer is not None:
        change = _fanout_reduction(data, step_pointer)
        if change is not None:
            return Fix(
                checked_spec(data),
                "timeout",
                True,
                f"{'the run' if global_budget else f'step `{step.id if step else step_pointer}`'} "
                "ran out of time and its time cannot grow within the budget: less fan-out",
                [change],
                resume=not global_budget,
            )
    if ctx.allow_budget_raise and cap is not None:
        data["budgets"]["timeout_s"] = cap * 2
        return Fix(
            checked_spec(data),
            "timeout",
            True,
            "the run ran out of time and nothing can be cut: the time budget is raised "
            "(--allow-budget-raise)",
            [f"/budgets/timeout_s: {cap:g} -> {cap * 2:g}"],
            resume=False,
        )
    return None


def _budget_limit(failure: Failure) -> str:
    """The budget limit at stake: from the error code (or the threshold that was exceeded)."""
    return failure.limit if failure.limit in _BUDGET_LIMITS else "max_llm_calls"


def _calls_by_top_step(record: RunRecord) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in record.events(LLMCall):
        match = re.match(r"^/workflow/\d+", event.pointer or "")
        if match:
            counts[match.group(0)] = counts.get(match.group(0), 0) + 1
    return counts


def fix_budget(failure: Failure, locus: Locus, spec: Spec, ctx: Context) -> Fix | None:
    """Budget overrun or overspend: cheaper samplers, then less fan-out, then (if allowed) more budget."""
    from mas2c.configure import agent_uses, rank_pool

    limit = _budget_limit(failure)
    data = spec.to_data()
    pool = {**ctx.pool, **spec.models}
    cost_bound = limit == "max_cost_usd"
    if cost_bound and pool:
        priced = {k: m for k, m in pool.items() if m.price is not None}
        cheapest = rank_pool(priced or pool)[0]
        samplers = sorted(
            a
            for a, use in agent_uses(spec).items()
            if use.sampler and spec.agents[a].model != cheapest
        )
        if samplers:
            if cheapest not in spec.models:
                data["models"][cheapest] = pool[cheapest].model_dump(mode="json", exclude_none=True)
            for agent_id in samplers:
                data["agents"][agent_id]["model"] = cheapest
            return Fix(
                checked_spec(data),
                "budget",
                True,
                f"{failure.message}: samplers run many times, the pool's cheapest model "
                f"`{cheapest}` serves them",
                [f"/agents/{a}/model: {spec.agents[a].model} -> {cheapest}" for a in samplers],
                resume=False,
            )
    actual = _calls_by_top_step(ctx.record)
    ranked = sorted(
        (
            (actual.get(pointer, 0), static_calls(step, spec.flows), pointer)
            for pointer, step in _top_steps(spec)
        ),
        reverse=True,
    )
    for _calls, _static, pointer in ranked:
        trial = copy.deepcopy(data)
        change = _fanout_reduction(trial, pointer)
        if change is not None:
            return Fix(
                checked_spec(trial),
                "budget",
                True,
                f"{failure.message}: the step with the most LLM calls ({pointer}) samples less",
                [change],
                resume=False,
            )
    if ctx.allow_budget_raise and failure.kind == "budget":
        current = getattr(spec.budgets, limit)
        if current is not None:
            new = current * 2
            data["budgets"][limit] = new
            return Fix(
                checked_spec(data),
                "budget",
                True,
                f"{failure.message}: nothing left to cut; budget raised (--allow-budget-raise)",
                [f"/budgets/{limit}: {current:g} -> {new:g}"],
                resume=False,
            )
    return None


# Failures a step's `retry`/`fallback` can recover from (see the runtime's `recoverable`).
FALLBACK_KINDS = ("structured_output", "tool_error", "empty_vote", "timeout")


def fix_fallback(failure: Failure, locus: Locus, spec: Spec, ctx: Context | None) -> Fix | None:
    """A step answered by an agent that failed with a recoverable error and has no
    fallback yet, when another agent answers in the same form (the same output): one
    `retry`, then a `fallback` asking that agent the same prompt (the failure is in
    `error`). Proposed when the fix for the error's own class does not apply."""
    pointer = locus.step_pointer
    step = step_at(spec, pointer) if pointer else None
    if pointer is None or step is None or step.fallback or failure.code == "run_timeout":
        return None
    data = spec.to_data()
    node = resolve(data, pointer)
    changes: list[str] = []
    if not step.retry:
        node["retry"] = 1
        changes.append(f"{pointer}/retry: 1")
    answering = step.answer_agents()
    prompt = next((text for key, text in step.templates() if key == "prompt"), None)
    out = step.writes()
    agent = spec.agents.get(answering[0]) if len(answering) == 1 else None
    # Another agent answering in the same form; one on another model first (the failure
    # may be the model's).
    same = [
        (other.model == agent.model, name)
        for name, other in spec.agents.items()
        if agent is not None and name not in answering and other.output == agent.output
    ]
    stand_in = min(same)[1] if same else None
    ids = {s.id for _p, s in iter_spec_steps(spec)}
    fallback_id = f"{step.id}_fallback"
    if not stand_in or prompt is None or not out or fallback_id in ids:
        return None  # a retry alone repeats a deterministic failure: the LLM route decides
    node["fallback"] = [
        {"id": fallback_id, "kind": "call", "agent": stand_in, "prompt": prompt, "out": out}
    ]
    changes.append(f"{pointer}/fallback: agent `{stand_in}` answers `{out}` instead")
    return Fix(
        checked_spec(data),
        "fallback",
        True,
        f"step `{step.id}` failed ({failure.code}); a retry and a fallback to "
        f"`{stand_in}` let the run go on",
        changes,
    )


def _top_steps(spec: Spec) -> list[tuple[str, Step]]:
    return [(f"/workflow/{i}", step) for i, step in enumerate(spec.workflow)]


DETERMINISTIC: dict[str, Callable[[Failure, Locus, Spec, Context], Fix | None]] = {
    "tool_error": fix_missing_import,
    "structured_output": fix_structured_output,
    "empty_vote": fix_empty_vote,
    "timeout": fix_timeout,
    "tool_timeout": fix_timeout,
    "budget": fix_budget,
    "overspend": fix_budget,
}


def deterministic_fix(failure: Failure, locus: Locus, spec: Spec, ctx: Context) -> Fix | None:
    fixers = [DETERMINISTIC.get(failure.kind)]
    if failure.kind in FALLBACK_KINDS:
        fixers.append(fix_fallback)  # when the class's own fix does not apply
    for fixer in fixers:
        if fixer is None:
            continue
        try:
            fix = fixer(failure, locus, spec, ctx)
            if fix is not None:
                guard_fix(spec, fix.spec, allow_budget_raise=ctx.allow_budget_raise)
                return fix
        except (FixRejected, KeyError, IndexError, TypeError, ValueError, AttributeError):
            continue  # the deterministic route does not apply here; the LLM may still
    return None


# -- LLM fixes ---------------------------------------------------------------------------------------

SYSTEM = """\
You are the rectifier of mas2c. A multi-agent system is written as a declarative spec \
(YAML; JSON pointers below refer to it) and compiled to Python; it failed when it ran. \
Find the root cause and fix it with the smallest change.

Answer with exactly one fenced block:
- ```python: the corrected function(s) of the failing tool, each complete (`def` line and \
body), with the imports they need at the top. They replace the functions of the same name \
in the tool's code; the tool's function keeps its name and parameters.
- ```json: an RFC 6902 JSON Patch (a JSON array of operations) against the spec, for \
prompts, agent instructions, references, outputs or workflow steps, e.g. \
[{"op": "replace", "path": "/agents/solver/instructions", "value": "..."}].
Keep step ids. {budgets}"""


def python_block(text: str) -> str | None:
    match = re.search(r"```[ \t]*(?:python|py)[ \t]*\r?\n(.*?)```", text, re.DOTALL)
    return match.group(1) if match else None


def json_block(text: str) -> Any:
    match = re.search(r"```[ \t]*(?:json)?[ \t]*\r?\n(.*?)```", text, re.DOTALL)
    candidates = [match.group(1)] if match else []
    candidates.append(text.strip())
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):
            continue
    return None


def apply_json_patch(spec: Spec, operations: Any, *, allow_budgets: bool = False) -> Spec:
    """The spec with an RFC 6902 patch applied, validated (FixRejected otherwise)."""
    import jsonpatch

    if isinstance(operations, dict):
        operations = [operations]
    if not isinstance(operations, list) or not operations:
        raise FixRejected("the JSON Patch must be a non-empty JSON array of operations")
    try:
        check_value(operations, "the JSON Patch")
    except RunFolderError as exc:
        raise FixRejected(str(exc)) from None
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise FixRejected(f"not a JSON Patch operation: {json.dumps(op)[:200]}")
    try:
        data = jsonpatch.JsonPatch(operations).apply(spec.to_data())
    except (
        jsonpatch.JsonPatchException,
        jsonpatch.JsonPointerException,
        TypeError,
        KeyError,
        IndexError,
        ValueError,
    ) as exc:
        raise FixRejected(f"the JSON Patch does not apply: {exc}") from None
    if not isinstance(data, dict):
        raise FixRejected("the patched spec is not a mapping")
    if not allow_budgets and _budgets_of(data) != spec.budgets:  # before validating: say why
        _reject_budget_change(spec.budgets, _budgets_of(data))
    fixed = checked_spec(data)
    guard_fix(spec, fixed, allow_budget_raise=allow_budgets)
    return fixed


def _budgets_of(data: dict[str, Any]) -> Budgets | None:
    try:
        return Budgets.model_validate(data.get("budgets", {}))
    except ValueError:
        return None


def _reject_budget_change(before: Budgets, after: Budgets | None) -> None:
    old = before.model_dump()
    new = after.model_dump() if after is not None else {}
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)) or ["*"]
    raise FixRejected(
        "the fix changes budgets (" + ", ".join(f"/budgets/{k}" for k in changed) + "), "
        "which needs --allow-budget-raise"
    )


def _pricing_weakened(before: Spec, after: Spec) -> str | None:
    """How `after` prices calls below `before` (a model's price dropped or lowered, an
    agent moved from a priced model to an unpriced one), or None."""
    for mid, old in sorted(before.models.items()):
        new = after.models.get(mid)
        if old.price is None or new is None:
            continue
        if new.price is None:
            return f"removes the price of model `{mid}` (/models/{mid}/price)"
        if (
            new.price.input_per_mtok < old.price.input_per_mtok
            or new.price.output_per_mtok < old.price.output_per_mtok
        ):
            return f"lowers the price of model `{mid}` (/models/{mid}/price)"
    for aid, agent in sorted(after.agents.items()):
        was = before.agents.get(aid)
        old_model = before.models.get(was.model) if was is not None and was.model else None
        new_model = after.models.get(agent.model) if agent.model else None
        priced_before = old_model is not None and old_model.price is not None
        if priced_before and new_model is not None and new_model.price is None:
            return f"moves agent `{aid}` to model `{agent.model}`, which has no price"
    return None


def guard_fix(before: Spec, after: Spec, *, allow_budget_raise: bool) -> None:
    """What no fix may do, checked on the resulting document (never on how a patch says it).

    - change `budgets` (by any operation: `replace`, `move`/`copy` from it, a whole-document
      `replace` at ""), unless `allow_budget_raise`;
    - weaken what the budgets measure, unless `allow_budget_raise`: drop or lower a model's
      `price`, or bind an agent to a model without one where its model had one (an unpriced
      call costs $0 against `max_cost_usd`);
    - make one tool's code define a name another tool defines or is called (a fix for one
      tool may not define or replace another tool's function).
    """
    if not allow_budget_raise and before.budgets != after.budgets:
        _reject_budget_change(before.budgets, after.budgets)
    if not allow_budget_raise and (weakened := _pricing_weakened(before, after)):
        raise FixRejected(
            f"the fix {weakened}: the cost budget would count less than is spent, which "
            "needs --allow-budget-raise"
        )
    changed = {t for t in after.tools if before.tools.get(t) != after.tools[t]}
    new = _tool_clashes(after) - _tool_clashes(before)
    clashes = sorted(c for c in new if c[1] in changed) or sorted(new)
    if clashes:
        name, owner, other = clashes[0]
        raise FixRejected(
            f"the code of tool `{owner}` would define `{name}`, which belongs to tool `{other}` "
            "(a fix for one tool may not define or replace another tool's function)"
        )


def _top_level_names(code: str) -> set[str]:
    """Functions, classes and variables the code defines at module level (imports aside)."""
    try:
        module = cst.parse_module(code)
    except cst.ParserSyntaxError:
        return set()
    names: set[str] = set()
    for statement in module.body:
        if isinstance(statement, cst.FunctionDef | cst.ClassDef):
            names.add(statement.name.value)
        elif isinstance(statement, cst.SimpleStatementLine):
            for small in statement.body:
                targets: list[cst.BaseExpression] = []
                if isinstance(small, cst.Assign):
                    targets = [t.target for t in small.targets]
                elif isinstance(small, cst.AnnAssign | cst.AugAssign):
                    targets = [small.target]
                names.update(t.value for t in targets if isinstance(t, cst.Name))
    return names


def _tool_clashes(spec: Spec) -> set[tuple[str, str, str]]:
    """(name, tool whose code defines it, the other tool it belongs to); names compared as
    Python sees them (NFKC), so a look-alike spelling is the same name."""
    from mas2c.toolcode import normalized

    defined = {
        tid: {normalized(n): n for n in _top_level_names(t.code)}
        for tid, t in spec.tools.items()
        if t.code
    }
    clashes: set[tuple[str, str, str]] = set()
    for owner, names in defined.items():
        for other in spec.tools:
            if other == owner:
                continue
            theirs = set(defined.get(other, {})) | {normalized(other)}
            clashes.update((names[key], owner, other) for key in names.keys() & theirs)
    return clashes


def _numbered(code: str, mark: int | None) -> str:
    lines = code.splitlines()
    width = len(str(len(lines)))
    return "\n".join(
        f"{'>>' if i == mark else '  '} {i:>{width}} | {line}" for i, line in enumerate(lines, 1)
    )


def _element_text(spec: Spec, locus: Locus) -> str:
    import yaml

    if locus.element == "tool_code" and locus.tool in spec.tools:
        code = spec.tools[locus.tool].code or ""
        return f"Code of tool `{locus.tool}` (>> marks the failing line):\n```\n{_numbered(code, locus.tool_line)}\n```"
    pointers = [p for p in (locus.step_pointer, locus.pointer) if p]
    if locus.agent:
        pointers.append(f"/agents/{locus.agent}")
    data = spec.to_data()
    parts = []
    for pointer in dict.fromkeys(pointers):
        try:
            value = resolve(data, pointer)
        except (KeyError, IndexError, ValueError):
            continue
        text = yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=100).strip()
        parts.append(f"`{pointer}`:\n```yaml\n{text}\n```")
    return "\n\n".join(parts) or "(no single element; see the whole spec)"


def llm_messages(
    failure: Failure,
    locus: Locus,
    spec: Spec,
    history: list[dict[str, Any]],
    rejected: list[str],
    allow_budgets: bool,
) -> list[dict[str, str]]:
    where = f" at `{failure.pointer}`" if failure.pointer else ""
    line = f", line {locus.tool_line} of the tool's code" if locus.tool_line else ""
    sections = [
        f"## Failure\n{failure.status}: {failure.type}{where}{line}\n{failure.message}",
        f"## The element at fault\n{_element_text(spec, locus)}",
    ]
    if locus.generated:
        code = "\n\n".join(
            f"{g['file']} lines {g['start']}-{g['end']}:\n```python\n{g['code']}\n```"
            for g in locus.generated[:3]
        )
        sections.append(f"## The code generated for it\n{code}")
    if failure.traceback:
        tail = "\n".join(failure.traceback.strip().splitlines()[-TRACEBACK_LINES:])
        sections.append(f"## Traceback (last lines)\n```\n{tail}\n```")
    sections.append(f"## The whole spec\n```yaml\n{spec_yaml(spec)}```")
    if history:
        lines = [f"- round {h['round']}: {h['fix']} -> {h['result']}" for h in history]
        sections.append("## Earlier attempts (do not repeat them)\n" + "\n".join(lines))
    if rejected:
        sections.append(
            "## Your previous answer was rejected\n" + "\n".join(f"- {r}" for r in rejected)
        )
    if locus.element == "tool_code" and locus.tool:
        ask = (
            f"The fault is in the code of tool `{locus.tool}`: answer with a ```python block "
            "holding the corrected function(s), or a ```json JSON Patch if the cause is elsewhere."
        )
    else:
        ask = "Answer with a ```json block holding an RFC 6902 JSON Patch against the spec."
    sections.append(ask)
    budgets = "You may change budgets." if allow_budgets else "Do not change budgets (/budgets)."
    return [
        {"role": "system", "content": SYSTEM.replace("{budgets}", budgets)},
        {"role": "user", "content": "\n\n".join(sections)},
    ]


def apply_llm_answer(
    answer: str, failure: Failure, locus: Locus, spec: Spec, build: Build, allow_budgets: bool
) -> Fix:
    code = python_block(answer)
    if code is not None:
        tool_id = locus.tool if locus.element in ("tool_code", "tool") else None
        if tool_id is None:
            defined = re.findall(r"^def\s+([A-Za-z_]\w*)", code, re.MULTILINE)
            tool_id = next((d for d in defined if d in spec.tools and spec.tools[d].code), None)
        if tool_id is None or spec.tools[tool_id].code is None:
            raise FixRejected("a python block, but no code tool is at fault or named in it")
        replaced: list[str] = []

        def transform(text: str) -> str:
            new, names = replace_functions(text, code)
            replaced.extend(names)
            return new

        fixed = edit_tool_code(spec, build, tool_id, transform)
        guard_fix(spec, fixed, allow_budget_raise=allow_budgets)
        return Fix(
            fixed,
            "llm_code",
            False,
            f"the LLM rewrote {', '.join(f'`{n}`' for n in replaced)} of tool `{tool_id}`",
            [f"/tools/{tool_id}/code: replaced {', '.join(replaced)} (libcst edit)"],
        )
    operations = json_block(answer)
    if operations is None:
        raise FixRejected("no ```python block and no JSON Patch in the answer")
    fixed = apply_json_patch(spec, operations, allow_budgets=allow_budgets)
    ops = operations if isinstance(operations, list) else [operations]
    return Fix(
        fixed,
        "llm_patch",
        False,
        "the LLM patched the spec",
        [f"{op.get('op')} {op.get('path')}" for op in ops if isinstance(op, dict)],
    )


def llm_fix(
    failure: Failure,
    locus: Locus,
    spec: Spec,
    build: Build,
    client: Any,
    history: list[dict[str, Any]],
    *,
    allow_budgets: bool = False,
    tries: int = LLM_TRIES,
    seen: set[str] | None = None,
) -> tuple[Fix | None, list[dict[str, Any]], int, bool]:
    """Ask the LLM for a fix; a rejected answer is reverted and the LLM hears why.

    Returns the fix (None if every answer was rejected), the attempts, the LLM calls
    made, and whether the last answer was rejected for repeating an earlier spec.
    """
    attempts: list[dict[str, Any]] = []
    rejected: list[str] = []
    before = client.usage.calls
    fix: Fix | None = None
    repeated = False
    for _try in range(tries):
        messages = llm_messages(failure, locus, spec, history, rejected, allow_budgets)
        answer = client.chat(messages, temperature=0.0)
        record: dict[str, Any] = {"answer": answer[:4000]}
        try:
            fix = apply_llm_answer(answer, failure, locus, spec, build, allow_budgets)
        except (FixRejected, cst.ParserSyntaxError) as exc:
            reason = _first_line(str(exc))
            record["outcome"] = f"reverted: {reason}"
            rejected.append(reason)
            attempts.append(record)
            fix = None
            continue
        digest = spec_hash(fix.spec)
        repeated = digest == spec_hash(spec) or digest in (seen or set())
        if repeated:
            reason = "the answer repeats a spec already tried (or changes nothing)"
            record["outcome"] = f"reverted: {reason}"
            rejected.append(reason)
            attempts.append(record)
            fix = None
            continue
        record["outcome"] = "applied"
        attempts.append(record)
        break
    return fix, attempts, client.usage.calls - before, repeated


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)[:500]


# -- checkpoints (resume) ----------------------------------------------------------------------------


def harvest_checkpoints(records: list[RunRecord]) -> dict[str, dict[str, Any]]:
    """The step checkpoints the runs left (their `checkpoints.jsonl`; in older folders the
    trace's `checkpoint` events), by key; later runs win.

    They are the sandbox's: each was validated by `mas2c.runfolder` (the key is 64 hex
    digits, the pointer a top-level step's, the writes keyed by variable names).
    """
    found: dict[str, dict[str, Any]] = {}
    for record in records:
        for event in record.checkpoints:
            found[event.key] = {
                "step": event.step,
                "pointer": event.pointer,
                "key": event.key,
                "writes": event.writes,
            }
    return found


def offer_checkpoints(build_dir: Path, checkpoints: dict[str, dict[str, Any]]) -> None:
    """Put checkpoints beside the package, where the runtime looks for them (`checkpoints/`).

    Each file is `<key>.json` inside that folder: a key that is not 64 hex digits is refused
    (`checkpoint_path`), so no trace can name a file anywhere else.
    """
    folder = build_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for key, record in sorted(checkpoints.items()):
        try:
            path = checkpoint_path(folder, key)
        except RunFolderError:
            continue
        write_text_atomic(path, json.dumps(record, ensure_ascii=False) + "\n")


# -- the loop ----------------------------------------------------------------------------------------


def rectify(
    run_dir: Path,
    *,
    spec_path: Path | None = None,
    input_path: Path | None = None,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    write: bool = False,
    client: Any = None,
    llm: LLMConfig | None = None,
    upstream: Any = None,
    backend: Literal["docker", "unisolated", "local"] = "docker",
    limits: Any = None,
    loosen: Any = None,
    image: str | None = None,
    max_cost: float | None = None,
    max_calls: int | None = None,
    allow_budget_raise: bool = False,
    pool: dict[str, ModelSpec] | None = None,
    resume: bool = True,
    progress: Progress | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> RectifyOutcome:
    """Repair the system of a failed (or overspent) run; see the module docstring.

    `client` is the rectifier's LLM (an `LLMClient`); without it only deterministic
    fixes are tried. `upstream` is shared by the re-runs (else made from `llm`).
    """
    say = progress or (lambda _m: None)
    llm = llm or LLMConfig()
    record = read_run(run_dir)
    spec, origin = find_spec(run_dir, spec_path)
    input_file = find_input(run_dir, input_path)
    failure = diagnose(record, max_cost=max_cost, max_calls=max_calls)
    # The user's own text is what every round edits (comments, order and styles kept), so each
    # round's patch.diff applies to the user's file; a spec from the run folder is dumped.
    source = SpecText(spec_yaml(spec), "spec.yaml", json_text=False)
    if origin is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = origin.read_bytes().decode("utf-8")  # as it is: CRLF line ends are kept
            source = SpecText(text, origin.name, origin.suffix == ".json")
    target = rectified_path(run_dir, origin, spec) if write else None
    if target is not None and origin is not None and not overwrite:
        _refuse_existing(target)
    out_dir = run_dir / "rectify"
    if out_dir.is_symlink() or out_dir.is_file():
        out_dir.unlink()  # never follow a link out of the run folder
    elif out_dir.exists():
        keep_earlier_attempt(out_dir)
    out_dir.mkdir(parents=True)
    outcome = RectifyOutcome(run_dir, "nothing_to_do", failure, final_spec=spec)
    if failure is None:
        outcome.stop_reason = "the run succeeded within its thresholds: nothing to rectify"
        _write_summary(outcome, out_dir)
        return outcome
    outcome.status = "not_fixed"
    say(f"run failed: {failure.short()}")
    owned = upstream is None and llm.replay is None
    if owned:
        upstream = make_upstream(llm)
    try:
        _loop(
            outcome,
            spec,
            record,
            failure,
            input_file,
            out_dir,
            source,
            max_rounds=max_rounds,
            client=client,
            run_kwargs={
                "backend": backend,
                "limits": limits,
                "loosen": loosen,
                "image": image,
                "llm": llm,
                "upstream": upstream,
                "on_warning": on_warning,
                "on_event": on_event,
            },
            thresholds={"max_cost": max_cost, "max_calls": max_calls},
            allow_budget_raise=allow_budget_raise,
            pool=pool or {},
            resume=resume,
            say=say,
        )
    finally:
        if owned and hasattr(upstream, "close"):
            upstream.close()
    if target is not None and outcome.status == "fixed" and outcome.final_spec is not None:
        write_text_atomic(
            target, outcome.final_text or spec_yaml(outcome.final_spec), user_file=True
        )
        outcome.written = target
        say(f"wrote the rectified spec to {target}")
    _write_summary(outcome, out_dir)
    return outcome


def rectified_path(run_dir: Path, origin: Path | None, spec: Spec) -> Path:
    """Where ``write=True`` puts the fixed spec: ``<stem>.rectified.yaml`` (``.json`` for a
    JSON spec) beside the user's spec, else ``<name>.rectified.yaml`` in the run folder."""
    if origin is not None:
        suffix = ".json" if origin.suffix == ".json" else ".yaml"
        return origin.with_name(f"{origin.stem}.rectified{suffix}")
    return run_dir / f"{spec.name}.rectified.yaml"


def _refuse_existing(target: Path) -> None:
    """A file beside the user's spec is never overwritten unasked (checked before any round)."""
    from mas2c.files import OutputRefused

    if target.exists() or target.is_symlink():
        raise OutputRefused(
            f"{target}: exists; nothing was done. Move it away, or pass --force to overwrite "
            "it with the rectified spec"
        )


def keep_earlier_attempt(out_dir: Path) -> Path:
    """Move an earlier rectify folder to the first free ``rectify.N`` beside it (kept, not
    deleted: every round of every attempt stays on disk)."""
    number = 1
    while (kept := out_dir.with_name(f"{out_dir.name}.{number}")).exists() or kept.is_symlink():
        number += 1
    out_dir.rename(kept)
    return kept


def _loop(
    outcome: RectifyOutcome,
    spec: Spec,
    record: RunRecord,
    failure: Failure,
    input_file: Path,
    out_dir: Path,
    source: SpecText,
    *,
    max_rounds: int,
    client: Any,
    run_kwargs: dict[str, Any],
    thresholds: dict[str, Any],
    allow_budget_raise: bool,
    pool: dict[str, ModelSpec],
    resume: bool,
    say: Progress,
) -> None:
    seen = {spec_hash(spec)}
    records = [record]
    history: list[dict[str, Any]] = []
    stale = 0
    previous_text = source.text
    for number in range(1, max_rounds + 1):
        if failure.kind in UNFIXABLE:
            outcome.stop_reason = f"not a fault of the spec: {UNFIXABLE[failure.kind]}"
            break
        folder = out_dir / f"round-{number}"
        folder.mkdir(parents=True)
        # the build as it ran: on the embedded engine its models are bound to it (mas2c.run)
        build = compile_spec(spec_on_engine(spec, run_kwargs["upstream"]))
        locus = locate(failure, spec, build)
        round_ = Round(number, folder, failure, locus)
        outcome.rounds.append(round_)
        ctx = Context(build, record, pool, allow_budget_raise)
        fix = deterministic_fix(failure, locus, spec, ctx)
        if fix is None and client is not None:
            say(f"round {number}: asking the LLM for a fix ({failure.kind} at {locus.pointer})")
            try:
                fix, round_.llm_attempts, round_.llm_calls, repeated = llm_fix(
                    failure,
                    locus,
                    spec,
                    build,
                    client,
                    history,
                    allow_budgets=allow_budget_raise,
                    seen=seen,
                )
            except LLMError as exc:
                round_.outcome = "no_fix"
                outcome.stop_reason = f"the rectifier's LLM failed: {_first_line(str(exc))}"
                _write_notes(round_)
                break
            if fix is None and repeated:
                round_.outcome = "repeated"
                outcome.stop_reason = "the fix repeats an earlier spec (same hash): no new idea"
                _write_notes(round_)
                break
        round_.fix = fix
        if fix is None:
            round_.outcome = "no_fix"
            outcome.stop_reason = f"no fix found for {failure.kind}" + (
                "" if client is not None else " (no LLM given for non-deterministic fixes)"
            )
            _write_notes(round_)
            break
        say(
            f"round {number}: {fix.fix_class} ({'deterministic' if fix.deterministic else 'LLM'}): "
            + "; ".join(fix.changes)
        )
        digest = spec_hash(fix.spec)
        text = edit_spec_text(previous_text, spec, fix.spec, json_text=source.json_text)
        write_text_atomic(folder / "spec.yaml", text)
        write_text_atomic(folder / "patch.diff", file_patch(previous_text, text, source.name))
        if digest in seen:
            round_.outcome = "repeated"
            outcome.stop_reason = "the fix repeats an earlier spec (same hash): no new idea"
            _write_notes(round_)
            break
        seen.add(digest)
        build_dir = folder / "build"
        compile_spec(spec_on_engine(fix.spec, run_kwargs["upstream"])).write(build_dir)
        if resume and fix.resume:
            offered = harvest_checkpoints(records)
            round_.checkpoints_offered = len(offered)
            if offered:
                offer_checkpoints(build_dir, offered)
        run = run_system(build_dir, input_file, folder / "run", **run_kwargs)
        new_record = _round_record(folder / "run")
        round_.run = run
        round_.resumed_steps = [e.step for e in new_record.events(StepResumed)]
        new_failure = diagnose(new_record, **thresholds)
        round_.run_failure = new_failure
        spec, record = fix.spec, new_record
        records.append(new_record)
        outcome.final_spec, outcome.final_run = spec, run
        previous_text = outcome.final_text = text
        history.append(
            {
                "round": number,
                "fix": f"{fix.fix_class}: {'; '.join(fix.changes)}",
                "result": "ok" if new_failure is None else new_failure.short()[:400],
            }
        )
        if new_failure is None:
            round_.outcome = "fixed"
            outcome.status = "fixed"
            outcome.stop_reason = f"fixed in round {number}"
            say(f"round {number}: the run succeeded")
            _write_notes(round_)
            break
        say(f"round {number}: still failing: {new_failure.short()}")
        _write_notes(round_)
        stale = stale + 1 if new_failure.signature == failure.signature else 0
        failure = new_failure
        if stale >= 2:
            outcome.stop_reason = "no progress: two rounds in a row left the same error"
            break
    else:
        outcome.stop_reason = f"not fixed within {max_rounds} round(s)"


def _write_notes(round_: Round) -> None:
    write_text_atomic(
        round_.folder / "notes.json",
        json.dumps(round_.to_json(), indent=2, ensure_ascii=False) + "\n",
    )


def _write_summary(outcome: RectifyOutcome, out_dir: Path) -> None:
    write_text_atomic(
        out_dir / "summary.json", json.dumps(outcome.to_json(), indent=2, ensure_ascii=False) + "\n"
    )
