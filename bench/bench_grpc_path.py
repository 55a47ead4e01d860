"""Where a gRPC call's client CPU goes, layer by layer, from a raw ``grpc.aio`` stub to
``Dispatcher.call`` (ablation against the Go example plugin, as ``bench_grpc``).

Every variant runs in this one process against the same server, interleaved round by
round (the order rotating), and is read as this process's CPU time per call
(``time.process_time``: every thread, grpc's poller included) at concurrency 64, the
median of the rounds; wall-clock rates move by ±30 % on a shared machine, CPU per call
far less. Each variant adds one thing to the one before it:

* ``raw``:           a stub on a channel of its own, a constant ``CallRequest``, ``timeout=30``;
* ``raw_no_retries``: the same stub call on a channel without grpc's retry filter
  (``grpc.enable_retries`` 0): what the filter behind transparent retries costs every
  call, raw and dispatcher alike (a side branch: the dispatcher keeps the filter;
  docs/architecture.md, gRPC);
* ``raw_channel``:   the same stub call on the dispatcher's own channel (its options);
* ``raw_constant_header``: + ``x-request-id`` as grpc.aio ``Metadata``, one value for every call;
* ``raw_header``:    the header with a new value on every call, as every dispatched call sends it;
* ``raw_deadline``:  + ``timeout=`` the seconds left of a per-call deadline (a float);
* ``raw_request``:   + the request built as the dispatcher builds it (dict context, a
  request id, ``encode_json`` of the params) and the reply decoded (``loads``);
* ``connection``:    ``PluginConnection.call`` with an ``Invocation`` built per call;
* ``provider``:      ``GrpcProvider.invoke``;
* ``route``:         the route's chain, the dispatcher building the ``Invocation``;
* ``call``:          ``Dispatcher.call``.

Figures ``grpc_path_c64_<variant>_cpu_us``, ``grpc_path_c64_<variant>_gc_us`` (CPU in the
garbage collector per call, from ``gc.callbacks``), ``grpc_path_c64_<variant>_page_faults``
(minor page faults per call, ``getrusage``), and ``grpc_path_c1_<variant>_p50_us``
(one call at a time, the variants in a new random order every round).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench._core import Options
from bench.bench_grpc import _client_pinned, _manifest, _plugin_executable, _service

Call = Callable[[], Awaitable[Any]]
PARAMS = {"id": 12345, "name": "benchmark", "tags": ["a", "b"]}


class _GcClock:
    """CPU time spent in the garbage collector, summed from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.total += time.process_time() - self._started


async def _cpu_per_call(
    call: Call, calls: int, concurrency: int, gc_clock: _GcClock
) -> tuple[float, float, float]:
    """(CPU µs per call, of which in the garbage collector, page faults per call)."""
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    gc.collect()
    in_gc = gc_clock.total
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu = time.process_time() - started
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return cpu / calls * 1e6, (gc_clock.total - in_gc) / calls * 1e6, faults / calls


