"""Storms over what etcd feeds a dispatcher: a fleet's instances (``instances: [{registry}]``)
and the plugin entries of ``registry:``, churned while callers call and reloads come.

Everything is real: etcd (``tests/services.py``), the plugin servers (the SDK's
``PluginApp`` under uvicorn, in this loop, each counting what reaches it), a proxy that
cuts etcd's connections mid-stream (``tests/fault_proxy.py``). Each storm lasts a few
seconds; what is asserted is what happened to each call (answered once, or a typed
error), never how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from dispatcher import Dispatcher
from dispatcher.config import Manifest, parse_manifest
from dispatcher.fleet.sources import MAX_ENDPOINTS
from dispatcher.fleet.sources.etcd import EtcdSource
from linchkit_plugin import Plugin, PluginApp, PluginHost
from linchkit_plugin.errors import DispatchError, PluginNotFound
from tests.conftest import ROOT, manifest, serve_asgi
from tests.fault_proxy import FaultProxy
from tests.services import Etcd, until
from tests.test_etcd_source import put_junk

pytestmark = pytest.mark.slow

#: How long each storm churns: short, so a busy 2-core machine gets through it.
STORM_SECONDS = 8.0
CALLERS = 8


@dataclass
class Server:
    """One plugin server: its URL and every call that reached it (number, when)."""

    name: str
    url: str = ""
    calls: list[tuple[int, float]] = field(default_factory=list)


class Tally(Plugin):
    """Answers ``take(n)`` with its server's name, and notes that ``n`` reached it."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def take(self, n: int) -> str:
        self.server.calls.append((n, time.monotonic()))
        return self.server.name

    async def hold(self, seconds: float) -> str:
        """A slow call: one in flight while its entry goes."""
        await asyncio.sleep(seconds)
        return self.server.name


@contextlib.asynccontextmanager
async def tally_servers(count: int) -> AsyncIterator[list[Server]]:
    servers = [Server(f"s{index}") for index in range(count)]
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            app = PluginApp(PluginHost(Tally(server)))
            serving = serve_asgi(app)
            server.url = await anext(serving)
            stack.push_async_callback(anext, serving, None)
        yield servers


@dataclass
class Calls:
    """What the callers sent and what came back."""

    answered: dict[int, str] = field(default_factory=dict)
    failed: dict[int, BaseException] = field(default_factory=dict)
    numbers: itertools.count[int] = field(default_factory=itertools.count)


async def call_on(dispatcher: Dispatcher, calls: Calls, stop: asyncio.Event, plugin: str) -> None:
    while not stop.is_set():
        n = next(calls.numbers)
        try:
            calls.answered[n] = await dispatcher.call(plugin, "take", {"n": n}, timeout=15)
        except Exception as error:
            calls.failed[n] = error
            # A call refused at once never yields to the loop: a caller calling again
            # straight away would hold it for ever.
            await asyncio.sleep(0.01)


def check_each_call_went_once(calls: Calls, servers: list[Server]) -> None:
    """Every answered call reached exactly one server once, the one that answered; a
    failed one reached none twice; every failure is the dispatcher's typed error."""
    reached: dict[int, list[str]] = {}
    for server in servers:
        for n, _ in server.calls:
            reached.setdefault(n, []).append(server.name)
    twice = {n: names for n, names in reached.items() if len(names) > 1}
    assert not twice, f"calls sent twice: {dict(list(twice.items())[:5])}"
    lost = {n: name for n, name in calls.answered.items() if reached.get(n) != [name]}
    assert not lost, f"answered calls that no server (or another) took: {list(lost)[:5]}"
    untyped = {n: e for n, e in calls.failed.items() if not isinstance(e, DispatchError)}
    assert not untyped, f"untyped failures: {list(untyped.values())[:3]!r}"


def failure_kinds(calls: Calls) -> dict[str, int]:
    """How many calls failed with each error (its type and first words)."""
    kinds: dict[str, int] = {}
    for error in calls.failed.values():
        kind = f"{type(error).__name__}: {str(error)[:100]}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


