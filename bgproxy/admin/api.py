"""The /v1 admin API: read the switch state, flip and weight traffic, read the audit log.

This is the product's main interface, so it is strict: every body is validated by the models in
api_models, every answer (errors too) is JSON of a documented shape, and a refused call changes
nothing. State changes go through the control plane's Controller, never the Switchboard directly.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError

from ..config import RolloutConfig, parse_duration
from ..control.configure import rollout_spec
from ..control.controller import Frozen, RolloutHolds
from ..control.membership import Change, How, NotMember
from ..control.reload import ReloadResult
from ..control.shared import StoreUnavailable
from ..control.state import StateFileError
from ..core.colors import COLORS, Color
from ..core.errors import SwitchError, VersionConflict
from ..core.jsontext import loads_strict
from ..core.rollout import Rollout, RolloutError
from ..core.switchboard import SwitchResult
from ..core.timefmt import rfc3339
from ..core.weights import Weights
from .changes import MembershipView, RemoveRequest, UpstreamRequest, UpstreamsRequest
from .errors import ApiError
from .fleet import fleet_view, store_view, to_leader, wait_all, wait_wanted
from .metrics import error_window_state
from .models import (
    DrainWaitView,
    ErrorView,
    EventView,
    FlipRequest,
    LastReloadView,
    PoolsHealthView,
    RolloutActionRequest,
    RolloutRequest,
    RolloutsView,
    RolloutView,
    StateView,
    WeightsRequest,
    error_lines,
)
from .openapi import openapi_document
from .readmodel import Process
from .watch import watch_handler

log = logging.getLogger("bgproxy.api")

ACTOR = web.RequestKey("bgproxy_actor", str)
LOCAL_ACTOR = "local"

M = TypeVar("M", bound=BaseModel)


def _error_response(status: int, error: str, detail: list[str], headers: dict[str, str]) -> web.Response:
    body = ErrorView(error=error, detail=detail).model_dump(mode="json")
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: whatever goes wrong (aiohttp's 404/405 included) is answered as an ErrorView."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc.status, exc.error, exc.detail, exc.headers)
    except web.HTTPException as exc:
        detail = [f"{request.method} {request.path}"]
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            detail = [f"{request.method} {request.path}: allowed {', '.join(sorted(exc.allowed_methods))}"]
        return _error_response(exc.status, (exc.reason or "error").lower(), detail, headers)
    except Exception:
        log.exception("admin API error on %s %s", request.method, request.path)
        return _error_response(500, "internal error", [], {})


def color_state(app: Process, color: Color) -> dict[str, Any]:
    """One color's entry in /v1/state: the one place to add per-color fields (and to ColorState).

    Upstreams and their health come from the same live pools the data plane routes to.
    """
    stats = app.stats.colors[color]
    drain = app.switchboard.drain_of(color)
    return {
        "weight": app.switchboard.weights.of(color),
        "upstreams": [up.addr for up in app.runtime.pools[color].upstreams],
        "in_flight": app.stats.in_flight(color),
        "streams": app.runtime.open_streams(color),
        "draining": drain is not None,
        "drain_deadline": rfc3339(drain.deadline) if drain is not None else None,
        "drained": {"ended": stats.streams_ended, "deadline": stats.streams_deadline},
        "upstream_health": upstream_health(app, color),
        "error_window": error_window_state(app, color),
    }


def upstream_health(app: Process, color: Color) -> list[dict[str, Any]]:
    """Each upstream of a color as /v1/pools shows it."""
    out = []
    for up in app.runtime.pools[color].upstreams:
        check = up.last_check
        last = {"at": rfc3339(check[0]), "ok": check[1], "detail": check[2]} if check else None
        out.append(
            {
                "upstream": up.addr,
                "state": "ejected" if up.ejected_until else ("healthy" if up.healthy else "unhealthy"),
                "ejected_until": rfc3339(up.ejected_until) if up.ejected_until else None,
                "consecutive_failures": up.failures,
                "ejections": up.ejections,
                "in_flight": up.outstanding,
                "last_check": last,
            }
        )
    return out


def routing_state(app: Process) -> dict[str, Any]:
    """The routing rules in force, as /v1/state shows them: names and settings, never a key or token."""
    sticky, preview = app.controller.sticky, app.controller.preview
    return {
        "sticky": None
        if sticky is None
        else {
            "cookie": sticky.cookie.decode(),
            "max_age": sticky.max_age,
            "secure": sticky.secure,
            "http_only": sticky.http_only,
            "same_site": sticky.same_site,
            "on_zero_weight": sticky.on_zero_weight,
            "assignments": dict(app.stats.assignments),
        },
        "preview": None
        if preview is None
        else {
            "header": preview.header.decode(),
            "cookie": None if preview.cookie is None else preview.cookie.decode(),
            "allow_from": [str(net) for net in preview.allow_from],
            "token_required": preview.token is not None,
        },
    }


def state_view(app: Process) -> dict[str, Any]:
    """The body of GET /v1/state, validated against StateView so it always matches the docs."""
    board = app.switchboard
    view = StateView.model_validate(
        {
            "weights": board.weights.as_dict(),
            "active": board.weights.active,
            "version": board.version,
            "updated_at": rfc3339(board.updated_at),
            "pools": {color: color_state(app, color) for color in COLORS},
            "routing": routing_state(app),
            "last_reload": None if app.last_reload is None else reload_view(app.last_reload),
            "store": store_view(app),
        }
    )
    return view.model_dump(mode="json", exclude={"fleet"})  # only a change's answer with ?wait=all has it


def rollout_view(r: Rollout) -> dict[str, Any]:
    """A rollout as the API shows it, validated against RolloutView."""
    records = {rec.index: rec for rec in r.steps}
    steps = []
    for index, weight in enumerate(r.spec.steps):
        rec = records.get(index)
        status = "pending" if rec is None else ("current" if rec.ended_at is None else "done")
        steps.append(
            {
                "index": index,
                "weight": weight,
                "status": status,
                "started_at": rfc3339(rec.started_at) if rec else None,
                "ended_at": rfc3339(rec.ended_at) if rec and rec.ended_at is not None else None,
                "evidence": rec.evidence if rec else None,
            }
        )
    view = RolloutView.model_validate(
        {
            "id": r.id,
            "from": r.stable,
            "to": r.candidate,
            "state": r.state,
            "step": r.step,
            "weights": {r.candidate: r.weight, r.stable: 100 - r.weight},
            "rule": r.rule,
            "paused_by": r.paused_by,
            "gates_left": list(r.gates_left),
            "created_at": rfc3339(r.created_at),
            "updated_at": rfc3339(r.updated_at),
            "actor": r.actor,
            "reason": r.reason,
            "evidence": r.evidence,
            "steps": steps,
            "decisions": [
                {"at": rfc3339(d.at), "step": d.step, "action": d.action, "reason": d.reason}
                for d in r.decisions
            ],
            "spec": r.spec.as_dict(),
        }
    )
    return view.model_dump(mode="json", by_alias=True)


def reload_view(result: ReloadResult) -> dict[str, Any]:
    view = LastReloadView.model_validate({"at": rfc3339(result.at), **result.as_dict()})
    return view.model_dump(mode="json")


def _how(request: web.Request) -> Callable[[str | None, bool], How]:
    """The caller and its If-Match, waiting for the body's reason and force."""
    actor, expected = request[ACTOR], _if_match(request)
    return lambda reason, force: How(actor, reason, expected, force)


