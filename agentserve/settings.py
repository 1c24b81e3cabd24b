"""Every setting of the service, read from the environment and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "replace-me"})
# Where Vite, Next.js and the Chat UI's dev servers listen.
DEV_PORTS = (3000, 5173, 4173, 8080)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    ENVIRONMENT: Literal["development", "production"] = "development"
    LOG_LEVEL: str = "INFO"

    # Authentication: one key (tenant "default") or "tenant=key,tenant=key".
    AGENT_API_KEY: SecretStr = SecretStr("")
    AGENT_API_KEYS: SecretStr = SecretStr("")

    # Signs playground session cookies; derived from the API keys when empty.
    SESSION_SECRET: SecretStr = SecretStr("")

    # Optional JWT bearer auth: HS256 with a shared secret, or RS256 with a public key
    # (PEM). The tenant comes from JWT_TENANT_CLAIM, the user from "sub".
    JWT_SECRET: SecretStr = SecretStr("")
    JWT_PUBLIC_KEY: str = ""
    JWT_AUDIENCE: str = ""
    JWT_ISSUER: str = ""
    JWT_TENANT_CLAIM: str = "tenant"

    # PostgreSQL. Empty means: start an embedded server under DATA_DIR.
    DATABASE_URL: SecretStr = SecretStr("")
    DATA_DIR: Path = Path(".data")
    DB_POOL_MIN_SIZE: int = Field(default=2, ge=1)
    DB_POOL_MAX_SIZE: int = Field(default=10, ge=1)
    DB_CONNECT_TIMEOUT_S: float = Field(default=5.0, gt=0)
    DB_MAX_IDLE_S: float = Field(default=300.0, gt=0)
    # A connection idle longer than this is checked with a round trip before use.
    DB_CHECK_AFTER_IDLE_S: float = Field(default=2.0, ge=0)
    DB_MAX_LIFETIME_S: float = Field(default=1800.0, gt=0)
    # PgBouncer/Supabase transaction poolers cannot keep prepared statements.
    # Empty means never prepare (what a transaction pooler needs).
    DB_PREPARE_THRESHOLD: int | None = 5
    READY_TIMEOUT_S: float = Field(default=2.0, gt=0)

    # The model: any OpenAI-compatible server; no key means the offline model.
    OPENAI_API_KEY: SecretStr = SecretStr("")
    OPENAI_BASE_URL: str = ""
    OPENAI_MODEL: str = "gpt-4o-mini"
    OPENAI_TIMEOUT_S: float = Field(default=60.0, gt=0)
    # The client retries 429, 5xx and connection errors with exponential backoff and jitter.
    OPENAI_MAX_RETRIES: int = Field(default=3, ge=0)
    OFFLINE_MODEL_LATENCY_MS: float = Field(default=0.0, ge=0)
    OFFLINE_MODEL_FAILURE_RATE: float = Field(default=0.0, ge=0, le=1)

    # Browser origins allowed to call the API (comma-separated, as langgraph-api reads
    # it; "*" for any). Empty: none in production, local dev servers in development.
    CORS_ALLOW_ORIGINS: str = ""

    # Which work this process does: "api" (HTTP only), "worker" (background runs and
    # sweeps; HTTP only for /health and /ready), "all" (both).
    ROLE: Literal["all", "api", "worker"] = "all"
    # A direct (unpooled) URL for what needs a session: LISTEN wake-ups and schema
    # setup. Behind a transaction pooler set it; without it, wake-ups poll.
    DATABASE_DIRECT_URL: SecretStr = SecretStr("")
    # Set up the schema when the service starts (off where a migration job does it).
    SETUP_SCHEMA_ON_START: bool = True
    # Background runs: how many one worker executes at once, how often it looks for
    # new ones without a wake-up, and how often a run whose worker died is retried.
    BACKGROUND_JOBS_PER_WORKER: int = Field(default=10, ge=1)
    QUEUE_POLL_S: float = Field(default=1.0, gt=0)
    RUN_MAX_ATTEMPTS: int = Field(default=3, ge=1)
    # A request sent again with the same Idempotency-Key within this window gets the
    # first one's answer.
    IDEMPOTENCY_TTL_S: float = Field(default=86400.0, gt=0)
    # Stored events of resumable runs, and ended runs, are kept this long.
    RUN_EVENTS_TTL_S: float = Field(default=3600.0, gt=0)

    # Serving.
    HOST: str = "127.0.0.1"
    PORT: int = 8000
    WEB_CONCURRENCY: int = Field(default=2, ge=1)
    GRACEFUL_TIMEOUT_S: int = Field(default=120, ge=1)
    # After SIGTERM, /ready answers 503 for this long before the process stops
    # accepting, so a load balancer checking /ready takes it out first (Kubernetes
    # does this with the chart's preStop sleep instead).
    SHUTDOWN_DRAIN_S: float = Field(default=0.0, ge=0)
    MAX_REQUESTS: int = Field(default=0, ge=0)
    MAX_BODY_BYTES: int = Field(default=256 * 1024, ge=1024)
    # Allocations between young garbage collections (Python's default: 700). A turn
    # makes thousands of short-lived cycles; collecting them that often cost a few
    # percent of a worker's CPU and added pauses to every turn in flight. At 200,000
    # a plain turn took about a tenth less CPU than at 50,000 (the two alternated in
    # one run); more did not help.
    GC_GEN0_THRESHOLD: int = Field(default=200_000, ge=100)
    # Each model call and each tool call is one step; the guard answers politely
    # when the budget runs out instead of letting LangGraph raise.
    MAX_STEPS: int = Field(default=12, ge=3, le=200)
    # Wall-clock bound on one run (model calls, tools and checkpoints together).
    RUN_TIMEOUT_S: float = Field(default=120.0, gt=0)
    # After this many model calls fail in a row, answer 503 at once for a while.
    MODEL_BREAKER_THRESHOLD: int = Field(default=5, ge=1)
    MODEL_BREAKER_COOLDOWN_S: float = Field(default=15.0, gt=0)
    # How many recent messages the model sees (about 8 turns with tool calls); the
    # whole transcript stays stored. The state holds this and a quarter more, so a
    # turn costs the same at turn 200 as at turn 10: a larger window buys the model
    # more context at a per-turn cost that grows with it.
    CONTEXT_MESSAGES: int = Field(default=24, ge=4)
    # When a run's progress is written. "exit": once, when the run answers, pauses
    # for approval or fails; a run cut off (worker killed, client gone from a stream)
    # leaves nothing behind and is simply sent again. It saves most of the per-step
    # writes' CPU. "sync"/"async": after every step, so a cut-off run leaves its
    # partial progress, and the next turn repairs a tool call left unanswered.
    CHECKPOINT_DURABILITY: Literal["exit", "async", "sync"] = "exit"

    # Threads: one run at a time each; a turn arriving meanwhile waits ("enqueue", up
    # to BUSY_THREAD_WAIT_S) or is refused at once ("reject"), both ending in 409.
    BUSY_THREAD_POLICY: Literal["enqueue", "reject"] = "enqueue"
    BUSY_THREAD_WAIT_S: float = Field(default=10.0, ge=0)
    THREAD_LEASE_TTL_S: float = Field(default=15.0, ge=1)
    # Retention: idle threads are deleted, and only the newest checkpoints are kept.
    THREAD_TTL_DAYS: float = Field(default=30.0, gt=0)
    CHECKPOINTS_KEPT_PER_THREAD: int = Field(default=20, ge=1)
    SWEEP_INTERVAL_S: float = Field(default=300.0, gt=0)
    # Per-tenant limits shared by all workers (0 = no limit).
    TENANT_REQUESTS_PER_MINUTE: int = Field(default=0, ge=0)
    TENANT_MAX_CONCURRENT_RUNS: int = Field(default=0, ge=0)

    # Work nobody waits for: cron-scheduled runs and completion webhooks.
    # Each worker looks for due crons (and for webhooks whose sender stopped) this often.
    CRON_POLL_S: float = Field(default=10.0, gt=0, le=30)
    TENANT_MAX_CRONS: int = Field(default=100, ge=1)
    # A 6-field schedule (seconds first); meant for tests, too fine for production.
    CRON_ALLOW_SECONDS: bool = False
    # Signs each webhook body: X-Webhook-Signature: sha256=<HMAC-SHA256 hex>.
    WEBHOOK_SECRET: SecretStr = SecretStr("")
    # Webhooks to loopback, link-local and private addresses (off: a caller could
    # otherwise make the server call into its own network).
    WEBHOOK_ALLOW_PRIVATE: bool = False
    WEBHOOK_TIMEOUT_S: float = Field(default=10.0, gt=0, le=60)
    WEBHOOK_MAX_ATTEMPTS: int = Field(default=5, ge=1, le=20)

    @field_validator("WEBHOOK_SECRET")
    @classmethod
    def _webhook_secret_not_placeholder(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if secret and (secret.lower() in PLACEHOLDER_SECRETS or len(secret) < 16):
            raise ValueError("WEBHOOK_SECRET is a placeholder or shorter than 16 characters; leave it empty or set one")
        return value

    @field_validator("DB_PREPARE_THRESHOLD", mode="before")
    @classmethod
    def _empty_means_never(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def cors_origins(self) -> list[str]:
        configured = [origin.strip() for origin in self.CORS_ALLOW_ORIGINS.split(",") if origin.strip()]
        if configured or self.ENVIRONMENT == "production":
            return configured
        return [f"http://{host}:{port}" for host in ("localhost", "127.0.0.1") for port in DEV_PORTS]

    @property
    def offline_model(self) -> bool:
        return not self.OPENAI_API_KEY.get_secret_value()

    @property
    def embedded_database(self) -> bool:
        return not self.DATABASE_URL.get_secret_value()

    @model_validator(mode="after")
    def _refuse_placeholders_in_production(self) -> Settings:
        if self.ENVIRONMENT != "production":
            return self
        keys = [self.AGENT_API_KEY.get_secret_value()]
        keys += [pair.partition("=")[2] for pair in self.AGENT_API_KEYS.get_secret_value().split(",") if pair]
        configured = [key for key in keys if key]
        if not configured:
            raise ValueError("AGENT_API_KEY or AGENT_API_KEYS must be set in production")
        for key in configured:
            if key.lower() in PLACEHOLDER_SECRETS or len(key) < 16:
                raise ValueError(
                    "an API key is a placeholder or shorter than 16 characters; "
                    "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
