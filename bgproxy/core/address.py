"""How a socket address is written: the one spelling of config, logs, metrics labels and the API."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """``10.0.0.5:8080``, or ``[::1]:8080`` for an IPv6 host (RFC 3986 brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
