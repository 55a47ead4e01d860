"""Fleets whose instances come from an etcd registry, end to end: real plugin processes
registering themselves (``dispatcher-plugin serve --register-etcd``), a real etcd, the
dispatcher watching the prefix and balancing calls over whoever is registered.

Waits are generous (a busy 2-core machine); what is asserted is who gets calls and what
the reports say, never how fast.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import pytest

from dispatcher import Dispatcher
from dispatcher.config import Manifest, parse_manifest
from dispatcher.fleet.sources import MAX_ENDPOINTS
from linchkit_plugin.errors import TargetUnavailable
from tests.conftest import ROOT, echo_plugin, manifest
from tests.fault_proxy import FaultProxy
from tests.services import Etcd, Plugin, free_port, until
from tests.test_etcd_source import put_many
from tests.test_plugin_registry import OTHER_SDKS, PLUGIN, PYTHON_GRPC_EXAMPLE, example

#: How late the dispatcher of the graceful-stop tests learns that a plugin left.
LATE = 0.3


def registry_manifest(
    etcd: Etcd, prefix: str, *, via: str | None = None, **target: Any
) -> Manifest[Any]:
    """A fleet of echo plugins found under ``prefix``, reading etcd ``via`` a proxy or not."""
    return manifest(registry_plugin(etcd, prefix, via=via, **target))


def registry_plugin(
    etcd: Etcd, prefix: str, *, via: str | None = None, **target: Any
) -> dict[str, Any]:
    registry = {"etcd": via or etcd.url, "prefix": prefix, "retry_ms": 100}
    return echo_plugin(
        "echo",
        {
            "provider": "http",
            "instances": [{"registry": registry}],
            "balance": "round_robin",
            **target,
        },
        methods={"say": {"idempotent": True}, "withdraw": {"idempotent": False}},
    )


def register(plugins: Any, etcd: Etcd, prefix: str, host: str) -> tuple[Any, str]:
    port = free_port(host)
    plugin = plugins(
        [*PLUGIN, "--host", host, "--port", str(port)],
        LINCHKIT_REGISTER_ETCD=etcd.url,
        LINCHKIT_REGISTER_PREFIX=prefix,
    )
    return plugin, f"http://{host}:{port}/invoke"


def members(dispatcher: Dispatcher) -> dict[str, dict[str, Any]]:
    """The fleet's instances now, by description."""
    (fleet,) = dispatcher.stats()["fleets"].values()
    return {entry["target"]: entry for entry in fleet["instances"]}


async def failures_while_one_leaves(
    dispatcher: Dispatcher, call: Callable[[], Awaitable[Any]], leaving: Plugin
) -> list[BaseException]:
    """Eight callers ``call`` on and on; after 200 calls, SIGTERM to ``leaving``; once it
    left the fleet and 200 more calls went, the callers stop. The errors they met."""
    stop = asyncio.Event()
    failures: list[BaseException] = []
    done = 0

    async def caller() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                await call()
                done += 1
            except Exception as error:
                failures.append(error)

    callers = [asyncio.create_task(caller()) for _ in range(8)]
    await until(lambda: done > 200, "calls to both")
    await asyncio.to_thread(leaving.signal, signal.SIGTERM)
    await until(lambda: len(members(dispatcher)) == 1, "the first left")
    settled = done
    await until(lambda: done > settled + 200, "calls after it left")
    stop.set()
    await asyncio.gather(*callers)
    return failures


@pytest.fixture
async def late_etcd(etcd: Etcd) -> AsyncIterator[str]:
    """etcd's URL through a proxy holding every chunk ``LATE`` seconds: a dispatcher that
    learns of a plugin leaving that much after it left (a busy network, a slow etcd)."""
    proxy = FaultProxy("127.0.0.1", etcd.client_port)
    port = await proxy.start()
    proxy.delay = LATE
    yield f"http://127.0.0.1:{port}"
    await proxy.aclose()


@pytest.fixture
async def started() -> AsyncIterator[Any]:
    dispatchers: list[Dispatcher] = []

    async def start(manifest: Manifest[Any]) -> Dispatcher:
        dispatcher = Dispatcher(manifest)
        await dispatcher.start()
        dispatchers.append(dispatcher)
        return dispatcher

    yield start
    for dispatcher in dispatchers:
        await dispatcher.aclose()


