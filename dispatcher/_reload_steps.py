"""A reload carried out on the running parts, step by step.

``Dispatcher.reload`` decides what changes (``dispatcher._reload``'s plan, with the
registry's entries merged in) and installs the new routing table and manifest; what has
to happen to the parts around that install is here, in the order the dispatcher runs it:

1. ``attach``: refuse a version added or changed that declares a plugin protocol this
   dispatcher does not speak (``ProviderError``), then attach the new targets, all or
   none; a failure raises with nothing changed yet. Then attach the new versions to the
   instances discovery already found for fleets they call (one that refuses leaves its
   fleet, and joins it again later: ``FleetRuntime.attach_found``); make the fleets no
   running version called and start their discovery and health checks, so that calls
   routed to them after the swap find their instances (``FleetRuntime.make_for``). A
   failure here, or the reload's caller giving up, undoes the whole step
   (``FleetRuntime.roll_back``, then the new targets are detached);
2. ``new_routes``: build the new table. Kept versions keep their route objects, and so
   their policy state; the others get new ones. Fallbacks of removed versions, and
   those changed versions no longer have, are forgotten and the manifest's rollouts
   are set up on the new table. No await: the dispatcher installs the table right
   after, so no call sees half of it;
3. ``serve``: fallbacks point at the installed table; fleets stop serving the targets of
   removed and changed versions and serve those of added and changed ones;
4. ``finish``: take the new attachments into the ledger, retire what the manifest no longer
   uses, hand the providers the new entries of changed versions on the targets they kept
   and on the instances discovery brought to their fleets (``Provider.update``: the
   plugin's served methods are checked again against them, nothing reconnects; an instance
   found that cannot take one leaves its fleet and joins again with it,
   ``FleetRuntime.update``), log what the reload did. If anything is no longer used, wait
   until the calls in flight at the swap that may reach a version it retires have ended
   (``grace`` seconds at most: then calls still using it fail as it goes; a call to a
   version kept whole does not hold it up: ``InFlight.wait_settled``; nor does one to a
   version changed so that nothing of it ends, a timeout say: ``_ends_something``; with
   none retired and no fleet ended, no call holds it up, fallbacks and events included),
   close the connections of plugins that dialled in on targets no longer used (nothing
   calls them any more: each plugin is told whether its id is still served, so that it
   dials again, or is gone) or whose version now has other inbound targets (it dials again,
   and joins all their fleets), and detach the rest: retired attachments, discovered
   instances from the versions no longer calling them, fleets, the policy state of removed
   versions and of the methods changed ones dropped. What an earlier reload retired and
   left when its caller gave up after its swap (attachments, connections, policy state) is
   ended with this reload's, unless this one runs it again. A caller giving up once the
   wait is over waits for these to end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from dispatcher._attachments import Attachment, Attachments
from dispatcher._drain import InFlight, Reaches
from dispatcher._fallback import Fallbacks
from dispatcher._reload import ReloadPlan
from dispatcher._rollout import RolloutRuntime
from dispatcher._route_build import RouteBuilder
from dispatcher._routes import RouteTable
from dispatcher._versions import check_protocol
from dispatcher.config import Manifest, PluginSpec
from dispatcher.fleet import FleetRuntime
from dispatcher.policies import PolicyRuntime
from providers.target import TargetConfig

__all__ = ["ReloadSteps"]

log = logging.getLogger("dispatcher")


class ReloadSteps:
    """The steps of a reload on one dispatcher's running parts (made at its start).

    ``current_task`` is the dispatcher's, ``draining`` whether it drains now: a reload
    that waits for calls in flight must not stop a drain from hearing of them ending.
    """

    def __init__(
        self,
        *,
        attachments: Attachments,
        build: RouteBuilder,
        fallbacks: Fallbacks,
        rollouts: RolloutRuntime,
        fleets: FleetRuntime,
        policies: PolicyRuntime,
        in_flight: InFlight,
        current_task: Callable[[], asyncio.Task[Any] | None],
        draining: Callable[[], bool],
    ) -> None:
        self._attachments = attachments
        self._build = build
        self._fallbacks = fallbacks
        self._rollouts = rollouts
        self._fleets = fleets
        self._policies = policies
        self._in_flight = in_flight
        self._current_task = current_task
        self._draining = draining
        #: The task whose reload waits now for the calls in flight at its swap: its routes
        #: are in, and it may be given up (``dispatcher._entries``: a newer registry change).
        self.waiting: asyncio.Task[Any] | None = None
        #: The versions reloads removed or changed (their entries as they ran) whose end
        #: has not come yet: this reload's, and those of reloads given up in their wait,
        #: which left their connections open and their policy state for the next to end.
        self._left: list[PluginSpec[Any]] = []

    async def attach(self, plan: ReloadPlan) -> list[Attachment]:
        """Step 1: what the versions added or changed newly need, attached (not yet in
        the ledger: ``finish`` takes them in)."""
        arriving = [*plan.added, *(new for _, new in plan.changed)]
        for plugin in arriving:
            check_protocol(plugin.key, plugin.protocol)
        attached = await self._attachments.attach_new(plan)
        before = self._fleets.checkpoint()
        try:
            await self._join_fleets(arriving)
        except BaseException:  # cancelled too: its caller gave up, so nothing changes
            await self._fleets.roll_back(before)
            await self.abandon(attached)
            raise
        return attached

    async def _join_fleets(self, arriving: list[PluginSpec[Any]]) -> None:
        for plugin in arriving:  # the instances discovery found for fleets they call
            for target in plugin.targets():
                await self._fleets.attach_found(plugin, target)
                provider = self._attachments.providers[target.provider]
                self._fleets.make_for(plugin, target, provider)
        # Fleets no running version called: discovered before the swap, or calls routed
        # to them would find no instance until ``finish``.
        await self._fleets.watch_new()

    async def abandon(self, attached: list[Attachment]) -> None:
        """Detach what ``attach`` attached, for a reload that goes no further (the
        dispatcher closed meanwhile: its close detached only what the ledger held)."""
        await self._attachments.detach_unadopted(attached)

    def new_routes(
        self, manifest: Manifest[Any], plan: ReloadPlan, old_routes: RouteTable
    ) -> RouteTable:
        """Step 2: the routing table of ``manifest``, for the dispatcher to install at once."""
        kept = {plugin.key for plugin in plan.kept}
        # A changed version's methods get their fallbacks again as they are rebuilt: one
        # it dropped, or whose fallback it dropped, must not stay listed by ``stats()``.
        self._fallbacks.forget(old for old, _ in plan.changed)
        routes = RouteTable()
        with self._policies.building():  # what a target's policies are set to now applies
            for plugin in manifest.plugins:
                if plugin.key in kept:
                    routes.add(plugin, old_routes.routes_of(plugin.id, plugin.version))
                else:
                    routes.add(plugin, self._build.routes_of(plugin, routes))
        self._fallbacks.forget(plan.removed)
        self._rollouts.configure(manifest.rollouts, routes)
        return routes

    def serve(self, routes: RouteTable, plan: ReloadPlan) -> None:
        """Step 3, once ``routes`` is installed: fallbacks and fleets follow it."""
        self._fallbacks.point_at(routes)
        for plugin in plan.removed:
            for target in plugin.targets():
                self._fleets.unserve(plugin, target)
        # A changed version keeps its place in the fleets it still calls (``serve`` puts
        # the new entry where the old one was): instances that join later are attached
        # for the versions in the order they came, as those there already were.
        for old, new in plan.changed:
            kept = {target.key for target in new.targets()}
            for target in old.targets():
                if target.key not in kept:
                    self._fleets.unserve(old, target)
        for plugin in [*plan.added, *(new for _, new in plan.changed)]:
            for target in plugin.targets():
                self._fleets.serve(plugin, target)

    async def finish(
        self,
        manifest: Manifest[Any],
        plan: ReloadPlan,
        attached: list[Attachment],
        grace: float,
        source: str,
    ) -> None:
        """Step 4: the ledger follows ``manifest``; what it no longer uses is detached once
        the calls in flight at the swap have ended, ``grace`` seconds at most."""
        attachments, fleets = self._attachments, self._fleets
        attachments.adopt(attached)
        attachments.retire(manifest)
        self._left.extend([*plan.removed, *(old for old, _ in plan.changed)])
        attachments.update(plan)  # changed versions, on the targets they kept
        for _, new in plan.changed:  # and on the instances discovery brought to their fleets
            for target in new.targets():
                fleets.update(new, target)
        log.info("%s", plan.in_words(source))
        await fleets.watch_new()  # discovery and health checks of fleets it made
        used = {target.key for plugin in manifest.plugins for target in plugin.targets()}
        if (
            attachments.retiring
            or fleets.retiring  # what a reload given up in its wait left attached
            or self._left  # this reload's removed and changed versions, and such a one's
            or fleets.unused(used)
        ):
            retired = self._retired_versions(manifest)
            # None of them: the end detaches, closes and forgets nothing a call in flight
            # may use (a changed version whose targets and methods stayed: a timeout, a
            # retry policy), so waiting for calls would only hold the reload up.
            if retired is None or retired or fleets.unused(used):
                await self._settle(grace, retired)
            # A caller giving up from here would cut a detach in half (a service with its
            # Stop and no Destroy, and a channel open until the close, for nothing ends
            # it again): the rest runs to its end, then the cancel goes on.
            await _to_its_end(self._end_retired(manifest, used))
        else:  # nothing retired: instances detached while this reload ran may be dead
            self.forget_dead_targets()

    def forget_dead_targets(self) -> None:
        """Drop the breakers, budgets and limits kept by target that no route holds
        (``PolicyRuntime.forget_targets``): those of targets a reload moved away from or
        whose policies it changed, and those of the instances discovery listed and no
        longer lists, once detached. Called at a reload's end, and when such an instance is
        detached outside a reload (within one, the routes being built hold what the routes
        installed do not: its end does it)."""
        self._policies.forget_targets(self._fleets.instance_keys())

    async def _end_retired(self, manifest: Manifest[Any], used: set[str]) -> None:
        """What the swap retired, and what reloads given up in their wait left, ended once
        its calls are done."""
        left, self._left = self._left, []
        await self._close_connections(manifest, left, used)
        await self._attachments.detach_retired()
        await self._fleets.release()  # discovered instances, from versions gone
        await self._fleets.forget(used)
        await self._policies.forget(_methods_gone(left, manifest))
        self.forget_dead_targets()

    async def _close_connections(
        self, manifest: Manifest[Any], left: list[PluginSpec[Any]], used: set[str]
    ) -> None:
        """Close the plugin connections of the inbound targets of the versions ``left``
        (removed or changed, as they ran) that ``manifest`` no longer uses (those it
        keeps stay connected), and those of versions whose inbound targets are now others
        (they connect again, admitted to the new ones)."""
        served = {plugin.id for plugin in manifest.plugins if _inbound(plugin)}
        closed: set[str] = set()  # a version given up on, then removed again: once
        for plugin in left:
            for target in _inbound(plugin):
                provider = self._attachments.providers.get(target.provider)
                if provider is None or target.key in used or target.key in closed:
                    continue
                closed.add(target.key)
                try:
                    await provider.close_connections(target, replaced=plugin.id in served)
                except Exception:  # as a failed detach: logged, the reload is done
                    log.exception("reload: closing the connections of %s failed", plugin.key)
        running = {plugin.key: plugin for plugin in manifest.plugins}
        retargeted: dict[str, PluginSpec[Any]] = {}
        for old in left:
            # A connection serves every inbound target of its version, joined to their
            # fleets when admitted: one whose version gained a target would never be
            # called through it (that fleet stayed empty while the plugin stayed
            # connected), so it connects again (``Provider.retarget_connections``).
            new = running.get(old.key)
            if new is None:
                continue  # removed: closed above
            had = {target.key for target in _inbound(old)}
            has = {target.key for target in _inbound(new)}
            if had and has and has != had:  # else none admitted, none taken now, or the same
                retargeted[new.key] = new
        for new in retargeted.values():
            targets = _inbound(new)
            provider = self._attachments.providers.get(targets[0].provider)
            if provider is None:
                continue
            try:
                await provider.retarget_connections(new, targets)
            except Exception:  # as a failed detach: logged, the reload is done
                log.exception("reload: closing the connections of %s failed", new.key)

    def _retired_versions(self, manifest: Manifest[Any]) -> Reaches:
        """The plugin versions whose calls in flight what follows the wait may cut: those
        this reload removed, those it changed whose end ends something (a target left, a
        method dropped: ``_ends_something``), and what earlier reloads retired and is
        still attached, open or owned (a replaced batcher, a connection, a cache: a reload
        given up in its wait left it). None (every call) while a fleet holds a discovered
        instance for a version that no longer calls it, which no version here names."""
        if self._fleets.retiring:
            return None
        running = {plugin.key: plugin for plugin in manifest.plugins}
        return frozenset(
            {
                *self._attachments.retired_versions(),
                *self._policies.replaced_versions(),
                *(
                    plugin.key
                    for plugin in self._left
                    if _ends_something(plugin, running.get(plugin.key))
                ),
            }
        )

    async def _settle(self, grace: float, retired: Reaches) -> None:
        """Wait until the calls in flight now and the shadow calls running now that may
        reach a ``retired`` version (None: any) have ended, ``grace`` seconds at most: a
        call or stream to a version kept whole does not hold up the detaching."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        in_flight = self._in_flight
        in_flight.tell_left = True
        self.waiting = asyncio.current_task()
        # Shadow calls are no calls in flight; those starting after the swap go to the
        # routes installed (``Shadow.ended``).
        mirrors = self._rollouts.mirrors(retired)
        try:
            settled = await in_flight.wait_settled(deadline, self._current_task(), retired)
            if mirrors:
                _, running = await asyncio.wait(mirrors, timeout=max(0.0, deadline - loop.time()))
                settled = settled and not running
        finally:
            self.waiting = None
            in_flight.tell_left = self._draining()
        if not settled:
            log.warning(
                "reload: calls in flight at the swap still ran after %g s; detaching anyway", grace
            )


