"""Plugin events on a binding that cannot carry them are never lost in silence.

An HTTP plugin (``dispatcher-plugin serve``) has no channel back to the host: what it
emits is dropped. The plugin's SDK says so once per event name, and ``Dispatcher.on``
says so once per plugin, naming the plugin's binding; where events are delivered
(in-process, subprocess, gRPC, WebSocket) neither says anything.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys

import pytest

from dispatcher import Dispatcher
from tests.conftest import ROOT, manifest

PLUGINS = str(ROOT / "tests" / "plugins")
METHODS = {"burst": {}}


def eventful(target: dict[str, object]) -> dict[str, object]:
    return {"id": "shop", "version": "1.0.0", "target": target, "methods": METHODS}


async def test_an_http_plugin_warns_once_per_event_name_it_cannot_deliver() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "linchkit_plugin.cli", "serve", "eventful_plugin:EventfulPlugin",
        "--path", PLUGINS, "--port", "0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        found = re.search(r"listening on (http://[0-9.:]+)", line)
        assert found, line
        target = {"provider": "http", "url": found.group(1)}
        async with Dispatcher(manifest(eventful(target))) as dispatcher:
            for name in ("order.paid", "order.paid", "order.shipped"):
                assert await dispatcher.call("shop", "burst", {"name": name, "count": 3}) == 3
    finally:
        process.terminate()
        stderr = (await asyncio.wait_for(process.stderr.read(), 30)).decode()
        await process.wait()
    warnings = [line for line in stderr.splitlines() if "is not delivered" in line]
    assert len(warnings) == 2, stderr
    assert "'order.paid'" in warnings[0] and "'order.shipped'" in warnings[1]
    assert "WebSocket" in warnings[0], warnings[0]


@pytest.mark.parametrize(
    ("target", "binding"),
    [
        ({"provider": "http", "url": "http://127.0.0.1:9"}, "http"),
        ({"provider": "subprocess", "command": ["true"], "events": False}, "subprocess"),
    ],
)
def test_on_warns_once_for_a_plugin_whose_targets_cannot_deliver_events(
    caplog: pytest.LogCaptureFixture, target: dict[str, object], binding: str
) -> None:
    dispatcher = Dispatcher(manifest(eventful(target)))
    with caplog.at_level(logging.WARNING, logger="dispatcher"):
        dispatcher.on("shop", "order.paid", lambda event, data: None)
        dispatcher.on("shop", "*", lambda event, data: None)
        dispatcher.on("other", "order.paid", lambda event, data: None)  # not in the manifest
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "'shop'" in message and f"its {binding} target" in message, message


def test_on_is_quiet_where_events_are_delivered(caplog: pytest.LogCaptureFixture) -> None:
    local = {"provider": "local", "entrypoint": "eventful_plugin:EventfulPlugin", "path": PLUGINS}
    dispatcher = Dispatcher(manifest(eventful(local)))
    with caplog.at_level(logging.WARNING, logger="dispatcher"):
        dispatcher.on("shop", "order.paid", lambda event, data: None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_an_in_process_plugin_delivers_its_events_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    local = {"provider": "local", "entrypoint": "eventful_plugin:EventfulPlugin", "path": PLUGINS}
    seen: list[str] = []
    with caplog.at_level(logging.WARNING):
        async with Dispatcher(manifest(eventful(local))) as dispatcher:
            dispatcher.on("shop", "order.paid", lambda event, data: seen.append(event))
            await dispatcher.call("shop", "burst", {"name": "order.paid", "count": 2})
    assert seen == ["order.paid", "order.paid"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
