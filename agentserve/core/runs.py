"""The runs table: every run of either API is a row, and the row decides who runs.

A run is `pending` until it holds its thread's lease, then `running`, then
`success`, `error`, `timeout` or `interrupted` (cancelled). Runs on one thread take
the thread in the order they arrived: a run may take it only when no earlier run
on that thread is still waiting or is a durable run still to be finished. The
lease row (`agent_thread_leases`, holder = the run id) is renewed while its run
lives; a durable run whose lease expired (its worker died) is taken up again by
any worker, up to a bounded number of attempts.

Every statement here is a single autocommit statement, or a short transaction
holding only transaction-scoped locks, so all of it works through a transaction
pooler such as PgBouncer.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from agentserve.core.identity import ASSISTANT_ID, GRAPH_ID, thread_id_in
from agentserve.core.serialize import as_jsonb

# The key of a turn's config under which a run's `latest_checkpoint` reaches the
# checkpointer (configurable keys starting "__" stay out of checkpoint metadata).
LATEST_CHECKPOINT_KEY = "__agentserve_latest_checkpoint"
# A thread's latest checkpoint, and whether anything was written against it since (a
# pause, a failed step): all a worker needs to know that its copy is still current.
LATEST_CHECKPOINT_OF = """SELECT c.checkpoint_id, EXISTS (
    SELECT 1 FROM checkpoint_writes w WHERE w.thread_id = c.thread_id AND w.checkpoint_ns = c.checkpoint_ns
        AND w.checkpoint_id = c.checkpoint_id) AS has_writes
FROM checkpoints c WHERE c.thread_id = {key} AND c.checkpoint_ns = '' ORDER BY c.checkpoint_id DESC LIMIT 1"""

Pool = AsyncConnectionPool[AsyncConnection[DictRow]]
Strategy = Literal["reject", "enqueue", "interrupt", "rollback"]
TERMINAL = frozenset({"success", "error", "timeout", "interrupted"})
CHANNEL = "agentserve"
THREAD_STAMP = {"graph_id": GRAPH_ID, "assistant_id": ASSISTANT_ID}

# A run that still has a claim on its thread's order: waiting (an attached waiter
# only while its request waits), or durable and running (to be finished, even by
# another worker if its own died).
ACTIVE_EARLIER = """EXISTS (SELECT 1 FROM agent_runs e WHERE e.thread_key = {run}.thread_key AND e.seq < {run}.seq
    AND ((e.status = 'pending' AND (NOT e.attached OR e.waiter_deadline > now()))
         OR (e.status = 'running' AND e.durable)))"""
LEASED = "EXISTS (SELECT 1 FROM agent_thread_leases l WHERE l.thread_key = {key} AND l.expires_at > now())"
WITHIN_LIMIT = """(%(max_runs)s = 0 OR (SELECT count(*) FROM agent_thread_leases l
    WHERE l.tenant = {tenant} AND l.expires_at > now()) < %(max_runs)s)"""
TAKE_LEASE = """INSERT INTO agent_thread_leases AS lease (thread_key, tenant, holder, expires_at)
    SELECT {key}, {tenant}, {holder}, now() + make_interval(secs => %(ttl)s) FROM {source}
    ON CONFLICT (thread_key) DO UPDATE
        SET tenant = EXCLUDED.tenant, holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
        WHERE lease.expires_at < now()
    RETURNING holder"""
RUN_COLUMNS = """r.run_id, r.seq, r.tenant, r.thread_key, r.assistant_id, r.status, r.kwargs, r.metadata,
    r.multitask_strategy, r.durable, r.attached, r.attempts, r.cancel_action, r.store_events, r.temporary,
    r.output, r.error, r.webhook, r.created_at, r.updated_at, r.ended_at"""

# Insert a run and, when its thread is free and nobody waits before it, take the
# thread at once: the common case costs one round trip.
SUBMIT = f"""
WITH known AS (
    SELECT NOT %(must_exist)s OR EXISTS (SELECT 1 FROM agent_threads WHERE thread_key = %(key)s) AS ok
), free AS (
    SELECT 1 WHERE (SELECT ok FROM known) AND %(claim_now)s AND NOT {LEASED.format(key="%(key)s")}
        AND NOT EXISTS (SELECT 1 FROM agent_runs e WHERE e.thread_key = %(key)s
            AND ((e.status = 'pending' AND (NOT e.attached OR e.waiter_deadline > now()))
                 OR (e.status = 'running' AND e.durable)))
        AND {WITHIN_LIMIT.format(tenant="%(tenant)s")}
), lease AS (
    {TAKE_LEASE.format(key="%(key)s", tenant="%(tenant)s", holder="%(run_id)s::uuid", source="free")}
), thread AS (
    INSERT INTO agent_threads AS t (thread_key, tenant, thread_id, metadata, status)
    SELECT %(key)s, %(tenant)s, %(thread_id)s, %(stamp)s, 'busy'
    WHERE (SELECT ok FROM known) AND (%(queue)s OR EXISTS (SELECT 1 FROM lease))
    ON CONFLICT (thread_key) DO UPDATE SET updated_at = now(), status = 'busy', metadata = t.metadata || %(stamp)s
    RETURNING pending
), latest AS (
    -- The thread's latest checkpoint as the run takes the thread: while the run
    -- holds it, no other writes it, so the turn need not ask again.
    {LATEST_CHECKPOINT_OF.format(key="%(key)s")}
), keyed AS (
    -- The request's idempotency key learns its run in the same statement that
    -- stores the run: a retry never finds a key whose run it cannot see.
    UPDATE agent_idempotency SET run_id = %(run_id)s, thread_id = %(thread_id)s
    WHERE %(idempotency_owner)s::uuid IS NOT NULL AND owner = %(idempotency_owner)s::uuid
      AND (SELECT ok FROM known) AND (%(queue)s OR EXISTS (SELECT 1 FROM lease))
    RETURNING 1
)
INSERT INTO agent_runs (run_id, tenant, thread_key, assistant_id, status, kwargs, metadata, multitask_strategy,
                        durable, attached, waiter_deadline, attempts, store_events, temporary, webhook)
