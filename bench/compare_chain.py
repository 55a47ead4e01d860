"""Before/after of the policy chain's CPU per call, both versions in one process, interleaved.

    python -m bench.compare_chain /path/to/before-checkout [--rounds 9] [--calls 3000]

Separate processes differ from each other by more than the few µs compared here (memory
layout, the machine's other tenants at that moment), so both versions run in this one:
the step modules of the other checkout (``dispatcher/policies/{cache,ratelimit,retry}.py``)
are loaded under names of their own, and a second ``Dispatcher`` builds its chains from
them (and from a closure ending the chain, as before the ``partial``). Everything else
(``Dispatcher.call``, providers, the breaker) is this checkout's, shared by both. Then the
variants of ``bench chain`` (each policy joining the chain in turn, in-process and over
HTTP) of both versions are measured in interleaved rounds; figures as ``bench chain``'s,
under ``chain_before_*`` and ``chain_after_*``, merged into ``bench/results.json``
(``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from itertools import count
from pathlib import Path
from types import ModuleType
from typing import Any

from bench._core import RESULTS_PATH, available_cpus, merge_results, pinned_to_cpu
from bench.bench_chain import in_process_targets, summarise, variants, write_plugins
from bench.bench_http import CLIENT_CPU, SERVER_CPU, fixed_reply_server, measure

Call = Callable[[], Awaitable[Any]]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def before_steps(checkout: Path) -> dict[str, Any]:
    """What ``PolicyRuntime.chain`` builds with, taken from ``checkout``."""
    folder = checkout / "dispatcher" / "policies"
    cache = _load(folder / "cache.py", "_before_policies_cache")
    limits = _load(folder / "ratelimit.py", "_before_policies_ratelimit")
    retry = _load(folder / "retry.py", "_before_policies_retry")

    def closure(invoke: Callable[..., Any], target: Any) -> Callable[[Any], Any]:
        def call_target(invocation: Any) -> Any:
            return invoke(target, invocation)

        return call_target

    return {
        "ResultCache": cache.ResultCache,
        "CacheStep": cache.CacheStep,
        "Limit": limits.Limit,
        "RateLimitStep": limits.RateLimitStep,
        "new_limiter": limits.new_limiter,
        "RetryBudget": retry.RetryBudget,
        "RetryStep": retry.RetryStep,
        "partial": closure,
    }


@contextlib.contextmanager
def patched(names: dict[str, Any]) -> Iterator[None]:
    # Where PolicyRuntime.chain looks its step classes up (dispatcher/policies/__init__.py
    # before the runtime had a module of its own: older checkouts' chains looked there).
    import dispatcher.policies.runtime as policies

    saved = {name: getattr(policies, name) for name in names}
    for name, value in names.items():
        setattr(policies, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(policies, name, value)


@contextlib.asynccontextmanager
async def both(
    targets: dict[str, Any], before: dict[str, Any]
) -> AsyncIterator[dict[str, dict[str, Call]]]:
    from dispatcher import Dispatcher, parse_manifest

    plugins = [
        {"id": f"{target}_{name}", "version": "1.0.0", "target": spec, "methods": {"echo": policy}}
        for target, spec in targets.items()
        for name, policy in variants().items()
    ]
    numbers = count()
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, dict[str, Call]] = {}
        for version in ("before", "after"):
            manifest = parse_manifest({"plugins": plugins})
            with patched(before) if version == "before" else contextlib.nullcontext():
                dispatcher = await stack.enter_async_context(Dispatcher(manifest))
            chain = dispatcher._routes.find("local_cache", "echo", None, "running").invoke
            assert chain.__class__.__module__.startswith("_before_") == (version == "before")
            call_plugin = dispatcher.call

            def caller(plugin: str, call_plugin: Any = call_plugin) -> Call:
                return lambda: call_plugin(plugin, "echo", {"text": f"t{next(numbers)}"})

            clients[version] = {plugin["id"]: caller(plugin["id"]) for plugin in plugins}
        yield clients


async def compare(checkout: Path, rounds: int, calls: int) -> dict[str, float]:
    before = before_steps(checkout)
    pinned = SERVER_CPU if {SERVER_CPU, CLIENT_CPU} <= available_cpus() else None
    figures: dict[str, float] = {"chain_compare_load_average_1min_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="compare-chain-") as folder, pinned_to_cpu(CLIENT_CPU):
        write_plugins(Path(folder))
        async with fixed_reply_server(pinned) as url:
            targets = in_process_targets(folder) | {"http": {"provider": "http", "url": url}}
            async with both(targets, before) as clients:
                flat = {
                    (version, name): call
                    for version, calls_of in clients.items()
                    for name, call in calls_of.items()
                }
                for call in flat.values():  # warm: pooled connections, imports, caches
                    await measure(call, 500, 64)
                cpu: dict[tuple[str, str], list[float]] = {key: [] for key in flat}
                keys = list(flat)
                for index in range(rounds):
                    shift = (index * 5) % len(keys)
                    for key in keys[shift:] + keys[:shift]:
                        sample = await measure(flat[key], calls, 64)
                        cpu[key].append(sample.cpu_us_per_call)
                    print(f"round {index + 1}/{rounds}", file=sys.stderr)
    for version in ("before", "after"):
        of_version = {name: values for (v, name), values in cpu.items() if v == version}
        figures.update(summarise(of_version, prefix=f"chain_{version}"))
    for target in ("local", "yielding", "http"):
        # Paired by round: both versions' full chains measured in the same round.
        full = f"{target}_cache"
        saved = [b - a for b, a in zip(cpu["before", full], cpu["after", full], strict=True)]
        figures[f"chain_{target}_c64_full_chain_cpu_saved_us"] = statistics.median(saved)
    figures["chain_compare_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare_chain")
    parser.add_argument("before", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--no-write", action="store_true")
    arguments = parser.parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        figures = runner.run(compare(arguments.before.resolve(), arguments.rounds, arguments.calls))
    for name in sorted(figures):
        print(f"{name:<55} {figures[name]:10.2f}")
    if not arguments.no_write:
        merge_results(figures, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
