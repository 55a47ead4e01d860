"""gRPC fleets whose instances DNS discovery brings (a real dnsmasq) or the manifest lists:
each instance joins once and has one ``Init``, and a reload that removes the plugin
version calling the fleet detaches every instance the fleet attached, each exactly once,
while the dispatcher keeps running.

The instances are the Python SDK's gRPC server, served in this loop on 127.0.0.2 and .3
(one port for both, as an A record names one port) with ``lifecycle: dispatcher``: each
records its ``Init``/``Start``/``Stop``/``Destroy``. Whether the dispatcher's channel to an
instance is still open is read from the kernel's table of TCP connections, not from the
provider.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher import Dispatcher
from linchkit_plugin.errors import ShuttingDown
from tests.conftest import manifest
from tests.dns_server import (
    Dnsmasq,
    Zone,
    dnsmasq_fixture,  # noqa: F401  (the fixture `dnsmasq`)
    needs_dnsmasq,
)
from tests.recorded_grpc import (
    connections_to,
    served_fixture,  # noqa: F401  (the fixture `served`)
)
from tests.services import port_free_on, until

pytestmark = needs_dnsmasq

StartDnsmasq = Callable[[Zone], Dnsmasq]
V1_HOSTS = ("127.0.0.2", "127.0.0.3")
V2_HOST = "127.0.0.4"
METHODS = {"whoami": {"timeout_ms": 10_000}}


def fleet(version: str, instances: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "fleet",
        "version": version,
        "target": {
            "provider": "grpc",
            "instances": instances,
            # In turn, so a handful of calls reaches every instance: least_request picks
            # at random among idle instances, and six calls all went to one 1 time in 32.
            "balance": "round_robin",
            "lifecycle": "dispatcher",
            "connect_timeout_ms": 10_000,
        },
        "methods": METHODS,
    }


def on_one_address(version: str, address: str) -> dict[str, Any]:
    return {
        "id": "fleet",
        "version": version,
        "target": {
            "provider": "grpc",
            "address": address,
            "lifecycle": "dispatcher",
            "connect_timeout_ms": 10_000,
        },
        "methods": METHODS,
    }


async def test_each_discovered_instance_joins_once_and_has_one_init(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    port = port_free_on(*V1_HOSTS)
    v1 = [await served(host, port) for host in V1_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = {"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}
    async with Dispatcher(manifest(fleet("1.0.0", [source]))) as dispatcher:
        # The first read's reconcile and the watching task's ran side by side: both found
        # the instances absent while the other's Init was under way, and joined them twice.
        (stats,) = dispatcher.stats()["fleets"].values()
        assert sorted(each["target"] for each in stats["instances"]) == [
            f"grpc {each.address}" for each in v1
        ]
        assert [each.plugin.steps for each in v1] == [["init", "start"]] * 2
    assert [each.plugin.steps for each in v1] == [["init", "start", "stop", "destroy"]] * 2


@pytest.mark.parametrize("listed_by", ["dns", "manifest"])
@pytest.mark.parametrize("replaced", [False, True], ids=["removed", "replaced"])
async def test_a_removed_fleet_detaches_each_of_its_instances_once(
    dnsmasq: StartDnsmasq, served: Any, listed_by: str, replaced: bool
) -> None:
    port = port_free_on(*V1_HOSTS)
    v1 = [await served(host, port) for host in V1_HOSTS]
    if listed_by == "dns":
        dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
        instances: list[dict[str, Any]] = [
            {"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}
        ]
    else:
        instances = [{"address": each.address} for each in v1]
    other = None
    async with Dispatcher(manifest(fleet("1.0.0", instances))) as dispatcher:
        hosts = {await dispatcher.call("fleet", "whoami", {}) for _ in range(6)}
        assert hosts == set(V1_HOSTS)
        assert [each.plugin.steps for each in v1] == [["init", "start"]] * 2
        assert all(connections_to(each.address) for each in v1)

        if replaced:
            other = await served(V2_HOST, port_free_on(V2_HOST), "2.0.0")
            summary = await dispatcher.reload(
                manifest(on_one_address("2.0.0", other.address)), grace=10
            )
            assert summary["added"] == ["fleet@2.0.0"]
        else:
            summary = await dispatcher.reload(manifest(), grace=10)
        assert summary["removed"] == ["fleet@1.0.0"]

        await until(
            lambda: all(each.plugin.steps[2:] == ["stop", "destroy"] for each in v1),
            "Stop and Destroy on every instance of the removed version",
            timeout=10,
        )
        await until(
            lambda: not any(connections_to(each.address) for each in v1),
            "the channels to the removed version's instances closed",
            timeout=10,
        )
        assert dispatcher.state == "running"
        if other is not None:
            assert await dispatcher.call("fleet", "whoami", {}) == V2_HOST
    # Closing the dispatcher detaches nothing of the removed version a second time.
    assert [each.plugin.steps for each in v1] == [["init", "start", "stop", "destroy"]] * 2
    if other is not None:
        assert other.plugin.steps == ["init", "start", "stop", "destroy"]


def versioned(version: str, instances: list[dict[str, Any]]) -> dict[str, Any]:
    """The fleet's entry at ``version``, with a config of its own (what Init carries)."""
    return {**fleet(version, instances), "config": {"version": version}}


