"""10,000 calls in flight at once to an HTTP function that takes 1 s to answer.

The function (``bench._tail_server --delay-ms 1000``, one process on CPU 0) answers every
call after one second. Each variant fires all the calls at once and waits for the last;
the figure is how long that took beyond the function's own second, and how much memory
the client process grew by per call in flight (its RSS sampled while every call waits on
the function, minus its RSS before: Python objects, sockets' buffers, and Rust's heap
alike). The first burst opens every connection (``cold``), the second reuses the pool
(``warm``).

Each run of a variant is a fresh process of its own (``python -m bench.bench_http_inflight
--variant …``) so one's memory does not hide in another's freed heap, with its file
descriptor limit raised to what 10,000 sockets need (the hard limit allows it here), and
against a fresh server: the 10,000 connections a run closes stay in TIME_WAIT for a
minute, and a later run's connects to the same address and port had to step over them
(``__inet_hash_connect`` searching for a free port took half of that run's kernel time).
Every variant runs ``REPEATS`` times (``--rounds``); its figures are the medians, because
one burst's RSS growth is a coarse reading (pyreqwest's allocator, mimalloc, backs its
heap with 2 MB transparent huge pages: the same raw pyreqwest run read 31 to 47 KB per call).
``python_kb_per_call`` is the Python heap alone (``tracemalloc``, a run of its own since
tracing slows the calls), the part of the memory the dispatcher's own objects make.

The server listens with a backlog of the number of calls (the kernel caps it at
``net.core.somaxconn``), and each run records the kernel's counters of connections refused
at the listen queue (``listen_overflows``) and of SYNs sent again (``syn_retransmits``):
where they are not 0, some connections waited a 1 s retransmission timeout. The counters
are the host's (or its network namespace's): another process's overflows count too.

Variants: raw aiohttp (connector limit = the number of calls), raw pyreqwest (the same
limit), the dispatcher on each client with the target's ``pool: {max_connections: N}``,
raw pyreqwest and the dispatcher on reqwest with ``MIMALLOC_ALLOW_THP=0`` in their
environment (``_no_thp``: mimalloc then turns transparent huge pages off for the process;
with them, the kernel zeroing 2 MB pages was a third of the tokio thread's time in a burst
of new connections), and the dispatcher with no pool (the provider's shared
512 connections: the old behaviour, 10,000 calls in ~20 rounds; run once, it takes 20 s).
The ``_h2c`` variants speak HTTP/2 by prior knowledge (raw pyreqwest, and the dispatcher's
target with ``http2: true``) to the same function served by Go's net/http
(``bench/h2c_server``, built with ``go`` when the benchmark runs; without ``go`` they are
left out): the calls in flight share one connection instead of holding one each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._core import Goal, Options, available_cpus
from bench.bench_http import ROOT, envelope_bytes, port_server

SERVER_CPU = 0
CALLS = 10_000
DELAY_S = 1.0
REPEATS = 3
VARIANTS = (
    "aiohttp",
    "pyreqwest",
    "pyreqwest_no_thp",
    "dispatcher_reqwest",
    "dispatcher_reqwest_no_thp",
    "dispatcher_aiohttp",
    "dispatcher_no_pool",
    "pyreqwest_h2c",
    "dispatcher_reqwest_h2c",
)
#: The variants that speak HTTP/2 to ``bench/h2c_server`` (run only where ``go`` builds it).
H2C = frozenset({"pyreqwest_h2c", "dispatcher_reqwest_h2c"})
#: What a variant's process gets in its environment besides ours.
ENVIRONMENTS = {
    "pyreqwest_no_thp": {"MIMALLOC_ALLOW_THP": "0"},
    "dispatcher_reqwest_no_thp": {"MIMALLOC_ALLOW_THP": "0"},
}
#: Run once whatever ``REPEATS`` says: 20 s a run, and no goal rides on it.
ONCE = frozenset({"dispatcher_no_pool"})
#: Variants whose Python heap per call is measured too (a run each, traced).
PYTHON_HEAP = ("pyreqwest", "dispatcher_reqwest")
#: The kernel's counters (``/proc/net/netstat``, ``TcpExt``) of a burst's lost connects.
KERNEL_COUNTERS = {"listen_overflows": "ListenOverflows", "syn_retransmits": "TCPSynRetrans"}

GOALS = {
    "http_inflight_10k_dispatcher_reqwest_cold_beyond_target_s": Goal("<=", 2.0),
    "http_inflight_10k_dispatcher_reqwest_kb_per_call": Goal("<=", 22.0),
}

Call = Callable[[], Awaitable[Any]]


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (500 if options.quick else CALLS)
    repeats = 1 if options.quick else (options.rounds or REPEATS)
    _raise_file_limit(2 * calls + 1024)
    figures: dict[str, float] = {
        "http_inflight_calls": calls,
        "http_inflight_runs_per_variant": repeats,
        "http_inflight_load_average_1min_at_start": os.getloadavg()[0],
    }
    for variant in VARIANTS:
        if variant in H2C and shutil.which("go") is None:
            continue  # no Go toolchain to build the HTTP/2 server with
        runs = [await _fresh_run(variant, calls) for _ in range(1 if variant in ONCE else repeats)]
        for key in runs[0]:
            value = statistics.median(measured[key] for measured in runs)
            figures[f"http_inflight_10k_{variant}_{key}"] = value
        kb = [measured["kb_per_call"] for measured in runs]
        figures[f"http_inflight_10k_{variant}_kb_per_call_min"] = min(kb)
        figures[f"http_inflight_10k_{variant}_kb_per_call_max"] = max(kb)
    for variant in PYTHON_HEAP:
        measured = await _fresh_run(variant, calls, "--python-heap")
        figures[f"http_inflight_10k_{variant}_python_kb_per_call"] = measured["python_kb_per_call"]
    figures["http_inflight_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


async def _fresh_run(variant: str, calls: int, *flags: str) -> dict[str, float]:
    """One run of ``variant`` in a process of its own, against a server of its own."""
    cpu = SERVER_CPU if len(available_cpus()) > 1 else None
    extra = ("--delay-ms", str(DELAY_S * 1000), "--backlog", str(calls))
    server = _h2c_server(cpu) if variant in H2C else port_server("bench._tail_server", cpu, extra)
    async with server as url:
        before = _kernel_counters()
        measured = await _in_child(variant, url, calls, flags)
        after = _kernel_counters()
    for key in KERNEL_COUNTERS:
        if key in before and key in after:
            measured[key] = after[key] - before[key]
    return measured


async def _in_child(variant: str, url: str, calls: int, flags: tuple[str, ...]) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.bench_http_inflight",
        "--variant",
        variant,
        "--url",
        url,
        "--calls",
        str(calls),
        *flags,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **ENVIRONMENTS.get(variant, {})},
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"bench_http_inflight --variant {variant} failed")
    figures: dict[str, float] = json.loads(out.splitlines()[-1])
    return figures


@contextlib.asynccontextmanager
async def _h2c_server(cpu: int | None) -> AsyncIterator[str]:
    """``bench/h2c_server`` answering every call after ``DELAY_S``, pinned to ``cpu``."""
    process = await asyncio.create_subprocess_exec(
        _h2c_binary(), "-delay", f"{DELAY_S}s", stdout=asyncio.subprocess.PIPE
    )
    if cpu is not None:
        os.sched_setaffinity(process.pid, {cpu})
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), 30))
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        await process.wait()


@functools.cache
def _h2c_binary() -> str:
    """``bench/h2c_server`` built (once per process) into a folder of its own."""
    binary = Path(tempfile.mkdtemp(prefix="bench-h2c-")) / "h2c_server"
    source = Path(__file__).parent / "h2c_server"
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=source, check=True)
    return str(binary)


def _kernel_counters(path: Path = Path("/proc/net/netstat")) -> dict[str, float]:
    """``KERNEL_COUNTERS`` now; empty where the file cannot be read (not Linux)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, float] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            for key, name in KERNEL_COUNTERS.items():
                if name in row:
                    found[key] = float(row[name])
    return found


