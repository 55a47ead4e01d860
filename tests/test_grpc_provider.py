"""provider: grpc against real grpc.aio servers on 127.0.0.1 port 0 in this loop.

A scripted ``PluginService`` answers with the status a test asks for (by method name) and
records what reached it, so the status mapping, metadata, deadlines, TLS and channel
reuse are checked on the wire, not against a mock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    DispatchError,
    Forbidden,
    InvalidParams,
    Overloaded,
    PluginError,
    ProviderError,
    RateLimited,
    TargetUnavailable,
    Unauthorized,
)
from dispatcher.fleet import never_sent
from linchkit_plugin._automtls import generate_certificate
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from linchkit_plugin.handshake import NOT_RUN_TRAILER
from providers._grpc import connection as grpc_connection
from providers.grpc import GrpcProvider, GrpcTarget
from tests.conftest import manifest

STATUS_BY_METHOD = {
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "denied": grpc.StatusCode.PERMISSION_DENIED,
    "internal": grpc.StatusCode.INTERNAL,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
}

#: Methods the scripted plugin refuses with the not-run trailer, under these statuses: only
#: UNAVAILABLE is a stopping plugin's refusal; the trailer on another status is not taken.
NOT_RUN_STATUS = {
    "not_run": grpc.StatusCode.UNAVAILABLE,
    "not_run_internal": grpc.StatusCode.INTERNAL,
}


class ScriptedPlugin:
    """A PluginService whose answers the tests choose; it records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.lifecycle: list[str] = []
        self.batches = 0

    async def Describe(self, request: Any, context: Any) -> Any:
        return plugin_pb2.PluginInfo(id="scripted", version="1.0.0", protocol_version=1)

    async def Init(self, request: Any, context: Any) -> Any:
        self.lifecycle.append(f"Init {orjson.loads(request.config_json)}")
        return plugin_pb2.LifecycleReply()

    async def Start(self, request: Any, context: Any) -> Any:
        self.lifecycle.append("Start")
        return plugin_pb2.LifecycleReply()

    async def Stop(self, request: Any, context: Any) -> Any:
        self.lifecycle.append("Stop")
        return plugin_pb2.LifecycleReply()

    async def Destroy(self, request: Any, context: Any) -> Any:
        self.lifecycle.append("Destroy")
        return plugin_pb2.LifecycleReply()

    async def Call(self, request: Any, context: Any) -> Any:
        self.calls.append(
            {
                "method": request.method,
                "metadata": dict(context.invocation_metadata()),
                "time_remaining": context.time_remaining(),
                "deadline_ms": request.context.deadline_ms,
                "caller": request.context.caller,
                "request_id": request.context.request_id,
            }
        )
        if request.method in NOT_RUN_STATUS:  # as a stopping plugin refuses a call
            await context.abort(
                NOT_RUN_STATUS[request.method],
                "the plugin is stopping: the call was not run",
                trailing_metadata=((NOT_RUN_TRAILER, "stopping"),),
            )
        if request.method == "exhausted_says":  # RESOURCE_EXHAUSTED in the words asked for
            asked = orjson.loads(request.params_json)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                asked["details"],
                trailing_metadata=tuple(map(tuple, asked.get("trailers", ()))),
            )
        if request.method == "aborts_with":  # the status, words and trailers asked for
            asked = orjson.loads(request.params_json)
            await context.abort(
                grpc.StatusCode[asked["status"]],
                asked["details"],
                trailing_metadata=tuple(map(tuple, asked.get("trailers", ()))),
            )
        status = STATUS_BY_METHOD.get(request.method)
        if status is grpc.StatusCode.RESOURCE_EXHAUSTED:
            context.set_trailing_metadata((("retry-after", "2.5"),))
        if status is not None:
            await context.abort(status, f"scripted {status.name}")
        if request.method == "slow":
            await asyncio.sleep(5)
        if request.method == "business":
            return plugin_pb2.CallReply(
                ok=False,
                error=plugin_pb2.Error(
                    type="OutOfStock",
                    message="no more",
                    retryable=True,
                    details_json=b'{"sku": 3}',
                ),
            )
        if request.method == "limited":
            return plugin_pb2.CallReply(
                ok=False,
                error=plugin_pb2.Error(type="rate_limited", message="slow down", retry_after=1.5),
            )
        return plugin_pb2.CallReply(ok=True, result_json=request.params_json)

    async def CallBatch(self, request: Any, context: Any) -> Any:
        self.batches += 1
        return plugin_pb2.BatchReply(
            results=[await self.Call(call, context) for call in request.calls]
        )

    async def CallStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
        for i in range(3):
            yield plugin_pb2.StreamItem(chunk_json=orjson.dumps(i))
        yield plugin_pb2.StreamItem(error=plugin_pb2.Error(type="StreamBroke", message="at 3"))

    async def Events(self, request_iterator: Any, context: Any) -> None:
        # A plugin without events: the host must take UNIMPLEMENTED calmly and stop asking.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no events here")


