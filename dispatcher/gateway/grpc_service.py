"""The service of the gateway's gRPC port: ``GatewayService`` of ``proto/gateway.proto``
over a started dispatcher (``GatewayServicer``), its calls through ``Dispatcher.call`` /
``Dispatcher.stream``.

Credentials: metadata ``authorization`` and ``x-api-key``; on TLS with
``client_cert: required``, the verified client certificate's subject (RFC 4514, as the
HTTP port writes it) and SANs. grpcio's server credentials have no "ask, verify if sent"
mode, so with ``client_cert: optional`` the gRPC port asks for no certificate: callers
authenticate with tokens or keys there. Errors are told as ``grpc_errors`` says.

The methods are registered as client-streaming (``method_handlers``): grpc hands a
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
from typing import Any

import grpc
import grpc.aio
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
from dispatcher.gateway.grpc_errors import STATUS_BY_TYPE, error_message, status_message, trailers
from dispatcher.gateway.settings import GatewaySettings
from dispatcher.identity import Authenticator, Credentials, Principal
from linchkit_plugin._proto import gateway_pb2
from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    InvalidParams,
    PluginError,
    ProviderError,
    ShuttingDown,
    Unauthorized,
)
from linchkit_plugin.wire import result_fragment
from providers.invocation import new_request_id

__all__ = [
    "HELD_DEADLINE_MARGIN_SECONDS",
    "SERVICE",
    "SETTLE_MOST_SECONDS",
    "SETTLE_QUIET_SECONDS",
    "GatewayServicer",
    "method_handlers",
]

log = logging.getLogger("dispatcher.gateway.grpc")

#: At a stop, calls that arrive are held, neither run nor answered, until none has arrived
#: for this long (at most ``SETTLE_MOST_SECONDS``); then grpc's shutdown begins and they go
#: on (``GrpcGateway.aclose`` says why).
SETTLE_QUIET_SECONDS = 0.1
SETTLE_MOST_SECONDS = 1.0
#: A held call whose deadline would pass first is refused as not run this long before it.
HELD_DEADLINE_MARGIN_SECONDS = 0.05
#: The service's full name, which grpc routes its calls by.
SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


async def _abort_not_json(context: grpc.aio.ServicerContext, error: ProviderError) -> None:
    """End the call: the plugin answered a result (or a chunk) JSON cannot carry, an object
    it has no form for, a NaN or an infinity (an in-process plugin's, which no wire came
    between). Said as written: the plugin's fault, and nothing of the network behind."""
    await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION,
        status_message(error.message),
        trailing_metadata=(("error-type", "provider_error"), ("retryable", "false")),
    )


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


class GatewayServicer:
    """``GatewayService``'s methods over one started ``Dispatcher``; ``settle`` and
    ``release`` hold the calls arriving while the port stops (``GrpcGateway.aclose``)."""

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
        except PluginError as error:
            return gateway_pb2.GatewayReply(
                ok=False, error=error_message(error), request_id=request_id
            )
        except DispatchError as error:
            await self._abort(context, error, request, request_id)
        try:
            result_json = result_fragment(result)
        except ProviderError as error:
            await _abort_not_json(context, error)
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
                try:
                    chunk_json = result_fragment(chunk)
                except ProviderError as error:
                    await _abort_not_json(context, error)
                yield gateway_pb2.GatewayStreamItem(chunk_json=chunk_json)
        except PluginError as error:
            yield gateway_pb2.GatewayStreamItem(error=error_message(error))
        except DispatchError as error:
            await self._abort(context, error, request, request_id)

    async def _abort(
        self,
        context: grpc.aio.ServicerContext,
        error: DispatchError,
        request: gateway_pb2.GatewayCall | None,
        request_id: str,
    ) -> None:
        """End the call with ``error``'s status, told as the gateway tells it (its trailers)."""
        told = self._told(error, request, request_id)
        await context.abort(
            STATUS_BY_TYPE.get(error.type, grpc.StatusCode.FAILED_PRECONDITION),
            status_message(told.message),
            trailing_metadata=trailers(told),
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


def method_handlers(servicer: GatewayServicer) -> dict[str, grpc.RpcMethodHandler]:
    """``GatewayService``'s methods, each registered as taking a stream of requests whose
    bytes the servicer reads and parses itself (this module's docstring says why)."""
    return {
        "Call": grpc.stream_unary_rpc_method_handler(
            servicer.call, response_serializer=gateway_pb2.GatewayReply.SerializeToString
        ),
        "Stream": grpc.stream_stream_rpc_method_handler(
            servicer.stream, response_serializer=gateway_pb2.GatewayStreamItem.SerializeToString
        ),
    }
