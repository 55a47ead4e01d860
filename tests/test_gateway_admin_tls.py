"""``telemetry.metrics.tls``: the admin listener over HTTPS, client certificates optional
or required, certificate files reloaded when they change, as ``gateway.tls`` does.

Real gateways on 127.0.0.x with trustme certificates (tests/test_gateway_tls.py makes the
gateway's own the same way), real TLS clients, raw sockets for what a client gone wrong
sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from dispatcher import ManifestError, parse_manifest
from dispatcher.gateway import GatewaySettings
from dispatcher.gateway.admin import admin_in_clear
from tests.gateway_support import echo_entry
from tests.test_gateway_admin import TOKEN, VARIABLE, metrics_manifest, serving
from tests.test_gateway_tls import client_context, der, presented_certificate, write_pair

BEARER = {"Authorization": f"Bearer {TOKEN}"}


#: The addresses these tests' admin ports listen on, named in their certificates.
ADDRESSES = [f"127.0.0.{last}" for last in range(20, 30)]


def server_files(folder: Path, ca: trustme.CA) -> dict[str, str]:
    cert, key = write_pair(folder, ca.issue_cert("localhost", *ADDRESSES))
    return {"cert": str(cert), "key": str(key)}


def client_ca_file(folder: Path, ca: trustme.CA) -> str:
    path = folder / "scrapers-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def scrape(url: str, context: ssl.SSLContext) -> tuple[int, str]:
    connector = aiohttp.TCPConnector(ssl=context)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{url}/metrics", headers=BEARER) as answer,
    ):
        return answer.status, await answer.text()


async def plain_attempt(url: str) -> bytes:
    """What a plain-HTTP request to ``url``'s port gets back before the port closes it."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"GET /metrics HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        with contextlib.suppress(ConnectionError):
            return await asyncio.wait_for(reader.read(), 10)
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# -- the manifest ------------------------------------------------------------------------------


def test_tls_is_the_gateway_model_and_needs_the_admin_listener(tmp_path: Path) -> None:
    ca = trustme.CA()
    files = server_files(tmp_path, ca)
    with pytest.raises(ManifestError, match=r"tls is the admin listener's, and needs listen"):
        metrics_manifest(tmp_path, tls=files)
    with pytest.raises(ManifestError, match="client_cert: required needs client_ca"):
        metrics_manifest(tmp_path, listen="127.0.0.1:0", tls={**files, "client_cert": "required"})
    with pytest.raises(ManifestError, match="metrics are off"):
        parse_manifest(
            {
                "version": 1,
                "plugins": [echo_entry(say={})],
                "telemetry": {"metrics": {"listen": "127.0.0.1:0", "tls": files}},
            },
            base_dir=tmp_path,
        )
    tls = metrics_manifest(tmp_path, listen="127.0.0.1:0", tls=files).telemetry.metrics.tls
    assert tls is not None and tls.client_certificates == "none"


# -- serving -------------------------------------------------------------------------------------


async def test_the_admin_port_serves_https_and_plain_http_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VARIABLE, TOKEN)
    ca = trustme.CA()
    tls = server_files(tmp_path, ca)
    async with serving(tmp_path, listen="127.0.0.21:0", token_env=VARIABLE, tls=tls) as (
        _,
        server,
    ):
        assert server.admin is not None
        url = server.admin.url
        assert url.startswith("https://127.0.0.21:"), url
        status, text = await scrape(url, client_context(ca))
        assert status == 200 and "dispatcher_calls_in_flight" in text
        # The gateway's own port is untouched: plain HTTP, no /metrics.
        assert server.url.startswith("http://")
        # Plain HTTP on the TLS port: no answer, no exposition, the token went nowhere.
        refused = await plain_attempt(url)
        assert not refused.startswith(b"HTTP/"), refused
        assert b"dispatcher_" not in refused
        # A client that does not trust the admin port's CA does not get through.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await scrape(url, client_context(trustme.CA()))
        # Still serving after both.
        assert (await scrape(url, client_context(ca)))[0] == 200


