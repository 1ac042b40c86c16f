"""The sandbox through the command line: `--runtime` (gVisor), `mas2c sandbox status|prune`.

A compiled example runs end to end (gateway socket included) under runsc, the way a
user runs it. Fails instead of skipping under CI=true when Docker or runsc is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli_document, mas2c

from mas2c import sandbox
from mas2c.testserver import LLMTestServer

SPEC = ROOT / "specs" / "chain-of-thought.yaml"


@pytest.fixture
def runsc(docker_ready: None) -> None:
    if "runsc" not in sandbox.status()["runtimes"]:
        if os.environ.get("CI") == "true":
            pytest.fail("runsc is not registered with dockerd (scripts/ensure-docker.sh does it)")
        pytest.skip("runsc is not registered with dockerd")


def _run(tmp_path: Path, server: LLMTestServer, *extra: str) -> tuple[int, dict[str, Any], str]:
    (tmp_path / "in.json").write_text(json.dumps({"question": "What is 6 x 7?"}))
    proc = mas2c(
        "run",
        SPEC,
        "--input",
        tmp_path / "in.json",
        "--run-dir",
        tmp_path / "run",
        "--llm",
        server.base_url,
        "--json",
        *extra,
        cwd=tmp_path,
    )
    doc = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc.returncode, doc, proc.stderr


@pytest.mark.docker
def test_run_under_gvisor(runsc: None, llm_server: LLMTestServer, tmp_path: Path) -> None:
    code, doc, stderr = _run(tmp_path, llm_server, "--runtime", "runsc")
    assert code == 0, stderr
    assert doc["status"] == "ok" and set(doc["result"]["outputs"]) == {"answer", "reasoning"}
    assert doc["sandbox"]["runtime"] == "runsc"
    assert doc["usage"]["calls"] == 1  # through the gateway socket, inside gVisor
    report = json.loads((tmp_path / "run" / "sandbox.json").read_text())
    assert report["runtime"] == "runsc" and report["uid"] == sandbox.SANDBOX_UID


@pytest.mark.docker
def test_unknown_runtime_is_a_clear_error(
    docker_ready: None, llm_server: LLMTestServer, tmp_path: Path
) -> None:
    code, _doc, stderr = _run(tmp_path, llm_server, "--runtime", "nosuch")
    assert code == 1
    assert "'nosuch' is not registered with dockerd" in stderr and "Traceback" not in stderr


@pytest.mark.docker
def test_status_lists_runtimes_and_prune_runs(runsc: None, tmp_path: Path) -> None:
    status = cli_document(mas2c("sandbox", "status", "--json", cwd=tmp_path, inprocess=True))
    assert {"runc", "runsc"} <= set(status["status"]["runtimes"])
    text = mas2c("sandbox", "status", cwd=tmp_path, inprocess=True).stdout
    assert "runtimes: " in text and "runsc" in text
    pruned = cli_document(mas2c("sandbox", "prune", "--json", cwd=tmp_path, inprocess=True))
    assert isinstance(pruned["removed"], int)


LINGERING = """\
spec_version: "1"
name: lingering
description: A tool leaves a non-daemon thread and an atexit hook behind.
inputs:
  x: {type: string}
outputs:
  y: y
models:
  m: {model: test-model}
agents:
  unused: {role: Idle, instructions: Not called., model: m}
tools:
  linger:
    description: Starts a thread that never ends, and a slow exit hook.
    code: |
      def linger(x: str) -> str:
          import atexit, threading, time
          threading.Thread(target=time.sleep, args=(600,)).start()
          atexit.register(time.sleep, 600)
          return x + "!"
workflow:
  - {id: go, kind: tool, tool: linger, args: {x: "{{ x }}"}, out: y}
