"""Request and response bodies of the admin API, and how their validation errors read.

The same models validate requests, shape responses and generate the OpenAPI document, so the
documentation cannot drift from what the server does. Every model forbids unknown keys: a typo in a
request is an error, and a response field nobody documented fails the OpenAPI tests.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from ..config import parse_duration
from ..core.colors import Color
from ..core.weights import check_some_traffic
from ..validation import describe

# Formatted by core.timefmt.rfc3339, like the state file, so API and file always agree to the character.
Timestamp = Annotated[
    str, Field(json_schema_extra={"format": "date-time"}, examples=["2024-05-01T12:00:00.250000Z"])
]

Weight = Annotated[StrictInt, Field(ge=0, description="Relative share of new requests; integer >= 0.")]
Reason = Annotated[
    str,
    StringConstraints(min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f]*$"),
    Field(description="Free text recorded in the audit log, e.g. a deploy id."),
]
DrainTimeout = Annotated[
    float,
    PlainValidator(parse_duration, json_schema_input_type=float | str),
    Field(description='Seconds (10) or a duration ("10s", "500ms", "2m") the old color may drain.'),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- requests


class FlipRequest(_Model):
    """Body of POST /v1/flip; may be omitted entirely."""

    to: Color | None = Field(
        default=None, description="Color to send all traffic to; default: the one not live now."
    )
    drain_timeout: DrainTimeout | None = None
    reason: Reason | None = None
    force: bool = Field(default=False, description="Apply even if the target color has no healthy upstream.")


class WeightsRequest(_Model):
    """Body of PUT /v1/weights: ratios, so 9/1 and 90/10 route alike but are reported as given."""

    blue: Weight
    green: Weight
    drain_timeout: DrainTimeout | None = None
    reason: Reason | None = None
    force: bool = Field(
        default=False, description="Apply even if a color given weight has no healthy upstream."
    )

    @model_validator(mode="after")
    def _someone_gets_traffic(self) -> Self:
        check_some_traffic(self.blue, self.green)
        return self


Seconds = Annotated[
    float,
    PlainValidator(parse_duration, json_schema_input_type=float | str),
    Field(description='Seconds (30) or a duration ("30s", "500ms", "5m").'),
]


def _zero_or_duration(value: Any) -> float:
    return 0.0 if value in (0, "0", "0s") else parse_duration(value)


class RolloutRequest(_Model):
    """Body of POST /v1/rollouts: the target, and any of the config's ``rollout:`` settings to override.

    Webhooks and error_statuses come from the config only.
    """

    to: Color = Field(description="The candidate color, which the rollout moves traffic to.")
    steps: list[StrictInt] | None = Field(
        default=None, description="Candidate percentages, increasing, ending at 100."
    )
    step_pause: Seconds | None = Field(default=None, description="Minimum time at each step.")
    min_requests: StrictInt | None = Field(
        default=None, ge=0, description="Candidate requests needed to leave a step."
    )
    bake: Annotated[float, PlainValidator(_zero_or_duration, json_schema_input_type=float | str)] | None = (
        Field(default=None, description="Watch time at 100% before promoted; 0: none.")
    )
    max_error_ratio: float | None = Field(
        default=None, description="Roll back above this error ratio, e.g. 0.005."
    )
    max_error_ratio_increase: float | None = Field(
        default=None, description="Roll back when worse than stable by more than this (absolute); null: off."
    )
    max_p99: Seconds | None = Field(
        default=None, description="Roll back when the candidate's p99 is over it."
    )
    max_p99_ratio: float | None = Field(default=None, description="Roll back when p99 > stable's p99 x this.")
    confidence: float | None = Field(default=None, description="Of every rule, over the whole rollout; 0.99.")
    require_proof: bool | None = Field(
        default=None, description="A step also waits until the error ratio is shown below the threshold."
    )
    on_insufficient_traffic: Literal["wait", "promote", "abort"] | None = None
    progress_deadline: Seconds | None = None
    reason: Reason | None = None
    force: bool = Field(default=False, description="Start even if the candidate fails the flip probe.")

    def overrides(self) -> dict[str, Any]:
        """The settings this request sets, null included (max_p99: null turns the rule off)."""
        keep = self.model_fields_set - {"to", "reason", "force"}
        return {name: getattr(self, name) for name in keep}


class RolloutActionRequest(_Model):
    """Body of POST /v1/rollouts/current/{action}; may be omitted."""

    reason: Reason | None = None


# ---------------------------------------------------------------------------------------------- responses


class WeightsView(_Model):
    blue: int
    green: int


class ColorState(_Model):
    """One color's entry in /v1/state (built by api.color_state)."""

    weight: int
    upstreams: list[str] = Field(description="Configured backends as host:port.")
    in_flight: int = Field(description="Requests of this color being proxied right now (previews included).")
    streams: int = Field(description="Open long-lived exchanges: upgraded, or streaming without a length.")
    draining: bool = Field(description="Lost its weight; in-flight exchanges are finishing.")
    drain_deadline: Timestamp | None = Field(description="When what is left of the drain is closed.")
    drained: DrainedCounts
    upstream_health: list[UpstreamView]
    error_window: ErrorWindowView


