"""Reverse mode (``linchkit_plugin.ws_server.dial``): the plugin dials the dispatcher's
gateway and takes calls over that connection.

It reconnects after every drop with exponential backoff and full jitter, reset only once
the gateway welcomed the plugin. A refusal is not retried, as the same dial would get the
same answer: at the upgrade (400, 401, 403, 404: a malformed id or version, wrong token,
another plugin's id, no such
inbound plugin), or after it, a close 4403 on a ``hello`` that names another id or version
than the one admitted, or speaks a protocol version the gateway does not. ``Refused`` says which, with the gateway's reason. Every other close
is redialled, 4400 too (no ``hello`` within 10 s may be a slow link).
Stopping loses no call: the plugin says ``goaway`` and answers what the gateway still sends
until it closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from linchkit_plugin._connect_tls import refusal_of
from linchkit_plugin._masked_url import masked_url
from linchkit_plugin._ws_events import EventOutbox
from linchkit_plugin._ws_send_cap import cap_of_header
from linchkit_plugin._ws_session import PluginSession, hello_of
from linchkit_plugin.host import PluginHost
from linchkit_plugin.stopping import StopCaps
from linchkit_plugin.ws_protocol import (
    CLOSE_WRONG_PLUGIN,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES_HEADER,
    PLUGIN_ID_HEADER,
    PLUGIN_VERSION_HEADER,
    shown_close_reason,
)

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

__all__ = ["Refused", "checked_gateway_url", "dial", "masked_url"]

log = logging.getLogger("linchkit_plugin.websocket")


class Refused(Exception):
    """The gateway refused this plugin; dialling again would get the same answer.

    ``status`` is the HTTP status of a refused upgrade (400, 401, 403, 404), or the close code
    ``CLOSE_WRONG_PLUGIN`` (4403) of a connection the gateway upgraded and then closed on
    the plugin's ``hello`` (it named another id or version than the one admitted, or spoke
    a protocol version the gateway does not);
    ``reason`` is what the gateway said.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the gateway refused the connection ({status}): {message}")
        self.status = status
        self.reason = message


#: The schemes a gateway's WebSocket URL may have: aiohttp dials http(s) as ws(s), as
#: every other SDK's ``connect`` does, so a URL copied from the gateway's HTTP address works.
_GATEWAY_SCHEMES = frozenset({"ws", "wss", "http", "https"})


