"""`mas2c batch` measured: HumanEval's 164 problems on the threads engine and on a two-node Ray
cluster, at 1, 2 and 4 workers, and the CoT-SC baseline comparison on a small fixture.

    python benchmarks/bench_batch.py [--limit 164] [--workers 1,2,4] [--sandbox docker]

1. A loopback test server answers every programmer turn with the problem's canonical
   solution (an oracle), so pass@1 must be 100% and the time is the batch's own: a sandboxed
   run of specs/code-generation.yaml plus a sandboxed scoring per problem.
2. `mas2c bench humaneval` (the preset of `mas2c batch`) runs through the CLI, as a user
   would, with `--engine threads` and with `--engine ray --address ...` against a Ray cluster
   of two nodes started here on this machine (`ray start --head --num-cpus=2` and a second
   `ray start --address ... --num-cpus=2` with its own temp dir), stopped at the end.
3. Every run's results.jsonl must equal the first one's, timing fields aside.
4. `mas2c batch ... --baseline cot-sc` on the GSM8K fixture (self-consistency as the system,
   scripted answers) prints the side-by-side comparison.

Writes benchmarks/results/batch.json and batch.md (RESULTS.md includes the latter).
The machine is shared: the load average at the start and the end is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mas2c.batch import comparable, read_results  # noqa: E402
from mas2c.batch_datasets import convert_file  # noqa: E402
from mas2c.bench import canonical_solution, load_problems  # noqa: E402
from mas2c.testserver import ChatRequest, LLMTestServer  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "batch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ours(tags: list[bytes]) -> list[int]:
    table: dict[int, tuple[bytes, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            table[int(entry)] = (cmd, ppid)
    ours = {pid for pid, (cmd, _) in table.items() if any(t in cmd for t in tags)}
    while True:
        more = {pid for pid, (_, ppid) in table.items() if ppid in ours} - ours
        if not more:
            return sorted(ours - {os.getpid()})
        ours |= more


@contextlib.contextmanager
def ray_cluster(cpus: int) -> Iterator[str]:
    """Two Ray nodes on this machine; their processes (found by temp dir) stopped at the end."""
    base = Path(tempfile.mkdtemp(prefix="rbb-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    ray = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    common = [f"--num-cpus={cpus}", "--object-store-memory=200000000", "--disable-usage-stats"]
    tags = [str(base / "h").encode(), str(base / "w").encode()]
    try:
        subprocess.run(
            [
                ray,
                "start",
                "--head",
                f"--port={port}",
                f"--temp-dir={base / 'h'}",
                "--include-dashboard=false",
                f"--dashboard-agent-listen-port={_free_port()}",
                *common,
            ],
            env={**env, "MAS2C_BATCH_NODE_DIR": str(base / "nh")},
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                ray,
                "start",
                f"--address=127.0.0.1:{port}",
                f"--temp-dir={base / 'w'}",
                f"--dashboard-agent-listen-port={_free_port()}",
                *common,
            ],
            env={**env, "MAS2C_BATCH_NODE_DIR": str(base / "nw")},
            check=True,
            capture_output=True,
        )
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _ours(tags):
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            time.sleep(3)
        shutil.rmtree(base, ignore_errors=True)


def cli(args: list[str], env: dict[str, str]) -> tuple[int, float, str, str]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c.cli", *args], env=env, capture_output=True, text=True
    )
    return proc.returncode, time.monotonic() - started, proc.stdout, proc.stderr


def shown(args: list[str], url: str, address: str | None) -> str:
    text = " ".join(["mas2c", *(a for a in args if a != "--json")])
    text = text.replace(str(WORK), "RUN").replace(url, "TEST_SERVER_URL")
    return text.replace(address, "HEAD:PORT") if address else text


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0:3].__str__()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=164, help="problems of the full runs")
    parser.add_argument("--workers", default="4", help="workers of the full runs")
    parser.add_argument("--sweep-limit", type=int, default=24, help="problems of the sweep")
    parser.add_argument("--sweep-workers", default="1,2,4", help="workers of the sweep")
    parser.add_argument("--sandbox", default="docker", choices=["docker", "unisolated"])
    parser.add_argument("--engines", default="threads,ray")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of each of the two nodes")
    parser.add_argument("--out", default=str(HERE / "results" / "batch.json"))
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(PYTHONPATH=str(ROOT), OPENAI_API_KEY="sk-bench", RAY_USAGE_STATS_ENABLED="0")
    problems = load_problems(args.limit)
    by_prompt = {p.prompt.strip(): p for p in problems}

    def oracle(req: ChatRequest) -> str:
        text = req.all_text
        for prompt, p in by_prompt.items():
            if prompt in text:
                return f"```python\n{canonical_solution(p)}\n```"
        return "```python\nraise SystemExit('unknown problem')\n```"

    commit = (
        os.environ.get("MAS2C_COMMIT")
        or subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    result: dict[str, Any] = {
        "benchmark": "batch",
        "commit": commit or "unknown",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "problems": len(problems),
        "sandbox": args.sandbox,
        "ray_nodes": 2,
        "ray_cpus_per_node": args.ray_cpus,
        "loadavg_start": loadavg(),
        "nproc": os.cpu_count(),
        "runs": [],
    }
    engines = args.engines.split(",")
    plan = [
        (engine, int(w), args.limit) for w in args.workers.split(",") if w for engine in engines
    ]
    plan += [
        (engine, int(w), args.sweep_limit)
        for engine in engines
        for w in args.sweep_workers.split(",")
        if w and args.sweep_limit
    ]
    references: dict[int, dict[str, Any]] = {}
    with LLMTestServer(oracle) as server, contextlib.ExitStack() as stack:
        address = stack.enter_context(ray_cluster(args.ray_cpus)) if "ray" in engines else None
        for engine, w, limit in plan:
            run_dir = WORK / f"{engine}-w{w}-n{limit}"
            cmd = ["bench", "humaneval", "--limit", str(limit), "--sandbox", args.sandbox]
            cmd += ["--workers", str(w), "--engine", engine, "--llm", server.base_url]
            cmd += ["--run-dir", str(run_dir), "--json"]
            if engine == "ray":
                cmd += ["--address", str(address)]
            print(f"batch bench: {engine} x{w} ...", file=sys.stderr, flush=True)
            code, seconds, out, err = cli(cmd, env)
            summary = json.loads(out) if out.strip().startswith("{") else {}
            rows = read_results(run_dir / "results.jsonl")
            same = {k: comparable(v) for k, v in rows.items()}
            reference = references.setdefault(limit, same)
            run = {
                "engine": engine,
                "workers": w,
                "problems": limit,
                "command": shown(cmd, server.base_url, address),
                "exit_code": code,
                "wall_seconds": round(seconds, 1),
                "problems_per_minute": round(60 * len(rows) / seconds, 1) if seconds else None,
                "pass@1": summary.get("pass@1"),
                "finished": summary.get("finished"),
                "identical_to_first": same == reference and len(same) == limit,
                "differences": sum(1 for k in reference if reference.get(k) != same.get(k)),
                "stderr_tail": err[-800:] if code else "",
            }
            print(f"batch bench: {run}", file=sys.stderr, flush=True)
            result["runs"].append(run)
    result["baseline"] = baseline_demo(env)
    result["loadavg_end"] = loadavg()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    Path(args.out).with_suffix(".md").write_text(markdown(result), "utf-8")
    print(markdown(result))
    ok = all(r["exit_code"] == 0 and r["identical_to_first"] for r in result["runs"])
    return 0 if ok else 1


def baseline_demo(env: dict[str, str]) -> dict[str, Any]:
    """The system (self-consistency) beside CoT-SC at matched cost, on the GSM8K fixture."""
    dataset = WORK / "gsm8k.jsonl"
    convert_file("gsm8k", ROOT / "tests" / "data" / "batch" / "gsm8k.jsonl", dataset)
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    wrong_for_baseline = {"gsm8k-0": "71"}

    def respond(req: ChatRequest) -> Any:
        baseline = "Work through the problem in `reasoning`" in req.system
        for row in rows:
            if row["question"] in req.all_text:
                answer = (
                    wrong_for_baseline.get(row["id"], row["answer"]) if baseline else row["answer"]
                )
                return {"reasoning": "step by step", "answer": answer}
        return {"reasoning": "?", "answer": "?"}

    with LLMTestServer(respond) as server:
        cmd = [
            "batch",
            str(dataset),
            "--spec",
            str(ROOT / "specs" / "self-consistency.yaml"),
            "--scorer",
            "numeric",
            "--baseline",
            "cot-sc",
            "--pilot",
            "2",
            "--sandbox",
            "unisolated",
            "--llm",
            server.base_url,
            "--run-dir",
            str(WORK / "baseline"),
        ]
        code, seconds, out, _ = cli(cmd, env)
        printed = out
        command = shown(cmd, server.base_url, None).replace(str(ROOT) + "/", "")
    return {
        "command": command,
        "exit_code": code,
        "seconds": round(seconds, 1),
        "printed": printed,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"HumanEval (the first {result['problems']} problems, and a sweep on fewer) through `specs/code-generation.yaml` against "
        "the loopback test server answering with the canonical solutions (an oracle), "
        f"{result['sandbox']} sandboxes (a sandboxed system run and a sandboxed scoring per "
        f"problem). Ray: two nodes on this machine, {result['ray_cpus_per_node']} CPUs each. "
        f"Machine: {result['nproc']} cores **shared with other engineers' work** (load average "
        f"{result['loadavg_start']} at the start, {result['loadavg_end']} at the end): wall times "
        f"are indicative, ratios between rows more than absolute values. Code: commit "
        f"{result.get('commit')}.",
        "",
        "| problems | engine | workers | wall (s) | problems/min | pass@1 | results identical to the "
        "first run on the same problems (timing aside) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        p1 = "-" if r["pass@1"] is None else f"{100 * r['pass@1']:.1f}%"
        same = "yes" if r["identical_to_first"] else f"NO ({r['differences']} rows differ)"
        lines.append(
            f"| {r['problems']} | {r['engine']} | {r['workers']} | {r['wall_seconds']} | "
            f"{r['problems_per_minute']} | "
            f"{p1} | {same} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- `{r['command']}` (exit {r['exit_code']})" for r in result["runs"]]
    base = result.get("baseline") or {}
    if base:
        lines += [
            "",
            "Baseline comparison on the GSM8K fixture (system: specs/self-consistency.yaml; "
            "scripted answers, the baseline's first row wrong):",
            "",
            f"`{base['command']}` (exit {base['exit_code']}, {base['seconds']} s) prints:",
            "",
            "```",
            base["printed"].rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
