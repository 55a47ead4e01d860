"""Every failed RPC as a dispatcher error: the one translation of gRPC statuses.

    gRPC status                      dispatcher error             retryable
    UNAVAILABLE, CANCELLED, ABORTED  TargetUnavailable            yes
    UNKNOWN, INTERNAL                TargetUnavailable            yes (a handler crashed)
    DEADLINE_EXCEEDED                DeadlineExceeded             yes
    RESOURCE_EXHAUSTED, by its words:
      … the request (its message, or InvalidParams                no (resending gets it again)
        its metadata) over a cap
      … the reply (its message, or   ProviderError                no
        its metadata) over a cap
      … the server short of calls    Overloaded                   yes
        at once or of memory
      … a rate limit or quota, or    RateLimited                  yes (``retry-after`` trailer)
        a ``retry-after`` or ``error-type: rate_limited`` trailer
      … ``error-type:                ResultTooLarge               no
        result_too_large``
      … any other                    Overloaded                   yes (the server is short
                                                                       of something)
    INVALID_ARGUMENT, OUT_OF_RANGE   InvalidParams                no
    UNAUTHENTICATED                  Unauthorized                 no
    PERMISSION_DENIED                Forbidden                    no
    UNIMPLEMENTED, NOT_FOUND         ProviderError                no (the target lacks the RPC)
    FAILED_PRECONDITION, other       ProviderError                no

A message over a size cap (64 MiB on the dispatcher's channel and in every SDK's server,
counted after decompression) is RESOURCE_EXHAUSTED from every gRPC library but tonic,
which says OUT_OF_RANGE; only the wording says which side refused which message
(``_REQUEST_TOO_LARGE``, ``_REPLY_TOO_LARGE``; tests/conformance/test_hostile_envelopes.py
checks each SDK's). Params too large are the caller's to fix: ``InvalidParams``, with
``details["reason"] == "too_large"``, as HTTP's 413 is. A result too large is the plugin's:
``ProviderError`` with the same reason. Neither is a rate limit, and neither is retryable.
So is a reply whose headers or trailers are over the cap on the metadata our channel
receives (16 KiB; from 8 KiB grpc refuses some at random): the plugin ran the call and
answers as much again, whatever those trailers say (``_REPLY_METADATA_TOO_LARGE``; it was
read as a server short of capacity, retryable, or as a rate limit from its trailers).

No SDK answers a call RESOURCE_EXHAUSTED but for its size: a plugin's own rate limit is
an error in its reply (``rate_limited``). What else says RESOURCE_EXHAUSTED is a server
short of capacity (grpcio's ``maximum_concurrent_rpcs``: ``Concurrent RPC limit
exceeded!``; grpc core under memory pressure) or a rate limiter in front of the plugin
(go-grpc-middleware's ``rejected by grpc_ratelimit middleware``, envoy's
``local_rate_limited``, a cloud API's ``Quota exceeded``), which may send a
``retry-after`` trailer, as our gRPC gateway does with ``error-type: rate_limited``.
A server short of capacity is ``Overloaded``, not a rate limit: the caller did nothing
it must call less of. grpcio refuses a call past its limit before any handler runs it,
so that one also carries ``CONNECT_STAGE`` (a fleet tries another instance). A rate
limit is told by its words or its trailers; a status that says neither is a server
short of something, ``Overloaded`` too. The message says which (``_exhausted``).

An UNAVAILABLE that provably never left the client carries ``details["stage"] ==
"connect"`` (``CONNECT_STAGE``; a fleet then tries another instance, for any method).
UNAVAILABLE alone does not say so: it is also what a connection that broke with the
request on the wire gives (``Stream removed (Socket closed)``, measured against a server
killed mid-call). What does say so is grpc core's own wording for a call that failed
*before a transport was picked*: the load-balancing pick failed because no connection
could be opened (pick_first: ``failed to connect to all addresses``; round_robin:
``connections to all backends failing``), or the name did not resolve (``DNS resolution
failed``). Such a call was never written to any socket. Any other wording gets no
marker: only an idempotent method's retry policy may send it again.

A plugin that is stopping answers a call it did not run ``UNAVAILABLE`` with the trailing
metadata ``linchkit-not-run`` (``NOT_RUN_TRAILER``; the Python SDK does, whose server would
otherwise cancel such calls unseen, docs/protocol.md "Stopping while called"): never run,
so it gets the same marker (``not_run`` tells the connection, which then stops sending).

Our gRPC gateway (``dispatcher.gateway.grpc_gateway``) ends a call with a status and
trailers ``error-type``, ``retryable`` and ``retry-after`` (proto/gateway.proto). Where
the status alone says less than the type (NOT_FOUND: ``plugin_not_found`` or
``method_not_found``; UNAVAILABLE: ``target_unavailable``, ``circuit_open``,
``overloaded`` or ``shutting_down``), the trailers are read: the error comes back as the
type the gateway named, with its ``retryable`` and ``retry_after`` (``_named_by_gateway``).
RESOURCE_EXHAUSTED is a rate limit or ``result_too_large``: a job's result over the
gateway's ``jobs.max_result_bytes``, which no other instance answers smaller, so
``ResultTooLarge``, not retryable (``_exhausted``; before, it was read as a server short
of capacity: ``Overloaded``, retryable). No SDK sends these trailers.

A server without a decompressor for a request's ``grpc-encoding`` answers UNIMPLEMENTED
naming the encoding (``refused_compression``): the connection resends the call plain.

A plugin's own failures come back in ``CallReply.error`` and go through
``linchkit_plugin.errors.error_from_wire`` like every other transport's
(``providers._grpc.replies``).

A lifecycle RPC (``Init``, ``Start``, ``Stop``, ``Destroy``) has no error in its reply: a
plugin whose hook fails answers ``FAILED_PRECONDITION`` (docs/protocol.md, "A lifecycle
hook that fails") with ``init failed: PluginError('BadConfig', '…')`` (Python) or
``init hook failed: BadConfig: …`` (Go, Rust, Java, TypeScript); Java and TypeScript
plugins built before 2026-12-04 answer ``INTERNAL`` with ``BadConfig: …``; a config that
is not JSON is ``INVALID_ARGUMENT``, a handler that raised ``UNKNOWN``. ``lifecycle_failure`` reads all of them alike: the plugin refused the step,
which sending it again would not change, so ``ProviderError``, not retryable, naming the
step and the plugin's error type (``details``: ``step``, ``error_type``, ``status``).
An ``Init`` answered RESOURCE_EXHAUSTED in the SDKs' words for a service that holds as
many hosts as it takes (docs/protocol.md, "Several hosts on one service") is
``Overloaded``, retryable once another host leaves, not a rate limit; another
RESOURCE_EXHAUSTED not for its size is read as for a call (``_exhausted``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any, NamedTuple

from linchkit_plugin.errors import (
    CircuitOpen,
    DeadlineExceeded,
    DispatchError,
    Forbidden,
    InvalidParams,
    MethodNotFound,
    Overloaded,
    PluginNotFound,
    ProviderError,
    RateLimited,
    ShuttingDown,
    TargetUnavailable,
    Unauthorized,
    bounded_retry_after,
)
from linchkit_plugin.handshake import NOT_RUN_TRAILER
from providers.base import CONNECT_STAGE, ResultTooLarge

__all__ = [
    "DEADLINE_SKEW_SECONDS",
    "grpc_errors",
    "lifecycle_failure",
    "never_left_the_client",
    "not_run",
    "refused_compression",
    "too_large",
    "translate_rpc_error",
    "transport_broke",
]

#: How grpc core words the failure of a call that no connection was picked for (the LB
#: pick failed, or the name did not resolve): the call was never sent. Prefixes of
#: ``details()``, as grpcio 1.85 words them (tests/test_grpc_fleet.py checks they hold).
_NOT_SENT_PREFIXES = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "DNS resolution failed",
)


#: How each gRPC library words a request refused for its size: by our own channel before
#: sending it, or by the plugin's server on receiving it (after decompression, for gzip).
#: Substrings of ``details()``, which grpc core may wrap (``Stream removed (…)``).
_REQUEST_TOO_LARGE = (
    "CLIENT: Sent message larger than max",  # grpc core: our channel, nothing sent
    "SERVER: Received message larger than max",  # grpc core (the Python SDK)
    # grpc core, gzip (the Python SDK; any grpc core server of a smaller cap, such as
    # grpc's default 4 MiB). Its words for a reply our channel decompresses past the cap
    # too: no SDK sends one (each caps its reply before compressing it), so the request.
    "Decompressed message larger than max",
    "grpc: received message larger than max",  # grpc-go
    "grpc: received message after decompression larger than max",  # grpc-go, gzip
    "gRPC message exceeds maximum size",  # grpc-java, plain and decompressed
    "decoded message length too large",  # tonic, OUT_OF_RANGE
    "size limit, of",  # tonic, gzip: "Error decompressing: size limit, of N bytes, exceeded"
)
#: … and a reply refused for its size, by the server before sending it or by our channel.
_REPLY_TOO_LARGE = (
    "CLIENT: Received message larger than max",  # grpc core: our channel
    "SERVER: Sent message larger than max",  # grpc core (the Python SDK)
    "grpc: trying to send message larger than max",  # grpc-go
    "encoded message length too large",  # tonic, OUT_OF_RANGE
)
#: … and a reply whose metadata (headers or trailers) our channel refused: over grpc
#: core's limit on what a channel receives (8 KiB soft, refused at random up to 16 KiB
#: hard), as grpcio 1.85 words it. A server refusing our request's metadata says the same
#: without ``Stream removed``, which only our side's refusal of a stream wraps it in.
_REPLY_METADATA_TOO_LARGE = "Stream removed (received metadata size exceeds"
#: … and our request's metadata, refused by the plugin's server (grpc core's words on its
#: side, which reach us without our channel's ``Stream removed``): a caller id or a trace
#: header past the 16 KiB a grpc server takes. The same request is refused again.
_REQUEST_METADATA_TOO_LARGE = "received metadata size exceeds"
#: grpc-js words both sides without a prefix: a server's "Received" is the request.
_GRPC_JS_REQUEST_TOO_LARGE = ("Received message larger than max", "decompresses to a size larger")
_GRPC_JS_REPLY_TOO_LARGE = "Sent message larger than max"


def too_large(details: str) -> str | None:
    """``"request"`` or ``"reply"`` when ``details()`` says that message was over a size
    cap, else None. Our own channel's words (``CLIENT: …``) are checked before grpc-js's
    unprefixed ones, which they contain."""
    if details.startswith(_REPLY_METADATA_TOO_LARGE):
        return "reply"
    if details.startswith(_REQUEST_METADATA_TOO_LARGE):
        return "request"
    if any(words in details for words in _REPLY_TOO_LARGE):
        return "reply"
    if any(words in details for words in _REQUEST_TOO_LARGE):
        return "request"
    if any(words in details for words in _GRPC_JS_REQUEST_TOO_LARGE):
        return "request"
    if _GRPC_JS_REPLY_TOO_LARGE in details:
        return "reply"
    return None


def _status_names() -> dict[Any, tuple[type[DispatchError], bool | None]]:
    import grpc

    code = grpc.StatusCode
    return {
        code.UNAVAILABLE: (TargetUnavailable, None),
        code.CANCELLED: (TargetUnavailable, None),
        code.ABORTED: (TargetUnavailable, None),
        code.UNKNOWN: (TargetUnavailable, None),
        code.INTERNAL: (TargetUnavailable, None),
        code.DEADLINE_EXCEEDED: (DeadlineExceeded, None),
        code.INVALID_ARGUMENT: (InvalidParams, None),
        code.OUT_OF_RANGE: (InvalidParams, None),
        code.UNAUTHENTICATED: (Unauthorized, None),
        code.PERMISSION_DENIED: (Forbidden, None),
    }


_BY_STATUS: dict[Any, tuple[type[DispatchError], bool | None]] = {}

#: How far ahead of our deadline a server's copy of it may fire: the grpc-timeout header
#: is rounded, and the server starts counting when the request arrives.
DEADLINE_SKEW_SECONDS = 0.02


def grpc_errors() -> tuple[type[Exception], ...]:
    """What ``except`` catches around a call: every exception grpc.aio raises from one.

    A function, evaluated only when an exception is being handled, so grpcio stays unimported
    until a connection opens.
    """
    import grpc.aio

    return (grpc.aio.AioRpcError, grpc.aio.BaseError)


def translate_rpc_error(
    error: Exception, what: str, deadline: float | None = None
) -> DispatchError:
    """The dispatcher error for a failed RPC; ``what`` names the call for the message.

    Besides statuses, grpc.aio raises ``UsageError`` on a closed channel (the dispatcher is
    closing: not retryable) and ``InternalError`` when it cannot start the call at all.
    A server whose own copy of the deadline fires first may reset the stream (CANCELLED)
    a moment before our deadline does: at the ``deadline``, that is the deadline.
    """
    import grpc
    import grpc.aio

    if not isinstance(error, grpc.aio.AioRpcError):
        if isinstance(error, grpc.aio.UsageError):
            return TargetUnavailable(f"{what}: the connection is closed", retryable=False)
        return ProviderError(f"{what}: grpc could not make the call: {error}")
    if not _BY_STATUS:
        _BY_STATUS.update(_status_names())
    status = error.code()
    details = error.details() or ""
    message = f"{what}: {status.name} {details}".rstrip()
    if (
        deadline is not None
        and status == grpc.StatusCode.CANCELLED
        and asyncio.get_running_loop().time() >= deadline - DEADLINE_SKEW_SECONDS
    ):
        return DeadlineExceeded(message)
    if status == grpc.StatusCode.UNAVAILABLE and (
        never_left_the_client(details) or _said_not_run(error)
    ):
        return TargetUnavailable(message, details=CONNECT_STAGE)
    if status in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE) and (
        side := too_large(details)
    ):
        # No rate limit: the same answer again on every resend.
        if side == "request":
            return InvalidParams(
                f"{what}: the request is over the gRPC message size cap ({status.name} {details})",
                retryable=False,
                details={"reason": "too_large"},
            )
        cap = "metadata" if details.startswith(_REPLY_METADATA_TOO_LARGE) else "message"
        return ProviderError(
            f"{what}: the reply is over the gRPC {cap} size cap ({status.name} {details})",
            retryable=False,
            details={"reason": "too_large"},
        )
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _exhausted(error, what)
    if (named := _named_by_gateway(error, message)) is not None:
        return named
    kind, retryable = _BY_STATUS.get(status, (ProviderError, None))
    return kind(message, retryable=retryable)


class _GatewayTrailers(NamedTuple):
    """What our gRPC gateway's trailing metadata says of the error it ended a call with
    (proto/gateway.proto): each None when not said, or not said as the gateway says it."""

    error_type: str | None
    retryable: bool | None
    retry_after: float | None


def _gateway_trailers(error: Any) -> _GatewayTrailers:
    error_type: str | None = None
    retryable: bool | None = None
    retry_after: float | None = None
    for key, value in error.trailing_metadata() or ():
        if key == "error-type":
            error_type = value
        elif key == "retryable":
            retryable = {"true": True, "false": False}.get(value)
        elif key == "retry-after":
            with contextlib.suppress(ValueError):  # any server may send it: believed bounded
                retry_after = bounded_retry_after(float(value))
    return _GatewayTrailers(error_type, retryable, retry_after)


#: The types our gateway names in ``error-type`` (dispatcher/gateway/grpc_errors.py), each
#: read back as its own class, and the status the gateway ends such a call with. The status
#: alone cannot tell apart those that share one: NOT_FOUND is ``plugin_not_found`` or
#: ``method_not_found``; UNAVAILABLE is ``target_unavailable``, ``circuit_open``,
#: ``overloaded`` or ``shutting_down``, each with its own ``retry_after``. The others' status
#: says their type too; their ``retryable`` is the trailer's alike. RESOURCE_EXHAUSTED's two
#: (``rate_limited``, ``result_too_large``) are read by ``_exhausted``, beside other servers'
#: words for a rate limit. A trailer is believed only beside its own status: any server can
#: send trailers, and a plugin's service saying ``error-type: plugin_not_found`` under an
#: INTERNAL must not make its own failure read as the dispatcher's routing.
_GATEWAY_TYPES: dict[str, tuple[type[DispatchError], str]] = {
    kind.type: (kind, status)
    for kind, status in (
        (PluginNotFound, "NOT_FOUND"),
        (MethodNotFound, "NOT_FOUND"),
        (InvalidParams, "INVALID_ARGUMENT"),
        (Unauthorized, "UNAUTHENTICATED"),
        (Forbidden, "PERMISSION_DENIED"),
        (DeadlineExceeded, "DEADLINE_EXCEEDED"),
        (TargetUnavailable, "UNAVAILABLE"),
        (CircuitOpen, "UNAVAILABLE"),
        (Overloaded, "UNAVAILABLE"),
        (ShuttingDown, "UNAVAILABLE"),
        (ProviderError, "FAILED_PRECONDITION"),
    )
}


def _named_by_gateway(error: Any, message: str) -> DispatchError | None:
    """The error our gateway named in its trailers, with the ``retryable`` and
    ``retry_after`` it said; None from any other server (no SDK sends ``error-type``), for
    a type this reader has no class for, or a type under a status the gateway never gives
    it: the status says those as well as it can."""
    said = _gateway_trailers(error)
    named = _GATEWAY_TYPES.get(said.error_type or "")
    if named is None or error.code().name != named[1]:
        return None
    kind, _ = named
    return kind(message, retryable=said.retryable, retry_after=said.retry_after)


#: grpcio's server past its ``maximum_concurrent_rpcs`` (lower case): refused unrun.
_AT_CONCURRENCY_LIMIT = "concurrent rpc limit exceeded"
#: How a server short of capacity words RESOURCE_EXHAUSTED (lower case), and what it is
#: short of.
_SERVER_SHORT_OF = (
    (_AT_CONCURRENCY_LIMIT, "at its limit of concurrent calls"),
    ("memory", "short of memory"),  # grpc core: "Server is under memory pressure. …"
)
#: How a rate limiter or a quota words it (lower case, substrings).
_RATE_LIMIT_WORDS = (
    "rate limit",
    "rate_limit",
    "ratelimit",
    "rate-limit",
    "quota",
    "throttl",
    "too many requests",
)


def _exhausted(error: Any, what: str, details: dict[str, Any] | None = None) -> DispatchError:
    """A RESOURCE_EXHAUSTED not for a message's size (see the module's docstring), as a
    server short of capacity (``Overloaded``), a rate limit (``RateLimited``), or our
    gateway's ``result_too_large`` (``ResultTooLarge``)."""
    said = error.details() or ""
    status = f"RESOURCE_EXHAUSTED {said}".rstrip()
    trailers = _gateway_trailers(error)  # a rate limiter's retry-after too, not only ours
    retry_after = trailers.retry_after
    if trailers.error_type == ResultTooLarge.type:
        # Our gateway's: the plugin answered, the result is over the limit of the
        # dispatcher behind the gateway (jobs.max_result_bytes). No capacity comes back.
        return ResultTooLarge(
            f"{what}: the result is over the dispatcher's limit on results ({status});"
            " not retried: the same call answers as much again",
            retryable=False,
            details=details,
        )
    typed_rate_limited = trailers.error_type == RateLimited.type
    words = said.lower()
    if details is None and _AT_CONCURRENCY_LIMIT in words:  # a call, refused unrun
        details = CONNECT_STAGE
    for marker, short_of in _SERVER_SHORT_OF:
        if marker in words:
            return Overloaded(
                f"{what}: the plugin's server is {short_of} ({status}); not a rate limit:"
                " it takes calls again as its load falls",
                retry_after=retry_after,
                details=details,
            )
    if (
        typed_rate_limited
        or retry_after is not None
        or any(marker in words for marker in _RATE_LIMIT_WORDS)
    ):
        return RateLimited(
            f"{what}: the plugin or a proxy before it is rate limiting calls ({status})",
            retry_after=retry_after,
            details=details,
        )
    return Overloaded(
        f"{what}: the plugin's server is out of a resource ({status}); not a rate limit:"
        " it may take calls again as its load falls",
        details=details,
    )


