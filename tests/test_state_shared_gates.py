"""Streams, host events and batched calls share their target's breaker across replicas
(``state: redis``), as request/response calls do.

Two dispatchers in this process stand for two replicas: each has its own state backend,
Redis connections and plugin processes, so whatever one learns reaches the other only
through the real Redis (``tests/services.py``); neither has a view of the breaker before
its first call, so a refusal there is the shared state's, not a local memory of it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytest

from dispatcher import CircuitOpen, DeadlineExceeded, Dispatcher, TargetUnavailable
from dispatcher.config import parse_manifest
from dispatcher.telemetry.metrics import exposition
from dispatcher.telemetry.snapshot import Sample
from tests.conftest import ROOT
from tests.services import Redis, free_port, until

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


async def recorded_open(replica: Dispatcher) -> None:
    """Wait for the failure to reach Redis: a call that failed past its deadline records
    its outcome in the background (recording must not make it later still), so the
    circuit opens a moment after the caller saw the error."""
    await until(lambda: set(replica.stats()["shared_breakers"].values()) == {"open"}, "the record")


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
        await recorded_open(first)
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
        await recorded_open(first)
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


async def test_metrics_top_health_and_logs_follow_the_shared_breaker_on_every_replica(
    redis_server: Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One replica's failures open the shared circuit: both replicas' /metrics, top's view
    of them, health and logs say open (they said closed: they read the local breaker,
    which with Redis answering decides nothing). The other replica makes no call: what
    it shows comes from the pushed transition (breaker_sync_ms is long)."""
    dead = f"http://127.0.0.9:{free_port('127.0.0.9')}"  # nothing listens: refused
    plugin = {
        "id": "flaky",
        "version": "1.0.0",
        "target": {"provider": "http", "url": dead},
        "methods": {"flaky": {"breaker": {"fail_max": 3, "reset_timeout_ms": 60_000}}},
    }
    state = {
        "backend": "redis",
        "url": redis_server.url,
        "key_prefix": redis_prefix,
        "op_timeout_ms": 2000,
        "breaker_sync_ms": 10_000,
    }
    document = {
        "version": 1,
        "state": state,
        "telemetry": {"metrics": {"enabled": True}},
        "plugins": [plugin],
    }
    caplog.set_level(logging.INFO, "dispatcher.breaker")
    async with (
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as first,
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as second,
    ):
        target = f"http {dead}/invoke"

        def shown(replica: Dispatcher) -> Sample:
            registry = replica.telemetry.metrics.registry  # type: ignore[union-attr]
            return Sample.parse(exposition(registry, None)[0].decode(), time=1.0)

        def value(replica: Dispatcher, name: str, **labels: str) -> float | None:
            registry = replica.telemetry.metrics.registry  # type: ignore[union-attr]
            return registry.get_sample_value(name, {"target": target, **labels})

        for _ in range(3):
            with pytest.raises(TargetUnavailable):
                await first.call("flaky", "flaky", {})
        with pytest.raises(CircuitOpen, match="shared by all replicas"):
            await first.call("flaky", "flaky", {})
        await until(lambda: shown(second).breakers.get(target) == "open", "the open circuit")
        for replica in (first, second):
            assert shown(replica).breakers == {target: "open"}  # top's "breakers not closed"
            assert value(replica, "dispatcher_breaker_state", state="open") == 1.0
            assert value(replica, "dispatcher_breaker_state", state="closed") == 0.0
            assert value(replica, "dispatcher_breaker_failures") == 3.0
            transitions = value(
                replica,
                "dispatcher_breaker_transitions_total",
                from_state="closed",
                to_state="open",
            )
            # At least once: a read of the shared state answered after a newer one can
            # be learnt out of order under load and count a transition more (open,
            # closed, open); the state shown settles on the store's.
            assert transitions is not None and transitions >= 1.0
            assert [report.circuit for report in await replica.health()] == ["open"]
    opened = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage() == f"circuit of {target}: closed -> open (shared by all replicas)"
    ]
    assert len(opened) >= 2  # on each replica (more: an out-of-order read, as above)


async def test_while_redis_is_down_fail_open_shows_the_local_breaker_that_decides(
    own_redis: Redis, redis_prefix: str
) -> None:
    dead = f"http://127.0.0.9:{free_port('127.0.0.9')}"
    plugin = {
        "id": "flaky",
        "version": "1.0.0",
        "target": {"provider": "http", "url": dead},
        "methods": {"flaky": {"breaker": {"fail_max": 2, "reset_timeout_ms": 60_000}}},
    }
    state = {
        "backend": "redis",
        "url": own_redis.url,
        "key_prefix": redis_prefix,
        "op_timeout_ms": 200,
        "retry_after_ms": 60_000,  # once down, stays skipped for the test
    }
    document = {"version": 1, "state": state, "plugins": [plugin]}
    async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
        target = f"http {dead}/invoke"
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("flaky", "flaky", {})
        assert dispatcher.stats()["breakers"][target] == {"state": "closed", "failures": 1}
        own_redis.stop()
        for _ in range(2):  # the local breaker counts from zero: two failures open it
            with pytest.raises(TargetUnavailable):
                await dispatcher.call("flaky", "flaky", {})
        with pytest.raises(CircuitOpen):
            await dispatcher.call("flaky", "flaky", {})
        assert dispatcher.stats()["breakers"][target] == {"state": "open", "failures": 2}
        assert dispatcher.stats()["shared_breakers"] == {target: "closed"}  # as last learnt
