"""gRPC unary through the dispatcher vs raw grpc.aio, and CPU work in-process vs a subprocess.

The server is the example plugin of ``sdk/go`` when it is built (a Python grpc.aio server
caps near 3.9k calls/s whatever the client, so it would measure itself, not the client),
else ``sdk/python``'s; ``grpc_server_is_go`` says which. The plugin runs pinned to CPU 0,
the client to CPU 1, when both are available.

Figures:
* ``grpc_raw_c{1,64}_calls_per_s``        a bare ``grpc.aio`` stub calling ``echo``;
* ``grpc_dispatcher_c{1,64}_calls_per_s`` ``Dispatcher.call`` on ``provider: grpc``;
* ``grpc_c64_ratio_to_raw``               dispatcher / raw at concurrency 64 (goal ≥ 0.85): the
  median of the rounds' ratios, each round measuring both sides back to back;
* ``grpc_c64_ratio_to_raw_with_metadata`` the same against a raw stub that also sends the
  one header every dispatched call carries (``x-request-id``): the protocol's share;
* ``grpc_{raw,dispatcher}_c64_cpu_us``    the client process's CPU per call (every thread),
  ``grpc_c64_cpu_added_us`` their difference: steadier than calls/s on a busy machine;
* ``grpc_{raw,dispatcher}_c1_p50_us``     median latency of one call alone, the two sides
  alternating call by call; ``grpc_c1_p50_added_us`` the difference (goal ≤ 25 µs);
* ``grpc_load_average_1min_at_{start,end}`` how busy the machine was around those figures;
* ``grpc_subprocess_c64_calls_per_s``     ``provider: subprocess`` (Unix socket + AutoMTLS);
* ``grpc_digest_{inprocess,subprocess}_calls_per_s`` and ``..._loop_lag_max_ms``: a
  CPU-heavy method (20,000 SHA-256 rounds) run in the host's worker threads vs in the
  subprocess plugin, 8 at a time, with the worst event-loop delay seen meanwhile.

The other SDKs' servers, beside Go's (each ``<sdk>`` of ``rust`` and ``java`` whose
``sdk/<sdk>/dist/example-plugin`` is built, or ``BENCH_GRPC_<SDK>_PLUGIN`` names; skipped
otherwise, and all of them when the main server is not Go's or off Linux), called by the
same raw stub, the sides interleaved round by round (calls/s) and call by call (p50):
* ``grpc_<sdk>_raw_c{1,64}_calls_per_s`` and ``grpc_<sdk>_raw_c64_ratio_to_go`` (the median of
  the rounds' ratios);
* ``grpc_<sdk>_raw_c64_server_cpu_us``, ``grpc_go_raw_c64_server_cpu_us``: the plugin
  process's CPU per call (every thread), steadier than calls/s on a busy machine;
* ``grpc_<sdk>_raw_c1_p50_us``, ``grpc_<sdk>_raw_c1_p50_over_go_us``: median latency alone,
  and its difference from Go's;
* ``grpc_<sdk>_raw_c1_p50_10kb_us``, ``..._10kb_over_go_us``, ``grpc_go_raw_c1_p50_10kb_us``:
  the same for an echo of 10 KB, whose reply a server with Nagle's algorithm left on holds
  until the client's delayed ACK (40 ms, as the Rust SDK's did before it set
  ``TCP_NODELAY``). A JVM is warmed first (``SDK_WARMUP_CALLS``), so the figures are its
  server's, not its compilers'.

Runs under ``python -m bench`` (``run(options)``) or alone: ``python bench/bench_grpc.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU, CLIENT_CPU = 0, 1
#: The other SDKs measured beside Go's, and the calls each gets before it is measured: the
#: JVM compiles the call path during its first tens of thousands of calls, and until then
#: 2 % of its calls at c1 waited 3-6 ms for its compiler threads on the server's one CPU.
SDK_WARMUP_CALLS = {"rust": 0, "java": 50_000}
#: What each SDK's example is started with here. The Java example's launcher keeps to C1's
#: code (it starts often and lives briefly); a server measured after its warm-up is one that
#: runs long, as with both compilers.
SDK_ENVIRONMENT = {"java": {"JAVA_OPTS": "-XX:TieredStopAtLevel=4"}}
#: The params of the echo a delayed ACK would show in (``grpc_<sdk>_raw_c1_p50_10kb_us``).
PARAMS_10KB = {"blob": "x" * 10_000}

try:  # the harness's Goal, when it is there
    from bench._core import Goal

    GOALS = {
        "grpc_c64_ratio_to_raw": Goal(">=", 0.85),
        "grpc_c1_p50_added_us": Goal("<=", 25.0),
    }
except ImportError:  # pragma: no cover - standalone run
    GOALS = {}


def _plugin_executable() -> tuple[Path, bool]:
    chosen = os.environ.get("BENCH_GRPC_PLUGIN")  # another build, e.g. another checkout's
    if chosen:
        return Path(chosen), "/go/" in chosen
    go = ROOT / "sdk" / "go" / "dist" / "example-plugin"
    if os.access(go, os.X_OK):
        return go, True
    python = ROOT / "sdk" / "python" / "dist" / "example-plugin"
    if not os.access(python, os.X_OK):
        raise SystemExit("no example plugin built: run sdk/python/build.sh (or make test)")
    return python, False


def _sdk_executables() -> dict[str, Path]:
    """The other SDKs' example plugins that are built, by SDK."""
    found: dict[str, Path] = {}
    for sdk in SDK_WARMUP_CALLS:
        chosen = os.environ.get(f"BENCH_GRPC_{sdk.upper()}_PLUGIN")  # another build
        path = Path(chosen) if chosen else ROOT / "sdk" / sdk / "dist" / "example-plugin"
        if os.access(path, os.X_OK):
            found[sdk] = path
        elif chosen:
            raise SystemExit(f"BENCH_GRPC_{sdk.upper()}_PLUGIN={chosen} is not an executable")
    return found


