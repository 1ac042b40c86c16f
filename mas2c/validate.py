"""The validator: every problem of a spec in one pass, each with a code, a pointer and a place.

Structure is checked by the pydantic model (`mas2c.spec`); this module turns
its errors into located problems and then checks what types cannot: references,
scopes of state variables, placeholders, condition expressions and tool code.

Codes are stable; `PROBLEM_CODES` documents each one.
"""

from __future__ import annotations

import ast
import difflib
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import libcst
from pydantic import ValidationError

from mas2c import expr
from mas2c.errors import InvalidInput
from mas2c.source import (
    Position,
    SourceError,
    SpecSource,
    escape_token,
    load_file,
    parse_text,
    position_in_value,
    resolve,
)
from mas2c.spec import (
    STEP_CLASSES,
    Agent,
    Budgets,
    Case,
    ModelSpec,
    Price,
    Spec,
    Step,
    Tool,
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
    "MAS301": "a placeholder or reference reads a state variable that is not bound there",
    "MAS302": "a malformed placeholder",
    "MAS303": "a condition uses a construct outside the safe subset",
    "MAS304": "a condition is not a valid expression",
    "MAS305": "a condition reads a state variable that is not bound there",
    "MAS306": "a placeholder reads a field the agent's output schema does not have",
    "MAS401": "tool code does not parse",
    "MAS402": "tool code does not define a function named like the tool",
    "MAS403": "a tool needs exactly one of `builtin` and `code`",
    "MAS501": "a loop has no `max_iterations` bound",
    "MAS502": "an ensemble or debate needs exactly one way to decide (`vote` or `judge`)",
    "MAS503": "an output or input schema is not a usable JSON Schema",
    "MAS504": "an ensemble needs exactly one of `agent` and `agents`",
    "MAS901": "an agent no step uses (warning)",
    "MAS902": "a tool no agent or step uses (warning)",
    "MAS903": "a model no agent uses (warning)",
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
        try:
            # By alias only: a spec writes `else` and `$schema`; the Python names `else_` and
            # `schema_` are unknown keys there, not synonyms (pydantic >= 2.11).
            report.spec = Spec.model_validate(source.data, by_alias=True, by_name=False)
        except ValidationError as exc:
            for error in exc.errors():
                checker.add_pydantic(error)
        if report.spec is not None:
            checker.check(report.spec)
    report.problems = sorted(checker.problems, key=_problem_order)
    return report


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
        for agent_id, agent in spec.agents.items():
            self._check_agent(agent_id, agent)
        for tool_id, tool in spec.tools.items():
            self._check_tool(tool_id, tool)
        for name, schema in spec.inputs.items():
            self._check_schema(f"/inputs/{escape_token(name)}", schema)
        self.writers: dict[str, str] = {}
        for pointer, step in iter_steps(spec.workflow, "/workflow"):
            out = step_out(step)
            if out and out not in self.writers:
                self.writers[out] = pointer
        self._check_ids(spec)
        scope = _Scope({name: schema for name, schema in spec.inputs.items()}, {})
        scope = self._steps(spec.workflow, "/workflow", scope)
        self._check_outputs(spec, scope)
        self._check_unused(spec)

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

    def _check_schema(self, pointer: str, schema: dict[str, Any]) -> None:
        problem = _schema_problem(schema)
        if problem:
            self.add(
                "MAS503",
                pointer,
                problem,
                "e.g. {type: object, properties: {answer: {type: string}}}",
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

    def _check_ids(self, spec: Spec) -> None:
        first: dict[str, str] = {}
        for pointer, step in iter_steps(spec.workflow, "/workflow"):
            if step.id in first:
                self.add(
                    "MAS204",
                    f"{pointer}/id",
                    f"step id `{step.id}` is already used at {first[step.id]}",
                    "step ids name checkpoints and trace entries: make them unique",
                )
            else:
                first[step.id] = pointer

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
        for key, text in step.templates():
            self._template(text, f"{here}/{key}", scope)
        for key, text in step.references():
            self._reference(text, f"{here}/{key}", scope)
        flows = {"concurrent": self._parallel, "repeat": self._loop, "alternatives": self._branch}
        if step.flow in flows:
            return flows[step.flow](step, here, scope)
        if step.flow == "sequence":
            for key, children in step.child_lists():
                scope = self._steps(children, f"{here}/{key}", scope)
        out = step_out(step)
        return scope.bind(out, self._out_schema(step)) if out else scope

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
        """Nested lists that run concurrently: each starts from `scope`; all are merged."""
        after = scope
        for key, children in step.child_lists():
            result = self._steps(children, f"{here}/{key}", scope)
            after = after.merge_all(result)
        out = step_out(step)
        if out:
            after = after.bind(out, self._out_schema(step))
        return after

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
        return scope.join(arms, step.id)

    def _out_schema(self, step: Step) -> dict[str, Any] | None:
        return step.out_schema(self.spec.agents)

    # leaves --------------------------------------------------------------------------

    def _agent_ref(self, name: str, pointer: str) -> None:
        if name not in self.spec.agents:
            self.add(
                "MAS201", pointer, f"unknown agent `{name}`", did_you_mean(name, self.spec.agents)
            )

    def _template(self, text: str, pointer: str, scope: _Scope) -> None:
        for ph in expr.placeholders(text):
            position = position_in_value(self.source, pointer, ph.offset)
            if not ph.path:
                self.add(
                    "MAS302",
                    pointer,
                    f"malformed placeholder {ph.text!r}",
                    "placeholders are {{ name }} or {{ name.field }}; single braces are plain text",
                    position=position,
                )
                continue
            self._read(ph.path, pointer, scope, position, "MAS301")

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
    ) -> None:
        root = path[0]
        if root not in scope.bound:
            self.add(
                code,
                pointer,
                _unbound_message(root, scope, self.writers),
                _unbound_hint(root, scope, self.writers),
                position=position,
            )
            return
        schema = scope.bound[root]
        # Walk the known output schema as deep as it describes objects; a field it
        # lacks is a typo the model would otherwise only reveal at run time.
        for depth, part in enumerate(path[1:], start=1):
            if not isinstance(schema, dict) or schema.get("type") != "object":
                return
            properties = schema.get("properties")
            if not isinstance(properties, dict):
                return
            if part not in properties:
                self.add(
                    "MAS306",
                    pointer,
                    f"`{'.'.join(path[:depth])}` has no field `{part}` in its output schema",
                    did_you_mean(part, properties),
                    position=position,
                )
                return
            schema = properties[part]

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
        """After a branch: bound where every arm binds; partial where only some do."""
        common = set.intersection(*(set(arm.bound) for arm in arms))
        bound = {name: arms[0].bound[name] for name in sorted(common)}
        partial = dict(self.partial)
        for arm in arms:
            partial.update({name: step_id for name in arm.bound if name not in common})
        return _Scope(bound, partial)


def _syntax_error(code: str) -> tuple[str, int] | None:
    """(message, line) if `code` does not parse; CPython's message where it has one, it reads better."""
    try:
        with warnings.catch_warnings():  # `"\d"` and the like: the sandbox's business, not ours
            warnings.simplefilter("ignore")
            ast.parse(code)
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


def _unbound_message(root: str, scope: _Scope, writers: dict[str, str]) -> str:
    if root in scope.partial:
        return f"`{root}` is written only on some paths of branch `{scope.partial[root]}`"
    if root in writers:
        return f"`{root}` is read before it is written (it is written at {writers[root]})"
    return f"`{root}` is not an input or an earlier step's `out`"


def _unbound_hint(root: str, scope: _Scope, writers: dict[str, str]) -> str | None:
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
    "validate_file",
    "validate_source",
    "validate_text",
]
