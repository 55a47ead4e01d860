"""Hostile input to ``dispatcher submit|jobs|job|dlq``: records with terminal escapes in
them, secrets given on the command line, a store that never answers. Real processes
against a real Redis (``tests.test_jobs_cli.cli``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from dispatcher._jobs import job_status
from dispatcher.cli.jobs import _job_store, _rows
from dispatcher.config import load_manifest
from dispatcher.state._job_summaries import ErrorBudget, summary
from tests.services import Redis
from tests.test_gateway_security import READER_KEY, sha256
from tests.test_jobs import manifest_file
from tests.test_jobs_cli import cli

ESCAPE = "\x1b]0;owned\x07\x1b[2J"  # set the terminal's title, clear the screen
SECRET = "rk_live_s3cr3t-on-the-command-line"


def authenticated_manifest(folder: Path, url: str, prefix: str) -> Path:
    path = manifest_file(folder, url, prefix)
    document = json.loads(path.read_text())
    document["auth"] = {
        "api_keys": [{"principal": "reader", "sha256": sha256(READER_KEY), "roles": ["r"]}]
    }
    document["access"] = {"roles": {"r": {"allow": ["jobs.*"]}}}
    path.write_text(json.dumps(document))
    return path


async def test_a_record_with_terminal_escapes_is_listed_without_them(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """A plugin chooses its error's type, and a record may be written by hand: neither
    may drive the operator's terminal through ``dispatcher jobs`` or ``dlq list``."""
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix)
    error = json.dumps({"type": f"Bad{ESCAPE}", "message": "m", "retryable": False})
    record = {
        "id": f"job{ESCAPE}",
        "plugin": f"jobs{ESCAPE}",
        "version": "1.0.0",
        "method": "work",
        "params": "{}",
        "state": "dead",
        "attempts": "1",
        "error": error,
        "submitted_at": "1",
    }
    async with aioredis.Redis.from_url(redis_server.url) as client:
        await client.hset(f"{redis_prefix}:job:{record['id']}", mapping=record)
        await client.zadd(f"{redis_prefix}:jobs:recent", {record["id"]: 1})
        await client.zadd(f"{redis_prefix}:jobs:dead", {record["id"]: 1})
    for args in (("jobs",), ("dlq", "list"), ("jobs", "--state", "dead")):
        ran = await cli(manifest, *args)
        assert ran.code == 0, (args, ran.err)
        assert "job" in ran.out and "\x1b" not in ran.out and "\x07" not in ran.out, args
    # Not a job it could run (the record has no stream entry to go back on): named, escaped.
    async with aioredis.Redis.from_url(redis_server.url) as client:
        await client.hdel(f"{redis_prefix}:job:{record['id']}", "plugin")
    ran = await cli(manifest, "dlq", "redrive", "--all")
    assert "not redriven: job" in ran.err and "\x1b" not in ran.err + ran.out, ran


@pytest.mark.parametrize(
    "args",
    [
        ("--api-key", SECRET),
        ("--token", SECRET),
        ("--callback-url", f"http://user:{SECRET}@169.254.169.254/"),
        ("--callback-url", f"http://user:{SECRET}@[::1/"),
        ("--idempotency-key", SECRET + "\x01"),
    ],
    ids=["api-key", "token", "callback-userinfo", "callback-unparsable", "idempotency-key"],
)
async def test_a_secret_on_the_command_line_is_not_echoed_in_the_error(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, args: tuple[str, str]
) -> None:
    manifest = authenticated_manifest(tmp_path, redis_server.url, redis_prefix)
    key = () if args[0] in ("--api-key", "--token") else ("--api-key", READER_KEY)
    ran = await cli(manifest, "submit", "jobs", "work", '{"n": 1}', *key, *args)
    assert ran.code == 1, ran
    assert json.loads(ran.err)["error"]["type"] in ("unauthorized", "invalid_params")
    assert SECRET not in ran.err + ran.out


async def test_submit_to_a_frozen_redis_ends_within_its_bound(
    tmp_path: Path, own_redis: Redis, redis_prefix: str
) -> None:
    manifest = manifest_file(tmp_path, own_redis.url, redis_prefix)
    own_redis.pause()  # accepts connections, answers nothing
    try:
        ran = await cli(manifest, "submit", "jobs", "work", '{"n": 1}', timeout=60)
    finally:
        own_redis.resume()
    assert ran.code == 1, ran
    assert json.loads(ran.err)["error"]["type"] == "target_unavailable", ran.err  # retryable


