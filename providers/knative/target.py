"""``provider: knative`` as the manifest states it: where the service is, and how to deploy it.

Vendor-free: loading a manifest with knative targets imports neither aiohttp, cloudevents
nor kubernetes-asyncio. Every model is a ``StrictModel`` (unknown keys are errors, frozen
once loaded), and ``deploy.cluster.kubeconfig`` is a ``ManifestPath``, taken from the
manifest's folder like every other path in a manifest (``~`` is expanded first).

Several ingress gateways in front of one service (``instances: [{url: …}, {dns: …},
{registry: …}]``, instead of ``ingress`` or besides it) make the target a fleet, as for
HTTP (``providers.instances``): each instance is a target of one ingress, the service,
host and everything else shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BeforeValidator, Field, PrivateAttr, model_validator

from linchkit_plugin.errors import ProviderError
from providers._compression import HttpCompression
from providers._headers import BaseUrl, HeaderFields, RequestPath
from providers._http_client import ChosenClient, HttpPool, checked_http2
from providers.discovery import Weight, instance_item
from providers.instances import InstanceListing
from providers.model import Argv, EnvVars, ImageReference
from providers.target import (
    Balance,
    Destination,
    HealthCheck,
    ManifestPath,
    OutlierDetection,
    StrictModel,
    masked_url,
)
from providers.tls import ClientTls

__all__ = ["KnativeCanary", "KnativeCluster", "KnativeDeploy", "KnativeIngress", "KnativeTarget"]

_DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"


def _expand_user(value: Any) -> Any:
    """``~/.kube/config`` means the home folder, not a folder named ``~`` beside the manifest."""
    if isinstance(value, str | Path):
        return Path(value).expanduser()
    return value


class KnativeCanary(StrictModel):
    """Split traffic between the revision of ``stable_version`` and the one being deployed."""

    stable_version: str = Field(description="Plugin version whose revision keeps the rest.")
    percent: Annotated[int, Field(ge=0, le=100)] = Field(
        description="Share of the service's traffic the new revision gets."
    )
    tag: Annotated[str, Field(pattern=_DNS_LABEL, max_length=20)] = "canary"


class KnativeCluster(StrictModel):
    """Where ``dispatcher deploy`` applies the Service; unset: render only."""

    kubeconfig: Annotated[ManifestPath, BeforeValidator(_expand_user)] | None = Field(
        default=None, description="Default: $KUBECONFIG or ~/.kube/config."
    )
    context: str | None = None


class KnativeDeploy(StrictModel):
    """What ``dispatcher deploy`` renders into a ``serving.knative.dev/v1`` Service."""

    secret_fields = frozenset({"env"})

    image: ImageReference = Field(examples=["registry.example.com/plugins/echo:1.1.0"])
    args: Argv = Field(default_factory=list)
    env: EnvVars = Field(default_factory=dict)
    requests: dict[Literal["cpu", "memory", "ephemeral-storage"], Annotated[str, Field(pattern=_QUANTITY)]] = Field(default_factory=dict)  # fmt: skip
    limits: dict[Literal["cpu", "memory", "ephemeral-storage"], Annotated[str, Field(pattern=_QUANTITY)]] = Field(default_factory=dict)  # fmt: skip
    container_concurrency: Annotated[int, Field(ge=0, le=1000)] = 0
    min_scale: Annotated[int, Field(ge=0)] = 0
    max_scale: Annotated[int, Field(ge=0)] | None = None
    timeout_seconds: Annotated[int, Field(ge=1, le=3600)] | None = None
    port: Annotated[int, Field(gt=0, lt=65536)] | None = None
    canary: KnativeCanary | None = None
    cluster: KnativeCluster | None = None

    @model_validator(mode="after")
    def _scale_bounds(self) -> KnativeDeploy:
        if self.max_scale and self.min_scale > self.max_scale:
            raise ValueError(f"min_scale {self.min_scale} is above max_scale {self.max_scale}")
        return self


class KnativeIngress(StrictModel):
    """One ingress gateway of a Knative fleet: where it listens."""

    url: BaseUrl
    weight: Weight = 1


class KnativeTarget(InstanceListing):
    """``provider: knative``: a Knative Service reached through the cluster's ingress."""

    address_field = "ingress"
    instance_key = "url"
    address_noun = "an ingress"

    provider: Literal["knative"]
    service: Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)]
    namespace: Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)] = "default"
    domain: str = Field(
        default="example.com",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="The cluster's domain (config-domain); example.com is Knative's default.",
    )
    ingress: BaseUrl | None = Field(
        default=None, description="Where the cluster ingress listens, e.g. http://10.0.0.5"
    )
    instances: list[instance_item(KnativeIngress)] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Several ingress gateways of the service (a fleet): fixed URLs, DNS names,"
        " an etcd registry; ingress, if set, is the first.",
    )
    balance: Balance = "least_request"
    health_check: HealthCheck | None = None
    outlier: OutlierDetection = Field(default_factory=OutlierDetection)
    tag: Annotated[str, Field(pattern=_DNS_LABEL, max_length=20)] | None = Field(
        default=None, description="Call this tagged traffic target instead of the main route."
    )
    mode: Literal["binary", "structured", "envelope"] = "binary"
    invoke_path: RequestPath | None = Field(
        default=None, description="Default: / for CloudEvents, /invoke for envelope."
    )
    readiness_path: RequestPath | None = Field(
        default=None, description="Default: /health/readiness (func-python), /health."
    )
    headers: HeaderFields = Field(default_factory=dict)
    max_response_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    activation_backoff_ms: Annotated[int, Field(gt=0)] = 50
    activation_backoff_max_ms: Annotated[int, Field(gt=0)] = 1000
    deploy: KnativeDeploy | None = None
    tls: ClientTls | None = Field(
        default=None,
        description="Verify the ingress with ca_file, present cert_file/key_file (mTLS);"
        " https ingresses only. server_name: the name the ingress's certificate carries.",
    )
    client: ChosenClient = Field(
        default=None,
        description="The HTTP client of this target's calls: aiohttp or reqwest (the"
        " reqwest extra); default: the provider's (aiohttp).",
    )
    pool: HttpPool | None = Field(
        default=None,
        description="A connection pool of this target's own; default: the provider's"
        " shared pool to the ingress (512 connections).",
    )
    http2: bool = Field(
        default=False,
        description="Speak HTTP/2 to the ingress without negotiating (h2c on http://, h2 on"
        " https://), the service's host as each request's :authority: the calls in flight"
        " share a connection instead of holding one each. client: reqwest only.",
    )
    compression: HttpCompression = Field(
        default_factory=HttpCompression,
        description="Compress large request envelopes where the function accepts it, and"
        " accept compressed answers (providers._compression).",
    )

    secret_fields = frozenset({"headers"})

    #: Set on the instances of a fleet, never by a manifest (so not part of ``key``): an
    #: ingress that refuses connections is then left to the fleet, which sends the call to
    #: another, instead of being tried again here until the deadline (``provider``).
    _in_fleet: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _one_source_of_credentials(self) -> KnativeTarget:
        in_urls = any(url.username or url.password for url in self._ingresses())
        if in_urls and any(key.lower() == "authorization" for key in self.headers):
            raise ValueError(
                "credentials twice: user:password in ingress and an Authorization header"
                " would both set the Authorization header; keep one"
            )
        return self

    @model_validator(mode="after")
    def _http2_needs_reqwest(self) -> KnativeTarget:
        checked_http2(self.http2, self.client)
        if self.http2 and self.tls is not None and self.tls.server_name is not None:
            # HTTP/2 routes by :authority, which is also the name TLS verifies here.
            raise ValueError(
                "http2: true sends the service's host as the request's authority and TLS"
                f" server name ({self.host}): tls.server_name cannot name another"
            )
        return self

    @model_validator(mode="after")
    def _tls_needs_https(self) -> KnativeTarget:
        if self.tls is not None:
            plain = [str(url) for url in self._ingresses() if url.scheme != "https"]
            if plain:
                raise ValueError(f"tls is set but the ingress {masked_url(plain[0])} is not https")
        return self

    def destinations(self) -> tuple[Destination, ...]:
        return self.listed_destinations(Destination.of_url)

    def at_place(self, place: str) -> KnativeTarget:
        instance = super().at_place(place)
        # A list of one is no fleet: nothing else to turn to, so it waits like a plain target.
        instance._in_fleet = self.is_fleet()
        return instance

    @property
    def in_fleet(self) -> bool:
        """True for an instance of a fleet: it has other ingresses to turn to."""
        return self._in_fleet

    def ingress_url(self) -> AnyHttpUrl:
        """The one ingress a provider calls; a fleet has none (its instances do)."""
        if self.ingress is None or self.instances:
            raise ProviderError(
                f"{self.describe()} is a fleet: the dispatcher calls one of its instances"
            )
        return self.ingress

    def _ingresses(self) -> list[AnyHttpUrl]:
        head = [] if self.ingress is None else [self.ingress]
        return head + [i.url for i in self.instances if isinstance(i, KnativeIngress)]

    @property
    def host(self) -> str:
        prefix = f"{self.tag}-" if self.tag else ""
        return f"{prefix}{self.service}.{self.namespace}.{self.domain}"

    @property
    def effective_invoke_path(self) -> str:
        return self.invoke_path or ("/invoke" if self.mode == "envelope" else "/")

    @property
    def effective_readiness_path(self) -> str:
        return self.readiness_path or (
            "/health" if self.mode == "envelope" else "/health/readiness"
        )

    def describe(self) -> str:
        places = self.fixed_places()
        if len(places) == 1 and not self.instance_sources():
            via = masked_url(places[0][0]).rstrip("/")
        else:
            via = "fleet " + self.listing(lambda url: masked_url(url).rstrip("/"))
        return f"knative {self.host} via {via} ({self.mode})"
