"""The invalid-spec corpus (tests/invalid/) and the `mas2c validate` command line.

Each corpus file is a small spec with one deliberate mistake, named
`<CODE>-<short-name>.yaml`, whose leading comments say what the validator must
report:

    # expect: MAS301 /workflow/0/prompt 8:79     code, JSON pointer ("" = root), line:column
    # hint: did you mean `question`?            (optional) a substring of that problem's hint
    # message: is not an input                  (optional) a substring of its message

Several `# expect:` lines may follow each other; `# hint:` and `# message:` lines
belong to the `# expect:` line above them. Line and column are given where they are meaningful
(a typo inside a prompt, a syntax error inside a tool's code block).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mas2c import cli
from mas2c.lang.validate import PROBLEM_CODES, Problem, Report, validate_file, validate_text

CORPUS = Path(__file__).resolve().parent / "invalid"
FILES = sorted(CORPUS.glob("*.yaml"))
NAME = re.compile(r"^(MAS\d{3})-[a-z0-9]+(-[a-z0-9]+)*\.yaml$")
EXPECT = re.compile(r"^# expect: (MAS\d{3}) (\S+)(?: (\d+):(\d+))?\s*$")
DETAIL = re.compile(r"^# (hint|message): (.+?)\s*$")
WARNINGS = {code for code, text in PROBLEM_CODES.items() if "(warning)" in text}
JSON_KEYS = {"code", "severity", "pointer", "line", "column", "message", "hint"}


@dataclass
class Expectation:
    code: str
    pointer: str
    position: tuple[int, int] | None
    hints: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        place = f" at {self.position[0]}:{self.position[1]}" if self.position else ""
        return f"{self.code} {self.pointer or '/'}{place}"


def expectations(path: Path) -> list[Expectation]:
    found: list[Expectation] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := EXPECT.match(line):
            code, pointer, row, column = match.groups()
            position = (int(row), int(column)) if row else None
            found.append(Expectation(code, "" if pointer == '""' else pointer, position))
        elif (match := DETAIL.match(line)) and found:
            kind, text = match.groups()
            (found[-1].hints if kind == "hint" else found[-1].messages).append(text)
        elif not line.startswith("#"):
            break
    return found


def _matches(expected: Expectation, problem: dict[str, Any]) -> bool:
    if (problem["code"], problem["pointer"]) != (expected.code, expected.pointer):
        return False
    if expected.position and (problem["line"], problem["column"]) != expected.position:
        return False
    return all(hint in (problem["hint"] or "") for hint in expected.hints) and all(
        text in problem["message"] for text in expected.messages
    )


def assert_expected(path: Path, problems: list[dict[str, Any]], shown: str) -> None:
    for expected in expectations(path):
        assert any(_matches(expected, p) for p in problems), (
            f"{path.name}: expected {expected}"
            + (f" with hint containing {expected.hints}" if expected.hints else "")
            + (f" with message containing {expected.messages}" if expected.messages else "")
            + f", got:\n{shown}"
        )


def expects_errors(path: Path) -> bool:
    return any(e.code not in WARNINGS for e in expectations(path))


def _problems(report: Report) -> list[dict[str, Any]]:
    return [p.to_json() for p in report.problems]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`mas2c ARGS` in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mas2c.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert not re.search(r"^\w+(Error|Exception)\b", stderr, re.MULTILINE), stderr


# -- the corpus itself -----------------------------------------------------------------------


def test_corpus_is_not_empty() -> None:
    assert len(FILES) >= len(PROBLEM_CODES)


def test_every_problem_code_has_a_corpus_file() -> None:
    covered = {match.group(1) for path in FILES if (match := NAME.match(path.name))}
    missing = sorted(set(PROBLEM_CODES) - covered)
    assert not missing, f"no file in tests/invalid/ exercises {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_corpus_file_is_well_formed(path: Path) -> None:
    match = NAME.match(path.name)
    assert match, f"{path.name}: name it <CODE>-<short-name>.yaml (lowercase, dashes)"
    assert match.group(1) in PROBLEM_CODES, f"{path.name}: {match.group(1)} is no problem code"
    found = expectations(path)
    assert found, f"{path.name}: the first line must be `# expect: <CODE> <pointer> [line:col]`"
    assert path.read_text(encoding="utf-8").startswith("# expect: ")
    assert found[0].code == match.group(1), f"{path.name}: the name and `# expect:` disagree"
    for expected in found:
        assert expected.pointer == "" or expected.pointer.startswith("/"), expected


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_corpus_file_yields_its_problem(path: Path) -> None:
    report = validate_file(path)
    assert_expected(path, _problems(report), report.format())
    for problem in report.problems:
        _assert_well_formed(problem)
    if expects_errors(path):
        assert not report.ok, report.format()
    else:
        # A warning file is otherwise valid: warnings never make a spec invalid.
        assert report.ok, report.format()
        assert report.spec is not None
        assert {p.code for p in report.problems} <= WARNINGS, report.format()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_corpus_file_through_the_cli(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(CORPUS)
    code = cli.main(["validate", "--json", path.name])
    out, err = capsys.readouterr()
    assert code == (1 if expects_errors(path) else 0), out
    assert err == ""
    (data,) = json.loads(out)["reports"]
    assert data["path"] == path.name
    assert data["valid"] is not expects_errors(path)
    assert data["errors"] + data["warnings"] == len(data["problems"])
    assert_expected(path, data["problems"], json.dumps(data["problems"], indent=1))
    for problem in data["problems"]:
        assert set(problem) == JSON_KEYS


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_corpus_file_text_report(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["validate", str(path)])
    out, err = capsys.readouterr()
    text = out + err
    first = expectations(path)[0]
    assert f" {first.code} at {first.pointer or '/'}:" in text, text
    if first.position:
        assert f"{path}:{first.position[0]}:{first.position[1]}: " in text, text
    verdict = "invalid" if code else "valid"
    assert text.rstrip().endswith(
        f"({len(_errors(text))} error(s), {len(_warnings(text))} warning(s))"
    )
    assert f"{path}: {verdict} (" in text
    # Errors go to stderr, a clean (or warning-only) report to stdout.
    assert (err if code else out).strip(), text


def _errors(text: str) -> list[str]:
    return re.findall(r": error MAS\d{3} at ", text)


def _warnings(text: str) -> list[str]:
    return re.findall(r": warning MAS\d{3} at ", text)


def _assert_well_formed(problem: Problem) -> None:
    assert problem.code in PROBLEM_CODES
    assert problem.severity == ("warning" if problem.code in WARNINGS else "error")
    assert problem.pointer == "" or problem.pointer.startswith("/")
    assert problem.message and "\n" not in problem.message.strip("\n")
    assert (problem.line is None) == (problem.column is None)
    if problem.line is not None:
        assert problem.line >= 1 and problem.column is not None and problem.column >= 1


def test_whole_corpus_in_one_process_never_tracebacks() -> None:
    """Several files at once: one report per file, in order; invalid ones make the exit 1."""
    result = run_cli("validate", "--json", *(path.name for path in FILES), cwd=CORPUS)
    assert_no_traceback(result.stderr)
    assert result.returncode == 1, result.stderr
    reports = json.loads(result.stdout)["reports"]
    assert [r["path"] for r in reports] == [path.name for path in FILES]
    for path, report in zip(FILES, reports, strict=True):
        assert_expected(path, report["problems"], json.dumps(report["problems"], indent=1))
        assert report["valid"] is not expects_errors(path)


# -- one pass reports everything ----------------------------------------------------------------

FIVE_SEMANTIC_ERRORS = """\
spec_version: "1"
name: many-mistakes
inputs: {question: {type: string}}
outputs: {answer: verdict}
models:
  cheap: {model: gpt-4o-mini}
