"""The MAS spec: a typed model of the declarative multi-agent system (the IR of mas2c).

Every other module reads specs through these classes. The model only checks
shapes; cross-references, placeholders and expressions are checked in
`mas2c.validate`, which reports every problem with a location.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[a-z][a-z0-9_-]*$"
ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
VAR_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

JsonSchema = dict[str, Any]


class _Strict(BaseModel):
    """Base of every spec node: unknown keys are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Price(_Strict):
    input_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens.")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per million completion tokens.")


class ModelSpec(_Strict):
    """One entry of the model pool."""

    model: str = Field(min_length=1, description="Model name as the endpoint knows it.")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    description: str | None = Field(
        None, description="What the model is good at (read by the implementer)."
    )
    price: Price | None = None


class Agent(_Strict):
    role: str = Field(
        min_length=1, description="Who the agent is; becomes the system prompt's first line."
    )
    instructions: str = Field("", description="How the agent works; appended to the system prompt.")
    model: str | None = Field(
        None, description="A model pool id; omitted = an unbound slot the implementer fills."
    )
    output: Literal["text"] | JsonSchema = Field(
        "text", description="'text', or a JSON Schema object for structured output."
    )
    tools: list[str] = Field(default_factory=list, description="Tool ids this agent may call.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Overrides the model's temperature."
    )
    max_tool_rounds: int = Field(
        5, ge=1, le=50, description="Tool-call rounds before the agent must answer."
    )


class Tool(_Strict):
    description: str | None = None
    builtin: Literal["python_exec"] | None = Field(None, description="A built-in tool.")
    code: str | None = Field(
        None,
        description="Python source defining a function named like the tool; runs in the sandbox.",
    )
    timeout_s: float = Field(10.0, gt=0, le=3600)


# -- workflow steps -------------------------------------------------------------------------


class _StepBase(_Strict):
    id: str = Field(pattern=ID_PATTERN, description="Unique step id.")
    timeout_s: float | None = Field(None, gt=0, description="Wall-clock limit for this step.")


class _Writes(_StepBase):
    out: str | None = Field(
        None, pattern=VAR_PATTERN, description="State variable the result is stored in."
    )


class CallStep(_Writes):
    kind: Literal["call"]
    agent: str
    prompt: str


class EnsembleStep(_Writes):
    kind: Literal["ensemble"]
    agent: str | None = None
    agents: list[str] | None = None
    n: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Samples of `agent` (default 5), or rounds over `agents` (default 1).",
    )
    prompt: str
    vote: Literal["majority", "first"] | None = Field(
        None,
        description="'majority' (plurality of the final answers; fails when every answer is "
        "empty) or 'first' (the first answer that has one; never fails).",
    )
    judge: str | None = None
    vote_on: str | None = Field(
        None,
        description="The field of structured answers a vote compares (default `answer`).",
    )

    def sample_agents(self) -> list[str]:
        """The agent answering each sample, in sample order."""
        if self.agents:
            return list(self.agents) * (self.n or 1)
        return [self.agent or ""] * (self.n or 5)


class ParallelStep(_Writes):
    kind: Literal["parallel"]
    branches: list[list[Step]] = Field(min_length=1)


class LoopStep(_StepBase):
    kind: Literal["loop"]
    steps: list[Step] = Field(min_length=1)
    until: str
    max_iterations: int | None = Field(None, ge=1, le=1000)
    on_exhausted: Literal["continue", "fail"] | None = Field(
        None,
        description="When max_iterations pass without `until`: 'continue' (the default: "
        "traced, and listed under `warnings` in the result) or 'fail' (a LoopExhausted error).",
    )


class Case(_Strict):
    when: str
    steps: list[Step] = Field(min_length=1)


class BranchStep(_StepBase):
    kind: Literal["branch"]
    cases: list[Case] = Field(min_length=1)
    else_: list[Step] | None = Field(None, alias="else")


class DebateStep(_Writes):
    kind: Literal["debate"]
    agents: list[str] = Field(min_length=2)
    rounds: int = Field(2, ge=1, le=20)
    topic: str
    judge: str | None = None
    vote: Literal["majority", "first"] | None = Field(
        None, description="'majority' or 'first' (see the ensemble step)."
    )
    vote_on: str | None = Field(
        None,
        description="The field of structured answers a vote compares (default `answer`).",
    )


class ProgrammerStep(_Writes):
    kind: Literal["programmer"]
    agent: str
    prompt: str
    max_attempts: int = Field(3, ge=1, le=20)
    run_timeout_s: float = Field(10.0, gt=0, le=3600)


