"""Tests of mas2c.sandbox: real Docker runs (marked `docker`) and the unisolated backend.

The program under test is a tiny hand-written package whose behaviour is chosen by
its input JSON (echo, flood stdout, sleep, allocate, fork, touch the network, ...).
Docker tests fail instead of skipping when CI=true and the daemon or the image is
missing (scripts/ensure-docker.sh sets both up).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from mas2c import sandbox
from mas2c.sandbox import Limits, Loosen, SandboxError, SandboxReport, run_package

DEMO_MAIN = r"""
import argparse, json, os, socket, subprocess, sys, time


def main():
    p = argparse.ArgumentParser()
    for flag in ("--input", "--output", "--trace"):
        p.add_argument(flag, required=True)
    a = p.parse_args()
    with open(a.input) as f:
        req = json.load(f)
    action = req.get("action", "echo")
    with open(a.trace, "a") as t:
        t.write(json.dumps({"event": "start", "action": action}) + "\n")
    out = {"status": "ok", "action": action}
    if action == "echo":
        print("hello from the sandbox")
        out["echo"] = req
    elif action == "flood":
        line = "x" * 65535 + "\n"
        for _ in range(req["mb"] * 16):
            sys.stdout.write(line)
        sys.stdout.flush()
        sys.stderr.write("a little stderr\n")
    elif action == "sleep":
        if req.get("child"):
            child = subprocess.Popen(["sleep", "1000"])
            print("child", child.pid, flush=True)
        print("sleeping", flush=True)
        if req.get("marker"):  # unisolated backend: tells the test the program is running
            with open(req["marker"], "w") as f:
                f.write(str(os.getpid()))
        while True:
            time.sleep(0.2)
    elif action == "memory":
        # Bounded (max_mb), so that a sandbox that lost its memory limit fails the test by
        # finishing, rather than by taking the host's memory.
        blocks = []
        while len(blocks) * 16 < req.get("max_mb", 1 << 30):
            blocks.append(b"x" * (16 * 1024 * 1024))
        out["allocated_mb"] = len(blocks) * 16
    elif action == "cpu":
        # busy processes for `seconds` of wall time; the CPU time they got (children's)
        pids, t0 = [], time.monotonic()
        for _ in range(req["procs"]):
            pid = os.fork()
            if pid == 0:
                while time.monotonic() - t0 < req["seconds"]:
                    pass
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        times = os.times()
        out["cpu_s"] = times.children_user + times.children_system
        out["wall_s"] = time.monotonic() - t0
    elif action == "forkbomb":
        pids, error = [], None
        try:
            for _ in range(req["n"]):
                pid = os.fork()
                if pid == 0:
                    time.sleep(60)
                    os._exit(0)
                pids.append(pid)
        except OSError as exc:
            error = repr(exc)
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        out.update(forked=len(pids), error=error)
    elif action == "network":
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=3).close()
            out["connect"] = "ok"
        except OSError as exc:
            out["connect"] = repr(exc)
        out["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    elif action == "filesystem":
        targets = {
            "etc": "/etc/mas2c-probe",
            "vartmp": "/var/tmp/mas2c-probe",  # world-writable in the image
            "root": "/mas2c-probe",
            "tmp": "/tmp/mas2c-probe",
            "outdir": os.path.join(os.path.dirname(a.output), "probe"),
            "package": os.path.join(os.environ["PYTHONPATH"], "probe"),
            "cwd": "probe",
        }
        written = {}
        for key, path in targets.items():
            try:
                with open(path, "w") as f:
                    f.write("x")
                written[key] = "ok"
            except OSError as exc:
                written[key] = exc.strerror
        out.update(write=written, uid=os.getuid(), gid=os.getgid())
    elif action == "env":
        hits = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                for part in ("environ", "cmdline"):
                    try:
                        with open(f"/proc/{pid}/{part}", "rb") as f:
                            if b"sk-secret" in f.read():
                                hits.append(f"{pid}/{part}")
                    except OSError:
                        pass
        out.update(env=dict(os.environ), proc_hits=hits)
    elif action == "exit":
        sys.stderr.write("failing on purpose\n")
        sys.exit(req["code"])
    elif action == "bad_output":
        with open(a.output, "w") as f:
            f.write("{not json")
        return
    elif action == "probe":
        out["probe"] = probe()
    elif action == "fill":
        out["fill"] = fill(req["targets"], req["mb"])
    elif action == "manyfiles":
        made = {}
        for key, folder in (("out", os.path.dirname(a.output)), ("tmp", "/tmp")):
            os.makedirs(os.path.join(folder, "many"), exist_ok=True)
            n = 0
            try:
                for n in range(req["n"]):
                    open(os.path.join(folder, "many", str(n)), "w").close()
                n = req["n"]
            except OSError as exc:
                made[key + "_error"] = exc.strerror
            made[key] = n
            subprocess.run(["rm", "-rf", os.path.join(folder, "many")], check=True)
        out["made"] = made
    elif action == "bigresult":
        with open(a.output, "w") as f:
            f.write('{"status": "ok", "x": "')
            f.write("a" * (req["mb"] << 20))
            f.write('"}')
        return
    elif action == "deep":
        with open(a.output, "w") as f:
            f.write('{"status": "ok", "x": ' + "[" * req["n"] + "]" * req["n"] + "}")
        return
    elif action == "bigtrace":
        with open(a.trace, "a") as t:
            for i in range(req["lines"]):
                t.write(json.dumps({"event": "x", "i": i, "pad": "p" * 1000}) + "\n")
    elif action == "setsid_child":
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                os.close(w)
                os.execvpe("sleep", ["sleep", "1000"], {"PATH": "/usr/bin:/bin"})
            os._exit(0)
        os.close(w)
        out["grandchild"] = int(os.read(r, 100))
    elif action == "litter":  # leave files and a process behind
        for folder in ("/tmp", os.path.dirname(a.output), "."):
            with open(os.path.join(folder, "litter-" + req["tag"]), "w") as f:
                f.write(req["tag"])
        subprocess.Popen(["sleep", "1000"], start_new_session=True)
    elif action == "bytecode":  # the .pyc files the host shipped with the package
        import importlib.util
        import demo_mod

        src = demo_mod.__file__
        pyc = importlib.util.cache_from_source(src)
        out["tag"] = sys.implementation.cache_tag
        out["pycache"] = sorted(os.listdir(os.path.dirname(pyc)))
        with open(src, "rb") as f:
            checked = importlib.util.source_hash(f.read())
        with open(pyc, "rb") as f:
            header = f.read(16)
        out["valid"] = header[:4] == importlib.util.MAGIC_NUMBER and header[8:] == checked
        out["writable"] = os.access(pyc, os.W_OK)
    elif action == "look":  # what a run finds when it starts
        out["files"] = sorted(
            os.path.join(folder, name)
            for folder in ("/tmp", os.path.dirname(a.output), ".")
            for name in os.listdir(folder)
            if name.startswith("litter")
        )
        out["processes"] = sorted(
            read("/proc/%s/cmdline" % pid).replace("\0", " ")
            for pid in os.listdir("/proc")
            if pid.isdigit() and int(pid) not in (1, os.getpid())
        )
    elif action == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.connect(os.environ["MAS2C_LLM_SOCKET"])
        s.sendall(b"ping")
        out["reply"] = s.recv(100).decode()
        s.close()
    with open(a.output, "w") as f:
        json.dump(out, f)
    if req.get("private"):  # as an atomic writer leaves it (mkstemp: 0600)
        os.chmod(a.output, 0o600)
        os.chmod(a.trace, 0o600)


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        return "error: " + (exc.strerror or type(exc).__name__)


def link(path):
    try:
        return os.readlink(path)
    except OSError as exc:
        return "error: " + exc.strerror


def probe():
    import ctypes, resource, signal
    status = {}
    for line in read("/proc/self/status").splitlines():
        key, _, value = line.partition(":")
        if key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
            status[key] = value.strip()
    limits = {
        name: list(resource.getrlimit(getattr(resource, "RLIMIT_" + name.upper())))
        for name in ("nofile", "core", "fsize")
    }
    cgroup = {
        "memory": read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        "memsw": read("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"),
        "cpu_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
        "cpu_period": read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
        "pids": read("/sys/fs/cgroup/pids/pids.max"),
        "memory_v2": read("/sys/fs/cgroup/memory.max"),
        "cpu_v2": read("/sys/fs/cgroup/cpu.max"),
        "pids_v2": read("/sys/fs/cgroup/pids.max"),
    }
    mounts = {}
    for line in read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, _source, options = (right.split() + ["", "", ""])[:3]
        mounts[fields[4]] = [fstype, fields[5] + "," + options]
    pid1 = {}
    for key, path in (("environ", "/proc/1/environ"), ("mem", "/proc/1/mem")):
        try:
            open(path, "rb").read(1)
            pid1[key] = "read"
        except OSError as exc:
            pid1[key] = exc.strerror
    try:
        os.listdir("/proc/1/fd")
        pid1["fd"] = "listed"
    except OSError as exc:
        pid1["fd"] = exc.strerror
    for line in read("/proc/1/status").splitlines():
        key, _, value = line.partition(":")
        if key in ("CapEff", "CapBnd", "Uid"):
            pid1[key] = value.split()[0]
    try:  # the runner's stdout is the bundle's channel to the host
        with open("/proc/1/fd/1", "wb") as f:
            f.write(b"MAS2C-BUNDLE {}\n")
        pid1["write_fd1"] = "written"
    except OSError as exc:
        pid1["write_fd1"] = exc.strerror
    libc = ctypes.CDLL(None, use_errno=True)
    status["nnp"] = libc.prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
    pid1["ptrace"] = libc.ptrace(16, 1, 0, 0)  # PTRACE_ATTACH: -1 expected
    for name in ("SIGSTOP", "SIGKILL", "SIGTERM"):
        try:
            os.kill(1, getattr(signal, name))
            pid1[name] = "sent"
        except OSError as exc:
            pid1[name] = exc.strerror
    try:
        os.setuid(0)
        setuid = "ok"
    except OSError as exc:
        setuid = exc.strerror
    return {
        "status": status,
        "rlimits": limits,
        "cgroup": cgroup,
        "mounts": mounts,
        "pid1": pid1,
        "setuid0": setuid,
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "groups": os.getgroups(),
        "ipc_ns": link("/proc/self/ns/ipc"),
        "net_ns": link("/proc/self/ns/net"),
    }


def fill(targets, mb):
    # Write up to `mb` MiB into each folder (in 8 MiB files), then free it.
    chunk = b"x" * (1 << 20)
    report = {}
    for key, folder in targets.items():
        written, error, names = 0, None, []
        try:
            while written < (mb << 20):
                name = os.path.join(folder, "fill-%d" % len(names))
                names.append(name)
                with open(name, "wb") as f:
                    for _ in range(8):
                        f.write(chunk)
                        f.flush()
                        written += len(chunk)
        except OSError as exc:
            error = exc.strerror
        for name in names:
            try:
                os.remove(name)
            except OSError:
                pass
        report[key] = {"mb": written >> 20, "error": error}
    return report


main()
"""

ALLOWED_ENV = {
    "PATH",
    "HOME",
    "LANG",
    "PYTHONPATH",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "HOSTNAME",  # set by Docker itself (the container's hostname)
    "MALLOC_ARENA_MAX",  # unisolated backend: keeps RLIMIT_AS usable with threads
    "MAS2C_SANDBOX_RUN",  # unisolated backend: marks the run's processes for the final sweep
    "MAS2C_CHECKPOINT_LOG",  # where the package writes its checkpoints (checkpoints.jsonl)
}


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    (root / "demo_mod").mkdir()
    (root / "demo_mod" / "__init__.py").write_text("")
    (root / "demo_mod" / "__main__.py").write_text(DEMO_MAIN)
    return root


class Run:
    def __init__(self, report: SandboxReport, run_dir: Path) -> None:
        self.report = report
        self.dir = run_dir
        self.result: dict[str, Any] = json.loads((run_dir / "result.json").read_text())
        self.sandbox_json: dict[str, Any] = json.loads((run_dir / "sandbox.json").read_text())

    def text(self, name: str) -> str:
        return (self.dir / name).read_text(errors="replace")


def _run(
    package: Path,
    tmp_path: Path,
    request: dict[str, Any],
    backend: Literal["docker", "unisolated"],
    **kwargs: Any,
) -> Run:
    input_path = tmp_path / "input.json"
    input_path.write_text(json.dumps(request))
    run_dir = tmp_path / f"run-{backend}"
    n = 1
    while run_dir.exists():  # one folder per run: the leak check reads their run ids
        n += 1
        run_dir = tmp_path / f"run-{backend}-{n}"
    kwargs.setdefault("on_warning", lambda msg: None)
    report = run_package(package, "demo_mod", input_path, run_dir, backend=backend, **kwargs)
    return Run(report, run_dir)


def _assert_run_folder_complete(run_dir: Path) -> None:
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["result.json", "sandbox.json", "stderr.txt", "stdout.txt", "trace.jsonl"]


def _leftovers(run_ids: set[str] | None = None, older_than_s: float = 0.0) -> list[str]:
    """Names of mas2c containers, of the given runs (None: of any run) and at least
    `older_than_s` old. Race-free against concurrent removals (docker-py's
    containers.list() inspects each container, which can 404)."""
    import docker

    client = docker.from_env()
    try:
        found = client.api.containers(all=True, filters={"label": "mas2c"})
    finally:
        client.close()
    now = time.time()
    return [
        c["Names"][0].lstrip("/")
        for c in found
        if (run_ids is None or c["Labels"].get("mas2c.run") in run_ids)
        and now - c["Created"] >= older_than_s
    ]


def _remove(names: list[str]) -> None:
    import docker

    client = docker.from_env()
    try:
        for name in names:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                client.api.remove_container(name, force=True, v=True)
    finally:
        client.close()


def _wait_for_running(token: str, timeout_s: float = 30) -> bool:
    """Wait until the PROGRAM of the run given env MAS2C_TEST_TOKEN=token runs: its
    container is running and holds a second process (the runner forks the program
    once it has its job). Other tests may have containers on the same daemon."""
    import docker

    client = docker.from_env()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = client.api.containers(filters={"label": "mas2c", "status": "running"})
            for c in running:
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    env = client.api.inspect_container(c["Id"])["Config"]["Env"] or []
                    mine = f"MAS2C_TEST_TOKEN={token}" in env
                    if mine and len(client.api.top(c["Id"]).get("Processes") or []) >= 2:
                        return True
            time.sleep(0.05)
        return False
    finally:
        client.close()


@pytest.fixture
def dock(docker_ready: None, tmp_path: Path) -> Iterator[None]:
    """A Docker test: the daemon and image are there, and no container is left after.

    Checked for the runs of the test (their run ids, from sandbox.json), and under CI
    for any stale container labelled mas2c.
    """
    yield
    run_ids = {json.loads(p.read_text())["run_id"] for p in tmp_path.glob("run-*/sandbox.json")}
    left = _leftovers(run_ids)
    _remove(left)
    assert left == [], f"containers left behind: {left}"
    if os.environ.get("CI") == "true":
        # Nothing else uses CI's daemon, but other xdist workers run at the same time:
        # any mas2c container older than any test run is a leak (e.g. of a SIGKILL).
        stale = _leftovers(None, older_than_s=120)
        assert stale == [], f"stale mas2c containers: {stale}"


RUNTIMES = ["runc", "runsc"]


@pytest.fixture(params=RUNTIMES)
def rt(request: pytest.FixtureRequest, docker_ready: None) -> str:
    """Each hostile test runs under runc and under gVisor (runsc); runsc missing from
    the daemon skips, but FAILS under CI=true (scripts/ensure-docker.sh registers it)."""
    runtime = str(request.param)
    if runtime != "runc" and runtime not in sandbox.status()["runtimes"]:
        problem = f"the {runtime} runtime is not registered with dockerd"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem} (scripts/ensure-docker.sh registers it)")
        pytest.skip(problem)
    return runtime


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("MAS2C_TEST_HOST_ONLY", "sk-secret")


def _process_gone(pid: int, wait_s: float = 3.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------- docker


@pytest.mark.docker
def test_docker_echo_writes_complete_run_folder(dock: None, package: Path, tmp_path: Path) -> None:
    run = _run(package, tmp_path, {"action": "echo", "x": [1, 2]}, "docker")
    assert run.result == {"status": "ok", "action": "echo", "echo": {"action": "echo", "x": [1, 2]}}
    assert json.loads(run.text("trace.jsonl")) == {"event": "start", "action": "echo"}
    assert run.text("stdout.txt") == "hello from the sandbox\n"
    assert run.text("stderr.txt") == ""
    _assert_run_folder_complete(run.dir)
    rep = run.sandbox_json
    assert rep["backend"] == "docker" and rep["image"] == sandbox.DEFAULT_IMAGE
    assert rep["isolation"] == "container" and rep["loosened"] == []
    assert rep["exit_code"] == 0 and not rep["timed_out"] and not rep["oom_killed"]
    assert rep["limits"]["memory_mb"] == 1024
    assert not rep["stdout_truncated"] and not rep["stderr_truncated"]
    assert rep == run.report.to_json()


@pytest.mark.docker
def test_docker_private_result_files_are_read(dock: None, package: Path, tmp_path: Path) -> None:
    """out.json and trace.jsonl of mode 0600 (the init reads them as the program's user)."""
    run = _run(package, tmp_path, {"action": "echo", "private": True}, "docker")
    assert run.result["status"] == "ok" and run.result["echo"]["private"] is True
    assert "start" in run.text("trace.jsonl")


@pytest.mark.docker
def test_docker_timeout_kills_container(dock: None, rt: str, package: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    run = _run(
        package, tmp_path, {"action": "sleep"}, "docker", runtime=rt, limits=Limits(timeout_s=2)
    )
    assert time.monotonic() - t0 < 60  # not the program's endless sleep (slack: a busy CI)
    assert run.report.timed_out and run.report.exit_code == 137
    assert not run.report.oom_killed
    assert 2 <= run.report.duration_s < 60
    assert run.result["status"] == "error" and run.result["error"]["type"] == "Timeout"
    assert "sleeping" in run.text("stdout.txt")  # output up to the kill is kept
    assert "start" in run.text("trace.jsonl")


@pytest.mark.docker
def test_docker_memory_bomb_is_oom_killed(
    dock: None, rt: str, package: Path, tmp_path: Path
) -> None:
    run = _run(
        package,
        tmp_path,
        {"action": "memory", "max_mb": 768},
        "docker",
        runtime=rt,
        limits=Limits(memory_mb=128),
    )
    assert run.report.oom_killed and run.report.exit_code == 137
    assert not run.report.timed_out
    assert run.result["error"]["type"] == "OOMKilled"


@pytest.mark.docker
def test_docker_fork_bomb_is_contained(dock: None, rt: str, package: Path, tmp_path: Path) -> None:
    run = _run(
        package,
        tmp_path,
        {"action": "forkbomb", "n": 500},
        "docker",
        runtime=rt,
        limits=Limits(pids=64),
    )
    if rt == "runsc" and run.result["status"] == "error":
        # gVisor (ptrace platform) spends host pids on its own threads: at the limit the
        # whole sandbox ends. Contained all the same: nothing ran past the limit.
        assert run.report.exit_code not in (0, None)
        assert not run.report.timed_out
        # ... at the pids limit, long before memory: without the limit the 500 forks
        # run the sandbox out of memory instead (mutation-checked)
        assert not run.report.oom_killed
        return
    assert run.report.exit_code == 0, run.text("stderr.txt")
    assert run.result["forked"] < 64
    assert "Resource temporarily unavailable" in run.result["error"]


@pytest.mark.docker
def test_docker_cpu_limit_holds(dock: None, rt: str, package: Path, tmp_path: Path) -> None:
    """Two busy processes for 3 s under `cpus=0.25` get at most about a quarter of a CPU
    (under gVisor too: the host's cgroup throttles the sandbox's threads)."""
    run = _run(
        package,
        tmp_path,
        {"action": "cpu", "procs": 2, "seconds": 3},
        "docker",
        runtime=rt,
        limits=Limits(cpus=0.25),
    )
    assert run.result["status"] == "ok", run.result
    ratio = run.result["cpu_s"] / run.result["wall_s"]
    # Unthrottled, the two processes would get up to 2.0. Under runc: at most twice the quota
    # (CFS periods). Under gVisor the CPU time is the sentry's own count, which also counts
    # time its threads wait for a busy host's CPU (0.84 seen at load 7): at most half of 2.0.
    assert ratio <= (0.5 if rt == "runc" else 1.0), ratio


@pytest.mark.docker
def test_docker_has_no_network(dock: None, rt: str, package: Path, tmp_path: Path) -> None:
    run = _run(package, tmp_path, {"action": "network"}, "docker", runtime=rt)
    assert run.result["connect"] != "ok"
    assert run.result["interfaces"] == ["lo"]


@pytest.mark.docker
def test_docker_loosen_network_warns_and_is_reported(
    dock: None, package: Path, tmp_path: Path
) -> None:
    warnings: list[str] = []
    run = _run(
        package,
        tmp_path,
        {"action": "network"},
        "docker",
        loosen=Loosen(network=True),
        on_warning=warnings.append,
        runtime=None,
    )
    assert run.report.runtime == "default"
    assert run.report.loosened == ["network"]
    assert any("network" in w for w in warnings)
    assert "eth0" in run.result["interfaces"]


@pytest.mark.docker
def test_docker_root_read_only_and_user_not_root(
    dock: None, rt: str, package: Path, tmp_path: Path
) -> None:
    run = _run(package, tmp_path, {"action": "filesystem"}, "docker", runtime=rt)
    write = run.result["write"]
    assert write["vartmp"] == "Read-only file system"  # writable if the root were
    assert write["etc"] in ("Read-only file system", "Permission denied")
    assert write["root"] in ("Read-only file system", "Permission denied")
    assert write["package"] == "Permission denied"  # the package is root-owned
    assert write["tmp"] == "ok" and write["outdir"] == "ok" and write["cwd"] == "ok"
    assert run.result["uid"] == 1000 and run.result["gid"] == 1000


@pytest.mark.docker
def test_docker_no_host_environment_or_key_inside(
    dock: None, rt: str, secret_env: None, package: Path, tmp_path: Path
) -> None:
    run = _run(
        package, tmp_path, {"action": "env"}, "docker", runtime=rt, env={"MAS2C_EXTRA": "yes"}
    )
    env = run.result["env"]
    assert "OPENAI_API_KEY" not in env and "MAS2C_TEST_HOST_ONLY" not in env
    assert "sk-secret" not in json.dumps(env)
    assert run.result["proc_hits"] == []
    assert set(env) <= ALLOWED_ENV | {"MAS2C_EXTRA"}
    assert env["MAS2C_EXTRA"] == "yes" and env["PYTHONPATH"] == "/work/pkg"


@pytest.mark.docker
def test_docker_output_flood_is_truncated(
    dock: None, rt: str, package: Path, tmp_path: Path
) -> None:
    cap = 100_000
    run = _run(
        package,
        tmp_path,
        {"action": "flood", "mb": 20},
        "docker",
        runtime=rt,
        limits=Limits(output_cap_bytes=cap),
    )
    assert run.report.exit_code == 0
    assert (run.dir / "stdout.txt").stat().st_size == cap
    assert run.report.stdout_truncated and not run.report.stderr_truncated
    assert run.text("stderr.txt") == "a little stderr\n"
    assert run.result["status"] == "ok"


@pytest.mark.docker
def test_docker_failed_program_still_leaves_a_result(
    dock: None, package: Path, tmp_path: Path
) -> None:
    run = _run(package, tmp_path, {"action": "exit", "code": 3}, "docker")
    _assert_run_folder_complete(run.dir)
    assert run.report.exit_code == 3
    assert run.result["status"] == "error"
    assert run.result["error"]["type"] == "SandboxError"
    assert "exited with code 3" in run.result["error"]["message"]
    assert "failing on purpose" in run.text("stderr.txt")
    run = _run(package, tmp_path, {"action": "bad_output"}, "docker")
    assert run.result["status"] == "error" and "not JSON" in run.result["error"]["message"]


@pytest.mark.docker
def test_docker_llm_socket_is_reachable(dock: None, rt: str, package: Path, tmp_path: Path) -> None:
    with _echo_socket() as path:
        run = _run(package, tmp_path, {"action": "socket"}, "docker", runtime=rt, llm_socket=path)
    assert run.result.get("reply") == "pong:ping", run.text("stderr.txt")


@pytest.mark.docker
def test_docker_interrupt_removes_container(dock: None, package: Path, tmp_path: Path) -> None:
    main_thread = threading.main_thread().ident
    assert main_thread is not None
    fired = threading.Event()

    token = uuid.uuid4().hex

    def interrupt_when_running() -> None:
        if _wait_for_running(token):
            time.sleep(2.0)  # the program prints right away; slack for a busy machine
            fired.set()
            signal.pthread_kill(main_thread, signal.SIGINT)

    helper = threading.Thread(target=interrupt_when_running, daemon=True)
    helper.start()
    with pytest.raises(KeyboardInterrupt):
        _run(
            package,
            tmp_path,
            {"action": "sleep"},
            "docker",
            limits=Limits(timeout_s=60),
            env={"MAS2C_TEST_TOKEN": token},
        )
    helper.join()
    assert fired.is_set()
    run_dir = tmp_path / "run-docker"
    _assert_run_folder_complete(run_dir)
    report = json.loads((run_dir / "sandbox.json").read_text())
    assert report["interrupted"] is True
    result = json.loads((run_dir / "result.json").read_text())
    assert result["error"]["type"] == "Interrupted"
    assert "sleeping" in (run_dir / "stdout.txt").read_text()
    assert _leftovers({report["run_id"]}) == []


@pytest.mark.docker
def test_docker_sigterm_of_host_process_removes_container(
    dock: None, package: Path, tmp_path: Path
) -> None:
    input_path = tmp_path / "input.json"
    input_path.write_text(json.dumps({"action": "sleep"}))
    run_dir = tmp_path / "run-docker"
    token = uuid.uuid4().hex
    script = (
        "from pathlib import Path\n"
        "from mas2c.sandbox import Limits, run_package\n"
        f"run_package(Path({str(package)!r}), 'demo_mod', Path({str(input_path)!r}), "
        f"Path({str(run_dir)!r}), limits=Limits(timeout_s=60), on_warning=print, "
        f"env={{'MAS2C_TEST_TOKEN': {token!r}}})\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert _wait_for_running(token), "the run did not start"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # test failed: stop the run gracefully, not with SIGKILL
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert b"KeyboardInterrupt" in stderr  # SIGTERM became an interrupt, then cleanup ran
    report = json.loads((run_dir / "sandbox.json").read_text())
    assert report["interrupted"] is True
    assert _leftovers({report["run_id"]}) == []


@pytest.mark.docker
def test_docker_missing_image_names_the_fix(dock: None, package: Path, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="mas2c sandbox build"):
        _run(package, tmp_path, {"action": "echo"}, "docker", image="mas2c-no-such-image:0")
    result = json.loads((tmp_path / "run-docker" / "result.json").read_text())
    assert result["error"]["type"] == "SandboxError"


def test_docker_unreachable_daemon_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, package: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(SandboxError) as info:
        _run(package, tmp_path, {"action": "echo"}, "docker")
    message = str(info.value)
    assert "not reachable" in message and "unix:///nonexistent/docker.sock" in message
    assert "dockerd" in message and "--sandbox unisolated" in message
    assert "Traceback" not in message
    run_dir = tmp_path / "run-docker"
    _assert_run_folder_complete(run_dir)
    assert json.loads((run_dir / "sandbox.json").read_text())["error"] == message
    st = sandbox.status()
    assert st["daemon"]["reachable"] is False and st["backends"]["docker"] is False


# ------------------------------------------------- isolation flags, from inside


def _mib(text: str) -> int:
    return int(text) >> 20


@pytest.mark.docker
def test_docker_isolation_flags_seen_from_inside(
    dock: None, rt: str, package: Path, tmp_path: Path
) -> None:
    """Each flag of the container, checked by the program itself: removing one fails."""
    limits = Limits(memory_mb=300, cpus=0.5, pids=100, file_size_mb=7, tmpfs_mb=40)
    run = _run(package, tmp_path, {"action": "probe"}, "docker", runtime=rt, limits=limits)
    probe = run.result["probe"]
    status = probe["status"]
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0" * 16
    assert status["nnp"] == 1  # no-new-privileges (gVisor has no NoNewPrivs line)
    if rt == "runc":
        assert status["NoNewPrivs"] == "1" and status["CapAmb"] == "0" * 16
    assert probe["uid"] == probe["euid"] == 1000 and probe["groups"] in ([], [1000])
    assert probe["setuid0"] == "Operation not permitted"
    assert probe["rlimits"]["nofile"] == [1024, 1024]
    assert probe["rlimits"]["core"] == [0, 0]
    assert probe["rlimits"]["fsize"] == [7 << 20, 7 << 20]
    mounts = probe["mounts"]
    assert "ro" in mounts["/"][1].split(",")
    for folder in ("/tmp", "/work/out", "/work/run"):
        assert mounts[folder][0] == "tmpfs", (folder, mounts[folder])
    cg = probe["cgroup"]
    if rt == "runc":  # gVisor shows its own (unlimited) cgroupfs; the host enforces them
        assert _mib(cg["memory"]) == 300
        if not cg["memsw"].startswith("error"):
            assert _mib(cg["memsw"]) == 300  # memory+swap = memory: no swap
        assert int(cg["cpu_quota"]) / int(cg["cpu_period"]) == 0.5
        assert cg["pids"] == "100"
    # The IPC and network namespaces are the container's own, not the host's (gVisor
    # has no /proc/PID/ns: its whole kernel is the sandbox's own).
    if rt == "runc":
        assert probe["ipc_ns"] != os.readlink("/proc/self/ns/ipc")
        assert probe["net_ns"] != os.readlink("/proc/self/ns/net")
    # The init (the runner) cannot be inspected, traced or stopped by the program, and
    # it still handed back the result after the program signalled it.
    pid1 = probe["pid1"]
    assert pid1["mem"] == "Permission denied" and pid1["ptrace"] == -1
    assert pid1["write_fd1"] in ("Permission denied", "Operation not permitted")
    if rt == "runc":  # gVisor shows PID 1's environ and fd list (no secret in either)
        assert pid1["environ"] == pid1["fd"] == "Permission denied"
    for name in ("SIGSTOP", "SIGKILL", "SIGTERM"):
        assert pid1[name] == "Operation not permitted"
    # The init holds exactly KILL, SETGID, SETUID and SETPCAP (bits 5-8), nothing else.
    assert pid1["Uid"] == "0"
    assert pid1["CapEff"] == pid1["CapBnd"] == "00000000000001e0"
    assert run.result["status"] == "ok" and run.report.exit_code == 0


def _flag_config(**overrides: Any) -> dict[str, Any]:
    limits = Limits(memory_mb=300, cpus=0.5, pids=100, file_size_mb=7, tmpfs_mb=40)
    args: dict[str, Any] = {
        "name": "n",
        "runtime": "runsc",
        "env": {"A": "b"},
        "labels": {"mas2c": "1"},
        "mounts": [
            sandbox.volume_mount("/work"),
            sandbox.bind_mount("/tmp/sock-folder", sandbox.CONTAINER_SOCKET_DIR),
        ],
        "idle_s": 5,
    }
    args.update(overrides)
    return sandbox._container_config("img", limits, Loosen(), **args)


def test_docker_container_config_has_every_flag() -> None:
    """The create body (Engine API), flag by flag (IPC mode and the log driver are not
    observable from inside)."""
    config = _flag_config()
    host = config["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert host["CapAdd"] == ["KILL", "SETUID", "SETGID", "SETPCAP"]  # the init's only
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["IpcMode"] == "private"
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert config["User"] == "0:0"  # the init; the program runs as 1000 (see the probe)
    assert host["Memory"] == host["MemorySwap"] == 300 << 20
    assert host["NanoCpus"] == 500_000_000 and host["PidsLimit"] == 100
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]}
    assert ulimits == {"fsize": (7 << 20, 7 << 20), "nofile": (1024, 1024), "core": (0, 0)}
    assert all("size=40m" in opts for opts in host["Tmpfs"].values())
    assert host["LogConfig"]["Type"] == "none"
    assert host["AutoRemove"] is True and host["Runtime"] == "runsc"
    assert host["Init"] is False
    assert config["OpenStdin"] is config["StdinOnce"] is True and config["Tty"] is False


def test_docker_create_body_equals_docker_py() -> None:
    """The run path posts its own create body (no docker-py): it is, key for key, the
    body docker-py 7 posts for the keyword arguments mas2c passed it before (so no
    isolation flag was lost in the switch)."""
    import docker
    from docker.models.containers import _create_container_args
    from docker.types import LogConfig, Mount, Ulimit

    ours = _flag_config()
    argv = ours["Cmd"]
    kwargs: dict[str, Any] = {
        "image": "img",
        "command": argv,
        "name": "n",
        "user": "0:0",
        "environment": {"A": "b"},
        "working_dir": "/",
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {
            "/tmp": "size=40m,mode=1777",
            "/work/out": "size=40m,nr_inodes=16384,uid=1000,gid=1000,mode=0755",
            "/work/run": "size=40m,nr_inodes=16384,uid=1000,gid=1000,mode=0755",
        },
        "mounts": [
            Mount(target="/work", source=None, type="volume"),
            Mount(target="/run/mas2c", source="/tmp/sock-folder", type="bind", read_only=True),
        ],
        "cap_drop": ["ALL"],
        "cap_add": ["KILL", "SETUID", "SETGID", "SETPCAP"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": "300m",
        "memswap_limit": "300m",
        "nano_cpus": 500_000_000,
        "pids_limit": 100,
        "ulimits": [
            Ulimit(name="fsize", soft=7 << 20, hard=7 << 20),
            Ulimit(name="nofile", soft=1024, hard=1024),
            Ulimit(name="core", soft=0, hard=0),
        ],
        "init": False,
        "ipc_mode": "private",
        "hostname": "mas2c-sandbox",
        "labels": {"mas2c": "1"},
        "stdin_open": True,
        "auto_remove": True,
        "log_config": LogConfig(type="none"),
        "runtime": "runsc",
        "version": "1.41",
    }
    args = _create_container_args(kwargs)
    args.pop("name")
    api = docker.APIClient(base_url="unix:///var/run/docker.sock", version="1.41")

    def no_nulls(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: no_nulls(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [no_nulls(v) for v in value]
        return value

    theirs = no_nulls(api.create_container_config(**args))
    assert no_nulls(ours) == theirs


@pytest.mark.docker
def test_docker_daemon_records_every_flag(dock: None, rt: str) -> None:
    """What the daemon recorded for a container created by the run path (not started)."""
    from mas2c.sandbox.engine import Engine

    engine = Engine()
    name = f"mas2c-flags-{uuid.uuid4().hex[:8]}"
    config = _flag_config(
        name=name, runtime=None if rt == "runc" else rt, mounts=[sandbox.volume_mount("/work")]
    )
    config["Image"] = sandbox.DEFAULT_IMAGE
    cid = engine.create(config, name=name)
    try:
        recorded = engine.inspect(cid)
    finally:
        engine.remove(cid, force=True, volumes=True)
    host, cfg = recorded["HostConfig"], recorded["Config"]
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["KILL", "SETUID", "SETGID", "SETPCAP"]
    assert host["SecurityOpt"] == ["no-new-privileges"] and host["IpcMode"] == "private"
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True
    assert host["Memory"] == host["MemorySwap"] == 300 << 20
    assert host["NanoCpus"] == 500_000_000 and host["PidsLimit"] == 100
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]}
    assert ulimits == {"fsize": (7 << 20, 7 << 20), "nofile": (1024, 1024), "core": (0, 0)}
    assert set(host["Tmpfs"]) == {"/tmp", "/work/out", "/work/run"}
    assert host["LogConfig"]["Type"] == "none" and host["AutoRemove"] is True
    assert host["Runtime"] == rt
    assert cfg["User"] == "0:0" and cfg["OpenStdin"] is True and cfg["StdinOnce"] is True
    assert [m["Type"] for m in host["Mounts"]] == ["volume"]


# ------------------------------------------- class 2: what the program can exhaust


@pytest.mark.docker
def test_docker_volume_filler_is_capped_in_memory(
    dock: None, rt: str, package: Path, tmp_path: Path
) -> None:
    targets = {"cwd": ".", "out": "/work/out", "tmp": "/tmp", "work": "/work", "pkg": "/work/pkg"}
    limits = Limits(tmpfs_mb=24, timeout_s=120)
    run = _run(
        package,
        tmp_path,
        {"action": "fill", "targets": targets, "mb": 200},
        "docker",
        runtime=rt,
        limits=limits,
    )
    fill = run.result["fill"]
    for key in ("cwd", "out", "tmp"):  # tmpfs: full at its size, in RAM, not on disk
        assert fill[key]["mb"] <= 24 and fill[key]["error"] == "No space left on device", fill
    for key in ("work", "pkg"):  # the volume holds only root-owned files
        assert fill[key] == {"mb": 0, "error": "Permission denied"}, fill


@pytest.mark.docker
def test_docker_many_files_do_not_slow_the_copy_out(
    dock: None, package: Path, tmp_path: Path
) -> None:
    run = _run(package, tmp_path, {"action": "manyfiles", "n": 30000}, "docker")
    made = run.result["made"]
    assert made["out"] < 30000 and made["out_error"] == "No space left on device"  # inodes
    assert made["tmp"] == 30000
    copy = run.report.copy_out
    assert copy["complete"] and copy["files"] == [
        "out.json",
        "trace.jsonl",
        "stdout.txt",
        "stderr.txt",
    ]
    assert copy["duration_s"] < 10


@pytest.mark.docker
def test_docker_big_result_is_cut_at_the_cap(dock: None, package: Path, tmp_path: Path) -> None:
    limits = Limits(result_cap_bytes=1 << 20)
    run = _run(package, tmp_path, {"action": "bigresult", "mb": 8}, "docker", limits=limits)
    assert run.report.truncated == ["out.json"]
    assert run.result["status"] == "error"
    assert "larger than the 1048576-byte cap" in run.result["error"]["message"]
    assert run.report.copy_out["bytes"] < 2 << 20
    assert (run.dir / "result.json").stat().st_size < 4096


@pytest.mark.docker
def test_docker_deep_result_is_an_error_not_a_crash(
    dock: None, package: Path, tmp_path: Path
) -> None:
    run = _run(package, tmp_path, {"action": "deep", "n": 200_000}, "docker")
    assert run.result["status"] == "error"
    assert "nested deeper than 64 levels" in run.result["error"]["message"]
    _assert_run_folder_complete(run.dir)


def test_result_depth_limit_boundary(package: Path, tmp_path: Path) -> None:
    depth = sandbox.RESULT_MAX_DEPTH
    ok = _run(package, tmp_path, {"action": "deep", "n": depth - 1}, "unisolated")
    assert ok.result["status"] == "ok"  # the object plus depth-1 lists: exactly the limit
    deep = _run(package, tmp_path, {"action": "deep", "n": depth}, "unisolated")
    assert deep.result["status"] == "error" and "nested deeper" in deep.result["error"]["message"]


@pytest.mark.docker
def test_docker_big_trace_is_cut_at_a_line(dock: None, package: Path, tmp_path: Path) -> None:
    limits = Limits(trace_cap_bytes=100_000)
    run = _run(package, tmp_path, {"action": "bigtrace", "lines": 500}, "docker", limits=limits)
    assert run.result["status"] == "ok"
    assert run.report.truncated == ["trace.jsonl"]
    text = run.text("trace.jsonl")
    assert 90_000 < len(text) <= 100_000 and text.endswith("\n")
    assert all(json.loads(line) for line in text.splitlines())


# --------------------------------------------------- class 9: nothing left behind


@pytest.mark.docker
def test_docker_sigkill_of_host_leaves_nothing_running(
    dock: None, package: Path, tmp_path: Path
) -> None:
    """kill -9 of the host process: the container ends by itself (its init sees the
    attach stream close) and a later start reaps the staging folder."""
    import docker

    input_path = tmp_path / "input.json"
    input_path.write_text(json.dumps({"action": "sleep"}))
    run_dir = tmp_path / "killed-run"
    token = uuid.uuid4().hex
    script = (
        "from pathlib import Path\n"
        "from mas2c.sandbox import Limits, run_package\n"
        f"run_package(Path({str(package)!r}), 'demo_mod', Path({str(input_path)!r}), "
        f"Path({str(run_dir)!r}), limits=Limits(timeout_s=300), "
        f"env={{'MAS2C_TEST_TOKEN': {token!r}}})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        assert _wait_for_running(token), "the run did not start"
    finally:
        proc.kill()
        proc.wait()
    client = docker.from_env()
    try:
        deadline = time.monotonic() + 20
        mine: list[Any] = ["?"]
        while mine and time.monotonic() < deadline:
            mine = []
            for c in client.api.containers(all=True, filters={"label": "mas2c"}):
                with contextlib.suppress(docker.errors.NotFound):
                    env = client.api.inspect_container(c["Id"])["Config"]["Env"] or []
                    if f"MAS2C_TEST_TOKEN={token}" in env:
                        mine.append(c["Id"])
            time.sleep(0.2)
        assert mine == [], "the container outlived the killed host process"
    finally:
        client.close()
    assert not run_dir.exists() or not any(run_dir.iterdir())  # no staging in the run folder
    staging = [
        p for p in Path(tempfile.gettempdir()).glob("mas2c-staging-*") if (p / ".owner").exists()
    ]
    sandbox.reap_private_dirs(min_age_s=0)
    alive = [p for p in staging if p.exists()]
    assert len(alive) < len(staging) or not staging  # the dead run's folder went


@pytest.mark.docker
def test_docker_idle_container_ends_itself(dock: None, package: Path, tmp_path: Path) -> None:
    """The deadline holds inside the container, without mas2c: a runner that gets no
    job ends the container at its idle deadline, and the daemon removes it."""
    import docker

    from mas2c.sandbox.engine import Engine

    client = docker.from_env()
    job = sandbox._Job(
        package_dir=package,
        module="demo_mod",
        input_path=tmp_path,
        run_id="idle" + uuid.uuid4().hex[:8],
        limits=Limits(timeout_s=5),
        loosen=Loosen(),
        llm_socket=None,
        image=sandbox.DEFAULT_IMAGE,
        env={},
        warn=print,
    )
    name = f"mas2c-{job.run_id}"
    box = sandbox._start_box(
        Engine(),
        job,
        name=name,
        mounts=[],
        env={},
        labels={"mas2c.run": job.run_id},
        idle_s=2,
        attach=False,
    )
    try:
        labels = client.api.inspect_container(name)["Config"]["Labels"]
        assert float(labels[sandbox.DEADLINE_LABEL]) <= time.time() + 2 + 5 + 60 + 30 + 5
        deadline = time.monotonic() + 30
        gone = False
        while not gone and time.monotonic() < deadline:
            try:
                client.api.inspect_container(name)
                time.sleep(0.2)
            except docker.errors.NotFound:
                gone = True
        assert gone, "the idle container is still there"
    finally:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            client.api.remove_container(box.container, force=True)
        client.close()


@pytest.mark.docker
def test_prune_removes_expired_running_containers(dock: None) -> None:
    import docker

    client = docker.from_env()
    tag = uuid.uuid4().hex[:8]
    made = []
    try:
        for name, deadline in (
            (f"mas2c-expired-{tag}", time.time() - 5),
            (f"mas2c-live-{tag}", time.time() + 600),
        ):
            c = client.containers.run(
                sandbox.DEFAULT_IMAGE,
                ["sleep", "300"],
                name=name,
                detach=True,
                network_mode="none",
                labels={"mas2c": "1", sandbox.DEADLINE_LABEL: str(int(deadline))},
            )
            made.append(c)
        sandbox.prune()
        names = {
            c["Names"][0].lstrip("/")
            for c in client.api.containers(all=True, filters={"label": "mas2c"})
        }
        assert f"mas2c-expired-{tag}" not in names
        assert f"mas2c-live-{tag}" in names  # within its deadline (a run in progress)
    finally:
        for c in made:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                c.remove(force=True)
        client.close()


@pytest.mark.docker
@pytest.mark.parametrize("rt", ["runsc"], indirect=True)
def test_gvisor_refuses_allow_network(dock: None, rt: str, package: Path, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="--network=none"):
        _run(
            package,
            tmp_path,
            {"action": "echo"},
            "docker",
            runtime=rt,
            loosen=Loosen(network=True),
        )


# ------------------------------------------------------------ warm pool (issue 14)


@pytest.mark.docker
def test_pooled_container_is_never_reused(dock: None, package: Path, tmp_path: Path) -> None:
    """A warm container runs one system: the next run (also warm) finds none of the
    first run's files or processes."""
    from mas2c.sandbox.pool import Pool, PoolSpec

    with Pool(PoolSpec(), size=1) as pool:
        assert pool.wait_ready(timeout_s=180)
        first = _run(package, tmp_path, {"action": "litter", "tag": "one"}, "docker")
        assert pool.wait_ready(timeout_s=180)
        second = _run(package, tmp_path, {"action": "look"}, "docker")
    assert first.report.pool == second.report.pool == "warm"
    assert first.result["status"] == "ok", first.text("stderr.txt")
    assert second.result["files"] == [] and second.result["processes"] == []
    assert pool.taken == 2 and pool.started >= 2
    assert first.report.uid == 1000 and first.report.runtime == "default"


@pytest.mark.docker
def test_pool_run_waits_for_a_starting_container(dock: None, package: Path, tmp_path: Path) -> None:
    """A run that comes while the pool's containers are still starting waits for one of
    them (warm) instead of starting a cold container beside them; it finds a clean one
    (the init's warm-up call left nothing in /tmp and no process behind)."""
    from mas2c.sandbox.pool import Pool, PoolSpec

    with Pool(PoolSpec(), size=2, take_wait_s=180) as pool:
        run = _run(package, tmp_path, {"action": "look"}, "docker")  # at once: none ready yet
    assert run.report.pool == "warm", run.text("stderr.txt")
    assert run.result["files"] == [] and run.result["processes"] == []
    assert pool.taken == 1 and pool.started >= 1


@pytest.mark.docker
def test_pool_leaves_nothing_after_exit_or_sigkill(dock: None, tmp_path: Path) -> None:
    import docker

    from mas2c.sandbox.pool import OWNER_LABEL

    script = (
        "import sys, time\n"
        "from mas2c.sandbox.pool import Pool, PoolSpec\n"
        "with Pool(PoolSpec(), size=2) as pool:\n"
        "    assert pool.wait_ready(timeout_s=180)\n"
        "    print('ready', flush=True)\n"
        "    if sys.argv[1] == 'sleep':\n"
        "        time.sleep(600)\n"
    )
    client = docker.from_env()

    def owned(pid: int) -> list[str]:
        label = f"{OWNER_LABEL}={socket.gethostname()}:{pid}"
        return [c["Id"] for c in client.api.containers(all=True, filters={"label": label})]

    def gone(pid: int, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while owned(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        return not owned(pid)

    try:
        for how in ("exit", "sleep"):
            proc = subprocess.Popen(
                [sys.executable, "-c", script, how], stdout=subprocess.PIPE, text=True
            )
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            if how == "sleep":
                assert len(owned(proc.pid)) == 2
                proc.kill()  # SIGKILL: no cleanup code runs
            proc.wait(timeout=120)
            assert gone(proc.pid, 30), f"pool containers left after {how}"
    finally:
        client.close()


# ------------------------------------------------------------------ unisolated


def test_unisolated_echo_warns_it_does_not_isolate(package: Path, tmp_path: Path) -> None:
    warnings: list[str] = []
    run = _run(package, tmp_path, {"action": "echo"}, "unisolated", on_warning=warnings.append)
    assert run.result["echo"] == {"action": "echo"}
    assert any("does NOT isolate" in w for w in warnings)
    assert run.report.isolation == "none" and run.report.image is None
    assert run.report.exit_code == 0
    _assert_run_folder_complete(run.dir)


def test_unisolated_environment_is_scrubbed(
    secret_env: None, package: Path, tmp_path: Path
) -> None:
    run = _run(package, tmp_path, {"action": "env"}, "unisolated", env={"MAS2C_EXTRA": "yes"})
    env = run.result["env"]
    assert "OPENAI_API_KEY" not in env and "MAS2C_TEST_HOST_ONLY" not in env
    assert set(env) <= ALLOWED_ENV | {"MAS2C_EXTRA"}


def test_unisolated_timeout_kills_process_group(package: Path, tmp_path: Path) -> None:
    run = _run(
        package,
        tmp_path,
        {"action": "sleep", "child": True},
        "unisolated",
        limits=Limits(timeout_s=1.5),
    )
    assert run.report.timed_out and run.report.exit_code == 137
    assert run.result["error"]["type"] == "Timeout"
    child = int(run.text("stdout.txt").split()[1])
    assert _process_gone(child)


def test_unisolated_output_flood_is_truncated(package: Path, tmp_path: Path) -> None:
    run = _run(
        package,
        tmp_path,
        {"action": "flood", "mb": 5},
        "unisolated",
        limits=Limits(output_cap_bytes=1000),
    )
    assert (run.dir / "stdout.txt").stat().st_size == 1000
    assert run.report.stdout_truncated and not run.report.stderr_truncated


def test_unisolated_memory_limit(package: Path, tmp_path: Path) -> None:
    run = _run(package, tmp_path, {"action": "memory"}, "unisolated", limits=Limits(memory_mb=256))
    assert run.report.oom_killed and run.report.exit_code != 0
    assert run.result["error"]["type"] == "OOMKilled"


def test_unisolated_failed_program_still_leaves_a_result(package: Path, tmp_path: Path) -> None:
    run = _run(package, tmp_path, {"action": "exit", "code": 5}, "unisolated")
    assert run.report.exit_code == 5
    assert run.result["status"] == "error" and "code 5" in run.result["error"]["message"]
    _assert_run_folder_complete(run.dir)  # no temp or staging files left


def test_unisolated_llm_socket_path_is_passed(package: Path, tmp_path: Path) -> None:
    with _echo_socket() as path:
        run = _run(package, tmp_path, {"action": "socket"}, "unisolated", llm_socket=path)
    assert run.result.get("reply") == "pong:ping", run.text("stderr.txt")


def test_unisolated_interrupt_kills_and_reports(package: Path, tmp_path: Path) -> None:
    main_thread = threading.main_thread().ident
    assert main_thread is not None
    # A folder the program can write to also when it runs as nobody (mas2c as root).
    marker_dir = Path(tempfile.mkdtemp(prefix="sbx-marker-"))
    marker_dir.chmod(0o777)
    marker = marker_dir / "running.pid"
    fired = threading.Event()

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        fired.set()
        signal.pthread_kill(main_thread, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        _run(
            package,
            tmp_path,
            {"action": "sleep", "child": True, "marker": str(marker)},
            "unisolated",
            limits=Limits(timeout_s=60),
        )
    assert fired.is_set() and marker.exists()
    run_dir = tmp_path / "run-unisolated"
    _assert_run_folder_complete(run_dir)
    assert json.loads((run_dir / "sandbox.json").read_text())["interrupted"] is True
    child = int((run_dir / "stdout.txt").read_text().split()[1])
    assert _process_gone(child)
    shutil.rmtree(marker_dir)


def test_unisolated_setsid_grandchild_is_killed(package: Path, tmp_path: Path) -> None:
    """A program that leaves its session (setsid) and its tree (double fork) still
    leaves nothing running."""
    run = _run(package, tmp_path, {"action": "setsid_child"}, "unisolated")
    assert run.result["status"] == "ok", run.text("stderr.txt")
    assert _process_gone(run.result["grandchild"])


@pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root (CI runs as root)"
)
def test_unisolated_as_root_runs_the_program_as_nobody(package: Path, tmp_path: Path) -> None:
    run = _run(package, tmp_path, {"action": "filesystem"}, "unisolated")
    assert run.result["uid"] == sandbox.UNISOLATED_UID
    assert run.report.uid == sandbox.UNISOLATED_UID
    assert run.result["write"]["etc"] == "Permission denied"


# ------------------------------------------------------------ argument checks


def test_bad_package_is_a_clear_error(package: Path, tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text("{}")
    with pytest.raises(SandboxError, match="compiled package"):
        run_package(
            tmp_path, "demo_mod", tmp_path / "in.json", tmp_path / "run", backend="unisolated"
        )
    with pytest.raises(SandboxError, match="invalid module name"):
        run_package(
            package, "demo-mod", tmp_path / "in.json", tmp_path / "run", backend="unisolated"
        )
    with pytest.raises(SandboxError, match="does not exist"):
        run_package(
            package, "demo_mod", tmp_path / "nope.json", tmp_path / "run", backend="unisolated"
        )
    with pytest.raises(SandboxError, match="invalid sandbox limits"):
        run_package(
            package,
            "demo_mod",
            tmp_path / "in.json",
            tmp_path / "run",
            backend="unisolated",
            limits=Limits(timeout_s=0),
        )
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "error" and result["error"]["type"] == "SandboxError"


def test_wheel_platforms_cover_older_manylinux() -> None:
    plats = sandbox._wheel_platforms({"machine": "x86_64", "libc": ["glibc", "2.36"]})
    assert plats[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in plats
    assert "manylinux2014_x86_64" in plats


def test_cli_status_without_daemon(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert sandbox.main(["status"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["backends"] == {"docker": False, "unisolated": True}


# --------------------------------------------------------------------- helpers


class _echo_socket:
    """A one-shot unix socket server answering `pong:<request>` (a stand-in gateway)."""

    def __enter__(self) -> Path:
        self._dir = tempfile.mkdtemp(prefix="mas2c-sock-", dir="/tmp")
        os.chmod(self._dir, 0o711)  # the program (another uid) reaches the socket inside
        self.path = Path(self._dir) / "llm.sock"
        self._srv = socket.socket(socket.AF_UNIX)
        self._srv.bind(str(self.path))
        os.chmod(self.path, 0o666)
        self._srv.listen(1)
        self._srv.settimeout(30)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self.path

    def _serve(self) -> None:
        try:
            conn, _ = self._srv.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"pong:" + conn.recv(100))

    def __exit__(self, *exc: object) -> None:
        self._srv.close()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)
        os.rmdir(self._dir)


# ------------------------------------------------- the prestarted cold container


TRIVIAL_SPEC = """\
spec_version: "1"
name: trivial
description: One agent answers one prompt.
inputs: {question: {type: string}}
outputs: {answer: answer}
models: {m: {model: gpt-4o-mini}}
agents:
  solver: {role: Solver, instructions: Answer briefly., model: m}
workflow:
  - {id: answer, kind: call, agent: solver, prompt: "{{ question }}", out: answer}
"""


@pytest.fixture
def trivial_build(tmp_path: Path) -> tuple[Path, Path]:
    from mas2c.compile import compile_spec
    from mas2c.lang.validate import load_spec

    spec = tmp_path / "trivial.yaml"
    spec.write_text(TRIVIAL_SPEC, "utf-8")
    build = tmp_path / "build"
    compile_spec(load_spec(spec)).write(build)
    question = tmp_path / "in.json"
    question.write_text(json.dumps({"question": "2+2?"}), "utf-8")
    return build, question


def _spy_prestarts(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every Prestart that run_system makes (the real one, recorded)."""
    made: list[Any] = []
    real = sandbox.prestart

    def recording(**kwargs: Any) -> Any:
        found = real(**kwargs)
        made.append(found)
        return found

    monkeypatch.setattr(sandbox, "prestart", recording)
    return made


@pytest.mark.docker
def test_prestarted_container_serves_the_run_and_is_removed(
    dock: None,
    rt: str,
    trivial_build: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cold run's container is created while the host prepares the run; it is that
    run's (its run id), reaches the gateway whose socket appeared in its folder after it
    started, and is gone when run_system returns."""
    from mas2c.run import LLMConfig, run_system
    from mas2c.testserver import LLMTestServer

    made = _spy_prestarts(monkeypatch)
    monkeypatch.setenv(sandbox.NO_POOL_ENV, "1")
    if rt != "runc":
        monkeypatch.setenv(sandbox.RUNTIME_ENV, rt)
    build, question = trivial_build
    with LLMTestServer() as server:
        out = run_system(
            build,
            question,
            tmp_path / "run-1",
            llm=LLMConfig(url=server.base_url, api_key="test"),
            on_warning=lambda _m: None,
        )
    assert out.ok, out.result
    assert len(made) == 1 and made[0] is not None
    assert out.sandbox["run_id"] == made[0].run_id and out.sandbox["pool"] == "cold"
    assert _leftovers({made[0].run_id}) == []


@pytest.mark.docker
def test_prestarted_container_is_removed_when_the_run_fails_first(
    dock: None, trivial_build: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run fails after its container was begun (here: a replay cassette that does
    not exist, found when the gateway starts): the container is removed all the same."""
    from mas2c.gateway import GatewayError
    from mas2c.run import LLMConfig, run_system

    made = _spy_prestarts(monkeypatch)
    monkeypatch.setenv(sandbox.NO_POOL_ENV, "1")
    build, question = trivial_build
    with pytest.raises(GatewayError, match="replay cassette"):
        run_system(
            build,
            question,
            tmp_path / "run-1",
            llm=LLMConfig(replay=tmp_path / "missing.jsonl"),
            on_warning=lambda _m: None,
        )
    assert len(made) == 1 and made[0] is not None
    assert made[0]._box is None  # cancelled: removed, not handed to anything
    assert _leftovers({made[0].run_id}) == []


@pytest.mark.docker
def test_prestarted_container_that_does_not_fit_is_not_used(
    dock: None, package: Path, tmp_path: Path
) -> None:
    """A prestarted container made for other limits is not given to the run: the run
    starts its own, and cancel() removes the unused one."""
    pre = sandbox.prestart(limits=Limits(memory_mb=300), socket_folder=None)
    assert pre is not None
    try:
        run = _run(package, tmp_path, {"action": "echo"}, "docker", prestarted=pre)
    finally:
        pre.cancel()
    assert run.report.run_id == pre.run_id and run.result["echo"] == {"action": "echo"}
    assert not pre._taken and pre._box is None  # removed before the run made its own
    assert run.report.pool == "cold" and run.report.limits["memory_mb"] == Limits().memory_mb
    assert _leftovers({pre.run_id}) == []


@pytest.mark.docker
def test_docker_package_ships_with_checked_bytecode(
    dock: None, package: Path, tmp_path: Path
) -> None:
    """The host sends each module's bytecode (hash-checked .pyc, compiled once per
    machine): a sandbox of the same Python imports it instead of compiling the package
    again; the program cannot change it."""
    run = _run(package, tmp_path, {"action": "bytecode"}, "docker")
    assert run.result["status"] == "ok", run.text("stderr.txt")
    if run.result["tag"] != sys.implementation.cache_tag:
        pytest.skip(f"the image's Python ({run.result['tag']}) is not the host's")
    tag = run.result["tag"]
    assert run.result["pycache"] == [f"__init__.{tag}.pyc", f"__main__.{tag}.pyc"]
    assert run.result["valid"] is True and run.result["writable"] is False


def test_bytecode_is_hash_checked_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util
    import marshal

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = b"X = 41 + 1\n"
    pyc = sandbox._bytecode(source)
    assert pyc is not None and pyc[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(pyc[4:8], "little") == 0b11  # hash-based, checked
    assert pyc[8:16] == importlib.util.source_hash(source)
    namespace: dict[str, Any] = {}
    exec(marshal.loads(pyc[16:]), namespace)
    assert namespace["X"] == 42
    assert sandbox._bytecode(source) == pyc  # from the cache now
    assert len(list((tmp_path / "mas2c" / "bytecode").glob("*.pyc"))) == 1
    assert sandbox._bytecode(b"def broken(:\n") is None


@pytest.mark.parametrize("field", ["timeout_s", "cpus"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_limits_must_be_finite(field: str, value: float) -> None:
    with pytest.raises(SandboxError, match=f"invalid sandbox limits: {field}="):
        Limits(**{field: value}).validate()


@pytest.mark.docker
def test_prestarted_container_without_the_runs_socket_folder_is_not_used(
    dock: None, package: Path, tmp_path: Path
) -> None:
    """A run whose gateway socket is not in the folder the prestarted container mounted
    (here: it mounted none) gets a container of its own, which reaches the socket."""
    folder = Path(tempfile.mkdtemp(prefix="mas2c-gw-test-", dir="/tmp"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(folder / "llm.sock"))
        listener.listen(1)
        pre = sandbox.prestart(socket_folder=None)
        assert pre is not None
        try:
            run = _run(
                package,
                tmp_path,
                {"action": "echo"},
                "docker",
                prestarted=pre,
                llm_socket=folder / "llm.sock",
            )
        finally:
            pre.cancel()
    finally:
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert run.result["echo"] == {"action": "echo"}, run.text("stderr.txt")
    assert not pre._taken and _leftovers({pre.run_id}) == []
