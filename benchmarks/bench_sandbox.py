"""Sandbox latency: a trivial `mas2c run` in Docker and in the unisolated backend, against a bare
`docker run` and a bare subprocess.

    python benchmarks/bench_sandbox.py [--reps 10] [--warm-runs 50] [--out FILE]

The trivial system is one agent answering one prompt, against the loopback LLM test
server with no latency, so what is measured is the sandbox and the run's plumbing
(compile is done once beforehand; the run gets the build folder). Measured, interleaved,
median of --reps runs each:

* bare `python -c pass` (a subprocess of this venv's python), and `python -c "import openai,
  httpx"`: the floor of any program that talks to an LLM with the openai client (and the
  same ending in `os._exit(0)`, which skips the interpreter's finalization);
* bare `docker run --rm mas2c-sandbox:latest python -c pass` (docker CLI);
* `mas2c run BUILD --sandbox unisolated` and `--sandbox docker` (the CLI, end to end);
* the same two in-process (`mas2c.run.run_system`), without the CLI's Python start-up;
* the Docker phases of a bare container with docker-py: create, start -> exit, remove;
* under gVisor too (`--runtime runsc`, when registered): bare `docker run` + `import
  openai`, `mas2c run` and `run_system`, interleaved with the runc rows;
* the warm pool (issue 14): --warm-runs in-process runs from a warm single-use pool
  (`mas2c.sandbox.pool.Pool`, 2 containers), runc and runsc interleaved: p50/p95;
* throughput (issue 14): --throughput-runs in-process runs with --workers concurrent
  workers (threads calling `run_system`), each of pool (a `Pool` of --workers warm
  containers, opened when its batch starts: its filling is counted) and cold
  (`MAS2C_NO_POOL=1`), under runc and runsc: the configurations take turns in batches
  of --batch runs (interleaved), and each one's runs/s is its runs over the wall time
  of its own batches.

Writes FILE (json) and FILE with .md: the ratios (cold `mas2c run` / bare `docker run` +
`import openai`; warm p50 and p95; runsc / runc).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from mas2c import sandbox  # noqa: E402
from mas2c.compile import compile_spec  # noqa: E402
from mas2c.lang.validate import load_spec  # noqa: E402
from mas2c.run import LLMConfig, run_system  # noqa: E402
from mas2c.testserver import LLMTestServer  # noqa: E402

TRIVIAL = """\
spec_version: "1"
name: trivial
description: One agent answers one prompt (sandbox latency benchmark).
inputs: {question: {type: string}}
outputs: {answer: answer}
models: {m: {model: gpt-4o-mini}}
agents:
  solver: {role: Solver, instructions: Answer briefly., model: m}
workflow:
  - {id: answer, kind: call, agent: solver, prompt: "{{ question }}", out: answer}
