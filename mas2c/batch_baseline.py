"""`mas2c batch --baseline cot-sc`: chain-of-thought self-consistency beside the system, at matched cost.

Contract (after the system's own batch has run):

1. **Pilot**: the CoT-SC spec with one sample runs on the first ``--pilot`` rows
   (``RUN_DIR/baseline/pilot/``): its mean cost is the cost of one sample.
2. **Matching**: n = round(the system's mean cost on those same rows / the pilot's), within
   [1, 64]. When either side has no cost (models without prices) tokens are matched instead;
   ``summary.json`` says which (``matched_on``).
3. **Baseline**: the CoT-SC spec with n samples (``RUN_DIR/baseline/cot-sc.yaml``: one
   reasoner with structured output ``{reasoning, answer}``, sampled n times at temperature
   0.7, majority vote on ``answer``) runs on every row (``RUN_DIR/baseline/run/``) with the
   same scorer, engine, sandbox and cost cap (what the system spent counts against it).
4. **Comparison** (``summary.json`` ``baseline``, and ``report.md``): accuracy with its 95%
   interval and mean cost of each, and the paired difference system − baseline on the rows
   both finished with its 95% interval (Newcombe's method 10 for pass/fail scores, else a
   normal interval on the per-row differences).

The baseline's model is ``--baseline-model`` (a model id of the system's spec), else the
cheapest priced model of the spec, else its first; with ``--solve`` (no spec) the model of
``specs/chain-of-thought.yaml``. Its question is the row field ``--baseline-field``, else the
field the system's ``question`` input reads, else the row's ``question``. The ``code`` scorer
has no baseline (a vote over programs is not CoT-SC): that is an error before anything runs.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from mas2c.batch import (
    BatchError,
    BatchOptions,
    Row,
    _run_one,
    accuracy,
    dataset_label,
    lookup,
    mean_interval,
    newcombe_paired,
    read_results,
    report,
    row_place,
    select_rows,
)
from mas2c.files import write_text_atomic

__all__ = ["cot_sc_spec", "run_baseline"]

MAX_SAMPLES = 64  # the ensemble step's bound
COT_INSTRUCTIONS = """\
Work through the problem in `reasoning` before you answer: restate what is asked, solve it
in small numbered steps showing every calculation, and check the result against the
question. Then put only the final answer in `answer`: a number, a word or a short phrase,
with no explanation and no units unless the question asks for them.
"""


def _model_for(options: BatchOptions) -> tuple[str, dict[str, Any]]:
    """The baseline's model: (id, definition) from the system's spec, or the CoT example's."""
    from mas2c.lang.validate import load_spec

    if options.spec is None or options.solve_task is not None:
        example = Path(__file__).resolve().parent.parent / "specs" / "chain-of-thought.yaml"
        shipped = Path(__file__).resolve().parent / "_specs" / "chain-of-thought.yaml"
        spec = load_spec(shipped if shipped.is_file() else example)
    else:
        spec = load_spec(options.spec)
    models = {k: v.model_dump(exclude_none=True, by_alias=True) for k, v in spec.models.items()}
    if not models:
        raise BatchError("the baseline needs a model: the spec declares none")
    if options.baseline_model is not None:
        if options.baseline_model not in models:
            raise BatchError(
                f"--baseline-model {options.baseline_model!r} is not a model of the spec "
                f"(its models: {sorted(models)})"
            )
        return options.baseline_model, models[options.baseline_model]

    def price(item: tuple[str, dict[str, Any]]) -> float:
        p = item[1].get("price") or {}
        return float(p.get("input_per_mtok", 0.0)) + float(p.get("output_per_mtok", 0.0))

    priced = [item for item in models.items() if item[1].get("price")]
    return min(priced, key=price) if priced else next(iter(models.items()))


def cot_sc_spec(model_id: str, model: dict[str, Any], samples: int) -> dict[str, Any]:
    """The CoT-SC spec with `samples` samples of one reasoner and a majority vote."""
    return {
        "spec_version": "1",
        "name": "cot-sc",
        "description": (
            f"Chain of thought with self-consistency: {samples} sample(s) of one reasoner, "
            "majority vote on the final answer (the matched-cost baseline of mas2c batch)."
        ),
        "inputs": {"question": {"type": "string"}},
        "outputs": {"answer": "voted.answer", "reasoning": "voted.reasoning"},
        "models": {model_id: model},
        "agents": {
            "reasoner": {
                "role": "Careful problem solver who reasons step by step before answering",
                "instructions": COT_INSTRUCTIONS,
                "model": model_id,
                "temperature": 0.7,
                "output": {
                    "type": "object",
                    "properties": {
                        "reasoning": {"type": "string"},
                        "answer": {"type": "string"},
                    },
                    "required": ["reasoning", "answer"],
                },
            }
        },
        "workflow": [
            {
                "id": "sample_and_vote",
                "kind": "ensemble",
                "agent": "reasoner",
                "n": samples,
                "prompt": "Question:\n{{ question }}\n\nThink step by step, then give the final answer.",
                "vote": "majority",
                "out": "voted",
            }
        ],
        "budgets": {"max_llm_calls": samples + 4, "timeout_s": 900},
    }


