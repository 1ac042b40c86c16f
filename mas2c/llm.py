"""A small synchronous LLM client shared by the meta-agents (generator, implementer).

It wraps the real `openai.OpenAI` client for any OpenAI-compatible endpoint and
adds what the meta-agents need:

- **Structured output with fallbacks.** `chat(messages, schema=...)` first asks
  with `response_format` type `json_schema`. An endpoint that rejects that
  (HTTP 400 or 422) is asked again in `json_object` mode, and if that is
  rejected too, in plain text for a fenced ```json block. The first mode that
  works is remembered for later calls of the same client (`mode`).
- **Retries.** 429, 5xx, timeouts and dropped connections are retried by the
  openai client itself (`max_retries`, default 3, with its backoff).
- **Accounting.** `usage` counts calls and tokens over the client's lifetime.
- **Clear failures.** Every failure is an `LLMError` whose message names the
  endpoint and what went wrong; never an openai traceback. The endpoint is shown
  without userinfo and with query values redacted, and the message is scrubbed of
  the key and the URL's secrets (`mas2c.gateway.Scrubber`).
- **Base URLs with a query string** (`...?api-version=...`) keep it on every request.

`extract_json(text)` finds the JSON in a model's reply (fenced or not).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import openai

from mas2c.errors import RunFailure

__all__ = [
    "DEFAULT_MODEL",
    "JSONNotFound",
    "LLMClient",
    "LLMError",
    "Message",
    "Mode",
    "Usage",
    "extract_json",
]

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"

Mode = Literal["json_schema", "json_object", "text"]
Message = dict[str, Any]
_MODES: tuple[Mode, ...] = ("json_schema", "json_object", "text")
_SCHEMA_NAME = re.compile(r"[^A-Za-z0-9_-]")


class LLMError(RunFailure):
    """The LLM could not be asked or did not answer; the message says why."""

    code = "llm"


class JSONNotFound(ValueError):
    """A reply holds no JSON value."""


@dataclass(frozen=True)
class Usage:
    """Calls and tokens; `a - b` is what happened between two snapshots."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.calls - other.calls,
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
        )

    def to_json(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


class LLMClient:
    """A synchronous chat client for one OpenAI-compatible endpoint and model."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout_s: float = 300.0,
        max_retries: int = 3,
        default_headers: dict[str, str] | None = None,
        http_client: Any = None,
        shown_as: str | None = None,
    ) -> None:
        """`shown_as` names the endpoint in errors when `base_url` is not it (the host
        gateway's socket: its upstream, already redacted, or the embedded model)."""
        from mas2c.gateway import Scrubber, redact_url

        url = base_url or DEFAULT_BASE_URL
        self.base_url = redact_url(url)
        self.shown_as = shown_as or self.base_url
        self._scrub = Scrubber.for_endpoint(url, api_key)
        url, query = _split_query(url)
        self.model = model or os.environ.get("MAS2C_MODEL") or DEFAULT_MODEL
        self._client = openai.OpenAI(
            base_url=url,
            default_query=query or None,
            # Local servers (llama.cpp, vLLM, Ollama, the gateway) take any key.
            api_key=api_key or "unused",
            timeout=timeout_s,
            max_retries=max_retries,
            default_headers=default_headers,
            # An httpx client with a unix-socket transport reaches the host gateway.
            http_client=http_client,
        )
        self._mode: Mode = "json_schema"
        self._usage = Usage()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, *, model: str | None = None, **kwargs: Any) -> LLMClient:
        """A client for `OPENAI_BASE_URL` / `OPENAI_API_KEY` and `MAS2C_MODEL`."""
        return cls(
            os.environ.get("OPENAI_BASE_URL") or None,
            os.environ.get("OPENAI_API_KEY") or None,
            model=model,
            **kwargs,
        )

    # ------------------------------------------------------------------ state

    @property
    def usage(self) -> Usage:
        """Calls and tokens since this client was made."""
        return self._usage

    @property
    def mode(self) -> Mode:
        """The structured-output mode that works with this endpoint (so far)."""
        return self._mode

    def __repr__(self) -> str:
        return f"LLMClient(base_url={self.base_url!r}, model={self.model!r}, mode={self._mode!r})"

    # ------------------------------------------------------------------- chat

    def chat(
        self,
        messages: Sequence[Message],
        *,
        schema: dict[str, Any] | None = None,
        schema_name: str = "spec",
        schema_in_prompt: bool = True,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        model: str | None = None,
    ) -> str:
        """The assistant's reply text.

        With `schema`, the reply is asked to be a JSON object under that JSON Schema
        (structured output, or the fallbacks described in the module docstring).
        In the fallback modes the instruction to answer in JSON is appended to the
        last user message, with the schema itself unless `schema_in_prompt` is False
        (for prompts that already show it). The reply is returned as text either
        way: parse it with `extract_json`.
        """
        if schema is None:
            return self._create(list(messages), None, temperature, max_tokens, model)
        start = _MODES.index(self._mode)
        last: openai.APIStatusError | None = None
        for mode in _MODES[start:]:
            request = _with_json_instruction(messages, mode, schema, schema_in_prompt)
            try:
                text = self._create(
                    request,
                    _response_format(mode, schema, schema_name),
                    temperature,
                    max_tokens,
                    model,
                    fallible=mode != "text",
                )
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                last = exc  # the endpoint does not take this response_format: degrade
                continue
            with self._lock:
                self._mode = mode  # remembered only once a mode has worked
            return text
        assert last is not None  # the text mode never raises these (fallible=False)
        raise self._error(last)

    def _create(
        self,
        messages: list[Message],
        response_format: dict[str, Any] | None,
        temperature: float,
        max_tokens: int | None,
        model: str | None,
        *,
        fallible: bool = False,
    ) -> str:
        kwargs: dict[str, Any] = {"temperature": temperature}
        if response_format is not None:
            kwargs["response_format"] = response_format
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        try:
            completion = self._client.chat.completions.create(
                model=model or self.model,
                messages=cast(Any, messages),
                **kwargs,
            )
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            if fallible:
                raise
            raise self._error(exc) from None
        except openai.APIError as exc:
            raise self._error(exc) from None
        self._count(completion)
        if not completion.choices:
            raise LLMError(f"{self._where()}: the reply has no choices")
        message = completion.choices[0].message
        if message.content is None and getattr(message, "refusal", None):
            raise LLMError(f"{self._where()}: the model refused: {message.refusal}")
        return message.content or ""

    def _count(self, completion: Any) -> None:
        usage = getattr(completion, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        done = int(getattr(usage, "completion_tokens", 0) or 0)
        with self._lock:
            self._usage = self._usage + Usage(1, prompt, done)

    def _where(self) -> str:
        return f"LLM {self.model} at {self.shown_as}"

    def _error(self, exc: openai.APIError) -> LLMError:
        return LLMError(self._scrub(str(self._explain(exc))))

    def _explain(self, exc: openai.APIError) -> LLMError:
        where = self._where()
        if isinstance(exc, openai.APITimeoutError):
            return LLMError(f"{where}: timed out (after retries)")
        if isinstance(exc, openai.APIConnectionError):
            return LLMError(f"{where}: cannot connect ({exc}); is the endpoint up?")
        if isinstance(exc, openai.AuthenticationError):
            return LLMError(f"{where}: authentication failed; check OPENAI_API_KEY")
        if isinstance(exc, openai.APIStatusError):
            return LLMError(f"{where}: HTTP {exc.status_code}: {_error_message(exc)}")
        return LLMError(f"{where}: {exc}")


def _split_query(url: str) -> tuple[str, dict[str, str]]:
    """The base URL without its query string, and the query's parameters."""
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.query:
        return url, {}
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit(parts._replace(query="")), query


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return str(exc.message)


def _response_format(mode: Mode, schema: dict[str, Any], name: str) -> dict[str, Any] | None:
    if mode == "json_schema":
        clean = _SCHEMA_NAME.sub("_", name)[:64] or "answer"
        # strict=False: strict mode cannot express open maps, unions with defaults, ...
        return {
            "type": "json_schema",
            "json_schema": {"name": clean, "schema": schema, "strict": False},
        }
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def _with_json_instruction(
    messages: Sequence[Message], mode: Mode, schema: dict[str, Any], schema_in_prompt: bool
) -> list[Message]:
    """The messages, with the JSON instruction the fallback modes need."""
    request = [dict(m) for m in messages]
    if mode == "json_schema":
        return request
    if mode == "json_object":
        note = "Reply with a single JSON object and nothing else."
    else:
        note = (
            "Reply with a single JSON object in one fenced code block "
            "(```json ... ```) and nothing else."
        )
    if schema_in_prompt:
        note += " It must conform to this JSON Schema:\n" + json.dumps(schema, indent=1)
    for message in reversed(request):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            message["content"] = f"{message['content']}\n\n{note}"
            break
    else:
        request.append({"role": "user", "content": note})
    return request


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON in a model's reply.

    Tries, in order: the whole text; the ``` fenced blocks (```json first); the
    first `{` ... `}` object that parses, anywhere in the text. `JSONNotFound`
    (a ValueError) when there is none.
    """
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    blocks = _FENCE.findall(stripped)
    blocks.sort(key=lambda block: block[0].lower() != "json")
    for _lang, body in blocks:
        try:
            return json.loads(body)
        except ValueError:
            continue
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", stripped):
        try:
            value, _end = decoder.raw_decode(stripped, match.start())
        except ValueError:
            continue
        return value
    if not stripped:
        raise JSONNotFound("the reply is empty")
    raise JSONNotFound("the reply holds no JSON object")
