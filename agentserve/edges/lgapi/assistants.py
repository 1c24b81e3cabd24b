"""Assistants (one per served graph: `agent`), and the open `/info` and `/ok`."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from fastapi import APIRouter, Request

from agentserve.auth import CurrentPrincipal
from agentserve.core.errors import NotFound
from agentserve.core.identity import ASSISTANT_ID, GRAPH_ID, assistant_matches
from agentserve.core.serialize import jsonable
from agentserve.edges.lgapi.bodies import AssistantSearch

router = APIRouter(tags=["assistants"])
open_router = APIRouter(tags=["operations"])
# Fixed: the system assistant never changes while the graph does not.
CREATED_AT = "2026-01-01T00:00:00+00:00"
ASSISTANT = {
    "assistant_id": ASSISTANT_ID,
    "graph_id": GRAPH_ID,
    "name": GRAPH_ID,
    "description": "A ReAct agent that remembers each conversation in PostgreSQL.",
    "config": {},
    "context": {},
    "metadata": {"created_by": "system"},
    "version": 1,
    "created_at": CREATED_AT,
    "updated_at": CREATED_AT,
}


def the_assistant(assistant_id: str) -> dict[str, Any]:
    if not assistant_matches(assistant_id):
        raise NotFound(f"assistant {assistant_id!r} not found; this server serves {GRAPH_ID!r}")
    return ASSISTANT


@open_router.get("/info")
async def info() -> dict[str, Any]:
    return {
        "version": "1.0.0",
        "langgraph_py_version": version("langgraph"),
        "flags": {"assistants": True, "crons": True, "langsmith": False, "langsmith_tracing_replicas": False},
        "host": {"kind": "self-hosted", "project_id": None, "revision_id": None, "tenant_id": None},
    }


@open_router.get("/ok")
async def ok() -> dict[str, bool]:
    return {"ok": True}


@router.post("/assistants/search")
async def search_assistants(principal: CurrentPrincipal, body: AssistantSearch) -> list[dict[str, Any]]:
    matches = (
        (body.graph_id in (None, GRAPH_ID))
        and (body.name in (None, GRAPH_ID))
        and all(ASSISTANT["metadata"].get(k) == v for k, v in body.metadata.items())  # type: ignore[attr-defined]
    )
    return [ASSISTANT] if matches and body.offset == 0 else []


@router.get("/assistants/{assistant_id}")
async def get_assistant(principal: CurrentPrincipal, assistant_id: str) -> dict[str, Any]:
    return the_assistant(assistant_id)


@router.get("/assistants/{assistant_id}/graph")
async def get_assistant_graph(
    request: Request, principal: CurrentPrincipal, assistant_id: str, xray: str | None = None
) -> dict[str, Any]:
    the_assistant(assistant_id)
    drawable = request.app.state.turns.graph.get_graph(xray=(xray or "").lower() in ("true", "1"))
    return jsonable(drawable.to_json())


@router.get("/assistants/{assistant_id}/schemas")
async def get_assistant_schemas(request: Request, principal: CurrentPrincipal, assistant_id: str) -> dict[str, Any]:
    the_assistant(assistant_id)
    graph = request.app.state.turns.graph
    return {
        "graph_id": GRAPH_ID,
        "input_schema": graph.get_input_jsonschema(),
        "output_schema": graph.get_output_jsonschema(),
        "state_schema": graph.get_output_jsonschema(),
        "config_schema": {"type": "object", "properties": {}},
        "context_schema": None,
    }
