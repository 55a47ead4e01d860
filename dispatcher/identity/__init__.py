"""Who is calling: the principal of a call, and how a caller proves it.

``principal`` holds the seam (``Principal``, ``Credentials``, ``Authenticator``); one
module per way of proving an identity (``api_keys``, ``tokens`` for JWTs with ``jwks``
for the issuer's keys, ``mtls``) and ``chain``, which picks among them by what a request
presents. ``authenticator_of(manifest)`` builds that from the manifest's ``auth``.

    from dispatcher.identity import Credentials, authenticator_of
    authenticator = authenticator_of(manifest)          # None without `auth`
    principal = await authenticator.authenticate(Credentials(authorization="Bearer …"))
"""

from __future__ import annotations

from typing import Any

from dispatcher.identity.api_keys import ApiKeyAuthenticator, api_key_digest
from dispatcher.identity.chain import ChainAuthenticator, authenticator_of
from dispatcher.identity.mtls import MtlsAuthenticator
from dispatcher.identity.principal import (
    UNAUTHORIZED_MESSAGE,
    Authenticator,
    Credentials,
    Principal,
    ProvenBy,
    refused,
)

__all__ = [
    "MAX_TOKEN_BYTES",
    "UNAUTHORIZED_MESSAGE",
    "ApiKeyAuthenticator",
    "Authenticator",
    "ChainAuthenticator",
    "Credentials",
    "JwtAuthenticator",
    "KeySet",
    "MtlsAuthenticator",
    "Principal",
    "ProvenBy",
    "api_key_digest",
    "authenticator_of",
    "refused",
]

#: Loaded on first use: they import PyJWT and cryptography, which a dispatcher that takes
#: no tokens should not load at import.
_LAZY = {"JwtAuthenticator": "tokens", "MAX_TOKEN_BYTES": "tokens", "KeySet": "jwks"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