async def reload_storm(
    dispatcher: Dispatcher,
    variants: list[Manifest[Any]],
    stop: asyncio.Event,
    rng: random.Random,
    outcomes: dict[str, int],
) -> None:
    """Reload into a random variant, over and over; 40 % are cancelled partway."""
    while not stop.is_set():
        reload = asyncio.create_task(dispatcher.reload(rng.choice(variants), grace=5))
        if rng.random() < 0.4:
            await asyncio.sleep(rng.uniform(0, 0.05))
            reload.cancel()
        try:
            await reload
            outcomes["done"] += 1
        except asyncio.CancelledError:
            if not reload.cancelled():
                raise
            outcomes["cancelled"] += 1
        except DispatchError:
            outcomes["refused"] += 1
        await asyncio.sleep(rng.uniform(0.05, 0.3))


# -- a fleet whose instances etcd lists ----------------------------------------------------


def fleet_entry(etcd_url: str, prefix: str, balance: str, retry_ms: int) -> dict[str, Any]:
    registry = {"etcd": etcd_url, "prefix": prefix, "retry_ms": retry_ms, "timeout_ms": 1000}
    return {
        "id": "tally",
        "version": "1.0.0",
        "target": {"provider": "http", "instances": [{"registry": registry}], "balance": balance},
        "methods": {"take": {"idempotent": False}},
    }


def registration(server: Server, weight: int = 1) -> str:
    return json.dumps({"url": server.url, "weight": weight})


async def churn_instances(
    etcd: Etcd, prefix: str, servers: list[Server], stop: asyncio.Event, rng: random.Random
) -> dict[str, float]:
    """Register, deregister and let leases lapse, at random, among ``servers[1:]``
    (``servers[0]`` stays registered: the fleet never runs out). Returns when each key
    was last deleted (by the churn; a lapsed lease is not timed)."""
    deleted: dict[str, float] = {}
    while not stop.is_set():
        server = rng.choice(servers[1:])
        key = f"{prefix}/{server.name}"
        action = rng.random()
        try:
            if action < 0.1:  # one key whose address changes under it
                await asyncio.to_thread(etcd.put, f"{prefix}/moving", registration(server))
            elif action < 0.4:
                await asyncio.to_thread(etcd.put, key, registration(server, rng.randint(1, 5)))
                deleted.pop(key, None)
            elif action < 0.7:
                await asyncio.to_thread(etcd.delete, key)
                deleted[key] = time.monotonic()
            else:
                lease = await asyncio.to_thread(etcd.grant, 2)
                await asyncio.to_thread(etcd.put, key, registration(server), lease=lease)
                deleted.pop(key, None)
        except OSError:
            pass  # etcd restarting: the churn goes on when it is back
        await asyncio.sleep(rng.uniform(0.01, 0.15))
    return deleted


