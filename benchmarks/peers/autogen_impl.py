"""The topologies as AutoGen AgentChat programs (autogen-agentchat + autogen-ext[openai]).

    python autogen_impl.py --topology sc|debate|chain|fanout [--width N]

One AssistantAgent per sampler, debater, worker and chain step, sharing one
OpenAIChatCompletionClient. Concurrent turns run with asyncio.gather over
`agent.run(...)` (debaters keep their own history across rounds, as AgentChat
agents do); the sequential chain is a RoundRobinGroupChat of 20 agents, AgentChat's
own way to pass work along a line of agents.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_ext.models.openai import OpenAIChatCompletionClient
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
    judge_prompt,
    revision_prompt,
    topology,
    worker_prompt,
)


def last_text(result: object) -> str:
    return str(result.messages[-1].content)  # type: ignore[attr-defined]


async def main(name: str, width: int | None) -> None:
    client = OpenAIChatCompletionClient(
        model=MODEL,
        base_url=os.environ["OPENAI_BASE_URL"],
        api_key=os.environ.get("OPENAI_API_KEY", "test"),
        max_retries=0,
    )

    def agent(agent_name: str, system: str) -> AssistantAgent:
        return AssistantAgent(agent_name, model_client=client, system_message=system)

    if name == "sc":
        samplers = [agent(f"sampler_{i}", SAMPLER) for i in range(SC_WIDTH)]
        results = await asyncio.gather(*(a.run(task=QUESTION) for a in samplers))
        await agent("judge", JUDGE).run(
            task=judge_prompt(QUESTION, [last_text(r) for r in results])
        )
    elif name == "debate":
        debaters = [agent(f"debater_{i}", DEBATER) for i in range(DEBATE_AGENTS)]
        results = await asyncio.gather(*(a.run(task=QUESTION) for a in debaters))
        answers = [last_text(r) for r in results]
        for _ in range(DEBATE_ROUNDS - 1):
            results = await asyncio.gather(
                *(a.run(task=revision_prompt(QUESTION, answers, i)) for i, a in enumerate(debaters))
            )
            answers = [last_text(r) for r in results]
        await agent("judge", JUDGE).run(task=judge_prompt(QUESTION, answers))
    elif name == "chain":
        team = RoundRobinGroupChat(
            [agent(f"editor_{i}", WRITER) for i in range(CHAIN_STEPS)], max_turns=CHAIN_STEPS
        )
        await team.run(task=f"Improve this draft, one editor after the other:\n{QUESTION}")
    elif name == "fanout":
        n = topology("fanout", width).calls
        workers = [agent(f"worker_{i}", WORKER) for i in range(n)]
        await asyncio.gather(*(w.run(task=worker_prompt(i)) for i, w in enumerate(workers)))
    await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--topology", required=True)
    parser.add_argument("--width", type=int)
    args = parser.parse_args()
    asyncio.run(main(args.topology, args.width))
