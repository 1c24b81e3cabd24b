"""Who is calling: API keys (kept only as hashes) or verified JWTs, each naming a tenant."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Annotated

import jwt
from fastapi import Depends, HTTPException, Request

from agentserve.sessions import COOKIE, SessionSigner, signin_redirect
from agentserve.settings import Settings

DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
UNAUTHORIZED = "missing or invalid API key: send it in the X-API-Key header or as 'Authorization: Bearer <key>'"


@dataclass(frozen=True)
class Principal:
    tenant: str
    user: str | None = None
    # Set for a signed-in browser: the playground's conversation.
    session_thread: str | None = None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """Hashes of the valid keys and the tenant each one names. Several keys may name
    one tenant, so a key can be rotated by adding the new one before removing the old."""

    def __init__(self, keys: dict[str, str]) -> None:
        self._tenants = [(_digest(key), tenant) for key, tenant in keys.items()]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        keys: dict[str, str] = {}
        if single := settings.AGENT_API_KEY.get_secret_value():
            keys[single] = DEFAULT_TENANT
        for pair in settings.AGENT_API_KEYS.get_secret_value().split(","):
            if not pair.strip():
                continue
            tenant, sep, key = (part.strip() for part in pair.partition("="))
            if not sep or not key or not TENANT_NAME.match(tenant):
                raise ValueError("AGENT_API_KEYS must look like 'tenant=key,tenant=key'")
            keys[key] = tenant
        return cls(keys)

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant_for(self, key: str) -> str | None:
        presented = _digest(key)
        found: str | None = None
        # Compare against every hash, so timing says nothing about which matched.
        for digest, tenant in self._tenants:
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found


def presented_key(request: Request) -> str | None:
    if key := request.headers.get("x-api-key"):
        return key
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials.strip()
    return None


class JwtVerifier:
    """Verifies bearer JWTs: signature, expiry, and audience and issuer when set."""

    def __init__(self, settings: Settings) -> None:
        if settings.JWT_PUBLIC_KEY:
            self.key, self.algorithms = settings.JWT_PUBLIC_KEY, ["RS256"]
        else:
            self.key, self.algorithms = settings.JWT_SECRET.get_secret_value(), ["HS256"]
        self.audience = settings.JWT_AUDIENCE or None
        self.issuer = settings.JWT_ISSUER or None
        self.tenant_claim = settings.JWT_TENANT_CLAIM

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtVerifier | None:
        configured = settings.JWT_PUBLIC_KEY or settings.JWT_SECRET.get_secret_value()
        return cls(settings) if configured else None

    def principal_for(self, token: str) -> Principal | None:
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp"]},
            )
        except jwt.InvalidTokenError:
            return None
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not TENANT_NAME.match(tenant):
            return None
        subject = claims.get("sub")
        return Principal(tenant=tenant, user=subject if isinstance(subject, str) else None)


def looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2


def principal_for(request: Request, credential: str) -> Principal | None:
    verifier: JwtVerifier | None = request.app.state.jwt
    if verifier is not None and looks_like_jwt(credential):
        return verifier.principal_for(credential)
    keyring: KeyRing = request.app.state.keyring
    tenant = keyring.tenant_for(credential)
    return Principal(tenant=tenant) if tenant else None


def session_principal(request: Request) -> Principal | None:
    cookie = request.cookies.get(COOKIE)
    signer: SessionSigner = request.app.state.sessions
    session = signer.verify(cookie) if cookie else None
    return Principal(tenant=session.tenant, session_thread=session.thread_id) if session else None


async def authenticate(request: Request) -> Principal:
    """A coroutine, though it never waits: FastAPI runs a plain function dependency
    in a worker thread, a hop that cost more than the check itself."""
    credential = presented_key(request)
    principal = principal_for(request, credential) if credential else session_principal(request)
    if principal is None:
        if request.method == "GET" and "/playground" in request.url.path:
            raise HTTPException(303, "sign in first", headers={"Location": signin_redirect(request.url.path)})
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": 'Bearer realm="agent"'})
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]
