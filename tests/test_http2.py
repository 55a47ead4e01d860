"""``http2: true`` on an http target: HTTP/2 by prior knowledge (h2c on http://).

Against a real HTTP/2 server (hypercorn, serving an ASGI function that answers the
envelope and says which HTTP version and which connection the call came in on): calls go
over HTTP/2 and share connections; a server that speaks only HTTP/1.1 fails the call at
once with a typed error; a deadline and the answer's size cap hold as on HTTP/1.1; the
manifest refuses ``http2`` on a client that cannot speak it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config

from dispatcher import DeadlineExceeded, Dispatcher, ProviderError, TargetUnavailable
from dispatcher.config import ManifestError, parse_manifest
from tests.conftest import ROOT
from tests.services import free_port
from tests.test_http_hardening import replying, server_on
from tests.test_http_mtls import write, write_leaf

Scope = dict[str, Any]


async def _function(scope: Scope, receive: Any, send: Any) -> None:
    """An HTTP function: ``say`` answers the HTTP version and the caller's port; ``wait``
    sleeps ``seconds`` first; ``big`` answers ``size`` bytes of text."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/health":
        payload = b"ok"
    else:
        envelope = orjson.loads(body)
        params = envelope["params"]
        if envelope["method"] == "wait":
            await asyncio.sleep(params["seconds"])
        result: Any = {"http_version": scope["http_version"], "port": scope["client"][1]}
        if envelope["method"] == "big":
            result = "x" * params["size"]
        payload = orjson.dumps({"ok": True, "result": result})
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


@contextlib.asynccontextmanager
async def h2c_server(
    max_streams: int = 1000,
    tls: tuple[Path, Path] | None = None,
    *,
    app: Any = _function,
    http2: bool = True,
) -> AsyncIterator[str]:
    """hypercorn serving ``app`` on loopback (HTTP/1.1, and HTTP/2 by prior knowledge,
    ``max_streams`` at once on a connection, unless not ``http2``; over TLS with ``tls``'s
    certificate and key); yields its URL."""
    config = Config()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    if tls is not None:
        config.certfile, config.keyfile = (str(path) for path in tls)
    config.h2_max_concurrent_streams = max_streams
    config.accesslog = None
    config.errorlog = None
    if not http2:
        config.alpn_protocols = ["http/1.1"]
        config.h2_max_concurrent_streams = 0
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))
    try:
        for _ in range(200):  # until it listens
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.02)
        yield f"{'http' if tls is None else 'https'}://127.0.0.1:{port}"
    finally:
        stop.set()
        try:
            await asyncio.wait_for(server, 10)
        except ssl.SSLError as error:
            # hypercorn's TLS shutdown raises when the client's last frame (h2's GOAWAY as
            # it closes) crosses the server's close_notify: a race of the two ends' closes
            # at teardown (2 runs of 5 of this test here), not what any test checks.
            if error.reason != "APPLICATION_DATA_AFTER_CLOSE_NOTIFY":
                raise


def h2_target(url: str, **extra: Any) -> dict[str, Any]:
    return {"provider": "http", "url": url, "client": "reqwest", "http2": True, **extra}


