"""Fleets whose instances come from DNS, end to end: a real dnsmasq answering A and SRV
records, real plugin servers on 127.0.0.2/.3/.4, the dispatcher resolving the name again
when the TTL ends and moving calls to whoever the records name.

Waits are generous (a busy 2-core machine); what is asserted is who gets calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dispatcher import Dispatcher
from dispatcher.config import parse_manifest
from linchkit_plugin.errors import DispatchError
from tests.conftest import ROOT, echo_plugin, manifest
from tests.dns_server import (
    Dnsmasq,
    Srv,
    Zone,
    dnsmasq_fixture,  # noqa: F401  (the fixture `dnsmasq`)
    needs_dnsmasq,
)
from tests.services import free_port, port_free_on, until, wait_for
from tests.test_fleet import Instance
from tests.test_plugin_registry import PLUGIN, health

pytestmark = needs_dnsmasq

StartDnsmasq = Callable[[Zone], Dnsmasq]
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@pytest.fixture
def servers(plugins: Any) -> dict[str, str]:
    """The example plugin on 127.0.0.2, .3 and .4, all on one port: host -> base URL."""
    port = free_port(HOSTS[0])
    urls = {host: f"http://{host}:{port}" for host in HOSTS}
    for host in HOSTS:
        plugins([*PLUGIN, "--host", host, "--port", str(port)])
    for url in urls.values():
        wait_for(lambda url=url: _answers(url), what=f"{url} serving")
    return urls


def _answers(url: str) -> bool:
    try:
        return health(url)
    except OSError:
        return False


@pytest.fixture
async def dispatcher_of() -> AsyncIterator[Any]:
    started: list[Dispatcher] = []

    async def start(dns: dict[str, Any], **target: Any) -> Dispatcher:
        dispatcher = Dispatcher(
            manifest(
                echo_plugin(
                    "echo",
                    {"provider": "http", "instances": [{"dns": dns}], **target},
                    methods={"say": {"idempotent": True}, "withdraw": {}},
                )
            )
        )
        await dispatcher.start()
        started.append(dispatcher)
        return dispatcher

    yield start
    for dispatcher in started:
        await dispatcher.aclose()


def calls_by_host(dispatcher: Dispatcher) -> Counter[str]:
    (fleet,) = dispatcher.stats()["fleets"].values()
    return Counter(
        {
            entry["target"].split("//")[1].split(":")[0]: entry["calls"]
            for entry in fleet["instances"]
        }
    )


def hosts_in(dispatcher: Dispatcher) -> set[str]:
    return {host for host in calls_by_host(dispatcher)}


async def test_calls_move_to_the_addresses_a_changed_record_names(
    dnsmasq: StartDnsmasq, servers: dict[str, str], dispatcher_of: Any
) -> None:
    port = int(servers[HOSTS[0]].rpartition(":")[2])
    zone = Zone(hosts={"echo.test": ["127.0.0.2", "127.0.0.3"]}, local_ttl=1)
    dns = dnsmasq(zone)
    dispatcher = await dispatcher_of(
        {
            "name": "echo.test",
            "type": "A",
            "port": port,
            "server": dns.server,
            "min_refresh_ms": 200,
        },
        balance="round_robin",
    )
    assert hosts_in(dispatcher) == {"127.0.0.2", "127.0.0.3"}  # resolved before the first call
    for _ in range(10):
        await dispatcher.call("echo", "withdraw", {"amount": 1})
    assert calls_by_host(dispatcher) == Counter({"127.0.0.2": 5, "127.0.0.3": 5})

    dns.set_hosts({"echo.test": ["127.0.0.3", "127.0.0.4"]})
    await until(lambda: hosts_in(dispatcher) == {"127.0.0.3", "127.0.0.4"}, "the new record")
    for _ in range(10):  # not idempotent: a call to the instance that left would fail
        await dispatcher.call("echo", "withdraw", {"amount": 1})
    assert calls_by_host(dispatcher)["127.0.0.4"] == 5


async def test_srv_records_name_the_ports_and_weights_of_the_instances(
    dnsmasq: StartDnsmasq, plugins: Any, dispatcher_of: Any
) -> None:
    ports = {host: free_port(host) for host in HOSTS[:2]}
    for host, port in ports.items():
        plugins([*PLUGIN, "--host", host, "--port", str(port)])
    for host, port in ports.items():
        wait_for(lambda url=f"http://{host}:{port}": _answers(url), what=f"{host} serving")
    zone = Zone(
        hosts={"a.test": ["127.0.0.2"], "b.test": ["127.0.0.3"]},
        srv=[
            Srv("_echo._tcp.test", "a.test", ports["127.0.0.2"], priority=1, weight=1),
            Srv("_echo._tcp.test", "b.test", ports["127.0.0.3"], priority=1, weight=4),
            # A backup group: never used while the first has instances (RFC 2782).
            Srv("_echo._tcp.test", "a.test", 1, priority=9, weight=1),
        ],
        local_ttl=60,
    )
    dns = dnsmasq(zone)
    dispatcher = await dispatcher_of(
        {"name": "_echo._tcp.test", "type": "SRV", "server": dns.server}, balance="weighted"
    )
    for _ in range(200):
        await dispatcher.call("echo", "say", {"text": "weighted"})
    calls = calls_by_host(dispatcher)
    assert sum(calls.values()) == 200  # the backup record on port 1 never joined
    assert calls["127.0.0.3"] > 2 * calls["127.0.0.2"]  # weight 4 against 1: ~160 / 40


async def test_a_dns_server_that_dies_leaves_the_fleet_calling_its_last_instances(
    dnsmasq: StartDnsmasq, servers: dict[str, str], dispatcher_of: Any
) -> None:
    port = int(servers[HOSTS[0]].rpartition(":")[2])
    dns = dnsmasq(Zone(hosts={"echo.test": ["127.0.0.2"]}, local_ttl=1))
    dispatcher = await dispatcher_of(
        {
            "name": "echo.test",
            "type": "A",
            "port": port,
            "server": dns.server,
            "min_refresh_ms": 200,
            "timeout_ms": 300,
        },
    )
    dns.stop()
    reports = await until(
        lambda: [r for r in dispatcher.stats()["fleets"].values() if r["sources"][0]["error"]],
        "the source's error",
    )
    assert reports
    answer = await dispatcher.call("echo", "say", {"text": "still"})
    assert answer["text"] == "still"
    rows = [report for report in await dispatcher.health() if report.state == "source"]
    assert [row.health.status for row in rows] == ["not_serving"]


async def test_a_dns_outage_is_logged_once_when_it_begins_and_once_when_it_ends(
    dnsmasq: StartDnsmasq, servers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Reads fail every 200 ms while dnsmasq is down: one line says so, one says reads
    work again; /metrics shows the source failing and counts the failed reads."""
    port = int(servers[HOSTS[0]].rpartition(":")[2])
    dns = dnsmasq(Zone(hosts={"echo.test": ["127.0.0.2"]}, local_ttl=1))
    source = {
        "name": "echo.test",
        "type": "A",
        "port": port,
        "server": dns.server,
        "min_refresh_ms": 100,
        "max_refresh_ms": 200,
        "timeout_ms": 300,
    }
    entry = echo_plugin(
        "echo",
        {"provider": "http", "instances": [{"dns": source}]},
        methods={"say": {"idempotent": True}},
    )
    document = {"version": 1, "plugins": [entry], "telemetry": {"metrics": {"enabled": True}}}
    caplog.set_level(logging.INFO, logger="dispatcher.fleet")
    async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
        (fleet,) = dispatcher.stats()["fleets"]
        name = f"dns A echo.test:{port}"

        def source_metrics() -> tuple[float, float]:
            registry = dispatcher.telemetry.metrics.registry  # type: ignore[union-attr]
            labels = {"fleet": fleet, "source": name}
            up = registry.get_sample_value("dispatcher_fleet_source_up", labels)
            failed = registry.get_sample_value("dispatcher_fleet_source_failed_reads_total", labels)
            assert up is not None and failed is not None
            return up, failed

        assert source_metrics() == (1.0, 0.0)
        dns.stop()
        await until(lambda: source_metrics()[1] >= 3, "three failed reads", timeout=60)
        assert source_metrics()[0] == 0.0
        assert (await dispatcher.call("echo", "say", {"text": "still"}))["text"] == "still"
        dns.start()
        await until(lambda: source_metrics()[0] == 1.0, "reads working again", timeout=60)
    about = [r for r in caplog.records if r.name == "dispatcher.fleet.dns"]
    lines = [r.getMessage() for r in about]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"cannot read {name}: echo.test: no answer from {dns.server}")
    assert lines[0].endswith("; keeping the last 1 endpoints")
    assert lines[1].startswith(f"reading {name} again after ")
    assert lines[1].endswith("; 1 instance")
    assert {r.levelname for r in about} == {"WARNING"}


