"""Real origin servers that the proxy tests put behind bgproxy.

Everything binds 127.0.0.1 on an ephemeral port and runs on the caller's event loop, so tests see
real sockets and real HTTP framing instead of mocks. Import as ``from upstreams import ...``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from fractions import Fraction

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.typedefs import Handler

from bench.harness import FixedResponse

PIECE = 64 * 1024
_CYCLE = bytes(range(251)) * (PIECE // 251 + 2)  # any 64 KiB window of the pattern is one slice of this


def pattern_pieces(n: int) -> Iterator[bytes]:
    """The deterministic body of /bytes/{n} (byte i is i % 251), in 64 KiB pieces so big n stays cheap."""
    for offset in range(0, n, PIECE):
        start = offset % 251
        yield _CYCLE[start : start + min(PIECE, n - offset)]


def pattern_bytes(n: int) -> bytes:
    """The whole /bytes/{n} body, for tests that compare small bodies directly."""
    return b"".join(pattern_pieces(n))


@functools.lru_cache(maxsize=64)
def pattern_sha256(n: int) -> str:
    """Hex digest of /bytes/{n}; cached because big bodies are hashed once per size, not per request."""
    digest = hashlib.sha256()
    for piece in pattern_pieces(n):
        digest.update(piece)
    return digest.hexdigest()


class Origin:
    """An aiohttp origin that can be stopped and restarted on the same port to drive health checks."""

    def __init__(self, color: str, name: str | None = None) -> None:
        self.color = color
        self._name = name
        self.port = 0
        self.requests = 0  # every request except /healthz, so probes don't skew traffic counts
        self.health_checks = 0
        self.healthy = True
        self._fail_ratio = Fraction(0)
        self._echo_count = 0
        self._runner: web.AppRunner | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    @property
    def name(self) -> str:
        return self._name or self.addr

    @property
    def fail_ratio(self) -> float:
        return float(self._fail_ratio)

    @fail_ratio.setter
    def fail_ratio(self, ratio: float) -> None:
        """Setting restarts the count, so "0.05" means exactly 5 of the next 100 /echo requests fail."""
        self._fail_ratio = Fraction(ratio).limit_denominator(1_000_000)
        self._echo_count = 0

    async def start(self) -> None:
        """Listen again; the port chosen on the first start is reused so the proxy config stays valid."""
        if self._runner is not None:
            return
        # A short shutdown timeout makes stop() an abrupt outage even with SSE/WebSocket clients attached.
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = site.port
        self._runner = runner

    async def stop(self) -> None:
        """Close the listener and every open connection, like a crashed instance."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.on_response_prepare.append(self._stamp)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_route("*", "/echo/{tail:.*}", self._echo)
        app.router.add_get("/bytes/{n:\\d+}", self._bytes)
        app.router.add_post("/upload", self._upload)
        app.router.add_put("/upload", self._upload)
        app.router.add_route("*", "/status/{code:\\d{3}}", self._status)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/sse", self._sse)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_route("*", "/headers-out", self._headers_out)
        app.router.add_post("/expect", self._expect)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/healthz":
            self.health_checks += 1
        else:
            self.requests += 1
        return await handler(request)

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Color"] = self.color
        response.headers["X-Upstream"] = self.name

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        self._echo_count += 1
        n = self._echo_count
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(PIECE):
            digest.update(chunk)
            length += len(chunk)
        if int(n * self._fail_ratio) > int((n - 1) * self._fail_ratio):
            return web.Response(status=500, text=f"injected failure {n}")
        return web.json_response(
            {
                "color": self.color,
                "upstream": self.name,
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
                "body_len": length,
                "body_sha256": digest.hexdigest(),
                "version": f"{request.version.major}.{request.version.minor}",
            }
        )

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.headers["X-Sha256"] = pattern_sha256(n)
        if request.query.get("chunked") == "1":
            response.enable_chunked_encoding()
        else:
            response.content_length = n
        await response.prepare(request)
        if request.method != "HEAD":
            for piece in pattern_pieces(n):
                await response.write(piece)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        delay = 0.01 if request.query.get("slow") == "1" else 0.0
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(PIECE):
            digest.update(chunk)
            length += len(chunk)
            if delay:
                await asyncio.sleep(delay)
        return web.json_response({"len": length, "sha256": digest.hexdigest()})

    async def _status(self, request: web.Request) -> web.StreamResponse:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code}\n")

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return web.Response(text="slow")

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        """N events (endless when n=0) so tests can check streaming isn't buffered by the proxy."""
        count = int(request.query.get("n", "5"))
        interval = float(request.query.get("interval", "0.05"))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        i = 0
        try:
            while count == 0 or i < count:
                if i:
                    await asyncio.sleep(interval)
                await response.write(f"data: {self.color} {i}\n\n".encode())
                i += 1
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away: the normal end of an endless stream
        return response

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        """Echo; the close code the client sends is sent back, so tests can see it cross the proxy."""
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        first = True
        while not ws.closed:  # not `async for`: it hides the CLOSE message and its code
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(self.color if first and msg.data == "whoami" else msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                code = msg.data if msg.data not in (None, 1005, 1006) else WSCloseCode.OK
                await ws.close(code=code, message=(msg.extra or "").encode())
            else:
                break  # CLOSED/ERROR: the client vanished without a close handshake
            first = False
        return ws

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        if self.healthy:
            return web.Response(text="ok")
        return web.Response(status=503, text="unhealthy")

    async def _headers_out(self, request: web.Request) -> web.StreamResponse:
        response = web.Response(text="headers-out")
        for key, value in request.query.items():
            response.headers.add(key, value)
        return response

    async def _expect(self, request: web.Request) -> web.StreamResponse:
        length = 0
        async for chunk in request.content.iter_chunked(PIECE):
            length += len(chunk)
        return web.json_response({"len": length})


@asynccontextmanager
async def origin(color: str, *, name: str | None = None) -> AsyncIterator[Origin]:
    srv = Origin(color, name)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


class RawServer:
    """A raw TCP listener whose per-connection behaviour fakes a broken upstream."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._received = bytearray()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def received(self) -> bytes:
        """Every byte received, across all connections."""
        return bytes(self._received)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            await self.behave(reader, writer)
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read_head(self, reader: asyncio.StreamReader) -> None:
        """Read up to the end of the request head (or EOF), recording as we go."""
        head = bytearray()
        while b"\r\n\r\n" not in head and (chunk := await reader.read(PIECE)):
            head += chunk
            self._received += chunk

    async def _record_until_eof(self, reader: asyncio.StreamReader) -> None:
        """Stay silent with the connection open, recording, until the proxy closes its side."""
        while chunk := await reader.read(PIECE):
            self._received += chunk

    async def behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Default: record everything and never answer."""
        await self._record_until_eof(reader)

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()


class RecordingServer(RawServer):
    """Records and never answers: proves what (if anything) the proxy sent upstream."""


class ResetBeforeHeadersServer(RawServer):
    async def behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._read_head(reader)
        # SO_LINGER 0 turns close() into a TCP RST instead of an orderly FIN.
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()


class CutAfterHeadersServer(RawServer):
    async def behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + pattern_bytes(10))
        await writer.drain()