async def test_a_version_added_to_a_fleet_is_attached_to_the_instances_already_found(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    port = port_free_on(*V1_HOSTS)
    v1 = [await served(host, port) for host in V1_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    async with Dispatcher(manifest(versioned("1.0.0", source))) as dispatcher:
        await dispatcher.reload(
            manifest(versioned("1.0.0", source), versioned("2.0.0", source)), grace=10
        )
        # Before: the instances found before the reload never had version 2's Init.
        assert [each.plugin.configs for each in v1] == [
            [{"version": "1.0.0"}, {"version": "2.0.0"}]
        ] * 2

        # Version 1 leaves: the instances stay, with no Stop, for version 2's calls.
        await dispatcher.reload(manifest(versioned("2.0.0", source)), grace=10)
        assert [each.plugin.steps for each in v1] == [["init", "start"] * 2] * 2
        hosts = {await dispatcher.call("fleet", "whoami", {}) for _ in range(4)}
        assert hosts == set(V1_HOSTS)
    assert [each.plugin.steps[-2:] for each in v1] == [["stop", "destroy"]] * 2
    assert [each.plugin.steps.count("stop") for each in v1] == [1, 1]


async def test_a_version_removed_from_a_fleet_another_keeps_is_detached_from_its_instances(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    port = port_free_on(*V1_HOSTS)
    v1 = [await served(host, port) for host in V1_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    # Version 1 is attached last, so the instances run with its config.
    both = manifest(versioned("2.0.0", source), versioned("1.0.0", source))
    async with Dispatcher(both) as dispatcher:
        assert [each.plugin.configs[-1] for each in v1] == [{"version": "1.0.0"}] * 2
        await dispatcher.reload(manifest(versioned("2.0.0", source)), grace=10)
        # Before: version 1 stayed attached, and the instances kept its config.
        await until(
            lambda: all(each.plugin.configs[-1] == {"version": "2.0.0"} for each in v1),
            "version 2's config on every instance",
            timeout=10,
        )
        assert "stop" not in v1[0].plugin.steps + v1[1].plugin.steps
        assert await dispatcher.call("fleet", "whoami", {}) in V1_HOSTS
    assert [each.plugin.steps.count("stop") for each in v1] == [1, 1]


async def test_an_instance_whose_attach_failed_is_tried_again_while_dns_stays_the_same(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    port = port_free_on(*V1_HOSTS)
    first = await served(V1_HOSTS[0], port)
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = {"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}
    entry = fleet("1.0.0", [source])
    entry["target"]["connect_timeout_ms"] = 300
    async with Dispatcher(manifest(entry)) as dispatcher:
        # .3 is listed but nothing answers there yet: its attach fails, it is left out.
        (stats,) = dispatcher.stats()["fleets"].values()
        assert [each["target"] for each in stats["instances"]] == [f"grpc {first.address}"]
        late = await served(V1_HOSTS[1], port)
        # Before: only a change in the DNS answer brought another pass: never, here.
        await until(
            lambda: late.plugin.steps == ["init", "start"],
            "Init and Start on the instance that came up late",
            timeout=15,
        )
        hosts = {await dispatcher.call("fleet", "whoami", {}) for _ in range(6)}
        assert hosts == set(V1_HOSTS)


async def test_an_instance_that_refuses_an_added_version_leaves_and_joins_once_it_accepts(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    port = port_free_on(*V1_HOSTS)
    good, refusing = [await served(host, port) for host in V1_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    recording = refusing.plugin
    refuse = True

    async def init(config: dict[str, Any]) -> None:
        recording.steps.append("init")
        recording.configs.append(config)
        if refuse and config == {"version": "2.0.0"}:
            raise RuntimeError("not this version")

    recording.init = init  # type: ignore[method-assign]

    def members(dispatcher: Dispatcher) -> list[str]:
        (stats,) = dispatcher.stats()["fleets"].values()
        return sorted(each["target"] for each in stats["instances"])

    async with Dispatcher(manifest(versioned("1.0.0", source))) as dispatcher:
        await dispatcher.reload(
            manifest(versioned("1.0.0", source), versioned("2.0.0", source)), grace=10
        )
        # The reload stands; the instance that cannot serve version 2 left the fleet.
        assert members(dispatcher) == [f"grpc {good.address}"]
        assert {await dispatcher.call("fleet", "whoami", {}) for _ in range(4)} == {V1_HOSTS[0]}
        refuse = False
        await until(
            lambda: len(members(dispatcher)) == 2, "the instance back in the fleet", timeout=15
        )
        assert recording.configs[-2:] == [{"version": "1.0.0"}, {"version": "2.0.0"}]
        assert recording.steps[-4:] == ["init", "start", "init", "start"]


async def test_calls_during_a_reload_to_another_fleet_find_its_instances(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    """Version 2's target differs from version 1's (here its connect timeout), so it is
    another fleet, whose instances discovery must find before calls are routed to it."""
    port = port_free_on(*V1_HOSTS)
    found = [await served(host, port) for host in V1_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    v2 = versioned("2.0.0", source)
    v2["target"]["connect_timeout_ms"] = 9_000
    async with Dispatcher(manifest(versioned("1.0.0", source))) as dispatcher:
        failed: list[str] = []
        reloaded = False

        async def keep_calling() -> None:
            while not reloaded:
                try:
                    await dispatcher.call("fleet", "whoami", {})
                except Exception as error:
                    failed.append(str(error).splitlines()[0])
                await asyncio.sleep(0)

        calling = asyncio.create_task(keep_calling())
        await asyncio.sleep(0.05)
        await dispatcher.reload(manifest(v2), grace=10)
        reloaded = True
        await calling
        # Before: the new fleet was made with the routes and discovered after the swap;
        # calls in between failed '… has no instance: … not read yet'.
        assert failed == []
        assert [each.plugin.configs for each in found] == [
            [{"version": "1.0.0"}, {"version": "2.0.0"}]
        ] * 2
    assert [each.plugin.steps.count("stop") for each in found] == [1, 1]


async def test_a_close_while_a_reload_attaches_a_fleet_ends_the_reload_and_every_channel(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    """The dispatcher closes while a reload attaches version 2 to the instances found
    (their Init takes a second): the reload ends in ShuttingDown, swaps nothing in, and
    leaves no channel open nor instance attached."""
    port = port_free_on(*V1_HOSTS)
    found = [await served(host, port) for host in V1_HOSTS]
    for each in found:
        recording = each.plugin

        async def init(config: dict[str, Any], recording: Any = recording) -> None:
            if config == {"version": "2.0.0"}:
                await asyncio.sleep(1)
            recording.steps.append("init")
            recording.configs.append(config)

        recording.init = init  # type: ignore[method-assign]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    v2 = versioned("2.0.0", source)
    v2["target"]["connect_timeout_ms"] = 9_000
    dispatcher = Dispatcher(manifest(versioned("1.0.0", source)))
    await dispatcher.start()
    reload = asyncio.create_task(
        dispatcher.reload(manifest(versioned("1.0.0", source), v2), grace=10)
    )
    await asyncio.sleep(0.5)
    await dispatcher.aclose()
    # Before: KeyError ('fleet', '1.0.0') from the route build, on the table the close
    # had emptied.
    with pytest.raises(ShuttingDown, match="nothing was reloaded"):
        await reload
    await until(
        lambda: not any(connections_to(each.address) for each in found),
        "every channel closed",
        timeout=10,
    )
    assert [each.plugin.steps[-2:] for each in found] == [["stop", "destroy"]] * 2


async def test_a_reload_cancelled_while_it_attaches_found_instances_changes_nothing(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    """A reload adding version 2 to a fleet is cancelled (its caller gave up) once version
    2 is attached to the first instance found and while the second's ``Init`` runs: the
    reload leaves nothing behind. Before, the first instance kept version 2 attached and
    ran with its config (its last ``Init``) while version 1 alone called it, and
    instances joining later were attached for version 2 too."""
    port = port_free_on(*V1_HOSTS)
    found = [await served(host, port) for host in V1_HOSTS]
    slow = found[1].plugin
    _slow_version_2_init(slow, 5)
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    one = manifest(versioned("1.0.0", source))
    async with Dispatcher(one) as dispatcher:
        reload = asyncio.create_task(
            dispatcher.reload(manifest(versioned("1.0.0", source), versioned("2.0.0", source)))
        )
        await until(lambda: slow.configs[-1] == {"version": "2.0.0"}, "version 2's Init")
        reload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reload
        assert [each.plugin.configs[-1] for each in found] == [{"version": "1.0.0"}] * 2
        assert dispatcher.manifest is one
        hosts = {await dispatcher.call("fleet", "whoami", {}) for _ in range(4)}
        assert hosts == set(V1_HOSTS)
        # A reload to the same manifest changes nothing, and finds nothing to end.
        assert (await dispatcher.reload(one))["kept"] == ["fleet@1.0.0"]
    assert [each.plugin.steps[-2:] for each in found] == [["stop", "destroy"]] * 2
    assert [each.plugin.steps.count("stop") for each in found] == [1, 1]


async def test_a_close_while_a_reload_adds_a_version_to_a_fleet_ends_every_attachment(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    """As above, with the version added to the fleet the running one calls: the close
    comes once version 2 is attached to the first instance found and while the second's
    ``Init`` runs. Every instance ends with ``Stop`` and ``Destroy``, and no channel stays."""
    port = port_free_on(*V1_HOSTS)
    found = [await served(host, port) for host in V1_HOSTS]
    slow = found[1].plugin
    _slow_version_2_init(slow, 1)
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    dispatcher = Dispatcher(manifest(versioned("1.0.0", source)))
    await dispatcher.start()
    reload = asyncio.create_task(
        dispatcher.reload(manifest(versioned("1.0.0", source), versioned("2.0.0", source)))
    )
    await until(lambda: slow.configs[-1] == {"version": "2.0.0"}, "version 2's Init")
    await dispatcher.aclose()
    with pytest.raises(ShuttingDown, match="nothing was reloaded"):
        await reload
    await until(
        lambda: not any(connections_to(each.address) for each in found),
        "every channel closed",
        timeout=10,
    )
    await until(
        lambda: [each.plugin.steps[-2:] for each in found] == [["stop", "destroy"]] * 2,
        "every instance ended",
        timeout=10,
    )
    assert [each.plugin.steps.count("destroy") for each in found] == [1, 1]


async def test_a_reload_that_goes_back_leaves_an_earlier_one_s_retired_version_its_calls(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    """Version 1 calls a fleet found by DNS. A first reload, to version 2 elsewhere, is
    cancelled as it waits for version 1's call in flight: the swap stands, and version 1
    stays attached to the instances until a wait covers its call. A second reload, adding
    another plugin on that fleet, is cancelled as it attaches it, and goes back: it
    detaches what it attached, and only that. Before, going back detached every version
    no longer serving the fleet, version 1 too: its call in flight failed as the channels
    closed under it."""
    port = port_free_on(*V1_HOSTS)
    found = [await served(host, port) for host in V1_HOSTS]
    for each in found:
        recording = each.plugin

        async def init(config: dict[str, Any], recording: Any = recording) -> None:
            recording.steps.append("init")
            recording.configs.append(config)
            if config == {"version": "3.0.0"}:
                await asyncio.sleep(5)

        recording.init = init  # type: ignore[method-assign]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    methods = {**METHODS, "linger": {"timeout_ms": 10_000}}
    v1 = {**versioned("1.0.0", source), "methods": methods}
    added = {**versioned("3.0.0", source), "id": "other", "methods": methods}
    elsewhere = await served(V2_HOST, port_free_on(V2_HOST), "2.0.0")
    v2 = on_one_address("2.0.0", elsewhere.address)
    async with Dispatcher(manifest(v1)) as dispatcher:
        lingering = asyncio.create_task(dispatcher.call("fleet", "linger", {"seconds": 1.5}))
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"], "the call")
        first = asyncio.create_task(dispatcher.reload(manifest(v2), grace=10))
        await until(lambda: elsewhere.plugin.steps == ["init", "start"], "version 2 started")
        await asyncio.sleep(0.05)  # the swap is done: the reload waits for the call
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(dispatcher.reload(manifest(v2, added), grace=10))
        await until(
            lambda: any(each.plugin.configs[-1] == {"version": "3.0.0"} for each in found),
            "the added plugin's Init",
        )
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert await lingering in V1_HOSTS
        assert all("stop" not in each.plugin.steps for each in found)
        # The next reload's wait is over at once: version 1 goes now, and its channels.
        assert (await dispatcher.reload(manifest(v2), grace=10))["kept"] == ["fleet@2.0.0"]
        assert [each.plugin.steps[-2:] for each in found] == [["stop", "destroy"]] * 2
        await until(
            lambda: not any(connections_to(each.address) for each in found),
            "the channels to version 1's instances closed",
        )
    assert [each.plugin.steps.count("destroy") for each in found] == [1, 1]


def _slow_version_2_init(recording: Any, seconds: float) -> None:
    """The instance records each ``Init`` at once and takes ``seconds`` over version 2's."""

    async def init(config: dict[str, Any]) -> None:
        recording.steps.append("init")
        recording.configs.append(config)
        if config == {"version": "2.0.0"}:
            await asyncio.sleep(seconds)

    recording.init = init


async def test_a_remade_fleet_attaches_only_what_its_first_read_still_lists(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    """A reload remakes the fleet (another target) and its new source starts from what
    the running fleet's source listed last (in case it cannot read). An instance that
    left since is not in the new source's first read: it must not be attached for the
    remade fleet at all. Before, the inherited list was attached at once, before the
    first read, and an instance gone got Init and Start, then Stop."""
    port = port_free_on(*V1_HOSTS)
    found = [await served(host, port) for host in V1_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    v2 = versioned("2.0.0", source)
    v2["target"]["connect_timeout_ms"] = 9_000
    async with Dispatcher(manifest(versioned("1.0.0", source))) as dispatcher:
        staying, leaving = found
        dns.set_hosts({"fleet.test": [V1_HOSTS[0]]})  # read again by the new source only
        await dispatcher.reload(manifest(v2), grace=10)
        assert [each["target"] for each in members_of(dispatcher)] == [f"grpc {staying.address}"]
        assert staying.plugin.configs == [{"version": "1.0.0"}, {"version": "2.0.0"}]
        assert leaving.plugin.configs == [{"version": "1.0.0"}]
        assert leaving.plugin.steps == ["init", "start", "stop", "destroy"]


def members_of(dispatcher: Dispatcher) -> list[dict[str, Any]]:
    (stats,) = dispatcher.stats()["fleets"].values()
    return list(stats["instances"])


async def test_a_reload_keeps_the_breakers_of_the_instances_discovery_found(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    """A reload's end drops the breakers of targets nothing calls now: those of the
    instances a fleet's discovery found are called, and keep theirs (state and all)."""
    port = port_free_on(*V1_HOSTS)
    [await served(host, port) for host in V1_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(V1_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    breaker = {"whoami": {"breaker": {"fail_max": 3}}}
    guarded = {**versioned("1.0.0", source), "methods": breaker}

    def other(host: str) -> dict[str, Any]:
        target = {"provider": "http", "url": f"http://{host}:9"}
        return {"id": "other", "version": "1.0.0", "target": target, "methods": breaker}

    async with Dispatcher(manifest(guarded, other("127.0.0.8"))) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        for _ in V1_HOSTS:  # round robin: one call each, which makes its breaker
            await dispatcher.call("fleet", "whoami", {})
        found = {each for each in runtime.targets.breakers.values() if "127.0.0.8" not in each.name}
        assert len(found) == 2
        await dispatcher.reload(manifest(guarded, other("127.0.0.9")), grace=10)
        assert found <= set(runtime.targets.breakers.values())
        assert not any("127.0.0.8" in each.name for each in runtime.targets.breakers.values())