class TestStep(_Writes):
    kind: Literal["test"]
    code: str = Field(description="State variable (or dotted path) holding the code under test.")
    tests: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="Test source run after the code, or a list of test snippets run one by "
        "one; placeholders allowed (a whole placeholder may hold a list of snippets)."
    )
    run_timeout_s: float = Field(10.0, gt=0, le=3600)


class ToolStep(_Writes):
    kind: Literal["tool"]
    tool: str
    args: dict[str, Any] = Field(
        default_factory=dict, description="String values may hold placeholders."
    )


Step = Annotated[
    CallStep
    | EnsembleStep
    | ParallelStep
    | LoopStep
    | BranchStep
    | DebateStep
    | ProgrammerStep
    | TestStep
    | ToolStep,
    Field(discriminator="kind"),
]

STEP_KINDS: tuple[str, ...] = (
    "call",
    "ensemble",
    "parallel",
    "loop",
    "branch",
    "debate",
    "programmer",
    "test",
    "tool",
)


class Budgets(_Strict):
    max_llm_calls: int | None = Field(None, ge=1)
    max_total_tokens: int | None = Field(None, ge=1)
    max_cost_usd: float | None = Field(None, gt=0)
    timeout_s: float | None = Field(None, gt=0)


class Spec(_Strict):
    """A multi-agent system."""

    schema_: str | None = Field(None, alias="$schema", description="Editor hint; ignored.")
    spec_version: Literal["1"]
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    description: str = ""
    inputs: dict[str, JsonSchema] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    agents: dict[str, Agent] = Field(min_length=1)
    tools: dict[str, Tool] = Field(default_factory=dict)
    workflow: list[Step] = Field(min_length=1)
    budgets: Budgets = Budgets()

    @model_validator(mode="before")
    @classmethod
    def _coerce_version(cls, data: Any) -> Any:
        # YAML reads `spec_version: 1` as an int; accept it as the string it means.
        version = data.get("spec_version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version == 1:
            data = {**data, "spec_version": "1"}
        return data

    @property
    def package_name(self) -> str:
        return "mas2c_" + self.name.replace("-", "_")

    def to_data(self) -> dict[str, Any]:
        """The spec as plain JSON data, keys as written in specs (`else`, not `else_`)."""
        return self.model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude_defaults=False
        )


for _model in (ParallelStep, LoopStep, Case, BranchStep, Spec):
    _model.model_rebuild()


def iter_steps(steps: list[Step], pointer: str) -> Iterator[tuple[str, Step]]:
    """Every step in a step list, depth first, with its JSON pointer."""
    for index, step in enumerate(steps):
        here = f"{pointer}/{index}"
        yield here, step
        for child_pointer, children in child_step_lists(step, here):
            yield from iter_steps(children, child_pointer)


def child_step_lists(step: Step, pointer: str) -> list[tuple[str, list[Step]]]:
    """The nested step lists of a composite step, with their pointers."""
    if isinstance(step, ParallelStep):
        return [(f"{pointer}/branches/{i}", branch) for i, branch in enumerate(step.branches)]
    if isinstance(step, LoopStep):
        return [(f"{pointer}/steps", step.steps)]
    if isinstance(step, BranchStep):
        lists = [(f"{pointer}/cases/{i}/steps", case.steps) for i, case in enumerate(step.cases)]
        if step.else_ is not None:
            lists.append((f"{pointer}/else", step.else_))
        return lists
    return []


def step_out(step: Step) -> str | None:
    """The state variable a step writes, if any."""
    out = getattr(step, "out", None)
    return out if isinstance(out, str) else None


def step_agents(step: Step) -> list[str]:
    """Agent ids a step refers to directly (not through nested steps)."""
    if isinstance(step, CallStep | ProgrammerStep):
        return [step.agent]
    if isinstance(step, EnsembleStep):
        names = list(step.agents or []) + ([step.agent] if step.agent else [])
        return names + ([step.judge] if step.judge else [])
    if isinstance(step, DebateStep):
        return list(step.agents) + ([step.judge] if step.judge else [])
    return []


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def spec_hash(spec: Spec) -> str:
    """sha256 of the spec's canonical JSON: the same system hashes the same, however written."""
    return hashlib.sha256(canonical_json(spec.to_data()).encode()).hexdigest()


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of the spec (what `mas2c schema` prints)."""
    schema = Spec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://mas2c.dev/schema/spec-v1.json"
    schema["title"] = "mas2c MAS spec"
    return schema
