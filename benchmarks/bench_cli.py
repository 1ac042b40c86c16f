"""CLI start-up: how long `mas2c --help` and `mas2c run BUILD` take before any work starts.

    python benchmarks/bench_cli.py [--reps 20]

Interleaved, --reps times each, in fresh interpreters (hyperfine-style; min, median, p90):

- `python -c pass`: the interpreter alone (the floor);
- `python -m mas2c.cli --help`;
- `run` start-up: `mas2c.cli` imported, `run BUILD --input in.json ...` parsed, and the
  modules a run of a built package needs imported (`mas2c.run`, `mas2c.sandbox`,
  `mas2c.gateway`) — everything before the run reads its files (httpx, which the
  gateway's upstream needs, is imported on a thread of its own while the sandbox starts);
- `run` to the sandbox: a real `mas2c run BUILD --sandbox unisolated` against the loopback test
  server, from process start to its "running ... in the unisolated sandbox" progress line
  (manifest read, input and endpoint checked, run folder and gateway up).

It also records which heavy modules each path imports (none of black, jinja2, libcst,
pydantic, yaml may appear) and the top of `python -X importtime` for the run path.
Writes benchmarks/results/cli.json and cli.md. Target (issue 14): --help and run
start-up <= 0.15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MEASURED = [ROOT]  # the mas2c checkout whose start-up is measured (--root)
HEAVY = ("black", "jinja2", "libcst", "pydantic", "yaml", "openai", "docker")

RUN_STARTUP = """
import sys
from mas2c.cli import build_parser
build_parser().parse_args(["run", sys.argv[1], "--input", sys.argv[2], "--sandbox", "unisolated"])
import mas2c.run, mas2c.sandbox, mas2c.gateway
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[3].split(",")))
print(",".join(heavy))
"""


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    # An installed mas2c has its bytecode compiled: without it every start compiles the
    # sources again (~60 ms for mas2c.sandbox alone), which is not what a user pays.
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    e["PYTHONPATH"] = os.pathsep.join([str(MEASURED[0]), *filter(None, [e.get("PYTHONPATH")])])
    e["OPENAI_API_KEY"] = "sk-bench"
    return e


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system, the process and what it waited for) and
    stdout. CPU time hardly moves with the machine's load; wall time does."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, _children_cpu() - cpu0, proc.stdout


def to_sandbox(cmd: list[str], cwd: Path) -> float:
    """Seconds from spawn to the run's 'running ... sandbox' line on stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    seen = None
    for line in proc.stderr:
        if seen is None and "sandbox" in line and "running" in line:
            seen = time.perf_counter() - t0
    if proc.wait() != 0 or seen is None:
        raise SystemExit(f"run failed or printed no progress: {cmd}")
    return seen


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "min": round(xs[0], 4),
        "median": round(statistics.median(xs), 4),
        "p90": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 4),
        "n": len(xs),
    }


def importtime(cmd: list[str], cwd: Path, top: int = 12) -> list[dict[str, Any]]:
    """The top-level imports of `cmd` by cumulative time (`python -X importtime`)."""
    proc = subprocess.run(
        [cmd[0], "-X", "importtime", *cmd[1:]], cwd=cwd, env=env(), capture_output=True, text=True
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cum_us, name = line[len("import time:") :].split("|")
        if not name.startswith("  "):  # a top-level import, not one nested in another
            rows.append({"module": name.strip(), "cumulative_ms": int(cum_us) / 1000})
    return sorted(rows, key=lambda r: -r["cumulative_ms"])[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="measure the mas2c in this checkout (before/after)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "cli.json")
    args = parser.parse_args()
    MEASURED[0] = args.root.resolve()
    sys.path.insert(0, str(ROOT))
    from mas2c.compile import compile_spec
    from mas2c.lang.validate import load_spec
    from mas2c.testserver import LLMTestServer

    py = sys.executable
    subprocess.run(
        [py, "-m", "compileall", "-q", str(MEASURED[0] / "mas2c")], env=env(), check=True
    )
    with tempfile.TemporaryDirectory(prefix="mas2c-bench-cli-") as tmp_text:
        tmp = Path(tmp_text)
        compile_spec(load_spec(ROOT / "specs" / "chain-of-thought.yaml")).write(tmp / "build")
        (tmp / "in.json").write_text(json.dumps({"question": "What is 2 + 2?"}))
        cases = {
            "python -c pass": [py, "-c", "pass"],
            "mas2c --help": [py, "-m", "mas2c.cli", "--help"],
            "mas2c run: start-up (import + parse)": [
                py,
                "-c",
                RUN_STARTUP,
                "build",
                "in.json",
                ",".join(HEAVY),
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        heavy: dict[str, str] = {}
        with LLMTestServer() as server:
            run_cmd = [py, "-m", "mas2c.cli", "run", "build", "--input", "in.json"]
            run_cmd += ["--sandbox", "unisolated", "--llm", server.base_url, "--run-dir"]
            sandbox_name = "mas2c run: to the sandbox (unisolated backend)"
            times[sandbox_name] = []
            for rep in range(args.reps):
                for name, cmd in cases.items():
                    seconds, cpu_s, out = timed(cmd, tmp)
                    times[name].append(seconds)
                    cpu[name].append(cpu_s)
                    if "start-up" in name:
                        heavy[name] = out.strip()
                times[sandbox_name].append(to_sandbox([*run_cmd, f"runs/{rep}"], tmp))
        imports = importtime(cases["mas2c run: start-up (import + parse)"], tmp)
    loadavg = (
        Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    )
    data = {
        "reps": args.reps,
        "loadavg": loadavg,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "results": {name: stats(xs) for name, xs in times.items()},
        "cpu": {name: stats(xs) for name, xs in cpu.items()},
        "heavy_modules_on_run_path": heavy.get("mas2c run: start-up (import + parse)", ""),
        "importtime_top": imports,
    }
    data["root"] = str(MEASURED[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    floor = data["results"]["python -c pass"]["median"]
    cpu_floor = data["cpu"]["python -c pass"]["median"]
    lines = [
        "| what | wall min s | wall median s | wall p90 s | wall median over `python -c pass` "
        "| CPU median s | CPU median over `python -c pass` |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in data["results"].items():
        c = data["cpu"].get(name)
        cpu_cells = f"{c['median']:.3f} | +{c['median'] - cpu_floor:.3f}" if c else "- | -"
        lines.append(
            f"| {name} | {s['min']:.3f} | {s['median']:.3f} | {s['p90']:.3f} | "
            f"+{s['median'] - floor:.3f} | {cpu_cells} |"
        )
    lines += [
        "",
        f"{args.reps} interleaved repetitions, fresh interpreters; load average {' '.join(loadavg)} "
        f"on {os.cpu_count()} CPUs; Python {data['python']}.",
        f"Heavy modules imported on the run path: {data['heavy_modules_on_run_path'] or 'none'} "
        f"(checked: {', '.join(HEAVY)}).",
        "",
        "Largest imports on the run path (`python -X importtime`, cumulative ms):",
        "",
        *(f"- {r['module']}: {r['cumulative_ms']:.1f}" for r in imports),
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
