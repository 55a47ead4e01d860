"""Hedging: the tail of a fleet with one sometimes-slow instance, with and without hedges.

Three instances of ``bench._tail_server`` (one process each, pinned to the server CPU):
each answers in 5 ms, and one of them takes 500 ms on every 20th call it gets (5 % of its
calls). ``Dispatcher.call`` at concurrency 8, the same calls against three methods of the
same target, in rotating order per round:

* ``plain``: idempotent, no hedge;
* ``after50``: ``hedge: {after_ms: 50}``;
* ``p95``: ``hedge: {after_percentile: 95}`` (its delay learnt from the calls themselves).

Figures per variant: ``p50_ms``, ``p99_ms``, ``p999_ms``, and ``extra_load_pct``: requests
the instances counted (``GET /count``) over calls made, minus one. Medians of the rounds.
``hedge_<variant>_…`` balance round_robin, so the slow instance gets a third of the calls
and ~1.7 % of all calls meet its tail (the setting of the issue); ``hedge_lr_<variant>_…``
balance least_request (the default), which already steers calls away from an instance
holding a slow call, so fewer calls meet the tail, and hedging, which frees the slow
instance sooner, sends it more. Goals for ``after50`` (round_robin): p99 ≤ 60 ms (the
delay plus one fast call) and extra load ≤ 7 %.

``hedge_step_added_us``: what the hedge step costs a call that is not hedged (an attempt
task, a wait), in-process: ``HedgeStep`` over ``FleetStep`` with a stub provider minus
``FleetStep`` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from bench._core import Goal, Options, available_cpus, pinned_to_cpu
from bench.bench_fleet import _fleet
from bench.bench_http import CLIENT_CPU, ROOT, SERVER_CPU, port_server

GOALS = {
    "hedge_after50_p99_ms": Goal("<=", 60.0),
    "hedge_after50_extra_load_pct": Goal("<=", 7.0),
}

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"idempotent": True},
    "after50": {"idempotent": True, "hedge": {"after_ms": 50}},
    "p95": {"idempotent": True, "hedge": {"after_percentile": 95}},
}
CONCURRENCY = 8

Call = Callable[[], Awaitable[Any]]


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (300 if options.quick else 3000)
    rounds = options.rounds or (1 if options.quick else 3)
    figures: dict[str, float] = {}
    figures["hedge_step_added_us"] = await _step_added(rounds, 5_000 if options.quick else 50_000)
    pinned = SERVER_CPU if {SERVER_CPU, CLIENT_CPU} <= available_cpus() else None
    with pinned_to_cpu(CLIENT_CPU):
        figures.update(await _tails(pinned, calls, rounds))
    return figures


async def _tails(cpu: int | None, calls: int, rounds: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        urls = [
            await stack.enter_async_context(
                port_server("bench._tail_server", cpu, ["--slow-every", str(slow_every)])
            )
            for slow_every in (20, 0, 0)
        ]
        counts = await stack.enter_async_context(_counter(urls))
        for balance, prefix in (("round_robin", "hedge"), ("least_request", "hedge_lr")):
            methods = await stack.enter_async_context(_dispatcher(urls, balance))
            figures.update(await _variants(prefix, methods, counts, calls, rounds))
    return figures


async def _variants(
    prefix: str,
    methods: dict[str, Call],
    counts: Callable[[], Awaitable[int]],
    calls: int,
    rounds: int,
) -> dict[str, float]:
    samples: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in VARIANTS}
    for method in methods.values():  # warm: pools open, the p95 window filled
        await _latencies(method, 200)
    names = list(VARIANTS)
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            before = await counts()
            latencies = await _latencies(methods[name], calls)
            sent = await counts() - before
            samples[name].append(
                (
                    latencies[calls // 2],
                    latencies[calls * 99 // 100],
                    latencies[min(calls - 1, calls * 999 // 1000)],
                    (sent / calls - 1) * 100,
                )
            )
    figures: dict[str, float] = {}
    for name, runs in samples.items():
        for position, figure in enumerate(("p50_ms", "p99_ms", "p999_ms", "extra_load_pct")):
            figures[f"{prefix}_{name}_{figure}"] = statistics.median(run[position] for run in runs)
    return figures


async def _latencies(call: Call, calls: int) -> list[float]:
    """Milliseconds each of ``calls`` calls took, ``CONCURRENCY`` at a time; sorted."""
    latencies: list[float] = []
    left = iter(range(calls))
    clock = time.perf_counter

    async def worker() -> None:
        for _ in left:
            started = clock()
            await call()
            latencies.append((clock() - started) * 1000)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return sorted(latencies)


@contextlib.asynccontextmanager
async def _counter(urls: list[str]) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Calls the instances have counted, all together."""
    async with aiohttp.ClientSession() as session:

        async def count() -> int:
            total = 0
            for url in urls:
                async with session.get(f"{url}/count") as response:
                    total += int((await response.json())["calls"])
            return total

        yield count


@contextlib.asynccontextmanager
async def _dispatcher(urls: list[str], balance: str) -> AsyncIterator[dict[str, Call]]:
    from dispatcher import Dispatcher, parse_manifest

    manifest = parse_manifest(
        {
            "plugins": [
                {
                    "id": "bench",
                    "version": "1.0.0",
                    "target": {
                        "provider": "http",
                        "instances": [{"url": url} for url in urls],
                        "balance": balance,
                    },
                    "defaults": {"timeout_ms": 10_000},
                    "methods": VARIANTS,
                }
            ]
        },
        base_dir=ROOT,
    )
    async with Dispatcher(manifest) as dispatcher:
        call_plugin = dispatcher.call
        params = {"text": "hi"}

        def method(name: str) -> Call:
            return lambda: call_plugin("bench", name, params)

        yield {name: method(name) for name in VARIANTS}


async def _step_added(rounds: int, calls: int) -> float:
    from dispatcher.config import HedgePolicy
    from dispatcher.fleet import FleetStep
    from dispatcher.policies import RetryBudget
    from dispatcher.policies.hedge import HedgeStep
    from providers.invocation import Invocation

    fleet = _fleet("least_request")

    async def stub(target: Any, invocation: Invocation) -> Any:
        return None

    fleet_step = FleetStep(fleet, [None] * len(fleet.instances), stub)
    hedged = HedgeStep(
        "bench.echo",
        HedgePolicy(after_ms=50),
        fleet,
        RetryBudget("bench", 0.2),
        fleet_step,
        deposits=True,
    )
    invocation = Invocation("bench", "1.0.0", "echo", {}, time.monotonic() + 3600, "r")
    added = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(calls):
            await fleet_step(invocation)
        direct = time.perf_counter_ns() - started
        started = time.perf_counter_ns()
        for _ in range(calls):
            await hedged(invocation)
        through = time.perf_counter_ns() - started
        added.append((through - direct) / calls / 1000)
    return statistics.median(added)
