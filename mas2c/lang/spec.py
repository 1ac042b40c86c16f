"""The MAS spec: a typed model of the declarative multi-agent system (the IR of mas2c).

Every other module reads specs through these classes. The model only checks
shapes; cross-references, placeholders and expressions are checked in
`mas2c.lang.validate`, which reports every problem with a location.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from mas2c.lang.prompts import Prompts

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


class Example(_Strict):
    """One few-shot exchange, sent as real chat messages before the task."""

    user: str = Field(description="What the user says.")
    assistant: str | dict[str, Any] = Field(
        description="The answer the agent should give (an object for a structured agent)."
    )


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
    delegates: list[str] | None = Field(
        None,
        description="Agents this agent may call as tools (a manager's workers): each is "
        "offered as a function named like the agent, described by its role; a worker's "
        "call runs under the run's budgets and trace.",
    )
    examples: list[Example] | None = Field(
        None,
        description="Few-shot examples: user/assistant pairs sent as real chat messages "
        "after the system prompt, before the task.",
    )


# `type: chat` in an input schema: a chat history (a list of {role, content} messages).
CHAT_SCHEMA: JsonSchema = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": ["user", "assistant"]},
            "content": {"type": "string"},
        },
        "required": ["role", "content"],
    },
}


def expand_chat_types(inputs: Any) -> Any:
    """Input schemas with `type: chat` as the JSON Schema of a chat history (other keys,
    such as `description`, kept)."""
    if not isinstance(inputs, dict):
        return inputs
    return {
        name: {**schema, **CHAT_SCHEMA}
        if isinstance(schema, dict) and schema.get("type") == "chat"
        else schema
        for name, schema in inputs.items()
    }


class StepSettings(_Strict):
    """Per-step overrides of the LLM request, for every call made inside the step."""

    model: str | None = Field(None, description="A model pool id used instead of the agent's.")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    stop: list[str] | None = Field(None, max_length=4, description="Stop sequences.")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None


class Egress(_Strict):
    """Outbound HTTP a code tool may make through the host gateway (the sandbox has no network)."""

    hosts: list[str] = Field(
        min_length=1,
        description="Hosts the tool may call: `host` (ports 80/443) or `host:port`.",
    )
    secrets: list[str] = Field(
        default_factory=list,
        description="Names of host secrets (environment variables, or MAS2C_SECRETS_FILE) the "
        "gateway inserts where a request to these hosts says `${NAME}`; never inside the sandbox.",
    )

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not _EGRESS_HOST.fullmatch(host):
                raise ValueError(f"{host!r} is not a host or host:port")
        return hosts

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _SECRET_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a secret name ([A-Za-z_][A-Za-z0-9_]*)")
        return names


_EGRESS_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})(:[0-9]{1,5})?")
_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class Tool(_Strict):
    description: str | None = None
    builtin: Literal["python_exec"] | None = Field(None, description="A built-in tool.")
    code: str | None = Field(
        None,
        description="Python source defining a function named like the tool; runs in the sandbox.",
    )
    timeout_s: float = Field(10.0, gt=0, le=3600)
    egress: Egress | None = Field(
        None,
        description="HTTP hosts (and host secrets) a code tool may use, through the gateway "
        "(`from ._egress import http`).",
    )

    @model_validator(mode="after")
    def _egress_needs_code(self) -> Tool:
        if self.egress is not None and self.code is None:
            raise ValueError("`egress` is for code tools: this tool has no `code`")
        return self


# -- workflow steps -------------------------------------------------------------------------
#
# The step-kind registry. Each step kind is ONE pydantic class below; its facts are
# methods and class variables on that class, and every other module asks them instead
# of dispatching on `kind`:
#
#   child_lists()   nested step lists (relative key path -> steps)
#   shape           how nested lists run: "leaf", "sequence", "concurrent", "repeat", "alternatives",
#                   "each" (once per item of a list, in a scope of their own: see MapStep)
#   agent_refs()    agents it names (relative key, agent id, role: caller/sampler/judge/programmer)
#   tool_refs()     tools it names          templates()   texts with placeholders it renders
#   flow_refs()     flows (sub-workflows) it runs, flow_repeats() times per run
#   agent_choice()  an agent chosen at run time from a set; chat_history() a history it sends
#   body_templates() texts rendered inside its body's scope; item_names() what "each" binds
#   references()    state paths it reads    conditions()  expressions it evaluates
#   writes()        the state variable it sets; out_schema() the JSON Schema of that value
#   llm_calls()     static upper bound of its own LLM calls; child_repeats() times its
#                   nested lists run (static_calls() combines them)
#   fan_out()       its fan-out field, effective value (default applied) and reduction
#   summary()       one line for docstrings; graph_detail() for diagrams
#   LANGUAGE        the generator's description of the kind (fields and meaning)
#   RUNTIME_MODULES the runtime modules (templates/) its compiled code needs
#
# Adding a kind: a class here (or anywhere, then `register_step_kind(cls)`), plus its
# emitter (`mas2c.compile.register_emitter`) and template. README "Adding a step kind".


Shape = Literal["leaf", "sequence", "concurrent", "repeat", "alternatives", "each"]
AgentRole = Literal["caller", "sampler", "judge", "programmer"]


@dataclass(frozen=True)
class AgentRef:
    """An agent a step names: where (key relative to the step), who, and in which role."""

    key: str
    agent: str
    role: AgentRole


@dataclass(frozen=True)
class FanOut:
    """A step's fan-out: the field that sets it, its value (default applied), the work it
    multiplies (`size`, for picking the biggest), and the value that halves it."""

    field: str
    value: int
    size: int
    # Other fields set when the fan-out is reduced (a map's on_overflow: truncate, so that
    # the reduced cap cuts the list visibly instead of failing).
    also: tuple[tuple[str, Any], ...] = ()

    @property
    def reduced(self) -> int:
        return max(1, self.value // 2)


class StepBase(_Strict):
    """Fields and facts common to every step kind (see the registry notes above)."""

    id: str = Field(pattern=ID_PATTERN, description="Unique step id.")
    timeout_s: float | None = Field(None, gt=0, description="Wall-clock limit for this step.")
    retry: int | None = Field(
        None,
        ge=0,
        le=10,
        description="Extra attempts (default 0) when the step fails with a recoverable error "
        "(not a budget, bad input or the run's timeout); a failed attempt's writes are discarded.",
    )
    fallback: list[Step] | None = Field(
        None,
        min_length=1,
        description="Steps that run when the step still fails after its retries, with the "
        "error in the state variable `error` ({type, code, message, step, pointer}); the run "
        "goes on when they succeed.",
    )
    settings: StepSettings | None = Field(
        None,
        description="Overrides (model, temperature, max_tokens, stop, top_p, seed) for every "
        "LLM call made inside this step; an inner step's own settings win.",
    )

    LANGUAGE: ClassVar[str] = ""
    shape: ClassVar[Shape] = "leaf"
    # Runtime modules (templates/) the compiled step needs beyond the core ones.
    RUNTIME_MODULES: ClassVar[tuple[str, ...]] = ()

    @property
    def kind_name(self) -> str:
        return str(getattr(self, "kind", type(self).__name__))

    def child_lists(self) -> list[tuple[str, list[Step]]]:
        return []

    def agent_refs(self) -> list[AgentRef]:
        return []

    def agent_choice(self) -> tuple[str, str, list[str]] | None:
        """An agent chosen at run time: (relative key, the placeholder, the allowed set)."""
        return None

    def chat_history(self) -> tuple[str, str] | None:
        """A chat history sent as messages: (relative key, the placeholder)."""
        return None

    def tool_refs(self) -> list[tuple[str, str]]:
        return []

    def flow_refs(self) -> list[tuple[str, str]]:
        """Flows it runs (relative key, flow name); see `flow_repeats()` for how often."""
        return []

    def flow_repeats(self) -> int:
        """How many times one run of the step runs each flow it names."""
        return 1

    def templates(self) -> list[tuple[str, str]]:
        return []

    def references(self) -> list[tuple[str, str]]:
        return []

    def conditions(self) -> list[tuple[str, str]]:
        return []

    def body_templates(self) -> list[tuple[str, str]]:
        """Texts rendered in the scope of its nested steps, after them (flow "each")."""
        return []

    def item_names(self) -> tuple[str, str] | None:
        """The variables a flow "each" kind binds for its body: (item, index)."""
        return None

    def writes(self) -> str | None:
        out = getattr(self, "out", None)
        return out if isinstance(out, str) else None

    def answer_agents(self) -> list[str]:
        """Agents whose answer can become the value written (empty: the step builds it)."""
        return []

    def out_schema(self, agents: Mapping[str, Agent]) -> JsonSchema | None:
        """The JSON Schema of the value written, where it is known."""
        answering = self.answer_agents()
        agent = agents.get(answering[0]) if answering else None
        if agent is not None and isinstance(agent.output, dict):
            return agent.output
        return None

    def llm_calls(self) -> int:
        return 0

    def child_repeats(self) -> int:
        return 1

    def fan_out(self) -> FanOut | None:
        return None

    def problems(self) -> list[tuple[str, str, str, str | None]]:
        """Kind-specific rules the types cannot say: (code, relative key, message, hint)."""
        return []

    def agent_note(self, agent: str, role: AgentRole) -> str:
        """How this step uses `agent`, in a few words (read by the implementer's LLM)."""
        return f"{role} in {self.kind_name} `{self.id}`"

    def summary(self) -> str:
        return f"`{self.id}`: a {self.kind_name} step."

    def graph_detail(self) -> str:
        return ""


# Kept for code that still names the old private base.
_StepBase = StepBase


class _Writes(StepBase):
    out: str | None = Field(
        None, pattern=VAR_PATTERN, description="State variable the result is stored in."
    )


class CallStep(_Writes):
    kind: Literal["call"]
    agent: str = Field(
        description="An agent id, or (with `agents`) a placeholder naming one of `agents` "
        "at run time."
    )
    agents: list[str] | None = Field(
        None,
        min_length=1,
        description="The set `agent` is chosen from by a state value (`agent: "
        '"{{ route.specialist }}"`).',
    )
    prompt: str
    history: str | None = Field(
        None,
        description="A whole placeholder holding a chat history (an input of `type: chat`, a "
        "list of {role, content}): sent as real messages before the prompt.",
    )

    LANGUAGE: ClassVar[str] = (
        "one agent answers one prompt. Fields: agent, prompt, out; history (optional: a\n"
        "  placeholder of a chat-history input, sent as real messages); agents (optional: the set\n"
        '  agent is chosen from at run time, with agent: "{{ route.owner }}").'
    )

    def agent_refs(self) -> list[AgentRef]:
        if self.agents is not None:
            return [AgentRef(f"agents/{i}", a, "caller") for i, a in enumerate(self.agents)]
        if "{{" in self.agent:  # a choice without its set: MAS210 (problems)
            return []
        return [AgentRef("agent", self.agent, "caller")]

    def agent_choice(self) -> tuple[str, str, list[str]] | None:
        if self.agents is None:
            return None
        return ("agent", self.agent, list(self.agents))

    def problems(self) -> list[tuple[str, str, str, str | None]]:
        if self.agents is None and "{{" in self.agent:
            return [
                (
                    "MAS210",
                    "agent",
                    "an agent chosen by a state value needs `agents`: the set it is chosen from",
                    "add agents: [<every agent the value may name>]",
                )
            ]
        return []

    def templates(self) -> list[tuple[str, str]]:
        found = [("prompt", self.prompt)]
        if self.agents is not None:
            found.append(("agent", self.agent))
        return found + ([("history", self.history)] if self.history is not None else [])

    def answer_agents(self) -> list[str]:
        return list(self.agents) if self.agents is not None else [self.agent]

    def chat_history(self) -> tuple[str, str] | None:
        return ("history", self.history) if self.history is not None else None

    def out_schema(self, agents: Mapping[str, Agent]) -> JsonSchema | None:
        outputs = [agents[a].output for a in self.answer_agents() if a in agents]
        first = outputs[0] if outputs else None
        if isinstance(first, dict) and all(o == first for o in outputs):
            return first
        return None

    def llm_calls(self) -> int:
        return 1

    def agent_note(self, agent: str, role: AgentRole) -> str:
        return f"call `{self.id}`"

    def summary(self) -> str:
        if self.agents is not None:
            return f"`{self.id}`: one of {', '.join(self.agents)} (chosen at run time) answers."
        return f"`{self.id}`: agent `{self.agent}` answers the prompt."

    def graph_detail(self) -> str:
        if self.agents is not None:
            return f"{self.agent.strip()} ∈ {', '.join(self.agents)}"
        return self.agent


class EnsembleStep(_Writes):
    kind: Literal["ensemble"]
    agent: str | None = None
    agents: list[str] | None = None
    flow: str | None = Field(
        None,
        description="A flow (see `flows`) run n times instead of agent samples: each sample "
        "is the flow's outputs object (ScEnsemble over any flow).",
    )
    with_: dict[str, Any] | None = Field(
        None,
        alias="with",
        description="The flow's arguments (a whole placeholder passes the value).",
    )
    n: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Samples of `agent` or of `flow` (default 5), or rounds over `agents` "
        "(default 1).",
    )
    prompt: str | None = Field(
        None,
        description="What the samples answer (required with `agent`/`agents`); with `flow`, "
        "optional: the task a judge is shown.",
    )
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

    RUNTIME_MODULES: ClassVar[tuple[str, ...]] = ("_voting.py",)
    LANGUAGE: ClassVar[str] = (
        "several samples, then a decision. Fields: agent (sampled n times, default 5) OR\n"
        "  agents (one sample each, repeated n times) with prompt, OR flow (a flow's name, run n\n"
        "  times concurrently, default 5) with `with` (its arguments); exactly one of\n"
        '  vote: "majority" or judge (an agent id); vote_on (the field structured answers or the\n'
        "  flow's outputs vote on, default answer); out (the winning answer, the winning flow\n"
        "  outputs object, or the judge's output)."
    )

    def sample_agents(self) -> list[str]:
        """The agent answering each sample, in sample order (none for a flow ensemble)."""
        if self.flow is not None:
            return []
        if self.agents:
            return list(self.agents) * (self.n or 1)
        return [self.agent or ""] * (self.n or 5)

    def samples(self) -> int:
        return (self.n or 5) if self.flow is not None else len(self.sample_agents())

    def agent_refs(self) -> list[AgentRef]:
        refs = [AgentRef("agent", self.agent, "sampler")] if self.agent else []
        refs += [AgentRef(f"agents/{i}", a, "sampler") for i, a in enumerate(self.agents or [])]
        return refs + ([AgentRef("judge", self.judge, "judge")] if self.judge else [])

    def flow_refs(self) -> list[tuple[str, str]]:
        return [("flow", self.flow)] if self.flow is not None else []

    def flow_repeats(self) -> int:
        return self.n or 5

    def templates(self) -> list[tuple[str, str]]:
        found = [("prompt", self.prompt)] if self.prompt is not None else []
        return found + _strings(self.with_ or {}, "with")

    def answer_agents(self) -> list[str]:
        if self.judge:
            return [self.judge]
        return [self.agent] if self.agent else list(self.agents or [])

    def llm_calls(self) -> int:
        return len(self.sample_agents()) + (1 if self.judge else 0)

    def fan_out(self) -> FanOut:
        if self.flow is not None:
            return FanOut("n", self.n or 5, self.n or 5)
        n = self.n or (1 if self.agents else 5)
        return FanOut("n", n, n * len(self.agents or [1]))

    def problems(self) -> list[tuple[str, str, str, str | None]]:
        found: list[tuple[str, str, str, str | None]] = []
        sources = [self.agent is not None, bool(self.agents), self.flow is not None]
        if sum(sources) != 1:
            found.append(
                (
                    "MAS504",
                    "",
                    "an ensemble needs exactly one of `agent` (sampled n times), `agents` "
                    "and `flow` (run n times)",
                    None,
                )
            )
        if self.flow is None and self.prompt is None and any(sources):
            found.append(("MAS101", "prompt", "an ensemble of agents needs a `prompt`", None))
        if self.flow is None and self.with_ is not None:
            found.append(
                ("MAS504", "with", "`with` passes a flow's arguments: it needs `flow`", None)
            )
        if (self.vote is None) == (self.judge is None):
            found.append(
                (
                    "MAS502",
                    "",
                    "an ensemble needs exactly one of `vote: majority` and `judge`",
                    None,
                )
            )
        return found

    def agent_note(self, agent: str, role: AgentRole) -> str:
        samples = self.sample_agents()
        if role == "judge":
            return f"judge of ensemble `{self.id}` ({self.samples()} samples)"
        decide = "majority vote" if self.vote else "a judge decides"
        return f"sampled {samples.count(agent)}x in ensemble `{self.id}` ({decide})"

    def summary(self) -> str:
        decide = f"judge `{self.judge}` picks" if self.judge else "majority vote"
        of = f" of flow `{self.flow}`" if self.flow is not None else ""
        return f"`{self.id}`: {self.samples()} samples{of}, {decide}."

    def graph_detail(self) -> str:
        if self.flow is not None:
            return f"{self.samples()}× flow {self.flow}"
        return f"{len(self.sample_agents())}× {self.agent or ', '.join(self.agents or [])}"


