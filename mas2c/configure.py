"""The implementer: binds a spec's unbound model slots from a pool of models (MAS² implementer).

A *pool* has the shape of a spec's `models` map: id -> {model, description, price, ...}
(`load_pool` reads it from YAML or JSON, bare or under a top-level `models:` key).
`configure_spec(spec, pool)` binds every agent whose `model` is unbound (every agent
with `rebind=True`) to a pool id, merges the pool entries it used into the spec's
`models` (the spec's own models are kept; on an id clash with a different definition
the pool entry is added as `<id>-pool`), checks that the new spec validates, and
returns it with the reason for every choice. The input spec is never modified.

**By LLM** (`client` given): the LLM reads each agent (id, role, the first 300
characters of its instructions, how the workflow uses it) and the pool (id, model,
description, price) and answers `{"bindings": {agent: {"model": pool_id, "reason": ...}}}`
(structured output, pool ids as an enum). An answer that leaves an agent unbound or
names a model outside the pool is sent back once with the errors; a second bad answer
is a `ConfigureError`.

**By rule** (no client). Pool models are ranked by strength: price first (input +
output USD per million tokens; a model without a price counts as the median of the
known prices), then description and model-name keywords ("strong", "best",
"reasoning", ... up; "cheap", "fast", "mini", ... down). Then, in this order:

1. the judge of an ensemble or a debate -> the strongest model;
2. an agent of a `call` whose output a `loop`/`branch` condition reads (it decides
   the control flow: critics, classifiers, verifiers) -> the strongest;
3. the agent of a `programmer` step, or one whose role/id says programmer, coder or
   developer -> the strongest model whose description mentions code, else the strongest;
4. ensemble samplers and debaters -> the cheapest;
5. an agent whose id or role names a judge, planner, manager, critic, reviewer,
   synthesizer, supervisor, orchestrator, coordinator, verifier, evaluator or
   aggregator -> the strongest;
6. everything else -> the cheapest model whose description says "general", else the
   median-strength one (the cheaper median for an even count).

Ties are broken by pool id, so the rule is deterministic.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from mas2c.errors import RunFailure
from mas2c.lang import expr
from mas2c.lang.spec import (
    Agent,
    ModelSpec,
    Spec,
    Step,
    iter_spec_steps,
    iter_steps,
    nested_lists,
    spec_hash,
    spec_step_lists,
    step_agents,
)
from mas2c.lang.validate import Problem, validate_text
from mas2c.llm import JSONNotFound, LLMClient, Message, Usage, extract_json

__all__ = [
    "AgentUse",
    "Choice",
    "ConfigureError",
    "ConfigureResult",
    "PoolError",
    "agent_uses",
    "configure_spec",
    "load_pool",
    "rank_pool",
    "rule_choices",
]

By = Literal["rule", "llm"]
ProgressFn = Callable[[str], None]


class ConfigureError(RunFailure):
    """The spec could not be configured; the message says why."""

    code = "configure_failed"

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        listed = "\n".join(f"  {p}" for p in problems or [])
        super().__init__(f"{message}\n{listed}" if listed else message)
        self.problems = list(problems or [])


class PoolError(ConfigureError):
    """The pool file is unreadable or malformed; the message names the file and key."""

    code = "bad_pool"


@dataclass(frozen=True)
class Choice:
    model: str  # the pool id chosen
    reason: str
    by: By

    def to_json(self) -> dict[str, str]:
        return {"model": self.model, "reason": self.reason, "by": self.by}


@dataclass
class ConfigureResult:
    spec: Spec
    choices: dict[str, Choice]  # agent id -> choice (only the agents bound now)
    added_models: dict[str, str] = field(default_factory=dict)  # spec model id -> pool id
    warnings: list[Problem] = field(default_factory=list)  # of the new spec
    usage: Usage = field(default_factory=Usage)
    attempts: int = 0  # LLM answers asked for (0 by rule)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "spec_hash": spec_hash(self.spec),
            "choices": {agent: c.to_json() for agent, c in self.choices.items()},
            "added_models": self.added_models,
            "warnings": [p.to_json() for p in self.warnings],
            "attempts": self.attempts,
            "usage": self.usage.to_json(),
        }


# -- the pool ---------------------------------------------------------------------------------


def load_pool(path: Path | str) -> dict[str, ModelSpec]:
    """A model pool from YAML or JSON: `{id: {model, ...}}`, or the same under `models:`.

    An entry may also be a bare model name (`cheap: gpt-4o-mini`). `PoolError` names
    the file and the key of every problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PoolError(f"{path}: cannot read the pool: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PoolError(f"{path}{where}: not valid YAML/JSON: {problem}") from None
    prefix = ""
    if isinstance(data, dict) and _is_wrapped(data):
        data, prefix = data["models"], "models."
    if not isinstance(data, dict):
        raise PoolError(
            f"{path}: a pool is a mapping of model ids to models "
            "(id: {model: NAME, description: ..., price: ...}), optionally under `models:`"
        )
    if not data:
        raise PoolError(f"{path}: the pool has no models")
    pool: dict[str, ModelSpec] = {}
    problems: list[str] = []
    for key, entry in data.items():
        model_id = str(key)
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            problems.append(
                f"{prefix}{model_id}: expected a mapping such as {{model: gpt-4o-mini}}, "
                f"not {type(entry).__name__}"
            )
            continue
        try:
            pool[model_id] = ModelSpec.model_validate(entry)
        except ValidationError as exc:
            for error in exc.errors():
                loc = ".".join(str(part) for part in error["loc"])
                message = "unknown key" if error["type"] == "extra_forbidden" else str(error["msg"])
                problems.append(f"{prefix}{model_id}.{loc}: {message}")
    if problems:
        raise PoolError(f"{path}: invalid pool", problems)
    return pool


def _is_wrapped(data: dict[Any, Any]) -> bool:
    """Whether `data` is `{models: {...}}` rather than a pool with a model called `models`."""
    inner = data.get("models")
    if not isinstance(inner, dict) or len(data) != 1:
        return False
    return not isinstance(inner.get("model"), str)


# -- how the workflow uses each agent ----------------------------------------------------------


@dataclass
class AgentUse:
    """What the workflow does with one agent."""

    judge: bool = False  # decides an ensemble or a debate
    decider: bool = False  # a call whose output a condition reads
    programmer: bool = False  # writes code in a programmer step
    sampler: bool = False  # one of several samples or debaters
    notes: list[str] = field(default_factory=list)  # human-readable, for the LLM


def agent_uses(spec: Spec) -> dict[str, AgentUse]:
    """How each agent of `spec` is used by its workflow (every agent has an entry)."""
    uses = {agent_id: AgentUse() for agent_id in spec.agents}
    condition_reads = set().union(*(_condition_reads(s) for _p, s in spec_step_lists(spec)))

    def use(agent_id: str | None) -> AgentUse:
        return uses.setdefault(agent_id or "", AgentUse())

    def walk(steps: list[Step], loops: list[str]) -> None:
        where = f", inside {', '.join(loops)}" if loops else ""
        for step in steps:
            refs = {(ref.role, ref.agent) for ref in step.agent_refs()}
            # samplers (sorted) first, the judge last: the order notes are read in
            for role, agent_id in sorted(refs, key=lambda r: (r[0] == "judge", r[1])):
                entry = use(agent_id)
                note = step.agent_note(agent_id, role)
                out = step.writes()
                if role == "caller" and out and out in condition_reads:
                    entry.decider = True
                    note += f"; its output `{out}` decides a loop/branch condition"
                entry.judge = entry.judge or role == "judge"
                entry.sampler = entry.sampler or role == "sampler"
                entry.programmer = entry.programmer or role == "programmer"
                entry.notes.append(note + where)
            inner = [*loops, _loop_label(step)] if step.shape == "repeat" else loops
            for _key, children in nested_lists(step):
                walk(children, inner)

    walk(spec.workflow, [])
    sampled = {  # flows an ensemble runs n times: their agents are sampled like samplers
        name
        for _p, step in iter_spec_steps(spec)
        for _key, name in step.flow_refs()
        if step.flow_repeats() > 1
    }
    for manager_id, manager in spec.agents.items():  # workers: called by their manager
        for worker in manager.delegates or []:
            use(worker).notes.append(f"worker of `{manager_id}` (called by it as a tool)")
    for name, flow in spec.flows.items():  # a flow's agents: noted with the flow's name
        walk(flow.steps, [f"flow `{name}`"])
        if name in sampled:
            for _p, step in iter_steps(flow.steps, ""):
                for agent_id in step_agents(step):
                    use(agent_id).sampler = True
    uses.pop("", None)
    return uses


def _loop_label(step: Step) -> str:
    fan = step.fan_out()
    bound = getattr(step, fan.field, None) if fan is not None else None
    return f"{step.kind} `{step.id}` (up to {bound or '?'} iterations)"


def _condition_reads(steps: list[Step]) -> set[str]:
    """State variables that any loop or branch condition reads."""
    names: set[str] = set()

    def add(text: str) -> None:
        try:
            node = expr.parse_condition(text)
        except expr.ExpressionError:
            return
        names.update(name for name, _column in expr.condition_names(node))

    def walk(step_list: list[Step]) -> None:
        for step in step_list:
            for _key, condition in step.conditions():
                add(condition)
            for _key, children in nested_lists(step):
                walk(children)

    walk(steps)
    return names


# -- the rule ----------------------------------------------------------------------------------

_STRONG_WORDS = frozenset(
    [
        "strong",
        "strongest",
        "best",
        "powerful",
        "reasoning",
        "large",
        "smart",
        "capable",
        "advanced",
        "expert",
        "frontier",
        "accurate",
        "flagship",
        "premium",
    ]
)
_CHEAP_WORDS = frozenset(
    [
        "cheap",
        "cheapest",
        "fast",
        "quick",
        "small",
        "mini",
        "nano",
        "tiny",
        "light",
        "lightweight",
        "inexpensive",
        "budget",
        "low-cost",
    ]
)
_CODE_WORDS = re.compile(r"\b(code|coding|coder|programming|programmer|python|software)\b", re.I)
_LEAD_TEXT = """judge planner manager critic reviewer synthesizer synthesiser supervisor
orchestrator coordinator verifier evaluator aggregator arbiter referee"""
_LEAD_NOUNS = frozenset(_LEAD_TEXT.split())
_CODER_NOUNS = frozenset({"programmer", "coder", "developer"})


def _nouns(text: str) -> set[str]:
    """The words of an agent's id and role, singular."""
    return {w[:-1] if w.endswith("s") else w for w in re.findall(r"[a-z]+", text.lower())}


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)?", text.lower().replace("_", " "))


