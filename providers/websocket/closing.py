"""How the dispatcher ends a WebSocket connection: ``close_socket`` closes it without
waiting for what is buffered to drain, and ``let_go`` then gives a plugin that may still
be reading the rest a grace to take it, aborting the socket at its end; ``hang_up`` drops
it at once, waiting neither for the plugin's close frame nor for it to read;
``close_message`` is a close frame's reason as it fits. Used by the channel's lifecycle (a
close, a drain, a stalled or trickling plugin), which owns the grace, and by the provider
(a refused hello).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

from aiohttp import WSCloseCode, WSMsgType, web

from providers.websocket.writer import Socket, cancelled_by_owner

__all__ = ["close_message", "close_socket", "hang_up", "let_go"]

#: How often a grace (``let_go``) looks whether the plugin has taken what was buffered.
_LET_GO_POLL_SECONDS = 0.02


def close_message(reason: str) -> bytes:
    """``reason`` as a close frame carries it: 123 bytes of UTF-8 at most (the frame's
    payload is 125, the code takes 2), never cut inside a character."""
    return reason.encode()[:123].decode(errors="ignore").encode()


def _transport_of(socket: Socket) -> asyncio.Transport | None:
    """The transport under ``socket``, to abort. aiohttp (3.14) offers no abort of a
    WebSocket; both of its WebSocket classes write through a ``WebSocketWriter`` whose
    ``transport`` is the connection's. None if that ever changes: closes are then
    graceful only, as before (``tests/test_websocket_drop.py`` fails, and says so)."""
    transport = getattr(getattr(socket, "_writer", None), "transport", None)
    if not hasattr(transport, "abort") or not hasattr(transport, "get_write_buffer_size"):
        return None
    return cast(asyncio.Transport, transport)  # uvloop's is not one, but has these


async def hang_up(socket: Socket, code: int, reason: str) -> None:
    """Drop the connection at once: hand the close frame (``code``, ``reason``) to the
    socket if it can take it now, and abort the transport rather than close it. A graceful
    close waits for the plugin's close frame (aiohttp's close timeout), and asyncio keeps a
    closed transport's socket open until what is buffered for it drains, which a plugin
    that reads nothing never lets happen: the descriptor and megabytes of buffered frames
    stayed for as long as the plugin kept its end open. Its caller closes the socket
    afterwards (which then returns at once), so that aiohttp's state and timers end too."""
    transport = _transport_of(socket)
    if transport is None or transport.is_closing():
        return
    if _buffered(transport) == 0:
        # Nothing ahead of it: aiohttp writes it to the socket without waiting. Behind a
        # full buffer it would never reach the plugin before the abort.
        frame = code.to_bytes(2, "big") + close_message(reason)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await socket.send_frame(frame, WSMsgType.CLOSE)
    transport.abort()


async def close_socket(socket: Socket, code: int, reason: str) -> asyncio.Transport | None:
    """Close the socket, not waiting for its buffer to drain: a plugin that does not
    read would hold the close for good (aiohttp's server waits by default).

    asyncio keeps a closed transport's socket open until what is buffered for it drains,
    which a plugin that reads nothing never lets happen. One aiohttp found gone (1006:
    no pong, a read timeout), or whose close was cancelled, is aborted now. One that may
    still be reading what is buffered (the close frame is at its end) is returned: its
    caller gives it a grace (``let_go``). None when nothing is left to let go."""
    message = close_message(reason)
    try:
        with contextlib.suppress(ConnectionError, RuntimeError):
            try:
                if isinstance(socket, web.WebSocketResponse):
                    await socket.close(code=code, message=message, drain=False)
                else:
                    await socket.close(code=code, message=message)
            except asyncio.CancelledError:
                # Not ours: aiohttp's close awaited the drain future a stalled write
                # cancelled; it has closed the transport all the same.
                if cancelled_by_owner():
                    raise
    except BaseException:
        _abort_if_buffered(_transport_of(socket))  # nobody is left to give it a grace
        raise
    transport = _transport_of(socket)
    if transport is None or _buffered(transport) == 0:
        return None
    if socket.close_code == WSCloseCode.ABNORMAL_CLOSURE:
        transport.abort()
        return None
    return transport


async def let_go(transport: asyncio.Transport, within: float) -> None:
    """The grace after a graceful close: give a plugin that may still be reading up to
    ``within`` seconds to take what is buffered for it, then abort the transport; abort
    it at once if cancelled. Ends as soon as the buffer is empty."""
    loop = asyncio.get_running_loop()
    due = loop.time() + within
    try:
        # Looked at, not awaited: asyncio tells only the transport's protocol (aiohttp's)
        # when a closed transport's buffer has drained. A grace is rare (a plugin that
        # closed first with data still buffered for it) and short.
        while _buffered(transport) > 0 and loop.time() < due:  # noqa: ASYNC110
            await asyncio.sleep(_LET_GO_POLL_SECONDS)
    finally:
        _abort_if_buffered(transport)


def _abort_if_buffered(transport: asyncio.Transport | None) -> None:
    if transport is not None and _buffered(transport) > 0:
        transport.abort()


def _buffered(transport: asyncio.Transport) -> int:
    """The bytes ``transport`` still holds for the plugin. asyncio's TLS transport closed a
    second time forgets its TLS protocol, and asking it then raises ``AttributeError``
    (CPython 3.11, the version here): aiohttp closes it on this side's close, and again
    as the plugin's side goes, which a plugin that answers a close at once (over
    ``wss://``, inbound connections and dialled ones alike) does within that close. It is
    gone then, and holds nothing."""
    try:
        return transport.get_write_buffer_size()
    except AttributeError:
        return 0
