"""The example plugin of every SDK, running two ways, behind one fixture.

Languages are the folders ``sdk/<lang>/`` that have a ``build.sh`` (the Makefile's test
target runs each before pytest). A folder whose build left no
``sdk/<lang>/dist/example-plugin`` fails its tests: a broken SDK must not pass as skipped.

Modes:
* ``service``    — ``example-plugin serve --address 127.0.0.1:0`` started here, called
  through ``provider: grpc`` with ``lifecycle: dispatcher`` (the dispatcher runs Init/Start);
* ``subprocess`` — launched by ``provider: subprocess`` (handshake, Unix socket, AutoMTLS).

One dispatcher per (language, mode), shared by the module's tests (module event loop), so a
slow-starting runtime (the JVM) starts twice per language, not once per case.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dispatcher import Dispatcher, parse_manifest
from providers._grpc.connection import PluginConnection
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
METHODS = ("echo", "digest", "fail", "sleep", "count", "emit", "config", "no_such_method")
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
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    address: str = ""

    plugin = "example"

    def connection(self) -> PluginConnection:
        """The provider's own connection to the plugin (for Describe and raw checks)."""
        target = self.dispatcher.manifest.plugins[0].target
        provider: Any = self.dispatcher.providers[target.provider]
        if self.mode == "service":
            return provider._connection(target)  # type: ignore[no-any-return]
        process = provider.process("example", "1.0.0", target)
        return process._child.connection  # type: ignore[no-any-return]

    async def next_event(self, name: str, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                event, data = await self.events.get()
                if event == name:
                    return data


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
    path: Path, env: dict[str, str] | None = None, stderr: int | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """``path serve --address 127.0.0.1:0`` (in ``env``, else ours) and its address."""
    process = await asyncio.create_subprocess_exec(
        str(path),
        "serve",
        "--address",
        "127.0.0.1:0",
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
    assert parts[4:] == ["grpc", ""], line
    return process, parts[3]


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
    params=[(language, mode) for language in LANGUAGES for mode in MODES],
    ids=[f"{language}-{mode}" for language in LANGUAGES for mode in MODES],
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
        }
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
        found = Example(language, mode, dispatcher, address=address)
        dispatcher.on("example", "*", lambda event, data: found.events.put_nowait((event, data)))
        async with dispatcher:
            yield found
    finally:
        if service is not None:
            await _stop_service(service)
