"""The Python SDK caps the stop and destroy hooks at a stop (``PluginHost.close_within``).

A plugin told to stop drains its calls, then runs the hooks its host did not: together
within ``STOP_HOOKS_SECONDS`` (5 s), as in every SDK. A hook still running then is
abandoned with a warning and the process exits without it: before, the SDK awaited the
hooks with no bound, and a hook stuck on a peer that never answers kept the plugin alive
until its host killed it. An async hook is cancelled, and closed ``ABANDONED_HOOK_SECONDS``
later if it swallowed the cancellation (before, the stop awaited such a hook for ever); a
sync one runs in a daemon thread, which, unlike ``asyncio.to_thread``'s executor (joined
at exit), does not hold the exit. What an abandoned hook still does after that (awaits a
thread, catches ``GeneratorExit`` too and blocks) does not hold an SDK executable's exit
either: it ends ``ABANDONED_EXIT_SECONDS`` later, with exit status 0 as after every
graceful stop (before, such a plugin never exited).
Every SDK over every binding: tests/conformance/test_stop_drains_first.py.

The executables here stop with the hooks' cap set to 1 s (``LINCHKIT_PLUGIN_STOP_HOOKS_MS``)
and the drain's to 1 s (``LINCHKIT_PLUGIN_STOP_GRACE_MS``), as an operator sets them; one
test keeps the default 5 s (a sync stop hook that never returns, over gRPC), so the default
stays pinned. Before, each of them waited 5 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from linchkit_plugin.host import (
    ABANDONED_EXIT_SECONDS,
    ABANDONED_HOOK_SECONDS,
    STOP_HOOKS_SECONDS,
    PluginHost,
)
from linchkit_plugin.stopping import STOP_GRACE_ENV, STOP_HOOKS_ENV
from tests.conftest import ROOT

SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])
#: The caps the executables below stop with, but for the one that pins the default.
HOOKS_CAP = 1.0
GRACE = 1.0
CONFIGURED = {STOP_HOOKS_ENV: str(int(HOOKS_CAP * 1000)), STOP_GRACE_ENV: str(int(GRACE * 1000))}


class StuckAsync:
    def __init__(self) -> None:
        self.destroyed = False

    async def stop(self) -> None:
        await asyncio.Event().wait()

    async def destroy(self) -> None:
        self.destroyed = True


class SwallowsCancellation:
    """A stop hook that catches its cancellation and awaits on (a close retried on a peer
    that never answers): only closing its coroutine ends it."""

    def __init__(self) -> None:
        self.cancellations = 0
        self.ended = asyncio.Event()
        self.destroyed = False

    async def stop(self) -> None:
        try:
            while True:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancellations += 1
        finally:
            self.ended.set()

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


async def test_an_async_hook_that_swallows_its_cancellation_does_not_hold_the_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before, the stop awaited the hook past its cancellation, for ever (and a timeout
    # around it could not end it either: the hook swallowed that cancellation too).
    plugin = SwallowsCancellation()
    started = time.monotonic()
    closing = asyncio.create_task(PluginHost(plugin).close_within(0.2))
    await asyncio.wait({closing}, timeout=5)
    if not closing.done():
        closing.get_coro().close()  # ends the hook it awaits, or the test's loop never closes
        pytest.fail("the stop still awaited the hook 5 s after its 0.2 s cap")
    assert closing.result() is False
    assert time.monotonic() - started < 0.2 + ABANDONED_HOOK_SECONDS + 0.5
    assert not plugin.destroyed
    assert "stop hook did not finish within 0.2 s" in caplog.text
    # Cancelled at the cap, then closed: ended before the stop returned, since
    # asyncio.run waits for every task left when the plugin's main coroutine returns, and
    # a hook task still pending would hold the exit all the same.
    assert plugin.cancellations >= 1
    assert plugin.ended.is_set()
    assert not [task for task in asyncio.all_tasks() if task.get_name() == "plugin-stop-hook"]
    assert "stop hook went on after its cancellation; closing it" in caplog.text


async def test_an_async_hook_cancelled_at_the_cap_may_clean_up_briefly() -> None:
    class CleansUp:
        cleaned = False

        async def stop(self) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)  # a connection aborted, say
                self.cleaned = True
                raise

    plugin = CleansUp()
    assert await PluginHost(plugin).close_within(0.2) is False
    assert plugin.cleaned


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


SWALLOWING_PLUGIN = """
import asyncio, sys
from linchkit_plugin.grpc_server import main
from linchkit_plugin.ws_server import main as websocket_main

