"""Docker targets: cold start, and warm calls against the same plugin over plain HTTP.

The example plugin (``examples/python/echo_plugin.py``) runs twice, called through
``Dispatcher.call("...", "say", {"text": "hi"})``:

  container  a sandboxed container of the image ``dispatcher deploy`` builds on the offline
           base image, one container (max_instances 1, 1 CPU), spoken to over its Unix socket
  plain_http ``dispatcher-plugin serve`` in a plain child process on a loopback TCP port

Figures (``docker_`` prefix, unit last):

  cold_start_ms            first call of a fresh dispatcher: create, start, wait for
                           /health, then the call (median of ``rounds`` dispatchers)
  cold_start_max_ms        the slowest of them
  container_c1_p50_us, plain_http_c1_p50_us        warm call latency, one call at a time
  container_c1_calls_per_s, plain_http_c1_calls_per_s
  container_c32_calls_per_s, plain_http_c32_calls_per_s
  c32_ratio_to_http        container calls/s over plain HTTP calls/s at concurrency 32

Run alone with ``python -m bench.docker_bench``, or from the bench harness, which calls
``run(options)`` (``options.quick``, ``options.calls`` and ``options.rounds`` are read
when present). It needs the Docker engine, started by ``scripts/start-docker.sh``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from dispatcher import Dispatcher, parse_manifest
from providers.docker import DockerProvider

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "linchkit-bench/echo:1"
PARAMS = {"text": "hi"}


def _manifest(http_url: str | None = None, **docker_target: Any) -> Any:
    plugins: list[dict[str, Any]] = [
        {
            "id": "echo-docker",
            "version": "1.0.0",
            "config": {"greeting": "bench"},
            "target": {
                "provider": "docker",
                "image": IMAGE,
                "max_instances": 1,
                "build": {"context": "examples/python", "entrypoint": "echo_plugin:EchoPlugin"},
                **docker_target,
            },
            "methods": {"say": {}},
        }
    ]
    if http_url is not None:
        plugins.append(
            {
                "id": "echo-http",
                "version": "1.0.0",
                "target": {"provider": "http", "url": http_url},
                "methods": {"say": {}},
            }
        )
    return parse_manifest({"version": 1, "plugins": plugins}, base_dir=ROOT)


async def run(options: Any = None) -> dict[str, float]:
    quick = bool(getattr(options, "quick", False))
    calls = getattr(options, "calls", None) or (200 if quick else 3000)
    rounds = getattr(options, "rounds", None) or (1 if quick else 5)
    await _prepare()
    figures: dict[str, float] = {}
    cold = [await _cold_start_ms() for _ in range(rounds)]
    figures["docker_cold_start_ms"] = statistics.median(cold)
    figures["docker_cold_start_max_ms"] = max(cold)
    async with _http_function() as url, Dispatcher(_manifest(url)) as dispatcher:
        for name, plugin in (("container", "echo-docker"), ("plain_http", "echo-http")):

            def call(plugin: str = plugin) -> Awaitable[Any]:
                return dispatcher.call(plugin, "say", PARAMS)

            await _measure(call, 200, 32)  # warm up: open connections
            p50_us, per_s = await _measure(call, calls, 1)
            figures[f"docker_{name}_c1_p50_us"] = p50_us
            figures[f"docker_{name}_c1_calls_per_s"] = per_s
            figures[f"docker_{name}_c32_calls_per_s"] = (await _measure(call, calls, 32))[1]
    figures["docker_c32_ratio_to_http"] = (
        figures["docker_container_c32_calls_per_s"] / figures["docker_plain_http_c32_calls_per_s"]
    )
    return figures


async def _prepare() -> None:
    """The engine, the base image, the plugin image: each idempotent."""
    await asyncio.to_thread(_engine_and_base_image)
    plugin = _manifest().plugins[0]
    async with DockerProvider() as provider:
        await provider.deployer().apply(plugin, plugin.target)


def _engine_and_base_image() -> None:
    subprocess.run([str(ROOT / "scripts" / "start-docker.sh")], check=True)
    subprocess.run(
        [str(ROOT / "infra" / "docker" / "build-base-image.sh")],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        stdout=subprocess.DEVNULL,
    )


async def _cold_start_ms() -> float:
    async with Dispatcher(_manifest()) as dispatcher:
        started = time.perf_counter()
        await dispatcher.call("echo-docker", "say", PARAMS)
        return (time.perf_counter() - started) * 1000


async def _measure(
    call: Callable[[], Awaitable[Any]], calls: int, concurrency: int
) -> tuple[float, float]:
    """(p50 latency in µs, calls/s) of ``calls`` calls made ``concurrency`` at a time."""
    latencies: list[int] = []
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter_ns()
            await call()
            latencies.append(time.perf_counter_ns() - started)

    gc.collect()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return statistics.median(latencies) / 1000, calls / elapsed


@contextlib.asynccontextmanager
async def _http_function() -> AsyncIterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        str(Path(sys.executable).with_name("dispatcher-plugin")),
        "serve",
        "echo_plugin:EchoPlugin",
        "--path",
        str(ROOT / "examples" / "python"),
        "--port",
        str(port),
    ]
    server = await asyncio.create_subprocess_exec(*command)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{url}/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the HTTP function did not start")
        yield url
    finally:
        server.terminate()
        await server.wait()


if __name__ == "__main__":
    quick = "--quick" in sys.argv

    class _Options:
        pass

    options = _Options()
    options.quick = quick  # type: ignore[attr-defined]
    for name, value in asyncio.run(run(options)).items():
        print(f"{name:<36} {value:>12.1f}")
