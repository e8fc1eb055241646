"""`attnviz class --workers N`: N Streamlit servers behind one sticky HTTP + WebSocket proxy, in pure Python.

One Streamlit server runs every session's script in threads of one Python process, so it uses about one core
however many the machine has (the GIL): under a class, reruns that arrive together take turns. This command starts
one server per core (``--workers``, default: the machine's cores) on private ports and listens on the public port
with a small asyncio proxy that keeps each browser on one server:

* A request that carries the ``attnviz_route`` cookie goes to that server, and so does everything else on that
  connection (the bytes are piped both ways as they come: HTTP keep-alive and WebSocket alike).
* A request without it (a first visit) goes to the server with the fewest open sessions (WebSockets), and its
  response gets ``Set-Cookie: attnviz_route=<n>`` and ``Connection: close``, so the browser's next requests, its
  WebSocket (``/_stcore/stream``) and its uploads (``/_stcore/upload_file``, which must reach the process that
  holds the session) all carry the cookie. A client without cookies (a script) gets a server per connection.
* Every server gets the same ``server.cookieSecret``, so an XSRF token issued by one is valid on the others.

Like nginx's cookie ``hash``, this works behind a classroom NAT, where every student has one address (client-IP
hashing would send the whole class to one server). Each worker gets ``OMP_NUM_THREADS = cores // workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

COOKIE = "attnviz_route"
MAX_HEAD = 64 * 1024  # bytes of request or response head the proxy reads before giving up on a connection
CONNECT_TIMEOUT_S = 90.0  # a worker still starting is waited for this long
_COOKIE_RE = re.compile(rb"(?:^|;)\s*" + COOKIE.encode() + rb"=(\d+)")

CLASS_HELP = """\
usage: attnviz class [--workers N] [--port PORT] [--address ADDRESS] [streamlit options ...]

Serve the app to a class: N Streamlit servers (default: one per CPU core) behind one sticky proxy on PORT
(default 8501). Each browser stays on one server (a cookie); scripts without cookies are spread per connection.

options:
  --workers N         servers to start (default: the number of CPU cores, here {cores})
  --port PORT         the public port (default 8501); the servers listen on free ports of 127.0.0.1
  --address ADDRESS   where the proxy listens (default 0.0.0.0: every interface; 127.0.0.1 for this machine only)
  -h, --help          show this help and exit
  Any other option (e.g. --server.maxUploadSize 50) is passed to every server.

example:
  attnviz class --workers 2 --port 8080     # students open http://THIS-MACHINE:8080
