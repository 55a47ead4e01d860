"""Local containers: a plugin image run by the local Docker engine, sandboxed, on demand.

A ``provider: docker`` target is an image plus how to speak to it. The provider keeps a
pool of containers per plugin target: it starts one on the first call (cold start) or
``min_instances`` when the dispatcher starts, waits for the plugin's ``GET /health``
(``ready_timeout_s``), reuses warm containers, starts more up to ``max_instances`` while
every running one already has ``concurrency`` calls in flight, stops a container idle for
``idle_timeout_s`` (down to ``min_instances``), and removes them all in ``aclose``.

Client library: **aiodocker**. It is natively async on aiohttp, which the HTTP provider
already uses, so no second HTTP stack comes in; it takes the Engine API's JSON bodies as
documented (the sandbox below is written once, in the API's own words) and raises one
typed ``DockerError(status, message)``. The ``docker`` SDK is synchronous (a thread per
call), and talking to the Engine API over the Unix socket by hand would re-write the same
thin layer (versioned URLs, JSON streams, multiplexed logs). It is imported in ``start``,
not when this module loads.

Speaking to a container: the HTTP envelope (``docs/protocol.md``), sent by the HTTP
provider's own code (one ``HttpProvider`` per container, over a Unix socket or a loopback
port). ``protocol`` is the seam for gRPC: ``_Channel`` is what the provider needs of a
wire (``invoke``/``invoke_batch``/``health``/``aclose``), ``_CHANNELS`` maps each protocol
to its implementation, and ``_HttpChannel`` is the only one today.

Sandbox by default (each relaxation is a key under ``sandbox`` in the manifest):

    read-only root filesystem, tmpfs /tmp (mode 1777)       sandbox.read_only_root
    every capability dropped                                sandbox.drop_all_capabilities
    no-new-privileges                                       sandbox.no_new_privileges
    non-root user 65534:65534                               sandbox.user
    no network at all; the plugin listens on a Unix         sandbox.network: host
      socket in a directory mounted from the host           (with transport: tcp, the
                                                              plugin binds 127.0.0.1)
    memory (no swap), CPU and pids limits                   limits.memory_mb/cpus/pids
    an init process (tini) reaps orphans, forwards SIGTERM

Ownership: every container carries labels naming the dispatcher process that owns it
(host, pid and that process's start time, so a reused pid is not mistaken for it). On
start the provider removes containers whose owner process is gone (a dispatcher that
was SIGKILLed); on ``aclose`` it stops its own and sweeps anything left with its label.
A per-container watcher (``POST /containers/{id}/wait``) notices a container that dies,
fails nothing itself (calls in flight fail on their broken connection and are reported
with the exit code and ``OOMKilled``), removes it, and starts a replacement when the pool
falls below ``min_instances``; without ``min_instances`` the next call starts one. One
background loop per provider stops idle containers and probes each ready container's
``/health`` every ``health_interval_s``; after ``unhealthy_after`` failures in a row the
container is killed and replaced the same way (a hung plugin does not exit by itself).

Errors, all translated here:

    engine unreachable at start                   ProviderError (how to start it)
    image not in the local engine                 ProviderError (run ``dispatcher deploy``)
    other engine failure creating/starting        TargetUnavailable (retryable)
    container exits or is not healthy in time     TargetUnavailable, with its last log lines
    container dies mid-call (crash, OOM kill)     TargetUnavailable (retryable), details:
                                                  container, exit_code, oom_killed
    no free container before the call's deadline  DeadlineExceeded
    anything the plugin answers                   as the HTTP provider maps it
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import py_compile
import re
import secrets
import shutil
import socket
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import cache_from_source
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    ProviderError,
    TargetUnavailable,
)
from providers.base import Health, Provider
from providers.http import HttpProvider, HttpTarget
from providers.invocation import Invocation, Outcome
from providers.target import TargetConfig

if TYPE_CHECKING:
    import aiodocker
    from aiodocker.containers import DockerContainer

    from providers.target import PluginInfo

__all__ = [
    "BASE_IMAGE",
    "LABEL_OWNER",
    "DockerBuild",
    "DockerLimits",
    "DockerProvider",
    "DockerSandbox",
    "DockerTarget",
]

log = logging.getLogger("dispatcher.providers.docker")

BASE_IMAGE = "linchkit/python-base:latest"
LABEL_OWNER = "org.linchkit.dispatcher.owner"
LABEL_HOST = "org.linchkit.dispatcher.host"
LABEL_PID = "org.linchkit.dispatcher.pid"
LABEL_PID_START = "org.linchkit.dispatcher.pid-start"
LABEL_PLUGIN = "org.linchkit.plugin"
LABEL_SOCKET_DIR = "org.linchkit.socket-dir"
SOCKET_MOUNT = "/run/linchkit"
SOCKET_NAME = "plugin.sock"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DockerLimits(_Frozen):
    """Resources of one container; enforced by the engine's cgroups."""

    memory_mb: int = Field(default=256, ge=16, description="Memory; swap is not allowed.")
    cpus: float = Field(default=1.0, gt=0, description="CPU share, in cores.")
    pids: int = Field(default=64, ge=8, description="Processes and threads, together.")
    tmp_mb: int = Field(default=64, ge=1, description="Size of the tmpfs at /tmp.")


