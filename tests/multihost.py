"""A multi-host rig on one machine: PostgreSQL behind PgBouncer (transaction
pooling), three replicas of the server as separate "hosts" on 127.0.0.2-4, and
HAProxy in front; conversational clients load it through HAProxy while one replica
is killed with kill -9 and another is stopped with SIGTERM.

The pieces (all started here, all stopped in `MultiHostStack.close`):

- `PgBouncer`: Debian's pgbouncer in the foreground as an unprivileged user (it
  refuses root), from a config it writes to a directory of its own. A unix-socket
  upstream that user cannot reach is bridged by a `TcpProxy` on 127.0.0.1.
- `Replica`: `python -m agentserve.serve` bound to its own loopback address, with
  DATABASE_URL through PgBouncer (no prepared statements) and DATABASE_DIRECT_URL
  straight to PostgreSQL (LISTEN); the schema is set up once, by
  `python -m agentserve.migrate`, before any replica starts.
- `HAProxy`: round robin, `/ready` health checks every 500 ms, `X-Served-By` on
  every response (HAProxy's own 502/503 included), so each client request is
  attributed to the replica that served it; a stats page shows when a replica is
  taken out.
- `run_load`: K clients, each in a thread, hold conversations of a few turns mixing
  LangServe `/agent/invoke`, `runs/wait`, resumable `runs/stream` (rejoined with
  `Last-Event-ID` when cut) and background runs (`POST .../runs` + `join`). Each
  turn-creating request carries an `Idempotency-Key` (one per turn) and is re-sent
  with the same key after a dropped connection, a 5xx or a 409. Midway one replica
  is killed, later another one is sent SIGTERM; afterwards every thread's whole
  transcript is read back and each turn's unique message counted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.support import ROOT, TEST_KEY, ServerProcess, TcpProxy

SYSTEM_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")
REPLICA_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
KINDS = ("invoke", "wait", "stream", "background")
# The server's log lines (uvicorn's) of a shutdown that completed.
SHUTDOWN_LINES = ("Shutting down", "Finished server process", "Stopping parent process")


def find_binary(name: str) -> str | None:
    """`name` on PATH, or in the system directories a non-root PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SYSTEM_BIN_DIRS))


