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

import bisect
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
_WORDS = (tokenize.NAME, tokenize.NUMBER, tokenize.STRING, tokenize.COMMENT)
_MARK = "__mas2c_fastfmt_run_"
_MIN_RUN = 8
# How a piece is formatted alone: (text before, text after, word tokens in those).
Wrapper = tuple[str, str, int]
_IN_CLASS: Wrapper = ("class _:\n", "", 2)  # a class member (`class _`)
# an element of an exploded collection; a list, whose trailing comma is magic even with one
# element (a one-element tuple's is not)
_IN_COLLECTION: Wrapper = ("_ = [\n", "]\n", 1)
_IN_MAPPING: Wrapper = ("_ = {\n", "}\n", 1)  # an entry of a dict (or set) display
_CACHE_SIZE = 512

# (mode, shape) -> the formatted shape and the places of its word-like tokens, or None when
# black's output does not hold the shape's words in order (then the member goes to black).
Spans = list[tuple[int, int, int]]  # (row, begin, end) in the formatted text, per word token
_shapes: OrderedDict[tuple[int, str, str], tuple[str, Spans] | None] = OrderedDict()


def format_str(text: str, mode: Any) -> str:
    """black.format_str(text, mode=mode), one black run per distinct member shape."""
    try:
        return _format(text, mode)
    except _Unwrapped:
        return _black(text, mode)


def _format(text: str, mode: Any) -> str:
    if "fmt:" in text:
        return _black(text, mode)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return _black(text, mode)  # black reports it
    lines = text.splitlines(keepends=True)
    cuts = _cuts(tokens, lines)
    if not cuts:
        return _with_runs(text, tokens, lines, mode)
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
        parts.append(_member(member, start, words[first:at], mode, _IN_CLASS))
    return "\n".join(parts)


def _with_runs(text: str, tokens: list[tokenize.TokenInfo], lines: list[str], mode: Any) -> str:
    """A file whose bulk is long top-level collections (the compiler's tables): black runs
    on the file with each collection's elements replaced by one marker element, and once
    per element shape; the formatted elements then take the markers' places."""
    runs = _runs(tokens, lines)
    if not runs:
        return _black(text, mode)
    words = [t for t in tokens if t.type in _WORDS]
    starts = [w.start[0] for w in words]
    skeleton = list(lines)
    formatted_runs: list[str] = []
    for index, (wrapper, elements) in reversed(list(enumerate(runs))):
        pieces = []
        for first, last in elements:
            lo, hi = bisect.bisect_left(starts, first), bisect.bisect_right(starts, last)
            in_element = words[lo:hi]
            pieces.append(_member(lines[first - 1 : last], first, in_element, mode, wrapper))
        formatted_runs.append("".join(pieces))
        # two markers: a one-element tuple would lose its magic trailing comma
        skeleton[elements[0][0] - 1 : elements[-1][1]] = [f"    {_MARK}{index}__,\n" * 2]
    formatted_runs.reverse()
    out = _black("".join(skeleton), mode)
    for index, elements_text in enumerate(formatted_runs):
        marker = f"    {_MARK}{index}__,\n" * 2
        if out.count(marker) != 1:
            return _black(text, mode)
        out = out.replace(marker, elements_text)
    return out


Run = tuple[Wrapper, list[tuple[int, int]]]  # how its elements are wrapped, their lines


def _runs(tokens: list[tokenize.TokenInfo], lines: list[str]) -> list[Run]:
    """Long top-level collections written one element per line: for each, the (first, last)
    line of every element. A collection qualifies when its opening bracket ends a line that
    starts a statement at column 0, every element starts on its own line at column 4 and
    ends with a comma that ends its line, nothing else (no comment) sits between, and its
    closing bracket stands alone at column 0."""
    runs: list[Run] = []
    depth = 0
    i = 0
    n = len(tokens)
    while i < n:
        tok = tokens[i]
        if tok.type == tokenize.OP and tok.string in "([{":
            opener_line = tok.start[0]
            if (
                depth == 0
                and i + 1 < n
                and tokens[i + 1].type == tokenize.NL
                and not lines[opener_line - 1][:1].isspace()
                and tokens[i - 1].string == "="  # a display assigned, not a call's arguments
            ):
                found = _elements(tokens, i + 2, lines)
                if found is not None:
                    elements, i = found
                    if len(elements) >= _MIN_RUN:
                        runs.append(
                            (_IN_MAPPING if tok.string == "{" else _IN_COLLECTION, elements)
                        )
                    continue
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        i += 1
    return runs


