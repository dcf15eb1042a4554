"""Runs guarded rollouts: feeds the pure machine (core.rollout) and carries out what it decides.

Every 50 ms it reads the data plane's plain counters (no poll of Prometheus, no query window), so a
rule that fires is acted on within one tick plus one state-file write. Weight changes go through the
Controller like any other, with the rollout holding the switch so an operator's change needs force;
gates and notices are webhooks run in their own tasks, so a slow hook never holds up a decision, the
admin API or the data plane. State transitions are persisted with the weights in the same write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..config import RolloutConfig
from ..core.colors import Color, check_color, other
from ..core.errors import SwitchError
from ..core.rollout import (
    CallGate,
    Command,
    Counts,
    Finish,
    Notify,
    Observation,
    Rollout,
    RolloutError,
    SetWeights,
    Spec,
    from_record,
    on_gate,
    on_operator,
    on_overridden,
    on_refused,
    on_tick,
    resumed,
    start,
    to_record,
)
from ..core.weights import Weights
from ..dataplane.stats import Stats
from .audit import audit_event
from .configure import error_matcher, webhooks
from .controller import Controller, Frozen, Records
from .fleet import Fleet, Raw, process_counts

log = logging.getLogger("bgproxy.rollout")

TICK = 0.05  # seconds between looks at the counters; the issue asks for at least every 100 ms
HISTORY = 20  # rollouts kept (and persisted), newest last
GATE_RETRY = 1.0  # seconds before a gate whose answer could not be applied is asked again


def color_counts(raw: Raw, is_error: Callable[[int], bool]) -> Counts:
    """One color's cumulative counters (as control.fleet.process_counts gives them) as the rollout
    judges them.

    An error is a response whose status is in ``error_statuses`` or an exchange an upstream cut
    (reset, timeout mid-body) whatever status it had sent.
    """
    requests = errors = 0
    for status, n in raw["codes"].items():
        requests += n
        if is_error(int(status)):
            errors += n
    for status, n in raw["broken"].items():
        if not is_error(int(status)):
            errors += n
    # Latency is the time to the upstream's response head: a long download, a server-sent event
    # stream or a WebSocket is long by design, not slow.
    return Counts(requests, errors, tuple(raw["latency"]))


class RolloutRunner:
    """The one running rollout (at most), the recent ones, and the loop that drives them."""

    def __init__(
        self,
        controller: Controller,
        stats: Stats,
        config: RolloutConfig,
    ) -> None:
        """``config``: the ``rollout:`` section, every rollout's defaults (the API merges overrides in)."""
        self._controller = controller
        self._stats = stats
        self.config = config
        self._is_error = error_matcher(config)
        self._webhooks = webhooks(config)
        self._resume = False  # a rollout restored from the state file waits for its first tick
        self._forced: tuple[str, int] | None = None  # (rollout, step) whose weights skip the flip probe
        self._next_is_error: Callable[[int], bool] | None = None  # after a reload, for the next rollout
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._gates: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None  # a gate asked again after its answer was lost
        self.outcomes: dict[str, int] = {}
        self.rollbacks: dict[str, int] = {}
        # Raises ValueError for a malformed record; the App reports it as a state file problem.
        self.history: deque[Rollout] = deque((from_record(r) for r in controller.rollouts), maxlen=HISTORY)
        # In a fleet only the node holding the lease drives rollouts, on every node's counters summed.
        self.fleet: Fleet | None = None

    def join(self, fleet: Fleet) -> None:
        """Drive rollouts only while leading the fleet, on its summed counters; follow the records
        other nodes write (an operator's action is sent to the leader by the admin API)."""
        self.fleet = fleet
        fleet.on_lead = self._on_lead
        self._controller.on_rollouts = self.adopt

    def _on_lead(self, leading: bool) -> None:
        """Taking the lease: a running rollout resumes with a fresh test at the same step, as after a
        restart, if it still holds the switch; one a forced change overrode is ended on the next tick
        (the holder is what the records and the changes since say, never set here)."""
        running = self.running
        if leading and running is not None and self._controller.holder == running.id:
            self._resume = True

    def adopt(self, records: Records) -> Records:
        """Rollout records in a version another node wrote: the records to keep.

        Only the leader writes rollout records, so a follower takes them as they are. The leader
        keeps its own: what it adopts is its own write that landed late, or a previous leader's.
        """
        history = deque((from_record(r) for r in records), maxlen=HISTORY)  # ValueError: unreadable
        if self.fleet is not None and self.fleet.leading:
            return self._records()
        self.history = history
        running = self.running
        self._controller.holder = None if running is None else running.id
        return records

    @property
    def current(self) -> Rollout | None:
        """The newest rollout, running or finished; None if there never was one."""
        return self.history[-1] if self.history else None

    @property
    def running(self) -> Rollout | None:
        current = self.current
        return current if current is not None and not current.done else None

    def observe(self) -> Observation:
        fleet = self.fleet
        raw = fleet.summed() if fleet is not None else process_counts(self._stats)
        return Observation(
            color_counts(raw["blue"], self._is_error),
            color_counts(raw["green"], self._is_error),
            self._stats.colors["blue"].buckets,
        )

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start_loop(self) -> None:
        """Tick; a rollout that was running when the process stopped resumes on the first tick the
        state is ours (at once, or once a takeover is confirmed)."""
        running = self.running
        if running is not None:
            self._controller.holder = running.id
            self._resume = True
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def reconfigure(self, config: RolloutConfig) -> None:
        """A reload's defaults, error statuses and webhooks: for rollouts started from now on and for
        the gates and notices of the running one; calls already on their way finish on the old hooks."""
        self.config = config
        # A running rollout keeps counting errors as it began: its baseline was counted that way.
        if self.running is None:
            self._is_error = error_matcher(config)
        else:
            self._next_is_error = error_matcher(config)
        retired, self._webhooks = self._webhooks, webhooks(config)
        # Calls already on their way finish on the old hooks; then their session closes.
        task = asyncio.get_running_loop().create_task(retired.close_when_idle())
        self._gates.add(task)
        task.add_done_callback(self._gates.discard)

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        tasks = [t for t in (self._task, *self._gates) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._webhooks.close()

    async def _loop(self) -> None:
        """Tick until stopped; a failed tick (say, an unwritable state file) is logged and retried."""
        while True:
            await asyncio.sleep(TICK)
            if self.running is None or self._controller.frozen is not None:
                continue  # frozen: a new process owns the state now, and decides from here on
            if self.fleet is not None and not self.fleet.leading:
                continue  # another node decides
            try:
                await self._tick()
            except Exception:
                log.exception("rollout tick failed; trying again in %gs", TICK)

    async def _tick(self) -> None:
        async with self._lock:
            r = self.running
            if r is None:
                return
            now = time.time()
            if self._controller.holder != r.id:  # first: a forced change ends it, resumed or not
                await self._apply(*on_overridden(r, "an operator", now))
                self._resume = False
            elif self._resume:
                log.warning("resuming rollout %s at step %d after a restart", r.id, r.step + 1)
                await self._apply(*resumed(r, self.observe(), now))
                self._resume = False
            else:
                await self._apply(*on_tick(r, self.observe(), now))

    # -- what the API calls ----------------------------------------------------------------------------

    async def start(
        self, to: Color, spec: Spec, *, actor: str, reason: str | None, force: bool = False
    ) -> Rollout:
        """Begin a rollout; SwitchError (409) while one runs or when the target fails the flip probe."""
        to = check_color(to)
        async with self._lock:
            running = self.running
            if running is not None:
                raise SwitchError(
                    f"rollout {running.id} to {running.candidate} is {running.state}; "
                    "promote or abort it before starting another"
                )
            if not self._stats.enabled:
                raise SwitchError("rollouts judge the request counters: set metrics.enabled: true")
            top = self._stats.colors[to].buckets[-1]
            if spec.max_p99 is not None and spec.max_p99 > top:
                raise ValueError(
                    f"max_p99: must be at most the last metrics.latency_buckets bound, {top:g}s, or the rule "
                    f"could never fire (got {spec.max_p99:g})"
                )
            if self._next_is_error is not None:
                self._is_error, self._next_is_error = self._next_is_error, None
            if self._controller.holder is not None:
                raise SwitchError(f"rollout {self._controller.holder} still holds the switch")
            weights = self._controller.switchboard.weights
            stable = other(to)
            if weights.of(stable) == 0:
                raise SwitchError(
                    f"{to} already takes all the traffic; a rollout moves traffic to it from {stable}"
                )
            if not force:
                await self._controller.probe(Weights(**{stable: 100, to: 0}), Weights(**{stable: 0, to: 100}))
            rollout_id = time.strftime("r-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(2)
            try:
                r, commands = start(
                    rollout_id, to, spec, self.observe(), time.time(), actor=actor, reason=reason
                )
            except RolloutError as exc:
                raise SwitchError(str(exc)) from None
            self._controller.holder = r.id
            self._forced = (r.id, 0) if force else None
            try:
                await self._apply(r, commands, new=True, actor=actor)
            except BaseException:
                self._controller.holder = None
                raise
            current = self.current
            assert current is not None
            return current

    async def act(self, action: str, *, actor: str) -> Rollout:
        """pause, resume, promote or abort the current rollout; RolloutError (409) if it does not fit."""
        async with self._lock:
            r = self.current
            if r is None:
                raise LookupError("no rollout has run")
            if not r.done and self._controller.holder != r.id:  # a forced change took the switch
                await self._apply(*on_overridden(r, "an operator", time.time()))
                r = self.current
                assert r is not None
            if action == "promote" and not r.done and r.weight < 100:
                weights = self._controller.switchboard.weights
                await self._controller.probe(weights, Weights(**{r.candidate: 100, r.stable: 0}))
            await self._apply(*on_operator(r, action, self.observe(), time.time(), actor=actor), actor=actor)
            current = self.current
            assert current is not None
            return current

    # -- carrying out decisions ------------------------------------------------------------------------

    def _records(self) -> tuple[dict[str, Any], ...]:
        return tuple(to_record(r) for r in self.history)

    async def _apply(
        self, r: Rollout, commands: list[Command], *, new: bool = False, actor: str | None = None
    ) -> None:
        """Make ``r`` current: persist it (with its weights, if it sets any), then act on it.

        Called with the lock held. If the write fails, the previous rollout state is put back, so a
        refused call leaves everything as it was; side effects (gates, notices) run only after it.
        """
        before = None if new else self.history[-1]
        if new:
            self.history.append(r)
        else:
            self.history[-1] = r
        # Counted as the outcome becomes visible, so /metrics never lags /v1/rollouts.
        ended = r.done and (before is None or not before.done)
        if ended:
            self._count(r, 1)
        try:
            saved = False
            for command in commands:
                if isinstance(command, SetWeights):
                    refused, saved = await self._set_weights(r, command)
                    if refused is not None:
                        await self._apply(*on_refused(r, refused, time.time()))
                        return
            changed = before is None or r.state != before.state or r.decisions != before.decisions
            if not saved and (changed or r.done):
                await self._controller.save_rollouts(self._records(), release=r.done)
            elif r.done:
                self._controller.holder = None
        except BaseException:
            if before is None:
                self.history.pop()
            else:
                self.history[-1] = before
            if ended:
                self._count(r, -1)
            raise
        if before is None or r.state != before.state:
            await self._controller.record(
                audit_event(
                    "rollout",
                    at=r.updated_at,
                    actor=actor or f"rollout {r.id}",
                    reason=r.decisions[-1].reason if r.decisions else r.reason,
                    id=r.id,
                    state=r.state,
                    step=r.step,
                    weight=r.weight,
                    rule=r.rule,
                )
            )
        for command in commands:
            if isinstance(command, CallGate):
                self._spawn_gate(r, command.kind, command.ask)
            elif isinstance(command, Notify):
                self._webhooks.notify(command.kind, self._payload(r, command.kind))
            elif isinstance(command, Finish):
                self._finished(r, command.outcome)

    def _count(self, r: Rollout, by: int) -> None:
        self.outcomes[r.state] = self.outcomes.get(r.state, 0) + by
        if r.rule is not None:
            self.rollbacks[r.rule] = self.rollbacks.get(r.rule, 0) + by

    def _finished(self, r: Rollout, outcome: str) -> None:
        log.warning(
            "rollout %s %s: %s",
            r.id,
            outcome,
            r.decisions[-1].reason if r.decisions else "",
            extra={"rollout": r.id, "outcome": outcome, "rule": r.rule},
        )

    async def _set_weights(self, r: Rollout, command: SetWeights) -> tuple[str | None, bool]:
        """Apply a step's weights: (the flip-probe refusal text, or None; whether the records were saved)."""
        share = {r.candidate: command.candidate, r.stable: 100 - command.candidate}
        weights = self._controller.switchboard.weights
        toward_stable = command.candidate / 100 < weights.of(r.candidate) / weights.total
        try:
            result = await self._controller.set_weights(
                Weights(**share),
                actor=f"rollout {r.id}",
                reason=command.reason,
                owner=r.id,
                rollouts=self._records(),
                # Weight going back toward stable is never refused; more for the candidate is probed,
                # but for a promotion (probed before) and the first step of a rollout started with force.
                force=toward_stable or r.done or self._forced == (r.id, r.step),
                urgent=toward_stable,
            )
        except Frozen:
            raise  # the store is down or busy, or this process is stopping: the next tick tries again
        except SwitchError as exc:
            if command.candidate == 0 or self._controller.holder != r.id:
                raise
            return str(exc), False
        if r.done:
            self._controller.holder = None
        return None, result.changed

    def _spawn_gate(self, r: Rollout, kind: str, ask: int) -> None:
        task = asyncio.get_running_loop().create_task(self._gate(r.id, kind, ask))
        self._gates.add(task)
        task.add_done_callback(self._gates.discard)

    async def _gate(self, rollout_id: str, kind: str, ask: int) -> None:
        r = self.current
        if r is None:
            return
        ok, detail, on_failure = await self._webhooks.gate(kind, self._payload(r, kind))
        async with self._lock:
            r = self.current
            if r is None or r.id != rollout_id:
                return
            if self.fleet is not None and not self.fleet.leading:
                return  # the lease moved while the gate was asked: the new leader asks it again
            try:
                answer = on_gate(
                    r, kind, ok, detail, self.observe(), time.time(), on_failure=on_failure, ask=ask
                )
                await self._apply(*answer)
            except Exception:  # e.g. the state file could not be written: the answer is not lost
                log.exception(
                    "rollout %s: gate %s answered but could not be applied; asking again", r.id, kind
                )
                self._retry = asyncio.get_running_loop().call_later(
                    GATE_RETRY, self._spawn_gate, r, kind, ask
                )

    def _payload(self, r: Rollout, kind: str) -> dict[str, Any]:
        return {
            "id": r.id,
            "type": kind,
            "from": r.stable,
            "to": r.candidate,
            "state": r.state,
            "step": r.step,
            "weights": {r.candidate: r.weight, r.stable: 100 - r.weight},
            "evidence": r.evidence,
            "reason": r.decisions[-1].reason if r.decisions else r.reason,
        }
