"""The example plugin used by the demo, the tests and the benchmarks.

The same class runs in-process (``provider: local``) and as an HTTP function
(``dispatcher-plugin serve echo_plugin:EchoPlugin --path examples/python``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from linchkit_plugin import Plugin, current_context


class InsufficientFunds(Exception):
    """A business error: the caller sees PluginError with remote_type 'InsufficientFunds'."""


class EchoPlugin(Plugin):
    async def init(self, config: dict[str, Any]) -> None:
        self.greeting = config.get("greeting", "hello")
        self.calls = 0

    async def say(self, text: str) -> dict[str, Any]:
        """Echo ``text`` back, with who asked."""
        self.calls += 1
        return {"text": text, "greeting": self.greeting, "caller": current_context().get("caller")}

    def digest(self, data: str, rounds: int = 1000) -> str:
        """CPU-bound and synchronous: runs in a worker thread, not on the event loop."""
        value = data.encode()
        for _ in range(rounds):
            value = hashlib.sha256(value).digest()
        return value.hex()

    async def sleep(self, seconds: float) -> float:
        """A slow method, for deadlines."""
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        return time.perf_counter() - started

    def withdraw(self, amount: int) -> int:
        """Fails with a business error for any amount above 100."""
        if amount > 100:
            raise InsufficientFunds(f"cannot withdraw {amount}: balance is 100")
        return 100 - amount

    async def health_check(self) -> bool:
        return True
