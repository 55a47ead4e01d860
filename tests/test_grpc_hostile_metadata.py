"""provider: grpc against a plugin whose answer carries metadata over the channel's cap: a
real grpc.aio ``PluginService`` on loopback (the project's stubs) runs the call, then
answers with headers or trailers larger than grpc's 16 KiB hard limit on what a channel
receives, or with so many of them that they pass it.

The host's channel refuses such an answer (grpc core: RESOURCE_EXHAUSTED, ``Stream removed
(received metadata size exceeds …)``). That is the plugin's reply over a size cap, as a
reply message over 64 MiB is: ``ProviderError``, ``details.reason == "too_large"``, not
retryable (the call ran, and answers as much again), and not read as a rate limit nor a
server short of capacity, whatever the trailers say.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import pytest

from dispatcher import Dispatcher, InvalidParams, ProviderError
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from tests.conftest import manifest
from tests.hostile_peers import grpc_plugin

#: Over grpc's hard limit (16 KiB) on the metadata a channel receives.
LARGE = "a" * 20_000


class Oversharing(plugin_pb2_grpc.PluginServiceServicer):
    """Runs each call (counted), then answers it with the metadata its method names."""

    def __init__(self) -> None:
        self.calls = 0

    async def Call(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if request.method == "large_trailer":
            context.set_trailing_metadata((("x-debug", LARGE),))
        elif request.method == "large_header":
            await context.send_initial_metadata((("x-debug", LARGE),))
        elif request.method == "rate_limit_trailers":
            # Enough retry-after trailers to pass the cap, under a rate limiter's words.
            context.set_trailing_metadata(tuple(("retry-after", "1") for _ in range(2_000)))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota exceeded")
        return plugin_pb2.CallReply(ok=True, result_json=b"null")

    async def Events(self, request_iterator: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no events here")


@pytest.mark.parametrize("method", ["large_trailer", "large_header", "rate_limit_trailers"])
async def test_an_answer_with_metadata_over_the_cap_is_the_plugins_reply_too_large(
    method: str,
) -> None:
    """Before: ``Overloaded`` ("the plugin's server is out of a resource … it may take
    calls again as its load falls"), retryable, so an idempotent method ran three times
    and its breaker counted no failure; with retry-after trailers, ``RateLimited`` with
    the plugin's retry_after."""
    servicer = Oversharing()
    async with grpc_plugin(servicer) as address:
        entry = {
            "id": "oversharing",
            "version": "1.0.0",
            "target": {"provider": "grpc", "address": address},
            "methods": {
                method: {
                    "idempotent": True,
                    "retry": {"attempts": 3, "initial_backoff_ms": 1, "budget_ratio": 1},
                }
            },
        }
        async with Dispatcher(manifest(entry)) as dispatcher:
            with pytest.raises(ProviderError) as caught:
                await dispatcher.call("oversharing", method, {})
        assert servicer.calls == 1  # not retried: it ran, and would answer as much again
    error = caught.value
    assert type(error) is ProviderError, error
    assert (error.retryable, error.retry_after) == (False, None)
    assert error.details == {"reason": "too_large"}
    assert "metadata" in error.message and "size cap" in error.message


async def test_a_request_whose_metadata_the_plugin_refuses_is_the_callers_to_fix() -> None:
    """A caller id past the 16 KiB of metadata a grpc server takes: the plugin's server
    refuses the request, and would refuse it again. Before: ``Overloaded`` ("out of a
    resource … as its load falls"), retryable, resent by an idempotent method's retries."""
    servicer = Oversharing()
    async with grpc_plugin(servicer) as address:
        entry = {
            "id": "oversharing",
            "version": "1.0.0",
            "target": {"provider": "grpc", "address": address},
            "methods": {
                "large_trailer": {
                    "idempotent": True,
                    "retry": {"attempts": 3, "initial_backoff_ms": 1, "budget_ratio": 1},
                }
            },
        }
        async with Dispatcher(manifest(entry)) as dispatcher:
            with pytest.raises(InvalidParams) as caught:
                await dispatcher.call("oversharing", "large_trailer", {}, caller="c" * 40_000)
    assert servicer.calls == 0  # refused before the plugin saw it, once
    error = caught.value
    assert (error.retryable, error.details) == (False, {"reason": "too_large"})
