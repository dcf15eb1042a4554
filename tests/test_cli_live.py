"""`bgproxy pool ...` and `bgproxy reload` against a real bgproxy; main() runs in a thread."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import yaml
from stores import StoreServer, make_store
from upstreams import closed_port, origin
from waiting import eventually

from bgproxy.cli import main

pytestmark = pytest.mark.timeout(20)


async def cli(capsys: pytest.CaptureFixture[str], proxy: Any, *argv: str) -> tuple[int, str, str]:
    status = await asyncio.to_thread(main, [*argv, "--admin", proxy.admin_url])
    out, err = capsys.readouterr()
    return status, out, err


async def test_pool_list_add_remove(make_proxy, capsys: pytest.CaptureFixture[str]) -> None:
    async with origin("blue") as blue, origin("green") as g1, origin("green") as g2:
        proxy = await make_proxy([blue.addr], [g1.addr])
        status, out, _ = await cli(capsys, proxy, "pool", "list")
        assert status == 0 and out.splitlines() == [
            f"blue: {blue.addr}  (version 0)",
            f"green: {g1.addr}  (version 0)",
        ]
        status, out, _ = await cli(capsys, proxy, "pool", "add", "green", g2.addr, "--reason", "scale out")
        assert status == 0 and out.splitlines() == [
            f"green: {g1.addr}, {g2.addr}  (version 1)",
            f"  added {g2.addr}",
        ]
        assert proxy.app.audit.events()[-1]["reason"] == "scale out"
        status, out, _ = await cli(capsys, proxy, "pool", "remove", "green", g1.addr, "--if-match", "1")
        assert status == 0 and f"removed {g1.addr}" in out
        status, _, err = await cli(capsys, proxy, "pool", "remove", "green", g1.addr)
        assert status == 1 and "is not an upstream of green" in err
        dead = f"127.0.0.1:{closed_port()}"
        status, _, err = await cli(capsys, proxy, "pool", "add", "blue", dead)
        assert status == 1 and "did not answer the probe" in err
        status, _, err = await cli(capsys, proxy, "pool", "remove", "blue", blue.addr)
        assert status == 1 and "weight 100" in err
        status, out, _ = await cli(capsys, proxy, "pool", "list", "green", "--json")
        assert status == 0 and json.loads(out)["upstreams"] == [g2.addr]


async def test_reload(make_proxy, capsys: pytest.CaptureFixture[str]) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        config = yaml.safe_load(proxy.config_path.read_text())
        config["drain_timeout"] = 9
        config["metrics"] = {"error_window": 30}
        proxy.config_path.write_text(yaml.safe_dump(config))
        status, out, _ = await cli(capsys, proxy, "reload")
        assert status == 0
        assert out.splitlines()[1:] == ["applies at the next start only: metrics"]
        assert "changed drain_timeout, metrics" in out
        proxy.config_path.write_text("pools: []\n")
        status, _, err = await cli(capsys, proxy, "reload")
        assert status == 1 and "the config was not reloaded" in err and "pools" in err
        assert proxy.app.switchboard.drain_timeout == 9


async def test_status_watch_prints_each_change_from_the_event_stream(
    make_proxy, capsys: pytest.CaptureFixture[str]
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        watching = asyncio.create_task(
            asyncio.to_thread(main, ["status", "--watch", "--json", "--admin", proxy.admin_url])
        )
        seen: list[dict[str, Any]] = []

        def states() -> list[dict[str, Any]]:
            seen.extend(json.loads(line) for line in capsys.readouterr().out.splitlines())
            return seen

        await eventually(lambda: len(states()) >= 1)
        await proxy.app.controller.flip("green", actor="test")
        await eventually(lambda: states()[-1]["active"] == "green")
        await proxy.app.stop()  # the stream ends with the process: the command says so
        assert await asyncio.wait_for(watching, 10) == 2
    assert [s["version"] for s in seen][:1] == [0] and seen[-1]["version"] == 1
    assert "closed the stream" in capsys.readouterr().err


async def test_flip_wait_and_fleet_on_a_shared_store(
    make_proxy, store_server: StoreServer, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        url = store_server.url(f"/cli-{tmp_path.name}/")
        one = await make_proxy(
            [blue.addr], [green.addr], state_store=url, node_name="cli-one", flip_probe="off"
        )
        await make_proxy([blue.addr], [green.addr], state_store=url, node_name="cli-two", flip_probe="off")

        status, out, _ = await cli(capsys, one, "flip", "--to", "green", "--wait")
        assert status == 0, out
        assert "every live node runs version 1" in out
        status, out, _ = await cli(capsys, one, "fleet")
        assert status == 0
        assert f"store: {store_server.kind}" in out and "(ok)" in out
        assert "cli-one" in out and "cli-two" in out and " *" in out  # the leader is marked

        # A node that reports itself but never applies anything: --wait names it and exits 1.
        ghost = make_store(url)
        try:
            await ghost.beat("cli-ghost", {"node": "cli-ghost", "version": 0, "seen": 0.0}, 5.0)
            status, out, _ = await cli(
                capsys, one, "flip", "--to", "blue", "--wait", "--wait-timeout", "200ms"
            )
        finally:
            await ghost.close()
        assert status == 1, out
        assert "not yet running version 2 after" in out and "cli-ghost" in out
