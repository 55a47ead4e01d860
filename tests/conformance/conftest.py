"""The example plugin of every SDK, running two ways, behind one fixture.

Languages are the folders ``sdk/<lang>/`` that have a ``build.sh`` (the Makefile's test
target runs each before pytest). A folder whose build left no
``sdk/<lang>/dist/example-plugin`` fails its tests: a broken SDK must not pass as skipped.

Modes:
* ``service``    — ``example-plugin serve --address 127.0.0.1:0`` started here, called
  through ``provider: grpc`` with ``lifecycle: dispatcher`` (the dispatcher runs Init/Start);
* ``subprocess`` — launched by ``provider: subprocess`` (handshake, Unix socket, AutoMTLS);
* ``websocket``  — ``example-plugin serve --websocket --address 127.0.0.1:0`` started here,
  dialled by ``provider: websocket`` (languages whose SDK serves WebSocket);
* ``inbound``    — ``example-plugin connect --url ws://gateway/v1/plugins/connect``: the
  plugin dials the gateway (reverse mode, ``mode: inbound``) and is called as an instance
  of its fleet (languages whose SDK dials out).

The WebSocket modes pass the manifest's config on the command line (``--config``): the
plugin runs its own lifecycle there, as an HTTP function does.

One dispatcher per (language, mode), shared by the module's tests (module event loop), so a
slow-starting runtime (the JVM) starts twice per language, not once per case.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from dispatcher import Dispatcher, parse_manifest
from dispatcher.gateway.app import create_app
from providers.base import Health
from tests.conftest import ROOT

SDK = ROOT / "sdk"
# Extra executables to hold to the contract, e.g. another checkout's build:
# LINCHKIT_CONFORMANCE_PLUGINS="go=/elsewhere/sdk/go/dist/example-plugin,rust=…"
EXTRA = dict(
    item.split("=", 1)
    for item in os.environ.get("LINCHKIT_CONFORMANCE_PLUGINS", "").split(",")
    if "=" in item
)
LANGUAGES = sorted({build.parent.name for build in SDK.glob("*/build.sh")} | set(EXTRA))
MODES = ("service", "subprocess")
#: The WebSocket modes each SDK implements so far (docs/protocol.md, "WebSocket binding").
WEBSOCKET_MODES = {
    "python": ("websocket", "inbound"),
    "typescript": ("websocket", "inbound"),
    "go": ("websocket", "inbound"),
    "rust": ("websocket", "inbound"),
    "java": ("websocket", "inbound"),
}
INBOUND_TOKEN = "conformance-inbound-token"


def modes_of(language: str) -> tuple[str, ...]:
    return MODES + WEBSOCKET_MODES.get(language, ())


CASES = [(language, mode) for language in LANGUAGES for mode in modes_of(language)]
METHODS = (
    "echo",
    "digest",
    "fail",
    "sleep",
    "count",
    "emit",
    "config",
    "non_finite",
    "not_unicode",
    "no_such_method",
)
CONFIG = {"region": "eu", "limits": {"max": 3}, "tags": ["a", "b"]}
START_TIMEOUT = 60.0  # a cold JVM on a busy 2-core machine


def executable(language: str) -> Path:
    path = (
        Path(EXTRA[language]) if language in EXTRA else SDK / language / "dist" / "example-plugin"
    )
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"sdk/{language}/build.sh exists but {path} is missing or not "
            "executable: run `make test` (it builds every SDK) and fix that build"
        )
    return path


@dataclass
class Example:
    """One running example plugin and the dispatcher in front of it."""

    language: str
    mode: str
    dispatcher: Dispatcher
    #: (version, event, data) of each event the plugin emitted.
    events: asyncio.Queue[tuple[str, str, Any]] = field(default_factory=asyncio.Queue)
    address: str = ""
    #: The plugin's process when the suite started it (``serve``, ``connect``); a
    #: subprocess plugin's is the provider's (see ``process``).
    started: asyncio.subprocess.Process | None = None

    plugin = "example"

    def target(self) -> Any:
        """The concrete target calls go to (an inbound fleet's one connected instance)."""
        target: Any = self.dispatcher.manifest.plugins[0].target
        if self.mode == "inbound":
            provider: Any = self.dispatcher.providers["websocket"]
            (connection,) = provider.inbound.of_fleet(target.key)
            from providers.discovery import Endpoint

            return target.instance_at(Endpoint("", 0, key=connection.key))
        return target

    def connection(self) -> Any:
        """The provider's own connection to the plugin (for Describe and raw checks)."""
        manifest = self.dispatcher.manifest
        assert manifest is not None, "the dispatcher has started"
        target = manifest.plugins[0].target
        assert target is not None, "the example plugin runs out of process"
        provider: Any = self.dispatcher.providers[target.provider]
        if self.mode in ("websocket", "inbound"):
            return SocketView(self, provider)
        if self.mode == "service":
            return provider._connection(target)
        process = provider.process("example", "1.0.0", target)
        return process._child.connection

    def process(self) -> asyncio.subprocess.Process:
        """The plugin's running process: whether a call killed it (a subprocess plugin's
        provider launches another, so compare the objects, not only the answers)."""
        if self.started is not None:
            return self.started
        target: Any = self.target()
        provider: Any = self.dispatcher.providers[target.provider]
        supervisor = provider.process("example", "1.0.0", target)
        assert supervisor._child is not None, "the subprocess plugin is running"
        process: asyncio.subprocess.Process = supervisor._child.process
        return process

    async def next_event(self, name: str, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                version, event, data = await self.events.get()
                if event == name:
                    assert version == "1.0.0"  # each provider names the version that emitted it
                    return data


class SocketView:
    """What the suite reads of a WebSocket plugin: its hello as Describe, its health."""

    def __init__(self, example: Example, provider: Any) -> None:
        self.example = example
        self.provider = provider

    def _hello(self) -> dict[str, Any]:
        target = self.example.target()
        if self.example.mode == "inbound":
            return self.provider.inbound.get(target.connection).hello  # type: ignore[no-any-return]
        return self._dialled(target.key).hello  # type: ignore[no-any-return]

    def _dialled(self, target_key: str) -> Any:
        """The dialled connection to the target (one plugin dials it: by id and target)."""
        (dialed,) = [each for each in self.provider.dialed if each.target.key == target_key]
        return dialed

    async def describe_plugin(self, timeout: float) -> dict[str, Any]:
        if self.example.mode == "websocket":  # dialled: wait for the connection and its hello
            await self._dialled(self.example.target().key).ready(None)
        hello = self._hello()
        streaming = set(hello.get("streaming", ()))
        return {
            "id": hello["id"],
            "version": hello["version"],
            "protocol_version": hello["protocol"],
            "runtime": hello.get("runtime"),
            "methods": {name: {"streaming": name in streaming} for name in hello["methods"]},
        }

    async def health(self, service: str = "") -> Health:
        health: Health = await self.provider.health(self.example.target())
        return health


def _manifest(target: dict[str, Any]) -> Any:
    return parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "example",
                    "version": "1.0.0",
                    "config": CONFIG,
                    "target": target,
                    "lifecycle": {"init_timeout_ms": int(START_TIMEOUT * 1000)},
                    "defaults": {"timeout_ms": 10_000},
                    "methods": {name: {} for name in METHODS},
                }
            ],
        },
        base_dir=ROOT,
    )


