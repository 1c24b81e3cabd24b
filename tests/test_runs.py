"""The runs table against a real PostgreSQL: the per-tenant limit under a burst,
arrival order on a busy thread, and taking up the runs of a dead worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from agentserve.core.runs import Ending, NewRun, Pool, RunStore
from agentserve.persistence import setup_schema
from agentserve.settings import Settings


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    await setup_schema(database_url, Settings(_env_file=None))  # type: ignore[call-arg]
    opened: Pool = AsyncConnectionPool(
        database_url, min_size=1, max_size=30, kwargs={"autocommit": True, "row_factory": dict_row}, open=False
    )
    async with opened:
        yield opened


def new_run(tenant: str, thread: str, **overrides: object) -> NewRun:
    return NewRun(tenant=tenant, thread_key=f"{tenant}/{thread}", kwargs={"input": None}, **overrides)  # type: ignore[arg-type]


async def test_the_tenant_run_limit_is_exact_under_a_burst(pool: Pool) -> None:
    store = RunStore(pool, ttl_s=30, max_runs_per_tenant=3, wait_s=1)
    tenant = f"burst{uuid.uuid4().hex[:6]}"
    submitted = await asyncio.gather(*(store.submit(new_run(tenant, f"t{i}")) for i in range(25)))
    assert sum(1 for s in submitted if s and s.claimed) == 3
    # The others wait; finishing one lets exactly one more start.
    running = [s.run for s in submitted if s and s.claimed]
    await store.finish(running[0], Ending(status="success"))
    claims = await asyncio.gather(*(store.claim_next() for _ in range(10)))
    assert sum(1 for c in claims if c is not None) == 1


async def test_waiters_on_a_busy_thread_are_served_in_arrival_order(pool: Pool) -> None:
    store = RunStore(pool, ttl_s=30, max_runs_per_tenant=0, wait_s=5)
    tenant = f"fifo{uuid.uuid4().hex[:6]}"
    first = await store.submit(new_run(tenant, "t"))
    assert first is not None and first.claimed
    waiters = [await store.submit(new_run(tenant, "t", attached=True, durable=False)) for _ in range(4)]
    assert all(w is not None and not w.claimed for w in waiters)
    await store.finish(first.run, Ending(status="success"))
    order = []
    for _ in range(4):
        # Every waiter tries, latest first; only the earliest may take the thread.
        for waiter in reversed(waiters):
            assert waiter is not None
            if waiter.run.run_id in order:
                continue
            claimed, _ = await store.claim_waiting(waiter.run)
            if claimed:
                order.append(waiter.run.run_id)
                await store.finish(waiter.run, Ending(status="success"))
                break
    assert order == [w.run.run_id for w in waiters if w is not None]


async def test_a_durable_run_whose_lease_expired_is_taken_up_again(
    pool: Pool,
    database_url: str,
) -> None:
    store = RunStore(pool, ttl_s=30, max_runs_per_tenant=0, wait_s=1)
    tenant = f"dead{uuid.uuid4().hex[:6]}"
    lost = await store.submit(new_run(tenant, "t"))
    behind = await store.submit(new_run(tenant, "t"))
    assert lost is not None and lost.claimed and behind is not None and not behind.claimed
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE agent_thread_leases SET expires_at = now() - interval '1 second' WHERE holder = %s",
            (lost.run.run_id,),
        )
    taken = None
    # Other tests' runs in this database are claimable too: take runs until ours.
    while (candidate := await store.claim_next()) is not None:
        if candidate.thread_key == lost.run.thread_key:
            taken = candidate
            break
    # The dead run first (it is earlier in the thread's line), on its second attempt.
    assert taken is not None and taken.run_id == lost.run.run_id and taken.attempts == 2
