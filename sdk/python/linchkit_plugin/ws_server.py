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
its calls are answered; after ``GOAWAY_GRACE`` seconds the plugin closes it itself.

Reverse mode (``dial``) reconnects after every drop with exponential backoff and full
jitter; a refusal at the upgrade (401, 403, 404: wrong token, another plugin's id, no
such inbound plugin) is not retried: ``Refused`` says which.

aiohttp is the ``websocket`` extra: ``pip install 'linchkit-plugin[websocket]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import WSMsgType, web

from linchkit_plugin.auth import BearerToken
from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    InvalidParams,
    ProviderError,
    Unauthorized,
)
from linchkit_plugin.host import PluginHost
from linchkit_plugin.listen import address_mistake, host_and_port
from linchkit_plugin.wire import error_response, ok_response, parse_request
from linchkit_plugin.ws_protocol import (
    CLOSE_GOING_AWAY,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_MESSAGE_BYTES,
    GOAWAY_GRACE,
    PLUGIN_ID_HEADER,
    PLUGIN_VERSION_HEADER,
    STREAM_WINDOW,
    FrameError,
    decode_frame,
    encode_frame,
    error_frame,
    hello_frame,
)

__all__ = [
    "EventOutbox",
    "PluginSession",
    "Refused",
    "WebSocketPluginServer",
    "dial",
    "stop_on_signals",
]

log = logging.getLogger("linchkit_plugin.websocket")

Socket = web.WebSocketResponse[Any] | aiohttp.ClientWebSocketResponse[Any]

#: Frames of one session's events waiting to be written; beyond it the newest is dropped.
_SESSION_EVENT_QUEUE = 1024


