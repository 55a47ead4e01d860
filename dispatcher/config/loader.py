"""Loading a manifest: YAML or TOML text → validated ``Manifest``, or every problem at once.

Every problem names the file, the line where the format tells it, the path inside the
document (``plugins[0].methods.say.target.url``) and what was expected. A value that came
from ``${NAME}`` is never echoed back: it may be a secret. Neither is the value of a field
that never prints (``SecretStr``, a model's ``secret_fields``, ``repr=False``), a list or
a map (they may hold either), nor a text holding ``@`` (a URL's user and password) unless
it is a URL whose credentials can be masked (``dispatcher.config.quoting``).

Every destination a target names (``TargetConfig.destinations()``), the JWKS URL of
``auth.jwt`` and the OTLP endpoint traces go to are checked against the manifest's
``egress`` policy here, without resolving names; providers and the JWKS download check
again after resolution when they connect (``providers.egress``). The OTLP exporter
resolves on its own, so its endpoint is checked here only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dispatcher.config.errors import ENVIRONMENT, ManifestError, ManifestProblem, render_path
from dispatcher.config.fallbacks import fallback_problems
from dispatcher.config.includes import INCLUDED_KEYS, Document, expand_includes, read_document
from dispatcher.config.manifest import Manifest, MethodSpec, PluginSpec
from dispatcher.config.policies import Policies
from dispatcher.config.quoting import is_secret, shown_input
from dispatcher.config.shared_targets import shared_target_problems
from dispatcher.config.target_union import manifest_model, model_for, unloadable
from dispatcher.config.telemetry import TelemetryEnvironmentError
from providers import provider_names
from providers.target import MASK, Destination, TargetConfig

__all__ = [
    "collector_paused",
    "load_manifest",
    "manifest_model",
    "merge_entries",
    "parse_manifest",
]

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

#: Where ``${NAME}`` was replaced in a document, and by what: those values are not shown.
Substitutions = dict[tuple[str | int, ...], list[str]]


def load_manifest(path: str | os.PathLike[str]) -> Manifest[Any]:
    """Read and validate a manifest file (``.yaml``/``.yml`` or ``.toml``) and the files
    its ``include`` names (``dispatcher.config.includes``)."""
    with collector_paused():
        return _validate(read_document(path))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a manifest is read and validated (or started).

    Reading one allocates a tree of small objects (YAML nodes, dicts, models) and none of
    them is garbage until it is done, so the collector's passes meanwhile find nothing
    and walk the whole heap for it: they were ~45 % of loading 1,000 plugins and over half
    of starting them (bench/bench_startup.py). Reference counting frees as usual; the
    collector resumes, as it was, when the work is done.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def parse_manifest(
    data: Any,
    *,
    source: str = "<manifest>",
    base_dir: Path | None = None,
    yaml_root: yaml.Node | None = None,
) -> Manifest[Any]:
    """Validate an already parsed manifest document (its ``include`` relative to ``base_dir``)."""
    with collector_paused():
        return _validate(Document(source, data, base_dir or Path.cwd(), yaml_root))


def merge_entries(
    manifest: Manifest[Any], entries: Mapping[str, dict[str, Any]], *, source: str
) -> tuple[Manifest[Any], dict[str, str]]:
    """``manifest`` (a validated file) with the registry's ``entries`` (``plugins:`` items by
    key, ``dispatcher.config.registry.entry_item``), and the keys left out with the reason.

    Each entry is validated alone, as an included file's entries are, and against the
    manifest's ``egress``; one that fails, or declares a version the file declares, is
    left out (its problems never quote its input). The whole is then checked as a whole;
    a problem there raises ``ManifestError`` naming ``source``: nothing of it applies.
    """
    kept: list[PluginSpec[Any]] = []
    skipped: dict[str, str] = {}
    declared = {plugin.key for plugin in manifest.plugins}
    for key in sorted(entries):
        problems: list[ManifestProblem] = []
        document = Document(key, {"plugins": [entries[key]]}, Path.cwd())
        part = _validate_document(document, problems, own=False, quote=False)
        if part is not None:
            alone = manifest.model_copy(update={"plugins": part.plugins, "rollouts": []})
            problems.extend(_egress_problems(alone))
            if part.plugins[0].key in declared:
                problems.append(ManifestProblem("", "the manifest file declares this version"))
        if problems:
            skipped[key] = "; ".join(
                f"{problem.path}: {problem.message}" if problem.path else problem.message
                for problem in problems
            )
        elif part is not None:
            kept.extend(part.plugins)
    merged = manifest.model_copy(update={"plugins": [*manifest.plugins, *kept]})
    whole = [*_semantic_problems(merged, lambda section, index: f"{section}[{index}]")]
    if whole:
        raise ManifestError(source, whole)
    return merged, skipped


def _validate(main: Document) -> Manifest[Any]:
    main, included, problems = expand_includes(main)
    documents = [main, *included]
    parts = [
        _validate_document(document, problems, own=index == 0)
        for index, document in enumerate(documents)
    ]
    manifest: Manifest[Any] | None = None
    checked_across = not problems
    if checked_across:
        valid = [part for part in parts if part is not None]
        manifest = valid[0].model_copy(
            update={
                "plugins": [plugin for part in valid for plugin in part.plugins],
                "rollouts": [rollout for part in valid for rollout in part.rollouts],
            }
        )
        origins = _Origins(documents, valid)
        semantic = [
            *_semantic_problems(manifest, origins.describe),
            *_egress_problems(manifest),
            *_environment_problems(manifest),
        ]
        problems.extend(origins.relocate(problem) for problem in semantic)
    if problems:
        roots = {document.source: document.tree() for document in documents}
        located = [
            _locate(problem, roots.get(problem.source or main.source)) for problem in problems
        ]
        located.sort(
            key=lambda problem: (
                problem.source is not None,
                problem.source or "",
                problem.line or 0,
            )
        )
        raise ManifestError(main.source, located, complete=checked_across)
    assert manifest is not None
    return manifest


def _validate_document(
    document: Document, problems: list[ManifestProblem], *, own: bool, quote: bool = True
) -> Manifest[Any] | None:
    """One file validated against its own folder; its problems added to ``problems``
    (naming the file unless it is the manifest's own)."""
    data = document.data
    if not own:
        # What else an included file holds is reported by ``expand_includes``.
        data = (
            {key: value for key, value in data.items() if key in INCLUDED_KEYS}
            if isinstance(data, dict)
            else {}
        )
    found: list[ManifestProblem] = []
    substituted: Substitutions = {}
    data = _interpolate_env(data, (), found, substituted)
    part: Manifest[Any] | None = None
    if not found and own and not isinstance(data, dict):
        # pydantic's own words name the generic model's parameters, unreadable here.
        kinds = {list: "a list", str: "a string", bool: "true or false", int: "a number"}
        kind = kinds.get(type(data), "a number" if isinstance(data, float) else "a value")
        what = "empty" if data is None else f"{kind}, not a mapping"
        found.append(ManifestProblem("", f"the file is {what}: {_A_MANIFEST}"))
    if not found:
        found.extend(unloadable(data))
    if not found:
        context = {"base_dir": document.base_dir.resolve()}
        try:
            part = model_for(data).model_validate(data, context=context)
        except ValidationError as error:
            found.extend(_problems_from(error, substituted, quote=quote))
    source = None if own else document.source
    problems.extend(ManifestProblem(p.path, p.message, p.line, source) for p in found)
    return part


#: What a manifest is, for a file that is not one at all.
_A_MANIFEST = "a manifest is a mapping with 'version: 1' and 'plugins' (a list)"

_ENTRY_PATH = re.compile(r"^(plugins|rollouts)\[(\d+)\](.*)$", re.DOTALL)


class _Origins:
    """Which file wrote each entry of the merged manifest, so a problem found in the whole
    is reported in that file, under the entry's index there."""

    def __init__(self, documents: list[Document], parts: list[Manifest[Any]]) -> None:
        self._main = documents[0].source
        self._entries: dict[str, list[tuple[str, int]]] = {"plugins": [], "rollouts": []}
        for document, part in zip(documents, parts, strict=True):
            for section, entries in (("plugins", part.plugins), ("rollouts", part.rollouts)):
                self._entries[section] += [
                    (document.source, index) for index in range(len(entries))
                ]

    def _origin(self, section: str, index: int) -> tuple[str | None, str]:
        source, local = self._entries[section][index]
        return (None if source == self._main else source), f"{section}[{local}]"

    def describe(self, section: str, index: int) -> str:
        """Where an entry is written, for a message naming another entry."""
        source, where = self._origin(section, index)
        return where if source is None else f"{where} of {source}"

    def relocate(self, problem: ManifestProblem) -> ManifestProblem:
        match = _ENTRY_PATH.match(problem.path)
        if match is None or int(match.group(2)) >= len(self._entries[match.group(1)]):
            return problem
        source, where = self._origin(match.group(1), int(match.group(2)))
        return ManifestProblem(where + match.group(3), problem.message, problem.line, source)


def _interpolate_env(
    value: Any,
    path: tuple[str | int, ...],
    problems: list[ManifestProblem],
    substituted: Substitutions,
) -> Any:
    """Replace ``${NAME}`` and ``${NAME:-default}`` in strings, so secrets stay out of files.

    Records in ``substituted`` where it replaced what, so problems never echo those values.
    A container is copied only where something in it was replaced (the caller's document
    is never changed), and a string path is only spelled out for a string that has a
    reference: most manifests have none, and 1,000 plugins' worth of copies and paths
    cost ~30 ms (bench/bench_startup.py).
    """
    return _substituted(value, list(path), problems, substituted)


def _substituted(
    value: Any, path: list[str | int], problems: list[ManifestProblem], found: Substitutions
) -> Any:
    if isinstance(value, str):
        if "${" not in value:  # most strings: no closure, no regular expression
            return value
        where = tuple(path)

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            replacement = os.environ.get(name, default)
            if replacement is None:
                problems.append(
                    ManifestProblem(render_path(where), f"environment variable {name} is not set")
                )
                return ""
            found.setdefault(where, []).append(replacement)
            return replacement

        return _ENV_REFERENCE.sub(substitute, value)
    if isinstance(value, dict):
        copy: dict[Any, Any] | None = None
        for key, item in value.items():
            path.append(key)
            new = _substituted(item, path, problems, found)
            path.pop()
            if new is not item:
                if copy is None:
                    copy = dict(value)
                copy[key] = new
        return value if copy is None else copy
    if isinstance(value, list):
        copied: list[Any] | None = None
        for index, item in enumerate(value):
            path.append(index)
            new = _substituted(item, path, problems, found)
            path.pop()
            if new is not item:
                if copied is None:
                    copied = list(value)
                copied[index] = new
        return value if copied is None else copied
    return value


def _problems_from(
    error: ValidationError, substituted: Substitutions, *, quote: bool = True
) -> Iterator[ManifestProblem]:
    tags = set(provider_names())
    for detail in error.errors(include_url=False):
        location = _without_discriminator_tags(detail["loc"], tags)
        # The input of a problem at or above a substituted value contains that value.
        secrets = [
            value
            for path, values in substituted.items()
            if path[: len(location)] == location or location[: len(path)] == path
            for value in values
        ]
        # Every provider's model: a union of one would hide the tag in the location.
        quote_this = quote and not is_secret(manifest_model(), detail["loc"])
        message = _explain(detail, location, show_input=not secrets, quote=quote_this)
        for secret in sorted(secrets, key=len, reverse=True):
            if secret:
                message = message.replace(secret, MASK)
        yield ManifestProblem(render_path(location), message)


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
    detail: Mapping[str, Any],
    location: tuple[str | int, ...],
    *,
    show_input: bool,
    quote: bool = True,
) -> str:
    kind = detail["type"]
    if kind == "extra_forbidden":
        return (
            f"unknown key {location[-1]!r}; check its spelling against the configuration reference"
        )
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_not_found":
        return f"a target needs 'provider', one of: {', '.join(provider_names())}"
    message = str(detail["msg"]).removeprefix("Value error, ")
    if kind in {"union_tag_invalid", "value_error"}:
        return message
    if not quote:
        return message  # a registry entry's input is never echoed
    if not show_input:
        return f"{message} (got a value from the environment, not shown)"
    shown = shown_input(detail.get("input"))
    return message if shown is None else f"{message} (got {shown})"