class DockerSandbox(_Frozen):
    """How the container is locked down. Every default is the safe choice."""

    read_only_root: bool = True
    drop_all_capabilities: bool = True
    no_new_privileges: bool = True
    user: str = Field(default="65534:65534", pattern=r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$")
    network: Literal["none", "host"] = Field(
        default="none", description="'host' lets the plugin reach the network (and be reached)."
    )


class DockerBuild(_Frozen):
    """How ``dispatcher deploy`` builds ``image``: a Python plugin class on the base image,
    or any Dockerfile (``FROM scratch`` plus a static binary for Go and Rust plugins)."""

    context: Path = Field(description="Folder sent to the engine, relative to the manifest.")
    entrypoint: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", examples=["echo_plugin:Echo"]
    )
    dockerfile: str | None = Field(default=None, description="Path inside the context.")
    base_image: str = BASE_IMAGE

    @field_validator("context")
    @classmethod
    def _relative_to_manifest(cls, path: Path, info: ValidationInfo) -> Path:
        if path.is_absolute():
            return path
        base = (info.context or {}).get("base_dir", Path.cwd())
        return (Path(base) / path).resolve()

    @model_validator(mode="after")
    def _one_recipe(self) -> DockerBuild:
        if (self.entrypoint is None) == (self.dockerfile is None):
            raise ValueError("set exactly one of 'entrypoint' (a Python plugin) or 'dockerfile'")
        return self


class DockerTarget(TargetConfig):
    """``provider: docker``: a plugin image run as local, sandboxed containers."""

    provider: Literal["docker"]
    image: str = Field(min_length=1, examples=["linchkit/echo-plugin:1.0.0"])
    protocol: Literal["http"] = Field(
        default="http", description="The envelope over HTTP; gRPC will be another channel."
    )
    transport: Literal["unix", "tcp"] = Field(
        default="unix",
        description="unix: a socket in a mounted folder (works without network); "
        "tcp: 127.0.0.1 on the host network (needs sandbox.network: host).",
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="tcp only; default: a free port per container."
    )
    command: list[str] | None = Field(default=None, description="Overrides the image's CMD.")
    env: dict[str, str] = Field(default_factory=dict)
    limits: DockerLimits = Field(default_factory=DockerLimits)
    sandbox: DockerSandbox = Field(default_factory=DockerSandbox)
    min_instances: int = Field(default=0, ge=0)
    max_instances: int = Field(default=4, ge=1)
    concurrency: int = Field(default=32, ge=1, description="Calls in flight per container.")
    idle_timeout_s: float = Field(default=300.0, gt=0)
    ready_timeout_s: float = Field(default=30.0, gt=0)
    stop_timeout_s: int = Field(default=5, ge=0, description="SIGTERM to SIGKILL.")
    health_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="How often each ready container's /health is probed; 0: never.",
    )
    unhealthy_after: int = Field(
        default=3, ge=1, description="Failed probes in a row before a container is replaced."
    )
    build: DockerBuild | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DockerTarget:
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances cannot exceed max_instances")
        if self.transport == "tcp" and self.sandbox.network != "host":
            raise ValueError(
                "transport tcp needs sandbox.network: host (only the host and none networks "
                "exist here); keep transport unix to run without network"
            )
        if self.transport == "unix" and self.port is not None:
            raise ValueError("port is for transport tcp")
        if self.port is not None and self.max_instances > 1:
            raise ValueError("a fixed port allows max_instances: 1 only; leave port unset")
        return self

    def describe(self) -> str:
        return f"docker {self.image}"


# -- one container -----------------------------------------------------------------------


class _ContainerHttpTarget(HttpTarget):
    """An HTTP target whose error messages name the container, not a made-up URL."""

    container: str

    def describe(self) -> str:
        return f"container {self.container}"


@dataclass(frozen=True, slots=True)
class _Address:
    """Where one container listens: a Unix socket on the host, or a loopback port."""

    container: str  # for messages: "linchkit-echo-1a2b3c4d of echo@1.0.0 (image)"
    unix_socket: str | None = None
    port: int | None = None


