"""`mas2c solve`: the MAS² loop — generate, configure, compile, run (and rectify) — for one task.

Everything lands in the solve folder:

    task.txt                 the task and the input keys it was given
    spec-generated.yaml      the generator's spec (or the adapted example, see below)
    spec.yaml                the configured spec that was compiled and run
    run-1/                   the sandboxed run folder (result, trace, usage, ...; build/ inside)
    run-1/rectify/round-K/   when run-1 failed: the rectifier's rounds (spec, patch, build, run)
    spec.rectified.yaml      the rectified spec, when a round succeeded
    summary.json, report.md  the answer, cost, tokens and time per phase

The generator asks the LLM for a whole spec, repairing it from validator feedback.
On the embedded model (SmolLM2-135M through llama.cpp) it asks with the compact
prompt and the reduced schema (`mas2c.generate.compact_schema`), which fit its
context and let grammar-constrained decoding carry the structure; `prompt` ("auto",
"full", "compact") overrides the choice. Only when that loop gives up (or the
endpoint refuses the request) does solve fall back to the example spec whose inputs
match the task's input (picked by the LLM from a closed list, or by words on the
embedded model). `summary.json`'s `generation` says which happened and why:
`{"outcome": "generated"|"fallback", "reason", "attempts", "prompt", "model",
"example", "problems"}` (`spec_source` keeps the short form: `generated` or
`example:<name>`). On the embedded model every model id of the spec is bound to it by
its own name (`smollm2-135m-instruct`), so requests, usage and messages name it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mas2c import markdown
from mas2c.errors import RunFailure, terminal_safe
from mas2c.files import check_owned_folder, write_text_atomic
from mas2c.lang.spec import Spec
from mas2c.run import BadInput, LLMConfig, RunOutcome, make_upstream, run_system

Progress = Callable[[str], None]


class SolveError(RunFailure):
    """A phase failed for good; the message names the phase and what is on disk."""

    code = "solve_failed"


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    calls: int = 0
    tokens: int = 0
    note: str = ""


@dataclass
class SolveOutcome:
    solve_dir: Path
    status: str
    answer: dict[str, Any] | None
    phases: list[Phase] = field(default_factory=list)
    spec_source: str = "generated"
    generation: dict[str, Any] = field(default_factory=dict)  # how the spec came to be
    run: RunOutcome | None = None
    rectify: dict[str, Any] | None = None  # mas2c.rectify's summary, when the first run failed
    #: What each sandboxed run of the system cost (run-1, then every rectify round's run).
    run_costs: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        usage = self.run.usage if self.run else {}
        # `rectify` appears only when the first run failed and the rectifier ran.
        extra = {"rectify": self.rectify} if self.rectify is not None else {}
        return {
            "status": self.status,
            "answer": self.answer,
            "solve_dir": str(self.solve_dir),
            "spec_source": self.spec_source,
            "generation": self.generation,
            "phases": [vars(p) for p in self.phases],
            "llm_calls": sum(p.calls for p in self.phases),
            "tokens": sum(p.tokens for p in self.phases),
            # every run of the system (a failed run-1 and rectify rounds cost money too)
            "run_cost_usd": round(sum(self.run_costs), 6)
            if self.run_costs
            else usage.get("cost_usd", 0.0),
            "final_run_cost_usd": usage.get("cost_usd", 0.0),
            "error": (self.run.result.get("error") if self.run and not self.run.ok else None),
            **extra,
        }


def _cost_of(run: RunOutcome) -> float:
    cost = run.usage.get("cost_usd", 0.0) if isinstance(run.usage, dict) else 0.0
    return float(cost) if isinstance(cost, int | float) else 0.0


class _Unfit(Exception):
    """A generated spec that validates but does not fit the task's input."""


class _Meter:
    """Counts the meta-agents' LLM traffic through the gateway, for the progress line."""

    def __init__(self, progress: Progress) -> None:
        self.calls = 0
        self.tokens = 0
        self.phase = ""
        self._progress = progress

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("status") == 200:
            self.calls += 1
            self.tokens += int(event.get("total_tokens") or 0)
            self._progress(f"{self.phase}: {self.calls} LLM call(s), {self.tokens} tokens so far")


@contextmanager
def _timed(phases: list[Phase], name: str, meter: _Meter, progress: Progress) -> Iterator[Phase]:
    phase = Phase(name)
    meter.phase = name
    calls, tokens = meter.calls, meter.tokens
    progress(f"{name} ...")
    started = time.monotonic()
    try:
        yield phase
    finally:
        phase.seconds = round(time.monotonic() - started, 2)
        phase.calls += meter.calls - calls
        phase.tokens += meter.tokens - tokens
        phases.append(phase)
        progress(
            f"{name} done in {phase.seconds:.1f}s" + (f" ({phase.note})" if phase.note else "")
        )


