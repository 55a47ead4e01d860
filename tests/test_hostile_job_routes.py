"""Hostile clients of the gateway's job routes (``…:submit``, ``GET /v1/jobs/{id}`` and
its result): records someone wrote into Redis by hand, callback URLs that name a
forbidden address in disguise, verbs the routes do not take, idempotency keys with
control characters, and more long waits than the gateway parks at once.

A real gateway over a real Redis (``tests.services``), the job plugin in-process.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.services import Redis
from tests.test_gateway_jobs import jobs_gateway, send
from tests.test_gateway_security import ADMIN_KEY, READER_KEY

SUBMIT = "/v1/plugins/jobs/methods/work:submit"


async def submitted(session, base: str, **headers: str) -> tuple[int, dict]:
    status, body, _ = await send(
        session, "POST", base + SUBMIT, READER_KEY, json={"n": 1}, headers=headers
    )
    return status, body


# Spellings that aiohttp (yarl, by IDNA/NFKC) maps to the address 169.254.169.254.
IDEOGRAPHIC_STOPS = "169\u3002254\u3002169\u3002254"
FULLWIDTH = "169.254.169.254".translate({ord(c): 0xFF10 + int(c) for c in "0123456789"}).replace(
    ".", "\uff0e"
)
FULLWIDTH_STOPS = "169\uff0e254\uff0e169\uff0e254"
ENCLOSED_NUMBERS = "\u246f\u2468.254.169.254"  # circled 16, circled 9


@pytest.mark.parametrize(
    "url",
    [
        f"http://{IDEOGRAPHIC_STOPS}/latest/meta-data/",
        f"http://{FULLWIDTH}/",
        f"http://{FULLWIDTH_STOPS}/",
        f"http://{ENCLOSED_NUMBERS}/",
        "http://[::ffff:169.254.169.254]/",
        "http://user:pw@169.254.169.254/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://metadata.google.internal/",
    ],
)
async def test_a_callback_url_naming_link_local_in_disguise_is_refused(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, url: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        status, body = await submitted(session, base, **{"X-Callback-Url": url})
        assert status == 400, body
        assert body["error"]["type"] == "invalid_params"
        assert "egress" in body["error"]["message"]


@pytest.mark.parametrize(
    "url", [f"http://[::ffff:{FULLWIDTH}]/", "http://[abc/", "http://a:99999999/"]
)
async def test_a_callback_url_the_parser_cannot_read_is_invalid_params_not_a_500(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, url: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        status, body = await submitted(session, base, **{"X-Callback-Url": url})
        assert (status, body["error"]["type"]) == (400, "invalid_params"), body


@pytest.mark.parametrize("field", ["params", "result", "error", "attempts"])
async def test_a_record_written_by_hand_answers_a_typed_error_not_a_500(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, field: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        status, body = await submitted(session, base)
        job_id = body["job_id"]
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            state = "failed" if field == "error" else "succeeded"
            await client.hset(
                f"{redis_prefix}:job:{job_id}", mapping={field: "{not json", "state": state}
            )
        finally:
            await client.aclose()
        for path in (
            f"/v1/jobs/{job_id}",
            f"/v1/jobs/{job_id}/result",
            f"/v1/jobs/{job_id}?wait=1",
        ):
            status, body, _ = await send(session, "GET", base + path, READER_KEY)
            assert status != 500, (path, body)
            assert body["ok"] is (status == 200), (path, body)


async def test_another_callers_job_is_refused_before_its_record_is_read_whole(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Before: a read of someone else's job fetched the whole record (HGETALL), decoded its
    params, result and errors, and only then compared the owner, so a caller probing ids
    or re-reading one made the gateway and Redis move and parse other callers' results
    (here 1 MB) for a 404. Now Redis compares the owner field and sends nothing more."""
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        status, body = await submitted(session, base)  # reader-svc's job
        job_id = body["job_id"]
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            big = json.dumps({"blob": "x" * 1_000_000})
            record = f"{redis_prefix}:job:{job_id}"
            await client.hset(record, mapping={"state": "succeeded", "result": big})
            await client.config_resetstat()
            for path in (
                f"/v1/jobs/{job_id}",
                f"/v1/jobs/{job_id}/result",
                f"/v1/jobs/{job_id}?wait=5",
            ):
                for _ in range(5):
                    status, body, _ = await send(session, "GET", base + path, ADMIN_KEY)
                    assert (status, body["error"]["type"]) == (404, "job_not_found"), body
            stats = await client.info("commandstats")
            assert "cmdstat_hgetall" not in stats, stats["cmdstat_hgetall"]
            assert stats["cmdstat_evalsha"]["calls"] >= 15  # the owner compared in Redis
        finally:
            await client.aclose()
        status, body, _ = await send(session, "GET", f"{base}/v1/jobs/{job_id}/result", READER_KEY)
        assert (status, len(body["result"]["blob"])) == (200, 1_000_000)


