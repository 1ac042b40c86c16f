"""Property tests of the validator (hypothesis).

1. Random valid specs (every step kind, nested up to depth 3, placeholders and
   conditions reading only variables bound at that point) validate without errors.
2. A random single mutation of such a spec is caught, with the problem's pointer
   at the mutated place: a renamed reference (MAS201/202/203), a dropped required
   key (MAS101), an injected unknown key (MAS102), a placeholder or condition made
   to read an unbound variable (MAS301/305).
3. The validator never raises on junk: random text, random JSON data, valid specs
   with a random subtree replaced by junk, and valid spec text with a few characters
   damaged all give a Report whose pointers lead into the data.

Set MAS2C_HYPOTHESIS_EXAMPLES to soak with more examples than the default 80.
"""

from __future__ import annotations

import copy
import json
import keyword
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mas2c.lang.source import SpecSource, escape_token
from mas2c.lang.validate import PROBLEM_CODES, Report, validate_source, validate_text

# MAS2C_HYPOTHESIS_EXAMPLES=2000 for a long soak; the default keeps the file under ~30 s.
EXAMPLES = int(os.environ.get("MAS2C_HYPOTHESIS_EXAMPLES", "80"))
SETTINGS = settings(
    deadline=None,
    max_examples=EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
JUNK_SETTINGS = settings(
    deadline=None, max_examples=EXAMPLES + 20, suppress_health_check=[HealthCheck.too_slow]
)

MAX_DEPTH = 3
# Names a condition reads as constants or functions: never a state variable.
RESERVED = {"true", "false", "null", "none", "len"}
FIELDS = ["answer", "score", "passed", "category", "reason"]
VARIABLES = ["draft", "answer", "verdict", "notes", "result", "plan", "review", "code_out"]
WORDS = [
    "Solve",
    "the task",
    "step by step.",
    'Reply with JSON like {"answer": 42}.',
    "Use {braces} freely:",
    "single { and } are text",
    "Be brief.",
    "Context:",
]
PROGRAMMER_FIELDS = frozenset({"code", "output", "passed", "attempts"})
TEST_FIELDS = frozenset({"passed", "output"})

names = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True).filter(
    lambda s: not keyword.iskeyword(s) and s not in RESERVED
)

# A state variable -> (the fields its value is known to have (checked by MAS306), or None;
# its JSON type, which conditions must respect: MAS309 rejects a string compared with a number).
Var = tuple[frozenset[str] | None, str]
Scope = dict[str, Var]


@dataclass
class World:
    """What the workflow generator may refer to."""

    agents: dict[str, frozenset[str] | None]  # agent id -> its structured output's fields
    tools: list[str]
    # Variables a sibling parallel branch writes: off limits (MAS506).
    forbidden: set[str] = field(default_factory=set)
    counter: list[int] = field(default_factory=lambda: [0])

    def step_id(self, kind: str) -> str:
        self.counter[0] += 1
        return f"{kind}_{self.counter[0]}"


def _join(arms: list[Scope]) -> Scope:
    """After a branch: what every arm binds (the validator keeps the first arm's schema)."""
    common = set.intersection(*(set(arm) for arm in arms))
    return {name: arms[0][name] for name in sorted(common)}


