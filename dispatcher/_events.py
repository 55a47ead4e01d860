"""Plugin events on the host side: the handlers the host registered, and their tasks.

Providers deliver each event a plugin emits to ``EventHandlers.emit`` (their
``event_sink``), with the version of the plugin that emitted it: in a rollout two
versions run at once, and who may see an event can depend on its version (``access``
rules name versions). Handlers of one plugin's events (``on``) get ``(event, data)``;
listeners (``listen``) get every event of every plugin, its plugin and version too. A
handler that returns a coroutine runs as a task of its own, so a slow handler never holds
up the provider's stream; the dispatcher cancels what is still running when it closes. A
handler that raises is logged, never propagated to the plugin.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["EventHandler", "EventHandlers", "EventListener"]

log = logging.getLogger("dispatcher")

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

    def on(self, plugin: str, event: str, handler: EventHandler) -> None:
        self._handlers[(plugin, event)].append(handler)

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
                    task = asyncio.get_running_loop().create_task(outcome)
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except Exception:
                log.exception("event handler for %s/%s failed", plugin, event)

    async def aclose(self) -> None:
        """Cancel the handlers still running and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return (
            f"<EventHandlers handlers={sum(map(len, self._handlers.values()))}"
            f" listeners={len(self._listeners)} running={len(self._tasks)}>"
        )
