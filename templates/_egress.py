"""HTTP for code tools that declare `egress` in the spec, through the host gateway.

The sandbox has no network. A tool whose spec entry says

    egress: {hosts: [api.example.com], secrets: [EXAMPLE_KEY]}

calls ``http("tool_id", "GET", "https://api.example.com/v1/x?key=${EXAMPLE_KEY}")``
(``from ._egress import http``). The request goes over the gateway's unix socket;
the gateway refuses hosts the tool did not declare, replaces ``${NAME}`` of the
tool's declared secrets with their values (held on the host, never here), sends it,
and returns the answer with those values replaced by ``<redacted>``. Redirects are
not followed. Standard library only.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from dataclasses import dataclass, field
from http.client import HTTPConnection
from typing import Any

__all__ = ["EgressError", "Response", "http"]

_PATH = "/v1/mas2c/egress"


class EgressError(Exception):
    """The gateway refused the request (undeclared host, unknown secret...) or it failed."""


@dataclass
class Response:
    """An HTTP answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("mas2c-gateway", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def http(
    tool: str,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | str | None = None,
    json_body: Any = None,
    timeout: float = 30.0,
) -> Response:
    """Send one HTTP request for ``tool`` through the gateway; raise EgressError when refused."""
    path = os.environ.get("MAS2C_LLM_SOCKET")
    if not path:
        raise EgressError("no gateway: MAS2C_LLM_SOCKET is not set (run with `mas2c run`)")
    headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body)
        headers.setdefault("Content-Type", "application/json")
    raw = body.encode("utf-8") if isinstance(body, str) else (body or b"")
    request = {
        "tool": tool,
        "method": method.upper(),
        "url": url,
        "headers": headers,
        "body": base64.b64encode(raw).decode("ascii"),
        "timeout_s": timeout,
    }
    conn = _UnixConnection(path, timeout + 5)
    try:
        conn.request(
            "POST",
            _PATH,
            body=json.dumps(request).encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )
        answer = conn.getresponse()
        data = json.loads(answer.read() or b"{}")
    except (OSError, ValueError) as exc:
        raise EgressError(f"egress through the gateway failed: {exc}") from None
    finally:
        conn.close()
    if answer.status != 200:
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        raise EgressError(str(message or f"gateway answered HTTP {answer.status}"))
    return Response(
        status=int(data["status"]),
        headers={str(k): str(v) for k, v in data.get("headers", {}).items()},
        content=base64.b64decode(data.get("body") or ""),
    )
