"""The principal of a call, the credentials a transport saw, and the authenticator seam.

A ``Principal`` is an authenticated caller: its ``id`` (what rate limits with
``scope: caller``, the audit log and the plugin's ``context.caller`` see) and its roles
(what the access rules of ``dispatcher.access`` match). Library hosts that authenticated
their users themselves pass one as ``Dispatcher.call(..., caller=Principal(...))``; the
gateway (``dispatcher serve``) makes one from the request's ``Credentials`` with the
manifest's ``Authenticator`` (an API key, a JWT, a TLS client certificate).

``Credentials`` carries what a transport saw and nothing it did not: the
``Authorization`` header's value, the API key header's value, the verified client
certificate's subject and SANs. Authenticators never log or echo them.

``Authenticator.authenticate`` is a coroutine: verifying a JWT may need the issuer's key
set fetched again (a key rotated in), which is I/O the gateway's event loop must not
block on. Every refusal is the same ``Unauthorized`` with a fixed message
(``refused()``): saying which check failed would tell a prober what to change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from linchkit_plugin.errors import Unauthorized

__all__ = [
    "UNAUTHORIZED_MESSAGE",
    "Authenticator",
    "Credentials",
    "Principal",
    "ProvenBy",
    "refused",
]

#: How a principal proved who it is.
ProvenBy = Literal["library", "api_key", "jwt", "mtls"]

#: The one message of every refusal: it never echoes input or says which check failed.
UNAUTHORIZED_MESSAGE = (
    "authentication required: present a valid API key, bearer token or client certificate"
)


def refused() -> Unauthorized:
    """The error of every failed authentication (a fresh one: errors get tracebacks)."""
    return Unauthorized(UNAUTHORIZED_MESSAGE)


@dataclass(frozen=True, slots=True, init=False)
class Principal:
    """An authenticated caller."""

    id: str
    roles: frozenset[str]
    #: How it authenticated; ``library``: the host vouches for it (``Dispatcher.call``).
    proven_by: ProvenBy
    #: When what proved it stops proving it, in wall-clock seconds (a bearer token's
    #: ``exp``, with the leeway its check allows); None: no end is known. What holds a
    #: connection open in its name (an event stream) checks it again by then. Not part of
    #: its identity: two tokens of one caller make equal principals.
    expires_at: float | None = field(default=None, compare=False)

    def __init__(
        self,
        id: str,
        roles: Iterable[str] = frozenset(),
        proven_by: ProvenBy = "library",
        expires_at: float | None = None,
    ) -> None:
        # Roles key the access decisions' cache: a set or list passed by a host becomes a
        # frozenset (hashable, and nobody can change a principal's roles after the check).
        # Typed as any iterable, so a host's ``Principal("bob", {"ops"})`` type-checks too.
        if isinstance(roles, str):
            raise TypeError(f"roles are role names, not one string: pass [{roles!r}]")
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "roles", frozenset(roles))
        object.__setattr__(self, "proven_by", proven_by)
        object.__setattr__(self, "expires_at", expires_at)

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presented, as its transport saw it (never logged)."""

    #: The ``Authorization`` header's value (``Bearer …``), if any.
    authorization: str | None = field(default=None, repr=False)
    #: The API key header's value (``X-API-Key``), if any.
    api_key: str | None = field(default=None, repr=False)
    #: The client certificate the TLS layer verified: its subject (RFC 4514) and SANs.
    certificate_subject: str | None = None
    certificate_sans: Sequence[str] = field(default_factory=tuple)


class Authenticator(Protocol):
    """Turns credentials into a principal, or raises ``Unauthorized`` (``refused()``:
    never says why beyond a fixed, secret-free reason)."""

    async def authenticate(self, credentials: Credentials) -> Principal: ...