class StallAfterHeadersServer(CutAfterHeadersServer):
    """Sends what CutAfterHeadersServer sends, then goes silent with the connection open."""

    async def behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await super().behave(reader, writer)
        await self._record_until_eof(reader)


class BigHeadServer(RawServer):
    """Answers with `header_bytes` of X-Filler headers (1 KiB each) and a small body."""

    def __init__(self, header_bytes: int) -> None:
        super().__init__()
        self.header_bytes = header_bytes

    async def behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._read_head(reader)
        filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(self.header_bytes // 1024))
        writer.write(b"HTTP/1.1 200 OK\r\n" + filler + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        await self._record_until_eof(reader)


class ScriptedServer(RawServer):
    """Answers the i-th request head on a connection with ``answers[i]``, written in one piece, then
    does ``then``: "stay" (record until EOF), "close" (FIN) or "reset" (RST)."""

    def __init__(self, answers: list[bytes], then: str = "stay") -> None:
        super().__init__()
        self.answers = answers
        self.then = then
        self.release = asyncio.Event()  # "close"/"reset" wait for it: the test says when

    async def behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in self.answers:
            await self._read_head(reader)
            writer.write(answer)
            await writer.drain()
        if self.then != "stay":
            await self.release.wait()
        if self.then == "reset":
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()
        elif self.then == "stay":
            await self._record_until_eof(reader)


@asynccontextmanager
async def fast_origin(color: str) -> AsyncIterator[str]:
    """A bare asyncio upstream answering every (bodiless) request with 200 and X-Color: its address.

    For tests that send thousands of requests, where the aiohttp Origin would be the slow part.
    """
    response = b"HTTP/1.1 200 OK\r\nX-Color: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        color.encode(), len(color), color.encode()
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FixedResponse(response), "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def stall_after_headers_server() -> StallAfterHeadersServer:
    return StallAfterHeadersServer()


def recording_server() -> RecordingServer:
    return RecordingServer()


silent_server = recording_server  # same behaviour, named for 504 tests


def reset_before_headers_server() -> ResetBeforeHeadersServer:
    return ResetBeforeHeadersServer()


def cut_after_headers_server() -> CutAfterHeadersServer:
    return CutAfterHeadersServer()


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (a refused connection)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
