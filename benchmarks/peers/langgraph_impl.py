"""The topologies as LangGraph graphs (langgraph + langchain-openai, the idiomatic pair).

    python langgraph_impl.py --topology sc|debate|chain|fanout [--width N]

Fan-outs use the Send API (map-reduce branches run concurrently in one superstep);
a debate round is three Sends, a node advances the round; the chain is 20 nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
from typing import Annotated, Any, TypedDict

from common import (
    CHAIN_STEPS,
    DEBATE_AGENTS,
    DEBATE_ROUNDS,
    DEBATER,
    JUDGE,
    MODEL,
    QUESTION,
    SAMPLER,
    SC_WIDTH,
    WORKER,
    WRITER,
    chain_prompt,
    judge_prompt,
    revision_prompt,
    topology,
    worker_prompt,
)
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

llm = ChatOpenAI(model=MODEL, max_retries=0)  # OPENAI_BASE_URL, OPENAI_API_KEY from the env


async def ask(system: str, prompt: str) -> str:
    reply = await llm.ainvoke([SystemMessage(system), HumanMessage(prompt)])
    return str(reply.content)


def merge(a: dict[str, str], b: dict[str, str]) -> dict[str, str]:
    return {**a, **b}


# -- self-consistency ---------------------------------------------------------------------------


class SCState(TypedDict, total=False):
    samples: Annotated[list[str], operator.add]
    verdict: str


def sc_graph() -> Any:
    async def sample(_: dict[str, Any]) -> dict[str, Any]:
        return {"samples": [await ask(SAMPLER, QUESTION)]}

    async def judge(state: SCState) -> dict[str, Any]:
        return {"verdict": await ask(JUDGE, judge_prompt(QUESTION, state["samples"]))}

    g = StateGraph(SCState)
    g.add_node("sample", sample)
    g.add_node("judge", judge)
    g.add_conditional_edges(
        START, lambda s: [Send("sample", {}) for _ in range(SC_WIDTH)], ["sample"]
    )
    g.add_edge("sample", "judge")
    g.add_edge("judge", END)
    return g.compile()


# -- debate -------------------------------------------------------------------------------------


class DebateState(TypedDict, total=False):
    answers: Annotated[dict[str, str], merge]
    round: int
    verdict: str


def _round_answers(state: DebateState, r: int) -> list[str]:
    return [state["answers"][f"{r}:{i}"] for i in range(DEBATE_AGENTS)]


def _dispatch(state: DebateState) -> Any:
    r = state.get("round", 0)
    if r >= DEBATE_ROUNDS:
        return "judge"
    if r == 0:
        prompts = [QUESTION] * DEBATE_AGENTS
    else:
        previous = _round_answers(state, r - 1)
        prompts = [revision_prompt(QUESTION, previous, i) for i in range(DEBATE_AGENTS)]
    return [Send("debater", {"round": r, "idx": i, "prompt": p}) for i, p in enumerate(prompts)]


def debate_graph() -> Any:
    async def debater(task: dict[str, Any]) -> dict[str, Any]:
        return {"answers": {f"{task['round']}:{task['idx']}": await ask(DEBATER, task["prompt"])}}

    def advance(state: DebateState) -> dict[str, Any]:
        return {"round": state.get("round", 0) + 1}

    async def judge(state: DebateState) -> dict[str, Any]:
        answers = _round_answers(state, DEBATE_ROUNDS - 1)
        return {"verdict": await ask(JUDGE, judge_prompt(QUESTION, answers))}

    g = StateGraph(DebateState)
    g.add_node("debater", debater)
    g.add_node("advance", advance)
    g.add_node("judge", judge)
    g.add_conditional_edges(START, _dispatch, ["debater", "judge"])
    g.add_edge("debater", "advance")
    g.add_conditional_edges("advance", _dispatch, ["debater", "judge"])
    g.add_edge("judge", END)
    return g.compile()


# -- chain --------------------------------------------------------------------------------------


class ChainState(TypedDict):
    draft: str


def chain_graph() -> Any:
    def make(step: int) -> Any:
        async def node(state: ChainState) -> dict[str, Any]:
            return {"draft": await ask(WRITER, chain_prompt(step, state["draft"]))}

        return node

    g = StateGraph(ChainState)
    for step in range(CHAIN_STEPS):
        g.add_node(f"step_{step}", make(step))
        g.add_edge(START if step == 0 else f"step_{step - 1}", f"step_{step}")
    g.add_edge(f"step_{CHAIN_STEPS - 1}", END)
    return g.compile()


# -- fan-out ------------------------------------------------------------------------------------


class FanState(TypedDict, total=False):
    results: Annotated[list[str], operator.add]


def fanout_graph(n: int) -> Any:
    async def worker(task: dict[str, Any]) -> dict[str, Any]:
        return {"results": [await ask(WORKER, worker_prompt(task["i"]))]}

    g = StateGraph(FanState)
    g.add_node("worker", worker)
    g.add_conditional_edges(
        START, lambda s: [Send("worker", {"i": i}) for i in range(n)], ["worker"]
    )
    g.add_edge("worker", END)
    return g.compile()


async def main(name: str, width: int | None) -> None:
    config = {"recursion_limit": 200}
    if name == "sc":
        await sc_graph().ainvoke({"samples": []}, config)
    elif name == "debate":
        await debate_graph().ainvoke({"answers": {}, "round": 0}, config)
    elif name == "chain":
        await chain_graph().ainvoke({"draft": QUESTION}, config)
    elif name == "fanout":
        await fanout_graph(topology("fanout", width).calls).ainvoke({"results": []}, config)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--topology", required=True)
    parser.add_argument("--width", type=int)
    args = parser.parse_args()
    asyncio.run(main(args.topology, args.width))
