"""The one way the switch state changes: serialized, persisted before it is answered, then installed.

The admin API (and anything else that switches traffic) calls the Controller; it never touches the
Switchboard's mutating methods itself, so there is exactly one lock and one version sequence. Each
applied change becomes a new route table in the data plane, then starts or cancels drains.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..core.colors import Color
from ..core.errors import SwitchError, VersionConflict
from ..core.preview import PreviewPolicy
from ..core.sticky import DrainWindow, StickyPolicy
from ..core.switchboard import Switchboard, SwitchResult
from ..core.weights import Weights
from ..dataplane.routing import RouteTable
from ..dataplane.runtime import Runtime
from .audit import AuditLog, AuditLogError, switch_event
from .drain import Drainer
from .shared import SharedStore, StoreConflict, StoreDataError, StoreUnavailable, encode_document
from .state import PersistedState, StateBackend, StateFileError

log = logging.getLogger("bgproxy.control")

Change = Callable[[Switchboard, float], SwitchResult]
# Checks a planned change (from, to) and raises SwitchError to refuse it; skipped when forced.
Guard = Callable[[Weights, Weights], Awaitable[None]]
Records = tuple[dict[str, Any], ...]
CONFLICT_RETRIES = 5  # another node wrote first: read its version, try again on it (If-Match still holds)


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """A membership change ready to commit: the run-time intent to persist, the swap, the audit event."""

    pools: dict[str, Any] | None
    apply: Callable[[], None]
    event: dict[str, Any]


class Frozen(SwitchError):
    """The state file belongs to another process now (a takeover) or this one is stopping (503)."""


class StoreDown(Frozen):
    """The fleet's shared store is unreachable: traffic goes on as it was, changes wait (503)."""


class RolloutHolds(SwitchError):
    """A flip or weights change while a rollout holds the switch, without force (answered 409)."""


def route_table(
    board: Switchboard, sticky: StickyPolicy | None = None, preview: PreviewPolicy | None = None
) -> RouteTable:
    """The data plane's view of the switch state and the routing rules: what new requests are routed by."""
    weights = board.weights
    drains: dict[str, DrainWindow] = {
        c: DrainWindow(d.started_at, d.deadline) for c, d in board.drains().items()
    }
    return RouteTable(board.version, weights.blue, weights.green, sticky, preview, drains)


class StoreBusy(Frozen):
    """The shared state kept changing under a change (503): nothing changed, try again."""


def _busy() -> StoreBusy:
    return StoreBusy(
        f"the shared state changed {CONFLICT_RETRIES} times while this change was planned; nothing "
        "changed, try again"
    )


