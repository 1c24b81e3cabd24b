"""Build the Agent Chat UI and serve it on 127.0.0.1.

The UI is the `templates/vite` folder of the npm package create-agent-chat-app, pinned
below. Nothing lands in the repository: the package, its node_modules and every build
live in $XDG_CACHE_HOME/agentserve-chat-ui/<hash of the pins> (~/.cache/... without it),
so a second run installs and builds nothing. The template has no lock file: npm resolves
its version ranges as they stood when the pinned release was published (`--before`), and
the package-lock.json and resolved.json it leaves in the cache record what that gave.

    python -m ui.build          # build (cached), serve, print the URL (`make chat-ui`)
    python -m ui.build build    # build only, print the dist folder

The UI reads its server from `?apiUrl=` (else VITE_API_URL), the graph from `?assistantId=`
(else VITE_ASSISTANT_ID), and the key from localStorage `lg:chat:apiKey`, which its setup
form fills (prefilled from VITE_LANGSMITH_API_KEY); it sends the key as `x-api-key`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PACKAGE = "create-agent-chat-app"
VERSION = "0.1.6"
# The registry's dist.integrity of that tarball.
INTEGRITY = "sha512-FmiAY3/1QHsScsfMRAtQBS9ljKvMDlG0yzgYhYiOgacSzO4cF755zJ4i/xCIpyaG/nnuW0HeAIOZgIgSVrfOEQ=="
# When 0.1.6 was published: the template's ranges resolve as a user of that release got them.
RESOLVE_BEFORE = "2026-06-08T06:05:37Z"
TEMPLATE = "package/templates/vite/"
RECIPE = 1  # bump when the steps below change, to start a fresh cache
BUILD_ENV = frozenset({"VITE_API_URL", "VITE_ASSISTANT_ID", "VITE_LANGSMITH_API_KEY"})
ASSISTANT_ID = "agent"
DEFAULT_AGENT_URL = "http://127.0.0.1:8000"
DEFAULT_PORT = 5173
ROOT = Path(__file__).resolve().parent.parent


class BuildError(RuntimeError):
    pass


def missing_tools() -> str | None:
    """None when the UI can be built here, else why not."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install nodejs npm)"
    return None


def _run(command: list[str], cwd: Path, timeout: float, env: Mapping[str, str] | None = None) -> str:
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{' '.join(command[:3])} timed out after {timeout:.0f}s") from exc
    if done.returncode != 0:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        raise BuildError(f"{' '.join(command[:3])} failed ({done.returncode}):\n{output}")
    return done.stdout


def cache_dir() -> Path:
    node = _run(["node", "--version"], Path.cwd(), 30).strip().lstrip("v").split(".")[0]
    pins = {"package": f"{PACKAGE}@{VERSION}", "integrity": INTEGRITY, "before": RESOLVE_BEFORE, "node": node}
    digest = hashlib.sha256(json.dumps({**pins, "recipe": RECIPE}, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "agentserve-chat-ui" / digest


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One install or build at a time; the others wait, then reuse its result."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _extract_template(tarball: Path, target: Path) -> None:
    with tarfile.open(tarball) as archive:
        members = [member for member in archive.getmembers() if member.name.startswith(TEMPLATE)]
        for member in members:
            member.name = member.name.removeprefix(TEMPLATE)
        archive.extractall(target, members=[m for m in members if m.name], filter="data")


def ensure_template(timeout: float = 900.0) -> Path:
    """The template with its dependencies installed: from the cache, or fetched now."""
    root = cache_dir()
    web = root / "web"
    if (web / "resolved.json").is_file():
        return web
    with _exclusive(root.parent / f"{root.name}.lock"):
        if (web / "resolved.json").is_file():
            return web
        root.mkdir(parents=True, exist_ok=True)
        # Work beside the target and rename into place: an interrupted install never
        # leaves a half-filled folder that looks done.
        staging = Path(tempfile.mkdtemp(prefix=".web-", dir=root))
        try:
            _run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(staging)], staging, timeout)
            tarball = staging / f"{PACKAGE}-{VERSION}.tgz"
            integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
            if integrity != INTEGRITY:
                raise BuildError(f"{tarball.name} has integrity {integrity}, expected {INTEGRITY}")
            staged_web = staging / "web"
            _extract_template(tarball, staged_web)
            # --ignore-scripts: nothing in the tree needs its install script to build
            # (esbuild finds its binary through its optional platform package).
            install = ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", f"--before={RESOLVE_BEFORE}"]
            _run(install, staged_web, timeout)
            manifest = json.loads((staged_web / "package.json").read_text())
            locked = json.loads((staged_web / "package-lock.json").read_text())["packages"]
            wanted = {**manifest.get("dependencies", {}), **manifest.get("devDependencies", {})}
            resolved = {name: locked[f"node_modules/{name}"]["version"] for name in sorted(wanted)}
            (staged_web / "resolved.json").write_text(json.dumps(resolved, indent=1) + "\n")
            shutil.rmtree(web, ignore_errors=True)  # left by a broken earlier run
            staged_web.rename(web)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return web


