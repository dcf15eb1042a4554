"""Real Redis and etcd servers for the shared-store tests, on free 127.0.0.1 ports.

Each server keeps its data in a temporary directory and can be killed (SIGKILL, like a crash) and
started again on the same port and data, for outage tests. One of each runs for the whole session
(starting etcd takes about a second) and every test works under its own key prefix; a test that
kills one leaves it for the next test's fixture to start again. Load the fixtures with
``pytest_plugins = ("stores",)``: ``redis_server``, ``etcd_server``, ``store_server`` (both, in turn),
``open_store`` (clients of that server under the test's own prefix, closed after the test),
``private_etcd`` (an etcd of the test's own, e.g. with authentication or TLS) and ``tls_certs``.

A server's ``kill()`` is a crash (SIGKILL) and ``pause()`` a host gone silent (SIGSTOP: connections
stay open, nothing answers); ``start()`` brings either back. Servers die with the pytest process
(PR_SET_PDEATHSIG) even if it is killed before its fixtures' teardown.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import shutil
import signal
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from process import free_port

from bgproxy.control.etcd_store import EtcdStore
from bgproxy.control.redis_store import RedisStore
from bgproxy.control.shared import SharedStore

START_TIMEOUT = 20.0


def _die_with_parent() -> None:
    """Runs in the child: the kernel kills it if pytest dies, so no server outlives the run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


