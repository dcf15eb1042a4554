"""Load, validate and print bgproxy's YAML configuration.

Everything is checked before the proxy binds a socket, and every problem is reported at once, one line
each naming file, field and value, so an operator fixes a broken file in a single pass.
"""

import ipaddress
import itertools
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    PlainValidator,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, core_schema

from .core.address import host_port
from .core.colors import COLORS
from .core.weights import check_some_traffic
from .validation import describe

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "Duration",
    "Forwarding",
    "HealthCheckConfig",
    "HostPort",
    "Limits",
    "LoggingConfig",
    "MetricsConfig",
    "OutlierConfig",
    "PoolConfig",
    "Pools",
    "PreviewConfig",
    "RolloutConfig",
    "StickyConfig",
    "Timeouts",
    "WebhookConfig",
    "WeightsConfig",
    "dump_config",
    "load_config",
    "parse_duration",
]

# ---------------------------------------------------------------------------------------------- addresses


class HostPort(NamedTuple):
    """A socket address; a tuple so it is hashable and unpacks straight into ``open_connection(*hp)``."""

    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)

    @classmethod
    def parse(cls, text: str, what: str = "address") -> "HostPort":
        """Parse ``host:port`` or ``[v6]:port``; ``what`` names the thing in the 'has no port' message."""
        text = text.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep:
                raise ValueError("IPv6 address is missing its closing ]")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError("not an IPv6 address inside [ ]") from None
            if not rest:
                raise ValueError(f"{what} has no port")
            if not rest.startswith(":"):
                raise ValueError("expected :port after ]")
            port_text = rest[1:]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise ValueError(f"{what} has no port")
            if ":" in host:
                raise ValueError("IPv6 addresses need brackets, like [::1]:8080")
            if not host:
                raise ValueError("host is empty")
            if any(c.isspace() or c in "[]/" for c in host):
                raise ValueError("not a host name or IP address")
        if not port_text.isascii() or not port_text.isdigit():
            raise ValueError("port is not a number")
        port = int(port_text)
        if port > 65535:
            raise ValueError("port must be 0..65535")
        return cls(host, port)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        """Validate from a string at the field itself, so errors name the field, not a sub-field."""

        def validate(value: Any, info: core_schema.ValidationInfo) -> HostPort:
            if isinstance(value, HostPort):
                return value
            if not isinstance(value, str):
                raise ValueError("must be a host:port string like 127.0.0.1:8080")
            return cls.parse(value, "upstream" if info.field_name == "upstreams" else "address")

        return core_schema.with_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="json")
        )


def _parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Strict parsing: ``10.0.0.1/8`` is refused because its host bits suggest a typo."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a CIDR string like 10.0.0.0/8")
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError as exc:
        if "host bits set" in str(exc):
            raise ValueError("has host bits set; write the network address, like 10.0.0.0/8") from None
        raise ValueError("not a network like 10.0.0.0/8, 192.0.2.7 or ::1/128") from None


Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    PlainValidator(_parse_network),
    PlainSerializer(str, when_used="json"),
]

# ---------------------------------------------------------------------------------------------- durations

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600}
_DURATION_HINT = "not a duration like 30, 30s, 250ms, 2m"


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``"30s"``, ``"250ms"``, ``"2m"``, ``"1h"``; also used for admin API arguments."""
    if isinstance(value, bool):  # YAML turns `yes`/`on` into True, which is no duration
        raise ValueError(_DURATION_HINT)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.strip())):
        number, unit = float(match[1]), match[2] or "s"
        # Dividing keeps "300ms" at exactly 0.3; multiplying by 0.001 would not.
        seconds = number / 1000 if unit == "ms" else number * _SECONDS_PER_UNIT[unit]
    else:
        raise ValueError(_DURATION_HINT)
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration")
    if seconds <= 0:
        raise ValueError("must be > 0")
    return seconds


Duration = Annotated[float, PlainValidator(parse_duration)]

# ---------------------------------------------------------------------------------------------- models


class _Section(BaseModel):
    """Common settings: typos are errors, and a loaded config cannot be changed behind the proxy's back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        """A section whose keys are all commented out is YAML null; treat it as 'all defaults'."""
        return {} if data is None else data


