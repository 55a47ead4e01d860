"""Async jobs over the gateway: ``POST …:submit``, ``GET /v1/jobs/{id}`` and its result,
with the manifest's auth, access and audit, on a real Redis and a real gateway."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis

from dispatcher import Dispatcher, ResultTooLarge, parse_manifest
from dispatcher.config import load_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from linchkit_plugin._proto import gateway_pb2, gateway_pb2_grpc
from providers._grpc.status import translate_rpc_error
from tests.gateway_support import echo_entry
from tests.services import Redis, until
from tests.test_gateway_security import ADMIN_KEY, READER_KEY, sha256
from tests.test_job_callbacks import ok, receiving
from tests.test_jobs_cli import cli

PLUGINS = Path(__file__).resolve().parent / "plugins"


def jobs_document(tmp_path: Path, url: str, prefix: str, workers: int) -> dict[str, Any]:
    return {
        "version": 1,
        "state": {"backend": "redis", "url": url, "key_prefix": prefix, "op_timeout_ms": 1000},
        "jobs": {"workers": workers, "backoff_ms": 10, "backoff_max_ms": 50, "max_attempts": 2},
        "auth": {
            "api_keys": [
                {"principal": "reader-svc", "sha256": sha256(READER_KEY), "roles": ["reader"]},
                {"principal": "admin-svc", "sha256": sha256(ADMIN_KEY), "roles": ["admin"]},
            ]
        },
        "access": {"roles": {"reader": {"allow": ["jobs.work"]}, "admin": {"allow": ["*"]}}},
        "audit": {"path": str(tmp_path / "audit.log")},
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
                    "work": {
                        "params_schema": {
                            "type": "object",
                            "properties": {"n": {"type": "integer"}},
                            "required": ["n"],
                        }
                    },
                    "busy": {},
                    "refuse": {},
                    "echo": {},
                },
            }
        ],
    }


@contextlib.asynccontextmanager
async def jobs_gateway(
    tmp_path: Path,
    url: str,
    prefix: str,
    *,
    workers: int = 1,
    max_job_wait: float = 30.0,
    max_job_waits: int = 1000,
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    loaded = parse_manifest(jobs_document(tmp_path, url, prefix, workers), base_dir=tmp_path)
    settings = GatewaySettings(
        port=0, max_body_bytes=64 * 1024, max_job_wait=max_job_wait, max_job_waits=max_job_waits
    )
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        yield server.url, session


async def send(
    session: aiohttp.ClientSession, method: str, url: str, key: str | None, **options: Any
) -> tuple[int, Any, Any]:
    headers = dict(options.pop("headers", {}))
    if key is not None:
        headers["X-API-Key"] = key
    async with session.request(method, url, headers=headers, **options) as answer:
        return answer.status, await answer.json(content_type=None), answer.headers


async def test_a_submitted_job_is_read_by_its_caller_and_audited(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix) as (base, session):
        submit = f"{base}/v1/plugins/jobs/methods/work:submit"
        status, body, headers = await send(session, "POST", submit, READER_KEY, json={"n": 4})
        assert status == 202, body
        job_id = body["job_id"]
        assert headers["Location"] == body["location"] == f"/v1/jobs/{job_id}"

        status, body, _ = await send(session, "GET", f"{base}/v1/jobs/{job_id}?wait=30", READER_KEY)
        assert status == 200, body
        job = body["job"]
        assert (job["state"], job["caller"], job["params"]) == ("succeeded", "reader-svc", {"n": 4})
        times = [job["submitted_at"], job["started_at"], job["finished_at"]]
        assert all(type(moment) is int for moment in times), times  # ms since the epoch
        assert times == sorted(times) and abs(times[0] - time.time() * 1000) < 600_000
        status, body, _ = await send(session, "GET", f"{base}/v1/jobs/{job_id}/result", READER_KEY)
        assert (status, body) == (200, {"ok": True, "result": {"n": 4, "runs": 1}})

        # A call is still a call: the submit route did not take the plain method's path.
        status, body, _ = await send(
            session, "POST", f"{base}/v1/plugins/jobs/methods/work", READER_KEY, json={"n": 5}
        )
        assert (status, body["result"]["n"]) == (200, 5)

    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    submitted = [record for record in records if record["kind"] == "submit"]
    assert [(r["principal"]["id"], r["method"], r["outcome"]) for r in submitted] == [
        ("reader-svc", "work", "ok")
    ]
    assert submitted[0]["request_id"] == job_id


async def test_another_callers_job_is_not_found_and_access_applies_at_submit(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix) as (base, session):
        status, body, _ = await send(
            session,
            "POST",
            f"{base}/v1/plugins/jobs/methods/work:submit",
            READER_KEY,
            json={"n": 1},
        )
        job_id = body["job_id"]
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result"):
            theirs = await send(session, "GET", base + path, ADMIN_KEY)
            nobody = await send(
                session, "GET", base + path.replace(job_id, "no-such-job"), ADMIN_KEY
            )
            assert theirs[0] == nobody[0] == 404
            assert theirs[1]["error"]["type"] == nobody[1]["error"]["type"] == "job_not_found"
            assert (await send(session, "GET", base + path, None))[0] == 401
            assert (await send(session, "GET", base + path, "rk_live_guess"))[0] == 401

        status, body, _ = await send(
            session, "POST", f"{base}/v1/plugins/jobs/methods/refuse:submit", READER_KEY, json={}
        )
        assert (status, body["error"]["type"]) == (403, "forbidden")
        status, body, _ = await send(
            session, "POST", f"{base}/v1/plugins/jobs/methods/nope:submit", ADMIN_KEY, json={}
        )
        assert (status, body["error"]["type"]) == (404, "method_not_found")


async def test_a_failed_job_answers_its_error_and_an_unfinished_one_202(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix) as (base, session):
        status, body, _ = await send(
            session, "POST", f"{base}/v1/plugins/jobs/methods/refuse:submit", ADMIN_KEY, json={}
        )
        job_id = body["job_id"]
        status, body, _ = await send(
            session, "GET", f"{base}/v1/jobs/{job_id}/result?wait=30", ADMIN_KEY
        )
        assert (status, body["error"]["type"]) == (500, "NoAccount")
        assert body["error"]["details"]["state"] == "failed"
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        status, body, _ = await send(
            session, "POST", f"{base}/v1/plugins/jobs/methods/work:submit", ADMIN_KEY, json={"n": 2}
        )
        job_id = body["job_id"]
        started = time.monotonic()
        status, body, headers = await send(
            session, "GET", f"{base}/v1/jobs/{job_id}/result?wait=0.5", ADMIN_KEY
        )
        assert (status, body["error"]["type"]) == (202, "job_not_finished")
        assert headers["Retry-After"] == "1"
        assert 0.4 < time.monotonic() - started < 20
        status, body, _ = await send(session, "GET", f"{base}/v1/jobs/{job_id}", ADMIN_KEY)
        assert (status, body["job"]["state"]) == (200, "queued")


async def test_a_dead_jobs_result_is_final_with_no_retry_after(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Its last attempt's error keeps its type and status, but a client that honours
    ``Retry-After`` must not poll for ever: the job is over."""
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix) as (base, session):
        status, body, _ = await send(
            session, "POST", f"{base}/v1/plugins/jobs/methods/busy:submit", ADMIN_KEY, json={}
        )
        job_id = body["job_id"]
        status, body, headers = await send(
            session, "GET", f"{base}/v1/jobs/{job_id}/result?wait=30", ADMIN_KEY
        )
        record = (await send(session, "GET", f"{base}/v1/jobs/{job_id}", ADMIN_KEY))[1]["job"]
    assert status == 503, body
    assert "Retry-After" not in headers
    error = body["error"]
    assert error["type"] == "target_unavailable"
    # Told as a call's answer is under error_detail: safe (the store keeps the plugin's words).
    assert error["message"].startswith("jobs.busy: the plugin could not be reached")
    assert error["retryable"] is False and "retry_after" not in error
    assert error["details"]["state"] == "dead"
    assert (record["state"], record["attempts"]) == ("dead", 2)
    # The record says what the result says: before, its error was the last attempt's as
    # stored, retryable and without the state, for a job that will not run again.
    told = record["error"]
    assert (told["type"], told["retryable"], told["details"]) == (
        "target_unavailable",
        False,
        error["details"],
    )
    assert "retry_after" not in told