class Builder:
    def __init__(self, draw: Callable[..., Any], world: World) -> None:
        self.draw = draw
        self.world = world

    # leaves -----------------------------------------------------------------------------

    def read(self, scope: Scope) -> str:
        """A placeholder path reading a bound variable (and a known field of it)."""
        name: str = self.draw(st.sampled_from(sorted(scope)))
        fields = scope[name][0]
        if fields and self.draw(st.booleans()):
            return f"{name}.{self.draw(st.sampled_from(sorted(fields)))}"
        return name

    def template(self, scope: Scope) -> str:
        parts = self.draw(
            st.lists(
                st.one_of(st.sampled_from(WORDS), st.just(None)),
                min_size=1,
                max_size=4,
            )
        )
        pieces = []
        for part in parts:
            if part is None:
                spaced = self.draw(st.booleans())
                path = self.read(scope)
                pieces.append(f"{{{{ {path} }}}}" if spaced else f"{{{{{path}}}}}")
            else:
                pieces.append(part)
        return " ".join(pieces)

    def condition(self, scope: Scope) -> str:
        name = self.draw(st.sampled_from(sorted(scope)))
        fields, kind = scope[name]
        # Only a boolean is true or false on its own (MAS513): these values are compared.
        forms = [f"{name} != null", f"not ({name} == null)", f"{name}[0] != null", "true"]
        if kind != "integer":  # len() of a number is MAS512
            forms.append(f"len({name}) > 2")
        if kind == "string":
            forms += [f"{name} in ['yes', 'done']", f"{name} == 'done' or len({name}) >= 1"]
        if kind == "integer":
            forms += [f"{name} > 2", f"{name} in [1, 2]"]
        if fields:
            # A string field: programmer/test outputs also have `attempts`/`passed` (MAS309).
            first = "output" if "output" in fields else sorted(fields)[0]
            forms += [
                f"{name}.{first} == 'yes'",
                f"not ({name}.{first} == 'no')",
                f"{name}['{first}'] is None",
            ]
        form: str = self.draw(st.sampled_from(forms))
        return form

    def agent(self) -> str:
        agent_id: str = self.draw(st.sampled_from(sorted(self.world.agents)))
        return agent_id

    def out(
        self, step: dict[str, Any], scope: Scope, fields: frozenset[str] | None, kind: str = ""
    ) -> Scope:
        allowed = [v for v in VARIABLES if v not in self.world.forbidden]
        if allowed and self.draw(st.booleans()):
            name = self.draw(st.sampled_from(allowed))
            step["out"] = name
            return {**scope, name: (fields, kind or ("object" if fields else "string"))}
        return scope

    # steps ------------------------------------------------------------------------------

    def steps(self, scope: Scope, depth: int) -> tuple[list[dict[str, Any]], Scope]:
        count = self.draw(st.integers(min_value=1, max_value=3))
        steps = []
        for _ in range(count):
            step, scope = self.step(scope, depth)
            steps.append(step)
        return steps, scope

    def step(self, scope: Scope, depth: int) -> tuple[dict[str, Any], Scope]:
        kinds = ["call", "ensemble", "debate", "programmer", "test"]
        if self.world.tools:
            kinds.append("tool")
        if depth < MAX_DEPTH:
            kinds += ["parallel", "loop", "branch"]
        kind = self.draw(st.sampled_from(kinds))
        step: dict[str, Any] = {"id": self.world.step_id(kind), "kind": kind}
        return step, getattr(self, f"_{kind}")(step, scope, depth)

    def _call(self, step: dict[str, Any], scope: Scope, depth: int) -> Scope:
        step["agent"] = self.agent()
        step["prompt"] = self.template(scope)
        return self.out(step, scope, self.world.agents[step["agent"]])

    def _programmer(self, step: dict[str, Any], scope: Scope, depth: int) -> Scope:
        step["agent"] = self.agent()
        step["prompt"] = self.template(scope)
        if self.draw(st.booleans()):
            step["max_attempts"] = self.draw(st.integers(1, 5))
        return self.out(step, scope, PROGRAMMER_FIELDS, "object")

    def _ensemble(self, step: dict[str, Any], scope: Scope, depth: int) -> Scope:
        deciding: str
        if self.draw(st.booleans()):
            step["agent"] = deciding = self.agent()
            step["n"] = self.draw(st.integers(1, 5))
        else:
            step["agents"] = self.draw(
                st.lists(st.sampled_from(sorted(self.world.agents)), min_size=1, max_size=3)
            )
            deciding = step["agents"][0]
        step["prompt"] = self.template(scope)
        voters = [step["agent"]] if "agent" in step else step["agents"]
        if not self.vote(step, voters) or self.draw(st.booleans()):
            step.pop("vote", None)
            step.pop("vote_on", None)
            step["judge"] = deciding = self.agent()
        return self.out(step, scope, self.world.agents[deciding])

    def vote(self, step: dict[str, Any], voters: list[str]) -> bool:
        """A majority vote, if the voters' answers can be compared (MAS505): all text, or
        all structured with a common field (`answer` or a `vote_on`)."""
        kinds = [self.world.agents[v] for v in voters]
        if all(k is None for k in kinds):
            step["vote"] = "majority"
            return True
        if any(k is None for k in kinds):
            return False
        common = frozenset.intersection(*(k for k in kinds if k is not None))
        if not common:
            return False
        step["vote"] = "majority"
        if "answer" not in common or self.draw(st.booleans()):
            step["vote_on"] = self.draw(st.sampled_from(sorted(common)))
        return True

    def _debate(self, step: dict[str, Any], scope: Scope, depth: int) -> Scope:
        step["agents"] = self.draw(
            st.lists(st.sampled_from(sorted(self.world.agents)), min_size=2, max_size=3)
        )
        step["rounds"] = self.draw(st.integers(1, 3))
        step["topic"] = self.template(scope)
        deciding = step["agents"][0]
        if not self.vote(step, step["agents"]) or self.draw(st.booleans()):
            step.pop("vote", None)
            step.pop("vote_on", None)
            step["judge"] = deciding = self.agent()
        return self.out(step, scope, self.world.agents[deciding])

    def _test(self, step: dict[str, Any], scope: Scope, depth: int) -> Scope:
        programs = sorted(n for n, (f, _kind) in scope.items() if f and "code" in f)
        if programs and self.draw(st.booleans()):
            step["code"] = f"{self.draw(st.sampled_from(programs))}.code"
        else:
            step["code"] = self.draw(st.sampled_from(sorted(scope)))
        step["tests"] = "assert solve(1) == 2  # " + self.template(scope)
        return self.out(step, scope, TEST_FIELDS, "object")

    def _tool(self, step: dict[str, Any], scope: Scope, depth: int) -> Scope:
        step["tool"] = self.draw(st.sampled_from(self.world.tools))
        args: dict[str, Any] = {}
        if self.draw(st.booleans()):
            args["text"] = self.template(scope)
        if self.draw(st.booleans()):
            args["options"] = {"limit": 3, "labels": [self.template(scope), "plain"]}
        step["args"] = args
        return self.out(step, scope, None)

    def _parallel(self, step: dict[str, Any], scope: Scope, depth: int) -> Scope:
        count = self.draw(st.integers(1, 3))
        after = dict(scope)
        step["branches"] = []
        outer = set(self.world.forbidden)
        for _ in range(count):
            branch, result = self.steps(scope, depth + 1)
            step["branches"].append(branch)
            after.update(result)
            self.world.forbidden |= _writes(branch)
        self.world.forbidden = outer
        return self.out(step, after, None, "array")

    def _loop(self, step: dict[str, Any], scope: Scope, depth: int) -> Scope:
        step["max_iterations"] = self.draw(st.integers(1, 5))
        body, after = self.steps(scope, depth + 1)
        step["steps"] = body
        step["until"] = self.condition(after)
        return after

    def _branch(self, step: dict[str, Any], scope: Scope, depth: int) -> Scope:
        count = self.draw(st.integers(1, 2))
        arms = []
        step["cases"] = []
        for _ in range(count):
            when = self.condition(scope)
            body, result = self.steps(scope, depth + 1)
            step["cases"].append({"when": when, "steps": body})
            arms.append(result)
        if self.draw(st.booleans()):
            body, result = self.steps(scope, depth + 1)
            step["else"] = body
            arms.append(result)
        else:
            arms.append(scope)
        return _join(arms)