_TOKEN_RE = re.compile(r"[!-~]{16,}")  # printable ASCII, no spaces: it travels in an HTTP header


def _check_token(token: str) -> str:
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError("token must be at least 16 printable ASCII characters without spaces")
    return token


class AdminConfig(_Section):
    listen: HostPort = HostPort("127.0.0.1", 9901)
    tokens: dict[str, Annotated[str, AfterValidator(_check_token)]] = Field(default_factory=dict)

    @field_validator("tokens")
    @classmethod
    def _names_not_empty(cls, tokens: dict[str, str]) -> dict[str, str]:
        if any(not name.strip() for name in tokens):
            raise ValueError("token names must not be empty")
        return tokens


_STATUS_RE = re.compile(r"(\d{3})(?:\s*-\s*(\d{3}))?")


def _status_range(spec: str) -> tuple[int, int]:
    """``"200-399"`` -> (200, 399); ``"204"`` -> (204, 204)."""
    match = _STATUS_RE.fullmatch(spec.strip())
    if not match:
        raise ValueError("not a status or range like 200 or 200-399")
    low = int(match[1])
    high = int(match[2] or low)
    if not 100 <= low <= high <= 599:
        raise ValueError("must be statuses 100..599 with the lower one first")
    return low, high


class HealthCheckConfig(_Section):
    path: str = "/healthz"
    interval: Duration = 2.0
    timeout: Duration = 1.0
    healthy_threshold: StrictInt = Field(default=2, ge=1)
    unhealthy_threshold: StrictInt = Field(default=3, ge=1)
    expected_status: str = "200-399"

    @field_validator("path")
    @classmethod
    def _path_is_absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with /")
        return path

    @field_validator("expected_status", mode="before")
    @classmethod
    def _status_spec(cls, value: Any) -> Any:
        """YAML reads ``expected_status: 200`` as an int; accept it as the one-status range."""
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            _status_range(value)
        return value

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> Self:
        """A probe outliving its interval would overlap the next one."""
        if self.timeout > self.interval:
            raise ValueError("timeout must not exceed interval")
        return self

    def accepts(self, status: int) -> bool:
        """Whether an HTTP status from the health endpoint counts as healthy."""
        low, high = _status_range(self.expected_status)
        return low <= status <= high


class OutlierConfig(_Section):
    consecutive_failures: StrictInt = Field(default=5, ge=1)
    base_ejection_time: Duration = 30.0
    max_ejection_time: Duration = 300.0
    max_ejection_percent: StrictInt = Field(default=50, ge=0, le=100)

    @model_validator(mode="after")
    def _base_within_max(self) -> Self:
        if self.base_ejection_time > self.max_ejection_time:
            raise ValueError("base_ejection_time must not exceed max_ejection_time")
        return self


class PoolConfig(_Section):
    upstreams: list[HostPort]
    balance: Literal["round_robin", "least_outstanding"] = "round_robin"
    max_idle_per_upstream: StrictInt = Field(default=64, ge=0)
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)


class Pools(_Section):
    blue: PoolConfig
    green: PoolConfig

    def get(self, color: str) -> PoolConfig:
        """The pool of ``color``; ValueError for anything but blue or green."""
        if color == "blue":
            return self.blue
        if color == "green":
            return self.green
        raise ValueError(f"unknown color {color!r}: expected one of {', '.join(COLORS)}")


class WeightsConfig(_Section):
    blue: StrictInt = Field(default=100, ge=0)
    green: StrictInt = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _someone_gets_traffic(self) -> Self:
        check_some_traffic(self.blue, self.green)
        return self


class Timeouts(_Section):
    connect: Duration = 2.0
    upstream_header: Duration = 30.0
    client_header: Duration = 10.0
    idle: Duration = 60.0
    upstream_idle: Duration = 20.0
    stream_idle: Duration | None = 300.0
    client_send: Duration | None = 60.0
    tunnel: Duration | None = 3600.0


