"""A plugin for the shared-state tests: counts how often it really ran.

Served as an HTTP function (``dispatcher-plugin serve``) in its own process, so that
several dispatcher processes call one plugin and the counts are the plugin's own.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from linchkit_plugin import Plugin


class CountingPlugin(Plugin):
    async def init(self, config: dict[str, Any]) -> None:
        self.charges = 0
        self.reads = 0

    async def charge(self, amount: int, delay: float = 0.2) -> dict[str, Any]:
        """Not idempotent by itself: every call that arrives charges again. The delay
        keeps the first call running while its duplicates arrive."""
        self.charges += 1
        run = self.charges
        await asyncio.sleep(delay)
        return {"charged": amount, "run": run}

    async def read(self, item: str) -> dict[str, Any]:
        """Pure in the manifest: a fresh answer says the target was called."""
        self.reads += 1
        return {"item": item, "read": self.reads}

    async def measure(self, item: str) -> dict[str, Any]:
        """Pure in the manifest; from its second run on its answer holds NaN, which JSON
        cannot carry: a cache serves that answer and cannot share it."""
        self.reads += 1
        return {"item": item, "read": self.reads, "ratio": 0.5 if self.reads == 1 else math.nan}

    async def ping(self) -> str:
        return "pong"

    async def counts(self) -> dict[str, int]:
        return {"charges": self.charges, "reads": self.reads}
