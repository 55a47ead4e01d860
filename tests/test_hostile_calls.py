"""Odd timeouts, params that are not JSON, hostile nesting, tight deadlines in a batch,
caller scopes and rate-limit hints: each gets a typed, truthful answer.

Against the example plugin in-process and served over HTTP by the SDK (real servers).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from dispatcher import DeadlineExceeded, Dispatcher, InvalidParams, RateLimited
from dispatcher.policies import ratelimit
from tests.conftest import LOCAL_TARGET, echo_plugin, manifest

ODD_TIMEOUTS = [float("inf"), float("-inf"), float("nan"), 1e300, 10**30, True, "1"]
NOT_JSON_NUMBERS = [float("nan"), float("inf"), float("-inf")]


def deeply_nested(depth: int) -> Any:
    params: Any = "bottom"
    for _ in range(depth):
        params = {"text": params}
    return params


@pytest.fixture(params=["local", "http"])
async def dispatcher(request: pytest.FixtureRequest, echo_url: str) -> Any:
    target = LOCAL_TARGET if request.param == "local" else {"provider": "http", "url": echo_url}
    async with Dispatcher(manifest(echo_plugin("echo", target))) as started:
        yield started


@pytest.mark.parametrize("timeout", ODD_TIMEOUTS, ids=repr)
async def test_an_odd_timeout_is_refused_by_name(dispatcher: Dispatcher, timeout: Any) -> None:
    with pytest.raises((InvalidParams, DeadlineExceeded), match="timeout"):
        await dispatcher.call("echo", "say", {"text": "hi"}, timeout=timeout)


@pytest.mark.parametrize("number", NOT_JSON_NUMBERS, ids=repr)
async def test_nan_and_infinity_in_params_are_invalid(
    dispatcher: Dispatcher, number: float
) -> None:
    with pytest.raises(InvalidParams, match="JSON"):
        await dispatcher.call("echo", "say", {"text": [1.5, {"deep": number}]})


async def test_json_null_and_ordinary_floats_still_pass(dispatcher: Dispatcher) -> None:
    result = await dispatcher.call("echo", "say", {"text": [None, 1.5, -0.0, 1e300]})
    assert result["text"] == [None, 1.5, -0.0, 1e300]


async def test_nesting_too_deep_is_invalid_params(dispatcher: Dispatcher) -> None:
    with pytest.raises(InvalidParams):
        await dispatcher.call("echo", "say", deeply_nested(2_000))


async def test_nesting_too_deep_for_the_schema_validator_is_invalid_params() -> None:
    schema = {"type": "object", "properties": {"text": {"$ref": "#"}}}
    plugin = echo_plugin("echo", LOCAL_TARGET, methods={"say": {"params_schema": schema}})
    async with Dispatcher(manifest(plugin)) as dispatcher:
        with pytest.raises(InvalidParams, match="deep"):
            await dispatcher.call("echo", "say", deeply_nested(2_000))


async def test_a_call_whose_deadline_is_shorter_than_the_batch_window_is_sent(
    echo_url: str,
) -> None:
    batch = {"batch": {"max_size": 100, "max_wait_ms": 2_000}}
    plugin = echo_plugin("echo", {"provider": "http", "url": echo_url}, methods={"say": batch})
    async with Dispatcher(manifest(plugin)) as dispatcher:
        alone = await dispatcher.call("echo", "say", {"text": "alone"}, timeout=0.5)
        first = asyncio.create_task(dispatcher.call("echo", "say", {"text": "slow"}, timeout=10))
        await asyncio.sleep(0.05)  # the batch window is open, waiting for more
        joined = await dispatcher.call("echo", "say", {"text": "hurried"}, timeout=0.5)
        assert (alone["text"], joined["text"]) == ("alone", "hurried")
        assert (await first)["text"] == "slow"


async def test_per_caller_cache_keeps_no_caller_and_empty_caller_apart() -> None:
    methods = {"say": {"pure": True, "cache": {"ttl_ms": 60_000, "per_caller": True}}}
    async with Dispatcher(manifest(echo_plugin("echo", LOCAL_TARGET, methods=methods))) as d:
        nobody = await d.call("echo", "say", {"text": "x"}, caller=None)
        empty = await d.call("echo", "say", {"text": "x"}, caller="")
        assert (nobody["caller"], empty["caller"]) == (None, "")


async def test_rate_limited_says_how_long_until_a_slot_frees() -> None:
    limit = {"rate": 1, "burst": 1, "mode": "reject"}
    plugin = echo_plugin("echo", LOCAL_TARGET, methods={"say": {"rate_limit": limit}})
    async with Dispatcher(manifest(plugin)) as dispatcher:
        await dispatcher.call("echo", "say", {"text": "x"})
        await asyncio.sleep(0.4)
        with pytest.raises(RateLimited) as refused:
            await dispatcher.call("echo", "say", {"text": "x"})
    retry_after = refused.value.retry_after
    assert retry_after is not None
    assert 0 < retry_after <= 0.65, retry_after  # 1 s for the slot, 0.4 s already gone
    assert not math.isclose(retry_after, 1.0)


async def test_a_caller_hammering_its_limit_gets_no_more_than_its_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-caller buckets are forgotten once unused, so callers cannot grow memory.
    Before, "unused" was counted from the bucket's creation (cachetools' TTLCache sets an
    item's time to live when it is stored, not when it is read): a caller kept at its
    limit got a new, empty bucket every ``CALLER_BUCKET_IDLE_SECONDS`` (600 s), its whole
    burst again each time, and calls queued in ``mode: wait`` on the old bucket while new
    ones passed on the new. Shortened here to 0.2 s to see it in a second."""
    monkeypatch.setattr(ratelimit, "CALLER_BUCKET_IDLE_SECONDS", 0.2)
    limit = {"rate": 2, "burst": 4, "mode": "reject", "scope": "caller"}
    plugin = echo_plugin("echo", LOCAL_TARGET, methods={"say": {"rate_limit": limit}})
    async with Dispatcher(manifest(plugin)) as dispatcher:
        loop = asyncio.get_running_loop()
        started = loop.time()
        passed = refused = 0
        while loop.time() - started < 1.5:
            try:
                await dispatcher.call("echo", "say", {"text": "x"}, caller="mallory")
                passed += 1
            except RateLimited:
                refused += 1
            await asyncio.sleep(0.02)
        elapsed = loop.time() - started
        # Another caller still has a whole burst of its own.
        for _ in range(4):
            await dispatcher.call("echo", "say", {"text": "x"}, caller="alice")
    assert refused > 0
    assert passed <= 4 + 2 * elapsed + 1, (passed, elapsed)  # burst + rate·T, one of slack


