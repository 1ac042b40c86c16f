"""Orchestration overhead: mas2c's compiled packages against LangGraph, AutoGen and a hand-written
asyncio + openai program, on the same topologies, against ONE loopback LLM test server.

    python benchmarks/bench_overhead.py [--reps 5] [--sweep-reps 3] [--latencies 0.05,0]
                                        [--widths 1,2,5,10,20,50,100] [--out FILE]

Each system runs as its own process, from its own virtual environment
(benchmarks/.venvs/<name>, made by benchmarks/setup_venvs.sh), with OPENAI_BASE_URL
pointing at the test server. For every run the harness records:

* spawn: time.monotonic() just before the process is started;
* first request: when the test server received the run's first chat request;
* exit: when os.wait4() returned (which also gives ru_maxrss, the child's peak RSS).

cold start = first request - spawn; wall = exit - first request; ideal = the critical
path (sequential LLM depth x latency); per-call overhead = (wall - ideal) / calls.
All runs are interleaved (rep by rep, system by system) so that machine noise lands
on every system alike; the medians are reported and compared with the hand-written
baseline. The compiled mas2c package runs in the same plain venv as the baseline
(openai and its httpx only: it needs nothing else).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))

import common as C  # noqa: E402
from topology_specs import spec_data  # noqa: E402

from mas2c.compile import compile_spec  # noqa: E402
from mas2c.lang.spec import Spec  # noqa: E402
from mas2c.testserver import ChatRequest, LLMTestServer, ReplyLike, default_responder  # noqa: E402

VENVS = HERE / ".venvs"
PEERS = HERE / "peers"
SYSTEMS = ("handwritten", "mas2c", "langgraph", "autogen")
VENV_OF = {"handwritten": "plain", "mas2c": "plain", "langgraph": "langgraph", "autogen": "autogen"}
IMPORT_CHECK = {
    "handwritten": "import openai",
    "mas2c": "import openai, httpx",
    "langgraph": "import langgraph, langchain_openai",
    "autogen": "import autogen_agentchat, autogen_ext.models.openai",
}
VERSIONS = {
    "plain": ["openai", "httpx"],
    "langgraph": ["langgraph", "langchain-openai", "langchain-core", "openai", "httpx"],
    "autogen": ["autogen-agentchat", "autogen-ext", "autogen-core", "openai", "httpx"],
}


# Starts the measured program and reports its spawn time, exit time and peak RSS. A small
# go-between (python -I -S, ~9 MB) because a child's ru_maxrss counts the RSS of the process
# it was forked from: forked from this harness, every program would weigh at least as much as
# the harness itself. CLOCK_MONOTONIC is system-wide, so its times compare with the server's.
LAUNCHER = r"""
import json, os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
spawn = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
end = time.monotonic()
with open(report, "w") as f:
    json.dump({"spawn": spawn, "end": end, "exit": os.waitstatus_to_exitcode(status),
               "maxrss_kb": usage.ru_maxrss}, f)
"""


class Recorder:
    """The server's responder: answers like the default, notes arrival times."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.arrivals: list[float] = []

    def reset(self) -> None:
        with self._lock:
            self.arrivals = []

    def __call__(self, req: ChatRequest) -> ReplyLike:
        now = time.monotonic()
        with self._lock:
            self.arrivals.append(now)
        return default_responder(req)


@dataclass
class Sample:
    system: str
    topology: str
    width: int
    latency_s: float
    rep: int
    ok: bool
    calls: int
    expected_calls: int
    depth: int
    total_s: float
    cold_start_s: float
    wall_s: float
    maxrss_kb: int
    error: str = ""
    arrivals: list[float] = field(default_factory=list)  # request arrivals, s after spawn


def python_of(system: str) -> Path:
    return VENVS / VENV_OF[system] / "bin" / "python"


def check_system(system: str) -> str | None:
    """None when the system's venv can run it, else why not."""
    python = python_of(system)
    if not python.exists():
        return (
            f"no venv at {python.parent.parent} (benchmarks/setup_venvs.sh failed or was not run)"
        )
    proc = subprocess.run(
        [str(python), "-c", IMPORT_CHECK[system]], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        return f"import failed: {proc.stderr.strip().splitlines()[-1:]}"
    return None


def versions(venv: str) -> dict[str, str]:
    python = VENVS / venv / "bin" / "python"
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {'python': sys.version.split()[0]}\n"
        f"for name in {VERSIONS[venv]!r}:\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
        return dict(json.loads(proc.stdout))
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}


