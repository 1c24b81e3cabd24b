"""End-to-end: the real server (2 workers) as a subprocess, a real PostgreSQL, the
offline model behind the real ChatOpenAI client, spoken to over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langserve import RemoteRunnable

from tests.support import SMOKE_BODY, TEST_KEY, ServerProcess, answer_of, turn_body

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(database_url: str, workdir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(database_url, workdir).start()
    yield process
    process.stop()


def remote(server: ServerProcess) -> RemoteRunnable:
    return RemoteRunnable(f"{server.url}/agent", headers={"X-API-Key": TEST_KEY})


def clients_on_two_workers(server: ServerProcess) -> tuple[httpx.Client, httpx.Client]:
    """Two keep-alive connections that landed on different worker processes."""
    first = server.client()
    first_pid = first.get("/health").json()["worker_pid"]
    for _ in range(60):
        second = server.client()
        if second.get("/health").json()["worker_pid"] != first_pid:
            return first, second
        second.close()
    pytest.fail("all connections landed on one worker")


def test_the_published_curl_smoke_test_works_verbatim(server: ServerProcess) -> None:
    response = httpx.post(
        f"{server.url}/agent/invoke",
        content=(
            '{"input": {"messages": [{"role": "user", "content": "What is 12 * 8?"}]}, '
            '"config": {"configurable": {"thread_id": "smoke-test-001"}}}'
        ),
        headers={"Content-Type": "application/json", "X-API-Key": TEST_KEY},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert "96" in answer_of(response)


def test_the_server_runs_two_workers(server: ServerProcess) -> None:
    assert len(server.worker_pids()) >= 2


def test_second_turn_remembers_first_on_another_worker(server: ServerProcess) -> None:
    first, second = clients_on_two_workers(server)
    try:
        assert answer_of(first.post("/agent/invoke", json=turn_body("my name is Grace", "cross-worker"))) == (
            "Nice to meet you, Grace."
        )
        assert answer_of(second.post("/agent/invoke", json=turn_body("what is my name", "cross-worker"))) == (
            "Your name is Grace."
        )
    finally:
        first.close()
        second.close()


def test_remote_runnable_invoke_stream_and_batch(server: ServerProcess) -> None:
    agent = remote(server)
    result = agent.invoke(
        {"messages": [{"role": "user", "content": "What is 12 * 8?"}]},
        config={"configurable": {"thread_id": "remote-1"}},
    )
    assert isinstance(result["messages"][-1], AIMessage)
    assert "96" in result["messages"][-1].content

    chunks = list(
        agent.stream(
            {"messages": [("human", "what did I ask before?")]}, config={"configurable": {"thread_id": "remote-1"}}
        )
    )
    streamed = [m for chunk in chunks for m in chunk.get("messages", [])]
    assert "What is 12 * 8?" in streamed[-1].content

    outputs = agent.batch(
        [{"messages": [("human", "What is 3 * 3?")]}, {"messages": [("human", "What is 4 * 4?")]}],
        config=[{"configurable": {"thread_id": "remote-b1"}}, {"configurable": {"thread_id": "remote-b2"}}],  # type: ignore[arg-type]
    )
    assert "9" in outputs[0]["messages"][-1].content
    assert "16" in outputs[1]["messages"][-1].content


def test_bad_requests_get_4xx_over_http_and_the_server_stays_healthy(server: ServerProcess) -> None:
    with server.client() as client:
        assert client.post("/agent/invoke", json={"input": SMOKE_BODY["input"]}).status_code == 400
        assert (
            client.post(
                "/agent/invoke",
                json=turn_body("x", "e2e-bad") | {"input": {"messages": [{"type": "tool", "content": "x"}]}},
            ).status_code
            == 422
        )
        assert (
            client.post("/agent/invoke", content=b"{nope", headers={"content-type": "application/json"}).status_code
            == 400
        )
        assert client.post("/agent/invoke", json=turn_body("y" * 300_000, "e2e-bad")).status_code == 413
        assert client.post("/agent/invoke", json=SMOKE_BODY, headers={"X-API-Key": "nope"}).status_code == 401
        # The rejected requests wrote nothing: the thread starts empty.
        recall = client.post("/agent/invoke", json=turn_body("what did I say before?", "e2e-bad"))
        assert answer_of(recall) == "You have not said anything before this."
        assert client.get("/health").status_code == 200


def test_conversation_survives_kill_9_of_the_whole_server(database_url: str, workdir: Path) -> None:
    first = ServerProcess(database_url, workdir).start()
    thread = "survives-kill"
    try:
        with first.client() as client:
            assert answer_of(client.post("/agent/invoke", json=turn_body("my name is Ada", thread))) == (
                "Nice to meet you, Ada."
            )
            assert "96" in answer_of(client.post("/agent/invoke", json=turn_body("What is 12 * 8?", thread)))
            third = answer_of(client.post("/agent/invoke", json=turn_body("what did I say before?", thread)))
            assert third == 'Earlier you said: "my name is Ada"; "What is 12 * 8?"'
    finally:
        first.kill()

    restarted = ServerProcess(database_url, workdir).start()
    try:
        with restarted.client() as client:
            fourth = answer_of(client.post("/agent/invoke", json=turn_body("what did I say before?", thread)))
        assert fourth == ('Earlier you said: "my name is Ada"; "What is 12 * 8?"; "what did I say before?"')
    finally:
        restarted.stop()


def test_a_paused_refund_survives_kill_9_and_resumes_through_remote_runnable(database_url: str, workdir: Path) -> None:
    thread: RunnableConfig = {"configurable": {"thread_id": "refund-kill"}}
    first = ServerProcess(database_url, workdir).start()
    try:
        paused = remote(first).invoke({"messages": [("human", "Please refund order K-9 for 12.00")]}, config=thread)
        assert paused["__interrupt__"][0]["value"]["args"] == {"order_id": "K-9", "amount": 12.0}
    finally:
        first.kill()
    restarted = ServerProcess(database_url, workdir).start()
    try:
        with restarted.client() as client:
            pending = client.get("/threads/refund-kill/state").json()["interrupts"]
            assert pending[0]["value"]["action"] == "issue_refund"
        resumed = remote(restarted).invoke({"resume": {"approved": True}}, config=thread)
        assert "issued for order K-9" in resumed["messages"][-1].content
    finally:
        restarted.stop()
