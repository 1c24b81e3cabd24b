"""Background runs survive their worker: kill -9 of the worker running one, and
another worker takes it up once its lease expires, finishes it, stores its turn
once and pays a refund at most once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support import ROOT, TEST_KEY, ServerProcess

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


def test_without_listen_wakeups_fall_back_to_polling(database_url: str, workdir: Path) -> None:
    """As behind a transaction pooler with no direct URL: no LISTEN connection
    works, and queued runs, waiting turns and joins still go through by polling."""
    migrate = subprocess.run(
        [sys.executable, "-m", "agentserve.migrate"],
        env={**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)},
        cwd=workdir,
        capture_output=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stderr
    server = ServerProcess(
        database_url,
        workdir,
        OFFLINE_MODEL_LATENCY_MS="200",
        SETUP_SCHEMA_ON_START="false",
        DATABASE_DIRECT_URL="postgresql://127.0.0.1:9/nowhere?connect_timeout=1",
    ).start()
    try:
        with server.client() as client:
            thread_id = client.post("/threads", json={}).json()["thread_id"]
            runs = [
                client.post(f"/threads/{thread_id}/runs", json={"assistant_id": "agent", "input": ask(text)}).json()
                for text in ("my name is Cy", "one", "what did I say?")
            ]
            result = client.get(f"/threads/{thread_id}/runs/{runs[-1]['run_id']}/join", timeout=30).json()
            assert result["messages"][-1]["content"] == 'Earlier you said: "my name is Cy"; "one"'
        assert "LISTEN connection lost" in server.log()
    finally:
        server.stop()


def test_api_and_worker_roles_split_http_from_background_work(database_url: str, workdir: Path) -> None:
    """One image, two roles: runs created on an `api` process are executed by a
    `worker` process, which answers only its probes over HTTP. The api process also
    reaches PostgreSQL through a multi-host URL whose first host is down."""
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    host, port = str(info.get("host") or "127.0.0.1"), str(info.get("port") or "5432")
    failover_url = psycopg.conninfo.make_conninfo(
        database_url, host=f"127.0.0.1,{host}", port=f"9,{port}", target_session_attrs="read-write"
    )
    api = ServerProcess(failover_url, workdir, ROLE="api", OFFLINE_MODEL_LATENCY_MS="100").start()
    worker = ServerProcess(database_url, workdir, ROLE="worker", OFFLINE_MODEL_LATENCY_MS="100")
    try:
        with api.client() as client:
            thread_id = client.post("/threads", json={}).json()["thread_id"]
            # A turn someone waits for runs on the api process at once...
            waited = client.post(
                f"/threads/{thread_id}/runs/wait", json={"assistant_id": "agent", "input": ask("my name is Ada")}
            ).json()
            assert waited["messages"][-1]["content"] == "Nice to meet you, Ada."
            # ...a background run waits for a worker.
            queued = client.post(
                f"/threads/{thread_id}/runs", json={"assistant_id": "agent", "input": ask("what is my name")}
            ).json()
            time.sleep(2)
            assert client.get(f"/threads/{thread_id}/runs/{queued['run_id']}").json()["status"] == "pending"
            worker.start()
            result = client.get(f"/threads/{thread_id}/runs/{queued['run_id']}/join", timeout=30).json()
            assert result["messages"][-1]["content"] == "Your name is Ada."
        with worker.client() as probe:
            assert probe.get("/health").json()["role"] == "worker"
            assert probe.get("/ready").status_code == 200
            assert probe.post("/threads/search", json={}).status_code == 404
    finally:
        worker.stop()
        api.stop()
