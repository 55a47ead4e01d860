"""Hostile HTTP peers and secrets: redirects, half envelopes, credentials in URLs, leaks.

Every test runs real servers on loopback addresses (127.0.0.1 and 127.0.0.2, two origins)
and, where the CLI prints, the real ``dispatcher`` command.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from dispatcher import Dispatcher, DispatchError, ProviderError
from dispatcher.config import ManifestError, load_manifest, parse_manifest
from linchkit_plugin.wire import decode_response
from providers._aiohttp import in_flight_error
from providers.docker.target import DockerTarget
from providers.envelope import decode_batch_response
from providers.grpc import GrpcTarget
from providers.http import HttpTarget
from providers.knative.target import KnativeTarget
from providers.subprocess.target import SubprocessTarget
from providers.target import masked_url
from providers.websocket.target import WebSocketTarget
from tests.conftest import echo_plugin, manifest

BIN = Path(sys.executable).parent
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving_on(
    hosts: Iterable[str], port: int, handler: Handler
) -> AsyncIterator[list[asyncio.Server]]:
    """Real TCP servers running ``handler`` per connection on ``port`` (0: any) of each of
    ``hosts`` (loopback addresses: a fleet found by DNS shares a port); yields them."""
    tasks: set[asyncio.Task[Any]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def handled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Each connection is recorded as it is accepted, not once its task first runs:
        # one accepted as the test ended (a client's detached request connecting late)
        # had its task cancelled before it ran, and its socket was left open.
        writers.add(writer)
        tasks.add(asyncio.get_running_loop().create_task(handled(reader, writer)))

    servers = [await asyncio.start_server(accepted, host, port) for host in hosts]
    try:
        yield servers
    finally:
        for server in servers:
            server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.close()
        for server in servers:
            await server.wait_closed()


@asynccontextmanager
async def server_on(host: str, handler: Handler) -> AsyncIterator[tuple[str, int]]:
    """A real TCP server on ``host`` (a loopback address), port 0; yields (host, port)."""
    async with serving_on([host], 0, handler) as (server,):
        yield host, server.sockets[0].getsockname()[1]


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: its head and its body (Content-Length, or none)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def replying(
    status: int, body: bytes = b"", *headers: str, seen: list[bytes] | None = None
) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, request = await read_head(reader)
            if seen is not None:
                seen.append(head + request)
            extra = "".join(f"{header}\r\n" for header in headers)
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
            )
            await writer.drain()

    return handle


@asynccontextmanager
async def redirect_pair(
    location_template: str,
) -> AsyncIterator[tuple[str, list[bytes], list[bytes]]]:
    """A hostile server on 127.0.0.1 answering every request with a 307 to a second server
    on 127.0.0.2. Yields the first one's URL and what each received."""
    first_seen: list[bytes] = []
    second_seen: list[bytes] = []
    async with server_on("127.0.0.2", replying(200, b'{"ok": true, "result": "stolen"}', seen=second_seen)) as (host, port):  # fmt: skip
        location = location_template.format(host=host, port=port)
        async with server_on("127.0.0.1", replying(307, b"", f"Location: {location}", seen=first_seen)) as (h, p):  # fmt: skip
            yield f"http://{h}:{p}", first_seen, second_seen


# -- 1. redirects are never followed -------------------------------------------------------


async def test_a_307_to_another_origin_is_a_provider_error_and_sends_nothing_there() -> None:
    async with redirect_pair("http://thief:hunter2@{host}:{port}/steal") as (url, first, second):
        plugins = manifest(
            echo_plugin(
                "remote",
                {"provider": "http", "url": url, "headers": {"X-Api-Key": "key-s3cret"}},
                defaults={"timeout_ms": 2000},
            )
        )
        async with Dispatcher(plugins) as dispatcher:
            with pytest.raises(ProviderError) as caught:
                await dispatcher.call("remote", "say", {"text": "hi"})
            health = (await dispatcher.health())[0].health
    assert first, "the hostile server saw the call"
    assert second == [], "the redirect was followed"
    message = str(caught.value)
    assert "307" in message
    assert "/steal" in message  # names the Location …
    assert "hunter2" not in message  # … with its credentials masked
    assert health.status == "not_serving"
    assert "/steal" in health.detail
    assert "hunter2" not in health.detail


