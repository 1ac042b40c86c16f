"""Requests per second of a trivial system served over HTTP, against the same system run as
one CLI process per request, at a set LLM latency (default 50 ms).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_serve.py [--requests 200] [--concurrency 1,8,32]
        [--latency 0.05] [--cli-requests 40]

The system is one `call` step (one LLM call per request), compiled into a temporary
folder. Both forms talk to one loopback `LLMTestServer`. For each concurrency C:

- **http**: `python -m <package> serve --max-concurrency C` (uvicorn, one process);
  C client tasks (httpx) send `POST /runs/wait` until N requests are answered.
- **cli**: C worker threads each start `python -m <package> --input F --output F`
  processes back to back until N runs are done.

RPS = requests / wall time; latency percentiles per request. Every answer is checked
(status ok, the expected output). Writes `benchmarks/results/serve.json` and
`benchmarks/results/serve.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from mas2c.compile import compile_spec  # noqa: E402
from mas2c.lang.validate import load_spec  # noqa: E402
from mas2c.testserver import ChatRequest, LLMTestServer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SPEC = """\
spec_version: "1"
name: serve-bench
description: One agent answers once (the trivial system of the service benchmark).
inputs:
  text: {type: string}
outputs:
  answer: answer
models:
  m: {model: test-model}
agents:
  echo: {role: Echo, instructions: Repeat the text., model: m}
workflow:
  - {id: answer, kind: call, agent: echo, prompt: "{{ text }}", out: answer}
budgets: {max_llm_calls: 2, timeout_s: 60}
"""
PACKAGE = "mas2c_serve_bench"


def echo(req: ChatRequest) -> str:
    return req.last_user


def _env(build: Path, llm: LLMTestServer) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(build.parent),
        "PYTHONPATH": str(build),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OPENAI_API_KEY": "bench",
        "OPENAI_BASE_URL": llm.base_url,
    }


def _summary(mode: str, conc: int, latencies: list[float], wall: float) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "mode": mode,
        "concurrency": conc,
        "requests": len(latencies),
        "wall_s": round(wall, 3),
        "rps": round(len(latencies) / wall, 2),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 1),
    }


def bench_http(build: Path, llm: LLMTestServer, conc: int, total: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", PACKAGE, "serve", "--port", "0", "--log-level", "warning"]
    cmd += ["--max-concurrency", str(conc), "--max-queue", str(conc)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_env(build, llm))
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready:
            raise SystemExit("the server printed no URL within 60 s")
        url = proc.stdout.readline().strip()

        async def run() -> tuple[list[float], float]:
            latencies: list[float] = []
            counter = iter(range(total))
            limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                await client.post("/runs/wait", json={"input": {"text": "warm-up"}})

                async def worker() -> None:
                    for i in counter:
                        t0 = time.perf_counter()
                        r = await client.post("/runs/wait", json={"input": {"text": f"r{i}"}})
                        doc = r.json()
                        if doc.get("status") != "ok" or doc["outputs"]["answer"] != f"r{i}":
                            raise SystemExit(f"bad answer: {r.status_code} {doc}")
                        latencies.append(time.perf_counter() - t0)

                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(conc)))
                return latencies, time.perf_counter() - t0

        latencies, wall = asyncio.run(run())
        return _summary("http", conc, latencies, wall)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def bench_cli(build: Path, llm: LLMTestServer, conc: int, total: int) -> dict[str, Any]:
    env = _env(build, llm)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-cli-"))
    latencies: list[float] = []
    counter = iter(range(total))
    lock = threading.Lock()
    failures: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            inp, out = work / f"in-{i}.json", work / f"out-{i}.json"
            inp.write_text(json.dumps({"text": f"r{i}"}))
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", PACKAGE, "--input", str(inp), "--output", str(out)],
                env=env,
                capture_output=True,
                check=False,
            )
            elapsed = time.perf_counter() - t0
            doc = json.loads(out.read_text()) if out.exists() else {}
            if proc.returncode != 0 or doc.get("outputs", {}).get("answer") != f"r{i}":
                failures.append(f"run {i}: exit {proc.returncode} {proc.stderr[-300:]!r}")
            with lock:
                latencies.append(elapsed)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failures:
        raise SystemExit("CLI runs failed: " + "; ".join(failures[:3]))
    return _summary("cli", conc, latencies, wall)


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Service throughput (`benchmarks/bench_serve.py`)",
        "",
        f"Command: `{meta['command']}`; {meta['date']}; {meta['machine']}; load average at "
        f"start `{meta['loadavg_start']}`, at end `{meta['loadavg_end']}`.",
        "",
        f"A one-call system, LLM latency {meta['latency_ms']:.0f} ms (loopback `LLMTestServer`). "
        "**http**: one `serve` process (`--max-concurrency C`), C httpx clients on "
        "`POST /runs/wait`; **cli**: C workers starting `python -m <package>` processes back "
        "to back. Every answer checked.",
        "",
        "| concurrency | mode | requests | wall (s) | requests/s | p50 (ms) | p90 (ms) | http / cli |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    for conc in sorted({r["concurrency"] for r in rows}):
        http, cli = by.get(("http", conc)), by.get(("cli", conc))
        ratio = f"{http['rps'] / cli['rps']:.1f}x" if http and cli else ""
        for row in (http, cli):
            if row is None:
                continue
            shown = ratio if row is http else ""
            lines.append(
                f"| {conc} | {row['mode']} | {row['requests']} | {row['wall_s']} | "
                f"**{row['rps']}** | {row['p50_ms']} | {row['p90_ms']} | {shown} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="HTTP requests per cell")
    parser.add_argument("--cli-requests", type=int, default=40, help="CLI runs per cell")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated")
    parser.add_argument("--latency", type=float, default=0.05, help="LLM seconds per call")
    parser.add_argument("--modes", default="http,cli", help="http, cli or both (default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    loadavg_start = Path("/proc/loadavg").read_text().strip()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        spec_file = Path(tmp) / "spec.yaml"
        spec_file.write_text(SPEC)
        build = Path(tmp) / "build"
        compile_spec(load_spec(spec_file)).write(build)
        with LLMTestServer(echo, latency_s=args.latency) as llm:
            for conc in levels:
                for mode, fn, n in (
                    ("http", bench_http, args.requests),
                    ("cli", bench_cli, args.cli_requests),
                ):
                    if mode not in args.modes.split(","):
                        continue
                    row = fn(build, llm, conc, max(n, conc))
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
    meta = {
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "latency_ms": args.latency * 1000,
        "loadavg_start": loadavg_start,
        "loadavg_end": Path("/proc/loadavg").read_text().strip(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = _markdown(meta, rows)
    (args.out / "serve.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
