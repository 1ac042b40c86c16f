#!/usr/bin/env bash
# What the tests of `mas2c report` and `mas2c export otel` need on a fresh Debian machine (as root):
# headless Chromium (Debian's package) to open the HTML report, and Arize Phoenix (PyPI) in its own
# venv (.venv-phoenix: it pins many packages of its own) as the real OTLP/HTTP receiver.
# Usage: bash scripts/setup-observe.sh      (idempotent: does nothing when both are there)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    echo "setup-observe: installing chromium from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
        --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
if [ ! -x .venv-phoenix/bin/phoenix ]; then
    echo "setup-observe: installing arize-phoenix into .venv-phoenix"
    python3 -m venv .venv-phoenix
    .venv-phoenix/bin/python -m pip install -q --upgrade pip
    .venv-phoenix/bin/python -m pip install -q "arize-phoenix>=12"
fi
echo "setup-observe: $(chromium --version 2>/dev/null | head -1); arize-phoenix $(.venv-phoenix/bin/python -c 'import importlib.metadata as m; print(m.version("arize-phoenix"))')"
