"""The manifest: which plugins exist, their methods, and where each method runs.

Loaded from YAML or TOML into pydantic models. Every problem is reported at once, each
naming the file, the line where the format tells it, the path inside the document
(``plugins[0].methods.say.target.url``) and what was expected. Unknown keys are errors.

A method's ``target`` is a union discriminated on ``provider``; its members are the
target models of every registered provider (built-in or from the ``dispatcher.providers``
entry points), so third-party targets validate exactly like ours.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dispatcher.errors import ManifestError, ManifestProblem
from providers import provider_classes
from providers.base import TargetConfig

__all__ = [
    "Manifest",
    "MethodSpec",
    "PluginSpec",
    "Policies",
    "load_manifest",
    "parse_manifest",
]

TargetT = TypeVar("TargetT", bound=TargetConfig)

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_IDENTIFIER = r"^[A-Za-z][A-Za-z0-9_.-]*$"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

DEFAULT_TIMEOUT_MS = 30_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CachePolicy(_Strict):
    """Keep results of a pure method: same params (key order aside), same result."""

    ttl_ms: Annotated[int, Field(gt=0)]
    max_entries: Annotated[int, Field(gt=0)] = 1024
    per_caller: bool = Field(default=False, description="Key the cache by caller too.")


class BatchPolicy(_Strict):
    """Coalesce concurrent calls of a method into one invocation of the target."""

    max_size: Annotated[int, Field(ge=1, le=10_000)] = 100
    max_wait_ms: Annotated[float, Field(ge=0)] = 5


class RateLimit(_Strict):
    """A leaky bucket: ``rate`` calls per second on average, ``burst`` at once."""

    rate: Annotated[float, Field(gt=0)]
    burst: Annotated[int, Field(ge=1)] | None = None
    scope: Literal["method", "target", "caller"] = "method"
    mode: Literal["wait", "reject"] = "wait"

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else max(1, round(self.rate))


class BreakerPolicy(_Strict):
    """One circuit breaker per target instance."""

    fail_max: Annotated[int, Field(ge=1)] = 5
    reset_timeout_ms: Annotated[int, Field(gt=0)] = 30_000
    half_open_max_calls: Annotated[int, Field(ge=1)] = 1
    success_threshold: Annotated[int, Field(ge=1)] = 1


class RetryPolicy(_Strict):
    """Retries of retryable errors, for idempotent methods only."""

    attempts: Annotated[int, Field(ge=1, le=20)] = 3
    initial_backoff_ms: Annotated[float, Field(gt=0)] = 50
    max_backoff_ms: Annotated[float, Field(gt=0)] = 2_000
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.2, description="Retries may add at most this share of extra load on a target."
    )


class ConcurrencyPolicy(_Strict):
    """A bulkhead: at most ``max_in_flight`` calls at once, ``max_waiting`` queued."""

    max_in_flight: Annotated[int, Field(ge=1)]
    max_waiting: Annotated[int, Field(ge=0)] = 0
    scope: Literal["method", "target"] = "method"


class Policies(_Strict):
    """Per-method behaviour; set on a method, or on a plugin's ``defaults`` for all its methods.

    Every field left unset inherits: method → plugin ``defaults`` → built-in default.
    Safe by default: nothing is cached unless a method is ``pure``, nothing is retried
    unless it is ``idempotent`` (``pure`` implies ``idempotent``).
    """

    timeout_ms: Annotated[int, Field(gt=0)] | None = None
    idempotent: bool | None = None
    pure: bool | None = None
    cache: CachePolicy | None = None
    batch: BatchPolicy | None = None
    rate_limit: list[RateLimit] | None = None
    breaker: BreakerPolicy | None = None
    retry: RetryPolicy | None = None
    concurrency: ConcurrencyPolicy | None = None

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _one_or_many_limits(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @property
    def may_cache(self) -> bool:
        return self.cache is not None and bool(self.pure)

    @property
    def may_retry(self) -> bool:
        return (
            self.retry is not None
            and self.retry.attempts > 1
            and bool(self.idempotent or self.pure)
        )


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
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as error:
                raise ValueError(f"not a valid JSON Schema: {error.message}") from None
        return schema


class Lifecycle(_Strict):
    init_timeout_ms: Annotated[int, Field(gt=0)] = 30_000
    stop_timeout_ms: Annotated[int, Field(gt=0)] = 10_000


class PluginSpec(_Strict, Generic[TargetT]):
    """One plugin at one version."""

    id: Annotated[str, Field(pattern=_IDENTIFIER, max_length=128)]
    version: str
    runtime: Literal["python", "go", "rust", "java", "typescript", "javascript", "other"] = "python"
    description: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    target: TargetT | None = None
    defaults: Policies = Field(default_factory=Policies)
    lifecycle: Lifecycle = Field(default_factory=Lifecycle)
    methods: Annotated[dict[str, MethodSpec[TargetT]], Field(min_length=1)]

    @field_validator("version")
    @classmethod
    def _version_is_semver(cls, version: str) -> str:
        if not _SEMVER.match(version):
            raise ValueError(f"expected a semantic version such as 1.2.3, got {version!r}")
        return version

    @field_validator("methods")
    @classmethod
    def _method_names_are_identifiers(cls, methods: dict[str, Any]) -> dict[str, Any]:
        for name in methods:
            if not re.match(_IDENTIFIER, name):
                raise ValueError(f"method name {name!r} must start with a letter; [A-Za-z0-9_.-]")
        return methods

    @property
    def key(self) -> str:
        return f"{self.id}@{self.version}"

    def target_of(self, method: str) -> TargetT:
        target = self.methods[method].target or self.target
        assert target is not None, "checked when the manifest loaded"
        return target

    def policies_of(self, method: str) -> Policies:
        """The method's policies, with what it leaves unset taken from the plugin's defaults."""
        fields = set(Policies.model_fields)
        inherited = self.defaults.model_dump(exclude_unset=True)
        explicit = self.methods[method].model_dump(include=fields, exclude_unset=True)
        return Policies.model_validate({**inherited, **explicit})

    def targets(self) -> list[TargetT]:
        """Every distinct target this plugin's methods use, in manifest order."""
        distinct: list[TargetT] = []
        for name in self.methods:
            target = self.target_of(name)
            if target not in distinct:
                distinct.append(target)
        return distinct


