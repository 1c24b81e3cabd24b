"""Run tests/js/sdk_check.mjs, the real @langchain/langgraph-sdk Client, against a server.

The npm install lives in a per-user cache keyed by the lock file, never in the repo,
so no node_modules is ever committed and a second run installs nothing."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

JS_DIR = Path(__file__).resolve().parent / "js"
SCRIPT = JS_DIR / "sdk_check.mjs"
MANIFESTS = ("package.json", "package-lock.json")
SDK_PACKAGE = Path("node_modules", "@langchain", "langgraph-sdk", "package.json")


class JsScenarioError(RuntimeError):
    pass


def js_sdk_available() -> str | None:
    """None when the JS SDK can be used here, else why not (a pytest skip reason)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "agentserve-js"


def ensure_js_sdk(timeout: float = 600.0) -> Path:
    """The directory holding node_modules for tests/js, installed by `npm ci` once."""
    digest = hashlib.sha256()
    for name in MANIFESTS:
        digest.update((JS_DIR / name).read_bytes())
    target = _cache_root() / digest.hexdigest()[:16]
    if (target / SDK_PACKAGE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time; the others wait and reuse it
        if (target / SDK_PACKAGE).is_file():
            return target
        # Install beside the target and rename into place, so an interrupted
        # install never leaves a half-filled directory that looks done.
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            for name in MANIFESTS:
                shutil.copy2(JS_DIR / name, staging / name)
            done = subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund"],
                cwd=staging,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if done.returncode != 0:
                raise JsScenarioError(f"npm ci failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
            shutil.rmtree(target, ignore_errors=True)  # left by a broken earlier install
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _stage_script(install_dir: Path) -> Path:
    """A copy of sdk_check.mjs inside the install dir: ES modules resolve packages
    from the importing file's folder up and ignore NODE_PATH."""
    staged = install_dir / SCRIPT.name
    source = SCRIPT.read_bytes()
    if not staged.is_file() or staged.read_bytes() != source:
        fd, tmp = tempfile.mkstemp(dir=install_dir, suffix=".mjs")
        with os.fdopen(fd, "wb") as out:
            out.write(source)
        os.replace(tmp, staged)
    return staged


def run_js_scenario(
    url: str, api_key: str | None, scenario: str, *, timeout: float = 120.0, **args: str | int | float
) -> dict[str, Any]:
    """Run one scenario of sdk_check.mjs and return the JSON object it printed.

    Extra keyword arguments become flags: text="hi" -> --text=hi, delay_ms=500 -> --delay-ms=500."""
    install_dir = ensure_js_sdk()
    flags: dict[str, Any] = {"url": url, "scenario": scenario, "api_key": api_key, **args}
    # "--name=value", so a value may start with "-" (e.g. last_event_id="-1").
    command = ["node", str(_stage_script(install_dir))]
    command += [f"--{name.replace('_', '-')}={value}" for name, value in flags.items() if value is not None]
    env = {**os.environ, "NODE_PATH": str(install_dir / "node_modules")}
    try:
        done = subprocess.run(command, cwd=install_dir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        # TimeoutExpired keeps raw bytes even with text=True.
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise JsScenarioError(f"sdk_check {scenario} timed out after {timeout}s:\n{stderr}") from exc
    if done.returncode != 0:
        raise JsScenarioError(f"sdk_check {scenario} exited {done.returncode}:\n{done.stderr}\n{done.stdout}")
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise JsScenarioError(f"sdk_check {scenario} printed no JSON:\n{done.stdout}\n{done.stderr}") from exc
    return result
