"""Socket addresses: how one is written (config, logs, metrics, API), and whether one is in a network list."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def host_port(host: str, port: int) -> str:
    """``10.0.0.5:8080``, or ``[::1]:8080`` for an IPv6 host (RFC 3986 brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    """Whether ``ip`` lies in one of ``networks``; False for anything that is not an IP address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address, or a name) is this machine's loopback: 127.0.0.0/8, ::1, localhost."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or ::, a wildcard bind: "every address of this host", never a place to connect to."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
