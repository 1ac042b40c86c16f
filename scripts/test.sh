#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian machine (as root) and runs it:
# the venv, the Docker engine and sandbox image, the embedded model, then ruff, mypy --strict, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --embedded
bash scripts/ensure-docker.sh
bash scripts/setup-observe.sh  # chromium (report tests), Arize Phoenix (OTLP receiver)

echo "== ruff"
.venv/bin/ruff check mas2c tests benchmarks
.venv/bin/ruff format --check mas2c
echo "== mypy --strict mas2c"
.venv/bin/mypy --strict mas2c
echo "== ruff + mypy --strict over templates/ (the runtime modules, and every example compiled)"
.venv/bin/python scripts/check-templates.py
echo "== pytest"
.venv/bin/pytest -q -n 2 "$@"