"""


def test_package_exits_once_its_outputs_are_written(tmp_path: Path) -> None:
    """Issue 14 item 3: after out.json and the trace are flushed, fsynced and closed the
    package exits at once: no interpreter teardown (a non-daemon thread or an atexit
    hook would otherwise hold it for 600 s)."""
    import subprocess
    import sys
    import time

    from conftest import compile_to, package_of

    from mas2c.lang.validate import load_spec

    spec_path = tmp_path / "lingering.yaml"
    spec_path.write_text(LINGERING)
    build = tmp_path / "build"
    compile_to(load_spec(spec_path), build)
    (tmp_path / "in.json").write_text('{"x": "hi"}')
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            package_of(build),
            "--input",
            str(tmp_path / "in.json"),
            "--output",
            str(tmp_path / "out.json"),
            "--trace",
            str(tmp_path / "trace.jsonl"),
        ],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(build)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 60
    assert json.loads((tmp_path / "out.json").read_text())["outputs"] == {"y": "hi!"}
    events = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "run_end"


@pytest.mark.docker
def test_pool_service_serves_separate_runs(
    docker_ready: None, llm_server: LLMTestServer, tmp_path: Path
) -> None:
    """`mas2c sandbox pool start`: a separate `mas2c run` takes a warm container (its
    gateway socket reaches it through the container's socket folder); `--no-pool`
    does not; `stop` leaves no pooled container."""
    import docker

    from mas2c.sandbox.pool import POOL_LABEL

    # The service is machine-wide: with the default limits, any docker test running
    # concurrently (pytest -n) could claim its warm container. A memory limit no other
    # test uses gives this pool a key of its own.
    own = ("--memory", "1000")
    started = mas2c("sandbox", "pool", "start", "--size", "1", *own, "--json", cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        assert cli_document(started)["pool"]["idle"] >= 1
        code, doc, stderr = _run(tmp_path, llm_server, *own)
        assert code == 0, stderr
        assert doc["sandbox"]["pool"] == "service", doc["sandbox"]
        assert doc["usage"]["calls"] == 1
        cold = tmp_path / "cold"
        cold.mkdir()
        code, doc, stderr = _run(cold, llm_server, "--no-pool", *own)
        assert code == 0, stderr
        assert doc["sandbox"]["pool"] == "cold"
        status = cli_document(mas2c("sandbox", "pool", "status", "--json", cwd=tmp_path))
        assert status["pool"]["running"] is True
    finally:
        stopped = mas2c("sandbox", "pool", "stop", "--json", cwd=tmp_path)
    assert cli_document(stopped)["stopped"] is True
    client = docker.from_env()
    try:
        left = client.api.containers(all=True, filters={"label": f"{POOL_LABEL}=service"})
    finally:
        client.close()
    assert left == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--idle", "5"],  # within the hand-out margin: never used, replaced over and over
        ["--idle", "nan"],
        ["--idle", "-1"],
        ["--idle", "inf"],
        ["--memory", "0"],
        ["--cpus", "inf"],
        ["--timeout", "nan"],
    ],
    ids=["idle-short", "idle-nan", "idle-negative", "idle-inf", "memory", "cpus", "timeout"],
)
def test_pool_start_refuses_bad_settings_before_starting(argv: list[str], tmp_path: Path) -> None:
    proc = mas2c("sandbox", "pool", "start", "--size", "1", *argv, "--json", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert cli_document(proc)["error"]["code"] == "usage"
    assert argv[0].lstrip("-") in proc.stderr or "limits" in proc.stderr
    from mas2c.sandbox.pool import service_state

    # Nothing started with these settings (another test's service may be up: machine-wide).
    state = service_state() or {"spec": {"idle_s": 300.0, "limits": {}}}
    field = {
        "--idle": "idle_s",
        "--memory": "memory_mb",
        "--cpus": "cpus",
        "--timeout": "timeout_s",
    }
    where = state["spec"] if argv[0] == "--idle" else state["spec"]["limits"]
    value, bad = where.get(field[argv[0]]), float(argv[1])
    same = value is not None and (float(value) == bad or (value != value and bad != bad))
    assert not same, state


def test_in_process_pool_settings_come_from_the_environment(tmp_path: Path) -> None:
    """MAS2C_POOL_SIZE and MAS2C_POOL_IDLE (solve, rectify, bench): a bad value is a
    usage error naming the variable, before anything runs."""
    for name, value in (("MAS2C_POOL_IDLE", "soon"), ("MAS2C_POOL_IDLE", "3")):
        env = {**os.environ, name: value}
        proc = mas2c(
            "solve",
            "a task",
            "--input",
            str(tmp_path / "none.json"),
            "--sandbox",
            "docker",
            cwd=tmp_path,
            env=env,
        )
        assert proc.returncode == 2, proc.stderr
        assert name in proc.stderr and "Traceback" not in proc.stderr
