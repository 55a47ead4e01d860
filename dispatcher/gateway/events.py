"""Plugin events over a WebSocket (``/v1/events``), with resume from the last event id.

``EventHub`` takes every event the dispatcher's plugins emit (``Dispatcher.on_event``:
plugins a reload adds included), each with the version of the plugin that emitted it (two
run at once in a rollout), gives it the next id (1, 2, 3, …: one counter per gateway,
so ids only grow) and keeps the last ``event_buffer`` of them in a ring. A subscriber
states its filters and, when it reconnects, the last id it saw: the events after it that
are still in the ring are queued for it in the same step that registers it for live
ones, with no await in between, so a resume has no gap and no duplicate. Events that
left the ring before the client came back are reported as a ``gap`` frame, never skipped
silently. A filter names a plugin, an event name and an exact version, each optional: a
host pinned to one version of a plugin that is rolling out takes that version's events
only, replays included.

Ids count within one hub, so they start again at 1 when the gateway restarts. The
``subscribed`` frame names the hub (``stream``, random per hub); a client that resumes
sends the stream its last id belongs to, and when that is not this hub's the resume
starts from this hub's first event (with a ``gap`` if the ring lost some): an id of a
gateway gone says nothing about this one's, and taking it at its word would skip events.

A client that reads slower than events arrive is closed with code 4008 and can resume
from its last id, rather than holding the gateway's memory without end. It is behind by
what it has had time to take and has not: the events queued for it when the hub last
looked (``PATIENCE`` ago, at least) and still unsent now; over ``max_pending_events`` of
them, it is cut off. Not by what is queued at one instant: a plugin that emits in one
loop records its whole burst before the sender may write one frame, and counting that
closed every subscriber, however fast it read, on any burst over the limit. What a burst
can put in one queue at once is bounded by the ring (or ``max_pending_events`` if
larger): past it, the events would outlast the ring's copy, and the subscriber is cut off
at once (its resume is told the gap). The protocol is in ``docs/gateway.md``.

A stream is authenticated at its upgrade and then again as ``dispatcher.gateway.rechecks``
says (every minute, and when the proof of its principal expires): a token expired, or its
signing key gone from the issuer's key set, ends it with 1008; a host's own authenticator
may also refuse, or give other roles, which then apply to what it receives and publishes. Checked once only, a stream
opened with a token valid for minutes received events, and published, for as long as it
stayed open.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import WSMsgType, web

from dispatcher._dispatcher import Dispatcher
from dispatcher._versions import MAX_RANGE_LENGTH
from dispatcher.gateway.rechecks import CREDENTIALS_ENDED
from dispatcher.identity import Principal
from linchkit_plugin.errors import DispatchError, InvalidParams, ProviderError
from linchkit_plugin.wire import result_fragment

__all__ = [
    "PATIENCE",
    "TOO_SLOW",
    "EventHub",
    "EventStream",
    "Filter",
    "Subscriber",
]

log = logging.getLogger("dispatcher.gateway")

#: The close code of a subscriber cut off for reading too slowly (4000-4999: the
#: application's own; 08 as in HTTP 408).
TOO_SLOW = 4008
#: How long closing a cut-off subscriber may take before its connection is dropped: a
#: client that reads nothing does not read the close frame either.
_CLOSE_TIMEOUT = 2.0
#: Seconds between the hub's looks at its subscribers' queues: an event queued at one
#: look and still unsent at the next has waited this long at least, the time a consumer
#: that reads has to take what a burst queued for it.
PATIENCE = 1.0


#: Verdicts one subscriber keeps (``Subscriber.allowed``); past this, it starts over.
MAX_VERDICTS = 4096


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a subscriber wants; ``None`` matches any plugin, event name or version.

    ``version`` is the exact version that emitted the event: during a rollout two versions
    of a plugin run and emit, and a host pinned to one must not take the other's events
    for its own."""

    plugin: str | None = None
    event: str | None = None
    version: str | None = None

    def matches(self, plugin: str, event: str, version: str) -> bool:
        return (
            (self.plugin is None or self.plugin == plugin)
            and (self.event is None or self.event == event)
            and (self.version is None or self.version == version)
        )


