"""``dispatcher submit``, ``jobs``, ``job`` and ``dlq`` as a user runs them: real processes
against a real Redis, jobs run by workers of a dispatcher in this process.

Every command runs under a timeout (``RUN_TIMEOUT``): a command that hangs, closing its
store or anywhere else, fails its test instead of holding the suite.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from dispatcher import Dispatcher
from dispatcher.config import load_manifest
from tests.services import Redis
from tests.test_jobs import job_cut_off_then_succeeded, manifest_file

ROOT = Path(__file__).resolve().parent.parent
#: Generous for a loaded 2-core machine; a hang is what it catches, not slowness.
RUN_TIMEOUT = 90.0


@dataclass
class Ran:
    code: int
    out: str
    err: str


async def cli(manifest: Path, *args: str, timeout: float = RUN_TIMEOUT) -> Ran:
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")]),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli",
        "-m",
        str(manifest),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"dispatcher {' '.join(args)} did not end within {timeout} s")
    assert process.returncode is not None
    ran = Ran(process.returncode, out.decode(), err.decode())
    assert "Traceback" not in ran.err, ran.err
    return ran


async def test_submit_then_job_and_jobs_show_it(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix)
    submitted = await cli(manifest, "submit", "jobs", "work", '{"n": 3}', "--caller", "ops")
    assert submitted.code == 0, submitted.err
    job_id = submitted.out.strip()
    assert len(job_id) > 8 and "\n" not in job_id

    queued = await cli(manifest, "job", job_id)
    assert queued.code == 0
    assert json.loads(queued.out)["state"] == "queued"

    async with Dispatcher(
        load_manifest(manifest_file(tmp_path, redis_server.url, redis_prefix, workers=1))
    ):
        finished = await cli(manifest, "job", job_id, "--wait", "60")
    assert finished.code == 0, finished.err
    record = json.loads(finished.out)
    assert (record["state"], record["attempts"], record["caller"]) == ("succeeded", 1, "ops")
    assert record["result"] == {"n": 3, "runs": 1}
    times = [record["submitted_at"], record["started_at"], record["finished_at"]]
    assert all(type(moment) is int for moment in times), times  # ms since the epoch

    only = await cli(manifest, "job", job_id, "--result")
    assert json.loads(only.out) == {"n": 3, "runs": 1}

    listed = await cli(manifest, "jobs", "--state", "succeeded", "--json")
    assert [each["id"] for each in json.loads(listed.out)] == [job_id]
    table = await cli(manifest, "jobs", "--limit", "5")
    assert table.out.splitlines()[0].split()[:4] == ["ID", "METHOD", "STATE", "ATTEMPTS"]
    assert job_id in table.out and "jobs.work" in table.out
    submitted = datetime.datetime.fromtimestamp(times[0] / 1000, datetime.UTC)
    assert submitted.strftime("%Y-%m-%d %H:%M:%S") in table.out  # the table says UTC
    assert (await cli(manifest, "jobs", "--state", "dead")).out.strip() == "no jobs"


async def test_dead_letters_are_listed_redriven_and_purged_only_when_confirmed(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    workers = manifest_file(tmp_path, redis_server.url, redis_prefix, workers=1, max_attempts=2)
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix, max_attempts=2)
    async with Dispatcher(load_manifest(workers)) as dispatcher:
        job_id = await dispatcher.submit("jobs", "busy")
        with pytest.raises(Exception, match="always busy"):
            await dispatcher.result(job_id, wait=60)

        listed = await cli(manifest, "dlq", "list", "--json")
        (dead,) = json.loads(listed.out)
        assert (dead["id"], dead["state"], dead["attempts"]) == (job_id, "dead", 2)
        assert "target_unavailable" in (await cli(manifest, "dlq", "list")).out

        both = await cli(manifest, "dlq", "redrive", job_id, "--all")
        assert both.code == 2 and "not both" in both.err
        neither = await cli(manifest, "dlq", "redrive")
        assert neither.code == 2

        shown = await cli(manifest, "job", job_id, "--result")
        assert shown.code == 1
        error = json.loads(shown.err)["error"]  # the last attempt's, final: no polling it
        assert error["type"] == "target_unavailable" and error["retryable"] is False
        assert error["details"]["state"] == "dead" and "retry_after" not in error

        redriven = await cli(manifest, "dlq", "redrive", job_id)
        assert redriven.code == 0 and "redriven: 1" in redriven.out
        with pytest.raises(Exception, match="always busy"):
            await dispatcher.result(job_id, wait=60)  # its two attempts again, dead again
        again = await cli(manifest, "dlq", "redrive", "not-a-dead-job")
        assert again.code == 1 and "not-a-dead-job" in again.err

    unconfirmed = await cli(manifest, "dlq", "purge", "--all")
    assert unconfirmed.code == 2 and "--yes" in unconfirmed.err
    assert len(json.loads((await cli(manifest, "dlq", "list", "--json")).out)) == 1
    purged = await cli(manifest, "dlq", "purge", job_id, "--yes")
    assert purged.code == 0 and "purged: 1" in purged.out
    assert json.loads((await cli(manifest, "dlq", "list", "--json")).out) == []
    gone = await cli(manifest, "job", job_id)
    assert gone.code == 1 and "no job" in gone.err


async def test_a_redriven_job_shows_no_error_until_an_attempt_of_its_own_fails(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Queued again, a redriven job has not failed yet: what it was dead-lettered with is
    its ``previous_error`` (as a success after failed attempts shows its last failure),
    not its ``error``, and it has no end. Its new attempts' errors are its own again."""
    workers = manifest_file(tmp_path, redis_server.url, redis_prefix, workers=1, max_attempts=1)
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix, max_attempts=1)
    async with Dispatcher(load_manifest(workers)) as dispatcher:
        job_id = await dispatcher.submit("jobs", "busy")
        with pytest.raises(Exception, match="always busy"):
            await dispatcher.result(job_id, wait=60)
        dead = await dispatcher.job(job_id)
    assert dead["state"] == "dead" and dead["error"]["type"] == "target_unavailable"

    redriven = await cli(manifest, "dlq", "redrive", job_id)
    assert redriven.code == 0 and "redriven: 1" in redriven.out
    record = json.loads((await cli(manifest, "job", job_id)).out)  # no worker: it waits
    assert (record["state"], record["attempts"]) == ("queued", 0)
    assert "error" not in record and "finished_at" not in record
    # The same error, told as the dead record told it: final (not retryable, its state
    # named). Before, it was the last attempt's as stored: "retryable": true.
    assert record["previous_error"] == dead["error"]
    assert (dead["error"]["retryable"], dead["error"]["details"]["state"]) == (False, "dead")
    (row,) = [line.split() for line in (await cli(manifest, "jobs")).out.splitlines()[1:]]
    # ID METHOD STATE ATTEMPTS SUBMITTED(date time) FINISHED ERROR CALLBACK
    assert (row[0], row[2], row[3], row[6], row[7]) == (job_id, "queued", "0", "-", "-")

    async with Dispatcher(load_manifest(workers)) as dispatcher:
        with pytest.raises(Exception, match="always busy"):
            await dispatcher.result(job_id, wait=60)
        again = await dispatcher.job(job_id)
    assert (again["state"], again["attempts"]) == ("dead", 1)
    assert again["error"]["type"] == "target_unavailable"
    assert again["finished_at"] >= record["redriven_at"]
    assert again["previous_error"] == dead["error"]


