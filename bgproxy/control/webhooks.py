"""Rollout webhooks: gates a rollout waits for, and notices it sends and forgets (after Flagger's).

A gate (``pre_rollout``, ``step``, ``confirm_promotion``) is awaited by the rollout's own task and
answers ok or not; a notice (``post_rollout``, ``rollback``, ``event``) runs in a task of its own, so
a slow or dead webhook holds up at most the rollout that asked it, never the data plane or the admin
API. Every hook is tried 1 + ``retries`` times, each attempt within ``timeout``; any 2xx is a yes.

The body is compact JSON with sorted keys, and with a ``secret`` it is signed like GitHub's webhooks:
``X-Bgproxy-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>``. Secrets and URLs (which
may hold tokens, like Slack's) stay out of logs and details: a hook is named by its name and host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ..core.rollout import GATE_KINDS, NOTICE_KINDS

log = logging.getLogger("bgproxy.webhooks")

SIGNATURE_HEADER = "X-Bgproxy-Signature"
USER_AGENT = "bgproxy-webhook"
ON_FAILURE = ("abort", "pause")
BACKOFF = 0.1  # seconds x attempt number between attempts: a blip is retried, a dead hook fails fast
BODY_SHOWN = 200  # characters of a refusing hook's answer kept in the detail
MAX_PENDING = 256  # notices in flight at most; past it new ones are dropped, so a dead hook cannot pile up


@dataclass(frozen=True, slots=True)
class Webhook:
    """One configured hook; ``interval`` is how often the caller re-asks an unconfirmed confirm_promotion."""

    name: str
    kind: str
    url: str
    timeout: float = 5.0
    retries: int = 2
    on_failure: str = "abort"
    secret: str | None = field(default=None, repr=False)  # never shown: repr() ends up in logs
    interval: float = 10.0

    def __post_init__(self) -> None:
        # A typo in the kind would otherwise make the hook silently never fire.
        if self.kind not in GATE_KINDS + NOTICE_KINDS:
            raise ValueError(
                f"webhook {self.name}: kind must be one of {', '.join(GATE_KINDS + NOTICE_KINDS)}"
                f" (got {self.kind!r})"
            )
        if self.on_failure not in ON_FAILURE:
            raise ValueError(
                f"webhook {self.name}: on_failure must be abort or pause (got {self.on_failure!r})"
            )
        if not self.timeout > 0 or not self.interval > 0 or self.retries < 0:
            raise ValueError(f"webhook {self.name}: timeout and interval must be > 0 and retries >= 0")

    @property
    def host(self) -> str:
        """What logs may say about the URL: its host, never its path or query (they may hold tokens)."""
        try:
            return urlsplit(self.url).hostname or "?"
        except ValueError:
            return "?"


def signature(secret: str, body: bytes) -> str:
    """The X-Bgproxy-Signature value for ``body``: receivers recompute it over the raw bytes they got."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def encode(kind: str, payload: dict[str, Any]) -> bytes:
    """The exact body bytes sent (and signed): the payload plus ``"type": kind``, compact, keys sorted."""
    return json.dumps({**payload, "type": kind}, separators=(",", ":"), sort_keys=True).encode()


