"""The meta-agents' LLM access (generator, implementer, rectifier).

They talk to the same upstream as the runs: an OpenAI-compatible endpoint
directly, or the embedded engine through a gateway on a private unix socket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mas2c.llm import LLMClient
    from mas2c.run import LLMConfig


@contextmanager
def meta_client(
    config: LLMConfig,
    *,
    model: str | None = None,
    progress: Callable[[str], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    upstream: Any = None,
) -> Iterator[LLMClient]:

    import httpx

    from mas2c.gateway import Gateway
    from mas2c.llm import LLMClient
    from mas2c.run import make_upstream, socket_dir

    url = config.endpoint()
    direct = config.replay is None and config.record is None and on_event is None
    if upstream is None and url is not None and direct:
        yield LLMClient(url, config.key(), model=model)
        return
    owned = upstream is None
    if upstream is None and config.needs_upstream:
        upstream = make_upstream(config, on_progress=progress)
    # The embedded model is asked (and accounted) under its own name, not a default one.
    model = model or getattr(upstream, "model_id", None)
    try:
        with (
            socket_dir() as folder,
            Gateway(
                folder / "meta.sock",
                upstream,
                record=config.record,
                replay=config.replay,
                replay_misses=config.replay_misses,
                on_event=on_event,
            ) as gateway,
        ):
            transport = httpx.HTTPTransport(uds=str(gateway.socket_path))
            http = httpx.Client(transport=transport, timeout=900.0)
            try:
                yield LLMClient(
                    "http://mas2c-gateway/v1",
                    "sandbox",
                    model=model,
                    http_client=http,
                    shown_as=_shown_as(config, url, upstream),
                )
            finally:
                http.close()
    finally:
        close = getattr(upstream, "close", None)
        if owned and callable(close):
            close()


def _shown_as(config: LLMConfig, url: str | None, upstream: Any) -> str:
    """What errors call the endpoint behind the meta-agents' gateway (never a credential)."""
    from mas2c.gateway import redact_url

    if upstream is None and config.replay is not None:
        return f"the cassette {config.replay}"
    if url is not None and not hasattr(upstream, "serves_as"):
        return redact_url(url)
    model_id = getattr(upstream, "serves_as", None)
    return f"the embedded model {model_id}" if model_id else "the mas2c gateway"