def resolved_versions() -> dict[str, str]:
    """What the template's dependency ranges resolved to (top level), after ensure_template."""
    versions: dict[str, str] = json.loads((cache_dir() / "web" / "resolved.json").read_text())
    return versions


def ensure_build(env: Mapping[str, str] | None = None, timeout: float = 600.0) -> Path:
    """`vite build` of the template with the given VITE_* variables; the dist folder."""
    settings = dict(env or {})
    if unknown := sorted(set(settings) - BUILD_ENV):
        raise ValueError(f"the template reads none of {unknown}")
    web = ensure_template()
    builds = web.parent / "dist"
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    dist = builds / key
    if (dist / "index.html").is_file():
        return dist
    with _exclusive(builds / f"{key}.lock"):
        if (dist / "index.html").is_file():
            return dist
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=builds))  # mode 0700: it may hold a key
        try:
            build_env = {name: value for name, value in os.environ.items() if not name.startswith("VITE_")}
            vite = str(web / "node_modules" / ".bin" / "vite")
            # The template's own `build` also runs turbo and `tsc -b`; type checking is not needed to bundle.
            _run([vite, "build", "--outDir", str(staging), "--emptyOutDir"], web, timeout, {**build_env, **settings})
            shutil.rmtree(dist, ignore_errors=True)
            staging.rename(dist)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dist


class _Handler(SimpleHTTPRequestHandler):
    """Static files, index.html for any other path (the UI routes on the client)."""

    def send_head(self) -> Any:
        path = urllib.parse.urlsplit(self.path).path
        if not Path(self.translate_path(path)).is_file():
            self.path = "/index.html"
        return super().send_head()

    def end_headers(self) -> None:
        if not self.path.startswith("/assets/"):  # hashed names under assets/ never change
            self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class StaticServer:
    """Serves a dist folder on 127.0.0.1 from a background thread."""

    def __init__(self, directory: Path, port: int = 0) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_Handler, directory=str(directory)))
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="chat-ui", daemon=True)

    def start(self) -> StaticServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> StaticServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def setup_url(ui_url: str, agent_url: str) -> str:
    """The page whose setup form is filled in with the agent's URL (and graph id `agent`).
    With both `apiUrl` and `assistantId` in the URL the form is skipped, and the key would
    never reach localStorage, where the thread list reads it."""
    return f"{ui_url}/?{urllib.parse.urlencode({'apiUrl': agent_url})}"


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.strip().startswith("#"):
                values[name.strip()] = value.strip().strip("'\"")
    return values


def _probe(agent_url: str) -> str:
    try:
        with urllib.request.urlopen(f"{agent_url}/info", timeout=2) as response:
            return f"answers (HTTP {response.status})"
    except urllib.error.HTTPError as exc:
        return f"answers HTTP {exc.code} on /info"
    except OSError:
        return "is not answering yet: start it with `make run`"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ui.build", description="Build and serve the Agent Chat UI.")
    parser.add_argument("command", nargs="?", choices=("serve", "build"), default="serve")
    parser.add_argument("--agent-url", default=os.environ.get("AGENT_URL", DEFAULT_AGENT_URL))
    parser.add_argument("--port", type=int, default=int(os.environ.get("CHAT_UI_PORT", DEFAULT_PORT)))
    parser.add_argument("--env-file", type=Path, default=ROOT / ".env", help="where AGENT_API_KEY is read")
    args = parser.parse_args(argv)
    if reason := missing_tools():
        parser.exit(1, f"cannot build the Agent Chat UI: {reason}\n")

    env: dict[str, str] = {}
    key_from = "the environment" if os.environ.get("AGENT_API_KEY") else args.env_file.name
    if args.command == "serve":
        key = os.environ.get("AGENT_API_KEY") or read_env_file(args.env_file).get("AGENT_API_KEY")
        if key:
            env["VITE_LANGSMITH_API_KEY"] = key  # only prefills the setup form's key field
    print(f"Building {PACKAGE}@{VERSION} templates/vite (cached in {cache_dir()}) ...", flush=True)
    try:
        dist = ensure_build(env)
    except BuildError as exc:
        parser.exit(1, f"{exc}\n")
    if args.command == "build":
        print(dist)
        return
    agent_url = args.agent_url.rstrip("/")
    try:
        server = StaticServer(dist, args.port)
    except OSError as exc:
        parser.exit(1, f"cannot listen on 127.0.0.1:{args.port} ({exc}); set CHAT_UI_PORT\n")
    print(
        f"\nAgent Chat UI: {setup_url(server.url, agent_url)}\n"
        f"  agent {agent_url} {_probe(agent_url)}; graph id {ASSISTANT_ID!r}.\n"
        f"  The setup form is filled in{f' (API key from {key_from})' if env else ''}: press Continue.\n"
        "  The agent must allow this origin (CORS_ALLOW_ORIGINS; development allows :5173). Ctrl-C stops.",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.httpd.serve_forever()
    server.httpd.server_close()


if __name__ == "__main__":
    main()
