"""What a request presented: its ``Authorization`` and ``X-API-Key`` headers and, on a TLS
connection, the client certificate the TLS layer verified.

Only a verified certificate counts: the server's context asks for one with
``CERT_OPTIONAL`` or ``CERT_REQUIRED`` and a CA (``dispatcher.gateway.server``), and
Python's ``ssl`` then hands back the decoded certificate only when it chains to that CA.
The subject becomes an RFC 4514 string (``CN=alice,O=Example``: most specific first), the
SANs ``TYPE:value`` strings (``DNS:a.example``, ``IP:10.0.0.1``, ``URI:spiffe://…``,
``email:a@example``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from dispatcher.identity import Credentials

__all__ = ["credentials_from", "credentials_of", "rfc4514"]

# Python's ssl names → RFC 4514's short names (RFC 4514 §3 and the ones in common use).
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "userId": "UID",
}
# OIDs for names Python's ssl spells out that RFC 4514 has no short name for.
_OIDS = {
    "emailAddress": "1.2.840.113549.1.9.1",
    "serialNumber": "2.5.4.5",
    "surname": "2.5.4.4",
    "givenName": "2.5.4.42",
    "title": "2.5.4.12",
    "businessCategory": "2.5.4.15",
    "postalCode": "2.5.4.17",
}
_SAN_PREFIXES = {"IP Address": "IP", "email": "email", "DNS": "DNS", "URI": "URI"}


def credentials_of(request: web.Request) -> Credentials:
    """The credentials of ``request``; a certificate only if the TLS layer verified one."""
    return credentials_from(request.headers, request.transport)


def credentials_from(
    headers: Mapping[str, str], transport: asyncio.BaseTransport | None
) -> Credentials:
    """The credentials of a request's ``headers`` (names matched without case) over
    ``transport``; a certificate only if the TLS layer verified one."""
    subject: str | None = None
    sans: Sequence[str] = ()
    if transport is not None and transport.get_extra_info("sslcontext") is not None:
        certificate = transport.get_extra_info("peercert")
        if certificate:
            subject = rfc4514(certificate.get("subject", ()))
            sans = tuple(_san(kind, value) for kind, value in certificate.get("subjectAltName", ()))
    return Credentials(
        authorization=headers.get("Authorization"),
        api_key=headers.get("X-API-Key"),
        certificate_subject=subject,
        certificate_sans=sans,
    )


def rfc4514(subject: Sequence[Sequence[tuple[str, Any]]]) -> str:
    """Python's decoded subject (RDNs from the root down) as an RFC 4514 string."""
    return ",".join(
        "+".join(f"{_attribute_type(name)}={_escape(str(value))}" for name, value in rdn)
        for rdn in reversed(subject)
    )


def _attribute_type(name: str) -> str:
    return _SHORT_NAMES.get(name) or _OIDS.get(name) or name


def _escape(value: str) -> str:
    """RFC 4514 §2.4: escape the specials, a leading space or '#', a trailing space."""
    escaped = "".join(f"\\{char}" if char in ',+"\\<>;=' else char for char in value)
    escaped = escaped.replace("\x00", "\\00")
    if escaped.startswith((" ", "#")):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and len(escaped) > 1:
        escaped = escaped[:-1] + "\\ "
    return escaped


def _san(kind: str, value: str) -> str:
    return f"{_SAN_PREFIXES.get(kind, kind)}:{value}"
