"""What a hostile program can make the HOST pay (issue 18, class 2), measured.

    python benchmarks/bench_hostile.py [--runtime runc|runsc] [--out benchmarks/results/hostile]

Each case runs one hostile program in the Docker sandbox (default limits) in a fresh
child process of this script, which reports its own peak RSS (the host side of the run:
mas2c.sandbox reading the copy-out), the wall time, what `sandbox.json` says about the
copy-out, and how much the host's disk grew:

* **volume filler**: writes as much as it can (up to 2.4 GB) into its cwd, its output
  folder, /tmp, /work and /var/tmp. Host disk: the peak of `df` on Docker's root
  during the run, minus the start (sampled every 50 ms; the machine is shared, so
  small deltas are noise), and the sectors written to the disks (/proc/diskstats).
* **300k files**: creates 300,000 files in /tmp and as many as it can in its output
  folder, then writes a small result.
* **64 MB out.json**: a result of 60 MiB (the per-file limit is 64 MiB).
* **deep out.json**: a result nested 200,000 levels deep.

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PROGRAM = r"""
import argparse, json, os, sys, time

p = argparse.ArgumentParser()
for flag in ("--input", "--output", "--trace"):
    p.add_argument(flag, required=True)
a = p.parse_args()
req = json.load(open(a.input))
out = {"status": "ok", "case": req["case"]}
if req["case"] == "filler":
    chunk = b"x" * (1 << 20)
    report = {}
    for key, folder in (("cwd", "."), ("out", os.path.dirname(a.output)), ("tmp", "/tmp"),
                        ("work", "/work"), ("var_tmp", "/var/tmp")):
        written, error, n = 0, None, 0
        try:
            while written < (2400 << 20):
                with open(os.path.join(folder, "fill-%d" % n), "wb") as f:
                    n += 1
                    for _ in range(32):
                        f.write(chunk)
                        written += len(chunk)
        except OSError as exc:
            error = exc.strerror
        for i in range(n):  # free it again (room for out.json)
            try:
                os.remove(os.path.join(folder, "fill-%d" % i))
            except OSError:
                pass
        report[key] = {"mb": written >> 20, "error": error}
    out["written"] = report
elif req["case"] == "files":
    made = {}
    for key, folder, n in (("tmp", "/tmp", 300000), ("out", os.path.dirname(a.output), 300000)):
        os.makedirs(os.path.join(folder, "many"), exist_ok=True)
        i = 0
        try:
            for i in range(n):
                open(os.path.join(folder, "many", str(i)), "w").close()
            i = n
        except OSError as exc:
            made[key + "_error"] = exc.strerror
        made[key] = i
    os.system("rm -rf %s/many" % os.path.dirname(a.output))  # room for out.json
    out["made"] = made
elif req["case"] == "bigresult":
    with open(a.output, "w") as f:
        f.write('{"status": "ok", "x": "' + "a" * (60 << 20) + '"}')
    sys.exit(0)
elif req["case"] == "deep":
    with open(a.output, "w") as f:
        f.write('{"x": ' + "[" * 200000 + "]" * 200000 + "}")
    sys.exit(0)
with open(a.output, "w") as f:
    json.dump(out, f)
"""

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from mas2c.sandbox import Limits, run_package
pkg, inp, run_dir, runtime = sys.argv[1:5]
t0 = time.monotonic()
report = run_package(Path(pkg), "hostile", Path(inp), Path(run_dir), runtime=runtime or None,
                     limits=Limits(timeout_s=300), on_warning=lambda m: None)
wall = time.monotonic() - t0
print(json.dumps({"wall_s": round(wall, 2),
                  "host_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "report": report.to_json()}))
"""


