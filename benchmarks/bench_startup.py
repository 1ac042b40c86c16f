"""Start-up of compiled packages against fan-out width (issue 12: flat in width).

    .venv/bin/python benchmarks/bench_startup.py [--runs 7] [--widths 1,100] [--compiler DIR]

Compiles the `fanout` topology (benchmarks/topology_specs.py) at each width, runs the
package (`python -m <pkg>`) against the loopback test server, and measures start-up:
the time from spawning the process to its first step starting (the first `step_start`
trace event, read live from a FIFO): interpreter start, imports, reading the input and
the compiler's tables, preparing the run. Reported as wall time and as the CPU time the
process had used by then (from /proc when the event arrives: robust against a busy
machine, unlike wall time). Widths are interleaved; median of `--runs`. `--compiler DIR` compiles with the mas2c found in DIR (an older
checkout, for a before/after comparison). Results: results/startup.json and
results/startup.md. The target is 100-wide within 1.1x of 1-wide.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from topology_specs import spec_data  # noqa: E402

from mas2c.testserver import LLMTestServer  # noqa: E402

_COMPILE = """
import json, sys
from pathlib import Path
from mas2c.compile import compile_spec
from mas2c.lang.spec import Spec
compile_spec(Spec.model_validate(json.loads(sys.argv[1]))).write(Path(sys.argv[2]))
"""


def compile_width(width: int, out: Path, compiler: Path | None) -> str:
    data = spec_data("fanout", width)
    env = {**os.environ, "PYTHONPATH": str(compiler or ROOT)}
    subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps(data), str(out)], check=True, env=env
    )
    return "mas2c_" + data["name"].replace("-", "_")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a running process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_up(build: Path, package: str, server: LLMTestServer) -> tuple[float, float]:
    """(wall s, CPU s) from spawn to the first step_start trace event."""
    (build / "in.json").write_text(json.dumps({"question": "q"}))
    fifo = build / "trace.fifo"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(build),
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "test",
    }
    started = time.monotonic()
    cmd = [sys.executable, "-m", package, "--input", "in.json", "--output", "out.json"]
    proc = subprocess.Popen(
        [*cmd, "--trace", str(fifo)],
        cwd=build,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: tuple[float, float] | None = None
    with fifo.open(encoding="utf-8") as events:
        for line in events:  # drain to the end, so the writer never blocks
            if seen is None and '"event": "step_start"' in line:
                seen = (time.monotonic() - started, _cpu_seconds(proc.pid))
    if proc.wait(timeout=300) != 0 or seen is None:
        raise RuntimeError(f"{package} failed")
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--widths", default="1,100")
    parser.add_argument("--compiler", type=Path, help="a checkout whose mas2c compiles")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    results: dict[str, Any] = {"runs": args.runs, "compiler": str(args.compiler or ROOT)}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp, LLMTestServer() as server:
        packages = {}
        for width in widths:
            build = Path(tmp) / f"w{width}"
            packages[width] = (build, compile_width(width, build, args.compiler))
            start_up(*packages[width], server)  # warm the file cache
        samples: dict[int, list[tuple[float, float]]] = {w: [] for w in widths}
        for _ in range(args.runs):
            for width in widths:  # interleaved, so drift in the load hits both alike
                samples[width].append(start_up(*packages[width], server))
        for width in widths:
            walls, cpus = zip(*samples[width], strict=True)
            results[str(width)] = {
                "wall_median_s": round(statistics.median(walls), 4),
                "cpu_median_s": round(statistics.median(cpus), 4),
                "wall_s": [round(s, 4) for s in walls],
                "cpu_s": [round(s, 4) for s in cpus],
            }
    low, high = results[str(widths[0])], results[str(widths[-1])]
    results["cpu_ratio"] = round(high["cpu_median_s"] / low["cpu_median_s"], 3)
    results["wall_ratio"] = round(high["wall_median_s"] / low["wall_median_s"], 3)
    load = Path("/proc/loadavg").read_text().split()[:3]
    results["loadavg"] = load
    lines = [
        "| width | start-up CPU (median s) | start-up wall (median s) |",
        "| --- | --- | --- |",
        *(
            f"| {w} | {results[str(w)]['cpu_median_s']:.3f} | {results[str(w)]['wall_median_s']:.3f} |"
            for w in widths
        ),
        "",
        f"{widths[-1]}-wide / {widths[0]}-wide: CPU {results['cpu_ratio']:.2f}x, wall "
        f"{results['wall_ratio']:.2f}x (target <= 1.1x); load average {' '.join(load)}",
    ]
    (HERE / "results").mkdir(exist_ok=True)
    suffix = "" if args.compiler is None else "-before"
    (HERE / "results" / f"startup{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results" / f"startup{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
