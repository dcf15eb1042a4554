"""The admin listener: an aiohttp app on its own (loopback) address, never on the request path.

Vocabulary:

- **read model**: the narrow view of the running process the admin side reads (`readmodel`);
  it changes state only through the control plane's Controller.
- **api**: the /v1 handlers; every body validated by **models**, every answer documented (`api`, `models`).
- **openapi**: the OpenAPI 3.1 document, generated from the same models (`openapi`).
- **metrics**: the Prometheus collector reading the data plane's plain counters at scrape time (`metrics`).
- **server**: mounts /healthz, /readyz, /metrics and /v1 (`server`).
"""
