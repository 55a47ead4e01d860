"""The breakers of a fleet's instances, shared on a real Redis (``state: redis``).

Three dispatcher processes (``tests/state_replica.py``) call one fleet of three counting
plugin servers, each under ``dispatcher-plugin serve`` in its own process; what each
replica sent each instance is its own fleet report (``Dispatcher.stats()["fleets"]``), so
"no call went to that instance" is counted, not inferred from timings. The "Redis is down"
cases run one dispatcher in this process against a Redis the test kills or freezes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher
from dispatcher.config import load_manifest
from dispatcher.state import StateUnavailable, digest
from tests.services import Redis
from tests.test_fleet import HOSTS, Instance, serving
from tests.test_state_redis import PluginServer, Replica

BREAKER = {"fail_max": 3, "reset_timeout_ms": 1500, "half_open_max_calls": 1}


@pytest.fixture
def three_servers() -> Iterator[list[PluginServer]]:
    servers = [PluginServer() for _ in range(3)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def replicas() -> Iterator[Any]:
    started: list[Replica] = []

    def start(manifest: Path, count: int) -> list[Replica]:
        for _ in range(count):
            started.append(Replica(manifest))
        return started[-count:]

    yield start
    for replica in started:
        replica.end()


def fleet_manifest(
    folder: Path, redis_url: str, prefix: str, urls: list[str], **state: Any
) -> Path:
    path = folder / "plugins.yaml"
    document = {
        "version": 1,
        "state": {"backend": "redis", "url": redis_url, "key_prefix": prefix, **state},
        "plugins": [
            {
                "id": "counter",
                "version": "1.0.0",
                "target": {
                    "provider": "http",
                    "instances": [{"url": url} for url in urls],
                    "balance": "round_robin",  # every instance is picked within three calls
                },
                "methods": {"ping": {"timeout_ms": 3000, "breaker": BREAKER}},
            }
        ],
    }
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


def calls_to(replica: Replica, url: str) -> int:
    """How many calls ``replica`` sent the instance at ``url`` (its own fleet report)."""
    (fleet,) = replica.ask(op="fleets").values()
    (instance,) = [each for each in fleet["instances"] if url in each["target"]]
    return int(instance["calls"])


def ping(replica: Replica, n: int) -> list[dict[str, Any]]:
    outcomes: list[dict[str, Any]] = replica.ask(op="calls", n=n, plugin="counter", method="ping")
    return outcomes


def sequential_pings(replica: Replica, n: int) -> list[dict[str, Any]]:
    return [replica.ask(op="call", plugin="counter", method="ping") for _ in range(n)]


def test_an_instance_one_replica_saw_fail_gets_no_call_from_the_others(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    three_servers: list[PluginServer],
    replicas: Any,
) -> None:
    urls = [server.url for server in three_servers]
    sick, sick_url = three_servers[1], urls[1]
    # Long: only the pushed transition can tell B and C in time, not their views expiring.
    manifest = fleet_manifest(
        tmp_path, redis_server.url, redis_prefix, urls, breaker_sync_ms=10_000
    )
    a, b, c = replicas(manifest, 3)
    for replica in (a, b, c):  # each has a fresh view of every instance's closed breaker
        assert all(outcome["ok"] for outcome in sequential_pings(replica, 6))
        assert calls_to(replica, sick_url) == 2

    sick.stop()
    for _ in range(30):  # A's calls fail over; its failures against the sick one count
        assert a.ask(op="call", plugin="counter", method="ping")["ok"]
        if calls_to(a, sick_url) >= 2 + BREAKER["fail_max"]:
            break
    assert calls_to(a, sick_url) == 2 + BREAKER["fail_max"]

    # The push is asynchronous: wait for it to reach B and C (their views of a closed
    # breaker are trusted for 10 s otherwise), as a call sent at once might beat it.
    for replica in (b, c):
        deadline = time.monotonic() + 5.0
        while set(replica.ask(op="shared_breakers").values()) == {"closed"}:
            assert time.monotonic() < deadline, "the open circuit was not pushed to a replica"
            time.sleep(0.01)
    # B and C never tried it: every one of their calls goes to the two others.
    before = {replica: calls_to(replica, sick_url) for replica in (b, c)}
    for replica in (b, c):
        outcomes = sequential_pings(replica, 12)
        assert all(outcome["ok"] for outcome in outcomes), outcomes
        assert calls_to(replica, sick_url) == before[replica], "a call reached the open instance"
    assert calls_to(a, sick_url) == 2 + BREAKER["fail_max"]

    # After reset_timeout: at most one probe of all the replicas' calls, which fails.
    time.sleep(BREAKER["reset_timeout_ms"] / 1000 + 0.1)
    before = {replica: calls_to(replica, sick_url) for replica in (b, c)}
    b.send(op="calls", n=6, plugin="counter", method="ping")
    c.send(op="calls", n=6, plugin="counter", method="ping")
    outcomes = b.receive() + c.receive()
    assert all(outcome["ok"] for outcome in outcomes), outcomes
    probes = sum(calls_to(replica, sick_url) - before[replica] for replica in (b, c))
    assert probes == 1, probes

    # It heals: after reset_timeout a probe succeeds, and every replica sends to it again.
    sick.start()
    time.sleep(BREAKER["reset_timeout_ms"] / 1000 + 0.1)
    assert all(outcome["ok"] for outcome in sequential_pings(b, 3))
    before = {replica: calls_to(replica, sick_url) for replica in (a, b, c)}
    for replica in (a, b, c):
        assert all(outcome["ok"] for outcome in sequential_pings(replica, 9))
        assert calls_to(replica, sick_url) - before[replica] >= 2


# -- Redis down, in this process -------------------------------------------------------------


def local_fleet_manifest(
    folder: Path, redis_url: str, prefix: str, urls: list[str], mode: str
) -> Any:
    return load_manifest(
        fleet_manifest(
            folder,
            redis_url,
            prefix,
            urls,
            on_unavailable=mode,
            op_timeout_ms=100,
            retry_after_ms=300,
        )
    )


async def timed_calls(dispatcher: Dispatcher, count: int, timeout: float) -> list[Any]:
    """``count`` calls one after another, each checked to end within its deadline."""
    outcomes: list[Any] = []
    for _ in range(count):
        started = time.monotonic()
        try:
            outcomes.append(await dispatcher.call("counter", "ping", {}, timeout=timeout))
        except Exception as error:  # what each mode promises is checked by the caller
            outcomes.append(error)
        # The call's deadline, plus scheduling slack for a busy 2-core machine.
        assert time.monotonic() - started < timeout + 0.25
    return outcomes


@pytest.mark.parametrize("how", ["killed", "frozen"])
async def test_fleet_fail_open_uses_each_instance_local_breaker_within_the_deadline(
    tmp_path: Path, own_redis: Redis, redis_prefix: str, how: str
) -> None:
    async with serving(Instance(HOSTS[0]), Instance(HOSTS[1], status=503)) as (good, bad):
        manifest = local_fleet_manifest(
            tmp_path, own_redis.url, redis_prefix, [good.url, bad.url], "fail_open"
        )
        async with Dispatcher(manifest) as dispatcher:
            assert isinstance((await timed_calls(dispatcher, 1, 2.0))[0], str)
            own_redis.stop() if how == "killed" else own_redis.pause()
            try:
                outcomes = await timed_calls(dispatcher, 20, 0.5)
                stats = dispatcher.stats()["state"]
                assert stats["fallbacks"] > 0 and stats["failures"] > 0
                # The local breaker of the failing instance opened: it took fail_max
                # calls (plus the one before Redis went), and the good one all the rest.
                assert bad.calls <= BREAKER["fail_max"] + 1, bad.calls
                ok = [outcome for outcome in outcomes if isinstance(outcome, str)]
                assert len(ok) >= 20 - BREAKER["fail_max"], outcomes
            finally:
                own_redis.resume() if how == "frozen" else own_redis.start()
            await asyncio.sleep(0.4)  # retry_after: Redis is tried again
            before = dispatcher.stats()["state"]["fallbacks"]
            await timed_calls(dispatcher, 4, 2.0)
            assert dispatcher.stats()["state"]["fallbacks"] == before


@pytest.mark.parametrize("how", ["killed", "frozen"])
async def test_fleet_fail_closed_fails_typed_within_the_deadline(
    tmp_path: Path, own_redis: Redis, redis_prefix: str, how: str
) -> None:
    async with serving(Instance(HOSTS[0]), Instance(HOSTS[1])) as (one, two):
        manifest = local_fleet_manifest(
            tmp_path, own_redis.url, redis_prefix, [one.url, two.url], "fail_closed"
        )
        async with Dispatcher(manifest) as dispatcher:
            assert all(isinstance(o, str) for o in await timed_calls(dispatcher, 2, 2.0))
            sent = one.calls + two.calls
            own_redis.stop() if how == "killed" else own_redis.pause()
            # A replica trusts its view of a closed breaker for breaker_sync_ms (100 ms)
            # when nothing tells it otherwise (a frozen Redis pushes nothing): let it age.
            await asyncio.sleep(0.2)
            try:
                outcomes = await timed_calls(dispatcher, 8, 0.5)
                assert all(isinstance(o, StateUnavailable) for o in outcomes), outcomes
                assert all(o.retryable and "state store" in o.message for o in outcomes)
                assert one.calls + two.calls == sent  # refused before reaching any instance
            finally:
                own_redis.resume() if how == "frozen" else own_redis.start()
            await asyncio.sleep(0.4)
            assert all(isinstance(o, str) for o in await timed_calls(dispatcher, 3, 2.0))


async def test_memory_backend_fleet_keeps_its_plain_breakers(tmp_path: Path) -> None:
    """Without ``state: redis`` a fleet's step is the one it always was: no shared breaker."""
    async with serving(Instance(HOSTS[0]), Instance(HOSTS[1])) as (one, two):
        path = fleet_manifest(tmp_path, "redis://127.0.0.1:1", "unused", [one.url, two.url])
        document = json.loads(path.read_text())
        del document["state"]
        path.write_text(json.dumps(document))
        async with Dispatcher(load_manifest(path)) as dispatcher:
            await dispatcher.call("counter", "ping", {})
            assert dispatcher.policies is not None
            assert dispatcher.policies.targets.shared_breakers == {}
            assert len(dispatcher.policies.targets.breakers) == 2
            assert dispatcher.stats()["shared_breakers"] == {}


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_a_corrupted_instance_breaker_is_a_typed_error_or_a_fallback(
    tmp_path: Path, own_redis: Redis, redis_prefix: str, mode: str
) -> None:
    """A hash some other writer garbled (a lying peer): never a traceback or a hang."""
    import redis

    async with serving(Instance(HOSTS[0]), Instance(HOSTS[1])) as (one, two):
        manifest = local_fleet_manifest(
            tmp_path, own_redis.url, redis_prefix, [one.url, two.url], mode
        )
        async with Dispatcher(manifest) as dispatcher:
            assert dispatcher.fleets is not None
            (fleet,) = dispatcher.fleets.fleets.values()
            with redis.Redis.from_url(own_redis.url) as client:
                for instance in fleet.instances:
                    key = f"{redis_prefix}:breaker:{digest(instance.key)}"
                    garbage = {"state": "open", "opened_at": "soon", "failures": "x"}
                    client.hset(key, mapping=garbage)
            await asyncio.sleep(0.2)  # past breaker_sync_ms: the next call reads the hash
            (outcome,) = await timed_calls(dispatcher, 1, 1.0)
            if mode == "fail_open":
                assert outcome in HOSTS
            else:
                assert isinstance(outcome, StateUnavailable), outcome
                assert "circuit breaker" in outcome.message
            shared = dispatcher.stats()["shared_breakers"]
            assert sorted(shared) == sorted(each.target.describe() for each in fleet.instances)
