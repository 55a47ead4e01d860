"""A close, or a reload that removes several plugins, detaches plugins that share nothing
at once: plugins that hang cost about one stop grace together, not one each.

Plugins that share something whose state the order of their detaches decides (entries at
one gRPC address: the service keeps the config of the entry detached last) are still
detached one after another, newest first. The same holds for the instances DNS discovery
brings to a fleet, at a close and when they leave it. Real subprocess plugins that ignore
``Stop`` and SIGTERM (``tests/plugins/crashing_plugin.py``), real SDK gRPC services in this
loop (``tests.recorded_grpc``; a fleet's on 127.0.0.2 and up), a real dnsmasq, and
in-process plugins whose ``stop`` hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher import Dispatcher, ProviderError
from providers.subprocess import SubprocessProvider
from tests.conftest import LOCAL_TARGET, echo_plugin, manifest
from tests.dns_server import (
    Dnsmasq,
    Zone,
    dnsmasq_fixture,  # noqa: F401  (the fixture `dnsmasq`)
    needs_dnsmasq,
)
from tests.recorded_grpc import (
    Instance,
    Serve,
    connections_to,
    served_fixture,  # noqa: F401  (the fixture `served`)
)
from tests.services import free_port, port_free_on, until
from tests.test_reload_grpc import entry
from tests.test_subprocess_provider import alive, crashing

GRACE_S = 1.0
#: Three plugins that hang cost three graces one after another (3 s and more); at once,
#: one grace and what starting the stops costs. Generous for a slow, busy machine.
AT_ONCE_S = 2.5


def hung(plugin_id: str) -> dict[str, Any]:
    """A subprocess plugin whose ``Stop`` outlasts the grace (its stop hook is slower)
    and which ignores SIGTERM and then hangs while exiting: only the SIGKILL at the end
    of ``stop_grace_ms`` ends it."""
    target = {
        "env": {"HANG_ON_EXIT": "1", "STOP_HOOK_MS": "60000"},
        "stop_grace_ms": int(GRACE_S * 1000),
    }
    return {**crashing(**target), "id": plugin_id}


HUNG_IDS = ("hung-0", "hung-1", "hung-2")


async def pids_of(dispatcher: Dispatcher) -> list[int]:
    return [await dispatcher.call(plugin_id, "pid") for plugin_id in HUNG_IDS]


def kill_left(pids: list[int]) -> None:
    """What a failing test left running goes, so the next test does not pay for it."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_closing_with_three_hung_plugins_costs_one_grace_not_three() -> None:
    dispatcher = Dispatcher(manifest(*(hung(plugin_id) for plugin_id in HUNG_IDS)))
    await dispatcher.start()
    pids: list[int] = []
    try:
        pids = await pids_of(dispatcher)
        started = time.monotonic()
        await dispatcher.aclose()
        elapsed = time.monotonic() - started
        # Before: 3.0 s and more, one grace per plugin, one after another.
        assert elapsed < AT_ONCE_S, f"aclose took {elapsed:.2f} s"
        assert not [pid for pid in pids if alive(pid)]
    finally:
        kill_left(pids)


async def test_a_reload_removing_three_hung_plugins_costs_one_grace_not_three() -> None:
    kept = echo_plugin("echo", LOCAL_TARGET)
    dispatcher = Dispatcher(manifest(kept, *(hung(plugin_id) for plugin_id in HUNG_IDS)))
    pids: list[int] = []
    async with dispatcher:
        try:
            pids = await pids_of(dispatcher)
            started = time.monotonic()
            summary = await dispatcher.reload(manifest(kept), grace=5)
            elapsed = time.monotonic() - started
            assert sorted(summary["removed"]) == [f"{each}@1.0.0" for each in HUNG_IDS]
            # Before: 3.0 s and more, the retired plugins detached one after another.
            assert elapsed < AT_ONCE_S, f"the reload took {elapsed:.2f} s"
            assert not [pid for pid in pids if alive(pid)]
        finally:
            kill_left(pids)


