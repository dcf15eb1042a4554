"""`bgproxy run` as a real process (persistence across kill -9, refusals to start) and the operator CLI.

The operator commands run in-process through ``main()`` for speed; they talk to the real server over
HTTP exactly as the installed command does (one test runs the installed command too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from process import free_port

from bgproxy.cli import main

BGPROXY = str(Path(sys.executable).with_name("bgproxy"))
TOKEN = "cli-test-token-0123456789abcdef"


class Server:
    """`bgproxy run --config F` in a subprocess, on free ports, with its own state file."""

    def __init__(self, tmp_path: Path, admin: dict[str, Any] | None = None) -> None:
        self.tmp_path = tmp_path
        self.admin_port = free_port()
        self.config = tmp_path / "bgproxy.yaml"
        self.state_file = tmp_path / "state.json"
        self.log = tmp_path / "bgproxy.log"
        upstream = f"127.0.0.1:{free_port()}"  # nothing listens: these tests never proxy a request
        config = {
            "listen": f"127.0.0.1:{free_port()}",
            "admin": {"listen": f"127.0.0.1:{self.admin_port}", **(admin or {})},
            "pools": {"blue": {"upstreams": [upstream]}, "green": {"upstreams": [upstream]}},
            "weights": {"blue": 100, "green": 0},
            "state_file": str(self.state_file),
            "flip_probe": "off",  # nothing listens upstream: these tests drive the CLI, not traffic
        }
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BGPROXY_")}
        with self.log.open("ab") as log:
            return subprocess.Popen(
                [BGPROXY, "run", "--config", str(self.config), *args], stdout=log, stderr=log, env=env
            )

    def start(self, *args: str) -> None:
        self.proc = self.spawn(*args)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"bgproxy exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.02)  # not listening yet: poll again
        pytest.fail(f"bgproxy did not become healthy:\n{self.log.read_text()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)

    def get(self, path: str, token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=5) as r:
            return json.load(r)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the bgproxy command in-process: (exit status, stdout, stderr)."""
    try:
        status = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------------------------------------- run


def test_state_survives_kill_9(server: Server) -> None:
    flip = [BGPROXY, "flip", "--admin", server.url, "--to", "green", "--reason", "release 7", "--json"]
    done = subprocess.run(
        flip, capture_output=True, text=True, timeout=30, check=False
    )  # the installed command
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == 1
    server.kill9()  # no shutdown code runs: only what was on disk before the answer counts
    server.start()
    state = server.get("/v1/state")
    assert (state["weights"], state["active"], state["version"]) == ({"blue": 0, "green": 100}, "green", 1)
    [event] = server.get("/v1/events")["events"]  # the audit log was on disk before the answer too
    assert (event["kind"], event["version"], event["to_weights"]) == ("switch", 1, {"blue": 0, "green": 100})


