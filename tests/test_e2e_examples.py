"""Every example spec, compiled and run end to end against the loopback test LLM server.

The compiled package runs as a user runs it (``python -m mas2c_<name> --input ...``)
in a subprocess with the real ``openai`` client. Scripted answers per agent make each
archetype take its interesting path (a repair loop, a tool call, a routed branch, a
vote). Concurrency is asserted through the server's count of requests in flight,
never through timing; each concurrency test has its own server, so parallel test
workers cannot disturb the count. The failure contract (exit codes, out.json with
the spec pointer at fault) is checked on purpose-made failures.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EXAMPLE_NAMES, compile_to, events, example_path, example_spec, run_package

from mas2c.lang.spec import Spec, iter_spec_steps, iter_steps
from mas2c.testserver import (
    ChatRequest,
    LLMTestServer,
    Reply,
    ReplyLike,
    ToolCall,
    default_responder,
)

# -- realistic inputs and scripted answers --------------------------------------------------------

HUMANEVAL = {
    "prompt": (
        "def running_max(numbers: list[int]) -> list[int]:\n"
        '    """Return the running maximum of the list.\n'
        "    >>> running_max([1, 3, 2, 5])\n"
        "    [1, 3, 3, 5]\n"
        '    """\n'
    ),
    "entry_point": "running_max",
    "test": (
        "def check(candidate):\n"
        "    assert candidate([1, 3, 2, 5]) == [1, 3, 3, 5]\n"
        "    assert candidate([]) == []\n"
        "    assert candidate([-2, -5]) == [-2, -2]\n"
    ),
}
CORRECT = (
    "Here is the implementation:\n\n```python\n"
    "def running_max(numbers: list[int]) -> list[int]:\n"
    "    result = []\n"
    "    for n in numbers:\n"
    "        result.append(n if not result else max(result[-1], n))\n"
    "    return result\n"
    "```\n"
)
BUGGY = "```python\ndef running_max(numbers):\n    return sorted(numbers)\n```\n"

INPUTS: dict[str, dict[str, Any]] = {
    "chain-of-thought": {
        "question": "A train travels 120 km in 1.5 hours. What is its average speed in km/h?"
    },
    "code-generation": HUMANEVAL,
    "debate": {"question": "Is 0.999... (repeating) equal to 1?"},
    "hierarchical": {
        "decision": "Should we add offline mode to our mobile note-taking app in the next two quarters?",
        "context": "12 engineers, 40% of support tickets mention connectivity, budget is flat.",
    },
    "map-reduce": {
        "documents": [
            {"title": "Supplier memo", "text": "The battery supplier slips two weeks."},
            {"title": "Team update", "text": "Firmware is feature complete."},
            {"title": "Canteen menu", "text": "Soup on Fridays."},
        ],
        "focus": "Risks to the launch date",
    },
    "multi-hop-qa": {
        "question": "Which river flows through the capital of the country where the Eiffel "
        "Tower stands?"
    },
    "plan-and-execute": {
        "task": "A loan of 250000 at 4.1% over 25 years: what is the monthly payment?"
    },
    "reflexion": {
        "task": "Describe a solar lantern in at most 30 words; mention the battery life."
    },
    "reflexion-memory": {
        "task": "Describe a solar lantern in at most 30 words; mention the battery life."
    },
    "router": {
        "ticket": "The backup client crashes with error 0x80070005 every night since the update.",
        "product": "Acme Cloud Backup (Pro plan)",
    },
    "manager-workers": {
        "request": "Write a short note on why the sky is blue.",
        "history": [
            {"role": "user", "content": "We publish notes for curious kids."},
            {"role": "assistant", "content": "Understood: short, simple, correct."},
        ],
        "follow_up": "Can you make it shorter?",
    },
    "mbpp-repair": {
        "task": "Write a function to find the shared elements from the given two lists.",
        "test_list": [
            "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == {4, 5}",
            "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == {3, 4}",
            "assert set(similar_elements((11, 12, 14, 13), (17, 15, 14, 13))) == {13, 14}",
        ],
    },
    "math-program-ensemble": {"problem": "What is the sum of the first 10 positive odd integers?"},
    "router-fallback": {"ticket": "The backup client crashes with error 0x80070005 every night."},
    "self-consistency": {"question": "What is 17 * 3 + 4? Answer with a number."},
    "tool-pipeline": {
        "text": (
            "Notwithstanding the aforementioned considerations, the utilisation of the "
            "application necessitates authentication. Subsequently, configuration proceeds."
        ),
        "audience": "customers with no technical background",
        "target_grade": 6,
    },
}


