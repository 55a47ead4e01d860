"""The gateway's HTTP routes against a real server on 127.0.0.1 port 0 and real clients:
calls, the status table, bad input, slow clients, draining, authentication."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import zstandard

from dispatcher import Dispatcher
from dispatcher.config import parse_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from tests.conftest import ROOT, manifest
from tests.gateway_support import (
    SAY_SCHEMA,
    SECRET_TOKEN,
    OneToken,
    echo_entry,
    raw_connection,
    read_answer,
    running_gateway,
)

JSON = {"Content-Type": "application/json"}


async def post(
    session: aiohttp.ClientSession, url: str, body: Any = None, **headers: str
) -> tuple[int, dict[str, Any], Any]:
    data = orjson.dumps(body) if body is not None else None
    async with session.post(url, data=data, headers={**JSON, **headers}) as response:
        return (
            response.status,
            {k.lower(): v for k, v in response.headers.items()},
            orjson.loads(await response.read()),
        )


async def test_a_call_answers_the_result_in_the_envelope_with_its_request_id() -> None:
    async with running_gateway() as (_, server), aiohttp.ClientSession() as session:
        url = f"{server.url}/v1/plugins/echo/methods/say"
        status, headers, body = await post(session, url, {"text": "hi"}, **{"X-Request-Id": "r-1"})
        assert status == 200
        assert body == {
            "ok": True,
            "result": {"text": "hi", "greeting": "via gateway", "caller": None},
        }
        assert headers["x-request-id"] == "r-1"
        status, headers, _ = await post(session, url, {"text": "again"})
        assert status == 200
        assert headers["x-request-id"]  # made up when the client sent none


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type"),
    [
        ("echo/methods/withdraw", {"amount": 500}, 500, "InsufficientFunds"),
        ("echo/methods/say", {"text": 5}, 400, "invalid_params"),
        ("echo/methods/say", {"text": "x", "extra": 1}, 400, "invalid_params"),
        ("ghost/methods/say", {"text": "x"}, 404, "plugin_not_found"),
        ("echo/methods/shout", {"text": "x"}, 404, "method_not_found"),
    ],
)
async def test_errors_answer_the_status_of_their_type(
    path: str, body: Any, status: int, error_type: str
) -> None:
    async with running_gateway() as (_, server), aiohttp.ClientSession() as session:
        got, _, answer = await post(session, f"{server.url}/v1/plugins/{path}", body)
        assert got == status
        assert answer["ok"] is False
        assert answer["error"]["type"] == error_type
        assert isinstance(answer["error"]["message"], str)


async def test_an_unknown_version_is_404_and_a_known_one_is_called() -> None:
    async with running_gateway() as (_, server), aiohttp.ClientSession() as session:
        url = f"{server.url}/v1/plugins/echo/methods/say"
        status, _, body = await post(session, url, {"text": "x"}, **{"X-Plugin-Version": "9.9.9"})
        assert (status, body["error"]["type"]) == (404, "plugin_not_found")
        status, _, _ = await post(session, url, {"text": "x"}, **{"X-Plugin-Version": "1.0.0"})
        assert status == 200


async def test_the_deadline_header_bounds_the_call_and_a_bad_one_is_refused() -> None:
    entry = echo_entry(sleep={})
    async with running_gateway(entry) as (_, server), aiohttp.ClientSession() as session:
        url = f"{server.url}/v1/plugins/echo/methods/sleep"
        status, _, body = await post(session, url, {"seconds": 5}, **{"X-Timeout-Ms": "50"})
        assert (status, body["error"]["type"]) == (504, "deadline_exceeded")
        status, _, body = await post(session, url, {"seconds": 5}, **{"Request-Timeout": "0.05"})
        assert (status, body["error"]["type"]) == (504, "deadline_exceeded")
        for header, value in [
            ("X-Timeout-Ms", "-1"),
            ("X-Timeout-Ms", "1e3"),
            ("X-Timeout-Ms", "\u00b2"),  # a digit to isdigit(), not to int(): was a 500
            ("Request-Timeout", "nan"),
        ]:
            status, _, body = await post(session, url, {"seconds": 0}, **{header: value})
            assert (status, body["error"]["type"]) == (400, "invalid_params"), (header, value)


@pytest.mark.parametrize("call_lane", [True, False])
async def test_the_gateways_max_timeout_cuts_a_longer_asked_deadline(call_lane: bool) -> None:
    """``max_timeout_ms`` cuts what a caller asks for to the cap, not refused; a deadline
    under it stands, and a call that asks for none keeps its method's longer timeout.
    Before, a minute's X-Timeout-Ms held the call (and the plugin) for the whole minute."""
    entry = echo_entry(sleep={"timeout_ms": 5000})
    settings = GatewaySettings(port=0, max_timeout_ms=300, call_lane=call_lane)
    async with (
        running_gateway(entry, settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/v1/plugins/echo/methods/sleep"
        for header, value in [("X-Timeout-Ms", "60000"), ("Request-Timeout", "60")]:
            started = loop_time()
            status, _, body = await post(session, url, {"seconds": 30}, **{header: value})
            assert (status, body["error"]["type"]) == (504, "deadline_exceeded"), header
            assert loop_time() - started < 5  # the cap's 0.3 s and slack; it sleeps 30 s
        # Under the cap: the asked deadline stands.
        status, _, body = await post(session, url, {"seconds": 0.01}, **{"X-Timeout-Ms": "250"})
        assert (status, body["ok"]) == (200, True)
        status, _, body = await post(session, url, {"seconds": 5}, **{"X-Timeout-Ms": "50"})
        assert (status, body["error"]["type"]) == (504, "deadline_exceeded")
        # No deadline asked: the method's own 5 s, above the cap, is not cut.
        status, _, body = await post(session, url, {"seconds": 0.6})
        assert (status, body["ok"]) == (200, True)
        assert body["result"] >= 0.6
        # Past a day is still malformed, cap or not.
        status, _, body = await post(session, url, {"seconds": 0}, **{"X-Timeout-Ms": "86400001"})
        assert (status, body["error"]["type"]) == (400, "invalid_params")
        # The OpenAPI document tells the cap; what it accepts is unchanged.
        async with session.get(f"{server.url}/openapi.json") as answer:
            headers = orjson.loads(await answer.read())["components"]["parameters"]
        for name in ("TimeoutMs", "RequestTimeout"):
            assert "cuts a longer deadline to 300 ms" in headers[name]["description"]
        assert headers["TimeoutMs"]["schema"]["maximum"] == 86_400_000


def loop_time() -> float:
    return asyncio.get_running_loop().time()


async def test_a_rate_limited_call_is_429_with_retry_after() -> None:
    entry = echo_entry(say={"rate_limit": {"rate": 0.01, "burst": 1, "mode": "reject"}})
    async with running_gateway(entry) as (_, server), aiohttp.ClientSession() as session:
        url = f"{server.url}/v1/plugins/echo/methods/say"
        assert (await post(session, url, {"text": "a"}))[0] == 200
        status, headers, body = await post(session, url, {"text": "b"})
        assert (status, body["error"]["type"]) == (429, "rate_limited")
        assert int(headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b'{"text": "hi"}', "text/plain", 415),
        (b'{"text": "hi"}', "application/x-www-form-urlencoded", 415),
        (b"[" * 100 + b"]" * 100, "application/json", 400),  # over the 64 levels
        (b"[" * 5000 + b"]" * 5000, "application/json", 400),  # over orjson's own limit
        (b'{"text": "\xff\xfe"}', "application/json", 400),  # not UTF-8
    ],
)
async def test_bad_bodies_are_refused_typed_and_the_server_keeps_serving(
    data: bytes, content_type: str, status: int
) -> None:
    async with running_gateway() as (_, server), aiohttp.ClientSession() as session:
        url = f"{server.url}/v1/plugins/echo/methods/say"
        async with session.post(url, data=data, headers={"Content-Type": content_type}) as answer:
            assert answer.status == status
            body = orjson.loads(await answer.read())
        assert body["error"]["type"] == "invalid_params"
        assert (await post(session, url, {"text": "still here"}))[0] == 200


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9)


