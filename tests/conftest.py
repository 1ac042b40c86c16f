"""Shared fixtures: the loopback LLM test server and running compiled packages.

``run_package`` runs a compiled package the way a user does
(``python -m mas2c_<name> --input in.json --output out.json --trace trace.jsonl``)
in a subprocess with a clean environment. Its PYTHONPATH also holds a decoy
``mas2c`` package that fails on import, so every run proves that compiled code
never imports mas2c.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mas2c.compile import Build, compile_spec
from mas2c.spec import Spec
from mas2c.testserver import LLMTestServer, default_responder
from mas2c.validate import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
EXAMPLES = sorted(SPECS.glob("*.yaml"))
EXAMPLE_NAMES = [path.stem for path in EXAMPLES]

_DECOY = "raise ImportError('compiled code must not import mas2c (it must run without it)')\n"
_decoy_dir: Path | None = None


def _decoy_path() -> Path:
    """A folder whose `mas2c` package refuses to be imported (created once per process)."""
    global _decoy_dir
    if _decoy_dir is None:
        folder = Path(tempfile.mkdtemp(prefix="mas2c-decoy-"))
        (folder / "mas2c").mkdir()
        (folder / "mas2c" / "__init__.py").write_text(_DECOY, encoding="utf-8")
        _decoy_dir = folder
    return _decoy_dir


def example_path(name: str) -> Path:
    return SPECS / f"{name}.yaml"


def example_spec(name: str) -> Spec:
    return load_spec(example_path(name))


def compile_to(spec: Spec, folder: Path) -> Build:
    """Compile `spec` and write the package into `folder` (replaced whole)."""
    build = compile_spec(spec)
    build.write(folder)
    return build


def package_of(build_dir: Path) -> str:
    manifest = json.loads((build_dir / "MANIFEST.json").read_text(encoding="utf-8"))
    return str(manifest["package"])


def run_package(
    build_dir: Path,
    input: Any,
    server: LLMTestServer | None,
    env: dict[str, str | None] | None = None,
    timeout: float = 60,
) -> tuple[int, dict[str, Any], list[dict[str, Any]], str]:
    """Run a compiled package; returns (exit code, out.json, trace events, stderr).

    `input` is JSON data written to in.json, or a `str` written as is (for bad input).
    `env` adds variables to the clean environment (a None value removes one).
    """
    build_dir = Path(build_dir)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=build_dir.parent))
    in_file, out_file, trace_file = work / "in.json", work / "out.json", work / "trace.jsonl"
    in_file.write_text(input if isinstance(input, str) else json.dumps(input), encoding="utf-8")
    clean: dict[str, str | None] = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(work)),
        "OPENAI_API_KEY": "test",
        "MAS2C_RETRY_BASE_S": "0.01",
        "PYTHONPATH": f"{build_dir}{os.pathsep}{_decoy_path()}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if server is not None:
        clean["OPENAI_BASE_URL"] = server.base_url
    clean.update(env or {})
    cmd = [sys.executable, "-m", package_of(build_dir), "--input", str(in_file)]
    cmd += ["--output", str(out_file), "--trace", str(trace_file)]
    proc = subprocess.run(
        cmd,
        cwd=work,
        env={k: v for k, v in clean.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out_file.exists(), f"out.json not written (exit {proc.returncode}):\n{proc.stderr}"
    out = json.loads(out_file.read_text(encoding="utf-8"))
    lines = trace_file.read_text(encoding="utf-8").splitlines() if trace_file.exists() else []
    return proc.returncode, out, [json.loads(line) for line in lines], proc.stderr


def events(trace: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in trace if event.get("event") == name]


@pytest.fixture(scope="session")
def llm_server_session() -> Iterator[LLMTestServer]:
    """One loopback LLM server per test process (each xdist worker has its own)."""
    with LLMTestServer() as server:
        yield server


@pytest.fixture
def llm_server(llm_server_session: LLMTestServer) -> Iterator[LLMTestServer]:
    """The session's server, reset for this test: default responder, no latency, no counts."""
    server = llm_server_session
    server.responder = default_responder
    server.latency_s = 0.0
    server.reset_counters()
    yield server
    server.responder = default_responder
    server.latency_s = 0.0
