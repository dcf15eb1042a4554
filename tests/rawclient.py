"""A byte-exact HTTP/1.1 client over a raw socket, for tests where a library would tidy things up.

Responses are parsed with httptools' response parser so framing (Content-Length, chunked, close)
is checked by a real parser, and several responses on one connection come out one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import httptools


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def header_names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}


class _Collector:
    def __init__(self, head_only: bool) -> None:
        self.done: list[Response] = []
        self.cur = Response()
        self.head_only = head_only
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.cur = Response()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.cur.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.cur.status = self.parser.get_status_code()
        if self.head_only or self.cur.status < 200:
            if self.cur.status >= 200:
                self.cur.complete = True
            self.done.append(self.cur)
            if self.head_only:
                self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self.cur.body += body

    def on_message_complete(self) -> None:
        if self.cur.status >= 200 and not self.head_only:
            self.cur.complete = True
            self.done.append(self.cur)


class RawClient:
    """One client connection: send raw bytes, read parsed responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False  # the server closed the connection
        self.reset = False  # ... with a reset (how bgproxy cuts a response short)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def responses(
        self, count: int = 1, *, head_only: bool = False, timeout: float = 5.0
    ) -> list[Response]:
        """Read until `count` final responses (1xx ones are included but not counted), EOF or a reset.

        count=0 reads until one interim (1xx) response has arrived.
        """
        col = _Collector(head_only)

        def satisfied() -> bool:
            if count == 0:
                return bool(col.done)
            return sum(1 for r in col.done if r.status >= 200) >= count

        async with asyncio.timeout(timeout):
            while not satisfied():
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    self.reset, data = True, b""
                if not data:
                    self.closed = True
                    if col.cur.status and not col.cur.complete and col.cur not in col.done:
                        col.done.append(col.cur)  # close-delimited or cut short: caller checks .complete
                    break
                try:
                    col.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    break
        return col.done

    async def wait_closed(self, timeout: float = 5.0) -> bytes:
        """Read until the server closes; returns whatever else arrived."""
        rest = b""
        async with asyncio.timeout(timeout):
            while data := await self.reader.read(65536):
                rest += data
        self.closed = True
        return rest

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def exchange(port: int, data: bytes, count: int = 1, *, head_only: bool = False) -> list[Response]:
    """Open a connection, send `data`, read `count` responses, close."""
    client = await RawClient.connect(port)
    try:
        await client.send(data)
        return await client.responses(count, head_only=head_only)
    finally:
        await client.close()