class Refused(Exception):
    """The gateway refused the connection at the upgrade; retrying would not help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the gateway refused the connection ({status}): {message}")
        self.status = status


class EventOutbox:
    """The plugin's events on their way to every connected host.

    With no host connected they wait, at most ``limit`` of them (then the oldest go and
    are counted in ``dropped``); the next session takes them and reports the count.
    """

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._waiting: deque[bytes] = deque(maxlen=limit)
        self.dropped = 0
        self._sessions: set[PluginSession] = set()

    def emit(self, event: str, data: Any) -> None:
        """The plugin's ``emit``: synchronous, never blocks; an event JSON cannot carry is
        logged and dropped."""
        try:
            frame = encode_frame({"type": "event", "event": event, "data": data})
        except DispatchError as error:
            log.warning("event %r not sent: %s", event, error)
            return
        if not self._sessions:
            if len(self._waiting) == self._waiting.maxlen:
                self.dropped += 1
            self._waiting.append(frame)
            return
        for session in self._sessions:
            session.queue_event(frame)

    def join(self, session: PluginSession) -> None:
        while self._waiting:
            session.queue_event(self._waiting.popleft())
        if self.dropped:
            session.queue_event(encode_frame({"type": "dropped", "count": self.dropped}))
            self.dropped = 0
        self._sessions.add(session)

    def leave(self, session: PluginSession) -> None:
        self._sessions.discard(session)

    def __repr__(self) -> str:
        return f"<EventOutbox waiting={len(self._waiting)} dropped={self.dropped} sessions={len(self._sessions)}>"


class _Window:
    """How many chunks a stream may still send before the host grants more."""

    __slots__ = ("_credit", "_granted")

    def __init__(self, credit: int) -> None:
        self._credit = credit
        self._granted = asyncio.Event()

    async def take(self) -> None:
        while self._credit <= 0:
            self._granted.clear()
            await self._granted.wait()
        self._credit -= 1

    def grant(self, count: int) -> None:
        self._credit += count
        self._granted.set()


class PluginSession:
    """Serves the plugin over one open WebSocket until it closes."""

    def __init__(
        self,
        host: PluginHost,
        socket: Socket,
        outbox: EventOutbox,
        *,
        hello: bytes,
        max_in_flight: int = 1024,
    ) -> None:
        self.host = host
        self.socket = socket
        self.outbox = outbox
        self._hello = hello
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._windows: dict[int, _Window] = {}
        self._events: asyncio.Queue[bytes] = asyncio.Queue(_SESSION_EVENT_QUEUE)
        self.events_dropped = 0
        self.protocol_errors = 0
        #: The gateway accepted the hello (reverse mode): only then the redial backoff resets.
        self.welcomed = False
        self._send_lock = asyncio.Lock()
        #: Set when ``run`` has ended (the connection closed).
        self.ended = asyncio.Event()

    def queue_event(self, frame: bytes) -> None:
        try:
            self._events.put_nowait(frame)
        except asyncio.QueueFull:  # a host that does not read: bounded, counted
            self.events_dropped += 1

    async def run(self) -> None:
        await self._send(self._hello)
        self.outbox.join(self)
        sender = asyncio.get_running_loop().create_task(self._send_events())
        try:
            await self._read()
        finally:
            self.outbox.leave(self)
            sender.cancel()
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(sender, *tasks, return_exceptions=True)
            self.ended.set()

    async def go_away(self, grace: float = GOAWAY_GRACE) -> None:
        """The plugin stops: say ``goaway``, answer what still arrives, and wait for the
        host to close the connection once its calls are answered; after ``grace`` seconds
        close it (1001), cutting off what is still running."""
        await self._send(encode_frame({"type": "goaway"}))
        try:
            async with asyncio.timeout(grace):
                await self.ended.wait()
        except TimeoutError:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.socket.close(code=CLOSE_GOING_AWAY)

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break  # ERROR (too large, broken framing) or CLOSE: the session ends
            try:
                frame = decode_frame(message.data)
            except FrameError as error:
                self.protocol_errors += 1
                await self._send(error_frame(error))
                continue
            await self._handle(frame)

    async def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        call_id = frame.get("id")
        if kind in ("call", "stream"):
            if type(call_id) is not int or call_id in self._tasks:
                self.protocol_errors += 1
                await self._send(error_frame(ProviderError(f"{kind} needs a new integer id")))
                return
            await self._slots.acquire()  # full: stop reading; TCP pushes back on the host
            task = asyncio.get_running_loop().create_task(self._run_call(kind, call_id, frame))
            self._tasks[call_id] = task
        elif kind == "credit":
            window = self._windows.get(call_id) if type(call_id) is int else None
            count = frame.get("n")
            if window is not None and type(count) is int and 0 < count <= 1 << 20:
                window.grant(count)
        elif kind == "cancel":
            running = self._tasks.get(call_id) if type(call_id) is int else None
            if running is not None:  # an unknown id: the call ended meanwhile, nothing to do
                running.cancel()
        elif kind == "health":
            healthy, detail = await self.host.health()
            status = "serving" if healthy else "not_serving"
            await self._send(
                encode_frame({"type": "health", "id": call_id, "status": status, "detail": detail})
            )
        elif kind == "event":
            name = frame.get("event")
            if type(name) is str:
                try:
                    await self.host.deliver(name, frame.get("data"))
                except Exception:
                    log.exception("on_event(%r) raised", name)
        elif kind == "welcome":
            self.welcomed = True
        elif kind == "dropped":
            log.info("host says: %s", frame)
        elif kind == "error":
            # The host could not use a frame of ours (a host that predates ``goaway`` says
            # so of it): logged, never answered, or two peers could trade errors forever.
            log.info("the host could not use a frame: %s", frame.get("error"))
        else:
            self.protocol_errors += 1
            await self._send(
                error_frame(ProviderError(f"unknown frame type {kind!r:.40}"), call_id)
            )

    async def _run_call(self, kind: str, call_id: int, frame: dict[str, Any]) -> None:
        try:
            try:
                request = parse_request(frame.get("request"))
                deadline_ms = request.deadline_ms  # positive, or None (no deadline)
                timeout = None if deadline_ms is None else deadline_ms / 1000
                if kind == "call":
                    result = await self.host.call_with_deadline(
                        request.method, request.params, request.context, timeout
                    )
                    response = ok_response(result)
                else:
                    await self._stream(
                        call_id, request.method, request.params, request.context, timeout
                    )
                    response = ok_response(None)
            except DispatchError as error:
                response = error_response(error)
            try:
                data = encode_frame({"type": "response", "id": call_id, "response": response})
            except InvalidParams as error:
                failure = ProviderError(f"the plugin's result is not JSON: {error.message}")
                data = encode_frame(
                    {"type": "response", "id": call_id, "response": error_response(failure)}
                )
            await self._send(data)
        except asyncio.CancelledError:
            pass  # the host cancelled the call (or the connection ended): nobody to answer
        finally:
            self._tasks.pop(call_id, None)
            self._slots.release()

    async def _stream(
        self, call_id: int, method: str, params: Any, context: dict[str, Any], timeout: float | None
    ) -> None:
        window = self._windows[call_id] = _Window(STREAM_WINDOW)
        try:
            # aclosing: the generator ends in this task, in the context it started in,
            # also when the host cancels; left to the garbage collector it ended in
            # another context and logged a traceback.
            async with (
                asyncio.timeout(timeout),
                contextlib.aclosing(self.host.stream(method, params, context)) as chunks,
            ):
                async for chunk in chunks:
                    await window.take()  # the host's credit: a slow reader slows this stream
                    await self._send(encode_frame({"type": "chunk", "id": call_id, "data": chunk}))
        except TimeoutError:
            raise DeadlineExceeded(f"stream {method!r} passed its deadline") from None
        finally:
            self._windows.pop(call_id, None)

    async def _send_events(self) -> None:
        while True:
            frame = await self._events.get()
            await self._send(frame)

    async def _send(self, data: bytes) -> None:
        # send_frame waits for the transport to drain above its limit: a host that reads
        # slowly slows this plugin's answers instead of growing a buffer here.
        # One sender at a time: aiohttp has every paused writer await one shared future,
        # so a call cancelled while waiting to drain would cancel the others with it.
        with contextlib.suppress(ConnectionError):
            async with self._send_lock:
                await self.socket.send_frame(data, WSMsgType.TEXT)

    def __repr__(self) -> str:
        return (
            f"<PluginSession in_flight={len(self._tasks)} protocol_errors={self.protocol_errors}>"
        )


class WebSocketPluginServer:
    """The plugin served at ``/`` (any path) as a WebSocket: the dispatcher dials in.

    The plugin's ``init``/``start`` run when the server starts, ``stop``/``destroy``
    when it stops, as the HTTP server does. With a token, the upgrade needs
    ``Authorization: Bearer <token>`` and is otherwise answered 401 before it upgrades.
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
    ) -> None:
        self.host = host
        self.config = config or {}
        self.token = token
        self.max_message_bytes = max_message_bytes
        self.heartbeat = heartbeat
        self.max_in_flight = max_in_flight
        self.outbox = EventOutbox(max_buffered_events)
        host_emit: Callable[[str, Any], None] = self.outbox.emit
        if hasattr(host.plugin, "emit"):
            host.plugin._emit = host_emit
        self.hello = _hello_of(host, plugin_id, version)
        self.sessions: set[PluginSession] = set()
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._connect)
        app.on_startup.append(self._open)
        app.on_shutdown.append(self._going_away)
        app.on_cleanup.append(self._close)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; return ``ws://host:port``."""
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]  # IPv6: host:port needs brackets
        return f"ws://{host}:{bound[1]}"

    async def aclose(self, grace: float = GOAWAY_GRACE) -> None:
        """Stop: take no new connection, say ``goaway`` on each open one and let the host
        finish its calls there (at most ``grace`` seconds), then close what is left."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()  # the listener closes: a host redialling is refused
        await asyncio.gather(*(session.go_away(grace) for session in tuple(self.sessions)))
        await runner.cleanup()

    async def _open(self, app: web.Application) -> None:
        await self.host.open(self.config)

    async def _close(self, app: web.Application) -> None:
        await self.host.close()

    async def _going_away(self, app: web.Application) -> None:
        await asyncio.gather(
            *(s.socket.close(code=CLOSE_GOING_AWAY) for s in tuple(self.sessions)),
            return_exceptions=True,
        )

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        if self.token is not None:
            authorization = request.headers.get("Authorization")
            if not self.token.admits(authorization.encode() if authorization else None):
                body = error_response(Unauthorized("missing or wrong bearer token"))
                return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
        socket = web.WebSocketResponse(
            heartbeat=self.heartbeat,
            max_msg_size=self.max_message_bytes,
            decode_text=False,
        )
        if not socket.can_prepare(request).ok:
            return web.json_response(
                error_response(InvalidParams("this plugin speaks WebSocket: send an upgrade")),
                status=426,
            )
        await socket.prepare(request)
        session = PluginSession(
            self.host, socket, self.outbox, hello=self.hello, max_in_flight=self.max_in_flight
        )
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
        return socket


def _hello_of(host: PluginHost, plugin_id: str, version: str) -> bytes:
    plugin = host.plugin
    return hello_frame(
        plugin_id or str(getattr(plugin, "id", "") or type(plugin).__name__),
        version or str(getattr(plugin, "version", "") or "0.0.0"),
        list(host.methods),
        streaming=list(host.streaming),
    )


#: The schemes a gateway's WebSocket URL may have (aiohttp dials http(s) as ws(s)).
_GATEWAY_SCHEMES = frozenset({"ws", "wss", "http", "https"})


def checked_gateway_url(url: str) -> str:
    """``url`` if it can name a gateway; else ``ValueError``: a URL that can never reach
    one would otherwise be retried for ever, quietly."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        parts = urlsplit("")
    if parts.scheme.lower() not in _GATEWAY_SCHEMES or not parts.hostname:
        raise ValueError(
            "--url must be a ws:// or wss:// URL"
            f" (e.g. ws://127.0.0.1:8080/v1/plugins/connect), not {url!r}"
        )
    return url


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
) -> None:
    """Reverse mode: dial the gateway at ``url`` (``ws[s]://…/v1/plugins/connect``) as
    ``plugin_id@version`` and take calls over that connection, reconnecting after every
    drop (exponential backoff with full jitter, reset once a connection came up), until
    cancelled, or until ``stopping`` is set: then it says ``goaway``, answers the calls the
    gateway still sends until it closes the connection (at most ``GOAWAY_GRACE``), and
    returns. Runs the plugin's lifecycle around it. Raises ``Refused`` on 401/403/404.
    """
    stopping = stopping or asyncio.Event()
    checked_gateway_url(url)
    outbox = EventOutbox(max_buffered_events)
    if hasattr(host.plugin, "emit"):
        host.plugin._emit = outbox.emit
    hello = _hello_of(host, plugin_id, version)
    headers = {PLUGIN_ID_HEADER: plugin_id, PLUGIN_VERSION_HEADER: version}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    await host.open(config or {})
    backoff = initial_backoff
    try:
        async with aiohttp.ClientSession() as client:
            while not stopping.is_set():
                try:
                    socket = await client.ws_connect(
                        url,
                        headers=headers,
                        heartbeat=heartbeat,
                        max_msg_size=max_message_bytes,
                        ssl=ssl,
                        decode_text=False,
                        timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                    )
                except aiohttp.WSServerHandshakeError as error:
                    if error.status in (401, 403, 404):
                        raise Refused(error.status, error.message) from None
                    log.warning("the gateway answered %s; retrying", error.status)
                except (aiohttp.ClientError, OSError) as error:
                    log.info("cannot reach %s: %s; retrying", url, type(error).__name__)
                else:
                    session = PluginSession(
                        host, socket, outbox, hello=hello, max_in_flight=max_in_flight
                    )
                    if on_connected is not None:
                        outcome = on_connected()
                        if outcome is not None:
                            await outcome
                    try:
                        await _serve_until(session, stopping)
                    finally:
                        await socket.close()
                    if stopping.is_set():
                        return
                    log.info("connection to %s closed (%s); reconnecting", url, socket.close_code)
                    # Reset only once the gateway welcomed this plugin: one that closes
                    # every connection at once is otherwise redialled 20 times a second.
                    if session.welcomed:
                        backoff = initial_backoff
                # Full jitter: a gateway restarting is not hit by every plugin at once.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), random.uniform(0, backoff))
                backoff = min(backoff * 2, max_backoff)
    finally:
        await host.close()


