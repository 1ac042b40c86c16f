#!/usr/bin/env bash
# The main job on a fresh Debian machine (as root): set up, then run mas2c on an example.
# With no OPENAI_BASE_URL it uses the embedded local model (SmolLM2-135M: tiny, slow, weak).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --local
bash scripts/ensure-docker.sh
mas2c=.venv/bin/mas2c
work=${MAS2C_DEMO_DIR:-runs/demo}
mkdir -p "$work"

echo "== validating the example specs"
"$mas2c" validate specs/*.yaml

echo "== the chain-of-thought example as a diagram"
"$mas2c" graph specs/chain-of-thought.yaml

echo "== running it in the Docker sandbox (LLM: ${OPENAI_BASE_URL:-embedded local model})"
printf '%s\n' '{"question": "A farmer has 17 sheep; all but 9 run away. How many are left?"}' > "$work/input.json"
"$mas2c" run specs/chain-of-thought.yaml --input "$work/input.json" --run-dir "$work/run"
