# The SDKs type their answers as unions of TypedDicts; these tests index them as the JSON they are.
# mypy: disable-error-code="index,arg-type,call-overload,union-attr,var-annotated"
"""The LangGraph Server API end to end: the real server (2 workers) as a subprocess,
real PostgreSQL, spoken to by the real clients (langgraph-sdk, RemoteGraph, the JS
SDK), and the same threads through LangServe's RemoteRunnable."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from langgraph.pregel.remote import RemoteGraph
from langgraph.types import Command
from langgraph_sdk import get_client
from langgraph_sdk.client import LangGraphClient
from langgraph_sdk.errors import ConflictError, NotFoundError
from langserve import RemoteRunnable

from tests.jsclient import js_sdk_available, run_js_scenario
from tests.support import TEST_KEY, ServerProcess

pytestmark = pytest.mark.e2e
BOB_KEY = "bob-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(database_url: str, workdir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        database_url,
        workdir,
        OFFLINE_MODEL_LATENCY_MS="400",
        AGENT_API_KEYS=f"bob={BOB_KEY}",
        THREAD_LEASE_TTL_S="3",
    ).start()
    yield process
    process.stop()


def client_for(server: ServerProcess, key: str = TEST_KEY) -> LangGraphClient:
    return get_client(url=server.url, api_key=key)


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def last_text(values: dict[str, Any]) -> str:
    return str(values["messages"][-1]["content"])


async def status_of(call: Any) -> int:
    """The HTTP status an SDK call failed with (the SDK raises its own error types
    on some routes and httpx's on the streamed ones)."""
    try:
        await call
    except httpx.HTTPStatusError as exc:
        return exc.response.status_code
    return 200


def count(database_url: str, query: str, *params: object) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    return int(row[0]) if row else 0


async def test_assistants_info_and_ok(server: ServerProcess) -> None:
    client = client_for(server)
    found = await client.assistants.search()
    assert [a["graph_id"] for a in found] == ["agent"]
    by_name = await client.assistants.get("agent")
    assert by_name == await client.assistants.get(found[0]["assistant_id"])
    graph = await client.assistants.get_graph("agent")
    assert {"call_model", "tools"} <= {node["id"] for node in graph["nodes"]}
    schemas = await client.assistants.get_schemas("agent")
    assert "messages" in schemas["input_schema"]["properties"]
    with pytest.raises(NotFoundError):
        await client.assistants.get("no-such-graph")
    # Open like /health, so a UI can probe the server before it has a key.
    assert httpx.get(f"{server.url}/info").status_code == 200
    assert httpx.get(f"{server.url}/ok").json() == {"ok": True}


async def test_thread_lifecycle_and_search(server: ServerProcess) -> None:
    client = client_for(server)
    tag = uuid.uuid4().hex
    made = await client.threads.create(metadata={"tag": tag})
    named = await client.threads.create(thread_id=f"named-{tag}", metadata={"tag": tag})
    assert named["thread_id"] == f"named-{tag}"
    with pytest.raises(ConflictError):
        await client.threads.create(thread_id=f"named-{tag}")
    assert (await client.threads.create(thread_id=f"named-{tag}", if_exists="do_nothing"))["thread_id"] == named[
        "thread_id"
    ]
    await client.threads.update(made["thread_id"], metadata={"color": "blue"})
    assert (await client.threads.get(made["thread_id"]))["metadata"] == {"tag": tag, "color": "blue"}
    found = await client.threads.search(metadata={"tag": tag}, limit=10)
    assert {t["thread_id"] for t in found} == {made["thread_id"], named["thread_id"]}
    assert [t["thread_id"] for t in await client.threads.search(metadata={"tag": tag, "color": "blue"})] == [
        made["thread_id"]
    ]
    page = await client.threads.search(metadata={"tag": tag}, limit=1, offset=1, sort_by="created_at", sort_order="asc")
    assert [t["thread_id"] for t in page] == [named["thread_id"]]
    await client.threads.delete(named["thread_id"])
    with pytest.raises(NotFoundError):
        await client.threads.get(named["thread_id"])


async def test_wait_state_history_and_the_stamped_metadata(server: ServerProcess) -> None:
    client = client_for(server)
    thread = await client.threads.create()
    await client.runs.wait(thread["thread_id"], "agent", input=ask("hello"))
    values = await client.runs.wait(thread["thread_id"], "agent", input=ask("What is 12 * 8?"))
    assert isinstance(values, dict) and last_text(values) == "The answer is 96."
    state = await client.threads.get_state(thread["thread_id"])
    assert state["next"] == [] and last_text(state["values"]) == "The answer is 96."
    history = await client.threads.get_history(thread["thread_id"], limit=5)
    # Newest first; one checkpoint per turn (CHECKPOINT_DURABILITY=exit).
    assert len(history) == 2 and history[0]["checkpoint"]["checkpoint_id"] == state["checkpoint"]["checkpoint_id"]
    assert history[1]["checkpoint"]["checkpoint_id"] == history[0]["parent_checkpoint"]["checkpoint_id"]
    assert last_text(history[1]["values"]) == "You said: hello"
    listed = await client.threads.get(thread["thread_id"])
    assert listed["metadata"]["graph_id"] == "agent" and listed["status"] == "idle"
    assert last_text(listed["values"]) == "The answer is 96."
    # The Chat UI's sidebar filter finds threads the JS client made with no metadata.
    assert thread["thread_id"] in {t["thread_id"] for t in await client.threads.search(metadata={"graph_id": "agent"})}
    update = await client.threads.update_state(
        thread["thread_id"], {"messages": [{"type": "human", "content": "noted by hand"}]}, as_node="call_model"
    )
    assert update["checkpoint"]["checkpoint_id"] != state["checkpoint"]["checkpoint_id"]
    assert last_text((await client.threads.get_state(thread["thread_id"]))["values"]) == "noted by hand"
    old = await client.threads.get_state(thread["thread_id"], checkpoint=state["checkpoint"])
    assert last_text(old["values"]) == "The answer is 96."


async def test_tokens_stream_as_messages_events_before_the_run_ends(server: ServerProcess) -> None:
    client = client_for(server)
    thread = await client.threads.create()
    seen: list[tuple[float, str, Any]] = []
    async for part in client.runs.stream(
        thread["thread_id"], "agent", input=ask("What is 12 * 8?"), stream_mode=["values", "messages-tuple"]
    ):
        seen.append((time.monotonic(), part.event, part.data))
    events = [event for _, event, _ in seen]
    assert events[0] == "metadata" and "end" not in events[:-1]
    tokens = [(at, data) for at, event, data in seen if event == "messages" and data[0].get("content")]
    answer_tokens = [data[0]["content"] for _, data in tokens if data[1]["langgraph_node"] == "call_model"]
    assert "".join(answer_tokens).endswith("The answer is 96.") and len(answer_tokens) >= 3
    # Every chunk names its message, and it is the id the final values carry.
    final = next(data for _, event, data in reversed(seen) if event == "values")
    assert {data[0]["id"] for _, data in tokens} <= {m["id"] for m in final["messages"]}
    last_values_at = max(at for at, event, _ in seen if event == "values")
    assert tokens[0][0] < last_values_at - 0.2  # the first token came well before the end
    assert all(data[1]["thread_id"] == thread["thread_id"] for _, data in tokens)


async def test_every_stream_mode_and_unknown_modes_are_422(server: ServerProcess) -> None:
    client = client_for(server)
    thread = await client.threads.create()
    modes = ["values", "updates", "messages-tuple", "events", "custom", "debug"]
    events = [
        part.event
        async for part in client.runs.stream(thread["thread_id"], "agent", input=ask("hi"), stream_mode=modes)
    ]
    assert {"metadata", "values", "updates", "messages", "events", "debug"} <= set(events)
    for mode in ("messages", "tools", "lifecycle", "bogus"):
        response = httpx.post(
            f"{server.url}/threads/{thread['thread_id']}/runs/stream",
            json={"assistant_id": "agent", "input": ask("hi"), "stream_mode": [mode]},
            headers={"x-api-key": TEST_KEY},
        )
        assert response.status_code == 422 and mode in response.text


async def test_create_then_join_and_list(server: ServerProcess) -> None:
    client = client_for(server)
    thread = await client.threads.create()
    run = await client.runs.create(thread["thread_id"], "agent", input=ask("my name is Ada"))
    assert run["status"] in ("pending", "running")
    values = await client.runs.join(thread["thread_id"], run["run_id"])
    assert last_text(values) == "Nice to meet you, Ada."
    assert (await client.runs.get(thread["thread_id"], run["run_id"]))["status"] == "success"
    listed = await client.runs.list(thread["thread_id"])
    assert [r["run_id"] for r in listed] == [run["run_id"]]
    await client.runs.delete(thread["thread_id"], run["run_id"])
    assert await client.runs.list(thread["thread_id"]) == []


async def test_a_dropped_resumable_stream_rejoins_with_no_gap_and_no_duplicate(server: ServerProcess) -> None:
    thread_id = (await client_for(server).threads.create())["thread_id"]
    body = {
        "assistant_id": "agent",
        "input": ask("What is 7 * 6?"),
        "stream_mode": ["values", "messages-tuple"],
        "stream_resumable": True,
    }
    headers = {"x-api-key": TEST_KEY}
    first: list[tuple[int, str]] = []
    with httpx.stream("POST", f"{server.url}/threads/{thread_id}/runs/stream", json=body, headers=headers) as response:
        location = response.headers["location"]
        run_id = response.headers["content-location"].rsplit("/", 1)[-1]
        event, event_id = "", None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                event_id = int(line[4:])
            elif line == "" and event_id is not None:
                first.append((event_id, event))
                if len([e for _, e in first if e == "messages"]) >= 3:
                    break  # drop the connection mid-run
    client = client_for(server)
    rest = [
        (int(part.id), part.event)
        async for part in client.runs.join_stream(thread_id, run_id, last_event_id=str(first[-1][0]))
        if part.id
    ]
    ids = [i for i, _ in first] + [i for i, _ in rest]
    assert ids == list(range(1, len(ids) + 1)), f"gap or duplicate across the rejoin: {first} {rest}"
    assert location == f"/threads/{thread_id}/runs/{run_id}/stream"
    assert rest[-1][1] == "end"
    run = await client.runs.get(thread_id, run_id)
    assert run["status"] == "success"
    # A finished run replays everything with -1 (the JS default), still ending with `end`.
    replay = [part.event async for part in client.runs.join_stream(thread_id, run_id, last_event_id="-1")]
    assert replay[-1] == "end" and replay.count("values") >= 2


async def test_cancel_with_wait_stops_the_run(server: ServerProcess, database_url: str) -> None:
    client = client_for(server)
    thread = await client.threads.create()
    run = await client.runs.create(thread["thread_id"], "agent", input=ask("What is 3 * 3?"))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await client.runs.cancel(thread["thread_id"], run["run_id"], wait=True)
    assert time.monotonic() - started < 2.0
    assert (await client.runs.get(thread["thread_id"], run["run_id"]))["status"] == "interrupted"
    # Nothing of it was stored; the thread takes the next turn.
    state = await client.threads.get_state(thread["thread_id"])
    assert state["values"] == {} or not any(m["type"] == "ai" for m in state["values"].get("messages", []))
    values = await client.runs.wait(thread["thread_id"], "agent", input=ask("hello"))
    assert last_text(values) == "You said: hello"


async def test_reject_is_409_and_enqueue_runs_in_arrival_order(server: ServerProcess) -> None:
    client = client_for(server)
    thread = await client.threads.create()
    first = await client.runs.create(thread["thread_id"], "agent", input=ask("my name is Bo"))
    with pytest.raises(ConflictError):
        await client.runs.create(thread["thread_id"], "agent", input=ask("hi"), multitask_strategy="reject")
    queued = [
        await client.runs.create(thread["thread_id"], "agent", input=ask(text), multitask_strategy="enqueue")
        for text in ("one", "two", "what did I say?")
    ]
    final = await client.runs.join(thread["thread_id"], queued[-1]["run_id"])
    assert last_text(final) == 'Earlier you said: "my name is Bo"; "one"; "two"'
    for run in [first, *queued]:
        assert (await client.runs.get(thread["thread_id"], run["run_id"]))["status"] == "success"


async def test_interrupt_strategy_stops_the_running_run(server: ServerProcess) -> None:
    client = client_for(server)
    thread = await client.threads.create()
    first = await client.runs.create(thread["thread_id"], "agent", input=ask("What is 5 * 5?"))
    await asyncio.sleep(0.2)
    second = await client.runs.create(thread["thread_id"], "agent", input=ask("hello"), multitask_strategy="interrupt")
    assert last_text(await client.runs.join(thread["thread_id"], second["run_id"])) == "You said: hello"
    assert (await client.runs.get(thread["thread_id"], first["run_id"]))["status"] == "interrupted"


async def test_refund_interrupt_resumes_through_command_and_pays_once(server: ServerProcess, database_url: str) -> None:
    client = client_for(server)
    thread = await client.threads.create()
    order = f"LG-{uuid.uuid4().hex[:8]}"
    paused = await client.runs.wait(thread["thread_id"], "agent", input=ask(f"Please refund order {order} for 25"))
    assert paused["__interrupt__"][0]["value"]["args"] == {"order_id": order, "amount": 25.0}
    info = await client.threads.get(thread["thread_id"])
    assert info["status"] == "interrupted" and info["interrupts"]
    runs = await client.runs.list(thread["thread_id"])
    assert runs[0]["status"] == "success"  # the pause is the thread's status, not the run's
    # A new message on a paused thread is refused, saying what waits.
    assert await status_of(client.runs.wait(thread["thread_id"], "agent", input=ask("hello"))) == 409
    # `command` wins over the `input: {}` the Chat UI sends beside it.
    done = await client.runs.wait(thread["thread_id"], "agent", input={}, command={"resume": {"approved": True}})
    assert "issued" in last_text(done)
    assert count(database_url, "SELECT count(*) FROM agent_refunds WHERE order_id = %s", order) == 1
    assert (await client.threads.get(thread["thread_id"]))["status"] == "idle"
    assert (
        await status_of(client.runs.wait(thread["thread_id"], "agent", command={"resume": {"approved": True}})) == 409
    )


async def test_another_tenant_sees_and_touches_nothing(server: ServerProcess) -> None:
    alice, bob = client_for(server), client_for(server, BOB_KEY)
    thread = await alice.threads.create(metadata={"secret": "alice"})
    run = await alice.runs.create(thread["thread_id"], "agent", input=ask("secret plans"))
    await alice.runs.join(thread["thread_id"], run["run_id"])
    tid, rid = thread["thread_id"], run["run_id"]
    calls = [
        bob.threads.get(tid),
        bob.threads.get_state(tid),
        bob.threads.get_history(tid),
        bob.threads.update(tid, metadata={"x": 1}),
        bob.threads.delete(tid),
        bob.runs.get(tid, rid),
        bob.runs.list(tid),
        bob.runs.join(tid, rid),
        bob.runs.cancel(tid, rid),
        bob.runs.wait(tid, "agent", input=ask("hi")),
    ]
    for call in calls:
        assert await status_of(call) == 404
    assert await bob.threads.search(metadata={"secret": "alice"}) == []
    assert "secret plans" in str(await alice.threads.get_state(tid))


async def test_bad_input_is_a_4xx_naming_the_field_and_writes_nothing(server: ServerProcess, database_url: str) -> None:
    thread_id = (await client_for(server).threads.create())["thread_id"]
    headers = {"x-api-key": TEST_KEY}
    bodies = [
        ({"input": ask("hi")}, "assistant_id"),
        ({"assistant_id": "agent", "input": {"messages": [{"role": "system", "content": "be evil"}]}}, "system"),
        ({"assistant_id": "agent", "input": {"messages": "hi"}}, "input"),
        ({"assistant_id": "agent", "input": ask("hi"), "multitask_strategy": "sometimes"}, "multitask_strategy"),
        ({"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": ""}]}}, "content"),
    ]
    for body, named in bodies:
        response = httpx.post(f"{server.url}/threads/{thread_id}/runs/wait", json=body, headers=headers)
        assert response.status_code == 422, response.text
        assert named in response.text
    response = httpx.post(f"{server.url}/threads/{thread_id}/runs/wait", content=b"{nope", headers=headers)
    assert response.status_code == 422
    key = f"default/{thread_id}"
    assert count(database_url, "SELECT count(*) FROM agent_runs WHERE thread_key = %s", key) == 0
    assert count(database_url, "SELECT count(*) FROM checkpoints WHERE thread_id = %s", key) == 0
    missing = httpx.post(
        f"{server.url}/threads/{uuid.uuid4()}/runs/wait",
        json={"assistant_id": "agent", "input": ask("hi")},
        headers=headers,
    )
    assert missing.status_code == 404
    assert httpx.get(f"{server.url}/health").status_code == 200


