"""Starting, watching and removing the containers of the provider's pools.

A container is started for a pool when a call needs one (``spawn``) or when the plugin is
attached with ``min_instances`` (``start``): a socket folder is made and mounted, the
container created with the sandbox of ``sandbox.py`` and the owner's labels, and the
plugin's ``GET /health`` polled until ``ready_timeout_s``. A socket folder the engine
mounted where this process does not see it (a rootless engine's) is a host folder again,
for that container and every later one. A per-container watcher
(``POST /containers/{id}/wait``) notices a container that dies, fails nothing itself
(calls in flight fail on their broken connection; the provider reports them with the
exit code and ``OOMKilled``), removes it, and starts a replacement when the pool falls
below ``min_instances``. ``retire`` stops and removes one container, ``aclose`` all of
them, with anything else carrying this dispatcher's label.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from linchkit_plugin.errors import DispatchError, ProviderError, TargetUnavailable
from linchkit_plugin.wire import encode_json
from providers.docker.channel import CHANNELS, Address
from providers.docker.engine import (
    LABEL_OWNER,
    LABEL_PLUGIN,
    LABEL_SOCKET_DIR,
    Engine,
    EngineError,
    start_failure,
)
from providers.docker.pool import Instance, Pool, death_details, death_text
from providers.docker.sandbox import SOCKET_MOUNT, SOCKET_NAME, container_config

__all__ = ["Containers"]

log = logging.getLogger("dispatcher.providers.docker")


class Containers:
    """The containers of one started provider, on one engine connection."""

    def __init__(
        self,
        engine: Engine,
        socket_root: Path,
        owner_labels: dict[str, str],
        clock: Callable[[], float],
        *,
        socket_volumes: bool = False,
    ) -> None:
        self.engine = engine
        self._socket_root = socket_root
        #: Socket folders are tmpfs volumes of the engine's (reachable here), not folders
        #: of ``socket_root`` on the host's disk (``sandbox.container_config``).
        self.socket_volumes = socket_volumes
        self._owner_labels = owner_labels
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self, pools: list[Pool]) -> None:
        """Stop every container of ``pools``, then remove anything left with the owner's
        label, and close the engine connection."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self.close_pool(pool) for pool in pools), return_exceptions=True)
        try:
            await self.engine.sweep({LABEL_OWNER: self._owner_labels[LABEL_OWNER]})
        finally:
            await self.engine.close()
            await asyncio.to_thread(shutil.rmtree, self._socket_root, True)

    def _track(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``work`` as a task that ``aclose`` cancels."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn(self, pool: Pool) -> None:
        pool.starting += 1  # now, not when the task runs: the next waiter must count it
        self._track(self._start_quietly(pool), f"docker-start {pool.label}")

    async def _start_quietly(self, pool: Pool) -> None:
        with contextlib.suppress(DispatchError):  # recorded on the pool; waiting calls report it
            await self.start(pool)

    async def start(self, pool: Pool) -> Instance:
        """Start one container; the caller has already counted it in ``pool.starting``."""
        try:
            instance = await self._run(pool)
        except Exception as error:
            failure = (
                error
                if isinstance(error, DispatchError)
                else ProviderError(f"starting a container of {pool.label} failed: {error!r}")
            )
            pool.failures += 1
            pool.last_failure = failure
            log.warning("starting a container of %s failed: %s", pool.label, failure)
            if failure is error:
                raise
            raise failure from error
        finally:
            pool.starting -= 1
            pool.notify()
        return instance

    async def _run(self, pool: Pool) -> Instance:
        try:
            return await self._run_once(pool)
        except _FolderOutOfSight as error:
            if self.socket_volumes:  # true of every container of this engine: said once
                self.socket_volumes = False
                log.warning(
                    "the engine mounts its volumes where this process does not see them"
                    " (%s is no mount point here: a rootless engine, or this process in a"
                    " mount namespace of its own): each container's socket folder is a"
                    " folder on the host's disk from now on, which its plugin may fill"
                    " without bound (NOT ENFORCED)",
                    error.folder,
                )
            return await self._run_once(pool)

    async def _run_once(self, pool: Pool) -> Instance:
        engine = self.engine
        target = pool.target
        name = f"linchkit-{_slug(pool.plugin.id)}-{secrets.token_hex(4)}"
        socket_dir: Path | None = None
        # Its VOLUMEs, which the sandbox covers with tmpfs (no image: create says so below).
        try:
            image = await engine.image(target.image)
        except EngineError as error:  # as create's: an engine gone is TargetUnavailable
            raise start_failure(error, target.image, pool.label) from error
        volumes = list(((image or {}).get("Config") or {}).get("Volumes") or {})
        # A fresh token per container: with transport tcp the plugin listens on the host's
        # loopback, where any local process could otherwise call it.
        token = secrets.token_urlsafe(32)
        env = {
            **target.env,
            "LINCHKIT_PLUGIN_CONFIG": encode_json(pool.plugin.config).decode(),
            "LINCHKIT_PLUGIN_ID": pool.plugin.id,
            "LINCHKIT_PLUGIN_VERSION": pool.plugin.version,
            "LINCHKIT_PLUGIN_TOKEN": token,
        }
        described = f"{name} of {pool.label}"
        in_volume = target.transport == "unix" and self.socket_volumes
        port: int | None = None
        if target.transport == "unix":
            env["LINCHKIT_PLUGIN_UDS"] = f"{SOCKET_MOUNT}/{SOCKET_NAME}"
            if not in_volume:
                socket_dir = self._socket_root / name
                socket_dir.mkdir()
                socket_dir.chmod(0o777)  # the container's user creates the socket; parent 0700
        else:
            port = target.port or _free_port()
            env["LINCHKIT_PLUGIN_HOST"] = "127.0.0.1"
            env["LINCHKIT_PLUGIN_PORT"] = str(port)
        config = container_config(
            target, env, socket_dir, pool.plugin.capabilities, volumes, socket_in_volume=in_volume
        )
        config["Labels"] = {
            **self._owner_labels,
            LABEL_PLUGIN: pool.plugin.key,
            LABEL_SOCKET_DIR: str(socket_dir or ""),
        }
        container_id: str | None = None
        channel = None
        try:
            try:
                container_id = await engine.create(config, name)
                await engine.start(container_id)
                # The volume's folder is the engine's to name, and the container's first
                # process its to start: both known once it runs.
                info = await engine.inspect(container_id) if in_volume or port else {}
            except EngineError as error:
                raise start_failure(error, target.image, pool.label) from error
            if port is not None:
                first = (info.get("State") or {}).get("Pid") or None
                address = Address(described, port=port, token=token, container_pid=first)
            else:
                folder = _mount_source(info, SOCKET_MOUNT) if in_volume else str(socket_dir)
                # The tmpfs is where the engine mounted it: in the engine's mount namespace.
                # Not this process's (a rootless engine's is rootlesskit's), and the folder
                # seen here is an empty one on disk, where the plugin's socket never appears.
                if in_volume and not await asyncio.to_thread(os.path.ismount, folder):
                    raise _FolderOutOfSight(folder)
                address = Address(described, unix_socket=f"{folder}/{SOCKET_NAME}", token=token)
            channel = CHANNELS[target.protocol](address)
            instance = Instance(container_id, name, socket_dir, channel, target.stop_timeout_s)
            await channel.open()
            instance.watcher = self._track(self._watch(pool, instance), f"docker-watch {name}")
            pool.instances.append(instance)
            await self._wait_ready(pool, instance)
        except BaseException:
            if channel is not None:
                await channel.aclose()
            if container_id is not None:
                pool.instances = [i for i in pool.instances if i.id != container_id]
                directory = str(socket_dir) if socket_dir else None
                await asyncio.shield(engine.force_remove(container_id, directory))
            elif socket_dir is not None:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        instance.state = "ready"
        instance.last_used = self._clock()
        log.info("container %s of %s is ready", name, pool.label)
        return instance

    async def _wait_ready(self, pool: Pool, instance: Instance) -> None:
        target = pool.target
        deadline = self._clock() + target.ready_timeout_s
        delay = 0.01
        while True:
            if instance.state == "dead" or instance.death is not None:
                raise TargetUnavailable(
                    f"container {instance.name} of {pool.label} exited before it was ready "
                    f"({death_text(instance.death)}); its last output:\n"
                    + await self.engine.logs(instance.id),
                    details=death_details(instance),
                )
            health = await instance.channel.health()
            if health.ok:
                return
            if self._clock() >= deadline:
                raise TargetUnavailable(
                    f"container {instance.name} of {pool.label} was not healthy within "
                    f"ready_timeout_s={target.ready_timeout_s} (last probe: {health.detail[:120]}); "
                    "its last output:\n" + await self.engine.logs(instance.id),
                    details={"container": instance.id},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    async def _watch(self, pool: Pool, instance: Instance) -> None:
        """Wait for the container to stop; if nobody asked it to, record why and replace it."""
        try:
            state = await self.engine.wait(instance.id)
        except EngineError as error:
            state = {"Error": error.message}
        except Exception as error:  # the engine's connection broke: treat it as lost
            state = {"Error": f"lost track of it: {error!r}"}
        if instance.state == "stopping":
            return
        was_ready = instance.state == "ready"
        instance.state = "dead"
        instance.death = {
            "exit_code": state.get("ExitCode"),
            "oom_killed": bool(state.get("OOMKilled")),
            "error": state.get("Error") or "",
        }
        pool.discard(instance)
        if not was_ready:
            return  # _run reports it and removes the container
        log.warning(
            "container %s of %s died (%s)", instance.name, pool.label, death_text(instance.death)
        )
        if pool.below_minimum():
            self.spawn(pool)
        await self.retire(instance, graceful=False)

    async def close_pool(self, pool: Pool) -> None:
        pool.closed = True
        pool.notify()
        instances, pool.instances = pool.instances, []
        await asyncio.gather(
            *(self.retire(instance, graceful=True) for instance in instances),
            return_exceptions=True,
        )

    async def retire(self, instance: Instance, *, graceful: bool) -> None:
        """Stop (SIGTERM, then SIGKILL after stop_timeout_s) and remove one container."""
        if instance.state != "dead":
            instance.state = "stopping"
        watcher = instance.watcher
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        await instance.channel.aclose()
        engine = self.engine
        if graceful:
            try:
                await engine.stop(instance.id, instance.stop_timeout_s)
            except EngineError as error:
                log.debug("stopping %s: %s", instance.name, error.message)
        await engine.force_remove(
            instance.id, str(instance.socket_dir) if instance.socket_dir else None
        )


class _FolderOutOfSight(Exception):
    """The engine mounted a container's socket folder where this process does not see it."""

    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        self.folder = folder


def _mount_source(info: dict[str, Any], destination: str) -> str:
    """Where on the host the container's mount at ``destination`` is (its ``Mounts``)."""
    for mount in info.get("Mounts") or ():
        if mount.get("Destination") == destination and mount.get("Source"):
            return str(mount["Source"])
    raise TargetUnavailable(f"the engine names no folder for the container's {destination}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:30] or "plugin"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
