"""Which provider serves which plugin on which target: the dispatcher's attachments.

A plugin runs on its targets only once each target's provider has *attached* it (started
its process, opened its client, deployed it…); the dispatcher must *detach* every such
attachment, in reverse order where that matters, before it closes the providers. This
module keeps that ledger, so start, reload and close share one account of what is attached:

- ``attach`` at start, every instance of every target of a plugin;
- ``attach_new`` at a reload, what the new manifest adds, all or none;
- ``retire`` what a reloaded manifest no longer uses (detached once its calls are done),
  and take back what it uses again before that detach came (a reload given up in its
  wait, then one going back): ``attach_new`` does not attach those a second time, whose
  detach would then end the attachment the manifest uses;
- ``update`` the entries of versions a reload changed on the targets they kept (the
  instances discovery brought to a fleet are the fleet runtime's: ``FleetRuntime.update``);
- ``aclose`` everything, then the providers.

Detaching many (a close, a reload that removes several plugins) goes by queue
(``Provider.detach_queue``): within one, one after another, newest first, for its
detaches depend on each other's order (entries at one gRPC address); the queues at once,
for they share nothing: plugins that hang cost about one stop grace together, not one each.

A provider no plugin used at start is made and started when a reload first needs it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, NamedTuple

from dispatcher._reload import ReloadPlan
from dispatcher.config import Manifest, PluginSpec
from providers import provider_class
from providers._detach_queues import in_queues
from providers._entry_updates import updated
from providers.base import Provider, ServedReport
from providers.egress import EgressPolicy
from providers.target import TargetConfig

__all__ = ["Attachment", "Attachments", "instances_of", "providers_for"]

log = logging.getLogger("dispatcher")


class Attachment(NamedTuple):
    """One plugin attached to one concrete target by its provider."""

    provider: Provider[Any]
    plugin: PluginSpec[Any]
    target: TargetConfig

    def key(self) -> tuple[str, str]:
        return self.plugin.key, self.target.key

    def queue(self) -> tuple[str, Hashable]:
        """The attachments whose detaches run in turn with this one's (``detach_queue``)."""
        return self.provider.name, self.provider.detach_queue(self.plugin, self.target)


def instances_of(plugin: PluginSpec[Any]) -> list[TargetConfig]:
    """Every concrete target the manifest lists for ``plugin`` (fleet instances included)."""
    return [instance for target in plugin.targets() for instance in target.instance_targets()]


def providers_for(manifest: Manifest[Any]) -> dict[str, Provider[Any]]:
    """One provider of each kind the manifest's targets use."""
    used = {target.provider for plugin in manifest.plugins for target in plugin.targets()}
    return {name: provider_class(name)() for name in sorted(used)}


