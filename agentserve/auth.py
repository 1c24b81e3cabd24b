"""Who is calling: API keys (kept only as hashes) mapped to tenants."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from agentserve.settings import Settings

DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
UNAUTHORIZED = "missing or invalid API key: send it in the X-API-Key header or as 'Authorization: Bearer <key>'"


@dataclass(frozen=True)
class Principal:
    tenant: str


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


def authenticate(request: Request) -> Principal:
    keyring: KeyRing = request.app.state.keyring
    key = presented_key(request)
    tenant = keyring.tenant_for(key) if key else None
    if tenant is None:
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": 'Bearer realm="agent"'})
    principal = Principal(tenant=tenant)
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]