class ErrorWindowView(_Model):
    """Answers and errors (5xx, upstream failures) over the last window; null counts: metrics off."""

    window_seconds: int
    requests: int | None
    errors: int | None
    error_ratio: float | None = Field(description="errors / requests; 0.0 when there were none.")


class DrainedCounts(_Model):
    """Exchanges of this color that ended while it drained (or during shutdown)."""

    ended: int = Field(description="Ended by themselves.")
    deadline: int = Field(description="Closed by bgproxy at a drain or shutdown deadline.")


class CheckView(_Model):
    at: Timestamp
    ok: bool
    detail: str


class UpstreamView(_Model):
    """One upstream's health: active checks and passive ejection."""

    upstream: str
    state: Literal["healthy", "unhealthy", "ejected"]
    ejected_until: Timestamp | None
    consecutive_failures: int = Field(description="Connect failures / 5xx answers in a row (passive).")
    ejections: int
    in_flight: int
    last_check: CheckView | None = Field(description="Last active check; null without health_check.")


class PoolsHealthView(_Model):
    blue: list[UpstreamView]
    green: list[UpstreamView]


class DrainWaitView(_Model):
    color: Color
    idle: Literal[True] = Field(description="The color has no open exchange left.")


class PoolsView(_Model):
    blue: ColorState
    green: ColorState


class StickyView(_Model):
    """Sticky sessions in force (the signing key is never shown)."""

    cookie: str
    max_age: float = Field(description="Seconds a pin lasts.")
    secure: Literal["auto", "always", "never"]
    http_only: bool
    same_site: Literal["Strict", "Lax", "None"]
    on_zero_weight: Literal["follow", "drain"]
    assignments: dict[str, int] = Field(description="New users pinned to each color since start.")


class PreviewView(_Model):
    """Preview routing in force (the token is never shown)."""

    header: str
    cookie: str | None
    allow_from: list[str]
    token_required: bool


class RoutingView(_Model):
    """Routing rules beside the weights; null: off."""

    sticky: StickyView | None
    preview: PreviewView | None


class LastReloadView(_Model):
    """The outcome of the last config reload (SIGHUP or POST /v1/reload)."""

    at: Timestamp
    ok: bool
    errors: list[str] = Field(description="One line per problem: file, field, value. The old config runs on.")
    changed: list[str] = Field(description="Top-level config sections that changed.")
    restart_required: list[str] = Field(description="Changed sections that apply only at the next start.")
    pools: dict[str, list[str]] = Field(description="Colors whose membership the file replaced.")


class StoreView(_Model):
    """Where the switch state lives, and whether changes can be taken now."""

    backend: Literal["file", "etcd", "redis"]
    where: str = Field(description="The file, or the store's address and key prefix (never credentials).")
    status: Literal["ok", "degraded"] = Field(
        description="degraded: the shared store does not answer; traffic is served on the last state "
        "and changes are refused with 503 until it does."
    )
    error: str | None = Field(description="Why it is degraded; null when ok.")
    node: str | None = Field(description="This node's id in the fleet; null for a single instance.")
    revision: int | None = Field(description="The shared store's revision of the state this node runs.")


class FleetWaitView(_Model):
    """With ?wait=all: whether every live node ran the new version before the timeout."""

    version: int
    complete: bool = Field(description="True: every live node runs this version (or a newer one).")
    waited: float = Field(description="Seconds waited.")
    pending: list[str] = Field(description="Live nodes not running it yet when the wait ended.")


class StateView(_Model):
    """The switch state; its version grows by one with every applied change."""

    weights: WeightsView
    active: Color | None = Field(description="The only color with weight > 0; null while both have weight.")
    version: int
    updated_at: Timestamp
    pools: PoolsView
    routing: RoutingView
    last_reload: LastReloadView | None = Field(description="The last config reload; null: none since start.")
    store: StoreView
    fleet: FleetWaitView | None = Field(
        default=None, description="Only in the answer to a change sent with ?wait=all."
    )


