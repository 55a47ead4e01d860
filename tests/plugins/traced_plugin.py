"""A test plugin for telemetry: it answers with the call context it received, fails with
any exception name it is given, and logs from inside a call."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from linchkit_plugin import Plugin, current_context

log = logging.getLogger("dispatcher.test.traced_plugin")


class TracedPlugin(Plugin):
    async def context(self) -> dict[str, Any]:
        """The context the call arrived with (traceparent, request_id, …)."""
        return dict(current_context())

    async def fail(self, name: str, message: str = "it failed") -> None:
        """Raise an exception class called ``name``: a plugin picks its own error names."""
        raise type(name, (Exception,), {})(message)

    async def chunks(self, count: int = 3, fail_at: int = -1) -> AsyncIterator[dict[str, Any]]:
        """``count`` chunks, each with the context the stream arrived with; fails before
        chunk ``fail_at`` when it is one of them."""
        for index in range(count):
            if index == fail_at:
                raise RuntimeError(f"failed before chunk {index}")
            yield {"index": index, "traceparent": current_context().get("traceparent")}

    async def on_event(self, event: str, data: Any) -> None:
        self.events = [*getattr(self, "events", []), (event, data)]

    async def noisy(self, text: str) -> str:
        log.warning("plugin says %s", text)
        return text


if __name__ == "__main__":  # as a subprocess plugin (streams and host events need one)
    import sys

    from linchkit_plugin.grpc_server import main

    sys.exit(main(TracedPlugin, plugin_id="traced", version="1.0.0"))