async def test_a_failed_job_exits_1_with_its_error(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix, workers=1)
    async with Dispatcher(load_manifest(manifest)) as dispatcher:
        job_id = await dispatcher.submit("jobs", "refuse")
        shown = await cli(manifest, "job", job_id, "--wait", "60", "--result")
    assert shown.code == 1
    error = json.loads(shown.err)["error"]
    assert (error["type"], error["retryable"], error["details"]["state"]) == (
        "NoAccount",
        False,
        "failed",
    )


async def test_a_job_that_succeeded_after_a_failed_attempt_shows_no_error(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    job_id = await job_cut_off_then_succeeded(tmp_path, redis_server.url, redis_prefix, 9)
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix)
    record = json.loads((await cli(manifest, "job", job_id)).out)
    assert record["state"] == "succeeded" and "error" not in record
    assert record["previous_error"]["type"] == "shutting_down"
    (row,) = [line.split() for line in (await cli(manifest, "jobs")).out.splitlines()[1:]]
    # ID METHOD STATE ATTEMPTS SUBMITTED(date time) FINISHED(date time) ERROR CALLBACK
    assert (row[0], row[2], row[3], row[8]) == (job_id, "succeeded", "2", "-")


# -- hostile ----------------------------------------------------------------------------------


async def test_bad_input_is_refused_in_one_line(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix)
    not_json = await cli(manifest, "submit", "jobs", "work", "{n: 1")
    assert not_json.code == 2 and "not valid JSON" in not_json.err
    wrong_params = await cli(manifest, "submit", "jobs", "nope", "{}")
    assert (
        wrong_params.code == 1
        and json.loads(wrong_params.err)["error"]["type"] == "method_not_found"
    )
    huge_id = await cli(manifest, "job", "x" * 500)
    assert huge_id.code == 2
    control = await cli(manifest, "job", "a\tb")
    assert control.code == 2
    unknown = await cli(manifest, "job", "no-such-job")
    assert unknown.code == 1 and unknown.err.count("\n") == 1
    too_long = await cli(manifest, "job", "no-such-job", "--wait", "99999")
    assert too_long.code == 2
    refused = await cli(
        manifest, "submit", "jobs", "work", '{"n": 1}', "--callback-url", "http://169.254.169.254/x"
    )
    assert refused.code == 1
    assert json.loads(refused.err)["error"]["type"] == "invalid_params"
    bad_state = await cli(manifest, "jobs", "--state", "lost")
    assert bad_state.code == 2