class ParallelStep(_Writes):
    kind: Literal["parallel"]
    branches: list[list[Step]] = Field(min_length=1)

    LANGUAGE: ClassVar[str] = (
        "branches run concurrently; each branch is a list of steps. Fields: branches,\n"
        "  out (optional: the list of the branches' results)."
    )
    shape: ClassVar[Shape] = "concurrent"

    def child_lists(self) -> list[tuple[str, list[Step]]]:
        return [(f"branches/{i}", branch) for i, branch in enumerate(self.branches)]

    def out_schema(self, agents: Mapping[str, Agent]) -> JsonSchema | None:
        return {"type": "array"}

    def summary(self) -> str:
        return f"`{self.id}`: {len(self.branches)} branches run concurrently."


class LoopStep(StepBase):
    kind: Literal["loop"]
    steps: list[Step] = Field(min_length=1)
    until: str
    max_iterations: int | None = Field(None, ge=1, le=1000)
    on_exhausted: Literal["continue", "fail"] | None = Field(
        None,
        description="When max_iterations pass without `until`: 'continue' (the default: "
        "traced, and listed under `warnings` in the result) or 'fail' (a LoopExhausted error).",
    )

    LANGUAGE: ClassVar[str] = (
        "repeats steps until a condition holds. Fields: steps, until, max_iterations (required),\n"
        '  on_exhausted ("continue", the default, or "fail" when until never held).'
    )
    shape: ClassVar[Shape] = "repeat"

    def child_lists(self) -> list[tuple[str, list[Step]]]:
        return [("steps", self.steps)]

    def conditions(self) -> list[tuple[str, str]]:
        return [("until", self.until)]

    def child_repeats(self) -> int:
        return self.max_iterations or 1

    def fan_out(self) -> FanOut:
        limit = self.max_iterations or 1
        return FanOut("max_iterations", limit, limit)

    def problems(self) -> list[tuple[str, str, str, str | None]]:
        if self.max_iterations is not None:
            return []
        return [
            (
                "MAS501",
                "max_iterations",
                f"loop `{self.id}` has no `max_iterations`: an unbounded loop can spend "
                "without end",
                "add max_iterations: 3 (or the bound you need)",
            )
        ]

    def summary(self) -> str:
        return (
            f"`{self.id}`: repeat until the condition holds, at most {self.max_iterations} time(s)."
        )


