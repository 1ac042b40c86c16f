"""The implementer: binding model slots from a pool, by rule and by LLM (test LLM server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mas2c.configure import (
    ConfigureError,
    PoolError,
    agent_uses,
    configure_spec,
    load_pool,
    rank_pool,
)
from mas2c.generate import spec_to_yaml
from mas2c.lang.spec import ModelSpec, Price, Spec, spec_hash
from mas2c.lang.validate import validate_file, validate_text
from mas2c.llm import LLMClient
from mas2c.testserver import ChatRequest, LLMTestServer, Script

SPECS = Path(__file__).resolve().parent.parent / "specs"

SPEC_YAML = """\
spec_version: "1"
name: review-pipeline
description: Solvers are sampled, a judge picks, a writer drafts, a critic reviews in a loop.
inputs:
  question: {type: string}
outputs:
  answer: verdict.answer
  report: report
models:
  house: {model: house-model, description: the author's own choice}
agents:
  solver: {role: Careful solver, instructions: Solve it step by step.}
  judge:
    role: Impartial judge
    instructions: Pick the best-supported answer.
    output: {type: object, properties: {answer: {type: string}}, required: [answer]}
  writer: {role: Technical writer, instructions: Write a short report., model: house}
  critic:
    role: Strict critic
    output: {type: object, properties: {ok: {type: boolean}}, required: [ok]}
  helper: {role: Assistant who formats the final report}
workflow:
  - {id: sample, kind: ensemble, agent: solver, n: 4, prompt: "{{ question }}", judge: judge, out: verdict}
  - {id: draft, kind: call, agent: writer, prompt: "{{ verdict.answer }}", out: report}
  - {id: first_review, kind: call, agent: critic, prompt: "{{ report }}", out: review}
  - id: improve
    kind: loop
    max_iterations: 2
    until: review.ok
    steps:
      - {id: redo, kind: call, agent: writer, prompt: "{{ report }}", out: report}
      - {id: review_again, kind: call, agent: critic, prompt: "{{ report }}", out: review}
  - {id: polish, kind: call, agent: helper, prompt: "{{ report }}", out: polished}
"""

POOL_YAML = """\
# the pool: a spec's `models` map
mini:
  model: gpt-4o-mini
  description: Cheap and fast, for routine work.
  price: {input_per_mtok: 0.15, output_per_mtok: 0.6}
big:
  model: gpt-4o
  description: Strong reasoning, expensive.
  price: {input_per_mtok: 2.5, output_per_mtok: 10}
mid:
  model: mid-model
  description: A general-purpose model.
  price: {input_per_mtok: 0.5, output_per_mtok: 1.5}
coder:
  model: qwen-coder
  description: Writes good Python code.
  price: {input_per_mtok: 0.4, output_per_mtok: 1.2}
"""


def parse_spec(text: str) -> Spec:
    report = validate_text(text)
    assert report.ok and report.spec is not None, report.format()
    return report.spec


@pytest.fixture
def spec() -> Spec:
    return parse_spec(SPEC_YAML)


@pytest.fixture
def pool(tmp_path: Path) -> dict[str, ModelSpec]:
    path = tmp_path / "pool.yaml"
    path.write_text(POOL_YAML)
    return load_pool(path)


@pytest.fixture
def srv() -> Iterator[LLMTestServer]:
    with LLMTestServer() as server:
        yield server


def client_for(server: LLMTestServer) -> LLMClient:
    return LLMClient(server.base_url, "test", model="test-model", max_retries=0)


def assert_valid(spec: Spec) -> None:
    report = validate_text(json.dumps(spec.to_data()))
    assert report.ok, report.format()
    assert report.spec is not None and spec_hash(report.spec) == spec_hash(spec)


# -- pool files -------------------------------------------------------------------------------


def test_load_pool_shapes(tmp_path: Path, pool: dict[str, ModelSpec]) -> None:
    assert list(pool) == ["mini", "big", "mid", "coder"]
    assert pool["big"].price == Price(input_per_mtok=2.5, output_per_mtok=10)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"models": {"a": {"model": "m-a"}, "b": "m-b"}}))
    loaded = load_pool(wrapped)
    assert loaded == {"a": ModelSpec(model="m-a"), "b": ModelSpec(model="m-b")}
    # A pool whose only model is called `models` is not mistaken for the wrapper.
    single = tmp_path / "single.yaml"
    single.write_text("models: {model: gpt-4o}\n")
    assert load_pool(single) == {"models": ModelSpec(model="gpt-4o")}


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("cheap:\n  model: m\n  prize: 3\n", r"cheap\.prize: unknown key"),
        ("models:\n  cheap:\n    model: m\n    temperature: 9\n", r"models\.cheap\.temperature:"),
        ("cheap:\n  description: no model\n", r"cheap\.model: Field required"),
        ("cheap: [1, 2]\n", r"cheap: expected a mapping"),
        ("- a\n- b\n", r"a pool is a mapping of model ids"),
        ("{}\n", r"the pool has no models"),
        ("cheap: {model: m\n", r"pool\.yaml:\d+:\d+: not valid YAML/JSON"),
    ],
)
def test_load_pool_errors(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(text)
    with pytest.raises(PoolError, match=pattern) as info:
        load_pool(path)
    assert str(path) in str(info.value)


def test_load_pool_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match=r"nope\.yaml: cannot read the pool"):
        load_pool(tmp_path / "nope.yaml")


# -- the rule ---------------------------------------------------------------------------------


def test_rank_pool(pool: dict[str, ModelSpec]) -> None:
    assert rank_pool(pool) == ["mini", "coder", "mid", "big"]
    unpriced = {**pool, "x": ModelSpec(model="x-large", description="strong and capable")}
    # No price counts as the median price; the keywords break the tie upward.
    assert rank_pool(unpriced).index("x") == rank_pool(unpriced).index("mid") + 1


def test_agent_uses(spec: Spec) -> None:
    uses = agent_uses(spec)
    assert uses["judge"].judge and not uses["judge"].sampler
    assert uses["solver"].sampler
    assert uses["critic"].decider
    assert not uses["writer"].decider
    assert any("inside loop `improve`" in note for note in uses["writer"].notes)
    assert uses["solver"].notes == ["sampled 4x in ensemble `sample` (a judge decides)"]


def test_rule_binds_every_unbound_slot(spec: Spec, pool: dict[str, ModelSpec]) -> None:
    result = configure_spec(spec, pool)
    chosen = {agent: choice.model for agent, choice in result.choices.items()}
    assert chosen == {
        "solver": "mini",  # ensemble sampler: cheapest
        "judge": "big",  # judge: strongest
        "critic": "big",  # its output decides the loop: strongest
        "helper": "mid",  # everything else: the cheapest "general" model
    }
    assert all(c.by == "rule" and c.reason for c in result.choices.values())
    # Bound agents are left alone; the spec's own models stay; used pool models are added.
    assert result.spec.agents["writer"].model == "house"
    assert list(result.spec.models) == ["house", "big", "mid", "mini"]
    assert all(agent.model for agent in result.spec.agents.values())
    assert result.added_models == {"big": "big", "mid": "mid", "mini": "mini"}
    assert result.warnings == []
    assert_valid(result.spec)
    # The input spec is untouched.
    assert spec.agents["solver"].model is None
    assert "big" not in spec.models
    # The configured spec writes out and reads back as the same spec.
    again = validate_text(spec_to_yaml(result.spec))
    assert again.spec is not None and spec_hash(again.spec) == spec_hash(result.spec)
    assert result.to_json()["choices"]["judge"] == {
        "model": "big",
        "reason": result.choices["judge"].reason,
        "by": "rule",
    }


def test_rule_programmer_and_fallbacks(pool: dict[str, ModelSpec]) -> None:
    code_spec = validate_file(SPECS / "code-generation.yaml").spec
    assert code_spec is not None
    result = configure_spec(code_spec, pool, rebind=True)
    assert {a: c.model for a, c in result.choices.items()} == {
        "programmer": "coder",
        "repairer": "coder",
    }
    # The spec's own models that nothing uses after the rebind are dropped.
    assert list(result.spec.models) == ["coder"]
    # Without a code model: the strongest; without a "general" model: the median.
    plain = {k: v for k, v in pool.items() if k in ("mini", "big")}
    result = configure_spec(code_spec, plain, rebind=True)
    assert {c.model for c in result.choices.values()} == {"big"}
    cot = validate_file(SPECS / "chain-of-thought.yaml").spec
    assert cot is not None
    three = {
        "a": ModelSpec(model="a", price=Price(input_per_mtok=1)),
        "b": ModelSpec(model="b", price=Price(input_per_mtok=2)),
        "c": ModelSpec(model="c", price=Price(input_per_mtok=3)),
    }
    result = configure_spec(cot, three, rebind=True)
    assert {c.model for c in result.choices.values()} == {"b"}


def test_rebind_rebinds_every_agent(spec: Spec, pool: dict[str, ModelSpec]) -> None:
    result = configure_spec(spec, pool, rebind=True)
    assert set(result.choices) == set(spec.agents)
    assert result.spec.agents["writer"].model != "house"
    assert "house" not in result.spec.models
    assert_valid(result.spec)


def test_nothing_to_bind(pool: dict[str, ModelSpec], srv: LLMTestServer) -> None:
    bound = validate_file(SPECS / "debate.yaml").spec
    assert bound is not None
    result = configure_spec(bound, pool, client=client_for(srv))
    assert result.choices == {}
    assert result.spec == bound
    assert srv.requests == []  # no LLM call when nothing needs binding


def test_empty_pool(spec: Spec) -> None:
    with pytest.raises(ConfigureError, match="the pool is empty"):
        configure_spec(spec, {})


def test_pool_id_clash_keeps_the_specs_model(spec: Spec) -> None:
    pool = {"house": ModelSpec(model="other-model", description="a different house model")}
    result = configure_spec(spec, pool)
    assert result.spec.models["house"].model == "house-model"
    assert result.spec.models["house-pool"].model == "other-model"
    assert result.spec.agents["writer"].model == "house"
    assert result.spec.agents["solver"].model == "house-pool"
    assert result.choices["solver"].model == "house"  # the pool id chosen
    assert result.added_models == {"house-pool": "house"}
    assert_valid(result.spec)


# -- by LLM -----------------------------------------------------------------------------------

UNBOUND = ["solver", "judge", "critic", "helper"]


def bindings(**models: str) -> dict[str, Any]:
    return {"bindings": {a: {"model": m, "reason": f"{a} on {m}"} for a, m in models.items()}}


GOOD = bindings(solver="mini", judge="big", critic="mid", helper="mini")


def test_llm_binds_from_its_answer(
    spec: Spec, pool: dict[str, ModelSpec], srv: LLMTestServer
) -> None:
    srv.responder = lambda req: GOOD
    client = client_for(srv)
    result = configure_spec(spec, pool, client=client)
    assert {a: c.model for a, c in result.choices.items()} == {
        "solver": "mini",
        "judge": "big",
        "critic": "mid",
        "helper": "mini",
    }
    assert result.choices["judge"].by == "llm"
    assert result.choices["judge"].reason == "judge on big"
    assert result.attempts == 1
    assert result.usage.calls == 1
    assert result.spec.agents["critic"].model == "mid"
    assert_valid(result.spec)
    # What the LLM was shown and asked for.
    request = srv.requests[0]
    schema = request.response_schema
    assert schema is not None
    per_agent = schema["properties"]["bindings"]["properties"]
    assert sorted(per_agent) == sorted(UNBOUND)
    assert per_agent["judge"]["properties"]["model"]["enum"] == ["mini", "big", "mid", "coder"]
    payload = json.loads(request.last_user.split("\n\n", 1)[1])
    assert payload["bind"] == UNBOUND
    agents = {row["id"]: row for row in payload["agents"]}
    assert agents["judge"]["used"] == ["judge of ensemble `sample` (4 samples)"]
    assert "decides a loop/branch condition" in agents["critic"]["used"][0]
    assert agents["solver"]["instructions"] == "Solve it step by step."
    pool_rows = {row["id"]: row for row in payload["pool"]}
    assert pool_rows["big"]["description"] == "Strong reasoning, expensive."
    assert pool_rows["big"]["price_usd_per_mtok"] == {"input": 2.5, "output": 10}


def test_llm_answer_outside_the_pool_is_retried(
    spec: Spec, pool: dict[str, ModelSpec], srv: LLMTestServer
) -> None:
    bad = bindings(solver="mini", judge="gpt-5", critic="mid", helper="mini")
    srv.responder = Script([], default=[bad, GOOD])
    result = configure_spec(spec, pool, client=client_for(srv))
    assert result.attempts == 2
    assert result.choices["judge"].model == "big"
    retry = srv.requests[1].last_user
    assert "agent `judge`: `gpt-5` is not in the pool" in retry
    assert "mini, big, mid, coder" in retry


def test_llm_answer_outside_the_pool_is_rejected(
    spec: Spec, pool: dict[str, ModelSpec], srv: LLMTestServer
) -> None:
    bad = bindings(solver="mini", judge="gpt-5", critic="mid", helper="mini")
    srv.responder = lambda req: bad
    with pytest.raises(ConfigureError, match="rejected twice") as info:
        configure_spec(spec, pool, client=client_for(srv))
    assert len(srv.requests) == 2
    assert any("`gpt-5` is not in the pool" in p for p in info.value.problems)
    assert spec.agents["judge"].model is None


def test_llm_answer_missing_an_agent_is_rejected(
    spec: Spec, pool: dict[str, ModelSpec], srv: LLMTestServer
) -> None:
    partial = bindings(solver="mini", judge="big", critic="mid")
    srv.responder = Script([], default=[partial, "not json at all"])
    with pytest.raises(ConfigureError) as info:
        configure_spec(spec, pool, client=client_for(srv))
    assert "agent `helper` is not bound" in srv.requests[1].last_user
    assert any("not JSON" in p for p in info.value.problems)


def test_llm_without_structured_output(
    spec: Spec, pool: dict[str, ModelSpec], srv: LLMTestServer
) -> None:
    def answer(req: ChatRequest) -> str:
        return "My choices:\n```json\n" + json.dumps(GOOD) + "\n```"

    srv.responder = answer
    srv.inject("status", 2, status=400)
    result = configure_spec(spec, pool, client=client_for(srv))
    assert result.choices["judge"].model == "big"
    # The schema (with its enum of pool ids) is spelt out in the fallback prompt.
    assert '"enum"' in srv.requests[-1].last_user
