"""Typed values (issue 10): a spec means one thing, or it is rejected with a located error.

Each regression test below is built from a spec that validated before and ran to a
wrong result (a list of assert strings that "passed" for code returning 0, a list
parameter that got a JSON string, a critic's `"false"` that ended a loop, a parallel
that returned `[null, null]`, a vote that compared whole objects): each now gives the
right result, run end to end as a compiled package against the loopback LLM server,
or is rejected by the validator with a located, coded error.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_document, cli_env, compile_to, events, load_runtime, mas2c, run_package
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mas2c import markdown, toolcode, values
from mas2c.compile import compile_spec
from mas2c.lang.spec import Spec
from mas2c.lang.validate import Report, validate_text
from mas2c.testserver import LLMTestServer, Script


def spec_of(text: str) -> Spec:
    report = validate_text(text)
    assert report.ok and report.spec is not None, report.format()
    return report.spec


def problems(text: str) -> Report:
    return validate_text(text, "spec.yaml")


def codes(report: Report) -> list[tuple[str, str]]:
    return [(p.code, p.pointer) for p in report.problems]


def build_and_run(
    tmp_path: Path, text: str, inputs: Any, server: LLMTestServer | None
) -> tuple[int, dict[str, Any], list[dict[str, Any]], str]:
    compile_to(spec_of(text), tmp_path / "build")
    return run_package(tmp_path / "build", inputs, server)


# -- 1. whole placeholders keep their types ----------------------------------------------------

TOOL_LIST = """
spec_version: "1"
name: typed-tool
inputs:
  xs: {type: array, items: {type: number}}
outputs: {total: total, kinds: kinds, label: label}
models: {m: {model: test-model}}
agents: {a: {role: A, model: m}}
tools:
  total_of:
    code: |
      def total_of(xs: list[float], scale: int = 1) -> float:
          return sum(xs) * scale
  kinds_of:
    code: |
      def kinds_of(value, nested) -> dict:
          return {"value": type(value).__name__, "nested": [type(v).__name__ for v in nested["items"]]}
  label_of:
    code: |
      def label_of(text: str) -> str:
          return text
workflow:
  - {id: add, kind: tool, tool: total_of, args: {xs: "{{ xs }}", scale: 2}, out: total}
  - id: inspect
    kind: tool
    tool: kinds_of
    args: {value: "{{ xs }}", nested: {items: ["{{ xs.0 }}", " {{ xs }} ", "n={{ xs.0 }}"]}}
    out: kinds
  - {id: label, kind: tool, tool: label_of, args: {text: "{{ xs | join(' + ') }} = {{ total }}"}, out: label}
"""


def test_a_list_parameter_gets_the_list(tmp_path: Path) -> None:
    """Before: `xs` arrived as the JSON text of the list (the tool summed characters or
    failed inside). Now a whole placeholder passes the list; text only inside a larger
    string, where lists render as JSON or through `join`."""
    code, out, _, stderr = build_and_run(tmp_path, TOOL_LIST, {"xs": [1, 2.5]}, None)
    assert code == 0, stderr
    assert out["outputs"]["total"] == 7.0
    assert out["outputs"]["kinds"] == {"value": "list", "nested": ["int", "list", "str"]}
    assert out["outputs"]["label"] == "1 + 2.5 = 7.0"


TOOL_COLLECTIONS = """
spec_version: "1"
name: typed-collections
inputs:
  tags: {type: array, items: {type: string}}
  point: {type: array, items: {type: integer}}
outputs: {distinct: distinct, kinds: kinds}
models: {m: {model: test-model}}
agents: {a: {role: A, model: m}}
tools:
  count_distinct:
    code: |
      def count_distinct(tags: set[str]) -> int:
          return len(tags)
  kinds_of:
    code: |
      from __future__ import annotations
      import typing
      def kinds_of(a: frozenset, b: typing.Tuple[int, int], c: tuple | None, d: list[int]) -> list:
          return [type(v).__name__ for v in (a, b, c, d)]
workflow:
  - {id: count, kind: tool, tool: count_distinct, args: {tags: "{{ tags }}"}, out: distinct}
  - id: kinds
    kind: tool
    tool: kinds_of
    args: {a: "{{ tags }}", b: "{{ point }}", c: "{{ point }}", d: "{{ point }}"}
    out: kinds
