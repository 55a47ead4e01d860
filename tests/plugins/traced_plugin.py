"""A test plugin for telemetry: it answers with the call context it received, fails with
any exception name it is given, and logs from inside a call."""

from __future__ import annotations

import logging
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

    async def noisy(self, text: str) -> str:
        log.warning("plugin says %s", text)
        return text
