"""HTTP functions: raw Python clients against ``Dispatcher.call`` on an ``http`` target.

The same N calls go to one local HTTP function server, made (a) by each raw client, posting
the same envelope bytes and decoding the JSON answer, and (b) through ``Dispatcher.call``,
at concurrency 1 and 64. The server answers a fixed reply from a raw uvloop protocol in its
own process pinned to CPU 0, the client runs pinned to CPU 1, so the client side is what is
measured. Variants run interleaved, in a rotating order, for several rounds; each figure
is the median over the rounds of a figure computed within one round (ratios included), so
a noisy neighbour on the machine moves numerator and denominator together. Besides wall
time, each measurement records this process's CPU time per call (``cpu_us_per_call``): on
a shared machine it is the steadier view of what the client side costs.

Variants:
  aiohttp      aiohttp.ClientSession, one pooled keep-alive connector
  httpx        httpx.AsyncClient (HTTP/1.1), keep-alive pool of the same size
  pyreqwest    pyreqwest's Client (Rust reqwest/hyper), no redirects, no decompression
  dispatcher   Dispatcher.call("bench", "echo", params): envelope built per call, deadline,
               status mapping, envelope decoding; its HTTP provider on `client: reqwest`
               (bench_http_clients.py compares every client and both of ours)
  floor        a raw asyncio.Protocol client with httptools' parser: no pool management,
               no timeouts, no error handling. Not a client anyone should use; it shows how
               far the server is from being the bottleneck. It is not in the ratios.

Then, for realism, the dispatcher and aiohttp at concurrency 64 against the real plugin SDK
server (``dispatcher-plugin serve``, uvicorn + httptools + uvloop, on CPU 0): there the
server is the bottleneck, so both clients should make the same calls/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench._core import Goal, Options, available_cpus, pinned_to_cpu

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
CLIENT_CPU = 1
CONCURRENCY = (1, 64)
RAW_CLIENTS = ("aiohttp", "httpx", "pyreqwest")
VARIANTS = ("aiohttp", "httpx", "pyreqwest", "dispatcher", "floor")
DEFAULT_CALLS = 3000
DEFAULT_ROUNDS = 5
# httpx makes at most this many calls per measurement: at concurrency 64 it manages a few
# hundred calls/s here, and N calls of it would take most of the run. Its figures are rates
# and percentiles, comparable whatever the count.
HTTPX_MAX_CALLS = 600
PARAMS = {"text": "hi"}

GOALS = {
    "http_c64_ratio_to_fastest_raw": Goal(">=", 0.9),
    "http_c64_ratio_to_aiohttp": Goal(">=", 2.0),
    "http_c1_p50_added_us": Goal("<=", 20.0),
}

Call = Callable[[], Awaitable[Any]]


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (200 if options.quick else DEFAULT_CALLS)
    rounds = options.rounds or (1 if options.quick else DEFAULT_ROUNDS)
    figures: dict[str, float] = {
        "http_calls_per_measurement": calls,
        "http_httpx_calls_per_measurement": min(calls, HTTPX_MAX_CALLS),
        "http_rounds": rounds,
        # Other tenants' load while this ran: read the figures below in its light.
        "http_load_average_1min_at_start": os.getloadavg()[0],
    }
    pinned_server = SERVER_CPU if {SERVER_CPU, CLIENT_CPU} <= available_cpus() else None
    with pinned_to_cpu(CLIENT_CPU):
        async with fixed_reply_server(pinned_server) as url:
            samples, paired, control = await _measure_all(url, calls, rounds)
        figures.update(_figures(samples))
        # Measured call by call against the fastest raw client, alternating (see measure_paired).
        figures["http_c1_p50_added_us"] = _median(p50 for p50, _ in paired)
        # The median of the per-pair differences: the steadier statistic of the two.
        figures["http_c1_median_added_us_per_call"] = _median(pair for _, pair in paired)
        # The same measurements of aiohttp against a second aiohttp session: what "added"
        # reads when nothing is added, i.e. the resolution of the figures above.
        figures["http_c1_p50_added_control_us"] = _median(p50 for p50, _ in control)
        figures["http_c1_median_added_control_us_per_call"] = _median(pair for _, pair in control)
        async with sdk_server(pinned_server) as url:
            figures.update(await _measure_sdk(url, max(calls // 2, 100), rounds))
    figures["http_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


# -- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement: ``calls`` calls at some concurrency."""

    calls_per_s: float
    p50_us: float
    p99_us: float
    cpu_us_per_call: float  # this (client) process's CPU time per call


