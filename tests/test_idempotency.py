"""Idempotency-Key end to end (real server, 2 workers, real PostgreSQL): a retry
gets the first answer, or joins the first run, and never stores a second turn."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import TEST_KEY, ServerProcess, turn_body

pytestmark = pytest.mark.e2e
BOB_KEY = "bob-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(database_url: str, workdir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        database_url, workdir, OFFLINE_MODEL_LATENCY_MS="300", AGENT_API_KEYS=f"bob={BOB_KEY}", THREAD_LEASE_TTL_S="3"
    ).start()
    yield process
    process.stop()


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def humans(client: httpx.Client, thread_id: str) -> list[str]:
    messages = client.get(f"/threads/{thread_id}/transcript").json()["messages"]
    return [m["content"] for m in messages if m["type"] == "human"]


def test_a_retried_invoke_gets_the_first_answer_and_stores_one_turn(server: ServerProcess) -> None:
    thread, key = f"idem-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    with server.client() as client:
        body = turn_body("my note is apples", thread)
        first = client.post("/agent/invoke", json=body, headers={"Idempotency-Key": key})
        again = client.post("/agent/invoke", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert humans(client, thread) == ["my note is apples"]
        other = client.post("/agent/invoke", json=turn_body("something else", thread), headers={"Idempotency-Key": key})
        assert other.status_code == 422 and "Idempotency-Key" in other.text
        assert humans(client, thread) == ["my note is apples"]
    # Keys are per tenant: Bob's request with the same key is his own.
    with server.client(BOB_KEY) as bob:
        assert bob.post("/agent/invoke", json=body, headers={"Idempotency-Key": key}).status_code == 200
        assert humans(bob, thread) == ["my note is apples"]


def test_a_retry_while_the_first_still_runs_waits_for_its_answer(server: ServerProcess) -> None:
    key = str(uuid.uuid4())
    with server.client() as client:
        thread_id = client.post("/threads", json={}).json()["thread_id"]
        body = {"assistant_id": "agent", "input": ask("What is 12 * 8?")}
        answers: list[Any] = []

        def send() -> None:
            with server.client() as own:
                response = own.post(f"/threads/{thread_id}/runs/wait", json=body, headers={"Idempotency-Key": key})
                answers.append(response.json())

        senders = [threading.Thread(target=send) for _ in range(3)]
        for sender in senders:
            sender.start()
            time.sleep(0.1)
        for sender in senders:
            sender.join(30)
        assert len(answers) == 3 and all(a == answers[0] for a in answers)
        assert answers[0]["messages"][-1]["content"] == "The answer is 96."
        assert humans(client, thread_id) == ["What is 12 * 8?"]
        assert len(client.get(f"/threads/{thread_id}/runs").json()) == 1
        created = [
            client.post(
                f"/threads/{thread_id}/runs",
                json={"assistant_id": "agent", "input": ask("hi")},
                headers={"Idempotency-Key": "create-" + key},
            ).json()
            for _ in range(2)
        ]
        assert created[0]["run_id"] == created[1]["run_id"]


def test_a_retried_stream_gives_the_same_events(server: ServerProcess) -> None:
    key = str(uuid.uuid4())
    with server.client() as client:
        thread_id = client.post("/threads", json={}).json()["thread_id"]
        body = {"assistant_id": "agent", "input": ask("my name is Ada"), "stream_mode": ["values"]}
        streams = [
            client.post(f"/threads/{thread_id}/runs/stream", json=body, headers={"Idempotency-Key": key}).text
            for _ in range(2)
        ]
        assert "event: end" in streams[0] and streams[0] == streams[1]
        assert humans(client, thread_id) == ["my name is Ada"]


def test_a_retry_after_the_first_worker_died_joins_its_run(database_url: str, workdir: Path) -> None:
    server = ServerProcess(database_url, workdir, OFFLINE_MODEL_LATENCY_MS="1200", THREAD_LEASE_TTL_S="3").start()
    key = str(uuid.uuid4())
    try:
        doomed = server.client()
        thread_id = doomed.post("/threads", json={}).json()["thread_id"]
        pid = doomed.get("/health").json()["worker_pid"]
        body = {"assistant_id": "agent", "input": ask("What is 7 * 6?")}
        failure: list[BaseException] = []

        def send() -> None:
            try:
                doomed.post(f"/threads/{thread_id}/runs/wait", json=body, headers={"Idempotency-Key": key})
            except httpx.HTTPError as exc:
                failure.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.6)  # the run has started on that worker
        os.kill(pid, signal.SIGKILL)
        sender.join(10)
        assert failure, "the first request should have lost its connection"
        with httpx.Client(base_url=server.url, headers={"x-api-key": TEST_KEY}, timeout=60) as client:
            retried = client.post(f"/threads/{thread_id}/runs/wait", json=body, headers={"Idempotency-Key": key})
            assert retried.status_code == 200 and retried.json()["messages"][-1]["content"] == "The answer is 42."
            assert humans(client, thread_id) == ["What is 7 * 6?"]
            [run] = client.get(f"/threads/{thread_id}/runs").json()
            assert run["status"] == "success" and run["attempt"] == 2
    finally:
        server.stop()
