"""End-to-end concurrency on one thread: 2 workers, a real PostgreSQL, real kills."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import TEST_KEY, ServerProcess, answer_of, turn_body

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def slow_server(database_url: str, workdir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        database_url, workdir, OFFLINE_MODEL_LATENCY_MS="150", BUSY_THREAD_WAIT_S="1.5", THREAD_LEASE_TTL_S="3"
    ).start()
    yield process
    process.stop()


def quoted(recall: str) -> list[str]:
    return re.findall(r'"([^"]*)"', recall)


def test_twelve_concurrent_turns_on_one_thread_lose_nothing(slow_server: ServerProcess) -> None:
    thread = "burst-12"
    texts = [f"note {i}" for i in range(12)]

    def send(text: str) -> httpx.Response:
        return httpx.post(
            f"{slow_server.url}/agent/invoke", json=turn_body(text, thread), headers={"X-API-Key": TEST_KEY}, timeout=30
        )

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, texts))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 409}, statuses
    assert statuses.count(200) >= 2
    for response in responses:
        if response.status_code == 409:
            assert "retry" in response.json()["detail"] and response.headers["retry-after"]
    accepted = {text for text, r in zip(texts, responses, strict=True) if r.status_code == 200}
    with slow_server.client() as client:
        recall = answer_of(client.post("/agent/invoke", json=turn_body("what did I say before?", thread)))
        assert set(quoted(recall)) == accepted
        assert len(quoted(recall)) == len(accepted)


def test_a_stream_holds_its_thread_until_it_ends(slow_server: ServerProcess) -> None:
    thread = "stream-holds"
    results: dict[str, int] = {}

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{slow_server.url}/agent/stream",
            json=turn_body("What is 2 * 21?", thread),
            headers={"X-API-Key": TEST_KEY},
            timeout=30,
        ) as response:
            results["stream"] = response.status_code
            for _ in response.iter_bytes():
                pass

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(0.1)
    with slow_server.client() as client:
        started = time.monotonic()
        second = client.post("/agent/invoke", json=turn_body("what did I say before?", thread))
        waited = time.monotonic() - started
    streamer.join()
    assert results["stream"] == 200
    # It waited for the stream's turn (two model calls) and then saw it.
    assert second.status_code == 200 and waited > 0.25
    assert "What is 2 * 21?" in answer_of(second)


def test_thread_continues_cleanly_after_kill_9_of_its_worker_mid_run(database_url: str, workdir: Path) -> None:
    server = ServerProcess(
        database_url, workdir, OFFLINE_MODEL_LATENCY_MS="1500", BUSY_THREAD_WAIT_S="10", THREAD_LEASE_TTL_S="3"
    ).start()
    thread = "killed-mid-run"
    try:
        with server.client() as client:
            assert answer_of(client.post("/agent/invoke", json=turn_body("my name is Ada", thread))) == (
                "Nice to meet you, Ada."
            )
        doomed = server.client()
        pid = doomed.get("/health").json()["worker_pid"]
        failure: list[BaseException] = []

        def run_turn() -> None:
            try:
                doomed.post("/agent/invoke", json=turn_body("What is 12 * 8?", thread))
            except httpx.HTTPError as exc:
                failure.append(exc)

        runner = threading.Thread(target=run_turn)
        runner.start()
        time.sleep(2.2)  # after the tool call and its result, inside the second model call
        os.kill(pid, signal.SIGKILL)
        runner.join(15)
        doomed.close()
        assert failure, "the killed worker's request should have failed"
        server.wait_until_healthy(30)
        with server.client() as client:
            started = time.monotonic()
            after = client.post("/agent/invoke", json=turn_body("what is my name", thread))
            assert answer_of(after) == "Your name is Ada."
            # The dead worker's lease expired by itself; nothing blocked the thread for long.
            assert time.monotonic() - started < 12
            # A turn is stored when it ends: the killed one left nothing half-done behind
            # (no dangling tool call), and sending it again simply runs it.
            recall = answer_of(client.post("/agent/invoke", json=turn_body("what did I say before?", thread)))
            assert quoted(recall) == ["my name is Ada", "what is my name"]
            retried = client.post("/agent/invoke", json=turn_body("What is 12 * 8?", thread))
            assert answer_of(retried) == "The answer is 96."
        assert len(server.worker_pids()) >= 2
    finally:
        server.stop()
