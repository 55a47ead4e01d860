"""The gateway: a plugin method called over HTTP through ``dispatcher serve`` against the
same method called with ``Dispatcher.call`` in the benchmark's own process, same run.

Both reach the same target: the fixed-reply HTTP function server (``bench._fixed_server``),
as an ``http`` target of the manifest on the same client as the direct side
(``client: reqwest``). The gateway is a real ``dispatcher serve`` process; its caller is a
pyreqwest client (until 2026-12-02 an aiohttp session, which at c64 bounded the figures
once the gateway had the call lane) posting ``{"text": "hi"}`` to
``/v1/plugins/bench/methods/echo``. A
second gateway on the provider's default client (aiohttp) and a bare aiohttp.web server
answering a fixed envelope (``bench._aiohttp_server``: the HTTP hop alone, no dispatcher)
are measured the same way. Every thread of a process is pinned, the benchmark's own
included (reqwest's runtime thread too).

  gateway_c1_p50_added_us    p50 of gateway calls minus p50 of direct calls, alternating
                             one call of each at concurrency 1 (as bench_http measures).
                             Layout: this process (the caller) on CPU 0; the gateway and
                             the function server on CPU 1. So the direct call and the call
                             through the gateway cross from one core to the other the same
                             number of times (there and back once); what the gateway adds
                             is its own work and one hop on its core.
  gateway_c1_old_method_p50_added_us
                             how this benchmark measured it until 2026-12-02: the caller on
                             CPU 0 *with* the function server, the gateway alone on CPU 1,
                             the gateway on aiohttp. The direct call then never left its
                             core while the gateway's crossed cores four times (~70-90 us
                             each on this KVM guest: an IPI and a vCPU woken from halt),
                             and the gateway's client was not the direct side's.
  gateway_c64_ratio_to_direct  calls/s through the gateway over calls/s direct, at
                             concurrency 64. Direct runs with this process on CPU 1 (the
                             gateway's CPU, idle meanwhile); through the gateway this
                             process (the HTTP client) runs on CPU 0 beside the function
                             server, so the gateway process has CPU 1 to itself: the ratio
                             is what one core of gateway (HTTP server + dispatcher) serves
                             against one core of dispatcher alone.
  *_cpu_us_per_call          CPU time per call of one process (every thread, from
                             /proc/PID/task/*/schedstat): the gateway's, the floor's, and
                             this process's on the direct path. The steady view on a
                             shared machine. ``gateway_c64_own_cpu_us_per_call`` is the
                             CPU of the gateway without the call lane less the floor's (the
                             HTTP server) and less the direct caller's (the dispatcher and
                             its client): the handler's and the gateway's own.
                             ``gateway_c64_lane_saved_cpu_us_per_call``: the gateway's CPU
                             per call without the lane less with it.

  *_no_lane_*                the same for the gateway with ``--no-call-lane``: every request
                             through aiohttp.web, as before the call lane (same run).
  *_aiohttp_client_*         the same for the gateway on aiohttp (the provider's default).
  gateway_aiohttp_floor_*    the same for the bare aiohttp.web server.

Figures are medians over interleaved rounds. ``bench/gateway_where.py`` shows the same
per process under more layouts (docs/gateway.md, "Where a call's time goes").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench._core import Goal, Options, available_cpus
from bench.bench_http import (
    ROOT,
    Call,
    Sample,
    dispatcher_client,
    fixed_reply_server,
    measure,
    measure_paired,
)

CALLER_CPU = 0
SERVER_CPU = 0  # the function server, but at c1 (CPU 1, beside the gateway)
GATEWAY_CPU = 1
DEFAULT_CALLS = 3000
DEFAULT_ROUNDS = 5

GOALS = {
    "gateway_c1_p50_added_us": Goal("<=", 150.0),
    "gateway_c64_ratio_to_direct": Goal(">=", 0.5),
}


@dataclass(frozen=True, slots=True)
class Listening:
    """A server process of the benchmark: where it listens, and its pid."""

    url: str
    pid: int


async def run(options: Options) -> dict[str, float]:
    calls = options.calls or (200 if options.quick else DEFAULT_CALLS)
    rounds = options.rounds or (1 if options.quick else DEFAULT_ROUNDS)
    pinned = {CALLER_CPU, GATEWAY_CPU} <= available_cpus()
    figures: dict[str, float] = {
        "gateway_calls_per_measurement": calls,
        "gateway_rounds": rounds,
        "gateway_load_average_1min_at_start": os.getloadavg()[0],
    }
    gateway_cpu = GATEWAY_CPU if pinned else None
    async with (
        _fixed_server(SERVER_CPU if pinned else None) as target,
        gateway_process(target.url, gateway_cpu, client="reqwest") as gateway,
        gateway_process(target.url, gateway_cpu, client="reqwest", lane=False) as no_lane,
        gateway_process(target.url, gateway_cpu) as aiohttp_gateway,
        aiohttp_floor_process(gateway_cpu) as floor_server,
        dispatcher_client(target.url) as direct,
        gateway_client(gateway.url) as through_gateway,
        gateway_client(no_lane.url) as through_no_lane,
        gateway_client(aiohttp_gateway.url) as through_aiohttp_gateway,
        gateway_client(floor_server.url) as floor,
    ):
        paths = {
            "gateway": (through_gateway, gateway.pid),
            "no_lane": (through_no_lane, no_lane.pid),
            "aiohttp_client": (through_aiohttp_gateway, aiohttp_gateway.pid),
            "floor": (floor, floor_server.pid),
        }
        for call in (direct, through_gateway, through_no_lane, through_aiohttp_gateway, floor):
            await measure(call, 4 * 64, 64)  # open every pooled connection first
        c1 = _Figures()
        c64 = _Figures()
        me = os.getpid()
        for round_index in range(rounds):
            # c1, the caller apart: the function server joins the gateway on its core.
            with _pinned(me, CALLER_CPU, pinned), _pinned(target.pid, GATEWAY_CPU, pinned):
                for name, (call, pid) in _rotated(paths, round_index):
                    p50, pairs = await measure_paired(call, direct, calls)
                    c1.add(f"{name}_p50_added_us", p50)
                    c1.add(f"{name}_median_added_us_per_call", pairs)
                    sample, cpu = await _measure_cpu(call, calls, 1, pid)
                    c1.add(f"{name}_p50_us", sample.p50_us)
                    c1.add(f"{name}_cpu_us_per_call", cpu)
                direct_sample = await measure(direct, calls, 1)
                c1.add("direct_cpu_us_per_call", direct_sample.cpu_us_per_call)
            # c1 the old way: the caller beside the function server, the gateway apart.
            with _pinned(me, SERVER_CPU, pinned):
                for name in ("aiohttp_client", "floor"):
                    c1.add(
                        f"{name}_old_layout",
                        (await measure_paired(paths[name][0], direct, calls))[0],
                    )
            # c64: the caller beside the function server, the gateway's core its own.
            every = {"direct": (direct, me), **paths}
            for name, (call, pid) in _rotated(every, round_index):
                with _pinned(me, GATEWAY_CPU if name == "direct" else CALLER_CPU, pinned):
                    await measure(call, 4 * 64, 64)
                    sample, cpu = await _measure_cpu(call, calls, 64, pid)
                if name == "direct":  # this process: its own clock, which skips measure's gc
                    cpu = sample.cpu_us_per_call
                c64.add(f"{name}_calls_per_s", sample.calls_per_s)
                c64.add(f"{name}_p50_us", sample.p50_us)
                c64.add(f"{name}_p99_us", sample.p99_us)
                c64.add(f"{name}_cpu_us_per_call", cpu)
            for name in paths:
                ratio = c64.last(f"{name}_calls_per_s") / c64.last("direct_calls_per_s")
                c64.add(f"{name}_ratio_to_direct", ratio)
            # The handler's own, on aiohttp.web: the gateway without the lane, less the
            # bare aiohttp.web server and the direct caller (the dispatcher and its client).
            own = c64.last("no_lane_cpu_us_per_call") - c64.last("floor_cpu_us_per_call")
            c64.add("own_cpu_us_per_call", own - c64.last("direct_cpu_us_per_call"))
            saved = c64.last("no_lane_cpu_us_per_call") - c64.last("gateway_cpu_us_per_call")
            c64.add("lane_saved_cpu_us_per_call", saved)
    figures.update(_named(c1.medians(), c64.medians()))
    figures["gateway_load_average_1min_at_end"] = os.getloadavg()[0]
    return figures


class _Figures:
    """Each figure's value in every round, for the median over rounds."""

    def __init__(self) -> None:
        self.rounds: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.rounds.setdefault(name, []).append(value)

    def last(self, name: str) -> float:
        return self.rounds[name][-1]

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.rounds.items()}