def _writes(steps: list[dict[str, Any]]) -> set[str]:
    """Every `out` of a step list, nested steps included."""
    found: set[str] = set()
    for step in steps:
        if "out" in step:
            found.add(step["out"])
        nested = [step.get("steps", []), step.get("else", [])]
        nested += step.get("branches", []) + [case["steps"] for case in step.get("cases", [])]
        for child in nested:
            found |= _writes(child)
    return found


@st.composite
def valid_specs(draw: Callable[..., Any]) -> dict[str, Any]:
    inputs = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    models = draw(st.lists(names, max_size=3, unique=True))
    tools = draw(st.lists(names, max_size=3, unique=True))
    agent_ids = draw(st.lists(names, min_size=1, max_size=4, unique=True))

    spec: dict[str, Any] = {
        "spec_version": "1",
        "name": draw(st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)),
    }
    if draw(st.booleans()):
        spec["description"] = "A generated system."
    spec["inputs"] = {
        name: draw(
            st.sampled_from(
                [
                    {"type": "string"},
                    {"type": "integer"},
                    {"type": "array", "items": {"type": "string"}},
                ]
            )
        )
        for name in inputs
    }
    if models:
        spec["models"] = {}
        for model_id in models:
            entry: dict[str, Any] = {
                "model": draw(st.sampled_from(["gpt-4o", "gpt-4o-mini", "llama3"]))
            }
            if draw(st.booleans()):
                entry["temperature"] = draw(st.sampled_from([0, 0.2, 1.0]))
            if draw(st.booleans()):
                entry["price"] = {"input_per_mtok": 0.15, "output_per_mtok": 0.6}
            spec["models"][model_id] = entry

    world = World({}, tools)
    spec["agents"] = {}
    for agent_id in agent_ids:
        agent: dict[str, Any] = {"role": f"The {agent_id}"}
        if draw(st.booleans()):
            agent["instructions"] = "Answer {like this}. " + draw(st.sampled_from(WORDS))
        if models and draw(st.booleans()):
            agent["model"] = draw(st.sampled_from(models))
        if tools and draw(st.booleans()):
            agent["tools"] = draw(
                st.lists(st.sampled_from(tools), min_size=1, max_size=2, unique=True)
            )
        fields: frozenset[str] | None = None
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True))
            fields = frozenset(chosen)
            agent["output"] = {
                "type": "object",
                "properties": {f: {"type": "string"} for f in chosen},
                "required": chosen[:1],
            }
        world.agents[agent_id] = fields
        spec["agents"][agent_id] = agent
    if tools:
        spec["tools"] = {}
        for tool_id in tools:
            if draw(st.booleans()):
                spec["tools"][tool_id] = {"builtin": "python_exec", "timeout_s": 5}
            else:
                spec["tools"][tool_id] = {
                    "description": "Strips text.",
                    "code": f"import re\n\n\ndef {tool_id}(text='', options: dict | None = None) -> str:\n    return re.sub(r'\\s+', ' ', str(text)).strip()\n",
                }

    scope: Scope = {name: (None, spec["inputs"][name]["type"]) for name in inputs}
    workflow, scope = Builder(draw, world).steps(scope, 0)
    spec["workflow"] = workflow
    outputs = draw(st.lists(st.sampled_from(sorted(scope)), max_size=3, unique=True))
    if outputs:
        spec["outputs"] = {f"out_{name}": name for name in outputs}
    if draw(st.booleans()):
        spec["budgets"] = {"max_llm_calls": 50, "timeout_s": 600}
    # Keys in a readable order (inputs, outputs before agents), as people write specs.
    order = [
        "spec_version",
        "name",
        "description",
        "inputs",
        "outputs",
        "models",
        "agents",
        "tools",
        "workflow",
        "budgets",
    ]
    return {key: spec[key] for key in order if key in spec}


