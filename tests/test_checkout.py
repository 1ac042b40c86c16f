"""The suite certifies the checkout it runs in: mas2c and its templates come from this tree."""

from __future__ import annotations

from pathlib import Path

import mas2c
from mas2c import compile as compiler

ROOT = Path(__file__).resolve().parent.parent


def test_mas2c_is_imported_from_this_checkout() -> None:
    assert Path(mas2c.__file__).resolve().parent == ROOT / "mas2c"


def test_templates_come_from_this_checkout() -> None:
    assert compiler.templates_dir().resolve() == ROOT / "templates"


def test_subprocesses_import_mas2c_from_this_checkout(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import mas2c; print(mas2c.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert Path(out.strip()).resolve().parent == ROOT / "mas2c"
