"""Sandbox latency: a trivial `mas2c run` in Docker and in the local backend, against a bare
`docker run` and a bare subprocess.

    python benchmarks/bench_sandbox.py [--reps 10] [--out FILE]

The trivial system is one agent answering one prompt, against the loopback LLM test
server with no latency, so what is measured is the sandbox and the run's plumbing
(compile is done once beforehand; the run gets the build folder). Measured, interleaved,
median of --reps runs each:

* bare `python -c pass` (a subprocess of this venv's python), and `python -c "import openai,
  httpx"`: the floor of any program that talks to an LLM with the openai client (and the
  same ending in `os._exit(0)`, which skips the interpreter's finalization);
* bare `docker run --rm mas2c-sandbox:latest python -c pass` (docker CLI);
* `mas2c run BUILD --sandbox local` and `--sandbox docker` (the CLI, end to end);
* the same two in-process (`mas2c.run.run_system`), without the CLI's Python start-up;
* the Docker phases of a bare container with docker-py: create, start -> exit, remove
  (what a warm container pool could take off the critical path).
"""

from __future__ import annotations

import argparse
import json
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
from mas2c.run import LLMConfig, run_system  # noqa: E402
from mas2c.testserver import LLMTestServer  # noqa: E402
from mas2c.validate import load_spec  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=str(HERE / "results" / "sandbox.json"))
    args = parser.parse_args()

    status = sandbox.status()
    docker_ok = bool(status["daemon"]["reachable"]) and bool(status["image"]["present"])
    if not docker_ok:
        print(f"sandbox: Docker unavailable ({status}); docker rows are skipped", file=sys.stderr)
    image = sandbox.DEFAULT_IMAGE
    mas2c = str(Path(sys.executable).parent / "mas2c")
    work = Path(tempfile.mkdtemp(prefix="mas2c-bench-sandbox-"))
    samples: dict[str, list[float]] = {}
    phases: list[dict[str, float]] = []
    started = time.time()
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

            def in_process(backend: Any) -> Callable[[], None]:
                def action() -> None:
                    outcome = run_system(
                        build,
                        input_path,
                        work / f"run-{next(counter)}",
                        backend=backend,
                        llm=llm,
                        on_warning=lambda _m: None,
                    )
                    if not outcome.ok:
                        raise RuntimeError(f"run failed: {outcome.result}")

                return action

            def cli(backend: str) -> Callable[[], None]:
                def action() -> None:
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
                "mas2c run --sandbox local (CLI)": cli("local"),
                "run_system local (in-process)": in_process("local"),
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
                        "mas2c run --sandbox docker (CLI)": cli("docker"),
                        "run_system docker (in-process)": in_process("docker"),
                    }
                )
            for action in cases.values():  # warm-up: page cache, .pyc files, image layers
                action()
            for rep in range(args.reps):
                for name, action in cases.items():
                    samples.setdefault(name, []).append(timed(action))
                if docker_ok:
                    phases.append(docker_phases(image))
                print(f"sandbox: rep {rep + 1}/{args.reps} done", file=sys.stderr)
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
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    print(f"sandbox: wrote {out}", file=sys.stderr)
    for name, value in medians.items():
        print(f"  {name:42} {value * 1000:8.0f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
