"""One run at a time per thread, across workers and hosts: a lease row in PostgreSQL.

A lease is a row with an expiry, renewed while its run lives. It holds no
connection open across the model call, and a holder that dies (kill -9, lost
host) simply stops renewing: the thread is free again once the lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool

from agentserve.core.identity import thread_id_in

log = logging.getLogger(__name__)

BusyPolicy = Literal["enqueue", "reject"]

ACQUIRE = """
INSERT INTO agent_thread_leases AS lease (thread_key, tenant, holder, expires_at)
SELECT %(key)s, %(tenant)s, %(holder)s, now() + make_interval(secs => %(ttl)s)
WHERE %(max_runs)s = 0 OR (
    SELECT count(*) FROM agent_thread_leases
    WHERE tenant = %(tenant)s AND expires_at > now()
) < %(max_runs)s
ON CONFLICT (thread_key) DO UPDATE
    SET tenant = EXCLUDED.tenant, holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
    WHERE lease.expires_at < now()
RETURNING thread_key
"""
# The same, and the thread recorded as active in the registry, in one round trip
# (admission's whole cost on the database besides the release). The registry row
# is updated only once the lease is ours, so `pending` is what the last run left.
ACQUIRE_AND_REGISTER = f"""
WITH lease AS ({ACQUIRE})
INSERT INTO agent_threads (thread_key, tenant, thread_id)
SELECT thread_key, %(tenant)s, %(thread_id)s FROM lease
ON CONFLICT (thread_key) DO UPDATE SET updated_at = now()
RETURNING pending
"""
IS_HELD = "SELECT expires_at > now() AS held FROM agent_thread_leases WHERE thread_key = %s"
RENEW = """UPDATE agent_thread_leases SET expires_at = now() + make_interval(secs => %s)
           WHERE thread_key = ANY(%s) AND holder = %s"""
RELEASE = "DELETE FROM agent_thread_leases WHERE thread_key = ANY(%s) AND holder = %s"


class ThreadBusy(Exception):
    def __init__(self, thread_key: str, retry_after_s: int) -> None:
        super().__init__(thread_key)
        self.thread_key = thread_key
        self.retry_after_s = retry_after_s


class TenantAtRunLimit(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__()
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class LeasePolicy:
    ttl_s: float = 30.0
    busy: BusyPolicy = "enqueue"
    wait_s: float = 10.0
    max_runs_per_tenant: int = 0


class ThreadLeases:
    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[DictRow]], policy: LeasePolicy) -> None:
        self.pool = pool
        self.policy = policy

    @contextlib.asynccontextmanager
    async def hold(
        self, tenant: str, thread_keys: Sequence[str], *, register: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Hold every key for the duration of the block. Keys are taken in sorted
        order so two requests wanting overlapping sets cannot each hold half. With
        `register`, each thread is also marked active in the thread registry as it
        is taken; yields the pending action (if any) of each key."""
        holder = uuid.uuid4()
        keys = sorted(set(thread_keys))
        held: list[str] = []
        pending: dict[str, Any] = {}
        try:
            for key in keys:
                if found := await self._acquire(tenant, key, holder, register):
                    pending[key] = found
                held.append(key)
            renewal = asyncio.create_task(self._renew_until_cancelled(keys, holder))
            try:
                yield pending
            finally:
                renewal.cancel()
        finally:
            if held:
                await self._release(held, holder)

    async def _acquire(self, tenant: str, key: str, holder: uuid.UUID, register: bool) -> Any:
        """Takes the key, waiting as the policy says; returns the registry's pending
        action when registering."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.policy.wait_s if self.policy.busy == "enqueue" else 0.0)
        delay = 0.02
        params = {
            "key": key,
            "tenant": tenant,
            "holder": holder,
            "ttl": self.policy.ttl_s,
            "max_runs": self.policy.max_runs_per_tenant,
            "thread_id": thread_id_in(key),
        }
        while True:
            async with self.pool.connection() as conn:
                row = await (await conn.execute(ACQUIRE_AND_REGISTER if register else ACQUIRE, params)).fetchone()
                if row is not None:
                    return row.get("pending")
                busy = await (await conn.execute(IS_HELD, (key,))).fetchone()
            thread_busy = bool(busy and busy["held"])
            if loop.time() + delay > deadline:
                if thread_busy:
                    raise ThreadBusy(key, retry_after_s=max(1, round(self.policy.wait_s / 4)))
                raise TenantAtRunLimit(retry_after_s=1)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    async def _renew_until_cancelled(self, keys: list[str], holder: uuid.UUID) -> None:
        while True:
            await asyncio.sleep(self.policy.ttl_s / 3)
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(RENEW, (self.policy.ttl_s, keys, holder))
            except Exception:  # a missed renewal is retried; the lease outlives two of them
                log.warning("could not renew thread leases", exc_info=True)

    async def _release(self, keys: list[str], holder: uuid.UUID) -> None:
        try:
            async with self.pool.connection() as conn:
                await conn.execute(RELEASE, (keys, holder))
        except Exception:  # the lease then expires by itself
            log.warning("could not release thread leases; they expire in %ss", self.policy.ttl_s, exc_info=True)
