"""The spec language in words, generated from the models: the generator's description.

`language_description()` is what the generator tells an LLM about the spec language:
every top-level key, every field of every nested model (models, agents, tools, budgets,
...) and every step kind of the registry with its `LANGUAGE` line and each of its
fields — type, bounds, pattern, allowed values, required or default, and the field's
own `description` — all read from the pydantic models through their JSON Schema.
Nothing here is written about a particular key, so a key or step kind added to the
models (or registered with `register_step_kind`) is described at once, and a field
cannot be in the schema without being in the description
(`tests/test_describe.py` walks the schema to check it).

`describe_schema(schema)` renders any JSON Schema the same way: the generator's
reduced schema for the embedded model is described by it too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, get_args

__all__ = ["describe_fields", "describe_schema", "language_description"]

_INDENT = "    "
_MAX_DEPTH = 6


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


class _Describer:
    """Renders JSON Schema properties as nested bullet lists; `steps` names the step defs."""

    def __init__(self, root: Mapping[str, Any], steps: Mapping[str, str] | None = None) -> None:
        self.defs: Mapping[str, Any] = root.get("$defs") or {}
        self.steps = dict(steps or {})  # def name -> step kind
        self.seen: dict[str, str] = {}  # tuple items already described (JSON) -> reference

    def resolve(self, schema: Mapping[str, Any]) -> tuple[Mapping[str, Any], str | None]:
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.rsplit("/", 1)[1]
            return self.defs.get(name, {}), name
        return schema, None

    def is_step(self, schema: Mapping[str, Any]) -> bool:
        _target, name = self.resolve(schema)
        if name is not None:
            return name in self.steps
        options: list[Any] = list(schema.get("oneOf") or schema.get("anyOf") or [])
        return bool(options) and all(self.is_step(option) for option in options)

    def type_text(self, schema: Mapping[str, Any], depth: int) -> tuple[str, list[str]]:
        """One line describing the value's type, and sub-bullets for objects."""
        if self.is_step(schema):
            return "a step", []
        target, _name = self.resolve(schema)
        options = target.get("anyOf") or target.get("oneOf")
        if options:
            kept = [o for o in options if o.get("type") != "null"]
            shapes = [self.resolve(o)[0] for o in kept]
            if len(kept) > 1 and all(shape.get("properties") for shape in shapes):
                return "one of these objects", self.alternatives(shapes, depth)
            if len(kept) > 1 and all(shape.get("prefixItems") for shape in shapes):
                return "one of these lists", self.alternatives(shapes, depth)
            texts, nested = [], []
            for option in kept:
                text, sub = self.type_text(option, depth)
                texts.append(text)
                nested += sub
            return " or ".join(dict.fromkeys(texts)), nested
        if "const" in target:
            return _compact(target["const"]), []
        if "enum" in target:
            return " or ".join(_compact(v) for v in target["enum"]), []
        kind = target.get("type")
        if isinstance(kind, list):
            return " or ".join(str(k) for k in kind), []
        if kind == "string":
            return "string" + _string_bounds(target), []
        if kind in ("integer", "number"):
            return str(kind) + _number_bounds(target), []
        if kind == "array" and target.get("prefixItems"):
            return self.tuple_text(target["prefixItems"], depth)
        if kind == "array":
            items = target.get("items")
            if isinstance(items, Mapping):
                text, nested = self.type_text(items, depth)
                plural = "steps" if text == "a step" else text
                if plural in ("string", "integer", "number", "boolean", "object"):
                    plural += "s"
                return f"list of {plural}" + _list_bounds(target), nested
            return "list" + _list_bounds(target), []
        if kind == "object" or "properties" in target:
            properties = target.get("properties")
            if isinstance(properties, Mapping) and properties:
                if depth >= _MAX_DEPTH:
                    return "object", []
                return "object", self.fields(target, depth + 1)
            extra = target.get("additionalProperties")
            if isinstance(extra, Mapping) and extra:
                text, nested = self.type_text(extra, depth)
                if text == "object" and not nested:
                    text = "JSON object"
                return f"map{_map_bounds(target)} of name -> {text}", nested
            return "object" + _map_bounds(target), []
        if kind is None and not target:
            return "any value", []
        return str(kind or "value"), []

    def alternatives(self, shapes: list[Mapping[str, Any]], depth: int) -> list[str]:
        """Each shape of an anyOf: objects labelled by their constant fields."""
        lines = []
        for number, shape in enumerate(shapes, 1):
            properties: Mapping[str, Any] = shape.get("properties") or {}
            if properties:
                fixed = frozenset(k for k, v in properties.items() if "const" in v)
                consts = [f"{k} {_compact(properties[k]['const'])}" for k in fixed]
                label = "with " + (", ".join(sorted(consts)) or f"form {number}")
                lines.append(f"{_INDENT * (depth + 1)}- {label}:")
                lines += self.fields(shape, depth + 2, skip=fixed)
            else:
                text, nested = self.type_text(shape, depth + 1)
                lines += [f"{_INDENT * (depth + 1)}- {text}:", *nested]
        return lines

    def tuple_text(self, items: list[Any], depth: int) -> tuple[str, list[str]]:
        """A list of a fixed length, item by item."""
        lines = []
        for number, item in enumerate(items, 1):
            key = json.dumps(item, sort_keys=True)
            if key in self.seen:
                lines.append(f"{_INDENT * (depth + 1)}- item {number}: {self.seen[key]}")
                continue
            self.seen[key] = f"as item {number} above"
            text, nested = self.type_text(item, depth + 1)
            lines += [f"{_INDENT * (depth + 1)}- item {number}: {text}", *nested]
        return f"list of exactly {len(items)}", lines

    def field_line(
        self, name: str, schema: Mapping[str, Any], required: bool, depth: int
    ) -> list[str]:
        text, nested = self.type_text(schema, depth)
        notes = ["required"] if required else []
        if _shown_default(schema):
            notes.append(f"default {_compact(schema['default'])}")
        line = f"{_INDENT * depth}- {name}: {text}"
        if notes:
            line += f" ({', '.join(notes)})"
        description = schema.get("description") or self.resolve(schema)[0].get("description")
        if isinstance(description, str) and description.strip() and not self.is_step(schema):
            line += f". {' '.join(description.split()).rstrip('.')}"
        if nested:
            line += "; fields:"
        return [line, *nested]

    def fields(
        self, schema: Mapping[str, Any], depth: int, skip: frozenset[str] = frozenset()
    ) -> list[str]:
        properties: Mapping[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        lines: list[str] = []
        for name, sub in properties.items():
            if name not in skip:
                lines += self.field_line(name, sub, name in required, depth)
        return lines


def _shown_default(schema: Mapping[str, Any]) -> bool:
    """A default worth telling: not absent, empty, or an object of nulls."""
    if "default" not in schema:
        return False
    value = schema["default"]
    if isinstance(value, dict):
        return any(v is not None for v in value.values())
    return value not in (None, "", [])


def _string_bounds(schema: Mapping[str, Any]) -> str:
    parts = []
    if "pattern" in schema:
        parts.append(f"matching {schema['pattern']}")
    if schema.get("minLength") == 1:
        parts.append("non-empty")
    elif schema.get("minLength"):
        parts.append(f"at least {schema['minLength']} characters")
    if "maxLength" in schema:
        parts.append(f"at most {schema['maxLength']} characters")
    return (" " + ", ".join(parts)) if parts else ""


def _number_bounds(schema: Mapping[str, Any]) -> str:
    parts = []
    for key, sign in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
    ):
        if key in schema:
            parts.append(f"{sign} {schema[key]}")
    return (" " + " and ".join(parts)) if parts else ""


