"""One dispatcher replica in its own process, driven by JSON lines on stdin.

``python tests/state_replica.py MANIFEST``: starts a ``Dispatcher`` for the manifest,
prints ``{"ready": true}``, then answers one JSON line per command:

* ``offer``: from wall-clock time ``start_at`` on, ``rate`` calls/s for ``seconds`` to
  ``plugin.method`` without waiting for answers; replies with how many were admitted,
  refused by a rate limit, refused because the state store did not answer in time
  (``state_unavailable``: ``fail_closed``), or failed otherwise (by error type);
* ``call`` and ``calls`` (``n`` concurrent): one call each, replying with its outcome
  (``ok``, ``result`` or the error's ``type`` and ``message``) and its duration;
* ``invalidate``: ``Dispatcher.ainvalidate``; ``stats``: the state backend's counters;
  ``fleets``: each fleet's instances and the calls this replica sent each;
* ``quit``: close the dispatcher and exit.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time
from typing import Any

import orjson

from dispatcher import Dispatcher
from dispatcher.state import StateUnavailable
from linchkit_plugin.errors import DispatchError, RateLimited


async def outcome_of(dispatcher: Dispatcher, command: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        result = await dispatcher.call(
            command["plugin"],
            command["method"],
            command.get("params"),
            caller=command.get("caller"),
            timeout=command.get("timeout", 5.0),
            idempotency_key=command.get("key"),
        )
    except DispatchError as error:
        return {
            "ok": False,
            "type": error.type,
            "class": type(error).__name__,
            "message": error.message,
            "elapsed": time.monotonic() - started,
        }
    return {"ok": True, "result": result, "elapsed": time.monotonic() - started}


async def offer(dispatcher: Dispatcher, command: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    counts: collections.Counter[str] = collections.Counter()

    async def one() -> None:
        try:
            await dispatcher.call(command["plugin"], command["method"], {}, timeout=5.0)
        except RateLimited:
            counts["limited"] += 1
        except StateUnavailable:  # its type is target_unavailable: told apart here
            counts["state_unavailable"] += 1
        except DispatchError as error:
            counts[error.type] += 1
        else:
            counts["admitted"] += 1

    # Wall-clock start shared by every replica, then this loop's clock for the schedule.
    start = loop.time() + (command["start_at"] - time.time())
    total = round(command["rate"] * command["seconds"])
    tasks = []
    late = 0.0  # how far behind its schedule this process fell (starved by the machine)
    for i in range(total):
        delay = start + i / command["rate"] - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        late = max(late, -delay)
        tasks.append(loop.create_task(one()))
    await asyncio.gather(*tasks)
    return {"offered": total, **counts, "late_ms": round(late * 1000)}


async def main(path: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(document: Any) -> None:
        sys.stdout.write(orjson.dumps(document).decode() + "\n")
        sys.stdout.flush()

    async with Dispatcher.from_file(path) as dispatcher:
        reply({"ready": True})
        while line := await reader.readline():
            command = orjson.loads(line)
            op = command["op"]
            if op == "quit":
                break
            if op == "call":
                reply(await outcome_of(dispatcher, command))
            elif op == "calls":
                outcomes = await asyncio.gather(
                    *(outcome_of(dispatcher, command) for _ in range(command["n"]))
                )
                reply(outcomes)
            elif op == "offer":
                reply(await offer(dispatcher, command))
            elif op == "invalidate":
                await dispatcher.ainvalidate(command.get("plugin"), command.get("method"))
                reply({"ok": True})
            elif op == "stats":
                reply(dispatcher.stats()["state"])
            elif op == "shared_breakers":  # each shared breaker's state as this replica saw it
                reply(dispatcher.stats()["shared_breakers"])
            elif op == "fleets":
                reply(dispatcher.stats()["fleets"])
    reply({"closed": True})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