class _Channel(Protocol):
    """How the provider speaks to one container: one implementation per ``protocol``.

    The seam for gRPC: a ``_GrpcChannel`` built on the grpc provider's client, added to
    ``_CHANNELS``, is all a ``protocol: grpc`` target needs (plus the Literal's new value).
    """

    async def open(self) -> None: ...
    async def invoke(self, invocation: Invocation) -> Any: ...
    async def invoke_batch(self, invocations: Sequence[Invocation]) -> list[Outcome[Any]]: ...
    async def health(self) -> Health: ...
    async def aclose(self) -> None: ...


class _HttpChannel:
    """Speaks the HTTP envelope to one container, through the HTTP provider's code."""

    def __init__(self, address: _Address) -> None:
        if address.unix_socket is not None:
            # The host part of the URL is only a label: the connector dials the socket.
            url = "http://container"
        else:
            url = f"http://127.0.0.1:{address.port}"
        self._http = HttpProvider(unix_socket=address.unix_socket, max_connections=64)
        self._target = _ContainerHttpTarget(provider="http", url=url, container=address.container)

    async def open(self) -> None:
        await self._http.start()

    async def invoke(self, invocation: Invocation) -> Any:
        return await self._http.invoke(self._target, invocation)

    async def invoke_batch(self, invocations: Sequence[Invocation]) -> list[Outcome[Any]]:
        return await self._http.invoke_batch(self._target, invocations)

    async def health(self) -> Health:
        return await self._http.health(self._target)

    async def aclose(self) -> None:
        await self._http.aclose()


_CHANNELS: dict[str, Callable[[_Address], _Channel]] = {"http": _HttpChannel}


class _Instance:
    """One running container of a pool."""

    __slots__ = (
        "channel",
        "container",
        "death",
        "failed_probes",
        "id",
        "inflight",
        "last_used",
        "name",
        "next_probe",
        "socket_dir",
        "state",
        "stop_timeout_s",
        "watcher",
    )

    def __init__(
        self,
        container: DockerContainer,
        name: str,
        socket_dir: Path | None,
        channel: _Channel,
        stop_timeout_s: int,
    ) -> None:
        self.container = container
        self.stop_timeout_s = stop_timeout_s
        self.id: str = container.id
        self.name = name
        self.socket_dir = socket_dir
        self.channel = channel
        self.inflight = 0
        self.last_used = 0.0
        self.next_probe = 0.0
        self.failed_probes = 0
        self.state: Literal["starting", "ready", "stopping", "dead"] = "starting"
        self.death: dict[str, Any] | None = None
        self.watcher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<container {self.name} {self.id[:12]} {self.state} inflight={self.inflight}>"


class _Pool:
    """The containers of one plugin target, and the calls waiting for one."""

    def __init__(self, plugin: PluginInfo, target: DockerTarget) -> None:
        self.plugin = plugin
        self.target = target
        self.label = f"{plugin.key} ({target.image})"
        self.instances: list[_Instance] = []
        self.starting = 0
        self.waiting = 0
        self.failures = 0
        self.last_failure: DispatchError | None = None
        self.closed = False
        self._changed = asyncio.Event()

    def ready(self) -> list[_Instance]:
        return [instance for instance in self.instances if instance.state == "ready"]

    def free(self) -> _Instance | None:
        best: _Instance | None = None
        for instance in self.instances:
            if (
                instance.state == "ready"
                and instance.inflight < self.target.concurrency
                and (best is None or instance.inflight < best.inflight)
            ):
                best = instance
        return best

    def should_start(self) -> bool:
        live = len(self.instances) + self.starting
        capacity_coming = self.starting * self.target.concurrency
        return live < self.target.max_instances and self.waiting > capacity_coming

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        event = self._changed
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass

    def __repr__(self) -> str:
        return (
            f"<pool {self.label} instances={self.instances} starting={self.starting} "
            f"waiting={self.waiting}>"
        )


# -- the provider ------------------------------------------------------------------------