class Case(_Strict):
    when: str
    steps: list[Step] = Field(min_length=1)


class BranchStep(StepBase):
    kind: Literal["branch"]
    cases: list[Case] = Field(min_length=1)
    else_: list[Step] | None = Field(None, alias="else")

    LANGUAGE: ClassVar[str] = (
        "runs the steps of the first case whose condition holds, else the `else` steps.\n"
        "  Fields: cases: [{when, steps}], else (optional step list)."
    )
    shape: ClassVar[Shape] = "alternatives"

    def child_lists(self) -> list[tuple[str, list[Step]]]:
        lists = [(f"cases/{i}/steps", case.steps) for i, case in enumerate(self.cases)]
        if self.else_ is not None:
            lists.append(("else", self.else_))
        return lists

    def conditions(self) -> list[tuple[str, str]]:
        return [(f"cases/{i}/when", case.when) for i, case in enumerate(self.cases)]

    def summary(self) -> str:
        return f"`{self.id}`: the first case whose condition holds, else the `else` steps."


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

    RUNTIME_MODULES: ClassVar[tuple[str, ...]] = ("_voting.py",)
    LANGUAGE: ClassVar[str] = (
        "agents answer, see each other's answers and revise for `rounds` rounds (default 2);\n"
        '  exactly one of judge (an agent id) or vote: "majority" closes it. Fields: agents (2 or\n'
        "  more), rounds, topic, judge/vote (vote_on for structured answers), out (the judge's output)."
    )

    def sample_agents(self) -> list[str]:
        return list(self.agents)

    def agent_refs(self) -> list[AgentRef]:
        refs = [AgentRef(f"agents/{i}", a, "sampler") for i, a in enumerate(self.agents)]
        return refs + ([AgentRef("judge", self.judge, "judge")] if self.judge else [])

    def templates(self) -> list[tuple[str, str]]:
        return [("topic", self.topic)]

    def answer_agents(self) -> list[str]:
        return [self.judge] if self.judge else list(self.agents)

    def llm_calls(self) -> int:
        return len(self.agents) * self.rounds + (1 if self.judge else 0)

    def fan_out(self) -> FanOut:
        return FanOut("rounds", self.rounds, self.rounds * len(self.agents))

    def problems(self) -> list[tuple[str, str, str, str | None]]:
        if self.judge is not None and self.vote is not None:
            return [("MAS502", "", "a debate closes with a `judge` or a `vote`, not both", None)]
        if self.judge is None and self.vote is None:
            return [("MAS502", "", "a debate needs a `judge` or `vote: majority` to close", None)]
        return []

    def agent_note(self, agent: str, role: AgentRole) -> str:
        if role == "judge":
            return f"judge of debate `{self.id}`"
        return f"debater in debate `{self.id}` ({self.rounds} rounds, {len(self.agents)} debaters)"

    def summary(self) -> str:
        decide = f"judge `{self.judge}` decides" if self.judge else "majority vote"
        return (
            f"`{self.id}`: {len(self.agents)} agents debate for {self.rounds} round(s), {decide}."
        )

    def graph_detail(self) -> str:
        return f"{', '.join(self.agents)} × {self.rounds} rounds"