"""


def timed(action: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def run_cmd(argv: list[str]) -> Callable[[], None]:
    def action() -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:4])}... exited {proc.returncode}: {proc.stderr[-400:]}"
            )

    return action


def docker_phases(image: str) -> dict[str, float]:
    """create / start->exit / remove of a bare container, with docker-py."""
    import docker

    client = docker.from_env()
    try:
        t0 = time.perf_counter()
        container = client.containers.create(
            image,
            ["python3", "-c", "pass"],
            network_mode="none",
            labels={"mas2c": "1", "mas2c.run": "bench"},
        )
        t1 = time.perf_counter()
        container.start()
        container.wait(timeout=120)
        t2 = time.perf_counter()
        container.remove(force=True, v=True)
        t3 = time.perf_counter()
    finally:
        client.close()
    return {"create": t1 - t0, "start_to_exit": t2 - t1, "remove": t3 - t2}


def _pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def warm_runs(
    n: int, runtimes: list[str], in_process: Callable[..., Callable[[], None]], image: str
) -> dict[str, list[float]]:
    """`n` in-process runs per runtime, each from a warm single-use pool of 2 (runtimes
    interleaved; the next run waits until its pool is refilled, as a steady stream would)."""
    from mas2c.sandbox import pool as sandbox_pool

    pools = {
        rt: sandbox_pool.Pool(sandbox_pool.PoolSpec(image, None if rt == "runc" else rt), size=2)
        for rt in runtimes
    }
    times: dict[str, list[float]] = {rt: [] for rt in runtimes}
    try:
        for pool in pools.values():
            pool.start()
        for i in range(n):
            for rt, pool in pools.items():
                if not pool.wait_ready(timeout_s=300):
                    raise RuntimeError(f"the {rt} pool did not fill: {pool.errors}")
                sandbox_pool.ACTIVE = pool
                try:
                    times[rt].append(timed(in_process("docker", None if rt == "runc" else rt)))
                finally:
                    sandbox_pool.ACTIVE = None
            if (i + 1) % 10 == 0:
                print(f"sandbox: warm {i + 1}/{n}", file=sys.stderr)
    finally:
        for pool in pools.values():
            pool.close()
    return times


def throughput(
    n: int,
    workers: int,
    batch: int,
    runtimes: list[str],
    one_run: Callable[[], str],
    image: str,
) -> dict[str, dict[str, Any]]:
    """`n` runs per configuration (pool/cold x runtime), `workers` at a time; the
    configurations take turns, `batch` runs each. Returns runs, seconds, runs/s and
    how each run was served (warm / cold) per configuration."""
    from concurrent.futures import ThreadPoolExecutor

    from mas2c.sandbox import pool as sandbox_pool

    configs = [(mode, rt) for rt in runtimes for mode in ("pool", "cold")]
    done = {c: 0 for c in configs}
    seconds = {c: 0.0 for c in configs}
    served: dict[tuple[str, str], list[str]] = {c: [] for c in configs}
    saved = {k: os.environ.get(k) for k in (sandbox.RUNTIME_ENV, sandbox.NO_POOL_ENV)}
    try:
        while any(done[c] < n for c in configs):
            for mode, rt in configs:
                count = min(batch, n - done[(mode, rt)])
                if count <= 0:
                    continue
                os.environ.pop(sandbox.RUNTIME_ENV, None)
                if rt != "runc":
                    os.environ[sandbox.RUNTIME_ENV] = rt
                os.environ[sandbox.NO_POOL_ENV] = "1" if mode == "cold" else "0"
                pool = None
                t0 = time.perf_counter()
                if mode == "pool":
                    spec = sandbox_pool.PoolSpec(image, None if rt == "runc" else rt)
                    pool = sandbox_pool.Pool(spec, size=workers)
                    pool.start()
                    sandbox_pool.ACTIVE = pool
                try:
                    with ThreadPoolExecutor(max_workers=workers) as executor:
                        kinds = list(executor.map(lambda _i: one_run(), range(count)))
                    seconds[(mode, rt)] += time.perf_counter() - t0
                finally:
                    sandbox_pool.ACTIVE = None
                    if pool is not None:
                        pool.close()
                done[(mode, rt)] += count
                served[(mode, rt)] += kinds
                print(
                    f"sandbox: throughput {mode}/{rt}: {done[(mode, rt)]}/{n} "
                    f"({seconds[(mode, rt)]:.1f} s)",
                    file=sys.stderr,
                )
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    return {
        f"{mode}/{rt}": {
            "runs": done[(mode, rt)],
            "workers": workers,
            "seconds": seconds[(mode, rt)],
            "runs_per_s": done[(mode, rt)] / seconds[(mode, rt)],
            "served": {k: served[(mode, rt)].count(k) for k in sorted(set(served[(mode, rt)]))},
        }
        for mode, rt in configs
    }


def _paired(samples: dict[str, list[float]], a: str, b: str) -> float:
    """The median over reps of a_i / b_i (a and b measured in the same rep)."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=False))


