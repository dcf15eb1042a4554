"""Guarded rollouts as a pure state machine: (rollout, event, now) -> (rollout, commands).

Events in: a tick with the colors' cumulative counters, a gate's answer, an operator's action, a
refused weight change, a forced override. Commands out: set the candidate's weight, call a gate, send a
notice, finish. The control plane runs the commands and feeds the results back (mitmproxy's layers do
the same), so every rule here is tested with tables and simulated traffic, with no clock and no socket.

The rules are the ones users quote ("abort if the error rate goes above 0.5 %"), judged on the
counts since the current step began with the anytime-valid bounds of ``core.sequential``, so they
may be checked on every tick. ``confidence`` covers the whole rollout: alpha = 1 - confidence is split
evenly over the steps and the rules in force, so a candidate sitting exactly at every threshold is
rolled back falsely with probability at most alpha, however long it runs and however often it is looked at.
A restart opens a fresh test at the same step (the counters are per process): each restart during a step
adds at most that step's share again.

- absolute: the candidate's error ratio is shown above ``max_error_ratio`` (its lower bound is past it);
- relative: the candidate's lower bound exceeds the stable color's upper bound, over the same period,
  by more than ``max_error_ratio_increase`` (each bound at alpha/2);
- latency: more than 1 % of the candidate's requests are shown slower than ``max_p99`` (that is, its
  p99 is over it), or slower than ``max_p99_ratio`` x an upper bound of the stable color's p99. Latency
  is counted in the metrics' buckets, so a limit between two bounds is raised to the next one.

Not enough evidence is never a failure: the rollout is ``waiting``, and only ``progress_deadline``
with ``on_insufficient_traffic`` turns a long wait into an action.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .colors import Color, check_color, other
from .sequential import above, below, bounds, prior_b

State = Literal["pending", "running", "waiting", "paused", "baking", "promoted", "rolled_back", "aborted"]
STATES: tuple[State, ...] = (
    "pending",
    "running",
    "waiting",
    "paused",
    "baking",
    "promoted",
    "rolled_back",
    "aborted",
)
TERMINAL: frozenset[str] = frozenset({"promoted", "rolled_back", "aborted"})
GATE_KINDS = ("pre_rollout", "step", "confirm_promotion")
NOTICE_KINDS = ("post_rollout", "rollback", "event")
RULES = ("error_ratio", "error_ratio_increase", "p99", "p99_ratio", "flip_probe")
OUTCOMES = ("promoted", "rolled_back", "aborted")
INSUFFICIENT = ("wait", "promote", "abort")
SLOW_SHARE = 0.01  # p99 over a limit = more than 1 % of requests slower than it
MAX_DECISIONS = 200  # per rollout, newest kept: a long wait must not grow the state file


class RolloutError(Exception):
    """An action that does not fit the rollout's state (answered 409); nothing was changed."""


