"""How failures reach the caller: JSON bodies always; a 500 names only a request id."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

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


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, unexpected_error)
