"""Config loading: the shipped file, every error path as the operator sees it, env overrides, dumping."""

import ipaddress
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from bgproxy.config import (
    Config,
    ConfigError,
    Forwarding,
    HealthCheckConfig,
    HostPort,
    Limits,
    LoggingConfig,
    MetricsConfig,
    OutlierConfig,
    Timeouts,
    dump_config,
    load_config,
    parse_duration,
)

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "bgproxy.yaml"
POOLS = "pools: {blue: {upstreams: ['127.0.0.1:9001']}, green: {upstreams: []}}\n"
TOKEN_A = "a" * 16 + "-secret-ci"
TOKEN_B = "b" * 16 + "-secret-ops"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bgproxy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if environ is None else environ)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_shipped_config_loads_with_documented_values() -> None:
    cfg = load_config(SHIPPED, environ={})
    assert cfg.listen == HostPort("127.0.0.1", 8080)
    assert cfg.admin.listen == HostPort("127.0.0.1", 9901)
    assert cfg.pools.blue.upstreams == [HostPort("127.0.0.1", 9001), HostPort("127.0.0.1", 9003)]
    assert cfg.pools.get("green").upstreams == [HostPort("127.0.0.1", 9002)]
    assert (cfg.weights.blue, cfg.weights.green) == (100, 0)
    assert cfg.drain_timeout == 30.0
    assert cfg.state_file == SHIPPED.parent / "bgproxy-state.json"
    assert cfg.pools.blue.health_check is None
    # The remaining sections spell out the defaults; a drifted value in the file would show here.
    assert cfg.timeouts == Timeouts()
    assert cfg.limits == Limits()
    assert cfg.forwarding == Forwarding()
    assert cfg.logging == LoggingConfig()
    assert cfg.metrics == MetricsConfig()
    assert cfg.pools.blue.outlier == OutlierConfig()


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                names |= _field_names(arg)
    return names


def test_shipped_config_mentions_every_field() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    missing = {name for name in _field_names(Config) if not re.search(rf"^\s*#?\s*{name}:", text, re.M)}
    assert missing == set()


