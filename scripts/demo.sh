#!/usr/bin/env bash
# The main job on a fresh Debian machine (as root): set up, then `mas2c solve` a small task
# in the Docker sandbox. With no OPENAI_BASE_URL it uses the embedded model
# (SmolLM2-135M: tiny and weak; it exists so that this runs offline).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --embedded
bash scripts/ensure-docker.sh

work=${MAS2C_DEMO_DIR:-runs/demo}
mkdir -p "$work"
printf '%s\n' '{"question": "What is 12 + 30?"}' > "$work/input.json"
echo "== mas2c solve (LLM: ${OPENAI_BASE_URL:-embedded model}); everything lands in $work/solve"
.venv/bin/mas2c solve "Answer a short arithmetic question with a single number." \
    --input "$work/input.json" --run-dir "$work/solve"
