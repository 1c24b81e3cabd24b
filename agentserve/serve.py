"""The production entry point: prepare the database once, then start the workers.

`python -m agentserve.serve` is the container's command and what `make run` runs.
The schema is set up here, before any worker starts, so workers never race on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import uvicorn

from agentserve.balance import TABLE_ENV, create_table
from agentserve.logs import configure_logging
from agentserve.persistence import database_url, direct_database_url, setup_schema
from agentserve.settings import get_settings

log = logging.getLogger("agentserve.serve")


def banner(host: str, port: int) -> str:
    """What a newcomer needs to try the service, with a curl line that works as printed."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}"
    body = (
        '{"input": {"messages": [{"role": "user", "content": "What is 12 * 8?"}]}, '
        '"config": {"configurable": {"thread_id": "smoke-test-001"}}}'
    )
    return (
        f"\n  Agent:      {url}/agent   (playground: {url}/agent/playground/, docs: {url}/docs)\n"
        "  API key:    AGENT_API_KEY in .env (or in your environment)\n"
        f'  Try:        curl -X POST {url}/agent/invoke -H "Content-Type: application/json" '
        "-H \"X-API-Key: $(grep '^AGENT_API_KEY=' .env | cut -d= -f2-)\" "
        f"-d '{body}'\n"
    )


def prepare_metrics_directory(path: Path) -> None:
    """Workers write their metrics here so /metrics can add them up; samples of a
    previous run would be counted again, so start empty."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path.resolve())


def main() -> None:
    settings = get_settings()
    configure_logging(settings.LOG_LEVEL)
    url = database_url(settings)
    if settings.embedded_database:
        # Workers join this one server instead of each looking for it.
        os.environ["DATABASE_URL"] = url
        log.warning("no DATABASE_URL: using the embedded PostgreSQL in %s", settings.DATA_DIR / "postgres")
    if settings.SETUP_SCHEMA_ON_START:
        asyncio.run(setup_schema(direct_database_url(settings) or url, settings))
    # Done once here, before any worker starts: workers never race on it.
    os.environ["SETUP_SCHEMA_ON_START"] = "false"
    prepare_metrics_directory(settings.DATA_DIR / "metrics")
    if settings.WEB_CONCURRENCY > 1:
        table = settings.DATA_DIR / "workers.table"
        create_table(table, settings.WEB_CONCURRENCY)
        os.environ[TABLE_ENV] = str(table.resolve())
    log.info(
        "starting %d workers on http://%s:%d (model: %s)",
        settings.WEB_CONCURRENCY,
        settings.HOST,
        settings.PORT,
        "offline simulator" if settings.offline_model else settings.OPENAI_MODEL,
    )
    print(banner(settings.HOST, settings.PORT), flush=True)
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
