"""Tool execution of a compiled package: code tools, the ``python_exec`` builtin, tool
arguments checked against their schema, and the steps that run code (``tool``,
``programmer``, ``test``: a fresh interpreter per program, the test harness).

Shipped only with specs that use tools (an agent's ``tools``, a ``tool`` step) or run code
(``programmer``, ``test`` steps): the step kinds' ``RUNTIME_MODULES``, and agents with
tools. ``_runtime.Run`` calls in here for those steps; standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._runtime import (
    _LABELS,
    OUTPUT_CAP,
    Run,
    ToolCode,
    ToolDef,
    ToolError,
    WorkflowError,
    _cap,
    _content,
    _labelled,
    _open_span,
    _traced_error,
    _where,
    lookup,
    render,
    resolve_value,
)
from ._values import argument_problems, as_text, json_type

__all__ = [
    "execute",
    "extract_code",
    "invoke_tool",
    "programmer_step",
    "run_python",
    "test_step",
    "tool_code_location",
    "tool_step",
]

# ----------------------------------------------------------------------- the steps


async def tool_step(run: Run, name: str, args: Mapping[str, Any]) -> Any:
    """``tool`` step: call a tool directly with rendered arguments."""
    tool = run._tool(name)
    try:
        return await invoke_tool(run, tool, resolve_value(dict(args), run.state))
    except WorkflowError:
        raise
    except Exception as exc:
        where = run.spec.tool_code.get(name)
        pointer, line = tool_code_location(exc, tool, where)
        raise ToolError(
            f"tool {name!r} raised {type(exc).__name__}: {exc}",
            spec_pointer=pointer,
            spec_line=line,
        ) from exc


async def programmer_step(
    run: Run,
    agent: str,
    prompt: str,
    *,
    max_attempts: int = 3,
    timeout_s: float = 10.0,
    expect_output: bool = False,
) -> dict[str, Any]:
    """``programmer`` step: write code, run it, feed errors back; never raises on failure.

    An attempt passes when the program exits 0 and, with ``expect_output``, printed
    something on stdout: a program that exits 0 without printing its answer has not
    produced it (its repair prompt says so)."""
    task = render(prompt, run.state)
    code = ""
    result: dict[str, Any] = {"output": "", "exit_code": None}
    problem = ""
    attempt = 0
    for attempt in range(1, max_attempts + 1):
        if attempt == 1:
            request = run.prompt("programmer", task=task)
        else:
            request = run.prompt(
                "programmer_repair",
                task=task,
                code=code,
                exit_code=str(result["exit_code"]),
                output=result["output"] + problem,
            )
        answer = await _labelled(run.turn(agent, request), round=attempt)
        code = extract_code(answer if isinstance(answer, str) else _code_of(answer))
        result = await execute(run, code, timeout_s, watch_stdout=expect_output)
        problem = _attempt_problem(result, expect_output)
        if result["exit_code"] == 0 and not problem:
            break
    return {
        "code": code,
        "output": result["output"],
        "passed": result["exit_code"] == 0 and not problem,
        "attempts": attempt,
    }


def _attempt_problem(result: Mapping[str, Any], expect_output: bool) -> str:
    """Why a program that exited 0 has not passed ("" when it has): with
    ``expect_output``, it printed nothing (whitespace aside) on stdout."""
    if result["exit_code"] != 0 or not expect_output or result.get("printed"):
        return ""
    return (
        "\n[the program exited 0 but printed nothing on stdout: "
        "it must print its answer]"
    )


async def test_step(
    run: Run,
    code_path: str,
    tests: str | Sequence[str],
    *,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """``test`` step: the code in state (Markdown fences stripped, as ``programmer``
    does), then each test snippet in the same namespace, in one fresh interpreter.

    ``{passed, results: [{test, passed, error}], output}``: a snippet passed when the
    harness reports, after it ran to its end, that it raised nothing. An exit of any
    kind (``sys.exit(0)``, ``exit()``, ``quit()``, ``os._exit``) before that is a failure.
    """
    code = extract_code(_code_of(lookup(run.state, code_path)))
    snippets = _test_snippets(tests, run.state)
    nonce = f"@@mas2c-test-{random.getrandbits(64):016x}@@"
    result = await execute(run, _test_harness(code, snippets, nonce), timeout_s)
    return _test_results(snippets, result, nonce)


# ------------------------------------------------------------------------ tools


async def invoke_tool(
    run: Run, tool: ToolDef, args: Mapping[str, Any], agent: str | None = None
) -> Any:
    """Run a tool (a code tool in a daemon thread, or python_exec in a fresh interpreter)
    with its arguments checked against its parameter schema; traced as ``tool_call``."""
    span = _open_span(run.trace)
    status, error, result = "error", None, None
    try:
        _check_arguments(tool, args)
        if tool.builtin == "python_exec":
            result = await execute(run, str(args.get("code", "")), tool.timeout_s)
        elif tool.function is not None:
            result = await _run_code_tool(tool, tool.function, args)
        else:
            raise ToolError(
                f"tool {tool.name!r} has no implementation ({tool.builtin!r})"
            )
        status = "ok"
        return result
    except BaseException as exc:
        error = _traced_error(exc, run.trace.content)
        raise
    finally:
        content = {"arguments": _content(args)} if run.trace.content else {}
        if run.trace.content and status == "ok":
            content["result"] = _content(result)
        run.trace.emit(
            "tool_call",
            tool=tool.name,
            agent=agent,
            status=status,
            duration_s=span.duration(),
            **span.fields(),
            **({"error": error} if error else {}),
            **(_LABELS.get() or {}),
            **content,
            **_where(),
        )


# A JSON list given to a parameter annotated as one of these arrives as it (set[str] too).
_COLLECTIONS: dict[str, type] = {
    "set": set,
    "Set": set,
    "frozenset": frozenset,
    "FrozenSet": frozenset,
    "tuple": tuple,
    "Tuple": tuple,
}
_COLLECTION_NAME = re.compile(r"\s*(?:typing\.)?([A-Za-z]+)\s*(?:\[|$)")


def _collection_of(annotation: Any) -> type | None:
    """``set``, ``frozenset`` or ``tuple`` if a parameter's annotation is one of them
    (``set[int]``, ``typing.Tuple[int, int]``, also as a string), else None."""
    if isinstance(annotation, str):
        match = _COLLECTION_NAME.match(annotation)
        return _COLLECTIONS.get(match.group(1)) if match else None
    if annotation in (set, frozenset, tuple):
        return annotation  # type: ignore[no-any-return]
    origin = getattr(annotation, "__origin__", None)
    return origin if origin in (set, frozenset, tuple) else None


def python_arguments(
    tool: ToolDef, function: Callable[..., Any], args: Mapping[str, Any]
) -> dict[str, Any]:
    """The arguments as the tool's annotations ask: JSON has only lists, so a list given
    to a ``set``, ``frozenset`` or ``tuple`` parameter becomes one (``len`` of a
    ``set[str]`` counts distinct items, as the tool's author meant). Items a set cannot
    hold (lists, objects) are a ToolError naming the argument."""
    annotations = getattr(function, "__annotations__", None) or {}
    converted = dict(args)
    for name, value in args.items():
        kind = _collection_of(annotations.get(name))
        if kind is None or not isinstance(value, list):
            continue
        try:
            converted[name] = kind(value)
        except TypeError:
            raise ToolError(
                f"tool {tool.name!r}: argument {name!r}: a {kind.__name__} cannot hold "
                f"its items (lists and objects are not hashable)"
            ) from None
    return converted


async def _run_code_tool(
    tool: ToolDef, function: Callable[..., Any], args: Mapping[str, Any]
) -> Any:
    args = python_arguments(tool, function, args)
    try:
        async with asyncio.timeout(tool.timeout_s) as scope:
            return await _in_thread(function, args)
    except TimeoutError:
        if not scope.expired():
            raise  # the tool's own TimeoutError: an error inside its code
        raise ToolError(
            f"tool {tool.name!r} timed out after {tool.timeout_s} s",
            spec_pointer=f"/tools/{tool.name}",
            code="tool_timeout",
        ) from None


async def execute(
    run: Run, code: str, timeout_s: float | None, *, watch_stdout: bool = False
) -> dict[str, Any]:
    """``run_python``, traced as an ``exec`` event."""
    span = _open_span(run.trace)
    result = await run_python(code, timeout_s, watch_stdout=watch_stdout)
    run.trace.emit(
        "exec",
        exit_code=result["exit_code"],
        timed_out=result["timed_out"],
        duration_s=span.duration(),
        **span.fields(),
        **(_LABELS.get() or {}),
        **_where(),
    )
    return result


async def _in_thread(function: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    """Run a blocking tool in a daemon thread.

    A thread cannot be killed: after a timeout it may run on, but as a daemon it
    never keeps the process alive (``asyncio.to_thread`` would, at exit).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # timed out or cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (function(**kwargs), None)
        except BaseException as exc:
            outcome = (None, exc)
            if isinstance(exc, StopIteration) or not isinstance(exc, Exception):
                # A future cannot carry these (SystemExit would stop the event loop).
                wrapped = RuntimeError(f"the tool raised {type(exc).__name__}: {exc}")
                outcome = (None, wrapped.with_traceback(exc.__traceback__))
        with contextlib.suppress(RuntimeError):  # the loop may be closed by now
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name="mas2c-tool", daemon=True).start()
    return await future