def ratio_lines(md: str) -> list[str]:
    """The summary lines of the report (its bullets): what the targets are judged on."""
    return [line for line in md.splitlines() if line.startswith("- ")]


def markdown(r: dict[str, Any]) -> str:
    m = r["medians_s"]

    def ms(key: str) -> str:
        return f"{m[key] * 1000:.0f}" if key in m else "-"

    def ratio(a: str, b: str) -> str:
        """Ratio of medians, and the median of the per-rep ratios (each rep ran both
        side by side: robust to load that changes between reps)."""
        if a not in m or b not in m:
            return "-"
        return f"{m[a] / m[b]:.2f}x (paired {_paired(r['samples_s'], a, b):.2f}x)"

    bare = "bare docker run --rm (python -c 'import openai')"
    bare_sc = "bare docker run --rm --runtime runsc (python -c 'import openai')"
    lines = [
        "# Sandbox latency: cold, warm pool, runc and gVisor",
        "",
        f"Command: `{r['command']}` ({r['seconds']} s, {r['reps']} interleaved reps, median; "
        f"load average {' '.join(r.get('load_average_start') or [])} at the start, "
        f"{' '.join(r['load_average'])} at the end, on 2 shared cores).",
        "",
        "| case | median ms |",
        "|---|---:|",
        *(f"| {k} | {v * 1000:.0f} |" for k, v in m.items()),
        "",
        f"- cold `mas2c run` (CLI) / bare `docker run` + `import openai`: "
        f"{ratio('mas2c run --sandbox docker (CLI)', bare)} (runc), "
        f"{ratio('mas2c run --sandbox docker --runtime runsc (CLI)', bare_sc)} (runsc)",
        f"- cold in-process run / bare `docker run` + `import openai`: "
        f"{ratio('run_system docker (in-process)', bare)} (runc), "
        f"{ratio('run_system docker runsc (in-process)', bare_sc)} (runsc)",
        f"- runsc / runc: bare {ratio(bare_sc, bare)}, `mas2c run` "
        f"{ratio('mas2c run --sandbox docker --runtime runsc (CLI)', 'mas2c run --sandbox docker (CLI)')}",
    ]
    for rt in r["warm_p50_s"]:
        lines.append(
            f"- warm pool ({rt}, {len(r['warm_s'][rt])} runs, in-process `run_system`): "
            f"p50 {r['warm_p50_s'][rt] * 1000:.0f} ms, p95 {r['warm_p95_s'][rt] * 1000:.0f} ms"
        )
    if "runc" in r["warm_p50_s"] and "runsc" in r["warm_p50_s"]:
        lines.append(
            f"- warm runsc / runc p50: {r['warm_p50_s']['runsc'] / r['warm_p50_s']['runc']:.2f}x"
        )
    tp = r.get("throughput") or {}
    if tp:
        first = next(iter(tp.values()))
        lines += [
            "",
            f"Throughput: {first['runs']} trivial runs per configuration, {first['workers']} "
            f"workers, configurations interleaved in batches of {r['throughput_batch']}:",
            "",
            "| configuration | runs | seconds | runs/s | served (warm/cold) |",
            "|---|---:|---:|---:|---|",
            *(
                f"| {name} | {t['runs']} | {t['seconds']:.1f} | {t['runs_per_s']:.2f} | "
                + ", ".join(f"{k} {v}" for k, v in t["served"].items())
                + " |"
                for name, t in tp.items()
            ),
            "",
        ]
        for rt in ("runc", "runsc"):
            if f"pool/{rt}" in tp and f"cold/{rt}" in tp:
                ratio = tp[f"pool/{rt}"]["runs_per_s"] / tp[f"cold/{rt}"]["runs_per_s"]
                lines.append(f"- pool / cold throughput ({rt}): {ratio:.2f}x")
        for mode in ("pool", "cold"):
            if f"{mode}/runsc" in tp and f"{mode}/runc" in tp:
                ratio = tp[f"{mode}/runsc"]["runs_per_s"] / tp[f"{mode}/runc"]["runs_per_s"]
                lines.append(f"- runsc / runc throughput ({mode}): {ratio:.2f}x")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warm-runs", type=int, default=50)
    parser.add_argument("--throughput-runs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="concurrent runs (throughput)")
    parser.add_argument("--batch", type=int, default=25, help="runs per turn (throughput)")
    parser.add_argument(
        "--only", choices=["latency", "warm", "throughput"], action="append", help="parts to run"
    )
    parser.add_argument("--out", default=str(HERE / "results" / "sandbox.json"))
    args = parser.parse_args()

    status = sandbox.status()
    docker_ok = bool(status["daemon"]["reachable"]) and bool(status["image"]["present"])
    runsc = docker_ok and "runsc" in status["runtimes"]
    warm: dict[str, list[float]] = {}
    tput: dict[str, dict[str, Any]] = {}
    parts = set(args.only or ["latency", "warm", "throughput"])
    if not docker_ok:
        print(f"sandbox: Docker unavailable ({status}); docker rows are skipped", file=sys.stderr)
    image = sandbox.DEFAULT_IMAGE
    mas2c = str(Path(sys.executable).parent / "mas2c")
    work = Path(tempfile.mkdtemp(prefix="mas2c-bench-sandbox-"))
    samples: dict[str, list[float]] = {}
    phases: list[dict[str, float]] = []
    started = time.time()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    try:
        spec_path = work / "trivial.yaml"
        spec_path.write_text(TRIVIAL, "utf-8")
        build = work / "build"
        compile_spec(load_spec(spec_path)).write(build)
        input_path = work / "in.json"
        input_path.write_text(json.dumps({"question": "2+2?"}), "utf-8")
        with LLMTestServer() as server:
            llm = LLMConfig(url=server.base_url, api_key="test")
            counter = iter(range(1_000_000))
            pools: dict[str, list[str]] = {}

            def in_process(backend: Any, runtime: str | None = None) -> Callable[[], None]:
                def action() -> None:
                    saved = os.environ.get(sandbox.RUNTIME_ENV)
                    if runtime:
                        os.environ[sandbox.RUNTIME_ENV] = runtime
                    try:
                        outcome = run_system(
                            build,
                            input_path,
                            work / f"run-{next(counter)}",
                            backend=backend,
                            llm=llm,
                            on_warning=lambda _m: None,
                        )
                    finally:
                        os.environ.pop(sandbox.RUNTIME_ENV, None)
                        if saved is not None:
                            os.environ[sandbox.RUNTIME_ENV] = saved
                    if not outcome.ok:
                        raise RuntimeError(f"run failed: {outcome.result}")
                    pools.setdefault(runtime or "runc", []).append(str(outcome.sandbox.get("pool")))

                return action

            def cli(backend: str, runtime: str | None = None) -> Callable[[], None]:
                def action() -> None:
                    extra = ["--no-pool"] if backend == "docker" else []
                    extra += ["--runtime", runtime] if runtime else []
                    run_cmd(
                        [
                            mas2c,
                            "run",
                            str(build),
                            "--input",
                            str(input_path),
                            "--sandbox",
                            backend,
                            "--llm",
                            server.base_url,
                            "--run-dir",
                            str(work / f"run-{next(counter)}"),
                            *extra,
                        ]
                    )()

                return action

            cases: dict[str, Callable[[], None]] = {
                "bare subprocess (python -c pass)": run_cmd([sys.executable, "-c", "pass"]),
                "bare subprocess (python -c 'import openai')": run_cmd(
                    [sys.executable, "-c", "import openai, httpx"]
                ),
                "bare subprocess (python -c 'import openai; os._exit(0)')": run_cmd(
                    [sys.executable, "-c", "import os, openai, httpx; os._exit(0)"]
                ),
                "mas2c run --sandbox unisolated (CLI)": cli("unisolated"),
                "run_system unisolated (in-process)": in_process("unisolated"),
            }
            if docker_ok:
                cases.update(
                    {
                        "bare docker run --rm (python -c pass)": run_cmd(
                            [
                                "docker",
                                "run",
                                "--rm",
                                "--network",
                                "none",
                                image,
                                "python",
                                "-c",
                                "pass",
                            ]
                        ),
                        "bare docker run --rm (python -c 'import openai')": run_cmd(
                            [
                                "docker",
                                "run",
                                "--rm",
                                "--network",
                                "none",
                                image,
                                "python",
                                "-c",
                                "import openai, httpx",
                            ]
                        ),
                        "mas2c run --sandbox docker (CLI)": cli("docker"),
                        "run_system docker (in-process)": in_process("docker"),
                    }
                )
            if runsc:
                cases.update(
                    {
                        "bare docker run --rm --runtime runsc (python -c 'import openai')": run_cmd(
                            [
                                "docker",
                                "run",
                                "--rm",
                                "--runtime",
                                "runsc",
                                "--network",
                                "none",
                                image,
                                "python",
                                "-c",
                                "import openai, httpx",
                            ]
                        ),
                        "mas2c run --sandbox docker --runtime runsc (CLI)": cli("docker", "runsc"),
                        "run_system docker runsc (in-process)": in_process("docker", "runsc"),
                    }
                )
            runtimes = ["runc", "runsc"] if runsc else ["runc"]
            if "latency" in parts:
                for action in cases.values():  # warm-up: page cache, .pyc files, image layers
                    action()
                for rep in range(args.reps):
                    for name, action in cases.items():
                        samples.setdefault(name, []).append(timed(action))
                    if docker_ok:
                        phases.append(docker_phases(image))
                    print(f"sandbox: rep {rep + 1}/{args.reps} done", file=sys.stderr)
            if docker_ok and args.warm_runs > 0 and "warm" in parts:
                warm = warm_runs(args.warm_runs, runtimes, in_process, image)
            if docker_ok and args.throughput_runs > 0 and "throughput" in parts:

                def one_run() -> str:
                    outcome = run_system(
                        build,
                        input_path,
                        work / f"run-{next(counter)}",
                        backend="docker",
                        llm=llm,
                        on_warning=lambda _m: None,
                    )
                    if not outcome.ok:
                        raise RuntimeError(f"run failed: {outcome.result}")
                    return "warm" if outcome.sandbox.get("pool") in ("warm", "service") else "cold"

                tput = throughput(
                    args.throughput_runs, args.workers, args.batch, runtimes, one_run, image
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in samples.items()}
    phase_medians = (
        {k: statistics.median(p[k] for p in phases) for k in phases[0]} if phases else {}
    )
    result = {
        "benchmark": "sandbox",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "command": " ".join(["python", "benchmarks/bench_sandbox.py", *sys.argv[1:]]),
        "reps": args.reps,
        "docker": docker_ok,
        "docker_version": status["daemon"].get("version"),
        "medians_s": medians,
        "samples_s": samples,
        "docker_phases_median_s": phase_medians,
        "warm_s": warm,
        "warm_p50_s": {rt: _pct(v, 50) for rt, v in warm.items()},
        "warm_p95_s": {rt: _pct(v, 95) for rt, v in warm.items()},
        "pools": {rt: sorted(set(v)) for rt, v in pools.items()},
        "throughput": tput,
        "throughput_batch": args.batch,
        "load_average_start": load_start,
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
    }
    report = markdown(result)
    Path(args.out).with_suffix(".md").write_text(report, "utf-8")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    print(f"sandbox: wrote {out}", file=sys.stderr)
    for name, value in medians.items():
        print(f"  {name:42} {value * 1000:8.0f} ms", file=sys.stderr)
    load = " ".join(result["load_average_start"]) + " -> " + " ".join(result["load_average"])
    print(f"sandbox: RATIOS (one interleaved run; load average {load}):", file=sys.stderr)
    for line in ratio_lines(report):
        print(f"  {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
