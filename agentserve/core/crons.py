"""Crons: schedules that start runs nobody waits for, each tick a turn on the
cron's thread or a run on a new thread; the store, the next due time, and the
scheduler loop that every worker runs.

A due cron is taken by exactly one worker (`FOR UPDATE SKIP LOCKED`), which
stores the tick's run and moves `next_run_date` to the first due time after now
in the same transaction: a tick starts one run however many workers and replicas
look, and a cron that missed several ticks while everything was down runs once,
not once per missed tick. The run is stored `pending` and the queue workers are
woken by a NOTIFY that PostgreSQL sends only when that transaction commits.

`RunStore.submit` is not used for the run: it takes a connection of its own, so
it could not share the transaction that advances the cron, and a crash between
the two would lose or repeat the tick. The insert below writes the same columns
as its statement does for a queued run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from agentserve.core.errors import Invalid, NotFound, TooMany
from agentserve.core.identity import ASSISTANT_ID, is_uuid, thread_id_in, thread_key_for
from agentserve.core.runs import ACTIVE_ON_THREAD, CHANNEL, REQUEST_CANCEL, THREAD_STAMP, Pool

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
CRON_COLUMNS = """cron_id, tenant, thread_key, payload, kwargs, schedule, timezone, end_time, enabled,
    next_run_date, on_run_completed, metadata, user_id, created_at, updated_at"""
SORTABLE = {
    "cron_id": "cron_id",
    "assistant_id": "cron_id",  # one assistant: any order is by id
    "thread_id": "thread_key",
    "created_at": "created_at",
    "updated_at": "updated_at",
    "next_run_date": "next_run_date",
    "end_time": "end_time",
}
LOCK_TENANT = "SELECT pg_advisory_xact_lock(hashtextextended('agent-crons:' || %s, 0))"
COUNT_TENANT = "SELECT count(*) AS n FROM agent_crons WHERE tenant = %s"
CREATE = f"""
INSERT INTO agent_crons (cron_id, tenant, thread_key, payload, kwargs, schedule, timezone, end_time, enabled,
                         next_run_date, on_run_completed, metadata, user_id)
VALUES (%(cron_id)s, %(tenant)s, %(thread_key)s, %(payload)s, %(kwargs)s, %(schedule)s, %(timezone)s, %(end_time)s,
        %(enabled)s, %(next_run_date)s, %(on_run_completed)s, %(metadata)s, %(user_id)s)
RETURNING {CRON_COLUMNS}
"""
GET = f"SELECT {CRON_COLUMNS} FROM agent_crons WHERE cron_id = %s AND tenant = %s"
GET_FOR_UPDATE = GET + " FOR UPDATE"
REPLACE = f"""
UPDATE agent_crons SET payload = %(payload)s, kwargs = %(kwargs)s, schedule = %(schedule)s, timezone = %(timezone)s,
    end_time = %(end_time)s, enabled = %(enabled)s, next_run_date = %(next_run_date)s,
    on_run_completed = %(on_run_completed)s, metadata = %(metadata)s, updated_at = now()
