"""The /v1 admin API against a real in-process bgproxy: switching, refusals, auth, concurrency."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
from conftest import MakeProxy, RunningProxy
from multidict import CIMultiDict
from upstreams import Origin, origin

from bgproxy.app import App
from bgproxy.config import ConfigError, load_config
from bgproxy.control.state import FileStateBackend

TOKEN_OPS = "ops-token-0123456789abcdef"
TOKEN_CI = "ci-token-0123456789abcdefgh"


class Admin:
    """A client of one proxy's admin API that returns (status, json body, headers)."""

    def __init__(self, http: aiohttp.ClientSession, proxy: RunningProxy, token: str | None = None) -> None:
        self.http = http
        self.proxy = proxy
        self.token = token

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, CIMultiDict[str]]:
        hdrs = dict(headers or {})
        if self.token is not None:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        url = self.proxy.admin_url + path
        # aiohttp would label a body-less PUT application/octet-stream; send only what the test says.
        async with self.http.request(
            method, url, data=data, headers=hdrs, skip_auto_headers=["Content-Type"]
        ) as resp:
            assert resp.content_type == "application/json"
            return resp.status, await resp.json(), resp.headers.copy()

    async def state(self) -> dict[str, Any]:
        status, body, _ = await self.call("GET", "/v1/state")
        assert status == 200
        return dict(body)

    async def events(self) -> list[dict[str, Any]]:
        status, body, _ = await self.call("GET", "/v1/events")
        assert status == 200
        return list(body["events"])


