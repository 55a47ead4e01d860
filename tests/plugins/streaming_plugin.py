"""A plugin with streaming methods and an event handler, run in-process (``local``) and as
a child process (``subprocess``, ``python streaming_plugin.py``) by the same tests.

It notes what befell its generators in the folder ``config["marks"]`` (one empty file a
note), which either host can read.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from linchkit_plugin import Plugin


class StreamBroke(Exception):
    pass


class StreamingPlugin(Plugin):
    async def init(self, config: dict[str, Any]) -> None:
        self.marks = Path(config["marks"])

    def _mark(self, name: str) -> None:
        (self.marks / name).touch()

    async def count(self, n: int) -> AsyncIterator[dict[str, int]]:
        for i in range(n):
            yield {"i": i}

    async def count_fail(self, n: int) -> AsyncIterator[dict[str, int]]:
        for i in range(n):
            yield {"i": i}
        raise StreamBroke("stream broke")

    async def trickle(self, tag: str, every: float = 0.05) -> AsyncIterator[int]:
        """Endless: a chunk each ``every`` seconds, until cancelled or closed."""
        self._mark(f"start-{tag}")
        i = 0
        try:
            while True:
                yield i
                i += 1
                await asyncio.sleep(every)
        except asyncio.CancelledError:
            self._mark(f"cancelled-{tag}")
            raise
        except GeneratorExit:
            self._mark(f"closed-{tag}")
            raise

    async def double(self, x: int) -> int:
        return 2 * x

    async def on_event(self, event: str, data: Any) -> None:
        if event == "ping":
            self.emit("pong", data)
        elif event == "bad":
            raise ValueError("this event breaks the handler")


if __name__ == "__main__":
    from linchkit_plugin.grpc_server import main

    sys.exit(main(StreamingPlugin, plugin_id="streams", version="1.0.0", runtime="python"))
