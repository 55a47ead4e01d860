"""The Python SDK caps the stop and destroy hooks at a stop (``PluginHost.close_within``).

A plugin told to stop drains its calls, then runs the hooks its host did not: together
within ``STOP_HOOKS_SECONDS`` (5 s), as in every SDK. A hook still running then is
abandoned with a warning and the process exits without it: before, the SDK awaited the
hooks with no bound, and a hook stuck on a peer that never answers kept the plugin alive
until its host killed it. An async hook is cancelled; a sync one runs in a daemon thread,
which, unlike ``asyncio.to_thread``'s executor (joined at exit), does not hold the exit.
Every SDK over every binding: tests/conformance/test_stop_drains_first.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from linchkit_plugin.host import STOP_HOOKS_SECONDS, PluginHost
from tests.conftest import ROOT

SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])


class StuckAsync:
    def __init__(self) -> None:
        self.destroyed = False

    async def stop(self) -> None:
        await asyncio.Event().wait()

    async def destroy(self) -> None:
        self.destroyed = True


class StuckSync:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.thread: threading.Thread | None = None

    def stop(self) -> None:
        self.thread = threading.current_thread()
        self.release.wait()


class Failing:
    def __init__(self) -> None:
        self.destroyed = False

    def stop(self) -> None:
        raise RuntimeError("the database is gone")

    async def destroy(self) -> None:
        self.destroyed = True


async def test_an_async_hook_past_the_cap_is_cancelled_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugin = StuckAsync()
    started = time.monotonic()
    assert await PluginHost(plugin).close_within(0.2) is False
    assert time.monotonic() - started < 1.0
    assert not plugin.destroyed  # the cap is for both: destroy does not run after it
    assert "stop hook did not finish within 0.2 s" in caplog.text


async def test_a_sync_hook_past_the_cap_is_left_to_a_thread_that_does_not_hold_the_exit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugin = StuckSync()
    started = time.monotonic()
    assert await PluginHost(plugin).close_within(0.2) is False
    assert time.monotonic() - started < 1.0
    assert plugin.thread is not None and plugin.thread.daemon
    assert "stop hook did not finish within 0.2 s" in caplog.text
    plugin.release.set()  # its answer, late, goes to nobody
    plugin.thread.join(1)
    await asyncio.sleep(0.05)


async def test_a_failing_hook_is_logged_and_the_next_one_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugin = Failing()
    with caplog.at_level(logging.ERROR):
        assert await PluginHost(plugin).close_within(1.0) is True
    assert plugin.destroyed
    assert "stop hook failed at the stop" in caplog.text


STUCK_PLUGIN = """
import sys, threading
from linchkit_plugin.grpc_server import main

class Stuck:
    async def echo(self, value=None):
        return value

    def stop(self):
        sys.stderr.write("stuck: stop hook ran\\n")
        sys.stderr.flush()
        threading.Event().wait()  # a close blocked on a peer that never answers

sys.exit(main(Stuck, plugin_id="stuck", version="1.0.0"))
"""


async def test_a_plugin_whose_sync_stop_hook_never_returns_exits_after_the_cap(
    tmp_path: Path,
) -> None:
    script = tmp_path / "stuck_plugin.py"
    script.write_text(textwrap.dedent(STUCK_PLUGIN))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "serve",
        "--address",
        "127.0.0.1:0",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SOURCE_PATH},
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        async with asyncio.timeout(30):
            handshake = await process.stdout.readline()
        assert handshake.startswith(b"1|1|tcp|127.0.0.1:"), handshake
        said = asyncio.create_task(process.stderr.read())
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_HOOKS_SECONDS + 10):
            await process.wait()
        exited_after = time.monotonic() - stopped_at
        lines = (await said).decode(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "stuck: stop hook ran" in lines
    assert "stop hook did not finish within 5 s of the stop" in lines, lines
    assert STOP_HOOKS_SECONDS - 0.5 <= exited_after < STOP_HOOKS_SECONDS + 3