class FleetNodeView(_Model):
    """One live node of the fleet, as it last reported itself (every 250 ms)."""

    node: str
    admin: str = Field(description="Its admin API.")
    version: int = Field(description="The switch version it runs.")
    behind: int = Field(description="Versions behind the newest in the store (0: up to date).")
    lag: float | None = Field(
        description="Seconds from the write of the version it runs to its applying it; null if unknown."
    )
    applied_at: Timestamp
    last_seen: Timestamp
    seen_ago: float = Field(description="Seconds since its last report; it is dropped after 3.")
    leader: bool = Field(description="It holds the rollout lease: it drives rollouts.")
    store: Literal["ok", "degraded"]
    started_at: Timestamp
    pid: int


class FleetView(_Model):
    """The nodes sharing this switch; empty for a single instance."""

    store: StoreView
    version: int = Field(description="The newest switch version this node knows.")
    leader: str | None = Field(description="The node holding the rollout lease.")
    nodes: list[FleetNodeView]


class EventView(_Model):
    """One entry of the audit log: a switch, a pool membership change, a reload or a rollout's state.

    The fields after ``reason`` are those of its kind; the others are absent.
    """

    time: Timestamp
    kind: Literal["switch", "pool", "reload", "rollout"]
    actor: str = Field(description='Name of the admin token used, "local" without tokens, or who else acted.')
    reason: str | None
    node: str | None = Field(default=None, description="In a fleet: the node that made the change.")
    version: int | None = Field(default=None, description="switch, pool: the state version it made.")
    from_weights: WeightsView | None = Field(default=None, description="switch")
    to_weights: WeightsView | None = Field(default=None, description="switch")
    color: Color | None = Field(default=None, description="pool")
    added: list[str] | None = Field(default=None, description="pool")
    removed: list[str] | None = Field(default=None, description="pool")
    upstreams: list[str] | None = Field(default=None, description="pool: the list after the change.")
    source: Literal["api", "reload"] | None = Field(default=None, description="pool: who asked.")
    ok: bool | None = Field(default=None, description="reload")
    errors: list[str] | None = Field(default=None, description="reload")
    changed: list[str] | None = Field(default=None, description="reload")
    restart_required: list[str] | None = Field(default=None, description="reload")
    id: str | None = Field(default=None, description="rollout")
    state: str | None = Field(default=None, description="rollout: the state it entered.")
    step: int | None = Field(default=None, description="rollout: the step index; -1 before the first.")
    weight: int | None = Field(default=None, description="rollout: the candidate's percentage then.")
    rule: str | None = Field(default=None, description="rollout: the rule that rolled it back.")


class EventsView(_Model):
    events: list[EventView] = Field(
        description="Oldest first; the newest 1000, read back from events_file at start."
    )


class ColorEvidenceView(_Model):
    """One color's counts at the current step, with its anytime-valid error ratio bounds."""

    requests: int
    errors: int
    error_ratio: float | None
    error_ratio_low: float = Field(description="Lower bound at the rules' confidence.")
    error_ratio_high: float = Field(description="Upper bound at the rules' confidence.")
    p99: float | None = Field(description="Seconds: upper bound of the bucket holding the 99th percentile.")


class EvidenceView(_Model):
    """What a step has shown: the candidate against the threshold and against the stable color."""

    candidate: ColorEvidenceView
    stable: ColorEvidenceView
    threshold: float = Field(description="max_error_ratio.")
    alpha: float = Field(description="False-rollback chance each rule may spend at this step.")
    proven: bool = Field(description="The candidate's error ratio is shown below the threshold.")


class RolloutStepView(_Model):
    index: int
    weight: int = Field(description="Candidate percentage at this step.")
    status: Literal["done", "current", "pending"]
    started_at: Timestamp | None
    ended_at: Timestamp | None
    evidence: EvidenceView | None = Field(description="For a done step, the evidence it ended with.")


class DecisionView(_Model):
    at: Timestamp
    step: int = Field(description="Step index when decided; -1 before the first step.")
    action: str
    reason: str


class RolloutSpecView(_Model):
    """The settings this rollout runs with (config defaults with the request's overrides)."""

    steps: list[int]
    step_pause: float
    min_requests: int
    bake: float
    max_error_ratio: float
    max_error_ratio_increase: float | None
    max_p99: float | None
    max_p99_ratio: float | None
    confidence: float
    require_proof: bool
    on_insufficient_traffic: Literal["wait", "promote", "abort"]
    progress_deadline: float
    gates: list[str] = Field(description="Gate kinds with a webhook: the rollout waits for their answer.")
    gate_interval: float