SELECT %(run_id)s, %(tenant)s, %(key)s, %(assistant_id)s,
       CASE WHEN EXISTS (SELECT 1 FROM lease) THEN 'running' ELSE 'pending' END,
       %(kwargs)s, %(metadata)s, %(strategy)s, %(durable)s, %(attached)s,
       CASE WHEN %(attached)s THEN now() + make_interval(secs => %(wait_s)s) END,
       CASE WHEN EXISTS (SELECT 1 FROM lease) THEN 1 ELSE 0 END,
       %(store_events)s OR NOT EXISTS (SELECT 1 FROM lease), %(temporary)s, %(webhook)s
WHERE (SELECT ok FROM known) AND (%(queue)s OR EXISTS (SELECT 1 FROM lease))
RETURNING status, seq, created_at, (SELECT pending FROM thread) AS pending,
    (SELECT checkpoint_id FROM latest) AS latest_checkpoint, (SELECT has_writes FROM latest) AS latest_has_writes
"""
# An attached waiter's turn: take the thread if this run is first in its line.
CLAIM_WAITING = f"""
WITH me AS (
    SELECT r.run_id, r.thread_key, r.tenant FROM agent_runs r
    WHERE r.run_id = %(run_id)s AND r.status = 'pending'
      AND NOT {ACTIVE_EARLIER.format(run="r")} AND NOT {LEASED.format(key="r.thread_key")}
      AND {WITHIN_LIMIT.format(tenant="r.tenant")}
), lease AS (
    {TAKE_LEASE.format(key="me.thread_key", tenant="me.tenant", holder="me.run_id", source="me")}
)
UPDATE agent_runs r SET status = 'running', attempts = r.attempts + 1, updated_at = now()
FROM lease WHERE r.run_id = lease.holder
RETURNING (SELECT pending FROM agent_threads t WHERE t.thread_key = r.thread_key) AS pending
"""
# Runs any worker may take: waiting ones first in their thread's line, and durable
# ones whose worker stopped renewing their lease.
CLAIMABLE = f"""r.status IN ('pending', 'running') AND NOT r.attached
  AND ((r.status = 'pending' AND NOT {LEASED.format(key="r.thread_key")})
       OR (r.status = 'running' AND r.durable AND NOT EXISTS (
           SELECT 1 FROM agent_thread_leases l WHERE l.holder = r.run_id AND l.expires_at > now())))
  AND NOT {ACTIVE_EARLIER.format(run="r")}"""
CANDIDATES = f"""
SELECT r.run_id, r.tenant FROM agent_runs r WHERE {CLAIMABLE}
ORDER BY r.seq LIMIT %(limit)s
FOR UPDATE OF r SKIP LOCKED
"""
# Whether the queue has a run to take now, and whether it may have one soon: a run
# waiting in it (that a thread or a tenant's capacity set free could let start), or
# a durable run in progress (whose worker may die, leaving it to be taken over).
QUEUE_STATE = f"""
SELECT EXISTS (SELECT 1 FROM agent_runs r WHERE {CLAIMABLE}) AS claimable,
       EXISTS (SELECT 1 FROM agent_runs r WHERE NOT r.attached
               AND (r.status = 'pending' OR (r.status = 'running' AND r.durable))) AS waiting