async def test_a_redirect_s_signed_query_is_not_repeated_in_messages() -> None:
    """A Location carrying a signature or token in its query (a presigned URL) was printed
    whole in the error and the health report: its keys are shown, never its values."""
    template = "http://{host}:{port}/object?X-Amz-Signature=sig-Zq87secret&part=2#tok-Zq88secret"
    async with redirect_pair(template) as (url, _, _):
        plugins = manifest(
            echo_plugin("remote", {"provider": "http", "url": url}, defaults={"timeout_ms": 2000})
        )
        async with Dispatcher(plugins) as dispatcher:
            with pytest.raises(ProviderError) as caught:
                await dispatcher.call("remote", "say", {"text": "hi"})
            health = (await dispatcher.health())[0].health
    for said in (str(caught.value), health.detail):
        assert "/object?X-Amz-Signature=***&part=***#***" in said
        assert "Zq87secret" not in said and "Zq88secret" not in said


async def test_a_redirect_to_a_url_that_does_not_parse_is_still_a_typed_error() -> None:
    """A Location no URL parser takes (a bad IPv6 literal after credentials) raised a bare
    ValueError out of the message that should have named it."""
    async with redirect_pair("http://u:tok-Zq86secret@[::1/x") as (url, _, second):
        plugins = manifest(
            echo_plugin("remote", {"provider": "http", "url": url}, defaults={"timeout_ms": 2000})
        )
        async with Dispatcher(plugins) as dispatcher:
            with pytest.raises(ProviderError, match="307") as caught:
                await dispatcher.call("remote", "say", {"text": "hi"})
    assert second == []
    assert "Zq86secret" not in str(caught.value)


async def test_knative_never_follows_a_redirect_of_its_ingress() -> None:
    async with redirect_pair("http://{host}:{port}/steal") as (url, first, second):
        target = {"provider": "knative", "service": "echo", "ingress": url, "mode": "envelope"}
        plugins = manifest(echo_plugin("kn", target, defaults={"timeout_ms": 2000}))
        async with Dispatcher(plugins) as dispatcher:
            with pytest.raises(ProviderError, match="/steal"):
                await dispatcher.call("kn", "say", {"text": "hi"})
            health = (await dispatcher.health())[0].health
    assert first
    assert second == []
    assert health.status == "not_serving"
    assert "/steal" in health.detail


# -- 2. ok without result -------------------------------------------------------------------


def test_ok_without_result_is_a_provider_error() -> None:
    with pytest.raises(ProviderError, match="result"):
        decode_response({"ok": True})
    assert decode_response({"ok": True, "result": None}) is None
    outcomes = decode_batch_response({"results": [{"ok": True}, {"ok": True, "result": 1}]}, 2)
    assert isinstance(outcomes[0].error, ProviderError)
    assert outcomes[1].result == 1


async def test_an_http_target_answering_ok_without_result_fails_the_call() -> None:
    async with server_on("127.0.0.1", replying(200, b'{"ok": true}')) as (host, port):
        plugins = manifest(
            echo_plugin("remote", {"provider": "http", "url": f"http://{host}:{port}"})
        )
        async with Dispatcher(plugins) as dispatcher:
            with pytest.raises(ProviderError, match="result"):
                await dispatcher.call("remote", "say", {"text": "hi"})


# -- 3. credentials in the URL --------------------------------------------------------------


def write_manifest(tmp_path: Path, target: str) -> Path:
    path = tmp_path / "plugins.yaml"
    text = f"""version: 1
plugins:
  - id: remote
    version: 1.0.0
    target: {target}
    methods: {{say: {{}}}}
"""
    path.write_text(text)
    return path


