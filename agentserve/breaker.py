"""A circuit breaker for the model provider: after repeated failures, answer at
once instead of tying up workers on a provider that keeps failing."""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitOpen(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the model provider is failing; retry in {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


class CircuitBreaker:
    """Closed until `threshold` calls in a row fail; then open for `cooldown_s`;
    then half-open: one trial call decides whether it closes or opens again."""

    def __init__(
        self, threshold: int = 5, cooldown_s: float = 15.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_running = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown_s else "open"

    def before_call(self) -> None:
        state = self.state
        if state == "open" or (state == "half-open" and self.trial_running):
            assert self.opened_at is not None
            raise CircuitOpen(max(1.0, self.cooldown_s - (self.clock() - self.opened_at)))
        if state == "half-open":
            self.trial_running = True

    def record_success(self) -> None:
        self.failures, self.opened_at, self.trial_running = 0, None, False

    def record_failure(self) -> None:
        self.failures += 1
        self.trial_running = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = self.clock()
