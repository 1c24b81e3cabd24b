"""Threads: create, get, patch, delete, search, state, history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from agentserve.auth import CurrentPrincipal
from agentserve.core.errors import Invalid
from agentserve.core.identity import thread_id_problem
from agentserve.core.threads import ThreadStore
from agentserve.edges.lgapi.bodies import (
    CheckpointRequest,
    HistoryRequest,
    StateUpdate,
    ThreadCreate,
    ThreadPatch,
    ThreadSearch,
)
from agentserve.edges.lgapi.runs import checked_thread_id

router = APIRouter(tags=["threads"])


def threads_of(request: Request) -> ThreadStore:
    return request.app.state.threads  # type: ignore[no-any-return]


@router.post("/threads")
async def create_thread(request: Request, principal: CurrentPrincipal, body: ThreadCreate) -> dict[str, Any]:
    if body.thread_id is not None and (problem := thread_id_problem(body.thread_id)):
        raise Invalid(f"thread_id {problem}")
    return await threads_of(request).create(principal.tenant, body.thread_id, body.metadata, body.if_exists)


@router.post("/threads/search")
async def search_threads(request: Request, principal: CurrentPrincipal, body: ThreadSearch) -> list[dict[str, Any]]:
    return await threads_of(request).search(
        principal.tenant,
        metadata=body.metadata,
        values=body.values,
        status=body.status,
        ids=body.ids,
        limit=body.limit,
        offset=body.offset,
        sort_by=body.sort_by,
        sort_order=body.sort_order,
    )


@router.get("/threads/{thread_id}")
async def get_thread(request: Request, principal: CurrentPrincipal, thread_id: str) -> dict[str, Any]:
    return await threads_of(request).get(principal.tenant, checked_thread_id(thread_id))


@router.patch("/threads/{thread_id}")
async def patch_thread(
    request: Request, principal: CurrentPrincipal, thread_id: str, body: ThreadPatch
) -> dict[str, Any]:
    return await threads_of(request).patch(principal.tenant, checked_thread_id(thread_id), body.metadata)


@router.delete("/threads/{thread_id}", status_code=204)
async def delete_thread(request: Request, principal: CurrentPrincipal, thread_id: str) -> Response:
    """Erase every checkpoint, transcript row, run and event of the thread."""
    await threads_of(request).delete(principal.tenant, checked_thread_id(thread_id))
    return Response(status_code=204)


@router.get("/threads/{thread_id}/state")
async def get_state(request: Request, principal: CurrentPrincipal, thread_id: str) -> dict[str, Any]:
    return await threads_of(request).state(principal.tenant, checked_thread_id(thread_id))


@router.get("/threads/{thread_id}/state/{checkpoint_id}")
async def get_state_at(
    request: Request, principal: CurrentPrincipal, thread_id: str, checkpoint_id: str
) -> dict[str, Any]:
    return await threads_of(request).state(principal.tenant, checked_thread_id(thread_id), checkpoint_id)


@router.post("/threads/{thread_id}/state/checkpoint")
async def get_state_at_checkpoint(
    request: Request, principal: CurrentPrincipal, thread_id: str, body: CheckpointRequest
) -> dict[str, Any]:
    return await threads_of(request).state(
        principal.tenant, checked_thread_id(thread_id), body.checkpoint.checkpoint_id
    )


@router.post("/threads/{thread_id}/state")
async def update_state(
    request: Request, principal: CurrentPrincipal, thread_id: str, body: StateUpdate
) -> dict[str, Any]:
    checkpoint_id = body.checkpoint.checkpoint_id if body.checkpoint else body.checkpoint_id
    return await threads_of(request).update_state(
        principal.tenant, checked_thread_id(thread_id), body.values, body.as_node, checkpoint_id
    )


@router.post("/threads/{thread_id}/history")
async def post_history(
    request: Request, principal: CurrentPrincipal, thread_id: str, body: HistoryRequest
) -> list[dict[str, Any]]:
    return await threads_of(request).history(
        principal.tenant,
        checked_thread_id(thread_id),
        limit=body.limit,
        before=body.before_id(),
        metadata=body.metadata,
        checkpoint_id=body.checkpoint.checkpoint_id if body.checkpoint else None,
    )


@router.get("/threads/{thread_id}/history")
async def get_history(
    request: Request,
    principal: CurrentPrincipal,
    thread_id: str,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    before: Annotated[str | None, Query(max_length=100)] = None,
) -> list[dict[str, Any]]:
    body = HistoryRequest(limit=limit, before=before)
    return await post_history(request, principal, thread_id, body)


@router.get("/threads/{thread_id}/transcript")
async def get_transcript(request: Request, principal: CurrentPrincipal, thread_id: str) -> dict[str, Any]:
    """The whole conversation, including messages moved out of the state to keep
    checkpoints small (this server's own route)."""
    threads = threads_of(request)
    key = await threads.owned_key(principal.tenant, checked_thread_id(thread_id))
    messages = await request.app.state.turns.read_messages(key)
    return {"thread_id": thread_id, "messages": [m.model_dump(mode="json") for m in messages]}
