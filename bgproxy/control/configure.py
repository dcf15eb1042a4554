"""From the validated config to what the data plane runs with: frozen settings and color pools."""

from __future__ import annotations

import functools
import logging
import os
import resource
from collections.abc import Callable

from ..config import Config, HostPort, RolloutConfig, status_matches
from ..core.colors import COLORS
from ..core.health import OutlierPolicy
from ..core.preview import PreviewPolicy
from ..core.rollout import GATE_KINDS, Spec
from ..core.sticky import StickyPolicy
from ..dataplane.pool import ColorPool, Upstream
from ..dataplane.settings import Settings
from .webhooks import Webhook, Webhooks

log = logging.getLogger("bgproxy")

# Descriptors kept for what is not a proxied connection: listeners, the admin API, health probes,
# the state file, logs.
FD_RESERVE = 64


def connection_limit(max_connections: int) -> int:
    """How many client connections this process can really hold, raising the open-file limit first.

    Each proxied connection may hold an upstream connection too, so it needs two descriptors. Like
    HAProxy, the soft limit is raised toward what limits.max_connections needs (up to the hard
    limit); if that is still short, the cap comes down to what fits, so bgproxy answers 503 itself
    instead of the kernel's accept path dropping connections unseen (libuv closes them silently).
    """
    need = 2 * max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return max_connections
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (ValueError, OSError):
        pass
    if soft >= need:
        return max_connections
    cap = max(1, (soft - FD_RESERVE) // 2)
    log.warning(
        "the open-file limit caps client connections below limits.max_connections; raise ulimit -n",
        extra={"nofile": soft, "max_connections": max_connections, "effective": cap},
    )
    return cap


def dataplane_settings(config: Config) -> Settings:
    """The data plane's timeouts and limits, copied once so it never reads the pydantic models."""
    t = config.timeouts
    limits = config.limits
    return Settings(
        connect_timeout=t.connect,
        upstream_header_timeout=t.upstream_header,
        stream_idle_timeout=t.stream_idle or 0.0,
        client_header_timeout=t.client_header,
        idle_timeout=t.idle,
        upstream_idle=t.upstream_idle,
        client_send_timeout=t.client_send or 0.0,
        tunnel_timeout=t.tunnel or 0.0,
        max_header_bytes=limits.max_header_bytes,
        max_body_bytes=-1 if limits.max_body_bytes is None else limits.max_body_bytes,
        max_connections=connection_limit(limits.max_connections),
        via=config.forwarding.via.encode(),
        access_log=config.logging.access_log,
        trusted_proxies=tuple(config.forwarding.trusted_proxies),
    )


def config_lists(config: Config) -> dict[str, list[str]]:
    """Each color's upstreams as the config lists them, host:port."""
    return {c: [str(hp) for hp in config.pools.get(c).upstreams] for c in COLORS}


def color_pools(config: Config, lists: dict[str, list[str]] | None = None) -> dict[str, ColorPool]:
    """One pool per color with the configured upstreams (or ``lists``), all healthy until checked."""
    pools: dict[str, ColorPool] = {}
    for color in COLORS:
        pc = config.pools.get(color)
        addrs = [HostPort.parse(a) for a in lists[color]] if lists else pc.upstreams
        ups = [Upstream(color, hp.host, hp.port, pc.max_idle_per_upstream) for hp in addrs]
        pools[color] = ColorPool(color, ups, pc.balance)
    return pools


def outlier_policy(config: Config, color: str) -> OutlierPolicy:
    o = config.pools.get(color).outlier
    return OutlierPolicy(
        consecutive_failures=o.consecutive_failures,
        base_ejection_time=o.base_ejection_time,
        max_ejection_time=o.max_ejection_time,
        max_ejection_percent=o.max_ejection_percent,
    )


def sticky_policy(config: Config) -> StickyPolicy | None:
    """The sticky-session rules, or None when off. Without sticky.key (or BGPROXY_STICKY_KEY) the
    cookies are signed with a random key made now: fine for one process, but a restart loses every
    pin and a fleet needs one shared key."""
    sticky = config.sticky
    if sticky is None:
        return None
    if sticky.key is None:
        log.warning("sticky.key is not set: sticky cookies are signed with a random key until restart")
        key = os.urandom(32)
    else:
        key = sticky.key.encode()
    return StickyPolicy(
        cookie=sticky.cookie.encode(),
        max_age=sticky.max_age,
        secure=sticky.secure,
        http_only=sticky.http_only,
        same_site=sticky.same_site,
        on_zero_weight=sticky.on_zero_weight,
        key=key,
    )


def preview_policy(config: Config) -> PreviewPolicy | None:
    preview = config.preview
    if preview is None:
        return None
    return PreviewPolicy(
        header=preview.header.lower().encode(),
        cookie=None if preview.cookie is None else preview.cookie.encode(),
        allow_from=tuple(preview.allow_from),
        token=None if preview.token is None else preview.token.encode(),
    )


def rollout_spec(config: RolloutConfig) -> Spec:
    """A rollout's settings from the config's ``rollout:`` section (or the API's merge of it)."""
    intervals = [h.interval for h in config.webhooks if h.type == "confirm_promotion"]
    return Spec(
        steps=tuple(config.steps),
        step_pause=config.step_pause,
        min_requests=config.min_requests,
        bake=config.bake,
        max_error_ratio=config.max_error_ratio,
        max_error_ratio_increase=config.max_error_ratio_increase,
        max_p99=config.max_p99,
        max_p99_ratio=config.max_p99_ratio,
        confidence=config.confidence,
        require_proof=config.require_proof,
        on_insufficient_traffic=config.on_insufficient_traffic,
        progress_deadline=config.progress_deadline,
        gates=frozenset(h.type for h in config.webhooks if h.type in GATE_KINDS),
        gate_interval=min(intervals, default=10.0),
    )


def webhooks(config: RolloutConfig) -> Webhooks:
    return Webhooks(
        [
            Webhook(
                name=h.name,
                kind=h.type,
                url=h.url,
                timeout=h.timeout,
                retries=h.retries,
                on_failure=h.on_failure,
                secret=h.secret,
                interval=h.interval,
            )
            for h in config.webhooks
        ]
    )


def error_matcher(config: RolloutConfig) -> Callable[[int], bool]:
    """Whether a status counts as an error for rollouts (``rollout.error_statuses``), memoized per status."""
    specs = list(config.error_statuses)
    return functools.cache(lambda status: status_matches(specs, status))