@pytest.mark.parametrize("verb", ["POST", "PUT", "DELETE", "PATCH"])
async def test_a_job_route_says_which_verb_it_takes(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, verb: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        for path in ("/v1/jobs/abc", "/v1/jobs/abc/result"):
            status, body, headers = await send(session, verb, base + path, READER_KEY)
            assert (status, headers.get("Allow")) == (405, "GET"), (path, body)
        status, _, headers = await send(session, "GET", base + SUBMIT, READER_KEY)
        assert (status, headers.get("Allow")) == (405, "POST")


async def raw_request(base: str, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """One request written byte for byte (aiohttp's client refuses control characters
    in headers; a hostile client does not)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    try:
        document = json.loads(payload)
    except ValueError:  # aiohttp's own parser answers 400 in plain text
        document = {"text": payload.decode(errors="replace")}
    return int(status_line.split()[1]), document


@pytest.mark.parametrize("key", [b"a\x01b", b"a\x7fb", b"k\x1b[31m", b"\xff\xfe"], ids=repr)
@pytest.mark.parametrize("path", [SUBMIT, SUBMIT.removesuffix(":submit")])
async def test_an_idempotency_key_with_control_characters_or_not_utf8_is_refused(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, key: bytes, path: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, _):
        body = b'{"n": 1}'
        head = (
            (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"X-API-Key: {READER_KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
            ).encode()
            + b"Idempotency-Key: "
            + key
            + b"\r\n"
        )
        status, answer = await raw_request(base, head, body)
        assert status == 400, answer
        if "text" not in answer:  # not refused first by aiohttp's HTTP parser
            assert answer["error"]["type"] == "invalid_params"


async def test_an_idempotency_key_over_255_characters_is_refused(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        status, body = await submitted(session, base, **{"Idempotency-Key": "x" * 256})
        assert (status, body["error"]["type"]) == (400, "invalid_params"), body
        status, body = await submitted(session, base, **{"Idempotency-Key": "x" * 255})
        assert status == 202, body


@pytest.mark.parametrize("path", [SUBMIT, SUBMIT.removesuffix(":submit")])
async def test_a_compressed_body_that_inflates_past_the_limit_is_413(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, path: str
) -> None:
    """A gzip body of a few kilobytes that inflates to 64 MB: its Content-Length is under
    the limit, what it inflates to is not. Refused with the gateway's own envelope."""
    inflated = b'{"n": 1, "pad": "' + b" " * (64 * 1024 * 1024) + b'"}'
    bomb = gzip.compress(inflated, compresslevel=9)
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, _):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"X-API-Key: {READER_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n"
        ).encode()
        status, answer = await raw_request(base, head, bomb)
        assert status == 413, answer
        assert answer["error"]["type"] == "invalid_params", answer


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [("gzip", 400), ("deflate", 400), ("x-unknown", 415), ("gzip, gzip", 415)],
)
async def test_a_body_that_lies_about_its_encoding_is_refused_in_the_envelope(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, encoding: str, expected: int
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, _):
        body = b'{"n": 1}'  # plain JSON, whatever the header says
        head = (
            f"POST {SUBMIT} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"X-API-Key: {READER_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        status, answer = await raw_request(base, head, body)
        assert status == expected, answer
        assert answer["error"]["type"] == "invalid_params", answer


async def test_an_honest_gzip_body_is_still_read(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, _):
        body = gzip.compress(b'{"n": 7}')
        head = (
            f"POST {SUBMIT} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"X-API-Key: {READER_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: GZIP\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        status, answer = await raw_request(base, head, body)
        assert status == 202, answer


async def test_long_waits_past_the_gateways_bound_are_refused_as_overloaded(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Each parked wait reads Redis twice a second: without a bound, a client holding
    thousands of them would crowd every other caller out of Redis."""
    async with jobs_gateway(
        tmp_path, redis_server.url, redis_prefix, workers=0, max_job_waits=2
    ) as (base, session):
        _, body = await submitted(session, base)
        job = f"{base}/v1/jobs/{body['job_id']}"

        async def parked() -> tuple[int, Any, Any]:
            while True:  # a probe below may hold a slot for a moment: ask again
                answer = await send(session, "GET", f"{job}?wait=3", READER_KEY)
                if answer[0] != 503:
                    return answer

        waits = [asyncio.create_task(parked()) for _ in range(2)]
        refusal = None
        async with asyncio.timeout(30):
            while refusal is None:
                answer = await send(session, "GET", f"{job}?wait=0.01", READER_KEY)
                refusal = answer if answer[0] == 503 else None
        status, body, headers = refusal
        assert (body["error"]["type"], headers["Retry-After"]) == ("overloaded", "1"), body
        # No wait at all needs no slot: the status is answered at once.
        assert (await send(session, "GET", job, READER_KEY))[0] == 200
        for status, body, _ in await asyncio.gather(*waits):
            assert (status, body["job"]["state"]) == (200, "queued"), body
        # The slots are given back.
        assert (await send(session, "GET", f"{job}?wait=0.01", READER_KEY))[0] == 200


@pytest.mark.parametrize(
    ("path", "header"),
    [
        (SUBMIT, b"X-Plugin-Version: \xff\xfe"),
        (SUBMIT.removesuffix(":submit"), b"X-Plugin-Version: \xff\xfe"),
        ("/v1/plugins/%ff%fe/methods/work:submit", b"X-Nothing: 1"),
        ("/v1/plugins/jobs/methods/%ff%fe:submit", b"X-Nothing: 1"),
        ("/v1/plugins/%ff%fe/methods/work", b"X-Nothing: 1"),
        ("/v1/jobs/%ff%fe", b"X-Nothing: 1"),
        ("/v1/jobs/%ff%fe/result", b"X-Nothing: 1"),
        (SUBMIT, b"X-Callback-Url: http://\xff\xfe/"),
    ],
    ids=repr,
)
async def test_bytes_that_are_not_utf8_in_a_header_or_path_are_a_clear_4xx(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, path: str, header: bytes
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, _):
        body = b'{"n": 1}'
        method = "GET" if path.startswith("/v1/jobs/") else "POST"
        head = (
            (
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"X-API-Key: {READER_KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body) if method == 'POST' else 0}\r\n"
            ).encode()
            + header
            + b"\r\n"
        )
        status, answer = await raw_request(base, head, body if method == "POST" else b"")
        assert 400 <= status < 500, answer
        assert answer["ok"] is False, answer