async def test_calls_follow_plugins_as_they_register_and_leave(
    etcd: Etcd, etcd_prefix: str, plugins: Any, started: Any
) -> None:
    first, first_url = register(plugins, etcd, etcd_prefix, "127.0.0.2")
    await until(lambda: etcd.keys(etcd_prefix), "the first plugin registered")
    dispatcher = await started(registry_manifest(etcd, etcd_prefix))
    assert set(members(dispatcher)) == {f"http {first_url}"}  # there before the first call
    assert (await dispatcher.call("echo", "say", {"text": "hi"}))["text"] == "hi"

    _, second_url = register(plugins, etcd, etcd_prefix, "127.0.0.3")
    await until(lambda: len(members(dispatcher)) == 2, "the second plugin joined")
    for _ in range(20):
        await dispatcher.call("echo", "withdraw", {"amount": 1})
    calls = {target: entry["calls"] for target, entry in members(dispatcher).items()}
    assert calls[f"http {second_url}"] >= 9  # round robin: about half of the 20
    assert all(entry["source"].startswith("etcd ") for entry in members(dispatcher).values())

    await asyncio.to_thread(first.signal, signal.SIGTERM)
    await until(lambda: set(members(dispatcher)) == {f"http {second_url}"}, "the first left")
    results = [await dispatcher.call("echo", "withdraw", {"amount": 1}) for _ in range(10)]
    assert len(results) == 10  # a non-idempotent method: none went to the plugin that left


async def test_a_registry_that_goes_down_keeps_the_fleet_calling_and_health_says_why(
    own_etcd: Etcd, etcd_prefix: str, plugins: Any, started: Any
) -> None:
    register(plugins, own_etcd, etcd_prefix, "127.0.0.2")
    await until(lambda: own_etcd.keys(etcd_prefix), "the plugin registered")
    dispatcher = await started(registry_manifest(own_etcd, etcd_prefix))
    own_etcd.stop()

    async def source_row() -> Any:
        reports = await dispatcher.health()
        return next(report for report in reports if report.state == "source")

    failing = await until(
        lambda: dispatcher.stats()["fleets"] and _source_error(dispatcher), "the source failed"
    )
    assert "etcd" in failing or "connect" in failing.lower()
    row = await source_row()
    assert row.health.status == "not_serving"
    assert "keeping the 1 instances it listed" in row.health.detail
    still = await dispatcher.call("echo", "say", {"text": "still here"})
    assert still["text"] == "still here"

    own_etcd.start()
    await until(lambda: _source_error(dispatcher) is None, "the source read again")
    assert (await source_row()).health.status == "serving"


def _source_error(dispatcher: Dispatcher) -> str | None:
    (fleet,) = dispatcher.stats()["fleets"].values()
    (source,) = fleet["sources"]
    error: str | None = source["error"]
    return error


async def test_a_fleet_nobody_registered_in_fails_calls_with_a_typed_error(
    etcd: Etcd, etcd_prefix: str, started: Any
) -> None:
    """... and says so in /metrics: /readyz stays ready (every replica reads the same
    registry; failing readiness would take them all out at once), so the alert is on
    ``dispatcher_fleet_instances{state="healthy"} == 0``, a series that exists at 0."""
    document = {
        "version": 1,
        "plugins": [registry_plugin(etcd, etcd_prefix)],
        "telemetry": {"metrics": {"enabled": True}},
    }
    dispatcher = await started(parse_manifest(document, base_dir=ROOT))
    with pytest.raises(TargetUnavailable, match=r"has no instance: etcd .* listed none"):
        await dispatcher.call("echo", "say", {"text": "anyone?"}, timeout=2)
    registry = dispatcher.telemetry.metrics.registry
    (fleet,) = dispatcher.stats()["fleets"]
    counts = {
        state: registry.get_sample_value(
            "dispatcher_fleet_instances", {"fleet": fleet, "state": state}
        )
        for state in ("healthy", "ejected", "down", "leaving")
    }
    assert counts == {"healthy": 0.0, "ejected": 0.0, "down": 0.0, "leaving": 0.0}