class Attachments:
    """The providers, which of them started, and every attachment, in order."""

    def __init__(
        self,
        providers: dict[str, Provider[Any]],
        egress: EgressPolicy,
        event_sink: Callable[..., Any],
        served_sink: Callable[[ServedReport], None] | None = None,
    ) -> None:
        """``served_sink``: told what plugins say they serve (``Provider.served_sink``)."""
        self.providers = providers
        self._egress = egress
        self._event_sink = event_sink
        self._served_sink = served_sink
        self._started: list[Provider[Any]] = []
        self._attached: list[Attachment] = []
        #: Retired by a reload that has not detached them yet (it waits for their calls):
        #: a close meanwhile detaches them, before the rest (``aclose``).
        self._retired: list[Attachment] = []
        #: The detach of a retired attachment under way (``detach_retired``): the close
        #: waits for it before it closes providers.
        self._detaching: set[asyncio.Future[bool]] = set()
        #: A close has begun: a reload detaches no more of what it retired (the close does).
        self._closing = False
        for provider in providers.values():
            self._prepare(provider)

    def _prepare(self, provider: Provider[Any]) -> None:
        provider.event_sink = self._event_sink
        provider.served_sink = self._served_sink
        provider.use_egress(self._egress)

    async def start(self) -> None:
        for provider in self.providers.values():
            await provider.start()
            self._started.append(provider)

    async def attach(self, plugin: PluginSpec[Any]) -> None:
        """Attach every instance of every target of ``plugin`` (at start)."""
        for instance in instances_of(plugin):
            provider = self.providers[instance.provider]
            await provider.attach(plugin, instance)
            self._attached.append(Attachment(provider, plugin, instance))

    async def attach_new(self, plan: ReloadPlan) -> list[Attachment]:
        """Attach what a reload adds: the instances of added versions and the targets
        changed versions gained. All or none: a failure detaches what this call attached.
        The result is not in the ledger until ``adopt``."""
        attached: list[Attachment] = []
        try:
            for plugin, instance in _wanted(plan):
                if self._retired_as(plugin.key, instance.key) is not None:
                    continue  # attached still: ``retire`` takes it back
                provider = await self._started_provider(instance.provider)
                await provider.attach(plugin, instance)
                attached.append(Attachment(provider, plugin, instance))
        except BaseException:
            await self.detach_unadopted(attached)
            raise
        return attached

    async def detach_unadopted(self, attached: list[Attachment]) -> None:
        """Detach what ``attach_new`` attached and nothing adopted, newest first in each
        queue; a failure is logged, not raised."""
        await _in_queues(reversed(attached), _detached)

    def adopt(self, attached: Iterable[Attachment]) -> None:
        self._attached.extend(attached)

    def retire(self, manifest: Manifest[Any]) -> None:
        """Take the attachments ``manifest`` no longer uses out of the ledger, for
        ``detach_retired`` (or the close) to detach; take back into it those an earlier
        reload retired that ``manifest`` uses again, with its entry (handed to the
        provider when it is another: ``Provider.update``)."""
        used = {
            (plugin.key, instance.key): plugin
            for plugin in manifest.plugins
            for instance in instances_of(plugin)
        }
        back = [each for each in self._retired if each.key() in used]
        self._retired = [each for each in self._retired if each.key() not in used]
        for each in back:
            entry = used[each.key()]
            if entry != each.plugin:
                updated(each.provider, entry, each.target)
            self._attached.append(Attachment(each.provider, entry, each.target))
        retired = [each for each in self._attached if each.key() not in used]
        self._attached = [each for each in self._attached if each.key() in used]
        self._retired.extend(retired)

    def still_attached(self, manifest: Manifest[Any]) -> dict[str, PluginSpec[Any]]:
        """The entries, by key, of the retired attachments (not detached yet) that
        ``manifest`` uses again: a reload to it takes them back, and so cannot change
        what they were started with (``plan_reload``)."""
        return {
            plugin.key: retired.plugin
            for plugin in manifest.plugins
            for instance in instances_of(plugin)
            if (retired := self._retired_as(plugin.key, instance.key)) is not None
        }

    def _retired_as(self, plugin_key: str, instance_key: str) -> Attachment | None:
        return next(
            (each for each in self._retired if each.key() == (plugin_key, instance_key)), None
        )

    def update(self, plan: ReloadPlan) -> None:
        """Hand the providers the new entries of the versions ``plan`` changed, where
        their targets stayed equal (``Provider.update``): attached with the old entry and
        not attached again, they would be checked against its methods. The ledger takes
        the new entries too. Call it once ``retire`` has taken out the targets they left;
        a failure is logged, not raised (the reload is done)."""
        changed = {new.key: new for _, new in plan.changed}
        for index, each in enumerate(self._attached):
            new = changed.get(each.plugin.key)
            if new is None or each.plugin is new:
                continue  # another version, or attached with the new entry by this reload
            self._attached[index] = Attachment(each.provider, new, each.target)
            updated(each.provider, new, each.target)
        for old, new in plan.changed:  # inbound targets: attached by their connections
            had = {target.key for target in old.targets()}
            for target in new.targets():
                provider = self.providers.get(target.provider)
                if provider is not None and target.accepts_connections() and target.key in had:
                    updated(provider, new, target)

    @property
    def retiring(self) -> bool:
        """Whether some attachment a reload retired is still attached."""
        return bool(self._retired)

    def retired_versions(self) -> set[str]:
        """The plugin versions (keys) of the attachments reloads retired and that are still
        attached."""
        return {each.plugin.key for each in self._retired}

    async def detach_retired(self) -> None:
        """Detach what reloads retired, newest first in each queue: this reload's, and
        what one whose caller gave up after its swap left; a failure is logged, not
        raised. Those a close detached meanwhile are not detached again, and once a close
        has begun none is started here: the close waits only for the detaches under way,
        then does the rest."""
        while self._retired and not self._closing:  # and what a reload retired meanwhile
            await _in_queues(list(reversed(self._retired)), self._detach_retired)

    async def _detach_retired(self, each: Attachment) -> None:
        if self._closing or not _taken(self._retired, each):
            return
        detach = asyncio.ensure_future(_detached(each))
        self._detaching.add(detach)
        try:
            detached = await detach
        finally:
            self._detaching.discard(detach)
        if detached:
            log.info("reload: detached %s from %s", each.plugin.key, each.target.describe())

    async def aclose(self) -> None:
        """Detach everything, newest first in each queue (the queues at once), then close
        the started providers, last first. What a reload retired and has not detached yet
        goes first in its queue: it is on its way out, and what stays must not be handed
        its place (a service at one address keeps the config of the entry detached last).
        A reload's detach under way ends first: its provider closed under it would cut it
        in half (a ``Stop`` without its ``Destroy``). A cancel lets the detaches under way
        end, starts no other, and is raised then: what is left stays in the ledger."""
        self._closing = True
        if self._detaching:
            await asyncio.gather(*self._detaching, return_exceptions=True)
        while self._retired or self._attached:  # and what a reload adopted meanwhile
            await _in_queues([*reversed(self._retired), *reversed(self._attached)], self._detach)
        while self._started:
            provider = self._started.pop()
            try:
                await provider.aclose()
            except Exception:
                log.exception("closing provider %s failed", provider.name)

    async def _detach(self, each: Attachment) -> None:
        if _taken(self._retired, each) or _taken(self._attached, each):
            await _detached(each)

    async def _started_provider(self, name: str) -> Provider[Any]:
        """The provider ``name``, made and started now if no plugin used it until this reload."""
        provider = self.providers.get(name)
        if provider is None:
            provider = self.providers[name] = provider_class(name)()
            self._prepare(provider)
            await provider.start()
            self._started.append(provider)
        return provider


