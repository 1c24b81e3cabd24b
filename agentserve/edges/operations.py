"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from agentserve.auth import authenticate
from agentserve.metrics import POOL_CONNECTIONS
from agentserve.metrics import render as render_metrics
from agentserve.settings import Settings

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(request: Request) -> dict[str, object]:
    config: Settings = request.app.state.settings
    return {
        "status": "ok",
        "worker_pid": os.getpid(),
        "role": config.ROLE,
        "model": request.app.state.model_name,
        "offline_model": config.offline_model,
    }


@router.get("/metrics", dependencies=[Depends(authenticate)], include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of all workers; scrape with the API key as a bearer token."""
    stats = request.app.state.pool.get_stats()
    POOL_CONNECTIONS.labels(state="open").set(stats.get("pool_size", 0))
    POOL_CONNECTIONS.labels(state="idle").set(stats.get("pool_available", 0))
    POOL_CONNECTIONS.labels(state="waiting").set(stats.get("requests_waiting", 0))
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)


@router.get("/ready", response_model=None)
async def ready(request: Request) -> dict[str, str] | JSONResponse:
    config: Settings = request.app.state.settings
    if request.app.state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    try:
        async with asyncio.timeout(config.READY_TIMEOUT_S):
            async with request.app.state.pool.connection(timeout=config.READY_TIMEOUT_S) as conn:
                await conn.execute("SELECT 1")
    except Exception as exc:  # any failure means "not ready", and says why
        return JSONResponse({"status": "unavailable", "database": type(exc).__name__}, status_code=503)
    return {"status": "ready"}