async def color_of(http: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    async with http.get(f"{proxy.url}/echo") as resp:
        assert resp.status == 200
        return resp.headers["X-Color"]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def origins() -> AsyncIterator[tuple[Origin, Origin]]:
    async with origin("blue") as b, origin("green") as g:
        yield b, g


@pytest.fixture
async def proxy(make_proxy: MakeProxy, origins: tuple[Origin, Origin]) -> RunningProxy:
    b, g = origins
    return await make_proxy(blue=[b.addr], green=[g.addr])


@pytest.fixture
def admin(http: aiohttp.ClientSession, proxy: RunningProxy) -> Admin:
    return Admin(http, proxy)


def idle(addr: str) -> dict[str, Any]:
    """The drain and health fields of a color that has never drained and has no health checks."""
    return {
        "streams": 0,
        "draining": False,
        "drain_deadline": None,
        "drained": {"ended": 0, "deadline": 0},
        "upstream_health": [
            {
                "upstream": addr,
                "state": "healthy",
                "ejected_until": None,
                "consecutive_failures": 0,
                "ejections": 0,
                "in_flight": 0,
                "last_check": None,
            }
        ],
        "error_window": {"window_seconds": 60, "requests": 0, "errors": 0, "error_ratio": 0.0},
    }


def file_state(proxy: RunningProxy) -> dict[str, Any]:
    return dict(json.loads(proxy.app.config.state_file.read_text()))


# ---------------------------------------------------------------------------------------------- reading


async def test_state_reports_weights_version_and_pools(admin: Admin, origins: tuple[Origin, Origin]) -> None:
    status, state, headers = await admin.call("GET", "/v1/state")
    assert status == 200
    assert headers["ETag"] == '"0"'
    b, g = origins
    assert state == {
        "weights": {"blue": 100, "green": 0},
        "active": "blue",
        "version": 0,
        "updated_at": state["updated_at"],
        "pools": {
            "blue": {"weight": 100, "upstreams": [b.addr], "in_flight": 0, **idle(b.addr)},
            "green": {"weight": 0, "upstreams": [g.addr], "in_flight": 0, **idle(g.addr)},
        },
        "routing": {"sticky": None, "preview": None},
        "last_reload": None,
        "store": {
            "backend": "file",
            "where": str(admin.proxy.app.config.state_file),
            "status": "ok",
            "error": None,
            "node": None,
            "revision": None,
        },
    }
    assert state["updated_at"].endswith("Z")
    assert datetime.fromisoformat(state["updated_at"]).timestamp() == pytest.approx(
        admin.proxy.app.switchboard.updated_at, abs=1e-6
    )


async def test_in_flight_counts_open_requests(admin: Admin, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{admin.proxy.url}/sse?n=0") as stream:
        assert await stream.content.readline() == b"data: blue 0\n"
        state = await admin.state()
        assert state["pools"]["blue"]["in_flight"] == 1
        assert state["pools"]["green"]["in_flight"] == 0


# ---------------------------------------------------------------------------------------------- changing


async def test_flip_moves_the_next_request_and_is_audited(admin: Admin, http: aiohttp.ClientSession) -> None:
    assert await color_of(http, admin.proxy) == "blue"
    status, state, headers = await admin.call("POST", "/v1/flip", {"reason": "deploy 42"})
    assert status == 200
    assert headers["ETag"] == '"1"'
    assert (state["weights"], state["active"], state["version"]) == ({"blue": 0, "green": 100}, "green", 1)
    assert await color_of(http, admin.proxy) == "green"
    [event] = await admin.events()
    assert event == {
        "kind": "switch",
        "version": 1,
        "time": state["updated_at"],
        "from_weights": {"blue": 100, "green": 0},
        "to_weights": {"blue": 0, "green": 100},
        "actor": "local",
        "reason": "deploy 42",
    }
    assert file_state(admin.proxy) == {
        "weights": {"blue": 0, "green": 100},
        "version": 1,
        "updated_at": state["updated_at"],
        "pools": None,
        "rollouts": [],
        "format": 3,
    }
    # No body at all is a flip too: back to blue, the total weight kept.
    status, state, _ = await admin.call("POST", "/v1/flip")
    assert (status, state["weights"], state["version"]) == (200, {"blue": 100, "green": 0}, 2)


async def test_flip_to_the_live_color_changes_nothing(admin: Admin) -> None:
    before = await admin.state()
    file_before = file_state(admin.proxy)
    status, state, _ = await admin.call("POST", "/v1/flip", {"to": "blue", "reason": "no-op"})
    assert status == 200
    assert state == before
    assert await admin.events() == []
    assert file_state(admin.proxy) == file_before


async def test_flip_from_a_split_needs_a_target(admin: Admin) -> None:
    await admin.call("PUT", "/v1/weights", {"blue": 50, "green": 50})
    status, body, _ = await admin.call("POST", "/v1/flip")
    assert status == 409
    assert body == {
        "error": "weights are split (blue=50, green=50): say which color to flip to",
        "detail": [],
    }
    status, state, _ = await admin.call("POST", "/v1/flip", {"to": "green", "drain_timeout": "5s"})
    assert (status, state["weights"], state["version"]) == (200, {"blue": 0, "green": 100}, 2)


async def test_weights_split_traffic_in_the_given_ratio(admin: Admin, http: aiohttp.ClientSession) -> None:
    status, state, _ = await admin.call("PUT", "/v1/weights", {"blue": 1, "green": 3, "reason": "canary"})
    assert status == 200
    assert (state["weights"], state["active"], state["version"]) == ({"blue": 1, "green": 3}, None, 1)
    assert state["pools"]["green"]["weight"] == 3
    colors = [await color_of(http, admin.proxy) for _ in range(8)]
    assert colors.count("blue") == 2
    assert colors.count("green") == 6


async def test_if_match_applies_only_at_that_version(admin: Admin) -> None:
    status, body, _ = await admin.call(
        "PUT", "/v1/weights", {"blue": 1, "green": 1}, headers={"If-Match": "5"}
    )
    assert status == 409
    assert body["error"] == "version conflict: expected version 5, current version is 0"
    assert (await admin.state())["version"] == 0
    status, state, _ = await admin.call("POST", "/v1/flip", headers={"If-Match": '"0"'})  # the ETag form
    assert (status, state["version"]) == (200, 1)
    # A stale version is refused even when the flip would change nothing.
    status, body, _ = await admin.call("POST", "/v1/flip", {"to": "green"}, headers={"If-Match": "0"})
    assert status == 409
    assert len(await admin.events()) == 1


async def test_flip_closes_idle_connections_of_the_old_color(
    admin: Admin, http: aiohttp.ClientSession
) -> None:
    assert await color_of(http, admin.proxy) == "blue"
    [blue_upstream] = admin.proxy.app.runtime.pools["blue"].upstreams
    assert len(blue_upstream.idle) == 1  # the pooled keep-alive connection of that request
    await admin.call("POST", "/v1/flip")
    assert len(blue_upstream.idle) == 0


# ---------------------------------------------------------------------------------------------- refusals

BAD_JSON = "invalid JSON body"
INVALID = "invalid request body"
UNSUPPORTED = "unsupported media type"
JSON_CT = {"Content-Type": "application/json"}


class Refusal(NamedTuple):
    method: str
    path: str
    data: bytes | None
    headers: dict[str, str]
    status: int
    error: str
    detail: tuple[str, ...]


def put(
    data: bytes | None, status: int, error: str, *detail: str, headers: dict[str, str] = JSON_CT
) -> Refusal:
    return Refusal("PUT", "/v1/weights", data, headers, status, error, detail)


def post(
    data: bytes | None, status: int, error: str, *detail: str, headers: dict[str, str] = JSON_CT
) -> Refusal:
    return Refusal("POST", "/v1/flip", data, headers, status, error, detail)


REFUSALS = [
    put(b'{"blue": 1,', 400, BAD_JSON, "line 1 column 12: Expecting property name enclosed in double quotes"),
    put(b'{"blue": 1, "blue": 2, "green": 1}', 400, BAD_JSON, "duplicate key 'blue'"),
    put(b'{"blue": NaN, "green": 1}', 400, BAD_JSON, "NaN is not valid JSON"),
    put(b"", 400, BAD_JSON, "the body is empty: expected a JSON object"),
    post(b"\xff", 400, BAD_JSON, "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    post(None, 400, "invalid If-Match header", "If-Match: must be a version like 7 or \"7\" (got 'v1')",
         headers={"If-Match": "v1"}),
    put(b"blue=1", 415, UNSUPPORTED, "Content-Type must be application/json (got 'text/plain')",
        headers={"Content-Type": "text/plain"}),
    put(None, 415, UNSUPPORTED, "Content-Type must be application/json (got 'none')", headers={}),
    post(b'{"to": "green"}', 415, UNSUPPORTED, "Content-Type must be application/json (got 'text/html')",
         headers={"Content-Type": "text/html"}),
    put(b'{"blue": -1, "green": 10}', 422, INVALID, "weights.blue: must be >= 0 (got -1)"),
    put(b'{"blue": 0, "green": 0}', 422, INVALID,
        'weights: at least one color needs a weight > 0 (got {"blue": 0, "green": 0})'),
    put(b'{"blue": 90}', 422, INVALID, "weights.green: required"),
    put(b'{"blue": "90", "green": 1.5}', 422, INVALID,
        'weights.blue: must be an integer (got "90")', "weights.green: must be an integer (got 1.5)"),
    put(b'{"blue": true, "green": 1}', 422, INVALID, "weights.blue: must be an integer (got true)"),
    put(b'{"blue": 1, "green": 1, "red": 1}', 422, INVALID, "weights.red: unknown key (got 1)"),
    put(b"[1, 2]", 422, INVALID, "weights: must be a JSON object (got [1, 2])"),
    post(b'{"to": "red"}', 422, INVALID, "flip.to: must be 'blue' or 'green' (got \"red\")"),
    post(b'{"to": "green", "drain_timeout": -1}', 422, INVALID, "flip.drain_timeout: must be > 0 (got -1)"),
    post(b'{"drain_timeout": "soon"}', 422, INVALID,
         'flip.drain_timeout: not a duration like 30, 30s, 250ms, 2m (got "soon")'),
    post(b'{"reason": "a\\nb"}', 422, INVALID,
         'flip.reason: must not contain control characters (got "a\\nb")'),
    post(b'{"reason": ""}', 422, INVALID, 'flip.reason: must not be empty (got "")'),
    post(b"null", 422, INVALID, "flip: must be a JSON object (got null)"),
    Refusal("GET", "/v1/nope", None, {}, 404, "not found", ("GET /v1/nope",)),
    Refusal("DELETE", "/v1/state", None, {}, 405, "method not allowed",
            ("DELETE /v1/state: allowed GET, HEAD",)),
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS, ids=[f"{r.status}-{r.method}-{i}" for i, r in enumerate(REFUSALS)])
async def test_refused_calls_change_nothing(admin: Admin, case: Refusal) -> None:
    before, file_before = await admin.state(), file_state(admin.proxy)
    status, body, headers = await admin.call(case.method, case.path, data=case.data, headers=case.headers)
    assert (status, body) == (case.status, {"error": case.error, "detail": list(case.detail)})
    if status == 405:
        assert headers["Allow"] == "GET,HEAD"
    assert await admin.state() == before
    assert file_state(admin.proxy) == file_before
    assert await admin.events() == []


async def test_failed_persist_answers_500_and_changes_nothing(
    make_proxy: MakeProxy, origins: tuple[Origin, Origin], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    b, g = origins
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    proxy = await make_proxy(
        blue=[b.addr],
        green=[g.addr],
        state_file=str(state_dir / "state.json"),
        events_file=str(tmp_path / "events.jsonl"),  # outside the directory about to break
    )
    admin = Admin(http, proxy)
    before = await admin.state()
    (state_dir / "state.json").unlink()
    state_dir.rmdir()
    state_dir.write_text("a file where the state directory was: every write fails, even as root")
    status, body, _ = await admin.call("PUT", "/v1/weights", {"blue": 1, "green": 1})
    assert status == 500
    assert body["error"] == "could not save the change; nothing was changed"
    assert body["detail"] == [f"state file {state_dir / 'state.json'}: cannot write it: Not a directory"]
    assert await admin.state() == before
    assert await admin.events() == []
    assert await color_of(http, proxy) == "blue"


# ---------------------------------------------------------------------------------------------- auth

ENDPOINTS = [
    ("GET", "/v1/state", None),
    ("POST", "/v1/flip", {"to": "blue"}),
    ("PUT", "/v1/weights", {"blue": 100, "green": 0}),
    ("GET", "/v1/events", None),
    ("GET", "/v1/openapi.json", None),
    ("GET", "/v1/unknown", None),  # no token: 401 before 404, so routes can't be probed
]


@pytest.fixture
async def guarded(make_proxy: MakeProxy, origins: tuple[Origin, Origin]) -> RunningProxy:
    b, g = origins
    return await make_proxy(
        blue=[b.addr],
        green=[g.addr],
        admin={"listen": "127.0.0.1:0", "tokens": {"ops": TOKEN_OPS, "ci": TOKEN_CI}},
    )


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token-0123456789",
        f"Basic {TOKEN_OPS}",
        f"Bearer {TOKEN_OPS}x",
        "Bearer",
        TOKEN_OPS,
    ],
)
async def test_every_v1_call_needs_a_valid_token(
    guarded: RunningProxy,
    http: aiohttp.ClientSession,
    endpoint: tuple[str, str, Any],
    authorization: str | None,
) -> None:
    method, path, body = endpoint
    headers = {} if authorization is None else {"Authorization": authorization}
    status, answer, got_headers = await Admin(http, guarded).call(method, path, body, headers=headers)
    assert status == 401
    assert answer == {
        "error": "unauthorized",
        "detail": ["send Authorization: Bearer <token> with a token from admin.tokens"],
    }
    assert got_headers["WWW-Authenticate"] == 'Bearer realm="bgproxy"'
    assert guarded.app.switchboard.version == 0


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS[:-1])
async def test_every_v1_call_works_with_a_token(
    guarded: RunningProxy, http: aiohttp.ClientSession, method: str, path: str, body: Any
) -> None:
    status, _, _ = await Admin(http, guarded, TOKEN_CI).call(method, path, body)
    assert status == 200


