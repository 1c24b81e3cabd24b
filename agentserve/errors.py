"""How failures reach the caller: JSON bodies always; a 500 names only a request id."""

from __future__ import annotations

import logging

import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout

from agent import PROVIDER_FAILURES
from agentserve.breaker import CircuitOpen
from agentserve.core.errors import Refused, RunTimedOut

log = logging.getLogger(__name__)


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = request_id_of(request)
    log.exception("unhandled error", extra={"request_id": request_id, "path": request.url.path})
    return JSONResponse(
        {"detail": "internal server error; quote the request_id when reporting it", "request_id": request_id},
        status_code=500,
    )


def unavailable(detail: str, retry_after_s: float, status: int = 503) -> JSONResponse:
    return JSONResponse(
        {"detail": detail}, status_code=status, headers={"Retry-After": str(max(1, round(retry_after_s)))}
    )


async def model_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("model provider failed: %s", type(exc).__name__, extra={"request_id": request_id_of(request)})
    return unavailable("the model provider is failing or unreachable; retry shortly", 5)


async def circuit_open(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CircuitOpen)
    return unavailable(str(exc), exc.retry_after_s)


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", type(exc).__name__, extra={"request_id": request_id_of(request)})
    return unavailable("the database is unavailable; retry shortly", 5)


async def run_timed_out(request: Request, exc: Exception) -> JSONResponse:
    return unavailable(str(exc) or "the run took too long and was stopped", 5, status=504)


async def refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refused)
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, unexpected_error)
    for failure in PROVIDER_FAILURES:
        app.add_exception_handler(failure, model_unavailable)
    app.add_exception_handler(CircuitOpen, circuit_open)
    app.add_exception_handler(psycopg.OperationalError, database_unavailable)
    app.add_exception_handler(PoolTimeout, database_unavailable)
    app.add_exception_handler(RunTimedOut, run_timed_out)
    app.add_exception_handler(Refused, refused)