def _breaker_hosts(dispatcher: Dispatcher) -> set[str]:
    """The hosts of the instances whose breakers the dispatcher keeps, local and shared."""
    runtime = dispatcher.policies
    assert runtime is not None
    tables = (runtime.targets.breakers.values(), runtime.targets.shared_breakers.values())
    return {breaker.name.split("//")[1].split(":")[0] for table in tables for breaker in table}


@pytest.mark.parametrize("state", ["memory", "redis"])
async def test_the_breakers_of_instances_dns_stops_naming_go_once_they_are_detached(
    dnsmasq: StartDnsmasq, servers: dict[str, str], request: pytest.FixtureRequest, state: str
) -> None:
    """Each address a record named got a breaker with its first call; once the instance
    that left is detached, its breaker goes (before: every address DNS ever named stayed
    in ``stats()`` until a reload). One that comes back starts with a closed breaker."""
    port = int(servers[HOSTS[0]].rpartition(":")[2])
    dns = dnsmasq(Zone(hosts={"echo.test": [HOSTS[0]]}, local_ttl=1))
    source = {"name": "echo.test", "type": "A", "port": port, "server": dns.server}
    entry = echo_plugin(
        "echo",
        {"provider": "http", "instances": [{"dns": {**source, "min_refresh_ms": 200}}]},
        methods={"say": {"breaker": {"fail_max": 3}}},
    )
    document: dict[str, Any] = {"version": 1, "plugins": [entry]}
    if state == "redis":
        redis = request.getfixturevalue("redis_server")
        prefix = request.getfixturevalue("redis_prefix")
        document["state"] = {"backend": "redis", "url": redis.url, "key_prefix": prefix}
    async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
        for host in HOSTS:
            dns.set_hosts({"echo.test": [host]})
            await until(lambda host=host: hosts_in(dispatcher) == {host}, f"only {host} listed")
            await dispatcher.call("echo", "say", {"text": host})
            await until(lambda host=host: _breaker_hosts(dispatcher) == {host}, f"{host}'s only")
            shown = dispatcher.stats()["breakers"]
            assert len(shown) == 1 and host in next(iter(shown)), shown
            if state == "redis":
                (shared,) = dispatcher.stats()["shared_breakers"]
                assert host in shared


