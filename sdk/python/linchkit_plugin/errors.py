"""The errors a caller of the dispatcher can see.

Every failure of a call is one of these, whatever the transport underneath.
Providers translate their vendor's exceptions at their boundary (``raise … from exc``);
nothing from aiohttp, botocore or grpc reaches a caller.

    DispatchError                 type                  retryable
    ├── PluginNotFound            plugin_not_found      no
    ├── MethodNotFound            method_not_found      no
    ├── InvalidParams             invalid_params        no
    ├── Unauthorized              unauthorized          no
    ├── Forbidden                 forbidden             no
    ├── RateLimited               rate_limited          yes (retry_after)
    ├── Overloaded                overloaded            yes
    ├── CircuitOpen               circuit_open          yes (retry_after)
    ├── DeadlineExceeded          deadline_exceeded     yes, with a new deadline
    ├── TargetUnavailable         target_unavailable    yes
    ├── ShuttingDown              shutting_down         yes (another replica may take it)
    ├── PluginError               plugin_error          as the plugin says
    └── ProviderError             provider_error        no

``type`` is stable and travels on the wire (``docs/protocol.md``); ``retryable`` tells
the retry policy whether another attempt may succeed; ``retry_after`` (seconds) is set
when the target or a policy knows when to come back. A peer's ``retry_after`` is read
through ``bounded_retry_after``: a finite number of seconds, at least 0 and at most
``MAX_RETRY_AFTER_SECONDS``, or None.

"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Self

__all__ = [
    "MAX_RETRY_AFTER_SECONDS",
    "CircuitOpen",
    "DeadlineExceeded",
    "DispatchError",
    "Forbidden",
    "InvalidParams",
    "MethodNotFound",
    "Overloaded",
    "PluginError",
    "PluginNotFound",
    "ProviderError",
    "RateLimited",
    "ShuttingDown",
    "TargetUnavailable",
    "Unauthorized",
    "bounded_retry_after",
    "error_from_wire",
]

#: The longest a peer's ``retry_after`` is believed (seconds): a day, the most the gateway
#: tells its own clients in ``Retry-After``. It is a hint from a plugin, or a proxy before
#: it, that may lie, and what a plugin's hint delays is that plugin's own work (a retry,
#: which the call's deadline ends anyway, a job's next attempt): bounded, it parks nothing
#: for good. Not shorter: an honest quota that resets hourly would have a job's every
#: attempt spent before it does.
MAX_RETRY_AFTER_SECONDS: Final = 86_400.0


class DispatchError(Exception):
    """Base of every error a call can end with."""

    type: ClassVar[str] = "dispatch_error"
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable
        self.retry_after = retry_after
        self.details: dict[str, Any] = dict(details) if details else {}

    def __reduce__(self) -> tuple[Any, ...]:
        # copy.copy and pickle rebuild an exception by calling its class with its ``args``
        # (the message). A subclass whose constructor takes more (``LimitExceeded``'s
        # keywords, ``ModuleConflict``'s names) failed there with a TypeError, so a batch
        # or the followers of a cache miss got that instead of its error. Made without
        # ``__init__``, its fields set as they are.
        return (_rebuilt, (type(self), self.args), self.__dict__)

    def clone(self) -> Self:
        """A new exception with the same fields and no traceback.

        For handing one failure to several callers (a batch, coalesced cache misses):
        raising one shared object in many tasks would chain every traceback onto it.
        Errors are treated as immutable once raised; change one through a clone.
        """
        twin = copy.copy(self)
        twin.details = dict(self.details)
        twin.__traceback__ = None
        return twin

    def with_message(self, message: str) -> Self:
        """A clone saying ``message`` instead."""
        twin = self.clone()
        twin.message = message
        twin.args = (message,)
        return twin

    def with_retry_after(self, seconds: float | None) -> Self:
        """A clone telling the caller when to come back."""
        twin = self.clone()
        twin.retry_after = seconds
        return twin

    def with_details(self, **details: Any) -> Self:
        """A clone with ``details`` added to its own."""
        twin = self.clone()
        twin.details.update(details)
        return twin

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` object of a response envelope."""
        wire: dict[str, Any] = {
            "type": self.type,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.details:
            wire["details"] = self.details
        if self.retry_after is not None:
            wire["retry_after"] = self.retry_after
        return wire

    def __repr__(self) -> str:
        extra = f", retry_after={self.retry_after}" if self.retry_after is not None else ""
        return f"{type(self).__name__}({self.message!r}, retryable={self.retryable}{extra})"


class PluginNotFound(DispatchError):
    type = "plugin_not_found"


class MethodNotFound(DispatchError):
    type = "method_not_found"


class InvalidParams(DispatchError):
    type = "invalid_params"


class Unauthorized(DispatchError):
    type = "unauthorized"


class Forbidden(DispatchError):
    type = "forbidden"


class RateLimited(DispatchError):
    type = "rate_limited"
    default_retryable = True


class Overloaded(DispatchError):
    """A bulkhead is full (too many calls already in flight or waiting), or the audit log
    is too far behind its sink to record more calls."""

    type = "overloaded"
    default_retryable = True


class CircuitOpen(DispatchError):
    type = "circuit_open"
    default_retryable = True


class DeadlineExceeded(DispatchError):
    type = "deadline_exceeded"
    default_retryable = True


class TargetUnavailable(DispatchError):
    """The target could not be reached or failed as a service (connection, 5xx, crash)."""

    type = "target_unavailable"
    default_retryable = True


class ShuttingDown(DispatchError):
    """The dispatcher is draining or closing: it takes no new call, or the grace given to
    the calls in flight ran out (``Dispatcher.drain``). Retryable: another replica may
    take the call. ``details["stage"]`` says which: ``"refused"`` (never sent) or
    ``"cut_off"`` (it was in flight and may have reached the plugin).
    """

    type = "shutting_down"
    default_retryable = True


def _rebuilt(kind: type[DispatchError], args: tuple[Any, ...]) -> DispatchError:
    """An error of ``kind`` with ``args``, its ``__init__`` not run (``__reduce__``)."""
    return kind.__new__(kind, *args)


class PluginError(DispatchError):
    """Raised by plugin code. Keeps the plugin's own error type and message."""

    type = "plugin_error"

    def __init__(
        self,
        message: str,
        *,
        remote_type: str = "Exception",
        retryable: bool | None = None,
        retry_after: float | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable, retry_after=retry_after, details=details)
        self.remote_type = remote_type

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        wire["type"] = self.remote_type
        return wire

    def __str__(self) -> str:
        return f"{self.remote_type}: {self.message}"

    def __repr__(self) -> str:
        return f"PluginError({self.remote_type!r}, {self.message!r}, retryable={self.retryable})"


class ProviderError(DispatchError):
    """The provider or target broke the contract (malformed answer, misconfiguration)."""

    type = "provider_error"


_BY_TYPE: dict[str, type[DispatchError]] = {
    cls.type: cls
    for cls in (
        PluginNotFound,
        MethodNotFound,
        InvalidParams,
        Unauthorized,
        Forbidden,
        RateLimited,
        Overloaded,
        CircuitOpen,
        DeadlineExceeded,
        TargetUnavailable,
        ShuttingDown,
        ProviderError,
    )
}


def bounded_retry_after(value: object) -> float | None:
    """A peer's ``retry_after`` as seconds to act on: at most ``MAX_RETRY_AFTER_SECONDS``;
    None unless it is a finite number, at least 0. NaN, an infinity, a negative or a boolean
    say nothing a caller can wait for; NaN and the infinities are not even JSON, so an
    error carrying one could not be written down (a job's attempt) or sent on."""
    if type(value) is not float and type(value) is not int:
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer past any float
        return None
    if not 0.0 <= seconds < math.inf:  # false for NaN too
        return None
    return min(seconds, MAX_RETRY_AFTER_SECONDS)


def error_from_wire(
    error: object, *, types: Mapping[str, type[DispatchError]] | None = None
) -> DispatchError:
    """Turn the ``error`` object of a response envelope back into an exception.

    A known ``type`` becomes that class; any other type is the plugin's own error.
    A malformed error object is itself a contract breach: ``ProviderError``. A
    ``retry_after`` that is no number of seconds to wait is dropped, one too long is cut
    (``bounded_retry_after``).

    ``types``: classes by ``type`` known beyond the protocol's, for a reader of errors it
    wrote itself (a host reading its own records back gets its own error types, not a
    plugin's error of that name). The protocol's types come first: these extend them.
    This package imports no host: a host hands its types in here.
    """
    if not isinstance(error, dict):
        return ProviderError(f"target answered a malformed error object: {error!r:.200}")
    remote_type = error.get("type")
    message = error.get("message")
    if not isinstance(remote_type, str) or not isinstance(message, str):
        return ProviderError(f"target answered an error without type/message: {error!r:.200}")
    retryable = error.get("retryable")
    retry_after = error.get("retry_after")
    details = error.get("details")
    kwargs: dict[str, Any] = {
        "retryable": retryable if isinstance(retryable, bool) else None,
        "retry_after": bounded_retry_after(retry_after),
        "details": details if isinstance(details, dict) else None,
    }
    known = _BY_TYPE.get(remote_type)
    if known is None and types is not None:
        known = types.get(remote_type)
    if known is not None:
        return known(message, **kwargs)
    return PluginError(message, remote_type=remote_type, **kwargs)
