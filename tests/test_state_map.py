"""State declarations with reducers, `map`, and per-step `retry`/`fallback`, run for real.

Each test compiles a small spec and runs the package against the loopback test server
(the real `openai` client). Concurrency is asserted by the server's requests in flight,
never by timing; order by the results, which must follow the input whatever order the
items finish in.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import compile_to, events, run_package

from mas2c.lang.spec import Spec
from mas2c.lang.validate import validate_text
from mas2c.testserver import ChatRequest, LLMTestServer, ReplyLike

BASE: dict[str, Any] = {
    "spec_version": "1",
    "name": "state-test",
    "models": {"m": {"model": "test-model"}},
    "agents": {"a": {"role": "Worker", "model": "m"}, "b": {"role": "Backup", "model": "m"}},
}


def build(tmp_path: Path, **parts: Any) -> Path:
    data = {**copy.deepcopy(BASE), **parts}
    report = validate_text(json.dumps(data))
    assert report.ok, report.format()
    compile_to(Spec.model_validate(data, by_alias=True, by_name=False), tmp_path / "build")
    return tmp_path / "build"


def echo(req: ChatRequest) -> ReplyLike:
    """Answers the prompt back, upper-cased: results show which item they belong to."""
    return req.last_user.upper()


MAP_SPEC: dict[str, Any] = {
    "inputs": {"xs": {"type": "array", "items": {"type": "string"}}},
    "outputs": {"ys": "ys"},
    "workflow": [
        {
            "id": "each",
            "kind": "map",
            "over": "{{ xs }}",
            "as": "x",
            "max_concurrency": 3,
            "max_items": 8,
            "steps": [{"id": "up", "kind": "call", "agent": "a", "prompt": "{{ x }}", "out": "y"}],
            "out": "ys",
        }
    ],
}


def test_map_runs_items_concurrently_up_to_the_limit_in_input_order(tmp_path: Path) -> None:
    package = build(tmp_path, **MAP_SPEC)
    xs = [f"item {i}" for i in range(8)]
    with LLMTestServer(echo, latency_s=0.3) as server:
        code, out, trace, stderr = run_package(package, {"xs": xs}, server)
        assert code == 0, stderr
        assert server.max_in_flight == 3  # max_concurrency, not 1 and not 8
    assert out["outputs"]["ys"] == [x.upper() for x in xs]
    (start,) = events(trace, "map_start")
    assert start["items"] == 8 and start["max_concurrency"] == 3
    items = sorted(e["item"] for e in events(trace, "step_start") if e["step"] == "up")
    assert items == [[i] for i in range(8)]


def test_map_of_an_empty_list_is_an_empty_list(tmp_path: Path, llm_server: LLMTestServer) -> None:
    code, out, _, stderr = run_package(build(tmp_path, **MAP_SPEC), {"xs": []}, llm_server)
    assert code == 0, stderr
    assert out["outputs"]["ys"] == [] and llm_server.requests == []


def test_map_overflow_is_an_error_or_a_visible_truncation(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    llm_server.responder = echo
    xs = [str(i) for i in range(10)]
    code, out, trace, _ = run_package(build(tmp_path / "e", **MAP_SPEC), {"xs": xs}, llm_server)
    assert code == 1 and out["error"]["code"] == "map_overflow"
    assert out["error"]["spec_pointer"] == "/workflow/0/max_items"
    assert llm_server.requests == []  # checked before any item runs
    truncating = copy.deepcopy(MAP_SPEC)
    truncating["workflow"][0]["on_overflow"] = "truncate"
    code, out, trace, stderr = run_package(
        build(tmp_path / "t", **truncating), {"xs": xs}, llm_server
    )
    assert code == 0, stderr
    assert out["outputs"]["ys"] == xs[:8]
    (warning,) = out["warnings"]
    assert warning["type"] == "map_truncated" and (warning["items"], warning["max_items"]) == (
        10,
        8,
    )
    assert events(trace, "map_truncated")[0]["items"] == 10


def test_map_over_a_value_that_is_no_list_fails_located(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    spec = copy.deepcopy(MAP_SPEC)
    spec["inputs"]["xs"] = {"type": ["array", "string"]}  # only the run can tell
    code, out, _, _ = run_package(build(tmp_path, **spec), {"xs": "abc"}, llm_server)
    assert code == 1 and out["error"]["code"] == "map_not_list"
    assert out["error"]["spec_pointer"] == "/workflow/0/over"


def test_concurrent_appends_combine_in_input_and_branch_order(tmp_path: Path) -> None:
    """Items finish in any order (the first item is the slowest); the appended memory and
    the results still follow the input, and parallel branches append in branch order."""
    spec = {
        "inputs": {"xs": {"type": "array", "items": {"type": "string"}}},
        "outputs": {"ys": "ys", "log": "log", "total": "total"},
        "state": {
            "log": {"schema": {"type": "array", "items": {"type": "string"}}, "reducer": "append"},
            "total": {"schema": {"type": "integer"}, "reducer": "add", "initial": 100},
        },
        "tools": {
            "size": {"code": "def size(text: str) -> int:\n    return len(text)\n"},
        },
        "workflow": [
            {
                "id": "each",
                "kind": "map",
                "over": "{{ xs }}",
                "steps": [
                    {
                        "id": "up",
                        "kind": "call",
                        "agent": "a",
                        "prompt": "{{ item }}",
                        "out": "log",
                    },
                    {
                        "id": "count",
                        "kind": "tool",
                        "tool": "size",
                        "args": {"text": "{{ item }}"},
                        "out": "total",
                    },
                ],
                "result": "{{ index }}",
                "out": "ys",
            },
            {
                "id": "both",
                "kind": "parallel",
                "branches": [
                    [{"id": "left", "kind": "call", "agent": "a", "prompt": "left", "out": "log"}],
                    [
                        {
                            "id": "right",
                            "kind": "call",
                            "agent": "b",
                            "prompt": "right",
                            "out": "log",
                        }
                    ],
                ],
            },
        ],
    }
    slow_first = {"first": 0.6}

    def answer(req: ChatRequest) -> ReplyLike:
        import time

        time.sleep(slow_first.get(req.last_user, 0.0) if req.agent == "a" else 0.3)
        return req.last_user.upper()

    with LLMTestServer(answer) as server:
        code, out, _, stderr = run_package(
            build(tmp_path, **spec), {"xs": ["first", "second", "third"]}, server
        )
    assert code == 0, stderr
    assert out["outputs"] == {
        "ys": [0, 1, 2],
        "log": ["FIRST", "SECOND", "THIRD", "LEFT", "RIGHT"],
        "total": 100 + 5 + 6 + 5,
    }


RETRY_SPEC: dict[str, Any] = {
    "inputs": {"q": {"type": "string"}},
    "outputs": {"answer": "answer", "log": "log"},
    "state": {"log": {"schema": {"type": "array"}, "reducer": "append"}},
    "workflow": [
        {
            "id": "try_it",
            "kind": "loop",
            "max_iterations": 1,
            "until": "true",
            "steps": [
                {"id": "note", "kind": "call", "agent": "b", "prompt": "note", "out": "log"},
                {"id": "ask", "kind": "call", "agent": "a", "prompt": "{{ q }}", "out": "answer"},
            ],
            "retry": 1,
            "fallback": [
                {
                    "id": "rescue",
                    "kind": "call",
                    "agent": "b",
                    "prompt": "failed: {{ error.code }} at {{ error.pointer }}",
                    "out": "answer",
                }
            ],
        }
    ],
}


def test_retry_discards_the_failed_attempts_writes(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    llm_server.responder = echo
    package = build(tmp_path, **RETRY_SPEC)
    llm_server.inject("status", 1, status=400, message="bad request")
    # 1st attempt: note (ok) then ask (400: not retried by the client) -> attempt 2: both ok.
    code, out, trace, stderr = run_package(package, {"q": "hello"}, llm_server)
    assert code == 0, stderr
    assert out["outputs"] == {"answer": "HELLO", "log": ["NOTE"]}  # not ["NOTE", "NOTE"]
    (failed,) = events(trace, "step_failed")
    assert (failed["step"], failed["attempt"], failed["attempts"]) == ("try_it", 1, 2)
    assert failed["code"] == "llm_error" and failed["then"] == "retry"
    assert not events(trace, "fallback_start")


def test_fallback_runs_with_the_error_and_the_run_is_ok(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    llm_server.responder = echo
    package = build(tmp_path, **RETRY_SPEC)
    llm_server.inject("status", 2, status=400, message="bad request")  # both attempts fail
    code, out, trace, stderr = run_package(package, {"q": "hello"}, llm_server)
    assert code == 0, stderr
    assert out["status"] == "ok"
    assert out["outputs"]["answer"] == "FAILED: LLM_ERROR AT /WORKFLOW/0/STEPS/0"
    assert out["outputs"]["log"] == []
    assert [e["then"] for e in events(trace, "step_failed")] == ["retry", "fallback"]
    (start,) = events(trace, "fallback_start")
    assert start["pointer"] == "/workflow/0/fallback"
    assert events(trace, "fallback_end")
    assert any(e["status"] == "error" for e in events(trace, "step_end"))


def test_budget_exhaustion_is_not_recovered(tmp_path: Path, llm_server: LLMTestServer) -> None:
    llm_server.responder = echo
    package = build(tmp_path, **RETRY_SPEC, budgets={"max_llm_calls": 1})
    code, out, trace, _ = run_package(package, {"q": "hello"}, llm_server)
    assert code == 3 and out["error"]["code"] == "budget_calls"
    assert [e["then"] for e in events(trace, "step_failed")] == []
    assert not events(trace, "fallback_start")


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (
            lambda w: w[0].update(
                fallback=[{"id": "f", "kind": "call", "agent": "b", "prompt": "x"}]
            ),
            "MAS205",  # the output `answer`: the fallback does not write it
        ),
        (
            lambda w: w.append(
                {"id": "late", "kind": "call", "agent": "b", "prompt": "{{ error }}"}
            ),
            "MAS301",
        ),
    ],
)
def test_after_a_fallback_only_what_both_paths_write_is_bound(change: Any, code: str) -> None:
    data = {**copy.deepcopy(BASE), **copy.deepcopy(RETRY_SPEC)}
    change(data["workflow"])
    report = validate_text(json.dumps(data))
    assert [p.code for p in report.errors] == [code], report.format()


# -- rectify: a fallback is a fix; a map's fan-out is reducible ------------------------------


def test_rectify_proposes_a_retry_and_a_fallback_to_a_like_agent() -> None:
    from mas2c.lang.validate import load_spec
    from mas2c.rectify import Failure, Locus, fix_fallback

    spec = load_spec(Path(__file__).parent.parent / "specs" / "router.yaml")
    pointer = "/workflow/1/cases/1/steps/0"
    failure = Failure("error", "StructuredOutputError", "no JSON", code="structured_output")
    locus = Locus(pointer, "step", step_pointer=pointer, step_id="answer_technical")
    fix = fix_fallback(failure, locus, spec, None)
    assert fix is not None and fix.fix_class == "fallback" and fix.deterministic
    step = fix.spec.workflow[1].cases[1].steps[0]  # type: ignore[attr-defined]
    assert step.retry == 1
    (rescue,) = step.fallback
    # tech_agent is on `strong`; a stand-in with the same output on another model is chosen.
    assert (rescue.id, rescue.agent, rescue.out) == (
        "answer_technical_fallback",
        "account_agent",
        "response",
    )
    assert rescue.prompt == step.prompt
    assert fix_fallback(failure, locus, fix.spec, None) is None  # it has a fallback now


def test_reducing_a_maps_fan_out_truncates_visibly() -> None:
    from mas2c.rectify import _fanout_reduction

    data = {**copy.deepcopy(BASE), **copy.deepcopy(MAP_SPEC)}
    change = _fanout_reduction(data, "/workflow/0")
    assert change == "/workflow/0/max_items: 8 -> 4, /workflow/0/on_overflow: truncate"
    assert data["workflow"][0]["on_overflow"] == "truncate"
    assert validate_text(json.dumps(data)).ok