class Stubborn:
    async def echo(self, value=None):
        return value

    async def stop(self):
        sys.stderr.write("stuck: stop hook ran\\n")
        sys.stderr.flush()
        while True:  # a close retried, its cancellation swallowed, on a peer that never answers
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass

if __name__ == "__main__":
    if "--websocket" in sys.argv:
        sys.exit(websocket_main(Stubborn, sys.argv[1:], plugin_id="stuck", version="1.0.0"))
    sys.exit(main(Stubborn, plugin_id="stuck", version="1.0.0"))
"""


async def _exit_after_a_stop(
    command: list[str],
    tmp_path: Path,
    *,
    ready_on_stderr: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[float, str, int | None]:
    """Start ``command`` (with ``env`` added to ours), SIGTERM it once it serves; how long
    it took to exit after the signal, what it wrote to stderr, and its exit status."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": SOURCE_PATH, **(env or {})},
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        async with asyncio.timeout(30):
            if ready_on_stderr:  # dispatcher-plugin serve: "… listening on http://…"
                ready = await process.stderr.readline()
                assert re.search(rb"listening on (http|ws)://127\.0\.0\.1:", ready), ready
            else:  # the handshake line
                ready = await process.stdout.readline()
                assert ready.startswith(b"1|1|tcp|127.0.0.1:"), ready
        said = asyncio.create_task(process.stderr.read())
        # At once: a server that says it serves handles SIGTERM from then on (the WebSocket
        # one printed its line first, and a signal this soon ended it by the default
        # action, its stop hooks never run).
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
    return exited_after, lines, process.returncode


async def test_a_plugin_whose_sync_stop_hook_never_returns_exits_after_the_default_cap(
    tmp_path: Path,
) -> None:
    # No LINCHKIT_PLUGIN_STOP_HOOKS_MS: the default 5 s, pinned here.
    script = tmp_path / "stuck_plugin.py"
    script.write_text(textwrap.dedent(STUCK_PLUGIN))
    command = [sys.executable, str(script), "serve", "--address", "127.0.0.1:0"]
    exited_after, lines, _ = await _exit_after_a_stop(command, tmp_path)
    assert "stuck: stop hook ran" in lines
    assert "stop hook did not finish within 5 s of the stop" in lines, lines
    assert STOP_HOOKS_SECONDS - 0.5 <= exited_after < STOP_HOOKS_SECONDS + 3


SERVED_AS = {
    "grpc": ["stubborn_plugin.py", "serve", "--address", "127.0.0.1:0"],
    "websocket": ["stubborn_plugin.py", "serve", "--websocket", "--address", "127.0.0.1:0"],
    "http": ["-m", "linchkit_plugin.cli", "serve", "stubborn_plugin:Stubborn", "--port", "0"],
    "cli-websocket": [
        *("-m", "linchkit_plugin.cli", "serve", "stubborn_plugin:Stubborn", "--websocket"),
        *("--port", "0", "--id", "stuck", "--version", "1.0.0"),
    ],
}


@pytest.mark.parametrize("served_as", list(SERVED_AS))
async def test_a_plugin_whose_async_stop_hook_swallows_its_cancellation_exits_after_the_cap(
    tmp_path: Path, served_as: str
) -> None:
    # Before, it never exited: the stop awaited the hook past its cancellation.
    (tmp_path / "stubborn_plugin.py").write_text(textwrap.dedent(SWALLOWING_PLUGIN))
    command = [sys.executable, *SERVED_AS[served_as]]
    exited_after, lines, returncode = await _exit_after_a_stop(
        command, tmp_path, ready_on_stderr=served_as.startswith(("http", "cli-")), env=CONFIGURED
    )
    assert "stuck: stop hook ran" in lines
    # The configured cap, in the wait and in the words.
    assert "stop hook did not finish within 1 s of the stop" in lines, lines
    assert HOOKS_CAP - 0.5 <= exited_after < HOOKS_CAP + 3
    # A stop that gave up on a hook exits 0 in every executable (before, 143 over HTTP:
    # uvicorn raised the SIGTERM again once it had shut down).
    assert returncode == 0, lines


CLINGING_PLUGIN = """
import asyncio, os, sys, time
from linchkit_plugin.grpc_server import main
from linchkit_plugin.ws_server import main as websocket_main

class Stubborn:
    async def echo(self, value=None):
        return value

    async def stop(self):
        sys.stderr.write("clinging: stop hook ran\\n")
        sys.stderr.flush()
        while True:  # a close retried whatever ends it, GeneratorExit too
            try:
                if os.environ["CLINGS_BY"] == "thread":  # a client that blocks, on a thread
                    await asyncio.to_thread(time.sleep, 3600)
                else:
                    await asyncio.sleep(3600)
            except (asyncio.CancelledError, GeneratorExit) as error:
                if os.environ["CLINGS_BY"] == "blocking" and isinstance(error, GeneratorExit):
                    time.sleep(3600)  # the event loop with it

if __name__ == "__main__":
    if "--websocket" in sys.argv:
        sys.exit(websocket_main(Stubborn, sys.argv[1:], plugin_id="stuck", version="1.0.0"))
    sys.exit(main(Stubborn, plugin_id="stuck", version="1.0.0"))
"""

