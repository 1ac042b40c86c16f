"""Cassette modes through `mas2c run` (issue 13 item 6): strict replay fails loudly on a
miss; `--record X --replay X` replays what X has and records what it lacks."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli_env, mas2c

from mas2c.testserver import LLMTestServer, Script

SPEC = """\
spec_version: "1"
name: two-calls
inputs:
  question: {type: string}
outputs:
  answer: second
models:
  m: {model: test-model}
agents:
  a: {role: Answerer, instructions: Answer briefly., model: m}
workflow:
  - {id: one, kind: call, agent: a, prompt: "{{ question }}", out: first}
  - {id: two, kind: call, agent: a, prompt: "PROMPT {{ first }}", out: second}
"""


def run(tmp: Path, prompt: str, *flags: str, name: str) -> tuple[int, dict[str, object], str]:
    spec = tmp / f"{name}.yaml"
    spec.write_text(SPEC.replace("PROMPT", prompt))
    (tmp / "in.json").write_text('{"question": "capital of France?"}')
    run_dir = tmp / name
    proc = mas2c(
        "run",
        spec,
        "--input",
        tmp / "in.json",
        "--run-dir",
        run_dir,
        "--sandbox",
        "unisolated",
        "--json",
        *flags,
        cwd=tmp,
        env=cli_env(OPENAI_API_KEY="sk-test", PYTHONPATH=str(Path(__file__).parents[1])),
    )
    usage = (
        json.loads((run_dir / "usage.json").read_text())
        if (run_dir / "usage.json").exists()
        else {}
    )
    return proc.returncode, usage, proc.stdout + proc.stderr


def test_strict_replay_fails_on_a_miss_and_new_episodes_fill_it(tmp_path: Path) -> None:
    cassette = tmp_path / "c.jsonl"
    script = Script([(r"capital", "Paris"), (r"Again", "Still Paris"), (r"Twice", "Paris x2")])
    with LLMTestServer(script) as srv:
        llm = ("--llm", srv.base_url)
        rc, usage, err = run(tmp_path, "Again:", "--record", str(cassette), *llm, name="rec")
        assert rc == 0, err
        assert len(srv.requests) == 2 and len(cassette.read_text().splitlines()) == 2
        # strict replay, no endpoint: the same system replays, a changed one misses loudly
        rc, usage, err = run(tmp_path, "Again:", "--replay", str(cassette), name="same")
        assert rc == 0, err
        assert usage["replayed"] == 2 and usage["cassette_misses"] == 0
        rc, usage, err = run(tmp_path, "Twice:", "--replay", str(cassette), name="miss")
        assert rc != 0 and "cassette miss" in err
        assert usage["cassette_misses"] == 1
        # new episodes: the first call is replayed, the second fetched and appended
        srv.reset_counters()
        rc, usage, err = run(
            tmp_path,
            "Twice:",
            "--record",
            str(cassette),
            "--replay",
            str(cassette),
            *llm,
            name="grow",
        )
        assert rc == 0, err
        assert [r.last_user for r in srv.requests] == ["Twice: Paris"]
        assert (usage["replayed"], usage["recorded_misses"]) == (1, 1)
        assert len(cassette.read_text().splitlines()) == 3
    # and now the changed system replays with no endpoint at all
    rc, usage, err = run(tmp_path, "Twice:", "--replay", str(cassette), name="after")
    assert rc == 0, err
    assert usage["replayed"] == 2


def test_record_never_corrupts_another_file_nor_creates_folders(tmp_path: Path) -> None:
    """`--record` appends: a file that is not a cassette (a spec named by mistake) is refused
    before anything runs, and so is a cassette in a folder that does not exist."""
    spec = tmp_path / "mine.yaml"
    spec.write_text(SPEC)
    (tmp_path / "in.json").write_text('{"question": "capital of France?"}')
    with LLMTestServer(Script([(r"capital", "Paris")])) as srv:
        for target, words in (
            (spec, "is not a cassette"),
            (tmp_path / "no" / "c.jsonl", "does not exist"),
            (tmp_path, "is a folder"),
        ):
            proc = mas2c(
                "run", spec, "--input", tmp_path / "in.json", "--sandbox", "unisolated",
                "--llm", srv.base_url, "--record", target, "--run-dir", tmp_path / "r", "--json",
                cwd=tmp_path, inprocess=True,
            )  # fmt: skip
            assert proc.returncode == 2, proc.stderr
            error = json.loads(proc.stdout)["error"]
            assert error["code"] == "usage" and words in error["message"], error
        assert spec.read_text() == SPEC and not (tmp_path / "no").exists()
        assert not (tmp_path / "r").exists() and srv.requests == []


def test_a_cassette_torn_by_a_crash_is_still_a_cassette(tmp_path: Path) -> None:
    """A kill, Ctrl-C or full disk while an exchange is appended leaves a torn last line
    (no newline, not JSON). It refused the whole cassette, for replay and for recording
    alike: hours of recorded calls lost to one cut line. Now a replay skips it (its
    exchange is a miss, loudly in strict mode), and a recording cuts it off first, so the
    cassette stays JSON lines."""
    cassette = tmp_path / "c.jsonl"
    with LLMTestServer(Script([(r"capital", "Paris"), (r"Again", "Still Paris")])) as srv:
        llm = ("--llm", srv.base_url)
        rc, _, err = run(tmp_path, "Again:", "--record", str(cassette), *llm, name="rec")
        assert rc == 0, err
        whole = cassette.read_bytes()
        cassette.write_bytes(whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 1 + 40])  # torn
        rc, usage, err = run(tmp_path, "Again:", "--replay", str(cassette), name="strict")
        assert rc != 0 and "cassette miss" in err and "not a JSON line" not in err
        assert usage["replayed"] == 1 and usage["cassette_misses"] == 1
        srv.reset_counters()
        flags = ("--record", str(cassette), "--replay", str(cassette), *llm)
        rc, usage, err = run(tmp_path, "Again:", *flags, name="fill")
        assert rc == 0, err
        assert usage["replayed"] == 1 and len(srv.requests) == 1
    lines = cassette.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["response"] for line in lines)
    rc, usage, err = run(tmp_path, "Again:", "--replay", str(cassette), name="again")
    assert rc == 0 and usage["replayed"] == 2, err
