"""Crons: the next due time (across DST changes) and the schedule checks; the
store's scheduler on a real PostgreSQL with an injected clock (missed ticks run
once, end_time disables, concurrent schedulers start each tick once); and end to
end, two server processes of two workers each on one database: N due ticks start
exactly N runs, on the right threads, with the input given; each tenant sees only
its own crons; the cap is a 429; bad schedules, zones and webhooks are 422s."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from langgraph_sdk import get_client
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from agentserve.core.crons import CronPolicy, CronSpec, CronStore, next_run_after, schedule_problem, zone_of
from agentserve.core.errors import Invalid
from agentserve.core.runs import Pool
from agentserve.persistence import create_pool, setup_schema
from agentserve.settings import Settings
from tests.conftest import scratch_database
from tests.support import TEST_KEY, ServerProcess

SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]
BOB_KEY = "bob-key-0123456789abcdef"
CAROL_KEY = "carol-key-0123456789abcdef"
NEVER_SOON = "0 0 1 1 *"  # once a year: due only when a test makes it due
MAX_CRONS = 8


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def sdk(url: str, key: str) -> Any:
    """langgraph-sdk's client; untyped here, since it types a created cron as a Run."""
    return get_client(url=url, api_key=key)


def said_in(cron: dict[str, Any]) -> str:
    return str(cron["payload"]["input"]["messages"][0]["content"])


def when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


# --- the next due time ---------------------------------------------------------


def test_a_daily_time_stays_local_across_the_spring_change() -> None:
    # America/New_York moves to EDT at 2:00 on 2026-03-08.
    first = next_run_after("0 9 * * *", "America/New_York", utc(2026, 3, 7, 12))
    assert first == utc(2026, 3, 7, 14)  # 9:00 EST
    second = next_run_after("0 9 * * *", "America/New_York", first)  # type: ignore[arg-type]
    assert second == utc(2026, 3, 8, 13)  # 9:00 EDT: 23 hours later


def test_a_time_the_spring_change_skips_runs_once_when_the_clocks_jump() -> None:
    first = next_run_after("30 2 * * *", "America/New_York", utc(2026, 3, 7, 12))
    assert first == utc(2026, 3, 8, 7)  # 2:30 does not exist that day: 3:00 EDT
    assert next_run_after("30 2 * * *", "America/New_York", first) == utc(2026, 3, 9, 6, 30)  # type: ignore[arg-type]


def test_a_time_the_autumn_change_repeats_runs_once() -> None:
    # 1:30 happens twice on 2026-11-01 in New York (EDT, then EST).
    first = next_run_after("30 1 * * *", "America/New_York", utc(2026, 10, 31, 12))
    assert first == utc(2026, 11, 1, 5, 30)
    assert next_run_after("30 1 * * *", "America/New_York", first) == utc(2026, 11, 2, 6, 30)  # type: ignore[arg-type]


def test_without_a_timezone_schedules_are_utc_and_strictly_after() -> None:
    assert next_run_after("*/5 * * * *", None, utc(2026, 1, 1, 10, 5)) == utc(2026, 1, 1, 10, 10)


def test_bad_schedules_and_zones_are_named() -> None:
    assert "'61 * * * *'" in (schedule_problem("61 * * * *", False) or "")
    assert "5 fields" in (schedule_problem("* * *", False) or "")
    assert "6 fields" in (schedule_problem("*/2 * * * * *", False) or "")
    assert schedule_problem("*/2 * * * * *", True) is None
    assert schedule_problem("0 9 * * MON-FRI", False) is None
    with pytest.raises(Invalid, match="Mars/Olympus"):
        zone_of("Mars/Olympus")


# --- the scheduler, on a real PostgreSQL with an injected clock ------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def cron_database(postgres_server_url: str) -> Iterator[str]:
    """A database of its own: the fake clocks here must not tick the servers' crons."""
    with scratch_database(postgres_server_url, "agent_crons") as url:
        asyncio.run(setup_schema(url, SETTINGS))
        yield url


