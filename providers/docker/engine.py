"""The local Docker engine, through aiodocker: the only module that knows the client library.

Client library: **aiodocker**. It is natively async on aiohttp, which the HTTP provider
already uses, so no second HTTP stack comes in; it takes the Engine API's JSON bodies as
documented (the sandbox is written once, in the API's own words, in ``sandbox.py``) and
raises one typed ``DockerError(status, message)``. The ``docker`` SDK is synchronous (a
thread per call), and talking to the Engine API over the Unix socket by hand would
re-write the same thin layer (versioned URLs, JSON streams, multiplexed logs).

aiodocker is the ``docker`` extra, and the manifest loader imports every provider class,
so it is imported once, in ``Engine.connect``, never when the package loads. Everything
else reaches the engine through an ``Engine``, whose failures leave as ``EngineError``
(or are settled here, where the caller has nothing to decide).

Ownership: every container carries labels naming the dispatcher process that owns it
(host, pid and that process's start time, so a reused pid is not mistaken for it). On
start the provider removes containers whose owner process is gone (a dispatcher that was
SIGKILLed), with their socket folders; on ``aclose`` it sweeps anything left with its own
label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from linchkit_plugin.errors import DispatchError, ProviderError, TargetUnavailable

if TYPE_CHECKING:
    import aiodocker

__all__ = [
    "LABEL_OWNER",
    "LABEL_PLUGIN",
    "LABEL_SOCKET_DIR",
    "Engine",
    "EngineError",
    "make_socket_root",
    "owner_labels",
    "start_failure",
]

log = logging.getLogger("dispatcher.providers.docker")

LABEL_OWNER = "org.linchkit.dispatcher.owner"
LABEL_HOST = "org.linchkit.dispatcher.host"
LABEL_PID = "org.linchkit.dispatcher.pid"
LABEL_PID_START = "org.linchkit.dispatcher.pid-start"
LABEL_PLUGIN = "org.linchkit.plugin"
LABEL_SOCKET_DIR = "org.linchkit.socket-dir"

#: A container's output line without a newline is handed on in pieces of this size, so a
#: plugin writing endlessly without one cannot grow a reader's buffer.
MAX_LOG_LINE_CHARS = 64 * 1024

# A dispatcher's socket folders live under one root per process, named after its pid so a
# later dispatcher can tell whether the process that made it is gone.
_SOCKET_ROOT_PREFIX = "linchkit-docker-"


class EngineError(Exception):
    """The engine said no: its HTTP status and message (900: it cannot be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Engine:
    """One connection to the engine; containers and images are named by id or tag."""

    def __init__(self, docker: aiodocker.Docker, error_type: type[aiodocker.DockerError]) -> None:
        self._docker = docker
        self._error_type = error_type

    @classmethod
    async def connect(cls, url: str | None = None) -> Engine:
        """Connect to ``url`` (default: ``DOCKER_HOST`` or the local socket) and check it answers."""
        try:
            import aiodocker
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ProviderError(
                "the docker provider needs aiodocker: pip install 'linchkit-dispatcher[docker]'"
            ) from None
        docker = aiodocker.Docker(url=url)
        try:
            await docker.version()
        except (aiodocker.DockerError, OSError) as error:
            await docker.close()
            raise ProviderError(
                f"cannot reach the Docker engine ({docker.docker_host}): {error}; "
                "start it with scripts/start-docker.sh"
            ) from error
        return cls(docker, aiodocker.DockerError)

    async def close(self) -> None:
        await self._docker.close()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except self._error_type as error:
            raise EngineError(error.status, error.message) from error

    # -- containers ----------------------------------------------------------------------

    async def containers(self, *labels: str) -> list[dict[str, Any]]:
        """Summaries (``GET /containers/json``) of every container with all ``labels``."""
        try:
            with self._translated():
                containers = await self._docker.containers.list(
                    all="1", filters=json.dumps({"label": list(labels)})
                )
        except EngineError as error:
            raise ProviderError(f"cannot list containers: {error.message}") from error
        return [container._container for container in containers]

    async def create(self, config: dict[str, Any], name: str) -> str:
        """Create a container from an Engine API create body; its id."""
        with self._translated():
            container = await self._docker.containers.create(config, name=name)
        return str(container.id)

    async def start(self, container_id: str) -> None:
        with self._translated():
            await self._docker.containers.container(container_id).start()

    async def inspect(self, container_id: str) -> dict[str, Any]:
        """The container's record (``GET /containers/{id}/json``)."""
        with self._translated():
            info: dict[str, Any] = await self._docker.containers.container(container_id).show()
        return info

    async def volumes_reachable(self) -> bool:
        """Whether this process can reach what is in the engine's volumes (its
        ``DockerRootDir``/volumes, 0701 root on a stock engine: as root); False when it
        cannot tell. Whether it also sees the engine's mounts there (not a rootless
        engine's) only a container tells (``Containers``)."""
        try:
            with self._translated():
                info = await self._docker.system.info()
        except EngineError:
            return False
        root = info.get("DockerRootDir")
        return bool(root) and os.access(Path(str(root)) / "volumes", os.X_OK)

    async def wait(self, container_id: str) -> dict[str, Any]:
        """Wait for the container to stop (``POST /containers/{id}/wait``); its ``State``."""
        container = self._docker.containers.container(container_id)
        with self._translated():
            await container.wait()
            state: dict[str, Any] = (await container.show()).get("State", {})
        return state

    async def running(self, container_id: str) -> bool:
        """Whether the engine says the container runs; False if it cannot say."""
        try:
            with self._translated():
                info = await self._docker.containers.container(container_id).show()
        except EngineError:
            return False
        return bool(info.get("State", {}).get("Running"))

    async def stop(self, container_id: str, timeout_s: int) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        with self._translated():
            await self._docker.containers.container(container_id).stop(t=timeout_s)

    async def force_remove(self, container_id: str, socket_dir: str | None) -> None:
        """Remove the container, running or not, and its socket folder; never raises."""
        try:
            with self._translated():
                # v: with its anonymous volumes, which the engine would otherwise keep.
                await self._docker.containers.container(container_id).delete(force=True, v=True)
        except EngineError as error:
            if error.status not in (404, 409):  # gone already, or removal in progress
                log.warning("removing container %s: %s", container_id[:12], error.message)
        if socket_dir:
            # The plugin wrote in it, as many files as it liked: deleting them can take
            # seconds, which must not be the event loop's.
            await asyncio.to_thread(shutil.rmtree, socket_dir, True)

    async def sweep(self, labels: dict[str, str]) -> None:
        """Remove every container carrying all ``labels``."""
        selector = [f"{key}={value}" for key, value in labels.items()]
        for summary in await self.containers(*selector):
            socket_dir = (summary.get("Labels") or {}).get(LABEL_SOCKET_DIR)
            await self.force_remove(summary["Id"], socket_dir)

    async def logs(self, container_id: str, lines: int = 20) -> str:
        """The container's last ``lines`` of output, for error messages; never raises."""
        container = self._docker.containers.container(container_id)
        try:
            with self._translated():
                output = await container.log(stdout=True, stderr=True, tail=lines)
        except EngineError as error:
            return f"(logs unavailable: {error.message})"
        return "".join(output).rstrip() or "(no output)"

    async def log_lines(
        self, container_id: str, *, follow: bool, lines: int
    ) -> AsyncGenerator[str, None]:
        """The container's output (stdout and stderr), line by line: its last ``lines``
        (all when negative), then, with ``follow``, each new line until it stops. A line
        longer than ``MAX_LOG_LINE_CHARS`` comes cut in pieces of that size. Failures leave
        as ``EngineError``."""
        container = self._docker.containers.container(container_id)
        tail: int | str = "all" if lines < 0 else lines
        with self._translated():
            if not follow:
                output = await container.log(stdout=True, stderr=True, tail=tail)
                for line in "".join(output).splitlines():
                    yield line
                return
            pending = ""
            # aclosing: a reader that stops early closes the engine's response now, not
            # whenever the garbage collector finalises the stream.
            # aiodocker types it an AsyncIterator; it is its ``_logs_stream`` generator.
            stream = cast(
                "AsyncGenerator[str, None]",
                container.log(stdout=True, stderr=True, follow=True, tail=tail),
            )
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    pending += chunk
                    *complete, pending = pending.split("\n")
                    for line in complete:
                        yield line.rstrip("\r")
                    while len(pending) > MAX_LOG_LINE_CHARS:
                        yield pending[:MAX_LOG_LINE_CHARS]
                        pending = pending[MAX_LOG_LINE_CHARS:]
            if pending:
                yield pending

    async def remove_orphans(self) -> list[str]:
        """Remove containers left by dispatchers on this host whose process is gone.

        Returns the names of the containers removed.
        """
        removed: list[str] = []
        host = socket.gethostname()
        for summary in await self.containers(LABEL_OWNER):
            labels: dict[str, str] = summary.get("Labels") or {}
            if labels.get(LABEL_HOST) != host or _owner_alive(labels):
                continue
            name = (summary.get("Names") or ["?"])[0].lstrip("/")
            log.warning("removing %s, left by dispatcher %s", name, labels.get(LABEL_OWNER))
            socket_dir = labels.get(LABEL_SOCKET_DIR)
            await self.force_remove(summary["Id"], socket_dir)
            if socket_dir:
                with contextlib.suppress(OSError):  # the dead dispatcher's socket root, if empty
                    Path(socket_dir).parent.rmdir()
            removed.append(name)
        _remove_empty_socket_roots()
        return removed

    # -- images --------------------------------------------------------------------------

    async def image(self, tag: str) -> dict[str, Any] | None:
        """The image's ``GET /images/{tag}/json``, or None if the engine has no such image."""
        try:
            with self._translated():
                info: dict[str, Any] = await self._docker.images.inspect(tag)
        except EngineError as error:
            if error.status == 404:
                return None
            raise
        return info

    async def build(
        self, context: IO[bytes], dockerfile: str, tag: str, labels: dict[str, str]
    ) -> None:
        """Build ``tag`` from a tar of the build context; intermediate containers are removed."""
        with self._translated():
            await self._docker.images.build(
                fileobj=context,
                encoding="identity",
                path_dockerfile=dockerfile,
                tag=tag,
                labels=labels,
                rm=True,
                forcerm=True,
            )

    async def remove_image(self, tag: str) -> None:
        with self._translated():
            await self._docker.images.delete(tag)

    def __repr__(self) -> str:
        return f"<Engine {self._docker.docker_host}>"


def start_failure(error: EngineError, image: str, label: str) -> DispatchError:
    """What a failure to create or start a container of ``label`` means to the caller."""
    message = error.message
    if error.status == 404 and "image" in message.lower():
        return ProviderError(
            f"image {image} of {label} is not in the local engine; build it with "
            f"`dispatcher deploy` (nothing is pulled from a registry): {message}"
        )
    if error.status == 900:  # aiodocker: cannot connect to the engine
        return TargetUnavailable(f"the Docker engine is unreachable: {message}")
    if error.status == 400:
        return ProviderError(f"the engine refused the container of {label}: {message}")
    return TargetUnavailable(f"the engine could not start a container of {label}: {message}")


# -- ownership ---------------------------------------------------------------------------


def owner_labels(owner: str) -> dict[str, str]:
    """The labels naming this process as the owner of a container."""
    pid = os.getpid()
    return {
        LABEL_OWNER: owner,
        LABEL_HOST: socket.gethostname(),
        LABEL_PID: str(pid),
        LABEL_PID_START: _process_start(pid) or "",
    }


def make_socket_root() -> Path:
    """A fresh folder (mode 0700) for this process's container sockets."""
    return Path(tempfile.mkdtemp(prefix=f"{_SOCKET_ROOT_PREFIX}{os.getpid()}-"))


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell reused pids apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(labels: dict[str, str]) -> bool:
    try:
        pid = int(labels.get(LABEL_PID, ""))
    except ValueError:
        return False
    started = _process_start(pid)
    if started is None:
        return False
    recorded = labels.get(LABEL_PID_START)
    return not recorded or recorded == started


def _remove_empty_socket_roots() -> None:
    """Socket folders of dead dispatchers that never started a container (or whose
    containers were removed above); only empty ones, and only if their process is gone."""
    for root in Path(tempfile.gettempdir()).glob(f"{_SOCKET_ROOT_PREFIX}*-*"):
        pid = root.name.split("-")[2]
        if pid.isdigit() and _process_start(int(pid)) is None:
            with contextlib.suppress(OSError):
                root.rmdir()
