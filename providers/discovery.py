"""Where a fleet finds instances that come and go: DNS records and a registry.

A fleet target's ``instances:`` mixes fixed addresses (each provider's own model, e.g.
``{url: …}`` for HTTP) with *discovery sources*, which the dispatcher watches while it runs
(``dispatcher.fleet.sources``):

    instances:
      - url: http://10.0.0.5:8080
      - dns: {name: _echo._tcp.plugins.internal, type: SRV}
      - dns: {name: echo.plugins.internal, type: A, port: 8080}
      - registry: {etcd: http://127.0.0.1:2379, prefix: /linchkit/plugins/echo}

A source (``InstanceSource``, the seam) reports ``Endpoint``s (host, port, weight, or an
opaque ``key`` for instances that are not addresses, such as a plugin's connection); the
target turns each into a concrete target with ``TargetConfig.instance_at``. This module
holds the manifest's models, checked when the manifest loads, and the seam; the sources
that watch DNS and etcd live in ``dispatcher.fleet.sources``, and a provider whose
instances it knows itself (plugins that connect in) offers one through
``Provider.instance_source``. It imports nothing of the rest of the providers package but
the models' leaves (``providers.model``, ``providers.tls``), so ``providers.target`` can
build on it.

The registry contract (what a plugin writes, what the dispatcher reads) is one etcd key
per instance under the prefix, ``<prefix>/<instance id>``, attached to a lease the
instance keeps alive, whose value is JSON: ``{"url": "http://host:port"}`` for an HTTP
server or ``{"address": "host:port"}`` for a gRPC one, optionally ``"weight"`` (1-1000).
The SDKs' registration (``--register-etcd``, ``LINCHKIT_REGISTER_ETCD``) writes exactly
that (``linchkit_plugin.registry``, ``sdk/go/plugin/registry.go``; docs/registry.md).
"""

from __future__ import annotations

import abc
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    field_validator,
    model_validator,
)

from providers._headers import BaseUrl
from providers.model import StrictModel
from providers.tls import ClientTls

__all__ = [
    "DnsDiscovery",
    "DnsInstance",
    "Endpoint",
    "EtcdAccess",
    "EtcdAuth",
    "InstanceSource",
    "RegistryDiscovery",
    "RegistryInstance",
    "Report",
    "Weight",
    "discovery_kind",
]

