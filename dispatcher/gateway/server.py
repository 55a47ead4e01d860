"""Running a gateway: the listening socket, TLS and its certificate reload, shutdown.

``GatewayServer`` serves the app of ``dispatcher.gateway.app`` over a started
``Dispatcher``. Each connection starts on the call lane (``dispatcher.gateway.lane``),
which answers plain calls itself and hands anything else to aiohttp's protocol (as the
gateway runs it, ``dispatcher.gateway.protocol``: what aiohttp answers by itself comes in
the error envelope, quoting nothing a client sent); with
``access_log`` (or ``call_lane=False``) every request goes to aiohttp, which writes the
log. aiohttp's keep-alive
timer (and the lane's, alike) runs from the moment a connection opens and again after
each answer, and closes the connection if no complete request head arrived by then: that
is the gateway's header timeout (slowloris, idle connections), set to ``header_timeout``.

Connections: the port holds ``max_connections`` at most, ``connections_per_peer`` from
one peer address; the listening socket is the gateway's own (``dispatcher.gateway.
listener``), which refuses a connection past either as it accepts it (503 ``overloaded``
on plain HTTP, closed on TLS), and bounds a TLS handshake by ``header_timeout``. At start
the gateway warns when RLIMIT_NOFILE is lower than its ports' connections need
(``descriptors_short``).

With ``telemetry.metrics.listen`` the gateway also runs the admin listener
(``dispatcher.gateway.admin``: ``/metrics``, ``/healthz``, ``/readyz``), started after its
ports and closed after them; ``/metrics`` is then not on the gateway's port.

TLS: ``CertificateReload`` (``dispatcher.gateway.tls``) builds a new context from the
certificate, key and client CA when any of their files change (checked every
``cert_check_interval`` seconds, or at once on ``reload_certificates()``, which
``dispatcher serve`` calls on SIGHUP); every handshake from then on uses it. The admin
listener's own ``telemetry.metrics.tls`` is reloaded the same way, at the same times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import ssl
from collections.abc import Mapping
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from aiohttp import web

from dispatcher._dispatcher import Dispatcher
from dispatcher.gateway.admin import AdminPort
from dispatcher.gateway.app import GATEWAY_KEY, HANDLER_ARGS, HUB_KEY, Gateway, create_app
from dispatcher.gateway.connections import ConnectionLimit, Refusal
from dispatcher.gateway.errors import answer_of, written
from dispatcher.gateway.events import EventHub
from dispatcher.gateway.lane import DRAIN_IDLE_SECONDS, CallLanes
from dispatcher.gateway.listener import Listener
from dispatcher.gateway.protocol import GatewayProtocol
from dispatcher.gateway.settings import GatewaySettings
from dispatcher.gateway.tls import CertificateReload, tls_context
from dispatcher.identity import Authenticator
from dispatcher.telemetry.metrics import ConnectionsCollector
from linchkit_plugin.errors import Overloaded

if TYPE_CHECKING:
    from dispatcher.gateway.grpc_gateway import GrpcGateway

__all__ = ["CertificateReload", "GatewayServer", "descriptors_short", "server_ssl_context"]

log = logging.getLogger("dispatcher.gateway")

#: Once a drain has ended the calls in flight, how long their answers may take to go out.
_SHUTDOWN_SECONDS = 2.0
#: Connections the kernel queues before ``accept`` (aiohttp's ``TCPSite`` default).
_BACKLOG = 128
#: How often a stop looks whether aiohttp's connections have all closed.
_POLL_SECONDS = 0.05
#: File descriptors the process needs besides its ports' connections (plugins, their
#: connections, Redis, OTLP, the audit log, files) when it warns about RLIMIT_NOFILE.
FD_RESERVE = 1024
#: What a connection refused at a limit is told (plain HTTP), by the limit.
_REFUSALS: Mapping[Refusal, str] = {
    "max_connections": "this gateway holds as many connections as it takes"
    " (max_connections): send the call again shortly, or over a connection you keep open",
    "max_connections_per_peer": "this gateway holds as many connections from your address"
    " as it takes from one (max_connections_per_peer): send calls over the connections"
    " you have open, or close some",
}


def _refusal_answer(refusal: Refusal) -> bytes:
    error = Overloaded(
        _REFUSALS[refusal], retry_after=1.0, details={"stage": "refused", "limit": refusal}
    )
    return written(answer_of(error, close=True), close=True)


def descriptors_short(settings: GatewaySettings, limit: int, open_now: int) -> str | None:
    """Why RLIMIT_NOFILE ``limit`` cannot hold the ports' ``max_connections`` beside the
    ``open_now`` descriptors and ``FD_RESERVE``, or None when it can."""
    ports = 1 if settings.grpc_port is None else 2
    needed = settings.max_connections * ports + open_now + FD_RESERVE
    if limit == resource.RLIM_INFINITY or needed <= limit:
        return None
    return (
        f"RLIMIT_NOFILE is {limit}, but max_connections {settings.max_connections} on"
        f" {ports} port(s), with the {open_now} descriptors open now and {FD_RESERVE} kept"
        f" for the dispatcher's own connections and files, need {needed}: the process"
        " would run out of file descriptors before the ports reach their limit (new"
        " connections then wait in the kernel's backlog, and the dispatcher's own"
        " connections to plugins fail). Raise it (systemd LimitNOFILE=, ulimit -n) or"
        " lower gateway.max_connections"
    )


def _warn_if_descriptors_short(settings: GatewaySettings) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: the reserve alone
        open_now = 0
    short = descriptors_short(settings, soft, open_now)
    if short is not None:
        log.warning("%s", short)


def server_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The TLS context ``settings`` ask for, or ``None`` for plain HTTP."""
    tls = settings.server_tls
    return None if tls is None else tls_context(tls)