BAD_CASES = {
    "unknown top-level key": (POOLS + "bogus: 1\n", ["bogus: unknown key (got 1)"]),
    "unknown nested key": (
        "pools: {blue: {upstreams: [], wieght: 5}, green: {upstreams: []}}\n",
        ["pools.blue.wieght: unknown key (got 5)"],
    ),
    "upstream without port": (
        "pools: {blue: {upstreams: ['127.0.0.1:9001', localhost]}, green: {upstreams: []}}\n",
        ["pools.blue.upstreams.1: upstream has no port (got 'localhost')"],
    ),
    "IPv6 without brackets": (
        "pools: {blue: {upstreams: ['::1:9001']}, green: {upstreams: []}}\n",
        ["pools.blue.upstreams.0: IPv6 addresses need brackets, like [::1]:8080 (got '::1:9001')"],
    ),
    "port out of range": (
        POOLS + "listen: 127.0.0.1:70000\n",
        ["listen: port must be 0..65535 (got '127.0.0.1:70000')"],
    ),
    "listen not a string": (
        POOLS + "listen: 8080\n",
        ["listen: must be a host:port string like 127.0.0.1:8080 (got 8080)"],
    ),
    "negative weight": (
        POOLS + "weights: {blue: 100, green: -1}\n",
        ["weights.green: must be >= 0 (got -1)"],
    ),
    "both weights 0": (
        POOLS + "weights: {blue: 0, green: 0}\n",
        ["weights: at least one color needs a weight > 0 (got {'blue': 0, 'green': 0})"],
    ),
    "unparseable duration": (
        POOLS + "timeouts: {connect: 30x}\n",
        ["timeouts.connect: not a duration like 30, 30s, 250ms, 2m (got '30x')"],
    ),
    "zero duration": (POOLS + "drain_timeout: 0s\n", ["drain_timeout: must be > 0 (got '0s')"]),
    "header limit too small": (
        POOLS + "limits: {max_header_bytes: 100}\n",
        ["limits.max_header_bytes: must be >= 1024 (got 100)"],
    ),
    "bad trusted_proxies CIDR": (
        POOLS + "forwarding: {trusted_proxies: [10.0.0.0/8, 10.0.0.0/33]}\n",
        [
            "forwarding.trusted_proxies.1: not a network like 10.0.0.0/8, 192.0.2.7 or ::1/128"
            " (got '10.0.0.0/33')"
        ],
    ),
    "trusted_proxies with host bits": (
        POOLS + "forwarding: {trusted_proxies: [10.0.0.1/8]}\n",
        [
            "forwarding.trusted_proxies.0: has host bits set; write the network address, like 10.0.0.0/8"
            " (got '10.0.0.1/8')"
        ],
    ),
    "bad via token": (
        POOLS + "forwarding: {via: 'my proxy'}\n",
        ["forwarding.via: must be an HTTP token: letters, digits and !#$%&'*+-.^_`|~ (got 'my proxy')"],
    ),
    "bad balance": (
        "pools: {blue: {upstreams: [], balance: random}, green: {upstreams: []}}\n",
        ["pools.blue.balance: must be 'round_robin' or 'least_outstanding' (got 'random')"],
    ),
    "bad health check": (
        "pools: {blue: {upstreams: [], health_check: {path: healthz, expected_status: 2xx}},"
        " green: {upstreams: []}}\n",
        [
            "pools.blue.health_check.path: must start with / (got 'healthz')",
            "pools.blue.health_check.expected_status: not a status or range like 200 or 200-399 (got '2xx')",
        ],
    ),
    "buckets not increasing": (
        POOLS + "metrics: {latency_buckets: [0.1, 0.1, 1]}\n",
        ["metrics.latency_buckets: buckets must be strictly increasing (got [0.1, 0.1, 1])"],
    ),
    "short token is not echoed": (
        POOLS + "admin: {tokens: {ci: hunter2}}\n",
        [
            "admin.tokens.ci: token must be at least 16 printable ASCII characters without spaces"
            " (got <secret, 7 characters>)"
        ],
    ),
    "unknown store scheme": (
        POOLS + "state_store: 'consul://127.0.0.1:8500'\n",
        [
            "state_store: must start with file://, etcd://, etcds://, redis:// or rediss:// "
            "(e.g. redis://127.0.0.1:6379/0?prefix=bgproxy:prod) (got 'consul://127.0.0.1:8500')"
        ],
    ),
    "credentials in the store URL are not echoed": (
        POOLS + "state_store: 'redis://ops:hunter2@127.0.0.1:6379/0'\n",
        [
            "state_store: must not hold credentials (they would show in logs and state): set "
            "BGPROXY_STORE_USERNAME and BGPROXY_STORE_PASSWORD instead (got <secret, 36 characters>)"
        ],
    ),
    "store without a host": (
        POOLS + "state_store: 'etcd:///bgproxy/'\n",
        ["state_store: etcd:// needs a host, e.g. etcd://127.0.0.1 (got 'etcd:///bgproxy/')"],
    ),
    "redis database not a number": (
        POOLS + "state_store: 'redis://127.0.0.1:6379/prod'\n",
        [
            "state_store: the path of a redis:// URL is the database number, e.g. redis://127.0.0.1:6379/0"
            " (got 'redis://127.0.0.1:6379/prod')"
        ],
    ),
    "store port out of range": (
        POOLS + "state_store: 'redis://127.0.0.1:99999/0'\n",
        ["state_store: not a URL: Port out of range 0-65535 (got 'redis://127.0.0.1:99999/0')"],
    ),
    "client cert without its key": (
        POOLS + "state_store_tls: {cert_file: /etc/bgproxy/node.pem}\n",
        ["state_store_tls: cert_file and key_file go together (got {'cert_file': '/etc/bgproxy/node.pem'})"],
    ),
    "bad node name": (
        POOLS + "node_name: 'edge 1'\n",
        [
            "node_name: must be 1 to 200 letters, digits or _.:@- (it names the node in the store's keys)"
            " (got 'edge 1')"
        ],
    ),
    "missing pool": ("pools: {blue: {upstreams: []}}\n", ["pools.green: required"]),
    "empty file": ("", ["pools: required"]),
    "non-mapping top level": (
        "- 127.0.0.1:9001\n",
        ["top level must be a mapping of settings (got ['127.0.0.1:9001'])"],
    ),
    "bad YAML": (
        POOLS + "weights: {blue: 1\n",
        ["line 3, column 1: while parsing a flow mapping: expected ',' or '}', but got '<stream end>'"],
    ),
    "duplicate key": (
        POOLS + "weights: {blue: 1}\nweights: {green: 1}\n",
        ["line 3, column 1: duplicate key 'weights'"],
    ),
}


