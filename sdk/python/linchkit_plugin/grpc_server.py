"""Serve a plugin class over the gRPC binding, as a service or as a subprocess plugin.

    from linchkit_plugin.grpc_server import main
    main(MyPlugin, runtime="python")          # in the plugin's executable

Run the executable:

* ``example-plugin serve --address 127.0.0.1:0`` — a gRPC service: prints one handshake
  line with ``tcp`` and the bound address (``1|1|tcp|127.0.0.1:40123|grpc|``), serves
  plain gRPC until SIGTERM. With ``LINCHKIT_PLUGIN_TOKEN_FILE`` or ``LINCHKIT_PLUGIN_TOKEN``
  set, every RPC but health's and reflection's needs metadata
  ``authorization: Bearer <token>`` (else ``UNAUTHENTICATED``); without either it serves
  anyone and warns on stderr. With ``--register-etcd`` and ``--register-prefix`` (or
  ``LINCHKIT_REGISTER_ETCD`` and ``_PREFIX``) it registers ``{"address": …}`` in that etcd
  while it serves (``linchkit_plugin.registry``, docs/registry.md; TLS and etcd's users by
  ``--register-etcd-ca-file``, ``-cert-file``, ``-key-file``, ``-user`` and
  ``LINCHKIT_REGISTER_ETCD_PASSWORD``: the flags of ``dispatcher-plugin serve``, from
  ``_registry_options``) and leaves it on SIGTERM, serving ``--leave-delay`` seconds (1)
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

Where its parts live: the command line (``_grpc_cli``), the two modes around the server
(``_grpc_executable``), the bearer token (``_grpc_auth``), reflection
(``_grpc_reflection``), a call's envelope (``_grpc_envelope``), the Events streams
(``_grpc_events``) and the stop that loses no call (``_grpc_drain``). This module holds the
servicer, ``PluginServer``, and puts the parts together.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import orjson

from linchkit_plugin._grpc_auth import token_interceptor
from linchkit_plugin._grpc_cli import read_command_line
from linchkit_plugin._grpc_drain import StopGate, refuse_as_not_run
from linchkit_plugin._grpc_envelope import parse_call
from linchkit_plugin._grpc_events import EventStreams, deliver_host_events
from linchkit_plugin._grpc_executable import run
from linchkit_plugin._grpc_hosts import MAX_HOSTS, AttachedHosts, host_of
from linchkit_plugin._grpc_reflection import add_reflection
from linchkit_plugin._log_setup import log_to_stderr
from linchkit_plugin.auth import BearerToken
from linchkit_plugin.errors import DeadlineExceeded, DispatchError, ProviderError
from linchkit_plugin.handshake import (
    CORE_VERSION,
    HEALTH_SERVICE,
    MAGIC_COOKIE_KEY,
    MAGIC_COOKIE_VALUE,
)
from linchkit_plugin.host import PluginHost
from linchkit_plugin.stopping import StopCaps
from linchkit_plugin.tracing import exporting
from linchkit_plugin.wire import PROTOCOL_VERSION, error_response, result_fragment

# isort: split
# Importable from here as before: names this module defined or used before its parts
# moved to the modules above.
from linchkit_plugin._grpc_events import EVENTS_PER_STREAM as EVENTS_PER_STREAM
from linchkit_plugin.auth import TOKEN_ENV as TOKEN_ENV
from linchkit_plugin.auth import TOKEN_FILE_ENV as TOKEN_FILE_ENV
from linchkit_plugin.auth import TokenError as TokenError
from linchkit_plugin.errors import InvalidParams as InvalidParams
from linchkit_plugin.handshake import CLIENT_CERT_ENV as CLIENT_CERT_ENV
from linchkit_plugin.handshake import NETWORK_ENV as NETWORK_ENV
from linchkit_plugin.handshake import NOT_RUN_TRAILER as NOT_RUN_TRAILER
from linchkit_plugin.handshake import PROTOCOL_VERSIONS_ENV as PROTOCOL_VERSIONS_ENV
from linchkit_plugin.handshake import SOCKET_DIR_ENV as SOCKET_DIR_ENV
from linchkit_plugin.handshake import HandshakeLine as HandshakeLine
from linchkit_plugin.listen import address_mistake as address_mistake
from linchkit_plugin.listen import host_and_port as host_and_port
from linchkit_plugin.registry import ADVERTISE_ENV as ADVERTISE_ENV
from linchkit_plugin.registry import DEFAULT_LEAVE_DELAY as DEFAULT_LEAVE_DELAY
from linchkit_plugin.registry import DEFAULT_TTL as DEFAULT_TTL
from linchkit_plugin.registry import LEAVE_DELAY_ENV as LEAVE_DELAY_ENV
from linchkit_plugin.registry import REGISTER_ETCD_ENV as REGISTER_ETCD_ENV
from linchkit_plugin.registry import REGISTER_PREFIX_ENV as REGISTER_PREFIX_ENV
from linchkit_plugin.registry import REGISTER_TTL_ENV as REGISTER_TTL_ENV
from linchkit_plugin.registry import Registration as Registration
from linchkit_plugin.registry import advertised_value as advertised_value
from linchkit_plugin.wire import MAX_PARAMS_DEPTH as MAX_PARAMS_DEPTH
from linchkit_plugin.wire import nested_deeper_than as nested_deeper_than

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

#: The most calls one CallBatch may carry: the dispatcher's batcher sends at most this many
#: (``batching.max_size``); more is refused whole with INVALID_ARGUMENT (docs/protocol.md).
MAX_BATCH_CALLS = 10_000
#: How ``main`` formats the plugin's log lines on stderr when the plugin set up none: the
#: level first, which the subprocess provider reads to log the line at the same level.
#: The largest gRPC message the plugin takes or sends (Call, CallBatch, CallStream items,
#: Events), counted after decompression: 64 MiB, the dispatcher's own limit (its channel's
#: ``grpc.max_receive_message_length`` and ``grpc.max_send_message_length``). A larger one
#: is refused with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: A stopping server waits until no call has reached it for this long before it shuts
#: down (at most ``STOP_QUIET_MOST_SECONDS``, or the stop's grace when shorter: the wait is
#: part of it): see ``linchkit_plugin._grpc_drain``.
STOP_QUIET_SECONDS = 0.1
STOP_QUIET_MOST_SECONDS = 2.0


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
        stop_caps: StopCaps | None = None,
    ) -> None:
        """``stop_caps``: how long a stop gives the calls in flight, then the hooks
        (default 5 s each; the executable reads ``LINCHKIT_PLUGIN_STOP_GRACE_MS`` and
        ``_STOP_HOOKS_MS``: ``linchkit_plugin.stopping``)."""
        from grpc_health.v1 import health_pb2
        from grpc_health.v1._async import HealthServicer

        from linchkit_plugin._proto import plugin_pb2

        self.host = host
        self.plugin_id = plugin_id
        if plugin_id:  # the id the calls' spans name: the one Describe says
            host.plugin_id = plugin_id
        self.version = version
        self.runtime = runtime
        self._pb = plugin_pb2
        self._health_pb = health_pb2
        self.health = HealthServicer()
        self._serving_from_start = serving_from_start
        self._token = token
        self.stop_caps = stop_caps or StopCaps()
        self._events = EventStreams()
        self._config: Any = {}
        #: Counts the calls that reach the service; once stopping, they are answered not run.
        self._gate = StopGate()
        #: The hosts attached now: the last to leave runs the stop and destroy hooks.
        self._hosts = AttachedHosts()
        host_plugin = host.plugin
        if hasattr(host_plugin, "emit"):
            host_plugin._emit = self.emit

    # -- events from the plugin -------------------------------------------------------------

    def emit(self, event: str, data: Any = None) -> None:
        """Send a plugin event to every open Events stream; callable from any thread."""
        self._events.emit(event, data)

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

        host = await self._host(context)
        if not self._hosts.join(host):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_HOSTS} hosts are attached to this service; one more is refused",
            )
        succeeded = False
        try:
            succeeded = await self._init(request, context)
        finally:
            self._hosts.joined(host, succeeded)
        return self._pb.LifecycleReply()

    async def _init(self, request: Any, context: Any) -> bool:
        import grpc

        try:
            config = orjson.loads(request.config_json) if request.config_json else {}
        except orjson.JSONDecodeError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"config is not JSON: {error}")
        if not isinstance(config, dict):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "config must be a JSON object")
        self._config = config
        await self._lifecycle(context, "init", config)
        return True

    async def Start(self, request: Any, context: Any) -> Any:
        await self._host(context)
        await self._lifecycle(context, "start")
        await self._set_serving(True)
        return self._pb.LifecycleReply()

    async def Stop(self, request: Any, context: Any) -> Any:
        if self._hosts.others_stay(await self._host(context)):
            return self._pb.LifecycleReply()  # the plugin goes on serving them
        await self._set_serving(False)
        await self._lifecycle(context, "stop")
        return self._pb.LifecycleReply()

    async def Destroy(self, request: Any, context: Any) -> Any:
        if self._hosts.others_stay(await self._host(context)):
            return self._pb.LifecycleReply()
        await self._lifecycle(context, "destroy")
        return self._pb.LifecycleReply()

    async def _host(self, context: Any) -> str:
        """The calling host's id (``linchkit-host``); INVALID_ARGUMENT when off the contract."""
        try:
            return host_of(context.invocation_metadata())
        except ValueError as error:
            import grpc

            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise  # abort raises; this only tells type checkers

    async def Call(self, request: Any, context: Any) -> Any:
        if self._gate.arrive():
            await refuse_as_not_run(context)
        return await self._answer(request, context)

    async def CallBatch(self, request: Any, context: Any) -> Any:
        if self._gate.arrive():
            await refuse_as_not_run(context)
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
        if self._gate.arrive():
            await refuse_as_not_run(context)
        pb = self._pb
        try:
            params, call_context, timeout = await self._parse(request, context)
            async with asyncio.timeout(timeout):
                async for chunk in self.host.stream(request.method, params, call_context):
                    yield pb.StreamItem(chunk_json=result_fragment(chunk))
        except TimeoutError:
            error = DeadlineExceeded(f"{request.method!r} did not finish before its deadline")
            yield pb.StreamItem(error=self._error(error))
        except DispatchError as error:
            yield pb.StreamItem(error=self._error(error))

    async def Events(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        queue = self._events.open()
        # Headers now: the host knows the stream is registered, so no emit is lost.
        await context.send_initial_metadata(())
        reader = asyncio.get_running_loop().create_task(
            deliver_host_events(self.host, request_iterator)
        )
        try:
            while (item := await queue.get()) is not None:
                yield self._pb.PluginEvent(name=item[0], data_json=item[1])
        finally:
            self._events.close(queue)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    # -- internals --------------------------------------------------------------------------

    async def _parse(self, request: Any, context: Any) -> tuple[Any, dict[str, Any], float | None]:
        # proto3 cannot tell v = 0 from a v left unset: that is version 1, as in every SDK.
        if request.v not in (0, PROTOCOL_VERSION):
            raise ProviderError(
                f"unsupported envelope version {request.v}; this plugin speaks v{PROTOCOL_VERSION}"
            )
        return parse_call(request, context)

    async def _answer(self, request: Any, context: Any) -> Any:
        pb = self._pb
        try:
            params, call_context, timeout = await self._parse(request, context)
            result = await self.host.call_with_deadline(
                request.method, params, call_context, timeout
            )
            return pb.CallReply(ok=True, result_json=result_fragment(result))
        except DispatchError as error:
            return pb.CallReply(ok=False, error=self._error(error))

    def _error(self, error: DispatchError) -> Any:
        wire = error_response(error)["error"]  # details JSON cannot carry left out
        return self._pb.Error(
            type=wire["type"],
            message=wire["message"],
            retryable=wire["retryable"],
            details_json=orjson.dumps(wire["details"]) if "details" in wire else b"",
            retry_after=wire.get("retry_after") or 0.0,
        )

    async def _wind_down(self) -> None:
        """Refuse new calls as not run until none has arrived for ``STOP_QUIET_SECONDS``
        (at most ``STOP_QUIET_MOST_SECONDS``, or ``stop_caps.grace`` when shorter: the wait
        is part of the grace), so that shutting down cancels no call the
        host cannot tell from one cut off mid-run: why, in ``linchkit_plugin._grpc_drain``.
        """
        self._gate.stopping = True
        await self._set_serving(False)
        most = min(STOP_QUIET_MOST_SECONDS, self.stop_caps.grace)  # the grace counts it
        await self._gate.until_quiet(quiet=STOP_QUIET_SECONDS, most=most)

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
        then await ``on_stopping`` (leave a registry) before draining the calls in flight
        (``stop_caps.grace`` at most), and only then run the hooks the host did not
        (``stop_caps.hooks`` at most): a ``stop`` hook that closes what the calls use must
        not pull it from under them."""
        import grpc.aio
        from grpc_health.v1 import health_pb2_grpc

        from linchkit_plugin._proto import plugin_pb2_grpc

        self._events.loop = asyncio.get_running_loop()
        server = grpc.aio.server(
            interceptors=[] if self._token is None else [token_interceptor(self._token)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        plugin_pb2_grpc.add_PluginServiceServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        add_reflection(server)
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
            loop = asyncio.get_running_loop()
            grace_ends = loop.time() + self.stop_caps.grace  # the calls run on meanwhile
            await self._wind_down()
            await self.health.enter_graceful_shutdown()
            self._events.end_all()  # Events streams never end by themselves
            await server.stop(grace=max(0.0, grace_ends - loop.time()))
            await self.host.close_within(self.stop_caps.hooks)


def main(
    plugin_class: type[Any],
    *,
    plugin_id: str,
    version: str,
    runtime: str = "python",
    argv: Sequence[str] | None = None,
) -> int:
    """The plugin executable: service mode, subprocess mode, or a hint."""
    launch = read_command_line(list(sys.argv[1:] if argv is None else argv))
    if launch is None:
        return 1
    log_to_stderr()
    host = PluginHost(plugin_class(), owns_process=True)
    server = PluginServer(
        host,
        plugin_id=plugin_id,
        version=version,
        runtime=runtime,
        serving_from_start=launch.arguments is not None,
        token=launch.token,
        stop_caps=launch.stop_caps,
    )
    # OTEL_* variables: spans of traced calls go to their collector.
    with exporting(lambda: host.hooks_left, plugin_id=plugin_id, version=version):
        # The version Describe reports, read here so that the handshake line says the same.
        return asyncio.run(
            run(
                server,
                launch.arguments,
                protocol_version=PROTOCOL_VERSION,
                token_configured=launch.token is not None,
            )
        )
