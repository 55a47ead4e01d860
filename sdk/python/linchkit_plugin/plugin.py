"""What a Python plugin author writes.

A plugin is a class with lifecycle hooks and methods. Subclassing ``Plugin`` is optional
(any class with the same hooks works, as with the older local plugin system); it gives
no-op hooks and ``emit``. Every public function defined on the class, other than the
hooks, is a callable method; set ``methods = ("a", "b")`` on the class to expose fewer
(a list or tuple of names: anything else, ``("a")`` without its comma or a set, is refused
when the plugin loads, since it once exposed every public method).
Methods may be ``async def`` or plain ``def`` (run in a worker thread so they never block
the host's event loop). Params arrive as keyword arguments.

Raise anything to fail a call: the caller sees ``PluginError`` with the exception's class
name as its type and its text as the message; ``sys.exit()``, ``KeyboardInterrupt`` and a
``CancelledError`` of the method's own too fail only that call, never the server. Set ``retryable = True`` on an exception
class whose failures are transient.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, ClassVar, TypeVar

__all__ = ["LIFECYCLE_HOOKS", "Plugin", "current_context", "raw_params"]

LIFECYCLE_HOOKS = frozenset(
    {"init", "start", "stop", "destroy", "health_check", "emit", "on_event"}
)

log = logging.getLogger("linchkit_plugin")

#: Event names ``emit`` remembers having warned about, at most: names made per event
#: (an id in them) would otherwise grow the set without end.
_MAX_WARNED_EVENTS = 1000

_current_context: ContextVar[dict[str, Any] | None] = ContextVar(
    "plugin_call_context", default=None
)


F = TypeVar("F", bound=Callable[..., Any])


def raw_params(method: F) -> F:
    """Mark a method to receive the call's params as one argument, whatever their JSON shape."""
    method.__plugin_raw_params__ = True  # type: ignore[attr-defined]
    return method


def current_context() -> dict[str, Any]:
    """The envelope ``context`` of the call being served (request_id, caller, deadline_ms, …)."""
    return _current_context.get() or {}


class Plugin:
    """Optional base class for plugins; every hook is a no-op until overridden."""

    #: Methods exposed to callers; ``None`` means every public function on the class.
    methods: ClassVar[tuple[str, ...] | None] = None

    _emit: Callable[[str, Any], None] | None = None

    async def init(self, config: dict[str, Any]) -> None:
        """Called once with the manifest's ``config`` before ``start``."""

    async def start(self) -> None:
        """Called once; the plugin is callable afterwards."""

    async def stop(self) -> None:
        """Called once; stop background work, calls have ended."""

    async def destroy(self) -> None:
        """Called once after ``stop``: release every resource."""

    async def health_check(self) -> bool:
        """True while the plugin can serve calls."""
        return True

    async def on_event(self, event: str, data: Any) -> None:
        """Called with each event the host sends (``Dispatcher.publish``); ignores them by default."""

    def emit(self, event: str, data: Any = None) -> None:
        """Send an event to the host's handlers (``Dispatcher.on``); dropped if nobody listens.

        Served where the host has no channel back to the plugin (HTTP with
        ``dispatcher-plugin serve``, Knative, Lambda), events cannot be delivered: each is
        dropped, and the first of each name logs a WARNING saying so."""
        if self._emit is not None:
            self._emit(event, data)
            return
        warned = self.__dict__.setdefault("_undelivered_events", set())
        if event not in warned and len(warned) < _MAX_WARNED_EVENTS:
            warned.add(event)
            log.warning(
                "event %r is not delivered: this plugin is served without a channel back"
                " to the host (HTTP, Knative, Lambda); events reach the host in-process"
                " (local), over gRPC (subprocess, grpc) and over WebSocket",
                event,
            )
