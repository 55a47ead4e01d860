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
  take calls (``add``); an instance it cannot be attached to is reported, and leaves. One
  still attached for it (a reload that removed it was given up while its calls ran, and
  ``release`` has not come since) keeps that attachment, not a second (a second ``Init``
  and ``Start`` of a running service), when the entry is the same; with another, it
  leaves and joins again with the new one;
- a version a reload removed is detached from every instance once its calls are done
  (``release``); the provider keeps a service another version still uses running;
- a version whose entry a reload changed (its methods), calling the fleet still, is not
  attached again: each instance attached for its old entry is handed the new one
  (``update``, by ``Provider.update``), as the dispatcher hands the targets the manifest
  lists. One whose attach was under way as the routes swapped takes it as its attach
  ends. An instance whose provider cannot take it leaves the fleet and joins again, for
  every version, with the entries serving then: a fixed instance cannot, and keeps its
  state; the failure is logged the same way for both (``providers._entry_updates``).

Detaches go at once, by the provider's queues (``Provider.detach_queue``), as the
dispatcher's own close detaches its plugins: instances that hang on their ``Stop`` cost
about one ``stop_timeout_ms`` together, not one each, and a failure is logged while the
others go on. Two instances of one queue still go one after another, newest first, even
when two calls detach them (two instances that left the fleet one after the other), and
no more than ``DETACHES_AT_ONCE`` run at once (a fleet may have a thousand instances).

