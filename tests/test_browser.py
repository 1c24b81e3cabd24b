"""The playground in a real browser (Debian's Chromium driven by Playwright) against
the real server with auth on: sign in, chat, reload, be remembered."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import BROWSER_ARGS, CHROMIUM, ROOT, TEST_KEY, ServerProcess

pytestmark = pytest.mark.e2e

ARTIFACTS = ROOT / "test-artifacts"

playwright_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(database_url, tmp_path_factory.mktemp("browser")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


def ask(page: object, text: str, expect: str) -> None:
    box = page.get_by_placeholder("Send a message...")  # type: ignore[attr-defined]
    box.fill(text)
    box.press("Enter")
    try:
        page.get_by_text(expect).last.wait_for(timeout=20_000)  # type: ignore[attr-defined]
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground-failed.png"))  # type: ignore[attr-defined]
        raise


def test_sign_in_chat_reload_and_be_remembered(server: ServerProcess, browser: object) -> None:
    page = browser.new_page()  # type: ignore[attr-defined]
    page.goto(f"{server.url}/agent/playground/")
    assert "/signin" in page.url
    page.fill("#api_key", TEST_KEY)
    page.click("button[type=submit]")
    page.wait_for_url("**/agent/chat/playground/")
    page.wait_for_load_state("networkidle")  # the page reads its schemas before it can send

    ask(page, "What is 12 * 8?", "The answer is 96.")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-chat.png"))

    page.reload()
    page.wait_for_load_state("networkidle")
    ask(page, "what did I ask before?", 'Earlier you said: "What is 12 * 8?"')
    page.screenshot(path=str(ARTIFACTS / "playground-after-reload.png"))
    page.close()


def test_anonymous_browser_is_refused(server: ServerProcess, browser: object) -> None:
    context = browser.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(f"{server.url}/agent/chat/playground/")
    assert "/signin" in page.url
    assert page.locator("#api_key").is_visible()
    response = page.request.post(f"{server.url}/agent/chat/invoke", data={"input": {"messages": []}})
    assert response.status == 401
    context.close()