async def test_a_reload_undone_after_adding_three_hung_plugins_costs_one_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reload adds three plugins that hang, then one it cannot start (its executable's
    digest differs): it undoes what it attached, the three at once."""
    caplog.set_level(logging.INFO, logger="dispatcher.plugin")
    kept = echo_plugin("echo", LOCAL_TARGET)
    refused = {**crashing(sha256="0" * 64), "id": "refused"}
    pids: list[int] = []
    async with Dispatcher(manifest(kept)) as dispatcher:
        try:
            with pytest.raises(ProviderError, match="SHA-256"):
                await dispatcher.reload(
                    manifest(kept, *(hung(plugin_id) for plugin_id in HUNG_IDS), refused)
                )
            started = [
                record
                for record in caplog.records
                if re.fullmatch(r"crashing plugin \d+ started", record.getMessage())
            ]
            pids = [int(record.getMessage().split()[2]) for record in started]
            assert len(pids) == len(HUNG_IDS)
            # From the last one's start: the refusal, then the detaches. Before: 3.0 s and
            # more, one after another.
            elapsed = time.time() - max(record.created for record in started)
            assert elapsed < AT_ONCE_S, f"undoing the reload took {elapsed:.2f} s"
            assert not [pid for pid in pids if alive(pid)]
        finally:
            kill_left(pids)


async def test_a_cancelled_close_goes_on_and_a_second_close_waits_for_its_end() -> None:
    """The host gives up on ``aclose`` while the three plugins are being stopped: it hears
    the cancel at once, and the close goes on (each stop to its end, its SIGKILL once the
    grace is over). A second ``aclose`` and ``wait_closed`` wait for that end. Before, the
    cancel cut the stop under way (its process, already out of the provider's hands, ran
    on), and then the second ``aclose`` waited for ever: the close it waited for had no
    one left to finish it."""
    dispatcher = Dispatcher(manifest(*(hung(plugin_id) for plugin_id in HUNG_IDS)))
    await dispatcher.start()
    pids: list[int] = []
    try:
        pids = await pids_of(dispatcher)
        provider = dispatcher.providers["subprocess"]
        assert isinstance(provider, SubprocessProvider)
        closing = asyncio.create_task(dispatcher.aclose())
        await until(lambda: not provider._processes, "every stop under way", timeout=10)
        await asyncio.sleep(0.1)  # each has sent its Stop: the grace runs
        started = time.monotonic()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert time.monotonic() - started < GRACE_S / 2  # the caller stopped waiting
        async with asyncio.timeout(AT_ONCE_S):
            await dispatcher.aclose()
            await dispatcher.wait_closed()
        assert not [pid for pid in pids if alive(pid)]
    finally:
        kill_left(pids)


async def test_closing_with_services_at_three_addresses_stops_them_at_once(
    served: Serve,
) -> None:
    """Each service takes a second over its ``Stop``: their detaches share nothing, so
    the close costs about one second. Each still gets ``Stop`` and ``Destroy``, once."""
    services = [await served("127.0.0.1", free_port(), "1.0.0", f"svc-{n}") for n in range(3)]
    entries = [
        entry("1.0.0", each.address, plugin_id=f"svc-{n}") for n, each in enumerate(services)
    ]
    dispatcher = Dispatcher(manifest(*entries))
    await dispatcher.start()
    for each in services:
        each.plugin.stop_takes = GRACE_S
    started = time.monotonic()
    await dispatcher.aclose()
    elapsed = time.monotonic() - started
    # Before: 3.0 s and more, one Stop after another.
    assert elapsed < AT_ONCE_S, f"aclose took {elapsed:.2f} s"
    for each in services:
        assert each.plugin.steps == ["init", "start", "stop", "destroy"]
    addresses = [each.address for each in services]
    await until(lambda: not any(map(connections_to, addresses)), "every channel closed")


def two_at_one_address(address: str) -> list[dict[str, Any]]:
    """Two entries at one address whose targets differ (two channels, one service)."""
    one = {**entry("1.0.0", address, plugin_id="one"), "config": {"who": "one"}}
    two = {
        **entry("1.0.0", address, plugin_id="two", connect_timeout_ms=9_000),
        "config": {"who": "two"},
    }
    return [one, two]


async def test_two_entries_at_one_address_are_detached_newest_first(served: Serve) -> None:
    """``two``, attached last, had the service's last ``Init``: it leaves first and hands
    the service to ``one`` (``Init`` and ``Start`` with its config), which then ends it,
    once. Detached oldest first, ``one`` would leave while ``two``'s config ran, and
    ``two`` end the service with no hand-over."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    dispatcher = Dispatcher(manifest(*two_at_one_address(service.address)))
    await dispatcher.start()
    assert service.plugin.configs == [{"who": "one"}, {"who": "two"}]
    await dispatcher.aclose()
    assert service.plugin.steps == ["init", "start"] * 3 + ["stop", "destroy"]
    assert service.plugin.configs[-1] == {"who": "one"}
    await until(lambda: not connections_to(service.address), "both channels closed")


