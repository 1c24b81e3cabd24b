"""The ASGI application: wires settings, database, model and agent into FastAPI + LangServe.

Run it with `make run`, or `uvicorn app:app --workers N` once the schema is set up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from langserve import add_routes
from langserve.server import EndpointName

from agent import TOOLS, build_graph, refund_tool
from agentserve.admission import admit_run, admit_stream
from agentserve.auth import JwtVerifier, KeyRing, authenticate
from agentserve.balance import WorkerBalanceMiddleware, open_table
from agentserve.breaker import CircuitBreaker
from agentserve.collector import settle_garbage_collector
from agentserve.errors import install_error_handlers
from agentserve.leases import LeasePolicy, ThreadLeases
from agentserve.logs import configure_logging
from agentserve.metrics import POOL_CONNECTIONS
from agentserve.metrics import render as render_metrics
from agentserve.middleware import AccessLogMiddleware, BodySizeLimitMiddleware, RequestIdMiddleware
from agentserve.model import build_chat_model
from agentserve.offline_model import serve_offline_model
from agentserve.persistence import PooledPostgresSaver, create_pool, database_url, setup_schema
from agentserve.playground import PATH as PLAYGROUND_PATH
from agentserve.playground import PlaygroundChat, admit_playground_turn, scope_config_to_session
from agentserve.refunds import RefundLedger
from agentserve.retention import RetentionPolicy, sweep_forever
from agentserve.runs import AgentRunnable
from agentserve.sessions import SessionSigner
from agentserve.settings import Settings, get_settings
from agentserve.signin import router as signin_router
from agentserve.threads import router as threads_router
from agentserve.tracing import configure_tracing
from agentserve.transcript import Transcript

log = logging.getLogger("agentserve")

ENDPOINTS: list[EndpointName] = [
    "invoke",
    "batch",
    "stream",
    "stream_events",
    "input_schema",
    "output_schema",
    "config_schema",
]


def scope_config_to_caller(config: dict[str, object], request: Request) -> dict[str, object]:
    """LangServe drops keys the runnable does not declare; this adds the caller's
    tenant, which only the server knows, beside the thread name it sent."""
    configurable = config.get("configurable")
    thread_id = configurable.get("thread_id") if isinstance(configurable, dict) else None
    return {"configurable": {"thread_id": thread_id, "tenant": request.state.principal.tenant}}


def lease_policy(settings: Settings) -> LeasePolicy:
    return LeasePolicy(
        ttl_s=settings.THREAD_LEASE_TTL_S,
        busy=settings.BUSY_THREAD_POLICY,
        wait_s=settings.BUSY_THREAD_WAIT_S,
        max_runs_per_tenant=settings.TENANT_MAX_CONCURRENT_RUNS,
    )


def retention_policy(settings: Settings) -> RetentionPolicy:
    return RetentionPolicy(
        thread_ttl_s=settings.THREAD_TTL_DAYS * 86400,
        checkpoints_kept=settings.CHECKPOINTS_KEPT_PER_THREAD,
        interval_s=settings.SWEEP_INTERVAL_S,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    agent = AgentRunnable()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config = settings or get_settings()
        configure_logging(config.LOG_LEVEL)
        tracing = configure_tracing()
        app.state.settings = config
        app.state.keyring = KeyRing.from_settings(config)
        app.state.jwt = JwtVerifier.from_settings(config)
        app.state.sessions = SessionSigner.from_settings(config)
        if not len(app.state.keyring) and app.state.jwt is None:
            raise RuntimeError("no API key configured: set AGENT_API_KEY (make run writes one into .env)")
        url = await asyncio.to_thread(database_url, config)
        await setup_schema(url, config)
        async with AsyncExitStack() as stack:
            app.state.worker_table = open_table()
            if app.state.worker_table is not None:
                stack.callback(app.state.worker_table.close)
            pool = create_pool(url, config)
            await pool.open(wait=True, timeout=config.DB_CONNECT_TIMEOUT_S)
            stack.push_async_callback(pool.close)
            app.state.pool = pool
            offline_url = None
            if config.offline_model:
                offline_url = await stack.enter_async_context(
                    serve_offline_model(config.OFFLINE_MODEL_LATENCY_MS, config.OFFLINE_MODEL_FAILURE_RATE)
                )
                log.warning("no OPENAI_API_KEY: answering with the offline model simulator at %s", offline_url)
            model = build_chat_model(config, offline_url)
            saver = PooledPostgresSaver(pool)  # type: ignore[arg-type]
            agent.max_steps, agent.context_messages = config.MAX_STEPS, config.CONTEXT_MESSAGES
            agent.transcript, agent.pool = Transcript(pool), pool
            tools = [*TOOLS, refund_tool(RefundLedger(pool))]
            breaker = CircuitBreaker(config.MODEL_BREAKER_THRESHOLD, config.MODEL_BREAKER_COOLDOWN_S)
            agent.graph = build_graph(
                model, saver, tools=tools, context_messages=config.CONTEXT_MESSAGES, breaker=breaker
            )
            agent.run_timeout_s, agent.durability = config.RUN_TIMEOUT_S, config.CHECKPOINT_DURABILITY
            app.state.agent, app.state.saver, app.state.model_name = agent, saver, model.model_name
            app.state.leases = ThreadLeases(pool, lease_policy(config))
            sweeper = asyncio.create_task(sweep_forever(pool, retention_policy(config)))
            stack.callback(sweeper.cancel)
            settle_garbage_collector(config.GC_GEN0_THRESHOLD)
            log.info("serving", extra={"path": "/agent"})
            yield
        if tracing is not None:
            tracing.shutdown()  # flushes the spans still queued

    app = FastAPI(
        title="Agent",
        version="1.0.0",
        description="A LangGraph ReAct agent that remembers each conversation in PostgreSQL.",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    @app.get("/health", tags=["operations"])
    async def health(request: Request) -> dict[str, object]:
        config: Settings = request.app.state.settings
        return {
            "status": "ok",
            "worker_pid": os.getpid(),
            "model": request.app.state.model_name,
            "offline_model": config.offline_model,
        }

    @app.get("/metrics", tags=["operations"], dependencies=[Depends(authenticate)], include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of all workers; scrape with the API key as a bearer token."""
        stats = request.app.state.pool.get_stats()
        POOL_CONNECTIONS.labels(state="open").set(stats.get("pool_size", 0))
        POOL_CONNECTIONS.labels(state="idle").set(stats.get("pool_available", 0))
        POOL_CONNECTIONS.labels(state="waiting").set(stats.get("requests_waiting", 0))
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)

    @app.get("/ready", tags=["operations"], response_model=None)
    async def ready(request: Request) -> dict[str, str] | JSONResponse:
        config: Settings = request.app.state.settings
        try:
            async with asyncio.timeout(config.READY_TIMEOUT_S):
                async with request.app.state.pool.connection(timeout=config.READY_TIMEOUT_S) as conn:
                    await conn.execute("SELECT 1")
        except Exception as exc:  # any failure means "not ready", and says why
            return JSONResponse({"status": "unavailable", "database": type(exc).__name__}, status_code=503)
        return {"status": "ready"}

    app.include_router(threads_router)
    add_routes(
        app,
        agent,
        path="/agent",
        enabled_endpoints=ENDPOINTS,
        dependencies=[
            Depends(authenticate),
            Depends(admit_run, scope="function"),
            Depends(admit_stream, scope="request"),
        ],
        per_req_config_modifier=scope_config_to_caller,
    )
    app.include_router(signin_router)
    add_routes(
        app,
        PlaygroundChat(agent),
        path=PLAYGROUND_PATH,
        enabled_endpoints=["playground", "invoke", "stream_log", "input_schema", "output_schema", "config_hashes"],
        playground_type="chat",
        dependencies=[Depends(authenticate), Depends(admit_playground_turn, scope="request")],
        per_req_config_modifier=scope_config_to_session,
    )

    @app.get("/agent/playground/", include_in_schema=False, dependencies=[Depends(authenticate)])
    async def playground() -> RedirectResponse:
        """The agent's playground is the chat one, which speaks for the browser's session."""
        return RedirectResponse(f"{PLAYGROUND_PATH}/playground/", status_code=307)

    # Added last so they wrap everything: the worker balance, the id, the log, then the size bound.
    app.add_middleware(BodySizeLimitMiddleware)
    app.add_middleware(AccessLogMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(WorkerBalanceMiddleware)
    return app


app = create_app()
