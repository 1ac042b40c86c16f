"""A hostile program floods the LLM gateway from inside the Docker sandbox.

The program (stdlib only, in the real sandbox image, through the real socket mount)
opens thousands of half-open connections from several processes, sends bodies of
the maximum size and just over it, bodies dense in JSON values, and a burst of valid
requests, all at once. The host samples its own RSS and thread count (and the
gateway's threads and open connections) every 20 ms. Issue 18 measured 3.6 GB of
host RSS for four concurrent 32 MB bodies and 2,852 host threads for half-open
connections before the gateway was bounded.

    python benchmarks/bench_gateway_flood.py [--half-open 2700] [--big 16] [--dense 16] [--valid 64]

`tests/test_gateway_docker.py` runs the same flood, smaller, and asserts the bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mas2c.gateway import Budget, Gateway, GatewayLimits, HttpUpstream
from mas2c.run import socket_dir
from mas2c.sandbox import SANDBOX_UID, Limits, run_package
from mas2c.testserver import LLMTestServer, Responder

HOSTILE_MAIN = r"""
import argparse, json, os, socket, sys, threading, time

SOCK = os.environ["MAS2C_LLM_SOCKET"]


def status_of(payload, headers=b""):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(120)
    try:
        s.connect(SOCK)
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                + headers + b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n")
        s.sendall(head + payload)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    except OSError:
        return 0
    finally:
        s.close()


def chat(text, max_tokens=50):
    body = {"model": "m1", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}]}
    return json.dumps(body).encode()


def half_open(n, hold_s, pipe_w):
    conns = []
    for i in range(n):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(SOCK)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Le")
            conns.append(s)
        except OSError:
            pass
    os.write(pipe_w, str(len(conns)).encode().ljust(16))
    time.sleep(hold_s)
    os._exit(0)


