"""Builds the fleet's shared store from ``state_store`` (None for a single node's state file)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from ..config import Config
from .etcd_store import EtcdStore
from .redis_store import RedisStore
from .shared import SharedStore, StoreTLS


def open_store(config: Config, environ: Mapping[str, str]) -> SharedStore | None:
    """etcd or Redis for ``etcd[s]://`` or ``redis[s]://``; credentials come from the environment
    (BGPROXY_STORE_USERNAME, BGPROXY_STORE_PASSWORD), never from the config file or its URL."""
    url = config.state_store
    scheme = urlsplit(url or "").scheme
    if url is None or scheme == "file":
        return None
    tls_config = config.state_store_tls
    tls = None
    if tls_config is not None:
        tls = StoreTLS(
            *(
                None if p is None else str(p)
                for p in (tls_config.ca_file, tls_config.cert_file, tls_config.key_file)
            )
        )
    username = environ.get("BGPROXY_STORE_USERNAME") or None
    password = environ.get("BGPROXY_STORE_PASSWORD") or None
    if scheme in ("redis", "rediss"):
        return RedisStore(url, username=username, password=password, tls=tls)
    return EtcdStore(url, username=username, password=password, tls=tls)
