"""Executing runs on this worker: runs taken from the queue, runs started by a
request, and the turns of LangServe requests; their leases, cancels and events.

Each worker renews the leases of the runs it executes and looks for cancels
recorded against them (woken at once by NOTIFY, else found by polling within
a second). Workers that serve background work also take runs from the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from langchain_core.runnables import RunnableConfig

from agentserve.core.errors import RunCancelled, RunTimedOut
from agentserve.core.events import Event, EventLog, LocalStream, Wakeups
from agentserve.core.identity import thread_id_in
from agentserve.core.runs import CHANNEL, TERMINAL, Ending, Pool, Run, RunStore
from agentserve.core.serialize import json_text, jsonable, plain
from agentserve.core.threads import erase_threads
from agentserve.core.turns import TurnOutcome, TurnRunner, graph_input_for, interrupts_of
from agentserve.decisions import pause_problem

log = logging.getLogger(__name__)

READ_PENDING = "SELECT pending FROM agent_threads WHERE thread_key = %s"
DELETE_RUN_CHECKPOINTS = [
    """DELETE FROM checkpoint_writes w USING checkpoints c WHERE c.thread_id = %(key)s
       AND c.metadata ->> 'agent_run_id' = %(run_id)s AND w.thread_id = c.thread_id
       AND w.checkpoint_ns = c.checkpoint_ns AND w.checkpoint_id = c.checkpoint_id""",
    "DELETE FROM checkpoints WHERE thread_id = %(key)s AND metadata ->> 'agent_run_id' = %(run_id)s",
]
# Keys of the turn's config that LangGraph copies into message metadata: the stored
# thread key and the tenant stay inside.
PRIVATE_METADATA = frozenset({"thread_id", "tenant", "checkpoint_id"})
SAFE_ERRORS = frozenset(
    {"DecisionRefused", "RunTimedOut", "CircuitOpen", "APIConnectionError", "RateLimitError", "InternalServerError"}
)


@dataclass(frozen=True)
class ExecutorPolicy:
    max_attempts: int = 3
    jobs: int = 10
    poll_s: float = 1.0
    cancel_poll_s: float = 0.5
    renew_s: float = 5.0
    flush_s: float = 0.05


@dataclass
class Attached:
    """A LangServe request's run: executed in the request's own task."""

    run: Run
    outcome: TurnOutcome | None = None
    turns: int = 0


@dataclass
class Active:
    run: Run
    task: asyncio.Task[Any] | None
    stream: LocalStream | None = None
    cancel: str | None = None
    buffered: list[Event] = field(default_factory=list)
    closing: bool = False


def message_metadata(metadata: dict[str, Any], thread_id: str) -> dict[str, Any]:
    public = {k: v for k, v in metadata.items() if k not in PRIVATE_METADATA}
    public["thread_id"] = thread_id
    return jsonable(public)


def api_payload(mode: str, payload: Any, thread_id: str) -> Any:
    """A LangGraph stream chunk as the LangGraph Server API sends it."""
    if mode.split("|", 1)[0] == "messages":
        chunk, metadata = payload
        return [jsonable(chunk), message_metadata(metadata, thread_id)]
    if mode == "events":
        return jsonable({k: v for k, v in payload.items() if k != "metadata"} | {"metadata": {}})
    return jsonable(payload)


def error_payload(exc: BaseException) -> dict[str, str]:
    name = type(exc).__name__
    message = str(exc) if name in SAFE_ERRORS else "the run failed; the server log has the details"
    return {"error": name, "message": message}


def api_modes(stream_mode: Sequence[str]) -> list[str]:
    """Graph modes for the API's modes: `messages-tuple` is LangGraph's `messages`."""
    return ["messages" if m == "messages-tuple" else m for m in stream_mode]


class Executor:
    def __init__(
        self,
        pool: Pool,
        store: RunStore,
        turns: TurnRunner,
        events: EventLog,
        wakeups: Wakeups,
        policy: ExecutorPolicy,
    ) -> None:
        self.pool = pool
        self.store = store
        self.turns = turns
        self.events = events
        self.wakeups = wakeups
        self.policy = policy
        self.active: dict[str, Active] = {}
        self.attached: dict[str, Attached] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Called (in a task of their own, never awaited by the run) when a run this
        # worker executed has ended and its end is stored: webhooks hang here.
        self.on_end: list[Callable[[Run], Coroutine[Any, Any, None]]] = []
        self.stopping = False  # shutting down: take nothing more from the queue
        wakeups.on_notify(self._on_notify)

    # --- starting runs -------------------------------------------------------

    def launch(
        self, run: Run, pending: Any = None, *, known_pending: bool = False, followed: bool = False
    ) -> LocalStream:
        """Execute a run this worker holds, in a task of its own: the request that
        started it may go (`on_disconnect=continue`) and the run carries on.
        `followed`: the caller is about to stream its events."""
        stream = LocalStream(run.run_id, expected=followed)
        active = Active(run=run, task=None, stream=stream)
        self.active[run.run_id] = active
        active.task = asyncio.create_task(self._execute(active, pending, known_pending))
        return stream

    async def notify_queued(self, run: Run) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"run:{run.run_id}"))

    # --- the run itself --------------------------------------------------------

    async def _execute(self, active: Active, pending: Any, known_pending: bool) -> None:
        run, stream = active.run, active.stream
        assert stream is not None
        # A retaken run numbers its events after what its earlier attempt stored, so
        # a follower's Last-Event-ID still means the same place.
        seq = await self.events.last_seq(run.run_id) if run.attempts > 1 and run.store_events else 0
        flusher = asyncio.create_task(self._flush_forever(active)) if run.store_events else None

        def emit(event: str, data: Any) -> None:
            nonlocal seq
            seq += 1
            if callable(data):
                if not (run.store_events or stream.wanted):
                    return  # nobody can read it: skip turning the state into JSON
                data = data()
            item = Event(seq, event, data)
            stream.publish(item)
            if run.store_events:
                active.buffered.append(item)

        emit("metadata", {"run_id": run.run_id, "attempt": run.attempts})
        outcome = TurnOutcome()
        ending: Ending
        try:
            if not known_pending:
                pending = await self._pending_of(run.thread_key)
            ending = await self._run_graph(active, emit, outcome, pending)
        except RunCancelled as cancelled:
            ending = Ending(status="interrupted", thread_status="interrupted" if pending else "idle")
            if cancelled.action == "rollback":
                await self._roll_back(run)
                ending = Ending(status="rolled_back")
        except RunTimedOut as exc:
            emit("error", error_payload(exc))
            ending = Ending(status="timeout", thread_status="error", error=error_payload(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("run failed", extra={"run_id": run.run_id})
            emit("error", error_payload(exc))
            ending = Ending(status="error", thread_status="error", error=error_payload(exc))
        finally:
            self.active.pop(run.run_id, None)
        # `end` is stored before the run is marked ended (a follower elsewhere that
        # sees the run ended has every event), and shown here after (a follower here
        # that sees `end` finds the thread free for its next run).
        seq += 1
        status = "interrupted" if ending.status == "rolled_back" else ending.status
        end = Event(seq, "end", {"run_id": run.run_id, "status": status})
        if flusher is not None:
            active.buffered.append(end)
            # Not cancelled: a cancel during a write would lose the batch in flight.
            active.closing = True
            await flusher
            await self._flush(active)
        if ending.status != "rolled_back":
            await self._finish(run, ending)
        stream.publish(end)
        stream.close()
        if ending.status != "rolled_back":
            self._announce_end(run)
        if run.temporary and run.kwargs.get("on_completion", "delete") == "delete":
            await self._erase_temporary(run)

    def _announce_end(self, run: Run) -> None:
        for listener in self.on_end:
            task = asyncio.get_running_loop().create_task(listener(run))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_graph(self, active: Active, emit: Any, outcome: TurnOutcome, pending: Any) -> Ending:
        run = active.run
        kwargs = run.kwargs
        graph_input = graph_input_for(kwargs)
        if problem := decision_problem(kwargs, pending):
            raise DecisionRefused(f"the thread {problem}")
        if run.attempts > 1:
            stored = await self.turns.stored_by(run.thread_key, run.run_id)
            if stored is True:
                graph_input = _ALREADY_DONE
            elif stored is False:
                graph_input = None  # continue from where the first attempt stopped
        config = self.turns.config_for(
            run.thread_key,
            run.tenant,
            run_id=run.run_id,
            checkpoint=kwargs.get("checkpoint"),
            latest=run.take_latest_checkpoint(),
        )
        modes = api_modes(kwargs.get("stream_mode") or ["values"])
        thread_id = thread_id_in(run.thread_key)
        if graph_input is not _ALREADY_DONE:
            async with self._cancellable(active):
                async for mode, payload in self.turns.stream(
                    graph_input, config, modes, outcome, subgraphs=bool(kwargs.get("stream_subgraphs"))
                ):
                    emit(mode, partial(api_payload, mode, payload, thread_id))
        ending = await self._ending_of(run, config, outcome)
        if graph_input is _ALREADY_DONE and "values" in modes:
            # The earlier attempt stored the turn and died before saying so: its
            # followers still get the final values.
            emit("values", plain(ending.output))
        return ending

    async def _ending_of(self, run: Run, config: RunnableConfig, outcome: TurnOutcome) -> Ending:
        """How the run ended, from what it streamed; the stored state is read only
        when the run paused (for the paused tasks' ids) or streamed nothing."""
        interrupts: dict[str, list[dict[str, Any]]] = {}
        if outcome.interrupts or not outcome.values:
            snapshot = await self.turns.graph.aget_state({"configurable": {"thread_id": run.thread_key}})
            values = jsonable(snapshot.values)
            interrupts = {task.id: interrupts_of(task.interrupts) for task in snapshot.tasks if task.interrupts}
        else:
            values = json_text(outcome.values)
        pending = [i for items in interrupts.values() for i in items]
        output = {**plain(values), "__interrupt__": pending} if pending else values
        return Ending(
            status="success",
            thread_status="interrupted" if pending else "idle",
            output=output,
            record_state=True,
            values=values,
            interrupts=interrupts,
            pending=pending or None,
        )

    async def _finish(self, run: Run, ending: Ending) -> None:
        try:
            await self.store.finish(run, ending)
        except Exception:  # the lease then expires, and the run is retaken or ended
            log.exception("could not record the end of run %s", run.run_id)

    async def _pending_of(self, thread_key: str) -> Any:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(READ_PENDING, (thread_key,))).fetchone()
        return row["pending"] if row else None

    async def _roll_back(self, run: Run) -> None:
        """`rollback`: the run and every checkpoint it wrote are gone."""
        async with self.pool.connection() as conn, conn.transaction():
            for statement in DELETE_RUN_CHECKPOINTS:
                await conn.execute(statement, {"key": run.thread_key, "run_id": run.run_id})  # type: ignore[arg-type]
        await self.store.withdraw(run)

    async def _erase_temporary(self, run: Run) -> None:
        async with self.pool.connection() as conn:
            await erase_threads(conn, [run.thread_key])

    @contextlib.asynccontextmanager
    async def _cancellable(self, active: Active) -> AsyncIterator[None]:
        """Turns a cancel of this task by `cancel()` into RunCancelled; any other
        cancel (the worker shutting down) stays a cancel."""
        active.task = asyncio.current_task()
        try:
            yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if active.cancel is None or task is None:
                raise
            task.uncancel()
            raise RunCancelled(active.cancel) from None

    # --- LangServe turns, executed in the request's task -----------------------

    def attach(self, run: Run) -> Attached:
        attached = Attached(run=run)
        self.attached[run.run_id] = attached
        self.active[run.run_id] = Active(run=run, task=None)
        return attached

    async def stream_attached(
        self, run_id: str, graph_input: Any, modes: Sequence[str], callbacks: Any = None
    ) -> AsyncIterator[tuple[str, Any]]:
        """One turn of an attached run, in the caller's task; a batch may run several
        turns of one thread under its run."""
        attached = self.attached[run_id]
        run, outcome = attached.run, TurnOutcome()
        config = self.turns.config_for(
            run.thread_key, run.tenant, run_id=run.run_id, latest=run.take_latest_checkpoint()
        )
        config["callbacks"] = callbacks
        async with self._cancellable(self.active[run_id]):
            async for item in self.turns.stream(graph_input, config, modes, outcome):
                yield item
        attached.outcome, attached.turns = outcome, attached.turns + 1

    async def finish_attached(self, run_id: str, error: BaseException | None, *, withdraw: bool = False) -> None:
        attached = self.attached.pop(run_id, None)
        self.active.pop(run_id, None)
        if attached is None:
            return
        run = attached.run
        if withdraw:
            await self.store.withdraw(run)
            return
        if error is not None and attached.turns == 0:
            ending = Ending(status="error", thread_status="error", error=error_payload(error))
            if isinstance(error, RunCancelled):
                ending = Ending(status="interrupted", thread_status="idle")
            await self._finish(run, ending)
            return
        config = self.turns.config_for(run.thread_key, run.tenant)
        await self._finish(run, await self._ending_of(run, config, attached.outcome or TurnOutcome()))

    # --- following a run's events ----------------------------------------------

    async def follow(self, run: Run, after: int = 0) -> AsyncIterator[Event]:
        """The run's events after `after`: live from this worker when it runs here,
        else from the stored log; always ends with `end`."""
        active = self.active.get(run.run_id)
        if active is not None and active.stream is not None and (not run.store_events or after == 0):
            async for event in active.stream.follow(after):
                yield event
            return
        async for event in self._follow_stored(run, after):
            yield event

    async def _follow_stored(self, run: Run, after: int) -> AsyncIterator[Event]:
        wait_s = self.policy.poll_s if self.wakeups.listening else self.policy.cancel_poll_s
        while True:
            events = await self.events.read(run.run_id, after)
            for event in events:
                after = event.seq
                yield event
                if event.event == "end":
                    return
            if events:
                continue
            current = await self.store.get(run.thread_key, run.run_id)
            if current is None or current.status in TERMINAL:
                if events := await self.events.read(run.run_id, after):
                    continue
                # Its events are gone (kept for a while only), or were never stored:
                # what it ended with.
                if current is not None and current.output is not None and after == 0:
                    after += 1
                    yield Event(after, "values", current.output)
                status = current.status if current else "interrupted"
                yield Event(after + 1, "end", {"run_id": run.run_id, "status": status})
                return
            await self.wakeups.wait(f"run:{run.run_id}", wait_s)

    async def current_seq(self, run: Run) -> int:
        """The id of the run's latest event: where a follower without one starts."""
        active = self.active.get(run.run_id)
        if active is not None and active.stream is not None:
            return active.stream.events[-1].seq if active.stream.events else 0
        return await self.events.last_seq(run.run_id)

    async def wait_until_done(self, run: Run) -> Run:
        """The run once it has ended, from whichever worker ran it."""
        active = self.active.get(run.run_id)
        if active is not None and active.stream is not None:
            await active.stream.closed()
            if active.run.status in TERMINAL:
                return active.run
        while True:
            current = await self.store.get(run.thread_key, run.run_id)
            if current is None or current.status in TERMINAL:
                return current or run
            await self.wakeups.wait(f"run:{run.run_id}", self.policy.cancel_poll_s)

    # --- cancels, leases and the queue ---------------------------------------

    def _on_notify(self, topic: str) -> None:
        if topic.startswith("cancel:"):
            run_id = topic.removeprefix("cancel:")
            if run_id in self.active:
                task = asyncio.get_running_loop().create_task(self._check_cancels([run_id]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _check_cancels(self, run_ids: list[str]) -> None:
        for run_id, action in (await self.store.cancel_requests(run_ids)).items():
            self._cancel_local(run_id, action)

    def cancel_here(self, run_id: str, action: str) -> None:
        """Stop a run at once if this worker executes it; others see the recorded cancel."""
        self._cancel_local(run_id, action)

    def _cancel_local(self, run_id: str, action: str) -> None:
        active = self.active.get(run_id)
        if active is not None and active.cancel is None and active.task is not None:
            active.cancel = action
            active.task.cancel()

    async def watch_forever(self) -> None:
        """Renew the leases of this worker's runs, and honour cancels recorded
        against them (polled, in case no NOTIFY arrives)."""
        last_renewal = time.monotonic()
        while True:
            await asyncio.sleep(self.policy.cancel_poll_s)
            run_ids = list(self.active)
            try:
                if time.monotonic() - last_renewal >= self.policy.renew_s:
                    last_renewal = time.monotonic()
                    stopped = await self.store.renew(run_ids)
                    for run_id, action in stopped.items():
                        if action is None:
                            log.warning("run %s lost its lease; stopping it here", run_id)
                        self._cancel_local(run_id, action or "lost")
                elif run_ids:
                    await self._check_cancels(run_ids)
            except Exception:  # retried next round; a lease outlives two renewals
                log.warning("could not renew leases or read cancels", exc_info=True)

    async def work_forever(self) -> None:
        """Take runs from the queue while this worker has room for them. Every turn
        that ends sets a thread free, and would wake every worker's queue loop; that
        matters only while runs wait in the queue or durable runs are in progress
        (one whose worker died is taken over as soon as its lease runs out), so only
        then does it listen."""
        next_cleanup = 0.0
        while True:
            waiting = True
            try:
                if time.monotonic() > next_cleanup:
                    next_cleanup = time.monotonic() + 5 * self.policy.poll_s
                    await self.store.end_abandoned()
                while not self.stopping and len(self.active) < self.policy.jobs:
                    claimable, waiting = await self.store.queue_state()
                    if not claimable or not (run := await self.store.claim_next()):
                        break
                    if run.attempts > self.policy.max_attempts:
                        await self._give_up(run)
                        continue
                    self.launch(run)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("could not take runs from the queue", exc_info=True)
            topics = ["queue:run", "queue:thread"] if waiting else ["queue:run"]
            await self.wakeups.wait_any(topics, self.policy.poll_s)

    async def _give_up(self, run: Run) -> None:
        error = {
            "error": "WorkerLost",
            "message": f"the run was started {run.attempts - 1} times and its worker stopped each time",
        }
        await self._finish(run, Ending(status="error", thread_status="error", error=error))

    async def _flush_forever(self, active: Active) -> None:
        while not active.closing:
            await asyncio.sleep(self.policy.flush_s)
            await self._flush(active)

    async def _flush(self, active: Active) -> None:
        events, active.buffered = active.buffered, []
        try:
            await self.events.append(active.run.run_id, events)
        except Exception:  # followers elsewhere miss these; local ones have them
            log.warning("could not store %d events of run %s", len(events), active.run.run_id, exc_info=True)

    async def shutdown(self, grace_s: float) -> None:
        """Let this worker's runs finish for up to `grace_s`, then stop the rest and
        put them back in the queue, so another worker takes them up at once rather
        than when their leases expire."""
        self.stopping = True
        running = [a for a in self.active.values() if a.task is not None and a.stream is not None]
        if running:
            await asyncio.wait([a.task for a in running if a.task], timeout=grace_s)
        for active in running:
            if active.task is not None and not active.task.done():
                active.task.cancel()
                with contextlib.suppress(BaseException):
                    await active.task
                with contextlib.suppress(Exception):
                    await self.store.requeue(active.run)
                log.warning("run %s put back in the queue at shutdown", active.run.run_id)


_ALREADY_DONE = object()


class DecisionRefused(Exception):
    """A queued run whose input does not fit the thread it finally got."""


def decision_problem(kwargs: dict[str, Any], pending: Any) -> str | None:
    """Through the LangGraph API a decision is a `command` with `resume`; any other
    run on a paused thread (an input, a goto) is refused."""
    command = kwargs.get("command") or {}
    resuming = command.get("resume") is not None
    if not resuming and (command or kwargs.get("input") is None):
        return None  # an update or goto (command wins over input), or no new input
    return pause_problem(resuming, pending, "resume it with command.resume")
