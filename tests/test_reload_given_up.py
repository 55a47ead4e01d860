"""A reload given up while it waits for the calls in flight at its swap, then another.

A reload that removes a version swaps its routes, then waits for the calls in flight
(``grace``) before it detaches what the new manifest no longer uses. A caller that gives
up during that wait leaves the swap standing and the removed version still attached,
for a later reload to detach once its own wait covers those calls. What that later
reload must do with them, when it:

- goes back (the previous manifest again, the removed version added back where it is
  still attached): take that attachment back, neither attaching it a second time (a
  second ``Init`` and ``Start`` of a running service) nor detaching it afterwards as
  retired, which ended the version the manifest now routes to: before, every call to it
  failed ``TargetUnavailable`` ("is not attached") after a ``Stop`` and ``Destroy``;
- goes back with another config for it: refuse, as for a running version, naming it;
- is the same reload again: detach the removed version from the instances discovery
  found, even when nothing else is left to detach. Before, it stayed attached until the
  fleet ended, and the service kept running with its config.
- whatever it is: drop the removed version's policy state (caches and their entries,
  limits, bulkheads, retry counters, keyed-call records; its batcher ends), unless it
  brings that version back. Before, the next reload dropped only what its own plan
  removed: the rest stayed for the life of the process, listed by ``stats()``.
- whatever it is: close the batcher the given-up reload replaced (a version whose
  batching it changed), once the batch in it has ended.

The services are the Python SDK's gRPC server recording its lifecycle
(``tests.recorded_grpc``), with ``lifecycle: dispatcher``, found by a real dnsmasq or
listed in the manifest; the policy state is that of the example plugin, in-process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher import Dispatcher, ManifestError
from dispatcher.policies import PolicyRuntime
from tests.conftest import LOCAL_TARGET, echo_plugin, manifest
from tests.dns_server import (
    Dnsmasq,
    Zone,
    dnsmasq_fixture,  # noqa: F401  (the fixture `dnsmasq`)
    needs_dnsmasq,
)
from tests.recorded_grpc import served_fixture  # noqa: F401  (the fixture `served`)
from tests.services import port_free_on, until
from tests.test_reload_fleet import METHODS, on_one_address, versioned

StartDnsmasq = Callable[[Zone], Dnsmasq]
FOUND_HOSTS = ("127.0.0.2", "127.0.0.3")
ELSEWHERE = "127.0.0.4"
LINGERING = {**METHODS, "linger": {"timeout_ms": 10_000}}


async def _give_up_while_it_waits(
    dispatcher: Dispatcher, to: Any, started: Any
) -> asyncio.Task[Any]:
    """Reload ``dispatcher`` to ``to`` while a call of the running version lingers, and
    give that reload up once its routes swapped (``started()``: the new version is up):
    the lingering call, still in flight."""
    lingering = asyncio.create_task(dispatcher.call("fleet", "linger", {"seconds": 1.5}))
    await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"], "the call")
    reload = asyncio.create_task(dispatcher.reload(to, grace=10))
    await until(started, "the new version started")
    await asyncio.sleep(0.05)  # the swap is done: the reload waits for the call
    reload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reload
    return lingering


async def test_going_back_takes_the_version_still_attached_back(served: Any) -> None:
    there = await served("127.0.0.2", port_free_on("127.0.0.2"))
    elsewhere = await served(ELSEWHERE, port_free_on(ELSEWHERE), "2.0.0")
    one = {
        **on_one_address("1.0.0", there.address),
        "methods": LINGERING,
        "config": {"version": "1.0.0"},
    }
    async with Dispatcher(manifest(one)) as dispatcher:
        lingering = await _give_up_while_it_waits(
            dispatcher,
            manifest(on_one_address("2.0.0", elsewhere.address)),
            lambda: elsewhere.plugin.steps == ["init", "start"],
        )
        summary = await dispatcher.reload(manifest(one), grace=10)
        assert summary["added"] == ["fleet@1.0.0"]
        assert await lingering == "127.0.0.2"
        # Before: "grpc 127.0.0.2:… is not attached", the service stopped under it.
        assert await dispatcher.call("fleet", "whoami", {}) == "127.0.0.2"
        assert there.plugin.steps == ["init", "start"]  # attached once, never ended
        assert elsewhere.plugin.steps == ["init", "start", "stop", "destroy"]
    assert there.plugin.steps == ["init", "start", "stop", "destroy"]


async def test_going_back_with_another_config_is_refused_naming_it(served: Any) -> None:
    there = await served("127.0.0.2", port_free_on("127.0.0.2"))
    elsewhere = await served(ELSEWHERE, port_free_on(ELSEWHERE), "2.0.0")
    one = {
        **on_one_address("1.0.0", there.address),
        "methods": LINGERING,
        "config": {"version": "1.0.0"},
    }
    two = manifest(on_one_address("2.0.0", elsewhere.address))
    async with Dispatcher(manifest(one)) as dispatcher:
        lingering = await _give_up_while_it_waits(
            dispatcher, two, lambda: elsewhere.plugin.steps == ["init", "start"]
        )
        with pytest.raises(ManifestError, match=r"plugins\[0\]\.config: fleet@1\.0\.0 is still"):
            await dispatcher.reload(manifest({**one, "config": {"version": "other"}}), grace=10)
        assert dispatcher.manifest is two  # nothing changed
        assert await lingering == "127.0.0.2"
        # Once its calls have ended and a reload detached it, it may come back changed.
        assert (await dispatcher.reload(two, grace=10))["kept"] == ["fleet@2.0.0"]
        assert there.plugin.steps == ["init", "start", "stop", "destroy"]
        changed = manifest({**one, "config": {"version": "other"}})
        assert (await dispatcher.reload(changed, grace=10))["added"] == ["fleet@1.0.0"]
        assert there.plugin.configs[-1] == {"version": "other"}
        assert await dispatcher.call("fleet", "whoami", {}) == "127.0.0.2"


@needs_dnsmasq
async def test_going_back_keeps_each_found_instance_attached_once(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    port = port_free_on(*FOUND_HOSTS)
    found = [await served(host, port) for host in FOUND_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(FOUND_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    one = manifest({**versioned("1.0.0", source), "methods": LINGERING})
    elsewhere = await served(ELSEWHERE, port_free_on(ELSEWHERE), "2.0.0")
    async with Dispatcher(one) as dispatcher:
        lingering = await _give_up_while_it_waits(
            dispatcher,
            manifest(on_one_address("2.0.0", elsewhere.address)),
            lambda: elsewhere.plugin.steps == ["init", "start"],
        )
        assert (await dispatcher.reload(one, grace=10))["added"] == ["fleet@1.0.0"]
        assert await lingering in FOUND_HOSTS
        # Before: a second Init and Start of each running service.
        assert [each.plugin.steps for each in found] == [["init", "start"]] * 2
        hosts = {await dispatcher.call("fleet", "whoami", {}) for _ in range(4)}
        assert hosts == set(FOUND_HOSTS)
    assert [each.plugin.steps for each in found] == [["init", "start", "stop", "destroy"]] * 2


@needs_dnsmasq
async def test_the_same_reload_again_detaches_what_the_given_up_one_left(
    dnsmasq: StartDnsmasq, served: Any
) -> None:
    # Version 1, attached last, gives each service its config; a reload removing it
    # (version 2 stays on the fleet) is given up as it waits for a call of version 1.
    port = port_free_on(*FOUND_HOSTS)
    found = [await served(host, port) for host in FOUND_HOSTS]
    dns = dnsmasq(Zone(hosts={"fleet.test": list(FOUND_HOSTS)}, local_ttl=60))
    source = [{"dns": {"name": "fleet.test", "type": "A", "port": port, "server": dns.server}}]
    one = {**versioned("1.0.0", source), "methods": LINGERING}
    two = manifest(versioned("2.0.0", source))
    async with Dispatcher(manifest(versioned("2.0.0", source), one)) as dispatcher:
        assert [each.plugin.configs[-1] for each in found] == [{"version": "1.0.0"}] * 2
        lingering = asyncio.create_task(
            dispatcher.call("fleet", "linger", {"seconds": 1.0}, version="1.0.0")
        )
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"], "the call")
        reload = asyncio.create_task(dispatcher.reload(two, grace=10))
        await asyncio.sleep(0.3)  # swapped (nothing to attach): it waits for the call
        reload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reload
        assert await lingering in FOUND_HOSTS
        assert (await dispatcher.reload(two, grace=10))["kept"] == ["fleet@2.0.0"]
        # Version 1 detached: each service handed over to version 2, with its config.
        # Before: version 1 stayed attached, and its config ran, until the fleet ended.
        assert [each.plugin.configs[-1] for each in found] == [{"version": "2.0.0"}] * 2
        assert all("stop" not in each.plugin.steps for each in found)
        assert await dispatcher.call("fleet", "whoami", {}) in FOUND_HOSTS


#: The example plugin's methods, each with policy state of its own.
WITH_STATE = {
    "say": {"pure": True, "cache": {"ttl_ms": 60_000}},
    "withdraw": {
        "rate_limit": {"rate": 1000, "burst": 10, "scope": "method"},
        "concurrency": {"max_in_flight": 4, "scope": "method"},
    },
    "digest": {"idempotent": True, "retry": {"attempts": 2}},
    "sleep": {"batch": {"max_size": 1}, "timeout_ms": 30_000},
}


def echo_at(version: str) -> Any:
    return manifest({**echo_plugin("echo", LOCAL_TARGET, methods=WITH_STATE), "version": version})


def versions_with_state(runtime: PolicyRuntime) -> set[str]:
    """The plugin versions (keys) that own some of ``runtime``'s method state."""
    owners = [
        *runtime.caches,
        *runtime.batchers,
        *runtime.gates,
        *runtime.method_limits,
        *runtime.method_bulkheads,
    ]
    names = [*runtime.retries, *runtime.keyed, *runtime.hedges]
    return {key for key, _ in owners} | {name.rpartition(".")[0] for name in names}


