"""The request bodies ChatOpenAI sends are the same bytes with the transform shortcut
as without it (agentserve.model_requests), recorded by a server for every message
shape the agent sends; and the shortcut steps aside wherever the SDK's transform
would change something."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Required

import openai
import pydantic
import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import Runnable
from openai._utils._transform import PropertyInfo, async_maybe_transform
from openai.types.chat import completion_create_params
from starlette.types import ASGIApp, Receive, Scope, Send
from typing_extensions import TypedDict

from agent import SYSTEM_PROMPT, TOOLS, refund_tool
from agentserve import model_requests
from agentserve.core.refunds import RefundLedger
from agentserve.model import build_chat_model
from agentserve.offline_model import create_offline_model_app, serve_in_loop
from agentserve.settings import Settings

PROMPT = SystemMessage(SYSTEM_PROMPT.format(now="2026-12-02T01:30+00:00"))
UNICODE = 'Héllo 👋 — «guillemets» "double" \\ back\\slash\nnew line\ttab 日本語 مرحبا \u2028 \x7f'


def tool_call(name: str, args: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


# Each one a request the agent makes (its prompt, then a window of the thread), and
# one the offline model accepts: every tool call is answered right after it.
CONVERSATIONS: dict[str, list[BaseMessage]] = {
    "human": [PROMPT, HumanMessage("What is 12 * 8?")],
    "unicode and escapes": [PROMPT, HumanMessage(UNICODE)],
    "content list": [
        PROMPT,
        HumanMessage(content=[{"type": "text", "text": UNICODE}, {"type": "text", "text": "and a second part"}]),
    ],
    "named human": [PROMPT, HumanMessage("my name is Ada Lovelace", name="ada")],
    "tool call and result": [
        PROMPT,
        HumanMessage("What is 12 * 8?"),
        AIMessage("", tool_calls=[tool_call("calculator", {"expression": "12 * 8"}, "call_calc")]),
        ToolMessage("96", tool_call_id="call_calc"),
    ],
    "two tool calls, an error result, a content-list result": [
        PROMPT,
        HumanMessage("What is (3 + 4) ** 2 and what time is it?"),
        AIMessage(
            "Let me check both.",
            tool_calls=[
                tool_call("calculator", {"expression": "(3 + 4) ** 2"}, "call_a"),
                tool_call("current_datetime", {}, "call_b"),
            ],
        ),
        ToolMessage(content=[{"type": "text", "text": "49"}], tool_call_id="call_a"),
        ToolMessage("Error: the clock is unavailable", tool_call_id="call_b", status="error"),
    ],
    "refund arguments": [
        PROMPT,
        HumanMessage("Please refund order ORD-ü7 for 12.5"),
        AIMessage("", tool_calls=[tool_call("issue_refund", {"order_id": "ORD-ü7", "amount": 12.5}, "call_r")]),
        ToolMessage("Refund R-1 of 12.50 issued for order ORD-ü7.", tool_call_id="call_r"),
        HumanMessage("and refund order ORD-8 for 10000"),
        AIMessage("", tool_calls=[tool_call("issue_refund", {"order_id": "ORD-8", "amount": 10000}, "call_s")]),
        ToolMessage("Refund rejected by the reviewer: duplicate claim. It was not issued.", tool_call_id="call_s"),
    ],
    "a long window": [
        PROMPT,
        *[
            message
            for i in range(6)
            for message in (
                HumanMessage(f"What is {i} * 8?"),
                AIMessage("", tool_calls=[tool_call("calculator", {"expression": f"{i} * 8"}, f"call_{i}")]),
                ToolMessage(str(i * 8), tool_call_id=f"call_{i}"),
                AIMessage(f"The answer is {i * 8}.", id=f"run-{i}"),
            )
        ],
        HumanMessage("what did I ask before?"),
    ],
}


class Recorder:
    """Keeps the raw body of every chat-completions request the app receives."""

    def __init__(self, app: ASGIApp) -> None:
        self.app, self.bodies = app, list[bytes]()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        self.bodies.append(body)
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@pytest.fixture
async def recording_model() -> AsyncIterator[tuple[Recorder, Runnable[Any, Any]]]:
    recorder = Recorder(create_offline_model_app(latency_ms=0))
    async with serve_in_loop(recorder) as base:
        settings = Settings(_env_file=None, OPENAI_MAX_RETRIES=0)  # type: ignore[call-arg]
        model = build_chat_model(settings, f"{base}/v1")
        yield recorder, model.bind_tools([*TOOLS, refund_tool(RefundLedger(None))])  # type: ignore[arg-type]
    model_requests.install()


async def send_all(model: Runnable[Any, Any]) -> None:
    for name, messages in CONVERSATIONS.items():
        answer = await model.ainvoke(messages)
        assert isinstance(answer, AIMessage) and (answer.content or answer.tool_calls), name
        streamed = [chunk async for chunk in model.astream(messages)]
        assert streamed, name


async def test_every_request_body_is_the_bytes_the_unmodified_sdk_sends(
    recording_model: tuple[Recorder, Runnable[Any, Any]],
) -> None:
    recorder, model = recording_model
    model_requests.uninstall()
    await send_all(model)
    by_sdk = recorder.bodies[:]
    recorder.bodies.clear()

    model_requests.install()
    before = model_requests.calls["shortcut"]
    await send_all(model)
    shortcut = recorder.bodies[:]

    requests = 2 * len(CONVERSATIONS)
    assert len(by_sdk) == len(shortcut) == requests
    taken = model_requests.calls["shortcut"] - before
    assert taken == requests, (
        f"openai {openai.__version__}: the transform shortcut applied to {taken} of {requests} "
        "chat-completions requests; the SDK's request types or its create() changed, see agentserve/model_requests.py"
    )
    for name, sdk_body, our_body in zip(2 * [*CONVERSATIONS], by_sdk, shortcut, strict=True):
        assert json.loads(our_body) == json.loads(sdk_body), name
        assert our_body == sdk_body, name
    streaming = [json.loads(body) for body in shortcut[1::2]]
    assert all(body["stream"] is True and body["stream_options"] == {"include_usage": True} for body in streaming)
    refund = json.loads(shortcut[2 * [*CONVERSATIONS].index("refund arguments")])
    calls = [call["function"] for m in refund["messages"] for call in m.get("tool_calls", [])]
    assert [json.loads(c["arguments"]) for c in calls] == [
        {"order_id": "ORD-ü7", "amount": 12.5},
        {"order_id": "ORD-8", "amount": 10000},
    ]


def test_chat_completion_params_carry_no_transformation() -> None:
    for params in (
        completion_create_params.CompletionCreateParamsStreaming,
        completion_create_params.CompletionCreateParamsNonStreaming,
    ):
        assert model_requests.carries_no_transform(params), (
            f"openai {openai.__version__}: {params.__name__} now renames or formats a field; "
            "the transform shortcut no longer applies to chat completions"
        )


class Renamed(TypedDict, total=False):
    card_id: Required[Annotated[str, PropertyInfo(alias="cardID")]]


class Dated(TypedDict, total=False):
    when: Annotated[datetime, PropertyInfo(format="iso8601")]


class Outer(TypedDict, total=False):
    items: Iterable[Renamed | Dated]
    note: str


class Part(pydantic.BaseModel):
    type: str
    text: str


@pytest.mark.parametrize("params", [Renamed, Dated, Outer])
def test_types_that_rename_or_format_are_left_to_the_sdk(params: type) -> None:
    assert not model_requests.carries_no_transform(params)


@pytest.mark.parametrize(
    ("params", "body"),
    [
        (Renamed, {"card_id": "c-1"}),
        (Outer, {"items": [{"card_id": "c-2"}, {"when": datetime(2026, 1, 2, tzinfo=UTC)}], "note": "n"}),
        # Chat params, but values that are not plain JSON: a model, a tuple, an omitted value inside.
        (
            completion_create_params.CompletionCreateParamsNonStreaming,
            {"model": "m", "messages": [{"role": "user", "content": [Part(type="text", text="hi")]}]},
        ),
        (
            completion_create_params.CompletionCreateParamsNonStreaming,
            {"model": "m", "messages": ({"role": "user", "content": "hi"},)},
        ),
        (
            completion_create_params.CompletionCreateParamsNonStreaming,
            {"model": "m", "messages": [{"role": "user", "content": "hi", "name": openai.omit}]},
        ),
    ],
)
async def test_what_the_sdk_would_change_goes_through_the_sdk(params: type, body: dict[str, Any]) -> None:
    before = model_requests.calls["sdk"]
    assert await model_requests.maybe_transform(body, params) == await async_maybe_transform(body, params)
    assert model_requests.calls["sdk"] == before + 1


async def test_omitted_parameters_are_dropped_as_the_sdk_drops_them() -> None:
    params = completion_create_params.CompletionCreateParamsStreaming
    body = {"model": "m", "stream": True, "messages": [], "temperature": openai.omit, "n": openai.NOT_GIVEN}
    ours = await model_requests.maybe_transform(body, params)
    assert ours == await async_maybe_transform(body, params) == {"model": "m", "stream": True, "messages": []}
    assert list(ours) == ["model", "stream", "messages"]
