"""Test plugins that record what the host did to them."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from linchkit_plugin import Plugin

EVENTS: list[str] = []


class RecordingPlugin(Plugin):
    async def init(self, config: dict[str, Any]) -> None:
        EVENTS.append(f"init {config}")

    async def start(self) -> None:
        EVENTS.append("start")

    async def stop(self) -> None:
        EVENTS.append("stop")

    async def destroy(self) -> None:
        EVENTS.append("destroy")

    def blocking(self, seconds: float) -> str:
        """Sync and blocking: must run off the event loop."""
        time.sleep(seconds)
        return threading.current_thread().name

    async def shout(self, text: str) -> str:
        self.emit("shouted", {"text": text})
        return text.upper()

    def broken(self) -> None:
        raise TypeError("plugin code has a bug")


class FailingStartPlugin(Plugin):
    async def start(self) -> None:
        raise RuntimeError("cannot open the database")

    async def ping(self) -> str:
        return "pong"


class LegacyPlugin:
    """No base class, sync hooks: the older local plugin system's shape."""

    def init(self, config: dict[str, Any]) -> None:
        self.prefix = config["prefix"]

    def greet(self, name: str) -> str:
        return f"{self.prefix} {name}"

    def health_check(self) -> dict[str, Any]:
        return {"ok": True, "connections": 0}


class CountingPlugin(Plugin):
    """Counts the calls that really reach it."""

    calls = 0
    finished: list[str] = []

    async def lookup(self, key: str, delay: float = 0.0) -> dict[str, Any]:
        type(self).calls += 1
        if delay:
            import asyncio

            await asyncio.sleep(delay)
        return {"key": key, "call": type(self).calls}

    async def slow(self, seconds: float, tag: str) -> str:
        import asyncio

        await asyncio.sleep(seconds)
        type(self).finished.append(tag)
        return tag

    async def fails(self, delay: float = 0.0) -> None:
        type(self).calls += 1
        if delay:
            import asyncio

            await asyncio.sleep(delay)
        raise ValueError("no")


class StubbornPlugin(Plugin):
    """A plugin that ignores the first cancellation of its call (a hostile peer for drains)."""

    async def stubborn(self, seconds: float) -> str:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            await asyncio.sleep(seconds)  # ignores it, then finishes anyway
        return "done anyway"


class SlowToStopPlugin(Plugin):
    """A plugin whose ``stop`` outlasts its stop timeout: only the host's
    ``stop_timeout_ms`` ends it (``tests/test_detach_at_once.py``)."""

    async def stop(self) -> None:
        await asyncio.sleep(60)

    async def ping(self) -> str:
        return "pong"
