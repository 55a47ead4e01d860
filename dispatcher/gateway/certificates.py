"""How the gateway names a verified client certificate: one reading for both ports.

The subject is an RFC 4514 string, as cryptography's ``Name.rfc4514_string`` writes it:
the most specific RDN first (``CN=alice,O=Example``); CN, L, ST, O, OU, C, STREET, DC
and UID by their short names, any other attribute by its dotted OID
(``2.5.4.5=1234``); the specials escaped as RFC 4514 §2.4 says (``,+"\\<>;``, a leading
space or ``#``, a trailing space, NUL), ``=`` not among them. The SANs are ``TYPE:value``
strings (``DNS:a.example``, ``IP:10.0.0.1``, ``IP:::1``, ``URI:spiffe://…``,
``email:a@example``); other kinds of name are left out.

Why one function from the certificate's bytes: the HTTP port read Python's decoded
certificate and the gRPC port cryptography's, and they named one certificate two ways
(``CN=a\\=b`` against ``CN=a=b``; ``organizationIdentifier`` against its OID; an IPv6
address in full against ``::1``), so an ``mtls.subject`` or SAN in the manifest
matched on one port only.
"""

from __future__ import annotations

import functools

__all__ = ["CertificateNames", "certificate_names"]

#: A certificate's subject and SANs, as ``Credentials`` carries them.
CertificateNames = tuple[str, tuple[str, ...]]

_SAN_PREFIXES = {
    "DNSName": "DNS",
    "IPAddress": "IP",
    "UniformResourceIdentifier": "URI",
    "RFC822Name": "email",
}


@functools.lru_cache(maxsize=1024)
def certificate_names(der: bytes) -> CertificateNames | None:
    """The subject and SANs of the certificate ``der`` (DER bytes), which the TLS layer
    verified; None when cryptography cannot read what OpenSSL accepted: a certificate
    that names nobody. SANs it cannot read (a kind it has no type for, such as an
    EDIPartyName, or an extension it finds malformed) are left out, the subject kept.
    Cached by its bytes: a connection presents one certificate for every request on it,
    and parsing it costs more than the rest of reading the credentials."""
    from cryptography import x509  # only for a verified client certificate

    try:
        certificate = x509.load_der_x509_certificate(der)
        subject = certificate.subject.rfc4514_string()
    except ValueError:
        return None
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return subject, ()
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return subject, ()
    sans = tuple(
        f"{_SAN_PREFIXES[type(name).__name__]}:{name.value}"
        for name in extension.value
        if type(name).__name__ in _SAN_PREFIXES
    )
    return subject, sans
