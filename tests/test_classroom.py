"""`attnviz class`: the sticky proxy in front of N servers (attnviz/app/classroom.py), against small fake servers.

A fake server answers every HTTP request with its own name, and echoes WebSocket-style upgraded connections, so
each test can see which server a request reached and that bytes flow both ways.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest

from attnviz.app import classroom


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _fake_server(name: str, port: int, seen: list) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.append((name, head))
                if b"upgrade: websocket" in head.lower():
                    writer.write(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                    )
                    await writer.drain()
                    while data := await reader.read(1024):  # echo, prefixed with the server's name
                        writer.write(name.encode() + b":" + data)
                        await writer.drain()
                    return
                body = name.encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                if b"connection: close" in head.lower():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def _request(port: int, head: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    response = await reader.readuntil(b"\r\n\r\n")
    length = int(classroom._header(response, b"content-length") or 0)
    body = await reader.readexactly(length)
    writer.close()
    return response, body


def _with_proxy(test):
    """Run ``test(proxy_port, proxy, seen)`` with two fake servers behind a proxy."""

    async def main():
        seen: list = []
        ports = [_free_port(), _free_port()]
        servers = [await _fake_server(f"w{i}", port, seen) for i, port in enumerate(ports)]
        proxy = classroom.Proxy([classroom.Backend(port) for port in ports])
        proxy_port = _free_port()
        ready = asyncio.Event()
        task = asyncio.ensure_future(classroom.serve(proxy, "127.0.0.1", proxy_port, ready))
        await ready.wait()
        try:
            await test(proxy_port, proxy, seen)
        finally:
            task.cancel()
            for server in servers:
                server.close()

    asyncio.run(main())


def test_a_first_visit_gets_a_route_cookie_and_a_closed_connection():
    async def test(port, proxy, seen):
        response, body = await _request(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert body == b"w0"  # the server with the fewest sessions (a tie: the first)
        assert classroom._header(response, b"set-cookie").startswith(b"attnviz_route=0;")
        assert classroom._header(response, b"connection") == b"close"
        assert b"connection: close" in seen[-1][1].lower()  # the server was told too
        assert classroom._header(seen[-1][1], b"x-forwarded-for") == b"127.0.0.1"

    _with_proxy(test)


def test_a_request_with_the_cookie_goes_to_its_server_and_keeps_its_connection():
    async def test(port, proxy, seen):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):  # keep-alive: every request on the connection reaches server 1
            writer.write(b"GET /static/x.js HTTP/1.1\r\nHost: x\r\nCookie: a=b; attnviz_route=1\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert classroom._header(head, b"set-cookie") is None
            assert await reader.readexactly(2) == b"w1"
        writer.close()
        assert [name for name, _ in seen] == ["w1"] * 3

    _with_proxy(test)


def test_an_unknown_route_is_treated_as_a_first_visit():
    async def test(port, proxy, seen):
        response, body = await _request(port, b"GET / HTTP/1.1\r\nHost: x\r\nCookie: attnviz_route=7\r\n\r\n")
        assert body in (b"w0", b"w1") and classroom._header(response, b"set-cookie") is not None

    _with_proxy(test)


def test_websockets_are_piped_both_ways_and_spread_over_the_servers():
    async def test(port, proxy, seen):
        upgrade = b"GET /_stcore/stream HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        sockets = []
        for _ in range(4):  # clients without cookies (scripts): the server with the fewest sessions each time
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(upgrade)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101") and classroom._header(head, b"connection") == b"Upgrade"
            writer.write(b"ping")
            await writer.drain()
            echoed = await reader.readexactly(7)
            sockets.append((echoed, writer))
        assert sorted(echoed for echoed, _ in sockets) == [b"w0:ping", b"w0:ping", b"w1:ping", b"w1:ping"]
        assert [b.sessions for b in proxy.backends] == [2, 2]
        for _, writer in sockets:
            writer.close()
        for _ in range(100):
            if [b.sessions for b in proxy.backends] == [0, 0]:
                break
            await asyncio.sleep(0.02)
        assert [b.sessions for b in proxy.backends] == [0, 0]

    _with_proxy(test)


def test_command_line():
    assert classroom._parse(["--workers", "3", "--port=9000", "--server.maxUploadSize", "50"]) == {
        "workers": 3,
        "port": 9000,
        "address": "0.0.0.0",
        "rest": ["--server.maxUploadSize", "50"],
        "help": False,
    }
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        classroom._parse(["--workers", "0"])
    with pytest.raises(ValueError, match="whole number"):
        classroom._parse(["--port", "http"])
    cmd = classroom.worker_command(8600, ["--x", "1"])
    assert cmd[1:3] == ["-m", "attnviz"] and "8600" in cmd and cmd[-2:] == ["--x", "1"]
    out = subprocess.run(
        [sys.executable, "-m", "attnviz", "class", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "usage: attnviz class" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "attnviz", "class", "--workers"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--workers needs a value" in bad.stderr