class Limits(_Section):
    max_header_bytes: StrictInt = Field(default=65536, ge=1024, le=1048576)
    max_connections: StrictInt = Field(default=10000, ge=1)
    max_body_bytes: StrictInt | None = Field(default=None, ge=0)


_TOKEN_CHARS_RE = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")  # RFC 9110 tchar


def _header_name(name: str) -> str:
    if not _TOKEN_CHARS_RE.fullmatch(name):
        raise ValueError("must be a header name: letters, digits and !#$%&'*+-.^_`|~")
    return name


class Forwarding(_Section):
    trusted_proxies: list[Network] = Field(default_factory=list)
    via: str = "bgproxy"

    @field_validator("via")
    @classmethod
    def _via_is_token(cls, via: str) -> str:
        if not _TOKEN_CHARS_RE.fullmatch(via):
            raise ValueError("must be an HTTP token: letters, digits and !#$%&'*+-.^_`|~")
        return via


class LoggingConfig(_Section):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False


_COOKIE_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 6265 cookie-name: a token


def _cookie_name(name: str) -> str:
    if not _COOKIE_NAME_RE.fullmatch(name):
        raise ValueError("must be a cookie name: letters, digits and !#$%&'*+-.^_`|~")
    return name


def _secret_key(key: str) -> str:
    if len(key.encode()) < 16:
        raise ValueError("must be at least 16 bytes: it signs the cookies")
    return key


CookieName = Annotated[str, AfterValidator(_cookie_name)]


class StickyConfig(_Section):
    """Sticky sessions during a split: a signed cookie pins each user to the color first assigned."""

    cookie: CookieName = "bgproxy-color"
    max_age: Duration = 3600.0
    secure: Literal["auto", "always", "never"] = "auto"
    http_only: bool = True
    same_site: Literal["Strict", "Lax", "None"] = "Lax"
    on_zero_weight: Literal["follow", "drain"] = "follow"
    key: Annotated[str, AfterValidator(_secret_key)] | None = None


_DEFAULT_PREVIEW_NETWORKS = ["127.0.0.0/8", "::1/128"]


class PreviewConfig(_Section):
    """Preview routing: a request naming a color, from an allowed network, goes to that color."""

    header: Annotated[str, AfterValidator(_header_name)] = "X-Bgproxy-Color"
    cookie: CookieName | None = "bgproxy-preview"
    allow_from: list[Network] = Field(
        default_factory=lambda: [ipaddress.ip_network(n) for n in _DEFAULT_PREVIEW_NETWORKS]
    )
    token: Annotated[str, AfterValidator(_check_token)] | None = None


_DEFAULT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class MetricsConfig(_Section):
    enabled: bool = True
    error_window: Duration = 60.0
    latency_buckets: list[float] = Field(default_factory=lambda: list(_DEFAULT_BUCKETS))

    @field_validator("latency_buckets")
    @classmethod
    def _increasing(cls, buckets: list[float]) -> list[float]:
        if not buckets:
            raise ValueError("must list at least one bucket")
        if buckets[0] <= 0 or not all(math.isfinite(b) for b in buckets):
            raise ValueError("buckets must be finite and > 0")
        if any(a >= b for a, b in itertools.pairwise(buckets)):
            raise ValueError("buckets must be strictly increasing")
        return buckets


def _non_negative_duration(value: object) -> float:
    """Like a Duration, but 0 is allowed (``bake: 0`` means no bake)."""
    if value == 0 or value in ("0", "0s", "0ms"):
        return 0.0
    return parse_duration(value)


NonNegativeDuration = Annotated[float, PlainValidator(_non_negative_duration)]
Ratio = Annotated[float, Field(gt=0, lt=1)]


def _error_status(value: Any) -> str:
    """``500``, ``"5xx"`` or ``"500-504"``: one status, a class, or a range."""
    text = str(value).strip() if isinstance(value, int | str) and not isinstance(value, bool) else None
    if text is None:
        raise ValueError("must be a status like 500, a class like 5xx or a range like 500-504")
    if re.fullmatch(r"[1-5]xx", text):
        return text
    _status_range(text)
    return text


