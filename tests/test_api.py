"""API tests: the real ASGI app with its lifespan, a real PostgreSQL and the offline model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from agentserve.settings import Settings
from app import create_app
from tests.support import SMOKE_BODY, TEST_KEY, turn_body

OTHER_KEY = "other-tenant-key-0123456789"


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=database_url,
        AGENT_API_KEY=TEST_KEY,
        AGENT_API_KEYS=f"other={OTHER_KEY}",
        OPENAI_API_KEY="",
        MAX_BODY_BYTES=8192,
    )
    with TestClient(create_app(settings), headers={"X-API-Key": TEST_KEY}) as test_client:
        yield test_client


def checkpoints_of(database_url: str, thread_key: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM checkpoints WHERE thread_id = %s", (thread_key,)).fetchone()
    assert row is not None
    return int(row[0])


def answer(response: Any) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["output"]["messages"][-1]["content"])


def test_smoke_test_from_the_deployment_guides_answers_96(client: TestClient) -> None:
    assert "96" in answer(client.post("/agent/invoke", json=SMOKE_BODY))


def test_langchain_message_dicts_are_accepted_too(client: TestClient) -> None:
    body = {
        "input": {"messages": [{"type": "human", "content": "What is 7 * 6?"}]},
        "config": {"configurable": {"thread_id": "lc-dicts"}},
    }
    assert "42" in answer(client.post("/agent/invoke", json=body))


def test_response_carries_only_this_turns_messages(client: TestClient) -> None:
    answer(client.post("/agent/invoke", json=turn_body("my name is Ada", "only-new")))
    second = client.post("/agent/invoke", json=turn_body("what is my name", "only-new"))
    assert answer(second) == "Your name is Ada."
    assert len(second.json()["output"]["messages"]) == 1


def test_authorization_bearer_is_accepted(client: TestClient) -> None:
    response = client.post(
        "/agent/invoke",
        json=turn_body("hello", "bearer"),
        headers={"X-API-Key": "", "Authorization": f"Bearer {TEST_KEY}"},
    )
    assert response.status_code == 200


@pytest.mark.parametrize("headers", [{"X-API-Key": ""}, {"X-API-Key": "wrong-key-that-is-long"}])
def test_missing_or_wrong_key_is_a_json_401_that_never_echoes_the_key(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.post("/agent/invoke", json=SMOKE_BODY, headers=headers)
    assert response.status_code == 401
    assert "API key" in response.json()["detail"]
    assert "wrong-key-that-is-long" not in response.text
    playground = client.get("/agent/playground/", headers=headers, follow_redirects=False)
    assert playground.status_code == 303 and playground.headers["location"].startswith("/signin")


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ({"input": {"messages": [{"role": "user", "content": "hi"}]}}, 400, "thread_id"),
        (
            {"input": {"messages": [{"role": "user", "content": "hi"}]}, "config": {"configurable": {"thread_id": ""}}},
            400,
            "thread_id",
        ),
        (
            {
                "input": {"messages": [{"role": "user", "content": "hi"}]},
                "config": {"configurable": {"thread_id": "bad-1", "checkpoint_id": "1"}},
            },
            400,
            "checkpoint_id",
        ),
        (
            {"input": {"messages": [{"role": "user", "content": "hi"}]}, "config": {"configurable": {"thread_id": 5}}},
            400,
            "thread_id",
        ),
        (
            {
                "input": {"messages": [{"type": "robot", "content": "hi"}]},
                "config": {"configurable": {"thread_id": "bad-1"}},
            },
            422,
            "robot",
        ),
        (
            {
                "input": {"messages": [{"role": "system", "content": "obey"}]},
                "config": {"configurable": {"thread_id": "bad-1"}},
            },
            422,
            "system",
        ),
        ({"input": {"messages": []}, "config": {"configurable": {"thread_id": "bad-1"}}}, 422, "messages"),
        ({"input": {"text": "hi"}, "config": {"configurable": {"thread_id": "bad-1"}}}, 422, "messages"),
        ({"input": "hi", "config": {"configurable": {"thread_id": "bad-1"}}}, 422, "input"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_writes_nothing(
    client: TestClient, database_url: str, body: Any, status: int, names: str
) -> None:
    response = client.post("/agent/invoke", json=body)
    assert response.status_code == status, response.text
    assert names in response.text
    assert checkpoints_of(database_url, "default/bad-1") == 0
    assert client.get("/health").status_code == 200


def test_malformed_json_is_a_400(client: TestClient) -> None:
    response = client.post("/agent/invoke", content=b'{"input": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["detail"]


def test_body_over_the_limit_is_a_413(client: TestClient, database_url: str) -> None:
    body = turn_body("x" * 10_000, "too-big")
    response = client.post("/agent/invoke", json=body)
    assert response.status_code == 413
    assert "larger than 8192 bytes" in response.json()["detail"]
    assert checkpoints_of(database_url, "default/too-big") == 0


def test_batch_runs_one_config_per_input_on_different_threads(client: TestClient) -> None:
    body = {
        "inputs": [
            {"messages": [{"role": "user", "content": "What is 2 + 3?"}]},
            {"messages": [{"role": "user", "content": "my name is Bo"}]},
        ],
        "config": [{"configurable": {"thread_id": "batch-a"}}, {"configurable": {"thread_id": "batch-b"}}],
    }
    response = client.post("/agent/batch", json=body)
    assert response.status_code == 200, response.text
    outputs = response.json()["output"]
    assert "5" in outputs[0]["messages"][-1]["content"]
    assert outputs[1]["messages"][-1]["content"] == "Nice to meet you, Bo."


def test_batch_inputs_on_one_thread_run_in_order_not_raced(client: TestClient) -> None:
    def say(text: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": text}]}

    body = {"inputs": [say("my name is Cy"), say("what is my name")], "config": {"configurable": {"thread_id": "dup"}}}
    response = client.post("/agent/batch", json=body)
    assert response.status_code == 200, response.text
    outputs = response.json()["output"]
    assert outputs[0]["messages"][-1]["content"] == "Nice to meet you, Cy."
    assert outputs[1]["messages"][-1]["content"] == "Your name is Cy."


def test_two_tenants_with_the_same_thread_id_have_unrelated_threads(client: TestClient) -> None:
    answer(client.post("/agent/invoke", json=turn_body("my name is Alice", "shared-name")))
    other = client.post(
        "/agent/invoke", json=turn_body("what is my name", "shared-name"), headers={"X-API-Key": OTHER_KEY}
    )
    assert answer(other) == "I don't know your name yet."


def test_stream_sends_this_turns_messages_then_ends(client: TestClient) -> None:
    with client.stream("POST", "/agent/stream", json=turn_body("What is 6 * 7?", "stream-1")) as response:
        text = "".join(response.iter_text())
    assert response.status_code == 200
    assert "event: data" in text and "The answer is 42." in text and "event: end" in text


def test_stream_events_streams_model_tokens(client: TestClient) -> None:
    with client.stream("POST", "/agent/stream_events", json=turn_body("tell me about tea", "events-1")) as response:
        text = "".join(response.iter_text())
    assert response.status_code == 200
    assert text.count("on_chat_model_stream") >= 2


def test_health_and_ready_are_open_and_say_which_model(client: TestClient) -> None:
    health = client.get("/health", headers={"X-API-Key": ""})
    assert health.status_code == 200
    assert health.json()["offline_model"] is True
    assert client.get("/ready", headers={"X-API-Key": ""}).json() == {"status": "ready"}


def test_openapi_and_docs_describe_the_agent_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for route in ("/agent/invoke", "/agent/batch", "/agent/stream", "/agent/stream_events", "/health", "/ready"):
        assert route in paths
    assert client.get("/docs").status_code == 200


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    response = client.get("/health", headers={"X-Request-ID": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    assert len(client.get("/health").headers["x-request-id"]) == 32


def test_a_run_over_the_time_limit_is_a_504_and_the_server_stays_healthy(database_url: str) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=database_url,
        AGENT_API_KEY=TEST_KEY,
        OFFLINE_MODEL_LATENCY_MS=800,
        RUN_TIMEOUT_S=0.3,
    )
    with TestClient(create_app(settings), headers={"X-API-Key": TEST_KEY}) as slow:
        response = slow.post("/agent/invoke", json=turn_body("hello", "too-slow"))
        assert response.status_code == 504 and "0.3s" in response.json()["detail"]
        assert slow.get("/health").status_code == 200


def test_runs_drop_langserves_unread_event_recording_and_keep_other_handlers() -> None:
    from langchain_core.callbacks import AsyncCallbackManager, StdOutCallbackHandler
    from langserve.callbacks import AsyncEventAggregatorCallback

    from agentserve.edges.langserve.runnable import without_event_recording

    kept, dropped = StdOutCallbackHandler(), AsyncEventAggregatorCallback()
    as_list = without_event_recording({"callbacks": [dropped, kept], "run_name": "x"})
    assert as_list == {"callbacks": [kept], "run_name": "x"}
    manager = AsyncCallbackManager(handlers=[kept, dropped], inheritable_handlers=[kept, dropped])
    stripped = without_event_recording({"callbacks": manager})["callbacks"]
    assert isinstance(stripped, AsyncCallbackManager)
    assert stripped.handlers == [kept] and stripped.inheritable_handlers == [kept]
    assert manager.handlers == [kept, dropped], "the caller's manager is not changed"
    assert without_event_recording(None) == {}


def test_a_worker_freezes_what_startup_built_and_collects_young_garbage_less_often() -> None:
    import gc

    from agentserve.collector import settle_garbage_collector

    before = gc.get_threshold()
    try:
        settle_garbage_collector(50_000)
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == (50_000, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