async def test_a_manifest_without_redis_is_told_what_to_set(tmp_path: Path) -> None:
    path = tmp_path / "plugins.yaml"
    path.write_text(json.dumps({"version": 1, "plugins": []}))
    for args in (("jobs",), ("dlq", "list"), ("job", "abc"), ("submit", "p", "m")):
        ran = await cli(path, *args)
        assert ran.code == 2, args
        assert "backend: redis" in ran.err


async def test_a_redis_that_is_down_or_frozen_ends_every_command_within_its_bound(
    tmp_path: Path, own_redis: Redis, redis_prefix: str
) -> None:
    manifest = manifest_file(tmp_path, own_redis.url, redis_prefix)
    own_redis.pause()  # accepts connections, answers nothing: the worst case for a close
    try:
        for args in (("jobs",), ("dlq", "redrive", "--all"), ("dlq", "purge", "x", "--yes")):
            ran = await cli(manifest, *args, timeout=60)
            assert ran.code == 1, (args, ran.err)
            assert "unavailable" in ran.err
    finally:
        own_redis.resume()
    own_redis.stop()
    ran = await cli(manifest, "job", "abc", "--wait", "1", timeout=60)
    assert ran.code == 1 and "unavailable" in ran.err


async def test_oversized_params_are_refused_at_submit(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix, max_params_bytes=1000)
    params = json.dumps({"n": 1, "pad": "x" * 2000})
    ran = await cli(manifest, "submit", "jobs", "work", params)
    assert ran.code == 1
    error = json.loads(ran.err)["error"]
    assert error["type"] == "invalid_params" and "max_params_bytes" in error["message"]
    assert (await cli(manifest, "jobs")).out.strip() == "no jobs"


async def test_redrive_all_sends_back_every_job_it_can_and_names_the_rest(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    workers = manifest_file(tmp_path, redis_server.url, redis_prefix, workers=1, max_attempts=1)
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix)
    async with Dispatcher(load_manifest(workers)) as dispatcher:
        ids = [await dispatcher.submit("jobs", "busy") for _ in range(3)]
        async with aioredis.Redis.from_url(redis_server.url) as client:
            await client.xadd(f"{redis_prefix}:jobs", {"junk": "x"})
        store = dispatcher.state_backend.jobs  # type: ignore[union-attr]
        assert store is not None

        async def all_dead() -> bool:
            return len(await store.dead(10)) == 4

        async def settled() -> None:
            while not await all_dead():  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        await asyncio.wait_for(settled(), 60)
    ran = await cli(manifest, "dlq", "redrive", "--all")
    assert ran.code == 0, ran.err
    assert "redriven: 3" in ran.out
    assert ran.err.count("not redriven: entry-") == 1
    queued = json.loads((await cli(manifest, "jobs", "--state", "queued", "--json")).out)
    assert sorted(each["id"] for each in queued) == sorted(ids)
