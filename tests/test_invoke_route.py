"""Our one-pass POST /agent/invoke against LangServe's own invoke handler: the same
input and config reach the runnable, the same bytes reach the caller, and
LangServe's handler is not what answered."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from langchain_core.messages import HumanMessage
from langserve.api_handler import APIHandler, _json_encode_response
from langserve.schema import InvokeResponseMetadata
from starlette.requests import Request

from agentserve.edges.langserve.admission import checked_turns
from agentserve.edges.langserve.invoke import SERIALIZER, invoke_config, invoke_input
from agentserve.edges.langserve.runnable import AgentRunnable
from agentserve.settings import Settings
from app import create_app
from bench.breakdown import posted_request
from tests.support import TEST_KEY, turn_body


def langserve_handler(app: Any) -> APIHandler:
    """The handler add_routes made for /agent (its invoke endpoint closes over it;
    the other route at that path only documents it)."""
    routes = [r for r in app.routes if isinstance(r, APIRoute) and r.path == "/agent/invoke"]
    [route] = [r for r in routes if not r.include_in_schema]
    handler = inspect.getclosurevars(route.endpoint).nonlocals["api_handler"]
    assert isinstance(handler, APIHandler)
    return handler


def admitted_request(app: Any, body: dict[str, Any], headers: dict[str, str]) -> Request:
    """POST /agent/invoke as the route sees it once admission has given the run."""
    request = posted_request(app, body, headers, tenant="acme")
    request.state.run_ids = {body["config"]["configurable"]["thread_id"]: "run-0123"}
    return request


def remote_runnable_body(thread: str) -> dict[str, Any]:
    """What langserve.RemoteRunnable sends: messages in LangChain's serialization and
    the whole config `ensure_config` makes (tags, metadata, recursion limit)."""
    message = SERIALIZER.dumpd(HumanMessage('héllo ✓ "quoted"\nnext line', name="Ana"))
    config = {"tags": ["mine"], "metadata": {"k": "v"}, "recursion_limit": 25, "run_name": "x"}
    return {"input": {"messages": [message]}, "config": {**config, "configurable": {"thread_id": thread}}, "kwargs": {}}


BODIES = [
    turn_body("hello", "t-plain"),
    remote_runnable_body("t-remote"),
    {
        "input": {"messages": [{"role": "user", "content": [{"type": "text", "text": "a list"}]}]},
        "config": {"configurable": {"thread_id": "t-list"}},
    },
    {
        "input": {"messages": [{"type": "human", "content": "two"}, {"type": "human", "content": "msgs"}]},
        "config": {"configurable": {"thread_id": "t-two"}},
    },
    {"input": {"resume": {"approved": True}}, "config": {"configurable": {"thread_id": "t-yes"}}},
    {"input": {"resume": {"approved": False, "reason": "dup"}}, "config": {"configurable": {"thread_id": "t-no"}}},
    {"input": {"resume": [{"type": "accept"}]}, "config": {"configurable": {"thread_id": "t-hitl"}}},
]


@pytest.mark.parametrize("headers", [{}, {"User-Agent": "k6/0.50 (https://k6.io/)"}])
@pytest.mark.parametrize("body", BODIES, ids=[b["config"]["configurable"]["thread_id"] for b in BODIES])
async def test_the_runnable_gets_langserves_input_and_config(body: dict[str, Any], headers: dict[str, str]) -> None:
    app = create_app(Settings(_env_file=None, AGENT_API_KEY=TEST_KEY))  # type: ignore[call-arg]
    app.state.settings = Settings(_env_file=None, AGENT_API_KEY=TEST_KEY)  # type: ignore[call-arg]
    theirs_config, theirs_input = await langserve_handler(app)._get_config_and_input(
        admitted_request(app, body, headers), "", endpoint="invoke"
    )
    request = admitted_request(app, body, headers)
    turns, [turn] = await checked_turns(request, "invoke")
    ours_config, ours_input = invoke_config(request, "/agent", turns[0][0]), invoke_input(turn)
    assert ours_input == theirs_input
    for config in (ours_config, theirs_config):
        assert uuid.UUID(str(config.pop("run_id")))
    assert ours_config == theirs_config
    assert ours_config["configurable"] == {"thread_id": turns[0][0], "tenant": "acme", "run_id": "run-0123"}


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    settings = Settings(_env_file=None, DATABASE_URL=database_url, AGENT_API_KEY=TEST_KEY)  # type: ignore[call-arg]
    with TestClient(create_app(settings), headers={"X-API-Key": TEST_KEY}) as test_client:
        yield test_client


def test_the_caller_gets_langserves_bytes_for_every_kind_of_turn(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs: list[tuple[Any, str]] = []
    their_calls: list[object] = []
    real_ainvoke, real_handler_invoke = AgentRunnable.ainvoke, APIHandler.invoke

    async def recording(self: AgentRunnable, input: Any, config: Any = None, **kwargs: Any) -> Any:
        output = await real_ainvoke(self, input, config, **kwargs)
        outputs.append((output, config["run_id"]))
        return output

    async def theirs(self: APIHandler, *args: Any, **kwargs: Any) -> Any:
        their_calls.append(args)
        return await real_handler_invoke(self, *args, **kwargs)

    monkeypatch.setattr(AgentRunnable, "ainvoke", recording)
    monkeypatch.setattr(APIHandler, "invoke", theirs)
    thread = f"bytes-{uuid.uuid4().hex[:8]}"
    resume = {"config": {"configurable": {"thread_id": thread}}}
    bodies = [
        turn_body("hello there", thread),
        turn_body('unicode é ✓ 漢字 "quotes" \\ back\nslash', thread),
        remote_runnable_body(thread),
        turn_body("What is 12 * 8?", thread),
        turn_body("What is 1 / 0?", thread),
        turn_body("my name is Ana María", thread),
        turn_body("Please refund order B-Ñ77 for 12.5", thread),
        {"input": {"resume": {"approved": True}}, **resume},
        turn_body("Please refund order Z-1 for 10000", thread),
        {"input": {"resume": {"approved": False, "reason": "duplicate ✗"}}, **resume},
    ]
    responses = []
    for body in bodies:
        response = client.post("/agent/invoke", json=body)
        assert response.status_code == 200, response.text
        responses.append(response)
    assert len(outputs) == len(bodies) and their_calls == []
    handler = langserve_handler(client.app)
    shapes = set()
    for response, (output, run_id) in zip(responses, outputs, strict=True):
        theirs_response = _json_encode_response(
            handler._InvokeResponse(
                output=handler._serializer.dumpd(output),
                callback_events=[],
                metadata=InvokeResponseMetadata(run_id=run_id, feedback_tokens=[]),
            )
        )
        assert response.content == theirs_response.body
        assert response.headers["content-type"] == theirs_response.headers["content-type"]
        shapes |= {m["type"] for m in response.json()["output"]["messages"]}
        shapes |= {"interrupt"} if "__interrupt__" in response.json()["output"] else set()
    assert shapes == {"ai", "tool", "interrupt"}
