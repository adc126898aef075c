# syntax=docker/dockerfile:1
# gatewatch: one image for the gateway (`gatewatch serve`, the default) and the monitor worker (`gatewatch monitor`).
#
#   docker build -t gatewatch .
#   docker run -p 8000:8000 -v "$PWD/examples/models:/models:ro" gatewatch
#   docker run -e GATEWATCH_REDIS_URL=redis://redis:6379/0 -e HEALTHCHECK_URL=http://127.0.0.1:9100/metrics \
#     gatewatch gatewatch monitor --metrics-host 0.0.0.0 --metrics-port 9100 --config /etc/gatewatch/gatewatch.yaml
#
# The monitor must reach the gateway's Redis (GATEWATCH_REDIS_URL: without it each container starts its own
# embedded Redis and the monitor sees no traffic), and its health check is its metrics endpoint, not port 8000.
# The image's /etc/gatewatch/gatewatch.yaml serves /models with the embedded Redis; mount your own config over it
# (deploy/gatewatch.yaml in compose, a ConfigMap in Kubernetes) and set GATEWATCH_* variables to override keys.
#
# Stage 1 builds a wheel of the project and installs it, with its runtime dependencies only (no [test] extra),
# into /opt/venv. Stage 2 is a slim Python with that venv copied in and nothing else: no compiler, no pip cache,
# no source tree, no tests.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv

# Only what the wheel is built from (see .dockerignore): packaging metadata, then the packages.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY monitors ./monitors
COPY registry_client ./registry_client
COPY loadtests ./loadtests

RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install /wheels/gatewatch-*.whl \
    && /opt/venv/bin/gatewatch --help > /dev/null


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="gatewatch" \
      org.opencontainers.image.description="Model-serving gateway (Open Inference Protocol) with live drift monitoring" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG UID=10001
RUN groupadd --system --gid "${UID}" gatewatch \
    && useradd --system --uid "${UID}" --gid gatewatch --home-dir /var/lib/gatewatch --no-create-home \
       --shell /usr/sbin/nologin gatewatch \
    && mkdir -p /var/lib/gatewatch /etc/gatewatch /models \
    && chown gatewatch:gatewatch /var/lib/gatewatch \
    && printf 'registry: /models\ndata_dir: /var/lib/gatewatch\n' > /etc/gatewatch/gatewatch.yaml

COPY --from=builder /opt/venv /opt/venv

# GATEWATCH_DATA_DIR: the log spool (and the embedded Redis, when no redis_url is set) on a writable path, so the
# root filesystem can be mounted read-only. HEALTHCHECK_URL: what the health check asks; the monitor overrides it
# with its metrics port (compose does).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWATCH_DATA_DIR=/var/lib/gatewatch \
    HEALTHCHECK_URL=http://127.0.0.1:8000/v2/health/ready

WORKDIR /var/lib/gatewatch
USER ${UID}:${UID}

EXPOSE 8000 9100

# Exit 0 only on a 2xx: urlopen raises on 503 (models still loading) and on connection errors.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4); sys.exit(0)"]

# SIGTERM (docker stop, Kubernetes) makes uvicorn stop accepting, finish in-flight requests within
# shutdown_timeout_seconds, drain the batchers and flush the prediction log.
STOPSIGNAL SIGTERM
CMD ["gatewatch", "serve", "--host", "0.0.0.0", "--port", "8000", "--config", "/etc/gatewatch/gatewatch.yaml"]