async def _serve_until(session: PluginSession, stopping: asyncio.Event) -> None:
    """Serve ``session`` until its connection closes; if ``stopping`` is set first, go
    away on it (``PluginSession.go_away``) and return once it has closed."""
    running = asyncio.ensure_future(session.run())
    told = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([running, told], return_when=asyncio.FIRST_COMPLETED)
        if not running.done():
            await session.go_away()
        await running
    finally:
        for task in (running, told):
            task.cancel()
        await asyncio.gather(running, told, return_exceptions=True)


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
    * ``connect --url URL [--config JSON]``: reverse mode, dialling the gateway.

    The token comes from ``LINCHKIT_PLUGIN_TOKEN_FILE`` or ``LINCHKIT_PLUGIN_TOKEN``: for
    ``serve``, the one callers must present; for ``connect``, the one it presents.
    """
    import argparse
    import os
    import sys

    import orjson

    from linchkit_plugin.auth import TOKEN_FILE_ENV, TokenError

    if not argv or argv[0] not in ("serve", "connect"):
        return None
    if argv[0] == "serve" and "--websocket" not in argv:
        return None
    parser = argparse.ArgumentParser(prog=f"{os.path.basename(sys.argv[0])} {argv[0]}")
    parser.add_argument("--websocket", action="store_true")
    parser.add_argument("--address", default="127.0.0.1:0")
    parser.add_argument("--url")
    parser.add_argument("--config", default="{}")
    options = parser.parse_args(argv[1:])
    try:
        token = BearerToken.configured(os.environ.get(TOKEN_FILE_ENV) or None)
        config = orjson.loads(options.config)
    except (TokenError, orjson.JSONDecodeError) as error:
        sys.stderr.write(f"{argv[0]}: {error}\n")
        return 1
    host = PluginHost(plugin_class())
    if argv[0] == "connect":
        if not options.url:
            sys.stderr.write("connect: --url is required\n")
            return 1
        try:
            checked_gateway_url(options.url)
        except ValueError as error:
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
                stopping=stopping,
            )

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

    async def serve() -> int:
        server = WebSocketPluginServer(
            host, config=config, token=token, plugin_id=plugin_id, version=version
        )
        try:
            url = await server.start(*where)
        except OSError as error:
            await server.aclose()
            reason = error.strerror or error
            sys.stderr.write(f"serve: cannot listen on {options.address}: {reason}\n")
            return 1
        print(f"1|1|tcp|{url.removeprefix('ws://')}|websocket|", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for each in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(each, stop.set)
        try:
            await stop.wait()
        finally:
            await server.aclose()
        return 0

    return asyncio.run(serve())
