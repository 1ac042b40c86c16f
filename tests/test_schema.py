"""The published JSON Schema: `mas2c schema` and the committed specs/mas2c.schema.json agree.

Editors read the committed file (`# yaml-language-server: $schema=./mas2c.schema.json`)
and the generator sends it as the structured-output schema, so it must never go
stale. When the spec model changes, regenerate it with:

    .venv/bin/mas2c schema -o specs/mas2c.schema.json
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mas2c import cli
from mas2c.lang.spec import STEP_KINDS, json_schema

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "specs" / "mas2c.schema.json"
REGENERATE = "regenerate it with: .venv/bin/mas2c schema -o specs/mas2c.schema.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _schema_output(capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["schema"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_committed_schema_exists() -> None:
    assert COMMITTED.is_file(), f"{COMMITTED.relative_to(ROOT)} is missing: {REGENERATE}"


def test_schema_command_matches_committed_file(capsys: pytest.CaptureFixture[str]) -> None:
    printed = _schema_output(capsys)
    committed = COMMITTED.read_text(encoding="utf-8") if COMMITTED.is_file() else ""
    assert printed == committed, (
        f"specs/mas2c.schema.json differs from `mas2c schema` (the spec model changed): {REGENERATE}"
    )


def test_schema_output_option_writes_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed = _schema_output(capsys)
    target = tmp_path / "schema.json"
    assert cli.main(["schema", "-o", str(target)]) == 0
    assert capsys.readouterr().out == ""
    assert target.read_text(encoding="utf-8") == printed


def test_schema_output_never_creates_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o /missing/dir/x.json` is a usage error that creates nothing (issue 13 item 1)."""
    target = tmp_path / "missing" / "dir" / "schema.json"
    assert cli.main(["schema", "-o", str(target)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_schema_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    assert _schema_output(capsys) == _schema_output(capsys)
    assert json.loads(_schema_output(capsys)) == json_schema()


# -- shape, without a JSON Schema library ---------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    data = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _walk(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found += _walk(value)
    elif isinstance(node, list):
        for value in node:
            found += _walk(value)
    return found


def test_schema_header(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == DRAFT
    assert schema["$id"].startswith("https://")
    assert schema["title"]
    assert schema["type"] == "object"
    assert set(schema["required"]) == {"spec_version", "name", "agents", "workflow"}


def test_schema_refs_resolve(schema: dict[str, Any]) -> None:
    definitions = schema.get("$defs", {})
    for node in _walk(schema):
        ref = node.get("$ref")
        if isinstance(ref, str):
            assert ref.startswith("#/$defs/"), ref
            assert ref.removeprefix("#/$defs/") in definitions, f"dangling {ref}"


def test_schema_forbids_unknown_keys(schema: dict[str, Any]) -> None:
    """extra="forbid" everywhere: editors flag a misspelt key, like the validator does."""
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        if definition.get("type") == "object" and "properties" in definition:
            assert definition.get("additionalProperties") is False, name


def test_schema_covers_every_step_kind(schema: dict[str, Any]) -> None:
    steps = schema["properties"]["workflow"]["items"]
    mapping = steps["discriminator"]["mapping"]
    assert steps["discriminator"]["propertyName"] == "kind"
    assert sorted(mapping) == sorted(STEP_KINDS)
    for kind, ref in mapping.items():
        definition = schema["$defs"][ref.removeprefix("#/$defs/")]
        assert definition["properties"]["kind"].get("const") == kind
        assert {"id", "kind"} <= set(definition["required"])


def test_example_specs_point_at_the_committed_schema() -> None:
    for path in sorted((ROOT / "specs").glob("*.yaml")):
        match = re.search(r"yaml-language-server: \$schema=(\S+)", path.read_text("utf-8"))
        if match:
            assert (path.parent / match.group(1)).resolve() == COMMITTED, path.name


# -- with a JSON Schema library, where one is installed --------------------------------------


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> Any:
    import jsonschema  # the dev extra

    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_schema_is_valid_draft_2020_12(validator: Any) -> None:
    assert validator.META_SCHEMA["$id"] == DRAFT


def test_example_specs_conform(validator: Any) -> None:
    examples = sorted((ROOT / "specs").glob("*.yaml"))
    for path in examples:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text("utf-8")))]
        assert errors == [], f"{path.name}: {errors}"


STRUCTURAL = sorted((ROOT / "tests" / "invalid").glob("MAS10[1-6]-*.yaml"))


@pytest.mark.parametrize("path", STRUCTURAL, ids=lambda p: p.stem)
def test_schema_rejects_structurally_invalid_specs(validator: Any, path: Path) -> None:
    """What the validator calls a structural error (MAS101-106), the schema rejects too."""
    data = yaml.safe_load(path.read_text("utf-8"))
    assert list(validator.iter_errors(data)), f"{path.name} passes the published schema"
