"""The validator: every problem of a spec in one pass, each with a code, a pointer and a place.

Structure is checked by the pydantic model (`mas2c.lang.spec`); this module turns
its errors into located problems and then checks what types cannot: references,
scopes of state variables, placeholders, condition expressions and tool code.

Codes are stable; `PROBLEM_CODES` documents each one.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import libcst
from pydantic import ValidationError

from mas2c import pyast, toolcode, values
from mas2c.errors import InvalidInput
from mas2c.lang import expr
from mas2c.lang.imports import resolve_flow_imports
from mas2c.lang.prompts import BUILTIN_PROMPTS
from mas2c.lang.source import (
    Position,
    SourceError,
    SpecSource,
    escape_token,
    load_file,
    parse_bytes,
    parse_text,
    position_in_value,
    resolve,
)
from mas2c.lang.spec import (
    REDUCER_TYPES,
    STEP_CLASSES,
    Agent,
    Budgets,
    Case,
    FlowDef,
    ModelSpec,
    Price,
    ProgrammerStep,
    Spec,
    StateVar,
    Step,
    Tool,
    flow_pointer,
    iter_spec_steps,
    iter_steps,
    step_agents,
    step_out,
)

Severity = Literal["error", "warning"]

PROBLEM_CODES: dict[str, str] = {
    "MAS001": "the file is not valid YAML/JSON",
    "MAS002": "the document is not a mapping",
    "MAS101": "a required key is missing",
    "MAS102": "an unknown key (misspelt keys are never dropped silently)",
    "MAS103": "a value has the wrong type or is out of range",
    "MAS104": "an unknown step kind",
    "MAS105": "a name or id does not match its pattern",
    "MAS106": "an unsupported spec_version",
    "MAS201": "a reference to an agent that does not exist",
    "MAS202": "a reference to a tool that does not exist",
    "MAS203": "a reference to a model that is not in the pool",
    "MAS204": "two steps share an id",
    "MAS205": "an output names no state variable",
    "MAS207": "a reference to a flow that does not exist",
    "MAS208": "a flow's arguments (`with`) do not fit its inputs: missing, unknown or mistyped",
    "MAS209": "flows call each other in a cycle (recursion, direct or indirect)",
    "MAS210": "an agent chosen at run time: `agent` is not a whole placeholder, `agents` is missing, or the value may fall outside `agents`",
    "MAS211": "a delegation that cannot work: to the agent itself, in a cycle, or named like one of its tools",
    "MAS212": "a chat `history` that is not a whole placeholder of a list of {role, content} messages",
    "MAS213": "a few-shot example's answer does not fit the agent's output",
    "MAS214": "a flow import that cannot be resolved: not `path#flow`, outside the spec's folder, missing, unreadable, or naming no flow there",
    "MAS301": "a placeholder or reference reads a state variable that is not bound there",
    "MAS302": "a malformed placeholder",
    "MAS303": "a condition uses a construct outside the safe subset",
    "MAS304": "a condition is not a valid expression",
    "MAS305": "a condition reads a state variable that is not bound there",
    "MAS306": "a placeholder reads a field the agent's output schema does not have",
    "MAS307": "a placeholder or condition reads a field of a value that has none (a text answer, a number)",
    "MAS308": "a condition compares a value with a constant outside its enum",
    "MAS309": "a condition compares values of different JSON types (a number with a string)",
    "MAS310": "an input or variable is named like a condition constant (none, true, false, null)",
    "MAS311": "a built-in prompt override uses a placeholder that is not one of the prompt's slots",
    "MAS401": "tool code does not parse",
    "MAS402": "tool code does not define a function named like the tool",
    "MAS403": "a tool needs exactly one of `builtin` and `code`",
    "MAS404": "tool code reads a name nothing defines",
    "MAS405": "a tool step's arguments do not fit the tool function's signature",
    "MAS406": "two tool ids are the same name to Python (after NFKC normalisation)",
    "MAS501": "a loop has no `max_iterations` bound",
    "MAS502": "an ensemble or debate needs exactly one way to decide (`vote` or `judge`)",
    "MAS503": "an output or input schema is not a usable JSON Schema",
    "MAS504": "an ensemble needs exactly one of `agent` and `agents`",
    "MAS505": "a vote over structured answers has no field to vote on",
    "MAS506": "two parallel branches write the same state variable",
    "MAS511": "a schema `pattern` that does not compile, can backtrack for exponential time, or "
    "has no linear-time automaton (lookaround, backreference, atomic, possessive, too large)",
    "MAS512": "a condition applies len() or `in` to a value whose type cannot take it",
    "MAS513": "a condition uses a value whose known type is not boolean as true or false",
    "MAS910": "a parallel branch writes no variable on every path, so its result is null (warning)",
    "MAS911": "the printed output of a programmer step without `expect_output: true` is read (warning)",
    "MAS912": "a plain yes/no/on/off, which YAML reads as a boolean (warning)",
    "MAS913": "a condition compares an agent's free text answer with a text literal (warning)",
    "MAS520": "a state variable's reducer does not fit its schema or initial value",
    "MAS521": "a state variable's initial value does not match its schema",
    "MAS522": "a state variable is also an input",
    "MAS523": "a step writes a value that does not fit the declared state variable's reducer or schema",
    "MAS524": "a map's item or index variable hides a variable bound there",
    "MAS525": "a map's `over` is not one whole placeholder holding a list",
    "MAS526": "a map body writes a declared state variable whose reducer cannot combine concurrent writes",
    "MAS527": "a map with `out` has no result: no `result` and its steps write no variable on every path",
    "MAS901": "an agent no step uses (warning)",
    "MAS902": "a tool no agent or step uses (warning)",
    "MAS903": "a model no agent uses (warning)",
    "MAS904": "tool code uses a standard-library name it does not import; the hint is the import (warning)",
    "MAS905": "tool code defines a function named like another tool (warning)",
    "MAS906": "a flow no step runs (warning)",
    "MAS907": "a built-in prompt override drops the slot that carries the prompt's data (warning)",
}


@dataclass(frozen=True)
class Problem:
    code: str
    pointer: str
    message: str
    hint: str | None = None
    severity: Severity = "error"
    line: int | None = None
    column: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "pointer": self.pointer,
            "line": self.line,
            "column": self.column,
            "message": self.message,
            "hint": self.hint,
        }

    def format(self, path: str) -> str:
        place = f"{path}:{self.line}:{self.column}" if self.line else path
        text = f"{place}: {self.severity} {self.code} at {self.pointer or '/'}: {self.message}"
        return text + (f"\n    hint: {self.hint}" if self.hint else "")


@dataclass
class Report:
    path: str
    problems: list[Problem] = field(default_factory=list)
    spec: Spec | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "valid": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.problems) - len(self.errors),
            "problems": [p.to_json() for p in self.problems],
        }

    def format(self) -> str:
        lines = [p.format(self.path) for p in self.problems]
        counts = f"{len(self.errors)} error(s), {len(self.problems) - len(self.errors)} warning(s)"
        lines.append(f"{self.path}: {'valid' if self.ok else 'invalid'} ({counts})")
        return "\n".join(lines)


class SpecInvalid(InvalidInput):
    """Raised by `load_spec` when a spec has errors; carries the whole report."""

    code = "spec_invalid"

    def __init__(self, report: Report) -> None:
        super().__init__(report.format())
        self.report = report


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    options = sorted({str(candidate) for candidate in candidates})
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    if options:
        shown = ", ".join(f"`{o}`" for o in options[:8])
        return f"known: {shown}" + (", ..." if len(options) > 8 else "")
    return None


# -- entry points ----------------------------------------------------------------------------


def validate_file(path: str | Path) -> Report:
    """Validate a spec file. OSError (missing, unreadable) propagates: it is a usage error."""
    try:
        source = load_file(path)
    except SourceError as exc:
        return _source_failure(str(path), exc)
    return validate_source(source)


def validate_text(text: str, path: str = "<string>") -> Report:
    try:
        source = parse_text(text, path)
    except SourceError as exc:
        return _source_failure(path, exc)
    return validate_source(source)


def validate_bytes(raw: bytes, path: str = "<stdin>") -> Report:
    """`validate_text` of bytes (stdin): too many or not UTF-8 is MAS001, as for a file."""
    try:
        source = parse_bytes(raw, path)
    except SourceError as exc:
        return _source_failure(path, exc)
    return validate_source(source)


def load_spec(path: str | Path) -> Spec:
    """A valid spec from a file, or SpecInvalid with every problem."""
    report = validate_file(path)
    if report.spec is None or not report.ok:
        raise SpecInvalid(report)
    return report.spec


def _source_failure(path: str, exc: SourceError) -> Report:
    pos = exc.position
    problem = Problem(
        "MAS001",
        "",
        exc.message,
        exc.hint or "check indentation and quoting near this place",
        line=pos.line if pos else None,
        column=pos.column if pos else None,
    )
    return Report(path, [problem])


def validate_source(source: SpecSource) -> Report:
    report = Report(source.path)
    checker = _Checker(source)
    if not isinstance(source.data, dict):
        checker.add(
            "MAS002", "", "the spec must be a mapping of keys (spec_version, name, agents, ...)"
        )
    else:
        _yaml_booleans(checker, source)
        data, import_problems, checker.failed_imports = resolve_flow_imports(source)
        for code, pointer, message, hint in import_problems:
            checker.add(code, pointer, message, hint)
        try:
            # By alias only: a spec writes `else` and `$schema`; the Python names `else_` and
            # `schema_` are unknown keys there, not synonyms (pydantic >= 2.11).
            report.spec = Spec.model_validate(data, by_alias=True, by_name=False)
        except ValidationError as exc:
            for error in exc.errors():
                checker.add_pydantic(error)
        if report.spec is not None:
            checker.check(report.spec)
    report.problems = sorted(checker.problems, key=_problem_order)
    return report


def _yaml_booleans(checker: _Checker, source: SpecSource) -> None:
    """MAS912 (warning): `yes`/`no`/`on`/`off` written plain are booleans to YAML 1.1, so
    `enum: [yes, no]` is `[true, false]` and `args: {answer: no}` passes false."""
    for pointer, (text, position, is_key) in source.yaml_booleans.items():
        value = "true" if text.lower() in ("yes", "on") else "false"
        what = "key" if is_key else "value"
        checker.add(
            "MAS912",
            pointer,
            f"the {what} `{text}` is read as the boolean {value} (YAML 1.1 reads plain "
            "yes/no/on/off as booleans)",
            f'quote it ("{text}") if you mean the text, or write {value}',
            severity="warning",
            position=position,
        )


def _problem_order(problem: Problem) -> tuple[int, int, int, str]:
    return (problem.line or 0, problem.column or 0, problem.severity == "warning", problem.code)


# -- structure: pydantic errors into located problems ------------------------------------------

_FIELDS_BY_MODEL: dict[str, type[Any]] = {
    "Spec": Spec,
    "Agent": Agent,
    "ModelSpec": ModelSpec,
    "Price": Price,
    "Tool": Tool,
    "Budgets": Budgets,
    "Case": Case,
    "FlowDef": FlowDef,
}


def _field_names(model: type[Any]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _data_path(data: Any, loc: tuple[Any, ...], keep_last: bool) -> list[Any]:
    """The error's location as a path through the data, dropping pydantic's union tags."""
    path: list[Any] = []
    node = data
    skip_tag = False
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        tag, skip_tag = skip_tag, False
        if tag and not last and part == node.get("kind"):
            # pydantic puts the discriminator (`tool`) after a step's index: it is no key of
            # the step, even when the step has a key of that name (a tool step's `tool`).
            continue
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
            skip_tag = isinstance(node, dict) and _is_step_kind(node.get("kind"))
        elif last and keep_last:
            path.append(part)
    return path


def _model_at(data: Any, path: list[Any]) -> type[Any] | None:
    """The spec model class that describes the mapping at `path`, for key hints."""
    node = data
    for part in path:
        node = node[part]
    if isinstance(node, dict) and _is_step_kind(node.get("kind")):
        return _STEP_CLASSES[node["kind"]]
    names = [p for p in path if isinstance(p, str)]
    tail = names[-2:] if len(path) >= 2 and isinstance(path[-2], str) else names[-1:]
    if not path:
        return Spec
    if (
        tail
        and tail[0] in ("agents", "models", "tools")
        and len(tail) == 2
        and not isinstance(path[-1], int)
    ):
        return {"agents": Agent, "models": ModelSpec, "tools": Tool}[tail[0]]
    if len(path) == 2 and path[0] == "flows":
        return FlowDef
    if path[-1] == "price":
        return Price
    if path[-1] == "budgets":
        return Budgets
    if len(path) >= 2 and path[-2] == "cases":
        return Case
    return None


_STEP_CLASSES = STEP_CLASSES  # the registry: kind -> model class


def _is_step_kind(value: Any) -> bool:
    return isinstance(value, str) and value in STEP_CLASSES


class _Checker:
    def __init__(self, source: SpecSource) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self._seen: set[tuple[str, str, str]] = set()
        self.failed_imports: set[str] = set()  # flows whose import failed (MAS214)

    def add(
        self,
        code: str,
        pointer: str,
        message: str,
        hint: str | None = None,
        *,
        severity: Severity = "error",
        position: Position | None = None,
    ) -> None:
        key = (code, pointer, message)
        if key in self._seen:
            return
        self._seen.add(key)
        if position is None and isinstance(resolve(self.source.data, pointer), dict):
            # A named mapping (an agent, a tool, a schema) is best shown by its name.
            position = self.source.key_position(pointer)
        pos = position or self.source.position(pointer)
        self.problems.append(
            Problem(
                code,
                pointer,
                message,
                hint,
                severity,
                pos.line if pos else None,
                pos.column if pos else None,
            )
        )

    # pydantic ------------------------------------------------------------------------------

    def add_pydantic(self, error: Any) -> None:
        kind = error["type"]
        loc = tuple(error["loc"])
        data = self.source.data
        path = _data_path(data, loc, keep_last=kind in ("missing", "union_tag_not_found"))
        pointer = "".join("/" + escape_token(str(p)) for p in path)
        if kind == "missing":
            parent = _model_at(data, path[:-1])
            self.add(
                "MAS101",
                pointer,
                f"missing required key `{path[-1]}`",
                _keys_hint(parent),
                position=self.source.key_position(pointer.rsplit("/", 1)[0]),
            )
        elif kind == "union_tag_not_found":
            self.add(
                "MAS101",
                pointer + "/kind",
                "a step needs a `kind`",
                f"one of: {', '.join(STEP_CLASSES)}",
            )
        elif kind == "extra_forbidden":
            parent = _model_at(data, path[:-1])
            candidates = _field_names(parent) if parent else []
            self.add(
                "MAS102",
                pointer,
                f"unknown key `{path[-1]}`",
                did_you_mean(str(path[-1]), candidates),
                position=self.source.key_position(pointer),
            )
        elif kind == "union_tag_invalid":
            tag = str(error.get("ctx", {}).get("tag", ""))
            self.add(
                "MAS104",
                pointer + "/kind",
                f"unknown step kind `{tag}`",
                did_you_mean(tag, STEP_CLASSES),
            )
        elif kind == "string_pattern_mismatch":
            pattern = error.get("ctx", {}).get("pattern", "")
            self.add(
                "MAS105",
                pointer,
                f"{_shown(error.get('input'))} does not match {pattern}",
                _pattern_hint(pointer),
            )
        elif kind == "literal_error" and pointer == "/spec_version":
            self.add(
                "MAS106",
                pointer,
                f"unsupported spec_version {_shown(error.get('input'))}",
                'use spec_version: "1"',
            )
        else:
            self.add("MAS103", pointer, _type_message(error, path))

    # semantics -----------------------------------------------------------------------------

    def check(self, spec: Spec) -> None:
        self.spec = spec
        self.used_agents: set[str] = set()
        self.used_tools: set[str] = set()
        self.used_flows: set[str] = set()
        for agent_id, agent in spec.agents.items():
            self._check_agent(agent_id, agent)
        for tool_id, tool in spec.tools.items():
            self._check_tool(tool_id, tool)
        self._check_tool_namespaces(spec)
        for name, schema in spec.inputs.items():
            self._check_schema(f"/inputs/{escape_token(name)}", schema)
        self.writers: dict[str, str] = {}
        self.item_locals: dict[str, str] = {}  # variables of a map body -> the map's id
        for pointer, step in iter_spec_steps(spec):
            out = step_out(step)
            if out and out not in self.writers:
                self.writers[out] = pointer
        self._check_constant_names(spec)
        self._check_ids(spec)
        self._check_state(spec)
        self.flow_outputs: dict[str, dict[str, Any]] = {}
        self.declared: dict[str, StateVar] = {}  # a flow's state is its own: none declared
        for name in self._flow_order(spec):
            self._check_flow(name, spec.flows[name])
        self.declared = dict(spec.state)
        scope = _Scope({name: schema for name, schema in spec.inputs.items()}, {})
        for name, var in spec.state.items():
            if var.bound_at_start and name not in spec.inputs:
                scope = scope.bind(name, var.json_schema)
        scope = self._steps(spec.workflow, "/workflow", scope)
        self._check_outputs(spec, scope)
        self._check_unused(spec)
        self._check_prompts(spec)

    def _check_prompts(self, spec: Spec) -> None:
        """Overrides of built-in prompts: only the prompt's own slots, well formed (MAS311,
        MAS302), and a warning when the slot carrying its data is gone (MAS907)."""
        given = spec.prompts.model_dump(exclude_none=True) if spec.prompts is not None else {}
        for name, text in sorted(given.items()):
            builtin = BUILTIN_PROMPTS[name]
            pointer = f"/prompts/{name}"
            slots = sorted(builtin.slots)
            used: set[str] = set()
            for ph in expr.placeholders(text):
                position = position_in_value(self.source, pointer, ph.offset)
                if ph.literal is not None:
                    continue
                if ph.error is not None:
                    self.add(
                        "MAS302",
                        pointer,
                        f"malformed placeholder {ph.text!r}: {ph.error}",
                        "slots are written {{ slot }} (filters too: {{ slot | json }})",
                        position=position,
                    )
                    continue
                used.add(ph.root)
                if ph.root not in builtin.slots or len(ph.path) > 1:
                    self.add(
                        "MAS311",
                        pointer,
                        f"prompt `{name}` has no slot {ph.text!r}: its slots are "
                        + (", ".join(f"{{{{ {s} }}}}" for s in slots) or "none"),
                        did_you_mean(ph.root, slots)
                        or "state variables are not available in built-in prompts",
                        position=position,
                    )
            for slot in builtin.carries:
                if slot not in used:
                    self.add(
                        "MAS907",
                        pointer,
                        f"prompt `{name}` no longer uses {{{{ {slot} }}}} "
                        f"({builtin.slots[slot]}): the model will not see it",
                        f"add {{{{ {slot} }}}} where it belongs",
                        severity="warning",
                    )

    def _check_agent(self, agent_id: str, agent: Agent) -> None:
        here = f"/agents/{escape_token(agent_id)}"
        if agent.model is not None and agent.model not in self.spec.models:
            self.add(
                "MAS203",
                f"{here}/model",
                f"agent `{agent_id}` uses model `{agent.model}`, which is not in `models`",
                did_you_mean(agent.model, self.spec.models),
            )
        for index, tool in enumerate(agent.tools):
            self.used_tools.add(tool)
            if tool not in self.spec.tools:
                self.add(
                    "MAS202",
                    f"{here}/tools/{index}",
                    f"agent `{agent_id}` uses tool `{tool}`, which is not defined in `tools`",
                    did_you_mean(tool, self.spec.tools),
                )
        if isinstance(agent.output, dict):
            self._check_schema(f"{here}/output", agent.output)
        self._check_delegates(agent_id, agent)
        self._check_examples(agent_id, agent)

    def _check_delegates(self, agent_id: str, agent: Agent) -> None:
        """Workers exist, are not the agent itself or one of its tools, form no cycle."""
        here = f"/agents/{escape_token(agent_id)}"
        for index, worker in enumerate(agent.delegates or []):
            pointer = f"{here}/delegates/{index}"
            self.used_agents.add(worker)
            if worker not in self.spec.agents:
                self.add(
                    "MAS201",
                    pointer,
                    f"agent `{agent_id}` delegates to `{worker}`, which is not an agent",
                    did_you_mean(worker, self.spec.agents),
                )
            elif worker == agent_id:
                self.add("MAS211", pointer, f"agent `{agent_id}` delegates to itself")
            elif worker in agent.tools:
                self.add(
                    "MAS211",
                    pointer,
                    f"worker `{worker}` and tool `{worker}` of agent `{agent_id}` would be "
                    "two functions of the same name",
                    "rename the tool or the worker agent",
                )
            elif not _FUNCTION_NAME.fullmatch(worker):
                self.add(
                    "MAS211",
                    pointer,
                    f"worker `{worker}` is offered as a function, and {worker!r} is no "
                    "function name (letters, digits, _ and -, at most 64)",
                )
            elif agent_id in _delegation_closure(self.spec, worker):
                self.add(
                    "MAS211",
                    pointer,
                    f"agents `{agent_id}` and `{worker}` delegate to each other (a cycle)",
                    "a worker cannot hand work back to its manager: remove one direction",
                )

    def _check_examples(self, agent_id: str, agent: Agent) -> None:
        here = f"/agents/{escape_token(agent_id)}/examples"
        for index, example in enumerate(agent.examples or []):
            pointer = f"{here}/{index}/assistant"
            answer = example.assistant
            if isinstance(agent.output, dict):
                problems = _fits(answer, agent.output)
                if problems:
                    self.add(
                        "MAS213",
                        pointer,
                        f"the example answer does not fit agent `{agent_id}`'s output: "
                        + problems[0],
                        "a structured agent's example answer is an object of its output schema",
                    )
            elif not isinstance(answer, str):
                self.add(
                    "MAS213",
                    pointer,
                    f"agent `{agent_id}` answers text, so its example answer is a string",
                )

    def _check_schema(self, pointer: str, schema: dict[str, Any]) -> None:
        problem = _schema_problem(schema) or values.schema_keyword_problem(schema)
        if problem:
            self.add(
                "MAS503",
                pointer,
                problem,
                _FIT_HINT
                if problem.endswith(_NO_MATCH) or "the default" in problem
                else "e.g. {type: object, properties: {answer: {type: string}}}",
            )
        self._check_patterns(pointer, schema)

    def _check_patterns(self, pointer: str, schema: dict[str, Any]) -> None:
        """MAS511: a `pattern` the host would refuse to evaluate (see values.pattern_problem)."""
        found = values.schema_pattern_problem(schema)
        if found:
            self.add(
                "MAS511",
                pointer + found[0],
                found[1],
                "write the repeat so that each pass must start with a character the repeated "
                "part cannot match (`(\\d+,)*`, not `(\\d+,?)*`); instead of a lookaround, "
                "a backreference, `a++` or `(?>...)`, use plain groups, classes and repeats",
            )

    def _check_tool(self, tool_id: str, tool: Tool) -> None:
        here = f"/tools/{escape_token(tool_id)}"
        if (tool.builtin is None) == (tool.code is None):
            self.add("MAS403", here, f"tool `{tool_id}` needs exactly one of `builtin` and `code`")
            return
        if tool.code is None:
            return
        failure = _syntax_error(tool.code)
        if failure is not None:
            message, line = failure
            self.add(
                "MAS401",
                f"{here}/code",
                f"tool code does not parse: {message} (line {line} of the code)",
                "the code must be valid Python 3",
                position=self.source.position_in_block(f"{here}/code", line),
            )
            return
        module = libcst.parse_module(tool.code)
        names = [s.name.value for s in module.body if isinstance(s, libcst.FunctionDef)]
        if tool_id not in names:
            self.add(
                "MAS402",
                f"{here}/code",
                f"tool code defines no top-level function `{tool_id}`",
                did_you_mean(tool_id, names) or f"define `def {tool_id}(...)`",
            )
        self._check_undefined_names(tool_id, tool.code)

    def _check_undefined_names(self, tool_id: str, code: str) -> None:
        """pyflakes' undefined names, at their line in the spec. A name an obvious
        standard-library import defines is a warning with that import as the fix (the
        rectifier adds it too); any other undefined name is an error."""
        pointer = f"/tools/{escape_token(tool_id)}/code"
        for found in toolcode.undefined_names(code):
            position = self._code_position(pointer, found.line, found.column, code)
            where = f"line {found.line} of tool `{tool_id}`'s code"
            if found.fix:
                self.add(
                    "MAS904",
                    pointer,
                    f"`{found.name}` is not defined ({where}): a NameError when that line runs",
                    f"add `{found.fix}` at the top of the code",
                    severity="warning",
                    position=position,
                )
            else:
                self.add(
                    "MAS404",
                    pointer,
                    f"`{found.name}` is not defined ({where})",
                    "define or import it in the tool's code: each tool's code is a module of its own",
                    position=position,
                )

    def _code_position(
        self, pointer: str, line: int, column: int, code: str = ""
    ) -> Position | None:
        """The file position of (line, UTF-8 column) inside a tool's code block."""
        base = self.source.position_in_block(pointer, line)
        info = self.source.scalars.get(pointer)
        if base is None or info is None or info.style not in ("|", ">"):
            return base
        lines = self.source.text.splitlines()
        first = lines[info.position.line - 1] if 0 < info.position.line <= len(lines) else ""
        indent = len(first) - len(first.lstrip(" "))
        code_lines = code.splitlines()
        text = code_lines[line - 1] if 0 < line <= len(code_lines) else ""
        chars = len(text.encode("utf-8")[:column].decode("utf-8", errors="ignore"))
        return Position(base.line, indent + 1 + chars)

    def _check_tool_namespaces(self, spec: Spec) -> None:
        """Tool ids Python cannot tell apart (NFKC), and helpers named like another tool."""
        seen: dict[str, str] = {}
        for tool_id in spec.tools:
            key = toolcode.normalized(tool_id)
            if key in seen:
                self.add(
                    "MAS406",
                    f"/tools/{escape_token(tool_id)}",
                    f"tool `{tool_id}` and tool `{seen[key]}` are the same name to Python "
                    f"(`{key}` after NFKC normalisation)",
                    "rename one of them (ASCII names avoid the question)",
                )
            else:
                seen[key] = tool_id
        for tool_id, tool in spec.tools.items():
            if tool.code is None:
                continue
            for name, line in toolcode.top_level_names(tool.code):
                other = seen.get(toolcode.normalized(name))
                if other is not None and toolcode.normalized(other) != toolcode.normalized(tool_id):
                    pointer = f"/tools/{escape_token(tool_id)}/code"
                    self.add(
                        "MAS905",
                        pointer,
                        f"tool `{tool_id}`'s code defines `{name}`, the name of tool `{other}` "
                        "(each tool's code has its own namespace, so tool "
                        f"`{other}` is unaffected, but a reader will confuse them)",
                        f"rename the helper, e.g. `_{name}`",
                        severity="warning",
                        position=self._code_position(pointer, line, 0, tool.code),
                    )

    def _check_constant_names(self, spec: Spec) -> None:
        """Inputs and `out`s named like a condition constant would read as the constant."""
        named = [(f"/inputs/{escape_token(n)}", n) for n in spec.inputs]
        named += [
            (f"{pointer}/out", out)
            for pointer, step in iter_spec_steps(spec)
            if (out := step_out(step))
        ]
        named += [
            (f"{flow_pointer(f)}/inputs/{escape_token(n)}", n)
            for f, flow in spec.flows.items()
            for n in flow.inputs
        ]
        for pointer, name in named:
            if name.lower() in _CONDITION_CONSTANTS:
                self.add(
                    "MAS310",
                    pointer,
                    f"`{name}` is the constant {_CONDITION_CONSTANTS[name.lower()]} in "
                    "conditions, so a condition could never read this variable",
                    f"rename it, e.g. `{name}_value`",
                    position=self.source.key_position(pointer)
                    if pointer.startswith("/inputs/")
                    else None,
                )

    def _check_ids(self, spec: Spec) -> None:
        first: dict[str, str] = {}
        for pointer, step in iter_spec_steps(spec):
            if step.id in first:
                self.add(
                    "MAS204",
                    f"{pointer}/id",
                    f"step id `{step.id}` is already used at {first[step.id]}",
                    "step ids name checkpoints and trace entries: make them unique",
                )
            else:
                first[step.id] = pointer

    def _check_state(self, spec: Spec) -> None:
        """Declared state variables: names, schemas, reducers and initial values."""
        for name, var in spec.state.items():
            here = f"/state/{escape_token(name)}"
            if not _VAR_NAME.fullmatch(name):
                self.add(
                    "MAS105",
                    here,
                    f"state variable {_shown(name)} is not a variable name",
                    "a Python identifier: letters, digits and '_'",
                    position=self.source.key_position(here),
                )
            if name in spec.inputs:
                self.add(
                    "MAS522",
                    here,
                    f"`{name}` is both an input and a declared state variable",
                    "rename one of them; a step can copy the input into the variable",
                    position=self.source.key_position(here),
                )
            if var.json_schema is not None:
                self._check_schema(f"{here}/schema", var.json_schema)
            self._check_reducer(name, var, here)

    def _check_reducer(self, name: str, var: StateVar, here: str) -> None:
        wanted = REDUCER_TYPES.get(var.reducer)
        kinds = _schema_types(var.json_schema)
        if wanted and kinds and not kinds & set(wanted):
            self.add(
                "MAS520",
                f"{here}/reducer",
                f"reducer `{var.reducer}` combines {' or '.join(wanted)} values, but `{name}` "
                f"is {' or '.join(sorted(kinds))}",
                "append is for lists, merge for objects, add for numbers; replace for anything",
            )
            return
        initial = var.initial_value()
        if "initial" not in var.model_fields_set:
            return
        if wanted and values.json_type(initial) not in wanted:
            self.add(
                "MAS520",
                f"{here}/initial",
                f"reducer `{var.reducer}` needs an initial {' or '.join(wanted)}, got "
                f"{_shown(initial)}",
                f"e.g. initial: {json.dumps(REDUCER_INITIAL_EXAMPLE[var.reducer])}",
            )
        elif var.json_schema is not None:
            problems = _fits(initial, var.json_schema)
            if problems:
                self.add(
                    "MAS521",
                    f"{here}/initial",
                    f"the initial value of `{name}` does not match its schema: {problems[0]}",
                )

    def _declared_write(self, step: Step, here: str, schema: dict[str, Any] | None) -> None:
        """A write to a declared variable goes through its reducer: the written value must
        fit (append: an item of the list; merge: an object; add: a number; replace: the
        variable's schema)."""
        out = step_out(step)
        var = self.declared.get(out or "")
        if var is None or schema is None:
            return
        declared = var.json_schema or {}
        if var.reducer == "append":
            items = declared.get("items")
            expected: Any = items if isinstance(items, dict) else None
        elif var.reducer == "replace":
            expected = declared
        else:
            expected = {"type": list(REDUCER_TYPES[var.reducer])}
        mismatch = _type_mismatch(schema, expected) if expected else None
        if mismatch:
            what = {"append": "an item of", "merge": "merged into", "add": "added to"}
            self.add(
                "MAS523",
                f"{here}/out",
                f"step `{step.id}` writes {mismatch[0]} to `{out}` "
                f"({what.get(var.reducer, 'replacing')} a value of type {mismatch[1]}: "
                f"reducer `{var.reducer}`)",
                f"write a value of type {mismatch[1]}, or change the declaration at /state/{out}",
            )

    def _bind_out(self, step: Step, here: str, scope: _Scope, schema: Any) -> _Scope:
        """Binds a step's `out`: a declared variable keeps its declared schema."""
        out = step_out(step)
        if not out:
            return scope
        self._declared_write(step, here, schema)
        var = self.declared.get(out)
        return scope.bind(out, var.json_schema if var is not None else schema)

    # workflow and scopes ---------------------------------------------------------------

    def _steps(self, steps: list[Step], pointer: str, scope: _Scope) -> _Scope:
        for index, step in enumerate(steps):
            scope = self._step(step, f"{pointer}/{index}", scope)
        return scope

    def _step(self, step: Step, here: str, scope: _Scope) -> _Scope:
        """Checks one step through the registry's facts (never its kind)."""
        for ref in step.agent_refs():
            self._agent_ref(ref.agent, f"{here}/{ref.key}")
        self.used_agents.update(step_agents(step))
        for code, key, message, hint in step.problems():
            self.add(code, f"{here}/{key}" if key else here, message, hint)
        for key, tool in step.tool_refs():
            self._tool_ref(tool, f"{here}/{key}")
        for agent_id in dict.fromkeys(step_agents(step)):
            self._agent_prompts(agent_id, here, scope)
            for worker in sorted(_delegation_closure(self.spec, agent_id) - {agent_id}):
                self._agent_prompts(worker, here, scope)  # a worker's turn renders here too
        for key, text in step.templates():
            self._template(text, f"{here}/{key}", scope)
        for key, text in step.references():
            self._reference(text, f"{here}/{key}", scope)
        self._flow_refs(step, here, scope)
        self._agent_choice(step, here, scope)
        self._chat_history(step, here, scope)
        self._settings(step, here)
        self._vote_on(step, here)
        self._tool_args(step, here, scope)
        before = scope
        shapes = {
            "concurrent": self._parallel,
            "repeat": self._loop,
            "alternatives": self._branch,
            "each": self._each,
        }
        if step.shape in shapes:
            scope = shapes[step.shape](step, here, scope)
        else:
            if step.shape == "sequence":
                for key, children in step.child_lists():
                    scope = self._steps(children, f"{here}/{key}", scope)
            scope = self._bind_out(step, here, scope, self._out_schema(step))
        return self._fallback(step, here, before, scope)

    def _fallback(self, step: Step, here: str, before: _Scope, after: _Scope) -> _Scope:
        """A step's `fallback` runs instead of the rest of a failed step, from the state before
        it, with `error` bound: afterwards, what both paths bind is bound."""
        if not step.fallback:
            return after
        inside = before.bind("error", ERROR_SCHEMA)
        rescued = self._steps(step.fallback, f"{here}/fallback", inside)
        if "error" not in before.bound:
            rescued = _Scope(
                {k: v for k, v in rescued.bound.items() if k != "error"}, rescued.partial
            )
        return before.join([after, rescued], f"step `{step.id}` and its fallback")

    def _agent_prompts(self, agent_id: str, here: str, scope: _Scope) -> None:
        """An agent's role and instructions are rendered at every turn: their placeholders
        must be bound at every step that uses the agent."""
        agent = self.spec.agents.get(agent_id)
        if agent is None:
            return
        for key in ("role", "instructions"):
            text = getattr(agent, key)
            if "{{" in text:
                pointer = f"/agents/{escape_token(agent_id)}/{key}"
                self._template(text, pointer, scope, used_at=here)

    def _vote_on(self, step: Step, here: str) -> None:
        """A vote over structured answers compares one field: `vote_on`, else `answer`.
        (Any step with a `vote` decides among the answers of its sampling agents.)"""
        vote = getattr(step, "vote", None)
        vote_on = getattr(step, "vote_on", None)
        if vote is None:
            if vote_on is not None:
                self.add(
                    "MAS505",
                    f"{here}/vote_on",
                    "`vote_on` needs a `vote` (a judge reads whole answers)",
                )
            return
        if step.flow_refs():
            self._flow_vote_on(step, here, vote_on)
            return
        voters = list(dict.fromkeys(r.agent for r in step.agent_refs() if r.role == "sampler"))
        schemas = {a: self.spec.agents[a].output for a in voters if a in self.spec.agents}
        structured = {a: o for a, o in schemas.items() if isinstance(o, dict)}
        if not structured:
            if vote_on is not None:
                self.add(
                    "MAS505",
                    f"{here}/vote_on",
                    "`vote_on` names a field, but the voting agents answer text",
                    "text answers vote on the answer after their last `ANSWER:`; remove `vote_on`",
                )
            return
        if len(structured) != len(schemas):
            text = sorted(set(schemas) - set(structured))
            self.add(
                "MAS505",
                f"{here}/vote",
                f"a vote mixes text and structured answers (text: {', '.join(text)})",
                "give every voting agent the same kind of output",
            )
            return
        key = vote_on or "answer"
        for agent_id, schema in structured.items():
            declared = schema.get("properties")
            properties: dict[str, Any] = declared if isinstance(declared, dict) else {}
            if key in properties:
                continue
            choices = ", ".join(f"`{p}`" for p in properties) or "none"
            if vote_on is None:
                self.add(
                    "MAS505",
                    f"{here}/vote",
                    f"agent `{agent_id}`'s output schema has no `answer` field to vote on "
                    f"(its fields: {choices})",
                    "add `vote_on: <field>` naming the field the vote compares",
                )
            else:
                self.add(
                    "MAS505",
                    f"{here}/vote_on",
                    f"agent `{agent_id}`'s output schema has no field `{key}` (its fields: {choices})",
                    did_you_mean(key, properties),
                )

    def _tool_args(self, step: Step, here: str, scope: _Scope) -> None:
        """Arguments against the tool function's annotations: names, required, types.

        A whole placeholder passes its value, so its known schema must fit; any other
        string is text, which fits only a `str` (or unannotated) parameter. (Any step
        with `args` passes them to the one tool it names.)"""
        args = getattr(step, "args", None)
        refs = step.tool_refs()
        if not isinstance(args, dict) or len(refs) != 1:
            return
        tool_id = refs[0][1]
        tool = self.spec.tools.get(tool_id)
        found = toolcode.signature(tool_id, tool.code) if tool and tool.code else None
        if found is None:
            return
        properties: dict[str, Any] = found.parameters.get("properties", {})
        for name in found.parameters.get("required", []):
            if name not in args:
                self.add(
                    "MAS405",
                    f"{here}/args",
                    f"tool `{tool_id}` needs argument `{name}`",
                    f"its parameters: {', '.join(properties) or 'none'}",
                )
        for name, value in args.items():
            pointer = f"{here}/args/{escape_token(name)}"
            if name not in properties:
                if not found.varkw:
                    self.add(
                        "MAS405",
                        pointer,
                        f"tool `{tool_id}` has no parameter `{name}`",
                        did_you_mean(name, properties),
                        position=self.source.key_position(pointer),
                    )
                continue
            expected = properties[name]
            problem = self._argument_problem(value, expected, scope)
            if problem:
                self.add(
                    "MAS405",
                    pointer,
                    f"argument `{name}` of tool `{tool_id}`: {problem}",
                    "a string that is exactly one placeholder passes the value itself; "
                    "inside a larger string it is text",
                )

    def _argument_problem(self, value: Any, expected: dict[str, Any], scope: _Scope) -> str | None:
        if not expected:
            return None
        if isinstance(value, str):
            whole = values.whole_placeholder(value)
            if whole is not None and whole.path and whole.error is None:
                known = _filtered_schema(self._schema_at(whole.path, scope), whole.filters)
                mismatch = _type_mismatch(known, expected)
                if mismatch:
                    return f"`{{{{ {'.'.join(whole.path)} }}}}` is {mismatch[0]}, the parameter wants {mismatch[1]}"
                return None
            if values.placeholders(value):
                mismatch = _type_mismatch({"type": "string"}, expected)
                if mismatch:
                    return f"the placeholders sit inside a larger string, which is text; the parameter wants {mismatch[1]}"
                return None
        if isinstance(value, list | dict) and _holds_placeholder(value):
            return self._container_problem(value, expected, scope)
        problems = _fits(value, expected)
        return problems[0].partition(": ")[2] if problems else None

    def _container_problem(
        self, value: list[Any] | dict[str, Any], expected: dict[str, Any], scope: _Scope
    ) -> str | None:
        """A list or object holding placeholders, against the parameter's schema: each
        element checked as an argument of its own (a whole placeholder by its known type)."""
        alternatives = expected.get("anyOf")
        if isinstance(alternatives, list) and alternatives:
            found = [
                self._container_problem(value, alt, scope)
                for alt in alternatives
                if isinstance(alt, dict)
            ]
            return None if None in found or not found else found[0]
        kind = "array" if isinstance(value, list) else "object"
        mismatch = _type_mismatch({"type": kind}, expected)
        if mismatch:
            return f"a {kind} is given, the parameter wants {mismatch[1]}"
        if isinstance(value, list):
            items = expected.get("items")
            for index, element in enumerate(value):
                problem = self._argument_problem(
                    element, items if isinstance(items, dict) else {}, scope
                )
                if problem:
                    return f"item {index}: {problem}"
            return None
        properties = expected.get("properties") or {}
        extra = expected.get("additionalProperties")
        for key, element in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else {})
            problem = self._argument_problem(element, sub, scope)
            if problem:
                return f"field {key!r}: {problem}"
        missing = [name for name in expected.get("required") or [] if name not in value]
        return f"missing field {missing[0]!r}" if missing else None

    def _tool_ref(self, tool: str, pointer: str) -> None:
        self.used_tools.add(tool)
        if tool not in self.spec.tools:
            self.add(
                "MAS202",
                pointer,
                f"unknown tool `{tool}`",
                did_you_mean(tool, self.spec.tools),
            )

    def _parallel(self, step: Step, here: str, scope: _Scope) -> _Scope:
        """Nested lists that run concurrently: each starts from `scope`; all are merged.
        Two of them writing the same variable is a race (MAS506)."""
        self._parallel_results(step, here)
        writers: dict[str, str] = {}
        combining = {name for name, var in self.declared.items() if var.combines}
        for key, children in step.child_lists():
            for name, step_id in expr.all_writes(children).items():
                if name in writers and writers[name] != key and name not in combining:
                    pointer = next(
                        p for p, s in iter_steps(children, f"{here}/{key}") if s.id == step_id
                    )
                    self.add(
                        "MAS506",
                        f"{pointer}/out",
                        f"{writers[name].replace('/', ' ')} and {key.replace('/', ' ')} of "
                        f"`{step.id}` both write `{name}`: they run concurrently, so which "
                        "value survives is chance",
                        "give each branch its own variable; the parallel's `out` lists each "
                        "branch's result",
                    )
                writers.setdefault(name, key)
        after = scope
        for key, children in step.child_lists():
            result = self._steps(children, f"{here}/{key}", scope)
            after = after.merge_all(result)
        return self._bind_out(step, here, after, self._out_schema(step))

    def _parallel_results(self, step: Step, here: str) -> None:
        """MAS910 (warning): with `out`, each branch's entry is the last variable the branch writes on
        every path; a branch that writes only on some paths (inside a nested `branch` whose
        arms write different variables) would give null, silently."""
        if not step_out(step):
            return
        for key, children in step.child_lists():
            some = sorted(expr.all_writes(children))
            if expr.definite_writes(children) or not some:
                continue  # a branch run for its effects (writing nothing) is not flagged
            self.add(
                "MAS910",
                f"{here}/{key}",
                f"branch {key.rsplit('/', 1)[-1]} of parallel `{step.id}` writes no variable on every "
                "path"
                + f" ({', '.join(f'`{n}`' for n in some)} only on some)"
                + f", so its entry in `{step_out(step)}` would be null",
                "make every arm of the nested `branch` (and its `else`) write the same "
                "variable, or end the branch with a step that writes its result",
                severity="warning",
            )

    def _each(self, step: Step, here: str, scope: _Scope) -> _Scope:
        """A body run once per item (`map`), each in a scope of its own: the item and index
        are bound inside; what the body writes stays inside, except declared variables
        with a combining reducer; the step's `out` is the list of the items' results."""
        names = step.item_names() or ("item", "index")
        item_schema = self._each_over(step, here, scope)
        for key, name in zip(("as", "index"), names, strict=True):
            if name in scope.bound or name in self.declared:
                self.add(
                    "MAS524",
                    f"{here}/{key}",
                    f"`{name}` is already a variable here: inside the body it would hide it",
                    f"name the item's variable differently, e.g. `{key}: {name}_{step.id}`"
                    if name != names[0] or key != "as"
                    else f"e.g. `as: {name}_item`",
                )
        body = scope.bind(names[0], item_schema).bind(names[1], {"type": "integer"})
        for key, children in step.child_lists():
            body = self._steps(children, f"{here}/{key}", body)
            self._each_writes(step, children, f"{here}/{key}")
        for key, text in step.body_templates():
            self._template(text, f"{here}/{key}", body)
        for name in body.bound:
            if name not in scope.bound:
                self.item_locals.setdefault(name, step.id)
        result = self._each_result(step, here, body)
        return self._bind_out(step, here, scope, {"type": "array", **result})

    def _each_over(self, step: Step, here: str, scope: _Scope) -> dict[str, Any] | None:
        """The schema of one item of the list a map runs over (None: unknown); MAS525 when
        `over` is not one whole placeholder, or is known not to be a list."""
        over = next((text for key, text in step.templates() if key == "over"), None)
        whole = values.whole_placeholder(over) if over is not None else None
        if whole is None or not whole.path or whole.error is not None or whole.filters:
            self.add(
                "MAS525",
                f"{here}/over",
                f"`over` must be one whole placeholder naming a list, got {_shown(over)}",
                'e.g. over: "{{ plan.questions }}"',
            )
            return None
        if whole.path[0] not in scope.bound:
            return None  # MAS301 already says so
        known = self._schema_at(whole.path, scope)
        kinds = _schema_types(known)
        if kinds and "array" not in kinds:
            self.add(
                "MAS525",
                f"{here}/over",
                f"`{'.'.join(whole.path)}` is {' or '.join(sorted(kinds))}, not a list",
                "map over a list: an input of type array, or an agent's array field",
            )
            return None
        items = known.get("items") if isinstance(known, dict) else None
        return items if isinstance(items, dict) else None

    def _each_writes(self, step: Step, children: list[Step], pointer: str) -> None:
        """Items run concurrently: a declared variable written in the body must combine."""
        for child_pointer, child in iter_steps(children, pointer):
            out = step_out(child)
            var = self.declared.get(out or "")
            if var is not None and not var.combines:
                self.add(
                    "MAS526",
                    f"{child_pointer}/out",
                    f"`{out}` is written by every item of map `{step.id}`, concurrently, and "
                    "its reducer `replace` keeps only one of the writes",
                    f"give /state/{out} a combining reducer (append, merge, add), or use a "
                    "variable of the body and the map's `out`",
                )

    def _each_result(self, step: Step, here: str, body: _Scope) -> dict[str, Any]:
        """The schema of one item's result, as `{"items": ...}` when known."""
        result = getattr(step, "result", None)
        if result is None:
            written = [
                name
                for _key, children in step.child_lists()
                for name in expr.definite_writes(children)
                if name not in self.declared  # declared: shared, not the item's own
            ]
            if not written:
                if step_out(step):
                    self.add(
                        "MAS527",
                        here,
                        f"map `{step.id}` has `out` but no result: its steps write no variable "
                        "on every path",
                        'add `result: "{{ <variable> }}"` (or an object of placeholders)',
                    )
                return {}
            schema = body.bound.get(written[-1])
        elif isinstance(result, str) and (whole := values.whole_placeholder(result)) is not None:
            schema = (
                _filtered_schema(self._schema_at(whole.path, body), whole.filters)
                if whole.path and whole.error is None
                else None
            )
        else:
            schema = {"type": values.json_type(result)} if not isinstance(result, str) else None
            schema = schema or {"type": "string"}
        return {"items": schema} if isinstance(schema, dict) else {}

    def _loop(self, step: Step, here: str, scope: _Scope) -> _Scope:
        """Nested lists repeated: conditions read the state after the body."""
        body = scope
        for key, children in step.child_lists():
            body = self._steps(children, f"{here}/{key}", body)
        for key, condition in step.conditions():
            self._condition(condition, f"{here}/{key}", body)
        return body

    def _branch(self, step: Step, here: str, scope: _Scope) -> _Scope:
        """One nested list runs, chosen by the conditions; without a default arm (more
        lists than conditions) the state may also pass through unchanged."""
        conditions = step.conditions()
        for key, condition in conditions:
            self._condition(condition, f"{here}/{key}", scope)
        lists = step.child_lists()
        arms = [self._steps(children, f"{here}/{key}", scope) for key, children in lists]
        if len(lists) <= len(conditions):
            arms.append(scope)
        return scope.join(arms, f"branch `{step.id}`")

    def _out_schema(self, step: Step) -> dict[str, Any] | None:
        """The registry's schema of what a step writes; where it has none: the text answer
        of its answering agent (marked, for MAS307), or the return annotation of its tool."""
        schema = step.out_schema(self.spec.agents)
        if isinstance(step, ProgrammerStep) and schema is not None and not step.expect_output:
            # Its `output` is marked, for MAS911: a run that prints nothing passes.
            properties = dict(schema["properties"])
            properties["output"] = {**properties["output"], _PRINTED_BY: step.id}
            return {**schema, "properties": properties}
        if schema is not None:
            return schema
        answering = step.answer_agents()
        flows = step.flow_refs()
        if flows and not answering:  # the flow's outputs object (a sample of it, voted)
            return self.flow_outputs.get(flows[0][1])
        agent = self.spec.agents.get(answering[0]) if answering else None
        if agent is not None and not isinstance(agent.output, dict):
            return {"type": "string", _TEXT_OF: answering[0]}
        refs = step.tool_refs()
        tool = self.spec.tools.get(refs[0][1]) if len(refs) == 1 else None
        if tool is not None and tool.code is not None:
            found = toolcode.signature(refs[0][1], tool.code)
            return (found.returns or None) if found else None
        return None

    # leaves --------------------------------------------------------------------------

    def _agent_ref(self, name: str, pointer: str) -> None:
        if name not in self.spec.agents:
            self.add(
                "MAS201", pointer, f"unknown agent `{name}`", did_you_mean(name, self.spec.agents)
            )

    def _template(self, text: str, pointer: str, scope: _Scope, used_at: str | None = None) -> None:
        for ph in expr.placeholders(text):
            position = position_in_value(self.source, pointer, ph.offset)
            if ph.literal is not None:
                continue
            if ph.error is not None:
                self.add(
                    "MAS302",
                    pointer,
                    f"malformed placeholder {ph.text!r}: {ph.error}",
                    "placeholders are {{ name }}, {{ name.field }} or {{ name | filter }}; "
                    'single braces are plain text; write a literal {{ as {{ "{{" }}',
                    position=position,
                )
                continue
            self._read(ph.path, pointer, scope, position, "MAS301", used_at)
            if ph.filters and ph.root in scope.bound:
                self._filters(ph, pointer, scope, position)

    def _filters(
        self, ph: values.Placeholder, pointer: str, scope: _Scope, position: Position | None
    ) -> None:
        """A filter that cannot take the value's known type (`join` of a number)."""
        schema: Any = self._schema_at(ph.path, scope)
        for name, _argument in ph.filters:
            wanted = _FILTER_TYPES.get(name)
            kinds = _schema_types(schema)
            if wanted and kinds and not kinds & wanted:
                self.add(
                    "MAS302",
                    pointer,
                    f"filter `{name}` in {ph.text!r} needs {' or '.join(sorted(wanted))}, "
                    f"but `{'.'.join(ph.path)}` is {' or '.join(sorted(kinds))}",
                    "`join` takes a list, `length` a list, object or string; "
                    "`json` and `text` take anything",
                    position=position,
                )
                return
            schema = _filtered_schema(schema, ((name, None),))

    def _reference(self, text: str, pointer: str, scope: _Scope) -> None:
        path = expr.parse_path(text)
        if path is None:
            self.add(
                "MAS302", pointer, f"{text!r} is not a state variable path", "e.g. solution.code"
            )
            return
        self._read(path, pointer, scope, None, "MAS301")

    def _read(
        self,
        path: tuple[str, ...],
        pointer: str,
        scope: _Scope,
        position: Position | None,
        code: str,
        used_at: str | None = None,
    ) -> None:
        root = path[0]
        at = f" (when step {used_at} uses the agent)" if used_at else ""
        if root not in scope.bound:
            self.add(
                code,
                pointer,
                _unbound_message(root, scope, self.writers, self.item_locals) + at,
                _unbound_hint(root, scope, self.writers)
                if root not in self.item_locals
                else "read the map's `out` (or set its `result`) after the map",
                position=position,
            )
            return
        problem = _path_problem(path, scope.bound[root])
        if problem is not None:
            problem_code, message, hint = problem
            self.add(problem_code, pointer, message + at, hint, position=position)
            return
        printed_by = (self._schema_at(path, scope) or {}).get(_PRINTED_BY)
        if printed_by is not None:
            self.add(
                "MAS911",
                pointer,
                f"`{'.'.join(path)}` is what programmer step `{printed_by}`'s program printed, "
                "but without `expect_output: true` an attempt that prints nothing passes "
                "(and this reads an empty text)",
                f"add `expect_output: true` to step `{printed_by}` (its program must print "
                "its answer), or read its `passed`/`code` instead",
                severity="warning",
                position=position,
            )

    def _schema_at(self, path: tuple[str, ...], scope: _Scope) -> dict[str, Any] | None:
        """The known schema of the value at a state path (None: unknown)."""
        schema = scope.bound.get(path[0])
        for part in path[1:]:
            schema = _child_schema(schema, part)
        return schema

    def _condition(self, text: str, pointer: str, scope: _Scope) -> None:
        try:
            node = expr.parse_condition(text)
        except expr.ExpressionError as exc:
            code = "MAS304" if exc.message.startswith("not a valid") else "MAS303"
            self.add(
                code,
                pointer,
                f"{exc.message}: {text.strip()!r}",
                "conditions allow names, literals, a.b, a[0], comparisons, and/or/not, in, len()",
                position=position_in_value(self.source, pointer, exc.column),
            )
            return
        for path, column in expr.condition_paths(node, text):
            self._read(
                path, pointer, scope, position_in_value(self.source, pointer, column), "MAS305"
            )
        self._comparisons(node, text, pointer, scope)
        self._typed_operations(node, text, pointer, scope)
        self._truth_values(node, text, pointer, scope)

    def _truth_values(self, node: ast.expr, text: str, pointer: str, scope: _Scope) -> None:
        """MAS513: a value used as true or false (`until: review.passed`) whose known type
        is not boolean: the string "false" would count as true. Unknown types are checked
        at run time (`truth`, a `condition` error)."""
        for path_node in expr.truth_paths(node):
            kinds = self._kinds_of(path_node, scope)
            if not kinds or "boolean" in kinds:
                continue
            shown = ast.unparse(path_node)
            self.add(
                "MAS513",
                pointer,
                f"`{shown}` is {' or '.join(sorted(kinds))}, used as true or false: a condition "
                "uses only booleans as they are",
                "compare it: " + _truth_hint(shown, kinds),
                position=position_in_value(
                    self.source,
                    pointer,
                    expr.condition_offset(text, path_node.lineno, path_node.col_offset),
                ),
            )

    def _comparisons(self, node: ast.expr, text: str, pointer: str, scope: _Scope) -> None:
        """`route.category == "Legal"` against an enum of lowercase labels, `score > "5"`
        against a number, `review.passed == "false"` against a boolean: always false (or
        a TypeError) at run time, so errors here."""
        for compare in (n for n in ast.walk(node) if isinstance(n, ast.Compare)):
            operands = [compare.left, *compare.comparators]
            for op, left, right in zip(compare.ops, operands, operands[1:], strict=False):
                for side, other in ((left, right), (right, left)):
                    path = _state_path(side)
                    if path is None or path[0] not in scope.bound:
                        continue
                    schema = self._schema_at(path, scope)
                    if not isinstance(schema, dict):
                        continue
                    if (
                        isinstance(op, ast.In | ast.NotIn)
                        and side is left
                        and isinstance(other, ast.List | ast.Tuple)
                    ):
                        constants = list(other.elts)
                    elif isinstance(op, ast.In | ast.NotIn):
                        continue
                    else:
                        constants = [other]
                    for constant in constants:
                        self._compare_constant(path, schema, constant, text, pointer)

    def _kinds_of(self, node: ast.expr, scope: _Scope) -> set[str]:
        """The JSON types a condition operand can have (integer as number); empty: unknown."""
        value = _constant_value(node)
        if value is not _NOT_CONSTANT:
            kind = values.json_type(value)
            return {"number" if kind == "integer" else kind}
        if isinstance(node, ast.Call):
            return {"number"}  # len()
        if isinstance(node, ast.List | ast.Tuple):
            return {"array"}
        if isinstance(node, ast.Compare) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)
        ):
            return {"boolean"}
        path = _state_path(node)
        if path is None or path[0] not in scope.bound:
            return set()
        kinds = _schema_types(self._schema_at(path, scope))
        return {"number" if kind == "integer" else kind for kind in kinds}

    def _typed_operations(self, node: ast.expr, text: str, pointer: str, scope: _Scope) -> None:
        """Operations whose operands' known types make them fail or never hold at run time:
        two fields of different types compared (`rv.cat == rv.score`: always false), an
        ordering across types (`rv.score > rv.cat`: a TypeError), `len()` of a number or
        boolean, `in` a value that holds nothing or a string for a non-string."""
        for sub in ast.walk(node):
            position = position_in_value(
                self.source,
                pointer,
                expr.condition_offset(
                    text, getattr(sub, "lineno", 1), getattr(sub, "col_offset", 0)
                ),
            )
            if isinstance(sub, ast.Call) and sub.args:
                kinds = self._kinds_of(sub.args[0], scope)
                if kinds and not kinds & {"string", "array", "object"}:
                    shown = ast.get_source_segment(text.strip(), sub) or "len(...)"
                    self.add(
                        "MAS512",
                        pointer,
                        f"`{shown}`: len() of a {' or '.join(sorted(kinds))} value fails at run time",
                        "len() takes a string, a list or an object",
                        position=position,
                    )
            if not isinstance(sub, ast.Compare):
                continue
            operands = [sub.left, *sub.comparators]
            for op, left, right in zip(sub.ops, operands, operands[1:], strict=False):
                problem = self._operation_problem(op, left, right, scope)
                if problem:
                    code, message = problem
                    shown = ast.get_source_segment(text.strip(), sub) or text.strip()
                    self.add(
                        code,
                        pointer,
                        f"`{shown}`: {message}",
                        "compare values of one type; a structured answer's fields have the "
                        "types of the agent's output schema",
                        position=position,
                    )

    def _operation_problem(
        self, op: ast.cmpop, left: ast.expr, right: ast.expr, scope: _Scope
    ) -> tuple[str, str] | None:
        lk, rk = self._kinds_of(left, scope), self._kinds_of(right, scope)
        constant = (
            _constant_value(left) is not _NOT_CONSTANT
            or _constant_value(right) is not _NOT_CONSTANT
        )
        if isinstance(op, ast.In | ast.NotIn):
            if rk and not rk & {"string", "array", "object"}:
                return "MAS512", f"`in` a {' or '.join(sorted(rk))} value fails at run time"
            if rk == {"string"} and lk and "string" not in lk:
                return "MAS512", (
                    f"a {' or '.join(sorted(lk))} value `in` a string fails at run time "
                    "(only text is found in text)"
                )
            return None
        if not lk or not rk or constant:
            return None  # a constant side is checked by _compare_constant (MAS308/MAS309)
        if isinstance(op, ast.Eq | ast.NotEq | ast.Is | ast.IsNot):
            if lk.isdisjoint(rk):
                verdict = "never" if isinstance(op, ast.Eq | ast.Is) else "always"
                return "MAS309", (
                    f"compares a {' or '.join(sorted(lk))} with a {' or '.join(sorted(rk))}: "
                    f"it {verdict} holds"
                )
            return None
        orderable = {"number", "string", "array"}
        if not any(kind in rk for kind in lk & orderable):
            return "MAS309", (
                f"orders a {' or '.join(sorted(lk))} against a {' or '.join(sorted(rk))}: "
                "a TypeError at run time"
            )
        return None

    def _compare_constant(
        self, path: tuple[str, ...], schema: dict[str, Any], node: ast.expr, text: str, pointer: str
    ) -> None:
        value = _constant_value(node)
        if value is _NOT_CONSTANT or value is None:
            return
        name = ".".join(path)
        position = position_in_value(
            self.source, pointer, expr.condition_offset(text, node.lineno, node.col_offset)
        )
        enum = schema.get("enum")
        if isinstance(enum, list) and not any(_json_equal(value, option) for option in enum):
            options = [o for o in enum if isinstance(o, str)]
            close = [
                o for o in options if isinstance(value, str) and o.casefold() == value.casefold()
            ]
            hint = (
                f"did you mean {json.dumps(close[0])}?"
                if close
                else ("one of: " + ", ".join(json.dumps(o) for o in enum))
            )
            self.add(
                "MAS308",
                pointer,
                f"`{name}` is one of {', '.join(json.dumps(o) for o in enum)}; "
                f"it never equals {json.dumps(value)}",
                hint,
                position=position,
            )
            return
        agent = schema.get(_TEXT_OF)
        if agent and isinstance(value, str):
            self.add(
                "MAS913",
                pointer,
                f"`{name}` is the free text answer of agent `{agent}`: it equals "
                f"{json.dumps(value)} only when the reply is exactly that text (not "
                f"{json.dumps(value.capitalize() + '.' if value else 'ok')}, not with a newline)",
                f"give agent `{agent}` an `output` schema with an enum field (say "
                f"`{{type: object, properties: {{category: {{enum: [{value}, ...]}}}}, "
                f"required: [category]}}`) and compare `{name}.category`; the reply is then checked",
                severity="warning",
                position=position,
            )
            return
        kinds = _schema_types(schema)
        if (
            kinds
            and values.json_type(value) not in kinds
            and not (  # integers and numbers compare with each other
                values.json_type(value) in ("integer", "number") and kinds & {"integer", "number"}
            )
        ):
            self.add(
                "MAS309",
                pointer,
                f"`{name}` is {' or '.join(sorted(kinds))}, compared with the "
                f"{values.json_type(value)} {json.dumps(value)}",
                _compare_hint(kinds, value),
                position=position,
            )

    # flows -----------------------------------------------------------------------------

    def _flow_order(self, spec: Spec) -> list[str]:
        """Flow names, callees before callers; reports bad names (MAS105) and each cycle
        once, at the step that closes it (MAS209)."""
        calls: dict[str, list[tuple[str, str]]] = {}  # flow -> (called flow, pointer)
        for name, flow in spec.flows.items():
            here = flow_pointer(name)
            if not _FLOW_NAME.fullmatch(name):
                self.add(
                    "MAS105",
                    here,
                    f"flow name {name!r} does not match {_FLOW_NAME.pattern}",
                    "a letter or _, then letters, digits, _ or -",
                )
            calls[name] = [
                (called, f"{pointer}/{key}")
                for pointer, step in iter_steps(flow.steps, f"{here}/steps")
                for key, called in step.flow_refs()
                if called in spec.flows
            ]
        order: list[str] = []
        state: dict[str, str] = {}  # name -> "open" | "done"

        def visit(name: str, path: list[str]) -> None:
            state[name] = "open"
            for called, pointer in calls[name]:
                if state.get(called) == "open":
                    cycle = [*path[path.index(called) :], called] if called in path else [called]
                    self.add(
                        "MAS209",
                        pointer,
                        "flows call each other in a cycle: "
                        + " -> ".join(f"`{n}`" for n in [*cycle[:-1], called])
                        if len(cycle) > 2
                        else f"flow `{called}` runs itself",
                        "flows cannot recurse: bound the repetition with a `loop`, or "
                        "inline the inner flow",
                    )
                elif called not in state:
                    visit(called, [*path, called])
            state[name] = "done"
            order.append(name)

        for name in spec.flows:
            if name not in state:
                visit(name, [name])
        return order

    def _check_flow(self, name: str, flow: FlowDef) -> None:
        """A flow is checked like a workflow of its own: its scope starts as its inputs."""
        here = flow_pointer(name)
        for input_name, schema in flow.inputs.items():
            self._check_schema(f"{here}/inputs/{escape_token(input_name)}", schema)
        scope = _Scope(dict(flow.inputs), {})
        scope = self._steps(flow.steps, f"{here}/steps", scope)
        properties: dict[str, Any] = {}
        for output, target in flow.outputs.items():
            pointer = f"{here}/outputs/{escape_token(output)}"
            properties[output] = {}  # reported here once, never again where it is read
            path = expr.parse_path(target)
            if path is None:
                self.add(
                    "MAS205",
                    pointer,
                    f"output `{output}` of flow `{name}` = {target!r} is not a state variable path",
                )
                continue
            if path[0] not in scope.bound:
                self.add(
                    "MAS205",
                    pointer,
                    f"output `{output}` of flow `{name}` names `{path[0]}`: "
                    + _unbound_message(path[0], scope, self.writers),
                    "a flow sees only its inputs and what its own steps write",
                )
                continue
            self._read(path, pointer, scope, None, "MAS205")
            found = self._schema_at(path, scope) or {}
            # MAS911 is reported here, at the flow's output, not again where it is read.
            properties[output] = {k: v for k, v in found.items() if k != _PRINTED_BY}
        self.flow_outputs[name] = {
            "type": "object",
            "properties": properties,
            "required": sorted(properties),
        }

    def _flow_refs(self, step: Step, here: str, scope: _Scope) -> None:
        """Each flow a step runs exists, and its `with` fits the flow's inputs (MAS208)."""
        for key, name in step.flow_refs():
            self.used_flows.add(name)
            flow = self.spec.flows.get(name)
            if flow is None and name in self.failed_imports:
                continue  # reported once, at the import (MAS214)
            if flow is None:
                self.add(
                    "MAS207",
                    f"{here}/{key}",
                    f"unknown flow `{name}`",
                    did_you_mean(name, self.spec.flows),
                )
                continue
            args = getattr(step, "with_", None) or {}
            for input_name, schema in flow.inputs.items():
                if input_name not in args and "default" not in schema:
                    self.add(
                        "MAS208",
                        f"{here}/with" if args else here,
                        f"flow `{name}` needs input `{input_name}`",
                        f"its inputs: {', '.join(flow.inputs)}; pass it in `with`",
                    )
            for arg, value in args.items():
                pointer = f"{here}/with/{escape_token(arg)}"
                if arg not in flow.inputs:
                    self.add(
                        "MAS208",
                        pointer,
                        f"flow `{name}` has no input `{arg}`",
                        did_you_mean(arg, flow.inputs),
                        position=self.source.key_position(pointer),
                    )
                    continue
                problem = self._argument_problem(value, flow.inputs[arg], scope)
                if problem:
                    self.add(
                        "MAS208",
                        pointer,
                        f"input `{arg}` of flow `{name}`: {problem}",
                        "a string that is exactly one placeholder passes the value itself; "
                        "inside a larger string it is text",
                    )

    def _agent_choice(self, step: Step, here: str, scope: _Scope) -> None:
        """`agent: "{{ route.owner }}"` with `agents`: a whole placeholder whose known
        values (an enum, a constant) all lie in the set."""
        choice = step.agent_choice()
        if choice is None:
            return
        key, text, allowed = choice
        pointer = f"{here}/{key}"
        whole = values.whole_placeholder(text)
        if whole is None or not whole.path or whole.error is not None:
            self.add(
                "MAS210",
                pointer,
                f"with `agents`, `agent` is a placeholder naming one of them; got {text!r}",
                'e.g. agent: "{{ route.owner }}"',
            )
            return
        if whole.path[0] not in scope.bound:
            return  # MAS301, from templates()
        schema = _filtered_schema(self._schema_at(whole.path, scope), whole.filters)
        if not isinstance(schema, dict):
            return
        kinds = _schema_types(schema)
        options = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if kinds and "string" not in kinds:
            self.add(
                "MAS210",
                pointer,
                f"`{'.'.join(whole.path)}` is {' or '.join(sorted(kinds))}, not an agent id",
            )
        elif isinstance(options, list):
            outside = [o for o in options if o not in allowed]
            if outside:
                self.add(
                    "MAS210",
                    pointer,
                    f"`{'.'.join(whole.path)}` may be {', '.join(json.dumps(o) for o in outside)}, "
                    f"outside agents [{', '.join(allowed)}]",
                    "add those agents to `agents`, or narrow the enum",
                )

    def _chat_history(self, step: Step, here: str, scope: _Scope) -> None:
        found = step.chat_history()
        if found is None:
            return
        key, text = found
        whole = values.whole_placeholder(text)
        if whole is None or not whole.path or whole.error is not None:
            self.add(
                "MAS212",
                f"{here}/{key}",
                f"`history` is a whole placeholder of a chat history; got {text!r}",
                'declare an input `{type: chat}` and write history: "{{ name }}"',
            )
            return
        schema = self._schema_at(whole.path, scope) if whole.path[0] in scope.bound else None
        kinds = _schema_types(schema)
        if kinds and "array" not in kinds:
            self.add(
                "MAS212",
                f"{here}/{key}",
                f"`{'.'.join(whole.path)}` is {' or '.join(sorted(kinds))}, not a list of messages",
                "declare the input as {type: chat}",
            )

    def _settings(self, step: Step, here: str) -> None:
        model = step.settings.model if step.settings is not None else None
        if model is not None and model not in self.spec.models:
            self.add(
                "MAS203",
                f"{here}/settings/model",
                f"step `{step.id}` uses model `{model}`, which is not in `models`",
                did_you_mean(model, self.spec.models),
            )

    def _flow_vote_on(self, step: Step, here: str, vote_on: str | None) -> None:
        """A vote over flow samples compares one field of the flow's outputs."""
        name = step.flow_refs()[0][1]
        flow = self.spec.flows.get(name)
        if flow is None:
            return
        key = vote_on or "answer"
        if key not in flow.outputs:
            choices = ", ".join(f"`{o}`" for o in flow.outputs)
            self.add(
                "MAS505",
                f"{here}/vote_on" if vote_on else f"{here}/vote",
                f"flow `{name}` has no output `{key}` to vote on (its outputs: {choices})",
                did_you_mean(key, flow.outputs)
                if vote_on
                else "add `vote_on: <output>` naming the output the vote compares",
            )

    def _check_outputs(self, spec: Spec, scope: _Scope) -> None:
        for name, target in spec.outputs.items():
            pointer = f"/outputs/{escape_token(name)}"
            path = expr.parse_path(target)
            if path is None:
                self.add(
                    "MAS205", pointer, f"output `{name}` = {target!r} is not a state variable path"
                )
            elif path[0] not in scope.bound:
                self.add(
                    "MAS205",
                    pointer,
                    f"output `{name}` names `{path[0]}`: "
                    + _unbound_message(path[0], scope, self.writers),
                    _unbound_hint(path[0], scope, self.writers),
                )
            else:
                self._read(path, pointer, scope, None, "MAS205")

    def _check_unused(self, spec: Spec) -> None:
        for agent_id in spec.agents:
            if agent_id not in self.used_agents:
                self.add(
                    "MAS901",
                    f"/agents/{escape_token(agent_id)}",
                    f"agent `{agent_id}` is not used by any step",
                    severity="warning",
                )
        for tool_id in spec.tools:
            if tool_id not in self.used_tools:
                self.add(
                    "MAS902",
                    f"/tools/{escape_token(tool_id)}",
                    f"tool `{tool_id}` is not used by any agent or step",
                    severity="warning",
                )
        for name in spec.flows:
            if name not in self.used_flows:
                self.add(
                    "MAS906",
                    flow_pointer(name),
                    f"flow `{name}` is not run by any step",
                    severity="warning",
                )
        used_models = {a.model for a in spec.agents.values()}
        for model_id in spec.models:
            if model_id not in used_models:
                self.add(
                    "MAS903",
                    f"/models/{escape_token(model_id)}",
                    f"model `{model_id}` is not used by any agent",
                    severity="warning",
                )


