"""What an HTTP or Knative target holds is let go once no plugin is attached to it.

A fleet whose instances come from DNS, or reloads moving a plugin from URL to URL, hand the
provider new addresses for good; each one's route, a client of its own (``pool:``, or a
Knative service's HTTP/2 ``authority``) and what the shared client keeps per URL (reqwest:
a pyreqwest client each) must go when its last plugin is detached, or the process grows
with every address it was ever given. Asserted on the provider's own view (``held()``),
against real servers on 127.0.0.x and a real dnsmasq; waits are bounded and generous.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from dispatcher import Dispatcher, DispatchError, TargetUnavailable
from providers._aiohttp import AiohttpClient
from providers._http_client import HttpClient, HttpPool
from providers._http_common import HeldRoutes
from providers._reqwest import ReqwestClient
from providers.egress import EgressPolicy
from providers.http import HttpProvider, HttpTarget
from providers.invocation import Invocation
from providers.knative import KnativeProvider
from providers.target import PluginInfo
from tests.conftest import echo_plugin, manifest
from tests.dns_server import (
    Dnsmasq,
    Zone,
    dnsmasq_fixture,  # noqa: F401  (the fixture `dnsmasq`)
    needs_dnsmasq,
)
from tests.services import port_free_on, until
from tests.test_drain import established_to
from tests.test_http_clients import OK, holding
from tests.test_http_hardening import Handler, read_head, replying, server_on, serving_on
from tests.test_knative_http2 import ingress
from tests.test_knative_http2 import knative as knative_http2

CLIENTS = ("aiohttp", "reqwest")
POOL = {"max_connections": 8}
NOTHING = HeldRoutes(routes=(), attached=0, own_clients=0, client_urls=frozenset())
StartDnsmasq = Callable[[Zone], Dnsmasq]


def hosts_of(urls: Iterable[str]) -> set[str]:
    return {match.group(1) for url in urls if (match := re.search(r"//([^:/]+)", url))}


def origin(url: str) -> str:
    return str(URL(url).origin())


def fleet_hosts(dispatcher: Dispatcher) -> set[str]:
    (fleet,) = dispatcher.stats()["fleets"].values()
    return hosts_of(entry["target"] for entry in fleet["instances"])


# -- DNS churn ---------------------------------------------------------------------------

#: The records a churn test goes through: eight addresses come, and six of them go.
ROUNDS = (
    ("127.0.0.2", "127.0.0.3"),
    ("127.0.0.4", "127.0.0.5"),
    ("127.0.0.6", "127.0.0.7"),
    ("127.0.0.8", "127.0.0.9"),
)


def churned(kind: str, source: dict[str, Any], client: str, pool: bool) -> dict[str, Any]:
    target: dict[str, Any] = {"provider": kind, "instances": [{"dns": source}], "client": client}
    if kind == "knative":
        target.update(service="echo", mode="envelope")
    if pool:
        target["pool"] = POOL
    return target


@needs_dnsmasq
@pytest.mark.parametrize("pool", [False, True], ids=["shared", "pool"])
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind", ["http", "knative"])
async def test_instances_that_dns_stops_naming_leave_nothing_held(
    dnsmasq: StartDnsmasq, kind: str, client: str, pool: bool
) -> None:
    """Eight addresses come and six go, calls running all along: the provider holds
    routes, clients of their own and per-URL state for the two instances listed now."""
    hosts = sorted({host for record in ROUNDS for host in record})
    port = port_free_on(*hosts)
    dns = dnsmasq(Zone(hosts={"churn.test": list(ROUNDS[0])}, local_ttl=1))
    source = {"name": "churn.test", "type": "A", "port": port, "server": dns.server}
    source |= {"min_refresh_ms": 100, "max_refresh_ms": 300}
    plugins = manifest(echo_plugin("churn", churned(kind, source, client, pool)))
    failures: list[BaseException] = []
    answered = 0
    stop = asyncio.Event()

    async def calling(dispatcher: Dispatcher) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                await dispatcher.call("churn", "say", {"text": "hi"}, timeout=10)
                answered += 1
            except DispatchError as error:
                failures.append(error)
            await asyncio.sleep(0.005)

    async with serving_on(hosts, port, replying(200, OK)), Dispatcher(plugins) as dispatcher:
        provider = dispatcher.providers[kind]
        assert isinstance(provider, HttpProvider | KnativeProvider)
        callers = [asyncio.create_task(calling(dispatcher)) for _ in range(3)]
        try:
            for record in ROUNDS:
                now = set(record)
                dns.set_hosts({"churn.test": list(record)})
                await until(lambda now=now: fleet_hosts(dispatcher) == now, f"instances {now}")
                at = answered
                await until(lambda at=at: answered >= at + 10, "calls to the new instances")

                def settled(now: set[str] = now) -> bool:
                    held = provider.held()
                    return hosts_of(held.routes) == now and hosts_of(held.client_urls) <= now

                await until(settled, f"the provider holding {now} alone")
                held = provider.held()
                assert len(held.routes) == held.attached == 2, held
                assert held.own_clients == (2 if pool else 0), held
        finally:
            stop.set()
            await asyncio.gather(*callers)
    assert failures == []
    assert provider.held() == NOTHING


# -- reloads -----------------------------------------------------------------------------


def at(url: str, client: str, pool: bool) -> dict[str, Any]:
    target: dict[str, Any] = {"provider": "http", "url": url, "client": client}
    return {**target, "pool": POOL} if pool else target


@pytest.mark.parametrize("pool", [False, True], ids=["shared", "pool"])
@pytest.mark.parametrize("client", CLIENTS)
async def test_a_reload_that_moves_a_plugin_to_another_url_releases_the_old_one(
    client: str, pool: bool
) -> None:
    async with (
        server_on("127.0.0.2", replying(200, OK)) as (first, first_port),
        server_on("127.0.0.3", replying(200, OK)) as (second, second_port),
    ):
        old, new = f"http://{first}:{first_port}", f"http://{second}:{second_port}"
        async with Dispatcher(manifest(echo_plugin("p", at(old, client, pool)))) as dispatcher:
            provider = dispatcher.providers["http"]
            assert isinstance(provider, HttpProvider)
            assert await dispatcher.call("p", "say", {"text": "hi"}) == {"text": "hi"}
            assert hosts_of(provider.held().routes) == {first}
            await dispatcher.reload(manifest(echo_plugin("p", at(new, client, pool))), grace=5)
            assert await dispatcher.call("p", "say", {"text": "hi"}) == {"text": "hi"}
            held = provider.held()
            assert hosts_of(held.routes) == {second}, held
            assert hosts_of(held.client_urls) <= {second}, held
            assert (held.attached, held.own_clients) == (1, 1 if pool else 0)
        assert provider.held() == NOTHING


def gated(release: asyncio.Event, received: asyncio.Event) -> Handler:
    """Answers each request once ``release`` is set; ``received`` when one arrives."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            received.set()
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK), OK))
            await writer.drain()

    return handle


