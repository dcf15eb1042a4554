"""`bgproxy run` as a real process on free 127.0.0.1 ports, for tests of signals, exit status and limits."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

BGPROXY = str(Path(sys.executable).with_name("bgproxy"))
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class BgproxyProcess:
    """`bgproxy run --config F` in a subprocess, with a blue and a green origin behind it."""

    def __init__(
        self,
        tmp_path: Path,
        blue: str,
        green: str,
        shutdown_timeout: float,
        *,
        nofile: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """``nofile``: the process's open-file limit (soft and hard); ``extra``: config keys to add."""
        self.port = free_port()
        self.admin_port = free_port()
        self.shutdown_timeout = shutdown_timeout
        self.nofile = nofile
        self.log = tmp_path / "bgproxy.log"
        self.config = tmp_path / "bgproxy.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{self.port}",
                    "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
                    "pools": {"blue": {"upstreams": [blue]}, "green": {"upstreams": [green]}},
                    "weights": {"blue": 100, "green": 0},
                    "state_file": str(tmp_path / "state.json"),
                    "shutdown_timeout": shutdown_timeout,
                    "timeouts": {"connect": 1, "upstream_header": 30, "client_header": 5, "idle": 30},
                    **(extra or {}),
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start(self, session: aiohttp.ClientSession, *args: str) -> None:
        """Start `bgproxy run` (with ``args`` added, e.g. --takeover SOCKET) and wait until it is ready."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BGPROXY_")}
        with self.log.open("ab") as log:
            # Popen, not asyncio's subprocess: poll() reaps at once, so alive() is exact.
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - fork/exec only, nothing waits here
                [BGPROXY, "run", "--config", str(self.config), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=self._limit_files if self.nofile else None,  # noqa: PLW1509 - setrlimit only
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline:
            if not self.alive():
                pytest.fail(f"bgproxy exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                async with session.get(f"{self.admin_url}/readyz", timeout=aiohttp.ClientTimeout(1)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet
            await asyncio.sleep(0.05)
        pytest.fail(f"bgproxy not ready after {START_TIMEOUT:.0f} s:\n{self.log_text()}")

    def _limit_files(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def cpu_seconds(self) -> float:
        """User and system CPU the process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        """The exit status; fails the test if the process is still running after `timeout` seconds."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None:
            if loop.time() >= deadline:
                pytest.fail(f"bgproxy still running {timeout:.1f} s later:\n{self.log_text()}")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)
