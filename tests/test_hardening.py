"""Hardening (review of issues 10, 16, 17, 18): each test is a class of break the
adversarial review confirmed in an already-resolved issue, checked on several instances.

- A: an exit before every check has run is a failure, never a pass (the `test` step's
  harness and the batch/bench `code` scorer report a pass positively, after the checks).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import compile_to, load_runtime, run_package
from hypothesis import given, settings
from hypothesis import strategies as st

from mas2c import values
from mas2c.batch import CODE_SCORER_MAIN, parse_exact, score_text
from mas2c.gateway import (
    IMAGE_TOKEN_BOUND,
    Budget,
    Gateway,
    GatewayLimits,
    HttpUpstream,
    Scrubber,
    prompt_token_bound,
)
from mas2c.lang.validate import validate_text
from mas2c.testserver import ChatRequest, LLMTestServer, Reply
from mas2c.tracing import redact_argv

# -- A. exits are failures ---------------------------------------------------------------------

EXITS = [
    "import sys; sys.exit()",
    "import sys; sys.exit(0)",
    "exit()",
    "quit()",
    "raise SystemExit",
    "import os; os._exit(0)",
]

TEST_STEP = """
spec_version: "1"
name: exits
inputs:
  code: {type: string}
  tl: {type: array, items: {type: string}}
outputs: {listed: listed}
models: {m: {model: test-model}}
agents: {a: {role: r, instructions: i, model: m}}
workflow:
  - {id: t, kind: test, code: code, tests: "{{ tl }}", out: listed}
"""


def test_test_step_counts_every_exit_as_a_failure(tmp_path: Path) -> None:
    report = validate_text(TEST_STEP)
    assert report.ok and report.spec is not None, report.format()
    compile_to(report.spec, tmp_path / "build")
    code = "def f(x):\n    return x + 1\n"
    checks = [f"{exit_}\nassert f(1) == 3" for exit_ in EXITS] + ["assert f(1) == 2"]
    rc, out, _, stderr = run_package(tmp_path / "build", {"code": code, "tl": checks}, None)
    assert rc == 0, stderr
    results = out["outputs"]["listed"]["results"]
    assert [r["passed"] for r in results[:-2]] == [False] * (len(EXITS) - 1)
    assert all("exit" in r["error"].lower() for r in results[:-2])
    # os._exit ends the harness: that snippet and every later one report nothing: failed
    assert results[-2]["passed"] is False and results[-1]["passed"] is False
    assert out["outputs"]["listed"]["passed"] is False
    # the code under test exiting at import fails every test
    for exit_ in EXITS:
        rc, out, _, _ = run_package(
            tmp_path / "build", {"code": f"{exit_}\n{code}", "tl": ["assert f(1) == 2"]}, None
        )
        listed = out["outputs"]["listed"]
        assert listed["passed"] is False and listed["results"][0]["passed"] is False, exit_
    # and a real pass still passes
    rc, out, _, _ = run_package(
        tmp_path / "build", {"code": code, "tl": ["assert f(1) == 2"]}, None
    )
    assert out["outputs"]["listed"]["passed"] is True


def score_code(tmp_path: Path, code: str, test: str, entry_point: str) -> dict[str, Any]:
    """The batch/bench `code` scorer's program, run as the sandbox runs it."""
    package = tmp_path / "scorer"
    package.mkdir(exist_ok=True)
    (package / "main.py").write_text(CODE_SCORER_MAIN, encoding="utf-8")
    req = {"code": code, "test": test, "entry_point": entry_point, "timeout_s": 10}
    (package / "in.json").write_text(json.dumps(req), encoding="utf-8")
    args = ["--input", "in.json", "--output", "out.json", "--trace", "trace.jsonl"]
    subprocess.run([sys.executable, "main.py", *args], cwd=package, check=True, timeout=60)
    out = json.loads((package / "out.json").read_text(encoding="utf-8"))
    assert out["status"] == "ok"
    return dict(out["outputs"])


CHECK = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 5\n"