async def test_a_result_over_max_result_bytes_is_told_so(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """The plugin answered, the dispatcher could not keep its answer: said so, with the
    limit, as its own type. Before: provider_error, told under error_detail safe as "the
    plugin's target answered outside the protocol", which sent the caller to the plugin."""
    document = jobs_document(tmp_path, redis_server.url, redis_prefix, workers=1)
    document["jobs"]["max_result_bytes"] = 1000
    settings = GatewaySettings(port=0)
    async with (
        Dispatcher(parse_manifest(document, base_dir=tmp_path)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        base = server.url
        submit = f"{base}/v1/plugins/jobs/methods/echo:submit"
        status, body, _ = await send(session, "POST", submit, ADMIN_KEY, json={"text": "x" * 2000})
        assert status == 202, body
        job_id = body["job_id"]
        status, result, _ = await send(
            session, "GET", f"{base}/v1/jobs/{job_id}/result?wait=30", ADMIN_KEY
        )
        record = (await send(session, "GET", f"{base}/v1/jobs/{job_id}", ADMIN_KEY))[1]["job"]
    error = result["error"]
    assert (status, error["type"], error["retryable"]) == (500, "result_too_large", False), result
    assert "2002 bytes" in error["message"] and "jobs.max_result_bytes = 1000" in error["message"]
    assert "outside the protocol" not in error["message"]
    assert error["details"] == {"stage": "jobs", "state": "failed", "limit": 1000, "bytes": 2002}
    assert (record["state"], record["error"]["type"]) == ("failed", "result_too_large")


#: A method that waits for a job of its own dispatcher and answers its result: the gRPC
#: port has no job routes (proto/gateway.proto: Call and Stream), so a call is how a job's
#: end reaches it. ``HOST`` is the dispatcher, handed over by the test once it has started.
_JOB_WAITER_PLUGIN = """
from linchkit_plugin import Plugin

HOST = None


class JobWaiter(Plugin):
    async def result(self, job_id):
        return await HOST.result(job_id, wait=30)
"""


async def test_a_result_over_max_result_bytes_on_the_grpc_port_is_read_back_as_itself(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """A real job whose result is over ``jobs.max_result_bytes``, its end answered on the
    gateway's gRPC port and read back by the dispatcher's own reading of gRPC statuses
    (``providers._grpc.status``): ``ResultTooLarge``, not retryable, the gateway's words.
    Before: ``Overloaded``, retryable, "the plugin's server is out of a resource", which
    sends the call to another instance for the same too-large result."""
    (tmp_path / "job_waiter_plugin.py").write_text(_JOB_WAITER_PLUGIN)
    document = jobs_document(tmp_path, redis_server.url, redis_prefix, workers=1)
    document["jobs"]["max_result_bytes"] = 1000
    document["plugins"].append(
        {
            "id": "waiter",
            "version": "1.0.0",
            "target": {
                "provider": "local",
                "entrypoint": "job_waiter_plugin:JobWaiter",
                "path": str(tmp_path),
            },
            "methods": {"result": {}},
        }
    )
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        Dispatcher(parse_manifest(document, base_dir=tmp_path)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        sys.modules["job_waiter_plugin"].HOST = dispatcher
        submit = f"{server.url}/v1/plugins/jobs/methods/echo:submit"
        status, body, _ = await send(session, "POST", submit, ADMIN_KEY, json={"text": "x" * 2000})
        assert status == 202, body
        assert server.grpc is not None
        async with grpc.aio.insecure_channel(server.grpc.address) as channel:
            call = gateway_pb2.GatewayCall(
                plugin="waiter",
                method="result",
                params_json=json.dumps({"job_id": body["job_id"]}).encode(),
            )
            with pytest.raises(grpc.aio.AioRpcError) as answered:
                await gateway_pb2_grpc.GatewayServiceStub(channel).Call(
                    call, metadata=(("x-api-key", ADMIN_KEY),)
                )
    error = answered.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    read = translate_rpc_error(error, "gateway waiter.result")
    assert isinstance(read, ResultTooLarge), repr(read)
    assert not read.retryable and read.retry_after is None
    assert "2002 bytes" in read.message and "jobs.max_result_bytes = 1000" in read.message


async def test_a_submit_with_an_idempotency_key_again_is_the_same_job(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Before: each submit with the key queued a new job (the plugin's result replayed
    under a new id). Now the same key, caller and params answer the first job again; other
    params are refused as a call's are; another caller's key is its own."""
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (
        base,
        session,
    ):
        submit = f"{base}/v1/plugins/jobs/methods/work:submit"
        keyed = {"Idempotency-Key": "order-17"}
        answers = [
            await send(session, "POST", submit, ADMIN_KEY, json={"n": 3}, headers=keyed)
            for _ in range(3)
        ]
        assert [status for status, _, _ in answers] == [202, 202, 202], answers
        first = answers[0][1]
        assert [body for _, body, _ in answers] == [first] * 3
        assert {headers["Location"] for _, _, headers in answers} == {first["location"]}
        status, body, _ = await send(
            session, "POST", submit, ADMIN_KEY, json={"n": 4}, headers=keyed
        )
        assert (status, body["error"]["type"]) == (400, "invalid_params"), body
        assert "order-17" in body["error"]["message"] and "other params" in body["error"]["message"]
        status, other, _ = await send(
            session, "POST", submit, READER_KEY, json={"n": 3}, headers=keyed
        )
        assert status == 202 and other["job_id"] != first["job_id"]
        unkeyed = [
            (await send(session, "POST", submit, ADMIN_KEY, json={"n": 3}))[1]["job_id"]
            for _ in range(2)
        ]
        assert len({*unkeyed, first["job_id"]}) == 3


async def test_a_submission_key_spent_on_one_version_is_refused_on_another(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Before: a key used to submit to 1.0.0 and then to 2.0.0 answered the 1.0.0 job's id
    (its record keyed by method, caller and key, not version), so the caller believed a
    2.0.0 job queued that never was. Another version is another request: refused."""
    document = jobs_document(tmp_path, redis_server.url, redis_prefix, workers=0)
    (plugin,) = document["plugins"]
    document["plugins"].append({**plugin, "version": "2.0.0"})
    loaded = parse_manifest(document, base_dir=tmp_path)
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
        aiohttp.ClientSession() as session,
    ):
        submit = f"{server.url}/v1/plugins/jobs/methods/work:submit"

        async def submitted(version: str) -> tuple[int, Any]:
            headers = {"Idempotency-Key": "order-17", "X-Plugin-Version": version}
            status, body, _ = await send(
                session, "POST", submit, ADMIN_KEY, json={"n": 3}, headers=headers
            )
            return status, body

        status, first = await submitted("1.0.0")
        assert status == 202, first
        assert await submitted("1.0.0") == (202, first)
        status, other = await submitted("2.0.0")
        assert (status, other["error"]["type"]) == (400, "invalid_params"), other
        assert "another version than 2.0.0" in other["error"]["message"]
        job = await dispatcher.job(first["job_id"])
        assert job["version"] == "1.0.0"


async def test_anonymous_callers_read_the_jobs_submitted_anonymously_and_no_others(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Without ``auth`` every caller of the gateway is anonymous: they share the jobs
    submitted anonymously (a record with no ``caller``), and a job a host submitted for a
    named caller is not theirs, whose owner Redis compares (``owned_record``)."""
    document = jobs_document(tmp_path, redis_server.url, redis_prefix, workers=0)
    del document["auth"], document["access"]
    loaded = parse_manifest(document, base_dir=tmp_path)
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
        aiohttp.ClientSession() as session,
    ):
        submit = f"{server.url}/v1/plugins/jobs/methods/work:submit"
        status, body, _ = await send(session, "POST", submit, None, json={"n": 1})
        assert status == 202, body
        status, read, _ = await send(session, "GET", f"{server.url}{body['location']}", None)
        assert (status, read["job"]["state"]) == (200, "queued"), read
        assert "caller" not in read["job"]
        named = await dispatcher.submit("jobs", "work", {"n": 2}, caller="billing")
        status, read, _ = await send(session, "GET", f"{server.url}/v1/jobs/{named}", None)
        assert (status, read["error"]["type"]) == (404, "job_not_found"), read
        assert (await dispatcher.job_for(named, "billing"))["caller"] == "billing"


#: An address nothing listens on: a job of a method routed there fails target_unavailable.
DEAD_TARGET = "http://127.0.0.9:1/invoke"


@pytest.mark.parametrize("detail", ["safe", "full"])
async def test_a_jobs_infrastructure_error_is_told_as_a_calls_is(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, detail: str
) -> None:
    """Under ``error_detail: safe`` a job's record, its result and its callback tell a
    failure of the infrastructure with its type's fixed message, as a call's answer does;
    the store keeps the whole one, which the operator's CLI shows. Before, the record and
    the callback carried the target's address to the caller."""
    document = jobs_document(tmp_path, redis_server.url, redis_prefix, workers=1)
    document["plugins"].append(
        {
            "id": "remote",
            "version": "1.0.0",
            "target": {"provider": "http", "url": DEAD_TARGET},
            "methods": {"say": {}},
        }
    )
    manifest = tmp_path / "remote.yaml"
    manifest.write_text(json.dumps(document))  # JSON is YAML
    settings = GatewaySettings(port=0, error_detail=detail)
    async with (
        receiving(ok) as receiver,
        Dispatcher(load_manifest(manifest)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        base = server.url
        status, body, _ = await send(
            session,
            "POST",
            f"{base}/v1/plugins/remote/methods/say:submit",
            ADMIN_KEY,
            json={},
            headers={"X-Callback-Url": receiver.url},
        )
        assert status == 202, body
        job_id = body["job_id"]
        status, record, _ = await send(
            session, "GET", f"{base}/v1/jobs/{job_id}?wait=30", ADMIN_KEY
        )
        assert (status, record["job"]["state"]) == (200, "dead"), record
        status, result, _ = await send(session, "GET", f"{base}/v1/jobs/{job_id}/result", ADMIN_KEY)
        assert status == 503, result
        await until(lambda: receiver.received, "callback")
        called_back = json.loads(receiver.received[0][1])
    told = [record["job"]["error"], result["error"], called_back["error"]]
    for error in told:
        assert error["type"] == "target_unavailable", error
        assert error["details"].get("stage") == "connect", error
    assert result["error"]["details"]["state"] == "dead"
    for answer in (record, result, called_back):
        assert ("127.0.0.9" in json.dumps(answer)) == (detail == "full"), answer
    if detail == "safe":
        for error in told:
            assert error["message"].startswith("remote.say: the plugin could not be reached")
    # The store keeps the whole record: the operator's CLI reads it there.
    shown = await cli(manifest, "job", job_id)
    assert shown.code == 1, shown
    stored = json.loads(shown.out)
    assert stored["state"] == "dead" and "127.0.0.9:1" in stored["error"]["message"], stored


@pytest.mark.parametrize(
    ("method", "path", "told"),
    [
        ("POST", "/v1/plugins/jobs/methods/work:submit", "jobs.work:submit"),
        ("GET", "/v1/jobs/j-1", "job j-1"),
        ("GET", "/v1/jobs/j-1?wait=1", "job j-1"),
        ("GET", "/v1/jobs/j-1/result", "job j-1"),
    ],
    ids=["submit", "read", "read-waiting", "result"],
)
async def test_the_job_routes_tell_a_store_outage_without_the_stores_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, method: str, path: str, told: str
) -> None:
    """Redis down (restarted, unreachable): under ``error_detail: safe`` a job route's
    caller is told the job store could not be reached, not the store's address that the
    dispatcher writes for its operator, which the log keeps with the answer's request id.
    Before, each 503 named ``redis://…@127.0.0.9:1/0``."""
    down = "redis://:store-password@127.0.0.9:1/0"
    loaded = parse_manifest(jobs_document(tmp_path, down, "down", workers=0), base_dir=tmp_path)
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        options = {"json": {"n": 1}} if method == "POST" else {}
        status, body, headers = await send(
            session, method, server.url + path, READER_KEY, **options
        )
    assert status == 503, body
    error = body["error"]
    assert (error["type"], error["retryable"]) == ("target_unavailable", True), error
    assert error["message"] == (
        f"{told}: the job store could not be reached (the gateway logs the detail)"
    )
    assert "127.0.0.9" not in json.dumps(body) and "Retry-After" in headers
    logged = [r.getMessage() for r in caplog.records if headers["X-Request-Id"] in r.getMessage()]
    assert len(logged) == 1 and "127.0.0.9" in logged[0], logged


# -- hostile ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/jobs/a-string", "/v1/jobs/a-string/result?wait=5"])
async def test_a_job_key_of_the_wrong_type_is_a_final_corrupt_entry(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, path: str
) -> None:
    """Another program's key where a job's record belongs answered 503 "the job store
    could not be reached", retryable with Retry-After: a client retried, for ever, a key
    that reads the same each time. Now a corrupt entry, as the listing and the worker
    take it: 502 provider_error, final, no Retry-After, told as the job store's."""
    async with aioredis.Redis.from_url(redis_server.url) as client:
        await client.set(f"{redis_prefix}:job:a-string", "SECRET")
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix) as (base, session):
        status, body, headers = await send(session, "GET", base + path, READER_KEY)
    assert status == 502, body
    error = body["error"]
    assert (error["type"], error["retryable"]) == ("provider_error", False), error
    assert "Retry-After" not in headers
    assert error["message"] == (
        "job a-string: the job store holds an entry no dispatcher wrote"
        " (the gateway logs the detail)"
    )
    assert "SECRET" not in json.dumps(body)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/" + "a" * 65,
        "/v1/jobs/a%20b",
        "/v1/jobs/%00",
        "/v1/jobs/%E2%80%AE" + "x",
        "/v1/jobs/a%0Ab/result",
    ],
)
async def test_a_malformed_job_id_is_refused(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, path: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        status, body, _ = await send(session, "GET", base + path, ADMIN_KEY)
        assert (status, body["error"]["type"]) == (400, "invalid_params")


@pytest.mark.parametrize("wait", ["-1", "nan", "inf", "31", "1e9", "soon", ""])
async def test_a_wait_past_the_gateways_bound_is_refused(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, wait: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        status, body, _ = await send(session, "GET", f"{base}/v1/jobs/abc?wait={wait}", ADMIN_KEY)
        assert (status, body["error"]["type"]) == (400, "invalid_params")


async def test_hostile_submissions_are_refused_before_anything_is_queued(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        submit = f"{base}/v1/plugins/jobs/methods/work:submit"
        cases: list[tuple[dict[str, Any], int]] = [
            ({"data": b"x" * (128 * 1024), "headers": {"Content-Type": "application/json"}}, 413),
            ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
            ({"json": {"n": "four"}}, 400),  # the method's params schema
            ({"json": {"n": 1}, "headers": {"Idempotency-Key": "k" * 300}}, 400),
            (
                {"json": {"n": 1}, "headers": {"X-Callback-Url": "http://169.254.169.254/latest"}},
                400,
            ),
            ({"json": {"n": 1}, "headers": {"X-Callback-Url": "file:///etc/passwd"}}, 400),
            # 169.254.169.254 (and 127.0.0.1) in the forms resolvers and URL parsers read
            # as addresses: taken at submit before, then failed as retryable and re-POSTed.
            *(
                ({"json": {"n": 1}, "headers": {"X-Callback-Url": f"http://{host}/hook"}}, 400)
                for host in (
                    "2852039166",
                    "0251.0376.0251.0376",
                    "0xa9fea9fe",
                    "0XA9FEA9FE",
                    "169.254.169.254.",
                    "169.254.43518",
                    "127.1",
                    "127.0.0.1.",
                    "127.0.0.01",
                    "ex%61mple.com",
                    "a..b",
                )
            ),
            ({"json": {"n": 1}, "headers": {"X-Callback-Url": "http://" + "a" * 3000}}, 400),
        ]
        for options, expected in cases:
            status, body, _ = await send(session, "POST", submit, ADMIN_KEY, **options)
            assert status == expected, (options.get("headers"), body)
            assert body["ok"] is False
        assert (await send(session, "POST", submit, None, json={"n": 1}))[0] == 401
        status, body, _ = await send(session, "GET", f"{base}/v1/jobs/x", ADMIN_KEY, params={})
        assert status == 404
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert {record["outcome"] for record in records if record["kind"] == "submit"} != {"ok"}


async def test_a_gateway_on_the_memory_backend_says_jobs_are_unavailable() -> None:
    from tests.conftest import manifest

    settings = GatewaySettings(port=0)
    async with (
        Dispatcher(manifest(echo_entry())) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        aiohttp.ClientSession() as session,
    ):
        status, body, _ = await send(
            session,
            "POST",
            f"{server.url}/v1/plugins/echo/methods/say:submit",
            None,
            json={"text": "x"},
        )
        assert (status, body["error"]["type"]) == (501, "jobs_unavailable")
        status, body, _ = await send(session, "GET", f"{server.url}/v1/jobs/abc", None)
        assert (status, body["error"]["type"]) == (501, "jobs_unavailable")


async def test_the_openapi_document_describes_the_job_routes(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix, workers=0) as (base, session):
        status, document, _ = await send(session, "GET", f"{base}/openapi.json", ADMIN_KEY)
    assert status == 200
    paths = document["paths"]
    submit = paths["/v1/plugins/jobs/methods/work:submit"]["post"]
    assert "202" in submit["responses"] and "200" not in submit["responses"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/jobs.work.params"
    }
    assert {"/v1/jobs/{id}", "/v1/jobs/{id}/result"} <= paths.keys()
    # A job's result answers 500 for a type of the dispatcher's too: named where 500 is.
    result_500 = paths["/v1/jobs/{id}/result"]["get"]["responses"]["500"]["$ref"]
    assert result_500 == "#/components/responses/500"
    assert "result_too_large" in document["components"]["responses"]["500"]["description"]
    job = document["components"]["schemas"]["JobEnvelope"]["properties"]["job"]["properties"]
    assert {job[name]["type"] for name in ("submitted_at", "started_at", "finished_at")} == {
        "integer"
    }
    # Every reference resolves inside the document.
    text = json.dumps(document)
    for reference in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node: Any = document
        for part in reference.split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
