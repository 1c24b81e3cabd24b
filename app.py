"""The ASGI application: wires settings, database, model, agent and the core under
its edges (LangServe's routes, the LangGraph Server API, the browser pages).

Run it with `make run`, or `uvicorn app:app --workers N` once the schema is set up.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import FrameType

from fastapi import Depends, FastAPI
from fastapi.responses import RedirectResponse
from langserve import add_routes
from langserve.server import EndpointName
from sse_starlette.sse import AppStatus
from starlette.requests import Request

from agent import TOOLS, build_graph, refund_tool
from agentserve.auth import JwtVerifier, KeyRing, authenticate
from agentserve.balance import WorkerBalanceMiddleware, open_table
from agentserve.breaker import CircuitBreaker
from agentserve.collector import settle_garbage_collector
from agentserve.core.admission import Admission, AdmissionPolicy
from agentserve.core.crons import CronPolicy, CronStore
from agentserve.core.events import EventLog, Wakeups
from agentserve.core.executor import Executor, ExecutorPolicy
from agentserve.core.idempotency import IdempotencyKeys
from agentserve.core.leases import ThreadLeases
from agentserve.core.refunds import RefundLedger
from agentserve.core.retention import RetentionPolicy, sweep_forever
from agentserve.core.runs import RunStore
from agentserve.core.service import RunService
from agentserve.core.threads import ThreadStore
from agentserve.core.transcript import MessageBound, Transcript
from agentserve.core.turns import TurnRunner
from agentserve.core.webhooks import WebhookPolicy, WebhookSender
from agentserve.edges import lgapi, operations
from agentserve.edges.browser.signin import router as signin_router
from agentserve.edges.langserve.admission import admit_run, admit_stream, scope_config
from agentserve.edges.langserve.invoke import invoke_route
from agentserve.edges.langserve.playground import PATH as PLAYGROUND_PATH
from agentserve.edges.langserve.playground import PlaygroundChat, admit_playground_turn, scope_config_to_session
from agentserve.edges.langserve.runnable import AgentRunnable
from agentserve.errors import install_error_handlers
from agentserve.idempotency import IdempotencyMiddleware
from agentserve.logs import configure_logging
from agentserve.middleware import (
    AccessLogMiddleware,
    BodySizeLimitMiddleware,
    CorsFromSettings,
    RequestIdMiddleware,
    RoleMiddleware,
)
from agentserve.model import build_chat_model
from agentserve.offline_model import serve_offline_model
from agentserve.persistence import (
    PooledPostgresSaver,
    connection_kwargs,
    create_pool,
    database_url,
    direct_database_url,
    setup_schema,
)
from agentserve.sessions import SessionSigner
from agentserve.settings import Settings, get_settings
from agentserve.tracing import configure_tracing

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
    tenant and run, which only the server knows, beside the thread name it sent."""
    configurable = config.get("configurable")
    return scope_config(request, configurable.get("thread_id") if isinstance(configurable, dict) else None)


