"""``provider: websocket``: plugins over one WebSocket, dialled or dialling in.

``target`` holds the manifest's model, ``channel`` one open connection's multiplexed calls,
``in_flight`` what a connection has asked and which reply answers it, ``writer`` the one
task that writes a connection's frames, in order, ``reader`` what the plugin sends, each
frame handed to what it answers, ``read_watch`` whether its frames still come whole,
``events`` the plugin's events on their way to the host, ``lifecycle`` whether a connection
is open, going away or closed and how it ends, ``closing`` how its socket is closed or
dropped at once, ``hello`` the first frame of a new connection, ``dialer`` dial mode's
reconnecting connection, ``inbound`` the connections of reverse mode and their instance
source, ``provider`` the driver. aiohttp is imported with this package, which the
dispatcher loads only for manifests that use it.
"""

from __future__ import annotations

from providers.websocket.provider import WebSocketProvider
from providers.websocket.target import WebSocketTarget

__all__ = ["WebSocketProvider", "WebSocketTarget"]
