"""A warm, single-use container pool for the Docker sandbox (issue 14 item 1).

A warm container is a cold one started ahead of need: same image, runtime, limits and
isolation flags (:func:`mas2c.sandbox._container_config`), its init already up with
the runtime's imports done, waiting for exactly ONE job. A run that fits the pool
(same image, runtime and limits; a timeout within the pool's; no loosened flag) takes
one, hands it its job like a cold run, and removes it afterwards; the pool refills in
the background. A container never sees a second job or another run's files.

Two ways to hold warm containers:

* **in-process** (``with Pool(PoolSpec(...), size=K):``): for long-running commands
  (solve, rectify rounds, bench, batch). The pool holds each container's attach
  stream: when the process ends in any way (also SIGKILL) the streams close, every
  idle init sees EOF and exits, and the daemon removes the container.
* **the pool service** (``mas2c sandbox pool start|status|stop``): a background
  process that keeps K warm containers for separate ``mas2c run`` invocations of the
  same user. A run claims one atomically by renaming it (``mas2c-pool-*`` ->
  ``mas2c-<run id>``), then attaches to it. Idle service containers end by themselves
  at their idle deadline (the init's own timer) and carry the deadline label that
  :func:`mas2c.sandbox.reap` enforces on the next start.

The gateway socket: each warm container bind-mounts its own private folder at
``/run/mas2c``; the run puts a hard link to its gateway's socket there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mas2c import sandbox
from mas2c.sandbox import DEFAULT_IMAGE, LABEL, Limits, LockedDir, Loosen, SandboxError

#: Label of every pooled container: "inproc" or "service".
POOL_LABEL = f"{LABEL}.pool"
#: Label with the pool's fit key (image, runtime, limits), so a run only takes a fit.
KEY_LABEL = f"{LABEL}.pool.key"
#: Label with the host folder bind-mounted at /run/mas2c (the socket goes there).
SOCKDIR_LABEL = f"{LABEL}.pool.sockdir"
#: Label naming the process that made a pooled container (host:pid).
OWNER_LABEL = f"{LABEL}.pool.owner"
#: Label with the time (Unix) after which an idle pooled container is no longer taken.
IDLE_LABEL = f"{LABEL}.pool.idle_until"
SERVICE_PREFIX = "mas2c-pool-"
#: Margin before the idle deadline: a container this close to it is not handed out.
_MARGIN_S = 15.0
_SOCKET_PARENT = "/tmp"  # where run.py puts gateway sockets: hard links need one fs
#: Bounds of a pool's idle lifetime (seconds a warm container waits for its job).
MIN_IDLE_S = 2 * _MARGIN_S
MAX_IDLE_S = 86400.0

#: The pool of this process, if one is open (see :class:`Pool`).
ACTIVE: Pool | None = None


@dataclass(frozen=True)
class PoolSpec:
    """What a pool's containers are made for; a job fits if these match."""

    image: str = DEFAULT_IMAGE
    runtime: str | None = None
    #: Container limits; ``timeout_s`` is the longest job a warm container accepts.
    limits: Limits = field(default_factory=Limits)
    #: How long a warm container waits for its job before it ends itself.
    idle_s: float = 300.0

    def validate(self) -> None:
        """SandboxError unless the limits are valid and the idle lifetime is a number of
        seconds in [MIN_IDLE_S, MAX_IDLE_S] (a shorter one would never be handed out:
        a container that close to its end is replaced, over and over)."""
        self.limits.validate()
        if not (math.isfinite(self.idle_s) and MIN_IDLE_S <= self.idle_s <= MAX_IDLE_S):
            raise SandboxError(
                f"invalid pool idle lifetime {self.idle_s!r}: a number of seconds from "
                f"{MIN_IDLE_S:g} to {MAX_IDLE_S:g}"
            )

    def key(self) -> str:
        fixed = dataclasses.asdict(self.limits)
        for name in ("timeout_s", "output_cap_bytes", "result_cap_bytes", "trace_cap_bytes"):
            fixed.pop(name)  # per job (job.json), not per container
        doc = {"image": self.image, "runtime": self.runtime, "limits": fixed}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def fits(self, job: Any) -> bool:
        mine = PoolSpec(job.image, job.runtime, job.limits, self.idle_s)
        return (
            job.loosen == Loosen()
            and mine.key() == self.key()
            and job.limits.timeout_s <= self.limits.timeout_s
        )