async def test_a_client_certificate_required_refuses_a_scraper_without_one(
    tmp_path: Path,
) -> None:
    server_ca, scrapers_ca = trustme.CA(), trustme.CA()
    tls = {
        **server_files(tmp_path, server_ca),
        "client_ca": client_ca_file(tmp_path, scrapers_ca),
        "client_cert": "required",
    }
    prometheus = scrapers_ca.issue_cert("prometheus.example")
    stranger = trustme.CA().issue_cert("prometheus.example")
    async with serving(tmp_path, listen="127.0.0.22:0", tls=tls) as (_, server):
        assert server.admin is not None
        url = server.admin.url
        status, _ = await scrape(url, client_context(server_ca, prometheus))
        assert status == 200
        for context in (client_context(server_ca), client_context(server_ca, stranger)):
            with pytest.raises(aiohttp.ClientError):
                await scrape(url, context)
        # The probes too: the certificate is the port's, not one route's.
        connector = aiohttp.TCPConnector(ssl=client_context(server_ca))
        async with aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"{url}/readyz") as answer:
                    await answer.read()


async def test_a_client_certificate_optional_lets_a_scraper_without_one_in(
    tmp_path: Path,
) -> None:
    server_ca, scrapers_ca = trustme.CA(), trustme.CA()
    tls = {
        **server_files(tmp_path, server_ca),
        "client_ca": client_ca_file(tmp_path, scrapers_ca),
        "client_cert": "optional",
    }
    async with serving(tmp_path, listen="127.0.0.23:0", tls=tls) as (_, server):
        assert server.admin is not None
        url = server.admin.url
        assert (await scrape(url, client_context(server_ca)))[0] == 200
        prometheus = scrapers_ca.issue_cert("prometheus.example")
        assert (await scrape(url, client_context(server_ca, prometheus)))[0] == 200
        stranger = trustme.CA().issue_cert("prometheus.example")
        with pytest.raises(aiohttp.ClientError):  # sent, so verified
            await scrape(url, client_context(server_ca, stranger))


async def test_a_rotated_admin_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    ca = trustme.CA()
    first, second = ca.issue_cert("localhost", *ADDRESSES), ca.issue_cert("localhost", *ADDRESSES)
    cert, key = write_pair(tmp_path, first)
    settings = GatewaySettings(port=0, cert_check_interval=0.1)
    tls = {"cert": str(cert), "key": str(key)}
    async with serving(tmp_path, settings, listen="127.0.0.24:0", tls=tls) as (_, server):
        assert server.admin is not None
        url = server.admin.url.replace("127.0.0.24", "localhost")
        host_url = server.admin.url
        assert await presented_certificate(host_url, client_context(ca)) == der(first)
        write_pair(tmp_path, second)
        async with asyncio.timeout(15):
            while await presented_certificate(host_url, client_context(ca)) != der(second):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        # SIGHUP's path reloads the admin port's files too.
        write_pair(tmp_path, first)
        assert server.reload_certificates()
        assert await presented_certificate(host_url, client_context(ca)) == der(first)
        assert url  # the name the certificate carries serves as well as the address


async def test_a_tls_handshake_that_never_comes_is_closed_after_the_header_timeout(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    settings = GatewaySettings(port=0, header_timeout=1.0)
    tls = server_files(tmp_path, ca)
    async with serving(tmp_path, settings, listen="127.0.0.25:0", tls=tls) as (_, server):
        assert server.admin is not None
        host, port = server.admin.url.removeprefix("https://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 10) == b""
            assert 0.8 < loop.time() - started < 6.0
            await asyncio.sleep(0.1)
            assert server.admin.connections.open == 0
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


# -- an admin port in clear beside a gateway with TLS ------------------------------------------


@pytest.mark.parametrize(
    ("host", "warned"),
    [
        ("0.0.0.0", True),
        ("::", True),
        ("10.1.2.3", True),
        ("metrics.internal", True),
        ("127.0.0.1", False),
        ("127.9.9.9", False),
        ("::1", False),
        ("localhost", False),
    ],
)
def test_an_admin_port_in_clear_off_loopback_is_warned_of_when_the_gateway_has_tls(
    host: str, warned: bool
) -> None:
    assert admin_in_clear(host, gateway_tls=True, admin_tls=False) is warned
    assert admin_in_clear(host, gateway_tls=False, admin_tls=False) is False
    assert admin_in_clear(host, gateway_tls=True, admin_tls=True) is False


async def test_a_loopback_admin_port_in_clear_is_not_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    files = server_files(tmp_path, ca)
    settings = GatewaySettings(port=0, tls_cert=Path(files["cert"]), tls_key=Path(files["key"]))
    caplog.set_level(logging.WARNING, "dispatcher")
    async with serving(tmp_path, settings, listen="127.0.0.26:0") as (_, server):
        assert server.admin is not None and server.admin.url.startswith("http://")
    assert "admin port" not in caplog.text
