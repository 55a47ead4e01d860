"""The gateway: a plugin method called over HTTP through ``dispatcher serve`` against the
same method called with ``Dispatcher.call`` in the benchmark's own process, same run.

Both reach the same target: the fixed-reply HTTP function server (``bench._fixed_server``,
pinned to CPU 0), as an ``http`` target of the manifest. The gateway is a real
``dispatcher serve`` process pinned to CPU 1; its client is a plain aiohttp session
posting ``{"text": "hi"}`` to ``/v1/plugins/bench/methods/echo``.

  gateway_c1_p50_added_us    p50 of gateway calls minus p50 of direct calls, alternating
                             one call of each at concurrency 1 (as bench_http measures)
  gateway_c64_ratio_to_direct  calls/s through the gateway over calls/s direct, at
                             concurrency 64. Direct runs with this process on CPU 1 (the
                             gateway's CPU, idle meanwhile); through the gateway this
                             process (the HTTP client) runs on CPU 0 beside the fixed
                             server, so the gateway process has CPU 1 to itself: the ratio
                             is what one core of gateway (HTTP server + dispatcher) serves
                             against one core of dispatcher alone.

  gateway_aiohttp_floor_*     the same for a bare aiohttp.web server on CPU 1 answering a
                             fixed envelope (``bench._aiohttp_server``): what the HTTP hop
                             alone costs, before any dispatcher work.

Figures are medians over interleaved rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench._core import Goal, Options, available_cpus, pinned_to_cpu
from bench.bench_http import (
    ROOT,
    Call,
    Sample,
    dispatcher_client,
    fixed_reply_server,
    measure,
    measure_paired,
)

SERVER_CPU = 0
GATEWAY_CPU = 1
DEFAULT_CALLS = 3000
DEFAULT_ROUNDS = 5

GOALS = {
    "gateway_c1_p50_added_us": Goal("<=", 150.0),
    "gateway_c64_ratio_to_direct": Goal(">=", 0.5),
}


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (200 if options.quick else DEFAULT_CALLS)
    rounds = options.rounds or (1 if options.quick else DEFAULT_ROUNDS)
    pinned = {SERVER_CPU, GATEWAY_CPU} <= available_cpus()
    figures: dict[str, float] = {
        "gateway_calls_per_measurement": calls,
        "gateway_rounds": rounds,
        "gateway_load_average_1min_at_start": os.getloadavg()[0],
    }
    added: list[float] = []
    added_pairs: list[float] = []
    runs: dict[str, list[Sample]] = {"direct": [], "gateway": [], "floor": []}
    direct_runs, gateway_runs = runs["direct"], runs["gateway"]
    floor_added: list[float] = []
    gateway_c1: list[Sample] = []
    async with (
        fixed_reply_server(SERVER_CPU if pinned else None) as target_url,
        gateway_process(target_url, GATEWAY_CPU if pinned else None) as gateway_url,
        dispatcher_client(target_url) as direct,
        gateway_client(gateway_url) as through_gateway,
        aiohttp_floor_process(GATEWAY_CPU if pinned else None) as floor_url,
        gateway_client(floor_url) as floor,
    ):
        for call in (direct, through_gateway, floor):  # open every pooled connection first
            await measure(call, 4 * 64, 64)
        for round_index in range(rounds):
            with pinned_to_cpu(SERVER_CPU):
                p50, pairs = await measure_paired(through_gateway, direct, calls)
                added.append(p50)
                added_pairs.append(pairs)
                gateway_c1.append(await measure(through_gateway, calls, 1))
                floor_added.append((await measure_paired(floor, direct, calls))[0])
            order = [("direct", direct), ("gateway", through_gateway), ("floor", floor)]
            for name, call in order[round_index % 2 :] + order[: round_index % 2]:
                cpu = GATEWAY_CPU if name == "direct" else SERVER_CPU
                with pinned_to_cpu(cpu):
                    await measure(call, 4 * 64, 64)
                    sample = await measure(call, calls, 64)
                runs[name].append(sample)
    figures["gateway_c1_p50_added_us"] = statistics.median(added)
    figures["gateway_c1_median_added_us_per_call"] = statistics.median(added_pairs)
    figures["gateway_c1_p50_us"] = statistics.median(s.p50_us for s in gateway_c1)
    figures["gateway_c64_calls_per_s"] = statistics.median(s.calls_per_s for s in gateway_runs)
    figures["gateway_c64_p50_us"] = statistics.median(s.p50_us for s in gateway_runs)
    figures["gateway_c64_p99_us"] = statistics.median(s.p99_us for s in gateway_runs)
    figures["gateway_direct_c64_calls_per_s"] = statistics.median(
        s.calls_per_s for s in direct_runs
    )
    figures["gateway_c64_ratio_to_direct"] = statistics.median(
        ours.calls_per_s / theirs.calls_per_s
        for ours, theirs in zip(gateway_runs, direct_runs, strict=True)
    )
    # aiohttp.web alone (a fixed answer, no dispatcher behind it), measured the same way.
    figures["gateway_aiohttp_floor_c1_p50_added_us"] = statistics.median(floor_added)
    figures["gateway_aiohttp_floor_c64_calls_per_s"] = statistics.median(
        s.calls_per_s for s in runs["floor"]
    )
    figures["gateway_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


@contextlib.asynccontextmanager
async def aiohttp_floor_process(cpu: int | None) -> AsyncIterator[str]:
    """``bench._aiohttp_server``: aiohttp.web answering a fixed envelope, no dispatcher."""
    async with _listening([sys.executable, "-m", "bench._aiohttp_server"], cpu) as url:
        yield url


@contextlib.asynccontextmanager
async def _listening(arguments: list[str], cpu: int | None) -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        *arguments, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    if cpu is not None:
        os.sched_setaffinity(process.pid, {cpu})
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        if not line.startswith("listening on "):
            raise RuntimeError(f"{arguments} did not start: {line!r}")
        yield line.split()[-1]
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)


@contextlib.asynccontextmanager
async def gateway_process(
    target_url: str, cpu: int | None, *, client: str | None = None
) -> AsyncIterator[str]:
    """``dispatcher serve`` on a manifest whose ``bench.echo`` is ``target_url`` (over
    ``client``, the provider's default when None)."""
    target = {"provider": "http", "url": target_url}
    if client is not None:
        target["client"] = client
    manifest = {
        "version": 1,
        "plugins": [
            {
                "id": "bench",
                "version": "1.0.0",
                "target": target,
                "methods": {"echo": {}},
            }
        ],
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plugins.yaml"
        path.write_text(yaml.safe_dump(manifest))
        command = [sys.executable, "-m", "dispatcher.cli", "-m", str(path), "serve", "--port", "0"]
        async with _listening(command, cpu) as url:
            yield url


@contextlib.asynccontextmanager
async def gateway_client(url: str) -> AsyncIterator[Call]:
    import aiohttp

    body = orjson.dumps({"text": "hi"})
    call_url = f"{url}/v1/plugins/bench/methods/echo"
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=512, limit_per_host=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector, skip_auto_headers=("User-Agent",), auto_decompress=False
    ) as session:

        async def call() -> Any:
            async with session.post(call_url, data=body, headers=headers) as response:
                payload = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
            return orjson.loads(payload)["result"]

        yield call
