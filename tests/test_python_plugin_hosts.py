"""The Python SDK's count of hosts on one service, where a race could break it: Inits of
new hosts that arrive together, while the plugin's ``init`` hook is still running, each
hold a place, so no more than ``MAX_HOSTS`` are ever admitted (docs/protocol.md, "Several
hosts on one service"). The conformance suite holds every SDK to the rest.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import grpc
import grpc.aio
import pytest

from linchkit_plugin import Plugin, _grpc_hosts
from linchkit_plugin._grpc_hosts import MAX_HOSTS
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from linchkit_plugin.grpc_server import PluginServer
from linchkit_plugin.host import PluginHost
from tests.services import until


class SlowInit(Plugin):
    """Its ``init`` waits until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.inits = 0

    async def init(self, config: dict[str, Any]) -> None:
        self.inits += 1
        await self.release.wait()


async def test_inits_of_new_hosts_arriving_together_never_pass_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bound of 16, not 1,024: the logic is the same, and 1,032 streams at once on one
    # channel once had grpc cancel one of them on a loaded machine.
    bound_of_hosts = 16
    monkeypatch.setattr(_grpc_hosts, "MAX_HOSTS", bound_of_hosts)
    plugin = SlowInit()
    server = PluginServer(PluginHost(plugin), plugin_id="slow", version="1.0.0")
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(server.serve("127.0.0.1:0", on_ready=bound.set_result, stop=stop))
    port = await asyncio.wait_for(bound, 10)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await asyncio.wait_for(channel.channel_ready(), 10)
    stub = plugin_pb2_grpc.PluginServiceStub(channel)

    async def init(host: str) -> grpc.StatusCode:
        try:
            await stub.Init(
                plugin_pb2.InitRequest(config_json=b"{}"),
                metadata=(("linchkit-host", host),),
                timeout=60,
                wait_for_ready=True,  # a loaded machine once failed one as it connected
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    try:
        inits = [asyncio.create_task(init(f"h{index}")) for index in range(bound_of_hosts + 8)]
        # Every admitted Init is now inside the hook; the rest were refused at the door.
        await until(
            lambda: plugin.inits + sum(task.done() for task in inits) == len(inits),
            "every Init inside the hook or refused",
            timeout=60,
        )
        plugin.release.set()
        codes = Counter(await asyncio.gather(*inits))
        # Before: the check and the add straddled the hook, so all of them got in.
        assert codes == {
            grpc.StatusCode.OK: bound_of_hosts,
            grpc.StatusCode.RESOURCE_EXHAUSTED: 8,
        }
        assert plugin.inits == bound_of_hosts
    finally:
        await channel.close()
        stop.set()
        await asyncio.wait_for(serving, 10)


@pytest.mark.parametrize("failing", [True, False])
async def test_a_failed_init_gives_its_place_back(failing: bool) -> None:
    from linchkit_plugin._grpc_hosts import AttachedHosts

    hosts = AttachedHosts()
    for index in range(MAX_HOSTS - 1):
        assert hosts.join(f"h{index}")
        hosts.joined(f"h{index}", True)
    assert hosts.join("last")
    assert not hosts.join("one-more")  # "last" holds the place while its Init runs
    hosts.joined("last", not failing)
    assert hosts.join("one-more") is failing
