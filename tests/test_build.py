"""The installed data plane is what setup.py says: every module of bgproxy/dataplane compiled by mypyc
(unless BGPROXY_PURE=1), and nothing outside that folder."""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import pytest

import bgproxy

PACKAGE = Path(bgproxy.__file__).parent
DATAPLANE = PACKAGE / "dataplane"


def dataplane_modules() -> list[str]:
    return sorted(f"bgproxy.dataplane.{p.stem}" for p in DATAPLANE.glob("*.py") if p.name != "__init__.py")


def test_the_folder_holds_the_hot_path() -> None:
    modules = dataplane_modules()
    for name in ("client", "exchange", "upstream", "http1", "routing", "runtime"):
        assert f"bgproxy.dataplane.{name}" in modules


@pytest.mark.parametrize("name", dataplane_modules())
def test_dataplane_module_is_compiled_unless_pure(name: str) -> None:
    path = importlib.import_module(name).__file__ or ""
    if os.environ.get("BGPROXY_PURE") == "1":
        assert path.endswith(".py"), path
    else:
        assert path.endswith(".so"), f"{name} runs interpreted ({path}): the mypyc build did not happen"


def test_nothing_outside_the_dataplane_is_compiled() -> None:
    """core validates untyped input itself; compiled, it would raise a bare TypeError first."""
    outside = [
        info.name
        for info in pkgutil.walk_packages([str(PACKAGE)], "bgproxy.")
        if not info.name.startswith("bgproxy.dataplane.")
        and info.name != "bgproxy.__main__"
        and not (importlib.import_module(info.name).__file__ or "").endswith(".py")
    ]
    assert outside == []
    assert not [p for p in PACKAGE.rglob("*.so") if p.parent != DATAPLANE]
