"""A fleet's one switch: the interface of a shared state store (etcd or Redis) and its document.

Every node of a fleet holds the same document: the switch state (weights, version, pools, rollouts)
plus who wrote it and how (the drain timeout a flip asked for travels with it). Each write is a
compare-and-swap on the store's own revision of that document (etcd's mod_revision, a counter in
Redis), so two writers that read the same revision can never both win; the switch's version, which
clients send as If-Match, is checked against the document the node has applied.

Beside the document each node keeps a record under a time-to-live (what it runs, when it applied it,
its request counters for the rollout leader), one node holds the rollout lease, and the audit log is
a bounded list, so ``/v1/events`` reads the same on every node.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.errors import SwitchError
from ..core.jsontext import loads_strict
from .state import PersistedState, decode_state, encode_state

EVENTS_KEPT = 1000  # the fleet's audit log: newest first out of the store past this many


class StoreUnavailable(Exception):
    """The store did not answer (or answered an error): the message says which store and why."""


class StoreConflict(Exception):
    """The document changed since the revision the write was based on: another node wrote first."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"the shared state is at revision {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


class StoreDataError(StoreUnavailable):
    """The store holds a document this bgproxy cannot read (damaged, or from a newer bgproxy); the
    fleet treats it as an outage: the last good state keeps serving and changes are refused."""


@dataclass(frozen=True, slots=True)
class StoreTLS:
    """``state_store_tls``: files for verifying the store (ca) and for a client certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """The document as read: the state, the store's revision of it, and who wrote it how."""

    state: PersistedState
    revision: int
    change: dict[str, Any]


def encode_document(state: PersistedState, change: dict[str, Any]) -> str:
    return json.dumps({"state": encode_state(state), "change": change}, separators=(",", ":"))


def decode_document(text: str | bytes, revision: int, where: str) -> Stored:
    try:
        data = loads_strict(text.decode("utf-8") if isinstance(text, bytes) else text)
        if not isinstance(data, dict) or set(data) != {"state", "change"}:
            raise ValueError("expected an object with exactly state and change")
        change = data["change"]
        if not isinstance(change, dict):
            raise ValueError("change must be an object")
        return Stored(decode_state(data["state"]), revision, change)
    except (ValueError, SwitchError, UnicodeDecodeError) as exc:
        raise StoreDataError(f"{where}: the shared state does not read: {exc}") from None


def readable(raw: bytes | str) -> dict[str, Any] | None:
    """A node record or an audit event as stored; None for one that does not read (damaged, or from
    a newer bgproxy), which the stores skip: one bad entry must not hide the others."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class SharedStore(Protocol):
    """What the fleet needs from a store; every method raises StoreUnavailable when it is down."""

    @property
    def where(self) -> str:
        """The store's address and key prefix, for logs and errors (never with credentials)."""

    async def read(self) -> Stored | None:
        """The document, or None if none was ever written; StoreDataError if it does not read."""

    async def swap(self, revision: int | None, document: str) -> int:
        """Write ``document`` if the stored revision is still ``revision`` (None: if there is none
        yet); returns the new revision, raises StoreConflict naming the one there is."""

    def changes(self) -> AsyncGenerator[None, None]:
        """Yields whenever the document may have changed (read it to see); ends or raises
        StoreUnavailable when the connection drops, and the caller starts it again."""

    async def beat(self, node: str, record: dict[str, Any], ttl: float) -> None:
        """Publish this node's record; it disappears ``ttl`` seconds after the last beat."""

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """The live nodes' records by node id."""

    async def lead(self, node: str, ttl: float) -> bool:
        """Take or keep the rollout lease for ``ttl`` seconds; False while another node holds it."""

    async def resign(self, node: str) -> None:
        """Give the lease up now (a clean stop), if this node holds it."""

    async def leader(self) -> str | None:
        """The node holding the lease, if any."""

    async def append_event(self, event: dict[str, Any]) -> None:
        """Add to the fleet's audit log, keeping the newest EVENTS_KEPT."""

    async def events(self) -> list[dict[str, Any]]:
        """The fleet's audit log, oldest first."""

    async def close(self) -> None:
        """Release connections (records and the lease simply time out)."""
