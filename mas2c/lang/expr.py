"""Prompt placeholders and condition expressions: parsing, checking, compiling.

Placeholders are `{{ name }}` or `{{ name.field.0 | filter }}` (parsed by `mas2c.values`);
single braces are text.
Conditions are a small, safe subset of Python, checked by walking the AST
against a whitelist and compiled from that AST (never by pasting text).
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from collections.abc import Sequence

from mas2c import pyast, values
from mas2c.errors import InvalidInput
from mas2c.lang.spec import Step, iter_steps, step_out

PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")

# Placeholders are parsed by `mas2c.values`, the module compiled packages carry too.
Placeholder = values.Placeholder
placeholders = values.placeholders
whole_placeholder = values.whole_placeholder


def parse_path(text: str) -> tuple[str, ...] | None:
    """A dotted state path (`verdict.answer`), or None if malformed."""
    text = text.strip()
    return tuple(text.split(".")) if PATH.match(text) else None


class ExpressionError(InvalidInput):
    code = "expression"

    def __init__(self, message: str, column: int = 0, line: int = 1) -> None:
        super().__init__(message)
        self.message = message
        # After `parse_condition`: the 0-based character offset into the text it was given
        # (`line` is then 1). Inside the checker: the AST's line and UTF-8 column.
        self.column = column
        self.line = line


_COMPARE_OPS: dict[type[ast.cmpop], str] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}
_CONSTANT_NAMES = {"true": True, "false": False, "null": None, "none": None}


def parse_condition(text: str) -> ast.expr:
    """Parse and check a condition; ExpressionError names the first offending construct."""
    stripped = text.strip()
    lead = len(text) - len(text.lstrip())
    try:
        with warnings.catch_warnings():  # an invalid escape in a literal warns; never print it
            warnings.simplefilter("ignore")
            tree = pyast.parse_expression(stripped)
    except SyntaxError as exc:
        if exc.offset:
            column = _offset(stripped, exc.lineno or 1, max(exc.offset - 1, 0), utf8=False)
        else:  # CPython gives no column when the text ends too early
            column = len(stripped)
        raise ExpressionError(f"not a valid expression: {exc.msg}", lead + column) from None
    except (RecursionError, MemoryError):
        raise ExpressionError("not a valid expression: nested too deeply") from None
    try:
        _check(tree.body)
    except ExpressionError as exc:
        exc.column = lead + _offset(stripped, exc.line, exc.column, utf8=True)
        exc.line = 1
        raise
    return tree.body


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def condition_offset(text: str, line: int, column: int) -> int:
    """The character offset in a condition's `text` of an AST node's (line, UTF-8 column)."""
    stripped = text.strip()
    lead = len(text) - len(text.lstrip())
    return lead + _offset(stripped, line, column, utf8=True)


def _offset(text: str, line: int, column: int, *, utf8: bool) -> int:
    """The character offset of (1-based `line`, 0-based `column`) in `text`.

    The AST counts columns in UTF-8 bytes, SyntaxError in characters.
    """
    starts = [0] + [m.end() for m in _LINE_BREAK.finditer(text)]
    start = starts[min(max(line, 1), len(starts)) - 1]
    if utf8:
        rest = text[start:].encode("utf-8")[:column]
        column = len(rest.decode("utf-8", errors="ignore"))
    return min(start + column, len(text))


# Conditions are small; a bound on nesting keeps checking and compiling them off the stack limit.
MAX_DEPTH = 50


def _check(node: ast.expr, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise ExpressionError(
            f"not a valid expression: nested more than {MAX_DEPTH} levels deep",
            node.col_offset,
            node.lineno,
        )
    depth += 1
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, str | int | float | bool | type(None)):
            raise ExpressionError(
                "only str, number, bool and None literals are allowed", node.col_offset, node.lineno
            )
    elif isinstance(node, ast.Name):
        pass
    elif isinstance(node, ast.Attribute):
        _check(node.value, depth)  # report the leftmost offence first
        if node.attr.startswith("_"):
            # `x.__class__.__subclasses__` and friends: no private or dunder attribute, ever.
            raise ExpressionError(
                f"attribute `{node.attr}` is not allowed (no names starting with '_'); "
                f"read such a field with a subscript: [{node.attr!r}]",
                (node.end_col_offset or 0) - len(node.attr.encode("utf-8")),
                node.end_lineno or node.lineno,
            )
    elif isinstance(node, ast.Subscript):
        if isinstance(node.slice, ast.Slice):
            raise ExpressionError("slices are not allowed", node.col_offset, node.lineno)
        _check(node.value, depth)
        _check(node.slice, depth)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARE_OPS:
                raise ExpressionError("unsupported comparison", node.col_offset, node.lineno)
        for child in [node.left, *node.comparators]:
            _check(child, depth)
    elif isinstance(node, ast.BoolOp):
        for child in node.values:
            _check(child, depth)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        _check(node.operand, depth)
    elif isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id == "len"):
            raise ExpressionError("only len() may be called", node.col_offset, node.lineno)
        if len(node.args) != 1 or node.keywords:
            raise ExpressionError("len() takes exactly one argument", node.col_offset, node.lineno)
        _check(node.args[0], depth)
    elif isinstance(node, ast.List | ast.Tuple):
        for child in node.elts:
            _check(child, depth)
    else:
        raise ExpressionError(
            f"{type(node).__name__} is not allowed in a condition", node.col_offset, node.lineno
        )


def condition_names(node: ast.expr, text: str | None = None) -> list[tuple[str, int]]:
    """State variable names a condition reads, with their offsets.

    With the condition's `text`, offsets are character offsets into it; without, AST columns.
    """
    return [(path[0], offset) for path, offset in condition_paths(node, text)]


def condition_paths(node: ast.expr, text: str | None = None) -> list[tuple[tuple[str, ...], int]]:
    """Like `condition_names`, with the attribute path read off each name (`review.passed`)."""
    stripped = text.strip() if text is not None else ""
    lead = len(text) - len(text.lstrip()) if text is not None else 0
    called = {
        id(child.func) for child in ast.walk(node) if isinstance(child, ast.Call)
    }  # the `len` of `len(x)` is a function, not a state variable
    attribute_of = {
        id(child.value): child for child in ast.walk(node) if isinstance(child, ast.Attribute)
    }
    reads = []
    for child in ast.walk(node):
        if (
            isinstance(child, ast.Name)
            and child.id.lower() not in _CONSTANT_NAMES
            and id(child) not in called
        ):
            offset = child.col_offset
            if text is not None:
                offset = lead + _offset(stripped, child.lineno, offset, utf8=True)
            path = [child.id]
            current: ast.expr = child
            while id(current) in attribute_of:
                parent = attribute_of[id(current)]
                path.append(parent.attr)
                current = parent
            reads.append((tuple(path), offset))
    return reads


def compile_condition(node: ast.expr, truth: bool = True) -> str:
    """Python source for a checked condition, reading state through `state[...]`.

    Attribute access compiles to `field(value, "name")` so that `verdict.passed`
    works on the dicts that structured outputs produce. A state value used as true or
    false (the whole condition, an operand of `and`/`or`/`not`) compiles to
    `truth(value, "path")`, which refuses anything but a boolean: the string "false"
    is never true (see `truth_paths`).
    """
    if truth and _is_state_path(node):
        return f"truth({compile_condition(node, False)}, {ast.unparse(node)!r})"
    if isinstance(node, ast.Constant):
        if isinstance(node.value, float) and math.isinf(node.value):
            return 'float("inf")'  # `1e999` reads back as inf, which is no Python literal
        return repr(node.value)
    if isinstance(node, ast.Name):
        lowered = node.id.lower()
        if lowered in _CONSTANT_NAMES and node.id not in ("len",):
            return repr(_CONSTANT_NAMES[lowered])
        return f"state[{node.id!r}]"
    if isinstance(node, ast.Attribute):
        return f"field({compile_condition(node.value, False)}, {node.attr!r})"
    if isinstance(node, ast.Subscript):
        value, index = compile_condition(node.value, False), compile_condition(node.slice, False)
        return f"item({value}, {index})"
    if isinstance(node, ast.Compare):
        parts = [compile_condition(node.left, False)]
        for op, right in zip(node.ops, node.comparators, strict=True):
            parts += [_COMPARE_OPS[type(op)], compile_condition(right, False)]
        return "(" + " ".join(parts) + ")"
    if isinstance(node, ast.BoolOp):
        joiner = " and " if isinstance(node.op, ast.And) else " or "
        return "(" + joiner.join(compile_condition(v) for v in node.values) + ")"
    if isinstance(node, ast.UnaryOp):
        negation = isinstance(node.op, ast.Not)
        operator = "not " if negation else "-"
        return f"({operator}{compile_condition(node.operand, negation)})"
    if isinstance(node, ast.Call):
        return f"len({compile_condition(node.args[0], False)})"
    if isinstance(node, ast.List):
        return "[" + ", ".join(compile_condition(e, False) for e in node.elts) + "]"
    if isinstance(node, ast.Tuple):
        items = [compile_condition(e, False) for e in node.elts]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    raise ExpressionError(f"{type(node).__name__} is not allowed in a condition")


def _is_state_path(node: ast.expr) -> bool:
    """A name (not a constant), `a.b` or `a[0]`: a value read from the state."""
    if isinstance(node, ast.Name):
        return node.id.lower() not in _CONSTANT_NAMES
    return isinstance(node, ast.Attribute | ast.Subscript)


def truth_paths(node: ast.expr) -> list[ast.expr]:
    """The state values a condition uses as true or false: the whole condition, the
    operands of `and`/`or` and of `not`, when they are state paths. Each must be a
    boolean (checked by the validator where the type is known, else at run time)."""
    if _is_state_path(node):
        return [node]
    if isinstance(node, ast.BoolOp):
        return [path for value in node.values for path in truth_paths(value)]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return truth_paths(node.operand)
    return []


# -- what step lists write ---------------------------------------------------------------------


def definite_writes(steps: Sequence[Step]) -> list[str]:
    """State variables a step list writes on every path through it, ordered by their last
    write in spec order: the last one is a `parallel` branch's result.

    A loop's body runs at least once; a `branch` writes what every arm (and `else`)
    writes; a `parallel` writes what any of its branches writes, then its own `out`.
    Composite steps are read through their flow (`child_lists`, `conditions`).
    """
    written: list[str] = []
    for step in steps:
        for name in _definite(step):
            if name in written:
                written.remove(name)
            written.append(name)
    return written


def _definite(step: Step) -> list[str]:
    """What one step writes on every path (asked through the step-kind registry's flow);
    with a `fallback`, what both the step and its fallback write."""
    own = _definite_own(step)
    if not step.fallback:
        return own
    rescued = set(definite_writes(step.fallback))
    return [name for name in own if name in rescued]


def _definite_own(step: Step) -> list[str]:
    lists = [children for _key, children in step.child_lists()]
    if step.shape == "each":  # the body's variables stay inside each item
        out = step_out(step)
        return [out] if out else []
    if step.shape == "alternatives":
        arms = [definite_writes(children) for children in lists]
        if len(lists) <= len(step.conditions()):
            arms.append([])  # no default arm: the state may pass through unchanged
        common = set.intersection(*(set(arm) for arm in arms)) if arms else set()
        return [name for name in arms[0] if name in common] if arms else []
    names = [name for children in lists for name in definite_writes(children)]
    out = step_out(step)
    return [*names, *([out] if out else [])]


def all_writes(steps: Sequence[Step]) -> dict[str, str]:
    """Every state variable a step list writes on some path -> the pointer-free id of the
    first step writing it."""
    found: dict[str, str] = {}
    for _pointer, step in iter_steps(list(steps), ""):
        out = step_out(step)
        if out and out not in found:
            found[out] = step.id
    return found
