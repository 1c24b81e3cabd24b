"""Faults caused for real against the real server: a failing model provider, the
database going away and coming back, shutdown, disconnects, unreachable tracing."""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from psycopg.conninfo import conninfo_to_dict

from tests.support import ROOT, TEST_KEY, ServerProcess, TcpProxy, answer_of, free_port, turn_body

pytestmark = pytest.mark.e2e


@pytest.fixture()
def provider() -> Iterator[str]:
    """The offline model as a separate provider process, so a test can make it fail."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "agentserve.offline_model", "--port", str(port), "--seed", "7"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{url}/v1/models", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(10)


def set_faults(provider: str, **faults: float) -> None:
    httpx.post(f"{provider}/admin/faults", json=faults, timeout=5).raise_for_status()


def provider_env(provider: str, **extra: str) -> dict[str, str]:
    return {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": f"{provider}/v1", "OPENAI_MODEL": "offline-model", **extra}


def test_with_30_percent_of_model_calls_failing_tool_turns_still_answer(
    database_url: str, workdir: Path, provider: str
) -> None:
    set_faults(provider, failure_rate=0.3)
    server = ServerProcess(database_url, workdir, **provider_env(provider)).start()
    try:
        with server.client() as client:
            responses = [
                client.post("/agent/invoke", json=turn_body(f"What is {i} * 8?", f"flaky-{i}")) for i in range(10)
            ]
        correct = [r for i, r in enumerate(responses) if r.status_code == 200 and str(i * 8) in answer_of(r)]
        assert len(correct) >= 9, [r.status_code for r in responses]
        for response in responses:
            if response.status_code != 200:
                assert response.status_code == 503 and response.headers["retry-after"]
        stats = httpx.get(f"{provider}/admin/stats").json()
        assert stats["failures"] > 0  # the faults really happened
    finally:
        server.stop()


def test_circuit_breaker_answers_503_at_once_while_the_provider_fails_then_recovers(
    database_url: str, workdir: Path, provider: str
) -> None:
    env = provider_env(
        provider, OPENAI_MAX_RETRIES="0", MODEL_BREAKER_THRESHOLD="3", MODEL_BREAKER_COOLDOWN_S="2", WEB_CONCURRENCY="1"
    )
    server = ServerProcess(database_url, workdir, **env).start()
    try:
        set_faults(provider, failure_rate=1.0)
        with server.client() as client:
            for i in range(3):
                assert client.post("/agent/invoke", json=turn_body("hi", f"cb-{i}")).status_code == 503
            calls_before = httpx.get(f"{provider}/admin/stats").json()["calls"]
            started = time.monotonic()
            refused = client.post("/agent/invoke", json=turn_body("hi", "cb-open"))
            assert refused.status_code == 503 and time.monotonic() - started < 1.0
            assert int(refused.headers["retry-after"]) >= 1
            assert httpx.get(f"{provider}/admin/stats").json()["calls"] == calls_before  # provider not called
            set_faults(provider, failure_rate=0.0)
            time.sleep(2.2)
            assert answer_of(client.post("/agent/invoke", json=turn_body("hi", "cb-after"))) == "You said: hi"
    finally:
        server.stop()


def test_database_outage_fails_fast_and_recovers_without_restart(database_url: str, workdir: Path) -> None:
    target = conninfo_to_dict(database_url)
    proxy = TcpProxy(str(target.get("host") or "127.0.0.1"), int(target.get("port") or 5432)).start()
    server = ServerProcess(proxy.database_url(database_url), workdir, DB_CONNECT_TIMEOUT_S="3").start()
    thread = "outage-1"
    try:
        with server.client() as client:
            assert answer_of(client.post("/agent/invoke", json=turn_body("my name is Ada", thread))) == (
                "Nice to meet you, Ada."
            )
            proxy.cut()
            started = time.monotonic()
            assert client.get("/ready").status_code == 503
            assert time.monotonic() - started < 5
            started = time.monotonic()
            failed = client.post("/agent/invoke", json=turn_body("what is my name", thread))
            assert failed.status_code == 503, failed.text
            assert time.monotonic() - started < 10
            assert client.get("/health").status_code == 200  # the worker lives on
            proxy.start()
            deadline = time.monotonic() + 20
            while client.get("/ready").status_code != 200:
                assert time.monotonic() < deadline, "did not recover"
                time.sleep(0.5)
            recovered = client.post("/agent/invoke", json=turn_body("what is my name", thread))
            assert answer_of(recovered) == "Your name is Ada."
    finally:
        server.stop()
        proxy.cut()


def test_sigterm_lets_the_turn_in_flight_finish(database_url: str, workdir: Path) -> None:
    server = ServerProcess(database_url, workdir, OFFLINE_MODEL_LATENCY_MS="1500").start()
    result: dict[str, httpx.Response] = {}

    def run_turn() -> None:
        result["response"] = httpx.post(
            f"{server.url}/agent/invoke",
            json=turn_body("What is 12 * 8?", "sigterm-1"),
            headers={"X-API-Key": TEST_KEY},
            timeout=30,
        )

    runner = threading.Thread(target=run_turn)
    runner.start()
    time.sleep(0.5)
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    runner.join(30)
    assert "96" in answer_of(result["response"])
    assert server.process.wait(30) == 0


def test_a_client_that_leaves_a_stream_cancels_its_run(database_url: str, workdir: Path) -> None:
    server = ServerProcess(database_url, workdir, OFFLINE_MODEL_LATENCY_MS="1000").start()
    try:
        with httpx.stream(
            "POST",
            f"{server.url}/agent/stream",
            json=turn_body("What is 12 * 8?", "leaver"),
            headers={"X-API-Key": TEST_KEY},
            timeout=30,
        ) as response:
            # Set by sse-starlette, so that proxies such as nginx do not hold the stream back.
            assert response.headers["x-accel-buffering"] == "no"
            for _ in response.iter_raw():
                break  # the first event: the model's tool call; its answer is a second away
        time.sleep(3)
        with server.client() as client:
            messages = client.get("/threads/leaver/state").json()["values"].get("messages", [])
            # Cancelled: had the run gone on, its answer (a second after the tool call)
            # would be stored. A cancelled run is not stored (the thread is as before).
            assert messages == [], messages
            again = client.post("/agent/invoke", json=turn_body("What is 12 * 8?", "leaver"))
            assert answer_of(again) == "The answer is 96."
    finally:
        server.stop()


def test_unreachable_tracing_endpoint_never_slows_or_fails_a_turn(database_url: str, workdir: Path) -> None:
    env = {
        "LANGSMITH_TRACING": "true",
        "LANGSMITH_API_KEY": "lsv2-test",
        "LANGSMITH_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }
    server = ServerProcess(database_url, workdir, **env).start()
    try:
        with server.client() as client:
            started = time.monotonic()
            for i in range(3):
                assert "96" in answer_of(client.post("/agent/invoke", json=turn_body("What is 12 * 8?", f"traced-{i}")))
            assert time.monotonic() - started < 5
    finally:
        server.stop()


def test_metrics_add_up_all_workers_and_logs_hold_no_content(database_url: str, workdir: Path) -> None:
    server = ServerProcess(database_url, workdir).start()
    try:
        for i in range(8):
            with server.client() as client:  # fresh connections spread over the workers
                assert (
                    client.post("/agent/invoke", json=turn_body("secret words here", f"metrics-{i}")).status_code == 200
                )
        with server.client() as client:
            assert client.get("/metrics", headers={"X-API-Key": ""}).status_code == 401
            text = client.get("/metrics").text
        invokes = [
            line
            for line in text.splitlines()
            if line.startswith("agent_http_requests_total") and 'route="/agent/invoke"' in line
        ]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in invokes) == 8
        assert "agent_model_call_duration_seconds_count" in text and "agent_checkpoint_seconds_count" in text
        server.stop()
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        requests = [line for line in lines if line.get("message") == "request" and line.get("path") == "/agent/invoke"]
        assert requests and all(r["request_id"] and r["tenant"] == "default" and r["thread_hash"] for r in requests)
        assert "secret words" not in server.log() and TEST_KEY not in server.log()
    finally:
        server.stop()


def test_opentelemetry_spans_reach_an_otlp_collector(database_url: str, workdir: Path) -> None:
    received: list[bytes] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the handler API's name
            received.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    server = ServerProcess(database_url, workdir, **env).start()
    try:
        with server.client() as client:
            assert "96" in answer_of(client.post("/agent/invoke", json=turn_body("What is 12 * 8?", "otel-1")))
            assert client.get("/threads/otel-1/state").status_code == 200
        # The exporter batches on a timer, so the request's span and its model
        # calls' spans may arrive in separate posts: gather them all.
        deadline = time.monotonic() + 10
        while True:
            spans = [
                span
                for body in list(received)
                for resource in ExportTraceServiceRequest.FromString(body).resource_spans
                for scope in resource.scope_spans
                for span in scope.spans
            ]
            # The root span is ours; FastAPI adds its own spans beneath it.
            requests = [span for span in spans if span.name == "POST /agent/invoke" and not span.parent_span_id]
            model_calls = [span for span in spans if span.name == "model call"]
            state_read = any(span.name.startswith("GET /threads/") for span in spans)
            if requests and len(model_calls) >= 2 and state_read:  # a tool turn calls the model twice
                break
            assert time.monotonic() < deadline, f"spans arrived: {sorted(span.name for span in spans)}"
            time.sleep(0.2)
        (request,) = requests
        assert all(call.trace_id == request.trace_id for call in model_calls), "model calls outside the request's trace"
        attributes = {a.key: a.value for a in request.attributes}
        assert attributes["http.route"].string_value == "/agent/invoke"
        assert attributes["http.response.status_code"].int_value == 200
        # Named by the route template, never by the thread name in the path.
        assert any(span.name == "GET /threads/{thread_id}/state" for span in spans)
        assert not any("otel-1" in span.name for span in spans)
        assert "What is" not in str(spans), "span attributes carry no message content"
    finally:
        server.stop()
        collector.shutdown()
