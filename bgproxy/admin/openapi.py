"""The OpenAPI 3.1 document of the admin listener, its schemas generated from the API models.

Generated from the same models that validate requests and shape answers, so it cannot drift from
what the server does; tests/test_openapi.py checks every answer against it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from .. import __version__
from ..core.colors import COLORS
from .changes import MembershipView, RemoveRequest, UpstreamRequest, UpstreamsRequest
from .models import (
    DrainWaitView,
    ErrorView,
    EventsView,
    FleetView,
    FlipRequest,
    HealthView,
    LastReloadView,
    PoolsHealthView,
    ReadyView,
    RolloutActionRequest,
    RolloutRequest,
    RolloutsView,
    RolloutView,
    StateView,
    WatchCountersEvent,
    WatchHistoryEvent,
    WatchStateEvent,
    WeightsRequest,
)

_REF = "#/components/schemas/{model}"
_ERRORS = {
    400: "Malformed JSON or If-Match header.",
    401: "Tokens are configured and the request has no valid bearer token.",
    408: "The color still had open exchanges when the timeout passed.",
    404: "No such rollout, pool or upstream.",
    409: "Stale If-Match version, a rollout holding the switch (without force), a flip without `to` "
    "while both colors have weight, or weight for a "
    "color with no healthy upstream or none answering the flip probe (without force). Nothing changed.",
    415: "The body is not application/json.",
    422: "The body does not validate; one detail line per bad field.",
    500: "The change could not be saved to the state file. Nothing changed.",
    503: "This process takes no change now: it is shutting down, a new bgproxy is taking over, or the "
    "fleet's state store does not answer (traffic goes on as it was). Nothing changed.",
}

_WATCH = """\
`text/event-stream` (server-sent events) for dashboards and `bgproxy status --watch`. Each event is
`event: NAME` and one `data:` line of JSON:

- `state` (WatchStateEvent): first, then within 200 ms of any change of the weights or version, a
  drain starting or ending, an upstream's health state, or the rollout's state, step or decisions.
  It holds the same body as GET /v1/state, the drains with their deadlines, and the current rollout.
- `history` (WatchHistoryEvent): once, after the first `state`: each color's live requests and
  errors per second over the last 5 minutes (kept by the server), for sparklines.
- `counters` (WatchCountersEvent): every second: the requests and errors of that second, totals,
  in flight, open streams, the error window, p50/p99 over it, upstream health, rollout evidence.

