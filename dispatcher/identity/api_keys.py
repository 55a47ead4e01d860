"""API keys: the manifest holds the SHA-256 of each key, never the key.

A presented key is hashed and looked up by its digest. The lookup is a dict probe on the
digest, which an attacker cannot steer toward a stored one (that would be a preimage),
and the final comparison is ``hmac.compare_digest`` all the same. SHA-256 without a salt
or stretching is right here: API keys are long random strings, not passwords, so there is
no dictionary to attack, and the check must cost microseconds per request.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from dispatcher.config.security import ApiKey
from dispatcher.identity.principal import Credentials, Principal, refused

__all__ = ["MAX_API_KEY_BYTES", "ApiKeyAuthenticator", "api_key_digest"]

#: Longer keys are refused before hashing: no key we issue is longer, and a header of
#: megabytes should cost nothing.
MAX_API_KEY_BYTES = 1024


def api_key_digest(key: str) -> str:
    """What the manifest stores for ``key``: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class ApiKeyAuthenticator:
    """Authenticates ``Credentials.api_key`` against the manifest's ``auth.api_keys``."""

    __slots__ = ("_by_digest",)

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_digest: dict[str, tuple[str, Principal]] = {
            key.sha256: (key.sha256, Principal(key.principal, frozenset(key.roles), "api_key"))
            for key in keys
        }

    def principal_of(self, key: str) -> Principal:
        if not key or len(key) > MAX_API_KEY_BYTES:
            raise refused()
        digest = api_key_digest(key)
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            raise refused()
        return found[1]

    async def authenticate(self, credentials: Credentials) -> Principal:
        if credentials.api_key is None:
            raise refused()
        return self.principal_of(credentials.api_key)

    def __repr__(self) -> str:
        return f"<ApiKeyAuthenticator keys={len(self._by_digest)}>"