#: How the SDKs word a failed hook before the plugin's error: ``init failed: …`` (Python),
#: ``init hook failed: …`` (Go, Rust, Java, TypeScript).
_HOOK_FAILED = re.compile(r"(?:init|start|stop|destroy)(?: hook)? failed: ", re.IGNORECASE)
#: A Python exception's repr (``PluginError('BadConfig', 'region is missing', …)``,
#: ``RuntimeError('boom')``), or ``Type: message`` (Go, Rust, Java, TypeScript).
_PYTHON_REPR = re.compile(r"(\w+)\((?:'([^']*)', )?'(.*?)'(?:, retryable=\w+)?\)", re.DOTALL)
_TYPE_FIRST = re.compile(r"([A-Za-z_][\w.$]*): (.*)", re.DOTALL)


def _plugin_error(details: str) -> tuple[str | None, str]:
    """The plugin's error type (None when it does not say) and message in a lifecycle
    status's ``details()``."""
    text = details.strip()
    if prefix := _HOOK_FAILED.match(text):
        text = text[prefix.end() :]
    if (python := _PYTHON_REPR.fullmatch(text)) is not None:
        name, remote_type, message = python.groups()
        return (remote_type if name == "PluginError" and remote_type else name), message
    if (typed := _TYPE_FIRST.fullmatch(text)) is not None:
        return typed.group(1), typed.group(2)
    return None, text


