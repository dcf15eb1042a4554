"""The persisted switch state: atomic writes, strict reads, and restore on start.

(Persistence across `kill -9` of a real `bgproxy run` process is in test_cli.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from conftest import MakeProxy
from upstreams import origin

from bgproxy.app import App
from bgproxy.config import load_config
from bgproxy.control.state import FileStateBackend, PersistedState, StateFileError
from bgproxy.core.timefmt import parse_rfc3339, rfc3339
from bgproxy.core.weights import Weights

GOOD = {
    "weights": {"blue": 0, "green": 100},
    "version": 7,
    "updated_at": "2024-05-01T12:00:00.25Z",
    "format": 1,
}


def test_older_formats_are_read_as_having_no_rollouts_or_pools(tmp_path: Path) -> None:
    """A file written by an older bgproxy (format 1, or 2 before pools) must not stop an upgrade."""
    store = FileStateBackend(tmp_path / "state.json")
    for older in (GOOD, {**GOOD, "format": 2, "rollouts": [{"id": "r-1"}]}):
        store.path.write_text(json.dumps(older))
        state = store.load()
        assert state is not None and state.version == 7 and state.pools is None
        assert state.rollouts == tuple(older.get("rollouts", []))


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    store = FileStateBackend(tmp_path / "state.json")
    assert store.load() is None  # first start: no file yet
    state = PersistedState(Weights(90, 10), 3, 1714564800.123456)
    store.save(state)
    assert store.load() == state
    on_disk = json.loads((tmp_path / "state.json").read_text())
    assert on_disk == {
        "weights": {"blue": 90, "green": 10},
        "version": 3,
        "updated_at": "2024-05-01T12:00:00.123456Z",
        "pools": None,
        "rollouts": [],
        "format": 3,
    }


def test_save_replaces_the_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = FileStateBackend(tmp_path / "state.json")
    store.save(PersistedState(Weights(100, 0), 0, 0.0))
    store.save(PersistedState(Weights(0, 100), 1, 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    loaded = store.load()
    assert loaded is not None
    assert (loaded.weights, loaded.version) == (Weights(0, 100), 1)


def test_failed_save_names_the_file_and_keeps_the_old_state(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.json"
    path.parent.mkdir()
    store = FileStateBackend(path)
    store.save(PersistedState(Weights(100, 0), 0, 0.0))
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    broken = FileStateBackend(blocker / "state.json")
    with pytest.raises(
        StateFileError, match=r"state file .*blocker/state\.json: cannot write it: Not a directory"
    ):
        broken.save(PersistedState(Weights(0, 100), 1, 1.0))
    assert store.load() == PersistedState(Weights(100, 0), 0, 0.0)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b'{"weights": ', "not valid JSON: Expecting value: line 1 column 13"),
        (b"\xff\xfe\x00garbage", "not UTF-8 text: invalid start byte at byte 0"),
        (b"[1, 2]", "top level must be a JSON object, got list"),
        (json.dumps({**GOOD, "format": 4}).encode(), "format must be 1 to 3 (got 4)"),
        (json.dumps({**GOOD, "format": 3, "rollouts": []}).encode(), "missing key 'pools'"),
        (json.dumps({**GOOD, "format": 2}).encode(), "missing key 'rollouts'"),
        (json.dumps({**GOOD, "rollouts": []}).encode(), "unknown key 'rollouts'"),
        (json.dumps({**GOOD, "format": 2, "pools": None, "rollouts": []}).encode(), "unknown key 'pools'"),
        (
            json.dumps({**GOOD, "format": 3, "pools": None, "rollouts": [1]}).encode(),
            "rollouts must be a list of JSON objects",
        ),
        (
            json.dumps({**GOOD, "format": 3, "pools": [], "rollouts": []}).encode(),
            "pools must be a JSON object",
        ),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "format"}).encode(),
            "format must be 1 to 3 (got None)",
        ),
        (json.dumps({**GOOD, "extra": 1}).encode(), "unknown key 'extra'"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "version"}).encode(), "missing key 'version'"),
        (
            json.dumps({**GOOD, "weights": {"blue": 0, "green": 0}}).encode(),
            "at least one color needs a weight",
        ),
        (json.dumps({**GOOD, "weights": {"blue": -1, "green": 1}}).encode(), "weight for blue must be >= 0"),
        (json.dumps({**GOOD, "weights": {"blue": 1}}).encode(), "missing key 'green' in weights"),
        (json.dumps({**GOOD, "version": -1}).encode(), "version must be an integer >= 0, got -1"),
        (json.dumps({**GOOD, "version": True}).encode(), "version must be an integer >= 0, got True"),
        (json.dumps({**GOOD, "version": 1.5}).encode(), "version must be an integer >= 0, got 1.5"),
        (json.dumps({**GOOD, "updated_at": "yesterday"}).encode(), "updated_at must be an RFC 3339 time"),
        (
            json.dumps({**GOOD, "updated_at": "2024-05-01T12:00:00"}).encode(),
            "updated_at must be an RFC 3339",
        ),
        (json.dumps({**GOOD, "updated_at": 0}).encode(), "updated_at must be an RFC 3339 time"),
        (json.dumps(GOOD).replace("7", "NaN").encode(), "NaN is not valid JSON"),
    ],
)
def test_corrupt_file_is_an_error_naming_file_and_problem(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StateFileError) as caught:
        FileStateBackend(path).load()
    assert str(caught.value).startswith(f"state file {path}: ")
    assert problem in str(caught.value)


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()  # a directory where the file should be: reading fails even as root
    with pytest.raises(StateFileError, match=r"cannot read it: Is a directory"):
        FileStateBackend(path).load()


def test_rfc3339_round_trips() -> None:
    assert parse_rfc3339("2024-05-01T12:00:00.25Z") == 1714564800.25
    assert parse_rfc3339("2024-05-01T14:00:00.25+02:00") == 1714564800.25
    assert rfc3339(1714564800.25) == "2024-05-01T12:00:00.250000Z"


async def test_start_restores_saved_state_over_config_weights(make_proxy: MakeProxy, tmp_path: Path) -> None:
    state_file = tmp_path / "kept.json"
    state_file.write_text(json.dumps(GOOD))
    async with origin("blue") as b, origin("green") as g:
        proxy = await make_proxy(blue=[b.addr], green=[g.addr], weights=(100, 0), state_file=str(state_file))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{proxy.admin_url}/v1/state") as resp:
                state = await resp.json()
            async with http.get(f"{proxy.url}/echo") as resp:
                assert resp.headers["X-Color"] == "green"
    assert state["weights"] == {"blue": 0, "green": 100}
    assert state["version"] == 7
    assert state["updated_at"] == "2024-05-01T12:00:00.250000Z"


async def test_missing_file_is_seeded_from_config_weights(make_proxy: MakeProxy, tmp_path: Path) -> None:
    state_file = tmp_path / "new.json"
    await make_proxy(weights=(30, 70), state_file=str(state_file))
    loaded = FileStateBackend(state_file).load()
    assert loaded is not None
    assert (loaded.weights, loaded.version) == (Weights(30, 70), 0)


async def test_corrupt_file_stops_start_unless_reset(make_proxy: MakeProxy, tmp_path: Path) -> None:
    state_file = tmp_path / "bad.json"
    state_file.write_text("{")
    with pytest.raises(StateFileError, match="not valid JSON"):
        await make_proxy(state_file=str(state_file))
    config = load_config((tmp_path / "bgproxy-0.yaml"), environ={})  # the file make_proxy just wrote
    app = App(config, reset_state=True)
    await app.start()
    try:
        assert app.switchboard.weights == Weights(100, 0)
        seeded = FileStateBackend(state_file).load()
        assert seeded is not None
        assert (seeded.weights, seeded.version) == (Weights(100, 0), 0)
        assert seeded.updated_at == pytest.approx(app.switchboard.updated_at, abs=1e-6)
    finally:
        await app.stop()