agents:
  solver: {role: Solver, model: cheep, tools: [python, search]}
tools:
  python: {builtin: python_exec}
workflow:
  - {id: solve, kind: call, agent: solvr, prompt: "{{ question }}", out: draft}
  - {id: solve, kind: call, agent: solver, prompt: "{{ draft }} and {{ notes }}"}
  - id: refine
    kind: loop
    until: "draft.__class__ == 'str'"
    steps:
      - {id: again, kind: call, agent: solver, prompt: "{{ question }}", out: draft}
"""


def test_one_pass_reports_every_semantic_problem() -> None:
    report = validate_text(FIVE_SEMANTIC_ERRORS, "many.yaml")
    found = {(p.code, p.pointer) for p in report.problems}
    expected = {
        ("MAS203", "/agents/solver/model"),
        ("MAS202", "/agents/solver/tools/1"),
        ("MAS201", "/workflow/0/agent"),
        ("MAS204", "/workflow/1/id"),
        ("MAS301", "/workflow/1/prompt"),
        ("MAS501", "/workflow/2/max_iterations"),
        ("MAS303", "/workflow/2/until"),
        ("MAS205", "/outputs/answer"),
    }
    assert expected <= found, report.format()
    assert len({code for code, _ in expected}) >= 5
    # Reported in file order, each with its place.
    lines = [p.line or 0 for p in report.problems]
    assert lines == sorted(lines)
    assert all(p.line for p in report.problems)


def test_one_pass_reports_every_structural_problem() -> None:
    text = """\
