"""What a big or forged trace costs `mas2c report` and `mas2c export otel` (issue 16), measured.

    python benchmarks/bench_report.py [--sizes 2000,20000,100000] [--out benchmarks/results/report]

Each case writes a run folder whose trace.jsonl has N step_end and N llm_call events
WITHOUT span or parent ids (a trace of an earlier version, or one a sandboxed program
forged): the reader then nests every step and call by pointer and time, the costly path.
It times reading the folder (`read_run_trace`), rendering the page (`render_report`) and
building the OpenTelemetry spans (`build_spans`, when the otel extra is installed), in a
fresh child process per case, and reports the peak RSS. The nesting used to compare every
span with every other (20 000 steps: 3 minutes); it is an index by pointer now.

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from mas2c.report import render_report
from mas2c.tracing import read_run_trace
folder = Path(sys.argv[1])
t0 = time.perf_counter()
trace = read_run_trace(folder)
t1 = time.perf_counter()
page = render_report(folder)
t2 = time.perf_counter()
try:
    from mas2c.otel import build_spans
    spans = len(build_spans(trace))
except Exception as exc:  # no otel extra
    spans = None
t3 = time.perf_counter()
print(json.dumps({"spans": len(trace.spans), "read_s": t1 - t0, "report_s": t2 - t1,
                  "page_bytes": len(page), "otel_spans": spans,
                  "otel_s": t3 - t2 if spans is not None else None,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_folder(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    with (folder / "trace.jsonl").open("w") as out:
        for i in range(n):
            at = {"t": i * 0.001, "pointer": f"/workflow/{i % 7}"}
            out.write(json.dumps({**at, "event": "step_end", "step": f"s{i % 7}",
                                  "status": "ok", "duration_s": 0.002}) + "\n")  # fmt: skip
            out.write(json.dumps({**at, "event": "llm_call", "agent": "a", "model": "m",
                                  "status": "ok", "latency_s": 0.001}) + "\n")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000,100000")
    parser.add_argument("--out", default=str(HERE / "results" / "report"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            folder = Path(tmp) / f"n{n}"
            write_folder(folder, n)
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(folder), str(ROOT)],
                capture_output=True,
                text=True,
                check=True,
            )
            row = {"events": 2 * n, **json.loads(proc.stdout)}
            rows.append(row)
            print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| events (no ids) | spans | read s | report s | page KiB | otel s | peak RSS MB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        otel = f"{r['otel_s']:.2f}" if r["otel_s"] is not None else "—"
        lines.append(
            f"| {r['events']} | {r['spans']} | {r['read_s']:.2f} | {r['report_s']:.2f} | "
            f"{r['page_bytes'] // 1024} | {otel} | {r['peak_rss_mb']:.0f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
