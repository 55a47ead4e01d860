"""Bearer-token authentication of every SDK's gRPC service (docs/protocol.md, "gRPC binding").

The example plugin in service mode, started with ``LINCHKIT_PLUGIN_TOKEN`` or
``LINCHKIT_PLUGIN_TOKEN_FILE``: every RPC of the plugin service needs metadata
``authorization: Bearer <token>`` (else ``UNAUTHENTICATED``, which the dispatcher raises as
``Unauthorized``), the health service answers without it, and the token never reaches the
plugin's stderr. Without a token the service works and warns on stderr; in subprocess
mode AutoMTLS authenticates the host and the token variables are not read.

A target's ``metadata`` travels with every RPC the dispatcher makes (calls, Describe, the
lifecycle RPCs with ``lifecycle: dispatcher``, the ``Events`` stream); the raw checks below
also call each RPC themselves, without it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dispatcher import Dispatcher, Unauthorized, parse_manifest
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from tests.conformance.conftest import (
    LANGUAGES,
    START_TIMEOUT,
    _start_service,
    _stop_service,
    executable,
)
from tests.conftest import ROOT

pytestmark = pytest.mark.parametrize("language", LANGUAGES)

TOKEN_VARIABLES = ("LINCHKIT_PLUGIN_TOKEN", "LINCHKIT_PLUGIN_TOKEN_FILE")
WARNING = "LINCHKIT_PLUGIN_TOKEN"  # the no-token warning names the variables


class Service:
    """A running ``example-plugin serve`` and everything it wrote to stderr."""

    def __init__(self, process: asyncio.subprocess.Process, address: str) -> None:
        self.process = process
        self.address = address
        assert process.stderr is not None
        self._stderr = asyncio.create_task(process.stderr.read())

    async def stop(self) -> str:
        await _stop_service(self.process)
        return (await self._stderr).decode(errors="replace")


def _environment(**token: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in TOKEN_VARIABLES}
    return {**environment, **token}


@asynccontextmanager
async def _service(language: str, **token: str) -> AsyncIterator[Service]:
    process, address = await _start_service(
        executable(language), _environment(**token), stderr=asyncio.subprocess.PIPE
    )
    service = Service(process, address)
    try:
        yield service
    finally:
        await service.stop()


def _dispatcher(
    address: str, metadata: dict[str, str] | None = None, *, owned: bool = False
) -> Dispatcher:
    """A dispatcher calling the service; ``owned``: it also runs the plugin's lifecycle and
    opens its Events stream, so those RPCs carry the metadata too."""
    target: dict[str, Any] = {
        "provider": "grpc",
        "address": address,
        "lifecycle": "dispatcher" if owned else "remote",
        "events": owned,
        "connect_timeout_ms": int(START_TIMEOUT * 1000),
    }
    if metadata is not None:
        target["metadata"] = metadata
    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "example",
                    "version": "1.0.0",
                    "target": target,
                    "defaults": {"timeout_ms": 10_000},
                    "methods": {"echo": {}, "count": {}},
                }
            ],
        },
        base_dir=ROOT,
    )
    return Dispatcher(manifest)


async def _raw_refusals(address: str, authorization: str | None) -> list[grpc.aio.AioRpcError]:
    """Every kind of plugin-service RPC, sent raw with ``authorization`` (or none): the errors."""
    metadata = () if authorization is None else (("authorization", authorization),)
    errors: list[grpc.aio.AioRpcError] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = plugin_pb2_grpc.PluginServiceStub(channel)
        request = plugin_pb2.CallRequest(v=1, plugin="example", method="echo", params_json=b"1")
        unary: list[Any] = [
            stub.Describe(plugin_pb2.DescribeRequest(), metadata=metadata, timeout=10),
            stub.Init(plugin_pb2.InitRequest(config_json=b"{}"), metadata=metadata, timeout=10),
            stub.Start(plugin_pb2.LifecycleRequest(), metadata=metadata, timeout=10),
            stub.Stop(plugin_pb2.LifecycleRequest(), metadata=metadata, timeout=10),
            stub.Destroy(plugin_pb2.LifecycleRequest(), metadata=metadata, timeout=10),
            stub.Call(request, metadata=metadata, timeout=10),
            stub.CallBatch(plugin_pb2.BatchRequest(calls=[request]), metadata=metadata, timeout=10),
        ]
        for call in unary:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            errors.append(caught.value)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.CallStream(request, metadata=metadata, timeout=10):
                pass
        errors.append(caught.value)
        events = stub.Events(iter(()), metadata=metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in events:
                pass
        errors.append(caught.value)
    return errors


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return int(answer.status)


@pytest.mark.parametrize("source", ["env", "file"])
async def test_a_token_guards_every_rpc_but_health(
    language: str, source: str, tmp_path: Path
) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    wrong = "tok-" + secrets.token_urlsafe(24)
    if source == "file":
        token_file = tmp_path / "token"
        token_file.write_text(f"  {token}\n")
        environment = {"LINCHKIT_PLUGIN_TOKEN_FILE": str(token_file)}
    else:
        environment = {"LINCHKIT_PLUGIN_TOKEN": token}

    async with _service(language, **environment) as service:
        # Without metadata, and with a wrong token: Unauthorized, on a call and a stream.
        for metadata in (None, {"authorization": f"Bearer {wrong}"}):
            async with _dispatcher(service.address, metadata) as dispatcher:
                with pytest.raises(Unauthorized) as caught:
                    await dispatcher.call("example", "echo", {"x": 1})
                assert wrong not in str(caught.value)
                with pytest.raises(Unauthorized):
                    async for _ in dispatcher.stream("example", "count", {"n": 2}):
                        pass
        # Every RPC of the plugin service, raw: UNAUTHENTICATED without the right token, and
        # the refusal does not echo what was sent.
        for authorization in (None, f"Bearer {wrong}", wrong, f"Basic {token}"):
            for error in await _raw_refusals(service.address, authorization):
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
                assert wrong not in (error.details() or "")
                assert token not in (error.details() or "")
        # The health service answers without any token.
        assert await _health(service.address) == health_pb2.HealthCheckResponse.SERVING
        # Describe with the token works (the scheme is case-insensitive).
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = plugin_pb2_grpc.PluginServiceStub(channel)
            info = await stub.Describe(
                plugin_pb2.DescribeRequest(),
                metadata=(("authorization", f"bearer {token}"),),
                timeout=10,
            )
            assert info.id == "example"

        # A dispatcher that runs the plugin's lifecycle cannot even start with a wrong token.
        with pytest.raises(Unauthorized):
            async with _dispatcher(
                service.address, {"authorization": f"Bearer {wrong}"}, owned=True
            ):
                pass
        # With the token: served (lifecycle, calls, streams, events), and healthy. Last:
        # leaving runs Stop and Destroy, after which the plugin reports not serving.
        authorized = {"authorization": f"Bearer {token}"}
        async with _dispatcher(service.address, authorized, owned=True) as dispatcher:
            pongs: asyncio.Queue[Any] = asyncio.Queue()
            dispatcher.on("example", "pong", lambda _event, data: pongs.put_nowait(data))
            assert await dispatcher.call("example", "echo", {"x": 1}) == {"x": 1}
            chunks = [c async for c in dispatcher.stream("example", "count", {"n": 2})]
            assert chunks == [{"i": 0}, {"i": 1}]
            await dispatcher.publish("example", "ping", {"seq": 1})
            assert await asyncio.wait_for(pongs.get(), 10) == {"seq": 1}
            (report,) = await dispatcher.health()
            assert report.health.status == "serving", report.health.detail

        stderr = await service.stop()
    assert token not in stderr
    assert wrong not in stderr
    assert WARNING not in stderr, stderr


async def test_without_a_token_the_service_serves_anyone_and_warns(language: str) -> None:
    async with _service(language) as service:
        async with _dispatcher(service.address) as dispatcher:
            assert await dispatcher.call("example", "echo", [1]) == [1]
        stderr = await service.stop()
    # A warning by its level (WARN, WARNING, level=WARN) or its words (Python's "warning:").
    assert "warn" in stderr.lower() and "LINCHKIT_PLUGIN_TOKEN" in stderr, stderr


async def test_both_token_sources_are_refused(language: str, tmp_path: Path) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    environment = _environment(
        LINCHKIT_PLUGIN_TOKEN=token, LINCHKIT_PLUGIN_TOKEN_FILE=str(token_file)
    )
    process = await asyncio.create_subprocess_exec(
        str(executable(language)),
        "serve",
        "--address",
        "127.0.0.1:0",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    async with asyncio.timeout(START_TIMEOUT):
        stdout, stderr = await process.communicate()
    assert process.returncode != 0
    assert stdout == b""
    text = stderr.decode(errors="replace")
    assert "LINCHKIT_PLUGIN_TOKEN" in text and "both" in text, text
    assert token not in text


async def test_subprocess_mode_does_not_read_the_token(language: str) -> None:
    """AutoMTLS admits only the launching host, which sends no token: a token passed in the
    child's environment changes nothing, and there is no warning without one."""
    token = "tok-" + secrets.token_urlsafe(24)
    target = {
        "provider": "subprocess",
        "command": [str(executable(language))],
        "handshake_timeout_ms": int(START_TIMEOUT * 1000),
        "health_interval_ms": 0,
        "env": {"LINCHKIT_PLUGIN_TOKEN": token},
    }
    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "example",
                    "version": "1.0.0",
                    "target": target,
                    "lifecycle": {"init_timeout_ms": int(START_TIMEOUT * 1000)},
                    "defaults": {"timeout_ms": 10_000},
                    "methods": {"echo": {}},
                }
            ],
        },
        base_dir=ROOT,
    )
    async with Dispatcher(manifest) as dispatcher:
        assert await dispatcher.call("example", "echo", "hi") == "hi"
