"""Runs: stream, wait, create (background), get, list, join, join a stream, cancel
and delete, on a thread and stateless."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.responses import StreamingResponse

from agentserve.auth import CurrentPrincipal
from agentserve.core.errors import Invalid, NotFound
from agentserve.core.executor import Executor
from agentserve.core.identity import assistant_matches, thread_id_problem
from agentserve.core.runs import Run
from agentserve.core.service import RunRequest, RunService
from agentserve.core.threads import iso
from agentserve.core.webhooks import webhook_problem
from agentserve.edges.lgapi.bodies import STREAM_MODES, CancelMany, RunCreate
from agentserve.edges.lgapi.sse import event_stream, json_when_done, run_headers

router = APIRouter(tags=["runs"])
Flag = Annotated[str | None, Query(description="true/false or 1/0")]


def service_of(request: Request) -> RunService:
    return request.app.state.run_service  # type: ignore[no-any-return]


def executor_of(request: Request) -> Executor:
    return request.app.state.executor  # type: ignore[no-any-return]


def flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def checked_thread_id(thread_id: str) -> str:
    if problem := thread_id_problem(thread_id):
        raise NotFound(f"thread id {problem}")
    return thread_id


def run_json(run: Run, *, stateless: bool = False) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "thread_id": None if stateless and run.temporary else run.thread_id,
        "assistant_id": run.assistant_id,
        "created_at": iso(run.created_at),
        "updated_at": iso(run.updated_at),
        "status": run.status if run.status != "rolled_back" else "interrupted",
        "metadata": run.metadata,
        "kwargs": run.kwargs,
        "multitask_strategy": run.multitask_strategy,
        "attempt": run.attempts,
        "error": run.error,
    }


async def start(
    request: Request,
    tenant: str,
    thread_id: str | None,
    body: RunCreate,
    *,
    background: bool = False,
    followed: bool = False,
) -> Run:
    if not assistant_matches(body.assistant_id):
        raise NotFound(f"assistant {body.assistant_id!r} not found; this server serves 'agent'")
    if thread_id is None and body.command is not None and body.command.resume is not None:
        raise NotFound("You must provide a thread_id when resuming.")
    if body.webhook:
        allow_private = request.app.state.settings.WEBHOOK_ALLOW_PRIVATE
        # It resolves the host name: off the event loop.
        if problem := await asyncio.to_thread(webhook_problem, body.webhook, allow_private):
            raise Invalid(f"webhook: {problem}")
    run_request = RunRequest(
        kwargs=body.kwargs(),
        strategy=body.multitask_strategy,
        if_not_exists=body.if_not_exists,
        metadata=body.metadata or {},
        webhook=body.webhook,
        keep_events="idempotency-key" in request.headers,
        background=background,
        followed=followed,
        idempotency_owner=getattr(request.state, "idempotency_owner", None),
    )
    return await service_of(request).start(tenant, thread_id, run_request)


def stream_response(request: Request, run: Run, thread_id: str | None, on_disconnect: str) -> EventSourceResponse:
    service = service_of(request)

    async def cancel_run() -> None:
        await service.cancel(run, "interrupt")

    return event_stream(
        executor_of(request).follow(run),
        with_ids=bool(run.kwargs.get("stream_resumable")),
        headers=run_headers(thread_id, run.run_id, "stream"),
        on_disconnect=cancel_run if on_disconnect == "cancel" else None,
    )


@router.post("/threads/{thread_id}/runs/stream", response_model=None)
async def stream_run(
    request: Request, principal: CurrentPrincipal, thread_id: str, body: RunCreate
) -> EventSourceResponse:
    run = await start(request, principal.tenant, checked_thread_id(thread_id), body, followed=True)
    return stream_response(request, run, thread_id, body.on_disconnect)


@router.post("/runs/stream", response_model=None)
async def stream_stateless_run(request: Request, principal: CurrentPrincipal, body: RunCreate) -> EventSourceResponse:
    run = await start(request, principal.tenant, None, body, followed=True)
    return stream_response(request, run, None, body.on_disconnect)


@router.post("/threads/{thread_id}/runs/wait", response_model=None)
async def wait_run(request: Request, principal: CurrentPrincipal, thread_id: str, body: RunCreate) -> StreamingResponse:
    run = await start(request, principal.tenant, checked_thread_id(thread_id), body)
    return json_when_done(service_of(request).result(run), run_headers(thread_id, run.run_id, "join"))


@router.post("/runs/wait", response_model=None)
async def wait_stateless_run(request: Request, principal: CurrentPrincipal, body: RunCreate) -> StreamingResponse:
    run = await start(request, principal.tenant, None, body)
    return json_when_done(service_of(request).result(run), run_headers(None, run.run_id, "join"))


@router.post("/threads/{thread_id}/runs")
async def create_run(request: Request, principal: CurrentPrincipal, thread_id: str, body: RunCreate) -> JSONResponse:
    run = await start(request, principal.tenant, checked_thread_id(thread_id), body, background=True)
    return JSONResponse(
        run_json(run), headers={"Content-Location": run_headers(thread_id, run.run_id, "")["Content-Location"]}
    )


@router.post("/runs")
async def create_stateless_run(request: Request, principal: CurrentPrincipal, body: RunCreate) -> JSONResponse:
    run = await start(request, principal.tenant, None, body, background=True)
    return JSONResponse(run_json(run, stateless=True), headers={"Content-Location": f"/runs/{run.run_id}"})


@router.get("/threads/{thread_id}/runs")
async def list_runs(
    request: Request,
    principal: CurrentPrincipal,
    thread_id: str,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    offset: Annotated[int, Query(ge=0)] = 0,
    status: Literal["pending", "running", "error", "success", "timeout", "interrupted"] | None = None,
) -> list[dict[str, Any]]:
    key = await request.app.state.threads.owned_key(principal.tenant, checked_thread_id(thread_id))
    runs = await service_of(request).store.list_runs(key, limit=limit, offset=offset, status=status)
    return [run_json(run) for run in runs]


@router.get("/threads/{thread_id}/runs/{run_id}")
async def get_run(request: Request, principal: CurrentPrincipal, thread_id: str, run_id: str) -> dict[str, Any]:
    return run_json(await service_of(request).get(principal.tenant, checked_thread_id(thread_id), run_id))


@router.get("/runs/{run_id}")
async def get_stateless_run(request: Request, principal: CurrentPrincipal, run_id: str) -> dict[str, Any]:
    return run_json(await service_of(request).get_stateless(principal.tenant, run_id), stateless=True)


@router.get("/threads/{thread_id}/runs/{run_id}/join", response_model=None)
async def join_run(
    request: Request, principal: CurrentPrincipal, thread_id: str, run_id: str, cancel_on_disconnect: Flag = None
) -> StreamingResponse:
    service = service_of(request)
    run = await service.get(principal.tenant, checked_thread_id(thread_id), run_id)
    return json_when_done(service.result(run), run_headers(thread_id, run.run_id, "join"))


def requested_modes(values: list[str]) -> set[str] | None:
    """`stream_mode` as either SDK sends it: repeated (py), a JSON array (js), or empty (all)."""
    modes: list[str] = []
    for value in values:
        value = value.strip()
        if value.startswith("["):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = []
            modes += [str(m) for m in parsed] if isinstance(parsed, list) else []
        elif value:
            modes.append(value)
    if not modes:
        return None
    return {"messages" if m == "messages-tuple" else m for m in modes if m in STREAM_MODES}


def last_event_seq(header: str | None) -> int | None:
    """The event id to replay after: ours are sequence numbers; -1 (what the JS
    SDK sends by default) or anything unreadable replays everything."""
    if header is None:
        return None
    try:
        return max(0, int(header.strip()))
    except ValueError:
        return 0


@router.get("/threads/{thread_id}/runs/{run_id}/stream", response_model=None)
async def join_run_stream(
    request: Request,
    principal: CurrentPrincipal,
    thread_id: str,
    run_id: str,
    stream_mode: Annotated[list[str] | None, Query()] = None,
    cancel_on_disconnect: Flag = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    service = service_of(request)
    run = await service.get(principal.tenant, checked_thread_id(thread_id), run_id)
    after = last_event_seq(last_event_id)
    executor = executor_of(request)
    if after is None:
        # No id: from now on, as the reference server does.
        after = await executor.current_seq(run)

    async def cancel_run() -> None:
        await service.cancel(run, "interrupt")

    modes = requested_modes(stream_mode or [])
    return event_stream(
        executor.follow(run, after),
        with_ids=bool(run.kwargs.get("stream_resumable")),
        headers=run_headers(thread_id, run.run_id, "stream"),
        modes=modes,
        on_disconnect=cancel_run if flag(cancel_on_disconnect) else None,
    )


@router.post("/threads/{thread_id}/runs/{run_id}/cancel", response_model=None)
async def cancel_run(
    request: Request,
    principal: CurrentPrincipal,
    thread_id: str,
    run_id: str,
    wait: Flag = None,
    action: Literal["interrupt", "rollback"] = "interrupt",
) -> Response:
    service = service_of(request)
    run = await service.get(principal.tenant, checked_thread_id(thread_id), run_id)
    await service.cancel(run, action)
    if flag(wait):
        return json_when_done(service.result(run), {})
    return Response(status_code=202)


@router.post("/runs/cancel", status_code=204)
async def cancel_runs(
    request: Request,
    principal: CurrentPrincipal,
    body: CancelMany,
    action: Literal["interrupt", "rollback"] = "interrupt",
) -> Response:
    service = service_of(request)
    run_ids = list(body.run_ids or [])
    if body.thread_id and not run_ids:
        key = await request.app.state.threads.owned_key(principal.tenant, checked_thread_id(body.thread_id))
        run_ids = await service.store.active_on(key)
    await service.cancel_many(principal.tenant, body.thread_id, run_ids, action)
    return Response(status_code=204)


@router.delete("/threads/{thread_id}/runs/{run_id}", status_code=204)
async def delete_run(request: Request, principal: CurrentPrincipal, thread_id: str, run_id: str) -> Response:
    service = service_of(request)
    await service.delete(await service.get(principal.tenant, checked_thread_id(thread_id), run_id))
    return Response(status_code=204)
