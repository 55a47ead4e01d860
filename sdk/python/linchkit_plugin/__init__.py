"""The Python plugin SDK: write a plugin class once, run it in-process or as an HTTP function.

    from linchkit_plugin import Plugin

    class Echo(Plugin):
        async def say(self, text: str) -> dict:
            return {"text": text}

In-process: ``provider: local`` with ``entrypoint: mymodule:Echo``.
As an HTTP function: ``dispatcher-plugin serve mymodule:Echo --port 8081``, or
``create_app(Echo)`` under any ASGI server.
"""

from __future__ import annotations

from typing import Any

from linchkit_plugin.asgi import PluginApp
from linchkit_plugin.auth import BearerToken
from linchkit_plugin.errors import PluginError
from linchkit_plugin.host import PluginHost
from linchkit_plugin.limits import ServerLimits
from linchkit_plugin.plugin import Plugin, current_context

__all__ = [
    "BearerToken",
    "Plugin",
    "PluginApp",
    "PluginError",
    "PluginHost",
    "ServerLimits",
    "create_app",
    "current_context",
]


def create_app(
    plugin_class: type[Any],
    *,
    config: dict[str, Any] | None = None,
    token: BearerToken | None = None,
    limits: ServerLimits | None = None,
) -> PluginApp:
    """An ASGI app serving a new instance of ``plugin_class`` (``token``: see ``PluginApp``)."""
    return PluginApp(PluginHost(plugin_class()), config=config, token=token, limits=limits)