"""


def test_a_set_or_tuple_parameter_gets_a_set_or_tuple(tmp_path: Path) -> None:
    """JSON has only lists: a `set[str]` parameter got the list, so `len` counted the
    duplicates (3 distinct tags of 4 came out as 4), and a tuple was unhashable. Now a
    list given to a `set`, `frozenset` or `tuple` parameter (also `typing.Tuple[...]`,
    also a string annotation) arrives as one; a union or a `list` stays a list."""
    inputs = {"tags": ["a", "b", "a", "c"], "point": [1, 2]}
    code, out, _, stderr = build_and_run(tmp_path, TOOL_COLLECTIONS, inputs, None)
    assert code == 0, stderr
    assert out["outputs"]["distinct"] == 3
    assert out["outputs"]["kinds"] == ["frozenset", "tuple", "list", "list"]


def test_a_set_parameter_given_unhashable_items_is_a_tool_error() -> None:
    import types

    tools = load_runtime("_tools")

    def f(xs: set) -> int:  # type: ignore[type-arg]
        return len(xs)

    tool = types.SimpleNamespace(name="f")
    assert tools.python_arguments(tool, f, {"xs": [1, 1]}) == {"xs": {1}}
    with pytest.raises(load_runtime().ToolError, match="argument 'xs': a set cannot hold"):
        tools.python_arguments(tool, f, {"xs": [[1], [2]]})


def test_a_filter_that_does_not_fit_the_value_is_located() -> None:
    report = problems(TOOL_LIST.replace("{{ xs | join(' + ') }}", "{{ total | join }}"))
    assert ("MAS302", "/workflow/2/args/text") in codes(report)
    assert "filter `join`" in next(p.message for p in report.problems if p.code == "MAS302")


def test_a_wrong_argument_type_is_a_located_error_and_a_tool_error() -> None:
    report = problems(TOOL_LIST.replace('xs: "{{ xs }}"', 'xs: "numbers {{ xs }}"'))
    assert ("MAS405", "/workflow/0/args/xs") in codes(report)
    assert not report.ok


def test_tool_arguments_are_checked_at_run_time(tmp_path: Path) -> None:
    """An LLM (or a value of unknown type) passing the wrong type gets a ToolError that
    names the argument and the expected type, not a TypeError from inside the tool."""
    text = TOOL_LIST.replace(
        "xs: {type: array, items: {type: number}}", "xs: {type: [array, string]}"
    )
    code, out, _, _ = build_and_run(tmp_path, text, {"xs": "1, 2"}, None)
    assert code == 1
    assert out["error"]["type"] == "ToolError"
    assert "argument 'xs': expected array, got string" in out["error"]["message"]
    assert out["error"]["spec_pointer"] == "/workflow/0"


def test_signatures_read_with_ast() -> None:
    code = "def f(a: list[int], b: 'dict[str, float]' = None, *, c: int | None, **kw) -> bool: ..."
    found = toolcode.signature("f", code)
    assert found is not None and found.varkw
    assert found.parameters["properties"] == {
        "a": {"type": "array", "items": {"type": "integer"}},
        "b": {"type": "object", "additionalProperties": {"type": "number"}},
        "c": {"type": ["integer", "null"]},
    }
    assert found.parameters["required"] == ["a", "c"]
    assert found.returns == {"type": "boolean"}


# -- 2. structured outputs are validated against the whole schema ------------------------------

REFLEXION = """
spec_version: "1"
name: critic-loop
inputs: {task: {type: string}}
outputs: {review: review}
models: {m: {model: test-model}}
agents:
  critic:
    role: Critic
    model: m
    output:
      type: object
      properties:
        passed: {type: boolean}
        feedback: {type: string}
        tags: {type: array, items: {type: string, enum: [style, logic]}}
      required: [passed, feedback]
      additionalProperties: false
workflow:
  - {id: review, kind: call, agent: critic, prompt: "Review {{ task }}", out: review}
"""


def test_a_string_false_is_sent_back_not_taken_as_passed(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """Before: `{"passed": "false"}` was parsed and ended a loop as if it had passed
    (a non-empty string is true). Now it is re-asked with the validator's message."""
    llm_server.responder = Script(
        [
            (r"Your last answer", {"passed": False, "feedback": "fix it", "tags": ["logic"]}),
            (r"Review", {"passed": "false", "feedback": "fix it", "tags": ["Logic"]}),
        ]
    )
    code, out, _, stderr = build_and_run(tmp_path, REFLEXION, {"task": "t"}, llm_server)
    assert code == 0, stderr
    assert out["outputs"]["review"]["passed"] is False
    reask = llm_server.requests[1].last_user
    assert "at /passed: expected boolean, got string" in reask
    assert 'at /tags/0: "Logic" is not one of' in reask


def test_a_schema_violation_fails_at_the_agent(tmp_path: Path, llm_server: LLMTestServer) -> None:
    llm_server.responder = Script([], default={"passed": True, "feedback": "ok", "extra": 1})
    code, out, _, _ = build_and_run(tmp_path, REFLEXION, {"task": "t"}, llm_server)
    assert code == 1
    assert out["error"]["type"] == "StructuredOutputError"
    assert out["error"]["spec_pointer"] == "/agents/critic/output"
    assert "property 'extra' is not allowed" in out["error"]["message"]
    assert len(llm_server.requests) == 3  # the answer and two bounded re-asks


def test_validator_subset_and_nesting() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]},
            "c": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["a"],
    }
    assert values.validate({"a": {"b": 1}, "c": None}, schema) == []
    assert values.validate({"a": {}}, schema) == ["at /a: missing required property 'b'"]
    assert values.validate({"a": {"b": True}}, schema) == [
        "at /a/b: expected integer, got boolean true"
    ]
    assert values.schema_keyword_problem({"$ref": "#/x"}) is not None
    report = problems(REFLEXION.replace("additionalProperties: false", "$defs: {}"))
    assert ("MAS503", "/agents/critic/output") in codes(report)


# -- 3. test steps take a list of snippets ------------------------------------------------------

MBPP = """
spec_version: "1"
name: mbpp
inputs:
  code: {type: string}
  test_list: {type: array, items: {type: string}}
outputs: {listed: listed, given: given}
models: {m: {model: test-model}}
agents: {a: {role: A, model: m}}
workflow:
  - kind: test
    id: listed
    code: code
    tests: ["assert first_even([1, 2]) == 2", "assert first_even([3, 4, 6]) == 4", "assert first_even([]) is None"]
    out: listed
  - {id: given, kind: test, code: code, tests: "{{ test_list }}", out: given}
"""


