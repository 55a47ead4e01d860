"""A method that answers long after its deadline is told of, once a minute per method.

An async method that blocks the event loop (``time.sleep`` in an ``async def``) keeps the
deadline's timer from running: its answer came whenever it was done, the host had long
answered its caller ``deadline_exceeded``, every other call of the process waited, and
nothing anywhere said why. A method that catches the deadline's cancellation and goes on
is the same, with the timer having run. Now the SDK warns, naming the method and how late
it answered; the answer itself is unchanged. Before, none of these warnings existed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import httpx
import pytest

from linchkit_plugin import Plugin
from linchkit_plugin.errors import DeadlineExceeded
from linchkit_plugin.host import PluginHost
from tests.test_python_plugin_non_finite import scores_server

HELD = "the event loop was held that long"
SWALLOWED = "it caught the cancellation the deadline sent"


class Late(Plugin):
    async def blocks(self, seconds: float = 0.8) -> str:
        time.sleep(seconds)  # noqa: ASYNC251 - the mistake this test is about
        return "done"

    async def swallows(self) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.8)  # goes on after the deadline cancelled it
        return "went on"

    async def prompt(self) -> str:
        await asyncio.sleep(0.01)
        return "in time"

    def sync_sleeps(self) -> str:
        time.sleep(0.8)  # a worker thread: the deadline ends the call on time
        return "late"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "dispatcher.plugin" and record.levelno == logging.WARNING
    ]


async def test_a_method_holding_the_loop_past_its_deadline_is_told_of_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = PluginHost(Late())
    caplog.set_level(logging.WARNING, "dispatcher.plugin")
    assert await host.call_with_deadline("blocks", {}, {}, 0.1) == "done"  # unchanged
    (said,) = warnings_of(caplog)
    assert said.startswith("method 'blocks' answered 0.") and HELD in said, said
    assert "asyncio.to_thread" in said and "plain `def`" in said, said
    assert float(re.search(r"answered ([0-9.]+) s", said)[1]) >= 0.5  # type: ignore[index]
    # Once a minute per method: a method that always blocks does not fill the log.
    assert await host.call_with_deadline("blocks", {}, {}, 0.1) == "done"
    assert len(warnings_of(caplog)) == 1


async def test_a_method_swallowing_its_deadline_s_cancellation_is_told_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = PluginHost(Late())
    caplog.set_level(logging.WARNING, "dispatcher.plugin")
    assert await host.call_with_deadline("swallows", {}, {}, 0.1) == "went on"
    (said,) = warnings_of(caplog)
    assert said.startswith("method 'swallows' answered") and SWALLOWED in said, said
    assert HELD not in said


async def test_methods_in_time_and_sync_methods_past_their_deadline_say_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = PluginHost(Late())
    caplog.set_level(logging.WARNING, "dispatcher.plugin")
    assert await host.call_with_deadline("prompt", {}, {}, 5.0) == "in time"
    assert await host.call_with_deadline("blocks", {"seconds": 0.2}, {}, 5.0) == "done"
    with pytest.raises(DeadlineExceeded):  # its thread runs on; the call ends on time
        await host.call_with_deadline("sync_sleeps", {}, {}, 0.1)
    assert await host.call_with_deadline("prompt", {}, {}, None) == "in time"
    assert warnings_of(caplog) == []


LATE_PLUGIN = """
import time

from linchkit_plugin import Plugin


class Scores(Plugin):
    async def blocks(self):
        time.sleep(1.0)
        return "done"
"""


async def test_a_served_plugin_says_on_stderr_which_method_held_its_loop(tmp_path: Path) -> None:
    async with scores_server(tmp_path, "http", LATE_PLUGIN) as (target, stderr):
        envelope = {
            "v": 1,
            "plugin": "scores",
            "method": "blocks",
            "params": {},
            "context": {"request_id": "r-1", "deadline_ms": 200},
        }
        async with httpx.AsyncClient(timeout=20) as client:
            answer = (await client.post(f"{target['url']}/invoke", json=envelope)).json()
        assert answer == {"ok": True, "result": "done"}, answer  # the late answer, as before
        async with asyncio.timeout(20):
            warning = await stderr.line_with(HELD)
        assert "method 'blocks' answered 0." in warning, warning
