"""``provider: websocket``: plugins over one WebSocket, dialled or dialling in.

One module per job, each using only those listed below it:

    provider     the driver: dial and reverse mode, the errors it maps
    dialer       dial mode: one connection kept up, redialled with backoff and jitter
    admission    reverse mode: a plugin dialling in admitted and served; what reloads close
    inbound      reverse mode: the plugins connected in, an instance source per target
    sharing      who uses a dialled connection: the versions of one plugin on it
    hello        the first frame of a new connection, read and checked
    channel      one open connection: its callers' calls, streams, probes and host events
    lifecycle    whether a connection is open, going away or closed, and how it ends
    reader       what the plugin sends, each frame handed to what it answers or counted
    events       the plugin's events on their way to the host, at a bounded rate
    in_flight    what a connection has asked and not had answered, and which reply answers it
    read_watch   whether the plugin's frames still come whole
    closing      how a connection's socket is closed, given a grace, or dropped at once
    writer       the one task that writes a connection's frames, in order
    target       the manifest's model

aiohttp is imported when the provider first dials or accepts a connection, not with this
package: a manifest that names no WebSocket target never loads it.
"""

from __future__ import annotations

from providers.websocket.provider import WebSocketProvider
from providers.websocket.target import WebSocketTarget

__all__ = ["WebSocketProvider", "WebSocketTarget"]