@dataclass(frozen=True)
class _Scope:
    """State variables bound at a point of the workflow (name -> output schema or None)."""

    bound: dict[str, dict[str, Any] | None]
    partial: dict[str, str]  # written on some paths only: name -> the branch step's id

    def bind(self, name: str, schema: dict[str, Any] | None) -> _Scope:
        partial = {k: v for k, v in self.partial.items() if k != name}
        return _Scope({**self.bound, name: schema}, partial)

    def merge_all(self, other: _Scope) -> _Scope:
        return _Scope({**self.bound, **other.bound}, {**self.partial, **other.partial})

    def join(self, arms: list[_Scope], step_id: str) -> _Scope:
        """After a branch (or a step with a fallback): bound where every arm binds; partial
        where only some do (`step_id` says where, e.g. "branch `route`")."""
        common = set.intersection(*(set(arm.bound) for arm in arms))
        bound = {name: arms[0].bound[name] for name in sorted(common)}
        partial = dict(self.partial)
        for arm in arms:
            partial.update({name: step_id for name in arm.bound if name not in common})
        return _Scope(bound, partial)


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _delegation_closure(spec: Spec, agent_id: str) -> set[str]:
    """The agent and every agent it can reach by delegating, transitively."""
    seen = {agent_id}
    pending = [agent_id]
    while pending:
        agent = spec.agents.get(pending.pop())
        for worker in (agent.delegates or []) if agent is not None else []:
            if worker not in seen:
                seen.add(worker)
                pending.append(worker)
    return seen


