"""A plugin that misbehaves on request, to test the docker provider's sandbox.

Runs only inside a container built by ``tests/test_docker.py`` (``dispatcher deploy``);
every method reports what the sandbox let it do, rather than asserting anything itself.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from linchkit_plugin import Plugin


def _outcome(action: Any) -> dict[str, Any]:
    try:
        action()
    except OSError as error:
        return {"ok": False, "errno": error.errno, "error": f"{type(error).__name__}: {error}"}
    return {"ok": True}


class Refusal(Exception):
    """The plugin's own error type: the caller should see it by name."""


class UnrulyPlugin(Plugin):
    sick = False

    async def health_check(self) -> bool:
        return not self.sick

    async def sicken(self) -> None:
        """From now on, answer /health with 503 while still answering calls."""
        self.sick = True

    async def refuse(self, reason: str) -> None:
        """Fail the call with the plugin's own error type."""
        raise Refusal(reason)

    async def whoami(self) -> dict[str, Any]:
        """Which container answered: its hostname is the container id's prefix."""
        return {"hostname": socket.gethostname(), "pid": os.getpid(), "uid": os.getuid()}

    async def nap(self, seconds: float) -> dict[str, Any]:
        """Hold a call open, for concurrency and scale-up."""
        await asyncio.sleep(seconds)
        return await self.whoami()

    def crash(self, code: int = 3) -> None:
        """Exit the plugin's process mid-call, without answering."""
        os._exit(code)

    def hog_memory(self, step_mb: int = 8) -> int:
        """Allocate (and touch) memory until the kernel kills the process."""
        hog = []
        while True:
            hog.append(b"\x01" * (step_mb << 20))

    def fork_bomb(self, hold_s: float = 2.0) -> dict[str, Any]:
        """Every process forks until the kernel refuses, then all wait ``hold_s`` and exit."""
        deadline = time.monotonic() + hold_s
        children: list[int] = []
        refused = ""
        while True:
            try:
                pid = os.fork()
            except OSError as error:
                refused = f"{type(error).__name__}: {error}"
                break
            if pid == 0:  # a child: fork on, then wait for the deadline and go
                try:
                    while time.monotonic() < deadline:
                        os.fork()
                except OSError:
                    pass
                time.sleep(max(0.0, deadline - time.monotonic()))
                os._exit(0)
            children.append(pid)
        processes = sum(1 for entry in os.listdir("/proc") if entry.isdigit())
        for pid in children:
            os.waitpid(pid, 0)
        return {"forks": len(children), "processes_at_peak": processes, "refused": refused}

    def hijack(self, target: str) -> dict[str, Any]:
        """Swap this container's socket for a symlink to ``target``, a path on the *host*
        (meaningless in here): a host that follows it talks to whatever listens there.
        The plugin's server keeps listening on its socket, renamed beside it."""
        uds = os.environ["LINCHKIT_PLUGIN_UDS"]
        os.rename(uds, uds + ".mine")
        os.symlink(target, uds)
        return {"ok": True, "socket": uds}

    def write(self, path: str) -> dict[str, Any]:
        """Try to create ``path``."""

        def attempt() -> None:
            with open(path, "w") as file:
                file.write("x")

        return _outcome(attempt)

    def connect(self, host: str, port: int) -> dict[str, Any]:
        """Try to open a TCP connection; also list the network interfaces the plugin sees."""
        result = _outcome(lambda: socket.create_connection((host, port), timeout=2).close())
        result["interfaces"] = [name for _, name in socket.if_nameindex()]
        return result

    def sandbox(self) -> dict[str, Any]:
        """What the kernel says about this process: capabilities, privileges, root mount."""
        with open("/proc/self/status") as file:
            status = dict(line.split(":", 1) for line in file if ":" in line)
        with open("/proc/self/mounts") as file:
            root = next(line for line in file if line.split()[1] == "/")
        return {
            "uid": os.getuid(),
            "gid": os.getgid(),
            "cap_effective": status["CapEff"].strip(),
            "cap_bounding": status["CapBnd"].strip(),
            "no_new_privs": status["NoNewPrivs"].strip(),
            "root_options": root.split()[3].split(","),
        }