async def _start_service(
    path: Path,
    env: dict[str, str] | None = None,
    stderr: int | None = None,
    *,
    protocol: str = "grpc",
    extra: tuple[str, ...] = (),
) -> tuple[asyncio.subprocess.Process, str]:
    """``path serve --address 127.0.0.1:0`` (in ``env``, else ours) and its address."""
    process = await asyncio.create_subprocess_exec(
        str(path),
        "serve",
        "--address",
        "127.0.0.1:0",
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env=env,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT):
            line = (await process.stdout.readline()).decode().strip()
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"{path} serve printed no handshake line within {START_TIMEOUT:.0f} s")
    parts = line.split("|")
    assert len(parts) == 6, f"service handshake line {line!r}"
    assert parts[:3] == ["1", "1", "tcp"], line
    assert parts[4:] == [protocol, ""], line
    return process, parts[3]


async def _start_websocket_service(
    path: Path,
    stderr: int | None = None,
    config: dict[str, Any] = CONFIG,
    env: dict[str, str] | None = None,
) -> tuple[asyncio.subprocess.Process, str, dict[str, Any]]:
    """``path serve --websocket`` with ``config`` (in ``env``, else ours): the process, its
    address and a target dialling it."""
    service, address = await _start_service(
        path,
        env=env,
        stderr=stderr,
        protocol="websocket",
        extra=("--websocket", "--config", orjson.dumps(config).decode()),
    )
    target = {
        "provider": "websocket",
        "url": f"ws://{address}/",
        "connect_timeout_ms": int(START_TIMEOUT * 1000),
    }
    return service, address, target


