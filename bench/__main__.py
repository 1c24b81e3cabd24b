"""`python -m bench` (`make bench`): what a turn costs along a thread, what HTTP
serving adds to the graph, how many conversations two workers carry at a real
model's latency, and how our LangGraph API compares with the reference server's.
Every run starts its own servers on 127.0.0.1 against a fresh database and stops
them at the end, also on errors and Ctrl-C.

Sections (`--only`, comma-separated; all but soak by default):
  breakdown CPU per request, one request at a time, of plain and tool turns (direct and
            through the app) and of the pieces of the HTTP path, in this tree and in
            --baseline (a commit, unpacked into .data/), each in processes of its own
            alternating --breakdown-rounds times (bench/breakdown.py); the verdicts
            are this tree's turns through the app at most half the baseline's.
  thread    one thread, --turns sequential turns (odd: tool, even: plain), zero model
            latency, --workers workers, the offline model in a process of its own
            (as a provider is); its last 10 turns alternate with turns 1-10 of a
            fresh thread, which are the "turns 1-10" (same seconds, same machine
            state); also the same turns in-process.
  overhead  --conversations threads at once, --turns-per-conversation turns each, zero
            model latency, --workers workers; turns/s over HTTP vs in-process (each in
            its own process, so each has one core to itself, both on the event loop
            a worker runs on), alternating for --overhead-rounds rounds; the verdict
            is the median round's ratio.
  capacity  --capacity-workers workers, --model-latency-ms per model call (the offline
            model in a process of its own, as a provider is); for each of --levels,
            that many conversations loop turns that alternate plain and tool, with no
            pause, for --level-seconds after --warmup-seconds; a level passes with no
            errors and the p95 of its turns within 1.3x a tool turn's model time (two
            calls); stops at the first failing level.
  soak      --soak-conversations at that latency for --soak-minutes; worker RSS growth.
  reference the overhead shape through the LangGraph API (`runs.wait`) against the
            reference server, `langgraph dev` (one process, in-memory; its venv is
            .data/reference-venv, installed on first use from
            bench/reference-requirements.txt), and against ours (one worker), both
            calling one offline-model process; alternating for --reference-rounds
            rounds; the verdict is the median round's ratio of turns/s, ours / reference.
  lgapi-overhead  the overhead shape on our server, --workers workers: turns/s through
            the LangGraph API vs LangServe's /agent/invoke, alternating for
            --overhead-rounds rounds; the verdict is the median round's ratio.
  lgapi-thread  the thread section's turns through the LangGraph API, --lgapi-turns
            of them, --workers workers.

Prints one table; writes bench-results/bench.json and, with thread, turn-latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import psutil

from agentserve.model import OFFLINE_MODEL_NAME
from bench import breakdown
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
from bench.reference import VENV, lgapi_missing, offline_model, reference_server, reference_venv, with_lgapi_clients
from tests.support import ROOT, TEST_KEY, ServerProcess, answer_of, turn_body

SECTIONS = ("breakdown", "thread", "overhead", "capacity", "soak", "reference", "lgapi-overhead", "lgapi-thread")
DEFAULT_SECTIONS = "breakdown,thread,overhead,capacity,reference,lgapi-overhead,lgapi-thread"
MODEL_CALLS = {"plain": 1, "tool": 2}
HALVED = ("plain turn, through the app", "tool turn, through the app")
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


def thread_summary(samples: list[Sample]) -> dict[str, float]:
    """The brief's figures (turns 1-10 vs the last 10), and the same per turn kind
    (first vs last 5 of each), which do not depend on how the two kinds interleave."""
    first, last = median([s.ms for s in samples[:10]]), median([s.ms for s in samples[-10:]])
    out = {"first10_median_ms": first, "last10_median_ms": last, "ratio": last / first}
    for kind in MODEL_CALLS:
        of_kind = [s.ms for s in samples if s.kind == kind]
        out |= {f"{kind}_first5_median_ms": median(of_kind[:5]), f"{kind}_last5_median_ms": median(of_kind[-5:])}
        out[f"{kind}_median_ms"] = median(of_kind)
    return out


def thread_rows(
    report: Report,
    section: str,
    label: str,
    samples: list[Sample],
    first_target_ms: float | None,
    ratio_target: float | None,
) -> dict[str, Any]:
    """Reports one thread's turns (targets only where given); returns its figures and turns."""
    s = thread_summary(samples)
    first_ok = s["first10_median_ms"] <= first_target_ms if first_target_ms is not None else None
    ratio_ok = s["ratio"] <= ratio_target if ratio_target is not None else None
    first_target = f"<= {first_target_ms:g} ms" if first_target_ms is not None else ""
    report.row(section, f"{label}: median turns 1-10", ms(s["first10_median_ms"]), first_target, first_ok)
    report.row(section, f"{label}: median turns {len(samples) - 9}-{len(samples)}", ms(s["last10_median_ms"]))
    ratio_target_text = f"<= {ratio_target:g}" if ratio_target is not None else ""
    report.row(section, f"{label}: last10 / first10", f"{s['ratio']:.2f}", ratio_target_text, ratio_ok)
    for kind in MODEL_CALLS:
        first, last = s[f"{kind}_first5_median_ms"], s[f"{kind}_last5_median_ms"]
        report.row(section, f"{label}: {kind} turns, median first 5 -> last 5", f"{ms(first)} -> {ms(last)}")
    errors = [x for x in samples if x.error]
    report.row(section, f"{label}: errors", str(len(errors)), "0", not errors)
    return s | {"errors": first_errors(samples), "turns": [x.brief() for x in samples]}


