"""Bearer JWTs, verified with PyJWT against the issuer's public keys (``jwks``).

What a token must be to pass, in the order it is checked (any failure: ``refused()``):

1. at most 8 KB (refused before any parsing), three segments of canonical base64url
   (``_canonical``) PyJWT can read;
2. its header's ``alg`` in the manifest's allowlist (asymmetric only: ``none`` and
   ``HS*`` can never be configured) and its ``kid`` a key of the issuer's set whose own
   algorithm is that same ``alg`` (an RSA key never verifies an HMAC or PSS token);
3. PyJWT's ``jwt.decode`` with exactly that algorithm: the signature, ``exp`` (required),
   ``nbf`` and ``iat`` if present, ``iss`` and ``aud`` when configured, all with
   ``leeway_s`` of clock skew;
4. the principal claim (``sub`` by default) a string of 1-256 printable characters, the
   principal's id once ``principal_prefix`` is put before it; the roles claim, if
   present, a list of strings or one space-separated string.

**The cache of verified tokens.** A token that passed is kept, keyed by its exact text,
until its ``exp`` (plus the leeway the check allowed) — safe because the signature was
verified over exactly those bytes: any other text, one bit flipped, is another key and
goes through every check. It is bounded (``cache_size``, oldest first out) and dropped
whenever the issuer's key set changes (``KeySet.generation``: a key added, removed, or
replaced under its kid), so a key removed from the JWKS stops its tokens at the next
refetch rather than at their expiry. A repeated token then costs a dict
probe and a clock reading (``python -m bench identity``).
"""

from __future__ import annotations

import binascii
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jwt
from jwt.exceptions import PyJWTError
from jwt.utils import base64url_decode, base64url_encode

from dispatcher.config.security import JwtConfig
from dispatcher.identity.jwks import KeySet
from dispatcher.identity.principal import Credentials, Principal, refused
from providers.egress import EgressPolicy

__all__ = ["MAX_TOKEN_BYTES", "JwtAuthenticator"]

log = logging.getLogger("dispatcher.identity")