class RolloutView(_Model):
    """A guarded rollout: where it is, the evidence, and every decision with its reason."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str
    from_: Color = Field(alias="from", description="The stable color.")
    to: Color = Field(description="The candidate color.")
    state: Literal["pending", "running", "waiting", "paused", "baking", "promoted", "rolled_back", "aborted"]
    step: int = Field(description="Index of the current step; -1 while pending.")
    weights: WeightsView = Field(description="Percentages the rollout has set.")
    rule: str | None = Field(description="The rule that rolled it back.")
    paused_by: str | None
    gates_left: list[str] = Field(description="Gates still to pass before the next step.")
    created_at: Timestamp
    updated_at: Timestamp
    actor: str
    reason: str | None
    evidence: EvidenceView | None = Field(description="The current step's evidence so far.")
    steps: list[RolloutStepView]
    decisions: list[DecisionView] = Field(description="Oldest first; the newest 200 are kept.")
    spec: RolloutSpecView


class RolloutsView(_Model):
    rollouts: list[RolloutView] = Field(description="Newest first; the last 20 are kept.")


class ErrorView(_Model):
    """Every error answer: a summary, and one line per problem (for 422, one per bad field)."""

    error: str
    detail: list[str]


class HealthView(_Model):
    status: Literal["alive"]


class ReadyView(_Model):
    ready: bool
    reason: str


# ---------------------------------------------------------------------------------------------- errors

# JSON has objects and integers where YAML has mappings and whole numbers.
_JSON_DIALECT = {
    "int_type": "must be an integer",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
}


def _json_text(value: Any) -> str:
    """The offending value as the client sent it (JSON, not Python repr), cut if long."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 100 else text[:97] + "..."


def error_lines(exc: ValidationError, body: str) -> list[str]:
    """One line per error, like ``weights.blue: must be >= 0 (got -1)``."""
    return [_line(error, body) for error in exc.errors(include_url=False)]


def _line(error: ErrorDetails, body: str) -> str:
    message = describe(error, _JSON_DIALECT)
    where = ".".join([body, *(str(part) for part in error["loc"])])
    if error["type"] == "missing":
        return f"{where}: {message}"
    return f"{where}: {message} (got {_json_text(error['input'])})"


# ---------------------------------------------------------------------------------------------- watch
# The events of GET /v1/watch (text/event-stream), one model per event's JSON ``data``.


class WatchDrainView(_Model):
    """A color draining now: the page shows a countdown to ``deadline``."""

    color: Color
    started_at: Timestamp
    deadline: Timestamp = Field(description="When the streams still open are closed.")


class WatchStateEvent(_Model):
    """``event: state``: sent first, then whenever the switch state, a drain, an upstream's health
    state or the rollout changes (checked every 200 ms)."""

    at: Timestamp = Field(description="Server time when the event was built (for countdowns).")
    state: StateView = Field(description="The same body as GET /v1/state.")
    drains: list[WatchDrainView]
    rollout: RolloutView | None = Field(description="As GET /v1/rollouts/current; null if none has run.")


class WatchSeries(_Model):
    """One color's live answers per interval, oldest first (errors: 5xx or cut by an upstream)."""

    requests: list[int]
    errors: list[int]


class WatchHistoryEvent(_Model):
    """``event: history``: sent once after the first state, the last 5 minutes for the sparklines."""

    at: Timestamp = Field(description="End of the newest interval.")
    interval: float = Field(description="Seconds each point covers.")
    blue: WatchSeries
    green: WatchSeries


class WatchColorCounters(_Model):
    """One color's live traffic, as counted by the data plane (preview requests excluded)."""

    requests: int = Field(description="Live answers in the last interval (the sparkline's newest point).")
    errors: int = Field(description="Of those, errors: 5xx or cut by an upstream.")
    requests_total: int = Field(description="Live answers since the process started.")
    errors_total: int
    in_flight: int = Field(description="Requests being proxied now (previews included).")
    streams: int = Field(description="Open long-lived exchanges.")
    error_window: ErrorWindowView = Field(description="The same window as /v1/state's error_window.")
    p50: float | None = Field(description="Seconds, over the error window (histogram estimate); null: none.")
    p99: float | None
    upstream_health: list[UpstreamView]


class WatchColorsCounters(_Model):
    blue: WatchColorCounters
    green: WatchColorCounters


class WatchEvidenceView(_Model):
    """The running rollout's current step evidence, refreshed every interval."""

    id: str
    evidence: EvidenceView | None


class WatchCountersEvent(_Model):
    """``event: counters``: every second (every ``interval``)."""

    at: Timestamp = Field(description="End of the interval these counts cover.")
    interval: float = Field(description="Seconds since the previous counters event's counts.")
    counted: bool = Field(description="False with metrics.enabled: false: the request counts stay 0.")
    colors: WatchColorsCounters
    rollout: WatchEvidenceView | None = Field(description="Null unless a rollout is running.")
