"""Text UTF-8 cannot encode (a lone surrogate, ``"\\ud800"``) in what a caller hands the
dispatcher: an in-process caller's arguments, and what reaches the gateway (JSON bodies
may escape one; header bytes that are not UTF-8 arrive as them). Each is refused with a
typed error before anything runs, never a traceback. A real Redis (``tests.services``),
the counting plugin in this process and a plugin process over gRPC.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from dispatcher import Dispatcher, InvalidParams, MethodNotFound, PluginNotFound
from dispatcher.config import load_manifest
from tests.services import Redis
from tests.test_gateway_jobs import jobs_gateway, send
from tests.test_gateway_security import ADMIN_KEY
from tests.test_subprocess_provider import SOURCE_PATH

PLUGINS = Path(__file__).resolve().parent / "plugins"
LONE = "\ud800"


def dispatcher_of(folder: Path, state: dict[str, Any] | None, **extra: Any) -> Dispatcher:
    """``counter`` in this process (``charge`` counts its runs; ``ping`` limited per
    caller) and ``remote``, a plugin process over gRPC (its envelope is encoded)."""
    counting = {
        "provider": "local",
        "entrypoint": "counting_plugin:CountingPlugin",
        "path": str(PLUGINS),
    }
    remote = {
        "provider": "subprocess",
        "command": [sys.executable, str(PLUGINS / "crashing_plugin.py")],
        "env": {"PYTHONPATH": SOURCE_PATH},
    }
    document: dict[str, Any] = {
        "version": 1,
        "plugins": [
            {
                "id": "counter",
                "version": "1.0.0",
                "target": counting,
                "methods": {
                    "charge": {},
                    "counts": {},
                    "ping": {"rate_limit": {"rate": 100, "burst": 10, "scope": "caller"}},
                },
            },
            {"id": "remote", "version": "1.0.0", "target": remote, "methods": {"echo": {}}},
        ],
        **extra,
    }
    if state is not None:
        document["state"] = state
    path = folder / "plugins.json"
    path.write_text(json.dumps(document))  # JSON is YAML
    return Dispatcher(load_manifest(path))


ARGUMENTS = ["idempotency_key", "caller", "request_id", "traceparent"]


async def chunks_of(dispatcher: Dispatcher, **options: Any) -> list[Any]:
    return [chunk async for chunk in dispatcher.stream("remote", "echo", {}, **options)]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_lone_surrogate_in_a_calls_text_is_refused_before_anything_runs(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, backend: str
) -> None:
    """``Dispatcher.call(..., idempotency_key="\\ud800")`` raised a bare
    UnicodeEncodeError (the key's record is hashed from its bytes); so did a caller id,
    request id or traceparent of one wherever it was encoded: a keyed call's record, a
    limit per caller on Redis, a remote plugin's envelope. Where nothing encoded it (this
    process's plugin, no key), the call ran with it, to fail later in a log or the audit.
    Now ``InvalidParams`` naming the argument, whatever the target, and nothing runs."""
    state = None
    if backend == "redis":
        state = {"backend": "redis", "url": redis_server.url, "key_prefix": redis_prefix}
    async with dispatcher_of(tmp_path, state) as dispatcher:
        for argument in ARGUMENTS:
            options = {argument: f"ok-{LONE}"}
            calls = [
                ("counter", "charge", {"amount": 1, "delay": 0}),
                ("counter", "ping", {}),
                ("remote", "echo", {"value": 1}),
            ]
            for plugin, method, params in calls:
                with pytest.raises(InvalidParams) as refused:
                    await dispatcher.call(plugin, method, params, **options)
                message = refused.value.message
                assert message.startswith(f"{argument} is not text UTF-8 can encode"), message
                assert "character 3" in message and LONE not in message
            if argument != "idempotency_key":  # a stream takes none
                with pytest.raises(InvalidParams, match=rf"^{argument} is not text"):
                    await chunks_of(dispatcher, **options)
        assert await dispatcher.call("counter", "counts") == {"charges": 0, "reads": 0}
        # A pair of surrogates is a character like any other: not refused.
        assert await dispatcher.call("remote", "echo", {"value": 2}, caller="ok-\U0001f600") == 2


async def test_a_lone_surrogate_in_a_name_is_refused_and_audited_escaped(tmp_path: Path) -> None:
    """A plugin, method or version name with a lone surrogate is one the manifest does not
    hold: refused typed (``PluginNotFound``, ``MethodNotFound``, ``InvalidParams``). Under
    ``audit``, the record of that refusal could not be written (orjson refuses such text),
    and its TypeError replaced the refusal in the caller's face; the record keeps the name
    escaped now, and so it does for a refused caller id."""
    audit = tmp_path / "audit.log"
    async with dispatcher_of(tmp_path, None, audit={"path": str(audit)}) as dispatcher:
        refusals: list[tuple[type[Exception], tuple[str, str], dict[str, Any]]] = [
            (PluginNotFound, (LONE, "ping"), {}),
            (MethodNotFound, ("counter", LONE), {}),
            (InvalidParams, ("counter", "ping"), {"version": LONE}),
            (InvalidParams, ("counter", "ping"), {"caller": LONE}),
        ]
        for error, (plugin, method), options in refusals:
            with pytest.raises(error):
                await dispatcher.call(plugin, method, {}, **options)
        with pytest.raises(PluginNotFound):
            await dispatcher.publish(LONE, "changed")
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [record["outcome"] for record in records] == [
        "plugin_not_found",
        "method_not_found",
        "invalid_params",
        "invalid_params",
        "plugin_not_found",
    ]
    assert records[0]["plugin"] == records[1]["method"] == records[4]["plugin"] == "\\ud800"
    assert records[3]["principal"] == {"id": "\\ud800", "proven_by": "unverified"}


async def test_a_lone_surrogate_in_a_host_events_name_is_refused(tmp_path: Path) -> None:
    """``publish`` queued an event named with a lone surrogate for the plugin's Events
    stream, whose message (protobuf) cannot encode it, and answered as if sent."""
    async with dispatcher_of(tmp_path, None) as dispatcher:
        with pytest.raises(InvalidParams, match=r"^event is not text UTF-8 can encode"):
            await dispatcher.publish("remote", LONE)
        await dispatcher.publish("remote", "changed", {"n": 1})  # the stream goes on


async def test_a_lone_surrogate_in_a_submission_or_a_job_read_is_refused(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """A submission's caller is kept in the job's record on Redis, and a reader's caller
    compared there: a lone surrogate in one raised UnicodeEncodeError from redis-py.
    The submission's own idempotency key was already refused (printable only)."""
    state = {"backend": "redis", "url": redis_server.url, "key_prefix": redis_prefix}
    async with dispatcher_of(tmp_path, state, jobs={"workers": 0}) as dispatcher:
        job_id = await dispatcher.submit("counter", "ping", caller="someone")
        with pytest.raises(InvalidParams, match=r"^caller is not text UTF-8 can encode"):
            await dispatcher.submit("counter", "ping", caller=LONE)
        with pytest.raises(InvalidParams, match=r"^idempotency_key is 1-255 printable"):
            await dispatcher.submit("counter", "ping", idempotency_key=LONE)
        with pytest.raises(InvalidParams, match=r"^caller is not text UTF-8 can encode"):
            await dispatcher.job_for(job_id, LONE)
        async with aioredis.Redis.from_url(redis_server.url) as client:
            assert await client.zcard(f"{redis_prefix}:jobs:recent") == 1  # nothing queued


async def test_the_gateway_refuses_a_lone_surrogate_in_a_body_or_a_header(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """What a remote caller can send: a JSON string may escape a lone surrogate (a call's
    or a submission's params), and header bytes that are not UTF-8 (here CESU-8's
    encoding of one) reach the gateway as lone surrogates. Each is a 400 naming what was
    wrong, before the plugin runs; nothing answers 500."""
    async with jobs_gateway(tmp_path, redis_server.url, redis_prefix) as (base, session):
        call = f"{base}/v1/plugins/jobs/methods/work"
        body = {
            "data": b'{"n": 1, "text": "\\ud800"}',
            "headers": {"Content-Type": "application/json"},
        }
        for url in (call, f"{call}:submit"):
            status, answer, _ = await send(session, "POST", url, ADMIN_KEY, **body)
            assert status == 400, answer
            assert answer["error"]["type"] == "invalid_params"
            assert "the request body is not JSON" in answer["error"]["message"]
        host, port = base.removeprefix("http://").split(":")
        for header, told in (
            (b"Idempotency-Key", "Idempotency-Key is 1-255 printable UTF-8 characters"),
            (b"X-Plugin-Version", "X-Plugin-Version is a version or range"),
            (b"X-Request-Id", "X-Request-Id is 1-128 characters"),
        ):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/plugins/jobs/methods/work HTTP/1.1\r\nHost: gateway\r\n"
                b"Content-Type: application/json\r\nContent-Length: 8\r\nConnection: close\r\n"
                + f"X-API-Key: {ADMIN_KEY}\r\n".encode()
                + header
                + b": ok-\xed\xa0\x80\r\n\r\n"
                + b'{"n": 1}'
            )
            await writer.drain()
            raw = await reader.read()
            writer.close()
            head, _, payload = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), raw
            assert told in json.loads(payload)["error"]["message"]
        async with aioredis.Redis.from_url(redis_server.url) as client:
            assert await client.zcard(f"{redis_prefix}:jobs:recent") == 0
