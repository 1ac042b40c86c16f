"""The HumanEval harness, measured: its scorer check over all 164 problems, and an oracle run.

    python benchmarks/bench_humaneval.py [--sandbox docker] [--limit-oracle 20] [--workers 2]

1. `mas2c bench humaneval --check-scorer`: every canonical solution must pass and every
   deliberately broken one (two kinds) must fail, through the sandboxed scorer.
2. `mas2c bench humaneval --limit N --llm URL` with specs/code-generation.yaml against the
   loopback test server scripted to answer with the canonical solution (an oracle): pass@1
   must be 100%, and the time per problem is the harness's own cost (a sandboxed MAS run
   plus a sandboxed scoring) with an instant LLM.

Both run through the CLI, as a user would, into fresh run folders under benchmarks/.work/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mas2c.bench import canonical_solution, load_problems
from mas2c.testserver import ChatRequest, LLMTestServer

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "humaneval"


def shown(argv: list[str]) -> str:
    """The command as a user types it (without --json, with a placeholder run folder)."""
    words = ["mas2c", *(a for a in argv[1:] if a != "--json")]
    return " ".join(words).replace(str(WORK), "RUN")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandbox", default="docker", choices=["docker", "unisolated"])
    parser.add_argument(
        "--limit-check", type=int, help="problems for the scorer check (default all)"
    )
    parser.add_argument("--limit-oracle", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "humaneval.json"))
    args = parser.parse_args()
    mas2c = str(Path(sys.executable).parent / "mas2c")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    started = time.time()
    result: dict[str, object] = {
        "benchmark": "humaneval",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "sandbox": args.sandbox,
        "workers": args.workers,
    }

    check_cmd = [mas2c, "bench", "humaneval", "--check-scorer", "--sandbox", args.sandbox]
    check_cmd += ["--workers", str(args.workers), "--run-dir", str(WORK / "check"), "--json"]
    if args.limit_check:
        check_cmd += ["--limit", str(args.limit_check)]
    t0 = time.monotonic()
    proc = subprocess.run(check_cmd, capture_output=True, text=True)
    result["check"] = {
        "command": shown(check_cmd),
        "exit_code": proc.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "summary": json.loads(proc.stdout) if proc.stdout.strip() else None,
        "stderr_tail": proc.stderr[-600:] if proc.returncode else "",
    }
    print(f"humaneval: scorer check exit {proc.returncode}", file=sys.stderr)

    problems = load_problems(args.limit_oracle)

    def oracle(req: ChatRequest) -> str:
        for p in problems:
            if p.prompt.strip() in req.all_text:
                return f"```python\n{canonical_solution(p)}\n```"
        return "```python\nraise SystemExit('unknown problem')\n```"

    with LLMTestServer(oracle) as server:
        run_cmd = [mas2c, "bench", "humaneval", "--limit", str(args.limit_oracle)]
        run_cmd += ["--sandbox", args.sandbox, "--workers", str(args.workers)]
        run_cmd += ["--llm", server.base_url, "--run-dir", str(WORK / "oracle"), "--json"]
        t0 = time.monotonic()
        proc = subprocess.run(run_cmd, capture_output=True, text=True)
        result["oracle"] = {
            "command": shown(run_cmd).replace(server.base_url, "TEST_SERVER_URL"),
            "exit_code": proc.returncode,
            "seconds": round(time.monotonic() - t0, 1),
            "summary": json.loads(proc.stdout) if proc.stdout.strip() else None,
            "stderr_tail": proc.stderr[-600:] if proc.returncode else "",
        }
    print(f"humaneval: oracle run exit {proc.returncode}", file=sys.stderr)
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    print(f"humaneval: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
