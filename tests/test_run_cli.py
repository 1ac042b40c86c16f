"""`mas2c run` through the command line, against the loopback test LLM server.

Each test runs the real CLI in a subprocess (`python -m mas2c.cli run ...`), in the
unisolated sandbox and (marked `docker`) in the Docker sandbox, and reads the run folder
it leaves. The API key is given to the CLI only; the tests check that it reaches the
upstream server and nothing on the sandbox side: not the program's environment, not
/proc inside the container, not any file of the run folder, not the cassette.
Docker tests fail instead of skipping when CI=true and the daemon or image is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, cli_env, mas2c

from mas2c.lang.validate import load_spec
from mas2c.testserver import LLMTestServer

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
RUN_FILES = {
    "run.json",
    "result.json",
    "trace.jsonl",
    "checkpoints.jsonl",  # the step checkpoints (run content), what rectify resumes from
    "stdout.txt",
    "stderr.txt",
    "sandbox.json",
    "usage.json",
    "spec.json",  # what ran, for `mas2c rectify RUN_DIR`
    "input.json",
}

# A call, then a code tool that reports what the program can see of its environment.
# The tool looks for the key without spelling it out, so that the spec (which is
# copied into the build and the run folder) does not contain it either.
PROBE_SPEC = """\
spec_version: "1"
name: env-probe
description: Answers a question, then reports the environment it runs in.
inputs:
  question: {type: string}
outputs:
  answer: first
  probe: probe
models:
  m: {model: test-model}
agents:
  a: {role: Answerer, instructions: Answer briefly., model: m}
tools:
  environment:
    code: |
      import os


      def environment(note: str) -> dict:
          marker = "sk-test-" + "secret"
          hits = []
          for pid in os.listdir("/proc"):
              if pid.isdigit():
                  for part in ("environ", "cmdline"):
                      try:
                          with open(f"/proc/{pid}/{part}", "rb") as f:
                              if marker.encode() in f.read():
                                  hits.append(f"{pid}/{part}")
                      except OSError:
                          pass
          return {"env": dict(os.environ), "proc_hits": hits, "uid": os.getuid()}
workflow:
  - {id: first, kind: call, agent: a, prompt: "{{ question }}", out: first}
  - {id: look, kind: tool, tool: environment, args: {note: "{{ first }}"}, out: probe}
budgets: {max_llm_calls: 3}
"""

# Three calls in a row: the third is over a budget of two.
THREE_CALLS = """\
spec_version: "1"
name: three-calls
description: Asks the same agent three times in a row.
inputs:
  question: {type: string}
outputs:
  answer: third
models:
  m: {model: test-model}
agents:
  a: {role: Answerer, instructions: Answer briefly., model: m}
workflow:
  - {id: one, kind: call, agent: a, prompt: "{{ question }}", out: first}
  - {id: two, kind: call, agent: a, prompt: "Again: {{ first }}", out: second}
  - {id: three, kind: call, agent: a, prompt: "Once more: {{ second }}", out: third}
budgets: {max_llm_calls: BUDGET}
"""


# -- helpers ----------------------------------------------------------------------------------


def write_input(folder: Path, data: Any, name: str = "in.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def assert_no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    """No Python traceback from mas2c itself (the program's own, in result.json, may be
    echoed by --json on stdout)."""
    assert "Traceback" not in proc.stderr, proc.stderr


def files_containing(folder: Path, needle: str) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and needle.encode() in p.read_bytes()
    )


def usage_shape(usage: dict[str, Any]) -> dict[str, Any]:
    """What a run's usage is as a property of the program (not of where answers came from)."""
    keys = ("calls", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")
    return {
        **{k: usage[k] for k in keys},
        "by_agent": usage["by_agent"],
        "by_model": usage["by_model"],
    }


def _leftovers(run_ids: set[Any]) -> list[str]:
    """Names of the mas2c containers of these runs, removed. The low-level list: the
    high-level one inspects each container and races removals by other tests."""
    import docker

    client = docker.from_env()
    try:
        found = client.api.containers(all=True, filters={"label": "mas2c"})
        left = [c for c in found if (c.get("Labels") or {}).get("mas2c.run") in run_ids]
        for c in left:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                client.api.remove_container(c["Id"], force=True, v=True)
        return [c["Names"][0].lstrip("/") for c in left]
    finally:
        client.close()


BACKENDS = [
    pytest.param("unisolated", id="unisolated"),
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
]


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The sandbox backend; for docker, no container of this test's runs (their run ids, from
    sandbox.json) may be left after it. Only this test's: under `pytest -n 2` another
    worker's run may be live on the same daemon."""
    name: str = request.param
    if name == "docker":
        request.getfixturevalue("docker_ready")
    yield name
    if name != "docker":
        return
    run_ids = {read_json(p).get("run_id") for p in tmp_path.rglob("sandbox.json")}
    assert run_ids, "a docker test that ran nothing"
    left = _leftovers(run_ids)
    assert left == [], f"containers left behind: {left}"


