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
