"""One dispatcher process running job workers: ``python tests/job_worker.py MANIFEST``.

Prints ``ready`` once started, then runs until stdin closes (a clean stop) or it is
killed (the crash test's SIGKILL).
"""

from __future__ import annotations

import asyncio
import sys

from dispatcher import Dispatcher


async def main(path: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with Dispatcher.from_file(path):
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await reader.read()  # until EOF


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