@pytest.mark.parametrize(("text", "expected"), BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_config_reports_file_field_and_value(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text)
    assert problems(path) == [f"{path}: {line}" for line in expected]


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "pools: {blue: {upstreams: [localhost]}, green: {upstreams: [], extra: 1}}\n"
        "weights: {blue: -1}\n"
        "timeouts: {idle: soon}\n"
        "typo: true\n",
    )
    assert problems(path) == [
        f"{path}: pools.blue.upstreams.0: upstream has no port (got 'localhost')",
        f"{path}: pools.green.extra: unknown key (got 1)",
        f"{path}: weights.blue: must be >= 0 (got -1)",
        f"{path}: timeouts.idle: not a duration like 30, 30s, 250ms, 2m (got 'soon')",
        f"{path}: typo: unknown key (got True)",
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert problems(path) == [f"{path}: cannot read config file: No such file or directory"]


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("30", 30.0),
        ("'30'", 30.0),
        ("30s", 30.0),
        ("250ms", 0.25),
        ("300ms", 0.3),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
    ],
)
def test_duration_forms(tmp_path: Path, written: str, seconds: float) -> None:
    cfg = load_config(write(tmp_path, POOLS + f"drain_timeout: {written}\n"), environ={})
    assert cfg.drain_timeout == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "not a duration like 30, 30s, 250ms, 2m"),
        ("", "not a duration like 30, 30s, 250ms, 2m"),
        ("-1s", "not a duration like 30, 30s, 250ms, 2m"),
        ("1d", "not a duration like 30, 30s, 250ms, 2m"),
        ("0ms", "must be > 0"),
        (-1, "must be > 0"),
        (float("inf"), "must be a finite duration"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "host", "port", "canonical"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
        ("localhost:9001", "localhost", 9001, "localhost:9001"),
        ("[::1]:8080", "::1", 8080, "[::1]:8080"),
        (" 127.0.0.1:0 ", "127.0.0.1", 0, "127.0.0.1:0"),
    ],
)
def test_host_port_forms(tmp_path: Path, text: str, host: str, port: int, canonical: str) -> None:
    cfg = load_config(write(tmp_path, POOLS + f"listen: '{text}'\n"), environ={})
    assert cfg.listen == HostPort(host, port)
    assert str(cfg.listen) == canonical
    assert len({cfg.listen, HostPort(host, port)}) == 1


@pytest.mark.parametrize(
    ("spec", "accepted", "refused"),
    [("200-399", [200, 302, 399], [199, 400, 503]), ("204", [204], [200, 205]), (200, [200], [201])],
)
def test_expected_status(spec: object, accepted: list[int], refused: list[int]) -> None:
    check = HealthCheckConfig.model_validate({"expected_status": spec})
    assert [check.accepts(s) for s in accepted + refused] == [True] * len(accepted) + [False] * len(refused)


def test_color_lookup() -> None:
    cfg = load_config(SHIPPED, environ={})
    assert cfg.pools.get("blue") is cfg.pools.blue
    assert cfg.pools.get("green") is cfg.pools.green
    with pytest.raises(ValueError, match="unknown color 'red'"):
        cfg.pools.get("red")


def test_relative_state_file_follows_config_dir(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    relative = load_config(write(tmp_path / "etc", POOLS + "state_file: state/s.json\n"), environ={})
    assert relative.state_file == tmp_path / "etc" / "state" / "s.json"
    absolute = load_config(write(tmp_path, POOLS + f"state_file: {tmp_path / 'x.json'}\n"), environ={})
    assert absolute.state_file == tmp_path / "x.json"


def test_state_store_file_url_is_the_state_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, POOLS + "state_store: file://./s/state.json\n"), environ={})
    assert cfg.state_file == tmp_path / "s" / "state.json"
    both = write(tmp_path, POOLS + "state_store: file://./a.json\nstate_file: ./b.json\n")
    assert problems(both) == [
        f"{both}: state_store: names a.json but state_file names b.json; keep one of them "
        "(got 'file://./a.json')"
    ]
    fleet = load_config(
        write(tmp_path, POOLS + "state_store: etcd://10.0.0.9:2379/bgproxy/prod/\n"), environ={}
    )
    assert fleet.state_store == "etcd://10.0.0.9:2379/bgproxy/prod/"
    assert fleet.state_file == tmp_path / "bgproxy-state.json"  # the node's last-known-good copy


