"""The database layer against a real PostgreSQL: schema setup and the checkpointer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest

from agentserve.persistence import PooledPostgresSaver, create_pool, setup_schema
from agentserve.settings import Settings
from tests.conftest import scratch_database

SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture()
def fresh_database(postgres_server_url: str) -> Iterator[str]:
    with scratch_database(postgres_server_url, prefix="agent_schema") as url:
        yield url


async def test_concurrent_schema_setup_does_not_race(fresh_database: str) -> None:
    await asyncio.gather(*(setup_schema(fresh_database, SETTINGS) for _ in range(4)))
    with psycopg.connect(fresh_database) as conn:
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"checkpoints", "checkpoint_blobs", "checkpoint_writes", "agent_threads", "agent_transcript"} <= tables


async def test_checkpoint_calls_of_one_worker_do_not_queue_behind_each_other(database_url: str) -> None:
    await setup_schema(database_url, SETTINGS)
    pool = create_pool(database_url, SETTINGS)
    await pool.open(wait=True)
    try:
        saver = PooledPostgresSaver(pool)  # type: ignore[arg-type]
        config = {"configurable": {"thread_id": "nobody", "checkpoint_ns": ""}}
        async with saver._cursor():
            # The base class would wait here for the outer call's lock, forever.
            async with asyncio.timeout(3):
                assert await saver.aget_tuple(config) is None  # type: ignore[arg-type]
    finally:
        await pool.close()
