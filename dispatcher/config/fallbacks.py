"""Load-time checks of ``fallback``: the plugin and its method exist, and no call can fall
back in a circle.

A fallback names a plugin (and optionally an exact version; unset: the highest, as
``Dispatcher.call`` resolves it) whose method of the same name answers when a call ends
with one of the errors in ``on``. Each ``plugin@version.method`` with a fallback is an
edge to the one it falls back to; a cycle (``a → b → a``, or ``a → a``) would let a
failing call bounce between them until its deadline, so it is refused here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from dispatcher.config.errors import ManifestProblem
from dispatcher.config.manifest import Manifest, PluginSpec

__all__ = ["fallback_problems", "version_order"]

#: ``(plugin key, method)``: one method of one plugin version.
Node = tuple[str, str]


def version_order(version: str) -> tuple[Sequence[int], bool, str]:
    """Sort key of a semantic version: a release after its pre-releases; build ignored.
    (The routing table orders versions the same way.)"""
    core, _, rest = version.partition("+")[0].partition("-")
    return tuple(int(part) for part in core.split(".")), not rest, rest


def fallback_problems(manifest: Manifest[Any]) -> Iterator[ManifestProblem]:
    """Every fallback naming a plugin, version or method that does not exist, and every
    fallback cycle, located at the ``fallback`` key that closes it."""
    by_id: dict[str, list[PluginSpec[Any]]] = {}
    for plugin in manifest.plugins:
        by_id.setdefault(plugin.id, []).append(plugin)
    edges: dict[Node, tuple[Node, str]] = {}
    for index, plugin in enumerate(manifest.plugins):
        for name, method in plugin.methods.items():
            policy = plugin.policies_of(name).fallback
            if policy is None:
                continue
            # Written on the method, or inherited from the plugin's defaults.
            where = (
                f"plugins[{index}].methods.{name}.fallback"
                if method.fallback is not None
                else f"plugins[{index}].defaults.fallback"
            )
            versions = by_id.get(policy.plugin)
            if not versions:
                known = ", ".join(sorted(by_id))
                yield ManifestProblem(
                    f"{where}.plugin",
                    f"no plugin {policy.plugin!r} in the manifest; known: {known}",
                )
                continue
            if policy.version is None:
                chosen = max(versions, key=lambda each: version_order(each.version))
            else:
                found = [each for each in versions if each.version == policy.version]
                if not found:
                    known = ", ".join(each.version for each in versions)
                    yield ManifestProblem(
                        f"{where}.version",
                        f"plugin {policy.plugin!r} has no version {policy.version}; it has: {known}",
                    )
                    continue
                chosen = found[0]
            if name not in chosen.methods:
                yield ManifestProblem(
                    f"{where}.plugin",
                    f"{chosen.key} has no method {name!r} to fall back to (a fallback calls"
                    f" the method of the same name); it has: {', '.join(sorted(chosen.methods))}",
                )
                continue
            edges[(plugin.key, name)] = ((chosen.key, name), where)
    yield from _cycles(edges)


def _cycles(edges: dict[Node, tuple[Node, str]]) -> Iterator[ManifestProblem]:
    # Each node has at most one outgoing edge, so following it from every node finds
    # every cycle; each is reported once, at the edge of its first node in manifest order.
    reported: set[Node] = set()
    for start in edges:
        path: list[Node] = []
        node: Node | None = start
        while node is not None and node in edges and node not in path:
            path.append(node)
            node = edges[node][0]
        if node is None or node not in path:
            continue
        cycle = path[path.index(node) :]
        if reported.intersection(cycle):
            continue
        reported.update(cycle)
        ring = " → ".join(f"{key}.{method}" for key, method in [*cycle, cycle[0]])
        yield ManifestProblem(
            edges[cycle[0]][1], f"fallbacks form a cycle: {ring}; a failing call would go round it"
        )