def disk_sectors_written() -> int:
    """Sectors written to whole disks (not partitions) since boot."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            name = fields[2]
            if name.startswith(("loop", "ram", "dm-")) or (
                name[-1].isdigit() and not name.startswith("nvme")
            ):
                continue
            if name.startswith("nvme") and "p" in name[4:]:
                continue
            total += int(fields[9])
    return total


class DiskWatch:
    """Peak growth of the used space on Docker's root filesystem during a run."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.base = shutil.disk_usage(path).used
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, shutil.disk_usage(self.path).used)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_case(case: str, runtime: str, work: Path) -> dict[str, Any]:
    pkg = work / "pkg"
    (pkg / "hostile").mkdir(parents=True, exist_ok=True)
    (pkg / "hostile" / "__init__.py").write_text("")
    (pkg / "hostile" / "__main__.py").write_text(PROGRAM)
    inp = work / f"{case}.json"
    inp.write_text(json.dumps({"case": case}))
    run_dir = work / f"run-{case}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sectors = disk_sectors_written()
    docker_root = "/var/lib/docker" if os.path.isdir("/var/lib/docker") else "/"
    with DiskWatch(docker_root) as watch:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(pkg), str(inp), str(run_dir), runtime],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{case}: exit {proc.returncode}: {proc.stderr[-1500:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    rep = data["report"]
    result = json.loads((run_dir / "result.json").read_text())
    return {
        "case": case,
        "wall_s": data["wall_s"],
        "host_peak_rss_mb": data["host_peak_rss_mb"],
        "host_disk_peak_growth_mb": round((watch.peak - watch.base) / 2**20, 1),
        "disk_written_mb": round((disk_sectors_written() - sectors) * 512 / 2**20, 1),
        "copy_out": rep["copy_out"],
        "truncated": rep["truncated"],
        "exit_code": rep["exit_code"],
        "result_status": result.get("status"),
        "result_error": (result.get("error") or {}).get("message"),
        "program": {k: v for k, v in result.items() if k in ("written", "made")},
        "result_json_bytes": (run_dir / "result.json").stat().st_size,
    }


def markdown(rows: list[dict[str, Any]], runtime: str, command: str) -> str:
    lines = [
        f"# Hostile programs: what the host pays (runtime {runtime or 'default'})",
        "",
        f"Command: `{command}`; load average at start: {Path('/proc/loadavg').read_text().split()[0]}"
        " (2 shared cores).",
        "",
        "| case | wall s | host peak RSS MB | host disk peak growth MB | disk written MB "
        "| copy-out bytes | copy-out s | truncated | result |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        res = r["result_status"] + (f": {r['result_error']}" if r["result_error"] else "")
        lines.append(
            f"| {r['case']} | {r['wall_s']} | {r['host_peak_rss_mb']} | "
            f"{r['host_disk_peak_growth_mb']} | {r['disk_written_mb']} | "
            f"{r['copy_out'].get('bytes')} | {r['copy_out'].get('duration_s')} | "
            f"{', '.join(r['truncated']) or '-'} | {res[:90]} |"
        )
    lines.append("")
    for r in rows:
        if r["program"]:
            lines.append(f"- {r['case']}, as the program saw it: `{json.dumps(r['program'])}`")
    lines += [
        "",
        "Host disk columns are machine-wide (other processes write too); the volume "
        "filler's own writes land in tmpfs (RAM, inside the container's memory limit).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default="")
    ap.add_argument("--out", default=str(HERE / "results" / "hostile"))
    ap.add_argument("--merge", action="store_true", help="replace only these cases in OUT.json")
    ap.add_argument("--cases", default="filler,files,bigresult,deep")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        for case in args.cases.split(","):
            print(f"== {case}", file=sys.stderr, flush=True)
            rows.append(run_case(case, args.runtime, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    command = "python benchmarks/bench_hostile.py" + (
        f" --runtime {args.runtime}" if args.runtime else ""
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        fresh = {r["case"]: r for r in rows}
        rows = [fresh.pop(r["case"], r) for r in old] + list(fresh.values())
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, args.runtime, command))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