#: How much of a fleet's traffic an instance takes, relative to the others (``weighted``).
Weight = Annotated[int, Field(ge=1, le=1000)]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance a source found: where it listens and how much traffic it takes."""

    host: str
    port: int
    weight: int = 1
    #: For URL-addressed targets (HTTP, Knative): the scheme and path of the instance.
    scheme: str = "http"
    path: str = ""
    #: For instances that are not addresses (a plugin connected in): who it is.
    key: str = ""

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        if self.key:
            return self.key
        return self.address() if not self.path else self.url()


#: What a source calls with the whole list of endpoints it knows, each time it changes.
Report = Callable[[Sequence[Endpoint]], None]


class InstanceSource(abc.ABC):
    """Watches one place instances are listed and reports the endpoints listed there."""

    def __init__(self, name: str) -> None:
        #: What ``dispatcher health`` calls the source, e.g. ``dns SRV _echo._tcp.example``.
        self.name = name
        #: Why the last read failed, or None after a good one; the last list stays in use.
        self.error: str | None = None
        #: How many good reads so far (the first one ends the dispatcher's start wait).
        self.reads = 0
        #: How many reads failed so far (``dispatcher_fleet_source_failed_reads_total``).
        self.failed_reads = 0

    @abc.abstractmethod
    async def run(self, report: Report) -> None:
        """Read the source and ``report`` its endpoints, again whenever they may have
        changed, until cancelled. Failures set ``error`` and are retried; never raises."""

    async def aclose(self) -> None:
        """Release what ``run`` opened (clients, sessions); called after ``run`` ended."""
        return None  # a source holding nothing open has nothing to release

    def __repr__(self) -> str:
        state = f" error={self.error!r}" if self.error else ""
        return f"<{type(self).__name__} {self.name} reads={self.reads}{state}>"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DnsDiscovery(_Spec):
    """Instances from DNS: the A/AAAA records of a name (with a port), or its SRV records."""

    name: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9_.-]+\.?$")
    type: Literal["A", "AAAA", "SRV"] = "SRV"
    port: int | None = Field(
        default=None, ge=1, le=65535, description="The port of A/AAAA instances."
    )
    scheme: Literal["http", "https"] = Field(
        default="http", description="For URL targets (HTTP, Knative): how to reach instances."
    )
    server: str | None = Field(
        default=None,
        description="host:port of the DNS server to ask; default: the system's resolvers.",
    )
    min_refresh_ms: int = Field(
        default=1_000, ge=100, description="Resolve again no sooner than this, whatever the TTL."
    )
    max_refresh_ms: int = Field(
        default=300_000, ge=100, description="Resolve again at least this often."
    )
    timeout_ms: int = Field(default=2_000, ge=10, le=60_000)

    @model_validator(mode="after")
    def _port_matches_type(self) -> DnsDiscovery:
        if self.type == "SRV" and self.port is not None:
            raise ValueError("an SRV record names its own port: drop port")
        if self.type != "SRV" and self.port is None:
            raise ValueError(f"{self.type} records carry no port: give port")
        if self.min_refresh_ms > self.max_refresh_ms:
            raise ValueError("min_refresh_ms must not exceed max_refresh_ms")
        return self

    @field_validator("server")
    @classmethod
    def _server_is_host_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"server must be host:port, got {value!r}")
        return value

    def server_address(self) -> tuple[str, int] | None:
        if self.server is None:
            return None
        host, _, port = self.server.rpartition(":")
        return host.strip("[]"), int(port)

    def describe(self) -> str:
        where = f":{self.port}" if self.port is not None else ""
        return f"dns {self.type} {self.name}{where}"


class EtcdAuth(StrictModel):
    """``auth:`` etcd's own users: the dispatcher asks ``/v3/auth/authenticate`` for a token
    and sends it with every request, asking again once the token has expired."""

    username: str = Field(min_length=1, max_length=256)
    password: SecretStr = Field(
        min_length=1,
        description="Write it as ${NAME} and keep it in the environment: a manifest is read"
        " by many.",
    )


class EtcdAccess(StrictModel):
    """How the dispatcher reaches an etcd: its URL, TLS towards it, and the user it is.

    With ``tls``, the URL is ``https://``: ``ca_file`` verifies etcd (instead of the
    system's roots), ``cert_file``/``key_file`` are presented to an etcd that asks for a
    client certificate (``--client-cert-auth``; etcd may also take the certificate's
    common name as the user); the files are read again when they change. With ``auth``,
    a password never crosses a network in clear: ``http://`` only to a loopback address.
    """

    etcd: BaseUrl = Field(description="Base URL of etcd's client API (v3 JSON gateway).")
    tls: ClientTls | None = Field(
        default=None, description="TLS towards etcd (an https:// URL): CA, client certificate."
    )
    auth: EtcdAuth | None = Field(default=None, description="etcd user and password.")

    @field_validator("etcd")
    @classmethod
    def _no_credentials(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        if value.username or value.password:
            raise ValueError(
                "etcd credentials do not go in the URL (it shows in logs and health):"
                " use auth: {username, password}"
            )
        return value

    @model_validator(mode="after")
    def _secrets_cross_no_network_in_clear(self) -> Self:
        if self.etcd.scheme == "https":
            return self
        if self.tls is not None:
            raise ValueError("tls needs an https:// etcd URL")
        if self.auth is not None and not _loopback(self.etcd.host):
            raise ValueError(
                "auth over http:// would send the password in clear: use an https:// etcd"
                " URL (http:// is allowed to a loopback address only)"
            )
        return self

    def describe(self) -> str:
        return f"etcd {str(self.etcd).rstrip('/')}"


def _loopback(host: str | None) -> bool:
    name = (host or "").strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class EtcdWatch(EtcdAccess):
    """An etcd prefix read and then watched: how long each request may take, how soon
    a failed read is tried again, and how long a silent watch goes before etcd is asked
    whether it still answers (a frozen etcd keeps its connections open, and its kernel
    answers TCP keepalive)."""

    prefix: str = Field(min_length=2, pattern=r"^/[^\s]*[^/\s]$")
    timeout_ms: int = Field(default=2_000, ge=10, le=60_000)
    retry_ms: int = Field(
        default=1_000, ge=10, description="Wait before reading again after etcd failed."
    )
    idle_probe_ms: int = Field(
        default=10_000,
        ge=100,
        le=3_600_000,
        description="Silence on the watch after which etcd is asked a small read; one not"
        " answered within timeout_ms fails the watch, which is read again.",
    )

    def describe(self) -> str:
        return f"{super().describe()} {self.prefix}"


class RegistryDiscovery(EtcdWatch):
    """Instances from an etcd registry: every key under ``prefix``, watched."""


class DnsInstance(_Spec):
    dns: DnsDiscovery


class RegistryInstance(_Spec):
    registry: RegistryDiscovery


def discovery_kind(item: Any) -> str:
    """The tag of one ``instances:`` item: ``dns``, ``registry`` or ``fixed``.

    A discriminator, so a bad item gets the errors of the kind it means, not of every
    kind it might have been.
    """
    keys = (
        item.keys() if isinstance(item, dict) else vars(item) if hasattr(item, "__dict__") else ()
    )
    if "dns" in keys:
        return "dns"
    if "registry" in keys:
        return "registry"
    return "fixed"


def instance_item(fixed: type[BaseModel]) -> Any:
    """The type of one ``instances:`` item of a target whose fixed instances are ``fixed``."""
    return Annotated[
        Annotated[fixed, Tag("fixed")]
        | Annotated[DnsInstance, Tag("dns")]
        | Annotated[RegistryInstance, Tag("registry")],
        Discriminator(discovery_kind),
    ]
