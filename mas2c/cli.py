"""The `mas2c` command line.

Each verb's module is imported only when that verb runs, so `mas2c --help`
stays fast. Exit codes: 0 success, 1 the input is invalid or the run failed,
2 usage error (bad flags, missing file).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mas2c import __version__

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

        write_text_atomic(Path(args.output), text)
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
    build.write(out)
    if args.json:
        _print_json({"output": str(out), "package": build.package, "files": sorted(build.files)})
    else:
        sys.stdout.write(f"compiled {spec.name} -> {out} ({len(build.files)} files, package {build.package})\n")
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

    p = verbs.add_parser("diff", help="compare two specs (semantically) or two builds (file by file)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="machine-readable changes (specs only)")
    p.set_defaults(handler=cmd_diff)

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
    try:
        return handler(args)
    except UsageError as exc:
        sys.stderr.write(f"mas2c {args.verb}: {exc}\n")
        return EXIT_USAGE
    except SpecRejected as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_INVALID
    except KeyboardInterrupt:
        sys.stderr.write(f"mas2c {args.verb}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