async def serve(
    servicer: ScriptedPlugin, credentials: Any = None, address: str = "127.0.0.1:0"
) -> tuple[grpc.aio.Server, str, HealthServicer]:
    server = grpc.aio.server()
    plugin_pb2_grpc.add_PluginServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await server.start()
    return server, f"127.0.0.1:{port}", health


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedPlugin, str, HealthServicer]]:
    servicer = ScriptedPlugin()
    server, address, health = await serve(servicer)
    try:
        yield servicer, address, health
    finally:
        await server.stop(grace=None)


def plugin(target: dict[str, Any], **extra: Any) -> dict[str, Any]:
    methods = [
        *STATUS_BY_METHOD,
        *NOT_RUN_STATUS,
        "echo",
        "slow",
        "business",
        "limited",
        "stream",
        "exhausted_says",
    ]
    return {
        "id": "scripted",
        "version": "1.0.0",
        "config": {"k": "v"},
        "target": target,
        "methods": {name: {} for name in methods},
        **extra,
    }


@pytest.mark.parametrize(
    ("method", "error", "retryable"),
    [
        ("unavailable", TargetUnavailable, True),
        ("exhausted", RateLimited, True),
        ("invalid", InvalidParams, False),
        ("unimplemented", ProviderError, False),
        ("unauthenticated", Unauthorized, False),
        ("denied", Forbidden, False),
        ("internal", TargetUnavailable, True),
        ("precondition", ProviderError, False),
    ],
)
async def test_grpc_statuses_become_dispatcher_errors(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
    method: str,
    error: type[Exception],
    retryable: bool,
) -> None:
    _, address, _ = scripted
    async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
        with pytest.raises(error) as caught:
            await d.call("scripted", method, {})
    assert type(caught.value) is error
    assert caught.value.retryable is retryable  # type: ignore[attr-defined]
    if method == "exhausted":
        assert caught.value.retry_after == 2.5  # type: ignore[attr-defined]


#: RESOURCE_EXHAUSTED as servers word it, and what each is: a size refusal, a rate limit
#: (a quota the caller used up), or a server short of something (calls at once, memory).
EXHAUSTED_WORDINGS = [
    ("grpc: received message larger than max (67108889 vs. 67108864)", InvalidParams, "size cap"),
    ("rejected by grpc_ratelimit middleware, please retry later.", RateLimited, "rate limiting"),
    ("Quota exceeded for quota metric 'Requests' per minute", RateLimited, "rate limiting"),
    ("local_rate_limited", RateLimited, "rate limiting"),  # envoy's local rate limit
    ("Server is under memory pressure. Stream rejected.", Overloaded, "short of memory"),
    ("no space left on device", Overloaded, "out of a resource"),
    # Our gRPC gateway's rate_limited, in whatever words, says so in its trailer.
    ("slow down [error-type: rate_limited]", RateLimited, "rate limiting"),
]


