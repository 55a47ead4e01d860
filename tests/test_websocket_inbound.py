"""Reverse mode: plugins dial the gateway's /v1/plugins/connect (the SDK's ``dial``), each
connection an instance of its plugin's fleet. Real gateway, real SDK, loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from socket_plugin import SocketPlugin

from dispatcher import Dispatcher, ManifestError, TargetUnavailable, parse_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from dispatcher.gateway.app import create_app
from linchkit_plugin import current_context
from linchkit_plugin._ws_dial import checked_gateway_url, masked_url
from linchkit_plugin._ws_events import EventOutbox
from linchkit_plugin._ws_session import PluginSession, hello_of
from linchkit_plugin.host import PluginHost
from linchkit_plugin.ws_protocol import PLUGIN_ID_HEADER, PLUGIN_VERSION_HEADER, hello_frame
from linchkit_plugin.ws_server import Refused, dial
from providers.model import masked_url as dispatcher_masked_url
from tests.conftest import ROOT, manifest
from tests.gateway_support import closing_gateway, raw_connection, read_answer
from tests.identity_support import good_claims, jwt_config, rsa_key, write_jwks

TOKEN = "sock-token-0123456789"
OTHER_TOKEN = "other-token-9876543210"


def _manifest() -> Any:
    return manifest(
        {
            "id": "sock",
            "version": "1.0.0",
            "target": {"provider": "websocket", "mode": "inbound", "token": TOKEN},
            "defaults": {"timeout_ms": 5_000},
            "methods": {
                "echo": {"idempotent": True, "retry": {"attempts": 3}},
                "sleep": {},
                "count": {},
            },
        },
        {
            "id": "other",
            "version": "1.0.0",
            "target": {"provider": "websocket", "mode": "inbound", "token": OTHER_TOKEN},
            "methods": {"echo": {}},
        },
    )


@contextlib.asynccontextmanager
async def gateway(
    plugins: Any = None,
    *,
    upgrades: list[str] | None = None,
    extensions: list[str | None] | None = None,
) -> AsyncIterator[tuple[Dispatcher, str]]:
    """The dispatcher's gateway on loopback; ``upgrades`` gets the ``X-Plugin-Id`` of each
    connection it upgrades, ``extensions`` the ``Sec-WebSocket-Extensions`` it answered
    each with (None: none)."""
    async with Dispatcher(plugins or _manifest()) as dispatcher:
        app = create_app(dispatcher)

        async def count(request: web.Request, response: web.StreamResponse) -> None:
            if response.status != 101:
                return
            if upgrades is not None:
                upgrades.append(request.headers.get(PLUGIN_ID_HEADER, ""))
            if extensions is not None:
                extensions.append(response.headers.get("Sec-WebSocket-Extensions"))

        app.on_response_prepare.append(count)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield dispatcher, f"ws://127.0.0.1:{port}/v1/plugins/connect"
        finally:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def plugins(url: str, count: int, **options: Any) -> AsyncIterator[list[SocketPlugin]]:
    """``count`` plugin processes' worth of SDK dialers, each its own SocketPlugin."""
    made = [SocketPlugin() for _ in range(count)]
    tasks = [
        dial_in(
            plugin,
            url,
            plugin_id=options.get("plugin_id", "sock"),
            version=options.get("version", "1.0.0"),
            token=options.get("token", TOKEN),
        )
        for plugin in made
    ]
    try:
        yield made
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def dial_in(
    plugin: Any, url: str, *, plugin_id: str = "sock", version: str = "1.0.0", token: str = TOKEN
) -> asyncio.Future[None]:
    """The SDK's ``dial`` of ``plugin`` to the gateway at ``url``, redialling soon."""
    return asyncio.ensure_future(
        dial(
            PluginHost(plugin),
            url,
            plugin_id=plugin_id,
            version=version,
            token=token,
            initial_backoff=0.02,
            max_backoff=0.2,
        )
    )


def connected(dispatcher: Dispatcher) -> int:
    provider: Any = dispatcher.providers["websocket"]
    return len([c for c in provider.inbound.all() if c.plugin_id == "sock"])


