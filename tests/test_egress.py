"""The manifest's ``egress`` policy, at load time and after name resolution.

No DNS server is needed for the after-resolution cases: ``localhost`` resolves to
127.0.0.1, and an allowlist without 127.0.0.0/8 makes it a name that loads (it might
resolve into the list) and is refused once resolved, before any byte is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher, ProviderError
from dispatcher.config import ManifestError, parse_manifest
from providers.egress import Destination, EgressPolicy, EgressRefused
from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin


def plugins(target: dict[str, Any], egress: dict[str, Any] | None = None) -> Any:
    document: dict[str, Any] = {
        "version": 1,
        "plugins": [echo_plugin("remote", target, defaults={"timeout_ms": 2000})],
    }
    if egress is not None:
        document["egress"] = egress
    return parse_manifest(document, base_dir=ROOT)


def refused(target: dict[str, Any], egress: dict[str, Any] | None = None) -> str:
    with pytest.raises(ManifestError) as caught:
        plugins(target, egress)
    return str(caught.value)


@asynccontextmanager
async def listening() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP server on 127.0.0.1 recording every byte it receives; answers one envelope."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        received.append(data)
        body = b'{"ok": true, "result": "reached"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


# -- at load time ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.170.2/v2/credentials",
        "http://[fe80::1]:8080",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::a9fe:a9fe]/",  # IPv4-compatible (deprecated), as Python prints it
        "http://[::169.254.169.254]/",  # the same, written with its IPv4 address
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64's well-known prefix
        "http://[64:ff9b:1::a9fe:a9fe]/",  # NAT64's local-use prefix, as a /96
        "http://[2002:a9fe:a9fe::1]/",  # 6to4
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.google.internal./",
    ],
)
def test_link_local_and_metadata_urls_are_refused_at_load(url: str) -> None:
    message = refused({"provider": "http", "url": url})
    assert "plugins[0].target.url" in message
    assert "allow_link_local" in message  # says how to relax it


@pytest.mark.parametrize(
    "host",
    ["2852039166", "0251.0376.0251.0376", "0xa9fea9fe", "169.254.169.254.", "127.1", "10.0.0.0x1"],
)
def test_an_address_in_a_form_other_than_four_decimals_is_refused_at_load(host: str) -> None:
    """Resolvers (inet_aton) and WHATWG URL parsers read these as 169.254.169.254,
    127.0.0.1 or 10.0.0.1; the policy took them for names and checked none of that (an
    http target's URL is made canonical by the manifest's URL type first)."""
    message = refused({"provider": "grpc", "address": f"{host}:50051"})
    assert "plugins[0].target.address" in message
    assert "ends in a number" in message
    policy = EgressPolicy()
    refusal = policy.refusal(Destination.of_url("callback_url", f"http://{host}:8080/"))
    assert refusal is not None
    assert "ends in a number" in refusal
    assert policy.name_refusal(host) is not None  # at connect time too
    assert policy.name_refusal("svc-1.internal") is None
    assert policy.name_refusal("a1.example.com.") is None


def test_knative_ingress_and_grpc_address_are_checked_too() -> None:
    ingress = {"provider": "knative", "service": "echo", "ingress": "http://169.254.169.254"}
    assert "plugins[0].target.ingress" in refused(ingress)
    assert "plugins[0].target.address" in refused({"provider": "grpc", "address": "169.254.169.254:80"})  # fmt: skip
    assert "plugins[0].target.address" in refused({"provider": "grpc", "address": "[fe80::1]:80"})


def test_a_method_target_is_named_by_its_own_path() -> None:
    document = {
        "version": 1,
        "plugins": [
            {
                "id": "p",
                "version": "1.0.0",
                "methods": {
                    "say": {"target": {"provider": "http", "url": "http://169.254.169.254"}}
                },
            }
        ],
    }
    with pytest.raises(ManifestError) as caught:
        parse_manifest(document)
    assert caught.value.problems[0].path == "plugins[0].methods.say.target.url"


def test_the_docker_socket_is_refused_at_load() -> None:
    message = refused({"provider": "grpc", "address": "unix:/var/run/docker.sock"})
    assert "plugins[0].target.address" in message
    assert "unix_socket_dirs" in message
    assert "plugins[0].target.address" in refused({"provider": "grpc", "address": "unix:///run/docker.sock"})  # fmt: skip


def test_a_symlink_to_the_docker_socket_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "innocent.sock"
    link.symlink_to("/var/run/docker.sock")
    assert "unix_socket_dirs" in refused({"provider": "grpc", "address": f"unix:{link}"})


def test_sockets_in_the_temp_folder_and_listed_folders_are_allowed(tmp_path: Path) -> None:
    plugins({"provider": "grpc", "address": f"unix:{tmp_path}/plugin.sock"})
    plugins({"provider": "grpc", "address": "unix:/run/plugins/echo.sock"})
    plugins(
        {"provider": "grpc", "address": "unix:/var/run/docker.sock"},
        {"unix_socket_dirs": ["/var/run"]},
    )


@pytest.mark.parametrize(
    "endpoint", ["file:///etc/passwd", "gopher://127.0.0.1:70/", "ftp://x/", "127.0.0.1:5000"]
)
def test_lambda_endpoint_must_be_http(endpoint: str) -> None:
    target = {"provider": "lambda", "function_name": "echo", "endpoint_url": endpoint}
    assert "plugins[0].target.endpoint_url" in refused(target)


def test_lambda_endpoint_on_a_metadata_address_is_refused() -> None:
    target = {"provider": "lambda", "function_name": "e", "endpoint_url": "http://169.254.169.254"}
    assert "allow_link_local" in refused(target)


def test_allow_link_local_relaxes_the_guard() -> None:
    plugins({"provider": "http", "url": "http://169.254.169.254/"}, {"allow_link_local": True})


def test_an_allowlist_refuses_literals_and_names_outside_it() -> None:
    only_ten = {"allow": ["10.0.0.0/8", "*.internal", "api.example.com"]}
    assert "egress.allow" in refused({"provider": "http", "url": "http://127.0.0.1:9"}, only_ten)
    names = {"allow": ["*.internal", "api.example.com"]}
    assert "egress.allow" in refused({"provider": "http", "url": "http://evil.example.org"}, names)
    plugins({"provider": "http", "url": "http://10.1.2.3:9"}, only_ten)
    plugins({"provider": "http", "url": "http://svc.ns.internal"}, only_ten)
    plugins({"provider": "http", "url": "http://API.example.com."}, only_ten)


def test_an_allowlist_entry_must_be_a_cidr_or_a_host() -> None:
    message = refused({"provider": "http", "url": "http://10.0.0.1"}, {"allow": ["10.0.0.0/33"]})
    assert "egress.allow" in message
    assert "unknown key" in refused({"provider": "http", "url": "http://10.0.0.1"}, {"alow": []})


def test_the_policy_checks_destinations_directly() -> None:
    policy = EgressPolicy()
    assert policy.refusal(Destination.of_url("url", "http://127.0.0.1:8080")) is None
    assert policy.refusal(Destination.of_url("url", "http://169.254.169.254")) is not None
    assert policy.admitted("localhost", ["127.0.0.1", "169.254.169.254"]) == ["127.0.0.1"]


# -- after name resolution ------------------------------------------------------------------


async def test_a_name_resolving_outside_the_allowlist_is_refused_before_sending() -> None:
    async with listening() as (port, received):
        manifest = plugins(
            {"provider": "http", "url": f"http://localhost:{port}"}, {"allow": ["10.0.0.0/8"]}
        )
        async with Dispatcher(manifest) as dispatcher:
            with pytest.raises(ProviderError) as caught:
                await dispatcher.call("remote", "say", {"text": "hi"})
            health = (await dispatcher.health())[0].health
    assert received == []
    assert "127.0.0.1" in str(caught.value)
    assert "egress" in str(caught.value)
    assert not caught.value.retryable
    assert health.status == "not_serving"
    assert "egress" in health.detail


async def test_knative_refuses_a_forbidden_resolution_without_resending() -> None:
    async with listening() as (port, received):
        target = {
            "provider": "knative",
            "service": "echo",
            "ingress": f"http://localhost:{port}",
            "mode": "envelope",
        }
        manifest = plugins(target, {"allow": ["10.0.0.0/8"]})
        async with Dispatcher(manifest) as dispatcher:
            with pytest.raises(ProviderError, match="egress"):
                await dispatcher.call("remote", "say", {"text": "hi"})
    assert received == []


async def test_grpc_resolves_and_checks_before_opening_a_channel() -> None:
    async with listening() as (port, received):
        manifest = plugins(
            {"provider": "grpc", "address": f"localhost:{port}"}, {"allow": ["10.0.0.0/8"]}
        )
        with pytest.raises(ProviderError, match="egress"):
            async with Dispatcher(manifest):
                pass
    assert received == []


async def test_an_allowlisted_target_still_works() -> None:
    async with listening() as (port, received):
        for allow in (["127.0.0.0/8"], ["localhost"], ["*.example.com", "127.0.0.1"]):
            manifest = plugins(
                {"provider": "http", "url": f"http://localhost:{port}"}, {"allow": allow}
            )
            async with Dispatcher(manifest) as dispatcher:
                assert await dispatcher.call("remote", "say", {"text": "hi"}) == "reached"
    assert len(received) == 3


async def test_a_name_allowed_by_name_still_cannot_reach_link_local() -> None:
    policy = EgressPolicy.model_validate({"allow": ["api.example.com"]})
    with pytest.raises(ProviderError, match="link-local"):
        policy.admitted("api.example.com", ["169.254.169.254"])
    assert policy.admitted("api.example.com", ["203.0.113.9"]) == ["203.0.113.9"]


async def test_lambda_checks_its_endpoint_after_resolution() -> None:
    target = {
        "provider": "lambda",
        "function_name": "echo",
        "region": "us-east-1",
        "endpoint_url": "http://localhost:9",
    }
    with pytest.raises(ProviderError, match="egress"):
        async with Dispatcher(plugins(target, {"allow": ["10.0.0.0/8"]})):
            pass


# -- where the dispatcher itself connects: the JWKS it downloads, the OTLP collector ---------


def own_manifest(egress: dict[str, Any] | None = None, **sections: Any) -> Any:
    document: dict[str, Any] = {
        "version": 1,
        "plugins": [echo_plugin("local", LOCAL_TARGET)],
        **sections,
    }
    if egress is not None:
        document["egress"] = egress
    return parse_manifest(document, base_dir=ROOT)


def own_refusal(egress: dict[str, Any] | None = None, **sections: Any) -> str:
    with pytest.raises(ManifestError) as caught:
        own_manifest(egress, **sections)
    return str(caught.value)


def jwt_at(url: str) -> dict[str, Any]:
    return {"jwt": {"jwks": url, "algorithms": ["RS256"]}}


def tracing_to(url: str) -> dict[str, Any]:
    return {"tracing": {"otlp_endpoint": url}}


@pytest.fixture
def no_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)


@pytest.mark.parametrize(
    ("url", "egress"),
    [
        ("http://169.254.169.254/latest/jwks.json", None),
        ("https://metadata.google.internal/jwks", None),
        ("https://issuer.example.com/jwks", {"allow": ["api.internal", "*.corp"]}),
        ("http://127.0.0.1:8080/jwks", {"allow": ["10.0.0.0/8"]}),
    ],
)
def test_a_jwks_url_outside_egress_is_refused_at_load(
    url: str, egress: dict[str, Any] | None
) -> None:
    message = own_refusal(egress, auth=jwt_at(url))
    assert "auth.jwt.jwks" in message
    assert "the JWKS URL is outside the egress policy" in message


@pytest.mark.usefixtures("no_otel_variables")
@pytest.mark.parametrize(
    ("url", "egress"),
    [
        ("http://169.254.169.254:4318/v1/traces", None),
        ("http://[fe80::1]:4318/v1/traces", None),
        ("https://collector.example.com/v1/traces", {"allow": ["*.internal"]}),
        ("http://127.0.0.1:4318/v1/traces", {"allow": ["10.0.0.0/8"]}),
    ],
)
def test_an_otlp_endpoint_outside_egress_is_refused_at_load(
    url: str, egress: dict[str, Any] | None
) -> None:
    message = own_refusal(egress, telemetry=tracing_to(url))
    assert "telemetry.tracing.otlp_endpoint" in message
    assert "the OTLP endpoint is outside the egress policy" in message


@pytest.mark.usefixtures("no_otel_variables")
@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
)
def test_an_otlp_endpoint_from_the_environment_is_checked_and_named(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "http://169.254.169.254:4318")
    message = own_refusal()
    assert f"the OTLP endpoint (from {variable}) is outside the egress policy" in message
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")  # no tracing, nothing exported there
    own_manifest()


@pytest.mark.usefixtures("no_otel_variables")
def test_a_jwks_url_and_otlp_endpoint_inside_egress_load() -> None:
    allow = {"allow": ["10.0.0.0/8", "*.internal", "127.0.0.1"]}
    own_manifest(
        allow,
        auth=jwt_at("https://issuer.internal/jwks"),
        telemetry=tracing_to("http://127.0.0.1:4318/v1/traces"),
    )
    # A file is not a destination; nor is tracing turned off.
    own_manifest(
        allow,
        auth=jwt_at(str(ROOT / "tests" / "jwks.json")),
        telemetry={"tracing": {"otlp_endpoint": "http://169.254.169.254/", "enabled": False}},
    )
    with pytest.raises(ManifestError) as caught:
        own_manifest(
            allow,
            auth=jwt_at("http://169.254.169.254/jwks"),
            telemetry=tracing_to("http://169.254.169.254/v1/traces"),
        )
    assert "auth.jwt.jwks" in str(caught.value)
    assert "telemetry.tracing.otlp_endpoint" in str(caught.value)  # both, at once


async def test_the_jwks_download_checks_egress_after_resolution(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``localhost`` loads under an allowlist of networks (it might resolve into one) and
    resolves to 127.0.0.1, outside it: the key set is never asked for."""
    async with listening() as (port, received):
        loaded = own_manifest(
            {"allow": ["10.0.0.0/8"]}, auth=jwt_at(f"http://localhost:{port}/jwks")
        )
        async with Dispatcher(loaded) as dispatcher:
            assert dispatcher.authenticator is not None
            jwt = dispatcher.authenticator.jwt
            assert jwt is not None
            assert jwt.keys.failures == 1 and jwt.keys.keys == {}
        assert received == []
    assert "egress policy refuses localhost" in caplog.text


