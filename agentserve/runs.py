"""The agent as LangServe sees it: one turn on the caller's own thread.

Takes the caller's tenant and thread name from the config, turns them into the
stored thread identity, runs the graph with a server-chosen config only, and
returns what this turn added rather than the whole history.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, BaseCallbackManager
from langchain_core.messages import AnyMessage, RemoveMessage
from langchain_core.runnables import ConfigurableFieldSpec, Runnable, RunnableConfig
from langchain_core.runnables.config import get_config_list
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, Durability
from langserve.callbacks import AsyncEventAggregatorCallback
from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field

from agentserve.messages import TurnInput
from agentserve.metrics import RUNS_IN_FLIGHT, TURN_DURATION
from agentserve.transcript import Transcript, archivable_prefix

SET_PENDING = "UPDATE agent_threads SET pending = %s WHERE thread_key = %s"
THREAD_ID_DESCRIPTION = "Your name for the conversation; a new name starts a new one."


class TurnOutput(BaseModel):
    """What a turn added. When the agent pauses for a person's approval, the output
    also carries `__interrupt__`: the pending action, to answer with `resume`."""

    # Extra keys allowed so that `__interrupt__` (LangGraph's name) reaches the caller.
    model_config = ConfigDict(extra="allow")

    thread_id: str
    messages: list[AnyMessage] = Field(
        description="The messages this turn added: tool calls, tool results, the answer."
    )


class RunTimedOut(TimeoutError):
    """The run went past the server's wall-clock limit and was stopped."""


def thread_key_for(tenant: str, thread_id: str) -> str:
    """The stored identity of a thread. Tenant names hold no '/', so two tenants'
    threads can never share a key whatever thread ids they choose."""
    return f"{tenant}/{thread_id}"


def thread_id_in(thread_key: str) -> str:
    """The caller's thread name inside a stored identity."""
    return thread_key.split("/", 1)[1]


def interrupts_of(interrupts: Any) -> list[dict[str, Any]]:
    """LangGraph's interrupts as the JSON the caller sees."""
    return [{"id": i.id, "value": i.value} for i in interrupts]


def without_event_recording(config: RunnableConfig | None) -> RunnableConfig:
    """The config minus LangServe's event aggregator. LangServe attaches one to every
    invoke, batch and stream run and records each callback event of the run into it,
    for routes that send the events back (`include_callback_events`). Ours do not,
    so the recording is thrown away unread (about 15 % of a turn's CPU). Other
    handlers (stream_events, stream_log, LangSmith) stay."""
    stripped: RunnableConfig = {**(config or {})}
    callbacks = stripped.get("callbacks")
    if isinstance(callbacks, list):
        stripped["callbacks"] = [c for c in callbacks if not isinstance(c, AsyncEventAggregatorCallback)]
    elif isinstance(callbacks, BaseCallbackManager):
        manager = callbacks.copy()
        for handler in [h for h in manager.handlers if isinstance(h, AsyncEventAggregatorCallback)]:
            manager.remove_handler(handler)
        stripped["callbacks"] = manager
    return stripped


