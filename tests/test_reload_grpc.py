"""A reload that puts a new version of a gRPC plugin on the address the old version
served: one service at one address, whatever the manifest calls it.

The service is the Python SDK's gRPC server in this loop (``tests.recorded_grpc``), with
``lifecycle: dispatcher``: it records each ``Init`` (and its config), ``Start``, ``Stop``
and ``Destroy``. The new version must be called on the service the old one leaves
running: the old version's detach sends no ``Stop`` or ``Destroy`` while another entry
still uses the service, and closes no connection another entry calls through. The last
entry to leave ends the lifecycle, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from dispatcher import Dispatcher, DispatchError
from linchkit_plugin.errors import ProviderError
from providers.grpc import GrpcProvider
from tests.conftest import manifest
from tests.recorded_grpc import (
    Serve,
    connections_to,
    served_fixture,  # noqa: F401  (the fixture `served`)
)
from tests.services import free_port, until

METHODS = {
    "whoami": {"timeout_ms": 10_000},
    "shout": {"timeout_ms": 10_000},
    "linger": {"timeout_ms": 10_000},
}


def entry(version: str, address: str, *, plugin_id: str = "svc", **target: Any) -> dict[str, Any]:
    return {
        "id": plugin_id,
        "version": version,
        "config": {"version": version},
        "target": {
            "provider": "grpc",
            "address": address,
            "lifecycle": "dispatcher",
            "connect_timeout_ms": 10_000,
            **target,
        },
        "methods": METHODS,
    }


@pytest.mark.parametrize(
    "v2_target",
    [{}, {"connect_timeout_ms": 9_000}],
    ids=["same-target", "another-target-same-address"],
)
async def test_a_new_version_on_the_old_version_s_address_keeps_its_service(
    served: Serve, v2_target: dict[str, Any]
) -> None:
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    heard: list[tuple[str, str, Any]] = []
    async with Dispatcher(manifest(entry("1.0.0", service.address))) as dispatcher:
        dispatcher.on_event(
            lambda plugin, version, event, data: heard.append((version, event, data))
        )
        assert await dispatcher.call("svc", "whoami", {}) == "127.0.0.1"

        summary = await dispatcher.reload(
            manifest(entry("2.0.0", service.address, **v2_target)), grace=10
        )
        assert (summary["added"], summary["removed"]) == (["svc@2.0.0"], ["svc@1.0.0"])

        # Before: the old version's detach stopped and destroyed the service, and closed
        # the connection the new version shared: "… is not attached".
        assert await dispatcher.call("svc", "whoami", {}) == "127.0.0.1"
        assert service.plugin.steps == ["init", "start", "init", "start"]
        assert service.plugin.configs[-1] == {"version": "2.0.0"}
        await until(lambda: connections_to(service.address) == 1, "the old channel closed")

        # What the service emits now is the new version's.
        await dispatcher.call("svc", "shout", {})
        await until(lambda: heard, "the event")
        assert heard == [("2.0.0", "shouted", "127.0.0.1")]
    assert service.plugin.steps == ["init", "start", "init", "start", "stop", "destroy"]
    await until(lambda: not connections_to(service.address), "every channel closed")


async def test_removing_one_of_two_plugins_served_at_one_address_leaves_the_other(
    served: Serve,
) -> None:
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    one = entry("1.0.0", service.address, plugin_id="one")
    two = entry("1.0.0", service.address, plugin_id="two")
    one["config"], two["config"] = {"who": "one"}, {"who": "two"}
    async with Dispatcher(manifest(one, two)) as dispatcher:
        assert service.plugin.configs == [{"who": "one"}, {"who": "two"}]
        # "two" had the service's last Init: "one", which stays, gets its config back.
        await dispatcher.reload(manifest(one))
        assert await dispatcher.call("one", "whoami", {}) == "127.0.0.1"
        assert service.plugin.steps == ["init", "start"] * 3
        assert service.plugin.configs[-1] == {"who": "one"}
    assert service.plugin.steps[-2:] == ["stop", "destroy"]
    assert service.plugin.steps.count("stop") == 1


async def test_the_config_handed_back_comes_after_the_removed_one_s_calls_under_the_kept_one_s(
    served: Serve,
) -> None:
    """What a plugin sees when a reload removes the entry that had its last ``Init`` and
    keeps another at its address, each with a call in flight: the kept entry's ``Init``
    and ``Start`` come once the removed entry's call has ended (the reload waits for it),
    and while the kept entry's call still runs (nothing waits for it: calls to it keep
    coming anyway). That call ends well. docs/protocol.md, "Init while calls run"."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    one = {**entry("1.0.0", service.address, plugin_id="one"), "config": {"who": "one"}}
    two = {**entry("1.0.0", service.address, plugin_id="two"), "config": {"who": "two"}}
    recording = service.plugin
    async with Dispatcher(manifest(one, two)) as dispatcher:
        kept = asyncio.create_task(dispatcher.call("one", "linger", {"seconds": 1.5}))
        await until(lambda: "linger 1.5 begins" in recording.timeline, "the kept entry's call")
        removed = asyncio.create_task(dispatcher.call("two", "linger", {"seconds": 0.5}))
        await until(lambda: "linger 0.5 begins" in recording.timeline, "the removed one's call")
        await dispatcher.reload(manifest(one), grace=10)
        assert await removed == await kept == "127.0.0.1"
    assert recording.timeline == [
        "init {'who': 'one'}",
        "start",
        "init {'who': 'two'}",
        "start",
        "linger 1.5 begins",
        "linger 0.5 begins",
        "linger 0.5 ends",
        "init {'who': 'one'}",
        "start",
        "linger 1.5 ends",
        "stop",
        "destroy",
    ]


