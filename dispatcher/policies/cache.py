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

import orjson
from cachetools import TTLCache

from dispatcher.config import CachePolicy
from dispatcher.errors import DeadlineExceeded, InvalidParams
from dispatcher.invocation import Invocation

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
        self.filling: dict[bytes, asyncio.Task[Any]] = {}
        self.hits = 0
        self.misses = 0

    def key(self, invocation: Invocation) -> bytes:
        try:
            canonical = orjson.dumps(invocation.params, option=orjson.OPT_SORT_KEYS)
        except TypeError as error:
            raise InvalidParams(f"params must be JSON-serializable: {error}") from None
        if self.per_caller:
            canonical = (invocation.caller or "").encode() + b"\0" + canonical
        return hashlib.blake2b(canonical, digest_size=16).digest()

    def invalidate(self) -> int:
        """Drop every entry; returns how many there were."""
        dropped = len(self.entries)
        self.entries.clear()
        return dropped

    async def aclose(self) -> None:
        tasks = list(self.filling.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __repr__(self) -> str:
        return (
            f"<ResultCache {self.name} size={len(self.entries)}/{self.entries.maxsize}"
            f" hits={self.hits} misses={self.misses} filling={len(self.filling)}>"
        )


class CacheStep:
    __slots__ = ("cache", "next")

    def __init__(self, cache: ResultCache, next_step: Next) -> None:
        self.cache = cache
        self.next = next_step

    async def __call__(self, invocation: Invocation) -> Any:
        cache = self.cache
        key = cache.key(invocation)
        try:
            result = cache.entries[key]  # `[]`, not `.get`: TTLCache.get looks the key up twice
        except KeyError:
            pass
        else:
            cache.hits += 1
            return result
        cache.misses += 1
        task = cache.filling.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fill(key, invocation))
            cache.filling[key] = task
        remaining = invocation.remaining()
        try:
            async with asyncio.timeout(remaining):
                # shield: a waiter giving up must not cancel the call the others wait for.
                return await asyncio.shield(task)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{cache.name}: no result within {remaining * 1000:.0f} ms"
            ) from None

    async def _fill(self, key: bytes, invocation: Invocation) -> Any:
        try:
            result = await self.next(invocation)
            self.cache.entries[key] = result
            return result
        finally:
            del self.cache.filling[key]
