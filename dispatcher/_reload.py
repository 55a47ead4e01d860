"""What a reload changes: the plan between the running manifest and a new one, free of I/O.

``Dispatcher.reload`` carries the plan out (``dispatcher._reload_steps``); this module only
decides it, so every rule below is tested without starting anything.

- Top-level sections other than ``plugins`` (``state``, ``auth``, ``access``, ``audit``,
  ``telemetry``, ``gateway``, ``egress``, ``registry``) are wired into objects built once at start
  (a state backend, authenticators, the audit chain, the listener): a change to any of
  them refuses the whole reload, naming the sections — restart to change them.
- A plugin version whose entry is unchanged (an equal ``PluginSpec``) is **kept**: its
  routes, policy state (breakers, caches, limits) and processes stay as they are.
- A plugin version in both with a different entry is **changed**: its routes and chains
  are rebuilt (a new policy takes effect), targets it no longer uses are drained and
  detached, new ones attached. What its processes were started with (``config``,
  ``lifecycle``, ``runtime``, ``protocol``) cannot change under the same version: that
  is refused — publish a new version instead.
- A version only in the new manifest is **added** (attached before routes swap), one
  only in the old is **removed** (drained, then detached).
- A version added back on a target where it is still attached (a reload that removed it
  was given up while its calls in flight ran, and nothing detached it since) takes that
  attachment back rather than attaching again: so what it was started with cannot change
  either, as for a running version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatcher.config import Manifest, ManifestError, ManifestProblem, PluginSpec

__all__ = ["FIXED_SECTIONS", "ReloadPlan", "fixed_changes", "plan_reload"]

#: Sections a running dispatcher cannot swap (see the module docstring).
FIXED_SECTIONS = (
    "version",
    "egress",
    "auth",
    "access",
    "audit",
    "telemetry",
    "gateway",
    "state",
    "registry",
)

#: What a plugin's processes were started with: fixed for a version.
_FIXED_PLUGIN_FIELDS = ("config", "lifecycle", "runtime", "protocol")


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """The plugin versions (by ``id@version``) a reload adds, removes, changes, keeps."""

    added: list[PluginSpec[Any]] = field(default_factory=list)
    removed: list[PluginSpec[Any]] = field(default_factory=list)
    #: ``(old, new)`` entries of the same version.
    changed: list[tuple[PluginSpec[Any], PluginSpec[Any]]] = field(default_factory=list)
    kept: list[PluginSpec[Any]] = field(default_factory=list)

    def summary(self) -> dict[str, list[str]]:
        return {
            "added": [plugin.key for plugin in self.added],
            "removed": [plugin.key for plugin in self.removed],
            "changed": [new.key for _, new in self.changed],
            "kept": [plugin.key for plugin in self.kept],
        }

    def in_words(self, source: str) -> str:
        """The reload's log line: what it did to which versions, or that it changed nothing."""
        kept = len(self.kept)
        if not (self.added or self.removed or self.changed):
            versions = "version" if kept == 1 else "versions"
            return f"reloaded {source}: nothing changed ({kept} plugin {versions} kept)"
        done = [
            f"{what} {', '.join(keys)}"
            for what, keys in self.summary().items()
            if what != "kept" and keys
        ]
        return f"reloaded {source}: {'; '.join(done)}; kept {kept} unchanged"


def fixed_changes(running: PluginSpec[Any], new: PluginSpec[Any]) -> list[str]:
    """The fields of a running version's processes that ``new`` would change (refused)."""
    return [name for name in _FIXED_PLUGIN_FIELDS if getattr(running, name) != getattr(new, name)]


def plan_reload(
    old: Manifest[Any],
    new: Manifest[Any],
    *,
    source: str,
    still_attached: Mapping[str, PluginSpec[Any]] | None = None,
) -> ReloadPlan:
    """The plan from ``old`` to ``new``; ``ManifestError`` naming every refusal.
    ``still_attached``: the entries, by key, of versions ``old`` no longer has that are
    still attached on a target ``new`` gives them again (``Attachments.still_attached``)."""
    problems = [
        ManifestProblem(
            name, "cannot change while the dispatcher runs; restart it to apply this section"
        )
        for name in FIXED_SECTIONS
        if getattr(old, name) != getattr(new, name)
    ]
    before = {plugin.key: plugin for plugin in old.plugins}
    after = {plugin.key: plugin for plugin in new.plugins}
    plan = ReloadPlan()
    for index, plugin in enumerate(new.plugins):
        previous = before.get(plugin.key)
        if previous is None:
            plan.added.append(plugin)
            waiting = (still_attached or {}).get(plugin.key)
            problems.extend(
                ManifestProblem(
                    f"plugins[{index}].{name}",
                    f"{plugin.key} is still running there with another {name}: a reload that"
                    " removed it was given up before its calls in flight ended. Reload again"
                    " once they have, or publish it as a new version",
                )
                for name in ([] if waiting is None else fixed_changes(waiting, plugin))
            )
        elif previous == plugin:
            plan.kept.append(plugin)
        else:
            fixed = fixed_changes(previous, plugin)
            problems.extend(
                ManifestProblem(
                    f"plugins[{index}].{name}",
                    f"{plugin.key} is running with another {name}; publish it as a new"
                    " version to change what its processes start with",
                )
                for name in fixed
            )
            plan.changed.append((previous, plugin))
    plan.removed.extend(plugin for key, plugin in before.items() if key not in after)
    if problems:
        raise ManifestError(source, problems)
    return plan
