"""The manifest's plugins and methods: which plugins exist and where each method runs.

A method's ``target`` is a union discriminated on ``provider``; ``loader`` specialises
``Manifest`` to the target models of every registered provider.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from dispatcher.config.gateway import GatewayConfig
from dispatcher.config.jobs import JobsConfig
from dispatcher.config.policies import Policies
from dispatcher.config.registry import RegistryConfig
from dispatcher.config.rollouts import RolloutSpec
from dispatcher.config.security import AccessConfig, AuditConfig, AuthConfig
from dispatcher.config.state import StateConfig
from dispatcher.config.telemetry import Telemetry
from providers.capabilities import Capabilities
from providers.egress import EgressPolicy
from providers.target import StrictModel, TargetConfig

__all__ = ["IDENTIFIER", "Lifecycle", "Manifest", "MethodSpec", "PluginSpec"]

TargetT = TypeVar("TargetT", bound=TargetConfig)

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
IDENTIFIER = r"^[A-Za-z][A-Za-z0-9_.-]*$"


class MethodSpec(Policies, Generic[TargetT]):
    """One method of a plugin: where it runs, what it accepts, how it is called."""

    description: str = ""
    target: TargetT | None = None
    params_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema (2020-12) the params must match."
    )

    @field_validator("params_schema")
    @classmethod
    def _schema_is_valid(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            # Imported here: jsonschema (with attrs and referencing) was a fifth of what
            # every CLI start imports, for the manifests that hold a schema at all.
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as error:
                raise ValueError(f"not a valid JSON Schema: {error.message}") from None
        return schema


_POLICY_FIELDS = frozenset(Policies.model_fields)


class Lifecycle(StrictModel):
    init_timeout_ms: Annotated[int, Field(gt=0)] = 30_000
    stop_timeout_ms: Annotated[int, Field(gt=0)] = 10_000


class PluginSpec(StrictModel, Generic[TargetT]):
    """One plugin at one version."""

    id: Annotated[str, Field(pattern=IDENTIFIER, max_length=128)]
    version: str
    runtime: Literal["python", "go", "rust", "java", "typescript", "javascript", "other"] = "python"
    description: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    target: TargetT | None = None
    defaults: Policies = Field(default_factory=Policies)
    lifecycle: Lifecycle = Field(default_factory=Lifecycle)
    capabilities: Capabilities = Field(
        default_factory=Capabilities,
        description="What the plugin may touch where its provider sandboxes it (defaults deny).",
    )
    protocol: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="The plugin protocol version it speaks; the dispatcher refuses one it"
        " does not, and a transport reporting another at attach (README: versions).",
    )
    methods: Annotated[dict[str, MethodSpec[TargetT]], Field(min_length=1)]

    @field_validator("version")
    @classmethod
    def _version_is_semver(cls, version: str) -> str:
        if not _SEMVER.fullmatch(version):  # match() let "1.0.0\n" through
            raise ValueError(f"expected a semantic version such as 1.2.3, got {version!r}")
        return version

    @field_validator("methods")
    @classmethod
    def _method_names_are_identifiers(
        cls, methods: dict[str, MethodSpec[TargetT]], info: ValidationInfo
    ) -> dict[str, MethodSpec[TargetT]]:
        for name in methods:
            if not re.fullmatch(IDENTIFIER, name):  # match() let "say\n" through
                raise ValueError(
                    f"method name {name!r} must start with a letter and hold only letters,"
                    " digits, '_', '.' and '-'"
                )
        key = _key_of(info)
        if key is None:
            return methods
        owned: dict[str, MethodSpec[TargetT]] = {}
        for name, method in methods.items():
            target = method.target
            mine = None if target is None else target.of_plugin(key)
            # A copy keeps what was set as set; the method has no cached state to carry.
            owned[name] = method if mine is target else method.model_copy(update={"target": mine})
        return owned

    @field_validator("target")
    @classmethod
    def _target_of_this_plugin(cls, target: TargetT | None, info: ValidationInfo) -> TargetT | None:
        key = _key_of(info)
        return target if target is None or key is None else target.of_plugin(key)

    @property
    def key(self) -> str:
        return f"{self.id}@{self.version}"

    def target_of(self, method: str) -> TargetT:
        target = self.methods[method].target or self.target
        assert target is not None, "checked when the manifest loaded"
        return target

    def policies_of(self, method: str) -> Policies:
        """The method's policies, with what it leaves unset taken from the plugin's defaults."""
        return self._merged_policies[method]

    @cached_property
    def _merged_policies(self) -> dict[str, Policies]:
        # Once per plugin (the model is frozen), from values validated already: the loader,
        # the routes and the chains each ask, and dumping and validating again for every
        # question was ~40 µs per method at start-up (bench/bench_startup.py).
        defaults = self.defaults
        inherited = {name: getattr(defaults, name) for name in defaults.model_fields_set}
        merged: dict[str, Policies] = {}
        for name, method in self.methods.items():
            values = dict(inherited)
            values.update(
                (field, getattr(method, field))
                for field in method.model_fields_set
                if field in _POLICY_FIELDS
            )
            # Validated field values pass through as they are (pydantic does not revalidate
            # model instances); what was set stays set, for ``model_dump(exclude_unset)``.
            merged[name] = Policies.model_validate(values)
        return merged

    def targets(self) -> list[TargetT]:
        """Every distinct target this plugin's methods use, in manifest order."""
        distinct: list[TargetT] = []
        for name in self.methods:
            target = self.target_of(name)
            if target not in distinct:
                distinct.append(target)
        return distinct