async def test_an_entry_leaving_a_service_run_with_an_equal_config_sends_it_nothing(
    served: Serve,
) -> None:
    """The kept entry's config is the one the service runs already: no ``Init`` again."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    one = entry("1.0.0", service.address, plugin_id="one")
    two = entry("1.0.0", service.address, plugin_id="two")
    async with Dispatcher(manifest(one, two)) as dispatcher:
        kept = asyncio.create_task(dispatcher.call("one", "linger", {"seconds": 1.0}))
        await until(lambda: "linger 1.0 begins" in service.plugin.timeline, "the call")
        await dispatcher.reload(manifest(one), grace=10)
        assert await kept == "127.0.0.1"
        assert service.plugin.steps == ["init", "start"] * 2


async def test_a_reload_that_changes_only_a_timeout_returns_while_the_call_runs(
    served: Serve,
) -> None:
    """A version whose entry changed in a method's timeout alone keeps its target: the
    reload's end detaches nothing, so it does not wait for the call in flight (before, it
    waited the call out), and the plugin sees nothing of it: no ``Init`` again, the call
    ends well."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    first = entry("1.0.0", service.address)
    longer = {**first, "methods": {**METHODS, "linger": {"timeout_ms": 20_000}}}
    async with Dispatcher(manifest(first)) as dispatcher:
        lingering = asyncio.create_task(dispatcher.call("svc", "linger", {"seconds": 3.0}))
        await until(lambda: "linger 3.0 begins" in service.plugin.timeline, "the call")
        started = time.monotonic()
        summary = await dispatcher.reload(manifest(longer), grace=10)
        took = time.monotonic() - started
        assert summary["changed"] == ["svc@1.0.0"]
        assert took < 1.5, f"the reload waited {took:.1f} s for a call it ends nothing of"
        assert not lingering.done()
        assert await lingering == "127.0.0.1"
        assert service.plugin.timeline == [
            "init {'version': '1.0.0'}",
            "start",
            "linger 3.0 begins",
            "linger 3.0 ends",
        ]
        assert connections_to(service.address) == 1


