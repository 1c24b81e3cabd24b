"""The Agent Chat UI (create-agent-chat-app 0.1.6's vite template, built by ui/build.py)
in Debian's Chromium against the real server: 2 workers, PostgreSQL, the offline model
at 400 ms a call, the browser calling the API directly (CORS), as a person uses it:
the setup form, the thread list, streaming, reload, the refund approval card, a wrong key.
Screenshots of every step land in test-artifacts/chat-ui-*.png."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.chatui import ARTIFACTS, ChatPage, chromium_missing
from tests.conftest import scratch_database
from tests.support import BROWSER_ARGS, CHROMIUM, ROOT, TEST_KEY, ServerProcess
from ui import build

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # the first run installs and builds the UI
OTHER_KEY = "other-tenant-key-0123456789"
WRONG_KEY = "not-a-key-of-anyone-0123456789"
OTHERS_FIRST_MESSAGE = "Other tenant: what is 7 * 6?"
API_FIRST_MESSAGE = "What is 2 + 3?"


# ---- the container definition (no Node or browser needed) --------------------------------


def test_the_ui_image_builds_the_same_pinned_template_and_passes_hadolint() -> None:
    dockerfile = (ROOT / "ui" / "Dockerfile").read_text()
    args = dict(re.findall(r"(?m)^ARG (\w+)=(\S+)$", dockerfile))
    assert args == {"CHAT_APP_VERSION": build.VERSION, "RESOLVE_BEFORE": build.RESOLVE_BEFORE}, args
    assert "--ignore-scripts" in dockerfile and "vite build" in dockerfile
    hadolint = Path(sys.executable).parent / "hadolint"
    found = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install -r requirements-dev.txt provides it)")
    result = subprocess.run([found, str(ROOT / "ui" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_compose_serves_the_ui_only_under_the_ui_profile() -> None:
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["chat-ui"]
    assert service["profiles"] == ["ui"]
    assert service["build"] == {"context": "./ui", "dockerfile": "Dockerfile"}
    assert service["ports"] == ["127.0.0.1:5173:80"], "the agent's development CORS default allows :5173"
    assert service["depends_on"]["agent"]["condition"] == "service_healthy"


# ---- the UI in a browser ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ui_dist() -> Path:
    if reason := chromium_missing() or build.missing_tools():
        pytest.skip(f"cannot run the Agent Chat UI here: {reason}")
    pytest.importorskip("playwright.sync_api")
    dist = build.ensure_build()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "chat-ui-resolved-versions.json").write_text(json.dumps(build.resolved_versions(), indent=1))
    return dist


@pytest.fixture(scope="module")
def ui(ui_dist: Path) -> Iterator[build.StaticServer]:
    with build.StaticServer(ui_dist) as server:
        yield server


@pytest.fixture(scope="module")
def ui_database(postgres_server_url: str) -> Iterator[str]:
    """A database of its own, so the thread list holds only the threads made here."""
    with scratch_database(postgres_server_url, prefix="agent_chat_ui") as url:
        yield url


@pytest.fixture(scope="module")
def server(ui_database: str, workdir: Path, ui: build.StaticServer) -> Iterator[ServerProcess]:
    process = ServerProcess(
        ui_database,
        workdir,
        OFFLINE_MODEL_LATENCY_MS="400",
        CORS_ALLOW_ORIGINS=ui.url,
        AGENT_API_KEYS=f"other={OTHER_KEY}",
    ).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser(ui_dist: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def person(browser: Any, ui: build.StaticServer, server: ServerProcess) -> Iterator[ChatPage]:
    """One person's browser (its localStorage keeps the key), signed in once."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ChatPage(context.new_page(), "person")
    sent: list[dict[str, Any]] = []
    page.page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/runs/stream") else None)
    page.connect(ui.url, server.url, TEST_KEY)
    page.shot("0-connected")
    yield page
    (ARTIFACTS / "chat-ui-run-bodies.json").write_text(json.dumps(sent, indent=1))
    context.close()


def api_turn(server: ServerProcess, key: str, text: str) -> str:
    """A thread with one finished turn, made through the API (not the UI)."""
    with server.client(key) as client:
        thread_id = str(client.post("/threads", json={}).json()["thread_id"])
        body = {"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": text}]}}
        response = client.post(f"/threads/{thread_id}/runs/wait", json=body)
        assert response.status_code == 200, response.text
    return thread_id


