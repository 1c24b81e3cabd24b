"""Completion webhooks: which URLs are refused; and end to end (the real server,
two workers, a receiver on 127.0.0.1 in a thread): one signed delivery per run,
retries until a failing receiver answers, a receiver that is down holds nothing
up, cron ticks deliver too, and a delivery whose sender stopped is finished by
another worker."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from langgraph_sdk import get_client
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from agentserve.core.webhooks import address_problem, signature_of, webhook_problem
from tests.support import TEST_KEY, ServerProcess, free_port

SECRET = "webhook-secret-0123456789abcdef"


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


# --- which URLs may be called ----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("http://127.0.0.1:8000/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://10.0.0.7/hook", "private"),
        ("http://192.168.1.20/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://0.0.0.0/hook", "not a public"),
        ("ftp://example.com/hook", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("https:///no-host", "no host"),
        ("http://host.invalid/hook", "does not resolve"),
    ],
)
def test_inward_and_odd_urls_are_refused_by_name(url: str, named: str) -> None:
    problem = webhook_problem(url, allow_private=False)
    assert problem is not None and named in problem


def test_public_addresses_pass_and_private_ones_pass_when_allowed() -> None:
    assert webhook_problem("https://93.184.215.14/hook", allow_private=False) is None
    assert webhook_problem("http://127.0.0.1:9/hook", allow_private=True) is None
    assert webhook_problem("ftp://127.0.0.1/hook", allow_private=True) is not None
    import ipaddress

    assert address_problem(ipaddress.ip_address("100.64.0.1")) is not None  # shared (carrier-grade NAT) space


def test_the_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"run_id":"r"}'
    assert signature_of(body, SECRET) == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


# --- end to end --------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    def signed(self) -> bool:
        expected = "sha256=" + hmac.new(SECRET.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-webhook-signature", ""), expected)


class Receiver:
    """An HTTP receiver on 127.0.0.1 that records every POST. A path answers the
    statuses scripted for it in turn, then 200."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.scripts: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.deliveries.append(
                        Delivery(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    script = receiver.scripts.get(self.path, [])
                    status = script.pop(0) if script else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def received(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 30.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.received(path)) < count:
            assert time.monotonic() < deadline, f"{path}: {len(self.received(path))} of {count} deliveries"
            time.sleep(0.1)
        return self.received(path)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    hooks = Receiver()
    yield hooks
    hooks.server.shutdown()


@pytest.fixture(scope="module")
def server(database_url: str, workdir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        database_url,
        workdir,
        WEBHOOK_ALLOW_PRIVATE="true",
        WEBHOOK_SECRET=SECRET,
        WEBHOOK_MAX_ATTEMPTS="3",
        CRON_POLL_S="1",
    ).start()
    yield process
    process.stop()


def sdk(server: ServerProcess) -> Any:
    return get_client(url=server.url, api_key=TEST_KEY)


def run_row(database_url: str, run_id: str) -> dict[str, Any] | None:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT status, webhook_status, webhook_attempts FROM agent_runs WHERE run_id = %s", (run_id,)
        ).fetchone()


