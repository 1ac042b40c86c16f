"""mas2c.pyast: host-side parsing of Python, one thread at a time, for every caller."""

from __future__ import annotations

import ast
import sys
import threading
import traceback

import jinja2
import pytest

from mas2c import pyast


def _parses_while_locked(parse_in_thread: object) -> tuple[bool, bool]:
    """(finished while another thread held the lock, finished once it was released)."""
    done = threading.Event()

    def run() -> None:
        parse_in_thread()  # type: ignore[operator]
        done.set()

    with pyast._LOCK:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        during = done.wait(0.5)
    after = done.wait(30)
    worker.join(30)
    return during, after


def _render_a_template_with_numbers() -> None:
    jinja2.Environment().from_string("{{ 1 + 2.5 }} {{ [10, 20][1] }}").render()


def _format_a_traceback() -> None:
    try:
        {"a": 1}["b"]
    except KeyError as exc:
        traceback.format_exception(exc)


_GUARDED = sys.version_info < (3, 13)  # other callers are guarded only where CPython needs it


@pytest.mark.parametrize(
    ("caller", "waits"),
    [
        (lambda: ast.parse("x = 1"), _GUARDED),
        (lambda: ast.literal_eval("[1, 2.5, {'a': None}]"), _GUARDED),
        (_render_a_template_with_numbers, _GUARDED),  # Jinja2's lexer: literal_eval per number
        (_format_a_traceback, _GUARDED),  # 3.11's traceback parses the failing line (carets)
        (lambda: pyast.parse("def f():\n    return 1\n"), True),
        (lambda: pyast.parse_expression("a + b"), True),
    ],
    ids=["ast.parse", "literal_eval", "jinja2", "traceback", "pyast.parse", "parse_expression"],
)
def test_every_parse_in_the_process_waits_for_the_lock(caller: object, waits: bool) -> None:
    """CPython 3.11 corrupts its AST conversion depth when two threads parse at once
    (`SystemError: AST constructor recursion depth mismatch`, a row of `batch --solve` lost
    while another row's compile had Jinja2 lex a template): before 3.13 no caller parses
    while another thread holds the lock; mas2c's own parses always take it."""
    during, after = _parses_while_locked(caller)
    assert after
    if waits:
        assert not during


def test_guarded_parse_behaves_as_ast_parse() -> None:
    tree = ast.parse("x: int = 1", type_comments=True)
    assert isinstance(tree, ast.Module) and ast.dump(tree) == ast.dump(pyast._PARSE("x: int = 1"))
    assert isinstance(ast.parse("1 + 2", mode="eval"), ast.Expression)
    with pytest.raises(SyntaxError):
        ast.parse("def (")
    pyast.guard_ast()  # idempotent
    assert ast.parse.__wrapped__ is pyast._PARSE  # type: ignore[attr-defined]


def test_threads_parse_concurrently_without_error() -> None:
    """Many threads, each at its own stack depth, parsing through every route at once."""
    source = "\n".join(
        f"def f{i}(a=[1, {{2: 3}}]):\n    return [a for _ in range({i})]" for i in range(60)
    )
    errors: list[BaseException] = []

    def deep(n: int) -> None:
        if n:
            deep(n - 1)
            return
        for _ in range(20):
            ast.parse(source)
            _render_a_template_with_numbers()
            pyast.parse(source)

    def run(depth: int) -> None:
        try:
            deep(depth)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in (0, 5, 11, 17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
