"""Typed values: placeholders, text rendering, and the JSON Schema subset mas2c checks.

This module is the one implementation of how values flow through a spec. It
depends on the standard library only, because the compiler copies it verbatim
into every compiled package (as ``_values.py``, next to ``_runtime.py``); mas2c
imports the same file on the host (input checks before a run, the validator).

- A *placeholder* is ``{{ path }}`` or ``{{ path | filter | filter(arg) }}``;
  ``path`` is a state variable and its fields or list indices (``plan.steps.0``).
  ``{{ "{{" }}`` is a literal ``{{`` (the escape); single braces are plain text.
- A string that is exactly one placeholder (surrounding whitespace aside) is a
  *whole placeholder*: where a value is consumed (tool ``args``, ``test``
  inputs) it passes the value itself, with its type (a string value is text, so it
  keeps the whitespace around the placeholder). Anywhere else, and inside
  a larger string, a placeholder is rendered as text: strings as they are,
  numbers as written, everything else as JSON (``true``, ``null``, lists and
  objects indented by 2).
- Filters: ``join`` / ``join(sep)`` (a list's items as text, joined by ``sep``,
  default ``", "``), ``json`` (compact JSON), ``text`` (the text rendering, so a
  whole placeholder can pass a string), ``length`` (number of items/characters).
- ``validate(value, schema)`` checks a value against a JSON Schema in the subset
  ``SCHEMA_KEYWORDS``; ``schema_keyword_problem`` names a keyword outside it.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ESCAPE",
    "FILTERS",
    "MAX_PATTERN_INPUT",
    "MAX_PATTERN_STATES",
    "MAX_PATTERN_WORK",
    "PLACEHOLDER",
    "SCHEMA_KEYWORDS",
    "Placeholder",
    "TemplateError",
    "apply_filters",
    "argument_problems",
    "as_text",
    "final_answer",
    "input_problems",
    "json_equal",
    "json_type",
    "parse_placeholder",
    "pattern_problem",
    "pattern_search",
    "placeholders",
    "render",
    "resolve",
    "resolve_tree",
    "schema_keyword_problem",
    "schema_pattern_problem",
    "validate",
    "whole_placeholder",
]

PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
ESCAPE = '{{ "{{" }}'  # renders as a literal `{{`
_PATH = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*"
_STRING = r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'"
_FILTER = re.compile(rf"\|\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\(\s*({_STRING})?\s*\))?\s*")
_HEAD = re.compile(rf"\s*({_PATH})\s*")
_LITERAL = re.compile(rf"\s*({_STRING})\s*$")
FILTERS: dict[str, str] = {
    "join": "a list's items as text, joined by the separator (default ', ')",
    "json": "the value as compact JSON",
    "text": "the value as text (as inside a larger string)",
    "length": "the number of items (list, object) or characters (string)",
}


class TemplateError(Exception):
    """A malformed placeholder, or a filter applied to a value it does not fit."""


@dataclass(frozen=True)
class Placeholder:
    """One ``{{ ... }}`` of a template: its state path and filters, or a literal (the escape)."""

    text: str  # the whole `{{ ... }}`
    offset: int  # character offset in the template
    path: tuple[str, ...] = ()  # () when malformed or a literal
    filters: tuple[tuple[str, str | None], ...] = ()  # (name, argument)
    literal: str | None = None  # `{{ "{{" }}` -> "{{"
    error: str | None = None  # why it is malformed

    @property
    def root(self) -> str:
        return self.path[0] if self.path else ""


def parse_placeholder(inner: str, text: str = "", offset: int = 0) -> Placeholder:
    """Parse what is between ``{{`` and ``}}``; a malformed one carries its ``error``."""
    literal = _LITERAL.match(inner)
    if literal:
        value = ast.literal_eval(literal.group(1))
        if value != "{{":
            return Placeholder(
                text, offset, error=f'only "{{{{" can be written as a literal, not {value!r}'
            )
        return Placeholder(text, offset, literal=value)
    head = _HEAD.match(inner)
    if head is None:
        return Placeholder(text, offset, error="expected a state variable path")
    path = tuple(head.group(1).split("."))
    filters: list[tuple[str, str | None]] = []
    position = head.end()
    while position < len(inner):
        found = _FILTER.match(inner, position)
        if found is None:
            return Placeholder(
                text, offset, path, error=f"unexpected {inner[position:].strip()!r} after the path"
            )
        name, argument = found.group(1), found.group(2)
        if name not in FILTERS:
            known = ", ".join(FILTERS)
            return Placeholder(
                text, offset, path, error=f"unknown filter `{name}` (known: {known})"
            )
        if argument is not None and name != "join":
            return Placeholder(text, offset, path, error=f"filter `{name}` takes no argument")
        filters.append((name, ast.literal_eval(argument) if argument is not None else None))
        position = found.end()
    return Placeholder(text, offset, path, tuple(filters))


def placeholders(template: str) -> list[Placeholder]:
    """Every placeholder of a template, in order."""
    return [
        parse_placeholder(match.group(1), match.group(0), match.start())
        for match in PLACEHOLDER.finditer(template)
    ]


def whole_placeholder(template: str) -> Placeholder | None:
    """The placeholder a string consists of (surrounding whitespace aside), else None."""
    stripped = template.strip()
    match = PLACEHOLDER.fullmatch(stripped)
    if match is None or "{{" in match.group(1):
        return None
    found = parse_placeholder(match.group(1), match.group(0), template.index("{{"))
    return found if found.literal is None else None


def json_type(value: Any) -> str:
    """The JSON type name of a Python value (``integer`` for ints, ``number`` for floats)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def as_text(value: Any) -> str:
    """How a value reads inside a larger string: strings as they are, numbers as
    written, everything else as JSON (lists and objects indented by 2)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False, indent=2, default=str)


# The answer marker: the word `answer` (any case) and a colon, Markdown emphasis allowed
# around the word and the colon; at a line's start (after `#`, `>`, `-` marks) or inside a
# line after a space or a bracket (not after a quote: `print("ANSWER:", x)` is code).
_ANSWER_MARK = re.compile(r"(?<![^\s*_#>(\[-])answer(?:[*_]{1,2})?[ \t]*:(?:[*_]{1,2})?", re.I)
_WRAPPERS = ("**", "__", "*", "_", "`")


def final_answer(text: str) -> str | None:
    """The final answer a text states, or None when it states none.

    The answer follows the text's last answer marker, ``answer:`` in any case, also in
    Markdown emphasis (``**ANSWER:** 42``, ``**Answer**: 42``, ``__answer__: 42``),
    at the start of a line or inside one (``... so the ANSWER: 42``): it is the rest of
    that line, or the next non-blank line when the rest is blank (``**Answer:**`` alone
    on its line), stripped of surrounding whitespace, Markdown emphasis and backticks
    (``**42**``, `` `42` ``) and one final period. A marker with nothing after it gives
    ``""``. Votes compare this (else the whole text); batch scorers read it too."""
    marks = list(_ANSWER_MARK.finditer(text))
    if not marks:
        return None
    rest = text[marks[-1].end() :].split("\n")
    answer = rest[0].strip() or next((line.strip() for line in rest[1:] if line.strip()), "")
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for wrapper in _WRAPPERS:
            if (
                len(answer) > 2 * len(wrapper)
                and answer.startswith(wrapper)
                and answer.endswith(wrapper)
            ):
                answer, unwrapped = answer[len(wrapper) : -len(wrapper)].strip(), True
                break
    if answer.endswith(".") and len(answer) > 1 and not answer.endswith(".."):
        answer = answer[:-1].rstrip()
    return answer


def apply_filters(value: Any, filters: Sequence[tuple[str, str | None]]) -> Any:
    for name, argument in filters:
        if name == "join":
            if not isinstance(value, list | tuple):
                raise TemplateError(f"`join` needs a list, got {json_type(value)}")
            value = (", " if argument is None else argument).join(as_text(v) for v in value)
        elif name == "json":
            value = json.dumps(value, ensure_ascii=False, default=str)
        elif name == "text":
            value = as_text(value)
        elif name == "length":
            if not isinstance(value, str | list | tuple | Mapping):
                raise TemplateError(
                    f"`length` needs a list, object or string, got {json_type(value)}"
                )
            value = len(value)
        else:
            raise TemplateError(f"unknown filter `{name}`")
    return value


Lookup = Callable[[str], Any]


def _value_of(found: Placeholder, lookup: Lookup) -> Any:
    if found.literal is not None:
        return found.literal
    if found.error is not None:
        raise TemplateError(f"malformed placeholder {found.text!r}: {found.error}")
    return apply_filters(lookup(".".join(found.path)), found.filters)


def render(template: str, lookup: Lookup) -> str:
    """Fill each placeholder with its text rendering; everything else stays as written.

    One pass: inserted values are never rendered again, so a value that itself
    contains ``{{ x }}`` reaches the model unchanged.
    """

    def fill(match: re.Match[str]) -> str:
        found = parse_placeholder(match.group(1), match.group(0), match.start())
        return as_text(_value_of(found, lookup))

    return PLACEHOLDER.sub(fill, template)


def resolve(template: str, lookup: Lookup) -> Any:
    """A whole placeholder's value (its type kept), else the rendered text."""
    found = whole_placeholder(template)
    if found is not None:
        value = _value_of(found, lookup)
        if not isinstance(value, str):
            return value
    # Text stays text byte for byte: a string value keeps the whitespace around its placeholder.
    return render(template, lookup)