async def _given_up_after_its_swap(dispatcher: Dispatcher, to: Any) -> asyncio.Task[Any]:
    """Reload ``dispatcher`` to ``to`` while a call of echo's running version sleeps, and
    give that reload up once its routes swapped: the sleeping call, still in flight."""
    sleeping = asyncio.create_task(dispatcher.call("echo", "sleep", {"seconds": 1.0}))
    await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"], "the call")
    reload = asyncio.create_task(dispatcher.reload(to, grace=30))
    await until(lambda: dispatcher.manifest is to, "the swap")
    reload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reload
    return sleeping


async def test_the_next_reload_drops_the_policy_state_of_the_version_given_up_on() -> None:
    one, two = echo_at("1.0.0"), echo_at("2.0.0")
    async with Dispatcher(one) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        await dispatcher.call("echo", "say", {"text": "cached"})
        sleeping = await _given_up_after_its_swap(dispatcher, two)
        batcher = runtime.batchers[("echo@1.0.0", "sleep")]
        assert await sleeping >= 1.0
        assert (await dispatcher.reload(two, grace=30))["kept"] == ["echo@2.0.0"]
        # Before: every piece of echo@1.0.0's state stayed, its cache entry with it.
        assert versions_with_state(runtime) == {"echo@2.0.0"}
        stats = dispatcher.stats()
        assert list(stats["caches"]) == ["echo@2.0.0.say"]
        assert list(stats["retries"]) == ["echo@2.0.0.digest"]
        assert list(stats["idempotency"]) == [f"echo@2.0.0.{method}" for method in WITH_STATE]
        assert len(stats["rate_limits"]) == len(stats["bulkheads"]) == 1
        assert batcher._closed  # its batch task would end with it
        assert await dispatcher.call("echo", "sleep", {"seconds": 0}) >= 0


