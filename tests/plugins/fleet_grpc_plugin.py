"""A gRPC plugin service for the fleet tests, run as ``python fleet_grpc_plugin.py serve
--address HOST:PORT``: each instance answers with the host it serves on, so a test sees
which instance took a call.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from linchkit_plugin import Plugin
from linchkit_plugin.grpc_server import main


class FleetPlugin(Plugin):
    def __init__(self) -> None:
        self.instance = os.environ.get("FLEET_INSTANCE", "unnamed")
        self.initialized: dict[str, Any] | None = None

    async def init(self, config: dict[str, Any]) -> None:
        self.initialized = config

    async def whoami(self) -> str:
        return self.instance

    async def withdraw(self, amount: int) -> dict[str, Any]:
        return {"instance": self.instance, "left": 100 - amount}

    async def sleep(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return self.instance

    async def config(self) -> dict[str, Any] | None:
        """What ``Init`` was given (None in a service that runs its own lifecycle)."""
        return self.initialized


if __name__ == "__main__":
    sys.exit(main(FleetPlugin, plugin_id="fleet", version="1.0.0"))
