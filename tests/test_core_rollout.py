"""Guarded rollouts as tables and seeded traffic (bgproxy.core.rollout): no clock, no sockets.

The candidate is green, the stable color blue. Counters are cumulative, as the metrics keep them; the
machine subtracts what it saw when the step began. Commands are shown as short strings ("weight 25",
"gate step", "notify event", "finish promoted") so a table reads like the log of a rollout.

``pytest -s tests/test_core_rollout.py -k simulation`` prints the simulated figures.
"""

from __future__ import annotations

import functools
import json
import math
import random
import statistics
from dataclasses import dataclass, replace
from typing import Any

import pytest
from binomial import binomial_quantile

from bgproxy.core.colors import Color
from bgproxy.core.rollout import (
    CallGate,
    Command,
    Counts,
    Finish,
    Notify,
    Observation,
    Rollout,
    RolloutError,
    SetWeights,
    Spec,
    from_record,
    on_gate,
    on_operator,
    on_overridden,
    on_refused,
    on_tick,
    resumed,
    start,
    to_record,
)
from bgproxy.core.sequential import below, requests_to_prove

CANDIDATE: Color = "green"
T0 = 1000.0
SPEC = Spec(steps=(5, 25, 50, 100), step_pause=10.0, min_requests=100, bake=60.0, progress_deadline=120.0)
END = ["notify event", "notify post_rollout"]  # every ending says so, then Finish
ROLLED_BACK = ["weight 0", "notify rollback", *END, "finish rolled_back"]
ABORTED = ["weight 0", *END, "finish aborted"]
BUCKETS = (0.1, 0.25, 0.5, 1.0)  # latency counts have one more: the +Inf bucket


def obs(
    cand: tuple[int, int] = (0, 0),
    stable: tuple[int, int] = (0, 0),
    *,
    cand_latency: tuple[int, ...] = (),
    stable_latency: tuple[int, ...] = (),
) -> Observation:
    """Cumulative counters: (requests, errors) of the candidate (green) and the stable color (blue)."""
    buckets = BUCKETS if cand_latency or stable_latency else ()
    return Observation(
        blue=Counts(stable[0], stable[1], stable_latency),
        green=Counts(cand[0], cand[1], cand_latency),
        buckets=buckets,
    )


def show(commands: list[Command]) -> list[str]:
    out = []
    for command in commands:
        match command:
            case SetWeights(candidate=weight):
                out.append(f"weight {weight}")
            case CallGate(kind=kind):
                out.append(f"gate {kind}")
            case Notify(kind=kind):
                out.append(f"notify {kind}")
            case Finish(outcome=outcome):
                out.append(f"finish {outcome}")
    return out


class Drive:
    """One rollout driven by hand; every call returns the commands as strings and keeps the rollout."""

    def __init__(self, spec: Spec = SPEC, first: Observation | None = None) -> None:
        self.obs = first or obs()
        self.now = T0
        self.r, commands = start("r1", CANDIDATE, spec, self.obs, T0, actor="ann", reason="v2")
        self.started = show(commands)

    def at(self, seconds: float | None) -> float:
        if seconds is not None:
            self.now = T0 + seconds
        return self.now

    def tick(
        self, seconds: float, cand: tuple[int, int] = (0, 0), stable: tuple[int, int] = (0, 0)
    ) -> list[str]:
        return self.tick_obs(seconds, obs(cand, stable))

    def tick_obs(self, seconds: float, observation: Observation) -> list[str]:
        self.obs = observation
        self.r, commands = on_tick(self.r, observation, self.at(seconds))
        return show(commands)

    def gate(self, kind: str, ok: bool, *, on_failure: str = "abort", at: float | None = None) -> list[str]:
        self.r, commands = on_gate(
            self.r, kind, ok, "hook said so", self.obs, self.at(at), on_failure=on_failure
        )
        return show(commands)

    def op(self, action: str, *, at: float | None = None) -> list[str]:
        self.r, commands = on_operator(self.r, action, self.obs, self.at(at), actor="bob")
        return show(commands)

    def refused(self, *, at: float | None = None) -> list[str]:
        self.r, commands = on_refused(self.r, "no upstream of green answered", self.at(at))
        return show(commands)

    def overridden(self, *, at: float | None = None) -> list[str]:
        self.r, commands = on_overridden(self.r, "carol", self.at(at))
        return show(commands)

    def restart(self, seconds: float) -> list[str]:
        self.r, commands = resumed(self.r, self.obs, self.at(seconds))
        return show(commands)

    @property
    def where(self) -> tuple[str, int]:
        return self.r.state, self.r.step


# ------------------------------------------------------------------------------------------ transitions

# Each script line: (event, arguments, (state, step) after it, commands it gave).
# Events: tick(seconds, (candidate requests, errors)), gate(kind, ok[, on_failure]), op(action).
Line = tuple[str, tuple[Any, ...], tuple[str, int], list[str]]

