"""Writes `.env` from `.env.example` the first time, with freshly generated secrets."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

GENERATED = ("AGENT_API_KEY", "POSTGRES_PASSWORD", "SESSION_SECRET", "WEBHOOK_SECRET")


def render_env(example: str) -> str:
    lines = []
    for line in example.splitlines():
        name = line.partition("=")[0]
        if name in GENERATED and not line.startswith("#"):
            line = f"{name}={secrets.token_urlsafe(32)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_env_if_missing(target: Path, example: Path) -> bool:
    if target.exists():
        return False
    target.write_text(render_env(example.read_text()))
    target.chmod(0o600)
    return True


def main() -> None:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".env")
    if write_env_if_missing(target, Path(".env.example")):
        print(f"wrote {target} with a new AGENT_API_KEY (keep it out of version control)")


if __name__ == "__main__":
    main()
