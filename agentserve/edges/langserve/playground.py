"""LangServe's chat playground in front of the agent, for signed-in browsers.

The chat page keeps the conversation on screen and sends all of it each time,
while the server keeps it too; so only the newest user messages form the turn,
and the thread is the browser session's own, which survives page reloads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel, Field, ValidationError

from agentserve.edges.langserve.admission import admitted, read_json_object, scope_config
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


def reply_text(output: dict[str, Any]) -> str:
    if pending := output.get("__interrupt__"):
        actions = ", ".join(str(item["value"]) for item in pending)
        return f"This needs a person's approval first: {actions}. Approve or reject it through the API."
    answers = [m for m in output.get("messages", []) if isinstance(m, AIMessage) and not m.tool_calls]
    return str(answers[-1].content) if answers else ""


class PlaygroundChat(Runnable[dict[str, Any], str]):
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
        turn = {"messages": newest_user_messages(input["messages"]), "resume": None}
        return reply_text(await self.agent.ainvoke(turn, config))

    async def astream(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[str]:
        yield await self.ainvoke(input, config)


def session_thread(request: Request) -> str:
    thread_id = request.state.principal.session_thread
    if not thread_id:
        raise HTTPException(400, "the playground needs a browser session: sign in at /signin")
    return str(thread_id)


def scope_config_to_session(config: dict[str, object], request: Request) -> dict[str, object]:
    return scope_config(request, session_thread(request))


async def admit_playground_turn(request: Request) -> AsyncIterator[None]:
    if request.method != "POST" or request.url.path.rstrip("/").rsplit("/", 1)[-1] not in ("invoke", "stream_log"):
        yield
        return
    body = await read_json_object(request)
    try:
        chat = ChatInput.model_validate(body.get("input"))
        turn = {"messages": newest_user_messages(chat.messages)}
        TurnInput.model_validate(turn)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    async with admitted(request, [(session_thread(request), turn)]):
        yield