SCRIPTS: dict[str, tuple[Spec, list[Line]]] = {
    "steps advance when the pause is over and the traffic is in, then bake and promote": (
        SPEC,
        [
            ("tick", (5, (500, 0)), ("running", 0), []),  # plenty of requests, pause not over
            ("tick", (10, (500, 0)), ("running", 1), ["weight 25", "notify event"]),
            ("tick", (15, (1000, 0)), ("running", 1), []),
            ("tick", (20, (1000, 0)), ("running", 2), ["weight 50", "notify event"]),
            ("tick", (30, (1500, 0)), ("baking", 3), ["weight 100", "notify event"]),
            ("tick", (89.9, (9000, 0)), ("baking", 3), []),
            ("tick", (90, (9000, 0)), ("promoted", 3), [*END, "finish promoted"]),
            ("tick", (500, (9000, 0)), ("promoted", 3), []),  # done: ticks change nothing
        ],
    ),
    "past the pause without min_requests is waiting, not failing; each step counts from its start": (
        SPEC,
        [
            ("tick", (10, (50, 0)), ("waiting", 0), ["notify event"]),
            ("tick", (11, (60, 0)), ("waiting", 0), []),  # said once
            ("tick", (12, (99, 0)), ("waiting", 0), []),
            ("tick", (13, (100, 0)), ("running", 1), ["weight 25", "notify event"]),
            ("tick", (23, (150, 0)), ("waiting", 1), ["notify event"]),  # 50 since step 2 began
            ("tick", (24, (200, 0)), ("running", 2), ["weight 50", "notify event"]),
        ],
    ),
    "a pre_rollout gate holds the first weight until it passes": (
        replace(SPEC, gates=frozenset({"pre_rollout"})),
        [
            ("tick", (100, (0, 0)), ("pending", -1), []),
            ("gate", ("step", True), ("pending", -1), []),  # not the gate awaited: ignored
            ("gate", ("pre_rollout", True), ("running", 0), ["weight 5", "notify event"]),
            ("tick", (110, (100, 0)), ("running", 1), ["weight 25", "notify event"]),
        ],
    ),
    "pre_rollout then a step gate before every step": (
        replace(SPEC, gates=frozenset({"pre_rollout", "step"})),
        [
            ("gate", ("pre_rollout", True), ("pending", -1), ["gate step"]),
            ("gate", ("step", True), ("running", 0), ["weight 5", "notify event"]),
            ("tick", (10, (100, 0)), ("running", 0), ["gate step"]),  # ready; asks before moving
            ("tick", (20, (500, 0)), ("running", 0), []),  # still waiting for the answer
            ("gate", ("step", True), ("running", 1), ["weight 25", "notify event"]),
            ("gate", ("step", True), ("running", 1), []),  # a late second answer changes nothing
        ],
    ),
    "a failing pre_rollout gate aborts with no weight to take back": (
        replace(SPEC, gates=frozenset({"pre_rollout"})),
        [("gate", ("pre_rollout", False), ("aborted", -1), [*END, "finish aborted"])],
    ),
    "a failing step gate aborts and gives the stable color everything back": (
        replace(SPEC, gates=frozenset({"step"})),
        [
            ("gate", ("step", True), ("running", 0), ["weight 5", "notify event"]),
            ("tick", (10, (100, 0)), ("running", 0), ["gate step"]),
            ("gate", ("step", False), ("aborted", 0), ABORTED),
            ("gate", ("step", True), ("aborted", 0), []),
        ],
    ),
    "a failing step gate with on_failure pause waits for the operator, whose resume overrides it": (
        replace(SPEC, gates=frozenset({"step"})),
        [
            ("gate", ("step", True), ("running", 0), ["weight 5", "notify event"]),
            ("tick", (10, (100, 0)), ("running", 0), ["gate step"]),
            ("gate", ("step", False, "pause"), ("paused", 0), ["notify event"]),
            ("tick", (100, (5000, 0)), ("paused", 0), []),
            ("op", ("resume",), ("running", 1), ["notify event", "weight 25", "notify event"]),
        ],
    ),
    "confirm_promotion not confirmed pauses and asks again every gate_interval": (
        replace(SPEC, steps=(50, 100), gates=frozenset({"confirm_promotion"}), gate_interval=10.0),
        [
            ("tick", (10, (100, 0)), ("running", 0), ["gate confirm_promotion"]),
            ("gate", ("confirm_promotion", False), ("paused", 0), ["notify event"]),
            ("tick", (19.9, (200, 0)), ("paused", 0), []),
            ("tick", (20, (200, 0)), ("paused", 0), ["gate confirm_promotion"]),
            ("tick", (25, (200, 0)), ("paused", 0), []),  # asked once, not on every tick
            ("gate", ("confirm_promotion", False), ("paused", 0), []),  # already paused: no notice
            ("tick", (35, (300, 0)), ("paused", 0), ["gate confirm_promotion"]),
            ("gate", ("confirm_promotion", True), ("baking", 1), ["weight 100", "notify event"]),
            ("tick", (95, (900, 0)), ("promoted", 1), [*END, "finish promoted"]),
        ],
    ),
    "confirm_promotion not confirmed, then the operator resumes: promoted past the gate": (
        replace(SPEC, steps=(50, 100), gates=frozenset({"confirm_promotion"})),
        [
            ("tick", (10, (100, 0)), ("running", 0), ["gate confirm_promotion"]),
            ("gate", ("confirm_promotion", False), ("paused", 0), ["notify event"]),
            ("op", ("resume",), ("baking", 1), ["notify event", "weight 100", "notify event"]),
        ],
    ),
    "an operator pause holds the steps however much evidence comes in; resume lets them go on": (
        SPEC,
        [
            ("op", ("pause",), ("paused", 0), ["notify event"]),
            ("tick", (10, (500, 0)), ("paused", 0), []),
            ("tick", (50, (900, 0)), ("paused", 0), []),
            ("op", ("resume",), ("running", 0), ["notify event"]),
            ("tick", (51, (900, 0)), ("running", 1), ["weight 25", "notify event"]),
        ],
    ),
    "rules still guard a paused rollout": (
        SPEC,
        [
            ("op", ("pause",), ("paused", 0), ["notify event"]),
            ("tick", (1, (50, 50)), ("rolled_back", 0), ROLLED_BACK),
        ],
    ),
    "progress_deadline with on_insufficient_traffic wait: recorded once, still waiting": (
        replace(SPEC, progress_deadline=60.0, on_insufficient_traffic="wait"),
        [
            ("tick", (10, (0, 0)), ("waiting", 0), ["notify event"]),
            ("tick", (59.9, (10, 0)), ("waiting", 0), []),
            ("tick", (60, (10, 0)), ("waiting", 0), []),
            ("tick", (300, (20, 0)), ("waiting", 0), []),
            ("tick", (301, (100, 0)), ("running", 1), ["weight 25", "notify event"]),
        ],
    ),
    "progress_deadline with on_insufficient_traffic promote: straight to 100 %, then bake": (
        replace(SPEC, progress_deadline=60.0, on_insufficient_traffic="promote"),
        [
            ("tick", (10, (0, 0)), ("waiting", 0), ["notify event"]),
            ("tick", (60, (10, 0)), ("baking", 3), ["weight 100", "notify event"]),
            ("tick", (120, (10, 0)), ("promoted", 3), [*END, "finish promoted"]),
        ],
    ),
    "progress_deadline with on_insufficient_traffic abort": (
        replace(SPEC, progress_deadline=60.0, on_insufficient_traffic="abort"),
        [
            ("tick", (10, (0, 0)), ("waiting", 0), ["notify event"]),
            ("tick", (60, (10, 0)), ("aborted", 0), ABORTED),
        ],
    ),
    "a single step of 100 bakes at once; bake 0 promotes on the next tick": (
        replace(SPEC, steps=(100,), bake=0.0),
        [("tick", (0.05, (3, 0)), ("promoted", 0), [*END, "finish promoted"])],
    ),
}