def thread_ids(server: ServerProcess, key: str) -> set[str]:
    with server.client(key) as client:
        response = client.post("/threads/search", json={"limit": 1000})
        assert response.status_code == 200, response.text
        return {thread["thread_id"] for thread in response.json()}


def refunds(database_url: str, order_id: str) -> list[float]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT amount FROM agent_refunds WHERE order_id = %s", (order_id,)).fetchall()
    return [float(row[0]) for row in rows]


def resume_sent(bodies: list[dict[str, Any]]) -> Any:
    return bodies[-1]["command"]["resume"] if bodies and bodies[-1].get("command") else None


def test_thread_list_streaming_reload_and_follow_up(person: ChatPage, server: ServerProcess, ui: Any) -> None:
    others_thread = api_turn(server, OTHER_KEY, OTHERS_FIRST_MESSAGE)
    api_turn(server, TEST_KEY, API_FIRST_MESSAGE)
    person.page.reload()
    person.composer.wait_for()
    person.open_history()
    assert person.wait_for_history({API_FIRST_MESSAGE}) == [API_FIRST_MESSAGE], person.report()
    person.shot("1-thread-list")

    # The answer streams in: it grows over several renders while the run is going.
    person.record_renders()
    person.send("What is 12 * 8?")
    final = person.wait_for_answer("96")
    person.shot("2-streamed-answer")
    assert "The answer is 96" in final
    renders = person.renders()
    (ARTIFACTS / "chat-ui-stream-renders.json").write_text(json.dumps(renders, indent=1))
    while_running = [render["text"] for render in renders if render["running"] and render["text"]]
    assert len(set(while_running)) >= 2, f"the answer did not stream: renders {renders}{person.report()}"
    assert all(b.startswith(a) for a, b in itertools.pairwise(while_running)), while_running
    assert "threadId=" in person.page.url

    # The thread list: this tenant's threads only, each titled by its first message.
    titles = person.wait_for_history({"What is 12 * 8?", API_FIRST_MESSAGE})
    assert sorted(titles) == sorted(["What is 12 * 8?", API_FIRST_MESSAGE]), titles
    assert OTHERS_FIRST_MESSAGE not in person.page.content() and others_thread not in person.page.content()
    person.shot("3-thread-list-after-chat")

    # A reload shows the whole conversation, and the next turn is answered from it.
    person.page.reload()
    person.composer.wait_for()
    person.page.get_by_text("The answer is 96.").wait_for(timeout=15_000)
    assert person.humans() == ["What is 12 * 8?"], person.humans()
    assert person.answers()[-1] == "The answer is 96.", person.answers()
    person.shot("4-after-reload")
    person.send("what did I ask before?")
    assert person.wait_for_answer("Earlier you said") == 'Earlier you said: "What is 12 * 8?"'
    assert person.humans() == ["What is 12 * 8?", "what did I ask before?"]
    person.shot("5-follow-up")
    assert OTHERS_FIRST_MESSAGE not in person.history_titles()


def ask_for_refund(person: ChatPage, ui: Any, server: ServerProcess, order_id: str, step: str) -> None:
    person.new_thread(ui.url, server.url)
    person.send(f"Please refund order {order_id} for 20")
    card = person.page.get_by_role("button", name="Mark as Resolved")
    generic = person.page.get_by_role("heading", name="Human Interrupt")
    card.or_(generic).first.wait_for(timeout=30_000)
    person.shot(step)
    assert not generic.count(), (
        "the UI shows its generic interrupt table, not the approval card: the interrupt value is not a "
        f"HumanInterrupt (action_request, config, description):\n{generic.locator('xpath=../../..').inner_text()}"
    )
    person.page.get_by_text("issue_refund", exact=True).first.wait_for()


