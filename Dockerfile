# syntax=docker/dockerfile:1
#
# chatkit-gateway container image.
#
#   docker build -t chatkit-gateway .
#   docker run --rm -p 8080:8080 -e GATEWAY_REDIS_URL=redis://redis:6379/0 chatkit-gateway
#
# Two stages: the builder turns the source into a wheel and installs it with its
# dependencies into /opt/venv; the final stage gets that venv and nothing else
# (no compiler, no pip cache, no source tree). Both stages use the same base
# image, so the venv's interpreter symlink (/usr/local/bin/python3.11) resolves.
#
# The base is pinned by tag (Python minor + Debian release), the same in both
# stages; add @sha256:... to both when builds must be bit-for-bit repeatable.
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv

WORKDIR /src
# The dependencies first, from the hash-checked lock (scripts/lock): an image
# built next month gets the same packages, and a changed source tree reuses
# this layer.
COPY constraints/runtime.txt ./constraints/
# --only-binary: every dependency (uvloop, httptools, hiredis, aiohttp,
# pydantic-core) ships manylinux wheels for amd64 and arm64, so the builder
# needs no compiler; a missing wheel fails the build loudly instead of
# silently compiling. pip byte-compiles what it installs, so the read-only
# final image starts without writing .pyc files.
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
        -r constraints/runtime.txt

COPY pyproject.toml README.md ./
COPY gateway ./gateway
# The gateway's own wheel, without re-resolving: the lock already decided.
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/chatkit-gateway --version


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="chatkit-gateway" \
      org.opencontainers.image.description="Authenticating, rate-limiting reverse proxy for OpenAI ChatKit traffic" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it without
# reading /etc/passwd, and so it matches the securityContext in deploy/.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway

COPY --from=builder /opt/venv /opt/venv

# GATEWAY_HOST: the gateway's own default is 127.0.0.1, which inside a
# container is unreachable from outside it; the image listens on every
# interface and a sidecar deployment sets it back to 127.0.0.1.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080

USER 10001:10001
EXPOSE 8080

# slim has no curl; the standard library does the probe. The proxy handler is
# emptied so an HTTP_PROXY in the environment cannot divert it. Any non-2xx
# answer or connection error raises, and the exit status is 1. No
# --start-period: the gateway serves well within the first 30 s interval.
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.build_opener(urllib.request.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % (os.environ.get('GATEWAY_PORT') or '8080'), timeout=4)"]

# The gateway runs as PID 1 with no init: it installs SIGTERM and SIGINT
# handlers before uvicorn starts and uvicorn then its own (the kernel's "PID 1
# ignores default-action signals" rule only bites processes without handlers);
# it drains in-flight requests for up to 30 s, exits 0, and reaps its own
# worker processes when GATEWAY_WORKERS > 1. It starts
# no other children, so there are no orphans for tini to reap; `docker run
# --init` is harmless but not needed. Give it more than 30 s to stop
# (`docker stop -t 40`, terminationGracePeriodSeconds in Kubernetes).
STOPSIGNAL SIGTERM
ENTRYPOINT ["chatkit-gateway"]
CMD ["serve"]
