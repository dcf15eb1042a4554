# bgproxy: blue-green traffic-switching reverse proxy.
#
#   docker build -t bgproxy:0.1.0 .
#   docker run --rm -p 8080:8080 \
#       -v "$PWD/my-bgproxy.yaml:/etc/bgproxy/bgproxy.yaml:ro" \
#       -v bgproxy-state:/var/lib/bgproxy \
#       bgproxy:0.1.0
#
# The image ships config/bgproxy.yaml as a default; mount your own file over
# /etc/bgproxy/bgproxy.yaml (read-only is fine). A relative state_file is
# resolved against the config's directory, so /etc/bgproxy is writable by the
# bgproxy group and the live weights survive `docker restart`. To keep them
# across `docker rm`, set `state_file: /var/lib/bgproxy/bgproxy-state.json`
# and mount a volume at /var/lib/bgproxy (as above).
#
# The proxy listens on 0.0.0.0:8080 (BGPROXY_LISTEN overrides the config's
# listen address). The admin API stays on 127.0.0.1:9901 inside the container;
# to publish 9901, set BGPROXY_ADMIN_LISTEN=0.0.0.0:9901 together with an admin
# token (BGPROXY_ADMIN_TOKEN, passed at run time, never baked in). The
# HEALTHCHECK reaches the admin API over loopback either way.

# --- build: install bgproxy and its dependencies into a self-contained venv ---
FROM python:3.12-slim AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc and the libc headers compile the data plane with mypyc (setup.py); the
# runtime deps (uvloop, httptools, pydantic-core, aiohttp) ship manylinux
# wheels. Only the venv leaves this stage, so the compiler never ships.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY bgproxy/ ./bgproxy/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir .

# --- runtime: same base, no build context, unprivileged ---
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    BGPROXY_LISTEN=0.0.0.0:8080

# Fixed uid/gid so volume ownership and Kubernetes runAsUser are predictable.
RUN groupadd --system --gid 10001 bgproxy \
    && useradd --system --uid 10001 --gid bgproxy --no-create-home \
        --home-dir /var/lib/bgproxy --shell /usr/sbin/nologin bgproxy \
    && install -d -o bgproxy -g bgproxy -m 0750 /var/lib/bgproxy \
    && install -d -o root -g bgproxy -m 0775 /etc/bgproxy

COPY --from=build /opt/venv /opt/venv
# The file stays root-owned 0644: the proxy writes its state next to it, never the config itself.
COPY config/bgproxy.yaml /etc/bgproxy/bgproxy.yaml

WORKDIR /var/lib/bgproxy
# Numeric so runtimes can verify "non-root" without reading /etc/passwd.
USER 10001:10001

EXPOSE 8080 9901
# Stated explicitly: SIGTERM is the signal `bgproxy run` treats as graceful shutdown.
STOPSIGNAL SIGTERM

# urllib rather than curl: the slim image has no curl; urlopen raises on non-2xx.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]

ENTRYPOINT ["bgproxy"]
CMD ["run", "--config", "/etc/bgproxy/bgproxy.yaml"]
