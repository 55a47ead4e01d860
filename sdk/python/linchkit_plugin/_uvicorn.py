"""uvicorn, configured to survive slow and greedy clients: the one module that knows uvicorn.

uvicorn (0.54) bounds none of this by itself, whichever HTTP implementation runs:

* no timeout before a request's head is complete: its keep-alive timer is armed only
  after a response, and any byte received cancels it, so a new connection that sends
  nothing, or drips its headers one byte at a time (slowloris), stays open for ever;
* no limit on header size with httptools (h11 has ``h11_max_incomplete_event_size``);
* ``limit_concurrency`` does not limit connections: every connection is accepted, and
  while the count is reached each *request* gets a plain-text 503, so a few hundred idle
  sockets turn away every legitimate call and still hold their file descriptors.

So the protocol classes below (one per implementation, same mixin) add a head timer,
armed when a connection opens and when the first byte of a later request arrives, and
stopped when a request's head is complete; a header byte budget; and a hard connection
cap enforced at accept. A connection idle between requests is uvicorn's keep-alive
timer's alone (``keep_alive_timeout``), which must outlast the host's own idle timeout:
a server that closes a pooled connection just as the host sends a call on it drops a call
the host cannot tell apart from one the plugin ran (1-2 % of calls that came each time
the server's timer expired, before the head timer stopped closing idle connections after
10 s and the default went from 5 to 75 s, above the dispatcher's 30).
They rely on what both uvicorn protocols keep: ``transport``, ``connections`` (shared by
the server), ``cycle`` (the current request), ``on_response_complete`` and
``timeout_keep_alive_handler``; ``tests/test_python_plugin_server.py`` runs every guard
against both.

They also stop gracefully without losing calls. uvicorn's graceful stop closes every
keep-alive connection that is idle at that instant, and a host that sends its next call
on one just then sees the connection drop with its request written: it cannot tell
whether the plugin ran it, so only an idempotent method may be sent again (about 30 calls
per stop with 32 in flight). Here an idle connection stays open through the stop: its
next request is served and answered with ``Connection: close``, and one the host leaves
idle closes after ``DRAIN_IDLE_SECONDS``; new connections are refused, which a host
knows was never sent (``tests/test_python_plugin_server.py``). A connection the kernel had
completed but the server not yet accepted is accepted before the listener closes, which
would reset it with its request written (``_accept_the_queued``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import FrameType
from typing import Any

import orjson
import uvicorn
from uvicorn.lifespan.on import LifespanOn
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol

from linchkit_plugin._starting import StartFailed, end_the_start
from linchkit_plugin.errors import InvalidParams
from linchkit_plugin.limits import ServerLimits
from linchkit_plugin.stopping import STOP_GRACE_SECONDS
from linchkit_plugin.wire import error_response

__all__ = ["DRAIN_IDLE_SECONDS", "HTTP_IMPLEMENTATIONS", "run", "server_config"]

#: How long a connection idle when the server stops may still bring a request (at most
#: the keep-alive timeout): under load a host reuses a pooled connection within
#: milliseconds, and one idle that long closes as its keep-alive timer would have.
DRAIN_IDLE_SECONDS = 1.0
#: How long a stop lets the event loop accept the connections in a listener's accept queue
#: before closing it: under load new ones keep coming, so the wait is bounded.
ACCEPT_QUEUE_WAIT_SECONDS = 0.5
#: ``getsockopt(IPPROTO_TCP, TCP_INFO)``, Linux's only: the bytes read, and where
#: ``tcpi_unacked`` is in ``struct tcp_info`` (after 8 one-byte fields and four ``__u32``).
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None
_TCP_INFO_LENGTH = 104
_TCP_INFO_UNACKED = struct.Struct("=I")
_TCP_INFO_UNACKED_OFFSET = 24


def _raw_answer(status: str, body: dict[str, Any]) -> bytes:
    payload = orjson.dumps(body)
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + payload


class _GuardedProtocol:
    """Mixin over a uvicorn HTTP protocol: head timeout, header budget, connection cap."""

    limits: ServerLimits  # set on each subclass made by ``_guarded``
    transport: asyncio.Transport
    connections: set[Any]
    cycle: Any
    loop: asyncio.AbstractEventLoop

    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _seen_cycle: Any = None
    _draining = False
    #: uvicorn's own: closes an idle connection (a declaration only, not an override).
    timeout_keep_alive_handler: Callable[[], None]

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.limits.max_connections:
            transport.abort()  # over the cap: nothing read, nothing owed
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._await_head()  # the first byte of a request on a kept-alive connection
        awaiting_head = self._head_timer is not None
        if awaiting_head:
            self._head_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not self._seen_cycle:  # a request's head is complete
            self._seen_cycle = self.cycle
            self._stop_head_timer()
            if self._draining:  # its answer ends the connection (set before it starts)
                _ended_by(self.cycle)
        elif awaiting_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._seen_cycle = self.cycle
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._draining and not self.transport.is_closing():
            self._close_when_idle()  # an answer that went out before the stop: still open

    def shutdown(self) -> None:
        """The server is stopping: answer the request under way and the next one if it
        comes soon, the last answer saying ``Connection: close``, and close a connection
        left idle. (uvicorn's own closes an idle connection at once, and one whose answer
        had already started without the header right after it: either way the host's next
        call on it may already be on its way.)"""
        self._draining = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._close_when_idle()
        elif not cycle.response_started:
            _ended_by(cycle)

    def _close_when_idle(self) -> None:
        idle = min(DRAIN_IDLE_SECONDS, self.limits.keep_alive_timeout)
        self.loop.call_later(idle, self._close_if_idle)

    def _close_if_idle(self) -> None:
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.timeout_keep_alive_handler()

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_too_late)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes:
            late = InvalidParams(
                f"the request head did not arrive within {self.limits.header_timeout:g} s"
                " (--header-timeout, LINCHKIT_PLUGIN_HEADER_TIMEOUT)"
            )
            self.transport.write(_raw_answer("408 Request Timeout", error_response(late)))
        self.transport.close()

    def _refuse_head(self) -> None:
        self._stop_head_timer()
        too_big = InvalidParams(
            f"request headers are over this server's {self.limits.max_header_bytes}-byte"
            " limit (--max-header-bytes, LINCHKIT_PLUGIN_MAX_HEADER_BYTES)"
        )
        answer = _raw_answer("431 Request Header Fields Too Large", error_response(too_big))
        self.transport.write(answer)
        self.transport.close()


async def _accept_the_queued(listeners: Sequence[Any]) -> None:
    """Let the event loop accept every connection waiting in a listener's accept queue
    (at most ``ACCEPT_QUEUE_WAIT_SECONDS``), so that none is there when it closes.

    The kernel completes a TCP handshake before the server accepts the connection; closing
    the listener resets those still queued. Their host has written a request on a
    connection it saw open, and reads the reset as a call cut off mid-way, one the plugin
    may have run (under load, about one call in a few stops). Accepted, the connection is
    served as every connection open at the stop is: its request answered, then the
    connection closed. Linux tells a listener's queue length (``TCP_INFO``); elsewhere this
    waits for nothing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ACCEPT_QUEUE_WAIT_SECONDS
    # The kernel is asked again each millisecond: no event says a queue emptied.
    while any(_queued(sock) for sock in listeners) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.001)  # the loop accepts them meanwhile