def test_url_credentials_with_a_bearer_token_are_refused_at_load(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path, "{provider: http, url: 'http://u:pw@127.0.0.1:9', bearer_token: tok}"
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    problem = caught.value.problems[0]
    assert problem.path == "plugins[0].target"
    assert "bearer_token" in problem.message
    assert "pw" not in str(caught.value).replace("plugins.yaml", "")


def test_an_authorization_header_with_other_credentials_is_refused_at_load(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "{provider: http, url: 'http://127.0.0.1:9', bearer_token: tok, headers: {authorization: x}}",
    )
    with pytest.raises(ManifestError, match="Authorization"):
        load_manifest(path)


@pytest.mark.parametrize(
    "endpoint",
    ["http://svc:pw-Zq81secret@127.0.0.1:5000", "https://pw-Zq81secret@lambda.example:443/"],
    ids=["user_and_password", "user_alone"],
)
def test_a_lambda_endpoint_with_credentials_is_refused_at_load(endpoint: str) -> None:
    """It loaded, and every call failed: aiohttp will not send a URL's credentials beside
    botocore's signature. AWS credentials come from the environment or a profile."""
    target = {"provider": "lambda", "function_name": "f", "endpoint_url": endpoint}
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", target))
    (problem,) = caught.value.problems
    assert problem.path.endswith("target.endpoint_url")
    assert "AWS credentials come from the environment" in problem.message
    assert "Zq81secret" not in str(caught.value)


def test_a_lambda_endpoint_that_is_not_http_is_refused_without_quoting_it() -> None:
    target = {"provider": "lambda", "function_name": "f", "endpoint_url": "ftp://h/Zq81secret"}
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", target))
    (problem,) = caught.value.problems
    assert problem.path.endswith("target.endpoint_url")
    assert "http:// or https://" in problem.message
    assert "Zq81secret" not in str(caught.value)


HTTP_TARGET = {"provider": "http", "url": "http://127.0.0.1:9"}
KNATIVE_TARGET = {"provider": "knative", "service": "echo", "ingress": "http://127.0.0.1:9"}


@pytest.mark.parametrize("base", [HTTP_TARGET, KNATIVE_TARGET], ids=["http", "knative"])
@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"X-Tenant": "s3cret\r\nX-Injected: 1"}, "X-Tenant"),  # header injection
        ({"X-Tenant": "s3cret\n"}, "X-Tenant"),
        ({"X-Tenant": "s3cret\x00"}, "X-Tenant"),
        ({"X-Tenant": "s3crét"}, "X-Tenant"),
        ({"X Tenant": "s3cret"}, "X Tenant"),
        ({"": "s3cret"}, "''"),
    ],
)
def test_a_header_that_http_cannot_carry_is_refused_at_load_naming_it_not_its_value(
    base: dict[str, Any], headers: dict[str, str], named: str
) -> None:
    """aiohttp refused a CR or LF only when writing the request, and reqwest with a bare
    ValueError quoting the value out of ``Dispatcher.call``: the manifest refuses both."""
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", {**base, "headers": headers}))
    (problem,) = caught.value.problems
    assert problem.path.endswith("target.headers")
    assert named in problem.message
    assert "s3cr" not in str(caught.value)


def test_a_bearer_token_that_http_cannot_carry_is_refused_at_load() -> None:
    target = {**HTTP_TARGET, "bearer_token": "s3cret\r\nX-Injected: 1"}
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", target))
    (problem,) = caught.value.problems
    assert problem.path.endswith("target.bearer_token")
    assert "s3cr" not in str(caught.value)


def test_a_websocket_token_that_http_cannot_carry_is_refused_at_load() -> None:
    target = {"provider": "websocket", "url": "ws://127.0.0.1:9/", "token": "s3cret\nX: 1"}
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", target))
    (problem,) = caught.value.problems
    assert problem.path.endswith("target.token")
    assert "s3cr" not in str(caught.value)


@pytest.mark.parametrize(
    ("base", "field"),
    [
        (HTTP_TARGET, "invoke_path"),
        (HTTP_TARGET, "health_path"),
        (KNATIVE_TARGET, "invoke_path"),
        (KNATIVE_TARGET, "readiness_path"),
    ],
)
@pytest.mark.parametrize("path", ["/a\r\nX-Injected: 1", "/a b", "/a#b", "/a\x00", "a"])
def test_a_request_path_that_would_be_sent_changed_is_refused_at_load(
    base: dict[str, Any], field: str, path: str
) -> None:
    """yarl drops control characters and fragments from a path without a word: ``/a\r\nb``
    went out as ``/ab``. The manifest refuses what would not be sent as written."""
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", {**base, field: path}))
    (problem,) = caught.value.problems
    assert problem.path.endswith(f"target.{field}")


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ({"provider": "http", "url": "http://127.0.0.1:9/?a=b"}, "url"),  # went to /?a=b/invoke
        ({"provider": "http", "url": "http://127.0.0.1:9/#part"}, "url"),  # went to /
        ({"provider": "http", "url": "http://127.0.0.1:9/a\nb"}, "url"),  # went to /ab/invoke
        ({"provider": "http", "url": "http://127.0.0.1:9/v\t1"}, "url"),
        ({"provider": "http", "instances": [{"url": "http://127.0.0.1:9/?x"}]}, "url"),
        ({**KNATIVE_TARGET, "ingress": "http://127.0.0.1:9/?a=b"}, "ingress"),
        (
            {"provider": "knative", "service": "e", "instances": [{"url": "http://h:9/#a"}]},
            "url",
        ),
        (
            {"provider": "lambda", "function_name": "f", "endpoint_url": "http://h:9/\nx"},
            "endpoint_url",
        ),
        ({"provider": "websocket", "url": "ws://127.0.0.1:9/a\x01b"}, "url"),  # went to /ab
    ],
)
def test_a_base_url_that_would_be_sent_changed_is_refused_at_load(
    target: dict[str, Any], field: str
) -> None:
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", target))
    (problem,) = caught.value.problems
    assert problem.path.endswith(field)


