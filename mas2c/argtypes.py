"""Argument types for numeric command-line flags, shared by every mas2c command line.

Contract: each function takes a flag's text and returns its value, or raises
`argparse.ArgumentTypeError` with a message that names the text, so argparse reports a
usage error (exit 2) before anything runs. `nan`, `inf`, words and out-of-range values are
refused (`generate --max-repairs -1` once reached the LLM; `run --timeout nan` the sandbox).
"""

from __future__ import annotations

import argparse
import math

__all__ = ["count", "positive", "positive_int"]


def positive(text: str) -> float:
    """A flag's positive, finite number (seconds, dollars): `nan`, `inf`, 0 and less refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def count(text: str) -> int:
    """A flag's count: an integer, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A flag's count that must be at least 1 (workers, rows, containers, MiB)."""
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {text!r}")
    return value