@pytest.mark.parametrize("failing_step", ["init", "start"])
async def test_a_new_version_that_fails_to_start_leaves_the_old_one_serving(
    served: Serve, failing_step: str
) -> None:
    """The new version's ``Init`` ran on the service the old one calls, then it (or its
    ``Start``) failed: the service gets the old version's config back, and no ``Destroy``."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    failing = entry("2.0.0", service.address)
    failing["config"] = {"fail": failing_step}
    recording = service.plugin

    async def init(config: dict[str, Any]) -> None:
        recording.steps.append("init")
        recording.configs.append(config)
        if config.get("fail") == "init":
            raise RuntimeError("refused")

    async def start() -> None:
        recording.steps.append("start")
        if recording.configs[-1].get("fail") == "start":
            raise RuntimeError("refused")

    recording.init = init  # type: ignore[method-assign]
    recording.start = start  # type: ignore[method-assign]
    async with Dispatcher(manifest(entry("1.0.0", service.address))) as dispatcher:
        with pytest.raises(ProviderError, match=failing_step.capitalize()):
            await dispatcher.reload(manifest(failing), grace=10)
        # Before: a failed Start sent Destroy to the service version 1 still called.
        assert "destroy" not in recording.steps
        assert recording.steps[-2:] == ["init", "start"]
        assert recording.configs[-1] == {"version": "1.0.0"}
        assert await dispatcher.call("svc", "whoami", {}) == "127.0.0.1"
        assert connections_to(service.address) == 1
    assert recording.steps[-2:] == ["stop", "destroy"]


@pytest.mark.parametrize("same_address", [False, True], ids=["another-address", "same-address"])
async def test_a_close_while_a_reload_waits_for_calls_ends_the_removed_version_s_service(
    served: Serve, same_address: bool
) -> None:
    """The reload has retired version 1 and waits for its call in flight when the
    dispatcher closes: version 1's service still gets its ``Stop`` and ``Destroy``, and a
    service both used is not handed back to version 1's config on its way out."""
    old = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    new = old if same_address else await served("127.0.0.1", free_port(), "2.0.0", "svc")
    dispatcher = Dispatcher(manifest(entry("1.0.0", old.address)))
    await dispatcher.start()
    call = asyncio.create_task(dispatcher.call("svc", "linger", {"seconds": 2}))
    await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"], "the call in flight")
    reload = asyncio.create_task(dispatcher.reload(manifest(entry("2.0.0", new.address)), grace=10))
    await until(lambda: new.plugin.configs[-1:] == [{"version": "2.0.0"}], "version 2's Init")
    await asyncio.sleep(0.1)  # the reload waits for the call to version 1
    assert not reload.done()
    await dispatcher.aclose()
    await asyncio.gather(call, reload, return_exceptions=True)
    # Before: version 1, out of the ledger while the reload waited, was never detached:
    # its service had no Stop nor Destroy; at one address it got version 1's Init back.
    if same_address:
        assert old.plugin.steps == ["init", "start", "init", "start", "stop", "destroy"]
        assert old.plugin.configs[-1] == {"version": "2.0.0"}
    else:
        assert old.plugin.steps == ["init", "start", "stop", "destroy"]
        assert new.plugin.steps == ["init", "start", "stop", "destroy"]
    await until(lambda: not connections_to(old.address), "every channel closed")


async def test_a_service_restarted_before_a_reload_runs_with_the_new_version_s_config(
    served: Serve,
) -> None:
    """The service at version 1's address restarts; before the dispatcher has run Init
    and Start there again, a reload puts version 2 there. Both sequences reach the new
    process: the last Init it has must be version 2's, whose calls it serves."""
    first = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    host, _, port = first.address.rpartition(":")
    async with Dispatcher(manifest(entry("1.0.0", first.address))) as dispatcher:
        assert await dispatcher.call("svc", "whoami", {}) == "127.0.0.1"
        await first.end()
        restarted = await served(host, int(port), "1.0.0", "svc")
        recording = restarted.plugin

        async def init(config: dict[str, Any]) -> None:
            # An Init that takes a while, as real ones do: the restart's, with version
            # 1's config, is still running when version 2's arrives.
            if config == {"version": "1.0.0"}:
                await asyncio.sleep(0.3)
            recording.steps.append("init")
            recording.configs.append(config)

        recording.init = init  # type: ignore[method-assign]
        await dispatcher.reload(manifest(entry("2.0.0", first.address)), grace=10)
        assert await dispatcher.call("svc", "whoami", {}) == "127.0.0.1"
        # Before: the restart's Init was read as version 1's before version 2's Init
        # and sent after it: the service ran with the config of a version gone.
        assert restarted.plugin.configs[-1] == {"version": "2.0.0"}
        assert "stop" not in restarted.plugin.steps
    assert restarted.plugin.steps[-2:] == ["stop", "destroy"]


