"""Run a compiled mas2c package in a sandbox, and build the sandbox image.

Two backends:

* ``docker`` (default): one fresh, single-use container per run, with secure defaults
  (non-root user, no network, read-only root, all capabilities dropped,
  no-new-privileges, memory = memory+swap, CPU/pids/nofile/core/file-size limits,
  private IPC) under the default runtime (runc) or gVisor (``runtime="runsc"``). The
  program can write only to size-capped tmpfs mounts (``/tmp``, its output folder,
  its cwd), which live in the container's memory cgroup: nothing it writes reaches
  the host's disk. The container's init is :mod:`mas2c.sandbox.runner` (PID 1): it
  receives the job over the attach stream, runs the program, kills every process
  left, and streams back one bounded bundle (result, trace, captured output), which
  the host reads with byte and time limits. The container carries a deadline (a
  label, and the init's own timer, which nothing inside can stop) and is removed by
  the daemon when it ends (``auto_remove``), by mas2c in all cases (also Ctrl-C),
  and, if mas2c itself was SIGKILLed, at once (its attach stream closes, the init
  exits) or at its deadline; :func:`reap` removes what is past its deadline.
* ``unisolated`` (was ``local``, still accepted with a warning): the same runner as a
  subprocess in a temp dir with rlimits, a scrubbed environment, its own session and
  subreaper; as root the program runs as ``nobody`` (65534). It does NOT isolate, and
  says so.

Both write the same run folder: ``result.json``, ``trace.jsonl``, ``stdout.txt``,
``stderr.txt`` and ``sandbox.json`` (and ``checkpoints.jsonl`` when the program wrote
one: the path the job's ``MAS2C_CHECKPOINT_LOG`` names), each written atomically (temp file in the same
folder, then ``os.replace``), so an interrupted run still leaves a readable folder
and never a half-written file. Everything that comes out of the sandbox is bounded
(``Limits``: result, trace and stream caps; a copy-out deadline) and what was cut is
reported in ``sandbox.json`` (``truncated``, ``copy_out``); a result that is not a
JSON object, or nested deeper than :data:`RESULT_MAX_DEPTH`, becomes an error result.

The module is importable cheaply: ``docker`` is imported inside the functions that
need it. ``python -m mas2c.sandbox build|status|prune`` is a small CLI around
:func:`build_image`, :func:`status` and :func:`prune` (used by
``scripts/ensure-docker.sh``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Literal

from mas2c.errors import RunFailure

if TYPE_CHECKING:
    from mas2c.sandbox.engine import Engine

logger = logging.getLogger("mas2c.sandbox")

DEFAULT_IMAGE = "mas2c-sandbox:latest"
DEFAULT_BASE = "python:3.12-slim"
#: Base image made with mmdebstrap + docker import when no registry is reachable.
DEBIAN_BASE = "mas2c-base:bookworm"
DEBIAN_SUITE = "bookworm"
#: Where the LLM gateway's socket folder (and so its unix socket) appears in the container.
CONTAINER_SOCKET_DIR = "/run/mas2c"
CONTAINER_SOCKET = f"{CONTAINER_SOCKET_DIR}/llm.sock"
SANDBOX_UID = 1000
#: The user the unisolated backend runs the program as when mas2c runs as root.
UNISOLATED_UID = 65534
LOCAL_UNPRIVILEGED_UID = UNISOLATED_UID  # the pre-`unisolated` name (one version)
#: The sandbox backends, and the old spellings accepted for one version (with a warning).
Backend = Literal["docker", "unisolated"]
BACKENDS: tuple[Backend, ...] = ("docker", "unisolated")
DEPRECATED_BACKENDS: dict[str, Backend] = {"local": "unisolated"}
LABEL = "mas2c"
#: Label holding the container's deadline (Unix time): past it, :func:`reap` removes it.
DEADLINE_LABEL = f"{LABEL}.deadline"
#: A result nested deeper than this is rejected (readers recurse; hostile input).
RESULT_MAX_DEPTH = 64
#: Environment variable naming the default container runtime (e.g. ``runsc``).
RUNTIME_ENV = "MAS2C_RUNTIME"
#: ``MAS2C_NO_POOL=1``: never take a warm container (``--no-pool``).
NO_POOL_ENV = "MAS2C_NO_POOL"
_PACKAGE = Path(__file__).resolve().parent.parent  # mas2c/
# sandbox/ of a source checkout, or the copy shipped inside the wheel.
SANDBOX_DIR = next(
    (
        p
        for p in (
            _PACKAGE / "_sandbox",
            _PACKAGE.parent / "sandbox",
        )
        if (p / "Dockerfile").is_file()
    ),
    _PACKAGE.parent / "sandbox",
)
_RUNNER_SOURCE = Path(__file__).resolve().parent / "runner.py"

_MIB = 1024 * 1024
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_RUNTIME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_COPY_IGNORE = ("__pycache__", "*.pyc", "*.pyo", ".git", ".venv", ".mypy_cache", ".ruff_cache")
_NOFILE = 1024
#: Files in each writable tmpfs (the output folder, the cwd).
_TMPFS_INODES = 16384
_DAEMON_FIX = (
    "start it with `dockerd &` (or scripts/ensure-docker.sh), "
    "or use --sandbox unisolated (which does not isolate)"
)
_BUILD_FIX = "build it with `mas2c sandbox build` (or scripts/ensure-docker.sh)"
#: How long a fresh container may take to start and import the runtime before its job.
_START_S = 60.0
#: Time for handing back the outputs after the program ended (the bundle is bounded).
_COPY_S = 30.0
#: The runner's own grace after the job's timeout (see runner.GRACE_S).
_RUNNER_GRACE_S = 60.0
_BUNDLE_MAGIC = b"MAS2C-BUNDLE "
#: The run folder's checkpoint store (the runtime's ``MAS2C_CHECKPOINT_LOG``): one
#: ``{step, pointer, key, writes}`` line per top-level step; it holds run content.
CHECKPOINTS_FILE = "checkpoints.jsonl"
CHECKPOINT_LOG_ENV = "MAS2C_CHECKPOINT_LOG"
#: The init's first line once its imports are done (before any bundle).
READY_LINE = b"MAS2C-READY\n"
_BUNDLE_HEADER_MAX = 65536
_RUN_MARKER = "MAS2C_SANDBOX_RUN"

# Paths inside the container: /work is an anonymous volume holding only root-owned,
# read-only files (package, input, job); the program writes to tmpfs mounts only.
_C_WORK = "/work"
_C_PKG = "/work/pkg"
_C_INPUT = "/work/in/input.json"
_C_JOB = "/work/job/job.json"
_C_OUT = "/work/out"
_C_RUN = "/work/run"
_C_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SandboxError(RunFailure):
    """A user-facing sandbox failure; the message names the fix."""

    code = "sandbox"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 600.0
    memory_mb: int = 1024
    cpus: float = 1.0
    pids: int = 256
    #: Size of each writable tmpfs: /tmp, the output folder and the cwd (all in RAM,
    #: counted against memory_mb).
    tmpfs_mb: int = 256
    file_size_mb: int = 64
    #: Kept of stdout and of stderr each.
    output_cap_bytes: int = 1_000_000
    #: Largest result (out.json) copied out; a larger one is an error result.
    result_cap_bytes: int = 16 * _MIB
    #: Kept of trace.jsonl (cut at a line end, reported as truncated).
    trace_cap_bytes: int = 64 * _MIB

    def validate(self) -> None:
        checks = {
            "timeout_s": self.timeout_s > 0,
            "memory_mb": self.memory_mb >= 16,
            "cpus": self.cpus > 0,
            "pids": self.pids >= 8,
            "tmpfs_mb": self.tmpfs_mb >= 1,
            "file_size_mb": self.file_size_mb >= 1,
            "output_cap_bytes": self.output_cap_bytes >= 0,
            "result_cap_bytes": self.result_cap_bytes >= 2,
            "trace_cap_bytes": self.trace_cap_bytes >= 0,
        }
        bad = [
            name
            for name, ok in checks.items()
            if not ok or not math.isfinite(getattr(self, name))  # nan, inf
        ]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise SandboxError(f"invalid sandbox limits: {values}")

    def caps(self) -> dict[str, int]:
        """Byte caps of the files the runner hands back, by run-folder name."""
        return {
            "out.json": self.result_cap_bytes,
            "trace.jsonl": self.trace_cap_bytes,
            CHECKPOINTS_FILE: self.trace_cap_bytes,
            "stdout.txt": self.output_cap_bytes,
            "stderr.txt": self.output_cap_bytes,
        }


@dataclass(frozen=True)
class Loosen:
    """Explicit opt-outs of the Docker backend's secure defaults (each one warns)."""

    network: bool = False
    writable_root: bool = False
    root_user: bool = False

    def used(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]


@dataclass
class SandboxReport:
    backend: str
    image: str | None
    limits: dict[str, Any]
    loosened: list[str]
    exit_code: int | None
    timed_out: bool
    oom_killed: bool
    duration_s: float
    stdout_truncated: bool
    stderr_truncated: bool
    interrupted: bool = False
    #: "container" (docker) or "none" (unisolated: the program is not isolated).
    isolation: str = "container"
    run_id: str = ""
    #: The container runtime (docker: "runc", "runsc", ...; unisolated: None).
    runtime: str | None = None
    #: Run-folder files cut at their cap (out.json, trace.jsonl, stdout.txt, stderr.txt).
    truncated: list[str] = field(default_factory=list)
    #: How the outputs came back: bytes, files, duration_s, complete (False: the bundle
    #: was cut short, e.g. the sandbox died or the copy-out deadline passed).
    copy_out: dict[str, Any] = field(default_factory=dict)
    #: The uid the program ran as.
    uid: int | None = None
    #: "cold" (a container started for this run), "warm" (taken from this process's
    #: warm pool) or "service" (from `mas2c sandbox pool start`); unisolated: None.
    pool: str | None = None
    #: Limits that could not be applied, warnings, and the error of a failed run.
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_runtime() -> str | None:
    """The runtime from ``MAS2C_RUNTIME`` (None: the daemon's default, normally runc)."""
    value = os.environ.get(RUNTIME_ENV, "").strip()
    return value or None


def program_uid(backend: str, loosen: Loosen = Loosen()) -> int:
    """The uid the program runs as (the gateway socket must be reachable by it)."""
    if backend == "docker":
        return 0 if loosen.root_user else SANDBOX_UID
    return unisolated_uid()


def unisolated_uid() -> int:
    """The uid of the unisolated backend's program: nobody (65534) when mas2c runs as root."""
    return UNISOLATED_UID if os.geteuid() == 0 else os.geteuid()


