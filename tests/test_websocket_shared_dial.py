"""provider: websocket in dial mode, one URL named by several manifest entries: two
versions of one plugin (a rollout, a reload that adds version 2 beside version 1) share
the connection, which closes when the last of them leaves; another plugin id gets its
own, held to its own ``hello``. Against the SDK's real WebSocket server on loopback,
through tests/fault_proxy.py to count the connections dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from socket_plugin import SocketPlugin

from dispatcher import Dispatcher, ManifestError, ProviderError, TargetUnavailable
from dispatcher.config import parse_manifest
from linchkit_plugin.host import PluginHost
from linchkit_plugin.ws_server import WebSocketPluginServer
from providers.websocket.provider import WebSocketProvider
from providers.websocket.sharing import DialUsers
from tests.conftest import ROOT, manifest

#: Bounds for waits on a slow, busy machine: generous, never a measure of speed.
WAIT = 15.0


@dataclass
class Served:
    plugin: SocketPlugin
    server: WebSocketPluginServer
    #: Between the dispatcher and the server: counts the connections dialled.
    proxy: Any
    port: int


@contextlib.asynccontextmanager
async def served(version: str = "1.0.0") -> AsyncIterator[Served]:
    """``sock`` served over WebSocket, its ``hello`` saying ``version``."""
    from tests.fault_proxy import FaultProxy

    plugin = SocketPlugin()
    server = WebSocketPluginServer(PluginHost(plugin), plugin_id="sock", version=version)
    url = await server.start()
    proxy = FaultProxy("127.0.0.1", int(url.rsplit(":", 1)[1]))
    port = await proxy.start()
    try:
        yield Served(plugin, server, proxy, port)
    finally:
        await proxy.aclose()
        await server.aclose()


def entry(port: int, version: str, plugin_id: str = "sock", **methods: Any) -> dict[str, Any]:
    """A manifest entry dialling ``port``: every entry's target is equal."""
    return {
        "id": plugin_id,
        "version": version,
        "target": {
            "provider": "websocket",
            "url": f"ws://127.0.0.1:{port}/",
            "reconnect_backoff_ms": 20,
            "reconnect_backoff_max_ms": 200,
            "connect_timeout_ms": 2_000,
        },
        "defaults": {"timeout_ms": 5_000},
        "methods": {"echo": {}, "burst": {}, **methods},
    }