@dataclass(frozen=True, slots=True)
class _Event:
    id: int
    plugin: str
    version: str
    name: str
    frame: str  # encoded once, sent to every subscriber as is


@dataclass(eq=False, slots=True)
class Subscriber:
    """One WebSocket's subscription: its filters and the frames queued for it."""

    filters: tuple[Filter, ...]
    #: ``max_pending_events``: events it may leave queued from one look of the hub to the next.
    limit: int
    on_overflow: Callable[[], None]
    #: Events it may have queued at any instant (the ring's size, or ``limit`` if larger).
    capacity: int
    #: Events (encoded once, shared by every subscriber) and the protocol's own frames.
    pending: deque[_Event | str] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    too_slow: bool = False
    #: Frames of the protocol's own in ``pending`` (subscribed, gap, publish answers): not
    #: counted against ``limit``, or a replay of a full ring (as many events as the limit
    #: by default) would overflow on its own, every time the client resumes.
    said: int = 0
    #: Under ``access``: whether the subscriber may receive ``event`` of ``plugin`` at
    #: ``version`` (``allowed(plugin, version, event)``); None (no ``access``): every
    #: event. Its verdicts are kept by (plugin, version, event).
    allowed: Callable[[str, str, str], bool] | None = None
    verdicts: dict[tuple[str, str, str], bool] = field(default_factory=dict)
    #: Events queued for it since it subscribed, and sent: their difference is its queue.
    queued: int = 0
    sent: int = 0
    #: ``queued`` at the hub's last look (``EventHub.look``).
    looked: int = 0

    def offer(self, event: _Event) -> None:
        if self.too_slow or not any(
            f.matches(event.plugin, event.name, event.version) for f in self.filters
        ):
            return
        if self.allowed is not None and not self._may_receive(event):
            return
        if self.queued - self.sent >= self.capacity:
            self.cut_off()
            return
        self.pending.append(event)
        self.queued += 1
        self.wakeup.set()

    def look(self) -> None:
        """The hub's look: cut it off if it left more than ``limit`` of the events queued
        at the last look unsent since."""
        if self.looked - self.sent > self.limit:
            self.cut_off()
        self.looked = self.queued

    def cut_off(self) -> None:
        if self.too_slow:
            return
        self.too_slow = True
        self.pending.clear()
        self.said = 0
        self.on_overflow()

    def _may_receive(self, event: _Event) -> bool:
        key = (event.plugin, event.version, event.name)
        verdict = self.verdicts.get(key)
        if verdict is None:
            if len(self.verdicts) >= MAX_VERDICTS:  # event names are the plugins' to choose
                self.verdicts.clear()
            assert self.allowed is not None
            verdict = self.verdicts[key] = self.allowed(event.plugin, event.version, event.name)
        return verdict

    def say(self, frame: dict[str, Any]) -> None:
        """Queue a frame of the protocol's own (not counted against the limit)."""
        self.pending.append(orjson.dumps(frame).decode())
        self.said += 1
        self.wakeup.set()

    def next_frame(self) -> str:
        item = self.pending.popleft()
        if isinstance(item, _Event):
            self.sent += 1
            return item.frame
        self.said -= 1
        return item


