"""Flows (named sub-workflows): scoping, typed arguments, recursion, every stage.

A flow sees only its inputs; a `subflow` step runs it on its own state and stores the
object of its outputs; an `ensemble` with `flow:` runs it n times concurrently and votes
on (or judges) the samples. The validator proves what it can (arguments, recursion,
outputs bound); what it cannot (a value typed only at run time) fails at run time with
the stable code `flow_input` and the pointer of the argument. Runs use the real
`openai` client against the loopback test server.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from conftest import compile_to, events, example_spec, run_package

from mas2c import graph
from mas2c.compile import compile_spec
from mas2c.configure import agent_uses
from mas2c.diff import diff_specs
from mas2c.lang.spec import Spec, json_schema, language_description, static_calls
from mas2c.lang.validate import validate_text
from mas2c.rectify import _fanout_reduction
from mas2c.testserver import ChatRequest, LLMTestServer, ReplyLike

SPEC = """
spec_version: "1"
name: flow-scopes
inputs:
  topic: {type: string}
  facts: {type: array, items: {type: string}}
agents:
  writer: {role: Writer, model: m}
models:
  m: {model: test-model}
flows:
  draft_about:
    description: Drafts a text about a topic from a list of facts.
    inputs:
      subject: {type: string}
      points: {type: array, items: {type: string}}
      style: {type: string, default: plain}
    outputs:
      text: draft
      count: points
    steps:
      - {id: write, kind: call, agent: writer, prompt: "{{ style }} text on {{ subject }}: {{ points | join }}", out: draft}
workflow:
  - {id: first, kind: call, agent: writer, prompt: "Outline {{ topic }}", out: draft}
  - id: second
    kind: subflow
    flow: draft_about
    with: {subject: "{{ topic }}", points: "{{ facts }}"}
    out: result
outputs:
  outline: draft
  text: result.text
  points: result.count