``Membership`` runs these so that none interleaves with another, except the detaches of
instances that left: those run together (``Membership``'s turns).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Hashable, Sequence
from typing import Any

from linchkit_plugin.errors import ProviderError
from providers._detach_queues import in_queues
from providers._entry_updates import updated
from providers.base import Provider
from providers.target import PluginInfo, TargetConfig

__all__ = ["DETACHES_AT_ONCE", "DiscoveredAttachments"]

log = logging.getLogger("dispatcher.fleet")

#: Detaches of one fleet's instances under way at once, at most: enough that a close
#: with many hung instances costs a few stop timeouts, bounded so that a fleet of a
#: thousand does not open a thousand ``Stop`` calls (or container stops) together.
DETACHES_AT_ONCE = 32


class _Turn:
    """The detaches waiting for, or holding, one queue of the provider."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class DiscoveredAttachments:
    """The plugin versions serving one fleet, and those each discovered instance has."""

    def __init__(self, provider: Provider[Any], *, at_once: int = DETACHES_AT_ONCE) -> None:
        self.provider = provider
        #: The versions calling the fleet now, in the order they came.
        self.serving: list[PluginInfo] = []
        #: Each attached instance's target and the versions it is attached for, by key.
        self._attached: dict[str, tuple[TargetConfig, list[PluginInfo]]] = {}
        #: The provider's queues some detach holds or waits for, across calls; a queue
        #: is forgotten once none does.
        self._turns: dict[Hashable, _Turn] = {}
        #: Detaches under way, ``at_once`` at most.
        self._slots = asyncio.Semaphore(at_once)

    def serves(self, plugin: PluginInfo) -> bool:
        return any(each.key == plugin.key for each in self.serving)

    def serve(self, plugin: PluginInfo) -> None:
        """``plugin`` calls the fleet: instances that join are attached for it, in the
        order the versions came. A new entry of a version serving already (a reload
        changed it) takes the old one's place; those attached have it from ``update``."""
        for index, each in enumerate(self.serving):
            if each.key == plugin.key:
                self.serving[index] = plugin
                return
        self.serving.append(plugin)

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
            self._take_changed_entries(target, attached)
        except BaseException:
            for plugin in reversed(attached):
                with contextlib.suppress(Exception):
                    await self.provider.detach(plugin, target)
            raise
        self._attached[target.key] = (target, attached)

    def _take_changed_entries(self, target: TargetConfig, attached: list[PluginInfo]) -> None:
        """A reload swapped its routes while ``target`` was being attached, changing the
        entry of a version attached with the old one (``update`` ran before this instance
        was in): hand it the entry serving now. ``ProviderError`` if the provider cannot
        take it: the attach fails, and the next pass tries again."""
        for index, plugin in enumerate(attached):
            now = next((each for each in self.serving if each.key == plugin.key), None)
            if now is None or now is plugin:
                continue  # no longer served (``release`` detaches it), or unchanged
            attached[index] = now
            if not updated(self.provider, now, target):
                raise ProviderError(f"{now.key}: {target.describe()} did not take its new entry")

    def update(self, plugin: PluginInfo) -> list[str]:
        """``plugin``'s entry changed (a reload, same version) and it serves the fleet
        still: every instance attached for an older entry of it holds this one, and the
        provider is told (``Provider.update``). The keys of the instances whose provider
        failed to take it (logged): they must leave, and join again with it."""
        failed: list[str] = []
        for key, (target, plugins) in self._attached.items():
            older = [
                i for i, each in enumerate(plugins) if each.key == plugin.key and each is not plugin
            ]
            if not older:
                continue  # attached with this entry, or not for this version
            for index in older:
                plugins[index] = plugin
            if not updated(self.provider, plugin, target):
                log.warning(
                    "%s on %s: the instance leaves the fleet, and joins again with the new entry",
                    plugin.key,
                    target.describe(),
                )
                failed.append(key)
        return failed

    async def detach(self, targets: Sequence[TargetConfig]) -> None:
        """Detach the leaving instances ``targets`` (in the order they were attached) for
        the versions each was attached for, at once (``_detach_units``)."""
        units: list[tuple[PluginInfo, TargetConfig]] = []
        for target in reversed(targets):
            _, plugins = self._attached.pop(target.key, (target, []))
            units.extend((plugin, target) for plugin in reversed(plugins))
        await self._detach_units(units)

    async def add(self, plugin: PluginInfo) -> list[str]:
        """Serve ``plugin`` too, attached to every instance there; the keys of the
        instances it could not be attached to (they must leave: they cannot serve it)."""
        self.serving.append(plugin)
        failed: list[str] = []
        for key, (target, plugins) in list(self._attached.items()):
            if key not in self._attached:
                continue  # detached since (every instance is, as the dispatcher closes)
            waiting = next((i for i, each in enumerate(plugins) if each.key == plugin.key), None)
            if waiting is not None:  # attached still, for an entry no longer serving
                if plugins[waiting] == plugin:
                    plugins[waiting] = plugin
                else:
                    failed.append(key)  # another entry: it joins again with this one
                continue
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

    @property
    def retiring(self) -> bool:
        """Whether some instance is attached for a version that no longer serves the
        fleet (``release`` would detach it)."""
        serving = {each.key for each in self.serving}
        return any(
            each.key not in serving for _, plugins in self._attached.values() for each in plugins
        )

    async def release(self, *, only: Collection[str] | None = None) -> None:
        """Detach every instance from the versions that no longer serve the fleet (of
        them, those whose keys are in ``only``, if given)."""
        serving = {each.key for each in self.serving}

        def leaving(plugin: PluginInfo) -> bool:
            return plugin.key not in serving and (only is None or plugin.key in only)

        units: list[tuple[PluginInfo, TargetConfig]] = []
        for target, plugins in reversed(self._attached.values()):
            for plugin in [each for each in reversed(plugins) if leaving(each)]:
                plugins.remove(plugin)
                units.append((plugin, target))
        await self._detach_units(units)

    async def _detach_units(self, units: Sequence[tuple[PluginInfo, TargetConfig]]) -> None:
        """Detach each (version, instance) of ``units``, newest first: at once, but one
        after another within a queue of the provider (``Provider.detach_queue``: the
        entries at one gRPC address), in this call and across the calls under way (each
        instance that left the fleet is detached by a call of its own); no more than
        ``at_once`` together. A failure is logged and the others go on, as the
        dispatcher's close does."""
        await in_queues(units, self._queue_of, self._detach_unit, slots=self._slots)

    def _queue_of(self, unit: tuple[PluginInfo, TargetConfig]) -> Hashable:
        plugin, target = unit
        return self.provider.detach_queue(plugin, target)

    async def _detach_unit(self, unit: tuple[PluginInfo, TargetConfig]) -> None:
        plugin, target = unit
        queue = self._queue_of(unit)
        turn = self._turns.get(queue)
        if turn is None:
            turn = self._turns[queue] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                await self.provider.detach(plugin, target)
        except Exception:
            log.exception("detaching %s from %s failed", plugin.key, target.describe())
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[queue]

    def __repr__(self) -> str:
        return (
            f"<DiscoveredAttachments serving={[each.key for each in self.serving]}"
            f" instances={len(self._attached)} detach_queues={len(self._turns)}>"
        )