def entry(target: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """A manifest of one plugin ``p`` with ``_function``'s methods on ``target``."""
    return {
        "version": 1,
        "plugins": [
            {
                "id": "p",
                "version": "1.0.0",
                "target": target,
                "defaults": {"timeout_ms": 5000, **defaults},
                "methods": {"say": {}, "wait": {}, "big": {}},
            }
        ],
    }


def plugins(target: dict[str, Any], **defaults: Any) -> Any:
    return parse_manifest(entry(target, **defaults), base_dir=ROOT)


async def test_calls_go_over_http2_and_share_a_connection() -> None:
    async with h2c_server() as url, Dispatcher(plugins(h2_target(url))) as dispatcher:
        answers = await asyncio.gather(
            *(dispatcher.call("p", "wait", {"seconds": 0.3}) for _ in range(50))
        )
        (health,) = await dispatcher.health()
    assert {answer["http_version"] for answer in answers} == {"2"}
    # 50 calls in flight at once, one connection: HTTP/1.1 needs one per call.
    assert len({answer["port"] for answer in answers}) == 1
    assert health.health.status == "serving"


async def test_calls_beyond_the_servers_streams_at_once_wait_for_a_stream() -> None:
    """Once the connection has the server's SETTINGS (after its first call). A burst on a
    new connection may go out before them, and hypercorn ends the connection with a
    protocol error when it exceeds its limit (README, ``http2``)."""
    async with h2c_server(max_streams=20) as url, Dispatcher(plugins(h2_target(url))) as dispatcher:
        await dispatcher.call("p", "say")
        answers = await asyncio.gather(
            *(dispatcher.call("p", "wait", {"seconds": 0.2}) for _ in range(60))
        )
    assert len(answers) == 60  # none refused or lost: the other 40 waited for a stream
    assert {answer["http_version"] for answer in answers} == {"2"}


async def test_over_tls_http2_is_h2(tmp_path: Path) -> None:
    authority = trustme.CA()
    leaf = authority.issue_cert("127.0.0.1")
    ca_file = write(tmp_path, "ca.pem", authority.cert_pem.bytes())
    async with h2c_server(tls=write_leaf(tmp_path, "server", leaf)) as url:
        target = h2_target(url, tls={"ca_file": str(ca_file)})
        async with Dispatcher(plugins(target)) as dispatcher:
            assert (await dispatcher.call("p", "say"))["http_version"] == "2"


async def test_without_http2_the_same_server_is_called_over_http_1_1() -> None:
    target = {"provider": "http", "url": "", "client": "reqwest"}
    async with h2c_server() as url, Dispatcher(plugins({**target, "url": url})) as dispatcher:
        answers = await asyncio.gather(
            *(dispatcher.call("p", "wait", {"seconds": 0.3}) for _ in range(10))
        )
    assert {answer["http_version"] for answer in answers} == {"1.1"}
    assert len({answer["port"] for answer in answers}) == 10


async def test_a_server_that_speaks_only_http_1_1_fails_the_call_at_once() -> None:
    ok = b'{"ok": true, "result": {"text": "hi"}}'
    async with server_on("127.0.0.1", replying(200, ok)) as (host, port):
        target = h2_target(f"http://{host}:{port}")
        async with Dispatcher(plugins(target, timeout_ms=20_000)) as dispatcher:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TargetUnavailable, match="http2: true") as caught:
                await dispatcher.call("p", "say", {"text": "hi"})
            assert loop.time() - started < 5  # not the 20 s deadline
    assert caught.value.details["http2"] == "protocol_error"


async def test_a_deadline_ends_a_call_over_http2_and_the_connection_serves_on() -> None:
    async with h2c_server() as url, Dispatcher(plugins(h2_target(url))) as dispatcher:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeadlineExceeded):
            await dispatcher.call("p", "wait", {"seconds": 5}, timeout=0.3)
        assert loop.time() - started < 3
        assert (await dispatcher.call("p", "say"))["http_version"] == "2"


async def test_an_answer_over_max_response_bytes_is_refused_over_http2() -> None:
    target = h2_target("", max_response_bytes=10_000)
    async with h2c_server() as url, Dispatcher(plugins({**target, "url": url})) as dispatcher:
        assert len(await dispatcher.call("p", "big", {"size": 5_000})) == 5_000
        with pytest.raises(ProviderError, match="max_response_bytes"):
            await dispatcher.call("p", "big", {"size": 50_000})


@pytest.mark.parametrize(
    "target",
    [
        {"provider": "http", "url": "http://127.0.0.1:9", "http2": True},
        {"provider": "http", "url": "http://127.0.0.1:9", "http2": True, "client": "aiohttp"},
    ],
    ids=["default-client", "aiohttp"],
)
def test_http2_without_client_reqwest_is_refused_by_the_manifest(target: dict[str, Any]) -> None:
    with pytest.raises(ManifestError, match="http2: true needs client: reqwest"):
        parse_manifest(entry(target), base_dir=ROOT)


@pytest.mark.parametrize("value", ["maybe", None, [True], {"on": True}])
def test_an_http2_that_is_not_a_boolean_is_refused_naming_the_key(value: Any) -> None:
    target = {"provider": "http", "url": "http://127.0.0.1:9", "client": "reqwest"}
    with pytest.raises(ManifestError, match="http2"):
        parse_manifest(entry({**target, "http2": value}), base_dir=ROOT)
