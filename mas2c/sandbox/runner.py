"""The process that runs a compiled program inside the sandbox and hands back its outputs.

This file is NOT imported by mas2c: its source is passed to ``python3 -I -c`` inside
the sandbox (stdlib only, Python >= 3.9), as the container's init (PID 1, mode
``init``) or as the parent of the program in the unisolated backend (mode ``unisolated``).

Protocol (both modes), on this process's stdin/stdout (the container's attach
stream, or pipes of the unisolated backend):

1. It starts, imports the runtime's dependencies (``openai``, ``httpx``) so that a
   program forked from it starts warm, says ``MAS2C-READY`` (init mode), then waits at most ``idle_s`` for the line
   ``go`` on stdin (the job is already in place: the unisolated backend) or ``job N``
   followed by N bytes of tar (the container: the package, the input and job.json,
   unpacked by this process, as root, into the job folder: regular files and folders
   only, no absolute or ``..`` names). EOF or the idle deadline: it exits; nothing ran.
2. It reads ``job.json`` (module, arguments, environment, cwd, timeout, caps), forks
   the program (``runpy`` in the fork: the imports are already done) with stdout and
   stderr on pipes that it drains into memory, keeping the first ``cap`` bytes each.
3. When the program exits, the timeout expires, stdin says ``stop`` or stdin closes
   (the host went away), it kills EVERY other process it can (``kill(-1)`` as PID 1;
   its subreaped descendants in unisolated mode), so the outputs are frozen, then
   writes one bundle to stdout: ``MAS2C-BUNDLE <json header>\\n`` followed by the
   bytes of each file the header lists (out.json, trace.jsonl, checkpoints.jsonl, each read with
   O_NOFOLLOW, only if a regular file, at most its cap; the captured streams).
4. It waits for EOF on stdin (at most ``linger_s``) and exits. As the container's
   PID 1 its exit ends the container; no process inside can stop or outlive it:
   signals from inside are ignored by PID 1, it is not dumpable (no ptrace, no
   /proc/1/fd), and it ends the container at ``idle_s + max_job_s + grace`` anyway.
   In the container it runs as root with only CAP_KILL/SETUID/SETGID/SETPCAP and starts
   the program as ``job["uid"]`` with an empty bounding set: the program cannot
   signal it at all (gVisor, unlike Linux, lets a process stop its PID 1).

The host treats the bundle as untrusted all the same (mas2c.sandbox reads it with
limits).
"""

import contextlib
import json
import os
import select
import signal
import stat
import sys
import threading
import time
from typing import Any

BUNDLE_MAGIC = b"MAS2C-BUNDLE "
READY_LINE = b"MAS2C-READY\n"
GRACE_S = 60.0
LINGER_S = 30.0
CHUNK = 1 << 16


