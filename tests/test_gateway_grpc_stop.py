"""The gateway's gRPC port stopping while clients call: every call is answered or refused
as never sent (``GrpcGateway.aclose``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import grpc.aio
import orjson
import pytest

from dispatcher import Dispatcher
from dispatcher.gateway import GatewayServer, GatewaySettings
from dispatcher.gateway.grpc_gateway import SETTLE_MOST_SECONDS
from linchkit_plugin._proto import gateway_pb2, gateway_pb2_grpc
from tests.conftest import manifest
from tests.gateway_support import echo_entry

SAY = gateway_pb2.GatewayCall(plugin="echo", method="say", params_json=orjson.dumps({"text": "hi"}))


@contextlib.asynccontextmanager
async def _started_gateway() -> AsyncIterator[tuple[Dispatcher, GatewayServer, str]]:
    """A dispatcher and its gateway with a gRPC port, started; the test stops the gateway."""
    async with Dispatcher(manifest(echo_entry())) as dispatcher:
        server = GatewayServer(dispatcher, GatewaySettings(port=0, grpc_port=0))
        await server.start()
        assert server.grpc is not None
        yield dispatcher, server, server.grpc.address


@contextlib.asynccontextmanager
async def _stopping_after_a_call() -> AsyncIterator[tuple[Any, asyncio.Task[None]]]:
    """A client connected to a started gateway (one call answered), and the gateway's
    stop just begun."""
    async with (
        _started_gateway() as (_, server, address),
        grpc.aio.insecure_channel(address) as channel,
    ):
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        await gateway.Call(SAY, timeout=10)  # connected
        stopping = asyncio.create_task(server.aclose())
        await asyncio.sleep(0.01)  # the port holds calls now
        yield gateway, stopping
        await asyncio.wait_for(stopping, 10)


async def _call_until_refused(address: str, outcomes: Counter[str]) -> None:
    """Call in a loop, each call after the last one's answer, until a connect is refused."""
    async with grpc.aio.insecure_channel(address) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        while outcomes["lost"] < 100:
            try:
                await gateway.Call(SAY, timeout=10)
                outcomes["ok"] += 1
            except grpc.aio.AioRpcError as error:
                if dict(error.trailing_metadata() or ()).get("error-type") == "shutting_down":
                    outcomes["shutting_down"] += 1
                elif error.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (
                    error.details() or ""
                ):
                    outcomes["refused"] += 1  # never sent: the port had closed
                    return
                else:
                    outcomes["lost"] += 1
                    outcomes[f"lost: {error.code().name} {error.details()}"] += 1


async def test_stopping_while_clients_call_loses_no_call() -> None:
    """As ``dispatcher serve --grpc-port`` stops: drain, then close. grpc core cancels the
    calls it holds but has not handed to the service when its shutdown begins: 91 calls
    ended ``CANCELLED`` in these 3 stops before the port held arriving calls first."""
    outcomes: Counter[str] = Counter()
    for _ in range(3):
        async with _started_gateway() as (dispatcher, server, address):
            clients = [
                asyncio.create_task(_call_until_refused(address, outcomes)) for _ in range(32)
            ]
            await asyncio.sleep(0.3)
            await dispatcher.drain(1)
            await server.aclose()
            await asyncio.wait_for(asyncio.gather(*clients), 30)
    assert outcomes["lost"] == 0, outcomes
    assert outcomes["refused"] == 3 * 32
    assert outcomes["shutting_down"] > 0  # each client's last call, held through the stop


async def test_a_call_arriving_as_the_port_stops_without_a_drain_is_answered() -> None:
    started = time.monotonic()
    async with _stopping_after_a_call() as (gateway, stopping):
        reply = await gateway.Call(SAY, timeout=10)
        assert reply.ok and orjson.loads(reply.result_json)["text"] == "hi"
        await asyncio.wait_for(stopping, 10)
        # Held until quiet, not for the whole bound.
        assert time.monotonic() - started < SETTLE_MOST_SECONDS + 1
        error = await _refused(gateway.Call(SAY, timeout=2))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_held_call_whose_deadline_comes_first_is_refused_as_not_run() -> None:
    """Held calls wait for the stop's settle (0.1 s at least); one whose client gives up
    sooner is answered ``shutting_down`` just before, not left to time out."""
    async with _stopping_after_a_call() as (gateway, _):
        error = await _refused(gateway.Call(SAY, timeout=0.09))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert dict(error.trailing_metadata() or ())["error-type"] == "shutting_down"


async def _refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def test_a_client_that_never_stops_sending_holds_the_stop_no_longer_than_its_bound() -> None:
    """A sender that does not wait for answers keeps calls arriving: the hold gives up
    after ``SETTLE_MOST_SECONDS`` and the stop ends within its grace; every call ends."""
    async with (
        _started_gateway() as (_, server, address),
        grpc.aio.insecure_channel(address) as channel,
    ):
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        calls: list[asyncio.Task[Any]] = []

        async def flood() -> None:
            while True:
                calls.append(asyncio.create_task(gateway.Call(SAY, timeout=10)))
                await asyncio.sleep(0.005)

        sending = asyncio.create_task(flood())
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await asyncio.wait_for(server.aclose(), 10)
        assert time.monotonic() - started < SETTLE_MOST_SECONDS + 2 + 1  # + the stop's grace
        sending.cancel()
        ended = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 15)
        assert all(
            isinstance(outcome, grpc.aio.AioRpcError | gateway_pb2.GatewayReply)
            for outcome in ended
        ), {type(outcome) for outcome in ended}