def size_rows(report: Report, section: str, samples: list[Sample]) -> None:
    for kind in MODEL_CALLS:
        sizes = [x.size for x in samples if x.kind == kind]
        report.row(section, f"response bytes, {kind} turns first / last", f"{sizes[0]} / {sizes[-1]}")


@contextlib.contextmanager
def provider_apart(args: argparse.Namespace, latency_ms: float = 0.0) -> Iterator[dict[str, str]]:
    """Server settings that send the model calls to an offline model in a process of
    its own, as a real provider is: how the prompt's growth costs the provider is
    then not counted as the server's work on its own core."""
    with offline_model(latency_ms) as model:
        yield {
            **args.env,
            "OPENAI_API_KEY": "offline",
            "OPENAI_BASE_URL": model.url,
            "OPENAI_MODEL": OFFLINE_MODEL_NAME,
        }


def breakdown_section(args: argparse.Namespace, db: Database, report: Report) -> None:
    progress(
        f"breakdown: CPU per request, this tree and {args.baseline or 'no baseline'}, {args.breakdown_rounds} rounds"
    )
    result = breakdown.compare(db.url, args.baseline or None, args.breakdown_rounds)
    before = result.get("before")
    for piece in breakdown.PIECES:
        value = f"{result['after'][piece]:.2f} ms"
        if not before:
            report.row("breakdown", f"CPU per request, {piece}", value)
            continue
        ratio = result["after"][piece] / before[piece]
        value += f" (before {before[piece]:.2f} ms: {ratio:.2f}x)"
        if piece in HALVED:
            report.row("breakdown", f"CPU per request, {piece}", value, "<= 0.50x before", ratio <= 0.5)
        else:
            report.row("breakdown", f"CPU per request, {piece}", value)
    if not before and args.baseline:
        report.row("breakdown", "baseline", f"not measured: {args.baseline!r} is not in this clone", "", False)
    report.data["breakdown"] = result


