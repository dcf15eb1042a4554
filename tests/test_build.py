"""The installed data plane is the one setup.py says: compiled by mypyc, unless BGPROXY_PURE=1."""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest

from bgproxy import switching

SETUP = Path(__file__).parent.parent / "setup.py"


def data_plane_modules() -> list[str]:
    """The module names setup.py hands to mypyc, read without running setup()."""
    for node in ast.walk(ast.parse(SETUP.read_text())):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "DATA_PLANE" for t in node.targets
        ):
            paths = ast.literal_eval(node.value)
            return [p.removesuffix(".py").replace("/", ".") for p in paths]
    raise AssertionError("setup.py has no DATA_PLANE list")


def test_data_plane_list_names_real_modules() -> None:
    modules = data_plane_modules()
    assert "bgproxy.proxy" in modules and "bgproxy.upstream_conn" in modules and "bgproxy.http1" in modules
    for name in modules:
        assert (SETUP.parent / (name.replace(".", "/") + ".py")).is_file(), name


@pytest.mark.parametrize("name", data_plane_modules())
def test_module_is_compiled_unless_pure(name: str) -> None:
    path = importlib.import_module(name).__file__ or ""
    if os.environ.get("BGPROXY_PURE") == "1":
        assert path.endswith(".py"), path
    else:
        assert path.endswith(".so"), f"{name} runs interpreted ({path}): the mypyc build did not happen"


def test_switching_stays_interpreted() -> None:
    """The pure switching core validates untyped input itself; compiled, it would raise TypeError first."""
    assert (switching.__file__ or "").endswith(".py")
