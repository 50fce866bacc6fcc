"""A small asyncio HTTP/1.1 client for tools/load_test.py: h11 (the protocol library under
uvicorn and httpx) over asyncio streams, one keep-alive connection per load-test worker.

A load test measures time to first token, so its client must add as little as it can: httpx's
request and stream machinery cost this 2-core machine about 20 ms of TTFT per request at 16
concurrent streams (README, "Serving"), measured against a bare h11 client on one server.

  conn = Connection("http://127.0.0.1:8000")
  async with conn.post("/v1/completions", {"prompt": "hi", "stream": True}) as resp:
      if resp.status == 200:
          async for line in resp.lines(): ...
      # or: body = await resp.read()
  await conn.close()

A connection the server closes (HTTP/1.0 servers, `Connection: close`, an idle keep-alive that
timed out) is reopened for the next request; a request that fails on a reused connection before
any answer arrives is sent once more on a fresh one. Failures raise `HTTPError`. Timeouts are
the caller's (asyncio.wait_for / cancellation; a cancelled request closes its connection).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import h11

READ_SIZE = 65536


class HTTPError(Exception):
    """The connection failed or the server broke the protocol."""


class Response:
    """One response: `status`, `headers` (lower-case names), then its body once, through
    `lines()` or `read()`. Leaving the `async with` before the body's end closes the
    connection (it cannot carry the next request)."""

    def __init__(self, conn: "Connection", status: int, headers: dict[str, str]):
        self._conn, self.status, self.headers = conn, status, headers
        self.complete = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.complete:
            event = await self._conn._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
            else:
                raise HTTPError(f"unexpected {type(event).__name__} in a response body")

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines (UTF-8, without their \\n or \\r\\n), as they arrive."""
        pending = b""
        async for chunk in self.chunks():
            pending += chunk
            *whole, pending = pending.split(b"\n")
            for line in whole:
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if pending:
            yield pending.rstrip(b"\r").decode("utf-8", "replace")


class _Exchange:
    """`Connection.post`'s context manager."""

    def __init__(self, conn: "Connection", path: str, payload: Any):
        self._conn, self._path, self._payload = conn, path, payload
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        self._response = await self._conn._send(self._path, self._payload)
        return self._response

    async def __aexit__(self, exc_type, *exc: object) -> None:
        if exc_type is not None or self._response is None or not self._response.complete:
            await self._conn.close()
        else:
            self._conn._finish_cycle()


class Connection:
    """One HTTP/1.1 connection to `base_url` (http:// or https://), opened on first use."""

    def __init__(self, base_url: str):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.authority = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._h11: h11.Connection | None = None

    def post(self, path: str, payload: Any) -> _Exchange:
        """POST `payload` as JSON to `path`: `async with conn.post(...) as response`."""
        return _Exchange(self, path, payload)

    async def close(self) -> None:
        writer, self._reader, self._writer, self._h11 = self._writer, None, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass

    async def _open(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl)
        except OSError as e:
            raise HTTPError(f"cannot connect to {self.authority}: {e}") from None
        self._h11 = h11.Connection(h11.CLIENT)

    async def _send(self, path: str, payload: Any) -> Response:
        body = json.dumps(payload).encode()
        request = h11.Request(method="POST", target=self.prefix + path, headers=[
            ("Host", self.authority), ("Content-Type", "application/json"),
            ("Accept", "*/*"), ("Content-Length", str(len(body)))])
        reused = self._h11 is not None
        try:
            return await self._exchange(request, body)
        except HTTPError:
            await self.close()
            if not reused:
                raise
        return await self._exchange(request, body)  # the server had closed the idle one

    async def _exchange(self, request: h11.Request, body: bytes) -> Response:
        if self._h11 is None:
            await self._open()
        assert self._h11 is not None and self._writer is not None
        try:
            self._writer.write(self._h11.send(request) + self._h11.send(h11.Data(data=body))
                               + self._h11.send(h11.EndOfMessage()))
            await self._writer.drain()
        except (OSError, h11.LocalProtocolError) as e:
            raise HTTPError(f"sending the request failed: {e}") from None
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Response):
                headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                           for k, v in event.headers}
                return Response(self, event.status_code, headers)
            if not isinstance(event, h11.InformationalResponse):
                raise HTTPError(f"unexpected {type(event).__name__} before the response")

    async def _next_event(self) -> Any:
        assert self._h11 is not None and self._reader is not None
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                raise HTTPError(f"the server broke HTTP/1.1: {e}") from None
            if event is not h11.NEED_DATA:
                if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    raise HTTPError("the server closed the connection mid-response")
                return event
            try:
                data = await self._reader.read(READ_SIZE)
            except OSError as e:
                raise HTTPError(f"reading the response failed: {e}") from None
            self._h11.receive_data(data)  # b"": the server closed its side

    def _finish_cycle(self) -> None:
        """After a complete response: keep the connection for the next request, or drop it
        (closed on next use) when either side must close."""
        assert self._h11 is not None
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        else:
            writer, self._reader, self._writer, self._h11 = self._writer, None, None, None
            if writer is not None:
                writer.close()