"""
CLAIM_CANDIDATE = f"""
WITH me AS (
    SELECT r.run_id, r.thread_key, r.tenant FROM agent_runs r
    WHERE r.run_id = %(run_id)s AND {WITHIN_LIMIT.format(tenant="r.tenant")}
), lease AS (
    {TAKE_LEASE.format(key="me.thread_key", tenant="me.tenant", holder="me.run_id", source="me")}
)
UPDATE agent_runs r SET status = 'running', attempts = r.attempts + 1, updated_at = now()
FROM lease WHERE r.run_id = lease.holder
RETURNING {RUN_COLUMNS}
"""
LOCK_TENANT = "SELECT pg_advisory_xact_lock(hashtextextended('agent-runs:' || %s, 0))"
RENEW = """
WITH renewed AS (
    UPDATE agent_thread_leases SET expires_at = now() + make_interval(secs => %(ttl)s)
    WHERE holder = ANY(%(runs)s) RETURNING holder
)
SELECT r.run_id, r.cancel_action FROM agent_runs r
WHERE r.run_id = ANY(%(runs)s) AND (r.cancel_action IS NOT NULL OR NOT EXISTS (
    SELECT 1 FROM renewed WHERE renewed.holder = r.run_id))
"""
CANCEL_REQUESTS = "SELECT run_id, cancel_action FROM agent_runs WHERE run_id = ANY(%s) AND cancel_action IS NOT NULL"
# The end of a run: its row, its thread's cached state and the thread's lease in one
# statement, then a wake-up for whoever waits on the thread.
FINISH = """
WITH run AS (
    UPDATE agent_runs SET status = %(status)s, output = COALESCE(%(output)s, %(values)s, output), error = %(error)s,
        updated_at = now(), ended_at = now()
    WHERE run_id = %(run_id)s RETURNING run_id
), released AS (
    DELETE FROM agent_thread_leases WHERE thread_key = %(key)s AND holder = %(run_id)s RETURNING 1
), thread AS (
    UPDATE agent_threads t SET updated_at = now(),
        status = CASE WHEN EXISTS (SELECT 1 FROM agent_runs e WHERE e.thread_key = %(key)s
                                   AND e.status = 'pending' AND e.run_id <> %(run_id)s) THEN 'busy'
                      ELSE %(thread_status)s END,
        state_values = CASE WHEN %(record_state)s THEN %(values)s ELSE t.state_values END,
        interrupts = CASE WHEN %(record_state)s THEN %(interrupts)s ELSE t.interrupts END,
        pending = CASE WHEN %(record_state)s THEN %(pending)s ELSE t.pending END,
        state_updated_at = CASE WHEN %(record_state)s THEN now() ELSE t.state_updated_at END
    WHERE thread_key = %(key)s RETURNING 1
)
SELECT pg_notify(%(channel)s, 'thread:' || %(key)s) FROM (SELECT count(*) FROM run) AS done
"""
WITHDRAW = """
WITH gone AS (DELETE FROM agent_runs WHERE run_id = %(run_id)s RETURNING thread_key),
released AS (DELETE FROM agent_thread_leases WHERE holder = %(run_id)s RETURNING 1),
thread AS (
    UPDATE agent_threads t SET status = CASE
        WHEN EXISTS (SELECT 1 FROM agent_runs e WHERE e.thread_key = t.thread_key AND e.status IN ('pending', 'running')
                     AND e.run_id <> %(run_id)s) THEN 'busy'
        WHEN t.pending IS NOT NULL THEN 'interrupted' ELSE 'idle' END
    FROM gone WHERE t.thread_key = gone.thread_key RETURNING 1
)
SELECT pg_notify(%(channel)s, 'thread:' || thread_key) FROM gone
"""
# A run this worker stops at shutdown: back to waiting, first in its thread's line.
REQUEUE = """
WITH released AS (DELETE FROM agent_thread_leases WHERE holder = %(run_id)s RETURNING thread_key)
UPDATE agent_runs SET status = 'pending', updated_at = now()
WHERE run_id = %(run_id)s AND status = 'running' AND durable
RETURNING pg_notify(%(channel)s, 'run:' || run_id)
"""
GET = f"SELECT {RUN_COLUMNS} FROM agent_runs r WHERE r.run_id = %(run_id)s AND r.thread_key = %(key)s"
GET_ANY = f"SELECT {RUN_COLUMNS} FROM agent_runs r WHERE r.run_id = %(run_id)s AND r.tenant = %(tenant)s"
LIST = f"""SELECT {RUN_COLUMNS} FROM agent_runs r WHERE r.thread_key = %(key)s
           AND (%(status)s::text IS NULL OR r.status = %(status)s)
           ORDER BY r.seq DESC LIMIT %(limit)s OFFSET %(offset)s"""
ACTIVE_ON_THREAD = """SELECT run_id, status FROM agent_runs
                      WHERE thread_key = %s AND status IN ('pending', 'running') ORDER BY seq"""
REQUEST_CANCEL = """
WITH flagged AS (
    UPDATE agent_runs SET cancel_action = %(action)s, updated_at = now()
    WHERE run_id = ANY(%(runs)s) AND status = 'running' RETURNING run_id
), dropped AS (
    UPDATE agent_runs SET status = 'interrupted', cancel_action = %(action)s, updated_at = now(), ended_at = now()
    WHERE run_id = ANY(%(runs)s) AND status = 'pending' RETURNING run_id
)
SELECT pg_notify(%(channel)s, 'cancel:' || run_id) FROM flagged
UNION ALL SELECT pg_notify(%(channel)s, 'run:' || run_id) FROM dropped
"""
DELETE = "DELETE FROM agent_runs WHERE run_id = %(run_id)s AND thread_key = %(key)s AND status NOT IN ('running')"
# LangServe turns are not retaken: their caller has an error already and may have
# sent the turn again. When their worker dies they end as errors.
ABANDONED = """
UPDATE agent_runs r SET status = 'error', updated_at = now(), ended_at = now(),
    error = '{"error": "WorkerLost", "message": "the worker running this turn stopped"}'
