"""Pure decisions: no I/O, no asyncio, and the time is always passed in as ``now``.

Vocabulary:

- **color**: ``"blue"`` or ``"green"``, one copy of the service (`colors`).
- **weights**: the relative traffic shares of the two colors; at least one is above zero (`weights`).
- **switchboard**: the versioned switch state: weights, version, audit events, drains
  (`switchboard`). Every change either applies whole or raises before touching anything.
- **drain**: a color that lost all its weight, with the deadline its open streams may run to (`drain`).
- **health verdict**: when an upstream turns healthy or unhealthy; whether a failing one is ejected,
  for how long, or spared (`health`).
- **sticky pin / preview**: which color a cookie keeps a user on, and who may reach a color by name
  (`sticky`, `preview`, `cookies`).

Everything here is tested as tables (h11 style). Untrusted input (API bodies, state files) is
validated here, with errors worded for the person who sent it.
"""
