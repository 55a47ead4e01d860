"""Real keys and tokens for the identity tests: generated per test session, never stored."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://auth.example"
AUDIENCE = "linchkit"


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private: Any
    public_jwk: dict[str, Any] = field(default_factory=dict)

    def token(self, claims: dict[str, Any] | None = None, **header: Any) -> str:
        return jwt.encode(
            claims if claims is not None else good_claims(),
            self.private,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **header},
        )


def rsa_key(kid: str, algorithm: str = "RS256") -> SigningKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    return SigningKey(
        kid, algorithm, private, {**public, "kid": kid, "alg": algorithm, "use": "sig"}
    )


def ec_key(kid: str) -> SigningKey:
    private = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    return SigningKey(kid, "ES256", private, {**public, "kid": kid, "alg": "ES256"})


def ed_key(kid: str) -> SigningKey:
    private = ed25519.Ed25519PrivateKey.generate()
    public = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    return SigningKey(kid, "EdDSA", private, {**public, "kid": kid})


def good_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "billing-service",
        "roles": ["billing"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [key.public_jwk for key in keys]}


def write_jwks(path: Path, *keys: SigningKey) -> Path:
    path.write_text(json.dumps(jwks(*keys)))
    return path


def jwt_config(jwks_location: str, **changes: Any) -> dict[str, Any]:
    return {
        "jwks": jwks_location,
        "algorithms": ["RS256", "ES256", "EdDSA"],
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "leeway_s": 30,
        **changes,
    }
