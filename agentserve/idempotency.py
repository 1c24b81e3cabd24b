"""`Idempotency-Key` on the routes that start turns, for both APIs: a client whose
connection died mid-request sends it again with the same key and gets the first
request's answer (or joins its run) instead of a second turn.

An ASGI middleware, since it must see the raw body (to tell a retry from another
request reusing the key) and the whole answer (to give it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from typing import Any

from langchain_core.messages import HumanMessage
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentserve.auth import presented_key, principal_for, session_principal
from agentserve.core.errors import Invalid
from agentserve.core.idempotency import IdempotencyKeys, Previous
from agentserve.core.identity import thread_key_for
from agentserve.core.serialize import dumps
from agentserve.middleware import send_json_error

TURN_ROUTES = re.compile(r"^/(agent/(invoke|stream|batch)|threads/[^/]+/runs(/stream|/wait)?|runs(/stream|/wait)?)/?$")
RUN_LOCATION = re.compile(r"^(?:/threads/(?P<thread>[^/]+))?/runs/(?P<run>[0-9a-fA-F-]{36})$")
MAX_KEY_CHARS = 200
MAX_STORED_BYTES = 4 * 1024 * 1024
POLL_S = 0.25


def run_in(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str] | None:
    """(thread id, run id) from the Content-Location the LangGraph routes send."""
    for name, value in headers:
        if name.lower() == b"content-location":
            if match := RUN_LOCATION.match(value.decode("latin-1")):
                return match["thread"], match["run"]
    return None


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = dict(scope.get("headers", [])).get(b"idempotency-key") if scope["type"] == "http" else None
        if key is None or scope["method"] != "POST" or not TURN_ROUTES.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        text = key.decode("latin-1")
        if not 0 < len(text) <= MAX_KEY_CHARS or not text.isprintable():
            await send_json_error(send, 422, f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable characters", [])
            return
        request = Request(scope)
        credential = presented_key(request)
        principal = principal_for(request, credential) if credential else session_principal(request)
        if principal is None:
            await self.app(scope, receive, send)  # the route answers 401
            return
        body = await self._read_body(receive)
        digest = hashlib.sha256(f"{scope['method']} {scope['path']}\n".encode() + body).hexdigest()
        keys: IdempotencyKeys = scope["app"].state.idempotency
        replayed = self._replay_receive(body, receive)
        try:
            while True:
                if owner := await keys.claim(principal.tenant, text, digest):
                    await self._first(keys, owner, scope, replayed, send)
                    return
                previous = await keys.previous(principal.tenant, text, digest)
                if previous.state == "done":
                    await self._answer_again(previous, send)
                    return
                if previous.state == "running" and not previous.alive and previous.run_id:
                    if previous.run_durable:
                        await self._join(previous, scope, receive, send)
                        return
                    if previous.run_status == "success" and scope["path"].rstrip("/") == "/agent/invoke":
                        # The turn was stored and its worker died before the answer was
                        # kept: answer from what it stored.
                        await self._answer_from_state(scope, principal.tenant, previous, send)
                        return
                    if previous.run_status == "success":
                        # Likewise, for a stream or batch: say so rather than run the
                        # turn a second time.
                        detail = (
                            f"the first request with this Idempotency-Key stored its turn on thread "
                            f"{previous.thread_id!r} but its answer was lost; read it with "
                            f"GET /threads/{previous.thread_id}/state"
                        )
                        await send_json_error(send, 409, detail, [])
                        return
                # The first request is still in flight: wait for its answer, or for it
                # to die, whichever comes first.
                await asyncio.sleep(POLL_S)
        except Invalid as exc:
            await send_json_error(send, exc.status, exc.detail, [])

    @staticmethod
    async def _read_body(receive: Receive) -> bytes:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    def _replay_receive(body: bytes, receive: Receive | None = None) -> Receive:
        """The body read already, then the client's own messages (its disconnect)."""
        sent = False

        async def replayed() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            if receive is not None:
                return await receive()
            await asyncio.Event().wait()  # as a client that keeps the connection open
            raise AssertionError("unreachable")

        return replayed

    async def _first(self, keys: IdempotencyKeys, owner: str, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        stored = 0
        completed = False
        renewal = asyncio.create_task(self._renew_forever(keys, owner))
        # The routes store the run they start against this key (see core/runs.py).
        scope.setdefault("state", {})["idempotency_owner"] = owner

        async def capture(message: Message) -> None:
            nonlocal status, headers, stored, completed
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers", []))

            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                stored += len(chunk)
                if stored <= MAX_STORED_BYTES:
                    chunks.append(chunk)
                if not message.get("more_body") and 200 <= status < 300 and stored <= MAX_STORED_BYTES:
                    # Kept before it is sent: a client gone by now gets it on its retry.
                    kept = [
                        [k.decode("latin-1"), v.decode("latin-1")] for k, v in headers if k.lower() != b"content-length"
                    ]
                    await keys.complete(owner, status, kept, b"".join(chunks))
                    completed = True
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            renewal.cancel()
            if not completed and not (200 <= status < 300 and run_in(headers)):
                # No answer to give again, and no durable run to join: a retry runs anew.
                with contextlib.suppress(Exception):
                    await asyncio.shield(keys.release(owner))

    @staticmethod
    async def _answer_from_state(scope: Scope, tenant: str, previous: Previous, send: Send) -> None:
        """`/agent/invoke`'s answer rebuilt from the thread: what the turn added is
        what follows its last human message."""
        thread_id = str(previous.thread_id)
        graph = scope["app"].state.turns.graph
        snapshot = await graph.aget_state({"configurable": {"thread_id": thread_key_for(tenant, thread_id)}})
        messages = list(snapshot.values.get("messages", []))
        start = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=-1) + 1
        output = {"thread_id": thread_id, "messages": messages[start:]}
        body = dumps({"output": output, "metadata": {"run_id": previous.run_id, "feedback_tokens": []}})
        headers = [(b"content-type", b"application/json"), (b"idempotent-replayed", b"true")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _renew_forever(keys: IdempotencyKeys, owner: str) -> None:
        while True:
            await asyncio.sleep(keys.lease_s / 3)
            with contextlib.suppress(Exception):
                await keys.renew(owner)

    @staticmethod
    async def _answer_again(previous: Previous, send: Send) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in previous.headers or []]
        headers.append((b"idempotent-replayed", b"true"))
        await send({"type": "http.response.start", "status": previous.status_code or 200, "headers": headers})
        await send({"type": "http.response.body", "body": previous.body or b""})

    async def _join(self, previous: Previous, scope: Scope, receive: Receive, send: Send) -> None:
        """The first request's process died but its run lives on (taken up by another
        worker): answer as that route would, by joining the run."""
        base = (
            f"/threads/{previous.thread_id}/runs/{previous.run_id}"
            if previous.thread_id
            else f"/runs/{previous.run_id}"
        )
        path, extra = scope["path"].rstrip("/"), []
        if path.endswith("/stream"):
            target, extra = f"{base}/stream", [(b"last-event-id", b"-1")]
        elif path.endswith("/wait"):
            target = f"{base}/join"
        else:
            target = base
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", b"content-type")]
        joined: dict[str, Any] = {
            **scope,
            "method": "GET",
            "path": target,
            "raw_path": target.encode(),
            "query_string": b"",
            "headers": headers + extra,
        }
        await self.app(joined, self._replay_receive(b"", receive), send)