class GatewayServer:
    """The gateway listening on ``settings.host:port`` over a started dispatcher.

    An async context manager: entering listens, leaving stops listening, lets answers in
    progress end (briefly: drain the dispatcher first for a graceful stop), closes every
    connection and WebSocket, and ends the certificate watch.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        settings: GatewaySettings | None = None,
        *,
        authenticator: Authenticator | None = None,
        access_log: bool = False,
    ) -> None:
        self.dispatcher = dispatcher
        self.settings = settings or GatewaySettings()
        self._authenticator = authenticator
        self._access_log = access_log
        self._runner: web.AppRunner | None = None
        self._listening: Listener | None = None
        #: The HTTP port's open connections against ``max_connections`` and per peer.
        self.connections = ConnectionLimit(
            "HTTP",
            most=self.settings.max_connections,
            most_per_peer=self.settings.connections_per_peer,
        )
        self._collector: ConnectionsCollector | None = None
        #: The call lanes of the connections (None with ``access_log``: aiohttp logs).
        self.lanes: CallLanes | None = None
        self._reload: CertificateReload | None = None
        self._watch: asyncio.Task[None] | None = None
        self.hub: EventHub | None = None
        #: The gRPC port, when ``settings.grpc_port`` asks for one.
        self.grpc: GrpcGateway | None = None
        #: ``/metrics``, ``/healthz``, ``/readyz`` where ``telemetry.metrics.listen`` says.
        self.admin: AdminPort | None = None
        #: Stopping: every answer aiohttp writes closes its connection.
        self._closing = False

    async def start(self) -> None:
        settings = self.settings
        server_tls = settings.server_tls
        reload = CertificateReload(server_tls) if server_tls is not None else None
        context = None if reload is None else reload.listening
        app = create_app(self.dispatcher, settings, authenticator=self._authenticator)
        # Before anything listens: it reads the scrape token, which may be missing.
        admin = self._admin_port(app[GATEWAY_KEY])
        app.on_response_prepare.append(self._closing_after_answer)
        self.hub = app[HUB_KEY]
        protocol_options = {
            "access_log": logging.getLogger("aiohttp.access") if self._access_log else None,
            "keepalive_timeout": settings.header_timeout,
            # A body left unread (refused before or while reading it) is not read to its
            # end, which may never come: the connection closes after the answer instead.
            "lingering_time": 0,
            **HANDLER_ARGS,
        }
        runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=_SHUTDOWN_SECONDS, **protocol_options
        )
        await runner.setup()
        self._runner = runner
        assert runner.server is not None
        loop = asyncio.get_running_loop()
        # aiohttp's protocol for the app, with the gateway's answers to requests aiohttp
        # answers by itself (dispatcher.gateway.protocol), on every connection it serves.
        protocols = partial(GatewayProtocol, runner.server, loop=loop, **protocol_options)
        if settings.call_lane and not self._access_log:
            self.lanes = CallLanes(app[GATEWAY_KEY], settings, protocols)
        _warn_if_descriptors_short(settings)
        listener = self._listening = Listener(
            self.connections,
            self.lanes or protocols,
            ssl_context=context,
            handshake_timeout=settings.header_timeout,
            refusal_answer=_refusal_answer,
            backlog=_BACKLOG,
        )
        try:
            await listener.start(settings.host, settings.port)
        except BaseException:
            await self.aclose()
            raise
        telemetry = self.dispatcher.telemetry
        if telemetry is not None and telemetry.metrics is not None:
            self._collector = ConnectionsCollector(self.connection_stats)
            telemetry.metrics.registry.register(self._collector)
        if reload is not None:
            self._reload = reload
            self._watch = asyncio.create_task(reload.watch(settings.cert_check_interval))
        if settings.grpc_port is not None:
            # Here, not at the top: an HTTP-only gateway never loads grpcio.
            from dispatcher.gateway.grpc_gateway import GrpcGateway

            self.grpc = GrpcGateway(self.dispatcher, settings, authenticator=self._authenticator)
            try:
                await self.grpc.start()
            except BaseException:
                await self.aclose()
                raise
        if admin is not None:  # last: ready there once the gateway's ports listen
            self.admin = admin
            try:
                await admin.start()
            except BaseException:
                await self.aclose()
                raise

    def _admin_port(self, gateway: Gateway) -> AdminPort | None:
        """The admin listener ``telemetry.metrics.listen`` asks for, not started yet."""
        telemetry = self.dispatcher.telemetry
        if telemetry is None or telemetry.metrics is None:
            return None
        metrics = telemetry.settings.metrics
        if metrics.listen is None:
            return None
        return AdminPort(
            gateway,
            telemetry.metrics.registry,
            metrics,
            header_timeout=self.settings.header_timeout,
            cert_check_interval=self.settings.cert_check_interval,
            gateway_tls=self.settings.tls,
        )

    def reload_certificates(self) -> bool:
        """Load the certificate files again now (SIGHUP), the gateway's and the admin
        port's; True if a new pair was loaded for either."""
        gateway = self._reload.check(force=True) if self._reload is not None else False
        admin = self.admin.reload_certificates() if self.admin is not None else False
        return gateway or admin

    def connection_stats(self) -> dict[str, dict[str, Any]]:
        """Each port's open connections, limits and refusals (the metrics read it): the
        HTTP port's as counted here, the gRPC port's as grpc reports them."""
        stats = {"http": self.connections.stats()}
        if self.grpc is not None:
            stats["grpc"] = self.grpc.connection_stats()
        if self.admin is not None:
            stats["admin"] = self.admin.connections.stats()
        return stats

    @property
    def url(self) -> str:
        """The base URL of the first address listened on (the real port when given 0)."""
        assert self._listening is not None, "start() first"
        host, port = self._listening.sockets[0].getsockname()[:2]
        scheme = "https" if self.settings.tls else "http"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{port}"

    async def aclose(self) -> None:
        if self._collector is not None:
            telemetry = self.dispatcher.telemetry
            if telemetry is not None and telemetry.metrics is not None:
                telemetry.metrics.registry.unregister(self._collector)
            self._collector = None
        if self.grpc is not None:
            grpc_port, self.grpc = self.grpc, None
            await grpc_port.aclose(_SHUTDOWN_SECONDS)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._listening is not None:
            # No new connections (a client's connect is refused); handshakes under way end.
            await self._listening.aclose()
        # Both kinds of connection wind down at once: each closes after its next answer,
        # one left idle soon after (``DRAIN_IDLE_SECONDS``; the lane's docstring says why).
        closing = [self._close_aiohttp()]
        if self.lanes is not None:
            closing.append(self.lanes.aclose(_SHUTDOWN_SECONDS))
        await asyncio.gather(*closing)
        self._listening = None
        if self.admin is not None:
            # Last: scrapers and probes read it while the gateway's ports wind down.
            admin, self.admin = self.admin, None
            await admin.aclose()

    async def _close_aiohttp(self) -> None:
        """aiohttp's connections: answers say ``Connection: close`` from now on; those
        still open after ``DRAIN_IDLE_SECONDS`` are closed with its WebSockets and streams."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        self._closing = True
        server = runner.server
        loop = asyncio.get_running_loop()
        until = loop.time() + DRAIN_IDLE_SECONDS
        # aiohttp has no event for its last connection closing: polled.
        while server is not None and server.connections and loop.time() < until:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_SECONDS)
        if self.lanes is not None:
            self.lanes.elsewhere_open = False
        await runner.cleanup()

    async def _closing_after_answer(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        """While the gateway stops, an answer aiohttp writes says ``Connection: close`` and
        its connection closes after it: the client's next call opens a new connection,
        which the closed listener refuses (a call it knows was never sent), instead of
        being written on one the gateway is about to close. A WebSocket's upgrade is left
        as it is."""
        if self._closing and response.status != 101:
            response.force_close()
            response.headers["Connection"] = "close"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        where = self.url if self._listening is not None else "not listening"
        return f"<GatewayServer {where} {self.connections!r} {self.hub!r}>"