class Manifest(_Strict, Generic[TargetT]):
    """A whole manifest file."""

    version: Literal[1] = 1
    plugins: list[PluginSpec[TargetT]] = Field(default_factory=list)


@cache
def _manifest_model() -> type[Manifest[Any]]:
    """``Manifest`` specialised to the union of every registered provider's target model."""
    models = tuple(cls.target_model for cls in provider_classes().values())
    target_union = Annotated[Union[models], Field(discriminator="provider")]  # type: ignore[valid-type]  # noqa: UP007
    return Manifest[target_union]


def load_manifest(path: str | os.PathLike[str]) -> Manifest[Any]:
    """Read and validate a manifest file (``.yaml``/``.yml`` or ``.toml``)."""
    file = Path(path)
    source = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ManifestError(
            source, [ManifestProblem("", f"cannot read: {error.strerror}")]
        ) from None
    if file.suffix == ".toml":
        return parse_manifest(_parse_toml(text, source), source=source, base_dir=file.parent)
    data, root = _parse_yaml(text, source)
    return parse_manifest(data, source=source, base_dir=file.parent, yaml_root=root)


def parse_manifest(
    data: Any,
    *,
    source: str = "<manifest>",
    base_dir: Path | None = None,
    yaml_root: yaml.Node | None = None,
) -> Manifest[Any]:
    """Validate an already parsed manifest document."""
    problems: list[ManifestProblem] = []
    data = _interpolate_env(data, (), problems)
    manifest: Manifest[Any] | None = None
    if not problems:
        context = {"base_dir": (base_dir or Path.cwd()).resolve()}
        try:
            manifest = _manifest_model().model_validate(data, context=context)
        except ValidationError as error:
            problems.extend(_problems_from(error))
    if manifest is not None:
        problems.extend(_semantic_problems(manifest))
    if problems:
        located = [_locate(problem, yaml_root) for problem in problems]
        located.sort(key=lambda problem: problem.line or 0)
        raise ManifestError(source, located)
    assert manifest is not None
    return manifest


def _parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(error, "problem", None) or str(error)
        raise ManifestError(
            source, [ManifestProblem("", f"not valid YAML: {problem}", line)]
        ) from None
    return data, root


