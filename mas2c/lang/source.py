"""Reading spec files: YAML or JSON into plain data, remembering where every value was written.

Positions are kept per JSON pointer so that every problem the validator finds
can name the file's line and column, including problems inside block scalars
(tool code) whose own line numbers are relative to the block.

A spec file is bounded before anything else reads it (a small file must not expand
into a huge document): at most `MAX_SPEC_BYTES` bytes, at most `MAX_EXPANDED_NODES`
values and `MAX_EXPANDED_CHARS` characters of strings and keys once YAML aliases are
expanded (a "billion laughs" or one big anchor used many times), nesting within the
recursion limit, and text that is valid Unicode (a lone surrogate such as ``"\ud800"``
is a located error, not a crash when the spec is later hashed or written).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mas2c.errors import InvalidInput


@dataclass(frozen=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based


@dataclass(frozen=True)
class ScalarInfo:
    """Where a string scalar's content starts and how it was written."""

    position: Position
    style: str | None  # None plain, "|" literal, ">" folded, "'" or '"' quoted
    end: Position | None = None  # just after the scalar (after a closing quote)


class SourceError(InvalidInput):
    """The file cannot be read as YAML or JSON at all."""

    code = "unreadable_spec"

    def __init__(
        self, message: str, position: Position | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.position = position
        self.hint = hint


@dataclass
class SpecSource:
    data: Any
    path: str = "<string>"
    text: str = ""
    positions: dict[str, Position] = field(default_factory=dict)
    scalars: dict[str, ScalarInfo] = field(default_factory=dict)
    keys: dict[str, Position] = field(default_factory=dict)  # where a mapping entry's key is
    # Plain scalars YAML 1.1 reads as booleans though they are not `true`/`false` (`yes`,
    # `no`, `on`, `off`): pointer -> (the text as written, where, whether it is a key).
    yaml_booleans: dict[str, tuple[str, Position, bool]] = field(default_factory=dict)
    _lines: list[str] | None = field(default=None, repr=False, compare=False)

    def lines(self) -> list[str]:
        """`text.splitlines()`, split once."""
        if self._lines is None:
            self._lines = self.text.splitlines()
        return self._lines

    def key_position(self, pointer: str) -> Position | None:
        """The position of the key that introduces `pointer`, else that of its value."""
        return self.keys.get(pointer) or self.position(pointer)

    def position(self, pointer: str) -> Position | None:
        """The position of `pointer`, or of its nearest written ancestor."""
        while True:
            if pointer in self.positions:
                return self.positions[pointer]
            if not pointer:
                return None
            pointer = pointer.rsplit("/", 1)[0]

    def position_in_block(self, pointer: str, line_in_block: int) -> Position | None:
        """The file position of line `line_in_block` (1-based) inside a block scalar."""
        info = self.scalars.get(pointer)
        if info is None or info.style not in ("|", ">"):
            return self.position(pointer)
        return Position(info.position.line + line_in_block - 1, info.position.column)


def escape_token(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def pointer_of(parts: tuple[Any, ...] | list[Any]) -> str:
    return "".join("/" + escape_token(str(part)) for part in parts)


class _PositionLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys (a silent overwrite would lose a definition)."""


# libyaml's parser (same nodes, marks and data, ~10x faster) reads a spec first when PyYAML
# has it; any error from it sends the text to the pure-Python loader above, whose messages,
# positions and verdict are the ones reported. libyaml caps nesting at 1000 levels.
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", None)


# Aliases let a small file expand into a huge (or cyclic) document ("billion laughs"); a spec
# never needs more than this many values, or this much text, once aliases are expanded.
MAX_EXPANDED_NODES = 50_000
MAX_EXPANDED_CHARS = 8 * 1024 * 1024
MAX_SPEC_BYTES = 8 * 1024 * 1024

_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SURROGATE_PAIR = re.compile(r"[\ud800-\udbff][\udc00-\udfff]")


def _is_escaped_pair(text: str) -> bool:
    """Whether `text` is exactly ``\\uHHHH\\uLLLL`` with a high then a low surrogate."""
    try:
        high, low = int(text[2:6], 16), int(text[8:12], 16)
    except ValueError:
        return False
    return text[6:8] == "\\u" and 0xD800 <= high <= 0xDBFF and 0xDC00 <= low <= 0xDFFF


def _join_surrogate_pairs(value: str) -> str:
    """`value` with each escaped UTF-16 pair (``"\\ud83d\\ude00"``) made the one character it means.

    JSON writes a character past U+FFFF as such a pair and YAML's parsers hand the two
    halves over separately; only a half without its partner is a lone surrogate.
    """
    if _SURROGATE.search(value) is None:
        return value
    return _SURROGATE_PAIR.sub(
        lambda pair: pair.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le"), value
    )


@dataclass
class _WalkState:
    visited: int = 0
    chars: int = 0  # characters of scalars and keys, counted again at each alias use
    active: set[int] = field(default_factory=set)  # ids of the nodes on the current path


def _check_scalar(value: object, where: Position, pointer: str, state: _WalkState) -> None:
    if not isinstance(value, str):
        return
    state.chars += len(value)
    if state.chars > MAX_EXPANDED_CHARS:
        raise SourceError(
            f"the document expands to more than {MAX_EXPANDED_CHARS} characters of text "
            "(a large anchor used many times?)",
            where,
            "write the values out, or use an alias for a large value only a few times",
        )
    found = _SURROGATE.search(value)
    if found is not None:
        raise SourceError(
            f"a lone surrogate (U+{ord(found.group()):04X}) at {pointer or '/'}: "
            "not a Unicode character",
            where,
            "surrogates only come in pairs (use the character itself, or its \\U escape)",
        )


def _walk(node: yaml.Node, pointer: str, source: SpecSource, state: _WalkState) -> None:
    mark = node.start_mark
    here = Position(mark.line + 1, mark.column + 1)
    state.visited += 1
    if state.visited > MAX_EXPANDED_NODES:
        raise SourceError(
            f"the document expands to more than {MAX_EXPANDED_NODES} values (aliases nested too deep?)",
            here,
            "write the values out, or use fewer nested aliases",
        )
    if id(node) in state.active:
        raise SourceError(
            "a recursive alias: an anchor is used inside its own value",
            here,
            "an alias (*name) may only refer to an anchor (&name) outside its own value",
        )
    source.positions[pointer] = here
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        state.active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if isinstance(key_node.value, str):
                key_node.value = _join_surrogate_pairs(key_node.value)
            key = str(key_node.value)
            _check_scalar(
                key,
                Position(key_node.start_mark.line + 1, key_node.start_mark.column + 1),
                pointer,
                state,
            )
            if key in seen:
                raise SourceError(
                    f"duplicate key {key!r}",
                    Position(key_node.start_mark.line + 1, key_node.start_mark.column + 1),
                    "a key may appear once per mapping (YAML would keep only the last one): "
                    "rename or merge the two",
                )
            seen.add(key)
            child = f"{pointer}/{escape_token(key)}"
            source.keys[child] = Position(
                key_node.start_mark.line + 1, key_node.start_mark.column + 1
            )
            if _yaml11_boolean(key_node):
                source.yaml_booleans[child] = (key, source.keys[child], True)
            _walk(value_node, child, source, state)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, f"{pointer}/{index}", source, state)
    state.active.discard(id(node))
    if isinstance(node, yaml.ScalarNode):
        node.value = _join_surrogate_pairs(node.value)
        _check_scalar(node.value, here, pointer, state)
        if _yaml11_boolean(node):
            source.yaml_booleans[pointer] = (str(node.value), here, False)
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
        style = node.style or None
        start = Position(mark.line + 1, mark.column + 1)
        if style in ("|", ">"):
            # A block scalar's content starts on the line after its indicator.
            start = Position(mark.line + 2, mark.column + 1)
        end = Position(node.end_mark.line + 1, node.end_mark.column + 1)
        source.scalars[pointer] = ScalarInfo(start, style, end)


def _yaml11_boolean(node: yaml.Node) -> bool:
    """A plain scalar that YAML 1.1 (PyYAML) reads as a boolean, though YAML 1.2 and JSON
    would not: `yes`, `no`, `on`, `off` in any case. `true`/`false` are meant."""
    return (
        isinstance(node, yaml.ScalarNode)
        and node.tag == "tag:yaml.org,2002:bool"
        and not node.style
        and str(node.value).lower() not in ("true", "false")
    )


def _mark_position(error: yaml.MarkedYAMLError) -> Position | None:
    mark = error.problem_mark or error.context_mark
    return Position(mark.line + 1, mark.column + 1) if mark is not None else None


def parse_text(text: str, path: str = "<string>") -> SpecSource:
    """Parse YAML (JSON is YAML) keeping positions; SourceError if it is not a document."""
    source = SpecSource(data=None, path=path, text=text)
    if len(text) > MAX_SPEC_BYTES:
        raise SourceError(f"the file is larger than {MAX_SPEC_BYTES} bytes: not a spec")
    if path.endswith(".json"):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceError(f"invalid JSON: {exc.msg}", Position(exc.lineno, exc.colno)) from None
        except RecursionError:
            raise SourceError("invalid JSON: nested too deeply") from None
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            raise SourceError(f"invalid JSON: {exc}") from None
    if _FAST_LOADER is not None:
        try:
            return _read_yaml(text, source, _FAST_LOADER)
        except Exception:  # the pure-Python loader below gives the verdict
            source = SpecSource(data=None, path=path, text=text)
    try:
        return _read_yaml(text, source, _PositionLoader)
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or "malformed document"
        raise SourceError(f"invalid YAML: {problem}", _mark_position(exc)) from None
    except yaml.YAMLError as exc:
        raise SourceError(f"invalid YAML: {exc}") from None
    except RecursionError:
        raise SourceError("invalid YAML: nested too deeply") from None
    except ValueError as exc:  # a scalar the constructor cannot convert (a 5000-digit int)
        raise SourceError(f"invalid YAML: {exc}") from None


def _read_yaml(text: str, source: SpecSource, loader_class: Any) -> SpecSource:
    """Compose `text` once, check and record its nodes (`_walk`), then build its data."""
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _walk(node, "", source, _WalkState())
            source.data = loader.construct_document(node)
    finally:
        loader.dispose()
    return source


def load_file(path: str | Path) -> SpecSource:
    """Read a spec file. OSError propagates (a usage error, not a spec problem)."""
    path = Path(path)
    with path.open("rb") as handle:
        raw = handle.read(MAX_SPEC_BYTES + 1)
    return parse_bytes(raw, str(path))


def parse_bytes(raw: bytes, path: str = "<string>") -> SpecSource:
    """`parse_text` of bytes read from a file or stdin (at most ``MAX_SPEC_BYTES + 1`` of
    them): SourceError if they are too many or not UTF-8."""
    if len(raw) > MAX_SPEC_BYTES:
        raise SourceError(f"the file is larger than {MAX_SPEC_BYTES} bytes: not a spec")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"not UTF-8 text (byte {exc.start})", hint="specs are YAML or JSON text saved as UTF-8"
        ) from None
    return parse_text(text, path)


def position_in_value(source: SpecSource, pointer: str, offset: int) -> Position | None:
    """The file position of character `offset` of the string at `pointer`.

    Exact for literal blocks and single-line quoted or plain scalars (escapes counted);
    folded and multi-line scalars are matched line by line against the value.
    """
    info = source.scalars.get(pointer)
    value = resolve(source.data, pointer)
    if info is None or not isinstance(value, str):
        return source.position(pointer)
    lines = source.lines()
    before = value[:offset]
    line_index = before.count("\n")
    column_in_line = offset - (before.rfind("\n") + 1)
    if info.style == "|":
        indent = _block_indent(lines, info.position.line)
        return Position(info.position.line + line_index, indent + column_in_line + 1)
    if info.style in ("'", '"') and 0 < info.position.line <= len(lines):
        column = _quoted_column(
            lines[info.position.line - 1], info.position.column - 1, info.style, offset
        )
        if column is not None:
            return Position(info.position.line, column + 1)
    aligned = _aligned_position(lines, info, value, offset)
    if aligned is not None:
        return aligned
    if info.end is not None and info.end.line > info.position.line:
        return source.position(pointer)  # somewhere in a multi-line scalar: its start
    if line_index == 0:
        quote = 1 if info.style in ("'", '"') else 0
        return Position(info.position.line, info.position.column + quote + column_in_line)
    return Position(info.position.line + line_index, 1)


def _quoted_column(line: str, start: int, quote: str, offset: int) -> int | None:
    """The 0-based column of value character `offset` in a quoted scalar opening at `start`.

    None when the scalar continues on the next line before reaching `offset`.
    """
    index, produced = start + 1, 0
    while index < len(line):
        if produced == offset:
            return index
        char = line[index]
        if char == quote:
            if quote == "'" and line[index + 1 : index + 2] == "'":
                index, produced = index + 2, produced + 1
                continue
            return None
        if quote == '"' and char == "\\":
            escape = line[index + 1 : index + 2]
            if not escape:
                return None  # an escaped line break
            step = {"x": 4, "u": 6, "U": 10}.get(escape, 2)
            if escape == "u" and _is_escaped_pair(line[index : index + 12]):
                step = 12  # two escapes, one character (see _join_surrogate_pairs)
            index += step
        else:
            index += 1
        produced += 1
    return None


def _aligned_position(
    lines: list[str], info: ScalarInfo, value: str, offset: int
) -> Position | None:
    """Find each source line's text in the value, in order, to place `offset` (folded text)."""
    if info.end is None:
        return None
    cursor = 0
    for number in range(info.position.line, min(info.end.line, len(lines)) + 1):
        raw = lines[number - 1]
        begin = 0
        if number == info.position.line and info.style != ">":
            begin = info.position.column - 1 + (1 if info.style in ("'", '"') else 0)
        cut = len(raw)
        if number == info.end.line:
            cut = info.end.column - 1 - (1 if info.style in ("'", '"') else 0)
        segment = raw[begin:cut]
        content = segment.strip(" \t")
        if not content:
            continue
        found = value.find(content, cursor)
        if found < 0:
            continue  # escapes changed this line: place the offset with the others
        if found <= offset < found + len(content):
            lead = len(segment) - len(segment.lstrip(" \t"))
            return Position(number, begin + lead + (offset - found) + 1)
        cursor = found + len(content)
    return None


def _block_indent(lines: list[str], line: int) -> int:
    """The indentation of a block scalar: that of its first non-blank line."""
    for content in lines[max(line - 1, 0) :]:
        if content.strip():
            return len(content) - len(content.lstrip(" "))
    return 0


def resolve(data: Any, pointer: str) -> Any:
    """The value at a JSON pointer, or None."""
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(data, dict):
            data = data.get(token)
        elif isinstance(data, list) and token.isdigit() and int(token) < len(data):
            data = data[int(token)]
        else:
            return None
    return data
