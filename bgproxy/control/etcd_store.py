"""The shared state in etcd v3, spoken as JSON over HTTP (etcd's gRPC gateway) with aiohttp.

Why not an etcd client library: the asyncio clients on PyPI all speak gRPC (aetcd 1.0.0, etcd3aio,
etcetra; etcd3 itself is synchronous and last released in 2020, aioetcd3 in 2020), so each would bring
grpcio and protobuf with their tight version pins and native wheels into a proxy that otherwise needs
neither; etcd3-py (the one gateway client) was last released in 2019. etcd serves the same v3 API as
JSON on its client port (on by default, ``--enable-grpc-gateway``), and aiohttp is already here.

Keys under the URL's path (``etcd://host:2379/bgproxy/prod/``): ``state`` holds the document and its
mod_revision is the revision a write compares (a transaction, so two writers can't both win);
``nodes/<node>`` and ``leader`` are attached to leases; ``events/<time-ordered id>`` is the audit log.

What the gateway taught (etcd 3.4): int64 fields come back as strings and zero or false fields are
left out; a bidirectional stream (watch, lease keepalive) gets no answer until the request body has
ended, so a watch can't be sent a progress request and etcd writes nothing on an idle watch: after a
second of silence a linearizable read of the document's revision checks the server (and the cluster's
quorum), and catches a change the watch missed. A lease's TTL is at least 1.5 election timeouts,
rounded up to seconds: 2 s with the default 100 ms heartbeat and 1 s election timeout, so a shorter
``ttl`` lasts that long; expired leases are revoked by a check every 500 ms, so a record or the rollout
lease vanishes within ``max(ceil(ttl), minimum)`` plus about half a second after its last renewal.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import secrets
import ssl
import time
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp

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
_INVALID_TOKEN = "invalid auth token"  # a simple token is lost when etcd restarts, and idles out


class _LeaseGone(StoreUnavailable):
    """A put named a lease that has expired: the caller grants a new one and puts again."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _range_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with ``prefix`` (etcd's convention)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\x00"  # every key
    end[-1] += 1
    return bytes(end)


def _ssl_context(tls: StoreTLS) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