Lines starting with `:` are comments (a keep-alive after 15 s without an event). The stream ends
when bgproxy shuts down; reconnect and you get a fresh `state`. Browsers: EventSource cannot send
the Authorization header, so read it with fetch() when tokens are configured (the dashboard does).
"""


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for the admin listener, its schemas generated from the API models."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *(
            (m, "validation")
            for m in (
                FlipRequest,
                WeightsRequest,
                RolloutRequest,
                RolloutActionRequest,
                UpstreamRequest,
                UpstreamsRequest,
                RemoveRequest,
            )
        ),
        *(
            (m, "serialization")
            for m in (
                StateView,
                FleetView,
                EventsView,
                ErrorView,
                HealthView,
                ReadyView,
                PoolsHealthView,
                DrainWaitView,
                RolloutView,
                RolloutsView,
                MembershipView,
                LastReloadView,
                WatchStateEvent,
                WatchHistoryEvent,
                WatchCountersEvent,
            )
        ),
    ]
    refs, top = models_json_schema(models, ref_template=_REF)
    schema_of = {model: schema for (model, _mode), schema in refs.items()}

    def content(model: type[BaseModel]) -> dict[str, Any]:
        return {"application/json": {"schema": schema_of[model]}}

    def ok(model: type[BaseModel]) -> dict[str, Any]:
        return {"description": "OK", "content": content(model)}

    def answers(success: dict[str, Any], *errors: int, code: str = "200") -> dict[str, Any]:
        result = {code: success}
        for status in (401, *errors):
            result[str(status)] = {"description": _ERRORS[status], "content": content(ErrorView)}
        return result

    if_match = {
        "name": "If-Match",
        "in": "header",
        "required": False,
        "description": 'Apply only if the state is still at this version (7 or "7"); else 409.',
        "schema": {"type": "string", "pattern": '^("[0-9]+"|[0-9]+)$'},
    }
    state_ok = {
        **ok(StateView),
        "headers": {"ETag": {"description": 'The state version, quoted: "7".', "schema": {"type": "string"}}},
    }
    change_errors = (400, 409, 415, 422, 500, 503)
    wait = [
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "description": "`all`: answer once every live node of the fleet runs the new version; 202 "
            "(the change is made) with `fleet.pending` naming the nodes that did not within the timeout.",
            "schema": {"enum": ["all"]},
        },
        {
            "name": "wait_timeout",
            "in": "query",
            "required": False,
            "description": "With wait=all: seconds or a duration like 500ms, 5s (default 5, at most 60).",
            "schema": {"type": "string"},
        },
    ]
    waited = {**state_ok, "description": "The change is made; some live nodes did not run it in time."}
    color_param = {"name": "color", "in": "path", "required": True, "schema": {"enum": list(COLORS)}}
    members_ok = {
        **ok(MembershipView),
        "headers": {"ETag": {"description": 'The state version, quoted: "7".', "schema": {"type": "string"}}},
    }
    pool_errors = (400, 404, 409, 415, 422, 500, 503)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bgproxy admin API",
            "version": __version__,
            "description": "Flip and weight traffic between the blue and the green pool. Every error "
            "answer is an Error object; 404 and 405 answers too.",
        },
        "components": {
            "schemas": top["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # The empty requirement: no token is needed while admin.tokens is empty.
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/state": {
                "get": {
                    "operationId": "getState",
                    "summary": "Weights, live color, version and pools.",
                    "responses": answers(state_ok),
                }
            },
            "/v1/flip": {
                "post": {
                    "operationId": "flip",
                    "summary": "Send all traffic to one color (default: the one not live now).",
                    "description": "Flipping to the color already live changes nothing and answers 200.",
                    "parameters": [if_match, *wait],
                    "requestBody": {"required": False, "content": content(FlipRequest)},
                    "responses": {**answers(state_ok, *change_errors), "202": waited},
                }
            },
            "/v1/weights": {
                "put": {
                    "operationId": "setWeights",
                    "summary": "Split traffic by relative weights.",
                    "parameters": [if_match, *wait],
                    "requestBody": {"required": True, "content": content(WeightsRequest)},
                    "responses": {**answers(state_ok, *change_errors), "202": waited},
                }
            },
            "/v1/fleet": {
                "get": {
                    "operationId": "getFleet",
                    "summary": "The live nodes sharing this switch: the version each runs, lag, last seen.",
                    "description": "Empty `nodes` for a single instance (state in a file). 503 while the "
                    "shared store does not answer.",
                    "responses": answers(ok(FleetView), 503),
                }
            },
            "/v1/events": {
                "get": {
                    "operationId": "getEvents",
                    "summary": "Audit log of applied changes.",
                    "responses": answers(ok(EventsView)),
                }
            },
            "/v1/pools": {
                "get": {
                    "operationId": "getPools",
                    "summary": "Each upstream's health: state, ejection, last check.",
                    "responses": answers(ok(PoolsHealthView)),
                }
            },
            "/v1/pools/{color}/upstreams": {
                "get": {
                    "operationId": "getUpstreams",
                    "summary": "A color's upstreams, in order.",
                    "parameters": [color_param],
                    "responses": answers(members_ok, 404),
                },
                "post": {
                    "operationId": "addUpstream",
                    "summary": "Add an upstream; it answers the flip probe before it takes traffic.",
                    "parameters": [color_param, if_match],
                    "requestBody": {"required": True, "content": content(UpstreamRequest)},
                    "responses": answers(members_ok, *pool_errors),
                },
                "put": {
                    "operationId": "setUpstreams",
                    "summary": "Replace the whole list; upstreams that stay keep their state.",
                    "parameters": [color_param, if_match],
                    "requestBody": {"required": True, "content": content(UpstreamsRequest)},
                    "responses": answers(members_ok, *pool_errors),
                },
            },
            "/v1/pools/{color}/upstreams/{upstream}": {
                "delete": {
                    "operationId": "removeUpstream",
                    "summary": "Remove an upstream: no new request; its exchanges finish, its streams drain.",
                    "parameters": [
                        color_param,
                        {"name": "upstream", "in": "path", "required": True, "schema": {"type": "string"}},
                        if_match,
                    ],
                    "requestBody": {"required": False, "content": content(RemoveRequest)},
                    "responses": answers(members_ok, *pool_errors),
                }
            },
            "/v1/reload": {
                "post": {
                    "operationId": "reload",
                    "summary": "Read the config file again and apply it whole (as SIGHUP).",
                    "description": "422 lists every problem; the running config then stays as it was.",
                    "responses": answers(ok(LastReloadView), 422),
                }
            },
            "/v1/drain/wait": {
                "post": {
                    "operationId": "drainWait",
                    "summary": "Wait until a color has no open exchange (e.g. before stopping its servers).",
                    "parameters": [
                        {"name": "color", "in": "query", "required": True, "schema": {"enum": list(COLORS)}},
                        {
                            "name": "timeout",
                            "in": "query",
                            "required": False,
                            "description": "Seconds or a duration like 30s, 2m (default 60).",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": answers(ok(DrainWaitView), 408, 422),
                }
            },
            "/v1/rollouts": {
                "post": {
                    "operationId": "startRollout",
                    "summary": "Start a guarded rollout toward a color: steps, rules, gates.",
                    "description": "409 while a rollout runs, or when the target fails the flip probe "
                    "(without force). Settings left out take the config's `rollout:` values.",
                    "requestBody": {"required": True, "content": content(RolloutRequest)},
                    "responses": answers(
                        {"description": "Started", "content": content(RolloutView)},
                        400,
                        409,
                        415,
                        422,
                        500,
                        503,
                        code="201",
                    ),
                },
                "get": {
                    "operationId": "getRollouts",
                    "summary": "Recent rollouts, newest first.",
                    "responses": answers(ok(RolloutsView)),
                },
            },
            "/v1/rollouts/current": {
                "get": {
                    "operationId": "getCurrentRollout",
                    "summary": "The running rollout, or the last one.",
                    "responses": answers(ok(RolloutView), 404),
                }
            },
            **{
                f"/v1/rollouts/current/{action}": {
                    "post": {
                        "operationId": f"{action}Rollout",
                        "summary": summary,
                        "requestBody": {"required": False, "content": content(RolloutActionRequest)},
                        "responses": answers(ok(RolloutView), 400, 404, 409, 415, 422, 500, 503),
                    }
                }
                for action, summary in (
                    ("pause", "Hold the rollout at its step; rules keep watching."),
                    ("resume", "Go on from a pause (overriding a failed gate)."),
                    ("promote", "Candidate to 100% now, skipping the remaining steps and the bake."),
                    ("abort", "Back to the stable color now; the candidate drains."),
                )
            },
            "/v1/watch": {
                "get": {
                    "operationId": "watch",
                    "summary": "Server-sent events: state changes as they happen, counters every second.",
                    "description": _WATCH,
                    "parameters": [
                        {
                            "name": "counters",
                            "in": "query",
                            "required": False,
                            "description": "0: only `state` events (and a keep-alive comment when idle).",
                            "schema": {"enum": ["0", "1"], "default": "1"},
                        }
                    ],
                    "responses": answers(
                        {
                            "description": "An endless text/event-stream; each event's `data` is one line "
                            "of JSON, its schema named by `x-events`.",
                            "content": {
                                "text/event-stream": {
                                    "schema": {"type": "string"},
                                    "x-events": {
                                        "state": schema_of[WatchStateEvent],
                                        "history": schema_of[WatchHistoryEvent],
                                        "counters": schema_of[WatchCountersEvent],
                                    },
                                }
                            },
                        },
                        422,
                    ),
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "getOpenapi",
                    "summary": "This document.",
                    "responses": answers(
                        {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    ),
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "The process is alive.",
                    "security": [],
                    "responses": {"200": ok(HealthView)},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Whether bgproxy takes traffic: 503 while starting or shutting down.",
                    "security": [],
                    "responses": {
                        "200": ok(ReadyView),
                        "503": {"description": "Not serving", "content": content(ReadyView)},
                    },
                }
            },
        },
    }