def _wanted(plan: ReloadPlan) -> list[tuple[PluginSpec[Any], TargetConfig]]:
    wanted = [(plugin, instance) for plugin in plan.added for instance in instances_of(plugin)]
    for old, new in plan.changed:
        had = {instance.key for instance in instances_of(old)}
        wanted.extend((new, each) for each in instances_of(new) if each.key not in had)
    return wanted


async def _in_queues(
    attachments: Iterable[Attachment], detach: Callable[[Attachment], Awaitable[object]]
) -> None:
    """``detach`` each of ``attachments`` by queue (``Attachment.queue``): one after
    another, in their order, within a queue, the queues at once (``in_queues``: a cancel
    lets the detaches under way end and starts no other)."""
    await in_queues(attachments, Attachment.queue, detach)


def _taken(ledger: list[Attachment], each: Attachment) -> bool:
    """Take ``each`` out of ``ledger`` (False: a close or a reload took it already)."""
    for index in range(len(ledger) - 1, -1, -1):  # the newest are taken first
        if ledger[index] is each:
            del ledger[index]
            return True
    return False


async def _detached(each: Attachment) -> bool:
    try:
        await each.provider.detach(each.plugin, each.target)
    except Exception:
        log.exception("detaching %s from %s failed", each.plugin.key, each.target.describe())
        return False
    return True