def _raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _rss_kb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024


# -- in the child: one variant, two bursts -----------------------------------------------


async def _burst(call: Call, calls: int) -> tuple[float, float]:
    """(seconds for every call to answer, RSS growth in KB while all are in flight)."""
    before = _rss_kb()
    started = time.perf_counter()
    tasks = [asyncio.ensure_future(call()) for _ in range(calls)]
    await asyncio.sleep(DELAY_S * 0.8)  # every call is waiting on the function now
    peak = _rss_kb()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - started
    failed = [result for result in results if isinstance(result, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {calls} calls failed, e.g. {failed[0]!r}")
    return elapsed, peak - before


async def _variant(variant: str, url: str, calls: int) -> dict[str, float]:
    _raise_file_limit(calls + 1024)
    async with _client(variant, url, calls) as call:
        await call()  # imports, routes and the first connection, outside the figures
        cold, cold_kb = await _burst(call, calls)
        warm, _ = await _burst(call, calls)
    return {
        "cold_beyond_target_s": cold - DELAY_S,
        "warm_beyond_target_s": warm - DELAY_S,
        "kb_per_call": cold_kb / calls,
    }


async def _python_heap(variant: str, url: str, calls: int) -> dict[str, float]:
    """The Python heap's growth per call while every call of a cold burst waits."""
    _raise_file_limit(calls + 1024)
    async with _client(variant, url, calls) as call:
        await call()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.ensure_future(call()) for _ in range(calls)]
        await asyncio.sleep(DELAY_S * 0.8)
        waiting = tracemalloc.get_traced_memory()[0]
        await asyncio.gather(*tasks)
        tracemalloc.stop()
    return {"python_kb_per_call": (waiting - before) / 1024 / calls}


@contextlib.asynccontextmanager
async def _client(variant: str, url: str, calls: int) -> AsyncIterator[Call]:
    if variant == "aiohttp":
        import aiohttp

        body = envelope_bytes("say")
        connector = aiohttp.TCPConnector(limit=calls, limit_per_host=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def call() -> Any:
                async with session.post(
                    f"{url}/invoke", data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    return await response.read()

            yield call
        return
    if variant in ("pyreqwest", "pyreqwest_no_thp", "pyreqwest_h2c"):
        from pyreqwest.client import ClientBuilder

        body = envelope_bytes("say")
        builder = ClientBuilder().follow_redirects(False).max_connections(calls)
        if variant in H2C:
            builder = builder.http2_prior_knowledge()
        async with builder.build() as client:

            async def call() -> Any:
                request = client.post(f"{url}/invoke").body_bytes(body)
                response = await request.header("Content-Type", "application/json").build().send()
                return await response.bytes()

            yield call
        return
    from dispatcher import Dispatcher, parse_manifest

    target: dict[str, Any] = {"provider": "http", "url": url}
    if variant != "dispatcher_no_pool":
        target["client"] = variant.removeprefix("dispatcher_").split("_")[0]
        target["pool"] = {"max_connections": calls}
        target["http2"] = variant in H2C
    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "bench",
                    "version": "1.0.0",
                    "target": target,
                    "methods": {"say": {"timeout_ms": 120_000}},
                }
            ],
        },
        base_dir=ROOT,
    )
    async with Dispatcher(manifest) as dispatcher:
        call_plugin = dispatcher.call

        def call() -> Awaitable[Any]:
            return call_plugin("bench", "say", {"text": "hi"})

        yield call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--python-heap", action="store_true", help="trace the Python heap")
    options = parser.parse_args()
    import uvloop

    measure = _python_heap if options.python_heap else _variant
    figures = uvloop.run(measure(options.variant, options.url, options.calls))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
