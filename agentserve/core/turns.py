"""Running one turn of the agent on a thread: the graph, its time limit, its
durability, and what the thread looks like afterwards (its state and the
transcript of what left it). Both APIs run turns through here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AnyMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, Durability, Interrupt

from agentserve.core.errors import RunTimedOut
from agentserve.core.runs import LATEST_CHECKPOINT_KEY
from agentserve.core.serialize import jsonable
from agentserve.core.transcript import Transcript
from agentserve.metrics import RUNS_IN_FLIGHT, TURN_DURATION

# LangGraph's own stream modes; "events" is served from astream_events.
GRAPH_MODES = ("values", "updates", "messages", "custom", "debug", "tasks", "checkpoints")


def interrupts_of(interrupts: Sequence[Interrupt]) -> list[dict[str, Any]]:
    """LangGraph's interrupts as the JSON callers see: `{value, id}` only."""
    return [{"value": jsonable(i.value), "id": i.id} for i in interrupts]


@dataclass
class TurnOutcome:
    """Filled in while a turn streams: its final values and any pause."""

    values: dict[str, Any] = field(default_factory=dict)
    interrupts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TurnRunner:
    graph: CompiledStateGraph
    transcript: Transcript
    max_steps: int = 12
    run_timeout_s: float = 120.0
    durability: Durability = "exit"

    def config_for(
        self,
        thread_key: str,
        tenant: str,
        *,
        run_id: str | None = None,
        checkpoint: dict[str, Any] | None = None,
        latest: tuple[str | None, bool] | None = None,
    ) -> RunnableConfig:
        """Built from scratch: nothing a caller sent reaches the checkpointer's
        config but a checkpoint to start from, and the step budget is the server's.
        `latest` is what the run saw of the thread's latest checkpoint as it took it."""
        configurable: dict[str, Any] = {"thread_id": thread_key, "tenant": tenant, "checkpoint_ns": ""}
        if checkpoint and checkpoint.get("checkpoint_id"):
            configurable["checkpoint_id"] = str(checkpoint["checkpoint_id"])
        elif latest is not None:
            configurable[LATEST_CHECKPOINT_KEY] = latest
        config: RunnableConfig = {"configurable": configurable, "recursion_limit": self.max_steps}
        if run_id:
            # Kept in each checkpoint's metadata: how a retaken run finds what its
            # first attempt stored. Not `run_id`, which LangGraph reads itself (a
            # second turn under the same `run_id` is taken for a replay and skipped).
            config["metadata"] = {"agent_run_id": run_id}
        return config

    async def stream(
        self,
        graph_input: Any,
        config: RunnableConfig,
        modes: Sequence[str],
        outcome: TurnOutcome,
        *,
        subgraphs: bool = False,
    ) -> AsyncIterator[tuple[str, Any]]:
        """(mode, payload) pairs of the requested modes as the turn runs. The turn's
        final values and pause land in `outcome`."""
        started, result = time.perf_counter(), "error"
        RUNS_IN_FLIGHT.inc()
        try:
            async with asyncio.timeout(self.run_timeout_s):
                async for mode, payload in self._graph_stream(graph_input, config, modes, outcome, subgraphs):
                    yield mode, payload
            result = "interrupted" if outcome.interrupts else "ok"
        except TimeoutError as exc:
            raise RunTimedOut(f"the run took longer than {self.run_timeout_s:g}s and was stopped") from exc
        finally:
            RUNS_IN_FLIGHT.dec()
            TURN_DURATION.labels(outcome=result).observe(time.perf_counter() - started)

    async def _graph_stream(
        self,
        graph_input: Any,
        config: RunnableConfig,
        modes: Sequence[str],
        outcome: TurnOutcome,
        subgraphs: bool,
    ) -> AsyncIterator[tuple[str, Any]]:
        wanted = set(modes)
        graph_modes = sorted({m for m in modes if m in GRAPH_MODES} | {"values", "updates"})
        if "events" in wanted:
            source = self._via_events(graph_input, config, graph_modes, subgraphs)
        else:
            source = self._via_astream(graph_input, config, graph_modes, subgraphs)
        async for namespace, mode, payload in source:
            if not namespace:
                if mode == "values" and isinstance(payload, dict):
                    outcome.values = {k: v for k, v in payload.items() if k != "__interrupt__"}
                elif mode == "updates" and isinstance(payload, dict) and "__interrupt__" in payload:
                    outcome.interrupts = interrupts_of(payload["__interrupt__"])
            if mode in wanted:
                yield (f"{mode}|{'|'.join(namespace)}" if namespace else mode), payload

    async def _via_astream(
        self, graph_input: Any, config: RunnableConfig, modes: list[str], subgraphs: bool
    ) -> AsyncIterator[tuple[tuple[str, ...], str, Any]]:
        async for item in self.graph.astream(
            graph_input,
            config,
            stream_mode=modes,  # type: ignore[arg-type]
            subgraphs=subgraphs,
            durability=self.durability,
        ):
            if subgraphs:
                namespace, mode, payload = item
                yield tuple(namespace), mode, payload
            else:
                mode, payload = item
                yield (), mode, payload

    async def _via_events(
        self, graph_input: Any, config: RunnableConfig, modes: list[str], subgraphs: bool
    ) -> AsyncIterator[tuple[tuple[str, ...], str, Any]]:
        """astream_events, with the other modes read off the root run's stream
        events (what the reference server does for `events`)."""
        async for event in self.graph.astream_events(
            graph_input, config, version="v2", stream_mode=modes, subgraphs=subgraphs, durability=self.durability
        ):
            if event["event"] == "on_chain_stream" and not event.get("parent_ids"):
                chunk = event["data"]["chunk"]
                if subgraphs:
                    namespace, mode, payload = chunk
                    yield tuple(namespace), mode, payload
                else:
                    mode, payload = chunk
                    yield (), mode, payload
            else:
                yield (), "events", event

    async def read_messages(self, thread_key: str) -> list[AnyMessage]:
        """The whole conversation: the transcript, then what the state still holds."""
        snapshot = await self.graph.aget_state({"configurable": {"thread_id": thread_key}})
        recent = list(snapshot.values.get("messages", []))
        archived = await self.transcript.read(thread_key)
        # A crash between archiving and trimming leaves a message in both places.
        archived_ids = {m.id for m in archived}
        return archived + [m for m in recent if m.id not in archived_ids]

    async def stored_by(self, thread_key: str, run_id: str) -> bool | None:
        """Whether an earlier attempt of this run left a checkpoint: None if not,
        False if it stopped midway, True if it reached its end."""
        config: RunnableConfig = {"configurable": {"thread_id": thread_key, "checkpoint_ns": ""}}
        saver = self.graph.checkpointer
        assert saver is not None and not isinstance(saver, bool)
        async for item in saver.alist(config, filter={"agent_run_id": run_id}, limit=1):
            snapshot = await self.graph.aget_state({"configurable": {**item.config["configurable"]}})
            return not snapshot.next
        return None


def graph_input_for(kwargs: dict[str, Any]) -> Any:
    """The run's input as the graph takes it: a Command when the caller sent one
    (it wins over an `input` sent beside it), else the input."""
    command = kwargs.get("command")
    if command:
        goto = command.get("goto")
        return Command(
            resume=command.get("resume"),
            update=command.get("update"),
            goto=goto if goto else (),
        )
    return kwargs.get("input")
