"""The run's trace (issue 16 item 1): wall clock, OpenTelemetry-compatible ids, one span
per step, LLM call and tool call with their attributes, content only when asked.

Runs hand-written packages around the real runtime (see tests/test_runtime.py) against
the loopback LLM server with the real openai client.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mas2c.runfolder import LLMCall, RunStart, StepEnd, read_header, read_trace
from mas2c.runfolder import ToolCall as ToolEvent
from mas2c.testserver import ChatRequest, LLMTestServer, Reply, ReplyLike, Script, ToolCall
from tests.test_runtime import FLOW_OK, Pkg, by_agent, load_runtime

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


@pytest.fixture
def rt() -> ModuleType:
    """The runtime imported in-process, for its pure functions."""
    return load_runtime()


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Pkg]:
    def factory(workflow: str, **spec: Any) -> Pkg:
        return Pkg(tmp_path, workflow, **spec)

    return factory


def spans(trace: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every finished span by id: step_end, llm_call, tool_call, exec."""
    kinds = {"step_end", "llm_call", "tool_call", "exec"}
    return {e["span_id"]: e for e in trace if e["event"] in kinds}


def test_every_event_has_wall_clock_and_spans_nest(make: Callable[..., Pkg]) -> None:
    script = Script([(r"^Solve", "ANSWER: 4"), (r"^Left", "left says 4")])
    before = time.time()
    with LLMTestServer(script, latency_s=0.05) as srv:
        pkg = make(FLOW_OK, outputs={"answer": "verdict.answer"})
        res = pkg.run(srv)
    after = time.time()
    assert res.code == 0, res.stderr
    # The run-folder contract (mas2c.runfolder) reads every new field, typed.
    typed = read_trace(pkg.root / "trace.jsonl")
    (run_start,) = typed.of(RunStart)
    assert run_start.trace_id == res.trace[0]["trace_id"] and run_start.span_id
    assert all(e.span_id and e.parent_id and e.start_ts for e in typed.of(StepEnd))
    assert all(c.span_id and c.cost_usd is not None and c.ts for c in typed.of(LLMCall))
    assert [t.tool for t in typed.of(ToolEvent)] == ["normalize"]
    assert all(before <= e["ts"] <= after for e in res.trace)
    start, end = res.trace[0], res.trace[-1]
    assert start["event"] == "run_start" and HEX32.match(start["trace_id"])
    assert HEX16.match(start["span_id"]) and start["parent_id"] is None
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", start["started_at"])
    assert start["python"] and start["openai"] and start["trace_content"] is False
    assert end["event"] == "run_end" and end["span_id"] == start["span_id"]
    root = start["span_id"]

    by_id = spans(res.trace)
    assert all(HEX16.match(i) for i in by_id) and root not in by_id
    steps = {e["step"]: e for e in res.events("step_end")}
    assert steps["first"]["parent_id"] == root and steps["fan"]["parent_id"] == root
    # The parallel branches are children of the parallel step, and ran concurrently.
    fan = steps["fan"]["span_id"]
    assert steps["left"]["parent_id"] == fan and steps["right"]["parent_id"] == fan
    # step_start announces the same span as its step_end.
    for e in res.events("step_start"):
        assert steps[e["step"]]["span_id"] == e["span_id"]
        assert steps[e["step"]]["parent_id"] == e["parent_id"]
    for e in by_id.values():
        assert e["start_ts"] <= e["ts"] and e["parent_id"] in (by_id.keys() | {root})
    calls = {c["agent"]: c for c in res.events("llm_call")}
    assert calls["solver"]["parent_id"] == steps["first"]["span_id"]
    assert calls["s1"]["parent_id"] == steps["left"]["span_id"]
    (tool,) = res.events("tool_call")
    assert tool["parent_id"] == steps["right"]["span_id"] and tool["status"] == "ok"
    solver = calls["solver"]
    assert solver["model"] == "test-model" and solver["model_id"] == "m"
    assert solver["temperature"] == 0.2 and solver["retries"] == 0
    assert solver["finish_reason"] == "stop" and solver["response_model"]
    expected = (solver["prompt_tokens"] * 1.0 + solver["completion_tokens"] * 2.0) / 1e6
    assert abs(solver["cost_usd"] - expected) < 1e-9
    assert sum(c["cost_usd"] for c in calls.values()) == res.out["usage"]["cost_usd"]
    # Content is opt-in: nothing of the prompts or answers by default.
    assert not any("messages" in c or "completion" in c for c in calls.values())
    assert "arguments" not in tool and "result" not in tool


