"""The core: what a turn is, who owns a thread, who may run on it now, and the
durable run queue. Knows nothing of HTTP, FastAPI or LangServe; every way in (the
LangServe routes, the LangGraph Server API, the browser pages) calls it."""
