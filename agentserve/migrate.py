"""`python -m agentserve.migrate`: set up the schema once and exit, for a migration
job that connects directly (not through a transaction pooler)."""

from __future__ import annotations

import asyncio

from agentserve.logs import configure_logging
from agentserve.persistence import database_url, direct_database_url, setup_schema
from agentserve.settings import get_settings


def main() -> None:
    settings = get_settings()
    configure_logging(settings.LOG_LEVEL)
    asyncio.run(setup_schema(direct_database_url(settings) or database_url(settings), settings))


if __name__ == "__main__":
    main()
