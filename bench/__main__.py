"""`python -m bench` (`make bench`): what a turn costs along a thread, what HTTP
serving adds to the graph, and how many conversations two workers carry at a real
model's latency. Every run starts its own servers on 127.0.0.1 against a fresh
database and stops them at the end, also on errors and Ctrl-C.

Sections (`--only`, comma-separated; the first three by default):
  thread    one thread, --turns sequential turns (odd: tool, even: plain), zero model
            latency, --workers workers; also the same turns in-process.
  overhead  --conversations threads at once, --turns-per-conversation turns each, zero
            model latency, --workers workers; turns/s over HTTP vs in-process (each in
            its own process, so each has one core to itself), alternating for
            --overhead-rounds rounds; the verdict is the median round's ratio.
  capacity  --capacity-workers workers, --model-latency-ms per model call; for each of
            --levels, that many conversations loop turns with no pause for
            --level-seconds after --warmup-seconds; stops at the first failing level.
  soak      --soak-conversations at that latency for --soak-minutes; worker RSS growth.

Prints one table; writes bench-results/bench.json and, with thread, turn-latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import psutil

from bench.common import (
    RESULTS_DIR,
    Burst,
    Call,
    Database,
    Load,
    Sample,
    Turn,
    concurrent_turns,
    median,
    own_cpu_s,
    percentile,
    running_server,
    scratch_database,
    sequential_turns,
    tree_cpu_s,
)
from bench.inprocess import run_inprocess
from tests.support import TEST_KEY, ServerProcess, answer_of, turn_body

SECTIONS = ("thread", "overhead", "capacity", "soak")
DEFAULT_SECTIONS = "thread,overhead,capacity"
MODEL_CALLS = {"plain": 1, "tool": 2}
T = TypeVar("T")


@dataclass
class Report:
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def row(self, section: str, metric: str, value: str, target: str = "", passed: bool | None = None) -> None:
        verdict = "" if passed is None else ("PASS" if passed else "FAIL")
        self.rows.append((section, metric, value, target, verdict))

    def table(self) -> str:
        lines = [("section", "metric", "value", "target", ""), *self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(5)]
        out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
        out.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(line.rstrip() for line in out)


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def http_client(server: ServerProcess) -> httpx.AsyncClient:
    """One connection, kept alive, like one browser tab or one k6 VU."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": TEST_KEY}, timeout=120, limits=limits)


async def with_clients(server: ServerProcess, count: int, body: Callable[[Call], Awaitable[T]]) -> T:
    """Runs `body` with a Call that sends conversation c's turns on client c."""
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(http_client(server)) for _ in range(count)]

        async def call(conversation: int, thread: str, turn: Turn) -> tuple[str | None, int]:
            response = await clients[conversation].post("/agent/invoke", json=turn_body(turn.text, thread))
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.text[:200]}", len(response.content)
            answer = answer_of(response)
            return (None if answer == turn.expected else f"answer {answer!r}"), len(response.content)

        return await body(call)


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} ms"


def first_errors(samples: list[Sample]) -> list[str]:
    return sorted({s.error for s in samples if s.error})[:5]


