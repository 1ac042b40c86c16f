"""Run a compiled mas2c package in a sandbox, and build the sandbox image.

Two backends:

* ``docker`` (default): one fresh container per run, with secure defaults (non-root
  user, no network, read-only root, size-capped tmpfs, all capabilities dropped,
  no-new-privileges, memory = memory+swap, CPU/pids/file-size limits, an init
  process) and a host-side wall-clock timeout that kills the container. The
  container is labelled ``mas2c`` and always removed, also on Ctrl-C and errors.
* ``local``: a subprocess in a temp dir with rlimits, a scrubbed environment and its
  own process group (killed at the timeout). It does NOT isolate, and says so.

Both write the same run folder: ``result.json``, ``trace.jsonl``, ``stdout.txt``,
``stderr.txt`` and ``sandbox.json``, each written atomically (temp file in the same
folder, then ``os.replace``), so an interrupted run still leaves a readable folder
and never a half-written file.

The module is importable cheaply: ``docker`` is imported inside the functions that
need it. ``python -m mas2c.sandbox build|status|prune`` is a small CLI around
:func:`build_image`, :func:`status` and :func:`prune` (used by
``scripts/ensure-docker.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

from mas2c.errors import RunFailure

logger = logging.getLogger("mas2c.sandbox")

DEFAULT_IMAGE = "mas2c-sandbox:latest"
DEFAULT_BASE = "python:3.12-slim"
#: Base image made with mmdebstrap + docker import when no registry is reachable.
DEBIAN_BASE = "mas2c-base:bookworm"
DEBIAN_SUITE = "bookworm"
#: Where the LLM gateway's unix socket appears inside the container.
CONTAINER_SOCKET = "/run/mas2c/llm.sock"
SANDBOX_UID = 1000
LABEL = "mas2c"
# sandbox/ of a source checkout, or the copy shipped inside the wheel.
SANDBOX_DIR = next(
    (
        p
        for p in (
            Path(__file__).resolve().parent / "_sandbox",
            Path(__file__).resolve().parent.parent / "sandbox",
        )
        if (p / "Dockerfile").is_file()
    ),
    Path(__file__).resolve().parent.parent / "sandbox",
)

_MIB = 1024 * 1024
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_COPY_IGNORE = ("__pycache__", "*.pyc", "*.pyo", ".git", ".venv", ".mypy_cache", ".ruff_cache")
_NOFILE = 1024
_DAEMON_FIX = (
    "start it with `dockerd &` (or scripts/ensure-docker.sh), "
    "or use --sandbox local (which does not isolate)"
)
_BUILD_FIX = "build it with `mas2c sandbox build` (or scripts/ensure-docker.sh)"

# Paths inside the container (all under one anonymous volume at /work, see _run_docker).
_C_WORK = "/work"
_C_PKG = "/work/pkg"
_C_INPUT = "/work/in/input.json"
_C_OUT = "/work/out"
_C_IO = "/work/out/_sandbox"  # the runner's captured streams, fetched with out/
_C_RUN = "/work/run"
_C_RUNNER = "/work/runner.py"
_C_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The runner runs inside the sandbox (both backends) as the parent of the program.
# It drains the program's stdout/stderr into files, keeping only the first CAP bytes
# of each (so an output flood costs neither host memory nor daemon disk), drops a
# `<name>.truncated` marker as soon as a byte is dropped (so the flag survives a
# kill), and exits with the program's exit code (128+N for signal N). It is started
# with `python3 -I`, so a module in the program's package cannot shadow the stdlib.
_RUNNER = r"""
import os, signal, subprocess, sys, threading

def pump(fd, path, marker, cap):
    written = 0
    marked = False
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            room = cap - written
            if room > 0:
                part = memoryview(chunk[:room])
                try:
                    while part:
                        n = f.write(part)
                        part = part[n:]
                        written += n
                except OSError:
                    written = cap
            if len(chunk) > max(room, 0) and not marked:
                marked = True
                open(marker, "wb").close()

def main():
    cap, iodir = int(sys.argv[1]), sys.argv[2]
    cmd = sys.argv[4:]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # subprocess restores it for the child
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    threads = []
    for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        t = threading.Thread(target=pump, daemon=True, args=(
            pipe.fileno(), os.path.join(iodir, name + ".txt"),
            os.path.join(iodir, name + ".truncated"), cap))
        t.start()
        threads.append(t)
    rc = proc.wait()
    for t in threads:
        t.join(timeout=2.0)  # a leftover grandchild may hold the pipe open
    os._exit(128 - rc if rc < 0 else rc)