@pytest.mark.parametrize(("details", "error", "cause"), EXHAUSTED_WORDINGS)
async def test_resource_exhausted_is_read_as_what_its_server_says_it_is(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
    details: str,
    error: type[Exception],
    cause: str,
) -> None:
    """Before: every RESOURCE_EXHAUSTED but a size refusal was RateLimited, a server short
    of memory too, and the message named no cause. A method that may be retried shows
    that a size refusal is sent once, not retried as a rate limit."""
    servicer, address, _ = scripted
    declared = plugin({"provider": "grpc", "address": address})
    declared["methods"]["exhausted_says"] = {
        "idempotent": True,
        "retry": {"attempts": 3, "initial_backoff_ms": 1, "budget_ratio": 1},
    }
    asked: dict[str, Any] = {"details": details}
    if "[error-type: rate_limited]" in details:
        asked["trailers"] = [["error-type", "rate_limited"]]
    async with Dispatcher(manifest(declared)) as d:
        with pytest.raises(DispatchError) as caught:
            await d.call("scripted", "exhausted_says", asked)
    assert type(caught.value) is error, caught.value
    assert cause in caught.value.message
    assert details in caught.value.message
    assert caught.value.retryable is (error is not InvalidParams)
    if error is InvalidParams:
        assert [call["method"] for call in servicer.calls] == ["exhausted_says"]


@pytest.mark.parametrize(
    ("status", "named", "read_as"),
    [
        # The gateway's own pairs: read as the type named.
        ("NOT_FOUND", "plugin_not_found", "plugin_not_found"),
        ("UNAVAILABLE", "shutting_down", "shutting_down"),
        # A service naming a type under a status the gateway never gives it: the status.
        ("INTERNAL", "plugin_not_found", "target_unavailable"),
        ("FAILED_PRECONDITION", "shutting_down", "provider_error"),
        ("INVALID_ARGUMENT", "circuit_open", "invalid_params"),
    ],
)
async def test_an_error_type_trailer_is_believed_only_beside_its_own_status(
    scripted: tuple[ScriptedPlugin, str, HealthServicer], status: str, named: str, read_as: str
) -> None:
    """The gateway's ``error-type`` trailer names a type the status alone cannot; any
    server can send the trailer, and one saying ``plugin_not_found`` under an INTERNAL made
    its own failure read as the dispatcher's routing (not found, final)."""
    _, address, _ = scripted
    declared = plugin({"provider": "grpc", "address": address})
    declared["methods"]["aborts_with"] = {}
    asked = {"status": status, "details": "said so", "trailers": [["error-type", named]]}
    async with Dispatcher(manifest(declared)) as d:
        with pytest.raises(DispatchError) as caught:
            await d.call("scripted", "aborts_with", asked)
    assert caught.value.type == read_as, caught.value


async def test_a_server_at_its_limit_of_calls_at_once_is_overloaded_not_rate_limited() -> None:
    """grpcio's ``maximum_concurrent_rpcs``: RESOURCE_EXHAUSTED ``Concurrent RPC limit
    exceeded!`` for a call past it, which no handler ran (a fleet may send it to another
    instance). Before: RateLimited, as if this caller had called too often."""
    servicer = ScriptedPlugin()
    server = grpc.aio.server(maximum_concurrent_rpcs=1)
    plugin_pb2_grpc.add_PluginServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        target = {"provider": "grpc", "address": f"127.0.0.1:{port}"}
        async with Dispatcher(manifest(plugin(target))) as d:
            async with asyncio.timeout(4):  # once the host's Events stream (refused) ended
                while True:
                    with contextlib.suppress(DispatchError):
                        assert await d.call("scripted", "echo", {}) == {}
                        break
                    await asyncio.sleep(0.01)
            calls = len(servicer.calls)
            slow = asyncio.ensure_future(d.call("scripted", "slow", {}))
            async with asyncio.timeout(4):
                while len(servicer.calls) == calls:  # noqa: ASYNC110 (until it runs)
                    await asyncio.sleep(0.01)
            with pytest.raises(Overloaded) as refused:
                await d.call("scripted", "echo", {})
            slow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await slow
    finally:
        await server.stop(grace=None)
    assert refused.value.retryable
    assert "at its limit of concurrent calls" in refused.value.message
    assert "Concurrent RPC limit exceeded" in refused.value.message
    assert never_sent(refused.value)  # grpcio refuses it before any handler: unrun