def resolve_tree(value: Any, lookup: Lookup) -> Any:
    """``resolve`` every string inside nested lists and objects (tool ``args``)."""
    if isinstance(value, str):
        return resolve(value, lookup)
    if isinstance(value, Mapping):
        return {k: resolve_tree(v, lookup) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_tree(v, lookup) for v in value]
    return value


# ---------------------------------------------------------------- JSON Schema subset

# Keywords mas2c checks (the rest of the subset are annotations it accepts and ignores).
SCHEMA_KEYWORDS: dict[str, str] = {
    "type": "checked",
    "enum": "checked",
    "const": "checked",
    "properties": "checked",
    "required": "checked",
    "additionalProperties": "checked",
    "items": "checked",
    "minItems": "checked",
    "maxItems": "checked",
    "minLength": "checked",
    "maxLength": "checked",
    "pattern": "checked",
    "minimum": "checked",
    "maximum": "checked",
    "exclusiveMinimum": "checked",
    "exclusiveMaximum": "checked",
    "anyOf": "checked",
    "title": "annotation",
    "description": "annotation",
    "default": "annotation",
    "examples": "annotation",
    "format": "annotation",
    "$comment": "annotation",
}
_SUBSCHEMA_MAPS = ("properties",)
_SUBSCHEMAS = ("items", "additionalProperties")
_MAX_PROBLEMS = 20
_MAX_DEPTH = 64


