"""The LangGraph API side of the bench: the reference server, `langgraph dev`, in a
venv of its own under .data/ (its pins are not the project's; see
bench/reference-requirements.txt) serving bench/reference_graph.py against the
offline model run as a process of its own; and the client that drives the LangGraph
API, of the reference or of our server, with `langgraph_sdk`'s `runs.wait`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from langgraph_sdk import get_client

from bench.common import RESULTS_DIR, Call, Turn
from tests.support import ROOT, free_port

REQUIREMENTS = Path(__file__).with_name("reference-requirements.txt")
VENV = ROOT / ".data" / "reference-venv"
GRAPH_ID = "agent"
T = TypeVar("T")


@dataclass(frozen=True)
class Served:
    url: str
    pid: int


def reference_venv() -> Path:
    """The venv's bin folder; made anew when the requirements changed since it was made."""
    stamp = VENV / "requirements.sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted and (VENV / "bin" / "langgraph").exists():
        return VENV / "bin"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(wanted)
    return VENV / "bin"


@contextlib.contextmanager
def background(name: str, command: list[str], env: dict[str, str], cwd: Path, ready: str) -> Iterator[int]:
    """`command` in its own process group, once GET `ready` answers 200, until the
    block ends; yields its pid. Its output is kept as bench-results/<name>.log."""
    RESULTS_DIR.mkdir(exist_ok=True)
    log_path = RESULTS_DIR / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_ready(name, process, ready, log_path, timeout=120)
            yield process.pid
        finally:
            stop(process)


def wait_ready(name: str, process: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited early:\n{log_path.read_text(errors='replace')[-6000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log_path.read_text(errors='replace')[-6000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@contextlib.contextmanager
def offline_model(latency_ms: float = 0.0) -> Iterator[Served]:
    """The project's offline model as a process of its own; `url` ends in /v1."""
    port = free_port()
    command = [sys.executable, "-m", "agentserve.offline_model", "--port", str(port), "--latency-ms", f"{latency_ms:g}"]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    base = f"http://127.0.0.1:{port}/v1"
    with background("offline-model", command, env, ROOT, f"{base}/models") as pid:
        yield Served(base, pid)


@contextlib.contextmanager
def reference_server(model_url: str) -> Iterator[Served]:
    """`langgraph dev`, one process, serving bench/reference_graph.py as graph "agent"
    with its in-memory runtime, from a scratch folder (where it keeps its state)."""
    bin_dir = reference_venv()
    scratch = Path(tempfile.mkdtemp(prefix="bench-reference-"))
    config = {"dependencies": ["."], "graphs": {GRAPH_ID: "bench.reference_graph:graph"}}
    (scratch / "langgraph.json").write_text(json.dumps(config, indent=2) + "\n")
    port = free_port()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(scratch),
        "PYTHONPATH": str(ROOT),
        "REFERENCE_MODEL_URL": model_url,
        # Logging as running_server sets it for ours; no analytics, no tracing upload.
        "LOG_LEVEL": "WARNING",
        "LOG_COLOR": "false",
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "LANGSMITH_TRACING": "false",
        "LANGCHAIN_TRACING_V2": "false",
    }
    port_args = ["--port", str(port), "--n-jobs-per-worker", "64"]
    command = [str(bin_dir / "langgraph"), "dev", "--no-browser", "--no-reload", *port_args]
    url = f"http://127.0.0.1:{port}"
    try:
        with background("server-langgraph-dev", command, env, scratch, f"{url}/ok") as pid:
            yield Served(url, pid)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def lgapi_missing(url: str, api_key: str) -> str | None:
    """None if `url` speaks the LangGraph API, else what it answered instead."""
    try:
        response = httpx.post(f"{url}/assistants/search", json={}, headers={"x-api-key": api_key}, timeout=10)
    except httpx.TransportError as exc:
        return f"POST /assistants/search: {type(exc).__name__}: {exc}"
    return None if response.status_code == 200 else f"POST /assistants/search answers {response.status_code}"


def final_answer(state: Any) -> str | None:
    """The last message's text of a `runs.wait` result (the thread's values)."""
    messages = state.get("messages") if isinstance(state, dict) else None
    return str(messages[-1].get("content")) if messages else None


async def with_lgapi_clients(
    url: str, api_key: str, count: int, threads: int, body: Callable[[Call], Awaitable[T]]
) -> T:
    """Runs `body` with a Call that sends conversation c's turns on SDK client c, one
    `runs.wait` per turn. The loops name their threads; the API wants ids it made, so
    `threads` are made beforehand and handed out to names as they come, to keep
    `threads.create` out of the timed turns (more names than that get theirs made
    then)."""
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(get_client(url=url, api_key=api_key, timeout=120)) for _ in range(count)
        ]
        spare = [
            thread["thread_id"]
            for thread in await asyncio.gather(*(clients[0].threads.create() for _ in range(threads)))
        ]
        ids: dict[str, str] = {}

        async def call(conversation: int, thread: str, turn: Turn) -> tuple[str | None, int]:
            client = clients[conversation]
            if thread not in ids:
                ids[thread] = spare.pop() if spare else (await client.threads.create())["thread_id"]
            # mypy cannot match a nested list literal to the SDK's recursive JSON type.
            turn_input = {"messages": [{"role": "user", "content": turn.text}]}
            state = await client.runs.wait(ids[thread], GRAPH_ID, input=turn_input)  # type: ignore[arg-type]
            answer = final_answer(state)
            # The SDK hands back parsed JSON: its size is that of it encoded again.
            return (None if answer == turn.expected else f"answer {answer!r}"), len(orjson.dumps(state))

        return await body(call)