_FLOW_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_TEXT_OF = "x-mas2c-text-of"  # marks the schema of an agent's text answer (internal)
_PRINTED_BY = "x-mas2c-printed-by"  # marks a programmer's `output` without expect_output
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What a fallback's steps read as `error`: the failure of the step they stand in for.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        name: {"type": "string"} for name in ("type", "code", "message", "step", "pointer")
    },
}
REDUCER_INITIAL_EXAMPLE: dict[str, Any] = {"append": [], "merge": {}, "add": 0}
_CONDITION_CONSTANTS = {"true": "true", "false": "false", "null": "null", "none": "null"}
_NOT_CONSTANT = object()
# The JSON types each placeholder filter accepts (absent: any value).
_FILTER_TYPES: dict[str, set[str]] = {"join": {"array"}, "length": {"array", "object", "string"}}


def _holds_placeholder(value: Any) -> bool:
    """Whether a list or object holds a placeholder at any depth."""
    if isinstance(value, str):
        return bool(values.placeholders(value))
    if isinstance(value, list):
        return any(_holds_placeholder(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_placeholder(v) for v in value.values())
    return False


def _schema_types(schema: Any) -> set[str]:
    """The JSON types a schema allows; empty when it does not say (anything goes)."""
    if not isinstance(schema, dict):
        return set()
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)}
    if isinstance(schema.get("anyOf"), list):
        parts = [_schema_types(option) for option in schema["anyOf"]]
        return set().union(*parts) if parts and all(parts) else set()
    if isinstance(schema.get("enum"), list):
        return {values.json_type(v) for v in schema["enum"]}
    if "const" in schema:
        return {values.json_type(schema["const"])}
    return set()


