"""One sandboxed run: a spec or a build, an input, the gateway on the host, a run folder.

The run folder holds result.json, trace.jsonl, stdout.txt, stderr.txt,
sandbox.json (written by `mas2c.sandbox`), usage.json (from the gateway),
spec.json and input.json (what ran, so that `mas2c rectify RUN_DIR` can re-run it),
and run.json (the run header: command, versions, spec hash, endpoint host, times
and the trace id; see `mas2c.tracing`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mas2c.compile import compile_spec
from mas2c.files import write_bytes_atomic, write_text_atomic
from mas2c.spec import Spec, canonical_json


class RunError(Exception):
    """The run could not be set up (no endpoint, unreadable build, ...): a user-facing message."""


@dataclass(frozen=True)
class LLMConfig:
    """Where the gateway sends LLM traffic.

    `url` None means: `OPENAI_BASE_URL` if set, else the embedded local model.
    """

    url: str | None = None
    api_key: str | None = None
    local_model: Path | None = None
    record: Path | None = None
    replay: Path | None = None
    cache: bool = False
    force_local: bool = False

    def endpoint(self) -> str | None:
        """The OpenAI-compatible URL to use, or None for the embedded local engine."""
        url = self.url or (None if self.force_local else os.environ.get("OPENAI_BASE_URL"))
        return url if url and url != "local" else None

    def key(self) -> str | None:
        return self.api_key if self.api_key is not None else os.environ.get("OPENAI_API_KEY")

    @property
    def replay_misses(self) -> Literal["fail", "forward"]:
        """With both a replay and a record cassette, what the replay lacks is fetched and recorded."""
        return "forward" if self.replay is not None and self.record is not None else "fail"

    @property
    def needs_upstream(self) -> bool:
        """False only for a strict replay (no endpoint at all)."""
        return self.replay is None or self.replay_misses == "forward"


@dataclass
class RunOutcome:
    run_dir: Path
    status: str
    exit_code: int | None
    result: dict[str, Any]
    usage: dict[str, Any]
    sandbox: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def load_target(target: Path) -> tuple[Spec, Path | None]:
    """A spec file (to compile) or a build folder (with MANIFEST.json): its spec and build path."""
    from mas2c.validate import load_spec

    if target.is_dir():
        manifest_path = target / "MANIFEST.json"
        if not manifest_path.is_file():
            raise RunError(
                f"{target}: not a build folder (no MANIFEST.json); give a spec or `mas2c compile` output"
            )
        try:
            manifest = json.loads(manifest_path.read_text("utf-8"))
            return Spec.model_validate(manifest["spec"]), target
        except (ValueError, KeyError) as exc:
            raise RunError(f"{manifest_path}: unreadable manifest ({exc})") from None
    return load_spec(target), None


def make_upstream(config: LLMConfig, on_progress: Callable[[str], None] | None = None) -> Any:
    """The gateway's upstream: an OpenAI-compatible endpoint, or the embedded local engine."""
    from mas2c.gateway import HttpUpstream

    if not config.needs_upstream:
        return None
    url = config.endpoint()
    if url is not None:
        return HttpUpstream(url, config.key())
    from mas2c.local import LocalUpstream

    return LocalUpstream.load(config.local_model, on_progress=on_progress)


def gateway_prices(spec: Spec) -> dict[str, Any]:
    from mas2c.gateway import Price

    return {
        model.model: Price(model.price.input_per_mtok, model.price.output_per_mtok)
        for model in spec.models.values()
        if model.price is not None
    }


def gateway_models(spec: Spec) -> dict[str, int | None]:
    """The model names the spec's pool allows, each with its ``max_tokens`` cap (None: none)."""
    caps: dict[str, int | None] = {}
    for model in spec.models.values():
        if model.model in caps:
            old = caps[model.model]
            caps[model.model] = (
                None if old is None or model.max_tokens is None else max(old, model.max_tokens)
            )
        else:
            caps[model.model] = model.max_tokens
    return caps


def gateway_egress(spec: Spec) -> Any:
    """The egress policy of the spec's tools (secrets read on the host now), or None."""
    from mas2c.gateway import EgressPolicy, EgressRule, GatewayError

    rules = {
        name: EgressRule(
            frozenset(h.lower() for h in tool.egress.hosts), tuple(tool.egress.secrets)
        )
        for name, tool in spec.tools.items()
        if tool.egress is not None
    }
    if not rules:
        return None
    try:
        return EgressPolicy.from_host(rules)
    except GatewayError as exc:
        raise RunError(str(exc)) from None


def sandbox_uid(backend: str, loosen: Any) -> int:
    """The uid the sandboxed program runs as (who must reach the gateway socket)."""
    from mas2c import sandbox

    if backend == "local":
        uid = getattr(sandbox, "local_uid", None)
        return int(uid()) if callable(uid) else os.geteuid()
    return 0 if loosen is not None and getattr(loosen, "root_user", False) else sandbox.SANDBOX_UID


def gateway_budget(spec: Spec) -> Any:
    from mas2c.gateway import Budget

    b = spec.budgets
    return Budget(b.max_llm_calls, b.max_total_tokens, b.max_cost_usd)


