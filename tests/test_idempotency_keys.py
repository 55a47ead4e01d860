"""One idempotency key, every surface: what a keyed call, a submission and the gateway
take as a key, and what a key's records answer when the version, the schema or the job
behind them changed. A real Redis (``tests.services``) and the counting plugin in this
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    InvalidParams,
    JobExpired,
    JobNotFound,
    ProviderError,
)
from dispatcher.config import load_manifest
from dispatcher.config.state import StateConfig
from dispatcher.gateway import call_headers
from dispatcher.policies import idempotency
from dispatcher.state import Claim, StateUnavailable, digest
from dispatcher.state.memory import MemoryIdempotency
from dispatcher.state.redis_store import RedisState
from linchkit_plugin.wire import encode_json
from tests.services import Redis, free_port
from tests.test_gateway_jobs import jobs_gateway, send
from tests.test_gateway_security import ADMIN_KEY

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


# -- a key's record no dispatcher wrote --------------------------------------------------------


def submission_record(prefix: str, plugin: str, method: str, caller: str | None, key: str) -> str:
    """The Redis key of a submission's idempotency record, built as ``queue_job_once`` and
    ``RedisState`` build it (not read back from a submission: none is made)."""
    scope = "\0" if caller is None else "\1" + caller
    return f"{prefix}:idem:" + digest("submit", plugin, method, scope, key)


def call_record(prefix: str, plugin: str, method: str, caller: str | None, key: str) -> str:
    """The same for a keyed call's record (``IdempotencyStep``)."""
    scope = "\0" if caller is None else "\1" + caller
    return f"{prefix}:idem:" + digest(plugin, method, scope, key)


def fingerprint(params: Any) -> str:
    return digest(encode_json(params, sort_keys=True))


#: Records a dispatcher never writes for a submission: not a hash; an outcome that is not
#: JSON; an error (a submission records the id it queued, or nothing); an id no dispatcher
#: makes (a line break would be a header of the forger's in the gateway's ``Location``).
CORRUPT_SUBMISSIONS = {
    "string": None,
    "not-json": b"{garbage",
    "error": json.dumps(
        {"ok": False, "error": {"type": "target_unavailable", "message": "down", "retryable": True}}
    ).encode(),
    "too-large": json.dumps({"ok": False, "too_large": 10**9, "limit": 16}).encode(),
    "crlf-id": json.dumps({"ok": True, "result": "a\r\nSet-Cookie: session=forged"}).encode(),
    "long-id": json.dumps({"ok": True, "result": "j" * 5000}).encode(),
    # Claimed, never ended, and kept for ever: a claim always expires with its lease.
    "claimed-for-ever": b"",
}


async def forge(client: aioredis.Redis, name: str, params: Any, outcome: bytes | None) -> None:
    """A record under ``name``: a string when ``outcome`` is None, else a hash a claim
    reads as done with ``params`` (their fingerprint, any version) and ``outcome``, or
    as running (no outcome, empty) with no expiry."""
    if outcome is None:
        await client.set(name, "forged")
        return
    fields: dict[str, str | bytes] = {"fp": fingerprint(params), "token": "t", "version": "1.0.0"}
    if outcome:
        fields["outcome"] = outcome
    await client.hset(name, mapping=fields)


@pytest.mark.parametrize("corrupt", list(CORRUPT_SUBMISSIONS))
async def test_the_gateway_answers_a_corrupt_submission_record_final_and_queues_nothing(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, corrupt: str
) -> None:
    """What a ``:submit`` meeting a record no dispatcher wrote answers: 502
    ``provider_error``, not retryable, no ``Retry-After`` (the record stays: a retry
    meets it again), told as the job store's; no job is queued, nothing leaks."""
    name = submission_record(redis_prefix, "jobs", "work", "admin-svc", "order-17")
    async with aioredis.Redis.from_url(redis_server.url) as client:
        await forge(client, name, {"n": 1}, CORRUPT_SUBMISSIONS[corrupt])
        async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (
            base,
            session,
        ):
            status, body, headers = await send(
                session,
                "POST",
                f"{base}/v1/plugins/jobs/methods/work:submit",
                ADMIN_KEY,
                json={"n": 1},
                headers={"Idempotency-Key": "order-17"},
            )
        assert await client.xlen(f"{redis_prefix}:jobs") == 0
        assert await client.zcard(f"{redis_prefix}:jobs:recent") == 0
    assert status == 502, body
    error = body["error"]
    assert (error["type"], error["retryable"]) == ("provider_error", False), error
    assert "Retry-After" not in headers and "Location" not in headers
    assert error["message"] == (
        "jobs.work:submit: the job store holds an entry no dispatcher wrote"
        " (the gateway logs the detail)"
    )
    assert "Set-Cookie" not in json.dumps(body) and "garbage" not in json.dumps(body)


