"""The dispatcher's own CPU per call, piece by piece (ablation), at concurrency 64 and 1.

CPU time of this process per call (``time.process_time``), which the machine's other
tenants disturb far less than wall-clock rates; the median of interleaved rounds. Each
figure is one layer peeled off the next, so the differences are what a layer costs:

* ``hot_path_c<N>_local_provider_cpu_us``: the local provider called directly with a
  ready ``Invocation`` (no dispatcher): the floor of the in-process target.
* ``hot_path_c<N>_local_route_cpu_us``: the method's chain (none) with the dispatcher
  building the ``Invocation`` (``_invocation``: params, deadline, request id).
* ``hot_path_c<N>_local_call_cpu_us``: ``Dispatcher.call`` (route lookup, in-flight
  tracking); ``..._local_chain_call_cpu_us``: the same with the full chain of
  ``bench_policies`` (every call a cache miss).
* ``hot_path_c<N>_*_added_us`` / ``*_over_raw_us``: those differences, one run's medians.
* ``hot_path_c<N>_http_*``: the same against the fixed-reply HTTP server through the
  ``reqwest`` client, and ``hot_path_c<N>_raw_reqwest_cpu_us``, the raw client posting
  prebuilt bytes. CPU counts every thread of the process (reqwest's runtime too).
* ``hot_path_c<N>_aiohttp_*`` and ``hot_path_c<N>_raw_aiohttp_cpu_us``: the same on the
  ``aiohttp`` client (the provider's default) against a bare aiohttp session.
* ``hot_path_stubbed_{provider,route,call}_cpu_us``: the same three layers over the HTTP
  provider with its client replaced by one that answers at once (a stand-in: it measures
  the dispatcher's own Python, which the network's noise hides end to end), one call
  after another, min of the rounds; steady to about ±0.05 µs. ``…_stubbed_client_cpu_us``
  is the stand-in alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import count
from pathlib import Path
from typing import Any

from bench._core import Options
from bench.bench_http import aiohttp_client, fixed_reply_server, measure, pyreqwest_client
from bench.bench_policies import FULL_CHAIN, _write_plugin
from providers._http_client import HttpClient, Reply

Call = Callable[[], Awaitable[Any]]


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (300 if options.quick else 3000)
    rounds = options.rounds or (1 if options.quick else 7)
    figures: dict[str, float] = {"hot_path_load_average_1min_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-hot-path-") as folder:
        _write_plugin(Path(folder))
        async with fixed_reply_server(None) as url:
            local = {
                "provider": "local",
                "entrypoint": "bench_in_process_echo:Echo",
                "path": folder,
            }
            targets = {
                "local": local,
                "http": {"provider": "http", "url": url, "client": "reqwest"},
                "aiohttp": {"provider": "http", "url": url, "client": "aiohttp"},
            }
            async with (
                pyreqwest_client(url) as raw_reqwest,
                aiohttp_client(url) as raw_aiohttp,
                _clients(targets) as layers,
            ):
                clients = {"raw_reqwest": raw_reqwest, "raw_aiohttp": raw_aiohttp, **layers}
                for concurrency in (64, 1):
                    figures.update(await _measure(clients, calls, rounds, concurrency))
    figures.update(layer_costs(figures))
    figures.update(await _stubbed(rounds, 2000 if options.quick else 20_000))
    figures["hot_path_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


@contextlib.asynccontextmanager
async def _clients(targets: dict[str, dict[str, Any]]) -> AsyncIterator[dict[str, Call]]:
    from dispatcher import Dispatcher, parse_manifest

    plugins = [
        {"id": f"{name}{suffix}", "version": "1.0.0", "target": target, "methods": {"echo": policy}}
        for name, target in targets.items()
        for suffix, policy in (("", {}), ("_chain", FULL_CHAIN))
    ]
    async with Dispatcher(parse_manifest({"plugins": plugins})) as dispatcher:
        yield _layers(dispatcher, targets)


def _layers(dispatcher: Any, targets: dict[str, Any]) -> dict[str, Call]:
    from providers.invocation import Invocation

    numbers = count()
    loop = asyncio.get_running_loop()

    def via_call(plugin: str) -> Call:
        return lambda: dispatcher.call(plugin, "echo", {"text": f"t{next(numbers)}"})

    def via_route(plugin: str) -> Call:
        route = dispatcher._routes.find(plugin, "echo", None, "running")
        build = dispatcher._invocation
        return lambda: route.invoke(
            build(route, {"text": f"t{next(numbers)}"}, None, None, None, None, None)
        )

    def via_provider(plugin: str) -> Call:
        spec = next(spec for spec in dispatcher.manifest.plugins if spec.id == plugin)
        target = spec.target_of("echo")
        provider = dispatcher._providers[target.provider]
        return lambda: provider.invoke(
            target,
            Invocation(
                plugin, "1.0.0", "echo", {"text": f"t{next(numbers)}"}, loop.time() + 5, "r"
            ),
        )

    clients: dict[str, Call] = {}
    for name in targets:
        clients[f"{name}_provider"] = via_provider(name)
        clients[f"{name}_route"] = via_route(name)
        clients[f"{name}_call"] = via_call(name)
        clients[f"{name}_chain_call"] = via_call(f"{name}_chain")
    return clients


def layer_costs(figures: dict[str, float]) -> dict[str, float]:
    """What each layer adds, as differences of the medians of one run."""
    costs = {}
    for concurrency in (64, 1):
        prefix = f"hot_path_c{concurrency}_"

        def cpu(name: str, prefix: str = prefix) -> float:
            return figures[f"{prefix}{name}_cpu_us"]

        costs[f"{prefix}local_invocation_added_us"] = cpu("local_route") - cpu("local_provider")
        costs[f"{prefix}local_call_added_us"] = cpu("local_call") - cpu("local_route")
        costs[f"{prefix}local_chain_added_us"] = cpu("local_chain_call") - cpu("local_call")
        costs[f"{prefix}http_provider_over_raw_us"] = cpu("http_provider") - cpu("raw_reqwest")
        costs[f"{prefix}http_call_over_raw_us"] = cpu("http_call") - cpu("raw_reqwest")
        costs[f"{prefix}http_chain_added_us"] = cpu("http_chain_call") - cpu("http_call")
        raw_aiohttp = cpu("raw_aiohttp")
        costs[f"{prefix}aiohttp_provider_over_raw_us"] = cpu("aiohttp_provider") - raw_aiohttp
        costs[f"{prefix}aiohttp_call_over_raw_us"] = cpu("aiohttp_call") - raw_aiohttp
        costs[f"{prefix}aiohttp_chain_added_us"] = cpu("aiohttp_chain_call") - cpu("aiohttp_call")
    return costs


async def _measure(
    clients: dict[str, Call], calls: int, rounds: int, concurrency: int
) -> dict[str, float]:
    per_round = calls if concurrency > 1 else max(calls // 2, 1)
    for call in clients.values():  # warm: pooled connections, imports, caches
        await measure(call, 300, concurrency)
    cpu: dict[str, list[float]] = {name: [] for name in clients}
    for index in range(rounds):
        names = list(clients)
        for name in names[index % len(names) :] + names[: index % len(names)]:
            sample = await measure(clients[name], per_round, concurrency)
            cpu[name].append(sample.cpu_us_per_call)
    return {
        f"hot_path_c{concurrency}_{name}_cpu_us": statistics.median(values)
        for name, values in cpu.items()
    }


_STUB_BODY = b'{"ok":true,"result":{"text":"hi"}}'


class _AnsweringAtOnce(HttpClient):
    """The client seam's stand-in: the fixed server's answer, without I/O."""

    def __init__(self) -> None:
        self.reply = Reply(200, {"Content-Length": str(len(_STUB_BODY))}, _STUB_BODY)

    async def post(self, url: str, body: bytes, headers: Any, **options: Any) -> Reply:
        return self.reply

    async def get(self, url: str, headers: Any, **options: Any) -> Reply:
        return self.reply

    async def aclose(self) -> None:
        pass


async def _stubbed(rounds: int, calls: int) -> dict[str, float]:
    """The dispatcher's own CPU per call over the HTTP provider, its client stubbed."""
    from dispatcher import Dispatcher, parse_manifest
    from providers.http import HttpProvider
    from providers.invocation import Invocation

    target = {"provider": "http", "url": "http://127.0.0.1:9", "client": "reqwest"}
    plugin = {"id": "stub", "version": "1.0.0", "target": target, "methods": {"echo": {}}}
    params = {"text": "hello"}
    async with Dispatcher(parse_manifest({"plugins": [plugin]})) as dispatcher:
        spec = dispatcher.manifest.plugins[0]
        http_target = spec.target_of("echo")
        provider = dispatcher._providers[http_target.provider]
        assert isinstance(provider, HttpProvider)
        stub = _AnsweringAtOnce()
        provider._route(http_target).client = stub
        route = dispatcher._routes.find("stub", "echo", None, "running")
        loop = asyncio.get_running_loop()

        async def client(count: int) -> None:
            for _ in range(count):
                await stub.post("", b"", {})

        async def via_provider(count: int) -> None:
            for _ in range(count):
                invocation = Invocation("stub", "1.0.0", "echo", params, loop.time() + 5, "r")
                await provider.invoke(http_target, invocation)

        async def via_route(count: int) -> None:
            build = dispatcher._invocation
            for _ in range(count):
                await route.invoke(build(route, params, None, None, None, None, None))

        async def via_call(count: int) -> None:
            for _ in range(count):
                await dispatcher.call("stub", "echo", params)

        layers = {"client": client, "provider": via_provider, "route": via_route, "call": via_call}
        cpu: dict[str, list[float]] = {name: [] for name in layers}
        for layer in layers.values():
            await layer(calls // 10)
        for _ in range(rounds):
            for name, layer in layers.items():
                started = time.process_time()
                await layer(calls)
                cpu[name].append((time.process_time() - started) / calls * 1e6)
    return {f"hot_path_stubbed_{name}_cpu_us": min(values) for name, values in cpu.items()}