class Controller:
    """Applies flips and weight changes: validate, persist, apply, install, then drain.

    A change is first tried on a scratch copy of the switchboard, so a refused change (SwitchError,
    VersionConflict) or a failed write (StateFileError) leaves the live state, its version and its
    audit log exactly as they were; only a change that is on disk reaches the data plane.
    """

    def __init__(
        self,
        switchboard: Switchboard,
        store: StateBackend,
        runtime: Runtime,
        drainer: Drainer,
        *,
        guard: Guard | None = None,
        sticky: StickyPolicy | None = None,
        preview: PreviewPolicy | None = None,
        rollouts: Records = (),
        pools: dict[str, Any] | None = None,
        audit: AuditLog | None = None,
        shared: SharedStore | None = None,
        node: str = "local",
    ) -> None:
        """``store``: the state file (in a fleet, this node's last-known-good copy of the shared state);
        ``shared``: the fleet's store, the one every change is a compare-and-swap on."""
        self.switchboard = switchboard
        self.store = store
        self._runtime = runtime
        self._drainer = drainer
        self._guard = guard
        self.sticky = sticky
        self.preview = preview
        self._lock = asyncio.Lock()
        # Rollout records persisted beside the weights (control.rollout owns their meaning), and the
        # id of the rollout that holds the switch: others' changes need force, which takes it away.
        self.rollouts = rollouts
        self.holder: str | None = None
        # Membership changed at run time, persisted beside the weights (control.membership).
        self.pools = pools
        self.audit = audit
        self.frozen: str | None = None  # why no change is taken now; None: changes are taken
        self.shared = shared
        self.node = node
        self.revision: int | None = None  # the shared store's revision of the state this node runs
        self.store_error: str | None = None  # why the shared store is degraded; None: it answers
        # Called under the lock when another node's version brings different pools or rollout records.
        self.on_pools: Callable[[dict[str, Any] | None], None] | None = None
        # Given the records of an adopted version, returns the ones to keep (the leader keeps its own).
        self.on_rollouts: Callable[[Records], Records] | None = None
        # In a fleet: whether this node may make a rollout's changes now (it holds the lease).
        self.may_decide: Callable[[], bool] | None = None
        self.on_applied: Callable[[], None] | None = None  # a new version runs here (the fleet acks it)
        self._unsaved: tuple[PersistedState, dict[str, Any]] | None = None  # a rollback the store missed

    async def flip(
        self,
        to: Color | None = None,
        *,
        actor: str,
        reason: str | None = None,
        expected_version: int | None = None,
        drain_timeout: float | None = None,
        force: bool = False,
    ) -> SwitchResult:
        """All traffic to ``to`` (or away from the live color); a flip to the live color changes nothing."""

        def change(board: Switchboard, now: float) -> SwitchResult:
            return board.flip(
                to,
                now=now,
                actor=actor,
                reason=reason,
                expected_version=expected_version,
                drain_timeout=drain_timeout,
            )

        return await self._run(change, force)

    async def set_weights(
        self,
        weights: Weights,
        *,
        actor: str,
        reason: str | None = None,
        expected_version: int | None = None,
        drain_timeout: float | None = None,
        force: bool = False,
        owner: str | None = None,
        rollouts: Records | None = None,
        urgent: bool = False,
    ) -> SwitchResult:
        """``owner``: the rollout making the change; ``rollouts``: its records, saved with the weights.

        ``urgent`` (a rollback): routed first, saved after, and a failed write is logged, not a
        refusal: a full disk must not keep failing traffic on the candidate. A crash before the write
        resumes the rollout at its step, which then rolls back again on fresh evidence.
        """

        def change(board: Switchboard, now: float) -> SwitchResult:
            return board.set_weights(
                weights,
                now=now,
                actor=actor,
                reason=reason,
                expected_version=expected_version,
                drain_timeout=drain_timeout,
            )

        return await self._run(change, force, owner, rollouts, urgent)

    async def probe(self, before: Weights, after: Weights) -> None:
        """Run the flip guard for a planned change without making it (a rollout's start asks this)."""
        if self._guard is not None:
            await self._guard(before, after)

    async def save_rollouts(self, rollouts: Records, *, release: bool = False) -> None:
        """Persist rollout records (with the weights as they are); ``release``: the rollout ended, so
        nobody holds the switch. Never takes the switch: only a rollout's start does."""
        async with self._lock:
            for _ in self._attempts():
                self._check_open()
                if self.may_decide is not None and not self.may_decide():
                    raise StoreBusy("this node no longer leads rollouts; the new leader goes on")
                board = self.switchboard
                state = PersistedState(board.weights, board.version, board.updated_at, rollouts, self.pools)
                if await self._persist(state, {"actor": "rollout"}):
                    break
            else:
                raise _busy()
            self.rollouts = rollouts
            if release:
                self.holder = None

    async def commit_pools(
        self, plan: Callable[[], Awaitable[PoolPlan | None]], *, expected_version: int | None = None
    ) -> int:
        """A membership change, planned from the live pools under the lock (so two changes cannot
        both plan from the same list), persisted with one more version, applied; returns the version.

        ``plan`` raises to refuse, returns None for no change; its ``apply`` must not fail.
        """
        async with self._lock:
            for attempt in self._attempts():
                self._check_open()
                board = self.switchboard
                if expected_version is not None and expected_version != board.version:
                    if await self._behind(attempt, expected_version):
                        continue
                    raise VersionConflict(expected_version, board.version)
                planned = await plan()
                if planned is None:
                    return board.version
                now = time.time()
                state = PersistedState(board.weights, board.version + 1, now, self.rollouts, planned.pools)
                if await self._persist(state, {"actor": planned.event.get("actor"), "kind": "pool"}):
                    break
            else:
                raise _busy()
            version = board.touch(now)
            self.pools = planned.pools
            planned.apply()
            self._applied()
            await self.record({**planned.event, "version": version})
            return version

    def _attempts(self) -> range:
        return range(CONFLICT_RETRIES)

    async def _behind(self, attempt: int, expected: int) -> bool:
        """An If-Match newer than this node's version: another node wrote it and it is on its way
        here. Read it now (once) so If-Match holds the same on every node; True: plan again."""
        if self.shared is None or attempt > 0 or expected <= self.switchboard.version:
            return False
        await self._sync_or_down()
        return True

    async def _sync_or_down(self) -> None:
        """Catch up with the store before a change is planned again; StoreDown (503) if it is down."""
        try:
            await self._sync_locked()
        except StoreUnavailable as exc:
            self.store_error = str(exc)
            raise StoreDown(f"{exc}; nothing changed, traffic goes on as it was") from None

    async def _persist(self, state: PersistedState, change: dict[str, Any]) -> bool:
        """Save a planned state; False if another node of the fleet wrote first (its version is
        applied here by then, and the caller plans again from it). Raises StoreDown (503) when the
        shared store cannot be reached and StateFileError when the file cannot be written."""
        if self.shared is None:
            # fsync can take milliseconds on a real disk: keep it off the loop that serves traffic.
            await asyncio.to_thread(self.store.save, state)
            return True
        if self._unsaved is not None:  # a rollback the store missed goes first; then plan again
            await self._sync_or_down()
            return False
        try:
            if not await self._swap(state, change):
                await self._sync_locked()
                return False
        except StoreUnavailable as exc:
            self.store_error = str(exc)
            # A write that timed out may still reach the store: then every node applies it (this one
            # too) once the store answers. It is not in force here now, nor anywhere before that.
            raise StoreDown(
                f"{exc}; the change is not applied (if the store took it after all, every node applies "
                "it when the store answers again); traffic goes on as it was"
            ) from None
        self.store_error = None
        await self._keep_local(state)
        return True

    async def _swap(self, state: PersistedState, change: dict[str, Any]) -> bool:
        """Compare-and-swap ``state`` on this node's revision; False if another node wrote first.

        The write carries an id of its own: a conflict against it means this very write landed
        after all (a store client that retried a timed-out call), not another node's write.
        """
        assert self.shared is not None
        write = uuid.uuid4().hex
        document = encode_document(state, {**change, "node": self.node, "write": write})
        try:
            self.revision = await self.shared.swap(self.revision, document)
        except StoreConflict:
            stored = await self.shared.read()
            if stored is None or stored.change.get("write") != write:
                return False
            self.revision = stored.revision
        return True

    async def _save_urgent(self, state: PersistedState, how: dict[str, Any]) -> bool:
        """Save a rollback that is already routed; False if another node wrote first (its version
        is in force here now, and the caller puts the rollback on top of it). If the store is down
        the rollback is kept and written first when the store answers, before anything is read
        from it or written to it, so the fleet follows it then."""
        try:
            return await self._persist(state, how)
        except (StoreDown, StateFileError) as exc:
            log.error("a rollback is live here but not saved yet: %s", exc)
            if self.shared is not None:
                self._unsaved = (state, how)
            return True

    async def _keep_local(self, state: PersistedState) -> None:
        """This node's last-known-good copy, what it starts from if the store is down then."""
        try:
            await asyncio.to_thread(self.store.save, state)
        except StateFileError as exc:
            log.error("could not keep the local copy of the shared state: %s", exc)

    async def sync(self) -> None:
        """Run the shared store's version of the state if it is not the one running here (raises
        StoreUnavailable while the store is down)."""
        async with self._lock:
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        assert self.shared is not None
        unsaved, self._unsaved = self._unsaved, None
        if unsaved is not None and unsaved[0].version == self.switchboard.version:
            state, how = unsaved
            try:
                saved = await self._swap(state, how)
            except StoreUnavailable:
                self._unsaved = unsaved  # still down: keep it for the next try
                raise
            if saved:
                self.store_error = None
                log.warning("the rollback made during the store outage is saved now: the fleet follows it")
                await self._keep_local(state)
                return
            log.error("a rollback made during the store outage was overtaken by a newer version")
        stored = await self.shared.read()
        self.store_error = None
        if stored is None:
            # The store lost its data (or this node came first): seed it with what runs here.
            board = self.switchboard
            state = PersistedState(board.weights, board.version, board.updated_at, self.rollouts, self.pools)
            log.warning("the shared state is empty: writing this node's", extra={"store": self.shared.where})
            try:
                self.revision = await self.shared.swap(None, encode_document(state, {"node": self.node}))
            except StoreConflict:
                await self._sync_locked()  # another node seeded it first: take theirs
            return
        if stored.revision == self.revision:
            return
        self._adopt(stored.state, stored.change)
        self.revision = stored.revision
        await self._keep_local(stored.state)

    def _adopt(self, state: PersistedState, change: dict[str, Any]) -> None:
        """Another node's version: its weights (drains start here too), pools and rollout records."""
        if state.rollouts != self.rollouts:
            # First: records that do not read (a newer bgproxy's) leave everything as it was.
            kept = state.rollouts
            if self.on_rollouts is not None:
                try:
                    kept = self.on_rollouts(state.rollouts)
                except ValueError as exc:
                    raise StoreDataError(f"the shared state's rollouts do not read: {exc}") from None
            self.rollouts = kept
            rollouts_changed = True
        else:
            rollouts_changed = False
        board = self.switchboard
        drain_timeout = change.get("drain_timeout")
        result = board.adopt(
            state.weights,
            state.version,
            state.updated_at,
            now=time.time(),
            actor=str(change.get("actor") or "fleet"),
            reason=change.get("reason"),
            drain_timeout=drain_timeout if isinstance(drain_timeout, int | float) else None,
        )
        if state.pools != self.pools:
            self.pools = state.pools
            if self.on_pools is not None:
                self.on_pools(state.pools)
        if not rollouts_changed and result.changed and change.get("owner") != self.holder:
            self.holder = None  # forced past the rollout on another node: the leader ends it
        self._runtime.install(route_table(board, self.sticky, self.preview))
        if result.changed:
            self._drainer.on_switch(result)
        self._applied()
        if result.event is not None:
            log.info(
                "fleet: applied version %d from %s (blue=%d green=%d)",
                state.version,
                change.get("node"),
                state.weights.blue,
                state.weights.green,
            )

    def _applied(self) -> None:
        if self.on_applied is not None:
            self.on_applied()

    async def freeze(self, why: str) -> None:
        """Take no change from now on, once any change in progress is written (its lock released)."""
        async with self._lock:
            self.frozen = why

    def _check_open(self) -> None:
        if self.frozen is not None:
            raise Frozen(f"{self.frozen}; nothing changed")

    async def record(self, event: dict[str, Any]) -> None:
        """Append to the audit log, durably, and to the fleet's; the change already happened, so a
        failed write is logged."""
        if self.shared is not None:
            try:
                await self.shared.append_event({**event, "node": self.node})
            except StoreUnavailable as exc:
                log.error("could not add to the fleet's audit log: %s", exc)
        if self.audit is None:
            return
        try:
            await asyncio.to_thread(self.audit.append, event)
        except AuditLogError as exc:
            log.error("could not write the audit log: %s", exc)

    async def _run(
        self,
        change: Change,
        force: bool,
        owner: str | None = None,
        rollouts: Records | None = None,
        urgent: bool = False,
    ) -> SwitchResult:
        """Persist, apply, record in the audit log; returns with no await after releasing the lock, so
        the caller can read the state its change made.

        A caller cancelled during the write is like a crash after it: the file may hold the change.
        """
        async with self._lock:
            for attempt in self._attempts():
                self._check_open()
                if owner is not None and owner != self.holder:
                    # Forced past, here or on another node: the rollout's own steps stop here.
                    raise RolloutHolds(f"rollout {owner} no longer holds the switch; nothing changed")
                if owner is not None and self.may_decide is not None and not self.may_decide():
                    raise StoreBusy("this node no longer leads rollouts; the new leader goes on")
                if self.holder is not None and owner != self.holder and not force:
                    raise RolloutHolds(
                        f'rollout {self.holder} is running; nothing changed. Send "force": true to abort '
                        "it and apply this change, or act on the rollout (/v1/rollouts/current)"
                    )
                board = self.switchboard
                now = time.time()  # wall clock: shown as updated_at, and drains are timed on it too
                scratch = Switchboard(
                    board.weights,
                    drain_timeout=board.drain_timeout,
                    version=board.version,
                    updated_at=board.updated_at,
                    max_events=0,
                )
                try:
                    preview = change(scratch, now)  # raises before anything live is touched
                except VersionConflict as exc:
                    if await self._behind(attempt, exc.expected):
                        continue
                    raise
                if preview.event is None:
                    return preview
                if self._guard is not None and not force:
                    await self._guard(preview.event.from_weights, preview.event.to_weights)
                records = self.rollouts if rollouts is None else rollouts
                planned = PersistedState(
                    preview.event.to_weights, preview.event.version, now, records, self.pools
                )
                how = {
                    "actor": preview.event.actor,
                    "reason": preview.event.reason,
                    # Drains on the other nodes end when this node's do.
                    "drain_timeout": next(
                        (d.deadline - d.started_at for d in preview.started_draining), None
                    ),
                    "owner": owner,
                }
                if urgent or await self._persist(planned, how):
                    break
            else:
                raise _busy()
            # Same weights and version as the scratch copy, so the live apply cannot be refused.
            result = change(board, now)
            event = result.event
            assert event is not None  # the preview changed, and the live board was in the same state
            log.info(
                "traffic switched to blue=%d green=%d (version %d, by %s)",
                event.to_weights.blue,
                event.to_weights.green,
                event.version,
                event.actor,
                extra={
                    "version": event.version,
                    "from_weights": event.from_weights.as_dict(),
                    "to_weights": event.to_weights.as_dict(),
                    "actor": event.actor,
                    "reason": event.reason,
                },
            )
            self.rollouts = records
            if owner != self.holder:
                self.holder = None  # forced past a rollout: it sees this on its next tick and ends
            self._runtime.install(route_table(board, self.sticky, self.preview))
            self._drainer.on_switch(result)
            if urgent:
                for _ in self._attempts():
                    if await self._save_urgent(planned, how):
                        break
                    # Another node's version is in force here now: the rollback goes on top of it.
                    now = time.time()
                    again = change(board, now)
                    if again.event is not None:
                        self._runtime.install(route_table(board, self.sticky, self.preview))
                        self._drainer.on_switch(again)
                    self.rollouts = records
                    planned = PersistedState(
                        board.weights, board.version, board.updated_at, records, self.pools
                    )
            self._applied()
            await self.record(switch_event(event))
            return result
