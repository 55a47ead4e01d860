"""One-time certificates for AutoMTLS between the host and a subprocess plugin.

As in hashicorp/go-plugin: per launch, the host makes a fresh self-signed client
certificate and passes it to the plugin (``LINCHKIT_PLUGIN_CLIENT_CERT``); the plugin
makes a fresh self-signed server certificate and returns it in the handshake line. Each
side trusts exactly the other's certificate, so only this host can talk to this plugin,
even over TCP. Keys are ECDSA P-256 and never touch the disk. Subject alternative name
``localhost``; each certificate is its own CA (it is the only trust root of the peer).

``cryptography`` is imported when a certificate is made, not when this module loads.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass

__all__ = ["Certificate", "der_from_handshake", "generate_certificate", "pem_from_der"]


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate and its private key, PEM encoded; ``der`` is the certificate's DER."""

    certificate_pem: bytes
    private_key_pem: bytes
    der: bytes

    @property
    def handshake_text(self) -> str:
        """The DER in base64 without padding: the handshake line's SERVER-CERT field."""
        return base64.b64encode(self.der).decode().rstrip("=")


def generate_certificate(common_name: str, *, hours: float = 24 * 30) -> Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LinchKit plugin"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=30))
        .not_valid_after(now + datetime.timedelta(hours=hours))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return Certificate(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        der=certificate.public_bytes(serialization.Encoding.DER),
    )


def der_from_handshake(text: str) -> bytes:
    """Decode the SERVER-CERT field (base64, padding optional)."""
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def pem_from_der(der: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