async def measure(call: Call, calls: int, concurrency: int) -> Sample:
    """Make ``calls`` calls, ``concurrency`` at a time, timing each one."""
    latencies = [0] * calls
    next_index = 0
    clock = time.perf_counter_ns

    async def worker() -> None:
        nonlocal next_index
        while next_index < calls:
            index = next_index
            next_index += 1
            started = clock()
            await call()
            latencies[index] = clock() - started

    gc.collect()
    cpu_started = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    latencies.sort()
    return Sample(
        calls_per_s=calls / elapsed,
        p50_us=latencies[calls // 2] / 1000,
        p99_us=latencies[min(calls - 1, calls * 99 // 100)] / 1000,
        cpu_us_per_call=cpu / calls * 1e6,
    )


async def measure_paired(ours: Call, theirs: Call, calls: int) -> tuple[float, float]:
    """One call of each in turn at concurrency 1: (p50 of ``ours`` minus p50 of ``theirs``,
    median of the per-pair differences), in µs.

    Two separate runs at concurrency 1 differ by whatever the machine's other tenants did
    meanwhile, which on a shared machine is more than the 20 µs this figure is about.
    Alternating single calls (in a changing order) puts both under the same conditions.
    """
    clock = time.perf_counter_ns
    ours_ns: list[int] = []
    theirs_ns: list[int] = []
    gc.collect()
    for index in range(calls):
        for call, into in ((ours, ours_ns), (theirs, theirs_ns))[:: 1 if index % 2 else -1]:
            started = clock()
            await call()
            into.append(clock() - started)
    p50_added = (statistics.median(ours_ns) - statistics.median(theirs_ns)) / 1000
    pairs = statistics.median(mine - other for mine, other in zip(ours_ns, theirs_ns, strict=True))
    return p50_added, pairs / 1000


async def _warm_and_measure(call: Call, calls: int, concurrency: int) -> Sample:
    # Warm up: open every pooled connection this concurrency needs, fill caches.
    await measure(call, max(100, 4 * concurrency), concurrency)
    return await measure(call, calls, concurrency)


Samples = dict[tuple[int, str], list[Sample]]


async def _measure_all(
    url: str, calls: int, rounds: int
) -> tuple[Samples, list[tuple[float, float]], list[tuple[float, float]]]:
    samples: Samples = {}
    paired: list[tuple[float, float]] = []
    control: list[tuple[float, float]] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = {name: await stack.enter_async_context(_CLIENTS[name](url)) for name in VARIANTS}
        second_aiohttp = await stack.enter_async_context(aiohttp_client(url))
        # Every client gets its c64 pool before anything is measured, so the c1 figures of
        # all rounds compare sessions of the same shape: an aiohttp session holding one
        # connection read ~9 us faster at c1 than one holding 64 (the A/A control, below).
        for call in [*clients.values(), second_aiohttp]:
            await measure(call, min(calls, 4 * CONCURRENCY[-1]), CONCURRENCY[-1])
        for round_index in range(rounds):
            for concurrency in CONCURRENCY:
                for name in _rotated(VARIANTS, round_index):
                    count = min(calls, HTTPX_MAX_CALLS) if name == "httpx" else calls
                    sample = await _warm_and_measure(clients[name], count, concurrency)
                    samples.setdefault((concurrency, name), []).append(sample)
                if concurrency == 1:
                    fastest = max(RAW_CLIENTS, key=lambda name: samples[(1, name)][-1].calls_per_s)
                    paired.append(
                        await measure_paired(clients["dispatcher"], clients[fastest], calls)
                    )
                    # Keep its pool shaped like the measured clients' (they ran at c64).
                    await measure(second_aiohttp, min(calls, 4 * CONCURRENCY[-1]), CONCURRENCY[-1])
                    control.append(await measure_paired(second_aiohttp, clients["aiohttp"], calls))
    return samples, paired, control


def _rotated(names: tuple[str, ...], by: int) -> list[str]:
    by %= len(names)
    return [*names[by:], *names[:by]]


def _figures(samples: Samples) -> dict[str, float]:
    figures: dict[str, float] = {}
    rounds = len(samples[(CONCURRENCY[0], VARIANTS[0])])
    for (concurrency, name), runs in samples.items():
        prefix = f"http_c{concurrency}_{name}"
        figures[f"{prefix}_calls_per_s"] = _median(run.calls_per_s for run in runs)
        figures[f"{prefix}_p50_us"] = _median(run.p50_us for run in runs)
        figures[f"{prefix}_p99_us"] = _median(run.p99_us for run in runs)
        figures[f"{prefix}_cpu_us_per_call"] = _median(run.cpu_us_per_call for run in runs)
    for concurrency in CONCURRENCY:
        ratios, added, cpu_added = [], [], []
        for index in range(rounds):
            # The fastest raw client of this round, by calls/s.
            fastest = max(
                (samples[(concurrency, name)][index] for name in RAW_CLIENTS),
                key=lambda sample: sample.calls_per_s,
            )
            ours = samples[(concurrency, "dispatcher")][index]
            ratios.append(ours.calls_per_s / fastest.calls_per_s)
            added.append(ours.p50_us - fastest.p50_us)
            cpu_added.append(ours.cpu_us_per_call - fastest.cpu_us_per_call)
        figures[f"http_c{concurrency}_ratio_to_fastest_raw"] = _median(ratios)
        figures[f"http_c{concurrency}_ratio_to_aiohttp"] = _median(
            samples[(concurrency, "dispatcher")][index].calls_per_s
            / samples[(concurrency, "aiohttp")][index].calls_per_s
            for index in range(rounds)
        )
        if concurrency != 1:  # at concurrency 1 it is measured paired, call by call
            figures[f"http_c{concurrency}_p50_added_us"] = _median(added)
        figures[f"http_c{concurrency}_cpu_added_us_per_call"] = _median(cpu_added)
        figures[f"http_c{concurrency}_aiohttp_over_httpx_ratio"] = _median(
            samples[(concurrency, "aiohttp")][index].calls_per_s
            / samples[(concurrency, "httpx")][index].calls_per_s
            for index in range(rounds)
        )
    return figures


async def _measure_sdk(url: str, calls: int, rounds: int) -> dict[str, float]:
    names = ("aiohttp", "dispatcher")
    runs: dict[str, list[Sample]] = {name: [] for name in names}
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(_CLIENTS[name](url, method="say"))
            for name in names
        }
        for round_index in range(rounds):
            for name in names[round_index % 2 :] + names[: round_index % 2]:
                runs[name].append(await _warm_and_measure(clients[name], calls, 64))
    return {
        "http_sdk_c64_aiohttp_calls_per_s": _median(s.calls_per_s for s in runs["aiohttp"]),
        "http_sdk_c64_dispatcher_calls_per_s": _median(s.calls_per_s for s in runs["dispatcher"]),
        "http_sdk_c64_ratio_to_aiohttp": _median(
            ours.calls_per_s / raw.calls_per_s
            for ours, raw in zip(runs["dispatcher"], runs["aiohttp"], strict=True)
        ),
    }


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


# -- the variants: each an async context manager yielding one `call()` -------------------


def envelope_bytes(method: str) -> bytes:
    """The request envelope a raw client posts: the shape and size the dispatcher sends."""
    from providers.invocation import Invocation, new_request_id

    invocation = Invocation(
        plugin="bench",
        version="1.0.0",
        method=method,
        params=PARAMS,
        deadline=time.monotonic() + 30,
        request_id=new_request_id(),
    )
    return orjson.dumps(invocation.request_wire())


HEADERS = {"Content-Type": "application/json"}


@contextlib.asynccontextmanager
async def aiohttp_client(url: str, method: str = "echo") -> AsyncIterator[Call]:
    import aiohttp

    body = envelope_bytes(method)
    invoke_url = f"{url}/invoke"
    connector = aiohttp.TCPConnector(limit=512, limit_per_host=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector, skip_auto_headers=("User-Agent",), auto_decompress=False
    ) as session:

        async def call() -> Any:
            async with session.post(invoke_url, data=body, headers=HEADERS) as response:
                payload = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
            return _result(payload)

        yield call


@contextlib.asynccontextmanager
async def pyreqwest_client(url: str, method: str = "echo") -> AsyncIterator[Call]:
    from pyreqwest.client import ClientBuilder
    from pyreqwest.http import Url

    body = envelope_bytes(method)
    # Parsed once, as the dispatcher's client does (pyreqwest parses a str on every
    # request: 0.4 µs): the raw side gets every saving that is not the dispatcher's own.
    invoke_url = Url(f"{url}/invoke")
    builder = ClientBuilder().follow_redirects(False).gzip(False).max_connections(512)
    async with builder.build() as client:

        async def call() -> Any:
            request = client.post(invoke_url).headers(HEADERS).body_bytes(body).build()
            response = await request.send()
            payload = (await response.bytes()).to_bytes()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            return _result(payload)

        yield call


@contextlib.asynccontextmanager
async def httpx_client(url: str, method: str = "echo") -> AsyncIterator[Call]:
    import httpx

    body = envelope_bytes(method)
    invoke_url = f"{url}/invoke"
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512, keepalive_expiry=30)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def call() -> Any:
            response = await client.post(invoke_url, content=body, headers=HEADERS)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}")
            return _result(response.content)

        yield call


