"""When a connection admitted by its credentials checks them again.

An event stream (``/v1/events``) and a plugin dialling in (``/v1/plugins/connect``) are
authenticated at their upgrade and may stay open for days. Each checks the credentials it
presented again every ``RECHECK_SECONDS``, and once its principal's proof expires
(``Principal.expires_at``: a bearer token's ``exp``, with the leeway its check allows), so
a token expired, a key withdrawn or a manifest's token changed by a reload ends it within
that long, with ``CREDENTIALS_ENDED``. Only a refusal ends it: a check that could not be
made (a host authenticator's backend down, the dispatcher draining) leaves it open.

Connections holding the same credentials share their checks (``Rechecks``): one check
per distinct credentials per ``RECHECK_SECONDS``, and one when their proof expires,
whose answer every connection holding them takes. A thousand event streams opened with
one API key cost a host's authenticator one call a minute, not a thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from linchkit_plugin.errors import DispatchError, Forbidden, PluginNotFound, Unauthorized

__all__ = ["CREDENTIALS_ENDED", "RECHECK_SECONDS", "Rechecks", "seconds_to_next_check"]

log = logging.getLogger("dispatcher.gateway")

#: The close code of a connection whose credentials no longer hold (RFC 6455: policy
#: violation).
CREDENTIALS_ENDED = 1008
#: How often a connection's credentials are checked again, besides when its principal's
#: proof expires: how long a revoked key or a changed role takes to reach it.
RECHECK_SECONDS = 60.0
#: How long after an ``expires_at`` the check comes: a token is refused only once the
#: clock has passed it.
_EXPIRY_MARGIN = 0.05


def seconds_to_next_check(expires_at: float | None) -> float:
    """How long to wait before the next check of credentials whose proof expires at
    ``expires_at`` (wall-clock seconds; None: never). Not at once, over and over, once it
    has passed: an authenticator that still accepts then is asked at the usual pace."""
    wait = RECHECK_SECONDS
    left = None if expires_at is None else expires_at - time.time()
    if left is not None and left > -_EXPIRY_MARGIN:
        wait = min(wait, max(left, 0.0) + _EXPIRY_MARGIN)
    return wait


Outcome = TypeVar("Outcome")


class Rechecks:
    """The re-checks of the connections of one gateway: one task per distinct
    credentials held open (``key``), started by the first connection holding them and
    ended when the last one closes, or by ``aclose``."""

    def __init__(self) -> None:
        self._watches: dict[Hashable, _Watch[Any]] = {}
        #: Tasks of watches whose last connection closed, until they have ended.
        self._ending: set[asyncio.Task[None]] = set()

    async def until_refused(
        self,
        key: Hashable,
        check: Callable[[], Awaitable[Outcome]],
        expires_at: float | None,
        *,
        expiry: Callable[[Outcome], float | None],
        checked: Callable[[Outcome], None] | None = None,
    ) -> None:
        """Return once the credentials ``key`` names are refused: ``check`` raises
        ``Unauthorized``, ``Forbidden`` or ``PluginNotFound``. It is made as often as
        ``seconds_to_next_check`` says, once for every connection holding ``key`` (the
        first one's ``check``: it must depend on ``key`` alone), ``expiry`` its outcome's
        end of proof; each connection's ``checked`` is given every outcome. A check that
        could not be made (another error: a host authenticator's backend down, the
        dispatcher draining) is logged and made again at the next time. ``expires_at``:
        when the proof this connection was admitted with ends (None: no end known)."""
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = _Watch(check, expiry, expires_at)
            watch.task = asyncio.create_task(self._run(key, watch))
        holder: _Holder[Outcome] = _Holder(asyncio.get_running_loop().create_future(), checked)
        watch.join(holder, expires_at)
        try:
            await holder.refused
        finally:
            watch.holders.discard(holder)
            if not watch.holders and self._watches.get(key) is watch:
                self._end(key, watch)

    async def _run(self, key: Hashable, watch: _Watch[Any]) -> None:
        try:
            await watch.run()
        finally:
            if self._watches.get(key) is watch:  # refused: gone before its holders leave
                del self._watches[key]

    def _end(self, key: Hashable, watch: _Watch[Any]) -> None:
        del self._watches[key]
        task = watch.task
        if task is not None and not task.done():
            task.cancel()
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def aclose(self) -> None:
        """End every re-check (the gateway stops: its connections are closing)."""
        for key, watch in list(self._watches.items()):
            self._end(key, watch)
        ending = tuple(self._ending)
        await asyncio.gather(*ending, return_exceptions=True)

    def __repr__(self) -> str:
        holders = sum(len(watch.holders) for watch in self._watches.values())
        return f"<Rechecks credentials={len(self._watches)} connections={holders}>"


class _Holder(Generic[Outcome]):
    """One connection holding a watch's credentials."""

    __slots__ = ("checked", "refused")

    def __init__(
        self, refused: asyncio.Future[None], checked: Callable[[Outcome], None] | None
    ) -> None:
        self.refused = refused
        self.checked = checked


class _Watch(Generic[Outcome]):
    """The checks of one set of credentials, for every connection holding them."""

    def __init__(
        self,
        check: Callable[[], Awaitable[Outcome]],
        expiry: Callable[[Outcome], float | None],
        expires_at: float | None,
    ) -> None:
        self.check = check
        self.expiry = expiry
        self.holders: set[_Holder[Outcome]] = set()
        self.task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        #: When the next check is due (the loop's clock); the soonest a connection that
        #: joined during the check under way needs the one after; what wakes the wait
        #: when a connection joins whose proof ends sooner.
        self._expires_at = expires_at
        self._due = self._loop.time() + seconds_to_next_check(expires_at)
        self._joined_due = math.inf
        self._sooner = asyncio.Event()

    def join(self, holder: _Holder[Outcome], expires_at: float | None) -> None:
        """Hold the credentials for one more connection. Its proof may end before the
        next check (another proof of the same credentials, from a host's authenticator):
        the check comes at that end then, exact as for a connection of its own. Never
        later than the watch's next check: a connection joining waits no longer than
        ``RECHECK_SECONDS`` for its first."""
        self.holders.add(holder)
        due = self._loop.time() + seconds_to_next_check(expires_at)
        self._joined_due = min(self._joined_due, due)
        if due < self._due:
            self._due = due
            self._sooner.set()

    async def run(self) -> None:
        """Check when due, until refused; then every holder's ``refused`` is set."""
        while True:
            while (left := self._due - self._loop.time()) > 0:
                self._sooner.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._sooner.wait()
            self._joined_due = math.inf
            try:
                outcome = await self.check()
            except (Unauthorized, Forbidden, PluginNotFound):
                for holder in self.holders:
                    if not holder.refused.done():
                        holder.refused.set_result(None)
                return
            except DispatchError as error:  # not checked: the end known before stands
                log.warning("could not check a connection's credentials again: %s", error)
            except Exception as error:  # a bug must not end the checks of every holder
                log.error(
                    "checking a connection's credentials again failed with %s",
                    type(error).__name__,  # its message may quote the credentials
                )
            else:
                for holder in tuple(self.holders):
                    if holder.checked is not None:
                        holder.checked(outcome)
                self._expires_at = self.expiry(outcome)
            next_due = self._loop.time() + seconds_to_next_check(self._expires_at)
            self._due = min(next_due, self._joined_due)
