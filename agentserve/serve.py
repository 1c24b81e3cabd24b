"""The production entry point: prepare the database once, then start the workers.

`python -m agentserve.serve` is the container's command and what `make run` runs.
The schema is set up here, before any worker starts, so workers never race on it.
"""

from __future__ import annotations

import asyncio
import logging
import os

import uvicorn

from agentserve.logs import configure_logging
from agentserve.persistence import database_url, setup_schema
from agentserve.settings import get_settings

log = logging.getLogger("agentserve.serve")


def main() -> None:
    settings = get_settings()
    configure_logging(settings.LOG_LEVEL)
    url = database_url(settings)
    if settings.embedded_database:
        # Workers join this one server instead of each looking for it.
        os.environ["DATABASE_URL"] = url
        log.warning("no DATABASE_URL: using the embedded PostgreSQL in %s", settings.DATA_DIR / "postgres")
    asyncio.run(setup_schema(url, settings))
    log.info(
        "starting %d workers on http://%s:%d (model: %s)",
        settings.WEB_CONCURRENCY,
        settings.HOST,
        settings.PORT,
        "offline simulator" if settings.offline_model else settings.OPENAI_MODEL,
    )
    uvicorn.run(
        "app:app",
        host=settings.HOST,
        port=settings.PORT,
        workers=settings.WEB_CONCURRENCY,
        timeout_graceful_shutdown=settings.GRACEFUL_TIMEOUT_S,
        limit_max_requests=settings.MAX_REQUESTS or None,
        limit_max_requests_jitter=settings.MAX_REQUESTS // 10,
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )


if __name__ == "__main__":
    main()