async def test_a_detach_waiting_its_turn_when_the_provider_closes_ends_quietly(
    served: Serve,
) -> None:
    """Version 1 leaves while version 2's ``Init`` holds the service's turn, and the
    provider closes meanwhile (the dispatcher closing under a reload): the detach, once
    its turn comes, finds no connection to send ``Stop`` over. Before, it raised
    ``KeyError`` (the connection's key), untyped; so could the failed start's restore."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    provider = GrpcProvider()
    second = manifest(entry("2.0.0", service.address)).plugins[0]
    async with Dispatcher(
        manifest(entry("1.0.0", service.address)), providers={"grpc": provider}
    ) as d:
        first = d.manifest.plugins[0]
        service.plugin.init_takes = 0.5
        attaching = asyncio.create_task(provider.attach(second, second.target))
        await until(lambda: service.plugin.steps.count("init") == 2, "version 2's Init under way")
        detaching = asyncio.create_task(provider.detach(first, first.target))
        await asyncio.sleep(0.05)  # the detach waits for the attach's turn
        await provider.aclose()
        outcomes = await asyncio.gather(attaching, detaching, return_exceptions=True)
    for outcome in outcomes:
        assert outcome is None or isinstance(outcome, DispatchError), repr(outcome)


def _refusing(recording: Any) -> None:
    """Make the service's ``Init`` fail for a config that asks it to."""

    async def init(config: dict[str, Any]) -> None:
        recording.steps.append("init")
        recording.configs.append(config)
        await asyncio.sleep(recording.init_takes)
        if config.get("fail"):
            raise RuntimeError("refused")

    recording.init = init


async def test_a_failed_attach_leaves_no_record_of_its_address(served: Serve) -> None:
    """An attach whose service refused its ``Init`` leaves nothing behind: a fleet whose
    instances come and go at new addresses, each failing, must not grow the provider."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    _refusing(service.plugin)
    failing = manifest({**entry("1.0.0", service.address), "config": {"fail": True}})
    plugin = failing.plugins[0]
    provider = GrpcProvider()
    try:
        with pytest.raises(ProviderError, match="Init"):
            await provider.attach(plugin, plugin.target)
        # Before: the address's record of who uses the service stayed, empty.
        assert not provider._services
        assert not provider._users and not provider._connections
    finally:
        await provider.aclose()


async def test_an_attach_waiting_on_a_failing_one_keeps_its_address_record(
    served: Serve,
) -> None:
    """Two plugins attach to one service at once and the first one's ``Init`` fails: the
    second, which waited its turn, is still recorded at the address, so its detach ends
    the service's lifecycle (``Stop``, ``Destroy``) and leaves no record either."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    _refusing(service.plugin)
    service.plugin.init_takes = 0.2
    bad = {**entry("1.0.0", service.address, plugin_id="bad"), "config": {"fail": True}}
    good = entry("1.0.0", service.address, plugin_id="good")
    failing, working = manifest(bad, good).plugins
    provider = GrpcProvider()
    try:
        outcomes = await asyncio.gather(
            provider.attach(failing, failing.target),
            provider.attach(working, working.target),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], ProviderError) and outcomes[1] is None, outcomes
        await provider.detach(working, working.target)
        assert service.plugin.steps[-2:] == ["stop", "destroy"]
        assert not provider._services
    finally:
        await provider.aclose()


