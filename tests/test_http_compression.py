"""Compressed envelopes over HTTP, both ways: negotiation, decoding, and hostile peers.

The dispatcher's side runs through both clients of the seam (aiohttp and reqwest) against
the real Python SDK server (uvicorn) or a raw TCP server on loopback that says exactly
what a test needs, including lies. The SDK's side is posted to directly with aiohttp.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import grpc.aio
import orjson
import pytest
import zstandard

from dispatcher import Dispatcher, ProviderError
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from linchkit_plugin.asgi import PluginApp
from linchkit_plugin.encodings import UndecodableBody, accepted, decode, encode
from linchkit_plugin.host import PluginHost
from linchkit_plugin.limits import ServerLimits
from linchkit_plugin.wire import PROTOCOL_VERSION
from providers._compression import DEFAULT_MIN_BYTES, is_loopback
from tests.conftest import echo_plugin, manifest, serve_asgi
from tests.test_http_hardening import Handler, read_head, server_on

CLIENTS = pytest.mark.parametrize("client", ["reqwest", "aiohttp"])
LARGE = "x" * 200_000  # well over the default min_bytes once in an envelope
#: What a target across a network gets by default (every server here is on loopback,
#: where the default is off).
NETWORK = {"min_bytes": DEFAULT_MIN_BYTES}


def gzip_bytes(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


def bomb(size: int) -> bytes:
    """A small gzip body that expands to ``size`` zero bytes."""
    return gzip_bytes(b"\0" * size)


# -- the codec ------------------------------------------------------------------------------


def test_accept_encoding_is_read_with_its_q_values() -> None:
    assert accepted("gzip, zstd") == ("zstd", "gzip")
    assert accepted("gzip;q=0, zstd") == ("zstd",)
    assert accepted("br") == ()
    assert accepted("*") == ("zstd", "gzip")
    assert accepted("*, zstd;q=0") == ("gzip",)
    assert accepted(None) == ()
    assert accepted(";;,q=,gzip;q=abc") == ()  # malformed parts admit nothing


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_every_coding_round_trips_and_refuses_what_it_must(coding: str) -> None:
    data = orjson.dumps({"text": LARGE})
    packed = encode(data, coding)
    assert len(packed) < len(data) // 10
    assert decode(packed, coding, len(data)) == data
    with pytest.raises(UndecodableBody) as too_large:
        decode(packed, coding, len(data) - 1)
    assert too_large.value.kind == "too_large"
    with pytest.raises(UndecodableBody) as cut:
        decode(packed[: len(packed) // 2], coding, len(data))
    assert cut.value.kind == "corrupt"
    with pytest.raises(UndecodableBody) as lying:
        decode(data, coding, len(data))  # plain bytes under a coding's name
    assert lying.value.kind == "corrupt"
    with pytest.raises(UndecodableBody) as unknown:
        decode(packed, "br", len(data))
    assert unknown.value.kind == "unknown"


def test_a_zstd_frame_without_its_size_is_still_capped() -> None:
    packer = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    streamed = packer.compress(b"\0" * 5_000_000) + packer.flush()
    with pytest.raises(UndecodableBody) as caught:
        decode(streamed, "zstd", 1_000_000)
    assert caught.value.kind == "too_large"
    assert len(decode(streamed, "zstd", 5_000_000)) == 5_000_000


def test_loopback_is_told_from_the_network() -> None:
    for host in ("127.0.0.1", "127.5.0.9", "::1", "[::1]", "localhost", "api.localhost"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "example.com", "192.168.1.1", "", "localhost.example.com"):
        assert not is_loopback(host), host


# -- the dispatcher against the Python SDK's server ---------------------------------------


class Recorder:
    """ASGI middleware noting the codings of each request and answer of /invoke."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[str | None] = []
        self.answers: list[str | None] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        self.requests.append(_text(headers.get(b"content-encoding")))

        async def noting(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.answers.append(_text(dict(message["headers"]).get(b"content-encoding")))
            await send(message)

        await self.app(scope, receive, noting)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


@pytest.fixture
async def recorded() -> AsyncIterator[tuple[str, Recorder]]:
    from echo_plugin import EchoPlugin

    recorder = Recorder(PluginApp(PluginHost(EchoPlugin()), config={"greeting": "hi"}))
    async for url in serve_asgi(recorder):
        yield url, recorder


@CLIENTS
async def test_large_envelopes_are_compressed_once_the_plugin_says_it_accepts_them(
    recorded: tuple[str, Recorder], client: str
) -> None:
    url, recorder = recorded
    target = {"provider": "http", "url": url, "client": client, "compression": NETWORK}
    async with Dispatcher(manifest(echo_plugin("remote", target))) as dispatcher:
        for _ in range(3):
            result = await dispatcher.call("remote", "say", {"text": LARGE})
            assert result["text"] == LARGE
        small = await dispatcher.call("remote", "say", {"text": "small"})
    assert small["text"] == "small"
    # The first request goes plain (the plugin has not said what it accepts yet); the
    # answers are compressed from the first, since every request says Accept-Encoding.
    assert recorder.requests == [None, "zstd", "zstd", None]
    assert recorder.answers == ["zstd", "zstd", "zstd", None]


async def test_a_manifest_flag_vouches_for_the_peer_and_gzip_can_be_the_only_choice(
    recorded: tuple[str, Recorder],
) -> None:
    url, recorder = recorded
    compression = {"algorithms": ["gzip"], "peer_accepts": ["gzip"], "min_bytes": 1000}
    target = {"provider": "http", "url": url, "compression": compression}
    async with Dispatcher(manifest(echo_plugin("remote", target))) as dispatcher:
        await dispatcher.call("remote", "say", {"text": LARGE})
    assert recorder.requests == ["gzip"]
    assert recorder.answers == ["gzip"]


@pytest.mark.parametrize(
    "compression", [{"algorithms": []}, {}], ids=["off", "default-to-loopback"]
)
async def test_compression_off_sends_no_accept_encoding(
    recorded: tuple[str, Recorder], compression: dict[str, Any]
) -> None:
    url, recorder = recorded
    target = {"provider": "http", "url": url, "compression": compression}
    async with Dispatcher(manifest(echo_plugin("remote", target))) as dispatcher:
        for _ in range(2):
            await dispatcher.call("remote", "say", {"text": LARGE})
    # Off, or unset with a peer on a loopback address: compressing never paid there.
    assert recorder.requests == [None, None]
    assert recorder.answers == [None, None]


# -- hostile plugins (raw servers) ---------------------------------------------------------


def answering(body: bytes, *headers: str, seen: list[bytes] | None = None) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_head(reader)
            if seen is not None:
                seen.append(head)
            extra = "".join(f"{header}\r\n" for header in headers)
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n".encode()
                + body
            )
            await writer.drain()

    return handle


