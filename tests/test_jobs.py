"""Async jobs on a real Redis (``Dispatcher.submit``, ``dispatcher._jobs``).

Workers run in this process for the behaviour tests, and in three dispatcher processes
(``tests/job_worker.py``) that the crash test SIGKILLs and restarts. The plugin
(``tests/plugins/job_plugin.py``) counts its runs on Redis, so a count says how often a
job really ran, whichever process ran it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from dispatcher import (
    Dispatcher,
    InvalidParams,
    JobNotFinished,
    JobNotFound,
    JobsUnavailable,
    ProviderError,
)
from dispatcher.config import ManifestError, load_manifest
from dispatcher.state import StateUnavailable, digest, encode_result
from linchkit_plugin.errors import PluginError, TargetUnavailable
from linchkit_plugin.wire import encode_json
from tests.services import CLEAN_ENVIRONMENT, Redis

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"


def manifest_file(folder: Path, url: str, prefix: str, **jobs: Any) -> Path:
    path = folder / f"plugins-{len(list(folder.iterdir()))}.yaml"
    document = {
        "version": 1,
        # Generous: these tests are about what survives, not how fast Redis answers, and a
        # Redis serving three workers on a busy two-core machine can take a second.
        "state": {"backend": "redis", "url": url, "key_prefix": prefix, "op_timeout_ms": 5000},
        "jobs": {"backoff_ms": 10, "backoff_max_ms": 50, **jobs},
        "plugins": [
            {
                "id": "jobs",
                "version": "1.0.0",
                "config": {"url": url, "prefix": prefix},
                "target": {
                    "provider": "local",
                    "entrypoint": "job_plugin:JobPlugin",
                    "path": str(PLUGINS),
                },
                "methods": {
                    "work": {"timeout_ms": 1000},
                    "slow": {"timeout_ms": 30_000},
                    "busy": {},
                    "refuse": {},
                    "refuse_oddly": {},
                    "ratio": {},
                },
            }
        ],
    }
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


def dispatcher_for(folder: Path, url: str, prefix: str, **jobs: Any) -> Dispatcher:
    return Dispatcher(load_manifest(manifest_file(folder, url, prefix, **jobs)))


async def effects(url: str, prefix: str, name: object) -> int:
    async with aioredis.Redis.from_url(url) as client:
        return int(await client.get(f"{prefix}:effects:{name}") or 0)


# -- what a job does ------------------------------------------------------------------------


async def test_a_submitted_job_runs_and_its_result_is_kept(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with dispatcher_for(tmp_path, redis_server.url, redis_prefix, workers=2) as d:
        job_id = await d.submit("jobs", "work", {"n": 7}, caller="billing")
        assert await d.result(job_id, wait=30) == {"n": 7, "runs": 1}
        record = await d.job(job_id)
        assert record["state"] == "succeeded"
        assert record["attempts"] == 1
        assert record["caller"] == "billing"
        assert record["params"] == {"n": 7}
        # Numbers (ms since the epoch), not the strings Redis keeps them as.
        times = [record["submitted_at"], record["started_at"], record["finished_at"]]
        assert all(type(moment) is int for moment in times), times
        assert times == sorted(times) and abs(times[0] - time.time() * 1000) < 600_000
        assert d.stats()["jobs"]["succeeded"] == 1


async def job_cut_off_then_succeeded(folder: Path, url: str, prefix: str, n: int) -> str:
    """A job whose first attempt a drain cut off (``shutting_down``, retryable) and whose
    second, on another dispatcher, succeeded: what a rolling restart does to a long job."""
    async with dispatcher_for(folder, url, prefix, workers=1) as first:
        job_id = await first.submit("jobs", "slow", {"n": n, "seconds": 60})
        async with aioredis.Redis.from_url(url) as client, asyncio.timeout(30):
            while not await client.get(f"{prefix}:started:{n}"):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await first.drain(0.1)
        async with asyncio.timeout(30):  # the worker stores the cut-off attempt's end
            while (record := await first.job(job_id))["state"] == "running":  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert (record["state"], record["error"]["type"]) == ("retrying", "shutting_down")
    async with dispatcher_for(folder, url, prefix, workers=1) as second:
        assert await second.result(job_id, wait=30) == {"n": n, "runs": 1}
    return job_id


async def test_a_job_that_succeeds_after_a_failed_attempt_carries_no_error(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Its ``error`` is what it ended with: a client that checks for one must not read a
    success as a failure. The earlier attempt's error stays, named for what it is."""
    job_id = await job_cut_off_then_succeeded(tmp_path, redis_server.url, redis_prefix, 8)
    async with dispatcher_for(tmp_path, redis_server.url, redis_prefix) as d:
        record = await d.job(job_id)
    assert (record["state"], record["attempts"]) == ("succeeded", 2)
    assert record["result"] == {"n": 8, "runs": 1}
    assert "error" not in record
    assert record["previous_error"]["type"] == "shutting_down"
    assert record["previous_error"]["details"]["stage"] == "cut_off"


