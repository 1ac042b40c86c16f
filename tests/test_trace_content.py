"""Run content is opt-in everywhere (issue 16: "prompts and completions opt-in").

A run's content — its inputs, prompts, completions, step outputs (checkpoints), tool
arguments and results, worker tasks and answers, and error messages that quote any of
them — reaches the trace, `run.json`, `mas2c report`'s page, the OpenTelemetry spans and
the progress lines on stderr only with ``--trace-content`` (``MAS2C_TRACE_CONTENT=1``).
The product keeps it (`result.json`, stdout) and so does the checkpoint store
(`checkpoints.jsonl`, documented as content), from which a rectify round resumes.

Each test runs a real `mas2c run` (the CLI, the unisolated sandbox, the scripted loopback
LLM server) whose input carries one sentinel and whose LLM answers carry another, then
greps every artifact for both.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from mas2c.cli import main as cli_main
from mas2c.testserver import ChatRequest, LLMTestServer, Reply, ReplyLike, ToolCall
from tests.test_observe_hostile import _Receiver, otlp_receiver

IN_SENTINEL = "zqxinputsentinel"
OUT_SENTINEL = "zqxanswersentinel"
# Both, in any case (a tool upper-cases the answer), and any JSON escaping of them.
LEAK = re.compile(r"zqx(input|answer)sentinel", re.IGNORECASE)

SPEC = """
spec_version: "1"
name: content-probe
description: Every place run content flows through, once.
inputs:
  question: {type: string}
outputs:
  answer: loud
  checked: checked
  refused: refused
models:
  m: {model: test-model}
agents:
  boss: {role: Boss who delegates, instructions: Delegate., model: m, delegates: [helper]}
  helper: {role: Helper, instructions: Help., model: m}
  strict:
    role: Strict formatter
    instructions: Answer in JSON.
    model: m
    output: {type: object, properties: {ok: {type: boolean}}, required: [ok]}
  plain: {role: Plain answerer, instructions: Answer., model: m}
tools:
  shout:
    description: Upper-case a text.
    code: |
      def shout(text: str) -> str:
          return text.upper()
  picky:
    description: Refuse every text, quoting it.
    code: |
      def picky(text: str) -> str:
          raise ValueError("refused: " + text)
workflow:
  - {id: delegate, kind: call, agent: boss, prompt: "Do {{ question }}", out: done}
  - {id: draft_it, kind: call, agent: plain, prompt: "Draft {{ question }}", out: draft}
  - {id: loud_it, kind: tool, tool: shout, args: {text: "{{ draft }}"}, out: loud}
  - id: risky
    kind: call
    agent: strict
    prompt: "Check {{ question }}"
    out: checked
    fallback:
      - {id: stand_in, kind: call, agent: plain, prompt: "Instead {{ question }}", out: checked}
  - id: pick
    kind: tool
    tool: picky
    args: {text: "{{ draft }}"}
    out: refused
    fallback:
      - {id: unpicked, kind: call, agent: plain, prompt: "Unpicked {{ question }}", out: refused}
budgets: {max_llm_calls: 40}
"""


def respond(req: ChatRequest) -> ReplyLike:
    system = str(req.messages[0].get("content"))
    if "Boss who delegates" in system:
        if any(m.get("role") == "tool" for m in req.messages):
            return f"delegated {OUT_SENTINEL}"
        return Reply(tool_calls=[ToolCall("helper", {"task": f"Help with {OUT_SENTINEL}"})])
    if "Strict formatter" in system:
        return f"not json {OUT_SENTINEL}"  # every try: the error quotes the answer
    return f"answer {OUT_SENTINEL}"


def run_cli(
    tmp_path: Path, name: str, *extra: str, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, str, str]:
    """`mas2c run` of the probe; (run folder, stdout, stderr)."""
    spec = tmp_path / "probe.yaml"
    spec.write_text(SPEC)
    given = tmp_path / "in.json"
    given.write_text(json.dumps({"question": f"what is {IN_SENTINEL}?"}))
    run_dir = tmp_path / name
    capsys.readouterr()
    with LLMTestServer(respond) as server:
        code = cli_main(
            [
                "run",
                str(spec),
                "--input",
                str(given),
                "--sandbox",
                "unisolated",
                "--llm",
                server.base_url,
                "--run-dir",
                str(run_dir),
                *extra,
            ]
        )
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return run_dir, out, err


def span_text(run_dir: Path) -> str:
    """Every exported span's name, attributes and status description, as text."""
    from mas2c.otel import build_spans
    from mas2c.tracing import read_run_trace

    spans = build_spans(read_run_trace(run_dir))
    assert spans
    return json.dumps(
        [[s.name, dict(s.attributes or {}), s.status.description or ""] for s in spans],
        default=str,
    )


