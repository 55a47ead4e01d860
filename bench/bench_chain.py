"""The policy chain step by step: CPU per call as each policy joins (cumulative ablation).

One dispatcher, one method per variant, each adding one policy to the one before:
none → +deadline (``timeout_ms``) → +retry → +breaker → +rate limit → +cache (every call
a miss: distinct params), the last being ``bench_policies``' full chain. Three targets:
the in-process one (``local``, no I/O: each call runs start to end in one go, on hot CPU
caches), the same plugin yielding once to the event loop (``yielding``: like any I/O, 64
calls interleave, so a call comes back to its chain's frames and objects after 63 others
have run, and every resumption passes through each coroutine layer of the chain), and
the fixed-reply HTTP server (``http``, aiohttp: the real thing, and the noisiest).

CPU time of this process per call (``time.process_time``, every thread), concurrency 64,
the variants interleaved round by round (their order rotating), the median and the min
of the rounds: the machine's other tenants disturb CPU time far less than wall-clock
rates, and the min is what a quiet round costs.

* ``chain_<target>_c64_<variant>_cpu_us`` (median) and ``..._min_cpu_us``;
* ``chain_<target>_c64_<variant>_gc_us``: of that CPU per call, the time inside CPython's
  garbage collector (``gc.callbacks``), which a cache keeping many results drives up;
* ``chain_<target>_c64_<variant>_faults_per_call``: page faults of the process per call
  (``getrusage``): memory the heap had to grow by; a cache whose every entry held a 4 KB
  buffer read 1.06 here, one page per kept result;
* ``chain_<target>_c64_<variant>_step_us``: what that variant's policy adds over the one
  before (difference of medians); ``chain_<target>_c64_chain_added_us``: full over none.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import count
from pathlib import Path
from typing import Any

from bench._core import Options, available_cpus, collector_time, pinned_to_cpu
from bench.bench_http import CLIENT_CPU, SERVER_CPU, fixed_reply_server, measure
from bench.bench_policies import FULL_CHAIN, _write_plugin

Call = Callable[[], Awaitable[Any]]

#: Each variant adds one policy of ``FULL_CHAIN`` to the one before.
STEPS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("none", {}),
    ("deadline", {"timeout_ms": FULL_CHAIN["timeout_ms"]}),
    ("retry", {"idempotent": True, "retry": FULL_CHAIN["retry"]}),
    ("breaker", {"breaker": FULL_CHAIN["breaker"]}),
    ("rate_limit", {"rate_limit": FULL_CHAIN["rate_limit"]}),
    ("cache", {"pure": True, "cache": FULL_CHAIN["cache"]}),
)


_YIELDING_PLUGIN = """
import asyncio


class YieldingEcho:
    async def echo(self, text):
        await asyncio.sleep(0)  # once to the event loop, as a call doing I/O would
        return {"text": text, "items": [1, 2]}
"""


def write_plugins(folder: Path) -> None:
    _write_plugin(folder)
    (folder / "bench_yielding_echo.py").write_text(_YIELDING_PLUGIN)


def in_process_targets(folder: str) -> dict[str, dict[str, Any]]:
    """The in-process targets (``write_plugins`` put their plugins in ``folder``)."""
    local = {"provider": "local", "path": folder}
    return {
        "local": {**local, "entrypoint": "bench_in_process_echo:Echo"},
        "yielding": {**local, "entrypoint": "bench_yielding_echo:YieldingEcho"},
    }


def variants() -> dict[str, dict[str, Any]]:
    """Every variant's policies: each step's plus those of the steps before it."""
    policies: dict[str, Any] = {}
    out = {}
    for name, added in STEPS:
        policies = {**policies, **added}
        if name == "cache":
            policies.pop("idempotent")  # pure implies idempotent (FULL_CHAIN spells it so)
        out[name] = policies
    assert out["cache"] == FULL_CHAIN
    return out


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (300 if options.quick else 3000)
    rounds = options.rounds or (1 if options.quick else 7)
    pinned = SERVER_CPU if {SERVER_CPU, CLIENT_CPU} <= available_cpus() else None
    figures: dict[str, float] = {"chain_load_average_1min_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as folder, pinned_to_cpu(CLIENT_CPU):
        write_plugins(Path(folder))
        async with (
            fixed_reply_server(pinned) as url,
            _clients(
                in_process_targets(folder) | {"http": {"provider": "http", "url": url}}
            ) as clients,
        ):
            with collector_time() as collections:
                cpu, collected, faults = await _rounds(clients, calls, rounds, collections)
    figures.update(summarise(cpu))
    for client, values in collected.items():
        figures[f"chain_{_key(client)}_gc_us"] = statistics.median(values)
        figures[f"chain_{_key(client)}_faults_per_call"] = statistics.median(faults[client])
    figures["chain_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


@contextlib.asynccontextmanager
async def _clients(targets: dict[str, Any]) -> AsyncIterator[dict[str, Call]]:
    from dispatcher import Dispatcher, parse_manifest

    plugins = [
        {"id": f"{target}_{name}", "version": "1.0.0", "target": spec, "methods": {"echo": policy}}
        for target, spec in targets.items()
        for name, policy in variants().items()
    ]
    async with Dispatcher(parse_manifest({"plugins": plugins})) as dispatcher:
        numbers = count()
        call_plugin = dispatcher.call

        def caller(plugin: str) -> Call:
            return lambda: call_plugin(plugin, "echo", {"text": f"t{next(numbers)}"})

        yield {plugin["id"]: caller(plugin["id"]) for plugin in plugins}


async def _rounds(
    clients: dict[str, Call], calls: int, rounds: int, collections: list[tuple[int, float]]
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """CPU per call of each client, of it the time in the garbage collector, page faults."""
    for call in clients.values():  # warm: pooled connections, imports, caches
        await measure(call, 500, 64)
    cpu: dict[str, list[float]] = {name: [] for name in clients}
    collected: dict[str, list[float]] = {name: [] for name in clients}
    faults: dict[str, list[float]] = {name: [] for name in clients}
    names = list(clients)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            collections.clear()
            faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu[name].append((await measure(clients[name], calls, 64)).cpu_us_per_call)
            faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted
            faults[name].append(faulted / calls)
            # The first full collection is ``measure``'s own ``gc.collect()``, before its clock.
            automatic = collections[1:] if collections and collections[0][0] == 2 else collections
            collected[name].append(sum(seconds for _, seconds in automatic) / calls * 1e6)
    return cpu, collected, faults


def summarise(cpu: dict[str, list[float]], prefix: str = "chain") -> dict[str, float]:
    figures: dict[str, float] = {}
    for client, values in cpu.items():
        figures[f"{prefix}_{_key(client)}_cpu_us"] = statistics.median(values)
        figures[f"{prefix}_{_key(client)}_min_cpu_us"] = min(values)
    for target in {client.split("_", 1)[0] for client in cpu}:
        before = None
        for name, _ in STEPS:
            median = figures[f"{prefix}_{_key(f'{target}_{name}')}_cpu_us"]
            if before is not None:
                figures[f"{prefix}_{_key(f'{target}_{name}')}_step_us"] = median - before
            before = median
        full = figures[f"{prefix}_{_key(f'{target}_cache')}_cpu_us"]
        none = figures[f"{prefix}_{_key(f'{target}_none')}_cpu_us"]
        figures[f"{prefix}_{target}_c64_chain_added_us"] = full - none
    return figures


def _key(client: str) -> str:
    target, name = client.split("_", 1)
    return f"{target}_c64_{name}"