@pytest.mark.parametrize("sharing", ["plugins", "versions"])
@pytest.mark.parametrize("client", CLIENTS)
async def test_two_plugins_on_one_target_keep_it_until_both_are_gone(
    client: str, sharing: str
) -> None:
    """The target's own pool stays while one plugin (or version) still calls it: a reload
    that removes the other neither cuts its call in flight nor its next calls; removing it
    too lets go."""
    release, received = asyncio.Event(), asyncio.Event()
    async with (
        server_on("127.0.0.2", gated(release, received)) as (host, port),
        server_on("127.0.0.3", replying(200, OK)) as (other, other_port),
    ):
        shared = at(f"http://{host}:{port}", client, pool=True)
        if sharing == "plugins":
            gone, staying = echo_plugin("a", shared), echo_plugin("b", shared)
        else:
            gone = echo_plugin("b", shared, version="1.0.0")
            staying = echo_plugin("b", shared, version="2.0.0")
        elsewhere = echo_plugin("c", at(f"http://{other}:{other_port}", client, pool=True))
        async with Dispatcher(manifest(gone, staying, elsewhere)) as dispatcher:
            provider = dispatcher.providers["http"]
            assert isinstance(provider, HttpProvider)

            def call() -> Any:
                return dispatcher.call("b", "say", {"text": "hi"}, version=staying["version"])

            held_call = asyncio.create_task(call())
            await asyncio.wait_for(received.wait(), timeout=10)
            await dispatcher.reload(manifest(staying, elsewhere), grace=5)
            assert not held_call.done()
            release.set()
            assert await asyncio.wait_for(held_call, timeout=10) == {"text": "hi"}
            assert await call() == {"text": "hi"}
            held = provider.held()
            assert hosts_of(held.routes) == {host}
            assert (held.attached, held.own_clients) == (2, 1)  # "c" attached, not called

            await dispatcher.reload(manifest(elsewhere), grace=5)
            assert provider.held() == HeldRoutes((), 1, 0, frozenset())
            assert await dispatcher.call("c", "say", {"text": "hi"}) == {"text": "hi"}
            assert hosts_of(provider.held().routes) == {other}