def _child_schema(schema: Any, part: str) -> dict[str, Any] | None:
    if not isinstance(schema, dict):
        return None
    kinds = _schema_types(schema)
    if kinds == {"array"}:
        items = schema.get("items")
        return items if isinstance(items, dict) and part.isdigit() else None
    properties = schema.get("properties")
    if isinstance(properties, dict) and isinstance(properties.get(part), dict):
        child: dict[str, Any] = properties[part]
        return child
    return None


def _path_problem(path: tuple[str, ...], schema: Any) -> tuple[str, str, str | None] | None:
    """(code, message, hint) when a path reads into a value that cannot have that part."""
    for depth, part in enumerate(path[1:], start=1):
        if not isinstance(schema, dict):
            return None
        here = ".".join(path[:depth])
        kinds = _schema_types(schema)
        if schema.get(_TEXT_OF):
            agent = schema[_TEXT_OF]
            return (
                "MAS307",
                f"`{here}` is the text answer of agent `{agent}` (output: text): "
                f"it has no field `{part}`",
                f"give agent `{agent}` an output schema with `{part}`, or read `{{{{ {here} }}}}`",
            )
        if kinds and not kinds & {"object", "array"}:
            return (
                "MAS307",
                f"`{here}` is {' or '.join(sorted(kinds))}: it has no field `{part}`",
                f"read `{here}` itself",
            )
        if kinds == {"array"}:
            if not part.isdigit():
                return (
                    "MAS307",
                    f"`{here}` is a list: it has no field `{part}`",
                    f"read an item by its index, e.g. `{here}.0`, or use a filter: `{here} | join`",
                )
            schema = schema.get("items")
            continue
        if schema.get("type") != "object":
            return None
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return None
        if part not in properties:
            return (
                "MAS306",
                f"`{here}` has no field `{part}` in its output schema",
                did_you_mean(part, properties),
            )
        schema = properties[part]
    return None