#: Every SDK's words for an ``Init`` past the hosts a service takes.
_HOSTS_FULL = "hosts are attached to this service"


def lifecycle_failure(error: Exception, what: str, step: str) -> DispatchError | None:
    """The error of a lifecycle ``step`` the plugin answered as failed (the statuses the
    SDKs send for a failing hook, above); None for any other failure (the transport's,
    the deadline's), which ``translate_rpc_error`` reads as for a call."""
    import grpc
    import grpc.aio

    if not isinstance(error, grpc.aio.AioRpcError):
        return None
    details = error.details() or ""
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not too_large(details):
        refused = {"step": step, "status": error.code().name}
        if _HOSTS_FULL not in details:  # a server short of capacity, or a rate limiter
            return _exhausted(error, what, refused)
        return Overloaded(
            f"{what}: the service already holds as many hosts as it takes ({details});"
            " it admits this one once another host has stopped it",
            details=refused,
        )
    if error.code() not in (
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INVALID_ARGUMENT,
    ):
        return None
    error_type, message = _plugin_error(details)
    said = f"{error_type}: {message}" if error_type else message
    return ProviderError(
        f"{what}: the plugin failed its {step}: {said}; not retried: fix what it names"
        " (its config, or the plugin) and start it again",
        retryable=False,
        details={"step": step, "error_type": error_type, "status": error.code().name},
    )