def _process_cpu_s(pid: int) -> float:
    """The CPU seconds process ``pid`` has used (every thread), from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pin(pid: int, cpu: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        if {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0) | {cpu}:
            os.sched_setaffinity(pid, {cpu})


@contextlib.contextmanager
def _client_pinned() -> Iterator[None]:
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    if not {SERVER_CPU, CLIENT_CPU} <= before:
        yield
        return
    os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.asynccontextmanager
async def _service(
    executable: Path, environment: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, int]]:
    """``executable serve`` on a free port, pinned to the server's CPU: its address and pid."""
    process = await asyncio.create_subprocess_exec(
        str(executable),
        "serve",
        "--address",
        "127.0.0.1:0",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **(environment or {})},
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            line = (await process.stdout.readline()).decode().strip()
        _pin(process.pid, SERVER_CPU)
        yield line.split("|")[3], process.pid
    finally:
        process.terminate()
        await process.wait()


async def _throughput(call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> float:
    return (await _rate_and_cpu(call, calls, concurrency))[0]


async def _rate_and_cpu(
    call: Callable[[], Awaitable[Any]], calls: int, concurrency: int
) -> tuple[float, float]:
    """Calls per second, and the process's CPU µs per call (all its threads)."""
    for _ in range(min(200, calls)):  # warm the channel and both sides' caches
        await call()
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu = time.process_time() - cpu_started
    return calls / (time.perf_counter() - started), cpu / calls * 1e6


async def _p50s_us(calls: int, *sides: Callable[[], Awaitable[Any]]) -> list[float]:
    """The median latency of each side, the sides alternating call by call, in an order
    that turns each time (as ``bench_http.measure_paired``): always second, a side would
    always run right after the other's call, on whatever state that call left."""
    samples: list[list[float]] = [[] for _ in sides]
    pairs = list(zip(sides, samples, strict=True))
    for index in range(calls):
        for call, taken in pairs if index % 2 else pairs[::-1]:
            started = time.perf_counter()
            await call()
            taken.append(time.perf_counter() - started)
    return [statistics.median(taken) * 1e6 for taken in samples]


def _manifest(target: dict[str, Any], plugin_id: str = "example") -> Any:
    from dispatcher import parse_manifest

    return parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": plugin_id,
                    "version": "1.0.0",
                    "target": target,
                    "lifecycle": {"init_timeout_ms": 60_000},
                    "methods": {"echo": {}, "digest": {"timeout_ms": 60_000}},
                }
            ],
        },
        base_dir=ROOT,
    )


async def _loop_lag_during(work: Awaitable[Any]) -> tuple[Any, float]:
    worst = 0.0
    done = False

    async def probe() -> None:
        nonlocal worst
        while not done:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - started - 0.001)

    prober = asyncio.create_task(probe())
    try:
        result = await work
    finally:
        done = True
        await prober
    return result, worst * 1000


def _median_ratio(mine: list[tuple[float, float]], base: list[tuple[float, float]]) -> float:
    """The median over rounds of one side's calls/s over the other's in the same round."""
    return statistics.median(a[0] / b[0] for a, b in zip(mine, base, strict=True))


