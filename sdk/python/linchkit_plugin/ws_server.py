"""A plugin over WebSocket: serve it (the dispatcher dials in) or dial the dispatcher's
gateway (reverse mode), with the frames of ``linchkit_plugin.ws_protocol``.

One ``PluginSession`` serves one connection either way: it sends ``hello``, runs each
``call`` and ``stream`` frame as a task of its own (at most ``max_in_flight`` at once;
beyond that it stops reading, so TCP pushes back on the host instead of this process
buffering), cancels a task on ``cancel``, answers ``health``, hands ``event`` frames to the
plugin's ``on_event`` and sends the plugin's events.

Events the plugin emits while no host is connected wait in a bounded ``EventOutbox``
(the oldest dropped beyond ``max_buffered_events``) and go out when a host connects,
followed by a ``dropped`` frame with the count lost, if any.

Stopping loses no call: the plugin sends ``goaway`` on each connection (and stops taking
new ones), goes on answering whatever arrives, and the host closes the connection once
its calls are answered; after the stop's grace (``GOAWAY_GRACE``, 5 s, unless
``LINCHKIT_PLUGIN_STOP_GRACE_MS`` sets it) the plugin closes it itself.

Reverse mode (``dial``) reconnects after every drop with exponential backoff and full
jitter; a refusal is not retried: at the upgrade (400, 401, 403, 404: a malformed id or version, wrong token, another
plugin's id, no such inbound plugin), or a close 4403 after it (the ``hello`` names another
id or version than the one admitted, or a protocol the gateway does not speak). ``Refused``
says which.

aiohttp is the ``websocket`` extra: ``pip install 'linchkit-plugin[websocket]'``.

Where its parts live: one connection (``PluginSession``) in ``_ws_session``, the events
waiting for a host (``EventOutbox``) in ``_ws_events``, reverse mode (``dial``) in
``_ws_dial``. This module holds the server the dispatcher dials and the executable's
WebSocket modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from linchkit_plugin._connect_tls import ConnectTls, ConnectTlsError
from linchkit_plugin._log_setup import log_to_stderr
from linchkit_plugin._registry_options import websocket_refusal
from linchkit_plugin._starting import StartFailed, open_plugin
from linchkit_plugin._ws_dial import Refused, dial
from linchkit_plugin._ws_events import EventOutbox
from linchkit_plugin._ws_send_cap import cap_of_header
from linchkit_plugin._ws_session import PluginSession, hello_of
from linchkit_plugin._ws_waiting import HEADER_TIMEOUT, MAX_WAITING, WaitingConnections
from linchkit_plugin.auth import BearerToken
from linchkit_plugin.errors import InvalidParams, Overloaded, Unauthorized
from linchkit_plugin.host import PluginHost
from linchkit_plugin.listen import address_mistake, host_and_port
from linchkit_plugin.stopping import StopCaps
from linchkit_plugin.tracing import exporting
from linchkit_plugin.wire import error_response
from linchkit_plugin.ws_protocol import (
    CLOSE_GOING_AWAY,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES_HEADER,
)

# isort: split
# Importable from here as before: names this module defined or used before its parts
# moved to the modules above.
from linchkit_plugin._ws_dial import checked_gateway_url as checked_gateway_url
from linchkit_plugin._ws_session import Socket as Socket
from linchkit_plugin.errors import DeadlineExceeded as DeadlineExceeded
from linchkit_plugin.errors import DispatchError as DispatchError
from linchkit_plugin.errors import ProviderError as ProviderError
from linchkit_plugin.wire import ok_response as ok_response
from linchkit_plugin.wire import parse_request as parse_request
from linchkit_plugin.ws_protocol import PLUGIN_ID_HEADER as PLUGIN_ID_HEADER
from linchkit_plugin.ws_protocol import PLUGIN_VERSION_HEADER as PLUGIN_VERSION_HEADER
from linchkit_plugin.ws_protocol import STREAM_WINDOW as STREAM_WINDOW
from linchkit_plugin.ws_protocol import FrameError as FrameError
from linchkit_plugin.ws_protocol import decode_frame as decode_frame
from linchkit_plugin.ws_protocol import encode_frame as encode_frame
from linchkit_plugin.ws_protocol import error_frame as error_frame
from linchkit_plugin.ws_protocol import hello_frame as hello_frame

__all__ = [
    "EventOutbox",
    "PluginSession",
    "Refused",
    "WebSocketPluginServer",
    "dial",
    "stop_on_signals",
]

log = logging.getLogger("linchkit_plugin.websocket")


class WebSocketPluginServer:
    """The plugin served at ``/`` (any path) as a WebSocket: the dispatcher dials in.

    The plugin's ``init``/``start`` run when the server starts (one that fails: ``start``
    raises ``StartFailed``), ``stop``/``destroy`` when it stops, as the HTTP server does. With a token, the upgrade needs
    ``Authorization: Bearer <token>``, once, and is otherwise answered 401 before it upgrades.
    ``max_connections``: connections served at once (1000, as ``dispatcher-plugin serve``
    holds its HTTP ones); past them an upgrade is refused 503 (``overloaded``,
    ``Retry-After: 1``) before it upgrades, and a dispatcher dials again.
    Connections that have not asked for an upgrade count too: at most ``max_waiting``
    (100) wait for their head at once, the oldest closed to make room for a new one (so a
    flood of idle sockets cannot keep a dispatcher out), and a head must be complete within
    ``header_timeout`` (10 s, as ``dispatcher-plugin serve``'s ``--header-timeout``) of the
    connection's opening. Every answer that is not an upgrade closes its connection.
    ``stop_caps``: how long a stop gives the host to finish its calls after ``goaway``,
    then the hooks (default 5 s each; the executables read ``LINCHKIT_PLUGIN_STOP_GRACE_MS``
    and ``_STOP_HOOKS_MS``: ``linchkit_plugin.stopping``).
    """

    def __init__(
        self,
        host: PluginHost,
        *,
        config: dict[str, Any] | None = None,
        token: BearerToken | None = None,
        plugin_id: str = "",
        version: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        heartbeat: float = DEFAULT_HEARTBEAT,
        max_in_flight: int = 1024,
        max_buffered_events: int = 1000,
        max_connections: int = 1000,
        max_waiting: int = MAX_WAITING,
        header_timeout: float = HEADER_TIMEOUT,
        stop_caps: StopCaps | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if not header_timeout > 0:
            raise ValueError(
                f"header_timeout must be a positive number of seconds, not {header_timeout}"
            )
        self.host = host
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.waiting = WaitingConnections(max_waiting)
        #: Connections upgraded or upgrading now: counted before the upgrade's first await,
        #: so upgrades arriving together cannot pass the cap between its check and the count.
        self._connections = 0
        self.refused = 0
        self.config = config or {}
        self.stop_caps = stop_caps or StopCaps()
        self.token = token
        self.max_message_bytes = max_message_bytes
        self.heartbeat = heartbeat
        self.max_in_flight = max_in_flight
        self.outbox = EventOutbox(max_buffered_events)
        host_emit: Callable[[str, Any], None] = self.outbox.emit
        if hasattr(host.plugin, "emit"):
            host.plugin._emit = host_emit
        plugin_id, version = host.identity(plugin_id, version)
        host.plugin_id = plugin_id  # the id the calls' spans name
        self.hello = hello_of(host, plugin_id, version, max_message_bytes)
        self.sessions: set[PluginSession] = set()
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        # Every method, so that the token is checked first: a route for GET alone answered
        # a POST 405 before it, telling a peer without the token what it takes.
        app.router.add_route("*", "/{tail:.*}", self._connect)
        app.on_startup.append(self._open)
        app.on_shutdown.append(self._going_away)
        app.on_cleanup.append(self._close)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Run the plugin's ``init``/``start`` and listen; return ``ws://host:port``.

        ``StartFailed`` when a hook failed, or when it cannot listen at ``host:port`` (the
        port taken, by the plugin's own hooks too, or not an address of this machine): the
        hooks had run by then, so their ``stop``/``destroy`` run before it is raised, as
        after serving. Until 2026-12-07 that was the event loop's ``OSError``, a traceback
        under ``dispatcher-plugin serve --websocket``, and the hooks never stopped."""
        self._runner = web.AppRunner(
            self.app(),
            handle_signals=False,
            access_log=None,
            # Armed when a connection opens: one whose head is not complete by then is
            # closed (an idle socket, a slowloris head). Every other answer closes its
            # connection, and an upgraded one is the session's: no keep-alive to time.
            keepalive_timeout=self.header_timeout,
        )
        await self._runner.setup()
        assert self._runner.server is not None  # set up just above
        self.waiting.watch(self._runner.server)
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as error:
            await self.aclose()  # nothing listens: the stop and destroy hooks run at once
            where = _host_and_port(host, port)
            raise StartFailed(f"cannot listen on {where}: {_why(error)}") from error
        bound = self._runner.addresses[0]
        host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]  # IPv6: host:port needs brackets
        return f"ws://{host}:{bound[1]}"

    async def aclose(self, grace: float | None = None) -> None:
        """Stop: take no new connection, say ``goaway`` on each open one and let the host
        finish its calls there (at most ``grace`` seconds, default ``stop_caps.grace``),
        then close what is left."""
        grace = self.stop_caps.grace if grace is None else grace
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()  # the listener closes: a host redialling is refused
        await asyncio.gather(*(session.go_away(grace) for session in tuple(self.sessions)))
        await runner.cleanup()

    async def _open(self, app: web.Application) -> None:
        await open_plugin(self.host, self.config)  # a failure: StartFailed, out of start()

    async def _close(self, app: web.Application) -> None:
        await self.host.close_within(self.stop_caps.hooks)

    async def _going_away(self, app: web.Application) -> None:
        await asyncio.gather(
            *(s.socket.close(code=CLOSE_GOING_AWAY) for s in tuple(self.sessions)),
            return_exceptions=True,
        )

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        self.waiting.taken(request.protocol)
        answer = await self._answer(request)
        if not isinstance(answer, web.WebSocketResponse):
            # Not upgraded: the connection ends with the answer. Kept alive it could wait
            # for another head, uncounted (and the peer learnt all it may already).
            answer.force_close()
        return answer

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if self.token is not None:
            # Every Authorization header, not the first: two are refused (admits_headers).
            authorization = request.headers.getall("Authorization", [])
            if not self.token.admits_headers([value.encode() for value in authorization]):
                body = error_response(Unauthorized("missing or wrong bearer token"))
                return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
        socket = web.WebSocketResponse(
            heartbeat=self.heartbeat,
            max_msg_size=self.max_message_bytes,
            # permessage-deflate accepted when the dispatcher offers it (a target with
            # ``compress: true``), declined when it does not: the manifest decides. Inflated
            # up to max_msg_size only (aiohttp stops there and closes 1009): no bomb.
            compress=True,
            decode_text=False,
        )
        if not socket.can_prepare(request).ok:
            return web.json_response(
                error_response(InvalidParams("this plugin speaks WebSocket: send an upgrade")),
                status=426,
            )
        if self._connections >= self.max_connections:
            return self._refuse_past_the_cap()
        self._connections += 1
        try:
            await socket.prepare(request)
            session = PluginSession(
                self.host,
                socket,
                self.outbox,
                hello=self.hello,
                max_in_flight=self.max_in_flight,
                heartbeat=self.heartbeat,
                max_message_bytes=self.max_message_bytes,
                # The dispatcher's read cap: no frame over it is sent.
                host_cap=cap_of_header(request.headers.getall(MAX_MESSAGE_BYTES_HEADER, [])),
            )
            self.sessions.add(session)
            try:
                await session.run()
            finally:
                self.sessions.discard(session)
        finally:
            self._connections -= 1
        return socket

    def _refuse_past_the_cap(self) -> web.Response:
        self.refused += 1
        if self.refused == 1:  # once: a flood would otherwise write a line per upgrade
            log.warning(
                "serving %d WebSocket connections, the most it takes; refusing more with 503"
                " until one closes",
                self.max_connections,
            )
        refusal = Overloaded(
            f"this plugin holds as many WebSocket connections as it takes"
            f" ({self.max_connections}): dial again shortly",
            retry_after=1.0,
        )
        return web.json_response(error_response(refusal), status=503, headers={"Retry-After": "1"})

    def __repr__(self) -> str:
        return (
            f"<WebSocketPluginServer connections={self._connections}/{self.max_connections}"
            f" refused={self.refused} {self.waiting!r} token={self.token is not None}>"
        )


