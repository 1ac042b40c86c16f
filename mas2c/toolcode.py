"""Code tools read without running them: signatures, types, undefined names.

Spec code is never executed on the host. Everything here works on the AST
(`ast`) and the symbol table (`symtable`) of a tool's source:

- `tool_parameters` / `return_schema`: the JSON Schema of a tool's arguments and
  result, from its function's annotations (`str`, `int`, `float`, `bool`, `list[X]`,
  `dict[str, X]`, `X | None`, `Optional[X]`, `Literal[...]`, `Any`); what the
  compiled package checks arguments against at run time.
- `undefined_names`: names a tool's code reads that nothing defines (pyflakes'
  "undefined name", with the line inside the code), and for each whether a
  standard-library import would define it (`stdlib_import`).
- `module_name`: the module of the compiled package that holds one tool's code
  (each tool has its own namespace).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import symtable
import sys
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Any

from mas2c import pyast

_SIMPLE: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "list": {"type": "array"},
    "List": {"type": "array"},
    "Sequence": {"type": "array"},
    "tuple": {"type": "array"},
    "Tuple": {"type": "array"},
    "set": {"type": "array"},
    "dict": {"type": "object"},
    "Dict": {"type": "object"},
    "Mapping": {"type": "object"},
    "None": {"type": "null"},
    "NoneType": {"type": "null"},
    "Any": {},
    "object": {},
}
_ARRAYS = {"list", "List", "Sequence", "set", "frozenset", "tuple", "Tuple", "Iterable"}
_OBJECTS = {"dict", "Dict", "Mapping"}


def _name_of(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr  # typing.List, t.Optional
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    return ""


def annotation_schema(annotation: ast.expr | None) -> dict[str, Any]:
    """The JSON Schema an annotation means; {} (anything) where it says nothing JSON can check."""
    if annotation is None:
        return {}
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:  # a string annotation: "list[int]"
            return annotation_schema(pyast.parse_expression(annotation.value).body)
        except SyntaxError:
            return {}
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _union([annotation.left, annotation.right])
    if isinstance(annotation, ast.Subscript):
        base = _name_of(annotation.value)
        args = (
            list(annotation.slice.elts)
            if isinstance(annotation.slice, ast.Tuple)
            else [annotation.slice]
        )
        if base == "Optional":
            return _union([*args, ast.Constant(None)])
        if base == "Union":
            return _union(args)
        if base == "Literal":
            values = [a.value for a in args if isinstance(a, ast.Constant)]
            return {"enum": values} if len(values) == len(args) else {}
        if base in _ARRAYS:
            item = annotation_schema(args[0]) if base not in ("tuple", "Tuple") else {}
            return {"type": "array", "items": item} if item else {"type": "array"}
        if base in _OBJECTS:
            value = annotation_schema(args[1]) if len(args) == 2 else {}
            return (
                {"type": "object", "additionalProperties": value} if value else {"type": "object"}
            )
        return dict(_SIMPLE.get(base, {}))
    return dict(_SIMPLE.get(_name_of(annotation), {}))


def _union(parts: list[ast.expr]) -> dict[str, Any]:
    flat: list[ast.expr] = []
    while parts:
        part = parts.pop(0)
        if isinstance(part, ast.BinOp) and isinstance(part.op, ast.BitOr):
            parts[:0] = [part.left, part.right]
        else:
            flat.append(part)
    schemas = [annotation_schema(p) for p in flat]
    if any(not s for s in schemas):
        return {}
    if all(set(s) == {"type"} and isinstance(s["type"], str) for s in schemas):
        return {"type": list(dict.fromkeys(s["type"] for s in schemas))}
    return {"anyOf": schemas}


def function_node(name: str, code: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The top-level function `name` of `code` (None if absent or the code does not parse)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = pyast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    return None


@dataclass(frozen=True)
class Signature:
    """What a tool function accepts: its parameter schema, and whether it takes **kwargs."""

    parameters: dict[str, Any]
    varkw: bool
    returns: dict[str, Any]


def signature(name: str, code: str) -> Signature | None:
    node = function_node(name, code)
    if node is None:
        return None
    positional = node.args.posonlyargs + node.args.args
    defaults_from = len(positional) - len(node.args.defaults)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for index, arg in enumerate(positional):
        properties[arg.arg] = annotation_schema(arg.annotation)
        if index < defaults_from and index >= len(node.args.posonlyargs):
            required.append(arg.arg)
    for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True):
        properties[arg.arg] = annotation_schema(arg.annotation)
        if default is None:
            required.append(arg.arg)
    for arg in node.args.posonlyargs:
        properties.pop(arg.arg, None)  # cannot be passed by name: never an argument
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    varkw = node.args.kwarg is not None
    if not varkw:
        schema["additionalProperties"] = False
    return Signature(schema, varkw, annotation_schema(node.returns))


def tool_parameters(name: str, code: str) -> dict[str, Any]:
    """The JSON Schema of a code tool's keyword arguments (what the LLM and the runtime see)."""
    found = signature(name, code)
    return found.parameters if found else {"type": "object", "properties": {}}