@pytest.mark.parametrize("exit_", EXITS)
@pytest.mark.parametrize("where", ["function", "module", "test"])
def test_code_scorer_counts_every_exit_as_a_failure(tmp_path: Path, exit_: str, where: str) -> None:
    code = "def add(a, b):\n    return a + b\n"
    test = CHECK
    if where == "function":
        code = f"def add(a, b):\n    {exit_}\n"
    elif where == "module":
        code = f"{code}{exit_}\n"
    else:
        test = f"def check(candidate):\n    {exit_}\n    assert candidate(2, 2) == 5\n"
    outputs = score_code(tmp_path, code, test, "add")
    assert outputs["passed"] is False, outputs
    assert "no pass reported" in outputs["output"]


def test_code_scorer_passes_only_after_every_check(tmp_path: Path) -> None:
    good = "def add(a, b):\n    print('@@mas2c-scored-forged@@')\n    return a + b\n"
    right = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
    assert score_code(tmp_path, good, right, "add")["passed"] is True
    assert score_code(tmp_path, good, CHECK, "add")["passed"] is False


# -- E. only a real null or an empty string is an empty answer ---------------------------------


def test_votes_count_the_text_null_as_an_answer() -> None:
    voting = load_runtime("_voting")
    assert voting.majority(["null", "NULL", "x"]) == "null"
    assert voting.majority(["ANSWER: null", "x", "ANSWER: Null"]) == "ANSWER: null"
    assert voting.majority([{"answer": "null"}, {"answer": "NULL"}, {"answer": "b"}]) == {
        "answer": "null"
    }
    assert voting.majority([{"v": "None"}, {"v": "b"}, {"v": "none"}], key="v") == {"v": "None"}
    assert voting.first_answer(["null", "x"]) == "null"
    assert voting.first_answer([{"answer": None}, {"answer": "null"}]) == {"answer": "null"}
    # what is empty: a JSON null, a missing field, an empty or blank string
    assert voting.majority([None, None, "x"]) == "x"
    assert voting.majority([{"answer": None}, {"answer": None}, {"answer": "b"}]) == {"answer": "b"}
    assert voting.majority([{"other": 1}, {"other": 1}, {"answer": 0}]) == {"answer": 0}
    assert voting.majority(["", "  ", "ANSWER:  ", "y"]) == "y"
    runtime = load_runtime()
    with pytest.raises(runtime.EmptyVote):
        voting.majority([None, "", " ", {"answer": None}, {"x": 1}, "ANSWER: "])


# -- F. scorers: exact numbers, valid groupings, the ANSWER: line -------------------------------


@pytest.mark.parametrize(
    ("prediction", "expected", "score"),
    [
        ("1,2", "12", 0.0),
        ("1,2", "2", 1.0),  # two numbers, the last one counts
        ("1,2345", "12345", 0.0),
        ("12,34,567", "1234567", 0.0),
        ("1,000,0", "10000", 0.0),
        ("1,234,567", "1234567", 1.0),
        ("$3,600.", "3600", 1.0),
        ("9999999999999999", "10000000000000000", 0.0),
        ("12345678901234567890", "12345678901234567891", 0.0),
        (12345678901234567890, "12345678901234567890", 1.0),
        ("100000000000000000001", 100000000000000000000, 0.0),
        ("0.30000000000000004", "0.3", 1.0),
        ("0.3000001", "0.3", 0.0),
        ("ANSWER: 42\n(confidence 90%)", "42", 1.0),
        ({"answer": 7}, "7", 1.0),
    ],
)
def test_numeric_scorer_is_exact(prediction: Any, expected: Any, score: float) -> None:
    assert score_text("numeric", prediction, expected) == score


def test_text_scorers_read_the_answer_line() -> None:
    assert score_text("exact", "Let me think.\nANSWER: Paris", "paris") == 1.0
    assert score_text("exact", "ANSWER: Rome\nANSWER: Paris.", "Paris") == 1.0
    assert score_text("exact", "ANSWER: Rome", "Paris") == 0.0
    assert score_text("exact", "answer : paris", "Paris") == 1.0
    assert (
        score_text("f1", "Step 1 ... ANSWER is below\nANSWER: Eiffel Tower", "Eiffel Tower") == 1.0
    )
    assert score_text("math", "so\nANSWER: \\boxed{\\frac{3}{4}}", "\\frac{3}{4}") == 1.0
    assert parse_exact("12%") == 12 and parse_exact("3/4") == parse_exact("0.75")


