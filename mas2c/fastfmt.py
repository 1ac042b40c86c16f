"""black, once per shape: formatting generated code in time that does not grow with its size.

Contract: ``format_str(text, mode)`` returns exactly ``black.format_str(text, mode=mode)``
(byte for byte; asserted on every example spec, the golden files and random specs in
tests/test_fastfmt.py), faster on the files the compiler writes, whose class bodies are
long runs of similar methods (one per spec step, each after a ``# spec:`` comment).

How: the file is cut before each ``# spec:`` comment of a class member (column 4, one
blank line before it, outside brackets and strings). The part before the first cut goes
to black as it is. Each member goes to black in its *shape*: every name, simple string
literal and plain comment replaced by a placeholder of the same length (keywords,
numbers, operators, escapes, prefixes and multi-line strings kept). black decides
layout from lengths and token kinds, never from what a name or a plain string says, so
members of one shape format alike: black runs once per shape (a 1000-step chain has a
handful), and the member's own tokens go back into the formatted shape, in order. A
member whose formatted shape does not hand back the same token sequence, any file with
``fmt:`` directives, and anything that does not tokenize, is formatted by black whole —
the fast path never guesses.
"""

from __future__ import annotations

import io
import itertools
import keyword
import re
import tokenize
from collections import OrderedDict
from typing import Any

import black

_CUT = "# spec:"
_SIMPLE_STRING = re.compile(r'"[^"\\\n]*"\Z')
_SIMPLE_DOCSTRING = re.compile(r'"""[^"\\\n\s](?:[^"\\\n]*[^"\\\n\s])?"""\Z')
_PLAIN_COMMENT = re.compile(r"# \S(?:.*\S)?\Z")
_KEEP_NAMES = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist)
_WRAPPER = "class _:\n"
_WORDS = (tokenize.NAME, tokenize.STRING, tokenize.COMMENT)
_CACHE_SIZE = 512

# (mode, shape) -> the formatted shape and the places of its word-like tokens, or None when
# black's output does not hold the shape's words in order (then the member goes to black).
Spans = list[tuple[int, int, int]]  # (row, begin, end) in the formatted text, per word token
_shapes: OrderedDict[tuple[int, str], tuple[str, Spans] | None] = OrderedDict()


def format_str(text: str, mode: Any) -> str:
    """black.format_str(text, mode=mode), one black run per distinct member shape."""
    if "fmt:" in text:
        return _black(text, mode)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return _black(text, mode)  # black reports it
    lines = text.splitlines(keepends=True)
    cuts = _cuts(tokens, lines)
    if not cuts:
        return _black(text, mode)
    parts = [_black("".join(lines[: cuts[0] - 2]), mode)]
    bounds = [*cuts, len(lines) + 2]
    words = [t for t in tokens if t.type in _WORDS]
    at = 0
    for start, stop in itertools.pairwise(bounds):
        member = lines[start - 1 : stop - 2]
        while member and not member[-1].strip():
            member.pop()
        if not member[-1].endswith("\n"):
            member[-1] += "\n"
        while at < len(words) and words[at].start[0] < start:
            at += 1
        first = at
        while at < len(words) and words[at].start[0] < stop - 1:
            at += 1
        parts.append(_member(member, start, words[first:at], mode))
    return "\n".join(parts)


def _black(text: str, mode: Any) -> str:
    return str(black.format_str(text, mode=mode))


def _cuts(tokens: list[tokenize.TokenInfo], lines: list[str]) -> list[int]:
    """1-based line numbers of the `# spec:` comments that open a class member."""
    cuts: list[int] = []
    depth = 0
    previous_line = 0
    for tok in tokens:
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif (
            tok.type == tokenize.COMMENT
            and depth == 0
            and tok.start[1] == 4
            and tok.string.startswith(_CUT)
            and tok.start[0] > previous_line  # first token of its line
            and tok.start[0] >= 3
            and not lines[tok.start[0] - 2].strip()  # one blank line before it ...
            and lines[tok.start[0] - 3].strip()  # ... and only one
        ):
            cuts.append(tok.start[0])
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            previous_line = tok.end[0]
    return cuts