def test_headers_with_spaces_tabs_and_punctuation_load() -> None:
    headers = {"X-Trace_Tag.v2": 'a b\tc; q=0.5, "quoted" ~!#$%&\'*+-.^_`|'}
    for base in (HTTP_TARGET, KNATIVE_TARGET):
        manifest(echo_plugin("p", {**base, "headers": headers}))


async def test_reqwest_refuses_an_unsendable_header_as_a_provider_error_and_keeps_its_slot() -> (
    None
):
    """A host that builds the client itself, past the manifest's check: the seam's error,
    the value not quoted, and the pool's one slot free again for the next call."""
    from providers._http_client import HttpPool
    from providers._reqwest import ReqwestClient
    from providers.egress import EgressPolicy

    ok = b'{"ok": true, "result": "fine"}'
    async with server_on("127.0.0.1", replying(200, ok)) as (host, port):
        url = f"http://{host}:{port}"
        target = HttpTarget.model_validate({"provider": "http", "url": url})
        pool = HttpPool(max_connections=1)
        async with ReqwestClient(pool, egress=EgressPolicy()) as client:
            for _ in range(3):
                with pytest.raises(ProviderError) as caught:
                    await client.post(
                        url + "/invoke",
                        b"{}",
                        {"X-Tenant": "s3cret\nX-Injected: 1"},
                        timeout=2,
                        limit=1 << 20,
                        target=target,
                        tls=None,
                    )
                assert "s3cr" not in caught.value.message
            reply = await client.post(
                url + "/invoke", b"{}", {}, timeout=2, limit=1 << 20, target=target, tls=None
            )
    assert reply.status == 200


async def test_url_credentials_alone_are_sent_as_basic_auth() -> None:
    seen: list[bytes] = []
    body = b'{"ok": true, "result": "fine"}'
    async with server_on("127.0.0.1", replying(200, body, seen=seen)) as (host, port):
        url = f"http://al%40ice:p%3Ass@{host}:{port}"
        plugins = manifest(echo_plugin("remote", {"provider": "http", "url": url}))
        async with Dispatcher(plugins) as dispatcher:
            assert await dispatcher.call("remote", "say", {"text": "hi"}) == "fine"
    expected = base64.b64encode(b"al@ice:p:ss")
    assert b"Authorization: Basic " + expected in seen[0]


# -- 4. secrets never printed ---------------------------------------------------------------

SECRETS = {
    "LK_URL_PASSWORD": "pw-Zq81secret",
    "LK_HEADER_KEY": "hdr-Zq82secret",
    "LK_TOKEN": "tok-Zq83secret",
    "LK_METADATA": "meta-Zq84secret",
    "LK_ENV_VALUE": "env-Zq85secret",
}


