"""One node of a fleet: keeps the shared switch state applied here, says so, and leads rollouts in turn.

Four loops, each on its own clock so one slow store call never holds up the others:
- watch: the store's change notifications; each one reads the document and applies it if new
  (a few milliseconds from another node's write to the new route table here);
- poll: the same read every second, so a lost notification or a store that comes back after an
  outage is caught up within a second;
- beat: every 250 ms (and at once after a new version is applied) this node's record: the version
  it runs, when it applied it, and its request counters, which the rollout leader sums;
- lead: every second, take or keep the rollout lease. A node leads only while its lease is surely
  still its own (the time of the last successful renewal plus the lease), so when the store is
  unreachable it stops deciding before another node can start.

A store outage changes nothing for traffic: the node serves the state it has, `store_error` says
why, and changes are refused by the Controller until the store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..core.colors import COLORS
from ..dataplane.stats import ColorStats, Stats
from .controller import Controller
from .shared import SharedStore, StoreUnavailable

log = logging.getLogger("bgproxy.fleet")

BEAT = 0.25  # seconds between node records: the rollout leader sees counts at least this fresh
TTL = 3.0  # a node whose record is older than this is not live
POLL = 1.0  # seconds between reads besides the notifications: resync within this after an outage
LEASE = 3.0  # the rollout lease: a dead leader is replaced within about this (plus one LEAD)
LEAD = 1.0  # seconds between attempts to take or renew the lease
RETRY = 0.2  # seconds before watching again after the store dropped the connection

Raw = dict[str, Any]  # one color's counters as published: codes, broken, latency


def raw_counts(stats: ColorStats) -> Raw:
    """One color's cumulative counters, as a node publishes them for the leader to sum."""
    return {
        "codes": {str(k): v for k, v in stats.codes.items()},
        "broken": {str(k): v for k, v in stats.broken.items()},
        "latency": list(stats.header_counts),
    }


def process_counts(stats: Stats) -> dict[str, Raw]:
    """This process's counters, per color: what it publishes and what a single node judges."""
    return {c: raw_counts(stats.colors[c]) for c in COLORS}


def add_counts(into: Raw, more: Raw) -> None:
    for key in ("codes", "broken"):
        table = into.setdefault(key, {})
        for status, n in more.get(key, {}).items():
            table[status] = table.get(status, 0) + n
    latency = more.get("latency", [])
    mine = into.setdefault("latency", [0] * len(latency))
    if len(mine) == len(latency):  # nodes with other latency buckets cannot be summed per bucket
        into["latency"] = [a + b for a, b in zip(mine, latency, strict=True)]


