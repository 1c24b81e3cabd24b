"""`python -m bench.load` (`make load`): start the stack, run `k6 run load-test.js`
against it, stop the stack; exits with k6's exit code.

The server has WEB_CONCURRENCY workers (default 2) and the offline model at
OFFLINE_MODEL_LATENCY_MS (default 600), on a free port of 127.0.0.1, over a fresh
database (DATABASE_URL's server if set, else an embedded PostgreSQL). k6 gets
BASE_URL, API_KEY, VUS (default 20), DURATION (default 1m), PAUSE_S (default 0) and
SUMMARY_PATH (default load-results/summary.json); set any of them to override.
Other server settings pass through as BENCH_SERVER_<NAME>=value, e.g.
BENCH_SERVER_DB_POOL_MAX_SIZE=20.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, running_server, scratch_database
from tests.support import TEST_KEY

SERVER_PREFIX = "BENCH_SERVER_"


def k6_binary() -> str:
    beside = Path(sys.executable).parent / "k6"
    return str(beside) if beside.exists() else "k6"


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
    latency_ms = float(os.environ.get("OFFLINE_MODEL_LATENCY_MS", "600"))
    server_env = {k.removeprefix(SERVER_PREFIX): v for k, v in os.environ.items() if k.startswith(SERVER_PREFIX)}
    summary_path = Path(os.environ.get("SUMMARY_PATH", "load-results/summary.json"))
    (ROOT / summary_path).parent.mkdir(parents=True, exist_ok=True)  # k6 does not create it
    with (
        scratch_database() as db,
        running_server("load", db, workers=workers, latency_ms=latency_ms, env=server_env) as server,
    ):
        print(f"server: {server.url} ({workers} workers, offline model at {latency_ms:g} ms/call)", flush=True)
        k6_env = {
            **os.environ,
            "BASE_URL": server.url,
            "API_KEY": TEST_KEY,
            "VUS": os.environ.get("VUS", "20"),
            "DURATION": os.environ.get("DURATION", "1m"),
            "PAUSE_S": os.environ.get("PAUSE_S", "0"),
            "SUMMARY_PATH": str(summary_path),
        }
        script = os.environ.get("K6_SCRIPT", "load-test.js")
        # k6 writes to our stdout/stderr, so its progress and summary stream as it runs. It
        # has its own session, so Ctrl-C reaches it once, from us: it then stops gracefully
        # and still prints its summary (a second Ctrl-C makes it abort).
        k6 = subprocess.Popen([k6_binary(), "run", script], cwd=ROOT, env=k6_env, start_new_session=True)

        def forward(signum: int, _frame: object) -> None:
            k6.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return k6.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if k6.poll() is None:
                k6.kill()
                k6.wait()


if __name__ == "__main__":
    sys.exit(main())