def backend_name(name: str, warn: Callable[[str], None] | None = None) -> Backend:
    """`name` as a backend; an old spelling (`local`) is accepted with a deprecation warning."""
    if name in DEPRECATED_BACKENDS:
        new = DEPRECATED_BACKENDS[name]
        (warn or _stderr)(
            f"the sandbox backend {name!r} is deprecated: use {new!r} (the old name goes in "
            "the next version)"
        )
        return new
    if name not in BACKENDS:
        raise SandboxError(f"unknown sandbox backend {name!r}: use docker or unisolated")
    return name


def _stderr(message: str) -> None:
    print(f"mas2c: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _atomic_copy(src: Path | None, dest: Path) -> None:
    """Copy src (or nothing: an empty file) to dest atomically, not following a symlink."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as out:
            if src is not None:
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
                    with os.fdopen(fd, "rb") as inp:
                        shutil.copyfileobj(inp, out, 1 << 20)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read_tail(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read()
    except OSError:
        return b""


def json_depth_ok(value: Any, max_depth: int = RESULT_MAX_DEPTH) -> bool:
    """True if `value` (parsed JSON) nests at most `max_depth` containers (iterative)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterator[Any] = iter(item.values())
        elif isinstance(item, list):
            children = iter(item)
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


# ------------------------------------------------------------ private temp folders


class LockedDir:
    """A temp folder ``mas2c-<kind>-*`` holding an flock on ``.owner`` for as long as it
    lives: :func:`reap_private_dirs` removes it once its owner is gone (the kernel drops
    the lock even on SIGKILL). `uid` (as root): the folder is given to that user."""

    def __init__(
        self, kind: str, mode: int = 0o700, uid: int | None = None, parent: str | None = None
    ) -> None:
        import fcntl

        self.path = Path(tempfile.mkdtemp(prefix=f"mas2c-{kind}-", dir=parent))
        try:
            self._lock: int | None = os.open(
                self.path / ".owner", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600
            )
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            self.path.chmod(mode)
            if uid is not None and os.geteuid() == 0 and uid != 0:
                os.chown(self.path, uid, uid)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def close(self) -> None:
        """Remove the folder (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


@contextlib.contextmanager
def private_dir(kind: str, mode: int = 0o700, uid: int | None = None) -> Iterator[Path]:
    """A :class:`LockedDir` for the duration of the block."""
    folder = LockedDir(kind, mode, uid)
    try:
        yield folder.path
    finally:
        folder.close()


def _locked(path: Path) -> bool:
    """True if someone holds an flock on `path` (False if it is free or missing)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def reap_private_dirs(min_age_s: float = 10.0) -> int:
    """Remove the :func:`private_dir` folders of dead owners (SIGKILLed runs): those
    whose ``.owner`` lock is free. Folders without one are not ours and stay."""

    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith("mas2c-"):
            continue
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or now - st.st_mtime < min_age_s:
                continue
            owner = Path(entry.path) / ".owner"
            if os.lstat(owner).st_uid != os.geteuid():
                continue
            # .owner: its creator; .user: a run using a pool service's folder.
            if any(_locked(Path(entry.path) / name) for name in (".owner", ".user")):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


# ------------------------------------------------------------------- run plumbing


@dataclass
class _Outcome:
    """What a backend found out; filled in as it goes, so partial runs still report."""

    staging: Path
    exit_code: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    duration_s: float = 0.0
    interrupted: bool = False
    runtime: str | None = None
    uid: int | None = None
    pool: str | None = None
    truncated: list[str] = field(default_factory=list)
    copy_out: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The thread removing the used container (docker), started once the bundle is in.
    removal: threading.Thread | None = None

    @property
    def stdout(self) -> Path:
        return self.staging / "stdout.txt"

    @property
    def stderr(self) -> Path:
        return self.staging / "stderr.txt"

    @property
    def out_json(self) -> Path:
        return self.staging / "out.json"

    @property
    def trace(self) -> Path:
        return self.staging / "trace.jsonl"


@dataclass(frozen=True)
class _Job:
    package_dir: Path
    module: str
    input_path: Path
    run_id: str
    limits: Limits
    loosen: Loosen
    llm_socket: Path | None
    image: str
    env: Mapping[str, str]
    warn: Callable[[str], None]
    runtime: str | None = None
    use_pool: bool = True
    prestarted: Prestart | None = None


def _check_inputs(package_dir: Path, module: str, input_path: Path) -> None:
    if not _MODULE_RE.match(module):
        raise SandboxError(f"invalid module name {module!r}: expected a dotted Python name")
    main = package_dir.joinpath(*module.split("."), "__main__.py")
    if not main.is_file():
        raise SandboxError(
            f"{package_dir} is not a compiled package folder: {main} is missing "
            "(compile the spec first, or pass the folder that contains the package)"
        )
    if not input_path.is_file():
        raise SandboxError(f"input file {input_path} does not exist")


def _check_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise SandboxError(f"invalid environment variable for the sandbox: {key!r}")


def _check_runtime(runtime: str | None) -> None:
    if runtime is not None and not _RUNTIME_RE.match(runtime):
        raise SandboxError(f"invalid container runtime name {runtime!r}")


def _scrubbed_env(
    *, path: str, home: str, pythonpath: str, extra: Mapping[str, str]
) -> dict[str, str]:
    env = {
        "PATH": path,
        "HOME": home,
        "LANG": "C.UTF-8",
        "PYTHONPATH": pythonpath,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    env.update(HOME=home, PYTHONPATH=pythonpath)  # the package must stay importable
    return env


def _job_json(
    job: _Job,
    *,
    pkg: str,
    inp: str,
    out_dir: str,
    cwd: str,
    env: Mapping[str, str],
    uid: int | None,
) -> bytes:
    """What the runner runs: ``python -m MODULE --input .. --output .. --trace ..``."""
    doc: dict[str, Any] = {
        "module": job.module,
        "args": [
            "--input",
            inp,
            "--output",
            f"{out_dir}/out.json",
            "--trace",
            f"{out_dir}/trace.jsonl",
        ],
        "path": [pkg],
        "cwd": cwd,
        # The step checkpoints (values: run content) go to a file of their own, not
        # into the trace; a package of an earlier mas2c ignores the variable.
        "env": {**env, CHECKPOINT_LOG_ENV: f"{out_dir}/{CHECKPOINTS_FILE}"},
        "output": f"{out_dir}/out.json",
        "trace": f"{out_dir}/trace.jsonl",
        "checkpoints": f"{out_dir}/{CHECKPOINTS_FILE}",
        "timeout_s": job.limits.timeout_s,
        "uid": uid,
        "caps": {
            "result": job.limits.result_cap_bytes,
            "trace": job.limits.trace_cap_bytes,
            "checkpoints": job.limits.trace_cap_bytes,
            "stdout": job.limits.output_cap_bytes,
            "stderr": job.limits.output_cap_bytes,
        },
    }
    return json.dumps(doc, sort_keys=True).encode()


def _runner_argv(
    python: str,
    mode: str,
    job_path: str,
    idle_s: float,
    max_job_s: float,
    warm_up: bool = True,
) -> list[str]:
    """The runner's command line; `warm_up` False: the init never makes the warm-up
    call (a container started for one run whose job is on its way)."""
    argv = [
        python,
        "-I",
        "-c",
        _RUNNER_SOURCE.read_text(encoding="utf-8"),
        mode,
        job_path,
        f"{idle_s:g}",
        f"{max_job_s:g}",
    ]
    return argv if warm_up else [*argv, "no-warm-up"]


def _shielded(fn: Callable[[], None], outcome: _Outcome, what: str) -> None:
    """Run a cleanup step to completion even if Ctrl-C is pressed during it."""
    for _ in range(5):
        try:
            fn()
            return
        except KeyboardInterrupt:
            outcome.interrupted = True
        except Exception as exc:
            logger.debug("cleanup step %s failed: %s", what, exc)
            outcome.notes.append(f"cleanup: {what} failed: {exc}")
            return


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt during a run, so `kill` also cleans up.

    Only in the main thread and only when nobody installed a SIGTERM handler before.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_package(
    package_dir: Path,
    module: str,
    input_path: Path,
    run_dir: Path,
    *,
    backend: Backend | Literal["local"] = "docker",
    limits: Limits = Limits(),
    loosen: Loosen = Loosen(),
    llm_socket: Path | None = None,
    image: str = DEFAULT_IMAGE,
    env: Mapping[str, str] | None = None,
    on_warning: Callable[[str], None] | None = None,
    runtime: str | None = None,
    pool: bool | None = None,
    defer_removal: bool = False,
    prestarted: Prestart | None = None,
) -> SandboxReport:
    """Run ``python -m <module> --input .. --output .. --trace ..`` in a sandbox.

    Always writes the run folder (also when the run fails, times out or is
    interrupted), then raises SandboxError for a sandbox failure (daemon
    unreachable, image missing, bad arguments) or re-raises KeyboardInterrupt;
    otherwise returns the report. A failing *program* is not an exception: see the
    report and result.json. `runtime` (docker only): a runtime registered with the
    daemon, e.g. ``runsc`` (gVisor); None: ``MAS2C_RUNTIME``, else the daemon's default.
    `pool` (docker only): take a warm single-use container from this process's pool
    (:mod:`mas2c.sandbox.pool`) or the pool service when one fits; None: yes unless
    ``MAS2C_NO_POOL=1``; False: always a cold container. A cold container is removed
    before this returns, unless `defer_removal` (then :func:`join_removal` waits for it:
    the caller overlaps its own work with the removal); a warm one is removed in the
    background (:func:`wait_removals`, also at exit). `prestarted` (docker): the cold
    container :func:`prestart` began creating for this run while the caller prepared
    it (used if it matches the run; the run then carries its run id).
    """
    warn = on_warning if on_warning is not None else logger.warning
    if backend in DEPRECATED_BACKENDS:
        backend = backend_name(backend, warn)
    package_dir, input_path, run_dir = Path(package_dir), Path(input_path), Path(run_dir)
    run_id = prestarted.run_id if prestarted is not None else uuid.uuid4().hex[:12]
    if runtime is None and backend == "docker":
        runtime = default_runtime()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SandboxError(f"cannot create the run folder {run_dir}: {exc}") from None
    report = SandboxReport(
        backend=backend,
        image=image if backend == "docker" else None,
        limits=dataclasses.asdict(limits),
        loosened=loosen.used() if backend == "docker" else [],
        exit_code=None,
        timed_out=False,
        oom_killed=False,
        duration_s=0.0,
        stdout_truncated=False,
        stderr_truncated=False,
        isolation="container" if backend == "docker" else "none",
        run_id=run_id,
        runtime=(runtime or "default") if backend == "docker" else None,
    )
    error: SandboxError | None = None
    # Staging lives in a private temp folder (not in the run folder), reaped on a
    # later start if this process is SIGKILLed.
    with private_dir("staging") as staging, _sigterm_as_interrupt():
        outcome = _Outcome(staging=staging)
        try:
            backend = backend_name(backend)
            limits.validate()
            _check_inputs(package_dir, module, input_path)
            _check_env(env or {})
            _check_runtime(runtime)
            if llm_socket is not None and not _is_socket(Path(llm_socket)):
                raise SandboxError(f"LLM gateway socket {llm_socket} is not a unix socket")
            job = _Job(
                package_dir=package_dir,
                module=module,
                input_path=input_path,
                run_id=run_id,
                limits=limits,
                loosen=loosen,
                llm_socket=Path(llm_socket) if llm_socket is not None else None,
                image=image,
                env=dict(env or {}),
                warn=warn,
                runtime=runtime,
                use_pool=pool if pool is not None else os.environ.get(NO_POOL_ENV) != "1",
                prestarted=prestarted if backend == "docker" else None,
            )
            if backend == "docker":
                _run_docker(job, outcome)
            else:
                _run_unisolated(job, outcome)
        except SandboxError as exc:
            error = exc
        except KeyboardInterrupt:
            outcome.interrupted = True
        finally:
            _finalize(run_dir, outcome, report, error)
            if outcome.removal is not None and outcome.pool == "cold":
                _REMOVALS[run_id] = outcome.removal
                if not defer_removal or error is not None or outcome.interrupted:
                    join_removal(report)
    if error is not None:
        raise error
    if report.interrupted:
        raise KeyboardInterrupt
    return report


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def _finalize(
    run_dir: Path, outcome: _Outcome, report: SandboxReport, error: SandboxError | None
) -> None:
    report.exit_code = outcome.exit_code
    report.timed_out = outcome.timed_out
    report.oom_killed = outcome.oom_killed
    report.duration_s = round(outcome.duration_s, 3)
    report.interrupted = outcome.interrupted
    report.truncated = sorted(set(outcome.truncated))
    report.stdout_truncated = "stdout.txt" in report.truncated
    report.stderr_truncated = "stderr.txt" in report.truncated
    report.copy_out = outcome.copy_out
    report.uid = outcome.uid
    report.pool = outcome.pool
    if outcome.runtime is not None:
        report.runtime = outcome.runtime
    report.notes.extend(outcome.notes)
    report.error = str(error) if error is not None else None

    for name in ("stdout.txt", "stderr.txt", "trace.jsonl"):
        src = outcome.staging / name
        _atomic_copy(src if src.exists() else None, run_dir / name)
    # The checkpoint store only when the program left one (a package of an earlier mas2c,
    # or a program that is no compiled package, does not): never an earlier run's.
    if (outcome.staging / CHECKPOINTS_FILE).exists():
        _atomic_copy(outcome.staging / CHECKPOINTS_FILE, run_dir / CHECKPOINTS_FILE)
    else:
        with contextlib.suppress(FileNotFoundError):
            (run_dir / CHECKPOINTS_FILE).unlink()

    result, problem = _checked_result(outcome, report)
    if result is not None:
        _atomic_write_bytes(run_dir / "result.json", result)
    else:
        _atomic_write_json(run_dir / "result.json", _error_result(report, error, problem))
    _atomic_write_json(run_dir / "sandbox.json", report.to_json())


def _checked_result(outcome: _Outcome, report: SandboxReport) -> tuple[bytes | None, str]:
    """The program's out.json if it is a JSON object within the size and depth limits,
    else (None, what is wrong with it). Never recurses without a bound."""
    if "out.json" in outcome.truncated:
        cap = report.limits["result_cap_bytes"]
        return None, f"the program wrote a result larger than the {cap}-byte cap"
    try:
        fd = os.open(outcome.out_json, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None, "the program wrote no result"
    with os.fdopen(fd, "rb") as f:
        raw = f.read(report.limits["result_cap_bytes"] + 1)
    try:
        data = json.loads(raw)
    except RecursionError:
        data, problem = None, f"nested deeper than {RESULT_MAX_DEPTH} levels"
    except ValueError as exc:
        return None, f"the program wrote an invalid result (not JSON: {exc})"
    else:
        problem = "" if json_depth_ok(data) else f"nested deeper than {RESULT_MAX_DEPTH} levels"
    if problem:
        return None, f"the program wrote an invalid result ({problem})"
    if not isinstance(data, dict):
        return None, "the program wrote an invalid result (not a JSON object)"
    return raw, ""


def _error_result(
    report: SandboxReport, error: SandboxError | None, problem: str
) -> dict[str, Any]:
    if report.interrupted:
        kind, message = "Interrupted", "the run was interrupted (Ctrl-C) and its sandbox removed"
    elif report.timed_out:
        kind = "Timeout"
        message = f"the program was killed at the {report.limits['timeout_s']:g} s timeout"
    elif report.oom_killed:
        kind = "OOMKilled"
        message = f"the program ran out of memory (limit {report.limits['memory_mb']} MB)"
    elif error is not None:
        kind, message = "SandboxError", str(error)
    else:
        kind = "SandboxError"
        message = f"{problem}; it exited with code {report.exit_code} (see stderr.txt)"
    return {
        "status": "error",
        "error": {"type": kind, "message": message, "spec_pointer": None, "traceback": None},
    }


# ------------------------------------------------------------------- the bundle


class _Bundle:
    """Parses the runner's bundle from a byte stream into staging files, with limits.

    The header must be the magic line with a JSON object of at most
    _BUNDLE_HEADER_MAX bytes; every file must be one the host asked for, at most its
    cap. Anything else stops the parse (`error`), keeping what came before.
    """

    def __init__(self, staging: Path, caps: Mapping[str, int]) -> None:
        self.staging = staging
        self.caps = dict(caps)
        self.header: dict[str, Any] | None = None
        self.error: str | None = None
        #: When the header arrived and when the last byte did (monotonic), for the report.
        self.t_header: float | None = None
        self.t_end: float | None = None
        self.done = False
        self.bytes = 0
        self._head = bytearray()
        self._files: list[tuple[str, int, bool]] = []
        self._current: IO[bytes] | None = None
        self._left = 0
        self._files_done = 0

    @property
    def truncated(self) -> list[str]:
        return [name for name, _n, cut in self._files if cut]

    @property
    def files(self) -> list[str]:
        return [name for name, _n, _cut in self._files]

    def incomplete(self) -> list[str]:
        """Files the header announced that did not arrive whole."""
        return [name for name, _n, _cut in self._files[self._files_done :]]

    def feed(self, data: bytes) -> None:
        if self.done or self.error:
            return
        view = memoryview(data)
        if self.header is None:
            view = self._feed_header(view)
            if self.header is None:
                return
        while not self.done and not self.error:
            if self._current is None:
                self._open_next()
                continue
            if not view:
                return
            part = view[: self._left]
            self._current.write(part)
            self.bytes += len(part)
            self._left -= len(part)
            view = view[len(part) :]
            if self._left == 0:
                self._current.close()
                self._current = None
                self._file_done()

    def _file_done(self) -> None:
        self._files_done += 1
        if self._files_done == len(self._files):
            self.done = True
            self.t_end = time.monotonic()

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def _feed_header(self, view: memoryview) -> memoryview:
        end = bytes(view).find(b"\n")
        take = len(view) if end < 0 else end + 1
        self._head += view[:take]
        if len(self._head) > _BUNDLE_HEADER_MAX:
            self.error = "the sandbox's output header is too large"
            return view[:0]
        if end < 0:
            return view[:0]
        line = bytes(self._head).rstrip(b"\n")
        if bytes(self._head) == READY_LINE:  # the init's ready line: the header follows
            self._head = bytearray()
            return self._feed_header(view[take:])
        if not line.startswith(_BUNDLE_MAGIC):
            self.error = "the sandbox's output has no valid header"
            return view[:0]
        try:
            header = json.loads(line[len(_BUNDLE_MAGIC) :])
        except (ValueError, RecursionError):
            header = None
        if not isinstance(header, dict) or not self._check_files(header.get("files")):
            self.error = self.error or "the sandbox's output header is invalid"
            return view[:0]
        self.header = header
        self.t_header = time.monotonic()
        if not self._files:
            self.done = True
            self.t_end = self.t_header
        return view[take:]

    def _check_files(self, files: Any) -> bool:
        if not isinstance(files, list) or len(files) > len(self.caps):
            return False
        seen: set[str] = set()
        for item in files:
            if not (isinstance(item, list) and len(item) == 3):
                return False
            name, n, cut = item
            if name not in self.caps or name in seen or type(n) is not int or type(cut) is not bool:
                return False
            if not 0 <= n <= self.caps[name]:
                self.error = f"the sandbox sent more of {name} than its cap"
                return False
            seen.add(name)
            self._files.append((name, n, cut))
        return True

    def _open_next(self) -> None:
        name, n, _cut = self._files[self._files_done]
        self._current = open(self.staging / name, "wb")  # noqa: SIM115
        self._left = n
        if n == 0:
            self._current.close()
            self._current = None
            self._file_done()


def _apply_bundle(bundle: _Bundle, outcome: _Outcome) -> None:
    """Move what the bundle says into the outcome, and report the copy-out."""
    bundle.close()
    header = bundle.header or {}
    outcome.truncated.extend(bundle.truncated)
    t_start = bundle.t_header or time.monotonic()
    outcome.copy_out = {
        "bytes": bundle.bytes,
        "files": bundle.files,
        "complete": bundle.done,
        # From the end of the program (the header) to the last byte on the host.
        "duration_s": round((bundle.t_end or time.monotonic()) - t_start, 3),
    }
    if bundle.error:
        outcome.notes.append(f"copy-out stopped: {bundle.error}")
    for name in bundle.incomplete():  # only a whole file counts: drop a partial one
        with contextlib.suppress(OSError):
            (outcome.staging / name).unlink()
        outcome.truncated.append(name)
    for name in ("trace.jsonl", CHECKPOINTS_FILE):
        if name in outcome.truncated:
            _cut_at_last_line(outcome.staging / name)
    code = header.get("exit_code")
    if type(code) is int:
        outcome.exit_code = code
    if header.get("timed_out") is True:
        outcome.timed_out = True
    duration = header.get("duration_s")
    if isinstance(duration, int | float) and not isinstance(duration, bool) and duration >= 0:
        outcome.duration_s = float(duration)
    kills = header.get("oom_kills")
    if type(kills) is int and kills > 0 and not outcome.timed_out:
        outcome.oom_killed = True


def _cut_at_last_line(path: Path) -> None:
    """Drop a partial last line (of a truncated trace), in place."""
    with contextlib.suppress(OSError), open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                f.truncate(pos - step + nl + 1)
                return
            pos -= step
        f.truncate(0)


# ------------------------------------------------------------------ docker backend


def _import_docker() -> Any:
    """docker-py, for building images (the run path uses :mod:`mas2c.sandbox.engine`)."""
    try:
        import docker
    except ImportError:
        raise SandboxError(
            "the `docker` Python package is not installed: `pip install docker`, "
            "or use --sandbox unisolated (which does not isolate)"
        ) from None
    return docker


# The daemon's API version, once negotiated (docker-py asks /version for every new client).
_API_VERSION: dict[str, str] = {}


def _daemon_error(where: str, exc: BaseException) -> SandboxError:
    reason = _short_reason(exc)
    if "permission denied" in reason.lower():
        return SandboxError(
            f"no permission to use the Docker daemon at {where} ({reason}): run as root "
            "or add your user to the `docker` group, or use --sandbox unisolated "
            "(which does not isolate)"
        )
    return SandboxError(f"the Docker daemon is not reachable at {where} ({reason}): {_DAEMON_FIX}")


def _docker_client(timeout: int = 120) -> Any:
    """A connected docker-py client (image builds), or SandboxError naming the fix."""
    docker = _import_docker()
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        known = _API_VERSION.get(where)
        if known is not None:
            client = docker.from_env(timeout=timeout, version=known)
        else:
            client = docker.from_env(timeout=timeout)
            _API_VERSION[where] = str(client.api.api_version)
        client.ping()
    except Exception as exc:
        raise _daemon_error(where, exc) from None
    return client


def _engine(timeout: float = 120.0) -> Engine:
    """A client of the daemon for the run path (no docker-py), or SandboxError naming the fix."""
    from mas2c.sandbox.engine import Engine

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        engine = Engine(where, timeout=timeout)
        engine.ping()
    except Exception as exc:
        raise _daemon_error(where, exc) from None
    return engine


def _short_reason(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    text = (str(explanation) if explanation else str(exc)).strip() or type(exc).__name__
    m = re.search(r"\b(FileNotFoundError|ConnectionRefusedError|PermissionError)\b[^)]*\)", text)
    if m:
        text = m.group(0)
    return text if len(text) <= 200 else text[:197] + "..."


def _require_image(engine: Engine, image: str) -> dict[str, Any]:
    """The image's inspect document, or SandboxError naming the fix."""
    from mas2c.sandbox.engine import EngineError, NotFound

    try:
        return engine.image(image)
    except NotFound:
        raise SandboxError(f"the sandbox image {image} is missing: {_BUILD_FIX}") from None
    except (EngineError, OSError) as exc:
        raise SandboxError(f"cannot inspect the sandbox image {image}: {exc}") from None


def _tar_info(name: str, *, is_dir: bool, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.uid = info.gid = 0
    info.mode = mode
    info.size = size
    info.mtime = int(time.time())
    return info


def _bytecode_dir() -> Path | None:
    """This user's cache of compiled modules (0700), or None if there is no home."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "mas2c" / "bytecode"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if folder.stat().st_uid != os.geteuid():
            return None
    except OSError:
        return None
    return folder


def _bytecode(source: bytes) -> bytes | None:
    """The module's bytecode as a hash-checked .pyc of this interpreter (the import checks
    it against the source it sits beside; an interpreter of another version ignores it
    and compiles the source): a package's modules are compiled once per machine, not in
    every sandbox. Cached by the source's sha256; None if it does not compile."""
    import hashlib
    import importlib.util

    tag = sys.implementation.cache_tag
    if tag is None:
        return None
    key = hashlib.sha256(source).hexdigest()
    folder = _bytecode_dir()
    cached = folder / f"{key}.{tag}.pyc" if folder is not None else None
    if cached is not None:
        with contextlib.suppress(OSError):
            return cached.read_bytes()
    try:
        code = compile(source, "<mas2c package>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    import marshal

    flags = 0b11  # hash-based, checked against the source (PEP 552)
    pyc = (
        importlib.util.MAGIC_NUMBER
        + flags.to_bytes(4, "little")
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )
    if cached is not None:
        with contextlib.suppress(OSError):
            _atomic_write_bytes(cached, pyc)
    return pyc


def _job_archive(job: _Job, job_json: bytes) -> IO[bytes]:
    """The job for /work as a tar (spooled to disk when large): the package, the input
    and job.json, all owned by root and read-only for the program."""
    buf: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=8 * _MIB)  # noqa: SIM115
    ignore = shutil.ignore_patterns(*_COPY_IGNORE)

    def add_tree(tf: tarfile.TarFile, src: Path, arc: str) -> None:
        tf.addfile(_tar_info(arc, is_dir=True, mode=0o755))
        names = sorted(os.listdir(src))
        skipped = ignore(str(src), names)
        compiled: list[tuple[str, bytes]] = []
        for name in names:
            if name in skipped:
                continue
            path = src / name
            if path.is_dir():
                add_tree(tf, path, f"{arc}/{name}")
            elif path.is_file():
                mode = 0o755 if os.access(path, os.X_OK) else 0o644
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    info = _tar_info(f"{arc}/{name}", is_dir=False, mode=mode, size=size)
                    if not name.endswith(".py"):
                        tf.addfile(info, f)  # streamed: a data file may be large
                        continue
                    data = f.read()
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                if (pyc := _bytecode(data)) is not None:
                    compiled.append((name[:-3], pyc))
        if compiled:
            cache = f"{arc}/__pycache__"
            tf.addfile(_tar_info(cache, is_dir=True, mode=0o755))
            tag = sys.implementation.cache_tag
            for stem, pyc in compiled:
                info = _tar_info(f"{cache}/{stem}.{tag}.pyc", is_dir=False, mode=0o644)
                info.size = len(pyc)
                tf.addfile(info, io.BytesIO(pyc))

    with tarfile.open(fileobj=buf, mode="w") as tf:
        add_tree(tf, job.package_dir, "pkg")
        tf.addfile(_tar_info("in", is_dir=True, mode=0o755))
        with open(job.input_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            tf.addfile(_tar_info("in/input.json", is_dir=False, mode=0o644, size=size), f)
        tf.addfile(_tar_info("job", is_dir=True, mode=0o755))
        info = _tar_info("job/job.json", is_dir=False, mode=0o644, size=len(job_json))
        tf.addfile(info, io.BytesIO(job_json))
    buf.seek(0)
    return buf


@dataclass
class _Box:
    """A started container whose runner waits for its one job."""

    #: The container's id.
    container: str
    name: str
    runtime: str | None
    uid: int
    deadline: float
    #: The attach stream (stdin+stdout+stderr, multiplexed), once attached.
    sock: Any = None
    #: Called once the container is removed (a pooled box's socket folder).
    on_release: Callable[[], None] | None = None


def volume_mount(target: str) -> dict[str, Any]:
    """An anonymous volume at `target` (the Engine API's Mount object)."""
    return {"Target": target, "Type": "volume", "ReadOnly": False}


def bind_mount(source: str, target: str, *, read_only: bool = True) -> dict[str, Any]:
    """A bind mount of the host folder `source` at `target` (the Engine API's Mount)."""
    return {"Target": target, "Source": source, "Type": "bind", "ReadOnly": read_only}


def _container_config(
    image: str,
    limits: Limits,
    loosen: Loosen,
    *,
    name: str,
    runtime: str | None,
    env: Mapping[str, str],
    labels: Mapping[str, str],
    mounts: list[dict[str, Any]],
    idle_s: float,
    warm_up: bool = True,
) -> dict[str, Any]:
    """The body of ``POST /containers/create`` (the container's name goes in the query):
    every isolation flag is here, and only here."""
    uid = 0 if loosen.root_user else SANDBOX_UID
    fsize = limits.file_size_mb * _MIB
    tmpfs_opts = f"size={limits.tmpfs_mb}m,nr_inodes={_TMPFS_INODES}"
    # The init (the runner) is root with only the capabilities to start the program as
    # `uid` with an empty bounding set and to kill it; the program cannot signal or
    # trace the init.
    caps = [] if loosen.root_user else ["KILL", "SETUID", "SETGID", "SETPCAP"]
    owned = f"{tmpfs_opts},uid={uid},gid={uid},mode=0755"
    host: dict[str, Any] = {
        "NetworkMode": "bridge" if loosen.network else "none",
        "ReadonlyRootfs": not loosen.writable_root,
        "Tmpfs": {
            "/tmp": f"size={limits.tmpfs_mb}m,mode=1777",
            _C_OUT: owned,
            _C_RUN: owned,
        },
        "Mounts": [dict(m) for m in mounts],
        "CapDrop": ["ALL"],
        "CapAdd": caps,
        "SecurityOpt": ["no-new-privileges"],
        "Memory": limits.memory_mb * _MIB,
        "MemorySwap": limits.memory_mb * _MIB,
        "NanoCpus": int(limits.cpus * 1e9),
        "PidsLimit": limits.pids,
        "Ulimits": [
            {"Name": "fsize", "Soft": fsize, "Hard": fsize},
            {"Name": "nofile", "Soft": _NOFILE, "Hard": _NOFILE},
            {"Name": "core", "Soft": 0, "Hard": 0},
        ],
        # The runner is the init (PID 1): it reaps, kills leftovers, ends the container.
        "Init": False,
        "IpcMode": "private",
        "AutoRemove": True,
        # The runner's output is the bundle, read over the attach stream: the daemon
        # keeps no log of it on the host's disk.
        "LogConfig": {"Type": "none", "Config": {}},
    }
    if runtime is not None:
        host["Runtime"] = runtime
    return {
        "Image": image,
        "Cmd": _runner_argv("python3", "init", _C_JOB, idle_s, limits.timeout_s, warm_up),
        "User": "0:0",
        "Env": [f"{k}={v}" for k, v in env.items()],
        "WorkingDir": "/",
        "Hostname": "mas2c-sandbox",
        "Labels": dict(labels),
        "Tty": False,
        # stdin kept open for the job's `go` and `stop`; StdinOnce: EOF when the host
        # detaches (the init then ends the container).
        "OpenStdin": True,
        "StdinOnce": True,
        "AttachStdin": True,
        "AttachStdout": True,
        "AttachStderr": True,
        "NetworkDisabled": False,
        "HostConfig": host,
    }


def _deadline_labels(deadline: float, extra: Mapping[str, str]) -> dict[str, str]:
    return {LABEL: "1", DEADLINE_LABEL: str(math.ceil(deadline)), **extra}


def _start_box(
    engine: Engine,
    job: _Job,
    *,
    name: str,
    mounts: list[dict[str, Any]],
    env: Mapping[str, str],
    labels: Mapping[str, str],
    idle_s: float,
    attach: bool,
    warm_up: bool = True,
) -> _Box:
    """Create and start a container whose runner waits up to `idle_s` for its job."""
    limits = job.limits
    # Idle wait + the job's timeout + the runner's grace: then the init ends it.
    deadline = time.time() + idle_s + limits.timeout_s + _RUNNER_GRACE_S + _COPY_S
    config = _container_config(
        job.image,
        limits,
        job.loosen,
        name=name,
        runtime=job.runtime,
        env=env,
        labels=_deadline_labels(deadline, labels),
        mounts=mounts,
        idle_s=idle_s,
        warm_up=warm_up,
    )
    cid = _create(engine, config, name, job.image)
    box = _Box(cid, name, job.runtime, 0 if job.loosen.root_user else SANDBOX_UID, deadline)
    if attach:
        _attach(engine, box)
    engine.start(cid)
    return box


def _create(engine: Engine, config: Mapping[str, Any], name: str, image: str) -> str:
    """Create the container; a missing image is the error naming the fix."""
    from mas2c.sandbox.engine import NotFound

    try:
        return engine.create(config, name=name)
    except NotFound as exc:
        if "image" in exc.explanation.lower():
            raise SandboxError(f"the sandbox image {image} is missing: {_BUILD_FIX}") from None
        raise


def _attach(engine: Engine, box: _Box) -> None:
    box.sock = engine.attach(box.container)


def _send(box: _Box, line: bytes) -> None:
    box.sock.settimeout(10)
    box.sock.sendall(line)


def _close_stream(box: _Box) -> None:
    if box.sock is not None:
        with contextlib.suppress(Exception):
            box.sock.close()


def _pump_attach(box: _Box, bundle: _Bundle, deadline: float, stderr_tail: bytearray) -> str:
    """Read the multiplexed attach stream into `bundle` until it is complete, the
    stream ends, or `deadline` passes; returns "done", "eof" or "deadline"."""
    buf = bytearray()
    while not bundle.done and not bundle.error:
        left = deadline - time.monotonic()
        if left <= 0:
            return "deadline"
        box.sock.settimeout(min(left, 5.0))
        try:
            data = box.sock.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:
            return "eof"
        if not data:
            return "eof"
        buf += data
        while len(buf) >= 8:
            kind, size = buf[0], int.from_bytes(buf[4:8], "big")
            if len(buf) < 8 + size:
                break
            payload = bytes(buf[8 : 8 + size])
            del buf[: 8 + size]
            if kind == 1:
                bundle.feed(payload)
            else:
                stderr_tail += payload
                del stderr_tail[:-8192]
    return "done" if bundle.done else "eof"


def _run_docker(job: _Job, outcome: _Outcome) -> None:
    for name in job.loosen.used():
        msg = {
            "network": "sandbox network enabled (--loosen network): the program can reach "
            "the network directly",
            "writable_root": "sandbox root filesystem is writable (--loosen writable-root)",
            "root_user": "sandbox runs as root (--loosen root-user)",
        }[name]
        job.warn(msg)
        outcome.notes.append(f"loosened: {msg}")

    engine = _engine()
    box: _Box | None = None
    name = f"mas2c-{job.run_id}"
    env = _scrubbed_env(path=_C_PATH, home="/tmp", pythonpath=_C_PKG, extra=job.env)
    _reap_once(engine)
    if job.runtime is not None:
        info = _daemon_info(engine)
        _check_runtime_registered(info, job.runtime)
        if job.loosen.network and _runtime_has_no_network(info, job.runtime):
            raise SandboxError(
                f"--allow-network cannot work under the {job.runtime} runtime: it is "
                "registered with --network=none (see /etc/docker/daemon.json); use runc"
            )
    try:
        box = _warm_box(engine, job, env, outcome) if job.use_pool else None
        if box is None and job.prestarted is not None:
            box = job.prestarted.take(job, env)
            if box is not None:
                outcome.pool = "cold"
        if box is None:
            outcome.pool = "cold"
            # No separate image check: a missing image is create()'s 404, named so.
            box = _start_box(
                engine,
                job,
                name=name,
                mounts=_cold_mounts(job, env),
                env=env,
                labels={f"{LABEL}.run": job.run_id},
                idle_s=_START_S,
                attach=True,
            )
        name = box.name
        _run_in_box(box, job, env, outcome, engine)
    except KeyboardInterrupt:
        outcome.interrupted = True
        raise
    except SandboxError:
        raise
    except Exception as exc:  # daemon errors: the daemon died, ...
        raise SandboxError(
            f"the Docker run failed ({type(exc).__name__}): {_short_reason(exc)}"
        ) from None
    finally:
        if box is not None and not outcome.interrupted:
            # Its init ends as the stream closes (auto_remove): the explicit removal
            # runs off the critical path; run_system joins it before returning.
            outcome.removal = _remove_later(box)
        else:
            _shielded(lambda: _remove_box(engine, box, name), outcome, "remove")


#: How long a prestarted container waits for its run's job (a compile, a slow upstream).
_PRESTART_IDLE_S = 300.0


class Prestart:
    """A cold container created and started on a thread for ONE run, while the caller
    (``run_system``) still prepares it (the gateway, the run folder): dockerd's create
    and start overlap the host's own work. It is the same fresh, single-use container
    as a cold run's (same flags; the init skips the pool's warm-up call); its socket
    folder is the run's gateway folder, bind-mounted before the gateway's socket exists.
    A run takes it only if it was made for exactly that run's image, limits, runtime and
    loosened flags; otherwise, and if the caller fails first, :meth:`cancel` removes it.
    """

    def __init__(
        self,
        *,
        image: str,
        limits: Limits,
        loosen: Loosen,
        runtime: str | None,
        socket_folder: Path | None,
    ) -> None:
        self.run_id = uuid.uuid4().hex[:12]
        self.key = (image, limits, loosen, runtime)
        self.started = time.monotonic()
        self.socket_folder = socket_folder
        self._box: _Box | None = None
        self._error: BaseException | None = None
        self._taken = False
        self._thread = threading.Thread(target=self._start, name="mas2c-prestart", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        image, limits, loosen, runtime = self.key
        try:
            engine = _engine()
            _reap_once(engine)
            if runtime is not None:
                _check_runtime_registered(_daemon_info(engine), runtime)
            env = _scrubbed_env(path=_C_PATH, home="/tmp", pythonpath=_C_PKG, extra={})
            mounts = [volume_mount(_C_WORK)]
            if self.socket_folder is not None:
                mounts.append(
                    bind_mount(str(self.socket_folder), CONTAINER_SOCKET_DIR, read_only=True)
                )
            template = _Job(
                package_dir=Path("."),
                module="prestart",
                input_path=Path("."),
                run_id=self.run_id,
                limits=limits,
                loosen=loosen,
                llm_socket=None,
                image=image,
                env={},
                warn=lambda _msg: None,
                runtime=runtime,
            )
            self._box = _start_box(
                engine,
                template,
                name=f"mas2c-{self.run_id}",
                mounts=mounts,
                env=env,
                labels={f"{LABEL}.run": self.run_id},
                idle_s=_PRESTART_IDLE_S,
                attach=True,
                warm_up=False,
            )
        except BaseException as exc:  # re-raised by take(), where the run would fail
            self._error = exc

    def take(self, job: _Job, env: dict[str, str]) -> _Box | None:
        """The started container for `job` (None: it does not fit; the run starts its
        own); a failure to start it is raised here, as the run's own would be."""
        self._thread.join()
        folder = self.socket_folder
        fits = (job.image, job.limits, job.loosen, job.runtime) == self.key and (
            # the run's gateway socket must be in the folder the container mounted
            job.llm_socket.resolve().parent == folder.resolve()
            if job.llm_socket is not None and folder is not None
            else job.llm_socket is None
        )
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, SandboxError):
                raise error
            raise SandboxError(
                f"the Docker run failed ({type(error).__name__}): {_short_reason(error)}"
            )
        fresh = time.monotonic() - self.started < _PRESTART_IDLE_S - _COPY_S
        if self._box is None or not fits or not fresh:
            self.cancel()  # gone before the run makes its own (it carries the same name)
            return None
        self._taken = True
        if job.llm_socket is not None:
            env["MAS2C_LLM_SOCKET"] = f"{CONTAINER_SOCKET_DIR}/{job.llm_socket.name}"
        return self._box

    def cancel(self) -> None:
        """Remove the container unless a run took it (idempotent)."""
        self._thread.join()
        if self._box is not None and not self._taken:
            box, self._box = self._box, None
            join_thread = _remove_later(box)
            join_thread.join(60.0)


def prestart(
    *,
    image: str = DEFAULT_IMAGE,
    limits: Limits = Limits(),
    loosen: Loosen = Loosen(),
    runtime: str | None = None,
    socket_folder: Path | None = None,
) -> Prestart | None:
    """Begin creating the cold container of a run about to start (see :class:`Prestart`);
    None when the run will not start one (bad limits or runtime name: the run reports
    them; a pool to take from; loosened flags)."""
    if runtime is None:
        runtime = default_runtime()
    try:
        limits.validate()
        _check_runtime(runtime)
    except SandboxError:
        return None
    if loosen.used():
        return None
    if os.environ.get(NO_POOL_ENV) != "1":
        from mas2c.sandbox.pool import ACTIVE, service_state

        if ACTIVE is not None or service_state() is not None:
            return None
    return Prestart(
        image=image, limits=limits, loosen=loosen, runtime=runtime, socket_folder=socket_folder
    )


def _daemon_info(engine: Engine) -> dict[str, Any]:
    try:
        return engine.info()
    except Exception:
        return {}  # the create call will say


def _cold_mounts(job: _Job, env: dict[str, str]) -> list[dict[str, Any]]:
    """/work: an anonymous volume holding the root-owned job (unpacked by the init from
    the attach stream: no host path shared with the daemon, no chown on the host); the
    program writes only to tmpfs. Only the LLM socket's folder is a bind mount."""
    mounts = [volume_mount(_C_WORK)]
    if job.llm_socket is not None:
        # The socket's own (private, per-run) folder, not the socket file: gVisor
        # cannot bind-mount a socket.
        sock = job.llm_socket.resolve()
        mounts.append(bind_mount(str(sock.parent), CONTAINER_SOCKET_DIR, read_only=True))
        env["MAS2C_LLM_SOCKET"] = f"{CONTAINER_SOCKET_DIR}/{sock.name}"
    return mounts


def _warm_box(engine: Engine, job: _Job, env: dict[str, str], outcome: _Outcome) -> _Box | None:
    """A warm container from this process's pool or the pool service, if one fits the
    job; its socket folder then gets a hard link to the run's gateway socket."""
    from mas2c.sandbox.pool import claim

    warm = claim(engine, job)
    if warm is None:
        return None
    outcome.pool = warm.kind
    if job.llm_socket is not None:
        try:
            os.link(job.llm_socket, warm.sockdir / "llm.sock")
        except OSError as exc:
            outcome.notes.append(f"warm container not used: cannot link the socket ({exc})")
            _remove_box(engine, warm.box, warm.box.name)
            return None
        env["MAS2C_LLM_SOCKET"] = f"{CONTAINER_SOCKET_DIR}/llm.sock"
    box: _Box = warm.box
    return box


def _run_in_box(
    box: _Box, job: _Job, env: Mapping[str, str], outcome: _Outcome, engine: Engine
) -> None:
    """Hand the job to a started container's runner and read its bundle back."""
    outcome.runtime = box.runtime or "default"
    outcome.uid = box.uid
    job_json = _job_json(
        job, pkg=_C_PKG, inp=_C_INPUT, out_dir=_C_OUT, cwd=_C_RUN, env=env, uid=box.uid
    )
    # The job travels on the attach stream (the init unpacks it into /work as root):
    # no docker cp, which costs a daemon round trip and a re-exec'd untar.
    with _job_archive(job, job_json) as archive:
        archive.seek(0, os.SEEK_END)
        size = archive.tell()
        archive.seek(0)
        box.sock.settimeout(_START_S)
        box.sock.sendall(b"job %d\n" % size)
        while chunk := archive.read(1 << 16):
            box.sock.sendall(chunk)
    t0 = time.monotonic()
    bundle = _Bundle(outcome.staging, job.limits.caps())
    tail = bytearray()
    deadline = t0 + _START_S + job.limits.timeout_s + _COPY_S
    try:
        how = _pump_attach(box, bundle, deadline, tail)
    except KeyboardInterrupt:
        outcome.interrupted = True

        def stop_and_collect() -> None:
            with contextlib.suppress(OSError):
                _send(box, b"stop\n")
            _pump_attach(box, bundle, time.monotonic() + 15.0, tail)

        _shielded(stop_and_collect, outcome, "collect")
        _apply_bundle(bundle, outcome)
        _keep_runner_errors(outcome, tail)
        raise
    finally:
        if not outcome.duration_s:
            outcome.duration_s = time.monotonic() - t0
    if how == "deadline":
        outcome.timed_out = True
        outcome.notes.append("the host-side deadline passed before the sandbox answered")
        with contextlib.suppress(Exception):
            engine.kill(box.container)
    _apply_bundle(bundle, outcome)
    _keep_runner_errors(outcome, tail)
    if bundle.header is None:
        _inspect_end(engine, box, outcome)


def _keep_runner_errors(outcome: _Outcome, tail: bytearray) -> None:
    """The runner itself writes to its stderr only when it fails (e.g. a broken image)."""
    if tail:
        with open(outcome.stderr, "ab") as f:
            f.write(b"\n[mas2c sandbox runner]\n" + bytes(tail))


def _inspect_end(engine: Engine, box: _Box, outcome: _Outcome) -> None:
    """No bundle: the container died (OOM-killed init, runtime failure): ask the daemon."""
    from mas2c.sandbox.engine import NotFound

    try:
        result = engine.wait(box.container, timeout=10)
        attrs = engine.inspect(box.container)
    except NotFound:
        # auto_remove was faster: the daemon's events still say how it ended.
        _end_from_events(engine, box, outcome)
        return
    except Exception as exc:
        outcome.notes.append(f"the container did not report: {_short_reason(exc)}")
        return
    state = attrs.get("State", {})
    if outcome.exit_code is None:
        outcome.exit_code = int((result or {}).get("StatusCode", -1))
    if bool(state.get("OOMKilled")) and not outcome.timed_out:
        outcome.oom_killed = True


def _end_from_events(engine: Engine, box: _Box, outcome: _Outcome) -> None:
    """How a removed container ended, from the daemon's events (oom, die exitCode)."""
    try:
        now = int(time.time()) + 1
        events = engine.events(since=now - 3600, until=now, filters={"container": box.container})
        for event in events:
            action = str(event.get("Action") or event.get("status") or "")
            attrs = (event.get("Actor") or {}).get("Attributes") or {}
            if action == "oom" and not outcome.timed_out:
                outcome.oom_killed = True
            elif action == "die" and outcome.exit_code is None:
                with contextlib.suppress(ValueError, TypeError):
                    outcome.exit_code = int(str(attrs.get("exitCode")))
    except Exception as exc:
        outcome.notes.append(f"the container ended before it reported: {_short_reason(exc)}")
    if outcome.oom_killed:
        outcome.notes.append("the whole sandbox was OOM-killed (the daemon's oom event)")


def _remove_box(engine: Engine, box: _Box | None, name: str) -> None:
    """Force-remove the run's container and its anonymous volume (by name if create()
    itself was interrupted after the daemon made the container); returns once the
    daemon says it is gone."""
    from mas2c.sandbox.engine import Conflict, NotFound

    if box is not None:
        _close_stream(box)
    target = box.container if box is not None else name
    try:
        # NotFound / Conflict: auto_remove got there first (or is at it).
        with contextlib.suppress(NotFound, Conflict):
            engine.remove(target, force=True, volumes=True)
        # Gone when this returns (auto_remove may still be at it).
        engine.wait(target, condition="removed", timeout=30)
    except NotFound:
        pass
    finally:
        if box is not None and box.on_release is not None:
            box.on_release()


def _check_runtime_registered(info: Mapping[str, Any], runtime: str | None) -> None:
    if runtime is None or not info:
        return
    known = sorted(info.get("Runtimes") or {})
    if runtime not in known:
        raise SandboxError(
            f"the container runtime {runtime!r} is not registered with dockerd (it has: "
            f"{', '.join(known) or 'none'}); for gVisor run scripts/ensure-docker.sh, "
            f"or pick another with --runtime / {RUNTIME_ENV}"
        )


def _runtime_has_no_network(info: Mapping[str, Any], runtime: str | None) -> bool:
    """True if the daemon registered `runtime` with ``--network=none`` (gVisor here)."""
    if runtime is None:
        return False
    found = (info.get("Runtimes") or {}).get(runtime) or {}
    args = found.get("runtimeArgs") or found.get("RuntimeArgs") or []
    return "--network=none" in args


_PENDING: set[threading.Thread] = set()


def _remove_later(box: _Box) -> threading.Thread:
    """Remove a used container in the background (closing its attach stream first, so
    its init exits at once); :func:`wait_removals` (atexit too) waits for them, and
    :func:`join_removal` for one."""
    _close_stream(box)

    def remove() -> None:
        try:
            _remove_box(_engine(), box, box.name)
        except Exception as exc:
            logger.debug("removing %s failed: %s", box.name, exc)
        finally:
            _PENDING.discard(thread)

    thread = threading.Thread(target=remove, name="mas2c-remove", daemon=True)
    _PENDING.add(thread)
    thread.start()
    return thread


def join_removal(report: SandboxReport, timeout_s: float = 60.0) -> None:
    """Wait until the container of the run `report` describes is removed."""
    thread = _REMOVALS.pop(report.run_id, None)
    if thread is not None:
        thread.join(timeout_s)


#: run id -> the thread removing its container (see run_package, join_removal).
_REMOVALS: dict[str, threading.Thread] = {}


def wait_removals(timeout_s: float = 60.0) -> None:
    """Wait for the background removals of used containers."""
    deadline = time.monotonic() + timeout_s
    for thread in list(_PENDING):
        thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(wait_removals)


_REAPED = False


def _reap_once(engine: Engine) -> None:
    """The first docker run of a process removes what earlier (killed) runs left, on a
    thread of its own (off the run's critical path)."""
    global _REAPED
    if _REAPED:
        return
    _REAPED = True

    def sweep() -> None:
        with contextlib.suppress(Exception):
            reap(engine)
        with contextlib.suppress(Exception):
            reap_private_dirs()
        _PENDING.discard(thread)

    thread = threading.Thread(target=sweep, name="mas2c-reap", daemon=True)
    _PENDING.add(thread)
    thread.start()


def reap(engine: Engine | None = None, *, stopped_min_age_s: float = 60.0) -> int:
    """Remove mas2c containers past their deadline label (running or not), and stopped
    ones older than `stopped_min_age_s`. Returns how many were removed."""
    from mas2c.sandbox.engine import EngineError

    engine = engine or _engine()
    removed = 0
    now = time.time()
    for c in engine.containers(all=True, filters={"label": LABEL}):
        labels = c.get("Labels") or {}
        try:
            deadline = float(labels.get(DEADLINE_LABEL, "inf"))
        except ValueError:
            deadline = math.inf
        running = c.get("State") == "running"
        old = now - float(c.get("Created", now)) >= stopped_min_age_s
        if deadline < now or (not running and old):
            with contextlib.suppress(EngineError):
                engine.remove(c["Id"], force=True, volumes=True)
                removed += 1
    return removed


# -------------------------------------------------------------- unisolated backend


def _count_user_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
    return count


def _set_rlimits(limits: Limits, nproc: int | None) -> None:
    """In the child, before exec (preexec_fn): lower this process tree's rlimits."""
    import resource

    def lower(res: int, value: int, hard_extra: int = 0) -> None:
        _soft, hard = resource.getrlimit(res)
        new_hard = value + hard_extra
        if hard != resource.RLIM_INFINITY:
            new_hard = min(new_hard, hard)
        resource.setrlimit(res, (min(value, new_hard), new_hard))

    cpu = math.ceil(limits.timeout_s) + 2  # the wall clock normally fires first
    lower(resource.RLIMIT_CPU, cpu, hard_extra=5)
    # The runner holds the interpreter and the runtime's imports: room above the limit.
    lower(resource.RLIMIT_AS, limits.memory_mb * _MIB)
    lower(resource.RLIMIT_FSIZE, limits.file_size_mb * _MIB)
    lower(resource.RLIMIT_NOFILE, _NOFILE)
    lower(resource.RLIMIT_CORE, 0)
    if nproc is not None:
        lower(resource.RLIMIT_NPROC, nproc)


def _drop_privileges(uid: int) -> None:
    """In the child (preexec_fn), as root: become `uid` with no supplementary groups."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _blocked_ancestors(paths: Iterable[str], uid: int) -> list[tuple[str, str]]:
    """(directory `uid` cannot search, its child on the way to a needed path), top-down.

    E.g. a venv whose interpreter lives under /root (0700) gives [("/root", ".pyenv")].
    """
    plan: list[tuple[str, str]] = []
    for path in paths:
        parts = Path(os.path.realpath(path)).parts
        for depth in range(1, len(parts)):
            parent = os.path.join(*parts[:depth]) if depth > 1 else "/"
            with contextlib.suppress(OSError):
                st = os.stat(parent)
                if st.st_uid == uid:
                    bit = stat.S_IXUSR
                elif st.st_gid == uid:  # nobody's group is nogroup (65534)
                    bit = stat.S_IXGRP
                else:
                    bit = stat.S_IXOTH
                if not st.st_mode & bit and (parent, parts[depth]) not in plan:
                    plan.append((parent, parts[depth]))
    return sorted(plan, key=lambda item: len(Path(item[0]).parts))


def _expose(plan: list[tuple[str, str]]) -> None:
    """In the child (preexec_fn), as root: in a private mount namespace, cover each
    blocked directory with an empty tmpfs (0711) and bind back only the needed child,
    so an unprivileged uid reaches the interpreter and nothing else there."""
    if not plan:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ms_bind, ms_rec, ms_private = 4096, 16384, 1 << 18

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
    check(libc.mount(None, b"/", None, ms_rec | ms_private, None), "mount --make-rprivate /")
    for parent, child in plan:
        src = os.path.join(parent, child)
        fd = os.open(src, os.O_PATH)
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            check(
                libc.mount(b"none", parent.encode(), b"tmpfs", 0, b"mode=0711,size=64k"),
                f"mount tmpfs on {parent}",
            )
            if is_dir:
                os.mkdir(src, 0o755)
            else:
                os.close(os.open(src, os.O_CREAT | os.O_WRONLY, 0o644))
            source = f"/proc/self/fd/{fd}".encode()
            check(libc.mount(source, src.encode(), None, ms_bind | ms_rec, None), f"bind {src}")
        finally:
            os.close(fd)


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _marked_processes(run_id: str) -> list[int]:
    """Processes whose environment carries this run's marker (they may have left the
    runner's session with setsid and its tree by double-forking)."""
    marker = f"{_RUN_MARKER}={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
            if marker in f.read().split(b"\0"):
                found.append(int(entry))
    return found


def _sweep_unisolated(run_id: str, rounds: int = 5) -> int:
    """Kill every process left by the run (marked by its environment). Returns how many."""
    killed = 0
    for _ in range(rounds):
        pids = _marked_processes(run_id)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
    return killed


def _run_unisolated(job: _Job, outcome: _Outcome) -> None:
    job.warn(
        "--sandbox unisolated does NOT isolate: the program runs as your user (nobody when "
        "mas2c runs as root), with your files and your network; only rlimits, a "
        "scrubbed environment and a temp dir apply"
    )
    outcome.notes.append(
        "unisolated backend: no isolation (filesystem, network and user are shared)"
    )
    if job.loosen.used():
        outcome.notes.append("loosen flags have no effect on the unisolated backend")
    limits = job.limits
    as_root = os.geteuid() == 0
    uid = program_uid("unisolated")
    outcome.uid = uid
    nproc: int | None = None
    if as_root:
        outcome.notes.append(f"mas2c runs as root: the program runs as uid {uid} (nobody)")
    nproc = _count_user_processes(uid) + limits.pids
    outcome.notes.append(f"RLIMIT_NPROC={nproc} (counts all of uid {uid}'s processes)")
    outcome.notes.append(
        "memory is limited by RLIMIT_AS (virtual memory), CPU time by RLIMIT_CPU; "
        "cpus and tmpfs_mb are not enforced"
    )
    with private_dir("unisolated", mode=0o711) as work:
        _stage_unisolated(job, work, uid if as_root else None)
        env = _scrubbed_env(
            path=f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
            home=str(work / "home"),
            pythonpath=str(work / "pkg"),
            extra={**job.env, "MALLOC_ARENA_MAX": "2", _RUN_MARKER: job.run_id},
        )
        if job.llm_socket is not None:
            env["MAS2C_LLM_SOCKET"] = str(job.llm_socket.resolve())
        job_json = _job_json(
            job,
            pkg=str(work / "pkg"),
            inp=str(work / "in" / "input.json"),
            out_dir=str(work / "out"),
            cwd=str(work / "run"),
            env=env,
            uid=None,  # the runner itself already runs as the program's user
        )
        (work / "job" / "job.json").write_bytes(job_json)
        if as_root:  # the runner reads it as `uid`, whatever mas2c's umask made its mode
            os.chown(work / "job" / "job.json", uid, uid)
        argv = _runner_argv(
            sys.executable, "unisolated", str(work / "job" / "job.json"), 60, limits.timeout_s
        )

        plan: list[tuple[str, str]] = []
        if as_root:
            needed = [sys.executable, sys.prefix, sys.base_prefix, str(work)]
            if job.llm_socket is not None:
                needed.append(str(job.llm_socket))
            plan = _blocked_ancestors(needed, uid)
            if plan:
                outcome.notes.append(
                    "made reachable for uid "
                    f"{uid} in a private mount namespace: "
                    + ", ".join(os.path.join(p, c) for p, c in plan)
                )

        def preexec() -> None:
            # The limits come last: a forked child keeps its parent's address space (a
            # threaded parent easily maps more than RLIMIT_AS), so under the limit _expose
            # could not even load ctypes. Lowering limits needs no privilege.
            if as_root:
                _expose(plan)
                _drop_privileges(uid)
            _set_rlimits(limits, nproc)

        with open(work / "runner.log", "wb") as runner_log:
            proc = subprocess.Popen(
                argv,
                cwd=work / "run",
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=runner_log,
                start_new_session=True,
                preexec_fn=preexec,
            )
            try:
                _talk_unisolated(proc, job, outcome)
            finally:
                _killpg(proc.pid)
                _shielded(lambda: _reap(proc), outcome, "reap")
                left = _sweep_unisolated(job.run_id)
                if left:
                    outcome.notes.append(f"killed {left} process(es) the program left behind")
        tail = _read_tail(work / "runner.log", 8192)
        if tail:
            with open(outcome.stderr, "ab") as f:
                f.write(b"\n[mas2c sandbox runner]\n" + tail)
    if outcome.exit_code == 128 + signal.SIGXCPU:
        outcome.timed_out = True
        outcome.notes.append("killed by RLIMIT_CPU (CPU time limit)")
    if (
        not outcome.timed_out
        and outcome.exit_code not in (0, None)
        and b"MemoryError" in _read_tail(outcome.stderr, 4096)
    ):
        outcome.oom_killed = True
        outcome.notes.append("MemoryError at the RLIMIT_AS limit reported as oom_killed")


def _stage_unisolated(job: _Job, work: Path, uid: int | None) -> None:
    """The run's folders; as root the program's own (out, run, home) belong to `uid`."""
    shutil.copytree(job.package_dir, work / "pkg", ignore=shutil.ignore_patterns(*_COPY_IGNORE))
    for d in ("in", "job", "out", "run", "home"):
        (work / d).mkdir(exist_ok=True)
    shutil.copyfile(job.input_path, work / "in" / "input.json")
    if uid is None:
        return
    for root, dirs, files in os.walk(work / "pkg"):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
        del dirs[:0]
    for d in ("in", "job"):
        os.chmod(work / d, 0o755)
    os.chmod(work / "in" / "input.json", 0o644)
    for d in ("out", "run", "home"):
        os.chown(work / d, uid, uid)


def _talk_unisolated(proc: subprocess.Popen[bytes], job: _Job, outcome: _Outcome) -> None:
    """Send `go`, read the bundle from the runner's stdout (bounded in bytes and time)."""
    assert proc.stdin is not None and proc.stdout is not None
    t0 = time.monotonic()
    bundle = _Bundle(outcome.staging, job.limits.caps())
    fd = proc.stdout.fileno()

    def pump(deadline: float) -> str:
        while not bundle.done and not bundle.error:
            left = deadline - time.monotonic()
            if left <= 0:
                return "deadline"
            ready, _, _ = select.select([fd], [], [], min(left, 5.0))
            if not ready:
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                return "eof"
            bundle.feed(data)
        return "done"

    try:
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        how = pump(t0 + _START_S + job.limits.timeout_s + _COPY_S)
    except KeyboardInterrupt:
        outcome.interrupted = True

        def stop_and_collect() -> None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.write(b"stop\n")
                proc.stdin.flush()
            pump(time.monotonic() + 15.0)

        _shielded(stop_and_collect, outcome, "collect")
        _apply_bundle(bundle, outcome)
        raise
    except BrokenPipeError:
        how = "eof"
    finally:
        if not outcome.duration_s:
            outcome.duration_s = time.monotonic() - t0
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if how == "deadline":
        outcome.timed_out = True
        outcome.notes.append("the host-side deadline passed before the runner answered")
    _apply_bundle(bundle, outcome)
    if bundle.header is None:
        _killpg(proc.pid)
        rc = proc.wait()
        outcome.exit_code = 128 - rc if rc < 0 else rc


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.wait()


# ----------------------------------------------------------------- image building


def _say(on_progress: Callable[[str], None] | None) -> Callable[[str], None]:
    return on_progress if on_progress is not None else logger.info


def _image_present(client: Any, ref: str) -> bool:
    docker = _import_docker()
    try:
        client.images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def _ensure_base(client: Any, base: str, say: Callable[[str], None]) -> str:
    """The base image to build on: `base` if present or pullable, else (for the
    default base only) a Debian base made with mmdebstrap and docker import."""
    docker = _import_docker()
    if _image_present(client, base):
        say(f"base image {base}: present")
        return base
    say(f"base image {base}: not present, pulling ...")
    try:
        client.images.pull(base)
        say(f"base image {base}: pulled")
        return base
    except docker.errors.DockerException as exc:
        reason = _short_reason(exc)
    if base != DEFAULT_BASE:
        raise SandboxError(
            f"base image {base} is not present and cannot be pulled ({reason}): load it with "
            f"`docker load`, or omit --base to build a Debian base with mmdebstrap"
        )
    say(f"cannot pull {base} ({reason}): no image registry is reachable")
    if _image_present(client, DEBIAN_BASE):
        say(f"using the Debian base {DEBIAN_BASE} made earlier with mmdebstrap")
        return DEBIAN_BASE
    _make_debian_base(client, say)
    return DEBIAN_BASE


def _make_debian_base(client: Any, say: Callable[[str], None]) -> None:
    if shutil.which("mmdebstrap") is None:
        raise SandboxError(
            f"no registry is reachable for {DEFAULT_BASE} and mmdebstrap is not installed: "
            "`apt-get install mmdebstrap` (or run scripts/ensure-docker.sh), or pass a "
            "local base image with --base"
        )
    if os.geteuid() != 0:
        raise SandboxError(
            "building the Debian base image with mmdebstrap needs root: run "
            "`mas2c sandbox build` as root once, or pass a local base image with --base"
        )
    say(
        f"building a Debian {DEBIAN_SUITE} base image {DEBIAN_BASE} with mmdebstrap "
        "(python3, ca-certificates; takes one or two minutes) ..."
    )
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mas2c-base-", dir="/var/tmp") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        proc = subprocess.run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=python3,ca-certificates",
                DEBIAN_SUITE,
                str(tarball),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise SandboxError(f"mmdebstrap failed (exit {proc.returncode}):\n{tail}")
        repo, _, tag = DEBIAN_BASE.partition(":")
        client.api.import_image_from_file(
            str(tarball),
            repository=repo,
            tag=tag,
            changes=[f"ENV PATH={_C_PATH}", "ENV LANG=C.UTF-8", 'CMD ["python3"]'],
        )
    say(f"Debian base {DEBIAN_BASE} ready in {time.monotonic() - t0:.0f} s")


_PROBE = (
    "import json, platform, sys, sysconfig, importlib.util as u; "
    "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
    "'impl': sys.implementation.name, 'machine': platform.machine(), "
    "'libc': platform.libc_ver(), 'pip': u.find_spec('pip') is not None}))"
)


def _probe_python(client: Any, image: str) -> dict[str, Any]:
    docker = _import_docker()
    try:
        out = client.containers.run(
            image,
            ["python3", "-c", _PROBE],
            remove=True,
            network_mode="none",
            labels={LABEL: "1", f"{LABEL}.probe": "1"},
        )
    except docker.errors.DockerException as exc:
        raise SandboxError(
            f"base image {image} has no working python3 ({_short_reason(exc)}): "
            "use a Python base image"
        ) from None
    info: dict[str, Any] = json.loads(bytes(out).decode().strip().splitlines()[-1])
    return info


def _wheel_platforms(info: Mapping[str, Any]) -> list[str]:
    machine = str(info["machine"])
    libc, libc_version = info["libc"]
    if libc == "glibc":
        minor = int(str(libc_version).split(".")[1])
        plats = [f"manylinux_2_{m}_{machine}" for m in range(minor, 16, -1)]
        return [*plats, f"manylinux2014_{machine}"]
    return [f"musllinux_1_2_{machine}", f"musllinux_1_1_{machine}"]


def _requirements() -> list[str]:
    """sandbox/requirements.txt, each requirement pinned to the version installed on
    the host when there is one (so the unisolated and docker backends run the same code)."""
    from importlib import metadata

    reqs: list[str] = []
    for line in (SANDBOX_DIR / "requirements.txt").read_text().splitlines():
        req = line.split("#", 1)[0].strip()
        if not req:
            continue
        name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(req)
    return reqs


def _wheel_cache(info: Mapping[str, Any]) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "mas2c" / "wheels" / f"{info['impl']}{info['version']}-{info['machine']}"


def _download_wheels(
    dest: Path,
    info: Mapping[str, Any],
    say: Callable[[str], None],
    requirements: Sequence[str] | None = None,
) -> None:
    """Fetch the runtime wheels (or `requirements`) for the image's Python ON THE HOST
    (the build itself has no network). Wheels are kept in a cache, which serves when
    PyPI is not reachable."""
    version = str(info["version"])
    reqs = list(requirements) if requirements is not None else _requirements()
    if not info.get("pip"):
        reqs.append("pip")  # Debian's python3 has no pip: install from pip's own wheel
    cache = _wheel_cache(info)
    cache.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check"]
    base += ["--only-binary=:all:", "--python-version", version, "--dest", str(dest)]
    base += ["--implementation", "cp", "--abi", f"cp{version.replace('.', '')}"]
    for plat in _wheel_platforms(info):
        base += ["--platform", plat]
    base += ["--find-links", str(cache)]
    say(f"downloading wheels on the host for Python {version}: {' '.join(reqs)}")
    proc = subprocess.run([*base, *reqs], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        say("pip download failed; trying the local wheel cache only")
        proc = subprocess.run(
            [*base, "--no-index", *reqs], capture_output=True, text=True, check=False
        )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise SandboxError(
            f"cannot fetch the sandbox's runtime wheels (PyPI unreachable and no cached "
            f"wheels in {cache}):\n{tail}"
        )
    for whl in dest.glob("*.whl"):
        if not (cache / whl.name).exists():
            with contextlib.suppress(OSError):
                shutil.copy2(whl, cache / whl.name)
    (dest / "requirements.txt").write_text("\n".join(r for r in reqs if r != "pip") + "\n")


def build_image(
    *,
    base: str = DEFAULT_BASE,
    tag: str = DEFAULT_IMAGE,
    on_progress: Callable[[str], None] | None = None,
) -> str:
    """Build the sandbox image from sandbox/ and return its tag.

    Offline-capable: the base is used if present, else pulled, else (for the default
    base) made with mmdebstrap + docker import; runtime wheels are downloaded on the
    host and installed with --no-index; the build runs with network_mode none.
    """
    docker = _import_docker()
    say = _say(on_progress)
    if not (SANDBOX_DIR / "Dockerfile").is_file():
        raise SandboxError(f"the sandbox build context {SANDBOX_DIR} is missing its Dockerfile")
    t0 = time.monotonic()
    client = _docker_client(timeout=1800)
    try:
        previous = client.images.get(tag).id if _image_present(client, tag) else None
        base_ref = _ensure_base(client, base, say)
        info = _probe_python(client, base_ref)
        say(f"base {base_ref}: Python {info['version']} on {info['machine']}")
        with tempfile.TemporaryDirectory(prefix="mas2c-build-") as tmp:
            ctx = Path(tmp)
            shutil.copy2(SANDBOX_DIR / "Dockerfile", ctx / "Dockerfile")
            (ctx / "wheels").mkdir()
            _download_wheels(ctx / "wheels", info, say)
            say(f"building {tag} (no network inside the build) ...")
            stream = client.api.build(
                path=str(ctx),
                tag=tag,
                buildargs={"BASE": base_ref},
                # Not the bare `mas2c` label: containers inherit image labels, and
                # that one marks the containers of runs (cleanup, leak checks).
                labels={
                    f"{LABEL}.sandbox": "1",
                    f"{LABEL}.base": base_ref,
                    f"{LABEL}.python": str(info["version"]),
                },
                rm=True,
                forcerm=True,
                pull=False,
                network_mode="none",
                decode=True,
            )
            for chunk in stream:
                if "error" in chunk:
                    raise SandboxError(f"building {tag} failed: {str(chunk['error']).strip()}")
                line = str(chunk.get("stream", "")).rstrip()
                if line:
                    say(line)
        if previous is not None and client.images.get(tag).id != previous:
            # The image this build replaced is now untagged: drop it unless in use.
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(previous)
    except docker.errors.DockerException as exc:
        raise SandboxError(f"building {tag} failed: {_short_reason(exc)}") from None
    finally:
        client.close()
    say(f"built {tag} in {time.monotonic() - t0:.0f} s")
    return tag


# ------------------------------------------------------------------ status, prune


def status(image: str = DEFAULT_IMAGE) -> dict[str, Any]:
    """Daemon reachable? version? image present (id, created)? backends available."""
    out: dict[str, Any] = {
        "docker_host": os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
        "daemon": {"reachable": False, "version": None, "api_version": None, "error": None},
        "image": {"name": image, "present": False, "id": None, "created": None, "labels": {}},
        "backends": {"docker": False, "unisolated": True},
        "runtimes": [],
        "default_runtime": None,
        "runtime_env": default_runtime(),
        "leftover_containers": 0,
        "pool_service": None,
    }
    try:
        engine = _engine(timeout=10)
    except SandboxError as exc:
        out["daemon"]["error"] = str(exc)
        return out
    try:
        version = engine.version()
        out["daemon"].update(
            reachable=True, version=version.get("Version"), api_version=version.get("ApiVersion")
        )
        info = engine.info()
        out["runtimes"] = sorted(info.get("Runtimes") or {})
        out["default_runtime"] = info.get("DefaultRuntime")
        try:
            img = _require_image(engine, image)
            out["image"].update(
                present=True,
                id=img.get("Id"),
                created=img.get("Created"),
                labels=(img.get("Config") or {}).get("Labels") or {},
                size_mb=round((img.get("Size") or 0) / _MIB, 1),
            )
        except SandboxError as exc:
            out["image"]["error"] = str(exc)
        out["backends"]["docker"] = out["image"]["present"]
        left = engine.containers(all=True, filters={"label": LABEL})
        out["leftover_containers"] = len(left)
        from mas2c.sandbox.pool import service_state

        state = service_state()
        if state is not None:
            out["pool_service"] = {"pid": state["pid"], "size": state["size"]}
    except Exception as exc:
        out["daemon"]["error"] = _short_reason(exc)
    return out


def prune(min_age_s: float = 60.0) -> int:
    """Remove what killed runs left: mas2c containers past their deadline (also running
    ones), stopped ones older than `min_age_s` (a run in progress is briefly `created`
    before its start), and temp folders of dead owners. Returns the containers removed.
    Running containers within their deadline (runs in progress, a pool) stay.
    """
    removed = reap(stopped_min_age_s=min_age_s)
    reap_private_dirs()
    return removed


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mas2c.sandbox")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the sandbox image")
    b.add_argument("--base", default=DEFAULT_BASE)
    b.add_argument("--tag", default=DEFAULT_IMAGE)
    b.add_argument("--if-missing", action="store_true", help="do nothing if the image exists")
    s = sub.add_parser("status", help="daemon, image and backends")
    s.add_argument("--image", default=DEFAULT_IMAGE)
    sub.add_parser("prune", help="remove leftover mas2c containers")
    args = parser.parse_args(argv)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.cmd == "build":
            if args.if_missing:
                st = status(args.tag)
                if st["image"]["present"]:
                    print(f"{args.tag} is present ({st['image']['id']})", file=sys.stderr)
                    return 0
            print(build_image(base=args.base, tag=args.tag, on_progress=progress))
        elif args.cmd == "status":
            st = status(args.image)
            print(json.dumps(st, indent=2))
            return 0 if st["backends"]["docker"] else 1
        else:
            print(f"removed {prune()} leftover container(s)")
    except SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