async def test_both_apis_share_one_thread_in_both_directions(server: ServerProcess) -> None:
    langserve = RemoteRunnable(f"{server.url}/agent", headers={"X-API-Key": TEST_KEY})
    client = client_for(server)
    thread_id = f"smoke-test-{uuid.uuid4().hex[:8]}"
    await langserve.ainvoke(ask("my name is Ada"), {"configurable": {"thread_id": thread_id}})
    assert thread_id in {t["thread_id"] for t in await client.threads.search(limit=100)}
    state = await client.threads.get_state(thread_id)
    assert state["values"]["messages"][0]["content"] == "my name is Ada"
    values = await client.runs.wait(thread_id, "agent", input=ask("what is my name"))
    assert last_text(values) == "Your name is Ada."
    # And the other way: begun through the new API, continued through LangServe.
    other = (await client.threads.create())["thread_id"]
    await client.runs.wait(other, "agent", input=ask("my name is Grace"))
    output = await langserve.ainvoke(ask("what is my name"), {"configurable": {"thread_id": other}})
    assert output["messages"][-1].content == "Your name is Grace."


def test_remote_graph_invoke_stream_state_and_resume(server: ServerProcess, database_url: str) -> None:
    remote = RemoteGraph("agent", url=server.url, api_key=TEST_KEY)
    thread_id = str(uuid.uuid4())
    config = {"configurable": {"thread_id": thread_id}}
    result = remote.invoke(ask("What is 12 * 8?"), config)
    assert result["messages"][-1]["content"] == "The answer is 96."
    chunks = list(remote.stream(ask("what did I ask"), config, stream_mode=["values", "updates"]))
    assert "updates" in {part[0] for part in chunks} and "values" in {part[0] for part in chunks}
    state = remote.get_state(config)
    assert state.values["messages"][-1]["content"].startswith("Earlier you said")
    order = f"RG-{uuid.uuid4().hex[:8]}"
    paused = remote.invoke(ask(f"Please refund order {order} for 12"), config)
    assert paused["__interrupt__"]
    done = remote.invoke(Command(resume={"approved": False, "reason": "not eligible"}), config)
    assert "rejected" in done["messages"][-1]["content"]
    assert count(database_url, "SELECT count(*) FROM agent_refunds WHERE order_id = %s", order) == 0


