"""Optional OpenTelemetry traces, exported over OTLP/HTTP when the standard
OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variable is set; otherwise nothing is done
and the API's no-op tracer costs nothing. (LangSmith tracing needs no code: its
own LANGSMITH_* variables switch it on, and it sends from a background thread.)"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, Status, StatusCode

tracer = trace.get_tracer("agentserve")


def configure_tracing(service_name: str = "agent") -> TracerProvider | None:
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def record_span(span: Span, method: str, route: str, status: int, request_id: str) -> None:
    """Names a request's span by its route, never by its content."""
    span.update_name(f"{method} {route}")
    span.set_attribute("http.request.method", method)
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("agent.request_id", request_id)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
