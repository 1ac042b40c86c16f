"""Editing the user's spec file as a round trip: comments, key order, quoting and styles kept.

`edit_spec_text(text, before, after)` returns the user's spec text (YAML or JSON) changed
only where the spec changed: `before` is the spec the text loads to, `after` the edited one
(a rectifier fix, bound model slots). It works in three steps:

1. the structural difference between `before` and `after` (their canonical data) is applied
   to the text's ruamel.yaml round-trip tree: changed scalars keep their quoting or block
   style, new keys go after their predecessor, list items are matched by content so an
   inserted step does not rewrite its neighbours, and a node shared through an anchor is
   replaced at the changed place only;
2. the tree is dumped with the indentation the file uses (the setting that reproduces the
   unchanged file best), and only the lines that the edit changed in that dump are carried
   into the user's own text (a three-way line merge), so lines that ruamel would re-indent
   but the edit does not touch stay byte for byte;
3. the result must load to `after` (same spec hash); otherwise the plain ruamel dump is
   used, and if even that fails, a fresh dump of `after` (`mas2c.generate.spec_to_yaml`).

So `difflib.unified_diff(text, result)` is the patch of the user's file (see `file_patch`):
it applies with `patch -p0` or `git apply` in the file's folder. The text has already
passed `mas2c.lang.source`'s bounds (size, alias expansion), as `before` was loaded from it.
"""

from __future__ import annotations

import difflib
import io
import itertools
import json
from pathlib import Path
from typing import Any

from mas2c.lang.spec import Spec, canonical_json, spec_hash

_INDENTS = ((2, 2), (2, 0), (4, 4), (4, 2), (2, 4), (4, 0))  # (mapping, sequence dash offset)


def edit_spec_text(text: str, before: Spec, after: Spec, *, json_text: bool = False) -> str:
    """`text` (which loads to `before`) edited so that it loads to `after`; see the module.
    A file with CRLF line ends keeps them (the edit is made on LF text)."""
    if spec_hash(before) == spec_hash(after):
        return text
    if "\r\n" in text:
        edited = edit_spec_text(text.replace("\r\n", "\n"), before, after, json_text=json_text)
        return edited.replace("\r\n", "\n").replace("\n", "\r\n")
    old, new = before.to_data(), after.to_data()
    want = spec_hash(after)
    candidates = _json_candidates(text, old, new) if json_text else _yaml_candidates(text, old, new)
    for candidate in candidates:
        if _loads_to(candidate, want, json_text):
            return candidate
    if json_text:
        return json.dumps(new, indent=2, ensure_ascii=False) + "\n"
    from mas2c.generate import spec_to_yaml

    return spec_to_yaml(after)


def edit_spec_file(path: Path, before: Spec, after: Spec) -> str:
    """The text of spec file `path` (which loads to `before`) edited to `after`; a fresh dump
    of `after` when the file cannot be read as it was."""
    try:
        text = path.read_bytes().decode("utf-8")  # as it is: CRLF line ends are kept
    except (OSError, UnicodeDecodeError):
        from mas2c.generate import spec_to_yaml

        return spec_to_yaml(after)
    return edit_spec_text(text, before, after, json_text=path.suffix == ".json")


def file_patch(before: str, after: str, name: str) -> str:
    """A unified diff of a spec file, its headers the bare file name (no a/ b/ prefixes):
    `patch -p0` and `git apply` both apply it in the file's folder."""
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True), name, name
        )
    )


def _loads_to(text: str, want: str, json_text: bool) -> bool:
    from mas2c.lang.validate import validate_text

    report = validate_text(text, "<edited>.json" if json_text else "<edited>.yaml")
    return report.spec is not None and report.ok and spec_hash(report.spec) == want


# -- YAML ------------------------------------------------------------------------------------------


def _yaml(mapping: int, offset: int) -> Any:
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a line the edit did not change
    yaml.indent(mapping=mapping, sequence=offset + 2, offset=offset)
    return yaml


def _dump(yaml: Any, tree: Any) -> str:
    out = io.StringIO()
    yaml.dump(tree, out)
    return out.getvalue()


def _yaml_candidates(text: str, old: Any, new: Any) -> list[str]:
    best: tuple[int, Any, str] | None = None
    for mapping, offset in _INDENTS:
        yaml = _yaml(mapping, offset)
        try:
            plain = _dump(yaml, yaml.load(text))
        except Exception:  # ruamel raises many types; any failure just rules this setting out
            continue
        changed = _changed_lines(text, plain)
        if best is None or changed < best[0]:
            best = (changed, yaml, plain)
        if changed == 0:
            break
    if best is None:
        return []
    _changed, yaml, plain = best
    tree = yaml.load(text)
    tree = _merge(tree, old, new)
    edited = _dump(yaml, tree)
    return [_three_way(text, plain, edited), edited]