@pytest.fixture(autouse=True)
def no_content_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first: `mas2c --trace-content` sets the variable in this process; the undo
    # of setenv removes it again after the test.
    monkeypatch.setenv("MAS2C_TRACE_CONTENT", "0")
    monkeypatch.delenv("MAS2C_TRACE_CONTENT")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-content-key")


def test_without_trace_content_no_artifact_but_the_product_holds_content(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mas2c.report import write_report
    from mas2c.runfolder import Checkpoint, read_checkpoints, read_trace

    run_dir, out, err = run_cli(tmp_path, "plain", capsys=capsys)
    # The product: the outputs (stdout, result.json) carry the answer and the store the
    # steps' values; the probe really sent the sentinels everywhere.
    result = (run_dir / "result.json").read_text()
    assert LEAK.search(out) and LEAK.search(result)
    assert "ZQXANSWERSENTINEL" in json.loads(result)["outputs"]["answer"]
    stored = read_checkpoints(run_dir / "checkpoints.jsonl")
    assert [c.step for c in stored] == ["delegate", "draft_it", "loud_it", "risky", "pick"]
    assert LEAK.search(json.dumps([c.writes for c in stored]))

    # Nothing else: the trace (checkpoint events name their variables only; errors are
    # their type and code), run.json, the progress lines, the report, the spans.
    trace = (run_dir / "trace.jsonl").read_text()
    assert not LEAK.search(trace), LEAK.search(trace)
    typed = read_trace(run_dir / "trace.jsonl")
    checkpoints = typed.of(Checkpoint)
    assert [c.vars for c in checkpoints][:2] == [["done"], ["draft"]]
    assert all(c.writes is None for c in checkpoints)
    events = [json.loads(line) for line in trace.splitlines()]
    failed = [e for e in events if e["event"] == "step_failed"]
    assert [e["code"] for e in failed] == ["structured_output", "tool_error"]
    assert all("message" not in e for e in failed)
    tool_errors = [e["error"] for e in events if e["event"] == "tool_call" and "error" in e]
    assert tool_errors == ["ValueError"]  # the type: its message quotes the argument
    assert not LEAK.search((run_dir / "run.json").read_text())
    assert not LEAK.search(err), err
    page = write_report(run_dir).read_text()
    assert not LEAK.search(page), LEAK.search(page)
    assert "traced without --trace-content" in page  # it says where the outputs are
    assert not LEAK.search(span_text(run_dir))

    # A rectify round resumes from the store: the harvest finds the values there.
    from mas2c.rectify import harvest_checkpoints, read_run

    found = harvest_checkpoints([read_run(run_dir)])
    assert {c.key for c in stored} == set(found)
    assert LEAK.search(json.dumps(found))


def test_with_trace_content_every_artifact_may_show_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same probe with --trace-content: the trace, the report and the spans carry
    the content (so the test above would see a leak)."""
    from mas2c.report import write_report

    run_dir, _out, _err = run_cli(tmp_path, "content", "--trace-content", capsys=capsys)
    trace = (run_dir / "trace.jsonl").read_text()
    events = [json.loads(line) for line in trace.splitlines()]
    checkpoint = next(e for e in events if e["event"] == "checkpoint" and e["step"] == "draft_it")
    assert LEAK.search(json.dumps(checkpoint["writes"]))
    failed = [e for e in events if e["event"] == "step_failed"]
    assert all(LEAK.search(e["message"]) for e in failed)
    assert LEAK.search(write_report(run_dir).read_text())
    assert LEAK.search(span_text(run_dir))
    header = json.loads((run_dir / "run.json").read_text())
    assert header["trace_content"] is True

    # The readers follow the host's header, not what the trace holds: the same trace in a
    # folder whose run.json says no content (a forged trace, or one of an earlier version
    # with checkpoint values and full error messages) shows and sends none of it.
    (run_dir / "run.json").write_text(json.dumps({**header, "trace_content": False}))
    page = write_report(run_dir).read_text()
    assert not LEAK.search(page), LEAK.search(page)
    assert not LEAK.search(span_text(run_dir))


def test_solve_records_its_task_by_size_unless_content_is_traced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`solve`'s task is a prompt: run.json (and so the spans and the report) name its
    size, not its text; task.txt (what was asked, the solve's own record) keeps it."""
    from mas2c.lang.validate import load_spec
    from mas2c.report import write_report
    from mas2c.testserver import default_responder

    generated = load_spec(Path(__file__).parent.parent / "specs" / "chain-of-thought.yaml")

    def answer(req: ChatRequest) -> ReplyLike:
        if req.response_format.get("json_schema", {}).get("name") == "mas2c_spec":
            return generated.to_data()
        return default_responder(req)

    task = f"Answer questions about {IN_SENTINEL} step by step."
    given = tmp_path / "in.json"
    given.write_text(json.dumps({"question": "What is 2 + 2?"}))
    folders = {}
    for name, extra in (("plain", []), ("content", ["--trace-content"])):
        folder = folders[name] = tmp_path / name
        with LLMTestServer(answer) as server:
            argv = ["solve", task, "--input", str(given), "--sandbox", "unisolated"]
            argv += ["--llm", server.base_url, "--run-dir", str(folder), *extra]
            monkeypatch.setattr(sys, "argv", ["mas2c", *argv])  # what run.json records
            code = cli_main(argv)
        assert code == 0, capsys.readouterr().err[-3000:]
        capsys.readouterr()
    plain = folders["plain"]
    header = json.loads((plain / "run-1" / "run.json").read_text())
    assert f"<task: {len(task)} characters>" in header["command"]
    assert not LEAK.search(json.dumps(header))
    assert not LEAK.search(span_text(plain / "run-1"))
    assert not LEAK.search(write_report(plain).read_text())
    assert LEAK.search((plain / "task.txt").read_text())
    content = folders["content"]
    assert task in json.loads((content / "run-1" / "run.json").read_text())["command"]
    assert LEAK.search(write_report(content).read_text())


def test_the_checkpoint_store_is_read_as_hostile_input(tmp_path: Path) -> None:
    """checkpoints.jsonl comes from the sandbox: each line is typed (a key that is a path,
    a pointer that is no top-level step, writes that are no object are located errors), a
    torn last line (a program killed mid-write) is skipped, and only valid hex keys ever
    name a file when a rectify round offers them."""
    from mas2c.rectify import RectifyError, offer_checkpoints
    from mas2c.runfolder import RunFolderError, read_checkpoints

    key = "ab" * 32
    good = {"step": "one", "pointer": "/workflow/0", "key": key, "writes": {"x": 1}}
    store = tmp_path / "checkpoints.jsonl"
    store.write_text(json.dumps(good) + "\n" + '{"step": "two", "poin')
    (saved,) = read_checkpoints(store)
    assert saved.writes == {"x": 1}
    for bad, where in (
        ({**good, "key": "../../etc/passwd"}, "/key"),
        ({**good, "pointer": "/tools/x"}, "/pointer"),
        ({**good, "writes": ["x"]}, "/writes"),
        ({**good, "step": "a/b"}, "/step"),
    ):
        store.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(RunFolderError, match=rf"checkpoints\.jsonl:2: checkpoint: at {where}"):
            read_checkpoints(store)
    store.write_text("[" * 100_000 + "\n" + json.dumps(good) + "\n")
    with pytest.raises(RunFolderError, match=r"checkpoints\.jsonl:1"):
        read_checkpoints(store)
    # rectify reads the folder through the contract: one clear error, no traceback
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "result.json").write_text('{"status": "error", "error": {"type": "X"}}')
    (run_dir / "checkpoints.jsonl").write_text(json.dumps({**good, "key": "../x"}) + "\n")
    from mas2c.rectify import read_run

    with pytest.raises(RectifyError, match=r"checkpoints\.jsonl:1"):
        read_run(run_dir)
    offer_checkpoints(tmp_path / "build", {"../x": {**good, "key": "../x"}, key: good})
    assert [p.name for p in (tmp_path / "build" / "checkpoints").iterdir()] == [f"{key}.json"]


