"""A dispatcher run as a user that is not root (tests/test_subprocess_sandbox.py): its
sandboxed plugins run as its own uid. Busy with threads of its own, it starts a plugin
(the executable in its argv) with ``pids: 32``, has it hold every process its limit
allows, then starts a second plugin and forks itself. Prints one JSON object."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from dispatcher import Dispatcher, parse_manifest


def manifest(executable: str, plugin: str) -> Any:
    entry = {
        "id": plugin,
        "version": "1.0.0",
        "capabilities": {"pids": 32},
        "target": {"provider": "subprocess", "command": [executable], "sandbox": True},
        "methods": {"whoami": {}, "spawn": {}},
    }
    return parse_manifest({"version": 1, "plugins": [entry]}, base_dir=Path("/tmp"))


async def main(executable: str) -> dict[str, Any]:
    idle = threading.Event()
    for _ in range(40):  # more threads than the plugin's limit: they counted against it
        threading.Thread(target=idle.wait, daemon=True).start()
    seen: dict[str, Any] = {"dispatcher_uid": os.getuid()}
    async with Dispatcher(manifest(executable, "first")) as first:
        seen["first"] = await first.call("first", "whoami", {}, timeout=20)
        seen["held"] = await first.call("first", "spawn", {"n": 500, "hold": True}, timeout=20)
        async with Dispatcher(manifest(executable, "second")) as second:
            seen["second"] = await second.call("second", "whoami", {}, timeout=20)
        forked = await asyncio.create_subprocess_exec("/bin/true")
        seen["dispatcher_forks"] = await forked.wait() == 0
    idle.set()
    return seen


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)