def test_retries_are_spans_with_attempt_and_error(make: Callable[..., Pkg]) -> None:
    flow = """
    async def run_workflow(self) -> None:
        async with self.run.step("only", "/workflow/0"):
            self.state["x"] = await self.run.call("solver", "Solve {{ question }}")
    """
    with LLMTestServer(Script([(r".", "ANSWER: 1")])) as srv:
        srv.inject("status", 2, status=503)
        res = make(flow).run(srv)
    assert res.code == 0, res.stderr
    calls = res.events("llm_call")
    assert [(c["attempt"], c["retries"], c["status"]) for c in calls] == [
        (1, 0, "error"),
        (2, 1, "error"),
        (3, 2, "ok"),
    ]
    assert "503" in calls[0]["error"] and "cost_usd" not in calls[0]
    assert len({c["span_id"] for c in calls}) == 3
    assert len({c["parent_id"] for c in calls}) == 1


def test_debate_and_ensemble_calls_carry_round_sample_and_judge(
    make: Callable[..., Pkg],
) -> None:
    flow = """
    async def run_workflow(self) -> None:
        async with self.run.step("argue", "/workflow/0"):
            self.state["v"] = await self.run.debate(
                ["s1", "s2", "s3"], "Topic: {{ question }}", rounds=2, judge="judge", vote=None
            )
        async with self.run.step("vote", "/workflow/1"):
            self.state["w"] = await self.run.ensemble(
                ["s1", "s2"], "Guess {{ question }}", vote="majority", judge=None
            )
    """
    answers: dict[str, Any] = {f"s{i}": f"ANSWER: {i}" for i in (1, 2, 3)}
    answers["judge"] = {"answer": "s2"}
    with LLMTestServer(by_agent(answers), latency_s=0.05) as srv:
        res = make(flow, outputs={"v": "v.answer"}).run(srv)
    assert res.code == 0, res.stderr
    debate = [c for c in res.events("llm_call") if c["step"] == "argue"]
    labelled = sorted((c.get("round"), c.get("sample"), c["agent"]) for c in debate[:-1])
    assert labelled == [
        (1, 0, "s1"),
        (1, 1, "s2"),
        (1, 2, "s3"),
        (2, 0, "s1"),
        (2, 1, "s2"),
        (2, 2, "s3"),
    ]
    judge = debate[-1]
    assert judge["agent"] == "judge" and judge["role"] == "judge" and "round" not in judge
    ensemble = [c for c in res.events("llm_call") if c["step"] == "vote"]
    assert sorted((c["sample"], c["agent"]) for c in ensemble) == [(0, "s1"), (1, "s2")]
    assert all("round" not in c for c in ensemble)