def dump(spec: dict[str, Any], as_json: bool) -> tuple[str, str]:
    if as_json:
        return json.dumps(spec, indent=2), "spec.json"
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100), "spec.yaml"


def check(spec: dict[str, Any], as_json: bool = False) -> Report:
    text, path = dump(spec, as_json)
    return validate_text(text, path)


# -- 1. valid specs validate ----------------------------------------------------------------


@SETTINGS
@given(spec=valid_specs(), as_json=st.booleans())
def test_generated_specs_are_valid(spec: dict[str, Any], as_json: bool) -> None:
    report = check(spec, as_json)
    assert report.errors == [], report.format() + "\n" + dump(spec, False)[0]
    assert report.spec is not None
    warnings = {"MAS901", "MAS902", "MAS903", "MAS910", "MAS911", "MAS913"}  # MAS913: a text ==
    assert {p.code for p in report.problems} <= warnings
    # Data and typed model agree: nothing silently dropped.
    assert report.spec.to_data()["workflow"][0]["id"] == spec["workflow"][0]["id"]


# -- 2. single mutations are caught where they were made -------------------------------------


@dataclass
class Sites:
    refs: list[tuple[str, str]] = field(default_factory=list)  # (pointer, code)
    required: list[str] = field(default_factory=list)  # pointers of required keys
    mappings: list[str] = field(default_factory=list)  # mappings that accept no unknown key
    reads: list[tuple[str, str]] = field(default_factory=list)  # (pointer, code) of a read