def thread_section(args: argparse.Namespace, db: Database, report: Report) -> None:
    progress(f"thread: {args.turns} turns on one thread, {args.workers} worker(s), zero model latency")
    with running_server("thread", db, workers=args.workers, latency_ms=0, env=args.env) as server:
        http = asyncio.run(with_clients(server, 1, lambda call: sequential_turns(call, args.turns, "http")))
    inprocess: list[Sample] = []
    if not args.no_inprocess:
        progress("thread: the same turns in-process")
        result = run_inprocess(db.url, "thread", "--turns", str(args.turns))
        inprocess = [Sample(**s) for s in result["samples"]]

    def summary(samples: list[Sample]) -> dict[str, float]:
        """The brief's figures (turns 1-10 vs the last 10), and the same per turn kind
        (first vs last 5 of each), which do not depend on how the two kinds interleave."""
        first, last = median([s.ms for s in samples[:10]]), median([s.ms for s in samples[-10:]])
        out = {"first10_median_ms": first, "last10_median_ms": last, "ratio": last / first}
        for kind in MODEL_CALLS:
            of_kind = [s.ms for s in samples if s.kind == kind]
            out |= {f"{kind}_first5_median_ms": median(of_kind[:5]), f"{kind}_last5_median_ms": median(of_kind[-5:])}
            out[f"{kind}_median_ms"] = median(of_kind)
        return out

    last10 = f"{args.turns - 9}-{args.turns}"
    data: dict[str, Any] = {}
    for label, samples in (("HTTP", http), ("in-process", inprocess)):
        if not samples:
            continue
        s = summary(samples)
        # The targets are the served ones; the in-process figures say how much of it is the graph.
        targeted = label == "HTTP"
        first_ok = s["first10_median_ms"] <= 50 if targeted else None
        ratio_ok = s["ratio"] <= 1.5 if targeted else None
        report.row("thread", f"{label}: median turns 1-10", ms(s["first10_median_ms"]), "<= 50 ms" * targeted, first_ok)
        report.row("thread", f"{label}: median turns {last10}", ms(s["last10_median_ms"]))
        report.row("thread", f"{label}: last10 / first10", f"{s['ratio']:.2f}", "<= 1.5" * targeted, ratio_ok)
        for kind in MODEL_CALLS:
            first, last = s[f"{kind}_first5_median_ms"], s[f"{kind}_last5_median_ms"]
            report.row("thread", f"{label}: {kind} turns, median first 5 -> last 5", f"{ms(first)} -> {ms(last)}")
        errors = [x for x in samples if x.error]
        report.row("thread", f"{label}: errors", str(len(errors)), "0", not errors)
        key = "http" if label == "HTTP" else "inprocess"
        data[key] = s | {"errors": first_errors(samples), "turns": [x.brief() for x in samples]}
    for kind in MODEL_CALLS:
        sizes = [x.size for x in http if x.kind == kind]
        report.row("thread", f"response bytes, {kind} turns first / last", f"{sizes[0]} / {sizes[-1]}")
        if inprocess:
            cost = data["http"][f"{kind}_median_ms"] - data["inprocess"][f"{kind}_median_ms"]
            report.row("thread", f"HTTP cost, {kind} turns (median HTTP - in-process)", ms(cost))
    report.data["thread"] = data
    plot_turn_latency(http, inprocess)


