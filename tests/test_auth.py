"""Keys and JWTs through the real app: who may call, and which tenant they are."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from agentserve.auth import KeyRing
from agentserve.settings import Settings
from app import create_app
from tests.support import turn_body

SECRET = "jwt-secret-for-tests-0123456789abcdef"
OLD_KEY, NEW_KEY = "rotating-old-key-0123456789", "rotating-new-key-0123456789"


def token(claims: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, key, algorithm=algorithm)


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=database_url,
        AGENT_API_KEYS=f"acme={OLD_KEY},acme={NEW_KEY}",
        JWT_SECRET=SECRET,
        JWT_AUDIENCE="agent",
        OPENAI_API_KEY="",
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def hs256_signed_with(secret: str, claims: dict[str, Any]) -> str:
    """The classic algorithm-confusion forgery: HS256 keyed with the RSA public key."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{part(json.dumps(claims).encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{part(signature)}"


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def test_keyring_keeps_only_hashes() -> None:
    ring = KeyRing.from_settings(Settings(_env_file=None, AGENT_API_KEYS=f"acme={OLD_KEY}"))  # type: ignore[call-arg]
    assert OLD_KEY not in repr(vars(ring))
    assert ring.tenant_for(OLD_KEY) == "acme" and ring.tenant_for(NEW_KEY) is None


def test_keyring_refuses_a_malformed_key_list() -> None:
    with pytest.raises(ValueError, match="tenant=key"):
        KeyRing.from_settings(Settings(_env_file=None, AGENT_API_KEYS="no-equals-sign"))  # type: ignore[call-arg]


def test_two_keys_of_one_tenant_share_its_threads(client: TestClient) -> None:
    first = client.post("/agent/invoke", json=turn_body("my name is Rot", "rotation"), headers={"X-API-Key": OLD_KEY})
    assert first.status_code == 200
    second = client.post("/agent/invoke", json=turn_body("what is my name", "rotation"), headers={"X-API-Key": NEW_KEY})
    assert second.json()["output"]["messages"][-1]["content"] == "Your name is Rot."


def test_jwt_tenant_comes_from_the_verified_claim(client: TestClient) -> None:
    acme = token({"tenant": "acme", "sub": "u1", "aud": "agent"})
    response = client.post("/agent/invoke", json=turn_body("what is my name", "rotation"), headers=bearer(acme))
    assert response.json()["output"]["messages"][-1]["content"] == "Your name is Rot."
    other = token({"tenant": "globex", "sub": "u2", "aud": "agent"})
    response = client.post("/agent/invoke", json=turn_body("what is my name", "rotation"), headers=bearer(other))
    assert response.json()["output"]["messages"][-1]["content"] == "I don't know your name yet."


@pytest.mark.parametrize(
    "credential",
    [
        token({"tenant": "acme", "aud": "agent"}, key="another-secret-0123456789abcdef"),
        token({"tenant": "acme", "aud": "agent", "exp": int(time.time()) - 10}),
        token({"tenant": "acme", "aud": "someone-else"}),
        token({"aud": "agent"}),
        token({"tenant": "../acme", "aud": "agent"}),
        jwt.encode({"tenant": "acme", "aud": "agent"}, SECRET, algorithm="HS256"),
    ],
    ids=["wrong-signature", "expired", "wrong-audience", "no-tenant", "bad-tenant", "no-expiry"],
)
def test_an_unverifiable_jwt_is_a_401(client: TestClient, credential: str) -> None:
    response = client.post("/agent/invoke", json=turn_body("hi", "jwt-bad"), headers=bearer(credential))
    assert response.status_code == 401
    assert credential not in response.text


def test_rs256_public_key_verifies_tokens(database_url: str) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings = Settings(_env_file=None, DATABASE_URL=database_url, JWT_PUBLIC_KEY=public_pem)  # type: ignore[call-arg]
    with TestClient(create_app(settings)) as rs_client:
        good = token({"tenant": "initech"}, key=private, algorithm="RS256")
        assert rs_client.post("/agent/invoke", json=turn_body("hi", "rs"), headers=bearer(good)).status_code == 200
        forged = hs256_signed_with(public_pem, {"tenant": "initech", "exp": int(time.time()) + 60})
        assert rs_client.post("/agent/invoke", json=turn_body("hi", "rs"), headers=bearer(forged)).status_code == 401


def test_production_refuses_placeholder_keys() -> None:
    with pytest.raises(ValueError, match="placeholder"):
        Settings(_env_file=None, ENVIRONMENT="production", AGENT_API_KEY="replace-me")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="must be set"):
        Settings(_env_file=None, ENVIRONMENT="production")  # type: ignore[call-arg]
    Settings(_env_file=None, ENVIRONMENT="production", AGENT_API_KEY="x" * 32)  # type: ignore[call-arg]