async def test_a_version_the_next_reload_brings_back_keeps_the_state_it_runs_with() -> None:
    one, two = echo_at("1.0.0"), echo_at("2.0.0")
    async with Dispatcher(one) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        sleeping = await _given_up_after_its_swap(dispatcher, two)
        assert (await dispatcher.reload(one, grace=30))["added"] == ["echo@1.0.0"]
        assert await sleeping >= 1.0
        # Its routes were built anew, with new state: dropping it as the version the
        # given-up reload removed would empty its cache and close its batcher under it.
        assert versions_with_state(runtime) == {"echo@1.0.0"}
        assert list(dispatcher.stats()["caches"]) == ["echo@1.0.0.say"]
        await dispatcher.call("echo", "say", {"text": "again"})
        await dispatcher.call("echo", "say", {"text": "again"})
        assert dispatcher.stats()["caches"]["echo@1.0.0.say"]["hits"] == 1
        assert await dispatcher.call("echo", "sleep", {"seconds": 0}) >= 0
        # Removed by a reload that goes to its end, it is dropped then.
        await dispatcher.reload(two, grace=30)
        assert versions_with_state(runtime) == {"echo@2.0.0"}


async def test_a_close_after_a_reload_given_up_ends_the_removed_version_s_batcher() -> None:
    before = set(asyncio.all_tasks())
    async with Dispatcher(echo_at("1.0.0")) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        sleeping = await _given_up_after_its_swap(dispatcher, echo_at("2.0.0"))
        batcher = runtime.batchers[("echo@1.0.0", "sleep")]
    assert batcher._closed
    await asyncio.gather(sleeping, return_exceptions=True)
    assert not {task for task in asyncio.all_tasks() - before if not task.done()}


def batching(size: int, *others: dict[str, Any]) -> Any:
    """echo@1.0.0 whose ``sleep`` sends batches of ``size``, and ``others``."""
    methods = {**WITH_STATE, "sleep": {"batch": {"max_size": size}, "timeout_ms": 30_000}}
    return manifest(echo_plugin("echo", LOCAL_TARGET, methods=methods), *others)


@pytest.mark.parametrize("then", ["nothing", "another plugin", "batching again", "back"])
async def test_the_next_reload_closes_the_batcher_a_given_up_one_replaced(then: str) -> None:
    """A reload changes echo's batching (a new batcher) and is given up while a batched
    call runs: the batcher it replaced stays open with that call in it. The next reload,
    whatever it changes (nothing, another plugin, that batching again, back to the first
    manifest), waits for the call and closes that batcher. ``ReloadSteps`` carries the
    version it changed to that reload, which is what brings it to its end."""
    first, changed = batching(1), batching(2)
    after = {
        "nothing": changed,
        "another plugin": batching(2, echo_plugin("other", LOCAL_TARGET)),
        "batching again": batching(3),
        "back": first,
    }[then]
    async with Dispatcher(first) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        replaced = runtime.batchers[("echo@1.0.0", "sleep")]
        sleeping = await _given_up_after_its_swap(dispatcher, changed)
        assert runtime.batchers[("echo@1.0.0", "sleep")] is not replaced
        assert not replaced._closed  # the given-up reload left it, with the call in it
        await dispatcher.reload(after, grace=30)
        assert sleeping.done() and sleeping.result() > 0.5  # waited for, ended well
        assert replaced._closed
        assert not runtime.replaced_versions()
        assert await dispatcher.call("echo", "sleep", {"seconds": 0}) >= 0