def _semantic_problems(
    manifest: Manifest[Any], describe: Callable[[str, int], str]
) -> Iterator[ManifestProblem]:
    """``describe(section, index)``: where an entry other than the one at fault is written."""
    seen: dict[str, int] = {}
    for index, plugin in enumerate(manifest.plugins):
        where = f"plugins[{index}]"
        if plugin.key in seen:
            yield ManifestProblem(
                f"{where}.version",
                f"{plugin.key} is already declared at {describe('plugins', seen[plugin.key])}",
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
    yield from _rollout_problems(manifest, describe)
    yield from shared_target_problems(manifest, describe)


def _rollout_problems(
    manifest: Manifest[Any], describe: Callable[[str, int], str]
) -> Iterator[ManifestProblem]:
    """Rollouts naming a version or method that does not exist, two for one method, a
    version rolled to itself, and shadows of methods that are not pure."""
    entries = {plugin.key: plugin for plugin in manifest.plugins}
    seen: dict[str, int] = {}
    for index, rollout in enumerate(manifest.rollouts):
        where = f"rollouts[{index}]"
        if rollout.name in seen:
            yield ManifestProblem(
                where,
                f"{rollout.name} already has a rollout at {describe('rollouts', seen[rollout.name])}",
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
    for where, what, destination in _own_destinations(manifest):
        refusal = manifest.egress.refusal(destination)
        if refusal is not None:
            yield ManifestProblem(where, f"{what} is outside the egress policy: {refusal}")


def _own_destinations(manifest: Manifest[Any]) -> Iterator[tuple[str, str, Destination]]:
    """Where the dispatcher itself connects, beside its targets: the JWKS it downloads
    and the collector it exports traces to (the manifest's, or the one ``OTEL_*``
    variables name, which this process would use). ``(where, what, destination)``."""
    jwt = manifest.auth.jwt if manifest.auth is not None else None
    if jwt is not None and jwt.jwks_is_url:
        yield "auth.jwt.jwks", "the JWKS URL", Destination.of_url("jwks", jwt.jwks)
    tracing = manifest.telemetry.tracing
    try:
        resolved = tracing.resolved()
    except TelemetryEnvironmentError:
        return  # not a destination at all (``_environment_problems`` says why)
    if resolved is not None and resolved.endpoint is not None:
        origin = tracing.endpoint_origin()
        where = "telemetry.tracing.otlp_endpoint"
        what = "the OTLP endpoint" + ("" if origin == where else f" (from {origin})")
        yield where, what, Destination.of_url("otlp_endpoint", resolved.endpoint)


def _environment_problems(manifest: Manifest[Any]) -> Iterator[ManifestProblem]:
    """An ``OTEL_*`` variable this process would trace with that holds what the manifest's
    own field could not: named as the variable, outside the file. Checked when the
    manifest loads, so a dispatcher never starts with an exporter that fails later."""
    try:
        manifest.telemetry.tracing.resolved()
    except TelemetryEnvironmentError as error:
        yield ManifestProblem(error.variable, error.reason, source=ENVIRONMENT)


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
    return dataclasses.replace(problem, line=node.start_mark.line + 1)


def _child(node: yaml.Node, key: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        child: yaml.Node = node.value[key]
        return child
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == str(key):
                return value_node if isinstance(value_node, yaml.Node) else None
    return None
