"""The docker provider: a pool of sandboxed containers per plugin target, on demand.

The provider keeps a pool of containers per plugin target: it starts one on the first
call (cold start) or ``min_instances`` when the dispatcher starts, waits for the plugin's
``GET /health`` (``ready_timeout_s``), reuses warm containers, starts more up to
``max_instances`` while every running one already has ``concurrency`` calls in flight,
stops a container idle for ``idle_timeout_s`` (down to ``min_instances``), and removes
them all in ``aclose``.

Containers come and go in ``containers.py``; a container that dies is replaced there.
One background loop per provider stops idle containers and probes each ready container's
``/health`` every ``health_interval_s``; after ``unhealthy_after`` failures in a row the
container is killed and replaced the same way (a hung plugin does not exit by itself).

Errors, all translated in this package (``engine.py`` maps the engine's own):

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
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Sequence
from functools import partial
from typing import Any

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    ProviderError,
    TargetUnavailable,
)
from providers.base import ColdStarts, Health, LogsUnavailable, Provider
from providers.capabilities import Translation
from providers.docker.containers import Containers
from providers.docker.engine import (
    LABEL_PLUGIN,
    Engine,
    EngineError,
    make_socket_root,
    owner_labels,
)
from providers.docker.image import DockerDeployer
from providers.docker.pool import Instance, Pool, death_details, death_text
from providers.docker.port_owner import can_check_owners
from providers.docker.sandbox import translation as sandbox_translation
from providers.docker.target import DockerTarget
from providers.invocation import Invocation, Outcome
from providers.target import PluginInfo

__all__ = ["DockerProvider"]

log = logging.getLogger("dispatcher.providers.docker")


class DockerProvider(Provider[DockerTarget]):
    name = "docker"
    target_model = DockerTarget
    delivers_events = False  # no channel from the plugin back to the host
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
        self._containers: Containers | None = None
        self._pools: dict[tuple[str, str, str], Pool] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        #: How often ``logs(follow=True)`` looks for containers started meanwhile.
        self.logs_poll_s = 1.0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        engine = await Engine.connect(self._docker_url)
        labels = owner_labels(self.owner)
        reachable = await engine.volumes_reachable()
        self._containers = Containers(
            engine, make_socket_root(), labels, self._clock, socket_volumes=reachable
        )
        try:
            await self.remove_orphans()
        except BaseException:
            await self.aclose()  # the dispatcher only closes providers that started
            raise
        self._reaper = asyncio.create_task(self._maintain(), name="docker-reaper-and-prober")

    def sandbox(self, plugin: PluginInfo, target: DockerTarget) -> Translation | None:
        """What the containers of ``plugin`` enforce of its capabilities (``docker.sandbox``)."""
        return self._translation(plugin, target)

    def _translation(self, plugin: PluginInfo, target: DockerTarget) -> Translation:
        # Socket folders are tmpfs volumes as the engine said at start, or, not started
        # (``dispatcher inspect`` starts nothing), as a stock engine's would be.
        containers = self._containers
        in_volume = containers.socket_volumes if containers is not None else os.geteuid() == 0
        return sandbox_translation(
            target,
            plugin.capabilities,
            socket_in_volume=in_volume,
            port_owner_checked=can_check_owners(),
        )

    async def attach(self, plugin: PluginInfo, target: DockerTarget) -> None:
        key = (plugin.id, plugin.version, target.key)
        if key in self._pools:
            return
        for line in self._translation(plugin, target).unenforced:
            log.warning("%s on %s: %s", plugin.key, target.describe(), line)
        pool = self._pools[key] = Pool(plugin, target)
        if target.min_instances:
            pool.starting += target.min_instances
            starts = [self._require().start(pool) for _ in range(target.min_instances)]
            results = await asyncio.gather(*starts, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def detach(self, plugin: PluginInfo, target: DockerTarget) -> None:
        pool = self._pools.pop((plugin.id, plugin.version, target.key), None)
        if pool is not None:
            await self._require().close_pool(pool)

    def detach_queue(self, plugin: PluginInfo, target: DockerTarget) -> Hashable:
        # A pool of containers per plugin version and target, sharing nothing with the
        # others: a close stops them all at once, in about one stop_timeout_s however
        # many ignore their SIGTERM (its pool's containers already stop together).
        return plugin.id, plugin.version, target.key

    async def aclose(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.closed = True
            pool.notify()
        containers, self._containers = self._containers, None
        if containers is not None:
            await containers.aclose(pools)

    async def remove_orphans(self) -> list[str]:
        """Remove containers left by dispatchers on this host whose process is gone.

        Called by ``start``; returns the names of the containers removed.
        """
        return await self._require_engine().remove_orphans()

    def deployer(self) -> DockerDeployer:
        """Builds each target's image from its ``build`` section; needs the provider started."""
        return DockerDeployer(self._require_engine)

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
        pools = [pool for pool in self._pools.values() if pool.target.key == target.key]
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
        try:
            image = await self._require_engine().image(target.image)
        except EngineError as error:
            return Health("not_serving", f"image {target.image}: {error.message}")
        if image is None:
            return Health(
                "not_serving",
                f"image {target.image} is not in the local engine; build it with `dispatcher deploy`",
            )
        return Health("serving", "no container running; the next call starts one")

    async def served_methods(
        self, plugin: PluginInfo, target: DockerTarget, *, timeout: float
    ) -> frozenset[str] | None:
        """What a ready container of the plugin lists; None with none running (a
        container is not started to ask)."""
        pool = self._pools.get((plugin.id, plugin.version, target.key))
        ready = [] if pool is None else pool.ready()
        if not ready:
            return None
        return await ready[0].channel.served_methods(plugin, timeout)

    # -- logs ----------------------------------------------------------------------------

    async def logs(
        self, plugin: PluginInfo, target: DockerTarget, *, follow: bool, lines: int
    ) -> AsyncIterator[str]:
        """The output of every container of ``plugin`` on ``target``'s image that the engine
        holds, whichever dispatcher on this host started it, each line after its container's
        name (``name | line``); with ``follow``, also of the containers that start meanwhile
        (looked for every ``logs_poll_s``)."""
        engine = self._require_engine()
        selector = f"{LABEL_PLUGIN}={plugin.key}"

        async def containers(*, started: bool = False) -> list[tuple[str, str]]:
            found = [
                summary
                for summary in await engine.containers(selector)
                if summary.get("Image") == target.image
                # The engine ends a follow of a container created but not started yet at
                # once, with nothing: such a container is followed from a later look.
                and not (started and summary.get("State") == "created")
            ]
            found.sort(key=lambda summary: summary.get("Created", 0))
            return [
                (summary["Id"], (summary.get("Names") or ["?"])[0].lstrip("/")) for summary in found
            ]

        if not follow:
            running = await containers()
            if not running:
                raise LogsUnavailable(
                    f"{plugin.key}: no container of {target.image} on this engine (containers "
                    "start on a call and stop after idle_timeout_s; --follow waits for one)"
                )
            for container_id, name in running:
                try:
                    async for line in engine.log_lines(container_id, follow=False, lines=lines):
                        yield f"{name} | {line}"
                except EngineError as error:  # removed meanwhile
                    yield f"{name} | (logs unavailable: {error.message})"
            return
        async for line in self._follow_logs(engine, partial(containers, started=True), lines):
            yield line

    async def _follow_logs(
        self,
        engine: Engine,
        containers: Callable[[], Coroutine[Any, Any, list[tuple[str, str]]]],
        lines: int,
    ) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(1000)
        pumps: dict[str, asyncio.Task[None]] = {}

        async def pump(container_id: str, name: str, tail: int) -> None:
            # aclosing: a pump cancelled while it waits on the queue closes its engine
            # stream now, so no connection outlives the reader.
            lines_of = engine.log_lines(container_id, follow=True, lines=tail)
            try:
                async with contextlib.aclosing(lines_of):
                    async for line in lines_of:
                        await queue.put(f"{name} | {line}")
            except EngineError as error:
                log.debug("following %s ended: %s", name, error.message)

        loop = asyncio.get_running_loop()
        first = True
        next_look = loop.time()
        try:
            while True:
                if loop.time() >= next_look:
                    for container_id, name in await containers():
                        if container_id not in pumps:
                            # Containers started while we follow: their whole output.
                            tail = lines if first else -1
                            pumps[container_id] = asyncio.create_task(
                                pump(container_id, name, tail), name=f"docker-logs {name}"
                            )
                    first = False
                    next_look = loop.time() + self.logs_poll_s
                try:
                    line = await asyncio.wait_for(queue.get(), max(0.0, next_look - loop.time()))
                except TimeoutError:
                    continue
                yield line
        finally:
            for task in pumps.values():
                task.cancel()
            await asyncio.gather(*pumps.values(), return_exceptions=True)

    # -- the pool ------------------------------------------------------------------------

    def _pool(self, target: DockerTarget, invocation: Invocation) -> Pool:
        pool = self._pools.get((invocation.plugin, invocation.version, target.key))
        if pool is None:
            raise TargetUnavailable(
                f"{invocation.plugin}@{invocation.version} is not attached to the docker provider"
            )
        return pool

    async def _acquire(self, pool: Pool, invocation: Invocation) -> Instance:
        instance = pool.free()
        if instance is not None:
            instance.inflight += 1
            return instance
        pool.waiting += 1
        failures_before = pool.failures
        # No container ready at all: this call waits for one to start (a cold start).
        cold = not pool.ready()
        waited_from = self._clock()
        try:
            while True:
                if pool.closed:
                    raise TargetUnavailable(f"{pool.label} is shutting down")
                if pool.should_start():
                    self._require().spawn(pool)
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
                    if cold:
                        pool.cold_starts.add(self._clock() - waited_from)
                    return instance
                failure = pool.last_failure
                failed = failure is not None and pool.failures > failures_before
                if failed and not pool.starting and not pool.ready():
                    assert failure is not None
                    # Every waiting call gets its own copy, so tracebacks do not pile up on one.
                    raise failure.clone()
        finally:
            pool.waiting -= 1

    def cold_starts(self) -> dict[str, ColdStarts]:
        return {pool.label: pool.cold_starts for pool in self._pools.values()}

    def _release(self, pool: Pool, instance: Instance) -> None:
        instance.inflight -= 1
        instance.last_used = self._clock()
        if pool.waiting:
            pool.notify()

    async def _explain(
        self, pool: Pool, instance: Instance, error: TargetUnavailable
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
                if await self._require_engine().running(instance.id):
                    return error
        return TargetUnavailable(
            f"container {instance.name} of {pool.label} died mid-call "
            f"({death_text(instance.death)}); the call may be retried on a new container",
            details=death_details(instance),
        )

    # -- looking after the containers ----------------------------------------------------

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
            pool.discard(instance)
            if pool.below_minimum():
                self._require().spawn(pool)
            await self._require().retire(instance, graceful=False)

    async def stop_idle(self) -> None:
        """Stop the containers idle past their ``idle_timeout_s``, keeping ``min_instances``.

        The background loop calls this every tick; tests with their own clock call it too.
        """
        now = self._clock()
        retiring: list[Instance] = []
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
            *(self._require().retire(instance, graceful=True) for instance in retiring),
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

    def _require(self) -> Containers:
        if self._containers is None:
            raise ProviderError(
                "the docker provider is not started (use the Dispatcher as a context manager)"
            )
        return self._containers

    def _require_engine(self) -> Engine:
        return self._require().engine

    def __repr__(self) -> str:
        return f"<DockerProvider owner={self.owner} pools={list(self._pools.values())}>"
