"""Several hosts on one service, in every SDK (docs/protocol.md, "Several hosts on one
service"): the example plugin served with ``serve --address``, attached at once by two
dispatchers with ``lifecycle: dispatcher`` (the replicas of a host, or one host and the
next in a rolling restart), and by a raw client standing for a host that predates the
``linchkit-host`` metadata or lies in it.

A host that detaches (``Stop``, ``Destroy``) while another is attached must leave the
plugin serving the other: before, its ``Stop`` ran the plugin's hook under the other's
calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from dispatcher import Dispatcher
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from tests.conformance.conftest import (
    CONFIG,
    LANGUAGES,
    START_TIMEOUT,
    _start_service,
    _stop_service,
    executable,
)
from tests.conformance.test_java_sdk import manifest as example_manifest

#: What a service tracks at most (docs/protocol.md).
MAX_HOSTS = 1024


@pytest.fixture(params=LANGUAGES)
async def service(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The example plugin of one language in service mode; its address."""
    process, address = await _start_service(executable(request.param))
    try:
        yield address
    finally:
        await _stop_service(process)


def manifest(target: dict[str, Any], config: dict[str, Any]) -> Any:
    return example_manifest(target, config, methods=("echo", "config", "hooks"))


async def stops(dispatcher: Dispatcher) -> tuple[int, int]:
    """How many times the plugin's ``stop`` and ``destroy`` hooks ran."""
    hooks = await dispatcher.call("example", "hooks", {})
    return hooks["stop"], hooks["destroy"]


def target(address: str) -> dict[str, Any]:
    return {
        "provider": "grpc",
        "address": address,
        "lifecycle": "dispatcher",
        "connect_timeout_ms": int(START_TIMEOUT * 1000),
    }


async def echoed(dispatcher: Dispatcher) -> Any:
    return await dispatcher.call("example", "echo", {"still": "served"})


class RawHost:
    """Lifecycle RPCs sent by hand, with ``linchkit-host`` as given (None: none sent)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = plugin_pb2_grpc.PluginServiceStub(self.channel)

    async def send(self, step: str, host: str | None) -> None:
        request = (
            plugin_pb2.InitRequest(config_json=b'{"region": "eu"}')
            if step == "Init"
            else plugin_pb2.LifecycleRequest()
        )
        metadata = () if host is None else (("linchkit-host", host),)
        await getattr(self.stub, step)(request, metadata=metadata, timeout=START_TIMEOUT)

    async def aclose(self) -> None:
        await self.channel.close()


async def test_a_host_that_detaches_leaves_the_plugin_serving_another(service: str) -> None:
    async with Dispatcher(manifest(target(service), CONFIG)) as first:
        async with Dispatcher(manifest(target(service), CONFIG)) as second:
            assert await echoed(second) == {"still": "served"}
        # The second host sent Stop and Destroy: no hook ran under the first's calls.
        assert await stops(first) == (0, 0)
        assert await echoed(first) == {"still": "served"}
        assert await first.call("example", "config", {}) == CONFIG
    # Both left: the last one's Stop and Destroy ran the hooks, once; a host attaching
    # now runs the lifecycle anew.
    config = {**CONFIG, "host": "third"}
    async with Dispatcher(manifest(target(service), config)) as third:
        assert await stops(third) == (1, 1)
        assert await third.call("example", "config", {}) == config


async def test_a_host_without_the_metadata_counts_as_one_host(service: str) -> None:
    legacy = RawHost(service)
    try:
        await legacy.send("Init", None)
        await legacy.send("Start", None)
        async with Dispatcher(manifest(target(service), CONFIG)) as dispatcher:
            await legacy.send("Stop", None)
            await legacy.send("Destroy", None)
            assert await stops(dispatcher) == (0, 0)
            assert await echoed(dispatcher) == {"still": "served"}
    finally:
        await legacy.aclose()


@pytest.mark.parametrize("host", ["x" * 65, "bad id", "", "a/b"])
async def test_a_host_id_off_the_contract_is_refused_before_any_hook(
    service: str, host: str
) -> None:
    raw = RawHost(service)
    try:
        async with Dispatcher(manifest(target(service), CONFIG)) as dispatcher:
            for step in ("Init", "Stop", "Destroy"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await raw.send(step, host)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, step
            # No hook ran: the plugin still serves the dispatcher, with its config.
            assert await stops(dispatcher) == (0, 0)
            assert await dispatcher.call("example", "config", {}) == CONFIG
    finally:
        await raw.aclose()


async def test_a_service_tracks_at_most_1024_hosts(service: str) -> None:
    raw = RawHost(service)
    try:
        hosts = [f"h{index}" for index in range(MAX_HOSTS)]
        for host in hosts:
            await raw.send("Init", host)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await raw.send("Init", "one-more")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for host in hosts[:-1]:
            await raw.send("Destroy", host)
        # One host left: another may join again, and the last to leave still owns it.
        async with Dispatcher(manifest(target(service), CONFIG)) as dispatcher:
            await raw.send("Stop", hosts[-1])
            await raw.send("Destroy", hosts[-1])
            assert await stops(dispatcher) == (0, 0)
            assert await echoed(dispatcher) == {"still": "served"}
    finally:
        await raw.aclose()
