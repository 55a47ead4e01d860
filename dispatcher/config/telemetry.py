"""The manifest's ``telemetry:`` section: metrics, traces and logs of the dispatcher.

Everything is off unless asked for, so a manifest without the section runs exactly the
chain it ran before. Tracing may also be turned on by the standard OpenTelemetry
environment (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_SDK_DISABLED``): what the
manifest sets wins, the environment fills the rest (``TracingSettings.resolved``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, field_validator

from providers._headers import HeaderFields, checked_url, http_url_parts
from providers.target import StrictModel

__all__ = ["LogSettings", "MetricsSettings", "ResolvedTracing", "Telemetry", "TracingSettings"]

#: The span exporter's default when only the environment names no path: OTLP/HTTP.
_TRACES_PATH = "/v1/traces"


class MetricsSettings(StrictModel):
    """Prometheus metrics: a registry per dispatcher (``Dispatcher.metrics``)."""

    enabled: bool = False
    #: Upper bounds (seconds) of the call latency histogram's buckets.
    latency_buckets: Annotated[
        tuple[Annotated[float, Field(gt=0)], ...], Field(min_length=1, max_length=30)
    ] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    @field_validator("latency_buckets")
    @classmethod
    def _increasing(cls, buckets: tuple[float, ...]) -> tuple[float, ...]:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("bucket bounds must increase strictly")
        return buckets


class TracingSettings(StrictModel):
    """OpenTelemetry traces, sent over OTLP/HTTP (protobuf)."""

    secret_fields = frozenset({"headers"})

    enabled: bool | None = Field(
        default=None,
        description="Unset: on when an OTLP endpoint is configured here or in OTEL_* variables.",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces.",
    )
    headers: HeaderFields = Field(default_factory=dict)
    sample_ratio: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        default=None,
        description="Share of root calls traced; a caller's sampled flag is always followed.",
    )
    service_name: str | None = None

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, endpoint: str | None) -> str | None:
        """An http(s) URL with a host, sent as written (``checked_url``); a user and
        password are the exporter's basic credentials. Never quoted: it may hold them."""
        if endpoint is None:
            return None
        checked_url(endpoint)
        parts = http_url_parts(endpoint, "the OTLP endpoint")
        if parts.fragment or "#" in endpoint:
            raise ValueError("the OTLP endpoint has no fragment: it would not be sent")
        return endpoint

    def endpoint_origin(self, environ: Mapping[str, str] | None = None) -> str:
        """Where ``resolved().endpoint`` comes from, to name it in a refusal: this field,
        or the ``OTEL_*`` variable that set it."""
        env = os.environ if environ is None else environ
        if self.otlp_endpoint is not None:
            return "telemetry.tracing.otlp_endpoint"
        if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            return "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        return "OTEL_EXPORTER_OTLP_ENDPOINT"

    def resolved(self, environ: Mapping[str, str] | None = None) -> ResolvedTracing | None:
        """The settings to trace with, the environment filling what is unset; None: off."""
        env = os.environ if environ is None else environ
        if self.enabled is False or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return None
        endpoint = self.otlp_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if endpoint is None and env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            # The generic variable names the collector's root; signals append their path.
            endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + _TRACES_PATH
        if endpoint is None and not self.enabled:
            return None
        return ResolvedTracing(
            endpoint=endpoint,
            headers=dict(self.headers),
            sample_ratio=self.sample_ratio
            if self.sample_ratio is not None
            else _ratio_from_env(env),
            service_name=self.service_name or env.get("OTEL_SERVICE_NAME") or "linchkit-dispatcher",
        )


class ResolvedTracing(StrictModel):
    """What tracing runs with once manifest and environment are merged.

    ``endpoint`` None (``enabled: true`` with no endpoint anywhere): spans are made and
    propagated, and go to the span processors the host adds (``Telemetry.tracer_provider``).
    """

    endpoint: str | None
    headers: dict[str, str]
    sample_ratio: float
    service_name: str

    secret_fields = frozenset({"headers"})


def _ratio_from_env(env: Mapping[str, str]) -> float:
    """``OTEL_TRACES_SAMPLER``: the ratio its root decision amounts to (the dispatcher always
    follows a caller's decision, as the ``parentbased_*`` samplers do)."""
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            return 1.0  # the SDK's own fallback for an unreadable argument
        return ratio if 0.0 <= ratio <= 1.0 else 1.0
    return 1.0


class LogSettings(StrictModel):
    """The ``dispatcher`` logger's output: ``text`` or ``json`` lines on stderr, each with
    the request id, trace id, plugin and method of the call it belongs to. Unset: the
    dispatcher leaves logging to the host."""

    format: Literal["text", "json"] | None = None
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Telemetry(StrictModel):
    """The manifest's top-level ``telemetry:``."""

    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    logs: LogSettings = Field(default_factory=LogSettings)
    #: How many recent errors ``Dispatcher.telemetry.errors`` keeps (a ring).
    recent_errors: Annotated[int, Field(ge=1, le=10_000)] = 100
