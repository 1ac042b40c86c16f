"""The Ray engine of `mas2c batch` (``--engine ray [--address ADDR]``; the ``ray`` extra).

Contract:

* One Ray task per row (``num_cpus=1``). A task runs on whichever node Ray places it: it
  materialises the compiled package and the scorer package into that node's cache folder
  (``$MAS2C_BATCH_NODE_DIR``, default ``<tmp>/mas2c-batch-<uid>``, keyed by their sha256),
  runs the row there (its sandbox on that node's Docker, behind a gateway on that node) in a
  fresh temporary folder, and returns the result row and the files of its run folder.
* The API key and the endpoint URL (which may carry credentials in its userinfo or
  query) reach the nodes the way Ray passes secrets: the task's ``runtime_env``
  ``env_vars`` (OPENAI_API_KEY, OPENAI_BASE_URL), read by the node's gateway from its
  process environment. Neither is an argument of a task nor in the plan Ray stores,
  nor inside a sandbox.
* The driver alone writes the run folder (``results.jsonl``, ``rows/<id>/`` and
  ``rows/<id>/engine.json`` naming the node), keeps at most ``workers`` tasks in flight and
  checks the cost cap before each submission.
* A node that dies loses only its in-flight tasks: Ray re-runs them elsewhere
  (``max_retries``, system failures only). A task that raises is not retried and not
  recorded (the next run of the same command redoes it), like the threads engine. Its
  containers on the dead node are left to ``python -m mas2c.sandbox prune`` there.
* A node's answer is input, checked before anything is written (`check_answer`): an answer
  that is not a result of this row (not a dict, no row, another row's key) is an
  infrastructure failure, re-submitted up to ``max_retries`` times, then not recorded; a row
  with a value of the wrong type or out of range (a NaN or negative cost, a score outside
  [0, 1], a status that is no code, a prediction nested too deep) is recorded as an error
  with code ``RayBadResult`` and only its sane numbers (its cost counts only when finite and
  not negative); texts are clipped, the fields the driver knows (key, index, kept dataset
  fields, expected answer) are the driver's own, unknown fields are dropped, and files
  keep to safe relative names and to the same caps as on the node. The batch goes on.
  Ray's transport itself (pickle) trusts the cluster's nodes.
* Every node needs mas2c with the ``ray`` extra installed (the driver's version), Docker and
  the sandbox image (for ``--sandbox docker``), and must reach the LLM endpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from mas2c.batch import (
    _MISSING,
    MAX_NOTE_CHARS,
    BatchError,
    BatchOptions,
    Context,
    Job,
    Plan,
    ProgressBar,
    Row,
    _clip,
    lookup,
    run_row,
    sha256,
    shared_upstream,
    warn_once,
    write_scorer_package,
)
from mas2c.files import write_bytes_atomic, write_text_atomic

__all__ = ["Answer", "check_answer", "check_cluster", "node_task", "run_on_ray", "store_answer"]

MAX_FILE_BYTES = 4_000_000  # a run folder file larger than this comes back truncated
MAX_FOLDER_BYTES = 32_000_000
MAX_FILES = 5_000  # files of one row's run folder the driver writes
MAX_WARNINGS = 20  # warnings of one answer passed on
BAD_RESULT = "RayBadResult"  # error code of a row whose values a node got wrong


def node_dir() -> Path:
    """This node's cache and work folder."""
    configured = os.environ.get("MAS2C_BATCH_NODE_DIR")
    base = (
        Path(configured)
        if configured
        else Path(tempfile.gettempdir()) / f"mas2c-batch-{os.getuid()}"
    )
    base.mkdir(parents=True, exist_ok=True)
    return base


