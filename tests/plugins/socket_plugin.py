"""The plugin the WebSocket tests serve: echoes, sleeps, streams, emits, records."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from linchkit_plugin import Plugin, current_context


class SocketPlugin(Plugin):
    id = "sock"
    version = "1.0.0"

    def __init__(self) -> None:
        #: request_id of every call that ran, in order: a duplicate shows here.
        self.ran: list[str] = []
        self.received: list[tuple[str, Any]] = []
        self.cancelled = 0

    async def echo(self, value: Any = None) -> Any:
        self.ran.append(current_context().get("request_id", ""))
        return value

    async def sleep(self, seconds: float, value: Any = None) -> Any:
        self.ran.append(current_context().get("request_id", ""))
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return value

    async def count(self, n: int) -> AsyncIterator[int]:
        for index in range(n):
            yield index

    async def burst(self, name: str, count: int) -> int:
        for index in range(count):
            self.emit(name, {"n": index})
        return count

    async def fail(self, message: str = "no") -> None:
        raise LookupError(message)

    async def on_event(self, event: str, data: Any) -> None:
        self.received.append((event, data))
