"""What lets a closed ``PluginConnection`` hold nothing of grpc.aio's, and its errors neither.

grpc.aio keeps its core running (a poller thread, the event engine's threads, their epoll,
eventfd and socket descriptors) while any of its channel or call objects lives: every one
counts as a user of the core (grpc/grpc#23945), closed or not. So nothing a caller may keep
reaches one once the connection has closed:

* ``ClosedStub`` takes the place of the stub (which holds the channel) on ``close``: every
  RPC is refused at once, as grpc.aio refuses one on a closed channel;
* ``StreamCall`` holds the call of one open stream where ``close`` can let go of it, however
  long a consumer keeps the stream's generator suspended;
* ``drop_grpc_frames`` cuts grpc.aio's own frames, whose locals hold the call, from the
  traceback of every exception leaving the connection.

A host that keeps the error of a call it cancelled, or a stream it broke out of, and closes
its dispatcher, has nothing of grpc's left running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

__all__ = ["ClosedStub", "StreamCall", "drop_grpc_frames"]


def drop_grpc_frames(error: BaseException) -> None:
    """Cut ``error``'s traceback below the frame handling it (ours). The frames below are
    grpc.aio's, and their locals hold the call object: a caller keeping our error (its
    ``__cause__`` or ``__context__``) would keep the call, and grpc's core with it, long
    after the dispatcher closed (see the module docstring)."""
    traceback = error.__traceback__
    if traceback is not None:
        traceback.tb_next = None


def _refuse(*args: Any, **kwargs: Any) -> NoReturn:
    """Any RPC of a closed connection."""
    import grpc.aio

    raise grpc.aio.UsageError("Channel is closed.")


class ClosedStub:
    """The stub of a closed connection: every RPC is refused at once with the error grpc.aio
    raises on a closed channel (so it translates alike), and nothing of grpc's is held."""

    __slots__ = ()

    def __getattr__(self, rpc: str) -> Callable[..., Any]:
        return _refuse


class StreamCall:
    """The gRPC call of one open stream, held where ``PluginConnection.close`` can let go of
    it. A consumer that stops iterating without closing the stream (a ``break`` out of
    ``async for``) leaves the generators suspended with whatever their frames hold, for as
    long as it keeps the stream; the call is not one of them."""

    __slots__ = ("call", "messages")

    def __init__(self, call: Any) -> None:
        self.call: Any = call
        self.messages: AsyncIterator[Any] | None = call.__aiter__()  # as ``async for`` reads

    async def next_item(self) -> Any:
        """The next ``StreamItem``; None at the end of the stream. Once dropped, the
        ``CancelledError`` grpc.aio raises for a call its closing channel cancelled."""
        messages = self.messages
        if messages is None:
            raise asyncio.CancelledError
        return await anext(messages, None)

    async def close(self) -> None:
        """``drop``, and end the reader grpc.aio made for the call. Left suspended (a
        stream that ended on its plugin's error item before grpc read the end), that reader
        and the call hold each other: a cycle only the garbage collector breaks, which kept
        grpc's core running after ``aclose``. Suspended at a ``yield``, it ends at once."""
        messages = self.messages
        self.drop()
        if messages is not None:
            with contextlib.suppress(Exception):
                await messages.aclose()  # type: ignore[attr-defined]

    def drop(self) -> None:
        """Cancel the call (if still running) and let go of it."""
        call = self.call
        self.call = self.messages = None
        if call is not None:
            call.cancel()
