"""A reload that changes what a running version serves (its methods) and keeps its fleet:
each instance of the fleet takes the new entry (``Provider.update``: nothing reconnects,
nothing restarts), those discovery found as well as those the manifest lists, and those
that join later are attached with it.

The fleet is real: the Python SDK's gRPC server (``tests.recorded_grpc``) on 127.0.0.2
and .3 found by a real dnsmasq (or registered in a real etcd), on 127.0.0.4 listed in the
manifest, all on one port, with ``lifecycle: dispatcher``. What an instance holds of the entry is what the dispatcher
checks the plugin's ``Describe`` against: the manifest routes ``nope``, which the plugin
lacks, and each reload below adds ``other``, which it lacks too, so each instance's
warning says which entry its provider record holds (``dispatcher._served``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher import Dispatcher
from providers.target import PluginInfo, TargetConfig
from tests.conftest import manifest, route_warnings
from tests.dns_server import (
    Dnsmasq,
    Zone,
    dnsmasq_fixture,  # noqa: F401  (the fixture `dnsmasq`)
    needs_dnsmasq,
)
from tests.recorded_grpc import served_fixture  # noqa: F401  (the fixture `served`)
from tests.services import Etcd, port_free_on, until

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


def update_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [each for each in caplog.records if each.getMessage().startswith("reload: updating")]


def members(dispatcher: Dispatcher) -> list[str]:
    (stats,) = dispatcher.stats()["fleets"].values()
    return sorted(each["target"] for each in stats["instances"])


def fail_update_on(dispatcher: Dispatcher, address: str) -> None:
    """Make the gRPC provider's ``update`` raise for the instance at ``address``, as a bug
    or a lost record would: no real provider's fails on cue."""
    provider = dispatcher.providers["grpc"]
    real_update = provider.update

    def update(plugin: PluginInfo, target: TargetConfig) -> None:
        if target.describe() == f"grpc {address}":
            raise RuntimeError("the record of this instance is gone")
        real_update(plugin, target)

    provider.update = update  # type: ignore[method-assign]


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


@pytest.mark.parametrize("source", ["dns", "registry"])
async def test_a_reload_that_changes_the_methods_reaches_every_instance_of_the_fleet(
    dnsmasq: StartDnsmasq,
    served: Any,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
    source: str,
) -> None:
    """The reload adds ``other``: each instance is said to lack it, those discovery found
    (by DNS, or in an etcd registry) as well as the one listed, and none is attached
    again. Before, only the listed one took the new entry: the found ones kept the old,
    and were checked against it. An instance found after the reload is attached with the
    new entry."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    port = port_free_on(*ALL_HOSTS)
    servers = {host: await served(host, port) for host in ALL_HOSTS}
    if source == "dns":
        dns = dnsmasq(Zone(hosts={"fleet.test": list(FOUND_HOSTS)}, local_ttl=1))
        found: dict[str, Any] = {
            "dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}
        }

        def list_late() -> None:
            dns.set_hosts({"fleet.test": [*FOUND_HOSTS, LATE_HOST]})
    else:
        etcd: Etcd = request.getfixturevalue("etcd")
        prefix: str = request.getfixturevalue("etcd_prefix")
        for host in FOUND_HOSTS:
            etcd.put(f"{prefix}/{host}", json.dumps({"address": f"{host}:{port}"}))
        found = {"registry": {"etcd": etcd.url, "prefix": prefix, "retry_ms": 100}}

        def list_late() -> None:
            etcd.put(f"{prefix}/{LATE_HOST}", json.dumps({"address": f"{LATE_HOST}:{port}"}))

    instances = [{"address": f"{FIXED_HOST}:{port}"}, found]
    async with Dispatcher(manifest(entry(instances, "whoami", "nope"))) as dispatcher:
        summary = await dispatcher.reload(
            manifest(entry(instances, "whoami", "nope", "other")), grace=1
        )
        assert summary["changed"] == ["fleet@1.0.0"]
        running = (*FOUND_HOSTS, FIXED_HOST)
        assert said(caplog) == {host: ["nope", "nope, other"] for host in running}
        assert update_failures(caplog) == []
        # Updated in place: no Stop, no second Init.
        assert [servers[host].plugin.steps for host in running] == [["init", "start"]] * 3
        assert await whoever_answers(dispatcher) == set(running)

        list_late()
        await until(lambda: LATE_HOST in said(caplog), "the late instance checked", timeout=15)
        assert said(caplog)[LATE_HOST] == ["nope, other"]


@pytest.mark.parametrize("taken", [True, False], ids=["taken", "refused"])
async def test_an_instance_attaching_as_the_routes_swap_takes_the_new_entry(
    dnsmasq: StartDnsmasq, served: Any, caplog: pytest.LogCaptureFixture, taken: bool
) -> None:
    """DNS lists a second instance, whose ``Init`` takes two seconds; the reload swaps
    its routes meanwhile, when the instance is not yet attached for the reload's update
    to find it. As its attach ends, it takes the entry serving then. Before, it kept the
    entry it was attached with for as long as it stayed in the fleet. One whose provider
    fails to take it (``refused``) is logged as a reload's update is, detached, and
    attached again by the next pass, with the new entry."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    port = port_free_on(*FOUND_HOSTS)
    first, late = [await served(host, port) for host in FOUND_HOSTS]
    late.plugin.init_takes = 2.0
    dns = dnsmasq(Zone(hosts={"fleet.test": [FOUND_HOSTS[0]]}, local_ttl=1))
    instances = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    async with Dispatcher(manifest(entry(instances, "whoami", "nope"))) as dispatcher:
        if not taken:
            fail_update_on(dispatcher, late.address)
        dns.set_hosts({"fleet.test": list(FOUND_HOSTS)})
        await until(lambda: late.plugin.steps == ["init"], "the late instance's Init", timeout=15)
        await dispatcher.reload(manifest(entry(instances, "whoami", "nope", "other")), grace=1)
        again = [] if taken else ["stop", "destroy", "init", "start"]
        steps = ["init", "start", *again]
        await until(lambda: late.plugin.steps == steps, "the late instance attached", timeout=15)
        await until(lambda: len(members(dispatcher)) == 2, "the late instance in", timeout=15)
        assert said(caplog) == {host: ["nope", "nope, other"] for host in FOUND_HOSTS}
        assert first.plugin.steps == ["init", "start"]
        assert [each.getMessage() for each in update_failures(caplog)] == (
            [] if taken else [f"reload: updating fleet@1.0.0 on grpc {late.address} failed"]
        )
        assert await whoever_answers(dispatcher, 4) == set(FOUND_HOSTS)


