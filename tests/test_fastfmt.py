"""`mas2c.fastfmt.format_str` is `black.format_str`, byte for byte (issue 14 item 6).

The compiler formats through fastfmt (black once per member shape). Every check here
compiles or formats the same thing twice — through fastfmt and through plain black —
and demands identical bytes: all example specs, random valid specs (hypothesis, the
compiler property tests' generator), a long chain, and hand-written class bodies with
the cases black treats by content (wide characters, quotes, escapes, docstrings with
odd spacing, type comments, `fmt:` directives, magic trailing commas).
"""

from __future__ import annotations

import os
from typing import Any

import black
import pytest
from conftest import EXAMPLE_NAMES, example_spec
from hypothesis import HealthCheck, assume, given, settings
from test_compile_properties import _checked, valid_specs

from mas2c import fastfmt
from mas2c.compile import BLACK_MODE, compile_spec
from mas2c.lang.spec import Spec


def plain_black(text: str, mode: Any) -> str:
    return str(black.format_str(text, mode=mode))


def both_ways(
    spec: Spec, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    fast = compile_spec(spec).files
    with monkeypatch.context() as m:
        m.setattr(fastfmt, "format_str", plain_black)
        slow = compile_spec(spec).files
    return fast, slow


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_examples_compile_to_the_same_bytes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = both_ways(example_spec(name), monkeypatch)
    assert fast.keys() == slow.keys()
    for path in fast:
        assert fast[path] == slow[path], path


@settings(
    max_examples=8 if os.environ.get("CI") == "true" else 15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=valid_specs())
def test_random_specs_compile_to_the_same_bytes(data: dict[str, Any]) -> None:
    try:
        spec = _checked(data)
    except AssertionError:  # the shared generator drew a spec the validator rejects
        assume(False)
        raise
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast, slow = both_ways(spec, monkeypatch)
    assert fast == slow


def test_a_long_chain_formats_the_same_with_few_black_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twice the steps, (almost) no more black runs: black runs per shape, not per step."""
    from benchmarks.bench_compile import spec_text  # the benchmark's own spec shape
    from mas2c.lang.validate import validate_text

    calls: list[int] = []
    inner = black.format_str

    def counting(text: str, *, mode: Any) -> Any:
        calls.append(1)
        return inner(text, mode=mode)

    runs = {}
    for steps in (120, 240):
        report = validate_text(spec_text(steps, 7), "chain.yaml")
        assert report.spec is not None and report.ok, report.format()
        fastfmt._shapes.clear()
        compile_spec(report.spec)  # the runtime's own formatting is cached by now
        calls.clear()
        fastfmt._shapes.clear()
        with monkeypatch.context() as m:
            m.setattr(black, "format_str", counting)
            fast = compile_spec(report.spec).files
        runs[steps] = len(calls)
        _, slow = both_ways(report.spec, monkeypatch)
        assert fast == slow
    assert runs[240] <= runs[120] + 5, runs


MEMBERS = [
    # a long call, split by black
    "    # spec: /workflow/{i}\n    async def step_{i}(self) -> None:\n"
    '        """`s{i}`: agent answers."""\n'
    '        self.state["out_{i}"] = await self.run.call("agent_{i}", "Improve this text please: {{{{ x }}}} and more words")\n',
    # wide characters: width 2 each, so the same length is not the same layout
    "    # spec: /workflow/{i}\n    def w_{i}(self) -> str:\n"
    '        return self.f("日本語のテキスト日本語のテキスト日本語のテキスト日本語のテキスト", "abc{i}")\n',
    # quotes and escapes that black normalises
    "    # spec: /workflow/{i}\n    def q_{i}(self) -> str:\n"
    "        return 'single {i}' + \"has \\\"escapes\\\"\" + 'it''s'\n",
    # docstrings black reshapes by content
    "    # spec: /workflow/{i}\n    def d_{i}(self) -> None:\n"
    '        """  padded docstring {i}   """\n',
    "    # spec: /workflow/{i}\n    def e_{i}(self) -> None:\n"
    '        """Ends with a quote {i}\\""""\n',
    # a magic trailing comma and a type comment
    "    # spec: /workflow/{i}\n    def t_{i}(self) -> list[int]:\n"
    "        x = [1, 2,]  # type: ignore\n        return x\n",
    # comments black rewrites
    "    # spec: /workflow/{i}\n    def c_{i}(self) -> None:\n        #no space {i}\n        pass\n",
    # numbers and redundant parentheses
    "    # spec: /workflow/{i}\n    def n_{i}(self) -> int:\n        return (0XFF + 1E5 + 10l_{i})\n",
]


@pytest.mark.parametrize("member", MEMBERS, ids=range(len(MEMBERS)))
def test_content_sensitive_members_match_black(member: str) -> None:
    head = '"""Module."""\n\n\nclass W:\n    """Doc."""\n\n    x = 1\n'
    body = "\n".join(member.format(i=i) for i in (1, 22, 333))
    text = head + "\n" + body
    try:
        expected = plain_black(text, BLACK_MODE)
    except Exception:
        with pytest.raises(Exception):  # noqa: B017 - black's own error, whatever its type
            fastfmt.format_str(text, BLACK_MODE)
        return
    assert fastfmt.format_str(text, BLACK_MODE) == expected


def test_fmt_directives_and_bad_code_go_to_black_whole() -> None:
    text = "class W:\n    x = 1\n\n    # spec: /a\n    # fmt: off\n    def f(self):  return [1,2]\n"
    assert fastfmt.format_str(text, BLACK_MODE) == plain_black(text, BLACK_MODE)
    with pytest.raises(Exception):  # noqa: B017
        fastfmt.format_str("class W:\n    x = (\n\n    # spec: /a\n    y = 1\n", BLACK_MODE)
