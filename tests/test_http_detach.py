"""What an HTTP or Knative target holds is let go once no plugin is attached to it.

Here, first, the clients' side: a client closed under its calls (the client of a target's
own, closed at the target's last detach; reqwest's client of a URL no target calls any
more) ends them as the seam's ``TargetUnavailable``, never a vendor's "closed" error.
Against real servers on loopback; waits are bounded and generous.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dispatcher import TargetUnavailable
from providers._aiohttp import AiohttpClient
from providers._http_client import HttpClient, HttpPool
from providers._reqwest import ReqwestClient
from providers.egress import EgressPolicy
from providers.http import HttpTarget
from tests.test_http_clients import holding
from tests.test_http_hardening import server_on

CLIENTS = ("aiohttp", "reqwest")


def clients_of(kind: str) -> HttpClient:
    if kind == "reqwest":
        return ReqwestClient(HttpPool(max_connections=1), egress=EgressPolicy())
    return AiohttpClient(HttpPool(max_connections=1), egress=EgressPolicy())


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_client_closed_under_its_calls_ends_them_typed(kind: str) -> None:
    """One call held by the plugin, one waiting for the pool's one connection: a close
    ends both as ``TargetUnavailable`` (aiohttp cancelled the waiting one, as if its
    caller had gone); a call after the close goes nowhere, typed too."""
    received, hung_up = asyncio.Event(), asyncio.Event()
    async with server_on("127.0.0.1", holding(received, hung_up)) as (host, port):
        url = f"http://{host}:{port}/invoke"
        target = HttpTarget.model_validate({"provider": "http", "url": f"http://{host}:{port}"})
        client = clients_of(kind)

        def post() -> asyncio.Task[Any]:
            return asyncio.create_task(
                client.post(url, b"{}", {}, timeout=60, limit=1024, target=target, tls=None)
            )

        first = post()
        await asyncio.wait_for(received.wait(), timeout=10)
        waiting = post()
        await asyncio.sleep(0.2)
        if kind == "reqwest":
            await client.forget([url])
        else:
            await client.aclose()
        outcomes = await asyncio.wait_for(
            asyncio.gather(first, waiting, return_exceptions=True), timeout=10
        )
        assert [type(outcome) for outcome in outcomes] == [TargetUnavailable] * 2, outcomes
        assert client.urls_held() == frozenset()
        if kind == "aiohttp":
            (late,) = await asyncio.gather(post(), return_exceptions=True)
            assert isinstance(late, TargetUnavailable), repr(late)
            assert late.details == {"stage": "connect"}  # nothing went out
        await client.aclose()
