"""The library API and the command line of a package compiled by mas2c.

This file is copied verbatim into every compiled package; the package's ``__init__.py``
binds it to its workflow (``SYSTEM = System(...)``) and exports::

    from mas2c_<name> import arun, run_sync, RunResult, RunError

    result = run_sync({"question": "What is 6 * 7?"}, max_llm_calls=5)
    if result.status == "ok":
        print(result.outputs)
    else:
        print(result.error.code, result.error.pointer, result.error.message)

Contract:

- ``await arun(inputs, ...)`` runs the workflow once and returns a ``RunResult``; a
  workflow failure (bad input, no credentials, an LLM or tool error, a budget, a timeout)
  is a result, never an exception. Only a programming error raises (``TypeError`` /
  ``ValueError`` for arguments of the wrong type or range). ``run_sync`` is the same in a
  fresh event loop (refused inside a running loop). Cancelling ``arun`` cancels the run.
- Client settings given as arguments override the environment; budgets given as
  arguments tighten the spec's (the smaller of both counts).
- Every call is isolated: its own client, state, budgets, usage, trace and checkpoints,
  so concurrent calls in one process share nothing but the code.
- ``RunResult.to_json()`` is exactly what the command line writes to ``out.json``;
  ``RunResult.exit_code`` its exit code (0 ok, 1 error, 2 bad input, 3 budget
  exceeded, 4 timeout, 130 interrupted).
- The command line (``python -m mas2c_<name>``, the console script) is a thin layer over
  the same run: arguments to options, ``out.json`` (or stdout with ``--output -``), the
  exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import openai

from . import _runtime
from ._accounting import Usage
from ._runtime import (
    _OUTCOMES,
    CHECKPOINT_ENV,
    CHECKPOINT_LOG_ENV,
    NO_CREDENTIALS,
    TRACE_CONTENT_ENV,
    TRACEPARENT_ENV,
    AgentDef,
    Budgets,
    CheckpointLog,
    InputError,
    ModelDef,
    NoCredentials,
    Run,
    SpecInfo,
    ToolDef,
    Trace,
    WorkflowError,
    _iso_now,
    _on_sigterm,
    check_inputs,
    checkpoint_dir,
    client_settings,
    error_report,
    load_checkpoints,
    lookup,
)

__all__ = [
    "ENVIRONMENT",
    "EXIT_CODES",
    "RunError",
    "RunResult",
    "Status",
    "System",
]

Status = Literal[
    "ok", "error", "bad_input", "budget_exceeded", "timeout", "interrupted"
]

#: status -> exit code of the command line.
EXIT_CODES: Mapping[str, int] = {
    "ok": 0,
    "error": 1,
    "bad_input": 2,
    "budget_exceeded": 3,
    "timeout": 4,
    "interrupted": 130,
}

#: Every environment variable the package reads, with what it does (shown by ``--help``
#: and in the generated README; tests check that the runtime reads no other).
ENVIRONMENT: tuple[tuple[str, str], ...] = (
    (
        "OPENAI_API_KEY",
        "API key of the LLM endpoint (required unless MAS2C_LLM_SOCKET is set)",
    ),
    (
        "OPENAI_BASE_URL",
        "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: OpenAI)",
    ),
    (
        "MAS2C_LLM_SOCKET",
        "unix socket of a mas2c LLM gateway: all LLM traffic goes through it, no key needed",
    ),
    ("MAS2C_LLM_TIMEOUT_S", "seconds one LLM request may take (default 120)"),
    (
        "MAS2C_MAX_ATTEMPTS",
        "attempts per LLM request on 408/409/429/5xx/timeouts, direct only (default 4)",
    ),
    (
        "MAS2C_RETRY_BASE_S",
        "first retry backoff in seconds, doubled per attempt (default 0.5)",
    ),
    (
        CHECKPOINT_ENV,
        "folder to resume from and save step checkpoints in (as --checkpoint-dir)",
    ),
    (
        CHECKPOINT_LOG_ENV,
        "file to write each step checkpoint to, one JSON line (as --checkpoint-log)",
    ),
    (
        TRACE_CONTENT_ENV,
        "1 = also trace prompts, completions and tool arguments (as --trace-content)",
    ),
    (TRACEPARENT_ENV, "W3C traceparent of a parent span: the run's trace joins it"),
)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RunError:
    """Why a run failed: the stable ``code`` (see the package README), a message, and the
    spec element at fault (``pointer``, a JSON pointer into the spec; ``line`` inside tool
    code), the step and agent ids when known, the exception type and its traceback."""

    code: str
    message: str
    pointer: str | None = None
    step: str | None = None
    agent: str | None = None
    line: int | None = None
    type: str = "WorkflowError"
    traceback: str = ""

    @classmethod
    def of(cls, exc: BaseException) -> RunError:
        report = error_report(exc)
        return cls(
            code=report["code"],
            message=report["message"],
            pointer=report["spec_pointer"],
            step=report["step"],
            agent=report["agent"],
            line=report["spec_line"],
            type=report["type"],
            traceback=report["traceback"],
        )

    def to_json(self) -> dict[str, Any]:
        """``out.json``'s ``error`` object."""
        return {
            "type": self.type,
            "code": self.code,
            "message": self.message,
            "spec_pointer": self.pointer,
            "spec_line": self.line,
            "step": self.step,
            "agent": self.agent,
            "traceback": self.traceback,
        }


