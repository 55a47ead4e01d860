"""How a plugin's gRPC server stops without a call lost unseen (``linchkit_plugin.grpc_server``).

grpc core's server, which grpcio's is, cancels every call it has received but not yet
handed to the service the moment shutdown begins, with ``CANCELLED`` (grpc/grpc#41785),
which a host cannot tell from a call cut off mid-run: about 30 per stop with 32 calls in
flight. Nothing in grpcio reaches that queue, so the server empties it first: once it is
stopping, each call it hands on is refused as not run (``UNAVAILABLE`` with the
``NOT_RUN_TRAILER`` trailer), the host sends no more on this connection, and once calls
have stopped arriving the queue is empty and shutting down cancels nothing (calls already
running finish).
"""

from __future__ import annotations

import asyncio
from typing import Any

from linchkit_plugin.handshake import NOT_RUN_TRAILER

__all__ = ["StopGate", "refuse_as_not_run"]


class StopGate:
    """The calls that reach a server's service, counted; once the server is stopping,
    each is to be refused as not run."""

    __slots__ = ("arrivals", "stopping")

    def __init__(self) -> None:
        #: Calls that have reached the service (``until_quiet`` watches it).
        self.arrivals = 0
        #: From then on a call is answered, not run.
        self.stopping = False

    def arrive(self) -> bool:
        """Count a call that reached the service; whether to refuse it as not run."""
        self.arrivals += 1
        return self.stopping

    async def until_quiet(self, *, quiet: float, most: float) -> None:
        """Return once no call has arrived for ``quiet`` seconds, or after ``most``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + most
        seen = -1
        while self.arrivals != seen and loop.time() < until:
            seen = self.arrivals
            await asyncio.sleep(quiet)

    def __repr__(self) -> str:
        return f"<StopGate arrivals={self.arrivals} stopping={self.stopping}>"


async def refuse_as_not_run(context: Any) -> None:
    """Refuse a call without running it, saying so (``NOT_RUN_TRAILER``): ends the call."""
    import grpc

    await context.abort(
        grpc.StatusCode.UNAVAILABLE,
        "the plugin is stopping: the call was not run",
        trailing_metadata=((NOT_RUN_TRAILER, "stopping"),),
    )