# multi-hop-qa: each sub-question, the answer and the passage (corpus id) it comes from.
HOPS = {
    "In which country does the Eiffel Tower stand?": ("France", "eiffel"),
    "What is the capital of France?": ("Paris", "paris"),
    "Which river flows through Paris?": ("the Seine", "seine"),
}


def read_passages(req: ChatRequest) -> ReplyLike:
    """The reader answers only when the retrieved passages (in its prompt) hold the fact."""
    question = req.last_user.split("Question: ")[1].split("\n")[0]
    answer, source = HOPS[question]
    found = f'"id": "{source}"' in req.last_user
    return {
        "question": question,
        "answer": answer if found else "unknown",
        "source": source if found else "none",
    }


class ByAgent:
    """A responder answering each agent (the X-Mas2c-Agent header) from its own script.

    A list answers in turn (the last one repeating); a callable gets the request.
    Agents without a script get the server's default answer.
    """

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = {k: v if isinstance(v, list) else [v] for k, v in answers.items()}
        self.taken: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, req: ChatRequest) -> ReplyLike:
        agent = req.agent or ""
        if agent not in self.answers:
            return default_responder(req)
        with self.lock:
            index = self.taken.get(agent, 0)
            self.taken[agent] = index + 1
        script = self.answers[agent]
        answer = script[min(index, len(script) - 1)]
        return answer(req) if callable(answer) else answer


def _program(answer: str) -> str:
    return f"```python\nprint('ANSWER: {answer}')\n```\n"


