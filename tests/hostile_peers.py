"""Plugins a test writes to lie to the dispatcher, served on loopback in the test's loop:
a gRPC ``PluginService`` servicer of its own (the project's stubs), and an aiohttp
WebSocket handler answering the upgrade at ``/``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc.aio
from aiohttp import web

from linchkit_plugin._proto import plugin_pb2_grpc

__all__ = ["grpc_plugin", "websocket_plugin"]


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
    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()