@asynccontextmanager
async def opened_pool(url: str) -> AsyncIterator[Pool]:
    pool = create_pool(url, SETTINGS)
    await pool.open(wait=True)
    try:
        yield pool
    finally:
        await pool.close()


def spec(schedule: str, text: str, **fields: Any) -> CronSpec:
    kwargs = {"input": ask(text), "stream_mode": ["values"], "on_completion": "keep", "config": {}, "metadata": {}}
    return CronSpec(schedule=schedule, payload={"schedule": schedule, "input": ask(text)}, kwargs=kwargs, **fields)


def runs_of(url: str, cron_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT * FROM agent_runs WHERE metadata ->> 'cron_id' = %s ORDER BY seq", (cron_id,)
        ).fetchall()


async def test_a_cron_that_missed_many_ticks_while_down_runs_once(cron_database: str) -> None:
    clock = Clock(utc(2026, 1, 5, 12, 0, 0))
    async with opened_pool(cron_database) as pool:
        store = CronStore(pool, CronPolicy(), clock)
        cron = await store.create("missed", None, spec("*/5 * * * *", "every five", on_run_completed="keep"))
        assert when(cron["next_run_date"]) == utc(2026, 1, 5, 12, 5)
        clock.now = utc(2026, 1, 5, 15, 2)  # three hours down: 36 ticks missed
        await store.run_due()
        await store.run_due()
        assert len(runs_of(cron_database, cron["cron_id"])) == 1
        assert when((await store.get("missed", cron["cron_id"]))["next_run_date"]) == utc(2026, 1, 5, 15, 5)
        await store.delete("missed", cron["cron_id"])


async def test_a_cron_past_its_end_time_is_disabled(cron_database: str) -> None:
    clock = Clock(utc(2026, 1, 5, 12, 0))
    async with opened_pool(cron_database) as pool:
        store = CronStore(pool, CronPolicy(), clock)
        cron = await store.create("ending", None, spec("0 * * * *", "hourly", end_time=utc(2026, 1, 5, 14, 30)))
        for hour in (13, 14, 15, 16):
            clock.now = utc(2026, 1, 5, hour, 0, 30)
            await store.run_due()
        assert len(runs_of(cron_database, cron["cron_id"])) == 2  # 13:00 and 14:00
        after = await store.get("ending", cron["cron_id"])
        assert after["enabled"] is False and after["next_run_date"] is None
        # One created already past its end never runs.
        late = await store.create("ending", None, spec("0 * * * *", "late", end_time=utc(2026, 1, 5, 16, 10)))
        assert late["enabled"] is False


async def test_concurrent_schedulers_start_each_due_tick_once(cron_database: str) -> None:
    clock = Clock(utc(2026, 2, 1, 0, 0))
    async with opened_pool(cron_database) as pool:
        store = CronStore(pool, CronPolicy(max_per_tenant=50, batch=5), clock)
        crons = [await store.create("burst", None, spec("0 * * * *", f"burst {i}")) for i in range(20)]
        schedulers = [CronStore(pool, CronPolicy(batch=5), clock) for _ in range(8)]
        for hour in (1, 2):
            clock.now = utc(2026, 2, 1, hour, 0, 1)
            for _ in range(3):  # more rounds than needed: nothing is due twice
                await asyncio.gather(*(scheduler.run_due() for scheduler in schedulers))
            assert [len(runs_of(cron_database, c["cron_id"])) for c in crons] == [hour] * 20
        for cron in crons:
            await store.delete("burst", cron["cron_id"])


