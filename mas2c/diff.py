"""`mas2c diff A B`: what changed between two specs (semantically) or two builds (file by file).

Specs are compared as plain data (`Spec.to_data()`), so key order, YAML style,
JSON vs YAML and omitted defaults make no difference. Agents, models, tools,
inputs, outputs and budgets are compared key by key; workflow steps are matched
by id across the whole tree (ids are unique), so a step that moves (reordered,
or into a loop) is one "moved" change, not a removal and an addition. Changed
text shows a word-level diff (`Solve the [-problem-] {+task+}`), changed code a
line diff.

Builds are compared file by file as unified diffs.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from mas2c.lang.spec import Spec, Step, child_step_lists, flow_pointer, nested_lists
from mas2c.lang.validate import load_spec

ChangeKind = Literal["added", "removed", "changed"]

MANIFEST = "MANIFEST.json"
WORD_CONTEXT = 6  # unchanged words kept on each side of a word-level change
LINE_CONTEXT = 1  # unchanged lines kept on each side of a line-level change
VALUE_WIDTH = 100  # longest rendering of a value in `format_changes`

SECTIONS: tuple[str, ...] = (
    "agents",
    "models",
    "tools",
    "state",
    "workflow",
    "flows",
    "inputs/outputs",
    "budgets",
    "other",
)
_SECTION_OF_KEY = {
    "agents": "agents",
    "models": "models",
    "tools": "tools",
    "state": "state",
    "workflow": "workflow",
    "flows": "flows",
    "inputs": "inputs/outputs",
    "outputs": "inputs/outputs",
    "budgets": "budgets",
}
_IGNORED_KEYS = frozenset({"$schema", "workflow"})  # $schema is an editor hint
_CODE_POINTERS = (re.compile(r"/tools/[^/]+/code"), re.compile(r"/workflow/[^/]+/tests"))


@dataclass(frozen=True)
class Change:
    """One difference between two specs, at a JSON pointer into the spec.

    Workflow steps are addressed by id, not by index: `/workflow/<step id>/<field>`.
    A moved step is a "changed" change at `/workflow/<id>` whose detail says
    `moved from <old pointer> to <new pointer>` (index pointers into each spec).
    """

    kind: ChangeKind
    pointer: str
    before: Any = None
    after: Any = None
    detail: str | None = None

    @property
    def section(self) -> str:
        return section_of(self.pointer)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "pointer": self.pointer,
            "section": self.section,
            "before": self.before,
            "after": self.after,
            "detail": self.detail,
        }


# -- entry points ---------------------------------------------------------------------------


def diff_specs(a: Spec, b: Spec) -> list[Change]:
    """Semantic differences from spec `a` to spec `b`, grouped by section in `SECTIONS` order."""
    data_a, data_b = _without(a.to_data()), _without(b.to_data())
    both = sorted(a.flows.keys() & b.flows.keys())
    for data in (data_a, data_b):  # the steps of a flow in both specs: matched by id below
        for name in both:
            data["flows"][name] = {k: v for k, v in data["flows"][name].items() if k != "steps"}
    changes = list(_diff_data("", data_a, data_b))
    changes.extend(diff_workflows(a.workflow, b.workflow))
    for name in both:
        prefix = flow_pointer(name) + "/steps"
        for change in diff_workflows(a.flows[name].steps, b.flows[name].steps):
            rest = change.pointer[len("/workflow") :]
            changes.append(replace(change, pointer=prefix + rest))
    rank = {name: index for index, name in enumerate(SECTIONS)}
    return sorted(changes, key=lambda change: rank[change.section])  # stable: keeps inner order


def diff_builds(a: Path, b: Path) -> list[str]:
    """Two build folders file by file: unified-diff lines, `only in a: X` / `only in b: X` lines.

    Files are visited in sorted path order; `__pycache__` folders and `*.pyc`
    files (left by running a build) are skipped. Lines carry no newline.
    """
    files_a, files_b = _tree_files(a), _tree_files(b)
    lines: list[str] = []
    for path in sorted(files_a.keys() | files_b.keys()):
        if path not in files_b:
            lines.append(f"only in a: {path}")
        elif path not in files_a:
            lines.append(f"only in b: {path}")
        else:
            lines.extend(_file_diff(path, files_a[path].read_bytes(), files_b[path].read_bytes()))
    return lines


def diff_builds_json(a: Path, b: Path) -> list[dict[str, Any]]:
    """Two build folders file by file, as data: `{path, kind, diff}` per differing file
    (kind `added` = only in b, `removed` = only in a, `changed` with its unified diff)."""
    files_a, files_b = _tree_files(a), _tree_files(b)
    changes: list[dict[str, Any]] = []
    for path in sorted(files_a.keys() | files_b.keys()):
        if path not in files_b:
            changes.append({"path": path, "kind": "removed", "diff": None})
        elif path not in files_a:
            changes.append({"path": path, "kind": "added", "diff": None})
        else:
            lines = _file_diff(path, files_a[path].read_bytes(), files_b[path].read_bytes())
            if lines:
                changes.append({"path": path, "kind": "changed", "diff": "\n".join(lines)})
    return changes


def format_changes(changes: list[Change]) -> str:
    """Human-readable changes, grouped under section headings."""
    if not changes:
        return "no differences"
    lines: list[str] = []
    for section in SECTIONS:
        group = [change for change in changes if change.section == section]
        if group:
            lines.append(f"{section}:")
            lines.extend(_format_change(change) for change in group)
    lines.append(_summary(changes))
    return "\n".join(lines)


def changes_json(changes: list[Change]) -> list[dict[str, Any]]:
    return [change.to_json() for change in changes]


def diff_paths(a: Path, b: Path) -> tuple[str, bool, list[dict[str, Any]] | None]:
    """Compare two specs (semantically) or two build folders (file by file).

    Returns (text, different, json): json is the list of changes for specs, None
    for builds. A spec and a build, a missing path, or a folder that is not a
    build raise ValueError; an invalid spec raises `mas2c.lang.validate.SpecInvalid`.
    """
    kind_a, kind_b = path_kind(a), path_kind(b)
    if kind_a != kind_b:
        raise ValueError(
            f"cannot compare a {kind_a} ({a}) with a {kind_b} ({b}): "
            "give two spec files or two build folders"
        )
    if kind_a == "build":
        lines = diff_builds(a, b)
        return ("\n".join(lines) if lines else "no differences"), bool(lines), None
    changes = diff_specs(load_spec(a), load_spec(b))
    return format_changes(changes), bool(changes), changes_json(changes)


def path_kind(path: Path) -> Literal["spec", "build"]:
    """`build` for a folder holding MANIFEST.json, `spec` for a file; else ValueError."""
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return "build"
        raise ValueError(f"{path} is a folder without {MANIFEST}: not a mas2c build")
    if path.is_file():
        return "spec"
    raise ValueError(f"{path}: no such file or folder")


def section_of(pointer: str) -> str:
    key = pointer.split("/")[1] if pointer.count("/") >= 1 else ""
    return _SECTION_OF_KEY.get(_unescape(key), "other")


# -- generic data diff ----------------------------------------------------------------------


def _without(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in _IGNORED_KEYS}


def _diff_data(pointer: str, a: Any, b: Any) -> Iterator[Change]:
    """Changes from `a` to `b`: mappings key by key, lists of mappings item by item."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            here = f"{pointer}/{_escape(key)}"
            if key not in b:
                yield Change("removed", here, before=a[key])
            elif key not in a:
                yield Change("added", here, after=b[key])
            else:
                yield from _diff_data(here, a[key], b[key])
    elif (
        isinstance(a, list)
        and isinstance(b, list)
        and len(a) == len(b)
        and all(isinstance(item, dict) for item in a + b)
    ):
        for index, (item_a, item_b) in enumerate(zip(a, b, strict=True)):
            yield from _diff_data(f"{pointer}/{index}", item_a, item_b)
    elif not same_value(a, b):
        yield Change("changed", pointer, before=a, after=b, detail=_detail(pointer, a, b))


