# syntax=docker/dockerfile:1
# One image for every Waddle service; the Kubernetes chart picks the
# entrypoint per container:
#   python -m edge | channel_service | store_service | store_service.migrate
#
#   docker build -t waddle .
#   podman build --build-arg BASE_IMAGE=localhost/debian-base:bookworm -t waddle .
#
# BASE_IMAGE may be an official Python image or a bare Debian/Ubuntu root
# (python3 then comes from apt). Behind a TLS-intercepting proxy, make its CA
# bundle visible to the build (podman build -v ca.pem:/run/build-ca.pem:ro)
# and pass --build-arg BUILD_CA_BUNDLE=/run/build-ca.pem.
ARG BASE_IMAGE=python:3.12-slim

# checkov:skip=CKV_DOCKER_7:the base image is the build argument BASE_IMAGE, whose default above is the versioned tag python:3.12-slim; the scanner does not resolve build arguments
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8
# A base without Python gets the distribution's interpreter (runtime only).
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS builder
ARG BUILD_CA_BUNDLE=""
# venv and ensurepip are split out of Debian's python3 package.
RUN if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies (and the build backend) first, from pyproject.toml alone, so
# that code changes reuse this layer; the project itself then builds offline.
COPY pyproject.toml ./
RUN if [ -n "$BUILD_CA_BUNDLE" ]; then export PIP_CERT="$BUILD_CA_BUNDLE"; fi \
    && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' > /tmp/requirements.txt \
    && pip install --only-binary=:all: -r /tmp/requirements.txt
COPY . .
RUN pip install --no-deps --no-build-isolation --no-index . \
    && python -m compileall -q /opt/venv/lib \
    && python -c 'import edge, channel_service, store_service, waddle_common, waddle_pb'

FROM base AS runtime
RUN groupadd --gid 10001 waddle \
    && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
        --home-dir /nonexistent --shell /usr/sbin/nologin waddle
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp
# Nothing is written outside /tmp: the root filesystem may be read-only.
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 50051 50061 9101 9102
# For docker and podman (build with --format docker; Kubernetes uses the
# chart's probes instead): ask the running service's /healthz, on the port
# its WADDLE_* settings give. Whatever is not a service (the migration, a
# shell) has nothing to check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; from waddle_common.settings import Settings; s = Settings(); a = open('/proc/1/cmdline', 'rb').read().split(b'\\0'); m = a[a.index(b'-m') + 1] if b'-m' in a[:-1] else b''; p = {b'edge': s.edge_port, b'channel_service': s.channel_metrics_port, b'store_service': s.store_metrics_port}.get(m); p is None or u.urlopen(f'http://127.0.0.1:{p}/healthz', timeout=4)"]
CMD ["python", "-m", "edge"]
