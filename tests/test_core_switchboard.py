"""Table tests for the pure core: colors, weights, the versioned switchboard, drains (bgproxy.core)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from bgproxy.core.colors import COLORS, Color, check_color, other
from bgproxy.core.drain import Drain
from bgproxy.core.errors import SwitchError, VersionConflict
from bgproxy.core.switchboard import Switchboard, SwitchEvent, SwitchResult
from bgproxy.core.weights import Weights

B: Color = "blue"
G: Color = "green"


def snapshot(board: Switchboard) -> tuple[object, ...]:
    return board.weights, board.version, board.updated_at, board.events(), board.drains()


# --- Weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blue", "green", "message"),
    [
        (-1, 10, "weight for blue must be >= 0, got -1"),
        (10, -5, "weight for green must be >= 0, got -5"),
        (0, 0, "at least one color needs a weight > 0"),
        (True, 0, "weight for blue must be an integer, got True"),
        (1, False, "weight for green must be an integer, got False"),
        (1.0, 1, "weight for blue must be an integer, got 1.0"),
        (1, "1", "weight for green must be an integer, got '1'"),
        (None, 1, "weight for blue must be an integer, got None"),
    ],
)
def test_weights_rejects(blue: Any, green: Any, message: str) -> None:
    with pytest.raises(SwitchError, match=message.replace("(", r"\(")):
        Weights(blue, green)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"blue": 1}, "missing key 'green'"),
        ({"green": 1}, "missing key 'blue'"),
        ({}, "missing key 'blue'"),
        ({"blue": 1, "green": 1, "red": 1}, "unknown key 'red'"),
        ({"Blue": 1, "green": 1}, "unknown key 'Blue'"),
        ({"blue": 1, 2: 1}, "unknown key 2"),
        ({"blue": "90", "green": 10}, "weight for blue must be an integer, got '90'"),
        ({"blue": 90, "green": 10.5}, "weight for green must be an integer, got 10.5"),
        ({"blue": 90, "green": -10}, "weight for green must be >= 0"),
        ({"blue": True, "green": 1}, "weight for blue must be an integer, got True"),
        ({"blue": 0, "green": 0}, "at least one color needs a weight > 0"),
        ([("blue", 1), ("green", 1)], "weights must be a mapping"),
    ],
)
def test_weights_from_mapping_rejects(mapping: Any, message: str) -> None:
    with pytest.raises(SwitchError, match=message):
        Weights.from_mapping(mapping)


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({"blue": 90, "green": 10}, Weights(90, 10)),
        ({"green": 100, "blue": 0}, Weights(0, 100)),
        ({"blue": 10**12, "green": 1}, Weights(10**12, 1)),
    ],
)
def test_weights_from_mapping_accepts(mapping: Mapping[str, object], expected: Weights) -> None:
    w = Weights.from_mapping(mapping)
    assert w == expected
    assert Weights.from_mapping(w.as_dict()) == w


@pytest.mark.parametrize(
    ("weights", "active", "blue", "green", "total"),
    [
        (Weights(100, 0), B, 100, 0, 100),
        (Weights(0, 7), G, 0, 7, 7),
        (Weights(90, 10), None, 90, 10, 100),
        (Weights(1, 1), None, 1, 1, 2),
    ],
)
def test_weights_accessors(weights: Weights, active: Color | None, blue: int, green: int, total: int) -> None:
    assert weights.active == active
    assert (weights.of(B), weights.of(G)) == (blue, green)
    assert weights.as_dict() == {"blue": blue, "green": green}
    assert weights.total == total


@pytest.mark.parametrize(("color", "expected"), [(B, G), (G, B)])
def test_other(color: Color, expected: Color) -> None:
    assert other(color) == expected


@pytest.mark.parametrize("bad", ["red", "Blue", "", 0, b"blue"])  # None is flip's "the other one"
def test_unknown_color_is_refused_everywhere(bad: Any) -> None:
    board = Switchboard(Weights(1, 1), drain_timeout=10)
    for call in (check_color, other, Weights(1, 1).of, board.drain_of, board.finish_drain):
        with pytest.raises(SwitchError, match="unknown color"):
            call(bad)
    with pytest.raises(SwitchError, match="unknown color"):
        board.flip(bad, now=1)


# --- Switchboard: set_weights, flip, versions -----------------------------------------------------


def test_initial_state() -> None:
    board = Switchboard(Weights(90, 10), drain_timeout=30, version=7, updated_at=1000.0)
    assert (board.weights, board.version, board.updated_at) == (Weights(90, 10), 7, 1000.0)
    assert board.events() == []
    assert board.drains() == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drain_timeout": 0}, "drain_timeout must be > 0"),
        ({"drain_timeout": -1}, "drain_timeout must be > 0"),
        ({"drain_timeout": math.nan}, "drain_timeout must be a finite number"),
        ({"drain_timeout": math.inf}, "drain_timeout must be a finite number"),
        ({"drain_timeout": 5, "max_events": -1}, "max_events must be an integer >= 0"),
        ({"drain_timeout": 5, "version": -1}, "version must be an integer >= 0"),
        ({"drain_timeout": 5, "version": True}, "version must be an integer >= 0"),
        ({"drain_timeout": 5, "updated_at": math.nan}, "updated_at must be a finite number"),
    ],
)
def test_switchboard_rejects_bad_config(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SwitchError, match=message):
        Switchboard(Weights(1, 0), **kwargs)


@pytest.mark.parametrize(
    ("start", "to", "expected"),
    [
        (Weights(100, 0), None, Weights(0, 100)),
        (Weights(0, 100), None, Weights(100, 0)),
        (Weights(100, 0), G, Weights(0, 100)),
        (Weights(0, 3), B, Weights(3, 0)),
        (Weights(90, 10), G, Weights(0, 100)),
        (Weights(90, 10), B, Weights(100, 0)),
        (Weights(1, 1), B, Weights(2, 0)),
    ],
)
def test_flip_changes(start: Weights, to: Color | None, expected: Weights) -> None:
    board = Switchboard(start, drain_timeout=30)
    result = board.flip(to, now=50.0, actor="alice", reason="deploy 42")
    assert board.weights == expected
    assert (board.version, board.updated_at) == (1, 50.0)
    assert result == SwitchResult(
        changed=True,
        event=SwitchEvent(1, 50.0, start, expected, "alice", "deploy 42"),
        started_draining=tuple(
            Drain(c, 50.0, 80.0) for c in COLORS if start.of(c) > 0 and expected.of(c) == 0
        ),
        cancelled_draining=(),
    )
    assert board.events() == [result.event]


@pytest.mark.parametrize(("start", "to"), [(Weights(100, 0), B), (Weights(0, 5), G)])
def test_flip_to_live_color_is_noop(start: Weights, to: Color) -> None:
    board = Switchboard(start, drain_timeout=30, version=4, updated_at=9.0)
    before = snapshot(board)
    assert board.flip(to, now=50.0, expected_version=4) == SwitchResult(False, None, (), ())
    assert snapshot(board) == before


@pytest.mark.parametrize(
    ("start", "message"),
    [
        (Weights(90, 10), r"weights are split \(blue=90, green=10\): say which color to flip to"),
        (Weights(1, 1), r"weights are split \(blue=1, green=1\)"),
    ],
)
def test_flip_split_without_target_is_refused(start: Weights, message: str) -> None:
    board = Switchboard(start, drain_timeout=30)
    before = snapshot(board)
    with pytest.raises(SwitchError, match=message):
        board.flip(now=1.0)
    assert snapshot(board) == before


def test_set_weights_same_weights_is_noop() -> None:
    board = Switchboard(Weights(90, 10), drain_timeout=30, version=2, updated_at=5.0)
    before = snapshot(board)
    assert board.set_weights(Weights(90, 10), now=6.0) == SwitchResult(False, None, (), ())
    assert snapshot(board) == before


Op = Callable[[Switchboard], SwitchResult]


@pytest.mark.parametrize(
    ("op", "expected_version"),
    [
        (lambda s: s.set_weights(Weights(50, 50), now=1.0, expected_version=3), 3),
        (lambda s: s.set_weights(Weights(50, 50), now=1.0, expected_version=0), 3),
        (lambda s: s.set_weights(Weights(100, 0), now=1.0, expected_version=4), 3),  # stale even if no-op
        (lambda s: s.flip(now=1.0, expected_version=6), 3),
        (lambda s: s.flip(B, now=1.0, expected_version=2), 3),
    ],
)
def test_stale_expected_version_conflicts(op: Op, expected_version: int) -> None:
    board = Switchboard(Weights(100, 0), drain_timeout=30, version=5, updated_at=2.0)
    before = snapshot(board)
    with pytest.raises(VersionConflict, match="current version is 5") as info:
        op(board)
    assert info.value.current == 5
    assert isinstance(info.value, SwitchError)
    assert snapshot(board) == before


def test_stale_version_wins_over_split_error() -> None:
    """A stale client must learn it is stale before being told about weights it has not seen."""
    board = Switchboard(Weights(90, 10), drain_timeout=30, version=5)
    with pytest.raises(VersionConflict):
        board.flip(now=1.0, expected_version=4)


@pytest.mark.parametrize(
    "op",
    [
        lambda s: s.set_weights(Weights(50, 50), now=1.0, expected_version=5),
        lambda s: s.flip(now=1.0, expected_version=5),
        lambda s: s.flip(G, now=1.0, expected_version=5),
    ],
)
def test_matching_expected_version_applies(op: Op) -> None:
    board = Switchboard(Weights(100, 0), drain_timeout=30, version=5)
    result = op(board)
    assert result.changed
    assert board.version == 6
    assert result.event is not None and result.event.version == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drain_timeout": 0}, "drain_timeout must be > 0"),
        ({"drain_timeout": -3.0}, "drain_timeout must be > 0"),
        ({"drain_timeout": math.inf}, "drain_timeout must be a finite number"),
        ({"drain_timeout": math.nan}, "drain_timeout must be a finite number"),
        ({"drain_timeout": True}, "drain_timeout must be a finite number"),
        ({"now": math.nan}, "now must be a finite number"),
        ({"now": math.inf}, "now must be a finite number"),
    ],
)
@pytest.mark.parametrize("method", ["set_weights", "flip"])
def test_bad_arguments_leave_state_untouched(kwargs: dict[str, Any], message: str, method: str) -> None:
    board = Switchboard(Weights(100, 0), drain_timeout=30, version=1, updated_at=3.0)
    before = snapshot(board)
    args: dict[str, Any] = {"now": 10.0} | kwargs
    with pytest.raises(SwitchError, match=message):
        if method == "set_weights":
            board.set_weights(Weights(0, 100), **args)
        else:
            board.flip(**args)
    assert snapshot(board) == before


def test_version_sequence() -> None:
    board = Switchboard(Weights(100, 0), drain_timeout=30)
    steps: list[tuple[Op, int, Weights]] = [
        (lambda s: s.set_weights(Weights(90, 10), now=1.0), 1, Weights(90, 10)),
        (lambda s: s.set_weights(Weights(90, 10), now=2.0), 1, Weights(90, 10)),
        (lambda s: s.set_weights(Weights(3, 2), now=3.0), 2, Weights(3, 2)),
        (lambda s: s.flip(G, now=4.0), 3, Weights(0, 5)),
        (lambda s: s.flip(G, now=5.0), 3, Weights(0, 5)),
        (lambda s: s.flip(now=6.0), 4, Weights(5, 0)),
        (lambda s: s.set_weights(Weights(3, 2), now=7.0), 5, Weights(3, 2)),
    ]
    for op, version, weights in steps:
        op(board)
        assert (board.version, board.weights) == (version, weights)
    assert [e.version for e in board.events()] == [1, 2, 3, 4, 5]
    assert [e.at for e in board.events()] == [1.0, 3.0, 4.0, 6.0, 7.0]
    assert board.updated_at == 7.0


# --- Drains -------------------------------------------------------------------------------------


def test_drain_timeline() -> None:
    """One scripted deployment: each row is (op at `now`, started, cancelled, drains after)."""
    board = Switchboard(Weights(100, 0), drain_timeout=30)
    blue_0 = Drain(B, 10.0, 40.0)
    green_20 = Drain(G, 20.0, 25.0)
    blue_60 = Drain(B, 60.0, 90.0)
    rows: list[tuple[Op, tuple[Drain, ...], tuple[Color, ...], dict[Color, Drain]]] = [
        # canary: nobody loses all weight
        (lambda s: s.set_weights(Weights(90, 10), now=5.0), (), (), {}),
        # cut over: blue drains with the board's timeout
        (lambda s: s.flip(G, now=10.0), (blue_0,), (), {B: blue_0}),
        # green stays live and blue stays 0: the existing drain keeps its deadline
        (lambda s: s.set_weights(Weights(0, 7), now=15.0), (), (), {B: blue_0}),
        # roll back: blue's drain is cancelled, green drains with a per-call timeout
        (lambda s: s.flip(B, now=20.0, drain_timeout=5), (green_20,), (B,), {G: green_20}),
        # split again: green gets weight back, its drain is cancelled
        (lambda s: s.set_weights(Weights(1, 1), now=22.0), (), (G,), {}),
        (lambda s: s.set_weights(Weights(0, 2), now=60.0), (blue_60,), (), {B: blue_60}),
    ]
    for op, started, cancelled, drains in rows:
        result = op(board)
        assert (result.started_draining, result.cancelled_draining) == (started, cancelled)
        assert board.drains() == drains
        for c in COLORS:
            assert board.drain_of(c) == drains.get(c)


@pytest.mark.parametrize(
    ("now", "due"),
    [(89.0, []), (89.999, []), (90.0, [Drain(B, 60.0, 90.0)]), (1000.0, [Drain(B, 60.0, 90.0)])],
)
def test_due_drains(now: float, due: list[Drain]) -> None:
    board = Switchboard(Weights(100, 0), drain_timeout=30)
    board.flip(now=60.0)
    assert board.due_drains(now) == due
    assert board.drains() == {B: Drain(B, 60.0, 90.0)}  # reporting is not removing


def test_finish_drain() -> None:
    board = Switchboard(Weights(100, 0), drain_timeout=30)
    board.flip(now=0.0)
    before = board.version
    board.finish_drain(G)  # not draining: nothing to do
    assert board.drains() == {B: Drain(B, 0.0, 30.0)}
    board.finish_drain(B)
    assert board.drains() == {}
    assert board.due_drains(1000.0) == []
    board.finish_drain(B)  # a second report of the same drain is harmless
    assert board.version == before
    # A finished drain is not restarted while the color stays at 0.
    result = board.set_weights(Weights(0, 2), now=40.0)
    assert result.started_draining == ()
    assert board.drains() == {}


def test_drain_results_are_copies() -> None:
    board = Switchboard(Weights(100, 0), drain_timeout=30)
    board.flip(now=0.0)
    board.drains().clear()
    board.events().clear()
    assert board.drain_of(B) is not None
    assert len(board.events()) == 1


# --- Events and restore -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_events", "changes", "kept"), [(3, 5, [3, 4, 5]), (10, 4, [1, 2, 3, 4]), (0, 3, [])]
)
def test_events_bounded(max_events: int, changes: int, kept: list[int]) -> None:
    board = Switchboard(Weights(100, 0), drain_timeout=30, max_events=max_events)
    for i in range(changes):
        board.flip(now=float(i), actor=f"user{i}")
    assert [e.version for e in board.events()] == kept
    assert [e.actor for e in board.events()] == [f"user{v - 1}" for v in kept]
    assert board.version == changes


def test_event_records_from_and_to() -> None:
    board = Switchboard(Weights(100, 0), drain_timeout=30)
    board.set_weights(Weights(90, 10), now=1.5, actor="ci", reason="canary")
    board.flip(G, now=2.5)
    assert board.events() == [
        SwitchEvent(1, 1.5, Weights(100, 0), Weights(90, 10), "ci", "canary"),
        SwitchEvent(2, 2.5, Weights(90, 10), Weights(0, 100), "local", None),
    ]


def test_restore() -> None:
    board = Switchboard(Weights(100, 0), drain_timeout=30)
    board.flip(now=1.0)
    board.restore(Weights(3, 2), 41, 1234.5)
    assert (board.weights, board.version, board.updated_at) == (Weights(3, 2), 41, 1234.5)
    assert board.drains() == {}
    assert [e.version for e in board.events()] == [1]  # restoring logs nothing
    assert board.set_weights(Weights(0, 5), now=2000.0, expected_version=41).changed
    assert board.version == 42


@pytest.mark.parametrize(
    ("weights", "version", "updated_at", "message"),
    [
        ({"blue": 1, "green": 0}, 1, 0.0, "weights must be Weights"),
        (Weights(1, 0), -1, 0.0, "version must be an integer >= 0"),
        (Weights(1, 0), 1.5, 0.0, "version must be an integer >= 0"),
        (Weights(1, 0), 1, math.inf, "updated_at must be a finite number"),
        (Weights(1, 0), 1, "now", "updated_at must be a finite number"),
    ],
)
def test_restore_rejects(weights: Any, version: Any, updated_at: Any, message: str) -> None:
    board = Switchboard(Weights(0, 1), drain_timeout=30, version=3, updated_at=7.0)
    board.flip(now=8.0)
    before = snapshot(board)
    with pytest.raises(SwitchError, match=message):
        board.restore(weights, version, updated_at)
    assert snapshot(board) == before