"""


def _spec(text: str = SPEC) -> Spec:
    report = validate_text(text, "flows.yaml")
    assert report.ok, report.format()
    assert report.spec is not None
    return report.spec


def _codes(text: str) -> list[tuple[str, str]]:
    return [(p.code, p.pointer) for p in validate_text(text, "flows.yaml").errors]


def test_a_flow_has_its_own_state_and_typed_arguments(tmp_path: Path) -> None:
    """The flow's `draft` is its own: the workflow's `draft` is unchanged after the call;
    a whole placeholder passes the list itself; a default fills the missing input."""
    spec = _spec()
    compile_to(spec, tmp_path / "build")

    def answer(req: ChatRequest) -> ReplyLike:
        return f"ANSWER to: {req.last_user}"

    with LLMTestServer(answer) as server:
        code, out, trace, stderr = run_package(
            tmp_path / "build", {"topic": "tides", "facts": ["moon", "sun"]}, server
        )
    assert code == 0, stderr
    assert out["outputs"] == {
        "outline": "ANSWER to: Outline tides",
        "text": "ANSWER to: plain text on tides: moon, sun",
        "points": ["moon", "sun"],
    }
    starts = {(e["step"], e["pointer"]) for e in events(trace, "step_start")}
    assert ("write", "/flows/draft_about/steps/0") in starts


def test_a_flow_sees_only_its_inputs() -> None:
    text = SPEC.replace("{{ style }} text", "{{ topic }} text")
    assert _codes(text) == [("MAS301", "/flows/draft_about/steps/0/prompt")]
    unbound_output = SPEC.replace("text: draft", "text: result")
    assert _codes(unbound_output) == [("MAS205", "/flows/draft_about/outputs/text")]


def test_the_outputs_object_is_typed_for_later_steps() -> None:
    reads_missing = SPEC.replace("points: result.count", "points: result.cnt")
    assert _codes(reads_missing) == [("MAS306", "/outputs/points")]


def test_a_value_typed_only_at_run_time_fails_with_a_located_code(tmp_path: Path) -> None:
    loose = SPEC.replace(
        "facts: {type: array, items: {type: string}}", "facts: {type: [array, string]}"
    )
    spec = _spec(loose)
    compile_to(spec, tmp_path / "build")
    with LLMTestServer() as server:
        code, out, _trace, _stderr = run_package(
            tmp_path / "build", {"topic": "tides", "facts": "not a list"}, server
        )
    assert code == 1
    assert out["error"]["code"] == "flow_input"
    assert out["error"]["spec_pointer"] == "/workflow/1/with/points"
    assert "draft_about" in out["error"]["message"]


def test_every_stage_knows_flows(tmp_path: Path) -> None:
    spec = example_spec("math-program-ensemble")
    # static calls: 5 samples x (2 programmer attempts) of the flow
    assert static_calls(spec.workflow[0], spec.flows) == 10
    assert static_calls(spec.workflow[0]) == 0
    # graph: the flow is a cluster, run 5 times by the ensemble
    mermaid = graph.mermaid(spec)
    assert 'subgraph f_solve_by_program["flow solve_by_program"]' in mermaid
    assert 's_sample_programs -->|"runs 5×"| f_solve_by_program_in' in mermaid
    # configure: the flow's agent is sampled, and its note names the flow
    uses = agent_uses(spec)
    assert uses["programmer"].sampler
    assert any("flow `solve_by_program`" in note for note in uses["programmer"].notes)
    # diff: flow steps matched by id
    data = spec.to_data()
    changed = copy.deepcopy(data)
    changed["flows"]["solve_by_program"]["steps"][0]["max_attempts"] = 3
    changes = diff_specs(spec, Spec.model_validate(changed))
    assert [(c.pointer, c.before, c.after) for c in changes] == [
        ("/flows/solve_by_program/steps/write_program/max_attempts", 2, 3)
    ]
    # rectify: the ensemble's fan-out over the flow is reducible
    trial = copy.deepcopy(data)
    assert _fanout_reduction(trial, "/workflow/0") == "/workflow/0/n: 5 -> 2"
    # the published schema and the generator's language
    assert "subflow" in str(json_schema()) and "FlowDef" in str(json_schema())
    assert "- subflow: runs a flow" in language_description()
    # compile: _flows.py only in packages that run a flow
    files = compile_spec(spec).files
    assert "mas2c_math_program_ensemble/_flows.py" in files
    assert (
        "mas2c_self_consistency/_flows.py"
        not in compile_spec(example_spec("self-consistency")).files
    )


def test_a_changed_flow_changes_the_checkpoint_code_hash() -> None:
    spec = example_spec("math-program-ensemble")
    data: dict[str, Any] = spec.to_data()
    data["flows"]["solve_by_program"]["steps"][0]["prompt"] += "Be brief.\n"
    before = compile_spec(spec).files["mas2c_math_program_ensemble/_tables.py"]
    after = compile_spec(Spec.model_validate(data)).files["mas2c_math_program_ensemble/_tables.py"]
    assert before != after


def test_a_judge_closes_an_ensemble_over_a_flow(tmp_path: Path) -> None:
    data = yaml.safe_load(SPEC)
    data["agents"]["judge"] = {"role": "Judge", "model": "m"}
    data["workflow"][1] = {
        "id": "second",
        "kind": "ensemble",
        "flow": "draft_about",
        "with": {"subject": "{{ topic }}", "points": "{{ facts }}"},
        "n": 3,
        "prompt": "Write about {{ topic }}",
        "judge": "judge",
        "out": "result",
    }
    data["outputs"] = {"outline": "draft", "text": "result"}
    spec = Spec.model_validate(data)
    compile_to(spec, tmp_path / "build")

    def answer(req: ChatRequest) -> ReplyLike:
        return "the best one" if req.agent == "judge" else f"draft of {req.last_user}"

    with LLMTestServer(answer, latency_s=0.2) as server:
        server.reset_counters()
        code, out, _trace, stderr = run_package(
            tmp_path / "build", {"topic": "tides", "facts": ["moon"]}, server
        )
        judge = [r for r in server.requests if r.agent == "judge"]
        assert server.max_in_flight == 3
    assert code == 0, stderr
    assert out["outputs"]["text"] == "the best one"
    (request,) = judge
    assert "Write about tides" in request.last_user
    assert request.last_user.count("draft of plain text on tides: moon") == 3


def test_mbpp_repairs_from_the_failing_asserts(tmp_path: Path) -> None:
    """The first function fails every assert; the repair flow gets the code and the
    failing asserts with their errors, and the second attempt passes all three."""
    from test_e2e_examples import INPUTS, SCRIPTS

    compile_to(example_spec("mbpp-repair"), tmp_path / "build")
    with LLMTestServer(SCRIPTS["mbpp-repair"]()) as server:
        code, out, _trace, stderr = run_package(tmp_path / "build", INPUTS["mbpp-repair"], server)
        first, second = [r.last_user for r in server.requests]
    assert code == 0, stderr
    assert out["outputs"]["passed"] is True
    assert [r["passed"] for r in out["outputs"]["results"]] == [True, True, True]
    assert "set(a) & set(b)" in out["outputs"]["code"]
    assert "set(a) | set(b)" in second and "AssertionError" in second
    assert "similar_elements((3, 4, 5, 6), (5, 7, 4, 10))" in second
    assert "set(a) | set(b)" not in first


def test_a_map_runs_a_flow_per_item_concurrently(tmp_path: Path) -> None:
    """A map's body may be a flow (a `subflow` step): each item runs it on its own state,
    concurrently up to max_concurrency (requests in flight at the server)."""
    data = yaml.safe_load(SPEC)
    data["workflow"] = [
        {
            "id": "each",
            "kind": "map",
            "over": "{{ facts }}",
            "max_concurrency": 3,
            "steps": [
                {
                    "id": "draft_one",
                    "kind": "subflow",
                    "flow": "draft_about",
                    "with": {"subject": "{{ item }}", "points": "{{ facts }}"},
                    "out": "one",
                }
            ],
            "result": "{{ one.text }}",
            "out": "texts",
        }
    ]
    data["outputs"] = {"texts": "texts"}
    spec = _spec(yaml.safe_dump(data, sort_keys=False))
    compile_to(spec, tmp_path / "build")

    def answer(req: ChatRequest) -> ReplyLike:
        return f"on {req.last_user.split(':')[0]}"

    with LLMTestServer(answer, latency_s=0.3) as server:
        server.reset_counters()
        code, out, _trace, stderr = run_package(
            tmp_path / "build", {"topic": "t", "facts": ["a", "b", "c", "d"]}, server
        )
        assert server.max_in_flight == 3
    assert code == 0, stderr
    assert out["outputs"]["texts"] == [f"on plain text on {x}" for x in "abcd"]


IMPORTED = """
spec_version: "1"
name: common
agents:
  solver: {role: Solver}
