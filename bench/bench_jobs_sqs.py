"""Async jobs on SQS: jobs per second end to end, against a raw aiobotocore client.

Both sides talk to the same ``moto_server`` started here (loopback), so what the ratio
shows is the dispatcher's share of the cost, not SQS's (moto, a Python server, is the
bottleneck of both; real SQS answers in milliseconds over a network instead):

* ``jobs_sqs_raw_per_s``: the bare work of a job's messages with aiobotocore: 16
  concurrent senders and, meanwhile, 4 consumers receiving 10 at a time and deleting them.
* ``jobs_sqs_per_s``: ``d.submit`` from 16 concurrent callers, 4 dispatcher workers
  (batch 10) running each job through the echo plugin's chain (in-process) and deleting
  it; timed until every job has succeeded. No job view (``state`` is memory): the queue's
  path alone.
* ``jobs_sqs_ratio``: the second over the first (1.0: the dispatcher adds nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench._core import ROOT, Goal, Options, example_plugin
from dispatcher import Dispatcher
from dispatcher.config import parse_manifest

REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": REGION,
}
SENDERS = 16
CONSUMERS = 4

GOALS = {
    # The same requests as the raw loop plus a chain run per job: most of the raw rate.
    "jobs_sqs_ratio": Goal(">=", 0.5),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _manifest(endpoint: str, queue: str, dead: str) -> Any:
    return parse_manifest(
        {
            "version": 1,
            "jobs": {
                "backend": "sqs",
                "workers": CONSUMERS,
                "batch": 10,
                "sqs": {
                    "queue_name": queue,
                    "dead_letter_queue_name": dead,
                    "region": REGION,
                    "endpoint_url": endpoint,
                    "receive_wait_seconds": 1,
                },
            },
            "plugins": [example_plugin({"say": {}})],
        },
        base_dir=ROOT,
    )


async def _spread(count: int, workers: int, work: Any) -> None:
    numbers = iter(range(count))

    async def worker() -> None:
        for number in numbers:
            await work(number)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def _raw_per_s(client: Any, url: str, jobs: int) -> float:
    started = time.perf_counter()

    async def send(number: int) -> None:
        await client.send_message(QueueUrl=url, MessageBody=f'{{"text":"t{number}"}}')

    done = 0
    finished = asyncio.Event()
    ended_at = 0.0

    async def consume() -> None:
        # As the dispatcher's workers do: a batch of up to 10, its deletes concurrent.
        nonlocal done, ended_at
        while not finished.is_set():
            answer = await client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, VisibilityTimeout=30
            )
            messages = answer.get("Messages", [])
            await asyncio.gather(
                *(
                    client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
                    for m in messages
                )
            )
            done += len(messages)
            if done >= jobs and not finished.is_set():
                ended_at = time.perf_counter()
                finished.set()

    # Senders and consumers at once, as submitters and the dispatcher's workers run.
    await asyncio.gather(_spread(jobs, SENDERS, send), *(consume() for _ in range(CONSUMERS)))
    return jobs / (ended_at - started)


async def _dispatcher_per_s(dispatcher: Dispatcher, jobs: int) -> float:
    workers = dispatcher.jobs
    assert workers is not None
    before = workers.counts["succeeded"]
    started = time.perf_counter()

    async def submit(number: int) -> None:
        await dispatcher.submit("echo", "say", {"text": f"t{number}"})

    await _spread(jobs, SENDERS, submit)
    while True:  # the workers count what they finish; no event to wait on
        if workers.counts["succeeded"] - before >= jobs:
            break
        await asyncio.sleep(0.005)
    return jobs / (time.perf_counter() - started)


async def run(options: Options) -> dict[str, float]:
    server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    jobs = options.calls or (100 if options.quick else 1000)
    rounds = options.rounds or (1 if options.quick else 3)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    process = await asyncio.create_subprocess_exec(
        server, "-H", "127.0.0.1", "-p", str(port),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _listening(port)
        return await _measure(endpoint, jobs, rounds)
    finally:
        process.kill()
        await process.wait()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def _listening(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("moto_server did not listen within 60 s")


async def _measure(endpoint: str, jobs: int, rounds: int) -> dict[str, float]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    tag = uuid.uuid4().hex[:8]
    # The dispatcher's own client settings (dispatcher/state/sqs_queue.py): a fair race.
    config = AioConfig(max_pool_connections=64, retries={"max_attempts": 1, "mode": "standard"})
    async with get_session().create_client(
        "sqs", region_name=REGION, endpoint_url=endpoint, config=config
    ) as client:
        raw_url = (await client.create_queue(QueueName=f"raw-{tag}"))["QueueUrl"]
        await client.create_queue(QueueName=f"jobs-{tag}")
        await client.create_queue(QueueName=f"jobs-{tag}-dead")
        samples: dict[str, list[float]] = {}
        async with Dispatcher(_manifest(endpoint, f"jobs-{tag}", f"jobs-{tag}-dead")) as d:
            await _raw_per_s(client, raw_url, 50)  # warm both: imports, pools
            await _dispatcher_per_s(d, 50)
            for _ in range(rounds):
                samples.setdefault("jobs_sqs_raw_per_s", []).append(
                    await _raw_per_s(client, raw_url, jobs)
                )
                samples.setdefault("jobs_sqs_per_s", []).append(await _dispatcher_per_s(d, jobs))
    figures = {name: statistics.median(values) for name, values in samples.items()}
    figures["jobs_sqs_ratio"] = figures["jobs_sqs_per_s"] / figures["jobs_sqs_raw_per_s"]
    return figures
