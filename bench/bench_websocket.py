"""WebSocket vs HTTP to the same plugin: ``Dispatcher.call`` calls/s and p50 at c1 and c64.

The example plugin runs twice under the SDK's own servers, each in a process of its own
pinned to CPU 0: ``dispatcher-plugin serve`` (HTTP, uvicorn) and ``dispatcher-plugin serve
--websocket`` (aiohttp). The client, pinned to CPU 1, calls ``echo.say`` through a
dispatcher with a ``provider: http`` target and one with ``provider: websocket`` (one
connection, calls multiplexed on it). Rounds alternate the two; figures are medians.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from bench._core import Goal, Options, available_cpus, pinned_to_cpu
from bench.bench_http import (
    CLIENT_CPU,
    ROOT,
    SERVER_CPU,
    Sample,
    _free_port,
    _median,
    _subprocess,
    measure,
    sdk_server,
)
from dispatcher import Dispatcher, parse_manifest

GOALS = {"websocket_c64_ratio_to_http": Goal(">=", 1.0)}

DEFAULT_CALLS = 3000
DEFAULT_ROUNDS = 3


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (200 if options.quick else DEFAULT_CALLS)
    rounds = options.rounds or (1 if options.quick else DEFAULT_ROUNDS)
    figures: dict[str, float] = {
        "websocket_calls_per_measurement": calls,
        "websocket_rounds": rounds,
        "websocket_load_average_1min_at_start": os.getloadavg()[0],
    }
    cpu = SERVER_CPU if {SERVER_CPU, CLIENT_CPU} <= available_cpus() else None
    samples: dict[tuple[str, int], list[Sample]] = {}
    with pinned_to_cpu(CLIENT_CPU):
        async with (
            sdk_server(cpu) as http_url,
            ws_server(cpu) as ws_url,
            dispatcher_for({"provider": "http", "url": http_url}) as over_http,
            dispatcher_for({"provider": "websocket", "url": ws_url}) as over_ws,
        ):
            clients = {"http": over_http, "websocket": over_ws}
            for d in clients.values():  # warm both: connections, caches
                await measure(_caller(d), min(calls, 300), 64)
            for index in range(rounds):
                order = list(clients) if index % 2 == 0 else list(reversed(clients))
                for concurrency in (1, 64):
                    for name in order:
                        sample = await measure(_caller(clients[name]), calls, concurrency)
                        samples.setdefault((name, concurrency), []).append(sample)
    for (name, concurrency), measured in samples.items():
        figures[f"{name}_sdk_c{concurrency}_calls_per_s"] = _median(s.calls_per_s for s in measured)
        figures[f"{name}_sdk_c{concurrency}_p50_us"] = _median(s.p50_us for s in measured)
        figures[f"{name}_sdk_c{concurrency}_cpu_us_per_call"] = _median(
            s.cpu_us_per_call for s in measured
        )
    renamed = {
        key.replace("http_sdk_", "websocket_vs_http_sdk_"): value
        for key, value in figures.items()
        if key.startswith("http_sdk_")
    }
    figures = {k: v for k, v in figures.items() if not k.startswith("http_sdk_")} | renamed
    for concurrency in (1, 64):
        figures[f"websocket_c{concurrency}_ratio_to_http"] = (
            figures[f"websocket_sdk_c{concurrency}_calls_per_s"]
            / figures[f"websocket_vs_http_sdk_c{concurrency}_calls_per_s"]
        )
    figures["websocket_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


def _caller(dispatcher: Dispatcher) -> Any:
    params = {"text": "hi"}

    def call() -> Any:
        return dispatcher.call("echo", "say", params)

    return call


@contextlib.asynccontextmanager
async def dispatcher_for(target: dict[str, Any]) -> AsyncIterator[Dispatcher]:
    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "echo",
                    "version": "1.0.0",
                    "target": target,
                    "methods": {"say": {"timeout_ms": 30_000}},
                }
            ],
        },
        base_dir=ROOT,
    )
    async with Dispatcher(manifest) as dispatcher:
        yield dispatcher


@contextlib.asynccontextmanager
async def ws_server(cpu: int | None) -> AsyncIterator[str]:
    """The example plugin behind ``dispatcher-plugin serve --websocket``; yields its URL."""
    port = _free_port()
    arguments = [
        "-m", "linchkit_plugin.cli", "serve", "echo_plugin:EchoPlugin", "--websocket",
        "--id", "echo", "--version", "1.0.0",
        "--path", str(ROOT / "examples" / "python"), "--port", str(port),
        "--config", '{"greeting": "bench"}',
    ]  # fmt: skip
    async with _subprocess(arguments, cpu) as process:
        deadline = time.monotonic() + 20
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "dispatcher-plugin serve --websocket did not start"
                    ) from None
                await asyncio.sleep(0.05)
            else:
                writer.close()
                await writer.wait_closed()
                break
        yield f"ws://127.0.0.1:{port}/"