SCRIPTS: dict[str, Callable[[], ByAgent]] = {
    "chain-of-thought": lambda: ByAgent(
        {"reasoner": {"reasoning": "1. 120 km / 1.5 h = 80 km/h.", "answer": "80 km/h"}}
    ),
    "code-generation": lambda: ByAgent({"programmer": CORRECT}),
    "debate": lambda: ByAgent(
        {
            "analyst": "0.999... = 3 * 0.333... = 3 * (1/3) = 1.\nPosition: yes",
            "skeptic": "The limit of the partial sums is 1.\nPosition: yes",
            "expert": "Standard real analysis result.\nPosition: yes",
            "judge": {
                "answer": "yes",
                "confidence": 0.95,
                "rationale": "All agree; the limit is 1.",
            },
        }
    ),
    "hierarchical": lambda: ByAgent(
        {
            "manager": {
                "objective": "Decide on offline mode within two quarters.",
                "market_brief": "MARKET-BRIEF: demand and competitors.",
                "technical_brief": "TECH-BRIEF: sync design and effort.",
                "risk_brief": "RISK-BRIEF: data loss and delivery risks.",
                "decision_criteria": "Retention gain outweighs cost.",
            },
            "market_analyst": "Strong demand. Assessment: worth it.",
            "technical_architect": "CRDT sync, 20 person-weeks. Assessment: feasible.",
            "risk_analyst": "Conflict bugs (medium). Assessment: manageable.",
            "manager_merge": {
                "recommendation": "go_with_conditions",
                "memo": "**Go** if sync is scoped to notes only.",
                "next_steps": ["Prototype sync", "Survey users", "Plan QA"],
            },
        }
    ),
    "map-reduce": lambda: ByAgent(
        {
            "summarizer": lambda req: {
                "summary": "SUMMARY OF " + req.last_user.split("]: ")[1].split("\n")[0],
                "relevant": "Canteen" not in req.last_user,
            },
            "editor": {
                "summary": "The battery slip [0] is the main risk.",
                "key_points": ["Battery supplier two weeks late [0]"],
            },
        }
    ),
    "multi-hop-qa": lambda: ByAgent(
        {
            "planner": {"sub_questions": list(HOPS)},
            "reader": read_passages,
            "synthesizer": {
                "answer": "The Seine.",
                "reasoning": "The Eiffel Tower is in France, whose capital Paris the Seine crosses.",
            },
        }
    ),
    "plan-and-execute": lambda: ByAgent(
        {
            "planner": {
                "goal": "The monthly payment.",
                "steps": [
                    {
                        "action": "Compute the annuity payment",
                        "expected_result": "A number",
                        "use_python": True,
                    }
                ],
            },
            "executor": [
                Reply(tool_calls=[ToolCall("python", {"code": "print(round(1333.33, 2))"})]),
                lambda req: {
                    "results": [{"step": "payment", "result": req.messages[-1]["content"].strip()}],
                    "complete": True,
                    "issues": "",
                },
            ],
            "synthesizer": {
                "answer": "1333.33 per month",
                "summary": "Annuity formula, run in Python.",
            },
        }
    ),
    "reflexion": lambda: ByAgent(
        {
            "actor": ["A lantern. Bright.", "A solar lantern whose battery lasts 12 hours."],
            "critic": [
                {"passed": False, "feedback": "Mention the battery life."},
                {"passed": True, "feedback": "All requirements met."},
            ],
        }
    ),
    "manager-workers": lambda: ByAgent(
        {
            "manager": [
                Reply(
                    tool_calls=[
                        ToolCall("researcher", {"task": "Why is the sky blue?"}),
                        ToolCall("writer", {"task": "Draft a note for kids on it."}),
                    ]
                ),
                Reply(tool_calls=[ToolCall("reviewer", {"task": "Check: DRAFT sky note"})]),
                {"answer": "FINAL: sunlight scatters.", "delegated": ["researcher", "writer"]},
            ],
            "researcher": "FACTS: Rayleigh scattering.",
            "writer": ["DRAFT sky note", "SHORTER sky note"],
            "reviewer": "OK",
            "dispatcher": {"owner": "writer", "reason": "wording"},
        }
    ),
    "mbpp-repair": lambda: ByAgent(
        {
            "coder": [
                "```python\ndef similar_elements(a, b):\n    return tuple(set(a) | set(b))\n```",
                "```python\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n```",
            ]
        }
    ),
    "math-program-ensemble": lambda: ByAgent(
        {
            "programmer": [
                _program("100"),
                "```python\nprint(1/0)\n```",  # fails: repaired from its error
                _program("100"),
                _program("99"),
                _program("100"),
                _program("100"),
            ]
        }
    ),
    "reflexion-memory": lambda: ByAgent(
        {
            "actor": ["A lantern.", "A bright solar lantern.", "A solar lantern; 12 h battery."],
            "critic": [
                {"passed": False, "feedback": "Say it is solar-powered."},
                {"passed": False, "feedback": "Mention the battery life."},
                {"passed": True, "feedback": "All requirements met."},
            ],
            "reflector": ["Name the power source.", "Cover every listed requirement."],
        }
    ),
    "router-fallback": lambda: ByAgent(
        {
            "classifier": {"category": "technical"},
            "tech_agent": {"reply": "1. Reinstall the client.", "needs_human": False},
        }
    ),
    "router": lambda: ByAgent(
        {
            "classifier": {"category": "technical", "urgency": "high", "reason": "A crash."},
            "tech_agent": {"reply": "1. Reinstall the client.", "needs_human": True},
        }
    ),
    "self-consistency": lambda: ByAgent(
        {
            "solver": [
                {"answer": "55"},
                {"answer": "55"},
                {"answer": "54"},
                {"answer": "55"},
                {"answer": "51"},
            ]
        }
    ),
    "tool-pipeline": lambda: ByAgent(
        {
            "editor": [
                Reply(
                    tool_calls=[
                        ToolCall("text_stats", {"text": "You must sign in. Then set it up."})
                    ]
                ),
                {"text": "You must sign in. Then set it up.", "changes": ["shorter sentences"]},
            ]
        }
    ),
}