async def test_a_registration_the_egress_policy_forbids_never_joins(
    etcd: Etcd, etcd_prefix: str, plugins: Any, started: Any
) -> None:
    _, url = register(plugins, etcd, etcd_prefix, "127.0.0.2")
    await until(lambda: etcd.keys(etcd_prefix), "the plugin registered")
    # A lying registration: the cloud metadata address, which egress refuses by default.
    etcd.put(f"{etcd_prefix}/metadata", json.dumps({"url": "http://169.254.169.254:80"}))
    dispatcher = await started(registry_manifest(etcd, etcd_prefix))
    assert set(members(dispatcher)) == {f"http {url}"}
    for _ in range(5):
        await dispatcher.call("echo", "say", {"text": "safe"})


async def test_a_registration_that_flaps_costs_the_loop_what_changed_not_the_whole_list(
    etcd: Etcd, etcd_prefix: str, started: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Each report made the fleet validate every listed endpoint again (a target and its
    egress check, about 45 µs each): with 1,000 registrations, one key put 300 times
    in a row kept the dispatcher's loop busy for seconds (half its turns came over a
    second late), and a refused registration was logged again at every put."""
    caplog.set_level(logging.WARNING, "dispatcher.fleet")
    await asyncio.to_thread(put_many, etcd, etcd_prefix, range(MAX_ENDPOINTS - 2))
    etcd.put(f"{etcd_prefix}/metadata", json.dumps({"url": "http://169.254.169.254:80"}))
    dispatcher = await started(registry_manifest(etcd, etcd_prefix))
    await until(lambda: len(members(dispatcher)) == MAX_ENDPOINTS - 2, "the registrations")

    def flap() -> None:
        for n in range(300):
            etcd.put(f"{etcd_prefix}/zz", json.dumps({"url": f"http://10.1.0.{n % 200 + 1}:8080"}))

    lags: list[float] = []
    flapping = asyncio.create_task(asyncio.to_thread(flap))
    loop = asyncio.get_running_loop()
    while not flapping.done():
        before = loop.time()
        await asyncio.sleep(0.01)
        lags.append(loop.time() - before - 0.01)
    await flapping
    await until(lambda: "http http://10.1.0.100:8080/invoke" in members(dispatcher), "the last put")
    assert len(members(dispatcher)) == MAX_ENDPOINTS - 1
    lags.sort()
    assert lags[len(lags) // 2] < 0.1, f"the loop's median lag was {lags[len(lags) // 2]:.3f} s"
    refused = [r for r in caplog.records if "169.254.169.254" in r.getMessage()]
    assert len(refused) == 1, len(refused)


async def test_a_plugin_stopped_gracefully_loses_no_call_of_a_busy_fleet(
    etcd: Etcd, etcd_prefix: str, late_etcd: str, plugins: Any, started: Any
) -> None:
    """SIGTERM to one of two registered plugins while calls run: it leaves the registry
    first and keeps answering ``--leave-delay`` (1 s) while the dispatcher, which learns
    of it ``LATE``, stops picking it; none fails, not even of a method that may not be
    retried."""
    leaving, _ = register(plugins, etcd, etcd_prefix, "127.0.0.2")
    _, staying_url = register(plugins, etcd, etcd_prefix, "127.0.0.3")
    await until(lambda: len(etcd.keys(etcd_prefix)) == 2, "both plugins registered")
    fleet = registry_manifest(etcd, etcd_prefix, via=late_etcd, balance="least_request")
    dispatcher = await started(fleet)
    withdraw = partial(dispatcher.call, "echo", "withdraw", {"amount": 1})
    assert await failures_while_one_leaves(dispatcher, withdraw, leaving) == []
    assert set(members(dispatcher)) == {f"http {staying_url}"}


@pytest.mark.parametrize("language", ["python", *OTHER_SDKS])
async def test_a_grpc_service_stopped_gracefully_loses_no_call_of_a_busy_fleet(
    etcd: Etcd, etcd_prefix: str, late_etcd: str, plugins: Any, started: Any, language: str
) -> None:
    """The same for the SDKs' gRPC services (``LINCHKIT_LEAVE_DELAY``, 1 s by default)."""
    command = (
        [sys.executable, str(PYTHON_GRPC_EXAMPLE)] if language == "python" else [example(language)]
    )
    services = [
        plugins(
            [*command, "serve", "--address", f"{host}:0"],
            LINCHKIT_REGISTER_ETCD=etcd.url,
            LINCHKIT_REGISTER_PREFIX=etcd_prefix,
        )
        for host in ("127.0.0.2", "127.0.0.3")
    ]
    await until(lambda: len(etcd.keys(etcd_prefix)) == 2, "both services registered")
    target = {
        "provider": "grpc",
        "instances": [{"registry": {"etcd": late_etcd, "prefix": etcd_prefix, "retry_ms": 100}}],
        "balance": "least_request",
    }
    entry = {
        "id": "example",
        "version": "1.0.0",
        "target": target,
        "methods": {"sleep": {"idempotent": False}},
    }
    dispatcher = await started(manifest(entry))
    sleep = partial(dispatcher.call, "example", "sleep", {"ms": 1})
    assert await failures_while_one_leaves(dispatcher, sleep, services[0]) == []


