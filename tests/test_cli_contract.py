"""The command line's contract (issue 13 items 1, 4, 5; issue 12 item 4; issue 14 item 2).

- Nothing of the user's is lost: `compile -o DIR` refuses a folder holding files it did
  not write, and leaves it untouched; `-o FILE` never creates folders.
- Scripts first: with `--json`, every verb prints exactly one JSON document on stdout,
  in success and in failure, `ok` matching the exit code; `-` reads stdin.
- One error tree: every failure carries a stable code, kind and exit code.
- Lazy: `mas2c run BUILD` imports neither the compiler nor the spec's pydantic models.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, SPECS, cli_env, mas2c, private_null

from mas2c import errors
from mas2c.testserver import LLMTestServer

COT = SPECS / "chain-of-thought.yaml"
DEBATE = SPECS / "debate.yaml"
QUESTION = {"question": "What is 12 + 30?"}


def document(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """Exactly one JSON object on stdout, `ok` true exactly when the exit code is 0."""
    data = json.loads(proc.stdout)
    assert isinstance(data, dict), proc.stdout
    assert data["ok"] is (proc.returncode == 0), (proc.returncode, proc.stdout, proc.stderr)
    if not data["ok"] and "error" in data:
        error = data["error"]
        assert set(error) >= {"code", "kind", "type", "message", "exit_code"}
        assert error["exit_code"] == proc.returncode
        assert error["kind"] in ("usage", "invalid_input", "failure")
    assert "Traceback" not in proc.stderr, proc.stderr
    return data


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


# -- 1. nothing of the user's is lost ------------------------------------------------------------


def test_compile_refuses_a_folder_with_a_user_file_and_leaves_it_untouched(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine\n")
    (project / "src").mkdir()
    (project / "src" / "app.py").write_text("print('mine')\n")
    before = tree(project)
    for extra in ([], ["--json"]):
        proc = mas2c("compile", COT, "-o", project, *extra, cwd=tmp_path, inprocess=True)
        assert proc.returncode == 2, proc.stderr
        assert "notes.txt" in proc.stderr and "--force" in proc.stderr
        assert tree(project) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temp leftovers
    assert document(proc)["error"]["code"] == "output_refused"
    # `-o .` inside a project folder: the same refusal
    proc = mas2c("compile", COT, "-o", ".", cwd=project, inprocess=True)
    assert proc.returncode == 2 and tree(project) == before


def test_compile_replaces_an_earlier_build_but_not_an_edited_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert mas2c("compile", DEBATE, "-o", out, cwd=tmp_path, inprocess=True).returncode == 0
    (out / "mas2c_debate" / "__pycache__").mkdir()
    (out / "mas2c_debate" / "__pycache__" / "x.pyc").write_bytes(b"derived")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "k.json").write_text("{}")
    proc = mas2c("compile", COT, "-o", out, "--json", cwd=tmp_path, inprocess=True)
    assert document(proc)["replaced"] == "earlier_build"
    assert (out / "mas2c_chain_of_thought").is_dir() and not (out / "mas2c_debate").exists()
    assert (out / "checkpoints" / "k.json").read_text() == "{}"  # a run's checkpoints survive
    # a generated file edited by hand is the user's now: refused
    (out / "README.md").write_text("my notes\n")
    before = tree(out)
    proc = mas2c("compile", DEBATE, "-o", out, cwd=tmp_path, inprocess=True)
    assert proc.returncode == 2 and "README.md" in proc.stderr
    assert tree(out) == before


def test_force_adds_the_build_and_deletes_nothing(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine\n")
    proc = mas2c("compile", COT, "-o", project, "--force", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 0, proc.stderr
    assert (project / "notes.txt").read_text() == "mine\n"
    assert (project / "MANIFEST.json").is_file()


def _seed_user_files(folder: Path, files: dict[str, str]) -> dict[str, bytes]:
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return tree(folder)


@pytest.mark.parametrize(
    "user_files",
    [
        {"notes.txt": "mine\n"},  # a folder that is no run folder at all
        {"run.json": "{}", "build/sub/mine.txt": "mine\n"},  # a user file inside build/
        {"run.json": "{}", "stdout.txt": "x", "plan.md": "mine\n"},  # beside a run's files
    ],
)
def test_run_refuses_a_run_dir_holding_user_files(
    user_files: dict[str, str], tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """`--run-dir` is filled as a whole: only a new, empty or earlier run folder is used;
    anything else is refused before anything is written (nothing overwritten or deleted)."""
    run_dir = tmp_path / "r"
    before = _seed_user_files(run_dir, user_files)
    (tmp_path / "in.json").write_text(json.dumps(QUESTION))
    argv = ["run", COT, "--input", tmp_path / "in.json", "--run-dir", run_dir]
    argv += ["--sandbox", "local", "--llm", llm_server.base_url, "--json"]
    proc = mas2c(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert document(proc)["error"]["code"] == "output_refused"
    assert tree(run_dir) == before and not llm_server.requests


def test_run_reuses_an_earlier_run_folder(tmp_path: Path, llm_server: LLMTestServer) -> None:
    (tmp_path / "in.json").write_text(json.dumps(QUESTION))
    argv = ["run", COT, "--input", tmp_path / "in.json", "--run-dir", tmp_path / "r"]
    argv += ["--sandbox", "local", "--llm", llm_server.base_url]
    for _ in range(2):
        proc = mas2c(*argv, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r" / "result.json").read_text())["status"] == "ok"


def test_batch_refuses_a_run_dir_holding_user_files(tmp_path: Path) -> None:
    """A batch folder is resumed only when it is one (config.json) holding a batch's own
    entries: a user's file under rows/ or beside results is refused, untouched."""
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps({"id": "1", "question": "q", "answer": "a"}) + "\n")
    for files in ({"report.txt": "mine"}, {"config.json": "{}", "rows/1/mine.txt": "mine"}):
        run_dir = tmp_path / f"b{len(files)}"
        before = _seed_user_files(run_dir, files)
        argv = ["batch", dataset, "--spec", COT, "--run-dir", run_dir, "--sandbox", "local"]
        proc = mas2c(*argv, "--llm", "http://127.0.0.1:9/v1", "--json", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert document(proc)["error"]["code"] == "output_refused", proc.stdout
        assert tree(run_dir) == before


ESCAPES = r"""spec_version: "1"
name: esc
inputs:
  x: {type: integer}
outputs:
  r: r
models:
  m: {model: test-model}
agents:
  a: {role: r, instructions: i, model: m}
tools:
  boom:
    code: |
      def boom(x: int) -> int:
          raise ValueError("\x1b[2J\x1b]0;PWNED\x07\x9b31m\u202efake: ok\r\x1b[K")
workflow:
  - {id: c, kind: call, agent: a, prompt: "hi {{ x }}", out: w}
  - {id: t, kind: tool, tool: boom, args: {x: "{{ x }}"}, out: r}
"""


def test_what_a_program_wrote_reaches_the_terminal_escaped(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """A tool's error message quoted on stderr cannot drive the user's terminal."""
    (tmp_path / "esc.yaml").write_text(ESCAPES)
    (tmp_path / "in.json").write_text('{"x": 1}')
    argv = ["run", tmp_path / "esc.yaml", "--input", tmp_path / "in.json"]
    argv += ["--run-dir", tmp_path / "r", "--sandbox", "local", "--llm", llm_server.base_url]
    proc = mas2c(*argv, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "PWNED" in proc.stderr and "\\x1b]0;PWNED\\x07" in proc.stderr
    for control in ("\x1b", "\x07", "\x9b", "\u202e", "\r"):
        assert control not in proc.stderr


def test_writing_to_a_device_leaves_the_device(tmp_path: Path) -> None:
    """`-o /dev/null` (or a FIFO, /dev/stdout): written in place, never renamed over."""
    null = str(private_null(tmp_path))
    pool = tmp_path / "pool.yaml"
    pool.write_text("models:\n  cheap: {model: small}\n")
    configure = ["configure", str(COT), "--pool", str(pool), "--rule", "-o", null]
    for argv in (["schema", "-o", null], configure):
        proc = mas2c(*argv, cwd=tmp_path, inprocess=True)
        assert proc.returncode == 0, proc.stderr
        assert stat.S_ISCHR(os.stat(null).st_mode)


def test_a_swap_stopped_between_its_renames_puts_the_earlier_build_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the earlier build moved aside but before the new one moved in: the
    earlier build is put back (it was left as a hidden .DIR.old-PID, the folder gone)."""
    from mas2c import files

    out = _built(tmp_path, COT, "build")
    before = tree(out)
    real = os.replace
    calls: list[str] = []

    def interrupted_second_rename(src: Any, dst: Any) -> None:
        calls.append(str(src))
        if len(calls) == 2:  # staging -> target
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt):
        files.write_tree_atomic(out, {"x.txt": b"new"})
    monkeypatch.undo()
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]  # nothing hidden left


def test_build_folder_modes_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "a" / "out"
        assert mas2c("compile", COT, "-o", out, cwd=tmp_path, inprocess=True).returncode == 0
    finally:
        os.umask(old)
    for folder in (out, out / "mas2c_chain_of_thought"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    assert stat.S_IMODE((out / "MANIFEST.json").stat().st_mode) == 0o644


def test_a_run_under_umask_077_works_and_keeps_its_files_private(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """The run folder follows a strict umask (0600/0700), and the program still reads its
    own job (as root the unisolated backend runs it as nobody: a 0600 job file stopped it)."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c.cli", "run", str(COT), "--input",
         str(write_json(tmp_path / "in.json", QUESTION)), "--sandbox", "unisolated",
         "--llm", llm_server.base_url, "--run-dir", str(run_dir), "-q"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300, umask=0o077,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    for name in ("result.json", "trace.jsonl", "usage.json", "spec.json", "build/MANIFEST.json"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o600, name


@pytest.mark.parametrize(
    "args",
    [
        ["schema", "-o", "{missing}/x.json"],
        ["configure", str(COT), "--pool", "{pool}", "--rule", "-o", "{missing}/x.yaml"],
        [
            "configure",
            str(COT),
            "--pool",
            "{pool}",
            "--llm",
            "{url}",
            "--rebind",
            "-o",
            "{missing}/x.yaml",
        ],
        ["generate", "a task", "--llm", "{url}", "-o", "{missing}/x.yaml"],
    ],
    ids=["schema", "configure", "configure-llm", "generate"],
)
def test_output_files_never_create_folders(
    tmp_path: Path, args: list[str], llm_server: LLMTestServer
) -> None:
    """...and an output that cannot be written is refused before any LLM request."""
    pool = write_json(tmp_path / "pool.json", {"models": {"m": {"model": "gpt-4o-mini"}}})
    missing = tmp_path / "missing" / "dir"
    argv = [a.format(missing=missing, pool=pool, url=llm_server.base_url) for a in args]
    proc = mas2c(*argv, "--json", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 2
    assert document(proc)["error"]["code"] == "usage"
    assert "does not exist" in proc.stderr
    assert not (tmp_path / "missing").exists()
    assert llm_server.requests == []


def test_an_output_symlink_is_written_through_and_an_existing_files_mode_kept(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """`-o FILE` writes as an ordinary write would: a symlink's target gets the text (the
    link was replaced by a regular file, the target left stale), an existing file keeps
    its mode (a 0640 file became 0644: readable by all); a dangling link into a missing
    folder is refused, naming that folder, before any LLM request."""
    real = tmp_path / "real.json"
    real.write_text("old")
    real.chmod(0o600)
    (tmp_path / "link.json").symlink_to("real.json")
    private = tmp_path / "private.json"
    private.write_text("old")
    private.chmod(0o640)
    for name in ("link.json", "private.json"):
        proc = mas2c("schema", "-o", name, "--json", cwd=tmp_path, inprocess=True)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "link.json").is_symlink()
    assert json.loads(real.read_text())["title"] and stat.S_IMODE(real.stat().st_mode) == 0o600
    assert json.loads(private.read_text())["title"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o640
    (tmp_path / "dangling.yaml").symlink_to("missing/x.yaml")
    proc = mas2c("generate", "a task", "--llm", llm_server.base_url, "-o", "dangling.yaml",
                 "--json", cwd=tmp_path, inprocess=True)  # fmt: skip
    assert proc.returncode == 2 and document(proc)["error"]["code"] == "usage"
    assert f"{tmp_path / 'missing'} does not exist" in proc.stderr, proc.stderr
    assert llm_server.requests == [] and not (tmp_path / "missing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dangling.yaml", "link.json", "private.json", "real.json"
    ]  # fmt: skip


def _with_file_size_limit(
    limit: int, *argv: str | Path, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """The CLI with RLIMIT_FSIZE: a write past `limit` bytes fails with EFBIG, as on a
    full disk (Python ignores SIGXFSZ), without root or a small mount."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "mas2c.cli", *map(str, argv), "--json"], cwd=cwd, env=cli_env(),
        capture_output=True, text=True, timeout=120, preexec_fn=limited,
    )  # fmt: skip


def test_a_full_disk_leaves_nothing_half_written_and_is_a_file_io_failure(
    tmp_path: Path,
) -> None:
    """A write that fails for want of space: exit 1, `file_io` (not a usage error: the
    output was right), and nothing half-written: an empty output folder stays empty (it
    kept the files written before the failure), an earlier build and an existing file
    stay as they were, a new folder is not made, no temporary file is left."""
    (tmp_path / "empty").mkdir()
    earlier = _built(tmp_path, name="earlier")
    before = tree(earlier)
    existing = tmp_path / "schema.json"
    existing.write_text("mine\n")
    cases = [
        ["compile", COT, "-o", "empty"],
        ["compile", COT, "-o", "new"],
        ["compile", COT, "-o", "earlier"],
        ["schema", "-o", "schema.json"],
    ]
    for argv in cases:
        proc = _with_file_size_limit(16 << 10, *argv, cwd=tmp_path)
        assert proc.returncode == 1, (argv, proc.stdout, proc.stderr)
        error = document(proc)["error"]
        assert error["code"] == "file_io" and "cannot write" in error["message"], error
        assert "Traceback" not in proc.stderr
    assert list((tmp_path / "empty").iterdir()) == []
    assert tree(earlier) == before and existing.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "empty", "schema.json"]


def test_writing_to_a_read_only_or_full_place_is_coded_by_whose_move_it_is() -> None:
    """The place the user named is wrong (read-only, no permission): usage, exit 2; the
    machine is short (no space, quota, I/O error): file_io, exit 1."""
    import errno

    for code, expected in [
        (errno.EROFS, ("usage", 2)), (errno.EACCES, ("usage", 2)),
        (errno.ENOSPC, ("file_io", 1)), (errno.EDQUOT, ("file_io", 1)),
        (errno.EIO, ("file_io", 1)),
    ]:  # fmt: skip
        error = errors.write_error("out.json", OSError(code, os.strerror(code)))
        assert (error.code, error.exit_code) == expected, code
        assert str(error) == f"cannot write out.json: {os.strerror(code)}"


# -- 4. --json: one document per verb, success and failure ---------------------------------------

Case = Callable[[Path, LLMTestServer], list[str]]


def _built(tmp: Path, spec: Path = COT, name: str = "build") -> Path:
    out = tmp / name
    assert mas2c("compile", spec, "-o", out, cwd=tmp, inprocess=True).returncode == 0
    return out


def _pool(tmp: Path) -> Path:
    return write_json(tmp / "pool.json", {"models": {"m": {"model": "gpt-4o-mini"}}})


def _unbound(tmp: Path) -> Path:
    data = yaml.safe_load(COT.read_text())
    for agent in data["agents"].values():
        agent.pop("model", None)
    path = tmp / "unbound.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _ok_run(tmp: Path, server: LLMTestServer) -> Path:
    """A run folder of a successful run (for rectify: nothing to do)."""
    run_dir = tmp / "okrun"
    proc = mas2c(
        "run",
        _built(tmp),
        "--input",
        write_json(tmp / "in.json", QUESTION),
        "--sandbox",
        "unisolated",
        "--llm",
        server.base_url,
        "--run-dir",
        run_dir,
        cwd=tmp,
        inprocess=True,
    )
    assert proc.returncode == 0, proc.stderr
    return run_dir


SUCCESS: dict[str, Case] = {
    "validate": lambda t, s: ["validate", str(COT), str(DEBATE)],
    "schema": lambda t, s: ["schema"],
    "compile": lambda t, s: ["compile", str(COT), "-o", str(t / "out")],
    "graph": lambda t, s: ["graph", str(DEBATE)],
    "diff": lambda t, s: ["diff", str(_built(t, COT, "a")), str(_built(t, DEBATE, "b"))],
    "run": lambda t, s: [
        "run",
        str(_built(t)),
        "--input",
        str(write_json(t / "in.json", QUESTION)),
        "--sandbox",
        "unisolated",
        "--llm",
        s.base_url,
        "--run-dir",
        str(t / "run"),
    ],
    "configure": lambda t, s: ["configure", str(_unbound(t)), "--pool", str(_pool(t)), "--rule"],
    "rectify": lambda t, s: [
        "rectify",
        str(_ok_run(t, s)),
        "--sandbox",
        "unisolated",
        "--llm",
        s.base_url,
        "--no-llm",
    ],
    "sandbox": lambda t, s: ["sandbox", "status"],
    "report": lambda t, s: ["report", str(_ok_run(t, s)), "-o", str(t / "report.html")],
}

FAILURE: dict[str, tuple[Case, int, str]] = {
    "validate": (lambda t, s: ["validate", str(_broken(t))], 1, ""),
    "schema": (lambda t, s: ["schema", "-o", str(t / "no" / "x.json")], 2, "usage"),
    "compile": (lambda t, s: ["compile", str(_unbound(t))], 1, "not_compilable"),
    "graph": (lambda t, s: ["graph", str(_broken(t))], 1, "spec_invalid"),
    "diff": (lambda t, s: ["diff", str(COT), str(_built(t))], 2, "usage"),
    "run": (
        lambda t, s: [
            "run",
            str(COT),
            "--input",
            str(write_json(t / "in.json", {"q": 1})),
            "--sandbox",
            "unisolated",
            "--llm",
            s.base_url,
        ],
        1,
        "bad_input",
    ),
    "generate": (
        lambda t, s: ["generate", "  ", "-o", str(t / "spec.yaml"), "--llm", s.base_url],
        2,
        "usage",
    ),
    "configure": (
        lambda t, s: ["configure", str(COT), "--pool", str(t / "missing.yaml")],
        2,
        "usage",
    ),
    "solve": (
        lambda t, s: ["solve", "a task", "--input", str(t / "missing.json")],
        2,
        "usage",
    ),
    "rectify": (lambda t, s: ["rectify", str(t / "nope")], 2, "usage"),
    "sandbox": (lambda t, s: ["sandbox", "status"], 1, ""),
    "bench": (lambda t, s: ["bench", "humaneval", "--workers", "0"], 2, "usage"),
    "batch": (
        lambda t, s: ["batch", str(t / "missing.jsonl"), "--spec", str(COT)],
        2,
        "usage",
    ),
    "report": (lambda t, s: ["report", str(t / "missing")], 2, "usage"),
    "image": (lambda t, s: ["image", str(t / "missing"), "-t", "x:1"], 2, "usage"),
    "export": (
        lambda t, s: ["export", "otel", str(t / "missing"), "--endpoint", "http://127.0.0.1:9"],
        2,
        "usage",
    ),
    "unknown-verb": (lambda t, s: ["transmogrify"], 2, "usage"),
    "bad-flag": (lambda t, s: ["compile", str(COT), "--frobnicate"], 2, "usage"),
}


def _broken(tmp: Path) -> Path:
    path = tmp / "broken.yaml"
    path.write_text('spec_version: "1"\nname: Bad\n')
    return path


def test_every_verb_is_covered() -> None:
    from mas2c.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    names = set(verbs.choices)
    assert names <= set(FAILURE), names - set(FAILURE)
    # the verbs whose success needs an LLM conversation are covered by their own tests
    # (generate/solve: tests/test_solve.py, bench: tests/test_bench.py, batch:
    # tests/test_batch.py), all through --json
    # (export: tests/test_otel.py, against a real OTLP receiver; image: tests/test_image.py,
    # which builds and runs a real image)
    assert names - set(SUCCESS) == {"generate", "solve", "bench", "batch", "export", "image"}
    for name, sub in verbs.choices.items():
        assert any("--json" in a.option_strings for a in sub._actions), name


@pytest.mark.parametrize("verb", sorted(SUCCESS))
def test_json_success_is_one_document(
    verb: str, tmp_path: Path, llm_server: LLMTestServer, request: pytest.FixtureRequest
) -> None:
    if verb == "sandbox":
        request.getfixturevalue("docker_ready")
    argv = SUCCESS[verb](tmp_path, llm_server)
    proc = mas2c(*argv, "--json", cwd=tmp_path, inprocess=verb != "sandbox")
    if verb == "diff":  # two different builds: exit 1 = different, still a success document
        assert proc.returncode == 1, proc.stderr
        data = json.loads(proc.stdout)
        assert data["ok"] is True and data["kind"] == "build" and data["different"] is True
        assert {c["kind"] for c in data["changes"]} >= {"added", "removed"}
    else:
        assert proc.returncode == 0, proc.stderr
        data = document(proc)
    if verb == "validate":
        assert [r["path"] for r in data["reports"]] == [str(COT), str(DEBATE)]


@pytest.mark.parametrize("verb", sorted(FAILURE))
def test_json_failure_is_one_document(verb: str, tmp_path: Path, llm_server: LLMTestServer) -> None:
    case, exit_code, code = FAILURE[verb]
    env = cli_env(OPENAI_API_KEY="sk-test")
    if verb == "sandbox":
        env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    proc = mas2c(*case(tmp_path, llm_server), "--json", cwd=tmp_path, env=env, inprocess=True)
    assert proc.returncode == exit_code, (proc.stdout, proc.stderr)
    data = document(proc)
    assert data["ok"] is False
    if code:
        assert data["error"]["code"] == code, data
    if "error" in data:
        assert proc.stderr.strip(), "a human line on stderr too"


@pytest.mark.parametrize("action", [["build"], ["prune"], ["pool", "start"], ["pool", "stop"]])
def test_sandbox_actions_with_the_daemon_down_are_one_clear_line(
    tmp_path: Path, action: list[str]
) -> None:
    """Every `sandbox` action, the daemon down: one document, one line naming the daemon,
    no traceback (`pool start` showed the service's traceback from its log)."""
    env = cli_env(DOCKER_HOST="unix:///nonexistent/docker.sock")
    proc = mas2c("sandbox", *action, "--json", cwd=tmp_path, env=env, inprocess=True)
    data = document(proc)
    if action == ["pool", "stop"]:  # nothing runs: nothing to stop
        assert proc.returncode == 0 and data["stopped"] is False
        return
    assert proc.returncode == 1 and data["error"]["code"] == "sandbox"
    assert "daemon is not reachable" in data["error"]["message"]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("action", ["build", "status", "prune"])
def test_a_pool_action_after_another_sandbox_action_is_a_usage_error(
    tmp_path: Path, action: str
) -> None:
    """`sandbox prune stop` pruned (and `sandbox build start` built), ignoring the word:
    now a usage error before the daemon is asked anything."""
    env = cli_env(DOCKER_HOST="unix:///nonexistent/docker.sock")
    proc = mas2c("sandbox", action, "stop", "--json", cwd=tmp_path, env=env, inprocess=True)
    assert proc.returncode == 2, proc.stdout
    error = document(proc)["error"]
    assert error["code"] == "usage" and "`sandbox pool`" in error["message"], error


def test_report_o_is_judged_like_every_output_file(tmp_path: Path) -> None:
    """`report -o` into a folder, or through a dangling link, is refused before the page
    is made (it checked only that the folder exists), like every `-o FILE`."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "dangling.html").symlink_to("missing/x.html")
    for name, says in (("folder", "is a folder"), ("dangling.html", "does not exist")):
        proc = mas2c("report", "run", "-o", name, "--json", cwd=tmp_path, inprocess=True)
        assert proc.returncode == 2 and says in document(proc)["error"]["message"], proc.stdout
    assert not (tmp_path / "missing").exists()


def test_report_of_a_file_says_it_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text("{}")
    proc = mas2c("report", "in.json", "--json", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 2 and "in.json: not a folder" in document(proc)["error"]["message"]


def test_validate_json_is_one_document_for_one_file_and_for_two() -> None:
    one = mas2c("validate", COT, "--json", cwd=ROOT, inprocess=True)
    two = mas2c("validate", COT, DEBATE, "--json", cwd=ROOT, inprocess=True)
    assert set(document(one)) == set(document(two)) == {"ok", "valid", "reports"}
    assert len(document(one)["reports"]) == 1 and len(document(two)["reports"]) == 2


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_prints_one_json_document(tmp_path: Path, sig: str) -> None:
    """Ctrl-C (or a SIGTERM) during a run: exit 130, one `interrupted` document on stdout."""
    import signal
    import time

    write_json(tmp_path / "in.json", QUESTION)
    with LLMTestServer(latency_s=60) as slow:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mas2c.cli", "run", str(COT), "--input", "in.json",
             "--sandbox", "unisolated", "--llm", slow.base_url, "--run-dir", "r", "--json"],
            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not slow.requests and time.monotonic() < deadline:  # the program is waiting
            time.sleep(0.1)
        assert slow.requests, "the run never reached the LLM"
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    data = json.loads(out)
    assert data["ok"] is False and data["error"]["code"] == "interrupted"
    assert "Traceback" not in err and "interrupted" in err


def test_a_dead_endpoint_is_named_once_in_solves_one_error(tmp_path: Path) -> None:
    """The meta-agents' gateway is an implementation detail: the error names the endpoint
    (without its credentials), not the gateway's internal URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://user:hunter2@127.0.0.1:{port}/v1"
    write_json(tmp_path / "in.json", QUESTION)
    proc = mas2c("solve", "a task", "--input", "in.json", "--llm", url, "--run-dir", "s",
                 "--sandbox", "unisolated", "--json", cwd=tmp_path, inprocess=True)  # fmt: skip
    assert proc.returncode == 1
    message = document(proc)["error"]["message"]
    assert f"127.0.0.1:{port}" in message and "failed after 4 attempts" in message, message
    assert "mas2c-gateway" not in message and "hunter2" not in proc.stdout + proc.stderr


def test_json_before_the_verb_and_version_json_are_one_document(tmp_path: Path) -> None:
    proc = mas2c("--json", "schema", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 0 and document(proc)["schema"]["title"]
    proc = mas2c("--json", "validate", "missing.yaml", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 2 and document(proc)["error"]["code"] == "usage"
    proc = mas2c("--json", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 2 and "no verb" in document(proc)["error"]["message"]
    proc = mas2c("--version", "--json", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 0 and document(proc)["version"]


def _verbs() -> list[list[str]]:
    """`mas2c` itself and every verb, from the argparse tree."""
    from mas2c.cli import build_parser

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [[], *([name] for name in sorted(verbs.choices))]


VERBS = _verbs()


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0] if v else "mas2c")
@pytest.mark.parametrize("spelling", [["--help", "--json"], ["--json", "-h"], ["-h", "--js"]])
def test_help_with_json_is_one_document_describing_the_arguments(
    verb: list[str], spelling: list[str], tmp_path: Path
) -> None:
    """`mas2c [VERB] --help --json` printed argparse's text help on stdout: now one
    document, `help` describing every argument as data (exit 0), and nothing written."""
    from mas2c.cli import build_parser

    proc = mas2c(*verb, *spelling, cwd=tmp_path, inprocess=True)
    assert proc.returncode == 0, proc.stderr
    help_ = document(proc)["help"]
    assert help_["prog"] == " ".join(["mas2c", *verb])
    assert help_["usage"].startswith(help_["prog"]) and "usage:" in help_["text"]
    parser = build_parser()
    if verb:
        parser = next(
            a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
        ).choices[verb[0]]
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    flags = {f for a in help_["arguments"] for f in a["flags"]}
    assert flags == {f for a in shown for f in a.option_strings}
    assert all(a["help"] for a in help_["arguments"] if a["flags"]), help_["arguments"]
    assert ("--json" in flags) is bool(verb) and ("--version" in flags) is not bool(verb)
    if not verb:
        assert {v["name"] for v in help_["verbs"]} == {name for [name] in VERBS[1:]}
        assert all(v["help"] for v in help_["verbs"])
    assert not any(tmp_path.iterdir())
    text = mas2c(*verb, "--help", cwd=tmp_path, inprocess=True)  # without --json: the text
    assert text.returncode == 0 and text.stdout == help_["text"]


def _usage_cases() -> list[list[str]]:
    """Per verb: an unknown flag, a flag without its value, and no argument at all."""
    from mas2c.cli import build_parser

    cases: list[list[str]] = [[], ["no-such-verb"], ["--no-such-flag"]]
    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in sorted(verbs.choices.items()):
        cases += [[name, "x", "--no-such-flag"], [name, "x", "y", "z", "w", "--no-such-flag"]]
        valued = next((a for a in sub._actions if a.option_strings and a.nargs != 0), None)
        if valued is not None:
            cases.append([name, "x", valued.option_strings[-1]])
        if any(not a.option_strings and a.nargs not in ("?", "*") for a in sub._actions):
            cases.append([name])
    return cases


@pytest.mark.parametrize("argv", _usage_cases(), ids="-".join)
def test_a_usage_error_with_json_is_one_usage_document(argv: list[str], tmp_path: Path) -> None:
    """An unknown flag, a flag missing its value, a missing argument, an unknown verb:
    with `--json` (also abbreviated `--js`, or before the verb), one `usage` document
    carrying argparse's message, exit 2; without it, the usage text on stderr; nothing
    written either way."""
    text = mas2c(*argv, cwd=tmp_path, inprocess=True)
    assert text.returncode == 2 and not text.stdout, (argv, text.stdout)
    said = text.stderr.strip().splitlines()[-1].partition("error: ")[2] or text.stderr
    for spelling in ([*argv, "--json"], [*argv, "--js"], ["--json", *argv]):
        if argv and argv[-1].startswith("--") and argv[-1] != "--no-such-flag":
            spelling = [*argv[:1], "--json", *argv[1:]]  # else the flag takes --json as its value
        proc = mas2c(*spelling, cwd=tmp_path, inprocess=True)
        assert proc.returncode == 2, (spelling, proc.stdout, proc.stderr)
        error = document(proc)["error"]
        assert error["code"] == "usage" and error["kind"] == "usage", error
        if argv:
            assert error["message"] == said.strip(), (error, said)
        assert error["message"] in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_validate_json_reports_every_file_also_past_a_missing_one_or_a_folder(
    tmp_path: Path,
) -> None:
    (tmp_path / "folder").mkdir()
    argv = ["validate", str(COT), "missing.yaml", "folder", str(DEBATE), "--json"]
    proc = mas2c(*argv, cwd=tmp_path, inprocess=True)
    assert proc.returncode == 2  # a file that cannot be read is a usage error
    data = document(proc)
    assert data["ok"] is False and data["valid"] is False and data["error"]["code"] == "usage"
    reports = data["reports"]
    assert [r["path"] for r in reports] == [str(COT), "missing.yaml", "folder", str(DEBATE)]
    assert [r["valid"] for r in reports] == [True, False, False, True]
    assert all(set(r) >= {"path", "valid", "errors", "warnings", "problems"} for r in reports)
    assert "no such file" in reports[1]["error"]["message"]
    assert "is a folder" in reports[2]["error"]["message"]
    assert "missing.yaml" in proc.stderr and "folder" in proc.stderr
    for name in ("missing.yaml", "folder"):  # alone, too: the same shape
        one = document(mas2c("validate", name, "--json", cwd=tmp_path, inprocess=True))
        assert set(one) == {"ok", "valid", "reports", "error"} and len(one["reports"]) == 1


def test_dash_reads_stdin(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c.cli", "validate", "-", "--json"],
        input=COT.read_text(),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
        timeout=120,
    )
    assert document(proc)["reports"][0]["path"] == "<stdin>"
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c.cli", "graph", "-"],
        input=COT.read_text(),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith(("flowchart", "graph", "---"))


def _cli(argv: list[str], tmp_path: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mas2c.cli", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
        timeout=120,
    )


def _cli_bytes(argv: list[str | bytes], tmp_path: Path, stdin: bytes) -> tuple[int, bytes, str]:
    """The CLI with bytes in and out: no newline translation, no decoding by the test."""
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c.cli", *argv], input=stdin, capture_output=True,
        cwd=tmp_path, env=cli_env(), timeout=120,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")


def test_configure_keeps_a_crlf_spec_as_it_is_but_the_binding(tmp_path: Path) -> None:
    """A spec saved with CRLF line ends (Windows) was read with newlines translated, so
    `configure` rewrote every line of it (LF) for a three-line binding; from a file and
    from stdin alike, it now adds those lines, with CRLF, and changes nothing else."""
    from collections import Counter

    text = COT.read_text().replace("    model: main\n", "", 1).replace("\n", "\r\n")
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(text.encode())
    pool = _pool(tmp_path)
    argv: list[str | bytes] = ["configure", "spec.yaml", "--pool", str(pool), "--rule"]
    code, _, err = _cli_bytes([*argv, "-o", "out.yaml"], tmp_path, b"")
    assert code == 0, err
    argv[1] = "-"
    code, from_stdin, err = _cli_bytes(argv, tmp_path, text.encode())
    assert code == 0, err
    for out in ((tmp_path / "out.yaml").read_bytes(), from_stdin):
        before, after = text.encode().split(b"\r\n"), out.split(b"\r\n")
        assert b"\n" not in b"".join(after), "every line ends with CRLF"
        added = Counter(after) - Counter(before)
        assert not Counter(before) - Counter(after), "no line of the user's is lost"
        assert sorted(a.strip() for a in added.elements()) == [
            b"m:", b"model: gpt-4o-mini", b"model: m"
        ]  # fmt: skip


@pytest.mark.parametrize("as_json", [True, False])
def test_a_file_name_that_is_not_utf8_is_shown_escaped(tmp_path: Path, as_json: bool) -> None:
    """A spec whose name is not UTF-8 (valid on Linux): with a strict stdout (a UTF-8
    locale) the result line and the JSON document ended in a UnicodeEncodeError traceback.
    Now the byte shows as `\\udcff` (a valid JSON escape) and stdout stays UTF-8."""
    name = b"spec-\xff.yaml"
    (tmp_path / os.fsdecode(name)).write_bytes(COT.read_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "mas2c.cli", "validate", name, *(["--json"] if as_json else [])],
        capture_output=True, cwd=tmp_path, timeout=120,
        env=cli_env(PYTHONIOENCODING="utf-8:strict"),
    )  # fmt: skip
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    out = proc.stdout.decode("utf-8")  # valid UTF-8
    if as_json:
        assert json.loads(out)["reports"][0]["path"] == os.fsdecode(name)
    else:
        assert out.startswith("spec-\\udcff.yaml: valid")


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "-", "--llm", "{url}", "-o", "-"],
        ["solve", "-", "--input", "in.json", "--llm", "{url}", "--sandbox", "unisolated"],
        ["validate", "-"],
        ["configure", "-", "--pool", "pool.json", "--rule"],
        ["generate", b"a task \xff", "--llm", "{url}", "-o", "-"],
        ["batch", "in.jsonl", "--solve", b"a task \xff", "--sandbox", "unisolated"],
    ],
    ids=["generate-stdin", "solve-stdin", "validate-stdin", "configure-stdin", "generate-arg",
         "batch-solve-arg"],
)  # fmt: skip
def test_text_that_is_not_utf8_is_refused_in_one_line(
    argv: list[str | bytes], tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """A task or a spec that is not UTF-8 (on stdin, or an argument): `generate -` and
    `solve -` ended in a UnicodeEncodeError traceback after the LLM was asked. Now one
    coded line: usage (exit 2) for a task, MAS001 at <stdin> (exit 1) for a spec, as for
    a file; no LLM request, no folder."""
    _pool(tmp_path)
    write_json(tmp_path / "in.json", QUESTION)
    argv = [a.format(url=llm_server.base_url) if isinstance(a, str) else a for a in argv]
    code, out, err = _cli_bytes([*argv, "--json"], tmp_path, b'spec_version: "1"\n\xff\n')
    data = json.loads(out)
    assert "Traceback" not in err and data["ok"] is False, err
    if argv[0] in ("validate", "configure"):
        report = data["reports"][0] if argv[0] == "validate" else data["error"]["report"]
        assert code == 1 and report["problems"][0]["code"] == "MAS001", data
        assert "not UTF-8 text" in report["problems"][0]["message"]
        assert report["path"] == "<stdin>" if argv[0] == "validate" else "<stdin>" in err
    else:
        assert code == 2 and data["error"]["code"] == "usage", data
        assert "is not UTF-8 text" in data["error"]["message"]
    assert llm_server.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "pool.json"]


def test_dash_reads_a_spec_or_a_dataset_wherever_one_is_read(
    tmp_path: Path, llm_server: LLMTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`-` is stdin for run's spec (a pipe from `generate -o -`), batch's dataset and spec,
    image's spec and rectify's --spec; two `-` in one command are refused."""
    import io

    def cli(*argv: str, stdin: str) -> subprocess.CompletedProcess[str]:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        return mas2c(*argv, cwd=tmp_path, inprocess=True)

    llm = ["--sandbox", "unisolated", "--llm", llm_server.base_url, "--json"]
    inp = str(write_json(tmp_path / "in.json", QUESTION))
    proc = cli("run", "-", "--input", inp, "--run-dir", "r", *llm, stdin=COT.read_text())
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r" / "spec.json").read_text())["name"] == "chain-of-thought"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "1", "question": "2+2?", "answer": "4"}) + "\n")
    proc = cli("batch", "-", "--spec", str(COT), "--run-dir", "b", "--output", "answer", *llm,
               stdin=rows.read_text())  # fmt: skip
    assert document(proc)["complete"] is True, proc.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dataset"] == "<stdin>"
    proc = cli("image", "-", "-t", "x:1", "--json", stdin="name: Bad\n")
    assert proc.returncode == 1 and document(proc)["error"]["code"] == "spec_invalid"
    for argv in (
        ["run", "-", "--input", "-", "--json"],
        ["batch", "-", "--spec", "-", "--json"],
        ["rectify", "r", "--spec", "-", "--input", "-", "--json"],
        ["rectify", "r", "--spec", "-", "--write", "--json"],
    ):
        proc = cli(*argv, stdin=COT.read_text())
        assert proc.returncode == 2 and document(proc)["error"]["code"] == "usage", argv


@pytest.mark.parametrize(
    "argv",
    [
        ["run", str(COT), "--input", "-", "--sandbox", "unisolated", "--llm", "{url}"],
        ["solve", "a task", "--input", "-", "--llm", "{url}"],
    ],
    ids=["run", "solve"],
)
def test_bad_input_on_stdin_is_named_stdin_and_coded_alike(
    argv: list[str], tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """An input read from `-` is named <stdin> in the error (never a private temp path),
    and run and solve give it the same code before any LLM request or folder."""
    argv = [a.format(url=llm_server.base_url) for a in argv]
    for text in ("not json", "[1, 2]"):
        proc = _cli([*argv, "--run-dir", str(tmp_path / "r"), "--json"], tmp_path, text)
        assert proc.returncode == 1, proc.stderr
        error = document(proc)["error"]
        assert error["code"] == "bad_input", error
        assert error["message"].startswith("<stdin>: ") and "mas2c-stdin" not in proc.stderr
    assert llm_server.requests == [] and not (tmp_path / "r").exists()


def test_diff_reads_a_spec_from_stdin_and_report_writes_to_stdout(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    changed = COT.read_text().replace("temperature: 0\n", "temperature: 0.5\n", 1)
    proc = _cli(["diff", "-", str(COT), "--json"], tmp_path, changed)
    assert proc.returncode == 1, proc.stderr  # different
    changes = json.loads(proc.stdout)["changes"]  # exit 1 = different, like diff(1)
    assert [c["pointer"] for c in changes] == ["/models/main/temperature"], changes
    assert _cli(["diff", "-", "-"], tmp_path, changed).returncode == 2
    # report -o -: the page on stdout, no file called "-"
    (tmp_path / "in.json").write_text(json.dumps(QUESTION))
    argv = ["run", COT, "--input", tmp_path / "in.json", "--run-dir", tmp_path / "r"]
    assert (
        mas2c(
            *argv, "--sandbox", "unisolated", "--llm", llm_server.base_url, cwd=tmp_path
        ).returncode
        == 0
    )
    proc = _cli(["report", str(tmp_path / "r"), "-o", "-"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("<!DOCTYPE html>"), proc.stderr
    assert not (tmp_path / "-").exists() and not (tmp_path / "r" / "report.html").exists()


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:99999/v1", "http://u:pw@[::1/v1", "ftp://host/v1", "http:///v1"],
)
def test_a_malformed_endpoint_url_is_a_usage_error(url: str, tmp_path: Path) -> None:
    """From --llm or OPENAI_BASE_URL: exit 2 with one clean line, before anything runs,
    and the URL (which may hold credentials) is not echoed."""
    (tmp_path / "in.json").write_text(json.dumps(QUESTION))
    argv = ["run", str(COT), "--input", str(tmp_path / "in.json"), "--run-dir", str(tmp_path / "r")]
    for extra, env in (
        (["--llm", url], cli_env()),
        ([], cli_env(OPENAI_BASE_URL=url, OPENAI_API_KEY="sk-x")),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "mas2c.cli", *argv, *extra, "--json"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and url not in proc.stderr + proc.stdout
        assert document(proc)["error"]["code"] == "usage"
        assert not (tmp_path / "r").exists()


def test_run_reads_its_input_from_stdin_and_keeps_stdout_for_the_result(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    build = _built(tmp_path)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "mas2c.cli", "run", str(build), "--input", "-"),
            *(
                "--sandbox",
                "unisolated",
                "--llm",
                llm_server.base_url,
                "--run-dir",
                str(tmp_path / "r"),
            ),
        ],
        input=json.dumps(QUESTION),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(OPENAI_API_KEY="sk-test"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == {"answer", "reasoning"}  # stdout: the outputs only
    assert json.loads((tmp_path / "r" / "input.json").read_text()) == QUESTION
    # progress on stderr: calls, tokens, cost so far; then the summary line
    assert "LLM call(s)" in proc.stderr and "tokens" in proc.stderr and "$" in proc.stderr
    assert "step 1 of 1 (0 done), at /workflow/0" in proc.stderr, proc.stderr
    assert "ok (exit 0)" in proc.stderr
    # A small cost keeps its digits: "$0.0000" would say nothing was spent.
    usage = json.loads((tmp_path / "r" / "usage.json").read_text())
    assert 0 < usage["cost_usd"] < 0.0001
    assert f"${usage['cost_usd']:.6f}; run folder" in proc.stderr, proc.stderr


# -- the error tree -------------------------------------------------------------------------------


def test_every_python_m_module_the_docs_and_scripts_name_runs() -> None:
    """`python -m mas2c.X` lines in README.md and scripts/ (ensure-docker.sh runs
    `python -m mas2c.sandbox build`): each module is runnable (`--help` exits 0)."""
    import re

    text = (ROOT / "README.md").read_text() + "".join(
        p.read_text() for p in sorted((ROOT / "scripts").glob("*.sh"))
    )
    modules = sorted(set(re.findall(r"-m (mas2c(?:\.[a-z_]+)+)", text)))
    assert "mas2c.sandbox" in modules
    for module in modules:
        proc = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True, text=True, env=cli_env(), timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, (module, proc.stderr[-500:])


def test_every_module_error_is_in_the_tree() -> None:
    from mas2c import (
        bench,
        compile,
        configure,
        embedded,
        gateway,
        generate,
        llm,
        rectify,
        run,
        sandbox,
        solve,
    )
    from mas2c.lang import expr, source, validate

    classes = [
        bench.BenchError,
        compile.CompileError,
        configure.ConfigureError,
        configure.PoolError,
        expr.ExpressionError,
        gateway.GatewayError,
        generate.GenerateError,
        llm.LLMError,
        embedded.EmbeddedModelError,
        rectify.RectifyError,
        run.RunError,
        run.BadInput,
        run.EndpointUnreachable,
        sandbox.SandboxError,
        solve.SolveError,
        source.SourceError,
        validate.SpecInvalid,
    ]
    codes = [c.code for c in classes]
    assert len(set(codes)) == len(codes), codes  # each class its own stable code
    for cls in classes:
        assert issubclass(cls, errors.Mas2cError), cls
        assert issubclass(cls, errors.UserError | errors.RunFailure), cls
        assert cls.code.replace("_", "").isalpha() and cls.code.islower(), cls.code
        assert cls.exit_code in (1, 2)
    assert errors.UsageError.exit_code == 2 and errors.InvalidInput.exit_code == 1
    assert errors.RunFailure.exit_code == 1


# -- issue 14 item 2: a lazy CLI ------------------------------------------------------------------

# Never on the run path of a build. pydantic only to read the run folder's result after the
# run (mas2c.runfolder's typed contract), never before the sandbox starts.
HEAVY = (
    "black",
    "jinja2",
    "libcst",
    "yaml",
    "mas2c.compile",
    "mas2c.lang.spec",
    "mas2c.lang.validate",
)

_PROBE = """
import json, sys
from mas2c.cli import main
code = main(sys.argv[2:])
json.dump(sorted(sys.modules), open(sys.argv[1], "w"))
sys.exit(code)
"""


def test_run_of_a_build_imports_neither_the_compiler_nor_pydantic(
    tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """A whole real `mas2c run BUILD` in a fresh interpreter, then its sys.modules."""
    build = _built(tmp_path)
    modules = tmp_path / "modules.json"
    argv = ["run", str(build), "--input", str(write_json(tmp_path / "in.json", QUESTION))]
    argv += [
        "--sandbox",
        "unisolated",
        "--llm",
        llm_server.base_url,
        "--run-dir",
        str(tmp_path / "r"),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(modules), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(OPENAI_API_KEY="sk-test"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(modules.read_text())
    assert [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY] == []
    assert "pydantic" not in loaded or "mas2c.runfolder" in loaded


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["run", "build", "--input", "in.json"],
        ["run", "--help"],
        ["run", "--help", "--json"],
    ],
    ids=["help", "run-args", "run-help", "run-help-json"],
)
def test_parsing_imports_nothing_heavy(argv: list[str]) -> None:
    """Parsing (the whole of `--help`, as text or JSON), and for `run` the modules a run
    of a build starts with: nothing heavy."""
    call = f"main({argv!r})" if "--help" in argv else f"build_parser().parse_args({argv!r})"
    probe = (
        "import sys\n"
        "from mas2c.cli import build_parser, main\n"
        f"{call}\n"
        + ("import mas2c.run, mas2c.sandbox, mas2c.gateway\n" if argv[0] == "run" else "")
        + "heavy = [m for m in sys.modules if m.split('.')[0] in ('black', 'jinja2', 'libcst',"
        " 'pydantic', 'yaml', 'openai', 'docker') or m in ('mas2c.compile', 'mas2c.lang.spec')]\n"
        "print(heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


@pytest.mark.docker
def test_docker_run_of_a_build_imports_no_docker_py(
    docker_ready: None, tmp_path: Path, llm_server: LLMTestServer
) -> None:
    """A whole real cold `mas2c run BUILD --sandbox docker`: the daemon is spoken to by
    mas2c.sandbox.engine (no docker-py, requests or urllib3: ~70 ms of imports)."""
    build = _built(tmp_path)
    modules = tmp_path / "modules.json"
    argv = ["run", str(build), "--input", str(write_json(tmp_path / "in.json", QUESTION))]
    argv += ["--sandbox", "docker", "--no-pool", "--llm", llm_server.base_url]
    argv += ["--run-dir", str(tmp_path / "r")]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(modules), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(OPENAI_API_KEY="sk-test"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(modules.read_text())
    assert "mas2c.sandbox.engine" in loaded
    assert [m for m in loaded if m.split(".")[0] in ("docker", "requests", "urllib3")] == []
    assert [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY] == []


def _numeric_flags() -> list[tuple[list[str], str]]:
    """Every numeric flag of every verb (and sub-action), from the argparse tree."""
    from mas2c.cli import _count, _positive, _positive_int, build_parser

    numeric: tuple[object, ...] = (int, float, _count, _positive, _positive_int)
    found: list[tuple[list[str], str]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif action.option_strings and action.type in numeric:
                found.append((path, action.option_strings[-1]))

    walk(build_parser(), [])
    return found


NUMERIC_FLAGS = _numeric_flags()


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "x"])
@pytest.mark.parametrize(
    ("verb", "flag"), NUMERIC_FLAGS, ids=lambda v: "-".join(v) if isinstance(v, list) else v
)
def test_every_numeric_flag_refuses_what_would_measure_nothing(
    verb: list[str], flag: str, bad: str, tmp_path: Path
) -> None:
    """`nan`, `inf`, a negative number or a word in any numeric flag is a usage document
    (exit 2) naming the flag, before anything runs: `generate --max-repairs -1` asked the
    LLM and reported '-1 repair(s)'; `run --timeout nan` reached the sandbox."""
    proc = mas2c(*verb, flag, bad, "--json", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 2, (verb, flag, bad, proc.stdout, proc.stderr)
    data = document(proc)
    assert data["error"]["code"] == "usage" and flag in data["error"]["message"]
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_a_run_process_ends_early_but_finishes_what_finalisation_would(tmp_path: Path) -> None:
    """`mas2c run` ends its process with os._exit (no module teardown): first it joins
    the other non-daemon threads, runs the atexit functions and flushes stdout/stderr,
    so nothing finalisation would have completed is lost."""
    code = (
        "import atexit, sys, threading, time\n"
        "from mas2c.cli import _exit_now\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    open(sys.argv[1], 'w').write('thread')\n"
        "threading.Thread(target=late).start()\n"
        "atexit.register(lambda: open(sys.argv[2], 'w').write('atexit'))\n"
        "sys.stdout.write('buffered result')\n"
        "sys.stderr.write('buffered note')\n"
        "_exit_now(3)\n"
    )
    a, b = tmp_path / "a", tmp_path / "b"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(a), str(b)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 3
    assert (proc.stdout, proc.stderr) == ("buffered result", "buffered note")
    assert a.read_text() == "thread" and b.read_text() == "atexit"
