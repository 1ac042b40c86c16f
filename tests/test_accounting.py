"""One accounting and retry implementation (mas2c.accounting), shared by gateway and runtime.

- A run behind the gateway: result.json's usage (the program's count, made by the
  package's copy `_accounting.py`) and usage.json (the gateway's) agree exactly: the same
  keys (by_model by the model name sent), the same totals, the same rounding.
- Exactly one layer retries a failing upstream: the gateway does (its attempts), the
  program behind the socket does not retry on top of it.
- The compiled package's `_accounting.py` is mas2c.accounting, verbatim.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

from conftest import ROOT, example_spec

from mas2c import accounting
from mas2c.compile import compile_spec
from mas2c.run import LLMConfig, run_system
from mas2c.testserver import LLMTestServer

SPEC = ROOT / "specs" / "self-consistency.yaml"


def _input(tmp_path: Path) -> Path:
    path = tmp_path / "in.json"
    path.write_text(json.dumps({"question": "What is 2 + 2?"}))
    return path


def test_result_and_usage_json_agree(tmp_path: Path) -> None:
    with LLMTestServer() as server:
        llm = LLMConfig(url=server.base_url, api_key="test")
        outcome = run_system(SPEC, _input(tmp_path), tmp_path / "run", backend="unisolated", llm=llm)
    assert outcome.ok, outcome.result
    program = outcome.result["usage"]
    gateway = json.loads((tmp_path / "run" / "usage.json").read_text())
    shared = ("calls", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")
    assert {k: program[k] for k in shared} == {k: gateway[k] for k in shared}
    assert program["by_agent"] == gateway["by_agent"]
    assert program["by_model"] == gateway["by_model"]
    models = {m.model for m in example_spec("self-consistency").models.values()}
    assert set(program["by_model"]) <= models  # keyed by the model name sent
    assert program["cost_usd"] > 0


def test_one_layer_retries_a_failing_upstream(tmp_path: Path) -> None:
    with LLMTestServer() as server:
        server.inject("status", count=100, status=503)
        llm = LLMConfig(url=server.base_url, api_key="test")
        outcome = run_system(SPEC, _input(tmp_path), tmp_path / "run", backend="unisolated", llm=llm)
        sent = len(server.requests)
    assert not outcome.ok
    assert outcome.result["error"]["code"] == "llm_error"
    # the gateway's HttpUpstream tries 4 times per request; the program asks each request
    # once (5 concurrent samples at most), never 4 x 4
    assert 4 <= sent <= 4 * 5, sent
    calls = [json.loads(line) for line in (tmp_path / "run" / "trace.jsonl").open()]
    attempts = [e.get("attempt") for e in calls if e.get("event") == "llm_call"]
    assert attempts and set(attempts) == {1}


def test_costs_are_exact_and_rounded_alike() -> None:
    usage = accounting.Usage()
    for _ in range(3):
        usage.add("a", "m", 1, 1, accounting.call_cost(1, 1, 0.1, 0.2))
    assert usage.total.cost == Fraction(9, 10_000_000)  # no float drift while counting
    assert usage.as_dict()["cost_usd"] == 9e-07
    assert usage.as_dict()["by_model"]["m"] == usage.as_dict()["by_agent"]["a"]
    assert accounting.retry_after_s({"retry-after-ms": "1500"}) == 1.5
    assert accounting.should_retry({"x-should-retry": "false"}) is False
    assert accounting.backoff_s(3, 0.5, 30, None) >= 2.0
    assert accounting.backoff_s(1, 0.5, 30, 99.0) == 30


def test_the_package_carries_the_same_module() -> None:
    build = compile_spec(example_spec("debate"))
    copy = build.files["mas2c_debate/_accounting.py"].decode()
    source = (ROOT / "mas2c" / "accounting.py").read_text()
    assert copy.split("\n", 1)[1] == source
    assert "import mas2c" not in copy and "from mas2c" not in copy