def run_jobs(jobs, count):
    threads = [threading.Thread(target=lambda k=k, b=b: count(k, status_of(b))) for k, b in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main():
    p = argparse.ArgumentParser()
    for flag in ("--input", "--output", "--trace"):
        p.add_argument(flag, required=True)
    a = p.parse_args()
    req = json.load(open(a.input))
    out = {"statuses": {}}
    lock = threading.Lock()

    def count(kind, status):
        with lock:
            out["statuses"].setdefault(kind, {})
            key = str(status)
            out["statuses"][kind][key] = out["statuses"][kind].get(key, 0) + 1

    t0 = time.time()
    children, pipes = [], []
    per = 900  # the container allows 1024 open files per process
    todo = req.get("half_open", 0)
    while todo > 0:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            half_open(min(per, todo), req.get("hold_s", 3.0), w)
        children.append(pid)
        pipes.append(r)
        todo -= per
    opened = sum(int(os.read(r, 16).decode().strip() or 0) for r in pipes)
    out["half_open_connected"] = opened
    # phase 1: valid requests while the half-open connections hold every slot
    run_jobs([("valid_during_half_open", chat("q%d" % i)) for i in range(req.get("valid", 0))], count)
    for pid in children:
        os.waitpid(pid, 0)
    time.sleep(0.5)  # the gateway notices the closed connections

    limit = req.get("max_body", 4 * 1024 * 1024)
    big = chat("x" * (limit - 200))
    big = big[:-2] + b" " * (limit - len(big)) + big[-2:]
    over = big + b" "
    dense = b'{"model": "m1", "messages": [{"role": "user", "content": "x"}], "tools": ['
    dense += b",".join([b"[]"] * (req.get("dense_values", 600_000))) + b"]}"
    # phase 2: bodies of the maximum size, one byte over, dense in values, and valid ones
    jobs = (
        [("big", big)] * req.get("big", 0)
        + [("over", over)] * req.get("big", 0)
        + [("dense", dense)] * req.get("dense", 0)
        + [("valid", chat("q%d" % i)) for i in range(req.get("valid", 0))]
    )
    run_jobs(jobs, count)
    out["after"] = status_of(chat("after the flood"))
    out["seconds"] = round(time.time() - t0, 2)
    json.dump(out, open(a.output, "w"))


main()
"""


DEFAULT_LIMITS = GatewayLimits()
# Large bodies are refused at their budget reservation, after being read and parsed.
FLOOD_BUDGET = Budget(max_total_tokens=100_000)


@dataclass
class Sample:
    rss_mb: float
    threads: int
    gateway_threads: int
    open_connections: int


def _proc_status() -> tuple[float, int]:
    rss, threads = 0.0, 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def _gateway_threads() -> int:
    return sum(t.name.startswith(("mas2c-gw", "mas2c-gateway")) for t in threading.enumerate())


def run_flood(
    *,
    half_open: int = 2700,
    big: int = 16,
    dense: int = 16,
    valid: int = 64,
    hold_s: float = 3.0,
    limits: GatewayLimits = DEFAULT_LIMITS,
    budget: Budget = FLOOD_BUDGET,
    responder: Responder | None = None,
) -> dict[str, Any]:
    """Run the hostile program in Docker against a gateway in this process; the figures."""
    samples: list[Sample] = []
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="mas2c-flood-") as tmp:
        root = Path(tmp)
        pkg = root / "pkg" / "hostile_flood"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "__main__.py").write_text(HOSTILE_MAIN)
        request = {
            "half_open": half_open,
            "hold_s": hold_s,
            "big": big,
            "dense": dense,
            "valid": valid,
            "max_body": limits.max_body_bytes,
            "dense_values": min(limits.max_body_bytes // 3, limits.max_json_values * 3),
        }
        (root / "input.json").write_text(json.dumps(request))
        with (
            LLMTestServer(responder, latency_s=0.05) as srv,
            HttpUpstream(srv.base_url, "sk-flood-test", timeout_s=30) as upstream,
            socket_dir(SANDBOX_UID) as folder,
            Gateway(
                folder / "llm.sock",
                upstream,
                budget=budget,
                models={"m1": None},
                limits=limits,
                socket_uid=SANDBOX_UID,
            ) as gw,
        ):
            base_rss, base_threads = _proc_status()
            base_gw = _gateway_threads()

            def sample() -> None:
                while not stop.is_set():
                    rss, threads = _proc_status()
                    stats = gw.server_stats()
                    samples.append(Sample(rss, threads, _gateway_threads(), stats["open"]))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, name="flood-sampler", daemon=True)
            sampler.start()
            t0 = time.monotonic()
            try:
                report = run_package(
                    root / "pkg",
                    "hostile_flood",
                    root / "input.json",
                    root / "run",
                    backend="docker",
                    limits=Limits(timeout_s=300, memory_mb=1024, pids=256),
                    llm_socket=gw.socket_path,
                    on_warning=lambda msg: None,
                )
            finally:
                stop.set()
                sampler.join()
            elapsed = time.monotonic() - t0
            stats = gw.server_stats()
            usage = gw.usage()
        result = json.loads((root / "run" / "result.json").read_text())
        stderr = (root / "run" / "stderr.txt").read_text(errors="replace")[-2000:]
    return {
        "exit_code": report.exit_code,
        "program": result,
        "stderr_tail": stderr,
        "seconds": round(elapsed, 2),
        "baseline_rss_mb": round(base_rss, 1),
        "peak_rss_mb": round(max(s.rss_mb for s in samples), 1),
        "baseline_threads": base_threads,
        "peak_threads": max(s.threads for s in samples),
        "baseline_gateway_threads": base_gw,
        "peak_gateway_threads": max(s.gateway_threads for s in samples),
        "peak_open_connections": stats["peak_open"],
        "rejected_connections": stats["rejected"],
        "usage": {k: usage[k] for k in ("calls", "refused", "errors", "total_tokens", "cost_usd")},
        "limits": limits.__dict__,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--half-open", type=int, default=2700)
    p.add_argument(
        "--big", type=int, default=16, help="bodies of the maximum size (and as many 1 byte over)"
    )
    p.add_argument("--dense", type=int, default=16, help="bodies dense in JSON values")
    p.add_argument("--valid", type=int, default=64)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    figures = run_flood(half_open=a.half_open, big=a.big, dense=a.dense, valid=a.valid)
    if a.json:
        print(json.dumps(figures, indent=2))
        return 0
    prog = figures["program"]
    print(
        f"hostile program: exit {figures['exit_code']}, {figures['seconds']} s, "
        f"{prog.get('half_open_connected')} half-open connections connected"
    )
    print(
        f"  statuses by kind: {json.dumps(prog.get('statuses'))}; request after the flood: {prog.get('after')}"
    )
    print(f"host RSS: {figures['baseline_rss_mb']} MB before, {figures['peak_rss_mb']} MB peak")
    print(
        f"host threads: {figures['baseline_threads']} before, {figures['peak_threads']} peak "
        f"(gateway: {figures['baseline_gateway_threads']} -> {figures['peak_gateway_threads']})"
    )
    print(
        f"gateway connections: peak {figures['peak_open_connections']} open, "
        f"{figures['rejected_connections']} turned away"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
