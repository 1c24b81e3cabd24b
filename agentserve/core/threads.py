"""The thread store: who owns which thread, its metadata and cached state, its
checkpoints (state and history), and erasing it.

Every read is scoped to the caller's tenant; another tenant's thread is simply not
found, so existence is never confirmed. Ownership is checked before any
checkpointer call, since the checkpointer's keys are global.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from langchain_core.messages import convert_to_messages
from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import StateSnapshot
from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from agentserve.core.errors import Conflict, Invalid, NotFound
from agentserve.core.identity import thread_key_for
from agentserve.core.leases import ThreadLeases
from agentserve.core.runs import Pool
from agentserve.core.serialize import jsonable
from agentserve.core.turns import interrupts_of

THREAD_COLUMNS = "thread_id, created_at, updated_at, state_updated_at, metadata, status, state_values, interrupts"
CREATE = f"""INSERT INTO agent_threads (thread_key, tenant, thread_id, metadata) VALUES (%s, %s, %s, %s)
             ON CONFLICT (thread_key) DO NOTHING RETURNING {THREAD_COLUMNS}"""
GET = f"SELECT {THREAD_COLUMNS} FROM agent_threads WHERE thread_key = %s"
PATCH = f"""UPDATE agent_threads SET metadata = metadata || %s, updated_at = now()
            WHERE thread_key = %s RETURNING {THREAD_COLUMNS}"""
SORTABLE = {"thread_id", "status", "created_at", "updated_at", "state_updated_at"}
# Everything stored under a thread key: what a right-to-erasure request removes.
ERASE = [
    "DELETE FROM checkpoint_writes WHERE thread_id = ANY(%(keys)s)",
    "DELETE FROM checkpoint_blobs WHERE thread_id = ANY(%(keys)s)",
    "DELETE FROM checkpoints WHERE thread_id = ANY(%(keys)s)",
    "DELETE FROM agent_transcript WHERE thread_key = ANY(%(keys)s)",
    """DELETE FROM agent_run_events WHERE run_id IN (
           SELECT run_id FROM agent_runs WHERE thread_key = ANY(%(keys)s))""",
    "DELETE FROM agent_runs WHERE thread_key = ANY(%(keys)s)",
    "DELETE FROM agent_threads WHERE thread_key = ANY(%(keys)s)",
]
HIDDEN_METADATA = frozenset({"thread_id", "tenant"})


async def erase_threads(conn: AsyncConnection[DictRow], keys: list[str]) -> None:
    async with conn.transaction():
        for statement in ERASE:
            await conn.execute(statement, {"keys": keys})  # type: ignore[arg-type]


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def thread_json(row: dict[str, Any]) -> dict[str, Any]:
    """A thread as the LangGraph Server API shows it, the same from every route."""
    return {
        "thread_id": row["thread_id"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
        "state_updated_at": iso(row["state_updated_at"]),
        "metadata": row["metadata"],
        "status": row["status"],
        "config": {},
        "values": row["state_values"],
        "interrupts": row["interrupts"] or {},
    }


def checkpoint_json(config: RunnableConfig | None, thread_id: str) -> dict[str, Any] | None:
    configurable = (config or {}).get("configurable") or {}
    if not configurable.get("checkpoint_id"):
        return None
    return {
        "thread_id": thread_id,
        "checkpoint_ns": configurable.get("checkpoint_ns", ""),
        "checkpoint_id": configurable["checkpoint_id"],
        "checkpoint_map": configurable.get("checkpoint_map") or {},
    }


def state_json(snapshot: StateSnapshot, thread_id: str) -> dict[str, Any]:
    """A checkpoint as a ThreadState: what RemoteGraph and useStream read."""
    checkpoint = checkpoint_json(snapshot.config, thread_id)
    parent = checkpoint_json(snapshot.parent_config, thread_id)
    tasks = [
        {
            "id": task.id,
            "name": task.name,
            "path": jsonable(task.path),
            "error": str(task.error) if task.error else None,
            "interrupts": interrupts_of(task.interrupts),
            "checkpoint": None,
            "state": None,
            "result": jsonable(task.result),
        }
        for task in snapshot.tasks
    ]
    metadata = {k: v for k, v in (snapshot.metadata or {}).items() if k not in HIDDEN_METADATA}
    return {
        "values": jsonable(snapshot.values),
        "next": list(snapshot.next),
        "tasks": tasks,
        "checkpoint": checkpoint or {"thread_id": thread_id, "checkpoint_ns": "", "checkpoint_id": None},
        "parent_checkpoint": parent,
        "metadata": jsonable(metadata),
        "created_at": snapshot.created_at,
        "interrupts": interrupts_of(snapshot.interrupts),
        "checkpoint_id": checkpoint["checkpoint_id"] if checkpoint else None,
        "parent_checkpoint_id": parent["checkpoint_id"] if parent else None,
    }


class ThreadStore:
    def __init__(self, pool: Pool, graph: CompiledStateGraph, leases: ThreadLeases) -> None:
        self.pool = pool
        self.graph = graph
        self.leases = leases

    async def create(
        self, tenant: str, thread_id: str | None, metadata: dict[str, Any], if_exists: Literal["raise", "do_nothing"]
    ) -> dict[str, Any]:
        thread_id = thread_id or str(uuid.uuid4())
        key = thread_key_for(tenant, thread_id)
        async with self.pool.connection() as conn:
            row = await (await conn.execute(CREATE, (key, tenant, thread_id, Jsonb(metadata)))).fetchone()
            if row is None:
                if if_exists == "raise":
                    raise Conflict(f"thread {thread_id!r} already exists")
                row = await (await conn.execute(GET, (key,))).fetchone()
        assert row is not None
        return thread_json(row)

    async def get(self, tenant: str, thread_id: str) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(GET, (thread_key_for(tenant, thread_id),))).fetchone()
        if row is None:
            raise NotFound(f"thread {thread_id!r} not found")
        return thread_json(row)

    async def owned_key(self, tenant: str, thread_id: str) -> str:
        await self.get(tenant, thread_id)
        return thread_key_for(tenant, thread_id)

    async def patch(self, tenant: str, thread_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(PATCH, (Jsonb(metadata), thread_key_for(tenant, thread_id)))).fetchone()
        if row is None:
            raise NotFound(f"thread {thread_id!r} not found")
        return thread_json(row)

    async def search(
        self,
        tenant: str,
        *,
        metadata: dict[str, Any],
        values: dict[str, Any] | None,
        status: str | None,
        ids: list[str] | None,
        limit: int,
        offset: int,
        sort_by: str,
        sort_order: Literal["asc", "desc"],
    ) -> list[dict[str, Any]]:
        if sort_by not in SORTABLE:
            raise Invalid(f"sort_by must be one of {sorted(SORTABLE)}")
        direction = "ASC" if sort_order == "asc" else "DESC"
        query = f"""SELECT {THREAD_COLUMNS} FROM agent_threads
            WHERE tenant = %(tenant)s AND metadata @> %(metadata)s
              AND (%(status)s::text IS NULL OR status = %(status)s)
              AND (%(ids)s::text[] IS NULL OR thread_id = ANY(%(ids)s))
              AND (%(values)s::jsonb IS NULL OR state_values @> %(values)s)
            ORDER BY {sort_by} {direction}, thread_id {direction} LIMIT %(limit)s OFFSET %(offset)s"""
        params = {
            "tenant": tenant,
            "metadata": Jsonb(metadata),
            "status": status,
            "ids": ids,
            "values": Jsonb(values) if values else None,
            "limit": limit,
            "offset": offset,
        }
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(query, params)).fetchall()  # type: ignore[arg-type]
        return [thread_json(row) for row in rows]

    async def state(self, tenant: str, thread_id: str, checkpoint_id: str | None = None) -> dict[str, Any]:
        key = await self.owned_key(tenant, thread_id)
        configurable: dict[str, Any] = {"thread_id": key, "checkpoint_ns": ""}
        if checkpoint_id:
            configurable["checkpoint_id"] = checkpoint_id
        snapshot = await self.graph.aget_state({"configurable": configurable})
        if checkpoint_id and snapshot.created_at is None:
            raise NotFound(f"checkpoint {checkpoint_id!r} not found on thread {thread_id!r}")
        return state_json(snapshot, thread_id)

    async def history(
        self,
        tenant: str,
        thread_id: str,
        *,
        limit: int,
        before: str | None,
        metadata: dict[str, Any] | None,
        checkpoint_id: str | None,
    ) -> list[dict[str, Any]]:
        """Newest first."""
        key = await self.owned_key(tenant, thread_id)
        configurable: dict[str, Any] = {"thread_id": key, "checkpoint_ns": ""}
        if checkpoint_id:
            configurable["checkpoint_id"] = checkpoint_id
        before_config: RunnableConfig | None = {"configurable": {"checkpoint_id": before}} if before else None
        return [
            state_json(snapshot, thread_id)
            async for snapshot in self.graph.aget_state_history(
                {"configurable": configurable}, filter=metadata or None, before=before_config, limit=limit
            )
        ]

    async def update_state(
        self, tenant: str, thread_id: str, values: Any, as_node: str | None, checkpoint_id: str | None
    ) -> dict[str, Any]:
        """A new checkpoint with these values merged in, as if `as_node` wrote them,
        written while holding the thread, so no run writes beside it."""
        nodes = set(self.graph.nodes) - {"__start__"}
        if as_node is not None and as_node not in nodes:
            raise Invalid(f"as_node must be one of {sorted(nodes)}")
        if values is not None:
            values = self._checked_values(values)
        key = await self.owned_key(tenant, thread_id)
        configurable: dict[str, Any] = {"thread_id": key, "checkpoint_ns": ""}
        if checkpoint_id:
            configurable["checkpoint_id"] = checkpoint_id
        async with self.leases.hold(tenant, key):
            config = await self.graph.aupdate_state({"configurable": configurable}, values, as_node=as_node)
        return {"checkpoint": checkpoint_json(config, thread_id)}

    @staticmethod
    def _checked_values(values: Any) -> Any:
        items = values if isinstance(values, list) else [values]
        for item in items:
            if not isinstance(item, dict) or set(item) - {"messages"}:
                raise Invalid("values must be an object with only 'messages' (or a list of such objects)")
            messages = item.get("messages")
            try:
                convert_to_messages(messages if isinstance(messages, list) else [messages])  # type: ignore[list-item]
            except (ValueError, TypeError, NotImplementedError, KeyError) as exc:
                raise Invalid(f"values.messages: {exc}") from exc
        return values

    async def delete(self, tenant: str, thread_id: str) -> None:
        """Erase every checkpoint, transcript row, run and event of the thread, while
        holding it, so no run writes beside it."""
        key = await self.owned_key(tenant, thread_id)
        async with self.leases.hold(tenant, key), self.pool.connection() as conn:
            await erase_threads(conn, [key])