# The outputs each scripted run must produce (None: present, any value).
EXPECTED: dict[str, dict[str, Any]] = {
    "chain-of-thought": {"answer": "80 km/h", "reasoning": "1. 120 km / 1.5 h = 80 km/h."},
    "code-generation": {"passed": True, "test_output": "", "code": None},
    "debate": {"answer": "yes", "confidence": 0.95, "rationale": None},
    "hierarchical": {"recommendation": "go_with_conditions", "memo": None, "next_steps": None},
    "map-reduce": {
        "report": "The battery slip [0] is the main risk.",
        "key_points": ["Battery supplier two weeks late [0]"],
        "summaries": [
            {
                "document": i,
                "title": t,
                "summary": f"SUMMARY OF {t}",
                "relevant": t != "Canteen menu",
            }
            for i, t in enumerate(["Supplier memo", "Team update", "Canteen menu"])
        ],
    },
    "multi-hop-qa": {
        "answer": "The Seine.",
        "reasoning": None,
        "findings": [
            {"question": q, "answer": answer, "source": source}
            for q, (answer, source) in HOPS.items()
        ],
    },
    "plan-and-execute": {"answer": "1333.33 per month", "summary": None, "plan": None},
    "reflexion": {
        "answer": "A solar lantern whose battery lasts 12 hours.",
        "passed": True,
        "feedback": "All requirements met.",
    },
    "reflexion-memory": {
        "answer": "A solar lantern; 12 h battery.",
        "passed": True,
        "lessons": ["Name the power source.", "Cover every listed requirement."],
    },
    "router-fallback": {
        "category": "technical",
        "reply": "1. Reinstall the client.",
        "needs_human": False,
        "incidents": [],
    },
    "router": {
        "category": "technical",
        "urgency": "high",
        "reply": "1. Reinstall the client.",
        "needs_human": True,
    },
    "manager-workers": {
        "answer": "FINAL: sunlight scatters.",
        "owner": "writer",
        "follow_up_answer": "SHORTER sky note",
    },
    "mbpp-repair": {"passed": True, "code": None, "results": None},
    "math-program-ensemble": {"answer": "100", "program": "print('ANSWER: 100')\n"},
    "self-consistency": {"answer": "55"},
    "tool-pipeline": {
        "text": "You must sign in. Then set it up.",
        "changes": ["shorter sentences"],
    },
}
# The steps each scripted run executes (by id) and the LLM calls it makes.
EXECUTED: dict[str, tuple[set[str], int]] = {
    "chain-of-thought": ({"solve"}, 1),
    "code-generation": ({"write", "run_tests", "repair_if_failing"}, 1),
    "debate": ({"argue"}, 7),
    "hierarchical": (
        {
            "plan",
            "investigate",
            "market_research",
            "technical_assessment",
            "risk_assessment",
            "merge",
        },
        5,
    ),
    "map-reduce": ({"summarize_each", "summarize", "reduce"}, 4),
    "multi-hop-qa": ({"decompose", "answer_each", "retrieve", "read", "synthesize"}, 5),
    "plan-and-execute": ({"plan", "execute", "synthesize"}, 4),
    "reflexion": (
        {"first_draft", "first_review", "revise_if_needed", "reflect", "revise", "review_again"},
        4,
    ),
    "reflexion-memory": ({"attempts", "write", "review", "learn", "reflect"}, 8),
    "router-fallback": ({"classify", "dispatch", "answer_technical"}, 2),
    "router": ({"classify", "dispatch", "answer_technical"}, 2),
    "manager-workers": ({"manage", "route_follow_up", "answer_follow_up"}, 8),
    "mbpp-repair": (
        {"first_attempt", "write", "check", "repair_if_failing", "repair_loop", "repair"},
        2,
    ),
    "math-program-ensemble": ({"sample_programs", "write_program", "read_answer"}, 6),
    "self-consistency": ({"sample_and_vote"}, 5),
    "tool-pipeline": ({"measure_before", "rewrite", "measure_after"}, 2),
}