async def test_a_cancelled_close_still_hands_over_and_ends_the_service(
    served: Serve,
) -> None:
    """The close is cancelled while ``two`` hands the service to ``one`` (its ``Init``
    takes a while): the close goes on, so the hand-over ends (``Start`` follows its
    ``Init``) and ``one`` then ends the service, once. A cancel that cut the hand-over
    after ``Init`` left a service with a config and no ``Start``."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    dispatcher = Dispatcher(manifest(*two_at_one_address(service.address)))
    await dispatcher.start()
    recording = service.plugin
    recording.init_takes = 0.5
    closing = asyncio.create_task(dispatcher.aclose())
    await until(lambda: recording.steps.count("init") == 3, "the hand-over's Init")
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    async with asyncio.timeout(10):
        await dispatcher.wait_closed()
    assert recording.steps == ["init", "start"] * 3 + ["stop", "destroy"]
    assert recording.configs[-1] == {"who": "one"}
    await until(lambda: not connections_to(service.address), "both channels closed")


async def test_closing_with_three_in_process_plugins_slow_to_stop_costs_one_stop_timeout() -> None:
    """Three in-process plugins whose ``stop`` outlasts ``stop_timeout_ms``: each is its
    own instance, so the close stops them at once. Before: the local provider kept the
    one queue of the default, and the close waited for each in turn."""
    slow = [
        {
            "id": f"slow-{n}",
            "version": "1.0.0",
            "lifecycle": {"stop_timeout_ms": int(GRACE_S * 1000)},
            "target": {"provider": "local", "entrypoint": "recording_plugin:SlowToStopPlugin"},
            "methods": {"ping": {}},
        }
        for n in range(3)
    ]
    dispatcher = Dispatcher(manifest(*slow))
    await dispatcher.start()
    assert [await dispatcher.call(each["id"], "ping") for each in slow] == ["pong"] * 3
    started = time.monotonic()
    await dispatcher.aclose()
    elapsed = time.monotonic() - started
    # Before: 3.0 s and more, one stop timeout per plugin.
    assert elapsed < AT_ONCE_S, f"aclose took {elapsed:.2f} s"


# -- fleets: the instances discovery brings --------------------------------------------------

StartDnsmasq = Callable[[Zone], Dnsmasq]
#: Three instances that hang, and one that stays when they leave.
HUNG_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
STAYING_HOST = "127.0.0.5"


def found_by_dns(port: int, server: str) -> dict[str, Any]:
    """A gRPC fleet whose instances DNS lists, each ``Stop`` given ``GRACE_S``."""
    return {
        "id": "fleet",
        "version": "1.0.0",
        "lifecycle": {"stop_timeout_ms": int(GRACE_S * 1000)},
        "target": {
            "provider": "grpc",
            "instances": [
                {"dns": {"name": "fleet.test", "type": "A", "port": port, "server": server}}
            ],
            "lifecycle": "dispatcher",
            "connect_timeout_ms": 10_000,
        },
        "methods": {"whoami": {"timeout_ms": 10_000}},
    }


def members_of(dispatcher: Dispatcher) -> list[str]:
    (fleet,) = dispatcher.stats()["fleets"].values()
    return sorted(each["target"] for each in fleet["instances"])


class Timed:
    """When each instance's ``Stop`` began and its ``Destroy`` came (a ``Stop`` that
    hangs: the dispatcher's ``stop_timeout_ms`` cuts it off)."""

    def __init__(self, instances: list[Instance]) -> None:
        self.stops: list[float] = []
        self.destroys: list[float] = []
        for each in instances:
            self._hang(each.plugin)

    def _hang(self, recording: Any) -> None:
        async def stop() -> None:
            recording.steps.append("stop")
            self.stops.append(time.monotonic())
            await asyncio.sleep(60)

        async def destroy() -> None:
            recording.steps.append("destroy")
            self.destroys.append(time.monotonic())

        recording.stop = stop
        recording.destroy = destroy


