"""Who uses a gRPC connection, and who uses the plugin service at an address.

Manifest entries whose targets are equal share one connection (``target.key``); entries
whose targets name one address reach one service there, whatever else their targets say
(metadata, timeouts). A reload that replaces version 1 by version 2 on the same address
attaches version 2 before it detaches version 1, so the two overlap. Hence:

- a connection closes when the last entry using it is detached, or the attach it was
  opened for fails, unless another attach or detach over it is under way (a detach
  waiting its turn still sends ``Stop`` and ``Destroy`` over it);
- the service's ``Stop`` and ``Destroy`` are sent when the last entry using the address is
  detached, never while another still calls it; the address's record goes with it (or
  with a failed attach), unless another attach or detach there is under way;
- the service runs with the config of the last ``Init`` it had (``initialised``); when
  that entry leaves and another with ``lifecycle: dispatcher`` stays, the newest such
  entry's ``Init`` and ``Start`` are sent again with its config, so the service never
  runs with the config of a version that is gone (not when the configs are equal). A
  reload detaches the leaving entry once its calls in flight have ended, not those of the
  entries staying, which keep coming: the service gets that ``Init`` while their calls
  run, as it gets a new version's while the old one's run (docs/protocol.md, "``Init``
  while calls run");
- a new entry whose ``Init`` reached the service and whose start then failed sends no
  ``Destroy`` there; the service gets the running entry's ``Init`` and ``Start`` back;
- what the service emits goes to the newest entry attached over the connection, so an
  event names a version still served;
- the lifecycle steps sent to the service run one sequence at a time (``steps``): a
  service found again after its connection was lost gets the ``Init`` of the entry that
  had the last one when its turn comes, not one read before a new version's ``Init``;
- a reload that changes an entry (its methods) and keeps its target equal does not attach
  it again: the records above take the new entry in place of the old
  (``GrpcProvider.update``), so what the plugin listed is checked against its methods.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from providers.target import PluginInfo

__all__ = ["ConnectionUsers", "EventSink", "ServiceUsers", "Use"]

#: ``sink(event, data)``: where one attached plugin's events go.
EventSink = Callable[[str, Any], None]


@dataclass(slots=True)
class ConnectionUsers:
    """The plugins attached over one connection, oldest first."""

    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    sinks: dict[str, EventSink] = field(default_factory=dict)
    #: Attaches and detaches under way over the connection: none may close what another
    #: is about to use (an attach to start, a detach to send ``Stop`` and ``Destroy``).
    under_way: int = 0

    def unused(self) -> bool:
        return not self.plugins and not self.under_way

    def emit(self, event: str, data: Any) -> None:
        """The connection's ``Events`` sink: the newest plugin's, when it takes events."""
        if self.sinks:
            next(reversed(self.sinks.values()))(event, data)


@dataclass(frozen=True, slots=True)
class Use:
    """One plugin attached to the service over the connection of ``target_key``."""

    plugin: PluginInfo
    target_key: str
    #: Whether its target has ``lifecycle: dispatcher``.
    runs_lifecycle: bool


@dataclass(slots=True)
class ServiceUsers:
    """The attachments that reach the service at one address, oldest first."""

    uses: dict[tuple[str, str], Use] = field(default_factory=dict)
    #: The plugin whose ``Init`` the service had last; None while the dispatcher has run
    #: no lifecycle there (``lifecycle: remote``).
    initialised: PluginInfo | None = None
    #: Held while a sequence of lifecycle steps goes to the service (a start, a hand-over,
    #: a restart's ``Init`` again, the end): two at once left the config of the one whose
    #: ``Init`` came last, which need not be ``initialised``.
    steps: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Attaches and detaches under way at the address, each holding this record: it is
    #: dropped only once none is, so they all take their turns on one ``steps``.
    under_way: int = 0

    def unused(self) -> bool:
        return not self.uses and not self.under_way

    def heir(self) -> Use | None:
        """The newest attachment that runs the service's lifecycle; None when none does."""
        for use in reversed(self.uses.values()):
            if use.runs_lifecycle:
                return use
        return None