async def test_a_reload_storm_over_a_fleet_etcd_feeds_loses_no_call(
    own_etcd: Etcd, etcd_prefix: str
) -> None:
    """Eight callers call a non-idempotent method of a fleet etcd lists while its
    instances are registered, deregistered and their leases lapse; reloads change the
    fleet (its balance, its registry's retry) and 40 % are cancelled; etcd is killed and
    started again, and the watch's connection cut, mid-storm. No call is lost or sent
    twice, every failure is typed; once the churn stops, calls go only to the instances
    registered; the close ends."""
    rng = random.Random(23)
    proxy = FaultProxy("127.0.0.1", own_etcd.client_port)
    port = await proxy.start()
    etcd_url = f"http://127.0.0.1:{port}"
    variants = [
        manifest(fleet_entry(etcd_url, etcd_prefix, balance, retry_ms))
        for balance in ("least_request", "round_robin", "weighted")
        for retry_ms in (100, 150)
    ]
    async with tally_servers(5) as servers:
        own_etcd.put(f"{etcd_prefix}/{servers[0].name}", registration(servers[0]))
        dispatcher = Dispatcher(variants[0])
        await dispatcher.start()
        try:
            calls, stop = Calls(), asyncio.Event()
            outcomes = {"done": 0, "cancelled": 0, "refused": 0}
            callers = [
                asyncio.create_task(call_on(dispatcher, calls, stop, "tally"))
                for _ in range(CALLERS)
            ]
            churn = asyncio.create_task(churn_instances(own_etcd, etcd_prefix, servers, stop, rng))
            reloads = asyncio.create_task(reload_storm(dispatcher, variants, stop, rng, outcomes))
            # Values that lie: 10,000 keys off the contract, a weight of 1e308, 1 MB.
            await asyncio.to_thread(put_junk, own_etcd, etcd_prefix, range(10_000))
            huge = {"url": servers[0].url, "weight": 1e308}
            await asyncio.to_thread(own_etcd.put, f"{etcd_prefix}/huge", json.dumps(huge))
            heavy = {"url": servers[0].url, "padding": "x" * 1_000_000}
            await asyncio.to_thread(own_etcd.put, f"{etcd_prefix}/heavy", json.dumps(heavy))
            await asyncio.sleep(STORM_SECONDS / 4)
            proxy.drop()  # every watch cut mid-stream
            await asyncio.sleep(STORM_SECONDS / 4)
            await asyncio.to_thread(own_etcd.stop)
            await asyncio.sleep(1)
            await asyncio.to_thread(own_etcd.start)
            await asyncio.sleep(STORM_SECONDS / 4)
            proxy.drop()
            await asyncio.sleep(STORM_SECONDS / 4)
            stop.set()
            await asyncio.gather(*callers, reloads)
            await churn
            assert outcomes["done"] and outcomes["cancelled"], outcomes
            check_each_call_went_once(calls, servers)
            # servers[0] stayed registered throughout: the fleet always had an instance.
            assert not calls.failed, failure_kinds(calls)

            # Settled: the fleet lists what etcd lists, and only they are called.
            await asyncio.sleep(2.5)  # the last leases lapse
            by_url = {server.url: server.name for server in servers}
            registered = set()
            for value in own_etcd.keys(etcd_prefix).values():
                with contextlib.suppress(ValueError):
                    document = json.loads(value)
                    if document.get("weight", 1) == 1 or isinstance(document["weight"], int):
                        registered.add(by_url[document["url"]])
            want = {f"http {s.url}/invoke" for s in servers if s.name in registered}

            def listed() -> set[str]:
                (fleet,) = dispatcher.stats()["fleets"].values()
                return {each["target"] for each in fleet["instances"] if each["state"] != "leaving"}

            await until(lambda: listed() == want, f"the fleet listing {sorted(registered)}")
            since = time.monotonic()
            answers = [await dispatcher.call("tally", "take", {"n": -1 - n}) for n in range(40)]
            assert set(answers) <= registered, (set(answers), registered)
            late = {
                s.name
                for s in servers
                if s.name not in registered and any(at > since for _, at in s.calls)
            }
            assert not late, f"called after it left: {late}"
            # The 10,000 keys off the contract cost a bounded list and a count.
            assert dispatcher.fleets is not None
            for membership in dispatcher.fleets.memberships.values():
                (source,) = membership.sources
                assert isinstance(source, EtcdSource)
                assert len(source.skipped) <= MAX_ENDPOINTS, len(source.skipped)
                assert len(source.skipped) + source.unlisted >= 10_000
        finally:
            async with asyncio.timeout(20):  # the close is bounded, storm or not
                await dispatcher.aclose()
            await proxy.aclose()


# -- plugin entries published in etcd ------------------------------------------------------


def tally_entry(server: Server, version: str) -> str:
    return json.dumps(
        {
            "id": "tally",
            "version": version,
            "target": {"provider": "http", "url": server.url},
            "methods": {"take": {"idempotent": False}},
        }
    )


def entries_manifest(etcd_url: str, prefix: str, balance: str) -> Manifest[Any]:
    """The file's manifest: a fleet of its own (its balance changes from reload to reload)
    and the registry of entries."""
    document = {
        "version": 1,
        "plugins": [
            fleet_entry(etcd_url, f"{prefix}-instances", balance, 100) | {"id": "local-fleet"}
        ],
        "registry": {
            "etcd": etcd_url,
            "prefix": prefix,
            "debounce_ms": 20,
            "retry_ms": 100,
            "timeout_ms": 1000,
        },
    }
    return parse_manifest(document, base_dir=ROOT)