def same_value(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but True != 1 and key order does not matter."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _detail(pointer: str, a: Any, b: Any) -> str | None:
    if isinstance(a, str) and isinstance(b, str):
        if any(pattern.fullmatch(pointer) for pattern in _CODE_POINTERS):
            return line_diff(a, b)
        return word_diff(a, b)
    if isinstance(a, list) and isinstance(b, list) and all(_scalar(x) for x in a + b):
        return token_diff([_render_scalar(x) for x in a], [_render_scalar(x) for x in b])
    return None


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _render_scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# -- text diffs -----------------------------------------------------------------------------


def word_diff(a: str, b: str, context: int = WORD_CONTEXT) -> str:
    """A word-level diff: `Solve the [-problem-] {+task+} step by step`.

    Whitespace is normalised to single spaces; long unchanged runs are elided
    to `context` words on each side (`…`). Texts differing only in whitespace
    give `(whitespace only)`.
    """
    words_a, words_b = a.split(), b.split()
    if words_a == words_b:
        return "(whitespace only)"
    return token_diff(words_a, words_b, context)


def token_diff(a: list[str], b: list[str], context: int = WORD_CONTEXT) -> str:
    """A token-level diff of two token lists, deletions `[-…-]`, insertions `{+…+}`."""
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    opcodes = matcher.get_opcodes()
    parts: list[str] = []
    for index, (tag, i1, i2, j1, j2) in enumerate(opcodes):
        if tag == "equal":
            parts.extend(_elide(a[i1:i2], context, index == 0, index == len(opcodes) - 1))
            continue
        if i2 > i1:
            parts.append("[-" + " ".join(a[i1:i2]) + "-]")
        if j2 > j1:
            parts.append("{+" + " ".join(b[j1:j2]) + "+}")
    return " ".join(parts)


def _elide(words: list[str], context: int, first: bool, last: bool) -> list[str]:
    """Unchanged words between changes, shortened to `context` words next to each change."""
    keep_head = 0 if first else context
    keep_tail = 0 if last else context
    if len(words) <= keep_head + keep_tail + 3:  # eliding fewer than 3 words saves nothing
        return words
    head = words[:keep_head]
    tail = words[len(words) - keep_tail :] if keep_tail else []
    return [*head, "…", *tail]


def line_diff(a: str, b: str, context: int = LINE_CONTEXT) -> str:
    """A line-level diff of code: unified-diff hunks without the file header lines."""
    lines = difflib.unified_diff(a.splitlines(), b.splitlines(), n=context, lineterm="")
    body = list(lines)[2:]
    return "\n".join(body) if body else "(line endings or trailing newline only)"


# -- workflow -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Place:
    """Where a step sits: its container (in id terms), position there, and index pointer."""

    container: str  # "/workflow" or "/workflow/<parent id>/<suffix>", e.g. /workflow/fix/steps
    index: int
    pointer: str  # the index pointer in its spec, e.g. /workflow/2/steps/0


def diff_workflows(a: list[Step], b: list[Step]) -> list[Change]:
    """Steps matched by id across the whole tree: removed, added, moved, fields changed."""
    steps_a, places_a = _index_steps(a)
    steps_b, places_b = _index_steps(b)
    moved = _moved_ids(places_a, places_b)
    changes = [
        Change("removed", _step_pointer(i), before=own, detail=f"was at {places_a[i].pointer}")
        for i, own in steps_a.items()
        if i not in steps_b
    ]
    for step_id, own in steps_b.items():
        here = _step_pointer(step_id)
        if step_id not in steps_a:
            detail = f"at {places_b[step_id].pointer}"
            changes.append(Change("added", here, after=own, detail=detail))
            continue
        if step_id in moved:
            old, new = places_a[step_id].pointer, places_b[step_id].pointer
            changes.append(Change("changed", here, old, new, f"moved from {old} to {new}"))
        changes.extend(_diff_data(here, steps_a[step_id], own))
    return changes


def _step_pointer(step_id: str) -> str:
    return f"/workflow/{_escape(step_id)}"


def _index_steps(steps: list[Step]) -> tuple[dict[str, dict[str, Any]], dict[str, _Place]]:
    """Each step's own data (without nested steps) and its place, by id, depth first."""
    own: dict[str, dict[str, Any]] = {}
    places: dict[str, _Place] = {}
    for container, index, pointer, step in _walk(steps, "/workflow", "/workflow"):
        own.setdefault(step.id, _own_data(step))
        places.setdefault(step.id, _Place(container, index, pointer))
    return own, places


def _walk(steps: list[Step], container: str, pointer: str) -> Iterator[tuple[str, int, str, Step]]:
    for index, step in enumerate(steps):
        here = f"{pointer}/{index}"
        yield container, index, here, step
        for child_pointer, children in child_step_lists(step, here):
            suffix = child_pointer[len(here) :]
            yield from _walk(children, _step_pointer(step.id) + suffix, child_pointer)


def _own_data(step: Step) -> dict[str, Any]:
    """A step's fields without its nested step lists (those are compared as steps of their own)."""
    data: dict[str, Any] = step.model_dump(mode="json", by_alias=True, exclude_none=True)
    # The registry says where nested step lists sit (`steps`, `branches/0`, `cases/1/steps`):
    # drop them, last first so indexes hold, then the containers they leave empty.
    emptied = set()
    for key, _children in reversed(nested_lists(step)):
        *parents, last = key.split("/")
        emptied.add(key.split("/")[0])
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.get(part)
        if isinstance(node, list):
            del node[int(last)]
        elif isinstance(node, dict):
            node.pop(last, None)
    return {k: v for k, v in data.items() if not (k in emptied and v == [])}


def _moved_ids(places_a: dict[str, _Place], places_b: dict[str, _Place]) -> set[str]:
    """Steps in both specs whose container changed, or whose order among their siblings did."""
    common = places_a.keys() & places_b.keys()
    moved = {i for i in common if places_a[i].container != places_b[i].container}
    stayed = common - moved
    for container in sorted({places_b[i].container for i in stayed}):
        order_a = _order([i for i in stayed if places_a[i].container == container], places_a)
        order_b = _order([i for i in stayed if places_b[i].container == container], places_b)
        matcher = difflib.SequenceMatcher(None, order_a, order_b, autojunk=False)
        blocks = matcher.get_matching_blocks()
        kept = {order_a[block.a + k] for block in blocks for k in range(block.size)}
        moved.update(set(order_a) - kept)
    return moved


def _order(ids: list[str], places: dict[str, _Place]) -> list[str]:
    return sorted(ids, key=lambda step_id: places[step_id].index)


# -- build diffs ----------------------------------------------------------------------------


def _tree_files(root: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for every regular file under `root` (no symlinks followed)."""
    files: dict[str, Path] = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if "__pycache__" in relative.parts or path.suffix == ".pyc":
            continue
        if path.is_file() and not path.is_symlink():
            files[relative.as_posix()] = path
    return files


def _file_diff(path: str, a: bytes, b: bytes) -> list[str]:
    if a == b:
        return []
    try:
        text_a, text_b = a.decode("utf-8"), b.decode("utf-8")
    except UnicodeDecodeError:
        return [f"binary files a/{path} and b/{path} differ"]
    lines = list(
        difflib.unified_diff(
            text_a.splitlines(), text_b.splitlines(), f"a/{path}", f"b/{path}", lineterm=""
        )
    )
    return lines or [f"files a/{path} and b/{path} differ in line endings only"]


# -- formatting -----------------------------------------------------------------------------

_MARKS = {"added": "+", "removed": "-", "changed": "~"}


def _format_change(change: Change) -> str:
    head = f"  {_MARKS[change.kind]} {change.pointer}"
    if change.detail and "\n" in change.detail:
        body = "\n".join("      " + line for line in change.detail.splitlines())
        return f"{head}:\n{body}"
    if change.kind == "changed":
        text = change.detail or f"{_short(change.before)} → {_short(change.after)}"
    else:
        value = _short(change.after if change.kind == "added" else change.before)
        text = f"{change.detail}: {value}" if change.detail else value
    return f"{head}: {text}"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 1] + "…"


def _summary(changes: list[Change]) -> str:
    counts = {kind: sum(1 for c in changes if c.kind == kind) for kind in _MARKS}
    return (
        f"{len(changes)} change(s): {counts['added']} added, "
        f"{counts['removed']} removed, {counts['changed']} changed"
    )


# -- JSON pointers --------------------------------------------------------------------------


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _unescape(key: str) -> str:
    return key.replace("~1", "/").replace("~0", "~")