async def test_a_busy_thread_with_reject_skips_the_tick_and_enqueue_queues_it(cron_database: str) -> None:
    clock = Clock(utc(2026, 3, 1, 0, 0))
    key = f"busy/{uuid.uuid4()}"
    with psycopg.connect(cron_database) as conn:
        conn.execute(
            "INSERT INTO agent_threads (thread_key, tenant, thread_id) VALUES (%s, 'busy', %s)", (key, key[5:])
        )
        conn.execute(
            """INSERT INTO agent_runs (run_id, tenant, thread_key, assistant_id, status, kwargs, multitask_strategy,
                                       durable, attached)
               VALUES (%s, 'busy', %s, %s, 'running', %s, 'enqueue', true, false)""",
            (str(uuid.uuid4()), key, str(uuid.uuid4()), Jsonb({})),
        )
    async with opened_pool(cron_database) as pool:
        store = CronStore(pool, CronPolicy(), clock)
        rejecting = spec("0 * * * *", "reject me")
        rejecting = replace(rejecting, payload={**rejecting.payload, "multitask_strategy": "reject"})
        skipped = await store.create("busy", key, rejecting)
        queued = await store.create("busy", key, spec("0 * * * *", "queue me"))
        clock.now = utc(2026, 3, 1, 1, 0, 1)
        await store.run_due()
        assert runs_of(cron_database, skipped["cron_id"]) == []
        assert when((await store.get("busy", skipped["cron_id"]))["next_run_date"]) == utc(2026, 3, 1, 2)
        [run] = runs_of(cron_database, queued["cron_id"])
        assert (run["thread_key"], run["status"]) == (key, "pending")


# --- end to end: two servers, two workers each, one database ---------------------


@pytest.fixture(scope="module")
def servers(database_url: str, workdir: Path) -> Iterator[list[ServerProcess]]:
    env = {
        "AGENT_API_KEYS": f"bob={BOB_KEY},carol={CAROL_KEY}",
        "CRON_POLL_S": "1",
        "CRON_ALLOW_SECONDS": "true",
        "TENANT_MAX_CRONS": str(MAX_CRONS),
    }
    started = [ServerProcess(database_url, workdir, **env) for _ in range(2)]
    try:
        for server in started:
            server.start()
        yield started
    finally:
        for server in started:
            server.stop()


