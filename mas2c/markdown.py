"""Spec text inside the generated README: shown as text, never as Markdown or HTML.

A spec is data, and its strings (a description, a role, an input's name) may hold
anything: `<script>`, `![img](http://...)`, a `|` that would split a table row, a
run of backticks that would close a code span or fence. Each function here returns
Markdown that renders as exactly the text it was given (CommonMark + GFM tables).
"""

from __future__ import annotations

import re

# ASCII punctuation Markdown may read as syntax somewhere; CommonMark lets any ASCII
# punctuation be backslash-escaped, so escaping these is always safe.
_SPECIAL = set("\\`*_{}[]()#+-!|~<>&")
_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
_LIST_START = re.compile(r"^(\d+)([.)])")
_LABEL = re.compile(r'"([^"\n]*)"')


def _escape_line(line: str) -> str:
    line = line.strip()
    out = []
    for index, char in enumerate(line):
        if char in _ENTITIES:
            out.append(_ENTITIES[char])
        elif char in _SPECIAL and (char not in "-+()" or index == 0):
            out.append("\\" + char)
        else:
            out.append(char)
    text = "".join(out)
    numbered = _LIST_START.match(text)
    if numbered:  # "1. x" would start an ordered list
        text = f"{numbered.group(1)}\\{numbered.group(2)}{text[numbered.end() :]}"
    if text[:1] == "=":  # a setext heading underline
        text = "\\" + text
    return text


def text(value: str) -> str:
    """Paragraphs of plain text: line breaks kept as paragraph breaks (blank lines)."""
    lines = [_escape_line(line) for line in value.splitlines()]
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if line:
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    return "\n\n".join(" ".join(p) for p in paragraphs if p)


def cell(value: str) -> str:
    """Plain text inside one table cell: one line, `|` escaped."""
    return " ".join(_escape_line(line) for line in value.splitlines() if line.strip())


def code(value: str, in_table: bool = False) -> str:
    """A code span showing `value` literally (backticks inside included)."""
    flat = " ".join(value.splitlines())
    longest = max((len(run) for run in re.findall(r"`+", flat)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") or not flat.strip() else ""
    if in_table:
        flat = flat.replace("|", "\\|")
    return f"{fence}{pad}{flat}{pad}{fence}" if flat else "` `"


def fence_for(content: str) -> str:
    """A backtick fence longer than any backtick run in `content` (at least three)."""
    longest = max((len(run) for run in re.findall(r"`+", content)), default=0)
    return "`" * max(3, longest + 1)


def mermaid_labels(diagram: str) -> str:
    """`<` and `>` inside a Mermaid diagram's quoted labels as Mermaid entities (`#lt;`),
    so no label is read as HTML; `<br/>` line breaks are kept."""

    def fix(match: re.Match[str]) -> str:
        label = match.group(1).replace("<br/>", "\0")
        label = label.replace("<", "#lt;").replace(">", "#gt;").replace("\0", "<br/>")
        return f'"{label}"'

    return _LABEL.sub(fix, diagram)
