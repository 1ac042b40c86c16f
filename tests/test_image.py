"""`mas2c image`: a compiled system as an OCI image, built for real and run for real.

The image is run the documented way (`--read-only --tmpfs /tmp`, no capabilities,
the key and endpoint passed by environment) against a loopback LLMTestServer, reached
with `--network host` (the test server listens on 127.0.0.1 of the host). Every image
a test builds is removed at the end of that test.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mas2c import image
from mas2c.errors import UsageError
from mas2c.testserver import LLMTestServer, Script
from tests.conftest import cli_env, compile_to, example_spec

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-image-test-0123456789"


def _docker(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )  # type: ignore[call-overload, no-any-return]


@pytest.fixture
def tag() -> Iterator[str]:
    name = f"mas2c-image-test-{uuid.uuid4().hex[:10]}:1"
    yield name
    _docker("rmi", "-f", name)


@pytest.fixture
def build_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "build"
    compile_to(example_spec("chain-of-thought"), folder)
    return folder


def _mas2c(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "mas2c.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(),
        cwd=ROOT,
        check=False,
    )


# -- without Docker: what goes into the image ----------------------------------------------------


def test_context_is_deterministic_and_holds_only_the_build(build_dir: Path) -> None:
    (build_dir / "mas2c_chain_of_thought" / "__pycache__").mkdir()
    (build_dir / "mas2c_chain_of_thought" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (build_dir / "checkpoints").mkdir()
    first = image.context_tar(image.load_system(build_dir))
    second = image.context_tar(image.load_system(build_dir))
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert "Dockerfile" in names
    assert "app/mas2c_chain_of_thought/__main__.py" in names
    assert "app/MANIFEST.json" in names
    assert not any("__pycache__" in n or "checkpoints" in n for n in names)
    assert {(m.uid, m.gid, m.mtime) for m in members} == {(0, 0, 315532800)}
    # The same system compiled from the spec gives the same bytes (nothing of the folder leaks).
    from_spec = image.context_tar(image.load_system(ROOT / "specs" / "chain-of-thought.yaml"))
    assert from_spec == first


def test_edited_build_is_refused_with_the_files_named(build_dir: Path) -> None:
    workflow = build_dir / "mas2c_chain_of_thought" / "workflow.py"
    workflow.write_text(workflow.read_text() + "\n# my edit\n")
    (build_dir / "mas2c_chain_of_thought" / "agents.py").unlink()
    with pytest.raises(UsageError) as err:
        image.load_system(build_dir)
    assert "workflow.py (edited)" in str(err.value)
    assert "agents.py (missing)" in str(err.value)


def test_cli_refuses_a_folder_without_manifest_and_a_bad_tag(tmp_path: Path) -> None:
    proc = _mas2c("image", str(tmp_path), "-t", "x:1", "--json")
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and "no MANIFEST.json" in doc["error"]["message"]
    proc = _mas2c("image", "specs/chain-of-thought.yaml", "-t", "Bad Tag", "--json")
    assert proc.returncode == 2 and "not a valid image name" in proc.stdout
    assert "Traceback" not in proc.stderr


# -- with Docker: built and run ------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.usefixtures("docker_ready")
def test_image_built_and_run_read_only_against_the_test_server(
    build_dir: Path, tag: str, tmp_path: Path
) -> None:
    proc = _mas2c("image", str(build_dir), "-t", tag, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["image"] == tag and doc["package"] == "mas2c_chain_of_thought"

    attrs = json.loads(_docker("image", "inspect", tag).stdout)[0]
    config = attrs["Config"]
    manifest = json.loads((build_dir / "MANIFEST.json").read_text())
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["python3", "-m", "mas2c_chain_of_thought"]
    assert config["Labels"]["mas2c.package"] == "mas2c_chain_of_thought"
    assert config["Labels"]["mas2c.spec_sha256"] == manifest["spec_sha256"]
    assert config["Labels"]["mas2c.version"] == manifest["compiler_version"]
    assert not any(e.startswith(("OPENAI_API_KEY", "OPENAI_BASE_URL")) for e in config["Env"])

    # Deterministic: the same system built again (from the spec this time) gives the same
    # package layer.
    again = image.build(ROOT / "specs" / "chain-of-thought.yaml", tag)
    assert again.package_layer == doc["package_layer"] == attrs["RootFS"]["Layers"][-1]

    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the image's user (1000) writes the result there
    script = Script([(r"2 \+ 2", {"reasoning": "2 and 2 make 4", "answer": "4"})])
    with LLMTestServer(script) as server:
        run = _docker(
            "run", "--rm", "-i", "--read-only", "--tmpfs", "/tmp", "--network", "host",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "-e", "OPENAI_API_KEY", "-e", "OPENAI_BASE_URL",
            "-v", f"{out}:/out",
            tag, "--input", "-", "--output", "-", "--trace", "/out/trace.jsonl",
            input=json.dumps({"question": "What is 2 + 2?"}),
            env={**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": server.base_url},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert len(server.requests) == 1
    result = json.loads(run.stdout)  # the documented line: stdin in, the result on stdout
    assert result["status"] == "ok"
    assert result["outputs"] == {"answer": "4", "reasoning": "2 and 2 make 4"}
    events = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    assert KEY not in (out / "trace.jsonl").read_text() + run.stdout + run.stderr


@pytest.mark.docker
@pytest.mark.usefixtures("docker_ready")
def test_image_with_the_serve_extra_serves_http_read_only(build_dir: Path, tag: str) -> None:
    import socket
    import time

    import httpx

    proc = _mas2c("image", str(build_dir), "-t", tag, "--serve", "--json")
    assert proc.returncode == 0, proc.stderr
    config = json.loads(_docker("image", "inspect", tag).stdout)[0]["Config"]
    assert config["Labels"]["mas2c.serve"] == "1" and "8000/tcp" in config["ExposedPorts"]
    assert config["User"] == "1000:1000"
    with socket.socket() as s:  # a free port on the host's loopback (--network host)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"mas2c-image-test-serve-{uuid.uuid4().hex[:8]}"
    script = Script([(r"2 \+ 2", {"reasoning": "2 and 2 make 4", "answer": "4"})])
    with LLMTestServer(script) as server:
        started = _docker(
            "run", "-d", "--rm", "--name", name, "--read-only", "--tmpfs", "/tmp",
            "--network", "host", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "-e", "OPENAI_API_KEY", "-e", "OPENAI_BASE_URL",
            tag, "serve", "--host", "127.0.0.1", "--port", str(port),
            env={**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": server.base_url},
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(url + "/ok", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, _docker("logs", name).stderr
                time.sleep(0.2)
            r = httpx.post(
                url + "/runs/wait", json={"input": {"question": "What is 2 + 2?"}}, timeout=60
            )
            assert r.status_code == 200, r.text
            assert r.json()["outputs"] == {"answer": "4", "reasoning": "2 and 2 make 4"}
            assert KEY not in r.text
            stopped = _docker("stop", "-t", "20", name)  # SIGTERM: a graceful drain
            assert stopped.returncode == 0, stopped.stderr
        finally:
            _docker("rm", "-f", name)