def _named(c1: dict[str, float], c64: dict[str, float]) -> dict[str, float]:
    """The results.json keys: those of the first version of this benchmark kept for the
    same meaning (now measured as the docstring says), the new ones beside them."""
    return {
        "gateway_c1_p50_added_us": c1["gateway_p50_added_us"],
        "gateway_c1_median_added_us_per_call": c1["gateway_median_added_us_per_call"],
        "gateway_c1_p50_us": c1["gateway_p50_us"],
        "gateway_c1_gateway_cpu_us_per_call": c1["gateway_cpu_us_per_call"],
        "gateway_c1_direct_cpu_us_per_call": c1["direct_cpu_us_per_call"],
        "gateway_c1_aiohttp_client_p50_added_us": c1["aiohttp_client_p50_added_us"],
        "gateway_c1_aiohttp_client_gateway_cpu_us_per_call": c1["aiohttp_client_cpu_us_per_call"],
        "gateway_c1_old_method_p50_added_us": c1["aiohttp_client_old_layout"],
        "gateway_aiohttp_floor_c1_p50_added_us": c1["floor_p50_added_us"],
        "gateway_aiohttp_floor_c1_cpu_us_per_call": c1["floor_cpu_us_per_call"],
        "gateway_aiohttp_floor_c1_old_layout_p50_added_us": c1["floor_old_layout"],
        "gateway_c64_calls_per_s": c64["gateway_calls_per_s"],
        "gateway_c64_p50_us": c64["gateway_p50_us"],
        "gateway_c64_p99_us": c64["gateway_p99_us"],
        "gateway_c64_ratio_to_direct": c64["gateway_ratio_to_direct"],
        "gateway_c64_gateway_cpu_us_per_call": c64["gateway_cpu_us_per_call"],
        "gateway_c64_own_cpu_us_per_call": c64["own_cpu_us_per_call"],
        "gateway_direct_c64_calls_per_s": c64["direct_calls_per_s"],
        "gateway_direct_c64_cpu_us_per_call": c64["direct_cpu_us_per_call"],
        "gateway_c1_no_lane_p50_added_us": c1["no_lane_p50_added_us"],
        "gateway_c1_no_lane_gateway_cpu_us_per_call": c1["no_lane_cpu_us_per_call"],
        "gateway_c64_no_lane_ratio_to_direct": c64["no_lane_ratio_to_direct"],
        "gateway_c64_no_lane_calls_per_s": c64["no_lane_calls_per_s"],
        "gateway_c64_no_lane_gateway_cpu_us_per_call": c64["no_lane_cpu_us_per_call"],
        "gateway_c64_lane_saved_cpu_us_per_call": c64["lane_saved_cpu_us_per_call"],
        "gateway_c64_aiohttp_client_ratio_to_direct": c64["aiohttp_client_ratio_to_direct"],
        "gateway_c64_aiohttp_client_calls_per_s": c64["aiohttp_client_calls_per_s"],
        "gateway_c64_aiohttp_client_gateway_cpu_us_per_call": c64["aiohttp_client_cpu_us_per_call"],
        "gateway_aiohttp_floor_c64_calls_per_s": c64["floor_calls_per_s"],
        "gateway_aiohttp_floor_c64_cpu_us_per_call": c64["floor_cpu_us_per_call"],
    }


