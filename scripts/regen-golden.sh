#!/usr/bin/env bash
# Regenerates tests/golden/<spec-name>/ from every example spec in specs/: the compiler's
# output, byte for byte, that tests/test_compile.py compares against. Run it after a
# deliberate change to the compiler, its templates or the runtime, and review the diff.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" - <<'PY'
import shutil
from pathlib import Path

from mas2c.compile import compile_spec
from mas2c.validate import load_spec

golden = Path("tests/golden")
golden.mkdir(parents=True, exist_ok=True)
names = set()
for path in sorted(Path("specs").glob("*.yaml")):
    build = compile_spec(load_spec(path))
    build.write(golden / path.stem)
    names.add(path.stem)
    print(f"regen-golden: {golden / path.stem} ({len(build.files)} files)")
for stale in sorted(p for p in golden.iterdir() if p.is_dir() and p.name not in names):
    shutil.rmtree(stale)
    print(f"regen-golden: removed {stale} (no such example spec)")
PY
