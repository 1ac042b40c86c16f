"""Property tests of the compiler (hypothesis).

1. Random valid specs, every step kind nested in every composite, compile to code
   that parses, imports and, run against the loopback test LLM server (default
   responder: "ANSWER: 42" for text, a minimal schema instance for structured
   output), ends with status ok.
2. Random text in every text field (role, instructions, prompts around their
   placeholders, tool descriptions, tool arguments, condition literals, the spec's
   description, input/output names, model names) reaches the LLM (or the output)
   byte-identical: what the server receives contains exactly the spec's strings.

Specs are built as Python dicts and go through `Spec.model_validate` (via the
validator, which must find no error) and `compile_spec`, never through YAML. Each
package is also checked with `ruff --select F,E9` and run as its own process, forked
from a process with openai already imported (`run_package(..., fork=True)`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import events, run_package
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mas2c import markdown
from mas2c.compile import compile_spec
from mas2c.lang.expr import placeholders, whole_placeholder
from mas2c.lang.source import SpecSource
from mas2c.lang.spec import Spec
from mas2c.lang.validate import validate_source
from mas2c.pyemit import docstring_text, string_literal, text_literal, toml_string, value_literal
from mas2c.testserver import LLMTestServer, default_responder

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# Each example compiles, lints and runs a package in a process of its own: few examples.
SPEC_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=_SLOW)
TEXT_SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=_SLOW)

OBJ_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "ok": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["answer", "ok", "score"],
}
# The fields each kind of state variable has (what placeholders and conditions may read).
FIELDS = {
    "text": [],
    "num": [],
    "list": [],
    "obj": ["answer", "ok", "score"],
    "prog": ["code", "output", "passed", "attempts"],
    "test": ["passed", "output"],
}
GROUPS = {"text": ["talker", "helper"], "obj": ["judge", "rater"]}
ECHO = 'def echo(text: str) -> str:\n    """Return the text unchanged."""\n    return text\n'
ID_PREFIXES = ["s", "x-", "x_", "Step", "_p", "class", "if-", "run_workflow"]
_RUFF = Path(sys.executable).parent / "ruff"
RUFF = [str(_RUFF)] if _RUFF.exists() else [sys.executable, "-m", "ruff"]
SAFE_TEXT = st.text(alphabet="abc XYZ:.,;!?-\n", max_size=12)


# -- random valid specs ---------------------------------------------------------------------------


@dataclass
class Ctx:
    draw: Any
    ids: set[str] = field(default_factory=set)
    names: int = 0
    leaves: int = 0

    def step_id(self) -> str:
        candidate = f"{self.draw(st.sampled_from(ID_PREFIXES))}{self.draw(st.integers(0, 3))}"
        while candidate in self.ids:
            candidate += f"_{len(self.ids)}"
        self.ids.add(candidate)
        return candidate

    def var(self) -> str:
        self.names += 1
        return f"v{self.names}"


def _template(ctx: Ctx, scope: dict[str, str]) -> str:
    parts = []
    for _ in range(ctx.draw(st.integers(0, 3))):
        parts.append(ctx.draw(SAFE_TEXT))
        name = ctx.draw(st.sampled_from(sorted(scope)))
        fields = FIELDS[scope[name]]
        if fields and ctx.draw(st.booleans()):
            parts.append(f"{{{{ {name}.{ctx.draw(st.sampled_from(fields))} }}}}")
        else:
            parts.append(f"{{{{{ctx.draw(st.sampled_from([' ', '']))}{name} }}}}")
    parts.append(ctx.draw(SAFE_TEXT))
    return "".join(parts) or "Go."


def _atom(ctx: Ctx, scope: dict[str, str]) -> str:
    options = [
        "true",
        "false",
        "1 < 2",
        "None is None",
        "[1, 2] != []",
        "(1,) == (1,)",
        "-1e999 < 0",
    ]
    for name, kind in sorted(scope.items()):
        options += [f"{name} is not None"]
        # Constants of the variable's own JSON type (a number compared with a string is MAS309).
        if kind == "text":
            options += [f"{name} != 'field(item(zzz'", f"{name} not in ['a', 'b']"]
        if kind == "num":
            options += [f"{name} != 7", f"{name} not in [1, 2]"]
        if kind == "num":
            options += [f"{name} >= 0", f"-{name} <= 0", f"{name} < 1e999"]
        else:
            options += [f"len({name}) >= 0"]
        if kind == "obj":
            options += [
                f"{name}.ok",
                f"not {name}.ok",
                f"{name}.answer == 'x'",
                f"{name}['score'] < 1",
            ]
        if kind in ("prog", "test"):
            options += [f"{name}.passed", f"not {name}.passed", f"'Error' in {name}.output"]
        if kind == "list":
            options += [f"len({name}) > 0", f"{name}[0] is not None"]
    return ctx.draw(st.sampled_from(options))


def _condition(ctx: Ctx, scope: dict[str, str]) -> str:
    first = _atom(ctx, scope)
    shape = ctx.draw(st.sampled_from(["atom", "and", "or", "not"]))
    if shape == "not":
        return f"not ({first})"
    if shape in ("and", "or"):
        return f"{first} {shape} {_atom(ctx, scope)}"
    return first


def _leaf(ctx: Ctx, scope: dict[str, str]) -> tuple[dict[str, Any], str | None, str | None]:
    """A leaf step, the variable it writes and that variable's kind."""
    ctx.leaves += 1
    kinds = ["call", "call", "ensemble", "debate", "programmer", "tool"]
    if any(kind in ("prog", "text") for kind in scope.values()):
        kinds.append("test")
    kind = ctx.draw(st.sampled_from(kinds))
    step: dict[str, Any] = {"id": ctx.step_id(), "kind": kind}
    out_kind: str | None
    if kind == "call":
        group = ctx.draw(st.sampled_from(sorted(GROUPS)))
        step.update(agent=ctx.draw(st.sampled_from(GROUPS[group])), prompt=_template(ctx, scope))
        out_kind = group
    elif kind in ("ensemble", "debate"):
        group = ctx.draw(st.sampled_from(sorted(GROUPS)))
        if kind == "ensemble" and ctx.draw(st.booleans()):
            step.update(
                agent=ctx.draw(st.sampled_from(GROUPS[group])), n=ctx.draw(st.integers(1, 3))
            )
        elif kind == "ensemble":
            agents = ctx.draw(st.lists(st.sampled_from(GROUPS[group]), min_size=1, max_size=2))
            step.update(agents=agents, n=ctx.draw(st.integers(1, 2)))
        else:
            agents = ctx.draw(st.lists(st.sampled_from(GROUPS[group]), min_size=2, max_size=3))
            step.update(agents=agents, rounds=ctx.draw(st.integers(1, 2)))
        step["prompt" if kind == "ensemble" else "topic"] = _template(ctx, scope)
        if ctx.draw(st.booleans()):
            judge = ctx.draw(st.sampled_from(GROUPS["text"] + GROUPS["obj"]))
            step["judge"] = judge
            out_kind = "obj" if judge in GROUPS["obj"] else "text"
        else:
            step["vote"] = "majority"
            out_kind = group
    elif kind == "programmer":
        step.update(
            agent=ctx.draw(st.sampled_from(GROUPS["text"])),
            prompt=_template(ctx, scope),
            max_attempts=ctx.draw(st.integers(1, 2)),
            run_timeout_s=20,
        )
        out_kind = "prog"
    elif kind == "test":
        name = ctx.draw(
            st.sampled_from(sorted(n for n, k in scope.items() if k in ("prog", "text")))
        )
        code = f"{name}.code" if scope[name] == "prog" else name
        step.update(code=code, tests="assert 1 + 1 == 2\n", run_timeout_s=20)
        out_kind = "test"
    else:
        # `echo` takes a str: a whole placeholder would pass the value itself (an int, a
        # dict: MAS405), so the text rendering is asked for with the `text` filter.
        text = _template(ctx, scope)
        whole = whole_placeholder(text)
        if whole is not None:
            text = f"{{{{ {'.'.join(whole.path)} | text }}}}"
        step.update(tool="echo", args={"text": text})
        out_kind = "text"
    if ctx.draw(st.integers(0, 9)) == 0:
        step["timeout_s"] = 60
    out = None
    if ctx.draw(st.integers(0, 4)) > 0:
        out = ctx.var()
        step["out"] = out
    return step, out, out_kind if out else None