_builds: dict[str, Path] = {}


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Compile an example once per test process; returns its build folder."""
    root = tmp_path_factory.mktemp("e2e")

    def build(name: str) -> Path:
        if name not in _builds:
            compile_to(example_spec(name), root / name)
            _builds[name] = root / name
        return _builds[name]

    return build


def _variant(
    name: str, tmp_path: Path, change: Callable[[dict[str, Any]], None]
) -> tuple[Spec, Path]:
    """An example spec, changed, compiled into tmp_path/build."""
    data = yaml.safe_load(example_path(name).read_text(encoding="utf-8"))
    change(data)
    spec = Spec.model_validate(data)
    compile_to(spec, tmp_path / "build")
    return spec, tmp_path / "build"


def check_trace(trace: list[dict[str, Any]], spec: Spec, executed: set[str] | None = None) -> None:
    """Steps start and end in pairs (all ok), LLM calls carry agent, model, tokens, latency."""
    pointers = {pointer: step.id for pointer, step in iter_spec_steps(spec)}
    starts, ends = events(trace, "step_start"), events(trace, "step_end")
    started = {(e["step"], e["pointer"]) for e in starts}
    assert started == {(e["step"], e["pointer"]) for e in ends}
    assert len(starts) == len(ends)
    for event in starts:
        assert pointers.get(event["pointer"]) == event["step"], event
    if executed is not None:
        assert {step for step, _ in started} == executed
    assert all(e["status"] == "ok" for e in ends), [e for e in ends if e["status"] != "ok"]
    for call in events(trace, "llm_call"):
        agent = spec.agents[call["agent"]]
        assert agent.model is not None
        assert call["model"] == spec.models[agent.model].model
        assert isinstance(call["prompt_tokens"], int) and call["prompt_tokens"] > 0
        assert isinstance(call["completion_tokens"], int) and call["completion_tokens"] > 0
        assert isinstance(call["latency_s"], int | float) and call["latency_s"] >= 0
        assert call["pointer"] in pointers, call
    assert trace[0]["event"] == "run_start" and trace[-1]["event"] == "run_end"


# -- every example, end to end --------------------------------------------------------------------


def test_every_example_has_inputs_and_a_script() -> None:
    assert set(INPUTS) == set(EXAMPLE_NAMES) == set(SCRIPTS) == set(EXPECTED) == set(EXECUTED)
    for name in EXAMPLE_NAMES:
        assert set(INPUTS[name]) == set(example_spec(name).inputs), name


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_runs_end_to_end(
    name: str, builds: Callable[[str], Path], llm_server: LLMTestServer
) -> None:
    spec = example_spec(name)
    llm_server.responder = SCRIPTS[name]()
    code, out, trace, stderr = run_package(builds(name), INPUTS[name], llm_server)
    assert code == 0, f"{stderr}\n{json.dumps(out, indent=1)}"
    assert out["status"] == "ok"
    assert set(out["outputs"]) == set(spec.outputs)
    for key, want in EXPECTED[name].items():
        if want is not None:
            assert out["outputs"][key] == want, key
        else:
            assert out["outputs"][key] not in (None, ""), key
    executed, calls = EXECUTED[name]
    check_trace(trace, spec, executed)
    assert len(events(trace, "llm_call")) == calls == len(llm_server.requests)
    assert out["usage"]["calls"] == calls
    assert set(out["usage"]["by_agent"]) == {r.agent for r in llm_server.requests}
    # Every request names its agent and asks for that agent's model.
    for req in llm_server.requests:
        agent = spec.agents[req.agent or ""]
        assert agent.model is not None and req.model == spec.models[agent.model].model
        assert req.system.startswith(agent.role)


def _users(server: LLMTestServer, agent: str) -> list[str]:
    return [r.last_user for r in server.requests if r.agent == agent]


def test_hierarchical_specialists_get_their_briefs(
    builds: Callable[[str], Path], llm_server: LLMTestServer
) -> None:
    llm_server.responder = SCRIPTS["hierarchical"]()
    code, out, _, stderr = run_package(builds("hierarchical"), INPUTS["hierarchical"], llm_server)
    assert code == 0, stderr
    assert "MARKET-BRIEF" in _users(llm_server, "market_analyst")[0]
    assert "TECH-BRIEF" in _users(llm_server, "technical_architect")[0]
    assert "RISK-BRIEF" in _users(llm_server, "risk_analyst")[0]
    (merge,) = _users(llm_server, "manager_merge")
    assert "CRDT sync" in merge and "Strong demand" in merge and "Conflict bugs" in merge
    assert out["outputs"]["next_steps"] == ["Prototype sync", "Survey users", "Plan QA"]


def test_debate_second_round_shows_the_other_answers(
    builds: Callable[[str], Path], llm_server: LLMTestServer
) -> None:
    llm_server.responder = SCRIPTS["debate"]()
    code, _, _, stderr = run_package(builds("debate"), INPUTS["debate"], llm_server)
    assert code == 0, stderr
    first, second = _users(llm_server, "skeptic")
    assert first.strip() == INPUTS["debate"]["question"]
    assert "Standard real analysis result." in second and "0.999... = 3 * 0.333..." in second
    (judge,) = _users(llm_server, "judge")
    assert judge.count("Position: yes") == 3


def test_code_generation_repairs_failing_code(
    builds: Callable[[str], Path], llm_server: LLMTestServer
) -> None:
    """The first program runs but fails the tests: the repair loop fixes it and stops."""
    llm_server.responder = ByAgent({"programmer": BUGGY, "repairer": CORRECT})
    spec = example_spec("code-generation")
    code, out, trace, stderr = run_package(builds("code-generation"), HUMANEVAL, llm_server)
    assert code == 0, stderr
    assert out["outputs"]["passed"] is True
    assert "result.append" in out["outputs"]["code"]
    assert [r.agent for r in llm_server.requests] == ["programmer", "repairer"]
    (repair,) = _users(llm_server, "repairer")
    assert "sorted(numbers)" in repair and "AssertionError" in repair
    check_trace(
        trace,
        spec,
        {"write", "run_tests", "repair_if_failing", "repair_loop", "repair", "rerun_tests"},
    )
    assert len(events(trace, "exec")) == 4  # write, its tests, the repair, its tests


def test_tool_pipeline_agent_tool_call_round_trip(
    builds: Callable[[str], Path], llm_server: LLMTestServer
) -> None:
    llm_server.responder = SCRIPTS["tool-pipeline"]()
    code, out, trace, stderr = run_package(
        builds("tool-pipeline"), INPUTS["tool-pipeline"], llm_server
    )
    assert code == 0, stderr
    first, second = llm_server.requests
    assert [t["function"]["name"] for t in first.tools] == ["text_stats"]
    tool_message = next(m for m in second.messages if m.get("role") == "tool")
    assert json.loads(tool_message["content"])["words"] == 8
    assert out["outputs"]["after"]["words"] == 8
    assert out["outputs"]["before"]["words"] > out["outputs"]["after"]["words"]
    tool_calls = events(trace, "tool_call")
    assert [(e["tool"], e["agent"], e["status"]) for e in tool_calls] == [
        ("text_stats", None, "ok"),
        ("text_stats", "editor", "ok"),
        ("text_stats", None, "ok"),
    ]


def test_plan_and_execute_runs_python_for_the_executor(
    builds: Callable[[str], Path], llm_server: LLMTestServer
) -> None:
    llm_server.responder = SCRIPTS["plan-and-execute"]()
    code, out, _, stderr = run_package(
        builds("plan-and-execute"), INPUTS["plan-and-execute"], llm_server
    )
    assert code == 0, stderr
    executor = [r for r in llm_server.requests if r.agent == "executor"]
    assert len(executor) == 2
    tool_message = next(m for m in executor[1].messages if m.get("role") == "tool")
    assert "1333.33" in tool_message["content"]
    (synth,) = _users(llm_server, "synthesizer")
    assert "1333.33" in synth and "Complete: true" in synth
    assert out["outputs"]["plan"][0]["use_python"] is True


# -- concurrency: through the server's count of requests in flight, not timing ---------------------


@pytest.mark.parametrize(
    ("name", "in_flight"),
    [("self-consistency", 5), ("debate", 3), ("hierarchical", 3), ("math-program-ensemble", 5)],
)
def test_concurrent_steps_have_their_calls_in_flight_together(
    name: str, in_flight: int, builds: Callable[[str], Path]
) -> None:
    """Ensemble samples, a debate round, parallel branches: all requests in flight at once."""
    with LLMTestServer(SCRIPTS[name](), latency_s=0.3) as server:
        server.reset_counters()
        code, out, _, stderr = run_package(builds(name), INPUTS[name], server)
        assert code == 0, stderr
        assert out["status"] == "ok"
        assert server.max_in_flight == in_flight


# -- the failure contract -------------------------------------------------------------------------

_FAILING_TOOL = """\
def _half(n: int) -> float:
    return n / 2


