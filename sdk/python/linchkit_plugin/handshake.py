"""The subprocess handshake, the one place both sides of it read (``docs/protocol.md``,
"Subprocess plugins: the handshake").

The host (``providers.subprocess``) starts a plugin with the environment named here; the
plugin (``linchkit_plugin.grpc_server``) checks the magic cookie, picks a protocol version
among those offered, starts its gRPC server and prints one line on stdout:

    CORE-VERSION|APP-VERSION|NETWORK|ADDRESS|PROTOCOL|SERVER-CERT
    1|1|unix|/tmp/lk-plugin-x1/plugin.sock|grpc|MIIB…

The Go, Rust, Java and TypeScript SDKs speak the same bytes (``tests/conformance``), so
nothing here may change without them: the values are the protocol, not settings.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "CLIENT_CERT_ENV",
    "CORE_VERSION",
    "HEALTH_SERVICE",
    "HOST_METADATA",
    "LINE_FORMAT",
    "MAGIC_COOKIE_KEY",
    "MAGIC_COOKIE_VALUE",
    "NETWORK_ENV",
    "NOT_RUN_TRAILER",
    "PROTOCOL",
    "PROTOCOL_VERSIONS_ENV",
    "SOCKET_DIR_ENV",
    "HandshakeLine",
]

#: A plugin run without this variable set to this value prints a hint and exits 1.
MAGIC_COOKIE_KEY = "LINCHKIT_PLUGIN_MAGIC_COOKIE"
MAGIC_COOKIE_VALUE = "d1spatch3r-pl4g1n"
#: The app protocol versions the host speaks, comma-separated (``1``).
PROTOCOL_VERSIONS_ENV = "LINCHKIT_PLUGIN_PROTOCOL_VERSIONS"
#: ``unix`` (the default) or ``tcp``.
NETWORK_ENV = "LINCHKIT_PLUGIN_NETWORK"
#: The folder for the plugin's Unix socket.
SOCKET_DIR_ENV = "LINCHKIT_PLUGIN_SOCKET_DIR"
#: AutoMTLS: the host's one-time client certificate, PEM; the plugin then serves TLS,
#: requires that certificate, and returns its own in the line's SERVER-CERT field.
CLIENT_CERT_ENV = "LINCHKIT_PLUGIN_CLIENT_CERT"

#: The handshake line's format: its CORE-VERSION field.
CORE_VERSION = 1
#: The only PROTOCOL a plugin serves.
PROTOCOL = "grpc"
#: The fields of the line, as the error for a malformed one names them.
LINE_FORMAT = "CORE-VERSION|APP-VERSION|NETWORK|ADDRESS|PROTOCOL|SERVER-CERT"
#: The service a plugin's ``grpc.health.v1.Health`` reports SERVING once started.
HEALTH_SERVICE = "linchkit.plugin.v1.PluginService"
#: Trailing metadata of an ``UNAVAILABLE`` a stopping plugin answers a call with that it
#: did not run (value ``stopping``): the host knows it was never run, sends it elsewhere
#: or fails it as never sent, and sends no more on that connection until it closes
#: (docs/protocol.md, "Stopping while called").
NOT_RUN_TRAILER = "linchkit-not-run"
#: Lifecycle RPC metadata: the id of the host sending it, drawn once per host process, so
#: a service attached by several hosts runs its stop hooks only when the last one leaves
#: (docs/protocol.md, "Several hosts on one service").
HOST_METADATA = "linchkit-host"


class HandshakeLine(NamedTuple):
    """The fields of the handshake line, as text, in the order they travel."""

    core_version: str
    app_version: str
    network: str
    address: str
    protocol: str
    server_cert: str

    @classmethod
    def of(
        cls, app_version: int, network: str, address: str, server_cert: str = ""
    ) -> HandshakeLine:
        """The line a plugin prints: this core version, ``grpc``."""
        return cls(str(CORE_VERSION), str(app_version), network, address, PROTOCOL, server_cert)

    @classmethod
    def parse(cls, line: str) -> HandshakeLine:
        """Split a line into its fields; ``ValueError`` unless there are six.

        Only the shape is checked here: whether the host accepts the values is its call.
        """
        parts = line.split("|")
        if len(parts) != len(cls._fields):
            raise ValueError(f"expected {LINE_FORMAT}")
        return cls(*parts)

    def __str__(self) -> str:
        return "|".join(self)
