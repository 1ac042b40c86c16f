"""Reading spec files: YAML or JSON into plain data, remembering where every value was written.

Positions are kept per JSON pointer so that every problem the validator finds
can name the file's line and column, including problems inside block scalars
(tool code) whose own line numbers are relative to the block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based


@dataclass(frozen=True)
class ScalarInfo:
    """Where a string scalar's content starts and how it was written."""

    position: Position
    style: str | None  # None plain, "|" literal, ">" folded, "'" or '"' quoted


class SourceError(Exception):
    """The file cannot be read as YAML or JSON at all."""

    def __init__(self, message: str, position: Position | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


@dataclass
class SpecSource:
    data: Any
    path: str = "<string>"
    text: str = ""
    positions: dict[str, Position] = field(default_factory=dict)
    scalars: dict[str, ScalarInfo] = field(default_factory=dict)

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


# Aliases let a small file expand into a huge (or cyclic) document ("billion laughs"); a spec
# never needs more than this many values once aliases are expanded.
MAX_EXPANDED_NODES = 100_000


@dataclass
class _WalkState:
    visited: int = 0
    active: set[int] = field(default_factory=set)  # ids of the nodes on the current path


def _walk(node: yaml.Node, pointer: str, source: SpecSource, state: _WalkState) -> None:
    mark = node.start_mark
    here = Position(mark.line + 1, mark.column + 1)
    state.visited += 1
    if state.visited > MAX_EXPANDED_NODES:
        raise SourceError(
            f"the document expands to more than {MAX_EXPANDED_NODES} values (aliases nested too deep?)",
            here,
        )
    if id(node) in state.active:
        raise SourceError("a recursive alias: an anchor is used inside its own value", here)
    source.positions[pointer] = here
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        state.active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise SourceError(
                    f"duplicate key {key!r}",
                    Position(key_node.start_mark.line + 1, key_node.start_mark.column + 1),
                )
            seen.add(key)
            _walk(value_node, f"{pointer}/{escape_token(key)}", source, state)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, f"{pointer}/{index}", source, state)
    state.active.discard(id(node))
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
        style = node.style or None
        start = Position(mark.line + 1, mark.column + 1)
        if style in ("|", ">"):
            # A block scalar's content starts on the line after its indicator.
            start = Position(mark.line + 2, mark.column + 1)
        source.scalars[pointer] = ScalarInfo(start, style)


def _mark_position(error: yaml.MarkedYAMLError) -> Position | None:
    mark = error.problem_mark or error.context_mark
    return Position(mark.line + 1, mark.column + 1) if mark is not None else None


def parse_text(text: str, path: str = "<string>") -> SpecSource:
    """Parse YAML (JSON is YAML) keeping positions; SourceError if it is not a document."""
    source = SpecSource(data=None, path=path, text=text)
    if path.endswith(".json"):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceError(f"invalid JSON: {exc.msg}", Position(exc.lineno, exc.colno)) from None
        except RecursionError:
            raise SourceError("invalid JSON: nested too deeply") from None
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            raise SourceError(f"invalid JSON: {exc}") from None
    try:
        node = yaml.compose(text, Loader=_PositionLoader)
        if node is not None:
            _walk(node, "", source, _WalkState())
        source.data = yaml.load(text, Loader=_PositionLoader)
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or "malformed document"
        raise SourceError(f"invalid YAML: {problem}", _mark_position(exc)) from None
    except yaml.YAMLError as exc:
        raise SourceError(f"invalid YAML: {exc}") from None
    except RecursionError:
        raise SourceError("invalid YAML: nested too deeply") from None
    except ValueError as exc:  # a scalar the constructor cannot convert (a 5000-digit int)
        raise SourceError(f"invalid YAML: {exc}") from None
    return source


def load_file(path: str | Path) -> SpecSource:
    """Read a spec file. OSError propagates (a usage error, not a spec problem)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"not UTF-8 text (byte {exc.start})") from None
    return parse_text(text, str(path))


def position_in_value(source: SpecSource, pointer: str, offset: int) -> Position | None:
    """The file position of character `offset` of the string at `pointer` (best effort for folded text)."""
    info = source.scalars.get(pointer)
    value = _resolve(source.data, pointer)
    if info is None or not isinstance(value, str):
        return source.position(pointer)
    before = value[:offset]
    line_index = before.count("\n")
    column_in_line = offset - (before.rfind("\n") + 1)
    if info.style in ("|", ">"):
        indent = _block_indent(source.text, info.position.line)
        return Position(info.position.line + line_index, indent + column_in_line + 1)
    quote = 1 if info.style in ("'", '"') else 0
    if line_index == 0:
        return Position(info.position.line, info.position.column + quote + column_in_line)
    return Position(info.position.line + line_index, 1)


def _block_indent(text: str, line: int) -> int:
    lines = text.splitlines()
    if 0 < line <= len(lines):
        content = lines[line - 1]
        return len(content) - len(content.lstrip(" "))
    return 0


def _resolve(data: Any, pointer: str) -> Any:
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(data, dict):
            data = data.get(token)
        elif isinstance(data, list) and token.isdigit() and int(token) < len(data):
            data = data[int(token)]
        else:
            return None
    return data
