"""``provider: grpc`` with ``lifecycle: dispatcher`` against the Python SDK's gRPC server,
served in this loop on 127.0.0.1: a service restarted at the same address (a redeploy)
gets ``Init`` and ``Start`` again before any call reaches it, and the host's ``Stop`` and
``Destroy`` at close follow an ``Init`` on every process that gets them; a failed ``Init``
is the plugin's refusal, not an outage, whichever SDK's words it comes in; an ``Init``
that times out is cancelled and gets no ``Stop`` or ``Destroy``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import grpc.aio
import pytest

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    Overloaded,
    ProviderError,
    TargetUnavailable,
)
from dispatcher.fleet import never_sent
from linchkit_plugin import Plugin, _grpc_hosts
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from linchkit_plugin.errors import PluginError
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


class BadConfig(Configured):
    async def init(self, config: dict[str, Any]) -> None:
        self.steps.append("init")
        raise PluginError("region is missing", remote_type="BadConfig", retryable=False)


class SlowInit(Configured):
    async def init(self, config: dict[str, Any]) -> None:
        self.steps.append("init")
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.steps.append("init cancelled")
            raise


class FailingStart(Configured):
    async def start(self) -> None:
        self.steps.append("start")
        raise PluginError("the database is down", remote_type="NoDatabase")


class Process:
    """One run of the plugin's service at ``port``: what a process of it would be."""

    def __init__(self, port: int, plugin: Configured | None = None) -> None:
        self.plugin = plugin or Configured()
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


def owned(port: int, **extra: Any) -> Any:
    return manifest(
        {
            "id": "configured",
            "version": "1.0.0",
            "config": {"region": ""},
            "target": {
                "provider": "grpc",
                "address": f"127.0.0.1:{port}",
                "lifecycle": "dispatcher",
            },
            "methods": {"settings": {}},
            **extra,
        }
    )


def assert_init_refused(error: ProviderError) -> None:
    assert not error.retryable
    assert "the plugin failed its Init: BadConfig: region is missing" in error.message
    assert error.details["step"] == "Init"
    assert error.details["error_type"] == "BadConfig"


async def test_a_failed_init_is_the_plugins_refusal_not_an_outage() -> None:
    port = free_port()
    process = Process(port, BadConfig())
    try:
        await asyncio.wait_for(process.bound, 10)
        with pytest.raises(ProviderError) as refused:
            async with Dispatcher(owned(port)):
                pass
        assert_init_refused(refused.value)
        assert process.plugin.steps == ["init"]  # never started, so never stopped
    finally:
        await process.end()


class AnsweringInit(plugin_pb2_grpc.PluginServiceServicer):  # type: ignore[misc]
    """Answers ``Init`` with the status and words an SDK sends for a failing hook."""

    def __init__(self, status: grpc.StatusCode, details: str) -> None:
        self.status = status
        self.details = details

    async def Describe(self, request: Any, context: Any) -> Any:
        return plugin_pb2.PluginInfo(id="configured", version="1.0.0", protocol_version=1)

    async def Init(self, request: Any, context: Any) -> Any:
        await context.abort(self.status, self.details)