def thread_section(args: argparse.Namespace, db: Database, report: Report) -> None:
    progress(f"thread: {args.turns} turns on one thread, {args.workers} worker(s), zero model latency")
    with (
        provider_apart(args) as env,
        running_server("thread", db, workers=args.workers, latency_ms=0, env=env) as server,
    ):
        http = asyncio.run(with_clients(server, 1, lambda call: sequential_turns(call, args.turns, "http")))
    inprocess: list[Sample] = []
    if not args.no_inprocess:
        progress("thread: the same turns in-process")
        result = run_inprocess(db.url, "thread", "--turns", str(args.turns))
        inprocess = [Sample(**s) for s in result["samples"]]

    data: dict[str, Any] = {}
    for key, label, samples in (("http", "HTTP", http), ("inprocess", "in-process", inprocess)):
        if samples:
            # The targets are the served ones; the in-process figures say how much of it is the graph.
            targets = (50.0, 1.5) if label == "HTTP" else (None, None)
            data[key] = thread_rows(report, "thread", label, samples, *targets)
    size_rows(report, "thread", http)
    if inprocess:
        for kind in MODEL_CALLS:
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


def server_clocks(server: ServerProcess, db: Database) -> dict[str, Callable[[], float]]:
    return {
        "server": lambda: tree_cpu_s(server.process.pid if server.process else None),
        "client": own_cpu_s,
        "postgres": lambda: tree_cpu_s(db.postgres_pid),
    }


def pooled(bursts: list[Burst]) -> tuple[list[Sample], float, dict[str, float]]:
    samples = [s for b in bursts for s in b.samples]
    cpu = {name: sum(b.cpu_s[name] for b in bursts) for name in bursts[0].cpu_s}
    return samples, sum(b.wall_s for b in bursts), cpu


def overhead_section(args: argparse.Namespace, db: Database, report: Report) -> None:
    """HTTP and in-process bursts alternate, --overhead-rounds times, so that both
    see the machine in the same state; the verdict is the median of the rounds' ratios."""
    n, turns, rounds = args.conversations, args.turns_per_conversation, args.overhead_rounds
    progress(f"overhead: {rounds} rounds of {n} conversations x {turns} turns, HTTP then in-process")
    pid_args = ["--postgres-pid", str(db.postgres_pid)] if db.postgres_pid else []
    http: list[Burst] = []
    inprocess: list[Burst] = []
    with running_server("overhead", db, workers=args.workers, latency_ms=0, env=args.env) as server:
        clocks = server_clocks(server, db)
        for r in range(rounds):

            def burst(call: Call, tag: str = f"http{r}") -> Awaitable[Burst]:
                return concurrent_turns(call, n, turns, tag, clocks)

            http.append(asyncio.run(with_clients(server, n, burst)))
            args_ = ["--conversations", str(n), "--turns", str(turns), "--tag", f"inprocess{r}", *pid_args]
            result = run_inprocess(db.url, "overhead", *args_)
            inprocess.append(Burst([Sample(**x) for x in result["samples"]], result["wall_s"], result["cpu_s"]))
            rates = f"HTTP {http[-1].per_second:.1f}, in-process {inprocess[-1].per_second:.1f} turns/s"
            progress(f"overhead: round {r + 1}: {rates}")

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


def lgapi_burst(url: str, n: int, turns: int, tag: str, clocks: dict[str, Callable[[], float]]) -> Burst:
    """`concurrent_turns` over a LangGraph API, with the two threads it uses per
    conversation (warm-up and measured) made beforehand."""

    def burst(call: Call) -> Awaitable[Burst]:
        return concurrent_turns(call, n, turns, tag, clocks)

    return asyncio.run(with_lgapi_clients(url, TEST_KEY, n, 2 * n, burst))


def langserve_burst(
    server: ServerProcess, n: int, turns: int, tag: str, clocks: dict[str, Callable[[], float]]
) -> Burst:
    def burst(call: Call) -> Awaitable[Burst]:
        return concurrent_turns(call, n, turns, tag, clocks)

    return asyncio.run(with_clients(server, n, burst))


