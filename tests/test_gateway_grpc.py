"""The gateway's gRPC port with a real ``grpc.aio`` client: calls, streams, the manifest's
``auth``/``access``/``audit`` applied by the dispatcher, errors as statuses that
``providers._grpc.status`` reads back to the same types, mTLS with a rotated client CA,
and hostile requests."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import orjson
import pytest
import trustme
from cryptography import x509

from dispatcher import Dispatcher, ResultTooLarge, parse_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from dispatcher.gateway.grpc_gateway import STATUS_BY_TYPE
from linchkit_plugin._proto import gateway_pb2, gateway_pb2_grpc
from linchkit_plugin.errors import InvalidParams, PluginNotFound
from providers._grpc.status import translate_rpc_error
from tests.conftest import ROOT
from tests.gateway_support import (
    SAY_SCHEMA,
    OneToken,
    echo_entry,
    example_entry,
    running_gateway,
)

API_KEY = "k-9f1d6c0a-never-shown"


def stub(channel: grpc.aio.Channel) -> Any:
    return gateway_pb2_grpc.GatewayServiceStub(channel)


def grpc_call(plugin: str, method: str, params: Any = None, **fields: Any) -> Any:
    raw = b"" if params is None else orjson.dumps(params)
    return gateway_pb2.GatewayCall(plugin=plugin, method=method, params_json=raw, **fields)


async def rpc_error(awaitable: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await awaitable
    return raised.value


def trailers(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: value for key, value in error.trailing_metadata() or ()}


async def test_calls_answer_with_the_result_and_errors_map_to_statuses_read_back_alike() -> None:
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        running_gateway(settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = stub(channel)
        reply = await gateway.Call(grpc_call("echo", "say", {"text": "hi"}, request_id="r-1"))
        assert reply.ok and reply.request_id == "r-1"
        assert orjson.loads(reply.result_json)["text"] == "hi"
        # A plugin's own failure is an answer: OK, ok=false, the plugin's type.
        reply = await gateway.Call(grpc_call("echo", "withdraw", {"amount": 500}))
        assert not reply.ok and reply.error.type == "InsufficientFunds"
        assert reply.request_id  # made up when absent
        cases = [
            (grpc_call("echo", "say", {"text": 5}), grpc.StatusCode.INVALID_ARGUMENT, "invalid_params"),
            (grpc_call("echo", "nope"), grpc.StatusCode.NOT_FOUND, "method_not_found"),
            (grpc_call("ghost", "say"), grpc.StatusCode.NOT_FOUND, "plugin_not_found"),
            (grpc_call("echo", "sleep", {"seconds": 0.05}, timeout_ms=1), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded"),
        ]  # fmt: skip
        for request, status, error_type in cases:
            error = await rpc_error(gateway.Call(request))
            assert error.code() == status, error
            assert trailers(error)["error-type"] == error_type
        # The reverse of providers/_grpc/status.py: a dispatcher reading this port gets
        # the same error class back.
        error = await rpc_error(gateway.Call(cases[0][0]))
        assert translate_rpc_error(error, "gateway").type == "invalid_params"
        error = await rpc_error(gateway.Call(cases[3][0]))
        assert translate_rpc_error(error, "gateway").type == "deadline_exceeded"


#: No call ends ``result_too_large`` today (a job's worker raises it, and the gRPC port has
#: no job routes): an in-process plugin raising the dispatcher's own error stands in for
#: whatever route would bring it to the port.
_RESULT_TOO_LARGE_PLUGIN = """
from dispatcher import ResultTooLarge
from linchkit_plugin import Plugin


class TooLarge(Plugin):
    async def big(self) -> None:
        raise ResultTooLarge(
            "the result is 2002 bytes as JSON, over jobs.max_result_bytes = 1000",
            details={"stage": "jobs", "limit": 1000, "bytes": 2002},
        )
