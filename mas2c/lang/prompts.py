"""The built-in prompts: every fixed instruction text a compiled package sends to a model.

The runtime holds none of this text. The compiler writes the table below, with the spec's
`prompts:` overrides applied, into the package's `_tables.py` as `PROMPTS` (one visible
literal per prompt, a `# spec: /prompts/<name>` comment on each overridden one), and the
runtime fills a prompt's `{{ slot }}`s from that table when it needs it.

A prompt's slots are the only placeholders it may use (`{{ task }}`, `{{ candidates }}`,
...; filters such as `| json` apply as in step prompts); the validator reports any other
(MAS311) and warns when an override drops the slot that carries the prompt's data (MAS907).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class BuiltinPrompt:
    """One built-in prompt: its default text, its slots (name -> meaning), the slots an
    override should keep (the data the prompt carries), and when the runtime sends it."""

    text: str
    slots: dict[str, str]
    carries: tuple[str, ...]
    used: str


_CODE_BLOCK = "Reply with the complete program in one ```python code block."

BUILTIN_PROMPTS: dict[str, BuiltinPrompt] = {
    "judge": BuiltinPrompt(
        "Task:\n{{ task }}\n\nCandidate answers:\n\n{{ candidates }}\n\n"
        "Weigh the candidates and give the best-supported final answer.",
        {
            "task": "the step's rendered prompt (ensemble) or topic (debate)",
            "candidates": "the answers, numbered and labelled",
        },
        ("candidates",),
        "the judge's turn closing an ensemble or a debate with `judge:`",
    ),
    "candidate_label": BuiltinPrompt(
        "candidate {{ number }}",
        {"number": "the sample's number, from 1"},
        (),
        "the label of each ensemble answer in the judge's `candidates`",
    ),
    "flow_task": BuiltinPrompt(
        "Run flow '{{ flow }}' on:\n{{ arguments }}",
        {"flow": "the flow's name", "arguments": "its arguments, one `- name: value` line each"},
        ("arguments",),
        "the judge's `task` of an ensemble over a flow that has no `prompt`",
    ),
    "debater_label": BuiltinPrompt(
        "agent {{ number }} ({{ agent }})",
        {"number": "the debater's number, from 1", "agent": "the debater's agent id"},
        (),
        "the label of each debater's answer in `candidates` and `others`",
    ),
    "debate_revision": BuiltinPrompt(
        "{{ task }}\n\nYour previous answer:\n{{ previous }}\n\n"
        "The other agents answered:\n\n{{ others }}\n\n"
        "Consider their reasoning, then give your revised answer.",
        {
            "task": "the debate's rendered topic",
            "previous": "this debater's answer of the last round",
            "others": "the other debaters' answers, numbered and labelled",
        },
        ("others",),
        "each debater's turn from the second round on",
    ),
    "programmer": BuiltinPrompt(
        "{{ task }}\n\n" + _CODE_BLOCK,
        {"task": "the step's rendered prompt"},
        ("task",),
        "a `programmer` step's first attempt",
    ),
    "programmer_repair": BuiltinPrompt(
        "{{ task }}\n\nYour previous program:\n```python\n{{ code }}\n```\n"
        "It failed (exit code {{ exit_code }}) with this output:\n```\n{{ output }}\n```\n"
        "Fix it. " + _CODE_BLOCK,
        {
            "task": "the step's rendered prompt",
            "code": "the program that failed",
            "exit_code": "its exit code",
            "output": "what it printed (stdout and stderr, long output cut in the middle)",
        },
        ("output",),
        "a `programmer` step's later attempts, after a failed run",
    ),
    "format_repair": BuiltinPrompt(
        "Your last answer is not valid for the output schema: {{ error }}. "
        "Reply with only the corrected JSON.",
        {"error": "what is wrong with the answer"},
        ("error",),
        "an agent with an output schema answered something that does not match it",
    ),
    "format_reminder": BuiltinPrompt(
        "Reply with one JSON object that matches this JSON Schema:\n{{ schema }}",
        {"schema": "the agent's output schema (indented JSON)"},
        ("schema",),
        "appended to the system prompt of an agent with an output schema when the endpoint "
        "has JSON-object mode only (no schema in `response_format`)",
    ),
    "final_answer": BuiltinPrompt(
        "No more tool calls: give your final answer now.",
        {},
        (),
        "an agent with tools reached `max_tool_rounds`",
    ),
}


def _description(name: str) -> str:
    prompt = BUILTIN_PROMPTS[name]
    slots = ", ".join(f"{{{{ {slot} }}}} ({meaning})" for slot, meaning in prompt.slots.items())
    return f"Used for {prompt.used}. Slots: {slots or 'none'}. Default: {prompt.text!r}"


class Prompts(BaseModel):
    """The spec's `prompts:`: overrides of the built-in prompts the runtime sends (one
    optional text per prompt of BUILTIN_PROMPTS; unknown names are errors, like every
    misspelt key)."""

    model_config = ConfigDict(extra="forbid")

    judge: str | None = Field(None, description=_description("judge"))
    candidate_label: str | None = Field(None, description=_description("candidate_label"))
    flow_task: str | None = Field(None, description=_description("flow_task"))
    debater_label: str | None = Field(None, description=_description("debater_label"))
    debate_revision: str | None = Field(None, description=_description("debate_revision"))
    programmer: str | None = Field(None, description=_description("programmer"))
    programmer_repair: str | None = Field(None, description=_description("programmer_repair"))
    format_repair: str | None = Field(None, description=_description("format_repair"))
    format_reminder: str | None = Field(None, description=_description("format_reminder"))
    final_answer: str | None = Field(None, description=_description("final_answer"))


def effective_prompts(overrides: Prompts | None) -> dict[str, tuple[str, bool]]:
    """Every built-in prompt's text for a spec: name -> (text, overridden by the spec)."""
    given = overrides.model_dump(exclude_none=True) if overrides is not None else {}
    return {
        name: (given[name], True) if name in given else (prompt.text, False)
        for name, prompt in BUILTIN_PROMPTS.items()
    }