def checked_gateway_url(url: str) -> str:
    """``url`` if it can name a gateway; else ``ValueError``: a URL that can never reach
    one would otherwise be retried for ever, quietly. The refusal shows it masked, a
    token in its userinfo or query never said (``masked_url``), and escaped: a URL with a
    character that does not print is refused too, or each dial's line would print it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        parts = urlsplit("")
    if parts.scheme.lower() in _GATEWAY_SCHEMES and parts.hostname and url.isprintable():
        return url
    raise ValueError(
        "--url must be a ws:// or wss:// URL"
        f" (e.g. ws://127.0.0.1:8080/v1/plugins/connect), not {masked_url(url)!r}"
    )


async def dial(
    host: PluginHost,
    url: str,
    *,
    plugin_id: str,
    version: str,
    token: str | None = None,
    config: dict[str, Any] | None = None,
    ssl: Any = True,
    heartbeat: float = DEFAULT_HEARTBEAT,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_in_flight: int = 1024,
    max_buffered_events: int = 1000,
    initial_backoff: float = 0.1,
    max_backoff: float = 10.0,
    on_connected: Callable[[], Awaitable[None] | None] | None = None,
    stopping: asyncio.Event | None = None,
    stop_caps: StopCaps | None = None,
) -> None:
    """Reverse mode: dial the gateway at ``url`` (``ws[s]://…/v1/plugins/connect``) as
    ``plugin_id@version`` (empty: the plugin class's own ``id``, ``version``) and take
    calls over that connection, reconnecting after every
    drop (exponential backoff with full jitter, reset once a connection came up), until
    cancelled, or until ``stopping`` is set: then it says ``goaway``, answers the calls the
    gateway still sends until it closes the connection (at most ``stop_caps.grace``), and
    returns. Runs the plugin's lifecycle around it, the ``stop`` and ``destroy`` hooks
    within ``stop_caps.hooks`` (``stop_caps``: 5 s each by default; the executables read
    ``LINCHKIT_PLUGIN_STOP_GRACE_MS`` and ``_STOP_HOOKS_MS``). Raises ``Refused`` on a
    400/401/403/404 at the upgrade, and on a close 4403 after the ``hello``.
    """
    stopping = stopping or asyncio.Event()
    stop_caps = stop_caps or StopCaps()
    checked_gateway_url(url)
    shown = masked_url(url)
    outbox = EventOutbox(max_buffered_events)
    if hasattr(host.plugin, "emit"):
        host.plugin._emit = outbox.emit
    # One identity in the headers and the hello: an empty version named none in the
    # header (the gateway admitted the highest it serves) while the hello named the
    # plugin class's, and the gateway closed the connection 4403, for good.
    plugin_id, version = host.identity(plugin_id, version)
    host.plugin_id = plugin_id  # the id the calls' spans name
    hello = hello_of(host, plugin_id, version, max_message_bytes)
    headers = {PLUGIN_ID_HEADER: plugin_id, PLUGIN_VERSION_HEADER: version}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    await host.open(config or {})
    backoff = initial_backoff
    try:
        upgrade = _UpgradeAnswer()
        async with aiohttp.ClientSession(trace_configs=[upgrade.trace]) as client:
            while not stopping.is_set():
                upgrade.headers = None
                try:
                    socket = await client.ws_connect(
                        url,
                        headers=headers,
                        heartbeat=heartbeat,
                        max_msg_size=max_message_bytes,
                        # permessage-deflate offered on every dial, the gateway deciding:
                        # it accepts only where the plugin's inbound target says
                        # ``compress: true``, so the manifest is the one place that says,
                        # as it is for a dialled plugin. Declined, the offer costs a header.
                        # A deflated message is inflated up to max_msg_size only (aiohttp
                        # stops there and closes 1009, as for a plain one): no bomb.
                        compress=15,
                        ssl=ssl,
                        decode_text=False,
                        timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                    )
                except aiohttp.WSServerHandshakeError as error:
                    if error.status in (400, 401, 403, 404):
                        raise Refused(error.status, error.message) from None
                    log.warning("the gateway answered %s; retrying", error.status)
                except (aiohttp.ClientError, OSError) as error:
                    # Masked: a token in the URL's query or userinfo is not for the log.
                    log.info("cannot reach %s: %s; retrying", shown, _unreachable_reason(error))
                else:
                    session = PluginSession(
                        host,
                        socket,
                        outbox,
                        hello=hello,
                        max_in_flight=max_in_flight,
                        heartbeat=heartbeat,
                        max_message_bytes=max_message_bytes,
                        # The gateway's cap, from its answer to the upgrade: what goes out
                        # before its welcome (the events kept meanwhile) is held to it too.
                        host_cap=upgrade.cap(),
                    )
                    if on_connected is not None:
                        outcome = on_connected()
                        if outcome is not None:
                            await outcome
                    try:
                        await _serve_until(session, stopping, stop_caps.grace)
                    finally:
                        await socket.close()
                    if stopping.is_set():
                        return
                    if socket.close_code == CLOSE_WRONG_PLUGIN:
                        # The hello names another plugin than the upgrade admitted: the
                        # next connection would send the same hello and get the same close.
                        raise Refused(CLOSE_WRONG_PLUGIN, session.close_reason)
                    # Every other close is redialled, a reload's 1012 or 1001 too (the upgrade
                    # then admits what the gateway serves now, or refuses: 400/401/403/404), and
                    # 4400 (a hello that took over 10 s may have been a slow link).
                    log.info(
                        "connection to %s closed (%s%s); reconnecting",
                        shown,
                        socket.close_code,
                        f": {session.close_reason}" if session.close_reason else "",
                    )
                    # Reset only once the gateway welcomed this plugin: one that closes
                    # every connection at once is otherwise redialled 20 times a second.
                    if session.welcomed:
                        backoff = initial_backoff
                # Full jitter: a gateway restarting is not hit by every plugin at once.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), random.uniform(0, backoff))
                backoff = min(backoff * 2, max_backoff)
    finally:
        await host.close_within(stop_caps.hooks)


class _UpgradeAnswer:
    """The headers of the gateway's answer to the last upgrade its client sent, for the
    cap it announces there (``ws_protocol.MAX_MESSAGE_BYTES_HEADER``): ``ws_connect`` keeps
    its response to itself, and the trace's end of a request is where aiohttp shows it.
    The client dials one connection at a time, so the last answer is this dial's."""

    def __init__(self) -> None:
        self.headers: CIMultiDictProxy[str] | None = None
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_end.append(self._ended)

    async def _ended(
        self, _session: aiohttp.ClientSession, _context: Any, ended: aiohttp.TraceRequestEndParams
    ) -> None:
        self.headers = ended.response.headers

    def cap(self) -> int | None:
        """The cap the answer announced (``cap_of_header``), or None."""
        if self.headers is None:
            return None
        return cap_of_header(self.headers.getall(MAX_MESSAGE_BYTES_HEADER, []))


def _unreachable_reason(error: BaseException) -> str:
    """Why a dial did not reach the gateway, in words that quote no URL: for a ``wss://``
    gateway whose certificate does not verify, which check failed (OpenSSL's words:
    ``certificate has expired``, ``self-signed certificate``, ``unable to get local issuer
    certificate``, a host name mismatch), so that an operator can tell a private CA not
    trusted yet from a certificate that should be replaced; for a gateway that refused
    this plugin's client certificate, the alert it said why with (``certificate
    required``, ``unknown ca``, ``certificate expired``: ``_connect_tls.refusal_of``);
    else the error's class (the text of aiohttp's errors names the host and port, already
    on the line)."""
    alert = refusal_of(error)  # the gateway's verdict on this plugin's certificate
    if alert is not None:
        return alert
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        refused = error.certificate_error
        why = getattr(refused, "verify_message", None) or getattr(refused, "reason", None)
        said = f": {shown_close_reason(str(why).rstrip('.'))}" if why else ""
        return f"TLS: the gateway's certificate does not verify{said}"
    if isinstance(error, aiohttp.ClientSSLError):
        why = getattr(error, "reason", None)  # an ssl.SSLError's: WRONG_VERSION_NUMBER, …
        return f"TLS: {shown_close_reason(str(why))}" if why else "TLS handshake failed"
    return type(error).__name__


async def _serve_until(session: PluginSession, stopping: asyncio.Event, grace: float) -> None:
    """Serve ``session`` until its connection closes; if ``stopping`` is set first, go
    away on it (``PluginSession.go_away``, ``grace`` seconds at most) and return once it
    has closed."""
    running = asyncio.ensure_future(session.run())
    told = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([running, told], return_when=asyncio.FIRST_COMPLETED)
        if not running.done():
            await session.go_away(grace)
        await running
    finally:
        for task in (running, told):
            task.cancel()
        await asyncio.gather(running, told, return_exceptions=True)
