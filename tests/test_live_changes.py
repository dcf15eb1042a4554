"""Changing a running bgproxy: pool membership through the API, and config reload (API and SIGHUP).

Real origins, real traffic through the proxy, the real admin API; a real process for kill -9 and
SIGHUP. Traffic is bounded, and waits poll state instead of sleeping for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
import yaml
from process import BgproxyProcess
from upstreams import closed_port, origin
from waiting import eventually


async def api(url: str, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, url + path, json=body, headers=headers) as r:
        return r.status, await r.json()


class Traffic:
    """Requests through the proxy, 4 at a time, until stopped; counts failures and who answered."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.failed: list[str] = []
        self.answered_by: dict[str, int] = {}
        self._stop = asyncio.Event()

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set() and sum(self.answered_by.values()) < 20_000:
            try:
                async with session.get(f"{self.url}/echo") as r:
                    await r.read()
                    if r.status != 200:
                        self.failed.append(f"HTTP {r.status}")
                    upstream = r.headers.get("X-Upstream", "?")
                    self.answered_by[upstream] = self.answered_by.get(upstream, 0) + 1
            except aiohttp.ClientError as exc:
                self.failed.append(repr(exc))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Traffic]:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(self._worker(session)) for _ in range(4)]
            try:
                yield self
            finally:
                self._stop.set()
                await asyncio.gather(*tasks)

    async def served(self, n: int) -> None:
        """Wait until ``n`` more requests were answered."""
        target = sum(self.answered_by.values()) + n
        await eventually(lambda: sum(self.answered_by.values()) >= target, timeout=20)


def pool(proxy: Any, color: str) -> list[str]:
    return proxy.app.membership.members(color)


async def test_adding_and_removing_upstreams_under_load_fails_no_request(make_proxy) -> None:
    async with origin("blue", name="b1") as b1, origin("blue", name="b2") as b2, origin("green") as green:
        proxy = await make_proxy([b1.addr], [green.addr])
        async with Traffic(proxy.url).running() as traffic:
            await traffic.served(100)
            status, body = await api(
                proxy.admin_url, "POST", "/v1/pools/blue/upstreams", {"upstream": b2.addr}
            )
            assert status == 200 and body["added"] == [b2.addr] and body["upstreams"] == [b1.addr, b2.addr]
            await traffic.served(200)
            assert traffic.answered_by.get("b2", 0) > 0  # the new one takes traffic
            status, body = await api(proxy.admin_url, "DELETE", f"/v1/pools/blue/upstreams/{b1.addr}")
            assert status == 200 and body["removed"] == [b1.addr] and body["upstreams"] == [b2.addr]
            before = traffic.answered_by.get("b1", 0)
            await traffic.served(200)
            after = traffic.answered_by.get("b1", 0)
        assert traffic.failed == []
        assert after - before <= 4  # at most the requests already in flight when it was removed
        events = proxy.app.audit.events()
        assert [(e["kind"], e["added"], e["removed"]) for e in events] == [
            ("pool", [b2.addr], []),
            ("pool", [], [b1.addr]),
        ]
        assert [e["version"] for e in events] == [1, 2]


