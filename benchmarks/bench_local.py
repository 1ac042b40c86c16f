"""The embedded model on this machine, and `mas2c solve` on it.

Measures, through `mas2c.embedded.EmbeddedUpstream` (the engine the gateway uses, with its
thread count and context size):

* load time of the GGUF (first load, then the median of the reloads);
* the first request's latency (llama.cpp warms up on it: weight repacking, page-in);
* prompt processing and generation speed in tokens/s, from llama.cpp's own counters,
  median of 3 runs of a fixed prompt with max_tokens 128 (end of text suppressed, so
  that every run generates 128 tokens);
* `mas2c solve` on the demo task (scripts/demo.sh: "Answer a short arithmetic question
  with a single number.", input {"question": "What is 12 + 30?"}) with `--llm embedded`:
  wall time and the time, LLM calls and tokens of each phase, from summary.json.

* the generator on the embedded model (`--generate`, or `--generate-only`): for each of
  a few tasks (each with its own input names), `mas2c.generate.generate_spec` with the
  compact prompt and schema through the gateway, as `solve` runs it (up to 2 repairs):
  whether the first answer passes the validator, whether the loop ends with a valid spec,
  the error codes of each rejected answer, and the seconds and tokens of each answer.

Writes benchmarks/results/local.json and local.md (the Markdown snippet, also printed);
`--generate-only` writes local-generate.json and local-generate.md instead.

    .venv/bin/python benchmarks/bench_local.py [--sandbox docker|unisolated] [--runs 3] [--no-solve]
        [--generate | --generate-only] [--tasks N]

Timings depend heavily on what else the machine is doing (llama.cpp's threads spin-wait
for each other): the load average at the start and the end is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TASK = "Answer a short arithmetic question with a single number."
QUESTION = {"question": "What is 12 + 30?"}
MAX_TOKENS = 128

# A fixed prompt of a few hundred tokens (prompt processing is measured on all of it).
PROMPT = (
    "You are a careful technical writer. Below are notes about a small library that turns "
    "task descriptions into multi-agent systems. Each system is written as a declarative "
    "spec with inputs, outputs, a pool of models, agents with roles and instructions, tools, "
    "a workflow of steps (call, ensemble, parallel, loop, branch, debate, programmer, test, "
    "tool) and budgets for calls, tokens, cost and time. The spec is validated, compiled into "
    "a standalone Python package, and run in a sandbox whose only way out is a gateway on the "
    "host that holds the API key, counts tokens and enforces the budgets. A generator writes "
    "the spec from the task, an implementer binds models from a pool, and a rectifier repairs "
    "the system when a run fails or costs too much, in bounded rounds, keeping every attempt "
    "on disk for inspection.\n\n"
    "Write a friendly introduction to this library for a newcomer, in plain words, with an "
    "example of a task it could solve and what the user would see at each step.\n\n"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bench_engine(runs: int) -> dict[str, Any]:
    import llama_cpp

    from mas2c.embedded import EmbeddedUpstream, ensure_default_model

    model = ensure_default_model(lambda m: print(f"bench: {m}", file=sys.stderr))
    loads: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        engine = EmbeddedUpstream.load(model)
        loads.append(time.perf_counter() - started)
        engine.close()
    started = time.perf_counter()
    engine = EmbeddedUpstream.load(model)
    loads.append(time.perf_counter() - started)
    llama = engine._llama  # the llama_cpp.Llama behind the upstream
    try:
        started = time.perf_counter()
        engine.complete(
            {
                "model": "bench",
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 8,
            }
        )
        first_request = time.perf_counter() - started
        no_eos = {llama.token_eos(): -100.0}
        samples = []
        for _ in range(runs):
            llama.reset()  # evaluate the whole prompt again (no prefix reuse)
            llama_cpp.llama_perf_context_reset(llama._ctx.ctx)
            started = time.perf_counter()
            out = llama.create_completion(
                PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, logit_bias=no_eos
            )
            wall = time.perf_counter() - started
            perf = llama_cpp.llama_perf_context(llama._ctx.ctx)
            samples.append(
                {
                    "prompt_tokens": int(perf.n_p_eval),
                    "prompt_ms": round(perf.t_p_eval_ms, 1),
                    "generated_tokens": int(perf.n_eval),
                    "generation_ms": round(perf.t_eval_ms, 1),
                    "completion_tokens": out["usage"]["completion_tokens"],
                    "wall_s": round(wall, 3),
                }
            )
        threads = int(llama.context_params.n_threads)
        n_ctx = int(llama.n_ctx())
    finally:
        engine.close()
    pp = [1000 * s["prompt_tokens"] / s["prompt_ms"] for s in samples if s["prompt_ms"] > 0]
    tg = [1000 * s["generated_tokens"] / s["generation_ms"] for s in samples if s["generation_ms"]]
    return {
        "model": model.name,
        "model_mb": round(model.stat().st_size / 2**20, 1),
        "llama_cpp_version": llama_cpp.__version__,
        "threads": threads,
        "n_ctx": n_ctx,
        "load_s_first": round(loads[0], 3),
        "load_s_median": round(statistics.median(loads[1:]), 3),
        "first_request_s": round(first_request, 3),
        "prompt_tokens_per_s": round(statistics.median(pp), 1),
        "generation_tokens_per_s": round(statistics.median(tg), 1),
        "runs": samples,
    }


def bench_solve(sandbox: str) -> dict[str, Any]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OPENAI_") and k not in ("MAS2C_MODEL", "MAS2C_LOCAL_MODEL")
    }
    with tempfile.TemporaryDirectory(prefix="mas2c-bench-local-") as tmp:
        work = Path(tmp)
        (work / "input.json").write_text(json.dumps(QUESTION), encoding="utf-8")
        command = [sys.executable, "-m", "mas2c.cli", "solve", TASK, "--input", "input.json"]
        command += ["--run-dir", "solve", "--llm", "embedded", "--sandbox", sandbox, "--json"]
        started = time.perf_counter()
        proc = subprocess.run(
            command, cwd=work, env=env, capture_output=True, text=True, timeout=1800, check=False
        )
        wall = time.perf_counter() - started
        summary_path = work / "solve" / "summary.json"
        if not summary_path.is_file():
            return {
                "sandbox": sandbox,
                "exit_code": proc.returncode,
                "wall_s": round(wall, 2),
                "error": proc.stderr.strip()[-2000:],
            }
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return {
        "sandbox": sandbox,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 2),
        "status": summary["status"],
        "spec_source": summary["spec_source"],
        "answer": summary["answer"],
        "phases": summary["phases"],
        "llm_calls": summary["llm_calls"],
        "tokens": summary["tokens"],
    }


GENERATE_TASKS: list[tuple[str, dict[str, str]]] = [
    ("Answer a short arithmetic question with a single number.", {"question": "string"}),
    ("Summarise a news article in three bullet points.", {"article": "string"}),
    ("Classify the sentiment of a product review as positive or negative.", {"review": "string"}),
    ("Translate an English sentence into German.", {"sentence": "string"}),
    ("Answer a trivia question; check the answer before giving it.", {"question": "string"}),
    ("Write a Python function from its description.", {"description": "string"}),
]


def _copies_example(spec: dict[str, Any], inputs: dict[str, str]) -> bool:
    from mas2c.generate import _compact_example

    example = _compact_example(inputs)
    return bool(
        spec["agents"].get("solver", {}).get("role") == example["agents"]["solver"]["role"]
        and [st.get("prompt") for st in spec["workflow"]]
        == [st["prompt"] for st in example["workflow"]]
    )


class _AnswerTimer:
    """Seconds and tokens of each generator answer, from the gateway's events."""

    def __init__(self) -> None:
        self.answers: list[dict[str, Any]] = []
        self.last = time.perf_counter()

    def on_event(self, event: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.answers.append(
            {
                "seconds": round(float(event.get("latency_s") or now - self.last), 2),
                "prompt_tokens": int(event.get("prompt_tokens") or 0),
                "completion_tokens": int(event.get("completion_tokens") or 0),
            }
        )
        self.last = now


def bench_generate(count: int, repairs: int = 2) -> dict[str, Any]:
    """The generator on the embedded model over the first `count` tasks."""
    from mas2c.embedded import EmbeddedUpstream, ensure_default_model
    from mas2c.generate import GenerateError, generate_spec
    from mas2c.meta import meta_client
    from mas2c.run import LLMConfig
    from mas2c.solve import _task_with_inputs

    engine = EmbeddedUpstream.load(ensure_default_model())
    rows = []
    try:
        for task, inputs in GENERATE_TASKS[:count]:
            timer = _AnswerTimer()
            print(f"bench: generating for {task!r} ...", file=sys.stderr)
            timer.last = time.perf_counter()
            with meta_client(
                LLMConfig(force_embedded=True), upstream=engine, on_event=timer.on_event
            ) as c:
                names = {k: "x" for k in inputs}
                try:
                    result = generate_spec(
                        _task_with_inputs(task, names),
                        c,
                        compact=True,
                        inputs=inputs,
                        max_repairs=repairs,
                    )
                    valid, attempts, history = True, result.attempts, result.history
                    name = result.spec.name
                    spec = result.spec.to_data()
                except GenerateError as exc:
                    valid, attempts, history, name = False, exc.attempts, exc.history, None
                    spec = None
            rows.append(
                {
                    "task": task,
                    "inputs": sorted(inputs),
                    "valid": valid,
                    "first_answer_valid": valid and attempts == 1,
                    "answers": attempts,
                    "spec": name,
                    "roles": [a["role"] for a in spec["agents"].values()] if spec else [],
                    "prompts": [st.get("prompt") for st in spec["workflow"]] if spec else [],
                    # the example's system verbatim (a small model's typical escape)
                    "copies_example": bool(spec) and _copies_example(spec, inputs),
                    "rejected": [
                        sorted({p.code for p in problems if p.severity == "error"})
                        for problems in history
                    ],
                    "per_answer": timer.answers,
                }
            )
    finally:
        engine.close()
    per_answer = [a["seconds"] for row in rows for a in row["per_answer"]]
    return {
        "model": engine.describe(),
        "n_ctx": engine.n_ctx,
        "repairs": repairs,
        "tasks": len(rows),
        "first_answer_valid": sum(r["first_answer_valid"] for r in rows),
        "copies_example": sum(r["copies_example"] for r in rows),
        "valid": sum(r["valid"] for r in rows),
        "answers": len(per_answer),
        "seconds_per_answer_median": round(statistics.median(per_answer), 2) if per_answer else 0,
        "seconds_per_answer_max": max(per_answer, default=0),
        "rows": rows,
    }


def generate_markdown(gen: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"The generator on the embedded model ({gen['model']}, context {gen['n_ctx']}; compact "
        f"prompt and reduced schema, up to {gen['repairs']} repairs, as `solve` runs it):",
        "",
        "| tasks | first answer valid | valid within the loop | copies the example | answers | "
        "seconds per answer (median / max) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {gen['tasks']} | {gen['first_answer_valid']}/{gen['tasks']} | "
        f"{gen['valid']}/{gen['tasks']} | {gen['copies_example']}/{gen['tasks']} | "
        f"{gen['answers']} | "
        f"{gen['seconds_per_answer_median']:.1f} / {gen['seconds_per_answer_max']:.1f} |",
        "",
        "| task | valid | answers | rejected answers' errors | seconds per answer | roles | "
        "copies the example |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in gen["rows"]:
        rejected = "; ".join(", ".join(codes) for codes in row["rejected"]) or "—"
        seconds = ", ".join(f"{a['seconds']:.1f}" for a in row["per_answer"])
        lines.append(
            f"| {row['task']} | {'yes' if row['valid'] else 'no'} | {row['answers']} | "
            f"{rejected} | {seconds} | {', '.join(row.get('roles', []))} | "
            f"{'yes' if row.get('copies_example') else 'no'} |"
        )
    return lines


def markdown(data: dict[str, Any]) -> str:
    machine = data["machine"]
    engine = data.get("engine")
    if engine is None:  # --generate-only
        lines = [
            "## Embedded local model: the generator",
            "",
            f"Generated by `benchmarks/bench_local.py --generate-only` ({data['date']}; "
            f"{machine['cpu']}, {machine['cpus']} CPU(s), load average {machine['load_before']} "
            f"before and {machine['load_after']} after).",
            *generate_markdown(data["generate"]),
        ]
        return "\n".join(lines) + "\n"
    lines = [
        "## Embedded model",
        "",
        f"Generated by `benchmarks/bench_local.py` ({data['date']}; {machine['cpu']}, "
        f"{machine['cpus']} CPU(s), load average {machine['load_before']} before and "
        f"{machine['load_after']} after; Python {machine['python']}, llama-cpp-python "
        f"{engine['llama_cpp_version']}). The engine is `mas2c.embedded.EmbeddedUpstream` as the "
        f"gateway uses it: {engine['model']} ({engine['model_mb']} MB), {engine['threads']} "
        f"thread(s), context {engine['n_ctx']} tokens. Speeds are llama.cpp's own counters, "
        f"median of {len(engine['runs'])} runs of a fixed prompt with max_tokens {MAX_TOKENS}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| load time, first / median of reloads | {engine['load_s_first']:.2f} s / "
        f"{engine['load_s_median']:.2f} s |",
        f"| first request (warm-up) | {engine['first_request_s']:.2f} s |",
        f"| prompt processing | {engine['prompt_tokens_per_s']:.0f} tokens/s "
        f"({engine['runs'][0]['prompt_tokens']} tokens) |",
        f"| generation | {engine['generation_tokens_per_s']:.0f} tokens/s "
        f"({engine['runs'][0]['generated_tokens']} tokens) |",
    ]
    solve = data.get("solve")
    if solve:
        lines += [
            "",
            f"`mas2c solve` on the demo task (`--llm embedded --sandbox {solve['sandbox']}`):",
            "",
        ]
        if "phases" not in solve:
            lines.append(f"failed (exit {solve['exit_code']}): {solve.get('error', '')[-300:]}")
        else:
            lines += [
                f"status **{solve['status']}** (exit {solve['exit_code']}), spec "
                f"`{solve['spec_source']}`, answer `{json.dumps(solve['answer'])}`, "
                f"{solve['wall_s']:.1f} s wall time in all (including start-up).",
                "",
                "| phase | seconds | LLM calls | tokens | note |",
                "| --- | --- | --- | --- | --- |",
            ]
            lines += [
                f"| {p['name']} | {p['seconds']:.1f} | {p['calls']} | {p['tokens']} | {p['note']} |"
                for p in solve["phases"]
            ]
    if data.get("generate"):
        lines += generate_markdown(data["generate"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measure (default 3)")
    parser.add_argument(
        "--sandbox",
        choices=["docker", "unisolated"],
        default="docker",
        help="sandbox for the solve (default docker, as the demo)",
    )
    parser.add_argument("--no-solve", action="store_true", help="measure the engine only")
    parser.add_argument(
        "--generate", action="store_true", help="also measure the generator over a few tasks"
    )
    parser.add_argument("--generate-only", action="store_true", help="measure the generator only")
    parser.add_argument(
        "--tasks", type=int, default=len(GENERATE_TASKS), help="generator tasks (default all)"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("bench: llama-cpp-python is not installed (bash scripts/setup.sh --embedded)")
        return 1
    load_before = load_average()
    data: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M")}
    if not args.generate_only:
        print("bench: measuring the engine ...", file=sys.stderr)
        data["engine"] = bench_engine(max(1, args.runs))
    if args.generate or args.generate_only:
        data["generate"] = bench_generate(max(1, args.tasks))
    if not args.no_solve and not args.generate_only:
        print(f"bench: mas2c solve --llm embedded --sandbox {args.sandbox} ...", file=sys.stderr)
        data["solve"] = bench_solve(args.sandbox)
    data["machine"] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_before": load_before,
        "load_after": load_average(),
    }
    text = markdown(data)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "local-generate" if args.generate_only else "local"  # keeps the engine's figures
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (RESULTS / f"{stem}.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    print(f"bench: wrote {RESULTS / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
