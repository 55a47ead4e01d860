"""A plugin found again behind one channel (``RestartWatch``): after its connection was
lost, ``Init`` and ``Start`` run again before any call goes.

``lifecycle: dispatcher`` (``providers.grpc``) gives a plugin its ``Init`` and ``Start``;
when the channel leaves READY the process may have gone (a redeploy, a crash) and the one
found again at the address has had neither. The protocol gives a process no identity of
its own, so every return to READY counts as a new process (``providers._grpc.lifecycle``,
``again``). Calls made meanwhile wait for it within their deadline (``wait``); a failed
``Init`` fails them with that error until the channel leaves READY again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from linchkit_plugin.errors import DeadlineExceeded, DispatchError

__all__ = ["RestartWatch"]


class RestartWatch:
    """Follows one channel's state for its connection (``PluginConnection.restarts``)."""

    __slots__ = ("_describe", "_loop_time", "_watching", "channel", "owed")

    def __init__(self, channel: Any, describe: str, loop_time: Callable[[], float]) -> None:
        #: The connection's channel; None once it is closed.
        self.channel: Any | None = channel
        self._describe = describe
        self._loop_time = loop_time
        #: The task that follows the channel's state (``watch``).
        self._watching: asyncio.Task[None] | None = None
        #: Once the channel has left READY, what calls wait for before they go: the plugin
        #: found again has had its ``Init`` and ``Start`` (done with an exception: they
        #: failed). Read by every call of the connection, so a plain attribute.
        self.owed: asyncio.Future[None] | None = None

    def watch(self, restart: Callable[[], Awaitable[None]]) -> None:
        """Follow the channel's state: once it has left READY (the plugin's process went
        away, or only its connection did), reconnect at once, and when it is READY again
        run ``restart`` (the plugin's ``Init`` and ``Start``) before any call goes. A
        call made meanwhile waits for it, within its deadline; one made while nothing
        answers at the address goes, and fails as never sent."""
        if self._watching is None and self.channel is not None:
            self._watching = asyncio.get_running_loop().create_task(
                self._follow(self.channel, restart)
            )

    @property
    def restart_owed(self) -> bool:
        """Whether the channel left READY since the plugin's last ``Init`` and ``Start``
        and the plugin it reaches now has not had them (or they failed): such a plugin
        gets no ``Stop`` nor ``Destroy``."""
        return self.owed is not None

    async def stop(self) -> None:
        """End ``watch`` (before ``Stop``: a connection lost then is not a restart)."""
        watching, self._watching = self._watching, None
        if watching is not None:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching

    async def close(self) -> None:
        """Stop watching and let go of the channel; calls waiting go on (and fail as on a
        closed connection)."""
        await self.stop()
        owed, self.owed = self.owed, None
        if owed is not None and not owed.done():
            owed.cancel()
        self.channel = None

    async def _follow(self, channel: Any, restart: Callable[[], Awaitable[None]]) -> None:
        import grpc

        ready = grpc.ChannelConnectivity.READY
        loop = asyncio.get_running_loop()
        state = channel.get_state()
        while True:
            owed = self.owed
            if state != ready:
                if owed is None or owed.done():
                    self.owed = loop.create_future()
            elif owed is not None and not owed.done():
                await self._restart(restart, owed)
                state = channel.get_state(try_to_connect=True)
                continue
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)

    async def _restart(
        self, restart: Callable[[], Awaitable[None]], owed: asyncio.Future[None]
    ) -> None:
        try:
            await restart()
        except DispatchError as error:
            # Calls fail with it at once until the channel leaves READY again (the next
            # process of the plugin gets its own Init): as a failed Init fails a start.
            owed.set_exception(error)
            owed.exception()  # retrieved: every waiting call raises a copy of its own
            return
        owed.set_result(None)
        if self.owed is owed:
            self.owed = None

    async def wait(self, deadline: float) -> None:
        """Hold a call until the plugin found again after a lost connection has had its
        ``Init`` and ``Start``; raise their failure."""
        import grpc

        ready = grpc.ChannelConnectivity.READY
        failing = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        while (owed := self.owed) is not None:
            if owed.done():
                error = None if owed.cancelled() else owed.exception()
                if isinstance(error, DispatchError):
                    raise error.with_message(
                        f"{self._describe}: the connection to the plugin was lost and is"
                        f" back, and running its lifecycle again failed: {error.message}"
                    )
                return
            channel = self.channel
            if channel is None:
                return  # closed: the call fails as on any closed connection
            state = channel.get_state(try_to_connect=True)
            if state == failing:
                return  # nothing answers at the address: the call fails as never sent
            remaining = deadline - self._loop_time()
            waits: list[asyncio.Future[Any]] = [owed]
            if state != ready:
                waits.append(asyncio.ensure_future(channel.wait_for_state_change(state)))
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"deadline passed before calling {self._describe}: the connection to"
                    " the plugin was lost and is back, and its Init and Start had not"
                    " finished"
                ) from None
            finally:
                for waiter in waits[1:]:
                    waiter.cancel()
