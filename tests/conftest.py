"""Shared fixtures: the loopback LLM test server and running compiled packages.

``run_package`` runs a compiled package the way a user does
(``python -m mas2c_<name> --input in.json --output out.json --trace trace.jsonl``)
in a subprocess with a clean environment. Its PYTHONPATH also holds a decoy
``mas2c`` package that fails on import, so every run proves that compiled code
never imports mas2c.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from mas2c.compile import Build, compile_spec, runtime_files
from mas2c.lang.spec import Spec
from mas2c.lang.validate import load_spec
from mas2c.testserver import LLMTestServer, default_responder

# Started in the background by a non-interactive shell (`pytest ... &`), this process (and
# every xdist worker and CLI it starts) inherits SIGINT ignored: Ctrl-C would then reach no
# run, and the interrupt tests would test nothing. A test session takes Ctrl-C as Python's
# default does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent
# Subprocesses (`python -m mas2c.cli ...`) import mas2c from this checkout too, not from
# whatever an editable install points at.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
)
SPECS = ROOT / "specs"

# Under CI, Hypothesis is derandomized (a failure reproduces on the next run) and prints the
# blob to reproduce a failing example; `@settings` on a test still sets its example count.
# Nothing in it depends on the machine's speed: no deadline, no "too slow" health check.
settings.register_profile(
    "ci",
    derandomize=True,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI=true a skip is a failure: every component a test needs must be there
    (a missing daemon, package or runtime would otherwise pass as "skipped")."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a skip is a failure in CI): {reason}"


_RUNTIME_PACKAGE = "mas2c_runtime_under_test"


def load_runtime(module: str = "_runtime") -> Any:
    """The runtime (all its modules, as a compiled package carries them) imported in-process
    as the package `mas2c_runtime_under_test`; returns its `module` (`_runtime`, `_voting`)."""
    import importlib

    if _RUNTIME_PACKAGE not in sys.modules:
        folder = Path(tempfile.mkdtemp(prefix="runtime-")) / _RUNTIME_PACKAGE
        folder.mkdir()
        atexit.register(shutil.rmtree, folder.parent, True)
        (folder / "__init__.py").write_text("")
        for name, text in runtime_files().items():
            (folder / name).write_text(text, encoding="utf-8")
        sys.path.insert(0, str(folder.parent))
    return importlib.import_module(f"{_RUNTIME_PACKAGE}.{module}")


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
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
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
    *,
    fork: bool = False,
) -> tuple[int, dict[str, Any], list[dict[str, Any]], str]:
    """Run a compiled package; returns (exit code, out.json, trace events, stderr).

    `input` is JSON data written to in.json, or a `str` written as is (for bad input).
    `env` adds variables to the clean environment (a None value removes one).
    `fork`: fork the run from a process with openai already imported (much faster;
    for property tests that run many packages) instead of a fresh interpreter.
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
    full_env = {k: v for k, v in clean.items() if v is not None}
    if fork:
        returncode, stderr = _fork_run(cmd, work, full_env, timeout)
    else:
        proc = subprocess.run(
            cmd, cwd=work, env=full_env, capture_output=True, text=True, timeout=timeout
        )
        returncode, stderr = proc.returncode, proc.stderr
    assert out_file.exists(), f"out.json not written (exit {returncode}):\n{stderr}"
    out = json.loads(out_file.read_text(encoding="utf-8"))
    # Split on "\n" only: JSON text may hold U+2028, U+0085 ..., which splitlines() breaks on.
    text = trace_file.read_text(encoding="utf-8") if trace_file.exists() else ""
    trace = [json.loads(line) for line in text.split("\n") if line.strip()]
    return returncode, out, trace, stderr


_ZYGOTE = r"""
import json, os, runpy, sys, traceback
import httpx, openai  # imported once here, inherited by every forked run
del httpx, openai
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.path[:0] = job["path"]
            sys.argv = [job["module"], *job["args"]]
            try:
                runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""
_zygote: subprocess.Popen[str] | None = None


def _fork_run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run `python -m PKG ARGS` as a child forked from a process that has openai imported.

    The same as a fresh interpreter for the package (own process, environment, cwd,
    sys.path from PYTHONPATH), without paying the openai import (about a second) per run.
    """
    global _zygote
    if _zygote is None or _zygote.poll() is not None:
        _zygote = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            cwd=tempfile.gettempdir(),  # not the checkout: its mas2c/ must stay out of reach
        )
        atexit.register(_zygote.kill)
    assert _zygote.stdin is not None and _zygote.stdout is not None
    module, args = cmd[2], cmd[3:]
    job = {
        "cwd": str(cwd),
        "env": env,
        "path": env.get("PYTHONPATH", "").split(os.pathsep),
        "module": module,
        "args": args,
        "stdout": str(cwd / "stdout.txt"),
        "stderr": str(cwd / "stderr.txt"),
    }
    _zygote.stdin.write(json.dumps(job) + "\n")
    _zygote.stdin.flush()
    ready, _, _ = select.select([_zygote.stdout], [], [], timeout)
    if not ready:
        _zygote.kill()
        raise TimeoutError(f"the forked run did not finish in {timeout} s")
    code = int(json.loads(_zygote.stdout.readline()))
    return code, (cwd / "stderr.txt").read_text(encoding="utf-8", errors="replace")


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


# -- shared by the CLI and sandbox tests ------------------------------------------------------------

SECRET = "sk-test-secret-123"  # a fake API key: it must reach the upstream and never the sandbox


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """Skip without a Docker daemon and the sandbox image, but FAIL under CI=true."""
    from mas2c import sandbox

    st = sandbox.status()
    problem = None
    if not st["daemon"]["reachable"]:
        problem = st["daemon"]["error"]
    elif not st["image"]["present"]:
        problem = f"the sandbox image {sandbox.DEFAULT_IMAGE} is missing (mas2c sandbox build)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Docker is required under CI: {problem}")
        pytest.skip(f"Docker not available: {problem}")


def cli_env(**extra: str) -> dict[str, str]:
    """The host environment without any LLM endpoint settings, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OPENAI_") and k not in ("MAS2C_MODEL", "MAS2C_LOCAL_MODEL")
    }
    env.update(extra)
    return env


def mas2c(
    *args: str | Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    inprocess: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI: in a subprocess (`python -m mas2c.cli`), or in this process through
    `mas2c.cli.main` (faster; for the commands that run no sandbox). Either way the
    environment is exactly `env` (default: no endpoint settings, a test key)."""
    argv = [str(a) for a in args]
    env = env if env is not None else cli_env(OPENAI_API_KEY=SECRET)
    if not inprocess:
        return subprocess.run(
            [sys.executable, "-m", "mas2c.cli", *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    from mas2c.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def cli_document(proc: subprocess.CompletedProcess[str]) -> Any:
    """The one JSON document a `--json` command printed, without its `ok` flag (checked
    against the exit code: ok exactly when the command exits 0)."""
    document = json.loads(proc.stdout)
    assert isinstance(document, dict) and document.pop("ok") is (proc.returncode == 0), proc.stdout
    return document


def private_null(folder: Path) -> Path:
    """A character device like /dev/null inside `folder` (root can make one; else the real
    /dev/null): a regression then breaks only this node, not the machine's /dev/null."""
    node = folder / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        return Path("/dev/null")
    return node
