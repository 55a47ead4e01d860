"""A host that opens one dispatcher on a gRPC plugin, ends a call or stream early, closes the
dispatcher and says what of grpc's is left in its process:
``python tests/grpc_teardown_host.py TARGET_JSON WAY REFUSED_ADDRESS`` (``WAY``: see
``end_early``; ``stream_failed`` runs without the garbage collector; ``REFUSED_ADDRESS``: where nothing listens, for ``refused``).

Run as its own process by ``tests/test_grpc_teardown.py``: grpc's core is process-wide,
and a test process has other channels and servers keeping it up. The host keeps what its
calls left it (the error, the stream), as a caller of ``pytest.raises`` or a consumer that
broke out of ``async for`` does, and prints one JSON line: the threads and descriptors it
has beyond those it had before the dispatcher was made, once there are none or
``SETTLE_SECONDS`` after ``aclose``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc.aio  # noqa: F401 - loaded before the baseline, so only what runs is counted

from dispatcher import Dispatcher, DispatchError, parse_manifest

ROOT = Path(__file__).resolve().parent.parent

#: How long the host waits for threads and descriptors to go after ``aclose`` (grpc's
#: shutdown joins its poller thread; a loaded 2-core machine may take a while).
SETTLE_SECONDS = 10.0


def threads_and_descriptors() -> tuple[dict[str, str], dict[str, str]]:
    """Native threads (id: name) and open descriptors (number: what) of this process."""
    if gc.isenabled():  # disabled: what only the collector would free counts as left
        gc.collect()
    threads: dict[str, str] = {}
    for task in os.listdir("/proc/self/task"):
        try:
            threads[task] = Path(f"/proc/self/task/{task}/comm").read_text().strip()
        except OSError:  # ended meanwhile
            continue
    descriptors: dict[str, str] = {}
    for number in os.listdir("/proc/self/fd"):
        try:
            descriptors[number] = os.readlink(f"/proc/self/fd/{number}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return threads, descriptors


async def end_early(dispatcher: Dispatcher, way: str, kept: list[Any]) -> None:
    """A completed call, then one ended ``way``; what it leaves the caller goes in ``kept``."""
    assert await dispatcher.call("example", "echo", {"n": 1}) == {"n": 1}
    if way == "cancelled":
        try:
            await asyncio.wait_for(dispatcher.call("example", "sleep", {"ms": 5000}), 0.2)
        except TimeoutError as error:
            kept.append(error)
    elif way == "deadline":
        try:
            await dispatcher.call("example", "sleep", {"ms": 5000}, timeout=0.2)
        except DispatchError as error:
            kept.append(error)
    elif way == "stream_left":
        stream = dispatcher.stream("example", "count", {"n": 1000})
        async for _ in stream:
            break
        kept.append(stream)
    elif way == "stream_failed":
        try:
            async for _ in dispatcher.stream("example", "count", {"n": "many"}):
                pass
        except DispatchError as error:  # the plugin's error item
            kept.append(error)
    elif way == "refused":
        try:
            await dispatcher.call("refused", "echo", {})
        except DispatchError as error:
            kept.append(error)
    elif way != "completed":
        raise ValueError(f"no such way: {way!r}")


async def main(target: dict[str, Any], way: str, refused_address: str) -> None:
    if way == "stream_failed":
        # A reference cycle holding a grpc object keeps grpc's core up until the collector
        # runs, whenever that is: none may be left, so none is collected here.
        gc.disable()
    kept: list[Any] = []
    threads, descriptors = threads_and_descriptors()
    plugins = [
        {
            "id": "example",
            "version": "1.0.0",
            "target": target,
            "methods": {"echo": {}, "sleep": {}, "count": {}},
        },
        {
            "id": "refused",
            "version": "1.0.0",
            "target": {"provider": "grpc", "address": refused_address},
            "methods": {"echo": {}},
        },
    ]
    dispatcher = Dispatcher(parse_manifest({"version": 1, "plugins": plugins}, base_dir=ROOT))
    await dispatcher.start()
    try:
        await end_early(dispatcher, way, kept)
    finally:
        await dispatcher.aclose()
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        now_threads, now_descriptors = threads_and_descriptors()
        extra_threads = {k: v for k, v in now_threads.items() if k not in threads}
        extra_descriptors = {k: v for k, v in now_descriptors.items() if k not in descriptors}
        if not (extra_threads or extra_descriptors) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    print(
        json.dumps({"kept": len(kept), "threads": extra_threads, "descriptors": extra_descriptors})
    )


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]))
