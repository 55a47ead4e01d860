"""The HTTP port's listening sockets: each connection is admitted or refused as it is
accepted, before a protocol, a TLS handshake or a buffer is spent on it.

``loop.create_server`` hands every connection it accepts to a protocol, and on TLS only
after the handshake (asyncio's default limit for it: 60 s), so a limit kept by the
protocols could neither see a connection stuck in its handshake nor refuse one before
paying for it. So the gateway accepts for itself: the listening sockets are read with
``loop.add_reader``, each connection accepted is put to the port's ``ConnectionLimit``
(``dispatcher.gateway.connections``) by its peer's address, and

- admitted, it is handed to ``loop.connect_accepted_socket`` with its ``Seat``, which the
  protocol that serves it (the call lane, or aiohttp's) gives back when it closes, or this
  module when its TLS handshake fails (the client told why by TLS's alert:
  ``dispatcher.gateway.tls_alerts``) or does not end within ``header_timeout``;
- refused, on plain HTTP it is answered at once with what ``refusal_answer`` makes (the
  gateway's 503 ``overloaded`` with ``Connection: close`` and ``Retry-After``), written
  without waiting (a few hundred bytes into an empty socket buffer), after reading what
  the client has sent already so that closing does not reset the connection under the
  answer; on TLS it is closed without a word, since an answer would need the handshake
  the refusal saves. Either way the connection is closed before the next one is accepted.

When the process runs out of file descriptors (``EMFILE``: more connections than
RLIMIT_NOFILE allows, the limits set too high), accepting pauses for
``ACCEPT_RETRY_SECONDS`` and the connections wait in the kernel's backlog, as asyncio's
own server does; a line is logged at most every ``LOG_INTERVAL`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

from dispatcher.gateway.connections import LOG_INTERVAL, ConnectionLimit, Refusal, Seat, peer_of
from dispatcher.gateway.tls_alerts import accept_tls

__all__ = ["ACCEPT_RETRY_SECONDS", "Listener", "SeatedProtocols"]

log = logging.getLogger("dispatcher.gateway")

#: How long accepting pauses when the process has no file descriptor left (asyncio's).
ACCEPT_RETRY_SECONDS = 1.0
#: What a refused connection may have sent already that is read (and dropped) before it
#: is answered: a request head and a call's body at the call lane's largest.
_DRAINED = 72 * 1024
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class SeatedProtocols(Protocol):
    """Makes the protocol of a new connection, which releases ``seat`` when it closes."""

    def __call__(self, *, seat: Seat | None = None) -> asyncio.Protocol: ...


class Listener:
    """Listens on ``host:port``; ``start`` binds and accepts, ``aclose`` stops."""

    def __init__(
        self,
        limit: ConnectionLimit,
        protocols: SeatedProtocols,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
        refusal_answer: Callable[[Refusal], bytes] | None,
        backlog: int,
    ) -> None:
        self.limit = limit
        self._protocols = protocols
        self._ssl = ssl_context
        self._handshake_timeout = handshake_timeout
        # On TLS an answer would need the handshake the refusal saves: closed unanswered.
        self._refusal_answer = refusal_answer if ssl_context is None else None
        self._backlog = backlog
        self.sockets: list[socket.socket] = []
        #: Connections handed to the loop whose transport is not made yet (their TLS
        #: handshake under way): cancelled at a stop.
        self._connecting: set[asyncio.Task[None]] = set()
        self._resume: asyncio.TimerHandle | None = None
        #: Logs the refusals that came after the last line when its interval ends.
        self._flushing: asyncio.TimerHandle | None = None
        self._next_log = -float("inf")
        #: Where what a refused connection sent already is read into, and dropped.
        self._drained = memoryview(bytearray(_DRAINED))

    async def start(self, host: str, port: int) -> None:
        """Bind every address ``host`` resolves to (as ``loop.create_server``) and accept."""
        loop = asyncio.get_running_loop()
        found = await loop.getaddrinfo(
            host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        try:
            for family, kind, proto, _, address in dict.fromkeys(found):
                listening = socket.socket(family, kind, proto)
                self.sockets.append(listening)
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    listening.bind(address)
                except OSError as error:
                    raise OSError(
                        error.errno,
                        f"error while attempting to bind on address {address!r}:"
                        f" {(error.strerror or '').lower()}",
                    ) from None
                listening.listen(self._backlog)
                listening.setblocking(False)
        except BaseException:
            self.close()
            raise
        for listening in self.sockets:
            loop.add_reader(listening.fileno(), self._accept, listening)

    def _accept(self, listening: socket.socket) -> None:
        """The listening socket is readable: accept what is waiting, a backlog at most."""
        for _ in range(self._backlog):
            try:
                connection, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client gave up while it waited
                continue
            except OSError as error:
                if error.errno in _OUT_OF_RESOURCES:
                    self._pause(listening, error)
                else:
                    log.error("accepting a connection failed: %s", error)
                return
            self._admit(connection, address)

    def _admit(self, connection: socket.socket, address: object) -> None:
        seat = self.limit.admit(peer_of(address))
        if not isinstance(seat, Seat):
            self._refuse(connection, seat)
            if self._flushing is None and self.limit.unlogged:
                self._flushing = asyncio.get_running_loop().call_later(
                    self.limit.log_due_in(), self._flush
                )
            return
        connection.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._connect(connection, seat))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def _refuse(self, connection: socket.socket, refusal: Refusal) -> None:
        try:
            if self._refusal_answer is not None:
                connection.setblocking(False)
                with contextlib.suppress(OSError):
                    # What the client sent already: left unread, closing would send a
                    # reset, which may destroy the answer before the client reads it.
                    connection.recv_into(self._drained)
                with contextlib.suppress(OSError):
                    connection.send(self._refusal_answer(refusal))
        finally:
            connection.close()

    def _flush(self) -> None:
        self._flushing = None
        self.limit.flush()

    async def _connect(self, connection: socket.socket, seat: Seat) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._ssl is None or self._ssl.verify_mode == ssl.CERT_NONE:
                await loop.connect_accepted_socket(
                    lambda: self._protocols(seat=seat),
                    connection,
                    ssl=self._ssl,
                    ssl_handshake_timeout=self._handshake_timeout if self._ssl else None,
                )
            else:
                # Client certificates checked: one refused is told why by TLS's alert
                # (dispatcher.gateway.tls_alerts). Without them a handshake fails on the
                # client's side, which knows why, and the loop's own TLS serves it.
                await accept_tls(
                    lambda: self._protocols(seat=seat),
                    connection,
                    self._ssl,
                    self._handshake_timeout,
                )
        except asyncio.CancelledError:
            seat.release()
            raise
        except Exception as error:  # a TLS handshake that failed or took too long
            seat.release()  # the loop closed the connection; no protocol holds the seat
            log.debug("a connection from %s ended before it was served: %r", seat.peer, error)

    def _pause(self, listening: socket.socket, error: OSError) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._next_log:
            self._next_log = now + LOG_INTERVAL
            log.error(
                "cannot accept connections (%s): the process is out of file descriptors;"
                " accepting pauses %g s at a time, new connections wait in the kernel's"
                " backlog (%s open on this port; raise RLIMIT_NOFILE or lower"
                " gateway.max_connections)",
                error.strerror,
                ACCEPT_RETRY_SECONDS,
                self.limit.open,
            )
        fileno = listening.fileno()
        loop.remove_reader(fileno)
        self._resume = loop.call_later(
            ACCEPT_RETRY_SECONDS, loop.add_reader, fileno, self._accept, listening
        )

    def close(self) -> None:
        """Stop listening: from now on a client's connect is refused by the kernel."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        self.limit.flush()  # the last refusals are said, not lost with the port
        loop = asyncio.get_running_loop()
        for listening in self.sockets:
            if listening.fileno() >= 0:
                loop.remove_reader(listening.fileno())
            listening.close()

    async def aclose(self) -> None:
        """``close``, and end the TLS handshakes under way."""
        self.close()
        connecting = tuple(self._connecting)
        for task in connecting:
            task.cancel()
        if connecting:
            await asyncio.wait(connecting)

    def __repr__(self) -> str:
        where = [listening.getsockname() for listening in self.sockets if listening.fileno() >= 0]
        return f"<Listener {where} {self.limit!r} connecting={len(self._connecting)}>"