async def _stop_service(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=CASES,
    ids=[f"{language}-{mode}" for language, mode in CASES],
)
async def example(request: pytest.FixtureRequest) -> AsyncIterator[Example]:
    language, mode = request.param
    path = executable(language)
    service: asyncio.subprocess.Process | None = None
    if mode == "service":
        service, address = await _start_service(path)
        target: dict[str, Any] = {
            "provider": "grpc",
            "address": address,
            "lifecycle": "dispatcher",
            "connect_timeout_ms": int(START_TIMEOUT * 1000),
            # As across a network (on loopback the default is off): large calls in gzip.
            "compression": {"min_bytes": 32 * 1024},
        }
    elif mode == "websocket":
        service, address, target = await _start_websocket_service(path)
    elif mode == "inbound":
        address = ""
        target = {"provider": "websocket", "mode": "inbound", "token": INBOUND_TOKEN}
    else:
        address = ""
        target = {
            "provider": "subprocess",
            "command": [str(path)],
            "handshake_timeout_ms": int(START_TIMEOUT * 1000),
            "health_interval_ms": 0,
        }
    try:
        dispatcher = Dispatcher(_manifest(target))
        found = Example(language, mode, dispatcher, address=address, started=service)
        dispatcher.on_event(
            lambda _plugin, version, event, data: found.events.put_nowait((version, event, data))
        )
        async with dispatcher:
            if mode != "inbound":
                yield found
                return
            async with _dialling_in(path, dispatcher) as process:
                found.started = process
                yield found
    finally:
        if service is not None:
            await _stop_service(service)


@contextlib.asynccontextmanager
async def _dialling_in(
    path: Path,
    dispatcher: Dispatcher,
    stderr: int | None = None,
    config: dict[str, Any] = CONFIG,
    env: dict[str, str] | None = None,
    relay: Callable[[int], Awaitable[int]] | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A gateway on port 0 and ``path connect --config config`` dialling it (its stderr to
    ``stderr``, else ours; ``env`` added to our environment; through the port ``relay``
    returns for the gateway's, e.g. a proxy's, else straight); yields the process once it
    is an instance."""
    runner = web.AppRunner(create_app(dispatcher), handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    if relay is not None:
        port = await relay(port)
    environment = {**os.environ, **(env or {}), "LINCHKIT_PLUGIN_TOKEN": INBOUND_TOKEN}
    environment.pop("LINCHKIT_PLUGIN_TOKEN_FILE", None)
    process = await asyncio.create_subprocess_exec(
        str(path), "connect",
        "--url", f"ws://127.0.0.1:{port}/v1/plugins/connect",
        "--config", orjson.dumps(config).decode(),
        stdin=asyncio.subprocess.PIPE, stderr=stderr, env=environment,
    )  # fmt: skip
    try:
        target: Any = dispatcher.manifest.plugins[0].target
        assert dispatcher.fleets is not None
        fleet = dispatcher.fleets.fleets[target.key]
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not [i for i in fleet.instances if not i.leaving]:
                    if process.returncode is not None:
                        pytest.fail(f"{path} connect exited with {process.returncode}")
                    await asyncio.sleep(0.02)
        except TimeoutError:
            pytest.fail(f"{path} connect did not join within {START_TIMEOUT:.0f} s")
        yield process
    finally:
        await _stop_service(process)
        await runner.cleanup()
