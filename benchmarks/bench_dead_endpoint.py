"""How long a dead endpoint takes to fail, and with how many attempts.

    python benchmarks/bench_dead_endpoint.py [--e2e]

In-process: a gateway whose upstream URL points at a closed loopback port (with
credentials in the URL), asked twice through the real openai client with the
runtime's settings. Prints the attempts and seconds of the first request (from the
gateway's one error message) and the time of the second (the dead-endpoint
cooldown answers at once). With ``--e2e``: ``mas2c run`` of a one-call spec in the
Docker sandbox against the same dead endpoint: wall time, exit code and the number
of stderr lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from mas2c.gateway import Gateway, HttpUpstream

SPEC = """spec_version: "1"
name: dead
inputs: {q: {type: string}}
outputs: {answer: a}
models: {m: {model: m1}}
agents: {solver: {role: solver, instructions: answer, model: m}}
workflow:
  - {id: ask, kind: call, agent: solver, prompt: "{{ q }}", out: a}
"""


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def in_process(url: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="mas2c-dead-") as tmp:
        sock = Path(tmp) / "gw.sock"
        with HttpUpstream(url, "sk-Zx81QmR4Vt0Lp9Ks") as up, Gateway(sock, up):
            http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)))
            client = openai.OpenAI(
                base_url="http://mas2c-gateway/v1",
                api_key="x",
                http_client=http,  # type: ignore[arg-type]
                max_retries=2,  # honours the gateway's x-should-retry: false
            )
            times, messages = [], []
            for _ in range(2):
                t0 = time.monotonic()
                try:
                    client.chat.completions.create(
                        model="m1", messages=[{"role": "user", "content": "hi"}]
                    )
                except openai.APIStatusError as exc:
                    messages.append(exc.message)
                times.append(time.monotonic() - t0)
    match = re.search(r"failed after (\d+) attempts? in ([\d.]+)s", messages[0])
    return {
        "first_request_s": round(times[0], 2),
        "attempts": int(match.group(1)) if match else None,
        "second_request_s": round(times[1], 3),
        "message": messages[0],
    }


def end_to_end(url: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="mas2c-dead-e2e-") as tmp:
        root = Path(tmp)
        (root / "spec.yaml").write_text(SPEC)
        (root / "in.json").write_text(json.dumps({"q": "hi"}))
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mas2c.cli",
                "run",
                str(root / "spec.yaml"),
                "--input",
                str(root / "in.json"),
                "--run-dir",
                str(root / "run"),
                "--llm",
                url,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OPENAI_API_KEY": "sk-Zx81QmR4Vt0Lp9Ks"},
        )
        elapsed = time.monotonic() - t0
    return {
        "seconds": round(elapsed, 2),
        "exit_code": proc.returncode,
        "stderr_lines": len(proc.stderr.strip().splitlines()),
        "stderr": proc.stderr.strip()[-1500:],
        "key_in_output": "Zx81Q" in proc.stderr + proc.stdout,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--e2e", action="store_true", help="also `mas2c run` in Docker")
    a = p.parse_args()
    url = f"http://user:pw-secret@127.0.0.1:{closed_port()}/v1?api-key=QUERYSECRET"
    figures: dict[str, object] = {"in_process": in_process(url)}
    if a.e2e:
        figures["mas2c_run"] = end_to_end(url)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
