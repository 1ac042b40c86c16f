"""Compile scaling: how long `mas2c compile` takes as specs grow in steps and in agents.

    python benchmarks/bench_compile.py [--reps 3] [--steps 10,50,200,1000] [--agents 1,10,100]

For each (steps, agents) with agents <= steps: a spec of `steps` call steps, each one
reading the previous step's output, spread round-robin over `agents` agents. Measured
separately (median of --reps): load + validate the YAML (`load_spec`), compile
(`compile_spec`: templates, black through `mas2c.fastfmt` — once per member shape, the
shape cache emptied before every compile —, source map; the time inside black.format_str
is also reported) and write the package (`Build.write`). Beside it, interleaved, one
compile per cell with plain black over whole files (`compile_plain_black_s`, the
formatting before fastfmt) and a check that both give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import mas2c.compile as compile_module
from mas2c import fastfmt
from mas2c.compile import compile_spec
from mas2c.lang.validate import load_spec


class BlackTimer:
    """Wraps black.format_str as the compiler calls it, adding up the time spent in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._inner = compile_module.black.format_str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


HERE = Path(__file__).resolve().parent


def spec_text(steps: int, agents: int) -> str:
    data: dict[str, Any] = {
        "spec_version": "1",
        "name": f"scale-{steps}-{agents}",
        "description": f"{steps} chained call steps over {agents} agents (compile benchmark).",
        "inputs": {"question": {"type": "string"}},
        "outputs": {"answer": f"out_{steps}"},
        "models": {"m": {"model": "gpt-4o-mini"}},
        "agents": {
            f"agent_{a}": {
                "role": f"Specialist number {a}",
                "instructions": f"You are specialist {a}. Improve the text you are given.",
                "model": "m",
            }
            for a in range(1, agents + 1)
        },
        "workflow": [
            {
                "id": f"step_{i}",
                "kind": "call",
                "agent": f"agent_{(i - 1) % agents + 1}",
                "prompt": "Improve: {{ %s }}" % ("question" if i == 1 else f"out_{i - 1}"),
                "out": f"out_{i}",
            }
            for i in range(1, steps + 1)
        ],
    }
    return yaml.safe_dump(data, sort_keys=False)


def _plain_black_compile(spec: Any) -> tuple[float, dict[str, bytes]]:
    """One compile with whole-file black (the compiler before fastfmt): seconds and files."""
    fast = fastfmt.format_str
    fastfmt.format_str = lambda text, mode: compile_module.black.format_str(text, mode=mode)  # type: ignore[assignment]
    try:  # the runtime is formatted once per process either way (compile's own cache)
        t0 = time.perf_counter()
        files = compile_spec(spec).files
        return time.perf_counter() - t0, files
    finally:
        fastfmt.format_str = fast  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", default="10,50,200,1000")
    parser.add_argument("--agents", default="1,10,100")
    parser.add_argument("--out", default=str(HERE / "results" / "compile.json"))
    parser.add_argument(
        "--no-plain", action="store_true", help="skip the plain-black comparison compile"
    )
    args = parser.parse_args()
    steps_list = [int(x) for x in args.steps.split(",")]
    agents_list = [int(x) for x in args.agents.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mas2c-bench-compile-"))
    cells: list[dict[str, Any]] = []
    started = time.time()
    timer = BlackTimer()
    compile_module.black.format_str = timer  # type: ignore[assignment]
    try:
        warm = work / "warm.yaml"  # imports, template loading, black's first-use set-up
        warm.write_text(spec_text(5, 1), "utf-8")
        compile_spec(load_spec(warm))
        for steps in steps_list:
            for agents in agents_list:
                if agents > steps:
                    continue
                path = work / f"spec-{steps}-{agents}.yaml"
                path.write_text(spec_text(steps, agents), "utf-8")
                load_s, compile_s, write_s, black_s, plain_s = [], [], [], [], []
                cpu_s: list[float] = []  # validate + compile, CPU seconds of this process
                lines = files = 0
                same = True
                for rep in range(args.reps):
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    spec = load_spec(path)
                    t1 = time.perf_counter()
                    timer.seconds = 0.0
                    fastfmt._shapes.clear()  # cold: no shape from an earlier compile
                    build = compile_spec(spec)
                    t2 = time.perf_counter()
                    cpu_s.append(time.process_time() - c0)
                    black_s.append(timer.seconds)
                    build.write(work / f"build-{steps}-{agents}-{rep}")
                    t3 = time.perf_counter()
                    load_s.append(t1 - t0)
                    compile_s.append(t2 - t1)
                    write_s.append(t3 - t2)
                    files = len(build.files)
                    if rep == 0 and not args.no_plain:
                        plain_s_one, plain_files = _plain_black_compile(spec)
                        plain_s.append(plain_s_one)
                        same = plain_files == build.files
                    lines = sum(
                        data.count(b"\n")
                        for name, data in build.files.items()
                        if name.endswith(".py")
                    )
                cell = {
                    "steps": steps,
                    "agents": agents,
                    "spec_bytes": path.stat().st_size,
                    "files": files,
                    "python_lines": lines,
                    "load_validate_s": statistics.median(load_s),
                    "compile_s": statistics.median(compile_s),
                    "black_s": statistics.median(black_s),
                    "write_s": statistics.median(write_s),
                    "compile_plain_black_s": statistics.median(plain_s) if plain_s else None,
                    "same_bytes_as_plain_black": same if plain_s else None,
                }
                cell["total_s"] = cell["load_validate_s"] + cell["compile_s"] + cell["write_s"]
                cell["validate_compile_cpu_s"] = statistics.median(cpu_s)
                cell["ms_per_step"] = cell["total_s"] / steps * 1000
                cells.append(cell)
                print(
                    f"compile: {steps:5} steps {agents:4} agents: validate {cell['load_validate_s']:.3f}s "
                    f"compile {cell['compile_s']:.3f}s (black {cell['black_s']:.3f}s; plain black "
                    f"{cell['compile_plain_black_s'] or 0:.3f}s, same bytes: {cell['same_bytes_as_plain_black']}) "
                    f"write {cell['write_s']:.3f}s ({lines} lines); validate+compile CPU "
                    f"{cell['validate_compile_cpu_s']:.3f}s",
                    file=sys.stderr,
                )
    finally:
        compile_module.black.format_str = timer._inner  # type: ignore[assignment]
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "compile",
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "command": " ".join(["python", "benchmarks/bench_compile.py", *sys.argv[1:]]),
        "reps": args.reps,
        "cells": cells,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    print(f"compile: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
