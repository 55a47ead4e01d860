"""Execution environments: Lambda runtime containers for function versions, started and reused.

``Environments`` hands out one execution environment (a container of the runtime image:
``awslambdaric`` under ``aws-lambda-rie``) per concurrent invocation of a function version
and takes it back afterwards:

* ``acquire(function)``: a warm idle environment of the same ``Function.key`` if there is
  one, else a new container (a cold start, counted in ``cold_starts``); ``None`` when
  ``max_environments`` containers exist and none is idle to evict. ``acquire_waiting``
  waits for a release instead of answering ``None``.
* ``release(environment, healthy)``: back to idle, or removed if the invocation broke it.
* ``invocation_log(environment)``: the runtime's log lines of its last invocation.
* ``aclose()``: removes every container it started.

Each container uses the host network (the only one here) on two free loopback ports, one
for the emulator's Invoke endpoint, one for the Runtime API, and carries the labels
``DockerEngine.orphans`` recognises. It is locked down: read-only root, a ``/tmp`` tmpfs,
no capabilities, the function's memory as its limit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from dispatcher.testing.local_lambda.code import CodeStore
from dispatcher.testing.local_lambda.engine import DockerEngine
from dispatcher.testing.local_lambda.errors import LocalLambdaError
from dispatcher.testing.local_lambda.function import Function

__all__ = ["DEFAULT_RUNTIME_IMAGE", "Environment", "Environments"]

# One logger for the whole local Lambda, as when it was one module.
log = logging.getLogger("dispatcher.testing.lambda")

DEFAULT_RUNTIME_IMAGE = os.environ.get("LAMBDA_RUNTIME_IMAGE", "linchkit-lambda-python:3.11")


@dataclass(eq=False)
class Environment:
    """One execution environment: a runtime container serving one invocation at a time."""

    key: str
    container: str
    invoke_url: str
    function_name: str
    invocations: int = 0


class Environments:
    """The runtime containers of one local Lambda, at most ``max_environments`` at a time."""

    def __init__(
        self, docker: DockerEngine, code: CodeStore, *, image: str, max_environments: int
    ) -> None:
        self.docker = docker
        self.image = image
        self.max_environments = max_environments
        self.cold_starts = 0
        #: Removals of evicted containers, still running.
        self.background: set[asyncio.Task[Any]] = set()
        self._code = code
        self._idle: dict[str, list[Environment]] = defaultdict(list)
        self._all: set[Environment] = set()
        self._starting = 0
        self._released = asyncio.Event()

    def __len__(self) -> int:
        return len(self._all)

    async def aclose(self) -> None:
        """Remove every container; pending removals are the caller's to cancel first."""
        environments, self._all = list(self._all), set()
        self._idle.clear()
        await asyncio.gather(
            *(self.docker.remove(env.container) for env in environments), return_exceptions=True
        )

    async def acquire(self, function: Function) -> Environment | None:
        idle = self._idle.get(function.key)
        if idle:
            return idle.pop()
        full = len(self._all) + self._starting >= self.max_environments
        if full and not self._evict_idle(keep=function.key):
            return None
        self._starting += 1
        try:
            try:
                environment = await self._start(function)
            except LocalLambdaError as error:
                # The free ports were picked before the container bound them; another
                # process may have taken one in between. Once more, on new ports.
                log.warning(
                    "starting an environment of %s failed, retrying: %s", function.name, error
                )
                environment = await self._start(function)
        finally:
            self._starting -= 1
        self._all.add(environment)
        self.cold_starts += 1
        return environment

    async def acquire_waiting(self, function: Function) -> Environment:
        """``acquire``, waiting for a release while every environment is busy."""
        while (environment := await self.acquire(function)) is None:
            self._released.clear()
            await self._released.wait()
        return environment

    async def release(self, environment: Environment, healthy: bool) -> None:
        if environment not in self._all:
            return
        self._released.set()
        if healthy:
            self._idle[environment.key].append(environment)
            return
        self._all.discard(environment)
        await self.docker.remove(environment.container)

    async def invocation_log(self, environment: Environment) -> list[str]:
        """The log lines of the environment's last invocation, ``START`` to ``REPORT``."""
        # The runtime writes START/END/REPORT around each invocation's output; one
        # invocation at a time per environment, so the last START..REPORT is this one.
        # REPORT may reach the engine's log a moment after the answer: poll for up to ~1 s.
        lines: list[str] = []
        for _ in range(50):
            lines = await self.docker.logs(environment.container)
            starts = [i for i, line in enumerate(lines) if line.startswith("START RequestId:")]
            if starts and any(line.startswith("REPORT RequestId:") for line in lines[starts[-1] :]):
                return lines[starts[-1] :]
            await asyncio.sleep(0.02)
        return lines

    def _evict_idle(self, keep: str) -> bool:
        """Remove the least recently idle environment, of another function version first."""
        candidates = sorted(self._idle.items(), key=lambda item: item[0] == keep)
        for key, idle in candidates:
            if idle:
                environment = idle.pop(0)
                self._all.discard(environment)
                task = asyncio.get_running_loop().create_task(
                    self.docker.remove(environment.container)
                )
                self.background.add(task)
                task.add_done_callback(self.background.discard)
                log.debug("evicted an idle environment of %s", key)
                return True
        return False

    async def _start(self, function: Function) -> Environment:
        code = self._code.directory(function)
        invoke_port, runtime_port = _free_ports(2)
        variables = {
            "AWS_LAMBDA_FUNCTION_NAME": function.name,
            "AWS_LAMBDA_FUNCTION_VERSION": function.version,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.memory_mb),
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(function.timeout),
            "AWS_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            **function.environment,
        }
        body = {
            "Image": self.image,
            "Cmd": [
                "--runtime-interface-emulator-address",
                f"127.0.0.1:{invoke_port}",
                "--runtime-api-address",
                f"127.0.0.1:{runtime_port}",
                "/usr/bin/python3",
                "-m",
                "awslambdaric",
                function.handler,
            ],
            "Env": [f"{key}={value}" for key, value in variables.items()],
            "Labels": {
                "linchkit.local-lambda": function.name,
                "linchkit.owner-pid": str(os.getpid()),
            },
            "HostConfig": {
                "NetworkMode": "host",
                "Binds": [f"{code}:/var/task:ro"],
                "Memory": max(function.memory_mb, 128) * 1024 * 1024,
                "MemorySwap": max(function.memory_mb, 128) * 1024 * 1024,
                "PidsLimit": 256,
                "ReadonlyRootfs": True,
                "Tmpfs": {"/tmp": "rw,mode=1777,size=512m"},
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges:true"],
            },
        }
        container = await self.docker.run(body)
        environment = Environment(
            function.key,
            container,
            f"http://127.0.0.1:{invoke_port}/2015-03-31/functions/function/invocations",
            function.name,
        )
        try:
            await self._wait_listening(container, invoke_port)
        except BaseException:
            await self.docker.remove(container)
            raise
        return environment

    async def _wait_listening(self, container: str, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline or not await self.docker.running(container):
                    logs = await self.docker.logs(container, tail=20)
                    raise LocalLambdaError(
                        f"runtime container did not listen on {port}: {' | '.join(logs)}"
                    ) from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free right now (a container binds them later)."""
    # All bound at once, so the kernel cannot hand out the same port twice.
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
