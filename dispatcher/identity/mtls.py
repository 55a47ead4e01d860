"""TLS client certificates: the subject or a SAN the TLS layer verified → a principal.

This module trusts ``Credentials.certificate_subject`` and ``certificate_sans`` exactly as
far as whoever fills them in: the gateway sets them only from a certificate its TLS layer
verified against the configured client CA, never from a header a proxy could forge.
Names match exactly (RFC 4514 text as the TLS layer renders it; SANs as written), with no
case folding or normalisation that could make a look-alike match. When the subject and a
SAN both match different entries, the subject wins.
"""

from __future__ import annotations

from collections.abc import Iterable

from dispatcher.config.security import MtlsIdentity
from dispatcher.identity.principal import Credentials, Principal, refused

__all__ = ["MtlsAuthenticator"]


class MtlsAuthenticator:
    """Authenticates a verified client certificate against the manifest's ``auth.mtls``."""

    __slots__ = ("_by_san", "_by_subject")

    def __init__(self, identities: Iterable[MtlsIdentity]) -> None:
        self._by_subject: dict[str, Principal] = {}
        self._by_san: dict[str, Principal] = {}
        for entry in identities:
            principal = Principal(entry.principal, frozenset(entry.roles), "mtls")
            if entry.subject is not None:
                self._by_subject[entry.subject] = principal
            if entry.san is not None:
                self._by_san[entry.san] = principal

    async def authenticate(self, credentials: Credentials) -> Principal:
        subject = credentials.certificate_subject
        if subject is not None:
            found = self._by_subject.get(subject)
            if found is not None:
                return found
        for san in credentials.certificate_sans:
            found = self._by_san.get(san)
            if found is not None:
                return found
        raise refused()

    def __repr__(self) -> str:
        return f"<MtlsAuthenticator subjects={len(self._by_subject)} sans={len(self._by_san)}>"