def status_matches(specs: "list[str]", status: int) -> bool:
    """Whether ``status`` is one of ``error_statuses``."""
    for spec in specs:
        if spec.endswith("xx"):
            if status // 100 == int(spec[0]):
                return True
        else:
            low, high = _status_range(spec)
            if low <= status <= high:
                return True
    return False


class WebhookConfig(_Section):
    """A gate or notice a rollout calls (as Flagger's webhooks)."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    type: Literal["pre_rollout", "step", "confirm_promotion", "post_rollout", "rollback", "event"]
    url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$")]
    timeout: Duration = 5.0
    retries: StrictInt = Field(default=2, ge=0, le=10)
    on_failure: Literal["abort", "pause"] = "abort"
    interval: Duration = 10.0
    secret: Annotated[str, AfterValidator(_secret_key)] | None = Field(default=None, repr=False)


class RolloutConfig(_Section):
    """Defaults of every guarded rollout; each field can be overridden per rollout in the API."""

    steps: list[StrictInt] = Field(default_factory=lambda: [5, 25, 50, 100])
    step_pause: Duration = 30.0
    min_requests: StrictInt = Field(default=200, ge=0)
    bake: NonNegativeDuration = 300.0
    max_error_ratio: Ratio = 0.005
    max_error_ratio_increase: Ratio | None = 0.005
    max_p99: Duration | None = None
    max_p99_ratio: Annotated[float, Field(ge=1)] | None = None
    confidence: Annotated[float, Field(ge=0.5, lt=1)] = 0.99
    require_proof: bool = False
    on_insufficient_traffic: Literal["wait", "promote", "abort"] = "wait"
    progress_deadline: Duration = 600.0
    error_statuses: list[Annotated[str, PlainValidator(_error_status)]] = Field(
        default_factory=lambda: ["5xx"]
    )
    webhooks: list[WebhookConfig] = Field(default_factory=list)

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 1 <= s <= 100 for s in steps):
            raise ValueError("must be a non-empty list of percentages 1..100")
        if any(a >= b for a, b in itertools.pairwise(steps)) or steps[-1] != 100:
            raise ValueError("must increase and end at 100, like [5, 25, 50, 100]")
        return steps

    @field_validator("webhooks")
    @classmethod
    def _unique_names(cls, hooks: list[WebhookConfig]) -> list[WebhookConfig]:
        names = [h.name for h in hooks]
        if len(set(names)) != len(names):
            raise ValueError("webhook names must be unique")
        return hooks


_NODE_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")


def _check_node_name(name: str) -> str:
    if not _NODE_NAME.fullmatch(name):
        raise ValueError("must be 1 to 200 letters, digits or _.:@- (it names the node in the store's keys)")
    return name


NodeName = Annotated[str, AfterValidator(_check_node_name)]
STORE_SCHEMES = ("file", "etcd", "etcds", "redis", "rediss")


def _check_store_url(url: str) -> str:
    """``state_store``: where the switch state lives; a fleet shares one etcd or Redis document."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in STORE_SCHEMES:
        raise ValueError(
            "must start with file://, etcd://, etcds://, redis:// or rediss:// "
            "(e.g. redis://127.0.0.1:6379/0?prefix=bgproxy:prod)"
        )
    if parts.username or parts.password:
        raise ValueError(
            "must not hold credentials (they would show in logs and state): "
            "set BGPROXY_STORE_USERNAME and BGPROXY_STORE_PASSWORD instead"
        )
    if parts.scheme == "file":
        if not (parts.netloc + parts.path).strip("/"):
            raise ValueError("file:// needs a path, e.g. file://./bgproxy-state.json")
    elif not parts.hostname:
        raise ValueError(f"{parts.scheme}:// needs a host, e.g. {parts.scheme}://127.0.0.1")
    elif parts.scheme.startswith("redis") and not re.fullmatch(r"/?\d*", parts.path):
        raise ValueError("the path of a redis:// URL is the database number, e.g. redis://127.0.0.1:6379/0")
    return url


