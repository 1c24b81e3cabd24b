"""Human approval of refunds through the real app: pause, inspect, approve or reject."""

from __future__ import annotations

import json
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
    value, args = pending["value"], {"order_id": "A-1001", "amount": 25.5}
    assert (value["action"], value["args"]) == ("issue_refund", args)
    # What the Chat UI inboxes render: LangGraph's HumanInterrupt and LangChain's HITL request.
    assert value["action_request"] == {"action": "issue_refund", "args": args}
    assert value["config"] == {"allow_accept": True, "allow_edit": True, "allow_respond": True, "allow_ignore": True}
    assert value["action_requests"][0]["name"] == "issue_refund" and value["review_configs"]
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
        {"resume": [{"type": "edit", "args": {"args": {"order_id": "A-1", "amount": 20000}}}]},
        {"resume": [{"type": "edit", "args": {"args": {"order_id": "A-1", "amount": "lots"}}}]},
        {"resume": [{"type": "maybe"}]},
        {"resume": [{"type": "accept"}, {"type": "accept"}]},
        {"resume": {"decisions": [{"type": "approve"}, {"type": "reject"}]}},
        {
            "resume": {
                "decisions": [{"type": "edit", "edited_action": {"name": "issue_refund", "args": {"amount": -1}}}]
            }
        },
        {"messages": [{"role": "user", "content": "x"}], "resume": {"approved": True}},
        {},
    ],
)
def test_malformed_decisions_are_422(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/agent/invoke", json={"input": body, "config": {"configurable": {"thread_id": "r-bad"}}})
    assert response.status_code == 422, response.text


DECISIONS = [
    ([{"type": "accept", "args": None}], "issued", 25.5),
    (
        [{"type": "edit", "args": {"action": "issue_refund", "args": {"order_id": "{order}", "amount": "12.5"}}}],
        "issued",
        12.5,
    ),
    ([{"type": "response", "args": "not eligible"}], "not eligible", None),
    ([{"type": "ignore", "args": None}], "rejected", None),
    ({"decisions": [{"type": "approve"}]}, "issued", 25.5),
    (
        {"decisions": [{"type": "edit", "edited_action": {"name": "issue_refund", "args": {"amount": 7}}}]},
        "issued",
        7.0,
    ),
    ({"decisions": [{"type": "reject", "message": "too late"}]}, "too late", None),
]


@pytest.mark.parametrize(("answer", "says", "paid"), DECISIONS)
def test_every_ui_answer_is_understood_and_pays_at_most_once(
    client: TestClient, database_url: str, answer: Any, says: str, paid: float | None
) -> None:
    order = f"UI-{abs(hash(str(answer))) % 10**8}"
    thread = f"ui-{order}"
    pause(client, thread, order)
    resume = json.loads(json.dumps(answer).replace("{order}", order))
    response = client.post(
        "/agent/invoke", json={"input": {"resume": resume}, "config": {"configurable": {"thread_id": thread}}}
    )
    assert response.status_code == 200, response.text
    assert says in response.json()["output"]["messages"][-1]["content"]
    assert [float(r[0]) for r in refunds(database_url, order)] == ([paid] if paid else [])
