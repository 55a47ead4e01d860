"""Authentication: API keys, JWTs (file and URL key sets, rotation), client certificates.

Real keys generated in the test, real tokens signed by PyJWT, a real HTTP server for the
JWKS URL. Every refusal must be the same ``Unauthorized`` and leak nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from dispatcher.config import ManifestError, parse_manifest
from dispatcher.identity import (
    MAX_TOKEN_BYTES,
    UNAUTHORIZED_MESSAGE,
    ChainAuthenticator,
    Credentials,
    JwtAuthenticator,
    Principal,
    api_key_digest,
    authenticator_of,
)
from linchkit_plugin.errors import Unauthorized
from tests.identity_support import (
    SigningKey,
    ec_key,
    ed_key,
    good_claims,
    jwks,
    jwt_config,
    rsa_key,
    write_jwks,
)

API_KEY = "lk_live_" + "7f3a9c" * 8


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {
        "rsa": rsa_key("rsa-1"),
        "ec": ec_key("ec-1"),
        "ed": ed_key("ed-1"),
        "other_rsa": rsa_key("rsa-1"),  # same kid, another key: a forger's
        "rs384": rsa_key("rsa-384", "RS384"),
        "ps256": rsa_key("rsa-ps", "PS256"),
    }


def auth_manifest(tmp_path: Path, auth: dict[str, Any]) -> Any:
    return parse_manifest({"version": 1, "plugins": [], "auth": auth}, base_dir=tmp_path)


@pytest.fixture
def chain(tmp_path: Path, keys: dict[str, SigningKey]) -> ChainAuthenticator:
    write_jwks(
        tmp_path / "jwks.json", keys["rsa"], keys["ec"], keys["ed"], keys["rs384"], keys["ps256"]
    )
    authenticator = authenticator_of(
        auth_manifest(
            tmp_path,
            {
                "jwt": jwt_config("jwks.json"),
                "api_keys": [
                    {
                        "principal": "billing-service",
                        "sha256": api_key_digest(API_KEY),
                        "roles": ["billing"],
                    }
                ],
                "mtls": [
                    {"subject": "CN=billing,O=Acme", "principal": "billing", "roles": ["billing"]},
                    {"san": "spiffe://acme/reports", "principal": "reports"},
                ],
            },
        )
    )
    assert authenticator is not None
    return authenticator


def bearer(token: str) -> Credentials:
    return Credentials(authorization=f"Bearer {token}")


async def test_each_kind_of_credential_proves_a_principal(
    chain: ChainAuthenticator, keys: dict[str, SigningKey]
) -> None:
    await chain.start()
    for kind in ("rsa", "ec", "ed"):
        principal = await chain.authenticate(bearer(keys[kind].token()))
        assert principal == Principal("billing-service", frozenset({"billing"}), "jwt")
    assert await chain.authenticate(Credentials(api_key=API_KEY)) == Principal(
        "billing-service", frozenset({"billing"}), "api_key"
    )
    assert await chain.authenticate(Credentials(certificate_subject="CN=billing,O=Acme")) == (
        Principal("billing", frozenset({"billing"}), "mtls")
    )
    reports = await chain.authenticate(
        Credentials(certificate_subject="CN=x", certificate_sans=("dns:x", "spiffe://acme/reports"))
    )
    assert reports == Principal("reports", frozenset(), "mtls")
    # Roles as one space-separated string (the `scope` style) work too.
    spaced = keys["rsa"].token(good_claims(roles="billing reports"))
    assert (await chain.authenticate(bearer(spaced))).roles == {"billing", "reports"}
    await chain.aclose()


async def test_a_principal_prefix_keeps_an_issuers_subjects_apart_from_keys_and_certificates(
    tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    """One namespace of principals by default (the same service by key or token is one
    principal); an issuer whose subjects others choose gets a prefix of its own."""
    write_jwks(tmp_path / "jwks.json", keys["rsa"])
    key = {"principal": "billing-service", "sha256": api_key_digest(API_KEY)}
    prefixed = {**jwt_config("jwks.json"), "principal_prefix": "idp:"}
    authenticator = authenticator_of(auth_manifest(tmp_path, {"jwt": prefixed, "api_keys": [key]}))
    assert authenticator is not None
    await authenticator.start()
    token = keys["rsa"].token(good_claims(sub="billing-service"))
    assert (await authenticator.authenticate(bearer(token))).id == "idp:billing-service"
    assert (await authenticator.authenticate(Credentials(api_key=API_KEY))).id == (
        "billing-service"
    )
    await authenticator.aclose()


@pytest.mark.parametrize("prefix", ["with space:", "tab\t", "x" * 65])
def test_a_principal_prefix_is_printable_and_short(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(ManifestError, match="principal_prefix"):
        auth_manifest(tmp_path, {"jwt": {**jwt_config("jwks.json"), "principal_prefix": prefix}})


def _segments(token: str) -> list[str]:
    return token.split(".")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{signature}"


def _hs256_with_public_key(key: SigningKey) -> str:
    """The algorithm-confusion forgery: HS256 keyed with the RSA public key's PEM."""
    pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = _unsigned({"alg": "HS256", "typ": "JWT", "kid": key.kid}, good_claims())[:-1]
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def _flip_bit(token: str, segment: int, bit: int) -> str:
    parts = _segments(token)
    raw = bytearray(base64.urlsafe_b64decode(parts[segment] + "=" * (-len(parts[segment]) % 4)))
    raw[bit // 8 % len(raw)] ^= 1 << (bit % 8)
    parts[segment] = _b64(bytes(raw))
    return ".".join(parts)


BAD_TOKENS: dict[str, Callable[[dict[str, SigningKey]], str]] = {
    "alg none": lambda k: _unsigned({"alg": "none", "kid": "rsa-1"}, good_claims()),
    "alg None, other case": lambda k: _unsigned({"alg": "None", "kid": "rsa-1"}, good_claims()),
    "HS256 signed with the RSA public key": lambda k: _hs256_with_public_key(k["rsa"]),
    "expired": lambda k: k["rsa"].token(good_claims(exp=int(time.time()) - 3600)),
    "expired beyond the leeway": lambda k: k["rsa"].token(good_claims(exp=int(time.time()) - 45)),
    "not yet valid": lambda k: k["rsa"].token(good_claims(nbf=int(time.time()) + 3600)),
    "wrong audience": lambda k: k["rsa"].token(good_claims(aud="someone-else")),
    "no audience": lambda k: k["rsa"].token(good_claims(aud=None)),
    "wrong issuer": lambda k: k["rsa"].token(good_claims(iss="https://evil.example")),
    "no issuer": lambda k: k["rsa"].token(good_claims(iss=None)),
    "no exp": lambda k: k["rsa"].token(good_claims(exp=None)),
    "no sub": lambda k: k["rsa"].token(good_claims(sub=None)),
    "empty sub": lambda k: k["rsa"].token(good_claims(sub="")),
    "sub not a string": lambda k: k["rsa"].token(good_claims(sub=12345)),
    "sub with a control character": lambda k: k["rsa"].token(good_claims(sub="admin\n")),
    "roles not a list": lambda k: k["rsa"].token(good_claims(roles={"admin": True})),
    "unknown kid": lambda k: k["rsa"].token(kid="rsa-unknown"),
    "no kid": lambda k: _strip_kid(k["rsa"]),
    "signed by another key with the same kid": lambda k: k["other_rsa"].token(),
    "one flipped bit in the signature": lambda k: _flip_bit(k["rsa"].token(), 2, 77),
    "one flipped bit in the claims": lambda k: _flip_bit(k["rsa"].token(), 1, 3),
    "one flipped bit in the header": lambda k: _flip_bit(k["ec"].token(), 0, 9),
    "algorithm not in the allowlist": lambda k: k["rs384"].token(),
    "ES256 header on an RSA key": lambda k: _relabel(k["rsa"].token(), "ES256"),
    "PS256 key used as RS256": lambda k: _relabel(k["ps256"].token(), "RS256"),
    "token over 8 KB": lambda k: k["rsa"].token(good_claims(padding="x" * MAX_TOKEN_BYTES)),
    "embedded attacker jwk": lambda k: k["other_rsa"].token(
        kid="attacker", jwk=k["other_rsa"].public_jwk
    ),
    "jku pointing elsewhere": lambda k: k["other_rsa"].token(
        kid="evil", jku="http://127.0.0.1:9/jwks"
    ),
    "garbage": lambda k: "definitely not a token",
    "empty": lambda k: "",
    "two segments": lambda k: ".".join(_segments(k["rsa"].token())[:2]),
    "four segments": lambda k: k["rsa"].token() + ".AAAA",
    "header not JSON": lambda k: _b64(b"{nope") + "." + ".".join(_segments(k["rsa"].token())[1:]),
    "header a JSON list": lambda k: _b64(b"[1]") + "." + ".".join(_segments(k["rsa"].token())[1:]),
    "padding added": lambda k: (
        _segments(k["rsa"].token())[0] + "==." + ".".join(_segments(k["rsa"].token())[1:])
    ),
    "stray character": lambda k: k["rsa"].token()[:20] + "!" + k["rsa"].token()[20:],
}


def _strip_kid(key: SigningKey) -> str:
    import jwt

    return jwt.encode(good_claims(), key.private, algorithm=key.algorithm)


def _relabel(token: str, algorithm: str) -> str:
    header, claims, signature = _segments(token)
    decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    decoded["alg"] = algorithm
    return f"{_b64(json.dumps(decoded).encode())}.{claims}.{signature}"


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
async def test_bad_tokens_are_refused_with_one_message_that_leaks_nothing(
    name: str,
    chain: ChainAuthenticator,
    keys: dict[str, SigningKey],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await chain.start()
    token = BAD_TOKENS[name](keys)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Unauthorized) as refused:
        await chain.authenticate(bearer(token))
    assert refused.value.message == UNAUTHORIZED_MESSAGE
    assert refused.value.__cause__ is None and refused.value.__context__ is None
    wire = json.dumps(refused.value.to_wire())
    for leak in [token, *(part for part in _segments(token) if len(part) > 8)]:
        if leak:
            assert leak not in wire and leak not in repr(refused.value)
            assert all(leak not in record.getMessage() for record in caplog.records)
    await chain.aclose()


def test_at_least_twenty_kinds_of_bad_token_are_tried() -> None:
    assert len(BAD_TOKENS) >= 20


def _mutate(token: str, rng: random.Random) -> str:
    kind = rng.randrange(8)
    chars = list(token)
    if kind == 0:  # flip one bit of one character
        index = rng.randrange(len(chars))
        chars[index] = chr(ord(chars[index]) ^ (1 << rng.randrange(7)))
    elif kind == 1:  # replace a character by another base64url one
        index = rng.randrange(len(chars))
        chars[index] = rng.choice(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
        )
    elif kind == 2:  # cut it somewhere
        return token[: rng.randrange(len(token))]
    elif kind == 3:  # insert junk
        index = rng.randrange(len(chars))
        chars.insert(index, rng.choice(["=", ".", " ", "\x00", "é", "A", "==", "%2e", "\u200b"]))
    elif kind == 4:  # swap two segments
        parts = token.split(".")
        a, b = rng.sample(range(3), 2)
        parts[a], parts[b] = parts[b], parts[a]
        return ".".join(parts)
    elif kind == 5:  # flip a bit in the decoded bytes of a segment
        return _flip_bit(token, rng.randrange(3), rng.randrange(512))
    elif kind == 6:  # random printable garbage of a plausible length
        return "".join(rng.choice("abcXYZ019-_.") for _ in range(rng.randrange(1, 900)))
    else:  # several bit flips at once
        for _ in range(rng.randrange(2, 6)):
            index = rng.randrange(len(chars))
            chars[index] = chr(ord(chars[index]) ^ (1 << rng.randrange(6)))
    return "".join(chars)


async def test_ten_thousand_mutated_tokens_are_all_refused_and_nothing_else_escapes(
    chain: ChainAuthenticator, keys: dict[str, SigningKey]
) -> None:
    await chain.start()
    rng = random.Random(20261201)
    originals = [keys["rsa"].token(), keys["ec"].token(), keys["ed"].token()]
    accepted = unexpected = tried = 0
    for _ in range(10_000):
        original = rng.choice(originals)
        token = _mutate(original, rng)
        if token == original:
            continue
        tried += 1
        try:
            await chain.authenticate(bearer(token))
            accepted += 1
        except Unauthorized:
            pass
        except Exception:
            unexpected += 1
    assert tried > 9_900
    assert (accepted, unexpected) == (0, 0)
    # The originals still pass: the fuzzing did not just break the authenticator.
    for token in originals:
        assert (await chain.authenticate(bearer(token))).id == "billing-service"
    await chain.aclose()


async def clocked(
    tmp_path: Path, key: SigningKey, now: list[float], **jwt: Any
) -> JwtAuthenticator:
    """A started JWT authenticator whose cache reads ``now[0]`` as the time."""
    config = auth_manifest(
        tmp_path, {"jwt": jwt_config(str(write_jwks(tmp_path / "k.json", key)), **jwt)}
    ).auth.jwt
    assert config is not None
    authenticator = JwtAuthenticator(config, clock=lambda: now[0])
    await authenticator.start()
    return authenticator


async def test_a_verified_token_is_cached_until_it_expires_and_the_cache_is_bounded(
    tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    now = [time.time()]
    authenticator = await clocked(tmp_path, keys["rsa"], now, cache_size=2, leeway_s=5)
    token = keys["rsa"].token(good_claims(exp=int(now[0]) + 60))
    for _ in range(100):
        assert (await authenticator.principal_of(token)).id == "billing-service"
    assert authenticator.verified == 1
    now[0] += 60 + 5 + 1  # past exp and its leeway (by the cache's clock): verified again
    await authenticator.principal_of(token)
    assert authenticator.verified == 2
    now[0] -= 66
    for index in range(5):
        await authenticator.principal_of(keys["rsa"].token(good_claims(sub=f"s{index}")))
    assert len(authenticator._cache) <= 2


async def test_an_expired_token_drops_itself_without_a_pass_over_the_cache(
    tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    # Each expired token read from the cache swept the whole cache for expired entries: a
    # pass over up to cache_size entries (a million allowed) per request. Now it drops
    # itself; the others are checked when read, and the bound drops the oldest.
    now = [time.time()]
    authenticator = await clocked(tmp_path, keys["rsa"], now, cache_size=100, leeway_s=0)
    expires = int(now[0]) + 60
    tokens = [keys["rsa"].token(good_claims(sub=f"s{index}", exp=expires)) for index in range(4)]
    for token in tokens:
        await authenticator.principal_of(token)
    assert authenticator.verified == 4
    now[0] = expires + 1  # expired by the cache's clock (PyJWT reads the real one)
    await authenticator.principal_of(tokens[0])  # dropped, then verified again
    assert authenticator.verified == 5
    assert list(authenticator._cache) == [*tokens[1:], tokens[0]]  # no sweep of the rest
    await authenticator.principal_of(tokens[1])  # each is checked when it is read
    assert authenticator.verified == 6


async def test_a_cached_token_is_refused_once_it_expired(
    tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    config = auth_manifest(
        tmp_path, {"jwt": jwt_config(str(write_jwks(tmp_path / "k.json", keys["rsa"])), leeway_s=0)}
    ).auth.jwt
    authenticator = JwtAuthenticator(config)
    await authenticator.start()
    expires = int(time.time()) + 2
    token = keys["rsa"].token(good_claims(exp=expires))
    assert (await authenticator.principal_of(token)).id == "billing-service"
    await asyncio.sleep(max(0.0, expires + 0.2 - time.time()))
    with pytest.raises(Unauthorized):
        await authenticator.principal_of(token)


async def test_api_keys_are_checked_by_digest_and_never_shown(
    chain: ChainAuthenticator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for wrong in ["", API_KEY + " ", API_KEY.upper(), API_KEY[:-1], "x" * 5000, API_KEY + "\x00"]:
        with pytest.raises(Unauthorized, match=r"^authentication required"):
            await chain.authenticate(Credentials(api_key=wrong))
    manifest = auth_manifest(
        tmp_path, {"api_keys": [{"principal": "p", "sha256": api_key_digest(API_KEY)}]}
    )
    digest = api_key_digest(API_KEY)
    assert digest not in repr(manifest) and digest not in str(manifest.auth)
    assert API_KEY not in repr(Credentials(api_key=API_KEY, authorization="Bearer secret"))
    assert "secret" not in repr(Credentials(authorization="Bearer secret"))
    assert all(API_KEY not in record.getMessage() for record in caplog.records)


async def test_certificates_match_exactly_no_look_alikes(chain: ChainAuthenticator) -> None:
    for subject in [
        "CN=billing,O=acme",
        "CN=billing, O=Acme",
        "CN=billing,O=Acme ",
        "cn=billing,O=Acme",
        "CN=\u042cilling,O=Acme",
        "CN=billing,O=Acme\x00",
        "O=Acme,CN=billing",
    ]:
        with pytest.raises(Unauthorized):
            await chain.authenticate(Credentials(certificate_subject=subject))
    with pytest.raises(Unauthorized):
        await chain.authenticate(Credentials(certificate_sans=("spiffe://acme/reports/",)))


async def test_a_presented_credential_must_verify_even_with_a_good_certificate(
    chain: ChainAuthenticator,
) -> None:
    good_certificate = {"certificate_subject": "CN=billing,O=Acme"}
    for bad in [
        Credentials(authorization="Bearer nope", **good_certificate),
        Credentials(authorization="Basic dXNlcjpwYXNz", **good_certificate),
        Credentials(authorization="Bearer", **good_certificate),
        Credentials(api_key="wrong", **good_certificate),
        Credentials(),
    ]:
        with pytest.raises(Unauthorized):
            await chain.authenticate(bad)


async def test_a_kind_not_configured_is_refused(
    tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    only_keys = authenticator_of(
        auth_manifest(
            tmp_path, {"api_keys": [{"principal": "p", "sha256": api_key_digest(API_KEY)}]}
        )
    )
    assert only_keys is not None
    for credentials in [
        bearer(keys["rsa"].token()),
        Credentials(certificate_subject="CN=billing,O=Acme"),
    ]:
        with pytest.raises(Unauthorized):
            await only_keys.authenticate(credentials)


@pytest.mark.parametrize(
    ("auth", "complaint"),
    [
        ({"jwt": {"jwks": "k.json", "algorithms": ["HS256"]}}, "HS256' is not allowed"),
        ({"jwt": {"jwks": "k.json", "algorithms": ["none"]}}, "'none' is not allowed"),
        ({"jwt": {"jwks": "ftp://x/jwks"}}, "file or an http"),
        ({"api_keys": [{"principal": "p", "sha256": "ABC"}]}, "sha256"),
        ({"api_keys": [{"principal": "p", "key": "plain"}]}, "unknown key 'key'"),
        ({"mtls": [{"principal": "p"}]}, "exactly one of 'subject' or 'san'"),
    ],
)
def test_manifest_auth_mistakes_are_clear(
    tmp_path: Path, auth: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ManifestError, match=complaint):
        auth_manifest(tmp_path, auth)


# -- the JWKS at a URL: a real HTTP server ---------------------------------------------


class JwksServer:
    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.hits = 0
        self.hang = False

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.hang:
            await asyncio.sleep(3600)
        return web.json_response(self.document)


@pytest.fixture
async def jwks_server() -> AsyncIterator[tuple[JwksServer, str]]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks.json", server.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server, f"http://127.0.0.1:{port}/jwks.json"
    finally:
        await runner.cleanup()


async def test_a_rotated_key_is_fetched_on_demand_and_refetches_are_rate_limited(
    tmp_path: Path, keys: dict[str, SigningKey], jwks_server: tuple[JwksServer, str]
) -> None:
    server, url = jwks_server
    server.document = jwks(keys["rsa"])
    config = auth_manifest(tmp_path, {"jwt": jwt_config(url, refetch_min_interval_s=0.5)}).auth.jwt
    authenticator = JwtAuthenticator(config)
    await authenticator.start()
    assert server.hits == 1
    assert (await authenticator.principal_of(keys["rsa"].token())).id == "billing-service"
    # The issuer rotates: a new key appears, tokens name it; the dispatcher fetches again.
    server.document = jwks(keys["rsa"], keys["ec"])
    await asyncio.sleep(0.6)
    assert (await authenticator.principal_of(keys["ec"].token())).id == "billing-service"
    assert server.hits == 2
    # A burst of made-up kids costs at most one fetch per interval, never one per token.
    forged = [keys["other_rsa"].token(kid=f"made-up-{n}") for n in range(200)]
    results = await asyncio.gather(
        *(authenticator.principal_of(t) for t in forged), return_exceptions=True
    )
    assert all(isinstance(result, Unauthorized) for result in results)
    assert server.hits <= 3
    # The old key leaves the set: its tokens stop at the next fetch, cache or not.
    rsa_token = keys["rsa"].token()
    await authenticator.principal_of(rsa_token)
    server.document = jwks(keys["ec"])
    await asyncio.sleep(0.6)
    await authenticator.keys.refresh()
    with pytest.raises(Unauthorized):
        await authenticator.principal_of(rsa_token)
    await authenticator.aclose()


async def test_a_key_replaced_under_its_kid_stops_its_cached_tokens_at_the_next_fetch(
    tmp_path: Path, keys: dict[str, SigningKey], jwks_server: tuple[JwksServer, str]
) -> None:
    """An issuer that withdraws a leaked key may publish its successor under the same
    kid. Before, the cache was dropped only when the kids or their algorithms changed:
    a token of the withdrawn key verified once stayed accepted until its ``exp``, and any
    caller could trigger the refetch that should have stopped it (a made-up kid)."""
    server, url = jwks_server
    withdrawn, other = keys["rsa"], keys["ec"]
    successor = keys["other_rsa"]  # kid rsa-1 too, another key
    server.document = jwks(withdrawn, other)
    config = auth_manifest(tmp_path, {"jwt": jwt_config(url, refetch_min_interval_s=0)}).auth.jwt
    authenticator = JwtAuthenticator(config)
    await authenticator.start()
    leaked = withdrawn.token(good_claims(sub="mallory"))
    assert (await authenticator.principal_of(leaked)).id == "mallory"
    server.document = jwks(successor, other)
    with pytest.raises(Unauthorized):  # anyone may name a kid nobody has
        await authenticator.principal_of(other.token(kid="made-up"))
    assert server.hits == 2
    with pytest.raises(Unauthorized):
        await authenticator.principal_of(leaked)
    assert (await authenticator.principal_of(successor.token())).id == "billing-service"
    # A fetch that finds the same keys keeps the cache: a verified token is not checked again.
    token = successor.token(good_claims(sub="cached"))
    await authenticator.principal_of(token)
    verified = authenticator.verified
    await authenticator.keys.refresh()
    assert server.hits == 3
    assert (await authenticator.principal_of(token)).id == "cached"
    assert authenticator.verified == verified
    await authenticator.aclose()


async def test_a_jwks_server_that_hangs_or_is_gone_gives_unauthorized_not_a_hang(
    tmp_path: Path, keys: dict[str, SigningKey], jwks_server: tuple[JwksServer, str]
) -> None:
    server, url = jwks_server
    server.hang = True
    config = auth_manifest(
        tmp_path, {"jwt": jwt_config(url, fetch_timeout_s=0.5, refetch_min_interval_s=0)}
    ).auth.jwt
    authenticator = JwtAuthenticator(config)
    started = time.monotonic()
    await authenticator.start()  # logs a warning, does not raise
    with pytest.raises(Unauthorized):
        await authenticator.principal_of(keys["rsa"].token())
    assert time.monotonic() - started < 10  # two bounded fetches of 0.5 s, on a slow machine
    await authenticator.aclose()
    gone = auth_manifest(
        tmp_path, {"jwt": jwt_config("http://127.0.0.1:9/jwks.json", fetch_timeout_s=0.5)}
    ).auth.jwt
    nobody = JwtAuthenticator(gone)
    await nobody.start()
    with pytest.raises(Unauthorized):
        await nobody.principal_of(keys["rsa"].token())
    await nobody.aclose()


async def test_a_jwks_path_naming_a_fifo_gives_unauthorized_not_a_stuck_thread(
    tmp_path: Path, keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    # Read as a file, a FIFO nobody writes to held a thread for ever, and the process's
    # exit waited for it.
    fifo = tmp_path / "jwks.json"
    os.mkfifo(fifo)
    config = auth_manifest(tmp_path, {"jwt": jwt_config("jwks.json")}).auth.jwt
    authenticator = JwtAuthenticator(config)
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(authenticator.start(), timeout=10)
    assert "not a regular file (a FIFO)" in caplog.text, caplog.text
    with pytest.raises(Unauthorized):
        await asyncio.wait_for(authenticator.principal_of(keys["rsa"].token()), timeout=10)
    await authenticator.aclose()


async def test_private_or_symmetric_keys_in_a_jwks_are_never_used(
    tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    from jwt.algorithms import RSAAlgorithm

    private = json.loads(RSAAlgorithm.to_jwk(keys["rsa"].private))
    document = {
        "keys": [{**private, "kid": "rsa-1"}, {"kty": "oct", "k": _b64(b"secret"), "kid": "hmac"}]
    }
    (tmp_path / "bad.json").write_text(json.dumps(document))
    authenticator = JwtAuthenticator(
        auth_manifest(tmp_path, {"jwt": jwt_config("bad.json")}).auth.jwt
    )
    await authenticator.start()
    assert authenticator.keys.keys == {}
    with pytest.raises(Unauthorized):
        await authenticator.principal_of(keys["rsa"].token())


def test_listings_show_no_key_digest(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dispatcher.cli import main

    digest = api_key_digest(API_KEY)
    (tmp_path / "plugins.yaml").write_text(
        "version: 1\n"
        "plugins:\n"
        "  - {id: echo, version: 1.0.0, target: {provider: http, url: 'http://127.0.0.1:9'},"
        " methods: {say: {}}}\n"
        f"auth: {{api_keys: [{{principal: svc, sha256: '{digest}', roles: [r]}}]}}\n"
        "access: {roles: {r: {allow: ['echo.*']}}}\n"
    )
    runner = CliRunner()
    for command in (["validate"], ["list"], ["list", "-o", "json"]):
        result = runner.invoke(main, ["-m", str(tmp_path / "plugins.yaml"), *command])
        assert result.exit_code == 0, result.output
        assert digest not in result.output and API_KEY not in result.output
