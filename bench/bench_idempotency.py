"""Idempotency keys on the in-memory backend: a call with a new key, below the bound and at it.

``Dispatcher.call`` of the example plugin in-process (``provider: local``), one call at a
time, so what is measured is the dispatcher's idempotency step and store, not a network:

* ``idempotency_no_key_us``: a call without a key, the floor of this path;
* ``idempotency_new_key_us``: a call with a key nobody used yet, the store nearly empty;
  ``idempotency_new_key_added_us`` what the key adds, the median of each round's
  difference (the rounds of the two alternate);
* ``idempotency_new_key_at_bound_us``: the same once the store holds
  ``MAX_RECORDS`` (100,000) finished records, where each new key makes room for itself;
  ``idempotency_at_bound_over_below_ratio`` the ratio of the two;
* ``idempotency_record_bytes``: the Python memory each finished record keeps
  (``tracemalloc``, over 10,000 keyed calls).

Per-call figures are the medians of ``rounds`` rounds of ``calls`` calls each.
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections.abc import Iterator
from itertools import count
from typing import Any

from bench._core import ROOT, Options, example_plugin
from dispatcher import Dispatcher
from dispatcher.config import parse_manifest
from dispatcher.state.memory import MAX_RECORDS

MEMORY_CALLS = 10_000

GOALS: dict[str, Any] = {}


def _manifest() -> Any:
    return parse_manifest(
        {
            "version": 1,
            "plugins": [example_plugin({"say": {"timeout_ms": 5000}})],
        },
        base_dir=ROOT,
    )


async def _per_call_us(dispatcher: Dispatcher, calls: int, keys: Iterator[str] | None) -> float:
    started = time.process_time()  # one call at a time, in-process: CPU is the time
    for _ in range(calls):
        key = None if keys is None else next(keys)
        await dispatcher.call("echo", "say", {"text": "hi"}, idempotency_key=key)
    return (time.process_time() - started) / calls * 1e6


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (300 if options.quick else 3000)
    rounds = options.rounds or (1 if options.quick else 5)
    keys = (f"order-{number}" for number in count())
    figures: dict[str, float] = {}
    async with Dispatcher(_manifest()) as dispatcher:
        await _per_call_us(dispatcher, 200, None)  # warm: imports, the route
        plain: list[float] = []
        below: list[float] = []
        for _ in range(rounds):  # interleaved: the machine's drift falls on both alike
            plain.append(await _per_call_us(dispatcher, calls, None))
            below.append(await _per_call_us(dispatcher, calls, keys))
        gc.collect()
        tracemalloc.start()
        try:
            held_before, _ = tracemalloc.get_traced_memory()
            await _per_call_us(dispatcher, MEMORY_CALLS, keys)
            held_after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        figures["idempotency_record_bytes"] = (held_after - held_before) / MEMORY_CALLS
        assert dispatcher.policies is not None
        store = dispatcher.policies.state.idempotency
        while len(store) < MAX_RECORDS:
            await _per_call_us(dispatcher, min(10_000, MAX_RECORDS - len(store)), keys)
        at_bound = [await _per_call_us(dispatcher, calls, keys) for _ in range(rounds)]
    figures["idempotency_no_key_us"] = statistics.median(plain)
    figures["idempotency_new_key_us"] = statistics.median(below)
    figures["idempotency_new_key_added_us"] = statistics.median(
        keyed - bare for keyed, bare in zip(below, plain, strict=True)
    )
    figures["idempotency_new_key_at_bound_us"] = statistics.median(at_bound)
    figures["idempotency_at_bound_over_below_ratio"] = statistics.median(
        at_bound
    ) / statistics.median(below)
    return figures
