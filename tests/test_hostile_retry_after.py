"""A plugin's ``retry_after`` is a hint from a peer that may lie: real hostile servers on
loopback (a grpc.aio ``PluginService`` with the project's stubs, an aiohttp WebSocket
plugin) answer with a ``retry_after`` that is NaN, an infinity, negative or 1e308, in the
reply's error, in gRPC's ``retry-after`` trailer and in the WebSocket response envelope.

Every error a caller gets carries a ``retry_after`` that is None or a number of seconds
from 0 to ``MAX_RETRY_AFTER_SECONDS`` (a day): a caller that sleeps it is never parked for
good (or raises on NaN), and a job worker that schedules it neither parks the job for good
nor fails to record the attempt and runs a finished job again.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import orjson
import pytest
from aiohttp import WSMsgType, web

from dispatcher import Dispatcher, DispatchError, PluginError, RateLimited
from dispatcher.config import load_manifest
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from linchkit_plugin.errors import MAX_RETRY_AFTER_SECONDS
from linchkit_plugin.wire import encode_json
from linchkit_plugin.ws_protocol import hello_frame
from tests.conftest import manifest
from tests.hostile_peers import grpc_plugin, websocket_plugin
from tests.services import Redis

#: What a lying plugin says, and the ``retry_after`` the caller must get for it.
HOSTILE = [
    ("nan", None),
    ("inf", None),
    ("-inf", None),
    ("-5", None),
    ("1e308", MAX_RETRY_AFTER_SECONDS),
    ("2.5", 2.5),  # an honest one is kept as said
]


class LyingPlugin(plugin_pb2_grpc.PluginServiceServicer):
    """Answers every call with the error its params describe; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def Call(self, request: Any, context: Any) -> Any:
        self.calls += 1
        asked = orjson.loads(request.params_json)
        if asked["where"] == "trailer":  # as a rate limiter in front of the plugin says it
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "quota exceeded",
                trailing_metadata=(("retry-after", asked["value"]),),
            )
        return plugin_pb2.CallReply(
            ok=False,
            error=plugin_pb2.Error(
                type=asked.get("type", "rate_limited"),
                message="come back later",
                retryable=asked.get("retryable", True),
                retry_after=float(asked["value"]),
            ),
        )

    async def Events(self, request_iterator: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no events here")


def assert_sane(error: DispatchError, expected: float | None) -> None:
    assert error.retry_after == expected, error.retry_after
    encode_json(error.to_wire())  # what a job worker records: JSON carries it


@pytest.mark.parametrize(("said", "expected"), HOSTILE)
@pytest.mark.parametrize("where", ["reply", "trailer"])
async def test_a_grpc_plugins_retry_after_reaches_the_caller_only_as_sane_seconds(
    where: str, said: str, expected: float | None
) -> None:
    """Before: NaN, the infinities, -5 and 1e308 reached the caller as said."""
    async with grpc_plugin(LyingPlugin()) as address:
        entry = {
            "id": "liar",
            "version": "1.0.0",
            "target": {"provider": "grpc", "address": address},
            "methods": {"limited": {}},
        }
        async with Dispatcher(manifest(entry)) as dispatcher:
            with pytest.raises(RateLimited) as caught:
                await dispatcher.call("liar", "limited", {"where": where, "value": said})
    assert_sane(caught.value, expected)


@pytest.mark.parametrize(
    ("said", "expected"),
    [(b"1e308", MAX_RETRY_AFTER_SECONDS), (b"-5", None), (b"true", None), (b'"9"', None)],
)
async def test_a_websocket_plugins_retry_after_reaches_the_caller_only_as_sane_seconds(
    said: bytes, expected: float | None
) -> None:
    """JSON carries no NaN nor infinity; 1e308, a negative, a boolean (an ``int`` to
    Python: ``true`` read as 1 s) and a string are what it can lie with. Before: 1e308,
    -5.0 and 1.0."""

    async def plugin(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(hello_frame("liar", "1.0.0", ["limited"]))
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                break
            frame = orjson.loads(message.data)
            if frame["type"] == "call":
                error = b'{"type": "rate_limited", "message": "later", "retry_after": %s}' % said
                await ws.send_bytes(
                    b'{"type": "response", "id": %d, "response": {"ok": false, "error": %s}}'
                    % (frame["id"], error)
                )
        return ws

    async with websocket_plugin(plugin) as url:
        entry = {
            "id": "liar",
            "version": "1.0.0",
            "target": {"provider": "websocket", "url": url},
            "methods": {"limited": {}},
        }
        async with Dispatcher(manifest(entry)) as dispatcher:
            with pytest.raises(RateLimited) as caught:
                await dispatcher.call("liar", "limited", {})
    assert_sane(caught.value, expected)


@pytest.mark.parametrize("said", ["nan", "inf"])
async def test_a_job_whose_plugin_says_a_retry_after_json_cannot_carry_ends_once(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, said: str
) -> None:
    """A final error (not retryable) with a ``retry_after`` JSON cannot carry: the job
    fails once, with the plugin's error. Before: the worker could not write the attempt's
    error down (NaN is no JSON number), logged it as a bug of its own and left the entry
    for another worker, which ran the job again each visibility timeout until it was
    dead-lettered: a charge the plugin had declined, sent three times."""
    servicer = LyingPlugin()
    async with grpc_plugin(servicer) as address:
        document = {
            "version": 1,
            "state": {"backend": "redis", "url": redis_server.url, "key_prefix": redis_prefix},
            "jobs": {
                "workers": 1,
                "max_attempts": 3,
                "backoff_ms": 10,
                "backoff_max_ms": 50,
                "visibility_timeout_ms": 200,
            },
            "plugins": [
                {
                    "id": "liar",
                    "version": "1.0.0",
                    "target": {"provider": "grpc", "address": address},
                    "methods": {"charge": {}},
                }
            ],
        }
        path = tmp_path / "plugins.yaml"
        path.write_text(json.dumps(document))  # JSON is YAML
        async with Dispatcher(load_manifest(path)) as dispatcher:
            job_id = await dispatcher.submit(
                "liar",
                "charge",
                {"where": "reply", "value": said, "type": "Declined", "retryable": False},
            )
            with pytest.raises(DispatchError) as caught:
                await dispatcher.result(job_id, wait=30)
            await asyncio.sleep(0.6)  # three visibility timeouts: nothing runs it again
            record = await dispatcher.job(job_id)
        assert servicer.calls == 1
    assert isinstance(caught.value, PluginError), caught.value
    assert caught.value.remote_type == "Declined"
    assert (record["state"], record["attempts"]) == ("failed", 1)
