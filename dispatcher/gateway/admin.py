"""The admin listener: ``/metrics``, ``/healthz`` and ``/readyz`` on an address of their
own (``telemetry.metrics.listen``), so that the gateway's port, open to callers, no
longer tells anyone the plugins, methods and error types its metrics are labelled with.

    GET /metrics    the exposition (``dispatcher.gateway.scrape``: with ``token_env`` or
                    ``token_file``, to the holder of its token only)
    GET /healthz    the process answers (the gateway's own handler)
    GET /readyz     the dispatcher takes calls, 503 while it drains (the gateway's own)
    anything else   404 ``invalid_params`` in the gateway's envelope

The gateway's port keeps ``/healthz`` and ``/readyz`` (load balancers probe it) and
answers ``/metrics`` 404, as any route it does not have. ``GatewayServer`` starts this
listener after its own ports and closes it after them, so that while the gateway drains,
scrapers still read it and ``/readyz`` answers 503 here as there.

It is HTTP read by aiohttp through the gateway's protocol (what aiohttp answers by itself
comes in the envelope, quoting nothing a client sent), no call lane; over TLS with
``telemetry.metrics.tls``, the gateway's model and code (``dispatcher.gateway.tls``):
client certificates none, optional or required, the files reloaded when they change
(every ``cert_check_interval``, and on SIGHUP with the gateway's). It accepts for itself
as the gateway's port does (``dispatcher.gateway.listener``), with the gateway's
``header_timeout`` (a TLS handshake, a head that never completes, a connection idle
between scrapes) and a connection limit of its own, fixed and small:
``ADMIN_MAX_CONNECTIONS``.

An admin port in clear beside a gateway serving TLS is warned of once at start, unless it
listens on a loopback address (a scraper on the same host, a sidecar): the gateway's TLS
says the network between callers and it is not trusted, and the scrape token, the
metrics and the probes would cross it in clear (``admin_in_clear``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from functools import partial

from aiohttp import web
from prometheus_client import CollectorRegistry

from dispatcher.config.telemetry import MetricsSettings
from dispatcher.gateway.app import HANDLER_ARGS, Gateway
from dispatcher.gateway.connections import ConnectionLimit, Refusal
from dispatcher.gateway.errors import answer_of, error_answer, written
from dispatcher.gateway.listener import Listener
from dispatcher.gateway.protocol import GatewayProtocol
from dispatcher.gateway.scrape import metrics_route, scrape_token
from dispatcher.gateway.tls import CertificateReload, ServerTls
from linchkit_plugin.errors import InvalidParams, Overloaded

__all__ = ["ADMIN_MAX_CONNECTIONS", "ADMIN_MAX_CONNECTIONS_PER_PEER", "AdminPort", "admin_in_clear"]

log = logging.getLogger("dispatcher.gateway")

#: Connections the admin port holds at once. Its clients are a few scrapers and probes
#: (a pair of Prometheus servers, the kubelet or a load balancer's health checks, a
#: ``dispatcher top`` or two), each keeping one connection: 64 is far above what they
#: need, and bounds what a process on the private network can take of the descriptors
#: and memory the gateway's own ports need (64 connections, well within the 1,024
#: descriptors the gateway keeps for itself: ``dispatcher.gateway.server.FD_RESERVE``).
#: Fixed rather than a setting: nobody has a reason to change it.
ADMIN_MAX_CONNECTIONS = 64
#: Connections one peer address may hold here: a quarter, so that one client gone wrong
#: (a scraper leaking connections) leaves room for the others, and the probes still pass.
ADMIN_MAX_CONNECTIONS_PER_PEER = 16
#: How long answers in progress may take to go out when the port closes.
_SHUTDOWN_SECONDS = 2.0


def admin_in_clear(host: str, *, gateway_tls: bool, admin_tls: bool) -> bool:
    """Whether an admin port on ``host`` is worth a warning: in clear, beside a gateway
    serving TLS, on an address other hosts reach (not loopback)."""
    if admin_tls or not gateway_tls:
        return False
    if host.lower().rstrip(".") == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return True


def _refusal_answer(refusal: Refusal) -> bytes:
    most = ADMIN_MAX_CONNECTIONS if refusal == "max_connections" else ADMIN_MAX_CONNECTIONS_PER_PEER
    whose = "" if refusal == "max_connections" else " from your address"
    error = Overloaded(
        f"this admin port holds {most} connections{whose} at most: scrape and probe over"
        " a connection you keep open, or close some",
        retry_after=1.0,
        details={"stage": "refused", "limit": refusal},
    )
    return written(answer_of(error, close=True), close=True)


async def _no_route(request: web.Request) -> web.Response:
    missing = InvalidParams(
        f"no route {request.method:.16} {request.path[:200]}: this port serves"
        " GET /metrics, /healthz and /readyz"
    )
    return error_answer(missing, status=404, close=request.body_exists)


class AdminPort:
    """``/metrics``, ``/healthz``, ``/readyz`` on ``settings.listen``: ``start`` listens,
    ``aclose`` stops. Made before anything listens, since it reads the scrape token
    (``TelemetryEnvironmentError`` naming ``token_env``'s variable, or ``TokenFileError``
    naming ``token_file``, if it cannot) and loads the TLS files (``OSError``,
    ``ssl.SSLError``). ``gateway_tls``: whether the gateway's port serves TLS (an admin
    port in clear beside it is warned of)."""

    def __init__(
        self,
        gateway: Gateway,
        registry: CollectorRegistry,
        settings: MetricsSettings,
        *,
        header_timeout: float,
        cert_check_interval: float = 5.0,
        gateway_tls: bool = False,
    ) -> None:
        address = settings.listen_at
        if settings.listen is None or address is None:
            raise ValueError("an admin port listens where telemetry.metrics.listen says: unset")
        #: Where it listens, as the manifest writes it (``HOST:PORT``).
        self.listen = settings.listen
        self._address = address
        self._gateway = gateway
        self._registry = registry
        self._token = scrape_token(settings)
        self._header_timeout = header_timeout
        self._reload = (
            None
            if settings.tls is None
            else CertificateReload(ServerTls.from_config(settings.tls, port="admin"))
        )
        self._cert_check_interval = cert_check_interval
        self._watch: asyncio.Task[None] | None = None
        self._gateway_tls = gateway_tls
        self.connections = ConnectionLimit(
            "admin", most=ADMIN_MAX_CONNECTIONS, most_per_peer=ADMIN_MAX_CONNECTIONS_PER_PEER
        )
        self._runner: web.AppRunner | None = None
        self._listening: Listener | None = None

    def _app(self) -> web.Application:
        app = web.Application(handler_args=HANDLER_ARGS)
        app.router.add_get("/metrics", metrics_route(self._registry, self._token))
        app.router.add_get("/healthz", self._gateway.healthz)
        app.router.add_get("/readyz", self._gateway.readyz)
        app.router.add_route("*", "/{tail:.*}", _no_route)
        return app

    async def start(self) -> None:
        """Listen on ``listen``; an ``OSError`` naming it when that cannot be (the port
        is taken, the host is not this machine's)."""
        protocol_options = {
            "access_log": None,
            "keepalive_timeout": self._header_timeout,
            "lingering_time": 0,  # a body nobody reads is not waited for: closed instead
            **HANDLER_ARGS,
        }
        runner = self._runner = web.AppRunner(
            self._app(),
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_SECONDS,
            **protocol_options,
        )
        await runner.setup()
        assert runner.server is not None
        protocols = partial(
            GatewayProtocol, runner.server, loop=asyncio.get_running_loop(), **protocol_options
        )
        self._listening = Listener(
            self.connections,
            protocols,
            ssl_context=None if self._reload is None else self._reload.listening,
            handshake_timeout=self._header_timeout,
            refusal_answer=_refusal_answer,
            backlog=ADMIN_MAX_CONNECTIONS,
        )
        host, port = self._address
        try:
            await self._listening.start(host, port)
        except OSError as error:
            await self.aclose()
            reason = error.strerror or str(error)
            if isinstance(error, socket.gaierror):
                reason = f"cannot resolve {host}: {reason}"
            raise OSError(
                error.errno, f"cannot serve telemetry.metrics.listen {self.listen}: {reason}"
            ) from None
        if self._reload is not None:
            self._watch = asyncio.create_task(self._reload.watch(self._cert_check_interval))
        elif admin_in_clear(host, gateway_tls=self._gateway_tls, admin_tls=False):
            log.warning(
                "the admin port %s serves in clear while the gateway's port serves TLS:"
                " the scrape token and the metrics cross the network unencrypted; set"
                " telemetry.metrics.tls, or listen on a loopback address",
                self.listen,
            )

    def reload_certificates(self) -> bool:
        """Load the TLS files again now (SIGHUP); True if a new pair was loaded."""
        return self._reload.check(force=True) if self._reload is not None else False

    @property
    def url(self) -> str:
        """The base URL of the first address listened on (the real port when given 0)."""
        assert self._listening is not None, "start() first"
        host, port = self._listening.sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        scheme = "http" if self._reload is None else "https"
        return f"{scheme}://{shown}:{port}"

    async def aclose(self) -> None:
        """Stop listening, let answers in progress go out (briefly), close every
        connection, end the certificate watch."""
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if self._listening is not None:
            listening, self._listening = self._listening, None
            await listening.aclose()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def __repr__(self) -> str:
        where = self.url if self._listening is not None else f"{self.listen} (not listening)"
        return (
            f"<AdminPort {where} {self.connections!r} token={self._token!r} tls={self._reload!r}>"
        )