@contextmanager
def socket_dir(uid: int | None = None) -> Iterator[Path]:
    """A short folder of mode 0700 for the gateway socket (unix socket paths are capped near 107 bytes).

    Owned by ``uid`` (the sandbox's) when mas2c runs as root, so that only that uid
    (and root) can enter it; otherwise owned by this user (the container reaches the
    socket through its bind mount, other host users cannot enter the folder).
    """
    folder = Path(tempfile.mkdtemp(prefix="mas2c-", dir="/tmp"))  # mode 0700
    try:
        if uid is not None and uid != os.geteuid() and os.geteuid() == 0:
            os.chown(folder, uid, uid)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_system(
    target: Path,
    input_path: Path,
    run_dir: Path,
    *,
    backend: Literal["docker", "local"] = "docker",
    limits: Any = None,
    loosen: Any = None,
    image: str | None = None,
    llm: LLMConfig | None = None,
    upstream: Any = None,
    on_warning: Callable[[str], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    trace_content: bool | None = None,
) -> RunOutcome:
    """Compile if needed, start the gateway, run the package in the sandbox, collect the folder.

    `upstream` overrides `llm` (callers that run many systems share one upstream).
    `trace_content` (default: `MAS2C_TRACE_CONTENT=1` in the environment) also traces
    prompts and completions.
    """
    from mas2c import sandbox
    from mas2c.gateway import Gateway
    from mas2c.validate import input_error

    llm = llm or LLMConfig()
    spec, build_dir = load_target(target)
    given = _check_input(input_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    header = run_header(spec, llm, backend, trace_content)
    _write_header(run_dir, header)
    # What `mas2c rectify RUN_DIR` re-runs: the spec (canonical JSON) and the input.
    write_text_atomic(run_dir / "spec.json", canonical_json(spec.to_data()) + "\n")
    write_bytes_atomic(run_dir / "input.json", input_path.read_bytes())
    bad_input = input_error(spec, given)
    if bad_input is not None:  # checked on the host: no container, no gateway, no LLM call
        result = {"status": "bad_input", "error": bad_input, "usage": {}}
        write_text_atomic(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
        _finish_header(run_dir, header)
        return RunOutcome(run_dir, "bad_input", 2, result, {})
    if build_dir is None:
        build_dir = run_dir / "build"
        compile_spec(spec).write(build_dir)
    owned = upstream is None and llm.needs_upstream
    if owned:
        upstream = make_upstream(llm)
    uid = sandbox_uid(backend, loosen)
    try:
        with socket_dir(uid) as folder:
            gateway = Gateway(
                folder / "llm.sock",
                upstream if llm.needs_upstream else None,
                prices=gateway_prices(spec),
                budget=gateway_budget(spec),
                record=llm.record,
                replay=llm.replay,
                replay_misses=llm.replay_misses,
                cache=llm.cache,
                on_event=on_event,
                models=gateway_models(spec),
                socket_uid=uid,
                egress=gateway_egress(spec),
            )
            with gateway:
                try:
                    report = sandbox.run_package(
                        build_dir,
                        spec.package_name,
                        input_path,
                        run_dir,
                        backend=backend,
                        limits=limits or sandbox.Limits(),
                        loosen=loosen or sandbox.Loosen(),
                        llm_socket=gateway.socket_path,
                        image=image or sandbox.DEFAULT_IMAGE,
                        env=header.sandbox_env(),
                        on_warning=on_warning,
                    )
                finally:
                    usage = gateway.usage()
                    write_text_atomic(
                        run_dir / "usage.json", json.dumps(usage, indent=2, sort_keys=True) + "\n"
                    )
    finally:
        if owned and hasattr(upstream, "close"):
            upstream.close()
        _finish_header(run_dir, header)
    result = _read_json(run_dir / "result.json")
    return RunOutcome(
        run_dir,
        str(result.get("status", "error")),
        report.exit_code,
        result,
        usage,
        report.to_json(),
    )


def run_header(spec: Spec, llm: LLMConfig, backend: str, trace_content: bool | None = None) -> Any:
    """The run's header (`mas2c.tracing.RunHeader`): no key, no credentials, no URL path."""
    from mas2c.spec import spec_hash
    from mas2c.tracing import RunHeader, endpoint_label, redact_argv, trace_content_default

    key = llm.key() or ""
    return RunHeader(
        command=redact_argv(sys.argv, secrets=[key]),
        spec=spec.name,
        spec_sha256=spec_hash(spec),
        endpoint=endpoint_label(llm.endpoint(), replay=llm.replay is not None),
        backend=backend,
        trace_content=trace_content_default() if trace_content is None else trace_content,
    )


def _write_header(run_dir: Path, header: Any) -> None:
    from mas2c.tracing import HEADER_FILE

    text = json.dumps(header.to_json(), indent=2, ensure_ascii=False) + "\n"
    write_text_atomic(run_dir / HEADER_FILE, text)


def _finish_header(run_dir: Path, header: Any) -> None:
    """Record the end time and status; a failure to do so never hides the run's own."""
    header.finished_ts = time.time()
    header.status = str(_read_json(run_dir / "result.json").get("status", "error"))
    with suppress(OSError):
        _write_header(run_dir, header)


def _check_input(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise RunError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: the input must be a JSON object of named inputs")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {
            "status": "error",
            "error": {"type": "MissingResult", "message": f"{path.name} is missing"},
        }
    return data if isinstance(data, dict) else {"status": "error"}
