"""`mas2c solve`, `mas2c generate` and `mas2c configure` through the command line.

Every command runs in a subprocess (`python -m mas2c.cli ...`) against the loopback
test LLM server, whose script tells the meta-agents' requests (matched by their system
prompts) from the compiled program's. `solve` runs end to end in the unisolated sandbox and
(marked `docker`) in the Docker sandbox; Docker tests fail instead of skipping when
CI=true and the daemon or image is missing.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli_document, cli_env, mas2c

from mas2c.generate import compact_schema
from mas2c.lang.spec import json_schema, spec_hash
from mas2c.lang.validate import load_spec, validate_file
from mas2c.solve import slug
from mas2c.testserver import ChatRequest, LLMTestServer, Script

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"

GENERATOR = r"^You design multi-agent systems"  # the generator's system prompt
PICKER = r"^You choose the best multi-agent system design"  # solve's example fallback
REASONER = r"^Careful problem solver"  # chain-of-thought's agent, at run time

TASK = "Answer a short arithmetic question with a single number."
QUESTION = {"question": "What is 12 + 30?"}
SUMMARY_KEYS = {
    "status",
    "answer",
    "solve_dir",
    "spec_source",
    "generation",
    "phases",
    "llm_calls",
    "tokens",
    "run_cost_usd",
    "final_run_cost_usd",
    "error",
}
PHASES = ["generate", "configure", "compile+run"]


def cot_spec() -> dict[str, Any]:
    return load_spec(SPECS / "chain-of-thought.yaml").to_data()


def spec_json(data: dict[str, Any]) -> str:
    return json.dumps(data)


def invalid_spec() -> dict[str, Any]:
    """chain-of-thought with a misspelt agent reference (MAS201 at /workflow/0/agent)."""
    data = cot_spec()
    data["workflow"][0]["agent"] = "reasonr"
    return data


def reasoned(req: ChatRequest) -> dict[str, str]:
    return {"reasoning": "1. 12 + 30 = 42.", "answer": "42"}


# -- helpers ----------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def assert_no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    """No Python traceback from mas2c itself (the program's own, in result.json, may be
    echoed by --json on stdout)."""
    assert "Traceback" not in proc.stderr, proc.stderr


def no_temp_files(folder: Path) -> bool:
    """Atomic writes go through `.<name>.*.tmp` files beside the target; none may be left."""
    return not [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


def matching(server: LLMTestServer, pattern: str) -> list[ChatRequest]:
    return [r for r in server.requests if re.search(pattern, r.system)]


def _leftovers() -> list[Any]:
    import docker

    client = docker.from_env()
    try:
        return list(client.containers.list(all=True, filters={"label": "mas2c"}))
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
    left = [c for c in _leftovers() if c.labels.get("mas2c.run") in run_ids]
    for c in left:
        c.remove(force=True, v=True)
    assert left == [], f"containers left behind: {[c.name for c in left]}"


@pytest.fixture
def question(tmp_path: Path) -> Path:
    path = tmp_path / "in.json"
    path.write_text(json.dumps(QUESTION), encoding="utf-8")
    return path


def solve_cli(
    tmp_path: Path,
    input_path: Path,
    server: LLMTestServer | None,
    *extra: str | Path,
    backend: str = "unisolated",
    task: str = TASK,
    env: dict[str, str] | None = None,
    inprocess: bool = False,
) -> subprocess.CompletedProcess[str]:
    llm = ["--llm", server.base_url] if server is not None else []
    return mas2c(
        "solve",
        task,
        "--input",
        input_path,
        "--run-dir",
        tmp_path / "solve",
        "--sandbox",
        backend,
        *llm,
        *extra,
        cwd=tmp_path,
        env=env,
        inprocess=inprocess,
    )


def assert_summary_shape(summary: dict[str, Any], solve_dir: Path) -> None:
    assert set(summary) == SUMMARY_KEYS
    assert summary["solve_dir"] == str(solve_dir)
    assert [p["name"] for p in summary["phases"]] == PHASES
    for phase in summary["phases"]:
        assert set(phase) == {"name", "seconds", "calls", "tokens", "note"}
        assert phase["seconds"] >= 0 and phase["calls"] >= 0 and phase["tokens"] >= 0
    assert summary["llm_calls"] == sum(p["calls"] for p in summary["phases"])
    assert summary["tokens"] == sum(p["tokens"] for p in summary["phases"])
    assert isinstance(summary["run_cost_usd"], float)


def assert_specs_revalidate(solve_dir: Path) -> None:
    for name in ("spec-generated.yaml", "spec.yaml"):
        report = validate_file(solve_dir / name)
        assert report.ok, report.format()
    configured = load_spec(solve_dir / "spec.yaml")
    assert all(agent.model for agent in configured.agents.values())  # every slot bound
    built = read_json(solve_dir / "run-1" / "build" / "MANIFEST.json")
    assert built["spec_sha256"] == spec_hash(configured)


# -- solve ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_solve_with_a_generated_spec(
    backend: str, llm_server: LLMTestServer, question: Path, tmp_path: Path
) -> None:
    llm_server.responder = Script(
        [(GENERATOR, spec_json(cot_spec())), (REASONER, reasoned)], field="system"
    )
    proc = solve_cli(tmp_path, question, llm_server, "--json", backend=backend)
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    solve_dir = tmp_path / "solve"

    # --json: one JSON document on stdout (progress stays off it), the same as summary.json
    summary = cli_document(proc)
    assert summary == read_json(solve_dir / "summary.json")
    assert_summary_shape(summary, solve_dir)
    assert summary["status"] == "ok" and summary["error"] is None
    assert summary["spec_source"] == "generated"
    assert summary["generation"] == {
        "outcome": "generated",
        "reason": None,
        "attempts": 1,
        "prompt": "full",
        "model": None,
        "example": None,
        "problems": [],
    }
    assert summary["answer"] == {"answer": "42", "reasoning": "1. 12 + 30 = 42."}
    assert [p["calls"] for p in summary["phases"]] == [1, 0, 1]
    assert summary["llm_calls"] == 2 == len(llm_server.requests)
    assert summary["run_cost_usd"] > 0  # chain-of-thought prices its model

    # the folder: task, both specs, the run (with its build), summary and report
    names = {p.name for p in solve_dir.iterdir()}
    assert {"task.txt", "spec-generated.yaml", "spec.yaml", "run-1", "summary.json"} <= names
    assert (solve_dir / "task.txt").read_text() == TASK + "\n"
    run_dir = solve_dir / "run-1"
    for name in ("result.json", "trace.jsonl", "stdout.txt", "stderr.txt", "usage.json"):
        assert (run_dir / name).is_file(), name
    assert read_json(run_dir / "sandbox.json")["backend"] == backend
    assert read_json(run_dir / "result.json")["outputs"] == summary["answer"]
    report = (solve_dir / "report.md").read_text()
    assert "Status: **ok** (spec: generated)" in report
    assert '"answer": "42"' in report
    assert "| generate |" in report and "| compile+run |" in report
    assert_specs_revalidate(solve_dir)
    assert spec_hash(load_spec(solve_dir / "spec-generated.yaml")) == spec_hash(
        load_spec(SPECS / "chain-of-thought.yaml")
    )
    assert no_temp_files(solve_dir)

    # the generator was asked under the spec's JSON Schema and told the input's keys
    (generator,) = matching(llm_server, GENERATOR)
    assert generator.response_schema == json_schema()
    assert TASK in generator.last_user and "`question` (str)" in generator.last_user


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_solve_falls_back_to_an_example(
    backend: str, llm_server: LLMTestServer, question: Path, tmp_path: Path
) -> None:
    llm_server.responder = Script(
        [
            (GENERATOR, spec_json(invalid_spec())),
            (PICKER, {"archetype": "chain-of-thought"}),
        ],
        field="system",
    )
    proc = solve_cli(tmp_path, question, llm_server, "--max-repairs", "1", backend=backend)
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    assert "adapting an example instead" in proc.stderr  # progress on stderr
    solve_dir = tmp_path / "solve"
    assert "Status: **ok** (spec: example:chain-of-thought)" in proc.stdout  # the report

    summary = read_json(solve_dir / "summary.json")
    assert_summary_shape(summary, solve_dir)
    assert summary["status"] == "ok"
    assert summary["spec_source"] == "example:chain-of-thought"
    assert "chain-of-thought" in summary["phases"][0]["note"]
    reason = "no valid spec after 2 answer(s); last errors: MAS201"
    assert summary["generation"] == {
        "outcome": "fallback",
        "reason": reason,
        "attempts": 2,
        "prompt": "full",
        "model": None,
        "example": "chain-of-thought",
        "problems": [["MAS201"], ["MAS201"]],
    }
    assert f"fell back to the `chain-of-thought` example, because {reason}" in proc.stdout
    # the default responder answers the program's structured request
    assert summary["answer"] == {"answer": "x", "reasoning": "x"}
    assert len(matching(llm_server, GENERATOR)) == 2  # the first answer and one repair
    (picker,) = matching(llm_server, PICKER)
    assert picker.response_schema is not None
    choices = picker.response_schema["properties"]["archetype"]["enum"]
    assert "chain-of-thought" in choices and "tool-pipeline" not in choices  # inputs fit
    assert summary["phases"][0]["calls"] == 3

    adapted = load_spec(solve_dir / "spec-generated.yaml")
    assert adapted.name == slug(TASK)
    assert "Adapted from the `chain-of-thought` example" in adapted.description
    assert_specs_revalidate(solve_dir)


COMPACT_SPEC: dict[str, Any] = {
    "spec_version": "1",
    "name": "arithmetic",
    "description": "One agent answers the question with a single number.",
    "inputs": {"question": {"type": "string"}},
    "agents": {"solver": {"role": "Calculator", "instructions": "Answer with one number."}},
    "workflow": [
        {
            "id": "first",
            "kind": "call",
            "agent": "solver",
            "prompt": "Answer with a single number: {{ question }}",
            "out": "draft",
        }
    ],
    "outputs": {"answer": "draft"},
}


def test_solve_with_the_compact_prompt_generates_through_the_validator_loop(
    llm_server: LLMTestServer, question: Path, tmp_path: Path
) -> None:
    """The embedded model's path (`--prompt compact`, the default on `--llm local`): the
    reduced schema is sent, a rejected answer is repaired, the repaired spec is run."""
    broken = copy.deepcopy(COMPACT_SPEC)
    broken["workflow"][0]["agent"] = "reviewer"  # allowed by the schema, not defined: MAS201
    llm_server.responder = Script(
        [
            (GENERATOR, [spec_json(broken), spec_json(COMPACT_SPEC)]),
            (r"^Calculator", "42"),
        ],
        field="system",
    )
    proc = solve_cli(tmp_path, question, llm_server, "--prompt", "compact", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = cli_document(proc)
    assert summary["status"] == "ok" and summary["answer"] == {"answer": "42"}
    assert summary["spec_source"] == "generated"
    generation = summary["generation"]
    assert (generation["outcome"], generation["prompt"], generation["attempts"]) == (
        "generated",
        "compact",
        2,
    )
    assert generation["problems"] == [["MAS201"]]
    first, repair = matching(llm_server, GENERATOR)
    assert first.response_schema == compact_schema({"question": "string"})
    # the example is an answered turn before the task; the repair carries the problems
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant", "user"]
    assert TASK in first.last_user
    assert "MAS201" in repair.last_user
    assert "generated by" in (tmp_path / "solve" / "report.md").read_text()


def test_solve_with_the_compact_prompt_falls_back_when_the_loop_fails(
    llm_server: LLMTestServer, question: Path, tmp_path: Path
) -> None:
    broken = copy.deepcopy(COMPACT_SPEC)
    broken["outputs"] = {"answer": "final"}  # allowed by the schema, no second step: MAS205
    llm_server.responder = Script([(GENERATOR, spec_json(broken))], field="system")
    proc = solve_cli(
        tmp_path, question, llm_server, "--prompt", "compact", "--max-repairs", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    summary = cli_document(proc)
    generation = summary["generation"]
    assert generation["outcome"] == "fallback" and generation["prompt"] == "compact"
    assert generation["reason"] == "no valid spec after 2 answer(s); last errors: MAS205"
    assert generation["problems"] == [["MAS205"], ["MAS205"]]
    assert summary["spec_source"] == f"example:{generation['example']}"
    assert len(matching(llm_server, GENERATOR)) == 2


def test_solve_falls_back_when_the_generator_request_is_refused(
    llm_server: LLMTestServer, question: Path, tmp_path: Path
) -> None:
    """An endpoint that refuses the generator's request (HTTP 400, as the embedded model
    does for a prompt longer than its context) makes the generator give up, not solve."""
    llm_server.responder = Script([(PICKER, {"archetype": "chain-of-thought"})], field="system")
    llm_server.inject("status", 3, status=400)  # json_schema, then json_object, then text
    proc = solve_cli(tmp_path, question, llm_server, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = cli_document(proc)
    assert summary["status"] == "ok"
    assert summary["spec_source"] == "example:chain-of-thought"
    kinds = [r.response_format.get("type") for r in matching(llm_server, GENERATOR)]
    assert kinds == ["json_schema", "json_object", None]
    assert len(matching(llm_server, PICKER)) == 1


def test_solve_refits_a_spec_that_wants_other_inputs(
    llm_server: LLMTestServer, question: Path, tmp_path: Path
) -> None:
    """A valid spec whose inputs the input file lacks is not run: solve adapts an example."""
    other = cot_spec()
    other["inputs"] = {"problem": {"type": "string"}}
    other["workflow"][0]["prompt"] = "{{ problem }}"
    llm_server.responder = Script(
        [(GENERATOR, spec_json(other)), (PICKER, {"archetype": "chain-of-thought"})],
        field="system",
    )
    proc = solve_cli(tmp_path, question, llm_server, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = cli_document(proc)
    assert summary["spec_source"] == "example:chain-of-thought"
    assert summary["status"] == "ok"
    assert len(matching(llm_server, GENERATOR)) == 1  # valid: no repair asked for


def test_solve_binds_unbound_slots(
    llm_server: LLMTestServer, question: Path, tmp_path: Path
) -> None:
    """By rule over the spec's own models, and by the LLM from `--pool`."""
    unbound = cot_spec()
    del unbound["agents"]["reasoner"]["model"]
    llm_server.responder = Script([(GENERATOR, spec_json(unbound))], field="system")
    proc = solve_cli(tmp_path, question, llm_server, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = cli_document(proc)
    assert summary["phases"][1]["calls"] == 0
    assert summary["phases"][1]["note"] == "1 slot(s) bound"
    assert load_spec(tmp_path / "solve" / "spec.yaml").agents["reasoner"].model == "main"
    assert_specs_revalidate(tmp_path / "solve")

    pool = tmp_path / "pool.yaml"
    pool.write_text(
        "fast: {model: fast-model, description: cheap, price: {input_per_mtok: 0.1, output_per_mtok: 0.2}}\n"
        "deep: {model: deep-model, description: strong}\n"
    )
    llm_server.reset_counters()
    proc = mas2c(
        "solve",
        TASK,
        "--input",
        question,
        "--run-dir",
        tmp_path / "pooled",
        "--sandbox",
        "unisolated",
        "--llm",
        llm_server.base_url,
        "--pool",
        pool,
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    summary = cli_document(proc)
    assert summary["phases"][1]["calls"] == 1  # the implementer asked the LLM
    configured = load_spec(tmp_path / "pooled" / "spec.yaml")
    bound = configured.models[configured.agents["reasoner"].model or ""]
    assert bound.model in ("fast-model", "deep-model")
    run_models = {r.model for r in llm_server.requests if re.search(REASONER, r.system)}
    assert run_models == {bound.model}
    assert_specs_revalidate(tmp_path / "pooled")


def test_solve_with_a_failing_run_exits_1(
    llm_server: LLMTestServer, question: Path, tmp_path: Path
) -> None:
    tight = cot_spec()
    tight["workflow"].append(
        {"id": "again", "kind": "call", "agent": "reasoner", "prompt": "{{ question }}"}
    )
    tight["budgets"]["max_llm_calls"] = 1
    llm_server.responder = Script([(GENERATOR, spec_json(tight))], field="system")
    proc = solve_cli(tmp_path, question, llm_server, "--json", "--rectify-rounds", "0")
    assert proc.returncode == 1
    assert_no_traceback(proc)
    summary = cli_document(proc)
    assert summary["status"] == "budget_exceeded"
    assert summary["answer"] is None
    assert summary["error"]["type"] == "BudgetExceeded"
    assert summary["error"]["spec_pointer"] == "/budgets/max_llm_calls"
    assert "Status: **budget_exceeded**" in (tmp_path / "solve" / "report.md").read_text()


def test_solve_cost_counts_every_run_of_the_system(
    llm_server: LLMTestServer, question: Path, tmp_path: Path
) -> None:
    """run-1 fails after a priced call; the rectified round resumes past that call: the
    solve's run cost is what all runs cost, not the last run's $0."""
    failing = {
        "spec_version": "1",
        "name": "divides",
        "inputs": {"question": {"type": "string"}},
        "outputs": {"answer": "r"},
        "models": {"m": {"model": "m-1", "price": {"input_per_mtok": 10, "output_per_mtok": 10}}},
        "agents": {"a": {"role": "r", "instructions": "i", "model": "m"}},
        "tools": {"boom": {"code": "def boom(x: str) -> str:\n    return str(1 / 0)\n"}},
        "workflow": [
            {"id": "c", "kind": "call", "agent": "a", "prompt": "{{ question }}", "out": "w"},
            {"id": "t", "kind": "tool", "tool": "boom", "args": {"x": "{{ w }}"}, "out": "r"},
        ],
        "budgets": {"max_cost_usd": 5.0},
    }
    fix = [
        {
            "op": "replace",
            "path": "/tools/boom/code",
            "value": "def boom(x: str) -> str:\n    return x\n",
        }
    ]
    llm_server.responder = Script(
        [
            (GENERATOR, spec_json(failing)),
            ("rectifier of mas2c", "```json\n" + json.dumps(fix) + "\n```"),
        ],
        field="system",
        default="42",
    )
    proc = solve_cli(tmp_path, question, llm_server, "--json", "--rectify-rounds", "1")
    assert proc.returncode == 0, proc.stderr
    summary = cli_document(proc)
    first = json.loads((tmp_path / "solve" / "run-1" / "usage.json").read_text())["cost_usd"]
    rounds = sorted((tmp_path / "solve" / "run-1" / "rectify").glob("round-*/run/usage.json"))
    assert first > 0 and rounds
    later = sum(json.loads(p.read_text())["cost_usd"] for p in rounds)
    assert summary["run_cost_usd"] == pytest.approx(first + later)
    assert summary["final_run_cost_usd"] == pytest.approx(
        json.loads(rounds[-1].read_text())["cost_usd"]
    )


def test_solve_record_then_replay(question: Path, tmp_path: Path) -> None:
    """`--record` keeps the meta-agents' exchanges and the run's; `--replay` needs no endpoint."""
    cassette = tmp_path / "cassette.jsonl"
    with LLMTestServer(
        Script([(GENERATOR, spec_json(cot_spec())), (REASONER, reasoned)], field="system")
    ) as server:
        recorded = solve_cli(tmp_path, question, server, "--record", cassette, "--json")
        assert recorded.returncode == 0, recorded.stderr
        assert len(server.requests) == 2
    assert len(cassette.read_text().splitlines()) == 2
    (tmp_path / "solve").rename(tmp_path / "recorded")
    replayed = solve_cli(tmp_path, question, None, "--replay", cassette, "--json", env=cli_env())
    assert replayed.returncode == 0, replayed.stderr
    first, second = cli_document(recorded), cli_document(replayed)
    assert second["answer"] == first["answer"] == {"answer": "42", "reasoning": "1. 12 + 30 = 42."}
    assert second["spec_source"] == "generated"
    assert [(p["calls"], p["tokens"]) for p in second["phases"]] == [
        (p["calls"], p["tokens"]) for p in first["phases"]
    ]
    usage = read_json(tmp_path / "solve" / "run-1" / "usage.json")
    assert usage["replayed"] == 1 and usage["upstream_calls"] == 0


def test_solve_usage_errors(llm_server: LLMTestServer, question: Path, tmp_path: Path) -> None:
    not_an_object = tmp_path / "list.json"
    not_an_object.write_text("[1, 2]")
    cases: list[tuple[Path, list[str | Path], str, int, str]] = [
        (tmp_path / "missing.json", [], TASK, 2, "missing.json: no such file"),
        (question, [], "   ", 2, "task is empty"),
        (question, ["--pool", tmp_path / "nopool.yaml"], TASK, 2, "nopool.yaml: no such file"),
        (not_an_object, [], TASK, 1, "must be a JSON object"),
    ]
    for input_path, extra, task, code, message in cases:
        proc = solve_cli(tmp_path, input_path, llm_server, *extra, task=task, inprocess=True)
        assert proc.returncode == code, (task, extra, proc.stderr)
        assert message in proc.stderr, proc.stderr
        assert_no_traceback(proc)
    assert llm_server.requests == []  # refused before any LLM work
    # a pool that is not a pool: found at configure time, after the generator
    bad_pool = tmp_path / "bad-pool.yaml"
    bad_pool.write_text("- just\n- a list\n")
    llm_server.responder = Script([(GENERATOR, spec_json(cot_spec()))], field="system")
    proc = solve_cli(tmp_path, question, llm_server, "--pool", bad_pool, inprocess=True)
    assert proc.returncode == 1 and "bad-pool.yaml" in proc.stderr
    assert_no_traceback(proc)


def test_solve_unreachable_endpoint_is_a_clean_failure(question: Path, tmp_path: Path) -> None:
    proc = mas2c(
        "solve",
        TASK,
        "--input",
        question,
        "--run-dir",
        tmp_path / "solve",
        "--sandbox",
        "unisolated",
        "--llm",
        "http://127.0.0.1:9/v1",
        "--max-repairs",
        "0",
        cwd=tmp_path,
        inprocess=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert_no_traceback(proc)
    assert "127.0.0.1:9" in proc.stderr
    summary = read_json(tmp_path / "solve" / "summary.json")  # written also on failure
    assert summary["status"] == "error"


# -- generate ---------------------------------------------------------------------------------


def generate_cli(
    tmp_path: Path, server: LLMTestServer | None, *extra: str | Path, task: str = TASK
) -> subprocess.CompletedProcess[str]:
    llm = ["--llm", server.base_url] if server is not None else []
    return mas2c("generate", task, *llm, *extra, cwd=tmp_path, inprocess=True)


def test_generate_writes_a_valid_spec(llm_server: LLMTestServer, tmp_path: Path) -> None:
    llm_server.responder = Script([], default=[spec_json(invalid_spec()), spec_json(cot_spec())])
    out = tmp_path / "spec.yaml"  # its folder must exist: -o FILE creates none
    proc = generate_cli(tmp_path, llm_server, "-o", out, "--examples", SPECS, "--json")
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    data = json.loads(proc.stdout)
    assert data["output"] == str(out)
    assert data["name"] == "chain-of-thought"
    assert data["attempts"] == 2
    assert [p["code"] for p in data["repairs"][0] if p["severity"] == "error"] == ["MAS201"]
    assert len(data["examples"]) == 2
    assert data["usage"]["calls"] == 2
    report = validate_file(out)
    assert report.ok, report.format()
    assert report.spec is not None and spec_hash(report.spec) == data["spec_hash"]
    assert no_temp_files(out.parent)
    assert "MAS201 /workflow/0/agent" in llm_server.requests[1].last_user

    # without --json: one line on stdout; the output is replaced whole
    llm_server.responder = lambda req: spec_json(cot_spec())
    proc = generate_cli(tmp_path, llm_server, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and f"wrote {out} (chain-of-thought, 1 answer(s))\n" in proc.stderr
    assert validate_file(out).ok
    assert no_temp_files(out.parent)
    # -o spec.json gets JSON (a .json spec is read as JSON: YAML there did not validate)
    proc = generate_cli(tmp_path, llm_server, "-o", tmp_path / "spec.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "spec.json").read_text())["name"] == "chain-of-thought"
    assert validate_file(tmp_path / "spec.json").ok


def test_generate_gives_up_cleanly(llm_server: LLMTestServer, tmp_path: Path) -> None:
    llm_server.responder = lambda req: spec_json(invalid_spec())
    out = tmp_path / "spec.yaml"
    proc = generate_cli(tmp_path, llm_server, "-o", out, "--max-repairs", "1")
    assert proc.returncode == 1
    assert_no_traceback(proc)
    assert "no valid spec after 2 answer(s)" in proc.stderr
    assert "MAS201 /workflow/0/agent" in proc.stderr
    assert len(llm_server.requests) == 2
    assert not out.exists()
    assert no_temp_files(tmp_path)


def test_generate_record_then_replay(tmp_path: Path) -> None:
    cassette = tmp_path / "cassette.jsonl"
    with LLMTestServer(lambda req: spec_json(cot_spec())) as server:
        proc = generate_cli(tmp_path, server, "-o", tmp_path / "a.yaml", "--record", cassette)
        assert proc.returncode == 0, proc.stderr
    assert len(cassette.read_text().splitlines()) == 1
    proc = mas2c(
        "generate",
        TASK,
        "-o",
        tmp_path / "b.yaml",
        "--replay",
        cassette,
        cwd=tmp_path,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.yaml").read_text() == (tmp_path / "b.yaml").read_text()


def test_generate_usage_errors(llm_server: LLMTestServer, tmp_path: Path) -> None:
    out = tmp_path / "spec.yaml"
    cases: list[tuple[list[str | Path], str]] = [
        ([], "-o/--output"),  # -o is required
        (["-o", out, "--examples", tmp_path / "none"], "none: no such file"),
        (["-o", out, "--examples", SPECS / "debate.yaml"], "expects a folder"),
        (["-o", out, "--replay", tmp_path / "none.jsonl"], "none.jsonl: no such file"),
    ]
    for extra, message in cases:
        proc = generate_cli(tmp_path, llm_server, *extra)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr, proc.stderr
        assert_no_traceback(proc)
    proc = generate_cli(tmp_path, llm_server, "-o", out, task=" ")
    assert proc.returncode == 2 and "task is empty" in proc.stderr
    assert llm_server.requests == []
    # an output that cannot be written: after the LLM's work, but still no traceback
    llm_server.responder = lambda req: spec_json(cot_spec())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = generate_cli(tmp_path, llm_server, "-o", blocker / "spec.yaml")
    assert proc.returncode == 2 and "cannot write" in proc.stderr
    assert_no_traceback(proc)
    assert not out.exists()


def test_generate_unreachable_endpoint(tmp_path: Path) -> None:
    proc = mas2c(
        "generate",
        TASK,
        "-o",
        tmp_path / "s.yaml",
        "--llm",
        "http://127.0.0.1:9/v1",
        cwd=tmp_path,
        inprocess=True,
    )
    assert proc.returncode == 1
    assert_no_traceback(proc)
    assert "cannot connect" in proc.stderr


# -- configure --------------------------------------------------------------------------------

UNBOUND_SPEC = """\
spec_version: "1"
name: review
description: A solver answers, a judge checks it.
inputs:
  question: {type: string}
outputs:
  answer: verdict.answer
agents:
  solver: {role: Careful solver, instructions: Solve it step by step.}
  judge:
    role: Impartial judge
    instructions: Pick the best-supported answer.
    output: {type: object, properties: {answer: {type: string}}, required: [answer]}
  writer: {role: Writer, model: house}
models:
  house: {model: house-model}
workflow:
  - {id: sample, kind: ensemble, agent: solver, n: 3, prompt: "{{ question }}", judge: judge, out: verdict}
  - {id: write, kind: call, agent: writer, prompt: "{{ verdict.answer }}", out: text}
"""

POOL = """\
mini:
  model: gpt-4o-mini
  description: Cheap and fast, for routine work.
  price: {input_per_mtok: 0.15, output_per_mtok: 0.6}
big:
  model: gpt-4o
  description: Strong reasoning, expensive.
  price: {input_per_mtok: 2.5, output_per_mtok: 10}
"""


@pytest.fixture
def unbound(tmp_path: Path) -> tuple[Path, Path]:
    spec, pool = tmp_path / "spec.yaml", tmp_path / "pool.yaml"
    spec.write_text(UNBOUND_SPEC)
    pool.write_text(POOL)
    return spec, pool


def test_configure_by_rule(unbound: tuple[Path, Path], tmp_path: Path) -> None:
    spec, pool = unbound
    out = tmp_path / "configured.yaml"  # its folder must exist: -o FILE creates none
    # no endpoint at all: the rule needs no LLM
    env = cli_env()
    proc = mas2c(
        "configure", spec, "--pool", pool, "--rule", "-o", out, "--json", cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    data = json.loads(proc.stdout)
    assert data["output"] == str(out)
    assert data["attempts"] == 0 and data["usage"]["calls"] == 0
    assert set(data["choices"]) == {"solver", "judge"}  # the writer was bound already
    assert {c["by"] for c in data["choices"].values()} == {"rule"}
    assert data["choices"]["judge"]["model"] == "big"  # judges get the strongest
    assert data["choices"]["solver"]["model"] == "mini"  # ensemble samplers the cheapest
    report = validate_file(out)
    assert report.ok, report.format()
    assert report.spec is not None and spec_hash(report.spec) == data["spec_hash"]
    configured = report.spec
    assert configured.agents["writer"].model == "house"
    assert {configured.models[a.model or ""].model for a in configured.agents.values()} == {
        "gpt-4o-mini",
        "gpt-4o",
        "house-model",
    }
    assert no_temp_files(out.parent)
    assert spec.read_text() == UNBOUND_SPEC  # the input is never modified

    # without -o: the spec on stdout, the choices on stderr
    proc = mas2c("configure", spec, "--pool", pool, "--rule", cwd=tmp_path, env=env, inprocess=True)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["agents"]["judge"]["model"]
    assert "judge -> big (rule:" in proc.stderr
    # --rebind: every agent, the writer too
    proc = mas2c(
        "configure",
        spec,
        "--pool",
        pool,
        "--rule",
        "--rebind",
        "--json",
        cwd=tmp_path,
        env=env,
        inprocess=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["choices"]) == {"solver", "judge", "writer"}


def test_configure_by_llm(
    llm_server: LLMTestServer, unbound: tuple[Path, Path], tmp_path: Path
) -> None:
    spec, pool = unbound
    proc = mas2c(
        "configure",
        spec,
        "--pool",
        pool,
        "--llm",
        llm_server.base_url,
        "--json",
        cwd=tmp_path,
        inprocess=True,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["output"] is None
    assert {c["by"] for c in data["choices"].values()} == {"llm"}
    assert data["attempts"] == 1 and data["usage"]["calls"] == 1
    (request,) = llm_server.requests
    assert request.response_schema is not None
    bindings = request.response_schema["properties"]["bindings"]["properties"]
    assert bindings["judge"]["properties"]["model"]["enum"] == ["mini", "big"]
    # the default responder picks the first pool id
    assert {c["model"] for c in data["choices"].values()} == {"mini"}


def test_configure_errors(unbound: tuple[Path, Path], tmp_path: Path) -> None:
    spec, pool = unbound
    env = cli_env()
    bad_pool = tmp_path / "bad-pool.yaml"
    bad_pool.write_text("- a\n- list\n")
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(UNBOUND_SPEC.replace("agent: writer", "agent: writr"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases: list[tuple[Path, Path, list[str | Path], int, str]] = [
        (spec, tmp_path / "none.yaml", [], 2, "none.yaml: no such file"),
        (tmp_path / "none.yaml", pool, [], 2, "none.yaml: no such file"),
        (spec, bad_pool, [], 1, "bad-pool.yaml"),
        (bad_spec, pool, [], 1, "error MAS201 at /workflow/1/agent"),
        (spec, pool, ["-o", blocker / "c.yaml"], 2, "cannot write"),
    ]
    for spec_path, pool_path, extra, code, message in cases:
        proc = mas2c(
            "configure",
            spec_path,
            "--pool",
            pool_path,
            "--rule",
            *extra,
            cwd=tmp_path,
            env=env,
            inprocess=True,
        )
        assert proc.returncode == code, (spec_path, pool_path, extra, proc.stderr)
        assert message in proc.stderr, proc.stderr
        assert_no_traceback(proc)
        if spec_path == bad_spec:  # located: file:line:column
            assert re.search(rf"{re.escape(str(bad_spec))}:19:\d+: error MAS201", proc.stderr)


def test_solve_names_the_fallback_model_as_the_generator_asked(
    llm_server: LLMTestServer, question: Path, tmp_path: Path
) -> None:
    """A generated spec that declares no model runs on one entry bound to the model the
    generator was asked with (--model, else MAS2C_MODEL, else the default), never on a
    made-up name ("local" named the embedded model once, and means nothing today)."""
    data = cot_spec()
    data.pop("models")
    data["agents"]["reasoner"].pop("model")
    llm_server.responder = Script(
        [(GENERATOR, spec_json(data)), (REASONER, reasoned)], field="system"
    )
    proc = solve_cli(tmp_path, question, llm_server, env=cli_env(MAS2C_MODEL="the-served-one"))
    assert proc.returncode == 0, proc.stderr
    assert {r.model for r in llm_server.requests} == {"the-served-one"}
    spec = load_spec(tmp_path / "solve" / "spec.yaml")
    assert [m.model for m in spec.models.values()] == ["the-served-one"]
