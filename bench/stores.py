"""Real state stores for the fleet bench and tests: Debian's redis-server and etcd on 127.0.0.1.

Each runs on free loopback ports with its own data dir, and survives a kill -9 with its data (Redis
with an append-only file fsynced on every write; etcd always does), so a store outage can be played
as it happens in production: the process dies, then comes back on the same address with its data.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from bench.harness import Service, ServiceError, Services, free_port, http_get, wait_until

READY_TIMEOUT_S = 15.0
KINDS = ("redis", "etcd")


def redis_argv(port: int, data: Path) -> list[str]:
    return [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data),
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--protected-mode", "yes",
    ]  # fmt: skip


def etcd_argv(port: int, peer_port: int, data: Path) -> list[str]:
    client, peer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
    return [
        "etcd",
        "--name", "bench",
        "--data-dir", str(data),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"bench={peer}",
        "--initial-cluster-state", "new",
        "--log-level", "warn",
    ]  # fmt: skip


def redis_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def etcd_ready(port: int) -> bool:
    try:
        status, body = http_get(f"http://127.0.0.1:{port}/health", timeout=0.5)
    except OSError:
        return False
    return status == 200 and b'"true"' in body


def missing(kind: str) -> str | None:
    binary = "redis-server" if kind == "redis" else "etcd"
    if shutil.which(binary) is None:
        return f"{binary} is not installed: run `bash .ci/system-deps` (Debian's {binary} package)"
    return None


class StoreProcess:
    """One store server: start(), kill() (SIGKILL), start() again on the same port and data."""

    def __init__(self, services: Services, workdir: Path, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown store {kind!r}: expected one of {', '.join(KINDS)}")
        problem = missing(kind)
        if problem is not None:
            raise ServiceError(problem)
        self.kind = kind
        self.port = free_port()
        self.peer_port = free_port()
        self.data = workdir / f"{kind}-data"
        self.data.mkdir(parents=True, exist_ok=True)
        self._services = services
        self._service: Service | None = None

    @property
    def version(self) -> str:
        argv = ["redis-server", "--version"] if self.kind == "redis" else ["etcd", "--version"]
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.splitlines()[0]

    def argv(self) -> list[str]:
        if self.kind == "redis":
            return redis_argv(self.port, self.data)
        return etcd_argv(self.port, self.peer_port, self.data)

    def ready(self) -> bool:
        return redis_ready(self.port) if self.kind == "redis" else etcd_ready(self.port)

    def url(self, prefix: str) -> str:
        """The ``state_store`` URL for a key prefix like "/bench/"."""
        if self.kind == "redis":
            return f"redis://127.0.0.1:{self.port}/0?prefix={prefix.strip('/')}:"
        return f"etcd://127.0.0.1:{self.port}{prefix}"

    def start(self) -> None:
        self._service = self._services.start(self.kind, self.argv(), env=None, cwd=self.data)
        wait_until(self.ready, self._service, f"{self.kind} on port {self.port}", READY_TIMEOUT_S)

    def kill(self) -> None:
        """kill -9, as a crash would: no shutdown, no final save."""
        if self._service is not None:
            self._service.proc.kill()
            self._service.proc.wait(10)
            self._services.stop(self._service)  # reaped already; only forgets it
            self._service = None
            deadline = time.monotonic() + 5
            while self.ready() and time.monotonic() < deadline:
                time.sleep(0.01)


def start_store(services: Services, workdir: Path, kind: str) -> StoreProcess:
    store = StoreProcess(services, workdir, kind)
    store.start()
    return store