async def test_refusals_change_nothing(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        url = proxy.admin_url
        dead = f"127.0.0.1:{closed_port()}"
        status, body = await api(url, "POST", "/v1/pools/blue/upstreams", {"upstream": dead})
        assert status == 409 and dead in body["error"] and "probe" in body["error"]
        status, body = await api(url, "POST", "/v1/pools/blue/upstreams", {"upstream": blue.addr})
        assert status == 409 and "already" in body["error"]
        status, body = await api(url, "DELETE", f"/v1/pools/blue/upstreams/{blue.addr}")
        assert status == 409 and "weight 100" in body["error"]  # the live color's last upstream
        status, body = await api(url, "DELETE", f"/v1/pools/blue/upstreams/{dead}")
        assert status == 404
        status, body = await api(url, "POST", "/v1/pools/blue/upstreams", {"upstream": "nohost"})
        assert status == 422 and "has no port" in body["detail"][0]
        status, body = await api(url, "PUT", "/v1/pools/red/upstreams", {"upstreams": []})
        assert status == 404
        status, body = await api(
            url, "PUT", "/v1/pools/green/upstreams", {"upstreams": []}, **{"If-Match": "7"}
        )
        assert status == 409 and "version" in body["error"]
        assert proxy.app.switchboard.version == 0 and pool(proxy, "blue") == [blue.addr]
        assert proxy.app.audit.events() == []
        # green has no weight: emptying it is allowed; force adds an upstream that does not answer
        status, body = await api(
            url, "PUT", "/v1/pools/green/upstreams", {"upstreams": []}, **{"If-Match": "0"}
        )
        assert status == 200 and body["upstreams"] == [] and body["version"] == 1
        status, _ = await api(url, "POST", "/v1/pools/green/upstreams", {"upstream": dead, "force": True})
        assert status == 200 and pool(proxy, "green") == [dead]


async def test_a_removed_upstreams_websocket_drains_then_gets_1001(make_proxy) -> None:
    async with origin("blue", name="b1") as b1, origin("blue", name="b2") as b2, origin("green") as green:
        proxy = await make_proxy([b1.addr, b2.addr], [green.addr], drain_timeout=0.5)
        async with proxy.websocket() as ws:
            await ws.send("whoami")
            assert await ws.recv() == "blue"
            # which upstream holds it: the one with an open exchange
            active = list(proxy.app.runtime.active["blue"])
            assert len(active) == 1 and active[0].upstream is not None
            held = active[0].upstream.addr
            loop = asyncio.get_running_loop()
            removed_at = loop.time()
            status, _ = await api(proxy.admin_url, "DELETE", f"/v1/pools/blue/upstreams/{held}")
            assert status == 200
            await ws.send("still here")
            assert await ws.recv() == "still here"  # in-flight streams go on until the deadline
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1001
            assert 0.4 < loop.time() - removed_at < 4


async def test_a_bad_reload_keeps_the_running_config_and_says_why(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        text = proxy.config_path.read_text()
        proxy.config_path.write_text(text + "drain_timeout: soon\n")
        status, body = await api(proxy.admin_url, "POST", "/v1/reload")
        assert status == 422
        assert body["detail"] == [
            f"{proxy.config_path}: drain_timeout: not a duration like 30, 30s, 250ms, 2m (got 'soon')"
        ]
        last = proxy.app.last_reload
        assert last is not None and not last.ok and "drain_timeout" in last.errors[0]
        assert proxy.app.switchboard.drain_timeout == 30.0  # unchanged
        status, state = await api(proxy.admin_url, "GET", "/v1/state")
        assert state["last_reload"]["ok"] is False and "drain_timeout" in state["last_reload"]["errors"][0]


async def test_a_good_reload_changes_a_timeout_for_new_requests_only(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])  # upstream_header: 2s
        async with aiohttp.ClientSession() as s:
            slow = asyncio.ensure_future(s.get(f"{proxy.url}/slow?delay=1"))
            await eventually(lambda: proxy.app.runtime.active["blue"])
            config = yaml.safe_load(proxy.config_path.read_text())
            config["timeouts"]["upstream_header"] = "300ms"
            proxy.config_path.write_text(yaml.safe_dump(config))
            status, body = await api(proxy.admin_url, "POST", "/v1/reload")
            assert status == 200 and body["changed"] == ["timeouts"], body
            async with s.get(f"{proxy.url}/slow?delay=1") as new:
                assert new.status == 504  # the new timeout
            async with await slow as old:
                assert old.status == 200  # started under the old one, and kept it


async def test_reload_applies_the_most_recent_intent_to_pools(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as g1, origin("green") as g2:
        proxy = await make_proxy([blue.addr], [g1.addr])
        await api(proxy.admin_url, "POST", "/v1/pools/green/upstreams", {"upstream": g2.addr})
        config = yaml.safe_load(proxy.config_path.read_text())
        config["drain_timeout"] = 12
        proxy.config_path.write_text(yaml.safe_dump(config))
        status, body = await api(proxy.admin_url, "POST", "/v1/reload")
        assert status == 200 and body["pools"] == {}  # the file left green as it was: the API's change stays
        assert pool(proxy, "green") == [g1.addr, g2.addr]
        assert proxy.app.switchboard.drain_timeout == 12
        config["pools"]["green"]["upstreams"] = [g2.addr]
        proxy.config_path.write_text(yaml.safe_dump(config))
        status, body = await api(proxy.admin_url, "POST", "/v1/reload")
        assert status == 200 and body["pools"] == {"green": [g2.addr]}  # the file changed green: it wins
        assert pool(proxy, "green") == [g2.addr]
        assert [e["kind"] for e in proxy.app.audit.events()] == ["pool", "reload", "pool", "reload"]


async def test_membership_survives_kill_9_and_sighup_reloads(tmp_path: Path) -> None:
    async with origin("blue") as blue, origin("green") as g1, origin("green") as g2:
        proc = BgproxyProcess(tmp_path, blue.addr, g1.addr, shutdown_timeout=5)
        async with aiohttp.ClientSession() as session:
            await proc.start(session)
            try:
                status, _ = await api(
                    proc.admin_url, "POST", "/v1/pools/green/upstreams", {"upstream": g2.addr}
                )
                assert status == 200
                proc.proc.kill()  # type: ignore[union-attr]
                proc.proc.wait(10)  # type: ignore[union-attr]
                await proc.start(session)
                status, body = await api(proc.admin_url, "GET", "/v1/pools/green/upstreams")
                assert body["upstreams"] == [g1.addr, g2.addr] and body["version"] == 1
                status, events = await api(proc.admin_url, "GET", "/v1/events")
                assert [e["kind"] for e in events["events"]] == ["pool"]  # the audit log survived too
                config = yaml.safe_load(proc.config.read_text())
                config["drain_timeout"] = 7
                proc.config.write_text(yaml.safe_dump(config))
                proc.signal(signal.SIGHUP)
                for _ in range(200):
                    _, state = await api(proc.admin_url, "GET", "/v1/state")
                    if state["last_reload"] is not None:
                        break
                    await asyncio.sleep(0.02)
                assert state["last_reload"]["ok"] is True and state["last_reload"]["changed"] == [
                    "drain_timeout"
                ]
                assert proc.alive()
            finally:
                proc.kill()


async def test_a_takeover_under_load_drops_no_request(tmp_path: Path) -> None:
    """`bgproxy run --takeover`: the new process takes the listening sockets, the old one drains and exits."""
    runtime_socket = tmp_path / "runtime.sock"
    async with origin("blue") as blue, origin("green") as green:
        old = BgproxyProcess(
            tmp_path, blue.addr, green.addr, shutdown_timeout=5, extra={"runtime_socket": str(runtime_socket)}
        )
        new = copy.copy(old)
        async with aiohttp.ClientSession() as session:
            await old.start(session)
            try:
                assert oct(runtime_socket.stat().st_mode & 0o777) == "0o600"
                await api(old.admin_url, "PUT", "/v1/weights", {"blue": 50, "green": 50})
                async with Traffic(old.url).running() as traffic:
                    await traffic.served(200)
                    await new.start(session, "--takeover", str(runtime_socket))
                    assert await old.wait_exit(10) == 0, old.log_text()
                    await traffic.served(300)  # all of these by the new process
                assert traffic.failed == []
                status, state = await api(new.admin_url, "GET", "/v1/state")
                assert status == 200 and state["weights"] == {"blue": 50, "green": 50}  # via the state file
                assert runtime_socket.exists()  # the new one listens for the next upgrade
            finally:
                old.kill()
                new.kill()


async def test_concurrent_membership_changes_compose(make_proxy) -> None:
    """Each change is planned from the live list under the lock: none undoes another."""
    async with (
        origin("blue", name="b1") as b1,
        origin("blue", name="b2") as b2,
        origin("blue", name="b3") as b3,
        origin("green") as green,
    ):
        proxy = await make_proxy([b1.addr], [green.addr])
        url = proxy.admin_url
        answers = await asyncio.gather(
            api(url, "POST", "/v1/pools/blue/upstreams", {"upstream": b2.addr}),
            api(url, "POST", "/v1/pools/blue/upstreams", {"upstream": b3.addr}),
        )
        assert [status for status, _ in answers] == [200, 200]
        assert sorted(pool(proxy, "blue")) == sorted([b1.addr, b2.addr, b3.addr])
        answers = await asyncio.gather(
            api(url, "DELETE", f"/v1/pools/blue/upstreams/{b1.addr}"),
            api(url, "DELETE", f"/v1/pools/blue/upstreams/{b2.addr}"),
        )
        assert [status for status, _ in answers] == [200, 200]
        assert pool(proxy, "blue") == [b3.addr]
        assert all(up.available for up in proxy.app.runtime.pools["blue"].upstreams)
        saved = json.loads(proxy.app.config.state_file.read_text())
        assert saved["pools"]["blue"]["upstreams"] == [b3.addr] and saved["version"] == 4
