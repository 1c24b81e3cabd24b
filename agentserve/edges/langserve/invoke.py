"""POST /agent/invoke answered in one pass, as LangServe's invoke answers it.

Once admission has checked a request (the caller, the thread's name, the input
against `TurnInput`, the limits), what LangServe's invoke handler does next is
fixed: it parses the body again, validates the config and the input a second time,
and after the turn validates the output into pydantic models only to encode them
back into the same JSON. With FastAPI's dependency machinery around it, that was
about half of what HTTP added to a turn's CPU. This route comes before LangServe's
and gives the runnable the same input and config, and the caller the same bytes:
`tests/test_invoke_route.py` compares all three with LangServe's own handler.
Everything else stays: the same authentication, admission, errors, metrics and
trace names (the route's path is LangServe's); LangServe's own invoke route stays
registered behind this one, and its documentation route in the OpenAPI schema.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import anyio
from langchain_core.runnables import RunnableConfig
from langserve import __version__ as langserve_version
from langserve.serialization import WellKnownLCSerializer
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Scope

from agentserve.auth import authenticate
from agentserve.edges.langserve.admission import admitted, checked_turns, scope_config
from agentserve.edges.langserve.runnable import AgentRunnable
from agentserve.messages import TurnInput

T = TypeVar("T")
SERIALIZER = WellKnownLCSerializer()  # LangServe's default, which add_routes uses


def invoke_input(turn: TurnInput) -> dict[str, Any]:
    """The input as LangServe hands it to the runnable: the validated model's
    fields, the messages as message objects."""
    return {name: getattr(turn, name) for name in TurnInput.model_fields}


def invoke_config(request: Request, path: str, thread_id: str) -> RunnableConfig:
    """The config LangServe builds for an admitted turn: only `configurable`
    survives from the caller's (as `config_keys` says), replaced by ours (see
    `scope_config`), then LangServe's metadata, run name and a fresh run id."""
    metadata = {
        "__useragent": request.headers.get("user-agent"),
        "__langserve_version": langserve_version,
        "__langserve_endpoint": "invoke",
    }
    config: dict[str, Any] = {"tags": [], **scope_config(request, thread_id), "metadata": metadata, "run_name": path}
    config["run_id"] = str(uuid.uuid4())
    return config  # type: ignore[return-value]


def invoke_response(output: Any, run_id: str) -> JSONResponse:
    """LangServe's invoke response: the output as its serializer writes it, and no
    feedback tokens (not enabled); without callback events, it has no such key."""
    return JSONResponse({"output": SERIALIZER.dumpd(output), "metadata": {"run_id": run_id, "feedback_tokens": []}})


@contextlib.asynccontextmanager
async def exit_shielded(manager: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """`manager` with its exit shielded from cancellation, as FastAPI runs the exit
    of a dependency with `yield`: the thread is released even if the request is
    cancelled while the turn runs."""
    value = await manager.__aenter__()
    try:
        yield value
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            if await manager.__aexit__(type(exc), exc, exc.__traceback__):
                return
        raise
    with anyio.CancelScope(shield=True):
        await manager.__aexit__(None, None, None)


class InvokeRoute(Route):
    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            # As FastAPI's routes do: the access log, metrics and spans name a
            # request by its route's path.
            child_scope["route"] = self
        return match, child_scope


def invoke_route(agent: AgentRunnable, path: str) -> Route:
    """The route for POST `{path}/invoke`, to be matched before LangServe's."""

    async def invoke(request: Request) -> Response:
        await authenticate(request)
        turns, [turn] = await checked_turns(request, "invoke")
        # Released as soon as the turn returns, before the response goes out, as
        # admit_run does on LangServe's route.
        async with exit_shielded(admitted(request, turns)):
            config = invoke_config(request, path, turns[0][0])  # with the run admission gave
            output = await agent.ainvoke(invoke_input(turn), config)
        return invoke_response(output, str(config["run_id"]))

    return InvokeRoute(f"{path}/invoke", invoke, methods=["POST"], include_in_schema=False)