@contextlib.asynccontextmanager
async def dispatcher_client(url: str, method: str = "echo") -> AsyncIterator[Call]:
    from dispatcher import Dispatcher, parse_manifest

    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "bench",
                    "version": "1.0.0",
                    "config": {"greeting": "bench"},
                    # reqwest: the figures are the faster client's (aiohttp is the default
                    # until reqwest keeps every behaviour; providers/_http_client.py).
                    "target": {"provider": "http", "url": url, "client": "reqwest"},
                    "methods": {method: {}},
                }
            ],
        },
        base_dir=ROOT,
    )
    async with Dispatcher(manifest) as dispatcher:
        call_plugin = dispatcher.call

        def call() -> Awaitable[Any]:
            return call_plugin("bench", method, PARAMS)

        yield call


def _result(payload: bytes) -> Any:
    envelope = orjson.loads(payload)
    if envelope.get("ok") is not True:
        raise RuntimeError(f"the server answered an error: {envelope!r}")
    return envelope.get("result")


class _FloorConnection(asyncio.Protocol):
    """One keep-alive connection speaking just enough HTTP/1.1 for the fixed reply."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.body = bytearray()
        self.answer: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.answer is not None
        self.answer.set_result(bytes(self.body))
        self.body.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc or ConnectionError("connection closed"))

    def request(self, data: bytes) -> asyncio.Future[bytes]:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.answer


@contextlib.asynccontextmanager
async def floor_client(url: str, method: str = "echo") -> AsyncIterator[Call]:
    host, _, port = url.removeprefix("http://").partition(":")
    body = envelope_bytes(method)
    request = (
        f"POST /invoke HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    idle: list[_FloorConnection] = []
    every: list[_FloorConnection] = []

    async def call() -> Any:
        if idle:
            connection = idle.pop()
        else:
            _, connection = await loop.create_connection(_FloorConnection, host, int(port))
            every.append(connection)
        payload = await connection.request(request)
        idle.append(connection)
        return _result(payload)

    try:
        yield call
    finally:
        for connection in every:
            if connection.transport is not None:
                connection.transport.close()


_CLIENTS: dict[str, Callable[..., contextlib.AbstractAsyncContextManager[Call]]] = {
    "aiohttp": aiohttp_client,
    "httpx": httpx_client,
    "pyreqwest": pyreqwest_client,
    "dispatcher": dispatcher_client,
    "floor": floor_client,
}


# -- the servers, each in a process of its own -------------------------------------------


@contextlib.asynccontextmanager
async def port_server(
    module: str, cpu: int | None, extra: Sequence[str] = ()
) -> AsyncIterator[str]:
    """``python -m module [extra]`` that prints its port, pinned to ``cpu``; yields its base URL."""
    arguments = ["-m", module, *extra] + ([] if cpu is None else ["--cpu", str(cpu)])
    async with _subprocess(arguments, cpu) as process:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        if not line.strip().isdigit():
            raise RuntimeError(f"{module} did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line)}"


def fixed_reply_server(cpu: int | None) -> contextlib.AbstractAsyncContextManager[str]:
    """``bench._fixed_server`` in a subprocess pinned to ``cpu``; yields its base URL."""
    return port_server("bench._fixed_server", cpu)


@contextlib.asynccontextmanager
async def sdk_server(cpu: int | None, extra: Sequence[str] = ()) -> AsyncIterator[str]:
    """The example plugin behind ``dispatcher-plugin serve [extra]``; yields its base URL."""
    port = _free_port()
    arguments = [
        "-m", "linchkit_plugin.cli", "serve", "echo_plugin:EchoPlugin",
        "--path", str(ROOT / "examples" / "python"), "--port", str(port),
        "--config", '{"greeting": "bench"}', *extra,
    ]  # fmt: skip
    async with _subprocess(arguments, cpu) as process:
        deadline = time.monotonic() + 20
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("dispatcher-plugin serve did not start") from None
                await asyncio.sleep(0.05)
            else:
                writer.close()
                await writer.wait_closed()
                break
        yield f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def _subprocess(
    arguments: list[str], cpu: int | None
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *arguments,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,  # EOF on it tells the fixed-reply server to stop
        stdout=asyncio.subprocess.PIPE,
    )
    if cpu is not None:
        os.sched_setaffinity(process.pid, {cpu})
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