@pytest.mark.parametrize("failing", [FOUND_HOSTS[1], FIXED_HOST], ids=["found", "listed"])
async def test_an_instance_that_fails_to_take_the_new_entry_is_logged_and_the_rest_take_it(
    dnsmasq: StartDnsmasq, served: Any, caplog: pytest.LogCaptureFixture, failing: str
) -> None:
    """The gRPC provider's ``update`` fails for one instance (``fail_update_on``). The
    reload stands; the failure is logged alike for an instance found
    and one listed (its name, its traceback); every other instance takes the entry. One
    DNS found leaves the fleet and joins again, attached with the new entry; one the
    manifest lists cannot, and keeps what it had."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    running = (*FOUND_HOSTS, FIXED_HOST)
    port = port_free_on(*running)
    servers = {host: await served(host, port) for host in running}
    dns = dnsmasq(Zone(hosts={"fleet.test": list(FOUND_HOSTS)}, local_ttl=60))
    instances = [
        {"address": f"{FIXED_HOST}:{port}"},
        {"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}},
    ]
    async with Dispatcher(manifest(entry(instances, "whoami", "nope"))) as dispatcher:
        fail_update_on(dispatcher, f"{failing}:{port}")
        summary = await dispatcher.reload(
            manifest(entry(instances, "whoami", "nope", "other")), grace=1
        )
        assert summary["changed"] == ["fleet@1.0.0"]
        (failure,) = update_failures(caplog)
        assert (
            failure.getMessage() == f"reload: updating fleet@1.0.0 on grpc {failing}:{port} failed"
        )
        assert (failure.name, failure.levelname) == ("dispatcher", "ERROR")
        assert failure.exc_info is not None
        others = [host for host in running if host != failing]
        assert {host: said(caplog)[host] for host in others} == {
            host: ["nope", "nope, other"] for host in others
        }
        steps = servers[failing].plugin.steps
        leaves = [
            each.getMessage() for each in caplog.records if "leaves the fleet" in each.getMessage()
        ]
        if failing == FIXED_HOST:
            assert said(caplog)[failing] == ["nope"]
            assert steps == ["init", "start"]
            assert leaves == []
        else:
            assert leaves == [
                f"fleet@1.0.0 on grpc {failing}:{port}: the instance leaves the fleet, and joins"
                " again with the new entry"
            ]
            again = ["init", "start", "stop", "destroy", "init", "start"]
            await until(lambda: steps == again, "the instance gone and back", timeout=15)
            await until(lambda: len(members(dispatcher)) == 3, "the instance back", timeout=15)
            assert said(caplog)[failing] == ["nope", "nope, other"]
        assert await whoever_answers(dispatcher) == set(running)
        assert len(update_failures(caplog)) == 1


async def test_a_changed_version_keeps_its_place_for_the_instances_that_join_later(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    """Two versions share one fleet, and so one service on each instance, which runs
    with the config of the last ``Init`` it had: each instance is attached for 1.0.0,
    then 2.0.0, as the manifest lists them, and runs with 2.0.0's config. A reload changes
    1.0.0's config; an instance found after it is attached in the same order, and runs
    with 2.0.0's config as the others do. Before, the reload put the changed version last
    (no longer served, then served again): the late instance ran with 1.0.0's."""
    port = port_free_on(*FOUND_HOSTS)
    first, late = [await served(host, port) for host in FOUND_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": [FOUND_HOSTS[0]]}, local_ttl=1))
    instances = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]

    def versions(*first_methods: str) -> Any:
        first = {**entry(instances, *first_methods), "config": {"entry": "one"}}
        second = {**entry(instances, "whoami"), "version": "2.0.0", "config": {"entry": "two"}}
        return manifest(first, second)

    async with Dispatcher(versions("whoami")) as dispatcher:
        assert first.plugin.configs == [{"entry": "one"}, {"entry": "two"}]
        summary = await dispatcher.reload(versions("whoami", "linger"), grace=1)
        assert summary["changed"] == ["fleet@1.0.0"]
        dns.set_hosts({"fleet.test": list(FOUND_HOSTS)})
        await until(lambda: len(members(dispatcher)) == 2, "the late instance in", timeout=15)
        assert late.plugin.configs == first.plugin.configs
