"""The audit log that survives restarts: an append-only JSON-lines file, fsynced per event, rotated by size.

Every change an operator or a rollout makes (switch, pool membership, config reload, rollout decision)
is one line of compact JSON: an object with at least ``time`` (RFC 3339), ``kind``, ``actor`` and
``reason``, plus fields of its kind. A line is on disk before ``append`` returns, so ``GET /v1/events``
after a kill -9 shows every change that was acknowledged.

Reading back is forgiving where the state file is strict: the audit log only informs, so a line that
does not parse (the torn tail of a write cut off by kill -9, or damage elsewhere) is skipped with a
warning naming the file and line, never a failed start. Only a file that exists but cannot be read at
all raises, since a log we cannot read is one we cannot append to either, and that is better found at
start than at the first switch.

The log holds exactly what callers pass and this module adds nothing: callers pass the actor's name
(never a token), the reason and non-secret fields only, because the file outlives the request and is
read by whoever can read the state directory.

The file belongs to bgproxy: it rotates the file itself (``path`` -> ``path.1`` ... ``path.<keep>``),
so do not point logrotate at it. A writer that finds the file replaced or removed under it (another
bgproxy during a takeover rotated it) reopens it at the next append.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Any

from ..core.jsontext import loads_strict
from ..core.switchboard import SwitchEvent
from ..core.timefmt import parse_rfc3339, rfc3339

log = logging.getLogger("bgproxy.audit")

REQUIRED = ("time", "kind", "actor", "reason")


class AuditLogError(Exception):
    """The audit log cannot be read or written; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"audit log {path}: {problem}")
        self.path = path
        self.problem = problem


def audit_event(kind: str, *, at: float, actor: str, reason: str | None, **fields: Any) -> dict[str, Any]:
    """An event in the log's shape: the four common keys first, so the file reads well by eye."""
    if "time" in fields:
        raise TypeError("pass the time as `at` (Unix time), not as a field")
    return {"time": rfc3339(at), "kind": kind, "actor": actor, "reason": reason, **fields}


def switch_event(event: SwitchEvent) -> dict[str, Any]:
    """A switchboard change as an audit event, with the fields ``GET /v1/events`` shows today."""
    return audit_event(
        "switch",
        at=event.at,
        actor=event.actor,
        reason=event.reason,
        version=event.version,
        from_weights=event.from_weights.as_dict(),
        to_weights=event.to_weights.as_dict(),
    )


def check_event(event: object) -> dict[str, Any]:
    """The event if it has the common keys with the right types; ValueError saying what is wrong."""
    if not isinstance(event, dict):
        raise ValueError(f"an audit event must be a JSON object, got {type(event).__name__}")
    for key in REQUIRED:
        if key not in event:
            raise ValueError(f"missing key {key!r}")
    stamp, kind, actor, reason = (event[key] for key in REQUIRED)
    try:
        if not isinstance(stamp, str):
            raise ValueError("not a string")
        parse_rfc3339(stamp)
    except ValueError:
        raise ValueError(f"time must be an RFC 3339 time like 2024-05-01T12:00:00Z, got {stamp!r}") from None
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    if not isinstance(actor, str):
        raise ValueError(f"actor must be a string, got {actor!r}")
    if reason is not None and not isinstance(reason, str):
        raise ValueError(f"reason must be a string or null, got {reason!r}")
    return event


