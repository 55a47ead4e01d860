"""``provider: knative`` as the manifest states it: where the service is, and how to deploy it.

Vendor-free: loading a manifest with knative targets imports neither aiohttp, cloudevents
nor kubernetes-asyncio. Every model is a ``StrictModel`` (unknown keys are errors, frozen
once loaded), and ``deploy.cluster.kubeconfig`` is a ``ManifestPath``, taken from the
manifest's folder like every other path in a manifest (``~`` is expanded first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BeforeValidator, Field, model_validator

from providers.target import Destination, ManifestPath, StrictModel, TargetConfig, masked_url

__all__ = ["KnativeCanary", "KnativeCluster", "KnativeDeploy", "KnativeTarget"]

_DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


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

    image: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[Annotated[str, Field(pattern=_ENV_NAME)], str] = Field(default_factory=dict)
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


class KnativeTarget(TargetConfig):
    """``provider: knative``: a Knative Service reached through the cluster's ingress."""

    provider: Literal["knative"]
    service: Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)]
    namespace: Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)] = "default"
    domain: str = Field(
        default="example.com",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="The cluster's domain (config-domain); example.com is Knative's default.",
    )
    ingress: AnyHttpUrl = Field(
        description="Where the cluster ingress listens, e.g. http://10.0.0.5"
    )
    tag: Annotated[str, Field(pattern=_DNS_LABEL, max_length=20)] | None = Field(
        default=None, description="Call this tagged traffic target instead of the main route."
    )
    mode: Literal["binary", "structured", "envelope"] = "binary"
    invoke_path: str | None = Field(
        default=None, pattern=r"^/", description="Default: / for CloudEvents, /invoke for envelope."
    )
    readiness_path: str | None = Field(
        default=None,
        pattern=r"^/",
        description="Default: /health/readiness (func-python), /health.",
    )
    headers: dict[str, str] = Field(default_factory=dict)
    max_response_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    activation_backoff_ms: Annotated[int, Field(gt=0)] = 50
    activation_backoff_max_ms: Annotated[int, Field(gt=0)] = 1000
    deploy: KnativeDeploy | None = None

    secret_fields = frozenset({"headers"})

    @model_validator(mode="after")
    def _one_source_of_credentials(self) -> KnativeTarget:
        if (self.ingress.username or self.ingress.password) and any(
            key.lower() == "authorization" for key in self.headers
        ):
            raise ValueError(
                "credentials twice: user:password in ingress and an Authorization header"
                " would both set the Authorization header; keep one"
            )
        return self

    def destinations(self) -> tuple[Destination, ...]:
        return (Destination.of_url("ingress", str(self.ingress)),)

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
        return f"knative {self.host} via {masked_url(self.ingress).rstrip('/')} ({self.mode})"
