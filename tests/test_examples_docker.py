"""The examples of the state, map, fallback, flow, delegation and prompt-control
constructs, once each, through `mas2c run` in the Docker sandbox behind the gateway (the
scripted loopback test server as upstream).

Map-reduce (a map over three documents), multi-hop QA (a map over sub-questions whose
retrieval tool runs in the sandbox, findings appended to declared state), Reflexion with
an appended memory, the router with specialist fallbacks, MATH (an ensemble over a
programmer flow: five programs run in the sandbox), MBPP (a test list and a repair flow)
and the manager delegating to workers (agents as tools, an agent chosen by state, chat
history). No container of these runs may be left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_e2e_examples import EXECUTED, EXPECTED, INPUTS, SCRIPTS
from test_run_cli import SPECS, _leftovers, assert_no_traceback, mas2c, read_json, write_input

from mas2c.lang.validate import load_spec
from mas2c.testserver import ChatRequest, LLMTestServer, ReplyLike

NAMES = [
    "map-reduce",
    "multi-hop-qa",
    "reflexion-memory",
    "router-fallback",
    "math-program-ensemble",
    "mbpp-repair",
    "manager-workers",
]


@pytest.mark.docker
@pytest.mark.parametrize("name", NAMES)
def test_example_runs_in_docker(name: str, docker_ready: None, tmp_path: Path) -> None:
    input_path = write_input(tmp_path, INPUTS[name])
    run_dir = tmp_path / "run"
    script = SCRIPTS[name]()
    roles = {
        agent.role: agent_id for agent_id, agent in load_spec(SPECS / f"{name}.yaml").agents.items()
    }

    def by_role(req: ChatRequest) -> ReplyLike:
        """The gateway does not forward the program's agent header upstream: the
        scripts answer by agent, named here from the system prompt's first line."""
        agent = roles.get(req.system.split("\n", 1)[0].strip(), "")
        return script(ChatRequest(req.body, {**req.headers, "x-mas2c-agent": agent}, req.path))

    with LLMTestServer(by_role) as server:
        proc = mas2c(
            "run",
            SPECS / f"{name}.yaml",
            "--input",
            input_path,
            "--run-dir",
            run_dir,
            "--sandbox",
            "docker",
            "--llm",
            server.base_url,
            "--timeout",
            "180",
            cwd=tmp_path,
        )
        calls = len(server.requests)
    try:
        assert proc.returncode == 0, proc.stderr
        assert_no_traceback(proc)
        outputs = json.loads(proc.stdout)
        for key, want in EXPECTED[name].items():
            assert outputs[key] == want if want is not None else outputs[key] not in (None, "")
        result = read_json(run_dir / "result.json")
        assert result["status"] == "ok"
        assert read_json(run_dir / "sandbox.json")["backend"] == "docker"
        steps, expected_calls = EXECUTED[name]
        assert calls == expected_calls == read_json(run_dir / "usage.json")["calls"]
        trace = [json.loads(line) for line in (run_dir / "trace.jsonl").read_text().splitlines()]
        assert {e["step"] for e in trace if e["event"] == "step_start"} == steps
    finally:
        run_ids = {read_json(p).get("run_id") for p in tmp_path.rglob("sandbox.json")}
        assert _leftovers(run_ids) == []