async def churn_entries(
    etcd: Etcd, prefix: str, servers: list[Server], stop: asyncio.Event, rng: random.Random
) -> None:
    """``tally@1.0.0`` republished on another server of ``servers[:2]``, ``tally@2.0.0``
    flapping in and out, other plugins' entries put and deleted, fast."""
    while not stop.is_set():
        action = rng.random()
        try:
            if action < 0.3:
                server = rng.choice(servers[:2])
                await asyncio.to_thread(
                    etcd.put, f"{prefix}/tally@1.0.0", tally_entry(server, "1.0.0")
                )
            elif action < 0.5:
                server = rng.choice(servers[2:])
                await asyncio.to_thread(
                    etcd.put, f"{prefix}/tally@2.0.0", tally_entry(server, "2.0.0")
                )
            elif action < 0.7:
                await asyncio.to_thread(etcd.delete, f"{prefix}/tally@2.0.0")
            else:
                other = f"other{rng.randint(0, 9)}@1.0.0"
                if rng.random() < 0.5:
                    entry = json.loads(tally_entry(rng.choice(servers), "1.0.0"))
                    entry["id"] = other.split("@")[0]
                    await asyncio.to_thread(etcd.put, f"{prefix}/{other}", json.dumps(entry))
                else:
                    await asyncio.to_thread(etcd.delete, f"{prefix}/{other}")
        except OSError:
            pass  # etcd unreachable for a moment: the churn goes on
        await asyncio.sleep(rng.uniform(0.005, 0.05))


async def test_entries_churned_in_etcd_while_callers_call_them_lose_no_call(
    own_etcd: Etcd, etcd_prefix: str
) -> None:
    """Eight callers call ``tally@1.0.0`` (always published, its server changing under
    the same key) and ``^2`` (flapping in and out) while entries are put and deleted
    fast, file reloads come (40 % cancelled), and etcd becomes unreachable while every
    entry changes, then answers again. A call to the version always published never
    fails; no call is sent twice; every failure is typed; once settled, the dispatcher
    serves what etcd holds; the close ends."""
    rng = random.Random(23)
    proxy = FaultProxy("127.0.0.1", own_etcd.client_port)
    port = await proxy.start()
    etcd_url = f"http://127.0.0.1:{port}"
    variants = [
        entries_manifest(etcd_url, etcd_prefix, b) for b in ("least_request", "round_robin")
    ]
    async with tally_servers(5) as servers:
        own_etcd.put(f"{etcd_prefix}/tally@1.0.0", tally_entry(servers[0], "1.0.0"))
        own_etcd.put(f"{etcd_prefix}-instances/s4", registration(servers[4]))
        dispatcher = Dispatcher(variants[0])
        await dispatcher.start()
        try:
            ones, twos, stop = Calls(), Calls(), asyncio.Event()
            twos.numbers = itertools.count(1_000_000)

            async def caller(calls: Calls, version: str) -> None:
                while not stop.is_set():
                    n = next(calls.numbers)
                    try:
                        answer = await dispatcher.call(
                            "tally", "take", {"n": n}, version=version, timeout=15
                        )
                        calls.answered[n] = answer
                    except Exception as error:
                        calls.failed[n] = error
                        await asyncio.sleep(0.01)

            outcomes = {"done": 0, "cancelled": 0, "refused": 0}
            callers = [
                asyncio.create_task(caller(ones if i % 2 else twos, "1.0.0" if i % 2 else "^2"))
                for i in range(CALLERS)
            ]
            churn_stop = asyncio.Event()
            churn = asyncio.create_task(
                churn_entries(own_etcd, etcd_prefix, servers, churn_stop, rng)
            )
            reloads = asyncio.create_task(reload_storm(dispatcher, variants, stop, rng, outcomes))
            await asyncio.sleep(STORM_SECONDS / 2)
            # etcd unreachable; meanwhile everything changes; then it answers again.
            proxy.refusing = True
            proxy.drop()
            await asyncio.sleep(1)
            churn_stop.set()
            await churn
            for key in own_etcd.keys(etcd_prefix):
                await asyncio.to_thread(own_etcd.delete, key)
            await asyncio.to_thread(
                own_etcd.put, f"{etcd_prefix}/tally@1.0.0", tally_entry(servers[3], "1.0.0")
            )
            await asyncio.to_thread(
                own_etcd.put, f"{etcd_prefix}/tally@2.1.0", tally_entry(servers[2], "2.1.0")
            )
            await asyncio.sleep(1)
            proxy.refusing = False
            await asyncio.sleep(STORM_SECONDS / 2)
            stop.set()
            await asyncio.gather(*callers, reloads)
            assert outcomes["done"] and outcomes["cancelled"], outcomes
            check_each_call_went_once(ones, servers)
            check_each_call_went_once(twos, servers)
            assert not ones.failed, failure_kinds(ones)
            # ^2 is sometimes unpublished: then, and only then, it is not found.
            assert all(isinstance(e, PluginNotFound) for e in twos.failed.values()), failure_kinds(
                twos
            )

            # Settled: what etcd holds is served, and only it.
            await until(
                lambda: (
                    {p.key for p in dispatcher.manifest.plugins}
                    == {"local-fleet@1.0.0", "tally@1.0.0", "tally@2.1.0"}
                ),
                "the entries etcd holds",
            )
            one = await dispatcher.call("tally", "take", {"n": -1}, version="1.0.0")
            two = await dispatcher.call("tally", "take", {"n": -2}, version="^2")
            assert (one, two) == ("s3", "s2")
        finally:
            async with asyncio.timeout(20):  # the close is bounded, storm or not
                await dispatcher.aclose()
            await proxy.aclose()


