"""What bounding requests in flight costs on pyreqwest, with a deadline on every request.

Every call of the dispatcher's ``reqwest`` client carries a timeout (its deadline) and is
bounded by the target's ``pool.max_connections``. pyreqwest's own bound
(``ClientBuilder.max_connections``) waits for its slot under ``tokio::time::timeout``
whenever the request has a timeout; ``providers._in_flight.InFlightLimit`` keeps the
bound in Python instead. Three raw pyreqwest clients post the same envelope to the
fixed-reply server at concurrency 64, interleaved in a rotating order, client pinned to
CPU 1 and server to CPU 0 (as ``bench http``):

* ``raw``: pyreqwest's bound, no timeout (``bench http``'s raw client);
* ``limited_deadline``: pyreqwest's bound and a per-request timeout (the dispatcher's
  requests until 2026-12-03);
* ``slots_deadline``: a per-request timeout, the bound an ``InFlightLimit`` (now).

Figures: ``in_flight_c64_<variant>_cpu_us`` (CPU of every thread of the process per call)
and ``in_flight_c64_<variant>_ratio_to_raw`` (calls/s over ``raw``'s in the same round),
medians over the rounds; ``in_flight_c64_slots_cpu_saved_us``, the paired per-round
difference of the two bounded variants. ``in_flight_peers_*``: the same with nine more
clients of each kind in the process, each holding 64 idle connections to the server (a
host with many targets).

``in_flight_give_up_20k_cpu_s``: CPU seconds for 20,000 callers waiting on a full
``InFlightLimit`` to give up at their deadlines, the last to come first (calls with
shorter deadlines arriving later): the queue's cost as callers leave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

from bench._core import Options, available_cpus, pinned_to_cpu
from bench.bench_http import (
    CLIENT_CPU,
    HEADERS,
    SERVER_CPU,
    Sample,
    envelope_bytes,
    fixed_reply_server,
    measure,
)

GOALS: dict[str, Any] = {}
VARIANTS = ("raw", "limited_deadline", "slots_deadline")
POOL = 512
DEADLINE = timedelta(seconds=5)
PEERS = 9

Call = Callable[[], Awaitable[Any]]


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (300 if options.quick else 3000)
    rounds = options.rounds or (1 if options.quick else 7)
    figures: dict[str, float] = {}
    pinned_server = SERVER_CPU if {SERVER_CPU, CLIENT_CPU} <= available_cpus() else None
    with pinned_to_cpu(CLIENT_CPU):
        async with fixed_reply_server(pinned_server) as url:
            for prefix, peers in (("in_flight_c64_", 0), ("in_flight_peers_c64_", PEERS)):
                samples = await _measure(url, calls, rounds, peers)
                figures.update(_figures(prefix, samples))
    figures["in_flight_give_up_20k_cpu_s"] = await _give_up(2_000 if options.quick else 20_000)
    return figures


async def _give_up(callers: int) -> float:
    from providers._in_flight import InFlightLimit

    slots = InFlightLimit(1)
    slots.take()

    async def wait(timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await slots.wait(timeout)

    started = time.process_time()
    await asyncio.gather(*(wait(0.5 + (callers - n) * 1e-5) for n in range(callers)))
    return time.process_time() - started


async def _measure(url: str, calls: int, rounds: int, peers: int) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {name: [] for name in VARIANTS}
    async with contextlib.AsyncExitStack() as stack:
        clients = {name: await stack.enter_async_context(_client(url, name)) for name in VARIANTS}
        for _ in range(peers):  # idle, each with its pool open
            for name in VARIANTS:
                await measure(await stack.enter_async_context(_client(url, name)), 200, 64)
        for call in clients.values():
            await measure(call, 500, 64)
        for index in range(rounds):
            for name in VARIANTS[index % 3 :] + VARIANTS[: index % 3]:
                samples[name].append(await measure(clients[name], calls, 64))
    return samples


def _figures(prefix: str, samples: dict[str, list[Sample]]) -> dict[str, float]:
    figures: dict[str, float] = {}
    raw = samples["raw"]
    for name in VARIANTS:
        figures[f"{prefix}{name}_cpu_us"] = statistics.median(
            sample.cpu_us_per_call for sample in samples[name]
        )
        figures[f"{prefix}{name}_ratio_to_raw"] = statistics.median(
            sample.calls_per_s / base.calls_per_s
            for sample, base in zip(samples[name], raw, strict=True)
        )
    figures[f"{prefix}slots_cpu_saved_us"] = statistics.median(
        limited.cpu_us_per_call - slots.cpu_us_per_call
        for limited, slots in zip(
            samples["limited_deadline"], samples["slots_deadline"], strict=True
        )
    )
    return figures


@contextlib.asynccontextmanager
async def _client(url: str, variant: str) -> AsyncIterator[Call]:
    from pyreqwest.client import ClientBuilder
    from pyreqwest.http import Url

    from providers._in_flight import InFlightLimit

    body = envelope_bytes("echo")
    invoke_url = Url(f"{url}/invoke")
    builder = ClientBuilder().follow_redirects(False).gzip(False)
    if variant != "slots_deadline":
        builder = builder.max_connections(POOL)
    slots = InFlightLimit(POOL)
    async with builder.build() as client:

        async def bounded_by_pyreqwest() -> bytes:
            request = client.post(invoke_url).headers(HEADERS).body_bytes(body)
            if variant == "limited_deadline":
                request = request.timeout(DEADLINE)
            async with request.build_streamed() as response:
                return (await response.bytes()).to_bytes()

        async def bounded_by_slots() -> bytes:
            if not slots.take():
                await slots.wait(5.0)
            request = client.post(invoke_url).headers(HEADERS).body_bytes(body).timeout(DEADLINE)
            try:
                async with request.build_streamed() as response:
                    return (await response.bytes()).to_bytes()
            finally:
                slots.give_back()

        yield bounded_by_slots if variant == "slots_deadline" else bounded_by_pyreqwest