# -- hostile: a detach that cuts calls in flight -----------------------------------------


def plugin_info() -> PluginInfo:
    return manifest(echo_plugin("p", {"provider": "http", "url": "http://127.0.0.1:1"})).plugins[0]


def invocation(seconds: float = 60.0) -> Invocation:
    deadline = asyncio.get_running_loop().time() + seconds
    return Invocation("p", "1.0.0", "say", {"text": "hi"}, deadline, "r-1")


@pytest.mark.parametrize(
    ("client", "pool"),
    [("aiohttp", True), ("reqwest", True), ("reqwest", False)],
    ids=["aiohttp-pool", "reqwest-pool", "reqwest-shared"],
)
async def test_a_detach_after_the_grace_ends_the_calls_it_cuts_as_target_unavailable(
    client: str, pool: bool
) -> None:
    """The last plugin of a target detached while a call is held by the plugin, and
    another waits for the pool's one connection: both end at once as the seam's error
    (not at their 60 s deadline, not as a vendor's "closed" error); a call that comes later
    is answered, its route built again, and let go at the next detach."""
    received, hung_up = asyncio.Event(), asyncio.Event()
    plugin = plugin_info()
    async with server_on("127.0.0.1", holding(received, hung_up)) as (host, port):
        extra: dict[str, Any] = {"pool": {"max_connections": 1}} if pool else {}
        target = HttpTarget.model_validate(
            {"provider": "http", "url": f"http://{host}:{port}", "client": client, **extra}
        )
        async with HttpProvider() as provider:
            await provider.attach(plugin, target)
            first = asyncio.create_task(provider.invoke(target, invocation()))
            await asyncio.wait_for(received.wait(), timeout=10)
            waiting = asyncio.create_task(provider.invoke(target, invocation()))
            await asyncio.sleep(0.2)  # the second waits for the first one's connection
            await provider.detach(plugin, target)
            outcomes = await asyncio.wait_for(
                asyncio.gather(first, waiting, return_exceptions=True), timeout=10
            )
            for outcome in outcomes:
                assert isinstance(outcome, TargetUnavailable), repr(outcome)
                assert "client was closed" in outcome.message
            if client == "aiohttp":  # pyreqwest lets a request it gave up on run on
                await asyncio.wait_for(hung_up.wait(), timeout=10)  # (DEFAULT_CLIENT)
            assert provider.held() == NOTHING

    async with server_on("127.0.0.1", replying(200, OK)) as (host, port):
        target = HttpTarget.model_validate(
            {"provider": "http", "url": f"http://{host}:{port}", "client": client, **extra}
        )
        async with HttpProvider() as provider:
            await provider.attach(plugin, target)
            await provider.detach(plugin, target)
            assert await provider.invoke(target, invocation()) == {"text": "hi"}  # a late call
            assert len(provider.held().routes) == 1  # kept: nothing attached it to end it
            await provider.attach(plugin, target)
            await provider.detach(plugin, target)
            assert provider.held() == NOTHING


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_hundred_targets_attached_called_and_detached_leave_no_connection_or_thread(
    client: str,
) -> None:
    """Each with a pool of its own: once detached, its client and its connections are
    gone, and no thread stays behind (pyreqwest's one runtime thread is the process's)."""
    plugin = plugin_info()
    async with server_on("127.0.0.1", replying(200, OK)) as (host, port):
        url = f"http://{host}:{port}"

        def target(index: int) -> HttpTarget:
            return HttpTarget.model_validate(
                {
                    "provider": "http",
                    "url": url,
                    "invoke_path": f"/invoke/{index}",
                    "client": client,
                    "pool": {"max_connections": 2},
                }
            )

        async with HttpProvider() as provider:
            for index in range(101):
                if index == 1:  # the first one started what the process keeps
                    threads = len(os.listdir("/proc/self/task"))
                each = target(index)
                await provider.attach(plugin, each)
                assert await provider.invoke(each, invocation()) == {"text": "hi"}
                await provider.detach(plugin, each)
            assert provider.held() == NOTHING
            await until(lambda: established_to(url) == 0, "the connections closed")
            assert len(os.listdir("/proc/self/task")) <= threads