@dataclass(frozen=True)
class RunResult:
    """One run's outcome: ``status``, the ``outputs`` (status ``ok``), the ``usage``
    (calls, tokens, cost; by agent and by model), the ``error`` (any other status) and
    ``warnings`` (e.g. a loop that ran out of iterations)."""

    status: Status
    outputs: dict[str, Any] | None
    usage: dict[str, Any]
    error: RunError | None = None
    warnings: tuple[dict[str, Any], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def exit_code(self) -> int:
        """The command line's exit code for this result."""
        return EXIT_CODES[self.status]

    def to_json(self) -> dict[str, Any]:
        """Exactly what ``out.json`` holds for this result."""
        data: dict[str, Any] = {"status": self.status}
        if self.error is None:
            data["outputs"] = self.outputs
        else:
            data["error"] = self.error.to_json()
        data["usage"] = self.usage
        if self.warnings:
            data["warnings"] = list(self.warnings)
        return data


def _failed(
    exc: BaseException, run: Run | None, warnings: list[dict[str, Any]]
) -> RunResult:
    status = next(s for t, s, _ in _OUTCOMES if isinstance(exc, t))
    usage = run.usage() if run is not None else Usage().as_dict()
    return RunResult(
        cast(Status, status), None, usage, RunError.of(exc), tuple(warnings)
    )


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Options:
    """One run's settings, checked and resolved."""

    budgets: Budgets
    base_url: str | None = None
    api_key: str | None = None
    llm_socket: str | None = None
    trace: str | os.PathLike[str] | None = None
    trace_content: bool = False
    on_event: Callable[[dict[str, Any]], None] | None = None
    checkpoints: Path | None = None  # where to resume from
    save_checkpoints: bool = False  # and whether to save new ones there
    checkpoint_log: str | None = None  # a JSONL file each new checkpoint is written to


def _tighter(spec: float | None, given: float | None) -> Any:
    if given is None:
        return spec
    return given if spec is None else min(spec, given)


def _budgets(
    spec: Budgets,
    max_llm_calls: int | None,
    max_total_tokens: int | None,
    max_cost_usd: float | None,
    timeout_s: float | None,
) -> Budgets:
    """The spec's budgets, tightened by the caller's (each the smaller of both)."""
    return Budgets(
        max_llm_calls=_tighter(spec.max_llm_calls, max_llm_calls),
        max_total_tokens=_tighter(spec.max_total_tokens, max_total_tokens),
        max_cost_usd=_tighter(spec.max_cost_usd, max_cost_usd),
        timeout_s=_tighter(spec.timeout_s, timeout_s),
    )


def _check_count(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_amount(name: str, value: Any, *, positive: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}"
        )


def _check_text(name: str, value: Any, *, path: bool = False) -> None:
    kinds: tuple[type, ...] = (str, os.PathLike) if path else (str,)
    if value is not None and not isinstance(value, kinds):
        wanted = "a str, a path" if path else "a str"
        raise TypeError(f"{name} must be {wanted} or None, got {type(value).__name__}")


def _check_arguments(inputs: Any, arguments: Mapping[str, Any]) -> None:
    """Programming errors only: wrong types or ranges raise; everything else is a result."""
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"inputs must be a mapping of input names to values, got {type(inputs).__name__}"
        )
    for name in ("base_url", "api_key"):
        _check_text(name, arguments[name])
    for name in ("llm_socket", "trace", "checkpoint_dir"):
        _check_text(name, arguments[name], path=True)
    for name in ("max_llm_calls", "max_total_tokens"):
        _check_count(name, arguments[name])
    _check_amount("max_cost_usd", arguments["max_cost_usd"])
    _check_amount("timeout_s", arguments["timeout_s"], positive=True)
    if arguments["on_event"] is not None and not callable(arguments["on_event"]):
        raise TypeError("on_event must be a callable taking one dict, or None")
    if arguments["trace_content"] is not None and not isinstance(
        arguments["trace_content"], bool
    ):
        raise TypeError("trace_content must be a bool or None")