def _refused(exc: Exception) -> bool:
    """An LLM error that is a refusal of that one request (HTTP 400/413/422), not an outage."""
    return re.search(r": HTTP (400|413|422): ", str(exc)) is not None


def _input_names(input_path: Path) -> dict[str, Any]:
    try:
        data = json.loads(input_path.read_text("utf-8"))
    except OSError as exc:
        raise SolveError(f"{input_path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # the same code as `mas2c run`'s check (exit 1, bad_input)
        raise BadInput(f"{input_path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{input_path}: the input must be a JSON object of named inputs")
    return data


def _task_with_inputs(task: str, inputs: dict[str, Any]) -> str:
    described = ", ".join(f"`{k}` ({type(v).__name__})" for k, v in sorted(inputs.items()))
    return f"{task.strip()}\n\nThe system receives exactly these inputs: {described}. Declare them under `inputs` with these names."


def slug(task: str) -> str:
    words = re.findall(r"[a-z0-9]+", task.lower())[:6]
    name = "-".join(words)[:40].strip("-") or "task"
    return name if name[0].isalpha() else "t-" + name


def adapt_example(
    task: str, inputs: dict[str, Any], client: Any, progress: Progress, *, ask: bool = True
) -> tuple[Spec, str]:
    """The example spec whose inputs the task's input provides, picked by the LLM from a closed list.

    With `ask` False (the embedded model, whose pick is no better than chance), the
    closest example by words is taken.
    """
    from mas2c.generate import default_examples_dir, load_examples, pick_examples
    from mas2c.llm import extract_json

    directory = default_examples_dir()
    examples = load_examples(directory) if directory else []
    specs = {e.name: Spec.model_validate(e.data) for e in examples}
    fitting = [
        e for e in examples if specs[e.name].inputs and set(specs[e.name].inputs) <= set(inputs)
    ]
    if not fitting:
        raise SolveError(
            f"no example spec takes the inputs {sorted(inputs)}; rename them (e.g. `question`) or use a stronger model"
        )
    ranked = pick_examples(task, fitting, count=len(fitting))
    choice = ranked[0]
    if len(ranked) > 1 and ask:
        names = [e.name for e in ranked]
        schema = {
            "type": "object",
            "properties": {"archetype": {"type": "string", "enum": names}},
            "required": ["archetype"],
        }
        listing = "\n".join(f"- {e.name}: {e.description.strip().splitlines()[0]}" for e in ranked)
        messages = [
            {
                "role": "system",
                "content": "You choose the best multi-agent system design for a task.",
            },
            {
                "role": "user",
                "content": f"Task: {task}\n\nDesigns:\n{listing}\n\nAnswer with the design name.",
            },
        ]
        try:
            picked = extract_json(
                client.chat(messages, schema=schema, schema_name="archetype")
            ).get("archetype")
            choice = next((e for e in ranked if e.name == picked), choice)
        except Exception as exc:  # the pick is a preference; the ranking stands without it
            progress(f"archetype pick failed ({exc}); using the closest example by words")
    data = specs[choice.name].to_data()
    data["name"] = slug(task)
    data["description"] = f"{task.strip()}\n\n(Adapted from the `{choice.name}` example.)"
    return Spec.model_validate(data), choice.name


#: What `solve` writes at the top of its folder (besides `run-1/`, a run folder).
SOLVE_FILES = frozenset(
    {
        "task.txt",
        "spec-generated.yaml",
        "spec.yaml",
        "spec.rectified.yaml",
        "summary.json",
        "report.md",
    }
)


def _solve_owns(relative: str) -> bool:
    head, _, rest = relative.partition("/")
    return head == "run-1" if rest else relative in SOLVE_FILES


def solve(
    task: str,
    input_path: Path,
    solve_dir: Path,
    *,
    llm: LLMConfig | None = None,
    model: str | None = None,
    pool_path: Path | None = None,
    backend: Literal["docker", "unisolated", "local"] = "docker",
    limits: Any = None,
    loosen: Any = None,
    image: str | None = None,
    max_repairs: int | None = None,
    progress: Progress | None = None,
    on_warning: Callable[[str], None] | None = None,
    rectify_rounds: int = 3,
    prompt: Literal["auto", "full", "compact"] = "auto",
) -> SolveOutcome:
    from mas2c.configure import configure_spec, load_pool
    from mas2c.embedded import EmbeddedUpstream
    from mas2c.generate import GenerateError, generate_spec, json_type_of, write_spec_yaml
    from mas2c.llm import LLMError
    from mas2c.meta import meta_client
    from mas2c.yamledit import edit_spec_text

    say = progress or (lambda _m: None)
    llm = llm or LLMConfig()
    inputs = _input_names(input_path)
    check_owned_folder(solve_dir, marker="task.txt", owns=_solve_owns, what="solve")
    solve_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(solve_dir / "task.txt", task.strip() + "\n")
    outcome = SolveOutcome(solve_dir, "error", None)
    meter = _Meter(say)
    upstream = make_upstream(llm, on_progress=say)
    on_embedded = isinstance(upstream, EmbeddedUpstream)
    embedded: EmbeddedUpstream | None = upstream if isinstance(upstream, EmbeddedUpstream) else None
    if embedded is not None:
        model = model or embedded.model_id  # requests and usage name the model it is
    repairs = max_repairs if max_repairs is not None else (2 if on_embedded else 3)
    compact = prompt == "compact" or (prompt == "auto" and on_embedded)
    outcome.generation = {
        "outcome": "generated",
        "reason": None,
        "attempts": 0,
        "prompt": "compact" if compact else "full",
        "model": embedded.describe() if embedded is not None else (model or None),
        "example": None,
        "problems": [],
    }
    sandbox_options: dict[str, Any] = {
        "backend": backend,
        "limits": limits,
        "loosen": loosen,
        "image": image,
        "on_warning": on_warning,
    }
    try:
        with meta_client(llm, model=model, upstream=upstream, on_event=meter.on_event) as client:
            with _timed(outcome.phases, "generate", meter, say) as phase:
                generation = outcome.generation
                reason = ""
                try:
                    generated = generate_spec(
                        _task_with_inputs(task, inputs),
                        client,
                        max_repairs=repairs,
                        on_progress=say,
                        compact=compact,
                        inputs={k: json_type_of(v) for k, v in inputs.items()},
                        model_label=generation["model"],
                    )
                    spec = generated.spec
                    generation["attempts"] = generated.attempts
                    generation["problems"] = _codes(generated.history)
                    missing = sorted(set(spec.inputs) - set(inputs))
                    if missing:
                        raise _Unfit(f"the spec wants inputs {missing} that the input file lacks")
                    phase.note = f"generated `{spec.name}` in {generated.attempts} answer(s)"
                except LLMError as exc:
                    # The endpoint refused the generator's request (e.g. the prompt, with its
                    # schema and examples, is longer than the model's context): the generator
                    # gave up. Anything else (unreachable, auth, 5xx) is fatal.
                    if not _refused(exc):
                        raise
                    reason = f"the endpoint refused the generator's request: {exc}"
                except GenerateError as exc:
                    generation["attempts"] = exc.attempts
                    generation["problems"] = _codes([*exc.history])
                    codes = ", ".join(sorted({p.code for p in exc.problems})) or "none"
                    reason = f"no valid spec after {exc.attempts} answer(s); last errors: {codes}"
                except _Unfit as exc:
                    reason = str(exc)
                if reason:
                    say(f"the generator gave up ({reason}); adapting an example instead")
                    spec, example = adapt_example(task, inputs, client, say, ask=not on_embedded)
                    outcome.spec_source = f"example:{example}"
                    generation.update(outcome="fallback", reason=reason, example=example)
                    phase.note = f"fell back to the `{example}` example: {reason}"
                if embedded is not None:
                    spec = _on_embedded(spec, embedded)
                first_spec, generated_text = (
                    spec,
                    write_spec_yaml(spec, solve_dir / "spec-generated.yaml"),
                )
            with _timed(outcome.phases, "configure", meter, say) as phase:
                pool = load_pool(pool_path) if pool_path else dict(spec.models)
                if not pool:
                    from mas2c.lang.spec import ModelSpec
                    from mas2c.llm import DEFAULT_MODEL

                    # The model the generator was asked with (meta_client's choice).
                    asked = model or os.environ.get("MAS2C_MODEL") or DEFAULT_MODEL
                    pool = {
                        "default": ModelSpec(
                            model=asked,
                            description=embedded.describe() if embedded else "the only model",
                        )
                    }
                configured = configure_spec(spec, pool, client=client if pool_path else None)
                spec = configured.spec
                phase.note = f"{len(configured.choices)} slot(s) bound"
                # An edit of the generated text: `diff` of the two shows just the bound slots.
                write_text_atomic(
                    solve_dir / "spec.yaml", edit_spec_text(generated_text, first_spec, spec)
                )
        with _timed(outcome.phases, "compile+run", meter, say) as phase:
            run = run_system(
                solve_dir / "spec.yaml",
                input_path,
                solve_dir / "run-1",
                llm=llm,
                upstream=upstream,
                on_event=meter.on_event,
                **sandbox_options,
            )
            phase.note = f"status {run.status}"
            outcome.run_costs.append(_cost_of(run))
        # -- rectify (mas2c.rectify): a failed first run is repaired in bounded rounds ----
        if not run.ok and rectify_rounds > 0:
            with _timed(outcome.phases, "rectify", meter, say) as phase:
                fixed = rectify_run(
                    solve_dir,
                    input_path,
                    rounds=rectify_rounds,
                    llm=llm,
                    model=model,
                    upstream=upstream,
                    meter=meter,
                    progress=say,
                    run_options=sandbox_options,
                )
                outcome.rectify = fixed.to_json()
                outcome.run_costs += [_cost_of(r.run) for r in fixed.rounds if r.run is not None]
                outcome.rectify.pop("history", None)  # kept in run-1/rectify/summary.json
                phase.note = f"{fixed.status} after {fixed.rounds_run} round(s)"
            if fixed.final_run is not None:
                run = fixed.final_run
        # -- end rectify ----------------------------------------------------------------------
        outcome.run = run
        outcome.status = run.status
        outcome.answer = run.result.get("outputs") if run.ok else None
    finally:
        close = getattr(upstream, "close", None)
        if callable(close):
            close()
        _write_summary(outcome)
    return outcome


def _codes(history: list[Any]) -> list[list[str]]:
    """The error codes of each rejected answer, in order."""
    return [sorted({p.code for p in problems if p.severity == "error"}) for problems in history]


def _on_embedded(spec: Spec, engine: Any) -> Spec:
    """The spec with every model of its pool bound to the embedded model, by its own name
    (`mas2c.embedded.bind_models`, the rule `mas2c run` applies too)."""
    from mas2c.embedded import bind_models

    data = spec.to_data()
    bound = bind_models(data, engine.model_id, engine.describe())
    return spec if bound == data else Spec.model_validate(bound)


def rectify_run(
    solve_dir: Path,
    input_path: Path,
    *,
    rounds: int,
    llm: LLMConfig,
    model: str | None,
    upstream: Any,
    meter: _Meter,
    progress: Progress,
    run_options: dict[str, Any],
) -> Any:
    """`mas2c rectify` on the solve's failed run-1 (the rectified spec lands beside spec.yaml)."""
    from mas2c.meta import meta_client
    from mas2c.rectify import rectify

    with meta_client(llm, model=model, upstream=upstream, on_event=meter.on_event) as client:
        return rectify(
            solve_dir / "run-1",
            spec_path=solve_dir / "spec.yaml",
            input_path=input_path,
            max_rounds=rounds,
            write=True,
            overwrite=True,  # spec.rectified.yaml in solve's own folder
            client=client,
            llm=llm,
            upstream=upstream,
            progress=progress,
            on_event=meter.on_event,
            **run_options,
        )


def _write_summary(outcome: SolveOutcome) -> None:
    data = outcome.to_json()
    write_text_atomic(
        outcome.solve_dir / "summary.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    )
    lines = [
        "# mas2c solve",
        "",
        f"Task: {(outcome.solve_dir / 'task.txt').read_text('utf-8').strip()}",
        "",
        f"Status: **{outcome.status}** (spec: {outcome.spec_source})",
        "",
        _generation_line(outcome.generation),
        "",
        "## Answer",
        "",
        "```json",
        json.dumps(outcome.answer, indent=2, ensure_ascii=False),
        "```",
        "",
        "## Phases",
        "",
        "| phase | seconds | LLM calls | tokens | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {p.name} | {p.seconds:.1f} | {p.calls} | {p.tokens} | {markdown.cell(p.note)} |"
        for p in outcome.phases
    ]
    if outcome.rectify is not None:
        r = outcome.rectify
        lines += [
            "",
            f"Rectify: **{r['status']}** in {r['rounds']} round(s), "
            f"{r['rectifier_llm_calls']} rectifier LLM call(s): "
            f"{markdown.cell(str(r['stop_reason']))}",
        ]
    lines += ["", f"Run cost (every run of the system): ${data['run_cost_usd']:.4f}", ""]
    write_text_atomic(outcome.solve_dir / "report.md", "\n".join(lines))


def _generation_line(generation: dict[str, Any]) -> str:
    model = generation.get("model") or "the LLM"
    prompt = generation.get("prompt", "full")
    if generation.get("outcome") == "fallback":
        return (
            f"Spec: fell back to the `{generation.get('example')}` example, because "
            f"{markdown.cell(str(generation.get('reason')))} ({model}, {prompt} prompt)."
        )
    return (
        f"Spec: generated by {model} ({prompt} prompt) in "
        f"{generation.get('attempts', 0)} answer(s), validated."
    )


def print_progress(message: str) -> None:
    """One line per message on stderr; on a terminal the counter line rewrites itself."""
    message = terminal_safe(message)
    if sys.stderr.isatty() and "so far" in message:
        sys.stderr.write(f"\r\033[K{message}")
    else:
        sys.stderr.write(("\r\033[K" if sys.stderr.isatty() else "") + f"mas2c: {message}\n")
    sys.stderr.flush()
