"""Async jobs on Redis Streams: how fast jobs are submitted and run, end to end.

A real ``redis-server`` started here (loopback, no persistence); the example plugin
in-process (``provider: local``), so what is measured is the job machinery and nothing of
a network target. Every figure is the median of interleaved rounds:

* ``jobs_submit_per_s``: ``Dispatcher.submit`` with 64 submissions in flight (method
  checked, params validated, record and stream entry written in one transaction).
* ``jobs_e2e_per_s``: N jobs submitted while ``W`` workers (``jobs: {workers: W}``, one
  dispatcher) run them; from the first submission to the last job stored as succeeded.
* ``jobs_raw_submit_per_s``, ``jobs_raw_e2e_per_s``: the same work with redis-py alone,
  in the same run: a pipeline of HSET + XADD per job; ``W`` consumers of XREADGROUP that
  call the plugin object directly, then store the result and XACK in one pipeline. What
  the raw loop leaves out is what the dispatcher adds: attempts counted before a run, the
  method's chain, retries, dead letters, claim of stale entries, result notifications.
* ``jobs_{submit,e2e}_vs_raw_ratio``: the dispatcher's figure over the raw one (1.0: no cost).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from bench._core import ROOT, Options, example_plugin
from dispatcher import Dispatcher
from dispatcher.config import parse_manifest

SUBMITTERS = 64
WORKERS = 4
#: A round that takes longer than this is stuck, not slow: it fails the benchmark.
DEADLINE_SECONDS = 300.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _manifest(url: str, prefix: str, workers: int) -> Any:
    return parse_manifest(
        {
            "version": 1,
            "state": {"backend": "redis", "url": url, "key_prefix": prefix, "op_timeout_ms": 2000},
            "jobs": {"workers": workers, "batch": 16},
            "plugins": [
                example_plugin(
                    {
                        "say": {
                            "params_schema": {
                                "type": "object",
                                "properties": {"text": {"type": "string"}},
                                "required": ["text"],
                            }
                        }
                    }
                )
            ],
        },
        base_dir=ROOT,
    )


async def _in_parallel(count: int, parallel: int, one: Any) -> None:
    numbers = iter(range(count))

    async def lane() -> None:
        for number in numbers:
            await one(number)

    await asyncio.gather(*(lane() for _ in range(parallel)))


async def _submit_rate(dispatcher: Dispatcher, jobs: int) -> float:
    async def one(number: int) -> None:
        await dispatcher.submit("echo", "say", {"text": f"t{number}"})

    started = time.perf_counter()
    await _in_parallel(jobs, SUBMITTERS, one)
    return jobs / (time.perf_counter() - started)


async def _e2e_rate(dispatcher: Dispatcher, jobs: int) -> float:
    workers = dispatcher.jobs
    assert workers is not None
    counts = workers.counts
    before = counts["succeeded"] + counts["failed"] + counts["dead"]
    started = time.perf_counter()
    await _submit_rate(dispatcher, jobs)
    await _until(
        lambda: counts["succeeded"] + counts["failed"] + counts["dead"] - before >= jobs,
        "the dispatcher's jobs",
    )
    if counts["failed"] or counts["dead"]:
        raise RuntimeError(f"jobs failed on a loaded Redis: {workers.stats()}")
    return jobs / (time.perf_counter() - started)


async def _until(done: Callable[[], bool], what: str) -> None:
    # Polling a counter: nothing signals it, and 2 ms is small against a run of seconds.
    async with asyncio.timeout(DEADLINE_SECONDS):
        while not done():  # noqa: ASYNC110
            await asyncio.sleep(0.002)


class _RawJobs:
    """The same jobs with redis-py alone: the baseline of the same run."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        from echo_plugin import EchoPlugin

        self.client = client
        self.stream = f"{prefix}:jobs"
        self.prefix = prefix
        self.plugin = EchoPlugin()
        self.done = 0

    async def start(self) -> None:
        await self.plugin.init({})
        await self.client.xgroup_create(self.stream, "workers", "0", mkstream=True)

    async def submit(self, number: int) -> None:
        job_id = f"raw-{number}-{time.perf_counter_ns()}"
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(
                f"{self.prefix}:job:{job_id}",
                mapping={"params": f'{{"text":"t{number}"}}', "state": "queued"},
            )
            pipe.xadd(self.stream, {"job": job_id})
            await pipe.execute()

    async def consume(self, name: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            answer = await self.client.xreadgroup(
                "workers", name, {self.stream: ">"}, count=16, block=50
            )
            for _stream, entries in answer or ():
                await asyncio.gather(*(self._run(entry) for entry in entries))

    async def _run(self, entry: Any) -> None:
        entry_id, fields = entry
        job_id = fields[b"job"].decode()
        key = f"{self.prefix}:job:{job_id}"
        params = await self.client.hget(key, "params")
        assert params is not None
        result = await self.plugin.say(text=params.decode())
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"state": "succeeded", "result": str(result)})
            pipe.xack(self.stream, "workers", entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()
        self.done += 1

    async def e2e(self, jobs: int) -> float:
        stop = asyncio.Event()
        consumers = [asyncio.create_task(self.consume(f"c{i}", stop)) for i in range(WORKERS)]
        done_before = self.done
        started = time.perf_counter()
        try:
            await _in_parallel(jobs, SUBMITTERS, self.submit)
            await _until(
                lambda: self.done - done_before >= jobs or any(c.done() for c in consumers),
                "the raw jobs",
            )
            elapsed = time.perf_counter() - started
        finally:
            stop.set()
            await asyncio.gather(*consumers)  # a consumer's failure is raised here
        return jobs / elapsed


async def run(options: Options) -> dict[str, float]:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed: run `make services-prereqs`")
    jobs = options.calls or (200 if options.quick else 2000)
    rounds = options.rounds or (1 if options.quick else 3)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as folder:
        process = await asyncio.create_subprocess_exec(
            server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", folder,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await asyncio.sleep(0.3)
            return await _measure(f"redis://127.0.0.1:{port}/0", jobs, rounds)
        finally:
            process.kill()
            await process.wait()


async def _measure(url: str, jobs: int, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {}
    submitter = Dispatcher(_manifest(url, "submit-only", 0))
    running = Dispatcher(_manifest(url, "e2e", WORKERS))
    # A blocking pool of 64, as the dispatcher's (state.pool_size): a call waits for a
    # free connection instead of failing.
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=10)
    async with submitter, running, aioredis.Redis(connection_pool=pool) as client:
        raw = _RawJobs(client, "raw")
        await raw.start()
        raw_submits = _RawJobs(client, "raw-submit")  # a stream nobody reads, like submitter's
        await _submit_rate(submitter, 100)  # warm: scripts loaded, pools open
        await _e2e_rate(running, 100)
        await raw.e2e(100)
        for _ in range(rounds):
            samples.setdefault("jobs_submit_per_s", []).append(await _submit_rate(submitter, jobs))
            started = time.perf_counter()
            await _in_parallel(jobs, SUBMITTERS, raw_submits.submit)
            samples.setdefault("jobs_raw_submit_per_s", []).append(
                jobs / (time.perf_counter() - started)
            )
            samples.setdefault("jobs_e2e_per_s", []).append(await _e2e_rate(running, jobs))
            samples.setdefault("jobs_raw_e2e_per_s", []).append(await raw.e2e(jobs))
        assert running.stats()["state"]["fallbacks"] == 0, "Redis must have answered every step"
    figures = {name: statistics.median(values) for name, values in samples.items()}
    figures["jobs_submit_vs_raw_ratio"] = (
        figures["jobs_submit_per_s"] / figures["jobs_raw_submit_per_s"]
    )
    figures["jobs_e2e_vs_raw_ratio"] = figures["jobs_e2e_per_s"] / figures["jobs_raw_e2e_per_s"]
    return figures