# --------------------------------------------------------------------------- the system


@dataclass(frozen=True)
class System:
    """A compiled workflow with its spec facts: what ``arun``, ``run_sync`` and the
    command line run. The package's ``__init__.py`` makes the one instance, ``SYSTEM``.
    """

    workflow: Callable[[Run], Any]
    spec: SpecInfo
    agents: Mapping[str, AgentDef]
    models: Mapping[str, ModelDef]
    tools: Mapping[str, ToolDef]
    package: str = ""
    version: str = "0"
    compiled_by: str = "mas2c"
    example_input: Mapping[str, Any] | None = None
    # Whether the workflow has steps that call agents (from the compiler); a run that
    # calls an LLM without credentials fails before its first request either way.
    uses_llm: bool = True

    async def arun(
        self,
        inputs: Mapping[str, Any],
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        llm_socket: str | os.PathLike[str] | None = None,
        max_llm_calls: int | None = None,
        max_total_tokens: int | None = None,
        max_cost_usd: float | None = None,
        timeout_s: float | None = None,
        trace: str | os.PathLike[str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        trace_content: bool | None = None,
    ) -> RunResult:
        """Run the workflow once on ``inputs``; a failure is a result, never an exception.

        - ``base_url``, ``api_key``: the LLM endpoint (default ``OPENAI_BASE_URL``,
          ``OPENAI_API_KEY``); ``llm_socket``: a mas2c gateway's unix socket instead
          (default ``MAS2C_LLM_SOCKET``; a ``base_url`` argument wins over it).
        - ``max_llm_calls``, ``max_total_tokens``, ``max_cost_usd``, ``timeout_s``: tighten
          the spec's budgets (the smaller of both counts).
        - ``trace``: a JSONL trace file; ``on_event``: called with each trace event (a
          dict) as it is written, in order; one that raises is turned off and a warning
          added; ``trace_content``: also trace prompts and completions (default
          ``MAS2C_TRACE_CONTENT=1``).
        - ``checkpoint_dir``: resume from the step checkpoints there and save new ones
          (default: none).
        """
        arguments = dict(locals())
        del arguments["self"], arguments["inputs"]
        _check_arguments(inputs, arguments)
        content = trace_content
        if content is None:
            content = os.environ.get(TRACE_CONTENT_ENV) == "1"
        options = _Options(
            budgets=_budgets(
                self.spec.budgets,
                max_llm_calls,
                max_total_tokens,
                max_cost_usd,
                timeout_s,
            ),
            base_url=base_url,
            api_key=api_key,
            llm_socket=os.fspath(llm_socket) if llm_socket is not None else None,
            trace=trace,
            trace_content=content,
            on_event=on_event,
            checkpoints=Path(checkpoint_dir) if checkpoint_dir is not None else None,
            save_checkpoints=checkpoint_dir is not None,
        )
        return await _Session(self, options).execute(inputs)

    def run_sync(
        self,
        inputs: Mapping[str, Any],
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        llm_socket: str | os.PathLike[str] | None = None,
        max_llm_calls: int | None = None,
        max_total_tokens: int | None = None,
        max_cost_usd: float | None = None,
        timeout_s: float | None = None,
        trace: str | os.PathLike[str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        trace_content: bool | None = None,
    ) -> RunResult:
        """``arun`` in a fresh event loop, for code that is not async. Inside a running
        event loop (async code, Jupyter) it refuses: ``await arun(...)`` there."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "run_sync() cannot be called from a running event loop: use `await arun(...)`"
            )
        arguments = dict(locals())
        del arguments["self"]
        return asyncio.run(self.arun(**arguments))

    # ----------------------------------------------------------------------- CLI

    def main(
        self, argv: Sequence[str] | None = None, *, prog: str | None = None
    ) -> int:
        """The command line: run once, write the result (a file, or stdout with
        ``--output -``), return the exit code. ``serve ...``: the HTTP service (``_serve``).
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["serve"]:
            from ._serve import main as serve

            package = self.package or f"mas2c_{self.spec.name.replace('-', '_')}"
            return serve(self, argv[1:], f"{prog or 'python -m ' + package} serve")
        args = self._parser(prog).parse_args(argv)
        to_stdout = args.output == "-"
        saved_stdout = _stdout_to_stderr() if to_stdout else None
        session: _Session | None = None
        previous: Any = None
        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            session = _Session(self, self._cli_options(args))
            inputs = _read_input(args.input)
            result = asyncio.run(session.execute(inputs))
        except BaseException as exc:  # Ctrl-C or SIGTERM: out.json still says so
            run = session.run if session is not None else None
            result = _failed(exc, run, list(run.warnings) if run is not None else [])
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if result.error is not None:
            error = result.error
            at = f" (at {error.pointer})" if error.pointer else ""
            name = self.spec.name
            print(
                f"{name}: {result.status}: {error.type}: {error.message}{at}",
                file=sys.stderr,
            )
        return _write_result(result, args.output, saved_stdout)

    def _cli_options(self, args: argparse.Namespace) -> _Options:
        folder, explicit = checkpoint_dir(args.checkpoint_dir)
        content = args.trace_content or os.environ.get(TRACE_CONTENT_ENV) == "1"
        budgets = _budgets(
            self.spec.budgets,
            args.max_llm_calls,
            args.max_total_tokens,
            args.max_cost_usd,
            args.timeout_s,
        )
        return _Options(
            budgets=budgets,
            trace=args.trace,
            trace_content=content,
            checkpoints=folder,
            save_checkpoints=explicit,
            checkpoint_log=args.checkpoint_log or os.environ.get(CHECKPOINT_LOG_ENV),
        )

    def _parser(self, prog: str | None) -> argparse.ArgumentParser:
        package = self.package or f"mas2c_{self.spec.name.replace('-', '_')}"
        prog = prog or f"python -m {package}"
        parser = argparse.ArgumentParser(
            prog=prog,
            description=f"Run the {self.spec.name} multi-agent system (compiled by {self.compiled_by}).",
            epilog=self._epilog(prog),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "--version",
            action="version",
            version=f"{prog} {self.version} ({self.compiled_by}; spec {self.spec.name} sha256:{self.spec.sha256})",
        )
        parser.add_argument(
            "--input",
            metavar="FILE",
            help="JSON object of inputs ('-' = stdin; default: {})",
        )
        parser.add_argument(
            "--output",
            metavar="FILE",
            default="out.json",
            type=_output_file,
            help="result file ('-' = stdout; default: out.json; its folder must exist)",
        )
        parser.add_argument(
            "--trace", metavar="FILE", type=_trace_file, help="JSONL trace file"
        )
        parser.add_argument(
            "--trace-content",
            action="store_true",
            help=f"also trace prompts, completions and tool arguments (${TRACE_CONTENT_ENV}=1)",
        )
        parser.add_argument(
            "--checkpoint-dir",
            metavar="DIR",
            help=f"resume from (and save) step checkpoints in this folder (${CHECKPOINT_ENV})",
        )
        parser.add_argument(
            "--checkpoint-log",
            metavar="FILE",
            type=_trace_file,
            help="write each step checkpoint (the values it wrote) to this JSONL file "
            f"(${CHECKPOINT_LOG_ENV})",
        )
        budgets = parser.add_argument_group(
            "budgets (tighten the spec's; the smaller counts)"
        )
        b = self.spec.budgets
        for flag, metavar, kind, spec_value, what in (
            ("--max-llm-calls", "N", _count, b.max_llm_calls, "LLM calls"),
            ("--max-total-tokens", "N", _count, b.max_total_tokens, "tokens"),
            ("--max-cost-usd", "USD", _amount, b.max_cost_usd, "USD of cost"),
            ("--timeout-s", "S", _seconds, b.timeout_s, "seconds for the whole run"),
        ):
            limit = "none" if spec_value is None else f"{spec_value:g}"
            help_text = f"at most this many {what} (the spec's: {limit})"
            budgets.add_argument(flag, metavar=metavar, type=kind, help=help_text)
        return parser

    def _epilog(self, prog: str) -> str:
        width = max(len(name) for name, _ in ENVIRONMENT)
        lines = ["environment variables:"]
        lines += [f"  {name:<{width}}  {text}" for name, text in ENVIRONMENT]
        lines += [
            "",
            "exit codes: 0 done, 1 workflow error, 2 bad input or no LLM credentials,",
            "  3 budget exceeded, 4 timeout, 130 interrupted; the result always says why.",
            "",
            f"over HTTP: {prog} serve --help (needs the package's serve extra)",
        ]
        if self.example_input is not None:
            example = json.dumps(self.example_input, ensure_ascii=False)
            lines += [
                "",
                "example:",
                f"  echo {shlex.quote(example)} | {prog} --input - --output -",
            ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- one run


class _Session:
    """One run: trace, checks, the workflow, the result. Everything here is per call."""

    def __init__(self, system: System, options: _Options) -> None:
        self.system = system
        self.options = options
        self.run: Run | None = None
        self.trace = Trace(None)
        self.checkpoint_log: CheckpointLog | None = None

    async def execute(self, inputs: Any) -> RunResult:
        try:
            result = await self._execute(inputs)
        except Exception as exc:
            result = _failed(exc, self.run, self._warnings())
        except BaseException as exc:  # cancelled: close the trace, then let it through
            self._finish(_failed(exc, self.run, self._warnings()))
            raise
        self._finish(result)
        return result

    async def _execute(self, inputs: Any) -> RunResult:
        system, options = self.system, self.options
        self.trace = Trace(
            options.trace, content=options.trace_content, on_event=options.on_event
        )
        self._start()
        if options.checkpoint_log:
            self.checkpoint_log = CheckpointLog(options.checkpoint_log)
        settings = client_settings(
            base_url=options.base_url,
            api_key=options.api_key,
            socket=options.llm_socket,
        )
        run = self.run = Run(
            system.spec,
            system.agents,
            system.models,
            system.tools,
            trace=self.trace,
            checkpoints=load_checkpoints(options.checkpoints),
            checkpoint_out=options.checkpoints if options.save_checkpoints else None,
            checkpoint_log=self.checkpoint_log,
            budgets=options.budgets,
            client=settings,
        )
        if isinstance(inputs, _Unreadable):
            raise InputError(inputs.message)
        run.state.update(check_inputs(inputs, system.spec.inputs))
        if system.uses_llm and not settings.has_credentials:
            raise NoCredentials(NO_CREDENTIALS)
        await run.execute(system.workflow)
        outputs = {}
        for name, path in system.spec.outputs.items():
            try:
                outputs[name] = lookup(run.state, path)
            except WorkflowError as exc:
                exc.spec_pointer = f"/outputs/{name}"
                raise
        return RunResult("ok", outputs, run.usage(), None, tuple(self._warnings()))

    def _warnings(self) -> list[dict[str, Any]]:
        warnings = list(self.run.warnings) if self.run is not None else []
        if self.trace.callback_error is not None:
            message = f"on_event raised and was turned off: {self.trace.callback_error}"
            warnings.append({"type": "on_event_error", "message": message})
        return warnings

    def _start(self) -> None:
        trace, spec = self.trace, self.system.spec
        trace.emit(
            "run_start",
            spec=spec.name,
            sha256=spec.sha256,
            trace_id=trace.trace_id,
            span_id=trace.root_span,
            parent_id=trace.parent_span,
            started_at=_iso_now(),
            python=sys.version.split()[0],
            openai=getattr(openai, "__version__", None),
            trace_content=trace.content,
        )

    def _finish(self, result: RunResult) -> None:
        self.trace.emit(
            "run_end",
            status=result.status,
            exit_code=result.exit_code,
            usage=result.usage,
            span_id=self.trace.root_span,
        )
        self.trace.close()
        if self.checkpoint_log is not None:
            self.checkpoint_log.close()


# --------------------------------------------------------------------------- CLI helpers


def _read_input(path: str | None) -> Any:
    """The input document: a file, stdin (``-``), or ``{}`` when none is given."""
    try:
        if path is None:
            text = "{}"
        elif path == "-":
            text = sys.stdin.read()
        else:
            text = Path(path).read_text(encoding="utf-8")
        return json.loads(text)
    except (OSError, ValueError) as exc:
        return _Unreadable(f"cannot read the input {path!r}: {exc}")


class _Unreadable:
    """An input that could not be read: the run fails with bad_input, naming why."""

    def __init__(self, message: str) -> None:
        self.message = message


def _stdout_to_stderr() -> int:
    """With ``--output -`` stdout carries only the result: anything else written to file
    descriptor 1 during the run (a tool's print) goes to stderr. Returns the saved stdout.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    return saved


def _write_result(result: RunResult, output: str, saved_stdout: int | None) -> int:
    """Write the result document; the exit code (2 when it cannot be written)."""
    data = result.to_json()
    try:
        if saved_stdout is None:
            _runtime._write_json_atomic(Path(output), data, parents=False)
        else:
            text = json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n"
            sys.stdout.flush()
            os.dup2(saved_stdout, 1)
            os.close(saved_stdout)
            sys.stdout.write(text)
            sys.stdout.flush()
    except OSError as exc:  # BrokenPipeError included
        print(f"cannot write the result to {output!r}: {exc}", file=sys.stderr)
        return EXIT_CODES["bad_input"]
    return result.exit_code


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _amount(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _seconds(text: str) -> float:
    value = _amount(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _output_file(text: str) -> str:
    """``--output``: ``-`` (stdout) or a file whose folder exists, checked before the run
    (a run is not paid for to learn its result cannot be written); never a folder, and
    no folder is created. A symlink is judged by its target."""
    if text == "-":
        return text
    target = Path(os.path.realpath(text))
    if target.is_dir():
        raise argparse.ArgumentTypeError(
            f"cannot write the result to {text!r}: a folder"
        )
    if not target.parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"cannot write the result to {text!r}: the folder {str(target.parent)!r} "
            "does not exist (no folder is created)"
        )
    return text


def _trace_file(text: str) -> str:
    if text == "-":
        raise argparse.ArgumentTypeError(
            "'-' is not a trace file: stdout is only for the result"
        )
    return text