async def test_events_name_the_token_never_its_secret(
    guarded: RunningProxy, http: aiohttp.ClientSession
) -> None:
    await Admin(http, guarded, TOKEN_OPS).call("POST", "/v1/flip", {"reason": "r1"})
    await Admin(http, guarded, TOKEN_CI).call("PUT", "/v1/weights", {"blue": 1, "green": 1})
    status, body, _ = await Admin(http, guarded, TOKEN_OPS).call("GET", "/v1/events")
    assert status == 200
    assert [e["actor"] for e in body["events"]] == ["ops", "ci"]
    text = json.dumps(body)
    assert TOKEN_OPS not in text
    assert TOKEN_CI not in text


async def test_without_tokens_the_caller_is_local_whatever_it_sends(admin: Admin) -> None:
    status, _, _ = await admin.call(
        "POST", "/v1/flip", headers={"Authorization": "Bearer anything-at-all-here"}
    )
    assert status == 200
    assert [e["actor"] for e in await admin.events()] == ["local"]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "[::]", "admin.example"])
def test_refuses_a_non_loopback_admin_listener_without_tokens(tmp_path: Path, host: str) -> None:
    path = tmp_path / "bgproxy.yaml"
    path.write_text(
        json.dumps(
            {
                "pools": {"blue": {"upstreams": []}, "green": {"upstreams": []}},
                "admin": {"listen": f"{host}:0"},
            }
        )
    )
    with pytest.raises(
        ConfigError, match=r"admin\.listen: .* is not a loopback address and admin\.tokens is empty"
    ):
        App(load_config(path, environ={}))
    App(load_config(path, environ={"BGPROXY_ADMIN_TOKEN": TOKEN_OPS}))  # with a token it may listen anywhere
    for loopback in ("127.0.0.2:0", "[::1]:0", "localhost:0"):
        App(load_config(path, environ={"BGPROXY_ADMIN_LISTEN": loopback}))