def _object(fields: dict[str, str]) -> JsonSchema:
    return {"type": "object", "properties": {k: {"type": v} for k, v in fields.items()}}


class ProgrammerStep(_Writes):
    kind: Literal["programmer"]
    agent: str
    prompt: str
    max_attempts: int = Field(3, ge=1, le=20)
    run_timeout_s: float = Field(10.0, gt=0, le=3600)
    expect_output: bool | None = Field(
        None,
        description="true: the program must print its answer: an attempt that exits 0 with "
        "nothing on stdout fails (and is repaired, saying so). Leave it out for code that only "
        "defines functions (tested by a later `test` step), where exiting 0 passes.",
    )

    RUNTIME_MODULES: ClassVar[tuple[str, ...]] = ("_tools.py",)
    LANGUAGE: ClassVar[str] = (
        "an agent writes Python code, it is run, errors go back to the agent up to\n"
        "  max_attempts times. Fields: agent, prompt, max_attempts, run_timeout_s,\n"
        "  expect_output (true when the program prints its answer: printing nothing then fails\n"
        "  the attempt), out. The out variable has fields code, output, passed, attempts."
    )

    def agent_refs(self) -> list[AgentRef]:
        return [AgentRef("agent", self.agent, "programmer")]

    def templates(self) -> list[tuple[str, str]]:
        return [("prompt", self.prompt)]

    def out_schema(self, agents: Mapping[str, Agent]) -> JsonSchema | None:
        return _object(
            {"code": "string", "output": "string", "passed": "boolean", "attempts": "integer"}
        )

    def llm_calls(self) -> int:
        return self.max_attempts

    def fan_out(self) -> FanOut:
        return FanOut("max_attempts", self.max_attempts, self.max_attempts)

    def agent_note(self, agent: str, role: AgentRole) -> str:
        return (
            f"programmer step `{self.id}`: writes Python that is run "
            f"(up to {self.max_attempts} attempts)"
        )

    def summary(self) -> str:
        return f"`{self.id}`: agent `{self.agent}` writes Python, up to {self.max_attempts} attempt(s)."

    def graph_detail(self) -> str:
        return self.agent


