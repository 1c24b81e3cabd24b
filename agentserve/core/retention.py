"""Keeps the tables from growing without bound: deletes threads idle past their
TTL, prunes checkpoints beyond the newest N per thread, and drops stale
bookkeeping rows. Every worker runs the loop; a transaction-scoped advisory lock
makes exactly one of them sweep at a time."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool

from agentserve.core.threads import ERASE

log = logging.getLogger(__name__)

SWEEP_LOCK_ID = 7_440_022
BATCH = 500

# Threads with a live lease are running a turn: leave them to the next sweep.
EXPIRED = """
SELECT t.thread_key FROM agent_threads t
WHERE t.updated_at < now() - make_interval(secs => %(ttl_s)s)
  AND NOT EXISTS (SELECT 1 FROM agent_thread_leases l WHERE l.thread_key = t.thread_key AND l.expires_at > now())
LIMIT %(batch)s
"""
RECENTLY_ACTIVE = """
SELECT t.thread_key FROM agent_threads t
WHERE t.updated_at > now() - make_interval(secs => %(since_s)s)
  AND NOT EXISTS (SELECT 1 FROM agent_thread_leases l WHERE l.thread_key = t.thread_key AND l.expires_at > now())
"""
PRUNE = [
    """DELETE FROM checkpoints c USING (
           SELECT thread_id, checkpoint_ns, checkpoint_id, row_number() OVER (
               PARTITION BY thread_id, checkpoint_ns ORDER BY checkpoint_id DESC) AS newer
           FROM checkpoints WHERE thread_id = ANY(%(keys)s)
       ) old
       WHERE c.thread_id = old.thread_id AND c.checkpoint_ns = old.checkpoint_ns
         AND c.checkpoint_id = old.checkpoint_id AND old.newer > %(keep)s""",
    """DELETE FROM checkpoint_writes w WHERE w.thread_id = ANY(%(keys)s) AND NOT EXISTS (
           SELECT 1 FROM checkpoints c WHERE c.thread_id = w.thread_id
             AND c.checkpoint_ns = w.checkpoint_ns AND c.checkpoint_id = w.checkpoint_id)""",
    """DELETE FROM checkpoint_blobs b WHERE b.thread_id = ANY(%(keys)s) AND NOT EXISTS (
           SELECT 1 FROM checkpoints c WHERE c.thread_id = b.thread_id AND c.checkpoint_ns = b.checkpoint_ns
             AND c.checkpoint -> 'channel_versions' ->> b.channel = b.version)""",
]
HOUSEKEEPING = [
    "DELETE FROM agent_rate_windows WHERE window_start < now() - interval '1 hour'",
    "DELETE FROM agent_thread_leases WHERE expires_at < now() - interval '1 hour'",
    # Stored events of ended runs are kept for a while (to rejoin their streams),
    # ended runs as long as their threads' idle TTL.
    """DELETE FROM agent_run_events e USING agent_runs r WHERE e.run_id = r.run_id
       AND r.ended_at < now() - make_interval(secs => %(events_ttl_s)s)""",
    """DELETE FROM agent_run_events e WHERE NOT EXISTS (SELECT 1 FROM agent_runs r WHERE r.run_id = e.run_id)""",
    "DELETE FROM agent_runs WHERE ended_at < now() - make_interval(secs => %(ttl_s)s)",
    "DELETE FROM agent_idempotency WHERE created_at < now() - make_interval(secs => %(idempotency_ttl_s)s)",
]


@dataclass(frozen=True)
class RetentionPolicy:
    thread_ttl_s: float
    checkpoints_kept: int
    interval_s: float
    events_ttl_s: float = 3600.0
    idempotency_ttl_s: float = 86400.0


@dataclass(frozen=True)
class SweepReport:
    swept: bool
    threads_deleted: int = 0
    threads_pruned: int = 0


async def sweep_once(conn: AsyncConnection[DictRow], policy: RetentionPolicy) -> SweepReport:
    async with conn.transaction():
        lock = await (await conn.execute("SELECT pg_try_advisory_xact_lock(%s) AS got", (SWEEP_LOCK_ID,))).fetchone()
        if not lock or not lock["got"]:
            return SweepReport(swept=False)
        rows = await (await conn.execute(EXPIRED, {"ttl_s": policy.thread_ttl_s, "batch": BATCH})).fetchall()
        expired = [row["thread_key"] for row in rows]
        if expired:
            for statement in ERASE:
                await conn.execute(statement, {"keys": expired})  # type: ignore[arg-type]
        since = {"since_s": 2 * policy.interval_s}
        active = [row["thread_key"] for row in await (await conn.execute(RECENTLY_ACTIVE, since)).fetchall()]
        if active:
            for statement in PRUNE:
                await conn.execute(statement, {"keys": active, "keep": policy.checkpoints_kept})  # type: ignore[arg-type]
        ttls = {
            "events_ttl_s": policy.events_ttl_s,
            "ttl_s": policy.thread_ttl_s,
            "idempotency_ttl_s": policy.idempotency_ttl_s,
        }
        for statement in HOUSEKEEPING:
            await conn.execute(statement, ttls)  # type: ignore[arg-type]
    return SweepReport(swept=True, threads_deleted=len(expired), threads_pruned=len(active))


async def sweep_forever(pool: AsyncConnectionPool[AsyncConnection[DictRow]], policy: RetentionPolicy) -> None:
    while True:
        # Jitter, so workers started together do not all wake at once.
        await asyncio.sleep(policy.interval_s * random.uniform(0.5, 1.0))
        try:
            async with pool.connection() as conn:
                report = await sweep_once(conn, policy)
            if report.threads_deleted or report.threads_pruned:
                log.info(
                    "retention sweep: %d idle threads deleted, %d pruned", report.threads_deleted, report.threads_pruned
                )
        except Exception:  # the next sweep tries again; serving must not stop for this
            log.warning("retention sweep failed", exc_info=True)