def _elements(
    tokens: list[tokenize.TokenInfo], i: int, lines: list[str]
) -> tuple[list[tuple[int, int]], int] | None:
    """The elements from token `i` (just inside an opening bracket) to its closing bracket,
    and the index after that bracket; None if the layout is not one element per line."""
    elements: list[tuple[int, int]] = []
    n = len(tokens)
    while i < n:
        tok = tokens[i]
        if tok.type == tokenize.OP and tok.string in ")]}":
            closer_line = lines[tok.start[0] - 1]
            ok = tok.start[1] == 0 and closer_line.strip() == tok.string
            return (elements, i + 1) if ok and elements else None
        if tok.start[1] != 4 or tok.type in (tokenize.COMMENT, tokenize.NL):
            return None
        first, depth = tok.start[0], 0
        while i < n:
            tok = tokens[i]
            if tok.type == tokenize.COMMENT:
                return None
            if tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth -= 1
                if depth < 0:
                    return None
            elif tok.type == tokenize.OP and tok.string == "," and depth == 0:
                if i + 1 >= n or tokens[i + 1].type != tokenize.NL:
                    return None
                elements.append((first, tok.start[0]))
                i += 2
                break
            i += 1
        else:
            return None
    return None


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


def _member(
    member: list[str],
    first_line: int,
    tokens: list[tokenize.TokenInfo],
    mode: Any,
    wrapper: Wrapper,
) -> str:
    """One piece (a class member, a collection element), formatted as black formats it in place."""
    shape, originals = _shape(member, first_line, tokens)
    key = (id(mode), wrapper[0], shape)
    if key in _shapes:
        _shapes.move_to_end(key)
        known = _shapes[key]
    else:
        known = _format_shape(shape, mode, wrapper)
        _shapes[key] = known
        if len(_shapes) > _CACHE_SIZE:
            _shapes.popitem(last=False)
    if known is None or len(known[1]) != len(originals):
        return _wrapped("".join(member), mode, wrapper)
    return _restore(known, originals)


def _format_shape(shape: str, mode: Any, wrapper: Wrapper) -> tuple[str, Spans] | None:
    """black's layout of a shape, and where each of its word-like tokens landed."""
    before, after, skip = wrapper
    formatted = _wrapped(shape, mode, wrapper)
    try:
        out_words = _words(before + formatted + after)[skip:]
        in_words = _words(before + shape + after)[skip:]
    except (tokenize.TokenError, SyntaxError):
        return None
    if [t.string for t in out_words] != [t.string for t in in_words]:
        return None
    if any(t.start[0] != t.end[0] for t in out_words):
        return None
    return formatted, [(t.start[0] - 2, t.start[1], t.end[1]) for t in out_words]


def _wrapped(text: str, mode: Any, wrapper: Wrapper) -> str:
    """`text` formatted inside its wrapper, without the wrapper."""
    before, after, _ = wrapper
    out = _black(before + text + after, mode)
    if not (out.startswith(before) and out.endswith(after)):
        raise _Unwrapped  # never for these wrappers: black keeps them as they are
    return out[len(before) : len(out) - len(after)]


class _Unwrapped(Exception):
    """black changed a wrapper line."""


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
    if tok.type == tokenize.NUMBER and text.isdigit() and text[0] != "0":
        return "1" * len(text)  # a plain decimal: black leaves it as it is
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