class TestStep(_Writes):
    kind: Literal["test"]
    code: str = Field(description="State variable (or dotted path) holding the code under test.")
    tests: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="Test source run after the code, or a list of test snippets run one by "
        "one; placeholders allowed (a whole placeholder may hold a list of snippets)."
    )
    run_timeout_s: float = Field(10.0, gt=0, le=3600)

    RUNTIME_MODULES: ClassVar[tuple[str, ...]] = ("_tools.py",)
    LANGUAGE: ClassVar[str] = (
        "runs tests after the code held in a state variable (Markdown fences stripped).\n"
        '  Fields: code (a state path such as "solution.code", not a placeholder), tests\n'
        "  (Python source, or a list of test snippets such as MBPP's assert lines, each run and\n"
        "  reported; placeholders allowed), run_timeout_s, out. The out variable has fields\n"
        "  passed, results (a list of {test, passed, error}) and output."
    )

    def references(self) -> list[tuple[str, str]]:
        return [("code", self.code)]

    def templates(self) -> list[tuple[str, str]]:
        if isinstance(self.tests, str):
            return [("tests", self.tests)]
        return [(f"tests/{i}", test) for i, test in enumerate(self.tests)]

    def out_schema(self, agents: Mapping[str, Agent]) -> JsonSchema | None:
        return _object({"passed": "boolean", "results": "array", "output": "string"})

    def summary(self) -> str:
        return f"`{self.id}`: run the tests against `{self.code.strip()}`."

    def graph_detail(self) -> str:
        return self.code


def _strings(value: Any, key: str) -> list[tuple[str, str]]:
    """Every string inside JSON data, with its key path (JSON-pointer escaped)."""
    if isinstance(value, str):
        return [(key, value)]
    if isinstance(value, dict):
        return [
            found
            for k, v in value.items()
            for found in _strings(v, f"{key}/{str(k).replace('~', '~0').replace('/', '~1')}")
        ]
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in _strings(v, f"{key}/{i}")]
    return []


class ToolStep(_Writes):
    kind: Literal["tool"]
    tool: str
    args: dict[str, Any] = Field(
        default_factory=dict, description="String values may hold placeholders."
    )

    RUNTIME_MODULES: ClassVar[tuple[str, ...]] = ("_tools.py",)
    LANGUAGE: ClassVar[str] = (
        "calls a tool directly. Fields: tool, args (an object; string values may hold\n"
        "  placeholders), out."
    )

    def tool_refs(self) -> list[tuple[str, str]]:
        return [("tool", self.tool)]

    def templates(self) -> list[tuple[str, str]]:
        return _strings(self.args, "args")

    def summary(self) -> str:
        return f"`{self.id}`: call tool `{self.tool}`."

    def graph_detail(self) -> str:
        return self.tool