def test_trace_content_and_traceparent(make: Callable[..., Pkg]) -> None:
    flow = """
    async def run_workflow(self) -> None:
        async with self.run.step("only", "/workflow/0"):
            self.state["x"] = await self.run.call("toolie", "Tidy <{{ question }}>")
    """

    def respond(req: ChatRequest) -> ReplyLike:
        if any(m.get("role") == "tool" for m in req.messages):
            return "done: <b>ok</b>"
        return Reply(tool_calls=[ToolCall("normalize", {"text": " a. "})])

    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with LLMTestServer(respond) as srv:
        pkg = make(flow)
        res = pkg.run(
            srv,
            MAS2C_TRACE_CONTENT="1",
            MAS2C_TRACEPARENT=f"00-{trace_id}-{parent}-01",
        )
    assert res.code == 0, res.stderr
    typed = read_trace(pkg.root / "trace.jsonl")
    assert all(c.messages and c.completion for c in typed.of(LLMCall))
    start = res.trace[0]
    assert start["trace_id"] == trace_id and start["parent_id"] == parent
    assert start["trace_content"] is True
    first, second = res.events("llm_call")
    assert first["messages"][-1] == {"role": "user", "content": "Tidy <q?>"}
    assert first["completion"]["tool_calls"][0]["function"]["name"] == "normalize"
    assert second["completion"]["content"] == "done: <b>ok</b>"
    (tool,) = res.events("tool_call")
    assert tool["arguments"] == {"text": " a. "} and tool["result"] == "a"
    assert tool["agent"] == "toolie"


def test_a_malformed_traceparent_starts_a_fresh_trace(make: Callable[..., Pkg]) -> None:
    flow = """
    async def run_workflow(self) -> None:
        async with self.run.step("only", "/workflow/0"):
            self.state["x"] = 1
    """
    res = make(flow).run(None, MAS2C_TRACEPARENT="00-" + "0" * 32 + "-b7ad6b7169203331-01")
    assert res.code == 0, res.stderr
    assert HEX32.match(res.trace[0]["trace_id"]) and set(res.trace[0]["trace_id"]) != {"0"}
    assert res.trace[0]["parent_id"] is None


@pytest.mark.docker
def test_the_host_span_is_the_parent_across_the_docker_sandbox(
    docker_ready: None, tmp_path: Path
) -> None:
    """`mas2c run` in Docker: the package's run span hangs under run.json's span."""
    from mas2c.run import LLMConfig, run_system

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "in.json").write_text(json.dumps({"question": "What is 2 + 2?"}))
    with LLMTestServer() as srv:
        outcome = run_system(
            root / "specs" / "chain-of-thought.yaml",
            tmp_path / "in.json",
            tmp_path / "run",
            backend="docker",
            llm=LLMConfig(url=srv.base_url, api_key="sk-test-0123456789"),
            on_warning=lambda _m: None,
            trace_content=True,
        )
    assert outcome.ok, outcome.result
    header = json.loads((tmp_path / "run" / "run.json").read_text())
    events = [json.loads(line) for line in (tmp_path / "run" / "trace.jsonl").open()]
    start = events[0]
    assert start["trace_id"] == header["trace_id"] and start["parent_id"] == header["span_id"]
    assert start["trace_content"] is True and header["trace_content"] is True
    assert header["backend"] == "docker" and header["status"] == "ok"
    assert header["started_ts"] <= start["ts"] <= events[-1]["ts"] <= header["finished_ts"]
    (call,) = [e for e in events if e["event"] == "llm_call"]
    assert "What is 2 + 2?" in call["messages"][-1]["content"]
    assert "sk-test-0123456789" not in (tmp_path / "run" / "run.json").read_text()
    typed = read_header(tmp_path / "run" / "run.json")
    assert typed is not None and typed.span_id == header["span_id"]
    assert read_trace(tmp_path / "run" / "trace.jsonl").of(RunStart)[0].parent_id == typed.span_id
    # The checkpoint store comes out of the container beside the trace (what rectify resumes
    # from): the step's values, as the traced checkpoint (with content) has them.
    from mas2c.runfolder import read_checkpoints

    (stored,) = read_checkpoints(tmp_path / "run" / "checkpoints.jsonl")
    (traced,) = [e for e in events if e["event"] == "checkpoint"]
    assert stored.step == "solve" and stored.key == traced["key"]
    assert stored.writes == traced["writes"] and traced["vars"] == sorted(stored.writes)


