"""Voting for ensembles and debates: what a vote compares, majority, first answer.

Part of the runtime of a package compiled by mas2c; shipped only with packages whose
spec has a step that votes (the step kinds' ``RUNTIME_MODULES``). Standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ._runtime import EmptyVote
from ._values import final_answer

__all__ = ["first_answer", "majority", "tally", "vote_key"]


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def vote_key(answer: Any, key: str | None = "answer") -> str | None:
    """What majority voting compares, normalised: the final answer, not the reasoning.

    - a structured answer: its ``key`` field (``answer`` unless the step says
      ``vote_on``); an answer without that field does not vote;
    - text (an agent's text answer, or the field's value, such as a flow's output
      holding one): the answer after its last ``answer:`` marker (``_values.final_answer``:
      also ``**Answer:** 42``, ``... so the ANSWER: 42``) if there is one, else the whole
      text; compared with runs of whitespace collapsed and case folded;
    - numbers by value (``4`` = ``4.0``, also inside lists and objects); anything else
      as canonical JSON.
    Only an empty answer does not vote (``None``): a JSON null, a missing field, or a
    string that is empty once whitespace is collapsed. The text ``"null"`` is an answer.
    """
    if isinstance(answer, Mapping):
        if key is None or key not in answer:
            return None
        answer = answer[key]
    if answer is None:
        return None
    if isinstance(answer, str):
        stated = final_answer(answer)
        return _normal(answer if stated is None else stated) or None
    return json.dumps(_numbers_by_value(answer), sort_keys=True, ensure_ascii=False)


def _numbers_by_value(value: Any) -> Any:
    """``value`` with every integral float as an int, so that ``[4.0]`` = ``[4]``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_numbers_by_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers_by_value(v) for k, v in value.items()}
    return value


def majority(
    answers: Sequence[Any], what: str = "vote", key: str | None = "answer"
) -> Any:
    """The plurality answer; ties go to the earliest sample. Empty answers don't vote."""
    return tally(answers, what, key)[0]


def tally(
    answers: Sequence[Any], what: str = "vote", key: str | None = "answer"
) -> tuple[Any, int, int]:
    """(the plurality answer, its votes, how many distinct answers have that many votes):
    more than one means a tie, which the earliest sample won. Empty answers don't vote.
    """
    counts: dict[str, int] = {}
    first: dict[str, Any] = {}
    for answer in answers:
        vote = vote_key(answer, key)
        if vote is None:
            continue
        counts[vote] = counts.get(vote, 0) + 1
        first.setdefault(vote, answer)
    if not counts:
        raise EmptyVote(
            f"{what}: every {'sample' if what == 'ensemble' else 'answer'} was empty"
        )
    best = max(counts.values())
    tied = sum(1 for n in counts.values() if n == best)
    # `counts` keeps first-seen order, so among tied values the earliest sample wins.
    return next(first[k] for k, n in counts.items() if n == best), best, tied


def first_answer(answers: Sequence[Any], key: str | None = "answer") -> Any:
    """``vote: first``: the first answer with a final answer, else the first non-empty one.

    Never fails: when every answer is empty, the first answer is returned as it is.
    """
    for answer in answers:
        if vote_key(answer, key) is not None:
            return answer
    for answer in answers:
        if answer not in (None, "", {}, []) and not (
            isinstance(answer, str) and not answer.strip()
        ):
            return answer
    return answers[0] if answers else None
