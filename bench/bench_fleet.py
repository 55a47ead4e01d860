"""Fleets: what choosing an instance costs, and calls/s through 3 instances against 1.

* ``fleet_pick_least_request_us`` / ``fleet_pick_round_robin_us``: one ``Fleet.pick()``
  over 3 instances in service (the choice itself), timed in a tight loop; median of the
  rounds. Goal ≤ 2 µs.
* ``fleet_pick_1000_all_up_us``, ``fleet_pick_1000_one_down_{least_request,weighted}_us``:
  one ``Fleet.pick()`` over 1,000 instances (the most DNS discovery takes), all in service,
  then with one marked down by its health check; ``fleet_pick_1000_one_down_over_all_up_ratio``
  (least request). Until 2026-12-03 a fleet with any instance out of service found the
  ones in service again on every pick.
* ``fleet_step_added_us``: one call through ``FleetStep`` (pick, in-flight count, outcome
  recorded) minus the same call of a stub provider directly, in-process, no network.
  Goal ≤ 2 µs.
* ``fleet_c64_fixed_3_over_1_ratio``: calls/s of ``Dispatcher.call`` at concurrency 64 to
  a fleet of 3 fixed-reply servers (``bench._fixed_server``, one process each) over calls/s
  to one of them as a plain target. The client is the bottleneck against these servers,
  so this reads what the fleet step costs in throughput (≈ 1.0 means nothing).
* ``fleet_sdk_c64_3_over_1_ratio``: the same against the example plugin behind
  ``dispatcher-plugin serve`` (one process per instance), where the server is the
  bottleneck: what spreading over 3 servers gains. On a 2-core machine the three
  servers share one core (the client has the other), so expect well under 3.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bench._core import Goal, Options, available_cpus, pinned_to_cpu
from bench.bench_http import (
    CLIENT_CPU,
    ROOT,
    SERVER_CPU,
    fixed_reply_server,
    measure,
    sdk_server,
)

GOALS = {
    "fleet_pick_least_request_us": Goal("<=", 2.0),
    "fleet_step_added_us": Goal("<=", 2.0),
}

Call = Callable[[], Awaitable[Any]]


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (300 if options.quick else 3000)
    rounds = options.rounds or (1 if options.quick else 5)
    figures: dict[str, float] = {}
    figures.update(_pick_costs(rounds, 20_000 if options.quick else 200_000))
    figures.update(_degraded_pick_costs(rounds, 2_000 if options.quick else 20_000))
    figures["fleet_step_added_us"] = await _step_added(rounds, 5_000 if options.quick else 50_000)
    pinned = SERVER_CPU if {SERVER_CPU, CLIENT_CPU} <= available_cpus() else None
    with pinned_to_cpu(CLIENT_CPU):
        figures.update(await _three_over_one("fixed", fixed_reply_server, pinned, calls, rounds))
        sdk_calls = max(100, calls // 3)
        figures.update(await _three_over_one("sdk", sdk_server, pinned, sdk_calls, rounds))
    return figures


def _fleet(balance: str) -> Any:
    from dispatcher.fleet import Fleet
    from providers.http import HttpProvider, HttpTarget

    target = HttpTarget.model_validate(
        {
            "provider": "http",
            "instances": [{"url": f"http://127.0.0.{n}:8080"} for n in (2, 3, 4)],
            "balance": balance,
        }
    )
    return Fleet(target, target.instance_targets(), HttpProvider(), time.monotonic)


def _per_pick_us(pick: Callable[[], Any], rounds: int, picks: int) -> float:
    """Median over ``rounds`` of the µs one ``pick()`` takes in a loop of ``picks``."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(picks):
            pick()
        samples.append((time.perf_counter_ns() - started) / picks / 1000)
    return statistics.median(samples)


def _pick_costs(rounds: int, picks: int) -> dict[str, float]:
    return {
        f"fleet_pick_{balance}_us": _per_pick_us(_fleet(balance).pick, rounds, picks)
        for balance in ("least_request", "round_robin")
    }