def secret_manifest(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "secrets.yaml"
    path.write_text(
        f"""version: 1
plugins:
  - id: remote
    version: 1.0.0
    target:
      provider: http
      url: "http://svc:${{LK_URL_PASSWORD}}@127.0.0.1:{port}"
      headers: {{X-Api-Key: "${{LK_HEADER_KEY}}"}}
    methods: {{say: {{}}}}
  - id: rpc
    version: 1.0.0
    target:
      provider: grpc
      address: "127.0.0.1:{port}"
      metadata: {{authorization: "Bearer ${{LK_METADATA}}"}}
    methods: {{say: {{}}}}
  - id: kn
    version: 1.0.0
    target:
      provider: knative
      service: echo
      ingress: "http://svc:${{LK_URL_PASSWORD}}@127.0.0.1:{port}"
      mode: envelope
    defaults: {{timeout_ms: 1000}}
    methods: {{say: {{}}}}
"""
    )
    return path


def run_cli(manifest_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dispatcher"), "-m", str(manifest_path), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **SECRETS},
        check=False,
        timeout=60,
    )


def assert_no_secret(*outputs: str) -> None:
    for output in outputs:
        for secret in SECRETS.values():
            assert secret not in output, output


@pytest.mark.parametrize("status", [None, 502, 401, 307])
async def test_the_cli_never_prints_a_secret(tmp_path: Path, status: int | None) -> None:
    handler = replying(status or 500, b"", "Location: http://x:y@127.0.0.2:1/") if status else None
    if handler is None:  # nothing listens: connection refused
        async with server_on("127.0.0.1", replying(500)) as (_, port):
            pass
        path = secret_manifest(tmp_path, port)
        outputs = [run_cli(path, *args) for args in (["list"], ["health"], ["call", "remote.say"], ["call", "kn.say"])]  # fmt: skip
    else:
        async with server_on("127.0.0.1", handler) as (_, port):
            path = secret_manifest(tmp_path, port)
            outputs = await asyncio.gather(
                *(
                    asyncio.to_thread(run_cli, path, *args)
                    for args in (["list"], ["health"], ["call", "remote.say"], ["call", "kn.say"])
                )
            )
    listed = outputs[0]
    assert listed.returncode == 0, listed.stderr
    assert "http://svc:***@127.0.0.1" in listed.stdout
    assert outputs[2].returncode == 1
    assert "Traceback" not in outputs[2].stderr
    assert_no_secret(*(o.stdout + o.stderr for o in outputs))


def test_a_bad_value_from_the_environment_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        """version: 1
plugins:
  - id: remote
    version: 1.0.0
    target: {provider: http, url: "http://127.0.0.1:9", max_response_bytes: "${LK_ENV_VALUE}"}
    methods: {say: {}}
  - id: other
    version: 1.0.0
    target: {provider: http, url: "${LK_TOKEN}"}
    methods: {say: {}}
"""
    )
    validated = run_cli(path, "validate")
    assert validated.returncode == 2
    assert "max_response_bytes" in validated.stderr
    assert "plugins[1].target.url" in validated.stderr
    assert_no_secret(validated.stdout, validated.stderr)


def test_repr_and_str_of_targets_mask_every_secret() -> None:
    targets: list[Any] = [
        HttpTarget(
            provider="http",
            url="http://svc:pw-Zq81secret@127.0.0.1:9",  # type: ignore[arg-type]
            headers={"X-Api-Key": "hdr-Zq82secret"},
        ),
        HttpTarget(provider="http", url="http://127.0.0.1:9", bearer_token="tok-Zq83secret"),  # type: ignore[arg-type]
        GrpcTarget(
            provider="grpc", address="127.0.0.1:9", metadata={"authorization": "meta-Zq84secret"}
        ),
        KnativeTarget(
            provider="knative",
            service="echo",
            ingress="http://svc:pw-Zq81secret@127.0.0.1:9",  # type: ignore[arg-type]
            headers={"X-Api-Key": "hdr-Zq82secret"},
            deploy={"image": "echo:1", "env": {"API_KEY": "env-Zq85secret"}},  # type: ignore[arg-type]
        ),
    ]
    targets += [
        DockerTarget(provider="docker", image="echo:1", env={"API_KEY": "env-Zq85secret"}),
        SubprocessTarget(provider="subprocess", command=["p"], env={"KEY": "env-Zq85secret"}),
    ]
    for target in targets:
        assert_no_secret(repr(target), str(target), target.describe(), f"{target!r:}")
    assert "X-Api-Key" in repr(targets[0])  # which headers there are still shows


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ws://h:9/ws?token=tok-Zq86secret", "ws://h:9/ws?token=***"),
        ("ws://h:9/ws?a=tok-Zq86secret&a=2&b=", "ws://h:9/ws?a=***&a=***&b=***"),
        ("ws://h:9/ws?tok-Zq86secret", "ws://h:9/ws?***"),
        ("https://h/cb#access_token=tok-Zq86secret", "https://h/cb#***"),
        ("https://u:tok-Zq86secret@h/p?x=tok-Zq86secret", "https://u:***@h/p?x=***"),
        ("http://h:9/plain", "http://h:9/plain"),
        ("http://u:tok-Zq86secret@[::1/x", "(a URL that does not parse)"),
    ],
    ids=[
        "token",
        "repeated_and_empty",
        "bare",
        "fragment",
        "userinfo_and_query",
        "plain",
        "broken",
    ],
)
def test_masked_url_hides_query_values_and_fragments(url: str, shown: str) -> None:
    """A token in a URL's query (``?token=…``, a presigned signature) or fragment is as much
    a secret as a password: names stay readable, values do not."""
    assert masked_url(url) == shown


