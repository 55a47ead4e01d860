"""Methods the manifest routes to a plugin that does not serve them: said at start, after a
redeploy and by ``dispatcher health``, never a false alarm, bounded against a plugin that
lies.

Real plugins: the Python SDK's example plugin (``sdk/python/dist/example-plugin``) as a gRPC
service, a subprocess and a WebSocket server; the SDK's gRPC, HTTP and WebSocket servers
and its dialler in this loop. Hostile plugins are real servers on loopback whose
``Describe``, ``hello`` or ``/describe`` the test writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from aiohttp import web
from echo_plugin import EchoPlugin
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from socket_plugin import SocketPlugin

from dispatcher import Dispatcher, MethodNotFound, TargetHealth
from dispatcher._served import ServedCheck, listed, methods_routed_to
from dispatcher.gateway.app import create_app
from linchkit_plugin import Plugin, PluginApp, PluginHost
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from linchkit_plugin.grpc_server import PluginServer
from linchkit_plugin.handshake import HEALTH_SERVICE
from linchkit_plugin.ws_protocol import encode_frame, hello_frame
from linchkit_plugin.ws_server import dial
from providers._grpc import lifecycle
from providers.base import ServedReport
from providers.discovery import Endpoint
from providers.grpc import GrpcTarget
from providers.http import HttpTarget
from providers.served import MAX_METHOD_NAME, MAX_SERVED_METHODS, served_names
from tests.conftest import LOCAL_TARGET, ROOT, manifest, route_warnings, serve_asgi

EXAMPLE = ROOT / "sdk" / "python" / "dist" / "example-plugin"
#: What the example plugin serves (docs/protocol.md, "The example plugin").
EXAMPLE_SERVES = "config, count, digest, echo, emit, fail, hooks, non_finite, not_unicode, sleep"
DISPATCHER = Path(sys.executable).parent / "dispatcher"
INBOUND_TOKEN = "served-inbound-token-0123"


def entry(plugin_id: str, target: dict[str, Any], *methods: str) -> dict[str, Any]:
    return {
        "id": plugin_id,
        "version": "1.0.0",
        "target": target,
        "defaults": {"timeout_ms": 10_000},
        "methods": {name: {} for name in methods},
    }


def report_of(reports: list[TargetHealth], plugin: str = "example") -> TargetHealth:
    (report,) = [each for each in reports if each.plugin == plugin]
    return report


# -- the example plugin, started for real --------------------------------------------------


@contextlib.asynccontextmanager
async def example_service(*extra: str) -> AsyncIterator[str]:
    """``example-plugin serve --address 127.0.0.1:0`` (gRPC, or WebSocket with
    ``--websocket``); yields the address from its handshake line."""
    process = await asyncio.create_subprocess_exec(
        str(EXAMPLE), "serve", "--address", "127.0.0.1:0", *extra,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode().strip()
        yield line.split("|")[3]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


def example_target(kind: str, address: str) -> dict[str, Any]:
    if kind == "grpc":
        return {"provider": "grpc", "address": address, "lifecycle": "dispatcher"}
    if kind == "websocket":
        return {"provider": "websocket", "url": f"ws://{address}/"}
    return {"provider": "subprocess", "command": [str(EXAMPLE)], "health_interval_ms": 0}


@contextlib.asynccontextmanager
async def example_address(kind: str) -> AsyncIterator[str]:
    if kind == "subprocess":
        yield ""  # the dispatcher launches it
        return
    async with example_service(*(("--websocket",) if kind == "websocket" else ())) as address:
        yield address


# -- at start and in health, for each binding -------------------------------------------------


@pytest.mark.parametrize("kind", ["grpc", "subprocess", "websocket"])
async def test_a_misspelt_method_is_logged_at_start_and_named_by_health(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher")
    async with example_address(kind) as address:
        target = example_target(kind, address)
        async with Dispatcher(manifest(entry("example", target, "echo", "ecoh"))) as dispatcher:
            report = report_of(await dispatcher.health())  # a dialled hello is read by now
            described = dispatcher.manifest.plugins[0].targets()[0].describe()
            assert route_warnings(caplog) == [
                f"example@1.0.0: the manifest routes ecoh to {described}, which does not"
                f" serve it; it serves: {EXAMPLE_SERVES}"
            ]
            assert report.health.status == "serving"  # as the probe said: echo works
            assert report.missing_methods == ("ecoh",)
            assert not report.ok
            # Never refused because of it: the call goes, and the plugin answers it.
            assert await dispatcher.call("example", "echo", {"a": 1}) == {"a": 1}
            with pytest.raises(MethodNotFound):
                await dispatcher.call("example", "ecoh", {})


@pytest.mark.parametrize("kind", ["grpc", "subprocess", "websocket"])
async def test_a_correct_manifest_logs_nothing_and_health_passes(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher")
    async with example_address(kind) as address:
        target = example_target(kind, address)
        async with Dispatcher(manifest(entry("example", target, "echo", "digest"))) as dispatcher:
            report = report_of(await dispatcher.health())
    assert route_warnings(caplog) == []
    assert report.missing_methods == ()
    assert report.ok


@pytest.mark.parametrize("kind", ["grpc", "subprocess", "websocket"])
async def test_a_reload_that_changes_the_methods_on_an_unchanged_target_is_checked_again(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload changes the entry of a running version (a method added, then removed)
    and leaves its target equal: nothing is attached again, and the connection stays.
    Before: the provider kept the old entry, so the added method the plugin lacks was
    never said (it is now, as at a start) and what the plugin said later was checked
    against the old method list."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    async with example_address(kind) as address:
        target = example_target(kind, address)
        async with Dispatcher(manifest(entry("example", target, "echo"))) as dispatcher:
            assert report_of(await dispatcher.health()).missing_methods == ()
            provider = dispatcher.providers[target["provider"]]
            connected = _connections_of(provider)
            summary = await dispatcher.reload(
                manifest(entry("example", target, "echo", "ecoh")), grace=1
            )
            assert summary["changed"] == ["example@1.0.0"]
            described = dispatcher.manifest.plugins[0].targets()[0].describe()
            assert route_warnings(caplog) == [
                f"example@1.0.0: the manifest routes ecoh to {described}, which does not"
                f" serve it; it serves: {EXAMPLE_SERVES}"
            ]
            assert report_of(await dispatcher.health()).missing_methods == ("ecoh",)
            summary = await dispatcher.reload(manifest(entry("example", target, "echo")), grace=1)
            assert summary["changed"] == ["example@1.0.0"]
            assert report_of(await dispatcher.health()).missing_methods == ()
            assert await dispatcher.call("example", "echo", {"a": 1}) == {"a": 1}
            # Neither reload attached anew: the same connection (or process) throughout.
            assert _connections_of(provider) == connected
    assert len(route_warnings(caplog)) == 1  # the method removed is not said again


def _connections_of(provider: Any) -> list[int]:
    """What ``provider`` holds open for its plugins, by identity."""
    for name in ("_connections", "_dialed", "_processes"):
        held = getattr(provider, name, None)
        if held:
            return [id(each) for each in held.values()]
    raise AssertionError(f"{provider!r} holds nothing open")


async def test_a_grpc_service_running_its_own_lifecycle_is_asked_by_health_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``lifecycle: remote``: attach does not contact the service, so nothing is said at
    start; health asks it (Describe), each time."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    async with example_service() as address:
        target = {"provider": "grpc", "address": address}
        async with Dispatcher(manifest(entry("example", target, "echo", "shout"))) as dispatcher:
            assert route_warnings(caplog) == []
            assert report_of(await dispatcher.health()).missing_methods == ("shout",)


async def test_health_names_what_an_http_plugin_server_does_not_serve(
    echo_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's HTTP server answers ``GET /describe``; attach never contacts an HTTP
    target, so only health says it."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    target = {"provider": "http", "url": echo_url}
    typo = manifest(entry("echo", target, "say", "sya"), entry("right", target, "say", "digest"))
    async with Dispatcher(typo) as dispatcher:
        reports = await dispatcher.health()
    assert route_warnings(caplog) == []
    assert report_of(reports, "echo").missing_methods == ("sya",)
    assert report_of(reports, "right").missing_methods == ()


async def test_a_local_plugin_missing_a_method_is_said_at_load(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher")
    async with Dispatcher(manifest(entry("echo", LOCAL_TARGET, "say", "sya"))) as dispatcher:
        report = report_of(await dispatcher.health(), "echo")
    (warning,) = route_warnings(caplog)
    assert warning.startswith("echo@1.0.0: the manifest routes sya to local echo_plugin")
    assert warning.endswith("it serves: digest, say, sleep, withdraw")
    assert report.missing_methods == ("sya",)


async def test_each_inbound_connection_is_checked_by_its_hello(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher")
    target = {"provider": "websocket", "mode": "inbound", "token": INBOUND_TOKEN}
    async with Dispatcher(manifest(entry("sock", target, "echo", "ehco"))) as dispatcher:
        runner = web.AppRunner(create_app(dispatcher), handle_signals=False, shutdown_timeout=2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"ws://127.0.0.1:{runner.addresses[0][1]}/v1/plugins/connect"
        dialling = asyncio.ensure_future(
            dial(
                PluginHost(SocketPlugin()),
                url,
                plugin_id="sock",
                version="1.0.0",
                token=INBOUND_TOKEN,
            )
        )
        try:
            async with asyncio.timeout(15):
                while not [r for r in await dispatcher.health() if r.state == "healthy"]:  # noqa: ASYNC110 - a fleet joining, polled
                    await asyncio.sleep(0.02)
            (report,) = [r for r in await dispatcher.health() if r.state == "healthy"]
            # A reload that changes the entry and keeps the target: the connection stays,
            # its hello is checked against the new entry's methods.
            await dispatcher.reload(manifest(entry("sock", target, "echo", "ohce")), grace=1)
            async with asyncio.timeout(15):
                while not [r for r in await dispatcher.health() if r.state == "healthy"]:  # noqa: ASYNC110 - a fleet joining, polled
                    await asyncio.sleep(0.02)
            (again,) = [r for r in await dispatcher.health() if r.state == "healthy"]
        finally:
            dialling.cancel()
            await asyncio.gather(dialling, return_exceptions=True)
            await runner.cleanup()
    assert report.missing_methods == ("ehco",)
    assert again.missing_methods == ("ohce",)
    assert again.target == report.target  # the same connection
    warning, changed = route_warnings(caplog)
    assert warning.startswith("sock@1.0.0: the manifest routes ehco to websocket inbound sock#1@")
    assert warning.endswith("it serves: burst, count, echo, fail, sleep")
    assert changed == warning.replace("ehco", "ohce")


# -- targets that cannot say ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def aiohttp_server(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def function_server(describe: Callable[[], web.Response] | None = None) -> web.Application:
    """An HTTP function server: ``/health`` and ``/invoke``; ``/describe`` answers 404
    unless ``describe`` is given (then what it makes, whatever that is)."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "serving"})

    async def invoke(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "result": None})

    async def described(request: web.Request) -> web.Response:
        assert describe is not None
        return describe()

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/invoke", invoke)
    if describe is not None:
        app.router.add_get("/describe", described)
    return app


