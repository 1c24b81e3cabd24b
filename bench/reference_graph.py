"""The graph `langgraph dev` serves in the reference section: this project's agent
with the offline model at REFERENCE_MODEL_URL, built with app.py's default settings
but without a checkpointer (the reference server brings its own) and without the
refund tool (its ledger needs PostgreSQL). Imported by the reference server, in its
own venv."""

from __future__ import annotations

import os

from agent import TOOLS, build_graph
from agentserve.breaker import CircuitBreaker
from agentserve.model import build_chat_model
from agentserve.settings import Settings

config = Settings(_env_file=None)  # type: ignore[call-arg]
model = build_chat_model(config, os.environ["REFERENCE_MODEL_URL"])
breaker = CircuitBreaker(config.MODEL_BREAKER_THRESHOLD, config.MODEL_BREAKER_COOLDOWN_S)
graph = build_graph(model, tools=TOOLS, context_messages=config.CONTEXT_MESSAGES, breaker=breaker)