def _filtered_schema(schema: Any, filters: tuple[tuple[str, str | None], ...]) -> Any:
    """What a placeholder's filters turn a value into."""
    if not filters:
        return schema
    return {"type": "integer"} if filters[-1][0] == "length" else {"type": "string"}


def _type_mismatch(known: Any, expected: Any) -> tuple[str, str] | None:
    """(what it is, what is wanted) when two schemas share no JSON type."""
    have, want = _schema_types(known), _schema_types(expected)
    if not have or not want or have & want or ("integer" in have and "number" in want):
        return None
    return " or ".join(sorted(have)), " or ".join(sorted(want))


def _state_path(node: ast.expr) -> tuple[str, ...] | None:
    """The state path an operand reads (`route.category`, `plan.steps[0]`), if it is one."""
    if isinstance(node, ast.Name):
        return None if node.id.lower() in _CONDITION_CONSTANTS else (node.id,)
    if isinstance(node, ast.Attribute):
        base = _state_path(node.value)
        return (*base, node.attr) if base else None
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        base = _state_path(node.value)
        key = node.slice.value
        if base and isinstance(key, str | int) and not isinstance(key, bool):
            return (*base, str(key))
    return None


def _constant_value(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int | float | bool):
        return node.value
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    if isinstance(node, ast.Name) and node.id.lower() in _CONDITION_CONSTANTS:
        return {"true": True, "false": False}.get(node.id.lower())
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, int | float)
        and not isinstance(node.operand.value, bool)
    ):
        return -node.operand.value
    return _NOT_CONSTANT


