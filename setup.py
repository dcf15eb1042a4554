"""Compile the data plane with mypyc: the same typed Python, about twice as fast per request.

`BGPROXY_PURE=1` installs the plain interpreted modules instead (no C compiler needed); the
behaviour is identical, only slower. bench/README.md has the measurements behind this choice.
"""

import os

from setuptools import setup

# The per-request path, plus the modules whose objects it touches on every request. switching.py
# stays interpreted: it validates untyped input (API bodies, state files) with its own precise
# errors, where compiled code would raise a bare TypeError at the call boundary first.
DATA_PLANE = [
    "bgproxy/deadline.py",
    "bgproxy/http1.py",
    "bgproxy/pool.py",
    "bgproxy/proxy.py",
    "bgproxy/router.py",
    "bgproxy/stats.py",
    "bgproxy/tunnel.py",
    "bgproxy/upstream_conn.py",
    "bgproxy/websocket.py",
]

ext_modules = []
if os.environ.get("BGPROXY_PURE") != "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(DATA_PLANE, opt_level="3", group_name="bgproxy_dataplane")

setup(ext_modules=ext_modules)
