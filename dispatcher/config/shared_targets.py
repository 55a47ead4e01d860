"""Load-time checks of what two targets of a manifest may not share, or one plugin's
targets must agree on.

- Two modules of one name imported into this process from two folders (``local``
  targets): Python would import the first alone, and every one of them run its code.
- Two plugin ids sent to one endpoint whose process serves a single id (a dialled
  WebSocket URL): the second's every call would be refused there.
- One plugin's inbound targets setting a setting of its one connection differently:
  a plugin dialling in serves them all over one connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from dispatcher.config.errors import ManifestProblem
from dispatcher.config.manifest import Manifest, PluginSpec
from providers.target import TargetConfig

__all__ = ["shared_target_problems"]


def shared_target_problems(
    manifest: Manifest[Any], describe: Callable[[str, int], str]
) -> Iterator[ManifestProblem]:
    """``describe(section, index)``: where an entry other than the one at fault is written."""
    yield from _host_module_problems(manifest, describe)
    yield from _connection_setting_problems(manifest)
    yield from _shared_endpoint_problems(manifest, describe)


def _written_targets(plugin: PluginSpec[Any]) -> Iterator[tuple[str, TargetConfig]]:
    """The targets an entry writes, each with where (``target``, ``methods.<name>.target``)."""
    if plugin.target is not None:
        yield "target", plugin.target
    for name, method in plugin.methods.items():
        if method.target is not None:
            yield f"methods.{name}.target", method.target


def _host_module_problems(
    manifest: Manifest[Any], describe: Callable[[str, int], str]
) -> Iterator[ManifestProblem]:
    """Targets whose folders hold two modules of one name, both to be imported into this
    process (local targets differing only in ``path``; two versions in two folders):
    Python would import the first alone, and every one of them would run its code."""

    def claim(plugin: PluginSpec[Any], target: TargetConfig) -> tuple[str, str] | None:
        return target.host_module()  # (module, where its code is)

    for index, field, module, code, first in _conflicting_claims(manifest, claim):
        yield ManifestProblem(
            f"plugins[{index}].{field}.path",
            f"imports module {module!r} from {code}, but {first.where(describe)}"
            f" imports it from {first.owner}: a process holds one module of a name, so this"
            " target would run that code. Give one module another name, or run one"
            " out of process (provider: subprocess)",
        )


class _Claim(NamedTuple):
    """Who first claimed something in a manifest, and where it is written."""

    owner: str
    entry: int
    field: str

    def where(self, describe: Callable[[str, int], str]) -> str:
        entry, of, source = describe("plugins", self.entry).partition(" of ")
        return f"{entry}.{self.field}{of}{source}"


def _conflicting_claims(
    manifest: Manifest[Any],
    claim: Callable[[PluginSpec[Any], TargetConfig], tuple[str, str] | None],
) -> Iterator[tuple[int, str, str, str, _Claim]]:
    """Each written target whose ``claim`` (what it claims, and whose it says it is) meets
    an earlier claim of the same thing by another owner: its entry's index, its field,
    the thing, its owner, and the first claim."""
    first: dict[str, _Claim] = {}
    for index, plugin in enumerate(manifest.plugins):
        for field, target in _written_targets(plugin):
            claimed = claim(plugin, target)
            if claimed is None:
                continue
            thing, owner = claimed
            earlier = first.setdefault(thing, _Claim(owner, index, field))
            if earlier.owner != owner:
                yield index, field, thing, owner, earlier


def _connection_setting_problems(manifest: Manifest[Any]) -> Iterator[ManifestProblem]:
    """A plugin whose inbound targets set a setting of its one connection differently
    (``TargetConfig.connection_settings``): a plugin dialling in serves them all over one
    connection, which can hold to one value only, and no rule says which."""
    for index, plugin in enumerate(manifest.plugins):
        # Not ``plugin.targets()``: a method with no target at all is reported above.
        used = [method.target or plugin.target for method in plugin.methods.values()]
        first: dict[str, tuple[object, str]] = {}
        for field, target in _written_targets(plugin):
            if target not in used:
                continue  # a default target every method overrides: never connected to
            for name, value in target.connection_settings().items():
                seen = first.setdefault(name, (value, field))
                if seen[0] == value:
                    continue
                differ = (
                    f"this {name} is not the one on its {seen[1]}"  # a token: never shown
                    if name in target.secret_fields
                    else f"{value!r} here, {seen[0]!r} on its {seen[1]}"
                )
                yield ManifestProblem(
                    f"plugins[{index}].{field}.{name}",
                    f"{plugin.key} dials in over one connection serving all its inbound"
                    f" targets, and {name} is that connection's: {differ}."
                    f" Set the same {name} on each",
                )


def _shared_endpoint_problems(
    manifest: Manifest[Any], describe: Callable[[str, int], str]
) -> Iterator[ManifestProblem]:
    """Two plugin ids sent to one endpoint whose process serves a single plugin id
    (``TargetConfig.one_plugin_endpoint``): it names one id when connected to, and every
    call of the other would be refused there. Versions of one plugin may share it."""

    def claim(plugin: PluginSpec[Any], target: TargetConfig) -> tuple[str, str] | None:
        endpoint = target.one_plugin_endpoint()
        return None if endpoint is None else (endpoint, plugin.id)

    for index, field, endpoint, _, first in _conflicting_claims(manifest, claim):
        yield ManifestProblem(
            f"plugins[{index}].{field}",
            f"{manifest.plugins[index].key} is sent to {endpoint}, which"
            f" {first.where(describe)} sends plugin {first.owner!r} to: the process there"
            " serves one plugin, named when it is connected to, so the calls of the other"
            " would all be refused. Give each plugin a URL of its own",
        )
