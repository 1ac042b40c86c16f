"""A small client of the Docker Engine API for the run path (issue 14: cold start).

The run path (create, attach, start, put the job, read the bundle, remove; the pool's
claims; the reaper) talks to dockerd through this module: ``http.client`` over the
daemon's unix socket (or plain/TLS TCP from ``DOCKER_HOST``), JSON in and out, no
docker-py. docker-py costs ~70 ms of imports (requests, urllib3) and an API-version
round trip before the first container of a process; this costs neither. Paths are
unversioned: the daemon answers in its own current API version (as the docker CLI
does after negotiating), and every field sent here is stable across versions.

What is sent is built in one place: :func:`mas2c.sandbox._container_config` returns the
exact ``POST /containers/create`` body (every isolation flag), and
``tests/test_sandbox.py`` checks it against the body docker-py would have posted for
the same settings and against what the daemon records.

Errors: :class:`EngineError` (an HTTP status >= 400, with the daemon's message),
:class:`NotFound` (404), :class:`Unreachable` (no daemon, no permission).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping
from typing import IO, Any
from urllib.parse import quote, urlencode, urlsplit

DEFAULT_HOST = "unix:///var/run/docker.sock"
#: Largest JSON answer read from the daemon (a container list, an inspect, events).
_MAX_ANSWER = 64 << 20


class EngineError(Exception):
    """The daemon answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.explanation = message


class NotFound(EngineError):
    """404: no such container / image."""


class Conflict(EngineError):
    """409: e.g. a name in use, a removal already in progress."""


class Unreachable(OSError):
    """The daemon's socket cannot be reached (absent, refused, no permission)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError as exc:
            sock.close()
            raise Unreachable(exc.errno, f"{type(exc).__name__}: {exc.strerror or exc}") from None
        self.sock = sock


class HijackedSocket:
    """The attach stream after the HTTP upgrade: what the daemon sent with its answer's
    headers is returned first, then the socket's own bytes."""

    def __init__(self, sock: socket.socket, early: bytes) -> None:
        self._sock = sock
        self._early = early

    def recv(self, n: int) -> bytes:
        if self._early:
            data, self._early = self._early[:n], self._early[n:]
            return data
        return self._sock.recv(n)

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def close(self) -> None:
        self._sock.close()