def test_a_websocket_target_s_token_in_its_query_never_shows() -> None:
    target = WebSocketTarget(provider="websocket", url="ws://127.0.0.1:9/ws?token=tok-Zq86secret")  # type: ignore[arg-type]
    for said in (repr(target), str(target), target.describe()):
        assert "Zq86secret" not in said, said
    assert "?token=***" in target.describe()


@pytest.mark.parametrize(
    "userinfo",
    ["svc:pw-Zq81secret", "pw-Zq81secret"],  # a token as the user alone is a credential too
    ids=["user_and_password", "user_alone"],
)
async def test_error_messages_of_failed_calls_mask_url_passwords(userinfo: str) -> None:
    async with server_on("127.0.0.1", replying(500)) as (host, port):
        pass  # closed: connection refused from now on
    url = f"http://{userinfo}@{host}:{port}"
    for target in (
        {"provider": "http", "url": url},
        {"provider": "knative", "service": "echo", "ingress": url, "mode": "envelope"},
    ):
        plugins = manifest(echo_plugin("remote", target, defaults={"timeout_ms": 300}))
        async with Dispatcher(plugins) as dispatcher:
            with pytest.raises(DispatchError) as caught:
                await dispatcher.call("remote", "say", {"text": "hi"})
            health = await dispatcher.health()
        assert_no_secret(
            str(caught.value), repr(caught.value), orjson.dumps(caught.value.to_wire()).decode()
        )
        assert_no_secret(*(report.target + report.health.detail for report in health))


@pytest.mark.parametrize(
    "target",
    [
        {"provider": "http", "url": "http://" + "a" * 64 + ":9/"},
        {"provider": "http", "url": "http://a..b:9/"},
        {"provider": "grpc", "address": "a..b:9"},
        {"provider": "websocket", "url": "ws://" + "a" * 64 + ":9/"},
        {"provider": "lambda", "function_name": "f", "endpoint_url": "http://" + "a" * 64},
    ],
    ids=["http_long_label", "http_empty_label", "grpc", "websocket", "lambda"],
)
def test_a_host_no_resolver_takes_is_refused_at_load(target: dict[str, Any]) -> None:
    """A label over 63 characters, or an empty one, made the IDNA codec raise a bare
    UnicodeError when the name was resolved: out of a call, out of start, or (websocket)
    ending the dialler's task without a word."""
    with pytest.raises(ManifestError, match="no host name"):
        manifest(echo_plugin("p", target))


@pytest.mark.parametrize("port", ["99999", "65536", "0", "abc", "+80", "\u0668\u0660", "1" * 5000])
@pytest.mark.parametrize(
    ("target", "field"),
    [
        ({"provider": "websocket", "url": "ws://svc:s3cret@127.0.0.1:PORT/"}, "url"),
        ({"provider": "websocket", "url": "wss://[::1]:PORT/plugin?v=1"}, "url"),
        ({"provider": "http", "url": "http://svc:s3cret@127.0.0.1:PORT"}, "url"),
        ({"provider": "http", "instances": [{"url": "http://127.0.0.1:PORT/"}]}, "url"),
        ({**KNATIVE_TARGET, "ingress": "http://svc:s3cret@127.0.0.1:PORT"}, "ingress"),
        (
            {"provider": "lambda", "function_name": "f", "endpoint_url": "http://h:PORT"},
            "endpoint_url",
        ),
    ],
    ids=["websocket", "websocket_ipv6", "http", "http_fleet", "knative", "lambda"],
)
def test_a_url_port_outside_1_to_65535_is_refused_at_load_naming_the_field(
    target: dict[str, Any], field: str, port: str
) -> None:
    """A websocket URL past 65535 loaded and every call then said it was not connected;
    a Lambda endpoint's failed with a bare ValueError; pydantic refused an http URL's
    quoting the URL, its password too. The port is checked before any of them."""
    written = orjson.loads(orjson.dumps(target).replace(b"PORT", port.encode()))
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", written))
    (problem,) = caught.value.problems
    assert problem.path.endswith(f".{field}")
    assert "between 1 and 65535" in problem.message
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["ws://127.0.0.1:1/", "ws://127.0.0.1:65535/", "wss://[::1]:08090/a?b", "ws://h:/"]
)
def test_websocket_urls_with_ports_in_range_load(url: str) -> None:
    manifest(echo_plugin("p", {"provider": "websocket", "url": url}))