def held_entry(server: Server, version: str) -> str:
    return json.dumps(
        {
            "id": "tally",
            "version": version,
            "target": {"provider": "http", "url": server.url},
            "methods": {"take": {}, "hold": {"timeout_ms": 60_000}},
        }
    )


@pytest.mark.parametrize("slow", ["the deleted version", "a version kept"])
async def test_an_entry_published_again_is_served_while_a_slow_call_drains(
    etcd: Etcd, etcd_prefix: str, slow: str
) -> None:
    """A registry change waited behind the reload before it, which waits for every call
    in flight at its swap (up to its 30 s grace): with one slow call anywhere, a version
    deleted and published again (an entry flapping) went unserved that long, and every
    change after it waited too. A change now stops that wait: the new routes swap at
    once, and the slow call still ends well."""
    async with tally_servers(2) as servers:
        etcd.put(f"{etcd_prefix}/tally@1.0.0", held_entry(servers[0], "1.0.0"))
        etcd.put(f"{etcd_prefix}/tally@2.0.0", held_entry(servers[1], "2.0.0"))
        dispatcher = Dispatcher(entries_manifest(etcd.url, etcd_prefix, "round_robin"))
        await dispatcher.start()
        try:
            version = "2.0.0" if slow == "the deleted version" else "1.0.0"
            held = asyncio.create_task(
                dispatcher.call("tally", "hold", {"seconds": 12}, version=version, timeout=60)
            )
            await asyncio.sleep(0.5)
            await asyncio.to_thread(etcd.delete, f"{etcd_prefix}/tally@2.0.0")
            await until(lambda: "tally@2.0.0" not in plugin_keys(dispatcher), "2.0.0 gone")
            await asyncio.sleep(0.2)  # its reload now waits for the slow call
            await asyncio.to_thread(
                etcd.put, f"{etcd_prefix}/tally@2.0.0", held_entry(servers[1], "2.0.0")
            )
            # Well before the slow call ends (a bound on a busy machine, not a speed).
            await until(lambda: "tally@2.0.0" in plugin_keys(dispatcher), "2.0.0 back", timeout=8)
            assert not held.done()
            assert await dispatcher.call("tally", "take", {"n": 1}, version="2.0.0") == "s1"
            assert await held == ("s1" if version == "2.0.0" else "s0")
            assert await dispatcher.call("tally", "take", {"n": 2}, version="2.0.0") == "s1"
            registry = dispatcher.registry
            assert registry is not None and registry.apply_error is None
        finally:
            async with asyncio.timeout(40):
                await dispatcher.aclose()


def plugin_keys(dispatcher: Dispatcher) -> set[str]:
    return {plugin.key for plugin in dispatcher.manifest.plugins}
