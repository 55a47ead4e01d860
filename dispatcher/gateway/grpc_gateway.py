"""The gateway's gRPC port: ``GatewayService`` of ``proto/gateway.proto`` over a started
dispatcher, beside the HTTP port (``dispatcher serve --grpc-port``).

The same calls as ``POST /v1/plugins/{plugin}/methods/{method}``, through
``Dispatcher.call`` / ``Dispatcher.stream``, so the same routes, schemas, policies,
authentication, access rules and audit records apply. grpcio is the vendor SDK here and
appears in no module of the gateway but the gRPC port's (``grpc_*``); ``GatewayServer``
imports this one only when a gRPC port is asked for, so an HTTP-only gateway never loads
grpcio.

Its parts, each a module of its own: the service and how it reads a call
(``grpc_service``), how an error is told (``grpc_errors``: statuses and trailers), the
TLS reloaded as its files change (``grpc_tls``), and the open connections
(``grpc_connections``). Here: the server, its bounds, and how the port starts and stops.

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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
import grpc.aio

from dispatcher._dispatcher import Dispatcher
from dispatcher.gateway.grpc_connections import OpenConnections
from dispatcher.gateway.grpc_errors import STATUS_BY_TYPE
from dispatcher.gateway.grpc_service import (
    SERVICE,
    SETTLE_MOST_SECONDS,
    SETTLE_QUIET_SECONDS,
    GatewayServicer,
    method_handlers,
)
from dispatcher.gateway.grpc_tls import CertificateFetcher
from dispatcher.gateway.settings import GatewaySettings
from dispatcher.identity import Authenticator

__all__ = [
    "MAX_STREAMS_PER_CONNECTION",
    "SETTLE_MOST_SECONDS",
    "SETTLE_QUIET_SECONDS",
    "STATUS_BY_TYPE",
    "GrpcGateway",
]

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


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


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
        self.fetcher: CertificateFetcher | None = None
        self._connections = OpenConnections(lambda: self._new_server(settings))
        self._server = self._connections.server
        self._servicer = GatewayServicer(dispatcher, settings, authenticator)
        handlers = method_handlers(self._servicer)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self._server.add_registered_method_handlers(SERVICE, handlers)

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
            fetcher = self.fetcher = CertificateFetcher(settings)
            credentials = grpc.dynamic_ssl_server_credentials(
                fetcher.configuration(),
                fetcher,
                require_client_authentication=settings.client_cert == "required",
            )
            port = self._bound(partial(self._server.add_secure_port, address, credentials))
        else:
            port = self._bound(partial(self._server.add_insecure_port, address))
        if port == 0:
            raise OSError(
                f"cannot listen for gRPC on {address}: the port is taken, or the address"
                " is not this machine's"
            )
        self.port = port
        await self._server.start()

    @staticmethod
    def _bound(add_port: Callable[[], int]) -> int:
        """The port ``add_port`` bound, 0 if it could not: grpcio says so with a
        ``RuntimeError`` since 1.60 (it was a traceback of ``dispatcher serve``)."""
        try:
            return add_port()
        except RuntimeError:
            return 0

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
