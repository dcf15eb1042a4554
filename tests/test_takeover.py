"""Takeover and socket activation on real sockets: nothing refused, nothing lost, nobody hangs.

In-process tests run the old side (TakeoverServer) on the test's event loop and the new side
(receive_sockets, blocking) in a thread; the last tests use real processes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from waiting import eventually

from bgproxy.control.takeover import (
    PROTOCOL_VERSION,
    SocketActivationError,
    TakeoverError,
    TakeoverServer,
    receive_sockets,
    systemd_sockets,
)

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def responder(tag: str) -> Handler:
    """Answers one line with ``tag``: which process (generation) accepted the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readline()
            writer.write(f"{tag}\n".encode())
            await writer.drain()
        writer.close()

    return handle


async def ask(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"hello\n")
        return (await reader.readline()).decode().strip()
    finally:
        writer.close()


@pytest.fixture
def runtime_path(tmp_path: Path) -> Path:
    return tmp_path / "runtime.sock"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    yield sock
    sock.close()


class OldSide:
    """A running process's half: a server accepting on ``listener`` and its TakeoverServer."""

    def __init__(self, path: Path, listener: socket.socket) -> None:
        self.listener = listener
        self.port: int = listener.getsockname()[1]
        self.handed_over = asyncio.Event()
        self.events: list[str] = []  # the wiring's callbacks, in order
        self.takeover = TakeoverServer(
            path,
            lambda: {"proxy": listener},
            self._handed_over,
            timeout=2.0,
            on_begin=lambda: self.events.append("begin"),
            on_abandoned=lambda: self.events.append("abandoned"),
        )
        self.server: asyncio.Server | None = None

    def _handed_over(self) -> None:
        self.events.append("handed over")
        self.handed_over.set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(responder("old"), sock=self.listener)
        await self.takeover.start()

    async def stop_accepting(self) -> None:
        """What the wiring's SIGTERM path does first: close (never shutdown) the listening socket."""
        assert self.server is not None
        self.server.close()
        async with asyncio.timeout(5):
            await self.server.wait_closed()


@pytest.fixture
async def old(runtime_path: Path, listener: socket.socket) -> AsyncIterator[OldSide]:
    side = OldSide(runtime_path, listener)
    await side.start()
    yield side
    await side.takeover.close()
    if side.server is not None:
        side.server.close()


async def test_handover_passes_the_same_listening_socket_and_confirms_only_after_ready(
    old: OldSide, runtime_path: Path
) -> None:
    sockets, ready = await asyncio.to_thread(receive_sockets, runtime_path, 5.0)
    received = sockets["proxy"]
    assert list(sockets) == ["proxy"]
    assert received.getsockname() == ("127.0.0.1", old.port)
    assert received.fileno() != old.listener.fileno()
    assert not os.get_inheritable(received.fileno())
    assert ready.old_pid == os.getpid()
    assert old.events == ["begin"]  # the new side has not said it accepts

    new_server = await asyncio.start_server(responder("new"), sock=received)
    try:
        answers = {await ask(old.port) for _ in range(40)}
        assert answers <= {"old", "new"}
        assert not old.handed_over.is_set() and not old.takeover.handed_over

        await asyncio.to_thread(ready)
        async with asyncio.timeout(5):
            await old.handed_over.wait()
        assert old.takeover.handed_over and old.events == ["begin", "handed over"]
        assert not runtime_path.exists()  # freed before the ack, for the new process's own runtime socket
        await old.stop_accepting()
        assert {await ask(old.port) for _ in range(10)} == {"new"}
        with pytest.raises(TakeoverError, match="already called"):
            ready()
    finally:
        new_server.close()


