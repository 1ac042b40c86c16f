"""`ast.parse` for mas2c's host side, one thread at a time.

Contract: every host-side parse of Python source in mas2c (the validator's tool code and
expressions, the compiler's source map, tool signatures, package docs, a batch's user scorer)
goes through :func:`parse` or :func:`parse_expression`, which behave as `ast.parse` and hold
one process-wide lock while it runs. On CPython before 3.13, importing this module also makes
the `ast.parse` of every other caller in the process take the same lock (:func:`guard_ast`):
the libraries mas2c drives parse too (Jinja2's lexer through `ast.literal_eval` for each
number in a template, black's equivalence check, the 3.11 `traceback` module's carets).
Source nested deeper than the parser's recursion limit (a long chain such as
``1 + 1 + ... + 1``, from a spec an LLM may have written) is a `SyntaxError` ("too deeply
nested"), as any other source that does not parse, never a `RecursionError` that the callers
do not expect.

Why: CPython 3.11 keeps the depth counter of its AST-to-object conversion in
interpreter-wide state, not per thread. Two threads parsing at once can corrupt it, and one
of them fails with ``SystemError: AST constructor recursion depth mismatch`` (seen with
``mas2c batch --solve`` on several workers: each row's generate, validate and compile run
on the host, each on its own thread; a lock around mas2c's own parses alone still lost a
row while another row's compile had Jinja2 lex a template). Parsing is CPU-bound under the
GIL anyway, so serialising it costs nothing.
"""

from __future__ import annotations

import ast
import functools
import sys
import threading
from typing import Any

__all__ = ["guard_ast", "parse", "parse_expression"]

_LOCK = threading.RLock()  # re-entrant: a finaliser run mid-parse may parse too
_PARSE = ast.parse  # the interpreter's own, whatever guard_ast does


def parse(source: str, filename: str = "<unknown>") -> ast.Module:
    """`ast.parse(source, filename)` (a module), under the lock."""
    with _LOCK:
        try:
            return _PARSE(source, filename=filename)
        except (RecursionError, MemoryError):
            raise _too_deep(filename) from None


def parse_expression(source: str) -> ast.Expression:
    """`ast.parse(source, mode="eval")`, under the lock."""
    with _LOCK:
        try:
            return _PARSE(source, mode="eval")
        except (RecursionError, MemoryError):
            raise _too_deep("<expression>") from None


def _too_deep(filename: str) -> SyntaxError:
    return SyntaxError(
        "too deeply nested to parse (a very long chain of operators or brackets?)",
        (filename, 1, 1, None),
    )


@functools.wraps(_PARSE)
def _guarded_parse(*args: Any, **kwargs: Any) -> Any:
    with _LOCK:
        return _PARSE(*args, **kwargs)


def guard_ast() -> None:
    """Make `ast.parse` (and so `ast.literal_eval`) take the lock for every caller in the
    process. Idempotent; done on import before CPython 3.13."""
    if ast.parse is not _guarded_parse:
        setattr(ast, "parse", _guarded_parse)  # noqa: B010 (mypy: ast.parse is overloaded)


if sys.version_info < (3, 13):
    guard_ast()
