"""Compressed envelopes: time per call with gzip or zstd against plain, 1 KB to 10 MB.

The Python SDK's server (``dispatcher-plugin serve``, the example plugin's ``say``, which
answers the text it was sent: the payload crosses both ways) in a process of its own; the
dispatcher's HTTP provider on its default client, compression on (``min_bytes: 0``, the
server compressing every answer) or off (``algorithms: []``), calls one at a time.

Two links: loopback, and a 100 Mbit/s link: a TCP proxy written here (asyncio, one token
bucket per direction shared by every connection, as one link would be) between the
dispatcher and the server. The payload is JSON records of the kind plugins exchange
(ids, names from a small vocabulary, numbers, timestamps), which gzip shrinks ~5x; a
payload of one repeated byte would flatter compression.

Figures: ``compression_<link>_<size>_<coding>_ratio`` = time per call compressed / plain
(below 1: compression pays), and per link the crossover, the smallest payload measured
from which compression pays (``-1``: at no size measured). The default ``min_bytes``
(``providers._compression.DEFAULT_MIN_BYTES``) is chosen from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench._core import Options

ROOT = Path(__file__).resolve().parent.parent
SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (1_000, 100_000)
CODINGS = ("zstd", "gzip")
#: 100 Mbit/s in bytes per second.
LINK_RATE = 100_000_000 / 8
_NAMES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


async def run(options: Options) -> dict[str, float]:
    from bench.bench_http import sdk_server

    sizes = QUICK_SIZES if options.quick else SIZES
    rounds = options.rounds or (1 if options.quick else 3)
    figures: dict[str, float] = {}
    server_options = ("--compress-min-bytes", "0", "--max-body-bytes", str(64 * 1024 * 1024))
    async with sdk_server(None, server_options) as url:
        host, port = url.removeprefix("http://").split(":")
        async with rate_limited_proxy(host, int(port), LINK_RATE) as proxied:
            for link, base in (("loopback", url), ("100mbit", proxied)):
                ratios, plain = await _measure_link(base, sizes, rounds, options.calls)
                for size, seconds in plain.items():
                    figures[f"compression_{link}_{_label(size)}_plain_ms"] = seconds * 1000
                for (size, coding), ratio in ratios.items():
                    figures[f"compression_{link}_{_label(size)}_{coding}_ratio"] = ratio
                    print(f"  {link:8} {_label(size):>5} {coding}: {ratio:.3f}x plain", flush=True)
                figures[f"compression_{link}_crossover_bytes"] = _crossover(ratios, sizes)
    figures["compression_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


def _label(size: int) -> str:
    return f"{size // 1_000_000}mb" if size >= 1_000_000 else f"{size // 1_000}kb"


def _crossover(ratios: dict[tuple[int, str], float], sizes: tuple[int, ...]) -> float:
    """The smallest size from which the best coding pays at every larger size; -1: none."""
    paying = [min(ratios[(size, coding)] for coding in CODINGS) < 1 for size in sizes]
    for index, size in enumerate(sizes):
        if all(paying[index:]):
            return float(size)
    return -1.0


async def _measure_link(
    url: str, sizes: tuple[int, ...], rounds: int, calls: int | None
) -> tuple[dict[tuple[int, str], float], dict[int, float]]:
    """Per (size, coding): time per call compressed / plain; per size: plain seconds."""
    from dispatcher import Dispatcher
    from dispatcher.config import parse_manifest

    modes: dict[str, dict[str, Any]] = {
        "plain": {"algorithms": []},
        **{coding: {"algorithms": [coding], "min_bytes": 0} for coding in CODINGS},
    }
    plugins = [
        {
            "id": mode,
            "version": "1.0.0",
            "target": {
                "provider": "http",
                "url": url,
                "compression": compression,
                "max_response_bytes": 64 * 1024 * 1024,
            },
            "defaults": {"timeout_ms": 120_000},
            "methods": {"say": {}},
        }
        for mode, compression in modes.items()
    ]
    manifest = parse_manifest({"version": 1, "plugins": plugins}, base_dir=ROOT)
    times: dict[tuple[int, str], list[float]] = {}
    async with Dispatcher(manifest) as dispatcher:
        for size in sizes:
            text = payload(size)
            count = calls or max(3, min(50, 20_000_000 // (size * 20)))
            for mode in modes:  # warm: the plugin's Accept-Encoding is learned
                await dispatcher.call(mode, "say", {"text": text})
            for round_index in range(rounds):
                order = list(modes)[round_index % 3 :] + list(modes)[: round_index % 3]
                for mode in order:
                    started = time.perf_counter()
                    for _ in range(count):
                        await dispatcher.call(mode, "say", {"text": text})
                    elapsed = (time.perf_counter() - started) / count
                    times.setdefault((size, mode), []).append(elapsed)
    ratios: dict[tuple[int, str], float] = {}
    plain: dict[int, float] = {}
    for size in sizes:
        plain[size] = statistics.median(times[(size, "plain")])
        for coding in CODINGS:
            ratios[(size, coding)] = statistics.median(times[(size, coding)]) / plain[size]
    return ratios, plain


def payload(size: int) -> str:
    """About ``size`` bytes of JSON records, as a string (the example plugin takes text)."""
    import orjson

    rng = random.Random(size)
    records: list[dict[str, Any]] = []
    length = 0
    while length < size:
        record = {
            "id": rng.randrange(10**12),
            "name": f"{rng.choice(_NAMES)}-{rng.choice(_NAMES)}",
            "amount": round(rng.uniform(0, 10_000), 2),
            "at": f"2026-12-{rng.randrange(1, 31):02d}T{rng.randrange(24):02d}:00:00Z",
            "tags": rng.sample(_NAMES, 2),
        }
        records.append(record)
        length += len(orjson.dumps(record)) + 1
    return orjson.dumps(records).decode()[:size]


@contextlib.asynccontextmanager
async def rate_limited_proxy(host: str, port: int, rate: float) -> AsyncIterator[str]:
    """A TCP proxy to ``host:port`` passing at most ``rate`` bytes/s each way; yields its URL."""
    upstream_bucket = TokenBucket(rate)
    downstream_bucket = TokenBucket(rate)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        server_reader, server_writer = await asyncio.open_connection(host, port)
        pumps = [
            asyncio.create_task(_pump(client_reader, server_writer, upstream_bucket)),
            asyncio.create_task(_pump(server_reader, client_writer, downstream_bucket)),
        ]
        tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
                tasks.discard(pump)
            client_writer.close()
            server_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


class TokenBucket:
    """Paces bytes to ``rate`` per second, with a burst of 16 KB (one TCP window's worth)."""

    __slots__ = ("_burst", "_free_at", "_rate")

    def __init__(self, rate: float, burst: int = 16 * 1024) -> None:
        self._rate = rate
        self._burst = burst / rate
        self._free_at = 0.0

    async def take(self, count: int) -> None:
        now = time.monotonic()
        # The link is free again once what was sent before has gone through.
        self._free_at = max(self._free_at, now - self._burst) + count / self._rate
        if self._free_at > now:
            await asyncio.sleep(self._free_at - now)


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: TokenBucket
) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(16 * 1024):
            await bucket.take(len(chunk))
            writer.write(chunk)
            await writer.drain()


def markdown_table(figures: dict[str, float]) -> str:
    """The README's table, from ``bench/results.json`` (``python -m bench.bench_compression``)."""
    lines = [
        "| payload | loopback: plain | zstd | gzip | 100 Mbit/s: plain | zstd | gzip |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in SIZES:
        label = _label(size)
        cells = [label.replace("kb", " KB").replace("mb", " MB")]
        for link in ("loopback", "100mbit"):
            plain = figures.get(f"compression_{link}_{label}_plain_ms")
            cells.append("" if plain is None else f"{plain:,.2f} ms")
            for coding in CODINGS:
                ratio = figures.get(f"compression_{link}_{label}_{coding}_ratio")
                cells.append("" if ratio is None else f"{ratio:.2f}x" + (" ✔" if ratio < 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # the run itself is `python -m bench compression`
    import json

    from bench._core import RESULTS_PATH

    print(markdown_table(json.loads(RESULTS_PATH.read_text())))
    sys.exit(0)
