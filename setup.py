"""Compile the data plane with mypyc: the same typed Python, about twice as fast per request.

Every module in bgproxy/dataplane/ is compiled, and nothing else: that folder is the per-request
path plus the objects it touches on every request, and it imports no pydantic, aiohttp or config.
Its __init__ holds only the package's docstring, so it stays a plain module. Validation of
untrusted input lives in bgproxy/core/ and stays interpreted: compiled, it would raise a bare
TypeError at the call boundary before its own precise error.

`BGPROXY_PURE=1` installs the plain interpreted modules instead (no C compiler needed); the
behaviour is identical, only slower. bench/README.md has the measurements behind this choice.
"""

import os
from pathlib import Path

from setuptools import setup

DATA_PLANE = sorted(
    str(path) for path in Path("bgproxy/dataplane").glob("*.py") if path.name != "__init__.py"
)

ext_modules = []
if os.environ.get("BGPROXY_PURE") != "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(DATA_PLANE, opt_level="3", group_name="bgproxy_dataplane")

setup(ext_modules=ext_modules)