async def test_no_connection_is_refused_or_lost_during_the_handover(old: OldSide, runtime_path: Path) -> None:
    seen: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    stop = asyncio.Event()

    async def client_loop() -> None:
        while not stop.is_set():
            try:
                seen[await ask(old.port)] += 1
            except OSError as exc:
                errors.append(repr(exc))

    clients = [asyncio.create_task(client_loop()) for _ in range(4)]
    await eventually(lambda: seen["old"] >= 20)
    sockets, ready = await asyncio.to_thread(receive_sockets, runtime_path, 5.0)
    await asyncio.to_thread(ready)
    await old.handed_over.wait()
    await old.stop_accepting()
    # Nobody accepts now; connections wait in the kernel backlog of the one shared socket.
    waiting = [socket.create_connection(("127.0.0.1", old.port), timeout=5) for _ in range(3)]
    new_server = await asyncio.start_server(responder("new"), sock=sockets["proxy"])
    try:
        for sock in waiting:
            sock.sendall(b"hello\n")
            assert await asyncio.to_thread(sock.recv, 16) == b"new\n"
            sock.close()
        await eventually(lambda: seen["new"] >= 20)
        stop.set()
        await asyncio.gather(*clients)
    finally:
        new_server.close()
    assert errors == []
    assert seen["old"] > 0 and seen["new"] > 0
    assert set(seen) == {"old", "new"}


