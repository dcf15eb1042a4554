"""Where the switch state survives a restart: the StateBackend interface and its file backend.

The file is small JSON written atomically: a reader sees the old state or the new one, never a mix.
It is read back strictly: a file that does not parse exactly is an error, because silently falling
back to the config's weights could send production traffic to the wrong color.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import SwitchError
from ..core.jsontext import exact_keys, loads_strict
from ..core.timefmt import parse_rfc3339, rfc3339
from ..core.weights import Weights

FORMAT = 3  # 2 added "rollouts", 3 added "pools"; older files are still read (as having none)
_KEYS = {
    1: ("weights", "version", "updated_at", "format"),
    2: ("weights", "version", "updated_at", "rollouts", "format"),
    3: ("weights", "version", "updated_at", "pools", "rollouts", "format"),
}


class StateFileError(Exception):
    """The state file cannot be read, parsed or written; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"state file {path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True, slots=True)
class PersistedState:
    """What survives a restart: weights, version and the recent rollouts. Events and drains are not kept."""

    weights: Weights
    version: int
    updated_at: float  # Unix time
    rollouts: tuple[dict[str, Any], ...] = ()  # core.rollout records, oldest first, the last maybe running
    # Pool membership changed at run time (API, or a reload whose file changed it): color -> upstreams
    # as host:port, plus the config's list it was changed from ("most recent intent wins" on reload).
    pools: dict[str, Any] | None = None


class StateBackend(Protocol):
    """Loads and saves the one persisted switch state (the fleet issue adds etcd and Redis)."""

    @property
    def where(self) -> str:
        """Where the state lives, for logs (never with credentials)."""

    def load(self) -> PersistedState | None:
        """The saved state, or None before the first save; raises on anything unreadable."""

    def save(self, state: PersistedState) -> None:
        """Replace the saved state, durably, before returning; raises if it could not."""


class FileStateBackend:
    """Reads and atomically replaces one state file (``state_file`` in the config)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def where(self) -> str:
        return str(self.path)

    def load(self) -> PersistedState | None:
        """The saved state, or None if there is no file yet (first start)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(self.path, f"cannot read it: {exc.strerror or exc}") from None
        if not raw.strip():
            raise StateFileError(self.path, "is empty")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateFileError(self.path, f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
        try:
            data = loads_strict(text)
        except ValueError as exc:
            raise StateFileError(self.path, f"not valid JSON: {exc}") from None
        try:
            return decode_state(data)
        except (SwitchError, ValueError) as exc:
            raise StateFileError(self.path, str(exc)) from None

    def save(self, state: PersistedState) -> None:
        """Write a temp file, fsync, rename it over the old one, fsync the directory so the rename lasts."""
        text = json.dumps(encode_state(state), indent=2)
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StateFileError(self.path, f"cannot write it: {exc.strerror or exc}") from exc


def encode_state(state: PersistedState) -> dict[str, Any]:
    """The state as the file holds it (and, in a fleet, the shared store's document)."""
    return {
        "weights": state.weights.as_dict(),
        "version": state.version,
        "updated_at": rfc3339(state.updated_at),
        "pools": state.pools,
        "rollouts": list(state.rollouts),
        "format": FORMAT,
    }


def decode_state(data: Any) -> PersistedState:
    """The inverse of encode_state, strictly: raises ValueError (or SwitchError) naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"top level must be a JSON object, got {type(data).__name__}")
    version_of_file = data.get("format")
    if isinstance(version_of_file, bool) or version_of_file not in _KEYS:
        raise ValueError(
            f"format must be 1 to {FORMAT} (got {version_of_file!r}); it may be from a newer bgproxy"
        )
    exact_keys(data, _KEYS[version_of_file], "the state")
    rollouts = data.get("rollouts", [])
    if not isinstance(rollouts, list) or not all(isinstance(r, dict) for r in rollouts):
        raise ValueError("rollouts must be a list of JSON objects")
    weights = Weights.from_mapping(data["weights"])
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be an integer >= 0, got {version!r}")
    stamp = data["updated_at"]
    try:
        if not isinstance(stamp, str):
            raise ValueError("not a string")
        updated_at = parse_rfc3339(stamp)
    except ValueError:
        raise ValueError(
            f"updated_at must be an RFC 3339 time like 2024-05-01T12:00:00Z, got {stamp!r}"
        ) from None
    pools = data.get("pools")
    if pools is not None and not isinstance(pools, dict):
        raise ValueError("pools must be a JSON object or null")
    return PersistedState(
        weights=weights, version=version, updated_at=updated_at, rollouts=tuple(rollouts), pools=pools
    )
