"""Hostile shared state: what another writer of the same Redis and key prefix (a replica
of another release, a compromised one, a person with redis-cli) leaves where this
replica's policies read. A real Redis (``tests.services``); a raw client plays the other
writer. Whatever it wrote, a call ends with its result or a typed error, and the shared
state of every other call stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from dispatcher import (
    CircuitOpen,
    Dispatcher,
    ProviderError,
    RateLimited,
    ResultTooLarge,
    TargetUnavailable,
)
from dispatcher._routes import MAX_TIMEOUT_SECONDS
from dispatcher.config import load_manifest
from dispatcher.policies.shared import LONGEST_WAIT_SECONDS
from dispatcher.state import StateUnavailable
from dispatcher.state.redis_store import RedisState
from tests.services import Redis, free_port, until

PLUGINS = Path(__file__).resolve().parent / "plugins"


def counter(folder: Path, url: str, prefix: str, mode: str = "fail_open") -> Dispatcher:
    """The counting plugin in this process: ``read`` cached, ``charge`` called with keys,
    ``ping`` rate limited."""
    target = {
        "provider": "local",
        "entrypoint": "counting_plugin:CountingPlugin",
        "path": str(PLUGINS),
    }
    methods = {
        "read": {"pure": True, "cache": {"ttl_ms": 60_000}},
        "charge": {},
        "ping": {"rate_limit": {"rate": 100, "burst": 10, "mode": "reject"}},
    }
    return dispatcher_of(folder, url, prefix, mode, target, methods)


def dispatcher_of(
    folder: Path,
    url: str,
    prefix: str,
    mode: str,
    target: dict[str, Any],
    methods: dict[str, Any],
    **state: Any,
) -> Dispatcher:
    path = folder / "plugins.yaml"
    state = {"backend": "redis", "url": url, "key_prefix": prefix, "on_unavailable": mode, **state}
    document = {
        "version": 1,
        "state": state,
        "plugins": [{"id": "counter", "version": "1.0.0", "target": target, "methods": methods}],
    }
    path.write_text(json.dumps(document))  # JSON is YAML
    return Dispatcher(load_manifest(path))


async def only_key(client: aioredis.Redis, pattern: str) -> bytes:
    (key,) = [key async for key in client.scan_iter(match=pattern)]
    return bytes(key)


async def limit_key_of_pings(dispatcher: Dispatcher, prefix: str) -> bytes:
    """The key of ``ping``'s shared limit: the name the limit asks the store for, read off
    one call. (Scanning Redis for it raced its expiry, 10 ms after one call at 100 a
    second: on a busy machine ten scans in a row came too late.)"""
    assert dispatcher.state_backend is not None
    store: Any = dispatcher.state_backend.store
    asked: list[str] = []
    acquire = store.acquire

    async def recording(key: str, *args: Any, **options: Any) -> Any:
        asked.append(key)
        return await acquire(key, *args, **options)

    store.acquire = recording
    try:
        assert await dispatcher.call("counter", "ping") == "pong"
    finally:
        del store.acquire
    (key,) = set(asked)
    return f"{prefix}:limit:{key}".encode()


@pytest.fixture
async def writer(redis_server: Redis) -> Any:
    """The other writer: a plain client of the same Redis."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


# -- the shared result cache ---------------------------------------------------------------


