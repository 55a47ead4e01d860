"""Streams and host events pass the policies that fit them: rate limit, bulkhead, breaker.

Against the Python example plugin as a real subprocess plugin (its ``count`` streams).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import pytest

from dispatcher import (
    CircuitOpen,
    DeadlineExceeded,
    Dispatcher,
    InvalidParams,
    Overloaded,
    RateLimited,
)
from tests.conftest import ROOT, manifest

EXAMPLE = [sys.executable, str(ROOT / "sdk" / "python" / "examples" / "example_plugin.py")]


def example(**policies: Any) -> dict[str, Any]:
    return {
        "id": "example",
        "version": "1.0.0",
        "target": {"provider": "subprocess", "command": EXAMPLE},
        "defaults": policies,
        "methods": {"count": {}, "sleep": {}},
    }


async def test_a_stream_takes_one_unit_of_its_methods_rate_limit() -> None:
    limit = {"rate": 0.5, "burst": 1, "mode": "reject"}
    async with Dispatcher(manifest(example(rate_limit=limit))) as dispatcher:
        assert [chunk async for chunk in dispatcher.stream("example", "count", {"n": 3})] == [
            {"i": 0},
            {"i": 1},
            {"i": 2},
        ]
        with pytest.raises(RateLimited):
            async for _ in dispatcher.stream("example", "count", {"n": 3}):
                pass


async def test_an_open_stream_holds_its_bulkhead_slot_until_it_ends() -> None:
    bulkhead = {"max_in_flight": 1, "max_waiting": 0}
    async with Dispatcher(manifest(example(concurrency=bulkhead))) as dispatcher:
        first = dispatcher.stream("example", "count", {"n": 2})
        assert await anext(first) == {"i": 0}  # open: the slot is taken
        with pytest.raises(Overloaded):
            await anext(dispatcher.stream("example", "count", {"n": 1}))
        assert [chunk async for chunk in first] == [{"i": 1}]  # ends: the slot is free
        assert [chunk async for chunk in dispatcher.stream("example", "count", {"n": 1})] == [
            {"i": 0}
        ]


async def test_streams_and_calls_share_a_target_bulkhead() -> None:
    bulkhead = {"max_in_flight": 1, "max_waiting": 0, "scope": "target"}
    async with Dispatcher(manifest(example(concurrency=bulkhead))) as dispatcher:
        stream = dispatcher.stream("example", "count", {"n": 2})
        assert await anext(stream) == {"i": 0}
        with pytest.raises(Overloaded):
            await dispatcher.call("example", "sleep", {"ms": 1})
        await stream.aclose()  # a stream left early frees its slot too
        assert await dispatcher.call("example", "sleep", {"ms": 1}) == {"slept_ms": 1}


async def test_a_stream_is_refused_while_its_targets_circuit_is_open() -> None:
    breaker = {"fail_max": 1, "reset_timeout_ms": 60_000}
    async with Dispatcher(manifest(example(breaker=breaker))) as dispatcher:
        with pytest.raises(DeadlineExceeded):  # a health failure of the target
            await dispatcher.call("example", "sleep", {"ms": 2_000}, timeout=0.2)
        with pytest.raises(CircuitOpen):
            await anext(dispatcher.stream("example", "count", {"n": 1}))
        with pytest.raises(CircuitOpen):
            await dispatcher.publish("example", "ping", {"n": 1})


async def test_a_host_event_takes_one_unit_of_its_targets_rate_limit() -> None:
    limit = {"rate": 0.5, "burst": 1, "mode": "reject", "scope": "target"}
    async with Dispatcher(manifest(example(rate_limit=limit))) as dispatcher:
        await dispatcher.publish("example", "ping", {"n": 1})
        with pytest.raises(RateLimited):
            await dispatcher.publish("example", "ping", {"n": 2})


async def test_publish_refuses_an_odd_timeout_by_name() -> None:
    async with Dispatcher(manifest(example())) as dispatcher:
        for timeout in (0.0, -1.0, float("nan"), float("inf"), 1e300):
            with pytest.raises((DeadlineExceeded, InvalidParams), match="timeout"):
                await dispatcher.publish("example", "ping", timeout=timeout)


async def test_a_stream_its_caller_closes_is_no_longer_open_once_the_close_returns() -> None:
    """The caller takes one chunk and closes the stream. Before: the provider left the
    process's stream to the garbage collector, so when the close returned its RPC was
    still open (cancelled only later). Now it is closed with the caller's stream."""
    async with Dispatcher(manifest(example())) as dispatcher:
        provider = dispatcher.providers["subprocess"]
        (process,) = provider._processes.values()  # type: ignore[attr-defined]
        connection = await process.connection()
        async with contextlib.aclosing(dispatcher.stream("example", "count", {"n": 3})) as chunks:
            assert await anext(chunks) == {"i": 0}
        assert not connection._open_streams
