"""What a gateway serves, where, and what one client may cost it, in one frozen value.

Each limit guards one resource against one kind of client, broken or hostile:

    limit                  guards                                        answer when passed
    max_body_bytes         memory: a body is read whole before parsing   413, decided on
                           (Content-Length checked before reading, then   Content-Length before
                           the bytes counted as a chunked body arrives)   reading; closed
    max_depth              CPU and stack: schema validation and JSON      400 invalid_params
                           encoding walk params level by level
    body_timeout           a request slot: a Content-Length that lies,   408, closed
                           a chunked body that never ends
    header_timeout         a connection: slowloris, a head that never    closed
                           completes (from a new connection's opening or
                           a request's first byte)
    keep_alive_timeout     a call-lane connection idle between requests  closed
                           (longer than clients keep one for reuse, so
                           they close first: a call sent on a connection
                           the gateway is closing would be lost)
    max_job_wait           a request slot: GET /v1/jobs/{id}?wait=…      400 invalid_params
    max_job_waits          the state store: each parked wait reads the   503 overloaded,
                           job's record twice a second                   Retry-After: 1
    max_timeout_ms         a request slot and the plugin's capacity: a   the call's deadline
                           caller asking a long deadline (X-Timeout-Ms,  cut to it, not
                           Request-Timeout, gRPC timeout_ms) for a call  refused (unset: a
                           that hangs                                    day)
    max_grpc_calls         memory and tasks: calls on the gRPC port,     RESOURCE_EXHAUSTED
                           waiting for their message (body_timeout at
                           most) or running
    max_connections        file descriptors and memory: connections      HTTP: 503 overloaded
                           open on each port (idle ones, TLS handshakes   and closed (TLS:
                           under way)                                     closed); gRPC: closed
    max_connections_       the same, against one peer address taking     as max_connections
      per_peer             them all (the HTTP port only: grpc cannot)
    event_buffer           memory: events kept for resuming subscribers  oldest dropped; a
                                                                          resume past it is told
    max_pending_events     memory: events one slow consumer leaves       WebSocket closed 4008
                           unread for a second

``dispatcher serve`` sets them from its options (``dispatcher.cli.serve``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatcher.config.gateway import DEFAULT_MAX_CONNECTIONS, MOST_CONNECTIONS, GatewayConfig
from dispatcher.gateway.call_headers import MAX_TIMEOUT_MS
from dispatcher.gateway.disclosure import ErrorDetail
from dispatcher.gateway.tls import ClientCertificates, ServerTls

__all__ = ["ClientCertificates", "GatewaySettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    """How a gateway listens and its limits; the defaults suit a gateway on a private network."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: Also serve the gRPC gateway (``proto/gateway.proto``) on this port; None: no gRPC.
    grpc_port: int | None = None
    max_body_bytes: int = 1024 * 1024
    max_depth: int = 64
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    #: A call-lane connection idle between requests is closed after this; aiohttp's own
    #: connections (other routes) after ``header_timeout``, which also times their heads.
    keep_alive_timeout: float = 75.0
    #: Events kept for subscribers that reconnect (``last_event_id``).
    event_buffer: int = 1000
    #: Events one subscriber may leave unsent from one look of the hub to the next (a
    #: second, ``events.PATIENCE``) before it is cut off as too slow (``dispatcher.gateway.events``).
    max_pending_events: int = 1000
    #: Seconds between WebSocket pings of event subscribers; a peer that does not answer
    #: one in time is closed. A plugin connected in is pinged by its target's heartbeat.
    heartbeat: float = 20.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    client_cert: ClientCertificates = "none"
    #: Seconds between checks of the certificate files' modification times.
    cert_check_interval: float = 5.0
    #: Seconds a drain lets calls in flight finish on SIGTERM/SIGINT.
    grace: float = 20.0
    #: The longest ``GET /v1/jobs/{id}?wait=`` may hold a request open; a longer wait is
    #: refused (400), so a client cannot park requests on the gateway for ever.
    max_job_wait: float = 30.0
    #: Waits (``?wait=`` > 0) parked at once on this gateway; one more is refused (503
    #: overloaded) instead of adding its reads of the state store to the others'.
    max_job_waits: int = 1000
    #: The longest deadline (ms) a caller may ask for, on either port; a longer one is cut
    #: to it (``call_headers.capped_timeout``), as Envoy's ``max_grpc_timeout`` does. It
    #: bounds only what a caller asks: a call that asks for none keeps its method's
    #: ``timeout_ms``, longer or not. None: ``MAX_TIMEOUT_MS``, a day.
    max_timeout_ms: int | None = None
    #: Calls the gRPC port holds at once, from their arrival (waiting for their message,
    #: ``body_timeout`` at most) to their answer; one more is refused RESOURCE_EXHAUSTED
    #: by grpc. A call waiting for its message costs the gateway ~19 kB (measured): a
    #: thousand is ~20 MB, the bound of ``max_job_waits`` and ``event_buffer`` too.
    max_grpc_calls: int = 1000
    #: Connections each port holds open at once, counted from their acceptance (a TLS
    #: handshake under way included); one more is refused at once (``dispatcher.gateway.
    #: listener``; on the gRPC port, grpc's own quota). What a connection costs, measured,
    #: and why 4,096: ``dispatcher.config.gateway.DEFAULT_MAX_CONNECTIONS``.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Connections one peer address may hold open on the HTTP port (an IPv6 peer is its
    #: /64); None: a quarter of ``max_connections`` (``connections_per_peer``).
    max_connections_per_peer: int | None = None
    #: Plain calls answered on the call lane (``dispatcher.gateway.lane``); False: every
    #: request through aiohttp.web.
    call_lane: bool = True
    #: What callers are told of the infrastructure's failures (``dispatcher.gateway.disclosure``).
    error_detail: ErrorDetail = "safe"

    def __post_init__(self) -> None:
        if not self.host.strip():  # the socket layer takes "" as every interface
            raise ValueError(
                "host is empty: name the interface (127.0.0.1; 0.0.0.0 or :: for every one)"
            )
        for name in ("port", "grpc_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], not {port}")
        for name in (
            "max_body_bytes",
            "max_depth",
            "event_buffer",
            "max_pending_events",
            "max_job_waits",
            "max_grpc_calls",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("max_connections", "max_connections_per_peer"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= MOST_CONNECTIONS:
                raise ValueError(f"{name} must be in [1, {MOST_CONNECTIONS}], not {value}")
        if self.connections_per_peer > self.max_connections:
            raise ValueError(
                f"max_connections_per_peer ({self.max_connections_per_peer}) is above"
                f" max_connections ({self.max_connections}): lower it, or raise max_connections"
            )
        for name in (
            "body_timeout",
            "header_timeout",
            "keep_alive_timeout",
            "heartbeat",
            "cert_check_interval",
        ):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.error_detail not in ("safe", "full"):
            raise ValueError(f"error_detail is safe or full, not {self.error_detail!r}")
        if not (0 <= self.max_job_wait <= 3_600):
            raise ValueError(
                f"max_job_wait must be in [0, 3600] seconds, not {self.max_job_wait!r}"
            )
        cap = self.max_timeout_ms
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_TIMEOUT_MS
        ):
            raise ValueError(
                f"max_timeout_ms must be an integer of milliseconds in [1, {MAX_TIMEOUT_MS}],"
                f" not {cap!r}"
            )
        if not (0 <= self.grace <= 86_400):
            raise ValueError(f"grace must be in [0, 86400] seconds, not {self.grace!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        if self.client_cert != "none" and (self.client_ca is None or self.tls_cert is None):
            raise ValueError(
                "client certificates need TLS and the CA that signs them (--client-ca)"
            )
        if self.client_ca is not None and self.client_cert == "none":
            raise ValueError(
                "--client-ca given: say whether a client certificate is optional or required (--client-cert)"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def server_tls(self) -> ServerTls | None:
        """What the gateway's port serves TLS with; None: plain HTTP."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return ServerTls(
            cert=self.tls_cert,
            key=self.tls_key,
            client_ca=self.client_ca,
            client_cert=self.client_cert,
            port="gateway",
        )

    @property
    def connections_per_peer(self) -> int:
        """``max_connections_per_peer``, or a quarter of ``max_connections`` when unset:
        one peer cannot take them all, and a few (a load balancer's nodes) still can."""
        if self.max_connections_per_peer is not None:
            return self.max_connections_per_peer
        return max(1, self.max_connections // 4)

    @classmethod
    def from_config(cls, config: GatewayConfig | None, **overrides: Any) -> GatewaySettings:
        """The manifest's ``gateway:`` section, then ``overrides`` (the command line's
        options that were given) on top; keys of ``overrides`` are field names."""
        values: dict[str, Any] = {}
        if config is not None:
            tls = config.tls
            values = {
                "host": config.host,
                "port": config.port,
                "grpc_port": config.grpc_port,
                "max_body_bytes": config.max_body_bytes,
                "body_timeout": config.timeouts.body_ms / 1000,
                "header_timeout": config.timeouts.header_ms / 1000,
                "keep_alive_timeout": config.timeouts.keep_alive_ms / 1000,
                "heartbeat": config.timeouts.heartbeat_ms / 1000,
                "max_job_wait": config.timeouts.job_wait_ms / 1000,
                "max_job_waits": config.max_job_waits,
                "max_timeout_ms": config.max_timeout_ms,
                "max_grpc_calls": config.max_grpc_calls,
                "max_connections": config.max_connections,
                "max_connections_per_peer": config.max_connections_per_peer,
                "grace": config.grace_ms / 1000,
                "call_lane": config.call_lane,
                "error_detail": config.error_detail,
            }
            if tls is not None:
                values |= {
                    "tls_cert": tls.cert,
                    "tls_key": tls.key,
                    "client_ca": tls.client_ca,
                    "client_cert": tls.client_certificates,
                }
        # Checked once, on the result: a partial mix may be inconsistent on its way there.
        return cls(**(values | overrides))
