"""The Go example plugin as WebAssembly in the dispatcher's process vs as a subprocess over gRPC.

Both are built from sdk/go by its build.sh: ``dist/example-plugin.wasm`` (``provider: wasm``,
the Extism ABI) and ``dist/example-plugin`` (``provider: subprocess``: handshake, Unix
socket, AutoMTLS). Figures:

* ``wasm_cold_start_uncached_ms``   a fresh process: dispatcher start (read, pin check,
  compile, first instance) until the first call answers, with no compile cache;
* ``wasm_cold_start_cached_ms``     the same with ``cache_dir`` already filled;
* ``subprocess_cold_start_ms``      the same for the subprocess plugin (launch, handshake);
* ``wasm_c{1,64}_calls_per_s``, ``wasm_c1_p50_us``: ``echo`` through ``Dispatcher.call``
  (pooled, ``pool_size`` 4);
* ``subprocess_c{1,64}_calls_per_s``, ``subprocess_c1_p50_us``: the same on the subprocess;
* ``subprocess_sandboxed_*``: the same subprocess with ``sandbox: true`` (prlimit, setpriv,
  bubblewrap namespaces, seccomp): what the lockdown costs at start and per call.

Cold starts run in child processes (median of 3), because libextism keeps compiled modules
in memory: a second compile in one process measures that cache, not the compiler.
Runs under ``python -m bench`` or alone: ``python bench/bench_wasm.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "sdk" / "go" / "dist" / "example-plugin.wasm"
NATIVE = ROOT / "sdk" / "go" / "dist" / "example-plugin"
PARAMS = {"id": 12345, "name": "benchmark", "tags": ["a", "b"]}

_COLD_START = """
import asyncio, json, sys, time
from dispatcher import Dispatcher, parse_manifest
async def main():
    manifest = parse_manifest(json.loads(sys.argv[1]))
    started = time.perf_counter()
    async with Dispatcher(manifest) as d:
        await d.call("example", "echo", {"cold": True})
        print((time.perf_counter() - started) * 1000)
asyncio.run(main())
"""


def _manifest_dict(target: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "plugins": [
            {
                "id": "example",
                "version": "1.0.0",
                "target": target,
                "lifecycle": {"init_timeout_ms": 60_000},
                "methods": {"echo": {}},
            }
        ],
    }


def _wasm_target(cache_dir: Path | None) -> dict[str, Any]:
    target = {
        "provider": "wasm",
        "module": str(WASM),
        "sha256": hashlib.sha256(WASM.read_bytes()).hexdigest(),
    }
    if cache_dir is not None:
        target["cache_dir"] = str(cache_dir)
    return target


def _subprocess_target(sandbox: bool = False) -> dict[str, Any]:
    return {"provider": "subprocess", "command": [str(NATIVE)], "sandbox": sandbox}


def _cold_start_ms(target: dict[str, Any], runs: int = 3) -> float:
    samples = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", _COLD_START, json.dumps(_manifest_dict(target))],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        samples.append(float(done.stdout.strip().splitlines()[-1]))
    return statistics.median(samples)


async def _throughput(call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> float:
    for _ in range(min(200, calls)):
        await call()
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls / (time.perf_counter() - started)


async def _p50_us(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


async def _warm(name: str, target: dict[str, Any], calls: int) -> dict[str, float]:
    from dispatcher import Dispatcher, parse_manifest

    figures: dict[str, float] = {}
    async with Dispatcher(parse_manifest(_manifest_dict(target))) as dispatcher:

        def call() -> Awaitable[Any]:
            return dispatcher.call("example", "echo", PARAMS)

        figures[f"{name}_c1_p50_us"] = await _p50_us(call, calls)
        for concurrency in (1, 64):
            figures[f"{name}_c{concurrency}_calls_per_s"] = await _throughput(
                call, calls, concurrency
            )
    return figures


async def run(options: Any = None) -> dict[str, float]:
    for path in (WASM, NATIVE):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run sdk/go/build.sh (make sdks)")
    quick = bool(getattr(options, "quick", False))
    calls = getattr(options, "calls", None) or (300 if quick else 5_000)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-wasm-") as folder:
        cache = Path(folder)
        figures["wasm_cold_start_uncached_ms"] = await asyncio.to_thread(
            _cold_start_ms, _wasm_target(None)
        )
        await asyncio.to_thread(_cold_start_ms, _wasm_target(cache), 1)  # fills the cache
        figures["wasm_cold_start_cached_ms"] = await asyncio.to_thread(
            _cold_start_ms, _wasm_target(cache)
        )
    figures["subprocess_cold_start_ms"] = await asyncio.to_thread(
        _cold_start_ms, _subprocess_target()
    )
    sandboxed = shutil.which("bwrap") is not None
    if sandboxed:
        figures["subprocess_sandboxed_cold_start_ms"] = await asyncio.to_thread(
            _cold_start_ms, _subprocess_target(sandbox=True)
        )
    figures.update(await _warm("wasm", _wasm_target(None), calls))
    figures.update(await _warm("subprocess", _subprocess_target(), calls))
    if sandboxed:
        figures.update(await _warm("subprocess_sandboxed", _subprocess_target(True), calls))
    return figures


if __name__ == "__main__":
    os.chdir(ROOT)
    for key, value in asyncio.run(run()).items():
        print(f"{key:36} {value:12.1f}")
