"""One channel to one plugin (``PluginConnection``), reused by every call to it, with the
plugin's ``Events`` stream kept open in a task it owns.

The call's deadline is the gRPC deadline; ``x-request-id``, ``x-caller`` and ``traceparent``
travel as call metadata (percent-encoded when not printable ASCII; the exact values also
travel in ``CallContext``). Every failed RPC becomes a dispatcher error through
``providers._grpc.status``; a plugin's own failures come back in ``CallReply.error`` and go
through ``linchkit_plugin.errors.error_from_wire`` like every other transport's.

Compression is gRPC's own: a ``Call`` or ``CallBatch`` whose params are ``compress_min_bytes``
or more goes with ``grpc-encoding: gzip`` (grpc core decodes gzip answers by itself, capped
by ``grpc.max_receive_message_length``, which counts decompressed bytes). A server without
gzip answers UNIMPLEMENTED before the plugin runs: the call is resent plain and the
connection sends plain from then on.

The ``Events`` stream is ``providers._grpc.events``. Once closed, a connection holds nothing
of grpc.aio's, and no exception leaves it with grpc.aio's frames in its traceback: ``close``
lets go of the channel, its stub and the calls of streams left open
(``providers._grpc.release`` says why, and holds what makes it so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import quote

import orjson

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    ProviderError,
    TargetUnavailable,
)
from linchkit_plugin.handshake import HEALTH_SERVICE, HOST_METADATA
from linchkit_plugin.wire import encode_json
from providers._event_rate import DEFAULT_MAX_EVENTS_PER_SECOND
from providers._grpc.channel import ChannelSecurity, open_channel
from providers._grpc.events import EventsStream
from providers._grpc.release import ClosedStub, StreamCall, drop_grpc_frames
from providers._grpc.replies import loads, wire_error
from providers._grpc.restarts import RestartWatch
from providers._grpc.status import (
    grpc_errors,
    lifecycle_failure,
    not_run,
    refused_compression,
    translate_rpc_error,
    transport_broke,
)
from providers.base import CONNECT_STAGE, Health
from providers.invocation import Invocation, Outcome, running_loop_time
from providers.served import MAX_SERVED_METHODS, served_names

__all__ = ["HEALTH_SERVICE", "PluginConnection"]

log = logging.getLogger("dispatcher.providers.grpc")

_json_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError

#: The longest a connection sends nothing after its plugin said it is stopping, if the
#: plugin neither closes the connection nor goes away meanwhile (it should, in well under
#: a second: ``linchkit_plugin.grpc_server``).
STOPPING_HOLD_SECONDS = 5.0

_HEADER_SAFE = "".join(chr(code) for code in range(0x20, 0x7F) if chr(code) != "%")


def _header(value: str) -> str:
    """A metadata value gRPC accepts: printable ASCII as is, anything else percent-encoded
    (UTF-8). The exact value also travels in ``CallContext``."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe=_HEADER_SAFE)


