"""Methods the manifest routes to a target whose plugin does not serve them.

A manifest naming a method its plugin lacks (a typo, a method a new build dropped) is not
refused: the plugin answers such a call ``method_not_found``, and a manifest may name a
method before the build that serves it is rolled out. It is said instead, as soon as the
dispatcher knows it:

* ``ServedCheck`` takes what providers report as they learn it (``Provider.report_served``:
  a ``Describe`` at start or after a lost connection, a WebSocket ``hello``) and logs one
  warning per plugin, place and set of missing methods, e.g. ``greeter@1.0.0: the manifest
  routes greets to grpc 127.0.0.1:50051, which does not serve it; it serves: greet,
  shout``. A place that said what it serves and then says nothing believable (a
  redeployed build whose ``Describe`` fails or lies) gets one warning that it is no longer
  checked, not silence: what the process before said is not held against the one there
  now (a false alarm if the new build serves it), nor dropped without a word. Its next
  list is checked, and its gap said, as the first was;
* ``dispatcher._health`` asks ``Provider.served_methods`` and reports the gap in
  ``TargetHealth.missing_methods`` (``dispatcher health`` exits 1).

A target whose binding cannot say (Lambda, an HTTP function without ``/describe``) is
never reported. What a plugin lists is bounded before it gets here (``providers.served``);
what is printed of it is bounded here (``listed``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from typing import Any

from dispatcher.config import PluginSpec
from providers.base import ServedReport
from providers.target import TargetConfig

__all__ = ["ServedCheck", "listed", "methods_routed_to", "missing_methods"]

log = logging.getLogger("dispatcher")

#: How many names a message shows; the rest are counted.
SHOWN_NAMES = 20
#: How many characters of one name a message shows.
SHOWN_NAME_LENGTH = 64
#: How many (plugin, place) pairs ``ServedCheck`` remembers the gap of (none, for a place
#: that serves every routed method); past that it forgets them all (one more warning each,
#: rather than memory growing with connections).
REMEMBERED_PLACES = 4096


def methods_routed_to(plugin: PluginSpec[Any], target: TargetConfig) -> tuple[str, ...]:
    """The methods of ``plugin`` the manifest routes to ``target``, or to the fleet of
    which ``target`` is an instance (fixed, or found by discovery), in manifest order."""
    places = {
        each.key for each in plugin.targets() if each.key == target.key or each.has_instance(target)
    }
    return tuple(name for name in plugin.methods if plugin.target_of(name).key in places)


def missing_methods(routed: Iterable[str], served: frozenset[str] | None) -> tuple[str, ...]:
    """Those of ``routed`` that ``served`` lacks; none when the plugin did not say."""
    if served is None:
        return ()
    return tuple(name for name in routed if name not in served)


def listed(names: Collection[str], shown: int = SHOWN_NAMES) -> str:
    """``names`` for a message: at most ``shown`` of them, each cut short, the rest counted."""
    cut = [_short(name) for name in list(names)[:shown]]
    more = len(names) - len(cut)
    return ", ".join(cut) + (f" and {more} more" if more > 0 else "")


def _short(name: str) -> str:
    return name if len(name) <= SHOWN_NAME_LENGTH else name[: SHOWN_NAME_LENGTH - 1] + "…"


class ServedCheck:
    """The dispatcher's ``Provider.served_sink``: warns of the routed methods a plugin
    says it does not serve, once per plugin, place and set of missing methods; and once
    when a place that said what it serves no longer does (module docstring)."""

    def __init__(self) -> None:
        #: The routed methods each place lacked by its last list; no entry: it said nothing.
        self._gaps: dict[tuple[str, str], tuple[str, ...]] = {}

    def __call__(self, report: ServedReport) -> None:
        plugin = report.plugin
        if not isinstance(plugin, PluginSpec):
            return  # providers are handed the manifest's plugins; anything else has no routes
        place = (plugin.key, report.place)
        if report.served is None:
            said = self._gaps.pop(place, None)
            if said is not None:  # it did say: that it no longer does is a change
                log.warning(
                    "%s: %s no longer says which methods it serves%s: the methods routed"
                    " there are not checked against it until it says again",
                    plugin.key,
                    report.place,
                    f" (it last lacked {listed(said)})" if said else "",
                )
            return
        missing = missing_methods(methods_routed_to(plugin, report.target), report.served)
        if self._gaps.get(place) == missing:
            return  # said already (a restart, a reconnect)
        if len(self._gaps) >= REMEMBERED_PLACES:
            self._gaps.clear()
        self._gaps[place] = missing
        if missing:
            log.warning(
                "%s: the manifest routes %s to %s, which does not serve %s; it serves: %s",
                plugin.key,
                listed(missing),
                report.place,
                "it" if len(missing) == 1 else "them",
                listed(sorted(report.served)) or "nothing the manifest could route",
            )

    def __repr__(self) -> str:
        gaps = sum(1 for missing in self._gaps.values() if missing)
        return f"<ServedCheck places={len(self._gaps)} with_missing={gaps}>"