def wait_for_status(database_url: str, run_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = run_row(database_url, run_id)
        if row is not None and row["webhook_status"] not in (None, "sending"):
            return row
        assert time.monotonic() < deadline, f"webhook of run {run_id} still {row}"
        time.sleep(0.1)


async def test_a_finished_run_is_delivered_once_signed(
    server: ServerProcess, receiver: Receiver, database_url: str
) -> None:
    client = sdk(server)
    thread = await client.threads.create()
    path = f"/once/{uuid.uuid4()}"
    run = await client.runs.create(
        thread["thread_id"], "agent", input=ask("What is 12 * 8?"), webhook=receiver.url(path)
    )
    await client.runs.join(thread["thread_id"], run["run_id"])
    [delivery] = receiver.wait_for(path, 1)
    assert delivery.signed() and delivery.headers["x-webhook-id"] == run["run_id"]
    body = delivery.json()
    assert (body["run_id"], body["thread_id"], body["status"]) == (run["run_id"], thread["thread_id"], "success")
    assert "96" in body["values"]["messages"][-1]["content"]
    assert wait_for_status(database_url, run["run_id"]) == {
        "status": "success",
        "webhook_status": "delivered",
        "webhook_attempts": 1,
    }
    time.sleep(2)  # nobody else sends it again
    assert len(receiver.received(path)) == 1


async def test_a_receiver_that_fails_twice_gets_it_on_the_third_attempt(
    server: ServerProcess, receiver: Receiver, database_url: str
) -> None:
    client = sdk(server)
    thread = await client.threads.create()
    path = f"/flaky/{uuid.uuid4()}"
    receiver.scripts[path] = [503, 502]
    run = await client.runs.create(thread["thread_id"], "agent", input=ask("hello"), webhook=receiver.url(path))
    deliveries = receiver.wait_for(path, 3)
    assert all(d.signed() for d in deliveries) and len({d.body for d in deliveries}) == 1
    assert wait_for_status(database_url, run["run_id"])["webhook_attempts"] == 3
    assert run_row(database_url, run["run_id"])["webhook_status"] == "delivered"  # type: ignore[index]
    time.sleep(1.5)
    assert len(receiver.received(path)) == 3


async def test_a_receiver_that_is_down_neither_slows_nor_fails_the_run(
    server: ServerProcess, database_url: str
) -> None:
    client = sdk(server)
    thread = await client.threads.create()
    down = f"http://127.0.0.1:{free_port()}/nobody-home"
    started = time.monotonic()
    run = await client.runs.create(thread["thread_id"], "agent", input=ask("hello"), webhook=down)
    await client.runs.join(thread["thread_id"], run["run_id"])
    assert time.monotonic() - started < 5
    assert (await client.runs.get(thread["thread_id"], run["run_id"]))["status"] == "success"
    row = wait_for_status(database_url, run["run_id"])
    assert (row["webhook_status"], row["webhook_attempts"]) == ("failed (ConnectError)", 3)


async def test_a_stateless_run_erased_when_done_still_delivers(server: ServerProcess, receiver: Receiver) -> None:
    path = f"/stateless/{uuid.uuid4()}"
    run = await sdk(server).runs.create(None, "agent", input=ask("hello"), webhook=receiver.url(path))
    [delivery] = receiver.wait_for(path, 1)
    assert delivery.signed() and delivery.json()["run_id"] == run["run_id"]
    assert delivery.json()["values"]["messages"][-1]["content"] == "You said: hello"


async def test_a_run_paused_for_approval_delivers_its_interrupt(server: ServerProcess, receiver: Receiver) -> None:
    client = sdk(server)
    thread = await client.threads.create()
    path = f"/approval/{uuid.uuid4()}"
    order = f"WH-{uuid.uuid4().hex[:8]}"
    await client.runs.create(
        thread["thread_id"], "agent", input=ask(f"Please refund order {order} for 25"), webhook=receiver.url(path)
    )
    [delivery] = receiver.wait_for(path, 1)
    body = delivery.json()
    assert body["status"] == "success"
    assert body["values"]["__interrupt__"][0]["value"]["args"] == {"order_id": order, "amount": 25.0}


async def test_a_cron_tick_delivers_its_webhook(server: ServerProcess, receiver: Receiver, database_url: str) -> None:
    client = sdk(server)
    thread = await client.threads.create()
    path = f"/cron/{uuid.uuid4()}"
    cron = await client.crons.create_for_thread(
        thread["thread_id"], "agent", schedule="0 0 1 1 *", input=ask("hello"), webhook=receiver.url(path)
    )
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE agent_crons SET next_run_date = now() WHERE cron_id = %s", (cron["cron_id"],))
    [delivery] = receiver.wait_for(path, 1)
    body = delivery.json()
    assert delivery.signed() and body["metadata"]["cron_id"] == cron["cron_id"]
    assert body["thread_id"] == thread["thread_id"] and body["status"] == "success"
    await client.crons.delete(cron["cron_id"])


@pytest.mark.parametrize(("webhook_status", "attempts"), [(None, 0), ("sending", 1)])
def test_a_delivery_whose_sender_stopped_is_finished_by_another_worker(
    server: ServerProcess, receiver: Receiver, database_url: str, webhook_status: str | None, attempts: int
) -> None:
    """Never claimed (the worker died as the run ended), or claimed with a hold
    that lapsed (it died between attempts): a worker takes it up."""
    run_id, path = str(uuid.uuid4()), f"/orphan/{uuid.uuid4()}"
    with psycopg.connect(database_url) as conn:
        conn.execute(
            """INSERT INTO agent_runs (run_id, tenant, thread_key, assistant_id, status, kwargs, multitask_strategy,
                   durable, attached, output, webhook, webhook_status, webhook_attempts, webhook_due_at,
                   created_at, ended_at)
               VALUES (%s, 'default', %s, %s, 'success', '{}', 'enqueue', true, false, %s, %s, %s, %s,
                       now() - interval '1 minute', now() - interval '3 minutes', now() - interval '2 minutes')""",
            (
                run_id,
                f"default/{uuid.uuid4()}",
                str(uuid.uuid4()),
                Jsonb({"messages": []}),
                receiver.url(path),
                webhook_status,
                attempts,
            ),
        )
    [delivery] = receiver.wait_for(path, 1, timeout=20)
    assert delivery.signed() and delivery.json()["run_id"] == run_id
    row = wait_for_status(database_url, run_id)
    assert (row["webhook_status"], row["webhook_attempts"]) == ("delivered", attempts + 1)
    time.sleep(2)
    assert len(receiver.received(path)) == 1


def test_a_refused_webhook_url_is_a_422(server: ServerProcess) -> None:
    """ftp is refused even where private addresses are allowed. The runs.create
    half passes once the runs routes call webhook_problem."""
    with server.client() as client:
        cron = client.post(
            "/runs/crons", json={"assistant_id": "agent", "schedule": "0 9 * * *", "webhook": "ftp://x/y"}
        )
        assert cron.status_code == 422 and "http or https" in cron.json()["detail"]
        run = client.post("/runs", json={"assistant_id": "agent", "input": ask("hi"), "webhook": "ftp://x/y"})
        assert run.status_code == 422 and "http or https" in str(run.json()["detail"])