WHERE r.status = 'running' AND NOT r.durable AND NOT EXISTS (
    SELECT 1 FROM agent_thread_leases l WHERE l.holder = r.run_id AND l.expires_at > now())
RETURNING r.thread_key
"""
GIVE_UP_WAITING = """DELETE FROM agent_runs WHERE status = 'pending' AND attached
                     AND waiter_deadline < now() - interval '1 minute'"""


@dataclass
class Run:
    run_id: str
    tenant: str
    thread_key: str
    status: str
    kwargs: dict[str, Any]
    metadata: dict[str, Any]
    multitask_strategy: str
    durable: bool
    attempts: int
    store_events: bool
    temporary: bool
    created_at: datetime
    updated_at: datetime
    assistant_id: str = ASSISTANT_ID
    cancel_action: str | None = None
    output: Any = None
    error: Any = None
    webhook: str | None = None
    attached: bool = False
    ended_at: datetime | None = None
    # (id, has writes) of the thread's latest checkpoint (id None: there is none) as
    # this run took the thread in the statement that stored it; for its first turn.
    latest_checkpoint: tuple[str | None, bool] | None = None

    @property
    def thread_id(self) -> str:
        return thread_id_in(self.thread_key)

    def take_latest_checkpoint(self) -> tuple[str | None, bool] | None:
        """`latest_checkpoint`, once: it holds for the run's first turn only."""
        latest, self.latest_checkpoint = self.latest_checkpoint, None
        return latest

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Run:
        return cls(
            run_id=str(row["run_id"]),
            tenant=row["tenant"],
            thread_key=row["thread_key"],
            assistant_id=str(row["assistant_id"]),
            status=row["status"],
            kwargs=row["kwargs"],
            metadata=row["metadata"],
            multitask_strategy=row["multitask_strategy"],
            durable=row["durable"],
            attached=row["attached"],
            attempts=row["attempts"],
            cancel_action=row["cancel_action"],
            store_events=row["store_events"],
            temporary=row["temporary"],
            output=row["output"],
            error=row["error"],
            webhook=row["webhook"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            ended_at=row["ended_at"],
        )


@dataclass
class NewRun:
    """What a caller asks to run. `kwargs` is the run as the API describes it
    (input or command, stream modes, config, checkpoint); the core reads it back
    when it executes the run, on whichever worker."""

    tenant: str
    thread_key: str
    kwargs: dict[str, Any]
    strategy: Strategy = "enqueue"
    metadata: dict[str, Any] = field(default_factory=dict)
    durable: bool = True
    attached: bool = False
    store_events: bool = False
    temporary: bool = False
    webhook: str | None = None
    thread_metadata: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # False: leave it to the queue even when its thread is free (an `api` process
    # leaves background runs to the workers).
    claim_now: bool = True
    # The thread must exist already (else nothing is stored and submit says None).
    must_exist: bool = False
    # The idempotency key (its owner token) of the request that starts this run.
    idempotency_owner: str | None = None


@dataclass(frozen=True)
class Submitted:
    run: Run
    claimed: bool
    pending: Any  # the action the thread waits on, as the previous run left it


@dataclass(frozen=True)
class Ending:
    status: str
    thread_status: str = "idle"
    output: Any = None
    error: Any = None
    record_state: bool = False
    values: Any = None
    interrupts: dict[str, Any] = field(default_factory=dict)
    pending: list[dict[str, Any]] | None = None


class RunStore:
    def __init__(self, pool: Pool, *, ttl_s: float, max_runs_per_tenant: int, wait_s: float) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.max_runs = max_runs_per_tenant
        self.wait_s = wait_s

    @contextlib.asynccontextmanager
    async def _claiming(self, tenants: list[str]) -> AsyncIterator[AsyncConnection[DictRow]]:
        """A connection to take leases on. With a per-tenant run limit, inside a
        transaction holding the tenant's lock, so that counting the tenant's live
        runs and taking one more cannot interleave with another worker's: the
        limit is exact under a burst."""
        async with self.pool.connection() as conn:
            if not self.max_runs:
                yield conn
                return
            async with conn.transaction():
                for tenant in sorted(set(tenants)):
                    await conn.execute(LOCK_TENANT, (tenant,))
                yield conn

    def _params(self) -> dict[str, Any]:
        return {"ttl": self.ttl_s, "max_runs": self.max_runs, "channel": CHANNEL}

    async def submit(self, new: NewRun) -> Submitted | None:
        """Store the run, taking its thread now if it is free. None when the thread
        is busy and the strategy is not to queue (`reject`), or does not exist and
        must."""
        params = {
            **self._params(),
            "run_id": new.run_id,
            "tenant": new.tenant,
            "key": new.thread_key,
            "thread_id": thread_id_in(new.thread_key),
            "stamp": Jsonb({**new.thread_metadata, **THREAD_STAMP}),
            "assistant_id": ASSISTANT_ID,
            "kwargs": Jsonb(new.kwargs),
            "metadata": Jsonb(new.metadata),
            "strategy": new.strategy,
            "durable": new.durable,
            "attached": new.attached,
            "wait_s": self.wait_s + 5,
            "store_events": new.store_events,
            "temporary": new.temporary,
            "webhook": new.webhook,
            "queue": new.strategy != "reject",
            "claim_now": new.claim_now,
            "must_exist": new.must_exist,
            "idempotency_owner": new.idempotency_owner,
        }
        async with self._claiming([new.tenant]) as conn:
            row = await (await conn.execute(SUBMIT, params)).fetchone()
        if row is None:
            return None
        run = Run(
            run_id=new.run_id,
            tenant=new.tenant,
            thread_key=new.thread_key,
            status=row["status"],
            kwargs=new.kwargs,
            metadata=new.metadata,
            multitask_strategy=new.strategy,
            durable=new.durable,
            attached=new.attached,
            attempts=1 if row["status"] == "running" else 0,
            store_events=new.store_events or row["status"] != "running",
            temporary=new.temporary,
            webhook=new.webhook,
            created_at=row["created_at"],
            updated_at=row["created_at"],
        )
        claimed = row["status"] == "running"
        if claimed:
            run.latest_checkpoint = (row["latest_checkpoint"], bool(row["latest_has_writes"]))
        return Submitted(run=run, claimed=claimed, pending=row["pending"])

    async def claim_waiting(self, run: Run) -> tuple[bool, Any]:
        """For an attached waiter: (took the thread, the thread's pending action)."""
        async with self._claiming([run.tenant]) as conn:
            row = await (await conn.execute(CLAIM_WAITING, {**self._params(), "run_id": run.run_id})).fetchone()
        if row is None:
            return False, None
        run.status, run.attempts = "running", run.attempts + 1
        return True, row["pending"]

    async def queue_state(self) -> tuple[bool, bool]:
        """(a run can be taken now, one may be soon): one statement, no transaction,
        for the common case of an empty queue."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute(QUEUE_STATE)).fetchone()
        return (bool(row["claimable"]), bool(row["waiting"])) if row else (False, False)

    async def claim_next(self, limit: int = 8) -> Run | None:
        """The next run any worker may take, taken; None when there is none."""
        async with self.pool.connection() as conn, conn.transaction():
            candidates = await (await conn.execute(CANDIDATES, {"limit": limit})).fetchall()
            for candidate in candidates:
                if self.max_runs:
                    await conn.execute(LOCK_TENANT, (candidate["tenant"],))
                params = {**self._params(), "run_id": candidate["run_id"]}
                if row := await (await conn.execute(CLAIM_CANDIDATE, params)).fetchone():
                    return Run.from_row(row)
        return None

    async def renew(self, run_ids: list[str]) -> dict[str, str | None]:
        """Renew the leases of these runs; returns the runs that were asked to stop
        (their cancel action) or that lost their lease (None)."""
        if not run_ids:
            return {}
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(RENEW, {"ttl": self.ttl_s, "runs": run_ids})).fetchall()
        return {str(row["run_id"]): row["cancel_action"] for row in rows}

    async def cancel_requests(self, run_ids: list[str]) -> dict[str, str]:
        if not run_ids:
            return {}
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(CANCEL_REQUESTS, (run_ids,))).fetchall()
        return {str(row["run_id"]): row["cancel_action"] for row in rows}

    async def finish(self, run: Run, ending: Ending) -> None:
        params = {
            "channel": CHANNEL,
            "run_id": run.run_id,
            "key": run.thread_key,
            "status": ending.status,
            "thread_status": ending.thread_status,
            # The answer is the state itself unless the run paused: sent once, then.
            "output": as_jsonb(ending.output)
            if ending.output is not None and ending.output is not ending.values
            else None,
            "error": Jsonb(ending.error) if ending.error is not None else None,
            "record_state": ending.record_state,
            "values": as_jsonb(ending.values) if ending.values is not None else None,
            "interrupts": Jsonb(ending.interrupts),
            "pending": Jsonb(ending.pending) if ending.pending else None,
        }
        async with self.pool.connection() as conn:
            await conn.execute(FINISH, params)
        run.status, run.error = ending.status, ending.error
        if ending.output is not None:
            run.output = ending.output

    async def requeue(self, run: Run) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(REQUEUE, {"run_id": run.run_id, "channel": CHANNEL})

    async def withdraw(self, run: Run) -> None:
        """Remove a run that was refused before it did anything, and free its thread."""
        async with self.pool.connection() as conn:
            await conn.execute(WITHDRAW, {"run_id": run.run_id, "channel": CHANNEL})

    async def get(self, thread_key: str, run_id: str) -> Run | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(GET, {"run_id": run_id, "key": thread_key})).fetchone()
        return Run.from_row(row) if row else None

    async def get_for_tenant(self, tenant: str, run_id: str) -> Run | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(GET_ANY, {"run_id": run_id, "tenant": tenant})).fetchone()
        return Run.from_row(row) if row else None

    async def list_runs(self, thread_key: str, *, limit: int, offset: int, status: str | None) -> list[Run]:
        params = {"key": thread_key, "limit": limit, "offset": offset, "status": status}
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(LIST, params)).fetchall()
        return [Run.from_row(row) for row in rows]

    async def active_on(self, thread_key: str) -> list[str]:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(ACTIVE_ON_THREAD, (thread_key,))).fetchall()
        return [str(row["run_id"]) for row in rows]

    async def request_cancel(self, run_ids: list[str], action: str) -> None:
        """Recorded in the row, so whichever worker runs the run sees it; waiting
        runs simply end."""
        async with self.pool.connection() as conn:
            await conn.execute(REQUEST_CANCEL, {"runs": run_ids, "action": action, "channel": CHANNEL})

    async def delete(self, thread_key: str, run_id: str) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute(DELETE, {"run_id": run_id, "key": thread_key})
        return cur.rowcount > 0

    async def end_abandoned(self) -> list[str]:
        """End the non-durable runs whose worker died, and drop attached waiters
        long gone; returns the threads freed."""
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(ABANDONED)).fetchall()
            await conn.execute(GIVE_UP_WAITING)
            for row in rows:
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"thread:{row['thread_key']}"))
        return [row["thread_key"] for row in rows]
