"""The caller's threads: the registry of who owns which thread, and the thread API.

Every route is scoped to the authenticated tenant; another tenant's thread answers
404 exactly like a thread that does not exist, so existence is never confirmed.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from langchain_core.runnables import RunnableConfig
from psycopg import AsyncConnection
from psycopg.rows import DictRow

from agentserve.auth import CurrentPrincipal
from agentserve.runs import thread_key_for

OWNED = "SELECT 1 FROM agent_threads WHERE thread_key = %s"
LIST = """SELECT thread_id, created_at, updated_at FROM agent_threads
          WHERE tenant = %(tenant)s AND (%(after)s::timestamptz IS NULL
                OR (updated_at, thread_id) < (%(after)s::timestamptz, %(after_id)s::text))
          ORDER BY updated_at DESC, thread_id DESC LIMIT %(limit)s"""
# Everything stored under a thread key: what a right-to-erasure request removes.
ERASE = [
    "DELETE FROM checkpoint_writes WHERE thread_id = ANY(%(keys)s)",
    "DELETE FROM checkpoint_blobs WHERE thread_id = ANY(%(keys)s)",
    "DELETE FROM checkpoints WHERE thread_id = ANY(%(keys)s)",
    "DELETE FROM agent_transcript WHERE thread_key = ANY(%(keys)s)",
    "DELETE FROM agent_threads WHERE thread_key = ANY(%(keys)s)",
]

router = APIRouter(prefix="/threads", tags=["threads"])
Limit = Annotated[int, Query(ge=1, le=100)]


async def erase_threads(conn: AsyncConnection[DictRow], keys: list[str]) -> None:
    async with conn.transaction():
        for statement in ERASE:
            await conn.execute(statement, {"keys": keys})  # type: ignore[arg-type]


async def owned_thread_key(request: Request, tenant: str, thread_id: str) -> str:
    key = thread_key_for(tenant, thread_id)
    async with request.app.state.pool.connection() as conn:
        if await (await conn.execute(OWNED, (key,))).fetchone() is None:
            raise HTTPException(404, f"no thread {thread_id!r}")
    return key


def message_json(message: Any) -> dict[str, Any]:
    return dict(message.model_dump(mode="json"))


def encode_cursor(updated_at: datetime, thread_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([updated_at.isoformat(), thread_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        updated_at, thread_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return str(updated_at), str(thread_id)
    except (ValueError, TypeError) as exc:
        raise HTTPException(400, "cursor is not one this API returned; pass next_cursor unchanged") from exc


@router.get("")
async def list_threads(
    request: Request, principal: CurrentPrincipal, limit: Limit = 20, cursor: str | None = None
) -> dict[str, Any]:
    """The caller's threads, most recently active first."""
    after, after_id = decode_cursor(cursor) if cursor else (None, None)
    params = {"tenant": principal.tenant, "after": after, "after_id": after_id, "limit": limit}
    async with request.app.state.pool.connection() as conn:
        rows = await (await conn.execute(LIST, params)).fetchall()
    threads = [
        {
            "thread_id": r["thread_id"],
            "created_at": r["created_at"].isoformat(),
            "updated_at": r["updated_at"].isoformat(),
        }
        for r in rows
    ]
    next_cursor = encode_cursor(rows[-1]["updated_at"], rows[-1]["thread_id"]) if len(rows) == limit else None
    return {"threads": threads, "next_cursor": next_cursor}


@router.get("/{thread_id}/state")
async def thread_state(request: Request, principal: CurrentPrincipal, thread_id: str) -> dict[str, Any]:
    """The whole conversation, and the action waiting for approval, if any."""
    key = await owned_thread_key(request, principal.tenant, thread_id)
    messages, pending = await request.app.state.agent.read_thread(key)
    return {"thread_id": thread_id, "messages": [message_json(m) for m in messages], "pending": pending}


@router.get("/{thread_id}/history")
async def thread_history(
    request: Request, principal: CurrentPrincipal, thread_id: str, limit: Limit = 20, before: str | None = None
) -> dict[str, Any]:
    """Checkpoints of the thread, newest first; pass `next_before` to page on."""
    key = await owned_thread_key(request, principal.tenant, thread_id)
    config: RunnableConfig = {"configurable": {"thread_id": key, "checkpoint_ns": ""}}
    before_config: RunnableConfig | None = {"configurable": {"checkpoint_id": before}} if before else None
    checkpoints = [
        {
            "checkpoint_id": item.config["configurable"]["checkpoint_id"],
            "parent_checkpoint_id": (item.parent_config or {}).get("configurable", {}).get("checkpoint_id"),
            "created_at": item.checkpoint["ts"],
            "step": item.metadata.get("step"),
            "source": item.metadata.get("source"),
        }
        async for item in request.app.state.saver.alist(config, before=before_config, limit=limit)
    ]
    next_before = checkpoints[-1]["checkpoint_id"] if len(checkpoints) == limit else None
    return {"thread_id": thread_id, "checkpoints": checkpoints, "next_before": next_before}


@router.delete("/{thread_id}", status_code=204)
async def delete_thread(request: Request, principal: CurrentPrincipal, thread_id: str) -> Response:
    """Erase every checkpoint, blob, write and transcript row of the thread."""
    key = await owned_thread_key(request, principal.tenant, thread_id)
    async with request.app.state.leases.hold(principal.tenant, [key]):
        async with request.app.state.pool.connection() as conn:
            await erase_threads(conn, [key])
    return Response(status_code=204)