def sql(url: str, query: str, *params: object) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        cursor = conn.execute(query, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def wait_until(check: Any, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def post(server: ServerProcess, path: str, body: dict[str, Any], key: str = TEST_KEY) -> httpx.Response:
    with server.client(key) as client:
        return client.post(path, json=body)


async def test_due_ticks_start_exactly_one_run_each_on_the_right_thread(
    servers: list[ServerProcess], database_url: str
) -> None:
    client = sdk(servers[0].url, TEST_KEY)
    threads = [await client.threads.create() for _ in range(3)]
    made = [
        await client.crons.create_for_thread(t["thread_id"], "agent", schedule=NEVER_SOON, input=ask(f"thread {i}"))
        for i, t in enumerate(threads)
    ]
    made += [
        await client.crons.create("agent", schedule=NEVER_SOON, input=ask(f"new {i}"), on_run_completed="keep")
        for i in range(2)
    ]
    ids = [cron["cron_id"] for cron in made]
    rounds = 3
    for done in range(1, rounds + 1):
        made_due = datetime.now(UTC)
        sql(database_url, "UPDATE agent_crons SET next_run_date = now() WHERE cron_id = ANY(%s::uuid[])", ids)

        def all_ran(done: int = done) -> bool:
            rows = sql(
                database_url,
                """SELECT metadata ->> 'cron_id' AS cron_id, count(*) FILTER (WHERE status = 'success') AS ok
                   FROM agent_runs WHERE metadata ->> 'cron_id' = ANY(%s) GROUP BY 1""",
                ids,
            )
            return len(rows) == len(ids) and all(row["ok"] >= done for row in rows)

        wait_until(all_ran)
        late = sql(
            database_url,
            "SELECT max(created_at) AS last FROM agent_runs WHERE metadata ->> 'cron_id' = ANY(%s)",
            ids,
        )[0]["last"]
        assert late - made_due < timedelta(seconds=30)
    time.sleep(2)  # four schedulers had every chance to start a tick twice
    for index, cron in enumerate(made):
        runs = sql(
            database_url,
            "SELECT * FROM agent_runs WHERE metadata ->> 'cron_id' = %s ORDER BY seq",
            cron["cron_id"],
        )
        assert len(runs) == rounds, cron
        assert all(run["status"] == "success" for run in runs)
        texts = [run["kwargs"]["input"]["messages"][0]["content"] for run in runs]
        if cron["thread_id"] is not None:
            assert texts == [f"thread {index}"] * rounds
            assert {run["thread_key"] for run in runs} == {f"default/{cron['thread_id']}"}
            history = await client.threads.get_state(cron["thread_id"])
            said = [m["content"] for m in history["values"]["messages"] if m["type"] == "human"]
            assert said == [f"thread {index}"] * rounds  # one turn per tick, on its own thread
        else:
            assert texts == [f"new {index - 3}"] * rounds
            assert len({run["thread_key"] for run in runs}) == rounds  # a new thread each tick, kept
            for run in runs:
                kept = await client.threads.get(run["thread_key"].split("/", 1)[1])
                assert kept["metadata"]["cron_id"] == cron["cron_id"]
    for cron_id in ids:
        await client.crons.delete(cron_id)


async def test_a_seconds_schedule_runs_until_its_end_time_then_is_disabled(
    servers: list[ServerProcess], database_url: str
) -> None:
    client = sdk(servers[1].url, TEST_KEY)
    thread = await client.threads.create()
    end = datetime.now(UTC) + timedelta(seconds=6)
    cron = await client.crons.create_for_thread(
        thread["thread_id"], "agent", schedule="*/2 * * * * *", input=ask("tick"), end_time=end
    )
    wait_until(
        lambda: (
            sql(database_url, "SELECT enabled FROM agent_crons WHERE cron_id = %s", cron["cron_id"])[0]["enabled"]
            is False
        ),
        timeout=30,
    )
    runs = sql(database_url, "SELECT created_at FROM agent_runs WHERE metadata ->> 'cron_id' = %s", cron["cron_id"])
    assert 1 <= len(runs) <= 4
    assert all(run["created_at"] <= end + timedelta(seconds=2) for run in runs)
    [found] = await client.crons.search(thread_id=thread["thread_id"])
    assert found["enabled"] is False and found["next_run_date"] is None
    # A change of input keeps it as the scheduler left it; enabling it with no end starts it again.
    assert (await client.crons.update(cron["cron_id"], input=ask("still off")))["enabled"] is False
    again = await client.crons.update(cron["cron_id"], enabled=True, end_time=None, schedule=NEVER_SOON)
    assert again["enabled"] is True and again["end_time"] is None
    assert (when(again["next_run_date"]) or datetime.min.replace(tzinfo=UTC)) > datetime.now(UTC)
    time.sleep(3)
    assert len(sql(database_url, "SELECT 1 FROM agent_runs WHERE metadata ->> 'cron_id' = %s", cron["cron_id"])) == len(
        runs
    )
    await client.crons.delete(cron["cron_id"])


async def test_another_tenants_cron_is_not_found_and_not_listed(servers: list[ServerProcess]) -> None:
    mine = sdk(servers[0].url, TEST_KEY)
    bob = sdk(servers[1].url, BOB_KEY)
    thread = await mine.threads.create()
    cron = await mine.crons.create_for_thread(
        thread["thread_id"], "agent", schedule=NEVER_SOON, input=ask("mine"), metadata={"owner": "default"}
    )
    assert cron["thread_id"] == thread["thread_id"] and said_in(cron) == "mine"
    assert cron["cron_id"] in [c["cron_id"] for c in await mine.crons.search(metadata={"owner": "default"})]
    assert await mine.crons.count(thread_id=thread["thread_id"]) == 1
    assert cron["cron_id"] not in [c["cron_id"] for c in await bob.crons.search(limit=1000)]
    assert await bob.crons.count(thread_id=thread["thread_id"]) == 0
    for call in (
        lambda: bob.crons.update(cron["cron_id"], schedule="5 * * * *"),
        lambda: bob.crons.delete(cron["cron_id"]),
        lambda: bob.crons.create_for_thread(thread["thread_id"], "agent", schedule=NEVER_SOON, input=ask("x")),
    ):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            await call()
        assert refused.value.response.status_code == 404
    updated = await mine.crons.update(cron["cron_id"], schedule="5 * * * *", input=ask("changed"))
    assert updated["schedule"] == "5 * * * *" and said_in(updated) == "changed"
    assert updated["next_run_date"] != cron["next_run_date"]
    await mine.crons.delete(cron["cron_id"])
    with pytest.raises(httpx.HTTPStatusError) as gone:
        await mine.crons.delete(cron["cron_id"])
    assert gone.value.response.status_code == 404


async def test_a_tenant_past_its_cron_cap_gets_429(servers: list[ServerProcess]) -> None:
    carol = sdk(servers[0].url, CAROL_KEY)
    made = [await carol.crons.create("agent", schedule=NEVER_SOON, input=ask(f"c{i}")) for i in range(MAX_CRONS)]
    response = post(servers[1], "/runs/crons", {"assistant_id": "agent", "schedule": NEVER_SOON}, CAROL_KEY)
    assert response.status_code == 429 and str(MAX_CRONS) in response.json()["detail"]
    # Another tenant is not held to carol's count.
    assert (
        post(servers[1], "/runs/crons", {"assistant_id": "agent", "schedule": NEVER_SOON}, BOB_KEY).status_code == 200
    )
    await carol.crons.delete(made[0]["cron_id"])
    assert (
        post(servers[1], "/runs/crons", {"assistant_id": "agent", "schedule": NEVER_SOON}, CAROL_KEY).status_code == 200
    )
    for key in (CAROL_KEY, BOB_KEY):
        owner = get_client(url=servers[0].url, api_key=key)
        for cron in await owner.crons.search(limit=100):
            await owner.crons.delete(cron["cron_id"])


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"schedule": "61 * * * *"}, "61 * * * *"),
        ({"schedule": "every day"}, "every day"),
        ({"schedule": "0 9 * * *", "timezone": "Mars/Olympus"}, "Mars/Olympus"),
        ({"schedule": "0 9 * * *", "webhook": "http://127.0.0.1:9/hook"}, "loopback"),
        ({"schedule": "0 9 * * *", "webhook": "http://10.1.2.3/hook"}, "private"),
        ({"schedule": "0 9 * * *", "webhook": "ftp://example.com/hook"}, "http or https"),
    ],
)
def test_a_bad_schedule_timezone_or_webhook_is_a_422_naming_it(
    servers: list[ServerProcess], body: dict[str, Any], named: str
) -> None:
    response = post(servers[0], "/runs/crons", {"assistant_id": "agent", **body})
    assert response.status_code == 422 and named in response.json()["detail"]


def test_a_seconds_schedule_is_refused_where_seconds_are_off(database_url: str, workdir: Path) -> None:
    server = ServerProcess(database_url, workdir).start()
    try:
        response = post(server, "/runs/crons", {"assistant_id": "agent", "schedule": "*/2 * * * * *"})
        assert response.status_code == 422 and "6 fields" in response.json()["detail"]
    finally:
        server.stop()


def test_runs_create_refuses_a_private_webhook(servers: list[ServerProcess]) -> None:
    """Passes once the runs routes call webhook_problem (see core/webhooks.py)."""
    response = post(servers[0], "/runs", {"assistant_id": "agent", "input": ask("hi"), "webhook": "http://10.1.2.3/h"})
    assert response.status_code == 422 and "private" in str(response.json()["detail"])
