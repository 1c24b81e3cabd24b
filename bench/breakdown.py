"""Where the HTTP path's CPU goes, request by request. One process, one request at
a time, CPU time per request (median of many), so the pieces can be told apart on
a machine too noisy for throughput ratios to do it:

    python -m bench.breakdown

- turn, direct: one plain turn through the core (admission, the run, the turn), as in-process;
- turn, through the app: the same turn as POST /agent/invoke into the ASGI app
  (middleware, FastAPI, authentication, admission, LangServe), no sockets;
- GET /health through the app: the fixed cost of the stack and the test client;
- admission alone: the run row with its lease, and its end (two statements);
- LangServe's invoke handler around a runnable that answers at once.
The turn's difference minus the pieces is what the agent does differently when
LangServe runs it (its config and callbacks)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import types
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langserve.api_handler import APIHandler
from starlette.requests import Request

from bench.common import scratch_database
from tests.support import TEST_KEY, turn_body

ROUNDS, PER_ROUND = 6, 25


def invoke_request(app: Any, thread_id: str, text: str) -> Request:
    """A POST /agent/invoke request as the app's dependencies receive it."""
    body = json.dumps(turn_body(text, thread_id)).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/agent/invoke",
        "headers": [(b"content-type", b"application/json")],
        "app": app,
        "state": {},
        "query_string": b"",
    }
    request = Request(scope, receive)
    request.state.principal = types.SimpleNamespace(tenant="bench")
    return request


async def cpu_ms(action: Callable[[int], Awaitable[object]], samples: list[float], start: int) -> None:
    for i in range(start, start + PER_ROUND):
        began = time.process_time()
        await action(i)
        samples.append((time.process_time() - began) * 1000)


async def main() -> dict[str, float]:
    from agentserve.core.admission import TurnRequest
    from agentserve.edges.langserve.admission import admit_run
    from agentserve.edges.langserve.runnable import AgentRunnable
    from app import create_app, scope_config_to_caller

    app = create_app()
    async with app.router.lifespan_context(app):
        core_admission, executor = app.state.admission, app.state.executor
        transport = httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(transport=transport, base_url="http://app", headers={"X-API-Key": TEST_KEY})

        class Instant(AgentRunnable):
            async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
                return {"thread_id": "t", "messages": [AIMessage("You said: hello", id="run-1")]}

        handler = APIHandler(Instant(), path="/agent", per_req_config_modifier=scope_config_to_caller)

        async def direct(i: int) -> None:
            thread, text = f"direct-{i % 5}", f"note {i}: hello"
            async with core_admission.admitted(
                "default", [TurnRequest(thread, False, {"messages": [text]})]
            ) as run_ids:
                async for _ in executor.stream_attached(
                    run_ids[thread], {"messages": [HumanMessage(text)]}, ["updates"]
                ):
                    pass

        async def through_app(i: int) -> None:
            response = await client.post("/agent/invoke", json=turn_body(f"note {i}: hello", f"app-{i % 5}"))
            response.raise_for_status()

        async def health(i: int) -> None:
            (await client.get("/health")).raise_for_status()

        async def admission(i: int) -> None:
            steps = admit_run(invoke_request(app, f"admit-{i % 5}", "hello"))
            await anext(steps)
            await anext(steps, None)

        async def langserve(i: int) -> None:
            await handler.invoke(invoke_request(app, "t", "hello"))

        pieces = {
            "turn, direct": direct,
            "turn, through the app": through_app,
            "GET /health through the app": health,
            "admission alone": admission,
            "LangServe invoke handler, instant runnable": langserve,
        }
        samples: dict[str, list[float]] = {name: [] for name in pieces}
        for action in pieces.values():  # warm-up: connections, prepared statements
            await cpu_ms(action, [], 0)
        for r in range(ROUNDS):  # interleaved, so each piece sees the machine in the same state
            for name, action in pieces.items():
                await cpu_ms(action, samples[name], (r + 1) * PER_ROUND)
        await client.aclose()
    return {name: statistics.median(values) for name, values in samples.items()}


if __name__ == "__main__":
    with scratch_database() as db:
        os.environ.update(
            DATABASE_URL=db.url, AGENT_API_KEY=TEST_KEY, OFFLINE_MODEL_LATENCY_MS="0", LOG_LEVEL="WARNING"
        )
        result = asyncio.run(main())
    width = max(map(len, result))
    for name, value in result.items():
        print(f"{name.ljust(width)}  {value:6.2f} ms CPU")
    extra = result["turn, through the app"] - result["turn, direct"]
    print(f"{'HTTP path, per turn'.ljust(width)}  {extra:6.2f} ms CPU ({extra / result['turn, direct']:.0%} of a turn)")
