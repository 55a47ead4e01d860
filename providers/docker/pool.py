"""The containers of one plugin target, and the calls waiting for one: bookkeeping only.

A pool knows which containers run, how busy each is and how many are starting; the
provider decides when to start, stop and replace them. Everything here is synchronous
except waiting for a change, so a decision and the state it reads cannot interleave with
another task's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

from linchkit_plugin.errors import DispatchError
from providers.base import ColdStarts
from providers.docker.channel import Channel
from providers.docker.target import DockerTarget
from providers.target import PluginInfo

__all__ = ["Instance", "Pool", "death_details", "death_text"]


class Instance:
    """One running container of a pool."""

    __slots__ = (
        "channel",
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
        container_id: str,
        name: str,
        socket_dir: Path | None,
        channel: Channel,
        stop_timeout_s: int,
    ) -> None:
        self.id = container_id
        self.stop_timeout_s = stop_timeout_s
        self.name = name
        self.socket_dir = socket_dir
        self.channel = channel
        self.inflight = 0
        self.last_used = 0.0
        self.next_probe = 0.0
        self.failed_probes = 0
        self.state: Literal["starting", "ready", "stopping", "dead"] = "starting"
        #: Why it stopped, when nobody asked it to: exit_code, oom_killed, error.
        self.death: dict[str, Any] | None = None
        self.watcher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<container {self.name} {self.id[:12]} {self.state} inflight={self.inflight}>"


class Pool:
    """The containers of one plugin target, and the calls waiting for one."""

    def __init__(self, plugin: PluginInfo, target: DockerTarget) -> None:
        self.plugin = plugin
        self.target = target
        self.label = f"{plugin.key} ({target.image})"
        self.instances: list[Instance] = []
        self.starting = 0
        self.waiting = 0
        self.failures = 0
        self.last_failure: DispatchError | None = None
        self.closed = False
        #: Calls that arrived with no container ready and waited for one to start.
        self.cold_starts = ColdStarts()
        self._changed = asyncio.Event()

    def ready(self) -> list[Instance]:
        return [instance for instance in self.instances if instance.state == "ready"]

    def free(self) -> Instance | None:
        """The ready container with the fewest calls in flight, if one has room."""
        best: Instance | None = None
        for instance in self.instances:
            if (
                instance.state == "ready"
                and instance.inflight < self.target.concurrency
                and (best is None or instance.inflight < best.inflight)
            ):
                best = instance
        return best

    def should_start(self) -> bool:
        """Whether the calls waiting need more than the containers already starting."""
        live = len(self.instances) + self.starting
        capacity_coming = self.starting * self.target.concurrency
        return live < self.target.max_instances and self.waiting > capacity_coming

    def below_minimum(self) -> bool:
        """Whether a lost container must be replaced now rather than by the next call."""
        live = len(self.instances) + self.starting
        return not self.closed and live < self.target.min_instances

    def discard(self, instance: Instance) -> None:
        """Take ``instance`` out, so no call picks it, and wake whoever waits on the pool."""
        self.instances = [i for i in self.instances if i is not instance]
        self.notify()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        """Wait until something changes (a container ready, freed or lost), or ``timeout``."""
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


def death_details(instance: Instance) -> dict[str, Any]:
    """The ``details`` of an error about a container that stopped."""
    return {"container": instance.id, **(instance.death or {})}


def death_text(death: dict[str, Any] | None) -> str:
    """How a container stopped, for a message: exit code, OOM kill, the engine's error."""
    if death is None:
        return "stopped"
    text = f"exit code {death.get('exit_code')}"
    if death.get("oom_killed"):
        text += ", OOMKilled: it reached its memory limit"
    if death.get("error"):
        text += f", {death['error']}"
    return text
