"""Idempotency keys: a request sent again with the same key (same tenant) gets the
first request's answer instead of running its turn again.

A key's row is claimed by the request that first sends it, with a lease renewed
while that request is in flight. It records the run the request started (when the
API names one), and the answer once it is complete. A retry finds the answer, or
waits for it, or, when the first request's process died: joins its run (durable
runs carry on elsewhere), or takes the key over and runs the turn itself (a
LangServe turn that died with its worker stored nothing).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from psycopg.types.json import Jsonb

from agentserve.core.errors import Invalid
from agentserve.core.runs import Pool

CLAIM = """
INSERT INTO agent_idempotency AS i (tenant, key, request_hash, state, owner, expires_at)
VALUES (%(tenant)s, %(key)s, %(hash)s, 'running', %(owner)s, now() + make_interval(secs => %(lease_s)s))
ON CONFLICT (tenant, key) DO UPDATE
    SET request_hash = EXCLUDED.request_hash, state = 'running', owner = EXCLUDED.owner,
        expires_at = EXCLUDED.expires_at, run_id = NULL, thread_id = NULL, status_code = NULL,
        headers = NULL, body = NULL, created_at = now()
    -- A key past the retention window is free again; one whose first request died
    -- before starting a durable run may be taken over by a retry of the same request.
    WHERE i.created_at < now() - make_interval(secs => %(retention_s)s)
       OR (i.state = 'running' AND i.expires_at < now() AND i.request_hash = EXCLUDED.request_hash AND (
           i.run_id IS NULL
           OR NOT EXISTS (SELECT 1 FROM agent_runs r WHERE r.run_id = i.run_id)
           -- a LangServe turn whose worker died before the turn was stored
           OR EXISTS (SELECT 1 FROM agent_runs r WHERE r.run_id = i.run_id AND NOT r.durable
                      AND (r.status IN ('error', 'interrupted', 'timeout')
                           OR (r.status = 'running' AND NOT EXISTS (
                               SELECT 1 FROM agent_thread_leases l WHERE l.holder = r.run_id
                                 AND l.expires_at > now()))))))
RETURNING owner
"""
READ = """SELECT i.request_hash, i.state, i.expires_at > now() AS alive, i.thread_id, i.run_id, i.status_code,
                 i.headers, i.body, r.durable AS run_durable, r.status AS run_status
          FROM agent_idempotency i LEFT JOIN agent_runs r ON r.run_id = i.run_id
          WHERE i.tenant = %s AND i.key = %s"""
RENEW = "UPDATE agent_idempotency SET expires_at = now() + make_interval(secs => %s) WHERE owner = %s"
COMPLETE = """UPDATE agent_idempotency SET state = 'done', status_code = %s, headers = %s, body = %s
              WHERE owner = %s"""
RELEASE = "DELETE FROM agent_idempotency WHERE owner = %s AND state = 'running'"


@dataclass(frozen=True)
class Previous:
    """What a retry finds of the first request with its key."""

    state: Literal["done", "running", "gone"]
    alive: bool = False
    thread_id: str | None = None
    run_id: str | None = None
    status_code: int | None = None
    headers: list[list[str]] | None = None
    body: bytes | None = None
    run_durable: bool | None = None
    run_status: str | None = None


class IdempotencyKeys:
    def __init__(self, pool: Pool, *, lease_s: float, retention_s: float) -> None:
        self.pool = pool
        self.lease_s = lease_s
        self.retention_s = retention_s

    async def claim(self, tenant: str, key: str, request_hash: str) -> str | None:
        """The owner token when this request is the first (or takes the key over);
        None when an earlier request holds the key."""
        owner = str(uuid.uuid4())
        params: dict[str, Any] = {
            "tenant": tenant,
            "key": key,
            "hash": request_hash,
            "owner": owner,
            "lease_s": self.lease_s,
            "retention_s": self.retention_s,
        }
        async with self.pool.connection() as conn:
            row = await (await conn.execute(CLAIM, params)).fetchone()
        return owner if row is not None and str(row["owner"]) == owner else None

    async def previous(self, tenant: str, key: str, request_hash: str) -> Previous:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(READ, (tenant, key))).fetchone()
        if row is None:
            return Previous(state="gone")
        if row["request_hash"] != request_hash:
            raise Invalid(
                "Idempotency-Key was already used for a different request; "
                "send a new key for a new request, or the same body to retry"
            )
        return Previous(
            state=row["state"],
            alive=bool(row["alive"]),
            thread_id=row["thread_id"],
            run_id=str(row["run_id"]) if row["run_id"] else None,
            status_code=row["status_code"],
            headers=row["headers"],
            body=bytes(row["body"]) if row["body"] is not None else None,
            run_durable=row["run_durable"],
            run_status=row["run_status"],
        )

    async def renew(self, owner: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(RENEW, (self.lease_s, owner))

    async def complete(self, owner: str, status_code: int, headers: list[list[str]], body: bytes) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(COMPLETE, (status_code, Jsonb(headers), body, owner))

    async def release(self, owner: str) -> None:
        """The request did not get an answer worth keeping: a retry runs it again."""
        async with self.pool.connection() as conn:
            await conn.execute(RELEASE, (owner,))