# ---------------------------------------------------------------------------------------------- concurrency


async def test_concurrent_changes_get_one_gapless_version_sequence(admin: Admin) -> None:
    async def change(i: int) -> tuple[int, Any, CIMultiDict[str]]:
        if i % 2:
            return await admin.call("POST", "/v1/flip", {"to": "green" if i % 4 == 1 else "blue"})
        return await admin.call(
            "PUT", "/v1/weights", {"blue": 100 + i, "green": i + 1, "reason": f"task {i}"}
        )

    answers = await asyncio.gather(*(change(i) for i in range(20)))
    assert [status for status, _, _ in answers] == [200] * 20
    events = await admin.events()
    final = await admin.state()
    assert [e["version"] for e in events] == list(range(1, final["version"] + 1))
    assert final["version"] >= 10  # every weight change is distinct from every other state
    for earlier, later in itertools.pairwise(events):
        assert later["from_weights"] == earlier["to_weights"]  # no change saw a half-applied other
    # Each answer shows the state its own change left, whatever ran next.
    for i, (_, body, _) in enumerate(answers):
        if i % 2:
            assert body["active"] == ("green" if i % 4 == 1 else "blue")
        else:
            assert body["weights"] == {"blue": 100 + i, "green": i + 1}
            assert events[body["version"] - 1]["reason"] == f"task {i}"
    assert events[-1]["to_weights"] == final["weights"]
    assert file_state(admin.proxy) == {
        "weights": final["weights"],
        "version": final["version"],
        "updated_at": final["updated_at"],
        "pools": None,
        "rollouts": [],
        "format": 3,
    }
    loaded = FileStateBackend(admin.proxy.app.config.state_file).load()
    assert loaded is not None
    assert loaded.version == admin.proxy.app.switchboard.version


async def test_concurrent_if_match_lets_exactly_one_win(admin: Admin) -> None:
    answers = await asyncio.gather(
        *(
            admin.call("PUT", "/v1/weights", {"blue": i + 1, "green": 1}, headers={"If-Match": "0"})
            for i in range(20)
        )
    )
    assert sorted(status for status, _, _ in answers) == [200] + [409] * 19
    [winner] = [body for status, body, _ in answers if status == 200]
    assert await admin.state() == winner
    assert winner["version"] == 1
    assert len(await admin.events()) == 1
    assert file_state(admin.proxy)["weights"] == winner["weights"]


async def test_flip_moves_the_very_next_request_on_a_kept_alive_connection(admin: Admin) -> None:
    connections_opened = 0

    async def opened(*_: object) -> None:
        nonlocal connections_opened
        connections_opened += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(opened)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as client:
        assert [await color_of(client, admin.proxy) for _ in range(2)] == ["blue", "blue"]
        status, _, _ = await admin.call("POST", "/v1/flip")
        assert status == 200
        assert await color_of(client, admin.proxy) == "green"
    assert connections_opened == 1  # all three requests went over the one kept-alive connection
