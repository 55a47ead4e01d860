"""Dial mode: one connection to a plugin's WebSocket endpoint, kept up (``DialedPlugin``).

    attach ─► task: dial ─► hello checked ─► Channel.run … closed ─► backoff+jitter ─► dial …

Calls take the open channel; while none is open they wait for the next one, at most
``connect_timeout_ms`` and never past their deadline, then fail ``TargetUnavailable``
with ``stage: connect`` (never sent: the fleet may fail them over, for any method).
Calls in flight when the connection drops fail ``TargetUnavailable`` with ``stage:
in_flight``: retryable, which only the retry policy of an idempotent method acts on.

A plugin that sends ``goaway`` (it is stopping) gets no new calls on that connection: a
new one is dialled at once (behind a load balancer it reaches another instance; a plugin
restarting in place refuses it until it is back, and calls wait for it as above) while
the calls in flight finish on the old one, which then closes.

Host events sent while disconnected wait in a buffer of ``event_buffer`` (the oldest
dropped beyond it) and go out, in order, as soon as the next connection is up, followed
by a ``dropped`` frame with the count lost, if any (also in ``health`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import ssl
from collections import deque
from typing import Any

import aiohttp

from linchkit_plugin.errors import DispatchError, InvalidParams, ProviderError, TargetUnavailable
from linchkit_plugin.ws_protocol import MAX_MESSAGE_BYTES_HEADER, encode_frame
from providers.base import Health
from providers.invocation import Invocation
from providers.served import served_names
from providers.websocket.channel import Channel
from providers.websocket.events import EventSink
from providers.websocket.hello import read_hello
from providers.websocket.sharing import DialUsers
from providers.websocket.target import WebSocketTarget

__all__ = ["DialedPlugin"]

log = logging.getLogger("dispatcher.providers.websocket")


class DialedPlugin:
    """The connection of one dial-mode target and the task that keeps it up, for the
    versions of one plugin attached over it (``users``: ``providers.websocket.sharing``)."""

    def __init__(
        self,
        target: WebSocketTarget,
        session: aiohttp.ClientSession,
        users: DialUsers,
        *,
        events: bool = True,
    ) -> None:
        """``users``: told what each connection's ``hello`` said; ``events``: whether
        the plugin's events are taken (to ``users``) or ignored."""
        self.target = target
        self.users = users
        self.plugin_id = users.plugin_id
        self.describe = target.describe()
        self._session = session
        self._sink: EventSink | None = users.emit if events else None
        self._ids = itertools.count(1)  # across reconnects: an id never names two calls
        self.channel: Channel | None = None
        self._up = asyncio.Event()
        #: Set once the first dial has ended, connected or not.
        self._first_dial_ended = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: The tasks reading the current connection and any still draining after goaway.
        self._readers: set[asyncio.Task[None]] = set()
        self._events: deque[bytes] = deque(maxlen=target.event_buffer or None)
        self.events_dropped = 0
        self.connects = 0
        self.last_error = "not connected yet"
        #: The plugin's last ``hello``: who it said it is, its methods.
        self.hello: dict[str, Any] = {}
        #: The methods that ``hello`` listed (``providers.served``).
        self.served: frozenset[str] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._keep_up(), name=f"keeping up {self.describe}"
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        readers = list(self._readers)
        for reader in readers:
            reader.cancel()  # each closes its channel as it ends
        if readers:
            await asyncio.wait(readers)
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()

    # -- what calls use ----------------------------------------------------------------------

    async def ready(self, invocation: Invocation | None) -> Channel:
        """The open channel, waiting for one within the call's deadline and the
        connect timeout."""
        channel = self.channel
        if channel is not None and channel.usable:
            return channel
        wait = self.target.connect_timeout_ms / 1000
        if invocation is not None:
            wait = min(wait, invocation.remaining())
        try:
            async with asyncio.timeout(max(wait, 0)):
                await self._up.wait()
        except TimeoutError:
            pass
        channel = self.channel
        if channel is None or not channel.usable:
            raise TargetUnavailable(
                f"{self.describe} is not connected ({self.last_error})",
                details={"stage": "connect"},
            )
        return channel

    async def send_event(self, event: str, data: Any) -> None:
        """Send the host event, or keep it for the next connection while there is none;
        ``InvalidParams`` if it is larger than the connected plugin reads."""
        frame = encode_frame({"type": "event", "event": event, "data": data})
        channel = self.channel
        if channel is not None and channel.usable and not self._events:
            try:
                await channel.send_event(frame)
                return
            except TargetUnavailable:
                pass  # closed meanwhile: keep it for the next connection
        if self.target.event_buffer == 0:
            raise TargetUnavailable(f"{self.describe} is not connected; event {event!r} refused")
        if len(self._events) == self._events.maxlen:
            self.events_dropped += 1
        self._events.append(frame)

    async def health(self, timeout: float) -> Health:
        """The plugin's health over the connection; a probe made while the first dial
        still runs (``dispatcher health`` right after attach) waits for it, within
        ``timeout``, rather than reporting a connection not tried yet as down."""
        if not self._first_dial_ended.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._first_dial_ended.wait()
        channel = self.channel
        if channel is None or not channel.usable:
            return Health("not_serving", f"not connected: {self.last_error}")
        health = await channel.health(timeout)
        health.extra.update(connects=self.connects, host_events_dropped=self.events_dropped)
        return health

    # -- keeping the connection up -----------------------------------------------------------

    async def _keep_up(self) -> None:
        target = self.target
        backoff = target.reconnect_backoff_ms / 1000
        while True:
            try:
                channel = await self._dial()
            except DispatchError as error:
                self.last_error = error.message
                self._first_dial_ended.set()
                log.info("%s: %s", self.describe, error.message)
            except Exception as error:  # a bug of ours or the client's: keep redialling, say it
                self.last_error = f"{type(error).__name__}: {error}"
                self._first_dial_ended.set()
                log.exception("%s: dialling failed unexpectedly", self.describe)
            else:
                backoff = target.reconnect_backoff_ms / 1000
                self.connects += 1
                self.channel = channel
                self._up.set()
                self._first_dial_ended.set()
                reader = asyncio.get_running_loop().create_task(self._read(channel))
                self._readers.add(reader)
                reader.add_done_callback(self._readers.discard)
                await self._flush_events(channel)
                await channel.leaving.wait()  # closed, or the plugin said goaway
                self._up.clear()
                if channel.closed:
                    await asyncio.wait([reader])
                    log.info("%s: %s; reconnecting", self.describe, channel.close_reason)
                else:  # its calls in flight finish on it while the next one is dialled
                    self.last_error = "the plugin went away (goaway)"
                    log.info("%s: the plugin is going away; dialling anew", self.describe)
            # Full jitter: plugins restarting are not redialled in lockstep.
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, target.reconnect_backoff_max_ms / 1000)

    async def _read(self, channel: Channel) -> None:
        """Read ``channel`` until it closes (it closes itself once drained after goaway)."""
        try:
            await channel.run()
        finally:
            if self.channel is channel:
                self.last_error = channel.close_reason
            await channel.close()

    async def _dial(self) -> Channel:
        target = self.target
        assert target.url is not None
        headers = {MAX_MESSAGE_BYTES_HEADER: str(target.max_message_bytes)}
        if target.token is not None:
            headers["Authorization"] = f"Bearer {target.token.get_secret_value()}"
        heartbeat = target.heartbeat_ms / 1000
        try:
            socket = await self._session.ws_connect(
                target.url,
                headers=headers,
                heartbeat=heartbeat,
                max_msg_size=target.max_message_bytes,
                compress=15 if target.compress else 0,
                ssl=_ssl_of(target),
                decode_text=False,
                # No receive timeout: a timer per message; the channel's read watch finds a
                # plugin trickling a frame (providers.websocket.read_watch).
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=heartbeat),
            )
        except aiohttp.WSServerHandshakeError as error:
            raise TargetUnavailable(
                f"refused the upgrade: {error.status} {error.message}"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise TargetUnavailable(f"cannot connect: {type(error).__name__}: {error}") from None
        channel = Channel(
            socket,
            self.describe,
            ids=self._ids,
            heartbeat=heartbeat,
            max_in_flight=target.max_in_flight,
            max_message_bytes=target.max_message_bytes,
            max_events_per_second=target.max_events_per_second,
            sink=self._sink,
        )
        try:
            await self._read_hello(socket)
            channel.plugin_reads = self.hello.get("max_message_bytes")
        except BaseException:
            # No hello, a wrong one, or the dial was cancelled: not waiting for a plugin
            # that may neither read nor close to say goodbye.
            await channel.close(at_once=True)
            raise
        return channel

    async def _read_hello(self, socket: aiohttp.ClientWebSocketResponse[Any]) -> None:
        try:
            hello = await read_hello(socket)
        except InvalidParams as error:
            raise ProviderError(error.message) from None
        if hello["id"] != self.plugin_id:
            # Not retryable in itself, but the right plugin may come back at that URL.
            raise ProviderError(f"is plugin {hello['id']!r:.80}, not {self.plugin_id!r}")
        self.hello = hello
        self.served = served_names(hello.get("methods", ()))
        self.users.heard(hello["version"], self.served)

    async def _flush_events(self, channel: Channel) -> None:
        try:
            while self._events:
                try:
                    await channel.send_event(self._events[0])
                except InvalidParams as refused:
                    # Kept while no plugin was connected: larger than this one reads, and
                    # its publisher has long had its answer. Lost, and counted so.
                    self.events_dropped += 1
                    log.warning("%s; a host event kept for it is dropped", refused.message)
                self._events.popleft()
            if self.events_dropped:
                dropped, self.events_dropped = self.events_dropped, 0
                await channel.send_event(encode_frame({"type": "dropped", "count": dropped}))
        except TargetUnavailable:
            pass  # dropped again at once: the next connection takes what is left

    def __repr__(self) -> str:
        state = "up" if self.channel is not None and self.channel.usable else "down"
        return f"<DialedPlugin {self.describe} {state} connects={self.connects} events_waiting={len(self._events)}>"


def _ssl_of(target: WebSocketTarget) -> ssl.SSLContext | bool:
    if not target.dials_tls:
        return True
    if target.ca_file is None and target.cert_file is None:
        return True  # the system's roots
    try:
        context = ssl.create_default_context(cafile=str(target.ca_file) if target.ca_file else None)
        if target.cert_file is not None and target.key_file is not None:
            context.load_cert_chain(target.cert_file, target.key_file)
    except (OSError, ssl.SSLError) as error:
        raise ProviderError(f"{target.describe()}: cannot load TLS files: {error}") from None
    return context
