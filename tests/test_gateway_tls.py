"""The gateway over TLS (trustme certificates): serving, a certificate rotated without a
restart, client certificates optional and required, their subject passed as credentials."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dispatcher.gateway import GatewaySettings
from dispatcher.gateway.certificates import certificate_names
from tests.gateway_support import OneToken, running_gateway
from tests.test_gateway_grpc import grpc_call, stub


def write_pair(folder: Path, cert: trustme.LeafCert) -> tuple[Path, Path]:
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    # Written aside, then renamed: how a secret mount or cert-manager swaps files.
    for path, blob in (
        (cert_path, cert.cert_chain_pems[0].bytes()),
        (key_path, cert.private_key_pem.bytes()),
    ):
        spare = path.with_suffix(".new")
        spare.write_bytes(blob)
        spare.replace(path)
    return cert_path, key_path


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    return context


async def presented_certificate(url: str, context: ssl.SSLContext) -> bytes:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(
        host, int(port), ssl=context, server_hostname="localhost"
    )
    try:
        certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert certificate is not None
        return certificate
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def session_with(context: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


async def say(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(f"{url}/v1/plugins/echo/methods/say", json={"text": "hi"}) as answer:
        await answer.read()
        return answer.status


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


async def test_a_rotated_certificate_is_served_to_new_connections_while_old_ones_keep_working(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    first, second = ca.issue_cert("localhost", "127.0.0.1"), ca.issue_cert("localhost", "127.0.0.1")
    cert, key = write_pair(tmp_path, first)
    settings = GatewaySettings(port=0, tls_cert=cert, tls_key=key, cert_check_interval=0.1)
    async with (
        running_gateway(settings=settings) as (_, server),
        session_with(client_context(ca)) as old,
    ):
        url = server.url.replace("127.0.0.1", "localhost")
        assert url.startswith("https://")
        assert await say(old, url) == 200  # a keep-alive connection, opened on the first pair
        assert await presented_certificate(url, client_context(ca)) == der(first)
        write_pair(tmp_path, second)
        async with asyncio.timeout(15):
            while await presented_certificate(url, client_context(ca)) != der(second):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert await say(old, url) == 200
        # SIGHUP's path: a reload forced now, with nothing changed, loads the same pair.
        assert server.reload_certificates()


async def test_a_broken_pair_keeps_the_previous_certificate_serving(tmp_path: Path) -> None:
    ca = trustme.CA()
    first = ca.issue_cert("localhost")
    cert, key = write_pair(tmp_path, first)
    settings = GatewaySettings(port=0, tls_cert=cert, tls_key=key)
    async with running_gateway(settings=settings) as (_, server):
        url = server.url.replace("127.0.0.1", "localhost")
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n")
        assert not server.reload_certificates()
        assert await presented_certificate(url, client_context(ca)) == der(first)


@pytest.mark.parametrize("mode", ["optional", "required"])
async def test_a_verified_client_certificate_reaches_the_authenticator(
    tmp_path: Path, mode: str
) -> None:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert, key = write_pair(tmp_path, server_ca.issue_cert("localhost"))
    client_ca_path = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_path))
    alice = client_ca.issue_cert(
        "alice.example", "alice@example.com", common_name="alice", organization_name="Example, Inc."
    )
    subject = x509.load_pem_x509_certificate(
        alice.cert_chain_pems[0].bytes()
    ).subject.rfc4514_string()
    authenticator = OneToken(subjects=frozenset({subject}))
    settings = GatewaySettings(
        port=0,
        tls_cert=cert,
        tls_key=key,
        client_ca=client_ca_path,
        client_cert=mode,  # type: ignore[arg-type]
    )
    async with running_gateway(settings=settings, authenticator=authenticator) as (_, server):
        url = server.url.replace("127.0.0.1", "localhost")
        async with session_with(client_context(server_ca, alice)) as session:
            assert await say(session, url) == 200
        seen = authenticator.seen[-1]
        assert seen.certificate_subject == subject
        assert "CN=alice" in subject
        assert "O=Example\\, Inc." in subject
        assert set(seen.certificate_sans) == {"DNS:alice.example", "email:alice@example.com"}
        # A certificate from a CA the gateway does not trust never counts.
        stranger = trustme.CA().issue_cert("mallory.example", common_name="alice")
        async with session_with(client_context(server_ca, stranger)) as session:
            with pytest.raises(aiohttp.ClientError):
                await say(session, url)
        async with session_with(client_context(server_ca)) as session:
            if mode == "required":
                with pytest.raises(aiohttp.ClientError):
                    await say(session, url)
            else:
                assert await say(session, url) == 401  # no certificate, no token
                assert authenticator.seen[-1].certificate_subject is None


async def test_a_rotated_client_ca_is_used_at_the_next_handshake_and_the_old_one_dropped(
    tmp_path: Path,
) -> None:
    server_ca, old_ca, new_ca = trustme.CA(), trustme.CA(), trustme.CA()
    cert, key = write_pair(tmp_path, server_ca.issue_cert("localhost"))
    client_ca_path = tmp_path / "client-ca.pem"
    old_ca.cert_pem.write_to_path(str(client_ca_path))
    settings = GatewaySettings(
        port=0,
        tls_cert=cert,
        tls_key=key,
        client_ca=client_ca_path,
        client_cert="required",
        cert_check_interval=0.1,
    )
    old_client = client_context(server_ca, old_ca.issue_cert("old.example"))
    new_client = client_context(server_ca, new_ca.issue_cert("new.example"))
    async with running_gateway(settings=settings) as (_, server):
        url = server.url.replace("127.0.0.1", "localhost")
        async with session_with(old_client) as session:
            assert await say(session, url) == 200
        spare = client_ca_path.with_suffix(".new")
        new_ca.cert_pem.write_to_path(str(spare))
        spare.replace(client_ca_path)  # the way a secret mount swaps it
        async with asyncio.timeout(15):
            while True:
                try:
                    async with session_with(new_client) as session:
                        if await say(session, url) == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        # The CA rotated away is trusted no more: a fresh context, not one more CA loaded.
        async with session_with(old_client) as session:
            with pytest.raises(aiohttp.ClientError):
                await say(session, url)
        # A broken CA file keeps the current CA (and certificate) in place.
        client_ca_path.write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n")
        assert not server.reload_certificates()
        async with session_with(new_client) as session:
            assert await say(session, url) == 200


def _self_signed(
    subject: x509.Name, *sans: x509.GeneralName, extension: x509.ExtensionType | None = None
) -> bytes:
    """A certificate of ``subject`` and ``sans`` (or ``extension``), as DER."""
    import datetime

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if extension is not None:
        builder = builder.add_extension(extension, critical=False)
    certificate = builder.sign(key, hashes.SHA256())
    return certificate.public_bytes(serialization.Encoding.DER)


def test_subjects_are_written_as_rfc4514_says() -> None:
    oid = x509.NameOID
    subject = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(oid.COUNTRY_NAME, "DE")]),
            x509.RelativeDistinguishedName([x509.NameAttribute(oid.ORGANIZATION_NAME, 'A+B, "C"')]),
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(oid.COMMON_NAME, " lead#"),
                    x509.NameAttribute(oid.USER_ID, "u1"),
                ]
            ),
        ]
    )
    names = certificate_names(_self_signed(subject, x509.DNSName("a.example")))
    assert names == ('CN=\\ lead#+UID=u1,O=A\\+B\\, \\"C\\",C=DE', ("DNS:a.example",))


async def test_one_client_certificate_is_named_alike_on_both_ports(tmp_path: Path) -> None:
    """The HTTP port named a certificate from Python's decoded form and the gRPC port
    from cryptography's: ``CN=a\\=b`` against ``CN=a=b``, an IPv6 SAN written in full
    against ``::1``. A subject in the manifest then matched on one port only."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert, key = write_pair(tmp_path, server_ca.issue_cert("localhost"))
    client_ca_path = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_path))
    client = client_ca.issue_cert("a.example", "::1", common_name="a=b")
    subject = x509.load_pem_x509_certificate(
        client.cert_chain_pems[0].bytes()
    ).subject.rfc4514_string()
    assert subject.startswith("CN=a=b,")
    authenticator = OneToken(subjects=frozenset({subject}))
    settings = GatewaySettings(
        port=0,
        grpc_port=0,
        tls_cert=cert,
        tls_key=key,
        client_ca=client_ca_path,
        client_cert="required",
    )
    async with running_gateway(settings=settings, authenticator=authenticator) as (_, server):
        url = server.url.replace("127.0.0.1", "localhost")
        async with session_with(client_context(server_ca, client)) as session:
            assert await say(session, url) == 200
        over_http = authenticator.seen[-1]
        credentials = grpc.ssl_channel_credentials(
            root_certificates=server_ca.cert_pem.bytes(),
            private_key=client.private_key_pem.bytes(),
            certificate_chain=client.cert_chain_pems[0].bytes(),
        )
        assert server.grpc is not None
        async with grpc.aio.secure_channel(f"localhost:{server.grpc.port}", credentials) as channel:
            reply = await stub(channel).Call(grpc_call("echo", "say", {"text": "hi"}), timeout=10)
            assert reply.ok
        over_grpc = authenticator.seen[-1]
    assert over_http.certificate_subject == over_grpc.certificate_subject == subject
    assert over_http.certificate_sans == over_grpc.certificate_sans == ("DNS:a.example", "IP:::1")