REQUIRED = {
    "call": ["agent", "prompt"],
    "ensemble": ["prompt"],
    "parallel": ["branches"],
    "loop": ["steps", "until"],
    "branch": ["cases"],
    "debate": ["agents", "topic"],
    "programmer": ["agent", "prompt"],
    "test": ["code", "tests"],
    "tool": ["tool"],
}
TEMPLATE_KEYS = ("prompt", "topic", "tests")


def find_sites(spec: dict[str, Any]) -> Sites:
    sites = Sites()
    sites.mappings.append("")
    sites.required += ["/spec_version", "/name", "/agents", "/workflow"]
    for model_id, model in spec.get("models", {}).items():
        here = f"/models/{escape_token(model_id)}"
        sites.mappings.append(here)
        sites.required.append(f"{here}/model")
        if "price" in model:
            sites.mappings.append(f"{here}/price")
    for agent_id, agent in spec["agents"].items():
        here = f"/agents/{escape_token(agent_id)}"
        sites.mappings.append(here)
        sites.required.append(f"{here}/role")
        if "model" in agent:
            sites.refs.append((f"{here}/model", "MAS203"))
        sites.refs += [(f"{here}/tools/{i}", "MAS202") for i in range(len(agent.get("tools", [])))]
    for tool_id in spec.get("tools", {}):
        sites.mappings.append(f"/tools/{escape_token(tool_id)}")
    if "budgets" in spec:
        sites.mappings.append("/budgets")
    _step_sites(spec["workflow"], "/workflow", sites)
    return sites


def _step_sites(steps: list[dict[str, Any]], pointer: str, sites: Sites) -> None:
    for index, step in enumerate(steps):
        here = f"{pointer}/{index}"
        kind = step["kind"]
        sites.mappings.append(here)
        sites.required += [f"{here}/{key}" for key in ["id", "kind", *REQUIRED[kind]]]
        for key in ("agent", "judge"):
            if key in step and kind != "tool":
                sites.refs.append((f"{here}/{key}", "MAS201"))
        sites.refs += [(f"{here}/agents/{i}", "MAS201") for i in range(len(step.get("agents", [])))]
        if kind == "tool":
            sites.refs.append((f"{here}/tool", "MAS202"))
            sites.reads += [
                (p, "MAS301") for p, text in _strings(step["args"], f"{here}/args") if "{{" in text
            ]
        for key in TEMPLATE_KEYS:
            if key in step and "{{" in step[key]:
                sites.reads.append((f"{here}/{key}", "MAS301"))
        if kind == "test":
            sites.reads.append((f"{here}/code", "MAS301"))
        if kind == "loop":
            sites.reads.append((f"{here}/until", "MAS305"))
            _step_sites(step["steps"], f"{here}/steps", sites)
        if kind == "parallel":
            for b, branch in enumerate(step["branches"]):
                _step_sites(branch, f"{here}/branches/{b}", sites)
        if kind == "branch":
            for c, case in enumerate(step["cases"]):
                sites.mappings.append(f"{here}/cases/{c}")
                sites.required += [f"{here}/cases/{c}/when", f"{here}/cases/{c}/steps"]
                sites.reads.append((f"{here}/cases/{c}/when", "MAS305"))
                _step_sites(case["steps"], f"{here}/cases/{c}/steps", sites)
            if "else" in step:
                _step_sites(step["else"], f"{here}/else", sites)


def _strings(value: Any, pointer: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(pointer, value)]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _strings(v, f"{pointer}/{escape_token(k)}")]
    if isinstance(value, list):
        return [x for i, v in enumerate(value) for x in _strings(v, f"{pointer}/{i}")]
    return []