def test_accepting_a_refund_issues_it_once(person: ChatPage, server: ServerProcess, ui: Any) -> None:
    bodies: list[dict[str, Any]] = []
    person.page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/runs/stream") else None)
    ask_for_refund(person, ui, server, "12345", "6-approval-card-to-accept")
    assert refunds(server.env["DATABASE_URL"], "12345") == [], "paid before anyone approved"
    person.page.get_by_role("button", name="Accept", exact=True).click()
    answer = person.wait_for_answer("issued")
    person.shot("7-accepted")
    assert re.search(r"Refund \S+ of 20(\.00)? issued for order 12345", answer), answer
    assert refunds(server.env["DATABASE_URL"], "12345") == [20.0]
    assert resume_sent(bodies)[0]["type"] == "accept", bodies[-1]
    assert not person.page.get_by_role("button", name="Accept", exact=True).count(), "the card is still shown"


def test_editing_a_refund_issues_the_edited_amount(person: ChatPage, server: ServerProcess, ui: Any) -> None:
    bodies: list[dict[str, Any]] = []
    person.page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/runs/stream") else None)
    ask_for_refund(person, ui, server, "13579", "8-approval-card-to-edit")
    amount = person.page.locator("div:has(> p:text-is('Amount')) > textarea")
    assert amount.input_value() == "20"
    amount.fill("15")
    person.page.get_by_role("button", name="Submit", exact=True).click()  # "Accept" turns "Submit" once edited
    answer = person.wait_for_answer("issued")
    person.shot("9-edited")
    assert re.search(r"Refund \S+ of 15(\.00)? issued for order 13579", answer), answer
    assert refunds(server.env["DATABASE_URL"], "13579") == [15.0]
    # The UI sends every field as the text of its box: the edited amount arrives as a string.
    edited = {"action": "issue_refund", "args": {"order_id": "13579", "amount": "15"}}
    assert resume_sent(bodies) == [{"type": "edit", "args": edited}], bodies[-1]


def test_ignoring_a_refund_pays_nothing(person: ChatPage, server: ServerProcess, ui: Any) -> None:
    ask_for_refund(person, ui, server, "67890", "10-approval-card-to-ignore")
    person.page.get_by_role("button", name="Ignore", exact=True).click()
    answer = person.wait_for_answer("rejected")
    person.shot("11-ignored")
    assert "not issued" in answer, answer
    assert refunds(server.env["DATABASE_URL"], "67890") == []


def test_responding_with_a_reason_rejects_the_refund(person: ChatPage, server: ServerProcess, ui: Any) -> None:
    ask_for_refund(person, ui, server, "24680", "12-approval-card-to-respond")
    person.page.get_by_placeholder("Your response here...").fill("duplicate claim")
    person.page.get_by_role("button", name="Send Response").click()
    answer = person.wait_for_answer("rejected")
    person.shot("13-responded")
    assert "duplicate claim" in answer, answer
    assert refunds(server.env["DATABASE_URL"], "24680") == []


def test_a_wrong_key_shows_the_error_and_creates_nothing(browser: Any, server: ServerProcess, ui: Any) -> None:
    before = thread_ids(server, TEST_KEY), thread_ids(server, OTHER_KEY)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    stranger = ChatPage(context.new_page(), "wrong-key")
    try:
        stranger.connect(ui.url, server.url, WRONG_KEY)
        stranger.open_history()
        stranger.send("What is 12 * 8?")
        stranger.page.locator("[data-sonner-toast]").first.wait_for(timeout=30_000)
        stranger.page.wait_for_timeout(1000)
        stranger.shot("14-wrong-key")
        toasts = stranger.toasts()
        assert any("error" in toast.lower() for toast in toasts), toasts
        assert any("401" in toast for toast in toasts), (
            f"the UI never saw the 401 (a 401 without CORS headers reads as a network error): {toasts}"
            f"{stranger.report()}"
        )
        assert stranger.humans() == [] and stranger.answers() == []
        assert stranger.history_titles() == []
        assert "threadId=" not in stranger.page.url
    finally:
        context.close()
    assert (thread_ids(server, TEST_KEY), thread_ids(server, OTHER_KEY)) == before


def test_the_ui_calls_no_one_but_the_agent(person: ChatPage, server: ServerProcess, ui: Any) -> None:
    """It links to GitHub and LangSmith Studio, but loads and calls nothing from outside."""
    assert person.origins <= {ui.url, server.url}, person.origins