async def until(condition: Any, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state of other objects, polled
            await asyncio.sleep(0.01)


async def instances(dispatcher: Dispatcher, count: int) -> None:
    """Wait until the fleet has ``count`` instances that take calls."""
    target = dispatcher.manifest.plugins[0].target
    assert dispatcher.fleets is not None and target is not None
    fleet = dispatcher.fleets.fleets[target.key]
    await until(lambda: len([i for i in fleet.instances if not i.leaving]) == count)


async def instances_in_all(dispatcher: Dispatcher, count: int) -> None:
    """Wait until the dispatcher's fleets have ``count`` instances that take calls, in all."""
    assert dispatcher.fleets is not None
    fleets = list(dispatcher.fleets.fleets.values())
    await until(
        lambda: sum(len([i for i in f.instances if not i.leaving]) for f in fleets) == count
    )


async def test_connected_plugins_are_instances_the_balancer_spreads_calls_over() -> None:
    async with gateway() as (dispatcher, url), plugins(url, 3) as made:
        await until(lambda: connected(dispatcher) == 3)
        await instances(dispatcher, 3)
        results = await asyncio.gather(
            *(dispatcher.call("sock", "sleep", {"seconds": 0.05, "value": i}) for i in range(60))
        )
        assert results == list(range(60))
        assert all(plugin.ran for plugin in made)  # every instance took calls
        assert sum(len(plugin.ran) for plugin in made) == 60
        assert [c async for c in dispatcher.stream("sock", "count", {"n": 3})] == [0, 1, 2]
        reports = [r for r in await dispatcher.health() if r.plugin == "sock"]
        assert sum(1 for r in reports if r.health.ok and r.state == "healthy") == 3


async def test_a_plugin_that_drops_leaves_the_fleet_and_rejoins_on_reconnect() -> None:
    async with gateway() as (dispatcher, url):
        provider: Any = dispatcher.providers["websocket"]
        async with plugins(url, 1):
            await until(lambda: connected(dispatcher) == 1)
            await instances(dispatcher, 1)
            call = asyncio.ensure_future(dispatcher.call("sock", "sleep", {"seconds": 5}))
            await asyncio.sleep(0.2)
            (connection,) = provider.inbound.all()
            await connection.channel.socket.close()  # the connection drops mid-call
            with pytest.raises(TargetUnavailable) as raised:
                await call
            assert raised.value.details["stage"] == "in_flight"
            await until(lambda: connected(dispatcher) == 1)  # the SDK dialled again
            await instances(dispatcher, 1)
            assert await dispatcher.call("sock", "echo", {"value": "back"}) == "back"
        await until(lambda: connected(dispatcher) == 0)
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("sock", "echo", {"value": "nobody"}, timeout=1)


async def test_a_host_event_reaches_only_the_connections_of_the_version_it_names() -> None:
    """Two versions of one plugin with equal inbound targets, as in a rollout: a host
    event published to one version reaches that version's connections alone."""
    entry = {
        "id": "sock",
        "target": {"provider": "websocket", "mode": "inbound", "token": TOKEN},
        "methods": {"echo": {}},
    }
    both = manifest({**entry, "version": "1.0.0"}, {**entry, "version": "2.0.0"})
    async with (
        gateway(both) as (dispatcher, url),
        plugins(url, 1, version="1.0.0") as (first,),
        plugins(url, 1, version="2.0.0") as (second,),
    ):
        await until(lambda: connected(dispatcher) == 2)
        await instances_in_all(dispatcher, 2)
        await dispatcher.publish("sock", "ping", "to 1", version="1.0.0")
        await dispatcher.publish("sock", "ping", "to 2", version="2.0.0")
        # Then one last event each: a connection delivers in order, so once each plugin
        # has its last, it has everything it was going to get.
        await dispatcher.publish("sock", "ping", "last", version="1.0.0")
        await dispatcher.publish("sock", "ping", "last", version="2.0.0")
        await until(lambda: ("ping", "last") in first.received)
        await until(lambda: ("ping", "last") in second.received)
    assert first.received == [("ping", "to 1"), ("ping", "last")]
    assert second.received == [("ping", "to 2"), ("ping", "last")]


class VersionedPlugin(SocketPlugin):
    """A SocketPlugin that answers with the version it connected as."""

    def __init__(self, version: str) -> None:
        super().__init__()
        self.version = version

    async def who(self, n: int = 0) -> str:
        self.ran.append(current_context().get("request_id", ""))
        return self.version

    who_batched = who

    async def whos(self, n: int) -> AsyncIterator[str]:
        for _ in range(n):
            yield self.version


def _versions_manifest(*versions: str, twin: bool = False) -> Any:
    """``sock`` at each of ``versions`` (and, with ``twin``, a plugin ``twin``), every one
    on an equal inbound target: one token, one mode, nothing else."""
    entry = {
        "id": "sock",
        "target": {"provider": "websocket", "mode": "inbound", "token": TOKEN},
        "defaults": {"timeout_ms": 5_000},
        "methods": {
            "who": {},
            "who_batched": {"batch": {"max_size": 8, "max_wait_ms": 5}},
            "whos": {},
        },
    }
    entries = [{**entry, "version": version} for version in versions]
    if twin:
        entries.append({**entry, "id": "twin", "version": "1.0.0"})
    return manifest(*entries)


@contextlib.asynccontextmanager
async def versioned(
    url: str, version: str, count: int, plugin_id: str = "sock"
) -> AsyncIterator[list[VersionedPlugin]]:
    made = [VersionedPlugin(version) for _ in range(count)]
    tasks = [dial_in(plugin, url, plugin_id=plugin_id, version=version) for plugin in made]
    try:
        yield made
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def connected_as(dispatcher: Dispatcher, plugin_id: str, version: str) -> int:
    provider: Any = dispatcher.providers["websocket"]
    return len(
        [c for c in provider.inbound.all() if (c.plugin_id, c.version) == (plugin_id, version)]
    )


def test_an_inbound_target_is_the_plugin_versions_own_whatever_the_manifest_writes() -> None:
    """Loading gives each inbound target (a plugin's, a method's) its plugin version; one
    written to claim another's is given its own all the same, and a dial target takes none."""
    inbound = {"provider": "websocket", "mode": "inbound", "token": TOKEN}
    loaded = manifest(
        {"id": "sock", "version": "1.0.0", "target": inbound, "methods": {"who": {}}},
        {
            "id": "sock",
            "version": "2.0.0",
            "target": {**inbound, "plugin": "sock@1.0.0"},
            "methods": {"who": {}, "whos": {"target": inbound}},
        },
    )
    first, second = loaded.plugins
    assert [t.plugin for t in first.targets()] == ["sock@1.0.0"]
    assert [t.plugin for t in second.targets()] == ["sock@2.0.0"]  # one target, both methods
    assert first.target_of("who").key != second.target_of("who").key
    with pytest.raises(ManifestError, match="plugin is set by the dispatcher"):
        manifest(
            {
                "id": "sock",
                "version": "1.0.0",
                "target": {"provider": "websocket", "url": "ws://127.0.0.1:1/", "plugin": "x"},
                "methods": {"who": {}},
            }
        )


async def test_calls_batches_and_streams_reach_only_the_connections_of_their_version() -> None:
    """Two versions of one plugin with equal inbound targets, as in a rollout: each
    version's calls, batches and streams go to that version's connections, never the
    other's, however the balancer spreads them."""
    async with (
        gateway(_versions_manifest("1.0.0", "2.0.0")) as (dispatcher, url),
        versioned(url, "1.0.0", 2) as first,
        versioned(url, "2.0.0", 2) as second,
    ):
        await until(lambda: connected_as(dispatcher, "sock", "1.0.0") == 2)
        await until(lambda: connected_as(dispatcher, "sock", "2.0.0") == 2)
        await instances_in_all(dispatcher, 4)
        for method in ("who", "who_batched"):
            for version in ("1.0.0", "2.0.0"):
                answers = await asyncio.gather(
                    *(dispatcher.call("sock", method, {"n": i}, version=version) for i in range(40))
                )
                assert set(answers) == {version}, (method, version)
        for version in ("1.0.0", "2.0.0"):
            for _ in range(8):
                chunks = [
                    c async for c in dispatcher.stream("sock", "whos", {"n": 3}, version=version)
                ]
                assert chunks == [version] * 3
        # Every connection of each version took calls: the balancer spread them over its own.
        assert all(plugin.ran for plugin in [*first, *second])
        # Health lists, under each version, the instances of its own connections.
        provider: Any = dispatcher.providers["websocket"]
        for report in await dispatcher.health():
            if report.state != "source":
                key = report.target.removeprefix("websocket inbound ")
                assert provider.inbound.get(key).version == report.version, report
        reports = [r for r in await dispatcher.health() if r.state != "source"]
        assert sorted(r.version for r in reports) == ["1.0.0"] * 2 + ["2.0.0"] * 2
        # So do the fleets' stats (and the metrics made of them): one fleet per version,
        # its own connections' calls.
        fleets = dispatcher.stats()["fleets"]
        for version in ("1.0.0", "2.0.0"):
            instances = fleets[f"websocket inbound of sock@{version}"]["instances"]
            assert len(instances) == 2
            for each in instances:
                key = each["target"].removeprefix("websocket inbound ")
                assert provider.inbound.get(key).version == version and each["calls"] > 0


async def test_a_version_with_no_connection_fails_its_calls_typed_not_on_another() -> None:
    """With only 2.0.0 (of ``sock``) connected, calls to 1.0.0 and to another plugin
    whose inbound target is equal fail as a call with nothing connected fails; the
    connection of 2.0.0 never sees them."""
    async with (
        gateway(_versions_manifest("1.0.0", "2.0.0", twin=True)) as (dispatcher, url),
        versioned(url, "2.0.0", 1) as (second,),
    ):
        await until(lambda: connected_as(dispatcher, "sock", "2.0.0") == 1)
        spec = next(p for p in dispatcher.manifest.plugins if p.version == "2.0.0")
        assert spec.target is not None and dispatcher.fleets is not None
        await until(lambda: len(dispatcher.fleets.fleets[spec.target.key].instances) == 1)
        assert await dispatcher.call("sock", "who", {}, version="2.0.0") == "2.0.0"
        ran = len(second.ran)
        for plugin, version in (("sock", "1.0.0"), ("twin", "1.0.0")):
            for method in ("who", "who_batched"):
                with pytest.raises(TargetUnavailable) as raised:
                    await dispatcher.call(plugin, method, {}, version=version, timeout=1)
                assert raised.value.retryable  # as with nothing connected at all
            with pytest.raises(TargetUnavailable):
                async for _ in dispatcher.stream(plugin, "whos", {"n": 1}, version=version):
                    pass
        assert len(second.ran) == ran
        instances = [r for r in await dispatcher.health() if r.state != "source"]
        assert [(r.plugin, r.version) for r in instances] == [("sock", "2.0.0")]


async def test_wrong_tokens_and_claims_of_another_plugins_id_are_refused() -> None:
    async with gateway() as (dispatcher, url):
        host = PluginHost(SocketPlugin())
        with pytest.raises(Refused) as wrong:
            await dial(host, url, plugin_id="sock", version="1.0.0", token="guess")
        assert wrong.value.status == 401
        with pytest.raises(Refused) as claim:  # other's token, sock's id
            await dial(
                PluginHost(SocketPlugin()),
                url,
                plugin_id="sock",
                version="1.0.0",
                token=OTHER_TOKEN,
            )
        assert claim.value.status == 401
        with pytest.raises(Refused) as unknown:
            await dial(
                PluginHost(SocketPlugin()), url, plugin_id="nope", version="1.0.0", token=TOKEN
            )
        # An id no inbound target names is refused as a known one with a wrong token is,
        # word for word, so which plugins take connections cannot be probed.
        assert unknown.value.status == 401 and str(unknown.value) == str(wrong.value)
        assert connected(dispatcher) == 0


async def test_a_hello_that_names_another_plugin_closes_the_connection() -> None:
    async with gateway() as (dispatcher, url), aiohttp.ClientSession() as client:
        headers = {"X-Plugin-Id": "sock", "Authorization": f"Bearer {TOKEN}"}
        async with client.ws_connect(url, headers=headers) as ws:
            await ws.send_bytes(hello_frame("other", "1.0.0", ["echo"]))
            message = await ws.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 4403
        async with client.ws_connect(url, headers=headers) as ws:
            await ws.send_bytes(hello_frame("sock", "2.0.0", ["echo"]))  # another version
            await ws.receive(timeout=10)
            assert ws.close_code == 4403
        async with client.ws_connect(url, headers=headers) as ws:
            await ws.send_str("not a hello")
            await ws.receive(timeout=10)
            assert ws.close_code == 4400
        assert connected(dispatcher) == 0


@pytest.mark.parametrize(
    ("protocol", "code", "reason"),
    [
        (2, 4403, "this gateway speaks protocol 1; the hello said 2"),
        (True, 4400, "broke the protocol: hello's 'protocol' must be an integer, not true"),
        (1.0, 4400, "broke the protocol: hello's 'protocol' must be an integer, not 1.0"),
    ],
    ids=["another-version", "true", "float"],
)
async def test_a_hello_in_a_protocol_the_gateway_does_not_speak_is_refused(
    protocol: Any, code: int, reason: str
) -> None:
    """Before: a hello in protocol 2 was closed 4400, which every SDK's dial takes for a
    slow link and dials again, with the same hello, for ever (the Python SDK saying so at
    INFO); and ``true`` or ``1.0`` were taken for protocol 1 and welcomed. Now another
    version is refused with 4403 and a reason naming both versions, which ends the SDKs'
    dial with that line, and a protocol that is not an integer is a malformed hello."""
    hello = orjson.loads(hello_frame("sock", "1.0.0", ["echo"]))
    hello["protocol"] = protocol
    async with gateway() as (dispatcher, url), aiohttp.ClientSession() as client:
        headers = {"X-Plugin-Id": "sock", "Authorization": f"Bearer {TOKEN}"}
        async with client.ws_connect(url, headers=headers) as ws:
            await ws.send_bytes(orjson.dumps(hello))
            message = await ws.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE, message
            assert (ws.close_code, message.extra) == (code, reason)
        assert connected(dispatcher) == 0


@pytest.mark.parametrize(
    ("first_frame", "code"),
    [
        (hello_frame("插件" * 30, "1.0.0", ["echo"]), 4403),  # another id, not ASCII
        (hello_frame("sock", "版本" * 20, ["echo"]), 4403),  # another version
        (orjson.dumps({"type": "问候" * 20}), 4400),  # no hello at all
    ],
)
async def test_a_refused_hello_not_in_ascii_is_closed_with_its_code(
    first_frame: bytes, code: int
) -> None:
    """The close reason quotes what the plugin said; a close frame holds 123 bytes of it.
    Before: the reason was cut at 120 characters, not bytes, and a frame of up to 360
    bytes went out, which the plugin's WebSocket refuses as a protocol error (1002): it
    never read 4403, so the SDK's ``connect`` dialled again for ever instead of exiting
    with the refusal."""
    async with gateway() as (dispatcher, url), aiohttp.ClientSession() as client:
        headers = {"X-Plugin-Id": "sock", "Authorization": f"Bearer {TOKEN}"}
        async with client.ws_connect(url, headers=headers) as ws:
            await ws.send_bytes(first_frame)
            message = await ws.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE, message
            assert ws.close_code == code
            assert 0 < len(message.extra.encode()) <= 123
        assert connected(dispatcher) == 0


async def test_a_hello_closed_4403_ends_the_dial_without_dialling_again() -> None:
    """Admitted at the upgrade, closed 4403 on its hello (here by a server that closes
    every hello so, as the gateway does a hello naming another plugin than the one it
    admitted): the next connection would send the same hello and get the same close, so
    ``dial`` raises ``Refused`` with the gateway's reason at once, as for a 403 at the
    upgrade, instead of redialling for ever."""
    reason = "admitted as version 2.0.0, said '1.0.0'"
    async with closing_gateway(4403, reason) as (url, hellos):
        dialling = dial(
            PluginHost(SocketPlugin()), url, plugin_id="sock", version="1.0.0", token=TOKEN
        )
        with pytest.raises(Refused) as refused:
            await asyncio.wait_for(dialling, 3)
    assert len(hellos) == 1  # one connection: not dialled again
    assert refused.value.status == 4403
    assert refused.value.reason == reason
    assert str(refused.value) == f"the gateway refused the connection (4403): {reason}"


#: A hostile gateway's close reason: clear the operator's screen, then forge a log line.
HOSTILE_REASON = "\x1b[2J\nERROR forged line \u202e"


async def test_a_hostile_close_reason_is_shown_escaped_in_refused_and_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A close reason is the peer's text, printed to the operator's terminal (``connect``
    prints ``Refused``) and log: its control characters (ESC, a newline, a bidi override)
    are escaped, not sent to the terminal as they are. Before: as they came."""
    caplog.set_level(logging.INFO, logger="linchkit_plugin.websocket")
    async with closing_gateway(4403, HOSTILE_REASON) as (url, _):
        dialling = dial(
            PluginHost(SocketPlugin()), url, plugin_id="sock", version="1.0.0", token=TOKEN
        )
        with pytest.raises(Refused) as refused:
            await asyncio.wait_for(dialling, 3)
    assert refused.value.reason == "\\x1b[2J\\nERROR forged line \\u202e"
    assert str(refused.value).isprintable()
    async with closing_gateway(1011, HOSTILE_REASON) as (url, hellos):
        dialling = asyncio.ensure_future(
            dial(PluginHost(SocketPlugin()), url, plugin_id="sock", version="1.0.0")
        )
        try:
            await until(lambda: len(hellos) >= 2, timeout=10)
        finally:
            dialling.cancel()
            await asyncio.gather(dialling, return_exceptions=True)
    (logged, *_) = [r.getMessage() for r in caplog.records if "(1011" in r.getMessage()]
    assert logged.endswith("(1011: \\x1b[2J\\nERROR forged line \\u202e); reconnecting")
    assert logged.isprintable()
    # The longest reason a close frame holds (123 bytes), all ESC: cut once escaped.
    async with closing_gateway(4403, "\x1b" * 123) as (url, _):
        dialling = dial(
            PluginHost(SocketPlugin()), url, plugin_id="sock", version="1.0.0", token=TOKEN
        )
        with pytest.raises(Refused) as refused:
            await asyncio.wait_for(dialling, 3)
    assert refused.value.reason == "\\x1b" * 50 + "…"


async def test_a_dial_naming_no_version_is_admitted_as_the_version_its_hello_names() -> None:
    """``dial(version="")`` says the plugin class's version (1.0.0) in its upgrade headers
    as in its hello, so the gateway admits that version, not the highest it serves.
    Before: the header was empty, the gateway admitted 2.0.0, and closed the connection
    4403 on the hello naming 1.0.0, a final refusal."""
    entry = {
        "id": "sock",
        "target": {"provider": "websocket", "mode": "inbound", "token": TOKEN},
        "methods": {"echo": {}},
    }
    both = manifest({**entry, "version": "1.0.0"}, {**entry, "version": "2.0.0"})
    upgrades: list[str] = []
    async with gateway(both, upgrades=upgrades) as (dispatcher, url):
        dialling = asyncio.ensure_future(
            dial(PluginHost(SocketPlugin()), url, plugin_id="sock", version="", token=TOKEN)
        )
        try:
            await until(lambda: connected(dispatcher) == 1 or dialling.done(), timeout=5)
            if dialling.done():
                dialling.result()  # the refusal, raised
            await instances_in_all(dispatcher, 1)
            assert await dispatcher.call("sock", "echo", {"value": 1}, version="1.0.0") == 1
        finally:
            dialling.cancel()
            await asyncio.gather(dialling, return_exceptions=True)
    assert upgrades == ["sock"]


async def test_a_dial_naming_no_version_of_a_version_not_served_is_refused_at_the_upgrade() -> None:
    """The gateway serves 2.0.0 alone; the plugin class is 1.0.0: refused before the
    upgrade, as the plugin's own version is not served there (before: admitted as 2.0.0
    and closed on its hello)."""
    served = {
        "id": "sock",
        "version": "2.0.0",
        "target": {"provider": "websocket", "mode": "inbound", "token": TOKEN},
        "methods": {"echo": {}},
    }
    upgrades: list[str] = []
    async with gateway(manifest(served), upgrades=upgrades) as (dispatcher, url):
        dialling = dial(PluginHost(SocketPlugin()), url, plugin_id="sock", version="", token=TOKEN)
        with pytest.raises(Refused) as refused:
            await asyncio.wait_for(dialling, 3)
        assert connected(dispatcher) == 0
    assert upgrades == []  # never upgraded
    assert refused.value.status == 401, refused.value  # no target of sock@1.0.0 takes it


async def test_a_malformed_version_refused_400_at_the_upgrade_ends_the_dial() -> None:
    """A version off the gateway's pattern is a 400 at the upgrade, which the same dial
    would get again: ``dial`` raises ``Refused`` at once. Before, it dialled again for ever,
    logging "the gateway answered 400; retrying" each time."""
    async with gateway() as (dispatcher, url):
        dialling = dial(
            PluginHost(SocketPlugin()), url, plugin_id="sock", version="1.0 beta", token=TOKEN
        )
        with pytest.raises(Refused) as refused:
            await asyncio.wait_for(dialling, 3)
        assert connected(dispatcher) == 0
    assert refused.value.status == 400


async def test_connect_exits_1_naming_the_reason_of_a_4403_without_dialling_again() -> None:
    """``dispatcher-plugin connect`` as a process: a close 4403 after its hello is final,
    as a 401 at the upgrade is: status 1 and the gateway's reason, one connection."""
    reason = "admitted as version 2.0.0, said '1.0.0'"
    async with closing_gateway(4403, reason) as (url, hellos):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "linchkit_plugin.cli", "connect", "socket_plugin:SocketPlugin",
            "--url", url, "--id", "sock", "--version", "1.0.0",
            "--path", str(ROOT / "tests" / "plugins"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(process.communicate(), 20)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 1 and out == b""
    assert err.decode().strip().splitlines()[-1] == (
        f"connect: the gateway refused the connection (4403): {reason}"
    )
    assert [(hello["id"], hello["version"]) for hello in hellos] == [("sock", "1.0.0")]


@pytest.mark.parametrize("code", [4400, 1001, 1008, 1011, 1012])
async def test_every_other_close_after_the_hello_is_dialled_again(code: int) -> None:
    """4400 (a bad hello, or none within 10 s: maybe a slow link), a reload's 1012 and
    1001, and whatever else the gateway closes with are not refusals: ``dial`` goes on."""
    async with closing_gateway(code, "closed by the test") as (url, hellos):
        dialling = asyncio.ensure_future(
            dial(
                PluginHost(SocketPlugin()),
                url,
                plugin_id="sock",
                version="1.0.0",
                initial_backoff=0.01,
                max_backoff=0.05,
            )
        )
        try:
            await until(lambda: len(hellos) >= 3, timeout=10)
            assert not dialling.done()
        finally:
            dialling.cancel()
            await asyncio.gather(dialling, return_exceptions=True)


async def test_an_upgrade_without_a_plugin_id_or_credentials_is_refused_before_upgrading() -> None:
    async with gateway() as (_, url), aiohttp.ClientSession() as client:
        http = url.replace("ws://", "http://")
        async with client.get(http) as answer:
            assert answer.status == 400
        async with client.get(http, headers={"X-Plugin-Id": "sock"}) as answer:
            assert answer.status == 401
            assert (await answer.json())["error"]["type"] == "unauthorized"


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer \xff\xfe", b"Bearer " + "s\u00f6ck".encode(), b"\xff\xfe"],
    ids=["not-utf8", "non-ascii", "no-scheme"],
)
async def test_a_token_that_is_not_ascii_is_refused_401_not_a_500(
    authorization: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Header bytes that are not UTF-8 reach the handler as lone surrogates; the token's
    comparison encoded them strictly and answered 500 with a traceback."""
    async with (
        Dispatcher(_manifest()) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
        raw_connection(server.url) as (reader, writer),
    ):
        writer.write(
            b"GET /v1/plugins/connect HTTP/1.1\r\nHost: x\r\nX-Plugin-Id: sock\r\n"
            b"Authorization: " + authorization + b"\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        status, answer = await read_answer(reader)
    assert status == 401
    body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "unauthorized"
    assert "Traceback" not in caplog.text
    assert connected(dispatcher) == 0


async def test_the_command_line_serves_and_dials(tmp_path: Any) -> None:
    """``dispatcher-plugin serve --websocket`` (dial mode) and ``dispatcher-plugin
    connect`` (reverse mode), as processes."""
    import sys

    from tests.conftest import ROOT

    plugins_dir = str(ROOT / "tests" / "plugins")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    async with gateway() as (dispatcher, url):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "linchkit_plugin.cli", "connect", "socket_plugin:SocketPlugin",
            "--url", url, "--id", "sock", "--version", "1.0.0",
            "--token-file", str(token_file), "--path", plugins_dir,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await until(lambda: connected(dispatcher) == 1, timeout=30)
            await instances(dispatcher, 1)
            assert await dispatcher.call("sock", "echo", {"value": [1, 2]}) == [1, 2]
        finally:
            process.terminate()
            await process.wait()
        await until(lambda: connected(dispatcher) == 0)
        refused = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "linchkit_plugin.cli", "connect", "socket_plugin:SocketPlugin",
            "--url", url, "--id", "other", "--version", "1.0.0",
            "--token-file", str(token_file), "--path", plugins_dir,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(refused.communicate(), 30)
        assert refused.returncode == 1
        assert b"401" in stderr and TOKEN.encode() not in stderr


@pytest.mark.parametrize(
    "url", ["not-a-url", "ftp://127.0.0.1/x", "ws://", "ws://127.0.0.1:99999/x"]
)
async def test_a_url_that_can_never_reach_a_gateway_is_refused_before_anything_runs(
    url: str,
) -> None:
    """Not retried for ever: refused before the plugin's lifecycle starts, by ``dial`` and
    by ``dispatcher-plugin connect`` (status 2, one line)."""
    host = PluginHost(SocketPlugin())
    before = host.state
    with pytest.raises(ValueError, match="--url must be a ws:// or wss:// URL"):
        await dial(host, url, plugin_id="sock", version="1.0.0")
    assert host.state == before  # init and start never ran
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "linchkit_plugin.cli", "connect", "socket_plugin:SocketPlugin",
        "--url", url, "--id", "sock", "--version", "1.0.0",
        "--path", str(ROOT / "tests" / "plugins"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2 and out == b""
    assert err.decode().strip() == (
        "connect: --url must be a ws:// or wss:// URL"
        f" (e.g. ws://127.0.0.1:8080/v1/plugins/connect), not {url!r}"
    )


# -- a reload that leaves a version's inbound target out -------------------------------------

SOCK = {
    "id": "sock",
    "version": "1.0.0",
    "target": {"provider": "websocket", "mode": "inbound", "token": TOKEN},
    "defaults": {"timeout_ms": 5_000},
    "methods": {"echo": {}, "sleep": {}},
}
OTHER = {
    "id": "other",
    "version": "1.0.0",
    "target": {"provider": "websocket", "mode": "inbound", "token": OTHER_TOKEN},
    "methods": {"echo": {}},
}
#: What a reload makes of ``sock@1.0.0`` (``other`` is kept in each), and how the
#: connection of ``sock@1.0.0`` is closed then: None, not at all.
RELOADS = {
    "removed": ([OTHER], 1001, "a reload removed sock@1.0.0; no version of it takes"),
    "replaced by 2.0.0": (
        [{**SOCK, "version": "2.0.0"}, OTHER],
        1012,
        "a reload replaced sock@1.0.0; connect again",
    ),
    "its target changed": (
        [{**SOCK, "target": {**SOCK["target"], "max_in_flight": 64}}, OTHER],
        1012,
        "a reload replaced sock@1.0.0; connect again",
    ),
    "a policy changed": ([{**SOCK, "defaults": {"timeout_ms": 6_000}}, OTHER], None, ""),
}


@contextlib.asynccontextmanager
async def one_connection(
    url: str, plugin_id: str, token: str, *, compress: int = 0
) -> AsyncIterator[PluginSession]:
    """One connection of a real plugin (the SDK's session serving a SocketPlugin, version
    1.0.0), which is not dialled again when it closes: the test reads how it ended.
    ``compress``: the permessage-deflate window its upgrade offers (0: none)."""
    host = PluginHost(SocketPlugin())
    await host.open({})
    headers = {
        PLUGIN_ID_HEADER: plugin_id,
        PLUGIN_VERSION_HEADER: "1.0.0",
        "Authorization": f"Bearer {token}",
    }
    async with aiohttp.ClientSession() as client:
        socket = await client.ws_connect(url, headers=headers, decode_text=False, compress=compress)
        hello = hello_of(host, plugin_id, "1.0.0")
        session = PluginSession(host, socket, EventOutbox(), hello=hello)
        running = asyncio.ensure_future(session.run())
        try:
            yield session
        finally:
            await socket.close()
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await host.close()


def keys_of(dispatcher: Dispatcher, plugin_id: str) -> list[str]:
    provider: Any = dispatcher.providers["websocket"]
    return [c.key for c in provider.inbound.all() if c.plugin_id == plugin_id]


@pytest.mark.parametrize("change", list(RELOADS))
async def test_a_reload_that_leaves_a_versions_target_out_closes_its_connections(
    change: str,
) -> None:
    """Connected as sock@1.0.0, a call in flight, then a reload: once the call has been
    answered, the connection is closed with a code and reason that say why (1012: the id
    is served on another target now, connect again; 1001: it is gone). The connection of
    a version the reload keeps, and of one whose target stays, is not touched."""
    plugins, code, reason = RELOADS[change]
    async with (
        gateway(manifest(SOCK, OTHER)) as (dispatcher, url),
        one_connection(url, "sock", TOKEN) as sock,
        one_connection(url, "other", OTHER_TOKEN) as other,
    ):
        await until(lambda: len(keys_of(dispatcher, "sock") + keys_of(dispatcher, "other")) == 2)
        await instances_in_all(dispatcher, 2)
        kept = keys_of(dispatcher, "other")
        plugin: Any = sock.host.plugin
        call = asyncio.ensure_future(
            dispatcher.call("sock", "sleep", {"seconds": 0.5, "value": "answered"})
        )
        await until(lambda: bool(plugin.ran))  # in flight on the connection
        await dispatcher.reload(manifest(*plugins), grace=10)
        assert await call == "answered"  # drained first, not cut off by the close
        if code is None:
            assert not sock.ended.is_set() and keys_of(dispatcher, "sock") != []
            assert await dispatcher.call("sock", "echo", {"value": 1}) == 1
        else:
            async with asyncio.timeout(10):
                await sock.ended.wait()
            assert sock.socket.close_code == code
            assert sock.close_reason.startswith(reason)
            assert keys_of(dispatcher, "sock") == []
        assert not other.ended.is_set() and keys_of(dispatcher, "other") == kept
        assert await dispatcher.call("other", "echo", {"value": "still"}) == "still"


@pytest.mark.parametrize("change", ["removed", "replaced by 2.0.0", "its target changed"])
async def test_the_sdk_dials_again_after_such_a_close_and_lands_on_what_is_served_now(
    change: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK logs why it was closed and dials again, after 1012 and 1001 alike: a
    version still served on a changed target is admitted to its new fleet and takes
    calls; a version no longer served is refused at the upgrade, and ``dial`` ends there
    (``Refused``) instead of serving nobody."""
    caplog.set_level(logging.INFO, logger="linchkit_plugin.websocket")
    plugins, code, reason = RELOADS[change]
    async with gateway(manifest(SOCK, OTHER)) as (dispatcher, url):
        dialling = dial_in(SocketPlugin(), url)
        try:
            await until(lambda: len(keys_of(dispatcher, "sock")) == 1)
            before = keys_of(dispatcher, "sock")
            await dispatcher.reload(manifest(*plugins), grace=10)
            await until(lambda: f"closed ({code}: {reason}" in caplog.text)
            if change == "its target changed":
                await until(lambda: keys_of(dispatcher, "sock") not in ([], before))
                await instances_in_all(dispatcher, 1)
                assert await dispatcher.call("sock", "echo", {"value": "new"}) == "new"
                assert not dialling.done()
            else:
                with pytest.raises(Refused) as refused:
                    await asyncio.wait_for(dialling, 15)
                assert refused.value.status == 401
        finally:
            dialling.cancel()
            await asyncio.gather(dialling, return_exceptions=True)


async def _reload_given_up_during_a_call(dispatcher: Dispatcher, plugin: Any, to: Any) -> None:
    """Reload ``dispatcher`` to ``to`` while ``plugin`` (sock@1.0.0, connected) runs a
    call, and give that reload up in its wait for the call: its routes swapped, nothing
    after. The call is answered."""
    call = asyncio.ensure_future(
        dispatcher.call("sock", "sleep", {"seconds": 0.5, "value": "answered"})
    )
    await until(lambda: bool(plugin.ran))  # in flight on the connection
    reload = asyncio.ensure_future(dispatcher.reload(to, grace=30))
    await until(lambda: dispatcher.manifest is to)
    reload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reload
    assert await call == "answered"


@pytest.mark.parametrize("change", ["removed", "its target changed"])
async def test_the_next_reload_closes_the_connections_a_reload_given_up_left_open(
    change: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload that leaves the target of sock@1.0.0 out is given up in its wait for a
    call of it (its caller cancelled it, or a newer registry change replaced it): the
    connection is still open. Before, the next reload closed only the connections of
    what it changed itself: the plugin stayed connected, for good, to a dispatcher that
    no longer routes to it (or to a target nothing calls, while its version's new one had
    no instance). Now it closes them as the given-up one would have, and the SDK dials
    again: refused (the version is gone), or admitted to the target it has now."""
    caplog.set_level(logging.INFO, logger="linchkit_plugin.websocket")
    plugins, code, reason = RELOADS[change]
    to = manifest(*plugins)
    async with gateway(manifest(SOCK, OTHER)) as (dispatcher, url):
        plugin = SocketPlugin()
        dialling = dial_in(plugin, url)
        try:
            await until(lambda: len(keys_of(dispatcher, "sock")) == 1)
            await instances_in_all(dispatcher, 1)
            left_open = keys_of(dispatcher, "sock")
            await _reload_given_up_during_a_call(dispatcher, plugin, to)
            assert keys_of(dispatcher, "sock") == left_open
            await dispatcher.reload(to, grace=30)
            await until(lambda: f"closed ({code}: {reason}" in caplog.text, 10)
            if change == "its target changed":
                await until(lambda: keys_of(dispatcher, "sock") not in ([], left_open))
                await instances_in_all(dispatcher, 1)
                assert await dispatcher.call("sock", "echo", {"value": "new"}) == "new"
            else:
                with pytest.raises(Refused) as refused:
                    await asyncio.wait_for(dialling, 15)
                assert refused.value.status == 401
                assert keys_of(dispatcher, "sock") == []
        finally:
            dialling.cancel()
            await asyncio.gather(dialling, return_exceptions=True)


async def test_a_connection_a_reload_given_up_left_open_stays_if_the_next_brings_it_back() -> None:
    """The reload after the given-up one serves sock@1.0.0 again on its target: the
    connection left open is the version's again, not closed for what the given-up
    reload meant to do."""
    async with (
        gateway(manifest(SOCK, OTHER)) as (dispatcher, url),
        one_connection(url, "sock", TOKEN) as sock,
    ):
        await until(lambda: len(keys_of(dispatcher, "sock")) == 1)
        await instances_in_all(dispatcher, 1)
        left_open = keys_of(dispatcher, "sock")
        plugin: Any = sock.host.plugin
        await _reload_given_up_during_a_call(dispatcher, plugin, manifest(OTHER))
        summary = await dispatcher.reload(manifest(SOCK, OTHER), grace=30)
        assert summary["added"] == ["sock@1.0.0"]
        await instances_in_all(dispatcher, 1)
        assert await dispatcher.call("sock", "echo", {"value": "back"}) == "back"
        assert not sock.ended.is_set() and keys_of(dispatcher, "sock") == left_open


async def test_a_close_ends_the_connections_a_reload_given_up_left_open() -> None:
    """No reload after the one given up: the dispatcher's close ends the connection
    (1001: going away), as every other."""
    async with (
        gateway(manifest(SOCK, OTHER)) as (dispatcher, url),
        one_connection(url, "sock", TOKEN) as sock,
    ):
        await until(lambda: len(keys_of(dispatcher, "sock")) == 1)
        await instances_in_all(dispatcher, 1)
        plugin: Any = sock.host.plugin
        await _reload_given_up_during_a_call(dispatcher, plugin, manifest(OTHER))
        assert not sock.ended.is_set()
        await dispatcher.aclose()
        async with asyncio.timeout(10):
            await sock.ended.wait()
        assert sock.socket.close_code == 1001
        assert keys_of(dispatcher, "sock") == []


async def test_a_plugin_admitted_before_such_a_reload_and_saying_hello_after_is_closed() -> None:
    """Admitted at the upgrade as sock@1.0.0, its hello sent only once a reload removed
    that version: closed as the connections open then were, not served in a fleet that
    nothing calls. A later reload that serves the version again admits it again."""
    headers = {
        PLUGIN_ID_HEADER: "sock",
        PLUGIN_VERSION_HEADER: "1.0.0",
        "Authorization": f"Bearer {TOKEN}",
    }
    async with (
        gateway(manifest(SOCK, OTHER)) as (dispatcher, url),
        aiohttp.ClientSession() as client,
    ):
        async with client.ws_connect(url, headers=headers) as ws:
            await dispatcher.reload(manifest(OTHER), grace=10)
            await ws.send_bytes(hello_frame("sock", "1.0.0", ["echo", "sleep"]))
            while (message := await ws.receive(timeout=10)).type != aiohttp.WSMsgType.CLOSE:
                pass  # its welcome, sent before the close
            assert ws.close_code == 1001
            assert message.extra.startswith("a reload removed sock@1.0.0")
        assert keys_of(dispatcher, "sock") == []
        await dispatcher.reload(manifest(SOCK, OTHER), grace=10)
        async with one_connection(url, "sock", TOKEN) as sock:
            await until(lambda: len(keys_of(dispatcher, "sock")) == 1)
            await instances_in_all(dispatcher, 1)
            assert await dispatcher.call("sock", "echo", {"value": "back"}) == "back"
            assert not sock.ended.is_set()


async def test_a_plugin_connected_with_a_token_that_expires_is_closed_then(
    tmp_path: Path,
) -> None:
    """A plugin dialling in is admitted at its upgrade. Checked then only, one admitted by
    a JWT valid for two seconds took calls for as long as its connection lasted; now the
    gateway closes it with 1008 once the token has expired, and its dial back with the
    same token is refused at the upgrade."""
    key = rsa_key("plugin-key")
    write_jwks(tmp_path / "jwks.json", key)
    loaded = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "sock",
                    "version": "1.0.0",
                    "target": {
                        "provider": "websocket",
                        "mode": "inbound",
                        "principal": "billing-service",
                    },
                    "methods": {"echo": {}},
                }
            ],
            "auth": {"jwt": jwt_config("jwks.json", leeway_s=0)},
        },
        base_dir=tmp_path,
    )
    token = key.token(good_claims(exp=int(time.time()) + 2))
    async with gateway(loaded) as (dispatcher, url):
        dialling = dial_in(SocketPlugin(), url, token=token)
        try:
            await until(lambda: connected(dispatcher) == 1)
            assert await dispatcher.call("sock", "echo", {"value": "hi"}) == "hi"
            with pytest.raises(Refused) as refused:
                async with asyncio.timeout(15):
                    await dialling
            assert refused.value.status == 401
            assert connected(dispatcher) == 0
        finally:
            dialling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Refused):
                await dialling


# -- compress: as the target says, as a dialled plugin's connection -------------------------


@pytest.mark.parametrize(
    ("written", "negotiated"),
    [({}, False), ({"compress": False}, False), ({"compress": True}, True)],
    ids=["unset", "false", "true"],
)
async def test_the_gateway_compresses_a_plugins_connection_as_its_target_says(
    written: dict[str, bool], negotiated: bool
) -> None:
    """A plugin's upgrade offers permessage-deflate (aiohttp's ``compress=15``, as every
    SDK's ``connect`` does). Before: the gateway took the offer whatever
    the target said (aiohttp's default), so ``compress: false`` (the default) deflated
    every message of the connection all the same. Now it is negotiated only where the
    target says ``compress: true``, as a dialled plugin's connection offers it only then;
    calls go through the connection either way."""
    loaded = manifest(
        {
            "id": "sock",
            "version": "1.0.0",
            "target": {"provider": "websocket", "mode": "inbound", "token": TOKEN, **written},
            "defaults": {"timeout_ms": 5_000},
            "methods": {"echo": {}, "count": {}},
        }
    )
    extensions: list[str | None] = []
    big = "deflate me " * 2_000  # 22 kB of text: deflated to a few hundred bytes
    async with (
        gateway(loaded, extensions=extensions) as (dispatcher, url),
        one_connection(url, "sock", TOKEN, compress=15) as sock,
    ):
        await until(lambda: connected(dispatcher) == 1)
        await instances(dispatcher, 1)
        assert await dispatcher.call("sock", "echo", {"value": big}) == big
        assert [c async for c in dispatcher.stream("sock", "count", {"n": 3})] == [0, 1, 2]
        assert bool(sock.socket.compress) is negotiated
    (extension,) = extensions
    if negotiated:
        assert extension is not None and extension.startswith("permessage-deflate")
    else:
        assert extension is None


@pytest.mark.parametrize("compress", [True, False], ids=["true", "false"])
async def test_the_sdks_dial_offers_deflate_and_the_target_decides(compress: bool) -> None:
    """The SDK's ``dial`` (what ``dispatcher-plugin connect`` runs) offers permessage-deflate
    on every upgrade, and the gateway takes it where the target says ``compress: true``.
    Before, ``dial`` never offered it: the test above offered it by hand, and ``compress:
    true`` deflated nothing for a real Python plugin."""
    loaded = manifest(
        {
            "id": "sock",
            "version": "1.0.0",
            "target": {
                "provider": "websocket",
                "mode": "inbound",
                "token": TOKEN,
                "compress": compress,
            },
            "defaults": {"timeout_ms": 5_000},
            "methods": {"echo": {}},
        }
    )
    extensions: list[str | None] = []
    big = "deflate me " * 2_000
    async with gateway(loaded, extensions=extensions) as (dispatcher, url), plugins(url, 1):
        await instances(dispatcher, 1)
        assert await dispatcher.call("sock", "echo", {"value": big}) == big
        provider: Any = dispatcher.providers["websocket"]
        (connection,) = provider.inbound.all()
        assert connection.channel.socket.compress == (15 if compress else 0)
    (extension,) = extensions
    assert (extension or "").startswith("permessage-deflate") is compress


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ws://127.0.0.1:1/v1/plugins/connect", "ws://127.0.0.1:1/v1/plugins/connect"),
        (f"wss://gw.example/c?token={TOKEN}&region=eu", "wss://gw.example/c?token=***&region=***"),
        (f"ws://me:{TOKEN}@gw.example/c?debug#frag", "ws://me:***@gw.example/c?***"),
        (f"ws://{TOKEN}@gw.example:8080/c", "ws://***@gw.example:8080/c"),
        # An item without `=` is a value itself, as the dispatcher's masked_url reads it:
        # before, `?TOKEN` showed as written.
        (f"wss://gw.example/c?{TOKEN}&region=eu", "wss://gw.example/c?***&region=***"),
        (f"ws://gw.example/c#{TOKEN}", "ws://gw.example/c"),
    ],
)
def test_masked_url_hides_the_password_and_the_query_s_values(url: str, shown: str) -> None:
    assert masked_url(url) == shown
    assert TOKEN not in masked_url(url)
    # The dispatcher's rule, but for the fragment, which the SDK leaves out.
    assert masked_url(url) == dispatcher_masked_url(url.partition("#")[0])


async def test_dial_never_logs_the_gateway_s_token(caplog: pytest.LogCaptureFixture) -> None:
    """Before, ``cannot reach`` named the URL whole, at INFO, with each retry: a token in
    its query or userinfo went to the log."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"ws://me:{TOKEN}@127.0.0.1:{port}/v1/plugins/connect?token={TOKEN}"
    stopping = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stopping.set)
    with caplog.at_level(logging.INFO, logger="linchkit_plugin"):
        await asyncio.wait_for(
            dial(
                PluginHost(SocketPlugin()),
                url,
                plugin_id="sock",
                version="1.0.0",
                stopping=stopping,
            ),
            30,
        )
    said = "\n".join(record.getMessage() for record in caplog.records)
    assert f"cannot reach ws://me:***@127.0.0.1:{port}/v1/plugins/connect?token=***" in said, said
    assert TOKEN not in said
    with pytest.raises(ValueError, match="--url must be") as refused:
        checked_gateway_url(f"ftp://gw.example/?token={TOKEN}")
    assert TOKEN not in str(refused.value) and "token=***" in str(refused.value)