@pytest.mark.parametrize(
    ("status", "details"),
    [
        # Java and TypeScript plugins built before they answered as the others do.
        (grpc.StatusCode.INTERNAL, "BadConfig: region is missing"),
        (grpc.StatusCode.FAILED_PRECONDITION, "init hook failed: BadConfig: region is missing"),
    ],
    ids=["older-java-typescript", "go-rust-java-typescript"],
)
async def test_a_failed_init_reads_alike_in_every_sdks_words(
    status: grpc.StatusCode, details: str
) -> None:
    server = grpc.aio.server()
    plugin_pb2_grpc.add_PluginServiceServicer_to_server(AnsweringInit(status, details), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with pytest.raises(ProviderError) as refused:
            async with Dispatcher(owned(port)):
                pass
        assert_init_refused(refused.value)
    finally:
        await server.stop(grace=None)


async def test_a_service_full_of_hosts_refuses_init_as_overloaded_not_as_a_rate_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: RESOURCE_EXHAUSTED on Init read as for a call, RateLimited, as if the host
    # had called too often.
    monkeypatch.setattr(_grpc_hosts, "MAX_HOSTS", 1)
    port = free_port()
    process = Process(port)
    try:
        await asyncio.wait_for(process.bound, 10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await plugin_pb2_grpc.PluginServiceStub(channel).Init(
                plugin_pb2.InitRequest(config_json=b"{}"),
                metadata=(("linchkit-host", "another-replica"),),
                timeout=10,
            )
        with pytest.raises(Overloaded) as refused:
            async with Dispatcher(owned(port)):
                pass
        assert refused.value.retryable
        assert "already holds as many hosts as it takes" in refused.value.message
        assert refused.value.details == {"step": "Init", "status": "RESOURCE_EXHAUSTED"}
        assert process.plugin.steps == ["init"]  # the other replica's, and no Destroy
    finally:
        await process.end()


async def test_an_init_refused_for_want_of_capacity_says_so_not_that_hosts_are_full() -> None:
    # Before: every RESOURCE_EXHAUSTED on Init was a service full of hosts, whatever it said.
    server = grpc.aio.server()
    refusal = AnsweringInit(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
    plugin_pb2_grpc.add_PluginServiceServicer_to_server(refusal, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with pytest.raises(Overloaded) as refused:
            async with Dispatcher(owned(port)):
                pass
    finally:
        await server.stop(grace=None)
    assert refused.value.retryable
    assert "at its limit of concurrent calls" in refused.value.message
    assert "hosts" not in refused.value.message
    assert refused.value.details == {"step": "Init", "status": "RESOURCE_EXHAUSTED"}


async def test_an_init_that_times_out_is_cancelled_and_gets_no_stop_or_destroy() -> None:
    port = free_port()
    process = Process(port, SlowInit())
    try:
        await asyncio.wait_for(process.bound, 10)
        with pytest.raises(DeadlineExceeded):
            async with Dispatcher(owned(port, lifecycle={"init_timeout_ms": 300})):
                pass
        await asyncio.sleep(0.3)  # what the host might still send would have come by now
        assert process.plugin.steps == ["init", "init cancelled"]
    finally:
        await process.end()


async def test_a_failed_start_gets_destroy_for_the_init_that_succeeded() -> None:
    port = free_port()
    process = Process(port, FailingStart())
    try:
        await asyncio.wait_for(process.bound, 10)
        with pytest.raises(ProviderError) as refused:
            async with Dispatcher(owned(port)):
                pass
        assert "the plugin failed its Start: NoDatabase: the database is down" in str(refused.value)
        assert process.plugin.steps == ["init", "start", "destroy"]
    finally:
        await process.end()


async def test_a_restarted_service_whose_init_fails_fails_calls_with_that_error() -> None:
    port = free_port()
    first = Process(port)
    second: Process | None = None
    try:
        await asyncio.wait_for(first.bound, 10)
        async with Dispatcher(owned(port)) as dispatcher:
            assert await dispatcher.call("configured", "settings", {}) == {"region": ""}
            await first.end()
            second = Process(port, BadConfig())  # the redeploy brought a build that refuses
            await asyncio.wait_for(second.bound, 10)
            for _ in range(100):
                try:
                    await dispatcher.call("configured", "settings", {})
                except TargetUnavailable as error:
                    assert never_sent(error), error
                    await asyncio.sleep(0.05)
                    continue
                except ProviderError as error:
                    assert_init_refused(error)
                    assert "the connection to the plugin was lost and is back" in error.message
                    break
                pytest.fail("a call reached a service whose Init failed")
            else:
                pytest.fail("the restarted service was never tried")
            assert second.plugin.steps == ["init"]  # its settings never ran
        assert second.plugin.steps == ["init"]  # nor Stop and Destroy, without an Init
    finally:
        for process in (first, second):
            if process is not None and not process.task.done():
                await process.end()


async def test_a_plugin_left_without_calls_is_not_initialised_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """grpc lets a channel without calls go idle (after 30 minutes by default) and connects
    it again on the next call: to the host that looks like the plugin found again, which
    gets Init and Start anew. Shown here with an idle timeout of 1 s (grpc's least); the channels the
    dispatcher opens never go idle (``CLIENT_IDLE_TIMEOUT_MS``)."""
    from providers._grpc import channel

    options = dict(channel._CHANNEL_OPTIONS)
    assert options["grpc.client_idle_timeout_ms"] == channel.CLIENT_IDLE_TIMEOUT_MS >= 86_400_000
    port = free_port()
    process = Process(port)
    try:
        await asyncio.wait_for(process.bound, 10)
        monkeypatch.setattr(
            channel,
            "_CHANNEL_OPTIONS",
            list({**options, "grpc.client_idle_timeout_ms": 1000}.items()),
        )
        # No Events stream: it is a call that never ends, which keeps a channel from idling.
        spec = manifest(
            {
                "id": "configured",
                "version": "1.0.0",
                "target": {
                    "provider": "grpc",
                    "address": f"127.0.0.1:{port}",
                    "lifecycle": "dispatcher",
                    "events": False,
                },
                "methods": {"settings": {}},
            }
        )
        async with Dispatcher(spec) as dispatcher:
            await dispatcher.call("configured", "settings", {})
            await asyncio.sleep(3.0)  # idle (grpc idles a channel after 1 s at the least)
            await dispatcher.call("configured", "settings", {})
        assert process.plugin.steps.count("init") == 2, process.plugin.steps
    finally:
        await process.end()
