"""Rollout webhooks against a real aiohttp receiver on 127.0.0.1: gates, notices, signatures, failures.

Timeouts are 0.2 s and most hooks have few retries, so the whole file runs in about two seconds;
every wait for the receiver awaits an event it sets, under a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from waiting import eventually

from bgproxy.control.webhooks import SIGNATURE_HEADER, Webhook, Webhooks, signature

TIMEOUT = 0.2  # per attempt, for every hook that is meant to time out
PAYLOAD = {
    "rollout": "r-42",
    "from": {"blue": 100, "green": 0},
    "to": {"blue": 75, "green": 25},
    "step": 1,
    "weights": {"blue": 95, "green": 5},
    "evidence": {"green": {"requests": 812, "errors": 1}},
    "reason": "deploy 42",
}


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (upstreams.py has one too, but imports the bench harness)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Received:
    headers: dict[str, str]
    raw: bytes


class Receiver:
    """A webhook endpoint; the path says how it answers.

    /ok-*: 200. /status-N: N with a body. /slow: answers after 5 s (longer than any hook waits).
    /held-*: answers once ``release`` is set. Every request is recorded before it is answered.
    """

    def __init__(self) -> None:
        self.port = 0
        self.requests: defaultdict[str, list[Received]] = defaultdict(list)
        self.arrived: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.release = asyncio.Event()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.requests[name].append(Received(dict(request.headers), await request.read()))
        self.arrived[name].set()
        if name.startswith("status-"):
            return web.Response(status=int(name.removeprefix("status-")), text="boom:\n database  is down")
        if name == "slow":
            await asyncio.sleep(5)
        if name.startswith("held-"):
            await self.release.wait()
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{name}", rec.handle)
    # handler_cancellation: a hook that gave up on /slow must not leave its handler sleeping.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.port = site.port
    yield rec
    rec.release.set()
    await runner.cleanup()


@pytest.fixture
async def make_hooks() -> AsyncIterator[list[Webhooks]]:
    """Webhooks objects made by a test, closed after it."""
    made: list[Webhooks] = []
    yield made
    for hooks in made:
        await hooks.close()


def hooks_of(made: list[Webhooks], *hooks: Webhook) -> Webhooks:
    out = Webhooks(hooks)
    made.append(out)
    return out


async def test_gate_posts_the_payload_with_its_type(receiver: Receiver, make_hooks: list[Webhooks]) -> None:
    hooks = hooks_of(make_hooks, Webhook("check", "step", receiver.url("ok-check")))
    ok, detail, on_failure = await hooks.gate("step", PAYLOAD)
    assert (ok, detail, on_failure) == (True, "check: 200", "abort")
    [got] = receiver.requests["ok-check"]
    assert json.loads(got.raw) == {**PAYLOAD, "type": "step"}
    assert got.raw == json.dumps({**PAYLOAD, "type": "step"}, separators=(",", ":"), sort_keys=True).encode()
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"] == "bgproxy-webhook"


async def test_signature_verifies_over_the_raw_body(receiver: Receiver, make_hooks: list[Webhooks]) -> None:
    secret = "s3cret-for-tests"
    hooks = hooks_of(
        make_hooks,
        Webhook("signed", "pre_rollout", receiver.url("ok-signed"), secret=secret),
        Webhook("plain", "pre_rollout", receiver.url("ok-plain")),
    )
    ok, detail, _ = await hooks.gate("pre_rollout", PAYLOAD)
    assert ok, detail
    [signed] = receiver.requests["ok-signed"]
    expected = "sha256=" + hmac.new(secret.encode(), signed.raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signed.headers[SIGNATURE_HEADER], expected)
    assert signature(secret, signed.raw) == expected
    assert not hmac.compare_digest(signed.headers[SIGNATURE_HEADER], signature("other", signed.raw))
    [plain] = receiver.requests["ok-plain"]
    assert SIGNATURE_HEADER not in plain.headers


async def test_refusing_hook_fails_after_every_retry(receiver: Receiver, make_hooks: list[Webhooks]) -> None:
    hooks = hooks_of(make_hooks, Webhook("db-check", "step", receiver.url("status-500"), retries=2))
    ok, detail, on_failure = await hooks.gate("step", PAYLOAD)
    assert not ok
    assert on_failure == "abort"
    assert len(receiver.requests["status-500"]) == 3  # 1 + retries
    assert detail == "db-check: 500 boom: database is down (3 attempts)"


async def test_slow_hook_times_out_within_its_budget(receiver: Receiver, make_hooks: list[Webhooks]) -> None:
    hooks = hooks_of(
        make_hooks, Webhook("slowpoke", "step", receiver.url("slow"), timeout=TIMEOUT, retries=1)
    )
    started = time.monotonic()
    ok, detail, _ = await hooks.gate("step", PAYLOAD)
    elapsed = time.monotonic() - started
    assert not ok
    assert detail == "slowpoke: timed out after 0.2s (2 attempts)"
    assert len(receiver.requests["slow"]) == 2
    budget = 2 * TIMEOUT + 0.1  # two attempts and one backoff
    assert budget * 0.9 < elapsed < 5 * budget


async def test_refused_connection_is_named(make_hooks: list[Webhooks]) -> None:
    port = closed_port()
    hooks = hooks_of(
        make_hooks, Webhook("gone", "confirm_promotion", f"http://127.0.0.1:{port}/x", retries=0)
    )
    ok, detail, _ = await hooks.gate("confirm_promotion", PAYLOAD)
    assert not ok
    assert detail == f"gone: cannot connect to 127.0.0.1:{port}: Connection refused"


async def test_pause_wins_among_failing_hooks(receiver: Receiver, make_hooks: list[Webhooks]) -> None:
    hooks = hooks_of(
        make_hooks,
        Webhook("a", "step", receiver.url("status-503"), retries=0, on_failure="abort"),
        Webhook("b", "step", receiver.url("status-409"), retries=0, on_failure="pause"),
        Webhook("c", "step", receiver.url("ok-c"), retries=0, on_failure="abort"),
    )
    ok, detail, on_failure = await hooks.gate("step", PAYLOAD)
    assert (ok, on_failure) == (False, "pause")
    assert detail == "a: 503 boom: database is down; b: 409 boom: database is down"  # only the failures


async def test_a_passing_pause_hook_does_not_turn_an_abort(
    receiver: Receiver, make_hooks: list[Webhooks]
) -> None:
    hooks = hooks_of(
        make_hooks,
        Webhook("a", "step", receiver.url("status-500"), retries=0, on_failure="abort"),
        Webhook("b", "step", receiver.url("ok-b"), retries=0, on_failure="pause"),
    )
    assert await hooks.gate("step", PAYLOAD) == (False, "a: 500 boom: database is down", "abort")


async def test_hooks_of_one_kind_are_asked_at_once(receiver: Receiver, make_hooks: list[Webhooks]) -> None:
    hooks = hooks_of(
        make_hooks,
        Webhook("one", "step", receiver.url("held-1"), timeout=2),
        Webhook("two", "step", receiver.url("held-2"), timeout=2),
    )
    gate = asyncio.create_task(hooks.gate("step", PAYLOAD))
    async with asyncio.timeout(1):  # both are waiting on the receiver at the same time
        await receiver.arrived["held-1"].wait()
        await receiver.arrived["held-2"].wait()
    receiver.release.set()
    assert await gate == (True, "one: 200; two: 200", "abort")


async def test_no_hook_of_a_kind_is_an_open_gate(receiver: Receiver, make_hooks: list[Webhooks]) -> None:
    hooks = hooks_of(
        make_hooks,
        Webhook("s", "step", receiver.url("ok-s")),
        Webhook("e", "event", receiver.url("ok-e")),
    )
    assert await hooks.gate("confirm_promotion", PAYLOAD) == (True, "no webhook", "abort")
    assert not receiver.requests


async def test_notify_does_not_wait_for_a_slow_hook(receiver: Receiver, make_hooks: list[Webhooks]) -> None:
    hooks = hooks_of(make_hooks, Webhook("chat", "event", receiver.url("held-chat"), timeout=5))
    started = time.monotonic()
    hooks.notify("event", PAYLOAD)
    assert time.monotonic() - started < 0.5  # the hook holds its answer until release: 5 s if awaited
    assert hooks.pending == 1
    async with asyncio.timeout(2):
        await receiver.arrived["held-chat"].wait()
    [got] = receiver.requests["held-chat"]
    assert json.loads(got.raw) == {**PAYLOAD, "type": "event"}
    receiver.release.set()
    await eventually(lambda: hooks.pending == 0, timeout=2)


async def test_notify_snapshots_the_payload(receiver: Receiver, make_hooks: list[Webhooks]) -> None:
    hooks = hooks_of(make_hooks, Webhook("done", "post_rollout", receiver.url("ok-done")))
    payload = dict(PAYLOAD)
    hooks.notify("post_rollout", payload)
    payload["reason"] = "changed afterwards"
    async with asyncio.timeout(2):
        await receiver.arrived["ok-done"].wait()
    assert json.loads(receiver.requests["ok-done"][0].raw)["reason"] == "deploy 42"


async def test_failed_notice_is_logged_without_secrets(
    receiver: Receiver, make_hooks: list[Webhooks], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "never-log-this"
    hooks = hooks_of(
        make_hooks, Webhook("pager", "rollback", receiver.url("status-502"), retries=1, secret=secret)
    )
    with caplog.at_level(logging.WARNING, logger="bgproxy.webhooks"):
        hooks.notify("rollback", PAYLOAD)  # must not raise
        await eventually(lambda: hooks.pending == 0, timeout=2)
    assert len(receiver.requests["status-502"]) == 2
    [record] = [r for r in caplog.records if r.name == "bgproxy.webhooks"]
    assert record.levelno == logging.WARNING
    assert (record.__dict__["webhook"], record.__dict__["host"]) == ("pager", "127.0.0.1")
    assert "502" in record.__dict__["error"]
    assert secret not in caplog.text
    assert "status-502" not in str(record.__dict__)  # the URL's path stays out (it may hold a token)


async def test_notify_never_raises(make_hooks: list[Webhooks], caplog: pytest.LogCaptureFixture) -> None:
    hooks = hooks_of(make_hooks, Webhook("e", "event", f"http://127.0.0.1:{closed_port()}/"))
    hooks.notify("step", PAYLOAD)  # no hook of that kind: nothing to do
    assert hooks.pending == 0
    with caplog.at_level(logging.WARNING, logger="bgproxy.webhooks"):
        hooks.notify("event", {"not json": {1, 2}})  # a set cannot be encoded: dropped and logged
    assert hooks.pending == 0
    assert "webhook notice dropped" in caplog.text


async def test_close_cancels_pending_notices(receiver: Receiver) -> None:
    hooks = Webhooks([Webhook("chat", "event", receiver.url("held-close"), timeout=5)])
    hooks.notify("event", PAYLOAD)
    async with asyncio.timeout(2):
        await receiver.arrived["held-close"].wait()
    assert hooks.pending == 1
    async with asyncio.timeout(1):
        await hooks.close()
    assert hooks.pending == 0
    hooks.notify("event", PAYLOAD)  # after close: dropped, not raised
    assert hooks.pending == 0
    assert len(receiver.requests["held-close"]) == 1


def test_repr_hides_the_secret() -> None:
    hook = Webhook("signed", "step", "https://hooks.example/x", secret="hunter2-secret")
    assert "hunter2-secret" not in repr(hook)
    assert "hunter2-secret" not in str(hook)
    assert "signed" in repr(hook)


@pytest.mark.parametrize(
    "field",
    [{"kind": "pre_deploy"}, {"on_failure": "ignore"}, {"timeout": 0.0}, {"retries": -1}, {"interval": 0.0}],
)
def test_invalid_webhook_is_refused(field: dict[str, object]) -> None:
    values: dict[str, object] = {"name": "bad", "kind": "step", "url": "http://127.0.0.1/", **field}
    with pytest.raises(ValueError, match="webhook bad"):
        Webhook(**values)  # type: ignore[arg-type]