OK = orjson.dumps({"ok": True, "result": "fine"})
HOSTILE_ANSWERS = {
    "gzip bomb": (bomb(50_000_000), "gzip", "too_large"),
    "zstd bomb": (zstandard.ZstdCompressor().compress(b"\0" * 50_000_000), "zstd", "too_large"),
    "lying coding": (OK, "gzip", "corrupt"),
    "truncated": (gzip_bytes(OK)[:-6], "gzip", "corrupt"),
}


@CLIENTS
@pytest.mark.parametrize("case", list(HOSTILE_ANSWERS))
async def test_an_answer_that_cannot_be_decoded_is_a_provider_error(client: str, case: str) -> None:
    body, coding, reason = HOSTILE_ANSWERS[case]
    handler = answering(body, f"Content-Encoding: {coding}")
    async with server_on("127.0.0.1", handler) as (host, port):
        target = {
            "provider": "http",
            "url": f"http://{host}:{port}",
            "client": client,
            "max_response_bytes": 1_000_000,
            "compression": NETWORK,
        }
        async with Dispatcher(manifest(echo_plugin("remote", target))) as dispatcher:
            with pytest.raises(ProviderError, match="cannot be decoded") as caught:
                await dispatcher.call("remote", "say", {"text": "hi"})
    assert caught.value.details["reason"] == reason


