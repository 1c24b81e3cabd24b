"""Driving the Agent Chat UI (ui/build.py builds it) in Debian's Chromium with Playwright.

The selectors follow the template's own markup (create-agent-chat-app 0.1.6,
templates/vite/src/components/thread/...): a human message is a `p` in `div.ml-auto.group`, an
assistant message `div.mr-auto.group` whose text sits in `div.py-1`, the thread list
is under the "Thread History" heading, toasts come from sonner."""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path
from typing import Any

from tests.support import CHROMIUM, ROOT
from ui.build import setup_url

ARTIFACTS = ROOT / "test-artifacts"
ANSWER = "div.mr-auto.group > div.flex-col > div.py-1"
HUMAN = "div.ml-auto.group > div.flex-col > p"
MESSAGE_BOX = "Type your message..."

# Records, in the page, the text of the last assistant answer at every DOM change, and
# whether a run was still going (the composer shows "Cancel" instead of "Send").
RECORD_RENDERS = """(selector) => {
  window.__renders = [];
  const snapshot = () => {
    const answers = document.querySelectorAll(selector);
    const text = answers.length ? answers[answers.length - 1].innerText.trim() : "";
    const running = [...document.querySelectorAll("form button")].some((b) => b.innerText.trim() === "Cancel");
    const last = window.__renders[window.__renders.length - 1];
    if (!last || last.text !== text || last.running !== running) window.__renders.push({ text, running });
  };
  new MutationObserver(snapshot).observe(document.body, { subtree: true, childList: true, characterData: true });
}"""


def chromium_missing() -> str | None:
    return None if Path(CHROMIUM).exists() else "Chromium is not installed (apt-get install chromium)"


class ChatPage:
    """One browser tab on the UI, with what went wrong on the wire kept for messages."""

    def __init__(self, page: Any, name: str) -> None:
        self.page = page
        self.name = name
        self.problems: list[str] = []
        self.origins: set[str] = set()
        page.on("request", lambda r: self.origins.add("/".join(r.url.split("/")[:3])))
        page.on("console", self._on_console)
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.method} {r.url} {r.failure}"))
        page.on("response", self._on_response)

    def _on_console(self, message: Any) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text[:500]}")

    def _on_response(self, response: Any) -> None:
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.request.method} {response.url}")

    def report(self) -> str:
        return "\nbrowser problems:\n  " + "\n  ".join(self.problems[-25:]) if self.problems else ""

    def shot(self, step: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"chat-ui-{self.name}-{step}.png"))

    def connect(self, ui_url: str, agent_url: str, api_key: str) -> None:
        """Through the UI's setup form, as a person does: it keeps the URL and graph id in
        the page's query and the key in localStorage (where the thread list reads it)."""
        self.page.goto(setup_url(ui_url, agent_url))
        self.page.locator("#apiUrl").wait_for()
        assert self.page.locator("#apiUrl").input_value() == agent_url
        assert self.page.locator("#assistantId").input_value() == "agent"
        self.page.fill("#apiKey", api_key)
        self.page.get_by_role("button", name="Continue").click()
        self.composer.wait_for()

    def new_thread(self, ui_url: str, agent_url: str) -> None:
        self.page.goto(f"{ui_url}/?{urllib.parse.urlencode({'apiUrl': agent_url, 'assistantId': 'agent'})}")
        self.composer.wait_for()

    @property
    def composer(self) -> Any:
        return self.page.get_by_placeholder(MESSAGE_BOX)

    def send(self, text: str) -> None:
        self.composer.fill(text)
        self.composer.press("Enter")

    def record_renders(self) -> None:
        self.page.evaluate(RECORD_RENDERS, ANSWER)

    def renders(self) -> list[dict[str, Any]]:
        return list(self.page.evaluate("() => window.__renders"))

    def answers(self) -> list[str]:
        return [str(text).strip() for text in self.page.locator(ANSWER).all_inner_texts()]

    def humans(self) -> list[str]:
        return [str(text).strip() for text in self.page.locator(HUMAN).all_inner_texts()]

    def is_running(self) -> bool:
        return bool(self.page.locator("form button", has_text="Cancel").count())

    def wait_for_answer(self, expected: str, timeout: float = 30.0) -> str:
        """The last answer once it contains `expected` and the run has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answers = self.answers()
            if answers and expected in answers[-1] and not self.is_running():
                return answers[-1]
            self.page.wait_for_timeout(100)
        raise AssertionError(f"no answer containing {expected!r} after {timeout}s; answers: {self.answers()}")

    def wait_until_idle(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.is_running() and time.monotonic() < deadline:
            self.page.wait_for_timeout(100)

    def open_history(self) -> None:
        """The thread list slides in (the `chatHistoryOpen` query flag); it is in the
        page either way."""
        if "chatHistoryOpen=true" not in self.page.url:
            # The sidebar (off screen while closed) has a toggle too; the header's comes last.
            self.page.locator("button:has(svg.lucide-panel-right-close)").last.click()
            self.page.wait_for_url("**chatHistoryOpen=true**")
            self.page.wait_for_timeout(600)  # the slide-in animation, for the screenshot

    def history_titles(self) -> list[str]:
        panel = self.page.get_by_role("heading", name="Thread History").locator("xpath=../..")
        return [str(text).strip() for text in panel.locator("button p.truncate").all_inner_texts()]

    def wait_for_history(self, expected: set[str], timeout: float = 20.0) -> list[str]:
        """The thread list once it shows every title in `expected` (it refreshes itself
        4 s after a thread is created, and on every page load)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            titles = self.history_titles()
            if expected <= set(titles):
                return titles
            self.page.wait_for_timeout(250)
        raise AssertionError(f"thread list {self.history_titles()} lacks {sorted(expected)}")

    def toasts(self) -> list[str]:
        return [str(text).strip() for text in self.page.locator("[data-sonner-toast]").all_inner_texts()]