def _queued(listener: Any) -> int:
    """Connections in ``listener``'s accept queue (0 when the kernel does not say)."""
    if _TCP_INFO is None or getattr(listener, "family", None) not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return 0
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LENGTH)
    except (OSError, AttributeError):
        return 0
    # A listener's tcpi_unacked is its accept queue's length (Linux's tcp_get_info).
    return int(_TCP_INFO_UNACKED.unpack_from(info, _TCP_INFO_UNACKED_OFFSET)[0])


def _ended_by(cycle: Any) -> None:
    """Make ``cycle``'s answer the connection's last, and say so to the host: httptools'
    cycle adds ``Connection: close`` when it is not kept alive, h11's only closes after."""
    cycle.keep_alive = False
    cycle.default_headers = [*cycle.default_headers, CLOSE_HEADER]


def _implementations() -> dict[str, type[asyncio.Protocol]]:
    found: dict[str, type[asyncio.Protocol]] = {"h11": H11Protocol}
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional: h11 is pure Python and always there
        pass
    else:
        found["httptools"] = HttpToolsProtocol
    return found


#: The HTTP implementations available here, fastest last.
HTTP_IMPLEMENTATIONS = _implementations()


def _guarded(base: type[asyncio.Protocol], limits: ServerLimits) -> type[asyncio.Protocol]:
    namespace = {"limits": limits, "__module__": __name__}
    return type(f"Guarded{base.__name__}", (_GuardedProtocol, base), namespace)