def _json_equal(a: Any, b: Any) -> bool:
    return values.json_equal(a, b)


def _compare_hint(kinds: set[str], value: Any) -> str:
    if isinstance(value, str) and kinds & {"number", "integer"}:
        try:
            float(value)
        except ValueError:
            return "compare with a number"
        return f"compare with the number {value} (no quotes)"
    if isinstance(value, str) and "boolean" in kinds:
        return "a boolean reads as itself: write `x` or `not x` (or compare with true/false, no quotes)"
    if "string" in kinds:
        return f"compare with the string {json.dumps(str(value).lower() if isinstance(value, bool) else str(value))}"
    return "compare with a value of the same type"


def _syntax_error(code: str) -> tuple[str, int] | None:
    """(message, line) if `code` does not parse; CPython's message where it has one, it reads better."""
    try:
        with warnings.catch_warnings():  # `"\d"` and the like: the sandbox's business, not ours
            warnings.simplefilter("ignore")
            pyast.parse(code)
    except SyntaxError as exc:
        return exc.msg, exc.lineno or 1
    try:
        libcst.parse_module(code)
    except libcst.ParserSyntaxError as exc:
        return exc.message.splitlines()[0], exc.raw_line
    return None


def _object(fields: dict[str, str]) -> dict[str, Any]:
    return {"type": "object", "properties": {k: {"type": v} for k, v in fields.items()}}