@pytest.mark.parametrize("corrupt", list(CORRUPT_SUBMISSIONS))
async def test_an_in_process_submission_meeting_a_corrupt_record_queues_nothing(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, corrupt: str
) -> None:
    params = {"amount": 1}
    name = submission_record(redis_prefix, "counter", "charge", None, "order-17")
    async with aioredis.Redis.from_url(redis_server.url) as client:
        await forge(client, name, params, CORRUPT_SUBMISSIONS[corrupt])
        async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
            for _ in range(2):  # the record stays: so does the answer
                with pytest.raises(ProviderError, match=r"order-17.*new key") as caught:
                    await dispatcher.submit("counter", "charge", params, idempotency_key="order-17")
                assert caught.value.retryable is False
                assert "Set-Cookie" not in caught.value.message
        assert await client.xlen(f"{redis_prefix}:jobs") == 0
        assert await client.zcard(f"{redis_prefix}:jobs:recent") == 0


@pytest.mark.parametrize("corrupt", ["string", "not-json", "claimed-for-ever"])
async def test_a_keyed_call_meeting_a_corrupt_record_runs_nothing(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, corrupt: str
) -> None:
    params = {"amount": 1, "delay": 0}
    name = call_record(redis_prefix, "counter", "charge", "billing", "order-17")
    async with aioredis.Redis.from_url(redis_server.url) as client:
        await forge(client, name, params, CORRUPT_SUBMISSIONS[corrupt])
        async with counter(tmp_path, redis_server.url, redis_prefix) as dispatcher:
            for _ in range(2):
                with pytest.raises(ProviderError, match=r"order-17.*new key") as caught:
                    await dispatcher.call(
                        "counter",
                        "charge",
                        params,
                        caller="billing",
                        idempotency_key="order-17",
                        timeout=2,
                    )
                assert caught.value.retryable is False
            assert await dispatcher.call("counter", "counts") == {"charges": 0, "reads": 0}
            state = dispatcher.stats()["state"]
            assert state["failures"] == 0 and state["fallbacks"] == 0


# -- a key's record at another version ----------------------------------------------------------

#: ``charge``'s params at 1.0.0, and two 2.0.0s: one whose schema still takes what 1.0.0
#: took (a bound added), and one that requires a field 1.0.0 never had.
SCHEMA_1 = {
    "type": "object",
    "properties": {"amount": {"type": "integer"}, "delay": {"type": "number"}},
    "required": ["amount"],
}
SCHEMA_2_TAKES = {
    "type": "object",
    "properties": {"amount": {"type": "integer", "maximum": 1000}, "delay": {"type": "number"}},
    "required": ["amount"],
}
SCHEMA_2_REQUIRES = {
    "type": "object",
    "properties": {"amount": {"type": "integer"}, "currency": {"type": "string"}},
    "required": ["amount", "currency"],
}


def deployed(
    folder: Path, url: str, prefix: str, versions: dict[str, dict[str, Any]], jobs: bool = False
) -> Dispatcher:
    """A replica with ``charge`` at each of ``versions`` (its params schema), on Redis;
    with ``jobs``, its jobs kept there (no worker)."""
    plugins = [
        {
            "id": "counter",
            "version": version,
            "target": COUNTING,
            "methods": {"charge": {"params_schema": schema}, "counts": {}},
        }
        for version, schema in versions.items()
    ]
    folder.mkdir(exist_ok=True)
    path = folder / "plugins.json"
    state = {"backend": "redis", "url": url, "key_prefix": prefix}
    document: dict[str, Any] = {"version": 1, "state": state, "plugins": plugins}
    if jobs:
        document["jobs"] = {"workers": 0}
    path.write_text(json.dumps(document))
    return Dispatcher(load_manifest(path))


