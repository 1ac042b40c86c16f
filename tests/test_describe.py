"""The generator's description of the language is generated from the models, and the
spec-version policy: keys added to the language keep `spec_version: "1"` specs valid,
meaning and compiling the same.

The description is checked against the published JSON Schema by walking the schema
(not the describer's own code): every top-level key, every field of every nested model
and every step kind with each of its fields must be there, in its place. A kind
registered at run time (the toy `echo`) is described at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from mas2c.compile import compile_spec, runtime_files
from mas2c.generate import system_prompt
from mas2c.lang.describe import describe_schema
from mas2c.lang.spec import STEP_CLASSES, Spec, StepBase, json_schema, language_description
from mas2c.lang.spec import spec_hash as hash_of
from mas2c.lang.validate import load_spec, validate_file

ROOT = Path(__file__).resolve().parent.parent
V1 = ROOT / "tests" / "data" / "spec-v1"
GOLDEN = ROOT / "tests" / "golden"


# -- the description covers the schema --------------------------------------------------------


def _sections(text: str) -> dict[str, list[str]]:
    """The description's step kinds: kind -> the lines of its section."""
    lines = text.splitlines()
    start = lines.index("Step kinds, with the fields of each:") + 1
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines[start:]:
        if line.startswith("- "):
            current = sections.setdefault(line[2:].split(":", 1)[0], [])
        current.append(line)
    return sections


def _field_names(lines: list[str]) -> set[str]:
    return {line.strip()[2:].split(":", 1)[0] for line in lines if line.strip().startswith("- ")}


def _step_kind(definition: Mapping[str, Any]) -> str | None:
    kind = (definition.get("properties") or {}).get("kind") or {}
    const = kind.get("const")
    return const if isinstance(const, str) else None


def test_every_top_level_key_is_described() -> None:
    text = language_description()
    top = text.split("\n\n", 1)[0].splitlines()
    named = {line[2:].split(":", 1)[0] for line in top if line.startswith("- ")}
    assert set(json_schema()["properties"]) <= named, set(json_schema()["properties"]) - named


def test_every_step_kind_and_field_is_described() -> None:
    schema = json_schema()
    text = language_description()
    sections = _sections(text)
    common = text.split("Every step is an object", 1)[1].split("Step kinds,", 1)[0]
    common_fields = _field_names(common.splitlines())
    kinds = {}
    for definition in schema["$defs"].values():
        kind = _step_kind(definition)
        if kind is None:
            continue
        kinds[kind] = definition
        described = _field_names(sections[kind][1:]) | common_fields | {"kind"}
        missing = set(definition["properties"]) - described
        assert not missing, f"step kind {kind}: fields missing from the description: {missing}"
    assert set(kinds) == set(STEP_CLASSES) == set(sections)


def test_every_nested_model_field_is_described() -> None:
    schema = json_schema()
    described = _field_names(language_description().splitlines())
    for name, definition in schema["$defs"].items():
        if _step_kind(definition) is not None:
            continue
        missing = set(definition.get("properties") or {}) - described
        assert not missing, f"{name}: fields missing from the description: {missing}"


def test_a_field_missing_from_the_description_is_caught() -> None:
    """The checks above fail on a description that lacks one field (they can fail)."""
    text = language_description()
    cut = "\n".join(line for line in text.splitlines() if not line.startswith("    - vote_on:"))
    sections = _sections(cut)
    assert "vote_on" not in _field_names(sections["ensemble"][1:])
    assert "vote_on" in json_schema()["$defs"]["EnsembleStep"]["properties"]


def test_description_tells_types_bounds_defaults_and_descriptions() -> None:
    text = language_description()
    sections = _sections(text)
    loop = "\n".join(sections["loop"])
    assert "max_iterations: integer >= 1 and <= 1000" in loop
    assert 'on_exhausted: "continue" or "fail"' in loop
    assert "rounds: integer >= 1 and <= 20 (default 2)" in "\n".join(sections["debate"])
    assert "- name: string matching ^[a-z][a-z0-9_-]*$, at most 64 characters (required)" in text
    assert "- egress: object. HTTP hosts" in text  # nested models, with their descriptions
    assert "        - hosts: list of strings (at least 1) (required)" in text
    # and the generator's system prompt carries all of it
    assert text in system_prompt([])


