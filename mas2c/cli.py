"""The `mas2c` command line.

Each verb's module is imported only when that verb runs, so `mas2c --help`
stays fast. Exit codes: 0 success, 1 the input is invalid or the run failed,
2 usage error (bad flags, missing file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mas2c import __version__
from mas2c.meta import meta_client

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with how mas2c was called: printed without a traceback, exit 2."""


Handler = Callable[[argparse.Namespace], int]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _existing(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file or directory")
    return p


# -- verbs ---------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from mas2c.validate import validate_file

    reports = []
    for name in args.spec:
        path = _existing(name)
        try:
            reports.append(validate_file(path))
        except OSError as exc:
            raise UsageError(f"{name}: {exc.strerror or exc}") from None
    if args.json:
        _print_json(reports[0].to_json() if len(reports) == 1 else [r.to_json() for r in reports])
    else:
        for report in reports:
            stream = sys.stdout if report.ok else sys.stderr
            stream.write(report.format() + "\n")
    return EXIT_OK if all(r.ok for r in reports) else EXIT_INVALID


def cmd_schema(args: argparse.Namespace) -> int:
    from mas2c.spec import json_schema

    text = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.output:
        from mas2c.files import write_text_atomic

        try:
            write_text_atomic(Path(args.output), text)
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _load(path_text: str) -> Any:
    """A valid spec, or the validator's report on stderr and exit 1."""
    from mas2c.validate import SpecInvalid, load_spec

    path = _existing(path_text)
    if path.is_dir():
        raise UsageError(f"{path_text}: is a folder, expected a spec file")
    try:
        return load_spec(path)
    except SpecInvalid as exc:
        raise SpecRejected(exc.report.format()) from None
    except OSError as exc:
        raise UsageError(f"{path_text}: {exc.strerror or exc}") from None


class SpecRejected(Exception):
    """The spec has errors: printed with their places, exit 1."""


def cmd_compile(args: argparse.Namespace) -> int:
    from mas2c.compile import CompileError, compile_spec

    spec = _load(args.spec)
    try:
        build = compile_spec(spec)
    except CompileError as exc:
        raise SpecRejected(f"{args.spec}: {exc}") from None
    out = Path(args.output or f"build/{build.package}")
    try:
        build.write(out)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    if args.json:
        _print_json({"output": str(out), "package": build.package, "files": sorted(build.files)})
    else:
        sys.stdout.write(
            f"compiled {spec.name} -> {out} ({len(build.files)} files, package {build.package})\n"
        )
    return EXIT_OK


def cmd_graph(args: argparse.Namespace) -> int:
    from mas2c import graph

    spec = _load(args.spec)
    sys.stdout.write(graph.dot(spec) if args.format == "dot" else graph.mermaid(spec))
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from mas2c.diff import diff_paths
    from mas2c.validate import SpecInvalid

    a, b = _existing(args.a), _existing(args.b)
    try:
        text, different, data = diff_paths(a, b)
    except SpecInvalid as exc:
        raise SpecRejected(exc.report.format()) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json and data is not None:
        _print_json({"different": different, "changes": data})
    else:
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return EXIT_INVALID if different else EXIT_OK


def _warn(message: str) -> None:
    sys.stderr.write(f"mas2c: warning: {message}\n")


def _llm_config(args: argparse.Namespace) -> Any:
    from mas2c.run import LLMConfig

    llm = getattr(args, "llm", None)
    return LLMConfig(
        url=None if llm in (None, "local") else llm,
        force_local=llm == "local",
        local_model=Path(args.local_model) if getattr(args, "local_model", None) else None,
        record=Path(args.record) if getattr(args, "record", None) else None,
        replay=Path(_existing(args.replay)) if getattr(args, "replay", None) else None,
        cache=bool(getattr(args, "cache", False)),
    )


def _sandbox_options(args: argparse.Namespace) -> dict[str, Any]:
    from mas2c import sandbox

    limits = sandbox.Limits(
        timeout_s=args.timeout,
        memory_mb=args.memory,
        cpus=args.cpus,
    )
    loosen = sandbox.Loosen(
        network=args.allow_network, writable_root=args.writable_root, root_user=args.as_root
    )
    return {"backend": args.sandbox, "limits": limits, "loosen": loosen, "image": args.image}


def cmd_run(args: argparse.Namespace) -> int:
    from mas2c.run import run_system

    target = _existing(args.target)
    input_path = _existing(args.input)
    run_dir = Path(args.run_dir or _default_run_dir())
    outcome = _guarded(
        lambda: run_system(
            target,
            input_path,
            run_dir,
            llm=_llm_config(args),
            on_warning=_warn,
            **_sandbox_options(args),
        )
    )
    if args.json:
        _print_json(
            {
                "run_dir": str(run_dir),
                "status": outcome.status,
                "exit_code": outcome.exit_code,
                "result": outcome.result,
                "usage": outcome.usage,
                "sandbox": outcome.sandbox,
            }
        )
    else:
        _print_outcome(outcome)
    return EXIT_OK if outcome.ok else EXIT_INVALID


def _default_run_dir() -> str:
    import time

    return f"runs/{time.strftime('%Y%m%d-%H%M%S')}"


def _print_outcome(outcome: Any) -> None:
    usage = outcome.usage
    line = (
        f"{outcome.status} (exit {outcome.exit_code}) in {outcome.sandbox.get('duration_s', 0):.1f}s; "
        f"{usage.get('calls', 0)} LLM call(s), {usage.get('total_tokens', 0)} tokens, "
        f"${usage.get('cost_usd', 0):.4f}; run folder {outcome.run_dir}"
    )
    if outcome.ok:
        sys.stdout.write(
            json.dumps(outcome.result.get("outputs", {}), indent=2, ensure_ascii=False) + "\n"
        )
        sys.stdout.write(line + "\n")
    else:
        error = outcome.result.get("error") or {}
        where = f" at {error['spec_pointer']}" if error.get("spec_pointer") else ""
        sys.stderr.write(
            f"{error.get('type', 'Error')}{where}: {error.get('message', '')}\n{line}\n"
        )


def _guarded(action: Callable[[], Any]) -> Any:
    """Turns the setup errors of a run (sandbox, gateway, local model) into usage-level messages."""
    from mas2c.gateway import GatewayError
    from mas2c.local import LocalModelError
    from mas2c.run import RunError
    from mas2c.sandbox import SandboxError
    from mas2c.validate import SpecInvalid

    try:
        return action()
    except SpecInvalid as exc:
        raise SpecRejected(exc.report.format()) from None
    except (RunError, SandboxError, GatewayError, LocalModelError) as exc:
        raise SetupFailed(str(exc)) from None
    except OSError as exc:  # an unwritable run folder or cassette path, a full disk, ...
        raise SetupFailed(_os_error(exc)) from None
    except Exception as exc:
        # An endpoint that fails the meta-agents (generate, configure, solve). mas2c.llm
        # imports openai (slow): look it up only if the command loaded it.
        llm = sys.modules.get("mas2c.llm")
        if llm is not None and isinstance(exc, llm.LLMError):
            raise SetupFailed(str(exc)) from None
        raise


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def _task(text: str) -> str:
    if not text.strip():
        raise UsageError("the task is empty; say what the system should do")
    return text


def _write_spec(spec: Any, out: Path) -> str:
    from mas2c.generate import write_spec_yaml

    try:
        return write_spec_yaml(spec, out)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None


class SetupFailed(Exception):
    """A run could not start (no daemon, no image, no endpoint): exit 1 with the fix."""


def cmd_sandbox(args: argparse.Namespace) -> int:
    from mas2c import sandbox

    if args.action == "build":
        tag = _guarded(
            lambda: sandbox.build_image(base=args.base, tag=args.tag, on_progress=_progress)
        )
        sys.stdout.write(f"built {tag}\n")
        return EXIT_OK
    status = sandbox.status()
    if args.json:
        _print_json(status)
    else:
        for key, value in status.items():
            sys.stdout.write(f"{key}: {value}\n")
    return EXIT_OK


def _progress(message: str) -> None:
    sys.stderr.write(f"mas2c: {message}\n")


def _add_sandbox_flags(p: argparse.ArgumentParser) -> None:
    from_env = "docker"
    p.add_argument(
        "--sandbox", choices=["docker", "local"], default=from_env, help="where the program runs"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="wall-clock limit in seconds (default 600)"
    )
    p.add_argument("--memory", type=int, default=1024, help="memory limit in MiB (default 1024)")
    p.add_argument("--cpus", type=float, default=1.0, help="CPU limit (default 1)")
    p.add_argument("--image", help="sandbox image (default mas2c-sandbox:latest)")
    p.add_argument(
        "--allow-network",
        action="store_true",
        help="LOOSENS the sandbox: give the container a network",
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
    from mas2c.report import ReportError, write_report

    try:
        out = write_report(_existing(args.run_dir), Path(args.output) if args.output else None)
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    sys.stdout.write(f"{out}\n")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from mas2c.otel import ExportError, export_otel

    try:
        sent = export_otel(
            _existing(args.run_dir), args.endpoint, service=args.service, timeout_s=args.timeout
        )
    except ExportError as exc:
        raise SetupFailed(str(exc)) from None
    if args.json:
        _print_json(sent)
    else:
        sys.stdout.write(f"exported {sent['spans']} span(s) of trace {sent['trace_id']}\n")
    return EXIT_OK


def _add_observe_verbs(verbs: Any) -> None:
    p = verbs.add_parser("report", help="write a self-contained HTML report of a run folder")
    p.add_argument("run_dir", help="a run, rectify or solve folder")
    p.add_argument("-o", "--output", help="HTML file to write (default RUN_DIR/report.html)")
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
        "--timeout", type=float, default=30.0, help="seconds to deliver, retries included (30)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_export)


def _add_llm_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--llm",
        help="'local' (embedded model) or an OpenAI-compatible base URL (default: OPENAI_BASE_URL, else local)",
    )
    p.add_argument(
        "--local-model", help="a GGUF file for the embedded engine (default SmolLM2-135M-Instruct)"
    )
    p.add_argument("--record", help="record every LLM exchange to this cassette (JSONL)")
    p.add_argument("--replay", help="answer LLM requests from this cassette; no endpoint needed")
    p.add_argument(
        "--cache", action="store_true", help="answer identical LLM requests from a cache"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from mas2c.generate import GenerateError, generate_spec

    task = _task(args.task)
    out = Path(args.output)
    examples = _existing(args.examples) if args.examples else None
    if examples is not None and not examples.is_dir():
        raise UsageError(f"{args.examples}: --examples expects a folder of example specs")

    def action() -> Any:
        with meta_client(_llm_config(args), model=args.model, progress=_progress) as client:
            return generate_spec(
                task,
                client,
                examples_dir=examples,
                max_repairs=args.max_repairs,
                on_progress=_progress,
            )

    try:
        result = _guarded(action)
    except GenerateError as exc:
        raise SpecRejected(
            f"mas2c generate: no valid spec after {exc.attempts} answer(s):\n{exc}"
        ) from None
    _write_spec(result.spec, out)
    if args.json:
        _print_json({"output": str(out), **result.to_json()})
    else:
        sys.stdout.write(f"wrote {out} ({result.spec.name}, {result.attempts} answer(s))\n")
    return EXIT_OK


def cmd_configure(args: argparse.Namespace) -> int:
    from mas2c.configure import ConfigureError, configure_spec, load_pool

    spec = _load(args.spec)
    out = Path(args.output) if args.output else None

    def action() -> Any:
        pool = load_pool(_existing(args.pool))
        if args.rule:
            return configure_spec(spec, pool, rebind=args.rebind)
        with meta_client(_llm_config(args), model=args.model, progress=_progress) as client:
            return configure_spec(
                spec, pool, client=client, rebind=args.rebind, on_progress=_progress
            )

    try:
        result = _guarded(action)
    except ConfigureError as exc:
        raise SpecRejected(f"mas2c configure: {exc}") from None
    text = _write_spec(result.spec, out) if out else None
    if args.json:
        _print_json({"output": str(out) if out else None, **result.to_json()})
    else:
        for agent, choice in sorted(result.choices.items()):
            sys.stderr.write(f"{agent} -> {choice.model} ({choice.by}: {choice.reason})\n")
        if out is None:
            from mas2c.generate import spec_to_yaml

            sys.stdout.write(spec_to_yaml(result.spec))
        else:
            sys.stdout.write(f"wrote {out}\n" if text is not None else "")
    return EXIT_OK


def cmd_rectify(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from mas2c.configure import ConfigureError, load_pool
    from mas2c.rectify import RectifyError, rectify
    from mas2c.run import make_upstream

    run_dir = _existing(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{args.run_dir}: expected a run folder")
    if args.max_rounds < 1:
        raise UsageError("--max-rounds must be at least 1")
    spec_path = _existing(args.spec) if args.spec else None
    input_path = _existing(args.input) if args.input else None
    llm = _llm_config(args)
    progress = None if args.json else _progress

    def action() -> Any:
        pool = load_pool(_existing(args.pool)) if args.pool else None
        upstream = make_upstream(llm, on_progress=progress) if llm.replay is None else None
        try:
            meta = (
                nullcontext(None)
                if args.no_llm
                else meta_client(llm, model=args.model, progress=progress, upstream=upstream)
            )
            with meta as client:
                return rectify(
                    run_dir,
                    spec_path=spec_path,
                    input_path=input_path,
                    max_rounds=args.max_rounds,
                    write=args.write,
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
        finally:
            close = getattr(upstream, "close", None)
            if callable(close):
                close()

    try:
        outcome = _guarded(action)
    except (RectifyError, ConfigureError) as exc:
        raise SetupFailed(str(exc)) from None
    if args.json:
        _print_json(outcome.to_json())
    else:
        sys.stdout.write(
            f"{outcome.status}: {outcome.stop_reason} ({outcome.rounds_run} round(s), "
            f"{outcome.llm_calls} rectifier LLM call(s)); rounds in {run_dir / 'rectify'}\n"
        )
        if outcome.written is not None:
            sys.stdout.write(f"wrote {outcome.written}\n")
    return EXIT_OK if outcome.ok else EXIT_INVALID


def cmd_solve(args: argparse.Namespace) -> int:
    from mas2c.configure import ConfigureError
    from mas2c.solve import SolveError, print_progress, solve

    task = _task(args.task)
    input_path = _existing(args.input)
    solve_dir = Path(args.run_dir or _default_run_dir())

    def action() -> Any:
        return solve(
            task,
            input_path,
            solve_dir,
            llm=_llm_config(args),
            model=args.model,
            pool_path=_existing(args.pool) if args.pool else None,
            max_repairs=args.max_repairs,
            progress=None if args.json else print_progress,
            on_warning=_warn,
            rectify_rounds=args.rectify_rounds,
            **_sandbox_options(args),
        )

    try:
        outcome = _guarded(action)
    except (SolveError, ConfigureError) as exc:
        raise SetupFailed(str(exc)) from None
    if args.json:
        _print_json(outcome.to_json())
    else:
        sys.stdout.write((solve_dir / "report.md").read_text("utf-8"))
    return EXIT_OK if outcome.ok else EXIT_INVALID


def cmd_bench(args: argparse.Namespace) -> int:
    from mas2c.bench import BenchError, BenchOptions, check_scorer, run_humaneval

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.check_scorer and (args.spec or args.solve):
        raise UsageError("--check-scorer runs the dataset's own solutions; drop --spec/--solve")
    kind = "check" if args.check_scorer else "run"
    run_dir = Path(args.run_dir or f"runs/humaneval-{kind}-{_default_run_dir().split('/')[-1]}")
    spec = _existing(args.spec) if args.spec else None

    def action() -> Any:
        if args.check_scorer:
            return check_scorer(
                run_dir,
                limit=args.limit,
                workers=args.workers,
                backend=args.sandbox,
                image=args.image,
                test_timeout_s=args.test_timeout,
                on_warning=_warn,
            )
        return run_humaneval(
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

    try:
        summary = _guarded(action)
    except BenchError as exc:
        raise SetupFailed(str(exc)) from None
    if args.json:
        _print_json(summary)
    else:
        sys.stdout.write((run_dir / "results.md").read_text("utf-8").split("\n\n| problem")[0])
        sys.stdout.write(f"\nrun folder: {run_dir} (results.jsonl, summary.json, results.md)\n")
    if args.check_scorer:
        return EXIT_OK if summary["ok"] else EXIT_INVALID
    return EXIT_OK if summary["complete"] else EXIT_INVALID


def cmd_batch(args: argparse.Namespace) -> int:
    from mas2c.batch import BatchError, BatchOptions, parse_mapping, run_batch

    if args.workers < 1 or (args.limit is not None and args.limit < 1) or args.pilot < 1:
        raise UsageError("--workers, --limit and --pilot must be at least 1")
    if args.address and args.engine != "ray":
        raise UsageError("--address is for --engine ray")
    run_dir = Path(args.run_dir or f"runs/batch-{_default_run_dir().split('/')[-1]}")

    def action() -> Any:
        return run_batch(
            BatchOptions(
                run_dir=run_dir,
                dataset=_existing(args.dataset),
                spec=_existing(args.spec) if args.spec else None,
                solve_task=args.solve,
                mapping=parse_mapping(args.map or []),
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

    try:
        summary = _guarded(action)
    except BatchError as exc:
        raise SetupFailed(str(exc)) from None
    if args.json:
        _print_json(summary)
    else:
        sys.stdout.write((run_dir / "report.md").read_text("utf-8").split("\nRows not passed")[0])
        sys.stdout.write(f"run folder: {run_dir} (results.jsonl, summary.json, report.md)\n")
    return EXIT_OK if summary["complete"] else EXIT_INVALID


# -- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mas2c",
        description="Build, run and repair LLM multi-agent systems from declarative specs (MAS²).",
    )
    parser.add_argument("--version", action="version", version=f"mas2c {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    p = verbs.add_parser("validate", help="check specs and report every problem with its place")
    p.add_argument("spec", nargs="+", help="spec file(s), YAML or JSON")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(handler=cmd_validate)

    p = verbs.add_parser("schema", help="print the JSON Schema of the spec")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(handler=cmd_schema)

    p = verbs.add_parser("compile", help="compile a spec into a standalone Python package")
    p.add_argument("spec", help="spec file")
    p.add_argument("-o", "--output", help="output folder (default build/<package>)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(handler=cmd_compile)

    p = verbs.add_parser("graph", help="print the workflow as a Mermaid (or dot) diagram")
    p.add_argument("spec", help="spec file")
    p.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    p.set_defaults(handler=cmd_graph)

    p = verbs.add_parser(
        "diff", help="compare two specs (semantically) or two builds (file by file)"
    )
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="machine-readable changes (specs only)")
    p.set_defaults(handler=cmd_diff)

    p = verbs.add_parser(
        "run", help="run a spec or a build in the sandbox, with the LLM gateway on the host"
    )
    p.add_argument("target", help="spec file or build folder")
    p.add_argument("--input", required=True, help="input JSON file")
    p.add_argument("--run-dir", help="run folder (default runs/<timestamp>)")
    p.add_argument("--json", action="store_true", help="machine-readable outcome")
    _add_sandbox_flags(p)
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_run)

    p = verbs.add_parser(
        "generate", help="write a spec for a task with an LLM (validated, repaired)"
    )
    p.add_argument("task", help="what the system should do")
    p.add_argument("-o", "--output", required=True, help="spec file to write (YAML)")
    p.add_argument("--examples", help="folder of example specs for few-shot (default: specs/)")
    p.add_argument(
        "--model", help="model name for the generator (default MAS2C_MODEL or gpt-4o-mini)"
    )
    p.add_argument(
        "--max-repairs", type=int, default=3, help="validator-feedback rounds (default 3)"
    )
    p.add_argument("--json", action="store_true")
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_generate)

    p = verbs.add_parser(
        "configure", help="bind unbound model slots from a pool (by LLM or by rule)"
    )
    p.add_argument("spec", help="spec file")
    p.add_argument("--pool", required=True, help="pool file: id -> {model, description, price}")
    p.add_argument("-o", "--output", help="configured spec to write (default: print it)")
    p.add_argument("--rule", action="store_true", help="bind by the documented rule, no LLM")
    p.add_argument(
        "--rebind", action="store_true", help="also rebind agents that already have a model"
    )
    p.add_argument("--model", help="model name for the implementer")
    p.add_argument("--json", action="store_true")
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_configure)

    p = verbs.add_parser(
        "solve", help="generate -> configure -> compile -> run, the whole MAS² loop"
    )
    p.add_argument("task", help="what the system should do")
    p.add_argument("--input", required=True, help="input JSON file")
    p.add_argument("--run-dir", help="solve folder (default runs/<timestamp>)")
    p.add_argument(
        "--pool", help="model pool for configure (default: the spec's own models, by rule)"
    )
    p.add_argument("--model", help="model name for the generator and implementer")
    p.add_argument(
        "--max-repairs", type=int, help="generator repair rounds (default 3; 1 on the local model)"
    )
    p.add_argument(
        "--rectify-rounds",
        type=int,
        default=3,
        help="rectifier rounds when the first run fails (default 3; 0 = none)",
    )
    p.add_argument("--json", action="store_true")
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
    p.add_argument("--max-rounds", type=int, default=3, help="fix-and-rerun rounds (default 3)")
    p.add_argument(
        "--write",
        action="store_true",
        help="write the fixed spec as <stem>.rectified.yaml beside --spec (else in RUN_DIR)",
    )
    p.add_argument(
        "--max-cost", type=float, help="also rectify a successful run that cost more (USD)"
    )
    p.add_argument(
        "--max-calls", type=int, help="also rectify a successful run with more LLM calls"
    )
    p.add_argument(
        "--allow-budget-raise", action="store_true", help="a fix may raise the spec's budgets"
    )
    p.add_argument("--pool", help="model pool for cheaper-model fixes (default: the spec's models)")
    p.add_argument("--no-llm", action="store_true", help="deterministic fixes only")
    p.add_argument("--no-resume", action="store_true", help="re-run every step (no checkpoints)")
    p.add_argument("--model", help="model name for the rectifier LLM")
    p.add_argument("--json", action="store_true")
    _add_sandbox_flags(p)
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_rectify)

    p = verbs.add_parser("sandbox", help="build the sandbox image or report its status")
    p.add_argument("action", choices=["build", "status"])
    p.add_argument(
        "--base",
        default="python:3.12-slim",
        help="base image (falls back to a Debian rootfs offline)",
    )
    p.add_argument("--tag", default="mas2c-sandbox:latest")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_sandbox)

    p = verbs.add_parser(
        "bench",
        help="HumanEval through a spec or `mas2c solve`, scored in the sandbox (resumable)",
    )
    p.add_argument("suite", choices=["humaneval"], help="the benchmark")
    p.add_argument("--limit", type=int, help="the first N problems (default all 164)")
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
        "--workers", type=int, default=2, help="problems (sandboxes) at once (default 2)"
    )
    p.add_argument("--run-dir", help="run folder; an existing one is resumed")
    p.add_argument(
        "--sandbox", choices=["docker", "local"], default="docker", help="where everything runs"
    )
    p.add_argument("--image", help="sandbox image (default mas2c-sandbox:latest)")
    p.add_argument(
        "--test-timeout",
        type=float,
        default=20.0,
        help="seconds for one problem's tests (default 20)",
    )
    p.add_argument(
        "--hide-tests",
        action="store_true",
        help="give the system only the prompt's doctest examples as `test`, not the dataset's tests",
    )
    p.add_argument("--model", help="model name for solve's generator and implementer")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="see `mas2c batch`")
    p.add_argument("--address", help="the Ray cluster (with --engine ray)")
    p.add_argument(
        "--max-cost", type=float, metavar="USD", help="stop starting problems at this cost"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_bench)

    _add_observe_verbs(verbs)
    p = verbs.add_parser(
        "batch", help="a spec or `solve` over a JSONL dataset, scored (local or Ray; resumable)"
    )
    p.add_argument("dataset", help="JSONL file, one JSON object per row (.jsonl or .jsonl.gz)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--spec", help="the MAS spec to run on every row")
    which.add_argument("--solve", metavar="TASK", help="run `mas2c solve TASK` on every row")
    p.add_argument("--map", action="append", metavar="INPUT=FIELD", help="row field of an input")
    p.add_argument("--id-field", default="id", help="row field with the row's id (default id)")
    p.add_argument("--answer-field", default="answer", help="row field with the expected answer")
    p.add_argument("--output", help="the spec output to score (default answer, or the only one)")
    p.add_argument(
        "--scorer", default="exact", help="exact, numeric, f1, math, code or python:FILE"
    )
    p.add_argument("--limit", type=int, help="the first N rows")
    p.add_argument("--workers", type=int, default=2, help="rows (sandboxes) at once (default 2)")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument(
        "--address", help="the Ray cluster to use (default: RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument(
        "--max-retries", type=int, default=3, help="Ray retries of a row lost with its node"
    )
    p.add_argument(
        "--max-cost", type=float, metavar="USD", help="stop starting rows at this total cost"
    )
    p.add_argument("--baseline", choices=["cot-sc"], help="run a matched-cost baseline beside it")
    p.add_argument("--baseline-model", help="the spec's model id the baseline samples")
    p.add_argument("--baseline-field", help="row field the baseline gets as its question")
    p.add_argument("--pilot", type=int, default=5, help="rows that measure the cost to match (5)")
    p.add_argument("--run-dir", help="run folder; an existing one is resumed")
    p.add_argument("--sandbox", choices=["docker", "local"], default="docker")
    p.add_argument("--image", help="sandbox image (default mas2c-sandbox:latest)")
    p.add_argument("--test-timeout", type=float, default=20.0, help="seconds for one scoring")
    p.add_argument("--model", help="model name for solve's generator and implementer")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_llm_flags(p)
    p.set_defaults(handler=cmd_batch)

    for register in _EXTRA_VERBS:
        register(verbs)
    return parser


# Later modules add their verbs here (compile, run, generate, ...), keeping this file the one
# place that knows the command line.
_EXTRA_VERBS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "trace_content", False):
        # Every run this command starts traces prompts and completions (mas2c.run reads it).
        os.environ["MAS2C_TRACE_CONTENT"] = "1"
    try:
        return handler(args)
    except UsageError as exc:
        sys.stderr.write(f"mas2c {args.verb}: {exc}\n")
        return EXIT_USAGE
    except SpecRejected as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_INVALID
    except SetupFailed as exc:
        sys.stderr.write(f"mas2c {args.verb}: {exc}\n")
        return EXIT_INVALID
    except KeyboardInterrupt:
        sys.stderr.write(f"mas2c {args.verb}: interrupted\n")
        return 130
    except OSError as exc:  # a file that cannot be read or written, a full disk, ...
        sys.stderr.write(f"mas2c {args.verb}: {_os_error(exc)}\n")
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
