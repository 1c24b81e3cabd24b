"""The agent without HTTP, built the way app.py's lifespan builds it, driven by the
same loops as the served one. Run as its own process (`python -m bench.inprocess`,
DATABASE_URL in the environment) so it has a core to itself, as a server worker
does; prints one JSON object on stdout. `run_inprocess` starts it. To see where a
turn's CPU goes: `python -m bench.inprocess overhead --conversations 20 --turns 10
--profile /tmp/turns.prof` against a scratch database, then `python -m pstats`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from bench.common import ROOT, Call, Turn, concurrent_turns, own_cpu_s, sequential_turns, tree_cpu_s

if TYPE_CHECKING:
    from agentserve.runs import AgentRunnable

TENANT = "bench"


def run_inprocess(database_url: str, *args: str) -> dict[str, Any]:
    """Runs this module in a subprocess with a clean environment and scratch working
    directory (like the server's), and returns what it printed."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "DATABASE_URL": database_url}
    with tempfile.TemporaryDirectory(prefix="bench-inprocess-") as workdir:
        done = subprocess.run(
            [sys.executable, "-m", "bench.inprocess", *args],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            check=True,
            timeout=3600,
        )
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


async def build_agent(url: str, stack: AsyncExitStack) -> AgentRunnable:
    """app.py's lifespan, minus HTTP: schema, pool, offline model, graph, runnable."""
    from agent import TOOLS, build_graph, refund_tool
    from agentserve.breaker import CircuitBreaker
    from agentserve.collector import settle_garbage_collector
    from agentserve.logs import configure_logging
    from agentserve.model import build_chat_model
    from agentserve.offline_model import serve_offline_model
    from agentserve.persistence import PooledPostgresSaver, create_pool, setup_schema
    from agentserve.refunds import RefundLedger
    from agentserve.runs import AgentRunnable
    from agentserve.settings import Settings
    from agentserve.transcript import Transcript

    config = Settings(_env_file=None, DATABASE_URL=url, LOG_LEVEL="WARNING")  # type: ignore[call-arg, arg-type]
    configure_logging(config.LOG_LEVEL)
    await setup_schema(url, config)
    pool = create_pool(url, config)
    await pool.open(wait=True, timeout=config.DB_CONNECT_TIMEOUT_S)
    stack.push_async_callback(pool.close)
    offline_url = await stack.enter_async_context(
        serve_offline_model(config.OFFLINE_MODEL_LATENCY_MS, config.OFFLINE_MODEL_FAILURE_RATE)
    )
    model = build_chat_model(config, offline_url)
    saver = PooledPostgresSaver(pool)  # type: ignore[arg-type]
    runnable = AgentRunnable(
        max_steps=config.MAX_STEPS,
        context_messages=config.CONTEXT_MESSAGES,
        run_timeout_s=config.RUN_TIMEOUT_S,
        durability=config.CHECKPOINT_DURABILITY,
    )
    runnable.transcript, runnable.pool = Transcript(pool), pool
    tools = [*TOOLS, refund_tool(RefundLedger(pool))]
    breaker = CircuitBreaker(config.MODEL_BREAKER_THRESHOLD, config.MODEL_BREAKER_COOLDOWN_S)
    runnable.graph = build_graph(model, saver, tools=tools, context_messages=config.CONTEXT_MESSAGES, breaker=breaker)
    settle_garbage_collector(config.GC_GEN0_THRESHOLD)  # as each server worker does
    return runnable


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from langchain_core.messages import HumanMessage
    from langchain_core.runnables import RunnableConfig

    async with AsyncExitStack() as stack:
        runnable = await build_agent(os.environ["DATABASE_URL"], stack)

        async def call(conversation: int, thread: str, turn: Turn) -> tuple[str | None, int]:
            config: RunnableConfig = {"configurable": {"thread_id": thread, "tenant": TENANT}}
            result = await runnable.ainvoke({"messages": [HumanMessage(turn.text)]}, config)
            answer = result["messages"][-1].content
            return (None if answer == turn.expected else f"answer {answer!r}"), 0

        bound: Call = call
        if args.mode == "thread":
            samples = await sequential_turns(bound, args.turns, "inprocess")
            return {"samples": [asdict(s) for s in samples]}
        clocks = {"process": own_cpu_s, "postgres": lambda: tree_cpu_s(args.postgres_pid)}
        burst = await concurrent_turns(bound, args.conversations, args.turns, args.tag, clocks)
        return {"samples": [asdict(s) for s in burst.samples], "wall_s": burst.wall_s, "cpu_s": burst.cpu_s}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["thread", "overhead"])
    parser.add_argument("--turns", type=int, required=True, help="turns on the thread, or per conversation")
    parser.add_argument("--conversations", type=int, default=1)
    parser.add_argument("--tag", default="inprocess", help="prefix of the thread names (a fresh one per run)")
    parser.add_argument("--postgres-pid", type=int, default=None, help="to count the database's CPU too")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats of the whole run here")
    args = parser.parse_args()
    if args.profile:
        import cProfile

        with cProfile.Profile() as profile:
            result = asyncio.run(main(args))
        profile.dump_stats(args.profile)
    else:
        result = asyncio.run(main(args))
    print(json.dumps(result))