@CLIENTS
async def test_an_answer_in_a_coding_never_offered_is_refused(client: str) -> None:
    handler = answering(OK, "Content-Encoding: br")
    async with server_on("127.0.0.1", handler) as (host, port):
        target = {
            "provider": "http",
            "url": f"http://{host}:{port}",
            "client": client,
            "compression": NETWORK,
        }
        async with Dispatcher(manifest(echo_plugin("remote", target))) as dispatcher:
            with pytest.raises(ProviderError, match="'br', which this target did not offer"):
                await dispatcher.call("remote", "say", {"text": "hi"})


async def test_a_peer_that_never_said_it_accepts_a_coding_gets_plain_bytes() -> None:
    seen: list[bytes] = []
    async with server_on("127.0.0.1", answering(OK, seen=seen)) as (host, port):
        target = {"provider": "http", "url": f"http://{host}:{port}", "compression": NETWORK}
        async with Dispatcher(manifest(echo_plugin("remote", target))) as dispatcher:
            for _ in range(3):
                await dispatcher.call("remote", "say", {"text": LARGE})
    assert len(seen) == 3
    assert all(b"content-encoding" not in head.lower() for head in seen)
    assert all(b"accept-encoding: zstd, gzip" in head.lower() for head in seen)


async def test_a_415_to_a_compressed_body_is_resent_plain_and_remembered() -> None:
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_head(reader)
            heads.append(head)
            compressed = b"content-encoding" in head.lower()
            status, body = (415, b"") if compressed else (200, OK)
            # Says it accepts gzip, then refuses it: a plugin redeployed without it.
            writer.write(
                f"HTTP/1.1 {status} X\r\nAccept-Encoding: gzip\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()

    async with server_on("127.0.0.1", handle) as (host, port):
        target = {"provider": "http", "url": f"http://{host}:{port}", "compression": NETWORK}
        async with Dispatcher(manifest(echo_plugin("remote", target))) as dispatcher:
            for _ in range(2):
                assert await dispatcher.call("remote", "say", {"text": LARGE}) == "fine"
    encoded = [b"content-encoding: gzip" in head.lower() for head in heads]
    # plain (nothing known), gzip (learned) → 415 → plain; then the header is learned
    # again from the plain answer and gzip tried once more: never a failed call.
    assert encoded[:3] == [False, True, False]


# -- hostile dispatchers: the SDK's server ------------------------------------------------


@pytest.fixture
async def plugin_url() -> AsyncIterator[str]:
    from echo_plugin import EchoPlugin

    limits = ServerLimits(max_body_bytes=1_000_000)
    app = PluginApp(PluginHost(EchoPlugin()), config={"greeting": "hi"}, limits=limits)
    async for url in serve_asgi(app):
        yield url


async def post(url: str, body: bytes, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(
            auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
        ) as session,
        session.post(
            url + "/invoke",
            data=body,
            headers={"Content-Type": "application/json", **headers},
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def envelope(text: str) -> bytes:
    return orjson.dumps({"v": PROTOCOL_VERSION, "method": "say", "params": {"text": text}})


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
async def test_the_sdk_server_takes_compressed_bodies_and_answers_compressed(
    plugin_url: str, coding: str
) -> None:
    status, headers, body = await post(
        plugin_url,
        encode(envelope(LARGE), coding),
        **{"Content-Encoding": coding, "Accept-Encoding": coding},
    )
    assert status == 200
    assert headers["Content-Encoding"] == coding
    assert headers["Accept-Encoding"] == "zstd, gzip"
    assert orjson.loads(decode(body, coding, 10_000_000))["result"]["text"] == LARGE


async def test_the_sdk_server_answers_small_and_unaccepting_callers_plain(plugin_url: str) -> None:
    _, small, _ = await post(plugin_url, envelope("hi"), **{"Accept-Encoding": "gzip"})
    _, unaccepting, _ = await post(plugin_url, envelope(LARGE))
    assert "Content-Encoding" not in small
    assert "Content-Encoding" not in unaccepting


HOSTILE_BODIES = {
    "gzip bomb": (bomb(50_000_000), "gzip", 413),
    "zstd bomb": (zstandard.ZstdCompressor().compress(b"\0" * 50_000_000), "zstd", 413),
    "lying coding": (envelope("hi"), "gzip", 400),
    "truncated": (gzip_bytes(envelope("hi"))[:-6], "gzip", 400),
    "unknown coding": (envelope("hi"), "br", 415),
}


@pytest.mark.parametrize("case", list(HOSTILE_BODIES))
async def test_the_sdk_server_refuses_bodies_it_cannot_decode(plugin_url: str, case: str) -> None:
    body, coding, expected = HOSTILE_BODIES[case]
    status, headers, answer = await post(plugin_url, body, **{"Content-Encoding": coding})
    assert status == expected
    assert orjson.loads(answer)["ok"] is False
    assert headers["Accept-Encoding"] == "zstd, gzip"  # what it does take (RFC 7694)


# -- gRPC: its own gzip ------------------------------------------------------------------


def test_grpc_compresses_across_a_network_only_unless_told() -> None:
    from providers._grpc.target import GrpcCompression

    default = GrpcCompression()
    assert default.threshold("10.1.2.3:50051") == DEFAULT_MIN_BYTES
    assert default.threshold("plugin.example:50051") == DEFAULT_MIN_BYTES
    for address in ("127.0.0.1:50051", "localhost:1", "[::1]:9", "unix:/run/plugin.sock"):
        assert default.threshold(address) is None, address
    assert GrpcCompression(min_bytes=0).threshold("127.0.0.1:1") == 0
    assert GrpcCompression(algorithms=[], min_bytes=0).threshold("10.0.0.1:1") is None


async def test_knative_targets_negotiate_the_same_way(recorded: tuple[str, Recorder]) -> None:
    url, recorder = recorded
    target = {
        "provider": "knative",
        "service": "echo",
        "ingress": url,
        "mode": "envelope",
        "compression": NETWORK,
    }
    async with Dispatcher(manifest(echo_plugin("kn", target))) as dispatcher:
        for _ in range(2):
            assert (await dispatcher.call("kn", "say", {"text": LARGE}))["text"] == LARGE
    assert recorder.requests == [None, "zstd"]
    assert recorder.answers == ["zstd", "zstd"]


class _BombingPlugin(plugin_pb2_grpc.PluginServiceServicer):  # type: ignore[misc]
    """A PluginService that answers every Call with 70 MB of zeros in gRPC's gzip (~70 KB
    on the wire): past the dispatcher's 64 MiB cap on a received message."""

    async def Call(self, request: Any, context: Any) -> Any:
        context.set_compression(grpc.Compression.Gzip)
        return plugin_pb2.CallReply(ok=True, result_json=b"0" * 70_000_000)


async def test_a_grpc_answer_that_expands_past_the_cap_is_a_provider_error() -> None:
    server = grpc.aio.server()
    plugin_pb2_grpc.add_PluginServiceServicer_to_server(_BombingPlugin(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        target = {"provider": "grpc", "address": f"127.0.0.1:{port}", "events": False}
        async with Dispatcher(manifest(echo_plugin("rpc", target))) as dispatcher:
            with pytest.raises(ProviderError, match="larger than") as caught:
                await dispatcher.call("rpc", "say", {"text": "hi"})
    finally:
        await server.stop(grace=None)
    assert caught.value.retryable is False  # not a rate limit: resending gets the same bomb


@pytest.mark.parametrize(
    "compression",
    [{"algorithms": ["br"]}, {"min_bytes": -1}, {"peer_accepts": ["deflate"]}, {"level": 9}],
    ids=["unknown-coding", "negative-threshold", "unknown-vouched", "unknown-key"],
)
def test_a_bad_compression_block_is_refused_when_the_manifest_loads(
    compression: dict[str, Any],
) -> None:
    from dispatcher.config import ManifestError

    target = {"provider": "http", "url": "http://10.0.0.1:8080", "compression": compression}
    with pytest.raises(ManifestError, match="compression"):
        manifest(echo_plugin("remote", target))
