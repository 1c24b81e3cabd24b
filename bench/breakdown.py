"""Where a turn's CPU goes, piece by piece, in this tree and in an earlier one. One
request at a time, CPU time per request (the mean of many), so the pieces can be told
apart on a machine too noisy for throughput ratios to do it:

    python -m bench.breakdown [--baseline REV] [--rounds N]

- plain / tool turn, direct: one turn through the core (admission, the run, the
  turn), as in-process; a tool turn is two model calls around the calculator;
- plain / tool turn, through the app: the same turn as POST /agent/invoke into the
  ASGI app (middleware, FastAPI, authentication, admission, LangServe), no sockets;
- GET /health through the app: the fixed cost of the stack and the test client;
- admission alone: the run row with its lease, and its end;
- LangServe's invoke handler around a runnable that answers at once (what /agent/invoke
  cost before edges/langserve/invoke.py; the playground's invoke still uses it).
Turns go to threads whose history already fills the model's context window, as in
a conversation under way. The model is the offline model in a process of its own,
as a provider is, so its work is not counted. Each tree (this one, and the baseline
commit unpacked into .data/) is measured in a process of its own, the two
alternating --rounds times; a piece's figure is the median over those processes."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request

from bench.common import ROOT, scratch_database
from bench.reference import offline_model

# The last commit before a turn's CPU was cut (the SDK's request transform and the rest).
BASELINE = "07b5102"
PIECES = (
    "plain turn, direct",
    "tool turn, direct",
    "plain turn, through the app",
    "tool turn, through the app",
    "GET /health through the app",
    "admission alone",
    "LangServe's own invoke handler, instant runnable",
)
HISTORY_TURNS, THREADS, SAMPLES, CHUNK = 12, 4, 150, 10
BENCH_KEY = "bench-key-0123456789abcdef"


def turn_text(kind: str, i: int) -> str:
    return f"What is {i} * 8?" if kind == "tool" else f"note {i}: hello"


async def measure(tag: str) -> dict[str, float]:
    """In the measured tree's own process: the pieces' median CPU ms."""
    import httpx
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.runnables import RunnableConfig
    from langserve.api_handler import APIHandler

    from agentserve.core.admission import TurnRequest
    from agentserve.edges.langserve.admission import admit_run
    from agentserve.edges.langserve.runnable import AgentRunnable
    from app import create_app, scope_config_to_caller

    app = create_app()
    async with app.router.lifespan_context(app):
        core_admission, executor = app.state.admission, app.state.executor
        transport = httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(transport=transport, base_url="http://app", headers={"X-API-Key": BENCH_KEY})

        class Instant(AgentRunnable):
            async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
                return {"thread_id": "t", "messages": [AIMessage("You said: hello", id="run-1")]}

        handler = APIHandler(Instant(), path="/agent", per_req_config_modifier=scope_config_to_caller)

        async def direct_turn(thread: str, text: str) -> None:
            async with core_admission.admitted("default", [TurnRequest(thread, False, {"messages": [text]})]) as ids:
                async for _ in executor.stream_attached(ids[thread], {"messages": [HumanMessage(text)]}, ["updates"]):
                    pass

        def direct(kind: str) -> Callable[[int], Awaitable[None]]:
            async def turn(i: int) -> None:
                await direct_turn(f"{tag}-direct-{kind}-{i % THREADS}", turn_text(kind, i))

            return turn

        def through_app(kind: str) -> Callable[[int], Awaitable[None]]:
            async def turn(i: int) -> None:
                body = invoke_body(turn_text(kind, i), f"{tag}-app-{kind}-{i % THREADS}")
                (await client.post("/agent/invoke", json=body)).raise_for_status()

            return turn

        async def health(i: int) -> None:
            (await client.get("/health")).raise_for_status()

        async def admission(i: int) -> None:
            steps = admit_run(posted_request(app, invoke_body("hello", f"{tag}-admit-{i % THREADS}")))
            await anext(steps)
            await anext(steps, None)

        async def langserve(i: int) -> None:
            await handler.invoke(posted_request(app, invoke_body("hello", "t")))

        actions = [direct("plain"), direct("tool"), through_app("plain"), through_app("tool"), health, admission]
        pieces = dict(zip(PIECES, [*actions, langserve], strict=True))
        # Histories long enough that every measured turn sees a full context window.
        for t in range(THREADS):
            for where in ("direct", "app"):
                for kind in ("plain", "tool"):
                    for n in range(HISTORY_TURNS):
                        await direct_turn(f"{tag}-{where}-{kind}-{t}", turn_text("tool" if n % 2 else "plain", n))
        samples: dict[str, list[float]] = {name: [] for name in pieces}
        for action in pieces.values():  # warm-up: connections, prepared statements, caches
            for i in range(3):
                await action(i)
        for start in range(0, SAMPLES, CHUNK):  # interleaved, so each piece sees the machine in the same state
            for name, action in pieces.items():
                for i in range(start, start + CHUNK):
                    began = time.process_time()
                    await action(i)
                    samples[name].append((time.process_time() - began) * 1000)
        await client.aclose()
    return {name: statistics.fmean(values) for name, values in samples.items()}


def posted_request(
    app: Any, body: dict[str, Any], headers: dict[str, str] | None = None, tenant: str = "bench"
) -> Request:
    """POST /agent/invoke as the app's dependencies and routes receive it, from an
    authenticated caller of `tenant`."""
    raw = json.dumps(body).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    extra = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/agent/invoke",
        "headers": [(b"content-type", b"application/json"), *extra],
        "app": app,
        "state": {},
        "query_string": b"",
    }
    request = Request(scope, receive)
    request.state.principal = types.SimpleNamespace(tenant=tenant)
    return request


def invoke_body(text: str, thread_id: str) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": text}]},
        "config": {"configurable": {"thread_id": thread_id}},
    }


def baseline_tree(revision: str) -> Path | None:
    """`revision` of this repository unpacked into .data/ (once); None if this clone lacks it."""
    done = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return None
    tree = ROOT / ".data" / f"baseline-{done.stdout.strip()[:12]}"
    if not (tree / "app.py").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def measure_tree(tree: Path, tag: str, env: dict[str, str]) -> dict[str, float]:
    """`measure` run with `tree` first on the path, in a scratch directory (no .env)."""
    code = f"import asyncio, json, runpy; m = runpy.run_path({str(Path(__file__))!r}); "
    code += f"print(json.dumps(asyncio.run(m['measure']({tag!r}))))"
    with tempfile.TemporaryDirectory(prefix="bench-breakdown-") as workdir:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=workdir,
            env={**env, "PYTHONPATH": str(tree)},
            stdout=subprocess.PIPE,
            check=True,
            timeout=900,
        )
    result: dict[str, float] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def compare(database_url: str, baseline: str | None, rounds: int) -> dict[str, Any]:
    """Medians per piece for this tree and, when given and present, the baseline."""
    trees = {"after": ROOT}
    if baseline and (old := baseline_tree(baseline)):
        trees = {"before": old, "after": ROOT}
    with offline_model() as model:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "DATABASE_URL": database_url,
            "AGENT_API_KEY": BENCH_KEY,
            "OPENAI_API_KEY": "offline",
            "OPENAI_BASE_URL": model.url,
            "OPENAI_MODEL": "offline-model",
            "LOG_LEVEL": "WARNING",
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for r in range(rounds):
            for name, tree in trees.items():
                runs[name].append(measure_tree(tree, f"{name}{r}-{os.getpid()}", env))
    medians = {name: {p: statistics.median(run[p] for run in done) for p in PIECES} for name, done in runs.items()}
    return {"baseline": baseline if "before" in trees else None, "rounds": rounds, **medians, "runs": runs}


def table(result: dict[str, Any]) -> str:
    width = max(map(len, PIECES))
    before = result.get("before")
    header = f"{'CPU per request (ms, mean)'.ljust(width)}  {'after':>7}"
    if before:
        header += f"  {'before':>7}  after/before   (before: {result['baseline']})"
    lines = [header]
    for piece in PIECES:
        line = f"{piece.ljust(width)}  {result['after'][piece]:7.2f}"
        if before:
            line += f"  {before[piece]:7.2f}  {result['after'][piece] / before[piece]:12.2f}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=BASELINE, help="commit to compare with ('' for none)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tree, alternating")
    args = parser.parse_args()
    with scratch_database() as db:
        print(table(compare(db.url, args.baseline or None, args.rounds)))