class MapStep(_Writes):
    kind: Literal["map"]
    over: str = Field(
        description='The list, as one whole placeholder ("{{ documents }}", "{{ plan.questions }}").'
    )
    as_: str = Field(
        "item",
        alias="as",
        pattern=VAR_PATTERN,
        description="The item's variable, bound inside `steps` only (default `item`).",
    )
    index: str = Field(
        "index",
        pattern=VAR_PATTERN,
        description="The item's position (0, 1, ...), bound inside `steps` only (default `index`).",
    )
    steps: list[Step] = Field(min_length=1, description="The body, run once per item.")
    result: Any = Field(
        None,
        description="Each item's result, rendered after its steps: a whole placeholder passes "
        "the value, objects and lists may hold placeholders; default: the last variable the "
        "body writes on every path.",
    )
    max_concurrency: int = Field(4, ge=1, le=64, description="Items running at once.")
    max_items: int = Field(
        100, ge=1, le=10_000, description="The most items a run may map (default 100)."
    )
    on_overflow: Literal["error", "truncate"] = Field(
        "error",
        description="A longer list: 'error' (the step fails, code map_overflow) or 'truncate' "
        "(the first max_items are mapped; traced and listed under `warnings`).",
    )

    LANGUAGE: ClassVar[str] = (
        'runs its steps once for each item of a list known at run time. Fields: over ("{{ xs }}",\n'
        "  a whole placeholder), as (the item's variable, default item), index (default index),\n"
        "  steps, result (per item, default the body's last written variable), max_concurrency\n"
        '  (default 4), max_items (default 100), on_overflow ("error" or "truncate"), out (the\n'
        "  results as a list, in input order). Variables the body writes stay inside the item,\n"
        "  except declared `state` variables with a combining reducer (append, merge, add)."
    )
    shape: ClassVar[Shape] = "each"

    def child_lists(self) -> list[tuple[str, list[Step]]]:
        return [("steps", self.steps)]

    def templates(self) -> list[tuple[str, str]]:
        return [("over", self.over)]

    def body_templates(self) -> list[tuple[str, str]]:
        """Texts rendered in the scope of the body, after it (the per-item result)."""
        return _strings(self.result, "result")

    def item_names(self) -> tuple[str, str] | None:
        """The variables the body sees for each item: (item, index)."""
        return self.as_, self.index

    def out_schema(self, agents: Mapping[str, Agent]) -> JsonSchema | None:
        return {"type": "array"}

    def child_repeats(self) -> int:
        return self.max_items

    def fan_out(self) -> FanOut:
        return FanOut("max_items", self.max_items, self.max_items, (("on_overflow", "truncate"),))

    def summary(self) -> str:
        return (
            f"`{self.id}`: the steps for each item of {self.over.strip()}, "
            f"at most {self.max_concurrency} at once."
        )

    def graph_detail(self) -> str:
        return f"{self.as_} in {self.over.strip()}"


class SubflowStep(_Writes):
    kind: Literal["subflow"]
    flow: str = Field(description="The flow (a key of `flows`) to run.")
    with_: dict[str, Any] = Field(
        default_factory=dict,
        alias="with",
        description="The flow's arguments: input name -> value; a string that is exactly one "
        "placeholder passes the value itself, other strings are rendered text.",
    )

    RUNTIME_MODULES: ClassVar[tuple[str, ...]] = ("_flows.py",)
    LANGUAGE: ClassVar[str] = (
        "runs a flow (a named sub-workflow of `flows`) with its own state: it sees only its\n"
        "  inputs. Fields: flow, with (input name -> value, placeholders allowed), out (an object\n"
        "  of the flow's outputs)."
    )

    def flow_refs(self) -> list[tuple[str, str]]:
        return [("flow", self.flow)]

    def templates(self) -> list[tuple[str, str]]:
        return _strings(self.with_, "with")

    def summary(self) -> str:
        return f"`{self.id}`: run flow `{self.flow}`."

    def graph_detail(self) -> str:
        return self.flow


STEP_CLASSES: dict[str, type[StepBase]] = {
    "call": CallStep,
    "ensemble": EnsembleStep,
    "parallel": ParallelStep,
    "loop": LoopStep,
    "branch": BranchStep,
    "debate": DebateStep,
    "programmer": ProgrammerStep,
    "test": TestStep,
    "tool": ToolStep,
    "map": MapStep,
    "subflow": SubflowStep,
}
"""kind -> model class: the registry of step kinds (`register_step_kind` adds to it)."""

STEP_KINDS: tuple[str, ...] = tuple(STEP_CLASSES)  # the built-in kinds

Step = Annotated[
    CallStep
    | EnsembleStep
    | ParallelStep
    | LoopStep
    | BranchStep
    | DebateStep
    | ProgrammerStep
    | TestStep
    | ToolStep
    | MapStep
    | SubflowStep,
    Field(discriminator="kind"),
]


class Budgets(_Strict):
    max_llm_calls: int | None = Field(None, ge=1)
    max_total_tokens: int | None = Field(None, ge=1)
    max_cost_usd: float | None = Field(None, gt=0)
    timeout_s: float | None = Field(None, gt=0)


Reducer = Literal["replace", "append", "merge", "add"]

# The JSON types each combining reducer works on (replace takes any value).
REDUCER_TYPES: dict[str, tuple[str, ...]] = {
    "append": ("array",),
    "merge": ("object",),
    "add": ("number", "integer"),
}
# The initial value of a combining reducer's variable when the spec gives none.
REDUCER_INITIAL: dict[str, Any] = {"append": [], "merge": {}, "add": 0}


class StateVar(_Strict):
    """A declared state variable: its type, initial value and how writes combine."""

    json_schema: JsonSchema | None = Field(
        None, alias="schema", description="JSON Schema of the variable's value."
    )
    initial: Any = Field(
        None,
        description="Its value before any write (default: [] for append, {} for merge, 0 for "
        "add; a replace variable without one is bound by its first write).",
    )
    reducer: Reducer = Field(
        "replace",
        description="How a write combines with the value: replace (the default), append (the "
        "written value becomes the list's last item), merge (the written object's keys "
        "overwrite), add (numbers are added). Writes from parallel branches and map items "
        "combine in branch / input order.",
    )

    @property
    def combines(self) -> bool:
        """Whether concurrent writes can combine (every reducer but replace)."""
        return self.reducer != "replace"

    def initial_value(self) -> Any:
        """The value before any write; None when a replace variable has none."""
        if self.initial is not None or "initial" in self.model_fields_set:
            return self.initial
        return REDUCER_INITIAL.get(self.reducer)

    @property
    def bound_at_start(self) -> bool:
        return "initial" in self.model_fields_set or self.combines