def _key_of(info: ValidationInfo) -> str | None:
    """The ``id@version`` of the plugin being validated; None when either is invalid (the
    manifest is refused then anyway)."""
    plugin_id, version = info.data.get("id"), info.data.get("version")
    return None if plugin_id is None or version is None else f"{plugin_id}@{version}"


class Manifest(StrictModel, Generic[TargetT]):
    """A whole manifest file."""

    version: Literal[1] = 1
    egress: EgressPolicy = Field(
        default_factory=EgressPolicy,
        description="Where providers may connect (providers/egress.py; README: egress).",
    )
    plugins: list[PluginSpec[TargetT]] = Field(default_factory=list)
    auth: AuthConfig | None = Field(
        default=None, description="How gateway callers prove who they are (README: auth)."
    )
    access: AccessConfig | None = Field(
        default=None,
        description="Who may call what; once set, everything not allowed is refused (README: access).",
    )
    audit: AuditConfig | None = Field(
        default=None, description="One hash-chained JSON line per call (README: audit)."
    )
    telemetry: Telemetry = Field(
        default_factory=Telemetry,
        description="Metrics, traces and logs (docs/observability.md); all off by default.",
    )
    gateway: GatewayConfig | None = Field(
        default=None,
        description="Where dispatcher serve listens, its TLS and limits (docs/gateway.md).",
    )
    state: StateConfig = Field(
        default_factory=StateConfig,
        description="Where limits, breakers, caches and idempotency records live (README: state).",
    )
    rollouts: list[RolloutSpec] = Field(
        default_factory=list,
        description="Methods whose traffic moves between two versions step by step, or is"
        " mirrored to another version (README: rollout and shadow).",
    )
    jobs: JobsConfig = Field(
        default_factory=JobsConfig,
        description="Async jobs: workers of the shared job stream (README: Async jobs).",
    )
    registry: RegistryConfig | None = Field(
        default=None,
        description="Plugin entries published in etcd, merged with this file's (docs/registry.md).",
    )

    @model_validator(mode="after")
    def _jobs_need_a_durable_store(self) -> Manifest[TargetT]:
        # A job accepted into one process's memory is lost with it: workers only on Redis
        # (or on SQS, which keeps the queue itself).
        if self.jobs.workers and self.jobs.backend == "redis" and self.state.backend != "redis":
            raise ValueError(
                "'jobs.workers' needs 'state: {backend: redis}' (jobs live on Redis streams) "
                "or 'jobs: {backend: sqs}'"
            )
        return self