flows:
  solve:
    inputs: {question: {type: string}}
    outputs: {answer: answer}
    steps:
      - {id: think, kind: call, agent: solver, prompt: "Q: {{ question }}", out: answer}
  chained: {import: "./other.yaml#solve"}
workflow:
  - {id: run, kind: subflow, flow: solve, with: {question: "x"}, out: r}
"""

IMPORTER = """
spec_version: "1"
name: importer
inputs: {question: {type: string}}
agents:
  solver: {role: Solver, model: m}
models: {m: {model: test-model}}
flows:
  solve: {import: "REF"}
workflow:
  - {id: first, kind: subflow, flow: solve, with: {question: "{{ question }}"}, out: result}
outputs: {answer: result.answer}
"""


def _importer(tmp_path: Path, ref: str) -> list[tuple[str, str, str]]:
    from mas2c.lang.validate import validate_file

    spec_dir = tmp_path / "specs"
    spec_dir.mkdir(exist_ok=True)
    (spec_dir / "common.yaml").write_text(IMPORTED, encoding="utf-8")
    (tmp_path / "outside.yaml").write_text(IMPORTED, encoding="utf-8")
    path = spec_dir / "main.yaml"
    path.write_text(IMPORTER.replace("REF", ref), encoding="utf-8")
    report = validate_file(path)
    return [(p.code, p.pointer, p.message) for p in report.errors]


def test_a_flow_imported_from_another_spec_is_compiled_in(tmp_path: Path) -> None:
    from mas2c.lang.validate import load_spec

    assert _importer(tmp_path, "./common.yaml#solve") == []
    spec = load_spec(tmp_path / "specs" / "main.yaml")
    assert spec.flows["solve"].steps[0].id == "think"
    workflow = compile_spec(spec).files["mas2c_importer/workflow.py"].decode()
    assert "class SolveFlow" in workflow and '"Q: {{ question }}"' in workflow


def test_flow_imports_stay_inside_the_spec_folder(tmp_path: Path) -> None:
    outside = _importer(tmp_path, "../outside.yaml#solve")
    assert [(c, p) for c, p, _m in outside] == [("MAS214", "/flows/solve/import")]
    assert "leads out of the spec's folder" in outside[0][2]
    absolute = _importer(tmp_path, f"{tmp_path}/outside.yaml#solve")
    assert "must be relative" in absolute[0][2]
    (tmp_path / "specs" / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    linked = _importer(tmp_path, "./link.yaml#solve")
    assert "leads out of the spec's folder" in linked[0][2]
    assert "no such file" in _importer(tmp_path, "./nope.yaml#solve")[0][2]
    assert "has no flow 'other'" in _importer(tmp_path, "./common.yaml#other")[0][2]
    assert "do not chain" in _importer(tmp_path, "./common.yaml#chained")[0][2]
    assert "not `<relative path>#<flow name>`" in _importer(tmp_path, "./common.yaml")[0][2]
    # without a file to be relative to, an import cannot resolve
    text = IMPORTER.replace("REF", "./common.yaml#solve")
    assert _codes(text) == [("MAS214", "/flows/solve/import")]