# -- runs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_run_debate_writes_the_run_folder(
    backend: str, llm_server: LLMTestServer, tmp_path: Path
) -> None:
    input_path = write_input(tmp_path, {"question": "Is 91 prime?"})
    run_dir = tmp_path / "run"
    proc = mas2c(
        "run",
        SPECS / "debate.yaml",
        "--input",
        input_path,
        "--run-dir",
        run_dir,
        "--sandbox",
        backend,
        "--llm",
        llm_server.base_url,
        "--timeout",
        "120",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    # stdout: only the outputs (JSON); the summary line and progress go to stderr
    assert set(json.loads(proc.stdout)) == {"answer", "confidence", "rationale"}
    assert "ok (exit 0)" in proc.stderr and "7 LLM call(s)" in proc.stderr
    assert RUN_FILES | {"build"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "build" / "MANIFEST.json").is_file()

    result = read_json(run_dir / "result.json")
    assert result["status"] == "ok"
    assert set(result["outputs"]) == {"answer", "confidence", "rationale"}
    report = read_json(run_dir / "sandbox.json")
    assert report["backend"] == backend and report["exit_code"] == 0
    assert report["timed_out"] is False and report["oom_killed"] is False
    assert report["limits"]["timeout_s"] == 120
    trace = [json.loads(line) for line in (run_dir / "trace.jsonl").read_text().splitlines()]
    assert trace[0]["event"] == "run_start" and trace[-1]["event"] == "run_end"

    # usage.json: from the gateway, per agent and per model, priced from the spec's pool
    usage = read_json(run_dir / "usage.json")
    assert usage["calls"] == 7 == len(llm_server.requests)  # 3 debaters x 2 rounds + judge
    assert usage["upstream_calls"] == 7 and usage["errors"] == 0
    assert {k: v["calls"] for k, v in usage["by_agent"].items()} == {
        "analyst": 2,
        "skeptic": 2,
        "expert": 2,
        "judge": 1,
    }
    assert {k: v["calls"] for k, v in usage["by_model"].items()} == {"gpt-4o-mini": 6, "gpt-4o": 1}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert sum(v["total_tokens"] for v in usage["by_agent"].values()) == usage["total_tokens"]
    judge = usage["by_model"]["gpt-4o"]
    expected = (judge["prompt_tokens"] * 2.5 + judge["completion_tokens"] * 10) / 1e6
    assert judge["cost_usd"] == pytest.approx(expected)
    assert usage["cost_usd"] > judge["cost_usd"] > 0
    # the program's own count agrees with the gateway's
    assert result["usage"]["calls"] == usage["calls"]
    assert result["usage"]["total_tokens"] == usage["total_tokens"]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_api_key_reaches_the_upstream_and_never_the_sandbox(
    backend: str, llm_server: LLMTestServer, tmp_path: Path
) -> None:
    spec_path = tmp_path / "probe.yaml"
    spec_path.write_text(PROBE_SPEC, encoding="utf-8")
    input_path = write_input(tmp_path, {"question": "What is 6 x 7?"})
    run_dir = tmp_path / "run"
    env = cli_env(OPENAI_API_KEY=SECRET, MAS2C_TEST_HOST_ONLY=SECRET)
    proc = mas2c(
        "run",
        spec_path,
        "--input",
        input_path,
        "--run-dir",
        run_dir,
        "--sandbox",
        backend,
        "--llm",
        llm_server.base_url,
        "--json",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["status"] == "ok" and outcome["exit_code"] == 0
    assert outcome["run_dir"] == str(run_dir)
    assert outcome["result"] == read_json(run_dir / "result.json")
    assert outcome["usage"] == read_json(run_dir / "usage.json")

    # The upstream got the real key; the program only ever had the gateway's socket.
    assert len(llm_server.requests) == 1
    assert llm_server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    probe = outcome["result"]["outputs"]["probe"]
    env_inside = probe["env"]
    assert "OPENAI_API_KEY" not in env_inside and "MAS2C_TEST_HOST_ONLY" not in env_inside
    assert not any(SECRET in value for value in env_inside.values())
    assert "MAS2C_LLM_SOCKET" in env_inside
    if backend == "docker":  # the unisolated backend shares /proc with the host (and the CLI)
        assert probe["proc_hits"] == []
        assert probe["uid"] != 0
    assert files_containing(run_dir, SECRET) == []
    assert SECRET not in proc.stdout and SECRET not in proc.stderr


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_record_then_replay_with_the_server_stopped(backend: str, tmp_path: Path) -> None:
    input_path = write_input(tmp_path, {"question": "Is 91 prime?"})
    cassette = tmp_path / "cassette.jsonl"
    with LLMTestServer() as server:
        recorded = mas2c(
            "run",
            SPECS / "debate.yaml",
            "--input",
            input_path,
            "--run-dir",
            tmp_path / "rec",
            "--sandbox",
            backend,
            "--llm",
            server.base_url,
            "--record",
            cassette,
            cwd=tmp_path,
        )
        assert recorded.returncode == 0, recorded.stderr
        assert len(server.requests) == 7
    # The server is gone: the replay needs no endpoint at all (and gets no key).
    replayed = mas2c(
        "run",
        SPECS / "debate.yaml",
        "--input",
        input_path,
        "--run-dir",
        tmp_path / "rep",
        "--sandbox",
        backend,
        "--replay",
        cassette,
        cwd=tmp_path,
        env=cli_env(),
    )
    assert replayed.returncode == 0, replayed.stderr
    assert_no_traceback(replayed)
    first, second = read_json(tmp_path / "rec/result.json"), read_json(tmp_path / "rep/result.json")
    assert second["status"] == "ok"
    assert second["outputs"] == first["outputs"]
    assert second["usage"] == first["usage"]
    rec_usage, rep_usage = (
        read_json(tmp_path / "rec/usage.json"),
        read_json(tmp_path / "rep/usage.json"),
    )
    assert usage_shape(rep_usage) == usage_shape(rec_usage)
    assert rec_usage["upstream_calls"] == 7 and rec_usage["replayed"] == 0
    assert rep_usage["upstream_calls"] == 0 and rep_usage["replayed"] == 7
    # The cassette holds every exchange, and never the key.
    assert len(cassette.read_text().splitlines()) == 7
    assert SECRET not in cassette.read_text()


def test_replay_miss_is_a_clean_failure(tmp_path: Path) -> None:
    input_path = write_input(tmp_path, {"question": "What is 6 x 7?"})
    cassette = tmp_path / "cassette.jsonl"
    with LLMTestServer() as server:
        recorded = mas2c(
            "run",
            SPECS / "chain-of-thought.yaml",
            "--input",
            input_path,
            "--run-dir",
            tmp_path / "rec",
            "--sandbox",
            "unisolated",
            "--llm",
            server.base_url,
            "--record",
            cassette,
            cwd=tmp_path,
        )
        assert recorded.returncode == 0, recorded.stderr
    other = write_input(tmp_path, {"question": "Something never recorded"}, "other.json")
    proc = mas2c(
        "run",
        SPECS / "chain-of-thought.yaml",
        "--input",
        other,
        "--run-dir",
        tmp_path / "miss",
        "--sandbox",
        "unisolated",
        "--replay",
        cassette,
        cwd=tmp_path,
        env=cli_env(),
    )
    assert proc.returncode == 1
    assert_no_traceback(proc)
    assert "cassette miss" in proc.stderr
    assert "Something never recorded" in proc.stderr  # it says which request missed
    result = read_json(tmp_path / "miss/result.json")
    assert result["status"] == "error"
    assert "cassette miss" in result["error"]["message"]
    usage = read_json(tmp_path / "miss/usage.json")
    assert usage["calls"] == 0 and usage["errors"] >= 1

    # A cassette that is missing or is not a cassette: usage error / setup error, no traceback.
    proc = mas2c(
        "run",
        SPECS / "chain-of-thought.yaml",
        "--input",
        other,
        "--sandbox",
        "unisolated",
        "--replay",
        tmp_path / "nope.jsonl",
        cwd=tmp_path,
        env=cli_env(),
    )
    assert proc.returncode == 2 and "nope.jsonl: no such file" in proc.stderr
    proc = mas2c(
        "run",
        SPECS / "chain-of-thought.yaml",
        "--input",
        other,
        "--sandbox",
        "unisolated",
        "--replay",
        other,
        cwd=tmp_path,
        env=cli_env(),
    )
    assert proc.returncode == 1 and "cassette line" in proc.stderr
    assert_no_traceback(proc)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_budget_exceeded_exits_1(backend: str, llm_server: LLMTestServer, tmp_path: Path) -> None:
    spec_path = tmp_path / "three.yaml"
    spec_path.write_text(THREE_CALLS.replace("BUDGET", "2"), encoding="utf-8")
    input_path = write_input(tmp_path, {"question": "q"})
    run_dir = tmp_path / "run"
    proc = mas2c(
        "run",
        spec_path,
        "--input",
        input_path,
        "--run-dir",
        run_dir,
        "--sandbox",
        backend,
        "--llm",
        llm_server.base_url,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert_no_traceback(proc)
    assert "budget_exceeded" in proc.stderr and "max_llm_calls" in proc.stderr
    result = read_json(run_dir / "result.json")
    assert result["status"] == "budget_exceeded"
    assert result["error"]["spec_pointer"] == "/budgets/max_llm_calls"
    assert read_json(run_dir / "sandbox.json")["exit_code"] == 3
    assert read_json(run_dir / "usage.json")["calls"] == 2 == len(llm_server.requests)


def test_gateway_enforces_the_budget_when_the_program_does_not(
    llm_server: LLMTestServer, tmp_path: Path
) -> None:
    """A build whose program believes it may make 10 calls, while its manifest (what
    `mas2c run` reads) allows 2: the gateway refuses the third call itself."""
    spec_path = tmp_path / "three.yaml"
    spec_path.write_text(THREE_CALLS.replace("BUDGET", "10"), encoding="utf-8")
    build = tmp_path / "build"
    compiled = mas2c("compile", spec_path, "-o", build, cwd=tmp_path, inprocess=True)
    assert compiled.returncode == 0, compiled.stderr
    manifest = read_json(build / "MANIFEST.json")
    manifest["spec"]["budgets"]["max_llm_calls"] = 2
    (build / "MANIFEST.json").write_text(json.dumps(manifest), encoding="utf-8")
    run_dir = tmp_path / "run"
    proc = mas2c(
        "run",
        build,
        "--input",
        write_input(tmp_path, {"question": "q"}),
        "--run-dir",
        run_dir,
        "--sandbox",
        "unisolated",
        "--llm",
        llm_server.base_url,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert_no_traceback(proc)
    result = read_json(run_dir / "result.json")
    assert result["status"] == "budget_exceeded"
    # the gateway's refusal names the limit: the error points at it in the spec
    assert result["error"]["spec_pointer"] == "/budgets/max_llm_calls"
    usage = read_json(run_dir / "usage.json")
    assert usage["calls"] == 2 and usage["refused"] == 1 and usage["budget_exceeded"] is True
    assert len(llm_server.requests) == 2  # the refused call never reached the upstream


@pytest.mark.parametrize(
    "hostile",
    ["../../escape", "/tmp/abs", "mas2c_missing", "mas2c_ok\n", "huge", "fifo", "deep"],
)
def test_hostile_build_manifest_is_refused(hostile: str, tmp_path: Path) -> None:
    """A build folder's MANIFEST.json is input: its package must name the package folder
    beside it (never a path), and it is read with a size cap, never from a FIFO."""
    build = tmp_path / "build"
    compiled = mas2c(
        "compile", SPECS / "chain-of-thought.yaml", "-o", build, cwd=tmp_path, inprocess=True
    )
    assert compiled.returncode == 0, compiled.stderr
    path = build / "MANIFEST.json"
    manifest = read_json(path)
    if hostile == "huge":
        manifest["padding"] = "x" * (9 * 1024 * 1024)
    elif hostile not in ("fifo", "deep"):
        manifest["package"] = hostile
    if hostile == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif hostile == "deep":
        path.write_text('{"spec": ' + "[" * 100_000 + "]" * 100_000 + "}", encoding="utf-8")
    else:
        path.write_text(json.dumps(manifest), encoding="utf-8")
    proc = mas2c(
        "run",
        build,
        "--input",
        write_input(tmp_path, {"question": "q"}),
        "--run-dir",
        tmp_path / "run",
        "--llm",
        "http://127.0.0.1:9/v1",
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert_no_traceback(proc)
    assert "MANIFEST.json" in proc.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_run_a_build_folder(backend: str, llm_server: LLMTestServer, tmp_path: Path) -> None:
    build = tmp_path / "build"
    compiled = mas2c(
        "compile", SPECS / "chain-of-thought.yaml", "-o", build, cwd=tmp_path, inprocess=True
    )
    assert compiled.returncode == 0, compiled.stderr
    run_dir = tmp_path / "run"
    proc = mas2c(
        "run",
        build,
        "--input",
        write_input(tmp_path, {"question": "What is 6 x 7?"}),
        "--run-dir",
        run_dir,
        "--sandbox",
        backend,
        "--llm",
        llm_server.base_url,
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["status"] == "ok"
    assert set(outcome["result"]["outputs"]) == {"answer", "reasoning"}
    assert outcome["usage"]["by_agent"]["reasoner"]["calls"] == 1
    assert outcome["sandbox"]["backend"] == backend
    # given a build, the run folder has no build of its own; the build is left as it was
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    assert not (build / "result.json").exists()
    spec = load_spec(SPECS / "chain-of-thought.yaml")
    assert read_json(build / "MANIFEST.json")["spec"] == spec.to_data()


# -- bad input --------------------------------------------------------------------------------


def run_args(
    target: str | Path,
    input_path: str | Path,
    *extra: str | Path,
    llm: str = "http://127.0.0.1:9/v1",
) -> list[str | Path]:
    """`mas2c run` in the unisolated sandbox (by default with an endpoint nothing listens on)."""
    return ["run", target, "--input", input_path, "--sandbox", "unisolated", "--llm", llm, *extra]


def test_missing_input_file_exits_2(tmp_path: Path) -> None:
    args = run_args(SPECS / "chain-of-thought.yaml", tmp_path / "missing.json")
    proc = mas2c(*args, cwd=tmp_path, inprocess=True)
    assert proc.returncode == 2
    assert "missing.json: no such file or directory" in proc.stderr
    assert_no_traceback(proc)
    assert not (tmp_path / "runs").exists()


def test_missing_spec_and_bad_flags_exit_2(tmp_path: Path) -> None:
    input_path = write_input(tmp_path, {"question": "q"})
    cases: list[tuple[list[str | Path], str]] = [
        (["run", tmp_path / "nope.yaml", "--input", input_path], "nope.yaml: no such file"),
        (["run", SPECS / "debate.yaml"], "--input"),  # required
        (
            ["run", SPECS / "debate.yaml", "--input", input_path, "--sandbox", "vm"],
            "invalid choice",
        ),
        (run_args(SPECS / "debate.yaml", input_path, "--replay", tmp_path / "c.jsonl"), "c.jsonl"),
    ]
    for args, message in cases:
        proc = mas2c(*args, cwd=tmp_path, inprocess=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, proc.stderr
        assert_no_traceback(proc)


def test_invalid_spec_exits_1_with_located_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'spec_version: "1"\n'
        "name: Bad\n"
        "agents: {a: {role: x, modl: m}}\n"
        "workflow:\n"
        "  - {id: s, kind: call, agent: b, prompt: hi, out: x}\n",
        encoding="utf-8",
    )
    input_path = write_input(tmp_path, {"question": "q"})
    args = run_args(bad, input_path, "--run-dir", tmp_path / "run")
    proc = mas2c(*args, cwd=tmp_path, inprocess=True)
    assert proc.returncode == 1
    assert_no_traceback(proc)
    assert f"{bad}:2:7: error MAS105 at /name" in proc.stderr
    assert f"{bad}:3:23: error MAS102 at /agents/a/modl" in proc.stderr
    assert "did you mean `model`?" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing compiled, nothing run


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("", "not valid JSON"),
        ('{"question": NaN}', "NaN and Infinity are not JSON numbers"),
        ('{"question": [1, {"x": 1e400}]}', "at /1/x: NaN and Infinity"),
        ('{"question": -Infinity}', "not JSON numbers"),
    ],
)
def test_bad_input_file_exits_1(content: str, message: str, tmp_path: Path) -> None:
    input_path = tmp_path / "in.json"
    input_path.write_text(content, encoding="utf-8")
    args = run_args(SPECS / "chain-of-thought.yaml", input_path, "--run-dir", tmp_path / "run")
    proc = mas2c(*args, cwd=tmp_path, inprocess=True)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert_no_traceback(proc)
    assert not (tmp_path / "run").exists()  # refused before anything is written or run


def test_not_a_build_folder_and_unwritable_run_dir(
    llm_server: LLMTestServer, tmp_path: Path
) -> None:
    input_path = write_input(tmp_path, {"question": "q"})
    proc = mas2c(*run_args(tmp_path, input_path), cwd=tmp_path, inprocess=True)
    assert proc.returncode == 1 and "not a build folder" in proc.stderr
    assert_no_traceback(proc)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = run_args(
        SPECS / "chain-of-thought.yaml",
        input_path,
        "--run-dir",
        blocker / "run",
        llm=llm_server.base_url,
    )
    proc = mas2c(*args, cwd=tmp_path, inprocess=True)
    assert proc.returncode == 1 and str(blocker) in proc.stderr
    assert_no_traceback(proc)


def test_input_the_spec_rejects_fails_fast_on_the_host(
    llm_server: LLMTestServer, tmp_path: Path
) -> None:
    """Input that is JSON but not what the spec declares: refused on the host in one line,
    before any run folder, sandbox or LLM call (issue 13 item 5)."""
    run_dir = tmp_path / "run"
    input_path = write_input(tmp_path, {"q": 1})
    args = run_args(
        SPECS / "chain-of-thought.yaml", input_path, "--run-dir", run_dir, llm=llm_server.base_url
    )
    proc = mas2c(*args, "--json", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 1
    assert_no_traceback(proc)
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "missing required input 'question'" in proc.stderr
    assert "unknown input 'q'" in proc.stderr
    assert json.loads(proc.stdout)["error"]["code"] == "bad_input"
    assert not run_dir.exists()
    assert llm_server.requests == []


def test_dead_endpoint_fails_fast_on_the_host(tmp_path: Path) -> None:
    """A dead endpoint: one line naming it, before any run folder or sandbox (issue 13 item 5)."""
    input_path = write_input(tmp_path, {"question": "q"})
    run_dir = tmp_path / "run"
    args = run_args(SPECS / "chain-of-thought.yaml", input_path, "--run-dir", run_dir)
    proc = mas2c(*args, "--json", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "http://127.0.0.1:9 is not reachable" in proc.stderr
    assert json.loads(proc.stdout)["error"]["code"] == "endpoint_unreachable"
    assert not run_dir.exists()


def test_unwritable_outputs_are_usage_errors(tmp_path: Path) -> None:
    """`compile -o` and `schema -o` into a path that cannot be written: a message, exit 2."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args in (
        ["compile", SPECS / "chain-of-thought.yaml", "-o", blocker / "build"],
        ["schema", "-o", blocker / "schema.json"],
    ):
        proc = mas2c(*args, cwd=tmp_path, inprocess=True)
        assert proc.returncode == 2, proc.stderr
        assert f"cannot write {blocker}" in proc.stderr
        assert_no_traceback(proc)
