"""A CPU-time bound on the host for work whose cost a spec or an LLM chooses.

The case it exists for: a JSON Schema ``pattern`` from a spec (possibly written by an
LLM) checked against an input or a default of up to 10,000 characters. Patterns with
exponential backtracking are refused by the validator (MAS511), but a polynomial one such
as ``.*a.*a.*b`` takes about n^4 steps: 40 s at 800 characters, hours at 10,000.
Python's ``re`` checks for signals while it backtracks, so an interval timer whose
handler raises stops it. Signals reach only the main thread: elsewhere (and when an
interval timer is already set) the work runs without a bound.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["PATTERN_SECONDS", "TooSlow", "time_limit"]

#: How long the host spends checking one value against a schema's patterns.
PATTERN_SECONDS = 2.0


class TooSlow(Exception):
    """The bounded work ran past its time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `TooSlow` in the body once ``seconds`` of wall time have passed (main thread)."""
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(
        signal.ITIMER_REAL
    ) != (0.0, 0.0):
        yield
        return

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise TooSlow(f"took more than {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
