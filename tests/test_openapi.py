"""The OpenAPI document is true: every documented answer is produced and matches its schema."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import MakeProxy, RunningProxy
from jsonschema import Draft202012Validator
from upstreams import origin

TOKEN = "openapi-test-token-0123456789"
# Answers only a fleet gives; tests/test_fleet.py produces each and checks it against this document.
FLEET_ONLY = {("/v1/flip", "post", "202"), ("/v1/weights", "put", "202"), ("/v1/fleet", "get", "503")}
JSON = {"Content-Type": "application/json"}


class Checker:
    """Calls the admin listener and validates each answer against the schema documented for it."""

    def __init__(self, http: aiohttp.ClientSession, proxy: RunningProxy, doc: dict[str, Any]) -> None:
        self.http = http
        self.proxy = proxy
        self.doc = doc
        self.seen: set[tuple[str, str, str]] = set()

    def route(self, path: str) -> str:
        """The documented path a concrete one belongs to: itself, or a template like /v1/pools/{color}/..."""
        if path in self.doc["paths"]:
            return path
        for template in self.doc["paths"]:
            if re.fullmatch(re.sub(r"\{[^}/]+\}", "[^/]+", template), path):
                return str(template)
        raise AssertionError(f"{path} is not documented")

    def validate(self, schema: dict[str, Any], body: Any) -> None:
        # The document is the root, so "#/components/schemas/..." references resolve inside it.
        Draft202012Validator({**schema, "components": self.doc["components"]}).validate(body)

    async def call(
        self,
        method: str,
        path: str,
        expect: int,
        body: Any = None,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = TOKEN,
    ) -> Any:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        url = self.proxy.admin_url + path
        async with self.http.request(method, url, data=data, headers=hdrs) as resp:
            assert resp.status == expect, await resp.text()
            assert resp.content_type == "application/json"
            answer = await resp.json()
        route = self.route(path.partition("?")[0])  # the query is a parameter, not part of the path
        operation = self.doc["paths"][route][method.lower()]
        documented = operation["responses"][str(expect)]
        self.validate(documented["content"]["application/json"]["schema"], answer)
        self.seen.add((route, method.lower(), str(expect)))
        return answer

    async def watch(self, path: str, names: list[str]) -> list[tuple[str, Any]]:
        """Read the first events of the /v1/watch stream; each must match the schema named for it."""
        documented = self.doc["paths"]["/v1/watch"]["get"]["responses"]["200"]["content"]
        schemas = documented["text/event-stream"]["x-events"]
        events = []
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.http.get(self.proxy.admin_url + path, headers=headers) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/event-stream"
            name = None
            async with asyncio.timeout(5):
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        name = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        assert name is not None
                        data = json.loads(line.removeprefix("data: "))
                        self.validate(schemas[name], data)
                        events.append((name, data))
                        if len(events) == len(names):
                            break
        assert [name for name, _ in events] == names
        self.seen.add(("/v1/watch", "get", "200"))
        return events


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_every_documented_answer_is_produced_and_matches_its_schema(
    make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    async with origin("blue") as blue, origin("green") as green:
        await _check_every_answer(make_proxy, http, state_dir, blue.addr, green.addr)


async def _check_every_answer(
    make_proxy: MakeProxy, http: aiohttp.ClientSession, state_dir: Path, blue: str, green: str
) -> None:
    proxy = await make_proxy(
        blue=[blue],
        green=[green],
        admin={"listen": "127.0.0.1:0", "tokens": {"ops": TOKEN}},
        state_file=str(state_dir / "state.json"),
        events_file=str(state_dir.parent / "events.jsonl"),  # outside the directory about to break
    )
    async with http.get(
        f"{proxy.admin_url}/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as r:
        doc = await r.json()
    assert doc["openapi"] == "3.1.0"
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    c = Checker(http, proxy, doc)

    await c.call("GET", "/v1/openapi.json", 200)
    await c.call("GET", "/healthz", 200, token=None)
    await c.call("GET", "/readyz", 200, token=None)
    await c.call("GET", "/v1/state", 200)
    await c.call("POST", "/v1/flip", 200)
    await c.call("POST", "/v1/flip", 200, {"to": "blue", "reason": "back", "drain_timeout": "1s"})
    await c.call("PUT", "/v1/weights", 200, {"blue": 9, "green": 1, "drain_timeout": 2})
    events = await c.call("GET", "/v1/events", 200)
    assert [e["reason"] for e in events["events"]] == [None, "back", None]
    pools = await c.call("GET", "/v1/pools", 200)
    assert [u["upstream"] for u in pools["blue"]] == [blue]
    await c.call("POST", "/v1/drain/wait?color=green&timeout=1", 200)
    await c.call("POST", "/v1/drain/wait?color=red", 422)
    await c.watch("/v1/watch", ["state", "history", "counters"])
    await c.watch("/v1/watch?counters=0", ["state"])
    await c.call("GET", "/v1/watch?counters=yes", 422)
    async with aiohttp.ClientSession() as traffic:
        slow = asyncio.ensure_future(traffic.get(proxy.url + "/slow?delay=1"))
        await asyncio.sleep(0.2)
        await c.call("POST", "/v1/drain/wait?color=blue&timeout=0.1", 408)
        (await slow).release()

    for path, method in [(p, m) for p, ops in doc["paths"].items() for m in ops if p.startswith("/v1/")]:
        await c.call(method.upper(), path, 401, token=None)
    for method, path, change in [
        ("POST", "/v1/flip", {"to": "green"}),
        ("PUT", "/v1/weights", {"blue": 1, "green": 1}),
    ]:
        await c.call(method, path, 400, data=b"{", headers=JSON)
        await c.call(method, path, 409, change, headers={"If-Match": "99"})
        await c.call(method, path, 415, data=b"x", headers={"Content-Type": "text/plain"})
        await c.call(method, path, 422, {"blue": -1})

    actions = [f"/v1/rollouts/current/{a}" for a in ("pause", "resume", "promote", "abort")]
    await c.call("GET", "/v1/rollouts/current", 404)
    for path in actions:
        await c.call("POST", path, 404)
    await c.call("POST", "/v1/rollouts", 400, data=b"{", headers=JSON)
    await c.call("POST", "/v1/rollouts", 415, data=b"x", headers={"Content-Type": "text/plain"})
    await c.call("POST", "/v1/rollouts", 422, {"to": "green", "steps": [50, 10]})
    started = await c.call("POST", "/v1/rollouts", 201, {"to": "green", "step_pause": "1h", "reason": "r1"})
    assert started["state"] == "running" and started["weights"] == {"blue": 95, "green": 5}
    await c.call("POST", "/v1/rollouts", 409, {"to": "green"})
    await c.call("GET", "/v1/rollouts", 200)
    await c.call("GET", "/v1/rollouts/current", 200)
    _, rollout = (await c.watch("/v1/watch", ["state", "history", "counters"]))[2]
    assert rollout["rollout"]["id"] == started["id"]  # a running rollout's evidence, every second
    for path in actions:
        await c.call("POST", path, 400, data=b"{", headers=JSON)
        await c.call("POST", path, 415, data=b"x", headers={"Content-Type": "text/plain"})
        await c.call("POST", path, 422, {"reason": 5})
    await c.call("POST", actions[0], 200, {"reason": "look"})
    await c.call("POST", actions[0], 409)
    await c.call("POST", actions[1], 200)
    await c.call("POST", actions[2], 200)
    for path in actions:
        await c.call("POST", path, 409)  # promoted: nothing fits any more
    await c.call("POST", "/v1/rollouts", 201, {"to": "blue", "step_pause": "1h"})
    await c.call("POST", actions[3], 200)

    # Errors outside any documented operation still have the documented error shape.
    error_schema = {"$ref": "#/components/schemas/ErrorView"}
    for method, path, status in [("GET", "/v1/nope", 404), ("PATCH", "/v1/state", 405)]:
        async with http.request(
            method, proxy.admin_url + path, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            assert r.status == status
            c.validate(error_schema, await r.json())

    # Pool membership (green is live since the promotion; blue has no weight) and reload.
    pool_b, pool_g = "/v1/pools/blue/upstreams", "/v1/pools/green/upstreams"
    await c.call("GET", pool_b, 200)
    await c.call("GET", "/v1/pools/red/upstreams", 404)
    await c.call("POST", pool_b, 200, {"upstream": green, "reason": "more"})
    stale = {"If-Match": "99"}
    for method, path, good, conflict, bad in [
        ("POST", pool_b, {"upstream": green}, {}, {"upstream": 5}),  # 409: already there
        ("PUT", pool_b, {"upstreams": [blue]}, stale, {"upstreams": "x"}),  # 409: stale version
        ("DELETE", f"{pool_g}/{green}", None, {}, {"force": [1]}),  # 409: the live color's last
    ]:
        await c.call(method, path, 400, data=b"{", headers=JSON)
        await c.call(method, path, 415, data=b"x", headers={"Content-Type": "text/plain"})
        await c.call(method, path, 422, bad)
        await c.call(method, path, 409, good, headers=conflict)
        await c.call(method, path.replace("/blue/", "/red/").replace("/green/", "/red/"), 404, good)
    await c.call("DELETE", f"{pool_b}/{green}", 200)
    await c.call("PUT", pool_b, 200, {"upstreams": [blue, green]})
    await c.call("POST", "/v1/reload", 200)
    good_config = proxy.config_path.read_text()
    proxy.config_path.write_text(good_config + "drain_timeout: soon\n")
    await c.call("POST", "/v1/reload", 422)
    proxy.config_path.write_text(good_config)

    # A process that takes no change (shutting down, or being taken over) answers 503.
    proxy.app.controller.frozen = "a new bgproxy is taking over"
    for method, path, body in [
        ("POST", "/v1/flip", {"to": "blue"}),
        ("PUT", "/v1/weights", {"blue": 1, "green": 1}),
        ("POST", "/v1/rollouts", {"to": "blue"}),
        ("POST", pool_b, {"upstream": f"localhost:{green.rsplit(':', 1)[1]}"}),  # answers the probe
        ("PUT", pool_b, {"upstreams": [blue]}),
        ("DELETE", f"{pool_b}/{green}", None),
    ]:
        await c.call(method, path, 503, body)
    await c.call("POST", "/v1/rollouts", 503, {"to": "blue", "force": True})
    proxy.app.controller.frozen = None
    await c.call("POST", "/v1/rollouts", 201, {"to": "blue", "step_pause": "1h"})
    frozen = "a new bgproxy is taking over"
    proxy.app.controller.frozen = frozen
    for path in (actions[0], actions[2], actions[3]):
        await c.call("POST", path, 503)
    proxy.app.controller.frozen = None
    await c.call("POST", actions[0], 200)
    proxy.app.controller.frozen = frozen
    await c.call("POST", actions[1], 503)
    proxy.app.controller.frozen = None
    await c.call("POST", actions[3], 200)

    # The state file becomes unwritable: a directory path that is a file fails even as root.
    def unwritable() -> None:
        shutil.rmtree(state_dir)  # the state file and anything kept beside it
        state_dir.write_text("")

    def writable() -> None:
        state_dir.unlink()
        state_dir.mkdir()
        (state_dir / "state.json").write_text("{}")

    unwritable()
    await c.call("POST", "/v1/flip", 500, {"to": "blue"})  # green is live since the promotion
    await c.call("PUT", "/v1/weights", 500, {"blue": 1, "green": 1})
    await c.call("DELETE", f"{pool_b}/{green}", 500)
    await c.call("PUT", pool_b, 500, {"upstreams": [blue]})
    await c.call("POST", "/v1/pools/green/upstreams", 500, {"upstream": blue})
    await c.call("POST", "/v1/rollouts", 500, {"to": "blue"})
    runner = proxy.app.rollouts
    assert runner.current is not None and runner.current.state == "aborted"
    assert proxy.app.controller.holder is None  # the refused start left nothing behind
    writable()
    await c.call("POST", "/v1/rollouts", 201, {"to": "blue", "step_pause": "1h"})
    unwritable()
    for path in (actions[0], actions[2]):
        await c.call("POST", path, 500)
        assert runner.current is not None and runner.current.state == "running"  # as it was
    # An abort that moves weight back is routed first and saved after (a full disk must not keep
    # traffic on the candidate); one before any weight moved has only the state to save.
    writable()
    await c.call("POST", actions[0], 200)
    unwritable()
    await c.call("POST", actions[1], 500)
    assert runner.current is not None and runner.current.state == "paused"

    await _abort_of_a_pending_rollout_is_500_when_unsaved(
        make_proxy, http, doc, c, blue, green, state_dir.parent
    )

    proxy.app.shutting_down = True  # what stop() sets first; /readyz must say so
    await c.call("GET", "/readyz", 503, token=None)

    await c.call("GET", "/v1/fleet", 200, token=TOKEN)  # a single instance: no nodes
    documented = {
        (p, m, s) for p, ops in doc["paths"].items() for m, op in ops.items() for s in op["responses"]
    }
    assert c.seen == documented - FLEET_ONLY


async def _abort_of_a_pending_rollout_is_500_when_unsaved(
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    doc: dict[str, Any],
    c: Checker,
    blue: str,
    green: str,
    tmp_path: Path,
) -> None:
    """A rollout waiting on a pre_rollout gate that never answers; its state file then breaks."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    port = silent.sockets[0].getsockname()[1]
    state_dir = tmp_path / "pending"
    state_dir.mkdir()
    hook = {"name": "gate", "type": "pre_rollout", "url": f"http://127.0.0.1:{port}/", "timeout": 30}
    proxy = await make_proxy(
        blue=[blue],
        green=[green],
        admin={"listen": "127.0.0.1:0", "tokens": {"ops": TOKEN}},
        state_file=str(state_dir / "state.json"),
        events_file=str(tmp_path / "pending-events.jsonl"),
        rollout={"webhooks": [hook]},
    )
    other = Checker(http, proxy, doc)
    started = await other.call("POST", "/v1/rollouts", 201, {"to": "green"})
    assert started["state"] == "pending"
    (state_dir / "state.json").unlink()
    state_dir.rmdir()
    state_dir.write_text("")
    await other.call("POST", "/v1/rollouts/current/abort", 500)
    assert proxy.app.rollouts.current is not None and proxy.app.rollouts.current.state == "pending"
    c.seen |= other.seen
    silent.close()