@pytest.mark.parametrize("schema", ["takes", "requires"])
async def test_a_retry_after_a_deploy_replays_its_record_whatever_the_new_schema(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, schema: str
) -> None:
    """A keyed call naming no version ran at 1.0.0; its retry (the same bytes, so the
    same fingerprint) reaches a replica where 2.0.0 is the highest. Its record answers
    it (``ANY_VERSION``): the call ran, and what it returned is its answer. With a 2.0.0
    whose schema requires a field 1.0.0 never had, the retry was refused first by that
    schema (``invalid_params``, final): told its params were wrong when its first call
    had run, a client that "fixed" them met its key spent on other params, and one that
    took a new key ran the charge twice. A keyed call's params are checked once its
    key's record is read now: a key whose record is absent is checked as before."""
    params = {"amount": 5, "delay": 0}
    second = SCHEMA_2_TAKES if schema == "takes" else SCHEMA_2_REQUIRES
    url = redis_server.url
    async with deployed(tmp_path / "old", url, redis_prefix, {"1.0.0": SCHEMA_1}) as old:
        first = await old.call("counter", "charge", params, idempotency_key="order-17")
    assert first == {"charged": 5, "run": 1}
    versions = {"1.0.0": SCHEMA_1, "2.0.0": second}
    async with deployed(tmp_path / "new", url, redis_prefix, versions) as new:
        again = await new.call("counter", "charge", params, idempotency_key="order-17")
        assert again == first
        for version in versions:
            counts = await new.call("counter", "counts", version=version)
            assert counts == {"charges": 0, "reads": 0}, version
        # A call naming 2.0.0 is another request: refused, as before.
        with pytest.raises(InvalidParams, match=r"order-17.*another version"):
            await new.call("counter", "charge", params, version="2.0.0", idempotency_key="order-17")
        # A new key is a new request, and 2.0.0's schema is its check; the refusal
        # keeps no record (the key is free for params that pass).
        if schema == "requires":
            with pytest.raises(InvalidParams, match="currency"):
                await new.call("counter", "charge", params, idempotency_key="order-18")
            async with aioredis.Redis.from_url(url) as client:
                record = call_record(redis_prefix, "counter", "charge", None, "order-18")
                assert await client.exists(record) == 0
        counts = await new.call("counter", "counts", version="2.0.0")
        assert counts == {"charges": 0, "reads": 0}


# -- a store that cannot answer ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
async def test_invalid_params_are_told_first_when_the_store_cannot_answer(
    tmp_path: Path, redis_prefix: str, mode: str
) -> None:
    """A keyed call's params are checked once its key's record is read (a record answers
    its retry whatever the schema): with the store down and ``fail_closed``, a call whose
    params no schema takes was told ``StateUnavailable`` (retryable: "come again"), and
    came again with the same wrong params until the store was back, to hear only then what
    was wrong with it. Nothing can be read, so the params are checked first now; params
    that pass still hear that the store is down. A keyed submission alike (a job is not
    queued without its store either way). ``fail_open`` already checked them against this
    replica's own records."""
    url = f"redis://127.0.0.1:{free_port()}"  # nothing listens: every operation fails
    state = {"backend": "redis", "url": url, "key_prefix": redis_prefix, "on_unavailable": mode}
    document = {
        "version": 1,
        "state": state,
        "plugins": [
            {
                "id": "counter",
                "version": "1.0.0",
                "target": COUNTING,
                "methods": {"charge": {"params_schema": SCHEMA_1}, "counts": {}},
            }
        ],
    }
    path = tmp_path / "plugins.json"
    path.write_text(json.dumps(document))
    wrong = {"amount": "five", "delay": 0}
    async with Dispatcher(load_manifest(path)) as dispatcher:
        for _ in range(2):  # the second finds the store skipped (retry_after_ms): the same
            with pytest.raises(InvalidParams, match="five"):
                await dispatcher.call("counter", "charge", wrong, idempotency_key="order-17")
            with pytest.raises(InvalidParams, match="five"):
                await dispatcher.submit("counter", "charge", wrong, idempotency_key="order-17")
        with pytest.raises(StateUnavailable):
            await dispatcher.submit("counter", "charge", {"amount": 5}, idempotency_key="o-18")
        right = {"amount": 5, "delay": 0}
        if mode == "fail_closed":
            with pytest.raises(StateUnavailable):
                await dispatcher.call("counter", "charge", right, idempotency_key="order-18")
            assert await dispatcher.call("counter", "counts") == {"charges": 0, "reads": 0}
        else:
            assert await dispatcher.call("counter", "charge", right, idempotency_key="order-18")


# -- a key's job whose record expired --------------------------------------------------------------


