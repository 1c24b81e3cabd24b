"""Requests per tenant per minute, counted in PostgreSQL so every worker shares it.

PostgreSQL rather than Redis: it is already a hard dependency, so the limit adds
no moving part, and one upsert per request is cheap beside a model call."""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg.rows import DictRow

COUNT = """
INSERT INTO agent_rate_windows AS w (tenant, window_start, requests)
VALUES (%s, date_trunc('minute', now()), 1)
ON CONFLICT (tenant, window_start) DO UPDATE SET requests = w.requests + 1
RETURNING requests, ceil(extract(epoch FROM date_trunc('minute', now()) + interval '1 minute' - now()))::int AS reset_s
"""


class RateLimited(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(retry_after_s)
        self.retry_after_s = retry_after_s


async def count_request(conn: AsyncConnection[DictRow], tenant: str, per_minute: int) -> None:
    if per_minute <= 0:
        return
    row = await (await conn.execute(COUNT, (tenant,))).fetchone()
    if row is not None and row["requests"] > per_minute:
        raise RateLimited(max(1, int(row["reset_s"])))