def plot_turn_latency(http: list[Sample], inprocess: list[Sample]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 5))
    for label, samples in (("HTTP", http), ("in-process", inprocess)):
        for kind, marker in (("tool", "o"), ("plain", "x")):
            points = [(n, s.ms) for n, s in enumerate(samples, 1) if s.kind == kind]
            if points:
                axes.plot(*zip(*points, strict=True), marker, markersize=3, label=f"{label}, {kind} turns")
    axes.set_xlabel("turn number on the thread")
    axes.set_ylabel("latency (ms)")
    axes.set_ylim(bottom=0)
    axes.set_title("Turn latency along one thread (zero model latency)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(RESULTS_DIR / "turn-latency.png", dpi=120)
    plt.close(figure)


def overhead_section(args: argparse.Namespace, db: Database, report: Report) -> None:
    """HTTP and in-process bursts alternate, --overhead-rounds times, so that both
    see the machine in the same state; the verdict is the median of the rounds' ratios."""
    n, turns, rounds = args.conversations, args.turns_per_conversation, args.overhead_rounds
    progress(f"overhead: {rounds} rounds of {n} conversations x {turns} turns, HTTP then in-process")
    pid_args = ["--postgres-pid", str(db.postgres_pid)] if db.postgres_pid else []
    http: list[Burst] = []
    inprocess: list[Burst] = []
    with running_server("overhead", db, workers=args.workers, latency_ms=0, env=args.env) as server:
        assert server.process is not None
        clocks = {
            "server": lambda: tree_cpu_s(server.process.pid if server.process else None),
            "client": own_cpu_s,
            "postgres": lambda: tree_cpu_s(db.postgres_pid),
        }
        for r in range(rounds):

            def burst(call: Call, tag: str = f"http{r}") -> Awaitable[Burst]:
                return concurrent_turns(call, n, turns, tag, clocks)

            http.append(asyncio.run(with_clients(server, n, burst)))
            args_ = ["--conversations", str(n), "--turns", str(turns), "--tag", f"inprocess{r}", *pid_args]
            result = run_inprocess(db.url, "overhead", *args_)
            inprocess.append(Burst([Sample(**x) for x in result["samples"]], result["wall_s"], result["cpu_s"]))
            rates = f"HTTP {http[-1].per_second:.1f}, in-process {inprocess[-1].per_second:.1f} turns/s"
            progress(f"overhead: round {r + 1}: {rates}")

    def pooled(bursts: list[Burst]) -> tuple[list[Sample], float, dict[str, float]]:
        samples = [s for b in bursts for s in b.samples]
        cpu = {name: sum(b.cpu_s[name] for b in bursts) for name in bursts[0].cpu_s}
        return samples, sum(b.wall_s for b in bursts), cpu

    ratios = [h.per_second / i.per_second for h, i in zip(http, inprocess, strict=True)]
    ratio = median(ratios)
    http_samples, http_wall, http_cpu = pooled(http)
    in_samples, in_wall, in_cpu = pooled(inprocess)
    shape = f"{n} conv x {turns} turns x {rounds} rounds"
    report.row("overhead", f"HTTP turns/s ({shape}, {args.workers} worker)", f"{len(http_samples) / http_wall:.1f}")
    latencies = [s.ms for s in http_samples]
    report.row("overhead", "HTTP latency p50 / p95", f"{ms(median(latencies))} / {ms(percentile(latencies, 0.95))}")
    for name, cpu_s in http_cpu.items():
        report.row("overhead", f"HTTP run: {name} CPU per turn", ms(cpu_s * 1000 / len(http_samples)))
    report.row("overhead", "in-process turns/s (separate process, as 1 worker)", f"{len(in_samples) / in_wall:.1f}")
    for name, cpu_s in in_cpu.items():
        report.row("overhead", f"in-process run: {name} CPU per turn", ms(cpu_s * 1000 / len(in_samples)))
    report.row("overhead", "HTTP / in-process throughput, each round", " ".join(f"{x:.2f}" for x in ratios))
    report.row("overhead", "HTTP / in-process throughput (median)", f"{ratio:.2f}", ">= 0.90", ratio >= 0.9)
    errors = sum(1 for s in http_samples + in_samples if s.error)
    report.row("overhead", "errors (HTTP + in-process)", str(errors), "0", errors == 0)
    report.data["overhead"] = {
        "conversations": n,
        "turns_per_conversation": turns,
        "rounds": rounds,
        "http": [{"turns_per_s": b.per_second, "wall_s": b.wall_s, "cpu_s": b.cpu_s} for b in http],
        "inprocess": [{"turns_per_s": b.per_second, "wall_s": b.wall_s, "cpu_s": b.cpu_s} for b in inprocess],
        "ratios": ratios,
        "ratio": ratio,
        "errors": first_errors(http_samples + in_samples),
        "note": "the server and the in-process run each run in their own process; the HTTP client runs in the bench",
    }


async def capacity_level(args: argparse.Namespace, server: ServerProcess, db: Database, level: int) -> dict[str, Any]:
    assert server.process is not None
    pid = server.process.pid

    async def run(call: Call) -> dict[str, Any]:
        load = Load(call, level, f"capacity-{level}-{uuid.uuid4().hex[:8]}")
        load.start()
        try:
            await asyncio.sleep(args.warmup_seconds)
            cpu, pg, start = tree_cpu_s(pid), tree_cpu_s(db.postgres_pid), time.perf_counter()
            await asyncio.sleep(args.level_seconds)
            end = time.perf_counter()
            cpu, pg = tree_cpu_s(pid) - cpu, tree_cpu_s(db.postgres_pid) - pg
        finally:
            await load.stop()
        window = [s for s in load.samples if start <= s.end <= end]
        kinds = {}
        for kind, calls in MODEL_CALLS.items():
            latencies = [s.ms for s in window if s.kind == kind]
            p95 = percentile(latencies, 0.95)
            model_ms = calls * args.model_latency_ms
            kinds[kind] = {
                "turns": len(latencies),
                "p50_ms": median(latencies),
                "p95_ms": p95,
                "model_ms": model_ms,
                "p95_over_model": p95 / model_ms if model_ms else math.nan,
            }
        errors = [s for s in load.samples if s.error]
        ok = bool(window) and not errors and all(k["p95_over_model"] <= 1.3 for k in kinds.values())
        return {
            "level": level,
            "turns": len(window),
            "turns_per_s": len(window) / (end - start),
            "errors": len(errors),
            "error_examples": first_errors(load.samples),
            "kinds": kinds,
            "server_cpu_ms_per_turn": cpu * 1000 / max(len(window), 1),
            "postgres_cpu_ms_per_turn": pg * 1000 / max(len(window), 1),
            "passed": ok,
        }

    return await with_clients(server, level, run)


def capacity_section(args: argparse.Namespace, db: Database, report: Report) -> None:
    workers, latency = args.capacity_workers, args.model_latency_ms
    progress(f"capacity: {workers} workers, model latency {latency:g} ms, levels {args.levels}")
    levels: list[dict[str, Any]] = []
    with running_server("capacity", db, workers=workers, latency_ms=latency, env=args.env) as server:
        for level in args.levels:
            progress(f"capacity: {level} conversations for {args.warmup_seconds:g}+{args.level_seconds:g} s")
            result = asyncio.run(capacity_level(args, server, db, level))
            levels.append(result)
            kinds = ", ".join(f"{k} p95 {v['p95_ms']:.0f} ms" for k, v in result["kinds"].items())
            progress(f"capacity: {level}: {result['turns']} turns, {result['errors']} errors, {kinds}")
            if not result["passed"]:
                break
    for result in levels:
        level = f"{result['level']} conv"
        report.row("capacity", f"{level}: turns (turns/s)", f"{result['turns']} ({result['turns_per_s']:.1f}/s)")
        report.row("capacity", f"{level}: errors", str(result["errors"]), "0", result["errors"] == 0)
        for kind, k in result["kinds"].items():
            report.row(
                "capacity",
                f"{level}: {kind} p50 / p95 (p95 / {k['model_ms']:g} ms model)",
                f"{k['p50_ms']:.0f} / {k['p95_ms']:.0f} ms ({k['p95_over_model']:.2f}x)",
                "<= 1.30x",
                k["p95_over_model"] <= 1.3,
            )
        report.row("capacity", f"{level}: server CPU per turn", ms(result["server_cpu_ms_per_turn"]))
        report.row("capacity", f"{level}: postgres CPU per turn", ms(result["postgres_cpu_ms_per_turn"]))
    passing = [r["level"] for r in levels if r["passed"]]
    # The largest passing level below the first failure (levels stop at the first failure).
    capacity = max(passing) if passing else 0
    report.row(
        "capacity",
        f"capacity ({workers} workers, {latency:g} ms/model call)",
        f"{capacity} conversations",
        ">= 40",
        capacity >= 40,
    )
    report.data["capacity"] = {"workers": workers, "model_latency_ms": latency, "capacity": capacity, "levels": levels}


def worker_rss_mb(server: ServerProcess) -> dict[int, float]:
    """Resident memory of each uvicorn worker (the supervisor's spawned children; not
    multiprocessing's resource tracker)."""
    assert server.process is not None
    rss = {}
    for child in psutil.Process(server.process.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                rss[child.pid] = child.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return rss


def soak_section(args: argparse.Namespace, db: Database, report: Report) -> None:
    n, minutes, warmup_s = args.soak_conversations, args.soak_minutes, 60.0
    progress(f"soak: {n} conversations for {minutes:g} min, {args.capacity_workers} workers, MAX_REQUESTS=0")
    env = {**args.env, "MAX_REQUESTS": "0"}
    with running_server("soak", db, workers=args.capacity_workers, latency_ms=args.model_latency_ms, env=env) as server:

        async def run(call: Call) -> tuple[list[tuple[float, dict[int, float]]], list[Sample]]:
            load = Load(call, n, f"soak-{uuid.uuid4().hex[:8]}")
            load.start()
            series: list[tuple[float, dict[int, float]]] = []
            start = time.perf_counter()
            end = start + minutes * 60
            try:
                while (now := time.perf_counter()) < end:
                    series.append((now - start, worker_rss_mb(server)))
                    await asyncio.sleep(min(10.0, end - now))
                series.append((time.perf_counter() - start, worker_rss_mb(server)))
            finally:
                await load.stop()
            return series, load.samples

        series, samples = asyncio.run(with_clients(server, n, run))
    baseline_s, baseline = next(((t, rss) for t, rss in series if t >= warmup_s), series[0])
    final = series[-1][1]
    errors = sum(1 for s in samples if s.error)
    report.row("soak", "turns / errors", f"{len(samples)} / {errors}", "0 errors", errors == 0)
    growths = {}
    for pid, rss in sorted(baseline.items()):
        if pid not in final:
            report.row("soak", f"worker {pid}", "gone (replaced?)", "", False)
            continue
        growth = (final[pid] - rss) / rss * 100
        growths[pid] = growth
        report.row(
            "soak",
            f"worker {pid} RSS at {baseline_s:.0f} s -> end",
            f"{rss:.0f} -> {final[pid]:.0f} MB ({growth:+.1f}%)",
            "< 10%",
            growth < 10,
        )
    report.data["soak"] = {
        "conversations": n,
        "minutes": minutes,
        "turns": len(samples),
        "errors": errors,
        "error_examples": first_errors(samples),
        "growth_percent": growths,
        "rss_mb": [{"t_s": t, "rss": rss} for t, rss in series],
    }


RUNNERS: dict[str, Callable[[argparse.Namespace, Database, Report], None]] = {
    "thread": thread_section,
    "overhead": overhead_section,
    "capacity": capacity_section,
    "soak": soak_section,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=DEFAULT_SECTIONS, help=f"sections to run, of {','.join(SECTIONS)}")
    parser.add_argument("--workers", type=int, default=1, help="server workers for thread and overhead")
    parser.add_argument("--turns", type=int, default=200, help="turns on the thread (thread)")
    parser.add_argument("--conversations", type=int, default=20, help="concurrent conversations (overhead)")
    parser.add_argument("--turns-per-conversation", type=int, default=10, help="(overhead)")
    parser.add_argument(
        "--overhead-rounds", type=int, default=5, help="alternating HTTP / in-process bursts (overhead)"
    )
    parser.add_argument("--no-inprocess", action="store_true", help="skip the in-process run of thread")
    parser.add_argument("--capacity-workers", type=int, default=2, help="server workers for capacity and soak")
    parser.add_argument("--model-latency-ms", type=float, default=600.0, help="per model call (capacity, soak)")
    parser.add_argument("--levels", default="20,30,40,50,60", help="concurrent conversations per level (capacity)")
    parser.add_argument("--level-seconds", type=float, default=30.0, help="measured seconds per level (capacity)")
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="unmeasured seconds per level (capacity)")
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--soak-conversations", type=int, default=20)
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra server setting (repeatable)"
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := set(args.only) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.levels = [int(level) for level in args.levels.split(",")]
    if args.turns < 20:
        parser.error("--turns must be at least 20 (first and last 10 turns are compared)")
    try:
        args.env = dict(item.split("=", 1) for item in args.env)
    except ValueError:
        parser.error("--env takes KEY=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server and database is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    RESULTS_DIR.mkdir(exist_ok=True)
    report = Report()
    report.data["meta"] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "database": "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded PostgreSQL",
        "args": {key: value for key, value in vars(args).items()},
    }
    try:
        with scratch_database() as db:
            for name in SECTIONS:
                if name in args.only:
                    # Other work on the machine skews every figure: say how busy it was.
                    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
                    report.row(name, "machine load average before (1/5/15 min)", f"{load} on {os.cpu_count()} CPUs")
                    report.data.setdefault("load_average_before", {})[name] = os.getloadavg()
                    RUNNERS[name](args, db, report)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped and the scratch database dropped", file=sys.stderr)
        return 130
    (RESULTS_DIR / "bench.json").write_text(json.dumps(report.data, indent=2, default=str) + "\n")
    print(report.table())
    print(f"\nwritten: {RESULTS_DIR / 'bench.json'}" + (", turn-latency.png" if "thread" in args.only else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