async def test_an_attach_during_the_last_detach_starts_after_its_end(served: Serve) -> None:
    """The last plugin at an address leaves (its ``Stop`` is slow) as another attaches
    there: the newcomer's ``Init`` and ``Start`` come after the leaver's ``Stop`` and
    ``Destroy``, so the service is not destroyed under it. Before, the newcomer made a
    record of its own with its own turn, and its start ran between the two."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    recording = service.plugin
    recording.stop_takes = 0.3
    one, two = manifest(
        entry("1.0.0", service.address, plugin_id="one"),
        entry("1.0.0", service.address, plugin_id="two"),
    ).plugins
    provider = GrpcProvider()
    try:
        await provider.attach(one, one.target)
        leaving = asyncio.create_task(provider.detach(one, one.target))
        await until(lambda: recording.steps[-1] == "stop", "one's Stop under way")
        await provider.attach(two, two.target)
        await leaving
        assert recording.steps == ["init", "start", "stop", "destroy", "init", "start"]
        await provider.detach(two, two.target)
        assert recording.steps[-2:] == ["stop", "destroy"]
        assert not provider._services and not provider._connections
    finally:
        await provider.aclose()


async def test_what_a_reload_cancelled_after_its_swap_retired_goes_at_the_next_reload(
    served: Serve,
) -> None:
    """A reload from version 1 on one address to version 2 on another waits for version
    1's call in flight, and its caller gives up meanwhile: the swap stands, and version 1,
    retired but not detached, is detached by the next reload (which changes nothing) once
    its own calls in flight have ended. Before, it stayed started until the close."""
    old = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    new = await served("127.0.0.1", free_port(), "2.0.0", "svc")
    async with Dispatcher(manifest(entry("1.0.0", old.address))) as dispatcher:
        lingering = asyncio.create_task(dispatcher.call("svc", "linger", {"seconds": 0.5}))
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"], "the call")
        reload = asyncio.create_task(
            dispatcher.reload(manifest(entry("2.0.0", new.address)), grace=10)
        )
        await until(lambda: new.plugin.steps == ["init", "start"], "version 2 started")
        await asyncio.sleep(0.05)  # the swap is done: the reload waits for the call
        reload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reload
        assert await lingering == "127.0.0.1"
        assert await dispatcher.call("svc", "whoami", {}) == "127.0.0.1"
        assert old.plugin.steps == ["init", "start"]  # retired, not detached yet
        assert (await dispatcher.reload(manifest(entry("2.0.0", new.address))))["kept"]
        assert old.plugin.steps == ["init", "start", "stop", "destroy"]
        assert new.plugin.steps == ["init", "start"]


async def test_two_entries_over_one_channel_detached_at_once_end_their_service(
    served: Serve,
) -> None:
    """Two plugins with equal targets (one channel) leave at once; the first to take its
    turn hands the service to the other's config. The second then ends the service over
    the channel. Before, the first closed the channel as it left (no plugin was left on
    it), and the second found nothing to send ``Stop`` over: no ``Stop``, no ``Destroy``."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    one, two = manifest(
        {**entry("1.0.0", service.address, plugin_id="one"), "config": {"who": "one"}},
        {**entry("1.0.0", service.address, plugin_id="two"), "config": {"who": "two"}},
    ).plugins
    provider = GrpcProvider()
    try:
        await provider.attach(one, one.target)
        await provider.attach(two, two.target)
        await asyncio.gather(provider.detach(two, two.target), provider.detach(one, one.target))
        assert service.plugin.steps == ["init", "start"] * 3 + ["stop", "destroy"]
        assert not provider._services and not provider._users and not provider._connections
        await until(lambda: not connections_to(service.address), "the channel closed")
    finally:
        await provider.aclose()


async def test_a_close_while_a_new_version_fails_to_start_on_the_channel_ends_the_service(
    served: Serve,
) -> None:
    """A reload puts version 2 on version 1's target (one channel) and its ``Init`` fails;
    the dispatcher closes while that ``Init`` runs, so version 1's detach waits its turn.
    Version 1 still sends ``Stop`` and ``Destroy``. Before, the failed attach closed the
    channel (no plugin was on it any more) and version 1's detach had none to send on."""
    service = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    _refusing(service.plugin)
    dispatcher = Dispatcher(manifest(entry("1.0.0", service.address)))
    await dispatcher.start()
    service.plugin.init_takes = 0.3
    failing = {**entry("2.0.0", service.address), "config": {"fail": True}}
    reload = asyncio.create_task(dispatcher.reload(manifest(failing), grace=10))
    await until(lambda: service.plugin.steps.count("init") == 2, "version 2's Init under way")
    await dispatcher.aclose()
    with pytest.raises(ProviderError, match="Init"):
        await reload
    assert service.plugin.steps == ["init", "start", "init", "stop", "destroy"]
    await until(lambda: not connections_to(service.address), "the channel closed")


