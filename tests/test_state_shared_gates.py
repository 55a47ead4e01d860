"""Streams, host events and batched calls share their target's breaker across replicas
(``state: redis``), as request/response calls do.

Two dispatchers in this process stand for two replicas: each has its own state backend,
Redis connections and plugin processes, so whatever one learns reaches the other only
through the real Redis (``tests/services.py``); neither has a view of the breaker before
its first call, so a refusal there is the shared state's, not a local memory of it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import pytest
import redis.asyncio as aioredis

from dispatcher import CircuitOpen, DeadlineExceeded, Dispatcher, TargetUnavailable
from dispatcher.config import parse_manifest
from dispatcher.fleet.breaker import BreakerState
from dispatcher.fleet.shared_breaker import SharedBreaker
from dispatcher.state.redis_store import RedisState
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
            # Once: a read of the shared state answered after a newer one (under load)
            # is older by its generation and not learnt (it counted open, closed, open).
            assert transitions == 1.0
            assert [report.circuit for report in await replica.health()] == ["open"]
    opened = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage() == f"circuit of {target}: closed -> open (shared by all replicas)"
    ]
    assert len(opened) == 2  # once on each replica


def watched(redis: Redis, prefix: str, dead: str, fail_max: int) -> Dispatcher:
    """A replica with metrics whose one method calls ``dead`` (nothing listens there)."""
    plugin = {
        "id": "flaky",
        "version": "1.0.0",
        "target": {"provider": "http", "url": dead},
        "methods": {"flaky": {"breaker": {"fail_max": fail_max, "reset_timeout_ms": 60_000}}},
    }
    state = {"backend": "redis", "url": redis.url, "key_prefix": prefix, "op_timeout_ms": 2000}
    document = {
        "version": 1,
        "state": state,
        "telemetry": {"metrics": {"enabled": True}},
        "plugins": [plugin],
    }
    return Dispatcher(parse_manifest(document, base_dir=ROOT))


def transitions(replica: Dispatcher, target: str, before: str, after: str) -> float:
    registry = replica.telemetry.metrics.registry  # type: ignore[union-attr]
    labels = {"target": target, "from_state": before, "to_state": after}
    return registry.get_sample_value("dispatcher_breaker_transitions_total", labels) or 0.0


def only_breaker(replica: Dispatcher) -> tuple[SharedBreaker, RedisState, str]:
    """The replica's one shared breaker, its store, and the key of its Redis hash."""
    assert replica.policies is not None
    [breaker] = replica.policies.targets.shared_breakers.values()
    store = replica.state_backend
    assert isinstance(store, RedisState)
    return breaker, store, store._key("breaker", breaker.key)