main()
"""


class SandboxError(RunFailure):
    """A user-facing sandbox failure; the message names the fix."""

    code = "sandbox"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 600.0
    memory_mb: int = 1024
    cpus: float = 1.0
    pids: int = 256
    tmpfs_mb: int = 256
    file_size_mb: int = 64
    output_cap_bytes: int = 1_000_000

    def validate(self) -> None:
        checks = {
            "timeout_s": self.timeout_s > 0,
            "memory_mb": self.memory_mb >= 16,
            "cpus": self.cpus > 0,
            "pids": self.pids >= 8,
            "tmpfs_mb": self.tmpfs_mb >= 1,
            "file_size_mb": self.file_size_mb >= 1,
            "output_cap_bytes": self.output_cap_bytes >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise SandboxError(f"invalid sandbox limits: {values}")


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
    #: "container" (docker) or "none" (local: the program is not isolated).
    isolation: str = "container"
    run_id: str = ""
    #: Limits that could not be applied, warnings, and the error of a failed run.
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    notes: list[str] = field(default_factory=list)

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

    def truncated(self, name: str) -> bool:
        return (self.staging / f"{name}.truncated").exists()


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


def _program_argv(python: str, module: str, inp: str, out_dir: str) -> list[str]:
    return [
        python,
        "-m",
        module,
        "--input",
        inp,
        "--output",
        f"{out_dir}/out.json",
        "--trace",
        f"{out_dir}/trace.jsonl",
    ]


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
    backend: Literal["docker", "local"] = "docker",
    limits: Limits = Limits(),
    loosen: Loosen = Loosen(),
    llm_socket: Path | None = None,
    image: str = DEFAULT_IMAGE,
    env: Mapping[str, str] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> SandboxReport:
    """Run ``python -m <module> --input .. --output .. --trace ..`` in a sandbox.

    Always writes the run folder (also when the run fails, times out or is
    interrupted), then raises SandboxError for a sandbox failure (daemon
    unreachable, image missing, bad arguments) or re-raises KeyboardInterrupt;
    otherwise returns the report. A failing *program* is not an exception: see the
    report and result.json.
    """
    warn = on_warning if on_warning is not None else logger.warning
    package_dir, input_path, run_dir = Path(package_dir), Path(input_path), Path(run_dir)
    run_id = uuid.uuid4().hex[:12]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SandboxError(f"cannot create the run folder {run_dir}: {exc}") from None
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{run_id}-", dir=run_dir))
    outcome = _Outcome(staging=staging)
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
    )
    error: SandboxError | None = None
    try:
        with _sigterm_as_interrupt():
            try:
                limits.validate()
                _check_inputs(package_dir, module, input_path)
                _check_env(env or {})
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
                )
                if backend == "docker":
                    _run_docker(job, outcome)
                elif backend == "local":
                    _run_local(job, outcome)
                else:
                    raise SandboxError(f"unknown sandbox backend {backend!r}: use docker or local")
            except SandboxError as exc:
                error = exc
            except KeyboardInterrupt:
                outcome.interrupted = True
            finally:
                _finalize(run_dir, outcome, report, error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
    report.stdout_truncated = outcome.truncated("stdout")
    report.stderr_truncated = outcome.truncated("stderr")
    report.notes.extend(outcome.notes)
    report.error = str(error) if error is not None else None

    for name in ("stdout.txt", "stderr.txt", "trace.jsonl"):
        src = outcome.staging / name
        _atomic_copy(src if src.exists() else None, run_dir / name)

    result: bytes | None = None
    problem = "the program wrote no result"
    if outcome.out_json.is_file():
        raw = outcome.out_json.read_bytes()
        try:
            json.loads(raw)
            result = raw
        except ValueError as exc:
            problem = f"the program wrote an invalid result (not JSON: {exc})"
    if result is not None:
        _atomic_write_bytes(run_dir / "result.json", result)
    else:
        _atomic_write_json(run_dir / "result.json", _error_result(report, error, problem))
    _atomic_write_json(run_dir / "sandbox.json", report.to_json())


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


# ------------------------------------------------------------------ docker backend


def _import_docker() -> Any:
    try:
        import docker
    except ImportError:
        raise SandboxError(
            "the `docker` Python package is not installed: `pip install docker`, "
            "or use --sandbox local (which does not isolate)"
        ) from None
    return docker


def _docker_client(timeout: int = 120) -> Any:
    """A connected docker-py client, or SandboxError naming the fix."""
    docker = _import_docker()
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as exc:
        reason = _short_reason(exc)
        if "permission denied" in reason.lower():
            raise SandboxError(
                f"no permission to use the Docker daemon at {where} ({reason}): run as root "
                "or add your user to the `docker` group, or use --sandbox local "
                "(which does not isolate)"
            ) from None
        raise SandboxError(
            f"the Docker daemon is not reachable at {where} ({reason}): {_DAEMON_FIX}"
        ) from None
    return client


def _short_reason(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    text = (str(explanation) if explanation else str(exc)).strip() or type(exc).__name__
    m = re.search(r"\b(FileNotFoundError|ConnectionRefusedError|PermissionError)\b[^)]*\)", text)
    if m:
        text = m.group(0)
    return text if len(text) <= 200 else text[:197] + "..."


def _require_image(client: Any, image: str) -> Any:
    docker = _import_docker()
    try:
        return client.images.get(image)
    except docker.errors.ImageNotFound:
        raise SandboxError(f"the sandbox image {image} is missing: {_BUILD_FIX}") from None
    except docker.errors.DockerException as exc:
        raise SandboxError(f"cannot inspect the sandbox image {image}: {exc}") from None


def _tar_info(name: str, *, is_dir: bool, uid: int, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.uid = info.gid = uid
    info.mode = mode
    info.size = size
    info.mtime = int(time.time())
    return info


def _input_archive(job: _Job, uid: int) -> IO[bytes]:
    """The /work volume's initial content as a tar (spooled to disk when large).

    The package, the input and the runner are owned by root and read-only for the
    program; out/ (results), io/ (captured streams) and run/ (cwd) belong to it.
    """
    buf: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=8 * _MIB)  # noqa: SIM115
    ignore = shutil.ignore_patterns(*_COPY_IGNORE)

    def add_tree(tf: tarfile.TarFile, src: Path, arc: str) -> None:
        tf.addfile(_tar_info(arc, is_dir=True, uid=0, mode=0o755))
        names = sorted(os.listdir(src))
        skipped = ignore(str(src), names)
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
                    info = _tar_info(f"{arc}/{name}", is_dir=False, uid=0, mode=mode, size=size)
                    tf.addfile(info, f)

    with tarfile.open(fileobj=buf, mode="w") as tf:
        add_tree(tf, job.package_dir, "pkg")
        tf.addfile(_tar_info("in", is_dir=True, uid=0, mode=0o755))
        with open(job.input_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            tf.addfile(_tar_info("in/input.json", is_dir=False, uid=0, mode=0o644, size=size), f)
        runner = _RUNNER.encode()
        info = _tar_info("runner.py", is_dir=False, uid=0, mode=0o644, size=len(runner))
        tf.addfile(info, io.BytesIO(runner))
        for d in ("out", "out/_sandbox", "run"):
            tf.addfile(_tar_info(d, is_dir=True, uid=uid, mode=0o755))
    buf.seek(0)
    return buf


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (docker-py's get_archive stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _fetch(container: Any, path: str, dest_dir: Path, wanted: Mapping[str, str]) -> None:
    """Copy the regular files `wanted` (archive name -> local name) out of `path`."""
    docker = _import_docker()
    try:
        chunks, _stat = container.get_archive(path)
    except docker.errors.NotFound:
        return
    with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks)), mode="r|") as tf:
        for member in tf:
            local = wanted.get(member.name)
            if local is None or not member.isreg():
                continue
            src = tf.extractfile(member)
            if src is None:
                continue
            with open(dest_dir / local, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _collect_docker(container: Any, outcome: _Outcome) -> None:
    # One get_archive of out/ (each call costs a mount/unmount in the daemon).
    wanted = {"out/out.json": "out.json", "out/trace.jsonl": "trace.jsonl"}
    for n in ("stdout.txt", "stderr.txt", "stdout.truncated", "stderr.truncated"):
        wanted[f"out/_sandbox/{n}"] = n
    _fetch(container, _C_OUT, outcome.staging, wanted)
    # The runner itself prints only when it fails (e.g. a broken image): keep that.
    logs = container.logs(stdout=True, stderr=True, tail=50)
    if logs:
        with open(outcome.stderr, "ab") as f:
            f.write(b"\n[mas2c sandbox runner]\n" + bytes(logs)[-8192:])


def _is_timeout(exc: BaseException) -> bool:
    import requests.exceptions  # type: ignore[import-untyped,unused-ignore]

    if isinstance(exc, requests.exceptions.ReadTimeout):
        return True
    return isinstance(exc, requests.exceptions.ConnectionError) and "timed out" in str(exc)


def _run_docker(job: _Job, outcome: _Outcome) -> None:
    docker = _import_docker()
    from docker.types import LogConfig, Mount, Ulimit

    for name in job.loosen.used():
        msg = {
            "network": "sandbox network enabled (--loosen network): the program can reach "
            "the network directly",
            "writable_root": "sandbox root filesystem is writable (--loosen writable-root)",
            "root_user": "sandbox runs as root (--loosen root-user)",
        }[name]
        job.warn(msg)
        outcome.notes.append(f"loosened: {msg}")

    client = _docker_client()
    try:
        _require_image(client, job.image)
        uid = 0 if job.loosen.root_user else SANDBOX_UID
        limits = job.limits
        env = _scrubbed_env(path=_C_PATH, home="/tmp", pythonpath=_C_PKG, extra=job.env)
        # Files go in and out through an anonymous volume at /work, filled with
        # put_archive and read back with get_archive, rather than a bind mount of a
        # host dir: it needs no host path shared with the daemon (remote daemons,
        # Docker Desktop), no chown on the host (rootless Docker, non-root users,
        # SELinux relabelling), ownership comes from the tar headers, it stays
        # writable while the root is read-only, and `remove(v=True)` deletes it
        # with the container. Only the LLM socket is a bind mount (it must be).
        mounts = [Mount(target=_C_WORK, source=None, type="volume")]
        if job.llm_socket is not None:
            mounts.append(
                Mount(
                    target=CONTAINER_SOCKET,
                    source=str(job.llm_socket.resolve()),
                    type="bind",
                    read_only=True,
                )
            )
            env["MAS2C_LLM_SOCKET"] = CONTAINER_SOCKET
        fsize = limits.file_size_mb * _MIB
        command = [
            "python3",
            "-I",
            _C_RUNNER,
            str(limits.output_cap_bytes),
            _C_IO,
            "--",
            *_program_argv("python3", job.module, _C_INPUT, _C_OUT),
        ]
        name = f"mas2c-{job.run_id}"
        container: Any = None
        try:
            try:
                container = client.containers.create(
                    job.image,
                    command,
                    name=name,
                    user=f"{uid}:{uid}",
                    environment=env,
                    working_dir=_C_RUN,
                    network_mode="bridge" if job.loosen.network else "none",
                    read_only=not job.loosen.writable_root,
                    tmpfs={"/tmp": f"size={limits.tmpfs_mb}m,mode=1777"},
                    mounts=mounts,
                    cap_drop=["ALL"],
                    security_opt=["no-new-privileges"],
                    mem_limit=f"{limits.memory_mb}m",
                    memswap_limit=f"{limits.memory_mb}m",
                    nano_cpus=int(limits.cpus * 1e9),
                    pids_limit=limits.pids,
                    ulimits=[
                        Ulimit(name="fsize", soft=fsize, hard=fsize),
                        Ulimit(name="nofile", soft=_NOFILE, hard=_NOFILE),
                        Ulimit(name="core", soft=0, hard=0),
                    ],
                    init=True,
                    ipc_mode="private",
                    hostname="mas2c-sandbox",
                    labels={LABEL: "1", f"{LABEL}.run": job.run_id},
                    # The runner captures the program's output into files; the
                    # daemon's log only ever holds the runner's own errors.
                    log_config=LogConfig(
                        type=LogConfig.types.JSON, config={"max-size": "1m", "max-file": "1"}
                    ),
                )
                with _input_archive(job, uid) as archive:
                    container.put_archive(_C_WORK, archive)
                t0 = time.monotonic()
                container.start()
                try:
                    try:
                        result = container.wait(timeout=limits.timeout_s)
                    except Exception as exc:
                        if not _is_timeout(exc):
                            raise
                        outcome.timed_out = True
                        with contextlib.suppress(docker.errors.APIError):
                            container.kill()
                        result = container.wait(timeout=60)
                finally:
                    outcome.duration_s = time.monotonic() - t0
                outcome.exit_code = int(result.get("StatusCode", -1))
                container.reload()
                state = container.attrs.get("State", {})
                outcome.oom_killed = bool(state.get("OOMKilled")) and not outcome.timed_out
                _collect_docker(container, outcome)
            except KeyboardInterrupt:
                outcome.interrupted = True
                if container is not None:
                    _shielded(lambda: _stop_and_collect(container, outcome), outcome, "collect")
                raise
            except Exception as exc:  # docker-py and requests errors: daemon died, ...
                raise SandboxError(
                    f"the Docker run failed ({type(exc).__name__}): {_short_reason(exc)}"
                ) from None
        finally:
            _shielded(lambda: _remove_container(client, container, name), outcome, "remove")
    finally:
        client.close()


def _stop_and_collect(container: Any, outcome: _Outcome) -> None:
    docker = _import_docker()
    with contextlib.suppress(docker.errors.APIError):
        container.kill()
    with contextlib.suppress(Exception):
        result = container.wait(timeout=30)
        outcome.exit_code = int(result.get("StatusCode", -1))
    _collect_docker(container, outcome)


def _remove_container(client: Any, container: Any, name: str) -> None:
    """Force-remove the run's container and its anonymous volume (by name if create()
    itself was interrupted after the daemon made the container)."""
    docker = _import_docker()
    try:
        target = container if container is not None else client.containers.get(name)
        target.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass


# ------------------------------------------------------------------- local backend


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

    cpu = math.ceil(limits.timeout_s) + 2  # the host-side wall clock normally fires first
    lower(resource.RLIMIT_CPU, cpu, hard_extra=5)
    lower(resource.RLIMIT_AS, limits.memory_mb * _MIB)
    lower(resource.RLIMIT_FSIZE, limits.file_size_mb * _MIB)
    lower(resource.RLIMIT_NOFILE, _NOFILE)
    lower(resource.RLIMIT_CORE, 0)
    if nproc is not None:
        lower(resource.RLIMIT_NPROC, nproc)


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _run_local(job: _Job, outcome: _Outcome) -> None:
    job.warn(
        "--sandbox local does NOT isolate: the program runs as your user, with your "
        "files and your network; only rlimits, a scrubbed environment and a temp dir apply"
    )
    outcome.notes.append("local backend: no isolation (filesystem, network and user are shared)")
    if job.loosen.used():
        outcome.notes.append("loosen flags have no effect on the local backend")
    limits = job.limits
    nproc: int | None = None
    if os.geteuid() == 0:
        outcome.notes.append(
            "RLIMIT_NPROC not applied: running as root, which it does not restrict and "
            "where it would count every root process"
        )
    else:
        nproc = _count_user_processes(os.geteuid()) + limits.pids
        outcome.notes.append(f"RLIMIT_NPROC={nproc} (counts all of this user's processes)")
    outcome.notes.append(
        "memory is limited by RLIMIT_AS (virtual memory), CPU time by RLIMIT_CPU; "
        "cpus and tmpfs_mb are not enforced"
    )

    work = Path(tempfile.mkdtemp(prefix=f"mas2c-{job.run_id}-"))
    try:
        shutil.copytree(job.package_dir, work / "pkg", ignore=shutil.ignore_patterns(*_COPY_IGNORE))
        for d in ("in", "out", "io", "run", "home"):
            (work / d).mkdir(exist_ok=True)
        shutil.copyfile(job.input_path, work / "in" / "input.json")
        (work / "runner.py").write_text(_RUNNER)
        bindir = os.path.dirname(sys.executable)
        env = _scrubbed_env(
            path=f"{bindir}:/usr/local/bin:/usr/bin:/bin",
            home=str(work / "home"),
            pythonpath=str(work / "pkg"),
            extra={**job.env, "MALLOC_ARENA_MAX": "2"},
        )
        if job.llm_socket is not None:
            env["MAS2C_LLM_SOCKET"] = str(job.llm_socket.resolve())
        command = [
            sys.executable,
            "-I",
            str(work / "runner.py"),
            str(limits.output_cap_bytes),
            str(work / "io"),
            "--",
            *_program_argv(
                sys.executable, job.module, str(work / "in" / "input.json"), str(work / "out")
            ),
        ]
        with open(work / "runner.log", "wb") as runner_log:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                command,
                cwd=work / "run",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=runner_log,
                stderr=runner_log,
                start_new_session=True,
                preexec_fn=lambda: _set_rlimits(limits, nproc),
            )
            try:
                try:
                    rc = proc.wait(timeout=limits.timeout_s)
                except subprocess.TimeoutExpired:
                    outcome.timed_out = True
                    _killpg(proc.pid)
                    rc = proc.wait()
                outcome.duration_s = time.monotonic() - t0
            except KeyboardInterrupt:
                outcome.interrupted = True
                raise
            finally:
                # Also kills what the program left behind in its process group.
                _killpg(proc.pid)
                _shielded(lambda: _reap(proc), outcome, "reap")
                if not outcome.duration_s:
                    outcome.duration_s = time.monotonic() - t0
                if proc.returncode is not None:
                    rc = proc.returncode
                    outcome.exit_code = 128 - rc if rc < 0 else rc
                _shielded(lambda: _collect_local(work, outcome), outcome, "collect")
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
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.wait()


def _collect_local(work: Path, outcome: _Outcome) -> None:
    pairs = [
        (work / "out" / "out.json", "out.json"),
        (work / "out" / "trace.jsonl", "trace.jsonl"),
        (work / "io" / "stdout.txt", "stdout.txt"),
        (work / "io" / "stderr.txt", "stderr.txt"),
        (work / "io" / "stdout.truncated", "stdout.truncated"),
        (work / "io" / "stderr.truncated", "stderr.truncated"),
    ]
    for src, name in pairs:
        if os.path.lexists(src) and not src.is_symlink() and src.is_file():
            shutil.copyfile(src, outcome.staging / name)
    runner_log = _read_tail(work / "runner.log", 8192)
    if runner_log:
        with open(outcome.stderr, "ab") as f:
            f.write(b"\n[mas2c sandbox runner]\n" + runner_log)


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
    the host when there is one (so the local and docker backends run the same code)."""
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


