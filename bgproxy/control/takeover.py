"""Upgrading bgproxy itself without dropping a connection: inherited listening sockets.

Two sources, one result (a dict name -> listening socket, names "proxy" and "admin"):

- **takeover** (HAProxy's ``-x``): the new process asks the running one over its runtime socket (a Unix
  socket, mode 0600) and receives the very same kernel listening sockets (SCM_RIGHTS duplicates the
  descriptors), so a connection waiting in the accept backlog is never lost and none is refused: until
  the new process says it accepts, the old one keeps accepting; after that both hold the socket and
  either may accept, and the old one stops and drains.
- **systemd socket activation** (``LISTEN_FDS``/``LISTEN_PID``, sd_listen_fds(3)).

Takeover protocol, version 1: newline-terminated JSON messages over a Unix stream socket.

1. new -> old ``{"op": "takeover", "version": 1, "pid": N}``
2. old -> new ``{"op": "sockets", "version": 1, "pid": M, "sockets": [{"name": "proxy", "family":
   "AF_INET", "address": "127.0.0.1:8080"}, ...]}`` with the descriptors, in that order, attached
   (SCM_RIGHTS) to this message; or ``{"op": "error", "version": 1, "error": "why"}`` and close.
3. new -> old ``{"op": "ready", "version": 1, "pid": N}`` once it accepts on all of them, or
   ``{"op": "abort", "version": 1, "reason": "why"}`` if it will not serve after all.
4. old -> new ``{"op": "ack", "version": 1}``; the old process has already stopped listening on the
   runtime socket and removed its file (so the new one can bind its own there), and now calls
   ``on_handed_over`` (the wiring starts the SIGTERM shutdown there: stop accepting, drain, exit).

The error reply and the request's ``version`` field never change, so any two versions can tell each
other they disagree. One takeover at a time; only the same user (SO_PEERCRED on Linux).

What it guarantees:

- At every moment at least one process accepts on each listening socket: the old one until the ack,
  the new one from before "ready". The descriptors name one kernel socket, so connections queued in its
  backlog stay queued whichever process closes its descriptor; neither may ``shutdown()`` it.
- A connection belongs to the process that accepted it. The old process serves its own to completion
  in its drain (closing idle keep-alive connections gracefully is the data plane's drain, not this).
- Every step has a timeout. If the new process fails, leaves, aborts or times out before "ready", the
  old one logs a warning and carries on as before; a later takeover may try again.
- If the ack cannot be sent, the old process keeps serving (and listens on the runtime socket again).
  If it does not arrive, ``ready()`` raises, and the new process keeps serving all the same: the old
  one has stopped or still serves, and two processes accepting on one socket lose nothing.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

log = logging.getLogger("bgproxy.takeover")

PROTOCOL_VERSION = 1
SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): systemd passes the sockets from fd 3 on
DEFAULT_NAMES = ("proxy", "admin")  # systemd sockets without usable names, in order
_MAX_MESSAGE = 64 * 1024
_MAX_FDS = 32  # ancillary space for received descriptors: more than bgproxy ever hands over
_REFUSAL_TIMEOUT = 1.0  # how long an error reply may take to send; the peer may already be gone
_ENV_KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class TakeoverError(Exception):
    """A takeover failed; the message names the runtime socket and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"takeover socket {path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class SocketActivationError(Exception):
    """systemd passed sockets bgproxy cannot use (LISTEN_FDS is malformed, a descriptor is no listener)."""


class _ProtocolError(Exception):
    """The peer sent something this protocol version does not allow; the message says what."""


def format_address(address: Any) -> str:
    """A socket address as config writes it: "127.0.0.1:8080", "[::1]:8080" or a Unix path."""
    if isinstance(address, tuple):
        host, port = str(address[0]), address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(address, bytes):  # Linux abstract namespace
        return "@" + address[1:].decode(errors="replace")
    return str(address)


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _ProtocolError(f"not a JSON message: {line[:80]!r}") from None
    if not isinstance(message, dict):
        raise _ProtocolError(f"not a JSON object: {line[:80]!r}")
    return message


def _split_line(buffer: bytearray) -> dict[str, Any] | None:
    """Take one complete message off the front of ``buffer``, if there is one."""
    end = buffer.find(b"\n")
    if end < 0:
        if len(buffer) > _MAX_MESSAGE:
            raise _ProtocolError(f"message longer than {_MAX_MESSAGE} bytes")
        return None
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    return _decode(line)


