"""``provider: subprocess``: one supervised process (``PluginProcess``) per plugin and
target, started on attach and stopped on detach; calls go over its gRPC connection, and
wait for it while it restarts (``providers.subprocess`` describes the whole contract)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Hashable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from linchkit_plugin.errors import TargetUnavailable
from providers.base import Health, Provider
from providers.invocation import Invocation, Outcome
from providers.subprocess.sandbox import sandboxed_launch
from providers.subprocess.supervisor import PluginProcess
from providers.subprocess.target import SubprocessTarget

if TYPE_CHECKING:
    from providers.capabilities import Translation
    from providers.target import PluginInfo

__all__ = ["SubprocessProvider"]


class SubprocessProvider(Provider[SubprocessTarget]):
    name = "subprocess"
    target_model = SubprocessTarget
    native_batch = True

    def delivers_events_on(self, target: SubprocessTarget) -> bool:
        return target.events

    def __init__(self) -> None:
        # By (plugin id, version, ``target.key``): one process per plugin and target.
        self._processes: dict[tuple[str, str, str], PluginProcess] = {}

    async def attach(self, plugin: PluginInfo, target: SubprocessTarget) -> None:
        key = (plugin.id, plugin.version, target.key)
        if key in self._processes:
            return
        process = PluginProcess(
            plugin,
            target,
            event_sink=self.event_sink_of(plugin),
            # The entry the process holds: a reload may change it (``update``).
            report_served=lambda served: self.report_served(process.plugin, target, served),
        )
        await process.start()
        self._processes[key] = process

    def update(self, plugin: PluginInfo, target: SubprocessTarget) -> None:
        """A reload changed ``plugin``'s entry and kept ``target``: its process holds the
        new entry (each launch's ``Describe`` is reported for it), and what the running
        launch listed is reported again. Nothing restarts: its config is the same."""
        process = self._processes.get((plugin.id, plugin.version, target.key))
        if process is not None:
            process.plugin = plugin
            self.report_served(plugin, target, process.served)

    async def detach(self, plugin: PluginInfo, target: SubprocessTarget) -> None:
        process = self._processes.pop((plugin.id, plugin.version, target.key), None)
        if process is not None:
            await process.stop()

    def detach_queue(self, plugin: PluginInfo, target: SubprocessTarget) -> Hashable:
        # One process per plugin and target, sharing nothing with the others: a close
        # stops them all at once, in about one ``stop_grace_ms`` however many hang.
        return plugin.id, plugin.version, target.key

    async def aclose(self) -> None:
        processes, self._processes = self._processes, {}
        await asyncio.gather(*(process.stop() for process in processes.values()))

    def sandbox(self, plugin: PluginInfo, target: SubprocessTarget) -> Translation | None:
        """What the sandbox of ``plugin`` on ``target`` enforces, and what it cannot."""
        if target.sandbox is None:
            return None
        found = self._processes.get((plugin.id, plugin.version, target.key))
        if found is not None and found.translation is not None:
            return found.translation
        with tempfile.TemporaryDirectory() as folder:  # what a launch here would be
            launch = sandboxed_launch(
                [target.command[0]], target.sandbox, plugin.capabilities, folder
            )
            launch.close()
        return launch.translation

    def process(self, plugin: str, version: str, target: SubprocessTarget) -> PluginProcess:
        found = self._processes.get((plugin, version, target.key))
        if found is None:
            raise TargetUnavailable(f"{plugin}@{version} is not started on {target.describe()}")
        return found

    async def invoke(self, target: SubprocessTarget, invocation: Invocation) -> Any:
        process = self.process(invocation.plugin, invocation.version, target)
        return await process.call(invocation, lambda connection: connection.call(invocation))

    async def invoke_batch(
        self, target: SubprocessTarget, invocations: Sequence[Invocation]
    ) -> list[Outcome[Any]]:
        if not target.batch or not invocations:
            return await super().invoke_batch(target, invocations)
        first = invocations[0]
        process = self.process(first.plugin, first.version, target)
        return await process.call(first, lambda connection: connection.call_batch(invocations))

    async def stream(
        self, target: SubprocessTarget, invocation: Invocation
    ) -> AsyncGenerator[Any, None]:
        process = self.process(invocation.plugin, invocation.version, target)
        connection = await process.connection(invocation)
        # Closed with this stream, not left to the garbage collector: its RPC stays open,
        # the plugin streaming, until the connection's stream ends.
        async with aclosing(connection.stream(invocation)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def send_event(
        self, plugin: PluginInfo, target: SubprocessTarget, event: str, data: Any
    ) -> None:
        """Queue the host event on the ``Events`` stream of ``plugin``'s own process on
        ``target``, waiting for it while it restarts. Other plugins, or another version of
        this one, started from the same command run processes of their own: they do not
        get it."""
        process = self.process(plugin.id, plugin.version, target)
        (await process.connection()).send_event(event, data)

    async def logs(
        self, plugin: PluginInfo, target: SubprocessTarget, *, follow: bool, lines: int
    ) -> AsyncIterator[str]:
        """The plugin process's stderr, kept by this dispatcher since it started it: a
        process started by another dispatcher (another host process) is not visible here."""
        process = self.process(plugin.id, plugin.version, target)
        async for line in process.logs(follow=follow, lines=lines):
            yield line

    async def health(self, target: SubprocessTarget) -> Health:
        found = [process for (_, _, key), process in self._processes.items() if key == target.key]
        if not found:
            return Health("not_serving", "not started")
        reports = [await process.health() for process in found]
        return next((report for report in reports if not report.ok), reports[0])

    async def served_methods(
        self, plugin: PluginInfo, target: SubprocessTarget, *, timeout: float
    ) -> frozenset[str] | None:
        """What the running process's ``Describe`` listed at its launch (each restart
        asks anew): the process is the dispatcher's, nothing changes it in between."""
        found = self._processes.get((plugin.id, plugin.version, target.key))
        return None if found is None else found.served

    def __repr__(self) -> str:
        return f"<SubprocessProvider 'subprocess' processes={list(self._processes.values())}>"
