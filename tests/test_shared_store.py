"""The SharedStore contract, against a real Redis and a real etcd (stores.py runs them).

Every test here runs once per backend: the fleet must not be able to tell them apart. Times are
measured against the clock but asserted loosely (a slow CI box must not fail them), and the
measured values are printed for ``pytest -s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from stores import (  # conftest loads it first
    Certs,
    EtcdServer,
    OpenStore,
    RedisServer,
    StoreServer,
    TlsRedisServer,
    make_store,
)

from bgproxy.config import Config, load_config
from bgproxy.control import etcd_store, redis_store
from bgproxy.control.etcd_store import EtcdStore
from bgproxy.control.redis_store import RedisStore
from bgproxy.control.shared import (
    SharedStore,
    StoreConflict,
    StoreTLS,
    StoreUnavailable,
    encode_document,
)
from bgproxy.control.state import PersistedState
from bgproxy.control.stores import open_store
from bgproxy.core.weights import Weights

TTL = 1.0  # the shortest TTL etcd grants (with the test server's election timeout; see stores.py)


def document(blue: int, version: int, node: str = "a") -> str:
    return encode_document(PersistedState(Weights(blue, 100 - blue), version, time.time()), {"node": node})


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Poll ``check`` until true; the seconds it took (fails the test after ``seconds``)."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > seconds:
            pytest.fail(f"not so within {seconds} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


class Watch:
    """A store's changes() run from a task, so a test can wait for its next yield or its end."""

    def __init__(self, store: SharedStore) -> None:
        self.changes = store.changes()
        self.task: asyncio.Future[None] | None = None

    def next(self) -> asyncio.Future[None]:
        """The next yield, as a future (start it before the write it should hear of)."""
        self.task = asyncio.ensure_future(anext(self.changes))
        return self.task

    def end(self) -> asyncio.Future[None]:
        """Iterating to the end (a store may yield once more as its connection drops)."""

        async def drain() -> None:
            async for _ in self.changes:
                pass

        self.task = asyncio.ensure_future(drain())
        return self.task

    async def close(self) -> None:
        """Stop now, closing its connection, whatever state a failed test left it in."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.task is not None:
            with contextlib.suppress(BaseException):
                await self.task
        aclose = getattr(self.changes, "aclose", None)
        if aclose is not None:
            await aclose()


@contextlib.asynccontextmanager
async def watching(store: SharedStore) -> AsyncIterator[Watch]:
    """A running watch, past its first yield (from there on every write must reach it)."""
    watch = Watch(store)
    try:
        await asyncio.wait_for(watch.next(), 3)
        yield watch
    finally:
        await watch.close()


async def heard(watch: Watch, write: Awaitable[int]) -> tuple[int, float]:
    """Do ``write`` and wait for the watch to hear of it: (its revision, seconds from its start)."""
    waiting = watch.next()
    start = time.monotonic()
    revision = await write
    await asyncio.wait_for(waiting, 3)
    return revision, time.monotonic() - start


async def test_read_swap_read(open_store: OpenStore) -> None:
    store = open_store()
    assert await store.read() is None
    revision = await store.swap(None, document(100, 1))
    assert isinstance(revision, int)
    assert revision > 0
    stored = await store.read()
    assert stored is not None
    assert (stored.revision, stored.state.weights, stored.state.version) == (revision, Weights(100, 0), 1)
    assert stored.change == {"node": "a"}
    again = await open_store().read()  # another client sees the same
    assert again == stored


async def test_stale_swap_conflicts_and_changes_nothing(open_store: OpenStore) -> None:
    store = open_store()
    first = await store.swap(None, document(100, 1))
    second = await store.swap(first, document(90, 2))
    assert second > first
    with pytest.raises(StoreConflict) as stale:
        await store.swap(first, document(0, 3))
    assert (stale.value.expected, stale.value.actual) == (first, second)
    assert str(second) in str(stale.value)
    with pytest.raises(StoreConflict) as create:
        await store.swap(None, document(0, 3))  # "none yet" is stale too once there is one
    assert (create.value.expected, create.value.actual) == (0, second)
    stored = await store.read()
    assert stored is not None
    assert (stored.revision, stored.state.version, stored.state.weights) == (second, 2, Weights(90, 10))


async def test_swap_on_a_missing_document_conflicts(open_store: OpenStore) -> None:
    store = open_store()
    with pytest.raises(StoreConflict) as missing:
        await store.swap(5, document(100, 1))
    assert (missing.value.expected, missing.value.actual) == (5, 0)
    assert await store.read() is None


async def test_concurrent_swaps_exactly_one_wins(open_store: OpenStore) -> None:
    a, b = open_store(), open_store()
    revision = await a.swap(None, document(100, 1))
    for version in range(2, 12):
        outcomes = await asyncio.gather(
            a.swap(revision, document(100, version, "a")),
            b.swap(revision, document(0, version, "b")),
            return_exceptions=True,
        )
        won = [o for o in outcomes if isinstance(o, int)]
        lost = [o for o in outcomes if isinstance(o, StoreConflict)]
        assert len(won) == 1, outcomes
        assert len(lost) == 1, outcomes
        assert lost[0].actual == won[0]
        stored = await a.read()
        assert stored is not None
        assert stored.revision == won[0]
        assert stored.change["node"] == ("a" if outcomes[0] == won[0] else "b")
        revision = won[0]


async def test_changes_reach_another_client_quickly(open_store: OpenStore, store_server: StoreServer) -> None:
    writer, watcher = open_store(), open_store()
    async with watching(watcher) as watch:
        revision = None
        for blue in (100, 50):
            revision, took = await heard(watch, writer.swap(revision, document(blue, 1 + blue)))
            print(f"{store_server.kind}: a change reached the other client in {took * 1000:.1f} ms")
            assert took < 0.5
            stored = await watcher.read()
            assert stored is not None
            assert stored.revision == revision
        await asyncio.sleep(1.5)  # idle past the store's liveness check: the watch must stay up
        await heard(watch, writer.swap(revision, document(0, 200)))


async def test_an_idle_watch_is_quiet(
    open_store: OpenStore, store_server: StoreServer, request: pytest.FixtureRequest
) -> None:
    """No write, no yield: every yield costs each node a read of the document."""
    async with watching(open_store()) as watch:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(watch.next(), 2.5)  # past two of the store's liveness checks


async def test_node_records_live_while_beaten(open_store: OpenStore) -> None:
    a, b = open_store(), open_store()
    assert await a.nodes() == {}
    await a.beat("node-a", {"version": 1, "counts": {"blue": {"2xx": 3}}}, TTL)
    await b.beat("node-b", {"version": 1}, TTL)
    assert await b.nodes() == {
        "node-a": {"version": 1, "counts": {"blue": {"2xx": 3}}},
        "node-b": {"version": 1},
    }
    for version in (2, 3):  # beaten past its first TTL: renewed, and the record replaced
        await asyncio.sleep(0.6 * TTL)
        await a.beat("node-a", {"version": version}, TTL)
    last_beat = time.monotonic()
    assert (await b.nodes())["node-a"] == {"version": 3}

    async def only_b_gone() -> bool:
        return set(await b.nodes()) == {"node-a"}

    async def all_gone() -> bool:
        return await b.nodes() == {}

    await within(2.5, only_b_gone)
    await within(TTL + 2.0, all_gone)
    print(f"a record with a {TTL} s TTL was gone {time.monotonic() - last_beat:.2f} s after its last beat")


async def test_rollout_lease(open_store: OpenStore, store_server: StoreServer) -> None:
    a, b = open_store(), open_store()
    assert await a.leader() is None
    assert await a.lead("a", TTL)
    assert not await b.lead("b", TTL)
    assert await b.leader() == "a"
    for _ in range(3):  # renewed past its TTL
        await asyncio.sleep(0.6 * TTL)
        assert await a.lead("a", TTL)
        assert not await b.lead("b", TTL)
    await b.resign("b")  # not b's to give up
    assert await a.leader() == "a"
    await a.resign("a")
    assert await b.leader() is None
    assert await b.lead("b", TTL)
    assert not await a.lead("a", TTL)
    stopped = time.monotonic()

    async def free() -> bool:
        return await a.leader() is None

    await within(TTL + 2.0, free)
    print(f"{store_server.kind}: an unrenewed {TTL} s lease freed after {time.monotonic() - stopped:.2f} s")
    assert await a.lead("a", TTL)
    assert await b.leader() == "a"


async def test_events_oldest_first_and_bounded(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = open_store(), open_store()
    assert await a.events() == []
    for n in range(4):
        await (a if n % 2 else b).append_event({"n": n, "kind": "flip"})
    assert [e["n"] for e in await b.events()] == [0, 1, 2, 3]
    for module in (redis_store, etcd_store):
        monkeypatch.setattr(module, "EVENTS_KEPT", 5)
    for n in range(4, 12):
        await (a if n % 2 else b).append_event({"n": n})
    assert [e["n"] for e in await a.events()] == [7, 8, 9, 10, 11]
    for module in (redis_store, etcd_store):
        monkeypatch.setattr(module, "EVENTS_KEPT", 1000)
    assert len(await a.events()) <= 5 + 5 // 10  # what was trimmed is gone, not just hidden


async def test_a_killed_store_is_unavailable_then_back(
    open_store: OpenStore, store_server: StoreServer
) -> None:
    store, watcher = open_store(), open_store()
    revision = await store.swap(None, document(100, 1))
    await store.beat("node-a", {"version": 1}, 3.0)
    async with watching(watcher) as watch:
        ended = watch.end()
        store_server.kill()
        killed = time.monotonic()
        with pytest.raises(StoreUnavailable, match="state store"):
            await asyncio.wait_for(ended, 5)
        print(f"{store_server.kind}: changes() ended {time.monotonic() - killed:.2f} s after the kill")
        assert time.monotonic() - killed < 2.5

    calls: list[Callable[[], Awaitable[object]]] = [
        store.read,
        lambda: store.swap(revision, document(50, 2)),
        lambda: store.beat("node-a", {"version": 2}, 3.0),
        lambda: store.lead("a", 3.0),
        store.nodes,
        store.events,
    ]
    for call in calls:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="state store") as down:
            await asyncio.wait_for(call(), 5)
        assert time.monotonic() - start < 2.0
        assert "127.0.0.1" in str(down.value)

    await store_server.start()
    stored = await store.read()
    assert stored is not None
    assert (stored.revision, stored.state.version) == (revision, 1)
    await store.beat("node-a", {"version": 2}, 3.0)
    assert await watcher.nodes() == {"node-a": {"version": 2}}
    async with watching(watcher) as watch:
        new, _ = await heard(watch, store.swap(revision, document(50, 2)))
    stored = await watcher.read()
    assert stored is not None
    assert (stored.revision, stored.state.version) == (new, 2)


async def test_an_unreachable_store_is_unavailable(open_store: OpenStore, store_server: StoreServer) -> None:
    store_server.kill()
    store = open_store()
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="state store"):
        await store.read()
    watch = Watch(store)
    try:
        with pytest.raises(StoreUnavailable, match="state store"):
            await asyncio.wait_for(watch.next(), 5)
    finally:
        await watch.close()
    assert time.monotonic() - start < 2.0


async def test_a_frozen_store_fails_calls_within_seconds(
    open_store: OpenStore, store_server: StoreServer
) -> None:
    """SIGSTOP: no FIN, no RST, just silence (a host gone off the network), unlike a kill."""
    store = open_store()
    revision = await store.swap(None, document(100, 1))
    store_server.pause()
    try:
        for call in (store.read, lambda: store.swap(revision, document(50, 2)), store.nodes):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match="state store"):
                await asyncio.wait_for(call(), 5)
            took = time.monotonic() - start
            print(f"{store_server.kind}: a call to a frozen server failed after {took:.2f} s")
            assert took < 2.5
    finally:
        store_server.resume()
    # A timed-out write has an unknown outcome: the server may still apply it once it runs again.
    stored = await store.read()
    assert stored is not None
    assert (stored.revision == revision, stored.state.version) in ((True, 1), (False, 2))


async def test_a_frozen_store_ends_changes_within_seconds(
    open_store: OpenStore, store_server: StoreServer, request: pytest.FixtureRequest
) -> None:
    store, watcher = open_store(), open_store()
    await store.swap(None, document(100, 1))
    async with watching(watcher) as watch:
        ended = watch.end()
        store_server.pause()
        frozen = time.monotonic()
        try:
            with pytest.raises(StoreUnavailable, match="state store"):
                await asyncio.wait_for(ended, 5)
        finally:
            store_server.resume()
        took = time.monotonic() - frozen
        print(f"{store_server.kind}: changes() ended {took:.2f} s after the server froze")
        assert took < 3.0


# etcd alone: TLS, authentication (and etcd forgetting a token when it restarts).


async def _enable_auth(server: EtcdServer) -> None:
    base = f"http://127.0.0.1:{server.port}/v3/auth"
    async with aiohttp.ClientSession() as session:
        for path, body in (
            ("user/add", {"name": "root", "password": "s3cret"}),
            ("role/add", {"name": "root"}),
            ("user/grant", {"user": "root", "role": "root"}),
            ("enable", {}),
        ):
            async with session.post(f"{base}/{path}", json=body) as response:
                assert response.status == 200, await response.text()


async def test_etcd_authenticates_and_again_after_a_restart(private_etcd: Callable[..., EtcdServer]) -> None:
    etcd_with_auth = private_etcd()
    await etcd_with_auth.start()
    await _enable_auth(etcd_with_auth)
    url = etcd_with_auth.url("auth")
    stores: list[SharedStore] = []
    try:
        anonymous = EtcdStore(url)
        wrong = EtcdStore(url, username="root", password="wrong")
        store = EtcdStore(url, username="root", password="s3cret")
        stores += [anonymous, wrong, store]
        with pytest.raises(StoreUnavailable, match="user name is empty"):
            await anonymous.read()
        with pytest.raises(StoreUnavailable, match="authentication failed") as refused:
            await wrong.read()
        assert "wrong" not in str(refused.value)
        assert "s3cret" not in store.where
        revision = await store.swap(None, document(100, 1))
        etcd_with_auth.kill()
        await etcd_with_auth.start()  # simple tokens live in memory: the old one is now invalid
        stored = await store.read()
        assert stored is not None
        assert stored.revision == revision
        etcd_with_auth.kill()
        await etcd_with_auth.start()
        async with watching(store) as watch:  # the watch too authenticates again
            await heard(watch, store.swap(revision, document(0, 2)))
        await store.beat("n", {"ok": True}, TTL)
        assert await store.lead("n", TTL)
        await store.append_event({"n": 1})
        assert await store.events() == [{"n": 1}]
    finally:
        for s in stores:
            await s.close()


async def test_etcd_over_tls_with_a_client_certificate(
    private_etcd: Callable[..., EtcdServer], tls_certs: Certs
) -> None:
    certs = tls_certs
    server = private_etcd(certs)
    await server.start()
    url = server.url("tls")
    assert url.startswith("etcds://")
    await _check_tls(EtcdStore, url, certs)


async def _check_tls(kind: Callable[..., SharedStore], url: str, certs: Certs) -> None:
    """With the test CA and a client certificate it works, watch included; with the system's CAs
    (which do not know the test CA) or without a client certificate it is a store error."""
    good = kind(url, tls=StoreTLS(certs.ca, certs.client_cert, certs.client_key))
    unknown_ca = kind(url)
    no_client_cert = kind(url, tls=StoreTLS(certs.ca))
    scheme = url.partition(":")[0]
    try:
        revision = await good.swap(None, document(100, 1))
        async with watching(good) as watch:
            await heard(watch, good.swap(revision, document(0, 2)))
        with pytest.raises(StoreUnavailable, match="certificate verify failed"):
            await unknown_ca.read()
        with pytest.raises(StoreUnavailable, match=rf"state store {scheme}://127\.0\.0\.1"):
            await no_client_cert.read()
    finally:
        for store in (good, unknown_ca, no_client_cert):
            await store.close()


async def test_redis_credentials_come_from_the_environment_and_never_show(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """An ACL user of its own on the shared server, allowed only its prefix; bgproxy gets the user and
    password from BGPROXY_STORE_USERNAME / BGPROXY_STORE_PASSWORD, as a deployment would."""
    prefix = f"acl-{tmp_path.name}"
    user, password = f"bgproxy-{tmp_path.name}", "s3cret-for-redis-acl"
    admin = make_store(redis_server.url(prefix))
    assert isinstance(admin, RedisStore)
    await admin._redis.execute_command(  # the test's own setup, as an operator would with redis-cli
        "ACL", "SETUSER", user, "on", f">{password}", f"~{prefix}:*", f"&{prefix}:*", "+@all"
    )
    config = load_config_text(tmp_path, f"state_store: '{redis_server.url(prefix)}'\n")
    good = {"BGPROXY_STORE_USERNAME": user, "BGPROXY_STORE_PASSWORD": password}
    bad = {**good, "BGPROXY_STORE_PASSWORD": "not-it"}
    store, wrong = open_store(config, good), open_store(config, bad)
    assert store is not None and wrong is not None
    try:
        revision = await store.swap(None, document(100, 1))
        stored = await store.read()
        assert stored is not None and stored.revision == revision
        with pytest.raises(StoreUnavailable) as refused:
            await wrong.read()
        assert password not in str(refused.value) and "not-it" not in str(refused.value)
        assert password not in store.where and user not in store.where
    finally:
        await admin._redis.execute_command("ACL", "DELUSER", user)
        for s in (admin, store, wrong):
            await s.close()


def load_config_text(tmp_path: Path, extra: str) -> Config:
    path = tmp_path / "bgproxy.yaml"
    path.write_text(
        "pools: {blue: {upstreams: ['127.0.0.1:1']}, green: {upstreams: ['127.0.0.1:2']}}\n" + extra
    )
    return load_config(path, environ={})


async def test_redis_over_tls_with_a_client_certificate(
    private_tls_redis: TlsRedisServer, tls_certs: Certs
) -> None:
    certs = tls_certs
    await private_tls_redis.start()
    url = private_tls_redis.url("tls")
    assert url.startswith("rediss://")
    await _check_tls(RedisStore, url, certs)
