"""GET /v1/watch: a server-sent event stream of state changes and counter snapshots.

One ``WatchHub`` per admin listener does the work for every watcher: every 200 ms (only while
someone watches) it compares a cheap signature of the switch state (version, drains, upstream health
states, the rollout's state and decisions) with the last one and, on a change, builds one ``state``
event for all; every second it samples the data plane's plain counters into a 5-minute ring and
sends a ``counters`` event. The ring is what the page's sparklines start from, so a page opened
mid-deploy shows the last 5 minutes at once instead of an empty chart.

The stream, as ``curl -N`` shows it (each ``data`` is one line of JSON, its model in models.py)::

    : bgproxy watch: events state, history, counters; a comment every 15 s when idle
    retry: 1000

    event: state          WatchStateEvent: sent first, then on every change
    event: history        WatchHistoryEvent: once, after the first state (not with ?counters=0)
    event: counters       WatchCountersEvent: every second (not with ?counters=0)

A watcher that goes away is noticed within one poll (its transport closes) and dropped; one that
reads too slowly to keep up is cut off (it reconnects and starts from a fresh state). At shutdown
the hub ends every stream, so the admin runner's cleanup does not wait on open watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..core.colors import COLORS, Color
from ..core.timefmt import rfc3339
from .errors import ApiError
from .metrics import error_window_state
from .models import WatchCountersEvent, WatchHistoryEvent, WatchStateEvent
from .readmodel import Process

log = logging.getLogger("bgproxy.watch")

POLL = 0.2  # seconds between looks at the state signature while someone watches
PERIOD = 1.0  # seconds between counter samples (and counters events)
KEEP = 300  # samples of history: 5 minutes at one a second
HEARTBEAT = 15.0  # a comment after this long without an event keeps proxies from timing out
WRITE_TIMEOUT = 10.0  # a watcher that takes longer to accept one event is cut off
BACKLOG = 32  # events queued for one watcher before it counts as too slow

PREAMBLE = (
    b": bgproxy watch: events state, history, counters; a comment every 15 s when idle\nretry: 1000\n\n"
)
_KEEPALIVE = b": keep-alive\n\n"


def frame(event: str, data: Any) -> bytes:
    """One server-sent event: its name and one line of compact JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True, slots=True)
class _ColorSample:
    requests: int
    errors: int
    durations: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Sample:
    mono: float  # the data plane's loop clock
    wall: float
    colors: dict[Color, _ColorSample]


def _color_sample(process: Process, color: Color) -> _ColorSample:
    """Cumulative live answers and errors, counted as the error window counts them."""
    stats = process.stats.colors[color]
    requests = errors = 0
    for status, n in stats.codes.items():
        requests += n
        if status >= 500:
            errors += n
    for status, n in stats.broken.items():  # cut by an upstream after a status that was not an error
        if status < 500:
            errors += n
    return _ColorSample(requests, errors, tuple(stats.duration_counts))


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """Like Prometheus's histogram_quantile: linear within the bucket; the last bound past it."""
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = bounds[i - 1] if i > 0 else 0.0
            return float(lower + (bounds[i] - lower) * (rank - seen) / n)
        seen += n
    return float(bounds[-1])


def _signature(process: Process) -> tuple[Any, ...]:
    """What the ``state`` event changes with: cheap to build and compare every 200 ms."""
    board = process.switchboard
    r = process.rollouts.current
    rollout = (
        None
        if r is None
        else (r.id, r.state, r.step, r.updated_at, len(r.decisions), r.gates_left, r.paused_by, r.rule)
    )
    health = tuple(
        (up.addr, up.healthy, up.ejected_until)
        for color in COLORS
        for up in process.runtime.pools[color].upstreams
    )
    drains = tuple(sorted((d.color, d.deadline) for d in board.drains().values()))
    return (board.version, drains, rollout, health)