def set_dumpable(value: int) -> None:
    """prctl(PR_SET_DUMPABLE): 0 hides /proc/PID/{fd,mem,environ} and forbids ptrace."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, value, 0, 0, 0)
    except Exception:
        pass


def set_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants (setsid, double fork) come to us."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    except Exception:
        pass


def become(uid: int) -> None:
    """In the program's fork, when the runner is root: empty the capability bounding
    set, then switch to `uid` (which clears the effective and permitted sets)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP; EINVAL past the last cap
            break
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def oom_kills() -> "int | None":
    """The memory cgroup's OOM-kill counter (cgroup v2 or v1), or None if unreadable."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


class Stdin:
    """Lines from fd 0 with deadlines; `closed` once EOF was seen."""

    def __init__(self) -> None:
        self.buf = b""
        self.closed = False

    def line(self, deadline: float) -> "bytes | None":
        while b"\n" not in self.buf:
            if self.closed:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([0], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                chunk = os.read(0, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                continue
            self.buf = (self.buf + chunk)[-4096:]
        line, _, self.buf = self.buf.partition(b"\n")
        return line.strip()

    def read(self, n: int, deadline: float) -> bytes:
        """Up to `n` bytes (what is buffered first); b"" at EOF or past `deadline`."""
        if self.buf:
            data, self.buf = self.buf[:n], self.buf[n:]
            return data
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return b""
            ready, _, _ = select.select([0], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                chunk = os.read(0, min(n, CHUNK))
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
            return chunk
        return b""


class JobBody:
    """Exactly `n` bytes of stdin as a file object (for tarfile's stream mode)."""

    def __init__(self, stdin: Stdin, n: int, deadline: float) -> None:
        self.stdin = stdin
        self.left = n
        self.deadline = deadline

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        want = self.left if size is None or size < 0 else min(size, self.left)
        data = self.stdin.read(want, self.deadline)
        if not data:
            raise OSError("the job ended early")
        self.left -= len(data)
        return data


def unpack_job(body: JobBody, root: str) -> None:
    """Unpack the host's job tar into `root`: folders and regular files only, owned by
    this process (root in the container), never through a symlink or outside `root`."""
    import tarfile

    with tarfile.open(fileobj=body, mode="r|") as tf:  # type: ignore[call-overload]
        for member in tf:
            parts = member.name.split("/")
            if member.name.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise OSError(f"bad name in the job: {member.name!r}")
            path = os.path.join(root, *parts)
            mode = member.mode & 0o755
            if member.isdir():
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, mode)
                # Made by this process (or /work itself) before any program ran here.
                os.chmod(path, mode)
            elif member.isreg():
                src = tf.extractfile(member)
                assert src is not None
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
                try:
                    while True:
                        chunk = src.read(CHUNK)
                        if not chunk:
                            break
                        write_fd(fd, chunk)
                finally:
                    os.close(fd)
    while body.read(CHUNK):  # the tar's end padding
        pass


def write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Capture(threading.Thread):
    """Drains one pipe, keeping the first `cap` bytes in memory."""

    def __init__(self, fd: int, cap: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.cap = cap
        self.data = bytearray()
        self.truncated = False

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, CHUNK)
            except OSError:
                break
            if not chunk:
                break
            room = self.cap - len(self.data)
            if room > 0:
                self.data += chunk[:room]
            if len(chunk) > max(room, 0):
                self.truncated = True
        os.close(self.fd)


def start_program(job: "dict[str, Any]") -> "tuple[int, int, int]":
    """Fork the program; returns (pid, stdout read end, stderr read end)."""
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    pid = os.fork()
    if pid == 0:  # the program
        code = 1
        try:
            os.setsid()
            uid = job.get("uid")
            if isinstance(uid, int) and uid != os.getuid():
                become(uid)
            set_dumpable(1)
            try:  # be the OOM killer's first choice, never the runner
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("1000")
            except OSError:
                pass
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(w_out, 1)
            os.dup2(w_err, 2)
            os.closerange(3, 1 << 16)
            os.chdir(job["cwd"])
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = run_warm(job, [job["module"], *job["args"]])
        except BaseException:
            try:
                import traceback

                os.write(2, traceback.format_exc().encode(errors="replace"))
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(w_out)
    os.close(w_err)
    return pid, r_out, r_err


def run_warm(job: "dict[str, Any]", argv: "list[str]") -> int:
    """In the forked child: run `python -m MODULE ARGS` in this (already warm) interpreter."""
    import io
    import runpy

    os.environ.clear()
    os.environ.update(job["env"])
    sys.path[:0] = job["path"]
    sys.argv = argv
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        write_through=True,
    )
    code = 0
    try:
        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code & 0xFF
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    return code


def children_of(pid: int) -> "list[int]":
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def kill_everything(child: int) -> None:
    """Kill every process the program left: all of the namespace as PID 1, else our
    subreaped descendants (the program's session first)."""
    if os.getpid() == 1:
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)
        return
    with contextlib.suppress(OSError):
        os.killpg(child, signal.SIGKILL)
    for pid in children_of(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def reap_all(child: int, deadline: float) -> None:
    """Kill and reap until no child is left (killed parents hand us their children)."""
    while time.monotonic() < deadline:
        kill_everything(child)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.01)


class HostLink(threading.Thread):
    """Watches stdin after `go`: the line `stop` (the host's Ctrl-C) or EOF (the host is gone)."""

    def __init__(self, stdin: Stdin) -> None:
        super().__init__(daemon=True)
        self.stdin = stdin
        self.stop = threading.Event()
        self.gone = threading.Event()

    def run(self) -> None:
        while not self.stdin.closed:
            if self.stdin.line(time.monotonic() + 3600.0) == b"stop":
                self.stop.set()
        self.gone.set()
        self.stop.set()


