"""gRPC plugin services: the ``PluginService`` of ``proto/plugin.proto`` at an address.

One ``grpc.aio`` channel per target, reused by every call (``providers/_grpc_client.py``
holds the calling code and the status mapping, shared with the subprocess provider).
The call's deadline is the gRPC deadline; ``x-request-id``, ``x-caller`` and
``traceparent`` travel as call metadata; a batch is one ``CallBatch``; the plugin's
``Events`` stream is kept open and its events reach ``Dispatcher.on`` handlers.

With ``lifecycle: dispatcher`` the dispatcher runs the plugin's ``Init`` (with the
manifest's ``config``) and ``Start`` when it attaches, ``Stop`` and ``Destroy`` when it
detaches; with ``remote`` (the default) the service runs its own lifecycle.

grpcio is imported when a connection is opened, not when this module loads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from linchkit_plugin.errors import ProviderError, TargetUnavailable
from providers._grpc_client import HEALTH_SERVICE, ChannelSecurity, PluginConnection
from providers.base import Health, Provider
from providers.invocation import Invocation, Outcome
from providers.target import ManifestPath, TargetConfig

if TYPE_CHECKING:
    from providers.target import PluginInfo

__all__ = ["GrpcProvider", "GrpcTarget"]

log = logging.getLogger("dispatcher.providers.grpc")


class GrpcTarget(TargetConfig):
    """``provider: grpc``: a plugin served over gRPC at ``address``."""

    provider: Literal["grpc"]
    address: str = Field(
        pattern=r"^(unix:.+|[^:/\s]+:\d+|\[[0-9a-fA-F:]+\]:\d+)$",
        description="host:port, or unix:/path/to/socket",
        examples=["127.0.0.1:50051", "unix:/run/plugins/echo.sock"],
    )
    tls: bool = Field(default=False, description="Use TLS; implied by any of the files below.")
    ca_file: ManifestPath | None = Field(
        default=None, description="PEM roots to verify the server with."
    )
    cert_file: ManifestPath | None = Field(
        default=None, description="Client certificate (mTLS), PEM."
    )
    key_file: ManifestPath | None = Field(
        default=None, description="Client private key (mTLS), PEM."
    )
    server_name: str | None = Field(
        default=None, description="Name to verify in the server certificate (and :authority)."
    )
    metadata: dict[str, str] = Field(default_factory=dict, description="Sent with every call.")
    lifecycle: Literal["remote", "dispatcher"] = Field(
        default="remote",
        description="'dispatcher': the dispatcher runs Init/Start on attach, Stop/Destroy on detach.",
    )
    batch: bool = Field(default=True, description="Send batches as one CallBatch.")
    events: bool = Field(default=True, description="Keep the plugin's Events stream open.")
    health_service: str = HEALTH_SERVICE
    connect_timeout_ms: int = Field(default=5_000, gt=0)

    @field_validator("metadata")
    @classmethod
    def _metadata_is_valid_for_grpc(cls, metadata: dict[str, str]) -> dict[str, str]:
        for key, value in metadata.items():
            if not re.fullmatch(r"[0-9a-z_.-]+", key) or key.startswith("grpc-"):
                raise ValueError(
                    f"metadata key {key!r}: lowercase letters, digits, '-', '_', '.'; not grpc-*"
                )
            if not (value.isascii() and value.isprintable()):
                raise ValueError(f"metadata value of {key!r} must be printable ASCII")
        return metadata

    @model_validator(mode="after")
    def _client_certificate_needs_its_key(self) -> GrpcTarget:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mTLS needs both)")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def describe(self) -> str:
        return f"grpc{'s' if self.uses_tls else ''} {self.address}"

    def security(self) -> ChannelSecurity:
        """The channel's TLS material, read from the files now."""
        if not self.uses_tls:
            return ChannelSecurity()
        try:
            return ChannelSecurity(
                tls=True,
                root=self.ca_file.read_bytes() if self.ca_file else None,
                private_key=self.key_file.read_bytes() if self.key_file else None,
                certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
                server_name=self.server_name,
            )
        except OSError as error:
            raise ProviderError(
                f"{self.describe()}: cannot read TLS file {error.filename}: {error.strerror}"
            ) from None