# -- C. credentials: URLs anywhere in argv, every form of a secret, the OTLP exporter's log ----


def test_recorded_command_lines_redact_every_url_in_every_argument() -> None:
    argv = [
        "mas2c",
        "run",
        "--llm=http://user:Pw0rd-9x@host.example/v1",
        "--llm",
        "https://u2:Pw0rd-9y@h:8443/v1?api-key=QK-123456#frag",
        "--record=x,https://u3:Pw0rd-9z@h/v1",
        "OPENAI_BASE_URL=http://u4:Pw0rd-9w@10.0.0.1:8000/v1?token=TK-abcdef",
        "--endpoint=u5:Pw0rd-9v@host/v1",
        "plain",
    ]
    out = " ".join(redact_argv(argv))
    for secret in ("Pw0rd", "user:", "u2:", "u3:", "u4:", "u5:", "QK-123456", "TK-abcdef", "frag"):
        assert secret not in out, (secret, out)
    assert "--llm=http://host.example/v1" in out and "plain" in out
    assert "http://10.0.0.1:8000/v1" in out


KEYS = ["sk-proj-Zq8xP3vR7mWn2Kt9LbY4", "Zq8xP3vR7mWn2Kt9LbY4Hq"]  # with and without `sk-`


def echo_forms(req: ChatRequest) -> str:
    """An upstream that echoes the credential it got in every form it can think of."""
    auth = req.headers.get("authorization", "")
    token = auth.split(" ", 1)[1] if " " in auth else auth
    chunks = " ".join(token[i : i + 3] for i in range(0, len(token), 3))
    return " | ".join(
        [
            f"bad credentials: {token}",
            f"KEY {token.upper()}",
            f"lower {token.lower()}",
            f"rev={token[::-1]}",
            f"chunks {chunks}",
            "b64=" + base64.b64encode(token.encode()).decode(),
            "b64x=" + base64.b64encode(("Bearer " + token).encode()).decode(),
            "pct=" + "".join(f"%{ord(c):02X}" for c in token),
            "hex=" + token.encode().hex(),
        ]
    )


@pytest.mark.parametrize(
    ("key", "userinfo"), [(KEYS[0], ""), (KEYS[1], ""), (None, "alice:s3cretPassw0rd@")]
)
def test_upstream_errors_never_carry_any_form_of_a_secret(key: str | None, userinfo: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="gwh", dir="/tmp"))
    try:
        with LLMTestServer() as srv:
            url = srv.base_url.replace("http://", "http://" + userinfo)
            gateway = Gateway(folder / "gw.sock", HttpUpstream(url, key, backoff_s=0.01))
            with gateway:
                srv.inject("status", status=401, message=echo_forms)
                transport = httpx.HTTPTransport(uds=str(folder / "gw.sock"))
                with httpx.Client(transport=transport, timeout=30) as http:
                    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
                    answer = http.post("http://mas2c-gateway/v1/chat/completions", json=body)
            sent = srv.requests[0].headers["authorization"].split(" ", 1)[1]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert answer.status_code == 401
    text = answer.json()["error"]["message"]
    secrets = [sent] + ([key] if key else ["s3cretPassw0rd", "alice"])
    lowered = text.lower()
    for secret in secrets:
        for form in (secret, secret[::-1], base64.b64encode(secret.encode()).decode()[:12]):
            assert form.lower() not in lowered, (form, text)
        assert secret.encode().hex() not in lowered
    squashed = "".join(c for c in lowered if c.isalnum())
    for secret in secrets:
        flat = "".join(c for c in secret.lower() if c.isalnum())
        assert flat[:8] not in squashed, (secret, text)
    assert "bad credentials: <redacted>" in text