async def test_an_http_function_without_describe_is_never_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher")
    async with aiohttp_server(function_server()) as address:
        target = {"provider": "http", "url": f"http://{address}"}
        async with Dispatcher(manifest(entry("fn", target, "anything", "else"))) as dispatcher:
            report = report_of(await dispatcher.health(), "fn")
    assert report.health.ok and report.missing_methods == () and report.ok
    assert route_warnings(caplog) == []


# -- hostile plugins: bounded, and silent rather than wrong ---------------------------------


class DescribingPlugin(plugin_pb2_grpc.PluginServiceServicer):  # type: ignore[misc]
    """A PluginService whose ``Describe`` lists what the test says, hangs, or is missing."""

    def __init__(self, methods: list[str] | None, *, hang: bool = False) -> None:
        self.methods = methods
        self.hang = hang

    async def Describe(self, request: Any, context: Any) -> Any:
        if self.hang:
            await asyncio.sleep(3600)
        if self.methods is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no Describe here")
        listed = [plugin_pb2.MethodInfo(name=name) for name in self.methods or ()]
        return plugin_pb2.PluginInfo(id="liar", version="1.0.0", methods=listed)

    async def Init(self, request: Any, context: Any) -> Any:
        return plugin_pb2.LifecycleReply()

    Start = Stop = Destroy = Init

    async def Call(self, request: Any, context: Any) -> Any:
        return plugin_pb2.CallReply(ok=True, result_json=request.params_json)

    async def Events(self, request_iterator: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no events here")


@contextlib.asynccontextmanager
async def describing(servicer: DescribingPlugin) -> AsyncIterator[str]:
    server = grpc.aio.server()
    plugin_pb2_grpc.add_PluginServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    await health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def start_and_probe(target: dict[str, Any], *methods: str) -> TargetHealth:
    async with Dispatcher(manifest(entry("liar", target, *methods))) as dispatcher:
        assert await dispatcher.call("liar", methods[0], {"x": 1}) == {"x": 1}
        return report_of(await dispatcher.health(), "liar")


async def test_a_describe_first_answered_for_health_is_checked_as_at_a_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The plugin's ``Describe`` hung at start (nothing known), and answers when health
    asks again: the routed method it lacks is in the report and warned of, as a start's
    list is (before: the report alone said it, and the log never did)."""
    monkeypatch.setattr(lifecycle, "DESCRIBE_WAIT", 0.3)
    caplog.set_level(logging.WARNING, logger="dispatcher")
    servicer = DescribingPlugin(["echo"], hang=True)
    async with describing(servicer) as address:
        target = {"provider": "grpc", "address": address, "lifecycle": "dispatcher"}
        async with Dispatcher(manifest(entry("liar", target, "echo", "missing"))) as dispatcher:
            assert route_warnings(caplog) == []
            servicer.hang = False
            for _ in range(2):  # said once, however often health asks
                report = report_of(await dispatcher.health(), "liar")
                assert report.missing_methods == ("missing",)
            (warning,) = route_warnings(caplog)
            assert f"routes missing to grpc {address}, which does not serve it" in warning


@pytest.mark.parametrize(
    "listing",
    [
        [f"method_{i}" for i in range(MAX_SERVED_METHODS + 1)],  # more than is believed
        ["echo", "x" * (MAX_METHOD_NAME + 1)],  # a name longer than any kept
        ["echo", "y" * 1_000_000],  # a megabyte of name
        [],  # lists nothing: says nothing
        None,  # no Describe at all: the plugin still starts
    ],
    ids=["too-many", "long-name", "megabyte-name", "empty", "unimplemented"],
)
async def test_a_describe_that_cannot_be_believed_says_nothing(
    listing: list[str] | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher")
    async with describing(DescribingPlugin(listing)) as address:
        target = {"provider": "grpc", "address": address, "lifecycle": "dispatcher"}
        report = await start_and_probe(target, "echo", "missing")
    assert report.missing_methods == () and report.ok
    assert route_warnings(caplog) == []


async def test_a_describe_that_hangs_holds_the_start_no_longer_than_its_wait(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lifecycle, "DESCRIBE_WAIT", 0.3)
    caplog.set_level(logging.WARNING, logger="dispatcher")
    async with describing(DescribingPlugin(["echo"], hang=True)) as address:
        target = {"provider": "grpc", "address": address, "lifecycle": "dispatcher"}
        async with Dispatcher(manifest(entry("liar", target, "echo", "missing"))) as dispatcher:
            assert await dispatcher.call("liar", "echo", {"x": 1}) == {"x": 1}
            report = report_of(await dispatcher.health(timeout=0.5), "liar")
    assert report.health.ok and report.missing_methods == ()  # asked again: no answer in time
    assert route_warnings(caplog) == []


async def test_a_long_listing_is_kept_whole_and_printed_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Thousands of names, one with a newline that would forge a log line, and thirty
    routed methods missing: the check stays right and the warning stays one short line."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    listing = ["echo", "greet\nWARNING forged line", *(f"m{i:04}" for i in range(3000))]
    missing = [f"absent_{i:02}" for i in range(30)]
    async with describing(DescribingPlugin(listing)) as address:
        target = {"provider": "grpc", "address": address, "lifecycle": "dispatcher"}
        report = await start_and_probe(target, "echo", "m2999", *missing)
    assert report.missing_methods == tuple(missing)
    (warning,) = route_warnings(caplog)
    assert "\n" not in warning and "forged" not in warning
    assert "absent_19 and 10 more" in warning and "m0018 and 2981 more" in warning
    assert len(warning) < 1000


async def hostile_socket(request: web.Request) -> web.WebSocketResponse:
    """A WebSocket plugin whose hello lists far more methods than are believed."""
    socket = web.WebSocketResponse()
    await socket.prepare(request)
    methods = [f"method_{i}" for i in range(MAX_SERVED_METHODS * 2)]
    await socket.send_bytes(hello_frame("liar", "1.0.0", methods))
    async for message in socket:
        frame = json.loads(message.data)
        if frame["type"] == "health":
            await socket.send_bytes(encode_frame({**frame, "status": "serving"}))
        elif frame["type"] == "call":
            answer = {"ok": True, "result": frame["request"]["params"]}
            await socket.send_bytes(
                encode_frame({"type": "response", "id": frame["id"], "response": answer})
            )
    return socket


async def test_a_websocket_hello_listing_too_much_says_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher")
    app = web.Application()
    app.router.add_get("/", hostile_socket)
    async with aiohttp_server(app) as address:
        target = {"provider": "websocket", "url": f"ws://{address}/"}
        report = await start_and_probe(target, "method_1", "missing")
    assert report.health.ok and report.missing_methods == ()
    assert route_warnings(caplog) == []


@pytest.mark.parametrize(
    "answer",
    [
        lambda: web.Response(body=b'{"methods": ["echo", "' + b"a" * 2_000_000 + b'"]}'),
        lambda: web.json_response({"methods": [f"m{i}" for i in range(MAX_SERVED_METHODS + 1)]}),
        lambda: web.json_response({"methods": "echo"}),
        lambda: web.json_response(["echo"]),
        lambda: web.Response(body=b"not json"),
        lambda: web.json_response({"methods": ["echo"]}, status=500),
    ],
    ids=["two-megabytes", "too-many", "not-a-list", "no-object", "not-json", "error-status"],
)
async def test_an_http_describe_that_cannot_be_believed_says_nothing(
    answer: Callable[[], web.Response],
) -> None:
    async with aiohttp_server(function_server(answer)) as address:
        target = {"provider": "http", "url": f"http://{address}"}
        async with Dispatcher(manifest(entry("fn", target, "echo", "missing"))) as dispatcher:
            report = report_of(await dispatcher.health(), "fn")
    assert report.health.ok and report.missing_methods == ()


def test_served_names_keeps_only_names_a_manifest_could_route() -> None:
    assert served_names(["echo", "a.b-c_d", "with space", "ümlaut", "9lives", ""]) == {
        "echo",
        "a.b-c_d",
    }
    assert served_names([]) is None
    assert served_names(["echo", 7]) is None


def test_a_gap_is_logged_once_per_place_until_it_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A subprocess restarting, a WebSocket reconnecting: the same gap is not said again."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    spec = manifest(entry("example", LOCAL_TARGET, "echo", "ecoh")).plugins[0]
    target = spec.targets()[0]
    check = ServedCheck()
    for served in ({"echo"}, {"echo"}, {"echo", "ecoh"}, {"echo"}):
        check(ServedReport(spec, target, frozenset(served), "here"))
    assert len(route_warnings(caplog)) == 2  # the first, and again after it was mended
    assert (
        listed([f"n{i}" for i in range(25)])
        == ", ".join(f"n{i}" for i in range(20)) + " and 5 more"
    )


def test_the_methods_routed_to_a_fleet_are_checked_on_each_instance_discovery_finds() -> None:
    """What a plugin serves is reported for one instance (``ServedReport.target``): one
    the manifest lists, or one a discovery source found, which only ``instance_at`` makes.
    Before, only the first kind was known: a discovered instance that lacks a routed
    method was never said. A target that merely looks like an instance is none."""
    dns = {"dns": {"name": "fleet.test", "type": "A", "port": 7000}}
    grpc_fleet = {
        "provider": "grpc",
        "lifecycle": "dispatcher",
        "instances": [{"address": "127.0.0.4:7000"}, dns],
    }
    spec = manifest(entry("fleet", grpc_fleet, "whoami", "nope")).plugins[0]
    (fleet,) = spec.targets()
    (fixed,) = fleet.instance_targets()
    found = fleet.instance_at(Endpoint("127.0.0.2", 7000))
    assert methods_routed_to(spec, fixed) == ("whoami", "nope")
    assert methods_routed_to(spec, found) == ("whoami", "nope")
    at_that_place = {"provider": "grpc", "address": "127.0.0.2:7000"}
    alike = [
        GrpcTarget.model_validate(at_that_place),  # lifecycle: remote
        GrpcTarget.model_validate({**at_that_place, "lifecycle": "dispatcher", "tls": True}),
        GrpcTarget.model_validate(
            {**at_that_place, "lifecycle": "dispatcher", "metadata": {"tenant": "other"}}
        ),
        HttpTarget.model_validate({"provider": "http", "url": "http://127.0.0.2:7000"}),
    ]
    assert [methods_routed_to(spec, each) for each in alike] == [()] * len(alike)
    # A fleet that names no discovery source has no instance but those it lists.
    listed_only = {**grpc_fleet, "instances": [{"address": "127.0.0.4:7000"}, {"address": "x:1"}]}
    only = manifest(entry("fleet", listed_only, "whoami")).plugins[0]
    assert methods_routed_to(only, found) == ()
    # URL-addressed instances too.
    http_fleet = {"provider": "http", "instances": [dns]}
    spec = manifest(entry("fleet", http_fleet, "whoami")).plugins[0]
    (fleet,) = spec.targets()
    assert methods_routed_to(spec, fleet.instance_at(Endpoint("127.0.0.2", 7000))) == ("whoami",)


# -- a gRPC service redeployed behind the dispatcher ------------------------------------------
#
# ``lifecycle: dispatcher``: the process at the address is replaced and the connection comes
# back; the dispatcher asks the new process's ``Describe`` before its ``Init`` and says what
# it serves as it does at a start. Each process is a real gRPC server in this loop on a
# fixed port; the test knows the dispatcher has found the new one when its ``Start`` runs,
# and that the restart is over when a call returns (calls wait for it).


class Redeployed(Plugin):
    """A build of the plugin ``redeployed``: which of ``a``, ``b``, ``c`` it serves is its
    class's ``methods``; ``started`` is set when the host's ``Start`` reaches it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def start(self) -> None:
        self.started.set()

    async def a(self) -> str:
        return "a"

    async def b(self) -> str:
        return "b"

    async def c(self) -> str:
        return "c"


class ServesAB(Redeployed):
    methods = ("a", "b")


class ServesAC(Redeployed):
    methods = ("a", "c")


class StartedDescribing(DescribingPlugin):
    """A raw ``PluginService`` whose ``Describe`` the test writes (``DescribingPlugin``),
    and whose ``Start`` sets ``started``."""

    def __init__(self, methods: list[str] | None, *, hang: bool = False) -> None:
        super().__init__(methods, hang=hang)
        self.started = asyncio.Event()

    async def Start(self, request: Any, context: Any) -> Any:
        self.started.set()
        return plugin_pb2.LifecycleReply()


class Deployment:
    """One process of the service at ``address``: the SDK's gRPC server for ``plugin``, or
    a raw server for a ``StartedDescribing``. A redeploy ends one and starts another."""

    def __init__(
        self, address: str, plugin: Redeployed | StartedDescribing, version: str = "1.0.0"
    ) -> None:
        self.plugin = plugin
        self.stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.bound: asyncio.Future[int] = loop.create_future()
        if isinstance(plugin, Redeployed):
            server = PluginServer(PluginHost(plugin), plugin_id="redeployed", version=version)
            serving = server.serve(address, on_ready=self.bound.set_result, stop=self.stop)
        else:
            serving = self._serve_raw(address, plugin)
        self.task = loop.create_task(serving)

    async def _serve_raw(self, address: str, servicer: StartedDescribing) -> None:
        server = grpc.aio.server()
        plugin_pb2_grpc.add_PluginServiceServicer_to_server(servicer, server)
        health = HealthServicer()
        await health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port(address)
        await server.start()
        self.bound.set_result(port)
        try:
            await self.stop.wait()
        finally:
            await server.stop(grace=None)

    async def ready(self) -> Deployment:
        """Wait until it listens (its server failing to bind fails this, at once)."""
        await asyncio.wait({self.bound, self.task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()  # raises why it did not start
        assert self.bound.done(), "the service did not listen within 10 s"
        return self

    async def found(self) -> None:
        """Wait until the dispatcher has found this process (its ``Start`` came)."""
        await asyncio.wait_for(self.plugin.started.wait(), 30)

    async def end(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


@contextlib.asynccontextmanager
async def deployments() -> AsyncIterator[list[Deployment]]:
    """Where a test keeps the processes it starts: each is ended at the end."""
    running: list[Deployment] = []
    try:
        yield running
    finally:
        for each in running:
            if not each.task.done():
                await each.end()


async def redeploy(
    running: list[Deployment],
    address: str,
    plugin: Redeployed | StartedDescribing,
    version: str = "1.0.0",
) -> Deployment:
    """End the process at ``address`` and start ``plugin`` there; return once the
    dispatcher has found it (``Start``)."""
    if running:
        await running[-1].end()
    running.append(Deployment(address, plugin, version))
    await running[-1].ready()
    await running[-1].found()
    return running[-1]


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def redeployed_at(address: str) -> Any:
    """The manifest: ``redeployed`` at ``address`` with methods ``a``, ``b`` and ``c``."""
    target = {"provider": "grpc", "address": address, "lifecycle": "dispatcher"}
    return manifest(entry("redeployed", target, "a", "b", "c"))


def gap(address: str, missing: str, serves: str) -> str:
    return (
        f"redeployed@1.0.0: the manifest routes {missing} to grpc {address}, which does not"
        f" serve it; it serves: {serves}"
    )


def messages(caplog: pytest.LogCaptureFixture, part: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if part in record.getMessage()]


async def test_a_service_redeployed_with_other_methods_is_checked_as_at_a_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: the new process's ``Describe`` was asked and kept, but not said: the log
    still named ``c`` missing (which the new build serves) and never ``b`` (which it
    dropped), and a new build's version went unremarked."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    address = free_address()
    async with deployments() as running:
        running.append(await Deployment(address, ServesAB()).ready())
        async with Dispatcher(redeployed_at(address)) as dispatcher:
            assert route_warnings(caplog) == [gap(address, "c", "a, b")]
            assert report_of(await dispatcher.health(), "redeployed").missing_methods == ("c",)

            await redeploy(running, address, ServesAC(), version="2.0.0")
            assert await dispatcher.call("redeployed", "a", {}) == "a"  # the restart is over
            assert route_warnings(caplog) == [gap(address, "c", "a, b"), gap(address, "b", "a, c")]
            assert report_of(await dispatcher.health(), "redeployed").missing_methods == ("b",)
            assert await dispatcher.call("redeployed", "c", {}) == "c"
            (told,) = messages(caplog, "reports itself as")
            assert (
                "redeployed version 2.0.0, the manifest names it redeployed version 1.0.0" in told
            )

            # The same build once more (a restart, a lost connection): nothing new to say.
            await redeploy(running, address, ServesAC(), version="2.0.0")
            assert await dispatcher.call("redeployed", "c", {}) == "c"
            assert len(route_warnings(caplog)) == 2
            assert len(messages(caplog, "reports itself as")) == 1
            assert report_of(await dispatcher.health(), "redeployed").missing_methods == ("b",)


@pytest.mark.parametrize(
    "listing",
    [
        None,  # Describe unimplemented by the new build
        [f"method_{i}" for i in range(MAX_SERVED_METHODS + 1)],  # more than is believed
        ["a", "x" * (MAX_METHOD_NAME + 1)],  # a name longer than any kept
        [],  # lists nothing
    ],
    ids=["unimplemented", "too-many", "long-name", "empty"],
)
async def test_a_service_redeployed_with_a_describe_not_believed_is_said_unknown(
    listing: list[str] | None, caplog: pytest.LogCaptureFixture
) -> None:
    """The old process's list is not held against the new one (this one serves ``c``: a
    gap said from the old list would be a false alarm), and the gap said before is not
    dropped without a word: the dispatcher says it no longer knows. Calls go on. A later
    build that says what it serves is checked again, its gap said anew."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    address = free_address()
    async with deployments() as running:
        running.append(await Deployment(address, ServesAB()).ready())
        async with Dispatcher(redeployed_at(address)) as dispatcher:
            assert route_warnings(caplog) == [gap(address, "c", "a, b")]

            await redeploy(running, address, StartedDescribing(listing))
            assert await dispatcher.call("redeployed", "c", {"x": 1}) == {"x": 1}
            report = report_of(await dispatcher.health(), "redeployed")
            assert report.health.ok and report.missing_methods == () and report.ok
            assert route_warnings(caplog) == [gap(address, "c", "a, b")]
            (unknown,) = messages(caplog, "no longer says")
            assert unknown == (
                f"redeployed@1.0.0: grpc {address} no longer says which methods it serves"
                " (it last lacked c): the methods routed there are not checked against it"
                " until it says again"
            )

            await redeploy(running, address, ServesAB())
            assert await dispatcher.call("redeployed", "a", {}) == "a"
            assert route_warnings(caplog) == [gap(address, "c", "a, b")] * 2
            assert report_of(await dispatcher.health(), "redeployed").missing_methods == ("c",)
            assert len(messages(caplog, "no longer says")) == 1


def test_a_place_that_no_longer_says_what_it_serves_is_told_once_and_checked_anew(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """None after a list: said once, whether the list had a gap or not; None before any
    list (a plugin that never says) or after None: nothing; the next list: checked anew."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    spec = manifest(entry("example", LOCAL_TARGET, "echo", "ecoh")).plugins[0]
    target = spec.targets()[0]
    check = ServedCheck()
    said: list[frozenset[str] | None] = [None, {"echo"}, None, None, {"echo"}]
    said += [{"echo", "ecoh"}, None, {"echo", "ecoh"}]
    for served in said:
        check(ServedReport(spec, target, None if served is None else frozenset(served), "here"))
    no_longer = "example@1.0.0: here no longer says which methods it serves"
    assert [record.getMessage() for record in caplog.records] == [
        "example@1.0.0: the manifest routes ecoh to here, which does not serve it; it serves: echo",
        f"{no_longer} (it last lacked ecoh): the methods routed there are not checked"
        " against it until it says again",
        "example@1.0.0: the manifest routes ecoh to here, which does not serve it; it serves: echo",
        f"{no_longer}: the methods routed there are not checked against it until it says again",
    ]
    assert repr(check) == "<ServedCheck places=1 with_missing=0>"


# -- the CLI, as a user runs it --------------------------------------------------------------


async def run_health(path: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(DISPATCHER), "-m", str(path), "health", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_dispatcher_health_exits_1_naming_each_method_not_served(tmp_path: Path) -> None:
    async with (
        example_service() as grpc_address,
        example_service("--websocket") as ws_address,
        serve_asgi_context(PluginApp(PluginHost(EchoPlugin()))) as http_url,
    ):
        targets = {
            "grpc": example_target("grpc", grpc_address),
            "sub": example_target("subprocess", ""),
            "ws": example_target("websocket", ws_address),
            "http": {"provider": "http", "url": http_url},
        }

        def manifest_file(
            name: str, example_methods: tuple[str, ...], echo_methods: tuple[str, ...]
        ) -> Path:
            plugins = [
                entry("example" if kind == "ws" else f"example-{kind}", target, *example_methods)
                for kind, target in targets.items()
                if kind != "http"
            ]
            plugins.append(entry("echo", targets["http"], *echo_methods))
            path = tmp_path / name
            path.write_text(json.dumps({"version": 1, "plugins": plugins}))
            return path

        wrong = manifest_file("wrong.json", ("echo", "ecoh"), ("say", "sya"))
        right = manifest_file("right.json", ("echo", "digest"), ("say", "digest"))
        code, out, err = await run_health(wrong)
        right_code, right_out, right_err = await run_health(right, "--output", "json")
        json_code, json_out, _ = await run_health(wrong, "--output", "json")
    assert code == 1, out + err
    not_served = [line for line in out.splitlines() if "NOT SERVED" in line]
    assert len(not_served) == 4, out
    assert sum("NOT SERVED: ecoh (" in line for line in not_served) == 3
    assert any(
        line.startswith("echo@1.0.0 http ") and "NOT SERVED: sya (" in line for line in not_served
    )
    rows = out.splitlines()[1:5]
    assert all(" serving " in row and "lacks 1 routed method(s)" in row for row in rows), out
    warnings = [line for line in err.splitlines() if "the manifest routes" in line]
    assert len(warnings) == 3, err  # gRPC and subprocess Describe at start, the WebSocket hello
    assert all(line.endswith(f"it serves: {EXAMPLE_SERVES}") for line in warnings)
    assert json_code == 1
    assert sorted(tuple(each["missing_methods"]) for each in json.loads(json_out)) == [
        ("ecoh",), ("ecoh",), ("ecoh",), ("sya",),
    ]  # fmt: skip
    assert right_code == 0, right_out + right_err
    assert all(each["missing_methods"] == [] for each in json.loads(right_out))
    assert "the manifest routes" not in right_err


@contextlib.asynccontextmanager
async def serve_asgi_context(app: Any) -> AsyncIterator[str]:
    async for url in serve_asgi(app):
        yield url
