"""The manifest: which plugins exist, their methods, where each runs and how it is called.

``policies`` holds the policy settings, ``security`` the ``auth``, ``access`` and ``audit``
sections, ``gateway`` the ``gateway`` section, ``state`` where the policies keep their state,
``manifest`` the plugin and method models,
``loader`` reads YAML or TOML into them (``includes``: the files a manifest includes), ``errors`` reports what is wrong with a file.
"""

from __future__ import annotations

from dispatcher.config.errors import ManifestError, ManifestProblem
from dispatcher.config.gateway import GatewayConfig, GatewayTimeouts, GatewayTls
from dispatcher.config.includes import watched_paths
from dispatcher.config.jobs import JobsConfig, SqsJobsConfig
from dispatcher.config.loader import load_manifest, merge_entries, parse_manifest
from dispatcher.config.manifest import Lifecycle, Manifest, MethodSpec, PluginSpec
from dispatcher.config.policies import (
    DEFAULT_TIMEOUT_MS,
    FALLBACK_ERROR_TYPES,
    BatchPolicy,
    BreakerPolicy,
    CachePolicy,
    ConcurrencyPolicy,
    FallbackPolicy,
    HedgePolicy,
    Policies,
    RateLimit,
    RetryPolicy,
)
from dispatcher.config.registry import EntryTrust, RegistryConfig
from dispatcher.config.rollouts import RolloutSpec, ShadowSpec
from dispatcher.config.security import (
    AccessConfig,
    ApiKey,
    AuditConfig,
    AuthConfig,
    JwtConfig,
    MtlsIdentity,
    RoleRules,
)
from dispatcher.config.state import StateConfig
from dispatcher.config.telemetry import (
    LogSettings,
    MetricsSettings,
    ResolvedTracing,
    Telemetry,
    TelemetryEnvironmentError,
    TokenFileError,
    TracingSettings,
)

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "FALLBACK_ERROR_TYPES",
    "AccessConfig",
    "ApiKey",
    "AuditConfig",
    "AuthConfig",
    "BatchPolicy",
    "BreakerPolicy",
    "CachePolicy",
    "ConcurrencyPolicy",
    "EntryTrust",
    "FallbackPolicy",
    "GatewayConfig",
    "GatewayTimeouts",
    "GatewayTls",
    "HedgePolicy",
    "JobsConfig",
    "JwtConfig",
    "Lifecycle",
    "LogSettings",
    "Manifest",
    "ManifestError",
    "ManifestProblem",
    "MethodSpec",
    "MetricsSettings",
    "MtlsIdentity",
    "PluginSpec",
    "Policies",
    "RateLimit",
    "RegistryConfig",
    "ResolvedTracing",
    "RetryPolicy",
    "RoleRules",
    "RolloutSpec",
    "ShadowSpec",
    "SqsJobsConfig",
    "StateConfig",
    "Telemetry",
    "TelemetryEnvironmentError",
    "TokenFileError",
    "TracingSettings",
    "load_manifest",
    "merge_entries",
    "parse_manifest",
    "watched_paths",
]