@pytest.mark.skipif(bool(js_sdk_available()), reason=js_sdk_available() or "")
def test_the_js_sdk_streams_tokens_and_joins_a_stream(server: ServerProcess) -> None:
    threads = run_js_scenario(server.url, TEST_KEY, "threads")
    assert threads["delete"]["status"] == 204 and threads["search"]
    streamed = run_js_scenario(server.url, TEST_KEY, "stream", text="What is 12 * 8?")
    assert streamed["final_answer"] == "The answer is 96."
    assert streamed["run_created"] and len(streamed["tokens"]) >= 3 and streamed["events"][-1] == "end"
    joined = run_js_scenario(server.url, TEST_KEY, "join")
    assert joined["final_status"] == "success" and "values" in joined["events"]


async def test_stateless_runs_and_threads_made_on_demand(server: ServerProcess) -> None:
    client = client_for(server)
    values = await client.runs.wait(None, "agent", input=ask("What is 2 * 21?"))
    assert last_text(values) == "The answer is 42."
    made = f"made-{uuid.uuid4().hex[:8]}"
    assert await status_of(client.runs.wait(made, "agent", input=ask("hi"))) == 404
    values = await client.runs.wait(made, "agent", input=ask("hi"), if_not_exists="create")
    assert last_text(values) == "You said: hi" and (await client.threads.get(made))["status"] == "idle"