# -- undefined names -----------------------------------------------------------------------------

_MODULE_NAMES = {"__name__", "__file__", "__doc__", "__builtins__", "__spec__", "__loader__"}
_MODULE_NAMES |= {"__package__", "__annotations__", "__dict__", "__path__", "__qualname__"}
# Standard-library modules whose members a tool most often uses without importing them.
_MEMBER_MODULES = (
    "math",
    "collections",
    "itertools",
    "functools",
    "statistics",
    "string",
    "re",
    "json",
    "random",
    "heapq",
    "bisect",
    "operator",
    "fractions",
    "decimal",
    "datetime",
    "typing",
    "dataclasses",
    "textwrap",
    "unicodedata",
    "copy",
)
_NOT_MODULES = frozenset({"this", "antigravity", "test", "__future__", "token", "code", "types"})


@dataclass(frozen=True)
class Undefined:
    name: str
    line: int  # 1-based, inside the code
    column: int  # 0-based
    fix: str | None  # "import math" / "from math import sqrt" when the stdlib has it


def undefined_names(code: str) -> list[Undefined]:
    """Names the code reads that neither it nor the builtins define, first use of each.

    Conservative like pyflakes: a star import or a module-level `__getattr__`
    turns the check off; names assigned anywhere at module level (including by
    `global` statements in functions) count as defined.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = pyast.parse(code)
            table = symtable.symtable(code, "<tool>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    if any(
        isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names)
        for node in ast.walk(tree)
    ):
        return []
    defined = set(dir(builtins)) | _MODULE_NAMES
    for symbol in table.get_symbols():
        if symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace():
            defined.add(symbol.get_name())
    defined |= _global_statements(tree)
    if "__getattr__" in defined:
        return []
    missing = _free_reads(table) - defined
    if not missing:
        return []
    found: dict[str, Undefined] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in missing and isinstance(node.ctx, ast.Load):
            previous = found.get(node.id)
            if previous is None or (node.lineno, node.col_offset) < (
                previous.line,
                previous.column,
            ):
                found[node.id] = Undefined(
                    node.id, node.lineno, node.col_offset, stdlib_import(node.id, tree)
                )
    return sorted(found.values(), key=lambda u: (u.line, u.column, u.name))


def _global_statements(tree: ast.AST) -> set[str]:
    return {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}


def _free_reads(table: symtable.SymbolTable) -> set[str]:
    """Names read in a scope (or nested) that resolve to the module or the builtins."""
    reads: set[str] = set()
    for symbol in table.get_symbols():
        if not symbol.is_referenced():
            continue
        if table.get_type() == "module":
            if not (symbol.is_assigned() or symbol.is_imported()):
                reads.add(symbol.get_name())
        elif symbol.is_global():
            reads.add(symbol.get_name())
    for child in table.get_children():
        reads |= _free_reads(child)
    return reads


def stdlib_import(name: str, tree: ast.AST | None = None) -> str | None:
    """The import that defines `name` from the standard library, if one obviously does.

    A module name used as a module (`math.sqrt`) -> `import math`; a well-known
    member (`sqrt`, `Counter`, `reduce`) -> `from math import sqrt`. Importing a
    standard-library module on the host runs no spec code.
    """
    if (
        name in sys.stdlib_module_names
        and not name.startswith("_")
        and name not in _NOT_MODULES
        and (tree is None or _used_as_module(tree, name))
    ):
        return f"import {name}"
    for module_name in _MEMBER_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if not name.startswith("_") and hasattr(module, name):
            return f"from {module_name} import {name}"
    return None


def _used_as_module(tree: ast.AST, name: str) -> bool:
    return any(
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == name
        for node in ast.walk(tree)
    )


# -- namespaces ----------------------------------------------------------------------------------


def normalized(name: str) -> str:
    """How Python sees an identifier: NFKC-normalised (PEP 3131)."""
    return unicodedata.normalize("NFKC", name)


def top_level_names(code: str) -> list[tuple[str, int]]:
    """Functions and classes a tool's code defines at top level, with their lines."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = pyast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    return [
        (node.name, node.lineno)
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]


def module_name(tool_id: str, taken: set[str]) -> str:
    """An ASCII module name for a tool's code (`tool_<id>`), unique among `taken`."""
    ascii_id = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in tool_id)
    base = f"tool_{ascii_id.strip('_') or 'code'}"
    candidate, counter = base, 2
    while candidate in taken:
        candidate, counter = f"{base}_{counter}", counter + 1
    taken.add(candidate)
    return candidate
