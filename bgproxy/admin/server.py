"""The admin listener: composes health probes, the /v1 admin API and /metrics.

Each part lives in its own module; this one only mounts them, so the admin listener's shape
is visible in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from .api import build_v1_app
from .metrics import metrics_handler
from .readmodel import Process
from .ui import add_ui_routes

PROCESS_KEY: web.AppKey[Process] = web.AppKey("bgproxy_process")


async def _healthz(request: web.Request) -> web.Response:
    """Process alive: the event loop answers."""
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    """200 only while serving traffic: 503 during shutdown or while live traffic has no upstream."""
    ready, why = request.app[PROCESS_KEY].readiness()
    return web.json_response({"ready": ready, "reason": why}, status=200 if ready else 503)


def build_admin_app(process: Process, tokens: Mapping[str, str]) -> web.Application:
    """The admin listener's app; ``tokens`` (name -> bearer token) guard /v1 when not empty."""
    admin = web.Application()
    admin[PROCESS_KEY] = process
    admin.router.add_get("/healthz", _healthz)
    admin.router.add_get("/readyz", _readyz)
    admin.router.add_get("/metrics", metrics_handler(process))
    admin.add_subapp("/v1", build_v1_app(process, tokens))
    add_ui_routes(admin, process)
    return admin