"""


async def test_result_too_large_is_resource_exhausted_final_as_the_http_ports_500(
    tmp_path: Path,
) -> None:
    """The dispatcher's own limit on an answer: RESOURCE_EXHAUSTED, as grpc says of a
    message over a size limit, told final (``retryable: false``, no ``retry-after``) as
    the HTTP port's 500 without ``Retry-After`` is. Before: FAILED_PRECONDITION, the code
    of ``provider_error`` (the target broke the protocol), which it is not."""
    (tmp_path / "too_large_plugin.py").write_text(_RESULT_TOO_LARGE_PLUGIN)
    entry = {
        "id": "limits",
        "version": "1.0.0",
        "target": {
            "provider": "local",
            "entrypoint": "too_large_plugin:TooLarge",
            "path": str(tmp_path),
        },
        "methods": {"big": {}},
    }
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        running_gateway(entry, settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/v1/plugins/limits/methods/big", json={}) as answer,
    ):
        error = await rpc_error(stub(channel).Call(grpc_call("limits", "big", {})))
        http_status, http_error = answer.status, (await answer.json())["error"]
        retry_after = answer.headers.get("Retry-After")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert trailers(error) == {"error-type": "result_too_large", "retryable": "false"}
    assert "jobs.max_result_bytes = 1000" in (error.details() or "")
    assert (http_status, http_error["type"], retry_after) == (500, "result_too_large", None)
    # Read back as itself, final: before, the reader took RESOURCE_EXHAUSTED without
    # grpc's size wording for a server short of capacity, Overloaded and retryable.
    read = translate_rpc_error(error, "gateway limits.big")
    assert isinstance(read, ResultTooLarge), repr(read)
    assert not read.retryable and read.retry_after is None
    assert "jobs.max_result_bytes = 1000" in read.message


#: Raises the error of the type it is asked for, as the dispatcher's chain would have
#: raised it to the gateway (an in-process plugin's DispatchError reaches the port as is).
_FAILING_PLUGIN = """
from dispatcher import ResultTooLarge
from linchkit_plugin import Plugin
from linchkit_plugin.errors import (
    CircuitOpen, DeadlineExceeded, Forbidden, InvalidParams, Overloaded, ProviderError,
    RateLimited, ShuttingDown, TargetUnavailable, Unauthorized,
)

KINDS = {
    kind.type: kind
    for kind in (
        CircuitOpen, DeadlineExceeded, Forbidden, InvalidParams, Overloaded, ProviderError,
        RateLimited, ResultTooLarge, ShuttingDown, TargetUnavailable, Unauthorized,
    )
}


class Failing(Plugin):
    async def fail(self, type, retryable=None, retry_after=None):
        raise KINDS[type](
            f"raised as {type} for the test", retryable=retryable, retry_after=retry_after
        )