async def _compare(
    raw: Callable[[], Awaitable[Any]],
    raw_with_metadata: Callable[[], Awaitable[Any]],
    through: Callable[[], Awaitable[Any]],
    calls: int,
    quick: bool,
) -> dict[str, float]:
    """Raw, raw with the request-id header, and the dispatcher, interleaved round by round,
    so drift on a shared machine hits all three alike."""
    figures: dict[str, float] = {}
    for concurrency in (1, 64):
        rounds: dict[str, list[tuple[float, float]]] = {"raw": [], "meta": [], "through": []}
        for _ in range(1 if quick else 5):
            rounds["raw"].append(await _rate_and_cpu(raw, calls, concurrency))
            rounds["meta"].append(await _rate_and_cpu(raw_with_metadata, calls, concurrency))
            rounds["through"].append(await _rate_and_cpu(through, calls, concurrency))
        raw_rates = [rate for rate, _ in rounds["raw"]]
        figures[f"grpc_raw_c{concurrency}_calls_per_s"] = statistics.median(raw_rates)
        figures[f"grpc_dispatcher_c{concurrency}_calls_per_s"] = statistics.median(
            rate for rate, _ in rounds["through"]
        )
        if concurrency == 64:
            figures["grpc_c64_ratio_to_raw"] = _median_ratio(rounds["through"], rounds["raw"])
            figures["grpc_c64_ratio_to_raw_with_metadata"] = _median_ratio(
                rounds["through"], rounds["meta"]
            )
            raw_cpu = statistics.median(cpu for _, cpu in rounds["raw"])
            through_cpu = statistics.median(cpu for _, cpu in rounds["through"])
            figures["grpc_raw_c64_cpu_us"] = raw_cpu
            figures["grpc_dispatcher_c64_cpu_us"] = through_cpu
            figures["grpc_c64_cpu_added_us"] = statistics.median(
                mine[1] - base[1]
                for mine, base in zip(rounds["through"], rounds["raw"], strict=True)
            )
    return figures


@dataclass(frozen=True)
class _Side:
    """One SDK's server as the raw stub calls it: an echo of the benchmark's params, one of
    ``PARAMS_10KB``, and the server's pid (for its CPU)."""

    sdk: str
    pid: int
    echo: Callable[[], Awaitable[Any]]
    echo_10kb: Callable[[], Awaitable[Any]]


async def _compare_sdks(
    go: _Side, others: list[_Side], calls: int, quick: bool
) -> dict[str, float]:
    """Go's server and the other SDKs', interleaved round by round (calls/s, the server's CPU
    per call) and call by call (p50s), so drift on a shared machine hits them alike."""
    figures: dict[str, float] = {}
    sides = [go, *others]
    for side in others:
        warmup = SDK_WARMUP_CALLS[side.sdk] // (25 if quick else 1)
        if warmup:
            await _throughput(side.echo, warmup, 16)
    for concurrency in (1, 64):
        rounds: dict[str, list[tuple[float, float]]] = {side.sdk: [] for side in sides}
        for _ in range(1 if quick else 5):
            for side in sides:
                cpu_started = _process_cpu_s(side.pid)
                rate, _ = await _rate_and_cpu(side.echo, calls, concurrency)
                # _rate_and_cpu warms up with min(200, calls) calls first: the server ran them too.
                served = calls + min(200, calls)
                cpu = (_process_cpu_s(side.pid) - cpu_started) / served * 1e6
                rounds[side.sdk].append((rate, cpu))
        for side in others:
            mine = rounds[side.sdk]
            name = f"grpc_{side.sdk}_raw_c{concurrency}"
            figures[f"{name}_calls_per_s"] = statistics.median(rate for rate, _ in mine)
            if concurrency == 64:
                figures[f"{name}_ratio_to_go"] = _median_ratio(mine, rounds[go.sdk])
                figures[f"{name}_server_cpu_us"] = statistics.median(cpu for _, cpu in mine)
        if concurrency == 64:
            go_cpu = statistics.median(cpu for _, cpu in rounds[go.sdk])
            figures["grpc_go_raw_c64_server_cpu_us"] = go_cpu
    p50s = await _p50s_us(min(calls, 2_000), *(side.echo for side in sides))
    p50s_10kb = await _p50s_us(min(calls, 1_000), *(side.echo_10kb for side in sides))
    figures["grpc_go_raw_c1_p50_10kb_us"] = p50s_10kb[0]
    for index, side in enumerate(others, start=1):
        figures[f"grpc_{side.sdk}_raw_c1_p50_us"] = p50s[index]
        figures[f"grpc_{side.sdk}_raw_c1_p50_over_go_us"] = p50s[index] - p50s[0]
        figures[f"grpc_{side.sdk}_raw_c1_p50_10kb_us"] = p50s_10kb[index]
        figures[f"grpc_{side.sdk}_raw_c1_p50_10kb_over_go_us"] = p50s_10kb[index] - p50s_10kb[0]
    return figures