def _if_match(request: web.Request) -> int | None:
    """``If-Match: 7`` or ``If-Match: "7"`` (the ETag we send): the version the client expects."""
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not (text.isascii() and text.isdigit()):
        raise ApiError(
            400, "invalid If-Match header", [f'If-Match: must be a version like 7 or "7" (got {raw!r})']
        )
    return int(text)


async def _read_body(request: web.Request, model: type[M], name: str, *, optional: bool) -> M:
    """Validate the JSON body: 415 if not JSON, 400 if it doesn't parse, 422 naming each bad field."""
    raw = await request.read()
    if optional and not raw:
        return model.model_validate({})
    content_type = request.content_type
    if content_type != "application/json" and not content_type.endswith("+json"):
        sent = request.headers.get("Content-Type", "none")
        raise ApiError(
            415, "unsupported media type", [f"Content-Type must be application/json (got {sent!r})"]
        )
    if not raw:
        raise ApiError(400, "invalid JSON body", ["the body is empty: expected a JSON object"])
    try:
        data = loads_strict(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, "invalid JSON body", [f"line {exc.lineno} column {exc.colno}: {exc.msg}"]
        ) from None
    except ValueError as exc:  # undecodable bytes, duplicate keys, NaN
        raise ApiError(400, "invalid JSON body", [str(exc)]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid request body", error_lines(exc, name)) from None


class _Api:
    """The handlers, bound to one process."""

    def __init__(self, app: Process, tokens: Mapping[str, str]) -> None:
        self.app = app
        self._tokens = [(name, token.encode()) for name, token in tokens.items()]
        self._openapi = openapi_document()

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Bearer token check in constant time; records who is calling, for the audit log."""
        if not self._tokens:
            request[ACTOR] = LOCAL_ACTOR
            return await handler(request)
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        presented = credentials.strip().encode("utf-8", "replace") if scheme.lower() == "bearer" else b""
        actor = None
        for name, token in self._tokens:  # compare with every token, so timing says nothing
            if hmac.compare_digest(presented, token) and actor is None:
                actor = name
        if actor is None:
            raise ApiError(
                401,
                "unauthorized",
                ["send Authorization: Bearer <token> with a token from admin.tokens"],
                {"WWW-Authenticate": 'Bearer realm="bgproxy"'},
            )
        request[ACTOR] = actor
        return await handler(request)

    def _state_response(self) -> web.Response:
        body = state_view(self.app)
        return web.json_response(body, headers={"ETag": f'"{body["version"]}"'})

    async def get_state(self, request: web.Request) -> web.Response:
        return self._state_response()

    async def get_fleet(self, request: web.Request) -> web.Response:
        return web.json_response(await fleet_view(self.app))

    async def _switch(self, change: Awaitable[SwitchResult], wait: float | None = None) -> web.Response:
        """Run a change and answer with the state it left: no await in between, so no later change
        shows. ``wait``: then wait up to that long for every node of the fleet to run it; 202 if
        some did not (the change is made; the answer names them)."""
        try:
            await change
        except VersionConflict as exc:
            raise ApiError(409, str(exc), ["nothing was changed; read /v1/state and retry"]) from None
        except RolloutHolds as exc:
            raise ApiError(409, "a rollout is running", [str(exc)]) from None
        except Frozen as exc:
            raise ApiError(503, str(exc)) from None
        except SwitchError as exc:
            raise ApiError(409, str(exc)) from None
        except StateFileError as exc:
            log.error("could not persist a switch: %s", exc)
            raise ApiError(500, "could not save the change; nothing was changed", [str(exc)]) from None
        if wait is None:
            return self._state_response()
        body = state_view(self.app)
        body["fleet"] = await wait_all(self.app, body["version"], wait)
        status = 200 if body["fleet"]["complete"] else 202
        return web.json_response(body, status=status, headers={"ETag": f'"{body["version"]}"'})

    async def flip(self, request: web.Request) -> web.Response:
        expected = _if_match(request)
        wait = wait_wanted(request)
        body = await _read_body(request, FlipRequest, "flip", optional=True)
        return await self._switch(
            self.app.controller.flip(
                body.to,
                actor=request[ACTOR],
                reason=body.reason,
                expected_version=expected,
                drain_timeout=body.drain_timeout,
                force=body.force,
            ),
            wait,
        )

    async def put_weights(self, request: web.Request) -> web.Response:
        expected = _if_match(request)
        wait = wait_wanted(request)
        body = await _read_body(request, WeightsRequest, "weights", optional=False)
        return await self._switch(
            self.app.controller.set_weights(
                Weights(blue=body.blue, green=body.green),
                actor=request[ACTOR],
                reason=body.reason,
                expected_version=expected,
                drain_timeout=body.drain_timeout,
                force=body.force,
            ),
            wait,
        )

    async def get_pools(self, request: web.Request) -> web.Response:
        view = PoolsHealthView.model_validate({c: upstream_health(self.app, c) for c in COLORS})
        return web.json_response(view.model_dump(mode="json"))

    async def drain_wait(self, request: web.Request) -> web.Response:
        """Returns once a color has no open exchange: a pipeline waits here before stopping old servers."""
        query = request.query
        problems = []
        color = query.get("color")
        if color not in COLORS:
            problems.append(f"color: must be blue or green (got {color!r})")
        try:
            within = parse_duration(query.get("timeout", "60"))
        except ValueError as exc:
            problems.append(f"timeout: {exc} (got {query.get('timeout')!r})")
        if problems:
            raise ApiError(422, "invalid query", problems)
        assert color is not None
        if not await self.app.drainer.wait_idle(color, within):
            left = len(self.app.runtime.active[color])
            raise ApiError(408, f"{color} still has {left} open exchanges after {within:g}s")
        return web.json_response(DrainWaitView(color=color, idle=True).model_dump(mode="json"))  # type: ignore[arg-type]

    async def get_events(self, request: web.Request) -> web.Response:
        """The fleet's log from the store when there is one (this node's own while it is down)."""
        entries = self.app.audit.events()
        if self.app.fleet is not None:
            try:
                entries = await self.app.fleet.shared.events()
            except StoreUnavailable as exc:
                log.warning("showing this node's audit log: %s", exc)
        events = []
        for entry in entries:
            try:
                events.append(EventView.model_validate(entry).model_dump(mode="json", exclude_unset=True))
            except ValidationError:  # a kind this version does not know (a newer one wrote it): skip it
                continue
        return web.json_response({"events": events})

    async def start_rollout(self, request: web.Request) -> web.StreamResponse:
        if (sent := await to_leader(self.app, request)) is not None:
            return sent
        body = await _read_body(request, RolloutRequest, "rollout", optional=False)
        merged = {**self.app.rollouts.config.model_dump(), **body.overrides()}
        try:
            plan = RolloutConfig.model_validate(merged)
        except ValidationError as exc:
            raise ApiError(422, "invalid request body", error_lines(exc, "rollout")) from None
        try:
            r = await self.app.rollouts.start(
                body.to, rollout_spec(plan), actor=request[ACTOR], reason=body.reason, force=body.force
            )
        except Frozen as exc:
            raise ApiError(503, str(exc)) from None
        except SwitchError as exc:
            raise ApiError(409, str(exc), ["no rollout was started"]) from None
        except ValueError as exc:
            raise ApiError(422, "invalid request body", [f"rollout.{exc}"]) from None
        except StateFileError as exc:
            log.error("could not persist a rollout: %s", exc)
            raise ApiError(500, "could not save the rollout", [str(exc)]) from None
        return web.json_response(rollout_view(r), status=201)

    async def get_rollouts(self, request: web.Request) -> web.Response:
        views = [rollout_view(r) for r in reversed(self.app.rollouts.history)]
        return web.json_response(
            RolloutsView.model_validate({"rollouts": views}).model_dump(mode="json", by_alias=True)
        )

    async def current_rollout(self, request: web.Request) -> web.Response:
        r = self.app.rollouts.current
        if r is None:
            raise ApiError(404, "no rollout has run", ["start one with POST /v1/rollouts"])
        return web.json_response(rollout_view(r))

    async def rollout_action(self, request: web.Request) -> web.StreamResponse:
        if (sent := await to_leader(self.app, request)) is not None:
            return sent
        action = request.match_info["action"]
        body = await _read_body(request, RolloutActionRequest, action, optional=True)
        actor = request[ACTOR] + (f" ({body.reason})" if body.reason else "")
        try:
            r = await self.app.rollouts.act(action, actor=actor)
        except LookupError:
            raise ApiError(404, "no rollout has run", ["start one with POST /v1/rollouts"]) from None
        except RolloutError as exc:
            raise ApiError(409, str(exc), ["nothing was changed"]) from None
        except Frozen as exc:
            raise ApiError(503, str(exc)) from None
        except SwitchError as exc:  # a promotion whose flip probe failed
            raise ApiError(409, str(exc), ["nothing was changed"]) from None
        except StateFileError as exc:
            log.error("could not persist a rollout: %s", exc)
            raise ApiError(500, "could not save the change", [str(exc)]) from None
        return web.json_response(rollout_view(r))

    # -- pool membership and reload --------------------------------------------------------------------

    def _color(self, request: web.Request) -> Color:
        color = request.match_info["color"]
        if color not in COLORS:
            raise ApiError(404, f"no pool {color!r}", ["pools are blue and green"])
        return color

    def _membership_view(self, color: Color, change: Change | None = None) -> web.Response:
        version = change.version if change else self.app.switchboard.version
        view = MembershipView(
            color=color,
            upstreams=self.app.membership.members(color),
            added=list(change.added) if change else [],
            removed=list(change.removed) if change else [],
            version=version,
        )
        return web.json_response(view.model_dump(mode="json"), headers={"ETag": f'"{version}"'})

    async def _pool_change(self, color: Color, change: Awaitable[Change]) -> web.Response:
        try:
            done = await change
        except VersionConflict as exc:
            raise ApiError(409, str(exc), ["nothing was changed; read the pool and retry"]) from None
        except NotMember as exc:
            raise ApiError(404, str(exc), ["nothing was changed"]) from None
        except Frozen as exc:
            raise ApiError(503, str(exc)) from None
        except SwitchError as exc:
            raise ApiError(409, str(exc)) from None
        except ValueError as exc:
            raise ApiError(422, "invalid upstream", [str(exc)]) from None
        except StateFileError as exc:
            log.error("could not persist a pool change: %s", exc)
            raise ApiError(500, "could not save the change; nothing was changed", [str(exc)]) from None
        return self._membership_view(color, done)

    async def get_upstreams(self, request: web.Request) -> web.Response:
        return self._membership_view(self._color(request))

    async def add_upstream(self, request: web.Request) -> web.Response:
        color, how = self._color(request), _how(request)
        body = await _read_body(request, UpstreamRequest, "upstream", optional=False)
        change = self.app.membership.add(color, body.upstream, how(body.reason, body.force))
        return await self._pool_change(color, change)

    async def put_upstreams(self, request: web.Request) -> web.Response:
        color, how = self._color(request), _how(request)
        body = await _read_body(request, UpstreamsRequest, "upstreams", optional=False)
        change = self.app.membership.replace(color, body.upstreams, how(body.reason, body.force))
        return await self._pool_change(color, change)

    async def remove_upstream(self, request: web.Request) -> web.Response:
        color, how = self._color(request), _how(request)
        body = await _read_body(request, RemoveRequest, "remove", optional=True)
        change = self.app.membership.remove(
            color, request.match_info["upstream"], how(body.reason, body.force)
        )
        return await self._pool_change(color, change)

    async def reload(self, request: web.Request) -> web.Response:
        result = await self.app.reload(actor=request[ACTOR])
        if not result.ok:
            raise ApiError(
                422, "the config was not reloaded; the running one is unchanged", list(result.errors)
            )
        return web.json_response(reload_view(result))

    async def get_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self._openapi)


def build_v1_app(app: Process, tokens: Mapping[str, str]) -> web.Application:
    api = _Api(app, tokens)
    v1 = web.Application(middlewares=[_json_errors, api.authenticate])
    v1.router.add_get("/state", api.get_state)
    v1.router.add_get("/fleet", api.get_fleet)
    v1.router.add_post("/flip", api.flip)
    v1.router.add_put("/weights", api.put_weights)
    v1.router.add_get("/events", api.get_events)
    v1.router.add_get("/pools", api.get_pools)
    v1.router.add_post("/drain/wait", api.drain_wait)
    v1.router.add_post("/rollouts", api.start_rollout)
    v1.router.add_get("/rollouts", api.get_rollouts)
    v1.router.add_get("/rollouts/current", api.current_rollout)
    v1.router.add_post("/rollouts/current/{action:pause|resume|promote|abort}", api.rollout_action)
    v1.router.add_get("/watch", watch_handler(app))
    v1.router.add_get("/pools/{color}/upstreams", api.get_upstreams)
    v1.router.add_post("/pools/{color}/upstreams", api.add_upstream)
    v1.router.add_put("/pools/{color}/upstreams", api.put_upstreams)
    v1.router.add_delete("/pools/{color}/upstreams/{upstream}", api.remove_upstream)
    v1.router.add_post("/reload", api.reload)
    v1.router.add_get("/openapi.json", api.get_openapi)
    return v1