def _question_field(options: BatchOptions, rows: list[Row]) -> str:
    if options.baseline_field:
        field = options.baseline_field
    elif "question" in options.mapping:
        field = options.mapping["question"]
    else:
        field = "question"
    missing = [r for r in rows if not isinstance(lookup(r.data, field), str)]
    if missing:
        raise BatchError(
            f"{row_place(missing[0], dataset_label(options))}: the baseline's question: no text field "
            f"{field!r}; name one with --baseline-field"
        )
    return field


def _write_spec(path: Path, data: dict[str, Any]) -> Path:
    text = "# Generated by mas2c batch --baseline cot-sc.\n" + yaml.safe_dump(
        data, sort_keys=False, allow_unicode=True, width=100
    )
    write_text_atomic(path, text)
    return path


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r.get(key, 0.0) or 0.0) for r in rows]
    return statistics.fmean(values) if values else 0.0


def check_baseline(options: BatchOptions) -> None:
    """Refuse a baseline that cannot run, before the system spends anything."""
    if options.scorer == "code":
        raise BatchError(
            "--baseline cot-sc votes on short answers; it has no meaning with the code scorer"
        )
    rows = select_rows(options)
    _question_field(options, rows)
    _model_for(options)


def run_baseline(options: BatchOptions, system: dict[str, Any]) -> dict[str, Any]:
    """Pilot, match, run the baseline, compare; returns the system's summary with `baseline`."""
    rows = select_rows(options)
    field = _question_field(options, rows)
    model_id, model = _model_for(options)
    folder = options.run_dir / "baseline"
    folder.mkdir(parents=True, exist_ok=True)
    system_rows = read_results(options.run_dir / "results.jsonl")
    pilot_rows = rows[: options.pilot_rows]
    spent = float(system.get("cost_usd") or 0.0)

    def sub(run_dir: Path, spec: Path, chosen: list[Row], label: str, spent: float) -> Any:
        cap = None if options.max_cost_usd is None else options.max_cost_usd - spent
        return replace(
            options,
            run_dir=run_dir,
            rows=chosen,
            dataset_sha256=options.dataset_sha256,
            spec=spec,
            solve_task=None,
            mapping={"question": field},
            output="answer",
            baseline=None,
            max_cost_usd=cap,
            label=label,
            extra_config={"baseline": "cot-sc", "system_run": str(options.run_dir)},
        )

    result: dict[str, Any] = {"name": "cot-sc", "model": model_id}
    if options.max_cost_usd is not None and spent >= options.max_cost_usd:
        result["status"] = "not run: the cost cap was reached by the system"
        return _finish(options, system, result, rows)
    pilot_spec = _write_spec(folder / "cot-sc-pilot.yaml", cot_sc_spec(model_id, model, 1))
    pilot = _run_one(sub(folder / "pilot", pilot_spec, pilot_rows, "baseline pilot", spent))
    spent += float(pilot.get("cost_usd") or 0.0)
    pilot_done = read_results(folder / "pilot" / "results.jsonl")
    keys = [r.key for r in pilot_rows if r.key in pilot_done and r.key in system_rows]
    if not keys:
        result["status"] = "not run: no pilot row finished on both sides"
        return _finish(options, system, result, rows)
    sys_pilot = [system_rows[k] for k in keys]
    base_pilot = [pilot_done[k] for k in keys]
    matched_on = "cost_usd"
    if _mean(sys_pilot, "cost_usd") <= 0 or _mean(base_pilot, "cost_usd") <= 0:
        matched_on = "tokens"
    target, per_sample = _mean(sys_pilot, matched_on), _mean(base_pilot, matched_on)
    samples = max(1, min(MAX_SAMPLES, round(target / per_sample) if per_sample > 0 else 1))
    result.update(
        matched_on="cost" if matched_on == "cost_usd" else "tokens",
        pilot_rows=len(keys),
        system_pilot_mean=round(target, 8),
        baseline_per_sample_mean=round(per_sample, 8),
        samples=samples,
    )
    spec = _write_spec(folder / "cot-sc.yaml", cot_sc_spec(model_id, model, samples))
    base = _run_one(sub(folder / "run", spec, rows, f"baseline cot-sc n={samples}", spent))
    base_done = read_results(folder / "run" / "results.jsonl")
    result["status"] = "complete" if base.get("complete") else (base.get("stopped") or "incomplete")
    result.update(_compare(rows, system_rows, base_done, base, pilot))
    return _finish(options, system, result, rows)