async def test_the_jwks_download_inside_egress_still_reaches_the_issuer() -> None:
    async with listening() as (port, received):
        loaded = own_manifest(
            {"allow": ["127.0.0.0/8"]}, auth=jwt_at(f"http://localhost:{port}/jwks")
        )
        async with Dispatcher(loaded):
            pass
        assert len(received) == 1 and received[0].startswith(b"GET /jwks ")


def test_an_ipv4_compatible_address_is_judged_as_its_ipv4_address() -> None:
    """``::a9fe:a9fe`` (IPv4-compatible, deprecated) is 169.254.169.254 to an automatic
    tunnel or a parser that reads the form; it passed, being neither link-local IPv6 nor
    IPv4-mapped. ``::`` and ``::1`` are no IPv4 addresses: loopback stays loopback."""
    policy = EgressPolicy()
    for address in ("::a9fe:a9fe", "::169.254.169.254", "::6464:64c8"):  # 100.100.100.200
        with pytest.raises(EgressRefused, match="link-local"):
            policy.admitted("api.example.com", [address])
    assert policy.admitted("localhost", ["::1"]) == ["::1"]
    allowlist = EgressPolicy.model_validate({"allow": ["::1/128", "10.0.0.0/8"]})
    assert allowlist.admitted("svc.internal", ["::1", "::a00:1"]) == ["::1", "::a00:1"]
    with pytest.raises(EgressRefused, match=r"not in egress\.allow"):
        allowlist.admitted("svc.internal", ["::cb00:7109"])  # 203.0.113.9