WHERE cron_id = %(cron_id)s AND tenant = %(tenant)s
RETURNING {CRON_COLUMNS}
"""
DELETE = "DELETE FROM agent_crons WHERE cron_id = %s AND tenant = %s"
FILTER = """tenant = %(tenant)s AND (%(thread_key)s::text IS NULL OR thread_key = %(thread_key)s)
    AND (%(enabled)s::boolean IS NULL OR enabled = %(enabled)s) AND metadata @> %(metadata)s"""
DUE = f"""SELECT {CRON_COLUMNS} FROM agent_crons
          WHERE enabled AND next_run_date <= %(now)s
          ORDER BY next_run_date LIMIT %(limit)s
          FOR UPDATE SKIP LOCKED"""
ADVANCE = "UPDATE agent_crons SET next_run_date = %(next_run_date)s, enabled = %(enabled)s WHERE cron_id = %(cron_id)s"
THREAD_EXISTS = "SELECT 1 FROM agent_threads WHERE thread_key = %s"
# A queued run, as RunStore's SUBMIT stores one that does not take its thread at
# once; the NOTIFY goes out when the transaction commits.
START_RUN = """
WITH thread AS (
    INSERT INTO agent_threads AS t (thread_key, tenant, thread_id, metadata, status)
    VALUES (%(key)s, %(tenant)s, %(thread_id)s, %(stamp)s, 'busy')
    ON CONFLICT (thread_key) DO UPDATE SET updated_at = now(), status = 'busy', metadata = t.metadata || %(stamp)s
    RETURNING 1
), run AS (
    INSERT INTO agent_runs (run_id, tenant, thread_key, assistant_id, status, kwargs, metadata, multitask_strategy,
                            durable, attached, attempts, store_events, temporary, webhook)
    SELECT %(run_id)s, %(tenant)s, %(key)s, %(assistant_id)s, 'pending', %(kwargs)s, %(metadata)s, %(strategy)s,
           true, false, 0, true, %(temporary)s, %(webhook)s
    FROM thread
    RETURNING run_id
)
SELECT pg_notify(%(channel)s, 'run:' || run_id) FROM run
"""


def zone_of(name: str | None) -> tzinfo:
    if not name:
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise Invalid(f"timezone {name!r} is not an IANA time zone such as 'America/New_York' or 'UTC'") from None


def schedule_problem(schedule: str, allow_seconds: bool) -> str | None:
    """Why a schedule cannot be used, or None when it can."""
    fields = schedule.split()
    if len(fields) == 6 and not allow_seconds:
        return f"schedule {schedule!r} has 6 fields; use 5: minute hour day-of-month month day-of-week"
    if len(fields) not in (5, 6):
        return f"schedule {schedule!r} must have 5 fields: minute hour day-of-month month day-of-week"
    try:
        next(CronSim(schedule, datetime.now(UTC)))
    except CronSimError as exc:
        return f"schedule {schedule!r} is not a valid cron expression ({exc})"
    except StopIteration:
        return f"schedule {schedule!r} never fires"
    return None


def next_run_after(schedule: str, timezone: str | None, after: datetime) -> datetime | None:
    """The first due time strictly after `after`, in UTC; None when there is none.

    It is found in the cron's own time zone, so "0 9 * * *" stays at 9:00 local
    across a DST change. As Debian's cron does, a fixed time skipped by a spring
    change runs when the clocks have jumped, and one repeated by an autumn change
    runs once."""
    try:
        due = next(CronSim(schedule, after.astimezone(zone_of(timezone))))
    except StopIteration:
        return None
    return due.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def cron_json(row: dict[str, Any]) -> dict[str, Any]:
    """A cron as the LangGraph Server API shows it."""
    return {
        "cron_id": str(row["cron_id"]),
        "assistant_id": ASSISTANT_ID,
        "thread_id": thread_id_in(row["thread_key"]) if row["thread_key"] else None,
        "schedule": row["schedule"],
        "timezone": row["timezone"],
        "end_time": iso(row["end_time"]),
        "on_run_completed": row["on_run_completed"],
        "payload": row["payload"],
        "user_id": row["user_id"],
        "next_run_date": iso(row["next_run_date"]),
        "metadata": row["metadata"],
        "enabled": row["enabled"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }


@dataclass(frozen=True)
class CronSpec:
    """What a caller asks to schedule. `payload` is the create body as the API
    shows it back (its `webhook` and `multitask_strategy` apply to each tick);
    `kwargs` is each tick's run as the executor reads it."""

    schedule: str
    payload: dict[str, Any]
    kwargs: dict[str, Any]
    timezone: str | None = None
    end_time: datetime | None = None
    enabled: bool = True
    on_run_completed: Literal["delete", "keep"] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    user_id: str | None = None


@dataclass(frozen=True)
class CronPolicy:
    max_per_tenant: int = 100
    allow_seconds: bool = False
    poll_s: float = 10.0
    batch: int = 50


class ThreadGone(Exception):
    """A thread cron's thread was deleted."""


