"""A reload that changes what a target's policies are set to applies it.

Breakers, target bulkheads, retry budgets and target rate limits are kept by target and
shared by every method calling it, so a reload that rebuilds a method finds them already
there. Before, it took them as they were: a reload that lowered ``fail_max`` or raised
``max_in_flight`` changed nothing until a restart, unsaid, and a changed target rate
limit stood beside the old one, which went on limiting host events. Now the first
method of the reload to configure one sets it, and it stays the same object with its
state (failures, calls in flight, tokens).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from dispatcher import Dispatcher, parse_manifest
from dispatcher.policies.concurrency import Bulkhead
from linchkit_plugin.errors import CircuitOpen, Overloaded, TargetUnavailable
from providers.invocation import Invocation
from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin, manifest
from tests.services import Redis

#: Nothing listens there: every call is a health failure (it cannot connect).
REFUSING = {"provider": "http", "url": "http://127.0.0.8:9"}


def refusing(**policies: Any) -> Any:
    entry = {"id": "down", "version": "1.0.0", "target": REFUSING, "methods": {"say": policies}}
    return manifest(entry)


async def test_a_reload_that_lowers_fail_max_opens_the_circuit_at_the_new_count() -> None:
    async with Dispatcher(refusing(breaker={"fail_max": 5})) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("down", "say", {"text": "x"})
        (breaker,) = runtime.targets.breakers.values()
        await dispatcher.reload(refusing(breaker={"fail_max": 2, "reset_timeout_ms": 60_000}))
        assert list(runtime.targets.breakers.values()) == [breaker]  # the same, its failure kept
        assert (breaker.fail_max, breaker.reset_timeout, breaker.failures) == (2, 60.0, 1)
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("down", "say", {"text": "x"})
        with pytest.raises(CircuitOpen):
            await dispatcher.call("down", "say", {"text": "x"})


async def test_a_reload_keeps_an_open_circuit_open_whatever_it_changes() -> None:
    async with Dispatcher(refusing(breaker={"fail_max": 1})) as dispatcher:
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("down", "say", {"text": "x"})
        await dispatcher.reload(refusing(breaker={"fail_max": 3}, timeout_ms=2_000))
        with pytest.raises(CircuitOpen):
            await dispatcher.call("down", "say", {"text": "x"})


def sleeper(max_in_flight: int) -> Any:
    concurrency = {"max_in_flight": max_in_flight, "scope": "target"}
    return manifest(
        echo_plugin("echo", LOCAL_TARGET, methods={"sleep": {"concurrency": concurrency}})
    )


async def naps(dispatcher: Dispatcher, count: int) -> list[Any]:
    calls = [dispatcher.call("echo", "sleep", {"seconds": 0.3}) for _ in range(count)]
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_a_reload_that_raises_a_target_bulkhead_lets_that_many_calls_in() -> None:
    async with Dispatcher(sleeper(1)) as dispatcher:
        outcomes = await naps(dispatcher, 3)
        assert sum(isinstance(each, Overloaded) for each in outcomes) == 2
        await dispatcher.reload(sleeper(3))
        outcomes = await naps(dispatcher, 3)
        assert not any(isinstance(each, BaseException) for each in outcomes), outcomes


async def test_a_reload_that_lowers_a_target_bulkhead_cuts_no_call_and_admits_under_it() -> None:
    async with Dispatcher(sleeper(3)) as dispatcher:
        running = asyncio.ensure_future(naps(dispatcher, 3))
        await asyncio.sleep(0.1)  # three in flight
        await dispatcher.reload(sleeper(1))
        with pytest.raises(Overloaded):  # three in flight, one allowed
            await dispatcher.call("echo", "sleep", {"seconds": 0})
        assert all(isinstance(each, float) for each in await running)  # none cut
        outcomes = await naps(dispatcher, 2)  # all ended: one at a time
        assert sum(isinstance(each, Overloaded) for each in outcomes) == 1


async def test_a_reload_that_changes_a_target_rate_limit_leaves_only_the_new_one() -> None:
    def limited(rate: int) -> Any:
        limit = {"rate": rate, "burst": 1, "scope": "target", "mode": "reject"}
        return manifest(echo_plugin("echo", LOCAL_TARGET, methods={"say": {"rate_limit": limit}}))

    async with Dispatcher(limited(1)) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        await dispatcher.call("echo", "say", {"text": "x"})
        await dispatcher.reload(limited(1000))
        (limit,) = runtime.targets.target_limits.values()
        assert limit.spec.rate == 1000
        assert len(dispatcher.stats()["rate_limits"]) == 1
        (target,) = dispatcher.manifest.plugins[0].targets()
        (gated,) = runtime.event_gate(target).limits  # host events: the new limit alone
        assert gated is limit


async def test_a_reload_that_changes_a_retry_budget_ratio_sets_its_capacity() -> None:
    def retried(ratio: float) -> Any:
        return refusing(idempotent=True, retry={"attempts": 2, "budget_ratio": ratio})

    async with Dispatcher(retried(0.2)) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        (budget,) = runtime.targets.budgets.values()
        assert budget.capacity == 20
        await dispatcher.reload(retried(0.05))
        assert list(runtime.targets.budgets.values()) == [budget]
        assert (budget.ratio, budget.capacity, budget.tokens) == (0.05, 5, 5)


# -- the bulkhead's resize, alone ---------------------------------------------------------


def invocation() -> Invocation:
    deadline = asyncio.get_running_loop().time() + 5
    return Invocation("p", "1.0.0", "m", None, deadline, "request")


async def test_a_bulkhead_raised_wakes_its_waiting_calls_at_once() -> None:
    bulkhead = Bulkhead("t", 1, 5)
    await bulkhead.acquire(invocation())
    waiting = [asyncio.ensure_future(bulkhead.acquire(invocation())) for _ in range(2)]
    await asyncio.sleep(0)
    assert bulkhead.waiting == 2
    bulkhead.resize(3, 5)
    await asyncio.wait_for(asyncio.gather(*waiting), 1)
    assert bulkhead.in_flight == 3 and bulkhead.max_in_flight == 3


async def test_a_bulkhead_lowered_takes_its_slots_back_as_calls_end() -> None:
    bulkhead = Bulkhead("t", 4, 0)
    for _ in range(3):
        await bulkhead.acquire(invocation())
    bulkhead.resize(1, 0)  # one free slot taken at once, two owed by the calls
    assert bulkhead.in_flight == 3
    with pytest.raises(Overloaded):
        await bulkhead.acquire(invocation())
    bulkhead.release()
    bulkhead.release()
    assert bulkhead.in_flight == 1
    with pytest.raises(Overloaded):  # one in flight, one allowed
        await bulkhead.acquire(invocation())
    bulkhead.release()
    assert bulkhead.in_flight == 0
    await bulkhead.acquire(invocation())
    bulkhead.resize(2, 0)  # raised again: the owed are none, a slot is added
    await bulkhead.acquire(invocation())
    assert bulkhead.in_flight == 2


# -- with ``state: redis``: the breakers every replica shares ------------------------------


def shared(redis: Redis, prefix: str, host: str, fail_max: int) -> Any:
    entry = {
        "id": "down",
        "version": "1.0.0",
        "target": {"provider": "http", "url": f"http://{host}:9"},
        "methods": {"say": {"breaker": {"fail_max": fail_max, "reset_timeout_ms": 60_000}}},
    }
    state = {"backend": "redis", "url": redis.url, "key_prefix": prefix}
    return parse_manifest({"version": 1, "state": state, "plugins": [entry]}, base_dir=ROOT)


async def test_a_reload_sets_a_shared_breaker_s_settings_and_lets_go_of_those_it_left(
    redis_server: Redis, redis_prefix: str
) -> None:
    """A shared breaker follows a reload's ``fail_max`` as its local one does; one whose
    target a reload left is no longer watched (before: every breaker a replica had ever
    held was followed, and read again at each reconnect of its notifications)."""
    async with Dispatcher(shared(redis_server, redis_prefix, "127.0.0.8", 5)) as dispatcher:
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("down", "say", {"text": "x"})
        await dispatcher.reload(shared(redis_server, redis_prefix, "127.0.0.8", 2))
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("down", "say", {"text": "x"})
        with pytest.raises(CircuitOpen):  # Redis counted two of two
            await dispatcher.call("down", "say", {"text": "x"})
        for number in range(9, 14):  # five moves
            await dispatcher.reload(shared(redis_server, redis_prefix, f"127.0.0.{number}", 2))
        assert dispatcher.stats()["state"]["breakers_watched"] == 1
        assert len(dispatcher.stats()["shared_breakers"]) == 1


async def test_a_reload_sets_the_breakers_of_a_fleet_s_instances_too() -> None:
    """Each instance of a fleet has its own breaker, made once and kept on the instance:
    a reload's settings reach it as they reach a plain target's."""

    def fleet(fail_max: int) -> Any:
        urls = [{"url": "http://127.0.0.8:9"}, {"url": "http://127.0.0.9:9"}]
        target = {"provider": "http", "instances": urls, "balance": "round_robin"}
        methods = {"say": {"breaker": {"fail_max": fail_max, "reset_timeout_ms": 60_000}}}
        return manifest({"id": "down", "version": "1.0.0", "target": target, "methods": methods})

    async with Dispatcher(fleet(5)) as dispatcher:
        await dispatcher.reload(fleet(1))
        runtime = dispatcher.policies
        assert runtime is not None
        assert [each.fail_max for each in runtime.targets.breakers.values()] == [1, 1]
        # Neither connects: the call fails over to the other, one failure each, both open.
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("down", "say", {"text": "x"})
        assert [str(each.state) for each in runtime.targets.breakers.values()] == ["open", "open"]
        with pytest.raises(CircuitOpen):
            await dispatcher.call("down", "say", {"text": "x"})


async def test_a_bulkhead_resized_under_load_never_admits_past_its_limit_and_ends_whole() -> None:
    """Calls acquiring and releasing at random while the limit moves up and down: no more
    than the limit start once what was owed is given back, every waiter admitted ends,
    and the bulkhead ends as a new one of its last size (every slot back, none owed)."""
    rng = random.Random(7)
    bulkhead = Bulkhead("t", 4, 1_000)
    holding = 0
    most_over_limit = 0

    async def call() -> None:
        nonlocal holding, most_over_limit
        await bulkhead.acquire(invocation())
        holding += 1
        if not bulkhead._owed:  # nothing owed: the limit holds exactly
            most_over_limit = max(most_over_limit, holding - bulkhead.max_in_flight)
        await asyncio.sleep(rng.random() / 200)
        holding -= 1
        bulkhead.release()

    calls = [asyncio.ensure_future(call()) for _ in range(300)]
    for _ in range(60):
        await asyncio.sleep(rng.random() / 100)
        bulkhead.resize(rng.randint(1, 8), 1_000)
    await asyncio.wait_for(asyncio.gather(*calls), 30)
    assert most_over_limit <= 0
    assert (bulkhead.in_flight, bulkhead._owed, bulkhead.waiting) == (0, 0, 0)
    assert bulkhead._slots._value == bulkhead.max_in_flight


async def test_a_reload_that_takes_a_target_s_policies_off_drops_what_they_kept() -> None:
    """A method whose breaker, bulkhead, retry and target limit a reload took off: what
    they kept by target goes (before: it stayed in ``stats()``, and host events to the
    target still passed that breaker and that limit)."""
    policies = {
        "breaker": {"fail_max": 1},
        "concurrency": {"max_in_flight": 2, "scope": "target"},
        "rate_limit": {"rate": 1, "burst": 1, "scope": "target"},
        "idempotent": True,
        "retry": {"attempts": 2},
    }
    async with Dispatcher(refusing(**policies)) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        (target,) = dispatcher.manifest.plugins[0].targets()
        assert runtime.event_gate(target).breaker is not None
        await dispatcher.reload(refusing(timeout_ms=1_000))
        stats = dispatcher.stats()
        assert not stats["breakers"] and not stats["bulkheads"] and not stats["rate_limits"]
        assert not stats["retry_budgets"]
        gate = runtime.event_gate(target)
        assert (gate.breaker, gate.bulkhead, tuple(gate.limits)) == (None, None, ())


async def test_a_reload_that_takes_a_method_s_policies_off_drops_what_they_kept() -> None:
    """The same for what a method keeps of its own: its cache, limits and bulkhead, its
    retry counters, its batcher (closed). Before, a rebuilt chain only replaced them, so
    a policy taken off left them in ``stats()``, the batcher open, for good."""
    policies = {
        "pure": True,
        "cache": {"ttl_ms": 60_000},
        "concurrency": {"max_in_flight": 2},
        "rate_limit": {"rate": 100},
        "idempotent": True,
        "retry": {"attempts": 2},
        "batch": {"max_size": 10, "max_wait_ms": 5},
    }
    async with Dispatcher(refusing(**policies)) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        before = dispatcher.stats()
        assert before["caches"] and before["retries"] and before["batchers"]
        assert before["bulkheads"] and before["rate_limits"]
        await dispatcher.reload(refusing(timeout_ms=1_000))
        stats = dispatcher.stats()
        for kind in ("caches", "retries", "batchers", "bulkheads", "rate_limits"):
            assert not stats[kind], (kind, stats[kind])
        assert not runtime.replaced_versions()  # its batcher was closed at the reload's end