class Engine:
    """One daemon; every call opens its own connection (thread-safe, no pool)."""

    def __init__(self, host: str | None = None, timeout: float = 120.0) -> None:
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        self.timeout = timeout
        parts = urlsplit(self.host)
        self._scheme = parts.scheme
        if parts.scheme in ("unix", ""):
            self._path = parts.path or "/var/run/docker.sock"
        elif parts.scheme in ("tcp", "http", "https"):
            self._hostname = parts.hostname or "localhost"
            tls = parts.scheme == "https" or bool(os.environ.get("DOCKER_TLS_VERIFY"))
            self._tls = tls
            self._port = parts.port or (2376 if tls else 2375)
        else:
            raise Unreachable(0, f"unsupported DOCKER_HOST {self.host!r} (unix:// or tcp://)")

    # ------------------------------------------------------------------ plumbing

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        t = self.timeout if timeout is None else timeout
        if self._scheme in ("unix", ""):
            return _UnixConnection(self._path, t)
        if self._tls:
            import ssl

            ctx = ssl.create_default_context()
            certs = os.environ.get("DOCKER_CERT_PATH") or os.path.expanduser("~/.docker")
            ca = os.path.join(certs, "ca.pem")
            if os.path.exists(ca):
                ctx.load_verify_locations(ca)
            cert, key = os.path.join(certs, "cert.pem"), os.path.join(certs, "key.pem")
            if os.path.exists(cert) and os.path.exists(key):
                ctx.load_cert_chain(cert, key)
            return http.client.HTTPSConnection(self._hostname, self._port, timeout=t, context=ctx)
        return http.client.HTTPConnection(self._hostname, self._port, timeout=t)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        data: IO[bytes] | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        url = path + ("?" + urlencode(params) if params else "")
        hdrs = dict(headers or {})
        payload: Any = data
        if body is not None:
            payload = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        conn = self._connection(timeout)
        try:
            try:
                conn.request(method, url, body=payload, headers=hdrs)
                answer = conn.getresponse()
                raw = answer.read(_MAX_ANSWER)
            except Unreachable:
                raise
            except (ConnectionRefusedError, FileNotFoundError, PermissionError) as exc:
                raise Unreachable(exc.errno, f"{type(exc).__name__}: {exc}") from None
            if answer.status >= 400:
                raise _error(answer.status, raw)
            return raw
        finally:
            conn.close()

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        raw = self._request(method, path, **kw)
        return json.loads(raw) if raw.strip() else None

    # ------------------------------------------------------------------ the daemon

    def ping(self) -> None:
        self._request("GET", "/_ping", timeout=min(self.timeout, 30.0))

    def version(self) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", "/version")
        return out

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", "/info")
        return out

    def image(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", f"/images/{quote(name, safe=':@/')}/json")
        return out

    # ------------------------------------------------------------------ containers

    def containers(
        self, *, all: bool = False, filters: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"all": "1" if all else "0"}
        if filters:
            norm = {k: [v] if isinstance(v, str) else list(v) for k, v in filters.items()}
            params["filters"] = json.dumps(norm)
        out: list[dict[str, Any]] = self._json("GET", "/containers/json", params=params)
        return out

    def create(self, body: Mapping[str, Any], name: str | None = None) -> str:
        params = {"name": name} if name else None
        out = self._json("POST", "/containers/create", params=params, body=dict(body))
        return str(out["Id"])

    def start(self, cid: str) -> None:
        self._request("POST", f"/containers/{cid}/start")

    def kill(self, cid: str) -> None:
        self._request("POST", f"/containers/{cid}/kill")

    def rename(self, cid: str, name: str) -> None:
        self._request("POST", f"/containers/{cid}/rename", params={"name": name})

    def inspect(self, cid: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", f"/containers/{cid}/json")
        return out

    def remove(self, cid: str, *, force: bool = True, volumes: bool = True) -> None:
        params = {"force": "1" if force else "0", "v": "1" if volumes else "0"}
        self._request("DELETE", f"/containers/{cid}", params=params)

    def wait(self, cid: str, *, condition: str | None = None, timeout: float = 30.0) -> Any:
        params = {"condition": condition} if condition else None
        return self._json("POST", f"/containers/{cid}/wait", params=params, timeout=timeout)

    def events(self, *, since: int, until: int, filters: Mapping[str, Any]) -> list[Any]:
        """The daemon's past events (``until`` given: the answer ends)."""
        norm = {k: [v] if isinstance(v, str) else list(v) for k, v in filters.items()}
        params = {"since": str(since), "until": str(until), "filters": json.dumps(norm)}
        raw = self._request("GET", "/events", params=params)
        out = []
        for line in raw.splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def attach(self, cid: str) -> HijackedSocket:
        """The container's stdin+stdout+stderr stream (multiplexed frames), hijacked
        from an HTTP upgrade; create the container with OpenStdin and StdinOnce."""
        conn = self._connection(None)
        conn.connect()
        sock = conn.sock
        assert sock is not None
        try:
            params = urlencode({"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            head = (
                f"POST /containers/{cid}/attach?{params} HTTP/1.1\r\n"
                "Host: docker\r\nContent-Length: 0\r\n"
                "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
            )
            sock.sendall(head.encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    raise EngineError(0, "the daemon closed the attach connection")
                buf += chunk
                if len(buf) > 65536:
                    raise EngineError(0, "the daemon's attach answer has no end of headers")
            header, _, early = buf.partition(b"\r\n\r\n")
            status_line = header.split(b"\r\n", 1)[0].decode("latin-1")
            try:
                status = int(status_line.split()[1])
            except (IndexError, ValueError):
                raise EngineError(0, f"bad attach answer {status_line!r}") from None
            if status >= 400:
                raise _error(status, early)
            return HijackedSocket(sock, early)
        except BaseException:
            sock.close()
            raise


def _error(status: int, raw: bytes) -> EngineError:
    message = raw.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("message"), str):
            message = doc["message"]
    except ValueError:
        pass
    message = message[:500] or http.client.responses.get(status, "error")
    if status == 404:
        return NotFound(status, message)
    if status == 409:
        return Conflict(status, message)
    return EngineError(status, message)
