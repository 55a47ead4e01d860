"""``provider: grpc`` with ``lifecycle: dispatcher`` against the Python SDK's gRPC server,
served in this loop on 127.0.0.1: a service restarted at the same address (a redeploy)
gets ``Init`` and ``Start`` again before any call reaches it, and the host's ``Stop`` and
``Destroy`` at close follow an ``Init`` on every process that gets them.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from dispatcher import Dispatcher, TargetUnavailable
from dispatcher.fleet import never_sent
from linchkit_plugin import Plugin
from linchkit_plugin.grpc_server import PluginServer
from linchkit_plugin.host import PluginHost
from tests.conftest import manifest


class Configured(Plugin):
    """Records its lifecycle and answers with the config its ``Init`` gave it."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self.steps: list[str] = []

    async def init(self, config: dict[str, Any]) -> None:
        self.config = config
        self.steps.append("init")

    async def start(self) -> None:
        self.steps.append("start")

    async def stop(self) -> None:
        self.steps.append("stop")

    async def destroy(self) -> None:
        self.steps.append("destroy")

    async def settings(self) -> dict[str, Any]:
        return self.config


class Process:
    """One run of the plugin's service at ``port``: what a process of it would be."""

    def __init__(self, port: int) -> None:
        self.plugin = Configured()
        self.stop = asyncio.Event()
        server = PluginServer(PluginHost(self.plugin), plugin_id="configured", version="1.0.0")
        loop = asyncio.get_running_loop()
        self.bound: asyncio.Future[int] = loop.create_future()
        self.task = loop.create_task(
            server.serve(f"127.0.0.1:{port}", on_ready=self.bound.set_result, stop=self.stop)
        )

    async def end(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_restarted_service_gets_init_and_start_before_its_first_call() -> None:
    port = free_port()
    first = Process(port)
    config = {"region": "eu", "limit": 3}
    target = {
        "provider": "grpc",
        "address": f"127.0.0.1:{port}",
        "lifecycle": "dispatcher",
        "connect_timeout_ms": 10_000,
    }
    spec = manifest(
        {
            "id": "configured",
            "version": "1.0.0",
            "config": config,
            "target": target,
            "methods": {"settings": {"timeout_ms": 10_000}},
        }
    )
    second: Process | None = None
    try:
        async with Dispatcher(spec) as dispatcher:
            assert await dispatcher.call("configured", "settings", {}) == config
            assert first.plugin.steps == ["init", "start"]
            await first.end()  # a redeploy: the same address, a new process
            second = Process(port)
            await asyncio.wait_for(second.bound, 10)
            # Until the channel's reconnect backoff has passed, a call may fail as never
            # sent; none may reach the new process before its Init.
            for _ in range(100):
                try:
                    assert await dispatcher.call("configured", "settings", {}) == config
                    break
                except TargetUnavailable as error:
                    assert never_sent(error), error
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the restarted service was never called")
            assert second.plugin.steps == ["init", "start"]
        assert second.plugin.steps == ["init", "start", "stop", "destroy"]
    finally:
        for process in (first, second):
            if process is not None and not process.task.done():
                await process.end()
