"""Dynamic delegation at run time: agents as tools, and an agent chosen by a state value.

Part of the runtime of a package compiled by mas2c; shipped only with packages whose
spec has an agent with ``delegates`` or a ``call`` step choosing among ``agents``.

- A manager's workers are offered to it as function tools, one per worker, named like
  the worker and described by its role. A worker's call is one turn of the worker on
  the task the manager wrote, under the run's budgets, traced as a ``tool_call`` span
  (``worker`` set) whose children are the worker's own ``llm_call`` spans.
- A ``call`` step with ``agents`` names its agent by a placeholder; a value outside the
  set is the error ``agent_choice`` at the step's ``agent``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ._runtime import (
    _LABELS,
    _SPAN,
    _STEP,
    AgentDef,
    BudgetExceeded,
    Run,
    StepTimeout,
    WorkflowError,
    _content,
    _open_span,
    _traced_error,
    _where,
    resolve_value,
)
from ._values import as_text

__all__ = ["AgentChoiceError", "call_chosen", "delegate", "worker_tools"]


class AgentChoiceError(WorkflowError):
    """The state value choosing a step's agent names none of its ``agents``."""

    code = "agent_choice"


def worker_tools(run: Run, manager: AgentDef) -> list[dict[str, Any]]:
    """The function tools that stand for a manager's workers."""
    tools = []
    for worker_id in manager.delegates:
        worker = run.agents[worker_id]
        about = worker.role.strip()
        first = worker.instructions.strip().splitlines()[:1]
        description = f"Ask the {about} (agent {worker_id!r})" + (
            f": {first[0]}" if first else "."
        )
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": worker_id,
                    "description": description[:1000],
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "task": {
                                "type": "string",
                                "description": "What the worker should do, with everything it needs to know.",
                            }
                        },
                        "required": ["task"],
                    },
                },
            }
        )
    return tools


async def delegate(
    run: Run, manager: AgentDef, worker_id: str, arguments: str | None
) -> str:
    """One worker call on the manager's ``task``: the worker's answer as text (errors
    go back to the manager as text; budgets and timeouts end the run)."""
    span = _open_span(run.trace)
    token = _SPAN.set(span.span_id)  # the worker's LLM calls are children of this span
    status, error, content = "error", None, ""
    args: Any = None
    try:
        try:
            args = json.loads(arguments or "{}")
        except ValueError:
            args = None
        task = args.get("task") if isinstance(args, dict) else None
        if not isinstance(task, str) or not task.strip():
            raise WorkflowError('a worker call needs {"task": "<what to do>"}')
        content = as_text(await run.turn(worker_id, task))
        status = "ok"
    except (BudgetExceeded, StepTimeout):
        raise
    except Exception as exc:  # reported to the manager, which may recover
        content = f"error: {type(exc).__name__}: {exc}"[:507]
        error = _traced_error(exc, run.trace.content)
    finally:
        _SPAN.reset(token)
        extra: dict[str, Any] = {}
        if run.trace.content:
            extra["arguments"] = _content(
                args if isinstance(args, dict) else (arguments or "")
            )
            if status == "ok":
                extra["result"] = _content(content)
        run.trace.emit(
            "tool_call",
            tool=worker_id,
            worker=worker_id,
            agent=manager.id,
            status=status,
            duration_s=span.duration(),
            **span.fields(),
            **({"error": error} if error else {}),
            **(_LABELS.get() or {}),
            **extra,
            **_where(),
        )
    return content


async def call_chosen(
    run: Run,
    choice: str,
    agents: Sequence[str],
    prompt: str,
    *,
    history: str | None = None,
) -> Any:
    """``call`` step whose agent a state value names (``choice``, a whole placeholder)."""
    chosen = resolve_value(choice, run.state)
    if not isinstance(chosen, str) or chosen not in agents:
        where = _STEP.get()
        raise AgentChoiceError(
            f"the agent chosen by {choice.strip()!r} is {chosen!r}, not one of "
            f"{', '.join(agents)}",
            spec_pointer=f"{where[1]}/agent" if where else None,
        )
    return await run.call(chosen, prompt, history=history)
