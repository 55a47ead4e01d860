"""Who is calling: the principal of a call, and how a caller proves it.

A ``Principal`` is an authenticated caller: its ``id`` (what rate limits with
``scope: caller``, the audit log and the plugin's ``context.caller`` see) and its roles
(what the access rules of ``dispatcher.access`` match). Library hosts that authenticated
their users themselves pass one as ``Dispatcher.call(..., caller=Principal(...))``; the
gateway (``dispatcher serve``) makes one from the request's ``Credentials`` with the
manifest's ``Authenticator`` (an API key, a JWT, a TLS client certificate).

``Credentials`` carries what a transport saw and nothing it did not: the
``Authorization`` header's value, the API key header's value, the verified client
certificate's subject and SANs. Authenticators never log or echo them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = ["Authenticator", "Credentials", "Principal", "ProvenBy"]

#: How a principal proved who it is.
ProvenBy = Literal["library", "api_key", "jwt", "mtls"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    id: str
    roles: frozenset[str] = frozenset()
    #: How it authenticated; ``library``: the host vouches for it (``Dispatcher.call``).
    proven_by: ProvenBy = "library"

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presented, as its transport saw it (never logged)."""

    #: The ``Authorization`` header's value (``Bearer …``), if any.
    authorization: str | None = None
    #: The API key header's value (``X-API-Key``), if any.
    api_key: str | None = None
    #: The client certificate the TLS layer verified: its subject (RFC 4514) and SANs.
    certificate_subject: str | None = None
    certificate_sans: Sequence[str] = field(default_factory=tuple)


class Authenticator(Protocol):
    """Turns credentials into a principal, or raises ``Unauthorized`` (never says why
    beyond a fixed, secret-free reason)."""

    def authenticate(self, credentials: Credentials) -> Principal: ...