def _strings(value: Any, pointer: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(pointer, value)]
    if isinstance(value, dict):
        return [
            item
            for k, v in value.items()
            for item in _strings(v, f"{pointer}/{escape_token(str(k))}")
        ]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _strings(v, f"{pointer}/{i}")]
    return []


_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _schema_problem(schema: dict[str, Any]) -> str | None:
    """A shallow check that a JSON Schema can drive structured output."""
    declared = schema.get("type")
    types = declared if isinstance(declared, list) else [declared]
    if declared is None and not any(
        k in schema for k in ("anyOf", "oneOf", "enum", "const", "$ref")
    ):
        return "the schema has no `type`"
    for name in types:
        if name is not None and (not isinstance(name, str) or name not in _JSON_TYPES):
            return f"unknown JSON Schema type {_shown(name)}"
    problem = _value_fit_problem(schema, declared)
    if problem:
        return problem
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            return "`properties` must be a mapping"
        for key, sub in properties.items():
            if not isinstance(sub, dict):
                return f"property `{key}` must be a schema mapping"
            problem = _schema_problem(sub) if sub else None
            if problem:
                return f"property `{key}`: {problem}"
    required = schema.get("required")
    if required is not None:
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            return "`required` must be a list of property names"
        if isinstance(properties, dict):
            missing = [r for r in required if r not in properties]
            if missing:
                return f"`required` names {missing[0]!r}, which is not in `properties`"
    items = schema.get("items")
    if isinstance(items, dict) and items:
        problem = _schema_problem(items)
        if problem:
            return f"items: {problem}"
    return None