def test_traced_content_is_bounded_and_keeps_its_shape(rt: ModuleType) -> None:
    """Whatever a model or tool produced, one event's content stays under CONTENT_CAP."""
    huge = [{"role": "user", "content": "x" * 3_000_000}] * 3
    traced = rt._content(huge)
    assert isinstance(traced, list) and traced[0]["role"] == "user"
    assert len(json.dumps(traced)) <= rt.CONTENT_CAP
    many = [{"role": "tool", "content": "y" * 50_000} for _ in range(1000)]
    traced = rt._content(many)
    assert isinstance(traced, list) and len(traced) == 100
    assert all(len(m["content"]) < 2_100 for m in traced)  # the 2,000-character cap fitted
    assert len(json.dumps(traced)) <= rt.CONTENT_CAP
    deep: Any = "bottom"
    for _ in range(50):
        deep = {"d": [deep]}
    assert len(json.dumps(rt._content(deep))) < 10_000
    assert rt._content({"k": ["z" * 10] * 10**6}) == {"k": ["z" * 10] * 100}
    assert rt._content("short") == "short"


# -- every step kind's repeats, told apart (issue 16 audit) ------------------------------------

EVERY_KIND = """
spec_version: "1"
name: every-kind
description: Each construct that repeats a step or a call, once.
inputs:
  question: {type: string}
  docs: {type: array, items: {type: string}}
outputs:
  answer: final
models:
  m: {model: test-model, price: {input_per_mtok: 1, output_per_mtok: 2}}
agents:
  boss: {role: Boss who delegates, instructions: Delegate., model: m, delegates: [helper]}
  helper: {role: Helper, instructions: Help., model: m}
  strict:
    role: Strict formatter
    instructions: Answer in JSON.
    model: m
    output: {type: object, properties: {ok: {type: boolean}}, required: [ok]}
  plain: {role: Plain answerer, instructions: Answer., model: m}
flows:
  guess:
    inputs: {question: {type: string}}
    outputs: {answer: g}
    steps:
      - {id: guess_once, kind: call, agent: plain, prompt: "Guess {{ question }}", out: g}
workflow:
  - {id: delegate, kind: call, agent: boss, prompt: "Do {{ question }}", out: done}
  - id: samples
    kind: ensemble
    flow: guess
    with: {question: "{{ question }}"}
    n: 2
    vote: first
    vote_on: null
    out: guessed
  - id: again
    kind: loop
    max_iterations: 2
    until: "false"
    steps:
      - {id: think, kind: call, agent: plain, prompt: "Think {{ question }}", out: thought}
  - id: each
    kind: map
    over: "{{ docs }}"
    as: doc
    steps:
      - {id: read, kind: call, agent: plain, prompt: "Read {{ doc }}", out: note}
    result: "{{ note }}"
    out: notes
  - id: risky
    kind: call
    agent: strict
    prompt: "Check {{ question }}"
    out: checked
    retry: 1
    fallback:
      - {id: stand_in, kind: call, agent: plain, prompt: "Instead {{ question }}", out: checked}
  - {id: finish, kind: call, agent: plain, prompt: "Finish {{ question }}", out: final}
budgets: {max_llm_calls: 40}
"""