def divide(a: int, b: int) -> float:
    \"\"\"Divide a by b.\"\"\"
    half = _half(a)
    ratio = a / b
    return ratio + half
"""


def _tool_spec(workflow: list[dict[str, Any]]) -> Spec:
    return Spec.model_validate(
        {
            "spec_version": "1",
            "name": "failing-tool",
            "inputs": {"a": {"type": "integer"}},
            "outputs": {"answer": "answer"},
            "models": {"m": {"model": "test-model"}},
            "agents": {"solver": {"role": "Solver", "model": "m", "tools": ["divide"]}},
            "tools": {"divide": {"code": _FAILING_TOOL}},
            "workflow": workflow,
        }
    )


def test_tool_exception_maps_to_tool_code(tmp_path: Path, llm_server: LLMTestServer) -> None:
    spec = _tool_spec(
        [
            {"id": "ask", "kind": "call", "agent": "solver", "prompt": "{{ a }}", "out": "answer"},
            {"id": "split", "kind": "tool", "tool": "divide", "args": {"a": 4, "b": 0}},
        ]
    )
    compile_to(spec, tmp_path / "build")
    code, out, trace, stderr = run_package(tmp_path / "build", {"a": 4}, llm_server)
    assert code == 1, stderr
    error = out["error"]
    assert out["status"] == "error"
    assert error["spec_pointer"] == "/tools/divide/code"
    assert error["spec_line"] == 8  # `ratio = a / b`, line 8 of the tool's code
    assert _FAILING_TOOL.splitlines()[error["spec_line"] - 1].strip() == "ratio = a / b"
    assert error["step"] == "split"
    assert "ZeroDivisionError" in error["message"] + error["traceback"]
    ends = {e["step"]: e["status"] for e in events(trace, "step_end")}
    assert ends == {"ask": "ok", "split": "error"}


def test_tool_exception_inside_an_agent_turn_goes_back_to_the_model(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    spec = _tool_spec(
        [{"id": "ask", "kind": "call", "agent": "solver", "prompt": "{{ a }}", "out": "answer"}]
    )
    compile_to(spec, tmp_path / "build")
    llm_server.responder = ByAgent(
        {
            "solver": [
                Reply(tool_calls=[ToolCall("divide", {"a": 1, "b": 0})]),
                "ANSWER: cannot divide",
            ]
        }
    )
    code, out, _, stderr = run_package(tmp_path / "build", {"a": 4}, llm_server)
    assert code == 0, stderr
    assert out["outputs"]["answer"] == "ANSWER: cannot divide"
    tool_message = next(m for m in llm_server.requests[1].messages if m.get("role") == "tool")
    assert "ZeroDivisionError" in tool_message["content"]


def test_http_400_fails_the_step_that_called(builds: Callable[[str], Path]) -> None:
    """The classifier answers; the routed step's request gets a 400: exit 1, that step's pointer."""
    spec = example_spec("router")
    script = SCRIPTS["router"]()

    with LLMTestServer() as server:

        def respond(req: ChatRequest) -> ReplyLike:
            if req.agent == "classifier":
                server.inject("status", status=400)  # for the next request: the routed step's
            return script(req)

        server.responder = respond
        code, out, trace, stderr = run_package(builds("router"), INPUTS["router"], server)
        assert code == 1, stderr
        assert out["status"] == "error"
        error = out["error"]
        assert error["spec_pointer"] == "/workflow/1/cases/1/steps/0"
        assert error["step"] == "answer_technical"
        assert error["type"] == "LLMError" and "400" in error["message"]
        assert error["traceback"]
        assert len(server.requests) == 2, "a 400 is not retried"
        pointers = {p for p, _ in iter_steps(spec.workflow, "/workflow")}
        assert error["spec_pointer"] in pointers
        ends = {e["step"]: e["status"] for e in events(trace, "step_end")}
        assert ends["answer_technical"] == "error" and ends["classify"] == "ok"


def test_budget_exceeded_exits_3(tmp_path: Path, llm_server: LLMTestServer) -> None:
    def change(data: dict[str, Any]) -> None:
        data["budgets"]["max_llm_calls"] = 3

    _, build = _variant("self-consistency", tmp_path, change)
    llm_server.responder = SCRIPTS["self-consistency"]()
    code, out, _, stderr = run_package(build, INPUTS["self-consistency"], llm_server)
    assert code == 3, stderr
    assert out["status"] == "budget_exceeded"
    assert out["error"]["spec_pointer"] == "/budgets/max_llm_calls"
    assert len(llm_server.requests) <= 3
    assert out["usage"]["calls"] <= 3


def test_run_timeout_exits_4(tmp_path: Path) -> None:
    def change(data: dict[str, Any]) -> None:
        data["budgets"]["timeout_s"] = 0.5

    _, build = _variant("chain-of-thought", tmp_path, change)
    with LLMTestServer(latency_s=3.0) as server:
        code, out, _, stderr = run_package(build, INPUTS["chain-of-thought"], server)
    assert code == 4, stderr
    assert out["status"] == "timeout"
    assert out["error"]["spec_pointer"] == "/budgets/timeout_s"


@pytest.mark.parametrize(
    ("given", "complaint"),
    [
        ({}, "missing required input 'question'"),
        ({"question": 42}, "input 'question': expected string, got integer"),
        ({"question": "q", "extra": 1}, "unknown input 'extra'"),
        ("{not json", "cannot read the input"),
        ("[1, 2]", "must be a JSON object"),
    ],
    ids=["missing", "wrong-type", "unknown", "not-json", "not-object"],
)
def test_bad_input_exits_2(
    given: Any, complaint: str, builds: Callable[[str], Path], llm_server: LLMTestServer
) -> None:
    code, out, trace, stderr = run_package(builds("debate"), given, llm_server)
    assert code == 2, stderr
    assert out["status"] == "bad_input"
    assert complaint in out["error"]["message"]
    assert out["error"]["spec_pointer"] is None or out["error"]["spec_pointer"].startswith(
        "/inputs"
    )
    assert llm_server.requests == [], "no LLM call on bad input"
    assert not events(trace, "step_start")


def test_code_tools_have_separate_namespaces(tmp_path: Path, llm_server: LLMTestServer) -> None:
    """Two tools with a helper of the same name (and a `from __future__` import) each use
    their own helper; a tool may even be named like the runtime's ToolDef."""
    first = "from __future__ import annotations\n\n\ndef _h() -> int:\n    return 1\n\n\ndef one() -> int:\n    return _h()\n"
    second = "def _h() -> int:\n    return 2\n\n\ndef ToolDef() -> int:\n    return _h()\n"
    spec = Spec.model_validate(
        {
            "spec_version": "1",
            "name": "namespaces",
            "outputs": {"one": "a", "two": "b"},
            "models": {"m": {"model": "test-model"}},
            "agents": {"solver": {"role": "Solver", "model": "m", "tools": ["one", "ToolDef"]}},
            "tools": {"one": {"code": first}, "ToolDef": {"code": second}},
            "workflow": [
                {"id": "a", "kind": "tool", "tool": "one", "out": "a"},
                {"id": "b", "kind": "tool", "tool": "ToolDef", "out": "b"},
            ],
        }
    )
    compile_to(spec, tmp_path / "build")
    code, out, _, stderr = run_package(tmp_path / "build", {}, llm_server)
    assert code == 0, stderr
    assert out["outputs"] == {"one": 1, "two": 2}