@pytest.mark.parametrize(("spec", "script"), list(SCRIPTS.values()), ids=list(SCRIPTS))
def test_transitions(spec: Spec, script: list[Line]) -> None:
    d = Drive(spec)
    entry_gates = ["pre_rollout"] if "pre_rollout" in spec.gates else []
    if entry_gates:
        assert d.where == ("pending", -1)
        assert d.started == ["notify event", "gate pre_rollout"]
    elif spec.steps == (100,):
        assert d.started == ["notify event", "weight 100", "notify event"]
    elif "step" in spec.gates:
        assert d.where == ("pending", -1)
        assert d.started == ["notify event", "gate step"]
    else:
        assert d.where == ("running", 0)
        assert d.started == ["notify event", f"weight {spec.steps[0]}", "notify event"]
    for number, (event, args, where, commands) in enumerate(script, 1):
        if event == "tick":
            got = d.tick(*args)
        elif event == "gate":
            kind, ok, *failure = args
            got = d.gate(kind, ok, on_failure=failure[0] if failure else "abort")
        else:
            got = d.op(*args)
        assert (d.where, got) == (where, commands), f"line {number}: {event}{args}"


def test_start_without_gates_sets_the_first_weight() -> None:
    d = Drive()
    assert d.where == ("running", 0)
    assert d.r.weight == 5
    assert (d.r.stable, d.r.candidate, d.r.actor, d.r.reason) == ("blue", "green", "ann", "v2")
    assert d.r.baseline == obs()
    assert [s.weight for s in d.r.steps] == [5]
    assert [x.action for x in d.r.decisions] == ["start", "step"]


def test_counters_from_before_the_rollout_do_not_count() -> None:
    """The candidate answered 900 errors before the rollout began: none of them is its step's evidence."""
    d = Drive(first=obs((1000, 900), (50_000, 40)))
    assert d.tick(10, (1050, 900), (51_000, 41)) == ["notify event"]
    assert d.where == ("waiting", 0)
    assert d.r.evidence is not None
    assert d.r.evidence["candidate"]["requests"] == 50
    assert d.r.evidence["candidate"]["errors"] == 0
    assert d.r.evidence["stable"]["requests"] == 1000
    assert d.tick(11, (1100, 900), (52_000, 42)) == ["weight 25", "notify event"]


def test_a_step_keeps_its_evidence_when_it_ends() -> None:
    d = Drive()
    d.tick(10, (150, 1), (3000, 3))
    d.tick(20, (400, 1), (6000, 3))
    first, second, third = d.r.steps
    assert (first.weight, first.started_at, first.ended_at) == (5, T0, T0 + 10)
    assert first.evidence is not None and first.evidence["candidate"]["requests"] == 150
    assert (second.weight, second.started_at, second.ended_at) == (25, T0 + 10, T0 + 20)
    assert second.evidence is not None and second.evidence["candidate"]["requests"] == 250
    assert (third.weight, third.ended_at, third.evidence) == (50, None, None)


# --- the operator -----------------------------------------------------------------------------------


def in_state(state: str) -> Drive:
    """A rollout brought to ``state`` the way it gets there in production."""
    if state == "pending":
        return Drive(replace(SPEC, gates=frozenset({"pre_rollout"})))
    if state == "baking":
        return Drive(replace(SPEC, steps=(100,)))
    d = Drive()
    if state == "waiting":
        d.tick(10, (1, 0))
    elif state == "paused":
        d.op("pause")
    elif state == "promoted":
        d.op("promote")
    elif state == "aborted":
        d.op("abort")
    elif state == "rolled_back":
        d.refused()
    assert d.r.state == state
    return d


PROMOTE_FROM_ZERO = ["weight 100", *END, "finish promoted"]


