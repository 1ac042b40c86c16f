"""The example specs in specs/: one per MAS archetype, all valid, all exemplary.

They are documentation, the compiler's golden inputs and the generator's few-shot
material, so they must validate without a single problem (not even a warning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mas2c.lang.expr import parse_path
from mas2c.lang.source import load_file
from mas2c.lang.spec import Spec, iter_steps, step_out
from mas2c.lang.validate import validate_file

SPECS = Path(__file__).resolve().parent.parent / "specs"
EXAMPLES = sorted(SPECS.glob("*.yaml"))
SCHEMA_LINE = "# yaml-language-server: $schema=./mas2c.schema.json"

ARCHETYPES = {
    "chain-of-thought",
    "self-consistency",
    "debate",
    "reflexion",
    "plan-and-execute",
    "code-generation",
    "router",
    "hierarchical",
}


def _spec(path: Path) -> Spec:
    report = validate_file(path)
    assert report.spec is not None, report.format()
    return report.spec


def test_every_archetype_has_an_example() -> None:
    present = {path.stem for path in EXAMPLES}
    missing = ARCHETYPES - present
    assert not missing, f"missing example specs: {sorted(missing)}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_without_problems(path: Path) -> None:
    report = validate_file(path)
    assert report.problems == [], report.format()
    assert report.spec is not None


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_declares_bound_outputs(path: Path) -> None:
    spec = _spec(path)
    assert spec.outputs, f"{path.name} declares no outputs"
    written = {out for _, step in iter_steps(spec.workflow, "/workflow") if (out := step_out(step))}
    bound = written | set(spec.inputs)
    for name, target in spec.outputs.items():
        parsed = parse_path(target)
        assert parsed is not None, f"output {name}: {target!r} is not a state path"
        assert parsed[0] in bound, f"output {name}: `{parsed[0]}` is never written"
    # The validator's own check (bound on every path, through branches) must agree.
    assert not [p for p in validate_file(path).problems if p.code == "MAS205"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_exemplary(path: Path) -> None:
    """What the generator should imitate: editor schema hint, names, descriptions, a priced pool."""
    assert path.read_text(encoding="utf-8").splitlines()[0] == SCHEMA_LINE
    spec = _spec(path)
    assert spec.name == path.stem, "the spec's name matches its file name"
    assert spec.description.strip()
    for name, schema in spec.inputs.items():
        assert schema.get("description"), f"input {name} has no description"
    assert spec.models, "the example has a model pool"
    for model_id, model in spec.models.items():
        assert model.description, f"model {model_id} has no description"
        assert model.price is not None, f"model {model_id} has no price"
    for agent_id, agent in spec.agents.items():
        assert agent.model is not None, f"agent {agent_id} has no model"
        assert agent.instructions.strip(), f"agent {agent_id} has no instructions"
    budgets = spec.budgets
    assert budgets.max_llm_calls and budgets.max_cost_usd and budgets.timeout_s


def _nulls(value: Any, pointer: str = "") -> list[str]:
    if value is None:
        return [pointer or "/"]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _nulls(v, f"{pointer}/{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _nulls(v, f"{pointer}/{i}")]
    return []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_has_no_accidental_nulls(path: Path) -> None:
    """An unquoted comma in a flow mapping (`{description: a, b}`) makes a stray null key."""
    assert _nulls(load_file(path).data) == []