def _rotated(paths: dict[str, Any], round_index: int) -> list[tuple[str, Any]]:
    items = list(paths.items())
    shift = round_index % len(items)
    return items[shift:] + items[:shift]


async def _measure_cpu(call: Call, calls: int, concurrency: int, pid: int) -> tuple[Sample, float]:
    """``measure``, and the CPU time per call of process ``pid`` meanwhile, in us."""
    before = process_cpu_ns(pid)
    sample = await measure(call, calls, concurrency)
    return sample, (process_cpu_ns(pid) - before) / calls / 1000


def process_cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far (threads that ended are not counted)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total


@contextlib.contextmanager
def _pinned(pid: int, cpu: int, pinning: bool) -> Iterator[None]:
    """Every thread of ``pid`` on ``cpu`` for the block (nothing when not ``pinning``)."""
    if not pinning:
        yield
        return
    tasks = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    before = {task: os.sched_getaffinity(task) for task in tasks}
    for task in tasks:
        os.sched_setaffinity(task, {cpu})
    try:
        yield
    finally:
        for task, mask in before.items():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(task, mask)


@contextlib.asynccontextmanager
async def _fixed_server(cpu: int | None) -> AsyncIterator[Listening]:
    async with fixed_reply_server(cpu) as url:
        yield Listening(url, _pid_listening_on(url))


