"""Where a fleet's instances come from.

``InstanceSource`` is the seam; ``StaticSource``, the only one implemented, reads the
manifest's list once (``TargetConfig.instance_targets()``). The others the design names
plug in here, each a source that changes the set while the dispatcher runs:

* DNS: A/AAAA or SRV records of one name, resolved again when their TTL ends;
* a registry (etcd keys under a prefix, watched);
* the Docker provider's pool of containers, as they start and stop;
* plugins that dial in (WebSocket), as they connect.

A changing set needs the fleet to add and drain instances while calls run (see
``docs/architecture.md``, "Fleets"); the fleet today takes its set once, at start.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from providers.target import TargetConfig

__all__ = ["InstanceSource", "StaticSource"]


class InstanceSource(abc.ABC):
    """Lists the concrete targets (one per instance) a fleet target stands for."""

    @abc.abstractmethod
    def instances(self) -> Sequence[TargetConfig]:
        """The instances now, in a stable order."""


class StaticSource(InstanceSource):
    """The instances the manifest lists, fixed for the dispatcher's life."""

    def __init__(self, target: TargetConfig) -> None:
        self._instances = tuple(target.instance_targets())

    def instances(self) -> Sequence[TargetConfig]:
        return self._instances

    def __repr__(self) -> str:
        return f"<StaticSource {len(self._instances)} instances>"