def charging(folder: Path, url: str, prefix: str, **jobs: Any) -> Dispatcher:
    """``counter.charge`` with a 200 ms deadline, its jobs run by one worker here."""
    document = {
        "version": 1,
        "state": {"backend": "redis", "url": url, "key_prefix": prefix},
        "jobs": {"workers": 1, "backoff_ms": 10, **jobs},
        "plugins": [
            {
                "id": "counter",
                "version": "1.0.0",
                "target": COUNTING,
                "methods": {"charge": {"timeout_ms": 200}, "counts": {}},
            }
        ],
    }
    path = folder / "plugins.json"
    path.write_text(json.dumps(document))
    return Dispatcher(load_manifest(path))


async def test_a_keyed_job_s_record_is_kept_as_long_as_its_key_answers_with_its_id(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """``jobs.result_ttl_ms`` shorter than the keys' retention (results kept briefly to
    spare Redis): a keyed job's record is kept as long as its key answers with its id, so
    a resubmission after the result TTL is answered a job that exists, not one that has
    expired (``JobExpired``, before: an id that answered 404). A job without a key keeps
    the short TTL."""
    params = {"amount": 1, "delay": 0}
    async with (
        charging(tmp_path, redis_server.url, redis_prefix, result_ttl_ms=500) as dispatcher,
        aioredis.Redis.from_url(redis_server.url) as client,
    ):
        keyed = await dispatcher.submit("counter", "charge", params, idempotency_key="order-1")
        plain = await dispatcher.submit("counter", "charge", params)
        for job_id in (keyed, plain):
            await dispatcher.result(job_id, wait=10)
        assert 500 < await client.pttl(f"{redis_prefix}:job:{keyed}") <= 86_400_000
        assert 0 < await client.pttl(f"{redis_prefix}:job:{plain}") <= 500
        await asyncio.sleep(0.8)  # past the result TTL
        again = await dispatcher.submit("counter", "charge", params, idempotency_key="order-1")
        assert again == keyed
        assert (await dispatcher.job(keyed))["state"] == "succeeded"
        with pytest.raises(JobNotFound):
            await dispatcher.job(plain)
        assert await dispatcher.call("counter", "counts") == {"charges": 2, "reads": 0}


@pytest.mark.parametrize("gone", ["evicted", "purged"])
async def test_a_resubmission_whose_job_is_no_longer_kept_is_told_so_and_runs_nothing(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, gone: str
) -> None:
    """A job submitted with a key ended, and its record is gone while the key's record
    still names it: evicted (a Redis at its memory limit drops keys that expire), or
    dead-lettered and purged. Submitted again with the key, it was answered that job's
    id, which then answered ``JobNotFound``: an id handed out as live that never was
    again. It is told ``JobExpired`` now (final, naming the job), and nothing is queued
    or run again: the key promised one job, and a second would be a second charge."""
    delay = 0 if gone == "evicted" else 1  # over the 200 ms deadline: dead at once
    params = {"amount": 1, "delay": delay}
    async with (
        charging(tmp_path, redis_server.url, redis_prefix, max_attempts=1) as dispatcher,
        aioredis.Redis.from_url(redis_server.url) as client,
    ):
        job_id = await dispatcher.submit("counter", "charge", params, idempotency_key="order-17")
        if gone == "evicted":
            assert await dispatcher.result(job_id, wait=10) == {"charged": 1, "run": 1}
            await client.delete(f"{redis_prefix}:job:{job_id}")
        else:
            with pytest.raises(DeadlineExceeded):
                await dispatcher.result(job_id, wait=10)
            assert (await dispatcher.job(job_id))["state"] == "dead"
            jobs = dispatcher.state_backend.jobs  # what `dispatcher dlq purge` does
            assert jobs is not None and await jobs.purge([job_id]) == 1
        submission = submission_record(redis_prefix, "counter", "charge", None, "order-17")
        assert await client.exists(submission) == 1
        for _ in range(2):  # the key's record stays: so does the answer
            with pytest.raises(JobExpired, match=rf"order-17.*{job_id}.*new key") as caught:
                await dispatcher.submit("counter", "charge", params, idempotency_key="order-17")
            assert caught.value.type == "job_expired"
            assert caught.value.retryable is False
            assert caught.value.details == {"stage": "jobs", "job_id": job_id}
        await asyncio.sleep(0.3)  # a job queued again would have run by now
        assert await client.zcard(f"{redis_prefix}:jobs:recent") == 1
        assert await dispatcher.call("counter", "counts") == {"charges": 1, "reads": 0}
        # A job still kept is answered as before.
        kept = await dispatcher.submit("counter", "charge", params, idempotency_key="order-18")
        again = await dispatcher.submit("counter", "charge", params, idempotency_key="order-18")
        assert again == kept


async def test_the_gateway_answers_a_resubmission_whose_job_is_gone_410(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """The same through ``:submit``: ``410 job_expired``, final (no ``Retry-After``), no
    ``Location`` (there is no job to read), the job named in ``details``."""
    async with (
        jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session),
        aioredis.Redis.from_url(redis_server.url) as client,
    ):
        submit = f"{base}/v1/plugins/jobs/methods/work:submit"
        options = {"json": {"n": 1}, "headers": {"Idempotency-Key": "order-17"}}
        status, body, _ = await send(session, "POST", submit, ADMIN_KEY, **options)
        assert status == 202, body
        job_id = body["job_id"]
        await client.delete(f"{redis_prefix}:job:{job_id}")
        status, body, headers = await send(session, "POST", submit, ADMIN_KEY, **options)
        assert await client.xlen(f"{redis_prefix}:jobs") == 1
    assert status == 410, body
    error = body["error"]
    assert (error["type"], error["retryable"]) == ("job_expired", False), error
    assert error["details"] == {"stage": "jobs", "job_id": job_id}
    assert "Retry-After" not in headers and "Location" not in headers


async def test_a_retry_naming_a_range_after_a_deploy_is_answered_by_its_record(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """A keyed call naming ``^1.0`` ran at 1.0.0; 1.1.0 is deployed beside it, and the
    retry, naming ``^1.0`` again, resolves to 1.1.0. Its key's record, at 1.0.0, is at a
    version the range the caller named takes, chosen by the dispatcher as for a call
    naming none: it answers (it was refused "at another version than 1.1.0", and so was
    the same submission). A range that does not take the record's version is still
    refused, as is a call naming 1.1.0 itself."""
    params = {"amount": 5, "delay": 0}
    url = redis_server.url
    old_manifest = {"1.0.0": SCHEMA_1}
    async with deployed(tmp_path / "old", url, redis_prefix, old_manifest, jobs=True) as old:
        first = await old.call(
            "counter", "charge", params, version="^1.0", idempotency_key="order-17"
        )
        job_id = await old.submit(
            "counter", "charge", params, version="^1.0", idempotency_key="order-17"
        )
    versions = {"1.0.0": SCHEMA_1, "1.1.0": SCHEMA_1}
    async with deployed(tmp_path / "new", url, redis_prefix, versions, jobs=True) as new:
        again = await new.call(
            "counter", "charge", params, version="^1.0", idempotency_key="order-17"
        )
        assert again == first
        resubmitted = await new.submit(
            "counter", "charge", params, version="^1.0", idempotency_key="order-17"
        )
        assert resubmitted == job_id
        for wanted in ("1.1.0", ">=1.1.0"):
            with pytest.raises(InvalidParams, match=r"order-17.*another version than 1\.1\.0"):
                await new.call(
                    "counter", "charge", params, version=wanted, idempotency_key="order-17"
                )
            with pytest.raises(InvalidParams, match=r"order-17.*another version than 1\.1\.0"):
                await new.submit(
                    "counter", "charge", params, version=wanted, idempotency_key="order-17"
                )
        for version in versions:
            counts = await new.call("counter", "counts", version=version)
            assert counts == {"charges": 0, "reads": 0}, version


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_claim_tells_the_records_version_when_it_alone_differs(
    redis_server: Redis, redis_prefix: str, backend: str
) -> None:
    """What lets a call naming a range take a record at a version in it: the claim says
    the record's version on a mismatch of versions alone, and nothing on other params."""
    if backend == "memory":
        store: Any = MemoryIdempotency(time.monotonic)
        work = contextlib.nullcontext()
    else:
        config = StateConfig(backend="redis", url=redis_server.url, key_prefix=redis_prefix)
        store = work = RedisState(config, time.monotonic)
    async with work:
        far = asyncio.get_running_loop().time() + 5
        run = await store.claim("k", "fp", 5, far, version="1.0.0")
        assert run.claim is Claim.RUN
        await store.complete("k", run.token, b'{"ok": true, "result": 1}', 60, far)
        other = await store.claim("k", "fp", 5, far, version="1.1.0")
        assert (other.claim, other.version) == (Claim.MISMATCH, "1.0.0")
        params = await store.claim("k", "other", 5, far, version="1.1.0")
        assert (params.claim, params.version) == (Claim.MISMATCH, None)
        taken = await store.claim("k", "fp", 5, far, version="1.1.0", other_versions=("1.0.0",))
        assert taken.claim is Claim.DONE
