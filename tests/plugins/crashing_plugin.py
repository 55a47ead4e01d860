"""A subprocess plugin for the supervision tests, run as ``python crashing_plugin.py``.

It says hello on stderr (the host must log it), serves like any plugin, and when
``CRASH_AFTER_MS`` is set it dies abruptly (``os._exit(3)``) that long after ``Start``.
With ``HANG_ON_EXIT`` it ignores SIGTERM and hangs while exiting: only SIGKILL ends it.
With ``STOP_HOOK_MS`` its stop hook takes that long (a flush to a slow store); its stop
and destroy hooks each say on stderr when they have run.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from linchkit_plugin import Plugin
from linchkit_plugin.errors import TargetUnavailable
from linchkit_plugin.grpc_server import main


class CrashingPlugin(Plugin):
    def __init__(self) -> None:
        self._helpers: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        print(f"crashing plugin {os.getpid()} started", file=sys.stderr, flush=True)
        if os.environ.get("HANG_ON_EXIT"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            atexit.register(time.sleep, 60)
        crash_after = os.environ.get("CRASH_AFTER_MS")
        if crash_after:
            asyncio.get_running_loop().call_later(int(crash_after) / 1000, os._exit, 3)

    async def stop(self) -> None:
        await asyncio.sleep(int(os.environ.get("STOP_HOOK_MS", "0")) / 1000)
        print("crashing plugin: stop hook ran", file=sys.stderr, flush=True)

    async def destroy(self) -> None:
        print("crashing plugin: destroy hook ran", file=sys.stderr, flush=True)

    async def pid(self) -> int:
        return os.getpid()

    async def echo(self, value: Any = None) -> Any:
        return value

    async def unavailable(self) -> None:
        """Fail as a plugin whose own dependency is down does: its process goes on."""
        raise TargetUnavailable("its database is down")

    async def exit(self, code: int = 3) -> None:
        """Die at once, in the middle of this call (as a crash does)."""
        os._exit(code)

    async def nap(self, seconds: float) -> float:
        """Hold a call open (for cancellation tests)."""
        await asyncio.sleep(seconds)
        return seconds

    async def environment(self) -> dict[str, str]:
        """The environment this process was started with (for the minimal-environment tests)."""
        return dict(os.environ)

    async def announce(self, name: str) -> bool:
        """Emit the plugin event ``name`` with this process's pid."""
        self.emit(name, os.getpid())
        return True

    async def complain(self, text: str) -> bool:
        """Log ``text`` as a WARNING with Python's logging, as a plugin author does."""
        logging.getLogger("crashing").warning("%s", text)
        return True

    async def write(self, line: str) -> bool:
        """Write ``line`` to stderr as it is (a log line in another SDK's format)."""
        print(line, file=sys.stderr, flush=True)
        return True

    async def flood(self, lines: int) -> int:
        """Write ``lines`` numbered lines to stderr at once, as a log call in a loop does."""
        sys.stderr.write("".join(f"flood line {i}\n" for i in range(lines)))
        sys.stderr.flush()
        return lines

    async def spawn(self, seconds: float = 300.0, own_session: bool = False) -> int:
        """Start a helper process that would outlive this one, as a plugin's worker or a
        shell's background job does: it holds this process's stdout and stderr, and stays
        in its process group unless ``own_session``. Its pid."""
        helper = await asyncio.create_subprocess_exec(
            "sleep", str(seconds), stdin=subprocess.DEVNULL, start_new_session=own_session
        )
        self._helpers.append(helper)  # kept: its transport would be collected unclosed
        return helper.pid


if __name__ == "__main__":
    sys.exit(main(CrashingPlugin, plugin_id="crashing", version="1.0.0"))