async def run(options: Any = None) -> dict[str, float]:
    import grpc.aio

    from dispatcher import Dispatcher
    from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
    from providers.invocation import new_request_id

    quick = bool(getattr(options, "quick", False))
    calls = getattr(options, "calls", None) or (300 if quick else 5_000)
    executable, is_go = _plugin_executable()
    figures: dict[str, float] = {
        "grpc_server_is_go": float(is_go),
        # Other work on the machine moves every figure here; the record says how busy it was.
        "grpc_load_average_1min_at_start": os.getloadavg()[0],
    }
    params = {"id": 12345, "name": "benchmark", "tags": ["a", "b"]}

    with _client_pinned():
        async with _service(executable) as (address, pid):
            channel = grpc.aio.insecure_channel(address)
            stub = plugin_pb2_grpc.PluginServiceStub(channel)
            import orjson

            def request(params: Any = params) -> Any:
                return plugin_pb2.CallRequest(
                    v=1,
                    plugin="example",
                    method="echo",
                    params_json=orjson.dumps(params),
                    context=plugin_pb2.CallContext(request_id="r", deadline_ms=30_000),
                )

            def raw() -> Awaitable[Any]:
                return stub.Call(request(), timeout=30)

            def side(sdk: str, stub: Any, pid: int) -> _Side:
                return _Side(
                    sdk,
                    pid,
                    lambda: stub.Call(request(), timeout=30),
                    lambda: stub.Call(request(PARAMS_10KB), timeout=30),
                )

            def raw_with_metadata() -> Awaitable[Any]:
                metadata = grpc.aio.Metadata(("x-request-id", new_request_id()))
                return stub.Call(request(), timeout=30, metadata=metadata)

            async with Dispatcher(_manifest({"provider": "grpc", "address": address})) as d:

                def through() -> Awaitable[Any]:
                    return d.call("example", "echo", params)

                figures.update(await _compare(raw, raw_with_metadata, through, calls, quick))
                raw_p50, through_p50 = await _p50s_us(min(calls, 2_000), raw, through)
                figures["grpc_raw_c1_p50_us"] = raw_p50
                figures["grpc_dispatcher_c1_p50_us"] = through_p50
                figures["grpc_c1_p50_added_us"] = through_p50 - raw_p50
            others = _sdk_executables() if is_go and sys.platform == "linux" else {}
            if others:
                async with contextlib.AsyncExitStack() as stack:
                    sides = []
                    for sdk, path in others.items():
                        other, other_pid = await stack.enter_async_context(
                            _service(path, SDK_ENVIRONMENT.get(sdk))
                        )
                        other_channel = grpc.aio.insecure_channel(other)
                        stack.push_async_callback(other_channel.close)
                        other_stub = plugin_pb2_grpc.PluginServiceStub(other_channel)
                        sides.append(side(sdk, other_stub, other_pid))
                    go = side("go", stub, pid)
                    figures.update(await _compare_sdks(go, sides, calls, quick))
            await channel.close()
        figures["grpc_load_average_1min_at_end"] = os.getloadavg()[0]

        subprocess_target = {"provider": "subprocess", "command": [str(executable)]}
        async with Dispatcher(_manifest(subprocess_target)) as d:
            provider: Any = d.providers["subprocess"]
            for process in provider._processes.values():
                if process.pid is not None:
                    _pin(process.pid, SERVER_CPU)
            figures["grpc_subprocess_c64_calls_per_s"] = await _throughput(
                lambda: d.call("example", "echo", params), calls, 64
            )
            digest_calls = 16 if quick else 64
            heavy = {"data": "benchmark", "rounds": 20_000}

            async def digests(plugin: str) -> float:
                return await _throughput(lambda: d.call(plugin, "digest", heavy), digest_calls, 8)

            rate, lag = await _loop_lag_during(digests("example"))
            figures["grpc_digest_subprocess_calls_per_s"] = rate
            figures["grpc_digest_subprocess_loop_lag_max_ms"] = lag

        local = {
            "provider": "local",
            "entrypoint": "echo_plugin:EchoPlugin",
            "path": str(ROOT / "examples" / "python"),
        }
        async with Dispatcher(_manifest(local, "local")) as d:

            async def local_digests() -> float:
                return await _throughput(lambda: d.call("local", "digest", heavy), digest_calls, 8)

            rate, lag = await _loop_lag_during(local_digests())
            figures["grpc_digest_inprocess_calls_per_s"] = rate
            figures["grpc_digest_inprocess_loop_lag_max_ms"] = lag
    return figures


if __name__ == "__main__":
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    sys.path.insert(0, str(ROOT))
    results = runner(run(type("Options", (), {"quick": "--quick" in sys.argv})()))
    for name, value in results.items():
        print(f"{name:<44} {value:>12.{3 if abs(value) < 10 else 1}f}")
