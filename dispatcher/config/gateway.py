"""The manifest's ``gateway:`` section: where ``dispatcher serve`` listens, its TLS, its limits.

The model only; ``dispatcher.gateway.settings`` maps it onto ``GatewaySettings``, and the
options of ``dispatcher serve`` given on the command line override what it says. Paths
are taken from the manifest's folder (``ManifestPath``), as everywhere in a manifest.
Durations are in milliseconds, as every other duration of a manifest.

    gateway:
      host: 0.0.0.0
      port: 8443
      grpc_port: 9443
      tls: {cert: tls/gw.pem, key: tls/gw.key, client_ca: tls/clients.pem, client_cert: required}
      max_body_bytes: 1048576
      timeouts: {body_ms: 30000, header_ms: 10000, keep_alive_ms: 75000, heartbeat_ms: 20000}
      max_job_waits: 1000
      max_timeout_ms: 300000
      max_grpc_calls: 1000
      max_connections: 4096
      max_connections_per_peer: 1024
      grace_ms: 20000
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from providers.target import ManifestPath, StrictModel

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "MOST_CONNECTIONS",
    "GatewayConfig",
    "GatewayTimeouts",
    "GatewayTls",
]

_Port = Annotated[int, Field(ge=0, le=65535)]
#: Connections each port holds open at once, by default. Measured on the 2-core test
#: machine (``dispatcher serve``, 3,000 connections held): one file descriptor each, and
#: of the process's memory ~2 kB for an HTTP connection that sent nothing, ~5 kB once the
#: call lane has answered on it, ~11 kB once aiohttp serves it, ~17 kB for a gRPC
#: connection past its HTTP/2 handshake (the kernel's socket buffers come on top). Its
#: RLIMIT_NOFILE is 20,000: two ports at 4,096 take 8,192 descriptors at most, leaving
#: the rest to the dispatcher's own connections (plugins, Redis, OTLP) and files, and
#: cost ~115 MB at the most (the gateway warns at start when the limit is lower than
#: the ports' connections need, docs/gateway.md).
DEFAULT_MAX_CONNECTIONS = 4096
#: grpc takes an int below 2**31; far above what any process holds descriptors for.
MOST_CONNECTIONS = 10_000_000


class GatewayTls(StrictModel):
    """Serve HTTPS (and gRPC over TLS); ask clients for certificates signed by ``client_ca``."""

    cert: ManifestPath = Field(description="PEM certificate (chain) the gateway presents.")
    key: ManifestPath = Field(description="PEM private key of cert.")
    client_ca: ManifestPath | None = Field(
        default=None, description="PEM CA that signs client certificates."
    )
    client_cert: Literal["none", "optional", "required"] | None = Field(
        default=None,
        description="Ask clients for a certificate; default: required with client_ca, else none.",
    )

    @model_validator(mode="after")
    def _client_certificates_need_their_ca(self) -> GatewayTls:
        if self.client_cert in ("optional", "required") and self.client_ca is None:
            raise ValueError(f"client_cert: {self.client_cert} needs client_ca")
        if self.client_cert == "none" and self.client_ca is not None:
            raise ValueError("client_ca is set but client_cert is none: drop one of them")
        return self

    @property
    def client_certificates(self) -> Literal["none", "optional", "required"]:
        if self.client_cert is not None:
            return self.client_cert
        return "none" if self.client_ca is None else "required"


class GatewayTimeouts(StrictModel):
    """How long the gateway waits for a slow client (``docs/gateway.md``, limits)."""

    body_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 30_000
    header_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 10_000
    #: A call-lane connection idle between requests: longer than clients keep one.
    keep_alive_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 75_000
    heartbeat_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 20_000
    #: The longest ``GET /v1/jobs/{id}?wait=`` holds a request open.
    job_wait_ms: Annotated[int, Field(ge=0, le=3_600_000)] = 30_000


class GatewayConfig(StrictModel):
    """``gateway:``: what ``dispatcher serve`` serves when its options do not say otherwise."""

    host: str = Field(default="127.0.0.1", min_length=1, max_length=253)
    port: _Port = 8080
    grpc_port: _Port | None = Field(
        default=None, description="Also serve the gRPC gateway (proto/gateway.proto) here."
    )
    tls: GatewayTls | None = None
    max_body_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024
    timeouts: GatewayTimeouts = Field(default_factory=GatewayTimeouts)
    max_job_waits: Annotated[int, Field(ge=1)] = Field(
        default=1000, description="GET /v1/jobs/{id}?wait= requests parked at once; more: 503."
    )
    max_timeout_ms: Annotated[int, Field(ge=1, le=86_400_000)] | None = Field(
        default=None,
        description="The longest deadline a caller may ask for (X-Timeout-Ms, Request-Timeout,"
        " gRPC timeout_ms); a longer one is cut to it, not refused. Unset: a day. A call"
        " that asks for none keeps its method's timeout_ms.",
    )
    max_grpc_calls: Annotated[int, Field(ge=1)] = Field(
        default=1000,
        description="Calls the gRPC port holds at once, waiting for their message or running;"
        " more: RESOURCE_EXHAUSTED.",
    )
    max_connections: Annotated[int, Field(ge=1, le=MOST_CONNECTIONS)] = Field(
        default=DEFAULT_MAX_CONNECTIONS,
        description="Connections open at once on each port (HTTP, gRPC); one more is closed"
        " at once (HTTP: 503 overloaded when it costs nothing).",
    )
    max_connections_per_peer: Annotated[int, Field(ge=1, le=MOST_CONNECTIONS)] | None = Field(
        default=None,
        description="Connections one peer address (an IPv6 peer's /64) may hold open on the"
        " HTTP port; default: a quarter of max_connections.",
    )
    grace_ms: Annotated[int, Field(ge=0, le=86_400_000)] = Field(
        default=20_000, description="How long a drain lets calls in flight finish."
    )
    error_detail: Literal["safe", "full"] = Field(
        default="safe",
        description="What callers are told of failures that are the infrastructure's"
        " (target_unavailable, deadline_exceeded, provider_error, circuit_open, overloaded,"
        " shutting_down): safe, a fixed message per type (the whole one logged); full, the"
        " dispatcher's own message, which names targets and addresses.",
    )
    call_lane: bool = Field(
        default=True,
        description="Answer plain calls on the call lane (httptools); false: every request"
        " through aiohttp.web, at more CPU per call (docs/gateway.md).",
    )

    @field_validator("max_timeout_ms", mode="before")
    @classmethod
    def _milliseconds_are_no_flag(cls, value: object) -> object:
        # pydantic takes true for 1 ms: a YAML slip, not a cap anyone means.
        if isinstance(value, bool):
            raise ValueError(f"a whole number of milliseconds in [1, 86400000], not {value}")
        return value

    @model_validator(mode="after")
    def _one_peer_within_the_whole(self) -> GatewayConfig:
        per_peer = self.max_connections_per_peer
        if per_peer is not None and per_peer > self.max_connections:
            raise ValueError(
                f"max_connections_per_peer ({per_peer}) is above max_connections"
                f" ({self.max_connections}): lower it, or raise max_connections"
            )
        return self
