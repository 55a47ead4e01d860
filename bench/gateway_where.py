"""Where a gateway call's time goes: CPU and context switches of each process per call.

``python -m bench.gateway_where [--calls N] [--rounds R]`` runs the fixed-reply server,
a ``dispatcher serve`` gateway and this process (the client) under several CPU layouts,
and for each, at concurrency 1, prints per call: the wall time (p50), the CPU time of
every process (all its threads, from ``/proc/PID/task/*/schedstat``) and their context
switches. The same is measured for the direct path (``Dispatcher.call`` in this process)
and for the bare aiohttp.web floor. Not a benchmark of its own (no goals, nothing
recorded): the instrument behind ``docs/gateway.md``'s "Where a call's time goes".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import uvloop

from bench.bench_gateway import (
    _pid_listening_on,
    aiohttp_floor_process,
    gateway_client,
    gateway_process,
)
from bench.bench_http import Call, dispatcher_client, fixed_reply_server, measure


def _usage(pid: int) -> tuple[int, int]:
    """(CPU ns, context switches) of every thread of ``pid`` so far."""
    cpu = switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            cpu += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
    return cpu, switches


@contextlib.contextmanager
def _affinity(pid: int, cpu: int | None) -> Iterator[None]:
    """Pin every thread of ``pid`` to ``cpu`` (None: both CPUs) for the block."""
    cpus = {cpu} if cpu is not None else set(range(os.cpu_count() or 1))
    tasks = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    before = {task: os.sched_getaffinity(task) for task in tasks}
    for task in tasks:
        os.sched_setaffinity(task, cpus)
    try:
        yield
    finally:
        for task, mask in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(task, mask)


async def _profile(call: Call, calls: int, pids: dict[str, int]) -> dict[str, float]:
    before = {name: _usage(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    sample = await measure(call, calls, 1)
    wall = time.perf_counter() - started
    row = {"p50_us": sample.p50_us, "p99_us": sample.p99_us, "wall_us": wall / calls * 1e6}
    for name, pid in pids.items():
        cpu, switches = _usage(pid)
        row[f"{name}_cpu_us"] = (cpu - before[name][0]) / calls / 1000
        row[f"{name}_switches"] = (switches - before[name][1]) / calls
    return row


LAYOUTS = {
    # name: (client CPU, function server CPU, gateway CPU); None = either CPU
    "bench (client+server on 0, gateway on 1)": (0, 0, 1),
    "client on 1 with the gateway, server on 0": (1, 0, 1),
    "client on 0, gateway and server on 1": (0, 1, 1),
    "all on CPU 1": (1, 1, 1),
    "unpinned": (None, None, None),
}


async def main(calls: int, rounds: int, client: str | None) -> None:
    me = os.getpid()
    print(f"load average at start: {os.getloadavg()[0]:.2f}; gateway client: {client}")
    async with (
        fixed_reply_server(None) as target_url,
        gateway_process(target_url, None, client=client) as gateway,
        gateway_process(target_url, None, client="reqwest") as reqwest_gateway,
        gateway_client(reqwest_gateway.url) as through_reqwest_gateway,
        dispatcher_client(target_url) as direct,
        gateway_client(gateway.url) as through_gateway,
        aiohttp_floor_process(None) as floor_server,
        gateway_client(floor_server.url) as floor,
    ):
        server_pid = _pid_listening_on(target_url)
        gateway_pid = gateway.pid
        floor_pid = floor_server.pid
        reqwest_gateway_pid = reqwest_gateway.pid
        for call in (direct, through_gateway, floor, through_reqwest_gateway):
            await measure(call, 256, 64)
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(rounds):
            for layout, (client_cpu, server_cpu, gateway_cpu) in LAYOUTS.items():
                with (
                    _affinity(me, client_cpu),
                    _affinity(server_pid, server_cpu),
                    _affinity(gateway_pid, gateway_cpu),
                    _affinity(floor_pid, gateway_cpu),
                    _affinity(reqwest_gateway_pid, gateway_cpu),
                ):
                    for name, call, pids in (
                        ("direct", direct, {"client": me, "server": server_pid}),
                        (
                            "gateway",
                            through_gateway,
                            {"client": me, "gateway": gateway_pid, "server": server_pid},
                        ),
                        ("floor", floor, {"client": me, "floor": floor_pid}),
                        (
                            "gateway reqwest",
                            through_reqwest_gateway,
                            {"client": me, "gateway": reqwest_gateway_pid, "server": server_pid},
                        ),
                    ):
                        await measure(call, 200, 1)
                        results.setdefault((layout, name), []).append(
                            await _profile(call, calls, pids)
                        )
        for (layout, name), rows in results.items():
            keys = rows[0].keys()
            shown = ", ".join(
                f"{key} {statistics.median(r[key] for r in rows):.1f}" for key in keys
            )
            print(f"{layout:42s} {name:16s} {shown}")
        print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client", default=None, help="the gateway's HTTP client")
    options = parser.parse_args()
    uvloop.run(main(options.calls, options.rounds, options.client))