def retention_policy(settings: Settings) -> RetentionPolicy:
    return RetentionPolicy(
        thread_ttl_s=settings.THREAD_TTL_DAYS * 86400,
        checkpoints_kept=settings.CHECKPOINTS_KEPT_PER_THREAD,
        interval_s=settings.SWEEP_INTERVAL_S,
        events_ttl_s=settings.RUN_EVENTS_TTL_S,
        idempotency_ttl_s=settings.IDEMPOTENCY_TTL_S,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    agent = AgentRunnable()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config = settings or get_settings()
        configure_logging(config.LOG_LEVEL)
        tracing = configure_tracing()
        app.state.settings, app.state.draining = config, False
        app.state.keyring = KeyRing.from_settings(config)
        app.state.jwt = JwtVerifier.from_settings(config)
        app.state.sessions = SessionSigner.from_settings(config)
        if not len(app.state.keyring) and app.state.jwt is None:
            raise RuntimeError("no API key configured: set AGENT_API_KEY (make run writes one into .env)")
        url = await asyncio.to_thread(database_url, config)
        if config.SETUP_SCHEMA_ON_START:
            await setup_schema(direct_database_url(config) or url, config)
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
            transcript = Transcript(pool)
            saver = PooledPostgresSaver(pool, bound=MessageBound(transcript, config.CONTEXT_MESSAGES))
            tools = [*TOOLS, refund_tool(RefundLedger(pool))]
            breaker = CircuitBreaker(config.MODEL_BREAKER_THRESHOLD, config.MODEL_BREAKER_COOLDOWN_S)
            graph = build_graph(model, saver, tools=tools, context_messages=config.CONTEXT_MESSAGES, breaker=breaker)
            turns = TurnRunner(
                graph,
                transcript,
                max_steps=config.MAX_STEPS,
                run_timeout_s=config.RUN_TIMEOUT_S,
                durability=config.CHECKPOINT_DURABILITY,
            )
            store = RunStore(
                pool,
                ttl_s=config.THREAD_LEASE_TTL_S,
                max_runs_per_tenant=config.TENANT_MAX_CONCURRENT_RUNS,
                wait_s=config.BUSY_THREAD_WAIT_S,
            )
            wakeups = Wakeups()
            executor = Executor(
                pool,
                store,
                turns,
                EventLog(pool),
                wakeups,
                ExecutorPolicy(
                    max_attempts=config.RUN_MAX_ATTEMPTS,
                    jobs=config.BACKGROUND_JOBS_PER_WORKER,
                    poll_s=config.QUEUE_POLL_S,
                    renew_s=config.THREAD_LEASE_TTL_S / 3,
                ),
            )
            threads = ThreadStore(pool, graph, ThreadLeases(pool, config.THREAD_LEASE_TTL_S))
            admission = Admission(
                pool,
                store,
                executor,
                wakeups,
                AdmissionPolicy(
                    busy=config.BUSY_THREAD_POLICY,
                    wait_s=config.BUSY_THREAD_WAIT_S,
                    requests_per_minute=config.TENANT_REQUESTS_PER_MINUTE,
                    max_runs_per_tenant=config.TENANT_MAX_CONCURRENT_RUNS,
                ),
            )
            agent.executor = executor
            app.state.agent, app.state.saver, app.state.model_name = agent, saver, model.model_name
            app.state.turns, app.state.executor, app.state.admission = turns, executor, admission
            app.state.threads = threads
            app.state.idempotency = IdempotencyKeys(
                pool, lease_s=config.THREAD_LEASE_TTL_S, retention_s=config.IDEMPOTENCY_TTL_S
            )
            app.state.run_service = RunService(store, threads, executor, runs_background_here=config.ROLE != "api")
            app.state.crons = CronStore(
                pool,
                CronPolicy(
                    max_per_tenant=config.TENANT_MAX_CRONS,
                    allow_seconds=config.CRON_ALLOW_SECONDS,
                    poll_s=config.CRON_POLL_S,
                ),
            )
            webhooks = WebhookSender(
                pool,
                WebhookPolicy(
                    secret=config.WEBHOOK_SECRET.get_secret_value(),
                    allow_private=config.WEBHOOK_ALLOW_PRIVATE,
                    timeout_s=config.WEBHOOK_TIMEOUT_S,
                    max_attempts=config.WEBHOOK_MAX_ATTEMPTS,
                    poll_s=config.CRON_POLL_S,
                ),
            )
            stack.push_async_callback(webhooks.aclose)
            executor.on_end.append(webhooks.on_run_end)
            background = [
                wakeups.listen_forever(direct_database_url(config) or url, listen_kwargs(config)),
                executor.watch_forever(),
            ]
            if config.ROLE != "api":
                background += [executor.work_forever(), sweep_forever(pool, retention_policy(config))]
                background += [app.state.crons.schedule_forever(), webhooks.recover_forever()]
            tasks = [asyncio.create_task(job) for job in background]
            for task in tasks:
                stack.callback(task.cancel)
            settle_garbage_collector(config.GC_GEN0_THRESHOLD)
            drain_on_sigterm(app, config.SHUTDOWN_DRAIN_S)
            log.info("serving", extra={"path": "/agent", "role": config.ROLE})
            yield
            app.state.draining = True
            await executor.shutdown(config.GRACEFUL_TIMEOUT_S)
        if tracing is not None:
            tracing.shutdown()  # flushes the spans still queued

    app = FastAPI(
        title="Agent",
        version="1.0.0",
        description="A LangGraph ReAct agent that remembers each conversation in PostgreSQL.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # The routers' routes join the app's own list instead of being included:
    # FastAPI matches a request through each included router, twice, on every
    # request (90-180 µs for a LangGraph API path, against about 1 µs a route on
    # the list). None has a prefix or dependencies that including would add.
    app.router.routes.extend(operations.router.routes)
    # Routes are matched in order, one pattern at a time: LangServe's few before the
    # LangGraph API's forty, which cost a LangServe request about 55 µs to try; and
    # our one-pass invoke before LangServe's (see edges/langserve/invoke.py).
    app.router.routes.append(invoke_route(agent, "/agent"))
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
    app.router.routes.extend([*lgapi.open_router.routes, *lgapi.router.routes, *signin_router.routes])
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

    # Added last so they wrap everything: CORS (so even refusals carry its headers),
    # the worker balance, the id, the log, the role's routes, the size bound, then
    # idempotency keys (which read the body, so inside the size bound).
    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(BodySizeLimitMiddleware)
    app.add_middleware(RoleMiddleware)
    app.add_middleware(AccessLogMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(WorkerBalanceMiddleware)
    app.add_middleware(CorsFromSettings)
    return app


def drain_on_sigterm(app: FastAPI, drain_s: float) -> None:
    """On SIGTERM, answer /ready with 503 at once and keep serving for `drain_s`
    before uvicorn stops accepting, so a load balancer takes this process out
    before its socket goes away. Streams then finish within uvicorn's graceful
    timeout (sse-starlette's own cancel-on-exit is turned off)."""
    AppStatus.disable_automatic_graceful_drain()
    uvicorn_handler = signal.getsignal(signal.SIGTERM)
    if not callable(uvicorn_handler) or threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()

    def draining(sig: int, frame: FrameType | None) -> None:
        app.state.draining = True
        loop.call_soon_threadsafe(loop.call_later, drain_s, uvicorn_handler, sig, frame)

    signal.signal(signal.SIGTERM, draining)


def listen_kwargs(settings: Settings) -> dict[str, object]:
    kwargs = connection_kwargs(settings)
    return {"connect_timeout": kwargs["connect_timeout"]}


app = create_app()
