"""Sticky sessions and preview routing end to end: real sockets, real clients (raw, aiohttp's cookie
jar, curl), decisions from core, applied by the data plane's route()."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from rawclient import RawClient
from upstreams import fast_origin, origin
from waiting import eventually

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
KEY = "sticky-test-key-0123456789"


def pinned_get(cookie: str) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: t\r\nCookie: " + cookie.encode() + b"\r\n\r\n"


async def new_user(port: int, requests: int = 20) -> tuple[str, str]:
    """One user: a first request without a cookie, then requests-1 more with the cookie it got.

    Returns (color, cookie); fails if any later request changed color or was given a new cookie.
    """
    client = await RawClient.connect(port)
    try:
        await client.send(GET)
        [first] = await client.responses()
        set_cookie = first.header("Set-Cookie")
        assert set_cookie is not None and "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
        cookie, color = set_cookie.split(";")[0], first.header("X-Color")
        assert color is not None
        if requests > 1:
            await client.send(pinned_get(cookie) * (requests - 1))
            rest = await client.responses(requests - 1)
            assert [(r.header("X-Color"), r.header("Set-Cookie")) for r in rest] == [(color, None)] * (
                requests - 1
            )
        return color, cookie
    finally:
        await client.close()


async def test_1000_new_users_split_exactly_90_10_and_each_keeps_its_color(make_proxy) -> None:
    async with fast_origin("blue") as blue, fast_origin("green") as green:
        proxy = await make_proxy([blue], [green], weights=(90, 10), sticky={"key": KEY})
        colors: Counter[str] = Counter()
        for _ in range(10):  # 100 users at a time, 20 requests each
            users = await asyncio.gather(*(new_user(proxy.port) for _ in range(100)))
            colors.update(color for color, _ in users)
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.admin_url}/v1/state") as r:
            routing = (await r.json())["routing"]
            async with s.get(f"{proxy.admin_url}/metrics") as m:
                metrics = await m.text()
    assert colors == {"blue": 900, "green": 100}
    assert routing["sticky"]["assignments"] == {"blue": 900, "green": 100}
    assert 'bgproxy_sticky_assignments_total{color="green"} 100.0' in metrics
    assert KEY not in json.dumps(routing)


async def test_aiohttp_cookie_jar_users_stay_on_their_color(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr], weights=(50, 50), sticky={"key": KEY})
        seen = []
        for _ in range(6):
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
                colors = []
                for _ in range(5):
                    async with session.get(proxy.url + "/echo") as resp:
                        colors.append(resp.headers["X-Color"])
                assert len(set(colors)) == 1
                seen.append(colors[0])
    assert Counter(seen) == {"blue": 3, "green": 3}


async def test_curl_with_a_cookie_jar_stays_on_its_color(make_proxy, tmp_path: Path) -> None:
    jar = tmp_path / "jar.txt"

    async def curl() -> str:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-s", "-D", "-", "-o", "/dev/null", "-c", str(jar), "-b", str(jar), "--noproxy", "*",
            f"http://127.0.0.1:{proxy.port}/echo",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        return out.decode()

    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr], weights=(1, 1), sticky={"key": KEY})
        first = await curl()
        color = next(line.split(": ")[1].strip() for line in first.splitlines() if line.startswith("X-Color"))
        later = [await curl() for _ in range(4)]
    assert "Set-Cookie: bgproxy-color=" in first
    assert all(f"X-Color: {color}" in head and "Set-Cookie" not in head for head in later)


async def test_follow_moves_pinned_users_to_the_live_color_at_once(make_proxy) -> None:
    async with fast_origin("blue") as blue, fast_origin("green") as green:
        proxy = await make_proxy([blue], [green], weights=(50, 50), sticky={"key": KEY})
        users = [await new_user(proxy.port, 1) for _ in range(2)]  # 50/50: one of each
        cookie = next(cookie for color, cookie in users if color == "green")
        await proxy.app.controller.flip("blue", actor="test")
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(pinned_get(cookie) * 2)
            moved, again = await client.responses(2)
        finally:
            await client.close()
    assert moved.header("X-Color") == "blue"
    rewritten = moved.header("Set-Cookie")
    assert rewritten is not None and rewritten.startswith("bgproxy-color=blue.")
    assert again.header("X-Color") == "blue"


async def test_drain_keeps_pinned_users_until_the_deadline_then_moves_them(make_proxy) -> None:
    async with fast_origin("blue") as blue, fast_origin("green") as green:
        proxy = await make_proxy(
            [blue], [green], weights=(50, 50), sticky={"key": KEY, "on_zero_weight": "drain"}
        )
        users = [await new_user(proxy.port, 1) for _ in range(2)]
        cookie = next(cookie for color, cookie in users if color == "green")
        await proxy.app.controller.flip("blue", actor="test", drain_timeout=1.0)

        async def ask(request: bytes) -> tuple[str | None, str | None]:
            client = await RawClient.connect(proxy.port)
            try:
                await client.send(request)
                [resp] = await client.responses()
            finally:
                await client.close()
            return resp.header("X-Color"), resp.header("Set-Cookie")

        assert await ask(pinned_get(cookie)) == ("green", None)  # stays while green drains
        new_color, _ = await ask(GET)
        assert new_color == "blue"  # new users only go where the weight is
        await eventually(lambda: proxy.app.switchboard.drain_of("green") is None, 3)
        color, rewritten = await ask(pinned_get(cookie))
    assert color == "blue" and rewritten is not None and rewritten.startswith("bgproxy-color=blue.")


async def test_a_cookie_the_upstream_sets_itself_is_left_alone(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr], sticky={"key": KEY})
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/headers-out", params={"Set-Cookie": "bgproxy-color=mine"}) as r:
                ours = r.headers.getall("Set-Cookie")
            async with s.get(proxy.url + "/headers-out", params={"Set-Cookie": "other=1"}) as r:
                both = r.headers.getall("Set-Cookie")
    assert ours == ["bgproxy-color=mine"]
    assert len(both) == 2 and both[0] == "other=1" and both[1].startswith("bgproxy-color=blue.")


@pytest.mark.parametrize(
    ("preview", "headers", "color"),
    [
        ({}, {"X-Bgproxy-Color": "green"}, "green"),
        ({}, {"Cookie": "bgproxy-preview=green"}, "green"),
        ({}, {"X-Bgproxy-Color": "purple"}, "blue"),
        ({"allow_from": ["10.0.0.0/8"]}, {"X-Bgproxy-Color": "green"}, "blue"),  # not from there
        ({"token": "preview-token-0123456789"}, {"X-Bgproxy-Color": "green"}, "blue"),  # no token
        (
            {"token": "preview-token-0123456789"},
            {"X-Bgproxy-Color": "green", "X-Bgproxy-Preview-Token": "preview-token-0123456789"},
            "green",
        ),
        (
            {"token": "preview-token-0123456789"},
            {"X-Bgproxy-Color": "green", "X-Bgproxy-Preview-Token": "preview-token-wrong-0000"},
            "blue",
        ),
    ],
)
async def test_preview_reaches_an_idle_color_only_when_allowed(
    make_proxy, preview: dict[str, object], headers: dict[str, str], color: str
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr], weights=(100, 0), preview=preview)
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/echo", headers=headers) as r:
                assert r.status == 200
                echo = await r.json()
            async with s.get(f"{proxy.admin_url}/metrics") as m:
                metrics = await m.text()
            async with s.get(f"{proxy.admin_url}/v1/state") as st:
                routing = (await st.json())["routing"]
    assert echo["color"] == color
    assert all(name.lower() != "x-bgproxy-preview-token" for name, _ in echo["headers"])  # never forwarded
    route = "preview" if color == "green" else "live"
    assert f'bgproxy_requests_total{{code="200",color="{color}",route="{route}"}} 1.0' in metrics
    assert routing["preview"]["token_required"] is ("token" in preview)
    assert "preview-token" not in json.dumps(routing)
