"""The agent as LangServe sees it: one turn on the caller's own thread.

The run was admitted before LangServe called us (its id is in the config); the
turn runs through the core's executor, and returns what this turn added rather
than the whole history.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, BaseCallbackManager
from langchain_core.messages import AnyMessage
from langchain_core.runnables import ConfigurableFieldSpec, Runnable, RunnableConfig
from langchain_core.runnables.config import get_async_callback_manager_for_config, get_config_list
from langgraph.types import Command
from langserve.callbacks import AsyncEventAggregatorCallback
from pydantic import BaseModel, ConfigDict, Field

from agentserve.core.executor import Executor
from agentserve.core.turns import interrupts_of
from agentserve.messages import TurnInput

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

    def __init__(self) -> None:
        self.executor: Executor | None = None

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
        if not get_async_callback_manager_for_config(config).handlers:
            # Nobody reads this run's callback events (no handler, no tracer): the
            # turn runs without a run of ours recorded around it, which cost about a
            # twentieth of a turn's CPU for nothing.
            async for chunk in self._turn_chunks(input, config):
                yield chunk
            return
        async for chunk in self._atransform_stream_with_config(_single(input), self._run_turn, config, **kwargs):
            yield chunk

    async def _run_turn(
        self,
        inputs: AsyncIterator[dict[str, Any]],
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> AsyncIterator[dict[str, Any]]:
        turn = [item async for item in inputs][-1]
        async for chunk in self._turn_chunks(turn, config):
            yield chunk

    async def _turn_chunks(self, turn: dict[str, Any], config: RunnableConfig) -> AsyncIterator[dict[str, Any]]:
        if self.executor is None:
            raise RuntimeError("the agent is not attached to a run executor yet")
        run_id = (config.get("configurable") or {}).get("run_id")
        if not run_id:
            raise ValueError("a turn needs configurable.run_id, which admission sets")
        resume = turn.get("resume")
        graph_input: Any = Command(resume=resume) if resume is not None else {"messages": turn["messages"]}
        async for mode, data in self.executor.stream_attached(
            str(run_id), graph_input, ["updates"], callbacks=config.get("callbacks")
        ):
            assert mode == "updates" and isinstance(data, dict)
            for node, value in data.items():
                if node == "__interrupt__":
                    yield {"__interrupt__": interrupts_of(value)}
                elif isinstance(value, dict) and value.get("messages"):
                    yield {"messages": list(value["messages"])}