class CronStore:
    def __init__(self, pool: Pool, policy: CronPolicy, clock: Clock | None = None) -> None:
        self.pool = pool
        self.policy = policy
        self.clock = clock or (lambda: datetime.now(UTC))

    def _checked(self, spec: CronSpec) -> None:
        if problem := schedule_problem(spec.schedule, self.policy.allow_seconds):
            raise Invalid(problem)
        zone_of(spec.timezone)

    def _first_run(self, spec: CronSpec) -> tuple[bool, datetime | None]:
        """(enabled, next_run_date) for a cron (re)scheduled now: one whose next tick
        falls after its end_time is over already."""
        if not spec.enabled:
            return False, None
        due = next_run_after(spec.schedule, spec.timezone, self.clock())
        if due is None or (spec.end_time is not None and due > spec.end_time):
            return False, None
        return True, due

    def _params(self, spec: CronSpec) -> dict[str, Any]:
        enabled, due = self._first_run(spec)
        return {
            "payload": Jsonb(spec.payload),
            "kwargs": Jsonb(spec.kwargs),
            "schedule": spec.schedule,
            "timezone": spec.timezone,
            "end_time": spec.end_time,
            "enabled": enabled,
            "next_run_date": due,
            "on_run_completed": spec.on_run_completed,
            "metadata": Jsonb(spec.metadata),
        }

    async def create(self, tenant: str, thread_key: str | None, spec: CronSpec) -> dict[str, Any]:
        self._checked(spec)
        params = {
            **self._params(spec),
            "cron_id": str(uuid.uuid4()),
            "tenant": tenant,
            "thread_key": thread_key,
            "user_id": spec.user_id,
        }
        async with self.pool.connection() as conn, conn.transaction():
            # Counting and adding under the tenant's lock keeps the cap exact under a burst.
            await conn.execute(LOCK_TENANT, (tenant,))
            counted = await (await conn.execute(COUNT_TENANT, (tenant,))).fetchone()
            if counted is not None and counted["n"] >= self.policy.max_per_tenant:
                raise TooMany(f"a tenant may keep at most {self.policy.max_per_tenant} crons; delete one first")
            row = await (await conn.execute(CREATE, params)).fetchone()
        assert row is not None
        return cron_json(row)

    async def get(self, tenant: str, cron_id: str) -> dict[str, Any]:
        row = None
        if is_uuid(cron_id):
            async with self.pool.connection() as conn:
                row = await (await conn.execute(GET, (cron_id, tenant))).fetchone()
        if row is None:
            raise NotFound(f"cron {cron_id!r} not found")
        return cron_json(row)

    async def replace(self, tenant: str, cron_id: str, spec: CronSpec) -> dict[str, Any]:
        """The cron as `spec` says; its next tick is worked out again only when its
        timing changed, so an update of its input keeps a tick that is due."""
        self._checked(spec)
        if not is_uuid(cron_id):
            raise NotFound(f"cron {cron_id!r} not found")
        params = {**self._params(spec), "cron_id": cron_id, "tenant": tenant}
        async with self.pool.connection() as conn, conn.transaction():
            current = await (await conn.execute(GET_FOR_UPDATE, (cron_id, tenant))).fetchone()
            if current is None:
                raise NotFound(f"cron {cron_id!r} not found")
            timing = (spec.schedule, spec.timezone, spec.end_time, spec.enabled)
            if timing == (current["schedule"], current["timezone"], current["end_time"], current["enabled"]):
                params["enabled"], params["next_run_date"] = current["enabled"], current["next_run_date"]
            row = await (await conn.execute(REPLACE, params)).fetchone()
        assert row is not None
        return cron_json(row)

    async def delete(self, tenant: str, cron_id: str) -> None:
        deleted = 0
        if is_uuid(cron_id):
            async with self.pool.connection() as conn:
                deleted = (await conn.execute(DELETE, (cron_id, tenant))).rowcount
        if not deleted:
            raise NotFound(f"cron {cron_id!r} not found")

    def _filter(
        self, tenant: str, thread_key: str | None, enabled: bool | None, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        return {"tenant": tenant, "thread_key": thread_key, "enabled": enabled, "metadata": Jsonb(metadata)}

    async def search(
        self,
        tenant: str,
        *,
        thread_key: str | None,
        enabled: bool | None,
        metadata: dict[str, Any],
        limit: int,
        offset: int,
        sort_by: str,
        sort_order: Literal["asc", "desc"],
    ) -> list[dict[str, Any]]:
        if sort_by not in SORTABLE:
            raise Invalid(f"sort_by must be one of {sorted(SORTABLE)}")
        direction = "ASC" if sort_order == "asc" else "DESC"
        query = f"""SELECT {CRON_COLUMNS} FROM agent_crons WHERE {FILTER}
                    ORDER BY {SORTABLE[sort_by]} {direction} NULLS LAST, cron_id {direction}
                    LIMIT %(limit)s OFFSET %(offset)s"""
        params = {**self._filter(tenant, thread_key, enabled, metadata), "limit": limit, "offset": offset}
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(query, params)).fetchall()  # type: ignore[arg-type]
        return [cron_json(row) for row in rows]

    async def count(self, tenant: str, *, thread_key: str | None, metadata: dict[str, Any]) -> int:
        query = f"SELECT count(*) AS n FROM agent_crons WHERE {FILTER}"
        async with self.pool.connection() as conn:
            row = await (await conn.execute(query, self._filter(tenant, thread_key, None, metadata))).fetchone()  # type: ignore[arg-type]
        return int(row["n"]) if row else 0

    # --- the scheduler -------------------------------------------------------

    async def run_due(self) -> tuple[int, list[str]]:
        """One round: take the crons due now (those another worker holds are
        skipped), start each one's run and move it on. Returns how many crons were
        taken and the runs started."""
        now = self.clock()
        started: list[str] = []
        async with self.pool.connection() as conn, conn.transaction():
            due = await (await conn.execute(DUE, {"now": now, "limit": self.policy.batch})).fetchall()
            for cron in due:
                try:
                    async with conn.transaction():  # a savepoint: one bad cron does not undo the others
                        if run_id := await self._tick(conn, cron, now):
                            started.append(run_id)
                except Exception:
                    log.exception("cron %s could not start its run; it stays due", cron["cron_id"])
        return len(due), started

    async def _tick(self, conn: AsyncConnection[DictRow], cron: dict[str, Any], now: datetime) -> str | None:
        end_time = cron["end_time"]
        run_id, thread_gone = None, False
        if end_time is None or cron["next_run_date"] <= end_time:
            try:
                run_id = await self._start_run(conn, cron)
            except ThreadGone:
                log.warning("cron %s is disabled: its thread was deleted", cron["cron_id"])
                thread_gone = True
        following = next_run_after(cron["schedule"], cron["timezone"], now)
        enabled = not thread_gone and following is not None and (end_time is None or following <= end_time)
        params = {"cron_id": cron["cron_id"], "next_run_date": following if enabled else None, "enabled": enabled}
        await conn.execute(ADVANCE, params)
        return run_id

    async def _start_run(self, conn: AsyncConnection[DictRow], cron: dict[str, Any]) -> str | None:
        """Store the tick's run; None when the thread is busy and the cron says `reject`."""
        tenant, payload, kwargs = cron["tenant"], cron["payload"], cron["kwargs"]
        strategy = payload.get("multitask_strategy") or "enqueue"
        cron_id = str(cron["cron_id"])
        stamp = dict(THREAD_STAMP)
        if cron["thread_key"] is None:
            key, temporary = thread_key_for(tenant, str(uuid.uuid4())), True
            kwargs = {**kwargs, "on_completion": cron["on_run_completed"] or "delete"}
            stamp["cron_id"] = cron_id
        else:
            key, temporary = cron["thread_key"], False
            if await (await conn.execute(THREAD_EXISTS, (key,))).fetchone() is None:
                raise ThreadGone(key)
            active = [str(row["run_id"]) for row in await (await conn.execute(ACTIVE_ON_THREAD, (key,))).fetchall()]
            if active and strategy == "reject":
                log.info("cron %s skipped a tick: its thread is busy and its strategy is 'reject'", cron_id)
                return None
            if active and strategy in ("interrupt", "rollback"):
                await conn.execute(REQUEST_CANCEL, {"runs": active, "action": strategy, "channel": CHANNEL})
        run_id = str(uuid.uuid4())
        params = {
            "run_id": run_id,
            "tenant": tenant,
            "key": key,
            "thread_id": thread_id_in(key),
            "stamp": Jsonb(stamp),
            "assistant_id": ASSISTANT_ID,
            "kwargs": Jsonb(kwargs),
            "metadata": Jsonb({**cron["metadata"], "cron_id": cron_id}),
            "strategy": "reject" if strategy == "reject" else "enqueue",
            "temporary": temporary,
            "webhook": payload.get("webhook"),
            "channel": CHANNEL,
        }
        await conn.execute(START_RUN, params)
        return run_id

    async def schedule_forever(self) -> None:
        """Every worker runs this; the row locks decide who starts each tick."""
        while True:
            taken = 0
            try:
                taken, started = await self.run_due()
                if started:
                    log.info("crons started %d runs", len(started))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("could not look for due crons", exc_info=True)
            if taken < self.policy.batch:  # a full batch means more may be due now
                await asyncio.sleep(self.policy.poll_s * random.uniform(0.5, 1.0))
