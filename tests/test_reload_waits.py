"""Which calls in flight a reload waits for before it detaches what it retired: those that
may reach a version it removed or changed, not a long call or an open stream to a plugin
it keeps. (Before, every call and stream in flight at the swap held the detaching up, to
the reload's grace: one subscription open for hours made every reload take its grace and
warn that calls still ran.)"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher
from tests.conftest import manifest

PLUGIN = '''
import asyncio

#: Set by the test: the dispatcher a relay calls through.
DISPATCHER = None


class Waits:
    async def nap(self, seconds):
        await asyncio.sleep(seconds)
        return seconds

    async def ticks(self, count, every):
        for tick in range(count):
            await asyncio.sleep(every)
            yield tick

    async def relay(self, seconds):
        """A call of another plugin from inside this one's call."""
        return await DISPATCHER.call("removed", "nap", {"seconds": seconds})
'''

#: Long enough that a reload waiting for it is told apart from one that does not.
LONG = 3.0
#: A reload that waits for nothing ends well within this, on a busy machine too.
PROMPT = 1.5


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "waits_plugin.py").write_text(PLUGIN)
    return tmp_path


def plugin(folder: Path, plugin_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": plugin_id,
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "waits_plugin:Waits", "path": str(folder)},
        "methods": {"nap": {}, "ticks": {}, "relay": {}},
        **extra,
    }


async def reload_time(dispatcher: Dispatcher, *plugins: dict[str, Any]) -> float:
    started = time.monotonic()
    await dispatcher.reload(manifest(*plugins), grace=10)
    return time.monotonic() - started


async def test_a_long_call_to_a_kept_plugin_does_not_hold_up_a_reload(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept, removed = plugin(folder, "kept"), plugin(folder, "removed")
    async with Dispatcher(manifest(kept, removed)) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("kept", "nap", {"seconds": LONG}))
        await asyncio.sleep(0.2)
        with caplog.at_level(logging.WARNING, logger="dispatcher"):
            took = await reload_time(dispatcher, kept)
        assert took < PROMPT, f"the reload waited {took:.1f} s for a call to a kept plugin"
        assert "still ran" not in caplog.text
        assert await napping == LONG  # and the call was not disturbed


async def test_an_open_stream_to_a_kept_plugin_does_not_hold_up_a_reload(folder: Path) -> None:
    kept, removed = plugin(folder, "kept"), plugin(folder, "removed")
    async with Dispatcher(manifest(kept, removed)) as dispatcher:
        stream = dispatcher.stream("kept", "ticks", {"count": 30, "every": 0.1})
        ticks: list[int] = []
        first = asyncio.Event()

        async def read() -> None:
            async for tick in stream:
                ticks.append(tick)
                first.set()

        reading = asyncio.create_task(read())
        async with asyncio.timeout(10):
            await first.wait()
        took = await reload_time(dispatcher, kept)
        assert took < PROMPT, f"the reload waited {took:.1f} s for a stream to a kept plugin"
        await reading
        assert ticks == list(range(30))


async def test_a_call_to_a_removed_plugin_is_still_waited_for(folder: Path) -> None:
    kept, removed = plugin(folder, "kept"), plugin(folder, "removed")
    async with Dispatcher(manifest(kept, removed)) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("removed", "nap", {"seconds": 1.0}))
        await asyncio.sleep(0.2)
        assert await reload_time(dispatcher, kept) >= 0.6
        assert await napping == 1.0


async def test_a_call_made_from_inside_a_kept_plugin_s_call_is_waited_for(
    folder: Path,
) -> None:
    # The outer call's route is the kept plugin's; what it reaches from inside is not
    # known before it calls: it is waited for as one that may reach anything.
    kept, removed = plugin(folder, "kept"), plugin(folder, "removed")
    async with Dispatcher(manifest(kept, removed)) as dispatcher:
        sys.modules["waits_plugin"].DISPATCHER = dispatcher
        relaying = asyncio.create_task(dispatcher.call("kept", "relay", {"seconds": 1.0}))
        await asyncio.sleep(0.2)
        assert await reload_time(dispatcher, kept) >= 0.6
        assert await relaying == 1.0


async def test_a_call_with_a_fallback_is_waited_for(folder: Path) -> None:
    # A fallback reaches another plugin through the routing table: whatever the reload
    # changes, such a call is waited for.
    kept = plugin(folder, "kept")
    kept["methods"]["nap"] = {"fallback": {"plugin": "other", "on": ["target_unavailable"]}}
    other, removed = plugin(folder, "other"), plugin(folder, "removed")
    async with Dispatcher(manifest(kept, other, removed)) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("kept", "nap", {"seconds": 1.0}))
        await asyncio.sleep(0.2)
        assert await reload_time(dispatcher, kept, other) >= 0.6
        assert await napping == 1.0


@pytest.fixture(autouse=True)
def _forget_the_plugin_module() -> Iterator[None]:
    yield
    sys.modules.pop("waits_plugin", None)