@dataclass
class Warm:
    """A claimed warm container and its socket folder (released with the container)."""

    box: Any  # sandbox._Box
    sockdir: Path
    kind: str


@dataclass
class _Slot:
    box: Any
    folder: LockedDir
    idle_until: float


def _template_job(spec: PoolSpec) -> Any:
    """The container-level part of a job (what _start_box reads)."""
    return sandbox._Job(
        package_dir=Path("."),
        module="pool",
        input_path=Path("."),
        run_id="pool",
        limits=spec.limits,
        loosen=Loosen(),
        llm_socket=None,
        image=spec.image,
        env={},
        warn=lambda msg: None,
        runtime=spec.runtime,
    )


def _start_warm(client: Any, spec: PoolSpec, kind: str, *, attach: bool) -> _Slot:
    folder = LockedDir("pool", mode=0o711, parent=_SOCKET_PARENT)
    try:
        idle_until = time.time() + spec.idle_s
        env = sandbox._scrubbed_env(
            path=sandbox._C_PATH, home="/tmp", pythonpath=sandbox._C_PKG, extra={}
        )
        mounts = [
            sandbox.volume_mount(sandbox._C_WORK),
            sandbox.bind_mount(str(folder.path), sandbox.CONTAINER_SOCKET_DIR, read_only=True),
        ]
        labels = {
            POOL_LABEL: kind,
            OWNER_LABEL: f"{socket.gethostname()}:{os.getpid()}",
            KEY_LABEL: spec.key(),
            SOCKDIR_LABEL: str(folder.path),
            IDLE_LABEL: str(int(idle_until)),
        }
        name = f"{SERVICE_PREFIX}{uuid.uuid4().hex[:12]}"
        box = sandbox._start_box(
            client,
            _template_job(spec),
            name=name,
            mounts=mounts,
            env=env,
            labels=labels,
            idle_s=spec.idle_s,
            attach=attach,
        )
        slot = _Slot(box, folder, idle_until)
        if attach and not _await_ready(box, time.monotonic() + min(spec.idle_s / 2, 180.0)):
            _discard(client, slot)
            raise SandboxError("a warm container did not get ready (its init said nothing)")
        return slot
    except BaseException:
        folder.close()
        raise


def _await_ready(box: Any, deadline: float) -> bool:
    """Read the attach stream until the init's ready line (its imports are done)."""
    data = bytearray()
    while time.monotonic() < deadline:
        box.sock.settimeout(max(0.1, min(deadline - time.monotonic(), 5.0)))
        try:
            chunk = box.sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return False
        if not chunk:
            return False
        data += chunk
        while len(data) >= 8:  # multiplexed frames: [kind, 0, 0, 0, size (4)] payload
            size = int.from_bytes(data[4:8], "big")
            if len(data) < 8 + size:
                break
            kind, payload = data[0], bytes(data[8 : 8 + size])
            del data[: 8 + size]
            if kind == 1 and payload == sandbox.READY_LINE:
                return True
        if len(data) > 65536:
            return False
    return False


def _discard(client: Any, slot: _Slot) -> None:
    with contextlib.suppress(Exception):
        sandbox._remove_box(client, slot.box, slot.box.name)
    slot.folder.close()


