"""The result cache of a pure method, with single flight.

Key: plugin id, version and method (one cache per method) plus a hash of the params
serialised with sorted keys, so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` share an
entry; optionally the caller too. Concurrent misses on one key make one target call and
every waiter gets its outcome. Errors are never stored. Cached results are shared between
callers: treat them as read-only.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import TTLCache

from dispatcher.config import CachePolicy
from linchkit_plugin.errors import DeadlineExceeded, DispatchError
from linchkit_plugin.wire import encode_json
from providers.invocation import Invocation

__all__ = ["CacheStep", "ResultCache"]

Next = Callable[[Invocation], Awaitable[Any]]


class ResultCache:
    """One method's cached results and the calls filling it."""

    def __init__(self, name: str, policy: CachePolicy, clock: Callable[[], float]) -> None:
        self.name = name
        self.per_caller = policy.per_caller
        self.entries: TTLCache[bytes, Any] = TTLCache(
            maxsize=policy.max_entries, ttl=policy.ttl_ms / 1000, timer=clock
        )
        self.filling: dict[bytes, asyncio.Future[Any]] = {}
        self.hits = 0
        self.misses = 0  # calls that reached the target
        self.coalesced = 0  # calls that waited for another caller's identical call

    def key(self, invocation: Invocation) -> bytes:
        canonical = encode_json(invocation.params, sort_keys=True)
        if self.per_caller:
            # No caller and an empty caller are different callers: mark which one it is.
            caller = invocation.caller
            scope = b"\0" if caller is None else b"\1" + caller.encode()
            canonical = scope + b"\0" + canonical
        return hashlib.blake2b(canonical, digest_size=16).digest()

    def invalidate(self) -> int:
        """Drop every entry; returns how many there were."""
        dropped = len(self.entries)
        self.entries.clear()
        return dropped

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __repr__(self) -> str:
        return (
            f"<ResultCache {self.name} size={len(self.entries)}/{self.entries.maxsize}"
            f" hits={self.hits} misses={self.misses} coalesced={self.coalesced}"
            f" filling={len(self.filling)}>"
        )


class _LeaderGone(Exception):
    """The call a waiter shared was cancelled by its own caller: look again."""


class CacheStep:
    __slots__ = ("cache", "next")

    def __init__(self, cache: ResultCache, next_step: Next) -> None:
        self.cache = cache
        self.next = next_step

    async def __call__(self, invocation: Invocation) -> Any:
        cache = self.cache
        key = cache.key(invocation)
        while True:
            try:
                result = cache.entries[key]  # `[]`, not `.get`: TTLCache.get looks twice
            except KeyError:
                pass
            else:
                cache.hits += 1
                return result
            shared = cache.filling.get(key)
            if shared is not None:
                cache.coalesced += 1
                try:
                    return await _follow(shared, invocation, cache.name)
                except _LeaderGone:
                    continue
            # The first caller makes the call itself (no task: the miss path stays cheap)
            # and hands its outcome to whoever arrived meanwhile through a future.
            cache.misses += 1
            shared = cache.filling[key] = asyncio.get_running_loop().create_future()
            try:
                result = await self.next(invocation)
            except BaseException as error:
                gone = isinstance(error, asyncio.CancelledError)
                shared.set_exception(_LeaderGone() if gone else error)
                shared.exception()  # followers still get it; with none, asyncio must not log
                raise
            else:
                cache.entries[key] = result
                shared.set_result(result)
                return result
            finally:
                del cache.filling[key]


async def _follow(shared: asyncio.Future[Any], invocation: Invocation, name: str) -> Any:
    remaining = invocation.remaining()
    try:
        async with asyncio.timeout(remaining):
            # shield: a waiter giving up must not cancel what the others wait for.
            return await asyncio.shield(shared)
    except DispatchError as error:
        # One exception object per waiter, as the batcher does: raising the shared one in
        # many tasks would chain every waiter's traceback onto it.
        raise error.clone() from error.__cause__
    except TimeoutError:
        raise DeadlineExceeded(f"{name}: no result within {remaining * 1000:.0f} ms") from None