def _download_wheels(dest: Path, info: Mapping[str, Any], say: Callable[[str], None]) -> None:
    """Fetch the runtime wheels for the image's Python ON THE HOST (the build itself
    has no network). Wheels are kept in a cache, which serves when PyPI is not
    reachable."""
    version = str(info["version"])
    reqs = _requirements()
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
        "backends": {"docker": False, "local": True},
        "leftover_containers": 0,
    }
    try:
        client = _docker_client(timeout=10)
    except SandboxError as exc:
        out["daemon"]["error"] = str(exc)
        return out
    try:
        version = client.version()
        out["daemon"].update(
            reachable=True, version=version.get("Version"), api_version=version.get("ApiVersion")
        )
        try:
            img = _require_image(client, image)
            out["image"].update(
                present=True,
                id=img.id,
                created=img.attrs.get("Created"),
                labels=img.labels or {},
                size_mb=round(img.attrs.get("Size", 0) / _MIB, 1),
            )
        except SandboxError as exc:
            out["image"]["error"] = str(exc)
        out["backends"]["docker"] = out["image"]["present"]
        # The low-level call: containers.list() inspects each one, racing removals.
        left = client.api.containers(all=True, filters={"label": LABEL})
        out["leftover_containers"] = len(left)
    except Exception as exc:
        out["daemon"]["error"] = _short_reason(exc)
    finally:
        client.close()
    return out


def prune(min_age_s: float = 60.0) -> int:
    """Remove leftover mas2c containers (left when the host process was SIGKILLed).

    Running containers, and ones younger than `min_age_s` (a run in progress is
    briefly `created` before its start and `exited` before its removal), are left alone.
    """
    docker = _import_docker()
    client = _docker_client()
    try:
        removed = 0
        now = time.time()
        for c in client.api.containers(all=True, filters={"label": LABEL}):
            if c.get("State") == "running" or now - float(c.get("Created", now)) < min_age_s:
                continue
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_container(c["Id"], force=True, v=True)
                removed += 1
        return removed
    finally:
        client.close()


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


if __name__ == "__main__":
    sys.exit(main())