class StoreTLSConfig(_Section):
    """``state_store_tls``: verify the store with ``ca_file``; present ``cert_file``/``key_file``."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _cert_with_key(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class Config(_Section):
    listen: HostPort = HostPort("127.0.0.1", 8080)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    pools: Pools
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    drain_timeout: Duration = 30.0
    shutdown_timeout: Duration = 30.0
    flip_probe: Literal["http", "tcp", "off"] = "http"
    state_file: Path = Path("bgproxy-state.json")
    # A fleet's shared switch (etcd:// or redis://); state_file is then this node's last-known-good copy.
    state_store: Annotated[str, AfterValidator(_check_store_url)] | None = None
    state_store_tls: StoreTLSConfig | None = None
    node_name: NodeName | None = None  # a fleet node's id; default: hostname:admin-port
    events_file: Path | None = None
    runtime_socket: Path | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    limits: Limits = Field(default_factory=Limits)
    forwarding: Forwarding = Field(default_factory=Forwarding)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    sticky: StickyConfig | None = None
    preview: PreviewConfig | None = None
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)

    @model_validator(mode="after")
    def _p99_within_buckets(self) -> Self:
        """A max_p99 past the last latency bucket could never be shown exceeded."""
        top = self.metrics.latency_buckets[-1]
        limit = self.rollout.max_p99
        if limit is not None and limit > top:
            raise ValueError(
                f"rollout.max_p99 must be at most the last metrics.latency_buckets bound, {top:g}s "
                f"(got {limit:g})"
            )
        return self


# ---------------------------------------------------------------------------------------------- loading


class ConfigError(Exception):
    """Every problem found in a config, one line each, so all of them can be fixed at once."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML silently keeps the last of two equal keys; a second ``weights:`` would go unnoticed."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: construct_mapping below reports it properly
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)

_SECRET_TOKENS_LOC = ("admin", "tokens")
_SECRET_LOCS = (("sticky", "key"), ("preview", "token"))
# Secrets a variable may set inside a section the file enables (the variable alone enables nothing).
_SECRET_ENV = (("sticky", "key", "BGPROXY_STICKY_KEY"), ("preview", "token", "BGPROXY_PREVIEW_TOKEN"))


def _got(value: Any, secret: bool = False) -> str:
    """The offending value for an error line; secrets show only their length, long values are cut."""
    if secret and isinstance(value, str):
        return f"<secret, {len(value)} characters>"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _env_overrides(
    raw: dict[Any, Any], environ: Mapping[str, str]
) -> tuple[dict[tuple[str, ...], str], list[str]]:
    """Apply BGPROXY_* variables to the raw mapping before validation, so their errors can name them.

    Returns which field paths came from which variable (as it is to be named in error lines), and the
    problems found parsing the variables.
    Empty variables count as unset: CI systems often define a variable with no value.
    """
    origin: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for section, key, variable in _SECRET_ENV:
        value = environ.get(variable)
        target = raw.get(section)
        if value and isinstance(target, dict):
            target[key] = value
            origin[(section, key)] = variable
    if listen := environ.get("BGPROXY_LISTEN"):
        raw["listen"] = listen
        origin[("listen",)] = "BGPROXY_LISTEN"

    admin_listen = environ.get("BGPROXY_ADMIN_LISTEN")
    new_tokens: dict[str, tuple[str, str]] = {}  # name -> (token, variable)
    for number, entry in enumerate((environ.get("BGPROXY_ADMIN_TOKENS") or "").split(","), 1):
        if not entry.strip():
            continue
        name, sep, token = entry.strip().partition("=")
        if not sep or not name.strip():
            problems.append(
                f"env BGPROXY_ADMIN_TOKENS: entry {number} is not name=token (got {_got(entry, secret=True)})"
            )
        else:
            new_tokens[name.strip()] = (token.strip(), "BGPROXY_ADMIN_TOKENS")
    if single := environ.get("BGPROXY_ADMIN_TOKEN"):
        new_tokens["env"] = (single, "BGPROXY_ADMIN_TOKEN")
    if not admin_listen and not new_tokens:
        return origin, problems

    admin = raw.get("admin")
    if admin is None:
        admin = raw["admin"] = {}
    if not isinstance(admin, dict):  # validation reports the bad section; nothing to merge into
        return origin, problems
    if admin_listen:
        admin["listen"] = admin_listen
        origin[("admin", "listen")] = "BGPROXY_ADMIN_LISTEN"
    if new_tokens:
        tokens = admin.get("tokens")
        if tokens is None:
            tokens = admin["tokens"] = {}
        if isinstance(tokens, dict):
            for name, (token, variable) in new_tokens.items():
                tokens[name] = token
                # Several tokens share one variable: say which entry is wrong.
                label = f"{variable}: {name}" if variable == "BGPROXY_ADMIN_TOKENS" else variable
                origin[("admin", "tokens", name)] = label
    return origin, problems