class EventHub:
    """Every plugin event of one gateway: ids, the ring for resuming, the subscribers."""

    def __init__(self, *, buffer_size: int, max_pending: int, patience: float = PATIENCE) -> None:
        self._ring: deque[_Event] = deque(maxlen=buffer_size)
        self._max_pending = max_pending
        self._patience = patience
        self._last_id = 0
        self._subscribers: set[Subscriber] = set()
        #: The next look, while a subscriber has events queued (none when all are idle).
        self._looking: asyncio.TimerHandle | None = None
        #: Names this hub's id sequence, so a resume can tell whose ids it holds.
        self.stream_id = secrets.token_hex(8)

    def attach(self, dispatcher: Dispatcher) -> None:
        """Receive every event of every plugin ``dispatcher`` runs, now or after a reload."""
        dispatcher.on_event(self.record)

    def record(self, plugin: str, version: str, event: str, data: Any) -> None:
        """Give the event the next id, keep it for resumes, queue it for its subscribers."""
        event_id = self._last_id + 1
        document = {
            "type": "event",
            "id": event_id,
            "plugin": plugin,
            "version": version,
            "event": event,
            "data": data,
        }
        try:  # an in-process plugin's NaN is dropped here, not sent as null
            frame = result_fragment(document, "its data").decode()
        except ProviderError as error:
            log.warning("event %s@%s/%s dropped: %s", plugin, version, event, error.message)
            return
        self._last_id = event_id
        recorded = _Event(event_id, plugin, version, event, frame)
        self._ring.append(recorded)
        for subscriber in tuple(self._subscribers):
            subscriber.offer(recorded)
        if self._looking is None and self._subscribers:
            self._look_later()

    def _look_later(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # recorded outside a loop: nothing can be sent either
            return
        self._looking = loop.call_later(self._patience, self._look)

    def _look(self) -> None:
        """Cut off the subscribers that left too much unsent since the last look; look
        again while any has events queued."""
        self._looking = None
        busy = False
        for subscriber in tuple(self._subscribers):
            subscriber.look()
            busy = busy or (not subscriber.too_slow and subscriber.queued > subscriber.sent)
        if busy:
            self._look_later()

    def subscribe(
        self,
        filters: Iterable[Filter],
        last_event_id: int | None,
        on_overflow: Callable[[], None],
        stream: str | None = None,
        allowed: Callable[[str, str, str], bool] | None = None,
    ) -> Subscriber:
        """Register a subscriber, its replay after ``last_event_id`` already queued.
        ``last_event_id`` of another ``stream`` (a gateway before a restart) resumes from
        this hub's start. ``allowed``: which events it may receive (``Subscriber``)."""
        subscriber = Subscriber(
            tuple(filters),
            self._max_pending,
            on_overflow,
            max(self._max_pending, self._ring.maxlen or 0),
            allowed=allowed,
        )
        subscriber.say(
            {"type": "subscribed", "last_event_id": self._last_id, "stream": self.stream_id}
        )
        if last_event_id is not None and stream is not None and stream != self.stream_id:
            last_event_id = 0
        if last_event_id is not None:
            oldest = self._ring[0].id if self._ring else self._last_id + 1
            if last_event_id + 1 < oldest:
                subscriber.say({"type": "gap", "after": last_event_id, "resumed_at": oldest})
            for event in self._ring:
                if event.id > last_event_id:
                    subscriber.offer(event)
        self._subscribers.add(subscriber)
        if self._looking is None and subscriber.queued:
            self._look_later()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        if not self._subscribers and self._looking is not None:
            self._looking.cancel()
            self._looking = None

    @property
    def last_event_id(self) -> int:
        return self._last_id

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def __repr__(self) -> str:
        return (
            f"<EventHub last_id={self._last_id} buffered={len(self._ring)}"
            f" subscribers={len(self._subscribers)}>"
        )


class Recheck(Protocol):
    """Checks a stream's credentials again (``Rechecks.until_refused``, its credentials
    and check bound), given the end of the proof it was opened with and what to tell it
    of every check's principal; returns once they are refused."""

    def __call__(
        self, expires_at: float | None, *, checked: Callable[[Principal | None], None]
    ) -> Awaitable[None]: ...


class EventStream:
    """One WebSocket connection: its subscription (at most one), its publishes, its sender."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        hub: EventHub,
        dispatcher: Dispatcher,
        principal: Principal | None = None,
        recheck: Recheck | None = None,
    ) -> None:
        self._ws = ws
        #: Who opened the connection: its publishes are sent as this caller.
        self._principal = principal
        #: Checks the connection's credentials again until they no longer hold; None:
        #: nobody authenticated it.
        self._recheck = recheck
        #: How the stream ended, when something other than its peer ended it.
        self._ended: tuple[int, str] | None = None
        self._request = request
        self._hub = hub
        self._dispatcher = dispatcher
        self._subscriber: Subscriber | None = None
        self._sender: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def run(self, initial: tuple[tuple[Filter, ...], int | None] | None) -> None:
        """Serve the connection until either side ends it."""
        self._sender = asyncio.create_task(self._send_loop())
        tasks = {self._sender, asyncio.create_task(self._receive_loop(initial))}
        if self._recheck is not None and self._principal is not None:
            tasks.add(asyncio.create_task(self._watch_credentials()))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._subscriber is not None:
                self._hub.unsubscribe(self._subscriber)
        if self._ended is not None:
            await self._close(*self._ended)
        elif self._subscriber is not None and self._subscriber.too_slow:
            reason = "too slow: events left unread too long; resume from your last event id"
            await self._close(TOO_SLOW, reason)
        else:
            await self._close(1000, "")

    async def going_away(self) -> None:
        """The gateway stops: close with 1001 (the receive loop then ends the stream)."""
        await self._close(1001, "the gateway is shutting down; reconnect and resume")

    async def _close(self, code: int, reason: str) -> None:
        if self._ws.closed:
            return
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError):
            transport = self._request.transport
            if transport is not None:
                transport.abort()

    async def _watch_credentials(self) -> None:
        """Checks the connection's credentials again (``dispatcher.gateway.rechecks``);
        returns, which ends the stream, when they no longer hold. A principal whose roles
        changed is the stream's from then on."""
        assert self._recheck is not None

        def checked(principal: Principal | None) -> None:
            changed = principal != self._principal
            self._principal = principal
            if changed and self._subscriber is not None:
                self._subscriber.verdicts.clear()  # decided for the roles it had

        expires_at = None if self._principal is None else self._principal.expires_at
        await self._recheck(expires_at, checked=checked)
        self._ended = (
            CREDENTIALS_ENDED,
            "the credentials this stream was opened with no longer hold: reconnect with valid ones",
        )

    def _overflowed(self) -> None:
        # The sender may be stuck waiting for the client to read: stop it where it is.
        if self._sender is not None:
            self._sender.cancel()

    async def _send_loop(self) -> None:
        ws = self._ws
        while True:
            subscriber = self._subscriber
            if subscriber is None:
                await self._subscribed.wait()
                continue
            await subscriber.wakeup.wait()
            subscriber.wakeup.clear()
            pending = subscriber.pending
            while pending and not subscriber.too_slow:
                await ws.send_str(subscriber.next_frame())
            if subscriber.too_slow:
                return

    async def _receive_loop(self, initial: tuple[tuple[Filter, ...], int | None] | None) -> None:
        if initial is not None:
            self._subscribe(*initial)
        async for message in self._ws:
            if message.type != WSMsgType.TEXT:
                if message.type == WSMsgType.BINARY:
                    await self._reply({"type": "error", "error": _bad("frames are JSON text")})
                continue
            try:
                frame = orjson.loads(message.data)
            except orjson.JSONDecodeError:
                await self._reply({"type": "error", "error": _bad("a frame is not JSON")})
                continue
            await self._handle(frame)

    async def _handle(self, frame: Any) -> None:
        ref = frame.get("ref") if isinstance(frame, dict) else None
        if not isinstance(ref, str | int | None) or isinstance(ref, bool):
            ref = None
        try:
            kind = frame.get("type") if isinstance(frame, dict) else None
            if kind == "subscribe":
                if self._subscriber is not None:
                    raise InvalidParams("this connection is subscribed already; open another")
                self._subscribe(*parse_subscription(frame))
            elif kind == "publish":
                await self._publish(frame)
                await self._reply({"type": "published", "ref": ref})
            else:
                raise InvalidParams("a frame's 'type' is 'subscribe' or 'publish'")
        except DispatchError as error:
            await self._reply({"type": "error", "ref": ref, "error": error.to_wire()})

    def _subscribe(
        self, filters: tuple[Filter, ...], last_event_id: int | None, stream: str | None = None
    ) -> None:
        allowed = self._receives if self._dispatcher.checks_access else None
        self._subscriber = self._hub.subscribe(
            filters, last_event_id, self._overflowed, stream, allowed
        )
        self._subscribed.set()

    def _receives(self, plugin: str, version: str, event: str) -> bool:
        """Under ``access``, a subscriber receives ``event`` of ``plugin`` when its roles
        allow ``plugin.<event>`` at ``version``, the version that emitted it: the rule
        that lets a caller publish that event to that version, as a call's rule names a
        method. So ``billing@1.*.paid`` lets through what billing 1.x emits, not what the
        2.0 it is rolling out to emits beside it."""
        return self._dispatcher.may_call(self._principal, plugin, version, event)

    async def _publish(self, frame: dict[str, Any]) -> None:
        plugin, event = frame.get("plugin"), frame.get("event")
        version = frame.get("version")
        if not isinstance(plugin, str) or not isinstance(event, str) or not event:
            raise InvalidParams("a publish frame needs string 'plugin' and 'event'")
        if version is not None and not isinstance(version, str):
            raise InvalidParams("a publish frame's 'version' is a string")
        await self._dispatcher.publish(
            plugin, event, frame.get("data"), version=version, caller=self._principal
        )

    async def _reply(self, frame: dict[str, Any]) -> None:
        """Once subscribed, answers travel the subscriber's queue, so one task writes; before,
        the sender is idle and this loop writes itself."""
        if self._subscriber is not None:
            self._subscriber.say(frame)
        else:
            await self._ws.send_str(orjson.dumps(frame).decode())


def parse_subscription(source: Any) -> tuple[tuple[Filter, ...], int | None, str | None]:
    """Filters, ``last_event_id`` and the ``stream`` it belongs to from a subscribe frame."""
    raw_filters = source.get("filters", [{}])
    if not isinstance(raw_filters, list) or not 1 <= len(raw_filters) <= 100:
        raise InvalidParams("'filters' is a list of 1 to 100 {plugin?, event?, version?} objects")
    filters = []
    for item in raw_filters:
        if not isinstance(item, dict):
            raise InvalidParams("each filter is an object {plugin?, event?, version?}")
        plugin, event = item.get("plugin"), item.get("event")
        if not isinstance(plugin, str | None) or not isinstance(event, str | None):
            raise InvalidParams("a filter's 'plugin' and 'event' are strings")
        filters.append(Filter(plugin, event, checked_filter_version(item.get("version"))))
    stream = source.get("stream")
    if not isinstance(stream, str | None) or (stream is not None and len(stream) > 64):
        raise InvalidParams("'stream' is the string a 'subscribed' frame named (64 at most)")
    return tuple(filters), checked_event_id(source.get("last_event_id")), stream


def checked_filter_version(value: Any) -> str | None:
    """A filter's ``version``: absent (any version) or the exact version, 1 to
    ``MAX_RANGE_LENGTH`` printable characters as calls' ``X-Plugin-Version`` (no version
    is longer; a control character would reach the error frame and the logs)."""
    if value is None:
        return None
    if not (isinstance(value, str) and 0 < len(value) <= MAX_RANGE_LENGTH and value.isprintable()):
        raise InvalidParams(
            f"a filter's 'version' is the exact version that emitted the event:"
            f" 1-{MAX_RANGE_LENGTH} printable characters"
        )
    return value


def checked_event_id(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= 18:
        value = int(value)
    if type(value) is int and value >= 0:
        return value
    raise InvalidParams("'last_event_id' is a non-negative integer")


def _bad(message: str) -> dict[str, Any]:
    return InvalidParams(message).to_wire()
