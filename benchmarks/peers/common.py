"""The benchmark topologies and their prompts, shared by every implementation.

Standard library only: the peer programs import it from their own virtual environments
(langgraph, autogen, plain openai), and bench_overhead.py imports it to know how many
LLM calls each topology makes and how deep its critical path is.

Every program reads OPENAI_BASE_URL and OPENAI_API_KEY from the environment, runs one
topology against the loopback test server and exits 0; the server counts the calls.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL = "gpt-4o-mini"
QUESTION = "A train leaves at 9:00 and travels 420 km at 84 km/h. When does it arrive?"

SAMPLER = "You are a careful problem solver. Think step by step; end with 'ANSWER: <value>'."
JUDGE = "You are a judge. Pick the best-supported final answer; end with 'ANSWER: <value>'."
DEBATER = (
    "You are a debater. Argue for your answer, consider the others; end with 'ANSWER: <value>'."
)
WRITER = "You are an editor. Improve the draft you are given and return the improved text."
WORKER = "You are a worker. Answer the sub-question briefly."

SC_WIDTH = 8
DEBATE_AGENTS = 3
DEBATE_ROUNDS = 3
CHAIN_STEPS = 20
FANOUT_WIDTH = 50


@dataclass(frozen=True)
class Topology:
    name: str
    title: str
    calls: int
    depth: int  # LLM calls on the critical path


def topology(name: str, width: int | None = None) -> Topology:
    """The topology `name`; `fanout` takes any `width` (default 50)."""
    if name == "sc":
        return Topology("sc", f"{SC_WIDTH}-way self-consistency + judge", SC_WIDTH + 1, 2)
    if name == "debate":
        calls = DEBATE_AGENTS * DEBATE_ROUNDS + 1
        title = f"{DEBATE_AGENTS} agents x {DEBATE_ROUNDS} debate rounds + judge"
        return Topology("debate", title, calls, DEBATE_ROUNDS + 1)
    if name == "chain":
        return Topology("chain", f"{CHAIN_STEPS}-step sequential chain", CHAIN_STEPS, CHAIN_STEPS)
    if name == "fanout":
        n = FANOUT_WIDTH if width is None else width
        return Topology("fanout", f"{n}-way parallel fan-out", n, 1)
    raise ValueError(f"unknown topology {name!r}")


TOPOLOGIES = ("sc", "debate", "chain", "fanout")


def judge_prompt(task: str, answers: list[str]) -> str:
    listed = "\n\n".join(f"candidate {i}: {a}" for i, a in enumerate(answers, 1))
    return (
        f"Task:\n{task}\n\nCandidate answers:\n\n{listed}\n\nGive the best-supported final answer."
    )


def revision_prompt(task: str, answers: list[str], me: int) -> str:
    others = "\n\n".join(f"agent {i + 1}: {a}" for i, a in enumerate(answers) if i != me)
    return (
        f"{task}\n\nYour previous answer:\n{answers[me]}\n\nThe other agents answered:\n\n"
        f"{others}\n\nConsider their reasoning, then give your revised answer."
    )


def chain_prompt(step: int, draft: str) -> str:
    return f"Step {step + 1}. Improve this draft:\n{draft}"


def worker_prompt(i: int) -> str:
    return f"Sub-question {i + 1} of the task: {QUESTION}"