def _parse_toml(text: str, source: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(source, [ManifestProblem("", f"not valid TOML: {error}")]) from None


def _interpolate_env(
    value: Any, path: tuple[str | int, ...], problems: list[ManifestProblem]
) -> Any:
    """Replace ``${NAME}`` and ``${NAME:-default}`` in strings, so secrets stay out of files."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name, default)
            if found is None:
                problems.append(
                    ManifestProblem(_render_path(path), f"environment variable {name} is not set")
                )
                return ""
            return found

        return _ENV_REFERENCE.sub(substitute, value)
    if isinstance(value, dict):
        return {key: _interpolate_env(item, (*path, key), problems) for key, item in value.items()}
    if isinstance(value, list):
        return [
            _interpolate_env(item, (*path, index), problems) for index, item in enumerate(value)
        ]
    return value


def _problems_from(error: ValidationError) -> Iterator[ManifestProblem]:
    tags = set(provider_classes())
    for detail in error.errors(include_url=False):
        location = _without_discriminator_tags(detail["loc"], tags)
        yield ManifestProblem(_render_path(location), _explain(detail, location))


def _without_discriminator_tags(
    location: tuple[str | int, ...], tags: set[str]
) -> tuple[str | int, ...]:
    # pydantic puts the chosen union member's tag in the location (…target.http.url);
    # users never wrote that key, so drop it.
    kept: list[str | int] = []
    for index, part in enumerate(location):
        if index > 0 and location[index - 1] == "target" and part in tags:
            continue
        kept.append(part)
    return tuple(kept)


def _explain(detail: Mapping[str, Any], location: tuple[str | int, ...]) -> str:
    kind = detail["type"]
    if kind == "extra_forbidden":
        return (
            f"unknown key {location[-1]!r}; check its spelling against the configuration reference"
        )
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_not_found":
        return f"a target needs 'provider', one of: {', '.join(sorted(provider_classes()))}"
    message = str(detail["msg"]).removeprefix("Value error, ")
    if kind in {"union_tag_invalid", "value_error"}:
        return message
    return f"{message} (got {detail.get('input')!r:.80})"


def _semantic_problems(manifest: Manifest[Any]) -> Iterator[ManifestProblem]:
    seen: dict[str, int] = {}
    for index, plugin in enumerate(manifest.plugins):
        where = f"plugins[{index}]"
        if plugin.key in seen:
            yield ManifestProblem(
                f"{where}.version",
                f"{plugin.key} is already declared at plugins[{seen[plugin.key]}]",
            )
        seen.setdefault(plugin.key, index)
        for name, method in plugin.methods.items():
            if method.target is None and plugin.target is None:
                yield ManifestProblem(
                    f"{where}.methods.{name}.target",
                    "no target: set 'target' on the method or a default 'target' on the plugin",
                )
            yield from _unsafe_policy_problems(
                f"{where}.methods.{name}", plugin.policies_of(name), method
            )


def _unsafe_policy_problems(
    where: str, policies: Policies, method: MethodSpec[Any]
) -> Iterator[ManifestProblem]:
    # A policy written on the method itself that can never apply is a mistake worth
    # stopping for; one inherited from the plugin's defaults just does not apply here.
    if method.cache is not None and not policies.pure:
        yield ManifestProblem(
            f"{where}.cache",
            "caching needs 'pure: true': only a pure method's results can be reused",
        )
    if method.retry is not None and not (policies.idempotent or policies.pure):
        yield ManifestProblem(
            f"{where}.retry", "retries need 'idempotent: true': a retried call may run twice"
        )


def _render_path(location: tuple[str | int, ...]) -> str:
    rendered = ""
    for part in location:
        rendered += (
            f"[{part}]" if isinstance(part, int) else (f".{part}" if rendered else str(part))
        )
    return rendered


_PATH_PART = re.compile(r"\[(\d+)\]|\.?([^.\[]+)")


def _locate(problem: ManifestProblem, root: yaml.Node | None) -> ManifestProblem:
    """Attach the YAML line of the deepest node that exists along ``problem.path``."""
    if root is None or problem.line is not None:
        return problem
    node = root
    for match in _PATH_PART.finditer(problem.path):
        index, key = match.groups()
        child = _child(node, int(index) if index is not None else key)
        if child is None:
            break
        node = child
    return ManifestProblem(problem.path, problem.message, node.start_mark.line + 1)


def _child(node: yaml.Node, key: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        child: yaml.Node = node.value[key]
        return child
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == str(key):
                return value_node if isinstance(value_node, yaml.Node) else None
    return None