"""


@dataclass
class Backend:
    port: int
    sessions: int = 0  # open upgraded (WebSocket) connections
    connections: int = 0  # open connections of any kind


@dataclass
class Proxy:
    backends: list[Backend]
    host: str = "127.0.0.1"
    served: int = field(default=-1)  # first visits routed so far, minus one (ties are taken in turn)

    def pick(self) -> int:
        """The backend for a client without the cookie: the fewest open sessions, ties taken in turn."""
        fewest = min(b.sessions for b in self.backends)
        candidates = [i for i, b in enumerate(self.backends) if b.sessions == fewest]
        self.served += 1
        return candidates[self.served % len(candidates)]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        backend: Backend | None = None
        upgraded = False
        try:
            head = await _read_head(reader)
            if head is None:
                return
            match = _COOKIE_RE.search(_header(head, b"cookie") or b"")
            index = int(match.group(1)) if match else -1
            sticky = 0 <= index < len(self.backends)
            if not sticky:
                index = self.pick()
            backend = self.backends[index]
            backend.connections += 1
            upgraded = b"upgrade" in (_header(head, b"connection") or b"").lower()
            if upgraded:
                backend.sessions += 1
            up_reader, upstream = await _connect(self.host, backend.port)
            if not sticky and not upgraded:
                head = _set_header(head, b"Connection", b"close")  # one request: the next ones carry the cookie
            upstream.write(_forwarded(head, writer))
            await upstream.drain()
            to_backend = asyncio.ensure_future(_pipe(reader, upstream))
            if sticky:
                await _pipe(up_reader, writer)
            else:
                response = await _read_head(up_reader)
                if response is None:
                    return
                response = _set_header(response, b"Set-Cookie", f"{COOKIE}={index}; Path=/; SameSite=Lax".encode())
                if not upgraded:
                    response = _set_header(response, b"Connection", b"close")
                writer.write(response)
                await writer.drain()
                await _pipe(up_reader, writer)
            to_backend.cancel()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError):
            pass
        except asyncio.CancelledError:  # the proxy is stopping: this connection ends with it
            pass
        finally:
            if backend is not None:
                backend.connections -= 1
                if upgraded:
                    backend.sessions -= 1
            for w in (writer, upstream):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


def _set_header(head: bytes, name: bytes, value: bytes) -> bytes:
    """``head`` with header ``name`` set to ``value`` (replaced, or added; Set-Cookie is always added)."""
    lines = head[:-4].split(b"\r\n")
    if name.lower() != b"set-cookie":
        lines = [lines[0]] + [line for line in lines[1:] if line.partition(b":")[0].strip().lower() != name.lower()]
    lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _forwarded(head: bytes, writer: asyncio.StreamWriter) -> bytes:
    peer = writer.get_extra_info("peername")
    return _set_header(head, b"X-Forwarded-For", str(peer[0] if peer else "unknown").encode())


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            return await asyncio.open_connection(host, port, limit=MAX_HEAD)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(proxy: Proxy, address: str, port: int, ready: asyncio.Event | None = None) -> None:
    server = await asyncio.start_server(proxy.handle, address, port, limit=MAX_HEAD, reuse_address=True)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parse(args: list[str]) -> dict:
    found: dict = {"workers": os.cpu_count() or 1, "port": 8501, "address": "0.0.0.0", "rest": [], "help": False}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            found["help"] = True
            return found
        if name in ("--workers", "--port", "--address"):
            if not eq:
                if i + 1 >= len(args):
                    raise ValueError(f"{name} needs a value")
                value, i = args[i + 1], i + 1
            if name == "--address":
                found["address"] = value
            else:
                try:
                    found[name[2:]] = int(value)
                except ValueError:
                    raise ValueError(f"{name} takes a whole number, got {value!r}") from None
        else:
            found["rest"].append(arg)
        i += 1
    if found["workers"] < 1:
        raise ValueError(f"--workers must be >= 1, got {found['workers']}")
    return found


def worker_command(port: int, rest: list[str]) -> list[str]:
    """One worker: the `attnviz` command on a private port (the shared cookie secret goes in its environment:
    Streamlit refuses ``server.cookieSecret`` as a command-line flag)."""
    return [
        sys.executable,
        "-m",
        "attnviz",
        "--server.headless",
        "true",
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        *rest,
    ]


class WorkerExited(RuntimeError):
    """A worker server stopped: the class cannot go on with its students' sessions."""


async def _serve_while_workers_live(proxy: Proxy, address: str, port: int, procs: list[subprocess.Popen]) -> None:
    serving = asyncio.ensure_future(serve(proxy, address, port))
    try:
        while not serving.done():
            for proc in procs:
                if proc.poll() is not None:
                    raise WorkerExited(f"a server (pid {proc.pid}) exited with status {proc.returncode}")
            await asyncio.sleep(0.5)
        serving.result()
    finally:
        serving.cancel()


def class_command(args: list[str]) -> int:
    """`attnviz class ...`: start the workers and the proxy; runs until Ctrl-C / SIGTERM. Returns the exit status."""
    try:
        opts = _parse(args)
    except ValueError as err:
        print(f"attnviz class: {err}\n(attnviz class --help explains)", file=sys.stderr)
        return 2
    if opts["help"]:
        print(CLASS_HELP.format(cores=os.cpu_count()), end="")
        return 0
    workers, secret = opts["workers"], secrets.token_hex(16)
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads))
    env["STREAMLIT_SERVER_COOKIE_SECRET"] = secret  # one XSRF secret for all: a token from one server works on all
    procs: list[subprocess.Popen] = []
    ports = [_free_port() for _ in range(workers)]

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        for port in ports:
            procs.append(subprocess.Popen(worker_command(port, opts["rest"]), env=env))
        print(
            f"attnviz class: {workers} servers (ports {', '.join(map(str, ports))}, {threads} torch thread(s) each) "
            f"behind http://{opts['address']}:{opts['port']}",
            flush=True,
        )
        proxy = Proxy([Backend(port) for port in ports])
        asyncio.run(_serve_while_workers_live(proxy, opts["address"], opts["port"], procs))
    except KeyboardInterrupt:
        pass
    except WorkerExited as err:
        print(f"attnviz class: {err}; stopping the others", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


def wait_healthy(url: str, timeout: float = 120.0) -> bool:
    """True once ``url``/_stcore/health answers ok (used by tests and the load test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                return True
        except OSError:
            time.sleep(0.2)
    return False