async def test_a_reload_cancelled_while_it_detaches_what_it_retired_ends_it_still(
    served: Serve,
) -> None:
    """The reload's caller gives up while version 1, which it retired, is being stopped:
    the cancel waits for the detach to end, so version 1's service gets its ``Destroy``
    and its channel closes. Before, the detach was cut after ``Stop``, out of the list of
    what is to be detached, and nothing ended it: no ``Destroy``, even at the close, and
    a channel open until then."""
    old = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    new = await served("127.0.0.1", free_port(), "2.0.0", "svc")
    recording = old.plugin
    recording.stop_takes = 0.3
    async with Dispatcher(manifest(entry("1.0.0", old.address))) as dispatcher:
        reload = asyncio.create_task(
            dispatcher.reload(manifest(entry("2.0.0", new.address)), grace=10)
        )
        await until(lambda: recording.steps[-1:] == ["stop"], "version 1's Stop under way")
        reload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reload
        assert recording.steps == ["init", "start", "stop", "destroy"]
        await until(lambda: not connections_to(old.address), "version 1's channel closed")
        assert await dispatcher.call("svc", "whoami", {}) == "127.0.0.1"
    assert recording.steps == ["init", "start", "stop", "destroy"]
    assert new.plugin.steps == ["init", "start", "stop", "destroy"]


async def test_a_close_while_a_reload_detaches_what_it_retired_lets_that_detach_end(
    served: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """The dispatcher closes while the reload stops version 1, which it retired: the close
    lets that detach end before it closes the provider, so version 1's service gets its
    ``Destroy`` and nothing fails. Before, the close found nothing left to detach (the
    reload had taken version 1 off the list) and closed the provider under the detach:
    its ``Destroy`` went on a closed channel."""
    old = await served("127.0.0.1", free_port(), "1.0.0", "svc")
    new = await served("127.0.0.1", free_port(), "2.0.0", "svc")
    recording = old.plugin
    recording.stop_takes = 0.3
    dispatcher = Dispatcher(manifest(entry("1.0.0", old.address)))
    await dispatcher.start()
    reload = asyncio.create_task(dispatcher.reload(manifest(entry("2.0.0", new.address)), grace=10))
    await until(lambda: recording.steps[-1:] == ["stop"], "version 1's Stop under way")
    await dispatcher.aclose()
    await reload
    assert recording.steps == ["init", "start", "stop", "destroy"]
    assert new.plugin.steps == ["init", "start", "stop", "destroy"]
    failed = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert not failed, [record.getMessage() for record in failed]
    await until(lambda: not connections_to(old.address), "version 1's channel closed")


async def test_a_close_while_a_reload_detaches_two_it_retired_lets_both_detaches_end(
    served: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """As above with two retired entries: the close waits for the detach under way, and
    the reload, woken first by its end, starts the next one. That one too must end before
    the provider closes: its service gets its ``Destroy``, and nothing fails."""
    services = {
        plugin_id: (
            await served("127.0.0.1", free_port(), "1.0.0", plugin_id),
            await served("127.0.0.1", free_port(), "2.0.0", plugin_id),
        )
        for plugin_id in ("one", "two")
    }
    for old, _ in services.values():
        old.plugin.stop_takes = 0.3
    dispatcher = Dispatcher(
        manifest(
            *(entry("1.0.0", old.address, plugin_id=key) for key, (old, _) in services.items())
        )
    )
    await dispatcher.start()
    changed = manifest(
        *(entry("2.0.0", new.address, plugin_id=key) for key, (_, new) in services.items())
    )
    reload = asyncio.create_task(dispatcher.reload(changed, grace=10))
    olds = [old.plugin for old, _ in services.values()]
    await until(lambda: any(each.steps[-1:] == ["stop"] for each in olds), "a Stop under way")
    await dispatcher.aclose()
    await reload
    for old, new in services.values():
        assert old.plugin.steps == ["init", "start", "stop", "destroy"]
        assert new.plugin.steps == ["init", "start", "stop", "destroy"]
    failed = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert not failed, [record.getMessage() for record in failed]
