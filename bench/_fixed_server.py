"""A fixed-reply HTTP/1.1 server that costs the benchmark as little as possible.

It answers every request, whatever its path and body, with the same canned response
envelope, keeping the connection alive. Built on a raw ``asyncio.Protocol`` over uvloop
with httptools' parser (no framework, no ASGI), so on its own core it serves several times
the calls/s of any Python client on the other: the client side is what gets measured.

Run as ``python -m bench._fixed_server [--cpu N]``; it binds 127.0.0.1 on a free port,
prints ``PORT`` on one line once it is listening, and serves until SIGTERM or EOF on stdin.
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
REPLY = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(REPLY_BODY)).encode() + b"\r\n"
    b"\r\n" + REPLY_BODY
)


class FixedReply(asyncio.Protocol):
    __slots__ = ("parser", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(REPLY)


async def serve(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FixedReply, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Also end with the parent: it holds our stdin (a pipe), which reaches EOF however it
    # dies. A terminal or a file as stdin cannot be watched; SIGTERM still works then.
    with contextlib.suppress(OSError):
        loop.add_reader(sys.stdin.fileno(), stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=int, default=None, help="pin the server to this CPU")
    options = parser.parse_args()
    uvloop.run(serve(options.cpu))


if __name__ == "__main__":
    main()
