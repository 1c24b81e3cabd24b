"""SSE framing of run events (sse-starlette does the wire format), the streamed
JSON of `wait`/`join`, and the run-id headers both SDKs read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import StreamingResponse

from agentserve.core.events import Event
from agentserve.core.serialize import json_bytes

HEARTBEAT_S = 5.0


def run_headers(thread_id: str | None, run_id: str, tail: str) -> dict[str, str]:
    """Paths without any mount prefix and without a suffix on Content-Location:
    both SDKs parse the run id out of it and resolve Location against their base."""
    base = f"/threads/{thread_id}/runs/{run_id}" if thread_id else f"/runs/{run_id}"
    return {"Content-Location": base, "Location": f"{base}/{tail}"}


def heartbeat() -> ServerSentEvent:
    return ServerSentEvent(comment="heartbeat")


def event_stream(
    events: AsyncIterator[Event],
    *,
    with_ids: bool,
    headers: dict[str, str],
    modes: set[str] | None = None,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
) -> EventSourceResponse:
    async def frames() -> AsyncIterator[ServerSentEvent]:
        ended = False
        try:
            async for event in events:
                ended = event.event == "end"
                if (
                    modes is not None
                    and event.event.split("|", 1)[0] not in modes
                    and event.event
                    not in (
                        "metadata",
                        "error",
                        "end",
                    )
                ):
                    continue
                data = json_bytes(event.data).decode()
                yield ServerSentEvent(data=data, event=event.event, id=str(event.seq) if with_ids else None)
        finally:
            if not ended and on_disconnect is not None:
                # The client left before the end: shielded, as we are being cancelled.
                with contextlib.suppress(Exception):
                    await asyncio.shield(on_disconnect())

    return EventSourceResponse(frames(), headers=headers, ping=HEARTBEAT_S, ping_message_factory=heartbeat, sep="\r\n")


def json_when_done(result: Awaitable[Any], headers: dict[str, str]) -> StreamingResponse:
    """The final JSON once the run ends; a newline every few seconds meanwhile keeps
    proxies and clients from timing out (JSON parsers skip leading whitespace)."""

    async def body() -> AsyncIterator[bytes]:
        task = asyncio.ensure_future(result)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_S)
                if done:
                    yield json_bytes(task.result())
                    return
                yield b"\n"
        finally:
            task.cancel()

    return StreamingResponse(body(), media_type="application/json", headers=headers)
