"""A toy step kind, `echo`, in one module (plus its template `echo.py.j2`).

`echo` renders a text with placeholders into a state variable, without any LLM call.
Its facts live on its model class; its emitter is one registration. Nothing else in
mas2c changes for it: validate, compile, graph and the generator's language text all
ask the registry (tests/test_step_registry.py shows it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from mas2c.compile import EmitContext, register_emitter, unregister_emitter
from mas2c.lang.spec import _Writes, register_step_kind, unregister_step_kind
from mas2c.pyemit import text_literal


class EchoStep(_Writes):
    kind: Literal["echo"]
    text: str

    LANGUAGE: ClassVar[str] = "renders `text` (placeholders allowed) into `out`; no LLM call."

    def templates(self) -> list[tuple[str, str]]:
        return [("text", self.text)]

    def out_schema(self, agents: Any) -> dict[str, Any]:
        return {"type": "string"}

    def summary(self) -> str:
        return f"`{self.id}`: render a text into `{self.out}`."

    def graph_detail(self) -> str:
        return "text"


def _view(step: EchoStep, pointer: str, emit: EmitContext) -> dict[str, Any]:
    return {"text": text_literal(step.text)}


def register() -> None:
    register_step_kind(EchoStep)
    register_emitter(
        "echo", "echo.py.j2", _view, helpers=("render",), template_dir=Path(__file__).parent
    )


def unregister() -> None:
    unregister_emitter("echo")
    unregister_step_kind("echo")
