"""HTTP clients side by side: which raw client the HTTP provider should stand on.

Every candidate posts the same envelope bytes to the same fixed-reply server
(``bench._fixed_server``: uvloop + httptools, one process pinned to CPU 0) and decodes the
JSON answer, at concurrency 1 and 64, interleaved in a rotating order for several rounds;
each figure is the median over the rounds. The client runs pinned to CPU 1, and so does
every thread it starts (threads inherit the affinity of the thread that creates them, and
the Rust clients start their runtime's threads on first use, inside the pinned block).

CPU per call counts every thread of this process (``getrusage(RUSAGE_SELF)``): pyreqwest and
pyqwest move the HTTP work onto tokio threads, whose time ``thread_time`` of the event
loop's thread would not see. Both are recorded: ``cpu_us_per_call`` (all threads) and
``loop_cpu_us_per_call`` (the event loop's thread alone); their difference is the work done
off the loop. On this two-core machine with everything pinned to one core, the tokio threads
compete with the event loop for that core, so all-threads CPU is the honest cost; unpinned,
they would run on the server's core and the wall-clock figures would flatter them.

Candidates: aiohttp (the provider's client until now), pyreqwest (reqwest/hyper via PyO3),
aiosonic, pyqwest (also reqwest), niquests (urllib3-future). Then the dispatcher's HTTP
provider on each client it offers (``client: aiohttp`` and ``client: reqwest``), so the
ratios below come from the same run as the raw figures. (``bench_http`` records the goal
figures ``http_c64_ratio_to_aiohttp`` and ``http_c64_ratio_to_fastest_raw`` for the
dispatcher on its default client, next to its paired c1 latency.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench._core import Goal, Options, available_cpus, pinned_to_cpu
from bench.bench_http import (
    HEADERS,
    PARAMS,
    ROOT,
    _result,
    aiohttp_client,
    envelope_bytes,
    fixed_reply_server,
    pyreqwest_client,
)

SERVER_CPU = 0
CLIENT_CPU = 1
CONCURRENCY = (1, 64)
RAW_CLIENTS = ("aiohttp", "pyreqwest", "aiosonic", "pyqwest", "niquests")
DISPATCHER_CLIENTS = ("dispatcher_aiohttp", "dispatcher_reqwest")
DEFAULT_CALLS = 3000
DEFAULT_ROUNDS = 3
# niquests makes ~2k calls/s here: fewer calls keep it from taking most of the run.
SLOW_MAX_CALLS = 600
SLOW_CLIENTS = frozenset({"niquests"})

GOALS = {
    "http_clients_c64_dispatcher_reqwest_ratio_to_aiohttp": Goal(">=", 2.0),
    "http_clients_c64_dispatcher_reqwest_ratio_to_fastest_raw": Goal(">=", 0.9),
}

Call = Callable[[], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Sample:
    calls_per_s: float
    p50_us: float
    cpu_us_per_call: float  # every thread of the process
    loop_cpu_us_per_call: float  # the event loop's thread alone


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (200 if options.quick else DEFAULT_CALLS)
    rounds = options.rounds or (1 if options.quick else DEFAULT_ROUNDS)
    figures: dict[str, float] = {
        "http_clients_calls_per_measurement": calls,
        "http_clients_rounds": rounds,
        "http_clients_load_average_1min_at_start": os.getloadavg()[0],
    }
    pinned_server = SERVER_CPU if {SERVER_CPU, CLIENT_CPU} <= available_cpus() else None
    with pinned_to_cpu(CLIENT_CPU):
        async with fixed_reply_server(pinned_server) as url:
            samples, present = await _measure_all(url, calls, rounds)
    figures.update(_figures(samples, present))
    figures["http_clients_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


async def measure(call: Call, calls: int, concurrency: int) -> Sample:
    latencies = [0] * calls
    next_index = 0
    clock = time.perf_counter_ns

    async def worker() -> None:
        nonlocal next_index
        while next_index < calls:
            index = next_index
            next_index += 1
            started = clock()
            await call()
            latencies[index] = clock() - started

    gc.collect()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    loop_before = time.thread_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    loop_cpu = time.thread_time() - loop_before
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    latencies.sort()
    return Sample(
        calls_per_s=calls / elapsed,
        p50_us=latencies[calls // 2] / 1000,
        cpu_us_per_call=cpu / calls * 1e6,
        loop_cpu_us_per_call=loop_cpu / calls * 1e6,
    )


Samples = dict[tuple[int, str], list[Sample]]


async def _measure_all(url: str, calls: int, rounds: int) -> tuple[Samples, list[str]]:
    samples: Samples = {}
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, Call] = {}
        for name, factory in _CLIENTS.items():
            try:
                clients[name] = await stack.enter_async_context(factory(url))
            except ImportError as missing:  # a candidate not installed here is left out
                print(f"bench http_clients: {name} left out ({missing})")
        names = list(clients)
        for call in clients.values():  # every pool at its c64 shape before measuring
            await measure(call, 4 * CONCURRENCY[-1], CONCURRENCY[-1])
        for round_index in range(rounds):
            for concurrency in CONCURRENCY:
                by = round_index % len(names)
                for name in names[by:] + names[:by]:
                    count = min(calls, SLOW_MAX_CALLS) if name in SLOW_CLIENTS else calls
                    await measure(clients[name], max(100, 4 * concurrency), concurrency)
                    sample = await measure(clients[name], count, concurrency)
                    samples.setdefault((concurrency, name), []).append(sample)
        figures_threads = _threads_on_client_cpu()
        if not figures_threads:
            print("bench http_clients: some thread of this process ran outside the client CPU")
    return samples, names


def _threads_on_client_cpu() -> bool:
    """Whether every thread of this process (tokio's included) is held to the client CPU."""
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            if os.sched_getaffinity(int(task)) - {CLIENT_CPU}:
                return False
    return True


def _figures(samples: Samples, present: list[str]) -> dict[str, float]:
    figures: dict[str, float] = {}
    for (concurrency, name), runs in samples.items():
        prefix = f"http_clients_c{concurrency}_{name}"
        figures[f"{prefix}_calls_per_s"] = _median(run.calls_per_s for run in runs)
        figures[f"{prefix}_p50_us"] = _median(run.p50_us for run in runs)
        figures[f"{prefix}_cpu_us_per_call"] = _median(run.cpu_us_per_call for run in runs)
        figures[f"{prefix}_loop_cpu_us_per_call"] = _median(
            run.loop_cpu_us_per_call for run in runs
        )
    raw = [name for name in RAW_CLIENTS if name in present]
    rounds = len(samples[(CONCURRENCY[-1], raw[0])])
    for concurrency in CONCURRENCY:
        fastest = [
            max((samples[(concurrency, name)][index] for name in raw), key=_rate)
            for index in range(rounds)
        ]
        for name in (*raw, *DISPATCHER_CLIENTS):
            if name not in present or name == "aiohttp":
                continue
            figures[f"http_clients_c{concurrency}_{name}_ratio_to_aiohttp"] = _median(
                ours.calls_per_s / base.calls_per_s
                for ours, base in zip(
                    samples[(concurrency, name)], samples[(concurrency, "aiohttp")], strict=True
                )
            )
        for name in DISPATCHER_CLIENTS:
            if name in present:
                figures[f"http_clients_c{concurrency}_{name}_ratio_to_fastest_raw"] = _median(
                    ours.calls_per_s / best.calls_per_s
                    for ours, best in zip(samples[(concurrency, name)], fastest, strict=True)
                )
    return figures


def _rate(sample: Sample) -> float:
    return sample.calls_per_s


def _median(values: Any) -> float:
    return float(statistics.median(values))


# -- the candidates: each an async context manager yielding one `call()` -----------------


@contextlib.asynccontextmanager
async def aiosonic_client(url: str) -> AsyncIterator[Call]:
    import aiosonic

    body = envelope_bytes("echo")
    invoke_url = f"{url}/invoke"
    connector = aiosonic.TCPConnector(pool_configs={":default": {"size": 512}})
    async with aiosonic.HTTPClient(connector=connector) as client:

        async def call() -> Any:
            response = await client.post(invoke_url, data=body, headers=HEADERS)
            payload = await response.content()
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}")
            return _result(payload)

        yield call
        await connector.cleanup()


