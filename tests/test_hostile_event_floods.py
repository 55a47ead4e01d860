"""A plugin that floods events faster than the host's handlers finish: real grpc.aio
``PluginService`` servers on loopback (the project's stubs) stream ``Events`` as fast as
gRPC carries them, to a host whose ``Dispatcher.on`` handler is a coroutine still busy.

A handler's coroutine runs as a task of its own; a plugin's events may keep at most
``MAX_RUNNING_HANDLERS_PER_PLUGIN`` of them running, the rest are dropped and counted, so
the host's memory stays bounded whatever the plugin sends, and another plugin's events
still reach their handlers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dispatcher import Dispatcher, ManifestError
from dispatcher._events import MAX_RUNNING_HANDLERS_PER_PLUGIN
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from tests.conftest import manifest
from tests.hostile_peers import grpc_plugin
from tests.services import until

#: More than the host lets run at once.
FLOOD = MAX_RUNNING_HANDLERS_PER_PLUGIN + 2_000


class EmittingPlugin(plugin_pb2_grpc.PluginServiceServicer):
    """Streams ``at_once`` events as its ``Events`` opens, then one more per call."""

    def __init__(self, at_once: int) -> None:
        self.at_once = at_once
        self.more: asyncio.Queue[str] = asyncio.Queue()

    async def Call(self, request: Any, context: Any) -> Any:
        await self.more.put(request.method)
        return plugin_pb2.CallReply(ok=True, result_json=b"null")

    async def Events(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        for _ in range(self.at_once):
            yield plugin_pb2.PluginEvent(name="spam", data_json=b'{"x": 1}')
        while True:
            yield plugin_pb2.PluginEvent(name=await self.more.get(), data_json=b"null")


def entry(plugin_id: str, address: str) -> dict[str, Any]:
    return {
        "id": plugin_id,
        "version": "1.0.0",
        "target": {"provider": "grpc", "address": address},
        "methods": {"hello": {}},
    }


async def test_an_event_flood_keeps_a_bounded_number_of_handlers_running() -> None:
    """Before: every event of the flood became a task still running (12,000 here, growing
    with whatever the plugin sent: some 25 MB a second on this machine)."""
    release = asyncio.Event()
    started = 0
    calm: list[str] = []

    async def busy(event: str, data: Any) -> None:
        nonlocal started
        started += 1
        await release.wait()  # the host's handler is behind: a store that is slow, say

    async def noted(event: str, data: Any) -> None:
        calm.append(event)

    async with (
        grpc_plugin(EmittingPlugin(at_once=FLOOD)) as flooding,
        grpc_plugin(EmittingPlugin(at_once=0)) as quiet,
    ):
        d = Dispatcher(manifest(entry("flood", flooding), entry("calm", quiet)))
        d.on("flood", "spam", busy)  # before it starts: the flood comes as Events opens
        d.on("calm", "hello", noted)
        async with d:

            def delivered() -> bool:
                dropped = d.stats().get("events", {}).get("handler_events_dropped", 0)
                return started + dropped >= FLOOD

            await until(delivered, "the flood delivered, run or dropped")
            assert started == MAX_RUNNING_HANDLERS_PER_PLUGIN
            events = d.stats()["events"]
            assert events["handler_events_dropped"] == FLOOD - MAX_RUNNING_HANDLERS_PER_PLUGIN
            assert events["handlers_running"] == MAX_RUNNING_HANDLERS_PER_PLUGIN
            # The flood's plugin fills its own share, not every plugin's.
            await d.call("calm", "hello")
            await until(lambda: calm == ["hello"], "the other plugin's event handled")
            release.set()
            await until(lambda: d.stats()["events"]["handlers_running"] == 0, "handlers done")


async def test_an_event_flood_beyond_the_rate_is_dropped_before_decoding_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plugin sends 3,000 events as fast as gRPC carries them to a target that takes 200
    a second. Before: every one was decoded and handed to the handlers, however fast the
    plugin sent (gRPC's flow control bounds the memory a flood holds, not the CPU it
    costs). Now what is over the rate (a second's worth in a burst, then the rate) is
    dropped before its data is read, counted, and said in a log line, as on WebSocket."""
    flood, rate = 3_000, 200
    received = 0

    def count(event: str, data: Any) -> None:
        nonlocal received
        received += 1

    async with grpc_plugin(EmittingPlugin(at_once=flood)) as flooding:
        target = {"provider": "grpc", "address": flooding, "max_events_per_second": rate}
        d = Dispatcher(manifest({**entry("flood", flooding), "target": target}))
        d.on("flood", "spam", count)
        started = time.monotonic()
        async with d:
            (connection,) = d.providers["grpc"]._connections.values()  # type: ignore[attr-defined]
            events = connection._events

            await until(lambda: received + events.events_dropped >= flood, "the flood read")
            elapsed = time.monotonic() - started
            assert received <= rate + rate * elapsed + 1, (received, elapsed)
            assert events.events_dropped == flood - received > 0
            assert events.counters()["events_dropped"] == events.events_dropped
    assert any(
        "faster than max_events_per_second" in record.getMessage() for record in caplog.records
    )


@pytest.mark.parametrize("provider", ["grpc", "subprocess"])
@pytest.mark.parametrize("rate", [0, -5, "fast", 1.5, None])
def test_a_malformed_event_rate_is_refused_at_load(provider: str, rate: Any) -> None:
    """``max_events_per_second`` of a gRPC or subprocess target: a rate that admits no
    event, a negative one, a word, a fraction or null is the manifest's error, naming the
    field, not a target that drops every event or fails at its first one."""
    target: dict[str, Any] = (
        {"provider": "grpc", "address": "127.0.0.1:1"}
        if provider == "grpc"
        else {"provider": "subprocess", "command": ["true"]}
    )
    target["max_events_per_second"] = rate
    with pytest.raises(ManifestError, match="max_events_per_second"):
        manifest({**entry("flood", "127.0.0.1:1"), "target": target})