class StoreServer:
    """A store server process: ``start()`` (again after ``kill()``), on one port and data dir."""

    binary = ""
    kind = ""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.log = data_dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def url(self, prefix: str) -> str:
        """The store URL for keys under ``prefix`` (a bare name; each store adds its separator)."""
        raise NotImplementedError

    async def answers(self) -> bool:
        """True once the server serves requests."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    async def start(self) -> None:
        """Start (a no-op while running) and wait until it answers, at most START_TIMEOUT."""
        if self.running:
            self.resume()  # a test that paused it may have failed before resuming it
            return
        path = shutil.which(self.binary)
        if path is None:
            pytest.fail(f"{self.binary} is not installed: run `bash .ci/system-deps`", pytrace=False)
        with self.log.open("ab") as log:
            # Popen in this (the main) thread: the parent-death signal follows the thread that forked.
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - fork/exec only, nothing waits here
                [path, *self.argv()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.data_dir,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline:
            if not self.running:
                pytest.fail(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_text()}")
            if await self.answers():
                return
            await asyncio.sleep(0.05)
        self.kill()
        pytest.fail(f"{self.kind} not answering after {START_TIMEOUT:.0f} s:\n{self.log_text()}")

    def pause(self) -> None:
        """SIGSTOP: its connections stay open but nothing answers, like a host gone off the network.
        Returns once the process is stopped (a signal to a many-threaded process takes a moment)."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        for _ in range(200):
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "T":
                return
            time.sleep(0.005)
        pytest.fail(f"{self.kind} did not stop on SIGSTOP")

    def resume(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, like a crash, and reap it; the port and data stay for the next start()."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)


class RedisServer(StoreServer):
    """redis-server persisting every write (AOF, fsync always) so data survives a SIGKILL."""

    binary = "redis-server"
    kind = "redis"

    def argv(self) -> list[str]:
        return [
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--dir", str(self.data_dir),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
        ]  # fmt: skip

    def url(self, prefix: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix={prefix}:"

    async def answers(self) -> bool:
        try:
            async with asyncio.timeout(0.5):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(b"PING\r\n")
                    return await reader.readline() == b"+PONG\r\n"  # not -LOADING while it reads the AOF
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False


class TlsRedisServer(RedisServer):
    """redis-server serving TLS only (``rediss://``), asking each client for a certificate from the
    test CA."""

    def __init__(self, data_dir: Path, certs: Certs) -> None:
        super().__init__(data_dir)
        self.certs = certs

    def argv(self) -> list[str]:
        plain = super().argv()
        at = plain.index("--port")
        c = self.certs
        return [
            *plain[:at], *plain[at + 2 :],
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", c.server_cert,
            "--tls-key-file", c.server_key,
            "--tls-ca-cert-file", c.ca,
            "--tls-auth-clients", "yes",
        ]  # fmt: skip

    def url(self, prefix: str) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?prefix={prefix}:"

    async def answers(self) -> bool:
        context = ssl.create_default_context(cafile=self.certs.ca)
        context.load_cert_chain(self.certs.client_cert, self.certs.client_key)
        try:
            async with asyncio.timeout(0.5):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=context)
                try:
                    writer.write(b"PING\r\n")
                    return await reader.readline() == b"+PONG\r\n"
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False


@dataclass(frozen=True)
class Certs:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_certs(directory: Path) -> Certs:
    """Made with the openssl command (EC P-256, valid for a day)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: run `bash .ci/system-deps`", pytrace=False)
    d = directory

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=d)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca")
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        run("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            "-addext", extension)  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-copy_extensions", "copy", "-out", f"{name}.crt")  # fmt: skip
    return Certs(*(str(d / f) for f in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")))


class EtcdServer(StoreServer):
    """A one-member etcd cluster with the v3 JSON gateway on its client port.

    Heartbeat 25 ms and election timeout 250 ms (defaults 100/1000) make it elect itself quickly
    after a restart and lower etcd's minimum lease TTL (1.5 election timeouts) to its floor of 1 s,
    so TTL tests run on the same 1 s as Redis. With ``certs`` it serves clients over TLS only and
    asks each for a certificate from the same CA.
    """

    binary = "etcd"
    kind = "etcd"

    def __init__(self, data_dir: Path, certs: Certs | None = None) -> None:
        super().__init__(data_dir)
        self.peer_port = free_port()
        self.certs = certs

    def argv(self) -> list[str]:
        scheme = "https" if self.certs else "http"
        client, peer = f"{scheme}://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        tls = []
        if self.certs is not None:
            tls = [
                "--cert-file", self.certs.server_cert,
                "--key-file", self.certs.server_key,
                "--trusted-ca-file", self.certs.ca,
                "--client-cert-auth",
            ]  # fmt: skip
        return [
            *tls,
            "--name", "test",
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            "--initial-cluster-state", "new",
            "--enable-grpc-gateway=true",
            "--heartbeat-interval", "25",
            "--election-timeout", "250",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip

    def url(self, prefix: str) -> str:
        return f"{'etcds' if self.certs else 'etcd'}://127.0.0.1:{self.port}/{prefix}/"

    async def answers(self) -> bool:
        context: ssl.SSLContext | bool = True
        if self.certs is not None:
            context = ssl.create_default_context(cafile=self.certs.ca)
            context.load_cert_chain(self.certs.client_cert, self.certs.client_key)
        scheme = "https" if self.certs else "http"
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"{scheme}://127.0.0.1:{self.port}/health",
                    ssl=context,
                    timeout=aiohttp.ClientTimeout(total=0.5),
                ) as response,
            ):
                answer = json.loads(await response.read())  # served as text/plain
                return response.status == 200 and answer.get("health") == "true"
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False


def make_store(url: str, **options: Any) -> SharedStore:
    """A store client for ``url`` (redis[s]:// or etcd[s]://)."""
    if urlsplit(url).scheme in ("redis", "rediss"):
        return RedisStore(url, **options)
    return EtcdStore(url, **options)


@pytest.fixture(scope="session")
def _redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture(scope="session")
def _etcd_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    yield server
    server.kill()


@pytest.fixture
async def redis_server(_redis_process: RedisServer) -> RedisServer:
    """The session's Redis, running (started again if an earlier test killed it)."""
    await _redis_process.start()
    return _redis_process


@pytest.fixture
async def etcd_server(_etcd_process: EtcdServer) -> EtcdServer:
    """The session's etcd, running (started again if an earlier test killed it)."""
    await _etcd_process.start()
    return _etcd_process


@pytest.fixture(params=["redis", "etcd"])
def store_server(request: pytest.FixtureRequest) -> StoreServer:
    """Each store server in turn: a test using it runs once against Redis and once against etcd."""
    server: StoreServer = request.getfixturevalue(f"{request.param}_server")
    return server


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[Callable[..., EtcdServer]]:
    """``private_etcd(certs=None)``: an etcd of the test's own (not started), for tests that change
    how it runs (authentication, TLS); killed after the test."""
    made: list[EtcdServer] = []

    def make(certs: Certs | None = None) -> EtcdServer:
        data = tmp_path / f"etcd-{len(made)}"
        data.mkdir()
        made.append(EtcdServer(data, certs))
        return made[-1]

    yield make
    for server in made:
        server.kill()


@pytest.fixture
def private_tls_redis(tmp_path: Path, tls_certs: Certs) -> Iterator[TlsRedisServer]:
    """A redis-server of the test's own serving TLS only with ``tls_certs`` (not started)."""
    data = tmp_path / "redis-tls"
    data.mkdir()
    server = TlsRedisServer(data, tls_certs)
    yield server
    server.kill()


@pytest.fixture
def tls_certs(tmp_path: Path) -> Certs:
    """A CA with a server certificate for 127.0.0.1 and a client certificate, for this test."""
    directory = tmp_path / "certs"
    directory.mkdir()
    return make_certs(directory)


OpenStore = Callable[..., SharedStore]


@pytest.fixture
async def open_store(store_server: StoreServer) -> AsyncIterator[OpenStore]:
    """``open_store(**options)``: a new client of ``store_server`` under this test's own prefix."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    opened: list[SharedStore] = []

    def open_(**options: Any) -> SharedStore:
        store = make_store(store_server.url(prefix), **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()
