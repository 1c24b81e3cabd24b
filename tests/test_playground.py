"""The browser side through the real app: sign-in, the session cookie, the chat playground."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agentserve.sessions import COOKIE
from agentserve.settings import Settings
from app import create_app
from tests.support import TEST_KEY


@pytest.fixture()
def browser(database_url: str) -> Iterator[TestClient]:
    settings = Settings(_env_file=None, DATABASE_URL=database_url, AGENT_API_KEY=TEST_KEY)  # type: ignore[call-arg]
    with TestClient(create_app(settings), follow_redirects=False) as client:
        yield client


def sign_in(browser: TestClient, key: str = TEST_KEY) -> Any:
    return browser.post(
        "/signin",
        content=f"api_key={key}&next=/agent/playground/",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )


def chat(browser: TestClient, *messages: dict[str, str]) -> Any:
    return browser.post("/agent/chat/invoke", json={"input": {"messages": list(messages)}})


def test_anonymous_visitors_are_sent_to_sign_in(browser: TestClient) -> None:
    response = browser.get("/agent/chat/playground/")
    assert response.status_code == 303
    assert response.headers["location"] == "/signin?next=/agent/chat/playground/"
    assert "API key" in browser.get("/signin").text
    assert chat(browser, {"type": "human", "content": "hi"}).status_code == 401


def test_a_wrong_key_gets_the_form_again_without_echoing_it(browser: TestClient) -> None:
    response = sign_in(browser, "not-the-key-123")
    assert response.status_code == 401 and "not valid" in response.text
    assert "not-the-key-123" not in response.text and COOKIE not in response.headers.get("set-cookie", "")


def test_sign_in_sets_a_strict_httponly_cookie_that_opens_the_playground(browser: TestClient) -> None:
    response = sign_in(browser)
    assert response.status_code == 303 and response.headers["location"] == "/agent/playground/"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and TEST_KEY.lower() not in cookie
    redirect = browser.get("/agent/playground/")
    assert redirect.status_code == 307 and redirect.headers["location"] == "/agent/chat/playground/"
    page = browser.get("/agent/chat/playground/")
    assert page.status_code == 200 and "<script" in page.text


def test_the_chat_takes_the_newest_message_and_the_session_thread_remembers(browser: TestClient) -> None:
    sign_in(browser)
    first = chat(browser, {"type": "human", "content": "What is 12 * 8?"})
    assert first.status_code == 200, first.text
    assert "96" in first.json()["output"]
    # The page sends its whole visible history; a reload starts the page empty.
    second = chat(
        browser,
        {"type": "human", "content": "What is 12 * 8?"},
        {"type": "ai", "content": first.json()["output"]},
        {"type": "human", "content": "what did I ask before?"},
    )
    assert second.json()["output"] == 'Earlier you said: "What is 12 * 8?"'
    after_reload = chat(browser, {"type": "human", "content": "what did I ask before?"})
    assert "What is 12 * 8?" in after_reload.json()["output"]


def test_sign_out_clears_the_session(browser: TestClient) -> None:
    sign_in(browser)
    assert browser.get("/signout").status_code == 303
    assert browser.get("/agent/chat/playground/").status_code == 303


def test_a_tampered_cookie_is_refused(browser: TestClient) -> None:
    sign_in(browser)
    value = browser.cookies[COOKIE]
    payload, _, signature = value.partition(".")
    forged_payload = payload[:-2] + ("AA" if not payload.endswith("AA") else "BB")
    browser.cookies.clear()
    for forged in (f"{forged_payload}.{signature}", payload, f"{payload}.", "garbage"):
        response = browser.get("/agent/chat/playground/", headers={"cookie": f"{COOKIE}={forged}"})
        assert response.status_code == 303, forged
    assert browser.get("/agent/chat/playground/", headers={"cookie": f"{COOKIE}={value}"}).status_code == 200


def test_sign_in_never_redirects_off_site(browser: TestClient) -> None:
    response = browser.post(
        "/signin",
        content=f"api_key={TEST_KEY}&next=//evil.example/",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.headers["location"] == "/agent/playground/"


@pytest.mark.parametrize("path", ["/agent/chat/invoke", "/agent/chat/stream_log"])
def test_a_malformed_message_chunk_is_a_422_not_a_500(browser: TestClient, path: str) -> None:
    sign_in(browser)
    for message in ({"type": "ToolMessageChunk", "content": "x"}, {"type": "ToolMessageChunk"}):
        response = browser.post(path, json={"input": {"messages": [message]}})
        assert response.status_code == 422, response.text
        assert "message" in response.text


def test_the_chat_streams_the_answer_in_pieces(browser: TestClient) -> None:
    sign_in(browser)
    body = {"input": {"messages": [{"type": "human", "content": "my name is Ada Lovelace"}]}}
    with browser.stream("POST", "/agent/chat/stream_log", json=body) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    pieces = re.findall(r'"op":"add","path":"/streamed_output/-","value":"([^"]*)"', text.replace(" ", ""))
    assert len(pieces) >= 2 and "".join(pieces) == "Nicetomeetyou,AdaLovelace."
