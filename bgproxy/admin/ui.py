"""The dashboard page on the admin listener: ``GET /`` (also ``/ui/``) and its few static files.

Plain HTML, CSS and JavaScript from ``static/`` in this package, read once when the listener is
built and served from memory: no build step, no CDN, nothing from another origin. The page holds no
data; everything it shows comes from the /v1 API and the /v1/watch event stream, with the operator's
token when tokens are configured, so serving it needs no token. Every answer carries a strict
Content-Security-Policy (scripts, styles and connections to this origin only; no inline script or
style), and the page may not be framed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from . import watch
from .readmodel import Process

log = logging.getLogger("bgproxy.ui")

# name -> Content-Type; only these files are served, whatever else is in the directory.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
}


def load_assets() -> dict[str, tuple[bytes, str]]:
    """Each served file's bytes and ETag, from the package's static/ directory."""
    folder = resources.files(__package__ or "bgproxy.admin") / "static"
    out = {}
    for name in ASSETS:
        body = (folder / name).read_bytes()
        out[name] = (body, '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    return out


def _serve(
    name: str, assets: dict[str, tuple[bytes, str]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    body, etag = assets[name]
    headers = {
        **SECURITY_HEADERS,
        "Content-Type": ASSETS[name],
        "ETag": etag,
        # Revalidate every time: after an upgrade the page and its script must match.
        "Cache-Control": "no-cache",
    }

    async def handler(request: web.Request) -> web.Response:
        if etag in (tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")):
            return web.Response(status=304, headers={k: v for k, v in headers.items() if k != "Content-Type"})
        return web.Response(body=body, headers=headers)

    return handler


async def _to_ui(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect("/ui/", headers=SECURITY_HEADERS)


def _missing(why: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            status=500,
            text=f"the dashboard's files are missing from this install: {why}\n",
            headers=SECURITY_HEADERS,
        )

    return handler


def add_ui_routes(admin: web.Application, process: Process) -> None:
    """Mount the page at / and /ui/, its files under /ui/, and the /v1/watch hub's lifecycle.

    An install without the static files (package data left out) still runs: the API matters more
    than the page, so the page's routes answer 500 saying what is missing, and the start logs it.
    """
    watch.attach(admin, process)
    try:
        assets = load_assets()
    except OSError as exc:
        log.error("dashboard files missing; GET / answers 500: %s", exc)
        for path in ("/", "/ui/"):
            admin.router.add_get(path, _missing(str(exc)))
        return
    page = _serve("index.html", assets)
    admin.router.add_get("/", page)
    admin.router.add_get("/ui/", page)
    admin.router.add_get("/ui", _to_ui)
    for name in ASSETS:
        if name != "index.html":
            admin.router.add_get(f"/ui/{name}", _serve(name, assets))
    admin.router.add_get("/favicon.ico", _serve("favicon.svg", assets))
