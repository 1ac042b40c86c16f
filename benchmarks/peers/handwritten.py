"""The baseline: the topologies written by hand with asyncio and the openai client.

    python handwritten.py --topology sc|debate|chain|fanout [--width N]

What a careful programmer writes without a framework: one AsyncOpenAI client,
asyncio.gather for everything that can run at once.
"""

from __future__ import annotations

import argparse
import asyncio

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
from openai import AsyncOpenAI


async def main(name: str, width: int | None) -> None:
    client = AsyncOpenAI(max_retries=0)

    async def ask(system: str, prompt: str) -> str:
        response = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        )
        return response.choices[0].message.content or ""

    if name == "sc":
        samples = await asyncio.gather(*(ask(SAMPLER, QUESTION) for _ in range(SC_WIDTH)))
        await ask(JUDGE, judge_prompt(QUESTION, list(samples)))
    elif name == "debate":
        answers = list(
            await asyncio.gather(*(ask(DEBATER, QUESTION) for _ in range(DEBATE_AGENTS)))
        )
        for _ in range(DEBATE_ROUNDS - 1):
            prompts = [revision_prompt(QUESTION, answers, i) for i in range(DEBATE_AGENTS)]
            answers = list(await asyncio.gather(*(ask(DEBATER, p) for p in prompts)))
        await ask(JUDGE, judge_prompt(QUESTION, answers))
    elif name == "chain":
        draft = QUESTION
        for step in range(CHAIN_STEPS):
            draft = await ask(WRITER, chain_prompt(step, draft))
    elif name == "fanout":
        n = topology("fanout", width).calls
        await asyncio.gather(*(ask(WORKER, worker_prompt(i)) for i in range(n)))
    await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--topology", required=True)
    parser.add_argument("--width", type=int)
    args = parser.parse_args()
    asyncio.run(main(args.topology, args.width))