async def test_an_instance_another_fleet_still_lists_keeps_its_breaker(
    dnsmasq: StartDnsmasq, servers: dict[str, str]
) -> None:
    """Two fleets that find one address share that instance's breaker (one per target
    instance): the one fleet's source dropping it leaves the breaker to the other."""
    port = int(servers[HOSTS[0]].rpartition(":")[2])
    both = [HOSTS[0], HOSTS[1]]
    dns = dnsmasq(Zone(hosts={"a.test": both, "b.test": both}, local_ttl=1))

    def entry(plugin_id: str, name: str, balance: str) -> dict[str, Any]:
        source = {"name": name, "type": "A", "port": port, "server": dns.server}
        target = {"provider": "http", "instances": [{"dns": {**source, "min_refresh_ms": 200}}]}
        methods = {"say": {"breaker": {"fail_max": 3}}}
        return echo_plugin(plugin_id, {**target, "balance": balance}, methods=methods)

    fleets = manifest(entry("a", "a.test", "round_robin"), entry("b", "b.test", "least_request"))
    async with Dispatcher(fleets) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        for plugin_id in ("a", "b"):
            for _ in both:
                await dispatcher.call(plugin_id, "say", {"text": "x"})
        assert _breaker_hosts(dispatcher) == set(both)
        kept = set(runtime.targets.breakers.values())
        dns.set_hosts({"a.test": [HOSTS[0]], "b.test": both})
        fleet_a = dispatcher.fleets.get(dispatcher.manifest.plugins[0].target)
        assert fleet_a is not None
        await until(lambda: len(fleet_a.instances) == 1, "a.test naming one address")
        await asyncio.sleep(0.3)  # its detach ends within a poll of 50 ms
        assert set(runtime.targets.breakers.values()) == kept
        dns.set_hosts({"a.test": [HOSTS[0]], "b.test": [HOSTS[0]]})
        await until(lambda: _breaker_hosts(dispatcher) == {HOSTS[0]}, "b.test naming one")


