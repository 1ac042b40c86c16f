"""One sandboxed run: a spec or a build, an input, the gateway on the host, a run folder.

The run folder holds result.json, trace.jsonl, checkpoints.jsonl (the steps' values: run
content, unlike the trace without --trace-content), stdout.txt, stderr.txt,
sandbox.json (written by `mas2c.sandbox`), usage.json (from the gateway),
spec.json and input.json (what ran, so that `mas2c rectify RUN_DIR` can re-run it),
and run.json (the run header: command, versions, spec hash, endpoint host, times
and the trace id; see `mas2c.tracing`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mas2c.errors import InvalidInput, RunFailure, UsageError
from mas2c.files import (
    check_owned_folder,
    read_manifest,
    run_folder_owns,
    write_bytes_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from mas2c.lang.spec import Spec
    from mas2c.runfolder import Result


class RunError(RunFailure):
    """The run could not be set up (no endpoint, unreadable build, ...): a user-facing message."""

    code = "run_setup"


def endpoint_problem(url: str) -> str | None:
    """Why `url` is no usable http(s) endpoint URL (the URL itself is never quoted: it
    may carry credentials), or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port out of range
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "the endpoint must be an http:// or https:// URL"
    if not parts.hostname:
        return "the endpoint URL has no host"
    if port == 0:
        return "the endpoint URL has port 0"
    return None


@dataclass(frozen=True)
class LLMConfig:
    """Where the gateway sends LLM traffic.

    `url` None means: `OPENAI_BASE_URL` if set, else the embedded model.
    """

    url: str | None = None
    api_key: str | None = None
    embedded_model: Path | None = None
    record: Path | None = None
    replay: Path | None = None
    cache: bool = False
    force_embedded: bool = False

    def endpoint(self) -> str | None:
        """The OpenAI-compatible URL to use, or None for the embedded engine."""
        url = self.url or (None if self.force_embedded else os.environ.get("OPENAI_BASE_URL"))
        if not url or url in ("embedded", "local"):
            return None
        problem = endpoint_problem(url)
        if problem is not None:
            where = "--llm" if self.url else "OPENAI_BASE_URL"
            raise UsageError(f"{where}: {problem}")
        return url

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
    typed: Result | None = None  # `result` as validated by the run-folder contract

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class BadInput(InvalidInput):
    """The run's input does not fit the spec's `inputs`: found on the host, before any sandbox."""

    code = "bad_input"


class EndpointUnreachable(RunFailure):
    """The LLM endpoint does not accept connections: found before any sandbox starts."""

    code = "endpoint_unreachable"


@dataclass(frozen=True)
class Target:
    """What a run needs to know of its system, as plain data (the spec's canonical data).

    A build folder is read from its MANIFEST.json without the spec's pydantic models or
    the compiler, so that `mas2c run BUILD` starts fast; a spec file is validated and
    compiled into the run folder.
    """

    data: dict[str, Any]
    package: str
    build_dir: Path | None
    spec: Spec | None = None


def load_target(target: Path) -> Target:
    """A spec file (to compile) or a build folder (with MANIFEST.json)."""
    if target.is_dir():
        manifest_path = target / "MANIFEST.json"
        if not manifest_path.is_file():
            raise RunError(
                f"{target}: not a build folder (no MANIFEST.json); give a spec or `mas2c compile` output"
            )
        try:
            manifest = read_manifest(target)
            data, package = manifest["spec"], manifest["package"]
            if not isinstance(data, dict) or not isinstance(package, str):
                raise ValueError("`spec` must be an object and `package` a string")
            if not _PACKAGE_NAME.fullmatch(package) or not (target / package).is_dir():
                raise ValueError("`package` must name the package folder beside it (mas2c_<name>)")
            _spec_facts(data)  # shape check of what the run reads
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{manifest_path}: unreadable manifest ({exc})") from None
        return Target(data, package, target)
    from mas2c.lang.validate import load_spec

    spec = load_spec(target)
    return Target(spec.to_data(), spec.package_name, None, spec)