def _steps(
    ctx: Ctx, scope: dict[str, str], depth: int, size: int
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    steps = []
    scope = dict(scope)
    for _ in range(size):
        composite = depth < 2 and ctx.leaves < 5 and ctx.draw(st.integers(0, 2)) == 0
        if not composite or ctx.leaves >= 7:
            step, out, kind = _leaf(ctx, scope)
            if out and kind:
                scope[out] = kind
            steps.append(step)
            continue
        shape = ctx.draw(st.sampled_from(["parallel", "loop", "branch"]))
        step_id = ctx.step_id()
        if shape == "parallel":
            branches = []
            after = dict(scope)
            for _ in range(ctx.draw(st.integers(1, 3))):
                body, inner = _steps(ctx, scope, depth + 1, ctx.draw(st.integers(1, 2)))
                branches.append(body)
                after.update(inner)
            step = {"id": step_id, "kind": "parallel", "branches": branches}
            if ctx.draw(st.booleans()):
                step["out"] = ctx.var()
                after[step["out"]] = "list"
            scope = after
        elif shape == "loop":
            body, inner = _steps(ctx, scope, depth + 1, ctx.draw(st.integers(1, 2)))
            step = {
                "id": step_id,
                "kind": "loop",
                "steps": body,
                "until": _condition(ctx, inner),
                "max_iterations": ctx.draw(st.integers(1, 2)),
            }
            scope = inner
        else:
            cases = []
            for _ in range(ctx.draw(st.integers(1, 2))):
                body, _inner = _steps(ctx, scope, depth + 1, ctx.draw(st.integers(1, 2)))
                cases.append({"when": _condition(ctx, scope), "steps": body})
            step = {"id": step_id, "kind": "branch", "cases": cases}
            if ctx.draw(st.booleans()):
                step["else"], _inner = _steps(ctx, scope, depth + 1, 1)
        steps.append(step)
    return steps, scope


@st.composite
def valid_specs(draw: Any) -> dict[str, Any]:
    ctx = Ctx(draw)
    inputs = {"q": {"type": "string"}, "k": {"type": "integer", "default": 3}}
    scope = {"q": "text", "k": "num"}
    workflow, scope = _steps(ctx, scope, 0, draw(st.integers(1, 4)))
    outputs = {}
    for index, name in enumerate(draw(st.lists(st.sampled_from(sorted(scope)), max_size=3))):
        fields = FIELDS[scope[name]]
        path = f"{name}.{draw(st.sampled_from(fields))}" if fields and draw(st.booleans()) else name
        outputs[f"out_{index}"] = path
    return {
        "spec_version": "1",
        "name": draw(st.sampled_from(["p", "prop-spec", "prop_spec2"])),
        "description": "A random valid spec.",
        "inputs": inputs,
        "outputs": outputs,
        "models": {
            "m": {"model": "test-model", "temperature": 0.5},
            "priced": {
                "model": "test-model-2",
                "price": {"input_per_mtok": 1, "output_per_mtok": 2},
            },
        },
        "agents": {
            "talker": {"role": "Talker", "instructions": "Answer.", "model": "m"},
            "helper": {
                "role": "Helper",
                "model": "priced",
                "tools": ["echo", "py"],
                "max_tool_rounds": 2,
            },
            "judge": {
                "role": "Judge",
                "instructions": "Judge.",
                "model": "m",
                "output": OBJ_SCHEMA,
            },
            "rater": {"role": "Rater", "model": "priced", "temperature": 0.1, "output": OBJ_SCHEMA},
        },
        "tools": {
            "echo": {"code": ECHO, "timeout_s": 5},
            "py": {"builtin": "python_exec", "timeout_s": 20},
        },
        "workflow": workflow,
    }


def _checked(data: dict[str, Any]) -> Spec:
    report = validate_source(SpecSource(data=data))
    assert report.ok and report.spec is not None, (
        report.format() + "\n" + json.dumps(data, indent=1)
    )
    return report.spec


def _compile_and_run(
    spec: Spec, server: LLMTestServer, inputs: dict[str, Any]
) -> tuple[int, dict[str, Any], list[dict[str, Any]], str, dict[str, bytes]]:
    build = compile_spec(spec)
    for path, data in build.files.items():
        if path.endswith(".py"):
            ast.parse(data.decode("utf-8"), filename=path)
    tomllib.loads(build.files["pyproject.toml"].decode("utf-8"))
    with tempfile.TemporaryDirectory(prefix="mas2c-prop-") as tmp:
        folder = Path(tmp) / "build"
        build.write(folder)
        lint = subprocess.run(
            [*RUFF, "check", "--isolated", "--no-cache", "--select", "F,E9", str(folder)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
        code, out, trace, stderr = run_package(folder, inputs, server, fork=True)
    return code, out, trace, stderr, build.files


@SPEC_SETTINGS
@given(data=valid_specs())
def test_random_valid_specs_compile_and_run_ok(
    llm_server_session: LLMTestServer, data: dict[str, Any]
) -> None:
    spec = _checked(data)
    server = llm_server_session
    server.responder = default_responder
    server.reset_counters()
    code, out, trace, stderr, _ = _compile_and_run(spec, server, {"q": "What is 6 * 7?"})
    assert code == 0 and out["status"] == "ok", f"{stderr}\n{json.dumps(out, indent=1)}"
    assert set(out["outputs"]) == set(spec.outputs)
    starts, ends = events(trace, "step_start"), events(trace, "step_end")
    assert len(starts) == len(ends) and starts, "every started step ends"
    assert all(e["status"] == "ok" for e in ends)
    assert {e["pointer"] for e in starts} <= {e["pointer"] for e in ends}
    assert len(events(trace, "llm_call")) == len(server.requests)
    assert out["usage"]["calls"] == len(server.requests)


# -- random text reaches the LLM byte-identical ---------------------------------------------------

SPECIAL = [
    '"',
    "'",
    '"""',
    "'''",
    "\\",
    "\\n",
    "\\x00",
    "\\u00e9",
    "{",
    "}",
    "{}",
    "{0}",
    "{x}",
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "{% raw %}",
    "${x}",
    "%s",
    "%(x)s",
    "\n",
    "\r",
    "\r\n",
    "\t",
    "\x00",
    "\x0b",
    "\x0c",
    "\x1b",
    "\x7f",
    "\x85",
    "\u2028",
    "\u2029",
    "\ufeff",
    "é",
    "ß",
    "İ",
    "ﬁ",
    "😀",
    "𝔘",
    "\u200b",
    " ",
    "  ",
    "# spec: /x",
    "# fmt: on",
    "DO NOT EDIT",
    "-->",
    "`",
    "|",
    "\\N{BULLET}",
    "f'{x}'",
    "<!--",
]
TEXT = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(SPECIAL)), max_size=8).map("".join)


def _escaped(text: str) -> str:
    """`text` as a template that renders as exactly `text` (the `{{ "{{" }}` escape)."""
    return text.replace("{{", '{{ "{{" }}')


def _only_placeholder_is(prompt: str, name: str) -> bool:
    return [p.path for p in placeholders(prompt)] == [(name,)]


@TEXT_SETTINGS
@given(
    role=TEXT.filter(bool),
    instructions=TEXT,
    before=TEXT,
    after=TEXT,
    value=TEXT,
    tool_text=TEXT,
    description=TEXT,
    tool_description=TEXT.filter(bool),
    literal=TEXT,
    name_in=TEXT.filter(bool),
    name_out=TEXT.filter(bool),
    model_name=TEXT.filter(lambda t: bool(t.strip())),
)
def test_random_text_reaches_the_llm_byte_identical(
    llm_server_session: LLMTestServer,
    role: str,
    instructions: str,
    before: str,
    after: str,
    value: str,
    tool_text: str,
    description: str,
    tool_description: str,
    literal: str,
    name_in: str,
    name_out: str,
    model_name: str,
) -> None:
    prompt = f"{before}{{{{ x }}}}{after}"
    topic = f"{after}{{{{ x }}}}{before}"
    arg = f"{tool_text}{{{{ x }}}}{tool_text}"
    assume(_only_placeholder_is(prompt, "x") and _only_placeholder_is(topic, "x"))
    assume(_only_placeholder_is(arg, "x") and name_in != "x" and name_out != "taken")
    x = value + "{{ not a placeholder }}" + literal
    data = {
        "spec_version": "1",
        "name": "text-fields",
        "description": description,
        "inputs": {"x": {"type": "string"}, name_in: {"type": "string", "default": value}},
        "outputs": {name_out: "echoed", "taken": "taken"},
        "models": {"m": {"model": model_name}},
        "agents": {
            # Roles and instructions are rendered like prompts: a literal `{{` is escaped.
            "a": {
                "role": _escaped(role),
                "instructions": _escaped(instructions),
                "model": "m",
                "tools": ["echo"],
            },
            "b": {"role": _escaped(role), "model": "m"},
        },
        "tools": {"echo": {"description": tool_description, "code": ECHO}},
        "workflow": [
            {"id": "ask", "kind": "call", "agent": "a", "prompt": prompt, "out": "answer"},
            {
                "id": "many",
                "kind": "ensemble",
                "agent": "b",
                "n": 1,
                "prompt": prompt,
                "vote": "majority",
            },
            {
                "id": "argue",
                "kind": "debate",
                "agents": ["b", "b"],
                "rounds": 1,
                "topic": topic,
                "vote": "majority",
            },
            {"id": "use", "kind": "tool", "tool": "echo", "args": {"text": arg}, "out": "echoed"},
            {
                "id": "pick",
                "kind": "branch",
                "cases": [
                    {
                        "when": f"x == {literal!r}",
                        "steps": [
                            {
                                "id": "differs",
                                "kind": "tool",
                                "tool": "echo",
                                "args": {"text": "literal"},
                                "out": "taken",
                            }
                        ],
                    },
                    {
                        "when": f"len(x) == {len(x)} and x == {x!r}",
                        "steps": [
                            {
                                "id": "yes",
                                "kind": "tool",
                                "tool": "echo",
                                "args": {"text": "same"},
                                "out": "taken",
                            }
                        ],
                    },
                ],
                "else": [
                    {
                        "id": "no",
                        "kind": "tool",
                        "tool": "echo",
                        "args": {"text": "other"},
                        "out": "taken",
                    }
                ],
            },
        ],
    }
    spec = _checked(data)
    assert spec.agents["a"].role == _escaped(role) and spec.workflow[0].prompt == prompt  # type: ignore[union-attr]
    server = llm_server_session
    server.responder = default_responder
    server.reset_counters()
    code, out, _trace, stderr, files = _compile_and_run(spec, server, {"x": x})
    assert code == 0 and out["status"] == "ok", f"{stderr}\n{json.dumps(out, indent=1)}"

    by_agent = {agent: [r for r in server.requests if r.agent == agent] for agent in ("a", "b")}
    (ask,) = by_agent["a"]
    rendered = f"{before}{x}{after}"
    assert role in ask.system and (instructions in ask.system)
    assert ask.messages[0]["role"] == "system" and ask.messages[0]["content"].startswith(role)
    assert rendered in ask.last_user
    assert ask.model == model_name
    (tool,) = ask.tools
    assert tool["function"]["description"] == tool_description
    # The ensemble's sample gets the same prompt; the debaters get the topic.
    b_users = [r.last_user for r in by_agent["b"]]
    assert any(rendered in text for text in b_users)
    assert sum(f"{after}{x}{before}" in text for text in b_users) >= 2
    assert all(role in r.system for r in by_agent["b"])
    # Tool arguments and condition literals reach the tool and the comparison unchanged.
    assert out["outputs"][name_out] == f"{tool_text}{x}{tool_text}"
    assert out["outputs"]["taken"] == "same"
    # The description only appears in docs and docstrings (checked: valid Python and TOML).
    # (The README shows it as text: HTML and Markdown syntax escaped.)
    assert markdown.text(description) in files["README.md"].decode("utf-8")


# -- the literal emitters, in process (fast, many examples) ---------------------------------------

LITERAL_SETTINGS = settings(max_examples=300, deadline=None)


@LITERAL_SETTINGS
@given(text=TEXT)
def test_string_and_text_literals_reproduce_the_text(text: str) -> None:
    assert ast.literal_eval(string_literal(text)) == text
    assert ast.literal_eval(text_literal(text)) == text
    assert ast.literal_eval(value_literal({text: [text, 1, None]})) == {text: [text, 1, None]}


@LITERAL_SETTINGS
@given(text=TEXT)
def test_docstring_text_reproduces_the_text(text: str) -> None:
    source = f'def f():\n    """{docstring_text(text)}\n    """\n'
    module = ast.parse(source)
    function = module.body[0]
    assert isinstance(function, ast.FunctionDef)
    doc = function.body[0]
    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    assert doc.value.value == text + "\n    "


@LITERAL_SETTINGS
@given(text=TEXT)
def test_toml_string_reproduces_the_text(text: str) -> None:
    assert tomllib.loads(f"key = {toml_string(text)}\n") == {"key": text}


# -- determinism across hash seeds ---------------------------------------------------------------

_SEEDED_DIGESTS = """
import hashlib, json, sys
from pathlib import Path
from mas2c.compile import compile_spec
from mas2c.lang.source import SpecSource
from mas2c.lang.validate import validate_source
result = {}
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    report = validate_source(SpecSource(data=json.loads(path.read_text())))
    files = compile_spec(report.spec).files
    result[path.stem] = {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}
print(json.dumps(result, sort_keys=True))
"""


@settings(
    max_examples=2 if os.environ.get("CI") == "true" else 6,
    deadline=None,
    suppress_health_check=[*_SLOW, HealthCheck.data_too_large],
)
@given(batch=st.lists(valid_specs(), min_size=4, max_size=4))
def test_random_specs_compile_to_the_same_bytes_under_every_hash_seed(
    batch: list[dict[str, Any]],
) -> None:
    """Random specs (every step kind, nested, with tools, structured agents, prices) compile to
    the same bytes in fresh interpreters with different PYTHONHASHSEEDs: no set or dict order
    that depends on string hashing reaches the output."""
    ours: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="mas2c-seeds-") as tmp:
        for index, data in enumerate(batch):
            report = validate_source(SpecSource(data=data))
            if not report.ok or report.spec is None:
                continue  # the shared generator drew a spec the validator rejects
            (Path(tmp) / f"s{index}.json").write_text(json.dumps(data), "utf-8")
            files = compile_spec(report.spec).files
            ours[f"s{index}"] = {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}
        assume(ours)
        for seed in ("0", "1", "987654321"):
            proc = subprocess.run(
                [sys.executable, "-c", _SEEDED_DIGESTS, tmp],
                env={**os.environ, "PYTHONHASHSEED": seed},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout) == ours, f"PYTHONHASHSEED={seed} changes the output"