def missing_binaries() -> str | None:
    """Why the rig cannot run here, or None. `.ci/run` installs both from apt."""
    missing = [name for name in ("haproxy", "pgbouncer") if find_binary(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: apt-get install -y haproxy pgbouncer)"
    return None


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log, without the routine ones (2xx access lines of the
    server and of HAProxy, HAProxy's stats page)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path.name}: {exc})"
    return "\n".join([line for line in text.splitlines() if not routine(line)][-lines:])


def routine(line: str) -> bool:
    if '"logger": "agentserve.access"' in line:
        return '"status": 2' in line or '"status": 3' in line
    if " lb replicas/" in line:
        return " ---- " in line and any(f" {code} " in line for code in (200, 201, 202, 204))
    return " stats stats/<STATS> " in line


def free_port_on(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str, *, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(every)


def kill_group(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
    """Signal the process's whole group (it was started in a session of its own);
    the group may outlive its leader, so this works after the leader is gone too."""
    if process is None:
        return
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- PgBouncer ------------------------------------------------------------------


def unprivileged_user() -> pwd.struct_passwd | None:
    """The user PgBouncer runs as: None when we are not root (it runs as us)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "agentserve-pgbouncer"], check=True, timeout=30)
    return pwd.getpwnam("agentserve-pgbouncer")


def ini_value(value: str) -> str:
    """A value of a PgBouncer connection string."""
    if value and not any(ch.isspace() or ch in "'\\" for ch in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PgBouncer:
    """Debian's PgBouncer (1.18) in transaction mode in front of `upstream_url`."""

    def __init__(self, upstream_url: str, logdir: Path) -> None:
        self.upstream_url = upstream_url
        self.port = free_port_on("127.0.0.1")
        self.log_path = logdir / "pgbouncer.log"
        self.confdir: Path | None = None
        self.proxy: TcpProxy | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.user = unprivileged_user()

    @property
    def url(self) -> str:
        return make_conninfo(self.upstream_url, host="127.0.0.1", port=str(self.port))

    def _upstream(self) -> tuple[str, int, str, str, str]:
        """Where PostgreSQL really is (libpq resolves defaults and unix sockets)."""
        params = conninfo_to_dict(self.upstream_url)
        with psycopg.connect(self.upstream_url, connect_timeout=10) as conn:
            host, port = conn.info.host, int(conn.info.port)
            user, dbname = conn.info.user, conn.info.dbname
        return host, port, dbname, user, str(params.get("password") or "")

    def _reachable_as_user(self, socket_path: str) -> bool:
        if self.user is None:
            return os.access(socket_path, os.W_OK)
        check = subprocess.run(
            ["test", "-w", socket_path], user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[], timeout=10
        )
        return check.returncode == 0

    def start(self, timeout: float = 20.0) -> PgBouncer:
        binary = find_binary("pgbouncer")
        assert binary, "pgbouncer is not installed"
        host, port, dbname, user, password = self._upstream()
        if host.startswith("/") and not self._reachable_as_user(f"{host}/.s.PGSQL.{port}"):
            # The embedded server's socket directory is private to us: bridge it.
            self.proxy = TcpProxy(host, port).start()
            host, port = "127.0.0.1", self.proxy.port
        self.confdir = Path(tempfile.mkdtemp(prefix="multihost-pgbouncer-"))
        upstream = " ".join(
            f"{key}={ini_value(value)}"
            for key, value in (("host", host), ("port", str(port)), ("dbname", dbname), ("user", user))
        )
        if password:
            upstream += f" password={ini_value(password)}"
        config = f"""[databases]
{dbname} = {upstream}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.confdir / "users.txt"}
pool_mode = transaction
max_client_conn = 400
default_pool_size = 25
reserve_pool_size = 5
ignore_startup_parameters = extra_float_digits,options
server_login_retry = 1
log_connections = 0
log_disconnections = 0
admin_users = {user}
"""
        quoted_user = user.replace('"', '""')
        quoted_password = password.replace('"', '""')
        files = {"pgbouncer.ini": config, "users.txt": f'"{quoted_user}" "{quoted_password}"\n'}
        for name, text in files.items():
            (self.confdir / name).write_text(text)
            (self.confdir / name).chmod(0o600)
        run_as: dict[str, Any] = {}
        if self.user is not None:
            for path in [self.confdir, *(self.confdir / name for name in files)]:
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
            run_as = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [binary, str(self.confdir / "pgbouncer.ini")],
            cwd=self.confdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **run_as,
        )
        log.close()
        wait_for(self._answers, timeout, f"pgbouncer on 127.0.0.1:{self.port}\n{tail(self.log_path)}", every=0.2)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {self.process.returncode}:\n{tail(self.log_path)}")
        try:
            with psycopg.connect(self.url, connect_timeout=2, prepare_threshold=None) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def stats(self) -> dict[str, int]:
        """Transactions and queries PgBouncer carried (its admin console, which
        speaks only the simple query protocol)."""
        admin = make_conninfo(self.url, dbname="pgbouncer")
        with psycopg.connect(admin, autocommit=True, connect_timeout=5, cursor_factory=psycopg.ClientCursor) as conn:
            cursor = conn.cursor()
            cursor.execute("SHOW STATS")
            names = [column.name for column in cursor.description or []]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        mine = [row for row in rows if row.get("database") != "pgbouncer"]
        return {
            "transactions": sum(int(row.get("total_xact_count") or 0) for row in mine),
            "queries": sum(int(row.get("total_query_count") or 0) for row in mine),
        }

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                kill_group(self.process)
                self.process.wait(10)
        if self.proxy is not None:
            self.proxy.cut()
        if self.confdir is not None:
            shutil.rmtree(self.confdir, ignore_errors=True)


# --- the replicas -------------------------------------------------------------------


class Replica(ServerProcess):
    """One "host": the whole server (supervisor and workers) on its own loopback
    address, in its own directory (its .data, its log)."""

    def __init__(self, name: str, host: str, database_url: str, direct_url: str, workdir: Path, **env: str) -> None:
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(database_url, directory, **env)
        self.name, self.host = name, host
        self.port = free_port_on(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = directory / f"{name}.log"
        self.env.update(HOST=host, PORT=str(self.port), DATABASE_DIRECT_URL=direct_url)

    def launch(self) -> Replica:
        """Start without waiting (replicas start side by side)."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agentserve.serve"],
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def terminate(self) -> None:
        """SIGTERM to the supervisor and every worker, as a pod's stop does."""
        kill_group(self.process, signal.SIGTERM)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return tail(self.log_path, 25)


def migrate(direct_url: str, workdir: Path) -> None:
    """The schema, once, straight to PostgreSQL (as a migration job would)."""
    done = subprocess.run(
        [sys.executable, "-m", "agentserve.migrate"],
        env={**os.environ, "DATABASE_URL": direct_url, "PYTHONPATH": str(ROOT)},
        cwd=workdir,
        capture_output=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"migration failed:\n{done.stderr.decode(errors='replace')[-3000:]}")


# --- HAProxy ------------------------------------------------------------------------


class HAProxy:
    """Debian's HAProxy (2.6) in the foreground, round robin over the replicas."""

    def __init__(self, replicas: list[Replica], logdir: Path) -> None:
        self.replicas = replicas
        self.port = free_port_on("127.0.0.1")
        self.stats_port = free_port_on("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / "haproxy.log"
        self.config_path = logdir / "haproxy.cfg"
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        servers = "\n".join(f"    server {r.name} {r.host}:{r.port} check" for r in self.replicas)
        return f"""global
    maxconn 2000
    log stderr format raw local0 info

defaults
    mode http
    log global
    option httplog
    # One connection per request on both sides. Server side: no idle keep-alive
    # connection that a replica closes on its own (uvicorn after 5 s) is reused.
    # Client side: when a replica dies before answering a request that was not the
    # first on its client connection, HAProxy closes that connection silently and
    # logs nothing (the client is to retry, as after a keep-alive race); with one
    # request per connection it answers 502 with X-Served-By, so every failure a
    # client sees names its replica.
    option httpclose
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 60s
    timeout http-request 10s
    timeout queue 10s
    timeout check 1s
    retries 2
    option redispatch

frontend lb
    bind 127.0.0.1:{self.port}
    # The clients tag each request, so a failure they saw is found in this log.
    capture request header X-Request-Tag len 64
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
    http-after-response set-header X-Served-By %s
{servers}

listen stats
    bind 127.0.0.1:{self.stats_port}
    stats enable
    stats uri /stats
"""

    def start(self, timeout: float = 30.0) -> HAProxy:
        binary = find_binary("haproxy")
        assert binary, "haproxy is not installed"
        self.config_path.write_text(self.config())
        check = subprocess.run([binary, "-c", "-f", str(self.config_path)], capture_output=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects its config:\n{check.stdout.decode()}{check.stderr.decode()}")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [binary, "-f", str(self.config_path), "-db"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        names = [r.name for r in self.replicas]
        wait_for(
            lambda: all(self.states().get(name) == "UP" for name in names),
            timeout,
            f"haproxy sees every replica UP (now {self._states_or_error()})\n{tail(self.log_path)}",
            every=0.2,
        )
        return self

    def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy's health checks see it (UP, DOWN, UP 1/2...)."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.process.returncode}:\n{tail(self.log_path)}")
        try:
            text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).text
        except httpx.TransportError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows if row.get("pxname") == "replicas"}

    def _states_or_error(self) -> str:
        try:
            return str(self.states())
        except RuntimeError as exc:
            return str(exc)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                kill_group(self.process)
                self.process.wait(10)


# --- the whole stack ---------------------------------------------------------------


class MultiHostStack:
    """PgBouncer, three replicas and HAProxy; `close()` stops all of them."""

    def __init__(self, database_url: str, workdir: Path, *, workers: int = 2, **env: str) -> None:
        self.database_url = database_url
        self.workdir = workdir
        self.workers = workers
        self.env = env
        self.bouncer: PgBouncer | None = None
        self.replicas: list[Replica] = []
        self.haproxy: HAProxy | None = None

    def start(self, timeout: float = 90.0) -> MultiHostStack:
        self.bouncer = PgBouncer(self.database_url, self.workdir)  # kept before start: close() stops it
        self.bouncer.start()
        migrate(self.database_url, self.workdir)
        env = {
            "WEB_CONCURRENCY": str(self.workers),
            "DB_PREPARE_THRESHOLD": "",
            "SETUP_SCHEMA_ON_START": "false",
            "OFFLINE_MODEL_LATENCY_MS": "300",
            "THREAD_LEASE_TTL_S": "3",
            "GRACEFUL_TIMEOUT_S": "20",
            # HAProxy marks a replica down after 2 failed checks 500 ms apart: keep
            # serving (with /ready at 503) a little longer than that after SIGTERM.
            "SHUTDOWN_DRAIN_S": "2",
            **self.env,
        }
        self.replicas = [
            Replica(f"app{i + 1}", host, self.bouncer.url, self.database_url, self.workdir, **env)
            for i, host in enumerate(REPLICA_HOSTS)
        ]
        for replica in self.replicas:
            replica.launch()
        deadline = time.monotonic() + timeout
        for replica in self.replicas:
            replica.wait_until_healthy(max(1.0, deadline - time.monotonic()))
        self.haproxy = HAProxy(self.replicas, self.workdir)
        self.haproxy.start()
        return self

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def diagnostics(self, lines: int = 25) -> str:
        """The last lines of every log, for failure messages."""
        parts = [f"--- {r.name} ({r.url}) ---\n{tail(r.log_path, lines)}" for r in self.replicas]
        if self.haproxy is not None:
            parts.append(f"--- haproxy ---\n{tail(self.haproxy.log_path, lines)}")
        if self.bouncer is not None:
            parts.append(f"--- pgbouncer ---\n{tail(self.bouncer.log_path, lines)}")
        return "\n".join(parts)

    def close(self) -> None:
        for replica in self.replicas:
            replica.terminate()
        deadline = time.monotonic() + 25
        for replica in self.replicas:
            if replica.process is None:
                continue
            try:
                replica.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            kill_group(replica.process)  # whatever is left of the group
            try:
                replica.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.haproxy is not None:
            self.haproxy.stop()
        if self.bouncer is not None:
            self.bouncer.stop()


@contextmanager
def multihost_stack(database_url: str, workdir: Path, **kwargs: Any) -> Iterator[MultiHostStack]:
    stack = MultiHostStack(database_url, workdir, **kwargs)
    try:
        try:
            stack.start()
        except Exception as exc:
            raise RuntimeError(f"the stack did not start: {exc}\n{stack.diagnostics()}") from exc
        yield stack
    finally:
        stack.close()


# --- the clients ---------------------------------------------------------------------


class Retry(Exception):
    """A failure the client answers by sending again (or rejoining)."""

    def __init__(self, server: str | None, kind: str, detail: str) -> None:
        super().__init__(f"{kind} from {server}: {detail}")
        self.server, self.kind, self.detail = server, kind, detail


class TurnFailed(Exception):
    pass


@dataclass
class Failure:
    at: float
    server: str | None
    kind: str  # "5xx", "dropped", "409", or "cut-after-end" (a stream cut after its end event)
    what: str  # which request: post, stream, rejoin, join
    detail: str


@dataclass
class Turn:
    client: int
    thread_id: str
    number: int
    kind: str
    text: str
    key: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = 0.0
    ended: float | None = None
    answered: bool = False
    answer: str = ""
    error: str | None = None
    posts: int = 0
    accepted_by: list[str | None] = field(default_factory=list)  # per turn-creating request answered
    runs: list[tuple[str, str | None]] = field(default_factory=list)  # (run id, replica that took the request)
    run_path: str | None = None
    posted_at: float = 0.0
    event_ids: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    stream_servers: list[str | None] = field(default_factory=list)
    legs: list[str] = field(default_factory=list)  # per stream connection: replica and event ids
    answer_message_ids: set[str] = field(default_factory=set)
    streamed_text: dict[str, str] = field(default_factory=dict)  # message id -> its streamed tokens
    final_answer: tuple[str, str] = ("", "")  # (id, content) of the last message of the last values
    streamed_answer: str = ""  # the answer in the last `values` event the stream carried
    rejoins: int = 0
    failures: list[Failure] = field(default_factory=list)
    stored: int = -1  # times its message is in the stored transcript
    answers_stored: int = -1

    expected_answer: str = ""
    final_message_ids: set[str] = field(default_factory=set)


@dataclass
class InFlight:
    turn: Turn
    server: str | None
    what: str
    since: float


class Ledger:
    """Everything the clients did, shared by their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.rejoins = 0
        self.join_retries = 0
        self.replayed = 0
        self.turns: list[Turn] = []
        self.failures: list[Failure] = []
        self.inflight: dict[int, InFlight] = {}

    def begin(self, turn: Turn) -> None:
        with self.lock:
            self.turns.append(turn)

    def sent(self, turn: Turn, server: str | None, what: str) -> None:
        with self.lock:
            self.inflight[id(turn)] = InFlight(turn, server, what, time.monotonic())

    def counted(self) -> int:
        with self.lock:
            self.requests += 1
            return self.requests

    def idle(self, turn: Turn) -> None:
        with self.lock:
            self.inflight.pop(id(turn), None)

    def failed(self, turn: Turn, retry: Retry, what: str) -> None:
        failure = Failure(time.monotonic(), retry.server, retry.kind, what, retry.detail[:300])
        with self.lock:
            self.failures.append(failure)
            turn.failures.append(failure)

    def bump(self, counter: str) -> None:
        with self.lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def snapshot(self) -> list[InFlight]:
        with self.lock:
            return list(self.inflight.values())


@dataclass
class ClientPolicy:
    turns_per_thread: int = 6
    post_attempts: int = 8
    rejoin_attempts: int = 10
    turn_deadline_s: float = 60.0
    read_timeout_s: float = 15.0
    # Off only to measure what the keys save (duplicates without them).
    idempotency_keys: bool = True


def new_turn(client: int, thread_id: str, number: int, kind: str) -> Turn:
    """A turn whose message is unique, so it can be counted in the transcript.
    Streams and background runs also ask a sum: a tool call and two model calls
    make them long enough (about a second) to be cut mid-way."""
    note = f"my note is {uuid.uuid4().hex}"
    if kind in ("stream", "background"):
        a, b = random.randint(2, 99), random.randint(2, 99)
        return Turn(
            client, thread_id, number, kind, f"{note}, so what is {a} * {b}?", expected_answer=f"The answer is {a * b}."
        )
    return Turn(client, thread_id, number, kind, note, expected_answer=f"You said: {note}")


def backoff(attempt: int) -> float:
    return min(2.0, 0.2 * 2 ** (attempt - 1)) * random.uniform(0.7, 1.3)


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


class Conversationalist:
    """One client: conversations of a few turns each, one turn at a time, until told
    to stop; the kinds of turn rotate so all kinds are in flight at any moment."""

    def __init__(self, index: int, base_url: str, ledger: Ledger, stop: threading.Event, policy: ClientPolicy):
        self.index, self.ledger, self.stop, self.policy = index, ledger, stop, policy
        timeout = httpx.Timeout(connect=3.0, read=policy.read_timeout_s, write=5.0, pool=5.0)
        self.http = httpx.Client(base_url=base_url, headers={"x-api-key": TEST_KEY}, timeout=timeout)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            number = 0
            while not self.stop.is_set():
                thread_id = self.new_thread()
                for _ in range(self.policy.turns_per_thread):
                    if self.stop.is_set():
                        break
                    kind = KINDS[(self.index + number) % len(KINDS)]
                    number += 1
                    self.turn(new_turn(self.index, thread_id, number, kind))
        except BaseException as exc:  # reported by run_load
            self.error = exc
        finally:
            self.http.close()

    # --- one request ---

    def call(
        self,
        turn: Turn,
        method: str,
        path: str,
        what: str,
        read: Callable[[httpx.Response, str | None], Any],
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One request through HAProxy; its body is read by `read` while the
        response is open. Dropped connections, 5xx and 409 raise Retry."""
        tag = f"c{turn.client}-t{turn.number}-{what}-{self.ledger.counted()}"
        self.ledger.sent(turn, None, what)
        server: str | None = None
        try:
            headers = {**(headers or {}), "X-Request-Tag": tag}
            with self.http.stream(method, path, json=body, headers=headers) as response:
                server = response.headers.get("x-served-by")
                self.ledger.sent(turn, server, what)
                if response.headers.get("idempotent-replayed"):
                    self.ledger.bump("replayed")
                if response.status_code >= 500 or response.status_code == 409:
                    response.read()
                    kind = "409" if response.status_code == 409 else "5xx"
                    raise Retry(server, kind, f"HTTP {response.status_code}: {response.text[:200]}")
                if response.status_code >= 400:
                    response.read()
                    raise TurnFailed(f"{what} {path}: HTTP {response.status_code} from {server}: {response.text[:300]}")
                return read(response, server)
        except httpx.TransportError as exc:
            raise Retry(server, "dropped", f"{type(exc).__name__}: {exc} [{tag}]") from exc
        except Retry as retry:
            retry.detail += f" [{tag}]"
            raise
        finally:
            self.ledger.idle(turn)

    def new_thread(self) -> str:
        thread_id = str(uuid.uuid4())
        for attempt in range(self.policy.post_attempts):
            if attempt:
                time.sleep(backoff(attempt))
            try:
                response = self.http.post("/threads", json={"thread_id": thread_id, "if_exists": "do_nothing"})
                if response.status_code == 200:
                    return thread_id
            except httpx.TransportError:
                pass
        raise TurnFailed(f"could not create thread {thread_id}")

    def post(
        self, turn: Turn, path: str, body: Any, read: Callable[[httpx.Response, str | None], Any], what: str = "post"
    ) -> Any:
        """The turn-creating request, re-sent with the same Idempotency-Key."""
        deadline = turn.started + self.policy.turn_deadline_s
        last: Retry | None = None
        for attempt in range(self.policy.post_attempts):
            if attempt:
                self.ledger.bump("retries")
                time.sleep(backoff(attempt))
            if time.monotonic() > deadline:
                break
            turn.posts += 1
            headers = {"Idempotency-Key": turn.key} if self.policy.idempotency_keys else {}
            try:
                return self.call(turn, "POST", path, what, read, body=body, headers=headers)
            except Retry as retry:
                self.ledger.failed(turn, retry, what)
                last = retry
                if turn.kind == "stream" and turn.run_path:
                    raise  # the run exists: rejoin its stream instead
        raise TurnFailed(f"{turn.kind} turn gave up after {turn.posts} requests; last: {last}")

    def accepted(self, turn: Turn, response: httpx.Response, server: str | None) -> None:
        turn.accepted_by.append(server)
        turn.posted_at = time.monotonic()
        location = response.headers.get("content-location")
        if location and "/runs/" in location:
            turn.run_path = location
            turn.runs.append((location.rsplit("/", 1)[-1], server))

    # --- the kinds of turn ---

    def turn(self, turn: Turn) -> None:
        turn.started = time.monotonic()
        self.ledger.begin(turn)
        try:
            answer = getattr(self, f"turn_{turn.kind}")(turn)
            if answer != turn.expected_answer:
                raise TurnFailed(f"{turn.kind} turn answered {answer!r}, not {turn.expected_answer!r}")
            turn.answer, turn.answered = answer, True
        except (TurnFailed, Retry) as exc:
            turn.error = str(exc)
        except Exception as exc:  # an answer of the wrong shape: the turn failed, the client goes on
            turn.error = f"{type(exc).__name__}: {exc}"
        finally:
            turn.ended = time.monotonic()

    def turn_invoke(self, turn: Turn) -> str:
        body = {"input": ask(turn.text), "config": {"configurable": {"thread_id": turn.thread_id}}}

        def read(response: httpx.Response, server: str | None) -> str:
            self.accepted(turn, response, server)
            return str(json.loads(response.read())["output"]["messages"][-1]["content"])

        return str(self.post(turn, "/agent/invoke", body, read))

    def turn_wait(self, turn: Turn) -> str:
        body = {"assistant_id": "agent", "input": ask(turn.text)}

        def read(response: httpx.Response, server: str | None) -> str:
            self.accepted(turn, response, server)
            return values_answer(json.loads(response.read()))

        return str(self.post(turn, f"/threads/{turn.thread_id}/runs/wait", body, read))

    def turn_background(self, turn: Turn) -> str:
        body = {"assistant_id": "agent", "input": ask(turn.text)}

        def created(response: httpx.Response, server: str | None) -> str:
            self.accepted(turn, response, server)
            return str(json.loads(response.read())["run_id"])

        run_id = self.post(turn, f"/threads/{turn.thread_id}/runs", body, created)
        path = f"/threads/{turn.thread_id}/runs/{run_id}/join"
        last: Retry | None = None
        for attempt in range(self.policy.rejoin_attempts):
            if attempt:
                self.ledger.bump("join_retries")
                time.sleep(backoff(attempt))
            try:
                return str(self.call(turn, "GET", path, "join", lambda r, _: values_answer(json.loads(r.read()))))
            except Retry as retry:
                self.ledger.failed(turn, retry, "join")
                last = retry
        raise TurnFailed(f"join of {run_id} gave up; last: {last}")

    def turn_stream(self, turn: Turn) -> str:
        body = {
            "assistant_id": "agent",
            "input": ask(turn.text),
            "stream_mode": ["values", "messages-tuple"],
            "stream_resumable": True,
        }

        def read(response: httpx.Response, server: str | None) -> str:
            self.accepted(turn, response, server)
            return self.read_events(turn, response, server)

        try:
            return str(self.post(turn, f"/threads/{turn.thread_id}/runs/stream", body, read, what="stream"))
        except Retry:
            pass  # cut after the run began: rejoin it
        assert turn.run_path is not None
        last: Retry | None = None
        for attempt in range(self.policy.rejoin_attempts):
            time.sleep(backoff(attempt + 1))
            self.ledger.bump("rejoins")
            turn.rejoins += 1
            after = str(turn.event_ids[-1]) if turn.event_ids else "-1"
            try:
                return str(
                    self.call(
                        turn,
                        "GET",
                        f"{turn.run_path}/stream",
                        "rejoin",
                        lambda r, server: self.read_events(turn, r, server),
                        headers={"Last-Event-ID": after},
                    )
                )
            except Retry as retry:
                self.ledger.failed(turn, retry, "rejoin")
                last = retry
        raise TurnFailed(f"stream of {turn.run_path} not rejoined; last: {last}")

    def read_events(self, turn: Turn, response: httpx.Response, server: str | None) -> str:
        """Server-sent events until `end`; the answer is the last `values` event's
        (across the legs of a rejoined stream)."""
        turn.stream_servers.append(server)
        first = len(turn.event_ids)
        try:
            return self._read_events(turn, response, server)
        finally:
            ids = turn.event_ids[first:]
            turn.legs.append(f"{server}:{ids[0]}-{ids[-1]}" if ids else f"{server}:none")

    def _read_events(self, turn: Turn, response: httpx.Response, server: str | None) -> str:
        event, event_id, data = "", None, []
        answer = ""
        lines = response.iter_lines()
        for line in lines:
            if line.startswith(":"):
                continue
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("id:"):
                event_id = int(line[3:].strip())
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and (event or data):
                payload = json.loads("\n".join(data)) if data else None
                if event_id is not None:
                    turn.event_ids.append(event_id)
                turn.events.append(event)
                if event == "values" and isinstance(payload, dict):
                    answer = values_answer(payload)
                    turn.streamed_answer = answer
                    messages = payload.get("messages", [])
                    turn.final_message_ids = {str(m.get("id")) for m in messages}
                    if messages:
                        turn.final_answer = (str(messages[-1].get("id")), str(messages[-1].get("content")))
                elif event == "messages" and isinstance(payload, list) and payload[1].get("langgraph_node"):
                    if payload[1]["langgraph_node"] == "call_model" and payload[0].get("id"):
                        message_id = str(payload[0]["id"])
                        turn.answer_message_ids.add(message_id)
                        content = payload[0].get("content")
                        if isinstance(content, str):
                            turn.streamed_text[message_id] = turn.streamed_text.get(message_id, "") + content
                elif event == "end":
                    self.read_to_close(turn, lines, server)
                    if turn.streamed_answer != turn.expected_answer:
                        # The stream did not carry the answer (checked apart, as a
                        # garbled stream): the turn's answer is the run's result.
                        return self.final_values(turn)
                    return answer
                elif event == "error":
                    raise TurnFailed(f"stream error event: {payload}")
                event, event_id, data = "", None, []
        raise Retry(server, "dropped", "the stream ended before its end event")

    def read_to_close(self, turn: Turn, lines: Iterator[str], server: str | None) -> None:
        """After `end` the response must end cleanly: a client such as an SDK that
        reads to the end would see a cut there as an error."""
        try:
            for line in lines:
                if line and not line.startswith(":"):
                    raise TurnFailed(f"stream went on after its end event: {line[:100]}")
        except httpx.TransportError as exc:
            retry = Retry(server, "cut-after-end", f"{type(exc).__name__}: {exc}")
            self.ledger.failed(turn, retry, "stream-end")

    def final_values(self, turn: Turn) -> str:
        """A rejoin after the last `values` event: the answer is the run's result."""
        assert turn.run_path is not None
        return values_answer(retrying_get(self.http, f"{turn.run_path}/join"))


def values_answer(values: dict[str, Any]) -> str:
    if "__error__" in values:
        raise TurnFailed(f"the run failed: {values['__error__']}")
    return str(values["messages"][-1]["content"])


# --- the scenario --------------------------------------------------------------------


@dataclass
class Figures:
    clients: int = 0
    replicas: int = 0
    workers_per_replica: int = 0
    requests: int = 0
    turns: int = 0
    answered: int = 0
    unanswered: int = 0
    http_5xx: int = 0
    dropped: int = 0
    busy_409: int = 0
    streams_cut_after_end: int = 0
    failures_by_replica: dict[str, int] = field(default_factory=dict)
    failures_off_victim: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    retries: int = 0
    stream_rejoins: int = 0
    join_retries: int = 0
    replayed_answers: int = 0  # answers marked `idempotent-replayed` (a retry answered from the first request)
    turns_stored: int = 0
    messages_stored: int = 0
    duplicates: int = 0
    duplicate_kinds: dict[str, int] = field(default_factory=dict)
    duplicate_details: list[str] = field(default_factory=list)
    lost: int = 0
    retries_answered_by_first_run: int = 0
    retries_that_started_another_run: int = 0
    victim: str = ""
    killed_in_flight: dict[str, int] = field(default_factory=dict)
    runs_held_by_victim: dict[str, int] = field(default_factory=dict)
    runs_retaken: int = 0
    held_runs_not_retaken: list[str] = field(default_factory=list)
    streams_cut_by_kill: int = 0
    streams_rejoined_whole: int = 0
    stream_id_problems: list[str] = field(default_factory=list)
    spliced_streams: int = 0
    spliced_details: list[str] = field(default_factory=list)
    garbled_streams: list[str] = field(default_factory=list)
    victim_down_after_s: float | None = None
    disturbed_turns: int = 0
    recovery_s: float | None = None
    stopped: str = ""
    stopped_exit_code: int | None = None
    stopped_exit_s: float | None = None
    stopped_down_after_s: float | None = None
    stopped_in_flight: int = 0
    stopped_turns_unanswered: int = 0
    stopped_streams_in_flight: int = 0
    stopped_failures: int = 0
    stopped_log_lines: dict[str, int] = field(default_factory=dict)
    stopped_runs_retaken: int = 0
    idempotency_supported: bool | None = None
    pgbouncer: dict[str, int] = field(default_factory=dict)
    client_errors: list[str] = field(default_factory=list)
    turn_errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def summary(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False)


@dataclass
class Scenario:
    clients: int = 8
    warmup_s: float = 3.0
    trigger_s: float = 15.0  # how long to wait for the moment to kill / stop
    recovery_timeout_s: float = 40.0
    after_stop_s: float = 3.0
    policy: ClientPolicy = field(default_factory=ClientPolicy)


def moment_to_kill(ledger: Ledger, alive: set[str], need: tuple[str, ...]) -> str | None:
    """A replica executing a resumable stream that has begun, and the other kinds
    in `need` just started there ("background": a run its client joins; "wait": a
    `runs/wait` whose client waits): kill -9 there cuts all of them mid-way."""
    now = time.monotonic()
    found: dict[str, Counter[str]] = defaultdict(Counter)
    for item in ledger.snapshot():
        turn = item.turn
        accepted = turn.accepted_by[-1] if turn.accepted_by else None
        age = now - turn.posted_at
        if turn.kind == "stream" and item.what == "stream" and item.server in alive and turn.event_ids:
            if "end" not in turn.events and age < 0.25:
                found["stream"][item.server] += 1
        elif turn.kind == "background" and item.what == "join" and accepted in alive and age < 0.15:
            found["background"][str(accepted)] += 1
        elif turn.kind == "wait" and item.what == "post" and item.server in alive and turn.runs and age < 0.1:
            found["wait"][str(item.server)] += 1
    for server in sorted(found["stream"], key=lambda s: -found["stream"][s]):
        if all(found[kind][server] for kind in need):
            return server
    return None


def runs_taken_by(ledger: Ledger, server: str) -> list[str]:
    with ledger.lock:
        return [run_id for turn in ledger.turns for run_id, taken_by in list(turn.runs) if taken_by == server]


def held_runs(database_url: str, run_ids: list[str]) -> dict[str, str]:
    if not run_ids:
        return {}
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT run_id::text, status FROM agent_runs WHERE run_id = ANY(%s::uuid[])", (run_ids,)
        ).fetchall()
    return {str(run_id): str(status) for run_id, status in rows}


def run_load(stack: MultiHostStack, scenario: Scenario | None = None) -> Figures:
    """The load through HAProxy with a kill -9 and a SIGTERM midway; the figures."""
    scenario = scenario or Scenario()
    assert stack.haproxy is not None
    haproxy = stack.haproxy
    figures = Figures(clients=scenario.clients, replicas=len(stack.replicas), workers_per_replica=stack.workers)
    ledger = Ledger()
    stop = threading.Event()
    clients = [Conversationalist(i, haproxy.url, ledger, stop, scenario.policy) for i in range(scenario.clients)]
    threads = [threading.Thread(target=c.run, name=f"client-{c.index}", daemon=True) for c in clients]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    kill_at: float | None = None
    disturbed: dict[int, Turn] = {}
    draining: list[InFlight] = []
    held: set[str] = set()
    accepted_on_stopped: list[str] = []
    try:
        time.sleep(scenario.warmup_s)
        alive = {r.name for r in stack.replicas}

        # 1. kill -9 of the replica where a stream and a background run are mid-way.
        # Best: a wait is cut too (its retry must join the run, not start another).
        victim_name = None
        for need, within in ((("background", "wait"), scenario.trigger_s / 2), (("background",), scenario.trigger_s)):
            deadline = time.monotonic() + within
            while victim_name is None and time.monotonic() < deadline:
                victim_name = moment_to_kill(ledger, alive, need)
                time.sleep(0.01)
        victim_name = victim_name or moment_to_kill(ledger, alive, ()) or "app1"
        victim = stack.replica(victim_name)
        in_flight = ledger.snapshot()
        kill_group(victim.process)
        kill_at = time.monotonic()
        assert victim.process is not None
        victim.process.wait(10)
        figures.victim = victim_name
        alive.discard(victim_name)
        figures.killed_in_flight = dict(Counter(i.turn.kind for i in in_flight if i.server == victim_name))
        accepted_there = runs_taken_by(ledger, victim_name)
        statuses = held_runs(stack.database_url, accepted_there)
        held = {run_id for run_id, status in statuses.items() if status in ("running", "pending")}
        disturbed = {id(i.turn): i.turn for i in in_flight if i.server in (victim_name, None)}
        with ledger.lock:
            disturbed |= {id(t): t for t in ledger.turns if any(run_id in held for run_id, _ in t.runs)}
        wait_for(
            lambda: haproxy.states().get(victim_name, "").startswith("DOWN"),
            10,
            f"haproxy takes {victim_name} out",
            every=0.05,
        )
        figures.victim_down_after_s = round(time.monotonic() - kill_at, 2)
        wait_for(
            lambda: all(t.ended is not None for t in disturbed.values()),
            scenario.recovery_timeout_s,
            "every turn in flight at the kill ends",
        )

        # 2. SIGTERM to a replica serving a stream: it drains, then exits 0.
        deadline = time.monotonic() + scenario.trigger_s
        stopped_name = None
        while stopped_name is None and time.monotonic() < deadline:
            stopped_name = moment_to_kill(ledger, alive, ())
            time.sleep(0.01)
        stopped_name = stopped_name or sorted(alive)[0]
        stopped = stack.replica(stopped_name)
        draining = [i for i in ledger.snapshot() if i.server == stopped_name]
        stopped.terminate()
        term_at = time.monotonic()
        figures.stopped = stopped_name
        figures.stopped_in_flight = len(draining)
        figures.stopped_streams_in_flight = sum(1 for i in draining if i.what in ("stream", "rejoin"))
        accepted_on_stopped = runs_taken_by(ledger, stopped_name)
        down_at = None
        assert stopped.process is not None
        grace = float(stack.replicas[0].env.get("GRACEFUL_TIMEOUT_S", "20"))
        exit_deadline = term_at + grace + 15
        while stopped.process.poll() is None and time.monotonic() < exit_deadline:
            if down_at is None and haproxy.states().get(stopped_name, "").startswith("DOWN"):
                down_at = time.monotonic()
            time.sleep(0.05)
        figures.stopped_exit_code = stopped.process.poll()
        figures.stopped_exit_s = round(time.monotonic() - term_at, 2)
        if down_at is None and haproxy.states().get(stopped_name, "").startswith("DOWN"):
            down_at = time.monotonic()
        figures.stopped_down_after_s = round(down_at - term_at, 2) if down_at else None
        log_text = stopped.log_path.read_text(errors="replace")
        figures.stopped_log_lines = {line: log_text.count(line) for line in SHUTDOWN_LINES}
        alive.discard(stopped_name)

        # 3. A little more load on what is left, then stop the clients.
        time.sleep(scenario.after_stop_s)
    finally:
        stop.set()
        for thread in threads:
            thread.join(scenario.policy.turn_deadline_s + 20)
    figures.duration_s = round(time.monotonic() - began, 1)
    figures.client_errors = [f"client {c.index}: {c.error!r}" for c in clients if c.error is not None]
    figures.client_errors += [t.name for t in threads if t.is_alive()]

    turns = ledger.turns
    check_store(haproxy.url, turns)
    figures.requests = ledger.requests
    figures.turns = len(turns)
    figures.answered = sum(t.answered for t in turns)
    figures.unanswered = sum(not t.answered for t in turns)
    figures.turn_errors = [f"{t.kind} turn {t.key}: {t.error}" for t in turns if t.error][:10]
    figures.http_5xx = sum(f.kind == "5xx" for f in ledger.failures)
    figures.dropped = sum(f.kind == "dropped" for f in ledger.failures)
    figures.busy_409 = sum(f.kind == "409" for f in ledger.failures)
    figures.streams_cut_after_end = sum(f.kind == "cut-after-end" for f in ledger.failures)
    figures.failures_by_replica = dict(Counter(str(f.server) for f in ledger.failures))

    def described(f: Failure) -> str:
        at = f"{f.at - kill_at:+.2f}s from the kill" if kill_at is not None else f"+{f.at - began:.2f}s"
        return f"{f.kind} {f.what} from {f.server} at {at}: {f.detail[:150]}"

    figures.failures = [described(f) for f in ledger.failures][:40]
    figures.failures_off_victim = [
        described(f) for f in ledger.failures if f.server != figures.victim or (kill_at is not None and f.at < kill_at)
    ]
    figures.stopped_failures = sum(f.server == figures.stopped for f in ledger.failures)
    figures.stopped_turns_unanswered = sum(not i.turn.answered for i in draining)
    if kill_at is not None:
        # From the kill until every turn it disturbed is answered (in flight there,
        # holding a run there, or failed there later).
        for turn in turns:
            if any(f.server == figures.victim for f in turn.failures):
                disturbed[id(turn)] = turn
        if all(t.answered and t.ended is not None for t in disturbed.values()):
            figures.recovery_s = round(
                max((t.ended or kill_at for t in disturbed.values()), default=kill_at) - kill_at, 2
            )
        figures.disturbed_turns = len(disturbed)
    figures.retries = ledger.retries
    figures.stream_rejoins = ledger.rejoins
    figures.join_retries = ledger.join_retries
    figures.replayed_answers = ledger.replayed
    figures.turns_stored = sum(t.stored >= 1 for t in turns)
    figures.messages_stored = sum(max(t.stored, 0) for t in turns)
    duplicated = [t for t in turns if t.stored > 1]
    figures.duplicates = len(duplicated)
    figures.duplicate_kinds = dict(Counter(t.kind for t in duplicated))
    figures.duplicate_details = [
        f"{t.kind} turn {t.key} stored {t.stored}x: {t.posts} requests, accepted by {t.accepted_by}, runs {t.runs},"
        f" failures {[f'{f.kind} {f.what} from {f.server}: {f.detail[-40:]}' for f in t.failures]}"
        for t in duplicated
    ][:10]
    figures.lost = sum(t.answered and t.stored == 0 for t in turns)
    # A retry of a turn whose run had begun: the key makes it answer from that run
    # (the same run id comes back); without it a second run starts.
    figures.retries_answered_by_first_run = sum(
        1 for t in turns if len({r for r, _ in t.runs}) < len(t.runs) and len({r for r, _ in t.runs}) == 1
    )
    figures.retries_that_started_another_run = sum(1 for t in turns if len({r for r, _ in t.runs}) > 1)

    runs = run_statuses(haproxy.url, turns)
    if kill_at is not None:
        kinds = {run_id: t.kind for t in turns for run_id, _ in t.runs}
        figures.runs_held_by_victim = dict(Counter(kinds.get(r, "?") for r in held))
        figures.runs_retaken = sum(1 for r in held if runs.get(r, {}).get("attempt", 0) > 1)
        figures.held_runs_not_retaken = [
            f"{kinds.get(r)} run {r}: {runs.get(r)}"
            for r in held
            if runs.get(r, {}).get("status") != "success" or runs.get(r, {}).get("attempt", 0) <= 1
        ]
        figures.stopped_runs_retaken = sum(1 for r in accepted_on_stopped if runs.get(r, {}).get("attempt", 0) > 1)
    streams = [t for t in turns if t.kind == "stream"]
    for turn in streams:
        spliced = bool(turn.final_message_ids and turn.answer_message_ids - turn.final_message_ids)
        gap = turn.answered and turn.event_ids != list(range(1, len(turn.event_ids) + 1))
        garbled = turn.answered and garbled_answer(turn)
        if gap or spliced or garbled:
            run_id = turn.runs[-1][0] if turn.runs else ""
            run = runs.get(run_id, {})
            problem = f"run {run_id} (attempt {run.get('attempt')}) legs {turn.legs}, ids {turn.event_ids}"
            if garbled:
                problem += f"; streamed {turn.streamed_text}, final {turn.final_answer}"
            problem += f"; stored: {stored_events(stack.database_url, run_id)}"
            if gap:
                figures.stream_id_problems.append(problem)
            if garbled:
                figures.garbled_streams.append(problem)
            elif spliced:
                figures.spliced_details.append(problem)
    cut = [t for t in streams if any(f.server == figures.victim and f.what == "stream" for f in t.failures)]
    figures.streams_cut_by_kill = len(cut)
    # Whole: every event once, in order, whether it came back by a rejoin (cut after
    # the headers) or by a retry that joined the first run (cut before them).
    figures.streams_rejoined_whole = sum(
        1 for t in cut if t.answered and t.event_ids == list(range(1, len(t.event_ids) + 1))
    )
    # Tokens streamed of a message the final values do not hold: a cut run's first
    # attempt, spliced with the attempt that finished it.
    figures.spliced_streams = sum(
        1 for t in streams if t.answered and t.final_message_ids and t.answer_message_ids - t.final_message_ids
    )
    figures.idempotency_supported = probe_idempotency(haproxy.url)
    if stack.bouncer is not None:
        figures.pgbouncer = stack.bouncer.stats()
    return figures


def garbled_answer(turn: Turn) -> bool:
    """Whether the answer a client rebuilds from the stream is wrong: its last
    `values` event does not hold the answer, or the final message's tokens do not
    add up to its content. Tokens of an earlier attempt's answer (a run cut by the
    kill and taken up again) may come before it; clients drop them when the final
    `values` replaces the state, and they are counted as spliced streams."""
    if turn.streamed_answer != turn.expected_answer:
        return True
    final_id, final_content = turn.final_answer
    return final_id in turn.streamed_text and turn.streamed_text[final_id] != final_content


def stored_events(database_url: str, run_id: str) -> str:
    """A run's stored events, compactly: seq, event, and for message chunks the
    last characters of the message id (which attempt streamed them)."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT seq, event, CASE WHEN event LIKE 'messages%%' THEN data -> 0 ->> 'id' END"
            " FROM agent_run_events WHERE run_id = %s::uuid ORDER BY seq",
            (run_id,),
        ).fetchall()
    return " ".join(f"{seq}:{event}" + (f"({str(mid)[-4:]})" if mid else "") for seq, event, mid in rows)


def check_store(base_url: str, turns: list[Turn]) -> None:
    """Each turn's message (and answer) counted in its thread's whole transcript."""
    by_thread: dict[str, list[Turn]] = defaultdict(list)
    for turn in turns:
        by_thread[turn.thread_id].append(turn)
    with httpx.Client(base_url=base_url, headers={"x-api-key": TEST_KEY}, timeout=30) as http:
        for thread_id, thread_turns in by_thread.items():
            messages = retrying_get(http, f"/threads/{thread_id}/transcript")["messages"]
            humans = Counter(str(m.get("content")) for m in messages if m.get("type") == "human")
            answers = Counter(str(m.get("content")) for m in messages if m.get("type") == "ai")
            for turn in thread_turns:
                turn.stored = humans[turn.text]
                turn.answers_stored = answers[turn.expected_answer]


def run_statuses(base_url: str, turns: list[Turn]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=base_url, headers={"x-api-key": TEST_KEY}, timeout=30) as http:
        for turn in turns:
            for run_id, _ in turn.runs:
                found[run_id] = retrying_get(http, f"/threads/{turn.thread_id}/runs/{run_id}")
    return found


def retrying_get(http: httpx.Client, path: str, attempts: int = 5) -> Any:
    last: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff(attempt))
        try:
            response = http.get(path)
            if response.status_code == 200:
                return response.json()
            last = RuntimeError(f"GET {path}: HTTP {response.status_code} {response.text[:200]}")
        except httpx.TransportError as exc:
            last = exc
    raise RuntimeError(f"GET {path} failed: {last}")


def probe_idempotency(base_url: str) -> bool:
    """Whether the server honours Idempotency-Key: the same key with another body
    must be refused (422), and the same key with the same body must not run twice."""
    with httpx.Client(base_url=base_url, headers={"x-api-key": TEST_KEY}, timeout=30) as http:
        thread_id = str(uuid.uuid4())
        http.post("/threads", json={"thread_id": thread_id}).raise_for_status()
        key = {"Idempotency-Key": str(uuid.uuid4())}
        path = f"/threads/{thread_id}/runs/wait"
        first = http.post(path, json={"assistant_id": "agent", "input": ask("probe one")}, headers=key)
        again = http.post(path, json={"assistant_id": "agent", "input": ask("probe one")}, headers=key)
        other = http.post(path, json={"assistant_id": "agent", "input": ask("probe two")}, headers=key)
        messages = http.get(f"/threads/{thread_id}/transcript").json()["messages"]
        once = sum(m.get("content") == "probe one" for m in messages) == 1
        return first.status_code == 200 and again.status_code == 200 and other.status_code == 422 and once
