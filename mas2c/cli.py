"""The `mas2c` command line.

Contract (scripts first):

- Every verb takes ``--json``: stdout then carries exactly one JSON document, an
  object with ``"ok": true|false`` — also on failure, when it holds
  ``"error": {"code", "kind", "type", "message", "exit_code"}`` (see `mas2c.errors`).
  Human text, warnings and progress go to stderr; without ``--json`` stdout carries
  only the verb's result (outputs, a spec, a diagram, a diff).
- Exit codes, the same for every verb: 0 success, 1 the input is invalid or the work
  failed (``validate``/``diff``: 1 = invalid/different), 2 usage (bad flags, a missing
  file, an output the verb must not touch), 130 interrupted.
- ``-`` means stdin or stdout wherever a file is read or written (``--input -``,
  ``validate -``, ``-o -``).
- One handler: every error is a `mas2c.errors.Mas2cError` (or an OSError, reported as
  one), caught once in `main`; never a traceback.
- Lazy: each verb's modules are imported only when it runs. `mas2c --help` and
  `mas2c run BUILD_DIR` import neither the compiler (black, jinja2, libcst) nor the
  spec's pydantic models (asserted by tests/test_cli_contract.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from mas2c import __version__, argtypes
from mas2c.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    FileFailure,
    Interrupted,
    Mas2cError,
    UsageError,
    os_error_message,
    terminal_safe,
    write_error,
)

EXIT_INVALID = EXIT_FAILURE  # the older name, kept for scripts that import it

__all__ = ["EXIT_INVALID", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]
STDIO = "-"


# -- output ---------------------------------------------------------------------------------------


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _finish(args: argparse.Namespace, ok: bool, doc: dict[str, Any], text: str = "") -> int:
    """The verb's one result: the JSON document (`--json`) or `text` on stdout."""
    if getattr(args, "json", False):
        _print_json({"ok": ok, **doc})
    elif text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK if ok else EXIT_FAILURE


def _say(message: str) -> None:
    message = terminal_safe(message)
    sys.stderr.write(message if message.endswith("\n") else message + "\n")


def _warn(message: str) -> None:
    sys.stderr.write(f"mas2c: warning: {terminal_safe(message)}\n")


def _renamed(flag: str, old: dict[str, str]) -> Callable[[str], str]:
    """An argparse `type` accepting the old spelling of a value (one version, with a warning
    on stderr): "local" named three things; each now has its own name (CHANGELOG.md)."""

    def parse(value: str) -> str:
        if value in old:
            _warn(
                f"{flag} {value} is deprecated: use {flag} {old[value]} "
                "(the old spelling goes in the next version)"
            )
            return old[value]
        return value

    return parse


_SANDBOX_FLAG = _renamed("--sandbox", {"local": "unisolated"})
_ENGINE_FLAG = _renamed("--engine", {"local": "threads"})
_LLM_FLAG = _renamed("--llm", {"local": "embedded"})


# The numeric flag types (mas2c.argtypes), under the names this module has always used.
_positive, _count, _positive_int = argtypes.positive, argtypes.count, argtypes.positive_int


def _progress(message: str) -> None:
    sys.stderr.write(f"mas2c: {terminal_safe(message)}\n")
    sys.stderr.flush()


# -- reading and writing the user's files ---------------------------------------------------------