def _materialise(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder once per node (several workers may race: the first rename wins)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_build(files: Sequence[tuple[str, bytes]]) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        for name, data in files:
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    return write


def _collect(folder: Path) -> list[tuple[str, bytes]]:
    """The run folder's files (relative names), each and all capped."""
    files: list[tuple[str, bytes]] = []
    total = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        name = path.relative_to(folder).as_posix()
        if name.startswith(".staging-") or "/.staging-" in name:
            continue
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            data = data[:MAX_FILE_BYTES] + b"\n[truncated by mas2c batch]\n"
        if total + len(data) > MAX_FOLDER_BYTES:
            break
        total += len(data)
        files.append((name, data))
    return files


def _secrets_out_of(plan: Plan, options: BatchOptions) -> tuple[dict[str, str], Plan]:
    """The task environment holding the key and endpoint URL, and the plan without them
    (Ray keeps task arguments in its object store and may log them)."""
    key = options.llm.key() if options.llm is not None else os.environ.get("OPENAI_API_KEY")
    env_vars = {"OPENAI_API_KEY": key} if key else {}
    if plan.llm_url is not None and plan.llm_url != "local":
        env_vars["OPENAI_BASE_URL"] = plan.llm_url
        plan = dataclasses.replace(plan, llm_url=None)
    return env_vars, plan


def node_task(plan: Plan, row: Row) -> dict[str, Any]:
    """Runs on a Ray worker: one row, its sandbox on this node; the row and its files back."""
    import ray

    base = node_dir()
    build_dir = None
    if plan.mode == "spec":
        build_dir = _materialise(
            base / "builds" / plan.build_sha256[:32], _write_build(plan.build_files)
        )
    scorer_dir = None
    if plan.scorer == "code" or plan.user_scorer is not None:
        key = sha256(f"{plan.scorer}\0{plan.user_scorer or ''}".encode())[:32]

        def write_scorer(folder: Path) -> None:
            write_scorer_package(plan, folder)

        scorer_dir = _materialise(base / "scorers" / key, write_scorer)
    warnings: list[str] = []
    (base / "rows").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="row-", dir=base / "rows"))
    try:
        ctx = Context(
            build_dir=build_dir,
            scorer_dir=scorer_dir,
            upstream=shared_upstream(plan) if plan.mode == "spec" else None,
            warn=warnings.append,
        )
        result = run_row(plan, row, work / "row", ctx)
        files = _collect(work / "row")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    context = ray.get_runtime_context()
    return {
        "row": result,
        "files": files,
        "node": context.get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "warnings": sorted(set(warnings)),
    }


def _safe_name(name: Any) -> str | None:
    """A relative file name from a node, or None when it would leave the folder."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return None
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or any(p in ("", ".", "..") for p in path.parts):
        return None
    return path.as_posix()


def _write_files(folder: Path, files: Any) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, data in files:
        target = folder / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(target, data)
        except OSError:  # a name that clashes with a folder, or too long for the disk
            continue


def _checked_files(files: Any) -> list[tuple[str, bytes]]:
    """The usable files of an answer: safe relative names, bytes, each and all capped."""
    kept: list[tuple[str, bytes]] = []
    total = 0
    for item in files if isinstance(files, list | tuple) else []:
        if len(kept) >= MAX_FILES:
            break
        if not (isinstance(item, tuple | list) and len(item) == 2):
            continue
        name, data = _safe_name(item[0]), item[1]
        if name is None or len(name) > 1024 or not isinstance(data, bytes):
            continue
        if len(data) > MAX_FILE_BYTES:
            data = data[:MAX_FILE_BYTES] + b"\n[truncated by mas2c batch]\n"
        if total + len(data) > MAX_FOLDER_BYTES:
            break
        total += len(data)
        kept.append((name, data))
    return kept


def check_cluster(address: str | None, timeout_s: float = 3.0) -> None:
    """Fail fast, before a run folder exists: Ray must be importable, and a cluster address
    (``--address``, else ``RAY_ADDRESS``) of the form ``[ray://]HOST:PORT`` must accept a TCP
    connection within `timeout_s` (``ray.init`` would wait for it without end)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise BatchError(
            "--engine ray needs Ray: pip install 'mas2c[ray]' (on the driver and every node)"
        )
    target = address or os.environ.get("RAY_ADDRESS") or ""
    where = target.removeprefix("ray://").rstrip("/")
    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # "auto", "local" or no address: Ray finds or starts one
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        if isinstance(exc, TimeoutError | socket.timeout):
            reason = f"no answer within {timeout_s:g} s"
        flag = "--address" if address else "RAY_ADDRESS"
        raise BatchError(
            f"cannot reach the Ray cluster at {target} ({flag}): {reason}; start it "
            "(ray start --head) or give its HOST:PORT"
        ) from None


def _connect(address: str | None, workers: int) -> bool:
    """Connect to (or start) Ray; True when this call did it (and must shut it down)."""
    try:
        import ray
    except ImportError:
        raise BatchError(
            "--engine ray needs Ray: pip install 'mas2c[ray]' (on the driver and every node)"
        ) from None
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=max(1, workers), include_dashboard=False)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BatchError(f"cannot reach the Ray cluster at {address or 'auto'}: {exc}") from None
    return True


