"""One idempotency key, every surface: what a keyed call, a submission and the gateway
take as a key, and what a key's records answer when the version, the schema or the job
behind them changed. A real Redis (``tests.services``) and the counting plugin in this
process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from dispatcher import Dispatcher, InvalidParams
from dispatcher.config import load_manifest
from dispatcher.gateway import call_headers
from dispatcher.policies import idempotency
from tests.services import Redis

PLUGINS = Path(__file__).resolve().parent / "plugins"
COUNTING = {
    "provider": "local",
    "entrypoint": "counting_plugin:CountingPlugin",
    "path": str(PLUGINS),
}


def counter(folder: Path, url: str, prefix: str, **extra: Any) -> Dispatcher:
    """``counter.charge`` (counts its runs) on Redis, jobs kept there, no worker."""
    document = {
        "version": 1,
        "state": {"backend": "redis", "url": url, "key_prefix": prefix},
        "jobs": {"workers": 0},
        "plugins": [
            {
                "id": "counter",
                "version": "1.0.0",
                "target": COUNTING,
                "methods": {"charge": {}, "counts": {}},
            }
        ],
        **extra,
    }
    path = folder / "plugins.json"
    path.write_text(json.dumps(document))  # JSON is YAML
    return Dispatcher(load_manifest(path))


REFUSED_KEYS = [
    "order\n17",  # a line break: a log record of the caller's making
    "order\x0017",
    "order\x1b[31m17",  # a terminal's escape
    "order\x7f",
    "order\u200917\u2028",  # a line separator
    "order\u200b17",  # zero width, invisible in a log or a listing
    "",
    "k" * 256,
]
TAKEN_KEYS = ["order 17", "заказ-17", "k" * 255, "order-\U0001f600"]


@pytest.mark.parametrize("key", REFUSED_KEYS)
async def test_a_key_the_gateway_or_a_submission_refuses_is_refused_for_a_call(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, key: str
) -> None:
    """``Dispatcher.call(..., idempotency_key=...)`` checked a key's length alone: a key
    with a control character ran the plugin, kept its record and replayed it, while
    ``submit`` and the gateway refused that key (printable only). A call and a
    submission with one key are one key's requests: refused alike now, before anything
    runs, with the gateway's words."""
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        with pytest.raises(InvalidParams) as submitted:
            await dispatcher.submit("counter", "charge", {"amount": 1}, idempotency_key=key)
        with pytest.raises(InvalidParams) as called:
            await dispatcher.call(
                "counter", "charge", {"amount": 1, "delay": 0}, idempotency_key=key
            )
        with pytest.raises(InvalidParams) as headed:
            call_headers.idempotency_key_of({"Idempotency-Key": key})
        assert await dispatcher.call("counter", "counts") == {"charges": 0, "reads": 0}
        async with aioredis.Redis.from_url(redis_server.url) as client:
            assert [name async for name in client.scan_iter(match=f"{redis_prefix}:*")] == []
    message = "idempotency_key is 1-255 printable UTF-8 characters"
    assert submitted.value.message == called.value.message == message
    assert headed.value.message == message.replace("idempotency_key", "Idempotency-Key")


@pytest.mark.parametrize("key", TAKEN_KEYS)
async def test_a_key_the_gateway_takes_is_taken_by_a_call_and_a_submission(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, key: str
) -> None:
    async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
        assert call_headers.idempotency_key_of({"Idempotency-Key": key}) == key
        job_id = await dispatcher.submit("counter", "charge", {"amount": 1}, idempotency_key=key)
        again = await dispatcher.submit("counter", "charge", {"amount": 1}, idempotency_key=key)
        assert again == job_id
        params = {"amount": 1, "delay": 0}
        first = await dispatcher.call("counter", "charge", params, idempotency_key=key)
        assert await dispatcher.call("counter", "charge", params, idempotency_key=key) == first
        assert await dispatcher.call("counter", "counts") == {"charges": 1, "reads": 0}


def test_the_rule_has_one_home() -> None:
    """The gateway's check is the dispatcher's own, not a copy that may drift."""
    assert call_headers.checked_idempotency_key is idempotency.checked_idempotency_key