def _tokens(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


def _parent_and_key(data: Any, pointer: str) -> tuple[Any, Any]:
    tokens = _tokens(pointer)
    node = data
    for token in tokens[:-1]:
        node = node[int(token)] if isinstance(node, list) else node[token]
    last: Any = tokens[-1]
    return node, int(last) if isinstance(node, list) else last


def _get(data: Any, pointer: str) -> Any:
    parent, key = _parent_and_key(data, pointer)
    return parent[key]


def _set(data: Any, pointer: str, value: Any) -> None:
    parent, key = _parent_and_key(data, pointer)
    parent[key] = value


def related(a: str, b: str) -> bool:
    """One pointer is the other or inside it."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def assert_caught(report: Report, code: str, pointer: str, spec: dict[str, Any]) -> None:
    hits = [p for p in report.problems if p.code == code and related(p.pointer, pointer)]
    assert hits, f"expected {code} at {pointer}:\n{report.format()}\n{dump(spec, False)[0]}"
    assert report.errors, report.format()
    # The exact place, with a file position.
    exact = [p for p in hits if p.pointer == pointer]
    assert exact, f"expected {code} exactly at {pointer}:\n{report.format()}"
    assert exact[0].line is not None


UNKNOWN = "Ghost"  # capitalised: the generator never makes such a name


@SETTINGS
@given(spec=valid_specs(), data=st.data())
def test_renamed_reference_is_caught(spec: dict[str, Any], data: st.DataObject) -> None:
    sites = find_sites(spec).refs
    assume(sites)
    pointer, code = data.draw(st.sampled_from(sites), label="site")
    mutated = copy.deepcopy(spec)
    _set(mutated, pointer, UNKNOWN + _get(spec, pointer))
    assert_caught(check(mutated), code, pointer, mutated)


@SETTINGS
@given(spec=valid_specs(), data=st.data(), as_json=st.booleans())
def test_dropped_required_key_is_caught(
    spec: dict[str, Any], data: st.DataObject, as_json: bool
) -> None:
    pointer = data.draw(st.sampled_from(find_sites(spec).required), label="site")
    mutated = copy.deepcopy(spec)
    parent, key = _parent_and_key(mutated, pointer)
    del parent[key]
    assert_caught(check(mutated, as_json), "MAS101", pointer, mutated)


@SETTINGS
@given(
    spec=valid_specs(),
    data=st.data(),
    key=st.from_regex(r"[A-Z][A-Za-z0-9_]{0,10}", fullmatch=True),
    value=st.one_of(
        st.integers(), st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=2)
    ),
)
def test_injected_unknown_key_is_caught(
    spec: dict[str, Any], data: st.DataObject, key: str, value: Any
) -> None:
    mapping = data.draw(st.sampled_from(find_sites(spec).mappings), label="mapping")
    mutated = copy.deepcopy(spec)
    target = _get(mutated, mapping) if mapping else mutated
    target[key] = value
    assert_caught(check(mutated), "MAS102", f"{mapping}/{escape_token(key)}", mutated)


PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)")
NAME = re.compile(r"(?<![\w.'\"])([a-z][a-z0-9_]*)\b(?!\s*\()")


@SETTINGS
@given(spec=valid_specs(), data=st.data())
def test_unbound_read_is_caught(spec: dict[str, Any], data: st.DataObject) -> None:
    sites = find_sites(spec).reads
    assume(sites)
    pointer, code = data.draw(st.sampled_from(sites), label="site")
    text = _get(spec, pointer)
    unbound = "Unbound_" + data.draw(names, label="name")
    if code == "MAS301" and pointer.endswith("/code") and "{{" not in text:
        replaced = unbound + text[len(text.split(".")[0]) :]  # a test step's `code` path
    else:
        pattern = PLACEHOLDER if code == "MAS301" else NAME
        matches = [
            m
            for m in pattern.finditer(text)
            if m.group(1) not in ("true", "null", "len", "not", "in", "or", "and", "is")
        ]
        assume(matches)
        match = data.draw(st.sampled_from(matches), label="read")
        replaced = text[: match.start(1)] + unbound + text[match.end(1) :]
    mutated = copy.deepcopy(spec)
    _set(mutated, pointer, replaced)
    report = check(mutated)
    assert_caught(report, code, pointer, mutated)
    # The problem is placed on the read itself, inside the value.
    hit = next(p for p in report.problems if p.code == code and p.pointer == pointer)
    assert unbound in hit.message


# -- 3. junk never crashes the validator -----------------------------------------------------

YAMLISH = st.text(
    alphabet=st.sampled_from(
        [*"abcxyz019 \t\n:-[]{}!&*|>'\"#%@`,?.~=\\/", "\u00e9", "\x00", "\ufeff"]
    ),
    max_size=120,
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["call", "loop", "{{ x }}", "{{", "__import__('os')", "1", "solver"]),
)
JUNK_KEYS = st.one_of(
    st.text(max_size=8),
    st.sampled_from(
        [
            "kind",
            "id",
            "agent",
            "agents",
            "steps",
            "workflow",
            "else",
            "a/b",
            "~0",
            "out",
            "when",
            "tools",
        ]
    ),
)
JSON_DATA = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(JUNK_KEYS, children, max_size=4),
    ),
    max_leaves=30,
)


def assert_report(report: Report, data: Any = None) -> None:
    assert isinstance(report, Report)
    for problem in report.problems:
        assert problem.code in PROBLEM_CODES
        assert problem.pointer == "" or problem.pointer.startswith("/")
        assert isinstance(problem.message, str) and problem.message
        if data is not None and problem.code != "MAS001":
            assert _exists(data, problem.pointer) or _exists(
                data, problem.pointer.rsplit("/", 1)[0]
            ), (
                problem,
                data,
            )


def _exists(data: Any, pointer: str) -> bool:
    node = data
    for token in _tokens(pointer):
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return False
    return True


@JUNK_SETTINGS
@given(text=YAMLISH, as_json=st.booleans())
def test_junk_text_gives_a_report(text: str, as_json: bool) -> None:
    assert_report(validate_text(text, "junk.json" if as_json else "junk.yaml"))


@JUNK_SETTINGS
@given(data=JSON_DATA)
def test_junk_data_gives_a_report(data: Any) -> None:
    assert_report(validate_source(SpecSource(data=data, path="junk")), data)
    text = json.dumps(data)
    assert_report(validate_text(text, "junk.json"))


@JUNK_SETTINGS
@given(spec=valid_specs(), junk=JSON_DATA, data=st.data())
def test_spec_with_a_junk_subtree_gives_a_report(
    spec: dict[str, Any], junk: Any, data: st.DataObject
) -> None:
    pointers = [""] + [p for p in _all_pointers(spec, "") if p]
    pointer = data.draw(st.sampled_from(pointers[1:]), label="subtree")
    mutated = copy.deepcopy(spec)
    _set(mutated, pointer, junk)
    assert_report(validate_source(SpecSource(data=mutated)), mutated)
    text, path = dump(mutated, data.draw(st.booleans(), label="json"))
    report = validate_text(text, path)
    assert_report(report, mutated)
    for problem in report.problems:
        assert problem.line is None or problem.line >= 1


def _all_pointers(value: Any, pointer: str) -> list[str]:
    found = [pointer]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _all_pointers(child, f"{pointer}/{escape_token(key)}")
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _all_pointers(child, f"{pointer}/{index}")
    return found


@JUNK_SETTINGS
@given(spec=valid_specs(), data=st.data())
def test_damaged_spec_text_gives_a_report(spec: dict[str, Any], data: st.DataObject) -> None:
    """A valid spec's text with a few characters deleted, inserted or replaced."""
    text, path = dump(spec, data.draw(st.booleans(), label="json"))
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        at = data.draw(st.integers(0, len(text)), label="at")
        cut = data.draw(st.integers(0, 3), label="cut")
        insert = data.draw(
            st.sampled_from(["", ":", "- ", "\n", "\t", "{{", "}", '"', "'", "&a", "*a", " #"])
        )
        text = text[:at] + insert + text[at + cut :]
    report = validate_text(text, path)
    assert_report(report)
    lines = text.splitlines()
    for problem in report.problems:
        if problem.line is not None and problem.code != "MAS001":
            assert 1 <= problem.line <= len(lines) + 1, (problem, text)
