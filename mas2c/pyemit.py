"""Python source fragments for spec values: literals that reproduce text byte for byte.

Small pure functions used by the templates as filters. Output is deterministic:
dict keys are sorted, strings are emitted the way black would leave them.
"""

from __future__ import annotations

import keyword
import math
import re
from typing import Any

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"'}


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable() or char == " ":
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def string_literal(text: str) -> str:
    """A double-quoted Python literal equal to `text` (unicode kept readable, controls escaped)."""
    return '"' + "".join(_escape_char(c) for c in text) + '"'


def docstring_text(text: str) -> str:
    """Source for the inside of a triple-double-quoted docstring whose value is `text`.

    Backslashes and controls are escaped, line breaks and tabs kept; a double quote
    next to another one is escaped, so no run of three can close the docstring.
    """
    out = []
    for index, char in enumerate(text):
        if char == '"':
            near = text[index - 1 : index] == '"' or text[index + 1 : index + 2] == '"'
            edge = index in (0, len(text) - 1)
            out.append('\\"' if near or edge else '"')
        elif char in "\n\t":
            out.append(char)
        else:
            out.append(_escape_char(char))
    return "".join(out)


_TOML_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_string(text: str) -> str:
    """A TOML basic string equal to `text` (controls escaped, all else literal UTF-8)."""
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def text_literal(text: str) -> str:
    """A literal for possibly multi-line text: one literal per line, implicitly concatenated.

    Reads like the spec's block text and keeps the generated code's indentation.
    """
    lines = text.splitlines(keepends=True)
    if len(lines) <= 1:
        return string_literal(text)
    return "(\n" + "\n".join(string_literal(line) for line in lines) + "\n)"


def value_literal(value: Any) -> str:
    """A Python literal for JSON data, with sorted keys."""
    if isinstance(value, str):
        return string_literal(value)
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        # YAML's .inf and .nan: repr() gives `inf`/`nan`, which are not Python literals.
        return 'float("nan")' if math.isnan(value) else ("-" if value < 0 else "") + 'float("inf")'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(value_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{string_literal(str(k))}: {value_literal(v)}" for k, v in sorted(value.items()))
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"not JSON data: {type(value).__name__}")


def identifier(name: str, prefix: str = "") -> str:
    """A Python identifier derived from a spec id (`fan-out` -> `fan_out`)."""
    ident = re.sub(r"\W", "_", name)
    if ident and ident[0].isdigit():
        ident = "_" + ident
    ident = prefix + ident
    return ident + "_" if keyword.iskeyword(ident) else ident
