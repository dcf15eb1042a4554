"""The fleet on the admin API: GET /v1/fleet, ?wait=all on changes, rollout calls sent to the leader."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from ..config import parse_duration
from ..control.shared import StoreUnavailable
from ..core.address import is_loopback, is_unspecified
from ..core.timefmt import rfc3339
from .errors import ApiError
from .models import FleetView, FleetWaitView, StoreView
from .readmodel import Process

WAIT_DEFAULT = 5.0
WAIT_MAX = 60.0
FORWARDED = "X-Bgproxy-Forwarded-By"  # a request a node sent to the leader is never sent on again
FORWARD_TIMEOUT = 15.0


def store_view(app: Process) -> StoreView:
    """Where the switch state lives (/v1/state and /v1/fleet show the same)."""
    fleet = app.fleet
    if fleet is None:
        where = app.controller.store.where
        return StoreView(backend="file", where=where, status="ok", error=None, node=None, revision=None)
    error = fleet.error
    return StoreView(
        backend="etcd" if fleet.where.startswith("etcd") else "redis",
        where=fleet.where,
        status="degraded" if error else "ok",
        error=error,
        node=fleet.node,
        revision=app.controller.revision,
    )


async def fleet_view(app: Process) -> dict[str, Any]:
    """Every live node as it last reported itself; 503 while the store does not answer."""
    fleet = app.fleet
    version = app.switchboard.version
    if fleet is None:
        return FleetView(store=store_view(app), version=version, leader=None, nodes=[]).model_dump(
            mode="json"
        )
    try:
        nodes = await fleet.nodes()
        leader = await fleet.leader()
    except StoreUnavailable as exc:
        raise ApiError(503, str(exc), ["the nodes cannot be listed while the store is down"]) from None
    now = time.time()
    newest = max([version, *(int(r.get("version", 0)) for r in nodes.values())])
    updated = app.switchboard.updated_at if newest == version else None
    views = []
    for name, record in sorted(nodes.items()):
        runs = int(record.get("version", 0))
        applied = float(record.get("applied_at", now))
        views.append(
            {
                "node": name,
                "admin": str(record.get("admin", "")),
                "version": runs,
                "behind": newest - runs,
                "lag": max(0.0, applied - updated) if runs == newest and updated is not None else None,
                "applied_at": rfc3339(applied),
                "last_seen": rfc3339(float(record.get("seen", now))),
                "seen_ago": max(0.0, now - float(record.get("seen", now))),
                "leader": name == leader,
                "store": record.get("store", "ok"),
                "started_at": rfc3339(float(record.get("started_at", now))),
                "pid": int(record.get("pid", 0)),
            }
        )
    return FleetView.model_validate(
        {"store": store_view(app), "version": version, "leader": leader, "nodes": views}
    ).model_dump(mode="json")


def _loopback(url: str) -> bool:
    """An address that means "this host" wherever it is used: only good on the host that sent it."""
    host = urlsplit(url).hostname or ""
    return is_loopback(host) or is_unspecified(host)


def wait_wanted(request: web.Request) -> float | None:
    """``?wait=all[&wait_timeout=5s]``: seconds to wait for every node, or None (no wait)."""
    query = request.query
    if "wait" not in query:
        if "wait_timeout" in query:
            raise ApiError(422, "invalid query", ["wait_timeout: only with wait=all"])
        return None
    if query["wait"] != "all":
        raise ApiError(422, "invalid query", [f"wait: must be all (got {query['wait']!r})"])
    try:
        seconds = parse_duration(query.get("wait_timeout", str(WAIT_DEFAULT)))
    except ValueError as exc:
        raise ApiError(422, "invalid query", [f"wait_timeout: {exc}"]) from None
    if not 0 < seconds <= WAIT_MAX:
        raise ApiError(422, "invalid query", [f"wait_timeout: must be over 0 and at most {WAIT_MAX:g}s"])
    return seconds


async def wait_all(app: Process, version: int, within: float) -> dict[str, Any]:
    """Wait until every live node runs ``version``; the answer names the ones that did not."""
    fleet = app.fleet
    started = time.monotonic()
    if fleet is None:  # a single instance: it runs what it answers with
        return FleetWaitView(version=version, complete=True, waited=0.0, pending=[]).model_dump(mode="json")
    try:
        complete, nodes = await fleet.wait_applied(version, within)
    except StoreUnavailable as exc:
        raise ApiError(
            503, f"the change is made (version {version}) but the nodes cannot be read: {exc}"
        ) from None
    pending = sorted(n for n, r in nodes.items() if int(r.get("version", -1)) < version)
    return FleetWaitView(
        version=version, complete=complete, waited=round(time.monotonic() - started, 4), pending=pending
    ).model_dump(mode="json")


async def to_leader(app: Process, request: web.Request) -> web.StreamResponse | None:
    """Send a rollout call to the node that drives rollouts; None: this node is that node."""
    fleet = app.fleet
    if fleet is None or fleet.leading:
        return None
    if FORWARDED in request.headers:
        raise ApiError(
            503, "this node no longer leads rollouts; try again", [f"sent by {request.headers[FORWARDED]}"]
        )
    try:
        leader = await fleet.leader()
        nodes = await fleet.nodes()
    except StoreUnavailable as exc:
        raise ApiError(503, f"rollouts are driven by the fleet's leader, and {exc}") from None
    record = nodes.get(leader or "", {})
    admin = record.get("admin")
    if leader is None or not admin:
        raise ApiError(503, "no node leads rollouts at this moment (the lease is being taken); try again")
    if _loopback(admin) and record.get("host") != socket.gethostname():
        # Its 127.0.0.1 is not ours: sending the call (and its token) there would reach this host.
        raise ApiError(
            503,
            f"rollouts are driven by {leader}, whose admin API listens on loopback on host "
            f"{record.get('host')}; send this call to it there",
        )
    headers = {FORWARDED: fleet.node, "Content-Type": request.headers.get("Content-Type", "application/json")}
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    body = await request.read()
    timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                request.method, f"{admin}{request.path_qs}", data=body, headers=headers
            ) as answer,
        ):
            text = await answer.read()
            return web.Response(
                status=answer.status,
                body=text,
                content_type=answer.content_type,
                headers={"X-Bgproxy-Leader": leader},
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ApiError(
            503, f"the rollout leader {leader} ({admin}) did not answer: {exc or 'timeout'}"
        ) from None
