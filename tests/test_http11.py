"""tools/http11.py, the load test's HTTP/1.1 client, against real servers on localhost (each
bounded: the client calls run under asyncio.wait_for):

- keep-alive: requests share one TCP connection (the server sees one client port);
- an HTTP/1.0 server that closes after each answer: a new connection per request;
- a server that closes an idle keep-alive connection without saying so: the next request is
  sent again on a fresh connection and succeeds;
- a body cut short raises HTTPError, as does a refused connection;
- `lines()` splits a chunked stream whose lines straddle chunks, with \\n and \\r\\n endings;
- leaving a response before its end closes the connection, and the next request still works.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import pathlib
import socket
import sys
import threading

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tools"))
import http11  # noqa: E402

TIMEOUT = 20.0


class Server:
    """A threading HTTP server whose POST handler is `answer(handler, body)`; records the
    client port of every request."""

    def __init__(self, answer, protocol: str = "HTTP/1.1"):
        self.ports: list[int] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = protocol

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.ports.append(self.client_address[1])
                answer(self, body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> "Server":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def echo(handler, body: dict, close_silently: bool = False) -> None:
    data = json.dumps({"echo": body}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
    if close_silently:  # no `Connection: close`: the client believes it may reuse it
        handler.close_connection = True


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def post_all(url: str, payloads: list[dict]) -> list[tuple[int, dict]]:
    conn = http11.Connection(url)
    out = []
    try:
        for payload in payloads:
            async with conn.post("/v1/x", payload) as resp:
                out.append((resp.status, json.loads(await resp.read())))
    finally:
        await conn.close()
    return out


@pytest.mark.parametrize("protocol,close_silently,connections", [
    ("HTTP/1.1", False, 1),   # keep-alive: one connection
    ("HTTP/1.0", False, 3),   # the server closes after each answer (and says so)
    ("HTTP/1.1", True, 3),    # the server drops the idle connection without saying so
])
def test_connections_are_reused_or_reopened(protocol, close_silently, connections):
    with Server(lambda h, b: echo(h, b, close_silently), protocol) as server:
        answers = run(post_all(server.url, [{"i": i} for i in range(3)]))
    assert answers == [(200, {"echo": {"i": i}}) for i in range(3)]
    assert len(set(server.ports)) == connections


def test_chunked_lines_straddling_chunks():
    parts = [b"data: a", b"b\r\n\r\nda", b"ta: c\n", b"\ndata: [DONE]\n\n"]

    def chunked(handler, body) -> None:
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for part in parts:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            handler.wfile.flush()
        handler.wfile.write(b"0\r\n\r\n")

    async def lines(url: str) -> tuple[list[str], list[str]]:
        conn = http11.Connection(url)
        try:
            async with conn.post("/s", {}) as resp:
                first = [line async for line in resp.lines()]
            async with conn.post("/s", {}) as resp:  # the same connection, the next cycle
                second = [line async for line in resp.lines()]
        finally:
            await conn.close()
        return first, second

    with Server(chunked) as server:
        first, second = run(lines(server.url))
    assert first == second == ["data: ab", "", "data: c", "", "data: [DONE]", ""]
    assert len(set(server.ports)) == 1


def test_cut_bodies_and_refused_connections_raise_http_error():
    def cut(handler, body) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        handler.wfile.write(b"only ten b")
        handler.close_connection = True

    with Server(cut) as server:
        with pytest.raises(http11.HTTPError, match="closed|broke"):
            run(post_all(server.url, [{}]))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(http11.HTTPError, match="cannot connect"):
        run(post_all(f"http://127.0.0.1:{port}", [{}]))


def test_leaving_a_response_early_closes_and_the_next_request_works():
    def slow_stream(handler, body) -> None:
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for i in range(body.get("lines", 1)):
                line = f"data: {i}\n".encode()
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                handler.wfile.flush()
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client left
            pass

    async def go(url: str) -> tuple[str, list[str]]:
        conn = http11.Connection(url)
        try:
            async with conn.post("/s", {"lines": 1000}) as resp:
                async for line in resp.lines():
                    first = line
                    break
            async with conn.post("/s", {"lines": 2}) as resp:
                rest = [line async for line in resp.lines()]
        finally:
            await conn.close()
        return first, rest

    with Server(slow_stream) as server:
        first, rest = run(go(server.url))
    assert first == "data: 0" and rest == ["data: 0", "data: 1"]
    assert len(set(server.ports)) == 2


def test_bad_urls_are_refused():
    for url in ("ftp://host/", "http://", "localhost:8000"):
        with pytest.raises(ValueError, match="not an http"):
            http11.Connection(url)
