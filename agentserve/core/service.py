"""Starting, cancelling and reading runs for the LangGraph Server API's routes:
the multitask strategies, threads made on demand, stateless runs, and what a
finished run answered."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from agentserve.core.errors import Conflict, NotFound
from agentserve.core.executor import Executor, decision_problem
from agentserve.core.identity import is_uuid, thread_key_for
from agentserve.core.runs import TERMINAL, NewRun, Run, RunStore, Strategy
from agentserve.core.serialize import JsonText
from agentserve.core.threads import ThreadStore

CancelAction = Literal["interrupt", "rollback"]


@dataclass(frozen=True)
class RunRequest:
    kwargs: dict[str, Any]
    strategy: Strategy
    if_not_exists: Literal["reject", "create"]
    metadata: dict[str, Any]
    webhook: str | None = None
    # Keep the events even when not resumable: a retry with the same idempotency
    # key joins the stream from its start.
    keep_events: bool = False
    # A background run (`runs.create`): may be left to the queue's workers.
    background: bool = False
    # The caller streams the run's events as it runs (`runs/stream`).
    followed: bool = False
    idempotency_owner: str | None = None


def result_of(run: Run) -> dict[str, Any] | JsonText:
    """What `wait` and `join` answer: the final values (with `__interrupt__` when
    paused), or `__error__` when the run failed."""
    if run.status in ("error", "timeout") and run.error:
        return {"__error__": run.error}
    if run.status == "interrupted":
        return {"__error__": {"error": "RunCancelled", "message": "the run was cancelled"}}
    return run.output if isinstance(run.output, dict | JsonText) else {}


class RunService:
    def __init__(
        self, store: RunStore, threads: ThreadStore, executor: Executor, *, runs_background_here: bool = True
    ) -> None:
        self.store = store
        self.threads = threads
        self.executor = executor
        # False on an `api` process: background runs go to the workers.
        self.runs_background_here = runs_background_here

    async def start(self, tenant: str, thread_id: str | None, request: RunRequest) -> Run:
        """Store the run, and begin it on this worker at once when its thread is
        free; else it waits in the queue for whichever worker frees the thread."""
        temporary = thread_id is None
        if thread_id is None:
            thread_id = str(uuid.uuid4())
            await self.threads.create(tenant, thread_id, {}, "raise")
        key = thread_key_for(tenant, thread_id)
        strategy = request.strategy
        if strategy in ("interrupt", "rollback"):
            if active := await self.store.active_on(key):
                await self.store.request_cancel(active, strategy)
                for run_id in active:
                    self.executor.cancel_here(run_id, strategy)
            strategy = "enqueue"
        new = NewRun(
            tenant=tenant,
            thread_key=key,
            kwargs=request.kwargs,
            strategy=strategy,
            metadata=request.metadata,
            store_events=bool(request.kwargs.get("stream_resumable")) or request.keep_events,
            temporary=temporary,
            webhook=request.webhook,
            claim_now=self.runs_background_here or not request.background,
            # Checked in the same statement that stores the run: one round trip.
            must_exist=not temporary and request.if_not_exists == "reject",
            idempotency_owner=request.idempotency_owner,
        )
        submitted = await self.store.submit(new)
        if submitted is None:
            await self.threads.get(tenant, thread_id)  # NotFound when that was why
            raise Conflict(f"thread {thread_id!r} is busy with another run; multitask_strategy is 'reject'")
        run = submitted.run
        if not submitted.claimed:
            await self.executor.notify_queued(run)
            return run
        if problem := decision_problem(run.kwargs, submitted.pending):
            await self.store.withdraw(run)
            raise Conflict(f"thread {thread_id!r}: {problem}")
        self.executor.launch(run, submitted.pending, known_pending=True, followed=request.followed)
        return run

    async def get(self, tenant: str, thread_id: str, run_id: str) -> Run:
        run = await self.store.get(thread_key_for(tenant, thread_id), run_id) if is_uuid(run_id) else None
        if run is None:
            raise NotFound(f"run {run_id!r} not found on thread {thread_id!r}")
        return run

    async def get_stateless(self, tenant: str, run_id: str) -> Run:
        run = await self.store.get_for_tenant(tenant, run_id) if is_uuid(run_id) else None
        if run is None:
            raise NotFound(f"run {run_id!r} not found")
        return run

    async def cancel(self, run: Run, action: CancelAction) -> None:
        if run.status in TERMINAL:
            return
        await self.store.request_cancel([run.run_id], action)
        self.executor.cancel_here(run.run_id, action)

    async def cancel_many(self, tenant: str, thread_id: str | None, run_ids: list[str], action: CancelAction) -> None:
        for run_id in run_ids:
            run = await self.store.get_for_tenant(tenant, run_id) if is_uuid(run_id) else None
            if run is not None and (thread_id is None or run.thread_id == thread_id):
                await self.cancel(run, action)

    async def delete(self, run: Run) -> None:
        if run.status == "running":
            raise Conflict(f"run {run.run_id} is running; cancel it first")
        await self.store.delete(run.thread_key, run.run_id)

    async def result(self, run: Run) -> dict[str, Any] | JsonText:
        return result_of(await self.executor.wait_until_done(run))
