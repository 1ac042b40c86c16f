"""`mas2c report`: the HTML page, opened in real headless Chromium.

Run folders come from real runs (the compiled examples in the unisolated sandbox against
the loopback LLM server; a real `solve` whose first run fails and is rectified). The
page is loaded by Chromium (`--dump-dom`, then a screenshot kept under
``$MAS2C_TEST_ARTIFACTS`` or the test's temp dir), and the DOM Chromium built is
checked for what is drawn: the workflow's nodes with their status, the timeline's
spans and the LLM concurrency, the cost bars, the rounds and the phases. A hostile
run folder (markup and script in every string) must come out as text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mas2c.cli import main as cli_main
from mas2c.lang.validate import load_spec
from mas2c.otel import build_spans
from mas2c.report import render_report, write_report
from mas2c.run import LLMConfig, run_system
from mas2c.testserver import ChatRequest, LLMTestServer, ReplyLike, default_responder
from mas2c.tracing import read_run_trace

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
INPUTS = {
    "hierarchical": {
        "decision": "Should we add offline mode to our note-taking app?",
        "context": "12 engineers, flat budget.",
    },
    "debate": {"question": "Is 0.999... (repeating) equal to 1?"},
}


# -- a real browser ----------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is required under CI (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return found


def artifacts(tmp: Path) -> Path:
    folder = Path(os.environ.get("MAS2C_TEST_ARTIFACTS") or tmp)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def browse(page: Path, profile: Path, *extra: str) -> str:
    """Run Chromium on a file; returns stdout (the DOM with --dump-dom)."""
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def dom_of(page: Path, tmp: Path) -> Dom:
    return Dom.parse(browse(page, tmp / "profile-dom", "--dump-dom"))


def screenshot(page: Path, tmp: Path, name: str, height: int = 2400) -> Path:
    png = artifacts(tmp) / f"{name}.png"
    png.unlink(missing_ok=True)
    browse(page, tmp / "profile-shot", f"--window-size=1300,{height}", f"--screenshot={png}")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, tall = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, tall) == (1300, height) and len(data) > 20_000  # drawn, not blank
    return png


class Dom(HTMLParser):
    """The elements of a page: (tag, attributes, text inside) in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[int] = []
        self.text: list[str] = []

    @classmethod
    def parse(cls, markup: str) -> Dom:
        dom = cls()
        dom.feed(markup)
        dom.close()
        return dom

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))
        self._open.append(len(self.elements) - 1)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            index = self._open.pop()
            if self.elements[index][0] == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for index in self._open:
            self.elements[index][2].append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        found = []
        for name, element_attrs, _ in self.elements:
            wanted = all(
                element_attrs.get(k.rstrip("_").replace("_", "-")) == v for k, v in attrs.items()
            )
            if name == tag and wanted:
                found.append(element_attrs)
        return found

    def with_attr(self, tag: str, attr: str) -> list[dict[str, str]]:
        return [a for name, a, _ in self.elements if name == tag and attr in a]

    def texts(self, tag: str, **attrs: str) -> list[str]:
        return [
            "".join(text)
            for name, a, text in self.elements
            if name == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


# -- real run folders --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The hierarchical and debate examples, run in the unisolated sandbox (50 ms per call)."""
    root = tmp_path_factory.mktemp("runs")
    for name, inputs in INPUTS.items():
        (root / f"{name}.json").write_text(json.dumps(inputs))
        with LLMTestServer(latency_s=0.05) as srv:
            outcome = run_system(
                ROOT / "specs" / f"{name}.yaml",
                root / f"{name}.json",
                root / name,
                backend="unisolated",
                llm=LLMConfig(url=srv.base_url, api_key="sk-secret-test-key"),
                on_warning=lambda _m: None,
                trace_content=name == "debate",
            )
        assert outcome.ok, outcome.result
    yield root


def test_hierarchical_report_in_chromium(runs: Path, tmp_path: Path) -> None:
    page = write_report(runs / "hierarchical")
    assert page == runs / "hierarchical" / "report.html"
    html = page.read_text()
    assert "sk-secret-test-key" not in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    dom = dom_of(page, tmp_path)
    nodes = {a["data-step"]: a["data-status"] for a in dom.with_attr("g", "data-step")}
    spec = load_spec(ROOT / "specs" / "hierarchical.yaml")
    from mas2c.lang.spec import iter_steps

    assert set(nodes) == {step.id for _, step in iter_steps(spec.workflow, "/workflow")}
    assert set(nodes.values()) == {"ok"}
    spans = dom.with_attr("g", "data-kind")
    kinds = [a["data-kind"] for a in spans]
    assert kinds.count("llm") == 5 and kinds.count("step") == 6 and kinds.count("run") == 1
    # Every drawn span's parent is drawn too (or is the host's span above the run).
    ids = {a["data-span"] for a in spans}
    assert all(a["data-parent"] in ids for a in spans if a["data-kind"] != "run")
    (peak,) = dom.find("text", class_="peak")
    assert peak["data-peak"] == "3"  # the three specialists ran at once
    agents = {a["data-name"] for a in dom.with_attr("g", "data-name")}
    assert {"manager", "market_analyst", "risk_analyst"} <= agents
    assert "127.0.0.1:" in "".join(dom.text)  # the endpoint host, no URL
    # Per step: the parallel step holds the three specialists' calls.
    assert any(h.startswith("Per step") for h in dom.texts("h3"))
    cells = dom.texts("td")
    at = cells.index("investigate")
    assert cells[at + 1 : at + 6] == ["/workflow/1", "1", "0", cells[at + 4], "3"]
    shot = screenshot(page, tmp_path, "report-hierarchical", height=2000)
    assert shot.is_file()


def test_debate_report_shows_rounds_and_prompts(runs: Path, tmp_path: Path) -> None:
    page = write_report(runs / "debate", tmp_path / "debate.html")
    dom = dom_of(page, tmp_path)
    labels = [t for t in dom.texts("text") if t.startswith("LLM ")]
    assert sum(" r1 " in t for t in labels) == 3 and sum(" r2 " in t for t in labels) == 3
    assert any(t.endswith("judge") for t in labels)
    (peak,) = dom.find("text", class_="peak")
    assert peak["data-peak"] == "3"  # the debaters of one round at once
    # The run traced content (trace_content=True): the prompts are on the page, as text.
    summaries = dom.texts("summary")
    assert sum(s.startswith("LLM ") for s in summaries) == 7
    assert "Is 0.999... (repeating) equal to 1?" in "".join(dom.text)
    screenshot(page, tmp_path, "report-debate", height=2400)


@pytest.fixture(scope="module")
def solved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real solve whose generated system fails (a missing import) and is rectified."""
    from mas2c.solve import solve

    root = tmp_path_factory.mktemp("solve")
    generated = load_spec(ROOT / "tests" / "faults" / "missing-import-re" / "spec.yaml")

    def respond(req: ChatRequest) -> ReplyLike:
        if req.response_format.get("json_schema", {}).get("name") == "mas2c_spec":
            return generated.to_data()
        return default_responder(req)

    (root / "in.json").write_text(json.dumps({"text": "One two three."}))
    with LLMTestServer(respond) as srv:
        outcome = solve(
            "Count the words of a text and summarize it.",
            root / "in.json",
            root / "solve",
            llm=LLMConfig(url=srv.base_url, api_key="test"),
            backend="unisolated",
        )
    assert outcome.status == "ok"
    return root / "solve"


def test_solve_report_shows_phases_rounds_patch_and_error(solved: Path, tmp_path: Path) -> None:
    page = write_report(solved)
    dom = dom_of(page, tmp_path)
    phases = [a["data-phase"] for a in dom.with_attr("g", "data-phase")]
    assert phases == ["generate", "configure", "compile+run", "rectify"]
    (round_,) = dom.with_attr("div", "data-round")
    assert round_["data-round"] == "1"
    added = dom.texts("span", **{"class": "add"})
    assert any("import re" in line for line in added)
    # The first run's error, with its spec pointer, and the tool code there.
    pointers = dom.texts("code", **{"class": "pointer"})
    assert pointers == ["/tools/word_stats/code"]
    assert "NameError" in "".join(dom.text)
    nodes = {a["data-step"]: a["data-status"] for a in dom.with_attr("g", "data-step")}
    assert "error" in nodes.values()
    screenshot(page, tmp_path, "report-solve", height=2400)
    # The rectify folder alone: the repaired run, then its rounds.
    rectify_page = write_report(solved / "run-1" / "rectify", tmp_path / "rectify.html")
    dom = dom_of(rectify_page, tmp_path)
    assert [a["data-round"] for a in dom.with_attr("div", "data-round")] == ["1"]
    assert dom.texts("code", **{"class": "pointer"}) == ["/tools/word_stats/code"]


# -- hostile input ---------------------------------------------------------------------------

EVIL = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='img'\">"


def _hostile_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    spec = load_spec(ROOT / "specs" / "chain-of-thought.yaml").to_data()
    spec["description"] = EVIL
    first = spec["workflow"][0]
    (folder / "spec.json").write_text(json.dumps(spec))
    (folder / "run.json").write_text(
        json.dumps({"command": [EVIL], "spec": EVIL, "endpoint": EVIL, "span_id": "zz"})
    )
    (folder / "result.json").write_text(
        json.dumps(
            {
                "status": EVIL,
                "error": {
                    "type": EVIL,
                    "message": EVIL,
                    "spec_pointer": f"/workflow/0/{EVIL}",
                    "traceback": EVIL,
                },
            }
        )
    )
    events: list[Any] = [
        {"t": 0, "event": "run_start", "spec": EVIL, "trace_id": EVIL},
        {"t": 0.1, "event": "step_start", "step": first["id"], "pointer": "/workflow/0"},
        {
            "t": 0.5,
            "event": "llm_call",
            "agent": EVIL,
            "model": EVIL,
            "status": EVIL,
            "error": EVIL,
            "latency_s": 0.3,
            "messages": [{"role": EVIL, "content": EVIL}],
            "round": EVIL,
            "span_id": EVIL,
            "parent_id": EVIL,
        },
        {"t": 0.6, "event": "step_end", "step": EVIL, "pointer": EVIL, "status": "error"},
        {"t": "soon", "event": "tool_call", "tool": EVIL, "status": "ok", "duration_s": -5},
        {"t": 1e308, "ts": float("inf"), "event": "exec"},
    ]
    lines = [json.dumps(e) for e in events] + ["not json", "[1, 2]", '{"event": 5}', "{" * 5000]
    (folder / "trace.jsonl").write_text("\n".join(lines) + "\n")
    rounds = folder / "rectify" / "round-1"
    rounds.mkdir(parents=True)
    (rounds / "notes.json").write_text(
        json.dumps({"failure": {"type": EVIL}, "fix": {"why": EVIL}})
    )
    (rounds / "patch.diff").write_text(f"+{EVIL}\n-{EVIL}\n")
    # Symlinks out of the folder and a FIFO: never followed, never read (nor blocked on).
    secret = folder.parent / "host-secret.txt"
    secret.write_text("HOST-SECRET-CONTENT")
    (rounds / "run").mkdir()
    (rounds / "run" / "trace.jsonl").symlink_to(secret)
    os.mkfifo(rounds / "run" / "result.json")
    (folder / "rectify" / "round-2").symlink_to(rounds)
    round3 = folder / "rectify" / "round-3"
    round3.mkdir()
    (round3 / "patch.diff").symlink_to(secret)
    (round3 / "notes.json").symlink_to(secret)


def test_a_hostile_run_folder_is_shown_as_text(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    _hostile_folder(folder)
    page = write_report(folder)
    raw = page.read_text()
    assert "<script" not in raw and "<img" not in raw
    dom = dom_of(page, tmp_path)
    assert not dom.find("script") and not dom.find("img")
    title = dom.texts("title")[0]  # the page's (SVG tooltips are <title> too)
    assert title.startswith("mas2c run:") and "pwned" in title  # as text, never run
    assert "".join(dom.text).count(EVIL) >= 8
    assert "HOST-SECRET-CONTENT" not in raw
    assert [a["data-round"] for a in dom.with_attr("div", "data-round")] == ["1", "3"]
    problems = read_run_trace(folder).problems
    assert any("not JSON" in p for p in problems) and any(
        "not a trace event" in p for p in problems
    )


FUZZ_KEYS = [
    *("event", "t", "ts", "span_id", "parent_id", "step", "pointer", "start_ts", "status"),
    *("latency_s", "duration_s", "agent", "model", "cost_usd", "prompt_tokens"),
]


@settings(
    max_examples=int(os.environ.get("MAS2C_FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(FUZZ_KEYS),
            st.one_of(
                st.sampled_from(["run_start", "run_end", "step_start", "step_end", "llm_call"]),
                st.sampled_from(["tool_call", "exec", "a" * 16, "0" * 16, "/workflow/0"]),
                st.floats(allow_nan=True, allow_infinity=True),
                st.integers(),
                st.text(max_size=20),
                st.none(),
            ),
        ),
        max_size=20,
    )
)
@example([{"event": "run_start", "t": 1.797693134862316e299}])  # found: nanoseconds overflow
@example([{"event": "run_start", "t": 6.7768e16}])  # found: a time no calendar has
def test_any_trace_renders_without_raising(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    text = "\n".join(json.dumps(e) for e in events)
    (folder / "trace.jsonl").write_text(text)
    page = render_report(folder)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    trace = read_run_trace(folder)
    ids = [s.span_id for s in trace.spans]
    assert len(ids) == len(set(ids))  # ids stay unique whatever the file says
    assert all(re.match(r"^[0-9a-f]{16}$", i) and i.strip("0") for i in ids)
    assert re.match(r"^[0-9a-f]{32}$", trace.trace_id) and trace.trace_id.strip("0")
    # The OpenTelemetry export builds valid spans from it too.
    exported = build_spans(trace)
    assert len(exported) == len(trace.spans)
    assert all(s.context.is_valid and s.start_time <= s.end_time for s in exported)


def test_an_old_trace_without_ids_or_wall_clock_still_nests(runs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "old"
    shutil.copytree(runs / "hierarchical", folder)
    (folder / "run.json").unlink()
    stripped = []
    for line in (folder / "trace.jsonl").read_text().splitlines():
        event = json.loads(line)
        for key in ("ts", "span_id", "parent_id", "start_ts", "trace_id"):
            event.pop(key, None)
        stripped.append(json.dumps(event))
    (folder / "trace.jsonl").write_text("\n".join(stripped) + "\n")
    trace = read_run_trace(folder)
    by_id = {s.span_id: s for s in trace.spans}
    steps = {s.name: s for s in trace.by_kind("step")}
    assert by_id[steps["market_research"].parent_id].name == "investigate"
    assert by_id[steps["plan"].parent_id].kind == "run"
    calls = {s.attrs["agent"]: s for s in trace.by_kind("llm")}
    assert by_id[calls["risk_analyst"].parent_id].name == "risk_assessment"


# -- the command -----------------------------------------------------------------------------


def test_cli_report(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(runs / "debate"), "-o", str(tmp_path / "no" / "r.html")]) == 2
    assert not (tmp_path / "no").exists()  # -o FILE creates no folders
    out = tmp_path / "r.html"
    assert cli_main(["report", str(runs / "debate"), "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert capsys.readouterr().out.strip() == str(out)
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and "Traceback" not in err


# -- a batch folder --------------------------------------------------------------------------


def test_batch_report_in_chromium(tmp_path: Path) -> None:
    """A real batch (4 rows: 2 right, 1 wrong with a hostile answer, 1 failed run): the page
    shows the accuracy, every row coloured by outcome, the failures by code, each row's
    prediction as text, and links the row run reports that exist."""
    from mas2c.batch import run_batch, slug
    from tests.test_batch import answering, options, qa_dataset

    dataset, rows = qa_dataset(tmp_path)
    hostile = "<script>document.title='pwned'</script><svg onload=alert(1)>11"
    respond = answering(rows, wrong={"gsm8k-1": hostile, "gsm8k-3": "!invalid"})
    with LLMTestServer(respond) as server:
        summary = run_batch(options(tmp_path, dataset, server, limit=4))
    assert summary["finished"] == 4 and summary["passed"] == 2
    batch = tmp_path / "run"
    # One row's run report exists (made by `mas2c report`); the page links it.
    write_report(batch / "rows" / slug("gsm8k-0") / "mas")
    page = write_report(batch)
    assert page == batch / "report.html"
    raw = page.read_text()
    assert "<script" not in raw and "<svg onload" not in raw
    dom = dom_of(page, tmp_path)
    assert dom.texts("title")[0].startswith("mas2c batch: gsm8k.jsonl")
    states = {a["data-row"]: a["data-state"] for a in dom.with_attr("rect", "data-state")}
    assert states == {"gsm8k-0": "passed", "gsm8k-1": "wrong", "gsm8k-2": "passed"} | {
        "gsm8k-3": "error"
    }
    assert any(t.startswith("50.0% [") for t in dom.texts("td"))
    assert [a["data-status"] for a in dom.with_attr("span", "data-status")] == [
        *("passed", "wrong", "passed", "error")
    ]
    codes = dom.texts("code")
    assert any(c in ("structured_output", "StructuredOutputError") for c in codes)
    assert any(hostile in t for t in dom.texts("td"))  # shown as text, never run
    links = [a["href"] for a in dom.find("a") if a.get("href")]
    assert links == [f"rows/{slug('gsm8k-0')}/mas/report.html"]
    screenshot(page, tmp_path, "report-batch", height=1100)
    # A results.jsonl with hostile lines: skipped and listed, the page still made.
    with (batch / "results.jsonl").open("a") as handle:
        handle.write("[" * 100_000 + "\n" + '{"key": 5}\n' + "not json\n")
    dom = Dom.parse(render_report(batch))
    problems = dom.texts("li")
    assert sum("not a result line" in p for p in problems) == 3


def test_huge_strings_in_a_folder_make_a_small_page(tmp_path: Path) -> None:
    """Every string of a forged folder 500 kB long (names, pointers, codes, messages, the
    header): each is cut where it is shown, so the page stays small and opens."""
    big = "<b>" + "A" * 500_000
    folder = tmp_path / "huge"
    folder.mkdir()
    events: list[dict[str, Any]] = [
        {"t": 0, "ts": 1.7e9, "event": "run_start", "spec": big, "span_id": "a" * 16}
    ]
    for i in range(6):
        span = f"{i + 1:016x}"
        where = {"step": big + str(i), "pointer": "/workflow/0/" + big}
        events += [
            {"t": 0.1, "event": "step_start", **where, "span_id": span, "parent_id": "a" * 16},
            {"t": 0.5, "event": "llm_call", "agent": big, "model": big, "status": "error"}
            | {"error": big, "parent_id": span, "latency_s": 0.3, "role": big},
            {"t": 0.6, "event": "step_end", **where, "status": "error", "error": big}
            | {"code": big, "span_id": span, "parent_id": "a" * 16},
            {"t": 0.7, "event": "step_failed", **where, "code": big, "message": big}
            | {"then": big, "attempt": 1},
            {"t": 0.8, "event": "tool_call", "tool": big, "worker": big, "status": big},
        ]
    (folder / "trace.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    header = {"command": [big] * 5, "spec": big, "endpoint": big, "started_at": big}
    (folder / "run.json").write_text(json.dumps(header))
    error = {"type": big, "message": big, "spec_pointer": "/" + big, "traceback": big}
    (folder / "result.json").write_text(json.dumps({"status": "error", "error": error}))
    assert sum(f.stat().st_size for f in folder.iterdir()) > 45_000_000
    page = write_report(folder)
    assert page.stat().st_size < 1_000_000  # was 65 MB: each string in full, many times
    raw = page.read_text()
    assert "<b>" not in raw and "&lt;b&gt;AAA" in raw
    dom = dom_of(page, tmp_path)
    assert len(dom.with_attr("g", "data-kind")) == 1 + 6 * 3  # run, steps, calls, tools


def test_the_host_header_names_the_trace_not_the_program(tmp_path: Path) -> None:
    """A sandboxed program that writes another trace id into its run_start (another run's,
    to put its spans there) does not choose the exported trace: run.json does."""
    folder = tmp_path / "forged"
    folder.mkdir()
    ours, theirs = "1" * 32, "2" * 32
    (folder / "run.json").write_text(json.dumps({"trace_id": ours, "span_id": "3" * 16}))
    start = {"t": 0, "event": "run_start", "trace_id": theirs, "span_id": "4" * 16}
    (folder / "trace.jsonl").write_text(json.dumps(start) + "\n")
    trace = read_run_trace(folder)
    assert trace.trace_id == ours
    assert {s.context.trace_id for s in build_spans(trace)} == {int(ours, 16)}
    (folder / "run.json").unlink()  # a folder without a header: the program's id
    assert read_run_trace(folder).trace_id == theirs