def _truth_hint(shown: str, kinds: set[str]) -> str:
    """Comparisons that say what a non-boolean value used as true or false meant."""
    ways = {
        "string": f'`{shown} == "yes"`, `{shown} != ""`',
        "number": f"`{shown} > 0`",
        "array": f"`len({shown}) > 0`",
        "object": f"`len({shown}) > 0`",
        "null": f"`{shown} != null`",
    }
    return ", ".join(ways[kind] for kind in sorted(kinds) if kind in ways)


def _value_fit_problem(schema: dict[str, Any], declared: Any) -> str | None:
    """`enum`/`const` values outside the schema's own `type` (no value could ever match:
    `{type: string, enum: [yes, no]}` is `[true, false]` to YAML), and a `default` the
    schema refuses (it would be used as is)."""
    enum = schema.get("enum")
    choices: list[Any] = list(enum) if isinstance(enum, list) else []
    if "const" in schema:
        choices = [*choices, schema["const"]]
    if declared is not None:
        for choice in choices:
            if values.validate(choice, {"type": declared}):
                keyword = "const" if choice is schema.get("const") else "enum"
                return (
                    f"{keyword} value {_shown(choice)} is not {_type_words(declared)} "
                    f"(the schema's `type`){_NO_MATCH}"
                )
    if "default" in schema:
        rest = {k: v for k, v in schema.items() if k != "default"}
        problems = _fits(schema["default"], rest)
        if problems:
            return f"the default {_shown(schema['default'])} does not fit the schema: {problems[0]}"
    return None


_NO_MATCH = ": nothing could match it"
_FIT_HINT = (
    "write each value with the schema's type; YAML reads plain yes/no/on/off as booleans "
    'and 1.0 as a number: quote text ("no")'
)


def _type_words(declared: Any) -> str:
    names = declared if isinstance(declared, list) else [declared]
    return " or ".join(f"{'an' if str(n)[0] in 'aeiou' else 'a'} {n}" for n in names)


def _unbound_message(
    root: str, scope: _Scope, writers: dict[str, str], item_locals: dict[str, str] | None = None
) -> str:
    if item_locals and root in item_locals:
        return (
            f"`{root}` is a variable of map `{item_locals[root]}`'s steps: each item has its "
            "own, and none is left after the map (its `out` lists the items' results)"
        )
    if root in scope.partial:
        return f"`{root}` is written only on some paths of {scope.partial[root]}"
    if root in writers:
        return f"`{root}` is read before it is written (it is written at {writers[root]})"
    return f"`{root}` is not an input or an earlier step's `out`"


def _unbound_hint(root: str, scope: _Scope, writers: dict[str, str]) -> str | None:
    if root in scope.partial and scope.partial[root].endswith("its fallback"):
        return "write it in the `fallback` steps too, or read it inside the step"
    if root in scope.partial:
        return "write it in every case and in `else`, or read it inside the branch"
    if root in writers:
        return (
            f"read it after the step that writes it ({writers[root]}); "
            "parallel branches cannot read each other's results"
        )
    return did_you_mean(root, scope.bound)


def _keys_hint(model: type[Any] | None) -> str | None:
    if model is None:
        return None
    required = [
        info.alias or name
        for name, info in model.model_fields.items()
        if info.is_required() and name != "kind"
    ]
    return f"required keys here: {', '.join(required)}" if required else None


def _fits(value: Any, schema: Any) -> list[str]:
    """`values.validate` (its `pattern` checks run in linear time, on any thread)."""
    return values.validate(value, schema)


def _pattern_hint(pointer: str) -> str:
    if pointer == "/name":
        return "lowercase letters, digits, '-' and '_', starting with a letter (it becomes the package name)"
    if pointer.endswith("/out"):
        return "a Python identifier: letters, digits and '_'"
    return "letters, digits, '-' and '_', starting with a letter or '_'"


def _type_message(error: Any, path: list[Any]) -> str:
    where = f"`{path[-1]}`" if path else "value"
    return f"{where}: {error['msg']} (got {_shown(error.get('input'))})"


def _shown(value: Any) -> str:
    """A short JSON rendering of a bad value, for messages; never fails."""
    try:
        shown = json.dumps(value, default=str, ensure_ascii=False)
    except (ValueError, RecursionError):  # cyclic data, a 5000-digit integer
        shown = f"a {type(value).__name__} value"
    return shown[:57] + "..." if len(shown) > 60 else shown


__all__ = [
    "PROBLEM_CODES",
    "Problem",
    "Report",
    "SpecInvalid",
    "did_you_mean",
    "load_spec",
    "validate_bytes",
    "validate_file",
    "validate_source",
    "validate_text",
]
