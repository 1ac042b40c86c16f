"""Egress by allowlist, secrets outside (issue 14 item 5).

A loopback HTTP server plays the external API. In-process tests drive the runtime's
helper (templates/_egress.py) against a real gateway socket; the Docker test runs a
compiled system whose code tool calls the API, and checks that the secret reached the
API but never the sandbox, the run folder or the trace.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mas2c.gateway import EgressPolicy, EgressRule, Gateway, GatewayError, read_secrets_file
from mas2c.testserver import LLMTestServer

SECRET = "s3cr3t-W3ather-K3y-9Qz"
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


class Api:
    """The 'external API': records what it receives, echoes the credentials back."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                entry = {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                api.seen.append(entry)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", "http://198.51.100.7/steal")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps({"forecast": "sunny", "you_sent": entry}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Echo-Auth", str(entry["auth"]))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Api:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api() -> Iterator[Api]:
    with Api() as a:
        yield a


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="gwe", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mas2c_egress_helper", TEMPLATES / "_egress.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gateway(api: Api, sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    rules = {
        "weather": EgressRule(frozenset({f"127.0.0.1:{api.port}"}), ("WEATHER_KEY",)),
        "other": EgressRule(frozenset({f"localhost:{api.port}"})),
    }
    policy = EgressPolicy(rules, {"WEATHER_KEY": SECRET})
    with LLMTestServer() as srv:
        from mas2c.gateway import HttpUpstream

        gw = Gateway(sockdir / "gw.sock", HttpUpstream(srv.base_url, None), egress=policy)
        with gw:
            monkeypatch.setenv("MAS2C_LLM_SOCKET", str(gw.socket_path))
            yield gw


def test_declared_host_gets_the_secret_the_tool_never_sees_it(api: Api, gateway: Gateway) -> None:
    eg = helper()
    url = f"http://127.0.0.1:{api.port}/forecast?city=Paris&key=${{WEATHER_KEY}}"
    r = eg.http(
        "weather",
        "POST",
        url,
        headers={"Authorization": "Bearer ${WEATHER_KEY}"},
        json_body={"token": "${WEATHER_KEY}", "city": "Paris"},
    )
    assert r.status == 200 and r.json()["forecast"] == "sunny"
    seen = api.seen[-1]  # the API received the real secret, everywhere it was asked for
    assert seen["path"] == f"/forecast?city=Paris&key={SECRET}"
    assert seen["auth"] == f"Bearer {SECRET}"
    assert json.loads(seen["body"]) == {"token": SECRET, "city": "Paris"}
    # ... and its echo of the secret comes back redacted
    assert SECRET not in r.text and SECRET not in json.dumps(r.headers)
    assert "<redacted>" in r.text and "<redacted>" in r.headers["x-echo-auth"]
    assert gateway.usage()["egress"] == {"requests": 1, "refused": 0, "failed": 0}


def test_undeclared_hosts_tools_and_tricks_are_refused(api: Api, gateway: Gateway) -> None:
    eg = helper()
    cases = [
        ("weather", f"http://localhost:{api.port}/x", "may not reach localhost"),  # other tool's
        ("weather", f"http://127.0.0.1:{api.port + 1}/x", "may not reach"),  # another port
        ("weather", "https://example.com/", "may not reach example.com"),
        ("weather", f"http://u:p@127.0.0.1:{api.port}/x", "must not carry credentials"),
        ("weather", f"ftp://127.0.0.1:{api.port}/x", "http:// or https://"),
        ("nobody", f"http://127.0.0.1:{api.port}/x", "declares no egress"),
    ]
    for tool, url, message in cases:
        with pytest.raises(eg.EgressError, match=message):
            eg.http(tool, "GET", url)
    assert api.seen == []
    assert gateway.usage()["egress"]["refused"] == len(cases)


def test_secrets_stay_with_their_tool_and_redirects_are_not_followed(
    api: Api, gateway: Gateway
) -> None:
    eg = helper()
    # "other" declares no secret: the placeholder goes out as written
    r = eg.http("other", "GET", f"http://localhost:{api.port}/x?k=${{WEATHER_KEY}}")
    assert r.status == 200 and api.seen[-1]["path"] == "/x?k=${WEATHER_KEY}"
    r = eg.http("weather", "GET", f"http://127.0.0.1:{api.port}/redirect?k=${{WEATHER_KEY}}")
    assert r.status == 302 and len(api.seen) == 2  # the undeclared Location is not fetched


def test_missing_secret_is_a_clear_error(api: Api, sockdir: Path, monkeypatch: Any) -> None:
    rules = {"weather": EgressRule(frozenset({f"127.0.0.1:{api.port}"}), ("WEATHER_KEY",))}
    monkeypatch.delenv("WEATHER_KEY", raising=False)
    monkeypatch.delenv("MAS2C_SECRETS_FILE", raising=False)
    policy = EgressPolicy.from_host(rules)
    with LLMTestServer() as srv:
        from mas2c.gateway import HttpUpstream

        with Gateway(sockdir / "gw.sock", HttpUpstream(srv.base_url, None), egress=policy) as gw:
            monkeypatch.setenv("MAS2C_LLM_SOCKET", str(gw.socket_path))
            eg = helper()
            with pytest.raises(eg.EgressError, match="secret WEATHER_KEY is not set on the host"):
                eg.http("weather", "GET", f"http://127.0.0.1:{api.port}/?k=${{WEATHER_KEY}}")
    assert api.seen == []


def test_secrets_come_from_the_file_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = {"t": EgressRule(frozenset({"h"}), ("A", "B", "C"))}
    env_file = tmp_path / "secrets.env"
    env_file.write_text("# secrets\nA=from-file\nexport B='quoted'\nUNUSED=x\n")
    monkeypatch.setenv("MAS2C_SECRETS_FILE", str(env_file))
    monkeypatch.setenv("A", "from-env")
    monkeypatch.setenv("C", "env-only")
    assert EgressPolicy.from_host(rules).secrets == {
        "A": "from-file",
        "B": "quoted",
        "C": "env-only",
    }
    js = tmp_path / "secrets.json"
    js.write_text('{"A": "json"}')
    assert read_secrets_file(js) == {"A": "json"}
    js.write_text('{"A": 1}')
    with pytest.raises(GatewayError, match="object of strings"):
        read_secrets_file(js)


EGRESS_SPEC = """\
spec_version: "1"
name: egress-demo
description: One code tool calls an external API with a host secret.
inputs:
  city: {type: string}
outputs:
  forecast: forecast
models:
  m: {model: test-model}
agents:
  unused: {role: Idle, instructions: Not called., model: m}
tools:
  weather:
    description: The forecast for a city.
    egress: {hosts: ["127.0.0.1:PORT"], secrets: [WEATHER_KEY]}
    code: |
      def weather(city: str) -> dict:
          import os
          from ._egress import http
          r = http("weather", "GET", "http://127.0.0.1:PORT/forecast?city=" + city,
                   headers={"Authorization": "Bearer ${WEATHER_KEY}"})
          seen = []
          for pid in os.listdir("/proc"):
              if pid.isdigit():
                  try:
                      with open(f"/proc/{pid}/environ", "rb") as f:
                          seen.append(f.read().decode(errors="replace"))
                  except OSError:
                      pass
          return {"status": r.status, "api": r.json(), "env": dict(os.environ), "proc": seen}
workflow:
  - {id: fetch, kind: tool, tool: weather, args: {city: "{{ city }}"}, out: forecast}
"""


@pytest.mark.docker
@pytest.mark.usefixtures("docker_ready")
def test_docker_tool_reaches_the_api_and_the_secret_stays_outside(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mas2c.run import LLMConfig, run_system

    spec = tmp_path / "spec.yaml"
    spec.write_text(EGRESS_SPEC.replace("PORT", str(api.port)))
    (tmp_path / "in.json").write_text('{"city": "Paris"}')
    monkeypatch.setenv("WEATHER_KEY", SECRET)
    run_dir = tmp_path / "run"
    with LLMTestServer() as srv:
        outcome = run_system(
            spec,
            tmp_path / "in.json",
            run_dir,
            llm=LLMConfig(url=srv.base_url, api_key="sk-unused"),
            on_warning=lambda msg: None,
        )
    assert outcome.ok, (run_dir / "stderr.txt").read_text()
    forecast = outcome.result["outputs"]["forecast"]
    assert forecast["status"] == 200 and forecast["api"]["forecast"] == "sunny"
    assert api.seen[-1]["auth"] == f"Bearer {SECRET}"  # the API got the secret
    assert forecast["api"]["you_sent"]["auth"] == "Bearer <redacted>"
    assert "WEATHER_KEY" not in forecast["env"]
    assert not any(SECRET in environ for environ in forecast["proc"])
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "trace.jsonl" for p in files)
    for path in files:  # result, trace, usage, stdout/stderr, spec, build...
        assert SECRET.encode() not in path.read_bytes(), path
    assert outcome.usage["egress"] == {"requests": 1, "refused": 0, "failed": 0}


def test_egress_requests_per_run_are_capped(api: Api, sockdir: Path, monkeypatch: Any) -> None:
    rules = {"weather": EgressRule(frozenset({f"127.0.0.1:{api.port}"}))}
    policy = EgressPolicy(rules, {}, max_requests=2)
    with LLMTestServer() as srv:
        from mas2c.gateway import HttpUpstream

        with Gateway(sockdir / "gw.sock", HttpUpstream(srv.base_url, None), egress=policy) as gw:
            monkeypatch.setenv("MAS2C_LLM_SOCKET", str(gw.socket_path))
            eg = helper()
            for _ in range(2):
                assert eg.http("weather", "GET", f"http://127.0.0.1:{api.port}/").status == 200
            with pytest.raises(eg.EgressError, match="2 requests per run"):
                eg.http("weather", "GET", f"http://127.0.0.1:{api.port}/")
            assert gw.usage()["egress"] == {"requests": 2, "refused": 1, "failed": 0}
    assert len(api.seen) == 2


def test_spec_egress_is_validated() -> None:
    from pydantic import ValidationError

    from mas2c.lang.spec import Tool

    Tool.model_validate({"code": "def t(): pass", "egress": {"hosts": ["api.x.com:8443"]}})
    bad = [
        {"builtin": "python_exec", "egress": {"hosts": ["api.x.com"]}},  # not a code tool
        {"code": "def t(): pass", "egress": {"hosts": []}},
        {"code": "def t(): pass", "egress": {"hosts": ["http://api.x.com/"]}},
        {"code": "def t(): pass", "egress": {"hosts": ["a.com"], "secrets": ["not-a-name"]}},
    ]
    for data in bad:
        with pytest.raises(ValidationError):
            Tool.model_validate(data)
