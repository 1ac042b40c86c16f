"""Flows (named sub-workflows) at run time: a call with its own state, and n samples.

Part of the runtime of a package compiled by mas2c; shipped only with packages whose
spec runs a flow (the step kinds' ``RUNTIME_MODULES``). A flow is a generated class
(``workflow.py``) with ``NAME``, ``POINTER``, ``INPUTS`` (name -> JSON Schema) and
``OUTPUTS`` (name -> state path). It sees only its inputs: its state starts as the
arguments (checked against ``INPUTS``, defaults filled in) and is its own, also when n
samples of it run concurrently; its result is the object of its ``OUTPUTS``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Protocol

from ._runtime import (
    _STEP,
    Run,
    WorkflowError,
    _labelled,
    lookup,
    render,
    resolve_value,
    state_scope,
)
from ._values import as_text, input_problems

__all__ = ["FlowInputError", "flow_ensemble", "run_flow"]


class FlowInputError(WorkflowError):
    """A flow's arguments do not fit its inputs (a value of the wrong type at run time)."""

    code = "flow_input"


class FlowClass(Protocol):
    NAME: str
    POINTER: str
    INPUTS: dict[str, Any]
    OUTPUTS: dict[str, str]

    def __call__(self, run: Run) -> Any: ...


def flow_arguments(
    flow: FlowClass, args: Mapping[str, Any], state: Mapping[str, Any]
) -> dict[str, Any]:
    """The flow's initial state: ``args`` resolved in the caller's state (a whole
    placeholder passes the value), checked against the flow's inputs, defaults filled.
    """
    given = copy.deepcopy(resolve_value(dict(args), state))
    problems = input_problems(given, flow.INPUTS)
    if problems:
        current = _STEP.get()
        where = problems[0][0]  # /inputs/<name>[/...]: the argument at fault
        name = where.split("/")[2] if where.count("/") >= 2 else ""
        raise FlowInputError(
            f"flow {flow.NAME!r}: " + "; ".join(m for _, m in problems),
            spec_pointer=(
                f"{current[1]}/with/{name}" if current and name else flow.POINTER
            ),
        )
    return {
        name: given[name] if name in given else copy.deepcopy(schema["default"])
        for name, schema in flow.INPUTS.items()
    }


async def run_flow(
    run: Run, flow: FlowClass, args: Mapping[str, Any]
) -> dict[str, Any]:
    """``subflow`` step: run ``flow`` on its own state; the object of its outputs."""
    return await _run_on(run, flow, flow_arguments(flow, args, run.state))


async def _run_on(run: Run, flow: FlowClass, state: dict[str, Any]) -> dict[str, Any]:
    with state_scope(state):
        await flow(run).run_flow()
    return {name: lookup(state, path) for name, path in flow.OUTPUTS.items()}


async def flow_ensemble(
    run: Run,
    flow: FlowClass,
    args: Mapping[str, Any],
    *,
    n: int,
    task: str | None = None,
    vote: str | None = None,
    judge: str | None = None,
    vote_on: str | None = "answer",
) -> Any:
    """``ensemble`` over a flow: n runs of it concurrently, each on its own state, then
    a vote on one of its outputs or a judge's turn."""
    state = flow_arguments(
        flow, args, run.state
    )  # checked once, before any sample runs
    if task is None:
        arguments = [f"- {name}: {as_text(value)}" for name, value in state.items()]
        task = run.prompt("flow_task", flow=flow.NAME, arguments="\n".join(arguments))
    else:
        task = render(task, run.state)
    samples = [_run_on(run, flow, copy.deepcopy(state)) for _ in range(n)]
    answers = await run.gather(*(_labelled(s, sample=i) for i, s in enumerate(samples)))
    labels = [run.prompt("candidate_label", number=i) for i in range(1, n + 1)]
    return await run._decide(
        "ensemble", task, answers, labels, vote=vote, judge=judge, vote_on=vote_on
    )
