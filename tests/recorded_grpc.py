"""A gRPC plugin service that records its lifecycle, served in the test's loop by the
Python SDK, and what the kernel says about connections to it: for tests of what the
dispatcher does to the services it attaches and detaches (reloads, fleets).

``served`` is a fixture: import ``served_fixture`` into the test module (``# noqa: F401``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from linchkit_plugin import Plugin
from linchkit_plugin.grpc_server import PluginServer
from linchkit_plugin.host import PluginHost

__all__ = ["Instance", "Recording", "Serve", "connections_to", "served_fixture"]


class Recording(Plugin):
    """Records its lifecycle and each ``Init``'s config; answers with the host it serves
    on; ``shout`` emits an event. ``timeline`` holds the lifecycle steps and the ``linger``
    calls in the order the plugin saw them begin and end: what runs under what."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.steps: list[str] = []
        self.configs: list[dict[str, Any]] = []
        self.timeline: list[str] = []
        #: Seconds each ``Init`` takes from now on: one still under way when the test acts.
        self.init_takes = 0.0
        #: The same for each ``Stop`` (recorded when it begins).
        self.stop_takes = 0.0

    async def init(self, config: dict[str, Any]) -> None:
        self.steps.append("init")
        self.configs.append(config)
        self.timeline.append(f"init {config}")
        await asyncio.sleep(self.init_takes)

    async def start(self) -> None:
        self.steps.append("start")
        self.timeline.append("start")

    async def stop(self) -> None:
        self.steps.append("stop")
        self.timeline.append("stop")
        await asyncio.sleep(self.stop_takes)

    async def destroy(self) -> None:
        self.steps.append("destroy")
        self.timeline.append("destroy")

    async def whoami(self) -> str:
        return self.host

    async def shout(self) -> None:
        self.emit("shouted", self.host)

    async def linger(self, seconds: float) -> str:
        """Answer after ``seconds``: a call still in flight when a reload or a close comes."""
        self.timeline.append(f"linger {seconds} begins")
        await asyncio.sleep(seconds)
        self.timeline.append(f"linger {seconds} ends")
        return self.host


class Instance:
    """One gRPC plugin service on ``host:port``, in this loop."""

    def __init__(self, host: str, port: int, version: str, plugin_id: str = "fleet") -> None:
        self.address = f"{host}:{port}"
        self.plugin = Recording(host)
        self.stop = asyncio.Event()
        server = PluginServer(PluginHost(self.plugin), plugin_id=plugin_id, version=version)
        loop = asyncio.get_running_loop()
        self.bound: asyncio.Future[int] = loop.create_future()
        self.task = loop.create_task(
            server.serve(self.address, on_ready=self.bound.set_result, stop=self.stop)
        )

    async def end(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


#: ``await served(host, port, version="1.0.0", plugin_id="fleet")``: an ``Instance``, bound and serving.
Serve = Callable[..., Any]


def connections_to(address: str) -> int:
    """Established TCP connections to ``address`` (``host:port``) on this machine, over
    IPv4 or IPv6 sockets (gRPC's are often IPv6, the address then IPv4-mapped)."""
    host, _, port = address.rpartition(":")
    ipv4 = socket.inet_aton(host)[::-1].hex().upper()
    wanted = {f"{ipv4}:{int(port):04X}", f"0000000000000000FFFF0000{ipv4}:{int(port):04X}"}
    lines = [
        line.split()
        for table in ("/proc/net/tcp", "/proc/net/tcp6")
        for line in Path(table).read_text().splitlines()[1:]
    ]
    return sum(1 for fields in lines if fields[2] in wanted and fields[3] == "01")


@pytest.fixture(name="served")
async def served_fixture() -> AsyncIterator[Serve]:
    started: list[Instance] = []

    async def serve(
        host: str, port: int, version: str = "1.0.0", plugin_id: str = "fleet"
    ) -> Instance:
        instance = Instance(host, port, version, plugin_id)
        started.append(instance)
        await asyncio.wait_for(instance.bound, 10)
        return instance

    yield serve
    for instance in started:
        await instance.end()