async def test_a_record_with_unreadable_times_and_counts_is_shown_as_it_is(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Times and counts are numbers in what the commands print, read from the text the
    store keeps: text that is no such number (a record written by hand) stays text, and
    a time no calendar holds is a ``?`` in the table, not a traceback."""
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix)
    record = {
        "id": "odd",
        "plugin": "jobs",
        "version": "1.0.0",
        "method": "work",
        "params": "{}",
        "state": "queued",
        "attempts": "²",  # a digit to str.isdigit, not to int()
        "callback_attempts": "-1",
        "submitted_at": "9" * 18,  # past any calendar
        "redriven_at": "9" * 19,  # past what a JSON encoder's integers hold
        "started_at": "soon",
        "finished_at": "١٢",  # Arabic-Indic digits
    }
    async with aioredis.Redis.from_url(redis_server.url) as client:
        await client.hset(f"{redis_prefix}:job:odd", mapping=record)
        await client.zadd(f"{redis_prefix}:jobs:recent", {"odd": 1})
    shown = await cli(manifest, "job", "odd")
    assert shown.code == 0, shown.err
    status = json.loads(shown.out)
    assert status["submitted_at"] == int("9" * 18)
    for field in ("attempts", "callback_attempts", "started_at", "finished_at", "redriven_at"):
        assert status[field] == record[field], field
    listed = await cli(manifest, "jobs")
    assert listed.code == 0, listed.err
    (row,) = [line.split() for line in listed.out.splitlines()[1:]]
    # ID METHOD STATE ATTEMPTS SUBMITTED FINISHED ERROR CALLBACK: no time to show
    assert row == ["odd", "jobs.work", "queued", "²", "?", "-", "-", "-"]


async def test_a_key_of_the_wrong_type_is_shown_as_a_corrupt_entry(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """``dispatcher job ID`` on another program's key (not a hash) said the store
    "refused a job record: WRONGTYPE …", as if Redis failed; the listing shows it as a
    row of that type. Now the same: what the key holds, which no dispatcher wrote."""
    manifest = manifest_file(tmp_path, redis_server.url, redis_prefix)
    async with aioredis.Redis.from_url(redis_server.url) as client:
        await client.set(f"{redis_prefix}:job:a-string", "SECRET")
    shown = await cli(manifest, "job", "a-string")
    assert shown.code == 1, shown
    assert "holds a string where its record belongs" in shown.err, shown.err
    assert "WRONGTYPE" not in shown.err and "SECRET" not in shown.err + shown.out


async def test_a_listing_reads_rows_not_whole_records(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """``dispatcher jobs`` and ``dlq list`` read every listed record whole (HGETALL): a
    few records with a 16 MiB result, 8 MiB params or a field of any size another writer
    chose were all loaded into the command (for ``--state``, among the 10,000 it looks
    at). The store now sends a row per job: the small fields, errors whole only when
    small, the type of one up to 64 KiB, params and result by their sizes."""
    manifest = load_manifest(manifest_file(tmp_path, redis_server.url, redis_prefix))
    mib = 1024 * 1024
    error = json.dumps({"type": "Huge", "message": "m" * 32 * 1024, "retryable": False})
    records = {
        "result": {"state": "succeeded", "result": '"' + "r" * 16 * mib + '"'},
        "params": {"state": "dead", "params": '"' + "p" * 8 * mib + '"', "error": error},
        "plugin": {"state": "queued", "plugin": "x" * mib},
    }
    async with aioredis.Redis.from_url(redis_server.url) as client:
        for number, (job_id, fields) in enumerate(records.items()):
            record = {"id": job_id, "method": "work", "attempts": "1", **fields}
            record.setdefault("plugin", "jobs")
            await client.hset(f"{redis_prefix}:job:{job_id}", mapping=record)
            await client.zadd(f"{redis_prefix}:jobs:recent", {job_id: number})
        await client.set(f"{redis_prefix}:job:a-string", "not a record")  # another writer's
        await client.zadd(f"{redis_prefix}:jobs:recent", {"a-string": 10, "i" * 100: 11})
        await client.zadd(f"{redis_prefix}:jobs:dead", {"params": 1})
        sent_before = int((await client.info("stats"))["total_net_output_bytes"])
        async with _job_store(manifest) as store:
            recent = await store.recent(20)
            dead = await store.dead(20)
        sent = int((await client.info("stats"))["total_net_output_bytes"]) - sent_before
    assert sent < 64 * 1024, sent  # rows, not the 25 MiB of the records
    rows = {row["id"]: row for row in recent}
    assert list(rows) == ["a-string", "plugin", "params", "result"]  # newest first
    assert rows["a-string"] == {"id": "a-string", "record_type": "string"}
    assert rows["result"]["result_bytes"] == str(16 * mib + 2) and "result" not in rows["result"]
    assert rows["plugin"]["plugin_bytes"] == str(mib) and "plugin" not in rows["plugin"]
    assert rows["params"]["error_type"] == "Huge" and "error" not in rows["params"]
    assert dead == [rows["params"]]
    # A record in hand (an SQS dead letter without a job view) makes the same row.
    for job_id, fields in records.items():
        record = {"id": job_id, "method": "work", "attempts": "1", "plugin": "jobs", **fields}
        assert summary(job_id, record, ErrorBudget()) == rows[job_id], job_id
    statuses = [job_status(row) for row in recent]
    assert statuses[2]["params_bytes"] == 8 * mib + 2  # a number, as counts and times are
    table = _rows(statuses)
    assert [row[6] for row in table[1:]] == ["-", "-", "Huge", "-"]  # ERROR
