"""The result cache of a pure method, with single flight.

Key: plugin id, version and method (one cache per method) plus a hash of the params
serialised with sorted keys, so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` share an
entry; optionally the caller too. Concurrent misses on one key make one target call and
every waiter gets its outcome. Errors are never stored. Cached results are shared between
callers: treat them as read-only.

An entry lives ``ttl_ms`` from when it was stored. When the cache is full, the oldest
entry goes first: with one TTL per method that is the entry nearest its expiry.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher.config import CachePolicy
from linchkit_plugin.errors import DeadlineExceeded, DispatchError
from linchkit_plugin.wire import encode_json
from providers.invocation import Invocation

__all__ = ["CacheStep", "ExpiringEntries", "ResultCache"]

Next = Callable[[Invocation], Awaitable[Any]]

_MISSING: Any = object()

#: Params up to this size (canonical JSON) key the cache as they are; longer ones by digest.
RAW_KEY_MAX_BYTES = 256


class ExpiringEntries:
    """Results by key, each until ``ttl`` seconds after it was stored, at most ``maxsize``.

    With one TTL for every entry, insertion order is expiry order: expired entries are
    always the oldest, and the oldest entry is the one to evict. So the entries are
    numbered as they are stored, and a store drops expired entries from the lowest number
    up, then the oldest until one more fits, each by a lookup of its number (O(1)). A key
    stored again gets a new number, its old one is dropped: it goes to the back of the line.

    Why plain dicts of keys, numbers and floats, and nothing else (an ``OrderedDict`` of
    ``key → expires`` kept the order before, and cachetools' ``TTLCache`` before that,
    which cost 3 µs per miss of its own): CPython's full collections, which run each time
    the long-lived objects grow by a quarter, visit every entry of every tracked
    container, and a dict holding only bytes, ints and floats is not tracked at all. The
    ``OrderedDict`` always was: with a million entries of string results it made every
    full collection of the process 41-75 ms longer, a pause of every call in flight, and
    now they add nothing. Results that are dicts or lists keep the results dict tracked
    (a dict of such values is, even when each of them is not): 87-120 → 39-55 ms added
    per full collection with a million small dict results. A store costs 50-180 ns more
    into a cache with room (four dicts written where a dict and the ``OrderedDict`` were;
    the figure moves with the dicts' resizes), 40-90 ns less into a full one, where every
    store evicts (``bench/bench_cache_gc.py``, six runs of each in turn).

    Why results in a dict of their own, not ``key → (expires, result)``: the tuple was one
    more tracked container per entry (with 200,000 small results, the collector's share
    of a store was ~1.9 µs of ~3 µs with it; bench/compare_chain.py).

    Why results are kept as they are, not as their JSON (tried 2026-12-05): a result that
    holds a list is two tracked objects per entry, and with every call a miss the full
    collections they bring cost 1.5-1.7 µs per call (``Dispatcher.call`` over the HTTP
    provider with its client answering at once, three rounds of 100,000 calls, nothing
    collected between them; 8.9 µs per call in all). Kept as JSON bytes they cost nothing there (8.0 µs),
    but every hit then decodes a copy: 2.65 → 3.16 µs per hit of ``{"text", "items": [1,
    2]}``. Above a hit ratio of about three in four, which is what a cache is for, that
    costs more than it saves.
    """

    __slots__ = (
        "_clock",
        "_expires",
        "_front",
        "_front_expires",
        "_keys",
        "_next",
        "_numbers",
        "_results",
        "maxsize",
        "ttl",
    )

    def __init__(self, maxsize: int, ttl: float, clock: Callable[[], float]) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self._clock = clock
        #: When each entry expires (what a lookup reads).
        self._expires: dict[bytes, float] = {}
        self._results: dict[bytes, Any] = {}
        #: Each entry's number, and the key of each number still held: the order.
        self._numbers: dict[bytes, int] = {}
        self._keys: dict[int, bytes] = {}
        #: The number the next store gets, and the lowest one that may still be held.
        self._next = 0
        self._front = 0
        #: When the oldest entry expires (or earlier): until then a store trims nothing.
        self._front_expires = math.inf

    def get(self, key: bytes, default: Any = None) -> Any:
        expires = self._expires.get(key)
        if expires is None or not self._clock() < expires:
            return default
        return self._results[key]

    def __getitem__(self, key: bytes) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        expires = self._expires.get(key)  # type: ignore[call-overload]
        return expires is not None and self._clock() < expires

    def __setitem__(self, key: bytes, value: Any) -> None:
        # Keys are ``encode_json``'s output, which is cut to the document's size: orjson
        # (3.13) hands back the buffer it wrote into, 4 KB however short the JSON, and kept
        # as it came every entry held 4 KB (4 GB at a million entries) and grew the heap by
        # a page per miss: one page fault per call, +1.2 µs of system time in-process.
        now = self._clock()
        numbers = self._numbers
        keys = self._keys
        replaced = numbers.pop(key, None)  # an expired entry of this key: it goes to the back
        if replaced is not None:
            del keys[replaced]
        if not now < self._front_expires or len(numbers) >= self.maxsize:
            self._trim(now)
        expires = now + self.ttl
        number = self._next
        self._next = number + 1
        if not numbers:
            self._front = number
            self._front_expires = expires
        keys[number] = key
        numbers[key] = number
        self._expires[key] = expires
        self._results[key] = value

    def _trim(self, now: float) -> None:
        """Drop expired entries off the front, then the oldest until one more fits."""
        keys = self._keys
        numbers = self._numbers
        expiries = self._expires
        results = self._results
        front = self._front
        while numbers:
            oldest = keys.get(front)
            if oldest is not None:  # None: that number's key was stored again since
                expires = expiries[oldest]
                if now < expires and len(numbers) < self.maxsize:
                    self._front = front
                    self._front_expires = expires
                    return
                del keys[front], numbers[oldest], expiries[oldest], results[oldest]
            front += 1
        self._front_expires = math.inf  # empty: the next store sets the front

    def __len__(self) -> int:
        """Entries held, including any expired since the last store (as ``TTLCache``)."""
        return len(self._expires)

    def clear(self) -> None:
        self._expires.clear()
        self._results.clear()
        self._numbers.clear()
        self._keys.clear()
        self._front_expires = math.inf

    def __repr__(self) -> str:
        return f"<ExpiringEntries {len(self._expires)}/{self.maxsize} ttl={self.ttl:g}s>"


class ResultCache:
    """One method's cached results and the calls filling it."""

    def __init__(self, name: str, policy: CachePolicy, clock: Callable[[], float]) -> None:
        self.name = name
        self.per_caller = policy.per_caller
        self.entries = ExpiringEntries(policy.max_entries, policy.ttl_ms / 1000, clock)
        #: Keys whose call is under way: None while its caller is alone, the future the
        #: others wait on once one joins (a miss nobody shares, the usual case, makes none).
        self.filling: dict[bytes, asyncio.Future[Any] | None] = {}
        self.hits = 0
        self.misses = 0  # calls that reached the target
        self.coalesced = 0  # calls that waited for another caller's identical call

    def key(self, invocation: Invocation) -> bytes:
        """This process's key for the call: the canonical params themselves when short.

        Hashing them costs 0.4 µs, a seventh of a cache hit; a short key is its own
        digest. Longer ones are hashed, so a large params object is not kept twice. The
        two kinds cannot meet: a digest key starts with 0xFF, which UTF-8 (the JSON) and
        the caller scope (0 or 1) never start with.
        """
        canonical = (
            self._canonical(invocation)
            if self.per_caller
            else encode_json(invocation.params, sort_keys=True)  # _canonical's usual case
        )
        if len(canonical) <= RAW_KEY_MAX_BYTES:
            return canonical
        return b"\xff" + hashlib.blake2b(canonical, digest_size=16).digest()

    def digest(self, invocation: Invocation) -> bytes:
        """A fixed-size key for the call (the shared cache names its entries by it)."""
        return hashlib.blake2b(self._canonical(invocation), digest_size=16).digest()

    def _canonical(self, invocation: Invocation) -> bytes:
        canonical = encode_json(invocation.params, sort_keys=True)
        if self.per_caller:
            # No caller and an empty caller are different callers: mark which one it is.
            caller = invocation.caller
            scope = b"\0" if caller is None else b"\1" + caller.encode()
            canonical = scope + b"\0" + canonical
        return canonical

    def join(self, key: bytes) -> asyncio.Future[Any]:
        """The future to wait on for ``key``, whose call another caller is making."""
        future = self.filling[key]
        if future is None:
            future = self.filling[key] = asyncio.get_running_loop().create_future()
        return future

    def filled(self, key: bytes, result: Any) -> None:
        """The call of ``key`` returned ``result``: hand it to whoever joined."""
        future = self.filling.pop(key)
        if future is not None:
            future.set_result(result)

    def failed(self, key: bytes, error: BaseException) -> None:
        """The call of ``key`` ended with ``error``: hand it to whoever joined. If its
        caller was cancelled, they get no error of its own but look again."""
        future = self.filling.pop(key)
        if future is not None:
            gone = isinstance(error, asyncio.CancelledError)
            future.set_exception(_LeaderGone() if gone else error)
            future.exception()  # followers still get it; with none, asyncio must not log

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
    __slots__ = ("cache", "entries", "next")

    def __init__(self, cache: ResultCache, next_step: Next) -> None:
        self.cache = cache
        self.entries = cache.entries
        self.next = next_step

    async def __call__(self, invocation: Invocation) -> Any:
        cache = self.cache
        key = cache.key(invocation)
        entries = self.entries
        while True:
            # ``entries.get`` written out: every call of a cached method looks once.
            expires = entries._expires.get(key)
            if expires is not None and entries._clock() < expires:
                cache.hits += 1
                return entries._results[key]
            filling = cache.filling
            if key in filling:
                cache.coalesced += 1
                try:
                    return await _follow(cache.join(key), invocation, cache.name)
                except _LeaderGone:
                    continue
            # The first caller makes the call itself (no task, no future: the miss path
            # stays cheap) and hands its outcome to whoever joined meanwhile.
            cache.misses += 1
            filling[key] = None
            try:
                result = await self.next(invocation)
            except BaseException as error:
                cache.failed(key, error)
                raise
            self.entries[key] = result
            joined = filling.pop(key)  # ``cache.filled`` written out: every miss ends here
            if joined is not None:
                joined.set_result(result)
            return result


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