async def test_a_call_a_stopping_plugin_did_not_run_is_never_sent_and_the_next_wait(
    scripted: tuple[ScriptedPlugin, str, HealthServicer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNAVAILABLE with the not-run trailer: a fleet may send the call elsewhere, whatever
    the method, and nothing more goes to the plugin until its connection closes (here it
    never does: the hold ends after ``STOPPING_HOLD_SECONDS``)."""
    monkeypatch.setattr(grpc_connection, "STOPPING_HOLD_SECONDS", 0.5)
    servicer, address, _ = scripted
    async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
        with pytest.raises(TargetUnavailable) as refused:
            await d.call("scripted", "not_run", {})
        assert never_sent(refused.value)
        reached = len(servicer.calls)
        for _ in range(5):
            with pytest.raises(TargetUnavailable) as held:
                await d.call("scripted", "echo", {"n": 1})
            assert never_sent(held.value)
            assert "stopping" in held.value.message
        assert len(servicer.calls) == reached  # none of them was sent
        await asyncio.sleep(0.7)
        assert await d.call("scripted", "echo", {"n": 2}) == {"n": 2}


async def test_a_stopping_plugins_connection_is_used_again_once_it_has_closed() -> None:
    servicer = ScriptedPlugin()
    server, address, _ = await serve(servicer)
    try:
        async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
            with pytest.raises(TargetUnavailable):
                await d.call("scripted", "not_run", {})
            await server.stop(grace=None)  # the plugin stops, and one starts in its place
            successor = ScriptedPlugin()
            server, _, _ = await serve(successor, address=address)
            async with asyncio.timeout(4):  # well inside the 5 s hold: the close ended it
                while True:
                    try:
                        assert await d.call("scripted", "echo", {"n": 3}) == {"n": 3}
                        break
                    except TargetUnavailable as error:
                        assert never_sent(error)
                        await asyncio.sleep(0.05)
            assert len(successor.calls) == 1
    finally:
        await server.stop(grace=None)


async def test_the_not_run_trailer_on_another_status_is_not_taken_for_never_run(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    _, address, _ = scripted
    async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
        with pytest.raises(TargetUnavailable) as caught:
            await d.call("scripted", "not_run_internal", {})
        assert not never_sent(caught.value)  # it may have run: only an idempotent resend
        assert await d.call("scripted", "echo", {"n": 4}) == {"n": 4}  # no hold either


async def test_reply_errors_travel_as_the_envelope_says(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    _, address, _ = scripted
    async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
        with pytest.raises(PluginError) as business:
            await d.call("scripted", "business", {})
        with pytest.raises(RateLimited) as limited:
            await d.call("scripted", "limited", {})
    assert business.value.remote_type == "OutOfStock"
    assert business.value.retryable is True
    assert business.value.details == {"sku": 3}
    assert limited.value.retry_after == 1.5


async def test_metadata_and_deadline_reach_the_server(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    servicer, address, _ = scripted
    target = {"provider": "grpc", "address": address, "metadata": {"x-tenant": "acme"}}
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with Dispatcher(manifest(plugin(target))) as d:
        await d.call(
            "scripted",
            "echo",
            {"a": 1},
            caller="alice",
            traceparent=traceparent,
            request_id="req-42",
            timeout=3.0,
        )
    (seen,) = servicer.calls
    assert seen["metadata"]["x-request-id"] == "req-42"
    assert seen["metadata"]["x-caller"] == "alice"
    assert seen["metadata"]["traceparent"] == traceparent
    assert seen["metadata"]["x-tenant"] == "acme"
    assert (seen["request_id"], seen["caller"]) == ("req-42", "alice")
    assert 2.0 < seen["time_remaining"] <= 3.1  # the gRPC deadline is the call's (grpc rounds up)
    assert 2000 < seen["deadline_ms"] <= 3000


async def test_a_slow_target_is_deadline_exceeded_when_the_deadline_passes(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    _, address, _ = scripted
    async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            await d.call("scripted", "slow", {}, timeout=0.2)
    assert time.perf_counter() - started < 1.0


async def test_one_channel_per_target_is_reused(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    _, address, _ = scripted
    provider = GrpcProvider()
    async with Dispatcher(
        manifest(plugin({"provider": "grpc", "address": address})), providers={"grpc": provider}
    ) as d:
        await asyncio.gather(*(d.call("scripted", "echo", {"i": i}) for i in range(20)))
        assert len(provider._connections) == 1
        assert "connections=1" in repr(provider)
    assert provider._connections == {}


async def test_batch_is_one_call_batch(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    from dispatcher import Invocation
    from providers.invocation import new_request_id

    servicer, address, _ = scripted
    async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
        target = d.manifest.plugins[0].target
        deadline = time.monotonic() + 5
        outcomes = await d.providers["grpc"].invoke_batch(
            target,
            [
                Invocation("scripted", "1.0.0", "echo", [i], deadline, new_request_id())
                for i in range(5)
            ],
        )
    assert [outcome.unwrap() for outcome in outcomes] == [[i] for i in range(5)]
    assert servicer.batches == 1


async def test_stream_yields_chunks_then_raises_the_error_item(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    _, address, _ = scripted
    chunks: list[Any] = []

    async def consume(stream: AsyncIterator[Any]) -> None:
        async for chunk in stream:
            chunks.append(chunk)

    async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
        with pytest.raises(PluginError, match="at 3"):
            await consume(d.stream("scripted", "stream", {}))
    assert chunks == [0, 1, 2]


async def test_a_stream_its_caller_closes_is_no_longer_open_once_the_close_returns(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    """The caller takes one chunk and closes the stream. Before: the provider left the
    connection's stream to the garbage collector, so when the close returned its RPC was
    still open (cancelled only later). Now it is closed with the caller's stream."""
    _, address, _ = scripted
    provider = GrpcProvider()
    async with Dispatcher(
        manifest(plugin({"provider": "grpc", "address": address})), providers={"grpc": provider}
    ) as d:
        (connection,) = provider._connections.values()
        async with contextlib.aclosing(d.stream("scripted", "stream", {})) as chunks:
            assert await anext(chunks) == 0
        assert not connection._open_streams


def _without_streams_or_events() -> dict[str, Any]:
    """A provider with the base's defaults for streams and events: the in-process one
    without its own (it has both)."""
    from providers.base import Provider
    from providers.local import LocalProvider

    class Unary(LocalProvider):
        stream = Provider.stream  # type: ignore[assignment]
        send_event = Provider.send_event  # type: ignore[assignment]

    return {"local": Unary()}


async def test_streaming_on_a_provider_without_streams_is_a_typed_error() -> None:
    from tests.conftest import LOCAL_TARGET, echo_plugin

    unary = _without_streams_or_events()
    async with Dispatcher(manifest(echo_plugin("echo", LOCAL_TARGET)), providers=unary) as d:
        with pytest.raises(ProviderError, match="no streaming"):
            async for _ in d.stream("echo", "say", {"text": "x"}):
                pass


async def test_lifecycle_runs_when_the_dispatcher_owns_it(
    scripted: tuple[ScriptedPlugin, str, HealthServicer], caplog: pytest.LogCaptureFixture
) -> None:
    servicer, address, _ = scripted
    owned = {"provider": "grpc", "address": address, "lifecycle": "dispatcher"}
    async with Dispatcher(manifest(plugin(owned))):
        assert servicer.lifecycle == ["Init {'k': 'v'}", "Start"]
    assert servicer.lifecycle == ["Init {'k': 'v'}", "Start", "Stop", "Destroy"]
    assert "config is not sent" not in caplog.text
    servicer.lifecycle.clear()
    async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))):
        pass
    assert servicer.lifecycle == []  # 'remote': the service runs its own
    # ... and never sees the manifest's config: said once, with the fix.
    assert caplog.text.count("config is not sent") == 1
    assert "lifecycle: dispatcher sends it with Init" in caplog.text


