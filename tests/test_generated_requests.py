"""Generated requests for every operation in /openapi.json (both APIs, the
playground, the thread routes, operations), through the real app and a real
PostgreSQL: whatever a client sends, the answer is never a 5xx.

Bodies come from each operation's own JSON schema (so many are valid and reach
the core) and from arbitrary JSON (so many are not); path and query values mix
ids that exist with arbitrary text. Bounded: a few examples per operation."""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentserve.settings import Settings
from app import create_app
from tests.support import TEST_KEY

EXAMPLES_PER_OPERATION = 12
KNOWN_THREAD = "fuzz-thread"
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
PATH_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-_.~ %", min_size=1, max_size=24)


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=database_url,
        AGENT_API_KEY=TEST_KEY,
        BUSY_THREAD_WAIT_S=0.5,
        RUN_TIMEOUT_S=20,
    )
    with TestClient(create_app(config), headers={"X-API-Key": TEST_KEY}, raise_server_exceptions=False) as test:
        # A session for the playground routes, and a thread (with a run) that exists.
        test.post(
            "/signin",
            content=f"api_key={TEST_KEY}&next=/agent/playground/",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        test.post("/threads", json={"thread_id": KNOWN_THREAD})
        test.post(
            f"/threads/{KNOWN_THREAD}/runs/wait",
            json={"assistant_id": "agent", "input": {"messages": [{"role": "user", "content": "hi"}]}},
        )
        yield test


def operations() -> list[tuple[str, str]]:
    config = Settings(_env_file=None, AGENT_API_KEY=TEST_KEY)  # type: ignore[call-arg]
    spec = create_app(config).openapi()
    return sorted((path, method) for path, item in spec["paths"].items() for method in item if method != "parameters")


def from_schema(schema: dict[str, Any], spec: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped by an OpenAPI schema: enough of JSON Schema for FastAPI's and
    LangServe's documents (refs, unions, objects, arrays, enums, scalars)."""
    if depth > 5:
        return JSON
    if ref := schema.get("$ref"):
        name = ref.rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(spec["components"]["schemas"][name], spec, depth + 1))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for union in ("anyOf", "oneOf", "allOf"):
        if union in schema:
            return st.one_of([from_schema(option, spec, depth + 1) for option in schema[union]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, spec, depth) for k in kind])
    if kind == "string":
        return st.text(max_size=schema.get("maxLength", 30) and min(schema.get("maxLength", 30), 30))
    if kind == "integer":
        return st.integers(min_value=schema.get("minimum", -5), max_value=schema.get("maximum", 2000))
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items") or {}, spec, depth + 1), max_size=3)
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        return st.fixed_dictionaries(
            {k: from_schema(v, spec, depth + 1) for k, v in properties.items() if k in required},
            optional={k: from_schema(v, spec, depth + 1) for k, v in properties.items() if k not in required},
        )
    return JSON


def body_strategy(spec: dict[str, Any], operation: dict[str, Any]) -> st.SearchStrategy[Any]:
    content = (operation.get("requestBody") or {}).get("content", {})
    schema = (content.get("application/json") or {}).get("schema")
    if not schema:
        return st.none() | JSON
    return from_schema(schema, spec) | JSON


def param_strategy(spec: dict[str, Any], parameter: dict[str, Any], known: list[str]) -> st.SearchStrategy[Any]:
    if parameter["in"] == "path":
        return st.sampled_from(known) | PATH_TEXT
    return st.none() | from_schema(parameter.get("schema") or {}, spec) | st.text(max_size=10)


@pytest.mark.parametrize(("path", "method"), operations())
def test_no_generated_request_gets_a_5xx(client: TestClient, path: str, method: str) -> None:
    spec = client.app.openapi()  # type: ignore[attr-defined]
    operation = spec["paths"][path][method]
    known = [KNOWN_THREAD, "00000000-0000-0000-0000-000000000000", "agent"]
    parameters = operation.get("parameters", [])
    strategies = {p["name"]: param_strategy(spec, p, known) for p in parameters}
    locations = {p["name"]: p["in"] for p in parameters}

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(values=st.fixed_dictionaries(strategies), body=body_strategy(spec, operation))
    def check(values: dict[str, Any], body: Any) -> None:
        url = path
        query: dict[str, str] = {}
        headers: dict[str, str] = {}
        for name, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value)
            if locations[name] == "path":
                url = url.replace("{" + name + "}", str(value))
            elif locations[name] == "query" and value is not None:
                query[name] = text
            elif locations[name] == "header" and value is not None and text.isprintable() and text.isascii():
                headers[name] = text
        response = client.request(method.upper(), url, params=query, json=body, headers=headers)
        assert response.status_code < 500, f"{method.upper()} {url} {query} {body!r} -> {response.text[:500]}"

    check()
    assert client.get("/health").status_code == 200
