"""The step-kind registry: a kind is one class (facts) plus one emitter (and its template).

A toy kind, `echo` (tests/toykind/echo.py + echo.py.j2), is added without touching
mas2c, and flows through validate, compile, graph, the generator's language text and
a real run of the compiled package. The built-in kinds answer the same facts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_package

from mas2c import graph
from mas2c.compile import EMITTERS, compile_spec
from mas2c.generate import system_prompt
from mas2c.lang.spec import STEP_CLASSES, StepBase, json_schema, language_description, static_calls
from mas2c.lang.validate import validate_text

ECHO_SPEC = """\
spec_version: "1"
name: echo-demo
inputs:
  who: {type: string}
outputs:
  greeting: greeting
agents:
  unused: {role: Nobody, model: m}
models:
  m: {model: none}
workflow:
  - {id: greet, kind: echo, text: "Hello, {{ who }}!", out: greeting}
  - {id: shout, kind: echo, text: "{{ greeting }} {{ greeting }}", out: twice}
"""


@pytest.fixture
def echo_kind() -> Iterator[None]:
    from toykind import echo

    echo.register()
    try:
        yield
    finally:
        echo.unregister()
    assert "echo" not in STEP_CLASSES and "echo" not in EMITTERS


def test_every_builtin_kind_has_facts_and_an_emitter() -> None:
    for kind, cls in STEP_CLASSES.items():
        assert issubclass(cls, StepBase), kind
        assert cls.LANGUAGE, f"{kind} has no language description"
        assert kind in EMITTERS, f"{kind} has no emitter"
        assert f"- {kind}: " in language_description()


def test_toy_kind_flows_through_validate_compile_graph_and_run(
    echo_kind: None, tmp_path: Path
) -> None:
    report = validate_text(ECHO_SPEC, "echo.yaml")
    assert report.ok, [p.message for p in report.errors]
    assert report.spec is not None
    # validate: the kind's placeholders are checked like any other kind's
    broken = validate_text(ECHO_SPEC.replace("{{ who }}", "{{ whom }}"), "echo.yaml")
    assert [(p.code, p.pointer) for p in broken.errors] == [("MAS301", "/workflow/0/text")]
    # the published schema and the generator's language know it
    assert "echo" in str(json_schema())
    assert "- echo: renders `text`" in system_prompt([])
    assert static_calls(report.spec.workflow[0]) == 0
    # graph
    assert 's_greet["greet<br/>echo: text<br/>→ greeting"]' in graph.mermaid(report.spec)
    assert "s_greet --> s_shout" in graph.mermaid(report.spec)
    # compile: its template is used, and the package runs
    build = compile_spec(report.spec)
    workflow = build.files["mas2c_echo_demo/workflow.py"].decode()
    assert 'self.state["greeting"] = render("Hello, {{ who }}!", self.state)' in workflow
    build.write(tmp_path / "build")
    code, out, _trace, stderr = run_package(tmp_path / "build", {"who": "Ada"}, None)
    assert code == 0, stderr
    assert out["outputs"] == {"greeting": "Hello, Ada!"}


def test_unknown_kind_is_still_a_located_error(echo_kind: None) -> None:
    report = validate_text(ECHO_SPEC.replace("kind: echo, text", "kind: ecco, text", 1), "x")
    found = [(p.code, p.pointer, p.hint) for p in report.errors]
    assert found == [("MAS104", "/workflow/0/kind", "did you mean `echo`?")]


def test_a_package_carries_only_the_runtime_modules_its_kinds_need() -> None:
    from conftest import example_spec

    voting = {"debate": True, "self-consistency": True, "chain-of-thought": False}
    for name, votes in voting.items():
        files = compile_spec(example_spec(name)).files
        package = "mas2c_" + name.replace("-", "_")
        assert (f"{package}/_voting.py" in files) == votes, name