class DockerProvider(Provider[DockerTarget]):
    name = "docker"
    target_model = DockerTarget
    native_batch = True

    def __init__(
        self,
        *,
        docker_url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        reap_interval_s: float | None = None,
    ) -> None:
        """``docker_url``: the engine (default: ``DOCKER_HOST`` or the local socket).
        ``reap_interval_s``: how often idle and unhealthy containers are looked for
        (default: the shortest of a quarter of each ``idle_timeout_s`` and each
        ``health_interval_s``, between 0.05 and 5 s)."""
        self._docker_url = docker_url
        self._clock = clock
        self._reap_interval_s = reap_interval_s
        self._docker: aiodocker.Docker | None = None
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._socket_root: Path | None = None
        pid = os.getpid()
        self.owner = f"{socket.gethostname()}-{pid}-{secrets.token_hex(4)}"
        self._owner_labels = {
            LABEL_OWNER: self.owner,
            LABEL_HOST: socket.gethostname(),
            LABEL_PID: str(pid),
            LABEL_PID_START: _process_start(pid) or "",
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._docker = await self._connect()
        self._socket_root = Path(tempfile.mkdtemp(prefix=f"linchkit-docker-{os.getpid()}-"))
        try:
            await self.remove_orphans()
        except BaseException:
            await self.aclose()  # the dispatcher only closes providers that started
            raise
        self._reaper = asyncio.create_task(self._maintain(), name="docker-reaper-and-prober")

    async def attach(self, plugin: PluginInfo, target: DockerTarget) -> None:
        key = (plugin.id, plugin.version, id(target))
        if key in self._pools:
            return
        pool = self._pools[key] = _Pool(plugin, target)
        if target.min_instances:
            pool.starting += target.min_instances
            starts = [self._start_instance(pool) for _ in range(target.min_instances)]
            results = await asyncio.gather(*starts, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def detach(self, plugin: PluginInfo, target: DockerTarget) -> None:
        pool = self._pools.pop((plugin.id, plugin.version, id(target)), None)
        if pool is not None:
            await self._close_pool(pool)

    async def aclose(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.closed = True
            pool.notify()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._close_pool(pool) for pool in pools), return_exceptions=True)
        docker, self._docker = self._docker, None
        if docker is not None:
            try:
                await self._sweep(docker, {LABEL_OWNER: self.owner})
            finally:
                await docker.close()
        if self._socket_root is not None:
            shutil.rmtree(self._socket_root, ignore_errors=True)
            self._socket_root = None

    async def remove_orphans(self) -> list[str]:
        """Remove containers left by dispatchers on this host whose process is gone.

        Called by ``start``; returns the names of the containers removed.
        """
        docker = self._require_docker()
        removed: list[str] = []
        host = socket.gethostname()
        for summary in await self._list(docker, LABEL_OWNER):
            labels: dict[str, str] = summary.get("Labels") or {}
            if labels.get(LABEL_HOST) != host or _owner_alive(labels):
                continue
            name = (summary.get("Names") or ["?"])[0].lstrip("/")
            log.warning("removing %s, left by dispatcher %s", name, labels.get(LABEL_OWNER))
            socket_dir = labels.get(LABEL_SOCKET_DIR)
            await self._force_remove(docker, summary["Id"], socket_dir)
            if socket_dir:
                with contextlib.suppress(OSError):  # the dead dispatcher's socket root, if empty
                    Path(socket_dir).parent.rmdir()
            removed.append(name)
        _remove_empty_socket_roots()
        return removed

    # -- calls ---------------------------------------------------------------------------

    async def invoke(self, target: DockerTarget, invocation: Invocation) -> Any:
        pool = self._pool(target, invocation)
        instance = await self._acquire(pool, invocation)
        try:
            return await instance.channel.invoke(invocation)
        except TargetUnavailable as error:
            raise await self._explain(pool, instance, error) from error
        finally:
            self._release(pool, instance)

    async def invoke_batch(
        self, target: DockerTarget, invocations: Sequence[Invocation]
    ) -> list[Outcome[Any]]:
        if not invocations:
            return []
        pool = self._pool(target, invocations[0])
        earliest = min(invocations, key=lambda invocation: invocation.deadline)
        instance = await self._acquire(pool, earliest)
        try:
            return await instance.channel.invoke_batch(invocations)
        except TargetUnavailable as error:
            raise await self._explain(pool, instance, error) from error
        finally:
            self._release(pool, instance)

    async def health(self, target: DockerTarget) -> Health:
        pools = [pool for pool in self._pools.values() if pool.target is target]
        ready = [instance for pool in pools for instance in pool.ready()]
        if ready:
            reports = await asyncio.gather(*(instance.channel.health() for instance in ready))
            failing = [report for report in reports if not report.ok]
            if failing:
                return Health(
                    "not_serving",
                    f"{len(failing)} of {len(ready)} containers unhealthy: {failing[0].detail}",
                )
            latency = max(report.latency_ms or 0.0 for report in reports)
            plural = "s" if len(ready) != 1 else ""
            return Health("serving", f"{len(ready)} container{plural} ready", latency)
        docker = self._require_docker()
        import aiodocker

        try:
            await docker.images.inspect(target.image)
        except aiodocker.DockerError as error:
            return Health("not_serving", f"image {target.image}: {error.message}")
        return Health("serving", "no container running; the next call starts one")

    # -- deploy --------------------------------------------------------------------------

    async def deploy(self, plugin: PluginInfo, target: DockerTarget) -> str:
        """Build ``target.image`` from ``target.build`` with the local engine (no registry)."""
        if target.build is None:
            raise ProviderError(
                f"{plugin.key}: target {target.image} has no 'build' section to deploy from"
            )
        build = target.build
        if not build.context.is_dir():
            raise ProviderError(f"{plugin.key}: build context {build.context} is not a folder")
        context, dockerfile = _build_context(plugin, build)
        import aiodocker

        docker = self._docker or await self._connect()
        started = time.perf_counter()
        try:
            await docker.images.build(
                fileobj=context,
                encoding="identity",
                path_dockerfile=dockerfile,
                tag=target.image,
                labels={LABEL_PLUGIN: plugin.key},
                rm=True,
                forcerm=True,
            )
            image = await docker.images.inspect(target.image)
        except aiodocker.DockerError as error:
            raise ProviderError(
                f"building {target.image} for {plugin.key} failed: {error.message}"
            ) from error
        finally:
            if docker is not self._docker:
                await docker.close()
        size_mb = float(image.get("Size", 0)) / 1e6
        seconds = time.perf_counter() - started
        return f"built {target.image} ({image['Id'][7:19]}, {size_mb:.0f} MB) in {seconds:.1f} s"

    # -- the pool ------------------------------------------------------------------------

    def _pool(self, target: DockerTarget, invocation: Invocation) -> _Pool:
        pool = self._pools.get((invocation.plugin, invocation.version, id(target)))
        if pool is None:
            raise TargetUnavailable(
                f"{invocation.plugin}@{invocation.version} is not attached to the docker provider"
            )
        return pool

    async def _acquire(self, pool: _Pool, invocation: Invocation) -> _Instance:
        instance = pool.free()
        if instance is not None:
            instance.inflight += 1
            return instance
        pool.waiting += 1
        failures_before = pool.failures
        try:
            while True:
                if pool.closed:
                    raise TargetUnavailable(f"{pool.label} is shutting down")
                if pool.should_start():
                    self._spawn(pool)
                remaining = invocation.remaining()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"no container of {pool.label} was free before the call's deadline "
                        f"({len(pool.ready())} ready, {pool.starting} starting, "
                        f"max_instances={pool.target.max_instances})"
                    )
                await pool.changed(remaining)
                instance = pool.free()
                if instance is not None:
                    instance.inflight += 1
                    return instance
                failed = pool.failures > failures_before and pool.last_failure is not None
                if failed and not pool.starting and not pool.ready():
                    raise _copy(pool.last_failure)  # type: ignore[arg-type]
        finally:
            pool.waiting -= 1

    def _release(self, pool: _Pool, instance: _Instance) -> None:
        instance.inflight -= 1
        instance.last_used = self._clock()
        if pool.waiting:
            pool.notify()

    def _spawn(self, pool: _Pool) -> None:
        pool.starting += 1  # now, not when the task runs: the next waiter must count it
        task = asyncio.create_task(self._start_quietly(pool), name=f"docker-start {pool.label}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_quietly(self, pool: _Pool) -> None:
        with contextlib.suppress(DispatchError):  # recorded on the pool; waiting calls report it
            await self._start_instance(pool)

    async def _start_instance(self, pool: _Pool) -> _Instance:
        """Start one container; the caller has already counted it in ``pool.starting``."""
        try:
            instance = await self._run_container(pool)
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

    async def _run_container(self, pool: _Pool) -> _Instance:
        import aiodocker

        docker = self._require_docker()
        target = pool.target
        name = f"linchkit-{_slug(pool.plugin.id)}-{secrets.token_hex(4)}"
        socket_dir: Path | None = None
        env = {
            **target.env,
            "LINCHKIT_PLUGIN_CONFIG": json.dumps(pool.plugin.config),
            "LINCHKIT_PLUGIN_ID": pool.plugin.id,
            "LINCHKIT_PLUGIN_VERSION": pool.plugin.version,
        }
        if target.transport == "unix":
            assert self._socket_root is not None
            socket_dir = self._socket_root / name
            socket_dir.mkdir()
            socket_dir.chmod(0o777)  # the container's user creates the socket; parent is 0700
            env["LINCHKIT_PLUGIN_UDS"] = f"{SOCKET_MOUNT}/{SOCKET_NAME}"
            address = _Address(f"{name} of {pool.label}", unix_socket=str(socket_dir / SOCKET_NAME))
        else:
            port = target.port or _free_port()
            env["LINCHKIT_PLUGIN_HOST"] = "127.0.0.1"
            env["LINCHKIT_PLUGIN_PORT"] = str(port)
            address = _Address(f"{name} of {pool.label}", port=port)
        channel = _CHANNELS[target.protocol](address)
        config = _container_config(target, env, socket_dir)
        config["Labels"] = {
            **self._owner_labels,
            LABEL_PLUGIN: pool.plugin.key,
            LABEL_SOCKET_DIR: str(socket_dir or ""),
        }
        container: DockerContainer | None = None
        try:
            try:
                container = await docker.containers.create(config, name=name)
                await container.start()
            except aiodocker.DockerError as error:
                raise _engine_error(error, target, pool.label) from error
            instance = _Instance(container, name, socket_dir, channel, target.stop_timeout_s)
            await channel.open()
            instance.watcher = asyncio.create_task(
                self._watch(pool, instance), name=f"docker-watch {name}"
            )
            self._tasks.add(instance.watcher)
            instance.watcher.add_done_callback(self._tasks.discard)
            pool.instances.append(instance)
            await self._wait_ready(pool, instance)
        except BaseException:
            await channel.aclose()
            if container is not None:
                pool.instances = [i for i in pool.instances if i.id != container.id]
                await asyncio.shield(self._force_remove(docker, container.id, str(socket_dir)))
            elif socket_dir is not None:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        instance.state = "ready"
        instance.last_used = self._clock()
        log.info("container %s of %s is ready", name, pool.label)
        return instance

    async def _wait_ready(self, pool: _Pool, instance: _Instance) -> None:
        target = pool.target
        deadline = self._clock() + target.ready_timeout_s
        delay = 0.01
        while True:
            if instance.state == "dead" or instance.death is not None:
                raise TargetUnavailable(
                    f"container {instance.name} of {pool.label} exited before it was ready "
                    f"({_death_text(instance.death)}); its last output:\n"
                    + await self._logs(instance),
                    details=_death_details(instance),
                )
            health = await instance.channel.health()
            if health.ok:
                return
            if self._clock() >= deadline:
                raise TargetUnavailable(
                    f"container {instance.name} of {pool.label} was not healthy within "
                    f"ready_timeout_s={target.ready_timeout_s} (last probe: {health.detail[:120]}); "
                    "its last output:\n" + await self._logs(instance),
                    details={"container": instance.id},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    async def _watch(self, pool: _Pool, instance: _Instance) -> None:
        """Wait for the container to stop; if nobody asked it to, record why and replace it."""
        import aiodocker

        try:
            await instance.container.wait()
            state = (await instance.container.show()).get("State", {})
        except aiodocker.DockerError as error:
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
        pool.instances = [i for i in pool.instances if i is not instance]
        pool.notify()
        if not was_ready:
            return  # _run_container reports it and removes the container
        log.warning(
            "container %s of %s died (%s)", instance.name, pool.label, _death_text(instance.death)
        )
        if not pool.closed and len(pool.instances) + pool.starting < pool.target.min_instances:
            self._spawn(pool)
        await self._retire(instance, graceful=False)

    async def _explain(
        self, pool: _Pool, instance: _Instance, error: TargetUnavailable
    ) -> DispatchError:
        """A broken call: if its container died, say so, with the exit code and OOM kill."""
        if error.__cause__ is None:
            return error  # the plugin answered (an error envelope, a 5xx): it is alive
        if instance.death is None and instance.state != "stopping":
            # The socket breaks a moment before the engine reports the exit: give the
            # watcher up to 2 s to record it, then ask the engine directly.
            for _ in range(40):
                if instance.death is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                if await self._running(instance):
                    return error
        return TargetUnavailable(
            f"container {instance.name} of {pool.label} died mid-call "
            f"({_death_text(instance.death)}); the call may be retried on a new container",
            details=_death_details(instance),
        )

    async def _running(self, instance: _Instance) -> bool:
        import aiodocker

        try:
            state = (await instance.container.show()).get("State", {})
        except aiodocker.DockerError:
            return False
        return bool(state.get("Running"))

    async def _maintain(self) -> None:
        """The provider's one background loop: stop idle containers, probe ready ones."""
        while True:
            await asyncio.sleep(self._tick())
            try:
                await self.stop_idle()
                await self._probe_once()
            except Exception:  # the loop must outlive one failed stop or probe
                log.exception("looking after the containers failed")

    async def _probe_once(self) -> None:
        now = self._clock()
        due = [
            (pool, instance)
            for pool in self._pools.values()
            if pool.target.health_interval_s > 0
            for instance in pool.ready()
            if instance.next_probe <= now
        ]
        reports = await asyncio.gather(*(instance.channel.health() for _, instance in due))
        for (pool, instance), report in zip(due, reports, strict=True):
            instance.next_probe = now + pool.target.health_interval_s
            instance.failed_probes = 0 if report.ok else instance.failed_probes + 1
            if instance.failed_probes < pool.target.unhealthy_after or instance.state != "ready":
                continue
            log.warning(
                "replacing %s of %s: %d failed health probes (%s)",
                instance.name, pool.label, instance.failed_probes, report.detail[:120],
            )  # fmt: skip
            instance.state = "stopping"
            instance.death = {
                "exit_code": None,
                "oom_killed": False,
                "error": f"stopped after {instance.failed_probes} failed health probes",
            }
            pool.instances = [i for i in pool.instances if i is not instance]
            pool.notify()
            if not pool.closed and len(pool.instances) + pool.starting < pool.target.min_instances:
                self._spawn(pool)
            await self._retire(instance, graceful=False)

    async def stop_idle(self) -> None:
        """Stop the containers idle past their ``idle_timeout_s``, keeping ``min_instances``.

        The background loop calls this every tick; tests with their own clock call it too.
        """
        now = self._clock()
        retiring: list[_Instance] = []
        for pool in self._pools.values():
            idle = sorted(
                (
                    instance
                    for instance in pool.ready()
                    if instance.inflight == 0
                    and now - instance.last_used >= pool.target.idle_timeout_s
                ),
                key=lambda instance: instance.last_used,
            )
            surplus = len(pool.ready()) - pool.target.min_instances
            for instance in idle[: max(0, surplus)]:
                # Out of the pool before the first await, so no call can pick it meanwhile.
                log.info("stopping %s of %s: idle", instance.name, pool.label)
                instance.state = "stopping"
                pool.instances = [i for i in pool.instances if i is not instance]
                retiring.append(instance)
        results = await asyncio.gather(
            *(self._retire(instance, graceful=True) for instance in retiring),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, Exception):
                log.warning("stopping an idle container failed: %r", result)

    def _tick(self) -> float:
        if self._reap_interval_s is not None:
            return self._reap_interval_s
        periods = [pool.target.idle_timeout_s / 4 for pool in self._pools.values()]
        periods += [
            p.target.health_interval_s for p in self._pools.values() if p.target.health_interval_s
        ]
        return min(5.0, max(0.05, min(periods, default=5.0)))

    async def _close_pool(self, pool: _Pool) -> None:
        pool.closed = True
        pool.notify()
        instances, pool.instances = pool.instances, []
        await asyncio.gather(
            *(self._retire(instance, graceful=True) for instance in instances),
            return_exceptions=True,
        )

    async def _retire(self, instance: _Instance, *, graceful: bool) -> None:
        """Stop (SIGTERM, then SIGKILL after stop_timeout_s) and remove one container."""
        import aiodocker

        if instance.state != "dead":
            instance.state = "stopping"
        watcher = instance.watcher
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        await instance.channel.aclose()
        docker = self._require_docker()
        if graceful:
            try:
                await instance.container.stop(t=instance.stop_timeout_s)
            except aiodocker.DockerError as error:
                log.debug("stopping %s: %s", instance.name, error.message)
        await self._force_remove(
            docker, instance.id, str(instance.socket_dir) if instance.socket_dir else None
        )

    # -- the engine ----------------------------------------------------------------------

    async def _connect(self) -> aiodocker.Docker:
        try:
            import aiodocker
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ProviderError(
                "the docker provider needs aiodocker: pip install 'linchkit-dispatcher[docker]'"
            ) from None
        docker = aiodocker.Docker(url=self._docker_url)
        try:
            await docker.version()
        except (aiodocker.DockerError, OSError) as error:
            await docker.close()
            raise ProviderError(
                f"cannot reach the Docker engine ({docker.docker_host}): {error}; "
                "start it with scripts/start-docker.sh"
            ) from error
        return docker

    def _require_docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise ProviderError(
                "the docker provider is not started (use the Dispatcher as a context manager)"
            )
        return self._docker

    @staticmethod
    async def _list(docker: aiodocker.Docker, *labels: str) -> list[dict[str, Any]]:
        """Summaries (``GET /containers/json``) of every container with all ``labels``."""
        import aiodocker

        try:
            containers = await docker.containers.list(
                all="1", filters=json.dumps({"label": list(labels)})
            )
        except aiodocker.DockerError as error:
            raise ProviderError(f"cannot list containers: {error.message}") from error
        return [container._container for container in containers]

    async def _sweep(self, docker: aiodocker.Docker, labels: dict[str, str]) -> None:
        selector = [f"{key}={value}" for key, value in labels.items()]
        for summary in await self._list(docker, *selector):
            socket_dir = (summary.get("Labels") or {}).get(LABEL_SOCKET_DIR)
            await self._force_remove(docker, summary["Id"], socket_dir)

    @staticmethod
    async def _force_remove(
        docker: aiodocker.Docker, container_id: str, socket_dir: str | None
    ) -> None:
        import aiodocker

        try:
            await docker.containers.container(container_id).delete(force=True)
        except aiodocker.DockerError as error:
            if error.status not in (404, 409):  # gone already, or removal in progress
                log.warning("removing container %s: %s", container_id[:12], error.message)
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)

    async def _logs(self, instance: _Instance, lines: int = 20) -> str:
        import aiodocker

        try:
            output = await instance.container.log(stdout=True, stderr=True, tail=lines)
        except aiodocker.DockerError as error:
            return f"(logs unavailable: {error.message})"
        return "".join(output).rstrip() or "(no output)"

    def __repr__(self) -> str:
        return f"<DockerProvider owner={self.owner} pools={list(self._pools.values())}>"


# -- helpers -----------------------------------------------------------------------------


def _container_config(
    target: DockerTarget, env: dict[str, str], socket_dir: Path | None
) -> dict[str, Any]:
    """The Engine API's create body: the sandbox, in the API's own words."""
    sandbox, limits = target.sandbox, target.limits
    memory = limits.memory_mb * 1024 * 1024
    host_config: dict[str, Any] = {
        "Init": True,
        "ReadonlyRootfs": sandbox.read_only_root,
        "Tmpfs": {"/tmp": f"rw,nosuid,nodev,mode=1777,size={limits.tmp_mb}m"},
        "CapDrop": ["ALL"] if sandbox.drop_all_capabilities else [],
        "SecurityOpt": ["no-new-privileges:true"] if sandbox.no_new_privileges else [],
        "Memory": memory,
        "MemorySwap": memory,
        "NanoCpus": int(limits.cpus * 1e9),
        "PidsLimit": limits.pids,
        "NetworkMode": sandbox.network,
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}},
    }
    if socket_dir is not None:
        host_config["Binds"] = [f"{socket_dir}:{SOCKET_MOUNT}:rw"]
    config: dict[str, Any] = {
        "Image": target.image,
        "Env": [f"{key}={value}" for key, value in env.items()],
        "User": sandbox.user,
        "HostConfig": host_config,
    }
    if target.command is not None:
        config["Cmd"] = target.command
    return config