async def test_a_new_process_that_leaves_before_ready_leaves_the_old_one_running(
    old: OldSide, runtime_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bgproxy.takeover")

    def take_and_leave() -> None:
        with contextlib.closing(raw_connect(runtime_path)) as conn:
            conn.sendall(json.dumps({"op": "takeover", "version": PROTOCOL_VERSION}).encode() + b"\n")
            header, fds, _, _ = socket.recv_fds(conn, 4096, 8)
            assert json.loads(header)["op"] == "sockets" and len(fds) == 1
            os.close(fds[0])

    await asyncio.to_thread(take_and_leave)
    await eventually(lambda: "disconnected before it was ready" in caplog.text)
    assert old.events == ["begin", "abandoned"] and not old.takeover.handed_over
    assert await ask(old.port) == "old"

    # The runtime socket still works: a later takeover can be aborted by the new side, and retried.
    sockets, ready = await asyncio.to_thread(receive_sockets, runtime_path, 5.0)
    sockets["proxy"].close()
    ready.abort("config did not validate")
    await eventually(
        lambda: any(getattr(r, "reason", "") == "config did not validate" for r in caplog.records)
    )
    assert old.events == ["begin", "abandoned"] * 2 and await ask(old.port) == "old"
    sockets, ready = await asyncio.to_thread(receive_sockets, runtime_path, 5.0)
    await asyncio.to_thread(ready)
    await old.handed_over.wait()
    assert old.events == ["begin", "abandoned"] * 2 + ["begin", "handed over"]
    sockets["proxy"].close()


async def test_an_unsendable_ack_leaves_the_old_one_running_and_listening(
    old: OldSide, runtime_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bgproxy.takeover")
    conn = raw_connect(runtime_path)

    def take() -> None:
        conn.sendall(json.dumps({"op": "takeover", "version": PROTOCOL_VERSION}).encode() + b"\n")
        _, fds, _, _ = socket.recv_fds(conn, 4096, 8)
        os.close(fds[0])

    await asyncio.to_thread(take)
    # On the loop's thread, so the old side reads "ready" only once the peer is gone.
    conn.sendall(json.dumps({"op": "ready", "version": PROTOCOL_VERSION}).encode() + b"\n")
    conn.close()
    await eventually(lambda: "could not acknowledge" in caplog.text)
    assert old.events == ["begin", "abandoned"] and await ask(old.port) == "old"
    assert stat.S_ISSOCK(runtime_path.stat().st_mode)  # listening again
    sockets, ready = await asyncio.to_thread(receive_sockets, runtime_path, 5.0)
    await asyncio.to_thread(ready)
    await old.handed_over.wait()
    sockets["proxy"].close()


async def test_one_takeover_at_a_time(old: OldSide, runtime_path: Path) -> None:
    sockets, ready = await asyncio.to_thread(receive_sockets, runtime_path, 5.0)
    with pytest.raises(TakeoverError, match=r"runtime\.sock: .*refused: busy: a takeover by pid \d+"):
        await asyncio.to_thread(receive_sockets, runtime_path, 5.0)
    ready.abort("test")
    sockets["proxy"].close()


async def test_the_old_side_refuses_another_protocol_version(old: OldSide, runtime_path: Path) -> None:
    def exchange() -> dict[str, object]:
        with contextlib.closing(raw_connect(runtime_path)) as conn:
            conn.sendall(b'{"op": "takeover", "version": 99}\n')
            message, fds, _, _ = socket.recv_fds(conn, 4096, 8)
            assert fds == []
            answer: dict[str, object] = json.loads(message)
            return answer

    answer = await asyncio.to_thread(exchange)
    assert answer["op"] == "error"
    assert "protocol version mismatch" in str(answer["error"])
    assert "version 99" in str(answer["error"]) and f"version {PROTOCOL_VERSION}" in str(answer["error"])
    assert not old.handed_over.is_set()


async def test_the_new_side_rejects_another_protocol_version(runtime_path: Path) -> None:
    """A future bgproxy answering with version 2 (and descriptors it would not understand)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fake:
        fake.bind(str(runtime_path))
        fake.listen()

        def serve() -> None:
            conn, _ = fake.accept()
            with conn:
                conn.recv(4096)
                header = {"op": "sockets", "version": 2, "pid": 1, "sockets": []}
                socket.send_fds(conn, [json.dumps(header).encode() + b"\n"], [conn.fileno()])
                conn.recv(1)

        thread = threading.Thread(target=serve)
        thread.start()
        with pytest.raises(TakeoverError) as caught:
            receive_sockets(runtime_path, timeout=5.0)
        thread.join(5)
    message = str(caught.value)
    assert str(runtime_path) in message
    assert "protocol version mismatch" in message and "version 2" in message


def test_receive_sockets_says_what_went_wrong(runtime_path: Path) -> None:
    with pytest.raises(TakeoverError, match=rf"{re.escape(str(runtime_path))}: no such file"):
        receive_sockets(runtime_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(runtime_path))
    with pytest.raises(TakeoverError, match=rf"{re.escape(str(runtime_path))}: connection refused"):
        receive_sockets(runtime_path)
    runtime_path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:  # listens, never answers
        stuck.bind(str(runtime_path))
        stuck.listen()
        with pytest.raises(TakeoverError, match=rf"{re.escape(str(runtime_path))}: no answer within 0\.2 s"):
            receive_sockets(runtime_path, timeout=0.2)


async def test_a_stuck_new_process_does_not_hang_the_old_one(
    runtime_path: Path, listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    handed = asyncio.Event()
    server = TakeoverServer(runtime_path, lambda: {"proxy": listener}, handed.set, timeout=0.2)
    await server.start()
    try:
        with contextlib.closing(raw_connect(runtime_path)) as conn:  # says nothing
            conn.settimeout(5)
            answer = await asyncio.to_thread(conn.recv, 4096)
        assert json.loads(answer) == {"op": "error", "version": PROTOCOL_VERSION, "error": "timed out"}
        assert "did not answer in time" in caplog.text
        assert not handed.is_set()
    finally:
        await server.close()


async def test_the_runtime_socket_is_private(old: OldSide, runtime_path: Path) -> None:
    mode = runtime_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


async def test_a_peer_of_another_user_is_refused(
    old: OldSide, runtime_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)  # as if bgproxy ran as another user
    with contextlib.closing(raw_connect(runtime_path)) as conn:
        conn.settimeout(5)
        answer = json.loads(await asyncio.to_thread(conn.recv, 4096))
    assert answer["op"] == "error" and "refused: the peer runs as uid" in answer["error"]
    with pytest.raises(TakeoverError, match="belongs to a process of uid"):
        await asyncio.to_thread(receive_sockets, runtime_path, 5.0)


async def test_a_stale_socket_file_is_replaced_a_live_one_refused(
    runtime_path: Path, listener: socket.socket
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:  # a bgproxy killed with -9
        gone.bind(str(runtime_path))
    first = TakeoverServer(runtime_path, lambda: {"proxy": listener}, lambda: None)
    await first.start()
    try:
        second = TakeoverServer(runtime_path, lambda: {"proxy": listener}, lambda: None)
        with pytest.raises(TakeoverError, match="another bgproxy is running and listening on it"):
            await second.start()
        assert runtime_path.exists()  # the live one was left alone
        sockets, ready = await asyncio.to_thread(receive_sockets, runtime_path, 5.0)  # and still works
        ready.abort("test")
        sockets["proxy"].close()
    finally:
        await first.close()
    assert not runtime_path.exists()
    runtime_path.write_text("not a socket")
    with pytest.raises(TakeoverError, match="exists and is not a socket"):
        await TakeoverServer(runtime_path, dict, lambda: None).start()


async def test_close_leaves_a_successor_s_socket_file_alone(old: OldSide, runtime_path: Path) -> None:
    sockets, ready = await asyncio.to_thread(receive_sockets, runtime_path, 5.0)
    await asyncio.to_thread(ready)
    successor = TakeoverServer(runtime_path, lambda: dict(sockets), lambda: None)
    await successor.start()  # the old process freed the path before it acknowledged
    try:
        await old.takeover.close()
        assert stat.S_ISSOCK(runtime_path.stat().st_mode)
    finally:
        await successor.close()
        sockets["proxy"].close()
    assert not runtime_path.exists()


def raw_connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect(str(path))
    return conn


# -- real processes ---------------------------------------------------------------------------------------

# One generation of a tiny server: "ok PID" per request line, on a fresh listening socket or on the one
# taken over. Handed over, it stops accepting, answers each open connection once more with "ok PID close"
# (as HTTP says Connection: close), and exits when they are gone.
GENERATION = r"""
import asyncio, os, socket, sys
from pathlib import Path
import uvloop
from bgproxy.control.takeover import TakeoverServer, receive_sockets

path = Path(sys.argv[1])
if sys.argv[2] == "takeover":
    sockets, ready = receive_sockets(path, timeout=5.0)
    listener = sockets["proxy"]
else:
    listener, ready = socket.create_server(("127.0.0.1", 0), backlog=1024), None

async def main() -> None:
    handed, idle = asyncio.Event(), asyncio.Event()
    live = 0

    async def serve(reader, writer):
        nonlocal live
        live += 1
        try:
            while await reader.readline():
                closing = handed.is_set()
                writer.write(f"ok {os.getpid()}{' close' if closing else ''}\n".encode())
                await writer.drain()
                if closing:
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()
            live -= 1
            if live == 0 and handed.is_set():
                idle.set()

    server = await asyncio.start_server(serve, sock=listener)
    if ready is not None:
        await asyncio.to_thread(ready)
    takeover = TakeoverServer(path, lambda: {"proxy": listener}, handed.set)
    await takeover.start()
    print(listener.getsockname()[1], flush=True)
    await handed.wait()
    server.close()
    await takeover.close()
    # A connection accepted just before the close may not have reached serve() yet; bgproxy's own
    # shutdown gives idle connections a grace for the same reason. No event marks it, hence the wait.
    await asyncio.sleep(0.3)
    if live:
        await asyncio.wait_for(idle.wait(), 10)
    print("drained", flush=True)

uvloop.run(main())
"""


class Generation:
    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, path: Path, mode: str, log: Path) -> tuple[Generation, int]:
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", GENERATION, str(path), mode, stdout=subprocess.PIPE, stderr=stderr
            )
        generation = cls(proc, log)
        return generation, int(await generation.line())

    async def line(self) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(10):
            line = await self.proc.stdout.readline()
        assert line, f"generation {self.proc.pid} exited: {self.log.read_text()}"
        return line.decode().strip()

    async def exited(self) -> int:
        async with asyncio.timeout(10):
            return await self.proc.wait()


class Load:
    """Clients hammering the port: keep-alive connections and one-request connections."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.served: collections.Counter[int] = collections.Counter()
        self.closed_by_server = 0  # keep-alive connections a draining generation ended after a response
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, keepalive: int = 6, short: int = 6) -> None:
        self._tasks = [asyncio.create_task(self._keepalive()) for _ in range(keepalive)]
        self._tasks += [asyncio.create_task(self._short()) for _ in range(short)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request; True if the server said it closes the connection."""
        writer.write(b"req\n")
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed without a response")
        _, pid, *close = line.decode().split()
        self.served[int(pid)] += 1
        self.closed_by_server += bool(close)
        return bool(close)

    async def _keepalive(self) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    while not self._stop.is_set() and not await self._exchange(reader, writer):
                        pass
                finally:
                    writer.close()
            except OSError as exc:
                self.errors.append(repr(exc))

    async def _short(self) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    await self._exchange(reader, writer)
                finally:
                    writer.close()
            except OSError as exc:
                self.errors.append(repr(exc))


async def test_takeover_between_processes_under_load_drops_nothing(tmp_path: Path) -> None:
    """Three generations, two takeovers, clients all along: zero errors, all three served requests."""
    path = tmp_path / "runtime.sock"
    generations: list[Generation] = []
    load: Load | None = None
    try:
        first, port = await Generation.start(path, "fresh", tmp_path / "gen0.log")
        generations.append(first)
        load = Load(port)
        load.start()
        await eventually(lambda: load is not None and sum(load.served.values()) >= 200)
        for number in (1, 2):
            previous = generations[-1]
            successor, successor_port = await Generation.start(
                path, "takeover", tmp_path / f"gen{number}.log"
            )
            generations.append(successor)
            assert successor_port == port
            assert await previous.line() == "drained"
            assert await previous.exited() == 0
            await eventually(lambda pid=successor.proc.pid: load is not None and load.served[pid] >= 200)
        await load.stop()
    finally:
        if load is not None and load._tasks:
            await load.stop()
        for generation in generations:
            if generation.proc.returncode is None:
                generation.proc.terminate()
                await generation.proc.wait()
    assert load.errors == []
    assert set(load.served) == {g.proc.pid for g in generations}, load.served
    assert load.closed_by_server > 0


# -- systemd socket activation ----------------------------------------------------------------------------


def free_fds(count: int) -> int:
    """The first of ``count`` consecutive unused descriptor numbers (high, away from pytest's)."""
    for base in range(600, 1000):
        if not any(_is_open(fd) for fd in range(base, base + count)):
            return base
    raise AssertionError("no free descriptors")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def passed_fds(*sockets: socket.socket) -> Iterator[int]:
    """The sockets duplicated onto consecutive descriptors, as systemd lays them out from fd 3."""
    base = free_fds(len(sockets))
    for offset, sock in enumerate(sockets):
        os.dup2(sock.fileno(), base + offset)
    try:
        yield base
    finally:
        for fd in range(base, base + len(sockets)):
            with contextlib.suppress(OSError):
                os.close(fd)


def activation_env(count: int, names: str | None = None, pid: int | None = None) -> dict[str, str]:
    env = {"LISTEN_PID": str(os.getpid() if pid is None else pid), "LISTEN_FDS": str(count), "HOME": "/x"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


@pytest.fixture
def two_listeners() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as a, socket.create_server(("127.0.0.1", 0)) as b:
        yield a, b


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ("proxy:admin", ["proxy", "admin"]),
        ("admin:proxy", ["admin", "proxy"]),  # several units: the names say which is which
        (None, ["proxy", "admin"]),  # no names: by position
        ("bgproxy.socket:bgproxy.socket", ["proxy", "admin"]),  # one unit, systemd's default name
        ("proxy:proxy", ["proxy", "admin"]),  # one unit with FileDescriptorName=: same for all
    ],
)
def test_systemd_sockets_by_name(
    two_listeners: tuple[socket.socket, socket.socket], names: str | None, expected: list[str]
) -> None:
    env = activation_env(2, names)
    with passed_fds(*two_listeners) as base:
        sockets = systemd_sockets(env, start_fd=base)
        try:
            assert list(sockets) == expected
            for name, listener in zip(expected, two_listeners, strict=True):
                assert sockets[name].getsockname() == listener.getsockname()
                assert sockets[name].fileno() == base + expected.index(name)
                assert not os.get_inheritable(sockets[name].fileno())
        finally:
            for sock in sockets.values():
                sock.detach()
    assert env == {"HOME": "/x"}  # unset, as sd_listen_fds(unset_environment=1)


def test_systemd_sockets_not_for_us() -> None:
    env = activation_env(2, pid=os.getpid() + 1)
    assert systemd_sockets(env) == {}
    assert env == {"HOME": "/x"}
    assert systemd_sockets({}) == {}
    frozen = types.MappingProxyType(activation_env(1, pid=1))
    assert systemd_sockets(frozen) == {}  # a read-only mapping is read, not changed
    assert "LISTEN_FDS" in frozen


def test_systemd_sockets_refuses_what_it_cannot_use(
    two_listeners: tuple[socket.socket, socket.socket],
) -> None:
    with passed_fds(*two_listeners) as base:
        with pytest.raises(SocketActivationError, match="cannot tell which socket is which"):
            systemd_sockets(activation_env(2, "a.socket:b.socket"), start_fd=base)
        with pytest.raises(SocketActivationError, match="not numbers"):
            systemd_sockets({"LISTEN_PID": "x", "LISTEN_FDS": "2"}, start_fd=base)
    with pytest.raises(SocketActivationError, match=r"fd \d+ \(proxy\) passed by systemd is not open"):
        systemd_sockets(activation_env(1), start_fd=free_fds(1))
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(SocketActivationError, match="is not a socket"):
            systemd_sockets(activation_env(1), start_fd=read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    with socket.socket() as unbound, pytest.raises(SocketActivationError, match="not a listening stream"):
        systemd_sockets(activation_env(1), start_fd=unbound.fileno())


# Lays the descriptors it is given out at 3 and 4, as systemd does, sets LISTEN_* and reports.
ACTIVATED = r"""
import fcntl, json, os, sys
from bgproxy.control.takeover import systemd_sockets

high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[1:]]
for fd in sys.argv[1:]:
    os.close(int(fd))
for target, fd in zip((3, 4), high):
    os.dup2(fd, target)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="proxy:admin")
sockets = systemd_sockets()
sockets["proxy"].settimeout(10)
conn, _ = sockets["proxy"].accept()
conn.sendall(b"accepted")
report = {n: [s.fileno(), list(s.getsockname()), os.get_inheritable(s.fileno())] for n, s in sockets.items()}
print(json.dumps({"sockets": report, "env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}))
"""


def test_systemd_sockets_from_fd_3_in_a_real_process(
    two_listeners: tuple[socket.socket, socket.socket],
) -> None:
    proxy, admin = two_listeners
    with socket.create_connection(proxy.getsockname(), timeout=10) as client:  # waits in the backlog
        fds = [str(proxy.fileno()), str(admin.fileno())]
        done = subprocess.run(
            [sys.executable, "-c", ACTIVATED, *fds],
            pass_fds=[proxy.fileno(), admin.fileno()],
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert client.recv(16) == b"accepted"
    report = json.loads(done.stdout)
    assert report == {
        "sockets": {
            "proxy": [3, list(proxy.getsockname()), False],
            "admin": [4, list(admin.getsockname()), False],
        },
        "env": [],
    }
