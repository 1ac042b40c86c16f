"""Writing files so that a crash never leaves a half-written one and nothing of the user's is lost.

Contract:

- `write_bytes_atomic` / `write_text_atomic`: a temporary file in the target's folder,
  renamed into place; the file gets the mode an ordinary write would (0666 & ~umask).
  With ``parents=False`` a missing folder is an error: a path the user typed never
  makes mas2c create directories. With ``user_file=True`` (a path the user named) a
  symlink is written through and an existing file keeps its mode and owner.
- `write_tree_atomic`: a whole folder swapped in by rename (readers see the old tree
  or the new one); folders get 0777 & ~umask, never mkdtemp's 0700.
- `check_output_folder`: the one rule for writing a build into a folder the user
  named: a missing or empty folder, or one that holds an earlier build (its
  MANIFEST.json lists every file there, each unchanged), may be replaced; anything
  else is refused with `OutputRefused` naming what is in the way, unless forced —
  and a forced write into a foreign folder only adds and overwrites the build's own
  files (`write_files_into`), it never deletes anything.
- `check_owned_folder`: the same rule for a folder a verb fills as a whole (a run, batch
  or solve folder, `--run-dir`): missing, empty, or one that verb wrote before (its
  marker file there and every entry one it writes); anything else is refused with
  `OutputRefused` before anything is written, so no user file is overwritten or deleted.
- `read_regular` / `read_manifest`: how a folder the user names is read back — a
  regular file only (a FIFO or device never blocks or streams forever), with a size
  cap; a build's MANIFEST.json as a JSON object within `MAX_MANIFEST_BYTES`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from mas2c.errors import UsageError


class OutputRefused(UsageError):
    """The output folder holds files mas2c did not write: nothing was touched (exit 2)."""

    code = "output_refused"


def write_bytes_atomic(
    path: Path, data: bytes, *, parents: bool = True, user_file: bool = False
) -> None:
    """Write via a temporary file in the same folder and rename it into place.

    `parents=False`: the folder must exist (FileNotFoundError otherwise, nothing created).
    An existing device, FIFO or socket (`-o /dev/null`) is written in place: a rename
    would replace the device node with a regular file.
    `user_file=True`, for a path the user named (`-o FILE`): as an ordinary write would,
    a symlink is written through (its target gets the text, the link stays) and an
    existing file keeps its permission bits (and its owner, where mas2c may set it);
    never for paths inside a folder a sandbox or a program could have filled.
    """
    if user_file:
        path = Path(os.path.realpath(path))
    if _is_special(path):
        with open(path, "wb") as handle:
            handle.write(data)
        return
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    mode, owner = 0o666 & ~_UMASK, None  # the mode an ordinary write of a new file gets
    if user_file:
        with contextlib.suppress(OSError):
            existing = os.stat(path)
            if stat.S_ISREG(existing.st_mode):
                mode, owner = stat.S_IMODE(existing.st_mode) & 0o777, existing
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)  # mkstemp makes 0600 files
        if owner is not None and (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
            with contextlib.suppress(OSError):  # only root (or a group member) may
                os.chown(tmp, owner.st_uid, owner.st_gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_special(path: Path) -> bool:
    try:
        mode = os.stat(path).st_mode  # follows symlinks: /dev/stdout is one
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _read_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# Read once at import: os.umask can only be read by setting it, which races with threads.
_UMASK = _read_umask()


def write_text_atomic(
    path: Path, text: str, *, parents: bool = True, user_file: bool = False
) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), parents=parents, user_file=user_file)


def write_tree_atomic(
    target: Path, files: Mapping[str, bytes], *, keep: tuple[str, ...] = ()
) -> None:
    """Replace folder `target` with exactly `files` (relative path -> bytes), all or nothing.

    The tree is written beside the target and swapped in by rename, so readers see
    either the old tree or the new one, never a mix. Entries of the old tree named in
    `keep` (top-level names, e.g. ``checkpoints``) move into the new one. Callers that
    write into a folder the user named check it first with `check_output_folder`.
    """
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old: Path | None = None
    try:
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a build folder follows the umask
        for relative, data in files.items():
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            _write_new(destination, data)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            for name in keep:
                if (old / name).exists() and not (target / name).exists():
                    os.replace(old / name, target / name)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # stopped between the two renames: the old tree comes back
        raise


def _write_new(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def write_files_into(target: Path, files: Mapping[str, bytes]) -> None:
    """Add or overwrite `files` inside `target`, each atomically; nothing else is touched.

    All or nothing for what it adds: when a write fails (a full disk, Ctrl-C), the files
    and folders it created are removed again, so an empty folder stays empty (a file it
    overwrote, in a forced foreign folder, keeps the new bytes: each write is atomic)."""
    target.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []  # files and folders that did not exist, in creation order
    try:
        for relative, data in files.items():
            destination = target / relative
            missing = [p for p in destination.parents if p != target and target in p.parents]
            created += [p for p in reversed(missing) if not p.exists()]
            if not destination.exists() and not destination.is_symlink():
                created.append(destination)
            for folder in reversed(missing):
                folder.mkdir(exist_ok=True)
            write_bytes_atomic(destination, data, parents=False)
    except BaseException:
        for path in reversed(created):
            with contextlib.suppress(OSError):  # a folder someone else filled stays
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
        raise


# Made by running or installing a build, not by the user: an earlier build may carry them.
_DERIVED_DIRS = ("__pycache__", "checkpoints")  # checkpoints move into the new build
_DERIVED_SUFFIXES = (".egg-info", ".pyc")


FolderState = Literal["missing", "empty", "earlier_build", "foreign", "not_a_folder"]


def folder_state(folder: Path) -> tuple[FolderState, list[str]]:
    """What `folder` is, and (for a foreign one) the relative paths in the way (sorted)."""
    if not folder.exists() and not folder.is_symlink():
        return "missing", []
    if not folder.is_dir():
        return "not_a_folder", []
    present = sorted(_walk(folder))
    if not present:
        return "empty", []
    listed = _manifest_files(folder / "MANIFEST.json")
    if listed is None:
        return "foreign", present
    listed["MANIFEST.json"] = ""
    in_the_way = [
        relative
        for relative in present
        if (digest := listed.get(relative)) is None
        or (digest and _sha256(folder / relative) != digest)
    ]
    return ("foreign", in_the_way) if in_the_way else ("earlier_build", [])


def check_output_folder(folder: Path, *, force: bool = False) -> FolderState:
    """The folder's state if a build may go there; `OutputRefused` (nothing touched) if not."""
    state, in_the_way = folder_state(folder)
    if state == "not_a_folder":
        raise OutputRefused(f"{folder}: exists and is not a folder; choose another output")
    if state == "foreign" and not force:
        shown = ", ".join(in_the_way[:5]) + (
            f", ... ({len(in_the_way)} in all)" if len(in_the_way) > 5 else ""
        )
        raise OutputRefused(
            f"{folder}: not empty and not an earlier mas2c build (it holds {shown}); "
            "nothing was written. Choose a new or empty folder, or pass --force to add the "
            "build's files there (nothing is deleted)"
        )
    return state


