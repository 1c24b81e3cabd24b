"""Offline model: a stand-in provider speaking the OpenAI Chat Completions wire protocol.

Owns the simulated model used when no OPENAI_API_KEY is set and in tests, benchmarks and
load tests. Serves ``POST /v1/chat/completions`` (JSON or SSE, tool calls, usage) and
``GET /v1/models``, so ``ChatOpenAI`` and the ``openai`` SDK run unchanged against it.
Faults, also settable via ``POST /admin/faults`` (``GET /admin/stats`` counts calls and
injected failures): ``latency_ms`` per call (streaming: half before the first chunk, the
rest spread over the chunks) and a seeded ``failure_rate`` (500 ``server_error`` or 429
``rate_limit_error`` with ``retry-after: 0``, before any body). Like OpenAI it answers 400
to malformed bodies, to assistant ``tool_calls`` not answered by the ``tool`` messages
right after them, and to ``tool`` messages that answer no such call.

Behaviour (deterministic; tests rely on it). Content may be a string or text parts.
A thread ending in tool messages gets one sentence per result <r> (joined by spaces):
``I could not complete that: <r>`` if r starts "Error" or contains "rejected", else
``The answer is <r>.`` for ``calculator``, else ``Here is what I found: <r>``.
Otherwise, on the last user message ("earlier": the user messages before it), the first
matching rule wins; tool rules need the tool offered and tool_choice other than "none":

1. "refund order <ID> ... <amount>" -> issue_refund {"order_id": "<ID>", "amount": <float>}
2. arithmetic (digits, + - * / ** %, parentheses; at least one operator), e.g. "12 * 8"
   in "What is 12 * 8?" -> calculator {"expression": "12 * 8"}
3. the word "date", "time" or "today" -> current_datetime {}
4. "what did I ask/say", "recall", "remember" -> ``Earlier you said: "<m1>"; "<m2>"``
   (every earlier user message, in order), or ``You have not said anything before this.``
5. "what is my name" -> ``Your name is <X>.`` (latest earlier "my name is <X>") or
   ``I don't know your name yet.``; "my name is <X>" -> ``Nice to meet you, <X>.``
   (X: the next word plus any capitalised words after it)
6. otherwise ``You said: <text>`` (first 200 characters).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

MODEL_ID = "offline-model"
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_EXPRESSION = re.compile(r"(?<![\w.])-?[\d(][\d\s.()+\-*/%]*[\d)]")
_OPERATOR = re.compile(r"[+\-*/%]")
_DATETIME = re.compile(r"\b(?:date|time|today)\b", re.I)
_REFUND = re.compile(r"refund\s+order\s+([A-Za-z0-9][\w-]*)\D*?(\d+(?:\.\d+)?)", re.I)
_RECALL = re.compile(r"what did i (?:ask|say)|\brecall\b|\bremember\b", re.I)
_NAME_IS = re.compile(r"(?i:\bmy name is)\s+([A-Za-z][\w'-]*(?:\s+[A-Z][\w'-]*)*)")
_NAME_QUESTION = re.compile(r"\bwhat(?:\s+is|'s)\s+my\s+name\b", re.I)
_WORDISH = re.compile(r"\S+\s*|\s+")
_ARGUMENT_PIECE_CHARS = 8  # OpenAI streams arguments in small fragments


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass
class _State:
    latency_ms: float
    failure_rate: float
    rng: random.Random
    calls: int = 0
    failures: int = 0


@dataclass
class _Reply:
    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _validate(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _BadRequest("We could not parse the JSON body of your request: expected a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _BadRequest("Missing required parameter: 'model'.", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("Missing required parameter: 'messages'.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _BadRequest(f"Invalid value for 'messages[{i}].role'.", f"messages.[{i}].role")
        content, calls = message.get("content"), message.get("tool_calls") or []
        if not isinstance(content, str | list) and not (content is None and message["role"] == "assistant"):
            raise _BadRequest(f"Invalid type for 'messages[{i}].content'.", f"messages.[{i}].content")
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in calls):
            raise _BadRequest(f"Invalid value for 'messages[{i}].tool_calls'.", f"messages.[{i}].tool_calls")
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise _BadRequest("Invalid 'tools': expected an array of function tools.", "tools")
    n = body.get("n") or 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise _BadRequest("Invalid 'n': expected an integer between 1 and 128.", "n")
    _check_tool_replies(messages)
    return body


def _check_tool_replies(messages: list[dict[str, Any]]) -> None:
    awaiting: list[str] = []
    answerable: set[str] = set()
    asked_at = 0
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            if message.get("tool_call_id") not in answerable:
                raise _BadRequest(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                    "message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            awaiting = [call_id for call_id in awaiting if call_id != message["tool_call_id"]]
            continue
        if awaiting:
            break
        call_ids = [c["id"] for c in message.get("tool_calls") or []] if message["role"] == "assistant" else []
        awaiting, answerable, asked_at = list(call_ids), set(call_ids), i
    if awaiting:
        raise _BadRequest(
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
            f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(awaiting)}",
            f"messages.[{asked_at}].role",
        )


def _decide(body: dict[str, Any]) -> _Reply:
    messages: list[dict[str, Any]] = body["messages"]
    trailing = list(itertools.takewhile(lambda m: m["role"] == "tool", reversed(messages)))[::-1]
    if trailing:
        names = {c["id"]: (c.get("function") or {}).get("name") for m in messages for c in m.get("tool_calls") or []}
        answers = [
            _after_tool(names.get(m["tool_call_id"]) or m.get("name"), _text(m.get("content"))) for m in trailing
        ]
        return _Reply(content=" ".join(answers))
    users = [_text(m.get("content")) for m in messages if m["role"] == "user"]
    offered = set() if body.get("tool_choice") == "none" else {t["function"]["name"] for t in body.get("tools") or []}
    return _respond(users[-1] if users else "", users[:-1], offered)


def _after_tool(tool_name: str | None, result: str) -> str:
    if result.startswith("Error") or "rejected" in result:
        return f"I could not complete that: {result}"
    if tool_name == "calculator":
        return f"The answer is {result}."
    return f"Here is what I found: {result}"


def _respond(text: str, earlier: list[str], offered: set[str]) -> _Reply:
    refund = _REFUND.search(text)
    if refund and "issue_refund" in offered:
        return _call("issue_refund", {"order_id": refund[1], "amount": float(refund[2])})
    expression = _expression(text)
    if expression and "calculator" in offered:
        return _call("calculator", {"expression": expression})
    if _DATETIME.search(text) and "current_datetime" in offered:
        return _call("current_datetime", {})
    if _RECALL.search(text):
        if not earlier:
            return _Reply("You have not said anything before this.")
        return _Reply("Earlier you said: " + "; ".join(f'"{said}"' for said in earlier))
    if _NAME_QUESTION.search(text):
        names = [match[1] for said in earlier if (match := _NAME_IS.search(said))]
        return _Reply(f"Your name is {names[-1]}." if names else "I don't know your name yet.")
    if name := _NAME_IS.search(text):
        return _Reply(f"Nice to meet you, {name[1]}.")
    return _Reply(f"You said: {text[:200]}")


def _expression(text: str) -> str | None:
    for match in _EXPRESSION.finditer(text):
        expression = match.group().strip()
        # The character class also swallows prose parentheses, e.g. "(see 3+4)".
        while expression.endswith(")") and expression.count(")") > expression.count("("):
            expression = expression[:-1].rstrip()
        while expression.startswith("(") and expression.count("(") > expression.count(")"):
            expression = expression[1:].lstrip()
        if _OPERATOR.search(expression.lstrip("-")):
            return expression
    return None


def _call(name: str, arguments: dict[str, Any]) -> _Reply:
    function = {"name": name, "arguments": json.dumps(arguments)}
    return _Reply(tool_calls=[{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}])


def _usage(body: dict[str, Any], reply: _Reply, n: int) -> dict[str, int]:
    prompt_chars = sum(len(_text(m.get("content")) + json.dumps(m.get("tool_calls") or "")) for m in body["messages"])
    calls = "".join(c["function"]["name"] + c["function"]["arguments"] for c in reply.tool_calls)
    completion_chars = len((reply.content or "") + calls)
    prompt, completion = math.ceil(prompt_chars / 4), math.ceil(completion_chars / 4) * n
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(body: dict[str, Any], reply: _Reply, n: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    finish = "tool_calls" if reply.tool_calls else "stop"
    choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": finish} for i in range(n)]
    return _head("chat.completion", body) | {"choices": choices, "usage": _usage(body, reply, n)}


def _head(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    created = int(time.time())
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": created, "model": body["model"]}


def _deltas(reply: _Reply) -> list[dict[str, Any]]:
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "" if reply.content else None, "refusal": None}]
    deltas += [{"content": token} for token in _WORDISH.findall(reply.content or "")]
    for index, call in enumerate(reply.tool_calls):
        function = {"name": call["function"]["name"], "arguments": ""}
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function", "function": function}]})
        arguments = call["function"]["arguments"]
        for start in range(0, len(arguments), _ARGUMENT_PIECE_CHARS):
            piece = arguments[start : start + _ARGUMENT_PIECE_CHARS]
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    return deltas


def _chunks(body: dict[str, Any], reply: _Reply, n: int) -> list[dict[str, Any]]:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base = _head("chat.completion.chunk", body) | ({"usage": None} if include_usage else {})
    finish = "tool_calls" if reply.tool_calls else "stop"
    chunks = [
        base | {"choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        for i in range(n)
        for delta, reason in [*((d, None) for d in _deltas(reply)), ({}, finish)]
    ]
    if include_usage:
        chunks.append(base | {"choices": [], "usage": _usage(body, reply, n)})
    return chunks


async def _sse(chunks: list[dict[str, Any]], delay_s: float) -> AsyncIterator[str]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
        if delay_s:
            await asyncio.sleep(delay_s)
    yield "data: [DONE]\n\n"


def _error(status: int, message: str, kind: str, param: str | None = None, **headers: str) -> JSONResponse:
    code = "rate_limit_exceeded" if status == 429 else None
    payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(payload, status_code=status, headers={k.replace("_", "-"): v for k, v in headers.items()})


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def create_offline_model_app(latency_ms: float = 0.0, failure_rate: float = 0.0, seed: int | None = None) -> Starlette:
    state = _State(latency_ms=latency_ms, failure_rate=failure_rate, rng=random.Random(seed))

    async def chat_completions(request: Request) -> Response:
        state.calls += 1
        try:
            body = _validate(await _json(request))
        except _BadRequest as exc:
            return _error(400, exc.message, "invalid_request_error", exc.param)
        latency_s = state.latency_ms / 1000
        if state.rng.random() < state.failure_rate:
            state.failures += 1
            await asyncio.sleep(latency_s)
            if state.rng.random() < 0.5:
                message = "The server had an error while processing your request. Sorry about that!"
                return _error(500, message, "server_error")
            message = f"Rate limit reached for {MODEL_ID} (simulated). Please try again in 0s."
            return _error(429, message, "rate_limit_error", retry_after="0")
        reply, n = _decide(body), body.get("n") or 1
        if not body.get("stream"):
            await asyncio.sleep(latency_s)
            return JSONResponse(_completion(body, reply, n))
        chunks = _chunks(body, reply, n)
        await asyncio.sleep(latency_s / 2)
        return StreamingResponse(_sse(chunks, latency_s / 2 / len(chunks)), media_type="text/event-stream")

    async def list_models(request: Request) -> Response:
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "agentserve"}
        return JSONResponse({"object": "list", "data": [model]})

    async def set_faults(request: Request) -> Response:
        body = await _json(request)
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.", "invalid_request_error")
        for key, upper in (("latency_ms", math.inf), ("failure_rate", 1.0)):
            value = body.get(key, 0)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= upper:
                return _error(400, f"Invalid '{key}'.", "invalid_request_error", key)
        state.latency_ms = float(body.get("latency_ms", state.latency_ms))
        state.failure_rate = float(body.get("failure_rate", state.failure_rate))
        return JSONResponse({"latency_ms": state.latency_ms, "failure_rate": state.failure_rate})

    async def stats(request: Request) -> Response:
        return JSONResponse({"calls": state.calls, "failures": state.failures})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/admin/faults", set_faults, methods=["POST"]),
            Route("/admin/stats", stats, methods=["GET"]),
        ]
    )


class _EmbeddedServer(uvicorn.Server):
    # The host process (e.g. the service's own uvicorn) owns SIGINT/SIGTERM; an
    # embedded server must not replace its handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_offline_model(
    latency_ms: float = 0.0, failure_rate: float = 0.0, seed: int | None = None
) -> AsyncIterator[str]:
    app = create_offline_model_app(latency_ms=latency_ms, failure_rate=failure_rate, seed=seed)
    async with serve_in_loop(app) as base:
        yield f"{base}/v1"


@contextlib.asynccontextmanager
async def serve_in_loop(app: ASGIApp) -> AsyncIterator[str]:
    """`app` on a free loopback port, served by the running event loop until the block
    ends; yields its base URL."""
    # No log_config and no log_level: uvicorn would otherwise set up, and turn down,
    # the loggers of the server this runs inside (its own shutdown lines, its format).
    config = uvicorn.Config(
        app, log_level=None, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5
    )
    server = _EmbeddedServer(config)
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets that say they
    # are TCP, and without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("embedded server exited during startup")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the offline OpenAI-compatible model.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    app = create_offline_model_app(latency_ms=args.latency_ms, failure_rate=args.failure_rate, seed=args.seed)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
