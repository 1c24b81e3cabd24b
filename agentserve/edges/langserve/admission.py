"""Whether a run request may start, decided before LangServe starts it, so refusals
are plain 4xx responses (a stream that has begun can only report a 500):

- it names a valid thread, and its input is well formed;
- the tenant is within its rate and concurrent-run limits;
- no other run holds any of its threads (a lease held until the response ends).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from psycopg_pool import PoolTimeout
from pydantic import ValidationError

from agentserve.core.admission import Admission, TurnRequest
from agentserve.core.errors import Refused
from agentserve.core.identity import MAX_THREAD_ID_CHARS, thread_key_for
from agentserve.messages import TurnInput
from agentserve.metrics import THREAD_WAIT

RUN_ENDPOINTS = frozenset({"invoke", "batch", "stream", "stream_events", "stream_log"})
HOW_TO_NAME_A_THREAD = 'send it as {"config": {"configurable": {"thread_id": "<your conversation name>"}}}'
DATABASE_UNAVAILABLE = HTTPException(503, "the database is unavailable; retry shortly", headers={"Retry-After": "5"})


def _bad_request(message: str) -> HTTPException:
    return HTTPException(400, message)


async def read_json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad_request(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _bad_request("request body must be a JSON object")
    return body


def thread_id_of(config: Any, where: str) -> str:
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise _bad_request(f"{where} must be an object")
    configurable = config.get("configurable") or {}
    if not isinstance(configurable, dict):
        raise _bad_request(f"{where}.configurable must be an object")
    extra = sorted(set(configurable) - {"thread_id"})
    if extra:
        raise _bad_request(f"{where}.configurable accepts only thread_id; remove {', '.join(extra)}")
    thread_id = configurable.get("thread_id")
    if thread_id is None or thread_id == "":
        raise _bad_request(f"{where}.configurable.thread_id is required: {HOW_TO_NAME_A_THREAD}")
    if not isinstance(thread_id, str):
        raise _bad_request(f"{where}.configurable.thread_id must be a string")
    if len(thread_id) > MAX_THREAD_ID_CHARS or not thread_id.isprintable():
        raise _bad_request(f"{where}.configurable.thread_id must be 1-{MAX_THREAD_ID_CHARS} printable characters")
    return thread_id


def requested_turns(body: dict[str, Any], endpoint: str) -> list[tuple[str, Any]]:
    """(thread id, input) of each turn the request asks for, in input order."""
    if endpoint != "batch":
        return [(thread_id_of(body.get("config"), "config"), body.get("input"))]
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad_request("inputs must be a non-empty list")
    config = body.get("config")
    if isinstance(config, list):
        if len(config) != len(inputs):
            raise _bad_request(f"config has {len(config)} entries for {len(inputs)} inputs; send one per input")
        return [(thread_id_of(c, f"config[{i}]"), inputs[i]) for i, c in enumerate(config)]
    thread_id = thread_id_of(config, "config")
    return [(thread_id, item) for item in inputs]


def validate_inputs(turns: list[tuple[str, Any]], endpoint: str) -> list[TurnInput]:
    validated = []
    for index, (_, turn_input) in enumerate(turns):
        where = ("inputs", index) if endpoint == "batch" else ("input",)
        try:
            validated.append(TurnInput.model_validate(turn_input))
        except ValidationError as exc:
            raise RequestValidationError(
                [{**error, "loc": (*where, *error["loc"])} for error in exc.errors(include_url=False)]
            ) from exc
    return validated


def refuse_shared_threads(thread_ids: list[str]) -> None:
    first_input: dict[str, int] = {}
    for index, thread_id in enumerate(thread_ids):
        if thread_id in first_input:
            raise HTTPException(
                409,
                f"inputs {first_input[thread_id]} and {index} are both for thread {thread_id!r}; "
                "turns on one thread must run one after another: send them in separate requests",
            )
        first_input[thread_id] = index


STREAM_ENDPOINTS = frozenset({"stream", "stream_events", "stream_log"})


def posted_endpoint(request: Request) -> str | None:
    """The LangServe endpoint a POST is for (the path's last segment), else None.
    From the scope's path, not `request.url`, which builds a URL object per call."""
    return request.scope["path"].rstrip("/").rsplit("/", 1)[-1] if request.method == "POST" else None


def run_endpoint_of(request: Request) -> str | None:
    endpoint = posted_endpoint(request)
    return endpoint if endpoint in RUN_ENDPOINTS else None


async def admit_run(request: Request) -> AsyncIterator[None]:
    """For batch (invoke is answered before LangServe's route: see invoke.py, which
    holds the thread the same way); registered with scope="function", so the thread is
    released as soon as the run returns, before the response goes out: a client
    that has its answer can send the next turn at once, even if we crash now."""
    endpoint = run_endpoint_of(request)
    if endpoint is None or endpoint in STREAM_ENDPOINTS:
        yield
        return
    async with admitted(request, await api_turns(request, endpoint)):
        yield


async def admit_stream(request: Request) -> AsyncIterator[None]:
    """For the streaming endpoints; registered with scope="request", so the thread
    stays held until the last event has been sent."""
    endpoint = run_endpoint_of(request)
    if endpoint is None or endpoint not in STREAM_ENDPOINTS:
        yield
        return
    async with admitted(request, await api_turns(request, endpoint)):
        yield


async def api_turns(request: Request, endpoint: str) -> list[tuple[str, Any]]:
    turns, _ = await checked_turns(request, endpoint)
    return turns


async def checked_turns(request: Request, endpoint: str) -> tuple[list[tuple[str, Any]], list[TurnInput]]:
    """(thread id, input as sent) of each turn, and each input validated."""
    body = await read_json_object(request)
    turns = requested_turns(body, endpoint)
    inputs = validate_inputs(turns, endpoint)
    if request.app.state.settings.BUSY_THREAD_POLICY == "reject":
        refuse_shared_threads([thread_id for thread_id, _ in turns])
    return turns, inputs


def turn_requests(turns: list[tuple[str, Any]]) -> list[TurnRequest]:
    requests = []
    for thread_id, turn_input in turns:
        resuming = isinstance(turn_input, dict) and turn_input.get("resume") is not None
        summary = {"resume": turn_input.get("resume")} if resuming else {"messages": turn_input.get("messages")}
        requests.append(TurnRequest(thread_id=thread_id, resuming=resuming, summary=summary))
    return requests


def as_http_error(exc: Refused) -> HTTPException:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return HTTPException(exc.status, exc.detail, headers=headers)


@contextlib.asynccontextmanager
async def admitted(request: Request, turns: list[tuple[str, Any]]) -> AsyncIterator[None]:
    """Holds the turns' threads for the block, once limits and pending actions
    allow; the run ids go to the config the runnable sees."""
    admission: Admission = request.app.state.admission
    tenant: str = request.state.principal.tenant
    keys = [thread_key_for(tenant, thread_id) for thread_id, _ in turns]
    request.state.thread_hash = ",".join(hashlib.sha256(key.encode()).hexdigest()[:12] for key in keys)
    waiting = time.perf_counter()
    try:
        owner = getattr(request.state, "idempotency_owner", None)
        async with admission.admitted(tenant, turn_requests(turns), owner) as run_ids:
            THREAD_WAIT.observe(time.perf_counter() - waiting)
            request.state.run_ids = run_ids
            yield
    except Refused as exc:
        raise as_http_error(exc) from exc
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise DATABASE_UNAVAILABLE from exc


def scope_config(request: Request, thread_id: Any) -> dict[str, object]:
    """The config a turn runs with: the caller's thread and tenant, and the run
    admission gave it; nothing else the caller sent."""
    run_ids: dict[str, str] = getattr(request.state, "run_ids", {})
    configurable = {"thread_id": thread_id, "tenant": request.state.principal.tenant}
    if isinstance(thread_id, str) and thread_id in run_ids:
        configurable["run_id"] = run_ids[thread_id]
    return {"configurable": configurable}