async def test_a_state_learnt_after_a_newer_one_is_ignored(
    redis_server: Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A read of the shared breaker that Redis answered before a transition, handed to the
    replica after it, is older by its generation: the replica keeps the newer state and
    counts no transition back and forth. Made deterministic by storing the older state
    again (as Redis held it before the circuit opened) and reading it after the open."""
    dead = f"http://127.0.0.9:{free_port('127.0.0.9')}"
    target = f"http {dead}/invoke"
    caplog.set_level(logging.INFO, "dispatcher.breaker")
    async with (
        aioredis.Redis.from_url(redis_server.url) as client,
        watched(redis_server, redis_prefix, dead, fail_max=2) as replica,
    ):
        with pytest.raises(TargetUnavailable):
            await replica.call("flaky", "flaky", {})
        breaker, store, key = only_breaker(replica)
        before = await client.hgetall(key)  # closed, one failure: before the circuit opened
        assert before[b"state"] == b"closed"
        with pytest.raises(TargetUnavailable):
            await replica.call("flaky", "flaky", {})
        after = await client.hgetall(key)
        assert after[b"state"] == b"open"
        await until(lambda: breaker.seen is BreakerState.OPEN, "the open circuit")

        await client.hset(key, mapping=before)  # the older answer, delivered now
        await store._breakers.read([breaker.key])
        assert breaker.shown() == ("open", 2)
        assert transitions(replica, target, "closed", "open") == 1.0
        assert transitions(replica, target, "open", "closed") == 0.0

        # A newer one is learnt: the generation, not the order of arrival, decides.
        generation = int(after.get(b"generation", 0)) + 1
        await client.hset(key, mapping={"state": "closed", "failures": 0, "generation": generation})
        await store._breakers.read([breaker.key])
        assert breaker.shown() == ("closed", 0)
        assert transitions(replica, target, "open", "closed") == 1.0
    logged = [r.getMessage() for r in caplog.records if r.name == "dispatcher.breaker"]
    assert logged == [
        f"circuit of {target}: closed -> open (shared by all replicas)",
        f"circuit of {target}: open -> closed (shared by all replicas)",
    ]


async def test_an_answer_sent_before_a_pushed_transition_is_not_kept_as_the_view(
    redis_server: Redis, redis_prefix: str
) -> None:
    """A replica admits calls on the last breaker answer it kept, for ``sync``. An answer
    to an admit sent before another replica opened the circuit, arriving after the push
    of that transition, showed the circuit closed: kept, it let calls through to the dead
    target until ``sync`` passed. It is not kept; the next call asks Redis and is refused."""
    dead = f"http://127.0.0.9:{free_port('127.0.0.9')}"
    async with (
        watched(redis_server, redis_prefix, dead, fail_max=1) as late_one,
        watched(redis_server, redis_prefix, dead, fail_max=1) as other,
    ):
        breaker, store, _ = only_breaker(late_one)
        script = store._breakers._script
        answered, release = asyncio.Event(), asyncio.Event()

        async def answered_late(**arguments: Any) -> Any:
            answer = await script(**arguments)  # run by the real Redis: closed
            answered.set()
            await release.wait()
            return answer

        store._breakers._script = answered_late
        deadline = asyncio.get_running_loop().time() + 10
        admit = asyncio.create_task(store.breaker_admit(breaker.key, breaker.args, deadline))
        await asyncio.wait_for(answered.wait(), 10)
        with pytest.raises(TargetUnavailable):
            await other.call("flaky", "flaky", {})  # fails and opens the shared circuit
        await until(lambda: breaker.seen is BreakerState.OPEN, "the push of the transition")
        store._breakers._script = script
        release.set()
        assert (await admit).state == "closed"  # what Redis said when it was asked

        assert store.breaker_view(breaker.key) is None
        with pytest.raises(CircuitOpen, match="shared by all replicas"):
            await late_one.call("flaky", "flaky", {})


async def test_a_breaker_gone_or_stored_without_a_generation_is_still_followed(
    redis_server: Redis, redis_prefix: str
) -> None:
    """A breaker's hash that is gone (expired, a Redis restarted empty) starts again above
    the generation replicas hold, so what happens to it next is learnt, not ignored as
    older; one stored before breakers had generations counts as generation 0."""
    dead = f"http://127.0.0.9:{free_port('127.0.0.9')}"
    target = f"http {dead}/invoke"
    async with aioredis.Redis.from_url(redis_server.url) as client:
        async with watched(redis_server, redis_prefix, dead, fail_max=1) as first:
            with pytest.raises(TargetUnavailable):
                await first.call("flaky", "flaky", {})
            breaker, _, key = only_breaker(first)
            opened = int(await client.hget(key, "generation") or 0)
            await until(lambda: breaker.seen is BreakerState.OPEN, "the open circuit")

            await client.delete(key)  # the next call finds the circuit closed, fails, opens it
            with pytest.raises(TargetUnavailable):
                await first.call("flaky", "flaky", {})
            assert breaker.shown() == ("open", 1)
            assert transitions(first, target, "open", "closed") == 1.0
            assert transitions(first, target, "closed", "open") == 2.0
            assert int(await client.hget(key, "generation") or 0) > opened

        await client.hdel(key, "generation")  # open, as a dispatcher before generations left it
        async with watched(redis_server, redis_prefix, dead, fail_max=1) as second:
            with pytest.raises(CircuitOpen, match="shared by all replicas"):
                await second.call("flaky", "flaky", {})
            breaker, _, _ = only_breaker(second)
            assert breaker.shown() == ("open", 1)
            assert breaker.seen_generation == 0
            assert transitions(second, target, "closed", "open") == 1.0


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
