"""Holding a thread for a short change outside any run (erasing it, writing its
state by hand): the same lease row a run takes, so neither writes beside the other.

A lease is a row with an expiry, renewed while it is held. It holds no connection
open, and a holder that dies (kill -9, lost host) simply stops renewing: the
thread is free again once the lease expires. Runs take theirs in core/runs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from agentserve.core.errors import ThreadBusy
from agentserve.core.identity import thread_id_in
from agentserve.core.runs import Pool

log = logging.getLogger(__name__)

ACQUIRE = """
INSERT INTO agent_thread_leases AS lease (thread_key, tenant, holder, expires_at)
VALUES (%(key)s, %(tenant)s, %(holder)s, now() + make_interval(secs => %(ttl)s))
ON CONFLICT (thread_key) DO UPDATE
    SET tenant = EXCLUDED.tenant, holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
    WHERE lease.expires_at < now()
RETURNING thread_key
"""
RENEW = """UPDATE agent_thread_leases SET expires_at = now() + make_interval(secs => %s)
           WHERE thread_key = %s AND holder = %s"""
RELEASE = "DELETE FROM agent_thread_leases WHERE thread_key = %s AND holder = %s"


class ThreadLeases:
    def __init__(self, pool: Pool, ttl_s: float) -> None:
        self.pool = pool
        self.ttl_s = ttl_s

    @contextlib.asynccontextmanager
    async def hold(self, tenant: str, thread_key: str) -> AsyncIterator[None]:
        """Hold the thread for the block, or refuse at once (409) if a run has it."""
        holder = uuid.uuid4()
        params = {"key": thread_key, "tenant": tenant, "holder": holder, "ttl": self.ttl_s}
        async with self.pool.connection() as conn:
            if await (await conn.execute(ACQUIRE, params)).fetchone() is None:
                raise ThreadBusy(
                    f"thread {thread_id_in(thread_key)!r} is running a turn; retry when it has finished",
                    thread_key,
                    retry_after_s=max(1, round(self.ttl_s / 4)),
                )
        renewal = asyncio.create_task(self._renew_until_cancelled(thread_key, holder))
        try:
            yield
        finally:
            renewal.cancel()
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(RELEASE, (thread_key, holder))
            except Exception:  # the lease then expires by itself
                log.warning("could not release a thread lease; it expires in %ss", self.ttl_s, exc_info=True)

    async def _renew_until_cancelled(self, thread_key: str, holder: uuid.UUID) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(RENEW, (self.ttl_s, thread_key, holder))
            except Exception:  # a missed renewal is retried; the lease outlives two of them
                log.warning("could not renew a thread lease", exc_info=True)