async def test_buckets_of_callers_gone_quiet_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    """What bounds the memory of per-caller limits: a bucket unused for
    ``CALLER_BUCKET_IDLE_SECONDS`` that has drained is forgotten when a new caller comes."""
    monkeypatch.setattr(ratelimit, "CALLER_BUCKET_IDLE_SECONDS", 0.2)
    limit = {"rate": 100, "burst": 1, "mode": "reject", "scope": "caller"}
    plugin = echo_plugin("echo", LOCAL_TARGET, methods={"say": {"rate_limit": limit}})
    async with Dispatcher(manifest(plugin)) as dispatcher:
        assert dispatcher.policies is not None
        (held,) = (each for limits in dispatcher.policies.method_limits.values() for each in limits)
        for n in range(300):
            await dispatcher.call("echo", "say", {"text": "x"}, caller=f"caller-{n}")
        assert "callers=300 " in repr(held)
        await asyncio.sleep(0.3)
        await dispatcher.call("echo", "say", {"text": "x"}, caller="newcomer")
        assert "callers=1 " in repr(held), repr(held)


async def test_a_flood_of_new_caller_ids_cannot_reset_an_established_callers_bucket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: past ``MAX_CALLER_BUCKETS`` the least recently used bucket was forgotten
    whatever its level, so one principal presenting a new id per call (ids are what the
    authenticator or the host says) pushed every other caller's bucket out, and each came
    back with a whole burst. Now a bucket that has not drained is never forgotten: the new
    ids share one overflow bucket, and memory stays bounded. 64 buckets here, not 100,000."""
    monkeypatch.setattr(ratelimit, "MAX_CALLER_BUCKETS", 64)
    limit = {"rate": 0.5, "burst": 3, "mode": "reject", "scope": "caller"}
    plugin = echo_plugin("echo", LOCAL_TARGET, methods={"say": {"rate_limit": limit}})
    async with Dispatcher(manifest(plugin)) as dispatcher:
        assert dispatcher.policies is not None
        (held,) = (each for limits in dispatcher.policies.method_limits.values() for each in limits)
        for _ in range(3):
            await dispatcher.call("echo", "say", {"text": "x"}, caller="alice")
        with pytest.raises(RateLimited):
            await dispatcher.call("echo", "say", {"text": "x"}, caller="alice")
        flood_passed = 0
        for n in range(1_000):
            try:
                await dispatcher.call("echo", "say", {"text": "x"}, caller=f"mallory-{n}")
                flood_passed += 1
            except RateLimited:
                pass
        with pytest.raises(RateLimited):  # alice's bucket is as she left it
            await dispatcher.call("echo", "say", {"text": "x"}, caller="alice")
        assert "callers=64 overflow" in repr(held), repr(held)
    # 63 ids with buckets of their own, then one shared burst for the 937 others.
    assert flood_passed == 63 + 3, flood_passed