def _ends_something(left: PluginSpec[Any], running: PluginSpec[Any] | None) -> bool:
    """Whether the end of a reload ends anything of ``left`` (an entry a reload removed or
    changed, as it ran) that its calls in flight may use, ``running`` being the entry the
    manifest runs of its version now: everything, removed (its policy state, its
    connections); the state of a method it dropped (``_methods_gone``); what it had on a
    target it left (an attachment, connections dialled in, a fleet's instances). A
    changed version keeps the rest where it was, its provider handed the new entry at the
    swap (``Provider.update``), and a batcher its rebuilt routes replaced counts apart
    (``PolicyRuntime.replaced_versions``)."""
    if running is None:
        return True
    if any(method not in running.methods for method in left.methods):
        return True
    return _target_keys(left) != _target_keys(running)


def _target_keys(plugin: PluginSpec[Any]) -> set[str]:
    return {
        key
        for target in plugin.targets()
        for key in (target.key, *(each.key for each in target.instance_targets()))
    }


def _methods_gone(left: list[PluginSpec[Any]], manifest: Manifest[Any]) -> set[tuple[str, str]]:
    """The methods, by ``(plugin key, method)``, of the versions ``left`` (removed or
    changed, as they ran) that ``manifest`` no longer runs: every method of a version it
    removed, those a changed version dropped. Not those it runs: their routes were built
    anew, with state of their own, and a version a given-up reload removed may be back."""
    running = {plugin.key: plugin.methods for plugin in manifest.plugins}
    gone: set[tuple[str, str]] = set()
    for plugin in left:
        methods = running.get(plugin.key, {})
        gone.update((plugin.key, method) for method in plugin.methods if method not in methods)
    return gone


def _inbound(plugin: PluginSpec[Any]) -> list[TargetConfig]:
    """The targets of ``plugin`` that plugins dialling in connect to."""
    return [target for target in plugin.targets() if target.accepts_connections()]


async def _to_its_end(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work`` to its end even if the awaiting task is cancelled meanwhile; the
    cancel is raised once ``work`` is done."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()  # its own failure first
    if cancelled:
        raise asyncio.CancelledError
