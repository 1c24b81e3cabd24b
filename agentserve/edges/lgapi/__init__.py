"""The LangGraph Server API (assistants, threads, runs), as langgraph-sdk, RemoteGraph,
@langchain/langgraph-sdk and the Agent Chat UI call it."""

from __future__ import annotations

from fastapi import APIRouter

from agentserve.edges.lgapi import assistants, runs, threads

router = APIRouter()
# Runs first: `/threads/{id}/runs...` must not be taken for a thread route.
router.include_router(runs.router)
router.include_router(threads.router)
router.include_router(assistants.router)
open_router = assistants.open_router