def test_scrubber_keeps_ordinary_text() -> None:
    scrub = Scrubber([KEYS[1], "alice:s3cretPassw0rd"])
    text = "upstream http://127.0.0.1:8000/v1 rejected the request with HTTP 401: invalid model"
    assert scrub(text) == text


def test_otel_export_log_lines_carry_no_endpoint_token(tmp_path: Path) -> None:
    from mas2c.otel import redact_log_text

    url = "http://u:pw-Secret1@127.0.0.1:9/v1/traces?token=TOKEN-XYZ-123&x=1"
    line = (
        "Transient error HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded "
        "with url: /v1/traces?token=TOKEN-XYZ-123&x=1 (Caused by ...) while exporting "
        f"to {url}; token TOKEN-XYZ-123"
    )
    out = redact_log_text(line, url)
    assert "TOKEN-XYZ" not in out and "pw-Secret1" not in out and "u:" not in out
    assert "/v1/traces?token=<redacted>" in out


# -- B. images in the token bound; no URL an upstream would fetch ------------------------------

PIXEL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def image_body(url: str, images: int = 1, kind: str = "image_url") -> dict[str, Any]:
    part: dict[str, Any] = {"type": kind, kind: {"url": url, "detail": "high"}}
    if kind == "input_audio":
        part = {"type": kind, kind: {"data": "AAAA", "format": "wav"}}
    content = [{"type": "text", "text": "what is this?"}] + [part] * images
    return {"model": "m1", "messages": [{"role": "user", "content": content}]}


def gateway_posts(
    folder: Path, upstream_url: str, bodies: list[dict[str, Any]], **kw: Any
) -> tuple[list[httpx.Response], dict[str, Any]]:
    sock = folder / "gw.sock"

    def post(body: dict[str, Any]) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=60) as http:
            return http.post("http://mas2c-gateway/v1/chat/completions", json=body)

    with Gateway(sock, HttpUpstream(upstream_url, "sk-x", backoff_s=0.01), **kw) as gateway:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(post, bodies))
        return answers, gateway.usage()


def test_a_parallel_burst_of_images_stays_within_the_token_budget() -> None:
    assert prompt_token_bound(image_body(PIXEL, 2)) >= 2 * IMAGE_TOKEN_BOUND >= 1_445
    folder = Path(tempfile.mkdtemp(prefix="gwh", dir="/tmp"))
    per_image = 85 + 170 * 8  # OpenAI's most for one high-detail image (2048 x 768)

    def respond(req: ChatRequest) -> Reply:
        return Reply("ok", prompt_tokens=per_image + 20, completion_tokens=2, latency_s=0.3)

    try:
        with LLMTestServer(respond) as srv:
            answers, usage = gateway_posts(
                folder,
                srv.base_url,
                [image_body(PIXEL)] * 16,
                models={"m1": 50},
                budget=Budget(max_total_tokens=5000),
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert usage["total_tokens"] <= 5000, usage  # before: 16 x 1,467 = 5.6x over
    assert usage["calls"] >= 2
    assert {a.status_code for a in answers} <= {200, 402}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (image_body("https://attacker.example/a.png"), "mas2c_image_url_refused"),
        (image_body("http://169.254.169.254/latest/meta-data"), "mas2c_image_url_refused"),
        (image_body("file:///etc/passwd"), "mas2c_image_url_refused"),
        (image_body(PIXEL, kind="input_audio"), "mas2c_unsupported_content"),
        (image_body(PIXEL, kind="file"), "mas2c_unsupported_content"),
        (image_body(PIXEL, kind="video_url"), "mas2c_unsupported_content"),
    ],
)
def test_unboundable_content_and_fetchable_image_urls_are_refused(
    body: dict[str, Any], code: str
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="gwh", dir="/tmp"))
    try:
        with LLMTestServer() as srv:
            answers, _ = gateway_posts(folder, srv.base_url, [body])
            assert not srv.requests  # nothing reached the upstream
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert answers[0].status_code == 400
    assert answers[0].json()["error"]["code"] == code