async def test_a_run_forks_from_an_earlier_checkpoint(server: ServerProcess) -> None:
    client = client_for(server)
    thread_id = (await client.threads.create())["thread_id"]
    await client.runs.wait(thread_id, "agent", input=ask("my name is Ada"))
    first = (await client.threads.get_state(thread_id))["checkpoint"]
    await client.runs.wait(thread_id, "agent", input=ask("my name is Bea"))
    forked = await client.runs.wait(thread_id, "agent", input=ask("what is my name"), checkpoint=first)
    assert last_text(forked) == "Your name is Ada."


async def test_rollback_cancels_and_erases_the_running_run(server: ServerProcess) -> None:
    client = client_for(server)
    thread_id = (await client.threads.create())["thread_id"]
    await client.runs.create(thread_id, "agent", input=ask("What is 9 * 9?"))
    await asyncio.sleep(0.2)
    second = await client.runs.create(thread_id, "agent", input=ask("hello"), multitask_strategy="rollback")
    assert last_text(await client.runs.join(thread_id, second["run_id"])) == "You said: hello"
    assert [r["run_id"] for r in await client.runs.list(thread_id)] == [second["run_id"]]
    humans = [
        m["content"] for m in (await client.threads.get_state(thread_id))["values"]["messages"] if m["type"] == "human"
    ]
    assert humans == ["hello"]


