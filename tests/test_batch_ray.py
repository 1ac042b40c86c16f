"""`mas2c batch --engine ray` on a real two-node Ray cluster started by the test.

Both nodes run on this machine (`ray start --head --num-cpus=1` and a second `ray start
--address=...` with its own temp dir and node folder), with Docker sandboxes. The test checks
that the Ray engine gives the threads engine's results (modulo timing), that the API key reaches
the nodes through the runtime env and never a sandbox or a file, and that a node dying
mid-batch loses only its in-flight row, which Ray re-runs on the other node, and that the
driver stops submitting at the cost cap. The cluster's
processes (found by their temp dirs) are stopped at teardown. Without Ray this skips; under
CI=true it fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mas2c.batch import BatchOptions, comparable, read_results, run_batch
from mas2c.batch_datasets import convert_file
from mas2c.bench import canonical_solution, humaneval_rows, load_problems
from mas2c.run import LLMConfig
from mas2c.testserver import ChatRequest, LLMTestServer

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "batch"
SECRET = "sk-ray-secret-456"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    address: str
    head_dir: Path
    worker_dir: Path
    worker_node_dir: Path
    env: dict[str, str]


def _processes_under(tags: list[bytes]) -> list[int]:
    """Our cluster's processes: those whose command line names one of our temp dirs, and
    their children (Ray's workers rename themselves to `ray::...`)."""
    table: dict[int, tuple[bytes, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (cmd, ppid)
    ours = {pid for pid, (cmd, _) in table.items() if any(t in cmd for t in tags)}
    grew = True
    while grew:
        children = {pid for pid, (_, ppid) in table.items() if ppid in ours} - ours
        grew = bool(children)
        ours |= children
    return sorted(ours - {os.getpid()})


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _stop(tags: list[bytes]) -> None:
    _kill(_processes_under(tags), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _processes_under(tags):
        time.sleep(0.2)
    _kill(_processes_under(tags), signal.SIGKILL)


def _ray(args: list[str], env: dict[str, str]) -> None:
    binary = Path(sys.executable).parent / "ray"
    proc = subprocess.run(
        [str(binary), *args], env=env, capture_output=True, text=True, timeout=180
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ray {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Ray is required under CI: pip install 'mas2c[ray]'")
        pytest.skip("Ray is not installed (pip install 'mas2c[ray]')")
    base = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short: unix socket paths
    head_dir, worker_dir = base / "h", base / "w"
    node_dirs = base / "nh", base / "nw"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RAY_ADDRESS"))}
    env.update(
        PYTHONPATH=str(ROOT),  # the nodes import the mas2c under test
        RAY_USAGE_STATS_ENABLED="0",
        RAY_health_check_period_ms="1000",
        RAY_health_check_failure_threshold="3",
        # Hermetic: a token a user made (~/.ray/auth_token) must not reach this cluster's
        # nodes or its driver (ray start failed with InvalidAuthToken on such a machine).
        RAY_AUTH_MODE="disabled",
        RAY_AUTH_TOKEN_PATH=str(base / "no-auth-token"),
    )
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.update(
        RAY_AUTH_MODE=env["RAY_AUTH_MODE"], RAY_AUTH_TOKEN_PATH=env["RAY_AUTH_TOKEN_PATH"]
    )
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
    tags = [str(head_dir).encode(), str(worker_dir).encode()]
    try:
        _ray(
            [
                "start",
                "--head",
                f"--port={port}",
                f"--temp-dir={head_dir}",
                "--include-dashboard=false",
                f"--dashboard-agent-listen-port={_free_port()}",
                *common,
            ],
            {**env, "MAS2C_BATCH_NODE_DIR": str(node_dirs[0])},
        )
        _ray(
            [
                "start",
                f"--address={address}",
                f"--temp-dir={worker_dir}",
                f"--dashboard-agent-listen-port={_free_port()}",
                *common,
            ],
            {**env, "MAS2C_BATCH_NODE_DIR": str(node_dirs[1])},
        )
        yield Cluster(address, head_dir, worker_dir, node_dirs[1], env)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _stop(tags)
        subprocess.run(["rm", "-rf", str(base)], check=False)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _nodes(address: str) -> list[dict[str, Any]]:
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        return [n for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()


def _oracle(problems: list[Any]) -> Any:
    def respond(req: ChatRequest) -> str:
        for p in problems:
            if p.prompt.strip() in req.all_text:
                return f"```python\n{canonical_solution(p)}\n```"
        return "```python\nprint('unknown problem')\n```"

    return respond


def _options(run_dir: Path, server: LLMTestServer, **kw: Any) -> BatchOptions:
    base: dict[str, Any] = {
        "run_dir": run_dir,
        "llm": LLMConfig(url=server.base_url, api_key=SECRET),
        "on_warning": lambda _m: None,
        "stream": io.StringIO(),
        "workers": 2,
    }
    base.update(kw)
    return BatchOptions(**base)


@pytest.mark.docker
def test_ray_engine_matches_local_and_survives_a_node_dying(
    docker_ready: None, cluster: Cluster, tmp_path: Path
) -> None:
    nodes = _nodes(cluster.address)
    assert len(nodes) == 2 and sum(n["Resources"].get("CPU", 0) for n in nodes) == 2

    # 1. HumanEval through specs/code-generation.yaml, Docker sandboxes: local vs Ray.
    problems = load_problems(3)
    rows = humaneval_rows(problems)
    common: dict[str, Any] = {
        "rows": rows,
        "dataset_sha256": "humaneval-3",
        "spec": ROOT / "specs" / "code-generation.yaml",
        "scorer": "code",
        "keep": ("task_id",),
        "backend": "docker",
    }
    with LLMTestServer(_oracle(problems)) as server:
        local = run_batch(_options(tmp_path / "local", server, **common))
        on_ray = run_batch(
            _options(tmp_path / "ray", server, engine="ray", ray_address=cluster.address, **common)
        )
        assert len(server.requests) == 6
        keys = {r.headers.get("authorization") for r in server.requests}
        assert keys == {f"Bearer {SECRET}"}  # the nodes' gateways had the key
    assert local["accuracy"] == on_ray["accuracy"] == 1.0
    assert local["complete"] and on_ray["complete"] and on_ray["engine"] == "ray"
    a = read_results(tmp_path / "local" / "results.jsonl")
    b = read_results(tmp_path / "ray" / "results.jsonl")
    assert {k: comparable(v) for k, v in a.items()} == {k: comparable(v) for k, v in b.items()}
    engines = [json.loads(p.read_text()) for p in (tmp_path / "ray").glob("rows/*/engine.json")]
    assert len(engines) == 3 and {e["engine"] for e in engines} == {"ray"}
    # the driver wrote each row's run folder as the node returned it
    for path in (tmp_path / "ray").glob("rows/*"):
        assert (path / "mas" / "result.json").is_file() and (
            path / "score" / "sandbox.json"
        ).is_file()
        assert json.loads((path / "mas" / "sandbox.json").read_text())["isolation"] == "container"
    for path in (tmp_path / "ray").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    dataset = tmp_path / "gsm8k.jsonl"
    convert_file("gsm8k", DATA / "gsm8k.jsonl", dataset)
    qa = [json.loads(line) for line in dataset.read_text().splitlines()]

    def respond(req: ChatRequest) -> Any:
        for row in qa:
            if row["question"] in req.all_text:
                return {"reasoning": "r", "answer": row["answer"]}
        return {"reasoning": "r", "answer": "?"}

    # 2. The driver owns the cost cap: once the recorded cost reaches it, no task is submitted.
    with LLMTestServer(respond) as server:
        capped = run_batch(
            _options(
                tmp_path / "capped",
                server,
                dataset=dataset,
                spec=ROOT / "specs" / "chain-of-thought.yaml",
                scorer="numeric",
                backend="docker",
                engine="ray",
                ray_address=cluster.address,
                workers=1,
                max_cost_usd=1e-9,
            )
        )
        assert len(server.requests) == 1
    assert capped["finished"] == 1 and not capped["complete"]
    assert capped["stopped"].startswith("cost cap")

    # 3. A node dies mid-batch: its in-flight row is re-run on the other node.
    killed: list[int] = []

    def kill_the_worker_node(server: LLMTestServer) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.in_flight < 2:
            time.sleep(0.05)
        killed.extend(_processes_under([str(cluster.worker_dir).encode()]))
        _kill(killed, signal.SIGKILL)

    with LLMTestServer(respond) as server:
        server.latency_s = 2.5
        killer = threading.Thread(target=kill_the_worker_node, args=(server,), daemon=True)
        killer.start()
        summary = run_batch(
            _options(
                tmp_path / "death",
                server,
                dataset=dataset,
                spec=ROOT / "specs" / "chain-of-thought.yaml",
                scorer="numeric",
                backend="docker",
                engine="ray",
                ray_address=cluster.address,
            )
        )
        killer.join(timeout=5)
        requests = len(server.requests)
    assert killed, "the worker node was never busy"
    assert summary["complete"] and summary["accuracy"] == 1.0, summary
    assert summary["not_recorded"] == []
    lines = (tmp_path / "death" / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == [r["id"] for r in qa]
    assert requests == len(qa) + 1  # the lost row ran again, nothing else did
    engines = [json.loads(p.read_text()) for p in (tmp_path / "death").glob("rows/*/engine.json")]
    head = {n["NodeID"] for n in _nodes(cluster.address)}
    assert len(head) == 1
    assert sum(e["node"] in head for e in engines) >= 3  # the dead node's row ended on the head
    _remove_orphans(cluster.worker_node_dir)


def _remove_orphans(node_dir: Path) -> None:
    """The containers of the rows that died with the worker node (found by their run ids)."""
    import docker

    ids = {
        p.name.split("-")[1]
        for p in node_dir.glob("rows/*/row/*/.staging-*")
        if p.name.count("-") >= 2
    }
    if not ids:
        return
    client = docker.from_env()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = [
                c
                for c in client.api.containers(all=True, filters={"label": "mas2c"})
                if c["Labels"].get("mas2c.run") in ids
            ]
            if not left:
                return
            for c in left:
                with contextlib.suppress(Exception):
                    client.api.remove_container(c["Id"], force=True, v=True)
            time.sleep(0.5)
    finally:
        client.close()


def test_the_endpoint_url_and_key_travel_in_the_task_env_not_in_the_plan() -> None:
    """Ray stores task arguments (the plan) in its object store and may log them: an
    endpoint URL can carry credentials, so it travels like the key, in the env."""
    import pickle

    from mas2c.batch import Plan, llm_config
    from mas2c.batch_ray import _secrets_out_of

    url = "https://user:url-secret@llm.example/v1?api-key=query-secret"
    options = BatchOptions(
        run_dir=Path("unused"), llm=LLMConfig(url=url, api_key=SECRET), workers=1
    )
    env, plan = _secrets_out_of(Plan(mode="spec", llm_url=url), options)
    assert env == {"OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": url}
    shipped = pickle.dumps(plan)
    for secret in ("url-secret", "query-secret", SECRET):
        assert secret.encode() not in shipped
    # on the node, the plan's endpoint comes back from the task's environment
    saved = os.environ.get("OPENAI_BASE_URL")
    os.environ["OPENAI_BASE_URL"] = url
    try:
        assert llm_config(plan).endpoint() == url
    finally:
        if saved is None:
            del os.environ["OPENAI_BASE_URL"]
        else:
            os.environ["OPENAI_BASE_URL"] = saved


def test_an_unreachable_cluster_fails_fast_before_anything_is_written(tmp_path: Path) -> None:
    """`ray.init` waits without end for a cluster that is not there: the address is checked
    (a TCP connection, 3 s) before any run folder, build or row."""
    if importlib.util.find_spec("ray") is None and os.environ.get("CI") != "true":
        pytest.skip("Ray is not installed (pip install 'mas2c[ray]')")
    from mas2c.batch import BatchError

    dataset = tmp_path / "gsm8k.jsonl"
    convert_file("gsm8k", DATA / "gsm8k.jsonl", dataset)
    port = _free_port()  # nothing listens there
    with LLMTestServer() as server:
        started = time.monotonic()
        with pytest.raises(BatchError, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port}"):
            run_batch(
                _options(
                    tmp_path / "run",
                    server,
                    dataset=dataset,
                    spec=ROOT / "specs" / "chain-of-thought.yaml",
                    scorer="numeric",
                    backend="unisolated",
                    engine="ray",
                    ray_address=f"127.0.0.1:{port}",
                )
            )
        assert time.monotonic() - started < 30
        assert server.requests == []
    assert not (tmp_path / "run").exists()