def not_run(error: Exception) -> bool:
    """Whether a failed RPC is a stopping plugin's refusal of a call it did not run."""
    import grpc
    import grpc.aio

    return (
        isinstance(error, grpc.aio.AioRpcError)
        and error.code() == grpc.StatusCode.UNAVAILABLE
        and _said_not_run(error)
    )


def refused_compression(error: Any) -> bool:
    """An UNIMPLEMENTED that names the encoding: the server has no decompressor for it."""
    import grpc

    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    text = str(details() if callable(details) else "").lower()
    return (
        callable(code)
        and code() == grpc.StatusCode.UNIMPLEMENTED
        and ("encoding" in text or "compress" in text)
    )


def _said_not_run(error: Any) -> bool:
    return any(key == NOT_RUN_TRAILER for key, _ in error.trailing_metadata() or ())


#: How grpc core words a call's end when the connection under it closed or was reset
#: (``Stream removed (Socket closed)``, ``… (sendmsg: Broken pipe (32))``, ``… (recvmsg:
#: Connection reset by peer)``, as grpcio 1.85 words them): the peer went away, which a
#: plugin answering UNAVAILABLE itself does not say.
_TRANSPORT_GONE_PREFIXES = ("Stream removed", "Socket closed", "Connection reset", "GOAWAY")


def transport_broke(error: Exception) -> bool:
    """Whether a failed RPC ended because its connection closed or was reset under it."""
    import grpc
    import grpc.aio

    return (
        isinstance(error, grpc.aio.AioRpcError)
        and error.code() == grpc.StatusCode.UNAVAILABLE
        and (error.details() or "").startswith(_TRANSPORT_GONE_PREFIXES)
    )


def never_left_the_client(details: str) -> bool:
    """Whether an UNAVAILABLE's ``details()`` says the call was never sent (see above)."""
    return details.startswith(_NOT_SENT_PREFIXES)
