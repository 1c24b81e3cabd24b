"""The full transcript of long threads, outside the checkpoint.

The graph state keeps a bounded window of recent messages, so that reading,
writing and sending a turn costs the same at turn 200 as at turn 2; older
messages move here, in order, and are read back only by the thread API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from langchain_core.messages import AnyMessage, BaseMessage, HumanMessage, message_to_dict, messages_from_dict
from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

APPEND = """INSERT INTO agent_transcript (thread_key, message_id, message) VALUES (%s, %s, %s)
            ON CONFLICT (thread_key, message_id) DO NOTHING"""
READ = "SELECT message FROM agent_transcript WHERE thread_key = %s ORDER BY seq"


def archivable_prefix(messages: Sequence[BaseMessage], keep: int) -> int:
    """How many of the oldest messages can leave the state: at least `keep` stay,
    and what stays opens on a human message, so no tool call loses its result."""
    cut = len(messages) - keep
    while cut > 0 and not isinstance(messages[cut], HumanMessage):
        cut -= 1
    return max(cut, 0)


class Transcript:
    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[DictRow]]) -> None:
        self.pool = pool

    async def append(self, thread_key: str, messages: Sequence[BaseMessage]) -> None:
        rows = [(thread_key, str(m.id), Jsonb(message_to_dict(m))) for m in messages]
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.executemany(APPEND, rows)

    async def read(self, thread_key: str) -> list[AnyMessage]:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(READ, (thread_key,))).fetchall()
        return messages_from_dict([row["message"] for row in rows])  # type: ignore[return-value]


@dataclass(frozen=True)
class MessageBound:
    """How many messages a thread's checkpoint keeps: the model's context window and
    a quarter more. Past that, the oldest move to the transcript, in a batch, so a
    checkpoint write that has to drop some is one in several."""

    transcript: Transcript
    keep: int

    @property
    def limit(self) -> int:
        return self.keep + max(4, self.keep // 4)

    async def bounded(self, thread_key: str, messages: list[AnyMessage]) -> list[AnyMessage]:
        """`messages` as the checkpoint should keep them (the same list if whole);
        what it drops is in the transcript first."""
        if len(messages) <= self.limit:
            return messages
        cut = archivable_prefix(messages, self.keep)
        if not cut:
            return messages
        await self.transcript.append(thread_key, messages[:cut])
        return messages[cut:]