class EtcdStore:
    """``etcd://host:2379/bgproxy/prod/`` (``etcds://`` for TLS); the path is the key prefix."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: StoreTLS | None = None,
    ) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 2379
        path = unquote(parts.path)
        self.prefix = path if path.strip("/") else "/bgproxy/"
        if not self.prefix.endswith("/"):
            self.prefix += "/"  # /bgproxy/prod must not share keys with /bgproxy/production
        secure = parts.scheme == "etcds" or tls is not None
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._base = f"{'https' if secure else 'http'}://{netloc}"
        self._where = f"{parts.scheme}://{netloc} (prefix {self.prefix})"
        self._ssl = _ssl_context(tls or StoreTLS()) if secure else None
        self._credentials = None if username is None else {"name": username, "password": password or ""}
        self._token: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._leases: dict[str, tuple[int, int]] = {}  # node -> (its record's lease, the lease's ttl)
        self._lead_lease: tuple[int, int] | None = None  # the rollout lease's etcd lease, if ours
        self._last_event_ns = 0

    @property
    def where(self) -> str:
        return self._where

    def _key(self, name: str) -> bytes:
        return f"{self.prefix}{name}".encode()

    def _down(self, why: object) -> StoreUnavailable:
        if isinstance(why, TimeoutError):
            why = f"no answer within {TIMEOUT:g} s"
        elif isinstance(why, BaseException):
            why = str(why) or type(why).__name__
        return StoreUnavailable(f"state store {self._where}: {why}")

    def _client(self) -> aiohttp.ClientSession:
        """One session for every call; made on first use, inside the event loop it belongs to."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def _headers(self) -> dict[str, str]:
        if self._credentials is None:
            return {}
        if self._token is None:
            answer = await self._post("/v3/auth/authenticate", self._credentials, {})
            self._token = str(answer.get("token", ""))
        return {"Authorization": self._token}

    async def _post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        """One unary call (or a stream's first answer); any failure is StoreUnavailable."""
        try:
            async with self._client().post(
                self._base + path, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
            ) as response:
                status, raw = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._down(exc) from None
        try:
            data = json.loads(raw.split(b"\n", 1)[0] or b"{}")
            if isinstance(data, dict) and isinstance(data.get("result"), dict):
                data = data["result"]  # a stream's message: {"result": {...}} or {"error": {...}}
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            raise self._down(f"{path}: HTTP {status}, an answer that is not JSON") from None
        answer: dict[str, Any] = data
        error = answer.get("error")
        if isinstance(error, dict):
            error = error.get("message")
        if status // 100 != 2 or error is not None:
            message = str(answer.get("message") or error or f"HTTP {status}")
            if "requested lease not found" in message:
                raise _LeaseGone(f"state store {self._where}: {path}: {message}")
            raise self._down(f"{path}: {message}")
        return answer

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """``_post`` with the auth token, authenticating again once if etcd forgot the token."""
        try:
            return await self._post(path, body, await self._headers())
        except _LeaseGone:
            raise
        except StoreUnavailable as exc:
            if self._credentials is None or _INVALID_TOKEN not in str(exc):
                raise
        self._token = None
        return await self._post(path, body, await self._headers())

    async def _range(self, key: bytes, **options: Any) -> dict[str, Any]:
        return await self._call("/v3/kv/range", {"key": _b64(key), **options})

    async def _get(self, key: bytes) -> dict[str, Any] | None:
        kvs = (await self._range(key)).get("kvs") or []
        return dict(kvs[0]) if kvs else None

    async def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> bool:
        return bool(
            (await self._call("/v3/kv/txn", {"compare": compare, "success": success})).get("succeeded")
        )

    async def _grant(self, seconds: int) -> int:
        return int((await self._call("/v3/lease/grant", {"TTL": str(seconds)}))["ID"])

    async def _keepalive(self, lease: int) -> bool:
        """Renew a lease; False if it has expired (etcd then answers without a TTL)."""
        return int((await self._call("/v3/lease/keepalive", {"ID": str(lease)})).get("TTL", 0)) > 0

    async def read(self) -> Stored | None:
        kv = await self._get(self._key("state"))
        if kv is None:
            return None
        return decode_document(_unb64(kv.get("value", "")), int(kv["mod_revision"]), self._where)

    async def swap(self, revision: int | None, document: str) -> int:
        key = _b64(self._key("state"))
        if revision:
            compare = {"key": key, "target": "MOD", "mod_revision": str(revision)}
        else:
            compare = {"key": key, "target": "CREATE", "create_revision": "0"}
        answer = await self._call(
            "/v3/kv/txn",
            {
                "compare": [compare],
                "success": [{"request_put": {"key": key, "value": _b64(document)}}],
                "failure": [{"request_range": {"key": key, "keys_only": True}}],
            },
        )
        if answer.get("succeeded"):
            return int(answer["header"]["revision"])  # the put's revision: the key's new mod_revision
        kvs = answer["responses"][0]["response_range"].get("kvs") or []
        raise StoreConflict(revision or 0, int(kvs[0]["mod_revision"]) if kvs else 0)

    async def _revision(self) -> int:
        """The document's mod_revision by a linearizable read: proves the server and its quorum live."""
        kvs = (await self._range(self._key("state"), keys_only=True)).get("kvs") or []
        return int(kvs[0]["mod_revision"]) if kvs else 0

    async def _open_watch(self) -> tuple[aiohttp.ClientResponse, bytearray, int]:
        """A watch on the document: the response, what was read past "created", and the revision then."""
        body = {"create_request": {"key": _b64(self._key("state"))}}
        timeout = aiohttp.ClientTimeout(total=None, connect=TIMEOUT, sock_connect=TIMEOUT)
        for attempt in (1, 2):
            headers = await self._headers()
            try:
                response = await self._client().post(
                    self._base + "/v3/watch", json=body, headers=headers, timeout=timeout
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise self._down(exc) from None
            try:
                buffer = bytearray()
                if response.status != 200:
                    raise self._down(f"/v3/watch: HTTP {response.status}")
                line = await self._line(response, buffer)
                if line is None:
                    raise self._down(f"/v3/watch: not created within {TIMEOUT:g} s")
                result = self._watch_result(line)
                if result.get("canceled"):
                    reason = str(result.get("cancel_reason", "canceled"))
                    if attempt == 1 and self._credentials is not None and _INVALID_TOKEN in reason:
                        self._token = None
                        response.close()
                        continue
                    raise self._down(f"/v3/watch: {reason}")
                return response, buffer, int(result["header"]["revision"])
            except BaseException:
                response.close()
                raise
        raise AssertionError("unreachable")

    async def _line(self, response: aiohttp.ClientResponse, buffer: bytearray) -> bytes | None:
        """The next line of a stream, or None after TIMEOUT of silence (nothing read is lost)."""
        while b"\n" not in buffer:
            try:
                async with asyncio.timeout(TIMEOUT):
                    chunk = await response.content.readany()  # cancelled only while waiting
            except TimeoutError:
                return None
            except (aiohttp.ClientError, OSError) as exc:
                raise self._down(exc) from None
            if not chunk:
                raise self._down("the watch was closed")
            buffer += chunk
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        return line

    def _watch_result(self, line: bytes) -> dict[str, Any]:
        try:
            message = json.loads(line)
            result = message.get("result")
            if not isinstance(result, dict):
                error = message.get("error")
                reason = (
                    error.get("message") if isinstance(error, dict) else line[:200].decode(errors="replace")
                )
                raise self._down(f"/v3/watch: {reason}")
        except (ValueError, AttributeError):
            raise self._down("/v3/watch: an answer that is not JSON") from None
        return result

    async def changes(self) -> AsyncGenerator[None, None]:
        response, buffer, known = await self._open_watch()
        try:
            yield None  # watching: anything written before now is for the caller's read to see
            while True:
                line = await self._line(response, buffer)
                if line is None:
                    revision = await self._revision()  # raises when the server is gone
                    if revision > known:  # a change the watch did not deliver (or not yet)
                        known = revision
                        yield None
                    continue
                if not line.strip():
                    continue
                result = self._watch_result(line)
                if result.get("canceled"):
                    raise self._down(f"/v3/watch: {result.get('cancel_reason', 'canceled')}")
                events = result.get("events") or []
                if events:
                    known = max(known, *(int(e.get("kv", {}).get("mod_revision", 0)) for e in events))
                    yield None
        finally:
            response.close()

    async def beat(self, node: str, record: dict[str, Any], ttl: float) -> None:
        seconds = max(1, math.ceil(ttl))
        key = _b64(self._key(f"nodes/{node}"))
        value = _b64(json.dumps(record))
        held = self._leases.get(node)
        if held is None or held[1] != seconds or not await self._keepalive(held[0]):
            held = self._leases[node] = (await self._grant(seconds), seconds)
        try:
            await self._call("/v3/kv/put", {"key": key, "value": value, "lease": str(held[0])})
        except _LeaseGone:  # expired between the keepalive and the put
            held = self._leases[node] = (await self._grant(seconds), seconds)
            await self._call("/v3/kv/put", {"key": key, "value": value, "lease": str(held[0])})

    async def nodes(self) -> dict[str, dict[str, Any]]:
        start = self._key("nodes/")
        answer = await self._range(start, range_end=_b64(_range_end(start)))
        records = {
            _unb64(kv["key"])[len(start) :].decode(): kv.get("value", "") for kv in answer.get("kvs") or []
        }
        return {node: record for node, value in records.items() if (record := readable(_unb64(value)))}

    async def lead(self, node: str, ttl: float) -> bool:
        seconds = max(1, math.ceil(ttl))
        key = self._key("leader")
        kv = await self._get(key)
        if kv is None:  # free: take it, unless another node does first
            lease = await self._grant(seconds)
            taken = await self._txn(
                [{"key": _b64(key), "target": "CREATE", "create_revision": "0"}],
                [{"request_put": {"key": _b64(key), "value": _b64(node), "lease": str(lease)}}],
            )
            self._lead_lease = (lease, seconds) if taken else None
            return taken
        if _unb64(kv.get("value", "")) != node.encode():
            return False
        held = int(kv.get("lease", 0))
        if self._lead_lease == (held, seconds) and await self._keepalive(held):
            return True  # the lease lives, so the key is still ours
        # Ours by name, but on a lease this instance did not grant with this ttl (or that expired):
        # move it to a new lease, unless it changed meanwhile.
        lease = await self._grant(seconds)
        moved = await self._txn(
            [{"key": _b64(key), "target": "MOD", "mod_revision": str(kv["mod_revision"])}],
            [{"request_put": {"key": _b64(key), "value": _b64(node), "lease": str(lease)}}],
        )
        self._lead_lease = (lease, seconds) if moved else None
        return moved

    async def resign(self, node: str) -> None:
        key = _b64(self._key("leader"))
        await self._txn(
            [{"key": key, "target": "VALUE", "value": _b64(node)}], [{"request_delete_range": {"key": key}}]
        )
        self._lead_lease = None  # its etcd lease, now holding nothing, simply expires

    async def leader(self) -> str | None:
        kv = await self._get(self._key("leader"))
        return None if kv is None else _unb64(kv.get("value", "")).decode()

    async def append_event(self, event: dict[str, Any]) -> None:
        # Time-ordered ids (never backwards on this node) with a random tail against other nodes.
        self._last_event_ns = max(time.time_ns(), self._last_event_ns + 1)
        start = self._key("events/")
        key = start + f"{self._last_event_ns:020d}-{secrets.token_hex(4)}".encode()
        await self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(json.dumps(event))})
        # Trim only once the log is a tenth over: one cheap count per append, a delete per many.
        end = _b64(_range_end(start))
        count = int((await self._range(start, range_end=end, count_only=True)).get("count", 0))
        if count <= EVENTS_KEPT + EVENTS_KEPT // 10:
            return
        newest = await self._range(
            start,
            range_end=end,
            keys_only=True,
            sort_order="DESCEND",
            sort_target="KEY",
            limit=EVENTS_KEPT + 1,
        )
        kvs = newest.get("kvs") or []
        if len(kvs) > EVENTS_KEPT:
            last = _unb64(kvs[EVENTS_KEPT]["key"])  # the newest of those to drop
            await self._call("/v3/kv/deleterange", {"key": _b64(start), "range_end": _b64(last + b"\x00")})

    async def events(self) -> list[dict[str, Any]]:
        start = self._key("events/")
        answer = await self._range(
            start,
            range_end=_b64(_range_end(start)),
            sort_order="DESCEND",
            sort_target="KEY",
            limit=EVENTS_KEPT,
        )
        values = [_unb64(kv.get("value", "")) for kv in reversed(answer.get("kvs") or [])]
        return [event for value in values if (event := readable(value))]

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