class FlowDef(_Strict):
    """A named sub-workflow: its own inputs, steps and outputs. It sees only its inputs
    (its state starts as them); `subflow` steps call it, `ensemble` samples it."""

    description: str = ""
    inputs: dict[str, JsonSchema] = Field(
        default_factory=dict,
        description="name -> JSON Schema; an input without a `default` must be passed.",
    )
    outputs: dict[str, str] = Field(
        min_length=1,
        description="name -> state variable (or dotted path) of the flow's state at its end.",
    )
    steps: list[Step] = Field(min_length=1)

    @field_validator("inputs", mode="before")
    @classmethod
    def _chat_inputs(cls, inputs: Any) -> Any:
        return expand_chat_types(inputs)


class Spec(_Strict):
    """A multi-agent system."""

    schema_: str | None = Field(None, alias="$schema", description="Editor hint; ignored.")
    spec_version: Literal["1"] = Field(
        description='The language version, always "1": keys added to the language later are '
        "optional, so a spec written for an earlier mas2c stays valid and means the same."
    )
    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=64,
        description="The system's name; the compiled package is mas2c_<name>.",
    )
    description: str = Field("", description="One or two sentences saying what the system does.")
    inputs: dict[str, JsonSchema] = Field(
        default_factory=dict,
        description='The task\'s inputs: name -> JSON Schema (e.g. {"type": "string"}).',
    )
    outputs: dict[str, str] = Field(
        default_factory=dict,
        description="Result fields: name -> a state variable or a dotted path into one "
        '("verdict.answer").',
    )
    models: dict[str, ModelSpec] = Field(
        default_factory=dict, description="The model pool that agents name by id."
    )
    agents: dict[str, Agent] = Field(min_length=1, description="The agents, by id.")
    tools: dict[str, Tool] = Field(default_factory=dict, description="The tools, by id.")
    state: dict[str, StateVar] = Field(
        default_factory=dict,
        description="Declared state variables (name -> schema, initial, reducer); any other "
        "variable is declared by the step that writes it.",
    )
    flows: dict[str, FlowDef] = Field(
        default_factory=dict,
        description="Named sub-workflows (name -> flow), run by `subflow` steps and ensembles.",
    )
    workflow: list[Step] = Field(
        min_length=1, description="The steps, run in order; each may write a state variable."
    )
    budgets: Budgets = Field(
        Budgets(), description="Limits of one run: LLM calls, tokens, cost, wall-clock seconds."
    )
    prompts: Prompts | None = Field(
        None, description="Overrides of the built-in prompts the runtime sends (by name)."
    )

    @model_validator(mode="before")
    @classmethod
    def _coerce_version(cls, data: Any) -> Any:
        # YAML reads `spec_version: 1` as an int; accept it as the string it means.
        version = data.get("spec_version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version == 1:
            data = {**data, "spec_version": "1"}
        if isinstance(data, dict) and "inputs" in data:
            data = {**data, "inputs": expand_chat_types(data["inputs"])}
        return data

    @property
    def package_name(self) -> str:
        return "mas2c_" + self.name.replace("-", "_")

    def to_data(self) -> dict[str, Any]:
        """The spec as plain JSON data, keys as written in specs (`else`, not `else_`)."""
        data = self.model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude_defaults=False
        )
        if not data.get("state"):  # added in spec_version 1: absent means the same spec
            data.pop("state", None)
        if not data.get("flows"):  # a spec without flows hashes as it did before them
            data.pop("flows", None)
        return data


# Models whose fields hold step lists, and how: rebuilt when a kind is registered.
_STEP_FIELDS: list[tuple[type[BaseModel], str, Callable[[Any], Any]]] = [
    (ParallelStep, "branches", lambda step: list[list[step]]),  # type: ignore[valid-type]
    (LoopStep, "steps", lambda step: list[step]),  # type: ignore[valid-type]
    (Case, "steps", lambda step: list[step]),  # type: ignore[valid-type]
    (BranchStep, "else_", lambda step: list[step] | None),  # type: ignore[valid-type]
    (MapStep, "steps", lambda step: list[step]),  # type: ignore[valid-type]
    (FlowDef, "steps", lambda step: list[step]),  # type: ignore[valid-type]
    (Spec, "workflow", lambda step: list[step]),  # type: ignore[valid-type]
]
# Every step kind has a `fallback` step list (StepBase): rebuilt for each registered kind.
_FALLBACK_SHAPE: Callable[[Any], Any] = lambda step: list[step] | None  # type: ignore[valid-type]  # noqa: E731

_MODELS_WITH_STEPS: tuple[type[BaseModel], ...] = (*STEP_CLASSES.values(), Case, FlowDef, Spec)
for _model in _MODELS_WITH_STEPS:
    _model.model_rebuild()


def register_step_kind(
    cls: type[StepBase],
    step_fields: Sequence[tuple[str, Callable[[Any], Any]]] = (),
) -> None:
    """Add a step kind: `cls` must have a `kind: Literal["<name>"]` field and the facts of
    `StepBase`. `step_fields` names the fields of `cls` that hold step lists (field name,
    annotation builder from the step union). Re-registering a kind replaces it."""
    kind_field = cls.model_fields.get("kind")
    kinds = get_args(kind_field.annotation) if kind_field is not None else ()
    if len(kinds) != 1 or not isinstance(kinds[0], str):
        raise TypeError(f"{cls.__name__} needs a field `kind: Literal['<name>']`")
    STEP_CLASSES[kinds[0]] = cls
    for name, shape in step_fields:
        entry = (cls, name, shape)
        if entry not in _STEP_FIELDS:
            _STEP_FIELDS.insert(0, entry)
    _rebuild_step_union()