class Webhooks:
    """Every configured hook, with one HTTP client session made on first use inside the running loop.

    Stop whatever awaits gate() before close(): a gate cut short by the closed session counts as failed.
    """

    def __init__(self, hooks: Sequence[Webhook]) -> None:
        self._hooks = tuple(hooks)
        self._session: aiohttp.ClientSession | None = None
        self._notices: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        """Notices still being sent."""
        return len(self._notices)

    async def gate(self, kind: str, payload: dict[str, Any]) -> tuple[bool, str, str]:
        """Ask every ``kind`` hook at once; returns (all said 2xx, what each said, abort|pause).

        The third item is "pause" when any failing hook asks for a pause, else "abort". With no
        hook of the kind the gate is open.
        """
        hooks = [hook for hook in self._hooks if hook.kind == kind]
        if not hooks:
            return True, "no webhook", "abort"
        if self._closed:
            raise RuntimeError("webhooks are closed")
        body = encode(kind, payload)
        results = await asyncio.gather(*(self._send(hook, body) for hook in hooks))
        answers = [(hook, ok, f"{hook.name}: {why}") for hook, (ok, why) in zip(hooks, results, strict=True)]
        failed = [(hook, said) for hook, ok, said in answers if not ok]
        if not failed:
            return True, "; ".join(said for _, _, said in answers), "abort"
        on_failure = "pause" if any(hook.on_failure == "pause" for hook, _ in failed) else "abort"
        return False, "; ".join(said for _, said in failed), on_failure

    def notify(self, kind: str, payload: dict[str, Any]) -> None:
        """Send to every ``kind`` hook in the background; failures are logged, never raised.

        The payload is encoded now, so the caller may change it afterwards. Notices run concurrently,
        so a receiver may get two of them out of order.
        """
        hooks = [hook for hook in self._hooks if hook.kind == kind]
        if not hooks:
            return
        try:
            if self._closed:
                raise RuntimeError("webhooks are closed")
            if len(self._notices) >= MAX_PENDING:
                raise RuntimeError(f"{MAX_PENDING} notices already in flight")
            body = encode(kind, payload)
            task = asyncio.get_running_loop().create_task(self._deliver(hooks, body))
        except Exception as exc:
            for hook in hooks:
                log.warning(
                    "webhook notice dropped",
                    extra={"webhook": hook.name, "kind": kind, "host": hook.host, "error": str(exc)},
                )
            return
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def close_when_idle(self) -> None:
        """Take no more calls, let the notices in flight finish (each bounded by its timeouts and
        retries), then close: what a reload does with the hooks it replaces."""
        self._closed = True
        if self._notices:
            await asyncio.gather(*self._notices, return_exceptions=True)
        await self.close()

    async def close(self) -> None:
        """Cancel the notices still in flight and close the session."""
        self._closed = True
        tasks = list(self._notices)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- sending ---------------------------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # trust_env off: a proxy from the environment must not see signed rollout bodies.
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}, trust_env=False)
        return self._session

    async def _deliver(self, hooks: list[Webhook], body: bytes) -> None:
        results = await asyncio.gather(*(self._send(hook, body) for hook in hooks))
        for hook, (ok, why) in zip(hooks, results, strict=True):
            if not ok:
                log.warning(
                    "webhook notice failed",
                    extra={"webhook": hook.name, "kind": hook.kind, "host": hook.host, "error": why},
                )

    async def _send(self, hook: Webhook, body: bytes) -> tuple[bool, str]:
        """Try ``hook`` up to 1 + retries times: (ok, what the last attempt got). Raises only if cancelled."""
        headers = {"Content-Type": "application/json"}
        if hook.secret is not None:
            headers[SIGNATURE_HEADER] = signature(hook.secret, body)
        attempts = 1 + hook.retries
        why = ""
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                await asyncio.sleep(BACKOFF * (attempt - 1))
            ok, why = await self._attempt(hook, body, headers)
            if ok:
                return True, why
        return False, why if attempts == 1 else f"{why} ({attempts} attempts)"

    async def _attempt(self, hook: Webhook, body: bytes, headers: dict[str, str]) -> tuple[bool, str]:
        try:
            # Redirects are not followed: a signed body goes only where it was configured to.
            async with (
                asyncio.timeout(hook.timeout),
                self._client().post(
                    hook.url,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=hook.timeout),
                    allow_redirects=False,
                ) as resp,
            ):
                if 200 <= resp.status < 300:
                    return True, str(resp.status)
                text = (await resp.content.read(4 * BODY_SHOWN)).decode("utf-8", "replace")
        except TimeoutError:
            return False, f"timed out after {hook.timeout:g}s"
        except aiohttp.ClientConnectorError as exc:
            err, code = exc.os_error, exc.os_error.errno
            # "Connection refused" rather than the loop's "Connect call failed (...)"; DNS and TLS
            # errors carry their own text (their errno is not an OS one).
            if isinstance(err, ConnectionError) and isinstance(code, int) and code > 0:
                reason = os.strerror(code)
            else:
                reason = err.strerror or str(err) or type(err).__name__
            return False, f"cannot connect to {exc.host}:{exc.port}: {reason}"
        except aiohttp.InvalidURL:
            return False, "invalid url"
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".rstrip(": ")
            return False, message.replace(hook.url, hook.host) if hook.url else message
        text = " ".join(text.split())
        shown = text[:BODY_SHOWN] + ("..." if len(text) > BODY_SHOWN else "")
        return False, f"{resp.status} {shown}".rstrip()