@pytest.mark.parametrize(
    ("state", "action", "after", "commands"),
    [
        ("pending", "pause", "paused", ["notify event"]),
        ("pending", "resume", RolloutError, "is pending, not paused"),
        ("pending", "promote", "promoted", PROMOTE_FROM_ZERO),
        ("pending", "abort", "aborted", [*END, "finish aborted"]),  # weight 0: nothing to take back
        ("running", "pause", "paused", ["notify event"]),
        ("running", "resume", RolloutError, "is running, not paused"),
        ("running", "promote", "promoted", PROMOTE_FROM_ZERO),
        ("running", "abort", "aborted", ABORTED),
        ("waiting", "pause", "paused", ["notify event"]),
        ("waiting", "resume", RolloutError, "is waiting, not paused"),
        ("waiting", "promote", "promoted", PROMOTE_FROM_ZERO),
        ("waiting", "abort", "aborted", ABORTED),
        ("paused", "pause", RolloutError, r"already paused \(operator bob\)"),
        ("paused", "resume", "running", ["notify event"]),
        ("paused", "promote", "promoted", PROMOTE_FROM_ZERO),
        ("paused", "abort", "aborted", ABORTED),
        ("baking", "pause", "paused", ["notify event"]),
        ("baking", "resume", RolloutError, "is baking, not paused"),
        ("baking", "promote", "promoted", [*END, "finish promoted"]),  # already at 100
        ("baking", "abort", "aborted", ABORTED),
        *[
            (state, action, RolloutError, f"already {state}")
            for state in ("promoted", "rolled_back", "aborted")
            for action in ("pause", "resume", "promote", "abort", "dance")
        ],
        *[
            (state, "dance", RolloutError, "unknown action 'dance'")
            for state in ("pending", "running", "waiting", "paused", "baking")
        ],
    ],
)
def test_operator_actions(state: str, action: str, after: Any, commands: Any) -> None:
    d = in_state(state)
    before = d.r
    if after is RolloutError:
        with pytest.raises(RolloutError, match=commands):
            d.op(action)
        assert d.r is before
        return
    assert d.op(action, at=5) == commands
    assert d.r.state == after
    assert d.r.decisions[-1].at == T0 + 5
    assert "bob" in d.r.decisions[-1].reason
    if after == "aborted":
        assert d.r.done and d.r.weight == 0


@pytest.mark.parametrize("state", ["pending", "running", "waiting", "paused", "baking"])
def test_an_operator_promotion_records_the_weight_it_set(state: str) -> None:
    d = in_state(state)
    assert "weight 100" in d.op("promote") or state == "baking"
    assert d.r.weight == 100
    assert to_record(d.r)["weight"] == 100
    assert (d.r.steps[-1].weight, d.r.steps[-1].ended_at) == (100, d.now)


@pytest.mark.parametrize("state", ["pending", "running", "waiting", "baking"])
def test_resume_returns_to_the_state_it_was_paused_in(state: str) -> None:
    d = in_state(state)
    d.op("pause")
    assert (d.r.state, d.r.resume_to, d.r.paused_by) == ("paused", state, "operator bob")
    # A gate awaited when the pause came is asked again: its answer during the pause was not taken.
    again = ["gate pre_rollout"] if state == "pending" else []
    assert d.op("resume") == ["notify event", *again]
    assert (d.r.state, d.r.resume_to, d.r.paused_by) == (state, None, None)


# --- refused, overridden ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "commands"),
    [
        ("running", ROLLED_BACK),
        ("waiting", ROLLED_BACK),
        ("baking", ROLLED_BACK),
        ("paused", ROLLED_BACK),
        ("pending", ["notify rollback", *END, "finish rolled_back"]),  # no weight was given
        ("promoted", []),
        ("aborted", []),
    ],
)
def test_a_refused_weight_change_rolls_back_with_rule_flip_probe(state: str, commands: list[str]) -> None:
    d = in_state(state)
    before = d.r
    assert d.refused(at=3) == commands
    if not commands:
        assert d.r is before
        return
    assert (d.r.state, d.r.rule, d.r.weight) == ("rolled_back", "flip_probe", 0)
    assert "flip probe" in d.r.decisions[-1].reason


@pytest.mark.parametrize(
    ("state", "commands"),
    [
        ("running", [*END, "finish aborted"]),  # the forced weights stay: no SetWeights
        ("baking", [*END, "finish aborted"]),
        ("paused", [*END, "finish aborted"]),
        ("pending", [*END, "finish aborted"]),
        ("rolled_back", []),
    ],
)
def test_a_forced_change_overrides_the_rollout(state: str, commands: list[str]) -> None:
    d = in_state(state)
    assert d.overridden() == commands
    if commands:
        assert d.r.state == "aborted"
        assert "carol" in d.r.decisions[-1].reason


# --- require_proof ----------------------------------------------------------------------------------

PROOF = requests_to_prove(0.005, 0.01)  # 1325: the proof is at 1 - confidence, not split over rules


@pytest.mark.parametrize(
    ("cand", "where"),
    [
        ((1000, 0), ("waiting", 0)),
        ((PROOF - 1, 0), ("waiting", 0)),
        ((PROOF, 0), ("running", 1)),
        ((PROOF, 1), ("waiting", 0)),  # one error: the proof needs more
        ((3000, 1), ("running", 1)),
    ],
)
def test_require_proof_waits_for_enough_error_free_requests(
    cand: tuple[int, int], where: tuple[str, int]
) -> None:
    d = Drive(replace(SPEC, require_proof=True))
    d.tick(10, (200, 0))
    assert d.where == ("waiting", 0)
    assert "not yet shown below 0.005" in d.r.decisions[-1].reason
    d.tick(11, cand)
    assert d.where == where
    assert below(cand[1], cand[0], 0.005, 0.01) is (where == ("running", 1))


def test_proof_is_what_the_evidence_calls_proven() -> None:
    d = Drive()
    d.tick(1, (PROOF - 1, 0))
    assert d.r.evidence is not None and d.r.evidence["proven"] is False
    d.tick(2, (PROOF, 0))
    assert d.r.evidence is not None and d.r.evidence["proven"] is True


