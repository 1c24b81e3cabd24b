"""Serving a LangGraph ReAct agent with LangServe, PostgreSQL memory and API keys."""
