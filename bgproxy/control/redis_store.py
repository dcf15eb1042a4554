"""The shared state in Redis (redis-py's asyncio client): one hash, a channel, node keys, a lease.

``<prefix>state`` holds the document and its revision; a Lua script compares the revision, writes and
publishes on ``<prefix>changes`` in one step, so a write is atomic and every subscriber hears of it.
Node records are keys with a PX expiry, listed in a set; the rollout lease is a key set NX PX by
its holder and renewed only by it (a script compares the holder first).

Timeouts are short and redis-py retries once (a pooled connection left from before a store restart
fails once), then gives up: the fleet service retries on its own clock, and an answer of 503 within
a second beats a request hanging through a store outage.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .shared import (
    EVENTS_KEPT,
    StoreConflict,
    Stored,
    StoreTLS,
    StoreUnavailable,
    decode_document,
    readable,
)

TIMEOUT = 1.0

# KEYS: state hash, changes channel; ARGV: expected revision (0: none yet), document.
_SWAP = """
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then return {0, rev} end
rev = rev + 1
redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'rev', rev)
redis.call('PUBLISH', KEYS[2], rev)
return {1, rev}
"""

# KEYS: lease key; ARGV: node, ttl in ms. Take it if free, renew it if ours.
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """``redis://host:port/db?prefix=bgproxy:prod`` (``rediss://`` for TLS)."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: StoreTLS | None = None,
    ) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.prefix = query.get("prefix", ["bgproxy:"])[0]
        db = int(parts.path.strip("/") or 0)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        self._where = f"{parts.scheme}://{host}:{port}/{db} (prefix {self.prefix})"
        options: dict[str, Any] = {}
        if tls is not None or parts.scheme == "rediss":
            tls = tls or StoreTLS()
            options = {
                "ssl": True,
                "ssl_ca_certs": tls.ca_file,
                "ssl_certfile": tls.cert_file,
                "ssl_keyfile": tls.key_file,
            }
        self._redis = aioredis.Redis(
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            # Once, on a connection error only: a pooled connection may be stale after a restart. A
            # timeout is not retried: the server is slow or gone, and the caller hears of it in 1 s.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            **options,
        )
        self._swap = self._redis.register_script(_SWAP)
        self._lead = self._redis.register_script(_LEAD)
        self._resign = self._redis.register_script(_RESIGN)

    @property
    def where(self) -> str:
        return self._where

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    @contextlib.contextmanager
    def _answering(self) -> Iterator[None]:
        """Every Redis or socket error of a call, as StoreUnavailable naming the store."""
        try:
            yield
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"state store {self._where}: {exc or type(exc).__name__}") from None

    async def read(self) -> Stored | None:
        with self._answering():
            doc, rev = await self._redis.hmget(self._key("state"), ["doc", "rev"])
        if doc is None or rev is None:
            return None
        return decode_document(doc, int(rev), self._where)

    async def swap(self, revision: int | None, document: str) -> int:
        keys = [self._key("state"), self._key("changes")]
        with self._answering():
            ok, rev = await self._swap(keys=keys, args=[revision or 0, document])
        if not ok:
            raise StoreConflict(revision or 0, int(rev))
        return int(rev)

    async def changes(self) -> AsyncGenerator[None, None]:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            with self._answering():
                await pubsub.subscribe(self._key("changes"))
                yield None  # subscribed: anything written before now is for the caller's read to see
                awaiting_pong = False
                while True:
                    message = await pubsub.get_message(timeout=TIMEOUT)
                    if message is not None:
                        kind = message.get("type")
                        if kind == "message":
                            yield None
                        elif kind == "pong":
                            awaiting_pong = False
                        continue
                    # A second of silence: is the server there (a round trip on the command connection,
                    # answered within TIMEOUT or raising), and is this subscription (its PONG must come
                    # back before the next second of silence ends)?
                    if awaiting_pong:
                        raise StoreUnavailable(
                            f"state store {self._where}: the subscription stopped answering"
                        )
                    await self._redis.ping()
                    await pubsub.ping()
                    awaiting_pong = True
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def beat(self, node: str, record: dict[str, Any], ttl: float) -> None:
        with self._answering():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key(f"node:{node}"), json.dumps(record), px=int(ttl * 1000))
                pipe.sadd(self._key("nodes"), node)
                await pipe.execute()

    async def nodes(self) -> dict[str, dict[str, Any]]:
        with self._answering():
            names = sorted(_text(n) for n in await self._redis.smembers(self._key("nodes")))
            if not names:
                return {}
            values = await self._redis.mget([self._key(f"node:{n}") for n in names])
            gone = [n for n, v in zip(names, values, strict=True) if v is None]
            if gone:
                await self._redis.srem(self._key("nodes"), *gone)
        return {n: r for n, v in zip(names, values, strict=True) if v is not None and (r := readable(v))}

    async def lead(self, node: str, ttl: float) -> bool:
        with self._answering():
            return bool(await self._lead(keys=[self._key("leader")], args=[node, int(ttl * 1000)]))

    async def resign(self, node: str) -> None:
        with self._answering():
            await self._resign(keys=[self._key("leader")], args=[node])

    async def leader(self) -> str | None:
        with self._answering():
            holder = await self._redis.get(self._key("leader"))
        return None if holder is None else _text(holder)

    async def append_event(self, event: dict[str, Any]) -> None:
        with self._answering():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(self._key("events"), json.dumps(event))
                pipe.ltrim(self._key("events"), -EVENTS_KEPT, -1)
                await pipe.execute()

    async def events(self) -> list[dict[str, Any]]:
        with self._answering():
            lines = await self._redis.lrange(self._key("events"), 0, -1)
        return [e for line in lines if (e := readable(line))]

    async def close(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
