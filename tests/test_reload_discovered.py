"""A reload that changes what a running version serves (its methods) and keeps its fleet:
each instance of the fleet takes the new entry (``Provider.update``: nothing reconnects,
nothing restarts), those discovery found as well as those the manifest lists, and those
that join later are attached with it.

The fleet is real: the Python SDK's gRPC server (``tests.recorded_grpc``) on 127.0.0.2
and .3 found by a real dnsmasq, on 127.0.0.4 listed in the manifest, all on one port, with
``lifecycle: dispatcher``. What an instance holds of the entry is what the dispatcher
checks the plugin's ``Describe`` against: the manifest routes ``nope``, which the plugin
lacks, and each reload below adds ``other``, which it lacks too, so each instance's
warning says which entry its provider record holds (``dispatcher._served``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher import Dispatcher
from tests.conftest import manifest, route_warnings
from tests.dns_server import (
    Dnsmasq,
    Zone,
    dnsmasq_fixture,  # noqa: F401  (the fixture `dnsmasq`)
    needs_dnsmasq,
)
from tests.recorded_grpc import served_fixture  # noqa: F401  (the fixture `served`)
from tests.services import port_free_on

pytestmark = needs_dnsmasq

StartDnsmasq = Callable[[Zone], Dnsmasq]
FOUND_HOSTS = ("127.0.0.2", "127.0.0.3")
FIXED_HOST = "127.0.0.4"
LATE_HOST = "127.0.0.5"
ALL_HOSTS = (*FOUND_HOSTS, FIXED_HOST, LATE_HOST)
#: Each warning names the methods missing and the instance (``grpc host:port``).
_WARNING = re.compile(r"routes (?P<missing>.+) to grpc (?P<host>[0-9.]+):\d+, which")


def entry(instances: list[dict[str, Any]], *methods: str) -> dict[str, Any]:
    return {
        "id": "fleet",
        "version": "1.0.0",
        "target": {
            "provider": "grpc",
            "instances": instances,
            # In turn, so a handful of calls reaches every instance.
            "balance": "round_robin",
            "lifecycle": "dispatcher",
            "connect_timeout_ms": 10_000,
        },
        "defaults": {"timeout_ms": 10_000},
        "methods": {name: {} for name in methods},
    }


def said(caplog: pytest.LogCaptureFixture) -> dict[str, list[str]]:
    """What the dispatcher said each instance lacks, in order, by host."""
    by_host: dict[str, list[str]] = {}
    for warning in route_warnings(caplog):
        found = _WARNING.search(warning)
        assert found is not None, warning
        by_host.setdefault(found["host"], []).append(found["missing"])
    return by_host


async def whoever_answers(dispatcher: Dispatcher, calls: int = 6) -> set[str]:
    return {await dispatcher.call("fleet", "whoami", {}) for _ in range(calls)}


async def test_each_instance_discovery_finds_is_told_of_the_methods_it_lacks(
    dnsmasq: StartDnsmasq, served: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """At start: before, only the instance the manifest lists was said to lack ``nope``;
    the report of one discovery found was checked against no method at all."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    port = port_free_on(*FOUND_HOSTS, FIXED_HOST)
    for host in (*FOUND_HOSTS, FIXED_HOST):
        await served(host, port)
    dns = dnsmasq(Zone(hosts={"fleet.test": list(FOUND_HOSTS)}, local_ttl=60))
    instances = [
        {"address": f"{FIXED_HOST}:{port}"},
        {"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}},
    ]
    async with Dispatcher(manifest(entry(instances, "whoami", "nope"))) as dispatcher:
        assert said(caplog) == {host: ["nope"] for host in (*FOUND_HOSTS, FIXED_HOST)}
        assert await whoever_answers(dispatcher) == {*FOUND_HOSTS, FIXED_HOST}