def _problem_line(path: str, error: ErrorDetails, origin: Mapping[tuple[str, ...], str]) -> str:
    loc = tuple(str(part) for part in error["loc"])
    message = describe(error)
    webhook_secret = loc[:2] == ("rollout", "webhooks") and loc[-1] == "secret"
    # A store URL with user:password@ is refused, and must not be echoed either.
    store_credentials = loc == ("state_store",) and "@" in str(error["input"])
    secret = (
        (loc[:2] == _SECRET_TOKENS_LOC and len(loc) == 3)
        or loc in _SECRET_LOCS
        or webhook_secret
        or store_credentials
    )
    got = "" if error["type"] == "missing" else f" (got {_got(error['input'], secret)})"
    for prefix, variable in origin.items():
        if loc[: len(prefix)] == prefix:
            return f"env {variable}: {message}{got}"
    where = ".".join(loc) or "top level"
    return f"{path}: {where}: {message}{got}"


def _read_yaml(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = ": ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError([f"{path}: {where}{what}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {' '.join(str(exc).split())}"]) from None


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment and validate a config file; ConfigError lists every problem.

    A relative ``state_file`` (``events_file``, ``runtime_socket``) is resolved against the config
    file's directory, so the proxy finds the same state whatever directory it is started from.
    """
    name = os.fspath(path)
    raw = _read_yaml(name)
    if raw is None:  # an empty file: let validation say what is required
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{name}: top level must be a mapping of settings (got {_got(raw)})"])
    origin, problems = _env_overrides(raw, os.environ if environ is None else environ)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems += [_problem_line(name, error, origin) for error in exc.errors(include_url=False)]
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    here = Path(name).resolve().parent
    state_file = config.state_file
    store = urlsplit(config.state_store or "")
    if store.scheme == "file":
        from_url = Path(store.netloc + store.path)
        if "state_file" in config.model_fields_set and from_url != state_file:
            raise ConfigError(
                [
                    f"{name}: state_store: names {from_url} but state_file names {state_file}; "
                    f"keep one of them (got {config.state_store!r})"
                ]
            )
        state_file = from_url
    state_file = state_file if state_file.is_absolute() else here / state_file
    events_file = config.events_file or state_file.with_name(state_file.stem + ".events.jsonl")
    runtime_socket = config.runtime_socket
    if runtime_socket is not None and not runtime_socket.is_absolute():
        runtime_socket = here / runtime_socket
    return config.model_copy(
        update={
            "state_file": state_file,
            "events_file": events_file if events_file.is_absolute() else here / events_file,
            "runtime_socket": runtime_socket,
        }
    )


def dump_config(cfg: Config) -> str:
    """The normalized config as YAML (seconds, address strings, secrets as ``***``) for check-config."""
    data = cfg.model_dump(mode="json")
    data["admin"]["tokens"] = dict.fromkeys(data["admin"]["tokens"], "***")
    for section, key in _SECRET_LOCS:
        if data.get(section) and data[section].get(key) is not None:
            data[section][key] = "***"
    for hook in data["rollout"]["webhooks"]:
        if hook["secret"] is not None:
            hook["secret"] = "***"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