def clients_of(kind: str) -> HttpClient:
    if kind == "reqwest":
        return ReqwestClient(HttpPool(max_connections=1), egress=EgressPolicy())
    return AiohttpClient(HttpPool(max_connections=1), egress=EgressPolicy())


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_client_closed_under_its_calls_ends_them_typed(kind: str) -> None:
    """One call held by the plugin, one waiting for the pool's one connection: a close
    ends both as ``TargetUnavailable`` (aiohttp cancelled the waiting one, as if its
    caller had gone); a call after the close goes nowhere, typed too."""
    received, hung_up = asyncio.Event(), asyncio.Event()
    async with server_on("127.0.0.1", holding(received, hung_up)) as (host, port):
        url = f"http://{host}:{port}/invoke"
        target = HttpTarget.model_validate({"provider": "http", "url": f"http://{host}:{port}"})
        client = clients_of(kind)

        def post() -> asyncio.Task[Any]:
            return asyncio.create_task(
                client.post(url, b"{}", {}, timeout=60, limit=1024, target=target, tls=None)
            )

        first = post()
        await asyncio.wait_for(received.wait(), timeout=10)
        waiting = post()
        await asyncio.sleep(0.2)
        if kind == "reqwest":
            await client.forget([url])
        else:
            await client.aclose()
        outcomes = await asyncio.wait_for(
            asyncio.gather(first, waiting, return_exceptions=True), timeout=10
        )
        assert [type(outcome) for outcome in outcomes] == [TargetUnavailable] * 2, outcomes
        assert client.urls_held() == frozenset()
        await client.aclose()
        (late,) = await asyncio.gather(post(), return_exceptions=True)
        assert isinstance(late, TargetUnavailable), repr(late)
        assert late.details == {"stage": "connect"}  # nothing went out


# -- Knative ------------------------------------------------------------------------------


async def test_a_knative_service_moved_to_another_ingress_lets_the_old_one_go() -> None:
    """On HTTP/2 each service has a reqwest client of its own (its ``authority``): a
    reload moving the service to another ingress closes the old one's."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(ingress())
        second = await stack.enter_async_context(ingress())

        def entry(url: str) -> dict[str, Any]:
            return {
                "id": "p",
                "version": "1.0.0",
                "target": knative_http2(url),
                "methods": {"say": {}},
            }

        dispatcher = await stack.enter_async_context(Dispatcher(manifest(entry(first))))
        provider = dispatcher.providers["knative"]
        assert isinstance(provider, KnativeProvider)
        assert (await dispatcher.call("p", "say", {}))["http_version"] == "2"
        assert provider.held().own_clients == 1
        await dispatcher.reload(manifest(entry(second)), grace=5)
        assert (await dispatcher.call("p", "say", {}))["http_version"] == "2"
        held = provider.held()
        assert [origin(url) for url in held.routes] == [origin(second)]
        assert (held.attached, held.own_clients) == (1, 1)
        assert {origin(url) for url in held.client_urls} <= {origin(second)}


@pytest.mark.parametrize("client", ["aiohttp", "reqwest"])
async def test_a_route_that_cannot_be_built_leaves_no_client_of_its_own_open(
    tmp_path: Path, client: str
) -> None:
    """A target with a ``pool:`` of its own whose TLS file cannot be read when a call needs
    its route: every call fails typed, and none leaves a client open (before: the client
    was opened first, then the route failed, one more open client per call)."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("not read before a call")
    target = {
        "provider": "http",
        "url": "https://127.0.0.8:9",
        "client": client,
        "pool": {"max_connections": 2},
        "tls": {"ca_file": str(ca_file)},
    }
    entry = {"id": "tls", "version": "1.0.0", "target": target, "methods": {"say": {}}}
    async with Dispatcher(manifest(entry)) as dispatcher:
        provider = dispatcher.providers["http"]
        ca_file.unlink()
        for _ in range(3):
            with pytest.raises(DispatchError):
                await dispatcher.call("tls", "say", {"text": "x"})
        assert provider.held().own_clients == 0
