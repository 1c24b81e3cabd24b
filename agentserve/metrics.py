"""Prometheus metrics, aggregated across worker processes.

The launcher points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the
workers start; each worker then writes its samples there and /metrics sums them."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

HTTP_REQUESTS = Counter("agent_http_requests_total", "HTTP requests", ["route", "method", "status"])
HTTP_DURATION = Histogram(
    "agent_http_request_duration_seconds", "HTTP request duration", ["route"], buckets=LATENCY_BUCKETS
)
TURN_DURATION = Histogram("agent_turn_duration_seconds", "Agent turn duration", ["outcome"], buckets=LATENCY_BUCKETS)
MODEL_CALL_DURATION = Histogram("agent_model_call_duration_seconds", "Model call duration", buckets=LATENCY_BUCKETS)
MODEL_CALL_ERRORS = Counter("agent_model_call_errors_total", "Failed model calls", ["kind"])
CHECKPOINT_DURATION = Histogram(
    "agent_checkpoint_seconds", "Checkpoint read/write duration", ["operation"], buckets=LATENCY_BUCKETS
)
CHECKPOINT_READS = Counter(
    "agent_checkpoint_reads_total", "Latest-checkpoint reads, by whether this worker's copy was current", ["source"]
)
RUNS_IN_FLIGHT = Gauge("agent_runs_in_flight", "Runs in progress", multiprocess_mode="livesum")
THREAD_WAIT = Histogram("agent_thread_wait_seconds", "Wait for a busy thread", buckets=LATENCY_BUCKETS)
POOL_CONNECTIONS = Gauge(
    "agent_db_pool_connections", "Database pool connections", ["state"], multiprocess_mode="livesum"
)
BREAKER_OPEN = Gauge(
    "agent_model_circuit_open", "1 while the model circuit breaker is open", multiprocess_mode="livemax"
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