def test_a_list_of_asserts_runs_each_one(tmp_path: Path) -> None:
    """Before: a list of assert strings was rendered as a list literal, never executed, and
    "passed" for code that returns 0. Now each snippet runs and is reported."""
    wrong = "```python\ndef first_even(xs):\n    return 0\n```"
    code, out, _, stderr = build_and_run(
        tmp_path, MBPP, {"code": wrong, "test_list": ["assert first_even([2]) == 2"]}, None
    )
    assert code == 0, stderr
    listed = out["outputs"]["listed"]
    assert listed["passed"] is False
    assert [r["passed"] for r in listed["results"]] == [False, False, False]
    assert listed["results"][0]["error"].startswith("AssertionError")
    assert out["outputs"]["given"]["results"] == [
        {"test": "assert first_even([2]) == 2", "passed": False, "error": "AssertionError"}
    ]
    right = "def first_even(xs):\n    return next((x for x in xs if x % 2 == 0), None)\n"
    code, out, _, _ = run_package(
        tmp_path / "build", {"code": right, "test_list": ["assert first_even([2]) == 2"]}, None
    )
    assert out["outputs"]["listed"]["passed"] is True
    assert out["outputs"]["given"]["passed"] is True


# -- 4. votes over structured answers -------------------------------------------------------------

VOTE = """
spec_version: "1"
name: vote
inputs: {q: {type: string}}
outputs: {best: best}
models: {m: {model: test-model}}
agents:
  solver:
    role: Solver
    model: m
    output:
      type: object
      properties: {result: {type: string}, reasoning: {type: string}}
      required: [result, reasoning]
workflow:
  - {id: vote, kind: ensemble, agent: solver, n: 3, vote: majority, VOTE_ON prompt: "{{ q }}", out: best}
"""