UNPARSED_URLS = [
    "http://user:s3cret@/",
    "http://user:s3cret@host:notaport/",
    "ftp://user:s3cret@h/",
]


@pytest.mark.parametrize("url", UNPARSED_URLS, ids=["empty_host", "bad_port", "scheme"])
def test_a_url_pydantic_refuses_is_never_quoted_with_its_password(tmp_path: Path, url: str) -> None:
    """pydantic refused these quoting the input whole, so the error, and `dispatcher
    validate`, printed the password. Each problem still names its field."""
    path = tmp_path / "plugins.yaml"
    written = orjson.dumps(url).decode()
    path.write_text(
        f"""version: 1
registry: {{etcd: {written}, prefix: /linchkit}}
plugins:
  - id: a
    version: 1.0.0
    target: {{provider: http, url: {written}}}
    methods: {{say: {{}}}}
  - id: b
    version: 1.0.0
    target: {{provider: knative, service: echo, ingress: {written}}}
    methods: {{say: {{}}}}
  - id: c
    version: 1.0.0
    target:
      provider: http
      instances: [{{url: {written}}}, {{registry: {{etcd: {written}, prefix: /p}}}}]
    methods: {{say: {{}}}}
  - id: d
    version: 1.0.0
    target: {written}
    methods: {{say: {{}}}}
"""
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    paths = {problem.path for problem in caught.value.problems}
    assert {
        "registry.etcd",
        "plugins[0].target.url",
        "plugins[1].target.ingress",
        "plugins[3].target",
    } <= paths, paths
    assert any(p.startswith("plugins[2].target.instances[0]") for p in paths), paths
    assert any(p.startswith("plugins[2].target.instances[1]") for p in paths), paths
    assert "s3cret" not in str(caught.value)
    validated = run_cli(path, "validate")
    assert validated.returncode == 2
    assert "plugins[1].target.ingress" in validated.stderr
    assert "s3cret" not in validated.stdout + validated.stderr


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ({**HTTP_TARGET, "bearer_token": 8_123_456_789}, "target.bearer_token"),
        ({**HTTP_TARGET, "headers": {"X-Api-Key": 8_123_456_789}}, "target.headers.X-Api-Key"),
        ({**HTTP_TARGET, "headers": ["X-Api-Key: 8123456789"]}, "target.headers"),
        ({"provider": "grpc", "address": "h:1", "metadata": {"k": 8_123_456_789}}, "metadata.k"),
        ({"provider": "websocket", "url": "ws://h:1/", "token": 8_123_456_789}, "target.token"),
        (
            {**KNATIVE_TARGET, "deploy": {"image": "echo:1", "env": {"KEY": 8_123_456_789}}},
            "deploy.env.KEY",
        ),
        ({"provider": "docker", "image": "echo:1", "env": {"KEY": 8_123_456_789}}, "env.KEY"),
        ({"provider": "subprocess", "command": ["p"], "env": {"KEY": 8_123_456_789}}, "env.KEY"),
    ],
    ids=[
        "bearer_token",
        "header",
        "headers_as_list",
        "grpc_metadata",
        "ws_token",
        "deploy_env",
        "docker_env",
        "subprocess_env",
    ],
)
def test_a_secret_of_the_wrong_type_is_not_quoted(target: dict[str, Any], field: str) -> None:
    """A token YAML reads as a number (``token: 8123456789``) was quoted by the error that
    it is not a string; so was a list of headers written as ``Name: value`` lines."""
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", target))
    (problem,) = caught.value.problems
    assert problem.path.endswith(field)
    assert "8123456789" not in str(caught.value).replace(",", "").replace("_", "")


def test_the_jobs_callback_secret_of_the_wrong_type_is_not_quoted() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest({"version": 1, "jobs": {"callback_secret": 81234567891234567}})
    (problem,) = caught.value.problems
    assert problem.path == "jobs.callback_secret"
    assert "81234567891234567" not in str(caught.value)


def test_values_that_are_not_secrets_are_still_quoted() -> None:
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", {**HTTP_TARGET, "max_response_bytes": "lots"}))
    assert "(got 'lots')" in str(caught.value)
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", {"provider": "http", "url": "ftp://h/"}))
    assert "(got 'ftp://h/')" in str(caught.value)


