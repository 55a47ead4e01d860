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

from dispatcher.identity.api_keys import ApiKeyAuthenticator, api_key_digest
from dispatcher.identity.chain import ChainAuthenticator, authenticator_of
from dispatcher.identity.jwks import KeySet
from dispatcher.identity.mtls import MtlsAuthenticator
from dispatcher.identity.principal import (
    UNAUTHORIZED_MESSAGE,
    Authenticator,
    Credentials,
    Principal,
    ProvenBy,
    refused,
)
from dispatcher.identity.tokens import MAX_TOKEN_BYTES, JwtAuthenticator

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
