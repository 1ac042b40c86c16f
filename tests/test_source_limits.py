"""Spec files are bounded before anything reads them (issue 18, class 8).

A small YAML file must not expand into a huge document through aliases (a "billion laughs",
or one large anchor used many times: 1 MB once took `compile` 450 s and 4 GB), and text that
is not valid Unicode (a lone surrogate from a JSON `\\ud800` escape) must be a located
validation error, never a traceback from `compile` when it hashes or writes the spec.
The time and memory bounds are measured in `benchmarks/bench_yaml_bomb.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import mas2c

from mas2c.lang.source import MAX_EXPANDED_CHARS, MAX_SPEC_BYTES, parse_text
from mas2c.lang.validate import validate_text

HEAD = """\
spec_version: "1"
name: bomb
models: {m: {model: test-model}}
workflow:
  - {id: s, kind: call, agent: a0, prompt: hi, out: o}
outputs: {o: o}
"""


def laughs(levels: int = 12) -> str:
    lines = [HEAD, 'description: &l0 "lol"']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def big_anchor(size: int, uses: int) -> str:
    lines = [HEAD, f'description: &d "{"y" * size}"', "agents:"]
    lines += [f"  a{i}: {{role: *d, instructions: *d, model: m}}" for i in range(uses)]
    return "\n".join(lines) + "\n"


def problems(text: str, path: str = "spec.yaml") -> list[str]:
    report = validate_text(text, path)
    return [f"{p.code} {p.line}:{p.column} {p.message}" for p in report.errors]


def test_a_billion_laughs_is_refused_with_its_position() -> None:
    found = problems(laughs())
    assert len(found) == 1 and found[0].startswith("MAS001")
    assert "expands to more than" in found[0]


def test_one_large_anchor_used_many_times_is_refused() -> None:
    text = big_anchor(200_000, 100)  # 200 KB of file, 40 MB once expanded
    assert len(text) < 300_000 and MAX_EXPANDED_CHARS < 2 * 200_000 * 100
    found = problems(text)
    assert len(found) == 1 and "characters of text" in found[0] and found[0].startswith("MAS001")


def test_aliases_within_the_bounds_still_work() -> None:
    text = big_anchor(1_000, 20)
    report = validate_text(text, "spec.yaml")
    assert report.ok and report.spec is not None
    assert report.spec.agents["a19"].instructions == "y" * 1_000


def test_a_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as handle:
        handle.write(HEAD.encode())
        handle.write(b"description: " + b"z" * MAX_SPEC_BYTES + b"\n")
    proc = mas2c("validate", path, cwd=tmp_path, inprocess=True)
    assert proc.returncode == 1 and f"larger than {MAX_SPEC_BYTES} bytes" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


SURROGATE_SPEC = {
    "spec_version": "1",
    "name": "sur",
    "models": {"m": {"model": "test-model"}},
    "agents": {"a": {"role": "r", "model": "m"}},
    "workflow": [{"id": "s", "kind": "call", "agent": "a", "prompt": "hi", "out": "o"}],
    "outputs": {"o": "o"},
}


@pytest.mark.parametrize(
    ("where", "text"),
    [
        ("/description", '"description": "bad \\ud800 here"'),
        ("/agents/a/instructions", '"agents": {"a": {"role": "r", "model": "m", "instructions": "\\udfff"}}'),
        ("/agents", '"agents": {"a\\ud83d": {"role": "r", "model": "m"}, "a": {"role": "r", "model": "m"}}'),
    ],
)  # fmt: skip
def test_a_lone_surrogate_in_a_json_spec_is_a_located_error(
    tmp_path: Path, where: str, text: str
) -> None:
    key = text.split('"')[1]
    path = tmp_path / "sur.json"
    doc = json.loads(json.dumps(SURROGATE_SPEC))
    doc.pop(key, None)
    raw = json.dumps(doc)[:-1] + f", {text}}}"
    path.write_text(raw, encoding="ascii")
    found = problems(raw, str(path))
    assert len(found) == 1 and "lone surrogate" in found[0] and f"at {where}" in found[0]
    assert found[0].startswith("MAS001 1:")
    proc = mas2c("compile", path, "-o", tmp_path / "build", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 1 and "lone surrogate" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "build").exists()


def test_a_lone_surrogate_escape_in_yaml_is_a_located_error() -> None:
    text = HEAD + 'agents: {a0: {role: r, model: m}}\ndescription: "x\\ud800"\n'
    found = problems(text)
    assert found == [
        f"MAS001 {HEAD.count(chr(10)) + 2}:14 a lone surrogate (U+D800) at /description: not a Unicode character"
    ]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_an_escaped_surrogate_pair_is_the_character_it_means(tmp_path: Path, suffix: str) -> None:
    """JSON writes U+1F600 as ``"\\ud83d\\ude00"``: valid, one character, in values and keys.

    Only an unpaired half (or a pair in the wrong order) is a lone surrogate.
    """
    doc = json.loads(json.dumps(SURROGATE_SPEC))
    doc["description"] = "smile \U0001f600!"
    doc["agents"]["a"]["instructions"] = "\U0001f600\U0001f600 done"
    raw = json.dumps(doc)  # ensure_ascii: every emoji as an escaped pair
    assert "\\ud83d\\ude00" in raw and "\U0001f600" not in raw
    path = tmp_path / f"pair{suffix}"
    path.write_text(raw, encoding="ascii")
    report = validate_text(raw, str(path))
    assert report.ok, report.problems
    assert report.spec is not None and report.spec.description == "smile \U0001f600!"
    assert report.spec.agents["a"].instructions == "\U0001f600\U0001f600 done"
    proc = mas2c("compile", path, "-o", tmp_path / "build", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert parse_text('{"k\\ud83d\\ude00": 1}', "k.json").data == {"k\U0001f600": 1}  # a key
    # a reversed pair and a half beside a real character stay errors
    for bad in ("\\ude00\\ud83d", "\\ud83dx", "x\\ude00"):
        found = problems(raw.replace("smile \\ud83d\\ude00!", bad), str(path))
        assert len(found) == 1 and "lone surrogate" in found[0], (bad, found)


POLY_SPEC = """\
spec_version: "1"
name: poly
models: {m: {model: test-model}}
agents: {a0: {role: r, model: m}}
inputs:
  q: {type: string, pattern: ".*a.*a.*b"%s}