async def until(condition: Any, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state of other objects, polled
            await asyncio.sleep(0.01)


async def answers(dispatcher: Dispatcher, version: str, calls: int = 5) -> None:
    """``calls`` calls to ``version`` answer, one after another."""
    for n in range(calls):
        value = f"{version}/{n}"
        assert await dispatcher.call("sock", "echo", {"value": value}, version=version) == value


async def test_a_reload_that_removes_one_of_two_versions_leaves_the_other_answering() -> None:
    """1.0.0 runs; a reload adds 2.0.0 on an equal target (one connection for both); a
    reload then removes 1.0.0. Before: 2.0.0's attach found the connection and did
    nothing, and 1.0.0's detach closed it: 2.0.0's calls then failed TargetUnavailable
    for good. Now the connection is the two versions', closed when the last leaves."""
    async with served() as plugin:
        first, second = entry(plugin.port, "1.0.0"), entry(plugin.port, "2.0.0")
        async with Dispatcher(manifest(first)) as dispatcher:
            await answers(dispatcher, "1.0.0")
            summary = await dispatcher.reload(manifest(first, second), grace=1)
            assert summary["added"] == ["sock@2.0.0"]
            await answers(dispatcher, "1.0.0")
            await answers(dispatcher, "2.0.0")
            summary = await dispatcher.reload(manifest(second), grace=1)
            assert summary["removed"] == ["sock@1.0.0"]
            await answers(dispatcher, "2.0.0", calls=20)
            # The one connection all along: neither reload dialled nor dropped one.
            assert plugin.proxy.connections == 1
            assert len(plugin.server.sessions) == 1
        # The dispatcher's close detached the last version: the connection is closed.
        await until(lambda: not plugin.server.sessions)


async def test_a_rollout_over_one_dialled_url_ends_with_the_version_kept_answering() -> None:
    """Two versions on one URL in a rollout: calls split between them go over the one
    connection; the reload that ends the rollout (1.0.0 removed) leaves 2.0.0 answering."""
    async with served() as plugin:
        first, second = entry(plugin.port, "1.0.0"), entry(plugin.port, "2.0.0")
        rollout = {
            "plugin": "sock",
            "method": "echo",
            "from": "1.0.0",
            "to": "2.0.0",
            "steps": [50, 100],
            "interval_s": 3600,
        }
        both = parse_manifest(
            {"version": 1, "plugins": [first, second], "rollouts": [rollout]}, base_dir=ROOT
        )
        async with Dispatcher(both) as dispatcher:
            for n in range(20):  # half of them to each version, by the rollout's step
                assert await dispatcher.call("sock", "echo", {"value": n}) == n
            assert dispatcher.stats()["rollouts"]["sock.echo"]["status"] == "running"
            await dispatcher.reload(manifest(second), grace=1)
            for n in range(20):
                assert await dispatcher.call("sock", "echo", {"value": n}) == n
            assert plugin.proxy.connections == 1


async def test_plugin_events_name_the_version_the_hello_names_then_the_one_left() -> None:
    """What the plugin emits names the version its ``hello`` says while that version is
    attached (1.0.0, not 2.0.0 attached after it); once a reload removes it, the version
    still attached: a version still served, over the connection that stayed."""
    async with served(version="1.0.0") as plugin:
        first, second = entry(plugin.port, "1.0.0"), entry(plugin.port, "2.0.0")
        seen: list[tuple[str, str, Any]] = []
        async with Dispatcher(manifest(first, second)) as dispatcher:
            dispatcher.on_event(
                lambda plugin_id, version, event, data: seen.append((version, event, data))
            )
            assert await dispatcher.call("sock", "burst", {"name": "a", "count": 2}) == 2
            await until(lambda: len(seen) == 2)
            assert seen == [("1.0.0", "a", {"n": 0}), ("1.0.0", "a", {"n": 1})]
            await dispatcher.reload(manifest(second), grace=1)
            seen.clear()
            assert await dispatcher.call("sock", "burst", {"name": "b", "count": 2}) == 2
            await until(lambda: len(seen) == 2)
            assert seen == [("2.0.0", "b", {"n": 0}), ("2.0.0", "b", {"n": 1})]
            assert plugin.proxy.connections == 1


async def test_a_version_that_joins_an_open_connection_hears_what_its_hello_listed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A version added beside a running one over its connection is told what the
    plugin's ``hello`` listed, as the first was: the routed method it lacks is warned of.
    Before: the added version's attach did nothing, and no warning came."""
    async with served() as plugin:
        first = entry(plugin.port, "1.0.0")
        second = entry(plugin.port, "2.0.0", absent={})
        async with Dispatcher(manifest(first)) as dispatcher:
            await answers(dispatcher, "1.0.0", calls=1)
            with caplog.at_level(logging.WARNING, "dispatcher"):
                await dispatcher.reload(manifest(first, second), grace=1)
            warned = [r.getMessage() for r in caplog.records if "sock@2.0.0" in r.getMessage()]
            assert any("does not serve it" in message and "absent" in message for message in warned)
            assert plugin.proxy.connections == 1


def test_two_plugin_ids_at_one_dialled_url_are_refused_at_load() -> None:
    """The process at a dialled URL serves one plugin id: a manifest that sends a second
    to it is refused when it loads, naming both entries; versions of one plugin may."""
    sock, twin = entry(8999, "1.0.0"), entry(8999, "1.0.0", "twin")
    with pytest.raises(ManifestError) as raised:
        parse_manifest({"plugins": [sock, twin]})
    (problem,) = raised.value.problems
    assert problem.path == "plugins[1].target"
    assert "twin@1.0.0 is sent to ws://127.0.0.1:8999/" in problem.message
    assert "plugins[0].target sends plugin 'sock'" in problem.message
    parse_manifest({"plugins": [sock, entry(8999, "2.0.0")]})  # one plugin, two versions


async def test_another_plugin_id_at_the_same_process_gets_its_own_connection_and_hello() -> None:
    """A dialled connection is one plugin id's (its ``hello`` must name it). Before, a
    second plugin on an equal target rode the first's connection unchecked: its calls
    ran in a process that said it was ``sock``. Now it dials its own, whose hello is
    refused; its calls fail typed, and ``sock``'s go on. (Two URLs to one process: the
    manifest refuses one URL named by two plugin ids.)"""
    async with served() as plugin:
        sock, twin = entry(plugin.port, "1.0.0"), entry(plugin.port, "1.0.0", "twin")
        twin["target"]["url"] += "twin"  # the SDK's server answers on any path
        async with Dispatcher(manifest(sock, twin)) as dispatcher:
            await answers(dispatcher, "1.0.0")
            ran = len(plugin.plugin.ran)
            with pytest.raises(TargetUnavailable) as raised:
                await dispatcher.call("twin", "echo", {"value": 1}, timeout=3)
            assert "not 'twin'" in raised.value.message
            assert len(plugin.plugin.ran) == ran  # it never reached the plugin
            await answers(dispatcher, "1.0.0")
            # Each target's health says what its connection found.
            reports = {r.plugin: r.health for r in await dispatcher.health(timeout=5)}
            assert not reports["twin"].ok
            assert "is plugin 'sock', not 'twin'" in reports["twin"].detail
            assert reports["sock"].ok


async def test_a_detach_that_leaves_another_version_attached_never_waits() -> None:
    """On the provider: the first detach of two versions over one connection only takes
    its version off (it completes without suspending once: nothing to wait for), the
    channel stays open; the last one closes it."""
    async with served() as plugin:
        parsed = manifest(entry(plugin.port, "1.0.0"), entry(plugin.port, "2.0.0"))
        first, second = parsed.plugins
        (target,) = first.targets()
        provider = WebSocketProvider()
        await provider.start()
        try:
            await provider.attach(first, target)
            await provider.attach(second, target)
            (dialed,) = provider.dialed
            channel = await dialed.ready(None)
            detach = provider.detach(first, target)
            with pytest.raises(StopIteration):
                detach.send(None)  # done at its first step: it never awaited anything
            assert channel.usable and provider.dialed
            await provider.detach(first, target)  # again: a no-op
            assert channel.usable
            await provider.detach(second, target)
            assert channel.closed and not provider.dialed
            await until(lambda: not plugin.server.sessions)
        finally:
            await provider.aclose()


async def test_a_refused_reload_that_attached_a_version_leaves_the_running_one_connected() -> None:
    """A reload adds 2.0.0 beside 1.0.0 on one URL, then another plugin fails to attach:
    the reload is refused and what it attached detached. Before: detaching 2.0.0 closed
    the connection 1.0.0 was using. Now only 2.0.0 leaves it."""
    async with served() as plugin:
        first, second = entry(plugin.port, "1.0.0"), entry(plugin.port, "2.0.0")
        broken = {
            "id": "broken",
            "version": "1.0.0",
            "target": {"provider": "local", "entrypoint": "no_such_module_here:Nothing"},
            "methods": {"echo": {}},
        }
        async with Dispatcher(manifest(first)) as dispatcher:
            await answers(dispatcher, "1.0.0")
            with pytest.raises(ProviderError, match="no_such_module_here"):
                await dispatcher.reload(manifest(first, second, broken), grace=1)
            await answers(dispatcher, "1.0.0", calls=20)
            assert plugin.proxy.connections == 1


async def test_a_reload_that_changes_an_entry_keeps_its_connection_and_checks_the_new_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1.0.0's entry routes ``ehco``, which the plugin lacks; a reload routes ``ohce``
    instead, keeping the target equal. The reload dials nothing: the connection takes the
    new entry, what its hello listed is checked against it at once, and the hello of a
    connection dialled again later too. Before: the connection kept the entry it was
    attached with, so the reload said nothing of ``ohce`` and each later hello said
    again that the plugin lacks ``ehco``, which the manifest no longer routes."""
    caplog.set_level(logging.WARNING, logger="dispatcher")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "the manifest routes" in r.getMessage()]

    async with served() as plugin:
        routed = manifest(entry(plugin.port, "1.0.0", ehco={}))
        async with Dispatcher(routed) as dispatcher:
            await answers(dispatcher, "1.0.0")  # after the hello: calls wait for it
            (ehco,) = warnings()
            assert ehco.startswith("sock@1.0.0: the manifest routes ehco to websocket ws://")
            summary = await dispatcher.reload(
                manifest(entry(plugin.port, "1.0.0", ohce={})), grace=1
            )
            assert summary["changed"] == ["sock@1.0.0"]
            assert warnings()[1:] == [ehco.replace("ehco", "ohce")]
            await answers(dispatcher, "1.0.0")
            assert plugin.proxy.connections == 1
            plugin.proxy.drop()  # dialled again: a new hello, listing what it did
            await until(lambda: plugin.proxy.connections == 2)
            await answers(dispatcher, "1.0.0")
            assert len(warnings()) == 2


def test_the_events_of_a_shared_connection_go_to_the_version_its_hello_names() -> None:
    """``DialUsers`` without I/O: the version the hello names while it is attached, else
    the newest attached, else nowhere; a second leave of one version is no leave."""
    first, second = manifest(entry(1, "1.0.0"), entry(1, "2.0.0")).plugins
    got: list[tuple[str, Any]] = []
    users = DialUsers("sock")
    users.emit("lost", 0)  # nobody attached: dropped
    users.join(first, lambda event, data: got.append(("1.0.0", data)))
    users.join(second, lambda event, data: got.append(("2.0.0", data)))
    users.emit("e", 1)  # no hello yet: the newest
    users.heard("1.0.0", frozenset({"echo"}))
    users.emit("e", 2)
    users.heard("3.0.0", None)  # a version the manifest does not name: the newest
    users.emit("e", 3)
    assert users.leave(second) and not users.leave(second)
    users.emit("e", 4)
    assert users.leave(first) and not users
    users.emit("e", 5)
    assert got == [("2.0.0", 1), ("1.0.0", 2), ("2.0.0", 3), ("1.0.0", 4)]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("ws://plugin.test:8999/", "ws://PLUGIN.Test:8999/"),
        ("ws://plugin.test:8999/", "ws://plugin.test:8999"),
        ("ws://plugin.test:8999/", "ws://user:secret@plugin.test:8999/"),
    ],
    ids=["host-case", "no-path", "credentials"],
)
def test_two_spellings_of_one_dialled_url_are_one_place(first: str, second: str) -> None:
    """Another way of writing the URL the first plugin is sent to reaches the same
    process: the second plugin is refused at load all the same (before, only the same
    string was), and the message names the place without the credentials."""
    sock, twin = entry(8999, "1.0.0"), entry(8999, "1.0.0", "twin")
    sock["target"]["url"], twin["target"]["url"] = first, second
    with pytest.raises(ManifestError) as raised:
        parse_manifest({"plugins": [sock, twin]})
    (problem,) = raised.value.problems
    assert "twin@1.0.0 is sent to ws://plugin.test:8999/" in problem.message
    assert "secret" not in str(raised.value)


def test_the_default_port_is_the_port_the_scheme_implies() -> None:
    sock, twin = entry(80, "1.0.0"), entry(80, "1.0.0", "twin")
    twin["target"]["url"] = "ws://127.0.0.1/"
    with pytest.raises(ManifestError):
        parse_manifest({"plugins": [sock, twin]})
    twin["target"]["url"] = "wss://127.0.0.1/"  # port 443: another place
    parse_manifest({"plugins": [sock, twin]})
