"""What a large result cache costs the garbage collector, and what a store costs.

CPython's full collections visit every entry of every tracked container, so a cache that
keeps many results can lengthen each of them: that is a pause of the whole process,
every call in flight with it (``dispatcher/policies/cache.py`` says why the cache's own
bookkeeping is no such container). Measured on ``ExpiringEntries`` itself, filled with
``ENTRIES`` entries keyed as the cache keys them (canonical JSON of the params):

* ``cache_gc_1m_dict_results_full_gc_added_ms``: how much longer one full collection
  (``gc.collect()``) of this process takes with the cache holding small dict results
  (``{"text": …}``, what the benchmarks' plugins answer), over the same process with
  the cache emptied (the shortest of ``REPEATS`` collections each);
* ``cache_gc_1m_str_results_full_gc_added_ms``: the same with string results;
* ``cache_gc_full_gc_ms``: one full collection of this process without the cache;
* ``cache_gc_store_growing_ns`` / ``cache_gc_store_evicting_ns``: one store, in a tight
  loop with the collector off (min of ``REPEATS`` rounds), into a cache with room, and
  into a full cache of ``max_entries: 1024`` (the default), where every store evicts;
  ``cache_gc_store_dict_ns``: a plain ``dict`` store of the same keys in the same run,
  the floor, and ``cache_gc_store_growing_ratio_to_dict`` the ratio.

``--quick`` fills 100,000 entries (names keep ``1m``; the figures scale linearly).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from bench._core import Options
from dispatcher.policies.cache import ExpiringEntries

GOALS: dict[str, Any] = {}

ENTRIES = 1_000_000
REPEATS = 7
STORES = 200_000
DEFAULT_MAX_ENTRIES = 1024


async def run(options: Options) -> dict[str, float]:
    entries = 100_000 if options.quick else ENTRIES
    figures: dict[str, float] = {"cache_gc_full_gc_ms": _full_collection_ms()}
    for kind, result in (("dict", lambda n: {"text": f"t{n}"}), ("str", lambda n: f"t{n}")):
        figures[f"cache_gc_1m_{kind}_results_full_gc_added_ms"] = _added_ms(entries, result)
    figures.update(_store_costs([_key(number) for number in range(DEFAULT_MAX_ENTRIES + STORES)]))
    return figures


def _key(number: int) -> bytes:
    """A key as the cache makes one: the params' canonical JSON."""
    return b'{"text":"t%d"}' % number


def _full_collection_ms() -> float:
    """The shortest of ``REPEATS`` full collections: the work one takes, without the
    machine's other tenants (their median moved by ±10 ms between runs)."""
    gc.collect()
    samples = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        gc.collect()
        samples.append((time.perf_counter() - started) * 1000)
    return min(samples)


def _added_ms(entries: int, result: Callable[[int], Any]) -> float:
    """The keys are made as they are stored: a list of them would be a tracked container
    of its own, and the collector's walk of it would count in both figures."""
    before = _full_collection_ms()
    cache = ExpiringEntries(entries, 3600.0, time.monotonic)
    for number in range(entries):
        cache[_key(number)] = result(number)
    with_cache = _full_collection_ms()
    cache.clear()
    del cache
    gc.collect()
    return with_cache - before


def _store_costs(keys: list[bytes]) -> dict[str, float]:
    growing: list[float] = []
    evicting: list[float] = []
    plain: list[float] = []
    stored = keys[DEFAULT_MAX_ENTRIES : DEFAULT_MAX_ENTRIES + STORES]
    gc.collect()
    gc.disable()
    try:
        for _ in range(REPEATS):
            roomy = ExpiringEntries(len(stored), 3600.0, time.monotonic)
            growing.append(_ns_per_store(roomy, stored))
            full = ExpiringEntries(DEFAULT_MAX_ENTRIES, 3600.0, time.monotonic)
            for key in keys[:DEFAULT_MAX_ENTRIES]:
                full[key] = 1
            evicting.append(_ns_per_store(full, stored))
            plain.append(_ns_per_store({}, stored))
            del roomy, full
    finally:
        gc.enable()
    return {
        "cache_gc_store_growing_ns": min(growing),
        "cache_gc_store_evicting_ns": min(evicting),
        "cache_gc_store_dict_ns": min(plain),
        "cache_gc_store_growing_ratio_to_dict": min(growing) / min(plain),
    }


def _ns_per_store(target: Any, keys: list[bytes]) -> float:
    started = time.perf_counter()
    for key in keys:
        target[key] = 1
    return (time.perf_counter() - started) / len(keys) * 1e9
