"""``provider: grpc`` as a manifest writes it: the address or fleet of a plugin's gRPC
service, its TLS files, metadata, lifecycle owner and compression, checked when the
manifest loads (``GrpcTarget``). The provider that dials it is ``providers.grpc``."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from linchkit_plugin.errors import ProviderError
from linchkit_plugin.handshake import HEALTH_SERVICE
from providers._compression import DEFAULT_MIN_BYTES, is_loopback
from providers._event_rate import DEFAULT_MAX_EVENTS_PER_SECOND
from providers._grpc.channel import ChannelSecurity
from providers.discovery import Endpoint, Weight, instance_item
from providers.instances import InstanceListing
from providers.target import (
    Balance,
    Destination,
    HealthCheck,
    ManifestPath,
    OutlierDetection,
    StrictModel,
)

__all__ = ["GrpcCompression", "GrpcInstance", "GrpcTarget"]

_GRPC_ADDRESS = re.compile(
    r"unix:[^\x00-\x1f\x7f]+|[^:/\s?#@\x00-\x1f\x7f]+:([0-9]+)|\[[0-9a-fA-F:]+\]:([0-9]+)"
)


def _checked_address(address: str) -> str:
    """An address gRPC will dial as written: a port it would not take modulo 65,536, and
    no character a host or a socket path cannot hold (a NUL reached the egress check)."""
    match = _GRPC_ADDRESS.fullmatch(address)
    if match is None:
        raise ValueError("host:port, [v6]:port or unix:/path/to/socket (no control characters)")
    port = match.group(1) or match.group(2)
    if port is not None and not 1 <= int(port) <= 65_535:
        raise ValueError(f"port {port[:8]} is not between 1 and 65535")
    return address


#: A gRPC target: host:port, [v6]:port, or a Unix socket.
GrpcAddress = Annotated[
    str,
    AfterValidator(_checked_address),
    Field(
        description="host:port, or unix:/path/to/socket",
        examples=["127.0.0.1:50051", "unix:/run/plugins/echo.sock"],
    ),
]


def _gzip_only() -> list[Literal["gzip"]]:
    return ["gzip"]


class GrpcCompression(StrictModel):
    """``compression:`` of a grpc target: gRPC's own message compression (gzip)."""

    min_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Requests whose params are this large or larger are sent in gzip."
        " Unset: 32 KiB, and never to a loopback address or a unix socket, where"
        " compression never paid (bench_compression).",
    )

    def threshold(self, address: str) -> int | None:
        """The size from which calls to ``address`` go in gzip; None: never."""
        if not self.algorithms:
            return None
        if self.min_bytes is not None:
            return self.min_bytes
        if address.startswith("unix:") or is_loopback(address.rpartition(":")[0]):
            return None
        return DEFAULT_MIN_BYTES

    algorithms: list[Literal["gzip"]] = Field(
        default_factory=_gzip_only,
        description="[gzip]: compress (the default); []: never compress.",
    )


class GrpcInstance(StrictModel):
    """One instance of a gRPC fleet."""

    address: GrpcAddress
    weight: Weight = 1


class GrpcTarget(InstanceListing):
    """``provider: grpc``: a plugin served over gRPC at ``address``, or by a fleet."""

    address_field = "address"
    instance_key = "address"
    address_noun = "an address"

    provider: Literal["grpc"]
    address: GrpcAddress | None = None
    instances: list[instance_item(GrpcInstance)] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Several interchangeable servers of the plugin (a fleet): fixed addresses,"
        " DNS names, an etcd registry; address, if set, is the first.",
    )
    balance: Balance = "least_request"
    health_check: HealthCheck | None = None
    outlier: OutlierDetection = Field(default_factory=OutlierDetection)
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
    max_events_per_second: int = Field(
        default=DEFAULT_MAX_EVENTS_PER_SECOND,
        ge=1,
        description="Plugin events beyond this rate are dropped, counted.",
    )
    health_service: str = HEALTH_SERVICE
    connect_timeout_ms: int = Field(default=5_000, gt=0)
    compression: GrpcCompression = Field(
        default_factory=GrpcCompression,
        description="gRPC's own gzip for requests whose params are min_bytes or more.",
    )

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

    secret_fields = frozenset({"metadata"})

    def destinations(self) -> tuple[Destination, ...]:
        return self.listed_destinations(_destination)

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def describe(self) -> str:
        scheme = f"grpc{'s' if self.uses_tls else ''}"
        places = self.fixed_places()
        if len(places) == 1 and not self.instance_sources():
            return f"{scheme} {places[0][0]}"
        return f"{scheme} fleet {self.listing(str)}"

    def place_of(self, endpoint: Endpoint) -> str:
        return endpoint.address()

    def connect_address(self) -> str:
        """The one address a provider connects to; a fleet has none (its instances do)."""
        if self.address is None or self.instances:
            raise ProviderError(
                f"{self.describe()} is a fleet: the dispatcher calls one of its instances"
            )
        return self.address

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


def _destination(field: str, address: str) -> Destination:
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        # unix:///abs/path is the URI form of unix:/abs/path (gRPC naming doc).
        return Destination.of_unix_socket(field, path.removeprefix("//"))
    host, _, port = address.rpartition(":")
    return Destination.of_host(field, host, int(port))
