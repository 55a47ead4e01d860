"""Hostile shared state: what another writer of the same Redis and key prefix (a replica
of another release, a compromised one, a person with redis-cli) leaves where this
replica's policies read. A real Redis (``tests.services``); a raw client plays the other
writer. Whatever it wrote, a call ends with its result or a typed error, and the shared
state of every other call stays usable.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from dispatcher import Dispatcher, ProviderError
from dispatcher.config import load_manifest
from dispatcher.state import StateUnavailable
from tests.services import Redis

PLUGINS = Path(__file__).resolve().parent / "plugins"


def counter(folder: Path, url: str, prefix: str, mode: str = "fail_open") -> Dispatcher:
    """The counting plugin in this process: ``read`` cached, ``charge`` called with keys."""
    path = folder / "plugins.yaml"
    document = {
        "version": 1,
        "state": {"backend": "redis", "url": url, "key_prefix": prefix, "on_unavailable": mode},
        "plugins": [
            {
                "id": "counter",
                "version": "1.0.0",
                "target": {
                    "provider": "local",
                    "entrypoint": "counting_plugin:CountingPlugin",
                    "path": str(PLUGINS),
                },
                "methods": {"read": {"pure": True, "cache": {"ttl_ms": 60_000}}, "charge": {}},
            }
        ],
    }
    path.write_text(json.dumps(document))  # JSON is YAML
    return Dispatcher(load_manifest(path))


async def only_key(client: aioredis.Redis, pattern: str) -> bytes:
    (key,) = [key async for key in client.scan_iter(match=pattern)]
    return bytes(key)


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


async def test_a_submission_record_no_dispatcher_wrote_is_a_typed_error(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, writer: aioredis.Redis
) -> None:
    params = {"amount": 1, "delay": 0}
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        await dispatcher.submit("counter", "charge", params, idempotency_key="order-17")
        record = await only_key(writer, f"{redis_prefix}:idem:*")  # the submission's
        await writer.hset(record, "outcome", b"{garbage")
        with pytest.raises(ProviderError, match=r"order-17.*new key"):
            await dispatcher.submit("counter", "charge", params, idempotency_key="order-17")
