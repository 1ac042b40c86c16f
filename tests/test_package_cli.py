"""The command line of a compiled package: pipes, exit codes, --version, --help, the
environment it documents, and the package installed by pip (console script, checkpoints).

Every run is a real subprocess (`python -m mas2c_<name>` or the console script) against
the loopback `LLMTestServer`, with a clean environment whose PYTHONPATH holds a decoy
`mas2c` that fails on import.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, ROOT, _decoy_path, compile_to, example_spec, private_null

from mas2c import __version__, package_docs
from mas2c.lang.spec import Spec
from mas2c.testserver import LLMTestServer
from mas2c.values import input_problems

NOISY = {
    "spec_version": "1",
    "name": "cli-noisy",
    "inputs": {"question": {"type": "string"}},
    "outputs": {"answer": "answer", "shout": "shout"},
    "models": {"m": {"model": "test-model"}},
    "agents": {"a": {"role": "Answerer", "model": "m"}},
    "tools": {
        "shout": {
            "code": (
                "def shout(text: str) -> str:\n"
                "    import os\n"
                "    print('noise from print')\n"
                "    os.write(1, b'noise from fd 1\\n')\n"
                "    return text.upper()\n"
            )
        }
    },
    "workflow": [
        {"id": "ask", "kind": "call", "agent": "a", "prompt": "{{ question }}", "out": "answer"},
        {
            "id": "loud",
            "kind": "tool",
            "tool": "shout",
            "args": {"text": "{{ answer }}"},
            "out": "shout",
        },
    ],
    "budgets": {"max_llm_calls": 4},
}
PACKAGE = "mas2c_cli_noisy"


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("noisy")
    compile_to(Spec.model_validate(NOISY), folder)
    return folder


@pytest.fixture
def server(llm_server: LLMTestServer) -> Iterator[LLMTestServer]:
    yield llm_server


def env_for(build: Path, server: LLMTestServer | None, **extra: str | None) -> dict[str, str]:
    env: dict[str, str | None] = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": f"{build}{os.pathsep}{_decoy_path()}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MAS2C_RETRY_BASE_S": "0.01",
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": server.base_url if server else None,
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def package(
    build: Path,
    *args: str | Path,
    server: LLMTestServer | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
    **env: str | None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", PACKAGE, *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env_for(build, server, **env),
        cwd=cwd or build,
        timeout=60,
    )


def test_pipes_carry_only_the_result(build: Path, server: LLMTestServer) -> None:
    proc = package(
        build, "--input", "-", "--output", "-", server=server, stdin='{"question": "hi"}'
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert (
        result["status"] == "ok"
        and result["outputs"]["shout"] == result["outputs"]["answer"].upper()
    )
    assert proc.stdout.startswith("{") and proc.stdout.endswith("}\n")
    assert "noise from print" in proc.stderr and "noise from fd 1" in proc.stderr
    assert not (build / "-").exists() and not (build / "out.json").exists()


def test_output_to_a_device_writes_in_place(
    build: Path, server: LLMTestServer, tmp_path: Path
) -> None:
    """`--output /dev/null`: an atomic write's rename would replace the device node with
    a regular file (as root, for the whole machine); a device is written in place."""
    null = private_null(tmp_path)
    proc = package(
        build, "--input", "-", "--output", null, server=server, stdin='{"question": "hi"}'
    )
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(os.stat(null).st_mode)


def test_exit_codes_and_the_result_file(build: Path, server: LLMTestServer, tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text('{"question": "hi"}')
    cases: list[tuple[list[str], str | None, int, str, str | None]] = [
        ([], None, 0, "ok", None),
        (["--max-llm-calls", "0"], None, 3, "budget_exceeded", "budget_calls"),
        (["--timeout-s", "0.3"], "slow", 4, "timeout", "run_timeout"),
        (["--input", str(tmp_path / "missing.json")], None, 2, "bad_input", "bad_input"),
        ([], "400", 1, "error", "llm_error"),
    ]
    for extra, fault, code, status, error_code in cases:
        server.latency_s = 2.0 if fault == "slow" else 0.0
        if fault == "400":
            server.inject("status", status=400)
        out = tmp_path / f"out-{code}.json"
        args = ["--input", str(tmp_path / "in.json"), *extra, "--output", str(out)]
        proc = package(build, *args, server=server)
        assert proc.returncode == code, (extra, proc.stderr)
        result = json.loads(out.read_text())
        assert result["status"] == status
        assert (result.get("error") or {}).get("code") == error_code
        assert "Traceback" not in proc.stderr
    for text in ("{nope", "[1]", '{"question": 3}'):
        proc = package(build, "--input", "-", "--output", "-", server=server, stdin=text)
        assert proc.returncode == 2 and json.loads(proc.stdout)["status"] == "bad_input"


def test_no_key_no_socket_is_exit_2_before_any_request(build: Path, server: LLMTestServer) -> None:
    proc = package(
        build, "--input", "-", "--output", "-", server=server, stdin='{"question": "hi"}',
        OPENAI_API_KEY=None,
    )  # fmt: skip
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["code"] == "no_credentials"
    assert "OPENAI_API_KEY" in proc.stderr and "MAS2C_LLM_SOCKET" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert server.requests == []  # never a placeholder key sent anywhere


def test_version_names_package_compiler_and_spec(build: Path) -> None:
    manifest = json.loads((build / "MANIFEST.json").read_text())
    proc = package(build, "--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"python -m {PACKAGE} {package_docs.PACKAGE_VERSION} ")
    assert f"mas2c {__version__}" in proc.stdout
    assert f"sha256:{manifest['spec_sha256']}" in proc.stdout


def test_help_documents_every_variable_and_an_example(build: Path) -> None:
    proc = package(build, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"usage: python -m {PACKAGE} ")
    for name in runtime_environment():
        assert name in proc.stdout, name
    assert """echo '{"question": "<question>"}' | python -m""" in proc.stdout
    for flag in ("--input", "--output", "--trace", "--checkpoint-dir", "--max-llm-calls"):
        assert flag in proc.stdout
    bad = package(build, "--trace", "-")
    assert bad.returncode == 2 and "stdout is only for the result" in bad.stderr


def test_an_unwritable_output_is_a_clear_exit_2(build: Path, server: LLMTestServer) -> None:
    proc = package(
        build, "--input", "-", "--output", "/proc/nope/out.json", server=server,
        stdin='{"question": "hi"}',
    )  # fmt: skip
    assert proc.returncode == 2 and "cannot write the result" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("output", ["missing/dir/out.json", "folder", "dangling.json"])
def test_an_output_into_a_missing_folder_is_refused_before_the_run(
    build: Path, server: LLMTestServer, tmp_path: Path, output: str
) -> None:
    """`--output missing/dir/out.json` ran the system (LLM calls paid for) and then
    created the folders; a folder as the output failed only after the run. Now either
    is a usage error (exit 2) before the first LLM call, and no folder is made."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "dangling.json").symlink_to("nowhere/out.json")
    proc = package(
        build, "--input", "-", "--output", output, server=server, cwd=tmp_path,
        stdin='{"question": "hi"}',
    )  # fmt: skip
    assert proc.returncode == 2 and "cannot write the result" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and server.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.json", "folder"]


