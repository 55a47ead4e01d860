"""Plugins a test writes to lie to the dispatcher, served on loopback in the test's loop:
a gRPC ``PluginService`` servicer of its own (the project's stubs), an aiohttp
WebSocket handler answering the upgrade at ``/``, or any aiohttp handler at a path."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc.aio
from aiohttp import web

from linchkit_plugin._proto import plugin_pb2_grpc

__all__ = ["grpc_plugin", "http_peer", "websocket_plugin"]


@contextlib.asynccontextmanager
async def grpc_plugin(servicer: Any) -> AsyncIterator[str]:
    """``servicer`` (a ``PluginServiceServicer``) on 127.0.0.1; yields its address."""
    server = grpc.aio.server()
    plugin_pb2_grpc.add_PluginServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


@contextlib.asynccontextmanager
async def websocket_plugin(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """``handler`` answering WebSocket upgrades at ``/`` on 127.0.0.1; yields its URL."""
    async with http_peer("/", handler) as address:
        yield f"ws://{address}/"


@contextlib.asynccontextmanager
async def http_peer(
    path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> AsyncIterator[str]:
    """``handler`` answering GET ``path`` on 127.0.0.1; yields its ``host:port``."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