class Builds:
    """Compiled mas2c packages, one per (topology, width), in a scratch folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[tuple[str, int], tuple[Path, str]] = {}

    def get(self, name: str, width: int) -> tuple[Path, str]:
        key = (name, width)
        if key not in self._done:
            spec = Spec.model_validate(spec_data(name, width if name == "fanout" else None))
            build = compile_spec(spec)
            folder = self.root / f"build-{name}-{width}"
            build.write(folder)
            self._done[key] = (folder, build.package)
        return self._done[key]


def command(
    system: str, name: str, width: int, builds: Builds, work: Path
) -> tuple[list[str], dict[str, str]]:
    python = str(python_of(system))
    env = {
        "PATH": f"{python_of(system).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "LANG": "C.UTF-8",
        "OPENAI_API_KEY": "test",
    }
    if system == "mas2c":
        folder, package = builds.get(name, width)
        (work / "in.json").write_text(json.dumps({"question": C.QUESTION}), "utf-8")
        env["PYTHONPATH"] = str(folder)
        argv = [python, "-m", package, "--input", str(work / "in.json")]
        argv += ["--output", str(work / "out.json"), "--trace", str(work / "trace.jsonl")]
        return argv, env
    script = {
        "handwritten": "handwritten.py",
        "langgraph": "langgraph_impl.py",
        "autogen": "autogen_impl.py",
    }
    argv = [python, str(PEERS / script[system]), "--topology", name]
    if name == "fanout":
        argv += ["--width", str(width)]
    return argv, env


def measure(
    server: LLMTestServer,
    rec: Recorder,
    system: str,
    name: str,
    width: int,
    rep: int,
    builds: Builds,
    timeout_s: float = 300.0,
) -> Sample:
    topo = C.topology(name, width if name == "fanout" else None)
    with tempfile.TemporaryDirectory(prefix="mas2c-overhead-") as tmp:
        work = Path(tmp)
        argv, env = command(system, name, width, builds, work)
        env["OPENAI_BASE_URL"] = server.base_url
        server.reset_counters()
        rec.reset()
        stderr_path = work / "stderr.txt"
        report = work / "launch.json"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *argv],
                env=env,
                cwd=work,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:
            launch = json.loads(report.read_text("utf-8"))
        except (OSError, ValueError):
            launch = {"spawn": 0.0, "end": 0.0, "exit": -1, "maxrss_kb": 0}
        spawn, end = float(launch["spawn"]), float(launch["end"])
        returncode = int(launch["exit"])
        arrivals = sorted(rec.arrivals)
        error = ""
        ok = returncode == 0
        if system == "mas2c" and ok:
            out = json.loads((work / "out.json").read_text("utf-8"))
            ok = out.get("status") == "ok"
            error = "" if ok else json.dumps(out.get("error"))[:300]
        if not ok and not error:
            tail = stderr_path.read_text("utf-8", errors="replace").strip().splitlines()[-3:]
            error = f"exit {returncode}: {' | '.join(tail)}"[:400]
        first = arrivals[0] if arrivals else end
        return Sample(
            system=system,
            topology=name,
            width=topo.calls if name == "fanout" else 0,
            latency_s=server.latency_s,
            rep=rep,
            ok=ok,
            calls=len(arrivals),
            expected_calls=topo.calls,
            depth=topo.depth,
            total_s=end - spawn,
            cold_start_s=first - spawn,
            wall_s=end - first,
            maxrss_kb=int(launch["maxrss_kb"]),
            error=error,
            arrivals=[round(a - spawn, 5) for a in arrivals],
        )


def summarize(samples: list[Sample]) -> dict[str, Any]:
    good = [s for s in samples if s.ok]
    if not good:
        return {
            "ok": False,
            "runs": len(samples),
            "error": samples[0].error if samples else "no runs",
        }
    s0 = good[0]
    ideal = s0.depth * s0.latency_s
    wall = statistics.median(s.wall_s for s in good)
    # Steady state, from the request arrivals: the gap between one call's arrival and the
    # next one's, minus the latency (sequential topologies only, where calls follow calls);
    # and the tail: from the last response to the process's exit.
    gaps = [
        statistics.median(b - a for a, b in zip(s.arrivals, s.arrivals[1:], strict=False))
        - s.latency_s
        for s in good
        if len(s.arrivals) > 1
    ]
    tails = [s.total_s - (s.arrivals[-1] + s.latency_s) for s in good if s.arrivals]
    return {
        "ok": True,
        "runs": len(samples),
        "failed_runs": len(samples) - len(good),
        "calls": statistics.median(s.calls for s in good),
        "expected_calls": s0.expected_calls,
        "depth": s0.depth,
        "ideal_s": ideal,
        "wall_s": wall,
        "wall_over_ideal": wall / ideal if ideal else None,
        "overhead_per_call_ms": (wall - ideal) / s0.expected_calls * 1000,
        "cold_start_s": statistics.median(s.cold_start_s for s in good),
        "total_s": statistics.median(s.total_s for s in good),
        "maxrss_mb": statistics.median(s.maxrss_kb for s in good) / 1024,
        "step_gap_ms": statistics.median(gaps) * 1000
        if gaps and s0.depth == s0.expected_calls
        else None,
        "tail_s": statistics.median(tails) if tails else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per cell (median)")
    parser.add_argument("--sweep-reps", type=int, default=3, help="repetitions per fan-out width")
    parser.add_argument("--latencies", default="0.05,0", help="server latencies in seconds")
    parser.add_argument(
        "--widths", default="1,2,5,10,20,50,100", help="fan-out widths for the plot"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--topologies", default=",".join(C.TOPOLOGIES))
    parser.add_argument("--out", default=str(HERE / "results" / "overhead.json"))
    args = parser.parse_args()

    latencies = [float(x) for x in args.latencies.split(",") if x.strip()]
    widths = [int(x) for x in args.widths.split(",") if x.strip()]
    topologies = [t for t in args.topologies.split(",") if t]
    systems, unavailable = [], {}
    for system in args.systems.split(","):
        problem = check_system(system)
        if problem:
            unavailable[system] = problem
            print(f"overhead: {system} unavailable: {problem}", file=sys.stderr)
        else:
            systems.append(system)
    if "handwritten" not in systems:
        print(
            "overhead: the hand-written baseline cannot run; nothing to compare with",
            file=sys.stderr,
        )
        return 1

    scratch = Path(tempfile.mkdtemp(prefix="mas2c-overhead-builds-"))
    builds = Builds(scratch)
    rec = Recorder()
    samples: list[Sample] = []
    sweep: list[Sample] = []
    started = time.time()
    try:
        with LLMTestServer(rec) as server:
            # Warm-up (not measured): fills the page cache and writes .pyc files.
            for system in systems:
                server.latency_s = 0.0
                s = measure(server, rec, system, "sc", 0, -1, builds)
                print(f"overhead: warm-up {system}: {'ok' if s.ok else s.error}", file=sys.stderr)
            total = args.reps * len(latencies) * len(topologies) * len(systems)
            done = 0
            for rep in range(args.reps):
                for latency in latencies:
                    server.latency_s = latency
                    for name in topologies:
                        width = C.FANOUT_WIDTH if name == "fanout" else 0
                        for system in systems:
                            s = measure(server, rec, system, name, width, rep, builds)
                            samples.append(s)
                            done += 1
                            flag = "" if s.ok else f" FAILED {s.error}"
                            print(
                                f"overhead: [{done}/{total}] {system:11} {name:7} {latency * 1000:3.0f} ms "
                                f"wall {s.wall_s:6.3f}s cold {s.cold_start_s:5.2f}s calls {s.calls}{flag}",
                                file=sys.stderr,
                            )
            server.latency_s = latencies[0] if latencies else 0.05
            total = args.sweep_reps * len(widths) * len(systems)
            done = 0
            for rep in range(args.sweep_reps):
                for width in widths:
                    for system in systems:
                        s = measure(server, rec, system, "fanout", width, rep, builds)
                        sweep.append(s)
                        done += 1
                        print(
                            f"overhead: sweep [{done}/{total}] {system:11} width {width:3} "
                            f"wall {s.wall_s:6.3f}s{'' if s.ok else ' FAILED ' + s.error}",
                            file=sys.stderr,
                        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    cells: dict[str, Any] = {}
    for latency in latencies:
        for name in topologies:
            for system in systems:
                group = [
                    s
                    for s in samples
                    if s.system == system and s.topology == name and s.latency_s == latency
                ]
                cells[f"{system}|{name}|{latency:g}"] = summarize(group)
    sweep_cells: dict[str, Any] = {}
    for width in widths:
        for system in systems:
            group = [s for s in sweep if s.system == system and s.width == width]
            sweep_cells[f"{system}|{width}"] = summarize(group)

    result = {
        "benchmark": "overhead",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "command": " ".join(["python", "benchmarks/bench_overhead.py", *sys.argv[1:]]),
        "reps": args.reps,
        "sweep_reps": args.sweep_reps,
        "latencies_s": latencies,
        "widths": widths,
        "sweep_latency_s": latencies[0] if latencies else 0.05,
        "systems": systems,
        "unavailable": unavailable,
        "topologies": {n: asdict(C.topology(n)) for n in topologies},
        "versions": {v: versions(v) for v in sorted({VENV_OF[s] for s in systems})},
        "host_python": platform.python_version(),
        "cells": cells,
        "sweep": sweep_cells,
        "samples": [asdict(s) for s in samples],
        "sweep_samples": [asdict(s) for s in sweep],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    print(f"overhead: wrote {out} in {result['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