def server_config(
    app: Any,
    limits: ServerLimits,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    uds: str | None = None,
    http: str | None = None,
    loop: str = "auto",
    log_level: str = "warning",
    tls_cert: str | None = None,
    tls_key: str | None = None,
    client_ca: str | None = None,
    stop_grace: float = STOP_GRACE_SECONDS,
) -> uvicorn.Config:
    """A uvicorn ``Config`` serving ``app`` with every guard of ``limits`` in place; at a
    stop, the calls in flight get ``stop_grace`` seconds, then are cancelled.

    ``tls_cert``/``tls_key``: serve HTTPS. ``client_ca``: require every client to present
    a certificate signed by it (mTLS); the handshake of a client without one fails, so an
    unauthenticated caller never reaches the plugin.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
    if client_ca is not None and tls_cert is None:
        raise ValueError("--client-ca needs TLS (--tls-cert, --tls-key)")
    implementation = http or list(HTTP_IMPLEMENTATIONS)[-1]
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        uds=uds,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        loop=loop,
        http=_guarded(HTTP_IMPLEMENTATIONS[implementation], limits),
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # a float works
        h11_max_incomplete_event_size=limits.max_header_bytes,
        # The head timer and the connection cap above do what limit_concurrency cannot;
        # a request admitted past them is bounded by the plugin's own deadlines.
        limit_concurrency=None,
        # The calls in flight at a stop get the grace every binding gives them, then are
        # cancelled; the lifespan's shutdown (the stop and destroy hooks) runs after.
        # uvicorn's default waited for them without a bound.
        timeout_graceful_shutdown=stop_grace,  # type: ignore[arg-type]  # a float works
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        ssl_ca_certs=client_ca,
        ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca is not None else ssl.CERT_NONE,
    )


def listening_address(sockets: Sequence[socket.socket], *, tls: bool = False) -> str:
    """Where ``sockets`` listen, for people: ``http://127.0.0.1:8081`` or ``unix:/path``."""
    scheme = "https" if tls else "http"
    addresses = []
    for sock in sockets:
        name = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            addresses.append(f"unix:{name}")
        elif sock.family == socket.AF_INET6:
            addresses.append(f"{scheme}://[{name[0]}]:{name[1]}")
        else:
            addresses.append(f"{scheme}://{name[0]}:{name[1]}")
    return " and ".join(addresses)


class _PluginLifespan(LifespanOn):
    """uvicorn's lifespan, less its log lines when the app's startup failed: ``run``
    raises ``StartFailed`` with the app's message instead, which ``serve`` says in one
    line and exit 1 (uvicorn logged the message, then "Application startup failed.
    Exiting.", and exited 3). Anything else goes as uvicorn has it: its own ``startup`` is
    not rewritten here, its closing line only filtered out (uvicorn's code changes between
    releases, its words have not)."""

    failure: str | None = None

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.logger.addFilter(self._unless_said_by_run)

    def _unless_said_by_run(self, record: logging.LogRecord) -> bool:
        return self.failure is None or record.getMessage() != _STARTUP_FAILED

    async def send(self, message: Any) -> None:
        if message["type"] == "lifespan.startup.failed":
            self.failure = str(message.get("message") or "the plugin's init/start failed")
            message = {**message, "message": ""}  # said by ``run``'s caller, not logged
        await super().send(message)


#: uvicorn's line for a failed startup, which ``_PluginLifespan`` leaves to ``serve``.
_STARTUP_FAILED = "Application startup failed. Exiting."


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that says where it listens once it does (the port of ``--port 0``),
    and lets its owner act first when it is told to stop (leave a registry before the
    calls in flight are drained)."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_listening: Callable[[Sequence[socket.socket]], None] | None,
        on_stopping: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_listening = on_listening
        self._on_stopping = on_stopping

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        lifespan = self.lifespan = _PluginLifespan(self.config)  # in place of uvicorn's
        try:
            await super().startup(sockets)
        except SystemExit:
            if lifespan.failure is not None:
                raise StartFailed(lifespan.failure) from None
            raise
        finally:  # uvicorn's logger is the process's: a filter left on it outlives us
            lifespan.logger.removeFilter(lifespan._unless_said_by_run)
        if self.started and self._on_listening is not None:
            self._on_listening([sock for server in self.servers for sock in server.sockets])

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's, but while the lifespan runs the plugin's init/start hooks: then the
        signal ends the process (``end_the_start``). uvicorn only noted it, and went on
        waiting for hooks that may never finish."""
        lifespan = getattr(self, "lifespan", None)
        if not self.started and lifespan is not None and not lifespan.startup_event.is_set():
            end_the_start(sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._on_stopping is not None:
            await self._on_stopping()
        await _accept_the_queued([sock for server in self.servers for sock in server.sockets or ()])
        # Nothing awaited from here to the listeners' close, the first thing uvicorn's
        # shutdown does: only a handshake completed in that instant can still be reset.
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, less raising the signal that stopped the server again once it has
        shut down: with SIGTERM's default action back, that ended the process as killed
        by it (exit status 143) after a graceful stop. The stop is over by then (the
        calls drained, the hooks run or abandoned): the process exits 0, as the SDK's
        gRPC and WebSocket executables do."""
        with super().capture_signals():
            try:
                yield
            finally:  # before uvicorn's own exit, which raises what it captured
                self._captured_signals.clear()


def run(
    config: uvicorn.Config,
    on_listening: Callable[[str], None] | None = None,
    *,
    on_sockets: Callable[[Sequence[socket.socket]], None] | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then run the plugin's ``stop``/``destroy``.

    ``on_listening`` gets the address once the server accepts connections, ``on_sockets``
    the listening sockets; ``on_stopping`` is awaited once it is told to stop, before the
    connections are drained. ``StartFailed`` when the plugin's init/start failed.
    """

    def listening(sockets: Sequence[socket.socket]) -> None:
        if on_listening is not None:
            on_listening(listening_address(sockets, tls=config.is_ssl))
        if on_sockets is not None:
            on_sockets(sockets)

    _AnnouncingServer(config, listening, on_stopping).run()
