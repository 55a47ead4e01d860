"""An HTTP function with a latency tail: ``--delay-ms`` per call, ``--slow-ms`` on every
``--slow-every``-th call (0: never), and a count of the calls it was sent.

Models one instance of a fleet that is now and then slow (a GC pause, a cold cache, a
noisy neighbour). The slow calls are every n-th rather than random so that runs with and
without hedging meet the same tail. ``GET /count`` answers ``{"calls": N}``: the load the
instance saw, hedges included. A client that hangs up gets no answer and costs nothing
more (its pending answer is cancelled). Raw ``asyncio.Protocol`` with httptools on uvloop,
like ``_fixed_server``.

Run as ``python -m bench._tail_server [--cpu N] [--delay-ms MS] [--slow-ms MS]
[--slow-every N]``; prints ``PORT``, serves until SIGTERM or EOF on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

import httptools
import uvloop

REPLY_BODY = b'{"ok":true,"result":{"text":"hi"}}'


def _response(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body)
        + body
    )


class Instance:
    """What the connections of one server share: the settings and the count of calls."""

    def __init__(self, delay: float, slow: float, slow_every: int) -> None:
        self.delay = delay
        self.slow = slow
        self.slow_every = slow_every
        self.calls = 0

    def next_delay(self) -> float:
        self.calls += 1
        if self.slow_every and self.calls % self.slow_every == 0:
            return self.slow
        return self.delay


class TailFunction(asyncio.Protocol):
    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.answering: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answering is not None:
            self.answering.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self.parser.get_method() == b"GET":
            self.transport.write(_response(b'{"calls":%d}' % self.instance.calls))
            return
        delay = self.instance.next_delay()
        self.answering = asyncio.get_running_loop().create_task(self.answer(delay))

    async def answer(self, delay: float) -> None:
        await asyncio.sleep(delay)
        assert self.transport is not None
        self.transport.write(_response(REPLY_BODY))
        self.answering = None


async def serve(cpu: int | None, instance: Instance, backlog: int = 1024) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: TailFunction(instance), "127.0.0.1", 0, backlog=backlog
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    with contextlib.suppress(OSError):
        loop.add_reader(sys.stdin.fileno(), stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--slow-ms", type=float, default=500.0)
    parser.add_argument("--slow-every", type=int, default=0)
    # Thousands of connections opened at once overflow a short accept queue: the kernel
    # drops their SYNs and the clients retry a second later (bench_http_inflight).
    parser.add_argument("--backlog", type=int, default=1024)
    options = parser.parse_args()
    instance = Instance(options.delay_ms / 1000, options.slow_ms / 1000, options.slow_every)
    uvloop.run(serve(options.cpu, instance, options.backlog))


if __name__ == "__main__":
    main()
