"""Loading a manifest: YAML or TOML text → validated ``Manifest``, or every problem at once.

Every problem names the file, the line where the format tells it, the path inside the
document (``plugins[0].methods.say.target.url``) and what was expected. A value that came
from ``${NAME}`` is never echoed back: it may be a secret.

Every destination a target names (``TargetConfig.destinations()``) is checked against the
manifest's ``egress`` policy here, without resolving names; providers check again after
resolution when they connect (``providers.egress``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Field, ValidationError

from dispatcher.config.errors import ManifestError, ManifestProblem
from dispatcher.config.fallbacks import fallback_problems
from dispatcher.config.manifest import Manifest, MethodSpec
from dispatcher.config.policies import Policies
from providers import provider_classes
from providers.target import MASK, TargetConfig

__all__ = ["load_manifest", "manifest_model", "parse_manifest"]

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

#: Where ``${NAME}`` was replaced in a document, and by what: those values are not shown.
Substitutions = dict[tuple[str | int, ...], list[str]]


@cache
def manifest_model() -> type[Manifest[Any]]:
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
    substituted: Substitutions = {}
    data = _interpolate_env(data, (), problems, substituted)
    manifest: Manifest[Any] | None = None
    if not problems:
        context = {"base_dir": (base_dir or Path.cwd()).resolve()}
        try:
            manifest = manifest_model().model_validate(data, context=context)
        except ValidationError as error:
            problems.extend(_problems_from(error, substituted))
    if manifest is not None:
        problems.extend(_semantic_problems(manifest))
        problems.extend(_egress_problems(manifest))
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
    value: Any,
    path: tuple[str | int, ...],
    problems: list[ManifestProblem],
    substituted: Substitutions,
) -> Any:
    """Replace ``${NAME}`` and ``${NAME:-default}`` in strings, so secrets stay out of files.

    Records in ``substituted`` where it replaced what, so problems never echo those values.
    """
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name, default)
            if found is None:
                problems.append(
                    ManifestProblem(_render_path(path), f"environment variable {name} is not set")
                )
                return ""
            substituted.setdefault(path, []).append(found)
            return found

        return _ENV_REFERENCE.sub(substitute, value)
    if isinstance(value, dict):
        return {
            key: _interpolate_env(item, (*path, key), problems, substituted)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            _interpolate_env(item, (*path, index), problems, substituted)
            for index, item in enumerate(value)
        ]
    return value


def _problems_from(error: ValidationError, substituted: Substitutions) -> Iterator[ManifestProblem]:
    tags = set(provider_classes())
    for detail in error.errors(include_url=False):
        location = _without_discriminator_tags(detail["loc"], tags)
        # The input of a problem at or above a substituted value contains that value.
        secrets = [
            value
            for path, values in substituted.items()
            if path[: len(location)] == location or location[: len(path)] == path
            for value in values
        ]
        message = _explain(detail, location, show_input=not secrets)
        for secret in sorted(secrets, key=len, reverse=True):
            if secret:
                message = message.replace(secret, MASK)
        yield ManifestProblem(_render_path(location), message)


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


def _explain(
    detail: Mapping[str, Any], location: tuple[str | int, ...], *, show_input: bool
) -> str:
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
    if not show_input:
        return f"{message} (got a value from the environment, not shown)"
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
            target = method.target or plugin.target
            if method.hedge is not None and target is not None and not target.is_fleet():
                yield ManifestProblem(
                    f"{where}.methods.{name}.hedge",
                    "hedging sends a second attempt to another instance: it needs a target"
                    " with several instances (a fleet); for one instance use 'retry'",
                )
    yield from fallback_problems(manifest)
    yield from _rollout_problems(manifest)


def _rollout_problems(manifest: Manifest[Any]) -> Iterator[ManifestProblem]:
    """Rollouts naming a version or method that does not exist, two for one method, a
    version rolled to itself, and shadows of methods that are not pure."""
    entries = {plugin.key: plugin for plugin in manifest.plugins}
    seen: dict[str, int] = {}
    for index, rollout in enumerate(manifest.rollouts):
        where = f"rollouts[{index}]"
        if rollout.name in seen:
            yield ManifestProblem(
                where, f"{rollout.name} already has a rollout at rollouts[{seen[rollout.name]}]"
            )
        seen.setdefault(rollout.name, index)
        if rollout.other == rollout.from_version:
            yield ManifestProblem(where, f"{rollout.name}: 'from' and the other version are one")
        for field, version in (
            ("from", rollout.from_version),
            ("shadow.version" if rollout.shadow is not None else "to", rollout.other),
        ):
            plugin = entries.get(f"{rollout.plugin}@{version}")
            if plugin is None:
                yield ManifestProblem(
                    f"{where}.{field}", f"no plugin {rollout.plugin}@{version} in the manifest"
                )
            elif rollout.method not in plugin.methods:
                yield ManifestProblem(
                    f"{where}.method", f"{plugin.key} has no method {rollout.method!r}"
                )
            elif rollout.shadow is not None and not plugin.policies_of(rollout.method).pure:
                yield ManifestProblem(
                    f"{where}.shadow",
                    f"{plugin.key}.{rollout.method} is not 'pure: true': a shadow runs each"
                    " mirrored call twice, which only a pure method allows",
                )


def _egress_problems(manifest: Manifest[Any]) -> Iterator[ManifestProblem]:
    """Every destination a target names that the manifest's ``egress`` refuses, located
    where the target is written (a plugin's default target or a method's own)."""
    for index, plugin in enumerate(manifest.plugins):
        written: list[tuple[str, TargetConfig | None]] = [
            (f"plugins[{index}].target", plugin.target)
        ]
        written += [
            (f"plugins[{index}].methods.{name}.target", method.target)
            for name, method in plugin.methods.items()
        ]
        for where, target in written:
            for destination in target.destinations() if target is not None else ():
                refusal = manifest.egress.refusal(destination)
                if refusal is not None:
                    yield ManifestProblem(f"{where}.{destination.field}", refusal)


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
    if method.hedge is not None and not (policies.idempotent or policies.pure):
        yield ManifestProblem(
            f"{where}.hedge",
            "hedging needs 'idempotent: true': a hedged call runs on two instances at once",
        )
    if method.hedge is not None and policies.batch is not None:
        yield ManifestProblem(
            f"{where}.hedge",
            "hedging and 'batch' do not combine: a batch goes to one instance as one"
            " invocation; hedge the method or batch it",
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