# -- state, map, fallback examples --------------------------------------------------------------


def test_multi_hop_qa_answers_sub_questions_concurrently(
    builds: Callable[[str], Path],
) -> None:
    """The three sub-questions are read at once (requests in flight), each from passages
    the search tool retrieved in the package, and the findings keep the plan's order."""
    script = SCRIPTS["multi-hop-qa"]()
    with LLMTestServer(script, latency_s=0.3) as server:
        code, out, trace, stderr = run_package(
            builds("multi-hop-qa"), INPUTS["multi-hop-qa"], server
        )
        assert code == 0, stderr
        assert server.max_in_flight == 3
    assert [f["source"] for f in out["outputs"]["findings"]] == ["eiffel", "paris", "seine"]
    (synthesis,) = _users(server, "synthesizer")
    assert synthesis.index("France") < synthesis.index("Paris") < synthesis.index("the Seine")
    assert len(events(trace, "tool_call")) == 3


def test_reflexion_memory_accumulates_lessons_across_iterations(
    builds: Callable[[str], Path], llm_server: LLMTestServer
) -> None:
    llm_server.responder = SCRIPTS["reflexion-memory"]()
    code, _, _, stderr = run_package(
        builds("reflexion-memory"), INPUTS["reflexion-memory"], llm_server
    )
    assert code == 0, stderr
    first, second, third = _users(llm_server, "actor")
    assert "Name the power source." not in first
    assert "Name the power source." in second and "Cover every" not in second
    assert "Name the power source.\nCover every listed requirement." in third