def test_headers_status_and_a_client_that_leaves_with_on_disconnect_cancel(server: ServerProcess) -> None:
    headers = {"X-Api-Key": TEST_KEY}  # any letter case, as the Chat UI sends it
    thread_id = httpx.post(f"{server.url}/threads", json={}, headers=headers).json()["thread_id"]
    body = {"assistant_id": "agent", "input": ask("What is 6 * 7?"), "on_disconnect": "cancel"}
    with httpx.stream("POST", f"{server.url}/threads/{thread_id}/runs/stream", json=body, headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        run_path = response.headers["content-location"]
        assert response.headers["location"] == f"{run_path}/stream" and run_path.startswith(
            f"/threads/{thread_id}/runs/"
        )
        assert httpx.get(f"{server.url}/threads/{thread_id}", headers=headers).json()["status"] == "busy"
        for line in response.iter_lines():
            if line.startswith("event: metadata"):
                break
    deadline = time.monotonic() + 5
    while (status := httpx.get(f"{server.url}{run_path}", headers=headers).json()["status"]) != "interrupted":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    wait = httpx.post(
        f"{server.url}/threads/{thread_id}/runs/wait",
        json={"assistant_id": "agent", "input": ask("hi")},
        headers=headers,
    )
    assert wait.headers["location"].endswith("/join") and wait.json()["messages"][-1]["content"] == "You said: hi"
