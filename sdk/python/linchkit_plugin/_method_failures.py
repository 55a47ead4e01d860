"""What a plugin's method raised, as the one answer its caller gets.

A method may raise anything, and every call gets exactly one answer, on every binding:

* a ``DispatchError`` is the method's answer as it is (``InvalidParams``, ``RateLimited``…);
* ``CancelledError`` is the call's cancellation when the task running it was cancelled
  (the caller went away, its deadline passed, the server stops: ``Task.cancelling``), and
  is re-raised for the server to handle; raised by the method of its own accord, nothing
  was cancelled, and it is the method's failure like any other;
* anything else, ``BaseException`` included (``sys.exit()``, ``KeyboardInterrupt``,
  ``GeneratorExit``, a bare ``BaseException`` subclass), is the method's failure: a
  ``PluginError`` named after the exception's class, not retryable unless it says so.
  Left to propagate, ``SystemExit`` and ``KeyboardInterrupt`` ended the whole WebSocket
  server (asyncio re-raises them out of the event loop), and the others were never
  answered there and were a plain-text 500 over HTTP, which the dispatcher retries.

Describing the failure runs the plugin's code too (``__str__``, a ``retryable`` or
``details`` property): each is read guarded, so a failure to describe it still answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from linchkit_plugin.errors import DispatchError, PluginError, ProviderError
from linchkit_plugin.wire import well_formed

__all__ = [
    "cancelled_from_outside",
    "described",
    "failure_of_method",
    "plugin_error",
    "unanswerable",
]

log = logging.getLogger("dispatcher.plugin")

_T = TypeVar("_T")


def cancelled_from_outside() -> bool:
    """Whether the running task was cancelled (``task.cancel()``: a caller gone, a
    deadline, a stop), rather than handed a ``CancelledError`` its method raised itself."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def failure_of_method(error: BaseException) -> BaseException:
    """What to raise for ``error``, raised by a plugin's method: ``error`` itself when it
    is a ``DispatchError`` or the task's own cancellation, else its ``PluginError``."""
    if isinstance(error, DispatchError):
        return error
    if isinstance(error, asyncio.CancelledError) and cancelled_from_outside():
        return error
    return plugin_error(error)


def plugin_error(error: BaseException) -> PluginError:
    """The caller's view of an exception a plugin raised: its class name as the error's
    type, its text as the message (the class name when it has none), and its own
    ``retryable`` and ``details`` when it has them."""
    log.debug("plugin raised", exc_info=error)
    kind = type(error).__name__
    details = _guarded(lambda: getattr(error, "details", None), None)
    return PluginError(
        _text_of(error) or kind,
        remote_type=kind,
        retryable=_guarded(lambda: bool(getattr(error, "retryable", False)), False),
        details=details if isinstance(details, dict) else None,
    )


def _text_of(error: BaseException) -> str:
    """``str(error)``, as UTF-8 can carry it (U+FFFD for a lone surrogate, which JSON
    cannot hold, as every SDK sends it); a placeholder naming the class when its
    ``__str__`` fails."""
    text = _guarded(lambda: str(error), None)
    if text is None:
        return f"<{type(error).__name__}: its text could not be read>"
    return well_formed(text)


#: The most of an exception's text ``described`` keeps.
_DESCRIBED_CHARS = 500


def described(error: BaseException) -> str:
    """``error`` for one line of a refusal to start: ``RuntimeError: boom``, its class
    alone when it has no text, its text on one line and cut short. Read guarded, as a
    failure is: an exception whose ``__repr__`` raised was a traceback at the start, in
    place of the line saying why the plugin could not be made."""
    kind = _guarded(lambda: type(error).__name__, "an exception")
    text = _guarded(lambda: str(error), None)
    if text is None:
        return f"{kind} (its text could not be read)"
    text = " ".join(text.split())
    if len(text) > _DESCRIBED_CHARS:
        text = text[:_DESCRIBED_CHARS] + "…"
    return f"{kind}: {text}" if text else kind


def _guarded(read: Callable[[], _T], fallback: _T) -> _T:
    """``read()``, or ``fallback`` when the plugin's code it runs raises anything."""
    try:
        return read()
    except BaseException:  # the plugin's code: a failure to describe is no reason to fail
        return fallback


def unanswerable(method: str, error: BaseException) -> ProviderError:
    """The answer to a call whose failure escaped ``failure_of_method`` (a server's last
    resort: the caller is answered, never left to its deadline or a 500)."""
    shown = repr(method[:64]) + ("…" if len(method) > 64 else "")  # the caller's name
    log.error("the call of %s failed unexpectedly", shown, exc_info=error)
    return ProviderError(f"the plugin failed to answer {shown}: {type(error).__name__}")