async def test_a_grpc_fleet_follows_grpc_services_that_register(
    etcd: Etcd, etcd_prefix: str, plugins: Any
) -> None:
    """The same registry for gRPC: the SDK's gRPC service writes ``{"address": …}``, the
    fleet dials each address it reads, and a stream goes to one of them."""
    for host in ("127.0.0.2", "127.0.0.3"):
        plugins(
            [sys.executable, str(PYTHON_GRPC_EXAMPLE), "serve", "--address", f"{host}:0"],
            LINCHKIT_REGISTER_ETCD=etcd.url,
            LINCHKIT_REGISTER_PREFIX=etcd_prefix,
        )
    await until(lambda: len(etcd.keys(etcd_prefix)) == 2, "both services registered")
    target = {
        "provider": "grpc",
        "instances": [{"registry": {"etcd": etcd.url, "prefix": etcd_prefix}}],
        "balance": "round_robin",
    }
    entry = {
        "id": "example",
        "version": "1.0.0",
        "target": target,
        "methods": {"echo": {}, "count": {}},
    }
    async with Dispatcher(manifest(entry)) as dispatcher:
        for number in range(10):
            assert await dispatcher.call("example", "echo", {"n": number}) == {"n": number}
        calls = [entry["calls"] for entry in members(dispatcher).values()]
        assert calls == [5, 5]
        chunks = [chunk async for chunk in dispatcher.stream("example", "count", {"n": 3})]
        assert len(chunks) == 3


async def test_a_reload_while_etcd_is_down_keeps_the_instances_the_registry_listed(
    own_etcd: Etcd, etcd_prefix: str, echo_url: str, started: Any
) -> None:
    """A reload that changes the fleet (its balance) makes a new fleet with a new source;
    etcd down then, the new source read nothing and the fleet had no instance: every
    call failed until etcd answered again, though the registry's last list is what a
    failing source keeps. The new fleet starts from what the old one's source listed."""
    own_etcd.put(f"{etcd_prefix}/one", json.dumps({"url": echo_url}))
    dispatcher = await started(registry_manifest(own_etcd, etcd_prefix))
    assert (await dispatcher.call("echo", "say", {"text": "before"}))["text"] == "before"
    own_etcd.stop()
    await dispatcher.reload(registry_manifest(own_etcd, etcd_prefix, balance="least_request"))
    answer = await dispatcher.call("echo", "say", {"text": "after"}, timeout=5)
    assert answer["text"] == "after"
    said = _source_error(dispatcher)  # the new source says it cannot read, and not
    assert said is not None and "reading again" in said  # that it keeps 0 instances:
    assert "keeping the last" not in said, said  # the fleet calls the one it started from
    own_etcd.start()
    await until(lambda: _source_error(dispatcher) is None, "the new source read etcd")
    assert set(members(dispatcher)) == {f"http {echo_url}/invoke"}
