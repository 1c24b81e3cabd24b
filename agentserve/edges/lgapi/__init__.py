"""The LangGraph Server API (assistants, threads, runs, crons), as langgraph-sdk, RemoteGraph,
@langchain/langgraph-sdk and the Agent Chat UI call it."""

from __future__ import annotations

from fastapi import APIRouter

from agentserve.edges.lgapi import assistants, crons, runs, threads

router = APIRouter()
# One flat list (see app.py on why not include_router). Crons before runs:
# `/runs/crons...` and `/threads/{id}/runs/crons` are theirs. Then runs:
# `/threads/{id}/runs...` must not be taken for a thread route.
for part in (crons, runs, threads, assistants):
    router.routes.extend(part.router.routes)
open_router = assistants.open_router