def test_image_urls_pass_when_allowed() -> None:
    folder = Path(tempfile.mkdtemp(prefix="gwh", dir="/tmp"))
    try:
        with LLMTestServer() as srv:
            answers, _ = gateway_posts(
                folder,
                srv.base_url,
                [image_body("https://example.org/a.png"), image_body(PIXEL)],
                limits=GatewayLimits(allow_image_urls=True),
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert [a.status_code for a in answers] == [200, 200]


# -- D. no ReDoS from a spec pattern -----------------------------------------------------------

CATASTROPHIC = [
    r"^([a-z]+ ?)+$",
    r"(a+)+$",
    r"^(a*)*b",
    r"^(a|a)*$",
    r"^(\w+\s?)+$",
    r"(.*a){20}",
    r"^(x+x+)+y",
    r"^(\d+)*$",
    r"^(a+a)+$",
    r"^(?:a|b|ab)+$",
    r"^(\s*\w+\s*,?)+$",
    r"^(a?){25}a{25}$",
]
SAFE = [
    r"^[a-z]+$",
    r"^(ab+)+$",
    r"^(\d+,)*\d+$",
    r"^\d{3}-\d{4}$",
    r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[a-z]{2,}$",
    r"^(\w+\.)+\w+$",
    r"^(ab|ac)*$",
    r"^(?:[a-z]+ )*[a-z]+$",
    r"^(\d{1,3}\.){3}\d{1,3}$",
    r"(?i)^[a-z]{2}\b\w*$",
    r"(?m)^b$",
]
# no linear-time automaton: mas2c's checks match patterns with one, never with `re`
NO_AUTOMATON = [
    r"^(a)\1$",
    r"^(?=.*\d)[a-z0-9]+$",
    r"(?<!x)b",
    r"(?!a)b",
    r"^a++b",
    r"^(?>ab|a)c",
    r"a{2001}",
    r"^(?:ab){0,1200}$",
]

PATTERN_SPEC = """
spec_version: "1"
name: pat
inputs:
  question: {type: string, pattern: "PATTERN"}
  nested: {type: object, properties: {tags: {type: array, items: {type: string, pattern: "^[a-z]+$"}}}}
outputs: {answer: answer}
models: {m: {model: test-model}}
agents:
  a:
    role: r
    model: m
    output: {type: object, properties: {answer: {type: string, pattern: "^[a-z]+$"}}}
workflow:
  - {id: s, kind: call, agent: a, prompt: "{{ question }}", out: answer}
"""


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_patterns_are_rejected_and_never_evaluated(pattern: str) -> None:
    assert values.pattern_problem(pattern) is not None
    text = PATTERN_SPEC.replace("PATTERN", pattern.replace("\\", "\\\\"))
    report = validate_text(text, "spec.yaml")
    found = [p for p in report.problems if p.code == "MAS511"]
    assert found and found[0].pointer == "/inputs/question/pattern" and found[0].line, (
        report.format()
    )
    assert found[0].hint
    # the host-side input check refuses the pattern instead of evaluating it
    hostile = "a" * 40 + "!"
    problems = values.input_problems(
        {"question": hostile}, {"question": {"type": "string", "pattern": pattern}}
    )
    assert problems and "refused" in problems[0][1]


@pytest.mark.parametrize("pattern", SAFE)
def test_safe_patterns_still_validate_and_match(pattern: str) -> None:
    assert values.pattern_problem(pattern) is None, pattern
    text = PATTERN_SPEC.replace("PATTERN", pattern.replace("\\", "\\\\"))
    report = validate_text(text, "spec.yaml")
    assert not [p for p in report.problems if p.code == "MAS511"], report.format()


@pytest.mark.parametrize("pattern", NO_AUTOMATON)
def test_patterns_without_a_linear_automaton_are_refused(pattern: str) -> None:
    assert values.pattern_problem(pattern) is not None
    text = PATTERN_SPEC.replace("PATTERN", pattern.replace("\\", "\\\\"))
    report = validate_text(text, "spec.yaml")
    found = [p for p in report.problems if p.code == "MAS511"]
    assert found and found[0].pointer == "/inputs/question/pattern", report.format()
    problems = values.input_problems(
        {"question": "ab"}, {"question": {"type": "string", "pattern": pattern}}
    )
    assert problems and "refused" in problems[0][1]


# patterns of mas2c's subset: literals, classes, `.`, categories, anchors, \b, groups with
# flags, alternatives, greedy and lazy repeats (counted too)
_ATOMS = st.sampled_from(
    ["a", "b", "\n", " ", "1", ".", "[ab]", "[^a]", "\\d", "\\w", "\\s", "\\W", "[a-c1]",
     "^", "$", "\\A", "\\Z", "\\b", "\\B", "(?i:A)", "(?s:.)", "(?a:\\w)", "é"]
)  # fmt: skip


def _regexes(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map(lambda p: f"(?:{p[0]}|{p[1]})"),
        st.tuples(inner, st.sampled_from(["*", "+", "?", "*?", "{2}", "{1,3}", "{0,2}?"])).map(
            lambda p: f"(?:{p[0]}){p[1]}"
        ),
        inner.map(lambda p: f"({p})"),
    )


@settings(max_examples=300, deadline=None)
@given(
    pattern=st.tuples(st.sampled_from(["", "(?m)", "(?i)", "(?s)"]), st.recursive(
        _ATOMS, _regexes, max_leaves=8
    )).map("".join),
    texts=st.lists(st.text(alphabet="ab1 \nAé_.", max_size=10), min_size=1, max_size=8),
)  # fmt: skip
def test_the_linear_matcher_agrees_with_re(pattern: str, texts: list[str]) -> None:
    """`values.pattern_search` answers what `re.search` answers, for every pattern it
    accepts (patterns it refuses are never evaluated)."""
    import re

    if values.pattern_problem(pattern) is not None:
        return
    for text in texts:
        assert values.pattern_search(pattern, text) is (re.search(pattern, text) is not None), (
            pattern,
            text,
        )


def _on_a_worker_thread(work: Any, timeout: float = 300) -> Any:
    """``work()`` on a daemon thread; fails (leaving the thread behind) past ``timeout``,
    which only tells "done" from "hours"."""
    import threading

    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(work()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert done, f"still checking after {timeout} s"
    return done[0]


POLYNOMIAL = [r".*a.*a.*b", r"^\d*\d*\d*x", r"(?:a|b)*a.*a.*a\s*c", r"\w+\w+\w+!$"]


def test_polynomial_patterns_are_checked_in_linear_time_on_a_worker_thread() -> None:
    """`re` takes hours on these at 10,000 characters (about n^3-n^4 backtracking steps)
    and no timer bounds it off the main thread; the automaton answers at once on any
    thread. The generous wait only decides between "done" and "hours"."""

    def check_all() -> list[list[str]]:
        text = "a1" * (values.MAX_PATTERN_INPUT // 2)
        return [values.validate(text, {"type": "string", "pattern": p}) for p in POLYNOMIAL]

    found = _on_a_worker_thread(check_all)
    assert [len(problems) for problems in found] == [1] * len(POLYNOMIAL)
    assert all("does not match the pattern" in problems[0] for problems in found)
    assert values.validate("a" * 5000 + "b", {"type": "string", "pattern": r".*a.*a.*b"}) == []


def test_the_work_of_one_check_is_bounded() -> None:
    """A pattern as large as allowed against a text as long as allowed: past
    MAX_PATTERN_WORK state visits the check stops with a problem (a count, not a clock)."""
    import random

    pattern = r"a.{1500}c"
    assert values.pattern_problem(pattern) is None
    rng = random.Random(7)
    text = "".join(rng.choice("ab") for _ in range(values.MAX_PATTERN_INPUT))
    problems = values.validate(text, {"type": "string", "pattern": pattern})
    assert len(problems) == 1 and "steps" in problems[0], problems
    fits = "x" * 100 + "a" + "b" * 1500 + "c"
    assert values.validate(fits, {"type": "string", "pattern": pattern}) == []


def test_a_hostile_structured_answer_with_a_polynomial_pattern_cannot_hold_a_thread(
    tmp_path: Path, llm_server: LLMTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An LLM answers 10,000 characters for a field whose pattern backtracks polynomially;
    the compiled package (here as a library, on a worker thread, as a server would call
    it) refuses the answer at once instead of backtracking for hours."""
    import importlib

    spec = {
        "spec_version": "1",
        "name": "poly-answer",
        "inputs": {"q": {"type": "string"}},
        "outputs": {"answer": "reply.answer"},
        "models": {"m": {"model": "test-model"}},
        "agents": {
            "a": {
                "role": "r",
                "model": "m",
                "output": {
                    "type": "object",
                    "properties": {"answer": {"type": "string", "pattern": r".*a.*a.*b"}},
                    "required": ["answer"],
                },
            }
        },
        "workflow": [{"id": "s", "kind": "call", "agent": "a", "prompt": "{{ q }}", "out": "reply"}],
        "budgets": {"max_llm_calls": 4, "timeout_s": 600},
    }
    from mas2c.lang.spec import Spec

    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MAS2C_LLM_SOCKET", "MAS2C_CHECKPOINT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MAS2C_RETRY_BASE_S", "0.01")
    build = compile_to(Spec.model_validate(spec), tmp_path / "pkg")
    llm_server.responder = lambda req: {"answer": "a" * values.MAX_PATTERN_INPUT}
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    package = importlib.import_module(build.package)
    result = _on_a_worker_thread(
        lambda: package.run_sync({"q": "x"}, base_url=llm_server.base_url, api_key="sk-test")
    )
    assert result.status == "error", result
    assert "does not match the pattern" in result.error.message
    assert 1 <= len(llm_server.requests) <= 4


def test_patterns_deep_in_schemas_and_uncompilable_ones_are_located() -> None:
    text = PATTERN_SPEC.replace("PATTERN", "^[a-z]+$").replace(
        'answer: {type: string, pattern: "^[a-z]+$"}',
        'answer: {type: string, pattern: "(a|ab?)+$"}',
    )
    report = validate_text(text, "spec.yaml")
    assert [(p.code, p.pointer) for p in report.problems if p.code == "MAS511"] == [
        ("MAS511", "/agents/a/output/properties/answer/pattern")
    ]
    assert "(a|ab?)+$" in report.problems[0].message
    report = validate_text(PATTERN_SPEC.replace("PATTERN", "[a-"), "spec.yaml")
    assert any(p.code == "MAS511" and "compile" in p.message for p in report.problems)


def test_long_strings_are_not_matched_against_patterns() -> None:
    schema = {"type": "string", "pattern": "^[a-z ]+$"}
    assert values.validate("a" * values.MAX_PATTERN_INPUT, schema) == []
    problems = values.validate("a" * (values.MAX_PATTERN_INPUT + 1), schema)
    assert problems and "too long" in problems[0]


# -- G1. whole placeholders nested in tool args keep their known types -------------------------

NESTED_ARGS = """
spec_version: "1"
name: nested-args
inputs:
  n: {type: integer}
  s: {type: string}
outputs: {r: r}
models: {m: {model: test-model}}
agents: {a: {role: r, model: m}}
tools:
  ints:
    code: |
      def ints(xs: list[int]) -> str:
          return repr(xs)
  strs:
    code: |
      def strs(xs: list[str]) -> str:
          return repr(xs)
  table:
    code: |
      def table(d: dict[str, int]) -> str:
          return repr(d)
  grid:
    code: |
      def grid(rows: list[list[int]]) -> str:
          return repr(rows)
  maybe:
    code: |
      def maybe(xs: list[int] | None = None) -> str:
          return repr(xs)
workflow:
  - {id: s0, kind: call, agent: a, prompt: "{{ s }}", out: r}
  - {id: t, kind: tool, tool: TOOL, args: ARGS, out: r2}
"""


@pytest.mark.parametrize(
    ("tool", "args", "error"),
    [
        ("ints", '{xs: ["{{ n }}", 5]}', None),
        ("strs", '{xs: ["{{ n }}", "{{ s }}"]}', "item 0"),
        ("strs", '{xs: ["{{ s }}", "x"]}', None),
        ("ints", '{xs: ["n={{ n }}"]}', "item 0"),
        ("table", '{d: {a: "{{ n }}", b: 2}}', None),
        ("table", '{d: {a: "{{ n }}", b: "{{ s }}"}}', "field 'b'"),
        ("grid", '{rows: [["{{ n }}"], [1]]}', None),
        ("grid", '{rows: [["{{ s }}"]]}', "item 0: item 0"),
        ("maybe", '{xs: ["{{ n }}"]}', None),
        ("maybe", '{xs: ["{{ s }}"]}', "item 0"),
        ("ints", '{xs: {a: "{{ n }}"}}', "object"),
    ],
)
def test_nested_whole_placeholders_are_checked_by_type(
    tool: str, args: str, error: str | None
) -> None:
    report = validate_text(NESTED_ARGS.replace("TOOL", tool).replace("ARGS", args), "spec.yaml")
    found = [p for p in report.problems if p.code == "MAS405"]
    if error is None:
        assert not found, report.format()
    else:
        assert found and found[0].pointer.startswith("/workflow/1/args/"), report.format()
        assert error in found[0].message, found[0].message


# -- G2. conditions over two typed fields ----------------------------------------------------

TYPED_CONDITION = (Path(__file__).parent / "invalid" / "MAS512-len-of-a-number.yaml").read_text(
    encoding="utf-8"
)
TYPED_CONDITION = TYPED_CONDITION.replace(
    "properties: {score: {type: integer}}",
    "properties: {score: {type: integer}, cat: {type: string}, tags: {type: array}, ok: {type: boolean}}",
)


@pytest.mark.parametrize(
    ("condition", "code"),
    [
        ("rv.cat == rv.score", "MAS309"),
        ("rv.ok != rv.score", "MAS309"),
        ("rv.score > rv.cat", "MAS309"),
        ("len(rv.score) > 1", "MAS512"),
        ("len(rv.ok) > 1", "MAS512"),
        ('rv.score in "abc"', "MAS512"),
        ('"a" in rv.score', "MAS512"),
        ("rv.cat in rv.ok", "MAS512"),
        ("rv.score > 3", None),
        ("rv.cat in rv.tags", None),
        ("len(rv.tags) > rv.score and rv.ok", None),
        ('rv.cat in "abc"', None),
        ("rv.score == len(rv.cat)", None),
    ],
)
def test_conditions_over_typed_fields(condition: str, code: str | None) -> None:
    text = TYPED_CONDITION.replace("until: len(rv.score) > 3", f"until: '{condition}'")
    report = validate_text(text, "spec.yaml")
    found = [(p.code, p.pointer) for p in report.problems if p.severity == "error"]
    if code is None:
        assert found == [], report.format()
    else:
        assert found == [(code, "/workflow/1/until")], report.format()
        assert report.problems[0].line == 20


RUNTIME_CONDITION = """
spec_version: "1"
name: runtime-condition
inputs:
  x: {type: [integer, string]}
outputs: {r: r}
models: {m: {model: test-model}}
agents: {a: {role: r, model: m}}
tools:
  ident:
    code: |
      def ident(v: int) -> int:
          return v
workflow:
  - id: pick
    kind: branch
    cases:
      - when: len(x) > 1
        steps: [{id: long, kind: tool, tool: ident, args: {v: 1}, out: r}]
    else: [{id: short, kind: tool, tool: ident, args: {v: 2}, out: r}]
"""


def test_a_condition_that_fails_at_run_time_is_coded_and_located(tmp_path: Path) -> None:
    report = validate_text(RUNTIME_CONDITION, "spec.yaml")
    assert report.ok and report.spec is not None, report.format()
    compile_to(report.spec, tmp_path / "build")
    rc, out, _, stderr = run_package(tmp_path / "build", {"x": "abc"}, None)
    assert rc == 0 and out["outputs"]["r"] == 1, stderr
    rc, out, _, _ = run_package(tmp_path / "build", {"x": 5}, None)
    assert rc == 1 and out["status"] == "error"
    error = out["error"]
    assert error["code"] == "condition", error
    assert error["spec_pointer"] == "/workflow/0/cases/0/when"
    assert error["step"] == "pick" and "TypeError" in error["message"]