@contextlib.asynccontextmanager
async def pyqwest_client(url: str) -> AsyncIterator[Call]:
    import pyqwest

    body = envelope_bytes("echo")
    invoke_url = f"{url}/invoke"
    async with pyqwest.HTTPTransport(follow_redirects=False, enable_otel=False) as transport:
        client = pyqwest.Client(transport)

        async def call() -> Any:
            response = await client.post(invoke_url, HEADERS, body)
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            return _result(response.content)

        yield call


@contextlib.asynccontextmanager
async def niquests_client(url: str) -> AsyncIterator[Call]:
    import niquests

    body = envelope_bytes("echo")
    invoke_url = f"{url}/invoke"
    async with niquests.AsyncSession(pool_connections=4, pool_maxsize=512) as session:

        async def call() -> Any:
            response = await session.post(invoke_url, data=body, headers=HEADERS)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}")
            return _result(response.content)

        yield call


def _dispatcher(client: str) -> Callable[[str], contextlib.AbstractAsyncContextManager[Call]]:
    @contextlib.asynccontextmanager
    async def dispatcher_client(url: str) -> AsyncIterator[Call]:
        from dispatcher import Dispatcher, parse_manifest

        manifest = parse_manifest(
            {
                "version": 1,
                "plugins": [
                    {
                        "id": "bench",
                        "version": "1.0.0",
                        "config": {"greeting": "bench"},
                        "target": {"provider": "http", "url": url, "client": client},
                        "methods": {"echo": {}},
                    }
                ],
            },
            base_dir=ROOT,
        )
        async with Dispatcher(manifest) as dispatcher:
            call_plugin = dispatcher.call

            def call() -> Awaitable[Any]:
                return call_plugin("bench", "echo", PARAMS)

            yield call

    return dispatcher_client


_CLIENTS: dict[str, Callable[[str], contextlib.AbstractAsyncContextManager[Call]]] = {
    "aiohttp": aiohttp_client,
    "pyreqwest": pyreqwest_client,
    "aiosonic": aiosonic_client,
    "pyqwest": pyqwest_client,
    "niquests": niquests_client,
    "dispatcher_aiohttp": _dispatcher("aiohttp"),
    "dispatcher_reqwest": _dispatcher("reqwest"),
}