def _variants(dispatcher: Any, address: str) -> dict[str, Call]:
    import grpc.aio

    from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
    from linchkit_plugin.wire import encode_json
    from providers._grpc.replies import loads
    from providers.invocation import Invocation, new_request_id

    loop = asyncio.get_running_loop()
    spec = next(spec for spec in dispatcher.manifest.plugins if spec.id == "example")
    target = spec.target_of("echo")
    provider = dispatcher._providers[target.provider]
    connection = provider._connections[target.key]
    route = dispatcher._routes.find("example", "echo", None, "running")
    build = dispatcher._invocation
    own_stub = plugin_pb2_grpc.PluginServiceStub(grpc.aio.insecure_channel(address))
    no_retries_stub = plugin_pb2_grpc.PluginServiceStub(
        grpc.aio.insecure_channel(address, options=[("grpc.enable_retries", 0)])
    )
    stub = connection._stub
    Metadata = grpc.aio.Metadata

    def constant_request() -> Any:
        return plugin_pb2.CallRequest(
            v=1,
            plugin="example",
            method="echo",
            params_json=encode_json(PARAMS),
            context=plugin_pb2.CallContext(request_id="r", deadline_ms=30_000),
        )

    def raw() -> Awaitable[Any]:
        return own_stub.Call(constant_request(), timeout=30)

    def raw_no_retries() -> Awaitable[Any]:
        return no_retries_stub.Call(constant_request(), timeout=30)

    def raw_channel() -> Awaitable[Any]:
        return stub.Call(constant_request(), timeout=30)

    constant_header = Metadata(("x-request-id", new_request_id()))

    def raw_constant_header() -> Awaitable[Any]:
        return stub.Call(constant_request(), timeout=30, metadata=constant_header)

    def raw_header() -> Awaitable[Any]:
        metadata = Metadata(("x-request-id", new_request_id()))
        return stub.Call(constant_request(), timeout=30, metadata=metadata)

    def raw_deadline() -> Awaitable[Any]:
        deadline = loop.time() + 30
        metadata = Metadata(("x-request-id", new_request_id()))
        return stub.Call(constant_request(), timeout=deadline - loop.time(), metadata=metadata)

    async def raw_request() -> Any:
        request_id = new_request_id()
        deadline = loop.time() + 30
        now = loop.time()
        request = plugin_pb2.CallRequest(
            v=1,
            plugin="example",
            method="echo",
            params_json=encode_json(PARAMS),
            context={"request_id": request_id, "deadline_ms": int((deadline - now) * 1000)},
        )
        reply = await stub.Call(
            request, timeout=deadline - now, metadata=Metadata(("x-request-id", request_id))
        )
        return loads(reply.result_json, "bench")

    def invocation() -> Invocation:
        return Invocation("example", "1.0.0", "echo", PARAMS, loop.time() + 30, new_request_id())

    return {
        "raw": raw,
        "raw_no_retries": raw_no_retries,
        "raw_channel": raw_channel,
        "raw_constant_header": raw_constant_header,
        "raw_header": raw_header,
        "raw_deadline": raw_deadline,
        "raw_request": raw_request,
        "connection": lambda: connection.call(invocation()),
        "provider": lambda: provider.invoke(target, invocation()),
        "route": lambda: route.invoke(build(route, PARAMS, None, None, None, None, None)),
        "call": lambda: dispatcher.call("example", "echo", PARAMS),
    }


async def _c64(variants: dict[str, Call], calls: int, rounds: int) -> dict[str, float]:
    gc_clock = _GcClock()
    gc.callbacks.append(gc_clock)
    try:
        for call in variants.values():  # warm every variant's path
            await _cpu_per_call(call, 500, 64, gc_clock)
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        in_gc: dict[str, list[float]] = {name: [] for name in variants}
        faults: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for index in range(rounds):
            for name in names[index % len(names) :] + names[: index % len(names)]:
                total, collecting, faulted = await _cpu_per_call(
                    variants[name], calls, 64, gc_clock
                )
                cpu[name].append(total)
                in_gc[name].append(collecting)
                faults[name].append(faulted)
    finally:
        gc.callbacks.remove(gc_clock)
    figures: dict[str, float] = {}
    for name in variants:
        figures[f"grpc_path_c64_{name}_cpu_us"] = statistics.median(cpu[name])
        figures[f"grpc_path_c64_{name}_gc_us"] = statistics.median(in_gc[name])
        figures[f"grpc_path_c64_{name}_page_faults"] = statistics.median(faults[name])
    return figures


async def _c1(variants: dict[str, Call], calls: int) -> dict[str, float]:
    # A new random order every round: in a fixed rotation each variant always follows the
    # same other one, and what a call leaves behind (its cleanup, the server's) lands in
    # the next one's time.
    clock = time.perf_counter_ns
    taken: dict[str, list[int]] = {name: [] for name in variants}
    names = list(variants)
    order = random.Random(20)
    gc.collect()
    for _ in range(calls):
        order.shuffle(names)
        for name in names:
            started = clock()
            await variants[name]()
            taken[name].append(clock() - started)
    return {
        f"grpc_path_c1_{name}_p50_us": statistics.median(values) / 1000
        for name, values in taken.items()
    }


async def run(options: Options | None = None) -> dict[str, float]:
    from dispatcher import Dispatcher

    quick = bool(options and options.quick)
    calls = (options and options.calls) or (300 if quick else 4_000)
    rounds = (options and options.rounds) or (1 if quick else 9)
    executable, _ = _plugin_executable()
    figures = {"grpc_path_load_average_1min_at_start": os.getloadavg()[0]}
    with _client_pinned():
        async with _service(executable) as address:
            manifest = _manifest({"provider": "grpc", "address": address})
            async with Dispatcher(manifest) as dispatcher:
                variants = _variants(dispatcher, address)
                figures.update(await _c64(variants, calls, rounds))
                figures.update(await _c1(variants, min(calls, 2_000)))
    figures["grpc_path_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures
