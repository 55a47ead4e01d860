"""Streams, host events and batched calls share their target's breaker across replicas
(``state: redis``), as request/response calls do.

Two dispatchers in this process stand for two replicas: each has its own state backend,
Redis connections and plugin processes, so whatever one learns reaches the other only
through the real Redis (``tests/services.py``); neither has a view of the breaker before
its first call, so a refusal there is the shared state's, not a local memory of it.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from dispatcher import CircuitOpen, DeadlineExceeded, Dispatcher, TargetUnavailable
from dispatcher.config import parse_manifest
from tests.conftest import ROOT
from tests.services import Redis, free_port

EXAMPLE = [sys.executable, str(ROOT / "sdk" / "python" / "examples" / "example_plugin.py")]
BREAKER = {"fail_max": 1, "reset_timeout_ms": 60_000}


def replica(redis: Redis, prefix: str, plugin: dict[str, Any]) -> Dispatcher:
    state = {"backend": "redis", "url": redis.url, "key_prefix": prefix, "op_timeout_ms": 2000}
    return Dispatcher(
        parse_manifest({"version": 1, "state": state, "plugins": [plugin]}, base_dir=ROOT)
    )


def example(**policies: Any) -> dict[str, Any]:
    return {
        "id": "example",
        "version": "1.0.0",
        "target": {"provider": "subprocess", "command": EXAMPLE},
        "defaults": policies,
        "methods": {"count": {}, "sleep": {}},
    }


async def test_a_circuit_one_replica_opened_refuses_the_others_streams_and_events(
    redis_server: Redis, redis_prefix: str
) -> None:
    plugin = example(breaker=BREAKER)
    async with (
        replica(redis_server, redis_prefix, plugin) as first,
        replica(redis_server, redis_prefix, plugin) as second,
    ):
        # The stream works while the circuit is closed. (The second replica makes no call
        # first: a replica may trust its last view of a closed breaker for breaker_sync_ms
        # when the push of a change is late, which is not what this test is about.)
        assert [chunk async for chunk in first.stream("example", "count", {"n": 2})] == [
            {"i": 0},
            {"i": 1},
        ]
        with pytest.raises(DeadlineExceeded):  # a health failure of the target, on one replica
            await first.call("example", "sleep", {"ms": 2_000}, timeout=0.2)
        with pytest.raises(CircuitOpen, match="shared by all replicas"):
            await anext(second.stream("example", "count", {"n": 1}))
        with pytest.raises(CircuitOpen, match="shared by all replicas"):
            await second.publish("example", "ping", {"n": 1})
        assert second.stats()["shared_breakers"]  # it saw the shared breaker, open
        assert set(second.stats()["shared_breakers"].values()) == {"open"}


async def test_a_stream_failing_on_one_replica_opens_the_circuit_for_the_others_calls(
    redis_server: Redis, redis_prefix: str
) -> None:
    plugin = example(breaker=BREAKER)
    async with (
        replica(redis_server, redis_prefix, plugin) as first,
        replica(redis_server, redis_prefix, plugin) as second,
    ):
        with pytest.raises(DeadlineExceeded):  # the stream outlives its deadline
            async for _ in first.stream("example", "count", {"n": 1_000_000}, timeout=0.2):
                pass
        with pytest.raises(CircuitOpen, match="shared by all replicas"):
            await second.call("example", "sleep", {"ms": 1})


async def test_a_batch_that_failed_on_one_replica_opens_the_circuit_for_the_others(
    redis_server: Redis, redis_prefix: str
) -> None:
    dead = f"http://127.0.0.2:{free_port('127.0.0.2')}"  # nothing listens: refused
    plugin = {
        "id": "batched",
        "version": "1.0.0",
        "target": {"provider": "http", "url": dead},
        "methods": {
            "say": {"batch": {"max_size": 8, "max_wait_ms": 5}, "breaker": BREAKER},
        },
    }
    async with (
        replica(redis_server, redis_prefix, plugin) as first,
        replica(redis_server, redis_prefix, plugin) as second,
    ):
        results = await first.call_many(
            [("batched", "say", {"n": n}) for n in range(4)], return_exceptions=True
        )
        assert all(isinstance(result, TargetUnavailable) for result in results), results
        # One batch, one failure: the circuit is open for every replica's next batch,
        # which is refused before anything is sent.
        results = await second.call_many(
            [("batched", "say", {"n": n}) for n in range(4)], return_exceptions=True
        )
        assert all(isinstance(result, CircuitOpen) for result in results), results
        assert "shared by all replicas" in str(results[0])