def tool_code_location(
    exc: BaseException, tool: ToolDef, where: ToolCode | None
) -> tuple[str | None, int | None]:
    """(spec pointer, line inside the tool code) of the deepest frame in the tool's code.

    ``where`` (from the compiler's TOOL_CODE table) says which lines of the tool's module
    hold the spec's code verbatim, so the line inside the spec's code is a subtraction.
    """
    code = getattr(tool.function, "__code__", None)
    if code is None or where is None:
        return None, None
    lines = [
        f.lineno
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename == code.co_filename and f.lineno is not None
    ]
    inside = [line for line in lines if where.start <= line <= where.end]
    if not inside:
        return None, None
    return where.pointer, inside[-1] - where.start + 1


def _check_arguments(tool: ToolDef, args: Mapping[str, Any]) -> None:
    """Arguments against the tool's parameter schema (its function's annotations):
    a ToolError naming the argument and the expected type, never a TypeError from
    inside the tool."""
    problems = argument_problems(args, tool.parameters)
    if problems:
        raise ToolError(f"tool {tool.name!r}: {'; '.join(problems)}")


# ---------------------------------------------------------------- running code


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it spawned


async def run_python(
    code: str, timeout_s: float | None, *, watch_stdout: bool = False
) -> dict[str, Any]:
    """Run code in a fresh interpreter in a temp dir: {exit_code, output, timed_out}.

    ``output`` is stdout and stderr together. ``watch_stdout`` (the programmer step)
    reads the two on pipes of their own, merged as they arrive, and adds ``printed``:
    whether stdout held anything but whitespace (a program's answer is what it prints
    there). Otherwise they share one pipe, so their order is exact (the test harness).
    """
    # The API key has no business in model-written code.
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    with tempfile.TemporaryDirectory(prefix="mas2c-exec-") as tmp:
        script = Path(tmp) / "main.py"
        script.write_text(code, encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            str(script),
            cwd=tmp,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=(
                asyncio.subprocess.PIPE if watch_stdout else asyncio.subprocess.STDOUT
            ),
            start_new_session=True,  # its own process group, killed as a whole
        )
        chunks = bytearray()
        printed = False

        async def pump(stream: asyncio.StreamReader | None, is_stdout: bool) -> None:
            nonlocal printed
            if stream is None:
                return
            while chunk := await stream.read(65536):
                printed = printed or (is_stdout and bool(chunk.strip()))
                # Keep draining past the cap so that the child never blocks on a pipe.
                if len(chunks) < 4 * OUTPUT_CAP:
                    chunks.extend(chunk)

        timed_out = False
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    pump(proc.stdout, True), pump(proc.stderr, False), proc.wait()
                ),
                timeout_s,
            )
        except TimeoutError:
            timed_out = True
        finally:
            if proc.returncode is None or timed_out:
                _kill_group(proc)
                await proc.wait()
    output = _cap(chunks.decode("utf-8", errors="replace"))
    if timed_out:
        output += f"\n[timed out after {timeout_s} s]"
    result = {"exit_code": proc.returncode, "output": output, "timed_out": timed_out}
    return {**result, "printed": printed} if watch_stdout else result