"""

#: (how the call gets its error: the params of ``fail``, or a plugin or method that does
#: not exist; what it is read back as: type, retryable, retry_after). Each type of the
#: port's table (``STATUS_BY_TYPE``), and a ``retryable`` or ``retry_after`` other than
#: the type's own, which only the trailers carry.
_READ_BACK = [
    ({"type": "invalid_params"}, ("invalid_params", False, None)),
    ({"type": "unauthorized"}, ("unauthorized", False, None)),
    ({"type": "forbidden"}, ("forbidden", False, None)),
    ("plugin_not_found", ("plugin_not_found", False, None)),
    ("method_not_found", ("method_not_found", False, None)),
    ({"type": "rate_limited", "retry_after": 2.5}, ("rate_limited", True, 2.5)),
    ({"type": "result_too_large"}, ("result_too_large", False, None)),
    ({"type": "deadline_exceeded"}, ("deadline_exceeded", True, None)),
    ({"type": "target_unavailable"}, ("target_unavailable", True, None)),
    ({"type": "target_unavailable", "retryable": False}, ("target_unavailable", False, None)),
    ({"type": "circuit_open", "retry_after": 4}, ("circuit_open", True, 4.0)),
    ({"type": "overloaded", "retry_after": 0.5}, ("overloaded", True, 0.5)),
    ({"type": "shutting_down"}, ("shutting_down", True, None)),
    ({"type": "provider_error"}, ("provider_error", False, None)),
]


async def test_every_error_type_of_the_grpc_port_is_read_back_as_itself(tmp_path: Path) -> None:
    """What ``providers._grpc.status`` makes of each status the port answers, trailers and
    all: the type the gateway named, its ``retryable`` and ``retry_after``, the gateway's
    message. Before, only the type's status was read: NOT_FOUND was provider_error,
    circuit_open, overloaded and shutting_down were target_unavailable without their
    retry_after, a retryable false was read retryable, and result_too_large was overloaded."""
    raised = {case["type"] for case, _ in _READ_BACK if isinstance(case, dict)}
    # provider_error: the status of any type not in the table.
    assert raised | {"plugin_not_found", "method_not_found"} == {*STATUS_BY_TYPE, "provider_error"}
    (tmp_path / "failing_plugin.py").write_text(_FAILING_PLUGIN)
    target = {"provider": "local", "entrypoint": "failing_plugin:Failing", "path": str(tmp_path)}
    entry = {"id": "failing", "version": "1.0.0", "target": target, "methods": {"fail": {}}}
    settings = GatewaySettings(port=0, grpc_port=0)
    read: list[tuple[str, bool, float | None]] = []
    async with (
        running_gateway(entry, settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = stub(channel)
        for case, _ in _READ_BACK:
            if case == "plugin_not_found":
                request = grpc_call("ghost", "fail", {})
            elif case == "method_not_found":
                request = grpc_call("failing", "nope", {})
            else:
                request = grpc_call("failing", "fail", case)
            error = await rpc_error(gateway.Call(request))
            error_read = translate_rpc_error(error, "gateway")
            assert (error.details() or "") in error_read.message
            read.append((error_read.type, error_read.retryable, error_read.retry_after))
    assert read == [expected for _, expected in _READ_BACK]


async def test_hostile_requests_are_refused_typed_and_the_port_keeps_serving() -> None:
    settings = GatewaySettings(port=0, grpc_port=0, max_body_bytes=4096, max_depth=8)
    async with (
        running_gateway(settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = stub(channel)
        not_json = gateway_pb2.GatewayCall(plugin="echo", method="say", params_json=b"{nope")
        deep = gateway_pb2.GatewayCall(
            plugin="echo", method="say", params_json=b"[" * 50 + b"]" * 50
        )
        huge = grpc_call("echo", "say", {"text": "x" * 100_000})
        for request in (
            not_json,
            deep,
            grpc_call("echo", "say", {"text": "hi"}, request_id="bad id\n"),
            # A trailing newline alone passed the check ("$" matches before it), before.
            grpc_call("echo", "say", {"text": "hi"}, request_id="good-id\n"),
            grpc_call("echo", "say", {"text": "hi"}, idempotency_key="k" * 300),
            grpc_call("echo", "say", {"text": "hi"}, timeout_ms=4_000_000_000),
        ):
            error = await rpc_error(gateway.Call(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        error = await rpc_error(gateway.Call(huge))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # grpc's own size limit
        # An invalid traceparent is ignored, as on the HTTP port.
        reply = await gateway.Call(grpc_call("echo", "say", {"text": "ok"}, traceparent="junk"))
        assert reply.ok


async def test_an_error_quoting_a_long_value_is_still_its_own_status_and_type() -> None:
    """An error's message can quote what the caller sent: a value over its schema's
    ``maxLength``, a property the schema does not take, a plugin name nobody has. grpc
    sends the message in a trailer, percent-encoded (a byte past ASCII takes three), and
    its clients refuse trailers past 16 KiB. Before, such a call reached its client as
    ``RESOURCE_EXHAUSTED`` "received metadata size exceeds hard limit" without the
    ``error-type`` trailer, which reads back as ``Overloaded``, retryable: a caller was
    told to send again what could never pass. The message is now cut to fit."""
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        running_gateway(settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = stub(channel)
        invalid = (grpc.StatusCode.INVALID_ARGUMENT, "invalid_params", InvalidParams)
        missing = (grpc.StatusCode.NOT_FOUND, "plugin_not_found", PluginNotFound)
        for request, (code, kind, error_class) in [
            (grpc_call("echo", "say", {"text": "t" * 30_000}), invalid),
            (grpc_call("echo", "say", {"k" * 30_000: 1, "text": "x"}), invalid),
            (grpc_call("echo", "say", {"text": "\u00e9" * 10_000}), invalid),
            (grpc_call("p" * 30_000, "say"), missing),
            (grpc_call("\u00e9" * 3_000, "say"), missing),
        ]:
            for attempt in (
                lambda request=request: gateway.Call(request),
                lambda request=request: _drain(gateway.Stream(request)),
            ):
                error = await rpc_error(attempt())
                assert (error.code(), trailers(error).get("error-type")) == (code, kind), error
                read_back = translate_rpc_error(error, "gateway")
                assert type(read_back) is error_class and not read_back.retryable
                # Cut to fit: by the gateway, or already by the schema check's own cut.
                assert "…" in error.details() and len(error.details()) < 16_384
        reply = await gateway.Call(grpc_call("echo", "say", {"text": "ok"}))
        assert reply.ok


async def test_streams_yield_chunks_in_order() -> None:
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        running_gateway(
            {**example_entry(), "methods": {"count": {}, "echo": {}}}, settings=settings
        ) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = stub(channel)
        items = [item async for item in gateway.Stream(grpc_call("example", "count", {"n": 3}))]
        assert [orjson.loads(item.chunk_json) for item in items] == [{"i": 0}, {"i": 1}, {"i": 2}]
        error = await rpc_error(_drain(gateway.Stream(grpc_call("example", "nope"))))
        assert error.code() == grpc.StatusCode.NOT_FOUND


async def _drain(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass


async def test_a_grpc_deadline_only_shortens_a_call_so_none_is_too_far() -> None:
    """``timeout_ms`` sets the call's deadline as ``X-Timeout-Ms`` does on HTTP; the gRPC
    deadline is how long the client waits, and bounds the call only when sooner. Before,
    it stood in for ``timeout_ms``: past 86,400 s it was refused (``timeout must be a
    number of seconds in (0, 86400]``), and a minute's deadline gave a method of 100 ms a
    minute."""
    entry = echo_entry(say={"params_schema": SAY_SCHEMA}, sleep={"timeout_ms": 100})
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        running_gateway(entry, settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = stub(channel)
        reply = await gateway.Call(grpc_call("echo", "say", {"text": "hi"}), timeout=1e9)
        assert reply.ok
        for deadline in (1e9, 60.0):  # later than the method's 100 ms: that stands
            started = time.monotonic()
            error = await rpc_error(
                gateway.Call(grpc_call("echo", "sleep", {"seconds": 1.0}), timeout=deadline)
            )
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
            assert trailers(error)["error-type"] == "deadline_exceeded"
            assert time.monotonic() - started < 0.9
        # timeout_ms overrides the method's, and a far deadline leaves it so.
        slept = grpc_call("echo", "sleep", {"seconds": 0.3}, timeout_ms=5000)
        assert (await gateway.Call(slept, timeout=1e9)).ok
        # A sooner deadline wins over timeout_ms.
        started = time.monotonic()
        error = await rpc_error(gateway.Call(slept, timeout=0.1))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 0.29


async def test_the_gateways_max_timeout_cuts_a_longer_timeout_ms() -> None:
    """``max_timeout_ms`` cuts ``timeout_ms`` as it cuts ``X-Timeout-Ms`` on HTTP, not
    refused; one under it stands, and a call with none keeps its method's longer timeout.
    Before, a minute's timeout_ms held the call (and the plugin) for the whole minute."""
    entry = echo_entry(sleep={"timeout_ms": 5000})
    settings = GatewaySettings(port=0, grpc_port=0, max_timeout_ms=300)
    async with (
        running_gateway(entry, settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = stub(channel)
        started = time.monotonic()
        error = await rpc_error(
            gateway.Call(grpc_call("echo", "sleep", {"seconds": 30}, timeout_ms=60_000))
        )
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
        assert trailers(error)["error-type"] == "deadline_exceeded"
        assert time.monotonic() - started < 5  # the cap's 0.3 s and slack; it sleeps 30 s
        # Under the cap: the asked deadline stands.
        assert (
            await gateway.Call(grpc_call("echo", "sleep", {"seconds": 0.01}, timeout_ms=250))
        ).ok
        error = await rpc_error(
            gateway.Call(grpc_call("echo", "sleep", {"seconds": 5}, timeout_ms=50))
        )
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
        # No timeout_ms: the method's own 5 s, above the cap, is not cut.
        reply = await gateway.Call(grpc_call("echo", "sleep", {"seconds": 0.6}))
        assert reply.ok and orjson.loads(reply.result_json) >= 0.6
        # Past a day is still malformed, cap or not.
        error = await rpc_error(
            gateway.Call(grpc_call("echo", "sleep", {"seconds": 0}, timeout_ms=86_400_001))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error


async def test_idempotency_keys_follow_the_http_ports_rule() -> None:
    """1-255 printable characters, refused otherwise with the HTTP port's words (naming
    the field). Before, control characters went through to the plugin's context."""
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        running_gateway(settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = stub(channel)
        for key in ("a\x00\n\r\x1b[31m", "\x7f", "line\u2028break", "k" * 256):
            error = await rpc_error(
                gateway.Call(grpc_call("echo", "say", {"text": "hi"}, idempotency_key=key))
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (key, error)
            assert error.details() == "idempotency_key is 1-255 printable UTF-8 characters"
            assert trailers(error)["error-type"] == "invalid_params"
        for key in ("order-1", "clé 2", "k" * 255):
            reply = await gateway.Call(
                grpc_call("echo", "say", {"text": "hi"}, idempotency_key=key)
            )
            assert reply.ok, key


async def test_versions_follow_the_http_ports_rule(caplog: pytest.LogCaptureFixture) -> None:
    """1-256 printable characters, refused otherwise with the HTTP port's words (naming
    the field), on ``Call`` and ``Stream``, with nothing logged above debug. Before, the
    field went on unchecked: a control character reached the routes and the audit log."""
    caplog.set_level(logging.DEBUG)
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        running_gateway(settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = stub(channel)
        hostile = (
            "1.0.0\n\x1b[31m",
            "\x00",
            "^1\r\nX-Injected: yes",
            "1.0.0\x7f",
            "1.0.0\u2028",  # a line separator: not printable
            "\u200b1.0.0",  # a zero-width space: not printable
            "1.0.0" + " " * 252,  # 257 printable characters
        )
        for version in hostile:
            request = grpc_call("echo", "say", {"text": "hi"}, version=version)
            for attempt in (
                lambda request=request: gateway.Call(request),
                lambda request=request: _drain(gateway.Stream(request)),
            ):
                error = await rpc_error(attempt())
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (version, error)
                assert error.details() == (
                    "version is a version or range: 1-256 printable characters"
                ), version
                assert trailers(error) == {"error-type": "invalid_params", "retryable": "false"}
        for version in ("1.0.0", "^1", ">=1.0.0 <2.0.0"):
            reply = await gateway.Call(grpc_call("echo", "say", {"text": "hi"}, version=version))
            assert reply.ok, version
    loud = [
        record
        for record in caplog.records
        if record.levelno > logging.DEBUG and record.name.startswith(("grpc", "dispatcher"))
    ]
    assert not loud, [record.getMessage() for record in loud]


def keyed_manifest(tmp_path: Path) -> Any:
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    return parse_manifest(
        {
            "version": 1,
            "plugins": [echo_entry()],
            "auth": {"api_keys": [{"principal": "billing", "sha256": digest, "roles": ["caller"]}]},
            "access": {"roles": {"caller": {"allow": ["echo.say"]}}},
            "audit": {"path": str(tmp_path / "audit.log")},
        },
        base_dir=ROOT,
    )


async def test_the_dispatcher_authenticates_checks_access_and_audits_grpc_calls(
    tmp_path: Path,
) -> None:
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        Dispatcher(keyed_manifest(tmp_path)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = stub(channel)
        error = await rpc_error(gateway.Call(grpc_call("echo", "say", {"text": "hi"})))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = (("x-api-key", "guess"),)
        error = await rpc_error(
            gateway.Call(grpc_call("echo", "say", {"text": "hi"}), metadata=wrong)
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "guess" not in (error.details() or "")
        key = (("x-api-key", API_KEY),)
        reply = await gateway.Call(grpc_call("echo", "say", {"text": "hi"}), metadata=key)
        assert reply.ok and orjson.loads(reply.result_json)["caller"] == "billing"
        made_up = reply.request_id
        error = await rpc_error(
            gateway.Call(grpc_call("echo", "withdraw", {"amount": 1}), metadata=key)
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    records = [orjson.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    outcomes = [record["outcome"] for record in records if record.get("kind") == "call"]
    assert outcomes == ["unauthorized", "unauthorized", "ok", "forbidden"]
    # The request id made up for a call that sent none is the one its record keeps.
    [answered] = [record for record in records if record.get("outcome") == "ok"]
    assert answered["request_id"] == made_up
    assert API_KEY not in (tmp_path / "audit.log").read_text()


async def test_bytes_that_are_not_a_gateway_call_are_invalid_argument_before_anything_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: grpc's UNKNOWN ``Unexpected <class 'DecodeError'>`` and a traceback in the
    log for every such request. Now INVALID_ARGUMENT, ahead of authentication (no
    credentials here) and the audit log, and nothing logged above debug."""
    caplog.set_level(logging.DEBUG)
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        Dispatcher(keyed_manifest(tmp_path)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        call = channel.unary_unary("/linchkit.gateway.v1.GatewayService/Call", **raw)
        stream = channel.unary_stream("/linchkit.gateway.v1.GatewayService/Stream", **raw)
        garbage = (
            b"\xff\xff\xff\xff\xff",  # no field has number 0 or this wire type
            b"\x0a\x64echo",  # a string field 100 bytes long, 4 sent
            b"\x0a\x04ec\xffo\x12\x03say",  # a string that is not UTF-8
        )
        for sent in garbage:
            for attempt in (
                lambda sent=sent: call(sent, timeout=10),
                lambda sent=sent: _drain(stream(sent, timeout=10)),
            ):
                error = await rpc_error(attempt())
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (sent, error)
                assert error.details() == (
                    "the request is not a GatewayCall message (proto/gateway.proto)"
                )
                assert trailers(error) == {"error-type": "invalid_params", "retryable": "false"}
    assert not (tmp_path / "audit.log").exists() or not (tmp_path / "audit.log").read_text()
    loud = [
        record
        for record in caplog.records
        if record.levelno > logging.DEBUG and record.name.startswith(("grpc", "dispatcher.gateway"))
    ]
    assert not loud, [record.getMessage() for record in loud]


def write(path: Path, blob: bytes) -> Path:
    spare = path.with_suffix(".new")
    spare.write_bytes(blob)
    spare.replace(path)  # the way a secret mount swaps files
    return path


async def test_mtls_on_the_grpc_port_with_the_client_ca_reloaded(tmp_path: Path) -> None:
    server_ca, old_ca, new_ca = trustme.CA(), trustme.CA(), trustme.CA()
    leaf = server_ca.issue_cert("localhost")
    cert = write(tmp_path / "server.pem", leaf.cert_chain_pems[0].bytes())
    key = write(tmp_path / "server.key", leaf.private_key_pem.bytes())
    client_ca = write(tmp_path / "clients.pem", old_ca.cert_pem.bytes())
    alice = old_ca.issue_cert("alice.example", common_name="alice")
    subject = x509.load_pem_x509_certificate(
        alice.cert_chain_pems[0].bytes()
    ).subject.rfc4514_string()
    bob = new_ca.issue_cert("bob.example", common_name="bob")
    bob_subject = x509.load_pem_x509_certificate(
        bob.cert_chain_pems[0].bytes()
    ).subject.rfc4514_string()
    authenticator = OneToken(subjects=frozenset({subject, bob_subject}))
    settings = GatewaySettings(
        port=0, grpc_port=0, tls_cert=cert, tls_key=key, client_ca=client_ca, client_cert="required"
    )

    def channel_for(client: trustme.LeafCert | None) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=server_ca.cert_pem.bytes(),
            private_key=None if client is None else client.private_key_pem.bytes(),
            certificate_chain=None if client is None else client.cert_chain_pems[0].bytes(),
        )
        port = server.grpc.port  # type: ignore[union-attr]
        return grpc.aio.secure_channel(f"localhost:{port}", credentials)

    async with running_gateway(settings=settings, authenticator=authenticator) as (_, server):
        async with channel_for(alice) as channel:
            reply = await stub(channel).Call(grpc_call("echo", "say", {"text": "hi"}))
            assert reply.ok
        assert authenticator.seen[-1].certificate_subject == subject
        assert authenticator.seen[-1].certificate_sans == ("DNS:alice.example",)
        async with channel_for(None) as channel:
            error = await rpc_error(
                stub(channel).Call(grpc_call("echo", "say", {"text": "hi"}), timeout=10)
            )
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        write(client_ca, new_ca.cert_pem.bytes())
        async with asyncio.timeout(20):
            while True:
                async with channel_for(bob) as channel:
                    try:
                        await stub(channel).Call(
                            grpc_call("echo", "say", {"text": "hi"}), timeout=5
                        )
                        break
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.1)
        async with channel_for(alice) as channel:
            error = await rpc_error(
                stub(channel).Call(grpc_call("echo", "say", {"text": "hi"}), timeout=10)
            )
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert server.grpc is not None and server.grpc.fetcher is not None
        assert server.grpc.fetcher.reloads >= 1


@pytest.mark.parametrize("detail", ["safe", "full"])
async def test_the_grpc_port_tells_a_caller_what_the_http_port_does_of_where_plugins_run(
    detail: str,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = {
        "id": "remote",
        "version": "1.0.0",
        "target": {"provider": "http", "url": f"http://127.0.0.1:{port}"},
        "methods": {"say": {}},
    }
    settings = GatewaySettings(port=0, grpc_port=0, error_detail=detail)
    async with (
        running_gateway(dead, settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        error = await rpc_error(stub(channel).Call(grpc_call("remote", "say", {})))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert trailers(error)["error-type"] == "target_unavailable"
    told = error.details() or ""
    assert (f"127.0.0.1:{port}" in told) == (detail == "full")
    if detail == "safe":
        assert told.startswith("remote.say: the plugin could not be reached")


async def test_a_grpc_port_already_taken_is_an_os_error_naming_it_not_a_runtime_error() -> None:
    # grpcio raises RuntimeError for it: `dispatcher serve --grpc-port N` was a traceback
    # where the HTTP port, taken, is "error: … address already in use" and exit 2.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = GatewaySettings(port=0, grpc_port=port)
        with pytest.raises(OSError, match=rf"cannot listen for gRPC on 127\.0\.0\.1:{port}"):
            async with running_gateway(settings=settings):
                pass