def _degraded_pick_costs(rounds: int, picks: int) -> dict[str, float]:
    from dispatcher.fleet import Fleet
    from providers.http import HttpProvider, HttpTarget

    figures = {}
    for balance in ("least_request", "weighted"):
        target = HttpTarget.model_validate(
            {
                "provider": "http",
                "instances": [{"url": f"http://127.0.0.2:{8000 + n}"} for n in range(1000)],
                "balance": balance,
            }
        )
        fleet = Fleet(target, target.instance_targets(), HttpProvider(), time.monotonic)
        if balance == "least_request":
            figures["fleet_pick_1000_all_up_us"] = _per_pick_us(fleet.pick, rounds, picks)
        fleet.record_probe(fleet.instances[500], False, 1, 1)
        figures[f"fleet_pick_1000_one_down_{balance}_us"] = _per_pick_us(fleet.pick, rounds, picks)
    figures["fleet_pick_1000_one_down_over_all_up_ratio"] = (
        figures["fleet_pick_1000_one_down_least_request_us"] / figures["fleet_pick_1000_all_up_us"]
    )
    return figures


async def _step_added(rounds: int, calls: int) -> float:
    from dispatcher.fleet import FleetStep
    from providers.invocation import Invocation

    fleet = _fleet("least_request")

    async def stub(target: Any, invocation: Invocation) -> Any:
        return None

    step = FleetStep(fleet, stub)
    invocation = Invocation("bench", "1.0.0", "echo", {}, time.monotonic() + 60, "r")
    target = fleet.instances[0].target
    added = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(calls):
            await stub(target, invocation)
        direct = time.perf_counter_ns() - started
        started = time.perf_counter_ns()
        for _ in range(calls):
            await step(invocation)
        through = time.perf_counter_ns() - started
        added.append((through - direct) / calls / 1000)
    return statistics.median(added)


async def _three_over_one(
    name: str,
    server: Callable[[int | None], contextlib.AbstractAsyncContextManager[str]],
    cpu: int | None,
    calls: int,
    rounds: int,
) -> dict[str, float]:
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(server(cpu)) for _ in range(3)]
        one = await stack.enter_async_context(dispatcher_call({"url": urls[0]}))
        three = await stack.enter_async_context(
            dispatcher_call({"instances": [{"url": url} for url in urls]})
        )
        for call in (one, three):  # warm: open the pooled connections
            await measure(call, min(calls, 500), 64)
        ones, threes = [], []
        for index in range(rounds):
            order = [(one, ones), (three, threes)]
            for call, samples in order[index % 2 :] + order[: index % 2]:
                samples.append(await measure(call, calls, 64))
    return {
        f"fleet_{name}_c64_1_instance_calls_per_s": statistics.median(s.calls_per_s for s in ones),
        f"fleet_{name}_c64_3_instances_calls_per_s": statistics.median(
            s.calls_per_s for s in threes
        ),
        f"fleet_{name}_c64_3_over_1_ratio": statistics.median(
            t.calls_per_s / o.calls_per_s for t, o in zip(threes, ones, strict=True)
        ),
        f"fleet_{name}_c64_3_over_1_cpu_ratio": statistics.median(
            t.cpu_us_per_call / o.cpu_us_per_call for t, o in zip(threes, ones, strict=True)
        ),
    }


@contextlib.asynccontextmanager
async def dispatcher_call(target: dict[str, Any]) -> AsyncIterator[Call]:
    from dispatcher import Dispatcher, parse_manifest

    manifest = parse_manifest(
        {
            "plugins": [
                {
                    "id": "bench",
                    "version": "1.0.0",
                    "target": {"provider": "http", **target},
                    "methods": {"say": {"timeout_ms": 10_000}},
                }
            ]
        },
        base_dir=ROOT,
    )
    async with Dispatcher(manifest) as dispatcher:
        call_plugin = dispatcher.call
        params = {"text": "hi"}

        def call() -> Awaitable[Any]:
            return call_plugin("bench", "say", params)

        yield call