# -- what the package documents -----------------------------------------------------------------

_READS = (
    re.compile(r"""os\.environ(?:\.get)?\s*[\[(]\s*["']([A-Z0-9_]+)["']"""),
    re.compile(r"""_env_number\(\s*["']([A-Z0-9_]+)["']"""),
    re.compile(r"""\benv\.get\(\s*["']([A-Z0-9_]+)["']"""),
    re.compile(r"""^[A-Z_]+_ENV\s*=\s*["']([A-Z0-9_]+)["']""", re.MULTILINE),
)


def runtime_environment() -> set[str]:
    """Every environment variable name the runtime modules read (found in their source)."""
    names: set[str] = set()
    for path in (ROOT / "templates").glob("_*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in _READS:
            names |= set(pattern.findall(text))
    return names


def test_every_variable_the_runtime_reads_is_documented() -> None:
    documented = {name for name, _ in package_docs.environment()}
    read = runtime_environment()
    assert {"OPENAI_API_KEY", "MAS2C_LLM_TIMEOUT_S", "MAS2C_MAX_ATTEMPTS"} <= read
    assert read <= documented, f"undocumented: {sorted(read - documented)}"
    assert documented <= read, f"documented but never read: {sorted(documented - read)}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_input_fits_the_schema_and_readme_documents_it(path: Path) -> None:
    from mas2c.compile import compile_spec

    spec = example_spec(path.stem)
    example = package_docs.example_input(spec.inputs)
    assert input_problems(example, spec.inputs) == []
    build = compile_spec(spec)
    readme = build.files["README.md"].decode("utf-8")
    for name, _ in package_docs.environment():
        assert f"`{name}`" in readme
    assert json.dumps(example, indent=2, sort_keys=True, ensure_ascii=False) in readme
    assert f"from {build.package} import arun, run_sync" in readme
    assert "## Use it as a library" in readme and "--output -" in readme


def test_example_values_follow_the_schema() -> None:
    schema: dict[str, Any] = {
        "a": {"type": "integer", "minimum": 5, "maximum": 9},
        "b": {"type": "number", "exclusiveMinimum": 2.5},
        "c": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 2},
        "d": {
            "type": "object",
            "properties": {"k": {"type": "boolean"}, "o": {}},
            "required": ["k"],
        },
        "e": {"type": ["null", "string"], "minLength": 12, "maxLength": 20},
        "f": {"type": "string", "examples": ["given"]},
        "g": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "h": {"type": "string", "default": "dflt"},
    }
    example = package_docs.example_input(schema)
    assert input_problems(example, schema) == []
    assert example["c"] == ["x", "x"] and example["d"] == {"k": False} and example["f"] == "given"