@pytest.fixture
def echo_kind() -> Iterator[None]:
    from toykind import echo

    echo.register()
    try:
        yield
    finally:
        echo.unregister()


def test_a_registered_kind_is_described_with_its_fields(echo_kind: None) -> None:
    cls = STEP_CLASSES["echo"]
    sections = _sections(language_description())
    assert sections["echo"][0].startswith("- echo: renders `text`")
    own = set(cls.model_fields) - set(StepBase.model_fields) - {"kind"}
    assert own and own <= _field_names(sections["echo"][1:])


def test_describe_schema_renders_any_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 8},
            "n": {"type": "integer", "minimum": 1, "default": 2, "description": "How many."},
            "mode": {"enum": ["a", "b"]},
            "items": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["name"],
    }
    assert describe_schema(schema).splitlines() == [
        "- name: string matching ^[a-z]+$, at most 8 characters (required)",
        "- n: integer >= 1 (default 2). How many",
        '- mode: "a" or "b"',
        "- items: list of strings (at most 3)",
    ]


# -- spec-version policy ------------------------------------------------------------------------
#
# tests/data/spec-v1/ holds the example specs as they were written for spec_version "1"
# before the language grew (state, map, flows, delegation, ...), and the spec hash of
# each. New keys are optional and absent means what the language meant before, so these
# files must stay valid, hash the same, and compile to the same bytes.


def _v1_specs() -> list[Path]:
    return sorted(V1.glob("*.yaml"))


def test_v1_specs_still_validate_and_hash_the_same() -> None:
    pinned = json.loads((V1 / "spec-hashes.json").read_text(encoding="utf-8"))
    assert sorted(pinned) == [p.name for p in _v1_specs()] and len(pinned) >= 9
    for path in _v1_specs():
        report = validate_file(path)
        assert report.ok and not report.errors, report.format()
        assert report.spec is not None
        # A new key whose default entered the spec's data would change this hash, and with
        # it every compiled file's header, checkpoint keys and caches.
        assert hash_of(report.spec) == pinned[path.name], (
            f"{path.name}: a spec written for spec_version 1 hashes differently: a key was "
            "added with a default that enters the spec's data (give it the default None)"
        )


def _with_defaults(model: Any, data: Any) -> Any:
    """`data` with every optional field of `model` it lacks written out at its default."""
    if not isinstance(data, dict):
        return data
    filled = dict(data)
    for name, info in type(model).model_fields.items():
        key = info.alias or name
        if key not in filled and not info.is_required() and key != "$schema":
            default = info.get_default(call_default_factory=True)
            if default is not None:
                dumped = type(model).model_validate(
                    {**model.model_dump(by_alias=True, exclude_none=True), key: default}
                )
                filled[key] = dumped.model_dump(mode="json", by_alias=True)[key]
    return filled


def test_v1_specs_compile_as_with_every_new_key_at_its_default() -> None:
    """Writing out an absent key at its default changes nothing: absent keeps the meaning."""
    for path in _v1_specs():
        spec = load_spec(path)
        data = spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)
        explicit = _with_defaults(spec, data)
        explicit["agents"] = {
            k: _with_defaults(spec.agents[k], v) for k, v in data["agents"].items()
        }
        explicit["workflow"] = [
            _with_defaults(step, raw)
            for step, raw in zip(spec.workflow, data["workflow"], strict=True)
        ]
        again = Spec.model_validate(explicit)
        assert compile_spec(again).files == compile_spec(spec).files, path.name


def test_v1_specs_compile_to_the_golden_bytes() -> None:
    """Where the example is still the v1 spec, the frozen copy compiles to the golden files."""
    compared = 0
    for path in _v1_specs():
        example = ROOT / "specs" / path.name
        spec = load_spec(path)
        if not example.is_file() or hash_of(load_spec(example)) != hash_of(spec):
            continue  # the example grew; its golden files follow it, not the v1 copy
        build = compile_spec(spec)
        runtime = {f"{build.package}/{module}" for module in runtime_files()}
        for relative, data in build.files.items():
            if relative not in runtime:
                assert (GOLDEN / path.stem / relative).read_bytes() == data, (path, relative)
        compared += 1
    assert compared >= 3
