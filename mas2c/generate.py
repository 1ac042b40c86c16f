"""The generator: a task in words becomes a validated MAS spec (the MAS² generator meta-agent).

`generate_spec(task, client)` asks the LLM for a spec under the published JSON
Schema (structured output, with the fallbacks of `mas2c.llm`). The prompt
explains the spec language and shows a few example specs picked for the task
(by word overlap with their names and descriptions). A reply that is not JSON,
or that the validator rejects, goes back to the LLM with the validator's located
problems (`CODE /json/pointer: message (hint)`), at most `max_repairs` times;
then `GenerateError` carries the last problems. Warnings are accepted.

With `compact=True` (what `solve` uses on the embedded model) the prompt and the
schema are cut to what a model with a small context and little capacity can follow:
`compact_schema(inputs)` allows one or two `call`/`ensemble` steps (ids and outs fixed
by position) over one or two text agents (`solver`, optionally `reviewer`), the task's
inputs by name (default one string `question`), prompts that end with a placeholder,
capped strings and one `answer` output; `compact_system_prompt(inputs)` describes that schema
(`mas2c.lang.describe.describe_schema`), and `compact_messages` adds one small
example as an answered turn before the task. The structure is
then carried by schema-constrained decoding (llama.cpp turns the schema into a
grammar); what a schema cannot say (an agent a step names exists, an output names a
step's `out`) goes through the same validator loop.

`spec_to_yaml(spec)` / `write_spec_yaml(spec, path)` write a spec as readable
YAML (natural key order, block scalars for multi-line strings), atomically; the
file re-validates to the same spec.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mas2c.errors import RunFailure
from mas2c.files import write_text_atomic
from mas2c.lang.describe import describe_schema
from mas2c.lang.source import SourceError, load_file
from mas2c.lang.spec import Spec, json_schema, language_description, spec_hash
from mas2c.lang.validate import Problem, validate_file, validate_text
from mas2c.llm import JSONNotFound, LLMClient, Message, Usage, extract_json

__all__ = [
    "COMPACT_MAX_TOKENS",
    "Example",
    "GenerateError",
    "GenerateResult",
    "compact_messages",
    "compact_schema",
    "compact_system_prompt",
    "default_examples_dir",
    "format_problems",
    "generate_spec",
    "load_examples",
    "pick_examples",
    "spec_to_yaml",
    "system_prompt",
    "write_spec_yaml",
]

ProgressFn = Callable[[str], None]

_INTRO = """\
You design multi-agent systems (MAS) for mas2c. A MAS is written as a declarative spec,
which mas2c validates and compiles into a Python program. You answer with one spec, as a
single JSON object, and nothing else.
"""

_GUIDANCE = """\
How the parts fit: agents name a model id from `models`, or omit `model` to leave an
unbound slot that the implementer fills later (never name a model that is not in
`models`). A structured agent (output: a JSON Schema object such as {"type": "object",
"properties": {...}, "required": [...]}) lets later steps read its fields as
{{ var.field }}. A code tool defines a top-level function named exactly like the tool id.

State variables are the inputs and the `out`s of earlier steps. Prompts (prompt, topic,
tests, tool args) read them with placeholders {{ name }} or {{ name.field }}; single
braces are literal text. A tool arg or test that is exactly one placeholder passes the
value itself (a list stays a list); inside a larger string a value is text (filters:
{{ xs | join(', ') }}, {{ x | json }}). Every placeholder must name a variable already written at that
point on every path: a variable written inside only some branch cases is not bound after
the branch; write the same variable in every case (and `else`) when later steps need it.
Conditions (`until`, `when`) are small Python expressions over state variables, WITHOUT
braces: names, literals, a.b, a[0], comparisons (== != < <= > >= in, not in, is),
and/or/not, len(). Nothing else (no other calls, no lambdas, no f-strings). A value used
as true/false on its own (`until: review.passed`) must be a boolean field; compare anything
else (`review.verdict == "pass"`, `len(items) > 0`).

Design guidance: use as few agents and steps as the task needs; give each agent precise
instructions; use structured output when a later step or a condition reads a field; bound
every loop; set realistic budgets. Every agent should be used by some step.
"""


def language_text() -> str:
    """The spec language as told to the LLM: every key, field and step kind comes from the
    models (`mas2c.lang.describe`), around a few lines on how the parts fit together."""
    return "\n".join([_INTRO, language_description(), "", _GUIDANCE])


LANGUAGE = language_text()  # the built-in kinds' text (system_prompt reads the registry anew)

EXAMPLES_INTRO = "Example specs written for other tasks (the task is each spec's description):"

TASK_TEMPLATE = """\
Task:
{task}

