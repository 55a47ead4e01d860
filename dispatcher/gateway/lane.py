"""The call lane: the gateway's hot route read and answered on httptools, not aiohttp.web.

``POST /v1/plugins/{plugin}/methods/{method}`` is what callers send all day, and
aiohttp.web costs more CPU per request to parse it, build its request object, route it
and write the answer than the gateway's own work does (docs/gateway.md). So every
connection starts on a ``CallLane``. It reads each request head itself (httptools, the
parser uvicorn uses), and a plain call — HTTP/1.1, a path of plain names (no escapes, no
query), a ``Content-Length`` body of at most ``LANE_MAX_BODY`` bytes in
``application/json``, nothing to decode or upgrade — it answers through
``Gateway.answer_call``, the code aiohttp's route runs, so both give the same answers.

Anything else — another route, a chunked or compressed body, ``Expect``, an upgrade,
HTTP/1.0, a head httptools refuses or one over ``LANE_MAX_HEAD`` bytes, a head aiohttp's
parser refuses (no ``Host``, a singleton header twice, over 128 headers) — is handed to
aiohttp's own protocol with every byte read so far, and the connection stays with aiohttp
from then on: each limit and refusal of aiohttp's (and of ``dispatcher.gateway.body``)
applies there as before. Only bodies the lane may hold whole are its own; a larger one
goes to aiohttp, which reads it under ``max_body_bytes`` and ``body_timeout``.

Timing: a connection that sends no complete head within ``header_timeout`` of opening,
or of a request's first byte, is closed; one idle between requests, after
``keep_alive_timeout`` (75 s), longer than clients keep an idle connection for reuse, so
they close it first: a gateway closing a connection just as a client sends a call on it
drops a call the client cannot tell from one that ran (with the header timeout as the idle
one, as on aiohttp's side, 4 of 300 calls timed at its expiry were). Neither runs while
answers wait for the client to read them (nor does aiohttp's timer);
a body that has not arrived whole within ``body_timeout`` of its head is answered 408 and
the connection closed. Requests on one connection are answered in order (pipelining);
while one runs, or while its answers are not being read, the lane buffers at most one
more request at its largest (and one read past it) and then stops reading. A
client that hangs up does not cancel its call (nor does aiohttp by default): the call
ends and its answer is dropped. When the gateway stops, connections wind down rather than
close at once (``CallLanes.stop_taking``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import httptools
from multidict import CIMultiDict

from dispatcher.gateway.body import parse_json
from dispatcher.gateway.credentials import credentials_from
from dispatcher.gateway.errors import answer_of, written
from dispatcher.gateway.protocol import log_failure
from linchkit_plugin.errors import DeadlineExceeded, ProviderError

if TYPE_CHECKING:
    from dispatcher.gateway.app import Gateway
    from dispatcher.gateway.connections import Seat
    from dispatcher.gateway.listener import SeatedProtocols
    from dispatcher.gateway.settings import GatewaySettings

__all__ = ["DRAIN_IDLE_SECONDS", "LANE_MAX_BODY", "LANE_MAX_HEAD", "CallLane", "CallLanes"]

#: The largest body the lane holds; a larger one is read by aiohttp, under the gateway's
#: limits, as it arrives. Calls are small: 64 KiB keeps the lane's buffer per connection
#: where aiohttp's own read buffer is.
LANE_MAX_BODY = 64 * 1024
#: The largest head the lane reads: aiohttp's limits (8,190 bytes a line or a header)
#: decide above it, with its own answers.
LANE_MAX_HEAD = 8 * 1024

#: The call route with names as a manifest writes them: nothing aiohttp would decode or
#: normalise (``%``, ``.`` segments), no query, nothing routed elsewhere (``:submit``).
_CALL_PATH = re.compile(
    rb"/v1/plugins/([A-Za-z0-9][A-Za-z0-9_.@+-]{0,127})/methods/([A-Za-z][A-Za-z0-9_.-]{0,255})"
)
#: Headers that send a request to aiohttp: what the lane does not decode or take part in.
_ELSEWHERE = frozenset({b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"})
#: Headers aiohttp's parser refuses twice (RFC 9110's singletons), and Host it requires in
#: HTTP/1.1: a head that breaks either rule, or has more headers than aiohttp takes
#: (its ``max_headers``), goes there for its 400.
_SINGLETONS = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)
_MOST_HEADERS = 128
#: How long a connection idle when the gateway stops may still bring a request (at most
#: the keep-alive timeout): a client calling reuses its connection within milliseconds,
#: and one idle that long closes as its keep-alive timer would have. As the plugin SDK's
#: server (``linchkit_plugin._uvicorn``).
DRAIN_IDLE_SECONDS = 1.0


class CallLanes:
    """What every lane of one gateway shares, and the lanes open now (to close them)."""

    def __init__(
        self,
        gateway: Gateway,
        settings: GatewaySettings,
        elsewhere: SeatedProtocols,
    ) -> None:
        self.gateway = gateway
        self.settings = settings
        #: aiohttp's protocol factory: where a request the lane does not serve goes.
        self.elsewhere = elsewhere
        #: The largest body a lane serves: a larger one is aiohttp's to read or refuse.
        self.most_body = min(LANE_MAX_BODY, settings.max_body_bytes)
        self.open: set[CallLane] = set()
        #: Winding down (``stop_taking``): every answer closes its connection.
        self.closing = False
        #: Whether aiohttp still serves what the lane hands it (not once it has shut down).
        self.elsewhere_open = True
        self._emptied: asyncio.Event | None = None
        self.served = 0
        self.handed_off = 0

    def __call__(self, *, seat: Seat | None = None) -> asyncio.Protocol:
        """A new connection's protocol, which gives ``seat`` back when the connection
        closes (or hands it to aiohttp's protocol with the connection)."""
        return CallLane(self, seat)

    def stop_taking(self) -> None:
        """Wind every connection down: each closes after its next answer (which says
        ``Connection: close``), one idle now after ``DRAIN_IDLE_SECONDS`` without a request.

        Not at once: a client may be writing a call on an idle connection at this very
        moment, and a connection closed under it drops a call the client cannot tell
        from one that ran (43 in 10 stops with 32 clients calling, before). Answered, it
        is a call that ran or a ``shutting_down`` refusal the client may send elsewhere.
        """
        if self.closing:
            return
        self.closing = True
        for lane in tuple(self.open):
            lane.wind_down()

    async def aclose(self, timeout: float) -> None:
        """Wind down (``stop_taking``), wait up to ``timeout`` seconds for the connections
        to close by themselves, then close the rest (a call still running is cancelled)."""
        self.stop_taking()
        if self.open:
            self._emptied = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._emptied.wait()
        late = [lane.task for lane in self.open if lane.task is not None]
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        for lane in tuple(self.open):
            lane.abort()

    def gone(self, lane: CallLane) -> None:
        """``lane``'s connection closed, or went to aiohttp."""
        self.open.discard(lane)
        if not self.open and self._emptied is not None:
            self._emptied.set()

    def __repr__(self) -> str:
        return (
            f"<CallLanes open={len(self.open)} served={self.served} handed_off={self.handed_off}>"
        )


class _Head:
    """One request head as httptools reads it, and whether the lane may serve it."""

    __slots__ = ("content_length", "elsewhere", "headers", "json", "singletons", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length = -1
        self.elsewhere = False
        self.json = False
        self.singletons: set[bytes] = set()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps the whitespace after a value; aiohttp not
        if lowered in _SINGLETONS:
            if lowered in self.singletons:
                self.elsewhere = True
            self.singletons.add(lowered)
        if lowered in _ELSEWHERE:
            self.elsewhere = True
        elif lowered == b"content-length":
            if self.content_length != -1 or not value.isdigit():
                self.elsewhere = True  # twice, or not a number: aiohttp refuses it its way
            else:
                self.content_length = int(value)
        elif lowered == b"content-type":
            if value == b"application/json":
                self.json = True
            else:
                self.elsewhere = True  # parameters or another type: aiohttp's check decides
        # As aiohttp's parser decodes them: bytes that are not UTF-8 become surrogates.
        self.headers.add(
            name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
        )


def _read_head(raw: bytes, most: int) -> tuple[_Head, str, str, bool] | None:
    """The head in ``raw`` with the plugin and method it calls and whether the connection
    stays open after it, or None when the lane does not serve it (a body over ``most``
    bytes included: aiohttp's side refuses one over the gateway's limit with its 413)."""
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(raw)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # aiohttp answers it
        return None
    if (
        head.elsewhere
        or head.content_length < 0
        or head.content_length > most
        or (head.content_length > 0 and not head.json)  # no type: aiohttp's 415
        or b"host" not in head.singletons
        or len(head.headers) > _MOST_HEADERS
        or parser.get_method() != b"POST"
        or parser.get_http_version() != "1.1"
    ):
        return None
    route = _CALL_PATH.fullmatch(head.url)
    if route is None:
        return None
    plugin, method = route.group(1).decode(), route.group(2).decode()
    return head, plugin, method, parser.should_keep_alive()


class CallLane(asyncio.Protocol):
    """One connection while it sends plain calls (the module's docstring)."""

    def __init__(self, lanes: CallLanes, seat: Seat | None = None) -> None:
        self._lanes = lanes
        #: The connection's place in the port's counts (``dispatcher.gateway.connections``).
        self._seat = seat
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        #: The head read of the request whose body is still arriving, and its length.
        self._waiting: tuple[tuple[_Head, str, str, bool], int] | None = None
        #: The call being answered; requests after it wait in the buffer.
        self.task: asyncio.Task[None] | None = None
        self._reading = True
        self._writable = True
        self._closing = False
        # One timer at a time for what the connection waits for (a head, a body): it
        # fires at most once per timeout, and moving the deadline costs an assignment.
        self._deadline = 0.0
        self._expired: Callable[[], None] | None = None
        #: Waiting between requests (``keep_alive_timeout``), not for a head or a body.
        self._idle = False
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not one
        connection = transport.get_extra_info("socket")
        if connection is not None and connection.family in (socket.AF_INET, socket.AF_INET6):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._lanes.closing:
            transport.close()
            return
        self._lanes.open.add(self)
        self._wait(self._lanes.settings.header_timeout, self._head_late)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._idle:  # a request's first byte: its head is timed from now
            self._wait(self._lanes.settings.header_timeout, self._head_late)
        self._buffer += data
        if self.task is None:
            self._next()
        self._pace()

    def eof_received(self) -> bool:
        return False  # the transport closes; a call running ends, its answer dropped

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._stop_waiting()
        self._lanes.gone(self)
        if self._seat is not None:
            self._seat.release()

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        if self.task is None and not self._closing:
            self._wait_for_next()
            self._next()

    # -- requests ------------------------------------------------------------------------

    def _next(self) -> None:
        """Start on the next request in the buffer, if one has arrived whole."""
        if self._closing:
            return
        if not self._writable:
            # The client is not reading its answers: the lane waits for it to, as
            # aiohttp waits for a write to drain, with no header timer (resume_writing
            # starts it again). Closing now would drop the answers it already made.
            self._stop_waiting()
            return
        buffer = self._buffer
        waiting = self._waiting
        if waiting is None:
            end = buffer.find(b"\r\n\r\n", 0, LANE_MAX_HEAD)
            if end < 0:
                # Too long for the lane, or lines ended by a bare LF (which aiohttp's parser
                # takes or refuses at once): aiohttp's now, not when the header timer ends.
                if len(buffer) >= LANE_MAX_HEAD or b"\n\n" in buffer:
                    self._hand_off()
                return
            head_length = end + 4
            request = _read_head(bytes(buffer[:head_length]), self._lanes.most_body)
            if request is None:
                self._hand_off()
                return
            waiting = self._waiting = request, head_length
            self._wait(self._lanes.settings.body_timeout, self._body_late)
        request, head_length = waiting
        total = head_length + request[0].content_length
        if len(buffer) < total:
            return
        body = bytes(buffer[head_length:total])
        del buffer[:total]
        self._waiting = None
        self._stop_waiting()
        self.task = self._loop.create_task(self._serve(*request, body))

    async def _serve(
        self, head: _Head, plugin: str, method: str, keep_alive: bool, body: bytes
    ) -> None:
        transport = self._transport
        assert transport is not None
        lanes = self._lanes
        try:
            answer = await lanes.gateway.answer_call(
                plugin,
                method,
                head.headers,
                partial(_params, body, lanes.settings.max_depth),
                partial(credentials_from, head.headers, transport),
                unread_body=False,  # read whole: the connection stays usable after a refusal
            )
        except Exception as error:  # a bug, not a caller's error: 500 without detail
            log_failure(f"the call lane failed to answer a call of {plugin}.{method}", error)
            failed = ProviderError("the gateway failed to answer this call")
            answer = answer_of(failed, status=500, close=True)
        finally:
            self.task = None
        lanes.served += 1
        close = not keep_alive or lanes.closing or answer.headers.get("Connection") == "close"
        if transport.is_closing():
            return
        transport.write(written(answer, close))
        if close:
            self._closing = True
            transport.close()
            return
        if self._writable:
            self._wait_for_next()
        else:  # the answer is still going out: not idle (resume_writing starts the timer)
            self._stop_waiting()
        if self._buffer:
            self._next()
        self._pace()

    def _pace(self) -> None:
        """Read while the buffer holds less than a whole request at its largest; past
        that (answers going out slower than requests come in, or not read at all) the
        rest waits in the client's socket, not here. Any buffer past it holds a whole
        request (or a head the lane hands off), so pausing never waits for more bytes."""
        full = len(self._buffer) > LANE_MAX_HEAD + LANE_MAX_BODY
        if full != self._reading or self._closing:
            return
        self._reading = not full
        if full:
            self._transport.pause_reading()  # type: ignore[union-attr]
        else:
            self._transport.resume_reading()  # type: ignore[union-attr]

    # -- timing --------------------------------------------------------------------------

    def _wait(self, seconds: float, expired: Callable[[], None]) -> None:
        self._idle = False
        deadline = self._deadline = self._loop.time() + seconds
        self._expired = expired
        timer = self._timer
        if timer is not None and timer.when() > deadline:  # a body's wait after a head's
            timer.cancel()
            timer = None
        if timer is None:
            self._timer = self._loop.call_at(deadline, self._tick)

    def _stop_waiting(self) -> None:
        self._idle = False
        self._expired = None

    def _tick(self) -> None:
        self._timer = None
        expired = self._expired
        if expired is None or self._closing:
            return
        if self._loop.time() >= self._deadline:
            self._expired = None
            expired()
        else:  # the deadline moved on since this timer was set
            self._timer = self._loop.call_at(self._deadline, self._tick)

    def _wait_for_next(self) -> None:
        """After an answer: a head begun already is timed as a head, else the idle wait."""
        lanes = self._lanes
        settings = lanes.settings
        if self._buffer:
            self._wait(settings.header_timeout, self._head_late)
        else:
            idle = settings.keep_alive_timeout
            if lanes.closing:
                idle = min(idle, DRAIN_IDLE_SECONDS)
            self._wait(idle, self._idle_late)
            self._idle = True

    def _head_late(self) -> None:
        self.abort()  # as aiohttp's keep-alive timer: closed without an answer

    def _idle_late(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _body_late(self) -> None:
        late = DeadlineExceeded(
            f"the request body did not arrive within {self._lanes.settings.body_timeout:g} s"
        )
        transport = self._transport
        assert transport is not None
        transport.write(written(answer_of(late, status=408, close=True), close=True))
        self._closing = True
        transport.close()

    # -- ending --------------------------------------------------------------------------

    def _hand_off(self) -> None:
        """Give the connection, and what it sent so far, to aiohttp's protocol."""
        transport = self._transport
        assert transport is not None
        self._stop_waiting()
        self._closing = True  # for the lane: the connection is aiohttp's now
        self._lanes.gone(self)
        if not self._lanes.elsewhere_open:
            transport.close()
            return
        self._lanes.handed_off += 1
        protocol = self._lanes.elsewhere(seat=self._seat)  # it gives the seat back now
        self._seat = None
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self._buffer = bytes(self._buffer), bytearray()
        if not self._reading:
            transport.resume_reading()
        protocol.data_received(data)

    def wind_down(self) -> None:
        """The gateway stops: an idle connection (or one that has sent nothing yet) may
        bring one more request for ``DRAIN_IDLE_SECONDS``; one with a request under way
        closes after its answer."""
        if self.task is None and not self._buffer and self._writable and not self._closing:
            self._wait_for_next()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


async def _params(body: bytes, max_depth: int) -> Any:
    """The params of a body the lane read whole (its type checked with its head)."""
    return parse_json(body, max_depth) if body else {}