def _host_and_port(host: str, port: int) -> str:
    """``host:port`` as an operator writes it, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(error: OSError) -> str:
    """Why the socket layer refused, in its words (``Address already in use``): the event
    loop's own text wraps them in the address it could not bind, which the line says."""
    if error.errno is not None and not isinstance(error, socket.gaierror):
        return os.strerror(error.errno)
    return str(error.strerror or error)  # a name that does not resolve: the resolver's words


def stop_on_signals(stopping: asyncio.Event) -> None:
    """Set ``stopping`` on SIGTERM or SIGINT (where the loop can watch signals)."""
    loop = asyncio.get_running_loop()
    for each in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(each, stopping.set)


def main(
    plugin_class: type[Any],
    argv: list[str],
    *,
    plugin_id: str,
    version: str,
) -> int | None:
    """A plugin executable's WebSocket modes, or None when ``argv`` asks for neither:

    * ``serve --websocket [--address HOST:PORT] [--config JSON]``: serve; prints one line
      ``1|1|tcp|HOST:PORT|websocket|`` once listening (as the gRPC service mode does);
    * ``connect --url URL [--config JSON] [--ca-file PEM] [--cert-file PEM --key-file PEM]``:
      reverse mode, dialling the gateway; the TLS files as ``dispatcher-plugin connect``
      takes them, or from ``LINCHKIT_PLUGIN_GATEWAY_CA``, ``_CLIENT_CERT`` and
      ``_CLIENT_KEY`` (``linchkit_plugin._connect_tls``).

    The token comes from ``LINCHKIT_PLUGIN_TOKEN_FILE`` or ``LINCHKIT_PLUGIN_TOKEN``: for
    ``serve``, the one callers must present; for ``connect``, the one it presents. How
    long a stop waits comes from ``LINCHKIT_PLUGIN_STOP_GRACE_MS`` and ``_STOP_HOOKS_MS``
    (``linchkit_plugin.stopping``).
    """
    import sys

    import orjson

    from linchkit_plugin.argument_parser import RedactingArgumentParser
    from linchkit_plugin.auth import TOKEN_ENV, TOKEN_FILE_ENV, TokenError

    if not argv or argv[0] not in ("serve", "connect"):
        return None
    if argv[0] == "serve" and "--websocket" not in argv:
        return None
    # Refuses without quoting a value: a token may sit in a mistyped option. Each mode
    # takes its own flags only: one of the other's is refused, not dropped.
    parser = RedactingArgumentParser(
        prog=f"{os.path.basename(sys.argv[0])} {argv[0]}", first_position=2
    )
    if argv[0] == "serve":
        parser.add_argument("--websocket", action="store_true")
        parser.add_argument("--address", default="127.0.0.1:0")
    else:
        parser.add_argument("--url")
        # As ``dispatcher-plugin connect``'s (linchkit_plugin._connect_tls).
        parser.add_argument("--ca-file")
        parser.add_argument("--cert-file")
        parser.add_argument("--key-file")
    parser.add_argument("--config", default="{}")
    options = parser.parse_args(argv[1:])
    # As the gRPC executable's lines are; a dialling plugin's connection lines too.
    log_to_stderr(info_from="linchkit_plugin.websocket" if argv[0] == "connect" else None)
    try:
        token = BearerToken.configured(os.environ.get(TOKEN_FILE_ENV) or None)
        stop_caps = StopCaps.from_environment()
    except (TokenError, ValueError) as error:
        sys.stderr.write(f"{argv[0]}: {error}\n")
        return 1
    # Named, its text never repeated (a config may hold a secret), as Go's and Rust's say
    # it; before 2026-12-06 orjson's message alone, and an array passed on to init().
    try:
        config = orjson.loads(options.config)
    except orjson.JSONDecodeError:
        sys.stderr.write(f"{argv[0]}: --config is not valid JSON\n")
        return 1
    if not isinstance(config, dict):
        sys.stderr.write(f"{argv[0]}: --config must be a JSON object\n")
        return 1
    host = PluginHost(plugin_class(), owns_process=True)
    if argv[0] == "connect":
        if not options.url:
            sys.stderr.write("connect: --url is required\n")
            return 1
        try:
            checked_gateway_url(options.url)
        except ValueError as error:
            sys.stderr.write(f"connect: {error}\n")
            return 1
        refusal = websocket_refusal(None, dialling=True)
        if refusal is not None:
            sys.stderr.write(f"connect: {refusal}\n")
            return 1
        try:  # checked before the plugin's hooks run, as the URL is
            context = ConnectTls.configured(
                options.ca_file, options.cert_file, options.key_file
            ).context(options.url)
        except ConnectTlsError as error:
            sys.stderr.write(f"connect: {error}\n")
            return 1

        async def connect() -> None:
            stopping = asyncio.Event()
            stop_on_signals(stopping)
            await dial(
                host,
                options.url,
                plugin_id=plugin_id,
                version=version,
                token=token.secret() if token is not None else None,
                config=config,
                ssl=context,
                stopping=stopping,
                stop_caps=stop_caps,
            )

        # OTEL_* variables: spans of traced calls go to their collector.
        with exporting(lambda: host.hooks_left, plugin_id=plugin_id, version=version):
            try:
                asyncio.run(connect())
            except Refused as refused:
                sys.stderr.write(f"connect: {refused}\n")
                return 1
            except KeyboardInterrupt:
                return 0
        return 0

    where = host_and_port(options.address)
    if where is None:
        sys.stderr.write(address_mistake(options.address) + "\n")
        return 1
    refusal = websocket_refusal(None)  # LINCHKIT_REGISTER_ETCD, meant for the gRPC service
    if refusal is not None:
        sys.stderr.write(f"serve: {refusal}\n")
        return 1

    async def serve() -> int:
        # Signals watched before the handshake line says it serves: a host or supervisor
        # may stop it the moment it reads that line, and a SIGTERM before the handlers
        # ended it by the default action, its stop hooks never run.
        stop = asyncio.Event()
        stop_on_signals(stop)
        server = WebSocketPluginServer(
            host,
            config=config,
            token=token,
            plugin_id=plugin_id,
            version=version,
            stop_caps=stop_caps,
        )
        try:
            url = await server.start(*where)
        except StartFailed as failed:  # a hook's failure, or the address: stopped already
            sys.stderr.write(f"serve: {failed}\n")
            return 1
        if token is None:  # as the gRPC service mode and `dispatcher-plugin serve` say it
            sys.stderr.write(
                f"linchkit plugin: warning: no bearer token configured ({TOKEN_FILE_ENV} or"
                f" {TOKEN_ENV}): anybody who can reach {url} can call this plugin\n"
            )
            sys.stderr.flush()
        print(f"1|1|tcp|{url.removeprefix('ws://')}|websocket|", flush=True)
        try:
            await stop.wait()
        finally:
            await server.aclose()
        return 0

    with exporting(lambda: host.hooks_left, plugin_id=plugin_id, version=version):
        return asyncio.run(serve())
