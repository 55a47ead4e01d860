"""Serve a plugin class over the gRPC binding, as a service or as a subprocess plugin.

    from linchkit_plugin.grpc_server import main
    main(MyPlugin, runtime="python")          # in the plugin's executable

Run the executable:

* ``example-plugin serve --address 127.0.0.1:0`` — a gRPC service: prints one handshake
  line with ``tcp`` and the bound address (``1|1|tcp|127.0.0.1:40123|grpc|``), serves
  plain gRPC until SIGTERM. With ``LINCHKIT_PLUGIN_TOKEN_FILE`` or ``LINCHKIT_PLUGIN_TOKEN``
  set, every RPC but health's and reflection's needs metadata
  ``authorization: Bearer <token>`` (else ``UNAUTHENTICATED``); without either it serves
  anyone and warns on stderr. With ``LINCHKIT_REGISTER_ETCD`` and ``_PREFIX`` set it
  registers ``{"address": …}`` in that etcd while it serves (``linchkit_plugin.registry``,
  docs/registry.md) and leaves it on SIGTERM, serving ``LINCHKIT_LEAVE_DELAY`` seconds (1)
  more while dispatchers learn it left, before draining.
* started by a host with the handshake environment (``docs/protocol.md``) — a subprocess
  plugin: checks the magic cookie, negotiates the protocol version, listens on a Unix
  socket (or TCP), serves mutual TLS when the host sent its certificate, prints the
  handshake line and exits when its stdin reaches end-of-file (the host is gone). The
  token variables are not read: AutoMTLS admits only the host that launched the plugin.
* any other way — prints a hint and exits 1.

Methods run through ``PluginHost`` exactly as in-process or over HTTP; async generator
methods are the streaming ones (``CallStream``); ``emit`` reaches every open ``Events``
stream and host events reach the plugin's ``on_event``.

Both ways serve gRPC server reflection (``grpc.reflection.v1`` and ``v1alpha``), open like
health: it tells only the schema, which ``proto/plugin.proto`` publishes anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import orjson

from linchkit_plugin.auth import TOKEN_ENV, TOKEN_FILE_ENV, BearerToken, TokenError
from linchkit_plugin.errors import DeadlineExceeded, DispatchError, InvalidParams, ProviderError
from linchkit_plugin.handshake import (
    CLIENT_CERT_ENV,
    CORE_VERSION,
    HEALTH_SERVICE,
    MAGIC_COOKIE_KEY,
    MAGIC_COOKIE_VALUE,
    NETWORK_ENV,
    NOT_RUN_TRAILER,
    PROTOCOL_VERSIONS_ENV,
    SOCKET_DIR_ENV,
    HandshakeLine,
)
from linchkit_plugin.host import PluginHost
from linchkit_plugin.listen import address_mistake, host_and_port
from linchkit_plugin.registry import (
    ADVERTISE_ENV,
    DEFAULT_LEAVE_DELAY,
    DEFAULT_TTL,
    LEAVE_DELAY_ENV,
    REGISTER_ETCD_ENV,
    REGISTER_PREFIX_ENV,
    REGISTER_TTL_ENV,
    Registration,
    advertised_value,
)
from linchkit_plugin.wire import MAX_PARAMS_DEPTH, PROTOCOL_VERSION, nested_deeper_than

__all__ = [
    "HANDSHAKE_CORE_VERSION",
    "MAGIC_COOKIE_KEY",
    "MAGIC_COOKIE_VALUE",
    "PluginServer",
    "main",
]

# The handshake's constants live in ``linchkit_plugin.handshake``; these names stay
# importable from here for plugins written against earlier versions of the SDK.
HANDSHAKE_CORE_VERSION = CORE_VERSION

_HINT = (
    "This is a LinchKit plugin: it is started by the dispatcher, not by hand.\n"
    "To run it as a gRPC service instead: {program} serve --address 127.0.0.1:50051\n"
)


#: What a caller without the right token learns: never what it sent.
_UNAUTHENTICATED = "missing or wrong bearer token"
#: The most calls one CallBatch may carry: the dispatcher's batcher sends at most this many
#: (``batching.max_size``); more is refused whole with INVALID_ARGUMENT (docs/protocol.md).
MAX_BATCH_CALLS = 10_000
#: The largest gRPC message the plugin takes or sends (Call, CallBatch, CallStream items,
#: Events), counted after decompression: 64 MiB, the dispatcher's own limit (its channel's
#: ``grpc.max_receive_message_length`` and ``grpc.max_send_message_length``). A larger one
#: is refused with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: A stopping server waits until no call has reached it for this long before it shuts
#: down (at most ``STOP_QUIET_MOST_SECONDS``): see ``PluginServer._wind_down``.
STOP_QUIET_SECONDS = 0.1
STOP_QUIET_MOST_SECONDS = 2.0
#: Open without the token: health (orchestrators probe it without credentials) and server
#: reflection (it tells only the schema, which proto/plugin.proto publishes anyway).
_OPEN_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
#: grpcio-reflection serves only v1alpha; v1's messages are the same on the wire.
_REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _token_interceptor(token: BearerToken) -> Any:
    """A ``grpc.aio.ServerInterceptor`` refusing every RPC but health's and reflection's
    without ``token``."""
    import grpc
    import grpc.aio

    async def refuse(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    refusals = {
        (False, False): grpc.unary_unary_rpc_method_handler(refuse),
        (False, True): grpc.unary_stream_rpc_method_handler(refuse),
        (True, False): grpc.stream_unary_rpc_method_handler(refuse),
        (True, True): grpc.stream_stream_rpc_method_handler(refuse),
    }

    class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            handler = await continuation(details)
            if handler is None or details.method.startswith(_OPEN_SERVICE_PREFIXES):
                return handler
            values = [
                value for key, value in details.invocation_metadata or () if key == "authorization"
            ]
            presented = values[0] if len(values) == 1 else None
            if isinstance(presented, str):
                presented = presented.encode("utf-8", "replace")
            if token.admits(presented):
                return handler
            return refusals[(handler.request_streaming, handler.response_streaming)]

    return TokenInterceptor()


def _add_reflection(server: Any) -> None:
    """Serve reflection of the plugin service, health and itself on ``server`` (a
    ``grpc.aio`` server): ``grpc.reflection.v1alpha`` from grpcio-reflection, and the same
    servicer as ``grpc.reflection.v1``, whose messages are v1alpha's on the wire."""
    import grpc
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
    from grpc_reflection.v1alpha._async import ReflectionServicer

    from linchkit_plugin._proto import plugin_pb2

    names = (
        plugin_pb2.DESCRIPTOR.services_by_name["PluginService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )

    class Reflection(ReflectionServicer):  # type: ignore[misc]
        """grpcio-reflection's, resolving a method's full name too (``grpcurl describe
        linchkit.plugin.v1.PluginService.Call``) to its service's file, as other SDKs do."""

        def _file_containing_symbol(self, request: Any, name: str) -> Any:
            service, _, method = name.rpartition(".")
            with contextlib.suppress(KeyError):
                if method in self._pool.FindServiceByName(service).methods_by_name:
                    name = service
            return super()._file_containing_symbol(request, name)

    servicer = Reflection(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )


#: The most plugin events one Events stream holds while its host does not read them; the
#: oldest go first past it (docs/protocol.md). Unbounded, a host that stopped reading made
#: the plugin keep every event it emitted: 20,000 of 16 KB grew it by 390 MB.
EVENTS_PER_STREAM = 1024


def _offer(queue: asyncio.Queue[tuple[str, bytes] | None], payload: tuple[str, bytes]) -> None:
    """Queue ``payload`` for one Events stream, dropping its oldest event when it is full."""
    if queue.qsize() >= EVENTS_PER_STREAM:
        queue.get_nowait()
        dropped = _dropped.get(queue, 0)
        if not dropped:
            print(
                "linchkit plugin: the host is not reading its Events stream; "
                f"dropping the oldest events past {EVENTS_PER_STREAM}",
                file=sys.stderr,
            )
        _dropped[queue] = dropped + 1
    queue.put_nowait(payload)


#: Events dropped per stream (its first drop is logged, not each one).
_dropped: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as error:
        raise ProviderError(f"the plugin returned a value that is not JSON: {error}") from None


def _params(raw: bytes) -> Any:
    """The params of a call, or ``InvalidParams`` that item's own answer (in a batch too).

    Not UTF-8, not JSON, a number beyond a double, a lone surrogate (orjson refuses each),
    or nested deeper than ``MAX_PARAMS_DEPTH``: the message says why, never what was sent.
    """
    if not raw:
        return None
    try:
        params = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if "depth" in str(error):  # over orjson's own 1,024 levels
            raise InvalidParams(
                f"params are nested deeper than {MAX_PARAMS_DEPTH} levels"
            ) from None
        raise InvalidParams(f"params are not JSON: {str(error)[:200]}") from None
    # Deeper than the limit needs more brackets than that: count them at C speed first.
    if raw.count(b"[") + raw.count(b"{") > MAX_PARAMS_DEPTH and nested_deeper_than(
        params, MAX_PARAMS_DEPTH
    ):
        raise InvalidParams(f"params are nested deeper than {MAX_PARAMS_DEPTH} levels")
    return params


class PluginServer:
    """A ``grpc.aio`` server hosting one plugin: the servicer of ``PluginService`` + health."""

    def __init__(
        self,
        host: PluginHost,
        *,
        plugin_id: str,
        version: str,
        runtime: str = "python",
        serving_from_start: bool = False,
        token: BearerToken | None = None,
    ) -> None:
        from grpc_health.v1 import health_pb2
        from grpc_health.v1._async import HealthServicer

        from linchkit_plugin._proto import plugin_pb2

        self.host = host
        self.plugin_id = plugin_id
        self.version = version
        self.runtime = runtime
        self._pb = plugin_pb2
        self._health_pb = health_pb2
        self.health = HealthServicer()
        self._serving_from_start = serving_from_start
        self._token = token
        self._subscribers: set[asyncio.Queue[tuple[str, bytes] | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._config: Any = {}
        #: Calls that have reached the service (``_wind_down`` watches it), and whether
        #: the server is stopping: from then on a call is answered not run.
        self._arrivals = 0
        self._stopping = False
        host_plugin = host.plugin
        if hasattr(host_plugin, "emit"):
            host_plugin._emit = self.emit

    # -- events from the plugin -------------------------------------------------------------

    def emit(self, event: str, data: Any = None) -> None:
        """Send a plugin event to every open Events stream; callable from any thread."""
        loop = self._loop
        if loop is None:
            return
        payload = (event, _dumps(data))
        for queue in list(self._subscribers):
            loop.call_soon_threadsafe(_offer, queue, payload)

    # -- the service ------------------------------------------------------------------------

    async def Describe(self, request: Any, context: Any) -> Any:
        pb = self._pb
        return pb.PluginInfo(
            id=self.plugin_id,
            version=self.version,
            protocol_version=PROTOCOL_VERSION,
            runtime=self.runtime,
            methods=[
                pb.MethodInfo(
                    name=name,
                    streaming=name in self.host.streaming,
                    description=(function.__doc__ or "").strip().split("\n")[0],
                )
                for name, function in sorted(self.host.methods.items())
            ],
        )

    async def Init(self, request: Any, context: Any) -> Any:
        import grpc

        try:
            config = orjson.loads(request.config_json) if request.config_json else {}
        except orjson.JSONDecodeError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"config is not JSON: {error}")
        if not isinstance(config, dict):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "config must be a JSON object")
        self._config = config
        await self._lifecycle(context, "init", config)
        return self._pb.LifecycleReply()

    async def Start(self, request: Any, context: Any) -> Any:
        await self._lifecycle(context, "start")
        await self._set_serving(True)
        return self._pb.LifecycleReply()

    async def Stop(self, request: Any, context: Any) -> Any:
        await self._set_serving(False)
        await self._lifecycle(context, "stop")
        return self._pb.LifecycleReply()

    async def Destroy(self, request: Any, context: Any) -> Any:
        await self._lifecycle(context, "destroy")
        return self._pb.LifecycleReply()

    async def Call(self, request: Any, context: Any) -> Any:
        self._arrivals += 1
        if self._stopping:
            await self._not_run(context)
        return await self._answer(request, context)

    async def CallBatch(self, request: Any, context: Any) -> Any:
        self._arrivals += 1
        if self._stopping:
            await self._not_run(context)
        if len(request.calls) > MAX_BATCH_CALLS:
            import grpc

            # All items run at once: 100,000 of them would hold the loop and the memory of
            # every call in flight. Refused whole, before any runs (docs/protocol.md).
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a batch of {len(request.calls)} calls is over the limit of {MAX_BATCH_CALLS}",
            )
        replies = await asyncio.gather(*(self._answer(call, context) for call in request.calls))
        return self._pb.BatchReply(results=replies)

    async def CallStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._arrivals += 1
        if self._stopping:
            await self._not_run(context)
        pb = self._pb
        try:
            params, call_context, timeout = await self._parse(request, context)
            async with asyncio.timeout(timeout):
                async for chunk in self.host.stream(request.method, params, call_context):
                    yield pb.StreamItem(chunk_json=_dumps(chunk))
        except TimeoutError:
            error = DeadlineExceeded(f"{request.method!r} did not finish before its deadline")
            yield pb.StreamItem(error=self._error(error))
        except DispatchError as error:
            yield pb.StreamItem(error=self._error(error))

    async def Events(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._subscribers.add(queue)
        # Headers now: the host knows the stream is registered, so no emit is lost.
        await context.send_initial_metadata(())
        reader = asyncio.get_running_loop().create_task(self._host_events(request_iterator))
        try:
            while (item := await queue.get()) is not None:
                yield self._pb.PluginEvent(name=item[0], data_json=item[1])
        finally:
            self._subscribers.discard(queue)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    # -- internals --------------------------------------------------------------------------

    async def _host_events(self, request_iterator: Any) -> None:
        async for event in request_iterator:
            try:
                data = orjson.loads(event.data_json) if event.data_json else None
                await self.host.deliver(event.name, data)
            except Exception as error:  # one bad event must not end the stream
                print(f"host event {event.name!r} failed: {error!r}", file=sys.stderr)

    async def _parse(self, request: Any, context: Any) -> tuple[Any, dict[str, Any], float | None]:
        # proto3 cannot tell v = 0 from a v left unset: that is version 1, as in every SDK.
        if request.v not in (0, PROTOCOL_VERSION):
            raise ProviderError(
                f"unsupported envelope version {request.v}; this plugin speaks v{PROTOCOL_VERSION}"
            )
        params = _params(request.params_json)
        wire = request.context
        call_context: dict[str, Any] = {"request_id": wire.request_id}
        # Only a positive deadline_ms bounds the call: 0 is "none" (proto3's default), and a
        # negative one is a host's mistake, not a call already late (docs/protocol.md).
        deadline_ms = wire.deadline_ms if wire.deadline_ms > 0 else 0
        if deadline_ms:
            call_context["deadline_ms"] = deadline_ms
        for key in ("caller", "traceparent", "idempotency_key"):
            if getattr(wire, key):
                call_context[key] = getattr(wire, key)
        timeouts = [deadline_ms / 1000] if deadline_ms else []
        remaining = context.time_remaining()
        if remaining is not None:
            timeouts.append(remaining)
        return params, call_context, min(timeouts) if timeouts else None

    async def _answer(self, request: Any, context: Any) -> Any:
        pb = self._pb
        try:
            params, call_context, timeout = await self._parse(request, context)
            result = await self.host.call_with_deadline(
                request.method, params, call_context, timeout
            )
            return pb.CallReply(ok=True, result_json=_dumps(result))
        except DispatchError as error:
            return pb.CallReply(ok=False, error=self._error(error))

    def _error(self, error: DispatchError) -> Any:
        wire = error.to_wire()
        return self._pb.Error(
            type=wire["type"],
            message=wire["message"],
            retryable=wire["retryable"],
            details_json=orjson.dumps(wire["details"]) if "details" in wire else b"",
            retry_after=wire.get("retry_after") or 0.0,
        )

    async def _not_run(self, context: Any) -> None:
        """Refuse a call without running it, saying so (``NOT_RUN_TRAILER``)."""
        import grpc

        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "the plugin is stopping: the call was not run",
            trailing_metadata=((NOT_RUN_TRAILER, "stopping"),),
        )

    async def _wind_down(self) -> None:
        """Refuse new calls as not run until none has arrived for ``STOP_QUIET_SECONDS``.

        grpc core's server, which grpcio's is, cancels every call it has received but not
        yet handed to the service the moment shutdown begins, with ``CANCELLED``
        (grpc/grpc#41785), which a host cannot tell from a call cut off mid-run: about 30
        per stop with 32 calls in flight. Nothing in grpcio reaches that queue, so the
        server empties it first: each call it hands on is refused as not run, the host
        sends no more on this connection, and once calls have stopped arriving the queue
        is empty and shutting down cancels nothing (calls already running finish).
        """
        self._stopping = True
        await self._set_serving(False)
        loop = asyncio.get_running_loop()
        until = loop.time() + STOP_QUIET_MOST_SECONDS
        seen = -1
        while self._arrivals != seen and loop.time() < until:
            seen = self._arrivals
            await asyncio.sleep(STOP_QUIET_SECONDS)

    async def _lifecycle(self, context: Any, step: str, *args: Any) -> None:
        import grpc

        try:
            await getattr(self.host, step)(*args)
        except Exception as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{step} failed: {error!r}")

    async def _set_serving(self, serving: bool) -> None:
        status = self._health_pb.HealthCheckResponse
        await self.health.set(HEALTH_SERVICE, status.SERVING if serving else status.NOT_SERVING)

    async def serve(
        self,
        address: str,
        *,
        credentials: Any = None,
        on_ready: Any = None,
        stop: asyncio.Event,
        on_stopping: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Listen on ``address``, call ``on_ready(bound_port)``, serve until ``stop`` is set;
        then await ``on_stopping`` (leave a registry) before draining the calls in flight."""
        import grpc.aio
        from grpc_health.v1 import health_pb2_grpc

        from linchkit_plugin._proto import plugin_pb2_grpc

        self._loop = asyncio.get_running_loop()
        server = grpc.aio.server(
            interceptors=[] if self._token is None else [_token_interceptor(self._token)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        plugin_pb2_grpc.add_PluginServiceServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        _add_reflection(server)
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio's "Failed to bind"; older releases return 0
            port = 0
        if port == 0 and not address.startswith("unix:"):
            raise OSError(f"cannot listen on {address}: taken, or not an address of this machine")
        status = self._health_pb.HealthCheckResponse
        await self.health.set("", status.SERVING)
        await self._set_serving(self._serving_from_start)
        await server.start()
        try:
            if on_ready is not None:
                on_ready(port)
            await stop.wait()
            if on_stopping is not None:
                await on_stopping()
        finally:
            await self._wind_down()
            await self.health.enter_graceful_shutdown()
            for queue in list(self._subscribers):  # Events streams never end by themselves
                queue.put_nowait(None)
            await server.stop(grace=2)
            with contextlib.suppress(Exception):
                await self.host.close()


# -- the executable's entry point ----------------------------------------------------------


def _set_parent_death_signal() -> None:
    """Linux: get SIGTERM when the parent dies (the host also watches stdin; belt and braces)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when stdin reaches end-of-file: the host has gone, however it died."""

    def read_until_eof() -> None:
        # os.read on the descriptor, not sys.stdin.buffer: a daemon thread blocked inside
        # the buffered reader holds its lock, and the interpreter aborts (SIGABRT) when it
        # cannot take that lock at shutdown.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_until_eof, name="stdin-eof", daemon=True).start()


class _Registering(NamedTuple):
    """How this service registers once its port is known, and how long it serves on
    after leaving (``registry.DEFAULT_LEAVE_DELAY``)."""

    registration: Callable[[int], Registration]
    leave_delay: float


def _registration_from_environment(host: str) -> _Registering | None:
    """With ``LINCHKIT_REGISTER_ETCD`` set, how to register this service once its port is
    known (``docs/registry.md``); every setting is checked now, before serving."""
    etcd = os.environ.get(REGISTER_ETCD_ENV)
    if not etcd:
        return None
    prefix = os.environ.get(REGISTER_PREFIX_ENV)
    if not prefix:
        raise ValueError(f"{REGISTER_ETCD_ENV} needs {REGISTER_PREFIX_ENV}")
    advertise = os.environ.get(ADVERTISE_ENV)
    try:
        ttl = int(os.environ.get(REGISTER_TTL_ENV) or DEFAULT_TTL)
    except ValueError:
        raise ValueError(f"{REGISTER_TTL_ENV} must be a whole number of seconds") from None
    leave_delay = os.environ.get(LEAVE_DELAY_ENV) or str(DEFAULT_LEAVE_DELAY)
    try:
        seconds = float(leave_delay)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds <= 600:  # NaN fails too
        raise ValueError(
            f"{LEAVE_DELAY_ENV} is a number of seconds in [0, 600], not {leave_delay!r}"
        )

    def registration(port: int) -> Registration:
        value = advertised_value(advertise, host=host, port=port, kind="address")
        return Registration(etcd, prefix, value, ttl=ttl)

    registration(1)  # checks the URL, prefix, TTL and address; starts nothing
    return _Registering(registration, seconds)


def _handshake(network: str, address: str, certificate: str) -> None:
    line = HandshakeLine.of(PROTOCOL_VERSION, network, address, certificate)
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


async def _run(server: PluginServer, arguments: argparse.Namespace | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    if arguments is not None:  # service mode
        address = arguments.address
        host_part = address.rsplit(":", 1)[0]
        try:
            registering = _registration_from_environment(host_part)
        except ValueError as error:
            sys.stderr.write(f"serve: {error}\n")
            return 1
        registrations: list[Registration] = []

        def ready(port: int) -> None:
            if server._token is None:
                sys.stderr.write(
                    f"linchkit plugin: warning: no bearer token configured ({TOKEN_FILE_ENV} or"
                    f" {TOKEN_ENV}): anybody who can reach {host_part}:{port} can call this"
                    " plugin\n"
                )
                sys.stderr.flush()
            _handshake("tcp", f"{host_part}:{port}", "")
            if registering is not None:
                registrations.append(registering.registration(port))
                registrations[-1].start()

        async def deregister() -> None:
            for each in registrations:  # before draining: no dispatcher sends another call
                await asyncio.to_thread(each.stop)
            if registering is not None and registrations:  # ... once each has seen it leave
                await asyncio.sleep(registering.leave_delay)

        try:
            await server.serve(address, on_ready=ready, stop=stop, on_stopping=deregister)
        except OSError as error:
            sys.stderr.write(f"serve: {error}\n")
            return 1
        return 0

    # Subprocess mode: the handshake environment.
    offered = os.environ.get(PROTOCOL_VERSIONS_ENV, "")
    if str(PROTOCOL_VERSION) not in {part.strip() for part in offered.split(",")}:
        sys.stderr.write(
            f"plugin speaks protocol {PROTOCOL_VERSION}; the host offered {offered!r}\n"
        )
        return 1
    _set_parent_death_signal()
    _watch_stdin(loop, stop)
    network = os.environ.get(NETWORK_ENV, "unix") or "unix"
    credentials = None
    certificate_text = ""
    client_pem = os.environ.get(CLIENT_CERT_ENV, "")
    if client_pem:
        import grpc

        from linchkit_plugin._automtls import generate_certificate

        certificate = generate_certificate("plugin")
        credentials = grpc.ssl_server_credentials(
            [(certificate.private_key_pem, certificate.certificate_pem)],
            root_certificates=client_pem.encode(),
            require_client_auth=True,
        )
        certificate_text = certificate.handshake_text
    if network == "unix":
        folder = os.environ.get(SOCKET_DIR_ENV) or "/tmp"
        path = os.path.join(folder, f"plugin-{os.getpid()}.sock")
        await server.serve(
            f"unix:{path}",
            credentials=credentials,
            on_ready=lambda _port: _handshake("unix", path, certificate_text),
            stop=stop,
        )
        with contextlib.suppress(OSError):
            os.unlink(path)
    elif network == "tcp":
        await server.serve(
            "127.0.0.1:0",
            credentials=credentials,
            on_ready=lambda port: _handshake("tcp", f"127.0.0.1:{port}", certificate_text),
            stop=stop,
        )
    else:
        sys.stderr.write(f"unsupported {NETWORK_ENV} {network!r}; use unix or tcp\n")
        return 1
    return 0


_SERVE_ENVIRONMENT = f"""\
environment (docs/registry.md, docs/security.md):
  {TOKEN_FILE_ENV}, {TOKEN_ENV}
      the bearer token every call must carry (without it anyone may call)
  {REGISTER_ETCD_ENV}, {REGISTER_PREFIX_ENV}
      register {{"address": "host:port"}} in this etcd, under this prefix, while serving
  {ADVERTISE_ENV}
      the host:port dispatchers reach (required when listening on 0.0.0.0 or ::)
  {REGISTER_TTL_ENV}
      the lease's seconds, at least 2 (default {DEFAULT_TTL})
  {LEAVE_DELAY_ENV}
      seconds served on after leaving the registry on SIGTERM, 0-600 (default {DEFAULT_LEAVE_DELAY:g})
"""


def main(
    plugin_class: type[Any],
    *,
    plugin_id: str,
    version: str,
    runtime: str = "python",
    argv: Sequence[str] | None = None,
) -> int:
    """The plugin executable: service mode, subprocess mode, or a hint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments: argparse.Namespace | None = None
    if argv and argv[0] == "serve":
        parser = argparse.ArgumentParser(
            prog=f"{os.path.basename(sys.argv[0])} serve",
            description="Serve the plugin as a gRPC service until SIGTERM or Ctrl+C.",
            epilog=_SERVE_ENVIRONMENT,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "--address", default="127.0.0.1:0", help="host:port to listen on (%(default)s)"
        )
        arguments = parser.parse_args(argv[1:])
        if host_and_port(arguments.address) is None:
            sys.stderr.write(address_mistake(arguments.address) + "\n")
            return 1
    elif os.environ.get(MAGIC_COOKIE_KEY) != MAGIC_COOKIE_VALUE:
        sys.stderr.write(_HINT.format(program=os.path.basename(sys.argv[0])))
        return 1
    token: BearerToken | None = None
    if arguments is not None:  # subprocess mode: AutoMTLS authenticates the host
        try:
            token = BearerToken.configured(os.environ.get(TOKEN_FILE_ENV) or None)
        except TokenError as error:
            sys.stderr.write(f"serve: {error}\n")
            return 1
    host = PluginHost(plugin_class())
    server = PluginServer(
        host,
        plugin_id=plugin_id,
        version=version,
        runtime=runtime,
        serving_from_start=arguments is not None,
        token=token,
    )
    return asyncio.run(_run(server, arguments))