#: What `compile` names a package (`Spec.package_name`): never a path.
_PACKAGE_NAME = re.compile(r"mas2c_[a-z][a-z0-9_]{0,63}")


def _spec_facts(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(models, budgets, inputs) of a spec's data, each a JSON object (TypeError if not)."""
    parts = tuple(data.get(key) or {} for key in ("models", "budgets", "inputs"))
    for key, part in zip(("models", "budgets", "inputs"), parts, strict=True):
        if not isinstance(part, dict):
            raise TypeError(f"spec.{key} must be an object")
    return parts  # type: ignore[return-value]


def make_upstream(config: LLMConfig, on_progress: Callable[[str], None] | None = None) -> Any:
    """The gateway's upstream: an OpenAI-compatible endpoint, or the embedded engine."""
    from mas2c.gateway import HttpUpstream

    if not config.needs_upstream:
        return None
    url = config.endpoint()
    if url is not None:
        return HttpUpstream(url, config.key())
    from mas2c.embedded import EmbeddedUpstream

    return EmbeddedUpstream.load(config.embedded_model, on_progress=on_progress)


def gateway_prices(spec: Spec | dict[str, Any]) -> dict[str, Any]:
    from mas2c.gateway import Price

    models = _spec_facts(spec if isinstance(spec, dict) else spec.to_data())[0]
    return {
        str(model["model"]): Price(
            float(price.get("input_per_mtok", 0.0)), float(price.get("output_per_mtok", 0.0))
        )
        for model in models.values()
        if isinstance(model, dict) and isinstance(price := model.get("price"), dict)
    }


def gateway_models(spec: Spec | dict[str, Any]) -> dict[str, int | None]:
    """The model names the spec's pool allows, each with its ``max_tokens`` cap (None: none)."""
    models = _spec_facts(spec if isinstance(spec, dict) else spec.to_data())[0]
    caps: dict[str, int | None] = {}
    for model in models.values():
        if not isinstance(model, dict):
            continue
        name, cap = str(model.get("model")), model.get("max_tokens")
        cap = cap if isinstance(cap, int) else None
        if name in caps:
            old = caps[name]
            caps[name] = None if old is None or cap is None else max(old, cap)
        else:
            caps[name] = cap
    return caps


def gateway_egress(spec: Spec | dict[str, Any]) -> Any:
    """The egress policy of the spec's tools (secrets read on the host now), or None."""
    from mas2c.gateway import EgressPolicy, EgressRule, GatewayError

    data = spec if isinstance(spec, dict) else spec.to_data()
    tools = data.get("tools") or {}
    rules = {
        str(name): EgressRule(
            frozenset(str(h).lower() for h in egress.get("hosts") or []),
            tuple(str(s) for s in egress.get("secrets") or []),
        )
        for name, tool in (tools.items() if isinstance(tools, dict) else [])
        if isinstance(tool, dict) and isinstance(egress := tool.get("egress"), dict)
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

    if backend in ("unisolated", "local"):
        return sandbox.unisolated_uid()
    return 0 if loosen is not None and getattr(loosen, "root_user", False) else sandbox.SANDBOX_UID


def gateway_budget(spec: Spec | dict[str, Any]) -> Any:
    from mas2c.gateway import Budget

    b = _spec_facts(spec if isinstance(spec, dict) else spec.to_data())[1]
    return Budget(b.get("max_llm_calls"), b.get("max_total_tokens"), b.get("max_cost_usd"))


SOCKET_DIR_PREFIX = "mas2c-gw-"


def reap_socket_dirs(older_than_s: float = 60.0, root: Path = Path("/tmp")) -> list[Path]:
    """Remove socket folders left by a killed mas2c (kill -9 skips the cleanup).

    Only folders named ``mas2c-gw-*``, older than ``older_than_s``, holding nothing but
    sockets nobody listens on (or nothing at all); a live gateway's folder is kept.
    """
    import socket
    import stat
    import time

    removed: list[Path] = []
    try:
        candidates = list(root.glob(SOCKET_DIR_PREFIX + "*"))
    except OSError:
        return removed
    now = time.time()
    for folder in candidates:
        try:
            st = folder.lstat()
            if not stat.S_ISDIR(st.st_mode) or now - st.st_mtime < older_than_s:
                continue
            entries = list(folder.iterdir())
        except OSError:
            continue
        live = False
        for entry in entries:
            try:
                if not stat.S_ISSOCK(entry.lstat().st_mode):
                    live = True  # not ours to judge
                    break
            except OSError:
                continue
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(0.5)
                probe.connect(str(entry))
                live = True
            except OSError:
                pass
            finally:
                probe.close()
            if live:
                break
        if not live:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def socket_dir(uid: int | None = None) -> Iterator[Path]:
    """A short folder of mode 0700 for the gateway socket (unix socket paths are capped near 107 bytes).

    Owned by ``uid`` (the sandbox's) when mas2c runs as root, so that only that uid
    (and root) can enter it; otherwise owned by this user (the container reaches the
    socket through its bind mount, other host users cannot enter the folder).
    """
    reap_socket_dirs()
    folder = Path(tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX, dir="/tmp"))  # mode 0700
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
    backend: Literal["docker", "unisolated", "local"] = "docker",
    limits: Any = None,
    loosen: Any = None,
    image: str | None = None,
    llm: LLMConfig | None = None,
    upstream: Any = None,
    on_warning: Callable[[str], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_progress: Callable[[str], None] | None = None,
    trace_content: bool | None = None,
) -> RunOutcome:
    """Compile if needed, start the gateway, run the package in the sandbox, collect the folder.

    Before anything is written or started, the input is checked against the spec's
    `inputs` (`BadInput`) and a configured endpoint for a connection
    (`EndpointUnreachable`). `upstream` overrides `llm` (callers that run many systems
    share one upstream, and check it themselves). `trace_content` (default:
    `MAS2C_TRACE_CONTENT=1` in the environment) also traces prompts and completions.
    """
    from mas2c import sandbox

    llm = llm or LLMConfig()
    say = on_progress or (lambda _message: None)
    system = load_target(target)
    check_input(input_path, _spec_facts(system.data)[2])
    owned = upstream is None and llm.needs_upstream
    if owned and (url := llm.endpoint()) is not None:
        check_reachable(url)
    check_owned_folder(run_dir, marker="run.json", owns=run_folder_owns(run_dir), what="run")
    uid = sandbox_uid(backend, loosen)
    with ExitStack() as stack:
        folder: Path | None = None
        prestarted = None
        loads_model = owned and llm.endpoint() is None  # the embedded engine: seconds
        if backend == "docker" and not loads_model:
            # The container is created and started on a thread from here on: dockerd's
            # work overlaps the host's (run folder, gateway, upstream, a compile).
            folder = stack.enter_context(socket_dir(uid))
            prestarted = sandbox.prestart(
                image=image or sandbox.DEFAULT_IMAGE,
                limits=limits or sandbox.Limits(),
                loosen=loosen or sandbox.Loosen(),
                socket_folder=folder,
            )
            if prestarted is not None:
                stack.callback(prestarted.cancel)
        from mas2c.gateway import Gateway, GatewayLimits

        if loads_model:  # the embedded engine, loaded first: its name binds the spec's models
            upstream = make_upstream(llm, on_progress=on_progress)
            if hasattr(upstream, "close"):
                stack.callback(upstream.close)
        engine = upstream
        if engine is None and llm.force_embedded and llm.replay is not None:
            from mas2c.embedded import EngineName  # a strict replay of an embedded run

            engine = EngineName.of(llm.embedded_model)
        system = on_engine(system, engine, on_warning)
        run_dir.mkdir(parents=True, exist_ok=True)
        header = run_header(system, llm, backend, trace_content)
        _write_header(run_dir, header)
        # What `mas2c rectify RUN_DIR` re-runs: the spec (canonical JSON) and the input.
        write_text_atomic(run_dir / "spec.json", _canonical_json(system.data) + "\n")
        write_bytes_atomic(run_dir / "input.json", input_path.read_bytes())
        build_dir = system.build_dir
        if build_dir is None:
            from mas2c.compile import compile_spec

            assert system.spec is not None
            say("compiling")
            build_dir = run_dir / "build"
            compile_spec(system.spec).write(build_dir)
        if owned and not loads_model:
            upstream = make_upstream(llm, on_progress=on_progress)
        try:
            if folder is None:
                folder = stack.enter_context(socket_dir(uid))
            gateway = Gateway(
                folder / "llm.sock",
                upstream if llm.needs_upstream else None,
                prices=gateway_prices(system.data),
                budget=gateway_budget(system.data),
                record=llm.record,
                replay=llm.replay,
                replay_misses=llm.replay_misses,
                cache=llm.cache,
                on_event=on_event,
                models=gateway_models(system.data),
                socket_uid=uid,
                egress=gateway_egress(system.data),
                limits=GatewayLimits(
                    allow_image_urls=os.environ.get("MAS2C_ALLOW_IMAGE_URLS") == "1"
                ),
            )
            with gateway:
                try:
                    say(f"running {system.package} in the {backend} sandbox")
                    _preload_runfolder()
                    report = sandbox.run_package(
                        build_dir,
                        system.package,
                        input_path,
                        run_dir,
                        backend=backend,
                        limits=limits or sandbox.Limits(),
                        loosen=loosen or sandbox.Loosen(),
                        llm_socket=gateway.socket_path,
                        image=image or sandbox.DEFAULT_IMAGE,
                        env=header.sandbox_env(),
                        on_warning=on_warning,
                        defer_removal=True,
                        prestarted=prestarted,
                    )
                finally:
                    usage = gateway.usage()
                    write_text_atomic(
                        run_dir / "usage.json", json.dumps(usage, indent=2, sort_keys=True) + "\n"
                    )
        finally:
            if owned and not loads_model and hasattr(upstream, "close"):
                upstream.close()
            _finish_header(run_dir, header)
    # The program wrote result.json: read it through the run-folder contract (hostile input).
    from mas2c.runfolder import result_data, result_or_error  # pydantic: after the run only

    result = result_or_error(run_dir / "result.json")
    sandbox.join_removal(report)  # the container's removal ran beside the lines above
    return RunOutcome(
        run_dir,
        result.status,
        report.exit_code,
        result_data(result),
        usage,
        report.to_json(),
        typed=result,
    )


def spec_on_engine(spec: Spec, upstream: Any) -> Spec:
    """`spec` as it runs on `upstream` (`on_engine`'s rule, for callers that compile a spec
    themselves: rectify's rounds), unchanged unless `upstream` is the embedded engine."""
    model_id = getattr(upstream, "serves_as", None)
    if not isinstance(model_id, str):
        return spec
    from mas2c.embedded import bind_models

    data = spec.to_data()
    bound = bind_models(data, model_id, str(upstream.describe()))
    return spec if bound == data else type(spec).model_validate(bound)


def on_engine(system: Target, upstream: Any, on_warning: Callable[[str], None] | None) -> Target:
    """The system as it runs on `upstream`: on the embedded engine (an upstream with
    ``serves_as``, its model's own name) every model of the spec's pool is bound to that
    model, without a price (`mas2c.embedded.bind_models`, the rule `solve` applies too), so
    requests, usage, the trace and the cost name the model that answers. A spec or build
    naming other models is then compiled, bound, into the run folder's ``build/`` (a build
    folder is recompiled from its MANIFEST.json's spec), with one warning."""
    model_id = getattr(upstream, "serves_as", None)
    if not isinstance(model_id, str):
        return system
    from mas2c.embedded import bind_models
    from mas2c.lang.spec import Spec

    bound = bind_models(system.data, model_id, str(upstream.describe()))
    if bound == system.data:
        return system
    named = sorted(
        {
            str(m.get("model"))
            for m in (system.data.get("models") or {}).values()
            if isinstance(m, dict)
        }
    )
    if on_warning is not None:
        on_warning(
            f"the embedded model {model_id} answers for the spec's model(s) {', '.join(named)}: "
            "the run's spec.json and build/ bind them to it, without their prices (cost 0)"
        )
    try:
        spec = Spec.model_validate(bound)
    except ValueError as exc:
        raise RunError(f"the spec cannot be bound to the embedded model: {exc}") from None
    return Target(spec.to_data(), spec.package_name, None, spec)


def _preload_runfolder() -> None:
    """Import the run-folder contract (pydantic, ~60 ms) on a thread while the sandbox
    runs (the host only waits for it then), not after it: the reader is the same typed
    one; only its import moves off the critical path."""
    if "mas2c.runfolder" in sys.modules:
        return
    import threading

    def load() -> None:
        with suppress(Exception):
            import mas2c.runfolder  # noqa: F401

    threading.Thread(target=load, name="mas2c-preload", daemon=True).start()


def run_header(
    system: Target, llm: LLMConfig, backend: str, trace_content: bool | None = None
) -> Any:
    """The run's header (`mas2c.tracing.RunHeader`): no key, no credentials, no URL path."""
    import hashlib

    from mas2c.tracing import RunHeader, endpoint_label, redact_argv, trace_content_default

    key = llm.key() or ""
    return RunHeader(
        command=redact_argv(sys.argv, secrets=[key]),
        spec=str(system.data.get("name", "")),
        # = mas2c.lang.spec.spec_hash: sha256 of the spec's canonical JSON
        spec_sha256=hashlib.sha256(_canonical_json(system.data).encode()).hexdigest(),
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
    from mas2c.runfolder import result_or_error

    header.status = result_or_error(run_dir / "result.json").status
    with suppress(OSError):
        _write_header(run_dir, header)


def _canonical_json(data: Any) -> str:
    """The same bytes as `mas2c.lang.spec.canonical_json` (kept here so a build runs without it)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_input(path: Path, declared: dict[str, Any]) -> dict[str, Any]:
    """The input file as a JSON object that fits the spec's `inputs`, or `BadInput` in one line.

    The same rule as the compiled package's own check (so a run the host lets through
    is not refused in the sandbox for its input): each declared input present (or with a
    schema `default`) and valid against its schema, no undeclared input.
    """
    try:
        data = json.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise RunError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: the input must be a JSON object of named inputs")
    problems = input_problems(data, declared)
    if problems:
        raise BadInput(f"{path}: " + "; ".join(problems))
    return data


def input_problems(given: dict[str, Any], declared: dict[str, Any]) -> list[str]:
    """Every way `given` misses the spec's `inputs` (name -> JSON Schema), one line each:
    `mas2c.values.input_problems`, the very check the compiled package runs (its
    `_values.py` is that file), so the host and the sandbox never disagree. Patterns are
    matched in linear time (`mas2c.values.pattern_search`), on any thread."""
    from mas2c.values import input_problems as problems_of

    return [message for _pointer, message in problems_of(given, declared)]


def check_reachable(url: str, timeout_s: float = 3.0) -> None:
    """`EndpointUnreachable` unless the endpoint's host accepts a TCP connection."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        from mas2c.gateway import redact_url

        raise RunError(
            f"--llm {redact_url(url)}: not an http(s) URL of an OpenAI-compatible endpoint"
        )
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError | socket.timeout):
            reason = f"no answer within {timeout_s:g} s"
        raise EndpointUnreachable(
            f"the LLM endpoint {parts.scheme}://{parts.hostname}:{port} is not reachable "
            f"({reason}); start it, or pass --llm URL, --llm embedded or --replay FILE"
        ) from None