def wait_program(pid: int, timeout_s: float, link: HostLink) -> "tuple[int | None, str]":
    """Wait for the program, reaping orphans; returns (wait status, why it ended)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        try:
            wpid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None, "exited"
        if wpid == pid:
            return status, "exited"
        if wpid > 0:
            continue
        if link.stop.is_set():
            return None, "host-gone" if link.gone.is_set() else "stopped"
        if time.monotonic() >= deadline:
            return None, "timeout"
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def regular_file(path: str, cap: int) -> "tuple[int | None, int, bool]":
    """(fd, bytes to send, truncated) of a regular file, never following a symlink or
    opening a FIFO/device; (None, 0, False) if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None, 0, False
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None, 0, False
    return fd, min(st.st_size, cap), st.st_size > cap


def write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(1, view)
        view = view[n:]


def send_file(fd: int, n: int) -> None:
    left = n
    while left > 0:
        chunk = os.read(fd, min(CHUNK, left))
        if not chunk:  # cannot shrink (every writer is dead); pad to keep the framing
            chunk = b"\0" * min(CHUNK, left)
        write_all(chunk)
        left -= len(chunk)
    os.close(fd)


STREAMS = ("stdout.txt", "stderr.txt")


def emit_bundle(
    job: "dict[str, Any]", header: "dict[str, Any]", streams: "list[tuple[str, bytes, bool]]"
) -> None:
    """Write the bundle to stdout: the header, then out.json, trace.jsonl, checkpoints.jsonl
    (each a regular file, at most its cap) and the captured streams."""
    caps = job["caps"]
    files: list[tuple[str, int | bytes, int, bool]] = []
    wanted = [
        ("out.json", job["output"], int(caps["result"])),
        ("trace.jsonl", job["trace"], int(caps["trace"])),
    ]
    if job.get("checkpoints") and "checkpoints" in caps:
        wanted.append(("checkpoints.jsonl", job["checkpoints"], int(caps["checkpoints"])))
    for name, path, cap in wanted:
        fd, n, truncated = regular_file(path, cap)
        if fd is not None:
            files.append((name, fd, n, truncated))
    for name, data, truncated in streams:
        files.append((name, data, len(data), truncated))
    header = {**header, "files": [[name, n, cut] for name, _src, n, cut in files]}
    try:
        write_all(BUNDLE_MAGIC + json.dumps(header).encode() + b"\n")
        for _name, src, n, _cut in files:
            if isinstance(src, bytes):
                write_all(src)
            else:
                send_file(src, n)
    except OSError:
        pass  # the host went away