# -- installed by pip --------------------------------------------------------------------------


def test_installed_package_console_script_and_no_checkpoints_in_site_packages(
    tmp_path: Path, server: LLMTestServer
) -> None:
    build = tmp_path / "build"
    built = compile_to(example_spec("chain-of-thought"), build)
    target = tmp_path / "site-packages"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(build)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    script = target / "bin" / built.package.replace("_", "-")
    env = env_for(target, server)
    help_ = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert help_.returncode == 0 and help_.stdout.startswith(f"usage: {script.name} "), help_.stdout
    version = subprocess.run(
        [sys.executable, str(script), "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert version.stdout.startswith(f"{script.name} 1.0.0 ")
    # a checkpoints/ folder inside site-packages is never used; in the build folder it is
    (target / "checkpoints").mkdir()
    (build / "checkpoints").mkdir()
    probe = "from {pkg} import _runtime; print(_runtime.checkpoint_dir(None))"
    for where, expected in (
        (target, "(None, False)"),
        (build, f"({build / 'checkpoints'!r}, False)"),
    ):
        code = probe.format(pkg=built.package)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env_for(where, None),
            cwd=tmp_path, timeout=60,
        )  # fmt: skip
        assert out.stdout.strip() == expected, out.stderr
    run = subprocess.run(
        [sys.executable, str(script), "--input", "-", "--output", "-"], input='{"question": "q"}',
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0 and json.loads(run.stdout)["status"] == "ok", run.stderr


def test_the_generated_readme_example_runs_as_written(
    tmp_path: Path, server: LLMTestServer
) -> None:
    """The package README's library example, copied and pasted, runs against an endpoint."""
    build = tmp_path / "build"
    compile_to(example_spec("chain-of-thought"), build)
    readme = (build / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"^```python\n(.*?)^```$", readme, re.MULTILINE | re.DOTALL)
    (tmp_path / "example.py").write_text(block, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "example.py"], capture_output=True, text=True, cwd=tmp_path,
        env=env_for(build, server), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "['ok', 'ok', 'ok']"
    assert (tmp_path / "trace.jsonl").is_file()
