"""The control-plane listener: composes health probes, the /v1 admin API and /metrics.

Each part lives in its own module; this one only mounts them, so the admin listener's shape
is visible in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .api import build_v1_app
from .metrics import metrics_handler

if TYPE_CHECKING:
    from .app import App

APP_KEY: web.AppKey[App] = web.AppKey("bgproxy_app")


async def _healthz(request: web.Request) -> web.Response:
    """Process alive: the event loop answers."""
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    """200 only while serving traffic: 503 during shutdown or while live traffic has no upstream."""
    app = request.app[APP_KEY]
    ready, why = app.readiness()
    return web.json_response({"ready": ready, "reason": why}, status=200 if ready else 503)


def build_admin_app(app: App) -> web.Application:
    admin = web.Application()
    admin[APP_KEY] = app
    admin.router.add_get("/healthz", _healthz)
    admin.router.add_get("/readyz", _readyz)
    admin.router.add_get("/metrics", metrics_handler(app))
    admin.add_subapp("/v1", build_v1_app(app))
    return admin