@needs_dnsmasq
async def test_closing_with_three_hung_discovered_instances_costs_one_stop_timeout(
    dnsmasq: StartDnsmasq, served: Serve
) -> None:
    """Three instances DNS brought hang on their ``Stop`` until the stop timeout: the
    close ends them at once. Before: one after another, as ``detach_all`` went."""
    port = port_free_on(*HUNG_HOSTS)
    instances = [await served(host, port) for host in HUNG_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(HUNG_HOSTS)}, local_ttl=60))
    dispatcher = Dispatcher(manifest(found_by_dns(port, dns.server)))
    await dispatcher.start()
    assert members_of(dispatcher) == [f"grpc {each.address}" for each in instances]
    timed = Timed(instances)
    started = time.monotonic()
    await dispatcher.aclose()
    elapsed = time.monotonic() - started
    # Before: 3.0 s and more, one stop timeout per instance.
    assert elapsed < AT_ONCE_S, f"aclose took {elapsed:.2f} s"
    assert len(timed.destroys) == len(instances)
    for each in instances:
        assert each.plugin.steps == ["init", "start", "stop", "destroy"]


@needs_dnsmasq
async def test_three_hung_instances_that_leave_together_cost_one_stop_timeout(
    dnsmasq: StartDnsmasq, served: Serve
) -> None:
    """DNS stops listing three instances that hang on their ``Stop``: they leave the
    fleet and are detached at once, while the fleet calls the one it still lists.
    Before: each waited for the one before it to be detached (one at a time, fleet-wide)."""
    port = port_free_on(*HUNG_HOSTS, STAYING_HOST)
    hung = [await served(host, port) for host in HUNG_HOSTS]
    staying = await served(STAYING_HOST, port)
    dns = dnsmasq(Zone(hosts={"fleet.test": [*HUNG_HOSTS, STAYING_HOST]}, local_ttl=1))
    async with Dispatcher(manifest(found_by_dns(port, dns.server))) as dispatcher:
        assert len(members_of(dispatcher)) == 4
        timed = Timed(hung)
        dns.set_hosts({"fleet.test": [STAYING_HOST]})
        await until(lambda: len(timed.destroys) == len(hung), "every Destroy", timeout=30)
        # From the first Stop to the last Destroy. Before: 3.0 s and more.
        elapsed = max(timed.destroys) - min(timed.stops)
        assert elapsed < AT_ONCE_S, f"detaching the three took {elapsed:.2f} s"
        assert members_of(dispatcher) == [f"grpc {staying.address}"]
        assert await dispatcher.call("fleet", "whoami", {}) == STAYING_HOST
    for each in hung:
        assert each.plugin.steps == ["init", "start", "stop", "destroy"]
    assert staying.plugin.steps == ["init", "start", "stop", "destroy"]