def _engine_error(error: Any, target: DockerTarget, label: str) -> DispatchError:
    message = str(getattr(error, "message", error))
    status = getattr(error, "status", 0)
    if status == 404 and "image" in message.lower():
        return ProviderError(
            f"image {target.image} of {label} is not in the local engine; build it with "
            f"`dispatcher deploy` (nothing is pulled from a registry): {message}"
        )
    if status == 900:  # aiodocker: cannot connect to the engine
        return TargetUnavailable(f"the Docker engine is unreachable: {message}")
    if status == 400:
        return ProviderError(f"the engine refused the container of {label}: {message}")
    return TargetUnavailable(f"the engine could not start a container of {label}: {message}")


def _copy(error: DispatchError) -> DispatchError:
    """A fresh exception for each waiting caller, so tracebacks do not pile up on one."""
    return type(error)(
        error.message,
        retryable=error.retryable,
        retry_after=error.retry_after,
        details=error.details,
    )


def _death_details(instance: _Instance) -> dict[str, Any]:
    return {"container": instance.id, **(instance.death or {})}


def _death_text(death: dict[str, Any] | None) -> str:
    if death is None:
        return "stopped"
    text = f"exit code {death.get('exit_code')}"
    if death.get("oom_killed"):
        text += ", OOMKilled: it reached its memory limit"
    if death.get("error"):
        text += f", {death['error']}"
    return text


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:30] or "plugin"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
    for root in Path(tempfile.gettempdir()).glob("linchkit-docker-*-*"):
        pid = root.name.split("-")[2]
        if pid.isdigit() and _process_start(int(pid)) is None:
            with contextlib.suppress(OSError):
                root.rmdir()


