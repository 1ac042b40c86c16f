"""Spec amplification bounds: time and peak memory of `mas2c compile` on hostile YAML.

    python benchmarks/bench_yaml_bomb.py [--timeout 120] [--checkout DIR]

(`--checkout` compiles with another checkout's mas2c, e.g. an older commit unpacked with
`git archive`, for a before/after comparison.)

Three specs, written to a temp folder: a "billion laughs" (nested aliases, 9^11 values from
1.7 KB), one 500 KB anchor used by 1 000 agents (547 KB of file, 1 GB of text once
expanded: the class of file that once took `compile` 450 s and 4 GB), and a spec with a
lone surrogate (`"\\ud800"`) in JSON. Each is compiled in a fresh `python -m mas2c.cli
compile` (wall time and the child's peak RSS from getrusage); a run past --timeout is
killed and reported as such. Writes benchmarks/results/yaml_bomb.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEAD = 'spec_version: "1"\nname: bomb\nmodels: {m: {model: test-model}}\n'
TAIL = "workflow:\n  - {id: s, kind: call, agent: a0, prompt: hi, out: o}\noutputs: {o: o}\n"


def laughs() -> str:
    lines = [HEAD + TAIL + 'agents: {a0: {role: r, model: m}}\ndescription: &l0 "lol"']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 12)]
    return "\n".join(lines) + "\n"


def big_anchor() -> str:
    lines = [HEAD + TAIL + f'description: &d "{"y" * 500_000}"', "agents:"]
    lines += [f"  a{i}: {{role: *d, instructions: *d, model: m}}" for i in range(1000)]
    return "\n".join(lines) + "\n"


def surrogate() -> str:
    spec = {
        "spec_version": "1",
        "name": "bomb",
        "models": {"m": {"model": "test-model"}},
        "agents": {"a0": {"role": "r", "model": "m"}},
        "workflow": [{"id": "s", "kind": "call", "agent": "a0", "prompt": "hi", "out": "o"}],
        "outputs": {"o": "o"},
    }
    return json.dumps(spec)[:-1] + ', "description": "bad \\ud800 here"}'


def measure(path: Path, out: Path, timeout: float, checkout: Path) -> dict[str, object]:
    """Compile `path` in a child process; its own wall time and peak RSS (wait4's rusage)."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "mas2c.cli", "compile", str(path), "-o", str(out)],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(checkout)},
        )
        outcome = ""
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                outcome = f"exit {os.waitstatus_to_exitcode(status)}"
                break
            if time.monotonic() - started > timeout:
                child.kill()
                _pid, _status, usage = os.wait4(child.pid, 0)
                outcome = f"killed at {timeout:g} s"
                break
            time.sleep(0.05)
        child.returncode = 0  # reaped above
        log.seek(0)
        text = log.read()
    lines = text.strip().splitlines()
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "outcome": outcome,
        "seconds": round(time.monotonic() - started, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "traceback": "Traceback" in text,
        "message": lines[0][:160] if lines else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--checkout", type=Path, default=HERE.parent)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, text in (
            ("laughs.yaml", laughs()),
            ("big-anchor.yaml", big_anchor()),
            ("surrogate.json", surrogate()),
        ):
            path = folder / name
            path.write_text(text, encoding="utf-8")
            rows.append(measure(path, folder / f"build-{path.stem}", args.timeout, args.checkout))
            print(json.dumps(rows[-1]), file=sys.stderr)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "yaml_bomb.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| file | bytes | outcome | seconds | peak RSS (MB) | traceback | message |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['file']} | {r['bytes']} | {r['outcome']} | {r['seconds']} | "
            f"{r['peak_rss_mb']} | {r['traceback']} | {str(r['message']).replace('|', '/')} |"
        )
    (results / "yaml_bomb.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
