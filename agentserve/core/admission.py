"""Whether a turn may start now: the tenant's rate, its concurrent runs, the thread's
lease (waiters served in arrival order) and the decision a paused thread waits for.

For turns that run inside a request (LangServe's routes and the playground): each
thread of the request gets a run row that takes the thread, or waits in line for
it, and is ended when the request's block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agentserve.core.errors import Conflict, ThreadBusy, TooMany
from agentserve.core.events import Wakeups
from agentserve.core.executor import Executor
from agentserve.core.identity import thread_key_for
from agentserve.core.ratelimit import RateLimited, count_request
from agentserve.core.runs import NewRun, Pool, Run, RunStore
from agentserve.core.serialize import jsonable
from agentserve.decisions import pause_problem

BusyPolicy = Literal["enqueue", "reject"]
TENANT_RUNS = "SELECT count(*) AS live FROM agent_thread_leases WHERE tenant = %s AND expires_at > now()"
HOW_TO_RESUME = 'resume it with {"resume": {"approved": true}} or {"resume": {"approved": false, "reason": "..."}}'


@dataclass(frozen=True)
class AdmissionPolicy:
    busy: BusyPolicy = "enqueue"
    wait_s: float = 10.0
    requests_per_minute: int = 0
    max_runs_per_tenant: int = 0


@dataclass(frozen=True)
class TurnRequest:
    thread_id: str
    resuming: bool
    summary: dict[str, Any]  # what the run row shows of the input


class Admission:
    def __init__(
        self, pool: Pool, store: RunStore, executor: Executor, wakeups: Wakeups, policy: AdmissionPolicy
    ) -> None:
        self.pool = pool
        self.store = store
        self.executor = executor
        self.wakeups = wakeups
        self.policy = policy

    async def check_rate(self, tenant: str) -> None:
        if not self.policy.requests_per_minute:
            return
        try:
            async with self.pool.connection() as conn:
                await count_request(conn, tenant, self.policy.requests_per_minute)
        except RateLimited as exc:
            raise TooMany(
                f"tenant {tenant!r} is over its {self.policy.requests_per_minute} requests per minute",
                exc.retry_after_s,
            ) from exc

    @contextlib.asynccontextmanager
    async def admitted(
        self, tenant: str, turns: Sequence[TurnRequest], idempotency_owner: str | None = None
    ) -> AsyncIterator[dict[str, str]]:
        """Holds each thread of the turns for the block; yields thread id -> run id.
        Threads are taken in sorted order, so two requests wanting overlapping sets
        cannot each hold half."""
        await self.check_rate(tenant)
        by_thread: dict[str, list[TurnRequest]] = {}
        for turn in turns:
            by_thread.setdefault(turn.thread_id, []).append(turn)
        runs: list[Run] = []
        try:
            for index, thread_id in enumerate(sorted(by_thread)):
                # The key's run is the first thread's: one run to look at on a retry.
                owner = idempotency_owner if index == 0 else None
                run = await self._take(tenant, thread_id, by_thread[thread_id], owner)
                runs.append(run)
                self.executor.attach(run)
        except BaseException:
            for run in runs:
                await self.executor.finish_attached(run.run_id, None, withdraw=True)
            raise
        failure: BaseException | None = None
        try:
            yield {run.thread_id: run.run_id for run in runs}
        except BaseException as exc:
            failure = exc
            raise
        finally:
            for run in runs:
                await self.executor.finish_attached(run.run_id, failure)

    async def _take(self, tenant: str, thread_id: str, turns: list[TurnRequest], idempotency_owner: str | None) -> Run:
        key = thread_key_for(tenant, thread_id)
        new = NewRun(
            tenant=tenant,
            thread_key=key,
            kwargs={"input": jsonable([t.summary for t in turns]), "source": "langserve"},
            strategy="enqueue" if self.policy.busy == "enqueue" else "reject",
            durable=False,
            attached=True,
            idempotency_owner=idempotency_owner,
        )
        submitted = await self.store.submit(new)
        if submitted is None:
            raise await self._refusal(tenant, key, thread_id, waited=False)
        run, pending = submitted.run, submitted.pending
        if not submitted.claimed:
            claimed, pending = await self._wait_in_line(run)
            if not claimed:
                await self.store.withdraw(run)
                raise await self._refusal(tenant, key, thread_id, waited=True)
        if problem := pause_problem(turns[0].resuming, pending, HOW_TO_RESUME):
            await self.store.withdraw(run)
            raise Conflict(f"thread {thread_id!r} {problem}")
        return run

    async def _wait_in_line(self, run: Run) -> tuple[bool, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.policy.wait_s if self.policy.busy == "enqueue" else 0.0)
        delay = 0.02
        while loop.time() < deadline:
            # Woken when the thread is freed; the timeout is the fallback without LISTEN.
            await self.wakeups.wait(f"thread:{run.thread_key}", min(delay, max(0.0, deadline - loop.time())))
            claimed, pending = await self.store.claim_waiting(run)
            if claimed:
                return True, pending
            delay = min(delay * 1.5, 0.25)
        return False, None

    async def _refusal(self, tenant: str, key: str, thread_id: str, waited: bool) -> Exception:
        """Why the run could not start: its thread was busy, unless the tenant is at
        its run limit. (The thread may look free by now: the turn that held it ended
        and the others in line gave up meanwhile.)"""
        waited_for = f" (waited {self.policy.wait_s:g}s)" if waited and self.policy.busy == "enqueue" else ""
        busy = ThreadBusy(
            f"thread {thread_id!r} is still running another turn{waited_for}; retry when it has finished",
            key,
            retry_after_s=max(1, round(self.policy.wait_s / 4)),
        )
        if not self.policy.max_runs_per_tenant:
            return busy
        async with self.pool.connection() as conn:
            row = await (await conn.execute(TENANT_RUNS, (tenant,))).fetchone()
        if row and row["live"] >= self.policy.max_runs_per_tenant:
            return TooMany(f"tenant {tenant!r} already has {self.policy.max_runs_per_tenant} runs in progress", 1)
        return busy