def schema_keyword_problem(schema: Any, pointer: str = "") -> str | None:
    """The first keyword outside the subset (``$ref``, ``oneOf``, ...), with where it is."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, Mapping):
        return f"at {pointer or '/'}: a schema must be a mapping"
    for key, sub in schema.items():
        if key not in SCHEMA_KEYWORDS:
            return f"keyword `{key}` at {pointer or '/'} is outside the JSON Schema subset mas2c checks"
        if key in _SUBSCHEMA_MAPS and isinstance(sub, Mapping):
            for name, child in sub.items():
                problem = schema_keyword_problem(child, f"{pointer}/{key}/{name}")
                if problem:
                    return problem
        elif key in _SUBSCHEMAS and isinstance(sub, Mapping | bool):
            problem = schema_keyword_problem(sub, f"{pointer}/{key}")
            if problem:
                return problem
        elif key == "anyOf" and isinstance(sub, list):
            for index, child in enumerate(sub):
                problem = schema_keyword_problem(child, f"{pointer}/anyOf/{index}")
                if problem:
                    return problem
    return None


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return json_type(value) == name


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if _is_type(a, "number") and _is_type(b, "number"):
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        text = f"a {json_type(value)}"
    return text if len(text) <= 60 else text[:57] + "..."


def validate(value: Any, schema: Any, pointer: str = "") -> list[str]:
    """Problems of ``value`` against ``schema`` (the subset), each ``at /ptr: message``."""
    problems: list[str] = []
    _validate(value, schema, pointer, problems, 0)
    return problems[:_MAX_PROBLEMS]


def _validate(value: Any, schema: Any, pointer: str, problems: list[str], depth: int) -> None:
    where = pointer or "/"
    if len(problems) >= _MAX_PROBLEMS:
        return
    if depth > _MAX_DEPTH:
        problems.append(f"at {where}: nested more than {_MAX_DEPTH} levels deep")
        return
    if schema is True or schema is None:
        return
    if schema is False:
        problems.append(f"at {where}: no value is allowed here")
        return
    if not isinstance(schema, Mapping):
        return
    declared = schema.get("type")
    if declared is not None:
        names = [declared] if isinstance(declared, str) else list(declared)
        if not any(_is_type(value, n) for n in names):
            expected = " or ".join(names)
            problems.append(
                f"at {where}: expected {expected}, got {json_type(value)} {_shown(value)}"
            )
            return
    if "enum" in schema and not any(json_equal(value, option) for option in schema["enum"]):
        options = ", ".join(_shown(o) for o in schema["enum"])
        problems.append(f"at {where}: {_shown(value)} is not one of {options}")
    if "const" in schema and not json_equal(value, schema["const"]):
        problems.append(f"at {where}: expected {_shown(schema['const'])}, got {_shown(value)}")
    if "anyOf" in schema:
        options = schema["anyOf"]
        if not any(not validate(value, option, pointer) for option in options):
            problems.append(
                f"at {where}: {_shown(value)} matches none of the {len(options)} allowed schemas"
            )
    if isinstance(value, Mapping):
        _validate_object(value, schema, pointer, problems, depth)
    elif isinstance(value, list | tuple):
        _validate_array(value, schema, pointer, problems, depth)
    elif isinstance(value, str):
        _validate_string(value, schema, where, problems)
    elif _is_type(value, "number"):
        _validate_number(value, schema, where, problems)


def _validate_object(
    value: Mapping[str, Any],
    schema: Mapping[str, Any],
    pointer: str,
    problems: list[str],
    depth: int,
) -> None:
    properties = schema.get("properties") or {}
    for name in schema.get("required") or []:
        if name not in value:
            problems.append(f"at {pointer or '/'}: missing required property {name!r}")
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        here = f"{pointer}/{_token(str(name))}"
        if name in properties:
            _validate(item, properties[name], here, problems, depth + 1)
        elif extra is False:
            allowed = ", ".join(repr(p) for p in properties) or "none"
            problems.append(
                f"at {pointer or '/'}: property {name!r} is not allowed (allowed: {allowed})"
            )
        else:
            _validate(item, extra, here, problems, depth + 1)


def _validate_array(
    value: Sequence[Any], schema: Mapping[str, Any], pointer: str, problems: list[str], depth: int
) -> None:
    where = pointer or "/"
    if "minItems" in schema and len(value) < schema["minItems"]:
        problems.append(
            f"at {where}: expected at least {schema['minItems']} item(s), got {len(value)}"
        )
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        problems.append(
            f"at {where}: expected at most {schema['maxItems']} item(s), got {len(value)}"
        )
    items = schema.get("items")
    if items is not None:
        for index, item in enumerate(value):
            _validate(item, items, f"{pointer}/{index}", problems, depth + 1)


def _validate_string(
    value: str, schema: Mapping[str, Any], where: str, problems: list[str]
) -> None:
    if "minLength" in schema and len(value) < schema["minLength"]:
        problems.append(f"at {where}: expected at least {schema['minLength']} character(s)")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        problems.append(f"at {where}: expected at most {schema['maxLength']} character(s)")
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        refused = _pattern_refused(pattern)
        if refused:  # never evaluated: a build's spec is not re-validated
            problems.append(f"at {where}: the pattern {pattern[:80]!r} is refused: {refused}")
        elif len(value) > MAX_PATTERN_INPUT:
            problems.append(
                f"at {where}: {len(value)} characters is too long to check against a pattern "
                f"(at most {MAX_PATTERN_INPUT})"
            )
        else:
            found = pattern_search(pattern, value)
            if found is None:
                problems.append(
                    f"at {where}: checking {len(value)} characters against the pattern "
                    f"{pattern[:80]!r} needs more than {MAX_PATTERN_WORK} steps (a pattern "
                    "with large counted repeats?)"
                )
            elif not found:
                problems.append(
                    f"at {where}: {_shown(value)} does not match the pattern {pattern!r}"
                )


def _validate_number(
    value: float, schema: Mapping[str, Any], where: str, problems: list[str]
) -> None:
    for key, sign in (
        ("minimum", ">="),
        ("maximum", "<="),
        ("exclusiveMinimum", ">"),
        ("exclusiveMaximum", "<"),
    ):
        bound = schema.get(key)
        if isinstance(bound, int | float) and not _holds(value, sign, bound):
            problems.append(f"at {where}: expected a number {sign} {bound}, got {value}")


def _holds(value: float, sign: str, bound: float) -> bool:
    if sign == ">=":
        return value >= bound
    if sign == "<=":
        return value <= bound
    if sign == ">":
        return value > bound
    return value < bound


def _token(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def argument_problems(args: Mapping[str, Any], parameters: Mapping[str, Any]) -> list[str]:
    """Problems of a tool call's arguments against the tool's parameter schema, each
    naming the argument and the expected type (``argument 'xs': expected array, got string``)."""
    problems: list[str] = []
    properties = parameters.get("properties") or {}
    for name in parameters.get("required") or []:
        if name not in args:
            problems.append(f"missing argument {name!r}")
    for name, value in args.items():
        if name in properties:
            for problem in validate(value, properties[name]):
                where, _, message = problem.partition(": ")
                inner = where[len("at /") :] if where != "at /" else ""
                label = f"{name}/{inner}" if inner else name
                problems.append(f"argument {label!r}: {message}")
        elif parameters.get("additionalProperties", True) is False:
            known = ", ".join(repr(p) for p in properties) or "none"
            problems.append(f"unexpected argument {name!r} (parameters: {known})")
    return problems


def _non_finite(value: Any, pointer: str, depth: int) -> str | None:
    """The pointer of the first NaN or infinite number in `value` (JSON has neither:
    Python's json reads `NaN`, `Infinity` and `1e400` into them), else None."""
    if isinstance(value, float):
        return pointer if value != value or value in (float("inf"), float("-inf")) else None
    if depth > _MAX_DEPTH:
        return None  # `validate` reports the depth
    items: Any = ()
    if isinstance(value, Mapping):
        items = ((str(k), v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((str(i), v) for i, v in enumerate(value))
    for key, item in items:
        found = _non_finite(item, f"{pointer}/{_token(key)}", depth + 1)
        if found is not None:
            return found
    return None


def input_problems(given: Any, declared: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(pointer, message) for each way a run's input misses the spec's `inputs`: each
    declared input against its whole JSON Schema (nested `required`, types, enums; no
    NaN or infinite number anywhere), missing inputs without a `default`, and undeclared ones."""
    if not isinstance(given, Mapping):
        return [("/inputs", f"the input must be a JSON object, got {json_type(given)}")]
    problems: list[tuple[str, str]] = []
    for name, schema in declared.items():
        pointer = f"/inputs/{_token(name)}"
        if name in given and (bad := _non_finite(given[name], "", 0)) is not None:
            at = f" at {bad}" if bad else ""
            problems.append((pointer, f"input {name!r}{at}: NaN and Infinity are not JSON numbers"))
        elif name in given:
            for problem in validate(given[name], schema):
                where, _, message = problem.partition(": ")
                inner = where[len("at ") :]
                at = "" if inner == "/" else f" at {inner}"
                problems.append((pointer, f"input {name!r}{at}: {message}"))
        elif "default" not in schema:
            problems.append((pointer, f"missing required input {name!r}"))
    for name in sorted(set(given) - set(declared)):
        known = ", ".join(declared) or "none"
        problems.append(("/inputs", f"unknown input {name!r} (declared: {known})"))
    return problems


# ----------------------------------------------------------------- patterns without ReDoS

# A spec's `pattern` may be LLM-written: a pattern whose backtracking can explode is refused
# (by the validator, MAS511, and by every check that would evaluate it), values are matched
# by a linear-time automaton (below), and a string longer than this is not matched at all.
MAX_PATTERN_INPUT = 10_000
_REPEAT_LIMIT = 16  # a repeat of more than this many iterations counts as unbounded
_SAMPLE_CHARS = (
    [chr(c) for c in range(0x180)]
    + list("\u00a0\u0660\u0663\u0416\u0436\u2028\u3000\u4e2d\uff10")
    + ["\U0001f600"]
)


def _sre() -> Any:
    import importlib

    return importlib.import_module("re._parser")


class _Shape:
    """Facts about a parsed pattern: first-character and character sets, sampled on a
    universe of characters (every literal and range end of the pattern included)."""

    def __init__(self, parsed: Any) -> None:
        flags = parsed.state.flags
        self.ignore_case = bool(flags & re.IGNORECASE)
        self.dot_all = bool(flags & re.DOTALL)
        chars = set(_SAMPLE_CHARS)
        self._collect(parsed, chars)
        self.universe = frozenset(chars)

    def _collect(self, seq: Any, chars: set[str]) -> None:
        for op, av in seq:
            name = str(op)
            if name in ("LITERAL", "NOT_LITERAL"):
                chars.add(chr(av))
            elif name == "IN":
                for item_op, item_av in av:
                    if str(item_op) in ("LITERAL", "NOT_LITERAL"):
                        chars.add(chr(item_av))
                    elif str(item_op) == "RANGE":
                        chars.update((chr(item_av[0]), chr(item_av[1])))
            else:
                for child in _children(op, av):
                    self._collect(child, chars)

    def _class(self, items: Any) -> frozenset[str]:
        negate = False
        out: set[str] = set()
        for op, av in items:
            name = str(op)
            if name == "NEGATE":
                negate = True
            elif name == "LITERAL":
                out.add(chr(av))
            elif name == "NOT_LITERAL":
                out |= {c for c in self.universe if c != chr(av)}
            elif name == "RANGE":
                out |= {c for c in self.universe if av[0] <= ord(c) <= av[1]}
            elif name == "CATEGORY":
                out |= {c for c in self.universe if _in_category(str(av), c)}
            else:  # anything else: every character (conservative)
                out |= self.universe
        return frozenset(self.universe - out) if negate else frozenset(out)

    def _fold(self, chars: frozenset[str]) -> frozenset[str]:
        if not self.ignore_case:
            return chars
        return frozenset(c for c in self.universe if {c, c.lower(), c.upper()} & chars)

    def single(self, op: Any, av: Any) -> frozenset[str] | None:
        """The characters a one-character element matches; None for other elements."""
        name = str(op)
        if name == "LITERAL":
            return self._fold(frozenset(chr(av)))
        if name == "NOT_LITERAL":
            return frozenset(c for c in self.universe if c.lower() != chr(av).lower())
        if name == "ANY":
            return self.universe if self.dot_all else self.universe - {"\n"}
        if name == "IN":
            return self._fold(self._class(av))
        return None

    def nullable(self, seq: Any) -> bool:
        return all(self._nullable(op, av) for op, av in seq)

    def _nullable(self, op: Any, av: Any) -> bool:
        name = str(op)
        if self.single(op, av) is not None:
            return False
        if name in _REPEATS or name == "POSSESSIVE_REPEAT":
            return av[0] == 0 or self.nullable(av[2])
        if name == "BRANCH":
            return any(self.nullable(branch) for branch in av[1])
        if name in ("SUBPATTERN", "ATOMIC_GROUP", "GROUPREF_EXISTS"):
            return all(self.nullable(child) for child in _children(op, av))
        return name != "GROUPREF"  # AT, ASSERT, ASSERT_NOT match the empty text

    def first(self, seq: Any) -> frozenset[str]:
        """Characters a match of ``seq`` can start with."""
        out: set[str] = set()
        for op, av in seq:
            out |= self._first(op, av)
            if not self._nullable(op, av):
                break
        return frozenset(out)

    def _first(self, op: Any, av: Any) -> frozenset[str]:
        single = self.single(op, av)
        if single is not None:
            return single
        name = str(op)
        if name == "GROUPREF":
            return self.universe
        if name in ("ASSERT", "ASSERT_NOT", "AT"):
            return frozenset()
        if name in _REPEATS or name == "POSSESSIVE_REPEAT":
            return self.first(av[2])
        if name == "BRANCH":
            return frozenset().union(*(self.first(branch) for branch in av[1]))
        return frozenset().union(*(self.first(child) for child in _children(op, av)))

    def chars(self, seq: Any) -> frozenset[str]:
        """Every character a match of ``seq`` can contain."""
        out: set[str] = set()
        for op, av in seq:
            single = self.single(op, av)
            if single is not None:
                out |= single
            elif str(op) == "GROUPREF":
                out |= self.universe
            elif str(op) not in ("ASSERT", "ASSERT_NOT"):
                for child in _children(op, av):
                    out |= self.chars(child)
        return frozenset(out)


_REPEATS = ("MAX_REPEAT", "MIN_REPEAT")


def _children(op: Any, av: Any) -> list[Any]:
    name = str(op)
    if name in _REPEATS or name == "POSSESSIVE_REPEAT":
        return [av[2]]
    if name == "SUBPATTERN":
        return [av[3]]
    if name == "BRANCH":
        return list(av[1])
    if name in ("ASSERT", "ASSERT_NOT"):
        return [av[1]]
    if name == "ATOMIC_GROUP":
        return [av]
    if name == "GROUPREF_EXISTS":
        return [child for child in av[1:] if child is not None]
    return []


def _in_category(name: str, char: str) -> bool:
    positive = name.replace("CATEGORY_NOT_", "CATEGORY_")
    if "DIGIT" in positive:
        found = char.isdecimal()
    elif "SPACE" in positive:
        found = char.isspace()
    elif "WORD" in positive:
        found = char.isalnum() or char == "_"
    elif "LINEBREAK" in positive:
        found = char == "\n"
    else:
        found = True
    return found if positive == name else not found


def _unbounded(av: Any) -> bool:
    return int(av[1]) > _REPEAT_LIMIT


def _branches_meet(shape: _Shape, left: Any, right: Any, then: frozenset[str]) -> bool:
    """Whether two alternatives can match the same text (conservatively): compared
    character by character while both are single characters; when one ends, whether
    what is left of the other can start what comes next (``then``)."""
    a, b = list(left), list(right)
    while a and b:
        one, two = shape.single(*a[0]), shape.single(*b[0])
        if one is None or two is None:
            return bool(shape.first(a) & shape.first(b))
        if not one & two:
            return False
        a, b = a[1:], b[1:]
    rest = a or b
    return not rest or shape.nullable(rest) or bool(shape.first(rest) & then)


def _ambiguity(shape: _Shape, seq: Any, follow: frozenset[str]) -> str | None:
    """Inside a repeated body: an unbounded repeat that can give characters to what
    follows it (another pass of the body included), or alternatives that can match the
    same text."""
    items = list(seq)
    for index, (op, av) in enumerate(items):
        rest = items[index + 1 :]
        after = shape.first(rest) | (follow if shape.nullable(rest) else frozenset())
        name = str(op)
        if name in _REPEATS and _unbounded(av) and shape.chars(av[2]) & after:
            return "a repeat inside a repeat that can match the same characters"
        if name == "BRANCH":
            branches = av[1]
            for i, left in enumerate(branches):
                for right in branches[i + 1 :]:
                    if _branches_meet(shape, left, right, after):
                        return "alternatives inside a repeat that can match the same text"
        if name in ("POSSESSIVE_REPEAT", "ATOMIC_GROUP", "ASSERT", "ASSERT_NOT"):
            continue  # no backtracking into these
        for child in _children(op, av):
            inner = after | shape.first(child) if name in _REPEATS else after
            problem = _ambiguity(shape, child, inner)
            if problem:
                return problem
    return None


def _catastrophic(shape: _Shape, seq: Any) -> str | None:
    for op, av in seq:
        name = str(op)
        if name in _REPEATS and _unbounded(av):
            body = av[2]
            if shape.nullable(body) and shape.chars(body):
                return "a repeated group that can match the empty text"
            problem = _ambiguity(shape, body, shape.first(body))
            if problem:
                return problem
        for child in _children(op, av):
            problem = _catastrophic(shape, child)
            if problem:
                return problem
    return None


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is refused, or None: it does not compile; its backtracking in
    ``re`` could take exponential time (an unbounded repeat holding another unbounded
    repeat or alternatives that can share characters across passes, as ``(a+)+``,
    ``([a-z]+ ?)+``, ``(a|a)*``; conservative, so a few safe patterns are refused too: it
    would hang a backtracking checker elsewhere, such as an upstream's); or it has no
    linear-time automaton (a backreference, a lookaround, a conditional, an atomic group,
    a possessive repeat, or more than MAX_PATTERN_STATES states), which mas2c's own checks
    use (`pattern_search`)."""
    try:
        parsed = _sre().parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        return f"the pattern does not compile: {exc}"
    try:
        shape = _Shape(parsed)
        problem = _catastrophic(shape, parsed)
    except RecursionError:
        return "the pattern is nested too deeply to check"
    if problem:
        return f"the pattern can backtrack for exponential time: {problem}"
    automaton = _automaton(pattern)
    return automaton if isinstance(automaton, str) else None


@functools.lru_cache(maxsize=256)
def _pattern_refused(pattern: str) -> str | None:
    return pattern_problem(pattern)


def schema_pattern_problem(
    schema: Any, pointer: str = "", depth: int = 0
) -> tuple[str, str] | None:
    """``(pointer, message)`` of the first refused ``pattern`` in a schema (see
    :func:`pattern_problem`); the pointer is relative to the schema (``/pattern``,
    ``/properties/answer/pattern``)."""
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return None
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        problem = pattern_problem(pattern)
        if problem:
            return f"{pointer}/pattern", f"pattern {pattern[:80]!r}: {problem}"
    children: list[tuple[str, Any]] = []
    for key in _SUBSCHEMAS:
        children.append((f"{pointer}/{key}", schema.get(key)))
    properties = schema.get("properties")
    if isinstance(properties, Mapping):
        children += [
            (f"{pointer}/properties/{_token(str(name))}", sub) for name, sub in properties.items()
        ]
    any_of = schema.get("anyOf")
    if isinstance(any_of, list):
        children += [(f"{pointer}/anyOf/{i}", sub) for i, sub in enumerate(any_of)]
    for where, child in children:
        found = schema_pattern_problem(child, where, depth + 1)
        if found:
            return found
    return None


# ------------------------------------------------------- patterns matched in linear time

# A pattern is never handed to Python's `re` to search a value: `re` backtracks, so even a
# pattern refused for nothing above (``.*a.*a.*b``) takes about n^4 steps, hours on a
# 10,000-character text, and no signal or timer bounds it off the main thread. Instead the
# pattern's parse tree becomes a Thompson automaton, run over the text once, one set of
# states per character (at most MAX_PATTERN_STATES states, at most MAX_PATTERN_WORK state
# visits per check): a bound on every thread, in the host and in the compiled package.
# `re` is used only on one character (a character class) or one position (an anchor).
MAX_PATTERN_STATES = 2_000
MAX_PATTERN_WORK = 3_000_000
_UNSUPPORTED = {
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional group",
    "ASSERT": "a lookahead or lookbehind",
    "ASSERT_NOT": "a negative lookahead or lookbehind",
    "ATOMIC_GROUP": "an atomic group",
    "POSSESSIVE_REPEAT": "a possessive repeat",
}
_CATEGORY_TEXT = {
    "CATEGORY_DIGIT": r"\d",
    "CATEGORY_NOT_DIGIT": r"\D",
    "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S",
    "CATEGORY_WORD": r"\w",
    "CATEGORY_NOT_WORD": r"\W",
}
_AT_TEXT = {
    "AT_BEGINNING": "^",
    "AT_BEGINNING_STRING": r"\A",
    "AT_END": "$",
    "AT_END_STRING": r"\Z",
    "AT_BOUNDARY": r"\b",
    "AT_NON_BOUNDARY": r"\B",
}
_FLAG_LETTERS = ((re.IGNORECASE, "i"), (re.DOTALL, "s"), (re.MULTILINE, "m"), (re.ASCII, "a"))


class _PatternRefused(Exception):
    """The pattern cannot become a linear-time automaton (the message says why)."""


def _char(code: int) -> str:
    return f"\\U{code:08x}"


def _flagged(text: str, flags: int) -> re.Pattern[str]:
    letters = "".join(letter for flag, letter in _FLAG_LETTERS if flags & flag)
    return re.compile(f"(?{letters}:{text})" if letters else text)


class _Automaton:
    """A Thompson automaton: state ``i`` is ``kind[i]`` with arguments ``one[i]``,
    ``two[i]``: ``"char"`` (a one-character test ``tests[one]``, then ``two``), ``"split"``
    (both ``one`` and ``two``), ``"at"`` (an anchor ``tests[one]`` that must hold, then
    ``two``) or ``"match"``."""

    def __init__(self, parsed: Any) -> None:
        self.kind: list[str] = []
        self.one: list[int] = []
        self.two: list[int] = []
        self.tests: list[re.Pattern[str]] = []
        self.seen: list[dict[str, bool]] = []
        self._test_index: dict[str, int] = {}
        self.has_anchor = False
        self.start = self._seq(list(parsed), parsed.state.flags, self._add("match", 0, 0))

    def _add(self, kind: str, one: int, two: int) -> int:
        if len(self.kind) >= MAX_PATTERN_STATES:
            self._too_many()
        self.kind.append(kind)
        self.one.append(one)
        self.two.append(two)
        return len(self.kind) - 1

    def _test(self, text: str, flags: int) -> int:
        key = f"{flags}:{text}"
        if key not in self._test_index:
            self._test_index[key] = len(self.tests)
            self.tests.append(_flagged(text, flags))
            self.seen.append({})
        return self._test_index[key]

    def _seq(self, items: list[Any], flags: int, then: int) -> int:
        for op, av in reversed(items):
            then = self._item(str(op), av, flags, then)
        return then

    def _item(self, name: str, av: Any, flags: int, then: int) -> int:
        text = self._class_text(name, av)
        if text is not None:
            return self._add("char", self._test(text, flags), then)
        if name == "AT":
            self.has_anchor = True
            anchor = _AT_TEXT.get(str(av))
            if anchor is None:
                raise _PatternRefused(f"the anchor {av} is not supported")
            return self._add("at", self._test(anchor, flags), then)
        if name == "SUBPATTERN":
            _group, add, remove, body = av
            return self._seq(list(body), (flags | add) & ~remove, then)
        if name == "BRANCH":
            starts = [self._seq(list(branch), flags, then) for branch in av[1]]
            entry = starts[-1]
            for start in reversed(starts[:-1]):
                entry = self._add("split", start, entry)
            return entry
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            return self._repeat(int(av[0]), int(av[1]), list(av[2]), flags, then)
        raise _PatternRefused(f"{_UNSUPPORTED.get(name, name)} cannot be matched in linear time")

    def _repeat(self, low: int, high: int, body: list[Any], flags: int, then: int) -> int:
        if low > MAX_PATTERN_STATES or (high - low > MAX_PATTERN_STATES and high != _MAXREPEAT):
            self._too_many()
        if high == _MAXREPEAT:  # body*: a split that loops back through the body
            loop = self._add("split", 0, then)
            self.one[loop] = self._seq(body, flags, loop)
            then = loop
        else:
            for _ in range(high - low):  # (body(body)?)?: each optional pass may stop
                then = self._add("split", self._seq(body, flags, then), then)
        for _ in range(low):
            then = self._seq(body, flags, then)
        return then

    def _too_many(self) -> None:
        raise _PatternRefused(
            f"its automaton would have more than {MAX_PATTERN_STATES} states "
            "(large counted repeats such as `a{1000}`?)"
        )

    @staticmethod
    def _class_text(name: str, av: Any) -> str | None:
        """The one-character element as pattern text, or None for other elements."""
        if name == "LITERAL":
            return _char(av)
        if name == "NOT_LITERAL":
            return f"[^{_char(av)}]"
        if name == "ANY":
            return "."
        if name != "IN":
            return None
        parts: list[str] = []
        for op, item in av:
            kind = str(op)
            if kind == "NEGATE":
                parts.insert(0, "^")
            elif kind == "LITERAL":
                parts.append(_char(item))
            elif kind == "RANGE":
                parts.append(f"{_char(item[0])}-{_char(item[1])}")
            elif kind == "CATEGORY" and str(item) in _CATEGORY_TEXT:
                parts.append(_CATEGORY_TEXT[str(item)])
            else:
                raise _PatternRefused(f"the character class item {kind} is not supported")
        return "[" + "".join(parts) + "]"

    def holds(self, test: int, char: str) -> bool:
        seen = self.seen[test]
        found = seen.get(char)
        if found is None:
            if len(seen) > 4096:
                seen.clear()
            found = seen[char] = self.tests[test].fullmatch(char) is not None
        return found

    def search(self, text: str) -> bool | None:
        """Whether the pattern matches somewhere in ``text`` (``re.search``); None when
        that would take more than MAX_PATTERN_WORK state visits."""
        memo: dict[tuple[frozenset[int], bool, str], tuple[bool, frozenset[int]]] = {}
        current: frozenset[int] = frozenset()
        work = 0
        size = len(text)
        for index in range(size + 1):
            around = text[max(index - 1, 0) : index + 2] if self.has_anchor else ""
            char = text[index] if index < size else ""
            key = (current, index == 0, around or char)
            step = memo.get(key)
            if step is None:
                if len(memo) > 1024:
                    memo.clear()
                step, visits = self._step(current, char, around, 1 if index else 0)
                memo[key] = step
                work += visits
                if work > MAX_PATTERN_WORK:
                    return None
            if step[0]:
                return True
            current = step[1]
        return False

    def _step(
        self, current: frozenset[int], char: str, around: str, at: int
    ) -> tuple[tuple[bool, frozenset[int]], int]:
        """From the states reached so far (plus a new start here), the states after
        ``char``, and whether a match ends here."""
        stack = [*current, self.start]
        seen: set[int] = set()
        after: set[int] = set()
        matched = False
        kind, one, two = self.kind, self.one, self.two
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            what = kind[state]
            if what == "char":
                if char and self.holds(one[state], char):
                    after.add(two[state])
            elif what == "split":
                stack.append(two[state])
                stack.append(one[state])
            elif what == "at":
                if self.tests[one[state]].match(around, at) is not None:
                    stack.append(two[state])
            else:
                matched = True
        return (matched, frozenset(after)), len(seen)


_MAXREPEAT = int(getattr(_sre(), "MAXREPEAT", 4294967295))


@functools.lru_cache(maxsize=256)
def _automaton(pattern: str) -> _Automaton | str:
    """The pattern's automaton, or why it has none (see `pattern_problem`)."""
    try:
        return _Automaton(_sre().parse(pattern))
    except _PatternRefused as exc:
        return str(exc)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        return f"the pattern does not compile: {exc}"


def pattern_search(pattern: str, text: str) -> bool | None:
    """``re.search(pattern, text) is not None`` in time linear in ``len(text)``, on any
    thread; None when the pattern is refused (`pattern_problem`) or the search would take
    more than MAX_PATTERN_WORK steps."""
    automaton = _automaton(pattern)
    if isinstance(automaton, str):
        return None
    return automaton.search(text)
