"""Start-up: load a manifest of 1,000 in-process plugins and start them, time and memory.

* ``startup_1000_local_load_ms``: ``load_manifest`` of a YAML file declaring 1,000
  ``provider: local`` plugins, each with two methods (one with a cache, rate limit and
  breaker, one with none), all from one plugin module. Goal with ``start``: ≤ 200 ms.
* ``startup_1000_local_start_ms``: ``Dispatcher(manifest).start()``: every plugin's
  ``init``/``start``, its routes and policy chains.
* ``startup_1000_local_total_ms``: the two together. Goal ≤ 200. ``..._total_cpu_ms``:
  this process's CPU time for both, the steadier figure on a shared machine.
* ``startup_1000_local_peak_kib``: peak Python memory (tracemalloc) of load + start,
  measured in a second pass (tracemalloc slows what it watches, so not in the timed one);
  ``..._per_plugin_kib`` the same over 1,000.
* ``startup_1000_wide_class_*``: the same 1,000 plugins when their class has 1,001 public
  methods of which the manifest lists two: a local plugin binds only the methods listed.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench._core import Goal, Options

GOALS = {
    "startup_1000_local_total_ms": Goal("<=", 200.0),
    "startup_1000_wide_class_total_ms": Goal("<=", 200.0),
}

PLUGINS = 1000
WIDE_METHODS = 1001


def _plugin_module(methods: int) -> str:
    lines = [
        "class Bench:",
        "    async def echo(self, x):",
        "        return {'x': x}",
        "    def plain(self, x):",
        "        return x",
    ]
    for index in range(methods - 2):
        lines += [f"    def extra_{index}(self, x):", "        return x"]
    return "\n".join(lines) + "\n"


def _manifest(module: str, plugins: int) -> str:
    entries = []
    for index in range(plugins):
        entries.append(
            f"""
  - id: p{index}
    version: 1.0.0
    target: {{provider: local, entrypoint: "{module}:Bench"}}
    methods:
      echo:
        pure: true
        cache: {{ttl_ms: 60000, max_entries: 1000}}
        rate_limit: {{rate: 1000, burst: 100}}
        breaker: {{fail_max: 5, reset_timeout_ms: 1000}}
      plain: {{}}"""
        )
    return "version: 1\nplugins:" + "".join(entries) + "\n"


async def _load_and_start(path: Path) -> tuple[float, float, float]:
    """Wall-clock ms of the load and of the start, and CPU ms of this process for both."""
    from dispatcher import Dispatcher, load_manifest

    cpu_started = time.process_time()
    started = time.perf_counter()
    manifest = load_manifest(path)
    loaded = time.perf_counter()
    dispatcher = Dispatcher(manifest)
    await dispatcher.start()
    ready = time.perf_counter()
    cpu = time.process_time() - cpu_started
    try:
        result = await dispatcher.call("p999", "echo", {"x": 1})
        assert result == {"x": 1}, result
    finally:
        await dispatcher.aclose()
    return (loaded - started) * 1000, (ready - loaded) * 1000, cpu * 1000


async def _peak_kib(path: Path) -> float:
    from dispatcher import Dispatcher, load_manifest

    gc.collect()
    tracemalloc.start()
    try:
        dispatcher = Dispatcher(load_manifest(path))
        await dispatcher.start()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await dispatcher.aclose()
    return peak / 1024


async def _case(folder: Path, name: str, methods: int, rounds: int) -> dict[str, float]:
    module = f"bench_startup_{name}"
    (folder / f"{module}.py").write_text(_plugin_module(methods))
    path = folder / f"{name}.yaml"
    path.write_text(_manifest(module, PLUGINS))
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    await _load_and_start(path)  # warm: imports, the manifest model's first build
    loads, starts, cpus = [], [], []
    for _ in range(rounds):
        gc.collect()
        load_ms, start_ms, cpu_ms = await _load_and_start(path)
        loads.append(load_ms)
        starts.append(start_ms)
        cpus.append(cpu_ms)
    totals = [a + b for a, b in zip(loads, starts, strict=True)]
    peak = await _peak_kib(path)
    prefix = f"startup_{PLUGINS}_{name}"
    return {
        f"{prefix}_load_ms": statistics.median(loads),
        f"{prefix}_start_ms": statistics.median(starts),
        f"{prefix}_total_ms": statistics.median(totals),
        # CPU time of both: steadier than wall-clock time on a machine shared with others.
        f"{prefix}_total_cpu_ms": statistics.median(cpus),
        f"{prefix}_peak_kib": peak,
        f"{prefix}_peak_per_plugin_kib": peak / PLUGINS,
    }


async def run(options: Options) -> dict[str, float]:
    rounds = options.rounds or (1 if options.quick else 5)
    figures: dict[str, float] = {"startup_load_average_1min_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
        figures.update(await _case(Path(folder), "local", 2, rounds))
        figures.update(await _case(Path(folder), "wide_class", WIDE_METHODS, rounds))
    return figures