def _build_context(plugin: PluginInfo, build: DockerBuild) -> tuple[io.BytesIO, str]:
    """The build context as a tar: the plugin's folder, plus a Dockerfile for Python plugins.

    Python sources are compiled here into ``__pycache__`` (the container's root filesystem
    is read-only, so the plugin could never cache them itself). The pyc files only help
    when this interpreter's version matches the base image's; otherwise they are ignored.
    """
    buffer = io.BytesIO()
    skipped = {"__pycache__", ".git", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(build.context.rglob("*")):
            relative = path.relative_to(build.context)
            if skipped.intersection(relative.parts) or not path.is_file():
                continue
            tar.add(path, arcname=str(relative), recursive=False)
            if build.entrypoint is not None and path.suffix == ".py":
                with tempfile.TemporaryDirectory() as scratch:
                    compiled = Path(scratch) / "module.pyc"
                    try:
                        py_compile.compile(
                            str(path),
                            cfile=str(compiled),
                            doraise=True,
                            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                        )
                    except py_compile.PyCompileError as error:
                        raise ProviderError(f"{plugin.key}: {error.msg}") from None
                    cached = Path(cache_from_source(str(relative)))
                    tar.add(compiled, arcname=str(cached))
        dockerfile_path = build.dockerfile or ".linchkit.Dockerfile"
        if build.dockerfile is None:
            dockerfile = (
                f"FROM {build.base_image}\n"
                "COPY . /plugin/\n"
                f'LABEL {LABEL_PLUGIN}="{plugin.key}"\n'
                f'CMD ["{build.entrypoint}", "--path", "/plugin"]\n'
            ).encode()
            info = tarfile.TarInfo(dockerfile_path)
            info.size = len(dockerfile)
            tar.addfile(info, io.BytesIO(dockerfile))
    buffer.seek(0)
    return buffer, dockerfile_path
