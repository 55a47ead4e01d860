"""The gateway's WebSocket routes (``docs/gateway.md``), registered by
``dispatcher.gateway.app``:

    GET  /v1/events                              plugin events, host events (``events``)
    GET  /v1/plugins/connect                     a plugin dials in (reverse mode)

Each connection is authenticated at its upgrade and then re-checked for as long as it is
held (``dispatcher.gateway.rechecks``): an event stream with the caller's credentials, a
plugin's connection by admitting it again, closed with ``CREDENTIALS_ENDED`` once they no
longer hold. On shutdown every connection still held is told the gateway is going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web

from dispatcher._dispatcher import Dispatcher
from dispatcher._inbound import Admission
from dispatcher.gateway.credentials import credentials_of
from dispatcher.gateway.errors import error_answer
from dispatcher.gateway.events import (
    EventHub,
    EventStream,
    Filter,
    checked_event_id,
    checked_filter_version,
)
from dispatcher.gateway.rechecks import CREDENTIALS_ENDED, Rechecks
from dispatcher.gateway.settings import GatewaySettings
from dispatcher.identity import Credentials, Principal
from linchkit_plugin.errors import DispatchError, InvalidParams
from linchkit_plugin.ws_protocol import (
    CLOSE_GOING_AWAY,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES_HEADER,
    PLUGIN_ID_HEADER,
    PLUGIN_VERSION_HEADER,
)

__all__ = ["WebSocketRoutes"]

_PLUGIN_NAME = re.compile(r"^[A-Za-z0-9._@+-]{1,128}\Z")


class WebSocketRoutes:
    """The handlers of the gateway's WebSockets, and the connections they hold."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        settings: GatewaySettings,
        hub: EventHub,
        *,
        authenticate: Callable[[web.Request], Awaitable[Principal | None]],
        check: Callable[[Credentials], Awaitable[Principal | None]] | None,
    ) -> None:
        """``authenticate``: the gateway's, which raises ``Unauthorized``/``Forbidden``.
        ``check``: what its authenticator makes of credentials, to re-check an event
        stream's; None when the gateway authenticates no one."""
        self.dispatcher = dispatcher
        self.settings = settings
        self.hub = hub
        self._authenticate = authenticate
        self._check = check
        self._streams: set[EventStream] = set()
        self._plugin_sockets: set[web.WebSocketResponse] = set()
        #: The re-checks of the event streams' and plugins' credentials, one per distinct
        #: credentials however many connections hold them.
        self.rechecks = Rechecks()

    # -- events ----------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        try:
            principal = await self._authenticate(request)
            initial = _subscription_of(request)
        except DispatchError as error:
            return error_answer(error)
        ws = web.WebSocketResponse(
            heartbeat=self.settings.heartbeat, max_msg_size=self.settings.max_body_bytes
        )
        if not ws.can_prepare(request).ok:
            refusal = InvalidParams("/v1/events is a WebSocket: send the upgrade headers")
            return error_answer(refusal, status=426)
        await ws.prepare(request)
        recheck = None
        if self._check is not None:
            credentials = credentials_of(request)
            recheck = partial(
                self.rechecks.until_refused,
                ("events", *_held(credentials)),
                partial(self._check, credentials),
                expiry=_expiry_of,
            )
        stream = EventStream(ws, request, self.hub, self.dispatcher, principal, recheck)
        self._streams.add(stream)
        try:
            await stream.run(initial)
        finally:
            self._streams.discard(stream)
        return ws

    async def close_rechecks(self, app: web.Application) -> None:
        """On cleanup: end the re-checks of connections still held (their sockets are
        closed by now)."""
        await self.rechecks.aclose()

    async def close_streams(self, app: web.Application) -> None:
        """On shutdown: tell every subscriber the gateway is going away (1001), so it
        reconnects elsewhere and resumes, instead of waiting out a heartbeat; plugins
        connected in get the same and dial again (another replica, or this one back)."""
        await asyncio.gather(*(stream.going_away() for stream in tuple(self._streams)))
        await asyncio.gather(
            *(ws.close(code=CLOSE_GOING_AWAY) for ws in tuple(self._plugin_sockets)),
            return_exceptions=True,
        )

    # -- plugins dialling in -----------------------------------------------------------------

    async def connect_plugin(self, request: web.Request) -> web.StreamResponse:
        """Reverse mode: a plugin connects as an instance of its inbound target. Every
        refusal is an HTTP status before the upgrade (``dispatcher._inbound``)."""
        plugin_id = request.headers.get(PLUGIN_ID_HEADER) or request.query.get("plugin")
        version = request.headers.get(PLUGIN_VERSION_HEADER) or request.query.get("version")
        try:
            if plugin_id is None or not _PLUGIN_NAME.match(plugin_id):
                raise InvalidParams(f"say which plugin connects: the {PLUGIN_ID_HEADER} header")
            if version is not None and not _PLUGIN_NAME.match(version):
                raise InvalidParams(f"{PLUGIN_VERSION_HEADER} is not a version")
            admission = await self.dispatcher.admit_plugin(
                plugin_id, version, credentials_of(request)
            )
        except DispatchError as error:
            return error_answer(error)
        read_cap = admission.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES
        ws = web.WebSocketResponse(
            # Pinged by the heartbeat of the plugin's target, not the gateway's: the
            # provider bounds the connection's reads and writes by that one (a trickled
            # frame, a plugin that stops reading), and with two settings a plugin was
            # found gone by one while the other still kept it, or the other way round.
            # The target's, because it is the plugin's: written beside its other limits,
            # per version, and the same a dialled plugin's connection goes by. The
            # gateway's heartbeat is its event subscribers'.
            heartbeat=admission.heartbeat or self.settings.heartbeat,
            # No receive timeout (a timer per message): the channel's read watch finds a
            # plugin trickling a frame, as a dialled one's does (providers.websocket.read_watch).
            # The plugin's target's max_message_bytes, as a dialled plugin's: a message
            # over it closes the connection (1009).
            max_msg_size=read_cap,
            # The target's compress, as a dialled plugin's connection offers it or not:
            # aiohttp's default accepted permessage-deflate whenever the plugin offered it,
            # deflating every message whatever the manifest said.
            compress=admission.compress,
            decode_text=False,
        )
        # The same cap in the upgrade's answer, read by the plugin before it sends anything:
        # its welcome comes after the hello, and the events it kept while disconnected
        # go out before that (docs/protocol.md, "Message size").
        ws.headers[MAX_MESSAGE_BYTES_HEADER] = str(read_cap)
        if not ws.can_prepare(request).ok:
            refusal = InvalidParams("/v1/plugins/connect is a WebSocket: send the upgrade headers")
            return error_answer(refusal, status=426)
        await ws.prepare(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        where = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("unknown", 0)
        self._plugin_sockets.add(ws)
        watching = asyncio.create_task(
            self._watch_plugin(ws, request, plugin_id, version, admission.expires_at)
        )
        try:
            await admission.serve(ws, where)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            self._plugin_sockets.discard(ws)
        return ws

    async def _watch_plugin(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        plugin_id: str,
        version: str | None,
        expires_at: float | None,
    ) -> None:
        """Admits a plugin's connection again with the credentials it presented
        (``dispatcher.gateway.rechecks``), and closes it with ``CREDENTIALS_ENDED`` once they
        no longer admit it: a token expired, or changed in the manifest by a reload."""

        credentials = credentials_of(request)
        await self.rechecks.until_refused(
            ("plugin", plugin_id, version, *_held(credentials)),
            partial(self.dispatcher.admit_plugin, plugin_id, version, credentials),
            expires_at,
            expiry=_admission_expiry,
        )
        await ws.close(
            code=CREDENTIALS_ENDED,
            message=b"the credentials this plugin connected with no longer admit it",
        )


def _held(credentials: Credentials) -> tuple[object, ...]:
    """What a connection's credentials are, as the key its re-checks share: connections
    presenting the same ones are checked once for all."""
    return (
        credentials.authorization,
        credentials.api_key,
        credentials.certificate_subject,
        tuple(credentials.certificate_sans),
    )


def _expiry_of(principal: Principal | None) -> float | None:
    return None if principal is None else principal.expires_at


def _admission_expiry(admission: Admission) -> float | None:
    return admission.expires_at


def _subscription_of(request: web.Request) -> tuple[tuple[Filter, ...], int | None] | None:
    """A subscription the query states (``plugin``, ``event``, ``version``,
    ``last_event_id``), if any; without one, the client subscribes with its first frame."""
    query = request.query
    if not {"plugin", "event", "version", "last_event_id"} & query.keys():
        return None
    version = checked_filter_version(query.get("version"))
    return (Filter(query.get("plugin"), query.get("event"), version),), checked_event_id(
        query.get("last_event_id")
    )
