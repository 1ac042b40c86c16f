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

from mas2c.compile import compile_spec, runtime_files
from mas2c.lang.validate import load_spec

golden = Path("tests/golden")
golden.mkdir(parents=True, exist_ok=True)
names = set()
for path in sorted(Path("specs").glob("*.yaml")):
    build = compile_spec(load_spec(path))
    # The runtime modules are the same in every package: compared with the templates once
    # (tests/test_compile.py), not kept as golden copies.
    runtime = {f"{build.package}/{module}" for module in runtime_files()}
    files = {p: data for p, data in build.files.items() if p not in runtime}
    target = golden / path.stem
    if target.exists():
        shutil.rmtree(target)
    for relative, data in files.items():
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).write_bytes(data)
    names.add(path.stem)
    print(f"regen-golden: {target} ({len(files)} files)")
for stale in sorted(p for p in golden.iterdir() if p.is_dir() and p.name not in names):
    shutil.rmtree(stale)
    print(f"regen-golden: removed {stale} (no such example spec)")
PY