async def test_the_result_of_an_ended_job_says_it_is_final(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """A dead or failed job's result raises its last attempt's error typed, but not as a
    call's error to try again: asking again answers the same for ever."""
    async with dispatcher_for(
        tmp_path, redis_server.url, redis_prefix, workers=1, max_attempts=2
    ) as d:
        dead_id = await d.submit("jobs", "busy")
        with pytest.raises(TargetUnavailable, match="always busy") as dead:
            await d.result(dead_id, wait=30)
        failed_id = await d.submit("jobs", "refuse")
        with pytest.raises(PluginError, match="no such account") as failed:
            await d.result(failed_id, wait=30)
        # The record says what the result says (before, it told the dead job's error
        # retryable, as its last attempt was raised, and without its state).
        for job_id, state in ((dead_id, "dead"), (failed_id, "failed")):
            told = (await d.job(job_id))["error"]
            assert (told["retryable"], told["details"]["state"]) == (False, state)
            assert "retry_after" not in told
    assert dead.value.retryable is False
    assert dead.value.retry_after is None
    assert dead.value.details["state"] == "dead"
    assert (failed.value.remote_type, failed.value.retryable) == ("NoAccount", False)
    assert failed.value.details["state"] == "failed"


async def test_result_says_not_finished_typed_and_unknown_ids_are_refused(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with dispatcher_for(tmp_path, redis_server.url, redis_prefix) as d:  # no workers
        job_id = await d.submit("jobs", "work", {"n": 1})
        started = time.monotonic()
        with pytest.raises(JobNotFinished) as caught:
            await d.result(job_id, wait=0.3)
        assert caught.value.retryable
        assert 0.25 < time.monotonic() - started < 5
        assert (await d.job(job_id))["state"] == "queued"
        with pytest.raises(JobNotFound):
            await d.result("no-such-job")


async def test_a_job_failing_retryably_is_dead_lettered_then_redriven_then_purged(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with dispatcher_for(
        tmp_path, redis_server.url, redis_prefix, workers=1, max_attempts=3
    ) as d:
        job_id = await d.submit("jobs", "busy")
        with pytest.raises(TargetUnavailable, match="always busy"):
            await d.result(job_id, wait=30)
        record = await d.job(job_id)
        assert (record["state"], record["attempts"]) == ("dead", 3)
        assert await effects(redis_server.url, redis_prefix, "busy") == 3
        store = d.state_backend.jobs  # type: ignore[union-attr]
        assert store is not None
        assert [each["id"] for each in await store.dead(10)] == [job_id]
        assert await store.redrive(job_id)
        assert not await store.redrive(job_id)  # no longer dead-lettered
        with pytest.raises(TargetUnavailable):
            await d.result(job_id, wait=30)  # ran its 3 attempts again, dead again
        # What it was dead-lettered with reads as it did then: final, not the last
        # attempt's retryable (before, previous_error said "retryable": true).
        assert (await d.job(job_id))["previous_error"] == record["error"]
        assert await effects(redis_server.url, redis_prefix, "busy") == 6
        assert await store.purge() == 1
        assert await store.dead(10) == []
        with pytest.raises(JobNotFound):
            await d.job(job_id)


async def test_a_keyed_job_failing_retryably_runs_again_on_every_attempt(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with dispatcher_for(
        tmp_path, redis_server.url, redis_prefix, workers=1, max_attempts=3
    ) as d:
        job_id = await d.submit("jobs", "busy", idempotency_key="busy-1")
        with pytest.raises(TargetUnavailable, match="always busy"):
            await d.result(job_id, wait=30)
        assert (await d.job(job_id))["attempts"] == 3
        # Each attempt reached the plugin: the key did not replay the first failure.
        assert await effects(redis_server.url, redis_prefix, "busy") == 3


async def test_a_keyed_call_replays_a_non_retryable_failure_without_running_again(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with dispatcher_for(tmp_path, redis_server.url, redis_prefix) as d:
        for _ in range(2):
            with pytest.raises(PluginError, match="no such account"):
                await d.call("jobs", "refuse", idempotency_key="refuse-1")
        assert await effects(redis_server.url, redis_prefix, "refused") == 1


async def test_a_non_retryable_error_ends_the_job_failed_at_once(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with dispatcher_for(tmp_path, redis_server.url, redis_prefix, workers=1) as d:
        job_id = await d.submit("jobs", "refuse")
        with pytest.raises(PluginError, match="no such account") as caught:
            await d.result(job_id, wait=30)
        assert caught.value.remote_type == "NoAccount"
        assert (await d.job(job_id))["attempts"] == 1


async def test_what_json_cannot_carry_ends_a_job_failed_with_its_own_error(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """An error's details JSON cannot carry (a NaN) are left out, and the job ends with the
    plugin's error: before, storing the failure raised, and the job's worker lost it. A
    result JSON cannot carry ends the job failed, not retried: it would be the same."""
    async with dispatcher_for(tmp_path, redis_server.url, redis_prefix, workers=1) as d:
        job_id = await d.submit("jobs", "refuse_oddly")
        with pytest.raises(PluginError, match="no such account") as caught:
            await d.result(job_id, wait=30)
        assert caught.value.remote_type == "NoAccount"
        assert "balance" not in caught.value.details, caught.value.details
        assert (await d.job(job_id))["state"] == "failed"
        job_id = await d.submit("jobs", "ratio")
        with pytest.raises(ProviderError, match="the result is not JSON"):
            await d.result(job_id, wait=30)
        assert (await d.job(job_id))["attempts"] == 1


# -- hostile -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [{"junk": "x"}, {"job": "a" * 500}, {"job": "no-record-for-this"}, {"job": "1", "more": "2"}],
)
async def test_a_malformed_entry_is_dead_lettered_and_the_worker_goes_on(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, fields: dict[str, str]
) -> None:
    async with dispatcher_for(tmp_path, redis_server.url, redis_prefix, workers=1) as d:
        async with aioredis.Redis.from_url(redis_server.url) as client:
            await client.xadd(f"{redis_prefix}:jobs", fields)
        job_id = await d.submit("jobs", "work", {"n": 1})
        assert (await d.result(job_id, wait=30))["n"] == 1
        store = d.state_backend.jobs  # type: ignore[union-attr]
        assert store is not None
        dead = await store.dead(10)
        assert len(dead) == 1
        assert dead[0]["state"] == "dead"
        assert not await store.redrive(dead[0]["id"])  # nothing it could run
        assert d.stats()["jobs"]["malformed"] == 1


async def test_params_are_checked_at_submit_and_a_bad_key_is_refused(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    from dispatcher import InvalidParams, MethodNotFound

    async with dispatcher_for(tmp_path, redis_server.url, redis_prefix) as d:
        with pytest.raises(MethodNotFound):
            await d.submit("jobs", "nope")
        with pytest.raises(InvalidParams):
            await d.submit("jobs", "work", {"n": 1}, idempotency_key="")
        with pytest.raises(InvalidParams):
            await d.submit("jobs", "work", {"n": object()})
        with pytest.raises(InvalidParams):
            await d.result("\n" * 3)


async def test_submit_to_a_redis_that_is_down_fails_typed_within_its_bound(
    tmp_path: Path, own_redis: Redis, redis_prefix: str
) -> None:
    async with dispatcher_for(tmp_path, own_redis.url, redis_prefix) as d:
        own_redis.stop()
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as caught:
            await d.submit("jobs", "work", {"n": 1})
        assert caught.value.retryable
        assert time.monotonic() - started < 3


async def test_the_memory_backend_refuses_jobs_clearly(tmp_path: Path) -> None:
    path = tmp_path / "plugins.yaml"
    plugin = {
        "id": "jobs",
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "echo:Echo", "path": str(PLUGINS)},
        "methods": {"work": {}},
    }
    path.write_text(json.dumps({"version": 1, "jobs": {"workers": 2}, "plugins": [plugin]}))
    with pytest.raises(ManifestError, match="jobs live on Redis streams"):
        load_manifest(path)
    async with Dispatcher(load_manifest(manifest_file_memory(tmp_path))) as d:
        with pytest.raises(JobsUnavailable, match="backend: redis"):
            await d.submit("counter", "ping")


def manifest_file_memory(folder: Path) -> Path:
    path = folder / "memory.yaml"
    target = {"provider": "local", "entrypoint": "counting_plugin:CountingPlugin"}
    plugin = {"id": "counter", "version": "1.0.0", "target": {**target, "path": str(PLUGINS)}}
    path.write_text(json.dumps({"version": 1, "plugins": [{**plugin, "methods": {"ping": {}}}]}))
    return path


async def test_a_redelivered_job_whose_key_has_its_outcome_does_not_run_again(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """A worker took the entry, ran the call (its outcome recorded under the key) and
    died before the ack: the worker that takes the entry over must not run it again."""
    url = redis_server.url
    async with dispatcher_for(tmp_path, url, redis_prefix) as submitter:
        job_id = await submitter.submit("jobs", "work", {"n": 3}, idempotency_key="order-3")
        async with aioredis.Redis.from_url(url) as client:
            await client.xgroup_create(f"{redis_prefix}:jobs", "workers", id="0")
            taken = await client.xreadgroup(
                "workers", "dead-worker", {f"{redis_prefix}:jobs": ">"}, count=1
            )
            assert len(taken[0][1]) == 1  # pending on a consumer that will never ack
        # What the dead worker did before dying: the keyed call through the chain.
        first = await submitter.call("jobs", "work", {"n": 3}, idempotency_key="order-3")
        assert first == {"n": 3, "runs": 1}
    async with dispatcher_for(
        tmp_path, url, redis_prefix, workers=1, visibility_timeout_ms=300
    ) as worker:
        assert await worker.result(job_id, wait=30) == {"n": 3, "runs": 1}
        assert await effects(url, redis_prefix, 3) == 1


async def test_a_submission_key_an_older_dispatcher_recorded_answers_its_job(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Before: a keyed submission's record had the version in its fingerprint, so one an
    older dispatcher wrote (the params' fingerprint alone) refused the same submission,
    sent again within the retention window, with ``InvalidParams``. It is that job."""
    url = redis_server.url
    async with (
        dispatcher_for(tmp_path, url, redis_prefix) as dispatcher,
        aioredis.Redis.from_url(url) as client,
    ):
        job_id = await dispatcher.submit("jobs", "work", {"n": 4})
        record = f"{redis_prefix}:idem:" + digest("submit", "jobs", "work", "\0", "order-4")
        fingerprint = digest(encode_json({"n": 4}, sort_keys=True))
        older = {"fp": fingerprint, "token": "older", "outcome": encode_result(job_id)}
        await client.hset(record, mapping=older)
        await client.pexpire(record, 60_000)
        again = await dispatcher.submit("jobs", "work", {"n": 4}, idempotency_key="order-4")
        assert again == job_id


async def test_a_job_outliving_the_visibility_timeout_on_a_live_worker_runs_once(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Its worker renews its hold (a heartbeat), so the other replica's worker, asking for
    entries idle longer than 0.3 s all along, never takes it over while it runs 2 s."""
    url = redis_server.url
    settings = {"workers": 1, "visibility_timeout_ms": 300}
    async with (
        dispatcher_for(tmp_path, url, redis_prefix, **settings) as first,
        dispatcher_for(tmp_path, url, redis_prefix, **settings) as second,
    ):
        job_id = await first.submit("jobs", "slow", {"n": 5, "seconds": 2.0})
        assert await second.result(job_id, wait=30) == {"n": 5, "runs": 1}
        async with aioredis.Redis.from_url(url) as client:
            assert int(await client.get(f"{redis_prefix}:started:5") or 0) == 1
        assert (await first.job(job_id))["attempts"] == 1


async def test_a_heartbeat_never_takes_back_an_entry_another_worker_took_over(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    url = redis_server.url
    async with dispatcher_for(tmp_path, url, redis_prefix) as d:  # no workers of its own
        store = d.state_backend.jobs  # type: ignore[union-attr]
        assert store is not None
        await store.submit("j1", {"id": "j1", "state": "queued", "submitted_at": "1"})
        await store.submit("j2", {"id": "j2", "state": "queued", "submitted_at": "1"})
        await store.ensure_group()
        held = await store.take("slow-worker", 2, block=0.1, min_idle=60)
        assert [each.job_id for each in held] == ["j1", "j2"]
        await asyncio.sleep(0.2)
        # Another worker took j1 over (as from a worker that stopped answering), and j2's
        # outcome is stored (acked): the first worker's late heartbeat keeps neither.
        taken = await store.take("other-worker", 1, block=0.1, min_idle=0.1)
        assert [each.job_id for each in taken] == ["j1"]
        await store.finish(held[1].entry_id, "j2", {"state": "succeeded"}, 60)
        entries = [each.entry_id for each in held]
        assert await store.keep("slow-worker", [*entries, "1-0"]) == 0
        assert await store.keep("other-worker", entries) == 1
        assert await store.keep("other-worker", []) == 0
        async with aioredis.Redis.from_url(url) as client:
            pending = await client.xpending_range(
                f"{redis_prefix}:jobs", "workers", min="-", max="+", count=10
            )
        assert [(p["consumer"], p["times_delivered"]) for p in pending] == [
            (b"other-worker", 2)  # kept without counting a delivery
        ]


# -- crashes: three worker processes, SIGKILLed and restarted ------------------------------------


class WorkerProcess:
    def __init__(self, manifest: Path) -> None:
        self.stderr = manifest.parent / f"worker-{time.monotonic_ns()}.stderr"
        with self.stderr.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "job_worker.py"), str(manifest)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**CLEAN_ENVIRONMENT, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 120)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.process.kill()
            self.process.wait(timeout=30)
            raise AssertionError(f"worker did not start:\n{self.stderr.read_text()[-3000:]}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.close_pipes()

    def end(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # EOF: a clean stop
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.close_pipes()

    def close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


JOBS = 10_000
#: Submitted-job counts at which a worker process is SIGKILLed: while all three are busy.
KILL_AFTER = (2_500, 5_000, 7_500)


async def jobs_held_by(client: aioredis.Redis, prefix: str, pid: int) -> set[str]:
    """The jobs whose entries a worker process (just killed) still held: read before the
    visibility timeout lets another worker take them over."""
    stream = f"{prefix}:jobs"
    held: set[str] = set()
    for consumer in await client.xinfo_consumers(stream, "workers"):
        name = consumer["name"].decode()
        if name.rsplit("-", 3)[1] != str(pid):  # {host}-{pid}-{random}-{number}
            continue
        pending = await client.xpending_range(
            stream, "workers", min="-", max="+", count=10_000, consumername=name
        )
        for entry in pending:
            for _, fields in await client.xrange(stream, entry["message_id"], entry["message_id"]):
                held.add(fields[b"job"].decode())
    return held


@pytest.mark.slow
async def test_every_job_ends_and_keyed_ones_run_once_through_three_sigkills(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    url = redis_server.url
    settings = {"workers": 4, "batch": 16, "visibility_timeout_ms": 2500, "max_attempts": 5}
    manifest = manifest_file(tmp_path, url, redis_prefix, **settings)
    workers: list[WorkerProcess] = []
    starting: list[asyncio.Task[WorkerProcess]] = []
    held: set[str] = set()  # the jobs killed workers held when they died
    try:
        workers.extend(WorkerProcess(manifest) for _ in range(3))
        async with (
            dispatcher_for(tmp_path, url, redis_prefix) as submitter,
            aioredis.Redis.from_url(url) as client,
        ):
            ids: list[str] = []
            for start in range(0, JOBS, 50):
                # Even n carry an idempotency key; odd n do not.
                ids += await asyncio.gather(
                    *(
                        submitter.submit(
                            "jobs",
                            "work",
                            {"n": n},
                            idempotency_key=f"k{n}" if n % 2 == 0 else None,
                        )
                        for n in range(start, start + 50)
                    )
                )
                if len(ids) in KILL_AFTER:  # each of the first three, mid-run
                    victim = workers[KILL_AFTER.index(len(ids))]
                    victim.kill()
                    held |= await jobs_held_by(client, redis_prefix, victim.process.pid)
                    # Its replacement starts while the others run (and the next kills land).
                    starting.append(asyncio.create_task(asyncio.to_thread(WorkerProcess, manifest)))

            async def states() -> list[str]:
                async with client.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        pipe.hget(f"{redis_prefix}:job:{job_id}", "state")
                    return [(s or b"").decode() for s in await pipe.execute()]

            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                final = await states()
                if sum(s in ("succeeded", "dead") for s in final) == JOBS:
                    break
                await asyncio.sleep(0.2)
            assert final.count("succeeded") + final.count("dead") == JOBS, {
                s: final.count(s) for s in set(final)
            }
            async with client.pipeline(transaction=False) as pipe:
                for n in range(JOBS):
                    pipe.get(f"{redis_prefix}:effects:{n}")
                runs = [int(value or 0) for value in await pipe.execute()]
            async with client.pipeline(transaction=False) as pipe:
                for n in range(0, JOBS, 2):
                    pipe.get(f"{redis_prefix}:applied:{n}")
                applied = [int(value or 0) for value in await pipe.execute()]
            async with client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(f"{redis_prefix}:job:{job_id}", "attempts")
                attempts = [int(value or 0) for value in await pipe.execute()]
        held_n = {n for n, job_id in enumerate(ids) if job_id in held}
        # A job whose attempt failed retryably (a timeout on a starved worker) is run again
        # by design, its key given back: the plugin keeps its effect once with the key.
        retried_n = {n for n in range(JOBS) if attempts[n] > 1}
        keyed_twice = [n for n in range(0, JOBS, 2) if runs[n] > 1]
        unkeyed_twice = [n for n in range(1, JOBS, 2) if runs[n] > 1]
        print(
            f"\n{JOBS} jobs, 3 SIGKILLs holding {len(held_n)} jobs"
            f" ({sum(n % 2 == 0 for n in held_n)} keyed): {final.count('succeeded')} succeeded,"
            f" {final.count('dead')} dead; keyed jobs run more than once: {len(keyed_twice)};"
            f" unkeyed jobs run more than once: {len(unkeyed_twice)}"
            f" ({len(set(unkeyed_twice) - held_n)} of them not held by a killed worker);"
            f" jobs attempted more than once: {len(retried_n)}"
        )
        assert all(runs[n] >= 1 for n in range(JOBS) if final[n] == "succeeded")
        # The key's effect, applied the way README's recipe says: never twice, and once for
        # every keyed job that succeeded (one dead-lettered may never have reached it).
        wrong = [
            n * 2
            for n, count in enumerate(applied)
            if count > 1 or (count == 0 and final[n * 2] == "succeeded")
        ]
        assert wrong == [], wrong
        # What the dispatcher promises for a key: the plugin runs again only for a job whose
        # worker died holding it, between the call reaching the plugin and its outcome's
        # record; a worker that lives renews its hold, so none of its jobs is run elsewhere.
        assert set(keyed_twice) <= held_n | retried_n, sorted(set(keyed_twice) - held_n - retried_n)
    finally:
        for task in starting:
            with contextlib.suppress(Exception):
                workers.append(await task)
        for worker in workers:
            worker.end()


async def test_idle_workers_on_the_default_bound_never_make_redis_look_down(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis ends a blocking read on its timer (10 times a second by default), so a
    worker's ``BLOCK 100`` came back after ~200 ms: past the default 200 ms bound on every
    idle read, and each such timeout made every operation of the replica skip Redis for a
    second (34 of 50 submissions refused on an idle gateway). A worker now blocks for what
    the bound leaves, and a read that still comes back late is not held against Redis."""
    document = json.loads(
        manifest_file(tmp_path, redis_server.url, redis_prefix, workers=2).read_text()
    )
    del document["state"]["op_timeout_ms"]  # the default
    path = tmp_path / "default-bound.yaml"
    path.write_text(json.dumps(document))
    async with Dispatcher(load_manifest(path)) as d:
        await asyncio.sleep(3)  # idle: the workers wait for jobs, read after read
        job_id = await d.submit("jobs", "work", {"n": 1})
        assert await d.result(job_id, wait=30) == {"n": 1, "runs": 1}
    waits = [record for record in caplog.records if "new jobs" in record.getMessage()]
    assert waits == []


# -- telemetry -----------------------------------------------------------------------------------


async def test_job_outcomes_are_metrics_by_route(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """What an operator of job workers watches: jobs submitted by route and outcome (a
    keyed one answered its earlier job, one refused), ended by route and state, attempts
    retried, entries not run, workers and attempts running, on the replica's /metrics
    (before, none of it was exported)."""
    from tests.test_telemetry import scrape

    path = manifest_file(tmp_path, redis_server.url, redis_prefix, workers=1, max_attempts=2)
    document = json.loads(path.read_text())
    document["telemetry"] = {"metrics": {"enabled": True}}
    path.write_text(json.dumps(document))
    async with Dispatcher(load_manifest(path)) as d:
        done = [await d.submit("jobs", "work", {"n": n}) for n in (1, 2)]
        refused = await d.submit("jobs", "refuse")
        busy = await d.submit("jobs", "busy")
        for job_id in done:
            await d.result(job_id, wait=30)
        for job_id, error in ((refused, PluginError), (busy, TargetUnavailable)):
            with pytest.raises(error):
                await d.result(job_id, wait=30)
        keyed = await d.submit("jobs", "work", {"n": 3}, idempotency_key="k-1")
        assert await d.submit("jobs", "work", {"n": 3}, idempotency_key="k-1") == keyed
        with pytest.raises(InvalidParams):  # the key, other params
            await d.submit("jobs", "work", {"n": 4}, idempotency_key="k-1")
        await d.result(keyed, wait=30)
        text = await scrape(d)
    route = "jobs@1.0.0"
    for line in (
        f'dispatcher_jobs_ended_total{{route="{route}.work",state="succeeded"}} 3.0',
        f'dispatcher_job_submissions_total{{outcome="queued",route="{route}.work"}} 3.0',
        f'dispatcher_job_submissions_total{{outcome="replayed",route="{route}.work"}} 1.0',
        f'dispatcher_job_submissions_total{{outcome="invalid_params",route="{route}.work"}} 1.0',
        f'dispatcher_jobs_ended_total{{route="{route}.refuse",state="failed"}} 1.0',
        f'dispatcher_jobs_ended_total{{route="{route}.busy",state="dead"}} 1.0',
        f'dispatcher_jobs_ended_total{{route="{route}.busy",state="succeeded"}} 0.0',
        f'dispatcher_job_retries_total{{route="{route}.busy"}} 1.0',
        f'dispatcher_job_retries_total{{route="{route}.work"}} 0.0',
        'dispatcher_job_entries_not_run_total{reason="malformed"} 0.0',
        "dispatcher_job_workers 1.0",
        "dispatcher_jobs_running 0.0",
    ):
        assert line in text.splitlines(), line


def test_routes_read_from_the_store_are_counted_apart_up_to_a_bound() -> None:
    """A record's plugin and method come from a store others may write: past
    ``MAX_COUNTED_ROUTES`` names, the rest share one row, so a writer cannot fill the
    host's metrics with series."""
    from dispatcher._jobs import MAX_COUNTED_ROUTES, OTHER_ROUTES, JobWorkers

    workers = JobWorkers.__new__(JobWorkers)  # only its counters are used here
    workers.counts = dict.fromkeys(("succeeded", "failed", "dead", "retried"), 0)
    workers.by_route = {}
    for n in range(MAX_COUNTED_ROUTES + 500):
        workers._count({"plugin": f"p{n}", "version": "1.0.0", "method": "m"}, "dead")
    assert len(workers.by_route) == MAX_COUNTED_ROUTES + 1
    assert workers.by_route[OTHER_ROUTES]["dead"] == 500
    assert workers.counts["dead"] == MAX_COUNTED_ROUTES + 500