#: Where the process may take longest to exit after the SIGTERM: the hooks' cap, the
#: cancelled hook's time and its closed coroutine's, then what the exit may take after.
EXIT_BOUND = HOOKS_CAP + 2 * min(ABANDONED_HOOK_SECONDS, HOOKS_CAP) + ABANDONED_EXIT_SECONDS


@pytest.mark.parametrize(
    ("served_as", "clings_by"),
    [*((served_as, "thread") for served_as in SERVED_AS), ("grpc", "blocking")],
)
async def test_a_plugin_whose_async_stop_hook_also_swallows_its_closing_exits_after_the_cap(
    tmp_path: Path, served_as: str, clings_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hook catches GeneratorExit as well as CancelledError and goes on: on a thread it
    # awaits again (asyncio.run waits for the default executor's threads, the interpreter
    # joins them), or blocking the event loop. Before, the process never exited.
    (tmp_path / "stubborn_plugin.py").write_text(textwrap.dedent(CLINGING_PLUGIN))
    monkeypatch.setenv("CLINGS_BY", clings_by)
    command = [sys.executable, *SERVED_AS[served_as]]
    exited_after, lines, returncode = await _exit_after_a_stop(
        command, tmp_path, ready_on_stderr=served_as.startswith(("http", "cli-")), env=CONFIGURED
    )
    assert "clinging: stop hook ran" in lines
    assert "stop hook did not finish within 1 s of the stop" in lines, lines
    assert "exiting now" in lines, lines
    # The process ends by the configured cap too, not the default's 7 s.
    assert HOOKS_CAP - 0.5 <= exited_after < EXIT_BOUND + 3, lines
    assert returncode == 0, lines


BLOCKING_PLUGIN = """
import sys, time
from linchkit_plugin.grpc_server import main
from linchkit_plugin.ws_server import main as websocket_main

class Blocking:
    def block(self, seconds: float) -> float:
        time.sleep(seconds)  # a plain method stuck for good: a socket that never answers
        return seconds

if __name__ == "__main__":
    if "--websocket" in sys.argv:
        sys.exit(websocket_main(Blocking, sys.argv[1:], plugin_id="blk", version="1.0.0"))
    sys.exit(main(Blocking, plugin_id="blk", version="1.0.0"))
"""


@pytest.mark.parametrize("served_as", ["grpc", "websocket"])
async def test_a_plain_method_stuck_for_good_does_not_hold_the_exit(
    tmp_path: Path, served_as: str
) -> None:
    """A call of a plain (not async) method that never returns is in flight at SIGTERM:
    the stop drains for its grace (1 s, configured), the call ends typed, and the process
    exits. Before, it never exited: the method's thread was the default executor's, which
    the interpreter and ``asyncio.run`` wait for at exit."""
    from dispatcher import Dispatcher, DispatchError, parse_manifest

    (tmp_path / "blocking_plugin.py").write_text(textwrap.dedent(BLOCKING_PLUGIN))
    command = [sys.executable, "blocking_plugin.py", "serve", "--address", "127.0.0.1:0"]
    if served_as == "websocket":
        command.append("--websocket")
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": SOURCE_PATH, **CONFIGURED},
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            address = (await process.stdout.readline()).decode().split("|")[3]
        target = (
            {"provider": "grpc", "address": address}
            if served_as == "grpc"
            else {"provider": "websocket", "url": f"ws://{address}/"}
        )
        plugin = {
            "id": "blk",
            "version": "1.0.0",
            "target": target,
            "methods": {"block": {"timeout_ms": 120_000}},
        }
        async with Dispatcher(parse_manifest({"plugins": [plugin]})) as dispatcher:
            call = asyncio.ensure_future(dispatcher.call("blk", "block", {"seconds": 3600}))
            await asyncio.sleep(1.0)  # the method is running
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(STOP_HOOKS_SECONDS + 15):
                await process.wait()
            exited_after = time.monotonic() - stopped_at
            with pytest.raises(DispatchError):
                await asyncio.wait_for(call, 10)
        assert exited_after < GRACE + 5, exited_after  # the drain's grace, and a margin
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