@pytest.mark.parametrize(
    ("section", "where", "message"),
    [
        (
            {"registry": {"etcd": "http://127.0.0.1:2379/?s3cret=1", "prefix": "/lk"}},
            "registry.etcd",
            "no query",  # the client appends /v3/kv/range to it
        ),
        (
            {"registry": {"etcd": "http://127.0.0.1:2379/s3cret\n", "prefix": "/lk"}},
            "registry.etcd",
            "line breaks",
        ),
        (
            {"telemetry": {"tracing": {"otlp_endpoint": "http://u:s3cret@h:99999/v1/traces"}}},
            "telemetry.tracing.otlp_endpoint",
            "between 1 and 65535",
        ),
        (
            {"telemetry": {"tracing": {"otlp_endpoint": "ftp://u:s3cret@collector/v1/traces"}}},
            "telemetry.tracing.otlp_endpoint",  # quoted whole, password included
            "http:// or https://",
        ),
        (
            {"telemetry": {"tracing": {"otlp_endpoint": "http://collector/v1/tr\naces#s3cret"}}},
            "telemetry.tracing.otlp_endpoint",
            "line breaks",
        ),
        (
            {"telemetry": {"tracing": {"headers": {"Authorization": "Bearer s3cret\r\nX: 1"}}}},
            "telemetry.tracing.headers",
            "Authorization",
        ),
        (
            {"auth": {"jwt": {"jwks": "https://u:s3cret@issuer.example:99999/jwks"}}},
            "auth.jwt.jwks",
            "between 1 and 65535",
        ),
        (
            {"auth": {"jwt": {"jwks": "https://issuer.example/s3cret\t/jwks"}}},
            "auth.jwt.jwks",
            "tabs",
        ),
        (
            {"state": {"backend": "redis", "url": "redis://:s3cret@127.0.0.1:99999/0"}},
            "state.url",
            "between 1 and 65535",
        ),
        (
            {"state": {"backend": "redis", "url": "redis://:s3cret@127.0.0.1:6379/0\n"}},
            "state.url",
            "line breaks",
        ),
        (
            {"state": {"backend": "redis", "url": "http://:s3cret@127.0.0.1:6379/0"}},
            "state.url",
            "redis://",
        ),
    ],
)
def test_the_dispatchers_own_urls_are_checked_at_load_without_quoting_them(
    section: dict[str, Any], where: str, message: str
) -> None:
    """They loaded: etcd's URL kept a query its client's paths were appended to, urlsplit
    and yarl dropped a line break or tab from a JWKS or etcd URL without a word, a port past
    65535 failed only when dialled, a header of the OTLP exporter could inject another,
    and an OTLP endpoint that was not http was refused by quoting it, password and all."""
    with pytest.raises(ManifestError) as caught:
        parse_manifest({"version": 1, **section})
    (problem,) = caught.value.problems
    assert problem.path == where
    assert message in problem.message
    assert "s3cret" not in str(caught.value)


def test_an_etcd_discovery_url_is_a_base_url() -> None:
    registry = {"etcd": "http://127.0.0.1:2379/\tv3", "prefix": "/lk"}
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", {"provider": "http", "instances": [{"registry": registry}]}))
    (problem,) = caught.value.problems
    assert problem.path.endswith(".etcd")
    assert "tabs" in problem.message


def test_the_dispatchers_own_urls_as_written_in_the_docs_load() -> None:
    parse_manifest(
        {
            "version": 1,
            "registry": {"etcd": "http://127.0.0.1:2379", "prefix": "/linchkit/plugins"},
            "telemetry": {
                "tracing": {
                    "otlp_endpoint": "https://u:pw@collector:4318/v1/traces?tenant=a",
                    "headers": {"Authorization": "Bearer abc"},
                }
            },
            "auth": {"jwt": {"jwks": "https://issuer.example/.well-known/jwks.json?v=2"}},
            "state": {"backend": "redis", "url": "rediss://:pw@redis.example:6380/1"},
        }
    )


def test_a_request_whose_body_could_not_be_written_is_known_not_run() -> None:
    """aiohttp raises this ``ClientOSError`` only when writing the body failed, before its
    end went out (a SIGKILLed instance closing the pooled connection as a call was being
    sent): the plugin cannot have run it, so a fleet may send it elsewhere. A reset after
    the request went out stays "may have run"."""
    unsent = aiohttp.ClientOSError(errno.EPIPE, "Can not write request body for http://h/x")
    error = in_flight_error(unsent, "http http://h/invoke")
    assert error.details == {"stage": "connect"}
    assert "could not be sent whole (Broken pipe): not run" in str(error)
    reset = aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer")
    assert in_flight_error(reset, "http http://h/invoke").details == {}
