"""The manifest's ``telemetry:`` section: metrics, traces and logs of the dispatcher.

Everything is off unless asked for, so a manifest without the section runs exactly the
chain it ran before. Tracing may also be turned on by the standard OpenTelemetry
environment (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_SDK_DISABLED``): what the
manifest sets wins, the environment fills the rest (``TracingSettings.resolved``).
An endpoint or headers taken from the environment are checked as the manifest's are, and
a refusal names the variable (``TelemetryEnvironmentError``), never its value.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, field_validator, model_validator

from dispatcher.config.gateway import GatewayTls
from linchkit_plugin._span_export import ExportSettings, ExportSettingsError, read_export_settings
from providers._headers import (
    HeaderFields,
    checked_url,
    http_url_parts,
)
from providers.target import ManifestPath, StrictModel

__all__ = [
    "LogSettings",
    "MetricsSettings",
    "ResolvedTracing",
    "Telemetry",
    "TelemetryEnvironmentError",
    "TokenFileError",
    "TracingSettings",
    "listen_address",
]

#: The span exporter's default when only the environment names no path: OTLP/HTTP.
_TRACES_PATH = "/v1/traces"
#: The variables naming the traces endpoint: the traces' own, or the collector's root.
TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
ROOT_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
# The OTLP exporter adds the headers of OTEL_EXPORTER_OTLP_[TRACES_]HEADERS to the
# manifest's ``headers`` (which win for a header named in both); ``read_export_settings``
# holds those variables to the rules the manifest's are held to.


class TelemetryEnvironmentError(ValueError):
    """A variable the dispatcher's telemetry would use holds what it cannot use: an
    ``OTEL_*`` variable of its tracing, or the one ``telemetry.metrics.token_env`` names
    (unset or empty, too). Names the variable, never its value (an endpoint's password, a
    header's token, the scrape token)."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable}: {reason}")
        self.variable = variable
        self.reason = reason


class TokenFileError(TelemetryEnvironmentError):
    """The file ``telemetry.metrics.token_file`` names holds no usable scrape token as the
    dispatcher starts (missing, unreadable, empty, too large, or what no header carries).
    Names the file (``path``; also as ``variable``), never its content."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path = path


class MetricsSettings(StrictModel):
    """Prometheus metrics: a registry per dispatcher (``Dispatcher.metrics``), and where
    ``dispatcher serve`` serves them: on the gateway's port, or on an admin listener of
    their own (``listen``, over TLS with ``tls``); open to any scraper, or to the holder of a
    token (``token_env``, or ``token_file``, read again when it changes)."""

    enabled: bool = False
    #: Upper bounds (seconds) of the call latency histogram's buckets.
    latency_buckets: Annotated[
        tuple[Annotated[float, Field(gt=0)], ...], Field(min_length=1, max_length=30)
    ] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    listen: str | None = Field(
        default=None,
        description="HOST:PORT ([::1]:9464 for IPv6; port 0: any free port): serve /metrics,"
        " /healthz and /readyz there, and /metrics no longer on the gateway's port.",
    )
    token_env: str | None = Field(
        default=None,
        description="The environment variable holding the bearer token /metrics then"
        " requires (Authorization: Bearer …), wherever it is served.",
    )
    token_file: ManifestPath | None = Field(
        default=None,
        description="A file holding that token instead (a trailing newline is no part of it),"
        " read again when it changes; the previous token is still admitted for 2 minutes.",
    )
    tls: GatewayTls | None = Field(
        default=None,
        description="Serve the admin listener over HTTPS, as gateway.tls serves the gateway's"
        " port: cert, key, client_ca, client_cert.",
    )

    @field_validator("latency_buckets")
    @classmethod
    def _increasing(cls, buckets: tuple[float, ...]) -> tuple[float, ...]:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("bucket bounds must increase strictly")
        return buckets

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, listen: str | None) -> str | None:
        if listen is not None:
            listen_address(listen)
        return listen

    @field_validator("token_env")
    @classmethod
    def _variable_name(cls, variable: str | None) -> str | None:
        if variable is not None and not _VARIABLE.fullmatch(variable):
            raise ValueError(
                "the name of an environment variable (letters, digits and '_', not first"
                " a digit; at most 128), not its value"
            )
        return variable

    @model_validator(mode="after")
    def _serving_needs_metrics(self) -> Self:
        if not self.enabled:
            for name in ("listen", "token_env", "token_file", "tls"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} is set but metrics are off: add enabled: true, or drop {name}"
                    )
        if self.token_env is not None and self.token_file is not None:
            raise ValueError(
                "token_env and token_file: one or the other names the scrape token, not both"
            )
        if self.tls is not None and self.listen is None:
            raise ValueError(
                "tls is the admin listener's, and needs listen (HOST:PORT) to have one; on"
                " the gateway's port, /metrics is served over gateway.tls"
            )
        return self

    @property
    def listen_at(self) -> tuple[str, int] | None:
        """``listen`` as the host to bind (an IPv6 address without its brackets) and the
        port; None when metrics are served on the gateway's port."""
        return None if self.listen is None else listen_address(self.listen)


#: A host name as DNS writes one (letters, digits, '-', dots between labels).
_HOST_NAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z"
)
_PORT = re.compile(r"[0-9]{1,5}\Z")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def listen_address(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` as ``(host, port)``: an IPv4 address or a host name, or an IPv6
    address in brackets (``[::1]:9464``, returned without them); the port 0-65535 (0: any
    free port). ``ValueError`` saying what is wrong and how it is written."""
    form = "HOST:PORT expected (127.0.0.1:9464, [::1]:9464; port 0: any free port)"
    if "://" in listen:
        raise ValueError(f"{form}: an address, not a URL")
    if listen.startswith("["):
        inside, bracket, port = listen[1:].partition("]:")
        if not bracket:
            raise ValueError(f"{form}: an IPv6 address in brackets, then ':' and the port")
        if not _is_ipv6(inside):
            raise ValueError(f"{form}: {inside[:60]!r} in brackets is not an IPv6 address")
        host = inside
    else:
        host, colon, port = listen.rpartition(":")
        if not colon:
            raise ValueError(f"{form}: no port")
        if ":" in host and _is_ipv6(host):
            raise ValueError(f"{form}: an IPv6 address goes in brackets, [{host[:60]}]:{port[:8]}")
        if not host:  # the socket layer takes "" as every interface
            raise ValueError(f"{form}: the host is empty (0.0.0.0 or [::] for every interface)")
        if not _HOST_NAME.match(host):
            raise ValueError(f"{form}: {host[:60]!r} is neither an IPv4 address nor a host name")
    if not _PORT.match(port) or int(port) > 65535:
        raise ValueError(f"{form}: the port {port[:8]!r} is not a number from 0 to 65535")
    return host, int(port)


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
        return None if endpoint is None else _checked_endpoint(endpoint)

    def endpoint_origin(self, environ: Mapping[str, str] | None = None) -> str:
        """Where ``resolved().endpoint`` comes from, to name it in a refusal: this field,
        or the ``OTEL_*`` variable that set it."""
        env = os.environ if environ is None else environ
        if self.otlp_endpoint is not None:
            return "telemetry.tracing.otlp_endpoint"
        return TRACES_ENDPOINT if env.get(TRACES_ENDPOINT) else ROOT_ENDPOINT

    def resolved(self, environ: Mapping[str, str] | None = None) -> ResolvedTracing | None:
        """The settings to trace with, the environment filling what is unset; None: off.
        ``TelemetryEnvironmentError`` if a variable it would use holds what the manifest
        could not: an exporter sending to it would fail only when it first exports, or
        print the value in the warning that drops it."""
        env = os.environ if environ is None else environ
        if self.enabled is False or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return None
        endpoint = self.otlp_endpoint or _endpoint_from(env)
        if endpoint is None and not self.enabled:
            return None
        export = ExportSettings()
        if endpoint is not None:  # an exporter: it reads the headers' variables too
            with _export_refusal():
                export = read_export_settings(env)
        return ResolvedTracing(
            endpoint=endpoint,
            export=export,
            headers=dict(self.headers),
            sample_ratio=self.sample_ratio
            if self.sample_ratio is not None
            else _ratio_from_env(env),
            service_name=self.service_name or env.get("OTEL_SERVICE_NAME") or "linchkit-dispatcher",
        )


def _checked_endpoint(endpoint: str, what: str = "the OTLP endpoint") -> str:
    """An http(s) URL with a host, sent as written (``checked_url``); a user and password
    are the exporter's basic credentials. Never quoted: it may hold them."""
    checked_url(endpoint)
    parts = http_url_parts(endpoint, what)
    if parts.fragment or "#" in endpoint:
        raise ValueError(f"{what} has no fragment: it would not be sent")
    return endpoint


def _endpoint_from(env: Mapping[str, str]) -> str | None:
    """The traces endpoint the ``OTEL_*`` variables name, checked as the manifest's is."""
    if endpoint := env.get(TRACES_ENDPOINT):
        with _refusal_naming(TRACES_ENDPOINT):
            return _checked_endpoint(endpoint, "the traces endpoint")
    if root := env.get(ROOT_ENDPOINT):
        with _refusal_naming(ROOT_ENDPOINT):
            # The collector's root: signals append their path to it.
            if "?" in root or "#" in root:
                raise ValueError(
                    f"the collector's URL has no query or fragment: {_TRACES_PATH} is appended"
                )
            return _checked_endpoint(root.rstrip("/") + _TRACES_PATH, "the collector's URL")
    return None


@contextlib.contextmanager
def _export_refusal() -> Iterator[None]:
    """An ``ExportSettingsError`` (an ``OTEL_*`` variable of the export, named, its value
    never), as the ``TelemetryEnvironmentError`` the manifest's checks report."""
    try:
        yield
    except ExportSettingsError as error:
        raise TelemetryEnvironmentError(error.variable, error.reason) from None


@contextlib.contextmanager
def _refusal_naming(variable: str) -> Iterator[None]:
    """A ``ValueError`` of the checks, as the ``TelemetryEnvironmentError`` of ``variable``
    (their messages name what is wrong, never the value)."""
    try:
        yield
    except ValueError as error:
        raise TelemetryEnvironmentError(variable, str(error)) from None


class ResolvedTracing(StrictModel):
    """What tracing runs with once manifest and environment are merged.

    ``endpoint`` None (``enabled: true`` with no endpoint anywhere): spans are made and
    propagated, and go to the span processors the host adds (``Telemetry.tracer_provider``).
    """

    endpoint: str | None
    #: The exporter's timeout and the batch processor's settings the ``OTEL_*`` variables
    #: set, read once and checked (``linchkit_plugin._span_export``).
    export: ExportSettings = Field(default_factory=ExportSettings)
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

    @field_validator("level", mode="before")
    @classmethod
    def _any_case(cls, level: object) -> object:
        # As the command line's --log-level takes it: `info` is INFO.
        return level.upper() if isinstance(level, str) else level


class Telemetry(StrictModel):
    """The manifest's top-level ``telemetry:``."""

    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    logs: LogSettings = Field(default_factory=LogSettings)
    #: How many recent errors ``Dispatcher.telemetry.errors`` keeps (a ring).
    recent_errors: Annotated[int, Field(ge=1, le=10_000)] = 100
