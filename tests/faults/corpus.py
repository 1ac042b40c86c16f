"""The seeded-fault corpus for `mas2c rectify`, and how to run one fault.

Each folder here is one fault: `spec.yaml` (the broken system), `input.json`, and
`fault.yaml`:

    description: what is wrong
    class: the error class (for the results table)
    backends: [unisolated, docker]        # optional; default [unisolated]
    options: {max_cost: 0.01}        # optional; extra arguments of `rectify`
    expect:                          # what rectify must achieve
      fixed: true
      rounds: 1                      # rounds that re-ran the system
      rectifier_llm_calls: 0         # LLM calls made to find fixes
      fixes: [missing_import]        # the fix class of each round
      outputs: {...}                 # optional: outputs of the final run
      resumed: [step ids]            # optional: steps the last run resumed
      system_calls_last_round: 0     # optional: the system's own LLM calls in the last run
      reverted: 1                    # optional: LLM answers reverted
      stop: repeats                  # optional: a word of the stop reason
      original_status: ok            # optional (default: anything but ok)
    llm:                             # scripted answers of the test LLM server, first match wins
      - {role: REGEX, field: system|last_user|all_text, match: REGEX, answers: [...]}
      - {rectifier: true, answers: [...]}   # requests of the rectifier itself

An answer is a string, `{json: value}`, or `{content, latency_s, completion_tokens}`;
`role` is searched in the system prompt (the agent's role comes first; the gateway
does not forward the agent header upstream). A rule's answers are given in turn, the
last one repeating. Requests no rule matches
get the test server's default (a schema instance, or "ANSWER: 42").

Used by tests/test_rectify.py and benchmarks/bench_rectify.py.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mas2c.llm import LLMClient
from mas2c.rectify import RectifyOutcome, rectify
from mas2c.run import LLMConfig, run_system
from mas2c.testserver import ChatRequest, LLMTestServer, Reply, ReplyLike, default_responder

HERE = Path(__file__).resolve().parent
RECTIFIER_MARK = "rectifier of mas2c"


@dataclass
class Fault:
    name: str
    folder: Path
    data: dict[str, Any]

    @property
    def spec(self) -> Path:
        return self.folder / "spec.yaml"

    @property
    def input(self) -> Path:
        return self.folder / "input.json"

    @property
    def expect(self) -> dict[str, Any]:
        return dict(self.data.get("expect", {}))

    @property
    def backends(self) -> list[str]:
        return list(self.data.get("backends", ["unisolated"]))

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.data.get("options", {}))


def load_faults() -> list[Fault]:
    faults = []
    for folder in sorted(p for p in HERE.iterdir() if (p / "fault.yaml").is_file()):
        data = yaml.safe_load((folder / "fault.yaml").read_text("utf-8"))
        faults.append(Fault(folder.name, folder, data))
    return faults


def _reply(answer: Any) -> ReplyLike:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, dict) and "json" in answer:
        return json.dumps(answer["json"])
    if isinstance(answer, dict):
        return Reply(
            content=answer.get("content"),
            latency_s=answer.get("latency_s"),
            completion_tokens=answer.get("completion_tokens"),
            prompt_tokens=answer.get("prompt_tokens"),
        )
    raise TypeError(f"unsupported scripted answer: {answer!r}")


class Responder:
    """The scripted answers of one fault (thread-safe: samples arrive concurrently)."""

    def __init__(self, rules: list[dict[str, Any]]) -> None:
        self.rules = rules
        self.turns = [0] * len(rules)
        self.lock = threading.Lock()

    def matches(self, rule: dict[str, Any], req: ChatRequest) -> bool:
        is_rectifier = RECTIFIER_MARK in req.system
        if rule.get("rectifier"):
            return is_rectifier
        if is_rectifier:
            return False
        if "role" in rule and not re.search(str(rule["role"]), req.system):
            return False
        if "match" in rule:
            text = str(getattr(req, rule.get("field", "last_user")))
            return re.search(str(rule["match"]), text, re.DOTALL) is not None
        return True

    def __call__(self, req: ChatRequest) -> ReplyLike:
        for index, rule in enumerate(self.rules):
            if self.matches(rule, req):
                with self.lock:
                    answers = rule["answers"]
                    answer = answers[min(self.turns[index], len(answers) - 1)]
                    self.turns[index] += 1
                return _reply(answer)
        return default_responder(req)


@dataclass
class FaultResult:
    fault: str
    fault_class: str
    backend: str
    original_status: str
    outcome: RectifyOutcome
    rectifier_requests: int  # requests the server saw from the rectifier
    system_calls: list[int] = field(default_factory=list)  # per run: original, round 1, ...
    seconds: float = 0.0

    @property
    def fixed(self) -> bool:
        return self.outcome.status == "fixed"

    @property
    def fixes(self) -> list[str]:
        return [r.fix.fix_class for r in self.outcome.rounds if r.fix is not None]

    @property
    def reverted(self) -> int:
        return sum(
            1
            for r in self.outcome.rounds
            for a in r.llm_attempts
            if str(a.get("outcome", "")).startswith("reverted")
        )

    def row(self) -> dict[str, Any]:
        deterministic = all(r.fix.deterministic for r in self.outcome.rounds if r.fix is not None)
        return {
            "fault": self.fault,
            "class": self.fault_class,
            "backend": self.backend,
            "fixed": self.fixed,
            "rounds": self.outcome.rounds_run,
            "rectifier_llm_calls": self.outcome.llm_calls,
            "fixes": self.fixes,
            "deterministic": deterministic and bool(self.fixes),
            "system_llm_calls": self.system_calls,
            "stop_reason": self.outcome.stop_reason,
            "seconds": round(self.seconds, 1),
        }


def run_fault(
    fault: Fault,
    workdir: Path,
    server: LLMTestServer,
    backend: str = "unisolated",
    **overrides: Any,
) -> FaultResult:
    """Run the faulty system, then `rectify` it, against the scripted test server."""
    server.responder = Responder(list(fault.data.get("llm", [])))
    server.latency_s = 0.0
    server.reset_counters()
    started = time.monotonic()
    llm = LLMConfig(url=server.base_url, api_key="test")
    run_dir = workdir / "run"
    original = run_system(
        fault.spec,
        fault.input,
        run_dir,
        backend=backend,  # type: ignore[arg-type]
        llm=llm,
        on_warning=lambda _m: None,
    )
    client = LLMClient(server.base_url, "test", model="test-model", max_retries=0)
    options = {**fault.options, **overrides}
    outcome = rectify(
        run_dir,
        client=client,
        llm=llm,
        backend=backend,  # type: ignore[arg-type]
        on_warning=lambda _m: None,
        **options,
    )
    rectifier = sum(1 for r in server.requests if RECTIFIER_MARK in r.system)
    system_calls = [int(original.usage.get("calls", 0))]
    system_calls += [int(r.run.usage.get("calls", 0)) for r in outcome.rounds if r.run is not None]
    return FaultResult(
        fault.name,
        str(fault.data.get("class", "")),
        backend,
        original.status,
        outcome,
        rectifier,
        system_calls,
        time.monotonic() - started,
    )
