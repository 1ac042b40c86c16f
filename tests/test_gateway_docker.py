"""Hostile programs in real Docker against the gateway (issue 18 classes 2, 3 and 6).

The program is benchmarks/bench_gateway_flood.py's: stdlib only, in the sandbox
image, reaching the gateway through the socket mount as the sandbox's uid (so these
tests also prove the 0600 socket, chowned to that uid, is reachable from inside).
"""

from __future__ import annotations

import pytest

from benchmarks.bench_gateway_flood import run_flood
from mas2c.gateway import Budget, GatewayLimits, prompt_token_bound
from mas2c.testserver import ChatRequest, Reply

pytestmark = pytest.mark.docker

_MIB = 1024 * 1024


@pytest.mark.usefixtures("docker_ready")
def test_flood_keeps_host_threads_and_memory_bounded() -> None:
    limits = GatewayLimits(max_connections=64, max_concurrency=8)
    figures = run_flood(half_open=1800, big=8, dense=8, valid=24, hold_s=2.0, limits=limits)
    program = figures["program"]
    assert figures["exit_code"] == 0, figures["stderr_tail"]
    assert program["half_open_connected"] >= 1000  # they all connect; few get a slot
    assert figures["peak_open_connections"] <= 64
    assert figures["rejected_connections"] >= 1000
    assert figures["peak_gateway_threads"] <= 1 + 8  # the event loop and the workers
    bound_mb = (limits.max_pending_bytes + limits.max_parse_weight) / _MIB
    assert figures["peak_rss_mb"] - figures["baseline_rss_mb"] < bound_mb + 64
    statuses = program["statuses"]
    assert set(statuses["valid_during_half_open"]) <= {"200", "503", "0"}
    assert statuses["big"] == {"402": 8}  # read, parsed, refused by the token budget
    assert statuses["dense"] == {"413": 8}  # refused before parsing
    assert statuses["valid"] == {"200": 24}
    assert set(statuses["over"]) <= {"413", "0"}  # refused from the header, body unread
    assert program["after"] == 200  # and it still serves


def worst_case(req: ChatRequest) -> Reply:
    """An upstream that uses every token it is allowed."""
    return Reply(
        content="x",
        prompt_tokens=prompt_token_bound(req.body),
        completion_tokens=int(req.body["max_tokens"]),
    )


@pytest.mark.usefixtures("docker_ready")
def test_budget_burst_from_the_sandbox_cannot_overspend() -> None:
    # 2 x 40 concurrent calls of max_tokens=50 against room for a few of them
    # (the exact cost boundary: test_gateway_hostile.test_cost_exact_boundary)
    budget = Budget(max_total_tokens=1000)
    figures = run_flood(half_open=0, big=0, dense=0, valid=40, budget=budget, responder=worst_case)
    program, usage = figures["program"], figures["usage"]
    assert figures["exit_code"] == 0, figures["stderr_tail"]
    ok = sum(s.get("200", 0) for s in program["statuses"].values())
    refused = sum(s.get("402", 0) for s in program["statuses"].values())
    assert ok + refused == 80 and ok >= 1
    assert usage["calls"] == ok and usage["refused"] == refused + (program["after"] == 402)
    assert usage["total_tokens"] <= 1000
