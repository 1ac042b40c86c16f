"""Flow imports: `flows: {name: {import: ./other.yaml#flow}}`, resolved when a spec is loaded.

The imported flow is copied into the spec's data (so the validated `Spec`, its hash and
the compiled package hold it: the package stays standalone). A path is relative to the
importing spec's folder and may not leave it (no absolute paths, no `..` above it, no
symbolic link out of it); the file is read with the same limits as a spec
(`mas2c.lang.source.load_file`: size, alias expansion, safe YAML). Imports do not chain:
the imported entry must be a flow, not another import. At most `MAX_IMPORTS` per spec.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mas2c.lang.source import SourceError, SpecSource, escape_token, load_file

MAX_IMPORTS = 32

Problem = tuple[str, str, str, str | None]  # code, pointer, message, hint


def resolve_flow_imports(source: SpecSource) -> tuple[Any, list[Problem], set[str]]:
    """The spec's data with each flow import replaced by the flow it names, the problems
    of the imports that failed (MAS214), and the names of those flows."""
    data = source.data
    flows = data.get("flows") if isinstance(data, dict) else None
    if not isinstance(flows, dict):
        return data, [], set()
    wanted = {
        name: entry
        for name, entry in flows.items()
        if isinstance(entry, dict) and "import" in entry
    }
    if not wanted:
        return data, [], set()
    problems: list[Problem] = []
    failed: set[str] = set()
    resolved = dict(flows)
    loaded: dict[Path, Any] = {}
    for count, (name, entry) in enumerate(wanted.items()):
        pointer = f"/flows/{escape_token(str(name))}/import"
        try:
            if count >= MAX_IMPORTS:
                raise _ImportFailed(f"more than {MAX_IMPORTS} flow imports in one spec")
            if set(entry) != {"import"}:
                extra = sorted(str(k) for k in entry if k != "import")
                raise _ImportFailed(
                    f"an imported flow is taken whole: `import` has no siblings (found {', '.join(extra)})"
                )
            resolved[name] = _import(source.path, entry["import"], loaded)
        except _ImportFailed as exc:
            problems.append(("MAS214", pointer, str(exc), exc.hint))
            failed.add(str(name))
            del resolved[name]
    return {**data, "flows": resolved}, problems, failed


class _ImportFailed(Exception):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


_HINT = 'e.g. import: "./common.yaml#solve" (a file beside this spec, and a flow in its `flows`)'


def _import(spec_path: str, reference: Any, loaded: dict[Path, Any]) -> Any:
    if not isinstance(reference, str) or reference.count("#") != 1:
        raise _ImportFailed(f"{reference!r} is not `<relative path>#<flow name>`", _HINT)
    relative, _, flow_name = reference.partition("#")
    spec_file = Path(spec_path)
    if spec_path in ("", "-", "<string>", "<stdin>") or not spec_file.is_file():
        raise _ImportFailed(
            "flow imports are relative to the spec's file, and this spec was not read from one"
        )
    if not relative or Path(relative).is_absolute():
        raise _ImportFailed(f"{relative!r}: the path must be relative to the spec's folder", _HINT)
    base = spec_file.resolve().parent
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise _ImportFailed(
            f"{relative!r} leads out of the spec's folder ({target.name}): imports stay inside it",
            _HINT,
        )
    if target not in loaded:
        if not target.is_file():
            raise _ImportFailed(f"{relative!r}: no such file", _HINT)
        try:
            loaded[target] = load_file(target).data
        except SourceError as exc:
            raise _ImportFailed(f"{relative!r} is not a readable spec: {exc.message}") from None
        except OSError as exc:
            raise _ImportFailed(f"{relative!r} cannot be read: {exc.strerror}") from None
    document = loaded[target]
    flows = document.get("flows") if isinstance(document, dict) else None
    if not isinstance(flows, dict) or not isinstance(flows.get(flow_name), dict):
        names = sorted(str(n) for n in flows) if isinstance(flows, dict) else []
        known = f"its flows: {', '.join(names)}" if names else "it has no `flows`"
        raise _ImportFailed(f"{relative!r} has no flow {flow_name!r} ({known})")
    flow = flows[flow_name]
    if "import" in flow:
        raise _ImportFailed(
            f"flow {flow_name!r} of {relative!r} is itself an import: imports do not chain",
            "import the flow from the file that defines it",
        )
    return copy.deepcopy(flow)
