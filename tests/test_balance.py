"""Keep-alive connections spread over the workers: the shared table, the
middleware's decision, and the real server under a burst of new clients."""

from __future__ import annotations

import asyncio
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from agentserve.balance import WorkerBalanceMiddleware, WorkerTable, create_table, over_share
from tests.support import TEST_KEY, ServerProcess, turn_body


@pytest.fixture
def table_path(tmp_path: Path) -> Path:
    path = tmp_path / "workers.table"
    create_table(path, workers=2)
    return path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_each_worker_gets_its_own_slot_and_the_share_is_per_live_worker(table_path: Path) -> None:
    first, second = WorkerTable(table_path), WorkerTable(table_path)
    assert first.slot != second.slot
    first.add(9)
    second.add(3)
    assert (first.mine(), second.mine()) == (9, 3)
    assert first.share() == second.share() == 6.0
    second.close()
    assert first.share() == 9.0
    first.close()


def test_a_dead_workers_slot_is_reclaimed(table_path: Path) -> None:
    cells = memoryview(bytearray(table_path.read_bytes())).cast("i")
    cells[0], cells[1] = dead_pid(), 40  # a worker killed with 40 requests in flight
    table_path.write_bytes(cells.tobytes())
    table = WorkerTable(table_path)
    assert table.slot == 0
    assert table.mine() == 0
    table.close()


def test_only_a_clear_surplus_moves() -> None:
    assert not over_share(22, 20.0)
    assert over_share(23, 20.0)
    assert not over_share(3, 1.0)
    assert over_share(4, 1.0)


async def test_a_worker_over_its_share_closes_the_connection_after_the_response(table_path: Path) -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello)], middleware=[Middleware(WorkerBalanceMiddleware)])
    mine, other = WorkerTable(table_path), WorkerTable(table_path)  # this worker, and another one, idle
    app.state.worker_table = mine
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            response = await client.get("/")
            assert response.text == "hello"
            assert "connection" not in response.headers  # 1 in flight, share 0.5: within the slack

            mine.add(10)  # ten more requests in flight here
            assert (await client.get("/")).headers.get("connection") == "close"

            other.add(10)  # the other worker is as busy
            assert "connection" not in (await client.get("/")).headers
            mine.add(-10)
        assert mine.mine() == 0
    finally:
        other.close()
        mine.close()


def read_table(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    return [struct.unpack_from("ii", data, offset) for offset in range(0, len(data), 8)]


@pytest.mark.e2e
def test_a_burst_of_new_clients_ends_up_spread_over_the_workers(database_url: str, workdir: Path) -> None:
    """16 clients connect at once and keep their connections busy: after a few
    seconds each of the two workers serves about half of them."""
    server = ServerProcess(database_url, workdir, OFFLINE_MODEL_LATENCY_MS="300").start()
    table = workdir / ".data" / "workers.table"
    clients, seconds = 16, 8.0
    samples: list[tuple[float, list[int]]] = []

    async def conversation(c: int, stop: asyncio.Event) -> int:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(
            base_url=server.url, headers={"X-API-Key": TEST_KEY}, timeout=30, limits=limits
        ) as client:
            turns = 0
            while not stop.is_set():
                response = await client.post("/agent/invoke", json=turn_body(f"note {turns}", f"balance-{c}"))
                assert response.status_code == 200, response.text
                turns += 1
            return turns

    async def run() -> list[int]:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(conversation(c, stop)) for c in range(clients)]
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            live = [count for pid, count in read_table(table) if pid]
            samples.append((time.monotonic() - started, live))
            await asyncio.sleep(0.1)
        stop.set()
        return await asyncio.gather(*tasks)

    try:
        deadline = time.monotonic() + 30
        while len(workers := {pid for pid, _ in read_table(table) if pid}) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the second worker may still be starting
        assert len(workers) == 2 and workers <= set(server.worker_pids())
        turns = asyncio.run(run())
    finally:
        server.stop()
    assert all(t > 0 for t in turns)
    settled = [max(live) - min(live) for at, live in samples if at >= 4.0 and len(live) == 2]
    assert settled, samples
    # Without balancing, a burst left one worker with three quarters of the clients.
    assert statistics.median(settled) <= 4, samples
    assert not any(pid for pid, _ in read_table(table)), "a worker that exited kept its slot"