# --- restart ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["running", "waiting", "baking", "paused"])
def test_resumed_keeps_step_and_state_and_restarts_evidence_and_pause(state: str) -> None:
    d = Drive()
    d.tick(10, (100, 0))  # step 2: 25 %
    if state == "waiting":
        d.tick(20, (120, 0))
    elif state == "baking":
        d.tick(20, (300, 0))
        d.tick(30, (500, 0))
    elif state == "paused":
        d.op("pause")
    d.tick(d.now - T0 + 1, (d.obs.green.requests + 10, 0))  # some evidence at this step
    step = d.r.step
    assert d.r.state == state and d.r.evidence is not None
    d.obs = obs((10_000, 50), (90_000, 90))  # the counters the new process sees
    assert d.restart(400) == []
    assert d.where == (state, step)
    assert (d.r.step_started, d.r.baseline, d.r.evidence) == (T0 + 400, d.obs, None)
    assert d.r.decisions[-1].action == "restart"
    if state == "paused":
        return
    # the pause starts again: plenty of traffic, but 10 s (60 s bake) must pass from the restart
    wait = 60.0 if state == "baking" else 10.0
    assert d.tick(400 + wait - 0.1, (20_000, 50), (100_000, 90)) == []
    assert d.where == (state, step)
    if state == "baking":
        assert d.tick(400 + wait, (20_000, 50), (100_000, 90)) == [*END, "finish promoted"]
    else:
        assert d.tick(400 + wait, (20_000, 50), (100_000, 90)) == ["weight 50", "notify event"]
        assert d.where == ("running", 2)


def test_resumed_asks_a_pending_gate_again() -> None:
    d = Drive(replace(SPEC, gates=frozenset({"step"})))
    assert d.restart(50) == ["gate step"]
    d.gate("step", True)
    d.tick(60, (100, 0))
    assert d.restart(70) == ["gate step"]
    assert d.where == ("running", 0)


def test_resumed_after_the_end_changes_nothing() -> None:
    d = in_state("aborted")
    before = d.r
    assert d.restart(100) == []
    assert d.r is before


def test_resumed_forgets_that_the_deadline_passed() -> None:
    d = Drive(replace(SPEC, progress_deadline=60.0))
    d.tick(10)
    d.tick(60)
    assert d.r.waited_out
    d.restart(100)
    assert not d.r.waited_out


@pytest.mark.parametrize("through_the_state_file", [False, True])
def test_an_unconfirmed_promotion_is_asked_again_after_a_restart(through_the_state_file: bool) -> None:
    d = Drive(replace(SPEC, steps=(50, 100), gates=frozenset({"confirm_promotion"}), gate_interval=10.0))
    d.tick(10, (100, 0))
    d.gate("confirm_promotion", False)
    assert d.where == ("paused", 0)
    if through_the_state_file:
        d.r = from_record(json.loads(json.dumps(to_record(d.r))))
    asked = d.restart(12)
    for second in (15, 20, 25, 30, 40):
        asked += d.tick(second, (200, 0))
    assert "gate confirm_promotion" in asked


def test_a_confirmed_retry_leaves_no_pause_behind() -> None:
    d = Drive(replace(SPEC, steps=(50, 100), gates=frozenset({"confirm_promotion"}), gate_interval=10.0))
    d.tick(10, (100, 0))
    d.gate("confirm_promotion", False)
    d.tick(20, (100, 0))
    d.gate("confirm_promotion", True)
    assert d.r.state == "baking"
    assert (d.r.paused_by, d.r.resume_to) == (None, None)


def test_a_gate_that_passes_while_the_operator_paused_does_not_move_the_weights() -> None:
    d = Drive(replace(SPEC, gates=frozenset({"step"})))
    d.gate("step", True)
    assert d.tick(10, (100, 0)) == ["gate step"]  # the control plane calls the webhook now
    d.op("pause")  # ... and the operator pauses before it answers
    got = d.gate("step", True)
    assert "weight 25" not in got
    assert d.where == ("paused", 0)
    assert d.op("resume") == ["notify event", "gate step"]  # asked again, then it may move


# --- persistence -----------------------------------------------------------------------------------


def roundtrip(r: Rollout) -> Rollout:
    return from_record(json.loads(json.dumps(to_record(r))))


def sample_rollouts() -> dict[str, Rollout]:
    out = {}
    for state in ("pending", "running", "waiting", "paused", "baking", "promoted", "rolled_back", "aborted"):
        out[state] = in_state(state).r
    d = Drive(replace(SPEC, gates=frozenset({"step", "confirm_promotion"}), max_p99=0.5, max_p99_ratio=2.0))
    d.gate("step", True)
    d.tick(10, (150, 1), (3000, 2))
    out["gate pending, latency rules"] = d.r
    d = Drive()
    d.tick(10, (150, 1), (3000, 2))
    d.tick(11, (200, 31), (3100, 2))  # 30 errors in the 50 requests of step 2
    out["rolled back by a rule, with evidence and two steps"] = d.r
    return out


@pytest.mark.parametrize("name", list(sample_rollouts()))
def test_to_record_from_record_round_trips(name: str) -> None:
    r = sample_rollouts()[name]
    back = roundtrip(r)
    # the baseline is not kept (resumed() takes the counters afresh), nor waited_out (resumed() resets it)
    assert back == replace(r, baseline=None, waited_out=False)
    assert to_record(back) == to_record(r)
    record = to_record(r)
    assert (record["from"], record["to"], record["weight"]) == ("blue", "green", r.weight)


@functools.cache
def good_record_text() -> str:
    return json.dumps(to_record(sample_rollouts()["rolled back by a rule, with evidence and two steps"]))


def good_record() -> dict[str, Any]:
    return json.loads(good_record_text())


def changed(**fields: Any) -> dict[str, Any]:
    record = good_record()
    for key, value in fields.items():
        if key.startswith("spec_"):
            record["spec"][key[5:]] = value
        else:
            record[key] = value
    return record


@pytest.mark.parametrize("key", [k for k in good_record() if k != "weight"])  # weight is derived
def test_from_record_names_a_missing_field(key: str) -> None:
    record = good_record()
    del record[key]
    with pytest.raises(ValueError, match=f"lacks '{key}'"):
        from_record(record)


def bad(name: str, record: Any) -> Any:
    return pytest.param(record, id=name)