def _member(member: list[str], first_line: int, tokens: list[tokenize.TokenInfo], mode: Any) -> str:
    """One class member, formatted as black formats it inside its class."""
    shape, originals = _shape(member, first_line, tokens)
    key = (id(mode), shape)
    if key in _shapes:
        _shapes.move_to_end(key)
        known = _shapes[key]
    else:
        known = _format_shape(shape, mode)
        _shapes[key] = known
        if len(_shapes) > _CACHE_SIZE:
            _shapes.popitem(last=False)
    if known is None or len(known[1]) != len(originals):
        return _in_class("".join(member), mode)
    return _restore(known, originals)


def _format_shape(shape: str, mode: Any) -> tuple[str, Spans] | None:
    """black's layout of a shape, and where each of its word-like tokens landed."""
    formatted = _in_class(shape, mode)
    try:
        out_words = _words(_WRAPPER + formatted)[2:]  # past `class _`
        in_words = _words(_WRAPPER + shape)[2:]
    except (tokenize.TokenError, SyntaxError):
        return None
    if [t.string for t in out_words] != [t.string for t in in_words]:
        return None
    if any(t.start[0] != t.end[0] for t in out_words):
        return None
    return formatted, [(t.start[0] - 2, t.start[1], t.end[1]) for t in out_words]


def _in_class(member_text: str, mode: Any) -> str:
    out = _black(_WRAPPER + member_text, mode)
    if not out.startswith(_WRAPPER):
        raise AssertionError("black changed the wrapper class line")  # never: a plain class
    return out[len(_WRAPPER) :]


def _placeholder(tok: tokenize.TokenInfo) -> str | None:
    text = tok.string
    if tok.type == tokenize.NAME and text not in _KEEP_NAMES and text.isascii():
        return "N" * len(text)
    if tok.type == tokenize.STRING and text.isascii() and "\t" not in text:
        # ASCII only: black measures width, and a wide character is two columns
        if _SIMPLE_DOCSTRING.match(text):
            return '"""' + "s" * (len(text) - 6) + '"""'
        if _SIMPLE_STRING.match(text):
            return '"' + "s" * (len(text) - 2) + '"'
    if (
        tok.type == tokenize.COMMENT
        and _PLAIN_COMMENT.match(text)
        and "type:" not in text
        and text.isascii()
    ):
        return "# " + "c" * (len(text) - 2)
    return None


def _shape(
    member: list[str], first_line: int, tokens: list[tokenize.TokenInfo]
) -> tuple[str, list[str]]:
    """The member with placeholders, and the original text of every word-like token in order."""
    rows = list(member)
    edits: dict[int, list[tuple[int, int, str]]] = {}
    originals: list[str] = []
    for tok in tokens:
        originals.append(tok.string)
        stand_in = _placeholder(tok)
        if stand_in is not None and tok.start[0] == tok.end[0]:
            edits.setdefault(tok.start[0] - first_line, []).append(
                (tok.start[1], tok.end[1], stand_in)
            )
    for row, spans in edits.items():
        line = rows[row]
        for begin, end, stand_in in sorted(spans, reverse=True):
            line = line[:begin] + stand_in + line[end:]
        rows[row] = line
    return "".join(rows), originals


def _restore(known: tuple[str, Spans], originals: list[str]) -> str:
    """The formatted shape with the member's own tokens put back in their places."""
    formatted, spans = known
    rows = formatted.splitlines(keepends=True)
    edits: dict[int, list[tuple[int, int, str]]] = {}
    for (row, begin, end), original in zip(spans, originals, strict=True):
        if end - begin != len(original) or rows[row][begin:end] != original:
            edits.setdefault(row, []).append((begin, end, original))
    for row, row_edits in edits.items():
        line = rows[row]
        for begin, end, original in sorted(row_edits, reverse=True):
            line = line[:begin] + original + line[end:]
        rows[row] = line
    return "".join(rows)


def _words(text: str) -> list[tokenize.TokenInfo]:
    return [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type in _WORDS]