def test_a_vote_without_a_key_is_rejected_and_votes_on_the_key(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """Before: without an `answer` field the vote compared whole objects (reasoning
    included) and picked the minority answer. Now: MAS505 naming the choices, and
    `vote_on` votes on the field."""
    report = problems(VOTE.replace("VOTE_ON ", ""))
    assert ("MAS505", "/workflow/0/vote") in codes(report)
    assert "`result`, `reasoning`" in report.problems[0].message
    answers = [
        {"result": "7", "reasoning": "guess"},
        {"result": " 8", "reasoning": "one way"},
        {"result": "8 ", "reasoning": "another way"},
    ]
    llm_server.responder = Script([(r".", answers)])
    code, out, _, stderr = build_and_run(
        tmp_path, VOTE.replace("VOTE_ON ", "vote_on: result, "), {"q": "?"}, llm_server
    )
    assert code == 0, stderr
    assert out["outputs"]["best"]["result"].strip() == "8"


# -- 5. parallel results from nested steps; no two branches write one variable -------------------

PARALLEL = """
spec_version: "1"
name: par
inputs: {q: {type: string}, hard: {type: boolean}}
outputs: {both: both}
models: {m: {model: test-model}}
agents:
  a: {role: A, model: m}
workflow:
  - id: fan
    kind: parallel
    out: both
    branches:
      - - id: pick
          kind: branch
          cases:
            - when: hard
              steps: [{id: deep, kind: call, agent: a, prompt: "deep {{ q }}", out: left}]
          else: [{id: quick, kind: call, agent: a, prompt: "quick {{ q }}", out: left}]
      - - id: again
          kind: loop
          max_iterations: 1
          until: "true"
          steps: [{id: more, kind: call, agent: a, prompt: "more {{ q }}", out: right}]
"""


def test_parallel_results_come_from_nested_steps(tmp_path: Path, llm_server: LLMTestServer) -> None:
    """Before: a branch whose result was written inside a nested branch/loop gave null."""
    code, out, _, stderr = build_and_run(tmp_path, PARALLEL, {"q": "x", "hard": True}, llm_server)
    assert code == 0, stderr
    assert out["outputs"]["both"] == ["ANSWER: 42", "ANSWER: 42"]


def test_two_branches_writing_one_variable_is_an_error() -> None:
    report = problems(PARALLEL.replace("out: right", "out: left"))
    assert ("MAS506", "/workflow/0/branches/1/0/steps/0/out") in codes(report)


# -- 6. the validator catches what failed at run time -----------------------------------------------

PROMPTS = """
spec_version: "1"
name: prompts
inputs: {lang: {type: string}, q: {type: string}}
outputs: {a: a}
models: {m: {model: test-model}}
agents:
  a:
    role: "Translator into {{ lang }}"
    instructions: "Keep {{ \\"{{\\" }} and }} as they are; name {{ lang }} once."
    model: m
workflow:
  - {id: t, kind: call, agent: a, prompt: "Literal {{ \\"{{\\" }} x }}, {{ q }} and {single}", out: a}
"""


def test_role_and_instructions_are_rendered_and_the_escape_is_literal(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """Before: `{{ lang }}` in instructions was sent literally to the model."""
    code, _, _, stderr = build_and_run(tmp_path, PROMPTS, {"lang": "French", "q": "hi"}, llm_server)
    assert code == 0, stderr
    request = llm_server.requests[0]
    assert request.system == (
        "Translator into French\n\nKeep {{ and }} as they are; name French once."
    )
    assert request.last_user == "Literal {{ x }}, hi and {single}"


def test_a_misspelt_placeholder_in_instructions_is_located() -> None:
    report = problems(PROMPTS.replace("name {{ lang }}", "name {{ lnag }}"))
    assert ("MAS301", "/agents/a/instructions") in codes(report)
    problem = next(p for p in report.problems if p.code == "MAS301")
    assert problem.line == 10 and "when step /workflow/0 uses the agent" in problem.message


def test_undefined_names_in_tool_code() -> None:
    code = "import re\n\ndef f(x):\n    return sqrt(x) + helper(x) + math.pi + re.I\n"
    found = {(u.name, u.line, u.fix) for u in toolcode.undefined_names(code)}
    assert found == {
        ("sqrt", 4, "from math import sqrt"),
        ("helper", 4, None),
        ("math", 4, "import math"),
    }
    assert toolcode.undefined_names("from os.path import *\nx = y\n") == []  # unknowable


# -- 7. rendering ------------------------------------------------------------------------------------


def test_rendering_and_filters() -> None:
    state = {"xs": [1, "two", None], "obj": {"a": True}, "n": 3, "flag": False}

    def look(path: str) -> Any:
        value: Any = state
        for part in path.split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
        return value

    assert values.resolve("{{ xs }}", look) == [1, "two", None]
    assert values.resolve(" {{ n }}\n", look) == 3
    assert values.resolve("{{ xs | length }}", look) == 3
    assert values.resolve("{{ obj | json }}", look) == '{"a": true}'
    assert values.render("n={{ n }} f={{ flag }} {{ xs | join('; ') }}", look) == (
        "n=3 f=false 1; two; null"
    )
    assert values.render("{{ obj }}", look) == '{\n  "a": true\n}'
    assert values.render('a {{ "{{" }} b }} {c}', look) == "a {{ b }} {c}"
    with pytest.raises(values.TemplateError, match="join"):
        values.render("{{ n | join }}", look)
    assert values.parse_placeholder(" xs | upper ").error is not None


# -- 8. loops that run out -------------------------------------------------------------------------

LOOP = """
spec_version: "1"
name: loop
inputs: {q: {type: string}}
outputs: {d: d}
models: {m: {model: test-model}}
agents:
  a: {role: A, model: m}
workflow:
  - id: retry
    kind: loop
    max_iterations: 2
    until: d == "done"
    steps: [{id: go, kind: call, agent: a, prompt: "{{ q }}", out: d}]
"""


def test_an_exhausted_loop_says_so_or_fails(tmp_path: Path, llm_server: LLMTestServer) -> None:
    code, out, trace, _ = build_and_run(tmp_path, LOOP, {"q": "x"}, llm_server)
    assert code == 0
    assert out["warnings"] == [
        {
            "type": "loop_exhausted",
            "step": "retry",
            "pointer": "/workflow/0",
            "max_iterations": 2,
            "message": "loop 'retry' reached max_iterations (2) without its `until` holding",
        }
    ]
    assert events(trace, "loop_exhausted")[0]["step"] == "retry"
    failing = LOOP.replace("max_iterations: 2", "max_iterations: 2\n    on_exhausted: fail")
    code, out, _, _ = build_and_run(tmp_path / "fail", failing, {"q": "x"}, llm_server)
    assert code == 1 and out["error"]["type"] == "LoopExhausted"
    assert out["error"]["spec_pointer"] == "/workflow/0/until"


# -- 9. inputs against their whole schema, in the package and on the host ------------------------

NESTED_INPUT = """
spec_version: "1"
name: nested-input
inputs:
  order:
    type: object
    properties:
      items: {type: array, items: {type: object, properties: {sku: {type: string}}, required: [sku]}}
      priority: {type: string, enum: [low, high]}
    required: [items]
outputs: {o: order}
models: {m: {model: test-model}}
agents: {a: {role: A, model: m}}
workflow:
  - {id: t, kind: test, code: order, tests: "pass", out: t}
"""


def test_inputs_are_checked_against_nested_schemas(tmp_path: Path) -> None:
    bad = {"order": {"items": [{"name": "x"}], "priority": "High"}}
    code, out, trace, _ = build_and_run(tmp_path, NESTED_INPUT, bad, None)
    assert code == 2 and out["status"] == "bad_input"
    message = out["error"]["message"]
    assert "input 'order' at /items/0: missing required property 'sku'" in message
    assert "input 'order' at /priority: \"High\" is not one of" in message
    assert not events(trace, "step_start")


def test_mas2c_run_checks_inputs_on_the_host_before_any_container(tmp_path: Path) -> None:
    from mas2c.run import BadInput, run_system

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(NESTED_INPUT)
    in_file = tmp_path / "in.json"
    in_file.write_text(json.dumps({"order": {"items": [{}], "priority": "High"}}))
    # No Docker and no LLM are needed: nothing starts, no run folder is made.
    with pytest.raises(BadInput) as caught:
        run_system(spec_file, in_file, tmp_path / "run", backend="docker")
    message = str(caught.value)
    # The same check, and the same words, as the package's (mas2c.values).
    assert "input 'order' at /items/0: missing required property 'sku'" in message
    assert "input 'order' at /priority: \"High\" is not one of" in message
    assert not (tmp_path / "run").exists()


# -- issue 18 class 10: the README shows spec text as text --------------------------------------------


def test_readme_escapes_spec_text() -> None:
    hostile = "<script>alert(1)</script> ![x](http://e/x.png) a | b `c` *d*\n# not a heading"
    spec = spec_of(
        f"""
spec_version: "1"
name: hostile
description: {json.dumps(hostile)}
inputs: {{"a|b`": {{type: string, description: "x | y <img src=x>"}}}}
outputs: {{"o|": "x"}}
models: {{m: {{model: "gpt|<b>"}}}}
agents:
  "ag|<i>": {{role: {json.dumps(hostile)}, model: m}}
workflow:
  - {{id: s, kind: call, agent: "ag|<i>", prompt: "{{{{ a|b` }}}}", out: x}}
""".replace('"{{ a|b` }}"', '"hi"')
    )
    readme = compile_spec(spec).files["README.md"].decode()
    body = readme.split("\n", 1)[1]
    # Outside code spans (where CommonMark shows everything literally) no HTML is left.
    prose = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", body.split("```mermaid")[0])
    assert "<" not in prose and "&lt;script&gt;" in prose
    assert "![x]" not in body and "\\!\\[x\\]" in body
    for line in body.splitlines():
        if line.startswith("| ") and "---" not in line:
            unescaped = line.replace("\\|", "")
            assert unescaped.count("|") == line.count("|") - line.count("\\|")
    rows = [line for line in body.splitlines() if line.startswith("| `` a\\|b` `` |")]
    assert len(rows) == 1 and rows[0].replace("\\|", "").count("|") == 3
    assert markdown.cell("a | b") == "a \\| b"
    assert markdown.code("x`y", in_table=True) == "``x`y``"


# -- the property: typed values arrive with their type and value -----------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
EXAMPLES = int(os.environ.get("MAS2C_TYPES_EXAMPLES", "8"))

ANY = '{type: [string, number, integer, boolean, array, object, "null"]}'
PROPERTY = f"""
spec_version: "1"
name: carry
inputs:
  v: {ANY}
  vs: {{type: array}}
  snippets: {{type: array, items: {{type: string}}}}
outputs:
  direct: v
  via_tool: echoed
  nested: nested
  tested: tested
  seen: seen
  kept: kept
  mapped: mapped
  sub: sub
  sampled: sampled
  fell_back: fell_back
  looped: looped
state:
  seen: {{schema: {{type: array}}, reducer: append}}
  kept: {{schema: {{type: object}}, reducer: merge}}
models: {{m: {{model: test-model}}}}
agents: {{a: {{role: A, model: m}}}}
tools:
  echo:
    code: |
      def echo(value, wrapped):
          return {{"value": value, "wrapped": wrapped}}
  same:
    code: |
      def same(value):
          return value
  fail:
    code: |
      def fail(value):
          raise ValueError("always")
flows:
  carry_flow:
    inputs: {{value: {ANY}}}
    outputs: {{value: got, echoed: e}}
    steps:
      - {{id: f_echo, kind: tool, tool: echo, args: {{value: "{{{{ value }}}}", wrapped: ["{{{{ value }}}}"]}}, out: e}}
      - {{id: f_same, kind: tool, tool: same, args: {{value: "{{{{ e.value }}}}"}}, out: got}}
workflow:
  - {{id: e, kind: tool, tool: echo, args: {{value: "{{{{ v }}}}", wrapped: ["{{{{ v }}}}", {{k: "{{{{ v }}}}"}}]}}, out: echoed}}
  - {{id: n, kind: tool, tool: echo, args: {{value: "{{{{ echoed.value }}}}", wrapped: []}}, out: nested}}
  - {{id: t, kind: test, code: snippets, tests: "{{{{ snippets }}}}", out: tested}}
  - {{id: remember, kind: tool, tool: same, args: {{value: "{{{{ v }}}}"}}, out: seen}}
  - {{id: keep, kind: tool, tool: same, args: {{value: {{k: "{{{{ v }}}}"}}}}, out: kept}}
  - id: each
    kind: map
    over: "{{{{ vs }}}}"
    steps: [{{id: m_same, kind: tool, tool: same, args: {{value: "{{{{ item }}}}"}}, out: got}}]
    result: {{got: "{{{{ got }}}}", item: ["{{{{ item }}}}"], index: "{{{{ index }}}}"}}
    out: mapped
  - {{id: call_flow, kind: subflow, flow: carry_flow, with: {{value: "{{{{ v }}}}"}}, out: sub}}
  - {{id: sample_flow, kind: ensemble, flow: carry_flow, with: {{value: "{{{{ sub.value }}}}"}}, n: 2, vote: first, vote_on: echoed, out: sampled}}
  - id: guarded
    kind: tool
    tool: fail
    args: {{value: "{{{{ v }}}}"}}
    retry: 1
    out: fell_back
    fallback: [{{id: recover, kind: tool, tool: same, args: {{value: ["{{{{ v }}}}", "{{{{ error.code }}}}"]}}, out: fell_back}}]
  - id: again
    kind: loop
    max_iterations: 2
    until: "true"
    steps: [{{id: l_same, kind: tool, tool: same, args: {{value: "{{{{ v }}}}"}}, out: looped}}]
"""


@pytest.fixture(scope="module")
def carry_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("carry") / "build"
    compile_to(spec_of(PROPERTY), folder)
    return folder


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    value=JSON_VALUES,
    snippets=st.lists(st.sampled_from(["x = 1", "assert True", "pass"]), min_size=1, max_size=3),
)
def test_whole_placeholders_carry_type_and_value(
    carry_build: Path, value: Any, snippets: list[str]
) -> None:
    """Through tool args (nested too), test snippets, outputs, and what issue 11 added:
    declared state (append, merge), map items and results, a subflow's arguments and
    outputs, an ensemble over a flow, a fallback, a loop. Compared as JSON with the types
    (`1` != `1.0` != `true`), never with Python's `==` alone."""
    code, out, _, stderr = run_package(
        carry_build, {"v": value, "vs": [value, value], "snippets": snippets}, None, fork=True
    )
    assert code == 0, stderr
    outputs = out["outputs"]
    expected = {
        "direct": value,
        "via_tool": {"value": value, "wrapped": [value, {"k": value}]},
        "nested": {"value": value, "wrapped": []},
        "seen": [value],
        "kept": {"k": value},
        "mapped": [{"got": value, "item": [value], "index": i} for i in range(2)],
        "sub": {"value": value, "echoed": {"value": value, "wrapped": [value]}},
        "sampled": {"value": value, "echoed": {"value": value, "wrapped": [value]}},
        "fell_back": [value, "tool_error"],
        "looped": value,
    }
    for name, wanted in expected.items():
        assert typed(outputs[name]) == typed(wanted), name
    assert [r["test"] for r in outputs["tested"]["results"]] == snippets
    assert outputs["tested"]["passed"] is True


def typed(value: Any) -> Any:
    """A value with every scalar tagged by its type, so that 1, 1.0 and true differ."""
    if isinstance(value, list):
        return ["list", [typed(v) for v in value]]
    if isinstance(value, dict):
        return ["dict", {k: typed(v) for k, v in value.items()}]
    return [type(value).__name__, value]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(value=JSON_VALUES, filters=st.sampled_from(["", " | json", " | text"]))
def test_resolve_property(value: Any, filters: str) -> None:
    """In-process: a whole placeholder is the value (or its filter applied), always."""
    got = values.resolve("{{ v" + filters + " }}", lambda path: value)
    if not filters:
        assert got == value and type(got) is type(value)
    elif filters == " | json":
        assert json.loads(got) == value
    else:
        assert got == values.as_text(value)


# -- the programmer step: exiting 0 is not an answer ----------------------------------------------

PROGRAMMER = """
spec_version: "1"
name: printed
inputs: {q: {type: string}}
outputs: {program: program, answer: answer}
models: {m: {model: test-model}}
agents: {coder: {role: Coder, model: m}}
tools:
  final_answer:
    code: |
      def final_answer(output: str) -> str:
          return output.strip().splitlines()[-1] if output.strip() else ""
workflow:
  - {id: write, kind: programmer, agent: coder, prompt: "{{ q }}", max_attempts: 3, EXPECT out: program}
  - {id: read, kind: tool, tool: final_answer, args: {output: "{{ program.output }}"}, out: answer}
"""


def test_a_program_that_prints_nothing_has_not_answered(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """Before: a program that exited 0 without printing its answer (a function never
    called, a warning on stderr only) "passed", and the answer read off its output was
    empty text in a run that ended `ok`. Now, with `expect_output: true`, such an attempt
    fails and is repaired with the reason; reading `output` without it is MAS911."""
    report = problems(PROGRAMMER.replace("EXPECT ", ""))
    assert report.ok and ("MAS911", "/workflow/1/args/output") in codes(report)
    llm_server.responder = Script(
        [
            (
                r".",
                [
                    "```python\ndef solve():\n    return 6 * 7\n```",
                    "```python\nimport sys\nprint('  ', file=sys.stdout)\n"
                    "print('42', file=sys.stderr)\n```",
                    "```python\nprint(6 * 7)\n```",
                ],
            ),
        ]
    )
    text = PROGRAMMER.replace("EXPECT ", "expect_output: true, ")
    assert codes(problems(text)) == []
    code, out, _, stderr = build_and_run(tmp_path, text, {"q": "6*7"}, llm_server)
    assert code == 0, stderr
    program = out["outputs"]["program"]
    assert (program["passed"], program["attempts"], program["output"]) == (True, 3, "42\n")
    assert out["outputs"]["answer"] == "42"
    repair = llm_server.requests[1].last_user
    assert "exit code 0" in repair and "printed nothing on stdout" in repair
    # stderr alone is not the answer either: the third attempt was needed.
    assert "printed nothing on stdout" in llm_server.requests[2].last_user


def test_without_expect_output_a_program_that_defines_a_function_passes(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """Code that only defines functions (tested by a later `test` step) still passes on
    exit 0: `expect_output` is what changes the meaning, and only where it is written."""
    llm_server.responder = Script([(r".", "```python\ndef solve():\n    return 42\n```")])
    text = PROGRAMMER.replace("EXPECT ", "")
    code, out, _, stderr = build_and_run(tmp_path, text, {"q": "6*7"}, llm_server)
    assert code == 0, stderr
    assert out["outputs"]["program"]["passed"] is True
    assert out["outputs"]["program"]["attempts"] == 1
    assert len(llm_server.requests) == 1


# -- the constructs added since: flows, state, map, retry/fallback ---------------------------------

FLOW_VOTE = """
spec_version: "1"
name: flow-vote
inputs: {q: {type: string}}
outputs: {best: best.answer}
models: {m: {model: test-model}}
agents: {solver: {role: Solver, model: m, instructions: "Think, then end with ANSWER: <value>"}}
flows:
  solve:
    inputs: {problem: {type: string}}
    outputs: {answer: reply}
    steps:
      - {id: think, kind: call, agent: solver, prompt: "Solve {{ problem }}", out: reply}
workflow:
  - {id: vote, kind: ensemble, flow: solve, with: {problem: "{{ q }}"}, n: 5, vote: majority, out: best}
"""


def test_a_vote_over_a_flow_compares_the_final_answer_of_its_text(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """Before: an ensemble over a flow whose voted output is a text answer compared the
    whole texts (reasoning included): two copies of one wrong answer beat three right
    answers reasoned differently. Now a text is voted by its last `ANSWER:` line, as an
    agent's text answer always was; numbers compare by value inside lists too."""
    wrong = "I add them.\nANSWER: 7"
    llm_server.responder = Script(
        [
            (
                r"Solve",
                [
                    wrong,
                    "Multiply:\nANSWER: 9",
                    wrong,
                    "Clearly 3*3.\nANSWER:  9",
                    "So\nanswer: 9 ",
                ],
            )
        ]
    )
    code, out, _, stderr = build_and_run(tmp_path, FLOW_VOTE, {"q": "?"}, llm_server)
    assert code == 0, stderr
    # Which of the three right answers wins depends on which sample finished first.
    last_line = out["outputs"]["best"].strip().splitlines()[-1]
    assert " ".join(last_line.split()).upper() == "ANSWER: 9"
    voting = load_runtime("_voting")
    assert voting.majority([{"answer": [1.0]}, {"answer": [3]}, {"answer": [1]}]) == {
        "answer": [1.0]
    }
    assert voting.vote_key({"answer": {"x": [2.0]}}) == voting.vote_key({"answer": {"x": [2]}})


TEXT_VOTE = """
spec_version: "1"
name: text-vote
inputs: {q: {type: string}}
outputs: {best: best}
models: {m: {model: test-model}}
agents: {solver: {role: Solver, model: m, instructions: "Think, then end with ANSWER: <value>"}}
workflow:
  - {id: vote, kind: ensemble, agent: solver, n: 5, prompt: "Solve {{ q }}", vote: majority, out: best}
"""

# How models state a final answer: each gives the answer after the last `answer:` marker.
ANSWER_FORMS = [
    "I worked it out.\nANSWER: {a}",
    "Adding them up, so the ANSWER: {a}",
    "**ANSWER:** {a}",
    "Reasoning first.\n\n**Answer**: {a}",
    "answer: **{a}**",
    "## Final Answer:\n\n{a}\n",
    "> Answer: `{a}`",
    "The answer: not obvious.\n- ANSWER:{a}",
    "Answer: {a}.",
]


def test_a_vote_over_text_answers_compares_the_stated_answer_in_any_common_form(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """Before: only an `ANSWER:` at a line's start was read; `... so the ANSWER: 9`,
    `**ANSWER:** 9` or `**Answer**:` on its own line compared as whole texts, so two
    copies of one wrong reply beat three right ones written differently."""
    wrong = "I add them: ANSWER: 7"
    replies = [wrong, "3*3, so the ANSWER: 9", wrong, "**ANSWER:** 9", "**Answer**:\n\n9."]
    llm_server.responder = Script([(r"Solve", replies)])
    code, out, _, stderr = build_and_run(tmp_path, TEXT_VOTE, {"q": "3*3"}, llm_server)
    assert code == 0, stderr
    assert values.final_answer(out["outputs"]["best"]) == "9", out["outputs"]
    assert len(llm_server.requests) == 5


@settings(max_examples=100 if os.environ.get("CI") != "true" else 30, deadline=None)
@given(
    st.text(st.characters(whitelist_categories=["L", "N", "Zs"], whitelist_characters="-+/=$,"))
    .map(str.strip)
    .filter(lambda a: a and "answer" not in a.casefold()),
    st.sampled_from(ANSWER_FORMS),
)
def test_every_answer_form_gives_the_same_vote_and_score(answer: str, form: str) -> None:
    """Votes (the package's `_voting`) and batch scorers (on the host) read the very same
    final answer, in every form: one function, `values.final_answer`."""
    from mas2c.batch import final_answer, score_text

    text = form.format(a=answer)
    assert values.final_answer(text) == answer == final_answer(text)
    voting = load_runtime("_voting")
    assert voting.vote_key(text) == voting.vote_key(f"ANSWER: {answer}")
    assert score_text("exact", text, answer) == 1.0


def test_what_is_not_an_answer_marker() -> None:
    """No marker: None (the whole text is compared); code and longer words are not
    markers; a marker with nothing after it is an empty answer, which does not vote."""
    assert values.final_answer("42") is None
    assert values.final_answer('print("ANSWER:", x)') is None
    assert values.final_answer("the reanswer: 3") is None
    assert values.final_answer("ANSWER:") == ""
    assert values.final_answer("answer: first\nthen ANSWER: 3.14.") == "3.14"
    assert values.final_answer("ANSWER: ...") == "..."
    assert load_runtime("_voting").vote_key("ANSWER:  \n") is None

CHECKPOINTED = """
spec_version: "1"
name: ckpt
inputs: {v: {type: integer}}
outputs: {flag: flag, ratio: ratio}
models: {m: {model: test-model}}
agents: {a: {role: A, model: m}}
tools:
  same:
    code: |
      def same(v: int) -> int:
          return v
  is_one:
    code: |
      def is_one(v: int) -> bool:
          return v == 1
  as_float:
    code: |
      def as_float(v: int) -> float:
          return float(v)
workflow:
  - {id: first, kind: tool, tool: same, args: {v: "{{ v }}"}, out: flag}
  - {id: second, kind: tool, tool: is_one, args: {v: "{{ v }}"}, out: flag}
  - {id: third, kind: tool, tool: same, args: {v: "{{ v }}"}, out: ratio}
  - {id: fourth, kind: tool, tool: as_float, args: {v: "{{ v }}"}, out: ratio}
"""


def test_a_resumed_run_keeps_the_types_its_steps_wrote(tmp_path: Path) -> None:
    """Before: a checkpoint saved only the variables a step changed by `==`, and
    `1 == True == 1.0`, so a step that turned `1` into `true` (or `1.0`) saved nothing and
    the resumed run's result said `1`. Now a change of type is a change."""
    compile_to(spec_of(CHECKPOINTED), tmp_path / "build")
    env: dict[str, str | None] = {"MAS2C_CHECKPOINT_DIR": str(tmp_path / "checkpoints")}
    runs = [run_package(tmp_path / "build", {"v": 1}, None, env=env) for _ in range(2)]
    for code, out, _, stderr in runs:
        assert code == 0, stderr
        assert out["outputs"] == {"flag": True, "ratio": 1.0}
        assert type(out["outputs"]["ratio"]) is float
    assert len(events(runs[1][2], "step_resumed")) == 4


EXHAUSTED = """
spec_version: "1"
name: exhaust
inputs: {q: {type: string}}
outputs: {r: r}
models: {m: {model: test-model}}
agents: {a: {role: A, model: m}}
tools:
  same:
    code: |
      def same(value):
          return value
workflow:
  - id: again
    kind: loop
    max_iterations: 2
    until: "r == 'done'"
    steps: [{id: s, kind: tool, tool: same, args: {value: "{{ q }}"}, out: r}]
"""


def test_mas2c_run_shows_a_loop_that_ran_out(tmp_path: Path, llm_server: LLMTestServer) -> None:
    """Before: the package's out.json listed the exhausted loop under `warnings`, but the
    host's typed reading of result.json dropped the field: `mas2c run` said only
    `ok`, and its `--json` result and `run_system`'s outcome had no warnings. Now they
    carry them (typed: `RunWarning`) and stderr says so."""
    (tmp_path / "spec.yaml").write_text(EXHAUSTED)
    (tmp_path / "in.json").write_text('{"q": "x"}')
    env = cli_env(OPENAI_API_KEY="test", OPENAI_BASE_URL=llm_server.base_url)
    proc = mas2c(
        "run", "spec.yaml", "--input", "in.json", "--run-dir", "run",
        "--sandbox", "unisolated", "--json", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warnings = cli_document(proc)["result"]["warnings"]
    assert warnings == [
        {
            "type": "loop_exhausted",
            "step": "again",
            "pointer": "/workflow/0",
            "max_iterations": 2,
            "message": "loop 'again' reached max_iterations (2) without its `until` holding",
        }
    ]
    assert (
        "mas2c: warning: loop 'again' reached max_iterations (2) without its `until` holding "
        "(at /workflow/0)" in proc.stderr
    )


def test_a_result_keeps_its_first_warnings_and_refuses_malformed_ones(tmp_path: Path) -> None:
    from mas2c.runfolder import MAX_WARNINGS, read_result, result_or_error

    many = [{"type": "map_truncated", "message": f"cut {i}", "items": i} for i in range(5000)]
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"status": "ok", "outputs": {}, "warnings": many}))
    result = read_result(path)
    assert len(result.warnings) == MAX_WARNINGS and result.warnings[3].items == 3
    path.write_text(
        json.dumps({"status": "ok", "outputs": {}, "warnings": [{"type": "x", "step": "a\x1b"}]})
    )
    assert result_or_error(path).code == "bad_result"


TIED = """
spec_version: "1"
name: tied
inputs: {q: {type: string}}
outputs: {best: best}
models: {m: {model: test-model}}
agents: {solver: {role: Solver, model: m}}
workflow:
  - {id: sample, kind: ensemble, agent: solver, n: 3, vote: majority, prompt: "{{ q }}", out: best}
"""


def test_a_vote_without_a_majority_says_so(tmp_path: Path, llm_server: LLMTestServer) -> None:
    """Before: three different answers "won" by being first, and the run said only `ok`
    (a majority vote that meant nothing). Now the tie is a trace event and a warning; a
    real majority is not."""
    llm_server.responder = Script([(r".", ["ANSWER: 1", "ANSWER: 2", "ANSWER: 3"])])
    code, out, trace, stderr = build_and_run(tmp_path, TIED, {"q": "?"}, llm_server)
    assert code == 0, stderr
    assert out["outputs"]["best"] in ("ANSWER: 1", "ANSWER: 2", "ANSWER: 3")
    assert out["warnings"] == [
        {
            "type": "vote_tied",
            "step": "sample",
            "pointer": "/workflow/0",
            "message": "ensemble 'sample': no majority among 3 answers: 3 different answers "
            "had 1 vote(s) each; the earliest of them won",
        }
    ]
    (tied,) = events(trace, "vote_tied")
    assert (tied["answers"], tied["votes"], tied["tied"]) == (3, 1, 3)
    llm_server.responder = Script([(r".", ["ANSWER: 1", "ANSWER: 2", "ANSWER: 2"])])
    code, out, trace, _ = run_package(tmp_path / "build", {"q": "?"}, llm_server)
    assert code == 0 and out["outputs"]["best"] == "ANSWER: 2"
    assert "warnings" not in out and not events(trace, "vote_tied")


UNTYPED_VERDICT = """
spec_version: "1"
name: untyped-verdict
inputs: {code: {type: string}}
outputs: {check: check}
models: {m: {model: test-model}}
agents: {a: {role: A, model: m}}
tools:
  lint:
    code: |
      def lint(code):
          return {"passed": "false" if "bug" in code else True}
workflow:
  - id: until_clean
    kind: loop
    max_iterations: 2
    until: check.passed
    steps: [{id: run_lint, kind: tool, tool: lint, args: {code: "{{ code }}"}, out: check}]
"""


def test_a_condition_never_takes_a_string_for_true(tmp_path: Path) -> None:
    """Before: a value of unknown type used as true or false went by Python truthiness, so
    a tool's `{"passed": "false"}` ended the loop as if it had passed (the class of the
    critic's `"false"`, where no output schema catches it). Now only a boolean is true or
    false: a known non-boolean type is MAS513, an unknown one a `condition` error at run
    time; a real boolean still works."""
    code, out, _, _ = build_and_run(tmp_path, UNTYPED_VERDICT, {"code": "a bug"}, None)
    assert code == 1 and out["error"]["code"] == "condition"
    assert out["error"]["spec_pointer"] == "/workflow/0/until"
    assert "`check.passed` is string 'false', not true or false" in out["error"]["message"]
    code, out, _, _ = run_package(tmp_path / "build", {"code": "fine"}, None)
    assert code == 0 and out["outputs"]["check"] == {"passed": True} and "warnings" not in out