@pytest.mark.parametrize(
    "record",
    [
        bad("a list", []),
        bad("null", None),
        bad("a string", "rollout"),
        bad("unknown state", changed(state="exploded")),
        bad("unknown resume_to", changed(resume_to="sleeping")),
        bad("step past the last", changed(step=4)),
        bad("step -2", changed(step=-2)),
        bad("step not a number", changed(step="one")),
        bad("from red", changed(**{"from": "red"})),
        bad("to null", changed(to=None)),
        bad("created_at not a number", changed(created_at="soon")),
        bad("gates_left a number", changed(gates_left=5)),
        bad("a step record without its fields", changed(steps=[{"index": 0}])),
        bad("a decision with an unknown field", changed(decisions=[{"at": 1.0, "what": "?"}])),
        bad("spec steps not ending at 100", changed(spec_steps=[5, 50])),
        bad("spec confidence 1.5", changed(spec_confidence=1.5)),
        bad("spec unknown gate", changed(spec_gates=["pre_rollout", "bogus"])),
        bad("spec step_pause a string", changed(spec_step_pause="30s")),
        bad("spec unknown field", changed(spec_colour="blue")),
        bad("spec null", changed(spec=None)),
        bad("from == to", changed(**{"from": "green", "to": "green"})),
        bad("gates_left a string", changed(gates_left="step")),
        bad("unknown gate kind", changed(gates_left=["bogus"])),
        bad("target past the last step", changed(state="running", gates_left=["step"], target=9)),
    ],
)
def test_from_record_rejects_malformed_records(record: Any) -> None:
    with pytest.raises(ValueError):
        from_record(record)