class GrpcProvider(Provider[GrpcTarget]):
    name = "grpc"
    target_model = GrpcTarget
    native_batch = True

    def __init__(self) -> None:
        self._connections: dict[str, PluginConnection] = {}
        self._by_value: dict[str, PluginConnection] = {}

    async def attach(self, plugin: PluginInfo, target: GrpcTarget) -> None:
        connection = self._open(target)
        if target.events and self.event_sink is not None:
            sink = self.event_sink
            plugin_id = plugin.id
            connection.open_events(lambda event, data: sink(plugin_id, event, data))
        if target.lifecycle == "dispatcher":
            await connection.wait_ready(target.connect_timeout_ms / 1000)
            init_timeout = plugin.lifecycle.init_timeout_ms / 1000
            await connection.lifecycle("Init", init_timeout, plugin.config)
            await connection.lifecycle("Start", init_timeout)
            if target.events and self.event_sink is not None:
                await connection.events_ready(0.25)  # as the subprocess provider does

    async def detach(self, plugin: PluginInfo, target: GrpcTarget) -> None:
        connection = self._connections.get(target.key)
        if connection is None:
            return
        if target.lifecycle == "dispatcher":
            stop_timeout = plugin.lifecycle.stop_timeout_ms / 1000
            for step in ("Stop", "Destroy"):
                try:
                    await connection.lifecycle(step, stop_timeout)
                except Exception:  # detaching goes on: the channel must still close
                    log.exception("%s of %s on %s failed", step, plugin.key, target.describe())
        await self._forget(target)

    async def aclose(self) -> None:
        connections = {id(c): c for c in (*self._connections.values(), *self._by_value.values())}
        self._connections.clear()
        self._by_value.clear()
        for connection in connections.values():
            await connection.close()

    async def invoke(self, target: GrpcTarget, invocation: Invocation) -> Any:
        return await self._connection(target).call(invocation)

    async def invoke_batch(
        self, target: GrpcTarget, invocations: Sequence[Invocation]
    ) -> list[Outcome[Any]]:
        if not target.batch or not invocations:
            return await super().invoke_batch(target, invocations)
        return await self._connection(target).call_batch(invocations)

    async def stream(self, target: GrpcTarget, invocation: Invocation) -> AsyncGenerator[Any, None]:
        async for chunk in self._connection(target).stream(invocation):
            yield chunk

    async def send_event(self, target: GrpcTarget, event: str, data: Any) -> None:
        self._connection(target).send_event(event, data)

    async def health(self, target: GrpcTarget) -> Health:
        try:
            connection = self._connection(target)
        except ProviderError as error:
            return Health("not_serving", str(error))
        return await connection.health(service=target.health_service)

    def _open(self, target: GrpcTarget) -> PluginConnection:
        connection = self._by_value.get(_key(target))
        if connection is None:
            connection = PluginConnection(
                target.address,
                security=target.security(),
                metadata=tuple(target.metadata.items()),
                describe=target.describe(),
            )
            self._by_value[_key(target)] = connection
        self._connections[target.key] = connection
        return connection

    def _connection(self, target: GrpcTarget) -> PluginConnection:
        connection = self._connections.get(target.key)
        if connection is not None:
            return connection
        # An equal target object of another method of the same plugin: same channel.
        connection = self._by_value.get(_key(target))
        if connection is None:
            raise TargetUnavailable(f"{target.describe()} is not attached")
        self._connections[target.key] = connection
        return connection

    async def _forget(self, target: GrpcTarget) -> None:
        connection = self._by_value.pop(_key(target), None)
        for key, value in list(self._connections.items()):
            if value is connection:
                del self._connections[key]
        if connection is not None:
            await connection.close()

    def __repr__(self) -> str:
        return f"<GrpcProvider 'grpc' connections={len(self._by_value)}>"


def _key(target: GrpcTarget) -> str:
    # Targets hold dicts (metadata), so they are not hashable; their JSON is.
    return target.model_dump_json()
