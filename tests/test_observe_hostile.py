"""`mas2c report` and `mas2c export otel` on a hostile or truncated run folder.

The folder's trace has invalid lines, a line over the size limit, events of the wrong
types, ids a sandbox forged (not hex, paths, markup), a 100 000-deep array and a torn last
line; its `run.json` breaks the header's contract. Both verbs must work from what can be
read and say what was skipped (the report on the page, the export on stderr), never a
traceback. The export goes to a real OTLP/HTTP endpoint: a loopback HTTP server that
accepts the POST, started here.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from mas2c.cli import main as cli_main


def hostile_folder(folder: Path) -> Path:
    folder.mkdir()
    lines = [
        json.dumps(
            {
                "t": 0,
                "ts": 1,
                "event": "run_start",
                "spec": "x",
                "trace_id": "../../etc/passwd",
                "span_id": "<script>alert(1)</script>",
                "parent_id": 123,
            }
        ),
        "not json {",
        json.dumps({"t": "bad", "event": "step_start", "step": ["a"], "span_id": "zz" * 40}),
        json.dumps(
            {
                "t": 1,
                "event": "step_end",
                "step": "a",
                "pointer": "/workflow/0",
                "status": 7,
                "duration_s": "x",
                "span_id": "0" * 16,
                "parent_id": "0" * 16,
            }
        ),
        json.dumps(
            {
                "t": 1,
                "event": "llm_call",
                "agent": None,
                "model": {"a": 1},
                "prompt_tokens": "many",
                "cost_usd": 1e308,
                "latency_s": -5,
                "span_id": "a" * 16,
                "parent_id": "a" * 16,
            }
        ),
        "x" * (5 * 1024 * 1024),
        json.dumps([1, 2, 3]),
        "[" * 100_000,
        json.dumps({"t": 2, "event": "run_end", "status": "ok", "usage": "lots"}),
        '{"t": 3, "event": "step_end", "step": "torn',
    ]
    (folder / "trace.jsonl").write_text("\n".join(lines))
    header = {"format": "mas2c-run-header/1", "trace_id": "nothex", "span_id": 5}
    (folder / "run.json").write_text(json.dumps({**header, "command": "rm -rf /"}))
    (folder / "result.json").write_text('{"status": "ok", "outputs": [1, 2]}')
    return folder


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        type(self).bodies.append(self.rfile.read(size))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def otlp_receiver() -> Iterator[str]:
    """A loopback OTLP/HTTP endpoint that accepts every POST (its bodies: `_Receiver.bodies`)."""
    _Receiver.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver() -> Iterator[str]:
    with otlp_receiver() as url:
        yield url


def test_report_of_a_hostile_trace_says_what_was_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = hostile_folder(tmp_path / "run")
    assert cli_main(["report", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "trace.jsonl:2: not JSON, skipped" in err  # said on stderr too
    assert cli_main(["report", str(folder), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any("trace.jsonl:6: line too long" in p for p in doc["problems"])
    page = (folder / "report.html").read_text()
    assert "What could not be read" in page
    for skipped in ("trace.jsonl:2: not JSON", "trace.jsonl:6: line too long", "trace.jsonl:8"):
        assert skipped in page
    assert "breaks the run-folder contract" in page and "<script>alert" not in page


def test_export_of_a_hostile_trace_sends_what_it_can_and_warns(
    tmp_path: Path, receiver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = hostile_folder(tmp_path / "run")
    code = cli_main(["export", "otel", str(folder), "--endpoint", receiver, "--timeout", "20"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err
    assert _Receiver.bodies and all(_Receiver.bodies)  # the spans went out
    assert "problem(s) reading the folder" in out
    assert "trace.jsonl:2: not JSON, skipped" in err and "trace.jsonl:6: line too long" in err
    assert "breaks the run-folder contract" in err
    # --json: the same list, as data
    assert cli_main(["export", "otel", str(folder), "--endpoint", receiver, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any("not JSON" in p for p in doc["problems"])


def test_export_of_a_folder_without_a_trace_is_one_clear_error(
    tmp_path: Path, receiver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "trace.jsonl").write_bytes(b"\xff\xfe garbage \x00\n" * 3)
    code = cli_main(["export", "otel", str(folder), "--endpoint", receiver])
    _out, err = capsys.readouterr()
    assert code != 0 and "Traceback" not in err
    assert "no spans to export" in err
    assert not _Receiver.bodies