async def test_health_follows_grpc_health_v1(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    _, address, health = scripted
    service = "linchkit.plugin.v1.PluginService"
    async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        assert (await d.health())[0].health.status == "serving"
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        (report,) = await d.health()
    assert report.health.status == "not_serving"
    assert "NOT_SERVING" in report.health.detail


async def test_nothing_listening_is_target_unavailable() -> None:
    from tests.conftest import bound_socket

    with bound_socket() as sock:  # bound, never listening: connections are refused
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
            with pytest.raises(TargetUnavailable):
                await d.call("scripted", "echo", {}, timeout=2)
            (report,) = await d.health()
    assert report.health.status == "not_serving"


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


async def test_mutual_tls_works_with_the_client_certificate_and_is_refused_without(
    tmp_path: Path,
) -> None:
    server_certificate = generate_certificate("server")
    client_certificate = generate_certificate("client")
    credentials = grpc.ssl_server_credentials(
        [(server_certificate.private_key_pem, server_certificate.certificate_pem)],
        root_certificates=client_certificate.certificate_pem,
        require_client_auth=True,
    )
    server, address, _ = await serve(ScriptedPlugin(), credentials)
    ca = write(tmp_path, "server.pem", server_certificate.certificate_pem)
    cert = write(tmp_path, "client.pem", client_certificate.certificate_pem)
    key = write(tmp_path, "client.key", client_certificate.private_key_pem)
    secured = {
        "provider": "grpc",
        "address": address,
        "ca_file": str(ca),
        "cert_file": str(cert),
        "key_file": str(key),
        "server_name": "localhost",
    }
    tls_only = {
        "provider": "grpc",
        "address": address,
        "ca_file": str(ca),
        "server_name": "localhost",
    }
    plain = {"provider": "grpc", "address": address}
    try:
        async with Dispatcher(manifest(plugin(secured))) as d:
            assert await d.call("scripted", "echo", {"over": "mtls"}) == {"over": "mtls"}
        for refused in (tls_only, plain):
            async with Dispatcher(manifest(plugin(refused))) as d:
                with pytest.raises(TargetUnavailable):
                    await d.call("scripted", "echo", {}, timeout=2)
    finally:
        await server.stop(grace=None)


def test_target_validation() -> None:
    assert (
        GrpcTarget(provider="grpc", address="unix:/run/x.sock").describe()
        == "grpc unix:/run/x.sock"
    )
    with pytest.raises(ValueError, match="go together"):
        GrpcTarget(provider="grpc", address="127.0.0.1:1", cert_file=Path("/x.pem"))
    with pytest.raises(ValueError, match="address"):
        GrpcTarget(provider="grpc", address="http://nope")
    with pytest.raises(ValueError, match="metadata key"):
        GrpcTarget(provider="grpc", address="127.0.0.1:1", metadata={"X-Upper": "v"})
    with pytest.raises(ValueError, match="printable ASCII"):
        GrpcTarget(provider="grpc", address="127.0.0.1:1", metadata={"x-name": "ünï"})
    target = GrpcTarget(provider="grpc", address="127.0.0.1:1", ca_file=Path("/nonexistent.pem"))
    assert target.describe() == "grpcs 127.0.0.1:1"
    with pytest.raises(ProviderError, match="cannot read TLS file"):
        target.security()


async def test_metadata_that_is_not_ascii_is_percent_encoded_and_exact_in_the_context(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    servicer, address, _ = scripted
    async with Dispatcher(manifest(plugin({"provider": "grpc", "address": address}))) as d:
        await d.call("scripted", "echo", {}, caller="ålice\n", request_id="ид-1")
    (seen,) = servicer.calls
    assert seen["metadata"]["x-caller"] == "%C3%A5lice%0A"
    assert seen["metadata"]["x-request-id"] == "%D0%B8%D0%B4-1"
    assert (seen["caller"], seen["request_id"]) == ("ålice\n", "ид-1")


async def test_a_call_on_a_closed_connection_is_a_dispatch_error(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    from dispatcher import Invocation

    _, address, _ = scripted
    provider = GrpcProvider()
    async with Dispatcher(
        manifest(plugin({"provider": "grpc", "address": address})), providers={"grpc": provider}
    ):
        (connection,) = provider._connections.values()
    invocation = Invocation("scripted", "1.0.0", "echo", {}, time.monotonic() + 5, "r-1")
    with pytest.raises(TargetUnavailable, match="closed") as caught:
        await connection.call(invocation)
    assert caught.value.retryable is False
    with pytest.raises(TargetUnavailable, match="closed"):
        async for _ in connection.stream(invocation):
            pass
    health = await connection.health()
    assert (health.status, health.detail) == ("not_serving", "health: the connection is closed")


async def test_a_stream_left_open_when_its_connection_closes_fails_when_resumed(
    scripted: tuple[ScriptedPlugin, str, HealthServicer],
) -> None:
    """Its consumer held it at a chunk; closing lets go of the call (see
    tests/test_grpc_teardown.py), and the stream, resumed, says the call was cut off."""
    from dispatcher import Invocation

    _, address, _ = scripted
    connection = grpc_connection.PluginConnection(address)
    invocation = Invocation("scripted", "1.0.0", "stream", {}, time.monotonic() + 5, "r-1")
    chunks = connection.stream(invocation)
    try:
        assert await anext(chunks) == 0
        await connection.close()
        with pytest.raises(TargetUnavailable, match="closed with the call in flight"):
            await anext(chunks)
    finally:
        await chunks.aclose()
        await connection.close()


async def test_publish_names_what_is_wrong() -> None:
    from dispatcher import PluginNotFound
    from tests.conftest import LOCAL_TARGET, echo_plugin

    unary = _without_streams_or_events()
    async with Dispatcher(manifest(echo_plugin("echo", LOCAL_TARGET)), providers=unary) as d:
        with pytest.raises(PluginNotFound):
            await d.publish("nope", "ping")
        with pytest.raises(ProviderError, match="cannot send events"):
            await d.publish("echo", "ping", {"x": 1})


async def test_the_lifecycle_ends_with_destroy_even_when_stop_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from types import SimpleNamespace

    from providers._grpc import lifecycle

    class Connection:
        describe = "grpc fake"

        def __init__(self) -> None:
            self.steps: list[tuple[str, float]] = []

        async def lifecycle(self, step: str, timeout: float, config: Any = None) -> None:
            self.steps.append((step, timeout))
            if step == "Stop":
                raise TargetUnavailable("gone")

    connection = Connection()
    plugin = SimpleNamespace(key="p@1", lifecycle=SimpleNamespace(stop_timeout_ms=1500))
    await lifecycle.end(connection, plugin)  # type: ignore[arg-type]
    assert connection.steps == [("Stop", 1.5), ("Destroy", 1.5)]
    assert "p@1 Stop failed: gone" in caplog.text


#: Each gRPC library's words for a message over the size cap, as measured against every
#: SDK's server and the dispatcher's own channel (tests/conformance checks them live).
SIZE_WORDINGS = [
    ("CLIENT: Sent message larger than max (70000013 vs. 67108864)", "request"),
    ("SERVER: Received message larger than max (67108889 vs. 67108864)", "request"),
    ("grpc: received message larger than max (67108889 vs. 67108864)", "request"),
    ("grpc: received message after decompression larger than max 67108864", "request"),
    ("gRPC message exceeds maximum size 67108864: 67108889", "request"),
    ("Decompressed gRPC message exceeds maximum size 67108864", "request"),
    ("Received message larger than max (67108889 vs 67108864)", "request"),
    ("Received message that decompresses to a size larger than 67108864", "request"),
    ("Error, decoded message length too large: found 67108889 bytes, the limit is: 1", "request"),
    ("Error decompressing: size limit, of 67108864 bytes, exceeded while decompressing", "request"),
    ("Stream removed (CLIENT: Received message larger than max (70000000 vs. 67108864))", "reply"),
    ("Stream removed (received metadata size exceeds soft limit (9126 vs. 8192))", "reply"),
    ("SERVER: Sent message larger than max (70000000 vs. 67108864)", "reply"),
    ("grpc: trying to send message larger than max (70000000 vs. 67108864)", "reply"),
    ("Sent message larger than max (70000000 vs. 67108864)", "reply"),
    ("Error, encoded message length too large: found 70000000 bytes, the limit is: 1", "reply"),
    ("quota exceeded", None),
]


@pytest.mark.parametrize(("details", "side"), SIZE_WORDINGS)
def test_a_message_over_the_size_cap_is_told_by_its_words(details: str, side: str | None) -> None:
    from providers._grpc.status import too_large, translate_rpc_error

    assert too_large(details) == side
    for code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE):
        error = translate_rpc_error(
            grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details),
            "scripted.echo",
        )
        if side is None:
            assert type(error) is (
                RateLimited if code.name == "RESOURCE_EXHAUSTED" else InvalidParams
            )
            assert not error.details
            continue
        assert type(error) is (InvalidParams if side == "request" else ProviderError), error
        assert error.retryable is False
        assert error.details == {"reason": "too_large"}
        assert side in error.message