class Fleet:
    """This node's part in the fleet; the App builds it when ``state_store`` is etcd or Redis."""

    def __init__(
        self,
        controller: Controller,
        shared: SharedStore,
        stats: Stats,
        *,
        node: str,
        admin_url: str,
    ) -> None:
        self.controller = controller
        self.shared = shared
        self.node = node
        self.incarnation = uuid.uuid4().hex[:12]  # a restarted node's counters start again from 0
        # The lease is held by this process, not the node name: after a takeover (same name) the old
        # process's lease is not the new one's, and its resign cannot free the new one's.
        self.holder = f"{node}#{self.incarnation}"
        self.started_at = time.time()
        self.applied_at = time.time()
        self._stats = stats
        self._admin_url = admin_url  # where the others send rollout calls when this node leads
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lead_until = 0.0
        self.on_lead: Callable[[bool], None] | None = None  # leadership gained (True) or lost
        self._was_leading = False
        self._stopped = False
        self._stepped_down = False
        # The leader's memory of every node incarnation's last counters: a node that dies keeps its
        # share in the sum, so the fleet's counters never go backwards.
        self._counts: dict[str, dict[str, Raw]] = {}
        controller.on_applied = self._on_applied
        controller.may_decide = lambda: self.leading

    @property
    def where(self) -> str:
        return self.shared.where

    @property
    def leading(self) -> bool:
        return time.monotonic() < self._lead_until

    @property
    def error(self) -> str | None:
        return self.controller.store_error

    def start(self) -> None:
        self._wake.set()  # the first record goes out at once: a node shows in /v1/fleet as it starts
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(f()) for f in (self._watch, self._poll, self._beat, self._lead)]

    async def step_down(self) -> None:
        """Stop leading (a graceful shutdown): give the lease up so another node takes rollouts over
        at once; this node goes on following the fleet while it drains."""
        if self._stepped_down:
            return
        self._stepped_down = True
        lead = self._tasks.pop() if self._tasks else None  # _lead is started last
        if lead is not None:
            lead.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lead
        self._lead_until = 0.0  # nothing decides here from now on (a rollout tick, a gate's answer)
        self._was_leading = False
        # Always: the lease may have been taken just before the cancel; resign frees only ours.
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            await asyncio.wait_for(self.shared.resign(self.holder), 1.0)

    async def stop(self) -> None:
        """Idempotent: step down, stop following, release the store's connections."""
        if self._stopped:
            return
        self._stopped = True
        await self.step_down()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.shared.close()

    def _on_applied(self) -> None:
        self.applied_at = time.time()
        self._wake.set()

    def _down(self, exc: StoreUnavailable) -> None:
        if self.controller.store_error is None:
            log.error("state store unreachable: serving the last state, refusing changes: %s", exc)
        self.controller.store_error = str(exc)

    async def _sync(self) -> None:
        before = self.controller.store_error
        try:
            await self.controller.sync()
        except StoreUnavailable as exc:
            self._down(exc)
            return
        if before is not None:
            log.warning("state store is back: in sync again", extra={"store": self.where})

    async def _watch(self) -> None:
        while True:
            try:
                async with contextlib.aclosing(self.shared.changes()) as changes:
                    async for _ in changes:
                        await self._sync()
            except StoreUnavailable as exc:
                self._down(exc)
            except Exception:  # a bug must not stop this node from following the fleet
                log.exception("fleet: watching the store failed; watching again")
            await asyncio.sleep(RETRY)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                await self._sync()
            except Exception:
                log.exception("fleet: reading the store failed; reading again in %gs", POLL)

    def record(self) -> dict[str, Any]:
        """What this node publishes: read by /v1/fleet on every node and by the rollout leader."""
        board = self.controller.switchboard
        return {
            "node": self.node,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "admin": self._admin_url,
            "version": board.version,
            "revision": self.controller.revision,
            "applied_at": self.applied_at,
            "seen": time.time(),
            "started_at": self.started_at,
            "leader": self.leading,
            "store": "degraded" if self.error else "ok",
            "counts": process_counts(self._stats),
        }

    async def _beat(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), BEAT)
            self._wake.clear()
            try:
                await self.shared.beat(self.node, self.record(), TTL)
                if self.leading:
                    self._remember(await self.shared.nodes())
            except StoreUnavailable as exc:
                self._down(exc)
            except Exception:  # a bug must not silence this node's record for good
                log.exception("fleet: publishing this node's record failed; trying again")

    async def _lead(self) -> None:
        while True:
            asked = time.monotonic()
            held: bool | None = None  # None: the store did not answer (the lease may still be ours)
            try:
                held = await self.shared.lead(self.holder, LEASE)
            except StoreUnavailable as exc:
                self._down(exc)
            if held and not self._was_leading:
                # Every node's counters first, then the rollout told, then leading: a tick in between
                # would judge this node's counts alone against the fleet's baseline.
                self._counts.clear()
                self._remember(await self._nodes_or_none() or {})
                self._was_leading = True
                if self.on_lead is not None:
                    self.on_lead(True)
                log.warning("fleet: took the rollout lease")
            if held:
                self._lead_until = asked + LEASE
            elif held is False:
                self._lead_until = 0.0  # another process holds it: stop deciding at once
            if self._was_leading and not self.leading:
                self._was_leading = False
                if self.on_lead is not None:
                    self.on_lead(False)
                log.warning("fleet: lost the rollout lease")
            await asyncio.sleep(max(0.0, LEAD - (time.monotonic() - asked)))

    async def _nodes_or_none(self) -> dict[str, dict[str, Any]] | None:
        try:
            return await self.shared.nodes()
        except StoreUnavailable:
            return None

    def _remember(self, nodes: dict[str, dict[str, Any]]) -> None:
        for record in nodes.values():
            counts = record.get("counts")
            incarnation = record.get("incarnation")
            if isinstance(counts, dict) and isinstance(incarnation, str):
                self._counts[incarnation] = counts

    def summed(self) -> dict[str, Raw]:
        """Every node's counters added up, per color (the leader judges rollouts on these)."""
        self._counts[self.incarnation] = process_counts(self._stats)  # live, not as last published
        total: dict[str, Raw] = {c: {} for c in COLORS}
        for counts in self._counts.values():
            for color in COLORS:
                add_counts(total[color], counts.get(color, {}))
        return total

    async def nodes(self) -> dict[str, dict[str, Any]]:
        return await self.shared.nodes()

    async def leader(self) -> str | None:
        """The node whose process holds the rollout lease."""
        holder = await self.shared.leader()
        return None if holder is None else holder.rpartition("#")[0] or holder

    async def wait_applied(self, version: int, within: float) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Wait until every live node runs ``version`` or later; (all did, the live nodes)."""
        deadline = time.monotonic() + within
        while True:
            nodes = await self.shared.nodes()
            if all(r.get("version", -1) >= version for r in nodes.values()):
                return True, nodes
            if time.monotonic() >= deadline:
                return False, nodes
            await asyncio.sleep(0.01)
