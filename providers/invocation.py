"""What one call is, and what one item of a batch comes back as.

``Invocation`` is the single input every policy step and every provider receives; it is
immutable so a retry or a batch can hold it without copying. ``deadline`` is an absolute
reading of the event loop's clock (``loop.time()``), the clock every timer, limiter and
timeout of the dispatcher runs on, so a test that fakes the loop's time fakes them all;
on the wire it travels as the milliseconds left (``deadline_ms``), because two machines'
monotonic clocks mean nothing to each other.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Generic, TypeVar

import orjson

from linchkit_plugin.errors import DispatchError
from linchkit_plugin.wire import encode_json, json_fragment

__all__ = ["Invocation", "Outcome", "new_request_id", "running_loop_time"]

T = TypeVar("T")

# A process-unique prefix and a counter: unique enough to correlate logs across
# processes, and ~10x cheaper per call than uuid4 (no syscall for randomness).
_REQUEST_PREFIX = os.urandom(6).hex()
_REQUEST_COUNTER = count(1)


def new_request_id() -> str:
    return f"{_REQUEST_PREFIX}-{next(_REQUEST_COUNTER):x}"


def running_loop_time() -> float:
    """The running loop's clock, looked up on each reading. Providers bind
    ``loop.time`` once they know their loop (``asyncio.get_running_loop()`` asks the
    kernel for the process id on every call on Python 3.11) and read this until then."""
    return asyncio.get_running_loop().time()


@dataclass(frozen=True, slots=True, init=False)
class Invocation:
    """One call of ``plugin.method`` as the providers see it."""

    plugin: str
    version: str
    method: str
    params: Any
    deadline: float
    request_id: str
    caller: str | None = None
    traceparent: str | None = None
    idempotency_key: str | None = None

    def __init__(
        self,
        plugin: str,
        version: str,
        method: str,
        params: Any,
        deadline: float,
        request_id: str,
        caller: str | None = None,
        traceparent: str | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        # Every call builds one: each field is set through its slot directly, where the
        # generated frozen __init__ looks up object.__setattr__ nine times (0.40 µs against
        # 0.67 µs in a tight loop; docs/architecture.md, "gRPC on the hot path").
        _set_plugin(self, plugin)
        _set_version(self, version)
        _set_method(self, method)
        _set_params(self, params)
        _set_deadline(self, deadline)
        _set_request_id(self, request_id)
        _set_caller(self, caller)
        _set_traceparent(self, traceparent)
        _set_idempotency_key(self, idempotency_key)

    def remaining(self, now: float | None = None) -> float:
        """Seconds left before the deadline (negative once it has passed)."""
        return self.deadline - (running_loop_time() if now is None else now)

    def context_wire(self, now: float | None = None) -> dict[str, Any]:
        """The envelope's ``context`` object."""
        # Every remote call builds this: plain arithmetic, no helper calls (bench_http).
        left_ms = int(
            (self.deadline - (asyncio.get_running_loop().time() if now is None else now)) * 1000
        )
        context: dict[str, Any] = {
            "request_id": self.request_id,
            # At least 1: 0 tells a plugin the call has no deadline (docs/protocol.md), and
            # under a millisecond left is not none left (gRPC sends the same).
            "deadline_ms": left_ms if left_ms > 0 else 1,
        }
        if self.caller is not None:
            context["caller"] = self.caller
        if self.traceparent is not None:
            context["traceparent"] = self.traceparent
        if self.idempotency_key is not None:
            context["idempotency_key"] = self.idempotency_key
        return context

    def request_wire(self, now: float | None = None) -> dict[str, Any]:
        """The request envelope (``docs/protocol.md``) for this invocation."""
        return {
            "v": 1,
            "plugin": self.plugin,
            "method": self.method,
            "params": self.params,
            "context": self.context_wire(now),
        }

    def request_json(self, now: float) -> bytes:
        """``encode_json(self.request_wire(now))``, the same bytes, written around the
        params' own JSON: the envelope's head is kept per method and its context is
        formatted, where the dicts of ``request_wire`` cost building and encoding again.
        0.53 µs against 1.23 for a call with small params (``bench_hot_path``); every
        HTTP call builds one. A call with a caller, a trace or a key takes the dicts."""
        if not (self.caller is None and self.traceparent is None and self.idempotency_key is None):
            return encode_json(self.request_wire(now))
        try:
            request_id = orjson.dumps(self.request_id)
        except TypeError:  # not UTF-8 (a lone surrogate): refused as the dicts' encoding is
            return encode_json(self.request_wire(now))
        head = _HEADS.get((self.plugin, self.method))
        if head is None:
            head = _request_head(self.plugin, self.method)
        left_ms = int((self.deadline - now) * 1000)
        return b'%b%b,"context":{"request_id":%b,"deadline_ms":%d}}' % (
            head,
            json_fragment(self.params),
            request_id,
            left_ms if left_ms > 0 else 1,  # at least 1, as in ``context_wire``
        )


#: The envelope's head up to its params, per plugin and method (``request_json``).
_HEADS: dict[tuple[str, str], bytes] = {}
_MOST_HEADS = 4096


def _request_head(plugin: str, method: str) -> bytes:
    if len(_HEADS) >= _MOST_HEADS:  # names a reload no longer routes: start again
        _HEADS.clear()
    head = _HEADS[(plugin, method)] = b'{"v":1,"plugin":%b,"method":%b,"params":' % (
        orjson.dumps(plugin),
        orjson.dumps(method),
    )
    return head


# The slots' own setters (dataclass builds the slotted class, so read them off it here).
_set_plugin = Invocation.__dict__["plugin"].__set__
_set_version = Invocation.__dict__["version"].__set__
_set_method = Invocation.__dict__["method"].__set__
_set_params = Invocation.__dict__["params"].__set__
_set_deadline = Invocation.__dict__["deadline"].__set__
_set_request_id = Invocation.__dict__["request_id"].__set__
_set_caller = Invocation.__dict__["caller"].__set__
_set_traceparent = Invocation.__dict__["traceparent"].__set__
_set_idempotency_key = Invocation.__dict__["idempotency_key"].__set__


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """The result of one item of a batch: a value or the error that item ended with."""

    result: T | None = None
    error: DispatchError | None = field(default=None)

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]

    @classmethod
    def failure(cls, error: DispatchError) -> Outcome[Any]:
        return cls(error=error)