# --- spec -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"steps": ()}, "steps: must be a non-empty list"),
        ({"steps": (0, 100)}, "steps: must be a non-empty list"),
        ({"steps": (5, True, 100)}, "steps: must be a non-empty list"),
        ({"steps": (5, 5, 100)}, "steps: must increase and end at 100"),
        ({"steps": (5, 50)}, "steps: must increase and end at 100"),
        ({"step_pause": 0.0}, "step_pause: must be a duration > 0"),
        ({"progress_deadline": math.inf}, "progress_deadline: must be a duration > 0"),
        ({"gate_interval": -1.0}, "gate_interval: must be a duration > 0"),
        ({"bake": -1.0}, "bake: must be a duration >= 0"),
        ({"min_requests": -1}, "min_requests: must be >= 0"),
        ({"max_error_ratio": 0.0}, "max_error_ratio: must be a ratio"),
        ({"max_error_ratio_increase": 1.0}, "max_error_ratio_increase: must be a ratio"),
        ({"max_p99": 0.0}, "max_p99: must be a duration > 0"),
        ({"max_p99_ratio": 0.5}, "max_p99_ratio: must be >= 1"),
        ({"confidence": 1.0}, "confidence: must be >= 0.5 and < 1"),
        ({"confidence": 0.4}, "confidence: must be >= 0.5 and < 1"),
        (
            {"on_insufficient_traffic": "panic"},
            "on_insufficient_traffic: must be one of wait, promote, abort",
        ),
        ({"gates": frozenset({"post_rollout"})}, r"gates: unknown kinds \['post_rollout'\]"),
    ],
)
def test_start_refuses_an_invalid_spec(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(RolloutError, match=problem):
        start("r1", CANDIDATE, replace(SPEC, **fields), obs(), T0, actor="ann")


@pytest.mark.parametrize(
    ("fields", "rules", "alpha"),
    [
        ({}, ("error_ratio", "error_ratio_increase"), 0.01 / 8),
        ({"max_error_ratio_increase": None}, ("error_ratio",), 0.01 / 4),
        (
            {"max_p99": 0.5, "max_p99_ratio": 2.0},
            ("error_ratio", "error_ratio_increase", "p99", "p99_ratio"),
            0.01 / 16,
        ),
        ({"steps": (10, 100), "confidence": 0.9}, ("error_ratio", "error_ratio_increase"), 0.1 / 4),
    ],
)
def test_alpha_is_split_over_steps_and_rules(
    fields: dict[str, Any], rules: tuple[str, ...], alpha: float
) -> None:
    spec = replace(SPEC, **fields)
    assert spec.rules == rules
    assert spec.alpha == pytest.approx(alpha)


# ------------------------------------------------------------------------------------------ rules


def rule_after(spec: Spec, observation: Observation) -> tuple[str | None, list[str]]:
    """The rule that fired on one tick at the first step (5 %), or None, and the commands."""
    d = Drive(spec)
    got = d.tick_obs(1, observation)
    return d.r.rule, got


@pytest.mark.parametrize(
    ("cand", "stable", "rule"),
    [
        # all errors: 7 in a row show > 0.5 % at alpha 0.01 / 8; 6 do not
        ((6, 6), (0, 0), None),
        ((7, 7), (0, 0), "error_ratio"),
        ((200, 0), (0, 0), None),
        ((200, 1), (0, 0), None),  # 0.5 % on 200: nothing shown
        ((200, 20), (0, 0), "error_ratio"),  # 10 %
        ((1000, 5), (0, 0), None),  # exactly at the threshold: never shown above it
        ((10_000, 100), (0, 0), "error_ratio"),  # 1 % on 10,000
        ((2000, 200), (100_000, 100), "error_ratio"),  # both rules broken: the absolute one is first
    ],
)
def test_the_absolute_error_ratio_rule(
    cand: tuple[int, int], stable: tuple[int, int], rule: str | None
) -> None:
    got_rule, commands = rule_after(SPEC, obs(cand, stable))
    assert got_rule == rule
    if rule is not None:
        assert commands == ROLLED_BACK


RELATIVE = replace(SPEC, max_error_ratio=0.5)  # only the relative rule can fire on these numbers


@pytest.mark.parametrize(
    ("spec", "cand", "stable", "rule"),
    [
        (RELATIVE, (2000, 400), (100_000, 2000), "error_ratio_increase"),  # 20 % against 2 %
        (RELATIVE, (2000, 50), (100_000, 2000), None),  # 2.5 % against 2 %: within 0.005
        (RELATIVE, (2000, 80), (100_000, 2000), None),  # 4 %: 0.02 worse, but not shown at this n
        (RELATIVE, (20, 4), (100_000, 2000), None),  # 20 % on 20 requests: not shown
        (RELATIVE, (2000, 400), (0, 0), None),  # no stable traffic to compare with
        (RELATIVE, (2000, 400), (100, 50), None),  # stable at 50 % on 100: its bound is too wide
        (replace(RELATIVE, max_error_ratio_increase=None), (2000, 400), (100_000, 2000), None),
        (replace(RELATIVE, max_error_ratio_increase=0.2), (2000, 400), (100_000, 2000), None),
    ],
)
def test_the_relative_error_ratio_rule(
    spec: Spec, cand: tuple[int, int], stable: tuple[int, int], rule: str | None
) -> None:
    got_rule, commands = rule_after(spec, obs(cand, stable))
    assert got_rule == rule
    if rule is not None:
        assert commands == ROLLED_BACK


def latency(fast: int = 0, ok: int = 0, slowish: int = 0, slow: int = 0, awful: int = 0) -> tuple[int, ...]:
    """Counts per bucket: <= 0.1, <= 0.25, <= 0.5, <= 1.0, +Inf."""
    return (fast, ok, slowish, slow, awful)


def timed(cand: tuple[int, ...], stable: tuple[int, ...] = latency()) -> Observation:
    return obs((sum(cand), 0), (sum(stable), 0), cand_latency=cand, stable_latency=stable)


@pytest.mark.parametrize(
    ("max_p99", "cand", "rule"),
    [
        (0.5, latency(fast=50, slow=150), "p99"),  # most requests over 0.5 s
        (0.5, latency(fast=50, awful=150), "p99"),
        (0.5, latency(fast=200), None),
        (0.5, latency(fast=190, slowish=10), None),  # (0.25, 0.5] is not over 0.5
        (0.3, latency(slowish=200), None),  # 0.3 is judged as 0.5, the next bucket bound
        (0.3, latency(fast=50, slow=150), "p99"),
        (0.25, latency(slowish=200), "p99"),  # requests in (0.25, 0.5] are slower than 0.25
        (0.5, latency(fast=995, slow=5), None),  # 0.5 % slow: p99 under the limit
        (0.5, latency(fast=900, slow=100), "p99"),  # 10 % slow
        (2.0, latency(awful=200), None),  # past the last bound: cannot be judged from buckets
    ],
)
def test_the_p99_rule(max_p99: float, cand: tuple[int, ...], rule: str | None) -> None:
    got_rule, commands = rule_after(replace(SPEC, max_p99=max_p99), timed(cand))
    assert got_rule == rule
    if rule is not None:
        assert commands == ROLLED_BACK


FAST_STABLE = latency(fast=100_000)  # its p99 is shown under 0.1 s


@pytest.mark.parametrize(
    ("ratio", "cand", "stable", "rule"),
    [
        (2.0, latency(slow=200), FAST_STABLE, "p99_ratio"),  # limit 2 x 0.1 -> 0.25: 0.5-1.0 s is over
        (2.0, latency(slowish=200), FAST_STABLE, "p99_ratio"),  # (0.25, 0.5] is over 0.25 too
        (2.0, latency(ok=200), FAST_STABLE, None),  # (0.1, 0.25]: not shown over 0.25
        (5.0, latency(slowish=200), FAST_STABLE, None),  # limit 0.5
        (5.0, latency(slow=200), FAST_STABLE, "p99_ratio"),
        (2.0, latency(slow=200), latency(fast=10), None),  # 10 stable requests prove no p99
        (2.0, latency(slow=200), latency(slow=100_000), None),  # a slow stable: limit past the buckets
    ],
)
def test_the_p99_ratio_rule(
    ratio: float, cand: tuple[int, ...], stable: tuple[int, ...], rule: str | None
) -> None:
    got_rule, commands = rule_after(replace(SPEC, max_p99_ratio=ratio), timed(cand, stable))
    assert got_rule == rule
    if rule is not None:
        assert commands == ROLLED_BACK


def test_a_rule_reason_quotes_the_numbers() -> None:
    d = Drive()
    d.tick(1, (200, 20))
    assert d.r.decisions[-1].reason.startswith("rule error_ratio fired: 20/200 errors, above 0.005")
    assert d.r.evidence is not None
    assert d.r.evidence["candidate"]["error_ratio"] == 0.1
    assert d.r.steps[-1].evidence == d.r.evidence


def test_no_evidence_and_no_rule_before_the_candidate_has_weight() -> None:
    d = Drive(replace(SPEC, gates=frozenset({"pre_rollout"})))
    assert d.tick(5, (100, 100)) == []
    assert (d.r.state, d.r.evidence) == ("pending", None)


# ------------------------------------------------------------------------------------------ simulation
#
# Seeded Bernoulli traffic through the machine: 1,000 requests a second split by the weight it sets,
# the stable color failing 0.1 % of its requests and the candidate ``ratio`` of its own. The clock is
# the request count (1 ms each); on_tick runs every ``tick`` requests. Production ticks every 50 ms;
# the false-rollback runs tick every 100 ms (the slowest the on_tick docstring allows) to fit in the
# suite, and were run by hand at 10 ms ticks as well (figures in the test docstrings).

SIM = Spec(steps=(5, 25, 50, 100), step_pause=1.0, min_requests=200, bake=1.0)
RATE = 1000.0
STABLE_RATIO = 0.001


@dataclass(frozen=True)
class SimRun:
    outcome: str
    rule: str | None
    candidate_requests: int  # requests the candidate answered before the rollout ended
    step: int


def simulate(ratio: float, seed: int, *, spec: Spec = SIM, tick: int = 100, limit: int = 10**6) -> SimRun:
    rng = random.Random(f"rollout {ratio} {seed}")
    stable = [0, 0]
    cand = [0, 0]
    served = 0
    r, commands = start("sim", CANDIDATE, spec, obs(), T0, actor="sim")
    weight = next(c.candidate for c in commands if isinstance(c, SetWeights))
    while not r.done and served < limit:
        for _ in range(tick):
            served += 1
            if rng.random() * 100 < weight:
                cand[0] += 1
                cand[1] += rng.random() < ratio
            else:
                stable[0] += 1
                stable[1] += rng.random() < STABLE_RATIO
        r, commands = on_tick(r, obs((cand[0], cand[1]), (stable[0], stable[1])), T0 + served / RATE)
        for command in commands:
            if isinstance(command, SetWeights):
                weight = command.candidate
    assert r.done, f"not finished after {served} requests: {r.state}"
    return SimRun(r.state, r.rule, cand[0], r.step)


HEALTHY_RUNS = 200
# The requirement is <= 1 % false rollbacks. 200 seeded rollouts cannot prove a rate that small (0/200
# only bounds it under 1.5 % at 95 %), so the count is held to what a rollout that falsely rolls back
# exactly 1 % of the time would give 99 % of the time: Binomial(200, 0.01) stays <= 6 with 99.6 %.
# By hand: 0/2,000 at 100 ms ticks for 0.001, 0.003 and even 0.005 (exactly at the threshold), and
# 0/1,000 at 10 ms ticks for all three. Steps this short rarely hold enough evidence to roll back
# by chance (with confidence 0.5, a candidate at the threshold was rolled back 1/200 times), so this
# guards the wiring (baselines, weights, which counts are judged); the bound itself is checked
# directly in test_core_sequential.py.
ALLOWED = binomial_quantile(HEALTHY_RUNS, 0.01, 0.99)


@pytest.mark.parametrize(
    "ratio",
    [
        pytest.param(
            ratio, id=f"true ratio {ratio} x {HEALTHY_RUNS} rollouts: <= {ALLOWED} false rollbacks (1 %)"
        )
        for ratio in (0.001, 0.003)
    ],
)
def test_simulation_false_rollbacks_of_a_healthy_candidate(ratio: float) -> None:
    """A healthy candidate (under the 0.005 threshold) is rolled back in <= 1 % of rollouts.

    Figures by hand at larger N are above ALLOWED.
    """
    runs = [simulate(ratio, seed) for seed in range(HEALTHY_RUNS)]
    false = [run for run in runs if run.outcome != "promoted"]
    print(
        f"\ntrue ratio {ratio}: {len(false)}/{HEALTHY_RUNS} false rollbacks "
        f"(allowed {ALLOWED}; rules {sorted({run.rule or run.outcome for run in false})})"
    )
    assert all(run.outcome in ("promoted", "rolled_back") for run in runs)
    assert len(false) <= ALLOWED


DETECT_RUNS = 31
LONG_BAKE = replace(SIM, bake=30.0)  # long enough that even 1 % is caught at 100 %, not promoted


@pytest.mark.parametrize(
    ("ratio", "most"),
    [
        pytest.param(1.0, 20, id="true ratio 1.0: median < 20 candidate requests to roll back"),
        pytest.param(0.5, 40, id="true ratio 0.5: median < 40"),
        pytest.param(0.05, 600, id="true ratio 0.05: median < 600"),
        pytest.param(0.01, 10_000, id="true ratio 0.01: median < 10,000 (with a 30 s bake)"),
    ],
)
def test_simulation_requests_to_roll_back_a_bad_candidate(ratio: float, most: int) -> None:
    """How many requests a failing candidate answers before it is rolled back (ticks every 50 ms).

    Evidence starts again at each step, so a candidate close to the threshold may be judged only at
    100 %: at 1 % (twice the threshold) the steps of 200-500 requests cannot show it, and it is caught
    while baking. With the 1 s bake of SIM they mostly pass (by hand, 201 runs: 198 promoted at 1 %,
    29 at 2 %). By hand, 201 runs with this spec: medians 8, 15, 170 and 5,177 candidate requests at
    1.0, 0.5, 0.05 and 0.01 (7, 13, 170 and 5,100 with 10 ms ticks).
    """
    runs = [simulate(ratio, seed, spec=LONG_BAKE, tick=50) for seed in range(DETECT_RUNS)]
    caught = [run for run in runs if run.outcome == "rolled_back"]
    needed = statistics.median(run.candidate_requests for run in caught)
    steps = [run.step for run in caught]
    served = [run.candidate_requests for run in caught]
    print(
        f"\ntrue ratio {ratio}: rolled back {len(caught)}/{DETECT_RUNS}, median {needed:g} candidate "
        f"requests (min {min(served)}, max {max(served)}), by step {[steps.count(i) for i in range(4)]}, "
        f"rules {sorted({run.rule or '' for run in caught})}"
    )
    assert len(caught) == DETECT_RUNS
    assert needed < most


def test_an_answer_to_an_earlier_asking_of_a_gate_is_not_taken() -> None:
    """Pause and resume while a step gate is asked: the gate is asked again, and only the second
    asking's answer counts; the first one, arriving late, must not pass a later step's gate."""
    d = Drive(replace(SPEC, gates=frozenset({"step"})))
    assert d.r.gates_left == ("step",) and d.r.asked == 1
    d.op("pause")
    assert d.op("resume") == ["notify event", "gate step"] and d.r.asked == 2
    d.r, commands = on_gate(d.r, "step", True, "late", d.obs, d.at(1), ask=1)
    assert commands == [] and d.where == ("pending", -1)  # the stale answer changed nothing
    d.r, commands = on_gate(d.r, "step", True, "fresh", d.obs, d.at(2), ask=2)
    assert "weight 5" in show(commands) and d.where == ("running", 0)
    assert roundtrip(d.r).asked == 2