def _decode_line(line: bytes) -> dict[str, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        data = loads_strict(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return check_event(data)


def _fsync_dir(directory: Path) -> None:
    """A new or renamed file's name lasts through a crash only once its directory is fsynced."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    """One audit log file with its rotated predecessors, and the newest ``memory`` events in memory.

    ``append`` may run in a worker thread (``asyncio.to_thread``, since fsync takes milliseconds):
    writes are serialised by a lock, and ``events`` only takes a short lock that no fsync holds, so
    the event loop never waits for the disk.
    """

    def __init__(self, path: Path, *, max_bytes: int = 1_000_000, keep: int = 3, memory: int = 1000) -> None:
        for name, value, least in (("max_bytes", max_bytes, 1), ("keep", keep, 0), ("memory", memory, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: int | None = None
        self._torn_tail = False  # the open file does not end with "\n": the next line must start one
        self._closed = False
        self._write_lock = threading.Lock()  # held across write and fsync
        self._memory_lock = threading.Lock()  # held only to touch the deque
        self._memory: deque[dict[str, Any]] = deque(maxlen=memory)

    @property
    def where(self) -> str:
        """Where the log lives, for logs."""
        return str(self.path)

    def rotated(self, n: int) -> Path:
        """The n-th rotated file: ``path.1`` is the newest, ``path.<keep>`` the oldest."""
        return self.path.with_name(f"{self.path.name}.{n}")

    def load(self) -> list[dict[str, Any]]:
        """Read the rotated files oldest first, then the current one; keep and return the newest events.

        Lines that are not valid events are skipped with a warning; a missing file is an empty log;
        a file that exists but cannot be read raises AuditLogError.
        """
        events: deque[dict[str, Any]] = deque(maxlen=self._memory.maxlen)
        with self._write_lock:  # a half-written line of our own must not look torn
            for n in range(self.keep, 0, -1):
                self._read(self.rotated(n), events)
            self._read(self.path, events)
        with self._memory_lock:
            self._memory = events
            return list(events)

    def _read(self, path: Path, into: deque[dict[str, Any]]) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AuditLogError(path, f"cannot read it: {exc.strerror or exc}") from None
        lines = raw.split(b"\n")  # a file ending in "\n" gives an empty last item
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                into.append(_decode_line(line))
            except ValueError as exc:
                if number == len(lines):  # no "\n" after it: the write was cut off
                    log.warning(
                        "audit log %s: torn last line %d skipped (cut off mid-write, as by kill -9): %s",
                        path,
                        number,
                        exc,
                    )
                else:
                    log.warning("audit log %s: line %d skipped, not a valid event: %s", path, number, exc)

    def open(self) -> None:
        """Open the file for appending now, so an unwritable path fails the start, not the first event."""
        with self._write_lock:
            self._check_open()
            try:
                self._ensure_open()
            except OSError as exc:
                raise AuditLogError(
                    self.path, f"cannot open it for appending: {exc.strerror or exc}"
                ) from exc

    def append(self, event: dict[str, Any]) -> None:
        """Write the event as one line and fsync it before returning; rotate first if the file is full.

        A line longer than ``max_bytes`` is still written, alone in a fresh file: an event is never
        dropped for its size. On failure raises AuditLogError and the event is not kept in memory
        either, so memory never shows a change the file lacks. A malformed event (missing common keys,
        not JSON-serialisable) is the caller's bug and raises ValueError before anything is written.
        """
        check_event(event)
        try:
            # ASCII only: a lone surrogate in a reason would not encode as UTF-8 and lose the event
            text = json.dumps(event, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"audit event is not JSON: {exc}") from None
        stored = json.loads(text)  # memory holds what a restart would read back, not the caller's dict
        line = (text + "\n").encode("ascii")
        with self._write_lock:
            self._check_open()
            try:
                fd = self._ensure_open()
                size = os.fstat(fd).st_size
                if size > 0 and size + self._torn_tail + len(line) > self.max_bytes:
                    fd = self._rotate()
                data = b"\n" + line if self._torn_tail else line
                view = memoryview(data)
                while view:  # a regular file may take a write in parts (a full disk, a signal)
                    view = view[os.write(fd, view) :]
                self._torn_tail = False
                os.fsync(fd)
            except OSError as exc:
                # reopen next time: that re-checks the tail, so a part-written line gets its own line
                self._drop_fd()
                raise AuditLogError(self.path, f"cannot write it: {exc.strerror or exc}") from exc
            with self._memory_lock:
                self._memory.append(stored)

    def events(self) -> list[dict[str, Any]]:
        """The newest events in memory, oldest first."""
        with self._memory_lock:
            return list(self._memory)

    def close(self) -> None:
        """Close the file; later appends raise. Calling it twice is harmless."""
        with self._write_lock:
            self._closed = True
            self._drop_fd()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise AuditLogError(self.path, "is closed")

    def _ensure_open(self) -> int:
        """The append fd, reopened if the file at ``path`` is no longer the one it points to."""
        if self._fd is not None:
            try:
                st, ours = os.stat(self.path), os.fstat(self._fd)
                if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
                    return self._fd
            except FileNotFoundError:
                pass
            self._drop_fd()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            self._torn_tail = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            _fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return fd

    def _rotate(self) -> int:
        """Shift ``path`` -> ``path.1`` -> ... -> ``path.<keep>``, dropping the oldest; a fresh fd.

        Renames go from the oldest slot down, so a crash between two of them leaves a gap in the
        numbering but every file still in order, and nothing duplicated.
        """
        self._drop_fd()
        if self.keep == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        else:
            extra = self.keep + 1  # left from a larger `keep` before a restart
            while os.path.lexists(self.rotated(extra)):
                os.unlink(self.rotated(extra))
                extra += 1
            for n in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.rotated(n), self.rotated(n + 1))
            os.replace(self.path, self.rotated(1))
        return self._ensure_open()  # which fsyncs the directory: the renames last too

    def _drop_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