def _peer_credentials(sock: socket.socket) -> tuple[int | None, int | None]:
    """(pid, uid) of the process at the other end, or (None, None) where the OS cannot tell (not Linux).

    Elsewhere only the socket file's mode 0600 keeps other users out.
    """
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None, None
    size = struct.calcsize("3i")
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, size))
    return pid, uid


def _is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


# -- the running (old) process ----------------------------------------------------------------------------


class TakeoverServer:
    """The running process's side: hands its listening sockets to one new process at a time.

    ``sockets()`` is asked at each takeover (so it sees the listeners as they are then);
    ``on_handed_over()`` runs on the event loop once the new process has confirmed it accepts.
    """

    def __init__(
        self,
        path: Path,
        sockets: Callable[[], Mapping[str, socket.socket]],
        on_handed_over: Callable[[], None],
        *,
        timeout: float = 10.0,
        ready_timeout: float = 60.0,
        on_begin: Callable[[], Awaitable[None] | None] | None = None,
        on_abandoned: Callable[[], None] | None = None,
    ) -> None:
        """``timeout``: per protocol step; ``ready_timeout``: how long the new process may take to start.

        ``on_begin()`` runs just before the sockets go out, ``on_abandoned()`` if that takeover then
        fails: the new process reads the state file while it starts, so the wiring stops writing it
        from begin until abandoned (or for good, once handed over).
        """
        self.path = path
        self._sockets = sockets
        self._on_handed_over = on_handed_over
        self._on_begin = on_begin
        self._on_abandoned = on_abandoned
        self._timeout = timeout
        self._ready_timeout = ready_timeout
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound
        self._accepting: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._busy: str | None = None  # who is taking over right now
        self._closed = False
        self.handed_over = False

    async def start(self) -> None:
        """Listen at ``path`` (mode 0600), replacing a stale socket file but never a live one."""
        await self._remove_stale()
        self._listen()

    async def close(self) -> None:
        """Stop listening, end any takeover in progress and remove the socket file if it is still ours."""
        self._closed = True
        self._stop_listening()
        current = asyncio.current_task()
        handlers = [task for task in self._handlers if task is not current]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    # -- the socket file --------------------------------------------------------------------------------
    async def _remove_stale(self) -> None:
        """A socket file nobody listens on is left by a process that died: remove it. Refuse otherwise."""
        path = self.path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise TakeoverError(path, f"cannot inspect it: {exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise TakeoverError(path, "exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.get_running_loop().sock_connect(probe, str(path))
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            log.info("removed a stale runtime socket", extra={"runtime_socket": str(path)})
            return
        except FileNotFoundError:
            return
        except TimeoutError:
            raise TakeoverError(path, "another process holds it (it accepts no connection)") from None
        except OSError as exc:
            raise TakeoverError(path, f"cannot tell whether it is in use: {exc.strerror}") from None
        finally:
            probe.close()
        raise TakeoverError(
            path,
            "another bgproxy is running and listening on it; replace it with "
            f"`bgproxy run --takeover {path}` or stop it first",
        )

    def _listen(self) -> None:
        path = self.path
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The umask makes the file 0600 from the moment it exists; chmod in case the umask did less.
            umask = os.umask(0o177)
            try:
                listener.bind(str(path))
            finally:
                os.umask(umask)
            os.chmod(path, 0o600)
            listener.listen(8)
            listener.setblocking(False)
            info = os.stat(path)
        except OSError as exc:
            listener.close()
            raise TakeoverError(path, f"cannot listen on it: {exc.strerror or exc}") from None
        self._listener = listener
        self._identity = (info.st_dev, info.st_ino)
        self._accepting = asyncio.get_running_loop().create_task(self._accept(listener))

    def _stop_listening(self) -> None:
        """Close the listener and unlink the file unless another process has bound that path since."""
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._identity is not None:
            with contextlib.suppress(OSError):
                info = os.stat(self.path)
                if (info.st_dev, info.st_ino) == self._identity:
                    self.path.unlink()
            self._identity = None

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: the proxy matters more than this socket
                log.warning("runtime socket: accept failed", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    # -- one takeover -----------------------------------------------------------------------------------
    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            pid, uid = _peer_credentials(conn)
            who = f"pid {pid}" if pid is not None else "a process"
            if uid is not None and uid != os.geteuid():
                log.warning("runtime socket: refused a peer of another user", extra={"peer": who, "uid": uid})
                await self._refuse(
                    conn, f"refused: the peer runs as uid {uid}, bgproxy as uid {os.geteuid()}"
                )
                return
            try:
                await self._handshake(conn, who)
            except TimeoutError:
                log.warning(
                    "takeover abandoned: the new process did not answer in time; still serving",
                    extra={"peer": who},
                )
                await self._refuse(conn, "timed out")
            except _ProtocolError as exc:
                log.warning("takeover refused; still serving", extra={"peer": who, "error": str(exc)})
                await self._refuse(conn, str(exc))
            except OSError as exc:
                log.warning(
                    "takeover abandoned: connection failed; still serving",
                    extra={"peer": who, "error": str(exc)},
                )

    async def _handshake(self, conn: socket.socket, who: str) -> None:
        buffer = bytearray()
        async with asyncio.timeout(self._timeout):
            request = await _read_async(conn, buffer)
        if request is None:  # a liveness probe (see _remove_stale), or a process that changed its mind
            log.debug("runtime socket: peer closed before asking", extra={"peer": who})
            return
        _check_request(request)
        if self._closed or self.handed_over:
            raise _ProtocolError("this bgproxy is shutting down")
        # Taken only once a request has come: a liveness probe or a silent peer blocks nobody.
        if self._busy is not None:
            raise _ProtocolError(f"busy: a takeover by {self._busy} is in progress")
        self._busy = who
        try:
            await self._hand_over(conn, who, buffer)
        finally:
            self._busy = None

    async def _hand_over(self, conn: socket.socket, who: str, buffer: bytearray) -> None:
        entries, fds = self._describe()
        if self._on_begin is not None:
            try:
                begun = self._on_begin()
                if begun is not None:  # e.g. waits until no state write is in flight
                    await begun
            except Exception:
                log.exception("takeover: on_begin failed")
        try:
            await self._send_and_confirm(conn, who, buffer, entries, fds)
        finally:
            if not self.handed_over:
                _notify(self._on_abandoned, "on_abandoned")

    async def _send_and_confirm(
        self, conn: socket.socket, who: str, buffer: bytearray, entries: list[dict[str, str]], fds: list[int]
    ) -> None:
        loop = asyncio.get_running_loop()
        header = {"op": "sockets", "version": PROTOCOL_VERSION, "pid": os.getpid(), "sockets": entries}
        async with asyncio.timeout(self._timeout):
            await _send_with_fds(conn, _encode(header), fds)
        log.info(
            "takeover: listening sockets sent, waiting for the new process to accept on them",
            extra={"peer": who, "sockets": [e["name"] for e in entries]},
        )
        async with asyncio.timeout(self._ready_timeout):
            answer = await _read_async(conn, buffer)
        if answer is None:
            log.warning(
                "takeover abandoned: the new process disconnected before it was ready; still serving",
                extra={"peer": who},
            )
            return
        if answer.get("op") == "abort":
            log.warning(
                "takeover aborted by the new process; still serving",
                extra={"peer": who, "reason": str(answer.get("reason", ""))},
            )
            return
        if answer.get("op") != "ready":
            raise _ProtocolError(f"expected op 'ready', got {answer.get('op')!r}")
        # Free the path before confirming: the new process binds its own runtime socket right after.
        self._stop_listening()
        try:
            async with asyncio.timeout(self._timeout):
                await loop.sock_sendall(conn, _encode({"op": "ack", "version": PROTOCOL_VERSION}))
        except (OSError, TimeoutError) as exc:
            log.warning(
                "takeover unconfirmed: could not acknowledge; still serving",
                extra={"peer": who, "error": str(exc) or type(exc).__name__},
            )
            self._relisten()
            return
        self.handed_over = True
        log.info("takeover: the new process accepts; handing over", extra={"peer": who})
        _notify(self._on_handed_over, "on_handed_over")

    def _relisten(self) -> None:
        """After a failed confirmation, offer the takeover again (unless the path is taken meanwhile)."""
        if self._closed:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    raise TakeoverError(self.path, "bound by another process meanwhile")
            self._listen()
        except TakeoverError as exc:
            log.warning("runtime socket not reopened", extra={"error": str(exc)})

    def _describe(self) -> tuple[list[dict[str, str]], list[int]]:
        try:
            sockets = dict(self._sockets())
        except Exception:
            log.exception("takeover: listing the listening sockets failed")
            raise _ProtocolError("internal error listing the listening sockets") from None
        if not sockets:
            raise _ProtocolError("no listening sockets to hand over")
        entries, fds = [], []
        for name, sock in sockets.items():
            fd = sock.fileno()
            if fd < 0:
                raise _ProtocolError(f"listening socket {name!r} is closed (shutting down?)")
            family = socket.AddressFamily(sock.family).name
            entries.append({"name": name, "family": family, "address": format_address(sock.getsockname())})
            fds.append(fd)
        return entries, fds

    async def _refuse(self, conn: socket.socket, problem: str) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_REFUSAL_TIMEOUT):
                message = {"op": "error", "version": PROTOCOL_VERSION, "error": problem}
                await asyncio.get_running_loop().sock_sendall(conn, _encode(message))


def _notify(callback: Callable[[], None] | None, name: str) -> None:
    """Run a wiring callback; its bug is logged, never a reason to stop serving."""
    if callback is None:
        return
    try:
        callback()
    except Exception:
        log.exception("takeover: %s failed", name)


def _check_request(request: Mapping[str, Any]) -> None:
    version = request.get("version")
    if version != PROTOCOL_VERSION:
        raise _ProtocolError(
            f"protocol version mismatch: the new process speaks version {version!r}, "
            f"the running bgproxy (pid {os.getpid()}) version {PROTOCOL_VERSION}"
        )
    if request.get("op") != "takeover":
        raise _ProtocolError(f"expected op 'takeover', got {request.get('op')!r}")


async def _read_async(conn: socket.socket, buffer: bytearray) -> dict[str, Any] | None:
    """The next message, or None if the peer closed first."""
    loop = asyncio.get_running_loop()
    while (message := _split_line(buffer)) is None:
        chunk = await loop.sock_recv(conn, 4096)
        if not chunk:
            return None
        buffer += chunk
    return message


async def _send_with_fds(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send ``data`` with ``fds`` attached to its first byte.

    The first message on a fresh connection finds an empty send buffer, so this non-blocking sendmsg
    takes it whole in practice; a remainder goes without descriptors.
    """
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    sent = conn.sendmsg([data], rights)
    if sent < len(data):
        await asyncio.get_running_loop().sock_sendall(conn, data[sent:])


# -- the new process --------------------------------------------------------------------------------------


class Ready:
    """Returned by receive_sockets; call it once the new process accepts on the received sockets.

    Blocking (waits for the old process's acknowledgment, normally a millisecond): from a running event
    loop use ``await asyncio.to_thread(ready)``. If the start fails instead, call ``abort(reason)``.
    """

    def __init__(
        self, conn: socket.socket, path: Path, buffer: bytearray, timeout: float, old_pid: int
    ) -> None:
        self._conn: socket.socket | None = conn
        self._path = path
        self._buffer = buffer
        self._timeout = timeout
        self.old_pid = old_pid

    def __call__(self) -> None:
        """Tell the old process we accept; return once it confirms it stops (TakeoverError otherwise).

        After a TakeoverError the old process may or may not stop: keep serving either way (two
        processes accepting on one socket lose nothing) and tell the operator.
        """
        conn = self._take()
        try:
            message = {"op": "ready", "version": PROTOCOL_VERSION, "pid": os.getpid()}
            deadline = time.monotonic() + self._timeout
            conn.settimeout(self._timeout)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # gone: reading says so
                conn.sendall(_encode(message))
            answer, fds = _read_blocking(conn, self._buffer, deadline)
            _close_fds(fds)
        except TimeoutError:
            raise TakeoverError(
                self._path, f"no acknowledgment from pid {self.old_pid} within {self._timeout:g} s"
            ) from None
        except _ProtocolError as exc:
            raise TakeoverError(self._path, f"protocol error: {exc}") from None
        except OSError as exc:
            raise TakeoverError(self._path, f"connection to pid {self.old_pid} failed: {exc}") from None
        finally:
            conn.close()
        if answer is None:
            raise TakeoverError(
                self._path,
                f"pid {self.old_pid} closed the connection before acknowledging (it gave up waiting, or "
                "exited); it may still be accepting",
            )
        _raise_if_error(self._path, answer, self.old_pid)
        if answer.get("op") != "ack":
            raise TakeoverError(self._path, f"protocol error: expected op 'ack', got {answer.get('op')!r}")

    def abort(self, reason: str) -> None:
        """The new process will not serve: tell the old one (it keeps running) and hang up."""
        conn = self._take()
        with contextlib.suppress(OSError), conn:
            conn.settimeout(_REFUSAL_TIMEOUT)
            conn.sendall(_encode({"op": "abort", "version": PROTOCOL_VERSION, "reason": reason}))

    def _take(self) -> socket.socket:
        conn, self._conn = self._conn, None
        if conn is None:
            raise TakeoverError(self._path, "ready() or abort() was already called")
        return conn


def receive_sockets(path: Path, timeout: float = 10.0) -> tuple[dict[str, socket.socket], Ready]:
    """Take the running bgproxy's listening sockets over its runtime socket at ``path``.

    Blocking on purpose: it runs before the event loop starts, in place of binding the listeners.
    Returns the sockets by name (non-blocking, close-on-exec) and the ``Ready`` to call once the new
    process accepts on them. Never ``shutdown()`` them, nor make them blocking: both act on the socket
    the old process still accepts on.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        _connect(conn, path, timeout)
        _pid, uid = _peer_credentials(conn)
        if uid is not None and uid != os.geteuid():
            raise TakeoverError(path, f"it belongs to a process of uid {uid}, not ours ({os.geteuid()})")
        request = {"op": "takeover", "version": PROTOCOL_VERSION, "pid": os.getpid()}
        buffer = bytearray()
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused at once: read why
                conn.sendall(_encode(request))
            header, fds = _read_blocking(conn, buffer, deadline)
        except TimeoutError:
            raise TakeoverError(path, f"no answer within {timeout:g} s") from None
        except _ProtocolError as exc:
            raise TakeoverError(path, f"protocol error: {exc}") from None
        except OSError as exc:
            raise TakeoverError(path, f"connection failed: {exc}") from None
        try:
            if header is None:
                raise TakeoverError(path, "the running bgproxy closed the connection without answering")
            _raise_if_error(path, header, None)
            old_pid, sockets = _adopt(path, header, fds)
        except BaseException:
            _close_fds(fds)
            raise
    except BaseException:
        conn.close()
        raise
    return sockets, Ready(conn, path, buffer, timeout, old_pid)


def _connect(conn: socket.socket, path: Path, timeout: float) -> None:
    try:
        conn.connect(str(path))
    except FileNotFoundError:
        raise TakeoverError(
            path, "no such file (is bgproxy running with runtime_socket set to it?)"
        ) from None
    except ConnectionRefusedError:
        raise TakeoverError(
            path, "connection refused: nobody listens on it (a stale file left by a bgproxy that is gone?)"
        ) from None
    except PermissionError:
        raise TakeoverError(path, "permission denied: run as the user the running bgproxy runs as") from None
    except TimeoutError:
        raise TakeoverError(path, f"connect timed out after {timeout:g} s") from None
    except OSError as exc:
        raise TakeoverError(path, f"cannot connect: {exc.strerror or exc}") from None


def _raise_if_error(path: Path, message: Mapping[str, Any], old_pid: int | None) -> None:
    """An error reply becomes a TakeoverError; so does a peer of another protocol version."""
    who = f"the running bgproxy (pid {old_pid})" if old_pid else "the running bgproxy"
    if message.get("op") == "error":
        raise TakeoverError(path, f"{who} refused: {message.get('error', 'no reason given')}")
    version = message.get("version")
    if version != PROTOCOL_VERSION:
        raise TakeoverError(
            path,
            f"protocol version mismatch: {who} speaks version {version!r}, this bgproxy version "
            f"{PROTOCOL_VERSION}",
        )


def _adopt(path: Path, header: Mapping[str, Any], fds: list[int]) -> tuple[int, dict[str, socket.socket]]:
    """Check the descriptors against the header and wrap them; each must be the listener it claims."""
    if header.get("op") != "sockets":
        raise TakeoverError(path, f"protocol error: expected op 'sockets', got {header.get('op')!r}")
    entries = header.get("sockets")
    old_pid = header.get("pid")
    if not isinstance(entries, list) or not isinstance(old_pid, int):
        raise TakeoverError(path, "protocol error: 'sockets' must be a list and 'pid' a number")
    if len(entries) != len(fds):
        raise TakeoverError(path, f"protocol error: {len(entries)} sockets announced, {len(fds)} received")
    sockets: dict[str, socket.socket] = {}
    try:
        for entry, fd in zip(entries, fds, strict=True):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or name in sockets:
                raise TakeoverError(path, f"protocol error: bad or repeated socket name in {entry!r}")
            sock = socket.socket(fileno=fd)
            sockets[name] = sock
            sock.setblocking(False)  # it is already (the flag is shared); this tells the Python object
            os.set_inheritable(fd, False)
            actual = {"family": sock.family.name, "address": format_address(sock.getsockname())}
            claimed = {key: entry.get(key) for key in actual}
            if actual != claimed or sock.type != socket.SOCK_STREAM or not _is_listening(sock):
                raise TakeoverError(
                    path, f"socket {name!r} is not the listener announced ({claimed}, got {actual})"
                )
    except BaseException:
        for sock in sockets.values():
            sock.detach()  # the caller closes every received descriptor
        raise
    return old_pid, sockets


def _read_blocking(
    conn: socket.socket, buffer: bytearray, deadline: float
) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message (None at end of stream) and any descriptors that came with it."""
    fds: list[int] = []
    cloexec = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    try:
        while (message := _split_line(buffer)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            conn.settimeout(remaining)
            data, ancillary, flags, _ = conn.recvmsg(4096, socket.CMSG_SPACE(_MAX_FDS * 4), cloexec)
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    fds.extend(received)
            if flags & socket.MSG_CTRUNC:
                raise _ProtocolError(f"more than {_MAX_FDS} descriptors sent")
            if not data:
                return None, fds
            buffer += data
    except BaseException:
        _close_fds(fds)
        raise
    return message, fds


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- systemd socket activation ----------------------------------------------------------------------------


def systemd_sockets(
    environ: Mapping[str, str] | None = None, *, start_fd: int = SD_LISTEN_FDS_START
) -> dict[str, socket.socket]:
    """Listening sockets passed by systemd (sd_listen_fds(3)), by name; empty when not socket-activated.

    Names: LISTEN_FDNAMES (FileDescriptorName=) when each socket has its own; when they are all alike
    (one .socket unit names every socket after itself) by position: "proxy", then "admin". The
    variables are removed from ``environ`` (os.environ by default) if it is mutable, so children do not
    inherit them; the descriptors are made close-on-exec. ``start_fd`` is for tests.
    """
    env = os.environ if environ is None else environ
    pid_text, count_text, names_text = (env.get(key) for key in _ENV_KEYS)
    if isinstance(env, MutableMapping):
        for key in _ENV_KEYS:
            env.pop(key, None)
    if pid_text is None or count_text is None:
        return {}
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        raise SocketActivationError(
            f"LISTEN_PID={pid_text!r} LISTEN_FDS={count_text!r}: not numbers"
        ) from None
    if pid != os.getpid():  # meant for another process (the one that exec'd us, say)
        return {}
    if count < 0:
        raise SocketActivationError(f"LISTEN_FDS={count_text!r}: negative")
    names = _activation_names(names_text, count)
    sockets: dict[str, socket.socket] = {}
    try:
        for offset, name in enumerate(names):
            sockets[name] = _activated(start_fd + offset, name)
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


def _activation_names(text: str | None, count: int) -> list[str]:
    given = text.split(":") if text else []
    if len(given) != count:  # absent (systemd before v227) or malformed: go by position
        given = []
    # A socket without FileDescriptorName= is named after its unit ("bgproxy.socket"): no real name.
    named = [n for n in given if n and n != "unknown" and not n.endswith(".socket")]
    if given and len(named) == count and len(set(named)) == count:
        return named
    if len(set(given)) > 1:  # several units, not each named: their order is not defined
        raise SocketActivationError(
            f"LISTEN_FDNAMES={text!r}: cannot tell which socket is which; give each socket unit its own "
            "FileDescriptorName= (proxy, admin)"
        )
    if count > len(DEFAULT_NAMES):
        raise SocketActivationError(
            f"systemd passed {count} sockets without distinct names; bgproxy takes at most "
            f"{len(DEFAULT_NAMES)} by position ({', '.join(DEFAULT_NAMES)})"
        )
    return list(DEFAULT_NAMES[:count])


def _activated(fd: int, name: str) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise SocketActivationError(f"fd {fd} ({name}) passed by systemd is not open") from None
    if not stat.S_ISSOCK(mode):
        raise SocketActivationError(f"fd {fd} ({name}) passed by systemd is not a socket")
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or not _is_listening(sock):
        sock.detach()
        raise SocketActivationError(
            f"fd {fd} ({name}) passed by systemd is not a listening stream socket "
            "(use ListenStream= with Accept=no)"
        )
    sock.setblocking(False)
    return sock