def test_router_specialist_failure_falls_back(
    builds: Callable[[str], Path], llm_server: LLMTestServer
) -> None:
    """The technical specialist's endpoint fails on every attempt: after one retry the
    fallback records the incident and the generalist answers; the run is ok."""

    def tech_down(req: ChatRequest) -> ReplyLike:
        raise RuntimeError("specialist model unavailable")

    llm_server.responder = ByAgent(
        {
            "classifier": {"category": "technical"},
            "tech_agent": tech_down,
            "generalist": {"reply": "A specialist will follow up.", "needs_human": True},
        }
    )
    code, out, trace, stderr = run_package(
        builds("router-fallback"), INPUTS["router-fallback"], llm_server
    )
    assert code == 0, stderr
    assert out["status"] == "ok"
    outputs = out["outputs"]
    assert outputs["reply"] == "A specialist will follow up." and outputs["needs_human"] is True
    (incident,) = outputs["incidents"]
    assert incident.startswith("answer_technical failed (llm_error): ")
    failed = events(trace, "step_failed")
    assert [(e["step"], e["attempt"], e["then"]) for e in failed] == [
        ("answer_technical", 1, "retry"),
        ("answer_technical", 2, "fallback"),
    ]
    (start,) = events(trace, "fallback_start")
    assert start["pointer"] == "/workflow/1/else/0/fallback"
    ended = {(e["step"], e["status"]) for e in events(trace, "step_end")}
    assert ("answer_technical", "error") in ended
    assert ("technical_stand_in", "ok") in ended and ("record_technical_failure", "ok") in ended
    assert [r.agent for r in llm_server.requests if r.agent != "tech_agent"] == [
        "classifier",
        "generalist",
    ]
