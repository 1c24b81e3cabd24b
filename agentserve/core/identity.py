"""Thread and assistant identity: how a caller's names become stored keys."""

from __future__ import annotations

import uuid

GRAPH_ID = "agent"
# langgraph-api's namespace for system assistants: the same graph name gives the
# same assistant id here as on the reference server.
ASSISTANT_NAMESPACE = uuid.UUID("6ba7b821-9dad-11d1-80b4-00c04fd430c8")
ASSISTANT_ID = str(uuid.uuid5(ASSISTANT_NAMESPACE, GRAPH_ID))
MAX_THREAD_ID_CHARS = 200


def thread_key_for(tenant: str, thread_id: str) -> str:
    """The stored identity of a thread. Tenant names hold no '/', so two tenants'
    threads can never share a key whatever thread ids they choose."""
    return f"{tenant}/{thread_id}"


def thread_id_in(thread_key: str) -> str:
    """The caller's thread name inside a stored identity."""
    return thread_key.split("/", 1)[1]


def thread_id_problem(thread_id: object) -> str | None:
    """Why a thread id cannot be used, or None when it can."""
    if not isinstance(thread_id, str) or not thread_id:
        return "must be a non-empty string"
    if len(thread_id) > MAX_THREAD_ID_CHARS or not thread_id.isprintable():
        return f"must be 1-{MAX_THREAD_ID_CHARS} printable characters"
    return None


def assistant_matches(assistant_id: str) -> bool:
    """The one served assistant, named by its graph or by its id."""
    return assistant_id in (GRAPH_ID, ASSISTANT_ID)


def is_uuid(value: str) -> bool:
    """Run and cron ids are UUIDs; anything else names nothing."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