def burst_rows(report: Report, section: str, label: str, bursts: list[Burst]) -> dict[str, Any]:
    """Reports the pooled turns/s, latency and CPU per turn of `bursts`; returns them per burst."""
    samples, wall_s, cpu = pooled(bursts)
    report.row(section, f"{label}: turns/s", f"{len(samples) / wall_s:.1f}")
    latencies = [s.ms for s in samples]
    report.row(section, f"{label}: latency p50 / p95", f"{ms(median(latencies))} / {ms(percentile(latencies, 0.95))}")
    for name, cpu_s in cpu.items():
        report.row(section, f"{label}: {name} CPU per turn", ms(cpu_s * 1000 / len(samples)))
    errors = [s for s in samples if s.error]
    report.row(section, f"{label}: errors", str(len(errors)), "0", not errors)
    return {
        "bursts": [{"turns_per_s": b.per_second, "wall_s": b.wall_s, "cpu_s": b.cpu_s} for b in bursts],
        "errors": first_errors(samples),
    }


def ratio_rows(report: Report, section: str, label: str, ratios: list[float], target: float) -> float:
    ratio = median(ratios)
    report.row(section, f"{label}, each round", " ".join(f"{x:.2f}" for x in ratios))
    report.row(section, f"{label} (median)", f"{ratio:.2f}", f">= {target:.2f}", ratio >= target)
    return ratio


def reference_section(args: argparse.Namespace, db: Database, report: Report) -> None:
    """`langgraph dev` and our server's LangGraph API, the same bursts alternating
    --reference-rounds times, as in overhead; the verdict is the median round's ratio."""
    n, turns, rounds = args.conversations, args.turns_per_conversation, args.reference_rounds
    progress(f"reference: {rounds} rounds of {n} conversations x {turns} turns, langgraph dev then ours")
    progress(f"reference: the reference venv, {VENV.relative_to(ROOT)} (the first run installs it)")
    reference_venv()
    reference: list[Burst] = []
    ours: list[Burst] = []
    with ExitStack() as stack:
        model = stack.enter_context(offline_model())
        langgraph_dev = stack.enter_context(reference_server(model.url))
        # Ours calls the reference's model process rather than one of its own in its
        # worker, so that neither server has the model's work on its own core.
        model_env = {"OPENAI_API_KEY": "offline", "OPENAI_BASE_URL": model.url, "OPENAI_MODEL": OFFLINE_MODEL_NAME}
        # One worker, as langgraph dev is one process.
        server = stack.enter_context(
            running_server("reference", db, workers=1, latency_ms=0, env={**args.env, **model_env})
        )
        missing = lgapi_missing(server.url, TEST_KEY)
        if missing:
            progress(f"reference: our server does not speak the LangGraph API ({missing}): langgraph dev alone")
        model_clock = {"model": lambda: tree_cpu_s(model.pid)}
        reference_clocks = {"server": lambda: tree_cpu_s(langgraph_dev.pid), "client": own_cpu_s, **model_clock}
        ours_clocks = server_clocks(server, db) | model_clock
        for r in range(rounds):
            reference.append(lgapi_burst(langgraph_dev.url, n, turns, f"reference{r}", reference_clocks))
            rates = f"langgraph dev {reference[-1].per_second:.1f}"
            if not missing:
                ours.append(lgapi_burst(server.url, n, turns, f"ours{r}", ours_clocks))
                rates += f", ours {ours[-1].per_second:.1f}"
            progress(f"reference: round {r + 1}: {rates} turns/s")
    shape = f"{n} conv x {turns} turns x {rounds} rounds"
    data: dict[str, Any] = {"conversations": n, "turns_per_conversation": turns, "rounds": rounds}
    data["reference"] = burst_rows(report, "reference", f"langgraph dev, 1 process ({shape})", reference)
    if missing:
        report.row("reference", "ours (LangGraph API)", f"not served: {missing}")
        report.row("reference", "ours / langgraph dev throughput", "n/a", ">= 1.50", False)
        data["ours"] = {"missing": missing}
    else:
        data["ours"] = burst_rows(report, "reference", f"ours, LangGraph API, 1 worker ({shape})", ours)
        ratios = [o.per_second / r.per_second for o, r in zip(ours, reference, strict=True)]
        data["ratios"] = ratios
        data["ratio"] = ratio_rows(report, "reference", "ours / langgraph dev throughput", ratios, 1.5)
    report.data["reference"] = data


