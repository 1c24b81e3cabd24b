"""The database layer against a real PostgreSQL: schema setup and the checkpointer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.types import Command, Durability

from agent import TOOLS, build_graph, refund_tool
from agentserve.core.refunds import RefundLedger
from agentserve.core.transcript import MessageBound, Transcript
from agentserve.model import build_chat_model
from agentserve.offline_model import serve_offline_model
from agentserve.persistence import PooledPostgresSaver, WindowSerializer, create_pool, setup_schema
from agentserve.settings import Settings
from tests.conftest import scratch_database
from tests.test_model_requests import tool_call

SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture()
def fresh_database(postgres_server_url: str) -> Iterator[str]:
    with scratch_database(postgres_server_url, prefix="agent_schema") as url:
        yield url


async def test_concurrent_schema_setup_does_not_race(fresh_database: str) -> None:
    await asyncio.gather(*(setup_schema(fresh_database, SETTINGS) for _ in range(4)))
    with psycopg.connect(fresh_database) as conn:
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"checkpoints", "checkpoint_blobs", "checkpoint_writes", "agent_threads", "agent_transcript"} <= tables


async def test_checkpoint_calls_of_one_worker_do_not_queue_behind_each_other(database_url: str) -> None:
    await setup_schema(database_url, SETTINGS)
    pool = create_pool(database_url, SETTINGS)
    await pool.open(wait=True)
    try:
        saver = PooledPostgresSaver(pool)  # type: ignore[arg-type]
        config = {"configurable": {"thread_id": "nobody", "checkpoint_ns": ""}}
        async with saver._cursor():
            # The base class would wait here for the outer call's lock, forever.
            async with asyncio.timeout(3):
                assert await saver.aget_tuple(config) is None  # type: ignore[arg-type]
    finally:
        await pool.close()


@pytest.fixture
async def pool_and_model(database_url: str) -> AsyncIterator[tuple[Any, BaseChatModel]]:
    """The schema, a pool on it, and ChatOpenAI against the offline model."""
    await setup_schema(database_url, SETTINGS)
    pool = create_pool(database_url, SETTINGS)
    await pool.open(wait=True)
    try:
        async with serve_offline_model() as url:
            yield pool, build_chat_model(SETTINGS, url)
    finally:
        await pool.close()


@pytest.mark.parametrize("durability", ["exit", "sync"])
async def test_a_turn_reads_back_the_checkpoint_it_wrote_exactly_as_stored(
    pool_and_model: tuple[Any, BaseChatModel], durability: Durability
) -> None:
    """The copy a worker keeps of the checkpoint it wrote last is handed back only
    while it is the thread's latest, and then equals what the database returns:
    through plain and tool turns, a pause for approval and its resumption, a state
    written by hand, and turns that move old messages to the transcript."""
    pool, model = pool_and_model
    bound = MessageBound(Transcript(pool), keep=4)
    saver = PooledPostgresSaver(pool, bound=bound)
    graph = build_graph(model, saver, tools=[*TOOLS, refund_tool(RefundLedger(pool))])
    config: RunnableConfig = {"configurable": {"thread_id": "t/cached", "tenant": "t"}}
    latest: RunnableConfig = {"configurable": {"thread_id": "t/cached", "checkpoint_ns": ""}}
    hits = 0

    async def check() -> None:
        nonlocal hits
        mine = saver.known.get("t/cached")
        handed = await saver.aget_tuple(latest)
        stored = await AsyncPostgresSaver.aget_tuple(saver, latest)
        assert handed is not None and stored is not None
        assert handed.config == stored.config
        assert handed.parent_config == stored.parent_config
        assert handed.metadata == stored.metadata
        assert handed.pending_writes == stored.pending_writes
        assert handed.checkpoint == stored.checkpoint
        hits += mine is not None and mine.checkpoint_id == stored.checkpoint["id"] and not stored.pending_writes

    steps: list[Any] = [
        {"messages": [HumanMessage("hello")]},
        {"messages": [HumanMessage("What is 12 * 8?")]},
        {"messages": [HumanMessage("refund order A-1 for 12.5")]},  # pauses for approval
        Command(resume={"approved": True}),
        *({"messages": [HumanMessage(f"note {i}")]} for i in range(6)),  # past the bound
    ]
    for step in steps:
        await graph.ainvoke(step, config, durability=durability)
        await check()
    await graph.aupdate_state(config, {"messages": [HumanMessage("written by hand")]}, as_node="call_model")
    await check()
    await graph.ainvoke({"messages": [HumanMessage("and after that")]}, config, durability=durability)
    await check()
    state = await graph.aget_state(config)
    assert len(state.values["messages"]) <= bound.limit
    assert state.values["messages"][-1].content == "You said: and after that"
    assert hits == len(steps) + 1  # all but the pause, whose writes are read from the database


async def test_a_checkpoint_written_elsewhere_is_read_from_the_database(
    pool_and_model: tuple[Any, BaseChatModel],
) -> None:
    pool, model = pool_and_model
    here, there = (PooledPostgresSaver(pool) for _ in range(2))  # type: ignore[arg-type]
    config: RunnableConfig = {"configurable": {"thread_id": "t/shared"}}
    await build_graph(model, here).ainvoke({"messages": [HumanMessage("first")]}, config)
    await build_graph(model, there).ainvoke({"messages": [HumanMessage("second")]}, config)
    # `here` still holds the first turn's checkpoint, no longer the latest.
    state = await build_graph(model, here).aget_state(config)
    assert [m.content for m in state.values["messages"]][-1] == "You said: second"
    assert here.known["t/shared"].checkpoint_id == state.config["configurable"]["checkpoint_id"]
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM checkpoints WHERE thread_id = 't/shared'")
    assert await there.aget_tuple({"configurable": {"thread_id": "t/shared", "checkpoint_ns": ""}}) is None


@pytest.mark.parametrize("length", [1, 15, 16, 300])
def test_a_window_is_written_in_the_bytes_langgraph_writes_and_reads_back(length: int) -> None:
    window: list[BaseMessage] = []
    for i in range(length):
        window.append(HumanMessage(f"question {i}: héllo 👋", id=f"h-{i}", name="ada"))
        window.append(AIMessage("", tool_calls=[tool_call("calculator", {"expression": f"{i} * 8"}, f"call-{i}")]))
        window.append(ToolMessage(str(i * 8), tool_call_id=f"call-{i}", status="success"))
    window = window[:length]
    ours, langgraph = WindowSerializer(), JsonPlusSerializer()
    first = ours.dumps_typed(window)
    assert first == langgraph.dumps_typed(window)
    assert len(ours.encoded.entries) == length
    # The next turn's window: the same messages and one more, of which only that one is encoded.
    window = [*window, AIMessage("The answer is 96.", id="answer")]
    encode = JsonPlusSerializer.dumps_typed
    calls = 0

    def counting(self: WindowSerializer, obj: Any) -> tuple[str, bytes]:
        nonlocal calls
        calls += 1
        return encode(self, obj)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(JsonPlusSerializer, "dumps_typed", counting)
        second = ours.dumps_typed(window)
    assert calls == 1
    assert second == langgraph.dumps_typed(window)
    assert ours.loads_typed(second) == window
