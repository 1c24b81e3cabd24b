"""Tenants, leases, the thread API, limits and retention, through the real ASGI app."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from langchain_core.messages import AIMessage
from psycopg.rows import dict_row

from agentserve.core.retention import SWEEP_LOCK_ID, RetentionPolicy, SweepReport, sweep_once
from agentserve.settings import Settings
from app import create_app
from tests.support import turn_body

ALICE, BOB, CAROL = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef", "carol-key-0123456789abcdef"


def make_client(database_url: str, **overrides: Any) -> TestClient:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=database_url,
        AGENT_API_KEYS=f"alice={ALICE},bob={BOB},carol={CAROL}",
        OPENAI_API_KEY="",
        BUSY_THREAD_WAIT_S=1,
        **overrides,
    )
    return TestClient(create_app(settings), headers={"X-API-Key": ALICE})


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    with make_client(database_url) as test_client:
        yield test_client


def db(database_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(database_url, autocommit=True)


def say(client: TestClient, text: str, thread: str, key: str = ALICE) -> Any:
    return client.post("/agent/invoke", json=turn_body(text, thread), headers={"X-API-Key": key})


def answer(response: Any) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["output"]["messages"][-1]["content"])


def hold_lease(database_url: str, thread_key: str, expires: str = "now() + interval '1 minute'") -> None:
    """A lease as another run (or a dead worker) would have left it."""
    tenant = thread_key.split("/")[0]
    with db(database_url) as conn:
        conn.execute(
            f"INSERT INTO agent_thread_leases VALUES (%s, %s, gen_random_uuid(), {expires})",  # type: ignore[arg-type]
            (thread_key, tenant),
        )


def count(database_url: str, sql: str, *params: Any) -> int:
    with db(database_url) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def test_state_holds_the_whole_conversation(client: TestClient) -> None:
    answer(say(client, "my name is Ada", "state-1"))
    answer(say(client, "What is 12 * 8?", "state-1"))
    state = client.get("/threads/state-1/state").json()
    kinds = [(m["type"], m["content"]) for m in state["values"]["messages"]]
    assert kinds[0] == ("human", "my name is Ada")
    assert ("tool", "96") in kinds
    assert kinds[-1] == ("ai", "The answer is 96.")
    assert state["interrupts"] == [] and state["next"] == []


def test_another_tenants_thread_is_404_never_403(client: TestClient) -> None:
    answer(say(client, "secret plans", "private-1"))
    for path in ("/threads/private-1/state", "/threads/private-1/history"):
        response = client.get(path, headers={"X-API-Key": BOB})
        assert response.status_code == 404
        assert response.json()["detail"] == client.get(path.replace("private-1", "nope")).json()["detail"].replace(
            "nope", "private-1"
        )
    assert client.delete("/threads/private-1", headers={"X-API-Key": BOB}).status_code == 404
    # Bob's own thread of the same name is a different conversation.
    assert (
        answer(say(client, "what did I say before?", "private-1", key=BOB)) == "You have not said anything before this."
    )
    assert "secret plans" in str(client.get("/threads/private-1/state").json())


def test_thread_routes_need_a_key(client: TestClient) -> None:
    assert client.post("/threads/search", json={}, headers={"X-API-Key": ""}).status_code == 401
    assert client.get("/threads/state-1/state", headers={"X-API-Key": ""}).status_code == 401


def test_history_is_newest_first_and_paginated(client: TestClient) -> None:
    answer(say(client, "one", "hist-1"))
    answer(say(client, "two", "hist-1"))
    answer(say(client, "three", "hist-1"))
    first = client.post("/threads/hist-1/history", json={"limit": 2}).json()
    assert len(first) == 2
    before = first[-1]["checkpoint"]
    second = client.post("/threads/hist-1/history", json={"limit": 2, "before": before}).json()
    assert len(second) == 1 and second[0]["values"]["messages"][-1]["content"] == "You said: one"
    ids = [c["checkpoint"]["checkpoint_id"] for c in first + second]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    assert client.get("/threads/hist-1/history", params={"limit": 2}).json() == first


def test_list_threads_newest_activity_first_and_only_the_callers(client: TestClient) -> None:
    for name in ("list-a", "list-b", "list-c"):
        answer(say(client, "hi", name, key=CAROL))
    answer(say(client, "again", "list-a", key=CAROL))
    search = {"limit": 2, "sort_by": "updated_at", "sort_order": "desc"}
    page = client.post("/threads/search", json=search, headers={"X-API-Key": CAROL}).json()
    assert [t["thread_id"] for t in page] == ["list-a", "list-c"]
    assert page[0]["values"]["messages"][-1]["content"] == "You said: again"
    rest = client.post("/threads/search", json={**search, "offset": 2}, headers={"X-API-Key": CAROL}).json()
    assert [t["thread_id"] for t in rest] == ["list-b"]
    bobs = client.post("/threads/search", json={"limit": 100}, headers={"X-API-Key": BOB}).json()
    assert "list-a" not in str(bobs)
    assert client.post("/threads/search", json={"limit": "many"}).status_code == 422


def test_delete_erases_everything_and_the_thread_starts_fresh(client: TestClient, database_url: str) -> None:
    answer(say(client, "my name is Eve", "erase-1"))
    assert count(database_url, "SELECT count(*) FROM checkpoints WHERE thread_id = 'alice/erase-1'") > 0
    assert client.delete("/threads/erase-1").status_code == 204
    for table in ("checkpoints", "checkpoint_blobs", "checkpoint_writes"):
        assert count(database_url, f"SELECT count(*) FROM {table} WHERE thread_id = 'alice/erase-1'") == 0
    assert client.get("/threads/erase-1/state").status_code == 404
    assert answer(say(client, "what is my name", "erase-1")) == "I don't know your name yet."


def test_a_live_lease_makes_a_turn_wait_then_409_with_retry_after(client: TestClient, database_url: str) -> None:
    hold_lease(database_url, "alice/busy-1")
    response = say(client, "hello", "busy-1")
    assert response.status_code == 409
    assert "busy-1" in response.json()["detail"] and int(response.headers["retry-after"]) >= 1
    assert count(database_url, "SELECT count(*) FROM checkpoints WHERE thread_id = 'alice/busy-1'") == 0


def test_an_expired_lease_of_a_dead_holder_does_not_block(client: TestClient, database_url: str) -> None:
    hold_lease(database_url, "alice/dead-1", expires="now()")
    assert answer(say(client, "hello", "dead-1")) == "You said: hello"


def test_a_turn_after_a_run_killed_mid_tool_call_is_repaired(client: TestClient) -> None:
    """A checkpoint ending in a tool call with no result, as a kill -9 leaves it: the
    offline model, like OpenAI, refuses such a history unless the server repairs it."""
    answer(say(client, "hello", "repair-1"))
    graph = client.app.state.turns.graph  # type: ignore[attr-defined]
    dangling = AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": "1+1"}, "id": "call_dead"}])
    client.portal.call(  # type: ignore[union-attr]
        graph.aupdate_state,
        {"configurable": {"thread_id": "alice/repair-1"}},
        {"messages": [dangling]},
        "call_model",
    )
    assert "96" in answer(say(client, "What is 12 * 8?", "repair-1"))


def test_tenant_rate_limit_is_a_429_with_retry_after(database_url: str) -> None:
    with make_client(database_url, TENANT_REQUESTS_PER_MINUTE=2) as limited:
        statuses = [say(limited, "hi", f"rate-{i}", key=BOB).status_code for i in range(3)]
        assert statuses == [200, 200, 429]
        refused = say(limited, "hi", "rate-x", key=BOB)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert say(limited, "hi", "rate-y", key=CAROL).status_code == 200


def test_tenant_concurrent_run_limit_is_a_429(database_url: str) -> None:
    with make_client(database_url, TENANT_MAX_CONCURRENT_RUNS=1, BUSY_THREAD_POLICY="reject") as limited:
        hold_lease(database_url, "bob/other")
        response = say(limited, "hi", "limited-1", key=BOB)
        assert response.status_code == 429 and "runs in progress" in response.json()["detail"]
        assert say(limited, "hi", "limited-1", key=CAROL).status_code == 200


def test_reject_policy_refuses_a_batch_with_two_inputs_on_one_thread(database_url: str) -> None:
    with make_client(database_url, BUSY_THREAD_POLICY="reject") as rejecting:
        one = {"messages": [{"role": "user", "content": "hi"}]}
        body = {"inputs": [one, one], "config": {"configurable": {"thread_id": "dup-r"}}}
        response = rejecting.post("/agent/batch", json=body)
        assert response.status_code == 409 and "dup-r" in response.json()["detail"]
        assert count(database_url, "SELECT count(*) FROM checkpoints WHERE thread_id = 'alice/dup-r'") == 0


def retention(ttl_s: float = 3600, keep: int = 2) -> RetentionPolicy:
    return RetentionPolicy(thread_ttl_s=ttl_s, checkpoints_kept=keep, interval_s=600)


async def sweep(database_url: str) -> SweepReport:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        return await sweep_once(conn, retention(ttl_s=3600, keep=2))


def test_sweep_deletes_idle_threads_and_prunes_old_checkpoints(client: TestClient, database_url: str) -> None:
    answer(say(client, "old news", "idle-1"))
    for text in ("a", "b", "c"):
        answer(say(client, text, "busy-thread"))
    with db(database_url) as conn:
        conn.execute(
            "UPDATE agent_threads SET updated_at = now() - interval '2 hours' WHERE thread_key = %s", ("alice/idle-1",)
        )
    report = client.portal.call(sweep, database_url)  # type: ignore[union-attr]
    assert report.swept and report.threads_deleted >= 1
    assert count(database_url, "SELECT count(*) FROM checkpoints WHERE thread_id = 'alice/idle-1'") == 0
    assert client.get("/threads/idle-1/state").status_code == 404
    assert count(database_url, "SELECT count(*) FROM checkpoints WHERE thread_id = 'alice/busy-thread'") == 2
    # The pruned thread still reads and continues.
    assert answer(say(client, "what did I say before?", "busy-thread")).startswith("Earlier you said:")


async def test_only_one_worker_sweeps_at_a_time(database_url: str) -> None:
    with db(database_url) as holder, holder.transaction():
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (SWEEP_LOCK_ID,))
        assert (await sweep(database_url)).swept is False
    assert (await sweep(database_url)).swept is True


def test_long_threads_keep_a_bounded_state_and_the_whole_transcript(database_url: str) -> None:
    with make_client(database_url, CONTEXT_MESSAGES=4) as short:
        texts = [f"note {i}" for i in range(12)]
        for text in texts:
            answer(say(short, text, "long-1"))
        graph = short.app.state.turns.graph  # type: ignore[attr-defined]
        config = {"configurable": {"thread_id": "alice/long-1"}}
        state = short.portal.call(graph.aget_state, config)  # type: ignore[union-attr]
        assert len(state.values["messages"]) <= 2 * 4 + 2
        messages = short.get("/threads/long-1/transcript").json()["messages"]
        assert [m["content"] for m in messages if m["type"] == "human"] == texts
        assert [m["content"] for m in messages if m["type"] == "ai"] == [f"You said: {t}" for t in texts]
        # The model sees only the recent window.
        assert answer(say(short, "what did I say before?", "long-1")) == 'Earlier you said: "note 11"'


async def test_sweep_drops_old_runs_events_but_keeps_recent_ones(client: TestClient, database_url: str) -> None:
    answer(say(client, "keep my runs", "runs-kept"))
    with db(database_url) as conn:
        conn.execute(
            """INSERT INTO agent_runs (run_id, tenant, thread_key, assistant_id, status, kwargs, multitask_strategy,
                   durable, attached, ended_at)
               VALUES (%s, 'alice', 'alice/runs-old', gen_random_uuid(), 'success', '{}', 'enqueue', true, false,
                       now() - interval '2 hours'),
                      (%s, 'alice', 'alice/runs-old', gen_random_uuid(), 'success', '{}', 'enqueue', true, false,
                       now() - interval '2 days')""",
            (old := str(uuid.uuid4()), ancient := str(uuid.uuid4())),
        )
        conn.execute("INSERT INTO agent_run_events VALUES (%s, 1, 'end', 'null')", (old,))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        policy = RetentionPolicy(thread_ttl_s=86400, checkpoints_kept=20, interval_s=600, events_ttl_s=3600)
        assert (await sweep_once(conn, policy)).swept
    assert count(database_url, "SELECT count(*) FROM agent_run_events WHERE run_id = %s", old) == 0
    assert count(database_url, "SELECT count(*) FROM agent_runs WHERE run_id = %s", old) == 1
    assert count(database_url, "SELECT count(*) FROM agent_runs WHERE run_id = %s", ancient) == 0
    assert count(database_url, "SELECT count(*) FROM agent_runs WHERE thread_key = 'alice/runs-kept'") == 1
