"""A plugin that emits events on demand and answers host events, for the gateway's tests."""

from __future__ import annotations

from typing import Any

from linchkit_plugin import Plugin


class EventfulPlugin(Plugin):
    async def burst(self, name: str, count: int, size: int = 0) -> int:
        """Emit ``count`` events ``name`` with data ``{"n": i, "pad": "x" * size}``."""
        for index in range(count):
            self.emit(name, {"n": index, "pad": "x" * size})
        return count

    async def on_event(self, event: str, data: Any) -> None:
        if event == "ping":
            self.emit("pong", data)