def test_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, POOLS + f"admin: {{tokens: {{file: {TOKEN_A}}}}}\n")
    cfg = load_config(
        path,
        environ={
            "BGPROXY_LISTEN": "[::1]:18080",
            "BGPROXY_ADMIN_LISTEN": "0.0.0.0:19901",
            "BGPROXY_ADMIN_TOKEN": TOKEN_B,
            "BGPROXY_ADMIN_TOKENS": f" ci={TOKEN_A} , ops={TOKEN_B},",
        },
    )
    assert cfg.listen == HostPort("::1", 18080)
    assert cfg.admin.listen == HostPort("0.0.0.0", 19901)
    assert cfg.admin.tokens == {"file": TOKEN_A, "env": TOKEN_B, "ci": TOKEN_A, "ops": TOKEN_B}


def test_env_defaults_to_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGPROXY_LISTEN", "127.0.0.1:18081")
    monkeypatch.setenv("BGPROXY_ADMIN_TOKEN", "")  # defined but empty counts as unset
    cfg = load_config(write(tmp_path, POOLS))
    assert cfg.listen == HostPort("127.0.0.1", 18081)
    assert cfg.admin.tokens == {}


def test_env_problems_name_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, POOLS + "weights: {blue: 0, green: 0}\n")
    environ = {
        "BGPROXY_LISTEN": "localhost",
        "BGPROXY_ADMIN_LISTEN": "127.0.0.1:x",
        "BGPROXY_ADMIN_TOKEN": "short",
        "BGPROXY_ADMIN_TOKENS": f"ci={TOKEN_A},{TOKEN_B},ops=tiny",
    }
    rule = "token must be at least 16 printable ASCII characters without spaces"
    assert problems(path, environ) == [
        f"env BGPROXY_ADMIN_TOKENS: entry 2 is not name=token (got <secret, {len(TOKEN_B)} characters>)",
        "env BGPROXY_LISTEN: address has no port (got 'localhost')",
        "env BGPROXY_ADMIN_LISTEN: port is not a number (got '127.0.0.1:x')",
        f"env BGPROXY_ADMIN_TOKENS: ops: {rule} (got <secret, 4 characters>)",
        f"env BGPROXY_ADMIN_TOKEN: {rule} (got <secret, 5 characters>)",
        f"{path}: weights: at least one color needs a weight > 0 (got {{'blue': 0, 'green': 0}})",
    ]


def test_dump_round_trips_shipped_config(tmp_path: Path) -> None:
    cfg = load_config(SHIPPED, environ={})
    dumped = dump_config(cfg)
    assert load_config(write(tmp_path, dumped), environ={}) == cfg


def test_dump_round_trips_every_kind_of_value_and_redacts_tokens(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listen: '[::1]:8080'\n"
        "pools:\n"
        "  blue: {upstreams: ['[::1]:9001', 'app:80'], balance: least_outstanding,\n"
        "         health_check: {path: /ready, interval: 500ms, timeout: 250ms, expected_status: 204}}\n"
        "  green: {upstreams: [], outlier: {base_ejection_time: 1m, max_ejection_time: 1h}}\n"
        "weights: {blue: 1, green: 3}\n"
        "limits: {max_body_bytes: 1048576}\n"
        "forwarding: {trusted_proxies: [10.0.0.0/8, '::1'], via: edge-1}\n"
        "metrics: {latency_buckets: [0.5, 1, 4]}\n",
    )
    environ = {"BGPROXY_ADMIN_TOKENS": f"ci={TOKEN_A},ops={TOKEN_B}"}
    cfg = load_config(path, environ)
    assert cfg.forwarding.trusted_proxies == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    ]
    dumped = dump_config(cfg)
    assert TOKEN_A not in dumped and TOKEN_B not in dumped
    data = yaml.safe_load(dumped)
    assert data["admin"]["tokens"] == {"ci": "***", "ops": "***"}
    assert data["pools"]["blue"]["health_check"]["interval"] == 0.5
    assert data["listen"] == "[::1]:8080"
    # The redacted dump is a valid config again once the secrets come back from the environment.
    assert load_config(write(tmp_path, dumped), environ) == cfg
