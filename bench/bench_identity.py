"""Identity, access and audit: what they cost per call.

* ``identity_jwt_cached_us``: ``ChainAuthenticator.authenticate`` of a repeated bearer
  token (RS256), answered by the cache of verified tokens. Goal ≤ 10.
* ``identity_jwt_verify_rs256_us`` / ``_es256_us`` / ``_eddsa_us``: a token verified in
  full (cache off): PyJWT, the signature, the claims.
* ``identity_api_key_us``: an API key (SHA-256 and a dict probe).
* ``identity_call_*_us``: one ``Dispatcher.call`` of an in-process plugin method, p50, with
  nothing configured, with ``access`` (a principal checked), with ``audit`` (a record to a
  file), with both; ``identity_call_access_audit_added_us`` is the difference both make.
  Interleaved rounds, medians.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from bench._core import Goal, Options
from dispatcher import Dispatcher
from dispatcher.config import parse_manifest
from dispatcher.identity import (
    Credentials,
    JwtAuthenticator,
    Principal,
    api_key_digest,
    authenticator_of,
)

GOALS = {"identity_jwt_cached_us": Goal("<=", 10.0)}

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "python"
LOCAL = {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin", "path": str(EXAMPLES)}
API_KEY = "lk_bench_" + "5a" * 24


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (2_000 if options.quick else 20_000)
    rounds = options.rounds or (1 if options.quick else 5)
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        figures = await _authentication(base, calls, rounds)
        figures.update(await _calls(base, calls // 4, rounds))
    return figures


def _keys(base: Path) -> dict[str, tuple[str, Any]]:
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_private = ec.generate_private_key(ec.SECP256R1())
    ed_private = ed25519.Ed25519PrivateKey.generate()
    keys = {
        "rs256": ("RS256", rsa_private, RSAAlgorithm.to_jwk(rsa_private.public_key())),
        "es256": ("ES256", ec_private, ECAlgorithm.to_jwk(ec_private.public_key())),
        "eddsa": ("EdDSA", ed_private, OKPAlgorithm.to_jwk(ed_private.public_key())),
    }
    document = {
        "keys": [
            {**json.loads(jwk), "kid": name, "alg": alg} for name, (alg, _, jwk) in keys.items()
        ]
    }
    (base / "jwks.json").write_text(json.dumps(document))
    return {name: (alg, private) for name, (alg, private, _) in keys.items()}


def _token(algorithm: str, private: Any, kid: str) -> str:
    now = int(time.time())
    claims = {
        "sub": "bench",
        "roles": ["r"],
        "iss": "https://auth.example",
        "aud": "linchkit",
        "exp": now + 3600,
    }
    return jwt.encode(claims, private, algorithm=algorithm, headers={"kid": kid})


async def _per_call_us(work: Callable[[], Awaitable[Any]], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await work()
    return (time.perf_counter() - started) / calls * 1e6


async def _authentication(base: Path, calls: int, rounds: int) -> dict[str, float]:
    keys = _keys(base)
    jwt_section = {
        "jwks": "jwks.json",
        "algorithms": ["RS256", "ES256", "EdDSA"],
        "issuer": "https://auth.example",
        "audience": "linchkit",
    }
    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [],
            "auth": {
                "jwt": jwt_section,
                "api_keys": [{"principal": "k", "sha256": api_key_digest(API_KEY)}],
            },
        },
        base_dir=base,
    )
    chain = authenticator_of(manifest)
    assert chain is not None
    await chain.start()
    uncached_config = parse_manifest(
        {"version": 1, "plugins": [], "auth": {"jwt": {**jwt_section, "cache_size": 0}}},
        base_dir=base,
    ).auth.jwt  # type: ignore[union-attr]
    uncached = JwtAuthenticator(uncached_config)
    await uncached.start()
    tokens = {name: _token(alg, private, name) for name, (alg, private) in keys.items()}
    repeated = Credentials(authorization=f"Bearer {tokens['rs256']}")
    keyed = Credentials(api_key=API_KEY)
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        samples.setdefault("identity_jwt_cached_us", []).append(
            await _per_call_us(lambda: chain.authenticate(repeated), calls)
        )
        samples.setdefault("identity_api_key_us", []).append(
            await _per_call_us(lambda: chain.authenticate(keyed), calls)
        )
        for name, token in tokens.items():
            samples.setdefault(f"identity_jwt_verify_{name}_us", []).append(
                await _per_call_us(
                    lambda token=token: uncached.principal_of(token), max(50, calls // 100)
                )  # type: ignore[misc]
            )
    await chain.aclose()
    await uncached.aclose()
    return {name: statistics.median(values) for name, values in samples.items()}


def _manifest(base: Path, *, access: bool, audit: bool) -> Any:
    document: dict[str, Any] = {
        "version": 1,
        "plugins": [{"id": "echo", "version": "1.0.0", "target": LOCAL, "methods": {"say": {}}}],
    }
    if access:
        document["access"] = {
            "roles": {"talker": {"allow": ["echo.say"], "deny": ["echo.admin_*"]}}
        }
    if audit:
        document["audit"] = {"path": str(base / f"audit-{time.monotonic_ns()}.log")}
    return parse_manifest(document, base_dir=base)


async def _calls(base: Path, calls: int, rounds: int) -> dict[str, float]:
    variants = {
        "plain": (False, False),
        "access": (True, False),
        "audit": (False, True),
        "access_audit": (True, True),
    }
    principal = Principal("bench", frozenset({"talker"}))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    dispatchers = {
        name: Dispatcher(_manifest(base, access=a, audit=b)) for name, (a, b) in variants.items()
    }
    for dispatcher in dispatchers.values():
        await dispatcher.start()
    try:
        params = {"text": "x"}
        for index in range(rounds):
            names = list(variants)
            names = names[index % 4 :] + names[: index % 4]
            for name in names:
                dispatcher = dispatchers[name]
                caller = principal if variants[name][0] else None
                timings = []
                for _ in range(calls):
                    started = time.perf_counter()
                    await dispatcher.call("echo", "say", params, caller=caller)
                    timings.append(time.perf_counter() - started)
                samples[name].append(statistics.median(timings) * 1e6)
    finally:
        for dispatcher in dispatchers.values():
            await dispatcher.aclose()
    figures = {
        f"identity_call_{name}_p50_us": statistics.median(values)
        for name, values in samples.items()
    }
    for name in ("access", "audit", "access_audit"):
        figures[f"identity_call_{name}_added_us"] = statistics.median(
            ours - plain for ours, plain in zip(samples[name], samples["plain"], strict=True)
        )
    return figures
