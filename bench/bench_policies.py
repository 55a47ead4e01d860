"""Policies: the full chain against the raw client, cache hits, batching against a costly target.

* ``policies_c64_chain_ratio_to_raw``: calls/s through ``Dispatcher.call`` on a method with
  the cache (every call a miss: distinct params), a rate limit, a circuit breaker, retries
  and a deadline, over the calls/s of the fastest raw client (pyreqwest), both against the
  fixed-reply server of the HTTP benchmark, interleaved in the same run; the dispatcher on
  the same client (``client: reqwest``). Goal ≥ 0.85 (≤ 15 % overhead). Until 2026-12-02
  this figure was both sides on aiohttp: that pair is still measured, as
  ``policies_c64_aiohttp_chain_ratio_to_raw_aiohttp`` (and ``..._no_policies_...``).
* ``policies_c1_chain_p50_added_us``: the same chain at concurrency 1, call by call
  alternating with raw pyreqwest (``measure_paired``). Goal ≤ 25 µs. The aiohttp pair:
  ``policies_c1_aiohttp_chain_p50_added_us``.
* ``policies_c64_ablation_<policy>_cpu_added_us``: client CPU per call of a method with
  that one policy (cache miss, rate limit, breaker, retry) over the same method with
  none, same rounds: where the chain's cost goes.
* ``policies_in_process_c64_<policy>_cpu_added_us``: the same ablation (and the whole
  chain) against an in-process target, where no server or socket adds noise.
* ``policies_cache_hit_p50_us``: one ``Dispatcher.call`` answered from the cache. Goal ≤ 3.
* ``policies_batching_speedup``: calls/s of a batched method (max_size 100) over the same
  method unbatched, against a target that costs 2 ms per invocation (``_costed_server``).
  Goal ≥ 90. ``policies_batching_1000_over_100``: max_size 1,000 over max_size 100, both
  with 10,000 callers at once, with the client CPU per call of each, which bounds both,
  and the part of it spent in the cyclic garbage collector (``..._gc_us_per_call``); the
  ``..._gc10k_...`` figures are the same runs with the collector's first threshold raised
  to 10,000 (``TUNED_GC_THRESHOLDS``), as a host with that many calls in flight may set it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

from bench._core import Goal, Options, available_cpus, collector_time, pinned_to_cpu
from bench.bench_http import (
    CLIENT_CPU,
    ROOT,
    SERVER_CPU,
    Sample,
    aiohttp_client,
    fixed_reply_server,
    measure,
    measure_paired,
    port_server,
    pyreqwest_client,
)

GOALS = {
    "policies_c64_chain_ratio_to_raw": Goal(">=", 0.85),
    "policies_c1_chain_p50_added_us": Goal("<=", 25.0),
    "policies_cache_hit_p50_us": Goal("<=", 3.0),
    "policies_batching_speedup": Goal(">=", 90.0),
}

FULL_CHAIN = {
    "pure": True,
    "timeout_ms": 5000,
    "cache": {"ttl_ms": 60_000, "max_entries": 1_000_000},
    "rate_limit": {"rate": 1_000_000, "burst": 100_000, "mode": "wait"},
    "breaker": {"fail_max": 5, "reset_timeout_ms": 1000},
    "retry": {"attempts": 3},
}

#: The same chain with every call going to the target: limiter, breaker, retry and deadline.
WITHOUT_CACHE = {
    "idempotent": True,
    **{key: value for key, value in FULL_CHAIN.items() if key not in ("pure", "cache")},
}

#: One policy each, against none: the ablation of the chain's cost.
ONE_POLICY = {
    "cache": {"pure": True, "cache": FULL_CHAIN["cache"]},
    "rate_limit": {"rate_limit": FULL_CHAIN["rate_limit"]},
    "breaker": {"breaker": FULL_CHAIN["breaker"]},
    "retry": {"idempotent": True, "retry": FULL_CHAIN["retry"]},
}

Call = Callable[[], Awaitable[Any]]


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (300 if options.quick else 3000)
    rounds = options.rounds or (1 if options.quick else 5)
    pinned = SERVER_CPU if {SERVER_CPU, CLIENT_CPU} <= available_cpus() else None
    figures: dict[str, float] = {"policies_load_average_1min_at_start": os.getloadavg()[0]}
    with pinned_to_cpu(CLIENT_CPU):
        async with fixed_reply_server(pinned) as url:
            figures.update(await _chain_against_raw(url, calls, rounds))
            figures.update(await _chain_at_c1(url, calls, rounds))
            figures["policies_cache_hit_p50_us"] = await _cache_hit_p50(url, calls * 5)
        figures.update(await _in_process_ablation(calls, max(rounds, 5)))
        async with costed_server(pinned) as url:
            figures.update(await _batching(url, calls, quick=options.quick))
    figures["policies_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


async def _chain_against_raw(url: str, calls: int, rounds: int) -> dict[str, float]:
    names = ("raw", "chain", "plain", "uncached", *ONE_POLICY)
    names += ("raw_aiohttp", "chain_aiohttp", "plain_aiohttp")
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    async with contextlib.AsyncExitStack() as stack:
        enter = stack.enter_async_context
        clients: dict[str, Call] = {
            "raw": await enter(pyreqwest_client(url)),
            "chain": await enter(dispatcher_call(url, FULL_CHAIN)),
            "plain": await enter(dispatcher_call(url, {})),
            "uncached": await enter(dispatcher_call(url, WITHOUT_CACHE)),
            "raw_aiohttp": await enter(aiohttp_client(url)),
            "chain_aiohttp": await enter(dispatcher_call(url, FULL_CHAIN, client="aiohttp")),
            "plain_aiohttp": await enter(dispatcher_call(url, {}, client="aiohttp")),
        }
        for name, policy in ONE_POLICY.items():
            clients[name] = await enter(dispatcher_call(url, policy))
        for call in clients.values():  # warm: open the pooled connections
            await measure(call, 500, 64)
        for index in range(rounds):
            for name in names[index % len(names) :] + names[: index % len(names)]:
                samples[name].append(await measure(clients[name], calls, 64))

    def median_ratio(name: str, field: str, over: str = "raw") -> float:
        pairs = zip(samples[name], samples[over], strict=True)
        return statistics.median(getattr(a, field) / getattr(b, field) for a, b in pairs)

    def cpu_added(name: str, over: str) -> float:
        pairs = zip(samples[name], samples[over], strict=True)
        return statistics.median(a.cpu_us_per_call - b.cpu_us_per_call for a, b in pairs)

    def calls_per_s(name: str) -> float:
        return statistics.median(s.calls_per_s for s in samples[name])

    figures = {
        "policies_c64_raw_calls_per_s": calls_per_s("raw"),
        "policies_c64_chain_calls_per_s": calls_per_s("chain"),
        "policies_c64_chain_ratio_to_raw": median_ratio("chain", "calls_per_s"),
        "policies_c64_no_policies_ratio_to_raw": median_ratio("plain", "calls_per_s"),
        "policies_c64_chain_without_cache_ratio_to_raw": median_ratio("uncached", "calls_per_s"),
        "policies_c64_chain_without_cache_cpu_ratio_to_raw": median_ratio(
            "uncached", "cpu_us_per_call"
        ),
        "policies_c64_no_policies_cpu_ratio_to_raw": median_ratio("plain", "cpu_us_per_call"),
        # CPU time of this process per call (every thread: reqwest's too), chain over raw:
        # steadier than wall-clock rates on a machine shared with other work.
        "policies_c64_chain_cpu_ratio_to_raw": median_ratio("chain", "cpu_us_per_call"),
        "policies_c64_raw_cpu_us_per_call": statistics.median(
            s.cpu_us_per_call for s in samples["raw"]
        ),
        "policies_c64_chain_cpu_added_us_per_call": cpu_added("chain", "raw"),
        "policies_c64_chain_cpu_over_no_policies_us": cpu_added("chain", "plain"),
        # The same on aiohttp, raw and the dispatcher's client (this figure's pair until
        # 2026-12-02).
        "policies_c64_raw_aiohttp_calls_per_s": calls_per_s("raw_aiohttp"),
        "policies_c64_aiohttp_chain_ratio_to_raw_aiohttp": median_ratio(
            "chain_aiohttp", "calls_per_s", over="raw_aiohttp"
        ),
        "policies_c64_aiohttp_no_policies_ratio_to_raw_aiohttp": median_ratio(
            "plain_aiohttp", "calls_per_s", over="raw_aiohttp"
        ),
        "policies_c64_aiohttp_chain_cpu_over_no_policies_us": cpu_added(
            "chain_aiohttp", "plain_aiohttp"
        ),
    }
    for name in ONE_POLICY:
        figures[f"policies_c64_ablation_{name}_cpu_added_us"] = cpu_added(name, "plain")
    return figures


async def _chain_at_c1(url: str, calls: int, rounds: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    pairs = (("", pyreqwest_client, "reqwest"), ("aiohttp_", aiohttp_client, "aiohttp"))
    for prefix, raw_client, client in pairs:
        async with raw_client(url) as raw, dispatcher_call(url, FULL_CHAIN, client=client) as chain:
            await measure(raw, 200, 1)
            await measure(chain, 200, 1)
            paired = [await measure_paired(chain, raw, calls) for _ in range(rounds)]
        figures[f"policies_c1_{prefix}chain_p50_added_us"] = statistics.median(
            p50 for p50, _ in paired
        )
        figures[f"policies_c1_{prefix}chain_median_added_us_per_call"] = statistics.median(
            pair for _, pair in paired
        )
    return figures


_IN_PROCESS_PLUGIN = """
class Echo:
    async def echo(self, text):
        return {"text": text, "items": [1, 2]}
