"""The circuit breakers shared on Redis: their operations, the answer a replica keeps for
each, and who is told where each stands (``RedisBreakers``).

Each operation is one script (``_scripts.BREAKER``) on the breaker's hash. A replica keeps
the last answer for ``breaker_sync_ms`` (``SharedBreaker.admit`` admits on it without
asking) unless a transition was pushed after the operation was sent; a pushed transition
drops the kept answer at once and reads where the breaker stands for its watcher (metrics,
logs). The pushes are received by the backend (``redis_store``), which hands a breaker's
here; while they are not received (``subscribed`` false) nothing is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher.state import _scripts
from dispatcher.state.redis_connection import Run
from dispatcher.state.shared_store import BreakerPolicyArgs, BreakerView
from linchkit_plugin.errors import DispatchError

__all__ = ["BREAKER_TTL_MS", "RedisBreakers"]

log = logging.getLogger("dispatcher.state")

#: How long a breaker hash lives without being touched: long past any reset timeout.
BREAKER_TTL_MS = 86_400_000


class RedisBreakers:
    """The shared breakers of one backend: ``admit``/``record`` run their script, ``view``
    is the answer kept, ``watch`` names who is told where a breaker stands."""

    def __init__(
        self,
        client: Any,
        run: Run,
        *,
        key: Callable[[str], str],
        channel: str,
        where: str,
        op_timeout: float,
        clock: Callable[[], float],
        spawn: Callable[[Awaitable[Any], str], None],
    ) -> None:
        """``key(name)``: the Redis key of breaker ``name``'s hash. ``spawn``: the backend's,
        for reads nothing waits for."""
        self._client = client
        self._run = run
        self._key = key
        self._channel = channel
        self._where = where
        self._op_timeout = op_timeout
        self._clock = clock
        self._spawn = spawn
        self._script = client.register_script(_scripts.BREAKER)
        self._views: dict[str, tuple[BreakerView, float]] = {}
        #: When a transition of each breaker was last pushed (``_may_keep``).
        self._pushed_at: dict[str, float] = {}
        #: ``watch``: who is told where each breaker stands, by key.
        self._watchers: dict[str, Callable[[str, int, int], None]] = {}
        self.subscribed = False  # notifications connected: a push will reach us

    async def operate(
        self, key: str, policy: BreakerPolicyArgs, op: str, probe: bool, deadline: float
    ) -> BreakerView:
        """Run ``op`` (``admit``, or an outcome to record) on breaker ``key``."""
        args = (
            op,
            policy.fail_max,
            int(policy.reset_timeout * 1_000_000),
            policy.half_open_max_calls,
            policy.success_threshold,
            "1" if probe else "0",
            self._channel,
            key,
            BREAKER_TTL_MS,
        )
        keys = (self._key(key),)
        sent = self._clock()
        state, failures, admitted, is_probe, wait_us, generation = await self._run(
            "a circuit breaker", deadline, lambda: self._script(keys=keys, args=args)
        )
        view = BreakerView(
            state.decode() if isinstance(state, bytes) else str(state),
            int(failures),
            bool(admitted),
            bool(is_probe),
            int(wait_us) / 1_000_000,
            int(generation),
        )
        seen = self._watchers.get(key)
        if seen is not None:  # else unwatched while this ran: nothing is kept of it
            if self._may_keep(key, view, sent):
                self._views[key] = (view, sent)
            seen(view.state, view.failures, view.generation)
        return view

    def _may_keep(self, key: str, view: BreakerView, sent: float) -> bool:
        """Whether the answer ``view``, to an operation sent at ``sent``, may stand for the
        breaker until ``sync`` has passed (``SharedBreaker.admit`` admits on it without
        asking). Not when it arrived after a newer one (a lower generation), nor when a
        transition was pushed after it was sent: answered late, it would show the breaker
        closed after it opened, and calls would be admitted for up to ``sync``."""
        held = self._views.get(key)
        if held is not None and held[0].generation > view.generation:
            return False
        return sent > self._pushed_at.get(key, -math.inf)

    def view(self, key: str) -> tuple[BreakerView, float] | None:
        """The last answer kept for ``key``, and when the operation it answered was sent."""
        return self._views.get(key)

    def watch(self, key: str, seen: Callable[[str, int, int], None]) -> None:
        self._watchers[key] = seen
        if self.subscribed:  # else: read with the others once notifications connect
            self._spawn(self.read([key]), "circuit breaker read")

    async def read(self, keys: list[str]) -> None:
        """Where the breakers ``keys`` stand, told to their watchers: one round trip. A
        read that fails is only counted (``failures``): nothing waits for it, and the next
        push, reconnection or operation tells the watcher again."""

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(self._key(key), "state", "failures", "generation")
                # One key of another type (WRONGTYPE) must not keep the others unread.
                answers: list[Any] = await pipe.execute(raise_on_error=False)
                return answers

        try:
            answers = await self._run(
                "circuit breaker reads", self._clock() + self._op_timeout, read
            )
        except DispatchError as error:
            log.debug("circuit breakers not read from %s: %s", self._where, error)
            return
        for key, answer in zip(keys, answers, strict=True):
            seen = self._watchers.get(key)
            if seen is None or isinstance(answer, Exception):
                continue  # unreadable: its operations say so (refused, as for a garbled one)
            state, failures, generation = answer
            try:
                count = int(failures or 0)
            except ValueError:  # garbled by another writer: the state still tells
                count = 0
            try:
                # None: no hash yet, or one stored before breakers had generations.
                number = int(generation or 0)
            except ValueError:
                number = 0
            seen(state.decode(errors="replace") if state else "closed", count, number)

    @property
    def watched(self) -> int:
        """How many breakers this replica follows (one per breaker its routes hold)."""
        return len(self._watchers)

    def unwatch(self, key: str) -> None:
        """Forget ``key``: its watcher, its kept answer, when it was last pushed. Kept,
        every breaker a replica ever dropped was read again at each reconnect."""
        self._watchers.pop(key, None)
        self._views.pop(key, None)
        self._pushed_at.pop(key, None)

    def pushed(self, key: str) -> None:
        """A transition of breaker ``key`` was pushed."""
        # Every breaker of this replica watches its key from the start (SharedBreaker):
        # another key is none of ours, and remembering it would let whoever publishes
        # on the channel grow this replica's memory one name at a time.
        if key not in self._watchers:
            return
        self._views.pop(key, None)
        self._pushed_at[key] = self._clock()
        # A transition: where it stands now, for the watcher.
        self._spawn(self.read([key]), "circuit breaker read")

    def connected(self) -> None:
        """Notifications (re)connected: anything pushed while unsubscribed was missed, and
        what the watchers were told of it is read anew."""
        self._views.clear()
        self.subscribed = True
        if self._watchers:
            self._spawn(self.read(list(self._watchers)), "circuit breaker reads")

    def disconnected(self) -> None:
        """Notifications lost: a kept answer could miss a transition from now on."""
        self.subscribed = False
        self._views.clear()