workflow:
  - {id: s, kind: call, agent: a0, prompt: "{{ q }}", out: o}
outputs: {o: o}
"""


def test_a_polynomial_pattern_cannot_hold_the_host(tmp_path: Path) -> None:
    """`.*a.*a.*b` backtracks in about n^4 steps in `re` (40 s at 800 characters, hours at
    the 10,000-character cap): the host matches patterns with a linear-time automaton, so
    `validate` checks a default, and `run` an input, of that length at once and says the
    value does not match (the thread-independence: tests/test_hardening.py)."""
    long = "a" * 10_000
    spec = tmp_path / "poly.yaml"
    spec.write_text(POLY_SPEC % (', default: "' + long + '"'))
    proc = mas2c("validate", spec, cwd=tmp_path, inprocess=True)
    assert proc.returncode == 1 and "does not match the pattern" in proc.stdout + proc.stderr
    assert "/inputs/q" in proc.stdout + proc.stderr
    spec.write_text(POLY_SPEC % "")
    for text, run in ((long, "run"), ("a" * 50, "run2")):
        (tmp_path / "in.json").write_text(json.dumps({"q": text}))
        proc = mas2c(
            "run", spec, "--input", tmp_path / "in.json", "--run-dir", tmp_path / run,
            "--sandbox", "unisolated", cwd=tmp_path, inprocess=True,
        )  # fmt: skip
        assert proc.returncode != 0 and "does not match the pattern" in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr


def test_python_nested_past_the_parsers_limit_is_a_located_error(tmp_path: Path) -> None:
    """A long operator chain (`1 + 1 + ... + 1`, 30,000 terms) in a tool's code, a
    condition or a batch's user scorer made CPython's parser raise RecursionError, and
    `mas2c validate`/`compile` died with a traceback: it is a syntax error like any other
    (`mas2c.pyast`)."""
    from mas2c.batch import BatchError, check_user_scorer
    from mas2c.lang.expr import ExpressionError, parse_condition

    chain = "1" + " + 1" * 30_000
    spec = tmp_path / "deep.yaml"
    spec.write_text(
        'spec_version: "1"\nname: deep\ninputs: {q: {type: string}}\noutputs: {r: r}\n'
        "models: {m: {model: test-model}}\nagents: {a: {role: r, model: m}}\n"
        "tools:\n  t:\n    code: |\n      def t(q: str) -> str:\n"
        f"          x = {chain}\n          return q\n"
        'workflow:\n  - {id: s, kind: tool, tool: t, args: {q: "{{ q }}"}, out: r}\n'
    )
    for verb in ("validate", "compile"):
        args = [verb, spec] + (["-o", tmp_path / "build"] if verb == "compile" else [])
        proc = mas2c(*args, cwd=tmp_path, inprocess=True)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "Traceback" not in out and "RecursionError" not in out
        assert "MAS401" in out and "/tools/t/code" in out and "too deeply nested" in out
    assert not (tmp_path / "build").exists()
    with pytest.raises(ExpressionError, match="too deeply nested"):
        parse_condition(chain.replace("1", "x") + " > 0")
    scorer = tmp_path / "scorer.py"
    scorer.write_text(f"def score(prediction, row):\n    return {chain} > 0\n")
    with pytest.raises(BatchError, match="does not parse: too deeply nested"):
        check_user_scorer(scorer)
