"""What the core refuses, as exceptions each edge turns into its own responses."""

from __future__ import annotations


class Refused(Exception):
    """A request the caller can fix or retry; `status` is the HTTP status it maps to."""

    status = 400

    def __init__(self, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


class NotFound(Refused):
    status = 404


class Conflict(Refused):
    status = 409


class Invalid(Refused):
    status = 422


class ThreadBusy(Conflict):
    def __init__(self, detail: str, thread_key: str, retry_after_s: int) -> None:
        super().__init__(detail, retry_after_s)
        self.thread_key = thread_key


class TooMany(Refused):
    status = 429


class RunTimedOut(TimeoutError):
    """The run went past the server's wall-clock limit and was stopped."""


class RunCancelled(Exception):
    """The run was cancelled by a request (cancel, or a newer run's strategy)."""

    def __init__(self, action: str) -> None:
        super().__init__(action)
        self.action = action