def write_build(folder: Path, files: Mapping[str, bytes], *, force: bool = False) -> FolderState:
    """A build into a folder the user named, by the rule of `check_output_folder`.

    A missing folder or an earlier build is swapped whole (its ``checkpoints/`` kept);
    an empty or (forced) foreign folder gets the build's files added, each atomically,
    and nothing in it is deleted.
    """
    state = check_output_folder(folder, force=force)
    if state in ("missing", "earlier_build"):
        write_tree_atomic(folder, files, keep=("checkpoints",))
    else:
        write_files_into(folder, files)
    return state


#: What a run writes at the top of its folder (`mas2c run`, a rectify round's run, a
#: batch row's `mas/` and `score/`); `build/` is checked as a build, `rectify/` (and the
#: earlier attempts `rectify.N/`) are rectify's.
RUN_FILES = frozenset(
    {
        "run.json", "spec.json", "input.json", "usage.json", "result.json", "out.json",
        "trace.jsonl", "checkpoints.jsonl", "stdout.txt", "stderr.txt", "sandbox.json",
        "report.html",
    }
)  # fmt: skip


#: rectify's folder in a run folder, and the earlier attempts it keeps (``rectify.N``).
_RECTIFY_DIR = re.compile(r"rectify(\.[1-9][0-9]*)?")