"""


def _write_plugin(folder: Path) -> None:
    (folder / "bench_in_process_echo.py").write_text(_IN_PROCESS_PLUGIN)


async def _in_process_ablation(calls: int, rounds: int) -> dict[str, float]:
    """The ablation again against an in-process target: no network and no server, so the
    CPU per call is the dispatcher's alone and the differences are steadier."""
    from dispatcher import Dispatcher, parse_manifest

    variants = {"none": {}, **ONE_POLICY, "chain": FULL_CHAIN}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="bench-policies-") as folder:
        _write_plugin(Path(folder))
        target = {"provider": "local", "entrypoint": "bench_in_process_echo:Echo", "path": folder}
        plugins = [
            {"id": name, "version": "1.0.0", "target": target, "methods": {"echo": policy}}
            for name, policy in variants.items()
        ]
        async with Dispatcher(parse_manifest({"plugins": plugins})) as dispatcher:
            numbers = count()

            def caller(name: str) -> Call:
                return lambda: dispatcher.call(name, "echo", {"text": f"t{next(numbers)}"})

            for name in variants:
                await measure(caller(name), 500, 64)
            for _ in range(rounds):
                for name in variants:
                    cpu[name].append((await measure(caller(name), calls, 64)).cpu_us_per_call)
    figures = {}
    for name in variants:
        if name != "none":
            added = statistics.median(a - b for a, b in zip(cpu[name], cpu["none"], strict=True))
            figures[f"policies_in_process_c64_{name}_cpu_added_us"] = added
    figures["policies_in_process_c64_no_policies_cpu_us"] = statistics.median(cpu["none"])
    return figures


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
    unbatched_calls = 100 if quick else 1000  # 2 ms each, one at a time: ~500 calls/s at best
    items = max(calls, 1000) * 10
    # On aiohttp, the provider's default, as in every earlier run of these figures: what
    # they compare is batching, not clients.
    unbatched_policy = {"timeout_ms": 30_000}
    async with dispatcher_call(url, unbatched_policy, client="aiohttp") as unbatched:
        alone = await measure(unbatched, unbatched_calls, 64)
    # (max_size, callers at once): size 100 with 1,000 callers is the figure of earlier
    # runs; both sizes with 10,000 callers compare the sizes alone, with the collector's
    # thresholds as Python sets them and as a host with that many callers may set them.
    batched: dict[tuple[int, int], tuple[Sample, float]] = {}
    for size, callers in ((100, 1000), (100, 10_000), (1000, 10_000)):
        batched[size, callers] = await _batched(url, size, callers, max(items, callers * 4))
    tuned: dict[int, tuple[Sample, float]] = {}
    with collector_thresholds(TUNED_GC_THRESHOLDS):
        for size in (100, 1000):
            tuned[size] = await _batched(url, size, 10_000, max(items, 40_000))
    (wide_100, gc_100), (wide_1000, gc_1000) = batched[100, 10_000], batched[1000, 10_000]
    (tuned_100, tuned_gc_100), (tuned_1000, tuned_gc_1000) = tuned[100], tuned[1000]
    narrow = batched[100, 1000][0]
    return {
        "policies_unbatched_2ms_target_calls_per_s": alone.calls_per_s,
        "policies_batched_2ms_target_calls_per_s": narrow.calls_per_s,
        "policies_batching_speedup": narrow.calls_per_s / alone.calls_per_s,
        "policies_batched_100_c10000_calls_per_s": wide_100.calls_per_s,
        "policies_batched_1000_c10000_calls_per_s": wide_1000.calls_per_s,
        "policies_batching_1000_over_100": wide_1000.calls_per_s / wide_100.calls_per_s,
        # What bounds both: this process's CPU per call (1 / it is the most one core makes).
        "policies_batched_100_c10000_cpu_us_per_call": wide_100.cpu_us_per_call,
        "policies_batched_1000_c10000_cpu_us_per_call": wide_1000.cpu_us_per_call,
        # Of that CPU, the cyclic collector's: its full passes walk every call in flight.
        "policies_batched_100_c10000_gc_us_per_call": gc_100,
        "policies_batched_1000_c10000_gc_us_per_call": gc_1000,
        # The same with the collector's first threshold at 10,000 (``TUNED_GC_THRESHOLDS``).
        "policies_batched_100_c10000_gc10k_calls_per_s": tuned_100.calls_per_s,
        "policies_batched_1000_c10000_gc10k_calls_per_s": tuned_1000.calls_per_s,
        "policies_batched_1000_c10000_gc10k_over_default": (
            tuned_1000.calls_per_s / wide_1000.calls_per_s
        ),
        "policies_batching_1000_over_100_gc10k": tuned_1000.calls_per_s / tuned_100.calls_per_s,
        "policies_batched_100_c10000_gc10k_cpu_us_per_call": tuned_100.cpu_us_per_call,
        "policies_batched_1000_c10000_gc10k_cpu_us_per_call": tuned_1000.cpu_us_per_call,
        "policies_batched_100_c10000_gc10k_gc_us_per_call": tuned_gc_100,
        "policies_batched_1000_c10000_gc10k_gc_us_per_call": tuned_gc_1000,
    }


