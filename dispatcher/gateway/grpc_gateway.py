"""The gateway's gRPC port: ``GatewayService`` of ``proto/gateway.proto`` over a started
dispatcher, beside the HTTP port (``dispatcher serve --grpc-port``).

The same calls as ``POST /v1/plugins/{plugin}/methods/{method}``, through
``Dispatcher.call`` / ``Dispatcher.stream``, so the same routes, schemas, policies,
authentication, access rules and audit records apply. grpcio is the vendor SDK here and
appears in no other module of the gateway; ``GatewayServer`` imports this one only when a
gRPC port is asked for, so an HTTP-only gateway never loads grpcio.

Credentials: metadata ``authorization`` and ``x-api-key``; on TLS with
``client_cert: required``, the verified client certificate's subject (RFC 4514, as the
HTTP port writes it) and SANs. grpcio's server credentials have no "ask, verify if sent"
mode, so with ``client_cert: optional`` the gRPC port asks for no certificate: callers
authenticate with tokens or keys there.

Errors (the reverse of ``providers._grpc.status``, so a dispatcher reading this port
through its own grpc code gets the same error type back, told apart by ``error-type``
where types share a status):

    error type                                        gRPC status
    invalid_params                                    INVALID_ARGUMENT
    unauthorized                                      UNAUTHENTICATED
    forbidden                                         PERMISSION_DENIED
    plugin_not_found, method_not_found                NOT_FOUND
    rate_limited                                      RESOURCE_EXHAUSTED
    result_too_large (a job's result over             RESOURCE_EXHAUSTED, ``retryable``
    jobs.max_result_bytes; HTTP's 500)                false: final, unlike rate_limited
    deadline_exceeded                                 DEADLINE_EXCEEDED
    target_unavailable, circuit_open, overloaded,     UNAVAILABLE
    shutting_down
    provider_error (and any type not listed)          FAILED_PRECONDITION
    plugin_error (the plugin raised)                  OK, ``ok: false`` and the envelope

with trailing metadata ``error-type``, ``retryable`` and ``retry-after`` (seconds).

TLS reload: the server's credentials are dynamic; at each new connection grpc asks for
the certificate configuration, and a new one is built when the certificate, key or
client CA files changed since the last (``_CertificateFetcher``).

What a peer may hold before it has sent anything worth authenticating (``docs/gateway.md``,
limits), each bound from the gateway's settings:

    bound                               from                   when passed
    the call's one message arrives      body_timeout           DEADLINE_EXCEEDED
    calls held at once                  max_grpc_calls         RESOURCE_EXHAUSTED (grpc)
    streams open on one connection      100                    REFUSED_STREAM (never run)
    TLS and HTTP/2 handshake            header_timeout         connection closed
    a connection with no call           keep_alive_timeout     GOAWAY (nothing lost)
    pings, without data between them    one per 10 s           GOAWAY too_many_pings after
                                                               the third too soon
    connections open on the port        max_connections        closed at once (grpc's
                                                               quota), unanswered

The connection limit is grpc core's own (``grpc.max_allowed_incoming_connections``,
grpc/grpc#36088, ``src/core/lib/resource_quota/connection_quota.cc``): counted from the
accept, so a TLS handshake under way counts; one more connection is closed as it is
accepted, silently (no log line, no counter grpc exposes to Python). It is per address
listened on (a host name resolving to two addresses gets two). grpc has no limit per
peer: its quota is handed the peer's address and ignores it, interceptors see calls, not
connections (an idle connection, the flood this guards against, makes none), and grpcio
offers no way to hand grpc a connection accepted in Python (the C core's passive listener
and ``external:`` acceptor are not exposed). ``connection_stats`` reads the open
connections from grpc's channelz (``dispatcher.gateway.grpc_connections``).

The methods are registered as client-streaming (``_method_handlers``): grpc hands a
unary method's call to the service only once its message has come, and waits for that
without limit, holding the call's slot; a client-streaming one is handed over on its
headers and the service reads the message itself, under ``body_timeout``, and parses it
(bytes that are not a ``GatewayCall`` are INVALID_ARGUMENT, not grpc's UNKNOWN with a
traceback). Clients see no difference: the wire is the same.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import orjson
from google.protobuf.message import DecodeError

from dispatcher._dispatcher import Dispatcher
from dispatcher.gateway.body import Refused, parse_json
from dispatcher.gateway.call_headers import (
    MAX_TIMEOUT_MS,
    REQUEST_ID,
    TRACEPARENT,
    capped_timeout,
    checked_idempotency_key,
    checked_version,
)
from dispatcher.gateway.certificates import certificate_names
from dispatcher.gateway.disclosure import Disclosure, ManifestNames
from dispatcher.gateway.grpc_connections import OpenConnections
from dispatcher.gateway.settings import GatewaySettings
from dispatcher.identity import Authenticator, Credentials, Principal
from linchkit_plugin._proto import gateway_pb2
from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    InvalidParams,
    PluginError,
    ShuttingDown,
    Unauthorized,
)
from providers.invocation import new_request_id
from providers.tls import files_stamp

__all__ = ["STATUS_BY_TYPE", "GrpcGateway"]

log = logging.getLogger("dispatcher.gateway.grpc")


STATUS_BY_TYPE: dict[str, grpc.StatusCode] = {
    "invalid_params": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "plugin_not_found": grpc.StatusCode.NOT_FOUND,
    "method_not_found": grpc.StatusCode.NOT_FOUND,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "target_unavailable": grpc.StatusCode.UNAVAILABLE,
    "circuit_open": grpc.StatusCode.UNAVAILABLE,
    "overloaded": grpc.StatusCode.UNAVAILABLE,
    "shutting_down": grpc.StatusCode.UNAVAILABLE,
    # The dispatcher's own limit on an answer (a job's result over jobs.max_result_bytes):
    # what grpc itself answers for a message over a size limit, as this port does for a
    # request over max_body_bytes. The HTTP port's 500 (not 429, no Retry-After) says it is
    # final; here the trailers do (retryable false, no retry-after). Not provider_error's
    # FAILED_PRECONDITION (the target did not break the protocol: the HTTP port's 502 vs
    # 500), nor INTERNAL (grpc's broken invariants, read back as a crashed handler).
    # providers._grpc.status tells it from rate_limited by its error-type trailer.
    "result_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
}
#: At a stop, calls that arrive are held, neither run nor answered, until none has arrived
#: for this long (at most ``SETTLE_MOST_SECONDS``); then grpc's shutdown begins and they go
#: on (``GrpcGateway.aclose`` says why).
SETTLE_QUIET_SECONDS = 0.1
SETTLE_MOST_SECONDS = 1.0
#: A held call whose deadline would pass first is refused as not run this long before it.
HELD_DEADLINE_MARGIN_SECONDS = 0.05
#: HTTP/2 streams one connection may have open (RFC 9113 §6.5.2 asks for no fewer than
#: 100): a grpc client with more calls queues the rest itself; a peer that ignores the
#: setting has the extra streams refused, as never run. So one connection holds at most
#: this many of the port's ``max_grpc_calls``.
MAX_STREAMS_PER_CONNECTION = 100
#: Pings a peer may send with no data between them: one per this long; the third sooner
#: ends the connection (GOAWAY ``too_many_pings``). A ping flood costs the gateway an
#: answer each; 10 s is the shortest keepalive grpc-go lets a client set, so a client
#: keeping a long call alive through a NAT is never cut off.
MIN_PING_INTERVAL_MS = 10_000
MAX_PING_STRIKES = 2
#: The most of an error's message a status carries, in UTF-8 bytes. grpc sends it in a
#: trailer, percent-encoded (a byte past ASCII takes three), and its clients refuse
#: trailers past 8 KiB some of the time and past 16 KiB always, as RESOURCE_EXHAUSTED
#: without this port's ``error-type``: a retryable ``Overloaded`` to
#: ``providers._grpc.status``. A message may quote what the caller sent (a value over its
#: schema's ``maxLength``, a made-up plugin name), so it is cut to fit.
MAX_STATUS_MESSAGE_BYTES = 2048
_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


def _error_message(error: DispatchError) -> gateway_pb2.GatewayError:
    wire = error.to_wire()
    details = wire.get("details")
    try:
        details_json = orjson.dumps(details) if details else b""
    except TypeError:  # a plugin's details JSON cannot carry: keep the rest
        details_json = b""
    return gateway_pb2.GatewayError(
        type=wire["type"],
        message=wire["message"],
        retryable=wire["retryable"],
        details_json=details_json,
        retry_after=error.retry_after or 0.0,
    )


def _status_message(message: str) -> str:
    """``message`` cut to ``MAX_STATUS_MESSAGE_BYTES`` of UTF-8 (and an ellipsis)."""
    encoded = message.encode("utf-8", "replace")
    if len(encoded) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    return encoded[:MAX_STATUS_MESSAGE_BYTES].decode("utf-8", "ignore") + "…"


def _trailers(error: DispatchError) -> tuple[tuple[str, str], ...]:
    trailers = [("error-type", error.type), ("retryable", "true" if error.retryable else "false")]
    if error.retry_after is not None:
        trailers.append(("retry-after", f"{error.retry_after:g}"))
    return tuple(trailers)


def _certificate_credentials(context: grpc.aio.ServicerContext) -> tuple[str | None, Sequence[str]]:
    """The subject and SANs of the client certificate grpc verified, if one was, named
    as the HTTP port names them (``dispatcher.gateway.certificates``)."""
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return None, ()
    try:
        der = ssl.PEM_cert_to_DER_cert(pem[0].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None, ()
    names = certificate_names(der)
    return (None, ()) if names is None else names


class _Servicer:
    def __init__(
        self, dispatcher: Dispatcher, settings: GatewaySettings, authenticator: Authenticator | None
    ) -> None:
        self.dispatcher = dispatcher
        self.settings = settings
        self.authenticator = authenticator
        # As on the HTTP port (``dispatcher.gateway.app``): the host's authenticator if
        # it gave one, else the dispatcher authenticates, checks access and audits.
        self._dispatcher_authenticates = (
            authenticator is None and dispatcher.authenticator is not None
        )
        #: Calls that have reached the service (``settle`` watches it), and while the port
        #: stops, what holds the calls arriving until grpc's shutdown has begun.
        self._arrivals = 0
        self._held: asyncio.Event | None = None
        #: The waits of calls whose message has not come yet, oldest first, and how many
        #: may wait at once: half of the port's calls, so a flood of calls that never
        #: send one leaves the other half to the calls that did (``_request``).
        self._waiting: dict[asyncio.Timeout, None] = {}
        self._most_waiting = max(1, settings.max_grpc_calls // 2)
        #: What callers are told of the infrastructure's failures, as on the HTTP port.
        self.disclosure = Disclosure(
            settings.error_detail, known=ManifestNames(lambda: dispatcher.manifest)
        )

    def _told(
        self, error: DispatchError, request: gateway_pb2.GatewayCall | None, request_id: str
    ) -> DispatchError:
        if request is None:  # refused before its message was read: nothing of a target
            return error
        return self.disclosure.public(error, request.plugin, request.method, request_id)

    async def settle(self) -> None:
        """Hold every call from now on until ``release``; return once none has arrived for
        ``SETTLE_QUIET_SECONDS`` (or after ``SETTLE_MOST_SECONDS``)."""
        self._held = asyncio.Event()
        loop = asyncio.get_running_loop()
        until = loop.time() + SETTLE_MOST_SECONDS
        seen = -1
        while self._arrivals != seen and loop.time() < until:
            seen = self._arrivals
            await asyncio.sleep(SETTLE_QUIET_SECONDS)

    def release(self) -> None:
        """Let the held calls go on (grpc's shutdown has begun)."""
        if self._held is not None:
            self._held.set()

    async def _held_until_released(
        self, held: asyncio.Event, context: grpc.aio.ServicerContext
    ) -> None:
        """Wait for ``release``; a call whose client gives up sooner is refused just before
        its deadline, as not run (``shutting_down``), rather than left to time out, which
        its client could not tell from a call cut off mid-run."""
        remaining = context.time_remaining()
        if remaining is None:
            await held.wait()
            return
        try:
            async with asyncio.timeout(remaining - HELD_DEADLINE_MARGIN_SECONDS):
                await held.wait()
        except TimeoutError:
            raise ShuttingDown(
                "the gateway is stopping: the call was not run; send it to another replica",
                details={"stage": "refused"},
            ) from None

    async def call(
        self, _requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayReply:
        """``Call``: grpc hands it over on its headers; its message is read here."""
        self._arrivals += 1
        request_id = ""
        request = None
        try:
            request = await self._request(context)
            if self._held is not None:
                await self._held_until_released(self._held, context)
            options = await self._options(request, context)
            request_id = options["request_id"]  # the audit record's, echoed
            result = await self.dispatcher.call(
                request.plugin, request.method, self._params(request), **options
            )
            result_json = orjson.dumps(result)
        except PluginError as error:
            return gateway_pb2.GatewayReply(
                ok=False, error=_error_message(error), request_id=request_id
            )
        except DispatchError as error:
            told = self._told(error, request, request_id)
            await context.abort(
                STATUS_BY_TYPE.get(error.type, grpc.StatusCode.FAILED_PRECONDITION),
                _status_message(told.message),
                trailing_metadata=_trailers(told),
            )
        except TypeError as error:  # a result JSON cannot carry
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                _status_message(f"the plugin's result is not JSON: {error}"),
                trailing_metadata=(("error-type", "provider_error"), ("retryable", "false")),
            )
        return gateway_pb2.GatewayReply(ok=True, result_json=result_json, request_id=request_id)

    async def stream(
        self, _requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GatewayStreamItem]:
        """``Stream``: as ``call``, its chunks as they come."""
        self._arrivals += 1
        request = None
        request_id = ""
        try:
            request = await self._request(context)
            if self._held is not None:
                await self._held_until_released(self._held, context)
            options = await self._options(request, context)
            request_id = options["request_id"]
            options.pop("idempotency_key")  # a stream is never replayed
            chunks = self.dispatcher.stream(
                request.plugin, request.method, self._params(request), **options
            )
            async for chunk in chunks:
                yield gateway_pb2.GatewayStreamItem(chunk_json=orjson.dumps(chunk))
        except PluginError as error:
            yield gateway_pb2.GatewayStreamItem(error=_error_message(error))
        except DispatchError as error:
            told = self._told(error, request, request_id)
            await context.abort(
                STATUS_BY_TYPE.get(error.type, grpc.StatusCode.FAILED_PRECONDITION),
                _status_message(told.message),
                trailing_metadata=_trailers(told),
            )

    async def _request(self, context: grpc.aio.ServicerContext) -> gateway_pb2.GatewayCall:
        """The call's one message, parsed, before anything else is done for it.

        Authentication needs the message (the audit record names the plugin and method
        it asks for), so until it comes the caller is nobody, and the wait for it is
        bounded twice: a message not come within ``body_timeout`` of the call's headers
        ends the call ``deadline_exceeded``, as a request body that late does on the HTTP
        port (408); and when more than half of ``max_grpc_calls`` wait at once, the
        oldest wait ends so, whatever its age. A client's message comes with its
        headers, so the calls a flood keeps waiting are the flood's, and the other half
        of the port's calls stays free for calls that did send theirs. Messages after
        the first are not read, as for a unary method.
        """
        waiting = self._waiting
        timer = asyncio.timeout(self.settings.body_timeout)
        try:
            async with timer:
                waiting[timer] = None
                if len(waiting) > self._most_waiting:
                    self._end_oldest_wait(timer)
                raw = await context.read()
        except TimeoutError:
            if timer in waiting:
                late = f"did not arrive within {self.settings.body_timeout:g} s"
            else:
                late = (
                    f"did not arrive before {self._most_waiting} later calls were waiting"
                    " for theirs (half of max_grpc_calls, the most this port lets wait)"
                )
            raise DeadlineExceeded(f"the request message {late}") from None
        finally:
            waiting.pop(timer, None)
        if raw is grpc.aio.EOF:
            raise InvalidParams("the call sent no GatewayCall message")
        request = gateway_pb2.GatewayCall()
        try:
            request.ParseFromString(raw)
        except DecodeError:
            # The peer's mistake, not the gateway's: no traceback, no line above debug.
            log.debug("a gRPC request of %d bytes is not a GatewayCall message", len(raw))
            raise InvalidParams(
                "the request is not a GatewayCall message (proto/gateway.proto)"
            ) from None
        return request

    def _end_oldest_wait(self, newest: asyncio.Timeout) -> None:
        """End the oldest wait for a message at the loop's next turn. One whose
        ``body_timeout`` has just passed is ending already (and can no longer be
        rescheduled): the next oldest goes instead."""
        for oldest in self._waiting:
            if oldest is not newest and not oldest.expired():
                del self._waiting[oldest]
                oldest.reschedule(0)
                return

    def _params(self, request: gateway_pb2.GatewayCall) -> Any:
        raw: bytes = request.params_json
        if not raw:
            return {}
        try:
            return parse_json(raw, self.settings.max_depth)
        except Refused as refused:
            raise refused.error from None

    async def _options(
        self, request: gateway_pb2.GatewayCall, context: grpc.aio.ServicerContext
    ) -> dict[str, Any]:
        """``Dispatcher.call``'s keyword arguments: who calls, the deadline, the context."""
        if request.request_id and not REQUEST_ID.match(request.request_id):
            raise InvalidParams("request_id is 1-128 characters of A-Z a-z 0-9 . _ : -")
        if request.version:  # proto3: empty is absent
            checked_version(request.version, "version")
        if request.idempotency_key:
            checked_idempotency_key(request.idempotency_key, "idempotency_key")
        if request.timeout_ms > MAX_TIMEOUT_MS:
            raise InvalidParams(f"timeout_ms is at most {MAX_TIMEOUT_MS}")
        # timeout_ms sets the call's deadline as X-Timeout-Ms does on HTTP, overriding the
        # method's; the gRPC deadline is how long the client waits, which only ever
        # shortens it: one further away than any deadline (1e9 s) is no error. Either is
        # cut to the gateway's max_timeout_ms, as on HTTP.
        asked = request.timeout_ms / 1000 if request.timeout_ms else None
        timeout = capped_timeout(asked, self.settings.max_timeout_ms)
        remaining = context.time_remaining()
        wait_at_most = None if remaining is None else max(remaining, 0.001)
        credentials: Credentials | None = self._credentials(context)
        caller: Principal | None = None
        if not self._dispatcher_authenticates:
            assert credentials is not None
            caller = await self._authenticate(credentials)
            credentials = None
        traceparent = request.traceparent
        return {
            "version": request.version or None,
            "caller": caller,
            "credentials": credentials,
            "timeout": timeout,
            "wait_at_most": wait_at_most,
            "traceparent": traceparent if TRACEPARENT.match(traceparent) else None,
            "idempotency_key": request.idempotency_key or None,
            "request_id": request.request_id or new_request_id(),
        }

    def _credentials(self, context: grpc.aio.ServicerContext) -> Credentials:
        metadata: dict[str, Any] = {}
        for key, value in context.invocation_metadata() or ():
            metadata.setdefault(key, value)
        subject, sans = _certificate_credentials(context)
        authorization, api_key = metadata.get("authorization"), metadata.get("x-api-key")
        return Credentials(
            authorization=authorization if isinstance(authorization, str) else None,
            api_key=api_key if isinstance(api_key, str) else None,
            certificate_subject=subject,
            certificate_sans=sans,
        )

    async def _authenticate(self, credentials: Credentials) -> Principal | None:
        if self.authenticator is None:
            return None
        try:
            return await self.authenticator.authenticate(credentials)
        except DispatchError:
            raise
        except Exception as error:
            # Its message may quote the credentials: log the type alone.
            log.error("the authenticator failed with %s; refusing the call", type(error).__name__)
            raise Unauthorized("the credentials could not be checked") from None


class _CertificateFetcher:
    """grpc's hook at each new connection: a new configuration when the files changed."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._files = tuple(
            path
            for path in (settings.tls_cert, settings.tls_key, settings.client_ca)
            if path is not None
        )
        self._loaded = files_stamp(self._files)
        self.reloads = 0

    def configuration(self) -> Any:
        settings = self._settings
        assert settings.tls_cert is not None
        assert settings.tls_key is not None
        client_ca = (
            _read(settings.client_ca)
            if settings.client_ca is not None and settings.client_cert == "required"
            else None
        )
        return grpc.ssl_server_certificate_configuration(
            [(_read(settings.tls_key), _read(settings.tls_cert))], root_certificates=client_ca
        )

    def __call__(self) -> Any:
        stamp = files_stamp(self._files)
        if stamp == self._loaded:
            return None  # grpc keeps the configuration it has
        try:
            configuration = self.configuration()
        except (OSError, ValueError) as error:
            log.warning("gRPC TLS files not reloaded, the previous ones still serve: %s", error)
            return None
        self._loaded = stamp
        self.reloads += 1
        return configuration


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _method_handlers(servicer: _Servicer) -> dict[str, grpc.RpcMethodHandler]:
    """``GatewayService``'s methods, each registered as taking a stream of requests whose
    bytes the servicer reads and parses itself (the module's docstring says why)."""
    return {
        "Call": grpc.stream_unary_rpc_method_handler(
            servicer.call, response_serializer=gateway_pb2.GatewayReply.SerializeToString
        ),
        "Stream": grpc.stream_stream_rpc_method_handler(
            servicer.stream, response_serializer=gateway_pb2.GatewayStreamItem.SerializeToString
        ),
    }


class GrpcGateway:
    """The gRPC port of one gateway; ``start()`` listens, ``aclose(grace)`` stops."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        settings: GatewaySettings,
        *,
        authenticator: Authenticator | None = None,
    ) -> None:
        assert settings.grpc_port is not None
        self.settings = settings
        self.port: int | None = None
        self.fetcher: _CertificateFetcher | None = None
        self._connections = OpenConnections(lambda: self._new_server(settings))
        self._server = self._connections.server
        self._servicer = _Servicer(dispatcher, settings, authenticator)
        handlers = _method_handlers(self._servicer)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, handlers),)
        )
        self._server.add_registered_method_handlers(_SERVICE, handlers)

    @staticmethod
    def _new_server(settings: GatewaySettings) -> grpc.aio.Server:
        return grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes + 1024),
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                # Off: a stream counts against the limit while open, as HTTP/2 says, not
                # until the service lets go of its call, after the client saw it end; on,
                # a grpc client at 100 calls at once had 145 of 1,000 refused.
                ("grpc.http.overload_protection", 0),
                ("grpc.server_handshake_timeout_ms", _milliseconds(settings.header_timeout)),
                ("grpc.max_connection_idle_ms", _milliseconds(settings.keep_alive_timeout)),
                ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
                ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
                # Closed at once past it, as it is accepted (the module's docstring).
                ("grpc.max_allowed_incoming_connections", settings.max_connections),
            ],
            maximum_concurrent_rpcs=settings.max_grpc_calls,
        )

    async def start(self) -> None:
        settings = self.settings
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        address = f"{host}:{settings.grpc_port}"
        if settings.tls:
            fetcher = self.fetcher = _CertificateFetcher(settings)
            credentials = grpc.dynamic_ssl_server_credentials(
                fetcher.configuration(),
                fetcher,
                require_client_authentication=settings.client_cert == "required",
            )
            port = self._server.add_secure_port(address, credentials)
        else:
            port = self._server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
        self.port = port
        await self._server.start()

    def connection_stats(self) -> dict[str, Any]:
        """Open connections (None when grpc's channelz cannot tell) and the limit; grpc
        counts no refusals it would tell, so none are reported."""
        return {"open": self._connections.count(), "max": self.settings.max_connections}

    @property
    def address(self) -> str:
        """``host:port`` listened on (the real port when given 0)."""
        host = self.settings.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def aclose(self, grace: float = 2.0) -> None:
        """Stop listening and end every call within ``grace`` seconds, losing none.

        grpc core cancels, with ``CANCELLED``, every call it has received but not yet
        handed to the service the moment its shutdown begins (grpc/grpc#41785): ~30 per
        stop with 32 clients calling in a loop, calls a client cannot tell from ones cut
        off mid-run. So the calls arriving are held first, which stops each client that
        waits for its answer from sending the next; once none has arrived for
        ``SETTLE_QUIET_SECONDS`` core's queue is empty, the shutdown begins (new calls are
        refused as never sent: ``GOAWAY``, then the closed port) and the held calls go on,
        through the dispatcher as any other (after a drain, ``shutting_down``).
        """
        servicer = self._servicer
        try:
            await servicer.settle()
        finally:
            stopping = asyncio.ensure_future(self._server.stop(grace))
            # After the stop's first step, in which grpc's shutdown begins: a held call's
            # client then sends its next call to a port that refuses it as never sent.
            asyncio.get_running_loop().call_soon(servicer.release)
        await stopping

    def __repr__(self) -> str:
        reloads = self.fetcher.reloads if self.fetcher is not None else 0
        return f"<GrpcGateway {self.address} tls={self.settings.tls} reloads={reloads}>"
