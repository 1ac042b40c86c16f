"""What a compiled package says about itself: version, entry points, environment, example.

The data the package's ``__init__.py``, ``__main__.py``, ``pyproject.toml`` and
``README.md`` templates share, so that ``--version``, ``--help`` and the README agree:

- ``PACKAGE_VERSION``: the compiled package's own version (``__version__``, pyproject);
- ``environment()``: every environment variable the package reads, as the package's
  ``_api.py`` lists it (``ENVIRONMENT``, read from the template as data, never imported);
- ``example_input(inputs)``: an input document built from the spec's ``inputs`` schemas
  (their ``examples``, ``default``, ``const`` or ``enum`` first, else a value of the type),
  shown in ``--help`` and the README.

Everything here is deterministic: the same spec gives the same bytes.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from functools import cache
from typing import Any

from mas2c import __version__, pyast

PACKAGE_VERSION = "1.0.0"
_MAX_DEPTH = 8


@cache
def environment() -> tuple[tuple[str, str], ...]:
    """(name, meaning) of each environment variable the package reads, from `_api.py`."""
    from mas2c.compile import templates_dir

    source = (templates_dir() / "_api.py").read_text("utf-8")
    module = pyast.parse(source)
    names = {
        node.targets[0].id: node.value
        for node in module.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
    }
    for node in module.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "ENVIRONMENT"
            and node.value is not None
        ):
            return tuple(_pair(item, names) for item in _elements(node.value))
    raise RuntimeError("templates/_api.py defines no ENVIRONMENT table")


def _elements(node: ast.expr) -> list[ast.expr]:
    if not isinstance(node, ast.Tuple):
        raise RuntimeError("ENVIRONMENT in templates/_api.py must be a tuple literal")
    return list(node.elts)


def _pair(node: ast.expr, names: Mapping[str, ast.expr]) -> tuple[str, str]:
    """One (name, text) entry; a name may be a constant imported from `_runtime.py`."""
    name_node, text_node = _elements(node)
    if isinstance(name_node, ast.Name):
        name_node = names.get(name_node.id) or _runtime_constant(name_node.id)
    return str(ast.literal_eval(name_node)), str(ast.literal_eval(text_node))


def _runtime_constant(name: str) -> ast.expr:
    from mas2c.compile import templates_dir

    module = pyast.parse((templates_dir() / "_runtime.py").read_text("utf-8"))
    for node in module.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == name
        ):
            return node.value
    raise RuntimeError(f"templates/_runtime.py defines no constant {name}")


def example_input(inputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """An input document for the spec's ``inputs``: every input, in the spec's order."""
    return {name: example_value(schema, name) for name, schema in inputs.items()}


def example_value(schema: Any, name: str = "value", depth: int = 0) -> Any:
    """A value that fits ``schema`` (best effort: a ``pattern`` is not solved)."""
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return f"<{name}>"
    examples = schema.get("examples")
    if isinstance(examples, list) and examples:
        return examples[0]
    for key in ("default", "const"):
        if key in schema:
            return schema[key]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    any_of = schema.get("anyOf")
    if isinstance(any_of, list) and any_of:
        return example_value(any_of[0], name, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    return _typed_example(kind, schema, name, depth)


def _typed_example(kind: Any, schema: Mapping[str, Any], name: str, depth: int) -> Any:
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    if kind == "array":
        count = max(1, _int(schema.get("minItems"), 1))
        maximum = schema.get("maxItems")
        if isinstance(maximum, int):
            count = min(count, maximum)
        return [example_value(schema.get("items"), name, depth + 1) for _ in range(count)]
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, Mapping):
            return {}
        required = schema.get("required")
        keys = [k for k in properties if not isinstance(required, list) or k in required]
        return {k: example_value(properties[k], k, depth + 1) for k in keys}
    return _text(schema, name)


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _number(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    low = schema.get("minimum")
    exclusive = schema.get("exclusiveMinimum")
    value: float = 1
    if isinstance(low, int | float) and not isinstance(low, bool):
        value = max(value, low)
    if isinstance(exclusive, int | float) and not isinstance(exclusive, bool):
        value = max(value, exclusive + 1)
    high = schema.get("maximum")
    if isinstance(high, int | float) and not isinstance(high, bool):
        value = min(value, high)
    if integer:
        return int(value)
    return value


def _text(schema: Mapping[str, Any], name: str) -> str:
    text = f"<{name}>"
    low = _int(schema.get("minLength"), 0)
    if len(text) < low:
        text += "." * (low - len(text))
    high = schema.get("maxLength")
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text


def view(package: str) -> dict[str, Any]:
    """Template data shared by the package's entry files."""
    return {
        "package_version": PACKAGE_VERSION,
        "compiled_by": f"mas2c {__version__}",
        "script": package.replace("_", "-"),
        "environment": environment(),
    }