def run_on_ray(
    plan: Plan,
    todo: Sequence[Job],
    options: BatchOptions,
    record: Callable[[Job, dict[str, Any]], None],
    should_stop: Callable[[], bool],
    bar: ProgressBar,
    *,
    run_dir: Path,
) -> list[str]:
    """Run the jobs as Ray tasks, at most `options.workers` in flight; the infrastructure errors."""
    if not todo:
        return []
    owned = _connect(options.ray_address, options.workers)
    import ray

    warn = warn_once(options.on_warning)
    env_vars, plan = _secrets_out_of(plan, options)
    remote = ray.remote(node_task).options(
        num_cpus=1,
        max_retries=options.ray_max_retries,
        retry_exceptions=False,
        runtime_env={"env_vars": env_vars},
    )
    errors: list[str] = []
    queue = deque(todo)
    pending: dict[Any, Job] = {}
    resubmitted: dict[str, int] = {}
    interrupted = False
    try:
        plan_ref = ray.put(plan)
        while queue or pending:
            while (
                queue and len(pending) < options.workers and not interrupted and not should_stop()
            ):
                job = queue.popleft()
                pending[remote.remote(plan_ref, job.row)] = job
            if not pending:
                break
            try:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                bar.say(
                    f"interrupted: finishing {len(pending)} running row(s) on the cluster and "
                    "recording them (Ctrl-C again: cancel them). Run the same command to resume."
                )
                continue
            for ref in ready:
                job = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as exc:  # the task raised, or its retries ran out
                    reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ""
                    errors.append(f"{job.key}: {type(exc).__name__}: {reason}")
                    bar.say(f"{job.key}: not recorded ({type(exc).__name__}: {reason})")
                    continue
                answer = check_answer(job, out, known_fields(plan, job.row))
                if answer.row is not None:
                    store_answer(job, answer, run_dir, record, warn)
                    continue
                # not a result of this row (a broken node, another mas2c): run it again
                resubmitted[job.key] = resubmitted.get(job.key, 0) + 1
                if resubmitted[job.key] <= options.ray_max_retries:
                    bar.say(f"{job.key}: {answer.problem}; running it again")
                    queue.appendleft(job)
                else:
                    errors.append(f"{job.key}: {answer.problem}")
                    bar.say(f"{job.key}: not recorded ({answer.problem})")
    except KeyboardInterrupt:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
        if owned:
            ray.shutdown()
    if interrupted:
        raise KeyboardInterrupt
    return errors


@dataclasses.dataclass(frozen=True)
class Answer:
    """A node's answer for one row, checked (`check_answer`)."""

    row: dict[str, Any] | None  # None: not a result of this row (an infrastructure failure)
    problem: str  # why `row` is None, or what was wrong in it ("" when nothing was)
    files: list[tuple[str, bytes]]
    engine: dict[str, Any]
    warnings: list[str]


_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,60}")
_COUNTS = ("llm_calls", "prompt_tokens", "completion_tokens", "tokens")
_AMOUNTS = ("cost_usd", "seconds", "score_seconds", "total_seconds")
_TEXTS = {"error": MAX_NOTE_CHARS, "note": MAX_NOTE_CHARS, "spec_source": 500}
_MAX_COUNT = 10**15
_MAX_DEPTH = 64


