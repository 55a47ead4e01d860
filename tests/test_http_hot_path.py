"""The HTTP clients' per-call shortcuts keep the behaviour they replace."""

from __future__ import annotations

import pytest

from providers._http_client import HttpPool
from providers._http_common import AiohttpClient
from providers.egress import EgressPolicy


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
