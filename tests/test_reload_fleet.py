"""gRPC fleets whose instances DNS discovery brings (a real dnsmasq): each instance joins
once and has one ``Init``.

The instances are the Python SDK's gRPC server, served in this loop on 127.0.0.2 and .3
(one port for both, as an A record names one port) with ``lifecycle: dispatcher``: each
records its ``Init``/``Start``/``Stop``/``Destroy``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dispatcher import Dispatcher
from linchkit_plugin import Plugin
from linchkit_plugin.grpc_server import PluginServer
from linchkit_plugin.host import PluginHost
from tests.conftest import manifest
from tests.dns_server import (
    Dnsmasq,
    Zone,
    dnsmasq_fixture,  # noqa: F401  (the fixture `dnsmasq`)
    needs_dnsmasq,
)

pytestmark = needs_dnsmasq

StartDnsmasq = Callable[[Zone], Dnsmasq]
V1_HOSTS = ("127.0.0.2", "127.0.0.3")
METHODS = {"whoami": {"timeout_ms": 10_000}}


class Recording(Plugin):
    """Records its lifecycle; answers with the host it serves on."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.steps: list[str] = []

    async def init(self, config: dict[str, Any]) -> None:
        self.steps.append("init")

    async def start(self) -> None:
        self.steps.append("start")

    async def stop(self) -> None:
        self.steps.append("stop")

    async def destroy(self) -> None:
        self.steps.append("destroy")

    async def whoami(self) -> str:
        return self.host


class Instance:
    """One gRPC plugin service on ``host:port``, in this loop."""

    def __init__(self, host: str, port: int, version: str) -> None:
        self.address = f"{host}:{port}"
        self.plugin = Recording(host)
        self.stop = asyncio.Event()
        server = PluginServer(PluginHost(self.plugin), plugin_id="fleet", version=version)
        loop = asyncio.get_running_loop()
        self.bound: asyncio.Future[int] = loop.create_future()
        self.task = loop.create_task(
            server.serve(self.address, on_ready=self.bound.set_result, stop=self.stop)
        )

    async def end(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


def port_free_on(*hosts: str) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every loopback host")


@pytest.fixture
async def served() -> AsyncIterator[Callable[[str, int, str], Any]]:
    started: list[Instance] = []

    async def serve(host: str, port: int, version: str = "1.0.0") -> Instance:
        instance = Instance(host, port, version)
        started.append(instance)
        await asyncio.wait_for(instance.bound, 10)
        return instance

    yield serve
    for instance in started:
        await instance.end()


def fleet(version: str, instances: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "fleet",
        "version": version,
        "target": {
            "provider": "grpc",
            "instances": instances,
            "lifecycle": "dispatcher",
            "connect_timeout_ms": 10_000,
        },
        "methods": METHODS,
    }


async def test_each_discovered_instance_joins_once_and_has_one_init(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    port = port_free_on(*V1_HOSTS)
    v1 = [await served(host, port) for host in V1_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = {"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}
    async with Dispatcher(manifest(fleet("1.0.0", [source]))) as dispatcher:
        # The first read's reconcile and the watching task's ran side by side: both found
        # the instances absent while the other's Init was under way, and joined them twice.
        (stats,) = dispatcher.stats()["fleets"].values()
        assert sorted(each["target"] for each in stats["instances"]) == [
            f"grpc {each.address}" for each in v1
        ]
        assert [each.plugin.steps for each in v1] == [["init", "start"]] * 2
    assert [each.plugin.steps for each in v1] == [["init", "start", "stop", "destroy"]] * 2