def _cancelled_by_caller() -> bool:
    """Whether a ``CancelledError`` is the calling task's own cancellation.

    grpc.aio raises a bare ``CancelledError`` from a call when *its channel* cancels it: the
    channel was closed with calls in flight (the subprocess provider closes it when the
    child dies). Then no one cancelled the caller's task, and it must get a dispatcher
    error instead; a cancellation of the task itself (``Task.cancelling()``) goes on.
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class PluginConnection:
    """One reusable channel to one plugin, and its Events stream.

    ``address`` is a gRPC target: ``host:port`` or ``unix:/path/to.sock``.
    """

    def __init__(
        self,
        address: str,
        *,
        security: ChannelSecurity | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        describe: str = "",
        compress_min_bytes: int | None = None,
        host_id: str | None = None,
        max_events_per_second: float = DEFAULT_MAX_EVENTS_PER_SECOND,
    ) -> None:
        """``compress_min_bytes``: send requests whose params are this large in gzip;
        None: never compress. ``host_id``: sent as ``linchkit-host`` on lifecycle RPCs, so
        a service attached by several hosts stops only when the last leaves.
        ``max_events_per_second``: the plugin's events beyond it are dropped, counted."""
        import grpc
        import grpc.aio

        from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc

        self.address = address
        self.describe = describe or f"grpc {address}"
        self._pb = plugin_pb2
        self._call_request = plugin_pb2.CallRequest
        # The loop's clock, bound: asyncio.get_running_loop() asks the kernel for the
        # process id on every call on Python 3.11 (0.14 µs). A grpc.aio channel belongs to
        # the loop it was made in, so its connection may keep that loop's clock.
        self._loop_time: Callable[[], float] = running_loop_time
        with contextlib.suppress(RuntimeError):  # made outside a loop: looked up per call
            self._loop_time = asyncio.get_running_loop().time
        security = security or ChannelSecurity()
        self.security = security
        channel = open_channel(address, security)
        #: None once closed (so is the stub's channel: ``ClosedStub``).
        self._channel: Any | None = channel
        self._stub: Any = plugin_pb2_grpc.PluginServiceStub(channel)
        self._metadata_type = grpc.aio.Metadata
        self._gzip = grpc.Compression.Gzip
        self._compress_min_bytes = compress_min_bytes
        self._metadata = tuple(metadata)
        self._lifecycle_metadata = (
            self._metadata if host_id is None else (*self._metadata, (HOST_METADATA, host_id))
        )
        self._events = EventsStream(
            plugin_pb2.HostEvent, self.describe, max_per_second=max_events_per_second
        )
        self._closed = False
        #: The streams open on this connection, so ``close`` lets go of their calls.
        self._open_streams: set[StreamCall] = set()
        #: While the plugin is stopping (it answered a call "not run"): what ends the wait.
        self._stopping: asyncio.Task[None] | None = None
        #: A call ended because the connection under it closed or was reset, since the
        #: last ``broke_under_a_call``: the plugin's process may be going away.
        self._broke = False
        #: The methods the plugin's last ``Describe`` listed (``providers.served``); None
        #: before one, or when it listed none.
        self.served: frozenset[str] | None = None
        #: The id and version the plugin's last ``Describe`` reported; None before one.
        self.identity: tuple[str, str] | None = None
        #: A plugin found again after its connection was lost: ``Init`` and ``Start``
        #: before calls go (``restarts.watch``, under ``lifecycle: dispatcher``).
        self.restarts = RestartWatch(channel, self.describe, self._loop_time)
        #: ``Init`` requests sent (answered or not): whether a failed start reached one.
        self.inits_sent = 0

    # -- calls -------------------------------------------------------------------------

    def _request(self, invocation: Invocation, now: float) -> Any:
        # The context as a dict, and only the fields that are set: upb then fills the
        # nested message in place instead of building a CallContext and copying it
        # (0.8 µs against 1.35 µs per call; docs/architecture.md, gRPC).
        context: dict[str, Any] = {
            "request_id": invocation.request_id,
            "deadline_ms": max(1, int((invocation.deadline - now) * 1000)),
        }
        if invocation.caller is not None:
            context["caller"] = invocation.caller
        if invocation.traceparent is not None:
            context["traceparent"] = invocation.traceparent
        if invocation.idempotency_key is not None:
            context["idempotency_key"] = invocation.idempotency_key
        return self._pb.CallRequest(
            v=1,
            plugin=invocation.plugin,
            method=invocation.method,
            params_json=encode_json(invocation.params),
            context=context,
        )

    def _call_metadata(self, invocation: Invocation) -> Any:
        """The call's metadata as grpc's own ``Metadata``: handed a tuple, grpc.aio checks
        it against ``typing.Sequence`` (an ABC walk) and copies it, ~1.2 µs per call."""
        metadata = self._metadata_type(
            *self._metadata, ("x-request-id", _header(invocation.request_id))
        )
        if invocation.caller is not None:
            metadata.add("x-caller", _header(invocation.caller))
        if invocation.traceparent is not None:
            metadata.add("traceparent", _header(invocation.traceparent))
        return metadata

    def _remaining(self, invocation: Invocation, now: float | None = None) -> float:
        remaining = invocation.remaining(now)
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline passed before calling {self.describe}")
        return remaining

    async def call(self, invocation: Invocation) -> Any:
        # The per-call hot path, written out in one function: what _remaining, _request,
        # _call_metadata and _result do (batches and streams still use them), with the
        # same fields, metadata, deadline and errors. Each helper call cost ~0.1 µs in a
        # tight loop and two to five times that between two gRPC calls, where the caches
        # are cold (docs/architecture.md, "gRPC on the hot path").
        if self._stopping is not None:
            raise self._not_sent_while_stopping()
        if self.restarts.owed is not None:
            await self.restarts.wait(invocation.deadline)
        now = self._loop_time()
        remaining = invocation.deadline - now
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline passed before calling {self.describe}")
        request_id = invocation.request_id
        # The context as a dict, only the fields that are set: upb fills the nested
        # message in place (0.6 µs against 0.95 µs for a CallContext built and copied).
        context: dict[str, Any] = {
            "request_id": request_id,
            "deadline_ms": max(1, int(remaining * 1000)),
        }
        metadata = self._metadata_type(
            *self._metadata,
            (
                "x-request-id",
                request_id
                if request_id.isascii() and request_id.isprintable()
                else _header(request_id),
            ),
        )
        caller = invocation.caller
        if caller is not None:
            context["caller"] = caller
            metadata.add("x-caller", _header(caller))
        traceparent = invocation.traceparent
        if traceparent is not None:
            context["traceparent"] = traceparent
            metadata.add("traceparent", _header(traceparent))
        if invocation.idempotency_key is not None:
            context["idempotency_key"] = invocation.idempotency_key
        # The params' JSON is not kept: upb copies it, and orjson's bytes sit in a 4 KB
        # buffer however short, which would stay alive for the whole call.
        request = self._call_request(
            v=1,
            plugin=invocation.plugin,
            method=invocation.method,
            params_json=encode_json(invocation.params),
            context=context,
        )
        threshold = self._compress_min_bytes
        try:
            if threshold is None or len(request.params_json) < threshold:
                reply = await self._stub.Call(request, timeout=remaining, metadata=metadata)
            else:
                reply = await self._unary(
                    self._stub.Call, request, len(request.params_json), remaining, metadata
                )
        except grpc_errors() as error:
            drop_grpc_frames(error)
            raise self._failed(
                error,
                f"{self.describe} {invocation.plugin}.{invocation.method}",
                invocation.deadline,
            ) from error
        except asyncio.CancelledError as cancelled:
            drop_grpc_frames(cancelled)
            if _cancelled_by_caller():
                raise
            raise self._cut_off(f"{invocation.plugin}.{invocation.method}") from None
        if reply.ok:
            result_json = reply.result_json
            if not result_json:
                return None
            try:
                return _json_loads(result_json)
            except _JSONDecodeError as error:
                raise ProviderError(
                    f"{self.describe} answered bytes that are not JSON: {error}"
                ) from None
        return self._result(reply, invocation)

    async def _unary(
        self,
        method: Any,
        request: Any,
        size: int,
        timeout: float,
        metadata: Any,
    ) -> Any:
        """``method(request)``, in gzip when ``size`` reaches the threshold and the peer takes it."""
        threshold = self._compress_min_bytes
        if threshold is None or size < threshold:
            return await method(request, timeout=timeout, metadata=metadata)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await method(request, timeout=timeout, metadata=metadata, compression=self._gzip)
        except grpc_errors() as error:
            if not refused_compression(error):
                raise
        log.info("%s does not take gzip: sending plain from now on", self.describe)
        self._compress_min_bytes = None
        remaining = timeout - (loop.time() - started)
        if remaining <= 0:
            raise DeadlineExceeded(f"{self.describe} refused gzip and the deadline passed")
        return await method(request, timeout=remaining, metadata=metadata)

    def _failed(self, error: Exception, what: str, deadline: float) -> DispatchError:
        """A failed call's dispatcher error; a plugin's "not run" also holds this
        connection off while the plugin stops (``_hold_while_stopping``)."""
        if not_run(error):
            self._hold_while_stopping()
        elif transport_broke(error):
            self._broke = True
        return translate_rpc_error(error, what, deadline)

    def _hold_while_stopping(self) -> None:
        """The plugin answered a call "not run": it is stopping. Send it nothing more
        until this connection has left READY (the plugin closed it, or is gone), at most
        ``STOPPING_HOLD_SECONDS``: every call sent meanwhile would only be refused too,
        and one still queued in its server when it shuts down could be cancelled unseen."""
        if self._stopping is None and not self._closed:
            self._stopping = asyncio.get_running_loop().create_task(self._until_left())

    async def _until_left(self) -> None:
        import grpc

        ready = grpc.ChannelConnectivity.READY
        channel = self._channel
        try:
            async with asyncio.timeout(STOPPING_HOLD_SECONDS):
                while channel is not None and (state := channel.get_state()) == ready:
                    await channel.wait_for_state_change(state)
        except TimeoutError:
            pass
        finally:
            self._stopping = None

    def _not_sent_while_stopping(self) -> TargetUnavailable:
        return TargetUnavailable(
            f"{self.describe} is stopping (it refused a call as not run): not sent",
            details=CONNECT_STAGE,
        )

    def _cut_off(self, what: str) -> TargetUnavailable:
        """The error of a call the channel cancelled under us: the connection was closed
        (the plugin's process went away, or the dispatcher is closing)."""
        self._broke = True
        return TargetUnavailable(
            f"{self.describe} {what}: the connection closed with the call in flight "
            "(the plugin went away); it may be retried"
        )

    def _result(self, reply: Any, invocation: Invocation) -> Any:
        if reply.ok:
            return loads(reply.result_json, self.describe)
        if not reply.HasField("error"):
            raise ProviderError(f"{self.describe} answered ok=false without an error")
        raise wire_error(reply.error, invocation)

    async def call_batch(self, invocations: Sequence[Invocation]) -> list[Outcome[Any]]:
        if self._stopping is not None:
            raise self._not_sent_while_stopping()
        earliest = min(invocations, key=lambda invocation: invocation.deadline)
        if self.restarts.owed is not None:
            await self.restarts.wait(earliest.deadline)
        now = asyncio.get_running_loop().time()
        remaining = self._remaining(earliest, now)
        request = self._pb.BatchRequest(
            calls=[self._request(invocation, now) for invocation in invocations]
        )
        size = sum(len(call.params_json) for call in request.calls)
        try:
            reply = await self._unary(
                self._stub.CallBatch, request, size, remaining, self._call_metadata(earliest)
            )
        except grpc_errors() as error:
            drop_grpc_frames(error)
            raise self._failed(error, f"{self.describe} batch", earliest.deadline) from error
        except asyncio.CancelledError as cancelled:
            drop_grpc_frames(cancelled)
            if _cancelled_by_caller():
                raise
            raise self._cut_off("batch") from None
        if len(reply.results) != len(invocations):
            raise ProviderError(
                f"{self.describe} answered {len(reply.results)} results for a batch of {len(invocations)}"
            )
        outcomes: list[Outcome[Any]] = []
        for item, invocation in zip(reply.results, invocations, strict=True):
            try:
                outcomes.append(Outcome(result=self._result(item, invocation)))
            except DispatchError as error:
                outcomes.append(Outcome(error=error))
        return outcomes

    async def stream(self, invocation: Invocation) -> AsyncGenerator[Any, None]:
        """The chunks of a streaming method; its error item, or a failed RPC, raises."""
        if self._stopping is not None:
            raise self._not_sent_while_stopping()
        if self.restarts.owed is not None:
            await self.restarts.wait(invocation.deadline)
        now = asyncio.get_running_loop().time()
        remaining = self._remaining(invocation, now)
        request = self._request(invocation, now)
        what = f"{self.describe} {invocation.plugin}.{invocation.method} stream"
        try:  # no local names the call: a stream left suspended holds only ``stream``
            stream = StreamCall(
                self._stub.CallStream(
                    request, timeout=remaining, metadata=self._call_metadata(invocation)
                )
            )
        except grpc_errors() as error:  # a closed channel refuses at once
            drop_grpc_frames(error)
            raise translate_rpc_error(error, what) from error
        self._open_streams.add(stream)
        try:
            while (item := await stream.next_item()) is not None:
                if item.WhichOneof("item") == "error":
                    raise wire_error(item.error, invocation)
                yield loads(item.chunk_json, self.describe)
        except grpc_errors() as error:
            drop_grpc_frames(error)
            raise self._failed(error, what, invocation.deadline) from error
        except asyncio.CancelledError as cancelled:
            drop_grpc_frames(cancelled)
            if _cancelled_by_caller():
                raise
            raise self._cut_off(f"{invocation.plugin}.{invocation.method} stream") from None
        finally:
            self._open_streams.discard(stream)
            await stream.close()

    # -- lifecycle and health ------------------------------------------------------------

    async def describe_plugin(self, timeout: float) -> dict[str, Any]:
        """The plugin's ``Describe``, whole: who it is and each of its methods."""
        info = await self._described(timeout)
        return {
            "id": info.id,
            "version": info.version,
            "protocol_version": info.protocol_version,
            "runtime": info.runtime,
            "methods": {method.name: {"streaming": method.streaming} for method in info.methods},
        }

    async def identify(self, timeout: float) -> int:
        """``Describe`` the plugin: keep the methods it lists (``served``) and return the
        plugin protocol version it reports (0: it does not say)."""
        info = await self._described(timeout)
        return int(info.protocol_version)

    async def _described(self, timeout: float) -> Any:
        """One ``Describe``, its answer as gRPC gave it; what it lists is kept in ``served``."""
        try:
            info = await self._stub.Describe(
                self._pb.DescribeRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc_errors() as error:
            drop_grpc_frames(error)
            raise translate_rpc_error(error, f"{self.describe} Describe") from error
        except asyncio.CancelledError as cancelled:
            drop_grpc_frames(cancelled)
            if _cancelled_by_caller():
                raise
            raise self._cut_off("Describe") from None
        self.identity = (str(info.id), str(info.version))
        methods = info.methods
        # Counted before a name is read: a list past the cap is not believed anyway.
        listed = methods if len(methods) > MAX_SERVED_METHODS else [m.name for m in methods]
        self.served = served_names(listed)
        return info

    async def lifecycle(self, step: str, timeout: float, config: Any = None) -> None:
        """Run one of ``Init`` (with ``config``), ``Start``, ``Stop``, ``Destroy``."""
        if step == "Init":
            self.inits_sent += 1
        pb = self._pb
        request = (
            pb.InitRequest(config_json=encode_json(config or {}))
            if step == "Init"
            else pb.LifecycleRequest()
        )
        try:
            await getattr(self._stub, step)(
                request, timeout=timeout, metadata=self._lifecycle_metadata
            )
        except grpc_errors() as error:
            drop_grpc_frames(error)
            what = f"{self.describe} {step}"
            failed = lifecycle_failure(error, what, step)
            raise (failed or translate_rpc_error(error, what)) from error
        except asyncio.CancelledError as cancelled:
            drop_grpc_frames(cancelled)
            if _cancelled_by_caller():
                raise
            raise self._cut_off(step) from None

    async def health(self, timeout: float = 5.0, service: str = HEALTH_SERVICE) -> Health:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        if self._channel is None:
            return Health("not_serving", "health: the connection is closed")
        stub = health_pb2_grpc.HealthStub(self._channel)
        started = time.perf_counter()
        try:
            answer = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc_errors() as error:
            return Health("not_serving", translate_rpc_error(error, "health").message)
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            return Health("not_serving", self._cut_off("health").message)
        latency_ms = (time.perf_counter() - started) * 1000
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        extra = self._events.counters()
        if answer.status == health_pb2.HealthCheckResponse.SERVING:
            return Health("serving", status_name, latency_ms, extra)
        return Health("not_serving", status_name, latency_ms, extra)

    def broke_under_a_call(self) -> bool:
        """Whether a call ended because this connection closed or was reset under it,
        since the last time this was asked (a plugin that answered an error of its own
        did not: its connection stands). The subprocess supervisor asks, to hold the
        calls after it until it knows whether the process is exiting."""
        broke, self._broke = self._broke, False
        return broke

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the channel connects; ``TargetUnavailable`` when it does not."""
        channel = self._channel
        if channel is None:
            raise TargetUnavailable(f"{self.describe}: the connection is closed", retryable=False)
        try:
            async with asyncio.timeout(timeout):
                await channel.channel_ready()
            return
        except TimeoutError:
            pass
        # Raised here, not in the ``except``: its context would be the cancelled wait,
        # whose traceback holds the channel (``providers._grpc.release``).
        raise TargetUnavailable(
            f"{self.describe} did not accept a connection within {timeout:.1f} s"
        )

    # -- events ----------------------------------------------------------------------------

    def open_events(self, sink: Callable[[str, Any], None]) -> None:
        """Keep the plugin's ``Events`` stream open in a task; its events go to ``sink``."""
        self._events.open(self._events_call, sink)

    async def events_ready(self, timeout: float) -> bool:
        """Wait until the plugin has answered the Events stream's headers (so an ``emit``
        from now on is not lost); False after ``timeout`` (plugins that send headers only
        with their first event)."""
        return await self._events.ready(timeout)

    def send_event(self, name: str, data: Any) -> None:
        """Queue a host event for the plugin (delivered while the Events stream is open)."""
        self._events.send(name, data)

    def _events_call(self, outgoing: AsyncIterator[Any]) -> Any:
        """Open the ``Events`` RPC on this connection's channel (refused once closed)."""
        return self._stub.Events(outgoing, metadata=self._metadata)

    async def close(self) -> None:
        self._closed = True
        await self.restarts.close()
        stopping, self._stopping = self._stopping, None
        if stopping is not None:
            stopping.cancel()
        await self._events.close()
        channel, self._channel = self._channel, None
        self._stub = ClosedStub()
        if channel is not None:
            await channel.close()  # cancels the calls in flight
        for stream in self._open_streams:
            stream.drop()
        self._open_streams.clear()

    def __repr__(self) -> str:
        events = "open" if self._events.running else "none"
        return f"<PluginConnection {self.describe} events={events} closed={self._closed}>"
