"""LangServe's chat playground in front of the agent, for signed-in browsers.

The chat page keeps the conversation on screen and sends all of it each time,
while the server keeps it too; so only the newest user messages form the turn,
and the thread is the browser session's own, which survives page reloads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from langchain_core.messages import AnyMessage, HumanMessage
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel, Field, ValidationError

from agentserve.edges.langserve.admission import admitted, posted_endpoint, read_json_object, scope_config
from agentserve.edges.langserve.runnable import AgentRunnable
from agentserve.messages import TurnInput

PATH = "/agent/chat"


class ChatInput(BaseModel):
    messages: list[AnyMessage] = Field(
        min_length=1, json_schema_extra={"widget": {"type": "chat", "input": "messages"}}
    )


def newest_user_messages(messages: list[Any]) -> list[HumanMessage]:
    newest: list[HumanMessage] = []
    for message in reversed(messages):
        if not isinstance(message, HumanMessage):
            break
        newest.insert(0, message)
    return newest


APPROVAL_TEXT = (
    "This needs a person's approval first: {actions}. This page cannot show approvals; "
    "approve or reject it in the Agent Chat UI (see the README), or with the API."
)


def approval_text(pending: list[dict[str, Any]]) -> str:
    actions = ", ".join(
        f"{item['value'].get('action')} {item['value'].get('args')}" if isinstance(item.get("value"), dict) else "?"
        for item in pending
    )
    return APPROVAL_TEXT.format(actions=actions)


def single(value: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    async def one() -> AsyncIterator[dict[str, Any]]:
        yield value

    return one()


class PlaygroundChat(Runnable[dict[str, Any], str]):
    """The turn's answer as text, streamed token by token (the page renders the
    concatenated chunks of `stream_log`)."""

    name = "agent"

    def __init__(self, agent: AgentRunnable) -> None:
        self.agent = agent

    def get_input_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        return ChatInput

    def invoke(self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any) -> str:
        raise NotImplementedError("the agent runs on the event loop: use ainvoke or astream")

    def stream(self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[str]:
        raise NotImplementedError("the agent runs on the event loop: use ainvoke or astream")

    async def ainvoke(self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any) -> str:
        return "".join([chunk async for chunk in self.astream(input, config)])

    async def astream(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[str]:
        # Through LangServe's run tracking, so that stream_log opens with the run's
        # initial state, which the page patches the streamed text into.
        async for chunk in self._atransform_stream_with_config(single(input), self._tokens, config, **kwargs):
            yield chunk

    async def _tokens(
        self, inputs: AsyncIterator[dict[str, Any]], run_manager: Any, config: RunnableConfig
    ) -> AsyncIterator[str]:
        input = [item async for item in inputs][-1]
        executor = self.agent.executor
        run_id = (config.get("configurable") or {}).get("run_id")
        if executor is None or not run_id:
            raise RuntimeError("the playground's turn was not admitted")
        turn = {"messages": newest_user_messages(input["messages"])}
        async for mode, data in executor.stream_attached(str(run_id), turn, ["messages", "updates"]):
            if mode == "messages":
                chunk, metadata = data
                if metadata.get("langgraph_node") == "call_model" and isinstance(chunk.content, str):
                    if chunk.content and not getattr(chunk, "tool_call_chunks", None):
                        yield chunk.content
            elif mode == "updates" and "__interrupt__" in data:
                yield approval_text([{"value": i.value} for i in data["__interrupt__"]])


def session_thread(request: Request) -> str:
    thread_id = request.state.principal.session_thread
    if not thread_id:
        raise HTTPException(400, "the playground needs a browser session: sign in at /signin")
    return str(thread_id)


def scope_config_to_session(config: dict[str, object], request: Request) -> dict[str, object]:
    return scope_config(request, session_thread(request))


async def admit_playground_turn(request: Request) -> AsyncIterator[None]:
    if posted_endpoint(request) not in ("invoke", "stream_log"):
        yield
        return
    body = await read_json_object(request)
    try:
        chat = ChatInput.model_validate(body.get("input"))
        turn = {"messages": newest_user_messages(chat.messages)}
        TurnInput.model_validate(turn)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    except (KeyError, TypeError, ValueError) as exc:
        # LangChain's message classes raise these from inside validation for some
        # malformed messages (a ToolMessageChunk without tool_call_id: KeyError).
        raise HTTPException(422, f"input.messages holds a malformed message: {type(exc).__name__}: {exc}") from exc
    async with admitted(request, [(session_thread(request), turn)]):
        yield
