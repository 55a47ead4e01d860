"""The Python SDK's gRPC server at a stop (``linchkit_plugin.grpc_server``), in this loop
on 127.0.0.1 port 0, called with a plain grpc.aio stub as a host would.

grpc core cancels, unseen, every call it holds but has not handed to the service when
shutdown begins (grpc/grpc#41785). So once told to stop, the server refuses each call it
is handed as not run (UNAVAILABLE, trailer ``linchkit-not-run``), and shuts down only when
calls have stopped arriving; calls already running finish. The dispatcher's side and the
whole stop under load: tests/test_grpc_provider.py, tests/conformance/test_graceful_stop.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import orjson
import pytest

from linchkit_plugin import grpc_server
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from linchkit_plugin.grpc_server import PluginServer
from linchkit_plugin.handshake import NOT_RUN_TRAILER
from linchkit_plugin.host import PluginHost


class Counting:
    def __init__(self) -> None:
        self.ran = 0

    async def echo(self, n: int = 0) -> Any:
        self.ran += 1
        return {"n": n}

    async def slow(self, seconds: float) -> str:
        self.ran += 1
        await asyncio.sleep(seconds)
        return "done"


class Served:
    def __init__(self, plugin: Counting, stub: Any, stop: asyncio.Event, task: Any) -> None:
        self.plugin = plugin
        self.stub = stub
        self.stop = stop
        self.task = task

    async def call(self, method: str, params: Any) -> Any:
        request = plugin_pb2.CallRequest(
            v=1, plugin="counting", method=method, params_json=orjson.dumps(params)
        )
        reply = await self.stub.Call(request, timeout=10)
        assert reply.ok, reply
        return orjson.loads(reply.result_json)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    plugin = Counting()
    server = PluginServer(
        PluginHost(plugin), plugin_id="counting", version="1.0.0", serving_from_start=True
    )
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve("127.0.0.1:0", on_ready=bound.set_result, stop=stop))
    port = await asyncio.wait_for(bound, 10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Served(plugin, plugin_pb2_grpc.PluginServiceStub(channel), stop, task)
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_once_stopping_a_call_is_refused_as_not_run_and_the_method_never_runs(
    served: Served,
) -> None:
    assert await served.call("echo", {"n": 1}) == {"n": 1}
    served.stop.set()
    await asyncio.sleep(0.02)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.call("echo", {"n": 2})
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (NOT_RUN_TRAILER, "stopping") in tuple(refused.value.trailing_metadata() or ())
    assert served.plugin.ran == 1


async def test_a_call_running_when_the_stop_comes_finishes_and_is_answered(
    served: Served,
) -> None:
    running = asyncio.create_task(served.call("slow", {"seconds": 0.5}))
    while served.plugin.ran == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    served.stop.set()
    assert await running == "done"
    await asyncio.wait_for(served.task, 10)


async def test_the_server_shuts_down_only_once_calls_stop_arriving(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutting down while a host still sends would cancel what grpc core holds: the
    server waits for a quiet ``STOP_QUIET_SECONDS`` (at most ``STOP_QUIET_MOST_SECONDS``)."""
    monkeypatch.setattr(grpc_server, "STOP_QUIET_MOST_SECONDS", 30.0)
    served.stop.set()
    until = time.monotonic() + 1.0
    refused = 0
    while time.monotonic() < until:  # a host that keeps sending for a second
        with pytest.raises(grpc.aio.AioRpcError):
            await served.call("echo", {})
        refused += 1
        await asyncio.sleep(0.01)
    assert not served.task.done()  # still refusing, not shut down under the calls
    stopped_sending = time.monotonic()
    await asyncio.wait_for(served.task, 10)
    quiet = time.monotonic() - stopped_sending
    assert grpc_server.STOP_QUIET_SECONDS * 0.9 <= quiet < grpc_server.STOP_QUIET_SECONDS + 3
    assert refused > 10 and served.plugin.ran == 0
