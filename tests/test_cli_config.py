"""The command line around the config: check-config, bad configs, `python -m bgproxy`, JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from process import free_port

from bgproxy.config import dump_config, load_config

REPO = Path(__file__).resolve().parent.parent
BGPROXY = [sys.executable, "-m", "bgproxy"]


def test_check_config_prints_the_normalized_config() -> None:
    shipped = REPO / "config" / "bgproxy.yaml"
    done = subprocess.run(
        [*BGPROXY, "check-config", str(shipped)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == dump_config(load_config(shipped, environ={}))
    assert yaml.safe_load(done.stdout)["pools"]["blue"]["upstreams"] == ["127.0.0.1:9001", "127.0.0.1:9003"]


def test_bad_config_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listen: 127.0.0.1:8080\n"
        "pools:\n  blue: {upstreams: ['127.0.0.1']}\n  green: {upstreams: []}\n"
        "weights: {blue: -1, green: 0}\n"
        "drain_timeout: soon\n"
        "colour: blue\n"
    )
    for command in ("run", "check-config"):
        args = [*BGPROXY, "run", "--config", str(bad)] if command == "run" else [*BGPROXY, command, str(bad)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 4, lines
        assert all(line.startswith(f"{bad}: ") for line in lines)
        text = done.stderr
        assert "pools.blue.upstreams.0" in text and "'127.0.0.1'" in text
        assert "weights.blue" in text and "-1" in text
        assert "drain_timeout" in text and "'soon'" in text
        assert "colour" in text


def test_run_logs_start_and_stop_as_json_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "bgproxy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{free_port()}",
                "admin": {"listen": f"127.0.0.1:{free_port()}"},
                "pools": {"blue": {"upstreams": ["127.0.0.1:9"]}, "green": {"upstreams": ["127.0.0.1:9"]}},
                "state_file": str(tmp_path / "state.json"),
                "shutdown_timeout": 1,
                "logging": {"format": "json"},
                "limits": {"max_connections": 100},  # within any open-file limit: no warning first
            }
        )
    )
    proc = subprocess.Popen(
        [*BGPROXY, "run", "--config", str(config)], stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())
        assert first["msg"] == "bgproxy listening" and first["level"] == "info"
        assert first["weights"] == {"blue": 100, "green": 0}
        assert first["dataplane"] == ("interpreted" if os.environ.get("BGPROXY_PURE") == "1" else "mypyc")
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        records = [json.loads(line) for line in proc.stderr.read().splitlines() if line.strip()]
    finally:
        proc.kill()
    messages = [r["msg"] for r in records]
    assert "shutting down" in messages and messages[-1] == "bgproxy stopped"
