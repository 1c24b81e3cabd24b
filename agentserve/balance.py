"""Spreads keep-alive connections evenly over the workers.

The workers share one listening socket, and whichever worker is awake when
connections arrive accepts all of them: at a burst of 40 new clients one of two
workers took 31. Keep-alive then pins each client to that worker for as long as
it keeps sending (k6 virtual users, RemoteRunnable's connection pool, a proxy's
upstream keep-alive), so one worker is overloaded while the other idles.

Each worker publishes how many requests it is serving in a small table shared by
all workers (a memory-mapped file the launcher creates). A worker serving more
than its share plus some slack answers with `Connection: close`; the client's
next request opens a new connection, which a less busy worker tends to accept
first, since the busy one is still running.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

TABLE_ENV = "AGENT_WORKER_TABLE"
_FIELDS = 2  # per slot: pid, requests in flight (int32 each)


def create_table(path: Path, workers: int) -> None:
    """Room for twice the workers, since a recycled worker's successor starts
    before it has gone. The launcher then names it in TABLE_ENV for the workers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(4 * _FIELDS * 2 * workers))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkerTable:
    """This worker's slot in the shared table, and the totals over all slots."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("r+b")
        self._map = mmap.mmap(self._file.fileno(), 0)
        self._cells = memoryview(self._map).cast("i")
        self.slot = self._claim()

    def _claim(self) -> int:
        """A free slot, or one whose worker died without releasing it."""
        fcntl.flock(self._file, fcntl.LOCK_EX)
        try:
            for slot in range(len(self._cells) // _FIELDS):
                pid = self._cells[slot * _FIELDS]
                if pid == 0 or not _alive(pid):
                    self._cells[slot * _FIELDS + 1] = 0
                    self._cells[slot * _FIELDS] = os.getpid()
                    return slot
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        raise RuntimeError("the worker table is full")

    def add(self, delta: int) -> None:
        """Changes this worker's count of requests in flight."""
        self._cells[self.slot * _FIELDS + 1] += delta

    def mine(self) -> int:
        return self._cells[self.slot * _FIELDS + 1]

    def share(self) -> float:
        """Requests in flight per live worker."""
        total = workers = 0
        for slot in range(len(self._cells) // _FIELDS):
            if self._cells[slot * _FIELDS]:
                workers += 1
                total += self._cells[slot * _FIELDS + 1]
        return total / max(workers, 1)

    def close(self) -> None:
        self._cells[self.slot * _FIELDS] = 0
        self._cells[self.slot * _FIELDS + 1] = 0
        self._cells.release()
        self._map.close()
        self._file.close()


def over_share(mine: int, share: float) -> bool:
    """Slack of 10 % (at least 2), so that workers near their share keep their
    connections and only a clear surplus moves."""
    return mine > share + max(2.0, math.ceil(share * 0.1))


def open_table() -> WorkerTable | None:
    """This worker's slot, when the launcher created a table (several workers)."""
    path = os.environ.get(TABLE_ENV)
    return WorkerTable(Path(path)) if path else None


class WorkerBalanceMiddleware:
    """Counts this worker's requests in flight in the shared table and closes the
    connection after a response while the worker holds more than its share. Does
    nothing without a table (`app.state.worker_table`, opened by the lifespan)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        table: WorkerTable | None = getattr(scope["app"].state, "worker_table", None) if "app" in scope else None
        if scope["type"] != "http" or table is None or scope.get("http_version") != "1.1":
            await self.app(scope, receive, send)
            return
        table.add(1)

        async def send_maybe_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and over_share(table.mine(), table.share()):
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            await self.app(scope, receive, send_maybe_closing)
        finally:
            table.add(-1)
