"""Plugin events on the host side: the handlers the host registered, and their tasks.

Providers deliver each event a plugin emits to ``EventHandlers.emit`` (their
``event_sink``), with the version of the plugin that emitted it: in a rollout two
versions run at once, and who may see an event can depend on its version (``access``
rules name versions). Handlers of one plugin's events (``on``) get ``(event, data)``;
listeners (``listen``) get every event of every plugin, its plugin and version too. A
handler that returns a coroutine runs as a task of its own, so a slow handler never holds
up the provider's stream; the dispatcher cancels what is still running when it closes. A
handler that raises is logged, never propagated to the plugin.

One plugin's events keep at most ``MAX_RUNNING_HANDLERS_PER_PLUGIN`` such tasks running:
an event that comes while as many run is not handed to the handlers that are coroutines
(the others still run), and is counted (``stats``) and logged. A plugin decides how many
events it sends (over gRPC, as many as the connection carries); the host's handlers how
fast they end. A task per event, unbounded, let a plugin grow the host's memory for as
long as its handlers were behind. The bound is per plugin: a flood fills its own share,
not that of every plugin's events.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Mapping
from functools import partial
from typing import Any, Protocol

from dispatcher.config import PluginSpec
from providers._log_lines import sparingly
from providers.base import Provider

__all__ = ["MAX_RUNNING_HANDLERS_PER_PLUGIN", "EventHandler", "EventHandlers", "EventListener"]

log = logging.getLogger("dispatcher")

#: Handler tasks one plugin's events may keep running at once: a second of events at the
#: WebSocket binding's default ``max_events_per_second``.
MAX_RUNNING_HANDLERS_PER_PLUGIN = 10_000

#: ``handler(event, data)``; may return a coroutine, which runs as a task.
EventHandler = Callable[[str, Any], Any]


class EventListener(Protocol):
    """Told every event of every plugin: which plugin, at which version, emitted what."""

    def __call__(self, plugin: str, version: str, event: str, data: Any) -> None: ...


class EventHandlers:
    """The host's handlers by (plugin, event); ``"*"`` handles every event of a plugin."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], list[EventHandler]] = defaultdict(list)
        self._listeners: list[EventListener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Handler tasks running, by the plugin whose event they handle.
        self._running: dict[str, int] = {}
        #: Events not handed to coroutine handlers: their plugin had as many running.
        self.dropped = 0
        #: Plugins ``warn_if_lost`` has warned about.
        self._lost_warned: set[str] = set()

    def on(self, plugin: str, event: str, handler: EventHandler) -> None:
        self._handlers[(plugin, event)].append(handler)

    def warn_if_lost(
        self,
        plugin_id: str,
        plugins: Iterable[PluginSpec[Any]],
        providers: Mapping[str, Provider[Any]],
    ) -> None:
        """Warn, once per plugin, when none of ``plugin_id``'s targets can carry its
        events back (``Provider.delivers_events_on``: an ``http`` target cannot), so its
        handlers are never called. Not for a plugin the manifest does not have yet: a
        reload or the registry may add it."""
        if plugin_id in self._lost_warned:
            return
        bindings: set[str] = set()
        for spec in plugins:
            if spec.id != plugin_id:
                continue
            for target in spec.targets():
                provider = providers.get(target.provider)
                if provider is None or provider.delivers_events_on(target):
                    return
                bindings.add(target.provider)
        if not bindings:
            return
        self._lost_warned.add(plugin_id)
        log.warning(
            "events of plugin %r never reach Dispatcher.on: its %s target has no channel"
            " back to the host (events are delivered on local, subprocess and grpc targets"
            " with events on, and websocket targets)",
            plugin_id,
            "/".join(sorted(bindings)),
        )

    def listen(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def emit(self, plugin: str, version: str, event: str, data: Any) -> None:
        for listener in self._listeners:
            try:
                listener(plugin, version, event, data)
            except Exception:
                log.exception("event listener for %s@%s/%s failed", plugin, version, event)
        for handler in (
            *self._handlers.get((plugin, event), ()),
            *self._handlers.get((plugin, "*"), ()),
        ):
            try:
                outcome = handler(event, data)
                if asyncio.iscoroutine(outcome):
                    self._run(plugin, event, outcome)
            except Exception:
                log.exception("event handler for %s/%s failed", plugin, event)

    def _run(self, plugin: str, event: str, handling: Coroutine[Any, Any, Any]) -> None:
        running = self._running.get(plugin, 0)
        if running >= MAX_RUNNING_HANDLERS_PER_PLUGIN:
            handling.close()  # never started: nothing to wait for, nothing to warn of
            self.dropped += 1
            if sparingly(self.dropped):
                log.warning(
                    "events of %s come faster than their handlers end: %d handlers run;"
                    " event %r not handled (%d dropped so far)",
                    plugin,
                    running,
                    event[:80],
                    self.dropped,
                )
            return
        task = asyncio.get_running_loop().create_task(handling)
        self._running[plugin] = running + 1
        self._tasks.add(task)
        task.add_done_callback(partial(self._ended, plugin))

    def _ended(self, plugin: str, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        running = self._running.get(plugin, 0) - 1
        if running > 0:
            self._running[plugin] = running
        else:
            self._running.pop(plugin, None)

    def stats(self) -> dict[str, int]:
        return {"handlers_running": len(self._tasks), "handler_events_dropped": self.dropped}

    async def aclose(self) -> None:
        """Cancel the handlers still running and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return (
            f"<EventHandlers handlers={sum(map(len, self._handlers.values()))}"
            f" listeners={len(self._listeners)} running={len(self._tasks)}"
            f" dropped={self.dropped}>"
        )
