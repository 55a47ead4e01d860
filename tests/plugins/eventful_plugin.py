"""A plugin that emits events on demand, for the gateway's tests (in-process: fast bursts)."""

from __future__ import annotations

from linchkit_plugin import Plugin


class EventfulPlugin(Plugin):
    async def burst(self, name: str, count: int, size: int = 0) -> int:
        """Emit ``count`` events ``name`` with data ``{"n": i, "pad": "x" * size}``."""
        for index in range(count):
            self.emit(name, {"n": index, "pad": "x" * size})
        return count