class _Watcher:
    """One open stream: its queue of encoded events, and the transport to check or cut."""

    __slots__ = ("counters", "queue", "request")

    def __init__(self, request: web.Request, counters: bool) -> None:
        self.request = request
        self.counters = counters
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(BACKLOG)

    def gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def send(self, data: bytes | None) -> None:
        """Queue an event; a watcher that is this far behind is ended (None) instead."""
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.end()

    def end(self) -> None:
        """Stop the stream: the handler sees None, or, if its queue is full, the connection closes."""
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            transport = self.request.transport
            if transport is not None:
                transport.abort()


class WatchHub:
    """Polls one process for every watcher of it, and keeps the counters' 5-minute ring."""

    def __init__(
        self, process: Process, *, poll: float = POLL, period: float = PERIOD, keep: int = KEEP
    ) -> None:
        self.process = process
        self.poll = poll
        self.period = period
        self._ring: deque[_Sample] = deque(maxlen=keep + 1)  # n + 1 samples make n points
        self._watchers: set[_Watcher] = set()
        self._signature: tuple[Any, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and not self.closed:
            self._sample()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """End every stream and stop polling (idempotent)."""
        self.closed = True
        for watcher in list(self._watchers):
            watcher.end()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def subscribe(self, request: web.Request, *, counters: bool) -> _Watcher:
        """A new watcher, who is sent the state itself: with no one else watching, that is the baseline."""
        if not self._watchers:
            self._signature = _signature(self.process)
        watcher = _Watcher(request, counters)
        self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: _Watcher) -> None:
        self._watchers.discard(watcher)

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.period
        while True:
            await asyncio.sleep(max(0.0, min(self.poll, due - loop.time())))
            now = loop.time()
            for watcher in [w for w in self._watchers if w.gone()]:
                watcher.end()
                self._watchers.discard(watcher)
            try:
                if now >= due:
                    # After a stall (a blocked loop), skip ahead rather than sample in a burst.
                    due = due + self.period if now < due + self.period else now + self.period
                    self._sample()
                    if any(w.counters for w in self._watchers):
                        data = frame("counters", self.counters())
                        for watcher in self._watchers:
                            if watcher.counters:
                                watcher.send(data)
                if self._watchers:
                    signature = _signature(self.process)
                    if signature != self._signature:
                        self._signature = signature
                        data = frame("state", self.state())
                        for watcher in self._watchers:
                            watcher.send(data)
            except Exception:  # a bug here must not silence every watcher for good
                log.exception("watch: building an event failed; trying again in %gs", self.poll)

    # -- the events ------------------------------------------------------------------------------------

    def _sample(self) -> None:
        process = self.process
        self._ring.append(
            _Sample(
                process.runtime.loop.time(),
                time.time(),
                {color: _color_sample(process, color) for color in COLORS},
            )
        )

    def state(self) -> dict[str, Any]:
        """The ``state`` event now."""
        from .api import rollout_view, state_view  # noqa: PLC0415 (api.py imports this module)

        process = self.process
        current = process.rollouts.current
        drains = [
            {"color": d.color, "started_at": rfc3339(d.started_at), "deadline": rfc3339(d.deadline)}
            for d in process.switchboard.drains().values()
        ]
        event = WatchStateEvent.model_validate(
            {
                "at": rfc3339(time.time()),
                "state": state_view(process),
                "drains": drains,
                "rollout": None if current is None else rollout_view(current),
            }
        )
        return event.model_dump(mode="json", by_alias=True)

    def history(self) -> dict[str, Any]:
        """The ``history`` event: one point per interval over the ring, oldest first."""
        samples = list(self._ring)
        series: dict[str, dict[str, list[int]]] = {}
        for color in COLORS:
            pairs = list(itertools.pairwise(samples))
            series[color] = {
                "requests": [b.colors[color].requests - a.colors[color].requests for a, b in pairs],
                "errors": [b.colors[color].errors - a.colors[color].errors for a, b in pairs],
            }
        newest = samples[-1].wall if samples else time.time()
        event = WatchHistoryEvent.model_validate({"at": rfc3339(newest), "interval": self.period, **series})
        return event.model_dump(mode="json")

    def counters(self) -> dict[str, Any]:
        """The ``counters`` event for the newest sample."""
        from .api import upstream_health  # noqa: PLC0415 (api.py imports this module)

        process = self.process
        samples = self._ring
        newest = samples[-1]
        previous = samples[-2] if len(samples) > 1 else newest
        window = process.stats.window_seconds
        # The latency window: the newest sample at least `window` seconds old, else the oldest kept.
        base = samples[0]
        for sample in reversed(samples):
            if newest.mono - sample.mono >= window - self.period / 2:
                base = sample
                break
        bounds = process.stats.colors["blue"].buckets
        colors = {}
        for color in COLORS:
            now, last, first = newest.colors[color], previous.colors[color], base.colors[color]
            recent = [a - b for a, b in zip(now.durations, first.durations, strict=True)]
            colors[color] = {
                "requests": now.requests - last.requests,
                "errors": now.errors - last.errors,
                "requests_total": now.requests,
                "errors_total": now.errors,
                "in_flight": process.stats.in_flight(color),
                "streams": process.runtime.open_streams(color),
                "error_window": error_window_state(process, color),
                "p50": quantile(0.5, bounds, recent),
                "p99": quantile(0.99, bounds, recent),
                "upstream_health": upstream_health(process, color),
            }
        running = process.rollouts.running
        event = WatchCountersEvent.model_validate(
            {
                "at": rfc3339(newest.wall),
                "interval": round(newest.mono - previous.mono, 3) if previous is not newest else self.period,
                "counted": process.stats.enabled,
                "colors": colors,
                "rollout": None if running is None else {"id": running.id, "evidence": running.evidence},
            }
        )
        return event.model_dump(mode="json")