def _existing(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file or directory")
    return p


def _readable_file(path: str, what: str = "file") -> Path:
    p = _existing(path)
    if p.is_dir():
        raise UsageError(f"{path}: is a folder, expected a {what}")
    return p


#: The temp files stdin was spooled into (`_input_file`): messages say <stdin> instead.
_SPOOLED: set[str] = set()


def _stdin_named(text: str) -> str:
    for path in _SPOOLED:
        text = text.replace(path, "<stdin>")
    return text


@contextmanager
def _input_file(path: str, what: str = "input file", name: str = "stdin.json") -> Iterator[Path]:
    """A path to read: the file itself, or (for `-`) stdin spooled into a private temp file
    called `name` (`stdin.yaml` for a spec: YAML reads JSON too)."""
    if path != STDIO:
        yield _readable_file(path, what)
        return
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mas2c-stdin-"))
    try:
        spooled = folder / name
        _SPOOLED.add(str(spooled))  # an error names it as <stdin> (`_fail`), not the temp path
        spooled.write_bytes(sys.stdin.buffer.read())
        yield spooled
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _optional_spec(stack: contextlib.ExitStack[Any], path: str | None) -> Path | None:
    """`--spec` as a file to read (`-`: stdin, spooled until `stack` closes), or None."""
    return stack.enter_context(_input_file(path, "spec file", "stdin.yaml")) if path else None


def _check_output_file(path: str | None) -> None:
    """Refuse, before any work (an LLM conversation costs money), an `-o FILE` that cannot
    be written: a folder, or a file in a folder that does not exist (`-`/None: stdout)."""
    if path not in (None, STDIO):
        problem = _output_problem(path)
        if problem:
            raise UsageError(f"cannot write {path}: {problem}")


def _output_problem(path: str) -> str | None:
    """Why `-o path` cannot be written as a file, or None. A symlink is judged by its
    target (the file a write goes to)."""
    target = Path(os.path.realpath(path))
    if target.is_dir():
        return "is a folder"
    if not target.parent.is_dir():
        return f"the folder {target.parent} does not exist (mas2c creates no folders for -o FILE)"
    return None


def _one_stdin(*values: str | None) -> None:
    """At most one of a verb's file arguments may be `-`: stdin can be read only once."""
    if sum(v == STDIO for v in values) > 1:
        raise UsageError("stdin (-) can be read only once: give the other inputs as files")


def _write_user_file(path: str, text: str) -> str | None:
    """Write `text` to the file the user named (`-`: stdout), atomically, creating no folder.

    Returns the path written, or None for stdout.
    """
    if path == STDIO:
        sys.stdout.write(text)
        return None
    from mas2c.files import write_text_atomic

    _check_output_file(path)
    try:
        write_text_atomic(Path(path), text, parents=False, user_file=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    return path


def _load(path_text: str) -> Any:
    """A valid spec (`-`: read from stdin), or `SpecInvalid` with every problem."""
    return _load_with_text(path_text)[0]


def _load_with_text(path_text: str) -> tuple[Any, str | None]:
    """`_load`, and for stdin the text read (to edit it as a round trip; a file is reread)."""
    from mas2c.lang.validate import SpecInvalid, load_spec, validate_bytes

    if path_text == STDIO:
        raw = _stdin_spec_bytes()
        report = validate_bytes(raw)
        if report.spec is None or not report.ok:
            raise SpecInvalid(report)
        return report.spec, raw.decode("utf-8")  # valid, so UTF-8; CRLF line ends kept
    path = _readable_file(path_text, "spec file")
    try:
        return load_spec(path), None
    except OSError as exc:
        raise UsageError(f"{path_text}: {exc.strerror or exc}") from None


def _stdin_spec_bytes() -> bytes:
    """A spec on stdin, as bytes: at most one byte past the spec size limit is read, and
    decoding is the validator's (not UTF-8 is MAS001 at <stdin>, as for a file)."""
    from mas2c.lang.source import MAX_SPEC_BYTES

    return sys.stdin.buffer.read(MAX_SPEC_BYTES + 1)


def _utf8_text(text: str, what: str) -> str:
    """`text` if it is text; bytes that are not UTF-8 (stdin, or an argument, which Python
    holds as lone surrogates) are a usage error naming `what`, never a traceback later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{what} is not UTF-8 text (at character {exc.start})") from None
    return text


def _task(text: str) -> str:
    if text == STDIO:
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"the task on <stdin> is not UTF-8 text (byte {exc.start})") from None
    _utf8_text(text, "the task")
    if not text.strip():
        raise UsageError("the task is empty; say what the system should do")
    return text


# -- verbs ----------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from mas2c.lang.validate import validate_bytes, validate_file

    if args.spec.count(STDIO) > 1:
        raise UsageError("stdin (-) can be read only once")
    # Every file is reported, also past one that cannot be read (missing, a folder,
    # unreadable): that one is a usage error (exit 2), in its own entry and in `error`.
    reports: list[dict[str, Any]] = []
    unreadable: list[UsageError] = []
    for name in args.spec:
        try:
            if name == STDIO:
                report = validate_bytes(_stdin_spec_bytes())
            else:
                try:
                    report = validate_file(_readable_file(name, "spec file"))
                except OSError as exc:
                    raise UsageError(f"{name}: {exc.strerror or exc}") from None
        except UsageError as exc:
            unreadable.append(exc)
            entry = {"path": name, "valid": False, "errors": 1, "warnings": 0, "problems": []}
            reports.append({**entry, "error": exc.to_json()})
            _say(f"mas2c validate: {exc}")
            continue
        reports.append(report.to_json())
        if not args.json:
            stream = sys.stdout if report.ok else sys.stderr
            stream.write(report.format() + "\n")
    valid = all(r["valid"] for r in reports)
    if args.json:
        doc: dict[str, Any] = {"ok": valid, "valid": valid, "reports": reports}
        if unreadable:
            doc["error"] = unreadable[0].to_json()
        _print_json(doc)
    if unreadable:
        return EXIT_USAGE
    return EXIT_OK if valid else EXIT_FAILURE


def cmd_schema(args: argparse.Namespace) -> int:
    from mas2c.lang.spec import json_schema

    schema = json_schema()
    text = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    if args.output in (None, STDIO):
        if args.json:
            return _finish(args, True, {"output": None, "schema": schema})
        sys.stdout.write(text)
        return EXIT_OK
    written = _write_user_file(args.output, text)
    return _finish(args, True, {"output": written}, "")


def cmd_compile(args: argparse.Namespace) -> int:
    from mas2c.compile import compile_spec
    from mas2c.files import check_output_folder, write_build

    if args.output == STDIO:
        raise UsageError("a build is a folder: -o needs a folder, not stdout")
    spec = _load(args.spec)
    build = compile_spec(spec)
    out = Path(args.output or f"build/{build.package}")
    check_output_folder(out, force=args.force)  # before any work touches the disk
    try:
        state = write_build(out, build.files, force=args.force)
    except OSError as exc:
        raise write_error(out, exc) from None
    doc = {
        "output": str(out),
        "package": build.package,
        "files": sorted(build.files),
        "replaced": state,
    }
    _say(f"compiled {spec.name} -> {out} ({len(build.files)} files, package {build.package})")
    return _finish(args, True, doc)


def cmd_graph(args: argparse.Namespace) -> int:
    from mas2c import graph

    spec = _load(args.spec)
    text = graph.dot(spec) if args.format == "dot" else graph.mermaid(spec)
    return _finish(args, True, {"format": args.format, "diagram": text}, text)


def cmd_diff(args: argparse.Namespace) -> int:
    from mas2c import diff

    if args.a == args.b == STDIO:
        raise UsageError("stdin (-) can be read only once")
    with contextlib.ExitStack() as stack:
        a, b = (
            stack.enter_context(_input_file(STDIO, "spec", "stdin.yaml"))
            if name == STDIO
            else _existing(name)
            for name in (args.a, args.b)
        )
        try:
            kind = diff.path_kind(a)
            text, different, data = diff.diff_paths(a, b)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        changes = data if kind == "spec" or not args.json else diff.diff_builds_json(a, b)
    if args.json:
        _print_json({"ok": True, "kind": kind, "different": different, "changes": changes})
    else:
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return EXIT_FAILURE if different else EXIT_OK


# -- LLM and sandbox options ----------------------------------------------------------------------


class _DeprecatedFlag(argparse.Action):
    """A renamed flag's old spelling: stores into the new one's `dest`, warns on stderr."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        new = "--" + self.dest.replace("_", "-")
        _warn(
            f"{option_string} is deprecated: use {new} (the old spelling goes in the next version)"
        )
        setattr(namespace, self.dest, values)


def _llm_config(args: argparse.Namespace) -> Any:
    from mas2c.run import LLMConfig

    llm = getattr(args, "llm", None)
    record = getattr(args, "record", None)
    replay = getattr(args, "replay", None)
    # --record F --replay F: new episodes; F may not exist yet. A strict replay's must.
    same = bool(record and replay and Path(record) == Path(replay))
    if record:
        from mas2c.gateway import record_target_problem

        problem = record_target_problem(Path(record))
        if problem is not None:
            raise UsageError(f"--record {record}: {problem}")
    return LLMConfig(
        url=None if llm in (None, "embedded") else llm,
        force_embedded=llm == "embedded",
        embedded_model=Path(args.embedded_model) if getattr(args, "embedded_model", None) else None,
        record=Path(record) if record else None,
        replay=(Path(replay) if same else _readable_file(replay, "cassette")) if replay else None,
        cache=bool(getattr(args, "cache", False)),
    )


def _sandbox_options(args: argparse.Namespace) -> dict[str, Any]:
    from mas2c import sandbox

    limits = sandbox.Limits(timeout_s=args.timeout, memory_mb=args.memory, cpus=args.cpus)
    if getattr(args, "runtime", None):
        # The sandbox reads its default runtime from the environment: one switch for
        # run, solve, rectify and bench alike.
        os.environ[sandbox.RUNTIME_ENV] = args.runtime
    if getattr(args, "no_pool", False):
        os.environ[sandbox.NO_POOL_ENV] = "1"  # never a warm container, always a cold one
    if getattr(args, "allow_image_urls", False):
        os.environ["MAS2C_ALLOW_IMAGE_URLS"] = "1"  # read where each run's gateway starts
    loosen = sandbox.Loosen(
        network=args.allow_network, writable_root=args.writable_root, root_user=args.as_root
    )
    return {"backend": args.sandbox, "limits": limits, "loosen": loosen, "image": args.image}


def _default_run_dir() -> str:
    import time

    return f"runs/{time.strftime('%Y%m%d-%H%M%S')}"


# -- run ------------------------------------------------------------------------------------------


def _dollars(cost: float) -> str:
    """A cost as shown in progress lines: small costs keep their digits ($0.000068, not $0.0000)."""
    return f"${cost:.6f}" if 0 < cost < 0.01 else f"${cost:.4f}"


class _RunMeter:
    """Progress of one run on stderr: LLM calls, tokens and cost so far, from the gateway's
    events; one line per call at most once a second (a rewriting line on a terminal)."""

    def __init__(self, enabled: bool, total_steps: int | None = None) -> None:
        import threading
        import time

        self.enabled = enabled
        self.total_steps = total_steps
        self.calls = self.tokens = self.errors = 0
        self.cost = 0.0
        self.steps: list[str] = []
        self.top = -1  # the highest top-level step index an LLM call came from
        self._lock = threading.Lock()
        self._clock = time.monotonic
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def phase(self, message: str) -> None:
        if self.enabled:
            self._end_line()
            _progress(message)

    def on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            if event.get("status") == 200:
                self.calls += 1
                self.tokens += int(event.get("total_tokens") or 0)
                self.cost += float(event.get("cost_usd") or 0.0)
            else:
                self.errors += 1
            step = str(event.get("step") or "")
            if step and step not in self.steps:
                self.steps.append(step)
            if step.startswith("/workflow/"):
                head = step.split("/")[2]
                if head.isdigit():
                    self.top = max(self.top, int(head))
            now = self._clock()
            if not self.enabled or (not self._tty and now - self._last < 1.0):
                return
            self._last = now
            line = terminal_safe(self.line())
            if self._tty:
                sys.stderr.write(f"\r\033[Kmas2c: {line}")
            else:
                sys.stderr.write(f"mas2c: {line}\n")
            sys.stderr.flush()

    def line(self) -> str:
        at = ""
        if self.top >= 0:  # steps before the current top-level one are done
            of = f" of {self.total_steps}" if self.total_steps else ""
            at = f"; step {self.top + 1}{of} ({self.top} done), at {self.steps[-1]}"
        elif self.steps:
            at = f"; at {self.steps[-1]}"
        failed = f", {self.errors} failed" if self.errors else ""
        return (
            f"run: {self.calls} LLM call(s){failed}, {self.tokens} tokens, "
            f"{_dollars(self.cost)} so far{at}"
        )

    def finish(self) -> None:
        if self.enabled:
            self._end_line()

    def _end_line(self) -> None:
        if self._tty and self.calls:
            sys.stderr.write("\n")


def _export_after_run(
    run_dir: Path, url: str, service: str, live: dict[str, Any], *, quiet: bool
) -> None:
    """`run --otel`: the run's whole trace after its gateway spans; a failure is a warning
    (the run's own outcome stands)."""
    from mas2c.otel import ExportError, export_otel

    if live["failed"]:
        _warn(f"{live['failed']} live span(s) were not accepted by {live['endpoint']}")
    try:
        sent = export_otel(run_dir, url, service=service)
    except ExportError as exc:
        _warn(f"the run's trace was not exported: {exc}")
        return
    if quiet:
        return
    _progress(
        f"otel: {live['sent']} gateway span(s) live, then {sent['spans']} span(s) of trace "
        f"{sent['trace_id']} to {sent['endpoint']}"
    )


def _top_level_steps(target: Path) -> int | None:
    """The number of top-level steps of a build (from its manifest), for the progress line."""
    from mas2c.files import read_manifest

    try:
        workflow = read_manifest(target)["spec"]["workflow"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return len(workflow) if isinstance(workflow, list) else None


_MAX_RUN_WARNINGS = 20


def run_warnings(result: Any) -> list[str]:
    """One line per entry of a result's ``warnings`` (a loop that ran out of iterations, a
    map cut at max_items): shown on stderr, so an `ok` that is not the whole story says so.
    The result comes from the sandbox: only string messages, each cut, at most 20 lines."""
    entries = result.get("warnings") if isinstance(result, dict) else None
    if not isinstance(entries, list):
        return []
    lines = []
    for entry in entries:
        message = entry.get("message") if isinstance(entry, dict) else None
        pointer = entry.get("pointer") if isinstance(entry, dict) else None
        if isinstance(message, str):
            where = f" (at {pointer[:200]})" if isinstance(pointer, str) and pointer else ""
            lines.append(message[:500] + where)
    if len(lines) > _MAX_RUN_WARNINGS:
        more = len(lines) - _MAX_RUN_WARNINGS
        lines = [*lines[:_MAX_RUN_WARNINGS], f"... and {more} more in result.json"]
    return lines


def cmd_run(args: argparse.Namespace) -> int:
    from mas2c.run import run_system

    _one_stdin(args.target, args.input)
    run_dir = Path(args.run_dir or _default_run_dir())
    meter: _RunMeter | None = None
    live = None
    try:
        with contextlib.ExitStack() as stack:
            target = (  # a spec on stdin (`mas2c generate TASK -o - | mas2c run - ...`)
                stack.enter_context(_input_file(STDIO, "spec", "stdin.yaml"))
                if args.target == STDIO
                else _existing(args.target)
            )
            input_path = stack.enter_context(_input_file(args.input))
            meter = _RunMeter(enabled=not args.quiet, total_steps=_top_level_steps(target))
            on_event: Callable[[dict[str, Any]], None] = meter.on_event
            if args.otel:  # checked (URL, SDK) before anything runs
                from mas2c.otel import LiveExport

                live = LiveExport(args.otel, service=args.otel_service)
                send, count = live.on_event, meter.on_event

                def on_event(event: dict[str, Any]) -> None:
                    count(event)
                    send(event)

            outcome = run_system(
                target,
                input_path,
                run_dir,
                llm=_llm_config(args),
                on_warning=_warn,
                on_event=on_event,
                on_progress=meter.phase,
                **_sandbox_options(args),
            )
    finally:
        if meter is not None:
            meter.finish()
        counts = live.close() if live is not None else None
    if counts is not None:
        _export_after_run(run_dir, args.otel, args.otel_service, counts, quiet=args.quiet)
    usage = outcome.usage
    summary = (
        f"{outcome.status} (exit {outcome.exit_code}) in {outcome.sandbox.get('duration_s', 0):.1f}s; "
        f"{usage.get('calls', 0)} LLM call(s), {usage.get('total_tokens', 0)} tokens, "
        f"{_dollars(float(usage.get('cost_usd') or 0))}; run folder {outcome.run_dir}"
    )
    if not outcome.ok:
        error = outcome.result.get("error") or {}
        where = f" at {error['spec_pointer']}" if error.get("spec_pointer") else ""
        _say(f"{error.get('type', 'Error')}{where}: {error.get('message', '')}")
    for line in run_warnings(outcome.result):
        _warn(line)
    _say(summary)
    doc = {
        "run_dir": str(run_dir),
        "status": outcome.status,
        "exit_code": outcome.exit_code,
        "result": outcome.result,
        "usage": outcome.usage,
        "sandbox": outcome.sandbox,
    }
    outputs = outcome.result.get("outputs", {}) if outcome.ok else None
    text = json.dumps(outputs, indent=2, ensure_ascii=False) if outcome.ok else ""
    return _finish(args, outcome.ok, doc, text)


# -- image ----------------------------------------------------------------------------------------


def cmd_image(args: argparse.Namespace) -> int:
    from mas2c import image

    with contextlib.ExitStack() as stack:
        target = (
            stack.enter_context(_input_file(STDIO, "spec", "stdin.yaml"))
            if args.target == STDIO
            else _existing(args.target)
        )
        result = image.build(
            target, args.tag, base=args.base, serve=args.serve, on_progress=_progress
        )
    _say(
        f"built {result.tag} ({result.package}); run it with:\n  {image.run_line(result.tag, serve=args.serve)}"
    )
    return _finish(args, True, result.to_json(), result.tag)


def _add_image_verb(verbs: Any) -> None:
    p = verbs.add_parser(
        "image", help="build an OCI image of a compiled system (entrypoint: the package's CLI)"
    )
    p.add_argument("target", help="a spec file or a build folder (`mas2c compile` output)")
    p.add_argument("-t", "--tag", required=True, help="image name[:tag]")
    p.add_argument(
        "--base",
        help="base image, present locally (default mas2c-sandbox:latest, built if missing)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="include the serve extra (starlette, uvicorn): `docker run IMAGE serve --host 0.0.0.0`",
    )
    _add_json(p)
    p.set_defaults(handler=cmd_image)


# -- sandbox --------------------------------------------------------------------------------------


def cmd_sandbox(args: argparse.Namespace) -> int:
    from mas2c import sandbox

    if args.pool_action and args.action != "pool":  # `sandbox prune stop` would prune
        raise UsageError(
            f"{args.pool_action!r} is an action of `sandbox pool`, not of `sandbox {args.action}`"
        )
    if args.action == "build":
        tag = sandbox.build_image(base=args.base, tag=args.tag, on_progress=_progress)
        return _finish(args, True, {"image": tag}, f"built {tag}")
    if args.action == "prune":
        removed = sandbox.prune()
        return _finish(args, True, {"removed": removed}, f"removed {removed} container(s)")
    if args.action == "pool":
        return _cmd_pool(args)
    status = sandbox.status(args.tag)
    ready = bool(status["daemon"]["reachable"]) and bool(status["image"]["present"])
    lines = [
        f"daemon: {'up' if status['daemon']['reachable'] else 'DOWN'}"
        + (f" (Docker {status['daemon']['version']})" if status["daemon"]["version"] else "")
        + (f" — {status['daemon']['error']}" if status["daemon"]["error"] else ""),
        f"image: {status['image']['name']} "
        + ("present" if status["image"]["present"] else "MISSING (mas2c sandbox build)"),
        "backends: "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in status["backends"].items()),
        "runtimes: "
        + (", ".join(status["runtimes"]) or "-")
        + (f" (default {status['default_runtime']})" if status["default_runtime"] else "")
        + (f"; {sandbox.RUNTIME_ENV}={status['runtime_env']}" if status["runtime_env"] else ""),
        f"leftover containers: {status['leftover_containers']}",
        "pool service: "
        + (
            f"pid {status['pool_service']['pid']}, {status['pool_service']['size']} warm"
            if status.get("pool_service")
            else "not running"
        ),
    ]
    return _finish(args, ready, {"status": status}, "\n".join(lines))


def _cmd_pool(args: argparse.Namespace) -> int:
    from mas2c import sandbox
    from mas2c.sandbox import pool as sandbox_pool

    what = args.pool_action or "status"
    if what == "start":
        if args.size < 1:
            raise UsageError("--size must be at least 1")
        limits = sandbox.Limits(timeout_s=args.timeout, memory_mb=args.memory, cpus=args.cpus)
        runtime = args.runtime or sandbox.default_runtime()
        spec = sandbox_pool.PoolSpec(args.tag, runtime, limits, args.idle)
        try:
            spec.validate()
        except sandbox.SandboxError as exc:
            raise UsageError(str(exc).replace("idle lifetime", "--idle")) from None
        st = sandbox_pool.start_service(spec, args.size)
        return _finish(args, True, {"pool": st}, f"pool service up: {st['idle']} warm container(s)")
    if what == "stop":
        stopped = sandbox_pool.stop_service()
        text = "pool service stopped" if stopped else "no pool service was running"
        return _finish(args, True, {"stopped": stopped}, text)
    st = sandbox_pool.service_status()
    text = (
        f"pool service: pid {st['pid']}, {st['idle']} of {st['size']} warm container(s) idle"
        if st["running"]
        else "pool service: not running"
    )
    return _finish(args, True, {"pool": st}, text)


# -- generate, configure, rectify, solve, bench -----------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from mas2c.generate import generate_spec, spec_to_yaml
    from mas2c.meta import meta_client

    task = _task(args.task)
    _check_output_file(args.output)
    examples = _existing(args.examples) if args.examples else None
    if examples is not None and not examples.is_dir():
        raise UsageError(f"{args.examples}: --examples expects a folder of example specs")
    config = _llm_config(args)
    # The embedded model gets the compact prompt and schema (see `mas2c.generate`).
    embedded = config.endpoint() is None and config.replay is None
    compact = args.prompt == "compact" or (args.prompt == "auto" and embedded)
    with meta_client(config, model=args.model, progress=_progress) as client:
        result = generate_spec(
            task,
            client,
            examples_dir=examples,
            max_repairs=args.max_repairs,
            on_progress=_progress,
            compact=compact,
        )
    text = spec_to_yaml(result.spec)
    if args.output.endswith(".json"):  # a .json spec is read as JSON: write it as JSON
        text = json.dumps(result.spec.to_data(), indent=2, ensure_ascii=False) + "\n"
    if args.json and args.output == STDIO:
        return _finish(args, True, {"output": None, "spec_yaml": text, **result.to_json()})
    written = _write_user_file(args.output, text)
    if written is not None:
        _say(f"wrote {written} ({result.spec.name}, {result.attempts} answer(s))")
    return _finish(args, True, {"output": written, **result.to_json()})


def cmd_configure(args: argparse.Namespace) -> int:
    from mas2c.configure import configure_spec, load_pool
    from mas2c.generate import spec_to_yaml
    from mas2c.meta import meta_client

    spec, stdin_text = _load_with_text(args.spec)
    output = None if args.output in (None, STDIO) else args.output
    _check_output_file(output)
    with _input_file(args.pool, "pool file") as pool_path:
        pool = load_pool(pool_path)
    if args.rule:
        result = configure_spec(spec, pool, rebind=args.rebind)
    else:
        with meta_client(_llm_config(args), model=args.model, progress=_progress) as client:
            result = configure_spec(
                spec, pool, client=client, rebind=args.rebind, on_progress=_progress
            )
    for agent, choice in sorted(result.choices.items()):
        _say(f"{agent} -> {choice.model} ({choice.by}: {choice.reason})")
    # The user's file edited as a round trip: comments, key order and styles stay.
    from mas2c.yamledit import edit_spec_file, edit_spec_text

    if stdin_text is not None:
        json_text = stdin_text.lstrip().startswith("{")
        text = edit_spec_text(stdin_text, spec, result.spec, json_text=json_text)
    elif args.spec is None:
        text = spec_to_yaml(result.spec)
    else:
        text = edit_spec_file(Path(args.spec), spec, result.spec)
    if output is None:
        if args.json:
            return _finish(args, True, {"output": None, "spec_yaml": text, **result.to_json()})
        sys.stdout.write(text)
        return EXIT_OK
    if output.endswith(".json") and not text.lstrip().startswith("{"):
        # a YAML spec configured into X.json: JSON (a .json spec is read as JSON)
        text = json.dumps(result.spec.to_data(), indent=2, ensure_ascii=False) + "\n"
    written = _write_user_file(output, text)
    _say(f"wrote {written}")
    return _finish(args, True, {"output": written, **result.to_json()})


def cmd_rectify(args: argparse.Namespace) -> int:
    from contextlib import ExitStack, nullcontext

    from mas2c.configure import load_pool
    from mas2c.meta import meta_client
    from mas2c.rectify import rectify
    from mas2c.run import make_upstream

    run_dir = _existing(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{args.run_dir}: expected a run folder")
    if args.max_rounds < 1:
        raise UsageError("--max-rounds must be at least 1")
    _one_stdin(args.spec, args.input, args.pool)
    if args.spec == STDIO and args.write:
        raise UsageError(
            "--write puts the fixed spec beside --spec: a spec on stdin has no folder; give "
            "it as a file, or drop --write (every round's spec stays in RUN_DIR/rectify/)"
        )
    llm = _llm_config(args)
    progress = None if args.json else _progress
    with ExitStack() as stack:
        spec_path = _optional_spec(stack, args.spec)
        input_path = stack.enter_context(_input_file(args.input)) if args.input else None
        pool = None
        if args.pool:
            pool = load_pool(stack.enter_context(_input_file(args.pool, "pool file")))
        upstream = make_upstream(llm, on_progress=progress) if llm.replay is None else None
        close = getattr(upstream, "close", None)
        if callable(close):
            stack.callback(close)
        meta = (
            nullcontext(None)
            if args.no_llm
            else meta_client(llm, model=args.model, progress=progress, upstream=upstream)
        )
        client = stack.enter_context(meta)
        outcome = rectify(
            run_dir,
            spec_path=spec_path,
            input_path=input_path,
            max_rounds=args.max_rounds,
            write=args.write,
            overwrite=args.force,
            client=client,
            llm=llm,
            upstream=upstream,
            max_cost=args.max_cost,
            max_calls=args.max_calls,
            allow_budget_raise=args.allow_budget_raise,
            pool=pool,
            resume=not args.no_resume,
            progress=progress,
            on_warning=_warn,
            **_sandbox_options(args),
        )
    text = (
        f"{outcome.status}: {outcome.stop_reason} ({outcome.rounds_run} round(s), "
        f"{outcome.llm_calls} rectifier LLM call(s)); rounds in {run_dir / 'rectify'}"
    )
    if outcome.written is not None:
        text += f"\nwrote {outcome.written}"
    return _finish(args, outcome.ok, outcome.to_json(), text)


def _add_prompt_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt",
        choices=["auto", "full", "compact"],
        default="auto",
        help="the generator's prompt: full (language, schema, examples) or compact (a reduced "
        "schema for small models); auto: compact on the embedded model, else full",
    )


def cmd_solve(args: argparse.Namespace) -> int:
    from mas2c.solve import print_progress, solve

    task = _task(args.task)
    from mas2c.tracing import trace_content_default, withheld_argument

    solve_dir = Path(args.run_dir or _default_run_dir())
    withheld = (  # the task is a prompt: run.json and the spans name its size
        withheld_argument(args.task, f"<task: {len(args.task)} characters>")
        if not trace_content_default()
        else contextlib.nullcontext()
    )
    with withheld, _solve_inputs(args) as (input_path, pool_path):
        outcome = solve(
            task,
            input_path,
            solve_dir,
            llm=_llm_config(args),
            model=args.model,
            pool_path=pool_path,
            max_repairs=args.max_repairs,
            progress=None if args.json else print_progress,
            on_warning=_warn,
            rectify_rounds=args.rectify_rounds,
            prompt=args.prompt,
            **_sandbox_options(args),
        )
    report = (solve_dir / "report.md").read_text("utf-8")
    return _finish(args, outcome.ok, outcome.to_json(), report)


@contextmanager
def _solve_inputs(args: argparse.Namespace) -> Iterator[tuple[Path, Path | None]]:
    """solve's --input (may be `-`) and --pool, as paths."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        input_path = stack.enter_context(_input_file(args.input))
        pool = stack.enter_context(_input_file(args.pool, "pool file")) if args.pool else None
        yield input_path, pool


def cmd_bench(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.check_scorer and (args.spec or args.solve):
        raise UsageError("--check-scorer runs the dataset's own solutions; drop --spec/--solve")
    kind = "check" if args.check_scorer else "run"
    run_dir = Path(args.run_dir or f"runs/humaneval-{kind}-{_default_run_dir().split('/')[-1]}")
    with contextlib.ExitStack() as stack:
        spec = _optional_spec(stack, args.spec)
        return _bench(args, run_dir, spec)


def _bench(args: argparse.Namespace, run_dir: Path, spec: Path | None) -> int:
    from mas2c.bench import BenchOptions, check_scorer, run_humaneval

    if args.check_scorer:
        summary = check_scorer(
            run_dir,
            limit=args.limit,
            workers=args.workers,
            backend=args.sandbox,
            image=args.image,
            test_timeout_s=args.test_timeout,
            on_warning=_warn,
        )
        ok = bool(summary["ok"])
    else:
        summary = run_humaneval(
            BenchOptions(
                run_dir=run_dir,
                spec=spec,
                solve=args.solve,
                limit=args.limit,
                workers=args.workers,
                backend=args.sandbox,
                image=args.image,
                test_timeout_s=args.test_timeout,
                hide_tests=args.hide_tests,
                llm=_llm_config(args),
                model=args.model,
                on_warning=_warn,
                engine=args.engine,
                ray_address=args.address,
                max_cost_usd=args.max_cost,
            )
        )
        ok = bool(summary["complete"])
    text = (run_dir / "results.md").read_text("utf-8").split("\n\n| problem")[0]
    _say(f"run folder: {run_dir} (results.jsonl, summary.json, results.md)")
    return _finish(args, ok, summary, text)


def _add_sandbox_flags(p: argparse.ArgumentParser) -> None:
    from_env = "docker"
    p.add_argument(
        "--sandbox",
        type=_SANDBOX_FLAG,
        choices=["docker", "unisolated"],
        default=from_env,
        help="where the program runs (unisolated: a subprocess on this machine, NOT isolated)",
    )
    p.add_argument(
        "--timeout", type=_positive, default=600.0, help="wall-clock limit in seconds (default 600)"
    )
    p.add_argument(
        "--memory", type=_positive_int, default=1024, help="memory limit in MiB (default 1024)"
    )
    p.add_argument("--cpus", type=_positive, default=1.0, help="CPU limit (default 1)")
    p.add_argument("--image", help="sandbox image (default mas2c-sandbox:latest)")
    p.add_argument(
        "--runtime",
        help="container runtime registered with dockerd, e.g. runsc (gVisor); "
        "default: $MAS2C_RUNTIME, else the daemon's (runc)",
    )
    p.add_argument(
        "--no-pool",
        action="store_true",
        help="always start a cold container (no warm pool, no pool service)",
    )
    p.add_argument(
        "--allow-network",
        action="store_true",
        help="LOOSENS the sandbox: give the container a network",
    )
    p.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="LOOSENS the gateway: forward image_url parts that name http(s) URLs, which a "
        "vision upstream fetches (default: only data: URLs; also $MAS2C_ALLOW_IMAGE_URLS=1)",
    )
    p.add_argument(
        "--writable-root", action="store_true", help="LOOSENS the sandbox: writable root filesystem"
    )
    p.add_argument(
        "--as-root", action="store_true", help="LOOSENS the sandbox: run as root in the container"
    )
    p.add_argument(
        "--trace-content",
        action="store_true",
        help="also trace prompts, completions and tool arguments (trace.jsonl)",
    )


# -- seeing a run (mas2c.report, mas2c.otel) --------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from mas2c.report import render_report, write_report

    if args.output == STDIO:  # the page on stdout (for a pipe); with --json, not allowed
        if args.json:
            raise UsageError("-o - writes the page to stdout: it cannot go with --json")
        sys.stdout.write(render_report(_existing(args.run_dir)))
        return EXIT_OK
    output = Path(args.output) if args.output else None
    _check_output_file(args.output)  # a folder, a missing folder (also a link's target)
    problems: list[str] = []
    out = write_report(_existing(args.run_dir), output, problems)
    if not args.json:  # what could not be read: on the page, and said here
        for problem in problems[:_MAX_RUN_WARNINGS]:
            _warn(problem[:600])
        if len(problems) > _MAX_RUN_WARNINGS:
            _warn(f"... and {len(problems) - _MAX_RUN_WARNINGS} more (listed in the report)")
    return _finish(args, True, {"output": str(out), "problems": problems}, str(out))


def cmd_export(args: argparse.Namespace) -> int:
    from mas2c.otel import export_otel

    sent = export_otel(
        _existing(args.run_dir), args.endpoint, service=args.service, timeout_s=args.timeout
    )
    problems = sent["problems"]
    if not args.json:  # what of the folder could not be read (skipped lines, a broken header)
        for problem in problems[:_MAX_RUN_WARNINGS]:
            _warn(f"{args.run_dir}: {str(problem)[:600]}")
        if len(problems) > _MAX_RUN_WARNINGS:
            _warn(f"... and {len(problems) - _MAX_RUN_WARNINGS} more (see --json)")
    text = f"exported {sent['spans']} span(s) of trace {sent['trace_id']}"
    if problems:
        text += f" ({len(problems)} problem(s) reading the folder: see the warnings above)"
    return _finish(args, True, sent, text)


def _add_observe_verbs(verbs: Any) -> None:
    p = verbs.add_parser("report", help="write a self-contained HTML report of a run folder")
    p.add_argument("run_dir", help="a run, rectify, solve or batch folder")
    p.add_argument(
        "-o", "--output", help="HTML file to write (default RUN_DIR/report.html; - for stdout)"
    )
    _add_json(p)
    p.set_defaults(handler=cmd_report)
    p = verbs.add_parser("export", help="send a run's trace elsewhere (OpenTelemetry)")
    p.add_argument("format", choices=["otel"], help="otel: OTLP/HTTP with gen_ai.* attributes")
    p.add_argument("run_dir", help="a run folder (with trace.jsonl)")
    p.add_argument(
        "--endpoint",
        required=True,
        help="OTLP/HTTP traces URL or base URL (e.g. http://127.0.0.1:6006/v1/traces)",
    )
    p.add_argument("--service", default="mas2c", help="service.name (default mas2c)")
    p.add_argument(
        "--timeout", type=_positive, default=30.0, help="seconds to deliver, retries included (30)"
    )
    _add_json(p)
    p.set_defaults(handler=cmd_export)


def _add_llm_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--llm",
        type=_LLM_FLAG,
        help="'embedded' (the embedded model) or an OpenAI-compatible base URL "
        "(default: OPENAI_BASE_URL, else embedded)",
    )
    p.add_argument(
        "--embedded-model",
        help="a GGUF file for the embedded engine (default SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--local-model",
        dest="embedded_model",
        action=_DeprecatedFlag,
        help=argparse.SUPPRESS,
    )
    p.add_argument(
        "--record",
        help="record every LLM exchange to this cassette (JSONL); with --replay, record what "
        "the replayed cassette lacks (new episodes, fetched from the endpoint)",
    )
    p.add_argument(
        "--replay",
        help="answer LLM requests from this cassette; no endpoint needed; a request it lacks "
        "fails (HTTP 400 mas2c_cassette_miss) unless --record is given too",
    )
    p.add_argument(
        "--cache", action="store_true", help="answer identical LLM requests from a cache"
    )


def cmd_batch(args: argparse.Namespace) -> int:
    from mas2c.batch import BatchError, parse_mapping

    if args.workers < 1 or (args.limit is not None and args.limit < 1) or args.pilot < 1:
        raise UsageError("--workers, --limit and --pilot must be at least 1")
    if args.address and args.engine != "ray":
        raise UsageError("--address is for --engine ray")
    if args.solve is not None:
        _utf8_text(args.solve, "the --solve task")
    try:
        mapping = parse_mapping(args.map or [])
    except BatchError as exc:
        raise UsageError(str(exc)) from None
    run_dir = Path(args.run_dir or f"runs/batch-{_default_run_dir().split('/')[-1]}")
    _one_stdin(args.dataset, args.spec)
    with contextlib.ExitStack() as stack:
        dataset = stack.enter_context(_input_file(args.dataset, "dataset file", "stdin.jsonl"))
        spec = _optional_spec(stack, args.spec)
        summary = _run_batch(args, run_dir, dataset, spec, mapping)
    text = (run_dir / "report.md").read_text("utf-8").split("\nRows not passed")[0]
    _say(f"run folder: {run_dir} (results.jsonl, summary.json, report.md)")
    return _finish(args, bool(summary["complete"]), summary, text)


def _run_batch(
    args: argparse.Namespace,
    run_dir: Path,
    dataset: Path,
    spec: Path | None,
    mapping: dict[str, str],
) -> dict[str, Any]:
    from mas2c.batch import BatchOptions, run_batch

    return run_batch(
        BatchOptions(
            run_dir=run_dir,
            dataset=dataset,
            dataset_name="<stdin>" if args.dataset == STDIO else None,
            spec=spec,
            solve_task=args.solve,
            mapping=mapping,
            id_field=args.id_field,
            answer_field=args.answer_field,
            output=args.output,
            scorer=args.scorer,
            limit=args.limit,
            workers=args.workers,
            engine=args.engine,
            ray_address=args.address,
            ray_max_retries=args.max_retries,
            max_cost_usd=args.max_cost,
            backend=args.sandbox,
            image=args.image,
            test_timeout_s=args.test_timeout,
            llm=_llm_config(args),
            model=args.model,
            baseline=args.baseline,
            baseline_model=args.baseline_model,
            baseline_field=args.baseline_field,
            pilot_rows=args.pilot,
            on_warning=_warn,
        )
    )


# -- parser ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors, `--help` and `--version` raised rather than printed
    and exited on (so that `--json` gets its one document for each)."""

    def __init__(self, *, add_help: bool = True, **kwargs: Any) -> None:
        super().__init__(add_help=False, **kwargs)
        self.register("action", "help", _HelpAction)
        self.register("action", "version", _VersionAction)
        if add_help:
            self.add_argument("-h", "--help", action="help", help="show this help and exit")

    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(self, message)


class _Informational(Exception):
    """`--help` or `--version` was given: `_main` prints it, as text or as JSON, exit 0."""

    def __init__(self, parser: argparse.ArgumentParser, what: str) -> None:
        super().__init__(what)
        self.parser = parser
        self.what = what


class _HelpAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        raise _Informational(parser, "help")


class _VersionAction(_HelpAction):
    def __init__(self, option_strings: list[str], version: str = "", **kw: Any) -> None:
        super().__init__(option_strings, **kw)
        self.version = version

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        raise _Informational(parser, "version")


def _json_value(value: Any) -> Any:
    """A flag's default as JSON: plain values as they are, anything else as text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return str(value)


def help_document(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """What `--help` says, as data: `--help --json` prints ``{"ok": true, "help": this}``.

    ``arguments``: one entry per positional argument and flag (``name``, ``flags``,
    ``required``, ``takes_value``, ``nargs``, ``metavar``, ``choices``, ``default``,
    ``help``); ``verbs``: the sub-commands (``name``, ``help``), for ``mas2c`` itself;
    ``text``: the human help, as `--help` prints it."""
    formatter = parser._get_formatter()
    arguments: list[dict[str, Any]] = []
    verbs: list[dict[str, Any]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            verbs += [{"name": a.dest, "help": a.help} for a in action._choices_actions]
            continue
        if action.help == argparse.SUPPRESS:
            continue
        positional = not action.option_strings
        default = action.default
        arguments.append(
            {
                "name": action.dest if positional else max(action.option_strings, key=len),
                "flags": list(action.option_strings),
                "required": action.nargs not in ("?", "*") if positional else action.required,
                "takes_value": action.nargs != 0,
                "nargs": action.nargs,
                "metavar": _json_value(action.metavar),
                "choices": None if action.choices is None else [str(c) for c in action.choices],
                "default": None if default == argparse.SUPPRESS else _json_value(default),
                "help": formatter._expand_help(action) if action.help else None,
            }
        )
    usage = parser.format_usage().strip()
    return {
        "prog": parser.prog,
        "usage": usage.removeprefix("usage: "),
        "description": parser.description,
        "arguments": arguments,
        "verbs": verbs,
        "text": parser.format_help(),
    }


class _ArgumentError(UsageError):
    code = "usage"

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


def _add_json(
    p: argparse.ArgumentParser, help_text: str = "print one JSON document on stdout"
) -> None:
    p.add_argument("--json", action="store_true", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mas2c",
        description="Build, run and repair LLM multi-agent systems from declarative specs (MAS²).",
    )
    parser.add_argument(
        "--version", action="version", version=f"mas2c {__version__}", help="print the version"
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    p = verbs.add_parser("validate", help="check specs and report every problem with its place")
    p.add_argument("spec", nargs="+", help="spec file(s), YAML or JSON; - reads stdin")
    _add_json(p, "one JSON document: {ok, valid, reports: [one per file]}")
    p.set_defaults(handler=cmd_validate)

    p = verbs.add_parser("schema", help="print the JSON Schema of the spec")
    p.add_argument(
        "-o", "--output", help="write to this file instead of stdout (its folder must exist)"
    )
    _add_json(p)
    p.set_defaults(handler=cmd_schema)

    p = verbs.add_parser("compile", help="compile a spec into a standalone Python package")
    p.add_argument("spec", help="spec file (- reads stdin)")
    p.add_argument(
        "-o",
        "--output",
        help="output folder (default build/<package>): new, empty, or an earlier build",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a folder holding other files (adds/overwrites the build's files, deletes nothing)",
    )
    _add_json(p)
    p.set_defaults(handler=cmd_compile)

    p = verbs.add_parser("graph", help="print the workflow as a Mermaid (or dot) diagram")
    p.add_argument("spec", help="spec file (- reads stdin)")
    p.add_argument(
        "--format", choices=["mermaid", "dot"], default="mermaid", help="diagram language (mermaid)"
    )
    _add_json(p)
    p.set_defaults(handler=cmd_graph)

    p = verbs.add_parser(
        "diff", help="compare two specs (semantically) or two builds (file by file)"
    )
    p.add_argument("a", help="spec file or build folder (- reads a spec from stdin)")
    p.add_argument("b", help="spec file or build folder (- reads a spec from stdin)")
    _add_json(p, "one JSON document: {ok, kind, different, changes}")
    p.set_defaults(handler=cmd_diff)

    p = verbs.add_parser(
        "run", help="run a spec or a build in the sandbox, with the LLM gateway on the host"
    )
    p.add_argument("target", help="spec file or build folder")
    p.add_argument("--input", required=True, help="input JSON file (- reads stdin)")
    p.add_argument("--run-dir", help="run folder (default runs/<timestamp>)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--otel",
        metavar="URL",
        help="OTLP/HTTP endpoint: the gateway's LLM calls are sent as spans while the run "
        "goes, then the run's whole trace (mas2c[otel])",
    )
    p.add_argument(
        "--otel-service", default="mas2c", help="service.name (Phoenix project) for --otel"
    )
    _add_json(p)
    _add_sandbox_flags(p)
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_run)

    p = verbs.add_parser(
        "generate", help="write a spec for a task with an LLM (validated, repaired)"
    )
    p.add_argument("task", help="what the system should do")
    p.add_argument("-o", "--output", required=True, help="spec file to write (YAML; - for stdout)")
    p.add_argument("--examples", help="folder of example specs for few-shot (default: specs/)")
    p.add_argument(
        "--model",
        help="model name for the generator (default MAS2C_MODEL; the embedded model's own "
        "name on --llm embedded; else gpt-4o-mini)",
    )
    p.add_argument(
        "--max-repairs", type=_count, default=3, help="validator-feedback rounds (default 3)"
    )
    _add_prompt_flag(p)
    _add_json(p)
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_generate)

    p = verbs.add_parser(
        "configure", help="bind unbound model slots from a pool (by LLM or by rule)"
    )
    p.add_argument("spec", help="spec file")
    p.add_argument("--pool", required=True, help="pool file: id -> {model, description, price}")
    p.add_argument("-o", "--output", help="configured spec to write (default or -: stdout)")
    p.add_argument("--rule", action="store_true", help="bind by the documented rule, no LLM")
    p.add_argument(
        "--rebind", action="store_true", help="also rebind agents that already have a model"
    )
    p.add_argument("--model", help="model name for the implementer")
    _add_json(p)
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_configure)

    p = verbs.add_parser(
        "solve", help="generate -> configure -> compile -> run, the whole MAS² loop"
    )
    p.add_argument("task", help="what the system should do")
    p.add_argument("--input", required=True, help="input JSON file (- reads stdin)")
    p.add_argument("--run-dir", help="solve folder (default runs/<timestamp>)")
    p.add_argument(
        "--pool", help="model pool for configure (default: the spec's own models, by rule)"
    )
    p.add_argument("--model", help="model name for the generator and implementer")
    p.add_argument(
        "--max-repairs",
        type=_count,
        help="generator repair rounds (default 3; 2 on the embedded model)",
    )
    _add_prompt_flag(p)
    p.add_argument(
        "--rectify-rounds",
        type=_count,
        default=3,
        help="rectifier rounds when the first run fails (default 3; 0 = none)",
    )
    _add_json(p)
    _add_sandbox_flags(p)
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_solve)

    p = verbs.add_parser(
        "rectify",
        help="repair the system of a failed (or overspent) run, re-run it, keep every round",
    )
    p.add_argument("run_dir", help="the run folder (of `mas2c run` or a solve's run-1/)")
    p.add_argument(
        "--spec", help="the spec that ran (default: the run folder's spec.json or build/)"
    )
    p.add_argument("--input", help="the input (default: the run folder's input.json)")
    p.add_argument("--max-rounds", type=_count, default=3, help="fix-and-rerun rounds (default 3)")
    p.add_argument(
        "--write",
        action="store_true",
        help="write the fixed spec as <stem>.rectified.yaml beside --spec (else in RUN_DIR); "
        "an existing file of that name is refused unless --force",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --write: overwrite an existing <stem>.rectified.yaml",
    )
    p.add_argument(
        "--max-cost", type=_positive, help="also rectify a successful run that cost more (USD)"
    )
    p.add_argument(
        "--max-calls", type=_count, help="also rectify a successful run with more LLM calls"
    )
    p.add_argument(
        "--allow-budget-raise", action="store_true", help="a fix may raise the spec's budgets"
    )
    p.add_argument("--pool", help="model pool for cheaper-model fixes (default: the spec's models)")
    p.add_argument("--no-llm", action="store_true", help="deterministic fixes only")
    p.add_argument("--no-resume", action="store_true", help="re-run every step (no checkpoints)")
    p.add_argument("--model", help="model name for the rectifier LLM")
    _add_json(p)
    _add_sandbox_flags(p)
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_rectify)

    p = verbs.add_parser(
        "sandbox", help="build the sandbox image, report its status, prune what killed runs left"
    )
    p.add_argument("action", choices=["build", "status", "prune", "pool"])
    p.add_argument(
        "pool_action",
        nargs="?",
        choices=["start", "status", "stop"],
        help="with `pool`: the warm-container service for separate `mas2c run`s",
    )
    p.add_argument(
        "--size", type=_positive_int, default=2, help="pool: warm containers kept (default 2)"
    )
    p.add_argument(
        "--idle", type=_positive, default=300.0, help="pool: seconds a warm container waits (300)"
    )
    p.add_argument("--runtime", help="pool: container runtime (default $MAS2C_RUNTIME / runc)")
    p.add_argument("--timeout", type=_positive, default=600.0, help="pool: longest run (600 s)")
    p.add_argument(
        "--memory", type=_positive_int, default=1024, help="pool: memory limit MiB (1024)"
    )
    p.add_argument("--cpus", type=_positive, default=1.0, help="pool: CPU limit (1)")
    p.add_argument(
        "--base",
        default="python:3.12-slim",
        help="base image (falls back to a Debian rootfs offline)",
    )
    p.add_argument("--tag", default="mas2c-sandbox:latest", help="build: image name (%(default)s)")
    _add_json(p)
    p.set_defaults(handler=cmd_sandbox)

    p = verbs.add_parser(
        "bench",
        help="HumanEval through a spec or `mas2c solve`, scored in the sandbox (resumable)",
    )
    p.add_argument("suite", choices=["humaneval"], help="the benchmark")
    p.add_argument("--limit", type=_positive_int, help="the first N problems (default all 164)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--spec", help="the MAS spec to evaluate (default specs/code-generation.yaml)"
    )
    which.add_argument("--solve", action="store_true", help="evaluate `mas2c solve` per problem")
    p.add_argument(
        "--check-scorer",
        action="store_true",
        help="check the scorer: canonical solutions must pass, broken ones fail",
    )
    p.add_argument(
        "--workers", type=_positive_int, default=2, help="problems (sandboxes) at once (default 2)"
    )
    p.add_argument("--run-dir", help="run folder; an existing one is resumed")
    p.add_argument(
        "--sandbox",
        type=_SANDBOX_FLAG,
        choices=["docker", "unisolated"],
        default="docker",
        help="where everything runs",
    )
    p.add_argument("--image", help="sandbox image (default mas2c-sandbox:latest)")
    p.add_argument(
        "--test-timeout",
        type=_positive,
        default=20.0,
        help="seconds for one problem's tests (default 20)",
    )
    p.add_argument(
        "--hide-tests",
        action="store_true",
        help="give the system only the prompt's doctest examples as `test`, not the dataset's tests",
    )
    p.add_argument("--model", help="model name for solve's generator and implementer")
    p.add_argument(
        "--engine",
        type=_ENGINE_FLAG,
        choices=["threads", "ray"],
        default="threads",
        help="see `mas2c batch`",
    )
    p.add_argument("--address", help="the Ray cluster (with --engine ray)")
    p.add_argument(
        "--max-cost", type=_positive, metavar="USD", help="stop starting problems at this cost"
    )
    _add_json(p)
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_bench)

    _add_observe_verbs(verbs)
    p = verbs.add_parser(
        "batch", help="a spec or `solve` over a JSONL dataset, scored (threads or Ray; resumable)"
    )
    p.add_argument("dataset", help="JSONL file, one JSON object per row (.jsonl or .jsonl.gz)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--spec", help="the MAS spec to run on every row")
    which.add_argument("--solve", metavar="TASK", help="run `mas2c solve TASK` on every row")
    p.add_argument("--map", action="append", metavar="INPUT=FIELD", help="row field of an input")
    p.add_argument(
        "--id-field",
        help="row field with the row's id, required in every row (default: id if present)",
    )
    p.add_argument("--answer-field", default="answer", help="row field with the expected answer")
    p.add_argument("--output", help="the spec output to score (default answer, or the only one)")
    p.add_argument(
        "--scorer", default="exact", help="exact, numeric, f1, math, code or python:FILE"
    )
    p.add_argument("--limit", type=_positive_int, help="the first N rows")
    p.add_argument(
        "--workers", type=_positive_int, default=2, help="rows (sandboxes) at once (default 2)"
    )
    p.add_argument(
        "--engine",
        type=_ENGINE_FLAG,
        choices=["threads", "ray"],
        default="threads",
        help="threads on this machine, or Ray",
    )
    p.add_argument(
        "--address", help="the Ray cluster to use (default: RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument(
        "--max-retries", type=_count, default=3, help="Ray retries of a row lost with its node"
    )
    p.add_argument(
        "--max-cost", type=_positive, metavar="USD", help="stop starting rows at this total cost"
    )
    p.add_argument("--baseline", choices=["cot-sc"], help="run a matched-cost baseline beside it")
    p.add_argument("--baseline-model", help="the spec's model id the baseline samples")
    p.add_argument("--baseline-field", help="row field the baseline gets as its question")
    p.add_argument(
        "--pilot", type=_positive_int, default=5, help="rows that measure the cost to match (5)"
    )
    p.add_argument("--run-dir", help="run folder; an existing one is resumed")
    p.add_argument(
        "--sandbox",
        type=_SANDBOX_FLAG,
        choices=["docker", "unisolated"],
        default="docker",
        help="where each row's system runs (unisolated: NOT isolated)",
    )
    p.add_argument("--image", help="sandbox image (default mas2c-sandbox:latest)")
    p.add_argument("--test-timeout", type=_positive, default=20.0, help="seconds for one scoring")
    p.add_argument("--model", help="model name for solve's generator and implementer")
    _add_json(p)
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_batch)

    _add_image_verb(verbs)
    for register in _EXTRA_VERBS:
        register(verbs)
    return parser


# Later modules add their verbs here, keeping this file the one place that knows the command line.
_EXTRA_VERBS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the verb, and turn every error into its message and exit code (one handler).

    As the program itself (``argv`` None), ``mas2c run`` ends its process as soon as the
    run is complete (see :func:`_exit_now`)."""
    code = _main(argv)
    if argv is None and next((a for a in sys.argv[1:] if a[:1] != "-"), "") == "run":
        _exit_now(code)
    return code


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's finalisation (module teardown and a
    last garbage collection: about 40 ms after a run, a tenth of a cold run's overhead).

    By the time this is called every file of the run folder has been written and
    closed and the container removal joined; what finalisation would still do is done
    here in order: the other non-daemon threads are joined, the ``atexit`` functions
    run (container removals, logging's flush), stdout and stderr are flushed."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe (| head): nothing to flush
            stream.flush()
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A file name that is not UTF-8 (Python holds its bytes as lone surrogates) is shown
    # as `\udcff`, also inside JSON (a valid escape there), never a UnicodeEncodeError;
    # stdout stays UTF-8 whatever the locale's error handler.
    with contextlib.suppress(AttributeError, ValueError):  # not a text stream (a test's)
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    options = argv[: argv.index("--")] if "--" in argv else argv
    as_json = any(_is_json_flag(a) for a in options)
    parser = build_parser()
    verb = next((a for a in argv if not a.startswith("-")), "")
    head = argv[: argv.index(verb)] if verb else argv  # the options before the verb
    if any(_is_json_flag(a) for a in head):  # `mas2c --json VERB ...`: `mas2c VERB --json ...`
        rest = [verb, "--json", *argv[len(head) + 1 :]] if verb else []
        argv = [a for a in head if not _is_json_flag(a)] + rest
    try:
        try:
            args = parser.parse_args(argv)
        except _Informational as info:
            return _inform(info, as_json)
        verb = args.verb or ""
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            if as_json:
                raise UsageError("no verb given (see mas2c --help)")
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if getattr(args, "trace_content", False):
            # Every run this command starts traces prompts and completions (mas2c.run reads it).
            os.environ["MAS2C_TRACE_CONTENT"] = "1"
        with _warm_pool(args):
            return handler(args)
    except _ArgumentError as exc:
        if not as_json:
            exc.parser.print_usage(sys.stderr)
            sys.stderr.write(f"{exc.parser.prog}: error: {terminal_safe(str(exc))}\n")
            return EXIT_USAGE
        return _fail(verb, exc, as_json)
    except Mas2cError as exc:
        return _fail(verb, exc, as_json)
    except OSError as exc:  # a file that cannot be read or written, a full disk, ...
        return _fail(verb, FileFailure(os_error_message(exc)), as_json)
    except KeyboardInterrupt:
        return _fail(verb, Interrupted("interrupted"), as_json)


def _is_json_flag(arg: str) -> bool:
    """`--json`, as argparse reads it: also abbreviated (`--js`) or with a value
    (`--json=1`, a usage error that still wants its JSON document)."""
    return (len(arg) >= 3 and "--json".startswith(arg)) or arg.startswith("--json=")


def _inform(info: _Informational, as_json: bool) -> int:
    """`--help` or `--version`: as text on stdout, or as one JSON document (exit 0)."""
    if info.what == "version":
        if as_json:
            _print_json({"ok": True, "version": __version__})
        else:
            sys.stdout.write(f"mas2c {__version__}\n")
    elif as_json:
        _print_json({"ok": True, "help": help_document(info.parser)})
    else:
        info.parser.print_help(sys.stdout)
    return EXIT_OK


_POOLED_VERBS = {"solve", "rectify", "bench"}  # batch: its engines run elsewhere


def _warm_pool(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    """A warm container pool for the commands that run many sandboxes (docker, unless
    --no-pool); its size from MAS2C_POOL_SIZE (default 2, 0: none), its containers'
    idle lifetime from MAS2C_POOL_IDLE (seconds, default 300)."""
    if (
        getattr(args, "verb", None) not in _POOLED_VERBS
        or getattr(args, "sandbox", None) != "docker"
        or getattr(args, "no_pool", False)
        or os.environ.get("MAS2C_NO_POOL") == "1"
    ):
        return contextlib.nullcontext()
    try:
        size = int(os.environ.get("MAS2C_POOL_SIZE", "2"))
    except ValueError:
        raise UsageError("MAS2C_POOL_SIZE must be a whole number") from None
    try:
        idle_s = float(os.environ.get("MAS2C_POOL_IDLE", "300"))
    except ValueError:
        raise UsageError("MAS2C_POOL_IDLE must be a number of seconds") from None
    if size <= 0:
        return contextlib.nullcontext()
    from mas2c import sandbox
    from mas2c.sandbox.pool import Pool, PoolSpec

    limits = sandbox.Limits(
        timeout_s=getattr(args, "timeout", 600.0),
        memory_mb=getattr(args, "memory", 1024),
        cpus=getattr(args, "cpus", 1.0),
    )
    runtime = getattr(args, "runtime", None) or sandbox.default_runtime()
    image = getattr(args, "image", None) or sandbox.DEFAULT_IMAGE
    spec = PoolSpec(image, runtime, limits, idle_s)
    try:
        spec.validate()
    except sandbox.SandboxError as exc:
        raise UsageError(str(exc).replace("pool idle lifetime", "MAS2C_POOL_IDLE")) from None
    return Pool(spec, size=size)


def _fail(verb: str, exc: Mas2cError, as_json: bool) -> int:
    """The one error report: a message on stderr, and with --json one document on stdout."""
    report = getattr(exc, "report", None) if exc.code == "spec_invalid" else None
    located = report is not None  # the validator's report names file:line:column itself
    message = terminal_safe(_stdin_named(str(exc)))
    sys.stderr.write(
        (message if located else f"mas2c {verb}: {message}".replace("mas2c : ", "mas2c: ")) + "\n"
    )
    if as_json:
        error = exc.to_json()
        error["message"] = _stdin_named(error["message"])
        if report is not None:
            error["report"] = report.to_json()
        _print_json({"ok": False, "error": error})
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
