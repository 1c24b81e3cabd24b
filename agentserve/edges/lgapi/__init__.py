"""The LangGraph Server API (assistants, threads, runs, crons), as langgraph-sdk, RemoteGraph,
@langchain/langgraph-sdk and the Agent Chat UI call it."""

from __future__ import annotations

from fastapi import APIRouter

from agentserve.edges.lgapi import assistants, crons, runs, threads

router = APIRouter()
# Crons before runs: `/runs/crons...` and `/threads/{id}/runs/crons` are theirs.
router.include_router(crons.router)
# Then runs: `/threads/{id}/runs...` must not be taken for a thread route.
router.include_router(runs.router)
router.include_router(threads.router)
router.include_router(assistants.router)
open_router = assistants.open_router