HUB_KEY: web.AppKey[WatchHub] = web.AppKey("bgproxy_watch_hub", WatchHub)


def attach(admin: web.Application, process: Process) -> WatchHub:
    """Give the admin listener one hub, started and stopped with it; /v1/watch finds it there."""
    hub = WatchHub(process)
    admin[HUB_KEY] = hub

    async def on_startup(app: web.Application) -> None:
        hub.start()

    async def on_shutdown(app: web.Application) -> None:
        await hub.close()

    admin.on_startup.append(on_startup)
    admin.on_shutdown.append(on_shutdown)
    return hub


def _wants_counters(request: web.Request) -> bool:
    """``?counters=0``: state events only (with a heartbeat comment), e.g. for a terminal that redraws."""
    value = request.query.get("counters", "1")
    if value not in ("0", "1"):
        raise ApiError(422, "invalid query", [f"counters: must be 1 or 0 (got {value!r})"])
    return value == "1"


def watch_handler(process: Process) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The /v1/watch handler; uses the listener's hub, or a hub of its own when there is none."""

    async def handler(request: web.Request) -> web.StreamResponse:
        counters = _wants_counters(request)
        shared = request.config_dict.get(HUB_KEY)
        hub = shared if shared is not None else WatchHub(process)
        if hub.closed:
            raise web.HTTPServiceUnavailable(reason="shutting down")
        hub.start()
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # a reverse proxy in front must not buffer the stream
                "X-Content-Type-Options": "nosniff",
            }
        )
        watcher = hub.subscribe(request, counters=counters)
        try:
            # Built before the answer starts, so a failure here is still a proper error answer.
            first = PREAMBLE + frame("state", hub.state())
            if counters:
                first += frame("history", hub.history()) + frame("counters", hub.counters())
            await response.prepare(request)
            await _write(response, first)
            while True:
                try:
                    async with asyncio.timeout(HEARTBEAT):
                        data = await watcher.queue.get()
                except TimeoutError:
                    data = _KEEPALIVE
                if data is None:
                    break
                await _write(response, data)
        except ConnectionError:
            pass  # the watcher went away
        except TimeoutError:  # it stopped reading: cut it off rather than wait on it again at the end
            if request.transport is not None:
                request.transport.abort()
        finally:
            hub.unsubscribe(watcher)
            if shared is None:
                await hub.close()
        return response

    return handler


async def _write(response: web.StreamResponse, data: bytes) -> None:
    async with asyncio.timeout(WRITE_TIMEOUT):
        await response.write(data)
