"""Crons: create (on a thread or a new thread each tick), search, count, update
and delete, as langgraph-sdk's `client.crons` calls them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import Field, ValidationError, field_validator

from agentserve.auth import CurrentPrincipal, Principal
from agentserve.core.crons import CronSpec, CronStore
from agentserve.core.errors import Invalid, NotFound
from agentserve.core.identity import assistant_matches, thread_key_for
from agentserve.core.threads import ThreadStore
from agentserve.core.webhooks import webhook_problem
from agentserve.edges.lgapi.bodies import Lenient, RunCreate
from agentserve.edges.lgapi.runs import checked_thread_id

router = APIRouter(tags=["crons"])
FIELDS = (
    "cron_id",
    "assistant_id",
    "thread_id",
    "end_time",
    "schedule",
    "timezone",
    "created_at",
    "updated_at",
    "user_id",
    "payload",
    "next_run_date",
    "metadata",
    "on_run_completed",
    "enabled",
)


class CronCreate(RunCreate):
    """A run body (each tick's run) and when to start it."""

    schedule: str = Field(min_length=1, max_length=200)
    timezone: str | None = Field(default=None, max_length=100)
    end_time: datetime | None = None
    enabled: bool = True
    on_run_completed: Literal["delete", "keep"] | None = None

    @field_validator("end_time")
    @classmethod
    def _utc_unless_zoned(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class CronPatch(Lenient):
    """Any field of the create body; `end_time: null` clears the end time."""

    schedule: str | None = Field(default=None, min_length=1, max_length=200)
    timezone: str | None = Field(default=None, max_length=100)
    end_time: datetime | None = None
    enabled: bool | None = None
    on_run_completed: Literal["delete", "keep"] | None = None
    input: Any = None
    metadata: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    webhook: str | None = Field(default=None, max_length=2000)
    multitask_strategy: Literal["reject", "interrupt", "rollback", "enqueue"] | None = None
    interrupt_before: str | list[str] | None = None
    interrupt_after: str | list[str] | None = None
    stream_mode: str | list[str] | None = None
    stream_subgraphs: bool | None = None
    stream_resumable: bool | None = None
    durability: str | None = None


class CronSearch(Lenient):
    assistant_id: str | None = None
    thread_id: str | None = None
    enabled: bool | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    limit: int = Field(default=10, ge=1, le=1000)
    offset: int = Field(default=0, ge=0)
    sort_by: Literal[
        "cron_id", "assistant_id", "thread_id", "created_at", "updated_at", "next_run_date", "end_time"
    ] = "created_at"
    sort_order: Literal["asc", "desc"] = "desc"
    select: list[str] | None = None


class CronCount(Lenient):
    assistant_id: str | None = None
    thread_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


def crons_of(request: Request) -> CronStore:
    return request.app.state.crons  # type: ignore[no-any-return]


def threads_of(request: Request) -> ThreadStore:
    return request.app.state.threads  # type: ignore[no-any-return]


Crons = Annotated[CronStore, Depends(crons_of)]


async def check_webhook(request: Request, url: str | None) -> None:
    if url is None:
        return
    allow_private = bool(request.app.state.settings.WEBHOOK_ALLOW_PRIVATE)
    if problem := await asyncio.to_thread(webhook_problem, url, allow_private):  # it resolves the host
        raise Invalid(problem)


def spec_of(body: CronCreate, principal: Principal, *, stateless: bool) -> CronSpec:
    if not assistant_matches(body.assistant_id):
        raise NotFound(f"assistant {body.assistant_id!r} not found; this server serves 'agent'")
    return CronSpec(
        schedule=body.schedule.strip(),
        payload=body.model_dump(mode="json", exclude_unset=True),
        kwargs=body.kwargs(),
        timezone=body.timezone,
        end_time=body.end_time,
        enabled=body.enabled,
        on_run_completed=(body.on_run_completed or "delete") if stateless else None,
        metadata=body.metadata or {},
        user_id=principal.user,
    )


@router.post("/runs/crons")
async def create_cron(request: Request, principal: CurrentPrincipal, crons: Crons, body: CronCreate) -> dict[str, Any]:
    """Each tick runs on a new thread, erased after the run unless `on_run_completed` is 'keep'."""
    await check_webhook(request, body.webhook)
    return await crons.create(principal.tenant, None, spec_of(body, principal, stateless=True))


@router.post("/threads/{thread_id}/runs/crons")
async def create_thread_cron(
    request: Request, principal: CurrentPrincipal, crons: Crons, thread_id: str, body: CronCreate
) -> dict[str, Any]:
    """Each tick is a turn on this thread."""
    checked_thread_id(thread_id)
    spec = spec_of(body, principal, stateless=False)
    await check_webhook(request, body.webhook)
    if body.if_not_exists == "create":
        await threads_of(request).create(principal.tenant, thread_id, {}, "do_nothing")
    else:
        await threads_of(request).get(principal.tenant, thread_id)
    return await crons.create(principal.tenant, thread_key_for(principal.tenant, thread_id), spec)


def selected(cron: dict[str, Any], select: list[str] | None) -> dict[str, Any]:
    if not select:
        return cron
    unknown = sorted(set(select) - set(FIELDS) - {"now"})
    if unknown:
        raise Invalid(f"select may name only {', '.join(FIELDS)}; remove {', '.join(unknown)}")
    return {key: value for key, value in cron.items() if key in select}


@router.post("/runs/crons/search")
async def search_crons(principal: CurrentPrincipal, crons: Crons, body: CronSearch) -> list[dict[str, Any]]:
    if body.assistant_id is not None and not assistant_matches(body.assistant_id):
        return []
    found = await crons.search(
        principal.tenant,
        thread_key=thread_key_for(principal.tenant, body.thread_id) if body.thread_id else None,
        enabled=body.enabled,
        metadata=body.metadata,
        limit=body.limit,
        offset=body.offset,
        sort_by=body.sort_by,
        sort_order=body.sort_order,
    )
    return [selected(cron, body.select) for cron in found]


@router.post("/runs/crons/count")
async def count_crons(principal: CurrentPrincipal, crons: Crons, body: CronCount) -> int:
    if body.assistant_id is not None and not assistant_matches(body.assistant_id):
        return 0
    key = thread_key_for(principal.tenant, body.thread_id) if body.thread_id else None
    return await crons.count(principal.tenant, thread_key=key, metadata=body.metadata)


@router.patch("/runs/crons/{cron_id}")
async def update_cron(
    request: Request, principal: CurrentPrincipal, crons: Crons, cron_id: str, body: CronPatch
) -> dict[str, Any]:
    current = await crons.get(principal.tenant, cron_id)
    changes = body.model_dump(mode="json", exclude_unset=True)
    # The stored body with the changes over it, checked as a new one would be.
    # Its timing as it stands now (the scheduler may have disabled it), not as created.
    timing = ("schedule", "timezone", "end_time", "enabled", "on_run_completed")
    merged = {**current["payload"], **{name: current[name] for name in timing}, **changes}
    try:
        cron = CronCreate.model_validate(merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise Invalid(f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}") from None
    if "webhook" in changes:
        await check_webhook(request, cron.webhook)
    spec = spec_of(cron, principal, stateless=current["thread_id"] is None)
    return await crons.replace(principal.tenant, cron_id, spec)


@router.delete("/runs/crons/{cron_id}", status_code=204)
async def delete_cron(principal: CurrentPrincipal, crons: Crons, cron_id: str) -> Response:
    await crons.delete(principal.tenant, cron_id)
    return Response(status_code=204)