def test_an_ipv6_address_carrying_an_ipv4_one_is_judged_as_that_ipv4_address() -> None:
    """An IPv6 address that a translator or a tunnel turns into an IPv4 one reaches that
    IPv4 address: NAT64 (64:ff9b::/96, and the local-use 64:ff9b:1::/48 as a /96) and 6to4
    (2002::/16), as IPv4-mapped addresses were already. Before, 64:ff9b::a9fe:a9fe (a
    metadata service through a NAT64 on the host) passed where 169.254.169.254 did not."""
    policy = EgressPolicy()
    for address in ("64:ff9b::a9fe:a9fe", "64:ff9b:1::a9fe:a9fe", "2002:a9fe:a9fe::1"):
        with pytest.raises(EgressRefused, match="link-local"):
            policy.admitted("api.example.com", [address])
    assert policy.admitted("api.example.com", ["64:ff9b::cb00:7109"]) == ["64:ff9b::cb00:7109"]
    allowlist = EgressPolicy.model_validate({"allow": ["10.0.0.0/8"]})
    assert allowlist.admitted("svc.internal", ["64:ff9b::a00:1"]) == ["64:ff9b::a00:1"]
    with pytest.raises(EgressRefused, match=r"not in egress\.allow"):
        allowlist.admitted("svc.internal", ["64:ff9b::cb00:7109"])  # 203.0.113.9
