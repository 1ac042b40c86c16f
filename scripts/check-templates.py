"""ruff and mypy --strict over the runtime modules a compiled package carries.

The runtime modules import each other relatively (`from ._accounting import ...`), so
they are checked as the package they become: copied into a temporary package with
every runtime module (`mas2c.compile.runtime_files()`) and `templates/_egress.py`.
Run by scripts/test.sh; exit status 1 when ruff or mypy finds a problem.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mas2c.compile import runtime_files, templates_dir  # noqa: E402


def main() -> int:
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="check-templates-") as tmp:
        package = Path(tmp) / "mas2c_runtime_check"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for name, text in runtime_files().items():
            (package / name).write_text(text, encoding="utf-8")
        for extra in sorted(templates_dir().glob("_*.py")):
            if extra.name not in runtime_files():
                (package / extra.name).write_text(extra.read_text("utf-8"), encoding="utf-8")
        ruff = [str(bin_dir / "ruff"), "check", "--no-cache", str(ROOT / "templates")]
        mypy = [str(bin_dir / "mypy"), "--strict", "--no-incremental", str(package)]
        status = 0
        for command in (ruff, mypy):
            print("==", " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)))
            status |= subprocess.run(command, cwd=tmp).returncode
        return 1 if status else 0


if __name__ == "__main__":
    raise SystemExit(main())