def _test_snippets(tests: str | Sequence[str], state: Mapping[str, Any]) -> list[str]:
    """A test step's snippets: a string is one snippet (rendered as text, or the value of
    a whole placeholder: a string, or a list of strings); a list gives one each."""
    items = [tests] if isinstance(tests, str) else list(tests)
    snippets: list[str] = []
    for item in items:
        value = resolve_value(item, state)
        values = value if isinstance(value, list | tuple) else [value]
        for snippet in values:
            if not isinstance(snippet, str):
                raise WorkflowError(
                    f"a test must be Python source (a string), got {json_type(snippet)}"
                )
            snippets.append(snippet)
    return snippets


_HARNESS = """\
import os as _os, sys as _sys, json as _json, traceback as _tb
_g = {"__name__": "__main__", "__file__": __file__, "__builtins__": __builtins__}
def _flush():
    for stream in (_sys.stdout, _sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
def _report(index, passed, error, _nonce=NONCE):
    _flush()
    line = "\\n" + _nonce + _json.dumps({"index": index, "passed": passed, "error": error})
    _os.write(1, (line + "\\n").encode("utf-8"))
del NONCE
def _describe(exc):
    if isinstance(exc, SystemExit):
        return "SystemExit: the code exited (code %r) before the test finished" % (exc.code,)
    return "".join(_tb.format_exception_only(type(exc), exc)).strip()
def _outcome(exc):
    _flush()
    _tb.print_exception(type(exc), exc, exc.__traceback__.tb_next, file=_sys.__stderr__)
    return False, _describe(exc)
try:
    exec(compile(CODE, "<code under test>", "exec"), _g)
    _broken = None
except BaseException as _exc:
    _ok, _why = _outcome(_exc)
    _broken = None if _ok else "the code under test failed: " + _why
for _index, _test in enumerate(TESTS):
    if _broken is not None:
        _report(_index, False, _broken)
        continue
    try:
        exec(compile(_test, "<test %d>" % (_index + 1), "exec"), _g)
        _report(_index, True, None)
    except BaseException as _exc:
        _report(_index, *_outcome(_exc))
"""


