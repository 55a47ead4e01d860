"""``ChainAuthenticator``: whichever credential a request presents, checked by its kind.

    Authorization: Bearer <jwt>  →  JwtAuthenticator   (auth.jwt)
    X-API-Key: <key>             →  ApiKeyAuthenticator (auth.api_keys)
    verified client certificate  →  MtlsAuthenticator  (auth.mtls)

A credential that is presented must verify: a bad bearer token is refused even when the
request also came with a good certificate, so a caller never silently ends up as someone
else. The certificate is used only when no header credential was sent. A kind the
manifest does not configure is refused like a bad credential. Every refusal is the same
``refused()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dispatcher.config.manifest import Manifest
from dispatcher.config.security import AuthConfig
from dispatcher.identity.api_keys import ApiKeyAuthenticator
from dispatcher.identity.mtls import MtlsAuthenticator
from dispatcher.identity.principal import Credentials, Principal, refused
from providers.egress import EgressPolicy

if TYPE_CHECKING:
    from dispatcher.identity.tokens import JwtAuthenticator

__all__ = ["ChainAuthenticator", "authenticator_of"]


class ChainAuthenticator:
    """Every way ``auth`` lets callers prove who they are, tried by what they present."""

    def __init__(self, config: AuthConfig, *, egress: EgressPolicy | None = None) -> None:
        self.api_keys = ApiKeyAuthenticator(config.api_keys) if config.api_keys else None
        self.jwt = _jwt_authenticator(config, egress) if config.jwt is not None else None
        self.mtls = MtlsAuthenticator(config.mtls) if config.mtls else None

    async def start(self) -> None:
        """Read the issuer's key set (a failure is logged: tokens wait for a refetch)."""
        if self.jwt is not None:
            await self.jwt.start()

    async def aclose(self) -> None:
        if self.jwt is not None:
            await self.jwt.aclose()

    async def authenticate(self, credentials: Credentials) -> Principal:
        authorization = credentials.authorization
        if authorization is not None:
            if self.jwt is None or authorization[:7].lower() != "bearer ":
                raise refused()
            return await self.jwt.principal_of(authorization[7:])
        if credentials.api_key is not None:
            if self.api_keys is None:
                raise refused()
            return self.api_keys.principal_of(credentials.api_key)
        if self.mtls is not None and (
            credentials.certificate_subject is not None or credentials.certificate_sans
        ):
            return await self.mtls.authenticate(credentials)
        raise refused()

    def __repr__(self) -> str:
        kinds = [
            name
            for name, each in (("jwt", self.jwt), ("api_keys", self.api_keys), ("mtls", self.mtls))
            if each is not None
        ]
        return f"<ChainAuthenticator {'+'.join(kinds) or 'nothing'}>"


def authenticator_of(manifest: Manifest[Any]) -> ChainAuthenticator | None:
    """The authenticator the manifest's ``auth`` describes; None without ``auth``."""
    if manifest.auth is None:
        return None
    return ChainAuthenticator(manifest.auth, egress=manifest.egress)


def _jwt_authenticator(config: AuthConfig, egress: EgressPolicy | None) -> JwtAuthenticator:
    # Imported here: PyJWT loads cryptography (~15 ms), which a dispatcher that takes no
    # tokens should not pay for at import.
    from dispatcher.identity.tokens import JwtAuthenticator

    assert config.jwt is not None
    return JwtAuthenticator(config.jwt, egress=egress)
