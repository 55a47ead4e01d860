"""State backends: the cost per call of the Redis-backed chain against the in-memory one.

Same run, same target: the example plugin in-process (``provider: local``), so what is
measured is the chain and nothing of a network target. Two methods with the same
policies (a rate limit, a circuit breaker, a cache) on two dispatchers, one keeping its
state in memory and one on a real ``redis-server`` started here (loopback, no
persistence), measured in interleaved rounds, medians reported:

* ``state_{memory,redis}_chain_c1_us``: one call at a time, every call a cache miss
  (distinct params): limiter + breaker + cache read and write. On Redis that is three
  round trips (limit, cache read, cache write; the breaker's view of a closed circuit is
  trusted for ``breaker_sync_ms``).
* ``state_redis_added_us``: the difference, what sharing costs per call.
* ``state_{memory,redis}_hit_c1_us``: a cache hit (on Redis, one round trip).
* ``state_{memory,redis}_chain_c64_calls_per_s``: 64 calls in flight.
* ``state_fleet_breaker_{memory,redis}_us``: one call through a ``FleetStep`` over three
  instances, each guarded by its breaker, to a stub provider (no network): the local
  breakers against the shared ones on Redis, steady state (closed circuits, so a replica
  reads Redis once per ``breaker_sync_ms`` per instance, not per call);
  ``state_fleet_breaker_redis_over_memory_ratio`` the ratio.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from itertools import count
from typing import Any

from bench._core import ROOT, Goal, Options, example_plugin
from dispatcher import Dispatcher
from dispatcher.config import parse_manifest

GOALS = {
    # Three loopback round trips through redis-py's asyncio client: a budget, not a floor.
    "state_redis_added_us": Goal("<=", 1000.0),
}

POLICIES = {
    "pure": True,
    "timeout_ms": 5000,
    "cache": {"ttl_ms": 60_000, "max_entries": 1_000_000},
    "rate_limit": {"rate": 1_000_000, "burst": 100_000, "mode": "wait"},
    "breaker": {"fail_max": 5, "reset_timeout_ms": 1000},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _manifest(state: dict[str, Any]) -> Any:
    return parse_manifest(
        {
            "version": 1,
            "state": state,
            "plugins": [example_plugin({"say": POLICIES})],
        },
        base_dir=ROOT,
    )


async def _per_call_us(dispatcher: Dispatcher, calls: int, texts: Any) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await dispatcher.call("echo", "say", {"text": next(texts)})
    return (time.perf_counter() - started) / calls * 1e6


async def _calls_per_s(dispatcher: Dispatcher, calls: int, texts: Any) -> float:
    queue = iter(range(calls))

    async def worker() -> None:
        for _ in queue:
            await dispatcher.call("echo", "say", {"text": next(texts)})

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(64)))
    return calls / (time.perf_counter() - started)


async def run(options: Options) -> dict[str, float]:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed: run `make services-prereqs`")
    calls = options.calls or (300 if options.quick else 3000)
    rounds = options.rounds or (1 if options.quick else 5)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as folder:
        process = await asyncio.create_subprocess_exec(
            server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", folder,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await asyncio.sleep(0.3)
            url = f"redis://127.0.0.1:{port}/0"
            memory = Dispatcher(_manifest({"backend": "memory"}))
            shared = Dispatcher(_manifest({"backend": "redis", "url": url, "op_timeout_ms": 2000}))
            async with memory, shared:
                figures = await _measure(memory, shared, calls, rounds)
            figures.update(await _fleet_breakers(url, rounds, calls * 10))
            return figures
        finally:
            process.kill()
            await process.wait()


async def _measure(
    memory: Dispatcher, shared: Dispatcher, calls: int, rounds: int
) -> dict[str, float]:
    texts = (f"t{i}" for i in count())
    samples: dict[str, list[float]] = {}
    for dispatcher in (memory, shared):  # warm both: imports, scripts loaded, pools open
        await _per_call_us(dispatcher, 200, texts)
    for _ in range(rounds):
        for label, dispatcher in (("memory", memory), ("redis", shared)):
            samples.setdefault(f"state_{label}_chain_c1_us", []).append(
                await _per_call_us(dispatcher, calls, texts)
            )
            hits = iter(lambda: "same", None)
            await dispatcher.call("echo", "say", {"text": "same"})
            samples.setdefault(f"state_{label}_hit_c1_us", []).append(
                await _per_call_us(dispatcher, calls, hits)
            )
            samples.setdefault(f"state_{label}_chain_c64_calls_per_s", []).append(
                await _calls_per_s(dispatcher, calls, texts)
            )
    figures = {name: statistics.median(values) for name, values in samples.items()}
    figures["state_redis_added_us"] = (
        figures["state_redis_chain_c1_us"] - figures["state_memory_chain_c1_us"]
    )
    assert shared.stats()["state"]["fallbacks"] == 0, "Redis must have answered every call"
    return figures


async def _fleet_breakers(url: str, rounds: int, calls: int) -> dict[str, float]:
    from dispatcher.config import BreakerPolicy, StateConfig
    from dispatcher.fleet import CircuitBreaker, Fleet, FleetStep, Instance
    from dispatcher.fleet.shared_breaker import SharedBreaker
    from dispatcher.state import new_backend
    from providers.http import HttpProvider, HttpTarget
    from providers.invocation import Invocation

    clock = asyncio.get_running_loop().time
    policy = BreakerPolicy(fail_max=5, reset_timeout_ms=1000)
    target = HttpTarget.model_validate(
        {"provider": "http", "instances": [{"url": f"http://127.0.0.{n}:8080"} for n in (2, 3, 4)]}
    )

    def local(instance: Instance) -> CircuitBreaker:
        return CircuitBreaker(
            instance.target.describe(), fail_max=5, reset_timeout=1.0, clock=clock
        )

    async def stub(target: Any, invocation: Invocation) -> Any:
        return None

    backend = new_backend(StateConfig(backend="redis", url=url, op_timeout_ms=2000), clock)
    async with backend:

        def shared(instance: Instance) -> SharedBreaker:
            return SharedBreaker(local(instance), instance.key, policy, backend, 0.1, clock)

        steps = {
            "memory": FleetStep(
                Fleet(target, target.instance_targets(), HttpProvider(), clock), stub, local
            ),
            "redis": FleetStep(
                Fleet(target, target.instance_targets(), HttpProvider(), clock), stub, local, shared
            ),
        }
        invocation = Invocation("bench", "1.0.0", "echo", {}, clock() + 600, "r")
        samples: dict[str, list[float]] = {}
        for step in steps.values():  # warm: every instance's view read once
            for _ in range(100):
                await step(invocation)
        for _ in range(rounds):
            for label, step in steps.items():
                started = time.perf_counter()
                for _ in range(calls):
                    await step(invocation)
                per_call = (time.perf_counter() - started) / calls * 1e6
                samples.setdefault(f"state_fleet_breaker_{label}_us", []).append(per_call)
        assert backend.stats()["fallbacks"] == 0, "Redis must have answered every admit"
    figures = {name: statistics.median(values) for name, values in samples.items()}
    figures["state_fleet_breaker_redis_over_memory_ratio"] = (
        figures["state_fleet_breaker_redis_us"] / figures["state_fleet_breaker_memory_us"]
    )
    return figures