def _single(value: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    async def one() -> AsyncIterator[dict[str, Any]]:
        yield value

    return one()


class AgentRunnable(Runnable[dict[str, Any], dict[str, Any]]):
    """Adapts the compiled graph for serving; the graph is attached once it is built."""

    name = "agent"

    def __init__(
        self,
        *,
        max_steps: int = 12,
        context_messages: int = 40,
        run_timeout_s: float = 120.0,
        durability: Durability = "exit",
    ) -> None:
        self.run_timeout_s = run_timeout_s
        self.durability: Durability = durability
        self.graph: CompiledStateGraph | None = None
        self.transcript: Transcript | None = None
        self.pool: AsyncConnectionPool[AsyncConnection[DictRow]] | None = None
        self.max_steps = max_steps
        self.context_messages = context_messages

    def get_input_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        return TurnInput

    def get_output_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        return TurnOutput

    @property
    def config_specs(self) -> list[ConfigurableFieldSpec]:
        return [
            ConfigurableFieldSpec(id="thread_id", annotation=str, name="Thread ID", description=THREAD_ID_DESCRIPTION)
        ]

    def invoke(self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any) -> dict[str, Any]:
        raise NotImplementedError("the agent runs on the event loop: use ainvoke or astream")

    def stream(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[dict[str, Any]]:
        raise NotImplementedError("the agent runs on the event loop: use ainvoke or astream")

    async def read_thread(self, thread_key: str) -> tuple[list[AnyMessage], list[dict[str, Any]]]:
        """The stored conversation of a thread and its pending interrupts."""
        if self.graph is None:
            raise RuntimeError("the agent graph is not attached yet")
        snapshot = await self.graph.aget_state({"configurable": {"thread_id": thread_key}})
        recent = list(snapshot.values.get("messages", []))
        archived = await self.transcript.read(thread_key) if self.transcript else []
        # A crash between archiving and trimming leaves a message in both places.
        archived_ids = {m.id for m in archived}
        messages = archived + [m for m in recent if m.id not in archived_ids]
        return messages, interrupts_of(snapshot.interrupts)

    async def abatch(
        self,
        inputs: list[dict[str, Any]],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Inputs on different threads run concurrently; inputs that share a thread
        run one after another, in order, so neither reads the other's stale state."""
        configs = get_config_list(config, len(inputs))
        by_thread: dict[str, list[int]] = {}
        for index, item_config in enumerate(configs):
            thread_id = str((item_config.get("configurable") or {}).get("thread_id"))
            by_thread.setdefault(thread_id, []).append(index)
        results: list[Any] = [None] * len(inputs)

        async def run_in_order(indexes: list[int]) -> None:
            for index in indexes:
                try:
                    results[index] = await self.ainvoke(inputs[index], configs[index], **kwargs)
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results[index] = exc

        await asyncio.gather(*(run_in_order(indexes) for indexes in by_thread.values()))
        return results

    async def ainvoke(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        thread_id = str(((config or {}).get("configurable") or {}).get("thread_id", ""))
        result: dict[str, Any] = {"thread_id": thread_id, "messages": []}
        async for chunk in self.astream(input, config, **kwargs):
            result["messages"] += chunk.get("messages", [])
            if "__interrupt__" in chunk:
                result["__interrupt__"] = chunk["__interrupt__"]
        return result

    async def astream(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[dict[str, Any]]:
        config = without_event_recording(config)
        async for chunk in self._atransform_stream_with_config(_single(input), self._run_turn, config, **kwargs):
            yield chunk

    async def _run_turn(
        self,
        inputs: AsyncIterator[dict[str, Any]],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> AsyncIterator[dict[str, Any]]:
        if self.graph is None:
            raise RuntimeError("the agent graph is not attached yet")
        turn = [item async for item in inputs][-1]
        configurable = config.get("configurable") or {}
        tenant, thread_id = configurable.get("tenant"), configurable.get("thread_id")
        if not tenant or not thread_id:
            raise ValueError("a turn needs configurable.tenant and configurable.thread_id")
        # Built from scratch: nothing the caller sent reaches the checkpointer's config,
        # and the step budget is the server's.
        thread_key = thread_key_for(str(tenant), str(thread_id))
        graph_config: RunnableConfig = {
            "configurable": {"thread_id": thread_key, "tenant": str(tenant)},
            "recursion_limit": self.max_steps,
            "callbacks": config.get("callbacks"),
        }
        resume = turn.get("resume")
        graph_input: Any = Command(resume=resume) if resume is not None else {"messages": turn["messages"]}
        state: dict[str, Any] = {}
        interrupted: list[dict[str, Any]] = []
        started, outcome = time.perf_counter(), "error"
        RUNS_IN_FLIGHT.inc()
        try:
            async with asyncio.timeout(self.run_timeout_s):
                async for chunk in self._stream_graph(graph_input, graph_config, state, interrupted):
                    yield chunk
            outcome = "interrupted" if interrupted else "ok"
        except TimeoutError as exc:
            raise RunTimedOut(f"the run took longer than {self.run_timeout_s:g}s and was stopped") from exc
        finally:
            RUNS_IN_FLIGHT.dec()
            TURN_DURATION.labels(outcome=outcome).observe(time.perf_counter() - started)
        if interrupted or resume is not None:
            await self._record_pending(thread_key, interrupted or None)
        if not interrupted:
            await self._compact(graph_config["configurable"], state.get("messages", []))

    async def _stream_graph(
        self, graph_input: Any, graph_config: RunnableConfig, state: dict[str, Any], interrupted: list[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        """This turn's new messages as they come; fills `state` with the final values
        and `interrupted` with any pause."""
        assert self.graph is not None
        async for mode, data in self.graph.astream(
            graph_input, graph_config, stream_mode=["updates", "values"], durability=self.durability
        ):
            assert isinstance(data, dict)
            if mode == "values":
                state.clear()
                state.update(data)
                continue
            for node, value in data.items():
                if node == "__interrupt__":
                    interrupted[:] = interrupts_of(value)
                    yield {"__interrupt__": list(interrupted)}
                elif isinstance(value, dict) and value.get("messages"):
                    yield {"messages": list(value["messages"])}

    async def _record_pending(self, thread_key: str, pending: list[dict[str, Any]] | None) -> None:
        """Mirror the thread's pending action into its registry row, so admission can
        refuse a new message on a paused thread without reading the checkpoint."""
        if self.pool is not None:
            async with self.pool.connection() as conn:
                await conn.execute(SET_PENDING, (Jsonb(pending) if pending else None, thread_key))

    async def pending_actions(self, thread_key: str) -> list[dict[str, Any]]:
        """The interrupts a thread is waiting on, read from its checkpoint."""
        if self.graph is None:
            raise RuntimeError("the agent graph is not attached yet")
        snapshot = await self.graph.aget_state({"configurable": {"thread_id": thread_key}})
        return interrupts_of(snapshot.interrupts)

    async def _compact(self, configurable: dict[str, Any], messages: list[AnyMessage]) -> None:
        """Move old messages from the state to the transcript once the state holds
        twice the context window, so checkpoints stop growing with the thread. Done
        in batches, so the extra checkpoint write happens once per many turns."""
        if self.graph is None or self.transcript is None or len(messages) <= 2 * self.context_messages:
            return
        cut = archivable_prefix(messages, self.context_messages)
        if not cut:
            return
        old = messages[:cut]
        await self.transcript.append(configurable["thread_id"], old)
        removals = [RemoveMessage(id=str(m.id)) for m in old]
        await self.graph.aupdate_state({"configurable": configurable}, {"messages": removals}, as_node="call_model")