def _deflate(data: bytes, *, header: bool = True) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS if header else -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def _zstd(data: bytes, *, sized: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=sized).compress(data)


def _zstd_streamed(data: bytes) -> bytes:
    """A frame that does not declare its size (what a streaming encoder writes)."""
    packer = zstandard.ZstdCompressor().compressobj()
    return packer.compress(data) + packer.flush()


SAID = b'{"text": "packed"}'
#: 4 MiB of JSON, four times the default max_body_bytes, in a few KB.
BOMB = b'{"text": "' + b"A" * (4 << 20) + b'"}'


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
@pytest.mark.parametrize(
    ("coding", "data", "status"),
    [
        pytest.param("gzip", _gzip(SAID), 200, id="gzip"),
        pytest.param("GZip ", _gzip(SAID), 200, id="gzip-spelled-loosely"),
        pytest.param("deflate", _deflate(SAID), 200, id="deflate"),
        # Raw deflate, without zlib's header: aiohttp took it.
        pytest.param("deflate", _deflate(SAID, header=False), 200, id="raw-deflate"),
        # Was a text/plain 400 asking for backports.zstd.
        pytest.param("zstd", _zstd(SAID), 200, id="zstd"),
        pytest.param("zstd", _zstd_streamed(SAID), 200, id="zstd-streamed"),
        pytest.param("identity", SAID, 200, id="identity"),
        pytest.param("gzip", _gzip(BOMB), 413, id="gzip-bomb"),
        pytest.param("deflate", _deflate(BOMB), 413, id="deflate-bomb"),
        # On the size its frame declares, and when it declares none.
        pytest.param("zstd", _zstd(BOMB), 413, id="zstd-bomb"),
        pytest.param("zstd", _zstd_streamed(BOMB), 413, id="zstd-streamed-bomb"),
        pytest.param("gzip", _gzip(SAID)[:-6], 400, id="gzip-cut-short"),
        pytest.param("gzip", SAID, 400, id="gzip-not-gzip"),
        pytest.param("zstd", _zstd(SAID) + b"x", 400, id="zstd-bytes-after-its-frame"),
        pytest.param("deflate", _deflate(SAID)[:-3], 400, id="deflate-cut-short"),
        # Brotli is not decoded here (no brotli package): refused as the protocol says.
        pytest.param("br", b"\x0b\x08\x80" + SAID + b"\x03", 415, id="br"),
        pytest.param("gzip, zstd", _zstd(_gzip(SAID)), 415, id="two-codings"),
        pytest.param("rot13", SAID, 415, id="unknown-coding"),
    ],
)
async def test_a_compressed_body_is_decoded_capped_and_any_other_coding_is_415(
    coding: str, data: bytes, status: int, lane: bool
) -> None:
    """docs/gateway.md said zstd and br are decoded; aiohttp answered both with a plain-text
    400 naming a package to install. Every answer is the envelope; a 415 says what the
    gateway takes (Accept-Encoding); a bomb is 413 whatever the coding, sent whole or
    chunked."""
    settings = GatewaySettings(port=0, call_lane=lane)
    async with (
        running_gateway(settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/v1/plugins/echo/methods/say"
        for chunked in (False, True):
            headers = {"Content-Type": "application/json", "Content-Encoding": coding}
            sent: Any = data
            if chunked:

                async def chunks() -> AsyncIterator[bytes]:
                    for start in range(0, len(data), 1000):
                        yield data[start : start + 1000]

                sent = chunks()
            async with session.post(url, data=sent, headers=headers) as answer:
                assert answer.status == status, (chunked, await answer.text())
                assert answer.content_type == "application/json"
                body = orjson.loads(await answer.read())
                if status == 200:
                    assert body["result"]["text"] == "packed"
                else:
                    assert body["error"]["type"] == "invalid_params"
                if status == 415:
                    accepted = answer.headers["Accept-Encoding"]
                    assert accepted.split(", ") == ["zstd", "gzip", "deflate"]
                    assert "br" not in accepted
            assert (await post(session, url, {"text": "still here"}))[0] == 200


async def test_nesting_within_the_limit_passes() -> None:
    async with running_gateway() as (_, server), aiohttp.ClientSession() as session:
        # 60 levels inside "text": valid JSON that reaches the schema check.
        deep: Any = "x"
        for _ in range(60):
            deep = [deep]
        status, _, body = await post(
            session, f"{server.url}/v1/plugins/echo/methods/say", {"text": deep}
        )
        assert (status, body["error"]["type"]) == (400, "invalid_params")
        assert "params['text']" in body["error"]["message"]


async def test_an_oversized_content_length_is_413_before_the_body_is_sent() -> None:
    settings = GatewaySettings(port=0, max_body_bytes=1000)
    async with (
        running_gateway(settings=settings) as (_, server),
        raw_connection(server.url) as (reader, writer),
    ):
        writer.write(
            b"POST /v1/plugins/echo/methods/say HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
        )
        await writer.drain()
        status, answer = await read_answer(reader)  # no byte of the body was sent
        assert status == 413
        assert b"invalid_params" in answer
        assert b"connection: close" in answer.lower()


async def test_a_chunked_body_over_the_limit_is_cut_off() -> None:
    settings = GatewaySettings(port=0, max_body_bytes=1000)
    async with (
        running_gateway(settings=settings) as (_, server),
        raw_connection(server.url) as (reader, writer),
    ):
        writer.write(
            b"POST /v1/plugins/echo/methods/say HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b'{"text": "' + b"a" * 600
        for _ in range(3):  # 1,800+ bytes, then the body never ends
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        status, _ = await read_answer(reader)
        assert status == 413
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed


async def test_a_body_that_stops_arriving_gets_408() -> None:
    settings = GatewaySettings(port=0, body_timeout=0.5)
    async with (
        running_gateway(settings=settings) as (_, server),
        raw_connection(server.url) as (reader, writer),
    ):
        writer.write(
            b"POST /v1/plugins/echo/methods/say HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"te'
        )
        await writer.drain()
        status, answer = await read_answer(reader)
        assert status == 408
        assert b"deadline_exceeded" in answer


async def test_slow_clients_do_not_block_calls_and_their_connections_are_closed() -> None:
    settings = GatewaySettings(port=0, header_timeout=1.0)
    async with (
        running_gateway(settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        slow = [await asyncio.open_connection(host, int(port)) for _ in range(50)]
        try:
            for _, writer in slow:  # a request head that never ends
                writer.write(b"POST /v1/plugins/echo/methods/say HTTP/1.1\r\nHost: x\r\nX-A: ")
            status, _, _ = await post(
                session, f"{server.url}/v1/plugins/echo/methods/say", {"text": "hi"}
            )
            assert status == 200
            for reader, writer in slow:
                writer.write(b"a")  # still trickling in
                # the header timeout closes it: EOF (or a reset), within a few seconds
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(reader.read(), 15) == b""
        finally:
            for _, writer in slow:
                writer.close()
            for _, writer in slow:
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()


async def test_draining_answers_503_and_readyz_says_so_while_calls_in_flight_finish() -> None:
    entry = echo_entry(sleep={})
    async with running_gateway(entry) as (dispatcher, server), aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/readyz") as ready:
            assert ready.status == 200
        url = f"{server.url}/v1/plugins/echo/methods/sleep"
        in_flight = asyncio.create_task(post(session, url, {"seconds": 0.5}))
        while dispatcher.stats()["dispatcher"]["calls_in_flight"] == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        drained = asyncio.create_task(dispatcher.drain(10))
        await asyncio.sleep(0)
        status, headers, body = await post(session, url, {"seconds": 0})
        assert (status, body["error"]["type"]) == (503, "shutting_down")
        assert headers["retry-after"] == "1"
        async with session.get(f"{server.url}/readyz") as ready:
            assert ready.status == 503
        async with session.get(f"{server.url}/healthz") as alive:
            assert alive.status == 200
        status, _, body = await in_flight
        assert status == 200
        assert body["result"] >= 0.5
        await drained


async def test_names_made_up_during_a_drain_are_logged_sparingly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the dispatcher drains a call is refused before its names are resolved, and
    its refusal was logged once per plugin, method and type every 10 s: a caller making
    up a new name per call wrote a line per call (300 here). Names the manifest does not
    hold now share one count, logged the first, the 1,000th, every 100,000th time; the
    manifest's own names are logged as before."""
    caplog.set_level(logging.WARNING, "dispatcher.gateway")
    async with running_gateway() as (dispatcher, server), aiohttp.ClientSession() as session:
        await dispatcher.drain(1)
        base = f"{server.url}/v1/plugins"
        made_up = [f"{base}/ghost-{n}/methods/m" for n in range(150)]
        made_up += [f"{base}/echo/methods/shout-{n}" for n in range(150)]
        answers = await asyncio.gather(*(post(session, url, {}) for url in made_up))
        assert {(status, body["error"]["type"]) for status, _, body in answers} == {
            (503, "shutting_down")
        }
        for _ in range(3):
            status, _, _ = await post(session, f"{base}/echo/methods/say", {"text": "x"})
            assert status == 503
    lines = [r.getMessage() for r in caplog.records if "answered shutting_down" in r.getMessage()]
    assert len(lines) == 2, f"{len(lines)} lines: {lines[:3]}"
    made_up_lines = [line for line in lines if "no plugin and method of the manifest" in line]
    assert len(made_up_lines) == 1, lines
    assert len([line for line in lines if " echo.say " in line]) == 1, lines


async def test_listing_openapi_health_and_unknown_routes() -> None:
    async with running_gateway() as (_, server), aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/v1/plugins") as answer:
            plugins = {p["id"]: p for p in (await answer.json())["plugins"]}
        assert {m["name"] for m in plugins["echo"]["methods"]} == {"say", "sleep", "withdraw"}
        async with session.get(f"{server.url}/openapi.json") as answer:
            document = await answer.json()
        assert document["openapi"] == "3.1.0"
        say = document["paths"]["/v1/plugins/echo/methods/say"]["post"]
        reference = say["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert document["components"]["schemas"][reference.rsplit("/", 1)[1]] == SAY_SCHEMA
        assert "/v1/plugins/events/methods/burst" in document["paths"]
        timeout_header = document["components"]["parameters"]["TimeoutMs"]
        assert "max_timeout_ms" not in timeout_header["description"]  # no cap: nothing cut
        async with session.get(f"{server.url}/healthz") as answer:
            assert (answer.status, await answer.json()) == (200, {"status": "alive"})
        async with session.get(f"{server.url}/nowhere") as answer:
            assert answer.status == 404
            assert (await answer.json())["ok"] is False
        async with session.get(f"{server.url}/v1/plugins/echo/methods/say") as answer:
            assert answer.status == 405


async def test_without_credentials_401_with_www_authenticate_and_forbidden_403(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    authenticator = OneToken()
    async with (
        running_gateway(authenticator=authenticator) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/v1/plugins/echo/methods/say"
        status, headers, body = await post(session, url, {"text": "hi"})
        assert (status, body["error"]["type"]) == (401, "unauthorized")
        assert headers["www-authenticate"] == "Bearer"
        wrong = SECRET_TOKEN[:-1] + "X"
        status, _, body = await post(session, url, {"text": "hi"}, Authorization=f"Bearer {wrong}")
        assert status == 401
        assert wrong not in orjson.dumps(body).decode()
        for route in ("/v1/plugins", "/openapi.json", "/v1/events"):
            async with session.get(f"{server.url}{route}") as answer:
                assert answer.status == 401, route
        status, _, body = await post(
            session, url, {"text": "hi"}, Authorization=f"Bearer {SECRET_TOKEN}"
        )
        assert status == 200
        assert body["result"]["caller"] == "alice"  # the principal's id reaches the plugin
        status, _, body = await post(session, url, {"text": "hi"}, **{"X-API-Key": SECRET_TOKEN})
        assert status == 200
        assert authenticator.seen[-1].api_key == SECRET_TOKEN
        assert authenticator.seen[-1].certificate_subject is None  # plain HTTP: no certificate
        authenticator.forbidden = frozenset({"alice"})
        status, _, body = await post(
            session, url, {"text": "hi"}, Authorization=f"Bearer {SECRET_TOKEN}"
        )
        assert (status, body["error"]["type"]) == (403, "forbidden")
        async with session.get(f"{server.url}/healthz") as answer:
            assert answer.status == 200  # orchestrators probe without credentials
    assert SECRET_TOKEN not in caplog.text
    assert wrong not in caplog.text


def _head(*lines: bytes, end: bytes = b"\r\n") -> bytes:
    return end.join((b"POST /v1/plugins/echo/methods/say HTTP/1.1", b"Host: x", *lines)) + end * 2


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
@pytest.mark.parametrize(
    ("sent", "status"),
    [
        pytest.param(
            _head(b"Authorization: Bearer " + SECRET_TOKEN.encode() * 300), 431, id="long-header"
        ),
        pytest.param(
            _head(b"X-Pad: " + b"p" * 9000, b"X-API-Key: " + SECRET_TOKEN.encode()),
            431,
            id="long-header-before-the-key",
        ),
        pytest.param(
            b"POST /v1/plugins/echo/methods/say?"
            + SECRET_TOKEN.encode() * 300
            + b" HTTP/1.1\r\n\r\n",
            431,
            id="long-request-line",
        ),
        pytest.param(
            _head(b"X-API-Key: " + SECRET_TOKEN.encode(), b"Content-Length: 2", end=b"\n") + b"{}",
            400,
            id="bare-lf",
        ),
        pytest.param(
            _head(b"X-API-Key: " + SECRET_TOKEN.encode(), b"Bad Header: x"), 400, id="bad-header"
        ),
    ],
)
async def test_a_head_aiohttp_cannot_parse_is_answered_in_the_envelope_and_never_quoted(
    sent: bytes, status: int, lane: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """aiohttp answered these itself, text/plain, quoting the bytes it choked on (the
    credentials with them), and logged the same with a traceback at ERROR on
    ``aiohttp.server``, outside ``logs.format: json``."""
    document = manifest(echo_entry()).model_dump(mode="json", exclude_none=True)
    document["telemetry"] = {"logs": {"format": "json", "level": "DEBUG"}}
    settings = GatewaySettings(port=0, call_lane=lane)
    async with (
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
    ):
        capsys.readouterr()
        async with raw_connection(server.url) as (reader, writer):
            writer.write(sent)
            got, answer = await read_answer(reader)
            assert await reader.read() == b""  # and the connection closed
        logged = capsys.readouterr().err
    head, body = answer.split(b"\r\n\r\n", 1)
    assert got == status
    assert b"content-type: application/json" in head.lower()
    assert b"connection: close" in head.lower()
    assert orjson.loads(body)["error"]["type"] == "invalid_params"
    assert SECRET_TOKEN.encode() not in answer
    assert SECRET_TOKEN not in logged
    lines = [orjson.loads(line) for line in logged.splitlines() if "parser" in line]
    assert len(lines) == 1, logged  # one JSON line, in the manifest's format
    assert lines[0]["level"] == "WARNING"
    assert lines[0]["logger"] == "dispatcher.gateway"
    assert "exception" not in lines[0]
    assert f"({status})" in lines[0]["message"]
    assert "Traceback" not in logged


async def test_a_handler_that_fails_answers_500_in_the_envelope_without_its_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bug in a route aiohttp serves was "500 Internal Server Error" in text/plain; its
    exception's message (which may quote what a client sent) stays out of the log."""
    document = manifest(echo_entry()).model_dump(mode="json", exclude_none=True)
    document["telemetry"] = {"logs": {"format": "json"}}
    async with (
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
        aiohttp.ClientSession() as session,
    ):

        def broken() -> dict[str, Any]:  # a fault put into a real dispatcher
            raise ValueError(f"cannot parse {SECRET_TOKEN}")

        dispatcher.stats = broken  # type: ignore[method-assign]
        capsys.readouterr()
        async with session.get(f"{server.url}/v1/rollouts") as answer:
            assert answer.status == 500
            assert answer.content_type == "application/json"
            body = await answer.json()
        logged = capsys.readouterr().err
    assert body["error"]["type"] == "provider_error"
    assert SECRET_TOKEN not in orjson.dumps(body).decode()
    assert SECRET_TOKEN not in logged
    line = orjson.loads(next(line for line in logged.splitlines() if "failed to answer" in line))
    assert line["level"] == "ERROR"
    assert "ValueError" in line["message"]
    assert "/v1/rollouts" in line["message"]  # the route, as the app declares it
    assert "broken" in line["message"]  # where it was raised


async def test_an_authenticator_that_breaks_refuses_without_quoting_the_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        async def authenticate(self, credentials: Any) -> Any:
            raise ValueError(f"cannot parse {credentials.authorization}")

    async with (
        running_gateway(authenticator=Broken()) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/v1/plugins/echo/methods/say"
        status, _, body = await post(
            session, url, {"text": "hi"}, Authorization=f"Bearer {SECRET_TOKEN}"
        )
        assert status == 401
        assert SECRET_TOKEN not in orjson.dumps(body).decode()
    assert "ValueError" in caplog.text
    assert SECRET_TOKEN not in caplog.text


async def test_the_gateway_serves_metrics_and_the_latest_errors_when_telemetry_is_on() -> None:
    entry = echo_entry()
    document = manifest(entry).model_dump(mode="json", exclude_none=True)
    document["telemetry"] = {"metrics": {"enabled": True}}
    settings = GatewaySettings(port=0)
    async with (
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/v1/plugins/echo/methods/say"
        assert (await post(session, url, {"text": "hi"}))[0] == 200
        withdraw = f"{server.url}/v1/plugins/echo/methods/withdraw"
        assert (await post(session, withdraw, {"amount": 500}))[0] == 500  # the plugin's error
        async with session.get(f"{server.url}/metrics") as answer:
            exposition = await answer.text()
        assert answer.status == 200
        assert 'plugin="echo"' in exposition
        async with session.get(f"{server.url}/v1/errors") as answer:
            errors = await answer.json()
        assert errors["enabled"] is True
        assert [count["type"] for count in errors["counts"]] == ["plugin_error"]
        assert "cannot withdraw 500" in errors["recent"][0]["message"]


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
async def test_an_idempotency_key_takes_what_the_dispatcher_takes(lane: bool) -> None:
    """1-255 characters on every route and port: the call route let 256 through to the
    dispatcher, which refused it with a message of its own (and docs said 1-256)."""
    settings = GatewaySettings(port=0, call_lane=lane)
    async with (
        running_gateway(settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/v1/plugins/echo/methods/say"
        status, _, _ = await post(session, url, {"text": "hi"}, **{"Idempotency-Key": "k" * 255})
        assert status == 200
        status, _, body = await post(session, url, {"text": "hi"}, **{"Idempotency-Key": "k" * 256})
        assert status == 400
        assert body["error"]["message"] == "Idempotency-Key is 1-255 printable UTF-8 characters"


def counter_entry(version: str) -> dict[str, Any]:
    """The counting plugin in this process, at ``version``: its ``run`` says how many
    calls reached that version's instance."""
    target = {
        "provider": "local",
        "entrypoint": "counting_plugin:CountingPlugin",
        "path": str(ROOT / "tests" / "plugins"),
    }
    return {"id": "counter", "version": version, "target": target, "methods": {"charge": {}}}


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
async def test_an_idempotency_key_spent_on_one_version_is_refused_on_another(lane: bool) -> None:
    """Before: the key's record was the plugin's, method's, caller's and key's, whatever
    version the call went to, so a caller who spent a key on 1.0.0 and sent it to 2.0.0
    was answered 1.0.0's outcome, and 2.0.0 never ran. A version asked for is another
    request, refused as other params are; the same version still replays, and so does a
    retry naming no version (the dispatcher chose 1.0.0, not the caller)."""
    settings = GatewaySettings(port=0, call_lane=lane)
    entries = (counter_entry("1.0.0"), counter_entry("2.0.0"))
    async with (
        running_gateway(*entries, settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/v1/plugins/counter/methods/charge"
        params = {"amount": 5, "delay": 0}
        keyed = {"Idempotency-Key": "order-17"}
        status, _, first = await post(
            session, url, params, **keyed, **{"X-Plugin-Version": "1.0.0"}
        )
        assert (status, first["result"]) == (200, {"charged": 5, "run": 1})
        status, _, again = await post(
            session, url, params, **keyed, **{"X-Plugin-Version": "1.0.0"}
        )
        assert (status, again) == (200, first)  # a duplicate at the same version: replayed
        for version in ("2.0.0", "^2"):  # exact, or a range resolving to 2.0.0
            status, _, other = await post(
                session, url, params, **keyed, **{"X-Plugin-Version": version}
            )
            assert (status, other["error"]["type"]) == (400, "invalid_params"), other
            assert "order-17" in other["error"]["message"]
            assert "another version than 2.0.0" in other["error"]["message"]
        status, _, latest = await post(session, url, params, **keyed)  # no version named
        assert (status, latest) == (200, first)
        # 2.0.0 ran none of them: its first call with a new key is its first run.
        status, _, fresh = await post(session, url, params, **{"Idempotency-Key": "order-18"})
        assert (status, fresh["result"]) == (200, {"charged": 5, "run": 1})


async def test_the_plugin_list_and_openapi_follow_a_reload() -> None:
    """A reload that adds a version (calls now go to it) changes what the gateway lists:
    the listing and the document were made once at start and stayed as they were."""
    newer = {**echo_entry(say={"params_schema": SAY_SCHEMA}), "version": "1.1.0"}
    async with (
        running_gateway(echo_entry()) as (dispatcher, server),
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{server.url}/v1/plugins") as answer:
            before = (await answer.json())["plugins"]
        await dispatcher.reload(manifest(echo_entry(), newer))
        async with session.get(f"{server.url}/v1/plugins") as answer:
            after = (await answer.json())["plugins"]
        async with session.get(f"{server.url}/openapi.json") as answer:
            document = await answer.json()
    assert [(each["id"], each["version"]) for each in before] == [("echo", "1.0.0")]
    assert ("echo", "1.1.0") in [(each["id"], each["version"]) for each in after]
    assert document["info"]["version"] != "" and any(
        "1.1.0" in orjson.dumps(operation).decode()
        for path in document["paths"].values()
        for operation in path.values()
    )