#: ``gc.set_threshold`` for the tuned batching runs: young collections every 10,000 net
#: allocations instead of 700, so a call in flight for a few milliseconds is rarely
#: examined, and promoted to the old generation whose full passes walk everything.
TUNED_GC_THRESHOLDS = (10_000, 10, 10)


async def _batched(url: str, size: int, callers: int, total: int) -> tuple[Sample, float]:
    """A batched method (``max_size`` ``size``) called ``total`` times by ``callers`` at
    once: the sample, and the collector's CPU µs per call (``collector_time``)."""
    policy = {"timeout_ms": 30_000, "batch": {"max_size": size, "max_wait_ms": 2}}
    async with dispatcher_call(url, policy, client="aiohttp") as call:
        await measure(call, callers, callers)  # warm
        with collector_time() as collections:
            sample = await measure(call, total, callers)
    # The first full collection is ``measure``'s own, before its clock starts.
    automatic = collections[1:] if collections and collections[0][0] == 2 else collections
    return sample, sum(seconds for _, seconds in automatic) / total * 1e6


@contextlib.contextmanager
def collector_thresholds(thresholds: tuple[int, int, int]) -> Iterator[None]:
    """``gc.set_threshold(*thresholds)`` while inside, the process's own after."""
    before = gc.get_threshold()
    gc.set_threshold(*thresholds)
    try:
        yield
    finally:
        gc.set_threshold(*before)


@contextlib.asynccontextmanager
async def dispatcher_call(
    url: str, policies: dict[str, Any], *, distinct_params: bool = True, client: str = "reqwest"
) -> AsyncIterator[Call]:
    """``Dispatcher.call`` of one method with ``policies`` on the HTTP ``client`` (the
    target's ``client``); with distinct params every call misses the cache (and every
    caller can check it got its own answer)."""
    from dispatcher import Dispatcher, parse_manifest

    manifest = parse_manifest(
        {
            "plugins": [
                {
                    "id": "bench",
                    "version": "1.0.0",
                    "target": {"provider": "http", "url": url, "client": client},
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