@pytest.mark.parametrize(
    "entry", [b"{not json", b"", b"\xff\xfe"], ids=["broken", "empty", "bytes"]
)
async def test_a_cached_entry_that_is_not_json_is_a_miss_and_is_replaced(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    writer: aioredis.Redis,
    entry: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        assert await dispatcher.call("counter", "read", {"item": "a"}) == {"item": "a", "read": 1}
        await writer.set(await only_key(writer, f"{redis_prefix}:cache:*"), entry)
        with caplog.at_level(logging.WARNING, logger="dispatcher.state"):
            fresh = await dispatcher.call("counter", "read", {"item": "a"})
        assert fresh == {"item": "a", "read": 2}  # the target answered, not the entry
        assert "not JSON" in caplog.text
        # The fresh result took the entry's place: the next call is a hit again.
        assert await dispatcher.call("counter", "read", {"item": "a"}) == fresh
        assert dispatcher.stats()["state"]["fallbacks"] == 0


async def test_a_cached_entry_that_is_not_json_and_stays_is_logged_sparingly(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    writer: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An entry that is not JSON is replaced by the fresh result, unless that result is
    not stored (not JSON itself, over the bound, a write that failed): then every call
    met the entry again and logged a warning, one line per call for as long as the entry
    lived. Counted per method and logged sparingly (the first, the 1,000th, …)."""
    target = {
        "provider": "local",
        "entrypoint": "counting_plugin:CountingPlugin",
        "path": str(PLUGINS),
    }
    methods = {"measure": {"pure": True, "cache": {"ttl_ms": 60_000}}}
    async with dispatcher_of(
        tmp_path, redis_server.url, redis_prefix, "fail_open", target, methods
    ) as dispatcher:
        assert (await dispatcher.call("counter", "measure", {"item": "a"}))["read"] == 1
        await writer.set(await only_key(writer, f"{redis_prefix}:cache:*"), b"{not json")
        with caplog.at_level(logging.WARNING, logger="dispatcher.state"):
            for run in range(2, 12):  # each answer holds NaN: served, never stored
                answer = await dispatcher.call("counter", "measure", {"item": "a"})
                assert answer["read"] == run
        said = [r.getMessage() for r in caplog.records if "not JSON" in r.getMessage()]
        assert len(said) == 1, said
        assert dispatcher.stats()["state"]["fallbacks"] == 0


async def test_a_cached_entry_over_the_bound_is_never_read_and_is_dropped(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    writer: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Read whole, one such entry cost every call of the method its transfer; at 64 MiB
    it outlasted op_timeout_ms, so every read failed, and each failure made the replica
    skip Redis for retry_after_ms: every limit, breaker and key of the replica fell back
    to its own state (fail_closed: failed), for as long as the entry lived."""
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        assert await dispatcher.call("counter", "read", {"item": "a"}) == {"item": "a", "read": 1}
        key = await only_key(writer, f"{redis_prefix}:cache:*")
        await writer.set(key, b'"' + b"x" * (17 * 1024 * 1024) + b'"', px=60_000)
        with caplog.at_level(logging.WARNING, logger="dispatcher.state"):
            fresh = await dispatcher.call("counter", "read", {"item": "a"})
        assert fresh == {"item": "a", "read": 2}
        assert "over the bound" in caplog.text
        assert await writer.strlen(key) == len(json.dumps(fresh, separators=(",", ":")))
        state = dispatcher.stats()["state"]
        assert state["failures"] == 0 and state["fallbacks"] == 0


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_a_cached_entry_of_another_type_is_a_miss_and_is_replaced(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    writer: aioredis.Redis,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hash where the entry's string belongs failed every read with WRONGTYPE, taken
    for Redis being unavailable: with fail_open every call of the method fell back (no
    cache, a fallback counted, nothing replacing the entry), with fail_closed every call
    failed, for as long as the entry lived. It is an entry no dispatcher wrote, as one
    that is not JSON is: a miss, logged, dropped, and the fresh result takes its place."""
    async with counter(tmp_path, redis_server.url, redis_prefix, mode) as dispatcher:
        assert await dispatcher.call("counter", "read", {"item": "a"}) == {"item": "a", "read": 1}
        key = await only_key(writer, f"{redis_prefix}:cache:*")
        await writer.delete(key)
        await writer.hset(key, mapping={"result": "forged"})
        with caplog.at_level(logging.WARNING, logger="dispatcher.state"):
            fresh = await dispatcher.call("counter", "read", {"item": "a"})
        assert fresh == {"item": "a", "read": 2}
        assert "a hash, not a string" in caplog.text
        assert await dispatcher.call("counter", "read", {"item": "a"}) == fresh  # a hit
        assert await writer.type(key) == b"string"
        state = dispatcher.stats()["state"]
        assert state["failures"] == 0 and state["fallbacks"] == 0


async def test_a_cache_generation_that_is_not_a_number_is_a_typed_fallback(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis
) -> None:
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        await dispatcher.call("counter", "read", {"item": "a"})
        await dispatcher.ainvalidate("counter", "read")  # the counter exists from then on
        await writer.set(await only_key(writer, f"{redis_prefix}:cachegen:*"), "1.5")
        assert await dispatcher.call("counter", "read", {"item": "a"}) == {"item": "a", "read": 2}
        assert dispatcher.stats()["state"]["fallbacks"] == 1
    async with counter(tmp_path, redis_server.url, redis_prefix, "fail_closed") as dispatcher:
        with pytest.raises(StateUnavailable, match="generation"):
            await dispatcher.call("counter", "read", {"item": "a"})


# -- idempotency records --------------------------------------------------------------------


@pytest.mark.parametrize(
    "outcome",
    [b"{garbage", b"", b"[1, 2]", b'"ok"', b"[" * 300 + b"]" * 300],
    ids=["broken", "empty", "list", "string", "deep"],
)
async def test_an_idempotency_outcome_no_dispatcher_wrote_is_a_typed_error_and_runs_nothing(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis, outcome: bytes
) -> None:
    params = {"amount": 1, "delay": 0}
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        first = await dispatcher.call("counter", "charge", params, idempotency_key="order-17")
        assert first == {"charged": 1, "run": 1}
        await writer.hset(await only_key(writer, f"{redis_prefix}:idem:*"), "outcome", outcome)
        with pytest.raises(ProviderError, match=r"order-17.*new key") as caught:
            await dispatcher.call("counter", "charge", params, idempotency_key="order-17")
        assert caught.value.retryable is False
        # What the first call did is unknown: the key never runs the plugin again.
        again = await dispatcher.call("counter", "charge", params, idempotency_key="order-18")
        assert again == {"charged": 1, "run": 2}


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_an_idempotency_record_of_another_type_runs_nothing(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis, mode: str
) -> None:
    """A string where the record's hash belongs failed the claim with WRONGTYPE, taken
    for Redis being unavailable: fail_open claimed this replica's own record instead and
    ran the plugin again for a key whose first call had run; fail_closed failed every
    duplicate retryably (come again, forever). It is a record no dispatcher wrote, as one
    whose outcome is garbled is: a typed, final error, and nothing runs."""
    params = {"amount": 1, "delay": 0}
    async with counter(tmp_path, redis_server.url, redis_prefix, mode) as dispatcher:
        first = await dispatcher.call("counter", "charge", params, idempotency_key="order-17")
        assert first == {"charged": 1, "run": 1}
        key = await only_key(writer, f"{redis_prefix}:idem:*")
        await writer.delete(key)
        await writer.set(key, "forged")
        with pytest.raises(ProviderError, match=r"order-17.*new key") as caught:
            await dispatcher.call("counter", "charge", params, idempotency_key="order-17")
        assert caught.value.retryable is False
        again = await dispatcher.call("counter", "charge", params, idempotency_key="order-18")
        assert again == {"charged": 1, "run": 2}  # order-17 ran once
        state = dispatcher.stats()["state"]
        assert state["failures"] == 0 and state["fallbacks"] == 0


@pytest.mark.parametrize("surface", ["call", "submit"])
async def test_an_idempotency_hash_no_dispatcher_wrote_is_never_taken_over(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis, surface: str
) -> None:
    """A hash where a key's record belongs, without the params' fingerprint (``fp``) that
    every claim writes: it was read as no record at all, and the claim wrote its own
    fields into it, set it to expire with its lease and ran the call (a submission queued
    a second job); what the other writer kept there was merged into a record, then gone.
    It is a record no dispatcher wrote, as one of another type is: a typed, final error,
    nothing runs or is queued, and the hash stays as it was."""
    params = {"amount": 1, "delay": 0}
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:

        async def keyed() -> Any:
            if surface == "call":
                return await dispatcher.call("counter", "charge", params, idempotency_key="o-17")
            return await dispatcher.submit("counter", "charge", params, idempotency_key="o-17")

        await keyed()
        key = await only_key(writer, f"{redis_prefix}:idem:*")
        await writer.delete(key)
        foreign = {b"owner": b"billing-v0", b"status": b"paid"}
        await writer.hset(key, mapping=foreign)
        for _ in range(2):  # the hash stays: so does the answer
            with pytest.raises(ProviderError, match=r"o-17.*new key") as caught:
                await keyed()
            assert caught.value.retryable is False
        assert await writer.hgetall(key) == foreign
        assert await writer.pttl(key) == -1  # no lease's expiry set on it
        if surface == "call":
            again = await dispatcher.call("counter", "charge", params, idempotency_key="o-18")
            assert again == {"charged": 1, "run": 2}  # o-17 ran once
        else:
            assert await writer.xlen(f"{redis_prefix}:jobs") == 1
        state = dispatcher.stats()["state"]
        assert state["failures"] == 0 and state["fallbacks"] == 0


@pytest.mark.parametrize("kind", ["limit", "breaker"])
async def test_a_limit_or_breaker_of_another_type_is_refused_as_a_garbled_one(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis, kind: str
) -> None:
    """The same as a value no dispatcher writes: refused, this replica's own state used
    (fail_open), never read as a limit that refuses for ever or a circuit that never
    opens. (It was already: WRONGTYPE is a refusal as UNREADABLE is.)"""
    if kind == "limit":
        made = counter(tmp_path, redis_server.url, redis_prefix)
    else:
        made = unreachable(tmp_path, redis_server.url, redis_prefix, "fail_open", 60_000)
    async with made as dispatcher:
        if kind == "limit":
            key = await limit_key_of_pings(dispatcher, redis_prefix)
        else:
            with contextlib.suppress(TargetUnavailable):
                await dispatcher.call("counter", "ping")
            key = await only_key(writer, f"{redis_prefix}:{kind}:*")
        await writer.delete(key)
        if kind == "breaker":
            await writer.set(key, "1")
        else:
            await writer.hset(key, "f", "1")
        with contextlib.suppress(TargetUnavailable):
            await dispatcher.call("counter", "ping")
        assert dispatcher.stats()["state"]["fallbacks"] == 1


@pytest.mark.parametrize(
    "outcome", [b"{garbage", b'{"ok": true, "result": 17}'], ids=["broken", "no-job-id"]
)
async def test_a_submission_record_no_dispatcher_wrote_is_a_typed_error(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis, outcome: bytes
) -> None:
    """A record whose result is no job id (a dispatcher records the id it queued) was
    polled until the submission's wait ran out, then answered as a retryable deadline:
    "submit again", which met the same record for as long as it was kept."""
    params = {"amount": 1, "delay": 0}
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        await dispatcher.submit("counter", "charge", params, idempotency_key="order-17")
        record = await only_key(writer, f"{redis_prefix}:idem:*")  # the submission's
        await writer.hset(record, "outcome", outcome)
        with pytest.raises(ProviderError, match=r"order-17.*new key") as caught:
            await dispatcher.submit("counter", "charge", params, idempotency_key="order-17")
        assert caught.value.retryable is False


# -- shared breakers and rate limits ------------------------------------------------------------


def unreachable(folder: Path, url: str, prefix: str, mode: str, reset_ms: int) -> Dispatcher:
    """A target nothing listens at, behind a shared breaker that opens after 2 failures;
    every call asks Redis (no view of the breaker is trusted in between)."""
    target = {"provider": "http", "url": f"http://127.0.0.1:{free_port()}"}
    breaker = {"fail_max": 2, "reset_timeout_ms": reset_ms, "half_open_max_calls": 1}
    methods = {"ping": {"breaker": breaker}}
    return dispatcher_of(folder, url, prefix, mode, target, methods, breaker_sync_ms=0)


async def store_now_us(client: aioredis.Redis) -> int:
    """Redis's clock, which the breaker's script reads, in microseconds."""
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


@pytest.mark.parametrize(
    "fields",
    [
        {"state": "shut"},
        {"state": "closed", "failures": "x"},
        {"state": "closed", "failures": "nan"},
        {"generation": "nan"},
        {"generation": "1e300"},
    ],
    ids=["unknown-state", "failures-word", "failures-nan", "generation-nan", "generation-1e300"],
)
@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_a_breaker_hash_no_dispatcher_wrote_is_refused_never_read_as_closed(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    writer: aioredis.Redis,
    fields: dict[str, str],
    mode: str,
) -> None:
    """Read as it was, an unknown state admitted every call and never opened, a NaN count
    never reached fail_max, both for every replica and for good (each operation renewed
    the hash's TTL), and a count that is no number ended the script's reply early (a Lua
    nil ends an array): a ValueError out of the call."""
    async with unreachable(tmp_path, redis_server.url, redis_prefix, mode, 60_000) as dispatcher:
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("counter", "ping")
        await writer.hset(await only_key(writer, f"{redis_prefix}:breaker:*"), mapping=fields)
        if mode == "fail_closed":
            with pytest.raises(StateUnavailable, match="circuit breaker"):
                await dispatcher.call("counter", "ping")
            return
        # The local breaker decides while the shared one cannot: it opens after fail_max.
        for _ in range(2):
            with pytest.raises(TargetUnavailable):
                await dispatcher.call("counter", "ping")
        with pytest.raises(CircuitOpen):
            await dispatcher.call("counter", "ping")
        assert dispatcher.stats()["state"]["fallbacks"] >= 3


async def test_a_breaker_opened_ahead_of_the_stores_clock_stays_open_no_longer_than_reset(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis
) -> None:
    """A time ahead of Redis's clock (a failover to a server whose clock is behind, or a
    lying writer) kept the circuit open, and its half-open probes refused, until that
    time came: a year here, for every replica."""
    async with unreachable(
        tmp_path, redis_server.url, redis_prefix, "fail_open", 500
    ) as dispatcher:
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("counter", "ping")
        key = await only_key(writer, f"{redis_prefix}:breaker:*")
        year_ahead = str(await store_now_us(writer) + 365 * 86_400 * 1_000_000)
        await writer.hset(key, mapping={"state": "open", "opened_at": year_ahead})
        with pytest.raises(CircuitOpen) as caught:
            await dispatcher.call("counter", "ping")
        assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 0.5
        await writer.hset(
            key, mapping={"state": "half-open", "probes": "1", "probe_until": year_ahead}
        )
        with pytest.raises(CircuitOpen):  # the probe slot is taken, for reset_timeout at most
            await dispatcher.call("counter", "ping")
        await asyncio.sleep(0.6)
        with pytest.raises(TargetUnavailable):  # a probe again
            await dispatcher.call("counter", "ping")


@pytest.mark.parametrize("stored", ["inf", "1e300", "soon"])
@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_a_rate_limit_value_no_dispatcher_wrote_is_refused_never_a_negative_wait(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    writer: aioredis.Redis,
    stored: str,
    mode: str,
) -> None:
    """Read as a number, "inf" or "1e300" refused every call of the method on every
    replica, whatever on_unavailable said, with a retry_after of -9.2e12 s (Lua's
    infinity made a 64-bit integer), until the key was deleted."""
    async with counter(tmp_path, redis_server.url, redis_prefix, mode) as dispatcher:
        await writer.set(await limit_key_of_pings(dispatcher, redis_prefix), stored)
        if mode == "fail_closed":
            with pytest.raises(StateUnavailable, match="rate limit"):
                await dispatcher.call("counter", "ping")
            return
        assert await dispatcher.call("counter", "ping") == "pong"  # this replica's own limit
        assert dispatcher.stats()["state"]["fallbacks"] == 1


@pytest.mark.parametrize(
    ("mode", "expiry_ms"),
    [("reject", None), ("reject", 3_600_000), ("wait", None)],
    ids=["reject-no-expiry", "reject-an-hour", "wait-no-expiry"],
)
async def test_a_rate_limit_time_far_ahead_costs_at_most_one_window(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    writer: aioredis.Redis,
    expiry_ms: int | None,
    mode: str,
) -> None:
    """Decimal digits, so read as a time: a theoretical arrival time a year ahead refused
    every call of the method on every replica (retry_after: a year) until the key
    expired, and a key written without an expiry never does. A limit holds at most its
    burst window ahead of now (and in wait mode the waits it granted, never past the
    key's expiry): further is read as that bound, so the forged time costs one window.
    (Wait mode with a forged expiry: at most that expiry, and a day, the longest a call
    may legitimately have reserved ahead, which cannot be told from a forged time.)"""
    target = {
        "provider": "local",
        "entrypoint": "counting_plugin:CountingPlugin",
        "path": str(PLUGINS),
    }
    limit = {"rate": 100, "burst": 10, "mode": mode}  # a window of 100 ms
    methods = {"ping": {"rate_limit": limit}}
    async with dispatcher_of(
        tmp_path, redis_server.url, redis_prefix, "fail_closed", target, methods
    ) as dispatcher:
        key = await limit_key_of_pings(dispatcher, redis_prefix)
        year_ahead = await store_now_us(writer) + 365 * 86_400 * 1_000_000
        await writer.set(key, str(year_ahead), px=expiry_ms)
        started = asyncio.get_running_loop().time()
        while True:
            try:
                assert await dispatcher.call("counter", "ping", timeout=1.0) == "pong"
                break
            except RateLimited as limited:  # reject mode: the window's last slot
                assert limited.retry_after is not None and limited.retry_after <= 0.2
                await asyncio.sleep(limited.retry_after)
        assert asyncio.get_running_loop().time() - started < 0.5
        stored = int(await writer.get(key))
        assert stored < await store_now_us(writer) + 200_000  # the window, not a year
        assert dispatcher.stats()["state"]["failures"] == 0


def test_a_wait_mode_limit_reads_ahead_no_further_than_the_longest_deadline() -> None:
    """The bound the store reads a wait-mode limit's time to (a layer below the routes,
    so a copy of theirs): shorter, a legitimate queue of waits would be cut and the limit
    admit more than its rate; longer, a forged time would refuse for longer."""
    assert LONGEST_WAIT_SECONDS == MAX_TIMEOUT_SECONDS


async def test_an_idempotency_outcome_over_the_bound_is_never_read_and_runs_nothing(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis
) -> None:
    """Read whole, a 64 MiB outcome outlasted op_timeout_ms: the claim failed, the
    replica skipped Redis for retry_after_ms, and with fail_open the duplicate claimed
    this replica's own record instead and ran the plugin again."""
    params = {"amount": 1, "delay": 0}
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        await dispatcher.call("counter", "charge", params, idempotency_key="order-17")
        huge = b'{"ok":true,"result":"' + b"x" * (17 * 1024 * 1024) + b'"}'
        await writer.hset(await only_key(writer, f"{redis_prefix}:idem:*"), "outcome", huge)
        with pytest.raises(ResultTooLarge, match=r"order-17.*new key") as caught:
            await dispatcher.call("counter", "charge", params, idempotency_key="order-17")
        assert caught.value.details["bytes"] == len(huge)
        again = await dispatcher.call("counter", "charge", params, idempotency_key="order-18")
        assert again == {"charged": 1, "run": 2}  # order-17 ran once
        state = dispatcher.stats()["state"]
        assert state["failures"] == 0 and state["fallbacks"] == 0


async def test_a_keyed_result_over_the_bound_is_not_recorded_whole(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis
) -> None:
    """Its duplicates are told it ran, and why they get no copy of it."""
    item = "x" * (17 * 1024 * 1024)
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        first = await dispatcher.call("counter", "read", {"item": item}, idempotency_key="big")
        assert first["read"] == 1
        record = await only_key(writer, f"{redis_prefix}:idem:*")
        assert await writer.hstrlen(record, "outcome") < 1024
        with pytest.raises(ResultTooLarge, match=r"'big'.*new key"):
            await dispatcher.call("counter", "read", {"item": item}, idempotency_key="big")


# -- notifications ---------------------------------------------------------------------------


async def test_pushes_naming_breakers_this_replica_has_not_cost_it_memory(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis
) -> None:
    """Whoever may publish on the prefix's channel could name another breaker in every
    message, each remembered for good (when it was pushed, by name): 20,000 names of 1 KiB
    held 20 MB of the replica, and nothing bounded them."""
    channel = f"{redis_prefix}:events"
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        store = dispatcher.state_backend
        assert isinstance(store, RedisState)
        await until(lambda: store._breakers.subscribed, "the subscription")
        async with writer.pipeline(transaction=False) as pipe:
            for n in range(20_000):
                pipe.publish(channel, f"breaker {n:01024d}")
            await pipe.execute()
        # Pushes arrive in order: once this one wakes its waiter, the others were read.
        read = asyncio.create_task(store.changed("marker", timeout=30))
        await asyncio.sleep(0.1)
        await writer.publish(channel, "idem marker")
        async with asyncio.timeout(30):
            await read
        assert len(store._breakers._pushed_at) == 0  # the replica has no breaker of any of them
