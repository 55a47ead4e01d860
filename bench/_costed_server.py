"""An HTTP function that costs a fixed time per invocation, whatever it carries.

It models one function instance doing serial work: each request, single or batch, holds
the instance for ``--cost-ms`` (2 ms by default) before it answers, one request at a time.
Every item gets ``{"ok": true, "result": <its params>}``, so callers can check they got
their own answer. Raw ``asyncio.Protocol`` with httptools on uvloop, like ``_fixed_server``.

Run as ``python -m bench._costed_server [--cpu N] [--cost-ms MS]``; prints ``PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

import httptools
import orjson
import uvloop


class CostedFunction(asyncio.Protocol):
    def __init__(self, instance: asyncio.Lock, cost: float) -> None:
        self.instance = instance
        self.cost = cost
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        payload, self.body = b"".join(self.body), []
        asyncio.get_running_loop().create_task(self.answer(payload))

    async def answer(self, payload: bytes) -> None:
        request = orjson.loads(payload)
        async with self.instance:  # one invocation at a time, each costing `cost`
            await asyncio.sleep(self.cost)
        if "batch" in request:
            reply = {
                "results": [{"ok": True, "result": item["params"]} for item in request["batch"]]
            }
        else:
            reply = {"ok": True, "result": request["params"]}
        body = orjson.dumps(reply)
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body)
            + body
        )


async def serve(cpu: int | None, cost_ms: float) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    loop = asyncio.get_running_loop()
    instance = asyncio.Lock()
    server = await loop.create_server(
        lambda: CostedFunction(instance, cost_ms / 1000), "127.0.0.1", 0, backlog=1024
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
    parser.add_argument("--cost-ms", type=float, default=2.0)
    options = parser.parse_args()
    uvloop.run(serve(options.cpu, options.cost_ms))


if __name__ == "__main__":
    main()