spec_version: "1"
name: Many Mistakes
agents:
  solver: {role: Solver, temprature: 0.2, max_tool_rounds: 0}
workflow:
  - {id: solve, kind: call, agent: solver, promt: "x"}
  - {id: "bad id", kind: cal, agent: solver, prompt: "x"}
  - {id: vote, kind: ensemble, agent: solver, prompt: "x", vote: always}
"""
    report = validate_text(text, "structural.yaml")
    found = {(p.code, p.pointer) for p in report.problems}
    assert {
        ("MAS105", "/name"),
        ("MAS102", "/agents/solver/temprature"),
        ("MAS103", "/agents/solver/max_tool_rounds"),
        ("MAS102", "/workflow/0/promt"),
        ("MAS101", "/workflow/0/prompt"),
        ("MAS104", "/workflow/1/kind"),
        ("MAS103", "/workflow/2/vote"),
    } <= found, report.format()


# -- the command line ---------------------------------------------------------------------------

VALID = """\
spec_version: "1"
name: tiny
inputs: {question: {type: string}}
outputs: {answer: draft}
agents:
  solver: {role: Solver, instructions: "Answer with JSON like {\\"answer\\": 1}."}
workflow:
  - {id: solve, kind: call, agent: solver, prompt: "Solve: {{ question }}", out: draft}