# -- JSON ------------------------------------------------------------------------------------------


def _json_candidates(text: str, old: Any, new: Any) -> list[str]:
    try:
        data = json.loads(text)
    except ValueError:
        return []
    indent = _json_indent(text)
    plain = json.dumps(data, indent=indent, ensure_ascii=False) + "\n"
    edited_data = _merge(data, old, new)
    edited = json.dumps(edited_data, indent=indent, ensure_ascii=False) + "\n"
    return [_three_way(text, plain, edited), edited]


def _json_indent(text: str) -> int | None:
    for line in text.splitlines()[1:]:
        stripped = line.lstrip(" ")
        if stripped and len(stripped) < len(line):
            return len(line) - len(stripped)
    return None


# -- the structural merge -------------------------------------------------------------------------


def _merge(node: Any, old: Any, new: Any) -> Any:
    """`node` (the user's value, as loaded) changed from `old` to `new`; containers in place."""
    if _same(old, new):
        return node
    if isinstance(old, dict) and isinstance(new, dict) and _editable(node, dict):
        _merge_mapping(node, old, new)
        return node
    same_kind = isinstance(old, list) and isinstance(new, list) and _editable(node, list)
    if same_kind and len(node) == len(old):
        _merge_sequence(node, old, new)
        return node
    return _node(new, like=node)


def _editable(node: Any, kind: type) -> bool:
    """A container of the right kind that no alias shares (an anchored one is replaced)."""
    if not isinstance(node, kind):
        return False
    anchor = getattr(node, "anchor", None)
    return getattr(anchor, "value", None) is None


def _same(a: Any, b: Any) -> bool:
    return canonical_json(a) == canonical_json(b)


def _merge_mapping(node: Any, old: dict[str, Any], new: dict[str, Any]) -> None:
    for key in [k for k in old if k not in new]:
        if key in node:
            del node[key]
    for key, value in new.items():
        if key in node:
            if key not in old or not _same(old[key], value):
                node[key] = _merge(node[key], old.get(key), value)
        elif key not in old or not _same(old[key], value):
            _append_key(node, key, _node(value))  # last: the user's order stays


def _append_key(node: Any, key: str, value: Any) -> None:
    """Add a key at the end; blank lines that followed the old last value follow the new one."""
    keys = list(node.keys())
    node[key] = value
    comments = getattr(getattr(node, "ca", None), "items", None)
    if not keys or comments is None or keys[-1] not in comments:
        return
    entry = comments[keys[-1]]
    token = entry[2] if len(entry) > 2 else None
    text = getattr(token, "value", None)
    if token is None or not isinstance(text, str):
        return
    first, newline, rest = text.partition("\n")
    if not rest or rest.strip():
        return  # no trailing blank lines, or a comment block that belongs where it is
    from ruamel.yaml.tokens import CommentToken

    token.value = first + newline
    comments[key] = [None, None, CommentToken("\n" + rest, token.start_mark, None), None]


def _merge_sequence(node: Any, old: list[Any], new: list[Any]) -> None:
    """Items matched by content: equal ones stay as written, replaced ones merge pairwise."""
    matcher = difflib.SequenceMatcher(
        None, [canonical_json(v) for v in old], [canonical_json(v) for v in new], autojunk=False
    )
    # Back to front, so that earlier indices stay valid (and comments shift with their items).
    for tag, i1, i2, j1, j2 in reversed(matcher.get_opcodes()):
        if tag == "equal":
            continue
        if tag == "replace" and i2 - i1 == j2 - j1:
            for offset in range(i2 - i1):
                node[i1 + offset] = _merge(node[i1 + offset], old[i1 + offset], new[j1 + offset])
            continue
        for index in range(i2 - 1, i1 - 1, -1):
            del node[index]
        for offset, value in enumerate(new[j1:j2]):
            node.insert(i1 + offset, _node(value))