def _pid_listening_on(url: str) -> int:
    """The pid of the process listening on ``url``'s port: our child that serves it."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    sockets = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            sockets.add(f"socket:[{fields[9]}]")
    for process in Path("/proc").iterdir():
        if not process.name.isdigit() or int(process.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for descriptor in (process / "fd").iterdir():
                if os.readlink(descriptor) in sockets:
                    return int(process.name)
    raise RuntimeError(f"no process of ours listens on {url}")


@contextlib.asynccontextmanager
async def aiohttp_floor_process(cpu: int | None) -> AsyncIterator[Listening]:
    """``bench._aiohttp_server``: aiohttp.web answering a fixed envelope, no dispatcher."""
    async with _listening([sys.executable, "-m", "bench._aiohttp_server"], cpu) as server:
        yield server


@contextlib.asynccontextmanager
async def _listening(arguments: list[str], cpu: int | None) -> AsyncIterator[Listening]:
    process = await asyncio.create_subprocess_exec(
        *arguments, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    if cpu is not None:
        os.sched_setaffinity(process.pid, {cpu})
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        if not line.startswith("listening on "):
            raise RuntimeError(f"{arguments} did not start: {line!r}")
        yield Listening(line.split()[-1], process.pid)
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)


@contextlib.asynccontextmanager
async def gateway_process(
    target_url: str, cpu: int | None, *, client: str | None = None, lane: bool = True
) -> AsyncIterator[Listening]:
    """``dispatcher serve`` on a manifest whose ``bench.echo`` is ``target_url`` (over
    ``client``, the provider's default when None; without the call lane unless ``lane``)."""
    target = {"provider": "http", "url": target_url}
    if client is not None:
        target["client"] = client
    manifest = {
        "version": 1,
        "plugins": [
            {
                "id": "bench",
                "version": "1.0.0",
                "target": target,
                "methods": {"echo": {}},
            }
        ],
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plugins.yaml"
        path.write_text(yaml.safe_dump(manifest))
        command = [sys.executable, "-m", "dispatcher.cli", "-m", str(path), "serve", "--port", "0"]
        if not lane:
            command.append("--no-call-lane")
        async with _listening(command, cpu) as server:
            yield server


@contextlib.asynccontextmanager
async def gateway_client(url: str) -> AsyncIterator[Call]:
    """The caller of every HTTP server measured here: pyreqwest, the cheapest client
    measured (bench_http), so that its own CPU bounds the figures as little as it can (at
    c64 it shares CPU 0 with the function server)."""
    from datetime import timedelta

    from pyreqwest.client import ClientBuilder

    body = orjson.dumps({"text": "hi"})
    call_url = f"{url}/v1/plugins/bench/methods/echo"
    headers = {"Content-Type": "application/json"}
    # Idle connections are dropped here before the gateway drops them (its header timeout,
    # 10 s): a call must not race the server closing the connection it reuses.
    builder = (
        ClientBuilder()
        .follow_redirects(False)
        .gzip(False)
        .max_connections(512)
        .pool_idle_timeout(timedelta(seconds=5))
    )
    async with builder.build() as client:

        async def call() -> Any:
            request = client.post(call_url).headers(headers).body_bytes(body).build()
            response = await request.send()
            payload = (await response.bytes()).to_bytes()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
            return orjson.loads(payload)["result"]

        yield call
