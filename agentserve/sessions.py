"""Browser sessions: a signed cookie (no key inside) that stands for a tenant and
the playground conversation of that browser."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from urllib.parse import quote

from agentserve.settings import Settings

COOKIE = "agent_session"
SESSION_TTL_S = 12 * 3600
PLAYGROUND = "/agent/playground/"


@dataclass(frozen=True)
class Session:
    tenant: str
    thread_id: str


class SessionSigner:
    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionSigner:
        secret = settings.SESSION_SECRET.get_secret_value()
        if not secret:
            # Every worker must derive the same secret; changing the keys ends sessions.
            material = "|".join(
                (
                    settings.AGENT_API_KEY.get_secret_value(),
                    settings.AGENT_API_KEYS.get_secret_value(),
                    settings.JWT_SECRET.get_secret_value(),
                )
            )
            secret = hashlib.sha256(f"session:{material}".encode()).hexdigest()
        return cls(secret.encode())

    def _sign(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self.secret, payload, hashlib.sha256).digest()).decode().rstrip("=")

    def issue(self, session: Session) -> str:
        body = json.dumps({"t": session.tenant, "th": session.thread_id, "exp": int(time.time()) + SESSION_TTL_S})
        payload = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
        return f"{payload}.{self._sign(payload.encode())}"

    def verify(self, cookie: str) -> Session | None:
        payload, _, signature = cookie.partition(".")
        if not signature or not hmac.compare_digest(signature, self._sign(payload.encode())):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            if int(data["exp"]) < time.time():
                return None
            return Session(tenant=str(data["t"]), thread_id=str(data["th"]))
        except (ValueError, KeyError, TypeError):
            return None


def safe_next(target: str | None) -> str:
    """Only local paths, so the sign-in page cannot be used to bounce people elsewhere."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return PLAYGROUND


def signin_redirect(path: str) -> str:
    return f"/signin?next={quote(path)}"
