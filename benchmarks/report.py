"""Writes benchmarks/RESULTS.md (and the fan-out plot) from benchmarks/results/*.json.

    python benchmarks/report.py        # run by benchmarks/run_all.sh, in the report venv

Standard library, plus matplotlib for the plot (skipped, and said so, without it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SYSTEM_NAMES = {
    "handwritten": "hand-written asyncio + openai",
    "mas2c": "mas2c (compiled package)",
    "langgraph": "LangGraph",
    "autogen": "AutoGen AgentChat",
}


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def sh(cmd: str) -> str:
    try:
        return subprocess.run(
            cmd, shell=True, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    start_load = (
        (RESULTS / "loadavg-start.txt").read_text().strip()
        if (RESULTS / "loadavg-start.txt").is_file()
        else "?"
    )
    end_file = RESULTS / "loadavg-end.txt"
    end_load = end_file.read_text().strip() if end_file.is_file() else sh("cat /proc/loadavg")
    first = load("overhead") or load("sandbox") or {}
    return [
        f"- `uname -a`: `{sh('uname -a')}`",
        f"- CPUs (`nproc`): {os.cpu_count() and sh('nproc')}; CPU model: {cpu}; memory: {mem}",
        f"- Docker: {sh('docker version --format {{.Server.Version}}') or 'not reachable'}; "
        f"host Python (mas2c venv): {platform.python_version()}",
        f"- Date: run started {first.get('started', '?')}; report written {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Load average (1, 5, 15 min) at the start: `{start_load}`; at the end: `{end_load}`",
    ]


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:.{digits}f}"
    return str(x)


def ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return float(a) / float(b)


def xr(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def geomean(values: list[float]) -> float | None:
    good = [v for v in values if v is not None and v > 0]
    if not good:
        return None
    return math.exp(sum(math.log(v) for v in good) / len(good))


# ------------------------------------------------------------------------------ overhead


def overhead_section(data: dict[str, Any], headline: list[str]) -> list[str]:
    systems = data["systems"]
    cells = data["cells"]
    out = [
        "## 1. Orchestration overhead",
        "",
        f"Command: `{data['command']}` ({data['seconds']:.0f} s; {data['reps']} repetitions per cell, medians; "
        f"all systems interleaved run by run against one `LLMTestServer` on loopback).",
        "",
        "Each system is its own process from its own venv. **cold start** = process spawn → the "
        "server receives the first chat request; **wall** = first request → process exit (the "
        "workflow, its teardown included); **ideal** = sequential LLM depth × latency; "
        "**overhead/call** = (wall − ideal) / calls; **peak RSS** = `ru_maxrss` of the program "
        "(from `wait4`, spawned through a 9 MB go-between so that the harness's own memory is not counted).",
        "",
    ]
    if data.get("unavailable"):
        for system, why in data["unavailable"].items():
            out.append(f"- **{system} could not run**: {why}")
        out.append("")
    out += ["Versions:", ""]
    for venv, versions in data.get("versions", {}).items():
        listed = ", ".join(f"{k} {v}" for k, v in versions.items())
        out.append(f"- venv `{venv}`: {listed}")
    out += ["", "Topologies (calls / critical-path depth):", ""]
    for name, topo in data["topologies"].items():
        out.append(f"- `{name}`: {topo['title']} ({topo['calls']} calls, depth {topo['depth']})")
    out.append("")
    for latency in data["latencies_s"]:
        ms = f"{latency * 1000:g} ms"
        out += [
            f"### Latency {ms} per call",
            "",
            "| topology | system | calls | ideal (s) | wall (s) | wall / ideal | overhead / call (ms) | "
            "cold start (s) | peak RSS (MB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in data["topologies"]:
            for system in systems:
                c = cells.get(f"{system}|{name}|{latency:g}")
                if not c or not c.get("ok"):
                    out.append(
                        f"| {name} | {system} | failed: {(c or {}).get('error', 'no data')[:80]} | | | | | | |"
                    )
                    continue
                calls = f"{c['calls']:g}" + (
                    ""
                    if c["calls"] == c["expected_calls"]
                    else f" (expected {c['expected_calls']})"
                )
                out.append(
                    f"| {name} | {system} | {calls} | {fmt(c['ideal_s'])} | {fmt(c['wall_s'], 3)} | "
                    f"{fmt(c['wall_over_ideal'])} | {fmt(c['overhead_per_call_ms'], 1)} | "
                    f"{fmt(c['cold_start_s'])} | {fmt(c['maxrss_mb'], 0)} |"
                )
        out += [
            "",
            f"Ratios to the hand-written baseline at {ms} (system ÷ baseline; below 1 is better):",
            "",
            "| topology | system | wall | overhead / call | cold start | peak RSS |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name in data["topologies"]:
            base = cells.get(f"handwritten|{name}|{latency:g}") or {}
            for system in systems:
                if system == "handwritten":
                    continue
                c = cells.get(f"{system}|{name}|{latency:g}") or {}
                if not c.get("ok") or not base.get("ok"):
                    continue
                out.append(
                    f"| {name} | {system} | {xr(ratio(c['wall_s'], base['wall_s']))} | "
                    f"{xr(ratio(c['overhead_per_call_ms'], base['overhead_per_call_ms']))} | "
                    f"{xr(ratio(c['cold_start_s'], base['cold_start_s']))} | "
                    f"{xr(ratio(c['maxrss_mb'], base['maxrss_mb']))} |"
                )
        out.append("")
        # the sequential chain's steady state
        chain = [(s, cells.get(f"{s}|chain|{latency:g}") or {}) for s in systems]
        if all(c.get("step_gap_ms") is not None for _, c in chain if c.get("ok")):
            gaps = ", ".join(
                f"{s} {fmt(c.get('step_gap_ms'), 1)} ms" for s, c in chain if c.get("ok")
            )
            tails = ", ".join(f"{s} {fmt(c.get('tail_s'), 2)} s" for s, c in chain if c.get("ok"))
            out += [
                f"Steady state in the chain at {ms}: time from one request's arrival to the next, "
                f"minus the latency (the per-step cost once everything is warm): {gaps}. "
                f"Teardown (last response → exit): {tails}.",
                "",
            ]
    # headline: geometric means over the topologies
    for latency in data["latencies_s"]:
        parts = []
        for system in systems:
            if system == "handwritten":
                continue
            walls, colds, mems = [], [], []
            for name in data["topologies"]:
                c = cells.get(f"{system}|{name}|{latency:g}") or {}
                b = cells.get(f"handwritten|{name}|{latency:g}") or {}
                if c.get("ok") and b.get("ok"):
                    walls.append(ratio(c["wall_s"], b["wall_s"]))
                    colds.append(ratio(c["cold_start_s"], b["cold_start_s"]))
                    mems.append(ratio(c["maxrss_mb"], b["maxrss_mb"]))
            parts.append(
                f"{system}: wall {xr(geomean(walls))}, cold start {xr(geomean(colds))}, "
                f"peak RSS {xr(geomean(mems))}"
            )
        headline.append(
            f"Orchestration at {latency * 1000:g} ms/call, geometric mean over the 4 topologies, "
            f"ratio to hand-written asyncio+openai — " + "; ".join(parts) + "."
        )
    return out


def sweep_section(data: dict[str, Any], plot_note: str) -> list[str]:
    systems, widths = data["systems"], data["widths"]
    out = [
        f"### Wall time against fan-out width ({data['sweep_latency_s'] * 1000:g} ms per call, "
        f"median of {data['sweep_reps']})",
        "",
        plot_note,
        "",
        "| width | ideal (s) | " + " | ".join(f"{s} wall (s)" for s in systems) + " |",
        "| --- | --- | " + " | ".join("---" for _ in systems) + " |",
    ]
    for w in widths:
        row = [str(w), fmt(data["sweep_latency_s"])]
        for s in systems:
            c = data["sweep"].get(f"{s}|{w}") or {}
            row.append(fmt(c.get("wall_s"), 3) if c.get("ok") else "failed")
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    lo, hi = widths[0], widths[-1]
    growth = []
    for s in systems:
        a = data["sweep"].get(f"{s}|{lo}") or {}
        b = data["sweep"].get(f"{s}|{hi}") or {}
        if a.get("ok") and b.get("ok"):
            growth.append(f"{s} {a['cold_start_s']:.2f} → {b['cold_start_s']:.2f} s")
    if growth:
        out += [
            f"Cold start (spawn → first request) from width {lo} to width {hi}: "
            + ", ".join(growth)
            + ".",
            "",
        ]
    return out


def plot(data: dict[str, Any]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(No plot: matplotlib is not installed in benchmarks/.venvs/report.)"
    systems, widths = data["systems"], data["widths"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "wall_s", "workflow wall (first request → exit)"),
        (axes[1], "total_s", "whole process (spawn → exit)"),
    ):
        for s in systems:
            xs, ys = [], []
            for w in widths:
                c = data["sweep"].get(f"{s}|{w}") or {}
                if c.get("ok"):
                    xs.append(w)
                    ys.append(c[key])
            ax.plot(xs, ys, marker="o", label=SYSTEM_NAMES.get(s, s))
        if key == "wall_s":
            ax.plot(
                widths, [data["sweep_latency_s"]] * len(widths), "k--", label="ideal (one latency)"
            )
        ax.set_xscale("log")
        ax.set_xticks(widths)
        ax.set_xticklabels([str(w) for w in widths])
        ax.set_xlabel("fan-out width (concurrent LLM calls)")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Parallel fan-out at {data['sweep_latency_s'] * 1000:g} ms per LLM call (median of {data['sweep_reps']})"
    )
    fig.tight_layout()
    path = HERE / "results" / "fanout.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "![wall time against fan-out width](results/fanout.png)"


# ------------------------------------------------------------------------------- sandbox


def sandbox_section(data: dict[str, Any], headline: list[str]) -> list[str]:
    m = data["medians_s"]
    bare = m.get("bare subprocess (python -c pass)")
    bare_docker = m.get("bare docker run --rm (python -c pass)")
    imp = m.get("bare subprocess (python -c 'import openai')")
    out = [
        "## 2. Sandbox latency",
        "",
        f"Command: `{data['command']}` ({data['seconds']:.0f} s; median of {data['reps']} interleaved runs each). "
        "The trivial system is one agent answering one prompt against the test server (0 ms latency); "
        "it is compiled once beforehand. `mas2c run` rows include the gateway, the sandbox and collecting the run folder.",
        "",
        "| what | median (ms) | ÷ bare subprocess | ÷ bare `docker run` |",
        "| --- | --- | --- | --- |",
    ]
    for name, value in m.items():
        out.append(
            f"| {name} | {value * 1000:.0f} | {xr(ratio(value, bare))} | {xr(ratio(value, bare_docker))} |"
        )
    out.append("")
    local_cli = m.get("mas2c run --sandbox unisolated (CLI)")
    docker_cli = m.get("mas2c run --sandbox docker (CLI)")
    local_ip = m.get("run_system unisolated (in-process)")
    docker_ip = m.get("run_system docker (in-process)")
    ph = data.get("docker_phases_median_s") or {}
    if docker_cli and local_cli:
        out.append(
            f"- `mas2c run` in Docker ÷ in the unisolated backend: {xr(ratio(docker_cli, local_cli))} (CLI), "
            f"{xr(ratio(docker_ip, local_ip))} (in-process); Docker adds "
            f"{(docker_ip - local_ip) * 1000:.0f} ms per run in-process."
        )
    if local_cli and local_ip:
        out.append(
            f"- The CLI's own start-up (`mas2c run` ÷ `run_system` in-process, unisolated): "
            f"{(local_cli - local_ip) * 1000:.0f} ms, mas2c's imports before the run begins."
        )
    fast = m.get("bare subprocess (python -c 'import openai; os._exit(0)')")
    if imp and fast:
        out.append(
            f"- Of the {imp * 1000:.0f} ms of `python -c 'import openai, httpx'`, {(imp - fast) * 1000:.0f} ms "
            "is the interpreter's finalization at exit (tearing down openai's thousands of classes): a compiled "
            "package that ends with `os._exit` after writing its outputs would save that on every run. The same "
            "finalization is most of the teardown measured in section 1."
        )
    if imp and local_ip:
        out.append(
            f"- The floor of any openai-based program here is `python -c 'import openai, httpx'` = {imp * 1000:.0f} ms: "
            f"the compiled package pays it inside the sandbox on every run; the rest of a local run "
            f"({(local_ip - imp) * 1000:.0f} ms) is the gateway, the copy-in/copy-out and the workflow."
        )
    if ph:
        out += [
            f"- Bare container phases (docker-py, median): create {ph['create'] * 1000:.0f} ms, "
            f"start → exit {ph['start_to_exit'] * 1000:.0f} ms, remove {ph['remove'] * 1000:.0f} ms.",
            "- **Warm single-use pool: built** (issue 14): a started container whose init has "
            "imported the runtime waits for exactly one job; cold vs warm, runc vs runsc: "
            "[results/pool.md](results/pool.md) (`bench_sandbox.py --out benchmarks/results/pool.json`).",
        ]
    out.append("")
    if docker_cli and bare_docker and local_cli and bare:
        headline.append(
            f"Sandbox: a trivial `mas2c run` takes {docker_cli:.2f} s in Docker = {xr(ratio(docker_cli, bare_docker))} "
            f"a bare `docker run` ({bare_docker:.2f} s); {local_cli:.2f} s locally = {xr(ratio(local_cli, bare))} a bare "
            f"subprocess; Docker ÷ unisolated = {xr(ratio(docker_cli, local_cli))}."
        )
    return out


# ------------------------------------------------------------------------------- compile


def compile_section(data: dict[str, Any], headline: list[str]) -> list[str]:
    out = [
        "## 3. Compile scaling",
        "",
        f"Command: `{data['command']}` ({data['seconds']:.0f} s; median of {data['reps']}). "
        "A spec of N chained call steps over A agents; load+validate, compile (of which black, run "
        "through `mas2c.fastfmt`: once per member shape), write; beside it one compile with plain "
        "whole-file black, and whether both gave the same bytes.",
        "",
        "| steps | agents | validate (s) | compile (s) | of which black (s) | write (s) | total (s) | ms / step | generated lines | compile with plain black (s) | same bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in data["cells"]:
        out.append(
            f"| {c['steps']} | {c['agents']} | {fmt(c['load_validate_s'], 3)} | {fmt(c['compile_s'], 3)} | "
            f"{fmt(c.get('black_s'), 3)} | {fmt(c['write_s'], 3)} | {fmt(c['total_s'], 3)} | {fmt(c['ms_per_step'], 1)} | "
            f"{c['python_lines']} | {fmt(c.get('compile_plain_black_s'), 3)} | "
            f"{'—' if c.get('same_bytes_as_plain_black') is None else ('yes' if c['same_bytes_as_plain_black'] else 'NO')} |"
        )
    out.append("")
    by = {(c["steps"], c["agents"]): c for c in data["cells"]}
    small, big = by.get((10, 10)) or by.get((10, 1)), by.get((1000, 10)) or by.get((1000, 1))
    if small and big:
        out.append(
            f"From 10 to 1000 steps (100x) the total grows {big['total_s'] / small['total_s']:.0f}x "
            f"({small['total_s']:.2f} s → {big['total_s']:.2f} s); black takes "
            f"{100 * (big.get('black_s') or 0) / big['compile_s']:.0f}% of compile time at 1000 steps."
        )
        out.append("")
        headline.append(
            f"Compile: 10 steps {small['total_s']:.2f} s, 1000 steps {big['total_s']:.1f} s "
            f"({big['ms_per_step']:.0f} ms/step; black is {100 * (big.get('black_s') or 0) / big['compile_s']:.0f}% of compile)."
        )
    return out


# ------------------------------------------------------------------------------ humaneval


def humaneval_section(data: dict[str, Any], headline: list[str]) -> list[str]:
    out = ["## 4. HumanEval harness", ""]
    check = data.get("check") or {}
    s = check.get("summary")
    out += [
        f"Scorer check: `{check.get('command', '?')}` (exit {check.get('exit_code')}, {check.get('seconds')} s)",
        "",
    ]
    if s:
        n = s["problems"]
        broken = ", ".join(f"`{k}` {v}/{n} failed" for k, v in s["broken_failed"].items())
        out += [
            f"- Canonical solutions passed: **{s['canonical_passed']}/{n}**; deliberately broken: {broken}; "
            f"verdict **{'OK' if s['ok'] else 'NOT OK'}**"
            + (f" (unexpected: {', '.join(s['unexpected'])})" if s["unexpected"] else "")
            + ".",
            f"- {s['runs']} sandboxed scorings ({s['sandbox']}, {data.get('workers')} at a time): median "
            f"{s['sandbox_seconds_median']} s each, {s['this_invocation_seconds']} s in all.",
            "- `raise`: the body raises NotImplementedError; `mutate`: the canonical answer is changed before it is "
            "returned (bool negated, number +1, string/list/tuple extended, None → 0): a plausible wrong answer.",
        ]
        headline.append(
            f"HumanEval scorer: {s['canonical_passed']}/{n} canonical solutions pass and "
            + ", ".join(f"{v}/{n} `{k}`-broken fail" for k, v in s["broken_failed"].items())
            + f" in the {s['sandbox']} sandbox."
        )
    else:
        out.append(f"- did not complete: {check.get('stderr_tail', '')[:300]}")
    oracle = data.get("oracle") or {}
    o = oracle.get("summary")
    out += [
        "",
        f"Oracle run: `{oracle.get('command', '?')}` (exit {oracle.get('exit_code')}, {oracle.get('seconds')} s)",
        "",
    ]
    if o:
        out += [
            f"- specs/code-generation.yaml against the test server answering with the canonical solution: "
            f"pass@1 **{100 * (o['pass@1'] or 0):.1f}%** on {o['finished']} problems, {o['llm_calls']} LLM calls, "
            f"{o['tokens']} tokens (test-server counts), ${o['cost_usd']:.4f} at the spec's prices.",
            f"- Harness cost per problem with an instant LLM (a sandboxed MAS run + a sandboxed scoring, "
            f"{data.get('workers')} problems at a time): median {o['seconds_per_problem_median']} s; "
            f"{o['this_invocation_seconds']} s for {o['finished']} problems.",
            "- Real pass@1 needs a real endpoint: `mas2c bench humaneval --llm URL` (the embedded 135M model is "
            "far too weak to be worth measuring here).",
        ]
        headline.append(
            f"HumanEval harness: {o['seconds_per_problem_median']} s per problem of harness overhead "
            f"(MAS run + scoring, both sandboxed) with an instant LLM."
        )
    out.append("")
    return out


def batch_section() -> list[str]:
    """Section 5, written by benchmarks/bench_batch.py as results/batch.md."""
    md = RESULTS / "batch.md"
    if not md.is_file():
        return ["## 5. Batch runs (threads and Ray engines)", "", "Not run.", ""]
    return ["## 5. Batch runs (threads and Ray engines)", "", md.read_text("utf-8").rstrip(), ""]


def others_section() -> list[str]:
    out = []
    for name, title in (
        ("cli", "CLI start-up (`mas2c --help`, `mas2c run BUILD`)"),
        (
            "hostile",
            "Hostile programs: what the host pays (volume filler, 300k files, big and deep results)",
        ),
        ("local", "Embedded model"),
        ("rectify", "Rectifier"),
        ("startup", "Start-up against fan-out width (1 vs 100)"),
    ):
        md = RESULTS / f"{name}.md"
        js = RESULTS / f"{name}.json"
        if md.is_file() or js.is_file():
            link = f"results/{md.name}" if md.is_file() else f"results/{js.name}"
            out.append(
                f"- {title}: see [{link}]({link}) (benchmarks/bench_{name}.py, run separately)."
            )
    if out:
        return ["## Other benchmarks", "", *out, ""]
    return []


def main() -> int:
    headline: list[str] = []
    sections: list[str] = []
    overhead = load("overhead")
    if overhead:
        sections += overhead_section(overhead, headline)
        sections += sweep_section(overhead, plot(overhead))
    else:
        sections += [
            "## 1. Orchestration overhead",
            "",
            "Not run (benchmarks/results/overhead.json missing).",
            "",
        ]
    sandbox = load("sandbox")
    sections += (
        sandbox_section(sandbox, headline)
        if sandbox
        else ["## 2. Sandbox latency", "", "Not run.", ""]
    )
    comp = load("compile")
    sections += (
        compile_section(comp, headline) if comp else ["## 3. Compile scaling", "", "Not run.", ""]
    )
    he = load("humaneval")
    sections += (
        humaneval_section(he, headline) if he else ["## 4. HumanEval harness", "", "Not run.", ""]
    )
    sections += batch_section()
    sections += others_section()
    failures = (
        (RESULTS / "failures.txt").read_text().strip()
        if (RESULTS / "failures.txt").is_file()
        else ""
    )
    lines = [
        "# mas2c benchmarks",
        "",
        "Written by `bash benchmarks/run_all.sh` (all measurements below come from one run of it on this machine; "
        "raw numbers in `benchmarks/results/*.json`).",
        "",
        "## Machine",
        "",
        *machine(),
        "",
        "The machine is shared with other sessions' test runs (see the load averages), so absolute times are "
        "noisy; compare the **ratios**, which were measured side by side, interleaved, in the same run.",
        "",
        "## Commands",
        "",
        "```sh",
        "bash benchmarks/run_all.sh   # all of the below, then this report",
        "bash benchmarks/setup_venvs.sh                 # peers' venvs from PyPI",
        ".venv/bin/python benchmarks/bench_overhead.py  # 1",
        ".venv/bin/python benchmarks/bench_sandbox.py   # 2",
        ".venv/bin/python benchmarks/bench_compile.py   # 3",
        ".venv/bin/python benchmarks/bench_cli.py       # CLI start-up",
        ".venv/bin/python benchmarks/bench_humaneval.py # 4",
        ".venv/bin/python benchmarks/bench_batch.py     # 5",
        "benchmarks/.venvs/report/bin/python benchmarks/report.py",
        "```",
        "",
    ]
    if failures:
        lines += ["**Steps that failed in this run:**", "", "```", failures, "```", ""]
    lines += sections
    lines += ["## Headline ratios", ""] + [f"- {h}" for h in headline] + [""]
    (HERE / "RESULTS.md").write_text("\n".join(lines), "utf-8")
    print(f"report: wrote {HERE / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