def _price(model: ModelSpec) -> float | None:
    if model.price is None:
        return None
    return model.price.input_per_mtok + model.price.output_per_mtok


def _strength(pool: dict[str, ModelSpec]) -> dict[str, tuple[float, int]]:
    """Pool id -> (price, keyword score): what the rule ranks models by."""
    known = sorted(p for p in (_price(m) for m in pool.values()) if p is not None)
    median = known[len(known) // 2] if known else 0.0
    strength = {}
    for model_id, model in pool.items():
        price = _price(model)
        words = _tokens(f"{model.description or ''} {model.model}")
        score = sum(w in _STRONG_WORDS for w in words) - sum(w in _CHEAP_WORDS for w in words)
        strength[model_id] = (median if price is None else price, score)
    return strength


def rank_pool(pool: dict[str, ModelSpec]) -> list[str]:
    """Pool ids from the cheapest (weakest) to the most expensive (strongest); ties by id."""
    strength = _strength(pool)
    return sorted(pool, key=lambda model_id: (strength[model_id], model_id))


def _strongest(pool: dict[str, ModelSpec], ids: list[str]) -> str:
    """The strongest of `ids`; among equals the first id."""
    strength = _strength(pool)
    return min(ids, key=lambda model_id: (tuple(-x for x in strength[model_id]), model_id))


def rule_choices(spec: Spec, pool: dict[str, ModelSpec], agents: list[str]) -> dict[str, Choice]:
    """The rule's binding of `agents` (see the module docstring)."""
    if not pool:
        raise ConfigureError("the pool is empty")
    ranked = rank_pool(pool)
    cheapest, strongest = ranked[0], _strongest(pool, ranked)
    coders = [m for m in ranked if _CODE_WORDS.search(pool[m].description or "")]
    generals = [m for m in ranked if "general" in (pool[m].description or "").lower()]
    median = ranked[(len(ranked) - 1) // 2]
    uses = agent_uses(spec)
    choices = {}
    for agent_id in agents:
        agent = spec.agents[agent_id]
        use = uses.get(agent_id, AgentUse())
        nouns = _nouns(f"{agent_id.replace('_', ' ')} {agent.role}")
        if use.judge:
            model, reason = strongest, "judges an ensemble or debate: the strongest model"
        elif use.decider:
            model, reason = strongest, "its output decides a condition: the strongest model"
        elif use.programmer or nouns & _CODER_NOUNS:
            if coders:
                model, reason = _strongest(pool, coders), "writes code: the strongest code model"
            else:
                model, reason = strongest, "writes code, no code model in the pool: the strongest"
        elif use.sampler:
            model, reason = cheapest, "one of several samples or debaters: the cheapest model"
        elif nouns & _LEAD_NOUNS:
            model, reason = strongest, "plans, judges, reviews or synthesizes: the strongest model"
        elif generals:
            model, reason = generals[0], "general work: the cheapest general-purpose model"
        else:
            model, reason = median, "general work: the median model of the pool"
        choices[agent_id] = Choice(model, reason, "rule")
    return choices


# -- by LLM ------------------------------------------------------------------------------------

SYSTEM = """\
You are the implementer of mas2c, a compiler of multi-agent systems. You choose which model
of a pool each agent of a system runs on. Balance quality and cost: agents whose output
decides the result (judges, planners, critics whose verdict controls a loop, synthesizers,
agents writing code) deserve strong models; agents called many times (ensemble samples,
debaters, loop bodies) and routine work deserve cheap ones, unless the task needs more.
Use only the pool ids given. Answer with one JSON object:
{"bindings": {"<agent id>": {"model": "<pool id>", "reason": "<one short sentence>"}}}
with an entry for every agent listed under "bind"."""


def _bindings_schema(agents: list[str], pool_ids: list[str]) -> dict[str, Any]:
    binding = {
        "type": "object",
        "properties": {
            "model": {"type": "string", "enum": pool_ids},
            "reason": {"type": "string"},
        },
        "required": ["model", "reason"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "bindings": {
                "type": "object",
                "properties": {agent: binding for agent in agents},
                "required": agents,
                "additionalProperties": False,
            }
        },
        "required": ["bindings"],
        "additionalProperties": False,
    }


def _describe(spec: Spec, pool: dict[str, ModelSpec], agents: list[str]) -> str:
    uses = agent_uses(spec)
    agent_rows = []
    for agent_id in agents:
        agent = spec.agents[agent_id]
        row: dict[str, Any] = {"id": agent_id, "role": agent.role}
        if agent.instructions:
            text = " ".join(agent.instructions.split())
            row["instructions"] = text[:300] + ("..." if len(text) > 300 else "")
        row["used"] = uses.get(agent_id, AgentUse()).notes or ["not used by any step"]
        if agent.tools:
            row["tools"] = agent.tools
        if isinstance(agent.output, dict):
            row["structured_output"] = True
        agent_rows.append(row)
    pool_rows = []
    for model_id, model in pool.items():
        entry: dict[str, Any] = {"id": model_id, "model": model.model}
        if model.description:
            entry["description"] = model.description
        if model.price is not None:
            entry["price_usd_per_mtok"] = {
                "input": model.price.input_per_mtok,
                "output": model.price.output_per_mtok,
            }
        pool_rows.append(entry)
    payload = {
        "system": {"name": spec.name, "description": spec.description},
        "agents": agent_rows,
        "pool": pool_rows,
        "bind": agents,
    }
    return "Choose a model from the pool for every agent listed under `bind`.\n\n" + json.dumps(
        payload, indent=1, ensure_ascii=False
    )


def _check_answer(
    text: str, agents: list[str], pool: dict[str, ModelSpec]
) -> tuple[dict[str, Choice], list[str]]:
    """The choices of an LLM answer, or the errors that make it unusable."""
    try:
        data = extract_json(text)
    except JSONNotFound as exc:
        return {}, [f"the answer is not JSON ({exc})"]
    if isinstance(data, dict) and isinstance(data.get("bindings"), dict):
        bindings = data["bindings"]
    elif isinstance(data, dict) and "bindings" not in data:
        bindings = data  # lenient: the bindings without their wrapper
    else:
        return {}, ['the answer must be {"bindings": {agent_id: {"model": ..., "reason": ...}}}']
    choices: dict[str, Choice] = {}
    errors = []
    pool_ids = ", ".join(pool)
    for agent_id in agents:
        entry = bindings.get(agent_id)
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not entry.get("model"):
            errors.append(f"agent `{agent_id}` is not bound: give it a model from the pool")
            continue
        model = str(entry["model"])
        if model not in pool:
            errors.append(
                f"agent `{agent_id}`: `{model}` is not in the pool (choose one of: {pool_ids})"
            )
            continue
        reason = str(entry.get("reason") or "chosen by the LLM").strip()
        choices[agent_id] = Choice(model, reason, "llm")
    return choices, errors


def llm_choices(
    spec: Spec,
    pool: dict[str, ModelSpec],
    agents: list[str],
    client: LLMClient,
    *,
    on_progress: ProgressFn | None = None,
) -> tuple[dict[str, Choice], int]:
    """The LLM's binding of `agents` and the number of answers it took (at most 2)."""
    say = on_progress or (lambda _message: None)
    schema = _bindings_schema(agents, list(pool))
    messages: list[Message] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": _describe(spec, pool, agents)},
    ]
    errors: list[str] = []
    for attempt in (1, 2):
        say("asking the model to choose models" if attempt == 1 else "asking again")
        answer = client.chat(messages, schema=schema, schema_name="bindings")
        choices, errors = _check_answer(answer, agents, pool)
        if not errors:
            return choices, attempt
        say(f"the answer was rejected: {'; '.join(errors)}")
        messages = [
            *messages[:2],
            {"role": "assistant", "content": answer},
            {
                "role": "user",
                "content": "That answer cannot be used:\n"
                + "\n".join(f"- {e}" for e in errors)
                + f"\n\nPool ids: {', '.join(pool)}. Agents to bind: {', '.join(agents)}. "
                'Answer again with the complete {"bindings": ...} object.',
            },
        ]
    raise ConfigureError("the LLM's model choices were rejected twice:", errors)


# -- configure ---------------------------------------------------------------------------------


def configure_spec(
    spec: Spec,
    pool: dict[str, ModelSpec],
    *,
    client: LLMClient | None = None,
    rebind: bool = False,
    on_progress: ProgressFn | None = None,
) -> ConfigureResult:
    """A new spec with every unbound agent (every agent, with `rebind`) bound from `pool`."""
    targets = [a for a, agent in spec.agents.items() if rebind or agent.model is None]
    if not targets:
        return ConfigureResult(spec=spec, choices={})
    if not pool:
        raise ConfigureError(
            f"{len(targets)} agent(s) need a model but the pool is empty: {', '.join(targets)}"
        )
    before = client.usage if client is not None else Usage()
    attempts = 0
    if client is None:
        choices = rule_choices(spec, pool, targets)
    else:
        choices, attempts = llm_choices(spec, pool, targets, client, on_progress=on_progress)
    new_spec, added = _bind(spec, pool, choices, rebind=rebind)
    report = validate_text(json.dumps(new_spec.to_data(), indent=2), "<configured>")
    if report.spec is None or not report.ok:
        raise ConfigureError(
            "the configured spec does not validate:",
            [f"{p.code} {p.pointer}: {p.message}" for p in report.errors],
        )
    return ConfigureResult(
        spec=new_spec,
        choices=choices,
        added_models=added,
        warnings=report.problems,
        usage=(client.usage - before) if client is not None else Usage(),
        attempts=attempts,
    )


def _bind(
    spec: Spec, pool: dict[str, ModelSpec], choices: dict[str, Choice], *, rebind: bool
) -> tuple[Spec, dict[str, str]]:
    """The spec with `choices` applied and the pool entries they use merged into `models`."""
    models = dict(spec.models)
    if rebind:
        # Every agent is rebound: the models they used are dropped (nothing refers to them
        # any more); models no agent used stay as the author left them.
        untouched = {a.model for agent_id, a in spec.agents.items() if agent_id not in choices}
        used = {a.model for a in spec.agents.values()}
        models = {k: v for k, v in models.items() if k not in used or k in untouched}
    spec_id: dict[str, str] = {}  # pool id -> its id in the new spec
    added: dict[str, str] = {}
    for pool_id in sorted({c.model for c in choices.values()}):
        entry = pool[pool_id]
        if pool_id in models and models[pool_id] == entry:
            spec_id[pool_id] = pool_id
            continue
        name, counter = pool_id, 1
        while name in models:  # a clash with a different model of the spec's own
            name = f"{pool_id}-pool" + (str(counter) if counter > 1 else "")
            counter += 1
        models[name] = entry
        spec_id[pool_id] = name
        added[name] = pool_id
    agents: dict[str, Agent] = dict(spec.agents)
    for agent_id, choice in choices.items():
        agents[agent_id] = agents[agent_id].model_copy(update={"model": spec_id[choice.model]})
    return spec.model_copy(update={"models": models, "agents": agents}), added