async def test_the_breaker_series_of_an_instance_dns_stops_naming_leave_metrics(
    dnsmasq: StartDnsmasq,
) -> None:
    """An instance whose circuit opened has its transitions counted in /metrics; once
    it is no longer listed and detached, its series go (before: every address that ever
    opened a circuit stayed, a series per move, for the process's life)."""
    good, failing = Instance(HOSTS[0]), Instance(HOSTS[1], status=503)
    port = port_free_on(good.host, failing.host)
    servers = [await asyncio.start_server(each.handle, each.host, port) for each in (good, failing)]
    try:
        dns = dnsmasq(Zone(hosts={"f.test": [good.host, failing.host]}, local_ttl=1))
        source = {"name": "f.test", "type": "A", "port": port, "server": dns.server}
        target = {"provider": "http", "instances": [{"dns": {**source, "min_refresh_ms": 200}}]}
        entry = {
            "id": "f",
            "version": "1.0.0",
            "target": {**target, "balance": "round_robin"},
            "methods": {"ping": {"breaker": {"fail_max": 2}}},
        }
        document = {"version": 1, "plugins": [entry], "telemetry": {"metrics": {"enabled": True}}}
        async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
            assert dispatcher.telemetry is not None and dispatcher.telemetry.metrics is not None
            registry = dispatcher.telemetry.metrics.registry

            def moves(host: str) -> dict[tuple[str, str], float]:
                return {
                    (sample.labels["from_state"], sample.labels["to_state"]): sample.value
                    for family in registry.collect()
                    if family.name == "dispatcher_breaker_transitions"
                    for sample in family.samples
                    if sample.name.endswith("_total") and host in sample.labels["target"]
                }

            for _ in range(6):
                with contextlib.suppress(DispatchError):
                    await dispatcher.call("f", "ping", {})
            assert moves(failing.host) == {("closed", "open"): 1.0}
            dns.set_hosts({"f.test": [good.host]})
            await until(lambda: not moves(failing.host), "the failing instance's series gone")
            assert (await dispatcher.call("f", "ping", {})) == good.host
    finally:
        for server in servers:
            server.close()
        for each in (good, failing):
            for task in list(each.connections):
                task.cancel()
            await asyncio.gather(*each.connections, return_exceptions=True)
        for server in servers:
            await server.wait_closed()
