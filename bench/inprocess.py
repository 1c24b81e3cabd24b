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
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict
from typing import Any

from uvicorn.loops.auto import auto_loop_factory

from bench.common import ROOT, Call, Turn, concurrent_turns, own_cpu_s, sequential_turns, tree_cpu_s

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


TurnFn = Callable[[str, str], Awaitable[str]]


async def build_core(url: str, stack: AsyncExitStack) -> TurnFn:
    """app.py's lifespan, minus HTTP: a turn goes through the core exactly as a
    LangServe request's does (admission, the run row and lease, the turn), and
    returns the answer's text."""
    from langchain_core.messages import HumanMessage

    from agentserve.core.admission import TurnRequest
    from agentserve.settings import Settings
    from app import create_app

    config = Settings(_env_file=None, DATABASE_URL=url, LOG_LEVEL="WARNING", AGENT_API_KEY="bench-key-0123456789")  # type: ignore[call-arg, arg-type]
    app = create_app(config)
    await stack.enter_async_context(app.router.lifespan_context(app))
    admission, executor = app.state.admission, app.state.executor

    async def turn(thread: str, text: str) -> str:
        answer = ""
        async with admission.admitted(TENANT, [TurnRequest(thread, False, {"messages": [text]})]) as run_ids:
            async for _, update in executor.stream_attached(
                run_ids[thread], {"messages": [HumanMessage(text)]}, ["updates"]
            ):
                for value in update.values():
                    if isinstance(value, dict) and value.get("messages"):
                        answer = str(value["messages"][-1].content)
        return answer

    return turn


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        turn_on = await build_core(os.environ["DATABASE_URL"], stack)

        async def call(conversation: int, thread: str, turn: Turn) -> tuple[str | None, int]:
            answer = await turn_on(thread, turn.text)
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
    # The event loop a server worker runs on (uvicorn's "auto": uvloop when it is
    # installed), so that what HTTP adds is all the comparison shows.
    with asyncio.Runner(loop_factory=auto_loop_factory()) as runner:
        if args.profile:
            import cProfile

            with cProfile.Profile() as profile:
                result = runner.run(main(args))
            profile.dump_stats(args.profile)
        else:
            result = runner.run(main(args))
    print(json.dumps(result))
