"""Usage/cost accounting and retry/backoff: ONE implementation for the gateway and the runtime.

The LLM gateway (host) imports this module; the compiler copies it verbatim into every
compiled package as ``_accounting.py`` (a compiled package never imports mas2c), so
``result.json``'s usage (the program's count) and ``usage.json`` (the gateway's) are made
by the same code: the same keys, the same rounding.

- ``Usage``: calls, tokens and USD in total, ``by_agent`` (agent id) and ``by_model``
  (the model name sent to the endpoint, e.g. ``gpt-4o-mini``: the one name both sides
  know). Costs are exact fractions while counting, rounded to ``COST_DIGITS`` when shown.
- ``call_cost``: the price of one call from per-million-token prices.
- Retry policy: ``should_retry`` (the ``x-should-retry`` header), ``retry_after_s``
  (``retry-after-ms`` / ``Retry-After``, seconds or an HTTP date) and ``backoff_s``
  (exponential with jitter, capped). Exactly one layer retries a failing upstream: the
  gateway does; a program behind the gateway's socket never retries on top of it (the
  gateway answers every error with ``x-should-retry: false``).

Standard library only.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

__all__ = [
    "COST_DIGITS",
    "RETRYABLE_STATUS",
    "Tally",
    "Usage",
    "backoff_s",
    "call_cost",
    "per_token",
    "retry_after_s",
    "retryable_status",
    "should_retry",
]

COST_DIGITS = 10  # USD digits kept when usage is shown (result.json, usage.json)
RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx


def per_token(per_mtok: float | None) -> Fraction:
    """USD per token, exactly, from USD per million tokens (None = free): the price as
    written (0.1 is one tenth, not the nearest binary float)."""
    return Fraction(repr(float(per_mtok or 0))) / 1_000_000


def call_cost(
    prompt_tokens: int,
    completion_tokens: int,
    input_per_mtok: float | None,
    output_per_mtok: float | None,
) -> Fraction:
    """The exact USD cost of one call."""
    return prompt_tokens * per_token(input_per_mtok) + completion_tokens * per_token(
        output_per_mtok
    )


@dataclass
class Tally:
    """Calls, tokens and cost of some calls."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Fraction = field(default_factory=Fraction)

    def add(self, prompt: int, completion: int, cost: Fraction | float) -> None:
        self.calls += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cost += Fraction(cost)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_usd(self) -> float:
        return round(float(self.cost), COST_DIGITS)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost_usd": self.cost_usd,
        }


@dataclass
class Usage:
    """Usage in total, by agent id and by model name (see the module docstring)."""

    total: Tally = field(default_factory=Tally)
    by_agent: dict[str, Tally] = field(default_factory=dict)
    by_model: dict[str, Tally] = field(default_factory=dict)

    def add(
        self, agent: str, model: str, prompt: int, completion: int, cost: Fraction | float
    ) -> None:
        self.total.add(prompt, completion, cost)
        self.by_agent.setdefault(agent, Tally()).add(prompt, completion, cost)
        self.by_model.setdefault(model, Tally()).add(prompt, completion, cost)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.total.as_dict(),
            "by_agent": {k: v.as_dict() for k, v in sorted(self.by_agent.items())},
            "by_model": {k: v.as_dict() for k, v in sorted(self.by_model.items())},
        }


# -- retry policy ---------------------------------------------------------------------------


def should_retry(headers: Mapping[str, str]) -> bool | None:
    """The server's ``x-should-retry`` verdict: True, False, or None (it says nothing)."""
    value = (headers.get("x-should-retry") or "").strip().lower()
    return {"true": True, "false": False}.get(value)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def backoff_s(attempt: int, base_s: float, max_s: float, retry_after: float | None) -> float:
    """The wait before retry number ``attempt`` (1-based): the server's hint when it gave
    one, else ``base_s * 2**(attempt-1)`` with up to 25% jitter (so concurrent callers do
    not retry in lockstep); never more than ``max_s``."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), max_s)
    base = base_s * 2.0 ** (attempt - 1)
    return float(min(base * (1.0 + 0.25 * random.random()), max_s))