def test_a_san_of_a_kind_cryptography_cannot_read_names_no_san_and_fails_nothing() -> None:
    """OpenSSL verifies a certificate whose SANs include an EDIPartyName; cryptography
    raises an exception of its own type on reading it, which reached the HTTP port as a
    500. The subject still names the caller; no SAN does."""
    edi_party_name = bytes.fromhex("3007A505A1030C0178")  # SEQUENCE { [5] { [1] "x" } }
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "odd")])
    extension = x509.UnrecognizedExtension(
        x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, edi_party_name
    )
    assert certificate_names(_self_signed(subject, extension=extension)) == ("CN=odd", ())


def _refusal_read(port: int, context: ssl.SSLContext) -> str:
    """What a blocking client reads when it sends a request on a handshake the gateway
    refuses: the alert's reason (OpenSSL's words), or what it got instead."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                return f"read {tls.recv(64)!r}"
        except ssl.SSLError as error:
            return str(error.reason)
        except OSError as error:
            return type(error).__name__


@pytest.mark.parametrize("event_loop_kind", ["asyncio", "uvloop"])
def test_a_refused_client_certificate_is_told_why_by_the_tls_alert(
    tmp_path: Path, event_loop_kind: str
) -> None:
    """asyncio's TLS transport, and uvloop's, closed a refused handshake without its alert
    (CPython gh-98078): a client read an end of file and could not tell why (before, each
    of these read ``read b''``)."""
    server_ca, client_ca, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    cert, key = write_pair(tmp_path, server_ca.issue_cert("localhost"))
    client_ca_path = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_path))
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    presented = {
        "none": None,
        "another CA": stranger.issue_cert("plugin.example"),
        "expired": client_ca.issue_cert(
            "plugin.example", not_before=past - datetime.timedelta(days=1), not_after=past
        ),
    }
    settings = GatewaySettings(
        port=0, tls_cert=cert, tls_key=key, client_ca=client_ca_path, client_cert="required"
    )

    async def refusals() -> dict[str, str]:
        async with running_gateway(settings=settings) as (_, server):
            port = int(server.url.rsplit(":", 1)[1])
            return {
                name: await asyncio.to_thread(
                    _refusal_read, port, client_context(server_ca, certificate)
                )
                for name, certificate in presented.items()
            }

    if event_loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        read = uvloop.run(refusals())
    else:
        read = asyncio.run(refusals())
    assert read == {
        "none": "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "another CA": "TLSV1_ALERT_UNKNOWN_CA",
        "expired": "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    }