def unregister_step_kind(kind: str) -> None:
    """Remove a registered kind (tests use it to leave the registry as they found it)."""
    cls = STEP_CLASSES.pop(kind, None)
    _STEP_FIELDS[:] = [entry for entry in _STEP_FIELDS if entry[0] is not cls]
    _rebuild_step_union()


def _rebuild_step_union() -> None:
    """Rebuild `Step` from the registry and every model field that holds step lists."""
    union: Any = Union[tuple(STEP_CLASSES.values())]  # noqa: UP007 (built at run time)
    step_union: Any = Annotated[union, Field(discriminator="kind")]
    globals()["Step"] = step_union  # what type hints and later registrations see
    fallbacks = [(cls, "fallback", _FALLBACK_SHAPE) for cls in STEP_CLASSES.values()]
    for model, name, shape in [*fallbacks, *_STEP_FIELDS]:  # containers first, `Spec` last
        old = model.model_fields[name]
        new = FieldInfo.merge_field_infos(old, annotation=shape(step_union))
        model.__pydantic_fields__[name] = new
    # Twice: a container's schema embeds the other containers' (a loop inside a parallel
    # inside a loop), so one pass can keep a removed kind in a container rebuilt early.
    # A kind defined in another module inherits `fallback: list[Step]`: `Step` is resolved
    # here, not in that module's namespace.
    namespace = {**globals(), "Step": step_union}
    for _pass in range(2):
        for model, _name, _shape in [*fallbacks, *_STEP_FIELDS]:
            model.model_rebuild(force=True, _types_namespace=namespace)


def iter_steps(steps: list[Step], pointer: str) -> Iterator[tuple[str, Step]]:
    """Every step in a step list, depth first, with its JSON pointer."""
    for index, step in enumerate(steps):
        yield from iter_step_tree(step, f"{pointer}/{index}")


def iter_step_tree(step: Step, pointer: str) -> Iterator[tuple[str, Step]]:
    """A step and every step nested in it, depth first, with their JSON pointers."""
    yield pointer, step
    for child_pointer, children in child_step_lists(step, pointer):
        yield from iter_steps(children, child_pointer)


def child_step_lists(step: Step, pointer: str) -> list[tuple[str, list[Step]]]:
    """The nested step lists of a step (its `fallback` included), with their pointers."""
    return [(f"{pointer}/{key}", children) for key, children in nested_lists(step)]


def nested_lists(step: Step) -> list[tuple[str, list[Step]]]:
    """Every step list inside a step: its kind's `child_lists()`, then its `fallback`."""
    fallback = [("fallback", step.fallback)] if step.fallback else []
    return [*step.child_lists(), *fallback]


def step_out(step: Step) -> str | None:
    """The state variable a step writes, if any."""
    return step.writes()


def step_agents(step: Step) -> list[str]:
    """Agent ids a step refers to directly (not through nested steps)."""
    return [ref.agent for ref in step.agent_refs()]


def flow_pointer(name: str) -> str:
    return "/flows/" + name.replace("~", "~0").replace("/", "~1")


def spec_step_lists(spec: Spec) -> list[tuple[str, list[Step]]]:
    """The spec's top-level step lists with their pointers: the workflow, then each flow's."""
    flows = [(f"{flow_pointer(name)}/steps", flow.steps) for name, flow in spec.flows.items()]
    return [("/workflow", spec.workflow), *flows]


def iter_spec_steps(spec: Spec) -> Iterator[tuple[str, Step]]:
    """Every step of the spec (workflow and flows), depth first, with its JSON pointer."""
    for pointer, steps in spec_step_lists(spec):
        yield from iter_steps(steps, pointer)


def called_flows(spec: Spec, steps: Sequence[Step]) -> list[str]:
    """The flows `steps` (and their nested steps) run, directly or through other flows,
    in first-call order; a cycle (which the validator rejects) is followed once."""
    found: list[str] = []
    pending = [s for step in steps for _p, s in iter_step_tree(step, "")]
    while pending:
        step = pending.pop(0)
        for _key, name in step.flow_refs():
            if name in found or name not in spec.flows:
                continue
            found.append(name)
            pending += [s for _p, s in iter_steps(spec.flows[name].steps, "")]
    return found


def static_calls(step: Step, flows: Mapping[str, FlowDef] | None = None, _depth: int = 0) -> int:
    """A static upper bound of the LLM calls of one run of `step`, nested steps included
    (and, given the spec's `flows`, the flows it runs)."""
    inner = sum(static_calls(s, flows, _depth) for _key, steps in step.child_lists() for s in steps)
    called = 0
    if flows is not None and _depth < 32:  # recursion is a validation error; never loop
        for _key, name in step.flow_refs():
            flow = flows.get(name)
            if flow is not None:
                calls = sum(static_calls(s, flows, _depth + 1) for s in flow.steps)
                called += calls * step.flow_repeats()
    own = step.llm_calls() + inner * step.child_repeats() + called
    fallback = sum(static_calls(s, flows, _depth) for s in step.fallback or [])
    return own * ((step.retry or 0) + 1) + fallback


def language_description() -> str:
    """The spec language as the generator explains it to the LLM: every top-level key,
    nested field and step kind, generated from the models (`mas2c.lang.describe`)."""
    from mas2c.lang.describe import language_description as describe

    return describe()


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
    flows = schema.get("properties", {}).get("flows", {})
    if "additionalProperties" in flows:  # a flow, or an import of one (mas2c.lang.imports)
        flows["additionalProperties"] = {
            "anyOf": [
                flows["additionalProperties"],
                {
                    "type": "object",
                    "properties": {
                        "import": {
                            "type": "string",
                            "description": "`<path relative to this spec>#<flow name>`: the "
                            "flow of another spec file, copied in when this spec is loaded.",
                        }
                    },
                    "required": ["import"],
                    "additionalProperties": False,
                },
            ]
        }
    return schema
