"""The Python SDK's WebSocket server (``WebSocketPluginServer``) holds at most
``max_connections`` connections (1000, as ``dispatcher-plugin serve`` holds its HTTP ones):
past them an upgrade is refused 503 before it upgrades, in a short ``overloaded`` envelope a
dispatcher dials again on. Before, every upgrade was taken. Its real server on loopback,
raw aiohttp clients as the hosts, a cap of 2 set by the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import orjson
import pytest

from linchkit_plugin import Plugin
from linchkit_plugin.host import PluginHost
from linchkit_plugin.ws_server import WebSocketPluginServer


class EchoPlugin(Plugin):
    id = "capped"
    version = "1.0.0"

    async def echo(self, value: int) -> int:
        return value


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the server's state, polled
            await asyncio.sleep(0.005)


def test_the_cap_defaults_to_the_http_server_s() -> None:
    server = WebSocketPluginServer(PluginHost(EchoPlugin()))
    assert server.max_connections == 1000
    with pytest.raises(ValueError, match="max_connections"):
        WebSocketPluginServer(PluginHost(EchoPlugin()), max_connections=0)


async def test_an_upgrade_past_the_cap_is_refused_503_and_a_closed_connection_frees_its_place() -> (
    None
):
    server = WebSocketPluginServer(
        PluginHost(EchoPlugin()), plugin_id="capped", version="1.0.0", max_connections=2
    )
    url = await server.start()
    try:
        async with aiohttp.ClientSession() as client:
            first = await client.ws_connect(url)
            second = await client.ws_connect(url)
            for socket in (first, second):
                assert orjson.loads((await socket.receive()).data)["type"] == "hello"

            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(url)
            assert refused.value.status == 503
            assert refused.value.headers is not None
            assert refused.value.headers["Retry-After"] == "1"
            async with client.get(url.replace("ws://", "http://"), headers=_upgrade()) as answer:
                assert answer.status == 503
                body = await answer.read()
            assert len(body) < 300, body
            error = orjson.loads(body)["error"]
            assert error["type"] == "overloaded" and error["retryable"] is True, error
            assert error["retry_after"] == 1.0, error
            assert "refused=2" in repr(server), repr(server)

            await first.close()
            await _until(lambda: len(server.sessions) == 1)
            third = await client.ws_connect(url)
            assert orjson.loads((await third.receive()).data)["type"] == "hello"
            await third.close()
            await second.close()
    finally:
        await server.aclose()


def _upgrade() -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
