"""What a request presented: its ``Authorization`` and ``X-API-Key`` headers and, on a TLS
connection, the client certificate the TLS layer verified.

Only a verified certificate counts: the server's context asks for one with
``CERT_OPTIONAL`` or ``CERT_REQUIRED`` and a CA (``dispatcher.gateway.server``), and
Python's ``ssl`` then hands back the decoded certificate only when it chains to that CA.
Its subject and SANs are named as both ports name them (``dispatcher.gateway.certificates``:
``CN=alice,O=Example``, ``DNS:a.example``, ``IP:10.0.0.1``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import web

from dispatcher.gateway.certificates import CertificateNames, certificate_names
from dispatcher.identity import Credentials

__all__ = ["credentials_from", "credentials_of"]


def credentials_of(request: web.Request) -> Credentials:
    """The credentials of ``request``; a certificate only if the TLS layer verified one."""
    return credentials_from(request.headers, request.transport)


def credentials_from(
    headers: Mapping[str, str], transport: asyncio.BaseTransport | None
) -> Credentials:
    """The credentials of a request's ``headers`` (names matched without case) over
    ``transport``; a certificate only if the TLS layer verified one."""
    names = _verified_certificate(transport)
    return Credentials(
        authorization=_one(headers, "Authorization"),
        api_key=_one(headers, "X-API-Key"),
        certificate_subject=None if names is None else names[0],
        certificate_sans=() if names is None else names[1],
    )


def _one(headers: Mapping[str, str], name: str) -> str | None:
    """The value of the one ``name`` header, None without one; sent twice, an empty value,
    which no authenticator admits: which of the two counts is no longer clear (a proxy in
    front may have judged the request by the other), so neither does."""
    getall = getattr(headers, "getall", None)  # a multidict: every value the request sent
    if getall is None:
        return headers.get(name)
    values = getall(name, [])
    if len(values) > 1:
        return ""
    return values[0] if values else None


def _verified_certificate(transport: asyncio.BaseTransport | None) -> CertificateNames | None:
    """The names of the client certificate the TLS layer verified on ``transport``.

    Python's decoded form of the peer's certificate is empty unless it was verified
    against the server's CA, so it says whether there is one; its names are read from
    the certificate's bytes, as the gRPC port reads them (``certificate_names``).
    """
    if transport is None or transport.get_extra_info("sslcontext") is None:
        return None
    if not transport.get_extra_info("peercert"):
        return None
    connection = transport.get_extra_info("ssl_object")
    der = None if connection is None else connection.getpeercert(binary_form=True)
    return None if der is None else certificate_names(der)
