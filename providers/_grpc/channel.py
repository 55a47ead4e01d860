"""How the host's channel to a plugin is made: its options and its security.

Every channel sends keepalive pings (30 s, answered within 10 s), so a dead peer is noticed
between calls, and takes messages of up to 64 MiB each way. ``ChannelSecurity`` says
whether it is TLS and with what material; its ``server_name``, when set, is the name the
plugin's certificate is checked against and the ``:authority`` every call sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ChannelSecurity", "open_channel"]

#: The longest a channel stays connected without a call before grpc lets it go idle (its
#: default: 30 minutes): never, as grpc counts it (INT_MAX ms, some 24 days). A channel
#: that went idle and connected again looked like a plugin restarted at its address, and
#: under ``lifecycle: dispatcher`` a plugin found again gets ``Init`` and ``Start`` anew
#: (``providers._grpc.restarts``): every plugin left without calls for half an
#: hour would have had them again. A connection held costs a descriptor and the
#: keepalive's pings, which already notice a dead peer (and the channel then connects
#: again by itself).
CLIENT_IDLE_TIMEOUT_MS = 2**31 - 1

#: Channel options: keepalive so a dead peer is noticed between calls, large messages,
#: no idling.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.client_idle_timeout_ms", CLIENT_IDLE_TIMEOUT_MS),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass(frozen=True, slots=True)
class ChannelSecurity:
    """TLS material of a channel, as PEM bytes. ``root`` None with ``tls``: system roots."""

    tls: bool = False
    root: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None


def open_channel(address: str, security: ChannelSecurity) -> Any:
    """A grpc.aio channel to ``address`` (``host:port`` or ``unix:/path/to.sock``)."""
    import grpc
    import grpc.aio

    options = list(_CHANNEL_OPTIONS)
    if security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
        options.append(("grpc.default_authority", security.server_name))
    if security.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=security.root,
            private_key=security.private_key,
            certificate_chain=security.certificate_chain,
        )
        return grpc.aio.secure_channel(address, credentials, options=options)
    return grpc.aio.insecure_channel(address, options=options)
