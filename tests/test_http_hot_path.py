"""The HTTP clients' per-call shortcuts keep the behaviour they replace."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from providers._aiohttp import AiohttpClient
from providers._http_client import HttpPool
from providers.egress import EgressPolicy
from providers.http import HttpProvider, HttpTarget
from providers.invocation import Invocation, new_request_id
from tests.test_http_provider import answering, raw_server


@pytest.mark.parametrize("remaining", [0.0004, 0.0015, 0.2, 1.9999, 29.99987, 300.0])
async def test_the_client_timeout_never_outlasts_the_deadline(remaining: float) -> None:
    async with AiohttpClient(HttpPool(), egress=EgressPolicy()) as client:
        timeout = client._timeout(remaining)
    assert timeout.total is not None
    assert timeout.total <= remaining
    assert remaining - timeout.total < 0.001


async def test_client_timeouts_are_shared_between_calls_with_the_same_budget() -> None:
    async with AiohttpClient(HttpPool(), egress=EgressPolicy()) as client:
        assert client._timeout(29.99981) is client._timeout(29.99949)
        assert client._timeout(29.99981) is not client._timeout(29.9981)


def test_a_provider_restarted_in_another_loop_reads_that_loop_s_clock() -> None:
    # ``start`` binds the running loop's clock for ``invoke`` and ``aclose`` lets go of it:
    # a provider closed and started again in a new loop calls as before.
    provider = HttpProvider()
    target = HttpTarget(provider="http", url="http://127.0.0.1:1")

    async def one_call(answer: bytes) -> Any:
        async with raw_server(answering(200, answer)) as url:
            here = target.model_copy(update={"url": url})
            await provider.start()
            try:
                loop = asyncio.get_running_loop()
                invocation = Invocation("p", "1", "m", {}, loop.time() + 5, new_request_id())
                return await provider.invoke(here, invocation)
            finally:
                await provider.aclose()

    assert asyncio.run(one_call(b'{"ok":true,"result":1}')) == 1
    assert asyncio.run(one_call(b'{"ok":true,"result":2}')) == 2