Write the mas2c spec of a multi-agent system that performs this task. Reply with the
complete spec as one JSON object."""


class GenerateError(RunFailure):
    """No valid spec within the allowed repairs; `problems` are the last reply's."""

    code = "no_valid_spec"

    def __init__(
        self,
        message: str,
        problems: list[Problem],
        *,
        attempts: int,
        history: list[list[Problem]],
        usage: Usage,
        last_reply: str,
    ) -> None:
        listed = "\n".join(f"  {line}" for line in format_problems(problems).splitlines())
        super().__init__(f"{message}\n{listed}" if listed else message)
        self.problems = problems
        self.attempts = attempts
        self.history = history
        self.usage = usage
        self.last_reply = last_reply


@dataclass
class GenerateResult:
    spec: Spec
    text: str  # the spec as YAML, ready to write
    attempts: int  # LLM answers asked for (1 = the first answer was valid)
    history: list[list[Problem]] = field(default_factory=list)  # problems of each failed answer
    warnings: list[Problem] = field(default_factory=list)  # of the final spec
    usage: Usage = field(default_factory=Usage)
    examples: list[str] = field(default_factory=list)  # names of the few-shot examples shown
    prompt: str = "full"  # "full" (language, schema, examples) or "compact" (small models)

    @property
    def problems(self) -> list[list[Problem]]:
        """Alias of `history`."""
        return self.history

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "spec_hash": spec_hash(self.spec),
            "attempts": self.attempts,
            "repairs": [[p.to_json() for p in problems] for problems in self.history],
            "warnings": [p.to_json() for p in self.warnings],
            "examples": self.examples,
            "prompt": self.prompt,
            "usage": self.usage.to_json(),
        }


# -- examples -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    data: dict[str, Any]  # the spec as its author wrote it (no defaults filled in)
    path: Path


