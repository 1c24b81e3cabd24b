"""Refunds: the one tool that acts on the world, recorded in PostgreSQL.

Recording is idempotent per (tenant, order): a resumed or retried run that
reaches the tool again finds the refund already issued and never pays twice."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool

RECORD = """
WITH issued AS (
    INSERT INTO agent_refunds (tenant, order_id, amount, thread_key)
    VALUES (%(tenant)s, %(order_id)s, %(amount)s, %(thread_key)s)
    ON CONFLICT (tenant, order_id) DO NOTHING
    RETURNING refund_id, amount, true AS new
)
SELECT refund_id, amount, new FROM issued
UNION ALL
SELECT refund_id, amount, false FROM agent_refunds WHERE tenant = %(tenant)s AND order_id = %(order_id)s
LIMIT 1
"""


@dataclass(frozen=True)
class Refund:
    refund_id: str
    amount: Decimal
    new: bool


class RefundLedger:
    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[DictRow]]) -> None:
        self.pool = pool

    async def record(self, tenant: str, order_id: str, amount: Decimal, thread_key: str) -> Refund:
        async with self.pool.connection() as conn:
            params = {"tenant": tenant, "order_id": order_id, "amount": amount, "thread_key": thread_key}
            row = await (await conn.execute(RECORD, params)).fetchone()
        assert row is not None
        return Refund(refund_id=str(row["refund_id"]), amount=row["amount"], new=bool(row["new"]))