def build_replaceable(folder: Path) -> bool:
    """Whether a verb may (re)write a build into `folder` without losing a user's file."""
    return folder_state(folder)[0] in ("missing", "empty", "earlier_build")


def run_folder_owns(folder: Path) -> Callable[[str], bool]:
    """Which entries (relative POSIX paths) of a run folder a run wrote."""
    build_ok = build_replaceable(folder / "build")

    def owns(relative: str) -> bool:
        head, _, rest = relative.partition("/")
        if not rest:  # rectify --write without --spec puts <name>.rectified.yaml here
            return relative in RUN_FILES or relative.endswith(".rectified.yaml")
        return _RECTIFY_DIR.fullmatch(head) is not None or (head == "build" and build_ok)

    return owns


def check_owned_folder(
    folder: Path, *, marker: str, owns: Callable[[str], bool], what: str
) -> None:
    """Refuse (`OutputRefused`, nothing touched) a `--run-dir` that is not missing, empty,
    or an earlier folder of this kind: `marker` there and every entry one `owns`."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise OutputRefused(f"{folder}: exists and is not a folder; choose another --run-dir")
    present = sorted(_walk(folder))
    if not present:
        return
    earlier = (folder / marker).is_file() and not (folder / marker).is_symlink()
    in_the_way = [p for p in present if not earlier or not owns(p)]
    if not in_the_way:
        return
    shown = ", ".join(in_the_way[:5]) + (
        f", ... ({len(in_the_way)} in all)" if len(in_the_way) > 5 else ""
    )
    raise OutputRefused(
        f"{folder}: not empty and not an earlier {what} folder (it holds {shown}); nothing "
        "was written. Choose a new or empty --run-dir"
    )


def _walk(folder: Path) -> list[str]:
    found: list[str] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in _DERIVED_DIRS and not d.endswith(_DERIVED_SUFFIXES)]
        base = Path(root).relative_to(folder)
        for name in names:
            if not name.endswith(_DERIVED_SUFFIXES):
                found.append((base / name).as_posix())
        for d in dirs:  # an empty sub-folder is still something the user made
            if not any(os.scandir(Path(root) / d)):
                found.append((base / d).as_posix() + "/")
    return found


#: A build's MANIFEST.json holds its spec and file hashes: far below this.
MAX_MANIFEST_BYTES = 8 * 1024 * 1024


def read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes; ValueError if it is not one (FIFO, device, folder) or holds
    more than `limit` bytes. OSError as `open` raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not block
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is larger than {limit} bytes")
    return data


def read_manifest(folder: Path) -> dict[str, Any]:
    """A build's MANIFEST.json as a JSON object; OSError/ValueError when it cannot be one
    (missing, not a regular file, too large, not UTF-8 JSON, nested too deep, not an object)."""
    raw = read_regular(folder / "MANIFEST.json", MAX_MANIFEST_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("MANIFEST.json is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("MANIFEST.json must hold a JSON object")
    return data


def _manifest_files(path: Path) -> dict[str, str] | None:
    try:
        data = read_manifest(path.parent)
    except (OSError, ValueError):
        return None
    if not (
        isinstance(data, dict)
        and str(data.get("generated_by", "")).startswith("mas2c")
        and isinstance(data.get("files"), dict)
    ):
        return None
    return {str(k): str(v) for k, v in data["files"].items()}


def _sha256(path: Path) -> str:
    try:  # a build's files are small; anything else is simply "in the way"
        return hashlib.sha256(read_regular(path, MAX_MANIFEST_BYTES)).hexdigest()
    except (OSError, ValueError):
        return ""
