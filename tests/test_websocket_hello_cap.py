"""A plugin's hello over its target's ``max_message_bytes``, both ways round.

A hello lists every method the plugin serves, so a plugin of many methods can outgrow a
target set to a small cap (1,024 bytes at the least). That is configuration, and it is said
as such: before, a dialled plugin's health read ``closed before its hello (ERROR)``, and a
plugin dialling in was closed 1009 with no reason while the gateway said nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from dispatcher import Dispatcher
from linchkit_plugin.ws_protocol import PLUGIN_ID_HEADER, PLUGIN_VERSION_HEADER, hello_frame
from tests.conftest import manifest
from tests.test_websocket_drop import TOKEN, gateway_of, until

#: Some 4 KB of hello: 200 methods' names.
MANY_METHODS = [f"method_number_{number}" for number in range(200)]
SMALL_CAP = 1024


@contextlib.asynccontextmanager
async def plugin_of_many_methods() -> AsyncIterator[str]:
    """A plugin served at the URL yielded whose hello lists ``MANY_METHODS``."""

    async def serve(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_bytes(hello_frame("many", "1.0.0", MANY_METHODS, max_message_bytes=None))
        async for _ in socket:
            pass
        return socket

    app = web.Application()
    app.router.add_get("/", serve)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"ws://{host}:{port}/"
    finally:
        await runner.cleanup()


async def test_a_dialled_plugin_whose_hello_is_over_the_cap_is_told_as_the_setting() -> None:
    async with plugin_of_many_methods() as url:
        plugins = manifest(
            {
                "id": "many",
                "version": "1.0.0",
                "target": {"provider": "websocket", "url": url, "max_message_bytes": SMALL_CAP},
                "methods": {"method_number_1": {}},
            }
        )
        async with Dispatcher(plugins) as dispatcher:
            (dialed,) = dispatcher.providers["websocket"].dialed  # type: ignore[attr-defined]
            with contextlib.suppress(TimeoutError):
                await until(lambda: "max_message_bytes" in dialed.last_error, 10)
            said = dialed.last_error
            assert "hello is larger than the target's max_message_bytes" in said, said
            assert f"exceeds limit {SMALL_CAP}" in said, said
            (health,) = await dispatcher.health()
            assert health.health.status == "not_serving"
            assert "max_message_bytes" in health.health.detail


async def test_a_hello_over_the_cap_of_a_plugin_dialling_in_is_said_by_the_gateway(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dispatcher.providers.websocket")
    async with (
        gateway_of(max_message_bytes=SMALL_CAP) as (dispatcher, (host, port)),
        aiohttp.ClientSession() as session,
    ):
        headers = {
            PLUGIN_ID_HEADER: "raw",
            PLUGIN_VERSION_HEADER: "1.0.0",
            "Authorization": f"Bearer {TOKEN}",
        }
        url = f"http://{host}:{port}/v1/plugins/connect"
        async with session.ws_connect(url, headers=headers) as socket:
            hello = hello_frame("raw", "1.0.0", MANY_METHODS, max_message_bytes=None)
            await socket.send_bytes(hello)
            closed = await socket.receive(timeout=5)
        assert closed.type is aiohttp.WSMsgType.CLOSE
        assert closed.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        async with asyncio.timeout(5):
            while "refused as raw@1.0.0" not in caplog.text:  # noqa: ASYNC110 - a log, polled
                await asyncio.sleep(0.01)
        assert "hello is larger than the target's max_message_bytes" in caplog.text
        assert dispatcher.providers["websocket"].inbound.all() == []  # type: ignore[attr-defined]