def lgapi_overhead_section(args: argparse.Namespace, db: Database, report: Report) -> None:
    """Our server's two ways in, LangGraph API (`runs.wait`) and LangServe
    (`/agent/invoke`): bursts alternate --overhead-rounds times, as in overhead."""
    n, turns, rounds = args.conversations, args.turns_per_conversation, args.overhead_rounds
    progress(f"lgapi-overhead: {rounds} rounds of {n} conversations x {turns} turns, LangGraph API then LangServe")
    lgapi: list[Burst] = []
    langserve: list[Burst] = []
    with running_server("lgapi-overhead", db, workers=args.workers, latency_ms=0, env=args.env) as server:
        if missing := lgapi_missing(server.url, TEST_KEY):
            report.row("lgapi-overhead", "LangGraph API / LangServe throughput", f"n/a: {missing}", ">= 0.90", False)
            report.data["lgapi-overhead"] = {"missing": missing}
            return
        clocks = server_clocks(server, db)
        for r in range(rounds):
            lgapi.append(lgapi_burst(server.url, n, turns, f"lgapi{r}", clocks))
            langserve.append(langserve_burst(server, n, turns, f"langserve{r}", clocks))
            rates = f"LangGraph API {lgapi[-1].per_second:.1f}, LangServe {langserve[-1].per_second:.1f} turns/s"
            progress(f"lgapi-overhead: round {r + 1}: {rates}")
    shape = f"{n} conv x {turns} turns x {rounds} rounds, {args.workers} worker"
    data: dict[str, Any] = {"conversations": n, "turns_per_conversation": turns, "rounds": rounds}
    data["lgapi"] = burst_rows(report, "lgapi-overhead", f"LangGraph API runs.wait ({shape})", lgapi)
    data["langserve"] = burst_rows(report, "lgapi-overhead", f"LangServe /agent/invoke ({shape})", langserve)
    ratios = [g.per_second / s.per_second for g, s in zip(lgapi, langserve, strict=True)]
    data["ratios"] = ratios
    data["ratio"] = ratio_rows(report, "lgapi-overhead", "LangGraph API / LangServe throughput", ratios, 0.9)
    report.data["lgapi-overhead"] = data