@dataclass(frozen=True, slots=True)
class Spec:
    """One rollout's settings: the config's ``rollout:`` defaults with the API call's overrides."""

    steps: tuple[int, ...] = (5, 25, 50, 100)
    step_pause: float = 30.0
    min_requests: int = 200
    bake: float = 300.0
    max_error_ratio: float = 0.005
    max_error_ratio_increase: float | None = 0.005
    max_p99: float | None = None
    max_p99_ratio: float | None = None
    confidence: float = 0.99
    require_proof: bool = False
    on_insufficient_traffic: str = "wait"
    progress_deadline: float = 600.0
    gates: frozenset[str] = frozenset()  # gate kinds that have a webhook: the rollout waits for them
    gate_interval: float = 10.0  # how often an unconfirmed confirm_promotion gate is asked again

    def problems(self) -> list[str]:
        """Every invalid field as 'field: why (got value)'; empty when the spec is usable."""
        out = []
        steps = self.steps
        if not steps or any(
            not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= 100 for s in steps
        ):
            out.append(f"steps: must be a non-empty list of percentages 1..100 (got {list(steps)!r})")
        elif any(a >= b for a, b in itertools.pairwise(steps)) or steps[-1] != 100:
            out.append(f"steps: must increase and end at 100 (got {list(steps)!r})")
        for name in ("step_pause", "progress_deadline", "gate_interval"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                out.append(f"{name}: must be a duration > 0 (got {value!r})")
        if not math.isfinite(self.bake) or self.bake < 0:
            out.append(f"bake: must be a duration >= 0 (got {self.bake!r})")
        if self.min_requests < 0:
            out.append(f"min_requests: must be >= 0 (got {self.min_requests!r})")
        for name in ("max_error_ratio", "max_error_ratio_increase"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                out.append(f"{name}: must be a ratio between 0 and 1, like 0.005 (got {value!r})")
        if self.max_p99 is not None and not (math.isfinite(self.max_p99) and self.max_p99 > 0):
            out.append(f"max_p99: must be a duration > 0 (got {self.max_p99!r})")
        if self.max_p99_ratio is not None and not (
            math.isfinite(self.max_p99_ratio) and self.max_p99_ratio >= 1
        ):
            out.append(f"max_p99_ratio: must be >= 1 (got {self.max_p99_ratio!r})")
        if not 0.5 <= self.confidence < 1:
            out.append(f"confidence: must be >= 0.5 and < 1, like 0.99 (got {self.confidence!r})")
        if self.on_insufficient_traffic not in INSUFFICIENT:
            out.append(
                f"on_insufficient_traffic: must be one of {', '.join(INSUFFICIENT)} "
                f"(got {self.on_insufficient_traffic!r})"
            )
        unknown = sorted(set(self.gates) - set(GATE_KINDS))
        if unknown:
            out.append(f"gates: unknown kinds {unknown}")
        return out

    @property
    def rules(self) -> tuple[str, ...]:
        """The rules in force, in the order they are checked."""
        rules = ["error_ratio"]
        if self.max_error_ratio_increase is not None:
            rules.append("error_ratio_increase")
        if self.max_p99 is not None:
            rules.append("p99")
        if self.max_p99_ratio is not None:
            rules.append("p99_ratio")
        return tuple(rules)

    @property
    def alpha(self) -> float:
        """The false-rollback chance each rule may spend at each step: alpha split evenly over both."""
        return (1.0 - self.confidence) / (len(self.steps) * len(self.rules))

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "step_pause": self.step_pause,
            "min_requests": self.min_requests,
            "bake": self.bake,
            "max_error_ratio": self.max_error_ratio,
            "max_error_ratio_increase": self.max_error_ratio_increase,
            "max_p99": self.max_p99,
            "max_p99_ratio": self.max_p99_ratio,
            "confidence": self.confidence,
            "require_proof": self.require_proof,
            "on_insufficient_traffic": self.on_insufficient_traffic,
            "progress_deadline": self.progress_deadline,
            "gates": sorted(self.gates),
            "gate_interval": self.gate_interval,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Spec:
        values = dict(data)
        values["steps"] = tuple(values["steps"])
        values["gates"] = frozenset(values["gates"])
        spec = cls(**values)
        if problems := spec.problems():
            raise ValueError("; ".join(problems))
        return spec


@dataclass(frozen=True, slots=True)
class Counts:
    """One color's counters: requests answered, errors among them, latency per bucket (last: +Inf)."""

    requests: int = 0
    errors: int = 0
    latency: tuple[int, ...] = ()

    def since(self, base: Counts) -> Counts:
        before = base.latency or (0,) * len(self.latency)  # a baseline with no histogram counted none
        latency = tuple(a - b for a, b in zip(self.latency, before, strict=True))
        return Counts(self.requests - base.requests, self.errors - base.errors, latency)


@dataclass(frozen=True, slots=True)
class Observation:
    """Cumulative counters of both colors at one moment, and the latency buckets' upper bounds."""

    blue: Counts
    green: Counts
    buckets: tuple[float, ...] = ()

    def of(self, color: Color) -> Counts:
        return self.blue if color == "blue" else self.green


# -- commands --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetWeights:
    """Give the candidate ``candidate`` percent and the stable color the rest."""

    candidate: int
    reason: str


@dataclass(frozen=True, slots=True)
class CallGate:
    """Ask the ``kind`` webhooks; answer with ``on_gate``, passing ``ask`` back."""

    kind: str
    ask: int = 0  # which asking this is: an answer to an earlier one (a pause came between) is stale


@dataclass(frozen=True, slots=True)
class Notify:
    """Tell the ``kind`` webhooks; nothing waits for them."""

    kind: str


@dataclass(frozen=True, slots=True)
class Finish:
    outcome: str


Command = SetWeights | CallGate | Notify | Finish


@dataclass(frozen=True, slots=True)
class Decision:
    at: float
    step: int
    action: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "step": self.step, "action": self.action, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step as it ran: when, at what weight, and the evidence it ended with."""

    index: int
    weight: int
    started_at: float
    ended_at: float | None = None
    evidence: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "weight": self.weight,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "evidence": self.evidence,
        }


@dataclass(frozen=True, slots=True)
class Rollout:
    id: str
    stable: Color
    candidate: Color
    spec: Spec
    state: State
    created_at: float
    updated_at: float
    actor: str
    reason: str | None = None
    step: int = -1  # index into spec.steps; -1 while pending
    step_started: float = 0.0
    baseline: Observation | None = None  # counters when the step began
    gates_left: tuple[str, ...] = ()  # gates still to pass before moving to step `target`
    target: int = 0
    resume_to: State | None = None  # the state a pause returns to
    paused_by: str | None = None
    retry_at: float | None = None  # when an unconfirmed confirm_promotion is asked again
    waited_out: bool = False  # progress_deadline passed at this step (recorded once)
    asked: int = 0  # gate askings so far (CallGate.ask)
    rule: str | None = None  # the rule that rolled it back
    evidence: dict[str, Any] | None = None
    steps: tuple[StepRecord, ...] = ()
    decisions: tuple[Decision, ...] = field(default=())

    @property
    def weight(self) -> int:
        """The candidate's percentage now."""
        return (
            self.spec.steps[self.step]
            if self.step >= 0 and self.state not in ("rolled_back", "aborted")
            else 0
        )

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


Step = tuple[Rollout, list[Command]]


def start(
    rollout_id: str,
    candidate: Color,
    spec: Spec,
    obs: Observation,
    now: float,
    *,
    actor: str,
    reason: str | None = None,
) -> Step:
    """A new rollout toward ``candidate``; its first weight moves once the entry gates pass."""
    if problems := spec.problems():
        raise RolloutError("; ".join(problems))
    candidate = check_color(candidate)
    r = Rollout(
        id=rollout_id,
        stable=other(candidate),
        candidate=candidate,
        spec=spec,
        state="pending",
        created_at=now,
        updated_at=now,
        actor=actor,
        reason=reason,
    )
    r = _decide(
        r, now, "start", f"rollout to {candidate} started by {actor}" + (f": {reason}" if reason else "")
    )
    gates = (("pre_rollout",) if "pre_rollout" in spec.gates else ()) + _gates_before(spec, 0)
    return _move(r, 0, gates, obs, now, [Notify("event")])


def on_tick(r: Rollout, obs: Observation, now: float) -> Step:
    """Judge the evidence; advance, wait, roll back or finish. Called at least every 100 ms."""
    if r.done:
        return r, []
    if r.baseline is not None and r.weight > 0:
        cand = obs.of(r.candidate).since(r.baseline.of(r.candidate))
        stab = obs.of(r.stable).since(r.baseline.of(r.stable))
        r = replace(r, evidence=_evidence(r.spec, cand, stab, obs.buckets))
        fired = _fired_rule(r.spec, cand, stab, obs.buckets)
        if fired is not None:
            rule, why = fired
            return _roll_back(r, rule, why, now)
    if r.state == "paused":
        if r.retry_at is not None and now >= r.retry_at and r.gates_left:
            return _ask(replace(r, retry_at=None), r.gates_left[0])
        return r, []
    if r.gates_left:
        return r, []
    if r.state == "baking":
        if now - r.step_started >= r.spec.bake:
            return _finish(r, "promoted", f"baked {r.spec.bake:g}s at 100% with no rule fired", now, [])
        return r, []
    if r.state not in ("running", "waiting"):
        return r, []
    return _progress(r, obs, now)


def on_gate(
    r: Rollout,
    kind: str,
    ok: bool,
    detail: str,
    obs: Observation,
    now: float,
    *,
    on_failure: str = "abort",
    ask: int | None = None,
) -> Step:
    """A gate answered (``ask``: to which asking). A late answer for a gate no longer awaited, or to
    an earlier asking of it, changes nothing."""
    if r.done or not r.gates_left or r.gates_left[0] != kind or ask not in (None, r.asked):
        return r, []
    paused_by_gate = r.paused_by is not None and r.paused_by.startswith(f"gate {kind}:")
    if r.state == "paused" and not paused_by_gate:
        # An operator paused while the gate was asked: the answer waits; resume asks again.
        return _decide(
            r, now, "gate", f"gate {kind} answered during a pause; it is asked again on resume"
        ), []
    if ok:
        if paused_by_gate:  # a retried confirm_promotion went through: the gate's pause ends
            r = replace(r, state=r.resume_to or "running", paused_by=None, resume_to=None, retry_at=None)
        r = _decide(r, now, "gate", f"gate {kind} passed: {detail}")
        return _pass_gate(r, obs, now)
    if kind == "confirm_promotion":
        notices: list[Command] = [] if r.state == "paused" else [Notify("event")]
        r = _decide(r, now, "gate", f"gate confirm_promotion not confirmed ({detail}); asking again")
        r = _pause(r, f"gate confirm_promotion: {detail}", now)
        return replace(r, retry_at=now + r.spec.gate_interval), notices
    if on_failure == "pause":
        r = _decide(r, now, "gate", f"gate {kind} failed ({detail}); paused")
        return _pause(r, f"gate {kind}: {detail}", now), [Notify("event")]
    return _finish(
        r, "aborted", f"gate {kind} failed: {detail}", now, _back_to_stable(r, f"gate {kind} failed")
    )


def on_operator(r: Rollout, action: str, obs: Observation, now: float, *, actor: str) -> Step:
    """pause, resume, promote or abort by hand; RolloutError when it does not fit the state."""
    if r.done:
        raise RolloutError(f"rollout {r.id} is already {r.state}")
    if action == "pause":
        if r.state == "paused":
            raise RolloutError(f"rollout {r.id} is already paused ({r.paused_by})")
        r = _decide(r, now, "pause", f"paused by {actor}")
        return _pause(r, f"operator {actor}", now), [Notify("event")]
    if action == "resume":
        if r.state != "paused":
            raise RolloutError(f"rollout {r.id} is {r.state}, not paused")
        gate_pause = r.paused_by is not None and r.paused_by.startswith("gate ") and bool(r.gates_left)
        r = replace(r, state=r.resume_to or "running", resume_to=None, paused_by=None, retry_at=None)
        if gate_pause:
            r = _decide(r, now, "resume", f"resumed by {actor}, overriding gate {r.gates_left[0]}")
            r, after = _pass_gate(r, obs, now)
            return r, [Notify("event"), *after]
        r = _decide(r, now, "resume", f"resumed by {actor}")
        if r.gates_left:  # the answer that came during the pause was not taken: ask again
            r, again = _ask(r, r.gates_left[0])
            return r, [Notify("event"), *again]
        return r, [Notify("event")]
    if action == "promote":
        to_full: list[Command] = (
            [] if r.weight == 100 else [SetWeights(100, f"rollout {r.id} promoted by {actor}")]
        )
        last = len(r.spec.steps) - 1
        if r.step != last:  # the steps skipped are shown as such; the last one is where it ends
            r = replace(
                r, step=last, steps=(*_closed_steps(r, now), StepRecord(last, 100, now)), evidence=None
            )
        return _finish(r, "promoted", f"promoted by {actor}, skipping what was left", now, to_full)
    if action == "abort":
        return _finish(r, "aborted", f"aborted by {actor}", now, _back_to_stable(r, f"aborted by {actor}"))
    raise RolloutError(f"unknown action {action!r}: expected pause, resume, promote or abort")


def on_refused(r: Rollout, detail: str, now: float) -> Step:
    """A step's weight change was refused (its flip probe failed): back to stable at once."""
    if r.done:
        return r, []
    return _roll_back(r, "flip_probe", f"the candidate failed the flip probe: {detail}", now)


def on_overridden(r: Rollout, actor: str, now: float) -> Step:
    """A forced flip or weights change took the switch: the rollout ends, the weights stay as forced."""
    if r.done:
        return r, []
    return _finish(r, "aborted", f"a forced change by {actor} overrode the rollout", now, [])


def resumed(r: Rollout, obs: Observation, now: float) -> Step:
    """After a restart: same step and state, evidence and pause start again; a pending gate is asked again."""
    if r.done:
        return r, []
    gate_pause = r.paused_by is not None and r.paused_by.startswith("gate confirm_promotion:")
    r = replace(
        r,
        step_started=now,
        baseline=obs,
        evidence=None,
        waited_out=False,
        retry_at=now if gate_pause else None,  # an unconfirmed promotion is asked again at once
    )
    r = _decide(
        r, now, "restart", "bgproxy restarted: resuming at the same step, with fresh evidence and pause"
    )
    if r.gates_left and r.state != "paused":
        return _ask(r, r.gates_left[0])
    return r, []


# -- internals -------------------------------------------------------------------------------------


def _decide(r: Rollout, now: float, action: str, reason: str) -> Rollout:
    decisions = (*r.decisions, Decision(now, r.step, action, reason))[-MAX_DECISIONS:]
    return replace(r, decisions=decisions, updated_at=now)


def _gates_before(spec: Spec, target: int) -> tuple[str, ...]:
    gates: tuple[str, ...] = ("step",) if "step" in spec.gates else ()
    if spec.steps[target] == 100 and "confirm_promotion" in spec.gates:
        gates += ("confirm_promotion",)
    return gates


def _move(
    r: Rollout, target: int, gates: tuple[str, ...], obs: Observation, now: float, commands: list[Command]
) -> Step:
    """Move to step ``target`` once ``gates`` pass (now, if there are none)."""
    if gates:
        r, ask = _ask(replace(r, gates_left=gates, target=target), gates[0])
        return r, [*commands, *ask]
    return _enter_step(r, target, obs, now, commands)


def _ask(r: Rollout, kind: str) -> Step:
    """Call a gate, numbering the asking so only its own answer is taken."""
    r = replace(r, asked=r.asked + 1)
    return r, [CallGate(kind, r.asked)]


def _pass_gate(r: Rollout, obs: Observation, now: float) -> Step:
    left = r.gates_left[1:]
    r = replace(r, gates_left=left)
    if left:
        return _ask(r, left[0])
    return _enter_step(r, r.target, obs, now, [])


def _closed_steps(r: Rollout, now: float) -> tuple[StepRecord, ...]:
    """The step records with the current one ended now, keeping the evidence it ended with."""
    steps = r.steps
    if steps and steps[-1].ended_at is None:
        steps = (*steps[:-1], replace(steps[-1], ended_at=now, evidence=r.evidence))
    return steps


def _enter_step(r: Rollout, index: int, obs: Observation, now: float, commands: list[Command]) -> Step:
    weight = r.spec.steps[index]
    steps = _closed_steps(r, now)
    last = index == len(r.spec.steps) - 1
    state: State = "baking" if last else "running"
    r = replace(
        r,
        step=index,
        state=state,
        step_started=now,
        baseline=obs,
        evidence=None,
        waited_out=False,
        steps=(*steps, StepRecord(index, weight, now)),
    )
    why = f"step {index + 1}/{len(r.spec.steps)}: {r.candidate} to {weight}%"
    r = _decide(r, now, "step", why + (f", baking {r.spec.bake:g}s" if last else ""))
    return r, [*commands, SetWeights(weight, f"rollout {r.id} {why}"), Notify("event")]


def _progress(r: Rollout, obs: Observation, now: float) -> Step:
    spec = r.spec
    evidence = r.evidence or {}
    requests = int(evidence.get("candidate", {}).get("requests", 0))
    elapsed = now - r.step_started
    missing = []
    if elapsed < spec.step_pause:
        missing.append(f"pause {spec.step_pause:g}s not over")
    if requests < spec.min_requests:
        missing.append(f"{requests}/{spec.min_requests} candidate requests")
    if spec.require_proof and not evidence.get("proven", False):
        missing.append(f"error ratio not yet shown below {spec.max_error_ratio:g}")
    if not missing:
        return _move(r, r.step + 1, _gates_before(spec, r.step + 1), obs, now, [])
    if elapsed < spec.step_pause:
        return r, []
    if r.state != "waiting":
        r = _decide(replace(r, state="waiting"), now, "wait", "waiting: " + ", ".join(missing))
        return r, [Notify("event")]
    if elapsed < spec.progress_deadline or r.waited_out:
        return r, []
    action = spec.on_insufficient_traffic
    why = f"progress_deadline {spec.progress_deadline:g}s passed ({', '.join(missing)})"
    if action == "abort":
        return _finish(
            r,
            "aborted",
            why + "; on_insufficient_traffic: abort",
            now,
            _back_to_stable(r, "insufficient traffic"),
        )
    if action == "promote":
        r = _decide(r, now, "promote", why + "; on_insufficient_traffic: promote, going to 100%")
        last = len(spec.steps) - 1
        return _move(r, last, _gates_before(spec, last), obs, now, [])
    return _decide(replace(r, waited_out=True), now, "wait", why + "; on_insufficient_traffic: wait"), []


def _pause(r: Rollout, by: str, now: float) -> Rollout:
    resume_to = r.resume_to if r.state == "paused" else r.state
    return replace(r, state="paused", paused_by=by, resume_to=resume_to, updated_at=now)


def _back_to_stable(r: Rollout, why: str) -> list[Command]:
    return [SetWeights(0, f"rollout {r.id}: {why}")] if r.weight > 0 else []


def _roll_back(r: Rollout, rule: str, why: str, now: float) -> Step:
    commands = [*_back_to_stable(r, f"rolled back, rule {rule} fired: {why}"), Notify("rollback")]
    return _finish(replace(r, rule=rule), "rolled_back", f"rule {rule} fired: {why}", now, commands)


def _finish(r: Rollout, outcome: State, why: str, now: float, commands: list[Command]) -> Step:
    steps = _closed_steps(r, now)
    r = replace(r, state=outcome, gates_left=(), paused_by=None, resume_to=None, retry_at=None, steps=steps)
    r = _decide(r, now, outcome, why)
    return r, [*commands, Notify("event"), Notify("post_rollout"), Finish(outcome)]


# -- evidence and rules ----------------------------------------------------------------------------


def _slow(counts: Counts, buckets: tuple[float, ...], limit: float) -> int:
    """Requests certainly slower than ``limit``: those in buckets whose lower bound is >= it."""
    slow = 0
    for i, n in enumerate(counts.latency):
        lower = buckets[i - 1] if i > 0 else 0.0
        if i > 0 and lower >= limit:
            slow += n
    return slow


def bucket_limit(buckets: tuple[float, ...], limit: float) -> float:
    """The latency limit as it is judged: raised to the next bucket bound (inf past the last)."""
    for bound in buckets:
        if bound >= limit:
            return bound
    return math.inf


def p99_estimate(counts: Counts, buckets: tuple[float, ...]) -> float | None:
    """The upper bound of the bucket holding the 99th percentile (None without requests or past the last)."""
    if counts.requests <= 0 or not counts.latency:
        return None
    rank = math.ceil(0.99 * sum(counts.latency))
    seen = 0
    for bound, n in zip((*buckets, math.inf), counts.latency, strict=False):
        seen += n
        if seen >= rank:
            return None if math.isinf(bound) else bound
    return None


def _stable_p99_bound(counts: Counts, buckets: tuple[float, ...], alpha: float) -> float | None:
    """The smallest bucket bound the stable color's p99 is shown to be under, if any."""
    n = counts.requests
    for bound in buckets:
        if below(_slow(counts, buckets, bound), n, SLOW_SHARE, alpha):
            return bound
    return None


def _color_evidence(
    counts: Counts, alpha: float, center: float, buckets: tuple[float, ...]
) -> dict[str, Any]:
    low, high = bounds(counts.errors, counts.requests, alpha, prior_b(center))
    return {
        "requests": counts.requests,
        "errors": counts.errors,
        "error_ratio": counts.errors / counts.requests if counts.requests else None,
        "error_ratio_low": low,
        "error_ratio_high": high,
        "p99": p99_estimate(counts, buckets),
    }


def _evidence(spec: Spec, cand: Counts, stab: Counts, buckets: tuple[float, ...]) -> dict[str, Any]:
    """What the current step has shown so far (counts since it began), as the API and records show it."""
    alpha = spec.alpha
    threshold = spec.max_error_ratio
    return {
        "candidate": _color_evidence(cand, alpha, threshold, buckets),
        "stable": _color_evidence(stab, alpha, threshold, buckets),
        "threshold": threshold,
        "alpha": alpha,
        "proven": below(cand.errors, cand.requests, threshold, 1.0 - spec.confidence),
    }


def _fired_rule(spec: Spec, cand: Counts, stab: Counts, buckets: tuple[float, ...]) -> tuple[str, str] | None:
    """The first rule the step's counts show broken, with a reason quoting the numbers; None if none."""
    alpha = spec.alpha
    ratio = f"{cand.errors}/{cand.requests} errors"
    if above(cand.errors, cand.requests, spec.max_error_ratio, alpha):
        return "error_ratio", f"{ratio}, above {spec.max_error_ratio:g} at confidence {1 - alpha:.5g}"
    increase = spec.max_error_ratio_increase
    if increase is not None and cand.requests and stab.requests:
        low, _ = bounds(cand.errors, cand.requests, alpha / 2, prior_b(spec.max_error_ratio))
        _, high = bounds(stab.errors, stab.requests, alpha / 2, prior_b(spec.max_error_ratio))
        if low - high > increase:
            return (
                "error_ratio_increase",
                f"{ratio} against stable {stab.errors}/{stab.requests}: at least {low - high:.4g} worse, "
                f"more than {increase:g}",
            )
    if spec.max_p99 is not None:
        limit = bucket_limit(buckets, spec.max_p99)
        slow = _slow(cand, buckets, limit)
        if above(slow, cand.requests, SLOW_SHARE, alpha):
            return "p99", f"{slow}/{cand.requests} requests slower than {limit:g}s: p99 over max_p99"
    if spec.max_p99_ratio is not None:
        stable_p99 = _stable_p99_bound(stab, buckets, alpha / 2)
        if stable_p99 is not None:
            limit = bucket_limit(buckets, stable_p99 * spec.max_p99_ratio)
            slow = _slow(cand, buckets, limit)
            if above(slow, cand.requests, SLOW_SHARE, alpha / 2):
                return (
                    "p99_ratio",
                    f"{slow}/{cand.requests} requests slower than {limit:g}s: p99 over "
                    f"{spec.max_p99_ratio:g} x stable's p99 (at most {stable_p99:g}s)",
                )
    return None


# -- persistence -----------------------------------------------------------------------------------


def to_record(r: Rollout) -> dict[str, Any]:
    """The rollout as the state file keeps it (and the API shows it): plain JSON values, times as Unix."""
    return {
        "id": r.id,
        "from": r.stable,
        "to": r.candidate,
        "state": r.state,
        "step": r.step,
        "weight": r.weight,
        "spec": r.spec.as_dict(),
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "actor": r.actor,
        "reason": r.reason,
        "step_started": r.step_started,
        "gates_left": list(r.gates_left),
        "asked": r.asked,
        "target": r.target,
        "resume_to": r.resume_to,
        "paused_by": r.paused_by,
        "rule": r.rule,
        "evidence": r.evidence,
        "steps": [s.as_dict() for s in r.steps],
        "decisions": [d.as_dict() for d in r.decisions],
    }


def from_record(data: dict[str, Any]) -> Rollout:
    """A rollout back from ``to_record``; ValueError (naming the field) for anything malformed."""
    try:
        state = data["state"]
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        resume_to = data["resume_to"]
        if resume_to is not None and resume_to not in STATES:
            raise ValueError(f"resume_to must be a state, got {resume_to!r}")
        spec = Spec.from_dict(data["spec"])
        step = int(data["step"])
        if not -1 <= step < len(spec.steps):
            raise ValueError(f"step must be -1..{len(spec.steps) - 1}, got {step}")
        target = int(data["target"])
        if not 0 <= target < len(spec.steps):
            raise ValueError(f"target must be 0..{len(spec.steps) - 1}, got {target}")
        gates = data["gates_left"]
        if not isinstance(gates, list) or any(g not in GATE_KINDS for g in gates):
            raise ValueError(f"gates_left must be a list of {', '.join(GATE_KINDS)}, got {gates!r}")
        if data["from"] == data["to"]:
            raise ValueError(f"from and to must differ, got {data['to']!r} for both")
        return Rollout(
            id=str(data["id"]),
            stable=check_color(data["from"]),
            candidate=check_color(data["to"]),
            spec=spec,
            state=state,
            created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]),
            actor=str(data["actor"]),
            reason=data["reason"],
            step=step,
            step_started=float(data["step_started"]),
            gates_left=tuple(gates),
            asked=int(data["asked"]),
            target=target,
            resume_to=resume_to,
            paused_by=data["paused_by"],
            rule=data["rule"],
            evidence=data["evidence"],
            steps=tuple(StepRecord(**s) for s in data["steps"]),
            decisions=tuple(Decision(**d) for d in data["decisions"]),
        )
    except KeyError as exc:
        raise ValueError(f"a rollout record lacks {exc.args[0]!r}") from None
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"a rollout record is malformed: {exc}") from None
