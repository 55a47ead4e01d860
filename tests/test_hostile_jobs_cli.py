"""Hostile input to ``dispatcher submit|jobs|job|dlq``: records with terminal escapes in
them, secrets given on the command line, a store that never answers. Real processes
against a real Redis (``tests.test_jobs_cli.cli``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

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