def lgapi_thread_section(args: argparse.Namespace, db: Database, report: Report) -> None:
    turns = args.lgapi_turns
    progress(f"lgapi-thread: {turns} turns on one thread through runs.wait, {args.workers} worker(s)")
    with (
        provider_apart(args) as env,
        running_server("lgapi-thread", db, workers=args.workers, latency_ms=0, env=env) as server,
    ):
        if missing := lgapi_missing(server.url, TEST_KEY):
            report.row("lgapi-thread", "LangGraph API: last10 / first10", f"n/a: {missing}", "<= 1.5", False)
            report.data["lgapi-thread"] = {"missing": missing}
            return

        def thread(call: Call) -> Awaitable[list[Sample]]:
            return sequential_turns(call, turns, "lgapi")

        samples = asyncio.run(with_lgapi_clients(server.url, TEST_KEY, 1, 2, thread))
    report.data["lgapi-thread"] = thread_rows(report, "lgapi-thread", "LangGraph API", samples, None, 1.5)
    size_rows(report, "lgapi-thread", samples)


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
        # The turns alternate plain and tool: all of them within 1.3x a tool turn's model time.
        tool_model_ms = MODEL_CALLS["tool"] * args.model_latency_ms
        p95_all = percentile([s.ms for s in window], 0.95)
        ok = bool(window) and not errors and p95_all <= 1.3 * tool_model_ms
        return {
            "level": level,
            "p95_ms": p95_all,
            "p95_over_tool_model": p95_all / tool_model_ms if tool_model_ms else math.nan,
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
    with (
        provider_apart(args, latency) as env,
        running_server("capacity", db, workers=workers, latency_ms=latency, env=env) as server,
    ):
        for level in args.levels:
            progress(f"capacity: {level} conversations for {args.warmup_seconds:g}+{args.level_seconds:g} s")
            result = asyncio.run(capacity_level(args, server, db, level))
            levels.append(result)
            kinds = ", ".join(f"{k} p95 {v['p95_ms']:.0f} ms" for k, v in result["kinds"].items())
            progress(
                f"capacity: {level}: {result['turns']} turns, {result['errors']} errors, "
                f"p95 {result['p95_ms']:.0f} ms ({kinds})"
            )
            if not result["passed"]:
                break
    tool_model_ms = MODEL_CALLS["tool"] * latency
    for result in levels:
        level = f"{result['level']} conv"
        report.row("capacity", f"{level}: turns (turns/s)", f"{result['turns']} ({result['turns_per_s']:.1f}/s)")
        report.row("capacity", f"{level}: errors", str(result["errors"]), "0", result["errors"] == 0)
        report.row(
            "capacity",
            f"{level}: p95 of all turns (/ {tool_model_ms:g} ms, a tool turn's model time)",
            f"{result['p95_ms']:.0f} ms ({result['p95_over_tool_model']:.2f}x)",
            "<= 1.30x",
            result["p95_over_tool_model"] <= 1.3,
        )
        for kind, k in result["kinds"].items():
            report.row(
                "capacity",
                f"{level}: {kind} p50 / p95 (p95 / {k['model_ms']:g} ms model)",
                f"{k['p50_ms']:.0f} / {k['p95_ms']:.0f} ms ({k['p95_over_model']:.2f}x)",
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
        ">= 80",
        capacity >= 80,
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
    "breakdown": breakdown_section,
    "thread": thread_section,
    "overhead": overhead_section,
    "capacity": capacity_section,
    "soak": soak_section,
    "reference": reference_section,
    "lgapi-overhead": lgapi_overhead_section,
    "lgapi-thread": lgapi_thread_section,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=DEFAULT_SECTIONS, help=f"sections to run, of {','.join(SECTIONS)}")
    parser.add_argument("--workers", type=int, default=1, help="server workers for thread and overhead")
    parser.add_argument("--turns", type=int, default=200, help="turns on the thread (thread)")
    parser.add_argument(
        "--conversations", type=int, default=20, help="concurrent conversations (overhead, reference, lgapi-overhead)"
    )
    parser.add_argument("--turns-per-conversation", type=int, default=10, help="(overhead, reference, lgapi-overhead)")
    parser.add_argument("--overhead-rounds", type=int, default=5, help="alternating bursts (overhead, lgapi-overhead)")
    parser.add_argument("--reference-rounds", type=int, default=3, help="alternating bursts (reference)")
    parser.add_argument("--lgapi-turns", type=int, default=150, help="turns on the thread (lgapi-thread)")
    parser.add_argument("--no-inprocess", action="store_true", help="skip the in-process run of thread")
    parser.add_argument("--capacity-workers", type=int, default=2, help="server workers for capacity and soak")
    parser.add_argument("--model-latency-ms", type=float, default=600.0, help="per model call (capacity, soak)")
    parser.add_argument("--levels", default="40,60,80,100,120,140", help="conversations per level (capacity)")
    parser.add_argument("--level-seconds", type=float, default=30.0, help="measured seconds per level (capacity)")
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="unmeasured seconds per level (capacity)")
    parser.add_argument(
        "--baseline", default=breakdown.BASELINE, help="commit to compare with (breakdown; '' for none)"
    )
    parser.add_argument("--breakdown-rounds", type=int, default=3, help="processes per tree, alternating (breakdown)")
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
    if min(args.turns, args.lgapi_turns) < 20:
        parser.error("--turns and --lgapi-turns must be at least 20 (first and last 10 turns are compared)")
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
