"""Which plugin versions each instance that discovery brought to a fleet is attached for.

A fleet is one per target, shared by every plugin version calling it, and each instance
discovery brings must be attached for each of them: a gRPC service with
``lifecycle: dispatcher`` gets each one's ``Init``. Versions come and go with reloads,
instances with discovery, so:

- an instance that joins is attached for every version serving the fleet then, all or
  none (``attach``);
- one that leaves is detached for the versions it was attached for, whoever serves the
  fleet by then (``detach``);
- a version a reload adds is attached to every instance already there, before its routes
  take calls (``add``); an instance it cannot be attached to is reported, and leaves;
- a version a reload removed is detached from every instance once its calls are done
  (``release``); the provider keeps a service another version still uses running.

``Membership`` runs each of these under its lock, so none interleaves with another.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection
from typing import Any

from providers.base import Provider
from providers.target import PluginInfo, TargetConfig

__all__ = ["DiscoveredAttachments"]

log = logging.getLogger("dispatcher.fleet")


class DiscoveredAttachments:
    """The plugin versions serving one fleet, and those each discovered instance has."""

    def __init__(self, provider: Provider[Any]) -> None:
        self.provider = provider
        #: The versions calling the fleet now, in the order they came.
        self.serving: list[PluginInfo] = []
        #: Each attached instance's target and the versions it is attached for, by key.
        self._attached: dict[str, tuple[TargetConfig, list[PluginInfo]]] = {}

    def serves(self, plugin: PluginInfo) -> bool:
        return any(each.key == plugin.key for each in self.serving)

    def stop_serving(self, plugin: PluginInfo) -> None:
        """``plugin`` no longer calls the fleet: instances that join are not attached for
        it; those attached for it are detached by ``release`` (or when they leave)."""
        self.serving[:] = [each for each in self.serving if each.key != plugin.key]

    async def attach(self, target: TargetConfig) -> None:
        """Attach the joining instance ``target`` for every serving version, or none."""
        attached: list[PluginInfo] = []
        try:
            for plugin in list(self.serving):
                await self.provider.attach(plugin, target)
                attached.append(plugin)
        except BaseException:
            for plugin in reversed(attached):
                with contextlib.suppress(Exception):
                    await self.provider.detach(plugin, target)
            raise
        self._attached[target.key] = (target, attached)

    async def detach(self, target: TargetConfig) -> None:
        """Detach the leaving instance ``target`` for the versions it was attached for."""
        _, plugins = self._attached.pop(target.key, (target, []))
        for plugin in reversed(plugins):
            await self.provider.detach(plugin, target)

    async def add(self, plugin: PluginInfo) -> list[str]:
        """Serve ``plugin`` too, attached to every instance there; the keys of the
        instances it could not be attached to (they must leave: they cannot serve it)."""
        self.serving.append(plugin)
        failed: list[str] = []
        for key, (target, plugins) in list(self._attached.items()):
            if key not in self._attached:
                continue  # detached since (every instance is, as the dispatcher closes)
            try:
                await self.provider.attach(plugin, target)
            except Exception as error:
                log.warning(
                    "%s on %s failed: %s; the instance leaves the fleet until it is listed again",
                    plugin.key,
                    target.describe(),
                    (str(error) or type(error).__name__).splitlines()[0],
                )
                failed.append(key)
                continue
            if self._attached.get(key, (None, None))[1] is not plugins:
                # Detached while this attached (the dispatcher closing): end it too.
                with contextlib.suppress(Exception):
                    await self.provider.detach(plugin, target)
                continue
            plugins.append(plugin)
        return failed

    async def release(self, *, only: Collection[str] | None = None) -> None:
        """Detach every instance from the versions that no longer serve the fleet (of
        them, those whose keys are in ``only``, if given)."""
        serving = {each.key for each in self.serving}

        def leaving(plugin: PluginInfo) -> bool:
            return plugin.key not in serving and (only is None or plugin.key in only)

        for target, plugins in list(self._attached.values()):
            for plugin in [each for each in reversed(plugins) if leaving(each)]:
                plugins.remove(plugin)
                try:
                    await self.provider.detach(plugin, target)
                except Exception:
                    log.exception("detaching %s from %s failed", plugin.key, target.describe())

    def __repr__(self) -> str:
        return (
            f"<DiscoveredAttachments serving={[each.key for each in self.serving]}"
            f" instances={len(self._attached)}>"
        )
