"""The offline model through the real client path: ChatOpenAI -> HTTP -> simulator."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from agentserve.offline_model import serve_offline_model


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return expression


def _model(url: str, **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(model="offline-model", api_key=SecretStr("offline"), base_url=url, max_retries=0, **kwargs)


async def _stream(model: Any, messages: list[BaseMessage]) -> tuple[list[AIMessageChunk], list[float]]:
    chunks: list[AIMessageChunk] = []
    arrivals: list[float] = []
    async for chunk in model.astream(messages):
        chunks.append(chunk)
        arrivals.append(time.perf_counter())
    return chunks, arrivals


def _aggregate(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


@pytest.mark.asyncio
async def test_tool_call_then_tool_result_answer() -> None:
    async with serve_offline_model() as url:
        model = _model(url).bind_tools([calculator])
        question = HumanMessage("What is 12 * 8?")
        first = await model.ainvoke([question])
        assert isinstance(first, AIMessage)
        assert [(c["name"], c["args"]) for c in first.tool_calls] == [("calculator", {"expression": "12 * 8"})]
        result = ToolMessage("96", tool_call_id=first.tool_calls[0]["id"])
        second = await model.ainvoke([question, first, result])
        assert second.content == "The answer is 96."
        assert not second.tool_calls


@pytest.mark.asyncio
async def test_other_expressions_and_tool_results() -> None:
    async with serve_offline_model() as url:
        model = _model(url).bind_tools([calculator])
        for text, expression in [("compute (3+4)*2", "(3+4)*2"), ("what is 9**9**9", "9**9**9")]:
            reply = await model.ainvoke([HumanMessage(text)])
            assert reply.tool_calls[0]["args"] == {"expression": expression}
        first = await model.ainvoke([HumanMessage("what is 9**9**9")])
        error = ToolMessage("Error: exponent too large", tool_call_id=first.tool_calls[0]["id"])
        reply = await model.ainvoke([HumanMessage("what is 9**9**9"), first, error])
        assert reply.content == "I could not complete that: Error: exponent too large"
        no_tools = await _model(url).ainvoke([HumanMessage("What is 12 * 8?")])
        assert no_tools.content == "You said: What is 12 * 8?"


@pytest.mark.asyncio
async def test_refund_and_datetime_tools() -> None:
    @tool
    def issue_refund(order_id: str, amount: float) -> str:
        """Refund an order."""
        return "ok"

    @tool
    def current_datetime() -> str:
        """Current date and time."""
        return "now"

    async with serve_offline_model() as url:
        model = _model(url).bind_tools([calculator, issue_refund, current_datetime])
        refund = await model.ainvoke([HumanMessage("Please refund order A-1001 for 25.50")])
        assert refund.tool_calls[0]["name"] == "issue_refund"
        assert refund.tool_calls[0]["args"] == {"order_id": "A-1001", "amount": 25.5}
        clock = await model.ainvoke([HumanMessage("What is the date today?")])
        assert [(c["name"], c["args"]) for c in clock.tool_calls] == [("current_datetime", {})]
        found = await model.ainvoke(
            [
                HumanMessage("What time is it?"),
                clock,
                ToolMessage("2024-05-01T10:00", tool_call_id=clock.tool_calls[0]["id"]),
            ]
        )
        assert found.content == "Here is what I found: 2024-05-01T10:00"
        none = await _model(url).bind_tools([calculator], tool_choice="none").ainvoke([HumanMessage("What is 1+1?")])
        assert none.content == "You said: What is 1+1?"


@pytest.mark.asyncio
async def test_streaming_text_matches_non_streaming_with_usage() -> None:
    async with serve_offline_model() as url:
        model = _model(url, stream_usage=True)
        messages: list[BaseMessage] = [HumanMessage("hello there, how are you doing today?")]
        whole = await model.ainvoke(messages)
        chunks, _ = await _stream(model, messages)
        assert len([c for c in chunks if c.content]) >= 3
        total = _aggregate(chunks)
        assert total.content == whole.content == "You said: hello there, how are you doing today?"
        assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] > 0
        assert total.usage_metadata["total_tokens"] == whole.usage_metadata["total_tokens"]  # type: ignore[index]


@pytest.mark.asyncio
async def test_streamed_tool_call_aggregates_to_parsed_args() -> None:
    async with serve_offline_model() as url:
        model = _model(url).bind_tools([calculator])
        chunks, _ = await _stream(model, [HumanMessage("What is (12 + 30) * 8?")])
        total = _aggregate(chunks)
        assert len(chunks) > 3
        assert [(c["name"], c["args"]) for c in total.tool_calls] == [("calculator", {"expression": "(12 + 30) * 8"})]
        assert total.response_metadata.get("finish_reason") == "tool_calls"


@pytest.mark.asyncio
async def test_dangling_tool_call_is_rejected_like_openai() -> None:
    dangling = AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": "1+1"}, "id": "call_1"}])
    async with serve_offline_model() as url:
        with pytest.raises(openai.BadRequestError) as caught:
            await _model(url).ainvoke([HumanMessage("What is 1+1?"), dangling, HumanMessage("hello?")])
    assert caught.value.status_code == 400
    assert "call_1" in str(caught.value) and "must be followed by tool messages" in str(caught.value)


@pytest.mark.asyncio
async def test_failure_injection() -> None:
    async with serve_offline_model(failure_rate=1.0, seed=1) as url:
        model = _model(url)
        kinds = set()
        for _ in range(10):
            with pytest.raises((openai.InternalServerError, openai.RateLimitError)) as caught:
                await model.ainvoke([HumanMessage("hi")])
            kinds.add(caught.value.status_code)
        assert kinds == {429, 500}
        with pytest.raises((openai.InternalServerError, openai.RateLimitError)):
            async for _ in model.astream([HumanMessage("hi")]):
                pass
    async with serve_offline_model(failure_rate=0.3, seed=7) as url:
        model, failures = _model(url), 0
        for _ in range(50):
            try:
                await model.ainvoke([HumanMessage("hi")])
            except (openai.InternalServerError, openai.RateLimitError):
                failures += 1
        assert 0.1 <= failures / 50 <= 0.5
        async with httpx.AsyncClient() as client:
            stats = (await client.get(url.removesuffix("/v1") + "/admin/stats")).json()
        assert stats == {"calls": 50, "failures": failures}


@pytest.mark.asyncio
async def test_rate_limit_response_shape_and_runtime_faults() -> None:
    async with serve_offline_model() as url, httpx.AsyncClient(base_url=url.removesuffix("/v1")) as client:
        body = {"model": "offline-model", "messages": [{"role": "user", "content": "hi"}]}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        faults = await client.post("/admin/faults", json={"failure_rate": 1.0, "latency_ms": 0})
        assert faults.json() == {"latency_ms": 0.0, "failure_rate": 1.0}
        statuses = set()
        for _ in range(20):
            response = await client.post("/v1/chat/completions", json=body)
            statuses.add(response.status_code)
            assert (
                response.json()["error"]["type"] == {500: "server_error", 429: "rate_limit_error"}[response.status_code]
            )
            if response.status_code == 429:
                assert response.headers["retry-after"] == "0"
        assert statuses == {429, 500}
        assert (await client.post("/admin/faults", json={"failure_rate": 2})).status_code == 400
        assert (await client.get("/admin/stats")).json() == {"calls": 21, "failures": 20}


@pytest.mark.asyncio
async def test_latency_and_time_to_first_token() -> None:
    async with serve_offline_model(latency_ms=200) as url:
        model = _model(url)
        started = time.perf_counter()
        await model.ainvoke([HumanMessage("hi")])
        assert time.perf_counter() - started >= 0.18
        started = time.perf_counter()
        chunks, arrivals = await _stream(model, [HumanMessage("one two three four five six")])
        assert arrivals[0] - started >= 0.08
        assert arrivals[-1] - arrivals[0] >= 0.05
        assert arrivals[-1] - started >= 0.18


@pytest.mark.asyncio
async def test_recall_name_and_plain_replies() -> None:
    async with serve_offline_model() as url:
        model = _model(url)

        async def say(*texts: str) -> str:
            reply = await model.ainvoke([HumanMessage(text) for text in texts])
            assert isinstance(reply.content, str)
            return reply.content

        assert await say("What did I ask?") == "You have not said anything before this."
        assert await say("hi", "my name is Ada Lovelace", "what did I say?") == (
            'Earlier you said: "hi"; "my name is Ada Lovelace"'
        )
        assert await say("my name is Bob.") == "Nice to meet you, Bob."
        assert await say("My name is Bob", "ok", "What is my name?") == "Your name is Bob."
        assert await say("What is my name?") == "I don't know your name yet."
        assert await say("x" * 300) == "You said: " + "x" * 200
        parts = await model.ainvoke([HumanMessage(content=[{"type": "text", "text": "from parts"}])])
        assert parts.content == "You said: from parts"


@pytest.mark.asyncio
async def test_bad_bodies_and_models_endpoint() -> None:
    async with serve_offline_model() as url, httpx.AsyncClient(base_url=url) as client:
        missing = await client.post("/chat/completions", json={"model": "offline-model"})
        assert missing.status_code == 400
        error = missing.json()["error"]
        assert error == {**error, "type": "invalid_request_error", "param": "messages", "code": None}
        assert error["message"]
        not_json = await client.post(
            "/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
        orphan = {"model": "m", "messages": [{"role": "tool", "content": "1", "tool_call_id": "x"}]}
        assert (await client.post("/chat/completions", json=orphan)).status_code == 400
        models = (await client.get("/models")).json()
        assert [m["id"] for m in models["data"]] == ["offline-model"]


@pytest.mark.asyncio
async def test_raw_stream_wire_format() -> None:
    body = {
        "model": "offline-model",
        "messages": [{"role": "user", "content": "one two three"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with serve_offline_model() as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == "You said: one two three"