def test_corrupt_state_file_stops_run_unless_reset_state(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    srv.state_file.write_text('{"weights": {"blue": 0, "green": 100}, "version": 3')
    refused = srv.spawn()
    assert refused.wait(timeout=20) == 2
    log = srv.log.read_text()
    assert f"state file {srv.state_file}: not valid JSON" in log
    assert "--reset-state" in log
    assert srv.state_file.read_text().endswith('"version": 3')  # left for the operator to inspect
    try:
        srv.start("--reset-state")
        state = srv.get("/v1/state")
    finally:
        srv.stop()
    assert (state["weights"], state["version"]) == ({"blue": 100, "green": 0}, 0)
    assert json.loads(srv.state_file.read_text())["version"] == 0


def test_run_refuses_a_public_admin_listener_without_token(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    config = yaml.safe_load(srv.config.read_text())
    config["admin"]["listen"] = f"0.0.0.0:{srv.admin_port}"
    srv.config.write_text(yaml.safe_dump(config))
    assert srv.spawn().wait(timeout=20) == 2
    assert "is not a loopback address and admin.tokens is empty" in srv.log.read_text()
    assert not srv.state_file.exists()  # refused before touching anything


# ---------------------------------------------------------------------------------------------- client


def test_status_flip_weights_events_print_short_tables(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = ("--admin", server.url)
    status, out, _ = run_cli(capsys, "status", *admin)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("active: blue  version: 0  updated: ")
    assert lines[1].split() == ["COLOR", "WEIGHT", "SHARE", "IN-FLIGHT", "UPSTREAMS"]
    upstream = server.get("/v1/state")["pools"]["blue"]["upstreams"][0]
    assert lines[2].split() == ["blue", "100", "100%", "0", upstream]
    assert lines[3].split() == ["green", "0", "0%", "0", upstream]

    status, out, _ = run_cli(capsys, "flip", *admin, "--reason", "release 7", "--drain-timeout", "5s")
    assert status == 0
    assert out.startswith("active: green  version: 1")

    status, out, _ = run_cli(capsys, "weights", "blue=90", "green=10", *admin, "--if-match", "1")
    assert status == 0
    assert out.startswith("active: split  version: 2")
    assert out.splitlines()[2].split()[:3] == ["blue", "90", "90%"]

    status, out, _ = run_cli(capsys, "events", *admin)
    assert status == 0
    header, first, second = out.splitlines()
    assert header.split() == ["VERSION", "TIME", "ACTOR", "CHANGE", "REASON"]
    assert first.split()[2:] == ["local", "weights", "100/0", "->", "0/100", "(blue/green)", "release", "7"]
    assert second.split()[2:] == ["local", "weights", "0/100", "->", "90/10", "(blue/green)"]


def test_json_prints_the_api_answer(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(
        capsys, "status", "--config", str(server.config), "--json"
    )  # address from config
    assert (status, json.loads(out)) == (0, server.get("/v1/state"))
    status, out, _ = run_cli(capsys, "flip", "--admin", server.url, "--json")
    assert (status, json.loads(out)) == (0, server.get("/v1/state"))
    status, out, _ = run_cli(capsys, "events", "--admin", server.url, "--json")
    assert (status, json.loads(out)) == (0, server.get("/v1/events"))
    status, out, _ = run_cli(capsys, "weights", "blue=-1", "green=1", "--admin", server.url, "--json")
    assert (status, json.loads(out)) == (
        1,
        {"error": "invalid request body", "detail": ["weights.blue: must be >= 0 (got -1)"]},
    )


def test_refusals_exit_1_with_the_servers_message(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    admin = ("--admin", server.url)
    assert run_cli(capsys, "weights", "blue=0", "green=0", *admin) == (
        1,
        "",
        "bgproxy: refused (422): invalid request body\n"
        '  weights: at least one color needs a weight > 0 (got {"blue": 0, "green": 0})\n',
    )
    assert run_cli(capsys, "flip", "--if-match", "4", *admin) == (
        1,
        "",
        "bgproxy: refused (409): version conflict: expected version 4, current version is 0\n"
        "  nothing was changed; read /v1/state and retry\n",
    )
    assert server.get("/v1/state")["version"] == 0


def test_force_overrides_the_refusal_to_send_traffic_to_a_dead_color(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = Server(tmp_path)
    config = yaml.safe_load(srv.config.read_text())
    check = {"interval": 0.1, "timeout": 0.1, "unhealthy_threshold": 1}
    config["pools"]["green"]["health_check"] = check  # its upstream has nothing listening
    srv.config.write_text(yaml.safe_dump(config))
    dead = config["pools"]["green"]["upstreams"][0]
    admin = ("--admin", srv.url)
    srv.start()
    try:
        deadline = time.monotonic() + 5
        while srv.get("/v1/pools")["green"][0]["state"] != "unhealthy":
            assert time.monotonic() < deadline, "green never turned unhealthy"
            time.sleep(0.02)

        refusal = (
            f"bgproxy: refused (409): green has no healthy upstream (down: {dead}); nothing changed. "
            'Send "force": true to apply anyway.\n'
        )
        assert run_cli(capsys, "flip", *admin) == (1, "", refusal)
        assert run_cli(capsys, "weights", "blue=50", "green=50", *admin) == (1, "", refusal)
        assert srv.get("/v1/state")["version"] == 0

        status, out, _ = run_cli(capsys, "weights", "blue=50", "green=50", "--force", *admin)
        assert (status, out.splitlines()[0].split()[:4]) == (0, ["active:", "split", "version:", "1"])
        assert run_cli(capsys, "flip", "--to", "green", *admin) == (1, "", refusal)
        status, out, _ = run_cli(
            capsys, "flip", "--to", "green", "--force", "--reason", "hotfix", "--json", *admin
        )
        state = json.loads(out)
        events = srv.get("/v1/events")["events"]
    finally:
        srv.stop()
    assert (status, state["active"], state["version"]) == (0, "green", 2)
    assert [(e["to_weights"], e["reason"]) for e in events] == [
        ({"blue": 50, "green": 50}, None),
        ({"blue": 0, "green": 100}, "hotfix"),
    ]


def test_token_from_flag_or_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = Server(tmp_path, admin={"tokens": {"deployer": TOKEN}})
    srv.start()
    try:
        status, _, err = run_cli(capsys, "status", "--admin", srv.url)
        assert (status, err.splitlines()[0]) == (1, "bgproxy: refused (401): unauthorized")
        assert run_cli(capsys, "flip", "--admin", srv.url, "--token", TOKEN)[0] == 0
        monkeypatch.setenv("BGPROXY_TOKEN", TOKEN)
        assert run_cli(capsys, "flip", "--admin", srv.url)[0] == 0
        events = srv.get("/v1/events", token=TOKEN)["events"]
    finally:
        srv.stop()
    assert [e["actor"] for e in events] == ["deployer", "deployer"]


def test_unreachable_admin_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    status, out, err = run_cli(capsys, "status", "--admin", url)
    assert (status, out) == (2, "")
    assert err.startswith(f"bgproxy: cannot use the admin API at {url}/v1/state: ")
    assert "Connection refused" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["weights", "blue=x", "green=1"], "weight of blue must be an integer, got 'x'"),
        (["weights", "blue=1"], "give both weights: blue=N green=N"),
        (["weights", "blue=1", "blue=2"], "expected blue=N green=N, got 'blue=2'"),
        (["weights", "red=1", "green=1"], "expected blue=N green=N, got 'red=1'"),
        (["flip", "--to", "red"], "invalid choice: 'red'"),
        (["flip", "--if-match", "latest"], "invalid int value: 'latest'"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    status, _, err = run_cli(capsys, *argv, "--admin", f"http://127.0.0.1:{free_port()}")
    assert status == 2
    assert message in err