#: Tokens longer than this are refused unread: ours are well under 2 KB, and parsing a
#: large one (base64, JSON, maybe a big RSA signature) is work an attacker chooses.
MAX_TOKEN_BYTES = 8192
_MAX_ROLES = 256
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class JwtAuthenticator:
    """Authenticates ``Authorization: Bearer <jwt>`` against one issuer's key set."""

    def __init__(
        self,
        config: JwtConfig,
        keys: KeySet | None = None,
        *,
        clock: Callable[[], float] = time.time,
        egress: EgressPolicy | None = None,
    ) -> None:
        self.config = config
        self.keys = keys or KeySet(
            config.jwks,
            is_url=config.jwks_is_url,
            timeout=config.fetch_timeout_s,
            refetch_min_interval=config.refetch_min_interval_s,
            egress=egress,
        )
        self.clock = clock  # wall-clock seconds: what exp and nbf are written in
        self._algorithms = frozenset(config.algorithms)
        self._required = ["exp", config.principal_claim]
        if config.issuer is not None:
            self._required.append("iss")
        if config.audience is not None:
            self._required.append("aud")
        #: token text → (principal, wall-clock time it stops being accepted), oldest first
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cache_size = config.cache_size
        self._generation = self.keys.generation
        self.verified = 0
        self.rejected = 0

    async def start(self) -> None:
        """Read the key set once, so the first tokens need not wait for it."""
        await self.keys.refresh()
        self._generation = self.keys.generation

    async def aclose(self) -> None:
        await self.keys.aclose()

    async def authenticate(self, credentials: Credentials) -> Principal:
        authorization = credentials.authorization
        if authorization is None or authorization[:7].lower() != "bearer ":
            raise refused()
        return await self.principal_of(authorization[7:])

    async def principal_of(self, token: str) -> Principal:
        """The principal of the bearer ``token``, or ``Unauthorized``."""
        cached = self._cache.get(token)
        if cached is not None:
            if cached[1] > self.clock() and self._generation == self.keys.generation:
                return cached[0]
            self._forget(token)
        if len(token) > MAX_TOKEN_BYTES:
            self.rejected += 1
            raise refused()
        failed: str | None = None
        try:
            principal, until = await self._verify(token)
        except PyJWTError as error:
            failed = type(error).__name__
        if failed is not None:
            # Raised outside the except block: PyJWT's exception (its message may quote
            # the token's header or a key) is not even kept as the refusal's __context__.
            self.rejected += 1
            log.debug("bearer token refused: %s", failed)  # which check; never the token
            raise refused()
        self.verified += 1
        self._remember(token, principal, until)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        segments = token.split(".")
        if len(segments) != 3 or not all(_canonical(segment) for segment in segments):
            raise _Rejected("not three canonical base64url segments")
        header = jwt.get_unverified_header(token)
        algorithm = header.get("alg")
        kid = header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise _Rejected("algorithm not allowed")
        if not isinstance(kid, str) or not kid:
            raise _Rejected("no kid")
        key = await self.keys.key(kid)
        if key is None:
            raise _Rejected("unknown kid")
        if key.algorithm_name != algorithm:
            raise _Rejected("the key is for another algorithm")
        config = self.config
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            issuer=config.issuer,
            audience=config.audience,
            leeway=config.leeway_s,
            options={"require": self._required, "verify_signature": True},
        )
        expires = claims["exp"]
        if not isinstance(expires, int | float):  # PyJWT checked it is an integer date
            raise _Rejected("exp is not a number")
        until = float(expires) + config.leeway_s
        roles = self._roles(claims)
        return Principal(self._principal_id(claims), roles, "jwt", expires_at=until), until

    def _principal_id(self, claims: dict[str, Any]) -> str:
        value = claims.get(self.config.principal_claim)
        if not isinstance(value, str) or not 0 < len(value) <= 256 or not value.isprintable():
            raise _Rejected("the principal claim is not a usable name")
        return self.config.principal_prefix + value

    def _roles(self, claims: dict[str, Any]) -> frozenset[str]:
        claim = self.config.roles_claim
        value = claims.get(claim) if claim is not None else None
        if value is None:
            return frozenset()
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list) or len(value) > _MAX_ROLES:
            raise _Rejected("the roles claim is not a list of names")
        if not all(isinstance(role, str) and 0 < len(role) <= 128 for role in value):
            raise _Rejected("the roles claim is not a list of names")
        return frozenset(value)

    def _forget(self, token: str) -> None:
        """Drop ``token``, which expired (or everything, once the keys changed).

        Other expired entries stay until the bound reaches them: a sweep for them on
        every expired token was a pass over the whole cache each time (``cache_size`` may
        be a million), and a cached token is checked for expiry whenever it is read
        anyway."""
        if not self._dropped_for_new_keys():
            del self._cache[token]

    def _dropped_for_new_keys(self) -> bool:
        """Drop every cached token if the key set changed since they were verified (a key
        removed from the JWKS stops its tokens now); whether it did."""
        if self._generation == self.keys.generation:
            return False
        self._cache.clear()
        self._generation = self.keys.generation
        return True

    def _remember(self, token: str, principal: Principal, until: float) -> None:
        if self._cache_size == 0:
            return
        self._dropped_for_new_keys()
        cache = self._cache
        # ``popitem(last=False)``, not a plain dict's first key: finding that walks past
        # every entry deleted since the dict last resized (O(n) at a full cache).
        while len(cache) >= self._cache_size:
            cache.popitem(last=False)
        cache[token] = (principal, until)

    def __repr__(self) -> str:
        return (
            f"<JwtAuthenticator cached={len(self._cache)} verified={self.verified}"
            f" rejected={self.rejected} keys={self.keys!r}>"
        )


def _canonical(segment: str) -> bool:
    """Whether ``segment`` is base64url exactly as an encoder writes it. Decoders ignore
    stray characters and the unused low bits of the last one, so other texts can decode to
    the same signed bytes; refusing them keeps one accepted text per token (the cache key)."""
    if not _BASE64URL.fullmatch(segment):
        return False
    try:
        encoded = segment.encode("ascii")
        return base64url_encode(base64url_decode(encoded)) == encoded
    except (binascii.Error, ValueError):
        return False


class _Rejected(PyJWTError):
    """A check of ours failed (PyJWT's own raise their own subclasses)."""