def _depth_ok(value: Any, depth: int = 0) -> bool:
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _depth_ok(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_depth_ok(v, depth + 1) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


def _number(value: Any, *, whole: bool, top: float) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if whole and not isinstance(value, int):
        return None
    if not math.isfinite(value) or value < 0 or value > top:
        return None
    return value


def _shown(value: Any) -> str:
    return (
        repr(value)[:60]
        if isinstance(value, str | int | float | bool | type(None))
        else type(value).__name__
    )


def check_answer(job: Job, out: Any, known: dict[str, Any]) -> Answer:
    """Check a node's answer for `job` (hostile input: any type, any size, any value).

    `known` holds the fields the driver itself knows of the row (key, index, kept
    dataset fields, expected answer): they replace the node's."""
    if not isinstance(out, dict) or not isinstance(out.get("row"), dict):
        return Answer(None, "the node returned no result row", [], {}, [])
    given = out["row"]
    if given.get("key") != job.key:
        return Answer(None, f"the node returned the row of {_shown(given.get('key'))}", [], {}, [])
    problems: list[str] = []
    row: dict[str, Any] = dict(known)

    def take_code(name: str, required: bool = False) -> None:
        """Copy `given[name]` if it is a code (`required`: also when it is missing)."""
        code = given.get(name)
        if code is None and not required:
            return
        if isinstance(code, str) and _CODE.fullmatch(code):
            row[name] = code
        else:
            problems.append(f"{name} {_shown(code)}")

    take_code("status", required=True)
    take_code("error_code")
    for name, limit in _TEXTS.items():
        text = given.get(name)
        if text is None:
            continue
        if isinstance(text, str):
            row[name] = text[:limit]
        else:
            problems.append(f"{name} {_shown(text)}")
    take_code("scorer_error")
    for name in _COUNTS + _AMOUNTS:
        if name not in given:
            continue
        number = _number(given[name], whole=name in _COUNTS, top=_MAX_COUNT)
        if number is None:
            problems.append(f"{name} {_shown(given[name])}")
            row[name] = 0 if name in _COUNTS else 0.0
        else:
            row[name] = number if name in _COUNTS else float(number)
    score = _number(given.get("score"), whole=False, top=1.0)
    passed = given.get("passed")
    if score is None or not isinstance(passed, bool):
        problems.append(f"score {_shown(given.get('score'))}, passed {_shown(passed)}")
        score, passed = 0.0, False
    row.update(score=float(score), passed=passed)
    if "prediction" in given:
        if _depth_ok(given["prediction"]):
            row["prediction"] = _clip(given["prediction"])
        else:
            problems.append("a prediction that is not JSON (too deep, NaN or another type)")
    if problems:
        said = f"{row.get('error_code', '')}: " if "error_code" in row else ""
        row.update(
            status="error",
            error_code=BAD_RESULT,
            error=f"{said}the node's result row has bad values: " + "; ".join(problems)[:500],
            passed=False,
            score=0.0,
        )
    pid = out.get("pid")
    engine = {
        "engine": "ray",
        "node": out["node"][:80] if isinstance(out.get("node"), str) else "",
        "host": out["host"][:200] if isinstance(out.get("host"), str) else "",
        "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
    }
    warnings = out.get("warnings")
    said_warnings = [
        w[:500] for w in (warnings if isinstance(warnings, list) else []) if isinstance(w, str)
    ][:MAX_WARNINGS]
    return Answer(row, "; ".join(problems), _checked_files(out.get("files")), engine, said_warnings)


def known_fields(plan: Plan, row: Row) -> dict[str, Any]:
    """The fields of a result row the driver knows without the node (see `run_row`)."""
    known: dict[str, Any] = {"key": row.key, "index": row.index}
    for name in plan.keep:
        known[name] = row.data.get(name)
    if plan.scorer != "code":
        expected = lookup(row.data, plan.answer_field)
        known["expected"] = None if expected is _MISSING else _clip(expected)
    return known


def store_answer(
    job: Job,
    answer: Answer,
    run_dir: Path,
    record: Callable[[Job, dict[str, Any]], None],
    warn: Callable[[str], None],
) -> None:
    """A checked answer: its files into rows/<id>/, then the row into results.jsonl."""
    assert answer.row is not None
    folder = run_dir / "rows" / job.row.slug
    _write_files(folder, answer.files)
    engine = {**answer.engine, "received_at": round(time.time(), 3)}
    write_text_atomic(folder / "engine.json", json.dumps(engine, indent=2) + "\n")
    for message in answer.warnings:
        warn(message)
    record(job, answer.row)
