"""A plugin that abuses the folder its socket lives in, for ``tests/test_docker_hostile.py``.

Not built into an image: the tests run it on the unruly plugin's image, with this folder
granted read-only (``capabilities.files``) and ``command`` naming this class, so a change
here needs no image build.
"""

from __future__ import annotations

import gc
import os
import signal
from typing import Any

from linchkit_plugin import Plugin


class HostilePlugin(Plugin):
    def fill(self, path: str, mb: int) -> dict[str, Any]:
        """Write ``mb`` MiB to ``path``; how much the sandbox let through."""
        written = 0
        chunk = b"\0" * (1 << 20)
        try:
            with open(path, "wb") as file:
                for _ in range(mb):
                    file.write(chunk)
                    written += 1
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            return {"ok": False, "errno": error.errno, "mb": written}
        return {"ok": True, "mb": written}

    def litter(self, folder: str, count: int) -> int:
        """Create ``count`` empty files in ``folder``."""
        os.makedirs(folder, exist_ok=True)
        for index in range(count):
            os.close(os.open(f"{folder}/{index}", os.O_CREAT | os.O_WRONLY, 0o600))
        return count

    def crash(self) -> None:
        os._exit(3)

    async def deaf(self) -> int:
        """Ignore SIGTERM from now on: only the SIGKILL after stop_timeout_s ends it."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return os.getpid()

    async def stop_listening(self) -> int:
        """Close this server's listening sockets and keep serving the connections open,
        as a server about to listen again (a reload) does: for a moment its port is free."""
        import uvicorn  # the SDK's server, on this image

        servers = [
            listening
            for each in gc.get_objects()
            if isinstance(each, uvicorn.Server)
            for listening in getattr(each, "servers", ())
        ]
        for server in servers:
            server.close()
        return len(servers)
