"""The data plane: every byte of proxied traffic goes through here, and all of it is compiled by mypyc.

Vocabulary:

- **runtime**: what the protocol classes share: settings, color pools, counters, the live exchanges,
  and the installed route table (`runtime`).
- **route table**: an immutable snapshot of how to route, installed by the control plane on every
  change; ``pick(table)`` is where a request chooses its color, or ``route(...)`` when sticky or
  preview rules are in the table (`routing`).
- **settings**: the timeouts and limits, a frozen copy of the validated config (`settings`).
- **client connection**: one accepted socket; parses requests, queues pipelined ones (`client`).
- **exchange**: one request and its response, from parsed head to last byte (`exchange`).
- **upstream connection**: one keep-alive connection to an upstream server (`upstream`).
- **pool**: the upstreams of one color, their balancing and idle connections (`pool`).
- **tunnel**: an upgraded connection spliced both ways, WebSocket frames followed (`tunnel`, `websocket`).

Rules of the room: asyncio Protocols on uvloop with httptools (llhttp), no aiohttp, no pydantic, no
config module; typed so mypyc can compile it (`setup.py` compiles every module here). What happens
here that the control plane must act on (a failed upstream, a color going idle) goes out through the
narrow `runtime.Reporter` interface it was given.
"""
