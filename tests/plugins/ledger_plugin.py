"""A plugin for the Knative tests: tells which revision answered, charges, and can crash.

Runs in the Knative Functions Python runtime (``python -m linchkit_plugin.knative``) or as
an HTTP function (``dispatcher-plugin serve``), in its own process started by the stand-in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from linchkit_plugin import Plugin, current_context


class InsufficientFunds(Exception):
    """A business error: the caller sees PluginError with remote_type 'InsufficientFunds'."""


class LedgerPlugin(Plugin):
    async def init(self, config: dict[str, Any]) -> None:
        self.greeting = config.get("greeting", "hello")
        self.marker = Path(config["marker"]) if "marker" in config else None

    async def whoami(self) -> dict[str, Any]:
        return {
            "revision": os.environ.get("K_REVISION"),
            "service": os.environ.get("K_SERVICE"),
            "greeting": self.greeting,
            "request_id": current_context().get("request_id"),
            "traceparent": current_context().get("traceparent"),
        }

    async def charge(self, amount: int) -> dict[str, Any]:
        """Not idempotent: every call that arrives charges again."""
        if amount > 100:
            raise InsufficientFunds(f"cannot charge {amount}: balance is 100")
        return {"charged": amount}

    async def odd(self) -> set[int]:
        """Returns what JSON cannot carry: the runtime itself fails to answer."""
        return {1, 2}

    def crash(self) -> None:
        """The process dies while the request is in flight."""
        os._exit(3)

    def crash_once(self) -> str:
        """Dies on the first call ever (remembered in the marker file), answers afterwards."""
        assert self.marker is not None, "config needs 'marker'"
        if not self.marker.exists():
            self.marker.write_text("crashed")
            os._exit(3)
        return "survived"
