"""A run's events, and the wake-ups between workers.

A running run's events go to a local stream that followers on the same worker
read as they come. When another worker may read them (a resumable stream, or a
run that waited in the queue), they are also stored in order, with their sequence
number as the id: a follower anywhere reads what came after the id it has, then
waits for more. Wake-ups (a thread freed, new events, a cancel) travel by
LISTEN/NOTIFY on a connection of their own when the database allows it; every
wait also has a timeout, so polling carries on where LISTEN cannot work (a
transaction pooler, a lost connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from agentserve.core.runs import CHANNEL
from agentserve.core.serialize import as_jsonb

log = logging.getLogger(__name__)
Pool = AsyncConnectionPool[AsyncConnection[DictRow]]

APPEND = "INSERT INTO agent_run_events (run_id, seq, event, data) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"
READ = """SELECT seq, event, data FROM agent_run_events WHERE run_id = %s AND seq > %s
          ORDER BY seq LIMIT 500"""
NOTIFY = "SELECT pg_notify(%s, %s)"
LAST_SEQ = "SELECT max(seq) AS seq FROM agent_run_events WHERE run_id = %s"


@dataclass(frozen=True)
class Event:
    seq: int
    event: str
    data: Any


class Wakeups:
    """Topics ('thread:<key>', 'run:<id>', 'cancel:<id>', 'queue') that waiters on
    this worker wait for; fed by one LISTEN connection."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._listeners: list[Callable[[str], None]] = []
        self.listening = False

    def on_notify(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def wake(self, topic: str) -> None:
        for event in self._waiters.get(topic, ()):
            event.set()
        # The queue hears of every run ("queue:run") and every thread set free
        # ("queue:thread"), and listens to the second only while runs wait in it.
        kind = topic.partition(":")[0]
        if kind in ("thread", "run"):
            for event in self._waiters.get(f"queue:{kind}", ()):
                event.set()
        for listener in self._listeners:
            listener(topic)

    async def wait(self, topic: str, timeout: float) -> None:
        """Until the topic is woken or the timeout passes, whichever is first."""
        await self.wait_any([topic], timeout)

    async def wait_any(self, topics: Sequence[str], timeout: float) -> None:
        """Until one of the topics is woken or the timeout passes."""
        event = asyncio.Event()
        for topic in topics:
            self._waiters[topic].add(event)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await event.wait()
        finally:
            for topic in topics:
                self._waiters[topic].discard(event)
                if not self._waiters[topic]:
                    del self._waiters[topic]

    async def listen_forever(self, url: str, connect_kwargs: dict[str, Any]) -> None:
        """LISTEN on a connection of its own, reconnecting after failures. Where the
        server refuses LISTEN (a transaction pooler), waiters fall back to polling."""
        delay = 1.0
        while True:
            try:
                async with await AsyncConnection.connect(
                    url, autocommit=True, row_factory=dict_row, **connect_kwargs
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening, delay = True, 1.0
                    async for notice in conn.notifies():
                        self.wake(notice.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # polling carries on meanwhile
                log.warning("LISTEN connection lost (%s); polling until it is back", type(exc).__name__)
            self.listening = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


@dataclass
class LocalStream:
    """The events of a run executing on this worker, for followers here. While
    nobody follows (a `wait`, a background run nobody streams) the run's chunks
    need not be turned into JSON at all: `wanted` says whether anyone may read them."""

    run_id: str
    events: list[Event] = field(default_factory=list)
    done: bool = False
    followers: int = 0
    expected: bool = False  # a follower is on its way (the request that started the run)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def wanted(self) -> bool:
        return self.expected or self.followers > 0

    def publish(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def close(self) -> None:
        self.done = True
        self._changed.set()

    async def follow(self, after: int = 0) -> AsyncIterator[Event]:
        index = 0
        self.followers += 1
        try:
            while True:
                while index < len(self.events):
                    event = self.events[index]
                    index += 1
                    if event.seq > after:
                        yield event
                if self.done:
                    return
                self._changed.clear()
                if index < len(self.events):
                    continue
                await self._changed.wait()
        finally:
            self.followers -= 1

    async def closed(self) -> None:
        while not self.done:
            self._changed.clear()
            if self.done:
                return
            await self._changed.wait()


class EventLog:
    """Stored events of runs, read by sequence number."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def append(self, run_id: str, events: list[Event]) -> None:
        if not events:
            return
        rows = [(run_id, e.seq, e.event, as_jsonb(e.data)) for e in events]
        async with self.pool.connection() as conn:
            async with conn.cursor() as cur:
                await cur.executemany(APPEND, rows)
            await conn.execute(NOTIFY, (CHANNEL, f"run:{run_id}"))

    async def last_seq(self, run_id: str) -> int:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(LAST_SEQ, (run_id,))).fetchone()
        return int(row["seq"] or 0) if row else 0

    async def read(self, run_id: str, after: int) -> list[Event]:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(READ, (run_id, after))).fetchall()
        return [Event(row["seq"], row["event"], row["data"]) for row in rows]