def _compare(
    rows: list[Row],
    system_rows: dict[str, dict[str, Any]],
    base_rows: dict[str, dict[str, Any]],
    base_summary: dict[str, Any],
    pilot_summary: dict[str, Any],
) -> dict[str, Any]:
    keys = [r.key for r in rows if r.key in system_rows and r.key in base_rows]
    sys_scores = [float(system_rows[k].get("score", 0.0)) for k in keys]
    base_scores = [float(base_rows[k].get("score", 0.0)) for k in keys]
    binary = all(s in (0.0, 1.0) for s in sys_scores + base_scores)
    if binary:
        diff, low, high = newcombe_paired(
            [s == 1.0 for s in sys_scores], [s == 1.0 for s in base_scores]
        )
        method = "newcombe"
    else:
        diffs = [a - b for a, b in zip(sys_scores, base_scores, strict=True)]
        diff = statistics.fmean(diffs) if diffs else 0.0
        low, high = mean_interval(diffs)
        method = "normal"

    def side(scores: list[float], rows_: list[dict[str, Any]]) -> dict[str, Any]:
        cost = sum(float(r.get("cost_usd", 0.0) or 0.0) for r in rows_)
        return {
            **accuracy(scores),
            "cost_usd": round(cost, 6),
            "cost_per_row_mean": round(cost / len(rows_), 8) if rows_ else None,
            "tokens_per_row_mean": round(_mean(rows_, "tokens"), 1),
        }

    return {
        "paired_rows": len(keys),
        "system": side(sys_scores, [system_rows[k] for k in keys]),
        "baseline": side(base_scores, [base_rows[k] for k in keys]),
        "difference": round(diff, 4),
        "difference_ci95": [round(low, 4), round(high, 4)],
        "difference_method": method,
        "baseline_failures": base_summary.get("failures", {}),
        "pilot_cost_usd": pilot_summary.get("cost_usd", 0.0),
        "baseline_cost_usd": base_summary.get("cost_usd", 0.0),
    }


def comparison_markdown(result: dict[str, Any]) -> str:
    lines = ["## Baseline: CoT-SC at matched cost", ""]
    if "system" not in result:
        return "\n".join([*lines, f"Baseline {result.get('status')}.", ""])
    s, b = result["system"], result["baseline"]

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def ci(v: Any) -> str:
        return "-" if not v else f"[{pct(v[0])}, {pct(v[1])}]"

    def cost(v: Any) -> str:
        return "-" if v is None else f"{v:.6f}"

    low, high = result["difference_ci95"]
    lines += [
        f"CoT-SC with {result['samples']} sample(s) of `{result['model']}`, matched on mean "
        f"{result['matched_on']} over {result['pilot_rows']} pilot row(s); "
        f"{result['paired_rows']} row(s) finished by both; baseline {result['status']}.",
        "",
        "| | accuracy | 95% interval | cost/row (USD) | tokens/row |",
        "| --- | --- | --- | --- | --- |",
        f"| system | {pct(s['accuracy'])} | {ci(s['ci95'])} | {cost(s['cost_per_row_mean'])} | "
        f"{s['tokens_per_row_mean']} |",
        f"| cot-sc | {pct(b['accuracy'])} | {ci(b['ci95'])} | {cost(b['cost_per_row_mean'])} | "
        f"{b['tokens_per_row_mean']} |",
        "",
        f"Difference (system - baseline): {100 * result['difference']:+.1f} points, 95% interval "
        f"[{100 * low:+.1f}, {100 * high:+.1f}] ({result['difference_method']}).",
        "",
    ]
    return "\n".join(lines)


def _finish(
    options: BatchOptions, system: dict[str, Any], result: dict[str, Any], rows: list[Row]
) -> dict[str, Any]:
    summary = {**system, "baseline": result}
    run_dir = options.run_dir
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    done = read_results(run_dir / "results.jsonl")
    write_text_atomic(
        run_dir / "report.md", report(rows, done, summary, extra=comparison_markdown(result))
    )
    return summary
