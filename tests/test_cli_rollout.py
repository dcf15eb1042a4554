"""`bgproxy rollout ...` against a real bgproxy: real origins, real traffic through the proxy, the real API.

``main()`` blocks on urllib, so it runs in a worker thread (``asyncio.to_thread``) while the test's event
loop keeps serving the proxy, its admin API and the traffic. Waits poll the rollout's own state.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from process import free_port
from upstreams import origin
from waiting import eventually

import bgproxy.cli
from bgproxy.cli import _error_ratio, main

pytestmark = pytest.mark.timeout(20)

FAST = ("--steps", "50,100", "--pause", "100ms", "--bake", "100ms", "--min-requests", "20")
HOLD = ("--steps", "50,100", "--pause", "1h")  # stays at its first step for the length of a test


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse usage errors
        return int(exc.code or 0)


async def cli(capsys: pytest.CaptureFixture[str], proxy: Any, *argv: str) -> tuple[int, str, str]:
    """Run `bgproxy ARGV --admin <proxy>` in a thread: (exit status, stdout, stderr)."""
    status = await asyncio.to_thread(_main, [*argv, "--admin", proxy.admin_url])
    out, err = capsys.readouterr()
    return status, out, err


async def api(proxy: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, f"{proxy.admin_url}{path}", json=body) as r:
        return r.status, await r.json()


async def until(proxy: Any, check: Any, within: float = 5.0) -> dict[str, Any]:
    """Poll the current rollout until ``check(body)`` holds."""
    async with asyncio.timeout(within):
        while True:
            status, body = await api(proxy, "GET", "/v1/rollouts/current")
            if status == 200 and check(body):
                return body
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def traffic(url: str, limit: int = 5000) -> AsyncIterator[None]:
    """Requests to /echo through the proxy, 4 at a time, until the block ends (or ``limit`` is sent)."""
    sent = 0
    stop = asyncio.Event()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while not stop.is_set() and sent < limit:
            sent += 1
            async with session.get(f"{url}/echo") as r:
                await r.read()

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(4)]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def send(url: str, n: int) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(f"{url}/echo") as r:
                assert r.status == 200


HEADLINE = re.compile(r"^rollout (r-\d{8}-\d{6}-[0-9a-f]{4}): blue -> green, (\w+), step (\d)/(\d) at (\d+)%")


# ---------------------------------------------------------------------------------------------- start


async def test_start_prints_the_rollout_and_status_renders_steps_ratios_and_decision(
    make_proxy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        status, out, err = await cli(
            capsys, proxy, "rollout", "start", "--to", "green", *HOLD, "--max-error-ratio", "2%",
            "--min-requests", "30", "--reason", "release 7",
        )  # fmt: skip
        assert (status, err) == (0, "")
        lines = out.splitlines()
        head = HEADLINE.match(lines[0])
        assert head is not None and head.groups()[1:] == ("running", "1", "2", "50"), lines[0]
        assert re.fullmatch(r"started \S+Z by local: release 7", lines[1])
        assert lines[2].split() == ["STEP", "WEIGHT", "STATUS", "PROGRESS"]
        assert lines[3].split()[:4] == ["1", "50%", "current", "requests"]
        assert lines[4].split() == ["2", "100%", "pending", "bake", "5m00s"]  # the config's default bake
        assert lines[-1].endswith("step: step 1/2: green to 50%")

        await send(proxy.url, 60)  # about half of them to green
        assert green.requests > 0
        # Once the evidence counts every request green answered, it holds still (no more traffic).
        body = await until(
            proxy, lambda b: b["evidence"] and b["evidence"]["candidate"]["requests"] == green.requests
        )
        candidate_requests = green.requests
        status, out, err = await cli(capsys, proxy, "rollout", "status")
        assert (status, err) == (0, "")
        lines = out.splitlines()
        assert lines[0] == f"rollout {body['id']}: blue -> green, running, step 1/2 at 50%"
        current = lines[3]
        assert current.startswith("1     50%     current  requests [")
        bar = "#" * (20 * min(candidate_requests, 30) // 30)
        assert f"[{bar.ljust(20, '.')}] {candidate_requests}/30  pause [" in current
        assert re.search(r"pause \[\.{20}\] [\d.]+s/1h00m$", current), current
        assert lines[5] == "evidence at step 1:"
        assert " ".join(lines[6].split()) == "COLOR ROLE REQUESTS ERRORS RATIO BOUNDS P99 VS 2%"
        assert lines[7].split()[:5] == ["green", "candidate", str(candidate_requests), "0", "0%"]
        assert lines[7].split()[5:8] == ["0%", "..", _pct(body["evidence"]["candidate"]["error_ratio_high"])]
        assert lines[8].split()[:2] == ["blue", "stable"]
        assert lines[9].startswith("last decision: ") and lines[9].endswith("step: step 1/2: green to 50%")

        status, out, _ = await cli(capsys, proxy, "rollout", "status", "--json")
        shown = json.loads(out)
        assert (status, shown["id"], shown["spec"]["max_error_ratio"]) == (0, body["id"], 0.02)
        assert shown["spec"]["min_requests"] == 30 and shown["reason"] == "release 7"


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.3g}%"


async def test_server_refusals_exit_1_with_the_servers_message(
    make_proxy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        status, out, err = await cli(capsys, proxy, "rollout", "start", "--to", "green", "--pause", "5x")
        assert (status, out) == (1, "")
        assert err == (
            "bgproxy: refused (422): invalid request body\n"
            '  rollout.step_pause: not a duration like 30, 30s, 250ms, 2m (got "5x")\n'
        )
        status, out, err = await cli(capsys, proxy, "rollout", "start", "--to", "green", "--steps", "50,25")
        assert (status, out) == (1, "")
        assert err == (
            "bgproxy: refused (422): invalid request body\n"
            "  rollout.steps: must increase and end at 100, like [5, 25, 50, 100] (got [50, 25])\n"
        )
        assert (await api(proxy, "GET", "/v1/rollouts/current"))[0] == 404  # nothing was started

        status, out, _ = await cli(capsys, proxy, "rollout", "start", "--to", "green", *HOLD, "--json")
        rollout_id = json.loads(out)["id"]
        status, out, err = await cli(capsys, proxy, "rollout", "start", "--to", "green")
        assert (status, out) == (1, "")
        assert err == (
            f"bgproxy: refused (409): rollout {rollout_id} to green is running; promote or abort it "
            "before starting another\n  no rollout was started\n"
        )
        status, out, _ = await cli(capsys, proxy, "rollout", "start", "--to", "green", "--json")
        assert (status, json.loads(out)["detail"]) == (1, ["no rollout was started"])


async def test_a_bad_duration_prints_the_servers_detail(
    make_proxy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        status, _, err = await cli(capsys, proxy, "rollout", "start", "--to", "green", "--bake", "soon")
    assert status == 1
    assert err.startswith("bgproxy: refused (422): invalid request body\n  rollout.bake: ")
    assert err.endswith('(got "soon")\n')


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-error-ratio", "abc"], "argument --max-error-ratio: expected a percentage like 0.5%"),
        (["--max-error-ratio", "0"], "argument --max-error-ratio: "),
        (["--max-error-ratio", "1"], "argument --max-error-ratio: "),
        (["--max-error-ratio", "150%"], "argument --max-error-ratio: "),
        (["--max-error-ratio", "nan"], "argument --max-error-ratio: "),
        (["--max-error-ratio", "0.5%%"], "(got '0.5%%')"),
        (["--steps", "5,x,100"], "argument --steps: expected candidate percentages like 5,25,100"),
        (["--min-requests", "many"], "argument --min-requests: invalid int value: 'many'"),
        (["--to", "red"], "argument --to: invalid choice: 'red'"),
        ([], "the following arguments are required: --to"),
    ],
)
def test_usage_errors_exit_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    to = [] if "--to" in argv or not argv else ["--to", "green"]
    status = _main(["rollout", "start", *to, *argv, "--admin", f"http://127.0.0.1:{free_port()}"])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert message in err


@pytest.mark.parametrize(
    ("text", "ratio"), [("0.5%", 0.005), ("0.005", 0.005), (" 2% ", 0.02), ("0.999", 0.999), ("1e-3", 0.001)]
)
def test_max_error_ratio_takes_a_percentage_or_a_ratio(text: str, ratio: float) -> None:
    assert _error_ratio(text) == pytest.approx(ratio, rel=1e-12)


# ---------------------------------------------------------------------------------------------- --wait


async def test_wait_exits_0_when_a_healthy_candidate_is_promoted(
    make_proxy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        async with traffic(proxy.url):
            status, out, err = await cli(capsys, proxy, "rollout", "start", "--to", "green", *FAST, "--wait")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    rollout_id = HEADLINE.match(lines[0]).group(1)  # type: ignore[union-attr]
    assert any(line.endswith("step: step 2/2: green to 100%, baking 0.1s") for line in lines)
    assert lines[-1] == f"rollout {rollout_id} promoted: baked 0.1s at 100% with no rule fired"
    assert proxy.app.switchboard.weights.as_dict() == {"blue": 0, "green": 100}


@pytest.mark.parametrize("fail_ratio", [1, 0.5])
async def test_wait_exits_1_when_the_candidate_fails_and_is_rolled_back(
    make_proxy: Any, capsys: pytest.CaptureFixture[str], fail_ratio: float
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        green.fail_ratio = fail_ratio
        proxy = await make_proxy([blue.addr], [green.addr])
        async with traffic(proxy.url):
            status, out, err = await cli(capsys, proxy, "rollout", "start", "--to", "green", *FAST, "--wait")
    assert status == 1
    rollout_id = HEADLINE.match(out).group(1)  # type: ignore[union-attr]
    assert err.startswith(f"bgproxy: rollout {rollout_id} rolled_back: rule error_ratio fired: "), err
    assert "promoted" not in out
    assert proxy.app.switchboard.weights.as_dict() == {"blue": 100, "green": 0}


async def test_wait_json_prints_the_final_rollout(
    make_proxy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        async with traffic(proxy.url):
            status, out, _ = await cli(
                capsys, proxy, "rollout", "start", "--to", "green", *FAST, "--wait", "--json"
            )
    final = json.loads(out)  # one document: the finished rollout
    assert (status, final["state"], [s["status"] for s in final["steps"]]) == (
        0,
        "promoted",
        ["done", "done"],
    )


# ---------------------------------------------------------------------------------------------- actions


async def test_status_and_actions_without_a_rollout_exit_1(
    make_proxy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        refusal = "bgproxy: refused (404): no rollout has run\n  start one with POST /v1/rollouts\n"
        assert await cli(capsys, proxy, "rollout", "status") == (1, "", refusal)
        assert await cli(capsys, proxy, "rollout", "status", "--watch") == (1, "", refusal)
        assert await cli(capsys, proxy, "rollout", "abort") == (1, "", refusal)


async def test_pause_resume_abort_change_the_state(
    make_proxy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        assert (await cli(capsys, proxy, "rollout", "start", "--to", "green", *HOLD))[0] == 0

        status, out, err = await cli(capsys, proxy, "rollout", "pause", "--reason", "look at logs")
        assert (status, err) == (0, "")
        head, decision = out.splitlines()
        rollout_id = HEADLINE.match(head).group(1)  # type: ignore[union-attr]
        assert head == (
            f"rollout {rollout_id}: blue -> green, paused, step 1/2 at 50% "
            "(paused by operator local (look at logs))"
        )
        assert decision.endswith(" pause: paused by local (look at logs)")

        status, out, err = await cli(capsys, proxy, "rollout", "pause")
        assert (status, out) == (1, "")
        assert err == (
            f"bgproxy: refused (409): rollout {rollout_id} is already paused "
            "(operator local (look at logs))\n  nothing was changed\n"
        )

        status, out, _ = await cli(capsys, proxy, "rollout", "resume")
        assert status == 0 and out.startswith(f"rollout {rollout_id}: blue -> green, running, step 1/2")

        status, out, _ = await cli(capsys, proxy, "rollout", "abort", "--reason", "wrong build")
        assert (status, out.splitlines()[0]) == (
            0,
            f"rollout {rollout_id}: blue -> green, aborted, step 1/2 at 0%",
        )
        assert out.splitlines()[1].endswith(" aborted: aborted by local (wrong build)")
        assert proxy.app.switchboard.weights.as_dict() == {"blue": 100, "green": 0}

        status, _, err = await cli(capsys, proxy, "rollout", "resume")
        assert (status, err.splitlines()[0]) == (
            1,
            f"bgproxy: refused (409): rollout {rollout_id} is already aborted",
        )


async def test_promote_sends_all_traffic_to_the_candidate(
    make_proxy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        assert (await cli(capsys, proxy, "rollout", "start", "--to", "green", *HOLD))[0] == 0
        status, out, _ = await cli(capsys, proxy, "rollout", "promote", "--json")
        assert (status, json.loads(out)["state"]) == (0, "promoted")
        assert proxy.app.switchboard.weights.as_dict() == {"blue": 0, "green": 100}
        status, out, _ = await cli(capsys, proxy, "rollout", "status")
        lines = out.splitlines()
        # The server reports the step the promotion skipped from (step 1/2 at 50%), not the 100% it set.
        assert status == 0 and ", promoted, step " in lines[0]
        assert lines[3].split()[:3] == ["1", "50%", "done"]
        assert lines[-1].endswith("promoted: promoted by local, skipping what was left")


# ---------------------------------------------------------------------------------------------- --watch


async def _watch(proxy: Any, stdout: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> asyncio.Task[int]:
    monkeypatch.setattr(bgproxy.cli, "_WATCH_INTERVAL", 0.05)
    monkeypatch.setattr("sys.stdout", stdout)
    argv = ["rollout", "status", "--watch", "--admin", proxy.admin_url]
    return asyncio.create_task(asyncio.to_thread(_main, argv))


async def test_watch_on_a_pipe_prints_plain_frames_until_the_rollout_ends(
    make_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        status, _ = await api(
            proxy, "POST", "/v1/rollouts", {"to": "green", "steps": [50, 100], "step_pause": "1h"}
        )
        assert status == 201
        stdout = io.StringIO()  # not a TTY
        watch = await _watch(proxy, stdout, monkeypatch)
        await eventually(lambda: stdout.getvalue().count("rollout r-") >= 3)
        assert (await api(proxy, "POST", "/v1/rollouts/current/abort"))[0] == 200
        status = await asyncio.wait_for(watch, 5)
    frames = stdout.getvalue().split("\n\n")
    assert status == 0 and len(frames) >= 4
    assert "\x1b" not in stdout.getvalue()
    assert all(", running, step 1/2 at 50%" in frame.splitlines()[0] for frame in frames[:-1])
    assert ", aborted, step 1/2 at 0%" in frames[-1].splitlines()[0]
    assert frames[-1].endswith("aborted: aborted by local\n")


class Terminal(io.StringIO):
    """A TTY that the user interrupts (Ctrl-C) as the third frame is drawn."""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text.startswith("\x1b[H\x1b[2J") and self.getvalue().count("\x1b[H") == 2:
            raise KeyboardInterrupt
        return super().write(text)


async def test_watch_on_a_terminal_redraws_and_ctrl_c_exits_0(
    make_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        status, _ = await api(
            proxy, "POST", "/v1/rollouts", {"to": "green", "steps": [50, 100], "step_pause": "1h"}
        )
        assert status == 201
        terminal = Terminal()
        status = await asyncio.wait_for(await _watch(proxy, terminal, monkeypatch), 5)
    shown = terminal.getvalue()
    assert status == 0
    frames = shown.split("\x1b[H\x1b[2J")
    assert frames[0] == "" and len(frames) == 3
    for frame in frames[1:]:
        assert HEADLINE.match(frame) is not None
        assert "every 0.05s; Ctrl-C to stop watching" in frame
    assert shown.endswith("\n")  # the prompt comes back on its own line
