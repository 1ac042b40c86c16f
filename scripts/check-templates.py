"""ruff and mypy --strict over templates/: the runtime modules and what the .j2 templates render.

1. The runtime modules (`templates/*.py`) import each other relatively (`from ._accounting
   import ...`), so they are checked as the package they become: copied into a temporary
   package with every runtime module (`mas2c.compile.runtime_files()`) and
   `templates/_egress.py`.
2. The Jinja2 templates (`templates/*.j2`, `templates/steps/*.j2`) are checked through their
   output: every example spec in `specs/` is compiled (which renders each template, each
   step kind's emitter and every optional runtime module at least once), and each package is
   checked by ruff (the repository's rules) and by `mypy --strict`.

Run by scripts/test.sh; exit status 1 when ruff or mypy finds a problem.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mas2c.compile import compile_spec, runtime_files, templates_dir  # noqa: E402
from mas2c.lang.validate import load_spec  # noqa: E402


def _runtime_package(folder: Path) -> Path:
    package = folder / "mas2c_runtime_check"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, text in runtime_files().items():
        (package / name).write_text(text, encoding="utf-8")
    for extra in sorted(templates_dir().glob("_*.py")):
        if extra.name not in runtime_files():
            (package / extra.name).write_text(extra.read_text("utf-8"), encoding="utf-8")
    return package


def _compiled_examples(folder: Path) -> list[Path]:
    """Every example spec compiled: its Python files (the rendered templates) written."""
    packages = []
    for spec_path in sorted((ROOT / "specs").glob("*.yaml")):
        build = compile_spec(load_spec(spec_path))
        for relative, data in build.files.items():
            if relative.endswith(".py"):
                target = folder / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        package = folder / build.package
        # The optional runtime modules it does not carry: the core runtime imports them
        # lazily (only where a step needs them), and mypy must see what it imports.
        for name, text in runtime_files().items():
            if not (package / name).exists():
                (package / name).write_text(text, encoding="utf-8")
        packages.append(package)
    # tool_<id>.py holds a spec's tool code verbatim: the spec's code, not a template's.
    verbatim = sorted(f"{p.name}.{m.stem}" for p in packages for m in p.glob("tool_*.py"))
    sections = "".join(f"\n[mypy-{module}]\nignore_errors = True\n" for module in verbatim)
    (folder / "mypy.ini").write_text("[mypy]\nstrict = True\n" + sections)
    return packages


def main() -> int:
    bin_dir = Path(sys.executable).parent
    ruff, mypy = str(bin_dir / "ruff"), str(bin_dir / "mypy")
    config = str(ROOT / "pyproject.toml")
    with tempfile.TemporaryDirectory(prefix="check-templates-") as tmp:
        runtime = _runtime_package(Path(tmp) / "runtime")
        built = Path(tmp) / "built"
        packages = _compiled_examples(built)
        cache = str(Path(tmp) / "mypy-cache")
        commands = [
            [ruff, "check", "--no-cache", str(ROOT / "templates")],
            [mypy, "--strict", "--no-incremental", str(runtime)],
            # The rendered templates: ruff with the repository's rules (the generated files'
            # names are not under tests/golden here, so nothing is excluded).
            [ruff, "check", "--no-cache", "--config", config, str(built)],
            # One mypy run per package: each carries its own copy of the runtime.
            *(
                [mypy, "--config-file", str(built / "mypy.ini"), "--cache-dir", cache, str(p)]
                for p in packages
            ),
        ]
        status = 0
        for command in commands:
            shown = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command))
            print("==", shown.replace(tmp, "$TMP"), flush=True)
            status |= subprocess.run(command, cwd=tmp).returncode
        return 1 if status else 0


if __name__ == "__main__":
    raise SystemExit(main())
