"""Telemetry on the hot path: what metrics and tracing add to one ``Dispatcher.call``.

**The step alone** (in-process, the figures to compare across runs): a route's chain
ending in a stub provider that returns at once, with and without the telemetry the
dispatcher would put around it (``CallStep`` outside, the provider boundary inside);
median over rounds of the difference per call, 100,000 calls per round:

* ``telemetry_step_metrics_us``: ``metrics.enabled``.
* ``telemetry_step_unsampled_us``: metrics on and tracing configured, the call not
  sampled (``sample_ratio: 0``, no caller trace). Goal ≤ 3 µs.
* ``telemetry_step_sampled_us``: metrics on and the call traced: a call span and an
  attempt span, ended into the SDK's ``BatchSpanProcessor`` with its OTLP/HTTP exporter
  sending to a local fixed-reply server in its own process; each round ends with a
  ``force_flush`` inside its time, so the export thread's work (it shares the
  interpreter) is counted, and never spills into another round.
* ``telemetry_step_sampled_unexported_us``: the same spans with no exporter (``enabled:
  true`` and no endpoint): what making the spans costs, apart from encoding and sending.

Every figure is **CPU time of this process** (``time.process_time``: all its threads, the
exporter's included) per call, not wall time: on a two-core machine other processes
would otherwise move the figures by more than what they measure.

**Through ``Dispatcher.call``** (end to end, noisier: the plugin's own work is in it):
dispatchers over the same in-process plugin (the example's ``say``, ``provider:
local``), called one call at a time, in rounds that rotate their order; each figure is the
median over rounds of (µs per call with it - µs per call without telemetry): over the same in-process plugin (the example's ``say``, ``provider:
local``), called one call at a time, in rounds that rotate their order; each figure is the
median over rounds of (µs per call with it - µs per call without telemetry):

* telemetry off adds nothing by construction: without a ``telemetry:`` section the
  route's chain is the one it was (no step, no wrapper, not even a branch; the test
  ``test_without_telemetry_the_chain_is_unchanged…`` checks it).
  ``telemetry_off_aa_control_us``: two dispatchers without telemetry, one minus the
  other: the resolution of the figures below (the baseline is their mean).
* ``telemetry_metrics_added_us``: ``metrics.enabled`` — the counter and the histogram of
  the call, and the log context.
* ``telemetry_unsampled_added_us``: metrics on and tracing configured (an OTLP endpoint)
  but this call not sampled (``sample_ratio: 0``, no caller trace). Goal ≤ 3 µs.
* ``telemetry_sampled_added_us``: metrics on and every call traced (``sample_ratio: 1``):
  a call span and an attempt span through the SDK's ``BatchSpanProcessor`` and OTLP/HTTP
  exporter, sending to a local fixed-reply server in its own process (the export
  thread's work is included: each round ends with a ``force_flush`` inside its time, so
  the spans it made are sent before the next dispatcher's round starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from bench._core import Goal, Options, example_plugin
from bench.bench_http import ROOT, fixed_reply_server

GOALS = {
    "telemetry_step_unsampled_us": Goal("<=", 3.0),
    "telemetry_unsampled_added_us": Goal("<=", 3.0),
}

PLUGIN = example_plugin({"say": {}})


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (2_000 if options.quick else 20_000)
    rounds = options.rounds or (1 if options.quick else 7)
    async with fixed_reply_server(None) as collector:
        endpoint = f"{collector}/v1/traces"
        figures = await _steps(endpoint, rounds, 10_000 if options.quick else 100_000)
        figures.update(await _through_dispatcher(endpoint, rounds, calls))
    return figures


async def _steps(endpoint: str, rounds: int, calls: int) -> dict[str, float]:
    from dispatcher.config import Telemetry
    from dispatcher.telemetry import TelemetryRuntime
    from providers.http import HttpTarget
    from providers.invocation import Invocation

    target = HttpTarget.model_validate({"provider": "http", "url": "http://127.0.0.1:9"})

    async def provider_invoke(target: Any, invocation: Invocation) -> Any:
        return None

    def chain(runtime: TelemetryRuntime | None) -> tuple[Any, Any]:
        invoke = provider_invoke if runtime is None else runtime.invoke(provider_invoke)

        def call_target(invocation: Invocation) -> Any:
            return invoke(target, invocation)

        if runtime is None:
            return call_target, None
        step = runtime.around_call("bench", "1.0.0", "say", "http", False, call_target)
        return step, runtime.tracing

    def runtime(telemetry: dict[str, Any]) -> TelemetryRuntime:
        return TelemetryRuntime(Telemetry.model_validate(telemetry), dict)

    tracing = {"otlp_endpoint": endpoint}
    runtimes = {
        "none": None,
        "metrics": runtime({"metrics": {"enabled": True}}),
        "unsampled": runtime(
            {"metrics": {"enabled": True}, "tracing": {**tracing, "sample_ratio": 0.0}}
        ),
        "sampled_unexported": runtime(
            {"metrics": {"enabled": True}, "tracing": {"enabled": True, "sample_ratio": 1.0}}
        ),
        "sampled": runtime(
            {"metrics": {"enabled": True}, "tracing": {**tracing, "sample_ratio": 1.0}}
        ),
    }
    chains = {name: chain(each) for name, each in runtimes.items()}
    invocation = Invocation("bench", "1.0.0", "say", {}, time.monotonic() + 3600, "r")
    samples: dict[str, list[float]] = {name: [] for name in chains}
    try:
        for index in range(rounds + 1):  # the first round warms up and is dropped
            names = list(chains)
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                step, tracer = chains[name]
                started = time.process_time_ns()
                for _ in range(calls):
                    await step(invocation)
                if tracer is not None:
                    await asyncio.to_thread(tracer.provider.force_flush)
                if index:
                    samples[name].append((time.process_time_ns() - started) / calls / 1000)
    finally:
        for each in runtimes.values():
            if each is not None:
                await each.aclose()
    base = samples["none"]
    return {
        f"telemetry_step_{name}_us": statistics.median(
            a - b for a, b in zip(samples[name], base, strict=True)
        )
        for name in ("metrics", "unsampled", "sampled_unexported", "sampled")
    }


async def _through_dispatcher(endpoint: str, rounds: int, calls: int) -> dict[str, float]:
    configurations = {
        "off": None,
        "off_again": None,
        "metrics": {"metrics": {"enabled": True}},
        "unsampled": {
            "metrics": {"enabled": True},
            "tracing": {"otlp_endpoint": endpoint, "sample_ratio": 0.0},
        },
        "sampled": {
            "metrics": {"enabled": True},
            "tracing": {"otlp_endpoint": endpoint, "sample_ratio": 1.0},
        },
    }
    async with contextlib.AsyncExitStack() as stack:
        dispatchers = {
            name: await stack.enter_async_context(_dispatcher(telemetry))
            for name, telemetry in configurations.items()
        }
        for dispatcher in dispatchers.values():  # warm: imports, caches, label children
            await _per_call_us(dispatcher, min(calls, 2_000))
        samples: dict[str, list[float]] = {name: [] for name in dispatchers}
        names = list(dispatchers)
        for index in range(rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(await _per_call_us(dispatchers[name], calls))
    # Two dispatchers without telemetry differ by up to a few µs per call here (where each
    # one's objects lie in memory): the baseline is their mean, their difference the
    # resolution of these figures (the A/A control).
    base = [(a + b) / 2 for a, b in zip(samples["off"], samples["off_again"], strict=True)]

    def added(name: str) -> float:
        return statistics.median(a - b for a, b in zip(samples[name], base, strict=True))

    return {
        "telemetry_call_us_without": statistics.median(base),
        "telemetry_off_aa_control_us": statistics.median(
            a - b for a, b in zip(samples["off_again"], samples["off"], strict=True)
        ),
        "telemetry_metrics_added_us": added("metrics"),
        "telemetry_unsampled_added_us": added("unsampled"),
        "telemetry_sampled_added_us": added("sampled"),
    }


@contextlib.asynccontextmanager
async def _dispatcher(telemetry: dict[str, Any] | None) -> AsyncIterator[Any]:
    from dispatcher import Dispatcher, parse_manifest

    document: dict[str, Any] = {"version": 1, "plugins": [PLUGIN]}
    if telemetry is not None:
        document["telemetry"] = telemetry
    async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
        yield dispatcher


async def _per_call_us(dispatcher: Any, calls: int) -> float:
    call = dispatcher.call
    params = {"text": "hi"}
    tracing = dispatcher.telemetry.tracing if dispatcher.telemetry is not None else None
    started = time.process_time_ns()
    for index in range(calls):
        await call("echo", "say", params)
        if not index % 64:
            # The loop turns, as it does between a real host's requests: an in-process call
            # that never waits never lets it, and the deadline timers each call cancels then
            # pile up in its heap (with the contexts they hold), for the collector to walk.
            await asyncio.sleep(0)
    if tracing is not None:
        # The exporter's thread sends this round's spans now, inside this round's time:
        # left running, it would take the interpreter from the next dispatcher's round.
        await asyncio.to_thread(tracing.provider.force_flush)
    return (time.process_time_ns() - started) / calls / 1000