def _node(value: Any, like: Any = None) -> Any:
    """A value for the tree: block strings for multi-line text, the old scalar's style kept."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import (
        DoubleQuotedScalarString,
        FoldedScalarString,
        LiteralScalarString,
        SingleQuotedScalarString,
    )

    if isinstance(value, dict):
        mapping = CommentedMap()
        for key, item in value.items():
            mapping[key] = _node(item)
        return mapping
    if isinstance(value, list):
        return CommentedSeq([_node(item) for item in value])
    if isinstance(value, str):
        multiline = "\n" in value.rstrip("\n")
        if isinstance(like, FoldedScalarString) and not multiline:
            folded = FoldedScalarString(value)
            folded.fold_pos = _fold_positions(value, _fold_width(like))
            return folded
        if multiline or isinstance(like, LiteralScalarString | FoldedScalarString):
            return LiteralScalarString(value)
        if isinstance(like, DoubleQuotedScalarString | SingleQuotedScalarString):
            return type(like)(value)
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)  # 20, not 20.0: loads back as the same number
    return value


def _fold_width(folded: Any) -> int:
    """The longest line of a folded scalar as the user wrapped it (88 if it is one line)."""
    positions = [-1, *getattr(folded, "fold_pos", []), len(folded)]
    widths = [b - a - 1 for a, b in itertools.pairwise(positions)]
    return max(widths) if len(widths) > 1 else 88


def _fold_positions(text: str, width: int) -> list[int]:
    """Where to fold `text` (indices of spaces) so that no line exceeds `width` if it can."""
    positions: list[int] = []
    start, last_space = 0, -1
    for index, char in enumerate(text):
        if char == " " and index > start:
            if index - start > width and last_space > start:
                positions.append(last_space)
                start = last_space + 1
            last_space = index
    if len(text) - start > width and last_space > start:
        positions.append(last_space)
    return positions


# -- the line merge ----------------------------------------------------------------------------------


def _changed_lines(a: str, b: str) -> int:
    matcher = difflib.SequenceMatcher(None, a.splitlines(), b.splitlines(), autojunk=False)
    return sum(
        max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"
    )


def _three_way(original: str, plain: str, edited: str) -> str:
    """The lines `plain` -> `edited` changed, applied to `original` (which `plain` re-dumps).

    Regions the re-dump re-formatted keep their original lines unless the edit touches them
    (then they are taken from `edited`).
    """
    o = original.splitlines(keepends=True)
    p = plain.splitlines(keepends=True)
    e = edited.splitlines(keepends=True)
    # What the edit makes of each re-dump line, and what it inserts before line b.
    repl: list[list[str]] = [[line] for line in p]
    changed = [False] * len(p)
    ins: list[list[str]] = [[] for _ in range(len(p) + 1)]
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, p, e, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if tag == "insert":
            ins[i1].extend(e[j1:j2])
            continue
        for b in range(i1, i2):
            repl[b], changed[b] = [], True
        repl[i1] = list(e[j1:j2])
    out: list[str] = []
    for tag, a1, a2, b1, b2 in difflib.SequenceMatcher(None, o, p, autojunk=False).get_opcodes():
        touched = any(changed[b1:b2]) or any(ins[b] for b in range(b1 + 1, b2))
        if tag == "equal":
            for b in range(b1, b2):
                out.extend(ins[b])
                out.extend(repl[b])
        elif touched:  # a re-formatted region the edit changes: keep what it does not change
            out.extend(_reindented_region(o[a1:a2], p, b1, b2, repl, changed, ins))
        else:  # re-formatted by the dump, untouched by the edit: the user's lines stay
            if b1 < b2:
                out.extend(ins[b1])
            out.extend(o[a1:a2])
    out.extend(ins[len(p)])
    return "".join(out)


def _words(line: str) -> str:
    """A line without its spacing (`- - id:` and `-   - id:` are the same line re-indented)."""
    return " ".join(line.split())


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _shift(lines: list[str], delta: int) -> list[str]:
    """Lines moved right (or left, as far as they have spaces) by `delta` columns."""
    if delta >= 0:
        return [" " * delta + line if line.strip() else line for line in lines]
    return [line[min(-delta, _indent(line)) :] for line in lines]


def _reindented_region(
    o: list[str],
    p: list[str],
    b1: int,
    b2: int,
    repl: list[list[str]],
    changed: list[bool],
    ins: list[list[str]],
) -> list[str]:
    """A region the dump re-indented (nested sequences): lines the edit left alone keep the
    user's indentation; changed and inserted lines are shifted by the user's offset there."""
    mapped: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(
        None, [_words(line) for line in o], [_words(line) for line in p[b1:b2]], autojunk=False
    )
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            mapped[b1 + block.b + k] = block.a + k
    out: list[str] = []
    delta = 0
    for b in range(b1, b2):
        if b in mapped:
            delta = _indent(o[mapped[b]]) - _indent(p[b])
        out.extend(_shift(ins[b], delta))
        if not changed[b] and b in mapped:
            out.append(o[mapped[b]])
        else:
            out.extend(_shift(repl[b], delta))
    return out