def _list_bounds(schema: Mapping[str, Any]) -> str:
    parts = []
    if schema.get("minItems"):
        parts.append(f"at least {schema['minItems']}")
    if "maxItems" in schema:
        parts.append(f"at most {schema['maxItems']}")
    return f" ({', '.join(parts)})" if parts else ""


def _map_bounds(schema: Mapping[str, Any]) -> str:
    parts = []
    if schema.get("minProperties"):
        count = schema["minProperties"]
        parts.append(f"at least {count} entr{'y' if count == 1 else 'ies'}")
    if "maxProperties" in schema:
        parts.append(f"at most {schema['maxProperties']} entries")
    return f" ({', '.join(parts)})" if parts else ""


def describe_schema(schema: Mapping[str, Any], steps: Mapping[str, str] | None = None) -> str:
    """The properties of an object schema as nested bullet lists, one per field."""
    return "\n".join(_Describer(schema, steps).fields(schema, 0))


def describe_fields(schema: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> list[str]:
    """The bullet lines of one object schema's fields (nested models expanded)."""
    return _Describer(schema).fields(schema, 1, skip)


def language_description() -> str:
    """The whole spec language, from the published schema and the step-kind registry."""
    from mas2c.lang.spec import STEP_CLASSES, StepBase, json_schema

    schema = json_schema()
    defs: Mapping[str, Any] = schema.get("$defs") or {}
    step_defs = {}
    for kind, cls in STEP_CLASSES.items():
        name = cls.__name__ if cls.__name__ in defs else None
        step_defs[name or f"{cls.__module__}.{cls.__name__}"] = kind
    describer = _Describer(schema, step_defs)
    common = frozenset(StepBase.model_fields) | {"kind"}
    lines = [
        "Top-level keys of a spec (no others are allowed; unknown keys anywhere are errors):",
        *describer.fields(schema, 0),
        "",
        "Every step is an object with a `kind` (one of the kinds below) and these fields:",
    ]
    first = next(iter(STEP_CLASSES.values()), None)
    if first is not None:
        base, _root = _step_schema(first, defs, schema)
        lines += [
            *describer.fields({**base, "properties": _only(base, common - {"kind"})}, 0),
            "Step kinds, with the fields of each:",
        ]
    for kind, cls in STEP_CLASSES.items():
        meaning = " ".join(cls.LANGUAGE.split()) or f"a {kind} step."
        lines.append(f"- {kind}: {meaning}")
        own, root = _step_schema(cls, defs, schema)
        lines += _Describer(root, step_defs).fields(own, 1, skip=common)
    return "\n".join(lines)


def _step_schema(
    cls: Any, defs: Mapping[str, Any], schema: Mapping[str, Any]
) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """A kind's schema and the root its references resolve in."""
    found = defs.get(cls.__name__)
    kind = (found or {}).get("properties", {}).get("kind", {}).get("const")
    if found is not None and (kind,) == get_args(cls.model_fields["kind"].annotation):
        return found, schema
    # A def under another name (two classes called alike): the class's own schema.
    own: dict[str, Any] = cls.model_json_schema(by_alias=True)
    return own, own


def _only(schema: Mapping[str, Any], names: frozenset[str]) -> dict[str, Any]:
    properties: Mapping[str, Any] = schema.get("properties") or {}
    return {k: v for k, v in properties.items() if k in names}
