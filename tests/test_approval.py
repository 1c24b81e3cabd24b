"""Human approval of refunds through the real app: pause, inspect, approve or reject."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from agentserve.settings import Settings
from app import create_app
from tests.support import TEST_KEY, turn_body


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    settings = Settings(_env_file=None, DATABASE_URL=database_url, AGENT_API_KEY=TEST_KEY)  # type: ignore[call-arg]
    with TestClient(create_app(settings), headers={"X-API-Key": TEST_KEY}) as test_client:
        yield test_client


def resume_body(thread: str, **decision: Any) -> dict[str, Any]:
    return {"input": {"resume": decision}, "config": {"configurable": {"thread_id": thread}}}


def refunds(database_url: str, order_id: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT amount FROM agent_refunds WHERE order_id = %s", (order_id,)).fetchall()


def pause(client: TestClient, thread: str, order_id: str) -> dict[str, Any]:
    response = client.post("/agent/invoke", json=turn_body(f"Please refund order {order_id} for 25.50", thread))
    assert response.status_code == 200, response.text
    return dict(response.json()["output"])


def test_refund_pauses_for_approval_and_shows_the_pending_action(client: TestClient, database_url: str) -> None:
    output = pause(client, "refund-1", "A-1001")
    [pending] = output["__interrupt__"]
    assert pending["value"] == {"action": "issue_refund", "args": {"order_id": "A-1001", "amount": 25.5}}
    state = client.get("/threads/refund-1/state").json()
    assert state["interrupts"][0]["value"]["action"] == "issue_refund"
    assert state["next"] == ["tools"] and state["tasks"][0]["interrupts"] == state["interrupts"]
    assert refunds(database_url, "A-1001") == []


def test_approval_runs_the_tool_once_and_the_agent_answers(client: TestClient, database_url: str) -> None:
    pause(client, "refund-2", "A-1002")
    response = client.post("/agent/invoke", json=resume_body("refund-2", approved=True))
    assert response.status_code == 200, response.text
    messages = response.json()["output"]["messages"]
    assert "issued for order A-1002" in messages[-1]["content"]
    assert [float(r[0]) for r in refunds(database_url, "A-1002")] == [25.5]
    assert client.get("/threads/refund-2/state").json()["interrupts"] == []


def test_rejection_tells_the_model_and_pays_nothing(client: TestClient, database_url: str) -> None:
    pause(client, "refund-3", "A-1003")
    response = client.post("/agent/invoke", json=resume_body("refund-3", approved=False, reason="duplicate claim"))
    tool_result = [m for m in response.json()["output"]["messages"] if m["type"] == "tool"][0]
    assert "rejected" in tool_result["content"] and "duplicate claim" in tool_result["content"]
    assert refunds(database_url, "A-1003") == []


def test_a_second_refund_of_one_order_pays_nothing_more(client: TestClient, database_url: str) -> None:
    for thread in ("refund-4a", "refund-4b"):
        pause(client, thread, "A-1004")
        client.post("/agent/invoke", json=resume_body(thread, approved=True))
    assert len(refunds(database_url, "A-1004")) == 1


def test_resume_with_nothing_pending_is_a_409(client: TestClient) -> None:
    client.post("/agent/invoke", json=turn_body("hello", "refund-5"))
    response = client.post("/agent/invoke", json=resume_body("refund-5", approved=True))
    assert response.status_code == 409 and "no pending action" in response.json()["detail"]


def test_a_new_message_on_a_paused_thread_is_a_409_saying_what_is_pending(client: TestClient) -> None:
    pause(client, "refund-6", "A-1006")
    response = client.post("/agent/invoke", json=turn_body("hello?", "refund-6"))
    assert response.status_code == 409
    assert "issue_refund" in response.json()["detail"] and "A-1006" in response.json()["detail"]
    # Still resumable afterwards.
    assert client.post("/agent/invoke", json=resume_body("refund-6", approved=True)).status_code == 200


def test_resume_through_stream(client: TestClient) -> None:
    pause(client, "refund-7", "A-1007")
    with client.stream("POST", "/agent/stream", json=resume_body("refund-7", approved=True)) as response:
        text = "".join(response.iter_text())
    assert "issued for order A-1007" in text


@pytest.mark.parametrize(
    "body",
    [
        {"resume": {"approved": "maybe"}},
        {"resume": {}},
        {"messages": [{"role": "user", "content": "x"}], "resume": {"approved": True}},
        {},
    ],
)
def test_malformed_decisions_are_422(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/agent/invoke", json={"input": body, "config": {"configurable": {"thread_id": "r-bad"}}})
    assert response.status_code == 422, response.text
