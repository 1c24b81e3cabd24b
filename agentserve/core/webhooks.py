"""Completion webhooks: which URLs the server may call, the signed body, and
delivering it at least once.

A run's webhook is sent by the worker that ran it, in a task of its own, so a
receiver that is slow or down never holds the run up. The sender claims the
delivery on the run's row (`webhook_status = 'sending'`, held until
`webhook_due_at`, renewed before each attempt) and records each attempt and the
outcome there. A delivery whose sender stopped (its worker died between the
run's end and the last attempt) is taken up again by any worker once the hold
lapses, so a receiver may see a delivery twice but never miss one; the
`X-Webhook-Id` header (the run id) lets it tell.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from agentserve.core.runs import RUN_COLUMNS, Pool, Run
from agentserve.core.serialize import plain

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Webhook-Signature"
MAX_URL_CHARS = 2000
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CLAIM = f"""
UPDATE agent_runs r SET webhook_status = 'sending', webhook_due_at = now() + make_interval(secs => %(hold)s)
WHERE r.run_id = %(run_id)s AND r.webhook IS NOT NULL AND r.webhook_status IS NULL
RETURNING {RUN_COLUMNS}, r.webhook_attempts
"""
EXISTS = "SELECT 1 FROM agent_runs WHERE run_id = %s"
ATTEMPT = """UPDATE agent_runs SET webhook_attempts = %(attempt)s,
                 webhook_due_at = now() + make_interval(secs => %(hold)s)
             WHERE run_id = %(run_id)s"""
DONE = "UPDATE agent_runs SET webhook_status = %(status)s, webhook_due_at = NULL WHERE run_id = %(run_id)s"
# Deliveries owed whose sender is gone: never claimed a while after the run ended
# (the worker died first), or claimed and the hold lapsed (it died meanwhile).
RECOVER = f"""
UPDATE agent_runs r SET webhook_status = 'sending', webhook_due_at = now() + make_interval(secs => %(hold)s)
WHERE r.run_id IN (
    SELECT o.run_id FROM agent_runs o
    WHERE o.webhook IS NOT NULL AND (o.webhook_status IS NULL OR o.webhook_status = 'sending')
      AND o.ended_at > now() - interval '1 day'
      AND ((o.webhook_status IS NULL AND o.ended_at < now() - make_interval(secs => %(lost_after)s))
           OR o.webhook_due_at < now())
    ORDER BY o.ended_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
RETURNING {RUN_COLUMNS}, r.webhook_attempts
"""


def address_problem(address: IpAddress) -> str | None:
    """Why the server may not call this address by default, or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified or address.is_multicast:
        return "not a public address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if address.is_reserved or not address.is_global:
        return "not a public address"
    return None


def webhook_problem(url: str, allow_private: bool) -> str | None:
    """Why the server may not POST to this URL, or None when it may. Every address
    the host resolves to is checked, so a public name that points inward is
    refused too. It resolves the host: call it from a thread in async code."""
    if len(url) > MAX_URL_CHARS:
        return f"webhook must be at most {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return f"webhook {url!r} is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return f"webhook {url!r} must be an http or https URL"
    host = parts.hostname
    if not host:
        return f"webhook {url!r} has no host"
    if allow_private:
        return None
    try:
        found = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return f"webhook host {host!r} does not resolve"
    for *_, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # an IPv6 scope id is not part of it
        if problem := address_problem(address):
            return f"webhook host {host!r} is {address}, {problem}; webhooks may only call public addresses"
    return None


def signature_of(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_body(run: Run) -> bytes:
    """The run as the API shows it, with the values it ended with."""
    ended = run.ended_at or datetime.now(UTC)
    payload: dict[str, Any] = {
        "run_id": run.run_id,
        "thread_id": run.thread_id,
        "assistant_id": run.assistant_id,
        "created_at": run.created_at.isoformat(),
        "updated_at": ended.isoformat(),
        "status": run.status,
        "metadata": run.metadata,
        "kwargs": run.kwargs,
        "multitask_strategy": run.multitask_strategy,
        "attempt": run.attempts,
        "error": run.error,
        "values": plain(run.output),
    }
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


@dataclass(frozen=True)
class WebhookPolicy:
    secret: str = ""
    allow_private: bool = False
    timeout_s: float = 10.0
    max_attempts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    poll_s: float = 10.0
    # A run ended this long ago whose delivery nobody claimed lost its worker.
    lost_after_s: float = 60.0
    recover_batch: int = 10

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)

    def hold_s(self, attempt: int) -> float:
        """How long a sender holds a delivery: one attempt, the wait after it, and slack."""
        return self.timeout_s + 1.2 * self.backoff(attempt) + 30.0


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    retry: bool
    detail: str


class WebhookSender:
    def __init__(self, pool: Pool, policy: WebhookPolicy, client: httpx.AsyncClient | None = None) -> None:
        self.pool = pool
        self.policy = policy
        self.client = client or httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False)
        self._tasks: set[asyncio.Task[None]] = set()
        if not policy.secret:
            log.warning("WEBHOOK_SECRET is empty: webhooks are sent unsigned")

    async def on_run_end(self, run: Run) -> None:
        """For `executor.on_end`: deliver the webhook of a run that just ended here."""
        if not run.webhook:
            return
        try:
            async with self.pool.connection() as conn:
                row = await (
                    await conn.execute(CLAIM, {"run_id": run.run_id, "hold": self.policy.hold_s(1)})
                ).fetchone()
                present = row is not None or await (await conn.execute(EXISTS, (run.run_id,))).fetchone() is not None
        except Exception:  # unclaimed, so a worker takes it up once it counts as lost
            log.warning("could not claim the webhook of run %s", run.run_id, exc_info=True)
            return
        if row is not None:
            await self.deliver(Run.from_row(row), row["webhook_attempts"])
        elif not present:
            # Erased with its temporary thread before its end was announced: sent,
            # with nowhere to record how it went.
            await self.deliver(run, 0, recorded=False)

    async def deliver(self, run: Run, attempts_before: int, *, recorded: bool = True) -> None:
        url = run.webhook
        assert url is not None
        body = webhook_body(run)
        headers = {"Content-Type": "application/json", "User-Agent": "agentserve-webhook", "X-Webhook-Id": run.run_id}
        if self.policy.secret:
            headers[SIGNATURE_HEADER] = signature_of(body, self.policy.secret)
        status = "failed (no attempts left)"
        # Checked again now: the name may point elsewhere than when the run was made.
        if problem := await asyncio.to_thread(webhook_problem, url, self.policy.allow_private):
            log.warning("webhook of run %s refused: %s", run.run_id, problem)
            attempts_before, status = self.policy.max_attempts, "refused"
        for attempt in range(attempts_before + 1, self.policy.max_attempts + 1):
            if recorded:
                await self._record(ATTEMPT, run.run_id, attempt=attempt, hold=self.policy.hold_s(attempt))
            outcome = await self._post(url, body, headers)
            if outcome.delivered:
                status = "delivered"
                break
            status = f"failed ({outcome.detail})"
            if not outcome.retry:
                break
            if attempt < self.policy.max_attempts:
                await asyncio.sleep(self.policy.backoff(attempt))
        if status != "delivered":
            log.warning("webhook of run %s not delivered: %s", run.run_id, status)
        if recorded:
            await self._record(DONE, run.run_id, status=status)

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        try:
            response = await self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:  # connection refused, reset, timed out
            return Outcome(delivered=False, retry=True, detail=type(exc).__name__)
        code = response.status_code
        if 200 <= code < 300:
            return Outcome(delivered=True, retry=False, detail=f"HTTP {code}")
        return Outcome(delivered=False, retry=code >= 500 or code == 429, detail=f"HTTP {code}")

    async def _record(self, statement: str, run_id: str, **params: Any) -> None:
        try:
            async with self.pool.connection() as conn:
                await conn.execute(statement, {"run_id": run_id, **params})  # type: ignore[arg-type]
        except Exception:  # the delivery matters more than its record
            log.warning("could not record the webhook of run %s", run_id, exc_info=True)

    async def recover_once(self) -> int:
        """Take up deliveries whose sender is gone; returns how many were started."""
        params = {
            "hold": self.policy.hold_s(1),
            "lost_after": self.policy.lost_after_s,
            "limit": self.policy.recover_batch,
        }
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(RECOVER, params)).fetchall()
        for row in rows:
            task = asyncio.create_task(self.deliver(Run.from_row(row), row["webhook_attempts"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(rows)

    async def recover_forever(self) -> None:
        while True:
            await asyncio.sleep(self.policy.poll_s * random.uniform(0.8, 1.0))
            try:
                if count := await self.recover_once():
                    log.info("took up %d webhook deliveries whose sender stopped", count)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("could not look for webhook deliveries to take up", exc_info=True)

    async def aclose(self) -> None:
        # Deliveries cut off here keep their hold; another worker finishes them.
        for task in list(self._tasks):
            task.cancel()
        await self.client.aclose()