class Pool:
    """K warm containers of one :class:`PoolSpec`, refilled in the background.

    ``with Pool(spec, size=2):`` makes it this process's pool (:data:`ACTIVE`), which
    :func:`mas2c.sandbox.run_package` takes from; on exit every idle container is
    removed (and if the process is killed, they end by themselves).

    Refilling runs on ``size`` threads, so up to K containers start at once (as K
    concurrent cold runs would). A run that finds none ready while some are starting
    waits for one (at most ``take_wait_s``) instead of starting a cold container
    beside them: on a busy machine that second start would only slow both down.
    """

    def __init__(self, spec: PoolSpec, size: int = 2, take_wait_s: float = 15.0) -> None:
        if size < 1:
            raise SandboxError(f"pool size must be at least 1, not {size}")
        spec.validate()
        self.spec = spec
        self.size = size
        self.take_wait_s = take_wait_s
        self._ready: list[_Slot] = []
        self._starting = 0
        self._lock = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.started = 0
        self.taken = 0
        self.errors: list[str] = []

    def __enter__(self) -> Pool:
        global ACTIVE
        self.start()
        ACTIVE = self
        return self

    def __exit__(self, *exc: object) -> None:
        global ACTIVE
        if ACTIVE is self:
            ACTIVE = None
        self.close()

    def start(self) -> None:
        for index in range(self.size):
            thread = threading.Thread(target=self._refill, name=f"mas2c-pool-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def ready(self) -> int:
        with self._lock:
            return len(self._ready)

    def wait_ready(self, n: int | None = None, timeout_s: float = 60.0) -> bool:
        """Block until `n` (default: all) containers are warm; for benchmarks and tests."""
        want = self.size if n is None else n
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self._ready) < want and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return len(self._ready) >= want

    def take(self, job: Any) -> Warm | None:
        if not self.spec.fits(job):
            return None
        deadline = time.monotonic() + self.take_wait_s
        with self._lock:
            while True:
                while self._ready:
                    slot = self._ready.pop(0)
                    self._lock.notify_all()  # a refill thread starts a replacement
                    if slot.idle_until - time.time() > _MARGIN_S:
                        self.taken += 1
                        slot.box.on_release = slot.folder.close
                        return Warm(slot.box, slot.folder.path, "warm")
                    threading.Thread(
                        target=self._discard_quietly, args=(slot,), daemon=True
                    ).start()
                left = deadline - time.monotonic()
                if self._closed or self._starting == 0 or left <= 0:
                    return None  # nothing on its way: the run starts a cold container
                self._lock.wait(left)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            slots, self._ready = self._ready, []
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)
        if slots:
            client = sandbox._engine()
            for slot in slots:
                _discard(client, slot)
        sandbox.wait_removals()

    def _discard_quietly(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            _discard(sandbox._engine(), slot)

    def _refill(self) -> None:
        from mas2c.sandbox.engine import Engine

        try:
            client = Engine()  # connects per call: a daemon down fails _start_warm below
        except OSError as exc:  # an unsupported DOCKER_HOST: cold runs report it
            self.errors.append(sandbox._short_reason(exc))
            return
        while True:
            with self._lock:
                while not self._closed and len(self._ready) + self._starting >= self.size:
                    self._lock.wait(timeout=5.0)
                    self._evict_expired_locked(client)
                if self._closed:
                    return
                self._starting += 1
            try:
                slot = _start_warm(client, self.spec, "inproc", attach=True)
            except Exception as exc:  # daemon down, image missing: cold runs report it
                self.errors.append(sandbox._short_reason(exc))
                with self._lock:
                    self._starting -= 1
                    self._lock.notify_all()  # a waiting run goes cold now
                    self._lock.wait(timeout=5.0)
                continue
            except BaseException:
                with self._lock:
                    self._starting -= 1
                    self._lock.notify_all()
                raise
            with self._lock:
                self._starting -= 1
                if self._closed:
                    self._lock.notify_all()
                    _discard(client, slot)
                    return
                self.started += 1
                self._ready.append(slot)
                self._lock.notify_all()

    def _evict_expired_locked(self, client: Any) -> None:
        now = time.time()
        fresh = [s for s in self._ready if s.idle_until - now > _MARGIN_S]
        for slot in self._ready:
            if slot not in fresh:
                _discard(client, slot)
        self._ready = fresh


# ------------------------------------------------------------------- claiming


def claim(client: Any, job: Any) -> Warm | None:
    """A warm container for `job`: from this process's pool, else from the service."""
    if ACTIVE is not None:
        warm = ACTIVE.take(job)
        if warm is not None:
            return warm
    return _claim_from_service(client, job)


def _claim_from_service(client: Any, job: Any) -> Warm | None:
    state = service_state()
    if state is None or not PoolSpec(**_spec_args(state["spec"])).fits(job):
        return None
    key = state["key"]
    from mas2c.sandbox.engine import EngineError

    now = time.time()
    found = client.containers(
        filters={"label": [f"{POOL_LABEL}=service", f"{KEY_LABEL}={key}"], "status": "running"}
    )
    for c in sorted(found, key=lambda c: c.get("Created", 0)):
        labels = c.get("Labels") or {}
        name = (c.get("Names") or ["/"])[0].lstrip("/")
        try:
            idle_until = float(labels.get(IDLE_LABEL, "0"))
        except ValueError:
            continue
        if not name.startswith(SERVICE_PREFIX) or idle_until - now <= _MARGIN_S:
            continue
        try:  # the atomic claim: only one renamer wins
            client.rename(c["Id"], f"mas2c-{job.run_id}")
        except EngineError:
            continue
        sockdir = Path(labels.get(SOCKDIR_LABEL, ""))
        if not sockdir.is_dir() or not str(sockdir).startswith(_SOCKET_PARENT + "/mas2c-pool-"):
            with contextlib.suppress(EngineError):
                client.remove(c["Id"], force=True, volumes=True)
            continue
        user_lock = _hold(sockdir / ".user")  # the service may die while we use it
        box = sandbox._Box(
            c["Id"],
            f"mas2c-{job.run_id}",
            job.runtime,
            sandbox.program_uid("docker"),
            float(labels.get(sandbox.DEADLINE_LABEL, "0") or 0),
        )
        box.on_release = functools.partial(os.close, user_lock)
        sandbox._attach(client, box)
        return Warm(box, sockdir, "service")
    return None


def _hold(path: Path) -> int:
    """An flock held on `path` (created) until the returned fd is closed."""
    import fcntl

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


# -------------------------------------------------------------------- the service


def _state_path() -> Path:
    return Path(_SOCKET_PARENT) / f"mas2c-pool-service-{os.geteuid()}.json"


def _spec_args(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "image": doc["image"],
        "runtime": doc["runtime"],
        "limits": Limits(**doc["limits"]),
        "idle_s": float(doc["idle_s"]),
    }


def service_state() -> dict[str, Any] | None:
    """The running service's state (pid, size, spec, key), or None if none runs."""
    try:
        state: dict[str, Any] = json.loads(_state_path().read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def serve(spec: PoolSpec, size: int) -> int:
    """The service's loop: keep `size` unclaimed warm containers; SIGTERM ends it and
    removes its unclaimed containers."""
    spec.validate()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client = sandbox._engine()
    folders: dict[str, LockedDir] = {}
    state = {
        "pid": os.getpid(),
        "size": size,
        "key": spec.key(),
        "spec": {
            "image": spec.image,
            "runtime": spec.runtime,
            "limits": dataclasses.asdict(spec.limits),
            "idle_s": spec.idle_s,
        },
        "started": time.time(),
    }
    path = _state_path()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)
    try:
        while not stop.is_set():
            existing, mine = _service_containers(client, spec.key())
            # A claimed container's folder stays until the container is gone.
            for name in [n for n in folders if n not in existing]:
                folders.pop(name).close()
            now = time.time()
            for name, idle_until in list(mine.items()):
                if idle_until - now <= _MARGIN_S:  # about to end itself: replace it
                    with contextlib.suppress(Exception):
                        client.remove(name, force=True, volumes=True)
                    mine.pop(name)
            if len(mine) < size:
                try:
                    slot = _start_warm(client, spec, "service", attach=False)
                    folders[slot.box.container] = slot.folder
                    continue
                except Exception as exc:
                    print(f"mas2c pool: {sandbox._short_reason(exc)}", file=sys.stderr, flush=True)
            stop.wait(1.0)
    finally:
        with contextlib.suppress(OSError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        for name in _service_containers(client, spec.key())[1]:
            with contextlib.suppress(Exception):
                client.remove(name, force=True, volumes=True)
        for folder in folders.values():
            folder.close()
    return 0


def _service_containers(client: Any, key: str) -> tuple[set[str], dict[str, float]]:
    """(ids of all service containers of this key, the unclaimed ones: name -> idle
    deadline)."""
    existing: set[str] = set()
    unclaimed: dict[str, float] = {}
    found = client.containers(
        all=True, filters={"label": [f"{POOL_LABEL}=service", f"{KEY_LABEL}={key}"]}
    )
    for c in found:
        existing.add(c["Id"])
        name = (c.get("Names") or ["/"])[0].lstrip("/")
        if name.startswith(SERVICE_PREFIX):
            try:
                unclaimed[name] = float((c.get("Labels") or {}).get(IDLE_LABEL, "0"))
            except ValueError:
                unclaimed[name] = 0.0
    return existing, unclaimed


def start_service(spec: PoolSpec, size: int, wait_s: float = 120.0) -> dict[str, Any]:
    """Start the service in the background (detached) unless one runs; wait until its
    containers are up. Returns :func:`service_status`."""
    if service_state() is not None:
        return service_status()
    sandbox._engine(timeout=10)  # a daemon that is down: one clear error now, no service
    log = Path(_SOCKET_PARENT) / f"mas2c-pool-service-{os.geteuid()}.log"
    argv = [sys.executable, "-m", "mas2c.sandbox.pool", "serve", "--size", str(size)]
    argv += ["--image", spec.image, "--idle", f"{spec.idle_s:g}"]
    argv += ["--limits", json.dumps(dataclasses.asdict(spec.limits))]
    if spec.runtime:
        argv += ["--runtime", spec.runtime]
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            cwd="/",
        )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc.poll() is None:
        st = service_status()
        if st["running"] and st["idle"] >= size:
            return st
        time.sleep(0.2)
    st = service_status()
    if not st["running"]:
        raise SandboxError(f"the pool service did not start: {_last_error(log, start)} (log {log})")
    return st


def _last_error(log: Path, start: int) -> str:
    """The service's own error line from what it wrote to its log (never its traceback)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(start)
            text = handle.read(64 * 1024).decode("utf-8", "replace")
    except OSError:
        return "it wrote nothing"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "it wrote nothing"
    last = lines[-1]
    head, sep, message = last.partition(": ")
    return message if sep and head.replace(".", "").replace("_", "").isalnum() else last


def service_status() -> dict[str, Any]:
    state = service_state()
    out: dict[str, Any] = {"running": state is not None, "idle": 0}
    if state is None:
        return out
    out.update(pid=state["pid"], size=state["size"], spec=state["spec"], key=state["key"])
    out["idle"] = len(_service_containers(sandbox._engine(timeout=10), state["key"])[1])
    return out


def stop_service(wait_s: float = 60.0) -> bool:
    """Stop the service (SIGTERM; it removes its idle containers). False if none ran."""
    state = service_state()
    if state is None:
        return False
    pid = int(state["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mas2c.sandbox.pool")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the pool service in the foreground")
    s.add_argument("--size", type=int, default=2)
    s.add_argument("--image", default=DEFAULT_IMAGE)
    s.add_argument("--runtime")
    s.add_argument("--idle", type=float, default=300.0)
    s.add_argument("--limits", default="{}")
    args = parser.parse_args(argv)
    limits = Limits(**json.loads(args.limits))
    spec = PoolSpec(args.image, args.runtime, limits, args.idle)
    try:
        return serve(spec, args.size)
    except SandboxError as exc:  # one line in the log, which `start_service` reports
        sys.stderr.write(f"mas2c pool service: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
