"""The data plane's settings: a frozen copy of the validated config's timeouts, limits and forwarding.

Built once by the control plane (bgproxy.control.configure) so the compiled data plane needs neither
pydantic nor the config module; frozen, so a running exchange can never see it change under it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.address import Network, in_networks


@dataclass(frozen=True)
class Settings:
    """Seconds for timeouts, 0.0 meaning off where the config allows null; ``max_body_bytes`` -1: no limit."""

    connect_timeout: float = 2.0
    upstream_header_timeout: float = 30.0
    stream_idle_timeout: float = 300.0
    client_header_timeout: float = 10.0
    idle_timeout: float = 60.0
    upstream_idle: float = 20.0
    client_send_timeout: float = 60.0
    tunnel_timeout: float = 3600.0
    max_header_bytes: int = 65536
    max_body_bytes: int = -1
    max_connections: int = 10000
    via: bytes = b"bgproxy"
    access_log: bool = False
    trusted_proxies: tuple[Network, ...] = ()

    def is_trusted(self, ip: str) -> bool:
        """Whether a peer's X-Forwarded-* headers may be appended to rather than replaced."""
        return bool(self.trusted_proxies) and in_networks(ip, self.trusted_proxies)
