"""Where a fleet's instances come from.

``InstanceSource`` is the seam: one source watches one place and reports the whole list
of ``Endpoint``s it knows there each time it changes. The fleet turns each endpoint into
a concrete target (``TargetConfig.instance_at``) and merges every source of a target
with its fixed instances (``dispatcher.fleet.membership``).

* ``static``: the manifest's fixed list, read once (``TargetConfig.weighted_instances()``);
* ``dns``: A/AAAA records of a name (with a port) or its SRV records, resolved again
  when their TTL ends;
* ``etcd``: keys under a prefix of an etcd registry, read then watched.

A source that fails keeps its last list (the fleet keeps calling those instances) and
says why in ``error``, which ``dispatcher health`` shows; it never raises out of ``run``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

from providers.discovery import DnsDiscovery, Endpoint, RegistryDiscovery
from providers.target import Discovery

__all__ = ["InstanceSource", "Report", "new_source"]

#: What a source calls with the whole list of endpoints it knows, each time it changes.
Report = Callable[[Sequence[Endpoint]], None]


class InstanceSource(abc.ABC):
    """Watches one discovery source (``providers.discovery``) and reports its endpoints."""

    def __init__(self, name: str) -> None:
        #: What ``dispatcher health`` calls the source, e.g. ``dns SRV _echo._tcp.example``.
        self.name = name
        #: Why the last read failed, or None after a good one; the last list stays in use.
        self.error: str | None = None
        #: How many good reads so far (the first one ends the dispatcher's start wait).
        self.reads = 0

    @abc.abstractmethod
    async def run(self, report: Report) -> None:
        """Read the source and ``report`` its endpoints, again whenever they may have
        changed, until cancelled. Failures set ``error`` and are retried; never raises."""

    async def aclose(self) -> None:
        """Release what ``run`` opened (clients, sessions); called after ``run`` ended."""
        return None  # a source holding nothing open has nothing to release

    def __repr__(self) -> str:
        state = f" error={self.error!r}" if self.error else ""
        return f"<{type(self).__name__} {self.name} reads={self.reads}{state}>"


def new_source(spec: Discovery) -> InstanceSource:
    """The source watching ``spec``."""
    if isinstance(spec, DnsDiscovery):
        from dispatcher.fleet.sources.dns import DnsSource

        return DnsSource(spec)
    if isinstance(spec, RegistryDiscovery):
        from dispatcher.fleet.sources.etcd import EtcdSource

        return EtcdSource(spec)
    raise TypeError(f"no source watches {type(spec).__name__}")