def _test_harness(code: str, snippets: Sequence[str], nonce: str) -> str:
    """The program a test step runs: the code, then each snippet, each result on a
    line of its own marked with ``nonce`` (then stripped from the output)."""
    data = f"NONCE = {nonce!r}\nCODE = {code!r}\nTESTS = {list(snippets)!r}\n"
    return data + _HARNESS


def _test_results(
    snippets: Sequence[str], result: Mapping[str, Any], nonce: str
) -> dict[str, Any]:
    marked = re.compile("\n" + re.escape(nonce) + r"([^\n]*)\n")
    text = str(result["output"])
    reported: dict[int, dict[str, Any]] = {}
    for line in marked.findall(text):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            record = json.loads(line)
            reported[int(record["index"])] = record
    if result.get("timed_out"):
        missing = "not run: the tests timed out"
    else:
        missing = f"no result (the program exited with code {result['exit_code']})"
    results = []
    for index, snippet in enumerate(snippets):
        record = reported.get(index)
        passed = bool(record and record.get("passed") is True)
        error = None if passed else str((record or {}).get("error") or missing)
        results.append({"test": snippet, "passed": passed, "error": error})
    return {
        "passed": bool(results) and all(r["passed"] for r in results),
        "results": results,
        "output": marked.sub("", text),
    }


_PYTHON_BLOCK = re.compile(r"```[ \t]*(?:python|py)[ \t]*\r?\n(.*?)```", re.DOTALL)
_ANY_BLOCK = re.compile(r"```[^\n`]*\r?\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The first ```python block, else the first fenced block, else the whole text."""
    found = _PYTHON_BLOCK.search(text) or _ANY_BLOCK.search(text)
    return found.group(1) if found else text


def _code_of(value: Any) -> str:
    """Code held in state: a string, or an object with a ``code`` field."""
    if isinstance(value, Mapping) and "code" in value:
        return str(value["code"])
    return value if isinstance(value, str) else as_text(value)
