"""Demo blue/green upstream pools that `make run` starts beside the proxy.

They exist so a newcomer can open the proxy in a browser and *see* which colour answered, then flip or
re-weight through the admin API and watch the page change, without deploying anything.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Mapping, Sequence

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from .core.address import host_port

# Refreshes itself every second so a flip or a weight change shows up without touching the browser.
_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="1">
<title>bgproxy demo: {color}</title>
<style>body{{background:{color};color:#fff;font:2rem system-ui,sans-serif;text-align:center;padding-top:20vh}}
small{{opacity:.8}}</style></head>
<body><h1>{color}</h1><p>upstream {upstream}</p><p><small>request #{served} on this upstream</small></p>
</body></html>
"""


class _DemoUpstream:
    """One demo instance: its colour, its address and how many requests it has served."""

    def __init__(self, color: str) -> None:
        self.color = color
        self.addr = ""  # known once bound: the configured port may be 0
        self.served = 0  # health probes excluded, so the number tracks real traffic

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.on_response_prepare.append(self._stamp)
        app.router.add_get("/", self._page)
        app.router.add_get("/api", self._api)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/sse", self._sse)
        app.router.add_get("/ws", self._ws)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz":
            self.served += 1
        return await handler(request)

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Color"] = self.color

    async def _page(self, request: web.Request) -> web.StreamResponse:
        page = _PAGE.format(
            color=html.escape(self.color), upstream=html.escape(self.addr), served=self.served
        )
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _api(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"color": self.color, "upstream": self.addr, "served": self.served})

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        """One event a second until the client leaves: shows a stream staying pinned across a flip."""
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        seq = 0
        try:
            while True:
                await response.write(f"data: {self.color} {self.addr} #{seq}\n\n".encode())
                seq += 1
                await asyncio.sleep(1)
        except ConnectionResetError:
            return response

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws


class DemoUpstreams:
    """The running demo pools; close() stops them all."""

    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []
        self.addresses: dict[str, list[str]] = {}

    async def add(self, color: str, host: str, port: int) -> None:
        upstream = _DemoUpstream(color)
        # Endless SSE/WebSocket handlers must end when their client leaves (handler_cancellation) and must not
        # hold close() for aiohttp's default 60 s.
        runner = web.AppRunner(
            upstream.app(), access_log=None, shutdown_timeout=1.0, handler_cancellation=True
        )
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port)
        await site.start()
        upstream.addr = host_port(host, site.port)
        self.addresses.setdefault(color, []).append(upstream.addr)

    async def close(self) -> None:
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()


async def start_demo_upstreams(pools: Mapping[str, Sequence[tuple[str, int]]]) -> DemoUpstreams:
    """Start one aiohttp app per (host, port) on the running loop; on any failure nothing is left running."""
    demo = DemoUpstreams()
    try:
        for color, addrs in pools.items():
            for host, port in addrs:
                await demo.add(color, host, port)
    except BaseException:
        await demo.close()
        raise
    return demo


def banner(proxy_url: str, admin_url: str) -> str:
    """What to try first, printed to the terminal when the demo starts."""
    proxy, admin = proxy_url.rstrip("/"), admin_url.rstrip("/")
    return "\n".join(
        [
            f"bgproxy demo: open {proxy}/ in a browser (the page colour is the upstream that answered)",
            f"  curl -s {proxy}/api",
            f"  curl -N {proxy}/sse",
            f"  curl -X POST {admin}/v1/flip",
            f"  curl -X PUT {admin}/v1/weights -H 'Content-Type: application/json' "
            """-d '{"blue":90,"green":10}'""",
            f"  curl {admin}/metrics",
        ]
    )
