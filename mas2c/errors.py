"""The one exception tree of mas2c: every error a user can see is a `Mas2cError`.

Contract:

- Every user-facing exception of every mas2c module subclasses one of the three
  leaves below, so the command line has exactly one handler (`mas2c.cli.main`):
  it prints ``mas2c VERB: message`` on stderr (or, with ``--json``, one JSON
  document ``{"ok": false, "error": {...}}`` on stdout) and exits with the
  class's `exit_code`. No Python traceback for any of them.
- Each class has a stable, machine-readable `code` (snake_case; part of the
  public contract: never renamed, only added) and a `kind`. An instance may
  carry a more specific code than its class (``exc.code = "no_daemon"``).
- The tree::

      Mas2cError                      exit 1
      ├── UserError                   the user's input is wrong; fixing it is the user's move
      │   ├── UsageError              exit 2  bad flags, a missing file, a refused output folder
      │   └── InvalidInput            exit 1  a spec/pool/input file that is read but rejected
      └── RunFailure                  exit 1  the work could not be done (no daemon, dead
                                              endpoint, no valid spec from the LLM, ...)

- `terminal_safe(text)`: what mas2c shows a person (stderr, progress lines) never
  carries a terminal control sequence: messages often quote what a sandboxed program, a
  tool or an LLM wrote, so C0/C1 controls (but newline and tab), DEL and the Unicode
  bidi overrides are shown escaped (``\\x1b``, ``\\u202e``).

This module imports nothing but the standard library, so every module may
import it at no cost.
"""

from __future__ import annotations

import errno
import re
from typing import Any, ClassVar, Literal

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(text: str) -> str:
    """`text` with every terminal control character shown escaped (newline and tab kept)."""
    return _CONTROL.sub(_escaped, text)


ErrorKind = Literal["usage", "invalid_input", "failure"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Mas2cError(Exception):
    """Base of every mas2c error meant for a user: a message that says what is wrong and the fix."""

    code: str = "error"
    kind: ClassVar[ErrorKind] = "failure"
    exit_code: ClassVar[int] = EXIT_FAILURE

    def to_json(self) -> dict[str, Any]:
        """The ``error`` object of a ``--json`` failure document."""
        return {
            "code": self.code,
            "kind": self.kind,
            "type": next(c.__name__ for c in type(self).__mro__ if not c.__name__.startswith("_")),
            "message": str(self),
            "exit_code": self.exit_code,
        }


class UserError(Mas2cError):
    """Something the user gave is wrong (flags, files, a spec, an input)."""

    code = "user_error"
    kind: ClassVar[ErrorKind] = "invalid_input"


class UsageError(UserError):
    """How mas2c was called: bad flags, a missing file, an output folder it must not touch."""

    code = "usage"
    kind: ClassVar[ErrorKind] = "usage"
    exit_code: ClassVar[int] = EXIT_USAGE


class InvalidInput(UserError):
    """A file that was read but is rejected: a spec with errors, a bad pool, an input that
    does not match the spec's input schema."""

    code = "invalid_input"
    kind: ClassVar[ErrorKind] = "invalid_input"
    exit_code: ClassVar[int] = EXIT_FAILURE


class RunFailure(Mas2cError):
    """The work could not be done: the sandbox, the gateway, the endpoint or the LLM failed."""

    code = "failure"
    kind: ClassVar[ErrorKind] = "failure"
    exit_code: ClassVar[int] = EXIT_FAILURE


def os_error_message(exc: OSError) -> str:
    """``path: reason`` for an OSError, without Python's ``[Errno N]`` noise."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


class FileFailure(RunFailure):
    """A file could not be read or written (permissions, a full disk, ...)."""

    code = "file_io"

    @classmethod
    def from_os_error(cls, exc: OSError) -> FileFailure:
        return cls(os_error_message(exc))


# The machine, not the path the user chose, is at fault: the same command may work later.
_MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG})


def write_error(path: object, exc: OSError) -> Mas2cError:
    """The error for an output the user named that could not be written: a full disk
    (or quota, an I/O error, a file too large) is a `FileFailure` (``file_io``, exit 1);
    anything else about the place (read-only, no permission, not a folder) is a
    `UsageError` (exit 2): choose another output. Both say ``cannot write PATH: why``."""
    message = f"cannot write {path}: {exc.strerror or exc}"
    if exc.errno in _MACHINE_ERRNOS:
        return FileFailure(message)
    return UsageError(message)


class Interrupted(RunFailure):
    """Ctrl-C (or SIGTERM): whatever ran was stopped and cleaned up."""

    code = "interrupted"
    exit_code: ClassVar[int] = EXIT_INTERRUPTED