ECHO_SPEC = """
spec_version: "1"
name: echo-probe
description: One call whose first request the endpoint refuses, quoting the prompt.
inputs:
  question: {type: string}
outputs:
  answer: answer
models:
  m: {model: test-model}
agents:
  plain: {role: Plain answerer, instructions: Answer., model: m}
workflow:
  - id: ask
    kind: call
    agent: plain
    prompt: "Ask {{ question }}"
    out: answer
    fallback:
      - {id: ask_again, kind: call, agent: plain, prompt: "Again {{ question }}", out: answer}
"""


def test_live_and_exported_spans_carry_no_content(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mas2c run --otel URL` against a real OTLP/HTTP endpoint (a loopback server): the
    endpoint refuses the first request with an error that quotes the prompt (as some
    servers do); neither the gateway's live span nor the run's exported spans carry it,
    nor any prompt or answer. The OTLP bodies are protobuf: their strings are raw UTF-8."""
    spec = tmp_path / "echo.yaml"
    spec.write_text(ECHO_SPEC)
    given = tmp_path / "in.json"
    given.write_text(json.dumps({"question": f"what is {IN_SENTINEL}?"}))
    with (
        otlp_receiver() as receiver,
        LLMTestServer(lambda _req: f"answer {OUT_SENTINEL}") as server,
    ):
        server.inject("status", 1, status=400, message=lambda req: f"bad: {req.last_user}")
        argv = ["run", str(spec), "--input", str(given), "--sandbox", "unisolated"]
        argv += ["--llm", server.base_url, "--run-dir", str(tmp_path / "run")]
        code = cli_main([*argv, "--otel", receiver])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert LEAK.search(out)  # the product
    trace = (tmp_path / "run" / "trace.jsonl").read_text()
    assert "BadRequestError (HTTP 400)" in trace and not LEAK.search(trace)
    sent = b"".join(_Receiver.bodies).decode("utf-8", errors="replace")
    assert "gateway test-model" in sent and "chat test-model" in sent  # live, then the run
    assert "HTTP 400" in sent
    assert not LEAK.search(sent), LEAK.search(sent)
    assert not LEAK.search(err)


def test_a_rectify_report_withholds_failure_messages_and_llm_explanations(
    tmp_path: Path,
) -> None:
    """A rectify folder's rounds: the failure's message and an LLM fix's explanation may
    quote an answer; the page shows them only when the repaired run traced content."""
    from mas2c.report import render_report

    run_dir = tmp_path / "run"
    (run_dir / "rectify" / "round-1").mkdir(parents=True)
    header = {"format": "mas2c-run-header/1", "trace_id": "a" * 32, "span_id": "b" * 16}
    error = {"type": "StructuredOutputError", "code": "structured_output"}
    (run_dir / "result.json").write_text(
        json.dumps({"status": "error", "error": {**error, "message": f"got {OUT_SENTINEL}"}})
    )
    notes = {
        "failure": {**error, "message": f"last answer: {OUT_SENTINEL}", "pointer": "/agents/a"},
        "fix": {"class": "llm", "why": f"the model said {OUT_SENTINEL}", "deterministic": False},
        "outcome": "fixed",
    }
    (run_dir / "rectify" / "round-1" / "notes.json").write_text(json.dumps(notes))
    for content in (False, True):
        (run_dir / "run.json").write_text(json.dumps({**header, "trace_content": content}))
        for page in (render_report(run_dir), render_report(run_dir / "rectify")):
            assert bool(LEAK.search(page)) is content
            assert "StructuredOutputError" in page
