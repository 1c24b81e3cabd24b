"""Background runs survive their worker: kill -9 of the worker running one, and
another worker takes it up once its lease expires, finishes it, stores its turn
once and pays a refund at most once."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support import TEST_KEY, ServerProcess

pytestmark = pytest.mark.e2e


def ask(text: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}]}


def rows(database_url: str, query: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url) as conn:
        return list(conn.execute(query, params).fetchall())  # type: ignore[arg-type]


def test_a_background_run_whose_worker_is_killed_ends_success_once(database_url: str, workdir: Path) -> None:
    server = ServerProcess(database_url, workdir, OFFLINE_MODEL_LATENCY_MS="1500", THREAD_LEASE_TTL_S="3").start()
    order = f"K-{uuid.uuid4().hex[:8]}"
    try:
        with server.client() as client:
            thread_id = client.post("/threads", json={}).json()["thread_id"]
            paused = client.post(
                f"/threads/{thread_id}/runs/wait",
                json={"assistant_id": "agent", "input": ask(f"Please refund order {order} for 30")},
            ).json()
            assert paused["__interrupt__"]
            # On this connection's worker: the thread is free, so the run starts there.
            pid = client.get("/health").json()["worker_pid"]
            run = client.post(
                f"/threads/{thread_id}/runs",
                json={"assistant_id": "agent", "command": {"resume": {"approved": True}}},
            ).json()
        # The tool pays at once; the model's answer is 1.5 s away: kill the worker now.
        deadline = time.monotonic() + 10
        while not rows(database_url, "SELECT 1 FROM agent_refunds WHERE order_id = %s", order):
            assert time.monotonic() < deadline, "the refund tool never ran"
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with httpx.Client(base_url=server.url, headers={"x-api-key": TEST_KEY}, timeout=60) as client:
            result = client.get(f"/threads/{thread_id}/runs/{run['run_id']}/join").json()
            recovered_s = time.monotonic() - killed_at
            assert (
                "issued" in result["messages"][-1]["content"] or "already refunded" in result["messages"][-1]["content"]
            )
            final = client.get(f"/threads/{thread_id}/runs/{run['run_id']}").json()
            assert final["status"] == "success" and final["attempt"] == 2
            messages = client.get(f"/threads/{thread_id}/state").json()["values"]["messages"]
        # Taken up within the lease TTL plus a few seconds.
        assert recovered_s < 3 + 6
        assert len(rows(database_url, "SELECT 1 FROM agent_refunds WHERE order_id = %s", order)) == 1
        tool_results = [m for m in messages if m["type"] == "tool"]
        answers = [m for m in messages if m["type"] == "ai" and not m.get("tool_calls")]
        assert len(tool_results) == 1 and len(answers) == 1, messages
    finally:
        server.stop()