"""


@pytest.fixture
def valid_spec(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(VALID, encoding="utf-8")
    return path


def test_cli_valid_spec(valid_spec: Path) -> None:
    result = run_cli("validate", str(valid_spec))
    assert result.returncode == 0, result.stderr
    assert "valid (0 error(s), 0 warning(s))" in result.stdout
    assert result.stderr == ""


def test_cli_json_shape(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(VALID.replace("prompt:", "promt:"), encoding="utf-8")
    result = run_cli("validate", "--json", str(path))
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    document = json.loads(result.stdout)
    assert set(document) == {"ok", "valid", "reports"} and document["ok"] is False
    (data,) = document["reports"]
    assert set(data) == {"path", "valid", "errors", "warnings", "problems"}
    assert data["path"] == str(path) and data["valid"] is False
    assert data["errors"] == len([p for p in data["problems"] if p["severity"] == "error"])
    for problem in data["problems"]:
        assert set(problem) == JSON_KEYS
        assert isinstance(problem["code"], str) and problem["code"] in PROBLEM_CODES
        assert problem["severity"] in ("error", "warning")
        assert isinstance(problem["pointer"], str)
        assert isinstance(problem["line"], int) and isinstance(problem["column"], int)
        assert isinstance(problem["message"], str)
        assert problem["hint"] is None or isinstance(problem["hint"], str)
    typo = next(p for p in data["problems"] if p["code"] == "MAS102")
    assert typo["pointer"] == "/workflow/0/promt"
    assert typo["hint"] == "did you mean `prompt`?"
    assert (typo["line"], typo["column"]) == (8, 44)  # the key itself


def test_cli_text_report_shows_place_and_hint(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(VALID.replace("prompt:", "promt:"), encoding="utf-8")
    result = run_cli("validate", str(path))
    assert result.returncode == 1
    assert f"{path}:8:44: error MAS102 at /workflow/0/promt: unknown key `promt`" in result.stderr
    assert "    hint: did you mean `prompt`?" in result.stderr


def test_cli_warnings_only_exit_zero(tmp_path: Path) -> None:
    path = tmp_path / "spare.yaml"
    path.write_text(VALID + "tools:\n  python: {builtin: python_exec}\n", encoding="utf-8")
    result = run_cli("validate", "--json", str(path))
    assert result.returncode == 0, result.stdout
    (data,) = json.loads(result.stdout)["reports"]
    assert data["valid"] is True and data["errors"] == 0 and data["warnings"] == 1
    assert data["problems"][0]["code"] == "MAS902"


def test_cli_nonexistent_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_cli("validate", str(missing))
    assert result.returncode == 2
    assert_no_traceback(result.stderr)
    assert str(missing) in result.stderr and "no such file" in result.stderr
    assert result.stdout == ""


def test_cli_directory(tmp_path: Path) -> None:
    result = run_cli("validate", "--json", str(tmp_path))
    assert result.returncode == 2
    assert_no_traceback(result.stderr)
    assert str(tmp_path) in result.stderr and "directory" in result.stderr.lower()


def test_cli_missing_argument() -> None:
    result = run_cli("validate")
    assert result.returncode == 2
    assert_no_traceback(result.stderr)
    assert "usage:" in result.stderr


def test_cli_one_missing_among_several(valid_spec: Path, tmp_path: Path) -> None:
    result = run_cli("validate", str(valid_spec), str(tmp_path / "gone.yaml"))
    assert result.returncode == 2
    assert_no_traceback(result.stderr)
    assert "gone.yaml" in result.stderr


NON_UTF8 = {
    "binary": b"\xff\xfe\x00\x01\x02binary\x00\x00",
    "latin-1": "spec_version: '1'\nname: caf\xe9\n".encode("latin-1"),
    "all-bytes": bytes(range(256)),
}

UNUSABLE = {  # name: (content, the one problem expected)
    "empty": ("", "MAS002"),
    "blank": ("\n\n   \n", "MAS002"),
    "comment": ("# only a comment\n", "MAS002"),
    "list": ("- a\n- b\n", "MAS002"),
    "scalar": ("42\n", "MAS002"),
    "null": ("null\n", "MAS002"),
    "open-brace": ("{\n", "MAS001"),
    "open-bracket": ("a: [1, 2\n", "MAS001"),
    "bad-indent": ("key: value\n  bad: indent\n", "MAS001"),
    "duplicate-key": ("a: 1\na: 2\n", "MAS001"),
    "recursive-alias": ("x: &a [*a]\n", "MAS001"),
    "huge-int": ("big: " + "9" * 5000 + "\n", "MAS001"),
    "deep-nesting": ("deep: " + "[" * 1000 + "]" * 1000 + "\n", "MAS001"),
    "control-chars": ("\x00\x01", "MAS001"),
    "python-tag": ("!!python/object/apply:os.system [ls]\n", "MAS001"),
}


@pytest.mark.parametrize("name", sorted(NON_UTF8))
def test_cli_non_utf8_file(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(NON_UTF8[name])
    assert cli.main(["validate", "--json", str(path)]) == 1
    problems = json.loads(capsys.readouterr().out)["reports"][0]["problems"]
    assert [p["code"] for p in problems] == ["MAS001"]
    assert "UTF-8" in problems[0]["message"] and "UTF-8" in problems[0]["hint"]


@pytest.mark.parametrize("name", sorted(UNUSABLE))
def test_cli_unusable_document(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    content, code = UNUSABLE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(content, encoding="utf-8")
    assert cli.main(["validate", "--json", str(path)]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    problems = json.loads(out)["reports"][0]["problems"]
    assert [p["code"] for p in problems] == [code], problems


def test_cli_unusable_documents_in_a_real_process(tmp_path: Path) -> None:
    """All of the above at once, in a fresh interpreter: no traceback, one report each."""
    paths = []
    for name, data in NON_UTF8.items():
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_bytes(data)
    for name, (content, _) in UNUSABLE.items():
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(content, encoding="utf-8")
    result = run_cli("validate", "--json", *map(str, paths))
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    reports = json.loads(result.stdout)["reports"]
    assert [r["path"] for r in reports] == list(map(str, paths))
    expected = ["MAS001"] * len(NON_UTF8) + [code for _, code in UNUSABLE.values()]
    assert [[p["code"] for p in r["problems"]] for r in reports] == [[c] for c in expected]
    result = run_cli("validate", *map(str, paths))  # the text report too
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert result.stderr.count(": invalid (1 error(s), 0 warning(s))") == len(paths)


def test_cli_json_spec_files(tmp_path: Path, valid_spec: Path) -> None:
    import yaml

    good = tmp_path / "tiny.json"
    good.write_text(json.dumps(yaml.safe_load(VALID), indent=2), encoding="utf-8")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "spec_version": "1",\n  "name": "x",\n}\n', encoding="utf-8")
    result = run_cli("validate", "--json", str(good), str(bad))
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    first, second = json.loads(result.stdout)["reports"]
    assert first["valid"] is True and first["problems"] == []
    assert [(p["code"], p["line"]) for p in second["problems"]] == [("MAS001", 4)]


def test_cli_several_files(valid_spec: Path) -> None:
    corpus_file = CORPUS / "MAS201-unknown-call-agent.yaml"
    warning_file = CORPUS / "MAS901-unused-agent.yaml"
    result = run_cli("validate", "--json", str(valid_spec), str(warning_file))
    assert result.returncode == 0, result.stdout
    assert [r["valid"] for r in json.loads(result.stdout)["reports"]] == [True, True]
    result = run_cli("validate", "--json", str(valid_spec), str(corpus_file), str(warning_file))
    assert result.returncode == 1
    reports = json.loads(result.stdout)["reports"]
    assert [r["valid"] for r in reports] == [True, False, True]
    assert [r["path"] for r in reports] == [str(valid_spec), str(corpus_file), str(warning_file)]
    result = run_cli("validate", str(valid_spec), str(corpus_file))
    assert result.returncode == 1
    assert f"{valid_spec}: valid" in result.stdout
    assert f"{corpus_file}: invalid (1 error(s), 0 warning(s))" in result.stderr


def test_validation_emits_no_python_warnings() -> None:
    """Tool code and conditions are parsed, never compiled: CPython's warnings stay silent."""
    text = VALID.replace(
        "workflow:",
        'tools:\n  t:\n    code: |\n      def t():\n          return "\\d" is 1\nworkflow:',
    ).replace("{role: Solver,", "{role: Solver, tools: [t],")
    text += '  - {id: loop, kind: loop, max_iterations: 2, until: "\'\\\\d\' in draft", steps: [{id: again, kind: call, agent: solver, prompt: "{{ draft }}", out: draft}]}\n'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = validate_text(text, "warnings.yaml")
    assert report.problems == [], report.format()
    assert [str(w.message) for w in caught] == []
