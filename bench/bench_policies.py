"""Policies: the full chain against the raw client, cache hits, batching against a costly target.

* ``policies_c64_chain_ratio_to_raw``: calls/s through ``Dispatcher.call`` on a method with
  the cache (every call a miss: distinct params), a rate limit, a circuit breaker and a
  deadline, over the calls/s of raw aiohttp, both against the fixed-reply server of the
  HTTP benchmark, interleaved in the same run. Goal ≥ 0.85 (≤ 15 % overhead).
* ``policies_cache_hit_p50_us``: one ``Dispatcher.call`` answered from the cache. Goal ≤ 10.
* ``policies_batching_speedup``: calls/s of a batched method (max_size 100) over the same
  method unbatched, against a target that costs 2 ms per invocation (``_costed_server``).
  Goal ≥ 10.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import count
from typing import Any

from bench._core import Goal, Options, available_cpus, pinned_to_cpu
from bench.bench_http import (
    CLIENT_CPU,
    ROOT,
    SERVER_CPU,
    Sample,
    aiohttp_client,
    fixed_reply_server,
    measure,
    port_server,
)

GOALS = {
    "policies_c64_chain_ratio_to_raw": Goal(">=", 0.85),
    "policies_cache_hit_p50_us": Goal("<=", 10.0),
    "policies_batching_speedup": Goal(">=", 10.0),
}

FULL_CHAIN = {
    "pure": True,
    "timeout_ms": 5000,
    "cache": {"ttl_ms": 60_000, "max_entries": 1_000_000},
    "rate_limit": {"rate": 1_000_000, "burst": 100_000, "mode": "wait"},
    "breaker": {"fail_max": 5, "reset_timeout_ms": 1000},
}

#: The same chain with every call going to the target: limiter, breaker and deadline only.
WITHOUT_CACHE = {key: value for key, value in FULL_CHAIN.items() if key not in ("pure", "cache")}

Call = Callable[[], Awaitable[Any]]


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (300 if options.quick else 3000)
    rounds = options.rounds or (1 if options.quick else 5)
    pinned = SERVER_CPU if {SERVER_CPU, CLIENT_CPU} <= available_cpus() else None
    figures: dict[str, float] = {}
    with pinned_to_cpu(CLIENT_CPU):
        async with fixed_reply_server(pinned) as url:
            figures.update(await _chain_against_raw(url, calls, rounds))
            figures["policies_cache_hit_p50_us"] = await _cache_hit_p50(url, calls * 5)
        async with costed_server(pinned) as url:
            figures.update(await _batching(url, calls, quick=options.quick))
    return figures


async def _chain_against_raw(url: str, calls: int, rounds: int) -> dict[str, float]:
    raw_rates: list[Sample] = []
    chain_rates: list[Sample] = []
    plain_rates: list[Sample] = []
    uncached_rates: list[Sample] = []
    async with (
        aiohttp_client(url) as raw,
        dispatcher_call(url, FULL_CHAIN, distinct_params=True) as chain,
        dispatcher_call(url, {}, distinct_params=True) as plain,
        dispatcher_call(url, WITHOUT_CACHE, distinct_params=True) as uncached,
    ):
        for call in (raw, chain, plain, uncached):  # warm: open the pooled connections
            await measure(call, 500, 64)
        for index in range(rounds):
            order = [
                (raw, raw_rates),
                (chain, chain_rates),
                (plain, plain_rates),
                (uncached, uncached_rates),
            ]
            for call, rates in order[index % 4 :] + order[: index % 4]:
                rates.append(await measure(call, calls, 64))

    def median_ratio(ours: list[Sample], field: str) -> float:
        pairs = zip(ours, raw_rates, strict=True)
        return statistics.median(getattr(a, field) / getattr(b, field) for a, b in pairs)

    return {
        "policies_c64_raw_aiohttp_calls_per_s": statistics.median(s.calls_per_s for s in raw_rates),
        "policies_c64_chain_calls_per_s": statistics.median(s.calls_per_s for s in chain_rates),
        "policies_c64_chain_ratio_to_raw": median_ratio(chain_rates, "calls_per_s"),
        "policies_c64_no_policies_ratio_to_raw": median_ratio(plain_rates, "calls_per_s"),
        "policies_c64_chain_without_cache_ratio_to_raw": median_ratio(
            uncached_rates, "calls_per_s"
        ),
        "policies_c64_chain_without_cache_cpu_ratio_to_raw": median_ratio(
            uncached_rates, "cpu_us_per_call"
        ),
        "policies_c64_no_policies_cpu_ratio_to_raw": median_ratio(plain_rates, "cpu_us_per_call"),
        # CPU time of this process per call, chain over raw: steadier than wall-clock
        # rates on a machine shared with other work.
        "policies_c64_chain_cpu_ratio_to_raw": median_ratio(chain_rates, "cpu_us_per_call"),
        "policies_c64_chain_cpu_added_us_per_call": statistics.median(
            a.cpu_us_per_call - b.cpu_us_per_call
            for a, b in zip(chain_rates, raw_rates, strict=True)
        ),
    }


async def _cache_hit_p50(url: str, calls: int) -> float:
    async with dispatcher_call(url, FULL_CHAIN, distinct_params=False) as hit:
        await hit()  # the one miss that fills the cache
        clock = time.perf_counter_ns
        latencies = []
        gc.collect()
        for _ in range(calls):
            started = clock()
            await hit()
            latencies.append(clock() - started)
    return statistics.median(latencies) / 1000


async def _batching(url: str, calls: int, *, quick: bool) -> dict[str, float]:
    batched_policy = {"timeout_ms": 30_000, "batch": {"max_size": 100, "max_wait_ms": 2}}
    unbatched_calls = 100 if quick else 1000  # 2 ms each, one at a time: ~500 calls/s at best
    async with (
        dispatcher_call(url, {"timeout_ms": 30_000}, distinct_params=True) as unbatched,
        dispatcher_call(url, batched_policy, distinct_params=True) as batched,
    ):
        alone = await measure(unbatched, unbatched_calls, 64)
        together = await measure(batched, max(calls, 1000) * 10, 1000)
    return {
        "policies_unbatched_2ms_target_calls_per_s": alone.calls_per_s,
        "policies_batched_2ms_target_calls_per_s": together.calls_per_s,
        "policies_batching_speedup": together.calls_per_s / alone.calls_per_s,
    }


@contextlib.asynccontextmanager
async def dispatcher_call(
    url: str, policies: dict[str, Any], *, distinct_params: bool
) -> AsyncIterator[Call]:
    """``Dispatcher.call`` of one method with ``policies``; with distinct params every call
    misses the cache (and every caller can check it got its own answer)."""
    from dispatcher import Dispatcher, parse_manifest

    manifest = parse_manifest(
        {
            "plugins": [
                {
                    "id": "bench",
                    "version": "1.0.0",
                    "target": {"provider": "http", "url": url},
                    "methods": {"echo": policies},
                }
            ]
        },
        base_dir=ROOT,
    )
    async with Dispatcher(manifest) as dispatcher:
        call_plugin = dispatcher.call
        numbers = count()
        same = {"text": "hi"}

        def call() -> Awaitable[Any]:
            params = {"text": f"t{next(numbers)}"} if distinct_params else same
            return call_plugin("bench", "echo", params)

        yield call


def costed_server(cpu: int | None) -> contextlib.AbstractAsyncContextManager[str]:
    """``bench._costed_server`` (2 ms per invocation) pinned to ``cpu``; yields its URL."""
    return port_server("bench._costed_server", cpu)
