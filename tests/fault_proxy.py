"""A TCP proxy the tests control, between the dispatcher and a plugin, to break the wire.

``drop()`` closes every connection through it (a FIN to both sides); ``delay`` holds each
chunk that long; ``blackhole()`` stops forwarding and keeps the sockets open (a half-open
peer: no FIN ever comes); ``cut_next(direction)`` forwards half of the next chunk going
that way and then closes both sides (a frame cut in half); ``forwarded`` counts the bytes
it passed on each way (what a compressed connection saves shows there). Real sockets on
loopback; it owns its tasks and ends them in ``aclose``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

Direction = Literal["to_plugin", "to_host"]


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = 0.0
        self.connections = 0
        #: Bytes passed on so far, by direction (``to_plugin``: from whoever connected).
        self.forwarded: dict[Direction, int] = {"to_plugin": 0, "to_host": 0}
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._cut: set[Direction] = set()
        self.refusing = False
        self._closing = False

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def drop(self) -> None:
        for client, upstream in list(self._pairs):
            for writer in (client, upstream):
                with contextlib.suppress(Exception):
                    writer.close()
        self._pairs.clear()

    def blackhole(self) -> None:
        self._open.clear()

    def restore(self) -> None:
        self._open.set()

    def cut_next(self, direction: Direction) -> None:
        self._cut.add(direction)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Owned like the pipes: a connection accepted as ``aclose`` ran was left open
        # (its socket then reported unclosed when the loop closed).
        handler = asyncio.current_task()
        if handler is not None:
            self._tasks.add(handler)
            handler.add_done_callback(self._tasks.discard)
        if self._closing or self.refusing or not self._open.is_set():
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except (OSError, asyncio.CancelledError):
            writer.close()
            return
        if self._closing:
            writer.close()
            up_writer.close()
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for source, sink, direction in (
            (reader, up_writer, "to_plugin"),
            (up_reader, writer, "to_host"),
        ):
            task = asyncio.get_running_loop().create_task(
                self._pipe(source, sink, direction, pair)  # type: ignore[arg-type]
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        direction: Direction,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while True:
                chunk = await source.read(65536)
                if not chunk:
                    break
                await self._open.wait()  # blackholed: hold everything, close nothing
                if self.delay:
                    await asyncio.sleep(self.delay)
                if direction in self._cut and len(chunk) > 1:
                    self._cut.discard(direction)
                    sink.write(chunk[: len(chunk) // 2])
                    await sink.drain()
                    break
                sink.write(chunk)
                self.forwarded[direction] += len(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for writer in pair:
                with contextlib.suppress(Exception):
                    writer.close()
            self._pairs.discard(pair)
