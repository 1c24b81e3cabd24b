"""Whether a run request may start: it names a valid thread of the caller's, and no
two of its inputs share a thread. Checked before LangServe starts a run, so refusals
are plain 4xx responses (a stream that has begun can only report a 500)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException, Request

RUN_ENDPOINTS = frozenset({"invoke", "batch", "stream", "stream_events", "stream_log"})
MAX_THREAD_ID_CHARS = 200
HOW_TO_NAME_A_THREAD = 'send it as {"config": {"configurable": {"thread_id": "<your conversation name>"}}}'


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


def requested_thread_ids(body: dict[str, Any], endpoint: str) -> list[str]:
    """The thread of each input, in input order."""
    if endpoint != "batch":
        return [thread_id_of(body.get("config"), "config")]
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad_request("inputs must be a non-empty list")
    config = body.get("config")
    if isinstance(config, list):
        if len(config) != len(inputs):
            raise _bad_request(f"config has {len(config)} entries for {len(inputs)} inputs; send one per input")
        return [thread_id_of(c, f"config[{i}]") for i, c in enumerate(config)]
    return [thread_id_of(config, "config")] * len(inputs)


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


async def admit_run(request: Request) -> AsyncIterator[None]:
    """FastAPI dependency for every route LangServe adds."""
    endpoint = request.url.path.rstrip("/").rsplit("/", 1)[-1]
    if request.method == "POST" and endpoint in RUN_ENDPOINTS:
        body = await read_json_object(request)
        refuse_shared_threads(requested_thread_ids(body, endpoint))
    yield