_WARM_ANSWER = {
    "id": "warm-up",
    "object": "chat.completion",
    "created": 0,
    "model": "warm-up",
    "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def warm_up_client() -> None:
    """One chat completion with the openai client, as the runtime makes it (an httpx
    transport on a unix socket), against a throwaway server on a socket in /tmp: the
    imports of a first call (transports, response models: ~0.1-0.2 s) happen here,
    before the container says it is ready, not in the job. Everything it made is gone
    afterwards (server, thread, socket folder); any failure only leaves it cold."""
    import asyncio
    import http.server
    import shutil
    import socketserver
    import tempfile

    import httpx
    import openai

    body = json.dumps(_WARM_ANSWER).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 5.0

        def do_POST(self) -> None:
            self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 1 << 16))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(socketserver.UnixStreamServer):
        def get_request(self) -> Any:
            conn, _ = self.socket.accept()
            return conn, ("warm-up", 0)

    folder = tempfile.mkdtemp(prefix="mas2c-warm-")
    path = os.path.join(folder, "llm.sock")
    server = Server(path, Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    async def once() -> None:
        # typed Any: recent openai releases type this as httpx2 but accept an httpx client
        http: Any = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path), timeout=10.0)
        client = openai.AsyncOpenAI(
            base_url="http://mas2c-gateway/v1",
            api_key="warm-up",
            max_retries=0,
            timeout=10.0,
            http_client=http,
        )
        try:
            messages: Any = [{"role": "user", "content": "warm-up"}]
            await asyncio.wait_for(
                client.chat.completions.create(model="warm-up", messages=messages), 10.0
            )
        finally:
            await client.close()
            await http.aclose()

    try:
        asyncio.run(once())
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5.0)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    mode, job_path = sys.argv[1], sys.argv[2]
    idle_s, max_job_s = float(sys.argv[3]), float(sys.argv[4])
    t_start = time.monotonic()
    set_dumpable(0)
    if mode == "unisolated":
        set_subreaper()
    signal.signal(signal.SIGINT, signal.SIG_IGN if mode == "unisolated" else signal.SIG_DFL)
    warm = True
    try:  # the runtime's slow imports, done before the job arrives
        import httpx  # noqa: F401
        import openai  # noqa: F401
    except Exception:
        warm = False  # the program imports what it needs itself
    no_warm_up = sys.argv[5:6] == ["no-warm-up"]  # a container started for one run
    if warm and mode == "init" and not no_warm_up and not select.select([0], [], [], 0)[0]:
        # No job waiting (a pooled container, not a cold run): warm the first call too.
        with contextlib.suppress(Exception):
            warm_up_client()
    if mode == "init":  # a pool hands out only containers that said so
        with contextlib.suppress(OSError):
            write_all(READY_LINE)
    stdin = Stdin()
    first = stdin.line(t_start + idle_s)
    if first is not None and first.startswith(b"job ") and mode == "init":
        try:  # the job comes over stdin: no docker cp (a daemon round trip and an untar)
            size = int(first[4:])
            root = os.path.dirname(os.path.dirname(job_path))  # <root>/job/job.json
            unpack_job(JobBody(stdin, size, time.monotonic() + 120.0), root)
        except Exception:
            import traceback

            os.write(2, traceback.format_exc().encode(errors="replace"))
            os._exit(4)
    elif first != b"go":
        os._exit(0)
    # The whole container's lifetime is capped here, whatever happens below.
    life = threading.Timer(max_job_s + GRACE_S, os._exit, args=(3,))
    life.daemon = True
    with open(job_path, "rb") as f:
        job = json.loads(f.read(1 << 20))
    timeout_s = min(float(job["timeout_s"]), max_job_s)
    caps = job["caps"]
    oom_before = oom_kills()
    t0 = time.monotonic()
    pid, r_out, r_err = start_program(job)
    life.start()
    captures = [Capture(r_out, int(caps["stdout"])), Capture(r_err, int(caps["stderr"]))]
    for c in captures:
        c.start()
    link = HostLink(stdin)
    link.start()
    status, why = wait_program(pid, timeout_s, link)
    duration = time.monotonic() - t0
    reap_all(pid, time.monotonic() + 5.0)
    if why == "host-gone":
        os._exit(0)
    for c in captures:
        c.join(timeout=5.0)
    oom_after = oom_kills()
    exit_code = None
    if status is not None:
        exit_code = os.waitstatus_to_exitcode(status)
        exit_code = 128 - exit_code if exit_code < 0 else exit_code
    elif why in ("timeout", "stopped"):
        exit_code = 137
    header = {
        "v": 1,
        "exit_code": exit_code,
        "ended": why,
        "timed_out": why == "timeout",
        "oom_kills": None if oom_before is None or oom_after is None else oom_after - oom_before,
        "duration_s": round(duration, 4),
        "warm": warm,
    }
    streams = [(STREAMS[i], bytes(c.data), c.truncated) for i, c in enumerate(captures)]
    uid = job.get("uid")
    if isinstance(uid, int) and uid != os.getuid():
        # Read the program's files as the program's user (the init has no DAC override:
        # a 0600 out.json is readable only so); every other process is dead by now.
        reader = os.fork()
        if reader == 0:
            code = 1
            try:
                become(uid)
                emit_bundle(job, header, streams)
                code = 0
            finally:
                os._exit(code)
        os.waitpid(reader, 0)
    else:
        emit_bundle(job, header, streams)
    link.gone.wait(LINGER_S)  # until the host has read it (EOF), or at most LINGER_S
    os._exit(0)


if __name__ == "__main__":
    main()