def test_every_repeat_is_told_apart_in_trace_report_and_export(tmp_path: Path) -> None:
    """Map items, loop iterations, samples of an ensemble over a flow, a retried step's
    attempts, its fallback (a span whose steps are its children), format repairs and a
    worker agent called as a tool: each span says which repeat it is, the typed run-folder
    contract reads every event (none skipped), and the report and the export show it."""
    import yaml
    from conftest import compile_to, run_package

    from mas2c.lang.spec import Spec
    from mas2c.otel import build_spans
    from mas2c.report import render_report
    from mas2c.runfolder import FallbackEnd, StepFailed
    from mas2c.tracing import read_run_trace

    spec = Spec.model_validate(yaml.safe_load(EVERY_KIND))
    build = tmp_path / "build"
    compile_to(spec, build)

    def respond(req: ChatRequest) -> ReplyLike:
        system = str(req.messages[0].get("content"))
        if "Boss who delegates" in system:
            if any(m.get("role") == "tool" for m in req.messages):
                return "delegated"
            return Reply(tool_calls=[ToolCall("helper", {"task": "Help <now>"})])
        if "Strict formatter" in system:
            return "not json"  # every try: two format repairs, a retry, then the fallback
        return "fine"

    with LLMTestServer(respond) as srv:
        code, out, trace, stderr = run_package(
            build,
            {"question": "q?", "docs": ["a", "b"]},
            srv,
            env={"MAS2C_TRACE_CONTENT": "1"},
        )
    assert code == 0, (out, stderr[-2000:])
    ends = {e["span_id"]: e for e in trace if e["event"] in ("step_end", "fallback_end")}
    by_step: dict[str, list[dict[str, Any]]] = {}
    for e in trace:
        if e["event"] == "step_end":
            by_step.setdefault(e["step"], []).append(e)
    assert sorted(e["item"] for e in by_step["read"]) == [[0], [1]]
    assert [e["iteration"] for e in by_step["think"]] == [[1], [2]]
    assert sorted(e["sample"] for e in by_step["guess_once"]) == [0, 1]
    risky = by_step["risky"]
    assert [(e["attempt"], e["attempts"], e["status"]) for e in risky] == [
        (1, 2, "error"),
        (2, 2, "error"),
    ]
    assert all(e["code"] == "structured_output" for e in risky)
    (fallback,) = [e for e in trace if e["event"] == "fallback_end"]
    assert fallback["status"] == "ok" and fallback["code"] == "structured_output"
    assert ends[by_step["stand_in"][0]["parent_id"]] is fallback
    strict = [e for e in trace if e["event"] == "llm_call" and e["agent"] == "strict"]
    assert [e.get("format_repair") for e in strict] == [None, 1, 2] * 2
    (worker,) = [e for e in trace if e["event"] == "tool_call"]
    assert worker["worker"] == "helper" and worker["arguments"] == {"task": "Help <now>"}
    (helper,) = [e for e in trace if e["event"] == "llm_call" and e["agent"] == "helper"]
    assert helper["parent_id"] == worker["span_id"]

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "trace.jsonl").write_text("\n".join(json.dumps(e) for e in trace) + "\n")
    (folder / "spec.json").write_text(json.dumps(spec.to_data()))
    (folder / "result.json").write_text(json.dumps(out))
    typed = read_trace(folder / "trace.jsonl")
    assert typed.skipped == 0 and len(typed.of(StepFailed)) == 2
    assert typed.of(FallbackEnd)[0].status == "ok"
    spans = read_run_trace(folder)
    assert not spans.problems
    (fallback_span,) = spans.by_kind("fallback")
    assert fallback_span.name == "fallback of risky"
    page = render_report(folder)
    for label in ("read item 0", "think iter 2", "guess_once #1", "risky attempt 2/2"):
        assert f">{label}</text>" in page, label
    assert ">LLM strict fix 2</text>" in page and ">worker helper</text>" in page
    assert ">fallback of risky</text>" in page and 'class="attempts"' in page
    # The diagram: the step failed twice and its fallback stood in: recovered, not error.
    assert 'data-step="risky" data-status="recovered"' in page
    assert 'data-step="stand_in" data-status="ok"' in page
    # The loop never met its `until`: the result's warning is on the page.
    assert '<table class="warnings"><tr><th>warning</th>' in page
    assert "<td>loop_exhausted</td><td>again</td>" in page
    exported = [dict(s.attributes) for s in build_spans(spans)]
    assert {tuple(a["mas2c.item"]) for a in exported if "mas2c.item" in a} == {(0,), (1,)}
    assert {a.get("mas2c.step.attempt") for a in exported} >= {1, 2}
    assert any(a.get("mas2c.worker") == "helper" for a in exported)
    assert any(a.get("mas2c.format_repair") == 2 for a in exported)
