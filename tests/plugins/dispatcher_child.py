"""A dispatcher in its own process, for the no-orphan test: it starts a subprocess plugin,
(the command in its argv) prints the plugin's pid, then waits to be killed (the test SIGKILLs it)."""

from __future__ import annotations

import asyncio
import sys

from dispatcher import Dispatcher, parse_manifest


async def main(command: list[str]) -> None:
    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "orphan",
                    "version": "1.0.0",
                    "target": {"provider": "subprocess", "command": command},
                    "methods": {"echo": {}},
                }
            ],
        }
    )
    async with Dispatcher(manifest) as dispatcher:
        process = dispatcher.providers["subprocess"]._processes  # type: ignore[attr-defined]
        (plugin,) = process.values()
        assert await dispatcher.call("orphan", "echo", "alive") == "alive"
        print(plugin.pid, flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