def default_examples_dir() -> Path | None:
    """The repo's `specs/` (a source checkout) or the copy shipped in the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "specs", here / "_specs"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return None


def load_examples(directory: Path) -> list[Example]:
    """The valid specs in `directory` (*.yaml, *.yml, *.json); anything else is skipped."""
    found = []
    paths = sorted(
        p for p in directory.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
    )
    for path in paths:
        try:
            report = validate_file(path)
            source = load_file(path)
        except (OSError, SourceError):
            continue
        if report.spec is None or not report.ok or not isinstance(source.data, dict):
            continue
        data = {k: v for k, v in source.data.items() if k != "$schema"}
        found.append(Example(report.spec.name, report.spec.description, data, path))
    return found


_STOPWORDS_TEXT = """a an and are as at be by for from how in into is it its of on or that the
their then this to was were which with what when where who will would your you each one two
three than them they can do does using use used write writes written make makes"""
_STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


def _words(text: str) -> set[str]:
    words = set()
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if len(word) < 3 and not word.isdigit():
            continue
        if word in _STOPWORDS:
            continue
        if len(word) > 4 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        words.add(word)
    return words


def pick_examples(task: str, examples: list[Example], count: int = 2) -> list[Example]:
    """The `count` examples whose name and description share the most words with the task."""
    task_words = _words(task)

    def score(example: Example) -> tuple[int, str]:
        own = _words(f"{example.name.replace('-', ' ')} {example.description}")
        return (-len(task_words & own), example.name)

    return sorted(examples, key=score)[: max(count, 0)]


# -- prompt ---------------------------------------------------------------------------------


def system_prompt(examples: list[Example]) -> str:
    """The system message: the language, the JSON Schema, and the examples as JSON."""
    schema = json.dumps(json_schema(), separators=(",", ":"), ensure_ascii=False)
    parts = [language_text(), f"The JSON Schema of a spec:\n```json\n{schema}\n```"]
    if examples:
        parts.append(EXAMPLES_INTRO)
        for index, example in enumerate(examples, 1):
            body = json.dumps(example.data, indent=1, ensure_ascii=False)
            parts.append(f"Example {index}: {example.name}\n```json\n{body}\n```")
    return "\n\n".join(parts)


def format_problems(problems: list[Problem]) -> str:
    """One line per problem: `CODE /pointer: message (hint)`."""
    lines = []
    for problem in problems:
        line = f"{problem.code} {problem.pointer or '/'}: {problem.message}"
        if problem.hint:
            line += f" ({problem.hint})"
        lines.append(line)
    return "\n".join(lines)


def _repair_message(problems: list[Problem]) -> str:
    errors = [p for p in problems if p.severity == "error"]
    if len(errors) == 1 and errors[0].code == "MAS001" and not errors[0].pointer:
        return (
            f"Your reply could not be read: {errors[0].message}. Reply with the complete "
            "spec as one JSON object and nothing else."
        )
    listed = "\n".join(f"- {line}" for line in format_problems(errors).splitlines())
    text = (
        f"The mas2c validator rejected that spec with {len(errors)} error(s), each given "
        f"as `code JSON-pointer: message (hint)`:\n{listed}\n"
    )
    warnings = [p for p in problems if p.severity != "error"]
    if warnings:
        noted = "\n".join(f"- {line}" for line in format_problems(warnings).splitlines())
        text += f"Warnings (they may point at the cause):\n{noted}\n"
    return text + (
        "\nFix every error and reply with the complete corrected spec as one JSON object."
    )


# -- the compact prompt and schema (small models) -------------------------------------------

COMPACT_MAX_TOKENS = 600  # a compact spec is 150-350 tokens; the caps keep it under this

_COMPACT_ID = r"^[a-z][a-z0-9_]{0,23}$"
_COMPACT_TEXT = r"[A-Za-z0-9 ,.?!:;()'-]"  # no braces, quotes or newlines: no stray placeholders
_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number"}


def json_type_of(value: Any) -> str:
    """The JSON Schema type of an input value (for the compact schema's `inputs`)."""
    for python, name in _JSON_TYPES.items():
        if type(value) is python:
            return name
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


def _const_object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


COMPACT_AGENTS = ("solver", "reviewer")  # the agent ids a compact spec may use, in order
COMPACT_STEPS = (("first", "draft"), ("second", "final"))  # (id, out) of each step, in order
COMPACT_INPUT = "question"  # the input a compact spec declares when the task's are unknown


def _compact_step(position: int, reads: list[str]) -> dict[str, Any]:
    """The step at `position`: a call or an ensemble, with its id and out fixed (a small
    model otherwise reuses an id), reading the inputs (and the first step's out)."""
    step_id, out = COMPACT_STEPS[position]
    names = "|".join(re.escape(name) for name in reads)
    prompt = {
        "type": "string",
        "pattern": f"^{_COMPACT_TEXT}{{1,120}}\\{{\\{{ ({names}) \\}}\\}}$",
        "description": "What the agent is asked; ends with a placeholder.",
    }
    agent_ref = {"enum": list(COMPACT_AGENTS), "description": "An agent id of `agents`."}
    fixed = {"id": {"const": step_id}}
    call = _const_object(
        {**fixed, "kind": {"const": "call"}, "agent": agent_ref, "prompt": prompt}
        | {"out": {"const": out}}
    )
    ensemble = _const_object(
        {
            **fixed,
            "kind": {"const": "ensemble"},
            "agent": agent_ref,
            "n": {"type": "integer", "minimum": 3, "maximum": 5},
            "prompt": prompt,
            "vote": {"const": "majority"},
            "out": {"const": out},
        }
    )
    return {"anyOf": [call, ensemble]}


def compact_schema(inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """The reduced spec schema for small models: `inputs` maps the task's input names to
    JSON types (default: one string `question`).

    Every instance has the shape of a valid spec, and every bound holds in the grammar
    llama.cpp makes of it (which ignores minProperties/maxProperties): agent ids come from
    `COMPACT_AGENTS` (`solver` required), steps name them by enum, a workflow is one step
    or two (ids and outs fixed by position: `first` -> `draft`, `second` -> `final`, the
    second may read `draft`), strings are capped."""
    kinds = dict(sorted((inputs or {COMPACT_INPUT: "string"}).items()))
    declared = _const_object(
        {name: _const_object({"type": {"const": kind}}) for name, kind in kinds.items()}
    )
    first = _compact_step(0, list(kinds))
    second = _compact_step(1, [*kinds, COMPACT_STEPS[0][1]])
    one = {"type": "array", "prefixItems": [first], "items": False}
    two = {"type": "array", "prefixItems": [first, second], "items": False}
    agent = _const_object(
        {
            "role": {"type": "string", "minLength": 3, "maxLength": 40},
            "instructions": {"type": "string", "maxLength": 160},
        }
    )
    agents = _const_object({name: agent for name in COMPACT_AGENTS})
    agents["required"] = [COMPACT_AGENTS[0]]
    return _const_object(
        {
            "spec_version": {"const": "1"},
            "name": {"type": "string", "pattern": r"^[a-z][a-z0-9-]{2,30}$"},
            "description": {"type": "string", "maxLength": 120},
            "inputs": declared,
            "agents": agents,
            "workflow": {"anyOf": [one, two]},
            "outputs": _const_object(
                {
                    "answer": {
                        "enum": [out for _id, out in COMPACT_STEPS],
                        "description": "The `out` of the last step.",
                    }
                }
            ),
        }
    )


def _compact_example(inputs: dict[str, str] | None) -> dict[str, Any]:
    kinds = inputs or {COMPACT_INPUT: "string"}
    name = sorted(kinds)[0]
    return {
        "spec_version": "1",
        "name": "translate",
        "description": "One agent translates the text into French.",
        "inputs": {name: {"type": kinds[name]}},
        "agents": {
            "solver": {
                "role": "Translator",
                "instructions": "Translate the text into French; answer with the translation only.",
            }
        },
        "workflow": [
            {
                "id": "first",
                "kind": "call",
                "agent": "solver",
                "prompt": f"Translate this text into French: {{{{ {name} }}}}",
                "out": "draft",
            }
        ],
        "outputs": {"answer": "draft"},
    }


_COMPACT_RULES = """\
Rules: a step may use `reviewer` only if `agents` defines it; every prompt ends with an input
as {{ name }} (the second step may read {{ draft }}); outputs.answer is the `out` of the
last step. Keep texts short and specific to the task."""


COMPACT_EXAMPLE_TASK = "Translate a text into French."


def compact_system_prompt(inputs: dict[str, str] | None = None) -> str:
    """The generator's system message for small models: the reduced schema in words and
    the rules a schema cannot carry (the example comes as an earlier turn)."""
    return "\n\n".join(
        [
            _INTRO.strip(),
            "The spec's keys:\n" + describe_schema(compact_schema(inputs)),
            _COMPACT_RULES,
        ]
    )


def compact_messages(task: str, inputs: dict[str, str] | None = None) -> list[Message]:
    """The compact conversation: system, one example task answered, then the task. A small
    model follows an answered turn far better than an example inside the instructions."""
    return [
        {"role": "system", "content": compact_system_prompt(inputs)},
        {"role": "user", "content": TASK_TEMPLATE.format(task=COMPACT_EXAMPLE_TASK)},
        {"role": "assistant", "content": json.dumps(_compact_example(inputs), ensure_ascii=False)},
        {"role": "user", "content": TASK_TEMPLATE.format(task=task)},
    ]


# -- the generator --------------------------------------------------------------------------


def _check_reply(text: str, *, whole: bool = False) -> tuple[Spec | None, list[Problem]]:
    """The validated spec of a reply, or its problems. With `whole` (grammar-constrained
    replies) the reply must be one JSON document: a cut-off reply is said to be one, not
    mined for an inner object whose problems would mislead the repair."""
    if whole:
        try:
            json.loads(text)
        except ValueError:
            return None, [
                Problem(
                    "MAS001",
                    "",
                    "the reply is not one complete JSON object (cut off at the token limit?); "
                    "keep every text short",
                )
            ]
    try:
        data = extract_json(text)
    except JSONNotFound as exc:
        return None, [Problem("MAS001", "", f"{exc}: expected one JSON object holding the spec")]
    if not isinstance(data, dict):
        kind = type(data).__name__
        return None, [Problem("MAS002", "", f"the reply is a JSON {kind}, not an object")]
    report = validate_text(json.dumps(data, indent=2, ensure_ascii=False), "<generated>")
    if report.spec is None or not report.ok:
        return None, report.problems
    return report.spec, report.problems


def generate_spec(
    task: str,
    client: LLMClient,
    *,
    examples_dir: Path | None = None,
    n_examples: int = 2,
    max_repairs: int = 3,
    temperature: float = 0.0,
    max_tokens: int | None = None,
    on_progress: ProgressFn | None = None,
    compact: bool = False,
    inputs: dict[str, str] | None = None,
    model_label: str | None = None,
) -> GenerateResult:
    """A valid spec for `task`, or `GenerateError` after `max_repairs` failed repairs.

    `compact` asks under the reduced schema with the compact prompt (small models);
    `inputs` (name -> JSON type) fixes the inputs it declares. `model_label` names the
    model in progress messages (default: the client's model name).
    `LLMError` (from `mas2c.llm`) propagates when the endpoint cannot be asked.
    """
    task = task.strip()
    if not task:
        raise ValueError("the task is empty")
    say = on_progress or (lambda _message: None)
    who = model_label or getattr(client, "model", None) or "the model"
    if compact:
        chosen: list[Example] = []
        base = compact_messages(task, inputs)
        schema = compact_schema(inputs)
        max_tokens = max_tokens or COMPACT_MAX_TOKENS
    else:
        directory = examples_dir if examples_dir is not None else default_examples_dir()
        chosen = pick_examples(task, load_examples(directory), n_examples) if directory else []
        base = [
            {"role": "system", "content": system_prompt(chosen)},
            {"role": "user", "content": TASK_TEMPLATE.format(task=task)},
        ]
        schema = json_schema()
    messages = base
    history: list[list[Problem]] = []
    before = client.usage
    reply = ""
    problems: list[Problem] = []
    total = max_repairs + 1
    for attempt in range(1, total + 1):
        say(
            f"asking {who} for a spec" + (" (compact prompt and schema)" if compact else "")
            if attempt == 1
            else f"asking {who} to repair the spec (repair {attempt - 1}/{max_repairs})"
        )
        reply = client.chat(
            messages,
            schema=schema,
            schema_name="mas2c_spec",
            schema_in_prompt=False,  # the system message shows it already
            temperature=temperature,
            max_tokens=max_tokens,
        )
        spec, problems = _check_reply(reply, whole=compact)
        if spec is not None:
            say(f"the spec `{spec.name}` is valid")
            return GenerateResult(
                spec=spec,
                text=spec_to_yaml(spec, header=_header(task)),
                attempts=attempt,
                history=history,
                warnings=problems,
                usage=client.usage - before,
                examples=[e.name for e in chosen],
                prompt="compact" if compact else "full",
            )
        history.append(problems)
        errors = [p for p in problems if p.severity == "error"]
        say(f"the reply has {len(errors)} error(s): {', '.join(sorted({p.code for p in errors}))}")
        # Only the latest answer and its problems are sent back: the context stays bounded.
        messages = [
            *base,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": _repair_message(problems)},
        ]
    raise GenerateError(
        f"no valid spec after {total} answer(s) ({max_repairs} repair(s)); last problems:",
        [p for p in problems if p.severity == "error"],
        attempts=total,
        history=history,
        usage=client.usage - before,
        last_reply=reply,
    )


def _header(task: str) -> str:
    first = " ".join(task.split())
    wrapped = textwrap.wrap(first, 88) or [""]
    if len(wrapped) > 6:
        wrapped = [*wrapped[:6], "..."]
    return "\n".join(["Generated by mas2c generate for the task:", *wrapped])


# -- YAML -----------------------------------------------------------------------------------

_STEP_KEYS = (
    "id",
    "kind",
    "agent",
    "agents",
    "n",
    "rounds",
    "tool",
    "args",
    "code",
    "prompt",
    "topic",
    "tests",
    "vote",
    "judge",
    "max_attempts",
    "max_iterations",
    "until",
    "cases",
    "else",
    "branches",
    "steps",
    "run_timeout_s",
    "timeout_s",
    "out",
)


def _ordered_step(step: dict[str, Any]) -> dict[str, Any]:
    rank = {key: index for index, key in enumerate(_STEP_KEYS)}
    ordered = {k: step[k] for k in sorted(step, key=lambda k: (rank.get(k, len(rank)), k))}
    if isinstance(ordered.get("steps"), list):
        ordered["steps"] = _ordered_steps(ordered["steps"])
    if isinstance(ordered.get("else"), list):
        ordered["else"] = _ordered_steps(ordered["else"])
    if isinstance(ordered.get("branches"), list):
        ordered["branches"] = [_ordered_steps(b) for b in ordered["branches"]]
    if isinstance(ordered.get("cases"), list):
        ordered["cases"] = [
            {**case, "steps": _ordered_steps(case["steps"])}
            if isinstance(case, dict) and isinstance(case.get("steps"), list)
            else case
            for case in ordered["cases"]
        ]
    return ordered


def _ordered_steps(steps: list[Any]) -> list[Any]:
    return [_ordered_step(s) if isinstance(s, dict) else s for s in steps]


def _spec_data(spec: Spec, *, minimal: bool) -> dict[str, Any]:
    if minimal:
        # What was written (or set), not every default: the spec stays as short as its author's.
        data = spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)
    else:
        data = spec.to_data()
    data.pop("$schema", None)
    data["workflow"] = _ordered_steps(data.get("workflow", []))
    for model in (data.get("models") or {}).values():
        if isinstance(model, dict) and isinstance(model.get("price"), dict):
            model["price"] = _Flow(model["price"])
    for agent in (data.get("agents") or {}).values():
        if isinstance(agent, dict):
            if isinstance(agent.get("output"), dict):
                agent["output"] = _compact(agent["output"])
            if isinstance(agent.get("tools"), list):
                agent["tools"] = _compact(agent["tools"])
    if isinstance(data.get("inputs"), dict):
        data["inputs"] = {k: _compact(v) for k, v in data["inputs"].items()}
    return data


class _Flow(dict[str, Any]):
    """A mapping written in flow style (`{a: 1, b: 2}`)."""


class _FlowList(list[Any]):
    """A list written in flow style (`[a, b]`)."""


_FLOW_WIDTH = 80


def _is_scalar(value: Any) -> bool:
    if isinstance(value, str):
        return "\n" not in value
    return value is None or isinstance(value, bool | int | float)


def _compact(node: Any) -> Any:
    """JSON Schemas and short lists in flow style where they fit on a line."""
    if isinstance(node, dict):
        node = {k: _compact(v) for k, v in node.items()}
        flat = all(_is_scalar(v) or isinstance(v, _FlowList) for v in node.values())
        if flat and len(json.dumps(node)) <= _FLOW_WIDTH:
            return _Flow(node)
        return node
    if isinstance(node, list):
        node = [_compact(v) for v in node]
        if all(_is_scalar(v) for v in node) and len(json.dumps(node)) <= _FLOW_WIDTH:
            return _FlowList(node)
        return node
    return node


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line strings; lists indented under their keys."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value.strip("\n") or (value.endswith("\n") and len(value) > 1):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


def _represent_float(dumper: yaml.SafeDumper, value: float) -> yaml.ScalarNode:
    if value.is_integer() and abs(value) < 1e15:
        return dumper.represent_int(int(value))  # 600, not 600.0: loads back as the same number
    return dumper.represent_float(value)


def _represent_flow(dumper: yaml.SafeDumper, value: _Flow) -> yaml.MappingNode:
    return dumper.represent_mapping("tag:yaml.org,2002:map", value.items(), flow_style=True)


def _represent_flow_list(dumper: yaml.SafeDumper, value: _FlowList) -> yaml.SequenceNode:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(float, _represent_float)
_Dumper.add_representer(_Flow, _represent_flow)
_Dumper.add_representer(_FlowList, _represent_flow_list)


def _dump(data: dict[str, Any], header: str | None) -> str:
    body = yaml.dump(
        data,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
        default_flow_style=False,
    )
    # Blank lines between the top-level sections, for the reader.
    lines = body.splitlines()
    spaced: list[str] = []
    section = ""
    for line in lines:
        if spaced and line and not line[0].isspace():
            section = line.split(":", 1)[0]
            if section not in ("spec_version", "name", "description"):
                spaced.append("")
        elif section == "workflow" and line.startswith("  - ") and spaced[-1] != "workflow:":
            spaced.append("")  # between top-level steps
        spaced.append(line)
    text = "\n".join(spaced) + "\n"
    text = text.replace("spec_version: '1'\n", 'spec_version: "1"\n', 1)  # as in the examples
    if header:
        comment = "\n".join(f"# {line}".rstrip() for line in header.splitlines())
        text = f"{comment}\n{text}"
    return text


def spec_to_yaml(spec: Spec, *, header: str | None = None) -> str:
    """The spec as readable YAML that loads back to the same spec.

    Keys in the natural order (spec_version, name, description, inputs, outputs,
    models, agents, tools, workflow, budgets; in steps: id, kind, ..., out),
    multi-line strings as `|` blocks, and `header` as leading comment lines.
    """
    want = spec_hash(spec)
    for minimal in (True, False):
        text = _dump(_spec_data(spec, minimal=minimal), header)
        report = validate_text(text)
        if report.spec is not None and spec_hash(report.spec) == want:
            return text
    raise ValueError("the spec does not survive a YAML round trip (please report this)")


def write_spec_yaml(spec: Spec, path: Path | str, *, header: str | None = None) -> str:
    """Write `spec` as YAML to `path` atomically; returns the text written."""
    text = spec_to_yaml(spec, header=header)
    write_text_atomic(Path(path), text)
    return text
