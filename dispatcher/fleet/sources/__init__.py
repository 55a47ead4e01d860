"""Where a fleet's instances come from.

``InstanceSource`` (``providers.discovery``) is the seam: one source watches one place
and reports the whole list of ``Endpoint``s it knows there each time it changes. The
fleet turns each endpoint into a concrete target (``TargetConfig.instance_at``) and merges
every source of a target with its fixed instances (``dispatcher.fleet.membership``).
The sources the manifest names (``TargetConfig.instance_sources()``) are made here:

* ``dns``: A/AAAA records of a name (with a port) or its SRV records, resolved again
  when their TTL ends;
* ``etcd``: keys under a prefix of an etcd registry, read then watched.

A source that fails keeps its last list (the fleet keeps calling those instances) and
says why in ``error``, which ``dispatcher health`` shows; it never raises out of ``run``.
A source reports at most ``MAX_ENDPOINTS`` endpoints, the first in its own stable order,
and logs how many more it left out.
A provider may add a source of its own (``Provider.instance_source``), for instances
only it knows of, such as plugins connected to the dispatcher.
"""

from __future__ import annotations

from providers.discovery import DnsDiscovery, InstanceSource, RegistryDiscovery, Report
from providers.target import Discovery

__all__ = ["MAX_ENDPOINTS", "InstanceSource", "Report", "new_source"]

#: At most this many endpoints are reported by one source: a name or a prefix listing
#: more is either a mistake or an attack on our memory (each is a target, a breaker and a
#: pool of the fleet, and every report makes the fleet check each listed one again).
MAX_ENDPOINTS = 1000


def new_source(spec: Discovery) -> InstanceSource:
    """The source watching ``spec``."""
    if isinstance(spec, DnsDiscovery):
        from dispatcher.fleet.sources.dns import DnsSource

        return DnsSource(spec)
    if isinstance(spec, RegistryDiscovery):
        from dispatcher.fleet.sources.etcd import EtcdSource

        return EtcdSource(spec)
    raise TypeError(f"no source watches {type(spec).__name__}")
